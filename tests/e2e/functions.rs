use cloudpipe_test_programs_artifacts as programs;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::server::{TestServer, code, program};

#[tokio::test]
async fn functions_are_content_addressed_and_names_point_at_the_newest() {
    let s = TestServer::start(&[]).await;
    let v1 = s.upload("greet", &program(programs::HELLO)).await;
    let v2 = s.upload("greet", &program(programs::ECHO)).await;
    assert_ne!(v1["id"], v2["id"]);
    let (_, got) = s.get("/v1/functions/greet").await;
    assert_eq!(got["id"], v2["id"]);
    // The old version stays addressable by id.
    let old = v1["id"].as_str().unwrap();
    let job = s.run(json!({"function": old})).await;
    assert_eq!(job["stdout"], "hello, world\n");
    assert_eq!(job["function_id"], old);
    let (_, list) = s.get("/v1/functions").await;
    assert_eq!(list["functions"].as_array().unwrap().len(), 1);
    // Same binary again: same id.
    let again = s.upload("greet", &program(programs::ECHO)).await;
    assert_eq!(again["id"], v2["id"]);
    assert_eq!(again["created_at"], v2["created_at"]);

    let (st, _) = s.request(Method::DELETE, "/v1/functions/greet", None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, b) = s.get("/v1/functions/greet").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(code(&b), "not_found");
    let (st, _) = s.post_json("/v1/jobs", &json!({"function": "greet"})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn compiled_functions_are_reused_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(dir.path(), &[]).await;
    s.upload("hello", &program(programs::HELLO)).await;
    assert_eq!(s.metric("cloudpipe_wasm_compiles_total").await, 1.0);
    assert_eq!(s.terminate().code(), Some(0));

    let s = TestServer::start_in(dir.path(), &[]).await;
    let job = s.run(json!({"function": "hello"})).await;
    assert_eq!(job["stdout"], "hello, world\n");
    assert_eq!(s.metric("cloudpipe_wasm_compiles_total").await, 0.0);
}

#[tokio::test]
async fn the_openapi_document_is_served() {
    let s = TestServer::start(&[]).await;
    let (st, doc) = s.get("/v1/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    assert!(doc["paths"]["/v1/jobs"]["post"].is_object(), "{doc}");
    assert!(doc["components"]["schemas"]["JobRecord"].is_object());
    let (_, health) = s.get("/healthz").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"], "redb");
}

/// The compiled code of a function version goes when the store no longer has the
/// version.
#[tokio::test]
async fn compiled_code_goes_with_the_deleted_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir.path(), &[]).await;
    let artefacts = || -> usize {
        std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
            .count()
    };
    let before = artefacts();
    s.upload("hello", &program(programs::HELLO)).await;
    assert_eq!(artefacts(), before + 1);
    let job = s.run(json!({"function": "hello"})).await;
    assert_eq!(job["stdout"], "hello, world\n");
    let (st, _) = s.request(reqwest::Method::DELETE, "/v1/functions/hello", None).await;
    assert!(st.is_success(), "{st}");
    assert_eq!(artefacts(), before, "the version is gone: its compiled code too");
    // Uploaded again, it compiles again and runs.
    s.upload("hello", &program(programs::HELLO)).await;
    assert_eq!(s.run(json!({"function": "hello"})).await["stdout"], "hello, world\n");
}
