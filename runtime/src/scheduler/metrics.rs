//! Counters the scheduler keeps in memory for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Run-time histogram buckets, in seconds (Prometheus `le`).
pub const RUN_TIME_BUCKETS: [f64; 12] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 10.0, 60.0];

/// Counters kept in memory for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub submitted: AtomicU64,
    pub finished: AtomicU64,
    /// Attempts given back to the queue because the executor was full.
    pub busy: AtomicU64,
    /// Cumulative counts per bucket of [`RUN_TIME_BUCKETS`], then +Inf.
    pub run_time_buckets: [AtomicU64; RUN_TIME_BUCKETS.len() + 1],
    /// Sum of run times in microseconds.
    pub run_time_sum_micros: AtomicU64,
}

impl Metrics {
    pub(super) fn observe_run(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in RUN_TIME_BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.run_time_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.run_time_buckets[RUN_TIME_BUCKETS.len()].fetch_add(1, Ordering::Relaxed);
        self.run_time_sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(m: &Metrics) -> Vec<u64> {
        m.run_time_buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn a_run_counts_in_every_bucket_at_or_above_its_time() {
        let m = Metrics::default();
        m.observe_run(Duration::from_millis(3));
        m.observe_run(Duration::from_secs(120));
        // 3 ms is past the 0.0025 s bucket (index 4) and within 0.005 s (index 5).
        let c = counts(&m);
        assert_eq!(&c[..5], [0; 5]);
        assert_eq!(&c[5..12], [1; 7]);
        assert_eq!(c[12], 2, "+Inf counts every run");
        assert_eq!(m.run_time_sum_micros.load(Ordering::Relaxed), 120_003_000);
    }

    #[test]
    fn a_run_exactly_on_a_bound_counts_in_that_bucket() {
        let m = Metrics::default();
        m.observe_run(Duration::from_millis(1));
        assert_eq!(counts(&m)[3], 1, "le=0.001");
        assert_eq!(counts(&m)[2], 0, "le=0.0005");
    }
}
