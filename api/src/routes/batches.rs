//! `/v1/batches`: one job template over many inputs (cloudtask's sessions), and
//! resume, retry and cancel by id. The jobs of a batch are listed by
//! `GET /v1/jobs?batch=ID`.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use cloudpipe_runtime::batch::BatchError;
use cloudpipe_types::{BatchList, BatchRecord, BatchSpec};

use crate::auth::Caller;
use crate::extract::{Json, Path, read_json};
use crate::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/resume", post(resume_batch))
        .route("/v1/batches/{id}/retry", post(retry_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Invalid(m) => ApiError::bad("invalid_request", m),
            BatchError::NotFound(_) | BatchError::FunctionNotFound(_) => {
                ApiError::NotFound(e.to_string())
            }
            BatchError::Conflict(m) => ApiError::Conflict("batch_running", m),
            BatchError::Internal(e) => ApiError::Internal(e),
        }
    }
}

/// The caller's account, or none for the admin (who sees every batch).
fn owner(caller: &Caller) -> Option<&str> {
    (!caller.is_admin()).then_some(caller.account.as_str())
}

/// Starts a batch: the template's job for every input, at most `split` at once.
#[utoipa::path(post, path = "/v1/batches", tag = "batches", request_body = BatchSpec,
    responses((status = 201, body = BatchRecord), (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 404, body = cloudpipe_types::ErrorBody), (status = 413, body = cloudpipe_types::ErrorBody)))]
pub async fn create_batch(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<(StatusCode, Json<BatchRecord>), ApiError> {
    // Inputs can be many: a larger body than a job's.
    let spec: BatchSpec = read_json(body, state.config.max_json_body.saturating_mul(8)).await?;
    let record = state.runtime.batches.create(spec, &caller.tenant()).await?;
    Ok((StatusCode::CREATED, Json(record)))
}

/// The caller's batches (the admin: everyone's), oldest first.
#[utoipa::path(get, path = "/v1/batches", tag = "batches", responses((status = 200, body = BatchList)))]
pub async fn list_batches(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<BatchList>, ApiError> {
    Ok(Json(BatchList { batches: state.runtime.batches.list(owner(&caller)).await? }))
}

/// A batch: its status, counts, wall time, summed job time and efficiency.
#[utoipa::path(get, path = "/v1/batches/{id}", tag = "batches", params(("id" = String, Path)),
    responses((status = 200, body = BatchRecord), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<BatchRecord>, ApiError> {
    let record = state.runtime.batches.get(&id, owner(&caller)).await?;
    record.map(Json).ok_or_else(|| ApiError::NotFound(format!("batch {id:?} not found")))
}

/// Runs the pending inputs of a stopped batch (struck or cancelled).
#[utoipa::path(post, path = "/v1/batches/{id}/resume", tag = "batches", params(("id" = String, Path)),
    responses((status = 200, body = BatchRecord), (status = 404, body = cloudpipe_types::ErrorBody),
              (status = 409, body = cloudpipe_types::ErrorBody)))]
pub async fn resume_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<BatchRecord>, ApiError> {
    Ok(Json(state.runtime.batches.resume(&id, owner(&caller)).await?))
}

/// Puts failed and timed-out inputs back to pending, with a fresh set of tries, and
/// runs them.
#[utoipa::path(post, path = "/v1/batches/{id}/retry", tag = "batches", params(("id" = String, Path)),
    responses((status = 200, body = BatchRecord), (status = 404, body = cloudpipe_types::ErrorBody),
              (status = 409, body = cloudpipe_types::ErrorBody)))]
pub async fn retry_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<BatchRecord>, ApiError> {
    Ok(Json(state.runtime.batches.retry(&id, owner(&caller)).await?))
}

/// Stops launching jobs and cancels the running ones; their inputs stay pending, so
/// the batch can be resumed. 409 while the batch is still starting (just created,
/// resumed or retried): try again.
#[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "batches", params(("id" = String, Path)),
    responses((status = 200, body = BatchRecord), (status = 404, body = cloudpipe_types::ErrorBody),
              (status = 409, body = cloudpipe_types::ErrorBody)))]
pub async fn cancel_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<BatchRecord>, ApiError> {
    Ok(Json(state.runtime.batches.cancel(&id, owner(&caller)).await?))
}
