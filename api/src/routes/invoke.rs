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

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use cloudpipe_runtime::account::Scope;
use cloudpipe_runtime::egress::Egress;
use cloudpipe_runtime::executor::wasm::{HttpOptions, InvokeError};
use cloudpipe_runtime::executor::{Executor, NoLiveOutput, RunRequest};
use cloudpipe_runtime::store::FunctionMeta;
use cloudpipe_runtime::{JobId, JobOutcome};
use cloudpipe_types::{FunctionKind, JobStatus, LogList};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{Caller, ClientAddr, MaybeCaller};
use crate::extract::{Path, Query};
use crate::logs::StderrLines;
use crate::{ApiError, AppState, read_body};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/fn/{name}", any(invoke_function))
        .route("/fn/{name}/", any(invoke_function))
        .route("/fn/{name}/{*path}", any(invoke_function_path))
        .route("/v1/functions/{name}/logs", get(get_function_logs))
}

/// Limits of HTTP invocation; plain data.
#[derive(Debug, Clone)]
pub struct InvokeConfig {
    /// Invocations of one function running at once; past it, 503 with Retry-After.
    pub max_concurrency_per_function: usize,
    /// Invocations of all functions running at once.
    pub max_concurrency: usize,
    pub timeout: Duration,
    pub memory_bytes: u64,
    /// Largest request body, in bytes (CGI bodies are read whole to become stdin).
    pub max_request_body: usize,
    /// Largest CGI response (stdout), in bytes.
    pub max_response_body: usize,
    /// Invocations of one account's functions running at once (its share of
    /// `max_concurrency`); the account's `max_concurrent_jobs` quota may lower it.
    pub max_concurrency_per_account: usize,
    /// How long a client has to send the request body (a CGI body whole, the first
    /// [`STREAM_HEAD`] bytes of a streamed one) before the request is refused with
    /// 408; no slot is held meanwhile.
    pub body_timeout: Duration,
}

/// The part of a wasi:http function's request body read before it takes a slot; the
/// rest streams to the guest as it arrives.
pub const STREAM_HEAD: usize = 1 << 20;

impl Default for InvokeConfig {
    fn default() -> Self {
        InvokeConfig {
            max_concurrency_per_function: 64,
            max_concurrency: 192,
            timeout: Duration::from_secs(30),
            memory_bytes: 128 << 20,
            max_request_body: 16 << 20,
            max_response_body: 16 << 20,
            max_concurrency_per_account: 96,
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// Functions as `/fn/{name}` resolves them (by name or id, in every account), kept in
/// memory so that an invocation reads no disk. Filled on first use; the functions
/// routes invalidate a name after an upload, a settings change or a delete and before
/// answering (and a node of a cluster does when told of a change elsewhere). Names
/// that resolve to nothing are not remembered: any URL must not grow memory.
#[derive(Default)]
pub struct FunctionCache {
    /// Bumped by every invalidation: a lookup that began before one is not cached.
    inner: RwLock<(u64, HashMap<String, Arc<FunctionMeta>>)>,
}

/// Entries the function cache holds before it starts again empty.
const MAX_CACHED_FUNCTIONS: usize = 10_000;

impl FunctionCache {
    async fn get(&self, state: &AppState, name: &str) -> anyhow::Result<Option<Arc<FunctionMeta>>> {
        let generation = {
            let cached = self.inner.read().unwrap();
            if let Some(meta) = cached.1.get(name) {
                return Ok(Some(meta.clone()));
            }
            cached.0
        };
        let Some(meta) = state.runtime.registry.get(&Scope::All, name).await? else {
            return Ok(None);
        };
        let meta = Arc::new(meta);
        let mut cached = self.inner.write().unwrap();
        if cached.0 == generation {
            if cached.1.len() >= MAX_CACHED_FUNCTIONS {
                cached.1.clear();
            }
            cached.1.insert(name.to_string(), meta.clone());
        }
        Ok(Some(meta))
    }

    /// Forgets what `name` resolved to.
    pub fn invalidate(&self, name: &str) {
        let mut cached = self.inner.write().unwrap();
        cached.0 += 1;
        cached.1.remove(name);
    }

    /// Forgets every function (a version deleted by id may have had several names).
    pub fn invalidate_all(&self) {
        let mut cached = self.inner.write().unwrap();
        cached.0 += 1;
        cached.1.clear();
    }
}

/// Admission of invocations: a global limit, one per account and one per function.
/// One per process.
pub struct Invocations {
    config: InvokeConfig,
    /// What `/fn/{name}` resolves to.
    pub functions: FunctionCache,
    all: Arc<Semaphore>,
    /// Invocations answered since start, by class of status (2xx, 4xx, 5xx, ...).
    pub answered: [std::sync::atomic::AtomicU64; 6],
    /// Each function's limit and its semaphore.
    per_function: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    /// Each account's limit and its semaphore.
    per_account: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

/// The slots of one running invocation, given back when it is dropped (for a
/// streamed response: when its body has gone out).
pub struct Admitted {
    _function: OwnedSemaphorePermit,
    _account: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

/// The semaphore of `key` in `map` for `limit`; a changed limit gets a new one (the
/// invocations running under the old one finish under it).
fn semaphore(
    map: &Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    key: &str,
    limit: usize,
) -> Arc<Semaphore> {
    let mut map = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let entry =
        map.entry(key.to_string()).or_insert_with(|| (limit, Arc::new(Semaphore::new(limit))));
    if entry.0 != limit {
        *entry = (limit, Arc::new(Semaphore::new(limit)));
    }
    entry.1.clone()
}

impl Invocations {
    pub fn new(config: InvokeConfig) -> Invocations {
        Invocations {
            all: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            per_function: Mutex::new(HashMap::new()),
            per_account: Mutex::new(HashMap::new()),
            functions: FunctionCache::default(),
            answered: Default::default(),
            config,
        }
    }

    pub fn config(&self) -> &InvokeConfig {
        &self.config
    }

    /// The three slots, or the error answer when a limit is reached (503 for the
    /// function's and the server's, 429 for the account's). `limit` is the
    /// function's own (0: the server's default); `account_quota` the account's
    /// `max_concurrent_jobs`. A changed limit takes effect for new invocations at once.
    fn admit(
        &self,
        function: &str,
        limit: u32,
        account: &str,
        account_quota: Option<u64>,
    ) -> Result<Admitted, ApiError> {
        let limit = match limit {
            0 => self.config.max_concurrency_per_function.max(1),
            n => n as usize,
        };
        let share = self.config.max_concurrency_per_account.max(1);
        let account_limit = account_quota
            .map_or(share, |q| share.min(usize::try_from(q).unwrap_or(usize::MAX)))
            .max(1);
        let one =
            semaphore(&self.per_function, function, limit).try_acquire_owned().map_err(|_| {
                ApiError::Unavailable(format!(
                    "function {function:?} is at its concurrency limit; retry shortly"
                ))
            })?;
        let mine =
            semaphore(&self.per_account, account, account_limit).try_acquire_owned().map_err(
                |_| {
                    ApiError::QuotaExceeded(format!(
                        "account {account:?} has {account_limit} invocations running, its limit; retry shortly"
                    ))
                },
            )?;
        let all = self.all.clone().try_acquire_owned().map_err(|_| {
            ApiError::Unavailable("the server is at its invocation limit; retry shortly".into())
        })?;
        Ok(Admitted { _function: one, _account: mine, _all: all })
    }
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
    let rt = &state.runtime;
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
        return proxy(state, &meta, &owner, name, path, invocation, req, run, admitted).await;
    }
    let cgi = cgi_env(name, path, &req);
    // The function's own variables, then the request's (which win).
    let mut env: Vec<(String, String)> = function_env(state, &meta)
        .await?
        .into_iter()
        .filter(|(k, _)| !cgi.iter().any(|(c, _)| c == k))
        .collect();
    env.extend(cgi);
    let body = tokio::time::timeout(
        config.body_timeout,
        read_body(req.into_body(), config.max_request_body),
    )
    .await
    .map_err(|_| body_timeout(config.body_timeout))??;
    let _admitted = admit(state, name, &meta, &limits)?;
    let outcome = rt
        .executor
        .run(
            RunRequest {
                job_id: invocation.to_string(),
                function: name.to_string(),
                function_id: meta.id.clone(),
                args: Vec::new(),
                env,
                stdin: body,
                attempt: 1,
                timeout: run.timeout,
                memory_bytes: run.memory_bytes,
                output_cap: config.max_response_body,
                ..Default::default()
            },
            Arc::new(NoLiveOutput),
            Default::default(),
        )
        .await;
    *stderr = outcome.stderr.clone();
    cgi_response(&meta, invocation, outcome)
}

/// The limits one invocation runs under.
struct Run {
    timeout: Duration,
    memory_bytes: u64,
}

fn admit(
    state: &AppState,
    name: &str,
    meta: &FunctionMeta,
    limits: &cloudpipe_runtime::account::Limits,
) -> Result<Admitted, ApiError> {
    state.invocations.admit(
        name,
        meta.settings.max_concurrency,
        &meta.account,
        limits.max_concurrent_jobs,
    )
}

fn body_timeout(limit: Duration) -> ApiError {
    ApiError::RequestTimeout(format!(
        "the request body did not arrive within {} ms",
        limit.as_millis()
    ))
}

/// Reads the start of a request body (up to [`STREAM_HEAD`] bytes, all of it if it
/// is smaller) within `limit`, and gives back a body that replays it, then streams
/// the rest. Trailers are kept.
async fn read_head(mut body: Body, limit: Duration) -> Result<Body, ApiError> {
    use http_body_util::BodyExt;
    let mut frames = std::collections::VecDeque::new();
    let read = async {
        let mut size = 0usize;
        while size < STREAM_HEAD {
            match body.frame().await {
                None => return Ok(true),
                Some(Err(e)) => {
                    return Err(ApiError::bad(
                        "bad_body",
                        format!("could not read the request body: {e}"),
                    ));
                }
                Some(Ok(frame)) => {
                    size += frame.data_ref().map_or(0, Bytes::len);
                    frames.push_back(frame);
                }
            }
        }
        Ok(false)
    };
    let ended = tokio::time::timeout(limit, read).await.map_err(|_| body_timeout(limit))??;
    Ok(Body::new(Replay { frames, rest: (!ended).then_some(body) }))
}

/// A request body whose first frames were read already.
struct Replay {
    frames: std::collections::VecDeque<http_body::Frame<Bytes>>,
    rest: Option<Body>,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Some(frame) = self.frames.pop_front() {
            return std::task::Poll::Ready(Some(Ok(frame)));
        }
        match self.rest.as_mut() {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|b| b.is_end_stream())
    }
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

/// Hands the request to a wasi:http proxy function, streaming both ways. The function
/// sees the path below its mount point (`/fn/hello/echo?x=1` arrives as `/echo?x=1`,
/// the full path in `x-cloudpipe-original-path`), so a component written for
/// `wasmtime serve` runs unchanged. Its outgoing requests go where its
/// `allowed_outbound_hosts`, its account's egress policy and the server's settings
/// all allow ([`cloudpipe_runtime::egress`]).
#[allow(clippy::too_many_arguments)]
async fn proxy(
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

/// The CGI/1.1 environment of a request (RFC 3875), as WAGI passes it.
fn cgi_env(name: &str, path: &str, req: &Request) -> Vec<(String, String)> {
    let uri = req.uri();
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let (server_name, server_port) = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h.to_string(), p.to_string()),
        _ => (host.to_string(), "80".to_string()),
    };
    let remote = req
        .extensions()
        .get::<ConnectInfo<ClientAddr>>()
        .map(|c| c.0.0.ip().to_string())
        .unwrap_or_default();
    let path_info = if path.is_empty() && !uri.path().ends_with('/') {
        String::new()
    } else {
        format!("/{path}")
    };
    let mut env = vec![
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        ("SERVER_PROTOCOL".into(), format!("{:?}", req.version())),
        ("SERVER_SOFTWARE".into(), concat!("cloudpipe/", env!("CARGO_PKG_VERSION")).into()),
        ("REQUEST_METHOD".into(), req.method().to_string()),
        ("SCRIPT_NAME".into(), format!("/fn/{name}")),
        ("PATH_INFO".into(), path_info),
        ("QUERY_STRING".into(), uri.query().unwrap_or("").to_string()),
        ("REQUEST_URI".into(), uri.path_and_query().map(|p| p.to_string()).unwrap_or_default()),
        ("SERVER_NAME".into(), server_name),
        ("SERVER_PORT".into(), server_port),
        ("REMOTE_ADDR".into(), remote),
    ];
    for (var, h) in
        [("CONTENT_TYPE", header::CONTENT_TYPE), ("CONTENT_LENGTH", header::CONTENT_LENGTH)]
    {
        if let Some(v) = headers.get(&h).and_then(|v| v.to_str().ok()) {
            env.push((var.into(), v.to_string()));
        }
    }
    for (k, v) in headers {
        // Credentials stay with the server: a function never sees the caller's key.
        if k == header::AUTHORIZATION || k == header::CONTENT_TYPE || k == header::CONTENT_LENGTH {
            continue;
        }
        if let Ok(v) = v.to_str() {
            env.push((
                format!("HTTP_{}", k.as_str().to_ascii_uppercase().replace('-', "_")),
                v.to_string(),
            ));
        }
    }
    env
}

/// Turns a CGI function's outcome into the response.
fn cgi_response(
    meta: &FunctionMeta,
    invocation: &str,
    outcome: JobOutcome,
) -> Result<Response, ApiError> {
    let failed = |what: String| {
        ApiError::FunctionFailed(format!(
            "function {:?} {what} (invocation {invocation}; see its logs)",
            meta_name(meta)
        ))
    };
    if outcome.is_busy() {
        return Err(ApiError::Unavailable(
            "the server has no room for another instance now".into(),
        ));
    }
    match outcome.status {
        JobStatus::Succeeded => {}
        JobStatus::TimedOut => {
            return Err(ApiError::Timeout(format!(
                "function {:?} timed out (invocation {invocation})",
                meta_name(meta)
            )));
        }
        _ => {
            let why = match (&outcome.error, outcome.exit_code) {
                (Some(e), _) if e.kind == "exit" => {
                    format!("exited with code {}", outcome.exit_code.unwrap_or(1))
                }
                (Some(e), _) => format!("failed ({})", e.kind),
                (None, Some(c)) => format!("exited with code {c}"),
                (None, None) => "failed".into(),
            };
            return Err(failed(why));
        }
    }
    if outcome.stdout_truncated {
        return Err(failed("wrote a response over the size limit".into()));
    }
    let (status, headers, body) =
        parse_cgi_output(outcome.stdout).map_err(|e| failed(format!("wrote {e}")))?;
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    Ok(res)
}

fn meta_name(meta: &FunctionMeta) -> &str {
    meta.name.as_deref().unwrap_or(&meta.id)
}

/// Splits CGI output into status, headers and body. Output that does not open with a
/// header line is all body, `200 text/plain`.
fn parse_cgi_output(stdout: Vec<u8>) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let stdout = Bytes::from(stdout);
    let plain = |body: Bytes| {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        Ok((StatusCode::OK, h, body))
    };
    // The header block ends at the first empty line.
    let Some((head_len, sep_len)) = header_end(&stdout) else { return plain(stdout) };
    let head = &stdout[..head_len];
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    if !looks_like_header(first) {
        return plain(stdout);
    }
    let mut headers = HeaderMap::new();
    let mut status = None;
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text =
            std::str::from_utf8(line).map_err(|_| "CGI headers that are not UTF-8".to_string())?;
        let (k, v) =
            text.split_once(':').ok_or_else(|| format!("a malformed CGI header line {text:?}"))?;
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            let code = v.split_whitespace().next().and_then(|c| c.parse::<u16>().ok());
            status = Some(
                code.and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| format!("a bad CGI Status {v:?}"))?,
            );
            continue;
        }
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| format!("a bad CGI header name {k:?}"))?;
        if is_hop_by_hop(&name) {
            continue;
        }
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("a bad value for CGI header {k:?}"))?;
        headers.append(name, value);
    }
    let status = status.unwrap_or(if headers.contains_key(header::LOCATION) {
        StatusCode::FOUND
    } else {
        StatusCode::OK
    });
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    }
    Ok((status, headers, stdout.slice(head_len + sep_len..)))
}

/// Where the header block ends: (its length, the length of the blank line after it).
fn header_end(out: &[u8]) -> Option<(usize, usize)> {
    // Headers are small; a blank line far into the output is body text.
    let window = &out[..out.len().min(64 << 10)];
    let lf = window.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = window.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn looks_like_header(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else { return false };
    colon > 0 && line[..colon].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    /// `1` or `true`: keep the stream open and send new lines as server-sent events.
    follow: Option<String>,
}

/// A function's recent log: its stderr lines and one access record per invocation.
#[utoipa::path(get, path = "/v1/functions/{name}/logs", tag = "functions", params(("name" = String, Path), LogParams),
    responses((status = 200, body = LogList), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_function_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(p): Query<LogParams>,
) -> Result<Response, ApiError> {
    let Some(meta) = state.runtime.registry.get(&caller.scope(), &name).await? else {
        return Err(ApiError::NotFound(format!("function {name:?} not found")));
    };
    let (lines, live) = state.logs.snapshot(&crate::logs::key(&meta.account, &name));
    let follow = matches!(p.follow.as_deref(), Some("1") | Some("true"));
    if !follow {
        return Ok(Json(LogList { lines }).into_response());
    }
    let stopping = state.runtime.scheduler.stopping().clone();
    Ok(Sse::new(follow_stream(lines, live, stopping))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn follow_stream(
    lines: Vec<cloudpipe_types::LogLine>,
    mut live: tokio::sync::broadcast::Receiver<cloudpipe_types::LogLine>,
    stopping: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let event = |l: &cloudpipe_types::LogLine| {
        Event::default().event("log").json_data(l).unwrap_or_default()
    };
    let first: Vec<_> = lines.iter().map(event).map(Ok).collect();
    let rest = super::task_stream(move |tx| async move {
        loop {
            let next = tokio::select! {
                next = live.recv() => next,
                _ = tx.closed() => return,
                _ = stopping.cancelled() => return,
            };
            match next {
                Ok(l) => {
                    if tx.send(event(&l)).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let note = Event::default().event("lagged").data(n.to_string());
                    if tx.send(note).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    futures::StreamExt::chain(futures::stream::iter(first), rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_without_headers_is_plain_text() {
        let (st, h, body) =
            parse_cgi_output(b"hello: world is not a header block".to_vec()).unwrap();
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(&body[..], b"hello: world is not a header block");
        let (_, _, body) = parse_cgi_output(b"just text\n\nwith a blank line".to_vec()).unwrap();
        assert_eq!(&body[..], b"just text\n\nwith a blank line");
    }

    #[test]
    fn cgi_headers_status_and_location_are_parsed() {
        let out =
            b"Content-Type: application/json\r\nStatus: 201 Created\r\nX-A: 1\r\nX-A: 2\r\n\r\n{}"
                .to_vec();
        let (st, h, body) = parse_cgi_output(out).unwrap();
        assert_eq!(st, StatusCode::CREATED);
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert_eq!(&body[..], b"{}");
        let (st, h, body) = parse_cgi_output(b"Location: /elsewhere\n\n".to_vec()).unwrap();
        assert_eq!(st, StatusCode::FOUND);
        assert_eq!(h[header::LOCATION], "/elsewhere");
        assert!(body.is_empty());
    }

    #[test]
    fn bad_cgi_headers_are_errors_not_panics() {
        for bad in
            [&b"Status: banana\n\nx"[..], b"Content-Type: a\nno colon here\n\n", b"X-Bad: \x01\n\n"]
        {
            assert!(parse_cgi_output(bad.to_vec()).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // Hop-by-hop headers from the guest are dropped.
        let (_, h, _) =
            parse_cgi_output(b"Transfer-Encoding: chunked\nX-Ok: y\n\nbody".to_vec()).unwrap();
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h["x-ok"], "y");
    }
}
