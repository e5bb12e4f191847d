//! No request loads more than it returns: lists of jobs with 1 MiB of output each carry
//! no output (unless asked, within a cap), one job still comes whole, and the server's
//! memory stays flat while clients list them in parallel.

use cloudpipe_test_programs_artifacts as programs;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::{TestServer, code, peak_rss_mib, program, rss_mib};

const MIB: usize = 1 << 20;

/// Resets the process's peak resident memory (VmHWM) to its current one.
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("resetting VmHWM");
}

fn ids(page: &Value) -> Vec<String> {
    page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().into()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_of_big_jobs_carry_no_output_and_memory_stays_flat() {
    let s = TestServer::start(&["--concurrency", "8"]).await;
    s.upload("flood", &program(programs::FLOOD)).await;
    const JOBS: usize = 40;
    let submits = (0..JOBS).map(|_| s.run(json!({"function": "flood", "args": ["1"]})));
    let done = futures::future::join_all(submits).await;
    for job in &done {
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["stdout"].as_str().unwrap().len(), MIB, "the answer to a submit is whole");
    }

    // One job comes whole, as before.
    let id = done[0]["id"].as_str().unwrap();
    let (st, one) = s.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(one["stdout"].as_str().unwrap().len(), MIB);
    assert_eq!(one["stderr"], "done\n");
    let raw = s.client.get(format!("{}/v1/jobs/{id}/stdout", s.url)).send().await.unwrap();
    assert_eq!(raw.bytes().await.unwrap().len(), MIB);

    // A list: every job, none with output.
    let res = s.client.get(format!("{}/v1/jobs?limit=1000", s.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = res.bytes().await.unwrap();
    assert!(bytes.len() < 64 << 10, "a list of {JOBS} summaries is {} bytes", bytes.len());
    let page: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(ids(&page).len(), JOBS);
    for job in page["jobs"].as_array().unwrap() {
        assert_eq!((&job["stdout"], &job["stderr"]), (&json!(""), &json!("")), "{job}");
        assert_eq!(job["status"], "succeeded");
    }

    // With output: pages end at the cap (16 MiB: 16 jobs of 1 MiB) and go on by cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/jobs?limit=1000&include=output&cursor={c}"),
            None => "/v1/jobs?limit=1000&include=output".to_string(),
        };
        let (st, page) = s.get(&q).await;
        assert_eq!(st, StatusCode::OK);
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 16, "a page with output holds {} MiB", jobs.len());
        for job in jobs {
            assert_eq!(job["stdout"].as_str().unwrap().len(), MIB);
        }
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids(&s.get("/v1/jobs?limit=1000").await.1), "the pages cover every job");
    let (st, body) = s.get("/v1/jobs?include=stdin").await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_query"), "{body}");

    // Ten clients list at once, five times: the server's memory does not follow the
    // output stored (40 MiB per page if lists decoded it, several times over).
    let pid = s.pid();
    let before = rss_mib(pid);
    reset_peak_rss(pid);
    for _ in 0..5 {
        let lists = (0..10).map(|_| s.get("/v1/jobs?limit=1000"));
        for (st, page) in futures::future::join_all(lists).await {
            assert_eq!(st, StatusCode::OK);
            assert_eq!(ids(&page).len(), JOBS);
        }
    }
    let peak = peak_rss_mib(pid);
    println!("server RSS {before} MiB before 10 parallel lists, peak {peak} MiB");
    assert!(peak < before + 40, "peak RSS {peak} MiB after {before} MiB: lists load output");
}
