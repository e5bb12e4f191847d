//! wasi:http proxies: [`WasmExecutor::handle_http`] gives one request to a component
//! exporting `wasi:http/incoming-handler` and streams its response back.
//!
//! # Cost of a request
//! Like a job: a new `Store` and an instantiation from the warm `ProxyPre`, on the
//! caller's task. The guest keeps running after it has sent the response head (it
//! writes the body while the caller streams it out), so its future moves into the
//! response body, which polls it beside the body's frames: no task of its own, no
//! wake-up across threads, and the request is served where its connection is (a task
//! per guest put a second thread, and its scheduling, on every request's path: the
//! p99 was several times the median under load). Bodies are never buffered whole: the
//! request body is read by the guest as it arrives, the response body is handed to the
//! caller one write (at most 1 MiB) at a time. A long body (past [`INLINE_BODY`]) moves
//! its guest to a task of its own, so that producing and sending overlap on two cores.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cloudpipe_types::FunctionKind;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::runtime::AbortOnDropJoinHandle;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme as WasiScheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::guest::{self, GuestState, Limiter, Stop};
use super::outbound::Outbound;
use super::output::CappedOutput;
use super::{Ended, Ran, Ready, WasmExecutor, bytes_text, ended};
use crate::egress::Egress;
use crate::executor::{NoLiveOutput, OutputSink, OutputStream};

/// A response body as [`WasmExecutor::handle_http`] gives it: streamed from the guest
/// as it writes. It ends with an [`InvokeError`] (never silently short) when the guest
/// traps, runs out of time or aborts the body after the response head was sent.
pub type ResponseBody = UnsyncBoxBody<Bytes, InvokeError>;

/// The limits and context of one HTTP invocation.
#[derive(Clone)]
pub struct HttpOptions {
    /// Wall-clock limit of the whole invocation: the handler and the streaming of the
    /// response body.
    pub timeout: Duration,
    /// Cap on the guest's memory, in bytes.
    pub memory_bytes: u64,
    /// The guest's environment. An `Arc` so that a function's settings are shared by
    /// its requests, not copied for each.
    pub env: Arc<[(String, String)]>,
    /// Where the guest's outgoing `wasi:http` requests may go: the function's
    /// `allowed_outbound_hosts` within its account's egress policy and the operator's
    /// settings. The default: nowhere.
    pub outbound: Egress,
    /// Receives the guest's stderr and stdout as written, up to `output_cap` bytes
    /// each per request (the rest is dropped).
    pub stderr: Arc<dyn OutputSink>,
    pub output_cap: usize,
    /// Stops the guest when cancelled (e.g. at shutdown).
    pub cancel: CancellationToken,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            timeout: Duration::from_secs(30),
            memory_bytes: 128 << 20,
            env: Arc::new([]),
            outbound: Egress::default(),
            stderr: Arc::new(NoLiveOutput),
            output_cap: 64 << 10,
            cancel: CancellationToken::new(),
        }
    }
}

impl std::fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOptions")
            .field("timeout", &self.timeout)
            .field("memory_bytes", &self.memory_bytes)
            .field("env", &self.env)
            .field("outbound", &self.outbound)
            .field("output_cap", &self.output_cap)
            .finish_non_exhaustive()
    }
}

/// Why an HTTP invocation gave no (complete) response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// No function with this id in the store.
    #[error("function {0} is not in the store")]
    NotFound(String),
    /// The function is a command or a module: it is invoked through CGI, not here.
    #[error("function {id} is a {} function, not an http one", kind.as_str())]
    NotHttp { id: String, kind: FunctionKind },
    #[error("time limit of {} ms reached", limit.as_millis())]
    Timeout { limit: Duration },
    /// The guest trapped (a panic, an `unreachable`, ...), or exited.
    #[error("{0}")]
    Trap(String),
    /// The guest failed after a memory growth past its cap was refused.
    #[error("{0}")]
    MemoryLimit(String),
    /// The handler returned, or set an error code, without a response.
    #[error("{0}")]
    NoResponse(String),
    #[error("cancelled")]
    Cancelled,
    /// The instance pool had no room: try again shortly.
    #[error("{0}")]
    Busy(String),
    /// Our side failed (loading the function, ...).
    #[error("{0}")]
    Internal(String),
}

impl WasmExecutor {
    /// Runs once per HTTP request to an [`FunctionKind::Http`] function: instantiates
    /// it from its warm `ProxyPre` (loading it first if it went cold) and calls its
    /// `wasi:http/incoming-handler`. Returns once the guest has sent the response
    /// head; the body then streams as the guest writes it, within `opts.timeout`
    /// counted from the call. The guest runs as part of the returned future and then
    /// of the response body: whoever polls them (the connection's task) runs it.
    ///
    /// The guest sees `req`'s method, headers, body and URI. A URI without authority
    /// (the usual server-side `/path?query`) gets the `Host` header's (else
    /// `localhost`) and scheme `http`, as `wasmtime serve` does.
    pub async fn handle_http<B>(
        &self,
        function_id: &str,
        req: http::Request<B>,
        opts: HttpOptions,
    ) -> Result<http::Response<ResponseBody>, InvokeError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let ready = match self.ready(function_id).await {
            Ok(Some(ready)) => ready,
            Ok(None) => return Err(InvokeError::NotFound(function_id.to_string())),
            Err(e) => {
                return Err(InvokeError::Internal(format!(
                    "loading function {function_id}: {e:#}"
                )));
            }
        };
        if !matches!(*ready, Ready::Http(_)) {
            return Err(InvokeError::NotHttp { id: function_id.to_string(), kind: ready.kind() });
        }
        if opts.cancel.is_cancelled() {
            return Err(InvokeError::Cancelled);
        }
        let (scheme, req) = with_authority(req)?;
        let req = req.map(|body| {
            body.map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.into().to_string())))
        });

        let timeout = opts.timeout;
        let deadline = Instant::now() + timeout;
        let memory_cap = opts.memory_bytes.min(self.config.max_memory_bytes);
        let state = ProxyState::new(&opts, memory_cap);
        let engine = self.compiler.engine.clone();
        let cancel = opts.cancel;
        let (sender, receiver) = tokio::sync::oneshot::channel();

        let guest: GuestFuture = Box::pin(async move {
            let Ready::Http(pre) = &*ready else { unreachable!("checked above") };
            let guest = async {
                let mut store = guest::new_store(&engine, state, deadline, cancel.clone());
                let mut http = store.data_mut().http();
                let resources = http
                    .new_incoming_request(scheme, req)
                    .and_then(|req| Ok((req, http.new_response_outparam(sender)?)));
                let ran = match resources {
                    Ok((req, out)) => match pre.instantiate_async(&mut store).await {
                        Ok(proxy) => Ran::Called(
                            proxy
                                .wasi_http_incoming_handler()
                                .call_handle(&mut store, req, out)
                                .await
                                .map(|()| true),
                        ),
                        Err(e) => Ran::NotInstantiated(e),
                    },
                    Err(e) => {
                        return Ended::Internal(format!("passing the request to the guest: {e:#}"));
                    }
                };
                ended(ran, store.data_mut())
            };
            // The epoch callback stops a guest that runs wasm; these stop one that
            // waits in a host call (reading the request body, an outbound request).
            tokio::select! {
                biased;
                ended = guest => ended,
                () = cancel.cancelled() => Ended::Stopped(Stop::Cancelled),
                () = tokio::time::sleep_until(deadline.into()) => Ended::Stopped(Stop::Timeout),
            }
        });

        // Runs the guest until it sends the response head (or ends without one). A
        // short handler usually sends its head, writes its body and returns within one
        // poll: then both are known at once.
        let mut guest = Guest::Running(guest);
        let mut receiver = receiver;
        let head = poll_fn(|cx| {
            if let Poll::Ready(head) = Pin::new(&mut receiver).poll(cx) {
                return Poll::Ready(head.ok());
            }
            if let Guest::Running(running) = &mut guest {
                let ended = ready!(running.as_mut().poll(cx));
                guest = Guest::Ended(ended);
            }
            // Sent during that last poll, or never (the guest's store, and with it the
            // sender, is gone once the guest ended).
            Poll::Ready(receiver.try_recv().ok())
        })
        .await;
        let fail = |ended| failure(ended, timeout, memory_cap);
        match head {
            Some(Ok(response)) => Ok(response.map(|body| {
                GuestBody { body, body_ended: None, guest, streamed: Some(0), timeout, memory_cap }
                    .boxed_unsync()
            })),
            Some(Err(code)) => Err(InvokeError::NoResponse(format!(
                "the handler answered with error code {}",
                error_code_text(&code)
            ))),
            // The guest dropped its response-outparam unset: it trapped, timed out, or
            // returned without answering.
            None => Err(fail(guest.finish().await).unwrap_or_else(|| {
                InvokeError::NoResponse("the handler returned without setting a response".into())
            })),
        }
    }
}

/// Bytes of a response body sent while its guest runs in the caller's task; past
/// them the guest moves to a task of its own.
const INLINE_BODY: usize = 256 << 10;

/// A guest's whole run: instantiation, the handler call and its teardown.
type GuestFuture = Pin<Box<dyn Future<Output = Ended> + Send>>;

/// A guest still running, or how it ended (taken once reported).
enum Guest {
    Running(GuestFuture),
    Ended(Ended),
    Reported,
}

impl Guest {
    /// Runs the guest to its end (it may still be running when its response-outparam
    /// was dropped unset).
    async fn finish(self) -> Ended {
        match self {
            Guest::Running(running) => running.await,
            Guest::Ended(ended) => ended,
            Guest::Reported => Ended::Internal("the guest's outcome was already taken".into()),
        }
    }
}

/// Gives a server-side request (`/path?query`) the scheme and authority that
/// `wasi:http` requires: its `Host` header's, else `localhost`.
fn with_authority<B>(req: http::Request<B>) -> Result<(WasiScheme, http::Request<B>), InvokeError> {
    let (mut parts, body) = req.into_parts();
    let scheme = match parts.uri.scheme() {
        Some(s) if *s == Scheme::HTTPS => WasiScheme::Https,
        _ => WasiScheme::Http,
    };
    if parts.uri.authority().is_none() {
        let authority = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<Authority>().ok())
            .unwrap_or_else(|| Authority::from_static("localhost"));
        let path = parts.uri.path_and_query().cloned().unwrap_or(PathAndQuery::from_static("/"));
        parts.uri = http::Uri::builder()
            .scheme(if matches!(scheme, WasiScheme::Https) { Scheme::HTTPS } else { Scheme::HTTP })
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|e| InvokeError::Internal(format!("rebuilding the request URI: {e}")))?;
    }
    Ok((scheme, http::Request::from_parts(parts, body)))
}

/// The error of a guest that ended as `ended`; `None` if it returned normally.
fn failure(ended: Ended, limit: Duration, memory_cap: u64) -> Option<InvokeError> {
    Some(match ended {
        Ended::Exit(0) => return None,
        Ended::Exit(code) => InvokeError::Trap(format!("the guest exited with code {code}")),
        Ended::Trap(message) => InvokeError::Trap(message),
        Ended::MemoryLimit { desired, .. } => InvokeError::MemoryLimit(format!(
            "memory limit of {} reached: the guest asked to grow its memory to {}",
            bytes_text(memory_cap),
            bytes_text(desired as u64)
        )),
        Ended::Stopped(Stop::Timeout) => InvokeError::Timeout { limit },
        Ended::Stopped(Stop::Cancelled) => InvokeError::Cancelled,
        Ended::Busy(message) => InvokeError::Busy(message),
        Ended::Internal(message) => InvokeError::Internal(message),
        Ended::NotRunnable => InvokeError::Internal("not an http function".into()),
    })
}

fn error_code_text(code: &ErrorCode) -> String {
    format!("{code:?}")
}

/// The guest's response body, checked at its end against how the guest ended; it
/// also runs the guest (see the module docs).
///
/// wasmtime-wasi-http ends a body cleanly when its writer is dropped unfinished (the
/// guest trapped or was stopped mid-body), which would pass a truncated chunked
/// response for a whole one. So at the body's end this runs the guest until its call
/// returns (a guest returns right after finishing its body) and ends with an error
/// unless it returned normally. Dropping the body early (the client went away) drops
/// the guest, which stops it.
struct GuestBody {
    body: HyperOutgoingBody,
    /// Set once `body` has ended: `Some(why)` if the guest aborted it.
    body_ended: Option<Option<String>>,
    guest: Guest,
    /// Bytes handed out so far; `None` once the guest moved to a task of its own.
    streamed: Option<usize>,
    timeout: Duration,
    memory_cap: u64,
}

impl Body for GuestBody {
    type Data = Bytes;
    type Error = InvokeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, InvokeError>>> {
        let this = self.get_mut();
        if matches!(this.guest, Guest::Reported) {
            return Poll::Ready(None);
        }
        // A long body: the guest gets a task of its own, so that it produces the next
        // chunks on one core while this one sends the last (a short answer never
        // pays for a task).
        if this.streamed.is_some_and(|n| n > INLINE_BODY)
            && let Guest::Running(running) = &mut this.guest
        {
            let inline = std::mem::replace(running, Box::pin(std::future::pending()));
            *running = Box::pin(AbortOnDropJoinHandle::from(tokio::spawn(inline)));
            this.streamed = None;
        }
        // First let the guest write (or finish), then take what it wrote.
        if let Guest::Running(running) = &mut this.guest
            && let Poll::Ready(ended) = running.as_mut().poll(cx)
        {
            this.guest = Guest::Ended(ended);
        }
        if this.body_ended.is_none() {
            this.body_ended = Some(match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let len = frame.data_ref().map_or(0, Bytes::len);
                    this.streamed = this.streamed.map(|n| n.saturating_add(len));
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Err(e)) => Some(e.to_string()),
                None => None,
            });
        }
        // The body is over; the guest's outcome decides whether it is whole. A guest
        // still running was polled above: it wakes this task when it ends.
        let ended = match std::mem::replace(&mut this.guest, Guest::Reported) {
            Guest::Ended(ended) => ended,
            running @ Guest::Running(_) => {
                this.guest = running;
                return Poll::Pending;
            }
            Guest::Reported => return Poll::Ready(None),
        };
        let aborted = this.body_ended.take().flatten();
        Poll::Ready(match (failure(ended, this.timeout, this.memory_cap), aborted) {
            (Some(error), _) => Some(Err(error)),
            (None, Some(e)) => Some(Err(InvokeError::NoResponse(format!(
                "the guest aborted its response body: {e}"
            )))),
            (None, None) => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.guest, Guest::Reported)
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Store state of one HTTP invocation.
pub(super) struct ProxyState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: Outbound,
    limiter: Limiter,
    stop: Option<Stop>,
}

impl ProxyState {
    /// Nothing inherited from the host: the function's env, stdout and stderr to the
    /// sink, no sockets (outbound HTTP goes through `wasi:http` and [`Outbound`]).
    fn new(opts: &HttpOptions, memory_cap: u64) -> ProxyState {
        let stdout = CappedOutput::new(OutputStream::Stdout, opts.output_cap, opts.stderr.clone());
        let stderr = CappedOutput::new(OutputStream::Stderr, opts.output_cap, opts.stderr.clone());
        let mut b = WasiCtxBuilder::new();
        b.stdout(stdout)
            .stderr(stderr)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (k, v) in opts.env.iter() {
            b.env(k, v);
        }
        ProxyState {
            wasi: b.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            outbound: Outbound { egress: opts.outbound.clone() },
            limiter: Limiter::new(usize::try_from(memory_cap).unwrap_or(usize::MAX)),
            stop: None,
        }
    }
}

impl WasiView for ProxyState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for ProxyState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

impl GuestState for ProxyState {
    fn limiter(&mut self) -> &mut Limiter {
        &mut self.limiter
    }
    fn stop(&mut self) -> &mut Option<Stop> {
        &mut self.stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_requests_get_the_host_header_as_authority() {
        let req = http::Request::builder()
            .uri("/echo?x=1")
            .header("host", "example.com:8080")
            .body(())
            .unwrap();
        let (scheme, req) = with_authority(req).unwrap();
        assert!(matches!(scheme, WasiScheme::Http));
        assert_eq!(req.uri().to_string(), "http://example.com:8080/echo?x=1");
        let (_, req) = with_authority(http::Request::new(())).unwrap();
        assert_eq!(req.uri().to_string(), "http://localhost/");
    }
}
