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
//!
//! A batch is bounded: its record is small (reading it reads no input), its inputs
//! are stored apart in chunks that only its driver reads, one chunk at a time, and
//! each account has caps on its inputs per batch, its batches and their inputs
//! ([`Limits`]). A stopped batch is deleted by `DELETE` (a running one is cancelled
//! first) or by retention, at the age at which finished jobs go; its jobs stay until
//! job retention takes them.
//!
//! # Layout
//! - this module: [`Batches`] (create, read, resume, retry, cancel; takes over the
//!   batches of stopped nodes in a cluster) and the stored [`BatchState`];
//! - `progress`: where each input is, a pure state machine rebuilt from the jobs;
//! - `driver`: the task that runs a batch's inputs and writes how it ended.

mod driver;
mod progress;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudpipe_types::{BatchRecord, BatchSpec, BatchStatus, JobSpec};
use tokio_util::sync::CancellationToken;

use self::driver::hook_destination;
use self::progress::Progress;
use crate::account::{Limits, Tenant};
use crate::cluster::{Cluster, ClusterEvent};
use crate::egress::EgressConfig;
use crate::model::{BatchState, JobId, StoredLimits, now_micros, rfc3339};
use crate::scheduler::{Scheduler, SubmitError};
use crate::store::{BatchCaps, BatchFilter, CreateBatch, JobFilter, Store};

/// Most inputs of one batch, whatever the account's quota.
pub const MAX_INPUTS: usize = 1_000_000;

/// How many batches a page of [`Batches::list`] holds at most.
pub const MAX_PAGE: usize = 1000;

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
                // Retention's and batch creation's business, not the jobs'.
                ..Limits::default()
            },
            allow_network: self.allow_network,
        }
    }

    /// The job spec of the input whose words are `input`.
    fn job_spec(&self, input: &[String]) -> JobSpec {
        let mut spec = JobSpec::from(self.template.clone());
        spec.args.extend(input.iter().cloned());
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
    /// Past one of the account's batch quotas; `code` names which.
    #[error("{message}")]
    OverQuota { code: &'static str, message: String },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

struct Handle {
    account: String,
    progress: Arc<Mutex<Progress>>,
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
    /// of an account disabled since: they are paused (cancelled, resumable) instead;
    /// calls the report hooks still due; starts batch retention. Reads the records of
    /// those batches only, not their inputs, nor any other batch.
    pub async fn start(
        store: Arc<dyn Store>,
        scheduler: Scheduler,
        egress: Arc<EgressConfig>,
    ) -> anyhow::Result<Batches> {
        let b = Batches {
            inner: Arc::new(Inner { store, scheduler, running: Mutex::default(), egress }),
        };
        let cluster = b.inner.scheduler.cluster().cloned();
        for mut state in b.inner.store.open_batches().await? {
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
        tokio::spawn(b.inner.clone().retain());
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
        let inputs: Vec<Vec<String>> = match (spec.inputs, spec.input_text) {
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
        if let Some(limit) = tenant.limits.max_batch_inputs
            && inputs.len() as u64 > limit
        {
            return Err(BatchError::OverQuota {
                code: "too_many_inputs",
                message: format!(
                    "the batch has {} inputs; account {:?} may have {limit} in one batch",
                    inputs.len(),
                    tenant.account
                ),
            });
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
            total: inputs.len() as u64,
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
        self.inner.scheduler.check(state.job_spec(&inputs[0]), &state.tenant()).await.map_err(
            |e| match e {
                SubmitError::Internal(e) => BatchError::Internal(e),
                SubmitError::FunctionNotFound(f) => BatchError::FunctionNotFound(f),
                other => BatchError::Invalid(format!("the template does not make a job: {other}")),
            },
        )?;
        let caps = BatchCaps {
            max_batches: tenant.limits.max_batches,
            max_inputs: tenant.limits.max_stored_batch_inputs,
        };
        let account = &tenant.account;
        match self.inner.store.create_batch(state.clone(), inputs, caps).await? {
            CreateBatch::Created => {}
            CreateBatch::TooManyBatches { used, limit } => {
                return Err(BatchError::OverQuota {
                    code: "too_many_batches",
                    message: format!(
                        "account {account:?} stores {used} batches, its limit {limit}: delete some \
                         (DELETE /v1/batches/ID) or wait for retention"
                    ),
                });
            }
            CreateBatch::TooManyInputs { used, limit } => {
                return Err(BatchError::OverQuota {
                    code: "too_many_stored_inputs",
                    message: format!(
                        "account {account:?} stores {used} batch inputs; with this batch's {} \
                         it would pass its limit of {limit}: delete some batches \
                         (DELETE /v1/batches/ID) or wait for retention",
                        state.total
                    ),
                });
            }
        }
        self.lease(&state.id).await?;
        tracing::info!(batch = %state.id, account = %state.account, inputs = state.total, split, "batch started");
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

    /// A page of the batches of `account` (all: `None`), newest first: at most
    /// `limit` older than the batch `before`; and the cursor of the next page, if
    /// there is one.
    pub async fn list(
        &self,
        account: Option<&str>,
        before: Option<String>,
        limit: usize,
    ) -> Result<(Vec<BatchRecord>, Option<String>), BatchError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let filter = BatchFilter { account: account.map(str::to_string), before, limit: limit + 1 };
        let mut states = self.inner.store.list_batches(&filter).await?;
        let next = match states.len() > limit {
            true => {
                states.truncate(limit);
                states.last().map(|s| s.id.clone())
            }
            false => None,
        };
        Ok((states.iter().map(|s| self.record(s)).collect(), next))
    }

    /// Deletes a stopped batch, its record and inputs (its jobs stay until job
    /// retention takes them). A running batch is cancelled first, as
    /// [`cancel`](Self::cancel) does; one that does not stop in time (driven by
    /// another node that does not answer) is refused with a conflict.
    pub async fn delete(&self, id: &str, account: Option<&str>) -> Result<(), BatchError> {
        let not_found = || BatchError::NotFound(id.to_string());
        let state = self.inner.store.get_batch(id).await?.ok_or_else(not_found)?;
        if account.is_some_and(|a| a != state.account) {
            return Err(not_found());
        }
        let running = self.inner.running.lock().unwrap().contains_key(id);
        if running || state.status == BatchStatus::Running {
            let stopped = self.cancel(id, None).await?;
            if stopped.status == BatchStatus::Running {
                return Err(BatchError::Conflict(format!(
                    "batch {id:?} is still running after its cancel; retry"
                )));
            }
        }
        self.inner.store.delete_batch(id).await?.ok_or_else(not_found)?;
        tracing::info!(batch = %id, account = %state.account, "batch deleted");
        Ok(())
    }

    fn record(&self, s: &BatchState) -> BatchRecord {
        let live = self.inner.running.lock().unwrap().get(&s.id).map(|h| h.progress.clone());
        let (status, counts, job_micros) = match &live {
            Some(p) => {
                let p = p.lock().unwrap();
                (BatchStatus::Running, p.counts(), p.job_micros())
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
            total: s.total,
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
        if !self.inner.store.put_batch(state.clone()).await? {
            // Deleted meanwhile.
            if let Some(cluster) = self.inner.scheduler.cluster() {
                let _ = cluster.release_batch(id).await;
            }
            return Err(not_found());
        }
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
        let filter =
            JobFilter { batch: Some(state.id.clone()), limit: usize::MAX, ..Default::default() };
        let mut jobs = self.inner.store.list_jobs(&filter).await?;
        jobs.reverse(); // oldest first
        let progress = Progress::rebuild(
            state.total as usize,
            state.round,
            state.retries,
            state.strikes,
            resuming,
            &jobs,
        );
        let progress = Arc::new(Mutex::new(progress));
        let stop = CancellationToken::new();
        self.inner.running.lock().unwrap().insert(
            state.id.clone(),
            Handle {
                account: state.account.clone(),
                progress: progress.clone(),
                stop: stop.clone(),
            },
        );
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.drive(state, progress, stop).await });
        Ok(())
    }
}

impl Inner {
    /// Deletes stopped batches past the job retention's age, a few at a time; in a
    /// cluster, on the leader only.
    async fn retain(self: Arc<Self>) {
        const BATCH: usize = 64;
        let stopping = self.scheduler.stopping().clone();
        let config = self.scheduler.config().clone();
        loop {
            tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tokio::time::sleep(config.retention_interval) => {}
            }
            if self.scheduler.cluster().is_some_and(|c| !c.is_leader()) {
                continue;
            }
            let max_age = config.retention.max_age_micros;
            loop {
                match self.store.purge_batches(max_age, now_micros(), BATCH).await {
                    Ok(n) if n == BATCH && !stopping.is_cancelled() => {
                        tokio::task::yield_now().await
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "batch retention failed");
                        break;
                    }
                }
            }
        }
    }
}
