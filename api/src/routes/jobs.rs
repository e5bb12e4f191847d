//! `/v1/jobs`: submit, read, wait for, follow and cancel jobs.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cloudpipe_runtime::executor::OutputStream;
use cloudpipe_runtime::scheduler::LiveEvent;
use cloudpipe_runtime::store::{Inserted, JobFilter};
use cloudpipe_runtime::{Job, JobId};
use cloudpipe_types::{JobEvent, JobList, JobRecord, JobSpec, JobStatus};
use futures::Stream;
use serde::Deserialize;
use tracing::Instrument;

use crate::auth::Caller;
use crate::extract::{Json, Path, Query};
use crate::{ApiError, AppState, parse_wait};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", post(create_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/result", get(get_job_result))
        .route("/v1/jobs/{id}/stdout", get(get_job_stdout))
        .route("/v1/jobs/{id}/stderr", get(get_job_stderr))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WaitParams {
    /// Block until the job ends or this long passes (`30s`, `500ms`, `2m`).
    wait: Option<String>,
}

fn job_id(s: &str) -> Result<JobId, ApiError> {
    s.parse().map_err(|_| ApiError::NotFound(format!("job {s:?} not found")))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("job {id:?} not found"))
}

/// The job, if the caller may see it: another account's job is "not found", exactly
/// like a job that does not exist.
async fn load(state: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    let job = state.runtime.scheduler.get(job_id(id)?).await?;
    job.filter(|j| caller.sees(&j.account)).ok_or_else(|| not_found(id))
}

fn wait_of(state: &AppState, p: &WaitParams) -> Result<Duration, ApiError> {
    Ok(match &p.wait {
        Some(w) => parse_wait(w)?.min(state.config.max_wait),
        None => Duration::ZERO,
    })
}

/// Submits a job. With `?wait=` the answer comes when the job ends (or the wait runs
/// out). 201 for a new job, 200 when the idempotency key named an existing one.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", params(WaitParams), request_body = JobSpec,
    responses((status = 201, body = JobRecord), (status = 200, body = JobRecord, description = "existing job (same idempotency key)"),
              (status = 400, body = cloudpipe_types::ErrorBody), (status = 404, body = cloudpipe_types::ErrorBody),
              (status = 413, body = cloudpipe_types::ErrorBody), (status = 429, body = cloudpipe_types::ErrorBody)))]
pub async fn create_job(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<WaitParams>,
    Json(spec): Json<JobSpec>,
) -> Result<Response, ApiError> {
    // The spans break a submit down (`RUST_LOG=cloudpipe_api=debug,cloudpipe_runtime=debug`
    // logs each one's time as it closes): api.auth, runtime.submit (its
    // runtime.prepare, store.insert_job, runtime.execute) and api.serialise; reading
    // and parsing the body happen in the `Json` extractor, before the handler.
    let wait = wait_of(&state, &params)?;
    let tenant = caller.tenant();
    let submitted = state
        .runtime
        .scheduler
        .submit_and_wait(spec, &tenant, wait)
        .instrument(tracing::debug_span!("runtime.submit"))
        .await?;
    let (job, code) = match submitted {
        Inserted::Created(job) => (job, StatusCode::CREATED),
        Inserted::Existing(job) => (job, StatusCode::OK),
    };
    let body = tracing::debug_span!("api.serialise")
        .in_scope(|| serde_json::to_vec(&job.to_record()))
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok((code, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only jobs in this status.
    status: Option<String>,
    /// Only jobs carrying this tag.
    tag: Option<String>,
    /// Only jobs of this function (name as submitted, or `sha256:` id).
    function: Option<String>,
    /// At most this many (1–1000, default 100).
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Only jobs of this account (the admin; others see only their own).
    account: Option<String>,
    /// Only jobs of this batch.
    batch: Option<String>,
    /// Only jobs that run or last ran on this cluster node.
    node: Option<String>,
    /// `output`: each job with its stdout and stderr. Without it, jobs come without
    /// output (read it through `/v1/jobs/{id}`, `/stdout` or `/stderr`). A page with
    /// output ends early, with a `next_cursor`, once it holds 16 MiB of output.
    include: Option<String>,
}

/// How much output one page of `GET /v1/jobs?include=output` carries: the page ends
/// after the job whose output reaches it.
pub const LIST_OUTPUT_CAP: usize = 16 << 20;

/// Lists the caller's jobs (the admin: everyone's, or one account's), newest first,
/// without their output (`stdout` and `stderr` empty) unless `include=output`.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListParams),
    responses((status = 200, body = JobList), (status = 400, body = cloudpipe_types::ErrorBody)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Json<JobList>, ApiError> {
    let status = match &p.status {
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::bad("invalid_query", format!("unknown status {s:?}: use queued, running, succeeded, failed, timed_out or cancelled"))
        })?),
        None => None,
    };
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad("invalid_query", "`limit` must be between 1 and 1000"));
    }
    let before = match &p.cursor {
        Some(c) => Some(
            c.parse::<JobId>()
                .map_err(|_| ApiError::bad("invalid_query", format!("bad cursor {c:?}")))?,
        ),
        None => None,
    };
    let with_output = match p.include.as_deref() {
        None | Some("") => false,
        Some("output") => true,
        Some(other) => {
            return Err(ApiError::bad(
                "invalid_query",
                format!("unknown include {other:?}: the one choice is `output`"),
            ));
        }
    };
    let account = match caller.is_admin() {
        true => p.account,
        false => Some(caller.account.clone()),
    };
    let filter = JobFilter {
        account,
        batch: p.batch,
        status,
        tag: p.tag,
        function: p.function,
        node: p.node,
        before,
        limit: limit + 1,
    };
    let mut jobs = state.runtime.store.list_jobs(&filter).await?;
    let mut next_cursor = if jobs.len() > limit {
        jobs.truncate(limit);
        jobs.last().map(|j| j.id.to_string())
    } else {
        None
    };
    if with_output {
        // One job's output at a time, so that the page never holds more than the cap
        // and one job's output.
        let mut bytes = 0;
        for i in 0..jobs.len() {
            if bytes >= LIST_OUTPUT_CAP {
                jobs.truncate(i);
                next_cursor = jobs.last().map(|j| j.id.to_string());
                break;
            }
            if let Some(full) = state.runtime.store.get_job(jobs[i].id).await? {
                bytes += full.stdout.len() + full.stderr.len();
                jobs[i] = full;
            }
        }
    }
    Ok(Json(JobList { jobs: jobs.iter().map(Job::to_record).collect(), next_cursor }))
}

/// A job's record.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = JobRecord), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    Ok(Json(load(&state, &caller, &id).await?.to_record()))
}

/// Long-polls a job: 200 with the record once it has ended, 202 with the record if the
/// wait (default 30s) ran out first.
#[utoipa::path(get, path = "/v1/jobs/{id}/result", tag = "jobs", params(("id" = String, Path), WaitParams),
    responses((status = 200, body = JobRecord), (status = 202, body = JobRecord, description = "not finished yet"),
              (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_job_result(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(mut params): Query<WaitParams>,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    params.wait.get_or_insert_with(|| "30s".into());
    let wait = wait_of(&state, &params)?;
    let job = load(&state, &caller, &id).await?;
    let job =
        state.runtime.scheduler.wait_shared(job.id, wait).await?.ok_or_else(|| not_found(&id))?;
    let code = if job.status.is_terminal() { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((code, Json(job.to_record())))
}

fn raw(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

/// A job's standard output as raw bytes.
#[utoipa::path(get, path = "/v1/jobs/{id}/stdout", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_job_stdout(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(raw(load(&state, &caller, &id).await?.stdout))
}

/// A job's standard error as raw bytes.
#[utoipa::path(get, path = "/v1/jobs/{id}/stderr", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_job_stderr(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(raw(load(&state, &caller, &id).await?.stderr))
}

/// Cancels a job: a queued job at once, a running one within one epoch tick. A job
/// that already ended is returned unchanged.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = JobRecord), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    let job = load(&state, &caller, &id).await?;
    let job = state.runtime.scheduler.cancel(job.id).await?.ok_or_else(|| not_found(&id))?;
    Ok(Json(job.to_record()))
}

/// How following a job on another node ended.
enum Relayed {
    /// The job's terminal status was passed on, or the client left.
    Done,
    /// The other node could not be followed (gone, or cut off mid-stream).
    Lost,
}

/// In a cluster: waits while the job is queued, then follows it on the node that runs
/// it, if that is another node. `Lost` when it runs here or its node cannot be
/// followed.
async fn follow_elsewhere(
    state: &AppState,
    mut job: Job,
    auth: Option<axum::http::HeaderValue>,
    tx: &tokio::sync::mpsc::Sender<Event>,
) -> Relayed {
    let Some(cluster) = &state.runtime.cluster else { return Relayed::Lost };
    let stopping = state.runtime.scheduler.stopping().clone();
    let mut said_running = job.status == JobStatus::Running;
    loop {
        match job.status {
            JobStatus::Queued => {
                tokio::select! {
                    _ = tx.closed() => return Relayed::Done,
                    _ = stopping.cancelled() => return Relayed::Lost,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                match state.runtime.scheduler.get(job.id).await {
                    Ok(Some(j)) => job = j,
                    _ => return Relayed::Lost,
                }
            }
            JobStatus::Running => {
                let node = match &job.node {
                    Some(node) if node != cluster.node() => node.clone(),
                    _ => return Relayed::Lost,
                };
                if !std::mem::replace(&mut said_running, true) {
                    let ev = sse(&JobEvent::Status { status: JobStatus::Running, record: None });
                    if tx.send(ev).await.is_err() {
                        return Relayed::Done;
                    }
                }
                return relay_events(state, &node, &job.id.to_string(), auth, tx).await;
            }
            _ => {
                let _ = tx.send(status_event(&job)).await;
                return Relayed::Done;
            }
        }
    }
}

/// Passes on the live events of a job from the node running it (its own
/// `/v1/jobs/{id}/events`, asked with the caller's credentials), after the first
/// status event, which the caller already has.
async fn relay_events(
    state: &AppState,
    node: &str,
    id: &str,
    auth: Option<axum::http::HeaderValue>,
    tx: &tokio::sync::mpsc::Sender<Event>,
) -> Relayed {
    use futures::StreamExt;
    let Some(cluster) = &state.runtime.cluster else { return Relayed::Lost };
    let url = match cluster.nodes().await {
        Ok(nodes) => {
            nodes.into_iter().find(|n| n.name == node && !n.stale).and_then(|n| n.advertise_url)
        }
        Err(_) => None,
    };
    let Some(url) = url else { return Relayed::Lost };
    let mut req = state.relay.get(format!("{}/v1/jobs/{id}/events", url.trim_end_matches('/')));
    if let Some(auth) = auth {
        req = req.header(header::AUTHORIZATION, auth);
    }
    let res = match req.send().await {
        Ok(r) if r.status().is_success() => r,
        _ => return Relayed::Lost,
    };
    let mut body = res.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen_first = false;
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            _ = tx.closed() => return Relayed::Done,
        };
        let Some(Ok(chunk)) = chunk else { return Relayed::Lost };
        buf.extend_from_slice(&chunk);
        // One event ends at a blank line.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut name = "message";
            let mut data: Vec<&str> = Vec::new();
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim_start();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            let data = data.join("\n");
            if !std::mem::replace(&mut seen_first, true) {
                continue;
            }
            let terminal = name == "status"
                && serde_json::from_str::<JobEvent>(&data).is_ok_and(
                    |ev| matches!(ev, JobEvent::Status { status, .. } if status.is_terminal()),
                );
            let name = name.to_string();
            if tx.send(Event::default().event(name).data(data)).await.is_err() || terminal {
                return Relayed::Done;
            }
        }
    }
}

fn sse(ev: &JobEvent) -> Event {
    let name = match ev {
        JobEvent::Status { .. } => "status",
        JobEvent::Stdout { .. } => "stdout",
        JobEvent::Stderr { .. } => "stderr",
    };
    Event::default().event(name).json_data(ev).unwrap_or_else(|_| Event::default().event(name))
}

fn status_event(job: &Job) -> Event {
    let record = job.status.is_terminal().then(|| Box::new(job.to_record()));
    sse(&JobEvent::Status { status: job.status, record })
}

/// Server-sent events: the current status, then live stdout/stderr chunks and status
/// changes; the stream ends after the terminal status (which carries the record).
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = JobEvent), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn job_events(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let jid = job_id(&id)?;
    let scheduler = state.runtime.scheduler.clone();
    // Subscribe first so nothing between the read and the subscription is missed.
    let (mut sub, replay) = scheduler.hub().subscribe_with_replay(jid);
    let job = load(&state, &caller, &id).await?;
    // A job running on another node of a cluster: its output is there.
    // In a cluster the job may run on another node: its output is there.
    let remote = state
        .runtime
        .cluster
        .as_ref()
        .map(|_| (state.clone(), headers.get(header::AUTHORIZATION).cloned()));
    let stream = super::task_stream(move |tx| async move {
        if tx.send(status_event(&job)).await.is_err() || job.status.is_terminal() {
            return;
        }
        if let Some((state, auth)) = remote {
            match follow_elsewhere(&state, job.clone(), auth, &tx).await {
                // The job ended, or our client left.
                Relayed::Done => return,
                // It runs here, or its node went away (it then ends elsewhere, and the
                // hub hears of that).
                Relayed::Lost => {}
            }
        }
        // What the job wrote before this follower came.
        for ev in replay {
            let ev = match ev {
                LiveEvent::Output(OutputStream::Stdout, b) => {
                    sse(&JobEvent::Stdout { data: String::from_utf8_lossy(&b).into_owned() })
                }
                LiveEvent::Output(OutputStream::Stderr, b) => {
                    sse(&JobEvent::Stderr { data: String::from_utf8_lossy(&b).into_owned() })
                }
                LiveEvent::Status(..) => continue,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        let stopping = scheduler.stopping().clone();
        loop {
            let next = tokio::select! {
                next = sub.recv() => next,
                // The client left: stop following.
                _ = tx.closed() => return,
                // The server is stopping: end with the job as it is now.
                _ = stopping.cancelled() => {
                    if let Ok(Some(j)) = scheduler.get(jid).await {
                        let _ = tx.send(status_event(&j)).await;
                    }
                    return;
                }
            };
            let ev = match next {
                Some(Ok(LiveEvent::Output(OutputStream::Stdout, b))) => {
                    sse(&JobEvent::Stdout { data: String::from_utf8_lossy(&b).into_owned() })
                }
                Some(Ok(LiveEvent::Output(OutputStream::Stderr, b))) => {
                    sse(&JobEvent::Stderr { data: String::from_utf8_lossy(&b).into_owned() })
                }
                Some(Ok(LiveEvent::Status(st, done))) => {
                    let terminal = st.is_terminal();
                    let ev = match done {
                        Some(j) => status_event(&j),
                        None => sse(&JobEvent::Status { status: st, record: None }),
                    };
                    if tx.send(ev).await.is_err() || terminal {
                        return;
                    }
                    continue;
                }
                // Missed events: the store has the truth; end if the job ended.
                Some(Err(_)) | None => match scheduler.get(jid).await {
                    Ok(Some(j)) if j.status.is_terminal() => {
                        let _ = tx.send(status_event(&j)).await;
                        return;
                    }
                    Ok(Some(_)) => {
                        sub = scheduler.hub().subscribe(jid);
                        continue;
                    }
                    _ => return,
                },
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
