//! CORS: off by default; `--cors-origins` lets pages of the listed origins call the API.

use reqwest::{Method, StatusCode};

use crate::server::{ADMIN_KEY, TestServer};

/// A preflight as a browser sends it before a keyed `POST /v1/jobs`: no credentials.
async fn preflight(s: &TestServer, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(Method::OPTIONS, format!("{}/v1/jobs", s.url))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap()
}

fn allow_origin(res: &reqwest::Response) -> Option<String> {
    res.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let s = TestServer::start(&[]).await;
    let res = preflight(&s, "https://app.example.com").await;
    assert_eq!(allow_origin(&res), None, "a server without --cors-origins allows no origin");
    let res = reqwest::Client::new()
        .get(format!("{}/v1/me", s.url))
        .bearer_auth(ADMIN_KEY)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(allow_origin(&res), None);
}

#[tokio::test]
async fn listed_origins_pass_preflight_and_read_answers_others_do_not() {
    let s = TestServer::start(&["--cors-origins", "https://app.example.com,http://localhost:5173"])
        .await;
    let res = preflight(&s, "https://app.example.com").await;
    assert!(res.status().is_success(), "preflight: {}", res.status());
    assert_eq!(allow_origin(&res).as_deref(), Some("https://app.example.com"));
    let headers = res.headers()["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(headers.contains("authorization"), "{headers}");
    let methods = res.headers()["access-control-allow-methods"].to_str().unwrap().to_string();
    assert!(methods.contains("POST") && methods.contains("DELETE"), "{methods}");

    let res = preflight(&s, "https://evil.example.com").await;
    assert_eq!(allow_origin(&res), None, "an unlisted origin gets no allowance");

    // The real request: its answer carries the allowance (errors too).
    let client = reqwest::Client::new();
    let res = client
        .get(format!("{}/v1/me", s.url))
        .bearer_auth(ADMIN_KEY)
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(allow_origin(&res).as_deref(), Some("http://localhost:5173"));
    let res = client
        .get(format!("{}/v1/me", s.url))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(allow_origin(&res).as_deref(), Some("https://app.example.com"));
}

#[test]
fn a_bad_origin_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudpipe"))
        .args(["serve", "--cors-origins", "https://app.example.com/path"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scheme://host"), "{err}");
}
