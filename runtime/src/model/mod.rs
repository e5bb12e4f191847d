//! The records the runtime stores, apart from the code that acts on them: plain data
//! with its serde form, which is the stored form. [`crate::store`] depends on this
//! module only; the scheduler, batches, registry and API turn these records into what
//! they need.
//!
//! # Layout
//! - [`clock`]: [`Micros`], the one clock of every stored timestamp.
//! - [`job`]: [`Job`], the durable record of one execution, and [`JobOutcome`].
//! - [`account`]: [`AccountRecord`], [`KeyRecord`] and the [`Scope`] of a read.
//! - [`function`]: [`FunctionMeta`], one uploaded function version.
//! - [`batch`]: [`BatchState`] with its stored [`JobTemplate`].
//! - [`secret`]: [`SecretRecord`], a sealed secret.

pub mod account;
pub mod batch;
pub mod clock;
pub mod function;
pub mod job;
pub mod secret;

pub use account::{ADMIN, AccountRecord, KeyRecord, Scope};
pub use batch::{BatchState, JobTemplate, StoredLimits};
pub use clock::{Micros, now_micros, rfc3339};
pub use function::FunctionMeta;
pub use job::{BUSY, BatchRef, ContainerSpec, Job, JobId, JobOutcome};
pub use secret::SecretRecord;

/// Byte fields as base64 text inside the JSON record.
pub(crate) mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}
