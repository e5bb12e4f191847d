//! The [`Executor`] trait: what runs a job. Each implementation owns its isolation and
//! its limits; the scheduler only hands it a [`RunRequest`] and a cancellation token.
//!
//! Implementations live beside this file: [`wasm`] (wasmtime + WASI 0.2, in process),
//! [`docker`] (containers through the Docker Engine API) and [`vm`] (QEMU microVMs
//! cloned from a snapshot); [`Executors`] picks one per job by the job's `executor`
//! field.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cloudpipe_types::FunctionKind;
use tokio_util::sync::CancellationToken;

use crate::model::JobOutcome;

pub mod docker;
pub mod vm;
pub mod wasm;

/// Everything an executor needs for one attempt of one job.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// The executor that runs it (`wasm`, `docker`, `vm`).
    pub executor: String,
    /// The job id (also given to the guest as `CLOUDPIPE_JOB_ID`).
    pub job_id: String,
    /// argv\[0\] and `CLOUDPIPE_FUNCTION`: the function as submitted.
    pub function: String,
    /// The exact version to run (`sha256:…`).
    pub function_id: String,
    /// argv\[1..\].
    pub args: Vec<String>,
    /// The job's environment; the executor adds the `CLOUDPIPE_*` variables.
    pub env: Vec<(String, String)>,
    pub stdin: Bytes,
    /// 1 for the first attempt (`CLOUDPIPE_ATTEMPT`).
    pub attempt: u32,
    /// Wall-clock limit of this attempt.
    pub timeout: Duration,
    /// Cap on the guest's memory, in bytes.
    pub memory_bytes: u64,
    /// Cap on each of stdout and stderr kept in the outcome, in bytes; past it the
    /// output is cut and flagged truncated (the guest keeps running).
    pub output_cap: usize,
    /// `docker`: what to run and how; `vm`: `command` (the image is `vm`).
    pub container: Option<ContainerRequest>,
}

/// The container of a `docker` job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerRequest {
    pub image: String,
    /// argv; empty: the image's own command. The job's args are appended.
    pub command: Vec<String>,
    /// CPU limit in billionths of a CPU.
    pub nano_cpus: Option<u64>,
    /// Copy this file out at exit and make it the result (stdout).
    pub result_file: Option<String>,
    /// Network access (an account policy; none by default).
    pub network: bool,
}

/// Which output stream a live chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Receives output while a job runs (for `/v1/jobs/{id}/events`). Called from the
/// executor's write path, so it must be cheap and must not block.
pub trait OutputSink: Send + Sync {
    fn chunk(&self, stream: OutputStream, data: &[u8]);
}

/// An [`OutputSink`] that drops everything.
#[derive(Debug, Default)]
pub struct NoLiveOutput;

impl OutputSink for NoLiveOutput {
    fn chunk(&self, _: OutputStream, _: &[u8]) {}
}

/// Why a binary cannot become a function.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Not a Wasm binary, or a kind of Wasm this executor does not run.
    #[error("{0}")]
    Invalid(String),
    /// Valid, but holding more of a pooled resource (core instances, memories, tables)
    /// than the server admits per component.
    #[error("{0}")]
    OverLimits(String),
    /// Something failed on our side (disk, ...).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Why an executor (or a built-in runner) cannot take jobs now, and what would make it
/// ready. Shown as `reason: fix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unready {
    pub reason: String,
    /// A command to run or a setting to change, when known.
    pub fix: Option<String>,
}

impl Unready {
    pub fn new(reason: impl Into<String>, fix: impl Into<String>) -> Unready {
        Unready { reason: reason.into(), fix: Some(fix.into()) }
    }

    /// A reason with no known fix.
    pub fn reason(reason: impl Into<String>) -> Unready {
        Unready { reason: reason.into(), fix: None }
    }
}

impl std::fmt::Display for Unready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.fix {
            Some(fix) => write!(f, "{}: {fix}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// Where an executor gets the binary of a function version it has nothing of here (its
/// compiled artefact is gone, or another node took the upload). The registry hands
/// one to the executors that need it ([`crate::registry::stored_binaries`]): an
/// executor never reads the store.
#[async_trait]
pub trait Binaries: Send + Sync + 'static {
    /// The binary of version `id` (`sha256:…`); `None`: there is no such version.
    async fn binary(&self, id: &str) -> anyhow::Result<Option<Bytes>>;
}

/// Runs jobs. One instance per process, shared by all jobs.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Short name stored in each job record (`wasm`, `docker`, `vm`).
    fn name(&self) -> &'static str;

    /// Runs once per function version, at upload: checks the binary, decides its kind
    /// and does the costly work (compiling, caching) so that jobs start fast. `id` is the
    /// content address (`sha256:…`) of `binary`.
    async fn prepare(&self, id: &str, binary: &[u8]) -> Result<FunctionKind, PrepareError>;

    /// Function version `id` is gone from the store (no account has it any more): drop
    /// whatever [`Executor::prepare`] kept of it (compiled code, on disk and in memory).
    fn forget(&self, _id: &str) {}

    /// Runs once per job attempt and returns how it ended. Never panics on guest
    /// behaviour: traps, limits, timeouts and cancellation are outcomes. When `cancel`
    /// fires the attempt ends promptly with status `cancelled`.
    async fn run(
        &self,
        req: RunRequest,
        live: Arc<dyn OutputSink>,
        cancel: CancellationToken,
    ) -> JobOutcome;

    /// Runs at each submission of a job naming this executor, and for `GET
    /// /v1/executors`: whether jobs can run now; `Err` says why not (an engine that is
    /// down, say) and what would fix it. Cheap: no job waits on it for long.
    async fn available(&self) -> Result<(), Unready> {
        Ok(())
    }
}

/// One output stream of an executor kept up to a cap; everything kept is also sent
/// live. (The wasm executor has its own, written into by the guest's WASI streams.)
pub(crate) struct Capped {
    pub bytes: Vec<u8>,
    cap: usize,
    pub truncated: bool,
}

impl Capped {
    pub fn new(cap: usize) -> Capped {
        Capped { bytes: Vec::new(), cap, truncated: false }
    }

    pub fn push(&mut self, data: &[u8], stream: OutputStream, live: &Arc<dyn OutputSink>) {
        let room = self.cap.saturating_sub(self.bytes.len());
        let kept = &data[..data.len().min(room)];
        if kept.len() < data.len() {
            self.truncated = true;
        }
        if !kept.is_empty() {
            self.bytes.extend_from_slice(kept);
            live.chunk(stream, kept);
        }
    }
}

/// The executors of a process, chosen per job by name.
pub struct Executors {
    executors: Vec<Arc<dyn Executor>>,
}

impl Executors {
    /// The first executor is the default, and the one that prepares uploads.
    pub fn new(executors: Vec<Arc<dyn Executor>>) -> Executors {
        assert!(!executors.is_empty(), "at least one executor");
        Executors { executors }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Executor>> {
        self.executors.iter().find(|e| e.name() == name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.executors.iter().map(|e| e.name()).collect()
    }

    pub fn default_name(&self) -> &'static str {
        self.executors[0].name()
    }

    /// Whether `name` can take jobs now (`None`: no such executor here).
    pub async fn available(&self, name: &str) -> Option<Result<(), Unready>> {
        Some(self.get(name)?.available().await)
    }
}

#[async_trait]
impl Executor for Executors {
    fn name(&self) -> &'static str {
        self.default_name()
    }

    async fn prepare(&self, id: &str, binary: &[u8]) -> Result<FunctionKind, PrepareError> {
        self.executors[0].prepare(id, binary).await
    }

    fn forget(&self, id: &str) {
        self.executors[0].forget(id)
    }

    async fn run(
        &self,
        req: RunRequest,
        live: Arc<dyn OutputSink>,
        cancel: CancellationToken,
    ) -> JobOutcome {
        let name = if req.executor.is_empty() { self.default_name() } else { &req.executor };
        match self.get(name) {
            Some(e) => e.clone().run(req, live, cancel).await,
            None => JobOutcome::error(
                cloudpipe_types::JobStatus::Failed,
                "executor_unavailable",
                format!("this server has no {name:?} executor"),
            ),
        }
    }
}
