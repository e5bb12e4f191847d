//! `/healthz`, `/metrics` (Prometheus text), `/v1/executors` and `/v1/openapi.json`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use cloudpipe_runtime::scheduler::RUN_TIME_BUCKETS;
use cloudpipe_types::{ExecutorList, ExecutorStatus, Health, JobStatus, NodeInfo, NodeList};

use crate::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(get_health))
        .route("/metrics", get(get_metrics))
        .route("/v1/executors", get(list_executors))
        .route("/v1/openapi.json", get(get_openapi))
        .route("/v1/nodes", get(list_nodes))
}

/// The nodes sharing this server's store (the admin's key): role, executors,
/// heartbeat, running jobs, and which one leads. A server on an embedded store is a
/// cluster of one.
#[utoipa::path(get, path = "/v1/nodes", tag = "system", responses(
    (status = 200, body = NodeList),
    (status = 401, body = cloudpipe_types::ErrorBody),
    (status = 403, body = cloudpipe_types::ErrorBody)))]
pub async fn list_nodes(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
) -> Result<Json<NodeList>, ApiError> {
    caller.require_admin()?;
    let store = state.runtime.store.backend().to_string();
    let rfc = cloudpipe_runtime::model::rfc3339;
    let Some(cluster) = &state.runtime.cluster else {
        let now = rfc(cloudpipe_runtime::model::now_micros());
        let node = NodeInfo {
            name: state.node.clone(),
            role: "all".into(),
            executors: state.runtime.executors.names().iter().map(|n| n.to_string()).collect(),
            version: env!("CARGO_PKG_VERSION").into(),
            advertise_url: None,
            started_at: rfc(state.started_at),
            last_heartbeat: now,
            running: state.runtime.scheduler.running() as u64,
            leader: true,
            stale: false,
        };
        return Ok(Json(NodeList { store, this_node: state.node.clone(), nodes: vec![node] }));
    };
    let nodes = cluster
        .nodes()
        .await?
        .into_iter()
        .map(|n| NodeInfo {
            name: n.name,
            role: n.role.as_str().into(),
            executors: n.executors,
            version: n.version,
            advertise_url: n.advertise_url,
            started_at: rfc(n.started_at),
            last_heartbeat: rfc(n.heartbeat_at),
            running: n.running,
            leader: n.leader,
            stale: n.stale,
        })
        .collect();
    Ok(Json(NodeList { store, this_node: cluster.node().to_string(), nodes }))
}

/// Liveness, the store backend in use, and whether the server is degraded (its disk
/// is full: reads work, new work is refused with 507 until space returns).
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = Health)))]
pub async fn get_health(State(state): State<AppState>) -> Json<Health> {
    let degraded = state.runtime.store.degraded();
    Json(Health {
        status: if degraded.is_some() { "degraded" } else { "ok" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        store: state.runtime.store.backend().into(),
        reason: degraded.map(|d| d.to_string()),
    })
}

/// Each executor (`wasm`, `docker`, `vm`) and built-in runner (`runner:js`) of this
/// server, and whether it can take jobs now; when not, why and what would fix it. Any
/// key.
#[utoipa::path(get, path = "/v1/executors", tag = "system", responses((status = 200, body = ExecutorList)))]
pub async fn list_executors(State(state): State<AppState>) -> Json<ExecutorList> {
    Json(executor_list(&state.runtime).await)
}

/// The executors table, as `GET /v1/executors` sends it and `cloudpipe up` prints it.
pub async fn executor_list(runtime: &cloudpipe_runtime::Runtime) -> ExecutorList {
    let executors = runtime
        .readiness()
        .await
        .into_iter()
        .map(|r| {
            let (reason, fix) = match r.state {
                Ok(()) => (None, None),
                Err(u) => (Some(u.reason), u.fix),
            };
            ExecutorStatus {
                name: r.name,
                kind: if r.runner { "runner" } else { "executor" }.into(),
                ready: reason.is_none(),
                reason,
                fix,
            }
        })
        .collect();
    ExecutorList { executors }
}

/// Prometheus metrics (the admin's key): jobs by status, queue depth, running jobs, run-time histogram.
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn get_metrics(
    State(state): State<AppState>,
    caller: crate::auth::Caller,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_admin()?;
    let counts = state.runtime.store.count_jobs().await?;
    let sched = &state.runtime.scheduler;
    let m = sched.metrics();
    let mut out = String::with_capacity(2048);
    let _ = writeln!(
        out,
        "# HELP cloudpipe_jobs Jobs in the store, by status.\n# TYPE cloudpipe_jobs gauge"
    );
    for st in JobStatus::ALL {
        let _ = writeln!(
            out,
            "cloudpipe_jobs{{status=\"{}\"}} {}",
            st.as_str(),
            counts.get(&st).copied().unwrap_or(0)
        );
    }
    let queued = counts.get(&JobStatus::Queued).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP cloudpipe_queue_depth Jobs waiting for a run slot.\n# TYPE cloudpipe_queue_depth gauge\ncloudpipe_queue_depth {queued}"
    );
    let _ = writeln!(
        out,
        "# HELP cloudpipe_jobs_running_local Jobs running in this process.\n# TYPE cloudpipe_jobs_running_local gauge\ncloudpipe_jobs_running_local {}",
        sched.running()
    );
    let _ = writeln!(
        out,
        "# HELP cloudpipe_jobs_submitted_total Jobs accepted since start.\n# TYPE cloudpipe_jobs_submitted_total counter\ncloudpipe_jobs_submitted_total {}",
        m.submitted.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP cloudpipe_jobs_requeued_busy_total Attempts given back to the queue because the executor had no room (the wasm instance pool was full).\n# TYPE cloudpipe_jobs_requeued_busy_total counter\ncloudpipe_jobs_requeued_busy_total {}",
        m.busy.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP cloudpipe_wasm_compiles_total Wasm binaries compiled since start (cache misses).\n# TYPE cloudpipe_wasm_compiles_total counter\ncloudpipe_wasm_compiles_total {}",
        state.runtime.executor.compiles()
    );
    let _ = writeln!(
        out,
        "# HELP cloudpipe_invocations_total HTTP invocations answered since start, by status class.\n# TYPE cloudpipe_invocations_total counter"
    );
    for (class, n) in state.invocations.answered.iter().enumerate().skip(1) {
        let _ = writeln!(
            out,
            "cloudpipe_invocations_total{{code=\"{class}xx\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP cloudpipe_job_run_seconds Run time of job attempts.\n# TYPE cloudpipe_job_run_seconds histogram"
    );
    for (i, le) in RUN_TIME_BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "cloudpipe_job_run_seconds_bucket{{le=\"{le}\"}} {}",
            m.run_time_buckets[i].load(Ordering::Relaxed)
        );
    }
    let total = m.run_time_buckets[RUN_TIME_BUCKETS.len()].load(Ordering::Relaxed);
    let _ = writeln!(out, "cloudpipe_job_run_seconds_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(
        out,
        "cloudpipe_job_run_seconds_sum {}",
        m.run_time_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(out, "cloudpipe_job_run_seconds_count {total}");
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "system", responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn get_openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], crate::openapi::document_json())
}

/// A known route with another method: 405 in the JSON error shape.
pub async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> axum::response::Response {
    let body = cloudpipe_types::ErrorBody {
        error: cloudpipe_types::ErrorDetail {
            code: "method_not_allowed".into(),
            message: format!("{method} is not allowed on {}", uri.path()),
        },
    };
    (axum::http::StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// Unknown routes get the same JSON error shape as everything else.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}
