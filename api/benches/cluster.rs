//! The PostgreSQL cluster, measured: real `cloudpipe` processes on loopback over a
//! real PostgreSQL started by this program (Debian's `postgresql`, as the tests use).
//! Prints Markdown tables.
//!
//! - `seq wait`: one client, sequential `POST /v1/jobs?wait=30s` of a trivial job
//!   through one `all` node on PostgreSQL, and the same on redb beside it.
//! - `batch`: one batch of trivial jobs driven by an `api` node and run by two
//!   `worker` nodes; the same batch on one redb node beside it.
//! - `failover`: a worker running jobs is killed with SIGKILL; the time until every
//!   one of its jobs runs on the other worker (the lease is the default, 5 s, unless
//!   `CLUSTER_LEASE_MS` says otherwise).
//!
//! ```sh
//! cargo bench -p cloudpipe-api --bench cluster
//! CLUSTER_SEQ=2000 CLUSTER_BATCH=20000 cargo bench -p cloudpipe-api --bench cluster
//! ```

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cloudpipe_test_support::serve;

#[path = "../../runtime/src/store/postgres/testdb.rs"]
mod testdb;

const HELLO_WAT: &str = include_str!("../../examples/hello.wat");

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Nodes of the bench run wasm jobs only: no QEMU template booting beside them (each
/// node would boot one, in software emulation, taking a core for seconds).
const NO_VM: [&str; 2] = ["--vm-qemu", "/nonexistent/qemu-system-x86_64"];

struct Node {
    p: serve::ServeProcess,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(flags: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut all = flags.to_vec();
        all.extend_from_slice(&NO_VM);
        all.push("--no-runner-js");
        let p = serve::spawn_serve(env!("CARGO_BIN_EXE_cloudpipe"), dir.path(), &all);
        Node { p, _dir: dir }
    }

    fn url(&self) -> &str {
        &self.p.url
    }

    fn kill(&mut self) {
        let _ = self.p.child.kill();
        let _ = self.p.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().default_headers(serve::admin_headers()).build().unwrap()
}

async fn upload(http: &reqwest::Client, url: &str, name: &str, wasm: Vec<u8>) {
    let res = http.post(format!("{url}/v1/functions?name={name}")).body(wasm).send().await.unwrap();
    assert!(res.status().is_success(), "upload: {}", res.text().await.unwrap());
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// p50 and p99 of sequential `?wait` submits, in ms.
async fn sequential(url: &str, n: usize) -> (f64, f64, f64) {
    let http = client();
    upload(&http, url, "hello", wat::parse_str(HELLO_WAT).unwrap()).await;
    let body = br#"{"function":"hello","args":["bench"]}"#;
    let run = |n: usize| {
        let http = http.clone();
        async move {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let res = http
                    .post(format!("{url}/v1/jobs?wait=30s"))
                    .header("content-type", "application/json")
                    .body(&body[..])
                    .send()
                    .await
                    .unwrap();
                let job: Value = res.json().await.unwrap();
                assert_eq!(job["status"], "succeeded", "{job}");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }
    };
    run(100).await;
    let mut lat = run(n).await;
    lat.sort_by(f64::total_cmp);
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    (pct(&lat, 0.5), pct(&lat, 0.99), mean)
}

/// Wall time of one batch of `jobs` trivial jobs submitted to `api`.
async fn batch(api: &str, jobs: usize, split: u32) -> f64 {
    let http = client();
    upload(&http, api, "hello", wat::parse_str(HELLO_WAT).unwrap()).await;
    let inputs: Vec<Vec<String>> = (0..jobs).map(|i| vec![i.to_string()]).collect();
    let spec = json!({"template": {"function": "hello"}, "inputs": inputs, "split": split});
    let (done, wall) = serve::run_batch(&http, api, &spec, Duration::from_millis(20)).await;
    assert_eq!(done["counts"]["ok"].as_u64(), Some(jobs as u64), "{done}");
    wall.as_secs_f64()
}

/// Seconds from a worker's SIGKILL until each of its running jobs runs elsewhere.
async fn failover(db: &str, lease_ms: &str) -> (f64, usize) {
    let sleep = cloudpipe_test_programs_artifacts::read(cloudpipe_test_programs_artifacts::SLEEP);
    let common = |role: &'static str, name: &'static str| {
        vec![
            "--store",
            db,
            "--role",
            role,
            "--node",
            name,
            "--lease-ms",
            lease_ms,
            "--concurrency",
            "8",
        ]
    };
    let api = Node::start(&common("api", "f-api"));
    let mut w1 = Node::start(&common("worker", "f-w1"));
    let http = client();
    upload(&http, api.url(), "sleep", sleep).await;
    for _ in 0..8 {
        let res = http
            .post(format!("{}/v1/jobs", api.url()))
            .json(&json!({"function": "sleep", "args": ["60"]}))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success());
    }
    let list = |q: String| {
        let http = http.clone();
        let url = api.url().to_string();
        async move {
            let v = serve::get_json(&http, &format!("{url}/v1/jobs?limit=100&{q}")).await;
            v["jobs"].as_array().unwrap().len()
        }
    };
    while list("status=running&node=f-w1".into()).await < 8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w2 = Node::start(&common("worker", "f-w2"));
    // Let the second worker's first heartbeat land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    w1.kill();
    while list("status=running&node=f-w2".into()).await < 8 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = killed.elapsed().as_secs_f64();
    drop(w2);
    (took, 8)
}

#[tokio::main]
async fn main() {
    let seq: usize = env_or("CLUSTER_SEQ", 1000);
    let jobs: usize = env_or("CLUSTER_BATCH", 10_000);
    let split: u32 = env_or("CLUSTER_SPLIT", 128);
    let lease: String = env_or("CLUSTER_LEASE_MS", "5000".to_string());
    let pg = testdb::TestDb::start();

    let mut seq_rows = Vec::new();
    {
        let n = Node::start(&["--store", &pg.database("seq"), "--node", "seq"]);
        let (p50, p99, mean) = sequential(n.url(), seq).await;
        seq_rows
            .push(format!("| postgres (1 node, all) | {seq} | {p50:.2} | {p99:.2} | {mean:.2} |"));
    }
    {
        let n = Node::start(&["--store", "redb"]);
        let (p50, p99, mean) = sequential(n.url(), seq).await;
        seq_rows.push(format!("| redb (1 node) | {seq} | {p50:.2} | {p99:.2} | {mean:.2} |"));
    }

    let mut batch_rows = Vec::new();
    {
        let db = pg.database("batch");
        let c = split.to_string();
        let api = Node::start(&["--store", &db, "--role", "api", "--node", "b-api"]);
        let _w1 = Node::start(&[
            "--store",
            &db,
            "--role",
            "worker",
            "--node",
            "b-w1",
            "--concurrency",
            &c,
        ]);
        let _w2 = Node::start(&[
            "--store",
            &db,
            "--role",
            "worker",
            "--node",
            "b-w2",
            "--concurrency",
            &c,
        ]);
        // The batch may use every slot of the cluster: both workers' (as it uses every
        // slot of the one redb node below).
        let wall = batch(api.url(), jobs, 2 * split).await;
        batch_rows.push(format!(
            "| postgres: 1 api + 2 workers of {split} slots | {jobs} | {} | {wall:.2} s | **{:.0}** |",
            2 * split,
            jobs as f64 / wall
        ));
    }
    {
        let c = split.to_string();
        let n = Node::start(&["--store", "redb", "--concurrency", &c]);
        let wall = batch(n.url(), jobs, split).await;
        batch_rows.push(format!(
            "| redb: 1 node of {split} slots | {jobs} | {split} | {wall:.2} s | **{:.0}** |",
            jobs as f64 / wall
        ));
    }

    let (took, n) = failover(&pg.database("failover"), &lease).await;

    println!();
    println!("{}; PostgreSQL on the same host", serve::machine_line());
    println!();
    println!("| sequential `?wait` submit → result | requests | p50 ms | p99 ms | mean ms |");
    println!("|---|---:|---:|---:|---:|");
    for r in seq_rows {
        println!("{r}");
    }
    println!();
    println!("| batch of trivial jobs | jobs | split | wall | jobs/s |");
    println!("|---|---:|---:|---:|---:|");
    for r in batch_rows {
        println!("{r}");
    }
    println!();
    println!("| failover | lease | jobs | kill -9 → all running on the other worker |");
    println!("|---|---:|---:|---:|");
    println!("| worker killed with jobs running | {lease} ms | {n} | {took:.2} s |");
}
