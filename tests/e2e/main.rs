//! End-to-end tests: each starts the real `cloudpipe` binary on a loopback port with
//! its own data directory and drives it over HTTP.
//!
//! # Layout
//! - `server`: [`server::TestServer`], a `cloudpipe serve` child process.
//! - `jobs`: the guest contract, waiting, events, listing, idempotency, cancel.
//! - `hostile`: guests that loop, bomb memory, recurse, flood output, exit non-zero.
//! - `bad_requests`: malformed input gets a 4xx with a stable code.
//! - `big_jobs`: lists of big jobs carry no output (or capped output); memory stays flat.
//! - `durability`: `kill -9` with jobs in flight, then a restart, per store backend.
//! - `functions`: upload, list, delete; the compiled cache survives a restart.
//! - `fuzz`: schemathesis sends generated requests to every operation of the OpenAPI
//!   document: no 5xx, only documented statuses and bodies, the server still up.
//! - `invoke`: functions as web endpoints (`/fn/{name}`), CGI, limits, logs.
//! - `cli`: `cloudpipe up --once`, graceful SIGTERM.
//! - `cors`: CORS off by default, `--cors-origins`.
//! - `disk`: a full disk (a small tmpfs): 507 for new work, reads and results kept, resumes.
//! - `auth`: API keys on every route, tenant isolation, quotas, revocation, disabled
//!   accounts, the external auth service, failed-auth limits, first start, HTTPS.
//! - `security`: no server-side request forgery (wasi:http, batch hooks), no lockout,
//!   external names apart from local accounts, batches stop with their account,
//!   invocation admission and the account's quotas on HTTP invocation, the Wasm
//!   instance pool sized for the limits admitted per component.
//! - `batches`: split, retries, strikes, resume after `kill -9`, cancel, the hook, the CLI.
//! - `docker`: the docker executor against a real engine (started when needed), and
//!   images pulled from a real registry.
//! - `executors`: `GET /v1/executors`, and 503s that say what to install.
//! - `secrets`: write-only secrets in jobs and functions, never in an answer, a log or
//!   the store's files; rotation of the key; the CLI.
//! - `docker`: the docker executor against a real engine (started when needed).
//! - `v1compat`: Cloudpipe v1's `/v1/job` API as the multyvac client drove it.
//! - `upgrade`: stores of older formats served, newer ones refused.
//! - `vm`: the vm executor with real QEMU: clones of a snapshotted template VM.

mod auth;
mod bad_requests;
mod batches;
mod big_jobs;
mod cli;
mod cluster;
mod cors;
mod disk;
mod docker;
mod durability;
mod executors;
mod functions;
mod fuzz;
mod hostile;
mod invoke;
mod jobs;
mod secrets;
mod security;
mod server;
mod upgrade;
mod v1compat;
mod vm;
