//! Cloudpipe's HTTP API: an axum router over a [`Runtime`], and the `serve` entry point
//! used by the `cloudpipe` binary and by tests.
//!
//! # Layout
//! - [`routes`]: one router per resource (`accounts`, `functions`, `jobs`, `invoke`,
//!   `secrets`, `system`, and `v1compat`: Cloudpipe v1's `/v1/job` API), merged in [`router`].
//! - [`auth`]: API keys, the [`Authenticator`](auth::Authenticator) backends and the
//!   middleware that authenticates every route but the public ones.
//! - [`tls`]: the HTTPS listener.
//! - [`logs`]: the in-memory log ring of each function invoked over HTTP.
//! - [`error`]: [`ApiError`], the JSON error answers.
//! - [`openapi`]: the OpenAPI document served at `/v1/openapi.json` (kept in the repo
//!   as `api/openapi.json`).
//!
//! # Example
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cloudpipe_runtime::{Runtime, RuntimeConfig};
//! let rt = Runtime::start(RuntimeConfig::new("/tmp/cloudpipe-data")).await?;
//! let state = cloudpipe_api::AppState::new(rt, cloudpipe_api::ApiConfig::default())?;
//! cloudpipe_api::auth::bootstrap(&state, Some("an-admin-key-of-16-or-more-chars")).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! cloudpipe_api::serve(listener, state, std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use cloudpipe_runtime::Runtime;

pub mod auth;
pub mod error;
pub mod extract;
pub mod logs;
pub mod openapi;
pub mod routes;
pub mod tls;

pub use error::ApiError;

/// Settings of the HTTP layer; plain data.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest JSON request body, in bytes.
    pub max_json_body: usize,
    /// Longest `?wait=` a request may ask for.
    pub max_wait: Duration,
    /// The admin key fixed by `CLOUDPIPE_ADMIN_KEY`.
    pub admin_key: Option<String>,
    /// Quotas of accounts that set none of their own.
    pub default_quotas: cloudpipe_types::Quotas,
    /// Validate keys with Cloudpipe's external auth service at this URL (and cache
    /// valid answers this long) instead of the store alone.
    pub external_auth: Option<(String, Duration)>,
    /// Failed authentications allowed per client address per minute (0: no limit).
    pub auth_failures_per_minute: u32,
    /// The image of Cloudpipe v1 jobs (`POST /v1/job`), whose `cmd` runs in it under
    /// `/bin/sh -c`.
    pub v1_image: String,
    /// Limits of HTTP invocation (`/fn/{name}`).
    pub invoke: routes::invoke::InvokeConfig,
    /// At shutdown, how long open requests and running jobs get to finish; jobs still
    /// running then go back to the queue, their attempt not counted.
    pub shutdown_grace: Duration,
    /// Browser origins (`https://app.example.com`, or `*` for any) allowed to call the
    /// API from their pages. Empty (the default): no CORS headers at all, so browsers
    /// keep other origins' pages out.
    pub cors_origins: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_json_body: 8 << 20,
            max_wait: Duration::from_secs(300),
            admin_key: None,
            default_quotas: cloudpipe_types::Quotas {
                max_concurrent_jobs: Some(1000),
                max_timeout_ms: None,
                max_memory_mb: None,
                max_function_bytes: Some(1 << 30),
                max_finished_jobs: Some(1_000_000),
                max_batch_inputs: Some(100_000),
                max_batches: Some(1000),
                max_stored_batch_inputs: Some(10_000_000),
            },
            external_auth: None,
            auth_failures_per_minute: 30,
            v1_image: "cloudpipe/runner:latest".into(),
            invoke: routes::invoke::InvokeConfig::default(),
            shutdown_grace: Duration::from_secs(10),
            cors_origins: Vec::new(),
        }
    }
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub runtime: Runtime,
    pub config: Arc<ApiConfig>,
    pub invocations: Arc<routes::invoke::Invocations>,
    pub logs: Arc<logs::FunctionLogs>,
    pub auth: Arc<auth::Auth>,
    /// This node's name (the cluster's, or the host's on one machine).
    pub node: String,
    /// When this process started.
    pub started_at: cloudpipe_runtime::model::Micros,
    /// Follows live events of jobs running on other nodes of a cluster.
    pub relay: reqwest::Client,
}

impl AppState {
    /// Fails only on a bad external auth URL.
    pub fn new(runtime: Runtime, config: ApiConfig) -> anyhow::Result<AppState> {
        let invocations = Arc::new(routes::invoke::Invocations::new(config.invoke.clone()));
        let store = runtime.store.clone();
        let backend: Arc<dyn auth::Authenticator> = match &config.external_auth {
            Some((url, ttl)) => Arc::new(auth::ExternalAuth::new(store.clone(), url, *ttl)?),
            None => Arc::new(auth::BuiltinAuth::new(store.clone())),
        };
        let limiter =
            auth::FailureLimiter::new(config.auth_failures_per_minute, Duration::from_secs(60));
        let auth =
            Arc::new(auth::Auth::new(backend, store, config.default_quotas.clone(), limiter));
        let node = match &runtime.cluster {
            Some(cluster) => cluster.node().to_string(),
            None => host_name(),
        };
        let relay = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let invocations_for_cluster = invocations.clone();
        let auth_for_cluster = auth.clone();
        if let Some(cluster) = &runtime.cluster {
            tokio::spawn(follow_cluster(
                cluster.subscribe(),
                auth_for_cluster,
                invocations_for_cluster,
            ));
        }
        Ok(AppState {
            runtime,
            config: Arc::new(config),
            invocations,
            logs: Arc::default(),
            auth,
            node,
            started_at: cloudpipe_runtime::model::now_micros(),
            relay,
        })
    }
}

/// Drops what this node cached when another node of the cluster changes it: keys and
/// accounts (a revocation holds on every node within a notification's delay, and
/// after a missed one, within a resync), and function metadata.
async fn follow_cluster(
    mut events: tokio::sync::broadcast::Receiver<cloudpipe_runtime::cluster::ClusterEvent>,
    auth: Arc<auth::Auth>,
    invocations: Arc<routes::invoke::Invocations>,
) {
    use cloudpipe_runtime::cluster::ClusterEvent;
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(ClusterEvent::AuthChanged) => auth.cache().invalidate_all(),
            Ok(ClusterEvent::FunctionsChanged) => invocations.functions.invalidate_all(),
            Ok(ClusterEvent::Resync) | Err(RecvError::Lagged(_)) => {
                auth.cache().invalidate_all();
                invocations.functions.invalidate_all();
            }
            Ok(_) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// The machine's host name (`localhost` if it has none that reads as text).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The whole API, every route behind [`auth::require`]. A worker node of a cluster
/// serves only `/healthz`, `/metrics` and the live events of its jobs (which API
/// nodes relay).
pub fn router(state: AppState) -> Router {
    if state.runtime.cluster.as_ref().is_some_and(|c| !c.role().serves_api()) {
        return Router::new()
            .route("/healthz", axum::routing::get(routes::system::get_health))
            .route("/metrics", axum::routing::get(routes::system::get_metrics))
            .route("/v1/jobs/{id}/events", axum::routing::get(routes::jobs::job_events))
            .fallback(routes::system::not_found)
            .method_not_allowed_fallback(routes::system::method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require))
            .with_state(state);
    }
    let cors = cors_layer(&state.config.cors_origins);
    let app = Router::new()
        .merge(routes::accounts::router())
        .merge(routes::batches::router())
        .merge(routes::functions::router())
        .merge(routes::jobs::router())
        .merge(routes::secrets::router())
        .merge(routes::invoke::router())
        .merge(routes::system::router())
        .merge(routes::v1compat::router())
        .fallback(routes::system::not_found)
        .method_not_allowed_fallback(routes::system::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require))
        .with_state(state);
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// The CORS layer for `origins` (`None`: CORS stays off). Credentials travel in the
/// `Authorization` header, never in cookies, so credentialed CORS is not needed, and
/// `*` is safe to offer.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([
                header::RETRY_AFTER,
                header::LOCATION,
                HeaderName::from_static(routes::invoke::INVOCATION_HEADER),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Checks `--cors-origins` values: `*`, or `scheme://host[:port]` with nothing after.
pub fn check_cors_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("CORS origin {origin:?} must start with http:// or https://"))?;
    let ok = !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        && axum::http::HeaderValue::from_str(origin).is_ok();
    match ok {
        true => Ok(()),
        false => Err(format!(
            "CORS origin {origin:?} is not scheme://host[:port] (no path, no trailing slash)"
        )),
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then lets open requests
/// finish and stops the scheduler: running jobs get a grace period, and those still
/// running after it go back to the queue, their attempt not counted.
pub async fn serve<L>(
    listener: L,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
    for<'a> auth::ClientAddr:
        axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    let grace = state.config.shutdown_grace;
    let scheduler = state.runtime.scheduler.clone();
    let app = router(state);
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop.clone();
    let stopping = scheduler.stopping().clone();
    tokio::spawn(async move {
        shutdown.await;
        // No new jobs start, and long-polls and event streams answer now, so that
        // open connections close by themselves.
        stopping.cancel();
        signal.cancel();
    });
    let app = app.into_make_service_with_connect_info::<auth::ClientAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
    // Long-polls and event streams end when stopping begins; a connection still open
    // past the grace period (a slow upload) does not hold the shutdown up: the
    // process exits under it.
    tokio::select! {
        res = server => res?,
        _ = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("stopped waiting for open connections after the shutdown grace period");
        }
    }
    scheduler.shutdown(grace).await;
    scheduler.leave_cluster().await;
    Ok(())
}

/// Reads a whole body, refusing more than `limit` bytes with 413. An oversize body is
/// still read (and dropped) up to a bound, so that the client, which is usually still
/// sending, reads the 413 rather than a reset connection.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use futures::StreamExt;
    const DRAIN_MAX: usize = 256 << 20;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad("bad_body", format!("could not read the request body: {e}"))
        })?;
        seen += chunk.len();
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else {
            buf = bytes::BytesMut::new();
            if seen > limit.saturating_add(DRAIN_MAX) {
                break;
            }
        }
    }
    if seen > limit {
        return Err(ApiError::TooLarge { limit });
    }
    Ok(buf.freeze())
}

/// Parses `30s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    let d = cloudpipe_types::parse_duration(s).ok_or_else(|| {
        ApiError::bad("invalid_query", format!("bad wait {s:?}: use e.g. 30s, 500ms or 2m"))
    })?;
    Ok(d.min(Duration::from_secs(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_accepts_units() {
        assert_eq!(parse_wait("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_wait("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_wait("5").unwrap(), Duration::from_secs(5));
        for bad in ["", "x", "-1s", "10h", "1e9999"] {
            assert!(parse_wait(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cors_origins_are_bare_origins() {
        for ok in ["*", "https://app.example.com", "http://127.0.0.1:5173", "http://[::1]:80"] {
            assert!(check_cors_origin(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", "app.example.com", "https://", "https://a.example/", "ftp://x", "https://a b"]
        {
            assert!(check_cors_origin(bad).is_err(), "{bad}");
        }
    }
}
