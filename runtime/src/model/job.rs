//! The job model as the runtime keeps it: a [`Job`] is the durable record of one
//! execution, written by the [`Store`](crate::Store) and turned into the wire type
//! [`JobRecord`] at the API edge.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use cloudpipe_types::{EnvValue, JobError, JobRecord, JobStatus};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::account::admin_name;
use super::b64;
use super::clock::{Micros, rfc3339};

/// A job id: a UUIDv7, so ids sort by creation time (newest last) in every store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh id, later than every id made before it in this process.
    pub fn new() -> JobId {
        JobId(Uuid::now_v7())
    }

    /// Big-endian bytes: their byte order is the id order.
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    pub fn from_bytes(b: [u8; 16]) -> JobId {
        JobId(Uuid::from_bytes(b))
    }
}

impl Default for JobId {
    fn default() -> Self {
        JobId::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// The durable record of one job: its input, its state and, once it ends, its outcome.
///
/// Stored as JSON (byte fields as base64) so that records written by one version stay
/// readable by the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// The account that owns the job.
    #[serde(default = "admin_name")]
    pub account: String,
    /// The function as submitted (a name or `sha256:…`).
    pub function: String,
    /// The exact version, resolved at submit.
    pub function_id: String,
    pub args: Vec<String>,
    /// Text values, and references to secrets of the account (resolved only when an
    /// attempt starts; the record never holds a secret's value).
    pub env: BTreeMap<String, EnvValue>,
    #[serde(with = "b64")]
    pub stdin: Vec<u8>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    /// Resolved limits of one attempt.
    pub timeout_ms: u64,
    pub memory_mb: u64,
    pub max_attempts: u32,
    /// The executor that runs the job (`wasm`, `docker`).
    pub executor: String,
    /// `docker`: the image, command, CPU limit, result file and network policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// The batch input this job runs, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchRef>,
    /// The node that runs the job or ran its last attempt (clusters only; a single
    /// node leaves it unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,

    pub status: JobStatus,
    /// How many times the job was started (incremented durably *before* each start).
    pub attempts: u32,
    pub created_at: Micros,
    pub started_at: Option<Micros>,
    pub finished_at: Option<Micros>,

    pub exit_code: Option<i32>,
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub error: Option<JobError>,
}

impl Job {
    /// Applies the outcome of the current attempt: the job becomes terminal.
    pub fn finish(&mut self, outcome: JobOutcome, now: Micros) {
        debug_assert!(outcome.status.is_terminal());
        self.status = outcome.status;
        self.exit_code = outcome.exit_code;
        self.stdout = outcome.stdout;
        self.stderr = outcome.stderr;
        self.stdout_truncated = outcome.stdout_truncated;
        self.stderr_truncated = outcome.stderr_truncated;
        self.error = outcome.error;
        self.finished_at = Some(now);
    }

    /// The job without its stdin and output: what stores keep in the record and what
    /// lists return (stdin and output are stored apart and read only by those who
    /// need them: see [`Store`](crate::Store)).
    pub fn summary(&self) -> Job {
        // No `..`: a new field must be placed here on purpose.
        Job {
            id: self.id,
            account: self.account.clone(),
            function: self.function.clone(),
            function_id: self.function_id.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            stdin: Vec::new(),
            tags: self.tags.clone(),
            idempotency_key: self.idempotency_key.clone(),
            timeout_ms: self.timeout_ms,
            memory_mb: self.memory_mb,
            max_attempts: self.max_attempts,
            executor: self.executor.clone(),
            container: self.container.clone(),
            batch: self.batch.clone(),
            node: self.node.clone(),
            status: self.status,
            attempts: self.attempts,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            exit_code: self.exit_code,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: self.stdout_truncated,
            stderr_truncated: self.stderr_truncated,
            error: self.error.clone(),
        }
    }

    /// The wire form of this job.
    pub fn to_record(&self) -> JobRecord {
        let ms = |from: Micros, to: Micros| to.saturating_sub(from) as f64 / 1000.0;
        JobRecord {
            id: self.id.to_string(),
            account: self.account.clone(),
            batch: self.batch.as_ref().map(|b| b.id.clone()),
            batch_index: self.batch.as_ref().map(|b| b.index),
            function: self.function.clone(),
            function_id: Some(self.function_id.clone()),
            status: self.status,
            exit_code: self.exit_code,
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            stdout_truncated: self.stdout_truncated,
            stderr_truncated: self.stderr_truncated,
            error: self.error.clone(),
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            tags: self.tags.clone(),
            created_at: rfc3339(self.created_at),
            started_at: self.started_at.map(rfc3339),
            finished_at: self.finished_at.map(rfc3339),
            queue_ms: self.started_at.map(|s| ms(self.created_at, s)),
            run_ms: self.started_at.zip(self.finished_at).map(|(s, f)| ms(s, f)),
            executor: self.executor.clone(),
            node: self.node.clone(),
        }
    }
}

/// Which input of which batch a job runs, and which try of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRef {
    pub id: String,
    pub index: u64,
    /// The retry round (`POST /v1/batches/{id}/retry` starts a new one).
    pub round: u32,
}

/// The container of a `docker` job, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub nano_cpus: Option<u64>,
    #[serde(default)]
    pub result_file: Option<String>,
    #[serde(default)]
    pub network: bool,
}

/// How one attempt ended, as an executor reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// `Succeeded`, `Failed`, `TimedOut` or `Cancelled`.
    pub status: JobStatus,
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub error: Option<JobError>,
}

impl Default for JobOutcome {
    /// A failure with no output; executors fill in what happened.
    fn default() -> Self {
        JobOutcome {
            status: JobStatus::Failed,
            exit_code: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            error: None,
        }
    }
}

/// The error kind of an attempt that found its executor full (the wasm instance pool):
/// not an outcome to record. The scheduler gives the job back to the queue, the attempt
/// not counted, and runs it when room frees up.
pub const BUSY: &str = "busy";

impl JobOutcome {
    /// An attempt that did not start because the executor is full ([`BUSY`]).
    pub fn busy(message: impl Into<String>) -> JobOutcome {
        JobOutcome::error(JobStatus::Failed, BUSY, message)
    }

    /// Whether this is [`JobOutcome::busy`]: to requeue, not to record.
    pub fn is_busy(&self) -> bool {
        self.error.as_ref().is_some_and(|e| e.kind == BUSY)
    }

    /// An outcome with no output: the job failed before it ran.
    pub fn error(status: JobStatus, kind: &str, message: impl Into<String>) -> JobOutcome {
        JobOutcome {
            status,
            error: Some(JobError { kind: kind.to_string(), message: message.into() }),
            ..JobOutcome::default()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{ADMIN, now_micros};

    /// A queued job with the given function, for store and scheduler tests.
    pub fn queued_job(function: &str) -> Job {
        Job {
            id: JobId::new(),
            account: ADMIN.to_string(),
            function: function.to_string(),
            function_id: format!("sha256:{}", "0".repeat(64)),
            args: vec!["a".into()],
            env: BTreeMap::new(),
            stdin: b"\x00\xffin".to_vec(),
            tags: vec![],
            idempotency_key: None,
            timeout_ms: 1000,
            memory_mb: 64,
            max_attempts: 3,
            executor: "wasm".into(),
            container: None,
            batch: None,
            node: None,
            status: JobStatus::Queued,
            attempts: 0,
            created_at: now_micros(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            stdout: vec![],
            stderr: vec![],
            stdout_truncated: false,
            stderr_truncated: false,
            error: None,
        }
    }

    #[test]
    fn stored_form_round_trips_binary_fields() {
        let job = queued_job("f");
        let json = serde_json::to_vec(&job).unwrap();
        let back: Job = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a.to_bytes() < b.to_bytes());
        assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
    }

    #[test]
    fn record_derives_durations() {
        let mut job = queued_job("f");
        job.created_at = 1_000_000;
        job.started_at = Some(1_002_500);
        job.finish(JobOutcome { status: JobStatus::Succeeded, ..Default::default() }, 1_003_000);
        let r = job.to_record();
        assert_eq!(r.queue_ms, Some(2.5));
        assert_eq!(r.run_ms, Some(0.5));
        assert_eq!(r.created_at, "1970-01-01T00:00:01Z");
    }
}
