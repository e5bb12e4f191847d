//! The cluster side of [`PgStore`]: the node's row and heartbeat, lease renewal, the
//! leader lease with the rescuer, batch driver leases, and the listener that turns
//! `NOTIFY`s into [`ClusterEvent`]s.
//!
//! Every loop here survives the database going away: it logs once, retries, and
//! after a reconnect sends [`ClusterEvent::Resync`] so that whoever waits looks again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;

use super::{Cached, PgStore, Shared};
use crate::cluster::{Cluster, ClusterEvent, NodeInfo, Role};
use crate::model::{JobId, now_micros};

/// The channels every node listens on.
const CHANNELS: &str = "LISTEN cp_queued; LISTEN cp_finished; LISTEN cp_cancel; LISTEN cp_auth; LISTEN cp_functions; LISTEN cp_batch_cancel;";

/// Starts the node's background tasks; they end when the store is dropped.
pub(super) fn start(shared: &Arc<Shared>) {
    tokio::spawn(listen(shared.clone()));
    tokio::spawn(maintain(shared.clone()));
}

impl Shared {
    /// Writes this node's row. A name whose heartbeat is fresh is a node that just
    /// died (restarted at once under a fixed name) or a live one: wait up to two
    /// leases for it to go stale, then refuse.
    pub(super) async fn register_node(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let lease = self.lease_micros();
        let deadline = tokio::time::Instant::now() + 2 * self.node.lease;
        loop {
            let row = client
                .q_opt(
                    "SELECT heartbeat_at > cp_now() - $2 FROM cp_nodes WHERE name = $1",
                    &[&self.node.name, &lease],
                )
                .await?;
            if !row.is_some_and(|r| r.get::<_, bool>(0)) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "a live node is already named {:?} (it still heartbeats): give this node \
                     another --node name",
                    self.node.name
                );
            }
            tokio::time::sleep(self.node.lease / 10).await;
        }
        self.heartbeat(&client).await
    }

    async fn heartbeat(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        let executors = self.executors.read().unwrap().clone().unwrap_or_default();
        let running = self.claims.lock().unwrap().len() as i64;
        client
            .execute(
                "INSERT INTO cp_nodes (name, role, executors, version, advertise_url, started_at,
                   heartbeat_at, running)
                 VALUES ($1, $2, $3, $4, $5, $6, cp_now(), $7)
                 ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role,
                   executors = EXCLUDED.executors, version = EXCLUDED.version,
                   advertise_url = EXCLUDED.advertise_url, started_at = EXCLUDED.started_at,
                   heartbeat_at = EXCLUDED.heartbeat_at, running = EXCLUDED.running",
                &[
                    &self.node.name,
                    &self.node.role.as_str(),
                    &executors,
                    &env!("CARGO_PKG_VERSION"),
                    &self.node.advertise_url,
                    &(self.started_at as i64),
                    &running,
                ],
            )
            .await?;
        Ok(())
    }

    fn send(&self, ev: ClusterEvent) {
        let _ = self.events.send(ev);
    }

    /// One round of upkeep: heartbeat, leases of jobs and batches, leadership and,
    /// for the leader, the rescuer.
    async fn upkeep(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        self.heartbeat(&client).await?;
        let lease = self.lease_micros();
        let held: Vec<(JobId, u32)> =
            self.claims.lock().unwrap().iter().map(|(id, a)| (*id, *a)).collect();
        if !held.is_empty() {
            let ids: Vec<uuid::Uuid> = held.iter().map(|(id, _)| id.0).collect();
            let rows = client
                .q(
                    "UPDATE cp_jobs SET lease_expires = cp_now() + $3
                     WHERE id = ANY($1) AND node = $2 AND status = 'running'
                     RETURNING id, attempts, cancel_requested",
                    &[&ids, &self.node.name, &lease],
                )
                .await?;
            let mut kept = std::collections::HashMap::new();
            for row in rows {
                let id = JobId(row.get(0));
                kept.insert(id, (row.get::<_, i32>(1) as u32, row.get::<_, bool>(2)));
            }
            for (id, attempt) in held {
                match kept.get(&id) {
                    Some((a, cancel)) if *a == attempt => {
                        if *cancel {
                            self.send(ClusterEvent::Cancel(id));
                        }
                    }
                    _ => {
                        // Finished meanwhile (then the claim is gone already), or
                        // taken over by another node.
                        let lost = self.claims.lock().unwrap().remove(&id).is_some();
                        if lost {
                            tracing::warn!(job_id = %id, "lost the lease of a running job; stopping it");
                            self.send(ClusterEvent::LeaseLost(id));
                        }
                    }
                }
            }
        }
        let batches: Vec<String> = self.batches.lock().unwrap().iter().cloned().collect();
        if !batches.is_empty() {
            client
                .exec(
                    "UPDATE cp_batches SET driver_expires = cp_now() + $3
                     WHERE id = ANY($1) AND driver = $2",
                    &[&batches, &self.node.name, &lease],
                )
                .await?;
        }
        let leader = client
            .q_opt(
                "INSERT INTO cp_leader (id, node, expires) VALUES (1, $1, cp_now() + $2)
                 ON CONFLICT (id) DO UPDATE SET node = EXCLUDED.node, expires = EXCLUDED.expires
                 WHERE cp_leader.node = EXCLUDED.node OR cp_leader.expires < cp_now()
                 RETURNING node",
                &[&self.node.name, &lease],
            )
            .await?
            .is_some();
        if self.leader.swap(leader, Ordering::SeqCst) != leader {
            tracing::info!(node = %self.node.name, leader, "leadership changed");
        }
        drop(client);
        if leader {
            let r = self.rescue("lease_expires < cp_now()", now_micros(), 512).await?;
            if r.requeued + r.exhausted > 0 {
                tracing::warn!(
                    requeued = r.requeued,
                    exhausted = r.exhausted,
                    "rescued jobs whose node stopped heartbeating"
                );
            }
            // Rows of nodes gone for an hour.
            let client = self.client().await?;
            client
                .exec("DELETE FROM cp_nodes WHERE heartbeat_at < cp_now() - 3600000000", &[])
                .await?;
        }
        Ok(())
    }
}

/// Heartbeat every third of a lease (at least every half second, so that the
/// leader's rescue follows a lease's end closely), for as long as the store lives.
async fn maintain(shared: Arc<Shared>) {
    let every =
        (shared.node.lease / 3).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match shared.upkeep().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("the database answers again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                shared.leader.store(false, Ordering::SeqCst);
                tracing::error!(error = format!("{e:#}"), "cluster upkeep failed; retrying");
            }
            Err(_) => shared.leader.store(false, Ordering::SeqCst),
        }
    }
}

/// Listens for notifications on a connection of its own, reconnecting for ever.
async fn listen(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let connected = tokio::select! {
            _ = shared.stop.cancelled() => return,
            c = shared.pg.connect(tokio_postgres::NoTls) => c,
        };
        let (client, mut connection) = match connected {
            Ok(c) => c,
            Err(e) => {
                if backoff <= Duration::from_millis(100) {
                    tracing::warn!(error = %e, "the cluster listener cannot connect; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let listening = client.batch_execute(CHANNELS);
        tokio::pin!(listening);
        let mut listened = false;
        loop {
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                r = &mut listening, if !listened => {
                    listened = true;
                    if r.is_err() {
                        break;
                    }
                    backoff = Duration::from_millis(100);
                    if !first {
                        tracing::info!("the cluster listener reconnected");
                        shared.recent_functions.clear();
                        shared.recent_accounts.clear();
                        shared.send(ClusterEvent::Resync);
                    }
                    first = false;
                }
                m = messages.next() => match m {
                    Some(Ok(AsyncMessage::Notification(n))) => shared.notified(n.channel(), n.payload()),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
            }
        }
        tracing::warn!("the cluster listener lost its connection; reconnecting");
        tokio::time::sleep(backoff).await;
    }
}

impl Shared {
    fn notified(&self, channel: &str, payload: &str) {
        match channel {
            "cp_queued" => {
                let ours = match &*self.executors.read().unwrap() {
                    Some(names) => payload.is_empty() || names.iter().any(|n| n == payload),
                    None => true,
                };
                if ours {
                    self.send(ClusterEvent::Queued);
                }
            }
            "cp_finished" => {
                let ids: Vec<JobId> = payload.split(',').filter_map(|s| s.parse().ok()).collect();
                if !ids.is_empty() {
                    self.send(ClusterEvent::Finished(ids));
                }
            }
            "cp_cancel" => {
                if let Ok(id) = payload.parse::<JobId>()
                    && self.claims.lock().unwrap().contains_key(&id)
                {
                    self.send(ClusterEvent::Cancel(id));
                }
            }
            "cp_auth" => {
                self.recent_accounts.clear();
                self.send(ClusterEvent::AuthChanged);
            }
            "cp_functions" => {
                self.recent_functions.clear();
                self.send(ClusterEvent::FunctionsChanged);
            }
            "cp_batch_cancel" if self.batches.lock().unwrap().contains(payload) => {
                self.send(ClusterEvent::BatchCancel(payload.to_string()));
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Cluster for PgStore {
    fn node(&self) -> &str {
        &self.shared.node.name
    }

    fn role(&self) -> Role {
        self.shared.node.role
    }

    fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.shared.events.subscribe()
    }

    fn set_executors(&self, names: Vec<String>) {
        *self.shared.executors.write().unwrap() = Some(names);
        // Jobs of an executor that just came up may be waiting: claim.
        self.shared.send(ClusterEvent::Queued);
    }

    fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::SeqCst)
    }

    async fn request_cancel(&self, id: JobId) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = tx
            .exec(
                "UPDATE cp_jobs SET cancel_requested = true WHERE id = $1 AND status = 'running'",
                &[&id.0],
            )
            .await?;
        if n > 0 {
            tx.exec("SELECT pg_notify('cp_cancel', $1)", &[&id.to_string()]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn active_jobs(&self, account: &str) -> anyhow::Result<u64> {
        let client = self.client().await?;
        let n: i64 = client
            .q_one(
                "SELECT count(*) FROM cp_jobs
                 WHERE account = $1 AND finished_at IS NULL AND status IN ('queued', 'running')",
                &[&account],
            )
            .await?
            .get(0);
        Ok(n as u64)
    }

    async fn nodes(&self) -> anyhow::Result<Vec<NodeInfo>> {
        let client = self.client().await?;
        let lease = self.shared.lease_micros();
        let rows = client
            .q(
                "SELECT n.name, n.role, n.executors, n.version, n.advertise_url, n.started_at,
                        n.heartbeat_at, n.running,
                        coalesce(l.node = n.name AND l.expires > cp_now(), false),
                        n.heartbeat_at < cp_now() - $1
                 FROM cp_nodes n LEFT JOIN cp_leader l ON l.id = 1
                 ORDER BY n.name",
                &[&lease],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| NodeInfo {
                name: r.get(0),
                role: Role::parse(r.get(1)).unwrap_or_default(),
                executors: r.get(2),
                version: r.get(3),
                advertise_url: r.get(4),
                started_at: r.get::<_, i64>(5) as u64,
                heartbeat_at: r.get::<_, i64>(6) as u64,
                running: r.get::<_, i64>(7) as u64,
                leader: r.get(8),
                stale: r.get(9),
            })
            .collect())
    }

    async fn claim_batch(&self, id: &str) -> anyhow::Result<bool> {
        let client = self.client().await?;
        let n = client
            .exec(
                "UPDATE cp_batches SET driver = $2, driver_expires = cp_now() + $3
                 WHERE id = $1 AND (driver IS NULL OR driver = $2 OR driver_expires < cp_now())",
                &[&id, &self.shared.node.name, &self.shared.lease_micros()],
            )
            .await?;
        if n == 1 {
            self.shared.batches.lock().unwrap().insert(id.to_string());
        }
        Ok(n == 1)
    }

    async fn release_batch(&self, id: &str) -> anyhow::Result<()> {
        self.shared.batches.lock().unwrap().remove(id);
        let client = self.client().await?;
        client
            .exec(
                "UPDATE cp_batches SET driver = NULL, driver_expires = NULL
                 WHERE id = $1 AND driver = $2",
                &[&id, &self.shared.node.name],
            )
            .await?;
        Ok(())
    }

    async fn orphaned_batches(&self) -> anyhow::Result<Vec<String>> {
        let client = self.client().await?;
        let rows = client
            .q(
                "SELECT id FROM cp_batches WHERE running
                 AND (driver IS NULL OR driver_expires < cp_now()) ORDER BY id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn request_batch_cancel(&self, id: &str) -> anyhow::Result<()> {
        let client = self.client().await?;
        client.exec("SELECT pg_notify('cp_batch_cancel', $1)", &[&id]).await?;
        Ok(())
    }

    async fn auth_changed(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        client.batch_execute("NOTIFY cp_auth").await?;
        Ok(())
    }

    async fn leave(&self) {
        let Ok(client) = self.client().await else { return };
        let _ =
            client.exec("DELETE FROM cp_leader WHERE node = $1", &[&self.shared.node.name]).await;
        let _ =
            client.exec("DELETE FROM cp_nodes WHERE name = $1", &[&self.shared.node.name]).await;
        self.shared.leader.store(false, Ordering::SeqCst);
    }
}
