//! `/v1/functions`: upload, list, get and delete functions.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use cloudpipe_runtime::job::rfc3339;
use cloudpipe_runtime::store::FunctionMeta;
use cloudpipe_types::{FunctionInfo, FunctionList, FunctionSettings, FunctionSettingsPatch};
use serde::Deserialize;

use crate::auth::Caller;
use crate::{ApiError, AppState, P, Q, parse_json, read_body};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/functions", post(create_function).get(list_functions)).route(
        "/v1/functions/{name}",
        get(get_function).delete(delete_function).patch(update_function),
    )
}

pub(crate) fn info(m: FunctionMeta) -> FunctionInfo {
    FunctionInfo {
        id: m.id,
        account: m.account,
        name: m.name,
        kind: m.kind,
        size: m.size,
        created_at: rfc3339(m.created_at),
        settings: m.settings,
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// Name to point at this version (`[a-z0-9][a-z0-9_-]{0,62}`).
    name: Option<String>,
    /// Settings of the name, as in `PATCH /v1/functions/{name}` (env only there).
    timeout_ms: Option<u64>,
    memory_mb: Option<u64>,
    max_concurrency: Option<u32>,
    public: Option<bool>,
    /// Comma-separated.
    allowed_outbound_hosts: Option<String>,
}

impl UploadParams {
    fn patch(&self) -> Option<FunctionSettingsPatch> {
        let patch = FunctionSettingsPatch {
            env: None,
            timeout_ms: self.timeout_ms,
            memory_mb: self.memory_mb,
            max_concurrency: self.max_concurrency,
            public: self.public,
            allowed_outbound_hosts: self.allowed_outbound_hosts.as_ref().map(|h| {
                h.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from).collect()
            }),
        };
        (patch != FunctionSettingsPatch::default()).then_some(patch)
    }
}

/// Checks settings against the server's limits.
fn check_settings(state: &AppState, s: &FunctionSettings) -> Result<(), ApiError> {
    let sched = state.runtime.scheduler.config();
    let bad = |m: String| Err(ApiError::bad("invalid_settings", m));
    if s.timeout_ms > sched.max_timeout.as_millis() as u64 {
        return bad(format!("`timeout_ms` is at most {}", sched.max_timeout.as_millis()));
    }
    if s.memory_mb > sched.max_memory_mb {
        return bad(format!("`memory_mb` is at most {}", sched.max_memory_mb));
    }
    let bad_value = |v: &cloudpipe_types::EnvValue| {
        v.as_text().is_some_and(|t| t.contains('\0'))
            || v.secret_name().is_some_and(|n| !cloudpipe_runtime::secrets::valid_name(n))
    };
    if s.env.len() > 256
        || s.env.iter().any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || bad_value(v))
    {
        return bad(
            "at most 256 environment variables, names without '=' or NUL, values without NUL, secret names of A-Z a-z 0-9 _ . -"
                .into(),
        );
    }
    let host_ok = |h: &String| {
        !h.is_empty()
            && h.len() <= 260
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:*[]".contains(&b))
    };
    if s.allowed_outbound_hosts.len() > 64 || !s.allowed_outbound_hosts.iter().all(host_ok) {
        return bad(
            "`allowed_outbound_hosts`: at most 64 of `host`, `host:port`, `*.domain` or `*`".into(),
        );
    }
    Ok(())
}

/// Uploads a Wasm binary (a `wasi:cli/command` component or a WASI preview1 module).
#[utoipa::path(post, path = "/v1/functions", tag = "functions", params(UploadParams),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses((status = 201, body = FunctionInfo), (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 409, body = cloudpipe_types::ErrorBody, description = "the name is another account's"),
              (status = 413, body = cloudpipe_types::ErrorBody), (status = 429, body = cloudpipe_types::ErrorBody)))]
pub async fn create_function(
    State(state): State<AppState>,
    caller: Caller,
    Q(params): Q<UploadParams>,
    body: Body,
) -> Result<(StatusCode, Json<FunctionInfo>), ApiError> {
    let registry = &state.runtime.registry;
    let patch = params.patch();
    if patch.is_some() && params.name.is_none() {
        return Err(ApiError::bad("invalid_query", "settings belong to a name: give `name` too"));
    }
    let settings = match (&patch, &params.name) {
        (Some(patch), Some(name)) => {
            let current =
                registry.get(&caller.scope(), name).await?.map(|m| m.settings).unwrap_or_default();
            let settings = current.patched(patch.clone());
            check_settings(&state, &settings)?;
            Some(settings)
        }
        _ => None,
    };
    let bytes = read_body(body, registry.max_size()).await?;
    let mut meta = registry.upload(&caller.tenant(), params.name.clone(), bytes).await?;
    if let (Some(settings), Some(name)) = (settings, &params.name) {
        meta = registry.configure(&caller.scope(), name, settings).await?.unwrap_or(meta);
    }
    Ok((StatusCode::CREATED, Json(info(meta))))
}

/// Lists the caller's named functions (the admin: everyone's).
#[utoipa::path(get, path = "/v1/functions", tag = "functions", responses((status = 200, body = FunctionList)))]
pub async fn list_functions(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<FunctionList>, ApiError> {
    let functions =
        state.runtime.registry.list(&caller.scope()).await?.into_iter().map(info).collect();
    Ok(Json(FunctionList { functions }))
}

/// A function by name or id (`sha256:…`).
#[utoipa::path(get, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "name or sha256: id")),
    responses((status = 200, body = FunctionInfo), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_function(
    State(state): State<AppState>,
    caller: Caller,
    P(name): P<String>,
) -> Result<Json<FunctionInfo>, ApiError> {
    match state.runtime.registry.get(&caller.scope(), &name).await? {
        Some(m) => Ok(Json(info(m))),
        None => Err(ApiError::NotFound(format!("function {name:?} not found"))),
    }
}

/// Changes the settings of a named function; each field given replaces that setting.
#[utoipa::path(patch, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path)), request_body = FunctionSettingsPatch,
    responses((status = 200, body = FunctionInfo), (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn update_function(
    State(state): State<AppState>,
    caller: Caller,
    P(name): P<String>,
    body: Body,
) -> Result<Json<FunctionInfo>, ApiError> {
    let bytes = read_body(body, state.config.max_json_body).await?;
    let patch: FunctionSettingsPatch = parse_json(&bytes)?;
    let not_found = || ApiError::NotFound(format!("function {name:?} not found"));
    let scope = caller.scope();
    let current = state
        .runtime
        .registry
        .get(&scope, &name)
        .await?
        .filter(|m| m.name.as_deref() == Some(&name));
    let current = current.ok_or_else(not_found)?;
    let settings = current.settings.patched(patch);
    check_settings(&state, &settings)?;
    // The secrets it names are the function's account's, looked up at each invocation.
    state.runtime.secrets.check(&current.account, &settings.env).await?;
    let meta =
        state.runtime.registry.configure(&scope, &name, settings).await?.ok_or_else(not_found)?;
    Ok(Json(info(meta)))
}

/// Deletes a name and the versions uploaded under it, or one version by id.
#[utoipa::path(delete, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "name or sha256: id")),
    responses((status = 200, body = FunctionList, description = "what was deleted"), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn delete_function(
    State(state): State<AppState>,
    caller: Caller,
    P(name): P<String>,
) -> Result<Json<FunctionList>, ApiError> {
    let deleted = state.runtime.registry.delete(&caller.scope(), &name).await?;
    if deleted.is_empty() {
        return Err(ApiError::NotFound(format!("function {name:?} not found")));
    }
    state.logs.remove(&name);
    Ok(Json(FunctionList { functions: deleted.into_iter().map(info).collect() }))
}
