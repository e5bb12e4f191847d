//! The `vm` executor: a job in a QEMU microVM cloned from a running snapshot, as
//! GridCentric's Copper cloned live VMs.
//!
//! # Template → snapshot → clones
//! Once per process (per content: the snapshot is cached on disk by a hash of
//! everything that goes into it) a *template* VM boots Debian's kernel with an
//! initramfs made here from busybox and the guest agent (`guest-runners/vm-agent`),
//! waits for the agent's ready frame, stops and is migrated to a file. Each job then
//! gets a *clone*: a QEMU process started with `-S -incoming` from that file, which
//! wakes up inside the agent's wait for a job. The agent gets the job (argv, env,
//! stdin, the clone's id, fresh entropy and the host's clock) over the first serial
//! port, reseeds the guest's CRNG, runs the command and streams stdout and stderr back
//! framed, then the exit status; the clone is killed. A warm pool of restored clones
//! (already run once so that TCG has translated the shell, then paused) hides the
//! restore. [`VmExecutor::fan_out`] runs one job on N clones with ids 0..N-1, started
//! together behind a barrier; [`VmExecutor::reserve`] holds N clones for a while first.
//!
//! # Limits and isolation
//! No network device at all. Clones run under QEMU's seccomp sandbox and, when the
//! server is root, as their own user in an empty chroot (`clone::Confined`). The guest has `memory_mb` of RAM (the template's); the
//! job's `memory_mb` caps its address space inside (`RLIMIT_AS`), and a guest OOM kill
//! is reported as `memory_limit`. The timeout and cancel kill the clone.
//!
//! # Reaping
//! Each QEMU process is a child in its own process group with `PR_SET_PDEATHSIG`: it
//! dies with the server, `kill -9` included. Beside that, every one carries `-name
//! cloudpipe-vm-<instance>` (the instance derived from the data directory) and a
//! pidfile under the data directory; [`VmExecutor::reap`] (run at start) kills every
//! process carrying this server's label, so a server restarted after a crash leaves
//! none behind whatever happened. A clone dropped anywhere (timeout, cancel, panic) is
//! killed by its `Drop`.
//!
//! # Layout
//! - `config`: [`VmConfig`], plain data.
//! - `frame`: the frame protocol with the guest agent (the job frame's encoding).
//! - `qmp`: the QEMU monitor client.
//! - `clone`: one QEMU process (template or clone): start, frames, restore, the job's
//!   run and how it ended.
//! - `template`: the tools check, QEMU's command line (one function, `qemu_args`),
//!   the template's boot and snapshot.
//! - `initramfs`: the template's initramfs.
//! - `pool`: the template made once, the warm pool of clones.
//! - `reaper`: [`VmExecutor::reap`], at start.
//! - `fanout`: [`VmExecutor::fan_out`], [`VmExecutor::reserve`].
//! - [`bench`]: probes for the VM benchmark, not used by the server.

mod clone;
mod config;
mod fanout;
mod frame;
mod initramfs;
mod pool;
mod qmp;
mod reaper;
mod template;

pub mod bench;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use cloudpipe_types::{FunctionKind, JobStatus};
use tokio_util::sync::CancellationToken;

use super::{Executor, OutputSink, PrepareError, RunRequest, Unready};
use crate::model::JobOutcome;
use clone::Vm;
use frame::JobFrame;
use template::{Template, check};

pub use config::{DEFAULT_RUN_AS, VmConfig};
pub use fanout::{FanOut, Reservation};
pub use initramfs::initramfs;

/// How long a template may take to boot to a ready agent (TCG is slow, and the
/// machine may be busy).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restore may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs jobs in clones of a template VM. One per process.
pub struct VmExecutor {
    inner: Arc<Inner>,
}

struct Inner {
    config: VmConfig,
    template: tokio::sync::OnceCell<Arc<Template>>,
    /// Restored, warmed and paused clones.
    pool: Mutex<VecDeque<Vm>>,
    filling: AtomicBool,
    /// [`check`] passed once (it runs QEMU; not on every submission).
    checked: AtomicBool,
    seq: AtomicU64,
}

/// A failed attempt with an error kind and message.
fn failed(kind: &str, message: impl Into<String>) -> JobOutcome {
    JobOutcome::error(JobStatus::Failed, kind, message)
}

impl VmExecutor {
    pub fn new(config: VmConfig) -> VmExecutor {
        VmExecutor {
            inner: Arc::new(Inner {
                config,
                template: tokio::sync::OnceCell::new(),
                pool: Mutex::new(VecDeque::new()),
                filling: AtomicBool::new(false),
                checked: AtomicBool::new(false),
                seq: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.inner.config
    }

    /// Whether the executor is configured and its tools are installed.
    pub fn configured(&self) -> bool {
        check(&self.inner.config).is_ok()
    }

    /// Boots (or finds) the template and fills the pool, in the background, when the
    /// executor is configured and its tools are installed. Call once at start.
    pub fn warm_up(&self) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let checking = inner.clone();
            match tokio::task::spawn_blocking(move || check(&checking.config)).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    tracing::info!(reason = %why, "the vm executor is not ready");
                    return;
                }
                Err(_) => return,
            }
            match inner.template().await {
                Ok(_) => inner.refill(),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "the vm template failed"),
            }
        });
    }

    /// Waits for the template (booting it if needed); how long its boot took (zero if
    /// it came from the cache).
    pub async fn template_boot_time(&self) -> anyhow::Result<Duration> {
        Ok(self.inner.template().await?.boot_time)
    }

    /// Clones in the warm pool now.
    pub fn pooled(&self) -> usize {
        self.inner.pool.lock().unwrap().len()
    }
}

#[async_trait]
impl Executor for VmExecutor {
    fn name(&self) -> &'static str {
        "vm"
    }

    async fn prepare(&self, _id: &str, _binary: &[u8]) -> Result<FunctionKind, PrepareError> {
        Err(PrepareError::Invalid("the vm executor runs commands, not uploaded binaries".into()))
    }

    async fn available(&self) -> Result<(), Unready> {
        if self.inner.checked.load(Ordering::Acquire) {
            return Ok(());
        }
        check(&self.inner.config)?;
        self.inner.checked.store(true, Ordering::Release);
        Ok(())
    }

    async fn run(
        &self,
        req: RunRequest,
        live: Arc<dyn OutputSink>,
        cancel: CancellationToken,
    ) -> JobOutcome {
        let job = JobFrame::from_request(&req);
        if job.argv.is_empty() {
            return failed("invalid", "a vm job needs a `command`");
        }
        // Getting a clone may wait for the template's first boot; the job's timeout
        // starts once it has one, as a container's starts once it runs.
        let acquired = tokio::select! {
            vm = self.inner.acquire() => vm,
            _ = tokio::time::sleep(BOOT_TIMEOUT + RESTORE_TIMEOUT) => {
                return JobOutcome::error(JobStatus::TimedOut, "timeout", format!("no VM was ready within {:?}", BOOT_TIMEOUT + RESTORE_TIMEOUT));
            }
            _ = cancel.cancelled() => {
                return JobOutcome::error(JobStatus::Cancelled, "cancelled", "cancelled while starting");
            }
        };
        let mut vm = match acquired {
            Ok(vm) => vm,
            Err(e) => return failed("executor_unavailable", format!("{e:#}")),
        };
        let deadline = tokio::time::Instant::now() + req.timeout;
        let started = tokio::select! {
            r = vm.start(&job) => r,
            _ = tokio::time::sleep_until(deadline) => Err(anyhow!("timeout")),
            _ = cancel.cancelled() => Err(anyhow!("cancelled")),
        };
        if let Err(e) = started {
            if cancel.is_cancelled() {
                return JobOutcome::error(
                    JobStatus::Cancelled,
                    "cancelled",
                    "cancelled while starting",
                );
            }
            if tokio::time::Instant::now() >= deadline {
                return JobOutcome::error(
                    JobStatus::TimedOut,
                    "timeout",
                    format!("killed after the timeout of {} ms", req.timeout.as_millis()),
                );
            }
            return failed("executor", format!("giving the job to the VM: {e:#}"));
        }
        vm.finish(&req, &live, deadline, &cancel).await
    }
}
