//! `ANY /fn/{name}[/{*path}]`: functions as web endpoints, and their logs.
//!
//! The short path: the function is resolved by name (a read), run at once on the
//! executor, and answered; no queue and no store write. Command components and WASI
//! modules speak CGI (as WAGI did): the request body on stdin, the request in
//! environment variables, stdout the response with optional leading CGI headers.
//!
//! Every invocation gets an id (`x-cloudpipe-invocation`); its stderr and a one-line
//! access record go to the function's log ring ([`crate::logs`]).
//!
//! # Admission
//! A slot is taken only once the request body is in (a CGI body whole, the first
//! MiB of a streamed one), read within [`InvokeConfig::body_timeout`]: a client that
//! drips its body slowly holds no slot. Then three limits apply: the function's
//! (its `max_concurrency`, else the server's), its account's (its
//! `max_concurrent_jobs` quota, at most [`InvokeConfig::max_concurrency_per_account`]:
//! one tenant cannot take the whole pool) and the server's. The account's quotas also
//! bound each invocation's timeout and memory, and a disabled account's functions
//! answer nothing.
//!
//! # Layout
//! - `mod.rs`: the router; resolving the function and its owner, the limits of one
//!   invocation, the access record.
//! - [`cache`]: [`FunctionCache`], what `/fn/{name}` resolves to, in memory.
//! - [`admission`]: [`InvokeConfig`], [`Invocations`] (the slots) and reading the
//!   body before a slot is taken.
//! - [`cgi`]: command components and WASI modules behind CGI.
//! - [`proxy`]: wasi:http proxy components, streaming both ways.
//! - [`logs`]: `GET /v1/functions/{name}/logs`.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use cloudpipe_runtime::JobId;
use cloudpipe_runtime::store::FunctionMeta;
use cloudpipe_types::FunctionKind;

use crate::auth::{Caller, MaybeCaller};
use crate::extract::Path;
use crate::{ApiError, AppState};

pub mod admission;
pub mod cache;
mod cgi;
pub mod logs;
mod proxy;

pub use admission::{Admitted, Invocations, InvokeConfig, STREAM_HEAD};
use admission::{admit, read_head};
pub use cache::FunctionCache;
pub use proxy::ORIGINAL_PATH_HEADER;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/fn/{name}", any(invoke_function))
        .route("/fn/{name}/", any(invoke_function))
        .route("/fn/{name}/{*path}", any(invoke_function_path))
        .route("/v1/functions/{name}/logs", get(logs::get_function_logs))
}

/// A function's limit, or the server's default when it sets none (0).
fn or_default<T: PartialEq + Default>(own: T, default: T) -> T {
    if own == T::default() { default } else { own }
}

pub async fn invoke_function(
    State(state): State<AppState>,
    MaybeCaller(caller): MaybeCaller,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    invoke(state, caller, name, String::new(), req).await
}

pub async fn invoke_function_path(
    State(state): State<AppState>,
    MaybeCaller(caller): MaybeCaller,
    Path((name, path)): Path<(String, String)>,
    req: Request,
) -> Response {
    invoke(state, caller, name, path, req).await
}

/// Runs one invocation and records it, whatever its outcome.
async fn invoke(
    state: AppState,
    caller: Option<Caller>,
    name: String,
    path: String,
    req: Request,
) -> Response {
    let invocation = JobId::new().to_string();
    let started = Instant::now();
    let method = req.method().clone();
    let shown_path = req.uri().path().to_string();
    let mut stderr = Vec::new();
    let mut found = None;
    let run = run(&state, caller.as_ref(), &name, &path, &invocation, req, &mut stderr, &mut found);
    let mut res = match run.await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&invocation) {
        res.headers_mut().insert(INVOCATION_HEADER, v);
    }
    let access = format!(
        "{method} {shown_path} {} {:.3}ms",
        res.status().as_u16(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    // Only functions that exist get a log: any name in a URL must not grow memory.
    if let Some(log) = found {
        state.logs.record(&log, &invocation, &stderr, access);
    }
    let class = (res.status().as_u16() / 100).min(5) as usize;
    state.invocations.answered[class].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    res
}

/// The response header naming an invocation.
pub const INVOCATION_HEADER: &str = "x-cloudpipe-invocation";

#[allow(clippy::too_many_arguments)]
async fn run(
    state: &AppState,
    caller: Option<&Caller>,
    name: &str,
    path: &str,
    invocation: &str,
    req: Request,
    stderr: &mut Vec<u8>,
    found: &mut Option<String>,
) -> Result<Response, ApiError> {
    // Resolved per request, so that a redeploy switches the next request atomically.
    // Public functions answer anyone; the others only their account (and the admin).
    // Without a key the answer is the same whether the function exists or not.
    let meta = state.invocations.functions.get(state, name).await?;
    let meta = match (meta, caller) {
        (Some(m), _) if m.settings.public => m,
        (Some(m), Some(c)) if c.sees(&m.account) => m,
        (_, Some(_)) => return Err(ApiError::NotFound(format!("function {name:?} not found"))),
        (_, None) => {
            return Err(ApiError::Unauthorized(
                "unauthenticated",
                format!(
                    "function {name:?} needs an API key (send `Authorization: Bearer KEY`), or is not there"
                ),
            ));
        }
    };
    *found = Some(crate::logs::key(&meta.account, name));
    // The owner's account as it is now: disabled, it serves nothing; its quotas and
    // egress policy bound the invocation.
    let owner = match state.auth.account(&meta.account).await? {
        Some(a) if !a.disabled => a,
        _ => {
            return Err(ApiError::Forbidden(
                "account_disabled",
                format!("function {name:?} belongs to a disabled account"),
            ));
        }
    };
    let limits = state.auth.limits(&owner);
    let config = state.invocations.config();
    // Bounded by the account's quotas, whatever the function's settings say.
    let timeout_ms = or_default(meta.settings.timeout_ms, config.timeout.as_millis() as u64)
        .min(limits.max_timeout_ms.unwrap_or(u64::MAX));
    let memory_bytes = or_default(meta.settings.memory_mb << 20, config.memory_bytes)
        .min(limits.max_memory_mb.map_or(u64::MAX, |m| m << 20));
    let run = Run { timeout: Duration::from_millis(timeout_ms), memory_bytes };
    if meta.kind == FunctionKind::Http {
        let (parts, body) = req.into_parts();
        let body = read_head(body, config.body_timeout).await?;
        let admitted = admit(state, name, &meta, &limits)?;
        let req = Request::from_parts(parts, body);
        return proxy::invoke_proxy(
            state, &meta, &owner, name, path, invocation, req, run, admitted,
        )
        .await;
    }
    cgi::invoke_cgi(state, &meta, name, path, invocation, req, run, &limits, stderr).await
}

/// The limits one invocation runs under.
struct Run {
    timeout: Duration,
    memory_bytes: u64,
}

/// The function's settings env, its secrets (its account's) opened. A secret deleted
/// since the settings named it fails the invocation rather than run without it.
async fn function_env(
    state: &AppState,
    meta: &FunctionMeta,
) -> Result<Vec<(String, String)>, ApiError> {
    use cloudpipe_runtime::secrets::SecretError;
    match state.runtime.secrets.resolve(&meta.account, &meta.settings.env).await {
        Ok(env) => Ok(env),
        Err(SecretError::NotFound(s)) => Err(ApiError::FunctionFailed(format!(
            "the function's settings name secret {s:?}, which its account no longer has"
        ))),
        Err(e) => Err(e.into()),
    }
}
