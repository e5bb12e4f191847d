//! Cloudpipe's runtime: everything between the HTTP API and a running function.
//!
//! # Layout
//! - [`account`]: what an account may do: its [`Limits`](account::Limits) and the
//!   [`Tenant`](account::Tenant) a job runs for.
//! - [`batch`]: [`Batches`](batch::Batches), cloudtask-style runs of one template over
//!   many inputs (split, retries, strikes, resume, retry, report hook).
//! - [`egress`]: where requests sent for a tenant (outgoing `wasi:http`, batch hooks)
//!   may go: the function's list, the account's policy, no internal addresses.
//! - [`model`]: the stored records (jobs, accounts, function versions, batches,
//!   secrets) and their clock, apart from the code that acts on them; the job record
//!   is [`Job`], how an attempt ends [`JobOutcome`].
//! - [`executor`]: the [`Executor`] trait; [`executor::wasm`] runs Wasm components and
//!   WASI modules in process with wasmtime.
//! - [`registry`]: [`FunctionRegistry`], uploads: content addressing, validation,
//!   preparation by the executor, storage.
//! - [`secrets`]: [`Secrets`](secrets::Secrets), write-only values sealed with the
//!   server's key and put into a job's environment only when it runs.
//! - [`store`]: the [`Store`] trait and its embedded backends (redb default, sled).
//! - [`scheduler`]: [`Scheduler`], the durable queue with bounded concurrency, retries,
//!   cancellation, live events and recovery at start-up.
//!
//! # Example
//! ```
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! use cloudpipe_runtime::{Runtime, RuntimeConfig};
//! let dir = tempfile::tempdir()?;
//! let rt = Runtime::start(RuntimeConfig::new(dir.path())).await?;
//! let wasm = wat::parse_str(include_str!("../../examples/hello.wat"))?;
//! let admin = cloudpipe_runtime::account::Tenant::admin();
//! rt.registry.upload(&admin, Some("hello".into()), wasm.into()).await?;
//! let spec = serde_json::from_str(r#"{"function": "hello", "args": ["docs"]}"#)?;
//! let job = rt.scheduler.submit(spec, &admin).await?.job().clone();
//! let done = rt.scheduler.wait(job.id, std::time::Duration::from_secs(10)).await?.unwrap();
//! assert_eq!(done.stdout, b"hello, docs!\n");
//! # Ok(()) }
//! ```

pub mod account;
pub mod batch;
pub mod cluster;
pub mod egress;
pub mod executor;
pub mod model;
pub mod registry;
mod runtime;
pub mod scheduler;
pub mod secrets;
pub mod store;

pub use executor::{Executor, OutputSink, OutputStream, RunRequest};
pub use model::{Job, JobId, JobOutcome};
pub use registry::FunctionRegistry;
pub use runtime::{Readiness, Runtime, RuntimeConfig};
pub use scheduler::Scheduler;
pub use store::Store;

#[cfg(test)]
mod tests {
    /// RUSTSEC-2026-0315/0316/0325–0327 are fixed in wasmtime and wasmtime-wasi only
    /// from 48.0.4: the lockfile must never resolve to an older 48.x.
    #[test]
    fn wasmtime_is_past_the_fixed_advisories() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        for krate in ["wasmtime", "wasmtime-wasi"] {
            let header = format!("name = \"{krate}\"\nversion = \"");
            let at = lock.find(&header).unwrap_or_else(|| panic!("{krate} not in Cargo.lock"));
            let rest = &lock[at + header.len()..];
            let version = &rest[..rest.find('"').unwrap()];
            let parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap()).collect();
            assert!(
                parts >= vec![48, 0, 4],
                "{krate} {version} predates the advisory fixes (need >= 48.0.4)"
            );
        }
    }
}
