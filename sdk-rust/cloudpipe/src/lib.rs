//! The Rust client of [Cloudpipe](https://github.com/cloudpipe/cloudpipe): upload
//! WebAssembly functions, run them as jobs, follow their output live, and call them
//! over HTTP.
//!
//! It speaks the JSON API through the wire types of `cloudpipe-types` (re-exported
//! here) and depends on nothing of the server: no wasmtime, no store, no axum.
//!
//! # Layout
//! - [`Client`]: the async client (reqwest); one per server, cheap to clone.
//! - [`blocking::Client`]: the same calls for code without an async runtime.
//! - [`Config`], [`Credentials`]: where to connect and with which key (flags, then
//!   `CLOUDPIPE_URL` / `CLOUDPIPE_API_KEY`, then the credentials file).
//! - [`RetryPolicy`]: retries on connection errors and on 429/503 (`Retry-After`).
//! - [`sse`]: the server-sent events parser and [`JobEvents`], a job's live events.
//! - [`Error`]: typed errors carrying the API's codes.
//!
//! # Example
//!
//! ```no_run
//! use cloudpipe::{Client, JobSpec};
//!
//! # async fn run() -> Result<(), cloudpipe::Error> {
//! // CLOUDPIPE_URL / CLOUDPIPE_API_KEY, else the credentials file, else localhost.
//! let client = Client::from_env()?;
//! let wasm = std::fs::read("target/wasm32-wasip2/release/calc.wasm").unwrap();
//! client.upload_function("calc", wasm).await?;
//!
//! // A typed function (cloudpipe-guest): the name in argv, the arguments as JSON on stdin.
//! let spec = JobSpec {
//!     function: "calc".into(),
//!     args: vec!["add".into()],
//!     stdin: Some("[3, 4]".into()),
//!     ..JobSpec::default()
//! };
//! let job = client.submit_and_wait(&spec, None).await?;
//! assert_eq!(job.stdout.trim(), "7");
//! # Ok(()) }
//! ```
//!
//! Errors carry the API's codes:
//!
//! ```
//! # async fn run(client: cloudpipe::Client) {
//! match client.job("no-such-job").await {
//!     Err(e) if e.is_not_found() => eprintln!("gone: {e}"),
//!     Err(e) if e.is_auth() => eprintln!("check CLOUDPIPE_API_KEY: {e}"),
//!     Err(e) => eprintln!("{}: {e}", e.code().unwrap_or("error")),
//!     Ok(job) => println!("{}", job.status.as_str()),
//! }
//! # }
//! ```

pub mod blocking;
mod client;
mod config;
mod error;
mod retry;
pub mod sse;

pub use client::{Client, Invocation, InvokeResponse, JobQuery};
pub use cloudpipe_types::{
    Account, AccountCreate, AccountPatch, ApiKeyInfo, BatchCounts, BatchList, BatchRecord,
    BatchSpec, BatchStatus, EnvValue, ErrorBody, FunctionInfo, FunctionKind, FunctionSettings,
    FunctionSettingsPatch, JobError, JobEvent, JobList, JobRecord, JobSpec, JobStatus, Me,
    NewApiKey, Quotas, Role, SecretInfo, SecretList, SecretRef,
};
pub use config::{Config, Credentials, DEFAULT_URL};
pub use error::{Error, Result};
/// The HTTP method of an [`Invocation`].
pub use reqwest::Method;
pub use retry::RetryPolicy;
pub use sse::JobEvents;
