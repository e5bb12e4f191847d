//! `GET /v1/executors`: what a server can run, and for what it cannot, why and the fix;
//! jobs of an executor that is not ready get 503 saying the same.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::{TestServer, code};

fn entry<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["executors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {list}"))
}

#[tokio::test]
async fn executors_that_are_not_ready_say_why_and_what_fixes_them() {
    // No engine behind the socket, no QEMU under that name, the JS runner turned off.
    let s = TestServer::start_env(
        &["--vm-qemu", "/nonexistent/qemu-system-x86_64", "--no-runner-js"],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    )
    .await;
    let (st, list) = s.get("/v1/executors").await;
    assert_eq!(st, StatusCode::OK, "{list}");
    let names: Vec<&str> =
        list["executors"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(&names[..3], ["wasm", "docker", "vm"], "{list}");

    let wasm = entry(&list, "wasm");
    assert_eq!((&wasm["ready"], &wasm["kind"]), (&json!(true), &json!("executor")), "{wasm}");
    assert!(wasm.get("reason").is_none() && wasm.get("fix").is_none(), "{wasm}");

    let docker = entry(&list, "docker");
    assert_eq!(docker["ready"], false, "{docker}");
    assert!(docker["reason"].as_str().unwrap().contains("Docker engine"), "{docker}");
    assert!(docker["fix"].as_str().unwrap().contains("apt-get install -y docker.io"), "{docker}");

    let vm = entry(&list, "vm");
    assert_eq!(vm["ready"], false, "{vm}");
    assert!(vm["reason"].as_str().unwrap().contains("/nonexistent/qemu-system-x86_64"), "{vm}");
    assert!(vm["fix"].as_str().unwrap().contains("qemu-system-x86"), "{vm}");

    let js = entry(&list, "runner:js");
    assert_eq!((&js["ready"], &js["kind"]), (&json!(false), &json!("runner")), "{js}");
    assert!(js["reason"].as_str().unwrap().contains("--no-runner-js"), "{js}");

    // Submitting to them: 503 with the same reason and fix.
    let (st, body) = s.post_json("/v1/jobs", &json!({"executor": "vm", "command": ["true"]})).await;
    assert_eq!((st, code(&body)), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("apt-get install -y qemu-system-x86"), "{message}");
    let (st, body) =
        s.post_json("/v1/jobs", &json!({"executor": "docker", "image": "busybox"})).await;
    assert_eq!((st, code(&body)), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("docker.io"), "{body}");
}

#[tokio::test]
async fn the_js_runner_is_built_in_and_runs_a_closure_with_no_flag() {
    let s = TestServer::start(&[]).await;
    // Compiled in the background from the start: ready within moments.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (_, list) = s.get("/v1/executors").await;
        let js = entry(&list, "runner:js");
        assert_eq!(js["kind"], "runner", "{js}");
        if js["ready"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "runner:js never became ready: {js}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // What `cp.submit((a, b) => a + b, 3, 4)` of the JS SDK sends.
    let stdin = json!({"source": "(a, b) => a + b", "args": [3, 4]}).to_string();
    let job = s.run(json!({"function": "runner:js", "stdin": stdin})).await;
    assert_eq!((&job["status"], &job["stdout"]), (&json!("succeeded"), &json!("7\n")), "{job}");
}
