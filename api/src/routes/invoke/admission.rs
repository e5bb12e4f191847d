//! Admission of invocations: the limits ([`InvokeConfig`]), the slots
//! ([`Invocations`]) and reading the request body before a slot is taken.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use cloudpipe_runtime::store::FunctionMeta;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::FunctionCache;
use crate::{ApiError, AppState};

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

pub(super) fn admit(
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

pub(super) fn body_timeout(limit: Duration) -> ApiError {
    ApiError::RequestTimeout(format!(
        "the request body did not arrive within {} ms",
        limit.as_millis()
    ))
}

/// Reads the start of a request body (up to [`STREAM_HEAD`] bytes, all of it if it
/// is smaller) within `limit`, and gives back a body that replays it, then streams
/// the rest. Trailers are kept.
pub(super) async fn read_head(mut body: Body, limit: Duration) -> Result<Body, ApiError> {
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
