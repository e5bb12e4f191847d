//! Write-only secrets: a value goes in with `PUT /v1/secrets/{name}`, reaches the jobs
//! and functions that name it, and comes out through no answer, log line or store file.

use std::io::Write;
use std::time::Duration;

use cloudpipe_test_programs_artifacts as programs;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::server::{ADMIN_KEY, TestServer, code, output_with_stdin, program};

/// A value a test puts in and then looks for everywhere it must not be.
const HIDDEN: &str = "hidden-value-7c1f0e9a2b";
/// A value that a guest prints on purpose (to prove it arrived).
const SHOWN: &str = "shown-value-41d2";

async fn call(
    s: &TestServer,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value, String) {
    let mut req =
        reqwest::Client::new().request(method, format!("{}{path}", s.url)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let st = res.status();
    let text = res.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (st, v, text)
}

/// Every byte of every file under `dir`.
fn files_contain(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test]
async fn a_secret_reaches_jobs_and_functions_and_no_answer_log_line_or_store_file() {
    let data = tempfile::tempdir().unwrap();
    // Debug logging: the most the server ever says.
    let mut s = TestServer::start_in_env(data.path(), &[], &[("RUST_LOG", "debug")]).await;
    let (st, _) = s.post_json("/v1/accounts", &json!({"name": "alice"})).await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, key) = s.post_json("/v1/accounts/alice/keys", &json!({})).await;
    let alice = key["key"].as_str().unwrap().to_string();

    let mut answers = String::new();
    let (st, put, text) =
        call(&s, &alice, Method::PUT, "/v1/secrets/api-token", Some(json!({"value": HIDDEN})))
            .await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    assert_eq!(put["name"], "api-token");
    answers += &text;
    let (st, _, text) =
        call(&s, &alice, Method::PUT, "/v1/secrets/shown", Some(json!({"value": "old"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    // A second put replaces the value and keeps the first time.
    let (st, again, text) =
        call(&s, &alice, Method::PUT, "/v1/secrets/shown", Some(json!({"value": SHOWN}))).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    let (_, list, text) = call(&s, &alice, Method::GET, "/v1/secrets", None).await;
    answers += &text;
    let names: Vec<&str> =
        list["secrets"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["api-token", "shown"]);
    let shown = &list["secrets"][1];
    assert_eq!(shown["created_at"], again["created_at"]);
    assert!(shown.get("value").is_none(), "{shown}");

    // A job gets the value at run time; the guest (echo) prints its environment.
    let (st, _, text) = upload(&s, &alice, "echo", programs::ECHO).await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    let spec = json!({"function": "echo", "env": {"GREETING": {"secret": "shown"}, "PLAIN": "p"}});
    let (st, job, text) = call(&s, &alice, Method::POST, "/v1/jobs?wait=30s", Some(spec)).await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = job["stdout"].as_str().unwrap();
    assert!(out.contains(&format!("GREETING={SHOWN}\n")), "echo prints GREETING: {out}");
    assert!(out.contains("env_count=5\n"), "three of ours, GREETING and PLAIN: {out}");

    // A job whose guest does not print it: the value reaches it, and nothing shows it.
    let (st, _, text) = upload(&s, &alice, "hello", programs::HELLO).await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    let spec =
        json!({"function": "hello", "env": {"TOKEN": {"secret": "api-token"}}, "tags": ["t"]});
    let (st, job, text) = call(&s, &alice, Method::POST, "/v1/jobs?wait=30s", Some(spec)).await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    assert_eq!(job["status"], "succeeded", "{job}");
    answers += &text;
    let id = job["id"].as_str().unwrap().to_string();
    for path in [
        format!("/v1/jobs/{id}"),
        format!("/v1/jobs/{id}/result"),
        format!("/v1/jobs/{id}/events"),
        "/v1/jobs?limit=100".to_string(),
        "/v1/me".to_string(),
        "/v1/job".to_string(),
    ] {
        let (st, _, text) = call(&s, &alice, Method::GET, &path, None).await;
        assert_eq!(st, StatusCode::OK, "{path}: {text}");
        answers += &text;
    }

    // A function's settings name a secret; each invocation gets its value.
    let (st, _, text) = upload(&s, &alice, "cgi", programs::CGI).await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    let patch = json!({"env": {"GREETING": {"secret": "shown"}, "OTHER": {"secret": "api-token"}}});
    let (st, f, text) = call(&s, &alice, Method::PATCH, "/v1/functions/cgi", Some(patch)).await;
    assert_eq!(st, StatusCode::OK, "{text}");
    assert_eq!(f["settings"]["env"]["GREETING"], json!({"secret": "shown"}));
    answers += &text;
    let (st, _, body) = call(&s, &alice, Method::GET, "/fn/cgi/vars", None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains(&format!("GREETING={SHOWN}")), "{body}");
    for path in ["/v1/functions", "/v1/functions/cgi"] {
        let (_, _, text) = call(&s, &alice, Method::GET, path, None).await;
        answers += &text;
    }
    let (st, _, text) = call(&s, ADMIN_KEY, Method::GET, "/metrics", None).await;
    assert_eq!(st, StatusCode::OK);
    answers += &text;

    assert!(!answers.contains(HIDDEN), "an answer shows the secret:\n{answers}");
    // The server stops, so that everything it logs and writes is in.
    assert_eq!(s.terminate().code(), Some(0));
    let log = s.log();
    assert!(log.lines().count() > 10, "the log was read: {log}");
    assert!(!log.contains(HIDDEN), "the log shows the secret:\n{log}");
    assert!(!log.contains(SHOWN), "the log shows the secret:\n{log}");
    let leaks = files_contain(data.path(), HIDDEN.as_bytes());
    assert!(leaks.is_empty(), "the value is readable in {leaks:?}");
    let key_file = data.path().join("secrets.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key file made on first start is private");

    // Rotation: a new key appended to the file while the server runs again. New puts
    // are sealed with it, the old secrets still open, and after a restart too.
    let s = TestServer::start_in(data.path(), &[]).await;
    let mut f = std::fs::OpenOptions::new().append(true).open(&key_file).unwrap();
    use base64::Engine;
    writeln!(f, "k-rotated {}", base64::engine::general_purpose::STANDARD.encode([9u8; 32]))
        .unwrap();
    drop(f);
    let (st, _, text) =
        call(&s, &alice, Method::PUT, "/v1/secrets/fresh", Some(json!({"value": "new-key"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    let greeting =
        |secret: &str| json!({"function": "echo", "env": {"GREETING": {"secret": secret}}});
    for (secret, want) in [("shown", SHOWN), ("fresh", "new-key")] {
        let (_, job, _) =
            call(&s, &alice, Method::POST, "/v1/jobs?wait=30s", Some(greeting(secret))).await;
        let out = job["stdout"].as_str().unwrap();
        assert!(out.contains(&format!("GREETING={want}\n")), "{job}");
    }
    assert!(s.log().contains("reread the secrets key file"), "{}", s.log());
    drop(s);
    let s = TestServer::start_in(data.path(), &[]).await;
    for (secret, want) in [("shown", SHOWN), ("fresh", "new-key")] {
        let (_, job, _) =
            call(&s, &alice, Method::POST, "/v1/jobs?wait=30s", Some(greeting(secret))).await;
        let out = job["stdout"].as_str().unwrap();
        assert!(out.contains(&format!("GREETING={want}\n")), "after a restart: {job}");
    }
}

async fn upload(s: &TestServer, key: &str, name: &str, path: &str) -> (StatusCode, Value, String) {
    let res = reqwest::Client::new()
        .post(format!("{}/v1/functions?name={name}", s.url))
        .bearer_auth(key)
        .body(program(path))
        .send()
        .await
        .unwrap();
    let st = res.status();
    let text = res.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null), text)
}

#[tokio::test]
async fn secrets_are_per_account_checked_at_submit_and_a_deleted_one_fails_the_job() {
    let s = TestServer::start(&[
        "--concurrency",
        "1",
        "--max-secrets",
        "2",
        "--max-secret-bytes",
        "16",
    ])
    .await;
    s.upload("echo", &program(programs::ECHO)).await;
    s.upload("nap", &program(programs::SLEEP)).await;
    let srv = &s;
    let put = |name: &str, value: &str| {
        let body = json!({ "value": value });
        let path = format!("/v1/secrets/{name}");
        async move { srv.request(Method::PUT, &path, Some(serde_json::to_vec(&body).unwrap())).await }
    };
    assert_eq!(put("a", "1").await.0, StatusCode::CREATED);
    assert_eq!(put("b", "2").await.0, StatusCode::CREATED);
    // Bounded: a third name is over the quota, a replacement is not.
    let (st, body) = put("c", "3").await;
    assert_eq!((st, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"), "{body}");
    assert_eq!(put("b", "22").await.0, StatusCode::OK);
    let (st, body) = put("a", &"x".repeat(17)).await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "secret_too_large"));
    let (st, body) = put("no%20spaces", "1").await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_name"), "{body}");
    let (st, body) = s.request(Method::PUT, "/v1/secrets/a", Some(b"{\"valu\":1}".to_vec())).await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_json"));

    // A name the account does not have is refused at submit.
    let (st, body) = s
        .post_json("/v1/jobs", &json!({"function": "echo", "env": {"T": {"secret": "zzz"}}}))
        .await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "secret_not_found"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("zzz"));
    let (st, body) =
        s.post_json("/v1/jobs", &json!({"function": "echo", "env": {"T": {"secret": 5}}})).await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_json"), "{body}");
    // Another account has none of the admin's.
    let (st, _) = s.post_json("/v1/accounts", &json!({"name": "bob"})).await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, key) = s.post_json("/v1/accounts/bob/keys", &json!({})).await;
    let bob = key["key"].as_str().unwrap();
    let (_, list, _) = call(&s, bob, Method::GET, "/v1/secrets", None).await;
    assert_eq!(list, json!({"secrets": []}));
    let (st, _, text) = call(&s, bob, Method::DELETE, "/v1/secrets/a", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{text}");
    let (st, _, text) = upload(&s, bob, "bob-echo", programs::ECHO).await;
    assert_eq!(st, StatusCode::CREATED, "{text}");
    let spec = json!({"function": "bob-echo", "env": {"T": {"secret": "a"}}});
    let (st, body, _) = call(&s, bob, Method::POST, "/v1/jobs", Some(spec)).await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "secret_not_found"), "{body}");
    // Settings are checked the same way.
    let patch = json!({"env": {"T": {"secret": "a"}}});
    let (st, body, _) = call(&s, bob, Method::PATCH, "/v1/functions/bob-echo", Some(patch)).await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "secret_not_found"), "{body}");

    // A queued job whose secret is deleted before it starts fails, without running.
    let (st, nap) = s.post_json("/v1/jobs", &json!({"function": "nap", "args": ["1500"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{nap}");
    let (st, queued) =
        s.post_json("/v1/jobs", &json!({"function": "echo", "env": {"T": {"secret": "a"}}})).await;
    assert_eq!(st, StatusCode::CREATED, "{queued}");
    assert_eq!(queued["status"], "queued", "one slot, taken by the nap: {queued}");
    let (st, _) = s.request(Method::DELETE, "/v1/secrets/a", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = s.request(Method::DELETE, "/v1/secrets/a", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let done = s.wait_terminal(queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["kind"], "secret_not_found", "{done}");
    assert_eq!(done["stdout"], "", "the guest never ran");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn the_cli_puts_lists_and_removes_secrets_reading_the_value_from_stdin() {
    let s = TestServer::start(&[]).await;
    let cli = |args: &[&str], stdin: &[u8]| {
        let out = output_with_stdin(
            std::process::Command::new(env!("CARGO_BIN_EXE_cloudpipe"))
                .arg("secrets")
                .args(["--url", &s.url, "--api-key", ADMIN_KEY])
                .args(args)
                .env("CLOUDPIPE_CREDENTIALS", "/nonexistent/credentials.json"),
            stdin,
        );
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let (ok, out) = cli(&["put", "from-cli"], format!("{HIDDEN}\n").as_bytes());
    assert!(ok, "{out}");
    assert!(out.contains("from-cli") && !out.contains(HIDDEN), "{out}");
    let (ok, out) = cli(&["list"], b"");
    assert!(ok && out.contains("from-cli") && !out.contains(HIDDEN), "{out}");
    // The value arrived without its newline.
    s.upload("echo", &program(programs::ECHO)).await;
    let job = s.run(json!({"function": "echo", "env": {"GREETING": {"secret": "from-cli"}}})).await;
    assert!(job["stdout"].as_str().unwrap().contains(&format!("GREETING={HIDDEN}\n")), "{job}");
    let (ok, _) = cli(&["rm", "from-cli"], b"");
    assert!(ok);
    let (ok, _) = cli(&["rm", "from-cli"], b"");
    assert!(!ok, "a second rm fails");
}
