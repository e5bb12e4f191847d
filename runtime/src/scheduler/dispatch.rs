//! Running jobs: the dispatcher that claims queued jobs when run slots free, one
//! attempt on the executor, the write of its outcome, and what other nodes of a
//! cluster tell this one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cloudpipe_types::JobStatus;
use tokio::sync::{OwnedSemaphorePermit, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Inner;
use super::hub::{LiveEvent, LiveSink};
use super::keys::KeyHold;
use crate::cluster::ClusterEvent;
use crate::executor::{ContainerRequest, Executor, RunRequest};
use crate::model::{Job, JobId, JobOutcome, now_micros};
use crate::store::Inserted;

/// How long a run slot stays taken after its attempt found the executor full.
const BUSY_PAUSE: Duration = Duration::from_millis(50);

impl Inner {
    /// Claims queued jobs whenever a slot is free.
    pub(super) async fn dispatch(self: Arc<Self>) {
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

    pub(super) fn spawn_run(self: &Arc<Self>, job: Job, slot: OwnedSemaphorePermit) {
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
    pub(super) fn spawn_fast_run(
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
            self.hub.discard_replay(id);
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
    pub(super) fn ended(&self, job: Job) {
        if job.status.is_terminal() {
            self.active.leave(&job.account, job.id);
        }
        self.hub.finished(job);
    }

    /// Acts on what other nodes did: queued jobs wake the dispatcher, jobs ended
    /// elsewhere reach their waiters here, cancels and lost leases stop local runs.
    pub(super) async fn follow_cluster(
        self: Arc<Self>,
        mut events: broadcast::Receiver<ClusterEvent>,
    ) {
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
}

/// The span of one attempt. Debug level: at thousands of jobs a second, formatting
/// it for every job costs more than the job.
fn run_span(job: &Job) -> tracing::Span {
    tracing::debug_span!("runtime.run_job", job_id = %job.id, function = %job.function, attempt = job.attempts)
}
