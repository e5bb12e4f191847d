//! wasi:http proxy components: the request handed over and the response streamed
//! back, both ways as they come.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use cloudpipe_runtime::egress::Egress;
use cloudpipe_runtime::executor::wasm::{HttpOptions, InvokeError};
use cloudpipe_runtime::store::FunctionMeta;

use super::{Admitted, Run, function_env};
use crate::logs::StderrLines;
use crate::{ApiError, AppState};

/// Hands the request to a wasi:http proxy function, streaming both ways. The function
/// sees the path below its mount point (`/fn/hello/echo?x=1` arrives as `/echo?x=1`,
/// the full path in `x-cloudpipe-original-path`), so a component written for
/// `wasmtime serve` runs unchanged. Its outgoing requests go where its
/// `allowed_outbound_hosts`, its account's egress policy and the server's settings
/// all allow ([`cloudpipe_runtime::egress`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn invoke_proxy(
    state: &AppState,
    meta: &FunctionMeta,
    owner: &cloudpipe_runtime::account::AccountRecord,
    name: &str,
    path: &str,
    invocation: &str,
    req: Request,
    run: Run,
    permits: Admitted,
) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let original = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let inner = match parts.uri.query() {
        Some(q) => format!("/{path}?{q}"),
        None => format!("/{path}"),
    };
    parts.uri = inner
        .parse()
        .map_err(|_| ApiError::bad("invalid_path", "the request path is not a valid URI"))?;
    if let Ok(v) = HeaderValue::from_str(&original) {
        parts.headers.insert(ORIGINAL_PATH_HEADER, v);
    }
    // Credentials stay with the server: a function never sees the caller's key.
    parts.headers.remove(header::AUTHORIZATION);
    let settings = &meta.settings;
    let env: Vec<(String, String)> = function_env(state, meta)
        .await?
        .into_iter()
        .chain([
            ("CLOUDPIPE_FUNCTION".to_string(), name.to_string()),
            ("CLOUDPIPE_INVOCATION_ID".to_string(), invocation.to_string()),
        ])
        .collect();
    let opts = HttpOptions {
        timeout: run.timeout,
        memory_bytes: run.memory_bytes,
        env: env.into(),
        outbound: Egress::for_function(
            &settings.allowed_outbound_hosts,
            &owner.egress(),
            state.runtime.egress.clone(),
        ),
        stderr: Arc::new(StderrLines::new(
            state.logs.clone(),
            &crate::logs::key(&meta.account, name),
            invocation,
        )),
        cancel: state.runtime.scheduler.stopping().child_token(),
        ..HttpOptions::default()
    };
    let req = Request::from_parts(parts, body);
    let failed = |what: &str| {
        ApiError::FunctionFailed(format!(
            "function {name:?} {what} (invocation {invocation}; see its logs)"
        ))
    };
    match state.runtime.executor.handle_http(&meta.id, req, opts).await {
        Ok(res) => Ok(res.map(|body| {
            // The limits hold until the response body has streamed out: the permits
            // live in the body and drop with it.
            Body::new(http_body_util::BodyExt::map_err(body, move |e| {
                let _held = &permits;
                e
            }))
        })),
        Err(InvokeError::Timeout { .. }) => {
            Err(ApiError::Timeout(format!("function {name:?} timed out (invocation {invocation})")))
        }
        Err(InvokeError::NotFound(_)) => {
            Err(ApiError::NotFound(format!("function {name:?} not found")))
        }
        Err(InvokeError::Trap(_)) => Err(failed("trapped")),
        Err(InvokeError::MemoryLimit(_)) => Err(failed("went over its memory limit")),
        Err(InvokeError::NoResponse(_)) => Err(failed("gave no response")),
        Err(InvokeError::Cancelled) => {
            Err(ApiError::Unavailable("the server is shutting down".into()))
        }
        Err(InvokeError::Busy(_)) => {
            Err(ApiError::Unavailable("the server has no room for another instance now".into()))
        }
        Err(e @ (InvokeError::NotHttp { .. } | InvokeError::Internal(_))) => {
            Err(ApiError::Internal(e.into()))
        }
    }
}

/// The request header carrying the full original path to a wasi:http function.
pub const ORIGINAL_PATH_HEADER: &str = "x-cloudpipe-original-path";
