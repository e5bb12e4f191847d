//! Batches, as cloudtask ran them: one job template over many inputs, at most `split`
//! jobs running at once, failed inputs retried, a stop after `strikes` failures in a
//! row, resume and retry by id, and a report hook called once at the end.
//!
//! The jobs are the truth. Each job of a batch carries a [`BatchRef`] (batch, input
//! index, retry round), so the state of every input can be rebuilt from the store
//! alone: a batch interrupted by `kill -9` continues after the restart with nothing
//! lost (an input whose job never reached the store is still pending) and nothing
//! counted twice (each input is counted once, by its latest job). The batch record
//! itself is written only when the batch starts, changes status or has called its
//! hook; per-job progress costs no extra write. Jobs are submitted on the fast path
//! (a job that ends within a few milliseconds is written once, finished).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudpipe_types::{BatchCounts, BatchRecord, BatchSpec, BatchStatus, JobSpec, JobStatus};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::account::{Limits, Tenant};
use crate::cluster::{Cluster, ClusterEvent};
use crate::egress::{Egress, EgressConfig};
use crate::model::{BatchRef, BatchState, Job, JobId, StoredLimits, now_micros, rfc3339};
use crate::scheduler::{Scheduler, SubmitError};
use crate::store::{JobFilter, Store};

/// Most inputs of one batch.
pub const MAX_INPUTS: usize = 1_000_000;

impl BatchState {
    fn tenant(&self) -> Tenant {
        let l = self.limits;
        Tenant {
            account: self.account.clone(),
            admin: self.admin,
            limits: Limits {
                max_concurrent_jobs: l.max_concurrent_jobs,
                max_timeout_ms: l.max_timeout_ms,
                max_memory_mb: l.max_memory_mb,
                max_function_bytes: l.max_function_bytes,
                // Retention's business, not the batch's.
                max_finished_jobs: None,
            },
            allow_network: self.allow_network,
        }
    }

    /// The job spec of input `index`.
    fn job_spec(&self, index: usize) -> JobSpec {
        let mut spec = JobSpec::from(self.template.clone());
        spec.args.extend(self.inputs[index].iter().cloned());
        spec
    }
}

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    Invalid(String),
    #[error("batch {0:?} not found")]
    NotFound(String),
    /// The template's function is not there for this account.
    #[error("function {0:?} not found")]
    FunctionNotFound(String),
    /// Resume/retry of a running batch, and the like.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Where one input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Pending,
    Running(JobId),
    Ok,
    Failed,
    TimedOut,
    Cancelled,
}

/// The live state of a running batch, shared with readers.
#[derive(Debug)]
struct Live {
    inputs: Vec<Input>,
    /// Tries of each input in the current round.
    tries: Vec<u32>,
    job_micros: u64,
    /// Inputs that ended failed in a row.
    failures_in_a_row: u32,
}

impl Live {
    fn counts(&self) -> BatchCounts {
        let mut c = BatchCounts::default();
        for i in &self.inputs {
            match i {
                Input::Pending => c.pending += 1,
                Input::Running(_) => c.running += 1,
                Input::Ok => c.ok += 1,
                Input::Failed => c.failed += 1,
                Input::TimedOut => c.timed_out += 1,
                Input::Cancelled => c.cancelled += 1,
            }
        }
        c
    }
}

struct Handle {
    account: String,
    live: Arc<Mutex<Live>>,
    stop: CancellationToken,
}

/// How often a cluster node looks for batches whose driver stopped.
const BATCH_TAKEOVER_POLL: Duration = Duration::from_millis(500);

/// The batches of a process: creates them, drives the running ones, answers reads.
#[derive(Clone)]
pub struct Batches {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    scheduler: Scheduler,
    running: Mutex<HashMap<String, Handle>>,
    /// Where report hooks may be sent (with each account's own policy).
    egress: Arc<EgressConfig>,
}

impl Batches {
    /// Continues every batch that was running when the process stopped, except those
    /// of an account disabled since: they are paused (cancelled, resumable) instead.
    pub async fn start(
        store: Arc<dyn Store>,
        scheduler: Scheduler,
        egress: Arc<EgressConfig>,
    ) -> anyhow::Result<Batches> {
        let b = Batches {
            inner: Arc::new(Inner { store, scheduler, running: Mutex::default(), egress }),
        };
        let cluster = b.inner.scheduler.cluster().cloned();
        for mut state in b.inner.store.list_batches(None).await? {
            match state.status {
                BatchStatus::Running if b.inner.tenant_now(&state.tenant()).await?.is_none() => {
                    tracing::info!(batch = %state.id, account = %state.account, "pausing a batch of a disabled account");
                    state.status = BatchStatus::Cancelled;
                    state.finished_at = Some(now_micros());
                    b.inner.store.put_batch(state).await?;
                }
                // In a cluster, a running batch belongs to the node holding its lease;
                // those whose node died are taken over below.
                BatchStatus::Running if cluster.is_some() => {}
                BatchStatus::Running => {
                    tracing::info!(batch = %state.id, "continuing a batch after a restart");
                    b.launch(state, false).await?;
                }
                BatchStatus::Finished | BatchStatus::Struck
                    if state.hook.is_some() && !state.hook_called =>
                {
                    b.inner.clone().call_hook(state);
                }
                _ => {}
            }
        }
        if let Some(cluster) = cluster {
            tokio::spawn(b.clone().take_over(cluster.clone()));
            tokio::spawn(b.clone().follow_cancels(cluster));
        }
        Ok(b)
    }

    /// In a cluster: drives every running batch whose driver's lease ran out (its node
    /// died or stopped), and keeps looking while the process lives.
    async fn take_over(self, cluster: Arc<dyn Cluster>) {
        let stopping = self.inner.scheduler.stopping().clone();
        loop {
            if let Ok(orphans) = cluster.orphaned_batches().await {
                for id in orphans {
                    if self.inner.running.lock().unwrap().contains_key(&id) {
                        continue;
                    }
                    match cluster.claim_batch(&id).await {
                        Ok(true) => {}
                        _ => continue,
                    }
                    match self.inner.store.get_batch(&id).await {
                        Ok(Some(state)) if state.status == BatchStatus::Running => {
                            tracing::info!(batch = %id, node = cluster.node(), "taking over a batch whose driver stopped");
                            if let Err(e) = self.launch(state, false).await {
                                tracing::error!(batch = %id, error = format!("{e:#}"), "taking over a batch failed");
                                let _ = cluster.release_batch(&id).await;
                            }
                        }
                        _ => {
                            let _ = cluster.release_batch(&id).await;
                        }
                    }
                }
            }
            tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tokio::time::sleep(BATCH_TAKEOVER_POLL) => {}
            }
        }
    }

    /// In a cluster: cancels the batches driven here that a client cancelled through
    /// another node.
    async fn follow_cancels(self, cluster: Arc<dyn Cluster>) {
        let mut events = cluster.subscribe();
        loop {
            match events.recv().await {
                Ok(ClusterEvent::BatchCancel(id)) => {
                    let stop = self.inner.running.lock().unwrap().get(&id).map(|h| h.stop.clone());
                    if let Some(stop) = stop {
                        stop.cancel();
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Takes the driver lease of a batch this node starts (clusters only).
    async fn lease(&self, id: &str) -> Result<(), BatchError> {
        if let Some(cluster) = self.inner.scheduler.cluster()
            && !cluster.claim_batch(id).await?
        {
            return Err(BatchError::Conflict(format!(
                "batch {id:?} is driven by another node; retry when it stops"
            )));
        }
        Ok(())
    }

    /// Checks and stores a new batch, then starts it.
    pub async fn create(
        &self,
        spec: BatchSpec,
        tenant: &Tenant,
    ) -> Result<BatchRecord, BatchError> {
        let invalid = |m: &str| Err(BatchError::Invalid(m.to_string()));
        let mut inputs = match (spec.inputs, spec.input_text) {
            (Some(_), Some(_)) => return invalid("give `inputs` or `input_text`, not both"),
            (Some(v), None) => v,
            (None, Some(t)) => t
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.split_whitespace().map(str::to_string).collect())
                .collect(),
            (None, None) => return invalid("a batch needs `inputs` or `input_text`"),
        };
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(BatchError::Invalid(format!("a batch has 1 to {MAX_INPUTS} inputs")));
        }
        if inputs.iter().flatten().any(|a| a.contains('\0')) {
            return invalid("inputs may not contain NUL");
        }
        let split = spec.split.unwrap_or(8);
        if !(1..=10_000).contains(&split) {
            return invalid("`split` must be between 1 and 10000");
        }
        let retries = spec.retries.unwrap_or(0);
        if retries > 100 {
            return invalid("`retries` is at most 100");
        }
        if spec.template.idempotency_key.is_some() {
            return invalid("the template may not have an `idempotency_key`");
        }
        if let Some(h) = &spec.hook {
            let (host, port) = hook_destination(h).map_err(BatchError::Invalid)?;
            let egress = self.inner.egress_of(&tenant.account, tenant.admin).await?;
            egress.check_name(&host, port).map_err(|e| {
                BatchError::Invalid(format!(
                    "`hook`: {e} (the account's egress policy, set by the admin, and the server's settings decide)"
                ))
            })?;
        }
        let mut template = spec.template;
        if let Some(t) = spec.timeout_ms {
            template.timeout_ms = Some(t);
        }
        let l = tenant.limits;
        let state = BatchState {
            id: JobId::new().to_string(),
            account: tenant.account.clone(),
            admin: tenant.admin,
            limits: StoredLimits {
                max_concurrent_jobs: l.max_concurrent_jobs,
                max_timeout_ms: l.max_timeout_ms,
                max_memory_mb: l.max_memory_mb,
                max_function_bytes: l.max_function_bytes,
            },
            allow_network: tenant.allow_network,
            template: template.into(),
            inputs: std::mem::take(&mut inputs),
            split,
            retries,
            strikes: spec.strikes.unwrap_or(0),
            hook: spec.hook,
            status: BatchStatus::Running,
            round: 0,
            created_at: now_micros(),
            finished_at: None,
            final_counts: None,
            final_job_micros: 0,
            hook_called: false,
        };
        // The first input is checked as a job would be, so a bad template is a 400 now
        // rather than a batch of failures.
        self.inner.scheduler.check(state.job_spec(0), &state.tenant()).await.map_err(
            |e| match e {
                SubmitError::Internal(e) => BatchError::Internal(e),
                SubmitError::FunctionNotFound(f) => BatchError::FunctionNotFound(f),
                other => BatchError::Invalid(format!("the template does not make a job: {other}")),
            },
        )?;
        self.inner.store.put_batch(state.clone()).await?;
        self.lease(&state.id).await?;
        tracing::info!(batch = %state.id, account = %state.account, inputs = state.inputs.len(), split, "batch started");
        let id = state.id.clone();
        self.launch(state, false).await?;
        self.get(&id, None).await?.ok_or(BatchError::NotFound(id))
    }

    /// A batch as the API shows it; `None` if there is none or `account` (when given)
    /// does not own it.
    pub async fn get(
        &self,
        id: &str,
        account: Option<&str>,
    ) -> Result<Option<BatchRecord>, BatchError> {
        let Some(state) = self.inner.store.get_batch(id).await? else { return Ok(None) };
        if account.is_some_and(|a| a != state.account) {
            return Ok(None);
        }
        Ok(Some(self.record(&state)))
    }

    /// Batches of `account` (all: `None`), oldest first.
    pub async fn list(&self, account: Option<&str>) -> Result<Vec<BatchRecord>, BatchError> {
        let states = self.inner.store.list_batches(account).await?;
        Ok(states.iter().map(|s| self.record(s)).collect())
    }

    fn record(&self, s: &BatchState) -> BatchRecord {
        let live = self.inner.running.lock().unwrap().get(&s.id).map(|h| h.live.clone());
        let (status, counts, job_micros) = match &live {
            Some(l) => {
                let l = l.lock().unwrap();
                (BatchStatus::Running, l.counts(), l.job_micros)
            }
            None => (s.status, s.final_counts.unwrap_or_default(), s.final_job_micros),
        };
        let end = s.finished_at.filter(|_| live.is_none()).unwrap_or_else(now_micros);
        let wall_ms = end.saturating_sub(s.created_at) as f64 / 1000.0;
        let job_ms = job_micros as f64 / 1000.0;
        let efficiency = match wall_ms > 0.0 {
            true => job_ms / (wall_ms * s.split as f64),
            false => 0.0,
        };
        BatchRecord {
            id: s.id.clone(),
            account: s.account.clone(),
            status,
            total: s.inputs.len() as u64,
            counts,
            split: s.split,
            retries: s.retries,
            strikes: s.strikes,
            created_at: rfc3339(s.created_at),
            finished_at: s.finished_at.filter(|_| live.is_none()).map(rfc3339),
            wall_ms,
            job_ms,
            efficiency,
            hook: s.hook.clone(),
        }
    }

    /// Runs what is pending of a stopped batch (struck or cancelled).
    pub async fn resume(&self, id: &str, account: Option<&str>) -> Result<BatchRecord, BatchError> {
        self.restart(id, account, false).await
    }

    /// Puts failed and timed-out inputs back to pending (a fresh round of tries) and
    /// runs them.
    pub async fn retry(&self, id: &str, account: Option<&str>) -> Result<BatchRecord, BatchError> {
        self.restart(id, account, true).await
    }

    async fn restart(
        &self,
        id: &str,
        account: Option<&str>,
        new_round: bool,
    ) -> Result<BatchRecord, BatchError> {
        let not_found = || BatchError::NotFound(id.to_string());
        let mut state = self.inner.store.get_batch(id).await?.ok_or_else(not_found)?;
        if account.is_some_and(|a| a != state.account) {
            return Err(not_found());
        }
        if self.inner.running.lock().unwrap().contains_key(id) {
            return Err(BatchError::Conflict(format!("batch {id:?} is running")));
        }
        if new_round {
            state.round += 1;
        }
        state.status = BatchStatus::Running;
        state.finished_at = None;
        state.final_counts = None;
        state.hook_called = false;
        self.lease(id).await?;
        self.inner.store.put_batch(state.clone()).await?;
        self.launch(state, true).await?;
        self.get(id, None).await?.ok_or_else(not_found)
    }

    /// Stops launching jobs and cancels the running ones; their inputs stay pending,
    /// so the batch can be resumed.
    pub async fn cancel(&self, id: &str, account: Option<&str>) -> Result<BatchRecord, BatchError> {
        let not_found = || BatchError::NotFound(id.to_string());
        let state = self.inner.store.get_batch(id).await?.ok_or_else(not_found)?;
        if account.is_some_and(|a| a != state.account) {
            return Err(not_found());
        }
        let handle = self.inner.running.lock().unwrap().get(id).map(|h| h.stop.clone());
        match handle {
            Some(stop) => {
                stop.cancel();
                // The driver writes the stopped batch; wait for it.
                for _ in 0..600 {
                    if !self.inner.running.lock().unwrap().contains_key(id) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            // Driven by another node: it stops the batch and writes it.
            None if state.status == BatchStatus::Running
                && let Some(cluster) = self.inner.scheduler.cluster() =>
            {
                cluster.request_batch_cancel(id).await?;
                for _ in 0..600 {
                    match self.inner.store.get_batch(id).await? {
                        Some(s) if s.status == BatchStatus::Running => {
                            tokio::time::sleep(Duration::from_millis(10)).await
                        }
                        _ => break,
                    }
                }
            }
            None if state.status == BatchStatus::Running => {
                return Err(BatchError::Conflict(format!("batch {id:?} is starting; retry")));
            }
            None => {}
        }
        self.get(id, None).await?.ok_or_else(not_found)
    }

    /// Pauses every running batch of `account` (being disabled), as a cancel does: its
    /// running jobs are cancelled and it can be resumed later.
    pub async fn pause_account(&self, account: &str) -> Result<(), BatchError> {
        let ids: Vec<String> = {
            let running = self.inner.running.lock().unwrap();
            running.iter().filter(|(_, h)| h.account == account).map(|(id, _)| id.clone()).collect()
        };
        for id in ids {
            self.cancel(&id, None).await?;
        }
        Ok(())
    }

    /// Rebuilds the inputs' states from the batch's jobs and starts its driver.
    /// `resuming`: inputs whose job was cancelled are pending again.
    async fn launch(&self, state: BatchState, resuming: bool) -> anyhow::Result<()> {
        let n = state.inputs.len();
        let mut inputs = vec![Input::Pending; n];
        let mut tries = vec![0u32; n];
        let mut job_micros = 0u64;
        // Latest job per input (ids grow with time), tries counted in this round.
        let filter =
            JobFilter { batch: Some(state.id.clone()), limit: usize::MAX, ..Default::default() };
        let mut jobs = self.inner.store.list_jobs(&filter).await?;
        jobs.reverse(); // oldest first
        let mut latest: Vec<Option<Job>> = vec![None; n];
        for job in jobs {
            let Some(b) = &job.batch else { continue };
            let i = b.index as usize;
            if i >= n {
                continue;
            }
            if let (Some(s), Some(f)) = (job.started_at, job.finished_at) {
                job_micros += f.saturating_sub(s);
            }
            if b.round == state.round {
                tries[i] += 1;
            }
            latest[i] = Some(job);
        }
        let allowed = state.retries + 1;
        for (i, job) in latest.into_iter().enumerate() {
            let Some(job) = job else { continue };
            let this_round = job.batch.as_ref().is_some_and(|b| b.round == state.round);
            inputs[i] = match job.status {
                JobStatus::Queued | JobStatus::Running => Input::Running(job.id),
                JobStatus::Succeeded => Input::Ok,
                JobStatus::Cancelled if resuming => Input::Pending,
                JobStatus::Cancelled => Input::Cancelled,
                _ if this_round && tries[i] < allowed => Input::Pending,
                _ if !this_round => Input::Pending,
                JobStatus::TimedOut => Input::TimedOut,
                _ => Input::Failed,
            };
        }
        let live = Arc::new(Mutex::new(Live { inputs, tries, job_micros, failures_in_a_row: 0 }));
        let stop = CancellationToken::new();
        self.inner.running.lock().unwrap().insert(
            state.id.clone(),
            Handle { account: state.account.clone(), live: live.clone(), stop: stop.clone() },
        );
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.drive(state, live, stop).await });
        Ok(())
    }
}

impl Inner {
    /// Keeps up to `split` jobs of the batch running until no input is pending, the
    /// strikes are reached or the batch is cancelled; then writes how it ended.
    async fn drive(
        self: Arc<Self>,
        mut state: BatchState,
        live: Arc<Mutex<Live>>,
        stop: CancellationToken,
    ) {
        let tenant = state.tenant();
        let allowed = state.retries + 1;
        // Set when the account turns out disabled: the batch pauses as if cancelled.
        let paused = stop.clone();
        let stopping = self.scheduler.stopping().clone();
        let mut in_flight: FuturesUnordered<futures::future::BoxFuture<'static, (usize, Ended)>> =
            FuturesUnordered::new();
        // Jobs found running at a restart are waited for like new ones.
        let already: Vec<(usize, JobId)> = live
            .lock()
            .unwrap()
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Input::Running(id) => Some((i, *id)),
                _ => None,
            })
            .collect();
        for (i, id) in already {
            in_flight.push(self.clone().await_job(i, id).boxed());
        }
        let mut next = 0usize;
        let mut struck = false;
        let mut backoff = false;
        loop {
            // Launch while there is room.
            while !struck
                && !stop.is_cancelled()
                && !stopping.is_cancelled()
                && !backoff
                && in_flight.len() < state.split as usize
            {
                let i = {
                    let l = live.lock().unwrap();
                    let n = l.inputs.len();
                    (0..n).map(|k| (next + k) % n).find(|&k| l.inputs[k] == Input::Pending)
                };
                let Some(i) = i else { break };
                next = i + 1;
                let spec = state.job_spec(i);
                let batch = BatchRef { id: state.id.clone(), index: i as u64, round: state.round };
                let fut = self.clone().run_input(i, spec, tenant.clone(), batch);
                live.lock().unwrap().inputs[i] = Input::Running(JobId(uuid::Uuid::nil()));
                in_flight.push(fut.boxed());
            }
            if in_flight.is_empty() {
                if backoff {
                    backoff = false;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                break;
            }
            let ended = tokio::select! {
                ended = in_flight.next() => ended,
                // Cancelled: stop what runs, again every 50 ms until nothing does (a job
                // on the fast path reaches the store a moment after it starts). Their
                // inputs go back to pending below.
                _ = stop.cancelled(), if !stop.is_cancelled() => {
                    self.cancel_running(&state.id).await;
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(50)), if stop.is_cancelled() => {
                    self.cancel_running(&state.id).await;
                    continue;
                }
                _ = stopping.cancelled(), if !stopping.is_cancelled() => {
                    // The server stops: leave the batch running in the store; it
                    // continues at the next start (in a cluster, on another node now).
                    self.running.lock().unwrap().remove(&state.id);
                    if let Some(cluster) = self.scheduler.cluster() {
                        let _ = cluster.release_batch(&state.id).await;
                    }
                    return;
                }
            };
            let Some((i, result)) = ended else { continue };
            let mut l = live.lock().unwrap();
            match result {
                Ended::Job(job) => {
                    if let (Some(s), Some(f)) = (job.started_at, job.finished_at) {
                        l.job_micros += f.saturating_sub(s);
                    }
                    l.tries[i] += 1;
                    l.inputs[i] = match job.status {
                        JobStatus::Succeeded => {
                            l.failures_in_a_row = 0;
                            Input::Ok
                        }
                        JobStatus::Cancelled if stop.is_cancelled() => Input::Pending,
                        JobStatus::Cancelled => Input::Cancelled,
                        _ if l.tries[i] < allowed => Input::Pending,
                        status => {
                            l.failures_in_a_row += 1;
                            if state.strikes > 0 && l.failures_in_a_row >= state.strikes {
                                struck = true;
                            }
                            match status {
                                JobStatus::TimedOut => Input::TimedOut,
                                _ => Input::Failed,
                            }
                        }
                    };
                }
                Ended::Launched(id) => {
                    // Submitted, not ended within the submit's wait: follow it.
                    l.inputs[i] = Input::Running(id);
                    in_flight.push(self.clone().await_job(i, id).boxed());
                }
                Ended::AccountDisabled => {
                    // Checked at each submit: the account was disabled meanwhile.
                    l.inputs[i] = Input::Pending;
                    if !paused.is_cancelled() {
                        tracing::info!(batch = %state.id, account = %state.account, "the account is disabled: pausing its batch");
                        paused.cancel();
                    }
                }
                Ended::Busy => {
                    // The account is at its concurrent-jobs quota: try again shortly.
                    l.inputs[i] = Input::Pending;
                    backoff = true;
                }
                Ended::Refused(e) => {
                    tracing::warn!(batch = %state.id, input = i, error = %e, "batch input refused");
                    l.tries[i] = allowed;
                    l.inputs[i] = Input::Failed;
                    l.failures_in_a_row += 1;
                    if state.strikes > 0 && l.failures_in_a_row >= state.strikes {
                        struck = true;
                    }
                }
            }
        }
        let (counts, job_micros) = {
            let l = live.lock().unwrap();
            (l.counts(), l.job_micros)
        };
        state.status = if stop.is_cancelled() {
            BatchStatus::Cancelled
        } else if struck {
            BatchStatus::Struck
        } else {
            BatchStatus::Finished
        };
        state.finished_at = Some(now_micros());
        state.final_counts = Some(counts);
        state.final_job_micros = job_micros;
        loop {
            match self.store.put_batch(state.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(batch = %state.id, error = format!("{e:#}"), "writing a batch failed; retrying");
                    if stopping.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        self.running.lock().unwrap().remove(&state.id);
        if let Some(cluster) = self.scheduler.cluster() {
            let _ = cluster.release_batch(&state.id).await;
        }
        tracing::info!(batch = %state.id, status = ?state.status, ok = counts.ok, failed = counts.failed, timed_out = counts.timed_out, pending = counts.pending, "batch ended");
        // The report goes out when the batch is over, not when it is only paused by
        // a cancel (it can be resumed).
        if state.hook.is_some() && state.status != BatchStatus::Cancelled {
            self.call_hook(state);
        }
    }

    /// Cancels the batch's queued and running jobs.
    async fn cancel_running(&self, batch: &str) {
        for status in [JobStatus::Running, JobStatus::Queued] {
            let filter = JobFilter {
                batch: Some(batch.to_string()),
                status: Some(status),
                limit: usize::MAX,
                ..Default::default()
            };
            if let Ok(jobs) = self.store.list_jobs(&filter).await {
                for job in jobs {
                    let _ = self.scheduler.cancel(job.id).await;
                }
            }
        }
    }

    /// The batch's submitter as the account is now: its current network policy and
    /// quotas (its own over those stored with the batch); `None` when it is disabled.
    /// An account without a record (vouched for by an external auth service) keeps
    /// what was stored.
    async fn tenant_now(&self, stored: &Tenant) -> anyhow::Result<Option<Tenant>> {
        let Some(account) = self.store.get_account(&stored.account).await? else {
            return Ok(Some(stored.clone()));
        };
        if account.disabled {
            return Ok(None);
        }
        let admin = account.role == cloudpipe_types::Role::Admin;
        Ok(Some(Tenant {
            account: account.name,
            admin,
            limits: match admin {
                true => Limits::default(),
                false => Limits::resolve(&account.quotas, &stored.limits.to_quotas()),
            },
            allow_network: account.allow_network,
        }))
    }

    /// Where requests sent for `account` may go now.
    async fn egress_of(&self, account: &str, admin: bool) -> anyhow::Result<Egress> {
        let policy = match (admin, self.store.get_account(account).await?) {
            (true, _) => vec!["*".to_string()],
            (false, Some(record)) => record.egress(),
            (false, None) => Vec::new(),
        };
        Ok(Egress::for_account(&policy, self.egress.clone()))
    }

    /// Submits the job of input `i` and waits for it on the fast path. The account is
    /// read again first: a disabled account's batch launches nothing more, and a
    /// changed network policy or quota applies to the next job.
    async fn run_input(
        self: Arc<Self>,
        i: usize,
        spec: JobSpec,
        stored: Tenant,
        batch: BatchRef,
    ) -> (usize, Ended) {
        let tenant = match self.tenant_now(&stored).await {
            Ok(Some(t)) => t,
            Ok(None) => return (i, Ended::AccountDisabled),
            Err(e) => return (i, Ended::Refused(format!("reading the account: {e:#}"))),
        };
        // Waits for the end: a short job is written once, already finished.
        let wait = Duration::from_secs(86_400);
        match self.scheduler.submit_and_wait_in(spec, &tenant, Some(batch), wait).await {
            Ok(inserted) => {
                let job = inserted.job().clone();
                match job.status.is_terminal() {
                    true => (i, Ended::Job(Box::new(job))),
                    false => (i, Ended::Launched(job.id)),
                }
            }
            Err(SubmitError::OverQuota(_)) => (i, Ended::Busy),
            Err(e) => (i, Ended::Refused(e.to_string())),
        }
    }

    /// Waits for a job that is queued or running.
    async fn await_job(self: Arc<Self>, i: usize, id: JobId) -> (usize, Ended) {
        loop {
            match self.scheduler.wait(id, Duration::from_secs(3600)).await {
                Ok(Some(job)) if job.status.is_terminal() => return (i, Ended::Job(Box::new(job))),
                Ok(Some(_)) => continue,
                Ok(None) => return (i, Ended::Refused("its job vanished".into())),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "waiting for a batch job failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Calls the report hook once (a few tries), then records that it was called.
    fn call_hook(self: Arc<Self>, mut state: BatchState) {
        tokio::spawn(async move {
            let Some(url) = state.hook.clone() else { return };
            let record = {
                let b = Batches { inner: self.clone() };
                b.record(&state)
            };
            for attempt in 0..3 {
                match self.send_hook(&state, &url, &record).await {
                    Ok(r) if r.status().is_success() => break,
                    Ok(r) => {
                        tracing::warn!(batch = %state.id, status = %r.status(), "the batch hook answered with an error")
                    }
                    Err(e) => {
                        tracing::warn!(batch = %state.id, error = format!("{e:#}"), "calling the batch hook failed")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            state.hook_called = true;
            if let Err(e) = self.store.put_batch(state).await {
                tracing::warn!(error = format!("{e:#}"), "recording the hook call failed");
            }
        });
    }
}

impl Inner {
    /// POSTs the report to `url`, connecting only to addresses the account's egress
    /// policy and the server's settings allow (resolved and checked here, then pinned
    /// for the client, so the name cannot be re-resolved elsewhere); no redirects.
    async fn send_hook(
        &self,
        state: &BatchState,
        url: &str,
        record: &BatchRecord,
    ) -> anyhow::Result<reqwest::Response> {
        let (host, port) = hook_destination(url).map_err(anyhow::Error::msg)?;
        let egress = self.egress_of(&state.account, state.admin).await?;
        let addrs = egress.resolve(&host, port).await?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .resolve_to_addrs(&host, &addrs)
            .build()?;
        Ok(client.post(url).json(record).send().await?)
    }
}

/// The host (without IPv6 brackets) and port of a hook URL, which must be http(s).
fn hook_destination(url: &str) -> Result<(String, u16), String> {
    let bad = || format!("`hook` must be an http:// or https:// URL with a host, not {url:?}");
    let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad());
    }
    let host = parsed.host_str().ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = parsed.port_or_known_default().ok_or_else(bad)?;
    Ok((host, port))
}

/// How a batch input's run came back to the driver.
enum Ended {
    Job(Box<Job>),
    Launched(JobId),
    Busy,
    /// The account was disabled: nothing was submitted.
    AccountDisabled,
    Refused(String),
}
