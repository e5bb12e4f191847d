//! The driver of a running batch: keeps up to `split` of its inputs' jobs running,
//! feeds their ends to the batch's [`Progress`], writes how the batch ended and calls
//! its report hook.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudpipe_types::{BatchRecord, BatchStatus, JobSpec, JobStatus};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::progress::Progress;
use super::{Batches, Inner};
use crate::account::{Limits, Tenant};
use crate::egress::Egress;
use crate::model::{BatchRef, BatchState, Job, JobId, now_micros};
use crate::scheduler::SubmitError;
use crate::store::{BATCH_CHUNK, JobFilter, Store};

impl Inner {
    /// Keeps up to `split` jobs of the batch running until no input is pending, the
    /// strikes are reached or the batch is cancelled; then writes how it ended.
    pub(super) async fn drive(
        self: Arc<Self>,
        mut state: BatchState,
        progress: Arc<Mutex<Progress>>,
        stop: CancellationToken,
    ) {
        let tenant = state.tenant();
        // Set when the account turns out disabled: the batch pauses as if cancelled.
        let paused = stop.clone();
        let stopping = self.scheduler.stopping().clone();
        let mut in_flight: FuturesUnordered<futures::future::BoxFuture<'static, (usize, Ended)>> =
            FuturesUnordered::new();
        // Jobs found running at a restart are waited for like new ones.
        let already = progress.lock().unwrap().running_jobs();
        for (i, id) in already {
            in_flight.push(self.clone().await_job(i, id).boxed());
        }
        let mut inputs = InputChunk::default();
        let mut next = 0usize;
        let mut backoff = false;
        loop {
            // Launch while there is room.
            while !progress.lock().unwrap().struck()
                && !stop.is_cancelled()
                && !stopping.is_cancelled()
                && !backoff
                && in_flight.len() < state.split as usize
            {
                let Some(i) = progress.lock().unwrap().next_pending(next) else { break };
                let input = match inputs.get(&*self.store, &state.id, i).await {
                    Ok(Some(input)) => input,
                    Ok(None) => {
                        tracing::error!(batch = %state.id, input = i, "a batch input is not in the store");
                        progress.lock().unwrap().refused(i);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(batch = %state.id, error = format!("{e:#}"), "reading batch inputs failed; retrying");
                        backoff = true;
                        break;
                    }
                };
                next = i + 1;
                let spec = state.job_spec(&input);
                let batch = BatchRef { id: state.id.clone(), index: i as u64, round: state.round };
                let fut = self.clone().run_input(i, spec, tenant.clone(), batch);
                progress.lock().unwrap().launching(i);
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
            let mut p = progress.lock().unwrap();
            match result {
                Ended::Job(job) => p.ended(i, &job, stop.is_cancelled()),
                Ended::Launched(id) => {
                    // Submitted, not ended within the submit's wait: follow it.
                    p.launched(i, id);
                    in_flight.push(self.clone().await_job(i, id).boxed());
                }
                Ended::AccountDisabled => {
                    // Checked at each submit: the account was disabled meanwhile.
                    p.put_back(i);
                    if !paused.is_cancelled() {
                        tracing::info!(batch = %state.id, account = %state.account, "the account is disabled: pausing its batch");
                        paused.cancel();
                    }
                }
                Ended::Busy => {
                    // The account is at its concurrent-jobs quota: try again shortly.
                    p.put_back(i);
                    backoff = true;
                }
                Ended::Refused(e) => {
                    tracing::warn!(batch = %state.id, input = i, error = %e, "batch input refused");
                    p.refused(i);
                }
            }
        }
        let (counts, job_micros, struck) = {
            let p = progress.lock().unwrap();
            (p.counts(), p.job_micros(), p.struck())
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
                Ok(true) => break,
                Ok(false) => {
                    // Deleted while it stopped: nothing to report.
                    self.running.lock().unwrap().remove(&state.id);
                    if let Some(cluster) = self.scheduler.cluster() {
                        let _ = cluster.release_batch(&state.id).await;
                    }
                    return;
                }
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
    pub(super) async fn tenant_now(&self, stored: &Tenant) -> anyhow::Result<Option<Tenant>> {
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
    pub(super) async fn egress_of(&self, account: &str, admin: bool) -> anyhow::Result<Egress> {
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
    pub(super) fn call_hook(self: Arc<Self>, mut state: BatchState) {
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
pub(super) fn hook_destination(url: &str) -> Result<(String, u16), String> {
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

/// The chunk of a batch's inputs its driver holds: one at a time, read when the next
/// input to launch is outside it.
#[derive(Default)]
struct InputChunk {
    start: u64,
    inputs: Vec<Vec<String>>,
}

impl InputChunk {
    /// The words of input `i` (`None`: the store does not have it).
    async fn get(
        &mut self,
        store: &dyn Store,
        batch: &str,
        i: usize,
    ) -> anyhow::Result<Option<Vec<String>>> {
        let i = i as u64;
        if !(self.start..self.start + self.inputs.len() as u64).contains(&i) {
            let start = i - i % BATCH_CHUNK as u64;
            self.inputs = store.batch_inputs(batch, start, BATCH_CHUNK).await?;
            self.start = start;
        }
        Ok(self.inputs.get((i - self.start) as usize).cloned())
    }
}
