//! `/v1/secrets`: the caller's write-only secrets. A value goes in with `PUT` and never
//! comes out: the list shows names and times; jobs and functions refer to a secret as
//! `"env": {"TOKEN": {"secret": "name"}}` and get its value only when they run.
//!
//! Secrets are per account: each account (the admin's too) sees and uses only its own.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use cloudpipe_runtime::model::SecretRecord;
use cloudpipe_runtime::model::rfc3339;
use cloudpipe_types::{SecretInfo, SecretList, SecretPut};

use crate::auth::Caller;
use crate::extract::{Json, Path};
use crate::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/secrets", get(list_secrets))
        .route("/v1/secrets/{name}", put(put_secret).delete(delete_secret))
}

fn info(r: &SecretRecord) -> SecretInfo {
    SecretInfo {
        name: r.name.clone(),
        created_at: rfc3339(r.created_at),
        updated_at: rfc3339(r.updated_at),
    }
}

/// Creates or replaces one of the caller's secrets. The answer names it; the value is
/// never sent back, by this route or any other.
#[utoipa::path(put, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "1 to 128 of A-Z a-z 0-9 _ . -")),
    request_body = SecretPut,
    responses((status = 201, body = SecretInfo, description = "created"),
              (status = 200, body = SecretInfo, description = "replaced"),
              (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 429, body = cloudpipe_types::ErrorBody, description = "the account has its most secrets")))]
pub async fn put_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<SecretPut>,
) -> Result<(StatusCode, Json<SecretInfo>), ApiError> {
    let record = state.runtime.secrets.put(&caller.account, &name, &req.value).await?;
    let status = match record.created_at == record.updated_at {
        true => StatusCode::CREATED,
        false => StatusCode::OK,
    };
    Ok((status, Json(info(&record))))
}

/// The caller's secrets: names and times, never values.
#[utoipa::path(get, path = "/v1/secrets", tag = "secrets",
    responses((status = 200, body = SecretList)))]
pub async fn list_secrets(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SecretList>, ApiError> {
    let records = state.runtime.secrets.list(&caller.account).await?;
    Ok(Json(SecretList { secrets: records.iter().map(info).collect() }))
}

/// Deletes one of the caller's secrets. Jobs that refer to it and start later fail
/// with error kind `secret_not_found`.
#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn delete_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    match state.runtime.secrets.delete(&caller.account, &name).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::NotFound(format!("secret {name:?} not found"))),
    }
}
