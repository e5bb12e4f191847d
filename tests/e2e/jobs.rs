use std::time::{Duration, Instant};

use cloudpipe_test_programs_artifacts as programs;
use reqwest::StatusCode;
use serde_json::json;

use crate::server::{TestServer, code, program};

#[tokio::test]
async fn args_env_and_stdin_go_in_and_stdout_stderr_exit_code_come_out_exactly() {
    let s = TestServer::start(&[]).await;
    let f = s.upload("echo", &program(programs::ECHO)).await;
    assert_eq!(f["kind"], "command");
    assert!(f["id"].as_str().unwrap().starts_with("sha256:"));

    let job = s
        .run(json!({"function": "echo", "args": ["a b", "ü", "--exit=7"], "env": {"GREETING": "hi there"},
                    "stdin": "line1\nline2 ✓"}))
        .await;
    let id = job["id"].as_str().unwrap();
    let expected = format!(
        "argv=[\"echo\", \"a b\", \"ü\", \"--exit=7\"]\nCLOUDPIPE_JOB_ID={id}\nCLOUDPIPE_FUNCTION=echo\nCLOUDPIPE_ATTEMPT=1\nGREETING=hi there\nenv_count=4\nstdin=line1\nline2 ✓"
    );
    assert_eq!(job["stdout"], expected);
    assert_eq!(job["stderr"], "to stderr\n");
    assert_eq!(job["status"], "failed");
    // WASI 0.2's `exit` carries only ok/err: Rust std's `exit(7)` in a component
    // arrives as 1 (guests keep their code through `exit-with-code`, see `hostile`).
    assert_eq!(job["exit_code"], 1);
    assert_eq!(job["error"]["kind"], "exit");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["stdout_truncated"], false);
    assert!(job["queue_ms"].as_f64().is_some() && job["run_ms"].as_f64().is_some(), "{job}");

    let ok = s.run(json!({"function": "echo", "stdin_base64": "AAH/"})).await;
    assert_eq!(ok["status"], "succeeded");
    assert_eq!(ok["exit_code"], 0);
    assert!(ok["error"].is_null(), "{ok}");
    // Raw bytes of stdout, binary stdin intact.
    let raw = s
        .client
        .get(format!("{}/v1/jobs/{}/stdout", s.url, ok["id"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    let bytes = raw.bytes().await.unwrap();
    assert!(bytes.ends_with(b"stdin=\x00\x01\xff"), "{bytes:?}");
}

#[tokio::test]
async fn a_job_can_be_followed_as_server_sent_events() {
    let s = TestServer::start(&[]).await;
    s.upload("sleep", &program(programs::SLEEP)).await;
    let (st, job) = s.post_json("/v1/jobs", &json!({"function": "sleep", "args": ["1"]})).await;
    assert_eq!(st, StatusCode::CREATED);
    let id = job["id"].as_str().unwrap();
    let res = s.client.get(format!("{}/v1/jobs/{id}/events", s.url)).send().await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(Duration::from_secs(20), res.text())
        .await
        .expect("stream ends with the job")
        .unwrap();
    assert!(text.contains("event: status"), "{text}");
    assert!(text.contains("event: stdout") && text.contains("sleeping"), "{text}");
    let last = text.lines().rfind(|l| l.starts_with("data:")).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(last.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["record"]["stdout"], "sleeping\nwoke up\n");
}

#[tokio::test]
async fn a_late_follower_gets_the_output_written_before_it_came_once() {
    let s = TestServer::start(&[]).await;
    s.upload("sleep", &program(programs::SLEEP)).await;
    let (_, job) = s.post_json("/v1/jobs", &json!({"function": "sleep", "args": ["2"]})).await;
    let id = job["id"].as_str().unwrap();
    // "sleeping" is printed at once; follow well after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = s.client.get(format!("{}/v1/jobs/{id}/events", s.url)).send().await.unwrap();
    let text = tokio::time::timeout(Duration::from_secs(20), res.text()).await.unwrap().unwrap();
    let stdout: String = text
        .split("\n\n")
        .filter(|ev| ev.contains("event: stdout"))
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data:")))
        .map(|d| {
            serde_json::from_str::<serde_json::Value>(d.trim()).unwrap()["data"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(stdout, "sleeping\nwoke up\n", "{text}");
}

#[tokio::test]
async fn result_long_polls_until_the_job_ends() {
    let s = TestServer::start(&[]).await;
    s.upload("sleep", &program(programs::SLEEP)).await;
    let (_, job) = s.post_json("/v1/jobs", &json!({"function": "sleep", "args": ["1"]})).await;
    let id = job["id"].as_str().unwrap();
    let (st, early) = s.get(&format!("/v1/jobs/{id}/result?wait=50ms")).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{early}");
    assert_eq!(early["status"], "running");
    let (st, done) = s.get(&format!("/v1/jobs/{id}/result?wait=30s")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(done["status"], "succeeded");
}

#[tokio::test]
async fn cancelling_a_running_job_stops_it_within_100ms() {
    let s = TestServer::start(&[]).await;
    s.upload("loop", &program(programs::LOOP_FOREVER)).await;
    s.upload("sleep", &program(programs::SLEEP)).await;
    for function in ["loop", "sleep"] {
        let (_, job) =
            s.post_json("/v1/jobs", &json!({"function": function, "timeout_ms": 60000})).await;
        let id = job["id"].as_str().unwrap();
        assert_eq!(job["status"], "running");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        let (st, after) = s.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
        let took = t.elapsed();
        assert_eq!(st, StatusCode::OK, "{after}");
        assert_eq!(after["status"], "cancelled", "{after}");
        assert_eq!(after["error"]["kind"], "cancelled");
        assert!(took < Duration::from_millis(100), "{function}: cancel took {took:?}");
        // Cancelling again changes nothing.
        let (_, again) = s.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
        assert_eq!(again["status"], "cancelled");
    }
}

#[tokio::test]
async fn queued_jobs_can_be_cancelled_and_never_run() {
    let s = TestServer::start(&["--concurrency", "1"]).await;
    s.upload("sleep", &program(programs::SLEEP)).await;
    let (_, first) = s.post_json("/v1/jobs", &json!({"function": "sleep", "args": ["1"]})).await;
    let (_, second) = s.post_json("/v1/jobs", &json!({"function": "sleep", "args": ["1"]})).await;
    assert_eq!(second["status"], "queued");
    let id = second["id"].as_str().unwrap();
    let (_, c) = s.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(c["status"], "cancelled");
    assert_eq!(c["attempts"], 0);
    let done = s.wait_terminal(first["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded");
    let (_, c) = s.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(c["status"], "cancelled");
    assert_eq!(c["attempts"], 0);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_job() {
    let s = TestServer::start(&[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    let spec = json!({"function": "echo", "args": ["once"], "idempotency_key": "order-42"});
    let (st1, a) = s.post_json("/v1/jobs?wait=10s", &spec).await;
    let (st2, b) = s.post_json("/v1/jobs", &spec).await;
    assert_eq!(st1, StatusCode::CREATED);
    assert_eq!(st2, StatusCode::OK);
    assert_eq!(a["id"], b["id"]);
    let (_, list) = s.get("/v1/jobs?function=echo").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_waiting_submits_of_one_key_run_one_job() {
    let s = TestServer::start(&[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    let spec = json!({"function": "echo", "args": ["once"], "idempotency_key": "order-7"});
    let answers =
        futures::future::join_all((0..8).map(|_| s.post_json("/v1/jobs?wait=10s", &spec))).await;
    let created = answers.iter().filter(|(st, _)| *st == StatusCode::CREATED).count();
    assert_eq!(created, 1, "{answers:?}");
    for (st, job) in &answers {
        assert!(matches!(*st, StatusCode::CREATED | StatusCode::OK), "{st} {job}");
        assert_eq!(job["id"], answers[0].1["id"]);
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1);
    }
    let (_, list) = s.get("/v1/jobs?function=echo").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");
    // Written once, finished: the same key later still names it.
    let (st, again) = s.post_json("/v1/jobs?wait=10s", &spec).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(again, answers[0].1);
}

#[tokio::test]
async fn jobs_are_listed_newest_first_with_filters_and_cursor() {
    let s = TestServer::start(&[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let tags = if i % 2 == 0 { json!(["even"]) } else { json!(["odd"]) };
        let args = if i == 4 { json!(["--exit=1"]) } else { json!([]) };
        let job = s.run(json!({"function": "echo", "tags": tags, "args": args})).await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let (_, page1) = s.get("/v1/jobs?limit=2").await;
    let got: Vec<_> = page1["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, [ids[4].clone(), ids[3].clone()]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = s.get(&format!("/v1/jobs?limit=10&cursor={cursor}")).await;
    assert_eq!(page2["jobs"].as_array().unwrap().len(), 3);
    assert!(page2["next_cursor"].is_null());
    let (_, even) = s.get("/v1/jobs?tag=even").await;
    assert_eq!(even["jobs"].as_array().unwrap().len(), 3);
    let (_, failed) = s.get("/v1/jobs?status=failed").await;
    assert_eq!(failed["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(failed["jobs"][0]["id"], ids[4].as_str());
    let (st, bad) = s.get("/v1/jobs?status=done").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(code(&bad), "invalid_query");
    assert_eq!(s.metric("cloudpipe_jobs{status=\"succeeded\"}").await, 4.0);
    assert_eq!(s.metric("cloudpipe_jobs{status=\"failed\"}").await, 1.0);
}

/// One account's backlog does not starve another: with two run slots busy with
/// account A's one-second jobs and 2,000 more of them queued, account B's job starts
/// when the next slot frees, not after A's backlog (claims go round-robin across
/// accounts).
#[tokio::test]
async fn a_flooding_account_does_not_starve_another() {
    const SLOT_SECS: u64 = 1;
    let s = TestServer::start(&["--concurrency", "2"]).await;
    let mut keys = Vec::new();
    for name in ["flood", "late"] {
        let (st, body) = s
            .post_json(
                "/v1/accounts",
                &json!({"name": name, "quotas": {"max_concurrent_jobs": 5000}}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
        let (st, key) = s.post_json(&format!("/v1/accounts/{name}/keys"), &json!({})).await;
        assert_eq!(st, StatusCode::CREATED, "{key}");
        keys.push(format!("Bearer {}", key["key"].as_str().unwrap()));
    }
    let submit = |key: &str, function: &str| {
        let req = s.client.post(format!("{}/v1/jobs", s.url)).header("authorization", key).json(
            &json!({"function": function, "args": [SLOT_SECS.to_string()], "timeout_ms": 60000}),
        );
        async move {
            let res = req.send().await.unwrap();
            let st = res.status();
            let job: serde_json::Value = res.json().await.unwrap();
            assert_eq!(st, StatusCode::CREATED, "{job}");
            job["id"].as_str().unwrap().to_string()
        }
    };
    for (i, key) in keys.iter().enumerate() {
        let res = s
            .client
            .post(format!("{}/v1/functions?name=nap-{i}", s.url))
            .header("authorization", key)
            .body(program(programs::SLEEP))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    for _ in 0..20 {
        let chunk: Vec<_> = (0..100).map(|_| submit(&keys[0], "nap-0")).collect();
        futures::future::join_all(chunk).await;
    }
    let id = submit(&keys[1], "nap-1").await;
    let job = s.wait_terminal(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let queued_ms = job["queue_ms"].as_f64().unwrap();
    // One slot's time, and some room for a busy machine: far below the ~1,000 s that
    // first-in first-out would take.
    assert!(
        queued_ms <= (SLOT_SECS * 1000) as f64 + 1500.0,
        "B's job waited {queued_ms} ms behind A's backlog"
    );
    let (_, queued) = s.get("/v1/jobs?status=queued&account=flood&limit=1000").await;
    assert!(queued["jobs"].as_array().unwrap().len() >= 990, "A's backlog is still there");
}
