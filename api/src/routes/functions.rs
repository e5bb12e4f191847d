//! `/v1/functions`: upload, list, get and delete functions.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use cloudpipe_runtime::job::rfc3339;
use cloudpipe_runtime::store::FunctionMeta;
use cloudpipe_types::{FunctionInfo, FunctionList};
use serde::Deserialize;

use crate::{ApiError, AppState, P, Q, read_body};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/functions", post(create_function).get(list_functions))
        .route("/v1/functions/{name}", get(get_function).delete(delete_function))
}

pub(crate) fn info(m: FunctionMeta) -> FunctionInfo {
    FunctionInfo {
        id: m.id,
        name: m.name,
        kind: m.kind,
        size: m.size,
        created_at: rfc3339(m.created_at),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// Name to point at this version (`[a-z0-9][a-z0-9_-]{0,62}`).
    name: Option<String>,
}

/// Uploads a Wasm binary (a `wasi:cli/command` component or a WASI preview1 module).
#[utoipa::path(post, path = "/v1/functions", tag = "functions", params(UploadParams),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses((status = 201, body = FunctionInfo), (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 413, body = cloudpipe_types::ErrorBody)))]
pub async fn create_function(
    State(state): State<AppState>,
    Q(params): Q<UploadParams>,
    body: Body,
) -> Result<(StatusCode, Json<FunctionInfo>), ApiError> {
    let registry = &state.runtime.registry;
    let bytes = read_body(body, registry.max_size()).await?;
    let meta = registry.upload(params.name, bytes).await?;
    Ok((StatusCode::CREATED, Json(info(meta))))
}

/// Lists named functions.
#[utoipa::path(get, path = "/v1/functions", tag = "functions", responses((status = 200, body = FunctionList)))]
pub async fn list_functions(State(state): State<AppState>) -> Result<Json<FunctionList>, ApiError> {
    let functions = state.runtime.registry.list().await?.into_iter().map(info).collect();
    Ok(Json(FunctionList { functions }))
}

/// A function by name or id (`sha256:…`).
#[utoipa::path(get, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "name or sha256: id")),
    responses((status = 200, body = FunctionInfo), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_function(
    State(state): State<AppState>,
    P(name): P<String>,
) -> Result<Json<FunctionInfo>, ApiError> {
    match state.runtime.registry.get(&name).await? {
        Some(m) => Ok(Json(info(m))),
        None => Err(ApiError::NotFound(format!("function {name:?} not found"))),
    }
}

/// Deletes a name and the versions uploaded under it, or one version by id.
#[utoipa::path(delete, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "name or sha256: id")),
    responses((status = 200, body = FunctionList, description = "what was deleted"), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn delete_function(
    State(state): State<AppState>,
    P(name): P<String>,
) -> Result<Json<FunctionList>, ApiError> {
    let deleted = state.runtime.registry.delete(&name).await?;
    if deleted.is_empty() {
        return Err(ApiError::NotFound(format!("function {name:?} not found")));
    }
    Ok(Json(FunctionList { functions: deleted.into_iter().map(info).collect() }))
}
