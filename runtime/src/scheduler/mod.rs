//! [`Scheduler`]: the durable job queue in front of the executor.
//!
//! A submitted job is written to the [`Store`] before the caller hears of it. When a
//! run slot is free at submit time the job is written already `running` (one commit
//! instead of two); otherwise it is queued and the dispatcher claims it when a slot
//! frees. Each attempt is counted durably *before* it starts, so a job that crashes
//! the server is retried at most `max_attempts` times in all. At start-up
//! [`Store::recover`] puts jobs cut off by a crash back in the queue.
//!
//! A client that waits for the result (`?wait=`) gets a shorter path still: its job
//! runs first and, when it ends within a few milliseconds, is written once, finished
//! ([`Scheduler::submit_and_wait`]).
//!
//! Live events (status changes, output chunks) go through an in-memory [`Hub`] to
//! whoever follows a job; nothing is buffered for jobs nobody follows.
//!
//! # Layout
//! - this module: the API ([`Scheduler`]: submit, wait, cancel, shutdown), its
//!   configuration and errors, and the admission of a job (its function, executor
//!   and quota);
//! - `validate`: what makes a spec a job (limits, stdin, env, docker and vm parts);
//! - `quota`: the concurrent-jobs count of each account and the per-job limits;
//! - `hub`: live events and the output replay of running jobs;
//! - `keys`: idempotency keys held while their job is submitted;
//! - `dispatch`: claiming, running and recording attempts; cluster events;
//! - `retention`: deleting finished jobs past the policy;
//! - `metrics`: the counters of `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudpipe_types::{JobSpec, JobStatus};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::account::Tenant;
use crate::cluster::Cluster;
use crate::executor::Executors;
use crate::model::{Job, JobId, now_micros};
use crate::secrets::Secrets;
use crate::store::{Inserted, Retention, Store};

mod dispatch;
mod hub;
mod keys;
mod metrics;
mod quota;
mod retention;
mod validate;

pub use hub::{Hub, LiveEvent, REPLAY_BYTES, Subscription};
pub use metrics::{Metrics, RUN_TIME_BUCKETS};

use hub::EndWatch;
use keys::{KeyHold, KeysInFlight};
use quota::Active;

/// Limits and defaults of the scheduler; plain data, validated by the binary.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Jobs running at once.
    pub concurrency: usize,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    pub default_max_attempts: u32,
    /// Cap on each of stdout and stderr kept per job.
    pub output_cap: usize,
    /// Cap on a job's stdin.
    pub max_stdin: usize,
    pub retention: Retention,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// Images docker jobs may name: exact references, or prefixes ending in `*`
    /// (`docker.io/library/*`, `alpine*`); empty: any.
    pub docker_images: Vec<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            concurrency: 64,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(15 * 60),
            default_memory_mb: 128,
            max_memory_mb: 4096,
            default_max_attempts: 3,
            output_cap: 1 << 20,
            max_stdin: 6 << 20,
            retention: Retention {
                max_age_micros: 7 * 24 * 3600 * 1_000_000,
                max_finished_per_account: 1_000_000,
            },
            retention_interval: Duration::from_secs(1),
            docker_images: Vec::new(),
        }
    }
}

/// Why a submit was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("function {0:?} not found")]
    FunctionNotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// Past one of the account's limits.
    #[error("{0}")]
    OverQuota(String),
    /// The job's executor cannot take jobs now.
    #[error("{0}")]
    Unavailable(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The job's environment names a secret the account does not have.
    #[error("{0}")]
    Secret(crate::secrets::SecretError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// How long [`Scheduler::submit_and_wait`] lets a job run before writing it.
pub const FAST_WINDOW: Duration = Duration::from_millis(5);

/// The job queue and its workers. One per process; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    /// The other nodes, when the store is shared (PostgreSQL); `None` on one machine.
    cluster: Option<Arc<dyn Cluster>>,
    /// Whether this process claims and runs jobs (not on an `api` node).
    runs_jobs: bool,
    /// Opens the secrets a job's environment refers to when an attempt starts.
    secrets: Arc<Secrets>,
    executor: Arc<Executors>,
    config: SchedulerConfig,
    slots: Arc<Semaphore>,
    /// Wakes the dispatcher: a job was queued.
    wake: Notify,
    /// Set while the queue may hold jobs; submit then queues rather than run at once,
    /// so that new jobs do not overtake waiting ones.
    backlog: AtomicBool,
    running: Mutex<HashMap<JobId, CancellationToken>>,
    hub: Arc<Hub>,
    metrics: Metrics,
    stopping: CancellationToken,
    /// Set when shutdown cuts running jobs short: their cancellation means "release".
    releasing: AtomicBool,
    /// Every task this scheduler spawned, so shutdown can wait for them.
    tasks: tokio_util::task::TaskTracker,
    active: Active,
    /// Functions every account may run by a reserved name (`runner:js`) → their ids.
    builtins: std::sync::RwLock<HashMap<String, String>>,
    keys: Arc<KeysInFlight>,
}

impl Scheduler {
    /// Recovers jobs cut off by a crash, then starts the dispatcher and retention.
    /// Call once per process, inside a tokio runtime. With a `cluster`, jobs are shared
    /// with other nodes: this node claims only when its role runs jobs, waits and
    /// cancels reach jobs on other nodes, and retention runs on the leader only.
    pub async fn start(
        store: Arc<dyn Store>,
        executor: Arc<Executors>,
        secrets: Arc<Secrets>,
        config: SchedulerConfig,
        cluster: Option<Arc<dyn Cluster>>,
    ) -> anyhow::Result<Scheduler> {
        let rec = store.recover(now_micros()).await?;
        if rec.requeued + rec.exhausted > 0 {
            tracing::warn!(
                requeued = rec.requeued,
                exhausted = rec.exhausted,
                "recovered jobs cut off by a restart"
            );
        }
        let runs_jobs = cluster.as_ref().is_none_or(|c| c.role().runs_jobs());
        let inner = Arc::new(Inner {
            slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
            store,
            cluster,
            runs_jobs,
            secrets,
            executor,
            config,
            wake: Notify::new(),
            backlog: AtomicBool::new(true),
            running: Mutex::new(HashMap::new()),
            hub: Arc::new(Hub::default()),
            metrics: Metrics::default(),
            stopping: CancellationToken::new(),
            releasing: AtomicBool::new(false),
            tasks: tokio_util::task::TaskTracker::new(),
            active: Active::default(),
            builtins: Default::default(),
            keys: Default::default(),
        });
        // On one machine the quota's counts live here; in a cluster, in the database.
        if inner.cluster.is_none() {
            for (id, account) in inner.store.active_jobs().await? {
                inner.active.admit(&account, id, None);
            }
        }
        if inner.runs_jobs {
            inner.tasks.spawn(inner.clone().dispatch());
        }
        inner.tasks.spawn(inner.clone().retain());
        if let Some(cluster) = inner.cluster.clone() {
            inner.tasks.spawn(inner.clone().follow_cluster(cluster.subscribe()));
        }
        Ok(Scheduler { inner })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.inner.hub
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.inner.config
    }

    /// Makes the stored version `id` runnable by every account as `name` (a name no
    /// upload can take, e.g. `runner:js`).
    pub fn add_builtin(&self, name: &str, id: &str) {
        self.inner.builtins.write().unwrap().insert(name.to_string(), id.to_string());
    }

    /// Queued and running jobs of `account` (counted in the database in a cluster).
    pub async fn active_jobs(&self, account: &str) -> anyhow::Result<u64> {
        match &self.inner.cluster {
            Some(cluster) => cluster.active_jobs(account).await,
            None => Ok(self.inner.active.count(account)),
        }
    }

    /// The other nodes, when the store is shared.
    pub fn cluster(&self) -> Option<&Arc<dyn Cluster>> {
        self.inner.cluster.as_ref()
    }

    /// Number of jobs running in this process now.
    pub fn running(&self) -> usize {
        self.inner.running.lock().unwrap().len()
    }

    /// Validates `spec`, makes the job durable and returns it (already `running` when
    /// a slot was free). A known `idempotency_key` returns the first job instead
    /// ([`Inserted::Existing`]).
    pub async fn submit(&self, spec: JobSpec, tenant: &Tenant) -> Result<Inserted, SubmitError> {
        self.submit_in(spec, tenant, None).await
    }

    /// [`Scheduler::submit`] of a batch's job.
    pub async fn submit_in(
        &self,
        spec: JobSpec,
        tenant: &Tenant,
        batch: Option<crate::model::BatchRef>,
    ) -> Result<Inserted, SubmitError> {
        Ok(self.submit_watched(spec, tenant, batch, false).await?.0)
    }

    /// [`Scheduler::submit_in`], watching the job's end from before it is written
    /// when `watch` is set: a waiter then needs no read to learn what it missed.
    async fn submit_watched(
        &self,
        spec: JobSpec,
        tenant: &Tenant,
        batch: Option<crate::model::BatchRef>,
        watch: bool,
    ) -> Result<(Inserted, Option<EndWatch>), SubmitError> {
        let inner = &self.inner;
        let mut job = self.prepare(spec, tenant, batch).await?;
        let hold = self.hold_key(&job).await;
        self.admit(&job, tenant).await?;
        let end = watch.then(|| inner.hub.watch_end(job.id));
        let (id, account) = (job.id, job.account.clone());
        // Start at once when a slot is free and nothing waits: saves a commit.
        let slot = self.free_slot();
        if slot.is_some() {
            job.status = JobStatus::Running;
            job.attempts = 1;
            job.started_at = Some(now_micros());
        }
        // Once the write is sent it may commit even if our caller goes away (a client
        // that hangs up): what follows a commit must happen regardless, so it runs in a
        // task of its own.
        let this = inner.clone();
        let task = inner.tasks.spawn(async move {
            let inserted = this.store.insert_job(job).await;
            drop(hold);
            if !matches!(inserted, Ok(Inserted::Created(_))) {
                this.active.leave(&account, id);
            }
            let inserted = inserted?;
            match (&inserted, slot) {
                (Inserted::Created(job), Some(slot)) => {
                    this.metrics.submitted.fetch_add(1, Ordering::Relaxed);
                    this.spawn_run(job.clone(), slot);
                }
                (Inserted::Created(_), None) => {
                    this.metrics.submitted.fetch_add(1, Ordering::Relaxed);
                    this.backlog.store(true, Ordering::Release);
                    this.wake.notify_one();
                }
                (Inserted::Existing(_), _) => {}
            }
            anyhow::Ok(inserted)
        });
        let inserted = task.await.map_err(|e| anyhow::anyhow!("submit task failed: {e}"))??;
        Ok((inserted, end))
    }

    /// Submits and waits up to `wait` for the job to end (`POST /v1/jobs?wait=`).
    ///
    /// When a slot is free and the job has no idempotency key, the job runs before
    /// anything is written, and a job that ends within [`FAST_WINDOW`] is written once,
    /// already finished: one commit instead of two on the path of every short job. The
    /// caller hears of the job only after that commit, so the promise holds: a job
    /// the API acknowledged is durable. A job with an idempotency key takes the same
    /// path on one machine: its key is held in memory from the store lookup until the
    /// job is written, the key in the same commit ([`KeysInFlight`]).
    pub async fn submit_and_wait(
        &self,
        spec: JobSpec,
        tenant: &Tenant,
        wait: Duration,
    ) -> Result<Inserted, SubmitError> {
        self.submit_and_wait_in(spec, tenant, None, wait).await
    }

    /// [`Scheduler::submit_and_wait`] of a batch's job.
    pub async fn submit_and_wait_in(
        &self,
        spec: JobSpec,
        tenant: &Tenant,
        batch: Option<crate::model::BatchRef>,
        wait: Duration,
    ) -> Result<Inserted, SubmitError> {
        let inner = &self.inner;
        let keyed_here = spec.idempotency_key.is_none() || inner.cluster.is_none();
        let slot = match keyed_here && !wait.is_zero() {
            true => self.free_slot(),
            false => None,
        };
        let Some(slot) = slot else {
            let (inserted, end) = self.submit_watched(spec, tenant, batch, !wait.is_zero()).await?;
            return match (inserted, end) {
                (Inserted::Created(job), Some(end)) if !job.status.is_terminal() => {
                    let ended = self.wait_watched(end, job.id, wait).await?;
                    Ok(Inserted::Created(ended.map(Arc::unwrap_or_clone).unwrap_or(job)))
                }
                (inserted, _) => self.wait_inserted(inserted, wait).await,
            };
        };
        let started = tokio::time::Instant::now();
        let mut job = self
            .prepare(spec, tenant, batch)
            .instrument(tracing::debug_span!("runtime.prepare"))
            .await?;
        let hold = self.hold_key(&job).await;
        if let (Some(key), Some(_)) = (&job.idempotency_key, &hold)
            && let Some(existing) = inner.store.job_by_idempotency_key(&job.account, key).await?
        {
            drop((hold, slot));
            return self.wait_inserted(Inserted::Existing(existing), wait).await;
        }
        self.admit(&job, tenant).await?;
        job.status = JobStatus::Running;
        job.attempts = 1;
        job.started_at = Some(now_micros());
        let (ack, acked) = oneshot::channel();
        inner.metrics.submitted.fetch_add(1, Ordering::Relaxed);
        inner.spawn_fast_run(job, slot, hold, wait.min(FAST_WINDOW), ack);
        let inserted = acked
            .await
            .map_err(|_| anyhow::anyhow!("the job's task ended before it was written"))??;
        self.wait_inserted(inserted, wait.saturating_sub(started.elapsed())).await
    }

    /// Holds `job`'s idempotency key until the job is written, on one machine (in a
    /// cluster the store's unique index alone decides). `None` without a key.
    async fn hold_key(&self, job: &Job) -> Option<KeyHold> {
        match (&job.idempotency_key, &self.inner.cluster) {
            (Some(key), None) => Some(self.inner.keys.hold(&job.account, key).await),
            _ => None,
        }
    }

    /// The same job once it ended, or as it is when `wait` runs out.
    async fn wait_inserted(
        &self,
        inserted: Inserted,
        wait: Duration,
    ) -> Result<Inserted, SubmitError> {
        if inserted.job().status.is_terminal() || wait.is_zero() {
            return Ok(inserted);
        }
        let waited =
            |job: Job| async move { anyhow::Ok(self.wait(job.id, wait).await?.unwrap_or(job)) };
        Ok(match inserted {
            Inserted::Created(job) => Inserted::Created(waited(job).await?),
            Inserted::Existing(job) => Inserted::Existing(waited(job).await?),
        })
    }

    /// Checks a spec as a submit would, without submitting it.
    pub async fn check(&self, spec: JobSpec, tenant: &Tenant) -> Result<(), SubmitError> {
        self.prepare(spec, tenant, None).await.map(|_| ())
    }

    /// Counts `job` against its account's concurrent-jobs quota. In a cluster the
    /// count is the database's: two nodes admitting at the same instant may each let
    /// one job past the limit, never more.
    async fn admit(&self, job: &Job, tenant: &Tenant) -> Result<(), SubmitError> {
        let limit = tenant.limits.max_concurrent_jobs;
        let admitted = match (&self.inner.cluster, limit) {
            (Some(_), None) => true,
            (Some(cluster), Some(l)) => cluster.active_jobs(&job.account).await? < l,
            (None, _) => self.inner.active.admit(&job.account, job.id, limit),
        };
        match admitted {
            true => Ok(()),
            false => Err(SubmitError::OverQuota(format!(
                "account {:?} already has {} jobs queued or running, its limit: wait for some to end",
                job.account,
                limit.unwrap_or(0)
            ))),
        }
    }

    /// Checks a spec against the server's and the tenant's limits and resolves its
    /// function in the tenant's scope: the job, not yet written.
    async fn prepare(
        &self,
        spec: JobSpec,
        tenant: &Tenant,
        batch: Option<crate::model::BatchRef>,
    ) -> Result<Job, SubmitError> {
        let inner = &self.inner;
        if inner.stopping.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        // Refused before anything runs: the fast path runs a job before writing it.
        if let Some(full) = inner.store.degraded() {
            return Err(SubmitError::Internal(full.into()));
        }
        let mut job = validate::job_from_spec(
            spec,
            &inner.config,
            inner.executor.default_name(),
            &tenant.limits,
        )?;
        job.account = tenant.account.clone();
        inner.secrets.check(&job.account, &job.env).await.map_err(SubmitError::Secret)?;
        job.batch = batch;
        if let Some(c) = &mut job.container {
            c.network = tenant.allow_network;
        }
        if job.executor != inner.executor.default_name() {
            let local = inner.executor.available(&job.executor).await;
            if let (Some(Err(_)) | None, Some(cluster)) = (&local, &inner.cluster)
                && cluster_runs(cluster.as_ref(), &job.executor).await
            {
                return Ok(job);
            }
            return match local {
                Some(Ok(())) => Ok(job),
                Some(Err(why)) => Err(SubmitError::Unavailable(format!(
                    "the {} executor is unavailable: {why}",
                    job.executor
                ))),
                None => Err(SubmitError::Invalid(format!(
                    "unknown executor {:?}: this server runs {}",
                    job.executor,
                    inner.executor.names().join(", ")
                ))),
            };
        }
        let builtin = inner.builtins.read().unwrap().get(&job.function).cloned();
        let scope = match builtin {
            Some(_) => crate::model::Scope::All,
            None => tenant.scope(),
        };
        let lookup = builtin.as_deref().unwrap_or(&job.function);
        let meta = inner
            .store
            .get_function(&scope, lookup)
            .await?
            .ok_or_else(|| SubmitError::FunctionNotFound(job.function.clone()))?;
        if meta.kind == cloudpipe_types::FunctionKind::Http {
            return Err(SubmitError::Invalid(format!(
                "function {:?} is a wasi:http proxy: invoke it over HTTP at /fn/NAME instead of running it as a job",
                job.function
            )));
        }
        job.function_id = meta.id;
        Ok(job)
    }

    /// A run slot, if one is free and no queued job is owed it first.
    fn free_slot(&self) -> Option<OwnedSemaphorePermit> {
        if !self.inner.runs_jobs {
            return None;
        }
        match self.inner.backlog.load(Ordering::Acquire) {
            false => self.inner.slots.clone().try_acquire_owned().ok(),
            true => None,
        }
    }

    pub async fn get(&self, id: JobId) -> anyhow::Result<Option<Job>> {
        self.inner.store.get_job(id).await
    }

    /// The job once it is terminal, or as it is when `timeout` runs out.
    /// `None` if there is no such job.
    pub async fn wait(&self, id: JobId, timeout: Duration) -> anyhow::Result<Option<Job>> {
        Ok(self.wait_shared(id, timeout).await?.map(Arc::unwrap_or_clone))
    }

    /// [`Scheduler::wait`], the ended job shared: every waiter of one job gets the same
    /// `Arc` (a job's output is held once however many wait for it).
    pub async fn wait_shared(
        &self,
        id: JobId,
        timeout: Duration,
    ) -> anyhow::Result<Option<Arc<Job>>> {
        // Watch before reading, so that an ending between the two is not missed.
        let end = self.inner.hub.watch_end(id);
        let Some(job) = self.inner.store.get_job(id).await? else { return Ok(None) };
        if job.status.is_terminal() || timeout.is_zero() {
            return Ok(Some(Arc::new(job)));
        }
        self.wait_watched(end, job.id, timeout).await
    }

    /// The rest of [`Scheduler::wait`]: job `id`, read (or written) not yet ended
    /// after `end` began watching it.
    async fn wait_watched(
        &self,
        mut end: EndWatch,
        id: JobId,
        timeout: Duration,
    ) -> anyhow::Result<Option<Arc<Job>>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // On one machine every end is heard here. In a cluster a job may end on
            // another node: its notification wakes us, and a poll stands in for a
            // notification lost while the listener reconnected.
            let until = match self.inner.cluster {
                Some(_) => deadline.min(tokio::time::Instant::now() + CLUSTER_POLL),
                None => deadline,
            };
            let ended = tokio::select! {
                r = tokio::time::timeout_at(until, &mut end.rx) => match r {
                    Ok(Ok(done)) => Some(done),
                    Ok(Err(_)) => None,
                    Err(_) if tokio::time::Instant::now() < deadline => {
                        match self.inner.store.get_job(id).await? {
                            Some(job) if !job.status.is_terminal() => continue,
                            other => return Ok(other.map(Arc::new)),
                        }
                    }
                    Err(_) => None,
                },
                // A stopping server answers waiters with what it has, so that shutdown
                // is not held up by long-polls.
                _ = self.inner.stopping.cancelled() => None,
            };
            return match ended {
                Some(done) => Ok(Some(done)),
                None => Ok(self.inner.store.get_job(id).await?.map(Arc::new)),
            };
        }
    }

    /// Cancels a job: a queued one at once, a running one through its token (it ends
    /// within one epoch tick). Returns the job as it is afterwards (`None`: unknown).
    pub async fn cancel(&self, id: JobId) -> anyhow::Result<Option<Job>> {
        let inner = &self.inner;
        // A job just claimed is running in the store a moment before its token is
        // registered: look again briefly rather than report it uncancellable.
        for _ in 0..100 {
            let token = inner.running.lock().unwrap().get(&id).cloned();
            if let Some(token) = token {
                token.cancel();
                return self.wait(id, Duration::from_secs(5)).await;
            }
            // Read first: only a queued job needs a write.
            let Some(job) = inner.store.get_job(id).await? else { return Ok(None) };
            // A job running on another node: that node stops it.
            if let Some(cluster) = &inner.cluster
                && job.status == JobStatus::Running
                && job.node.as_deref() != Some(cluster.node())
            {
                cluster.request_cancel(id).await?;
                return self.wait(id, Duration::from_secs(5)).await;
            }
            match job.status {
                JobStatus::Queued => {
                    // The commit and the news of it go together even if our caller
                    // goes away in between.
                    let this = inner.clone();
                    let task = inner.tasks.spawn(async move {
                        let job = this.store.cancel_queued_job(id, now_micros()).await?;
                        if let Some(job) = job.as_ref().filter(|j| j.status == JobStatus::Cancelled)
                        {
                            this.ended(job.clone());
                        }
                        anyhow::Ok(job)
                    });
                    match task.await?? {
                        // Claimed meanwhile: its token is on the way.
                        Some(j) if j.status == JobStatus::Running => {}
                        other => return Ok(other),
                    }
                }
                JobStatus::Running => {}
                _ => return Ok(Some(job)),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        inner.store.get_job(id).await
    }

    /// Fires when the scheduler starts stopping: long-lived requests end on it.
    pub fn stopping(&self) -> &CancellationToken {
        &self.inner.stopping
    }

    /// Stops taking and starting jobs, then waits up to `grace` for running ones.
    /// Jobs still running after that are recovered at the next start.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.stopping.cancel();
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait()).await.is_ok() {
            return;
        }
        // Jobs still running are handed back unrun: their attempt does not count, and
        // they run again at the next start.
        inner.releasing.store(true, Ordering::SeqCst);
        let tokens: Vec<_> = inner.running.lock().unwrap().values().cloned().collect();
        tracing::warn!(
            running = tokens.len(),
            "shutdown grace ran out; handing running jobs back to the queue"
        );
        for token in tokens {
            token.cancel();
        }
        if tokio::time::timeout(Duration::from_secs(5), inner.tasks.wait()).await.is_err() {
            tracing::warn!("jobs still running at exit are recovered at the next start");
        }
    }

    /// Leaves the cluster (if any) after [`Scheduler::shutdown`]: the leader lease
    /// and this node's row go at once.
    pub async fn leave_cluster(&self) {
        if let Some(cluster) = &self.inner.cluster {
            cluster.leave().await;
        }
    }
}

/// How often a waiter in a cluster looks at the store, in case the notification of
/// the job's end was lost.
const CLUSTER_POLL: Duration = Duration::from_millis(500);

/// Whether a live node of the cluster runs `executor` jobs.
async fn cluster_runs(cluster: &dyn Cluster, executor: &str) -> bool {
    match cluster.nodes().await {
        Ok(nodes) => nodes
            .iter()
            .any(|n| !n.stale && n.role.runs_jobs() && n.executors.iter().any(|e| e == executor)),
        Err(_) => false,
    }
}
