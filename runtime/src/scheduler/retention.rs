//! Retention: finished jobs past the policy are deleted in the background, a small
//! batch at a time, by one node of a cluster.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::model::now_micros;
use crate::store::{Retention, Store};

/// Jobs deleted by one store call: few, so that other writes get their turn between.
const BATCH: usize = 256;

impl Inner {
    /// Deletes finished jobs past the retention policy, every `retention_interval`.
    pub(super) async fn retain(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.stopping.cancelled() => return,
                _ = tokio::time::sleep(self.config.retention_interval) => {}
            }
            // In a cluster, one node (the leader) purges for all.
            if self.cluster.as_ref().is_some_and(|c| !c.is_leader()) {
                continue;
            }
            purge_expired(self.store.as_ref(), self.config.retention, &self.stopping).await;
        }
    }
}

/// One pass of retention: deletes what `policy` no longer keeps, [`BATCH`] jobs at a
/// time, until nothing is left to delete or `stopping` fires. Returns how many jobs
/// went; a store error ends the pass (the next one tries again).
async fn purge_expired(
    store: &dyn Store,
    policy: Retention,
    stopping: &CancellationToken,
) -> usize {
    let mut purged = 0;
    loop {
        match store.purge_finished(policy, now_micros(), BATCH).await {
            Ok(n) => {
                purged += n;
                if n < BATCH || stopping.is_cancelled() {
                    return purged;
                }
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "retention failed");
                return purged;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cloudpipe_types::JobStatus;

    use super::*;
    use crate::model::JobOutcome;
    use crate::model::job::tests::queued_job;
    use crate::store::redb::RedbStore;

    #[tokio::test]
    async fn a_pass_deletes_every_expired_job_in_batches_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let now = now_micros();
        let hour = 3600 * 1_000_000;
        // More than two batches long ago, two just now, one still queued.
        let old = 2 * BATCH + 10;
        for i in 0..old + 2 {
            let mut job = queued_job("f");
            job.attempts = 1;
            job.started_at = Some(1);
            let at = if i < old { 1 + i as u64 } else { now };
            job.finish(JobOutcome { status: JobStatus::Succeeded, ..Default::default() }, at);
            store.insert_job(job).await.unwrap();
        }
        let queued = store.insert_job(queued_job("f")).await.unwrap().job().id;
        let policy = Retention { max_age_micros: hour, max_finished_per_account: 1_000_000 };
        let stopping = CancellationToken::new();
        assert_eq!(purge_expired(&store, policy, &stopping).await, old);
        assert_eq!(purge_expired(&store, policy, &stopping).await, 0, "nothing left");
        let counts = store.count_jobs().await.unwrap();
        assert_eq!(counts.get(&JobStatus::Succeeded), Some(&2));
        assert!(store.get_job(queued).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_stopping_scheduler_ends_the_pass_after_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        for i in 0..BATCH + 1 {
            let mut job = queued_job("f");
            job.attempts = 1;
            job.finish(JobOutcome::default(), 1 + i as u64);
            store.insert_job(job).await.unwrap();
        }
        let policy = Retention { max_age_micros: 1, max_finished_per_account: 1_000_000 };
        let stopping = CancellationToken::new();
        stopping.cancel();
        assert_eq!(purge_expired(&store, policy, &stopping).await, BATCH);
    }
}
