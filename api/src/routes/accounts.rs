//! `/v1/accounts`, `/v1/keys` and `/v1/me`: accounts, their API keys and quotas.
//!
//! The admin manages every account; an account may read itself and manage its own
//! keys. Another account's account or key is "not found", like one that does not
//! exist.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use cloudpipe_runtime::account::{ADMIN, AccountRecord, KeyRecord};
use cloudpipe_runtime::model::{now_micros, rfc3339};
use cloudpipe_runtime::registry::is_valid_name;
use cloudpipe_runtime::store::JobFilter;
use cloudpipe_types::{
    Account, AccountCreate, AccountList, AccountPatch, ApiKeyCreate, ApiKeyInfo, ApiKeyList,
    JobStatus, Me, NewApiKey, Role,
};

use crate::auth::{Caller, generate_key, key_record};
use crate::extract::{Json, Path, Query, parse_json, read_json};
use crate::{ApiError, AppState, read_body};

/// Checks an account's egress policy: at most 64 destination patterns.
fn check_outbound(patterns: &[String]) -> Result<(), ApiError> {
    if patterns.len() > 64 {
        return Err(ApiError::bad("invalid_request", "`allowed_outbound`: at most 64 patterns"));
    }
    for p in patterns {
        cloudpipe_runtime::egress::check_pattern(p)
            .map_err(|m| ApiError::bad("invalid_request", format!("`allowed_outbound`: {m}")))?;
    }
    Ok(())
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/accounts", post(create_account).get(list_accounts))
        .route("/v1/accounts/{name}", get(get_account).patch(update_account))
        .route("/v1/accounts/{name}/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", delete(revoke_key))
        .route("/v1/me", get(get_me))
}

fn account(a: AccountRecord) -> Account {
    Account {
        name: a.name,
        role: a.role,
        disabled: a.disabled,
        quotas: a.quotas,
        allow_network: a.allow_network,
        allowed_outbound: a.allowed_outbound,
        created_at: rfc3339(a.created_at),
    }
}

fn key_info(k: KeyRecord) -> ApiKeyInfo {
    ApiKeyInfo { id: k.id, account: k.account, label: k.label, created_at: rfc3339(k.created_at) }
}

fn account_not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("account {name:?} not found"))
}

/// The account `name` if the caller may see it.
async fn visible(state: &AppState, caller: &Caller, name: &str) -> Result<AccountRecord, ApiError> {
    if !caller.sees(name) {
        return Err(account_not_found(name));
    }
    state.runtime.store.get_account(name).await?.ok_or_else(|| account_not_found(name))
}

/// Creates an account (admin).
#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", request_body = AccountCreate,
    responses((status = 201, body = Account), (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 403, body = cloudpipe_types::ErrorBody), (status = 409, body = cloudpipe_types::ErrorBody)))]
pub async fn create_account(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<(StatusCode, Json<Account>), ApiError> {
    // The admin check comes before the body is read (so not as an extractor).
    caller.require_admin()?;
    let req: AccountCreate = read_json(body, state.config.max_json_body).await?;
    if !is_valid_name(&req.name) {
        return Err(ApiError::bad(
            "invalid_name",
            format!(
                "invalid account name {:?}: use 1 to 63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
                req.name
            ),
        ));
    }
    check_outbound(&req.allowed_outbound)?;
    let record = AccountRecord {
        name: req.name.clone(),
        role: req.role,
        disabled: false,
        quotas: req.quotas,
        allow_network: req.allow_network,
        allowed_outbound: req.allowed_outbound,
        created_at: now_micros(),
    };
    if !state.runtime.store.insert_account(record.clone()).await? {
        return Err(ApiError::Conflict(
            "account_exists",
            format!("an account named {:?} exists", req.name),
        ));
    }
    tracing::info!(account = %record.name, role = ?record.role, by = %caller.account, "account created");
    Ok((StatusCode::CREATED, Json(account(record))))
}

/// Lists accounts (admin).
#[utoipa::path(get, path = "/v1/accounts", tag = "accounts",
    responses((status = 200, body = AccountList), (status = 403, body = cloudpipe_types::ErrorBody)))]
pub async fn list_accounts(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<AccountList>, ApiError> {
    caller.require_admin()?;
    let accounts = state.runtime.store.list_accounts().await?.into_iter().map(account).collect();
    Ok(Json(AccountList { accounts }))
}

/// An account (the admin, or the account itself).
#[utoipa::path(get, path = "/v1/accounts/{name}", tag = "accounts", params(("name" = String, Path)),
    responses((status = 200, body = Account), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Account>, ApiError> {
    Ok(Json(account(visible(&state, &caller, &name).await?)))
}

/// Disables or enables an account, or sets its quotas and policies (admin). Disabling
/// refuses its keys from the next request on, pauses its running batches (resumable)
/// and cancels its queued and running jobs; its functions answer no invocation.
#[utoipa::path(patch, path = "/v1/accounts/{name}", tag = "accounts", params(("name" = String, Path)),
    request_body = AccountPatch,
    responses((status = 200, body = Account), (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 403, body = cloudpipe_types::ErrorBody), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn update_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<Account>, ApiError> {
    caller.require_admin()?;
    let patch: AccountPatch = read_json(body, state.config.max_json_body).await?;
    let mut record = visible(&state, &caller, &name).await?;
    if patch.disabled == Some(true) && record.role == Role::Admin {
        return Err(ApiError::bad("invalid_request", "an admin account cannot be disabled"));
    }
    if let Some(d) = patch.disabled {
        record.disabled = d;
    }
    if let Some(q) = patch.quotas {
        record.quotas = q;
    }
    if let Some(n) = patch.allow_network {
        record.allow_network = n;
    }
    if let Some(o) = patch.allowed_outbound {
        check_outbound(&o)?;
        record.allowed_outbound = o;
    }
    let updated = state.runtime.store.update_account(record.clone()).await;
    // Whatever the answer: a failed commit may still have landed.
    state.auth.cache().invalidate_account(&name);
    if !updated? {
        return Err(account_not_found(&name));
    }
    tracing::info!(account = %name, disabled = record.disabled, by = %caller.account, "account updated");
    if record.disabled {
        // Its batches first, so that none launches a job after the cancels below.
        state.runtime.batches.pause_account(&name).await?;
        stop_jobs(&state, &name).await?;
    }
    Ok(Json(account(record)))
}

/// Cancels every queued and running job of `account` (a disabled account).
pub(crate) async fn stop_jobs(state: &AppState, account: &str) -> anyhow::Result<()> {
    let scheduler = &state.runtime.scheduler;
    for status in [JobStatus::Queued, JobStatus::Running] {
        // Bounded: a job that will not stop is reported, not waited for forever.
        for _ in 0..100 {
            let filter = JobFilter {
                account: Some(account.to_string()),
                status: Some(status),
                limit: 1000,
                ..Default::default()
            };
            let jobs = state.runtime.store.list_jobs(&filter).await?;
            if jobs.is_empty() {
                break;
            }
            let n = jobs.len();
            for job in jobs {
                scheduler.cancel(job.id).await?;
            }
            tracing::info!(account, cancelled = n, "cancelled jobs of a disabled account");
        }
    }
    Ok(())
}

/// Most keys one account may hold.
pub const MAX_KEYS_PER_ACCOUNT: usize = 100;

/// Creates an API key for an account (the admin, or the account itself). The answer
/// is the only time the key is shown.
#[utoipa::path(post, path = "/v1/accounts/{name}/keys", tag = "accounts", params(("name" = String, Path)),
    request_body = ApiKeyCreate,
    responses((status = 201, body = NewApiKey), (status = 404, body = cloudpipe_types::ErrorBody),
              (status = 429, body = cloudpipe_types::ErrorBody, description = "the account holds the most keys it may")))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<NewApiKey>), ApiError> {
    let bytes = read_body(body, state.config.max_json_body).await?;
    let req: ApiKeyCreate = match bytes.is_empty() {
        true => ApiKeyCreate::default(),
        false => parse_json(&bytes)?,
    };
    if req.label.as_ref().is_some_and(|l| l.len() > 128) {
        return Err(ApiError::bad("invalid_request", "`label` is at most 128 bytes"));
    }
    visible(&state, &caller, &name).await?;
    let held = state.runtime.store.list_keys(Some(&name)).await?.len();
    if held >= MAX_KEYS_PER_ACCOUNT {
        return Err(ApiError::QuotaExceeded(format!(
            "account {name:?} has {held} keys, the most an account may: revoke some first"
        )));
    }
    let key = generate_key();
    let record = key_record(&name, &key, req.label);
    if !state.runtime.store.insert_key(record.clone()).await? {
        return Err(account_not_found(&name));
    }
    tracing::info!(account = %name, key_id = %record.id, by = %caller.account, "API key created");
    Ok((StatusCode::CREATED, Json(NewApiKey { info: key_info(record), key })))
}

/// Lists an account's keys, without their secrets (the admin, or the account itself).
#[utoipa::path(get, path = "/v1/accounts/{name}/keys", tag = "accounts", params(("name" = String, Path)),
    responses((status = 200, body = ApiKeyList), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ApiKeyList>, ApiError> {
    visible(&state, &caller, &name).await?;
    let keys = state.runtime.store.list_keys(Some(&name)).await?.into_iter().map(key_info);
    Ok(Json(ApiKeyList { keys: keys.collect() }))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RevokeParams {
    /// `true`: revoke even the account's last key (the account can then no longer
    /// authenticate; see `cloudpipe admin reset-key` for the admin's recovery).
    force: Option<bool>,
}

/// Revokes a key (the admin, or the key's account): refused from the next request on.
/// An account's last key is kept (409 `last_key`) unless `?force=true`.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "accounts", params(("id" = String, Path), RevokeParams),
    responses((status = 200, body = ApiKeyInfo), (status = 400, body = cloudpipe_types::ErrorBody),
              (status = 404, body = cloudpipe_types::ErrorBody),
              (status = 409, body = cloudpipe_types::ErrorBody, description = "the account's last key, without `?force=true`")))]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<RevokeParams>,
) -> Result<Json<ApiKeyInfo>, ApiError> {
    // One revocation at a time, so that two concurrent ones cannot both see a second
    // key left and together remove the last.
    static REVOKING: std::sync::LazyLock<tokio::sync::Mutex<()>> =
        std::sync::LazyLock::new(Default::default);
    let _one = REVOKING.lock().await;
    let store = &state.runtime.store;
    let not_found = || ApiError::NotFound(format!("key {id:?} not found"));
    let keys = store.list_keys(if caller.is_admin() { None } else { Some(&caller.account) });
    let key = keys.await?.into_iter().find(|k| k.id == id).ok_or_else(not_found)?;
    if params.force != Some(true) && store.list_keys(Some(&key.account)).await?.len() <= 1 {
        return Err(ApiError::Conflict(
            "last_key",
            format!(
                "key {id:?} is account {:?}'s last key: revoking it would lock the account out; create another key first, or pass ?force=true",
                key.account
            ),
        ));
    }
    if key.account == ADMIN && key.label.as_deref() == Some("CLOUDPIPE_ADMIN_KEY") {
        tracing::warn!(
            "revoking the key set by CLOUDPIPE_ADMIN_KEY: it comes back at the next start while that variable is set"
        );
    }
    let revoked = store.delete_key(&key.id).await;
    state.auth.cache().invalidate_key(&key.hash);
    let revoked = revoked?.ok_or_else(not_found)?;
    tracing::info!(account = %revoked.account, key_id = %revoked.id, by = %caller.account, "API key revoked");
    Ok(Json(key_info(revoked)))
}

/// Who the key belongs to, the limits in force and what is used of them.
#[utoipa::path(get, path = "/v1/me", tag = "accounts", responses((status = 200, body = Me)))]
pub async fn get_me(State(state): State<AppState>, caller: Caller) -> Result<Json<Me>, ApiError> {
    let function_bytes = state.runtime.store.function_bytes(&caller.account).await?;
    Ok(Json(Me {
        active_jobs: state.runtime.scheduler.active_jobs(&caller.account).await?,
        account: caller.account,
        role: caller.role,
        quotas: caller.limits.to_quotas(),
        function_bytes,
    }))
}
