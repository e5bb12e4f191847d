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
