//! Benchmark of the vm executor (run by `api/benches/vm.sh`): a fresh boot vs a clone
//! to first output, and 1 → 16 clones ready, in one run. Prints Markdown tables.
//!
//! Usage: `vm_bench AGENT` (the path `guest-runners/vm-agent/build.sh` prints).
//! Knobs (environment): `VM_BENCH_RUNS` (clones per figure, default 10),
//! `VM_BENCH_BOOTS` (fresh boots, default 3), `VM_BENCH_FANOUT` (default 1,2,4,8,16).

use std::time::Duration;

use cloudpipe_runtime::executor::vm::{VmConfig, VmExecutor, bench};
use cloudpipe_runtime::executor::{ContainerRequest, RunRequest};

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn env_num(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let agent = std::env::args().nth(1).expect("usage: vm_bench AGENT");
    let runs = env_num("VM_BENCH_RUNS", 10);
    let boots = env_num("VM_BENCH_BOOTS", 3);
    let fanouts: Vec<usize> = std::env::var("VM_BENCH_FANOUT")
        .unwrap_or_else(|_| "1,2,4,8,16".into())
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    let tmp = tempfile::tempdir()?;
    let config = |pool: usize, name: &str| VmConfig {
        agent: Some(agent.clone().into()),
        snapshot_dir: Some(tmp.path().join("templates")),
        run_dir: tmp.path().join(name),
        instance: format!("bench-{name}-{}", std::process::id()),
        pool_size: pool,
        ..VmConfig::default()
    };
    let cold = VmExecutor::new(config(0, "cold"));
    let template = cold.template_boot_time().await?;
    let echo = ["echo", "hi"];

    let mut boot = Vec::new();
    for _ in 0..boots {
        boot.push(bench::boot_to_first_output(&cold, &echo).await?);
    }
    let mut restore = Vec::new();
    for _ in 0..runs {
        restore.push(bench::clone_to_first_output(&cold, &echo).await?);
    }
    let warm = VmExecutor::new(config(1, "warm"));
    warm.template_boot_time().await?;
    let mut pooled = Vec::new();
    for _ in 0..runs {
        pooled.push(bench::pooled_to_first_output(&warm, &echo).await?);
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (boot, restore, pooled) = (median(boot), median(restore), median(pooled));
    println!("| what | median (ms) | boot / it |");
    println!("|---|---:|---:|");
    println!("| template: boot to ready agent + snapshot (once) | {} | |", ms(template));
    println!("| fresh boot → first output of `echo hi` ({boots} runs) | {} | 1× |", ms(boot));
    println!(
        "| clone restored from the snapshot → first output ({runs} runs) | {} | {:.0}× |",
        ms(restore),
        boot.as_secs_f64() / restore.as_secs_f64()
    );
    println!(
        "| clone from the warm pool → first output ({runs} runs) | {} | {:.0}× |",
        ms(pooled),
        boot.as_secs_f64() / pooled.as_secs_f64()
    );
    println!();
    println!("| clones | all ready behind the barrier (ms) | all exited (ms) |");
    println!("|---:|---:|---:|");
    for n in fanouts {
        let req = RunRequest {
            executor: "vm".into(),
            job_id: "bench".into(),
            function: "vm".into(),
            container: Some(ContainerRequest {
                command: vec!["sh".into(), "-c".into(), "echo $CLOUDPIPE_CLONE_ID".into()],
                ..Default::default()
            }),
            timeout: Duration::from_secs(120),
            memory_bytes: 64 << 20,
            output_cap: 1 << 20,
            ..Default::default()
        };
        let fan = cold.fan_out(req, n).await?;
        let ok = fan
            .outcomes
            .iter()
            .enumerate()
            .all(|(i, o)| String::from_utf8_lossy(&o.stdout).trim() == i.to_string());
        anyhow::ensure!(ok, "a clone failed: {:?}", fan.outcomes);
        println!("| {n} | {} | {} |", ms(fan.ready), ms(fan.total));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}
