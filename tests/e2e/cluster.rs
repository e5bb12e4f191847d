//! Cloudpipe past one machine: API and worker nodes (real `cloudpipe` processes) on
//! one real PostgreSQL, with nodes killed (`kill -9`) and the database restarted
//! under them.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cloudpipe_test_programs_artifacts as programs;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::server::{TestServer, program};

#[path = "../../runtime/src/store/postgres/testdb.rs"]
mod testdb;

/// Lease of the test nodes, in milliseconds: short, so failover tests are quick.
const LEASE_MS: &str = "1000";

/// A node of `role` named `name` on the database at `db`.
async fn node(dir: &Path, db: &str, role: &str, name: &str, extra: &[&str]) -> TestServer {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    let mut flags = vec!["--store", db, "--role", role, "--node", name, "--lease-ms", LEASE_MS];
    flags.extend_from_slice(extra);
    TestServer::start_in(&sub, &flags).await
}

/// A database of its own on the shared test cluster.
fn database(name: &str) -> String {
    testdb::shared().database(name)
}

async fn submit(s: &TestServer, spec: Value) -> String {
    let (st, job) = s.post_json("/v1/jobs", &spec).await;
    assert!(st.is_success(), "submit: {st} {job}\n{}", s.log());
    job["id"].as_str().unwrap().to_string()
}

async fn jobs_where(s: &TestServer, query: &str) -> Vec<Value> {
    let (st, list) = s.get(&format!("/v1/jobs?limit=1000&{query}")).await;
    assert_eq!(st, StatusCode::OK, "{list}");
    list["jobs"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_of_a_killed_worker_finish_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("killed_worker");
    let api = node(dir.path(), &db, "api", "api-a", &[]).await;
    let mut w1 = node(dir.path(), &db, "worker", "worker-1", &["--concurrency", "20"]).await;
    let w2 = node(dir.path(), &db, "worker", "worker-2", &["--concurrency", "20"]).await;
    api.upload("sleep", &program(programs::SLEEP)).await;

    let mut ids = Vec::new();
    for i in 0..40 {
        let spec = json!({"function": "sleep", "args": ["2"], "idempotency_key": format!("k{i}")});
        ids.push(submit(&api, spec).await);
    }
    // Wait until worker-1 runs some of them, then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let on_w1 = loop {
        let running = jobs_where(&api, "status=running&node=worker-1").await;
        if running.len() >= 10 {
            break running
                .iter()
                .map(|j| j["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>();
        }
        assert!(Instant::now() < deadline, "worker-1 took no jobs\n{}", w1.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    w1.kill9();

    let mut attempts = HashMap::new();
    for id in &ids {
        let (_, job) = api.get(&format!("/v1/jobs/{id}/result?wait=60s")).await;
        assert!(crate::server::is_terminal(&job), "{job}\napi: {}\nw2: {}", api.log(), w2.log());
        assert_eq!(job["status"], "succeeded", "{job}\n{}", w2.log());
        // One attempt's output only: the first attempt's died with its node.
        assert_eq!(job["stdout"], "sleeping\nwoke up\n", "{job}");
        let n = job["attempts"].as_u64().unwrap();
        if on_w1.contains(id) {
            assert_eq!(n, 2, "a job cut off on worker-1 runs once more: {job}");
            assert_eq!(job["node"], "worker-2", "{job}");
        }
        *attempts.entry(n).or_insert(0) += 1;
    }
    // At least those seen on worker-1 before the kill ran twice (it may have started
    // more in the instant before it died).
    assert!(attempts.get(&2).copied().unwrap_or(0) >= on_w1.len(), "{attempts:?}");
    assert_eq!(attempts.values().sum::<usize>(), 40);

    // The dead worker is stale in the node list; the others lead and work.
    let (_, nodes) = api.get("/v1/nodes").await;
    let nodes = nodes["nodes"].as_array().unwrap().clone();
    let by_name = |n: &str| nodes.iter().find(|x| x["name"] == n).cloned();
    assert_eq!(by_name("worker-1").unwrap()["stale"], true, "{nodes:?}");
    assert_eq!(by_name("worker-2").unwrap()["stale"], false, "{nodes:?}");
    assert_eq!(by_name("worker-2").unwrap()["executors"][0], "wasm", "{nodes:?}");
    assert_eq!(nodes.iter().filter(|n| n["leader"] == true).count(), 1, "{nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_api_node_serves_jobs_events_and_revocations_after_another_dies() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("api_nodes");
    let mut a = node(dir.path(), &db, "api", "api-a", &[]).await;
    let b = node(dir.path(), &db, "api", "api-b", &[]).await;
    let _w = node(dir.path(), &db, "worker", "worker-1", &[]).await;
    a.upload("sleep", &program(programs::SLEEP)).await;
    a.upload("echo", &program(programs::ECHO)).await;

    // Live output of a job on the worker, followed through API node B.
    let id = submit(&a, json!({"function": "sleep", "args": ["1"]})).await;
    let res = b.client.get(format!("{}/v1/jobs/{id}/events", b.url)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = tokio::time::timeout(Duration::from_secs(30), res.text()).await.unwrap().unwrap();
    assert!(
        text.contains("event: stdout\ndata: {\"event\":\"stdout\",\"data\":\"sleeping\\n\"}"),
        "{text}"
    );
    assert!(text.contains("woke up"), "{text}");
    assert!(text.contains("\"status\":\"succeeded\""), "{text}");

    // A `?wait` submit through B runs on the worker and answers when it ends.
    let (st, job) =
        b.post_json("/v1/jobs?wait=30s", &json!({"function": "echo", "args": ["x"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["node"], "worker-1");

    // A key revoked through A is refused by B at once.
    let (st, acct) = a.post_json("/v1/accounts", &json!({"name": "carol"})).await;
    assert_eq!(st, StatusCode::CREATED, "{acct}");
    let (st, created) = a.post_json("/v1/accounts/carol/keys", &json!({})).await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["id"].as_str().unwrap().to_string();
    let me = |s: &TestServer, key: String| {
        let req = reqwest::Client::new().get(format!("{}/v1/me", s.url)).bearer_auth(key);
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(me(&b, key.clone()).await, StatusCode::OK);
    // Its only key: revoking it needs `force`.
    let (st, _) =
        a.request(reqwest::Method::DELETE, &format!("/v1/keys/{key_id}?force=true"), None).await;
    assert!(st.is_success(), "{st}");
    let revoked_at = Instant::now();
    while me(&b, key.clone()).await != StatusCode::UNAUTHORIZED {
        assert!(revoked_at.elapsed() < Duration::from_secs(1), "B still takes a revoked key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A dies with a keyed job just submitted: B has it, and the key still holds.
    let id =
        submit(&a, json!({"function": "echo", "args": ["y"], "idempotency_key": "once"})).await;
    a.kill9();
    let job = b.wait_terminal(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let (st, again) =
        b.post_json("/v1/jobs", &json!({"function": "echo", "idempotency_key": "once"})).await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(again["id"], id.as_str());
    // Cancel through B reaches the job on the worker.
    let id = submit(&b, json!({"function": "sleep", "args": ["30"]})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.get(&format!("/v1/jobs/{id}")).await.1["status"] != "running" {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (st, job) = b.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(st, StatusCode::OK, "{job}");
    let job = b.wait_terminal(&id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_survives_the_death_of_the_node_driving_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("batch_driver");
    let mut a = node(dir.path(), &db, "api", "api-a", &[]).await;
    let b = node(dir.path(), &db, "api", "api-b", &[]).await;
    let w = node(dir.path(), &db, "worker", "worker-1", &[]).await;
    a.upload("sleep", &program(programs::SLEEP)).await;
    let inputs: Vec<Value> = (0..12).map(|_| json!(["1"])).collect();
    let (st, batch) = a
        .post_json(
            "/v1/batches",
            &json!({"template": {"function": "sleep"}, "inputs": inputs, "split": 3}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{batch}");
    let id = batch["id"].as_str().unwrap().to_string();
    // Let some inputs run, then kill the driver.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, b) = a.get(&format!("/v1/batches/{id}")).await;
        if b["counts"]["ok"].as_u64().unwrap_or(0) >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the batch did not progress: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.kill9();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let (_, batch) = b.get(&format!("/v1/batches/{id}")).await;
        if batch["status"] != "running" {
            break batch;
        }
        assert!(Instant::now() < deadline, "the batch never finished: {batch}\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "finished", "{done}");
    assert_eq!(done["counts"]["ok"], 12, "{done}");
    // Each input ran once to success (a job cut off with its driver is waited for,
    // not launched again).
    let jobs = jobs_where(&b, &format!("batch={id}")).await;
    let ok = jobs.iter().filter(|j| j["status"] == "succeeded").count();
    assert_eq!(ok, 12, "{jobs:?}");
    // Another node (B, or the worker: any node may drive) took it over.
    let logs = format!("{}\n{}", b.log(), w.log());
    assert!(logs.contains("taking over a batch"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_when_postgres_restarts_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let pg = testdb::TestDb::start();
    let db = pg.url();
    let s = node(dir.path(), &db, "all", "node-1", &[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    let url = s.url.clone();
    let client = s.client.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut acked, mut refused) = (Vec::new(), 0);
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let spec = json!({"function": "echo", "args": [i.to_string()]});
                let res = client.post(format!("{url}/v1/jobs")).json(&spec).send().await;
                match res {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        let job: Value = r.json().await.unwrap();
                        acked.push((i, job["id"].as_str().unwrap().to_string()));
                    }
                    _ => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                i += 1;
            }
            (acked, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| pg.restart());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, refused) = load.await.unwrap();
    assert!(
        acked.len() > 20,
        "too few jobs were acknowledged: {} ({refused} refused)",
        acked.len()
    );
    let after = acked.iter().filter(|(i, _)| *i > acked.len() / 2).count();
    assert!(after > 0, "no submit worked after the restart\n{}", s.log());
    for (i, id) in &acked {
        let job = s.wait_terminal(id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert!(job["stdout"].as_str().unwrap().contains(&format!("\"{i}\"")), "{job}");
    }
}

use crate::docker::docker_support;

/// A worker whose Docker engine comes up after it started begins claiming docker jobs
/// (and says so in `/v1/nodes`) without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_takes_jobs_of_an_executor_that_came_up_after_it_started() {
    docker_support::ensure_engine();
    docker_support::ensure_image();
    let dir = tempfile::tempdir().unwrap();
    let db = database("late_executor");
    let api = node(dir.path(), &db, "api", "api", &[]).await;
    // The worker's engine socket does not exist yet.
    let socket = dir.path().join("docker.sock");
    let host = format!("unix://{}", socket.display());
    let sub = dir.path().join("worker");
    std::fs::create_dir_all(&sub).unwrap();
    let flags = ["--store", &db, "--role", "worker", "--node", "worker", "--lease-ms", LEASE_MS];
    let _w = TestServer::start_in_env(&sub, &flags, &[("DOCKER_HOST", host.as_str())]).await;
    let executors = async || -> Vec<Value> {
        let (st, nodes) = api.get("/v1/nodes").await;
        assert_eq!(st, StatusCode::OK, "{nodes}");
        let worker = nodes["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "worker");
        worker.map(|w| w["executors"].as_array().unwrap().clone()).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !executors().await.contains(&json!("wasm")) {
        assert!(Instant::now() < deadline, "the worker never reported its executors");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!executors().await.contains(&json!("docker")), "no engine yet");

    // The engine comes up (its socket appears where the worker looks).
    std::os::unix::fs::symlink("/var/run/docker.sock", &socket).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !executors().await.contains(&json!("docker")) {
        assert!(
            Instant::now() < deadline,
            "the worker never took up docker: {:?}",
            executors().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spec = json!({"executor": "docker", "image": docker_support::TEST_IMAGE,
                      "command": ["sh", "-c", "echo from-docker"]});
    let job = api.wait_terminal(&submit(&api, spec).await).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["node"], "worker");
    assert_eq!(job["stdout"], "from-docker\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_locked_out_of_a_running_cluster_gets_a_key_back_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("reset_key");
    let a = node(dir.path(), &db, "all", "all-a", &[]).await;
    let (_, keys) = a.get("/v1/accounts/admin/keys").await;
    let admin_id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    let (st, _) = a.request(Method::DELETE, &format!("/v1/keys/{admin_id}?force=true"), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(a.get("/v1/me").await.0, StatusCode::UNAUTHORIZED);

    let key = crate::server::admin_reset_key(&["--store".as_ref(), db.as_ref()]);
    let as_new = |path: &str| {
        reqwest::Client::new().get(format!("{}{path}", a.url)).bearer_auth(&key).send()
    };
    let me = as_new("/v1/me").await.unwrap();
    assert_eq!(me.status(), StatusCode::OK, "the running node takes the new key");
    let me: Value = me.json().await.unwrap();
    assert_eq!(me["role"], "admin", "{me}");
    // The command's own node left the cluster with it.
    let nodes = as_new("/v1/nodes").await.unwrap();
    assert_eq!(nodes.status(), StatusCode::OK);
    let nodes: Value = nodes.json().await.unwrap();
    let names: Vec<&str> =
        nodes["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["all-a"], "{nodes}");
}
