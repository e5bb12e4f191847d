//! `/v1/batches`: one job template over many inputs (cloudtask's sessions), and
//! resume, retry, cancel and delete by id. The jobs of a batch are listed by
//! `GET /v1/jobs?batch=ID`.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use cloudpipe_runtime::batch::{BatchError, MAX_PAGE};
use cloudpipe_runtime::model::JobId;
use cloudpipe_types::{BatchList, BatchRecord, BatchSpec};
use serde::Deserialize;

use crate::auth::Caller;
use crate::extract::{Json, Path, Query, read_json};
use crate::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch).delete(delete_batch))
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
            BatchError::OverQuota { code, message } => ApiError::QuotaExceededOf(code, message),
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
              (status = 404, body = cloudpipe_types::ErrorBody), (status = 413, body = cloudpipe_types::ErrorBody),
              (status = 429, description = "past one of the account's batch quotas: code `too_many_inputs` (inputs of one batch), `too_many_batches` (batches stored) or `too_many_stored_inputs` (inputs of its stored batches)", body = cloudpipe_types::ErrorBody)))]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// At most this many (1–1000, default 100).
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Only batches of this account (the admin; others see only their own).
    account: Option<String>,
}

/// A page of the caller's batches (the admin: everyone's, or one account's), newest
/// first.
#[utoipa::path(get, path = "/v1/batches", tag = "batches", params(ListParams),
    responses((status = 200, body = BatchList), (status = 400, body = cloudpipe_types::ErrorBody)))]
pub async fn list_batches(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Json<BatchList>, ApiError> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad(
            "invalid_query",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    if let Some(c) = &p.cursor
        && c.parse::<JobId>().is_err()
    {
        return Err(ApiError::bad("invalid_query", format!("bad cursor {c:?}")));
    }
    let account = match caller.is_admin() {
        true => p.account,
        false => Some(caller.account.clone()),
    };
    let (batches, next_cursor) =
        state.runtime.batches.list(account.as_deref(), p.cursor, limit).await?;
    Ok(Json(BatchList { batches, next_cursor }))
}

/// Deletes a batch: its record and inputs (its jobs stay, listed by
/// `GET /v1/jobs?batch=ID`, until job retention takes them). A running batch is
/// cancelled first, as `POST .../cancel` does, then deleted; one that does not stop
/// in time is refused with 409 `batch_running`.
#[utoipa::path(delete, path = "/v1/batches/{id}", tag = "batches", params(("id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = cloudpipe_types::ErrorBody),
              (status = 409, body = cloudpipe_types::ErrorBody)))]
pub async fn delete_batch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.runtime.batches.delete(&id, owner(&caller)).await?;
    Ok(StatusCode::NO_CONTENT)
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
