//! Starts the real `cloudpipe serve` as a child process on a port the OS picks, and
//! what benchmarks read of it (metrics, peak memory, the machine line).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The admin's key of every server these helpers start (`CLOUDPIPE_ADMIN_KEY`).
pub const ADMIN_KEY: &str = "cpk_test_admin_key_for_the_e2e_suite";

/// Default headers carrying [`ADMIN_KEY`], for a `reqwest::ClientBuilder`.
pub fn admin_headers() -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}").parse().unwrap());
    h
}

/// Lines of the server's log kept for failure messages.
const MAX_LOG_LINES: usize = 10_000;

/// A running `cloudpipe serve`, its address and its log so far.
pub struct ServeProcess {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Runs `bin serve --listen 127.0.0.1:0 --data-dir DIR EXTRA...` with the admin's key
/// set to [`ADMIN_KEY`] and waits for its "cloudpipe serving listen=ADDR" log line.
pub fn spawn_serve(bin: &str, data_dir: &Path, extra: &[&str]) -> ServeProcess {
    spawn_serve_with(bin, data_dir, extra, &[("CLOUDPIPE_ADMIN_KEY", ADMIN_KEY)])
}

/// [`spawn_serve`] with the given environment (nothing of the admin key unless given).
pub fn spawn_serve_with(
    bin: &str,
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> ServeProcess {
    spawn_serve_on(bin, "127.0.0.1:0", data_dir, extra, env)
}

/// [`spawn_serve_with`] listening on `listen`.
pub fn spawn_serve_on(
    bin: &str,
    listen: &str,
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> ServeProcess {
    let mut child = Command::new(bin)
        .args(["serve", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("CLOUDPIPE_ADMIN_KEY")
        // A first start without a key writes credentials: never into the real home.
        .env("CLOUDPIPE_CREDENTIALS", data_dir.join("credentials.json"))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting cloudpipe");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("cloudpipe serving")
                && let Some(addr) = line.split_whitespace().find_map(|w| w.strip_prefix("url="))
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr.to_string());
            }
            let mut l = sink.lock().unwrap();
            if l.len() < MAX_LOG_LINES {
                l.push(line);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(url) => ServeProcess { child, url, log },
        Err(_) => {
            let _ = child.kill();
            panic!("cloudpipe did not start:\n{}", log.lock().unwrap().join("\n"));
        }
    }
}

/// `GET url`, its body as JSON; panics on a transport error or a body that is not JSON.
pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    let res = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    res.json().await.unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// The Prometheus text of `/metrics` of the server at `url` (`http://HOST:PORT`).
pub async fn metrics(http: &reqwest::Client, url: &str) -> String {
    let res = http.get(format!("{url}/metrics")).send().await.unwrap_or_else(|e| panic!("{e}"));
    res.text().await.unwrap()
}

/// Submits the batch `spec` to the server at `url` and polls it (every `poll`) until
/// it is no longer running: the batch as it ended, and the time from submit to then.
pub async fn run_batch(
    http: &reqwest::Client,
    url: &str,
    spec: &serde_json::Value,
    poll: Duration,
) -> (serde_json::Value, Duration) {
    let started = std::time::Instant::now();
    let res = http.post(format!("{url}/v1/batches")).json(spec).send().await.unwrap();
    let created: serde_json::Value = res.json().await.unwrap();
    let id = created["id"].as_str().unwrap_or_else(|| panic!("{created}")).to_string();
    loop {
        let b = get_json(http, &format!("{url}/v1/batches/{id}")).await;
        if b["status"] != "running" {
            return (b, started.elapsed());
        }
        tokio::time::sleep(poll).await;
    }
}

/// A metric's value in Prometheus text (the first line starting with `name`).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
}

/// Peak resident memory of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> u64 {
    proc_status_mib(pid, "VmHWM:")
}

/// Resident memory of a process now, in MiB.
pub fn rss_mib(pid: u32) -> u64 {
    proc_status_mib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/PID/status`, in MiB.
fn proc_status_mib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb / 1024
}

/// `N CPUs; load average A B C`: the machine line every benchmark table opens with.
pub fn machine_line() -> String {
    format!(
        "{} CPUs; load average {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
