//! Batches: split, retries, strikes, resume after `kill -9`, retry, cancel, the hook,
//! and the `cloudpipe batch` CLI. The `sleep` guest sleeps argv[1] seconds, and fails
//! (a panic) when argv[1] is not a number: inputs choose success or failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cloudpipe_test_programs_artifacts as programs;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::{ADMIN_KEY, TestServer, code, output_with_stdin, program};

async fn start_batch(s: &TestServer, spec: Value) -> String {
    let (st, b) = s.post_json("/v1/batches", &spec).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    b["id"].as_str().unwrap().to_string()
}

/// Polls the batch until it is no longer running; returns it and the most jobs seen
/// running at once.
async fn until_done(s: &TestServer, id: &str) -> (Value, u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut most = 0;
    loop {
        let (st, b) = s.get(&format!("/v1/batches/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{b}");
        most = most.max(b["counts"]["running"].as_u64().unwrap());
        if b["status"] != "running" {
            return (b, most);
        }
        assert!(Instant::now() < deadline, "batch did not end: {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Jobs of a batch: (input index, status), oldest first.
async fn batch_jobs(s: &TestServer, id: &str) -> Vec<(u64, String)> {
    let (st, list) = s.get(&format!("/v1/jobs?batch={id}&limit=1000")).await;
    assert_eq!(st, StatusCode::OK, "{list}");
    let mut jobs: Vec<(u64, String)> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["batch_index"].as_u64().unwrap(), j["status"].as_str().unwrap().to_string()))
        .collect();
    jobs.reverse();
    jobs
}

#[tokio::test]
async fn split_bounds_the_running_jobs_and_every_input_runs_once() {
    let s = TestServer::start(&[]).await;
    s.upload("nap", &program(programs::SLEEP)).await;
    let id = start_batch(
        &s,
        json!({"template": {"function": "nap"}, "input_text": "1\n1\n\n1\n1\n1\n1\n", "split": 2}),
    )
    .await;
    let (b, most) = until_done(&s, &id).await;
    assert_eq!(b["status"], "finished", "{b}");
    assert_eq!(b["total"], 6);
    assert_eq!(b["counts"]["ok"], 6, "{b}");
    assert_eq!(most, 2, "never more than the split running, and the split used: {b}");
    assert!(b["wall_ms"].as_f64().unwrap() >= 3000.0, "6 one-second jobs 2 at a time: {b}");
    let eff = b["efficiency"].as_f64().unwrap();
    assert!((0.5..=1.01).contains(&eff), "efficiency {eff}: {b}");
    let jobs = batch_jobs(&s, &id).await;
    let mut indexes: Vec<u64> = jobs.iter().map(|(i, _)| *i).collect();
    indexes.sort();
    assert_eq!(indexes, [0, 1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn failed_inputs_are_retried_strikes_stop_the_batch_and_resume_and_retry_continue() {
    let s = TestServer::start(&[]).await;
    s.upload("nap", &program(programs::SLEEP)).await;
    // Input 1 always fails: tried 1 + 2 retries = 3 times.
    let id = start_batch(
        &s,
        json!({"template": {"function": "nap"}, "inputs": [["0"], ["bad"], ["0"]], "retries": 2, "split": 1}),
    )
    .await;
    let (b, _) = until_done(&s, &id).await;
    assert_eq!(b["status"], "finished");
    assert_eq!(
        (b["counts"]["ok"].as_u64(), b["counts"]["failed"].as_u64()),
        (Some(2), Some(1)),
        "{b}"
    );
    let tries = batch_jobs(&s, &id).await.iter().filter(|(i, _)| *i == 1).count();
    assert_eq!(tries, 3);

    // Three failures in a row strike the batch; the rest stays pending.
    let inputs: Vec<Value> = (0..10).map(|_| json!(["bad"])).collect();
    let id = start_batch(
        &s,
        json!({"template": {"function": "nap"}, "inputs": inputs, "strikes": 3, "split": 1}),
    )
    .await;
    let (b, _) = until_done(&s, &id).await;
    assert_eq!(b["status"], "struck", "{b}");
    assert_eq!(
        (b["counts"]["failed"].as_u64(), b["counts"]["pending"].as_u64()),
        (Some(3), Some(7))
    );
    // Resume runs pending inputs (and strikes again after three more).
    let (st, r) = s.post_json(&format!("/v1/batches/{id}/resume"), &json!({})).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let (b, _) = until_done(&s, &id).await;
    assert_eq!(
        (b["counts"]["failed"].as_u64(), b["counts"]["pending"].as_u64()),
        (Some(6), Some(4)),
        "{b}"
    );
    // Retry puts the failed ones back to pending for a new round.
    let (st, _) = s.post_json(&format!("/v1/batches/{id}/retry"), &json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (b, _) = until_done(&s, &id).await;
    assert_eq!(b["status"], "struck");
    assert_eq!(b["counts"]["failed"], 3, "the retried ones strike again: {b}");
    assert_eq!(b["counts"]["pending"], 7);
}

#[tokio::test]
async fn a_batch_interrupted_by_kill_9_continues_with_nothing_lost_or_counted_twice() {
    let data = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(data.path(), &[]).await;
    s.upload("nap", &program(programs::SLEEP)).await;
    let inputs: Vec<Value> = (0..12).map(|_| json!(["1"])).collect();
    let id =
        start_batch(&s, json!({"template": {"function": "nap"}, "inputs": inputs, "split": 3}))
            .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, mid) = s.get(&format!("/v1/batches/{id}")).await;
    assert!(mid["counts"]["ok"].as_u64().unwrap() >= 3, "{mid}");
    s.kill9();
    let s = TestServer::start_in(data.path(), &[]).await;
    let (b, most) = until_done(&s, &id).await;
    assert_eq!(b["status"], "finished", "{b}");
    assert_eq!(b["counts"]["ok"], 12, "every input ends once: {b}");
    assert!(most <= 3, "{most}");
    let jobs = batch_jobs(&s, &id).await;
    for i in 0..12u64 {
        let ok = jobs.iter().filter(|(j, st)| *j == i && st == "succeeded").count();
        assert_eq!(ok, 1, "input {i} succeeded {ok} times: {jobs:?}");
    }
}

#[tokio::test]
async fn cancel_leaves_the_batch_resumable_and_the_hook_is_called_once() {
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let app = {
        let (hits, bodies) = (hits.clone(), bodies.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
                let (hits, bodies) = (hits.clone(), bodies.clone());
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    bodies.lock().unwrap().push(v);
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // The hook listens on loopback: an internal address the operator must allow.
    let s = TestServer::start(&["--allow-internal-outbound", "127.0.0.1/32"]).await;
    s.upload("nap", &program(programs::SLEEP)).await;
    let inputs: Vec<Value> = (0..6).map(|_| json!(["2"])).collect();
    let id = start_batch(
        &s,
        json!({"template": {"function": "nap"}, "inputs": inputs, "split": 2, "hook": hook}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, b) = s.post_json(&format!("/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "cancelled", "{b}");
    assert_eq!(b["counts"]["pending"], 6, "cancelled inputs are pending again: {b}");
    let (st, b) = s.post_json(&format!("/v1/batches/{id}/resume"), &json!({})).await;
    assert_eq!((st, b["status"].as_str()), (StatusCode::OK, Some("running")));
    let (st, body) = s.post_json(&format!("/v1/batches/{id}/resume"), &json!({})).await;
    assert_eq!((st, code(&body)), (StatusCode::CONFLICT, "batch_running"));
    let (b, _) = until_done(&s, &id).await;
    assert_eq!(b["counts"]["ok"], 6, "{b}");
    // Once, at the end (a cancel is a pause, not an end).
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits.load(Ordering::SeqCst) < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let last = bodies.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last["id"].as_str(), last["counts"]["ok"].as_u64()), (Some(id.as_str()), Some(6)));
}

#[tokio::test]
async fn bad_batches_get_clear_errors() {
    let s = TestServer::start(&[]).await;
    s.upload("nap", &program(programs::SLEEP)).await;
    for (spec, want) in [
        (json!({"template": {"function": "nap"}}), StatusCode::BAD_REQUEST),
        (json!({"template": {"function": "nap"}, "inputs": []}), StatusCode::BAD_REQUEST),
        (
            json!({"template": {"function": "nap"}, "inputs": [["1"]], "split": 0}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"template": {"function": "nap", "idempotency_key": "k"}, "inputs": [["1"]]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"template": {"function": "nap"}, "inputs": [["1"]], "hook": "ftp://x"}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"template": {"function": "missing"}, "inputs": [["1"]]}), StatusCode::NOT_FOUND),
        (
            json!({"template": {"function": "nap"}, "inputs": [["1"]], "bogus": 1}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (st, body) = s.post_json("/v1/batches", &spec).await;
        assert_eq!(st, want, "{spec}: {body}");
    }
    let (st, _) = s.get("/v1/batches/nope").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// `cloudpipe batch`: inputs on stdin, a closing summary, the exit code.
#[test]
fn the_batch_cli_runs_stdin_lines_and_exits_non_zero_on_failures() {
    use std::process::Command;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(async {
        let s = TestServer::start(&[]).await;
        s.upload("nap", &program(programs::SLEEP)).await;
        s
    });
    let run = |input: &str, extra: &[&str]| {
        let out = output_with_stdin(
            Command::new(env!("CARGO_BIN_EXE_cloudpipe"))
                .args(["batch", "--function", "nap", "--split", "4", "--timeout", "30s"])
                .args(extra)
                .env("CLOUDPIPE_URL", &s.url)
                .env("CLOUDPIPE_API_KEY", ADMIN_KEY),
            input.as_bytes(),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = run("0\n0\n0\n", &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("3/3 OK"), "{text}");
    let (code, text) = run("0\nbad\n0\nbad\n", &["--retries", "1"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("2/4 !OK - 0 pending, 0 timeouts, 2 errors, 2 OK"), "{text}");
    drop(s);
}

/// Every job of a batch with its output, oldest first, through as many pages as it takes.
async fn batch_jobs_with_output(s: &TestServer, id: &str) -> Vec<Value> {
    let mut jobs = Vec::new();
    let mut cursor = String::new();
    loop {
        let (st, page) =
            s.get(&format!("/v1/jobs?batch={id}&limit=1000&include=output{cursor}")).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        jobs.extend(page["jobs"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    jobs.reverse();
    jobs
}

#[tokio::test]
async fn a_batch_of_more_inputs_than_a_stored_chunk_runs_each_input_once_with_its_words() {
    let s = TestServer::start(&[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    // Inputs are stored 1024 to a chunk: this batch spans two.
    let n = 1030;
    let inputs: Vec<Value> = (0..n).map(|i| json!([format!("w{i}"), "x y"])).collect();
    let id =
        start_batch(&s, json!({"template": {"function": "echo"}, "inputs": inputs, "split": 32}))
            .await;
    let (b, _) = until_done(&s, &id).await;
    assert_eq!((b["status"].as_str(), b["total"].as_u64()), (Some("finished"), Some(n)), "{b}");
    assert_eq!(b["counts"]["ok"], n, "{b}");
    let jobs = batch_jobs_with_output(&s, &id).await;
    assert_eq!(jobs.len() as u64, n);
    let mut seen = vec![false; n as usize];
    for job in &jobs {
        let i = job["batch_index"].as_u64().unwrap();
        let want = format!("argv=[\"echo\", \"w{i}\", \"x y\"]");
        assert!(job["stdout"].as_str().unwrap().starts_with(&want), "input {i}: {job}");
        assert!(!std::mem::replace(&mut seen[i as usize], true), "input {i} ran twice");
    }
}

#[tokio::test]
async fn batches_are_capped_per_account_listed_in_pages_and_deleted() {
    let s = TestServer::start(&[
        "--quota-batch-inputs",
        "5",
        "--quota-stored-batch-inputs",
        "8",
        "--quota-batches",
        "3",
    ])
    .await;
    s.upload("nap", &program(programs::SLEEP)).await;
    // An account that sets no quotas of its own: the server's defaults apply.
    let (st, _) = s.post_json("/v1/accounts", &json!({"name": "carol"})).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, key) = s.post_json("/v1/accounts/carol/keys", &json!({"label": "t"})).await;
    assert_eq!(st, StatusCode::CREATED, "{key}");
    let key = key["key"].as_str().unwrap().to_string();
    let server = &s;
    let carol = |method: reqwest::Method, path: String, body: Option<Value>| {
        let key = key.clone();
        async move {
            let body = body.map(|b| serde_json::to_vec(&b).unwrap());
            server.request_as(Some(&key), method, &path, body).await
        }
    };
    let (st, f) = server
        .request_as(
            Some(&key),
            reqwest::Method::POST,
            "/v1/functions?name=carol-nap",
            Some(program(programs::SLEEP)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{f}");
    let nap = |inputs: &[&str]| {
        let inputs: Vec<Value> = inputs.iter().map(|i| json!([i])).collect();
        json!({"template": {"function": "carol-nap"}, "inputs": inputs, "split": 4})
    };
    let create = |spec: Value| carol(reqwest::Method::POST, "/v1/batches".into(), Some(spec));
    let start = |spec: Value| async move {
        let (st, b) = create(spec).await;
        assert_eq!(st, StatusCode::CREATED, "{b}");
        b["id"].as_str().unwrap().to_string()
    };
    // Caps: inputs of one batch, inputs stored, batches stored; each its own code.
    let (st, e) = create(nap(&["0"; 6])).await;
    assert_eq!((st, code(&e)), (StatusCode::TOO_MANY_REQUESTS, "too_many_inputs"), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("5"), "{e}");
    let first = start(nap(&["0", "0", "0"])).await;
    let second = start(nap(&["0", "0", "0"])).await;
    let (st, e) = create(nap(&["0", "0", "0"])).await;
    assert_eq!((st, code(&e)), (StatusCode::TOO_MANY_REQUESTS, "too_many_stored_inputs"), "{e}");
    let long = start(nap(&["60", "60"])).await;
    let (st, e) = create(nap(&["0"])).await;
    assert_eq!((st, code(&e)), (StatusCode::TOO_MANY_REQUESTS, "too_many_batches"), "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("DELETE"),
        "says how to free one: {e}"
    );
    // The admin has no such caps.
    start_batch(&s, json!({"template": {"function": "nap"}, "inputs": vec![["0"]; 6]})).await;

    // Pages, newest first; carol sees hers only, the admin everyone's.
    let list = |path: &str| carol(reqwest::Method::GET, path.to_string(), None);
    let (st, page) = list("/v1/batches?limit=2").await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let ids = |p: &Value| -> Vec<String> {
        p["batches"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().into()).collect()
    };
    assert_eq!(ids(&page), [long.clone(), second.clone()]);
    let cursor = page["next_cursor"].as_str().expect("a next page").to_string();
    let (_, rest) = list(&format!("/v1/batches?limit=2&cursor={cursor}")).await;
    assert_eq!(ids(&rest), [first.as_str()]);
    assert!(rest.get("next_cursor").is_none(), "{rest}");
    let (_, all) = s.get("/v1/batches").await;
    assert_eq!(ids(&all).len(), 4, "{all}");
    let (_, hers) = s.get("/v1/batches?account=carol").await;
    assert_eq!(ids(&hers), [long.clone(), second.clone(), first.clone()]);
    for bad in ["/v1/batches?limit=0", "/v1/batches?limit=1001", "/v1/batches?cursor=nope"] {
        let (st, e) = list(bad).await;
        assert_eq!((st, code(&e)), (StatusCode::BAD_REQUEST, "invalid_query"), "{bad}: {e}");
    }

    // A stopped batch is deleted; its jobs stay.
    until_done(&s, &first).await;
    let delete = |id: &str| carol(reqwest::Method::DELETE, format!("/v1/batches/{id}"), None);
    let (st, body) = delete(&first).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, e) = s.get(&format!("/v1/batches/{first}")).await;
    assert_eq!((st, code(&e)), (StatusCode::NOT_FOUND, "not_found"));
    let (st, e) = delete(&first).await;
    assert_eq!((st, code(&e)), (StatusCode::NOT_FOUND, "not_found"));
    assert_eq!(batch_jobs(&s, &first).await.len(), 3, "the jobs of a deleted batch stay");

    // A running batch is cancelled, then deleted: its jobs end cancelled.
    let started = Instant::now();
    let (st, body) = delete(&long).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    let jobs = batch_jobs(&s, &long).await;
    assert!(!jobs.is_empty() && jobs.iter().all(|(_, st)| st == "cancelled"), "{jobs:?}");

    // Their places and inputs are free again.
    start(nap(&["0", "0", "0", "0", "0"])).await;
    let (_, mine) = list("/v1/batches").await;
    assert_eq!(ids(&mine).len(), 2, "{mine}");
}

#[tokio::test]
async fn a_stopped_batch_goes_with_retention_and_a_running_one_stays() {
    let s = TestServer::start(&["--retention-secs", "1"]).await;
    s.upload("nap", &program(programs::SLEEP)).await;
    let quick = start_batch(&s, json!({"template": {"function": "nap"}, "inputs": [["0"]]})).await;
    let slow = start_batch(&s, json!({"template": {"function": "nap"}, "inputs": [["8"]]})).await;
    until_done(&s, &quick).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, b) = s.get(&format!("/v1/batches/{quick}")).await;
        if st == StatusCode::NOT_FOUND {
            break;
        }
        assert!(Instant::now() < deadline, "a stopped batch outlived its retention: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, b) = s.get(&format!("/v1/batches/{slow}")).await;
    assert_eq!((st, b["status"].as_str()), (StatusCode::OK, Some("running")), "{b}");
}
