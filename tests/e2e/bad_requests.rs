//! Bad requests get a 4xx with a stable code, never a 5xx.

use cloudpipe_test_programs_artifacts as programs;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::server::{TestServer, code, program};

#[tokio::test]
async fn bad_requests_get_4xx_with_a_code() {
    let s = TestServer::start(&[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    let not_wasm = b"#!/bin/sh\necho hi\n".to_vec();
    type Case<'a> = (Method, &'a str, Option<Vec<u8>>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/functions?name=x",
            Some(not_wasm),
            StatusCode::BAD_REQUEST,
            "invalid_wasm",
        ),
        (
            Method::POST,
            "/v1/functions?name=x",
            Some(program(programs::LIBRARY)),
            StatusCode::BAD_REQUEST,
            "invalid_wasm",
        ),
        (
            Method::POST,
            "/v1/functions?name=x",
            Some(program(programs::NO_START)),
            StatusCode::BAD_REQUEST,
            "invalid_wasm",
        ),
        (
            Method::POST,
            "/v1/functions?name=x",
            Some(program(programs::UNKNOWN_IMPORT)),
            StatusCode::BAD_REQUEST,
            "invalid_wasm",
        ),
        (
            Method::POST,
            "/v1/functions?name=Bad/Name",
            Some(program(programs::HELLO)),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            Method::POST,
            "/v1/functions?nmae=x",
            Some(program(programs::HELLO)),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::POST,
            "/v1/functions",
            Some(vec![0; 65 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(br#"{"function": "nope"}"#.to_vec()),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(b"{not json".to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(br#"{"function": "echo", "argz": []}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(br#"{"function": "echo", "timeout_ms": 0}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(br#"{"function": "echo", "memory_mb": 999999}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(br#"{"function": "echo", "stdin": "a", "stdin_base64": "YQ=="}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(br#"{"function": "echo", "stdin_base64": "%%%"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(br#"{"function": "sha256:123"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/jobs?wait=forever",
            Some(br#"{"function": "echo"}"#.to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::POST,
            "/v1/jobs",
            Some(vec![b' '; 9 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (Method::GET, "/v1/jobs/not-a-uuid", None, StatusCode::NOT_FOUND, "not_found"),
        (
            Method::GET,
            "/v1/jobs/0190b1c2-0000-7000-8000-000000000000",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/v1/jobs/0190b1c2-0000-7000-8000-000000000000/cancel",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/jobs/0190b1c2-0000-7000-8000-000000000000/events",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (Method::GET, "/v1/jobs?limit=0", None, StatusCode::BAD_REQUEST, "invalid_query"),
        (Method::GET, "/v1/jobs?cursor=zzz", None, StatusCode::BAD_REQUEST, "invalid_query"),
        (Method::GET, "/v1/functions/nope", None, StatusCode::NOT_FOUND, "not_found"),
        (Method::DELETE, "/v1/functions/nope", None, StatusCode::NOT_FOUND, "not_found"),
        (Method::GET, "/v2/anything", None, StatusCode::NOT_FOUND, "not_found"),
    ];
    for (method, path, body, want, want_code) in cases {
        let (st, b) = s.request(method.clone(), path, body).await;
        assert_eq!(st, want, "{method} {path}: {b}");
        assert_eq!(code(&b), want_code, "{method} {path}: {b}");
        assert!(!b["error"]["message"].as_str().unwrap().is_empty());
    }
    // The server is still fine.
    let job = s.run(json!({"function": "echo"})).await;
    assert_eq!(job["status"], "succeeded");
}
