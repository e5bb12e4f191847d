//! Cloudpipe v1's job API, so that existing v1 clients (the multyvac client) keep
//! working: `POST /v1/job`, `GET /v1/job`, `POST /v1/job/kill`,
//! `POST /v1/job/kill_all`, `GET /v1/job/queue_stats`.
//!
//! These routes are a second view of the jobs of `/v1/jobs`, not a second store. A v1
//! job is a `docker` job running `["/bin/sh", "-c", cmd]` in the server's v1 image
//! (`--v1-image`); what v1 kept beside the command lives in the job itself:
//! - **jid**: the job's id (a UUIDv7) read as a 128-bit unsigned integer. v1's jids
//!   were integers that grew with time, and clients rely on both (multyvac's `wait`
//!   accepts only integers); these do too, with no table to keep. Each job also
//!   carries `id`, the same id in its usual form, for clients whose JSON numbers are
//!   doubles. A jid is accepted in either form.
//! - **name, tags, result type**: tags `key=value` (a v1 tag list's plain words are
//!   tags too, shown as `word: ""`); the name is the tag `name` (multyvac reads it
//!   from the tags), the result type the tag `result_type` (absent: `binary`).
//! - **max_runtime** (minutes, fractions allowed): the job's timeout, capped by the
//!   account's quota and the server's maximum; without it, the longest allowed.
//! - **restartable: false**: one attempt only.  **multicore**: the container's CPUs.
//!
//! Statuses: `queued` → `queued`, `running` → `processing`, `succeeded` → `done`,
//! `failed` → `error`, `timed_out` → `stalled` (v1's name for a job that got stuck
//! and was stopped), `cancelled` → `killed`. v1's `waiting` (submitted, held before
//! the queue, for `depends_on`) never occurs: dependencies are refused at submit, and
//! a job is queued the moment it is acknowledged. `result` is the job's result
//! (stdout, or the `file:` it names) in base64, as v1 sent it for its two result
//! types (`binary`, `pickle`); `stdout` and `stderr` are text.
//!
//! The gaps of the original are closed: the timeout is always enforced, `env` reaches
//! the command, and there is no `sudo`: a caller reaches only its own jobs (the
//! admin, everyone's, by jid; `kill_all` and `queue_stats` are about the caller's own
//! jobs, the admin's too). Errors use v1's envelope
//! `{"error": {"code", "message", "hint", "retry"}}` and, where v1 had one, its code.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudpipe_runtime::store::JobFilter;
use cloudpipe_runtime::{Job, JobId};
use cloudpipe_types::{JobError, JobSpec, JobStatus};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::{ApiError, AppState, read_body};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/job", post(submit_v1_jobs).get(list_v1_jobs))
        .route("/v1/job/kill", post(kill_v1_jobs))
        .route("/v1/job/kill_all", post(kill_all_v1_jobs))
        .route("/v1/job/queue_stats", get(get_v1_queue_stats))
}

// ---- wire types ----

/// `POST /v1/job`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct V1SubmitRequest {
    pub jobs: Vec<V1JobSpec>,
}

/// One v1 job. Every field of v1's protocol is accepted (`core` and `profile` mean
/// nothing here and are ignored); a field v1 did not have is refused.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct V1JobSpec {
    /// The shell command, run with `/bin/sh -c` in the v1 image.
    pub cmd: Option<String>,
    pub name: Option<String>,
    /// Standard input, base64.
    pub stdin: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    /// `{"key": "value", ...}` (v1's form) or `["word", ...]`.
    pub tags: Option<V1Tags>,
    /// Minutes (fractions allowed) before the job is killed; capped by the account's
    /// quota and the server's maximum, which also apply when it is absent.
    pub max_runtime: Option<f64>,
    /// `stdout` (the default) or `file:/absolute/path`, read when the command exits.
    pub result_source: Option<String>,
    /// `binary` (the default) or `pickle`: how the client reads `result`.
    pub result_type: Option<String>,
    /// CPUs the container may use.
    pub multicore: Option<u32>,
    /// `false`: the job is never started a second time (after a server crash).
    pub restartable: Option<bool>,
    /// v1's machine type; every job here runs on the same kind of machine.
    pub core: Option<String>,
    /// Accepted, ignored (v1 never implemented it).
    pub profile: Option<bool>,
    /// Refused unless empty: jobs here have no dependencies.
    #[schema(value_type = Option<Object>)]
    pub depends_on: Option<serde_json::Value>,
    /// Refused unless empty: there are no layers here.
    #[schema(value_type = Option<Object>)]
    pub layer: Option<serde_json::Value>,
    /// Refused unless empty: there are no volumes here.
    #[schema(value_type = Option<Object>)]
    pub vol: Option<serde_json::Value>,
}

/// v1's tags: a map, or a list of words.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum V1Tags {
    Map(BTreeMap<String, String>),
    List(Vec<String>),
}

/// The answer to `POST /v1/job`: one jid per job, in order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V1Submitted {
    pub jids: Vec<u128>,
}

/// A job as v1 showed it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V1Job {
    /// The job's id as an integer (its UUID's 128 bits).
    pub jid: u128,
    /// The same id as `/v1/jobs/{id}` takes it.
    pub id: String,
    pub name: Option<String>,
    pub cmd: String,
    /// `queued`, `processing`, `done`, `error`, `killed` or `stalled`.
    pub status: &'static str,
    pub tags: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub result_source: String,
    pub result_type: String,
    /// The timeout, in minutes.
    pub max_runtime: f64,
    pub multicore: Option<f64>,
    pub restartable: bool,
    /// UTC, `YYYY-MM-DD HH:MM:SS.ffffff` (v1's form).
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Seconds the last attempt ran.
    pub runtime: Option<f64>,
    /// Seconds from submit to the start of the last attempt.
    pub queue_delay: Option<f64>,
    /// The result, base64, once the job has ended.
    pub result: Option<String>,
    /// Standard output as text; `null` when the result came from a file (the
    /// container's own stdout is not kept then).
    pub stdout: Option<String>,
    pub stderr: String,
    /// The exit code.
    pub exit: Option<i32>,
    /// The exit code as v1 sent it (text).
    pub return_code: Option<String>,
    /// Why the job did not end `done`.
    pub error: Option<JobError>,
}

/// `GET /v1/job`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V1JobList {
    pub jobs: Vec<V1Job>,
}

/// The answer of `kill` and `kill_all`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V1Ok {
    /// `ok`.
    pub status: &'static str,
    /// Jobs this request stopped (those that had not ended yet).
    pub killed: usize,
}

/// `GET /v1/job/queue_stats`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V1QueueStats {
    /// The caller's jobs not yet ended, by v1 status: `waiting`, `queued`, `processing`.
    pub stats: BTreeMap<&'static str, u64>,
}

/// v1's error envelope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V1ErrorBody {
    pub error: V1ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct V1ErrorDetail {
    /// v1's code where it had one (`JPRS`, `JCMD`, `JRSRC`, `JRTYPE`, `JNF`,
    /// `QINVAL`, `JQUEUE`), else the code `/v1/jobs` gives (`quota_exceeded`, ...).
    pub code: String,
    pub message: String,
    pub hint: Option<String>,
    /// True when the same request may succeed later.
    pub retry: bool,
}

// ---- errors ----

/// An error answer in v1's envelope.
#[derive(Debug)]
pub struct V1Error {
    status: StatusCode,
    code: String,
    message: String,
    hint: Option<String>,
    retry: bool,
}

impl V1Error {
    fn bad(code: &str, message: impl Into<String>, hint: impl Into<String>) -> V1Error {
        V1Error {
            status: StatusCode::BAD_REQUEST,
            code: code.into(),
            message: message.into(),
            hint: Some(hint.into()),
            retry: false,
        }
    }

    fn query(message: impl Into<String>) -> V1Error {
        V1Error::bad(
            "QINVAL",
            message,
            "Parameters: jid, name, status, limit, before, after (jid, name and status may repeat).",
        )
    }

    fn job_not_found(jid: &str) -> V1Error {
        V1Error {
            status: StatusCode::NOT_FOUND,
            code: "JNF".into(),
            message: format!("Unable to find a job with ID [{jid}]."),
            hint: Some("Make sure that the JID is still valid.".into()),
            retry: false,
        }
    }

    /// The same error about the `i`th job of a submit.
    fn in_job(mut self, i: usize) -> V1Error {
        self.message = format!("job {i}: {}", self.message);
        self
    }
}

impl From<ApiError> for V1Error {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        let (status, code, hint, retry) = match &e {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "JNF", None, false),
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, *code, None, false),
            ApiError::TooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None, false)
            }
            ApiError::Unauthorized(code, _) => (StatusCode::UNAUTHORIZED, *code, None, false),
            ApiError::Forbidden(code, _) => (StatusCode::FORBIDDEN, *code, None, false),
            ApiError::Conflict(code, _) => (StatusCode::CONFLICT, *code, None, false),
            ApiError::QuotaExceeded(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                Some("Wait for some of your jobs to end, then submit again."),
                true,
            ),
            ApiError::QuotaExceededOf(code, _) => {
                (StatusCode::TOO_MANY_REQUESTS, *code, None, false)
            }
            ApiError::TooManyAuthFailures(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_auth_failures", None, true)
            }
            ApiError::AuthUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable", None, true)
            }
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "JQUEUE",
                Some("Unable to enqueue your job now; try again shortly."),
                true,
            ),
            ApiError::Internal(err) => {
                tracing::error!(error = format!("{err:#}"), "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", None, true)
            }
            ApiError::RequestTimeout(_) => {
                (StatusCode::REQUEST_TIMEOUT, "body_timeout", None, true)
            }
            ApiError::FunctionFailed(_) | ApiError::Timeout(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", None, false)
            }
        };
        V1Error { status, code: code.into(), message, hint: hint.map(Into::into), retry }
    }
}

impl From<anyhow::Error> for V1Error {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e).into()
    }
}

impl IntoResponse for V1Error {
    fn into_response(self) -> Response {
        let (status, retry) = (self.status, self.retry);
        let body = V1ErrorBody {
            error: V1ErrorDetail {
                code: self.code,
                message: self.message,
                hint: self.hint,
                retry: self.retry,
            },
        };
        let mut res = (status, Json(body)).into_response();
        if retry && (status == StatusCode::SERVICE_UNAVAILABLE) {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

// ---- mapping ----

/// v1's name of a status.
pub fn v1_status(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Queued => "queued",
        JobStatus::Running => "processing",
        JobStatus::Succeeded => "done",
        JobStatus::Failed => "error",
        JobStatus::TimedOut => "stalled",
        JobStatus::Cancelled => "killed",
    }
}

/// The status a v1 name stands for: `Some(None)` for `waiting`, which no job is in;
/// `None` for a name v1 did not have.
fn status_of_v1(name: &str) -> Option<Option<JobStatus>> {
    match name {
        "waiting" => Some(None),
        _ => JobStatus::ALL.into_iter().find(|s| v1_status(*s) == name).map(Some),
    }
}

/// The jid of a job id: its 128 bits as an integer.
pub fn jid_of(id: JobId) -> u128 {
    u128::from_be_bytes(id.to_bytes())
}

/// A jid as a client sends it: the integer, or the id's usual form.
fn parse_jid(s: &str) -> Option<JobId> {
    let s = s.trim();
    match s.parse::<u128>() {
        Ok(n) => Some(JobId::from_bytes(n.to_be_bytes())),
        Err(_) => s.parse().ok(),
    }
}

/// Every value of a parameter that may repeat and may hold a comma-separated list.
fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// A stored tag as a v1 tag: `key=value`, or a plain word with an empty value.
fn tag_pair(tag: &str) -> (&str, &str) {
    tag.split_once('=').unwrap_or((tag, ""))
}

fn tag_value<'a>(job: &'a Job, key: &str) -> Option<&'a str> {
    job.tags.iter().map(|t| tag_pair(t)).find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// `YYYY-MM-DD HH:MM:SS.ffffff` in UTC, the form v1 clients parse.
fn v1_time(t: u64) -> String {
    let whole = cloudpipe_runtime::model::rfc3339(t - t % 1_000_000);
    match (whole.get(..10), whole.get(11..19)) {
        (Some(date), Some(time)) => format!("{date} {time}.{:06}", t % 1_000_000),
        _ => whole,
    }
}

/// The command line of a job: v1's `cmd` for a v1 job, the argv joined otherwise.
fn cmd_of(job: &Job) -> String {
    match &job.container {
        Some(c) => match c.command.as_slice() {
            [sh, dash_c, cmd] if sh == "/bin/sh" && dash_c == "-c" && job.args.is_empty() => {
                cmd.clone()
            }
            argv => argv.iter().chain(&job.args).cloned().collect::<Vec<_>>().join(" "),
        },
        None => {
            std::iter::once(&job.function).chain(&job.args).cloned().collect::<Vec<_>>().join(" ")
        }
    }
}

/// A job as v1 showed it.
pub fn view(job: &Job) -> V1Job {
    let secs = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
    let result_file = job.container.as_ref().and_then(|c| c.result_file.as_deref());
    let ended = job.status.is_terminal();
    V1Job {
        jid: jid_of(job.id),
        id: job.id.to_string(),
        name: tag_value(job, "name").map(str::to_string),
        cmd: cmd_of(job),
        status: v1_status(job.status),
        tags: job.tags.iter().map(|t| tag_pair(t)).map(|(k, v)| (k.into(), v.into())).collect(),
        // v1 knew only text values; secret references are left out.
        env: job
            .env
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_text()?.to_string())))
            .collect(),
        result_source: match result_file {
            Some(p) => format!("file:{p}"),
            None => "stdout".into(),
        },
        result_type: tag_value(job, "result_type").unwrap_or("binary").to_string(),
        max_runtime: job.timeout_ms as f64 / 60_000.0,
        multicore: job.container.as_ref().and_then(|c| c.nano_cpus).map(|n| n as f64 / 1e9),
        restartable: job.max_attempts > 1,
        created_at: v1_time(job.created_at),
        started_at: job.started_at.map(v1_time),
        finished_at: job.finished_at.map(v1_time),
        runtime: job.started_at.zip(job.finished_at).map(|(s, f)| secs(s, f)),
        queue_delay: job.started_at.map(|s| secs(job.created_at, s)),
        result: ended.then(|| BASE64.encode(&job.stdout)),
        stdout: match result_file {
            Some(_) => None,
            None => Some(String::from_utf8_lossy(&job.stdout).into_owned()),
        },
        stderr: String::from_utf8_lossy(&job.stderr).into_owned(),
        exit: job.exit_code,
        return_code: job.exit_code.map(|c| c.to_string()),
        error: job.error.clone(),
    }
}

/// The native spec of one v1 job, checked. `max_timeout_ms` is the longest timeout
/// the caller may have.
fn spec_of(j: V1JobSpec, image: &str, max_timeout_ms: u64) -> Result<JobSpec, V1Error> {
    let invalid = |m: String, hint: &str| Err(V1Error::bad("JINVAL", m, hint));
    let cmd = j.cmd.filter(|c| !c.trim().is_empty()).ok_or_else(|| {
        V1Error::bad(
            "JCMD",
            "All jobs must specify a command to execute.",
            r#"Specify a command to execute as a "cmd" element in your job."#,
        )
    })?;
    if cmd.contains('\0') {
        return invalid("`cmd` contains NUL".into(), "Send the command as text.");
    }
    let result_file = match j.result_source.as_deref() {
        None | Some("stdout") => None,
        Some(s) => match s.strip_prefix("file:") {
            Some(p) if p.starts_with('/') && !p.contains('\0') => Some(s.to_string()),
            _ => {
                return Err(V1Error::bad(
                    "JRSRC",
                    format!("Invalid result source [{s}]"),
                    r#"The "result_source" must be either "stdout" or "file:{path}" with an absolute path."#,
                ));
            }
        },
    };
    let result_type = match j.result_type.as_deref() {
        None | Some("binary") => None,
        Some("pickle") => Some("pickle"),
        Some(t) => {
            return Err(V1Error::bad(
                "JRTYPE",
                format!("Invalid result type [{t}]"),
                r#"The "result_type" must be one of the following: binary, pickle"#,
            ));
        }
    };
    let unsupported = |what: &str, v: &Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::Array(a)) if a.is_empty() => Ok(()),
        Some(serde_json::Value::String(s)) if s.is_empty() => Ok(()),
        Some(_) => Err(V1Error::bad(
            "JINVAL",
            format!("`{what}` is not supported by this server"),
            "Put what the job needs into the v1 image, or pass it on stdin.",
        )),
    };
    unsupported("depends_on", &j.depends_on)?;
    unsupported("layer", &j.layer)?;
    unsupported("vol", &j.vol)?;

    let mut tags: Vec<(String, Option<String>)> = match j.tags {
        None => Vec::new(),
        Some(V1Tags::Map(m)) => m.into_iter().map(|(k, v)| (k, Some(v))).collect(),
        Some(V1Tags::List(l)) => l.into_iter().map(|k| (k, None)).collect(),
    };
    for (k, v) in [("name", j.name), ("result_type", result_type.map(str::to_string))] {
        if let Some(v) = v {
            tags.retain(|(key, _)| key != k);
            tags.push((k.to_string(), Some(v)));
        }
    }
    if tags.iter().any(|(k, _)| k.is_empty() || k.contains('=')) {
        return invalid(
            "tag keys must be non-empty and may not contain '='".into(),
            r#"Send tags as {"key": "value"}."#,
        );
    }
    let tags: Vec<String> = tags
        .into_iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k,
        })
        .collect();
    if tags.len() > 32 || tags.iter().any(|t| t.len() > 128) {
        return invalid(
            "at most 32 tags (the name counts as one), each key=value at most 128 bytes".into(),
            "Shorten the name or the tags.",
        );
    }
    let env = j.env.unwrap_or_default();
    if let Some(k) = env.keys().find(|k| k.is_empty() || k.contains(['=', '\0'])) {
        return invalid(
            format!("environment variable {k:?} is not valid"),
            "Names are non-empty, without '=' or NUL.",
        );
    }
    if env.values().any(|v| v.contains('\0')) {
        return invalid("environment values may not contain NUL".into(), "Remove the NUL.");
    }
    if let Some(s) = &j.stdin
        && BASE64.decode(s.as_bytes()).is_err()
    {
        return invalid("`stdin` is not valid base64".into(), "Encode stdin with base64.");
    }
    let timeout_ms = match j.max_runtime {
        None => max_timeout_ms,
        Some(m) if m.is_finite() && m > 0.0 => {
            ((m * 60_000.0).round() as u64).clamp(1, max_timeout_ms)
        }
        Some(m) => {
            return invalid(
                format!("`max_runtime` {m} must be a positive number of minutes"),
                "Give the longest the job may run, in minutes (e.g. 0.5).",
            );
        }
    };
    let cpus = match j.multicore {
        None => None,
        Some(0) => {
            return invalid("`multicore` must be at least 1".into(), "Give a number of cores.");
        }
        Some(n) => Some(f64::from(n)),
    };
    Ok(JobSpec {
        executor: Some("docker".into()),
        image: Some(image.to_string()),
        command: vec!["/bin/sh".into(), "-c".into(), cmd],
        cpus,
        result_source: result_file,
        env: env.into_iter().map(|(k, v)| (k, v.into())).collect(),
        stdin_base64: j.stdin.filter(|s| !s.is_empty()),
        timeout_ms: Some(timeout_ms),
        tags,
        max_attempts: (j.restartable == Some(false)).then_some(1),
        ..JobSpec::default()
    })
}

// ---- handlers ----

/// Submits v1 jobs. All or none: the jobs are checked before any is submitted, and a
/// submit refused part-way (a quota, the engine unavailable) kills the jobs this
/// request had submitted.
#[utoipa::path(post, path = "/v1/job", tag = "v1", request_body = V1SubmitRequest,
    responses((status = 200, body = V1Submitted), (status = 400, body = V1ErrorBody),
              (status = 429, body = V1ErrorBody), (status = 503, body = V1ErrorBody)))]
pub async fn submit_v1_jobs(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Json<V1Submitted>, V1Error> {
    let bytes = read_body(body, state.config.max_json_body).await?;
    let req: V1SubmitRequest = serde_json::from_slice(&bytes).map_err(|e| {
        V1Error::bad(
            "JPRS",
            format!("Unable to parse job payload as JSON: {e}"),
            r#"Please supply valid JSON in your request: {"jobs": [{"cmd": "..."}]}."#,
        )
    })?;
    let scheduler = &state.runtime.scheduler;
    let server_max = scheduler.config().max_timeout.as_millis() as u64;
    let max_timeout = caller.limits.max_timeout_ms.map_or(server_max, |q| q.min(server_max));
    let specs = req
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, j)| spec_of(j, &state.config.v1_image, max_timeout).map_err(|e| e.in_job(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let tenant = caller.tenant();
    let mut ids = Vec::with_capacity(specs.len());
    for (i, spec) in specs.into_iter().enumerate() {
        match scheduler.submit(spec, &tenant).await {
            Ok(inserted) => ids.push(inserted.job().id),
            Err(e) => {
                futures::future::join_all(ids.iter().map(|id| scheduler.cancel(*id))).await;
                return Err(V1Error::from(ApiError::from(e)).in_job(i));
            }
        }
    }
    Ok(Json(V1Submitted { jids: ids.into_iter().map(jid_of).collect() }))
}

/// What `GET /v1/job` asked for.
struct ListQuery {
    jids: Option<Vec<JobId>>,
    names: BTreeSet<String>,
    /// `None`: any status.
    statuses: Option<BTreeSet<JobStatus>>,
    limit: usize,
    before: Option<JobId>,
    after: Option<JobId>,
}

impl ListQuery {
    fn parse(query: Option<&str>) -> Result<ListQuery, V1Error> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| V1Error::query(format!("Unable to parse query parameters: {e}")))?;
        let mut q = ListQuery {
            jids: None,
            names: BTreeSet::new(),
            statuses: None,
            limit: 100,
            before: None,
            after: None,
        };
        let jid = |s: &str| {
            parse_jid(s).ok_or_else(|| V1Error::query(format!("Unable to parse JID [{s}]")))
        };
        for (k, v) in &pairs {
            match k.as_str() {
                "jid" => {
                    let jids = q.jids.get_or_insert_with(Vec::new);
                    for part in split_list(v) {
                        jids.push(jid(part)?);
                    }
                }
                "name" => {
                    q.names.insert(v.clone());
                }
                "status" => {
                    let set = q.statuses.get_or_insert_with(BTreeSet::new);
                    for part in split_list(v) {
                        match status_of_v1(part) {
                            Some(st) => set.extend(st),
                            None => {
                                return Err(V1Error::query(format!(
                                    "Unknown status [{part}]: use waiting, queued, processing, done, error, killed or stalled"
                                )));
                            }
                        }
                    }
                }
                "limit" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| V1Error::query(format!("Unable to parse limit [{v}]")))?;
                    if n < 1 {
                        return Err(V1Error::query(format!(
                            "Invalid negative or zero limit [{n}]"
                        )));
                    }
                    q.limit = n.min(1000) as usize;
                }
                "before" => q.before = Some(jid(v)?),
                "after" => q.after = Some(jid(v)?),
                // v1 clients name the fields they want; every job carries them all.
                "field" => {}
                other => return Err(V1Error::query(format!("Unknown parameter [{other}]"))),
            }
        }
        Ok(q)
    }

    fn matches(&self, caller: &Caller, job: &Job) -> bool {
        caller.sees(&job.account)
            && (self.names.is_empty()
                || tag_value(job, "name").is_some_and(|n| self.names.contains(n)))
            && self.statuses.as_ref().is_none_or(|s| s.contains(&job.status))
            && self.before.is_none_or(|b| job.id < b)
            && self.after.is_none_or(|a| job.id > a)
    }
}

/// Lists jobs, newest first: the caller's (the admin: everyone's), those named by
/// `jid` (one, a comma-separated list, or the parameter repeated) if given, filtered by
/// `name`, `status` (v1's names), `before` and `after` (jids); `limit` 1–1000,
/// default 100. A jid of a job the caller may not see is left out, like a jid that
/// does not exist.
#[utoipa::path(get, path = "/v1/job", tag = "v1",
    params(("jid" = Option<String>, Query, description = "jid(s): repeat or separate with commas"),
           ("name" = Option<String>, Query), ("status" = Option<String>, Query, description = "v1 status name(s)"),
           ("limit" = Option<u32>, Query), ("before" = Option<String>, Query), ("after" = Option<String>, Query)),
    responses((status = 200, body = V1JobList), (status = 400, body = V1ErrorBody)))]
pub async fn list_v1_jobs(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<V1JobList>, V1Error> {
    let q = ListQuery::parse(query.as_deref())?;
    let mut jobs = Vec::new();
    if q.statuses.as_ref().is_some_and(BTreeSet::is_empty) {
        // Only `waiting` asked for: no job is ever in it.
    } else if let Some(jids) = &q.jids {
        let unique: BTreeSet<JobId> = jids.iter().copied().collect();
        for id in unique.into_iter().rev() {
            if let Some(job) = state.runtime.scheduler.get(id).await?
                && q.matches(&caller, &job)
            {
                jobs.push(job);
                if jobs.len() == q.limit {
                    break;
                }
            }
        }
    } else {
        // Pages of the store, newest first, narrowed there by what the store can
        // filter on and here by the rest.
        let page = q.limit.max(100);
        let single = |set: Option<&BTreeSet<JobStatus>>| match set {
            Some(s) if s.len() == 1 => s.first().copied(),
            _ => None,
        };
        let mut filter = JobFilter {
            account: (!caller.is_admin()).then(|| caller.account.clone()),
            status: single(q.statuses.as_ref()),
            tag: match q.names.len() {
                1 => q.names.first().map(|n| format!("name={n}")),
                _ => None,
            },
            before: q.before,
            limit: page,
            ..JobFilter::default()
        };
        'pages: loop {
            let batch = state.runtime.store.list_jobs(&filter).await?;
            let full = batch.len() == page;
            for job in batch {
                filter.before = Some(job.id);
                if q.after.is_some_and(|a| job.id <= a) {
                    break 'pages;
                }
                if q.matches(&caller, &job) {
                    jobs.push(job);
                    if jobs.len() == q.limit {
                        break 'pages;
                    }
                }
            }
            if !full {
                break;
            }
        }
        // Lists give summaries; v1 answered each job with its result.
        for job in &mut jobs {
            if let Some(full) = state.runtime.scheduler.get(job.id).await? {
                *job = full;
            }
        }
    }
    Ok(Json(V1JobList { jobs: jobs.iter().map(view).collect() }))
}

/// The jids of a form body: `jid` (repeated, or a comma-separated list); `sudo`, v1's
/// admin switch, is accepted and means nothing: only the admin reaches other
/// accounts' jobs, always.
fn form_jids(bytes: &[u8]) -> Result<Vec<(String, JobId)>, V1Error> {
    let hint = "Send the form field jid=JID (repeat it for more jobs).";
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(bytes).map_err(|e| {
        V1Error::bad("JINVAL", format!("Unable to parse the kill payload as a form: {e}"), hint)
    })?;
    let mut jids = Vec::new();
    for (k, v) in &pairs {
        match k.as_str() {
            "jid" => {
                for part in split_list(v) {
                    let id = parse_jid(part).ok_or_else(|| {
                        V1Error::bad("JINVAL", format!("Unable to parse JID [{part}]"), hint)
                    })?;
                    jids.push((part.to_string(), id));
                }
            }
            "sudo" => {}
            other => {
                return Err(V1Error::bad("JINVAL", format!("Unknown form field [{other}]"), hint));
            }
        }
    }
    if jids.is_empty() {
        return Err(V1Error::bad("JINVAL", "No job to kill: the form has no jid.", hint));
    }
    Ok(jids)
}

/// Stops `jobs`, a few at a time: the queued ones first, so that a slot freed by a
/// running one does not start one of them. Returns how many this call stopped.
async fn kill_jobs(state: &AppState, jobs: Vec<Job>) -> Result<usize, V1Error> {
    let scheduler = &state.runtime.scheduler;
    let (queued, running): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|j| j.status == JobStatus::Queued);
    let mut killed = 0;
    for batch in [queued, running] {
        let results: Vec<_> = futures::stream::iter(batch)
            .map(|j| scheduler.cancel(j.id))
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            if r?.is_some_and(|j| j.status == JobStatus::Cancelled) {
                killed += 1;
            }
        }
    }
    Ok(killed)
}

/// Kills jobs by jid (form field `jid`, repeated or comma-separated): a queued job
/// never runs, a running one is stopped, an ended one stays as it is. A jid the caller
/// may not see is 404 `JNF`, like one that does not exist, and then nothing is killed.
#[utoipa::path(post, path = "/v1/job/kill", tag = "v1",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "jid=JID[&jid=JID...]"),
    responses((status = 200, body = V1Ok), (status = 400, body = V1ErrorBody), (status = 404, body = V1ErrorBody)))]
pub async fn kill_v1_jobs(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Json<V1Ok>, V1Error> {
    let bytes = read_body(body, state.config.max_json_body).await?;
    let mut jobs = BTreeMap::new();
    for (text, id) in form_jids(&bytes)? {
        let job = state.runtime.scheduler.get(id).await?;
        match job.filter(|j| caller.sees(&j.account)) {
            Some(j) if !j.status.is_terminal() => {
                jobs.insert(id, j);
            }
            Some(_) => {}
            None => return Err(V1Error::job_not_found(&text)),
        }
    }
    let killed = kill_jobs(&state, jobs.into_values().collect()).await?;
    Ok(Json(V1Ok { status: "ok", killed }))
}

/// The caller's own jobs that have not ended, newest first. The scan stops once it
/// has found as many as the scheduler counts for the account.
async fn unfinished_jobs(state: &AppState, account: &str) -> Result<Vec<Job>, V1Error> {
    let expected = state.runtime.scheduler.active_jobs(account).await? as usize;
    let mut found = Vec::new();
    if expected == 0 {
        return Ok(found);
    }
    const PAGE: usize = 500;
    let mut filter =
        JobFilter { account: Some(account.to_string()), limit: PAGE, ..JobFilter::default() };
    loop {
        let batch = state.runtime.store.list_jobs(&filter).await?;
        let full = batch.len() == PAGE;
        filter.before = batch.last().map(|j| j.id);
        found.extend(batch.into_iter().filter(|j| !j.status.is_terminal()));
        if !full || found.len() >= expected {
            return Ok(found);
        }
    }
}

/// Kills every job of the caller's own account that has not ended (the admin's too:
/// other accounts' jobs are killed by jid).
#[utoipa::path(post, path = "/v1/job/kill_all", tag = "v1",
    responses((status = 200, body = V1Ok)))]
pub async fn kill_all_v1_jobs(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<V1Ok>, V1Error> {
    let jobs = unfinished_jobs(&state, &caller.account).await?;
    let killed = kill_jobs(&state, jobs).await?;
    Ok(Json(V1Ok { status: "ok", killed }))
}

/// How many of the caller's own jobs wait and run: `waiting` (always 0 here),
/// `queued`, `processing`.
#[utoipa::path(get, path = "/v1/job/queue_stats", tag = "v1",
    responses((status = 200, body = V1QueueStats)))]
pub async fn get_v1_queue_stats(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<V1QueueStats>, V1Error> {
    let mut stats = BTreeMap::from([("waiting", 0), ("queued", 0), ("processing", 0)]);
    for job in unfinished_jobs(&state, &caller.account).await? {
        *stats.entry(v1_status(job.status)).or_default() += 1;
    }
    Ok(Json(V1QueueStats { stats }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_a_v1_name_that_maps_back() {
        for st in JobStatus::ALL {
            assert_eq!(status_of_v1(v1_status(st)), Some(Some(st)));
        }
        assert_eq!(status_of_v1("waiting"), Some(None));
        assert_eq!(status_of_v1("running"), None);
    }

    #[test]
    fn jids_are_the_ids_bits_and_keep_their_order() {
        let (a, b) = (JobId::new(), JobId::new());
        assert!(jid_of(a) < jid_of(b));
        assert_eq!(parse_jid(&jid_of(a).to_string()), Some(a));
        assert_eq!(parse_jid(&a.to_string()), Some(a));
        assert_eq!(parse_jid("12x"), None);
    }

    #[test]
    fn times_are_in_v1s_form() {
        // 2021-01-02 03:04:05.000678 UTC
        assert_eq!(v1_time(1_609_556_645_000_678), "2021-01-02 03:04:05.000678");
    }

    #[test]
    fn a_v1_job_becomes_a_docker_job_with_its_limits_and_tags() {
        let j = V1JobSpec {
            cmd: Some("cat".into()),
            name: Some("n".into()),
            tags: Some(V1Tags::Map(BTreeMap::from([("k".into(), "v".into())]))),
            max_runtime: Some(1000.0),
            result_type: Some("pickle".into()),
            restartable: Some(false),
            ..V1JobSpec::default()
        };
        let spec = spec_of(j, "img", 5000).unwrap();
        assert_eq!(spec.command, ["/bin/sh", "-c", "cat"]);
        assert_eq!(spec.image.as_deref(), Some("img"));
        assert_eq!(spec.timeout_ms, Some(5000), "capped");
        assert_eq!(spec.max_attempts, Some(1));
        assert_eq!(spec.tags, ["k=v", "name=n", "result_type=pickle"]);
        let bad = |j: V1JobSpec| spec_of(j, "img", 5000).unwrap_err().code;
        let cmd = || Some("true".to_string());
        assert_eq!(bad(V1JobSpec::default()), "JCMD");
        assert_eq!(
            bad(V1JobSpec { cmd: cmd(), result_source: Some("x".into()), ..Default::default() }),
            "JRSRC"
        );
        assert_eq!(
            bad(V1JobSpec { cmd: cmd(), result_type: Some("json".into()), ..Default::default() }),
            "JRTYPE"
        );
        assert_eq!(
            bad(V1JobSpec { cmd: cmd(), max_runtime: Some(0.0), ..Default::default() }),
            "JINVAL"
        );
        assert_eq!(
            bad(V1JobSpec { cmd: cmd(), stdin: Some("!!".into()), ..Default::default() }),
            "JINVAL"
        );
        let vol = Some(serde_json::json!([{"name": "v"}]));
        assert_eq!(bad(V1JobSpec { cmd: cmd(), vol, ..Default::default() }), "JINVAL");
    }
}
