//! HTTP load benchmark: the real `cloudpipe` binary on loopback, driven by a reqwest
//! client, with the durable default store (redb, one fdatasync per commit) and sled.
//!
//! Scenarios, per store:
//! - `seq wait`: one client, sequential `POST /v1/jobs?wait=30s` of a trivial job
//!   (the `hello` preview1 module from `examples/hello.wat`, and the `hello` component
//!   of the test programs), after a warm-up: submit → result latency.
//! - `cN wait`: N concurrent keep-alive connections doing the same for a fixed time:
//!   jobs/s completed and latency.
//! - `cN submit`: N connections submitting without `?wait` (the answer comes once the
//!   job is durable); the backlog is left to drain before the next scenario.
//!
//! Prints markdown tables: latency/throughput, then a breakdown (server and client CPU
//! per job from `/proc`, and the job record's `queue_ms`/`run_ms`).
//!
//! `cargo bench -p cloudpipe-api --bench load`
//!
//! Knobs (environment): `LOAD_SEQ` requests per sequential run (2000), `LOAD_WARMUP`
//! (200), `LOAD_SECS` per concurrent run (10), `LOAD_CONNS` (`32,128`), `LOAD_STORES`
//! (`redb,sled`), `LOAD_SERVER_CONCURRENCY` (256), `LOAD_CLIENT_THREADS` (1),
//! `LOAD_NO_SUBMIT=1` skips the submit-only runs, `LOAD_P2=0` skips the component.
//! See `benches/README.md`.

use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use cloudpipe_test_support::serve;
use serve::spawn_serve;

const HELLO_WAT: &str = include_str!("../../examples/hello.wat");

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Clock ticks per second of `/proc/*/stat` times.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a process (`self` or a pid), 0 if unreadable.
fn cpu_secs(pid: &str, tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces): state is field 3,
    // utime field 14 and stime field 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / tck
}

/// A `cloudpipe serve` on 127.0.0.1 with a port the OS picked and a fresh data dir.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
    _tmp: tempfile::TempDir,
}

impl Server {
    fn start(store: &str, concurrency: usize) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let concurrency = concurrency.to_string();
        let p = spawn_serve(
            env!("CARGO_BIN_EXE_cloudpipe"),
            tmp.path(),
            &["--store", store, "--concurrency", &concurrency],
        );
        Server { child: p.child, url: p.url, log: p.log, _tmp: tmp }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The parts of a job record the bench looks at.
#[derive(Deserialize)]
struct Record {
    status: String,
    #[serde(default)]
    queue_ms: Option<f64>,
    #[serde(default)]
    run_ms: Option<f64>,
}

/// What one run measured.
#[derive(Default)]
struct Sample {
    lat: Vec<Duration>,
    queue_ms: Vec<f64>,
    run_ms: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

impl Sample {
    fn merge(&mut self, o: Sample) {
        self.lat.extend(o.lat);
        self.queue_ms.extend(o.queue_ms);
        self.run_ms.extend(o.run_ms);
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

struct Row {
    scenario: String,
    store: String,
    requests: usize,
    errors: u64,
    elapsed: Duration,
    lat: Vec<Duration>,
    server_cpu: f64,
    client_cpu: f64,
    queue_ms: Vec<f64>,
    run_ms: Vec<f64>,
}

fn pct<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A percentile of job-record times, `-` when the records had none (submit only).
fn opt_ms(sorted: &[f64], q: f64) -> String {
    if sorted.is_empty() { "-".into() } else { format!("{:.3}", pct(sorted, q)) }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

struct Client {
    http: reqwest::Client,
    url: String,
}

impl Client {
    /// One submit; `Ok` carries the record when the answer was a job record.
    async fn submit(&self, body: &'static [u8], wait: bool) -> Result<Record, String> {
        let path = if wait { "/v1/jobs?wait=30s" } else { "/v1/jobs" };
        let res = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("send: {e}"))?;
        let st = res.status();
        let bytes = res.bytes().await.map_err(|e| format!("body: {e}"))?;
        if !st.is_success() {
            return Err(format!("{st}: {}", String::from_utf8_lossy(&bytes)));
        }
        let r: Record = serde_json::from_slice(&bytes).map_err(|e| format!("json: {e}"))?;
        let expected_ok = if wait { r.status == "succeeded" } else { r.status != "failed" };
        if !expected_ok {
            return Err(format!("status {}: {}", r.status, String::from_utf8_lossy(&bytes)));
        }
        Ok(r)
    }

    async fn upload(&self, name: &str, wasm: Vec<u8>) {
        let res = self
            .http
            .post(format!("{}/v1/functions?name={name}", self.url))
            .body(wasm)
            .send()
            .await
            .expect("upload");
        assert!(res.status().is_success(), "upload {name}: {}", res.status());
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = serve::metrics(&self.http, &self.url).await;
        serve::metric_value(&text, name).unwrap_or(0.0)
    }

    /// Waits until no job is queued or running (after a submit-only run).
    async fn drain(&self) -> Duration {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(300) {
            let q = self.metric("cloudpipe_queue_depth ").await;
            let r = self.metric("cloudpipe_jobs_running_local ").await;
            if q == 0.0 && r == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t.elapsed()
    }
}

fn record(s: &mut Sample, r: Result<Record, String>, took: Duration) {
    match r {
        Ok(r) => {
            s.lat.push(took);
            if let Some(q) = r.queue_ms {
                s.queue_ms.push(q);
            }
            if let Some(x) = r.run_ms {
                s.run_ms.push(x);
            }
        }
        Err(e) => {
            s.errors += 1;
            s.first_error.get_or_insert(e);
        }
    }
}

/// `n` sequential submits.
async fn sequential(c: &Client, body: &'static [u8], n: usize) -> Sample {
    let mut s = Sample::default();
    for _ in 0..n {
        let t = Instant::now();
        let r = c.submit(body, true).await;
        record(&mut s, r, t.elapsed());
    }
    s
}

/// `conns` tasks submitting back to back until `dur` has passed.
async fn concurrent(
    c: &Arc<Client>,
    body: &'static [u8],
    wait: bool,
    conns: usize,
    dur: Duration,
) -> Sample {
    let deadline = Instant::now() + dur;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut s = Sample::default();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = c.submit(body, wait).await;
                    record(&mut s, r, t.elapsed());
                    if s.errors > 1000 {
                        break;
                    }
                }
                s
            })
        })
        .collect();
    let mut all = Sample::default();
    for t in tasks {
        all.merge(t.await.expect("client task"));
    }
    all
}

async fn measure<F, Fut>(
    rows: &mut Vec<Row>,
    srv: &Server,
    tck: f64,
    scenario: String,
    store: &str,
    run: F,
) where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Sample>,
{
    let pid = srv.pid();
    let (s0, c0) = (cpu_secs(&pid, tck), cpu_secs("self", tck));
    let t = Instant::now();
    let mut s = run().await;
    let elapsed = t.elapsed();
    let (s1, c1) = (cpu_secs(&pid, tck), cpu_secs("self", tck));
    if let Some(e) = &s.first_error {
        eprintln!("  {scenario} [{store}]: {} errors, first: {e}", s.errors);
    }
    s.lat.sort();
    s.queue_ms.sort_by(f64::total_cmp);
    s.run_ms.sort_by(f64::total_cmp);
    let row = Row {
        scenario,
        store: store.into(),
        requests: s.lat.len(),
        errors: s.errors,
        elapsed,
        lat: s.lat,
        server_cpu: s1 - s0,
        client_cpu: c1 - c0,
        queue_ms: s.queue_ms,
        run_ms: s.run_ms,
    };
    eprintln!(
        "  {} [{}]: {} ok in {:.2}s = {:.0}/s, p50 {} ms, p99 {} ms",
        row.scenario,
        row.store,
        row.requests,
        row.elapsed.as_secs_f64(),
        row.requests as f64 / row.elapsed.as_secs_f64(),
        ms(pct(&row.lat, 0.5)),
        ms(pct(&row.lat, 0.99))
    );
    rows.push(row);
}

fn print_tables(rows: &[Row], cores: usize) {
    println!("\n### Submit → result over HTTP ({cores} cores, loopback)\n");
    println!(
        "| scenario | store | requests | errors | jobs/s | p50 ms | p90 ms | p99 ms | max ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            r.scenario,
            r.store,
            r.requests,
            r.errors,
            r.requests as f64 / r.elapsed.as_secs_f64(),
            ms(pct(&r.lat, 0.5)),
            ms(pct(&r.lat, 0.9)),
            ms(pct(&r.lat, 0.99)),
            ms(r.lat.last().copied().unwrap_or_default()),
        );
    }
    println!("\n### Breakdown\n");
    println!(
        "server/client CPU from /proc/PID/stat (µs per job, and cores busy over the run); queue_ms/run_ms \
         from the job records (ms; run_ms spans started_at → finished_at, which includes the submit's commit \
         when the job was written already running, but not the finish commit).\n"
    );
    println!(
        "| scenario | store | server CPU µs/job | server cores | client CPU µs/job | queue_ms p50 | queue_ms p99 | run_ms p50 | run_ms p99 |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let n = r.requests.max(1) as f64;
        let secs = r.elapsed.as_secs_f64();
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.0} | {} | {} | {} | {} |",
            r.scenario,
            r.store,
            r.server_cpu / n * 1e6,
            r.server_cpu / secs,
            r.client_cpu / n * 1e6,
            opt_ms(&r.queue_ms, 0.5),
            opt_ms(&r.queue_ms, 0.99),
            opt_ms(&r.run_ms, 0.5),
            opt_ms(&r.run_ms, 0.99),
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let seq_n: usize = env_or("LOAD_SEQ", 2000);
    let warmup: usize = env_or("LOAD_WARMUP", 200);
    let secs: f64 = env_or("LOAD_SECS", 10.0);
    let conns: Vec<usize> = std::env::var("LOAD_CONNS")
        .unwrap_or_else(|_| "32,128".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let stores: Vec<String> = std::env::var("LOAD_STORES")
        .unwrap_or_else(|_| "redb,sled".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let concurrency: usize = env_or("LOAD_SERVER_CONCURRENCY", 256);
    let client_threads: usize = env_or("LOAD_CLIENT_THREADS", 1);
    let submit_only = std::env::var("LOAD_NO_SUBMIT").map(|v| v != "1").unwrap_or(true);
    let with_p2 = std::env::var("LOAD_P2").map(|v| v != "0").unwrap_or(true);
    let dur = Duration::from_secs_f64(secs);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let tck = clk_tck();

    let rt = match client_threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
    .expect("client runtime");

    let p1 = wat::parse_str(HELLO_WAT).expect("compiling examples/hello.wat");
    let p2 = cloudpipe_test_programs_artifacts::read(cloudpipe_test_programs_artifacts::HELLO);
    const BODY_P1: &[u8] = br#"{"function":"hello-p1","args":["bench"]}"#;
    const BODY_P2: &[u8] = br#"{"function":"hello-p2","args":["bench"]}"#;

    eprintln!(
        "load bench: {cores} cores, seq {seq_n} (+{warmup} warm-up), {secs}s × conns {conns:?}, stores {stores:?}, \
         server --concurrency {concurrency}, client threads {client_threads}"
    );
    let mut rows = Vec::new();
    for store in &stores {
        let srv = Server::start(store, concurrency);
        let client = Arc::new(Client {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .default_headers(serve::admin_headers())
                .build()
                .expect("client"),
            url: srv.url.clone(),
        });
        rt.block_on(async {
            client.upload("hello-p1", p1.clone()).await;
            client.upload("hello-p2", p2.clone()).await;

            let mut bodies = vec![("p1", BODY_P1)];
            if with_p2 {
                bodies.push(("p2", BODY_P2));
            }
            for &(kind, body) in &bodies {
                sequential(&client, body, warmup).await;
                measure(&mut rows, &srv, tck, format!("seq wait, hello {kind}"), store, || {
                    sequential(&client, body, seq_n)
                })
                .await;
            }
            for &n in &conns {
                concurrent(&client, BODY_P1, true, n, Duration::from_secs(1)).await;
                measure(&mut rows, &srv, tck, format!("c{n} wait, hello p1"), store, || {
                    concurrent(&client, BODY_P1, true, n, dur)
                })
                .await;
            }
            if submit_only {
                let n = conns.iter().copied().max().unwrap_or(32);
                measure(&mut rows, &srv, tck, format!("c{n} submit only, hello p1"), store, || {
                    concurrent(&client, BODY_P1, false, n, dur)
                })
                .await;
                let d = client.drain().await;
                eprintln!("  backlog drained in {:.2}s", d.as_secs_f64());
            }
        });
        let errors = srv.log.lock().unwrap().iter().filter(|l| l.contains("ERROR")).count();
        if errors > 0 {
            eprintln!(
                "  server logged {errors} ERROR lines, e.g. {:?}",
                srv.log.lock().unwrap().iter().find(|l| l.contains("ERROR"))
            );
        }
        drop(srv);
    }
    print_tables(&rows, cores);
}
