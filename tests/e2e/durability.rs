//! Every acknowledged job survives `kill -9` of the server: after a restart it reaches
//! a terminal state, attempts counted.

use std::collections::HashMap;
use std::time::Duration;

use cloudpipe_test_programs_artifacts as programs;
use reqwest::StatusCode;
use serde_json::json;

use crate::server::{TestServer, program};

async fn jobs_survive_kill_9(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--store", backend, "--concurrency", "40"];
    let mut s = TestServer::start_in(dir.path(), &flags).await;
    s.upload("sleep", &program(programs::SLEEP)).await;
    s.upload("echo", &program(programs::ECHO)).await;

    // 40 jobs sleep (running at the kill, even on a slow machine), 60 wait in the
    // queue behind them.
    let mut ids = Vec::new();
    for i in 0..100 {
        let spec = if i < 40 {
            json!({"function": "sleep", "args": ["5"], "idempotency_key": format!("k{i}")})
        } else {
            json!({"function": "echo", "args": [i.to_string()], "idempotency_key": format!("k{i}")})
        };
        let (st, job) = s.post_json("/v1/jobs", &spec).await;
        assert_eq!(st, StatusCode::CREATED, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    s.kill9();

    let s = TestServer::start_in(dir.path(), &flags).await;
    let mut attempts = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let job = s.wait_terminal(id).await;
        assert_eq!(job["status"], "succeeded", "{backend}: job {i} {job}");
        *attempts.entry(job["attempts"].as_u64().unwrap()).or_insert(0) += 1;
        if i >= 40 {
            assert!(
                job["stdout"].as_str().unwrap().starts_with(&format!("argv=[\"echo\", \"{i}\"]"))
            );
        }
    }
    // The sleepers were cut off once: two attempts each.
    assert_eq!(attempts.get(&2).copied().unwrap_or(0), 40, "{backend}: attempts {attempts:?}");
    assert_eq!(attempts.get(&1).copied().unwrap_or(0), 60, "{backend}: attempts {attempts:?}");
    // Idempotency keys survived too: resubmitting returns the same job.
    let (st, again) =
        s.post_json("/v1/jobs", &json!({"function": "echo", "idempotency_key": "k50"})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(again["id"], ids[50].as_str());
    assert_eq!(s.metric("cloudpipe_jobs{status=\"succeeded\"}").await, 100.0);
}

#[tokio::test]
async fn jobs_survive_kill_9_with_redb() {
    jobs_survive_kill_9("redb").await;
}

#[tokio::test]
async fn jobs_survive_kill_9_with_sled() {
    jobs_survive_kill_9("sled").await;
}

#[tokio::test]
async fn a_job_that_keeps_crashing_the_server_stops_at_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(dir.path(), &[]).await;
    s.upload("sleep", &program(programs::SLEEP)).await;
    let (_, job) = s
        .post_json("/v1/jobs", &json!({"function": "sleep", "args": ["30"], "max_attempts": 2}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.kill9();
        s = TestServer::start_in(dir.path(), &[]).await;
    }
    let job = s.wait_terminal(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["error"]["kind"], "attempts_exhausted");
}

#[tokio::test]
async fn results_answered_to_waiting_clients_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(dir.path(), &[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    let mut answered = Vec::new();
    for i in 0..50 {
        // No idempotency key and a free slot: the short path, one commit per job.
        let job = s.run(json!({"function": "echo", "args": [i.to_string()]})).await;
        assert_eq!(job["status"], "succeeded");
        answered.push(job);
    }
    s.kill9();
    let s = TestServer::start_in(dir.path(), &[]).await;
    for job in answered {
        let (st, kept) = s.get(&format!("/v1/jobs/{}", job["id"].as_str().unwrap())).await;
        assert_eq!(st, StatusCode::OK, "{kept}");
        assert_eq!(kept, job);
    }
}

#[tokio::test]
async fn keyed_results_answered_to_waiting_clients_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(dir.path(), &[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    let mut answered = Vec::new();
    for i in 0..20 {
        // A key and a free slot: run before the write, the key in the job's commit.
        let spec = json!({"function": "echo", "args": [i.to_string()], "idempotency_key": format!("k{i}")});
        let (st, job) = s.post_json("/v1/jobs?wait=10s", &spec).await;
        assert_eq!(st, StatusCode::CREATED, "{job}");
        assert_eq!(job["status"], "succeeded");
        answered.push((spec, job));
    }
    s.kill9();
    let s = TestServer::start_in(dir.path(), &[]).await;
    for (spec, job) in answered {
        let (st, kept) = s.get(&format!("/v1/jobs/{}", job["id"].as_str().unwrap())).await;
        assert_eq!(st, StatusCode::OK, "{kept}");
        assert_eq!(kept, job);
        let (st, again) = s.post_json("/v1/jobs?wait=10s", &spec).await;
        assert_eq!(st, StatusCode::OK, "the key was written with the job: {again}");
        assert_eq!(again, job);
    }
}

#[tokio::test]
async fn a_clean_shutdown_hands_running_jobs_back_without_using_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--shutdown-grace-ms", "200"];
    let mut s = TestServer::start_in(dir.path(), &flags).await;
    s.upload("sleep", &program(programs::SLEEP)).await;
    let (_, job) = s
        .post_json("/v1/jobs", &json!({"function": "sleep", "args": ["2"], "max_attempts": 1}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    // A long-poll open at shutdown is answered, not cut.
    let poll = s.client.get(format!("{}/v1/jobs/{id}/result?wait=60s", s.url)).send();
    let (poll, status) = tokio::join!(poll, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.terminate()
    });
    assert_eq!(status.code(), Some(0), "{}", s.log());
    let poll = poll.expect("the long-poll got an answer");
    assert_eq!(poll.status(), StatusCode::ACCEPTED);
    assert_eq!(poll.json::<serde_json::Value>().await.unwrap()["status"], "running");

    let s = TestServer::start_in(dir.path(), &flags).await;
    let job = s.wait_terminal(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "the cut-short attempt does not count: {job}");
}
