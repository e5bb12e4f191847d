//! Test helpers shared by the end-to-end tests (`tests/e2e`), the SDK's tests and the
//! benchmarks: the real `cloudpipe serve` as a child process, and a Docker engine with
//! a registry for the docker executor's tests. Real parts only: when something cannot
//! be had (a binary, a daemon), the helper panics saying what to install.
//!
//! # Layout
//! - [`serve`]: starts `cloudpipe serve` on a port the OS picks and keeps its log;
//!   metrics and the machine line for benchmarks.
//! - [`server`]: [`server::Server`], a server with its own data directory killed on
//!   drop, and [`server::server_bin`], the binary for crates that do not build it.
//! - [`docker`]: a running Docker engine, the test image, a registry.
//!
//! # Example
//! ```no_run
//! use cloudpipe_test_support::{serve::ADMIN_KEY, server::Server};
//! let s = Server::start();
//! println!("curl -H 'Authorization: Bearer {ADMIN_KEY}' {}/v1/me", s.url);
//! ```

pub mod docker;
pub mod serve;
pub mod server;
