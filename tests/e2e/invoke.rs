//! Functions as web endpoints: `/fn/{name}` over the CGI contract.

use std::time::Duration;

use cloudpipe_test_programs_artifacts as programs;
use reqwest::StatusCode;

use crate::server::{ADMIN_KEY, TestServer, admin_client, code, peak_rss_mib, program};

#[tokio::test]
async fn cgi_functions_get_the_request_and_shape_the_response() {
    let s = TestServer::start(&[]).await;
    s.upload("cgi", &program(programs::CGI)).await;
    let c = &s.client;

    let res = c
        .post(format!("{}/fn/cgi/some/path?x=1&y=%20", s.url))
        .header("x-test", "hello")
        .header("content-type", "text/csv")
        // A key the server accepts: it is still kept from the function.
        .header("authorization", format!("Bearer {ADMIN_KEY}"))
        .body("a,b")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/x-cgi-vars");
    assert_eq!(res.headers()["x-reply"], "yes");
    let invocation = res.headers()["x-cloudpipe-invocation"].to_str().unwrap().to_string();
    let text = res.text().await.unwrap();
    let port = s.url.rsplit(':').next().unwrap();
    for want in [
        "REQUEST_METHOD=POST\n".to_string(),
        "SCRIPT_NAME=/fn/cgi\n".into(),
        "PATH_INFO=/some/path\n".into(),
        "QUERY_STRING=x=1&y=%20\n".into(),
        "CONTENT_TYPE=text/csv\n".into(),
        "CONTENT_LENGTH=3\n".into(),
        "SERVER_NAME=127.0.0.1\n".into(),
        format!("SERVER_PORT={port}\n"),
        "REMOTE_ADDR=127.0.0.1\n".into(),
        "HTTP_X_TEST=hello\n".into(),
        // The caller's credentials never reach the function.
        "HTTP_AUTHORIZATION=\n".into(),
        "BODY=a,b".into(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }

    // The mount point alone: no PATH_INFO.
    let text = c.get(format!("{}/fn/cgi", s.url)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("REQUEST_METHOD=GET\nSCRIPT_NAME=/fn/cgi\nPATH_INFO=\n"), "{text}");

    let res = c.get(format!("{}/fn/cgi/plain", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(res.text().await.unwrap(), "just text");

    let res = c.get(format!("{}/fn/cgi/status", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.text().await.unwrap(), "nope");

    let no_redirects = admin_client();
    let res = no_redirects.get(format!("{}/fn/cgi/redirect", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::FOUND);
    assert_eq!(res.headers()["location"], "/fn/cgi/elsewhere");

    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let res = c.put(format!("{}/fn/cgi/binary", s.url)).body(binary.clone()).send().await.unwrap();
    assert_eq!(res.headers()["content-type"], "application/octet-stream");
    assert_eq!(res.bytes().await.unwrap(), binary);

    let res = c.get(format!("{}/fn/cgi/fail", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let failed_invocation = res.headers()["x-cloudpipe-invocation"].to_str().unwrap().to_string();
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(code(&body), "function_failed");
    let message = body["error"]["message"].as_str().unwrap();
    // (std's `exit(2)` in a component arrives as 1: WASI 0.2's exit is ok/err.)
    assert!(
        message.contains(&failed_invocation) && message.contains("exited with code 1"),
        "{message}"
    );
    assert!(!message.contains("something broke"), "stderr is not leaked: {message}");

    // The log ring: stderr lines and one access record per invocation.
    let (st, logs) = s.get("/v1/functions/cgi/logs").await;
    assert_eq!(st, StatusCode::OK);
    let lines = logs["lines"].as_array().unwrap();
    assert!(
        lines.iter().any(|l| l["invocation"] == invocation.as_str()
            && l["stream"] == "access"
            && l["line"].as_str().unwrap().starts_with("POST /fn/cgi/some/path 200")),
        "{logs}"
    );
    assert!(
        lines.iter().any(|l| l["invocation"] == failed_invocation.as_str()
            && l["stream"] == "stderr"
            && l["line"] == "something broke"),
        "{logs}"
    );
}

#[tokio::test]
async fn unknown_functions_timeouts_and_the_concurrency_limit_get_their_statuses() {
    let s = TestServer::start(&["--fn-timeout-ms", "300", "--fn-max-concurrency", "2"]).await;
    s.upload("cgi", &program(programs::CGI)).await;
    let c = &s.client;

    let res = c.get(format!("{}/fn/nope/x", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(code(&body), "not_found");

    let t = std::time::Instant::now();
    let res = c.get(format!("{}/fn/cgi/loop", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(code(&body), "timeout");

    // Two run at once (each until its 300 ms timeout); a third meanwhile is turned
    // away with Retry-After.
    let s2 = &s;
    let (first, second, third) = tokio::join!(
        async { c.get(format!("{}/fn/cgi/sleep", s2.url)).send().await.unwrap() },
        async { c.get(format!("{}/fn/cgi/sleep", s2.url)).send().await.unwrap() },
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.get(format!("{}/fn/cgi/plain", s2.url)).send().await.unwrap()
        }
    );
    assert_eq!(
        first.status(),
        StatusCode::GATEWAY_TIMEOUT,
        "a 1 s sleep outlives the 300 ms timeout"
    );
    assert_eq!(second.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.headers()["retry-after"], "1");
}

#[tokio::test]
async fn wasi_http_functions_see_the_path_below_their_mount_and_stream_both_ways() {
    // The server's peak RSS is measured: no JS runner compiling beside the guests.
    let s = TestServer::start(&["--no-runner-js"]).await;
    let f = s.upload("web", &program(programs::HTTP_ECHO)).await;
    assert_eq!(f["kind"], "http");
    let c = &s.client;

    let binary: Vec<u8> = (0..=255u8).rev().cycle().take(100_000).collect();
    let res = c
        .post(format!("{}/fn/web/echo/x?y=1", s.url))
        .header("x-test-color", "blue")
        .header("content-type", "application/x-thing")
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-echo-method"], "POST");
    assert_eq!(res.headers()["x-echo-path"], "/echo/x?y=1");
    assert_eq!(res.headers()["x-echo-color"], "blue");
    assert_eq!(res.headers()["content-type"], "application/x-thing");
    assert!(res.headers().contains_key("x-cloudpipe-invocation"));
    assert_eq!(res.bytes().await.unwrap(), binary);

    // 100 MB through the function: streamed, never held whole by the server.
    const CHUNK: usize = 1 << 20;
    let chunks = futures::stream::iter((0..100).map(|_| Ok::<_, std::io::Error>(vec![7u8; CHUNK])));
    let res = c
        .put(format!("{}/fn/web/stream", s.url))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut total = 0usize;
    let mut body = res.bytes_stream();
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        let chunk = chunk.unwrap();
        assert!(chunk.iter().all(|b| *b == 7));
        total += chunk.len();
    }
    assert_eq!(total, 100 * CHUNK);
    let peak = peak_rss_mib(s.pid());
    assert!(peak < 100, "server peak RSS {peak} MiB after streaming 100 MiB");

    let res = c.get(format!("{}/fn/web/trap", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(code(&body), "function_failed");

    // A proxy is not a job.
    let (st, body) = s.post_json("/v1/jobs", &serde_json::json!({"function": "web"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(code(&body), "invalid_request");

    // Its stderr reaches the log ring.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, logs) = s.get("/v1/functions/web/logs").await;
    let lines = logs["lines"].as_array().unwrap();
    assert!(
        lines.iter().any(|l| l["stream"] == "stderr" && l["line"] == "echo /echo/x?y=1"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_wasi_http_function_that_never_answers_gets_504() {
    let s = TestServer::start(&["--fn-timeout-ms", "300"]).await;
    s.upload("web", &program(programs::HTTP_ECHO)).await;
    let res = s.client.get(format!("{}/fn/web/loop", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn redeploying_under_load_switches_versions_with_no_failed_request() {
    let s = TestServer::start(&[]).await;
    s.upload("site", &program(programs::HTTP_ECHO)).await;
    let versions = [program(programs::CGI), program(programs::HTTP_ECHO)];
    let stop = std::sync::atomic::AtomicBool::new(false);
    let load = async {
        let mut statuses = std::collections::BTreeMap::new();
        let mut bodies = std::collections::BTreeSet::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let res = s.client.get(format!("{}/fn/site/plain", s.url)).send().await.unwrap();
            *statuses.entry(res.status().as_u16()).or_insert(0) += 1;
            bodies.insert(res.text().await.unwrap().lines().next().unwrap_or_default().to_string());
        }
        (statuses, bodies)
    };
    let deploys = async {
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.upload("site", &versions[i % 2]).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let ((statuses, bodies), ()) = tokio::join!(load, deploys);
    assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), [200], "{statuses:?}");
    // Both versions answered: the CGI one ("just text") and the proxy one (an echo).
    assert!(bodies.contains("just text") && bodies.len() >= 2, "{bodies:?}");
}

#[tokio::test]
async fn settings_set_on_upload_or_patch_apply_to_the_next_invocation_and_survive_redeploys() {
    let s = TestServer::start(&[]).await;
    let (st, f) = s
        .request(
            reqwest::Method::POST,
            "/v1/functions?name=cgi&timeout_ms=300",
            Some(program(programs::CGI)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{f}");
    assert_eq!(f["settings"]["timeout_ms"], 300);
    let t = std::time::Instant::now();
    let res = s.client.get(format!("{}/fn/cgi/loop", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the function's 300 ms applied: {:?}",
        t.elapsed()
    );

    let patch = serde_json::json!({"env": {"GREETING": "hi there"}, "public": true});
    let (st, f) = s
        .request(reqwest::Method::PATCH, "/v1/functions/cgi", Some(patch.to_string().into_bytes()))
        .await;
    assert_eq!(st, StatusCode::OK, "{f}");
    assert_eq!(f["settings"]["public"], true);
    assert_eq!(f["settings"]["timeout_ms"], 300, "fields not given are kept");
    // A new version keeps the name's settings.
    s.upload("cgi", &program(programs::CGI)).await;
    let text =
        s.client.get(format!("{}/fn/cgi/x", s.url)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("GREETING=hi there\n"), "{text}");

    for (path, body, want, want_code) in [
        (
            "/v1/functions/cgi",
            r#"{"timeout_ms": 99999999999}"#,
            StatusCode::BAD_REQUEST,
            "invalid_settings",
        ),
        (
            "/v1/functions/cgi",
            r#"{"allowed_outbound_hosts": ["a b"]}"#,
            StatusCode::BAD_REQUEST,
            "invalid_settings",
        ),
        ("/v1/functions/cgi", r#"{"timeout": 1}"#, StatusCode::BAD_REQUEST, "invalid_json"),
        ("/v1/functions/nope", r#"{"public": true}"#, StatusCode::NOT_FOUND, "not_found"),
    ] {
        let (st, b) = s.request(reqwest::Method::PATCH, path, Some(body.as_bytes().to_vec())).await;
        assert_eq!((st, code(&b)), (want, want_code), "{path} {body}: {b}");
    }
}

/// A one-route HTTP server on loopback for outbound requests: answers `ok`.
async fn tiny_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn outbound_requests_go_only_to_allowed_hosts() {
    // The test's server listens on loopback: an internal address the operator allows.
    let s = TestServer::start(&["--allow-internal-outbound", "127.0.0.0/8"]).await;
    s.upload("web", &program(programs::HTTP_ECHO)).await;
    let port = tiny_server().await;
    let call = || async {
        let res = s
            .client
            .get(format!("{}/fn/web/outbound?url=http://127.0.0.1:{port}/x", s.url))
            .send()
            .await
            .unwrap();
        (res.status(), res.text().await.unwrap())
    };
    let (st, body) = call().await;
    assert_eq!(st, StatusCode::BAD_GATEWAY, "refused by default: {body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");

    let patch = serde_json::json!({"allowed_outbound_hosts": [format!("127.0.0.1:{port}")]});
    let (st, _) = s
        .request(reqwest::Method::PATCH, "/v1/functions/web", Some(patch.to_string().into_bytes()))
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = call().await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body, "status 200\nok");
}

/// `/fn/{name}` resolves from memory: a delete, by name or by id, is seen by the very
/// next invocation.
#[tokio::test]
async fn a_deleted_function_is_gone_from_the_next_invocation() {
    let s = TestServer::start(&[]).await;
    let get = |path: &str| s.client.get(format!("{}{path}", s.url)).send();
    for by_id in [false, true] {
        let f = s.upload("web", &program(programs::HTTP_ECHO)).await;
        let id = f["id"].as_str().unwrap().to_string();
        for path in ["/fn/web/hello", &format!("/fn/{id}/hello")] {
            assert_eq!(get(path).await.unwrap().status(), StatusCode::OK, "{path}");
        }
        let target = if by_id { id.clone() } else { "web".to_string() };
        let (st, body) =
            s.request(reqwest::Method::DELETE, &format!("/v1/functions/{target}"), None).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        for path in ["/fn/web/hello", &format!("/fn/{id}/hello")] {
            assert_eq!(
                get(path).await.unwrap().status(),
                StatusCode::NOT_FOUND,
                "{path} after deleting {target}"
            );
        }
    }
}
