//! Time, memory, stack and output limits, and cancellation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use super::*;
use cloudpipe_types::JobStatus;

/// Epoch tick (5 ms) plus scheduling: a stopped guest ends well within this.
const SLACK: Duration = Duration::from_millis(100);

#[tokio::test]
async fn infinite_loop_times_out_within_100ms_of_its_limit() {
    let h = Harness::new();
    let id = h.upload(programs::LOOP_FOREVER).await;
    let mut req = request("loop_forever", &id);
    req.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let outcome = h.run(req).await;
    let took = started.elapsed();
    assert_eq!(outcome.status, JobStatus::TimedOut, "{outcome:?}");
    let error = outcome.error.unwrap();
    assert_eq!(error.kind, "timeout");
    assert!(error.message.contains("300 ms"), "{}", error.message);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(300) + SLACK,
        "took {took:?}"
    );
}

#[tokio::test]
async fn guest_sleeping_in_a_host_call_times_out() {
    let h = Harness::new();
    let id = h.upload(programs::SLEEP).await;
    let mut req = request("sleep", &id);
    req.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let outcome = h.run(req).await;
    let took = started.elapsed();
    assert_eq!(outcome.status, JobStatus::TimedOut, "{outcome:?}");
    assert_eq!(outcome.error.unwrap().kind, "timeout");
    assert_eq!(text(&outcome.stdout), "sleeping\n", "output before the stop is kept");
    assert!(took < Duration::from_millis(300) + SLACK, "took {took:?}");
}

/// Starts `program` with a long timeout, cancels it after 200 ms, and checks that the
/// run ends within [`SLACK`] of the cancellation.
async fn cancel_after_a_while(program: &str) -> JobOutcome {
    let h = Arc::new(Harness::new());
    let id = h.upload(program).await;
    let cancel = CancellationToken::new();
    let run = {
        let (h, cancel) = (h.clone(), cancel.clone());
        tokio::spawn(async move {
            let outcome = h.executor.run(request("f", &id), Arc::new(NoLiveOutput), cancel).await;
            (outcome, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancelled_at = Instant::now();
    cancel.cancel();
    let (outcome, ended_at) = run.await.unwrap();
    let took = ended_at - cancelled_at;
    assert!(took < SLACK, "stopped {took:?} after the cancellation");
    outcome
}

#[tokio::test]
async fn cancelled_loop_stops_within_100ms() {
    let outcome = cancel_after_a_while(programs::LOOP_FOREVER).await;
    assert_eq!(outcome.status, JobStatus::Cancelled, "{outcome:?}");
    assert_eq!(outcome.error.unwrap().kind, "cancelled");
}

#[tokio::test]
async fn cancelled_sleep_stops_within_100ms() {
    let outcome = cancel_after_a_while(programs::SLEEP).await;
    assert_eq!(outcome.status, JobStatus::Cancelled, "{outcome:?}");
}

#[tokio::test]
async fn memory_bomb_fails_with_memory_limit() {
    let h = Harness::new();
    let id = h.upload(programs::MEMORY_BOMB).await;
    let mut req = request("memory_bomb", &id);
    req.memory_bytes = 32 << 20;
    let outcome = h.run(req).await;
    assert_eq!(outcome.status, JobStatus::Failed, "{outcome:?}");
    let error = outcome.error.unwrap();
    assert_eq!(error.kind, "memory_limit", "{}", error.message);
    assert!(error.message.contains("32 MiB"), "{}", error.message);
}

#[tokio::test]
async fn unbounded_recursion_traps_with_a_backtrace() {
    let h = Harness::new();
    let id = h.upload(programs::RECURSION).await;
    let outcome = h.run(request("recursion", &id)).await;
    assert_eq!(outcome.status, JobStatus::Failed, "{outcome:?}");
    assert_eq!(outcome.exit_code, None);
    let error = outcome.error.unwrap();
    assert_eq!(error.kind, "trap", "{}", error.message);
    assert!(error.message.contains("wasm backtrace:"), "{}", error.message);
    assert!(error.message.contains("depth"), "names the guest's function: {}", error.message);
}

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Counts live stdout bytes without keeping them.
#[derive(Default)]
struct LiveCounter(AtomicU64);

impl OutputSink for LiveCounter {
    fn chunk(&self, stream: OutputStream, data: &[u8]) {
        if stream == OutputStream::Stdout {
            self.0.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
}

#[tokio::test]
async fn flood_of_200_mib_is_truncated_at_the_cap_with_bounded_memory() {
    let h = Harness::new();
    let id = h.upload(programs::FLOOD).await;
    let mut req = request("flood", &id);
    req.args = vec!["200".into()];
    req.output_cap = 1 << 20;

    // Peak resident memory while the guest writes, sampled from another thread.
    let before = rss();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss());
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let live = Arc::new(LiveCounter::default());
    let outcome = h.executor.run(req, live.clone(), CancellationToken::new()).await;
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();

    assert_eq!(outcome.status, JobStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.stdout.len(), 1 << 20);
    assert!(outcome.stdout.iter().all(|&b| b == b'x'));
    assert!(outcome.stdout_truncated);
    assert_eq!(text(&outcome.stderr), "done\n", "the guest ran to its end");
    assert!(!outcome.stderr_truncated);
    assert_eq!(live.0.load(Ordering::Relaxed), 1 << 20, "only what is kept is sent live");
    let grew = peak.saturating_sub(before);
    assert!(grew < 100 << 20, "resident memory grew by {} MiB", grew >> 20);
}
