//! One router per resource, merged in [`crate::router`].

pub mod functions;
pub mod invoke;
pub mod jobs;
pub mod system;
