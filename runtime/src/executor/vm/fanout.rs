//! Fan-out: one job on N clones with ids 0..N-1, armed behind a barrier and released
//! together; [`VmExecutor::reserve`] holds the clones first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tokio_util::sync::CancellationToken;

use super::VmExecutor;
use super::clone::Vm;
use super::frame::JobFrame;
use crate::executor::{NoLiveOutput, OutputSink, RunRequest};
use crate::model::JobOutcome;

/// N clones held for a fan-out, killed when dropped (or after the time they were
/// reserved for, at the next use).
pub struct Reservation {
    clones: Vec<Vm>,
    expires: Instant,
}

impl Reservation {
    pub fn len(&self) -> usize {
        self.clones.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clones.is_empty()
    }
}

/// How each clone of a fan-out ended, with timings.
#[derive(Debug)]
pub struct FanOut {
    /// One per clone, by clone id.
    pub outcomes: Vec<JobOutcome>,
    /// From the call to every clone armed behind the barrier.
    pub ready: Duration,
    /// From the call to every clone's exit.
    pub total: Duration,
}

impl VmExecutor {
    /// Holds `n` clones (from the pool, the rest restored in parallel) for `ttl`.
    pub async fn reserve(&self, n: usize, ttl: Duration) -> anyhow::Result<Reservation> {
        let started = Instant::now();
        let inner = &self.inner;
        inner.template().await?;
        let clones = futures::future::try_join_all((0..n).map(|_| inner.acquire())).await?;
        Ok(Reservation { clones, expires: started + ttl })
    }

    /// Runs `req` on `n` clones with ids 0..n-1 (`CLOUDPIPE_CLONE_ID`,
    /// `CLOUDPIPE_CLONES`), started together: each gets its job and waits until all
    /// are armed. The timeout counts from the start of the call.
    pub async fn fan_out(&self, req: RunRequest, n: usize) -> anyhow::Result<FanOut> {
        let started = Instant::now();
        let reservation = self.reserve(n, req.timeout).await?;
        self.fan_out_on(reservation, req, started).await
    }

    /// [`VmExecutor::fan_out`] on reserved clones; `started` is when the caller began
    /// (the timeout and the timings count from it).
    pub async fn fan_out_on(
        &self,
        reservation: Reservation,
        req: RunRequest,
        started: Instant,
    ) -> anyhow::Result<FanOut> {
        if Instant::now() > reservation.expires {
            bail!("the reservation expired");
        }
        let n = reservation.clones.len();
        let deadline = tokio::time::Instant::from_std(started) + req.timeout;
        let base = JobFrame::from_request(&req);
        let mut clones = reservation.clones;
        let arm = clones.iter_mut().enumerate().map(|(i, vm)| {
            let job =
                JobFrame { clone_id: i as u32, clones: n as u32, barrier: true, ..base.clone() };
            async move { vm.start(&job).await }
        });
        tokio::time::timeout_at(deadline, futures::future::try_join_all(arm))
            .await
            .map_err(|_| anyhow!("the clones were not ready within the timeout"))??;
        let ready = started.elapsed();
        // The barrier: every clone is armed; release them all.
        futures::future::try_join_all(clones.iter_mut().map(|vm| vm.send(b'G', &[]))).await?;
        let live: Arc<dyn OutputSink> = Arc::new(NoLiveOutput);
        let cancel = CancellationToken::new();
        let outcomes = futures::future::join_all(
            clones.iter_mut().map(|vm| vm.finish(&req, &live, deadline, &cancel)),
        )
        .await;
        Ok(FanOut { outcomes, ready, total: started.elapsed() })
    }
}
