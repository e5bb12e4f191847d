//! Functions as web endpoints: `/fn/{name}` over the CGI contract.

use std::time::Duration;

use cloudpipe_test_programs_artifacts as programs;
use reqwest::StatusCode;

use crate::server::{TestServer, code, program};

#[tokio::test]
async fn cgi_functions_get_the_request_and_shape_the_response() {
    let s = TestServer::start(&[]).await;
    s.upload("cgi", &program(programs::CGI)).await;
    let c = &s.client;

    let res = c
        .post(format!("{}/fn/cgi/some/path?x=1&y=%20", s.url))
        .header("x-test", "hello")
        .header("content-type", "text/csv")
        .header("authorization", "Bearer secret")
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

    let no_redirects =
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
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
