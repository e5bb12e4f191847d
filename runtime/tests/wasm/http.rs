//! wasi:http proxies through `WasmExecutor::handle_http`, with the `http_echo` guest
//! (tests/test-programs/http-guest).

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use cloudpipe_runtime::egress::{Egress, EgressConfig};
use cloudpipe_runtime::executor::wasm::{HttpOptions, InvokeError, ResponseBody};
use cloudpipe_types::JobStatus;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn get(uri: &str) -> ::http::Request<Full<Bytes>> {
    ::http::Request::get(uri).header("host", "fn.example").body(Full::default()).unwrap()
}

fn options() -> HttpOptions {
    HttpOptions { timeout: Duration::from_secs(30), ..HttpOptions::default() }
}

async fn echo(h: &Harness) -> String {
    h.upload(programs::HTTP_ECHO).await
}

/// The response head and its whole body.
async fn collect(response: ::http::Response<ResponseBody>) -> (::http::response::Parts, Bytes) {
    let (parts, body) = response.into_parts();
    (parts, body.collect().await.expect("the body streams to its end").to_bytes())
}

fn header<'a>(parts: &'a ::http::response::Parts, name: &str) -> &'a str {
    parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name}"))
}

#[tokio::test]
async fn proxy_component_is_prepared_as_http() {
    let h = Harness::new();
    let binary = programs::read(programs::HTTP_ECHO);
    let id = put(&*h.store, &binary).await;
    assert_eq!(h.executor.prepare(&id, &binary).await.unwrap(), FunctionKind::Http);
}

#[tokio::test]
async fn http_function_does_not_run_as_a_job() {
    let h = Harness::new();
    let id = echo(&h).await;
    let outcome = h.run(request("http_echo", &id)).await;
    assert_eq!(outcome.status, JobStatus::Failed);
    let error = outcome.error.expect("an error");
    assert_eq!(error.kind, "not_runnable");
    assert!(error.message.contains("/fn/NAME"), "{}", error.message);
}

#[tokio::test]
async fn unknown_and_non_http_functions_are_refused() {
    let h = Harness::new();
    let missing = format!("sha256:{}", "0".repeat(64));
    let err = h.executor.handle_http(&missing, get("/"), options()).await.unwrap_err();
    assert!(matches!(err, InvokeError::NotFound(_)), "{err:?}");
    let hello = h.upload(programs::HELLO).await;
    let err = h.executor.handle_http(&hello, get("/"), options()).await.unwrap_err();
    assert!(matches!(err, InvokeError::NotHttp { kind: FunctionKind::Command, .. }), "{err:?}");
}

#[tokio::test]
async fn guest_sees_method_path_query_and_headers_and_answers_with_its_own() {
    let h = Harness::new();
    let id = echo(&h).await;
    let req = ::http::Request::post("/echo/deeper?x=1&y=two%20words")
        .header("host", "fn.example:8080")
        .header("x-test-color", "blue")
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"ping")))
        .unwrap();
    let stderr = Arc::new(Recorder::default());
    let opts = HttpOptions { stderr: stderr.clone(), ..options() };
    let (parts, body) = collect(h.executor.handle_http(&id, req, opts).await.unwrap()).await;
    assert_eq!(parts.status, 200);
    assert_eq!(header(&parts, "x-echo-method"), "POST");
    assert_eq!(header(&parts, "x-echo-path"), "/echo/deeper?x=1&y=two%20words");
    assert_eq!(header(&parts, "x-echo-scheme"), "http");
    assert_eq!(header(&parts, "x-echo-authority"), "fn.example:8080");
    assert_eq!(header(&parts, "x-echo-color"), "blue");
    assert_eq!(header(&parts, "content-type"), "text/plain");
    assert_eq!(header(&parts, "x-powered-by"), "http-echo");
    assert_eq!(&body[..], b"ping");
    assert_eq!(text(&stderr.stderr.lock().unwrap()), "echo /echo/deeper?x=1&y=two%20words\n");

    for method in ["PUT", "DELETE", "PATCH", "PURGE"] {
        let req =
            ::http::Request::builder().method(method).uri("/m").body(Full::default()).unwrap();
        let (parts, _) = collect(h.executor.handle_http(&id, req, options()).await.unwrap()).await;
        assert_eq!(header(&parts, "x-echo-method"), method);
        assert_eq!(header(&parts, "x-echo-authority"), "localhost", "no Host header");
    }
}

#[tokio::test]
async fn binary_body_and_trailers_pass_both_ways() {
    let h = Harness::new();
    let id = echo(&h).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let mut trailers = ::http::HeaderMap::new();
    trailers.insert("x-sent-after", "body".parse().unwrap());
    let frames = vec![
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::copy_from_slice(&binary[..1000]))),
        Ok(http_body::Frame::data(Bytes::copy_from_slice(&binary[1000..]))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let req = ::http::Request::put("/bytes")
        .header("x-test-trailers", "1")
        .body(StreamBody::new(futures::stream::iter(frames)))
        .unwrap();
    let response = h.executor.handle_http(&id, req, options()).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers");
    assert_eq!(collected.to_bytes(), binary);
    assert_eq!(trailers["x-sent-after"], "body");
    assert_eq!(trailers["x-echo-bytes"], "300000");
}

#[tokio::test]
async fn hundred_megabytes_stream_through_with_bounded_memory() {
    // Measured in a process of its own: VmHWM is per process, and the other tests of
    // this binary compile and run guests at the same time. The test reruns itself
    // alone in a child process, which does the streaming.
    if std::env::var_os("CLOUDPIPE_STREAM_CHILD").is_some() {
        return stream_100mb().await;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "http::hundred_megabytes_stream_through_with_bounded_memory",
            "--nocapture",
        ])
        .env("CLOUDPIPE_STREAM_CHILD", "1")
        .status()
        .unwrap();
    assert!(status.success(), "the streaming child process failed");
}

/// Peak resident memory of this process, in bytes.
fn vm_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The child half of `hundred_megabytes_stream_through_with_bounded_memory`.
async fn stream_100mb() {
    const CHUNK: usize = 64 << 10;
    const CHUNKS: usize = 1600; // 100 MiB
    let h = Harness::new();
    let id = echo(&h).await;
    // Warm: the first request maps the guest's code and memory image.
    collect(h.executor.handle_http(&id, get("/warm"), options()).await.unwrap()).await;

    let chunk = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut expected = Sha256::new();
    for _ in 0..CHUNKS {
        expected.update(&chunk);
    }
    let before = vm_hwm();
    let frames = futures::stream::iter(
        std::iter::repeat_n(chunk, CHUNKS).map(|c| Ok::<_, Infallible>(http_body::Frame::data(c))),
    );
    let req = ::http::Request::post("/stream").body(StreamBody::new(frames)).unwrap();
    let started = Instant::now();
    let mut body = h.executor.handle_http(&id, req, options()).await.unwrap().into_body();
    let (mut got, mut received) = (Sha256::new(), 0usize);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len();
            got.update(&data);
        }
    }
    let growth = vm_hwm().saturating_sub(before);
    eprintln!(
        "100 MiB through the proxy in {:?}; peak memory grew by {} KiB",
        started.elapsed(),
        growth >> 10
    );
    assert_eq!(received, CHUNK * CHUNKS);
    assert_eq!(got.finalize(), expected.finalize());
    assert!(growth < 32 << 20, "peak memory grew by {growth} bytes: the body was buffered");
}

#[tokio::test]
async fn handler_past_its_time_limit_times_out() {
    let h = Harness::new();
    let id = echo(&h).await;
    let started = Instant::now();
    let opts = HttpOptions { timeout: Duration::from_millis(300), ..options() };
    let err = h.executor.handle_http(&id, get("/loop"), opts).await.unwrap_err();
    assert!(matches!(err, InvokeError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn body_past_the_time_limit_ends_with_an_error() {
    let h = Harness::new();
    let id = echo(&h).await;
    let opts = HttpOptions { timeout: Duration::from_millis(300), ..options() };
    let response = h.executor.handle_http(&id, get("/stream-loop"), opts).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first chunk\n");
    let err = body.frame().await.expect("not a clean end").unwrap_err();
    assert!(matches!(err, InvokeError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn trap_gives_its_message_and_stderr_keeps_the_panic() {
    let h = Harness::new();
    let id = echo(&h).await;
    let stderr = Arc::new(Recorder::default());
    let opts = HttpOptions { stderr: stderr.clone(), ..options() };
    let err = h.executor.handle_http(&id, get("/trap"), opts).await.unwrap_err();
    let InvokeError::Trap(message) = err else { panic!("expected a trap, got {err:?}") };
    assert!(message.contains("unreachable"), "{message}");
    assert!(text(&stderr.stderr.lock().unwrap()).contains("asked to trap"));

    // The instance is gone but the function still serves.
    let (parts, body) =
        collect(h.executor.handle_http(&id, get("/hello"), options()).await.unwrap()).await;
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], b"hello, world\n");
}

/// A one-shot HTTP/1.1 server on 127.0.0.1 answering `hello from PATH`; returns its
/// port.
async fn tiny_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("?").to_string();
                let body = format!("hello from {path}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    port
}

/// What a function allowing `function` may reach, its account allowing `account`, on
/// a server that allows the internal blocks `internal`.
fn outbound(function: &[String], account: &[&str], internal: &str) -> Egress {
    let account: Vec<String> = account.iter().map(|s| s.to_string()).collect();
    let config = EgressConfig::parse_internal(internal).unwrap();
    Egress::for_function(function, &account, std::sync::Arc::new(config))
}

#[tokio::test]
async fn outbound_request_reaches_an_allowed_host() {
    let h = Harness::new();
    let id = echo(&h).await;
    let port = tiny_server().await;
    let uri = format!("/outbound?url=http://127.0.0.1:{port}/up");
    let opts = HttpOptions {
        outbound: outbound(&[format!("127.0.0.1:{port}")], &["*"], "127.0.0.1/32"),
        ..options()
    };
    let (parts, body) = collect(h.executor.handle_http(&id, get(&uri), opts).await.unwrap()).await;
    assert_eq!(parts.status, 200, "{}", text(&body));
    assert_eq!(text(&body), "status 200\nhello from /up");
}

#[tokio::test]
async fn outbound_request_to_any_other_host_is_denied() {
    let h = Harness::new();
    let id = echo(&h).await;
    let port = tiny_server().await;
    let uri = format!("/outbound?url=http://127.0.0.1:{port}/up");
    for allowed in [vec![], vec!["127.0.0.1:1".to_string()], vec!["localhost".to_string()]] {
        let opts = HttpOptions { outbound: outbound(&allowed, &["*"], "127.0.0.0/8"), ..options() };
        let (parts, body) =
            collect(h.executor.handle_http(&id, get(&uri), opts).await.unwrap()).await;
        assert_eq!(parts.status, 502, "allowed {allowed:?}: {}", text(&body));
        assert_eq!(text(&body), "error: HttpRequestDenied", "allowed {allowed:?}");
    }
    // The account's policy bounds the function's list.
    let opts = HttpOptions {
        outbound: outbound(&["*".to_string()], &["example.com"], "127.0.0.0/8"),
        ..options()
    };
    let (_, body) = collect(h.executor.handle_http(&id, get(&uri), opts).await.unwrap()).await;
    assert_eq!(text(&body), "error: HttpRequestDenied");
}

#[tokio::test]
async fn outbound_requests_to_internal_addresses_are_refused_after_resolving() {
    let h = Harness::new();
    let id = echo(&h).await;
    let port = tiny_server().await;
    let everywhere = ["*".to_string()];
    // An IP literal, and a name that resolves to loopback: both refused, though the
    // function and its account allow anywhere.
    for url in [format!("http://127.0.0.1:{port}/up"), format!("http://localhost:{port}/up")] {
        let uri = format!("/outbound?url={url}");
        let opts = HttpOptions { outbound: outbound(&everywhere, &["*"], ""), ..options() };
        let (parts, body) =
            collect(h.executor.handle_http(&id, get(&uri), opts).await.unwrap()).await;
        assert_eq!(parts.status, 502, "{url}: {}", text(&body));
        assert!(text(&body).contains("DestinationIpProhibited"), "{url}: {}", text(&body));
    }
    // The operator allows loopback: the name is resolved, checked, and connected to.
    let uri = format!("/outbound?url=http://localhost:{port}/up");
    let opts = HttpOptions {
        outbound: outbound(&[format!("localhost:{port}")], &["*"], "127.0.0.1/32"),
        ..options()
    };
    let (parts, body) = collect(h.executor.handle_http(&id, get(&uri), opts).await.unwrap()).await;
    assert_eq!(parts.status, 200, "{}", text(&body));
    assert_eq!(text(&body), "status 200\nhello from /up");
}

#[tokio::test]
async fn compiled_proxy_is_reused_by_a_new_executor() {
    let cache = tempfile::tempdir().unwrap();
    let binary = programs::read(programs::HTTP_ECHO);
    let first = Harness::with_cache(cache.path());
    let id = put(&*first.store, &binary).await;
    assert_eq!(first.executor.prepare(&id, &binary).await.unwrap(), FunctionKind::Http);
    assert_eq!(first.executor.compiles(), 1);
    let store = first.store.clone();
    drop(first.executor);

    let second = WasmExecutor::new(test_config(), cache.path(), stored_binaries(store)).unwrap();
    let response = second.handle_http(&id, get("/hello"), options()).await.unwrap();
    let (_, body) = collect(response).await;
    assert_eq!(&body[..], b"hello, world\n");
    assert_eq!(second.compiles(), 0, "the artefact on disk was loaded, not recompiled");
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_instance() {
    let h = Arc::new(Harness::new());
    let id = echo(&h).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (h, id) = (h.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let req = ::http::Request::post(format!("/c/{i}"))
                .body(Full::new(Bytes::from(i.to_string())))
                .unwrap();
            let (parts, body) =
                collect(h.executor.handle_http(&id, req, options()).await.unwrap()).await;
            assert_eq!(header(&parts, "x-echo-path"), format!("/c/{i}"));
            assert_eq!(text(&body), i.to_string());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn guest_past_its_memory_cap_gives_memory_limit() {
    let h = Harness::new();
    let id = echo(&h).await;
    let opts = HttpOptions { memory_bytes: 32 << 20, ..options() };
    let err = h.executor.handle_http(&id, get("/memory-bomb"), opts).await.unwrap_err();
    let InvokeError::MemoryLimit(message) = err else {
        panic!("expected the memory limit, got {err:?}")
    };
    assert!(message.contains("32 MiB"), "{message}");
}
