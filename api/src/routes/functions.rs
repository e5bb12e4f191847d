//! `/v1/functions`: upload, list, get and delete functions.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use cloudpipe_runtime::account::Scope;
use cloudpipe_runtime::model::rfc3339;
use cloudpipe_runtime::store::FunctionMeta;
use cloudpipe_types::{FunctionInfo, FunctionList, FunctionSettings, FunctionSettingsPatch};
use serde::Deserialize;

use crate::auth::Caller;
use crate::extract::{Json, Path, Query};
use crate::{ApiError, AppState, read_body};

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

/// Checks settings against the server's limits, and what `patch` sets against the
/// quotas and egress policy of `owner`, the function's account. (Invocations apply the
/// owner's current quotas and policy whatever the settings say: a setting allowed
/// before the admin narrowed them is not refused here again.)
async fn check_settings(
    state: &AppState,
    owner: &str,
    s: &FunctionSettings,
    patch: &FunctionSettingsPatch,
) -> Result<(), ApiError> {
    let sched = state.runtime.scheduler.config();
    let bad = |m: String| Err(ApiError::bad("invalid_settings", m));
    let record = state.auth.account(owner).await?;
    let limits = record.as_ref().map(|r| state.auth.limits(r)).unwrap_or_default();
    let max_timeout = (sched.max_timeout.as_millis() as u64)
        .min(limits.max_timeout_ms.filter(|_| patch.timeout_ms.is_some()).unwrap_or(u64::MAX));
    if s.timeout_ms > max_timeout {
        return bad(format!(
            "`timeout_ms` is at most {max_timeout} (the server's maximum and the account's quota)"
        ));
    }
    let max_memory = sched
        .max_memory_mb
        .min(limits.max_memory_mb.filter(|_| patch.memory_mb.is_some()).unwrap_or(u64::MAX));
    if s.memory_mb > max_memory {
        return bad(format!(
            "`memory_mb` is at most {max_memory} (the server's maximum and the account's quota)"
        ));
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
    let hosts = &s.allowed_outbound_hosts;
    if hosts.len() > 64 {
        return bad("`allowed_outbound_hosts`: at most 64 patterns".into());
    }
    for h in hosts {
        cloudpipe_runtime::egress::check_pattern(h).map_err(|m| {
            ApiError::bad("invalid_settings", format!("`allowed_outbound_hosts`: {m}"))
        })?;
    }
    if patch.allowed_outbound_hosts.is_some() {
        let granted = record.map(|r| r.egress()).unwrap_or_default();
        let beyond = cloudpipe_runtime::egress::not_covered(&granted, hosts);
        if !beyond.is_empty() {
            return Err(ApiError::Forbidden(
                "egress_not_granted",
                format!(
                    "`allowed_outbound_hosts`: account {owner:?} may not send requests to {}; the admin grants destinations with the account's `allowed_outbound`",
                    beyond.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Uploads compiling at once.
static COMPILES: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
});

/// Refuses, before compiling it, a binary that would pass the account's function-bytes
/// quota (the store checks again when it stores it). A binary the account stores
/// already costs nothing more.
async fn check_room(
    state: &AppState,
    tenant: &cloudpipe_runtime::account::Tenant,
    bytes: &[u8],
) -> Result<(), ApiError> {
    let Some(limit) = tenant.limits.max_function_bytes else { return Ok(()) };
    let id = cloudpipe_runtime::registry::function_id(bytes);
    let own = Scope::Account(tenant.account.clone());
    if state.runtime.registry.get(&own, &id).await?.is_some() {
        return Ok(());
    }
    let used = state.runtime.store.function_bytes(&tenant.account).await?;
    if used.saturating_add(bytes.len() as u64) > limit {
        return Err(cloudpipe_runtime::registry::UploadError::OverQuota {
            size: bytes.len() as u64,
            used,
            limit,
        }
        .into());
    }
    Ok(())
}

/// Most names one account may hold (each costs a log ring of its own).
pub const MAX_NAMES_PER_ACCOUNT: usize = 1000;

/// Refuses a new name past [`MAX_NAMES_PER_ACCOUNT`]; a name the account holds is fine.
async fn check_name_cap(state: &AppState, account: &str, name: &str) -> Result<(), ApiError> {
    let registry = &state.runtime.registry;
    let own = Scope::Account(account.to_string());
    if registry.get(&own, name).await?.is_some_and(|m| m.name.as_deref() == Some(name)) {
        return Ok(());
    }
    let names = registry.list(&own).await?.iter().filter(|m| m.name.is_some()).count();
    if names >= MAX_NAMES_PER_ACCOUNT {
        return Err(ApiError::QuotaExceeded(format!(
            "account {account:?} holds {names} function names, the most an account may: delete some first"
        )));
    }
    Ok(())
}

/// Uploads a Wasm binary (a `wasi:cli/command` component or a WASI preview1 module).
#[utoipa::path(post, path = "/v1/functions", tag = "functions", params(UploadParams),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses((status = 201, body = FunctionInfo), (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 403, body = cloudpipe_types::ErrorBody, description = "`allowed_outbound_hosts` beyond the account's egress policy"),
              (status = 409, body = cloudpipe_types::ErrorBody, description = "the name is another account's"),
              (status = 413, body = cloudpipe_types::ErrorBody), (status = 429, body = cloudpipe_types::ErrorBody)))]
pub async fn create_function(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<UploadParams>,
    body: Body,
) -> Result<(StatusCode, Json<FunctionInfo>), ApiError> {
    let registry = &state.runtime.registry;
    let patch = params.patch();
    if patch.is_some() && params.name.is_none() {
        return Err(ApiError::bad("invalid_query", "settings belong to a name: give `name` too"));
    }
    let settings = match (&patch, &params.name) {
        (Some(patch), Some(name)) => {
            let current = registry.get(&caller.scope(), name).await?;
            let owner = current.as_ref().map_or(caller.account.clone(), |m| m.account.clone());
            let settings = current.map(|m| m.settings).unwrap_or_default().patched(patch.clone());
            check_settings(&state, &owner, &settings, patch).await?;
            Some(settings)
        }
        _ => None,
    };
    if let Some(name) = &params.name
        && !caller.is_admin()
    {
        check_name_cap(&state, &caller.account, name).await?;
    }
    let bytes = read_body(body, registry.max_size()).await?;
    let tenant = caller.tenant();
    check_room(&state, &tenant, &bytes).await?;
    // Compiling is the costly part of an upload: a few at a time, whoever uploads.
    let _compiling = tokio::time::timeout(Duration::from_secs(30), COMPILES.acquire())
        .await
        .map_err(|_| {
            ApiError::Unavailable("the server is busy compiling uploads; retry shortly".into())
        })?
        .map_err(|e| ApiError::Internal(e.into()))?;
    let uploaded = registry.upload(&tenant, params.name.clone(), bytes).await;
    // Whatever the answer: a failed write may still have landed.
    let invalidate = || params.name.as_deref().map(|n| state.invocations.functions.invalidate(n));
    invalidate();
    let mut meta = uploaded?;
    if let (Some(settings), Some(name)) = (settings, &params.name) {
        let configured = registry.configure(&caller.scope(), name, settings).await;
        invalidate();
        meta = configured?.unwrap_or(meta);
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
    Path(name): Path<String>,
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
              (status = 403, body = cloudpipe_types::ErrorBody, description = "`allowed_outbound_hosts` beyond the account's egress policy"),
              (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn update_function(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(patch): Json<FunctionSettingsPatch>,
) -> Result<Json<FunctionInfo>, ApiError> {
    let not_found = || ApiError::NotFound(format!("function {name:?} not found"));
    let scope = caller.scope();
    let current = state
        .runtime
        .registry
        .get(&scope, &name)
        .await?
        .filter(|m| m.name.as_deref() == Some(&name));
    let current = current.ok_or_else(not_found)?;
    let settings = current.settings.patched(patch.clone());
    check_settings(&state, &current.account, &settings, &patch).await?;
    // The secrets it names are the function's account's, looked up at each invocation.
    state.runtime.secrets.check(&current.account, &settings.env).await?;
    let meta = state.runtime.registry.configure(&scope, &name, settings).await;
    state.invocations.functions.invalidate(&name);
    let meta = meta?.ok_or_else(not_found)?;
    Ok(Json(info(meta)))
}

/// Deletes a name and the versions uploaded under it, or one version by id.
#[utoipa::path(delete, path = "/v1/functions/{name}", tag = "functions",
    params(("name" = String, Path, description = "name or sha256: id")),
    responses((status = 200, body = FunctionList, description = "what was deleted"), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn delete_function(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<FunctionList>, ApiError> {
    let deleted = state.runtime.registry.delete(&caller.scope(), &name).await;
    state.invocations.functions.invalidate_all();
    let deleted = deleted?;
    if deleted.is_empty() {
        return Err(ApiError::NotFound(format!("function {name:?} not found")));
    }
    // The log goes with the name, so that whoever takes the name next starts afresh.
    for m in &deleted {
        state.logs.remove(&crate::logs::key(&m.account, &name));
        if let Some(n) = &m.name {
            let owner = Scope::Account(m.account.clone());
            if state.runtime.registry.get(&owner, n).await?.is_none() {
                state.logs.remove(&crate::logs::key(&m.account, n));
            }
        }
    }
    Ok(Json(FunctionList { functions: deleted.into_iter().map(info).collect() }))
}
