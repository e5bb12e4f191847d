//! The JSON wire types of the Cloudpipe HTTP API.
//!
//! This crate is serde only, so that clients (`sdk-rust`, `cargo cloudpipe`) can speak
//! the API without pulling in wasmtime, a store backend or axum. The server turns on
//! the `openapi` feature to derive the schemas of `/v1/openapi.json` from these types.
//!
//! # Layout
//! - [`FunctionInfo`], [`FunctionKind`]: an uploaded function version.
//! - [`JobSpec`]: what a client submits; [`JobRecord`]: what the server keeps and answers.
//! - [`JobStatus`], [`JobError`], [`JobList`], [`JobEvent`]: a job's life as seen from outside.
//! - [`EnvValue`]: an environment variable's value, a text or a [`SecretRef`].
//! - [`SecretPut`], [`SecretInfo`], [`SecretList`]: write-only secrets.
//! - [`ErrorBody`]: every error answer, `{"error": {"code", "message"}}`.
//! - [`BatchSpec`], [`BatchRecord`], [`BatchStatus`], [`BatchCounts`], [`BatchList`]: one
//!   job template over many inputs.
//! - [`Account`], [`AccountCreate`], [`AccountPatch`], [`Quotas`], [`Role`], [`Me`]:
//!   accounts and their limits; [`ApiKeyCreate`], [`ApiKeyInfo`], [`NewApiKey`]: their keys.
//! - [`ExecutorList`], [`NodeList`], [`Health`], [`LogList`]: the server's own state.
//! - [`parse_duration`]: durations as the API writes them (`30s`, `500ms`, `2m`).
//!
//! # Example
//! ```
//! use cloudpipe_types::{JobSpec, JobRecord, JobStatus};
//! let spec: JobSpec = serde_json::from_str(r#"{"function": "hello", "args": ["world"]}"#).unwrap();
//! assert_eq!(spec.args, ["world"]);
//! let record: JobRecord = serde_json::from_str(r#"{
//!     "id": "0190b1c2-0000-7000-8000-000000000000", "function": "hello",
//!     "status": "succeeded", "exit_code": 0, "stdout": "hello world\n", "stderr": "",
//!     "attempts": 1, "max_attempts": 3, "created_at": "2026-11-23T14:00:00Z"
//! }"#).unwrap();
//! assert!(record.status.is_terminal());
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// A duration as the API and its command lines write them (`?wait=30s`, a batch's
/// `--timeout`): `30s`, `500ms`, `2m`, `1.5s`; a bare number is seconds. `None` when it
/// is none of these (or negative); each caller bounds it as its use needs.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(cloudpipe_types::parse_duration("1.5"), Some(Duration::from_millis(1500)));
/// assert_eq!(cloudpipe_types::parse_duration("3h"), None);
/// ```
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0)
        .then(|| std::time::Duration::from_secs_f64(secs.min(u32::MAX as f64)))
}

/// What kind of Wasm binary a function is; decided at upload from the binary itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FunctionKind {
    /// A component exporting `wasi:cli/run` (a `wasi:cli/command`).
    Command,
    /// A core Wasm module importing WASI preview1 and exporting `_start`.
    Module,
    /// A component exporting `wasi:http/incoming-handler` (a `wasi:http/proxy`):
    /// invoked over HTTP only (`/fn/{name}`), not run as a job.
    Http,
}

impl FunctionKind {
    /// The name used on the wire and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            FunctionKind::Command => "command",
            FunctionKind::Module => "module",
            FunctionKind::Http => "http",
        }
    }
}

/// One uploaded function version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct FunctionInfo {
    /// Content address of the binary: `sha256:` and 64 hex digits.
    pub id: String,
    /// The account that owns it.
    #[serde(default)]
    pub account: String,
    /// The name that points at this version, if any (a name points at its newest upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub kind: FunctionKind,
    /// Size of the binary in bytes.
    pub size: u64,
    /// RFC 3339 time of the first upload of this binary.
    pub created_at: String,
    /// The settings of the name (defaults when looked up by id).
    #[serde(default)]
    pub settings: FunctionSettings,
}

/// How a named function is invoked over HTTP (`/fn/{name}`). Settings belong to the
/// name and carry over when a new version is uploaded under it. A limit of 0 means
/// the server's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct FunctionSettings {
    /// Environment variables of every invocation: text, or `{"secret": "name"}` for a
    /// secret of the function's account, put in at each invocation.
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default)]
    pub timeout_ms: u64,
    #[serde(default)]
    pub memory_mb: u64,
    /// Invocations running at once; past it, 503 with Retry-After.
    #[serde(default)]
    pub max_concurrency: u32,
    /// Invocable without an API key (once accounts exist; until then every function is).
    #[serde(default)]
    pub public: bool,
    /// Where a wasi:http function's outgoing requests may go: `host`, `host:port`,
    /// `*.domain`, `*`, an IP address or a CIDR block; within its account's
    /// `allowed_outbound`, set by the admin. Empty (the default): nowhere.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
}

/// `PATCH /v1/functions/{name}`: each field given replaces that setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FunctionSettingsPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, EnvValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_outbound_hosts: Option<Vec<String>>,
}

impl FunctionSettings {
    /// These settings with `patch` applied.
    pub fn patched(mut self, patch: FunctionSettingsPatch) -> FunctionSettings {
        if let Some(v) = patch.env {
            self.env = v;
        }
        if let Some(v) = patch.timeout_ms {
            self.timeout_ms = v;
        }
        if let Some(v) = patch.memory_mb {
            self.memory_mb = v;
        }
        if let Some(v) = patch.max_concurrency {
            self.max_concurrency = v;
        }
        if let Some(v) = patch.public {
            self.public = v;
        }
        if let Some(v) = patch.allowed_outbound_hosts {
            self.allowed_outbound_hosts = v;
        }
        self
    }
}

/// The value of one environment variable: a text, or a reference to a secret of the
/// account (`{"secret": "api-token"}`) that the server puts in at run time. Only the
/// reference is ever stored with a job or a function, or sent back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(untagged)]
pub enum EnvValue {
    Text(String),
    Secret(SecretRef),
}

/// `{"secret": "name"}`: the value of the account's secret `name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub secret: String,
}

impl EnvValue {
    /// A reference to the secret `name`.
    pub fn secret(name: impl Into<String>) -> EnvValue {
        EnvValue::Secret(SecretRef { secret: name.into() })
    }

    /// The text, if this is not a secret reference.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            EnvValue::Text(t) => Some(t),
            EnvValue::Secret(_) => None,
        }
    }

    /// The secret's name, if this is a secret reference.
    pub fn secret_name(&self) -> Option<&str> {
        match self {
            EnvValue::Text(_) => None,
            EnvValue::Secret(r) => Some(&r.secret),
        }
    }
}

impl From<String> for EnvValue {
    fn from(s: String) -> EnvValue {
        EnvValue::Text(s)
    }
}

impl From<&str> for EnvValue {
    fn from(s: &str) -> EnvValue {
        EnvValue::Text(s.to_string())
    }
}

// By hand rather than `untagged`, so that a bad value gets a message that says what
// is expected instead of "did not match any variant".
impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EnvValue, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EnvValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"a string, or {"secret": "name"}"#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<EnvValue, A::Error> {
                let r = SecretRef::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(EnvValue::Secret(r))
            }
        }
        d.deserialize_any(V)
    }
}

/// A list of functions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct FunctionList {
    pub functions: Vec<FunctionInfo>,
}

/// A job as submitted by a client (`POST /v1/jobs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A function name, or a content address `sha256:…` for one exact version (the
    /// `wasm` executor).
    #[serde(default)]
    pub function: String,
    /// What runs the job: `wasm` (the default), `docker`, or `vm` (a clone of a
    /// snapshotted microVM; `command`, `args`, `env`, `stdin`, `timeout_ms`, `memory_mb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    /// `docker`: the image, present on the engine (nothing is pulled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `docker` and `vm`: the command (argv); `args` are appended. Without it, the
    /// image's own (docker).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// `docker`: CPUs the container may use (e.g. 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// `docker`: where the result comes from: `stdout` (the default) or
    /// `file:/path/in/container`, copied out when the container exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_source: Option<String>,
    /// Arguments after argv\[0\] (argv\[0\] is the function name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables, on top of `CLOUDPIPE_JOB_ID`, `CLOUDPIPE_FUNCTION`,
    /// `CLOUDPIPE_ATTEMPT`: each a text, or `{"secret": "name"}` for a secret of the
    /// account, put in when the job starts (the job keeps only the reference).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
    /// Standard input as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Standard input as base64, for binary input; exclusive with `stdin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Wall-clock limit of one attempt in milliseconds; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Linear memory cap in MiB; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Free-form labels to filter job lists by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// A client-chosen key: submitting the same key again returns the first job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// How many times the job may be started in all (a crash of the server mid-run
    /// costs an attempt). Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// Where a job is in its life. `queued → running → succeeded | failed | timed_out | cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl JobStatus {
    /// All statuses, in life order.
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::TimedOut,
        JobStatus::Cancelled,
    ];

    /// True once the job will not change any more.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    /// The name used on the wire, in query strings and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::TimedOut => "timed_out",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Why a job did not succeed, beyond its exit code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct JobError {
    /// Stable machine-readable kind: `exit`, `trap`, `memory_limit`, `timeout`,
    /// `cancelled`, `function_not_found`, `attempts_exhausted`, `internal`.
    pub kind: String,
    /// Human-readable detail (a trap message, the limit that was hit, ...).
    pub message: String,
}

/// A job as the server keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct JobRecord {
    pub id: String,
    /// The account that submitted it.
    #[serde(default)]
    pub account: String,
    /// The batch it belongs to, and the index of its input there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_index: Option<u64>,
    /// The function as submitted (a name or a content address).
    pub function: String,
    /// The exact version run (`sha256:…`), resolved at submit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_id: Option<String>,
    pub status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Standard output as text (invalid UTF-8 replaced; raw bytes at `/v1/jobs/{id}/stdout`).
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    /// True when stdout went past the cap and was cut.
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// How many times the job was started.
    pub attempts: u32,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// RFC 3339 timestamps.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Time from submit to the start of the last attempt, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// Time the last attempt ran, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_ms: Option<f64>,
    /// The executor that ran the job (`wasm`, `docker`, `vm`).
    #[serde(default)]
    pub executor: String,
    /// The cluster node that runs the job or ran its last attempt (PostgreSQL
    /// clusters only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A page of jobs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct JobList {
    pub jobs: Vec<JobRecord>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One server-sent event of `/v1/jobs/{id}/events`; the SSE `event:` field is the
/// variant name (`status`, `stdout`, `stderr`), the `data:` field this JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// The job changed status; the last event of a stream carries a terminal status
    /// and the full record.
    Status { status: JobStatus, record: Option<Box<JobRecord>> },
    /// A chunk of live standard output (lossy UTF-8).
    Stdout { data: String },
    /// A chunk of live standard error (lossy UTF-8).
    Stderr { data: String },
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A stable code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_wasm`, `payload_too_large`.
    pub code: String,
    pub message: String,
}

/// One line of a function's log (`GET /v1/functions/{name}/logs`): a line its guest
/// wrote to stderr, or the access record of one invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LogLine {
    /// RFC 3339 time the line was recorded.
    pub time: String,
    /// The invocation it belongs to (the `x-cloudpipe-invocation` response header).
    pub invocation: String,
    /// `stderr` or `access`.
    pub stream: String,
    pub line: String,
}

/// The recent log lines of a function, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LogList {
    pub lines: Vec<LogLine>,
}

/// One node of a cluster (`GET /v1/nodes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct NodeInfo {
    pub name: String,
    /// `all` (API and jobs), `api` or `worker`.
    pub role: String,
    /// The executors whose jobs it claims.
    pub executors: Vec<String>,
    pub version: String,
    /// Where the other nodes reach it (live events of its jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_url: Option<String>,
    pub started_at: String,
    /// Its last heartbeat, by the database's clock.
    pub last_heartbeat: String,
    /// Jobs it was running at its last heartbeat.
    pub running: u64,
    /// It holds the leader lease (rescuer, retention).
    pub leader: bool,
    /// Its heartbeat is older than one lease: it is gone or cut off.
    pub stale: bool,
}

/// `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct NodeList {
    /// The store the nodes share (`postgres`), or the embedded one of a single node.
    pub store: String,
    /// The node that answered.
    pub this_node: String,
    pub nodes: Vec<NodeInfo>,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Health {
    /// `ok`, or `degraded` while the store cannot write (its disk is full): reads still
    /// work, submits answer 507 until space returns.
    pub status: String,
    pub version: String,
    pub store: String,
    /// Why the server is degraded, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `PUT /v1/secrets/{name}`: the value, write-only (no answer ever carries it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SecretPut {
    pub value: String,
}

/// A secret as listed: its name and times, never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SecretInfo {
    /// `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`, unique in the account.
    pub name: String,
    /// RFC 3339 time of the first put.
    pub created_at: String,
    /// RFC 3339 time of the last put.
    pub updated_at: String,
}

/// The account's secrets, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SecretList {
    pub secrets: Vec<SecretInfo>,
}

/// One way of running jobs on this server, and whether it can now: `GET /v1/executors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExecutorStatus {
    /// What a job names: an executor (`wasm`, `docker`, `vm`: the spec's `executor`) or
    /// a built-in runner (`runner:js`: the spec's `function`).
    pub name: String,
    /// `executor` or `runner`.
    pub kind: String,
    /// Whether jobs of it can run now.
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What makes it ready (a package to install, a flag to set), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// `GET /v1/executors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ExecutorList {
    pub executors: Vec<ExecutorStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for st in JobStatus::ALL {
            assert_eq!(JobStatus::parse(st.as_str()), Some(st));
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert_eq!(JobStatus::parse("done"), None);
    }

    #[test]
    fn env_values_are_text_or_secret_references() {
        let spec: JobSpec = serde_json::from_str(
            r#"{"function": "f", "env": {"A": "x", "TOKEN": {"secret": "api-token"}}}"#,
        )
        .unwrap();
        assert_eq!(spec.env["A"], EnvValue::from("x"));
        assert_eq!(spec.env["TOKEN"], EnvValue::secret("api-token"));
        let back = serde_json::to_value(&spec.env).unwrap();
        assert_eq!(back, serde_json::json!({"A": "x", "TOKEN": {"secret": "api-token"}}));
        for bad in [r#"{"B": 1}"#, r#"{"B": {"secret": "x", "more": 1}}"#, r#"{"B": {}}"#] {
            let err = serde_json::from_str::<BTreeMap<String, EnvValue>>(bad).unwrap_err();
            assert!(
                err.to_string().contains("secret") || err.to_string().contains("string"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn unknown_spec_fields_are_refused() {
        let err = serde_json::from_str::<JobSpec>(r#"{"function": "f", "argz": []}"#).unwrap_err();
        assert!(err.to_string().contains("argz"), "{err}");
    }
}

/// What an account may do. The admin sees and manages every account's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    #[default]
    User,
}

/// Limits of one account. On an account, a field left out takes the server's default;
/// in `GET /v1/me` every field is the limit in force (`null`: no limit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Jobs queued or running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_jobs: Option<u64>,
    /// Longest `timeout_ms` of one job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout_ms: Option<u64>,
    /// Largest `memory_mb` of one job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    /// Total size of the function versions the account stores, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_function_bytes: Option<u64>,
    /// Finished jobs kept: past it, retention deletes the account's oldest finished
    /// jobs (never another account's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_finished_jobs: Option<u64>,
    /// Inputs of one batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_inputs: Option<u64>,
    /// Batches the account stores, whatever their status (deleting one, or batch
    /// retention, frees its place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batches: Option<u64>,
    /// Inputs of all the account's stored batches together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stored_batch_inputs: Option<u64>,
}

/// An account (`GET /v1/accounts/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Account {
    /// `[a-z0-9][a-z0-9_-]{0,62}`; it identifies the account everywhere.
    pub name: String,
    pub role: Role,
    /// A disabled account's keys are refused and its jobs do not run.
    #[serde(default)]
    pub disabled: bool,
    /// Limits set on this account; fields left out take the server's defaults.
    #[serde(default)]
    pub quotas: Quotas,
    /// Policy: the account's containers may use the network (off by default).
    #[serde(default)]
    pub allow_network: bool,
    /// Policy: where the account's functions (their `allowed_outbound_hosts`) and
    /// batch hooks may send requests, at most: `host`, `host:port`, `*.domain`, `*`,
    /// an IP address or a CIDR block. Empty (the default): nowhere. An admin account
    /// may go anywhere. Internal addresses (loopback, private, link-local, metadata)
    /// stay refused unless the server allows them (`--allow-internal-outbound`).
    #[serde(default)]
    pub allowed_outbound: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
}

/// `POST /v1/accounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AccountCreate {
    pub name: String,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub quotas: Quotas,
    #[serde(default)]
    pub allow_network: bool,
    #[serde(default)]
    pub allowed_outbound: Vec<String>,
}

/// `PATCH /v1/accounts/{name}`: each field given replaces that setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AccountPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_network: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_outbound: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct AccountList {
    pub accounts: Vec<Account>,
}

/// `POST /v1/accounts/{name}/keys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCreate {
    /// A note for people (`laptop`, `ci`), at most 128 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// An API key as listed: never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApiKeyInfo {
    /// Public id of the key (`key_…`), used to revoke it.
    pub id: String,
    pub account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// RFC 3339.
    pub created_at: String,
}

/// A key just created: the only answer that carries the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct NewApiKey {
    #[serde(flatten)]
    pub info: ApiKeyInfo,
    /// The secret: send it as `Authorization: Bearer KEY`. Shown once; the server
    /// keeps only its hash.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApiKeyList {
    pub keys: Vec<ApiKeyInfo>,
}

/// `GET /v1/me`: who the key belongs to and the limits in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Me {
    pub account: String,
    pub role: Role,
    /// Limits in force (`null`: none).
    pub quotas: Quotas,
    /// Jobs queued or running now.
    pub active_jobs: u64,
    /// Bytes of function versions stored.
    pub function_bytes: u64,
}

/// `POST /v1/batches`: one job template run over many inputs, cloudtask-style.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// The job every input runs (any executor); each input's words are appended to
    /// its `args`. Its `idempotency_key` must be unset.
    pub template: JobSpec,
    /// The inputs as argument lists: one job each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<Vec<String>>>,
    /// The inputs as text: one job per non-empty line, split into words on whitespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_text: Option<String>,
    /// Most jobs of the batch running at once (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<u32>,
    /// Timeout of each job in milliseconds (overrides the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Extra attempts of an input whose job failed or timed out (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Stop launching jobs after this many inputs failed in a row (0 or absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strikes: Option<u32>,
    /// Called once when the batch ends: `POST` of the batch record as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

/// Where a batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// Jobs are being launched.
    Running,
    /// Every input ran to an end (successes and failures alike).
    Finished,
    /// Stopped by its strikes; pending inputs can be resumed.
    Struck,
    /// Cancelled; pending inputs can be resumed.
    Cancelled,
}

/// How many inputs are where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BatchCounts {
    /// Not launched yet (or waiting for a retry, or left by a stop).
    pub pending: u64,
    pub running: u64,
    pub ok: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub cancelled: u64,
}

/// A batch (`GET /v1/batches/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BatchRecord {
    pub id: String,
    pub account: String,
    pub status: BatchStatus,
    /// Number of inputs.
    pub total: u64,
    pub counts: BatchCounts,
    pub split: u32,
    pub retries: u32,
    pub strikes: u32,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// From creation to the end (or to now).
    pub wall_ms: f64,
    /// The run time of all its jobs' attempts, summed.
    pub job_ms: f64,
    /// `job_ms / (wall_ms × split)`: how busy the split kept its slots.
    pub efficiency: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct BatchList {
    /// Newest first.
    pub batches: Vec<BatchRecord>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
