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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use cloudpipe_types::{JobSpec, JobStatus};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::account::{Limits, Tenant};
use crate::cluster::{Cluster, ClusterEvent};
use crate::executor::{
    ContainerRequest, Executor, Executors, OutputSink, OutputStream, RunRequest,
};
use crate::model::{Job, JobId, JobOutcome, now_micros};
use crate::registry::is_function_id;
use crate::secrets::Secrets;
use crate::store::{Inserted, Retention, Store};

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

/// Something that happened to a job, for followers.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// The job changed status; terminal statuses carry the final job.
    Status(JobStatus, Option<Arc<Job>>),
    Output(OutputStream, Bytes),
}

/// Fan-out of a job's life to whoever follows it, only for jobs someone follows:
/// [`LiveEvent`]s for event streams, and the final job alone for waiters (which are
/// far more common, so they get a one-shot channel rather than a broadcast one).
///
/// The first [`REPLAY_BYTES`] of each output stream of a running job are kept, so that a
/// follower who arrives after the job started still sees its output from the start.
#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<JobId, broadcast::Sender<LiveEvent>>>,
    waiters: Mutex<HashMap<JobId, Vec<oneshot::Sender<Arc<Job>>>>>,
    /// Output so far of running jobs, each stream capped.
    replay: Mutex<HashMap<JobId, Replay>>,
}

/// The stdout and stderr a running job wrote so far (see [`REPLAY_BYTES`]).
type Replay = (Vec<u8>, Vec<u8>);

/// Bytes of each stream of a running job kept for late followers.
pub const REPLAY_BYTES: usize = 64 << 10;

/// A follower's end of a job's events; stops the fan-out when the last one drops.
pub struct Subscription {
    rx: Option<broadcast::Receiver<LiveEvent>>,
    hub: Arc<Hub>,
    id: JobId,
}

impl Subscription {
    /// The next event; `Some(Err(n))` if `n` events were missed (the follower lagged,
    /// and should re-read the job), `None` if the channel closed.
    pub async fn recv(&mut self) -> Option<Result<LiveEvent, u64>> {
        let rx = self.rx.as_mut()?;
        match rx.recv().await {
            Ok(ev) => Some(Ok(ev)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut map = self.hub.channels.lock().unwrap();
        if map.get(&self.id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&self.id);
        }
    }
}

/// Resolves with the job once it ends (see [`Hub::watch_end`]).
struct EndWatch {
    rx: oneshot::Receiver<Arc<Job>>,
    hub: Arc<Hub>,
    id: JobId,
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        self.rx.close();
        let mut map = self.hub.waiters.lock().unwrap();
        if let Some(list) = map.get_mut(&self.id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

impl Hub {
    /// Events of job `id` from now on. Subscribe *before* reading the job, so that
    /// nothing between the read and the subscription is missed.
    pub fn subscribe(self: &Arc<Self>, id: JobId) -> Subscription {
        self.subscribe_with_replay(id).0
    }

    /// [`Hub::subscribe`], with the output the job wrote before (up to [`REPLAY_BYTES`]
    /// per stream): nothing is in both.
    pub fn subscribe_with_replay(self: &Arc<Self>, id: JobId) -> (Subscription, Vec<LiveEvent>) {
        let mut channels = self.channels.lock().unwrap();
        let rx = channels.entry(id).or_insert_with(|| broadcast::channel(256).0).subscribe();
        // Output is published under the channels' lock: the replay and the live
        // events meet without a gap or an overlap.
        let mut replay = Vec::new();
        if let Some((out, err)) = self.replay.lock().unwrap().get(&id) {
            for (stream, bytes) in [(OutputStream::Stdout, out), (OutputStream::Stderr, err)] {
                if !bytes.is_empty() {
                    replay.push(LiveEvent::Output(stream, Bytes::copy_from_slice(bytes)));
                }
            }
        }
        drop(channels);
        (Subscription { rx: Some(rx), hub: self.clone(), id }, replay)
    }

    fn started(&self, id: JobId) {
        self.replay.lock().unwrap().insert(id, Default::default());
    }

    fn output(&self, id: JobId, stream: OutputStream, data: &[u8]) {
        let channels = self.channels.lock().unwrap();
        if let Some((out, err)) = self.replay.lock().unwrap().get_mut(&id) {
            let kept = if stream == OutputStream::Stdout { out } else { err };
            let room = REPLAY_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
        if let Some(tx) = channels.get(&id) {
            let _ = tx.send(LiveEvent::Output(stream, Bytes::copy_from_slice(data)));
        }
    }

    /// Whether anyone here waits for or follows job `id`.
    fn watched(&self, id: JobId) -> bool {
        self.waiters.lock().unwrap().contains_key(&id)
            || self.channels.lock().unwrap().contains_key(&id)
    }

    fn watch_end(self: &Arc<Self>, id: JobId) -> EndWatch {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().entry(id).or_default().push(tx);
        EndWatch { rx, hub: self.clone(), id }
    }

    fn publish(&self, id: JobId, ev: impl FnOnce() -> LiveEvent) {
        let map = self.channels.lock().unwrap();
        if let Some(tx) = map.get(&id) {
            let _ = tx.send(ev());
        }
    }

    /// The job ended: tell its waiters and followers.
    fn finished(&self, job: Job) {
        self.replay.lock().unwrap().remove(&job.id);
        let job = Arc::new(job);
        let waiters = self.waiters.lock().unwrap().remove(&job.id);
        for tx in waiters.into_iter().flatten() {
            let _ = tx.send(job.clone());
        }
        self.publish(job.id, || LiveEvent::Status(job.status, Some(job.clone())));
    }
}

struct LiveSink {
    hub: Arc<Hub>,
    id: JobId,
}

impl OutputSink for LiveSink {
    fn chunk(&self, stream: OutputStream, data: &[u8]) {
        self.hub.output(self.id, stream, data);
    }
}

/// Run-time histogram buckets, in seconds (Prometheus `le`).
pub const RUN_TIME_BUCKETS: [f64; 12] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 10.0, 60.0];

/// How long [`Scheduler::submit_and_wait`] lets a job run before writing it.
pub const FAST_WINDOW: Duration = Duration::from_millis(5);

/// How long a run slot stays taken after its attempt found the executor full.
const BUSY_PAUSE: Duration = Duration::from_millis(50);

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
    fn observe_run(&self, d: Duration) {
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

/// Idempotency keys whose job is being submitted in this process, from the lookup
/// to the write. A second submit of a key waits until the first one's job is
/// written and then finds it in the store: a keyed job may thus run before it is
/// written (the waiting client's fast path) and still run once. In a cluster keyed
/// jobs are written before they run, since another node may hold the same key.
#[derive(Default)]
struct KeysInFlight(Mutex<HashMap<(String, String), watch::Receiver<()>>>);

/// One key held in [`KeysInFlight`]; released when dropped (after the job's write).
struct KeyHold {
    keys: Arc<KeysInFlight>,
    key: (String, String),
    /// Dropped after the entry is removed: wakes the submits waiting for the key.
    _done: watch::Sender<()>,
}

impl KeysInFlight {
    /// Holds `key` of `account`, waiting while another submit holds it.
    async fn hold(self: &Arc<Self>, account: &str, key: &str) -> KeyHold {
        let key = (account.to_string(), key.to_string());
        loop {
            let mut held = {
                let mut map = self.0.lock().unwrap();
                match map.entry(key.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let (done, rx) = watch::channel(());
                        e.insert(rx);
                        return KeyHold { keys: self.clone(), key, _done: done };
                    }
                }
            };
            // Ends (with an error) once the holder is dropped, even if it already was.
            let _ = held.changed().await;
        }
    }
}

impl Drop for KeyHold {
    fn drop(&mut self) {
        self.keys.0.lock().unwrap().remove(&self.key);
    }
}

/// The queued and running jobs of each account, for its concurrent-jobs quota. A job
/// joins when it is admitted and leaves when it ends; both are idempotent, so no path
/// counts a job twice.
#[derive(Default)]
struct Active(Mutex<HashMap<String, HashSet<JobId>>>);

impl Active {
    /// Admits `id` unless `account` already has `limit` jobs.
    fn admit(&self, account: &str, id: JobId, limit: Option<u64>) -> bool {
        let mut map = self.0.lock().unwrap();
        let jobs = map.entry(account.to_string()).or_default();
        if limit.is_some_and(|l| jobs.len() as u64 >= l) {
            return false;
        }
        jobs.insert(id);
        true
    }

    fn leave(&self, account: &str, id: JobId) {
        let mut map = self.0.lock().unwrap();
        if let Some(jobs) = map.get_mut(account) {
            jobs.remove(&id);
            if jobs.is_empty() {
                map.remove(account);
            }
        }
    }

    fn count(&self, account: &str) -> u64 {
        self.0.lock().unwrap().get(account).map_or(0, |j| j.len() as u64)
    }
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
        let mut job = inner.job_from_spec(spec, &tenant.limits)?;
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

impl Inner {
    fn job_from_spec(&self, spec: JobSpec, limits: &Limits) -> Result<Job, SubmitError> {
        let c = &self.config;
        let invalid = |m: String| Err(SubmitError::Invalid(m));
        let executor = spec.executor.clone().unwrap_or_else(|| self.executor.default_name().into());
        let container = match executor.as_str() {
            "docker" => {
                Some(container_spec(&spec, &c.docker_images).map_err(SubmitError::Invalid)?)
            }
            "vm" => Some(vm_spec(&spec).map_err(SubmitError::Invalid)?),
            _ => {
                if spec.image.is_some()
                    || !spec.command.is_empty()
                    || spec.cpus.is_some()
                    || spec.result_source.is_some()
                {
                    return invalid(format!(
                        "`image`, `command`, `cpus` and `result_source` are for `\"executor\": \"docker\"`, not {executor:?}"
                    ));
                }
                None
            }
        };
        let function = match &container {
            Some(c) => c.image.clone(),
            None => spec.function.clone(),
        };
        if container.is_none() && spec.function.is_empty() {
            return invalid("`function` must name a function or give its id (sha256:…)".into());
        }
        if spec.function.starts_with("sha256:") && !is_function_id(&spec.function) {
            return invalid(format!(
                "{:?} is not a function id (sha256: and 64 lowercase hex digits)",
                spec.function
            ));
        }
        let stdin = match (spec.stdin, spec.stdin_base64) {
            (Some(_), Some(_)) => {
                return invalid("give `stdin` or `stdin_base64`, not both".into());
            }
            (Some(s), None) => s.into_bytes(),
            (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b.as_bytes())
            {
                Ok(v) => v,
                Err(e) => return invalid(format!("`stdin_base64` is not valid base64: {e}")),
            },
            (None, None) => Vec::new(),
        };
        if stdin.len() > c.max_stdin {
            return invalid(format!(
                "stdin is {} bytes, over the limit of {} bytes",
                stdin.len(),
                c.max_stdin
            ));
        }
        let over = |what: &str, asked: u64, limit: u64| {
            Err(SubmitError::OverQuota(format!(
                "`{what}` {asked} is over the account's limit of {limit}"
            )))
        };
        let default_timeout = c.default_timeout.as_millis() as u64;
        let timeout_ms = spec.timeout_ms.unwrap_or(match limits.max_timeout_ms {
            Some(l) => default_timeout.min(l),
            None => default_timeout,
        });
        if let Some(l) = limits.max_timeout_ms
            && timeout_ms > l
        {
            return over("timeout_ms", timeout_ms, l);
        }
        if timeout_ms == 0 || timeout_ms > c.max_timeout.as_millis() as u64 {
            return invalid(format!(
                "`timeout_ms` must be between 1 and {}",
                c.max_timeout.as_millis()
            ));
        }
        let memory_mb = spec.memory_mb.unwrap_or(match limits.max_memory_mb {
            Some(l) => c.default_memory_mb.min(l),
            None => c.default_memory_mb,
        });
        if let Some(l) = limits.max_memory_mb
            && memory_mb > l
        {
            return over("memory_mb", memory_mb, l);
        }
        if memory_mb == 0 || memory_mb > c.max_memory_mb {
            return invalid(format!("`memory_mb` must be between 1 and {}", c.max_memory_mb));
        }
        let max_attempts = spec.max_attempts.unwrap_or(c.default_max_attempts);
        if !(1..=100).contains(&max_attempts) {
            return invalid("`max_attempts` must be between 1 and 100".into());
        }
        for (k, v) in &spec.env {
            let text_ok = v.as_text().is_none_or(|t| !t.contains('\0'));
            let secret_ok = v.secret_name().is_none_or(crate::secrets::valid_name);
            if k.is_empty() || k.contains('=') || k.contains('\0') || !text_ok || !secret_ok {
                return invalid(format!(
                    "environment variable {k:?} is not valid (no '=' or NUL in names, no NUL in values, secret names of A-Z a-z 0-9 _ . -)"
                ));
            }
        }
        if spec.args.iter().any(|a| a.contains('\0')) {
            return invalid("arguments may not contain NUL".into());
        }
        if spec.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 256) {
            return invalid("`idempotency_key` must be 1 to 256 bytes".into());
        }
        if spec.tags.len() > 32 || spec.tags.iter().any(|t| t.is_empty() || t.len() > 128) {
            return invalid("at most 32 tags of 1 to 128 bytes each".into());
        }
        Ok(Job {
            id: JobId::new(),
            account: crate::model::ADMIN.to_string(),
            function,
            function_id: String::new(),
            args: spec.args,
            env: spec.env,
            stdin,
            tags: spec.tags,
            idempotency_key: spec.idempotency_key,
            timeout_ms,
            memory_mb,
            max_attempts,
            executor,
            container,
            batch: None,
            node: None,
            status: JobStatus::Queued,
            attempts: 0,
            created_at: now_micros(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            error: None,
        })
    }

    /// Claims queued jobs whenever a slot is free.
    async fn dispatch(self: Arc<Self>) {
        let mut failing = false;
        loop {
            let first = tokio::select! {
                _ = self.stopping.cancelled() => return,
                p = self.slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let mut slots = vec![first];
            while slots.len() < 128 {
                match self.slots.clone().try_acquire_owned() {
                    Ok(p) => slots.push(p),
                    Err(_) => break,
                }
            }
            let want = slots.len();
            let jobs = match self.store.claim_jobs(want, now_micros()).await {
                Ok(jobs) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("claiming jobs works again");
                    }
                    jobs
                }
                Err(e) => {
                    // Once per outage, not ten times a second.
                    if !std::mem::replace(&mut failing, true) {
                        tracing::error!(error = format!("{e:#}"), "claiming jobs failed; retrying");
                    }
                    drop(slots);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if jobs.len() < want {
                self.backlog.store(false, Ordering::Release);
            }
            let idle = jobs.is_empty();
            for job in jobs {
                let slot = slots.pop().expect("one slot per claimed job");
                self.spawn_run(job, slot);
            }
            drop(slots);
            if idle {
                // Woken by each queued submit; the timeout is a backstop, so that no
                // job can wait for ever on a wake-up that never came.
                tokio::select! {
                    _ = self.stopping.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    fn spawn_run(self: &Arc<Self>, job: Job, slot: OwnedSemaphorePermit) {
        let token = self.register(job.id);
        let this = self.clone();
        let span = run_span(&job);
        self.tasks.spawn(
            async move {
                let req = this.run_request(&job).await;
                let outcome = this.execute(req, token).await;
                let busy = outcome.is_busy();
                this.record(job.id, outcome).await;
                if busy {
                    this.busy_pause().await;
                }
                drop(slot);
            }
            .instrument(span),
        );
    }

    /// The fast path of [`Scheduler::submit_and_wait`]: runs `job` (already marked
    /// running) before anything is written. A job done within `window` is written
    /// once, already finished; a longer one is written `running` when the window
    /// closes and finished as usual. `ack` gets the first write's result; `key` (its
    /// idempotency key) is released once that write is done.
    fn spawn_fast_run(
        self: &Arc<Self>,
        job: Job,
        slot: OwnedSemaphorePermit,
        key: Option<KeyHold>,
        window: Duration,
        ack: oneshot::Sender<anyhow::Result<Inserted>>,
    ) {
        let token = self.register(job.id);
        let this = self.clone();
        let span = run_span(&job);
        self.tasks.spawn(
            async move {
                let id = job.id;
                let req = this.run_request(&job).await;
                let run = this
                    .execute(req, token.clone())
                    .instrument(tracing::debug_span!("runtime.execute"));
                tokio::pin!(run);
                let early = tokio::select! {
                    outcome = &mut run => Some(outcome),
                    _ = tokio::time::sleep(window) => None,
                };
                match early {
                    Some(outcome) => {
                        let busy = outcome.is_busy();
                        let mut done = job;
                        if this.released(&outcome) {
                            // Cut short by shutdown, or no room to start, before it was
                            // written: queue it.
                            done.status = JobStatus::Queued;
                            done.attempts = 0;
                            done.started_at = None;
                        } else {
                            done.finish(outcome, now_micros());
                        }
                        let account = done.account.clone();
                        let inserted = this
                            .store
                            .insert_job(done)
                            .instrument(tracing::debug_span!("store.insert_job"))
                            .await;
                        drop(key);
                        this.running.lock().unwrap().remove(&id);
                        match &inserted {
                            Ok(Inserted::Created(job)) if job.status.is_terminal() => {
                                this.ended(job.clone())
                            }
                            Ok(Inserted::Created(_)) => {}
                            _ => this.active.leave(&account, id),
                        }
                        let _ = ack.send(inserted);
                        if busy {
                            this.busy_pause().await;
                        }
                    }
                    None => {
                        let account = job.account.clone();
                        let inserted = this.store.insert_job(job).await;
                        drop(key);
                        let written = matches!(inserted, Ok(Inserted::Created(_)));
                        if !written {
                            this.active.leave(&account, id);
                        }
                        let _ = ack.send(inserted);
                        if !written {
                            // Not ours to record (a write error): stop the run.
                            token.cancel();
                        }
                        let outcome = run.await;
                        let busy = outcome.is_busy();
                        match written {
                            true => this.record(id, outcome).await,
                            false => drop(this.running.lock().unwrap().remove(&id)),
                        }
                        if busy {
                            this.busy_pause().await;
                        }
                    }
                }
                drop(slot);
            }
            .instrument(span),
        );
    }

    /// Makes a running job cancellable; [`Inner::record`] undoes it.
    fn register(&self, id: JobId) -> CancellationToken {
        let token = CancellationToken::new();
        self.running.lock().unwrap().insert(id, token.clone());
        token
    }

    /// What the executor gets for one attempt of `job`, its secrets opened (the
    /// failed outcome when one of them is gone).
    async fn run_request(&self, job: &Job) -> Result<RunRequest, JobOutcome> {
        let env = match self.secrets.resolve(&job.account, &job.env).await {
            Ok(env) => env,
            Err(e) => {
                let kind = match e {
                    crate::secrets::SecretError::NotFound(_) => "secret_not_found",
                    _ => "internal",
                };
                tracing::warn!(job_id = %job.id, error = format!("{e:#}"), "a job's secret cannot be opened");
                return Err(JobOutcome::error(JobStatus::Failed, kind, e.to_string()));
            }
        };
        Ok(RunRequest {
            executor: job.executor.clone(),
            container: job.container.as_ref().map(|c| ContainerRequest {
                image: c.image.clone(),
                command: c.command.clone(),
                nano_cpus: c.nano_cpus,
                result_file: c.result_file.clone(),
                network: c.network,
            }),
            job_id: job.id.to_string(),
            function: job.function.clone(),
            function_id: job.function_id.clone(),
            args: job.args.clone(),
            env,
            stdin: Bytes::from(job.stdin.clone()),
            attempt: job.attempts,
            timeout: Duration::from_millis(job.timeout_ms),
            memory_bytes: job.memory_mb << 20,
            output_cap: self.config.output_cap,
        })
    }

    /// Runs one attempt on the executor (`Err`: it could not start, and that is its
    /// outcome).
    async fn execute(
        &self,
        req: Result<RunRequest, JobOutcome>,
        cancel: CancellationToken,
    ) -> JobOutcome {
        let req = match req {
            Ok(req) => req,
            Err(outcome) => return outcome,
        };
        let id: JobId = req.job_id.parse().expect("job ids are UUIDs");
        self.hub.publish(id, || LiveEvent::Status(JobStatus::Running, None));
        self.hub.started(id);
        let sink = Arc::new(LiveSink { hub: self.hub.clone(), id });
        let started = Instant::now();
        // A panic inside an executor is our bug, not the guest's: the job fails with
        // `internal` rather than staying `running` until the next restart.
        let executor = self.executor.clone();
        let outcome = match tokio::spawn(async move { executor.run(req, sink, cancel).await }).await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!("executor failed: {e}");
                JobOutcome::error(
                    JobStatus::Failed,
                    "internal",
                    "the executor failed; see the server log",
                )
            }
        };
        let elapsed = started.elapsed();
        self.metrics.observe_run(elapsed);
        self.metrics.finished.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            status = outcome.status.as_str(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "job ran"
        );
        outcome
    }

    /// True when `outcome` is an attempt to give back to the queue, not to record: one
    /// cut short by shutdown, or one that found its executor full.
    fn released(&self, outcome: &JobOutcome) -> bool {
        outcome.is_busy()
            || (outcome.status == JobStatus::Cancelled && self.releasing.load(Ordering::SeqCst))
    }

    /// After an attempt found its executor full (and went back to the queue): its run
    /// slot stays taken a moment, so that the dispatcher does not claim and give back
    /// the same job in a tight loop; then the dispatcher looks at the queue again.
    async fn busy_pause(&self) {
        self.metrics.busy.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = self.stopping.cancelled() => {}
            _ = tokio::time::sleep(BUSY_PAUSE) => {}
        }
        self.backlog.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Writes the outcome of a running job and tells its followers.
    async fn record(&self, id: JobId, outcome: JobOutcome) {
        if self.released(&outcome) {
            self.hub.replay.lock().unwrap().remove(&id);
            if let Err(e) = self.store.release_job(id).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "releasing a job failed; it is recovered at the next start"
                );
            }
            self.running.lock().unwrap().remove(&id);
            return;
        }
        let mut failures = 0u32;
        let finished = loop {
            match self.store.finish_job(id, outcome.clone(), now_micros()).await {
                Ok(j) => {
                    if failures > 0 {
                        tracing::info!(job_id = %id, retries = failures, "recorded the outcome");
                    }
                    break j;
                }
                Err(e) => {
                    // The outcome must not be lost while the store hiccups (or its disk
                    // is full); if the process dies meanwhile, recovery runs the job
                    // again. Said once, not at each retry.
                    if failures == 0 {
                        tracing::error!(job_id = %id, error = format!("{e:#}"), "recording outcome failed; retrying");
                    }
                    failures += 1;
                    if self.stopping.is_cancelled() {
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        self.running.lock().unwrap().remove(&id);
        // Not terminal: another node holds the job now (this node lost its lease), and
        // that node writes its end.
        if let Some(job) = finished.filter(|j| j.status.is_terminal()) {
            self.ended(job);
        }
    }

    /// A job is terminal: it leaves its account's count and its followers hear.
    fn ended(&self, job: Job) {
        if job.status.is_terminal() {
            self.active.leave(&job.account, job.id);
        }
        self.hub.finished(job);
    }

    /// Acts on what other nodes did: queued jobs wake the dispatcher, jobs ended
    /// elsewhere reach their waiters here, cancels and lost leases stop local runs.
    async fn follow_cluster(self: Arc<Self>, mut events: broadcast::Receiver<ClusterEvent>) {
        loop {
            let ev = tokio::select! {
                _ = self.stopping.cancelled() => return,
                ev = events.recv() => ev,
            };
            match ev {
                Ok(ClusterEvent::Queued) => {
                    self.backlog.store(true, Ordering::Release);
                    self.wake.notify_one();
                }
                // Anything may have been missed: claim, and waiters poll anyway.
                Ok(ClusterEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.backlog.store(true, Ordering::Release);
                    self.wake.notify_one();
                }
                Ok(ClusterEvent::Finished(ids)) => {
                    let watched: Vec<JobId> = {
                        let running = self.running.lock().unwrap();
                        ids.into_iter()
                            .filter(|id| !running.contains_key(id) && self.hub.watched(*id))
                            .collect()
                    };
                    if watched.is_empty() {
                        continue;
                    }
                    // One read for the lot, off this loop: it must keep up with the events.
                    let this = self.clone();
                    self.tasks.spawn(async move {
                        for job in this.store.get_jobs(&watched).await.unwrap_or_default() {
                            if job.status.is_terminal() {
                                this.hub.finished(job);
                            }
                        }
                    });
                }
                Ok(ClusterEvent::Cancel(id)) | Ok(ClusterEvent::LeaseLost(id)) => {
                    let token = self.running.lock().unwrap().get(&id).cloned();
                    if let Some(token) = token {
                        token.cancel();
                    }
                }
                // The API's caches and the batches follow these themselves.
                Ok(ClusterEvent::AuthChanged)
                | Ok(ClusterEvent::FunctionsChanged)
                | Ok(ClusterEvent::BatchCancel(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Deletes finished jobs past the retention policy, a small batch at a time.
    async fn retain(self: Arc<Self>) {
        const BATCH: usize = 256;
        loop {
            tokio::select! {
                _ = self.stopping.cancelled() => return,
                _ = tokio::time::sleep(self.config.retention_interval) => {}
            }
            // In a cluster, one node (the leader) purges for all.
            if self.cluster.as_ref().is_some_and(|c| !c.is_leader()) {
                continue;
            }
            loop {
                match self.store.purge_finished(self.config.retention, now_micros(), BATCH).await {
                    Ok(n) if n == BATCH && !self.stopping.is_cancelled() => {
                        tokio::task::yield_now().await
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "retention failed");
                        break;
                    }
                }
            }
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

/// The span of one attempt. Debug level: at thousands of jobs a second, formatting
/// it for every job costs more than the job.
fn run_span(job: &Job) -> tracing::Span {
    tracing::debug_span!("runtime.run_job", job_id = %job.id, function = %job.function, attempt = job.attempts)
}

/// The container of a `docker` job spec, checked.
fn container_spec(
    spec: &JobSpec,
    allowed: &[String],
) -> Result<crate::model::ContainerSpec, String> {
    let image = spec.image.clone().filter(|i| !i.trim().is_empty()).ok_or_else(|| {
        "a docker job needs `image` (an image present on the Docker engine)".to_string()
    })?;
    if image.len() > 512 || image.contains(char::is_whitespace) {
        return Err(format!("{image:?} is not an image reference"));
    }
    if !image_allowed(&image, allowed) {
        return Err(format!(
            "image {image:?} is not one this server runs (allowed: {})",
            allowed.join(", ")
        ));
    }
    if !spec.function.is_empty() {
        return Err("a docker job runs `image` and `command`, not `function`".into());
    }
    if spec.command.len() > 4096 || spec.command.iter().any(|a| a.contains('\0')) {
        return Err("`command`: at most 4096 arguments, without NUL".into());
    }
    let nano_cpus = match spec.cpus {
        None => None,
        Some(c) if c.is_finite() && c > 0.0 && c <= 1024.0 => Some((c * 1e9) as u64),
        Some(c) => return Err(format!("`cpus` {c} must be more than 0 and at most 1024")),
    };
    let result_file = match spec.result_source.as_deref() {
        None | Some("stdout") => None,
        Some(s) => match s.strip_prefix("file:") {
            Some(p) if p.starts_with('/') && !p.contains('\0') && p.len() <= 4096 => {
                Some(p.to_string())
            }
            _ => {
                return Err(format!(
                    "`result_source` {s:?}: use `stdout` or `file:/absolute/path`"
                ));
            }
        },
    };
    Ok(crate::model::ContainerSpec {
        image,
        command: spec.command.clone(),
        nano_cpus,
        result_file,
        network: false,
    })
}

/// Whether `image` matches one of the operator's patterns (exact, or a prefix ending
/// in `*`); every image when there are none.
fn image_allowed(image: &str, allowed: &[String]) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => image.starts_with(prefix),
            None => image == p,
        })
}

/// The command of a `vm` job spec, checked: it runs as a container without an image
/// (`function` is `vm`).
fn vm_spec(spec: &JobSpec) -> Result<crate::model::ContainerSpec, String> {
    if !spec.function.is_empty() || spec.image.is_some() {
        return Err("a vm job runs `command` (in busybox), not `function` or `image`".into());
    }
    if spec.cpus.is_some() || spec.result_source.is_some() {
        return Err("`cpus` and `result_source` are for docker jobs, not vm jobs".into());
    }
    if spec.command.is_empty() {
        return Err("a vm job needs `command` (argv, e.g. [\"sh\", \"-c\", \"echo hi\"])".into());
    }
    if spec.command.len() > 4096 || spec.command.iter().any(|a| a.contains('\0')) {
        return Err("`command`: at most 4096 arguments, without NUL".into());
    }
    Ok(crate::model::ContainerSpec {
        image: "vm".into(),
        command: spec.command.clone(),
        nano_cpus: None,
        result_file: None,
        network: false,
    })
}
