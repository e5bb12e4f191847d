//! One batch of many trivial Wasm jobs through the real `cloudpipe` binary (redb,
//! durable): wall time and jobs/s. Prints a Markdown table.
//!
//! ```sh
//! cargo bench -p cloudpipe-api --bench batch                 # 10,000 jobs, split 64
//! BATCH_JOBS=20000 BATCH_SPLIT=128 cargo bench -p cloudpipe-api --bench batch
//! ```

use std::time::Duration;

use serde_json::json;

use cloudpipe_test_support::serve;

const HELLO_WAT: &str = include_str!("../../examples/hello.wat");

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let jobs: usize = env_or("BATCH_JOBS", 10_000);
    let split: u32 = env_or("BATCH_SPLIT", 64);
    let mut rows = Vec::new();
    for store in ["redb", "sled"] {
        let tmp = tempfile::tempdir().unwrap();
        let p = serve::spawn_serve(
            env!("CARGO_BIN_EXE_cloudpipe"),
            tmp.path(),
            &["--store", store, "--concurrency", &split.to_string()],
        );
        let http =
            reqwest::Client::builder().default_headers(serve::admin_headers()).build().unwrap();
        let wasm = wat::parse_str(HELLO_WAT).unwrap();
        let res = http
            .post(format!("{}/v1/functions?name=hello", p.url))
            .body(wasm)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "upload: {}", res.text().await.unwrap());
        let inputs: Vec<Vec<String>> = (0..jobs).map(|i| vec![i.to_string()]).collect();
        let spec = json!({"template": {"function": "hello"}, "inputs": inputs, "split": split});
        let (done, wall) = serve::run_batch(&http, &p.url, &spec, Duration::from_millis(10)).await;
        let wall = wall.as_secs_f64();
        assert_eq!(done["counts"]["ok"].as_u64(), Some(jobs as u64), "{done}");
        rows.push(format!(
            "| {store} | {jobs} | {split} | {:.2} s | **{:.0}** | {:.0}% |",
            wall,
            jobs as f64 / wall,
            done["efficiency"].as_f64().unwrap_or(0.0) * 100.0
        ));
        let mut child = p.child;
        let _ = child.kill();
        let _ = child.wait();
    }
    println!();
    println!("{}", serve::machine_line());
    println!();
    println!("| store | jobs | split | wall (submit → all ended) | jobs/s | efficiency |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
}
