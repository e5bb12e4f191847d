//! Probes for `runtime/examples/vm_bench.rs`: how long a VM takes to its first
//! output when booted, restored, or taken from the pool. Not used by the server.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::clone::Vm;
use super::frame::JobFrame;
use super::{BOOT_TIMEOUT, RESTORE_TIMEOUT, VmExecutor};

/// Boots a fresh VM from the template's arguments (no snapshot), runs `command` and
/// returns the time to its first output frame: the baseline clones beat.
pub async fn boot_to_first_output(vm: &VmExecutor, command: &[&str]) -> anyhow::Result<Duration> {
    let template = vm.inner.template().await?;
    let started = Instant::now();
    let mut booted = Vm::spawn(&vm.inner, &template.args, &[]).await?;
    booted.expect(b'R', BOOT_TIMEOUT).await?;
    booted.start(&probe(command)).await?;
    booted.expect(b'O', BOOT_TIMEOUT).await?;
    Ok(started.elapsed())
}

/// Restores a clone (bypassing the pool), runs `command` and returns the time to its
/// first output frame.
pub async fn clone_to_first_output(vm: &VmExecutor, command: &[&str]) -> anyhow::Result<Duration> {
    let template = vm.inner.template().await?;
    let started = Instant::now();
    let mut clone = Vm::restore(&vm.inner, &template).await?;
    clone.start(&probe(command)).await?;
    clone.expect(b'O', RESTORE_TIMEOUT).await?;
    Ok(started.elapsed())
}

/// Waits until the pool is full and its filler idle, takes a clone from it, runs
/// `command` and returns the time to its first output.
pub async fn pooled_to_first_output(vm: &VmExecutor, command: &[&str]) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    while (vm.pooled() < vm.inner.config.pool_size.max(1)
        || vm.inner.filling.load(Ordering::Acquire))
        && Instant::now() < deadline
    {
        vm.inner.refill();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let mut clone = vm.inner.acquire().await?;
    clone.start(&probe(command)).await?;
    clone.expect(b'O', RESTORE_TIMEOUT).await?;
    Ok(started.elapsed())
}

fn probe(command: &[&str]) -> JobFrame {
    JobFrame {
        argv: command.iter().map(|s| s.to_string()).collect(),
        clones: 1,
        ..JobFrame::default()
    }
}
