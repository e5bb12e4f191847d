//! [`Vm`]: one QEMU process (the template while it boots, or a clone) with its
//! monitor and the agent's serial port; killed when dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use cloudpipe_types::{JobError, JobStatus};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

use super::frame::{self, JobFrame, fill_random};
use super::qmp::Qmp;
use super::template::Template;
use super::{Inner, RESTORE_TIMEOUT};
use crate::executor::{Capped, OutputSink, OutputStream, RunRequest};
use crate::model::JobOutcome;

/// The fd a clone reads its snapshot from.
const SNAPSHOT_FD: i32 = 3;

/// How a clone (where jobs' commands run) is confined, beside having no network
/// device: QEMU's seccomp sandbox with no process spawning, no obsolete or
/// resource-control system calls; its snapshot handed over as an open fd (it opens
/// no file by name); and, when the server is root, QEMU drops to
/// [`VmConfig::run_as`](super::VmConfig::run_as) and chroots into an empty directory
/// once it has set up, so a guest that escaped into QEMU could neither read the data
/// directory (nor any other file) nor act as root. A server that is not root runs
/// clones as itself, with privilege-raising system calls denied too.
///
/// Changing its user clears QEMU's `PR_SET_PDEATHSIG`: after a `kill -9` of a root
/// server its clones live on (paused) until the reaper at the next start.
struct Confined {
    snapshot: std::fs::File,
    /// `(uid, gid, empty directory)` when the server is root.
    drop_to: Option<(u32, u32, PathBuf)>,
}

impl Confined {
    fn open(inner: &Inner, snapshot: &Path) -> anyhow::Result<Confined> {
        let snapshot = std::fs::File::open(snapshot)
            .with_context(|| format!("opening the snapshot {}", snapshot.display()))?;
        #[allow(unsafe_code)]
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let drop_to = match root {
            true => {
                let (uid, gid) = inner.config.run_as;
                Some((uid, gid, inner.config.empty_dir()?))
            }
            false => None,
        };
        Ok(Confined { snapshot, drop_to })
    }

    fn args(&self) -> Vec<String> {
        let mut sandbox = "on,obsolete=deny,spawn=deny,resourcecontrol=deny".to_string();
        let mut args = vec!["-incoming".to_string(), format!("fd:{SNAPSHOT_FD}")];
        match &self.drop_to {
            // QEMU changes its ids itself, after the sandbox is in place.
            Some((uid, gid, empty)) => {
                args.extend(["-runas".into(), format!("{uid}:{gid}")]);
                args.extend(["-chroot".into(), empty.display().to_string()]);
            }
            None => sandbox.push_str(",elevateprivileges=deny"),
        }
        args.extend(["-sandbox".into(), sandbox]);
        args
    }
}

/// One QEMU process: the template while it boots, or a clone. Killed when dropped.
pub(super) struct Vm {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub qmp: Qmp,
    /// Pidfile, socket and log, removed with the VM.
    files: Vec<PathBuf>,
    log: PathBuf,
    paused: bool,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// How a job in a clone ended.
enum End {
    Exit(i32, bool),
    /// The serial port failed (the cause), with QEMU's log.
    Lost(String, String),
    Timeout,
    Cancelled,
}

impl Vm {
    /// Starts QEMU with `args` plus this server's label, a pidfile and a monitor, under
    /// QEMU's seccomp sandbox. Used for templates (which run only the agent, never a
    /// job's command); clones are [`Vm::restore`]d.
    pub async fn spawn(inner: &Inner, args: &[String], extra: &[&str]) -> anyhow::Result<Vm> {
        Vm::spawn_with(inner, args, extra, None).await
    }

    /// [`Vm::spawn`]; with `confined`, restored from its snapshot and confined.
    async fn spawn_with(
        inner: &Inner,
        args: &[String],
        extra: &[&str],
        confined: Option<Confined>,
    ) -> anyhow::Result<Vm> {
        let n = inner.seq.fetch_add(1, Ordering::Relaxed);
        let dir = inner.config.clones_dir();
        let base = dir.join(format!("{}-{n}", std::process::id()));
        let (pidfile, sock, log) =
            (base.with_extension("pid"), base.with_extension("qmp"), base.with_extension("log"));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(&inner.config.qemu);
        cmd.args(args)
            .args(extra)
            .arg("-name")
            .arg(inner.config.label())
            .arg("-pidfile")
            .arg(&pidfile)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).context("creating the VM's log")?)
            .process_group(0)
            .kill_on_drop(true);
        let snapshot_fd = match &confined {
            Some(c) => {
                cmd.args(c.args());
                Some(std::os::fd::AsRawFd::as_raw_fd(&c.snapshot))
            }
            None => {
                // Templates migrate out through `exec:`, so they may spawn.
                cmd.args(["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]);
                None
            }
        };
        #[allow(unsafe_code)]
        // SAFETY: only async-signal-safe calls (prctl, getppid, kill, dup2) between fork
        // and exec. QEMU gets SIGKILL when the thread that started it (a runtime worker,
        // living as long as the server) dies, `kill -9` of the server included; if the
        // server died before the prctl, QEMU kills itself. A clone's snapshot becomes
        // its fd 3 (`-incoming fd:3`; dup2 clears close-on-exec).
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                if libc::getppid() != parent {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                if let Some(fd) = snapshot_fd
                    && libc::dup2(fd, SNAPSHOT_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child =
            cmd.spawn().with_context(|| format!("starting {}", inner.config.qemu.display()))?;
        // The child has its copy (fd 3).
        drop(confined);
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::with_capacity(64 << 10, child.stdout.take().unwrap());
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        let qmp = match Qmp::connect(&sock, &mut child, deadline).await {
            Ok(q) => q,
            Err(e) => {
                let _ = child.start_kill();
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                for f in [&pidfile, &sock, &log] {
                    let _ = std::fs::remove_file(f);
                }
                bail!("{e}: {}", log_text.trim());
            }
        };
        Ok(Vm {
            child,
            stdin,
            stdout,
            qmp,
            files: vec![pidfile, sock, log.clone()],
            log,
            paused: extra.contains(&"-S"),
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default().trim().to_string()
    }

    pub async fn send(&mut self, kind: u8, payload: &[u8]) -> std::io::Result<()> {
        self.stdin.write_all(&frame::head(kind, payload.len())).await?;
        self.stdin.write_all(payload).await?;
        self.stdin.flush().await
    }

    /// The next frame from the agent. Not cancel safe: a dropped read loses the VM.
    async fn recv(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.stdout.read_exact(&mut head).await?;
        let (kind, len) = frame::parse_head(head)?;
        let mut payload = vec![0u8; len];
        self.stdout.read_exact(&mut payload).await?;
        Ok((kind, payload))
    }

    /// The next frame of `kind`, skipping others, within `limit`.
    pub async fn expect(&mut self, kind: u8, limit: Duration) -> anyhow::Result<Vec<u8>> {
        let wait = async {
            loop {
                let (k, payload) = self.recv().await?;
                if k == kind {
                    return Ok::<_, std::io::Error>(payload);
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(anyhow!("the guest agent went away ({e}): {}", self.log_text())),
            Err(_) => Err(anyhow!("the guest agent did not answer within {limit:?}")),
        }
    }

    async fn resume(&mut self) -> anyhow::Result<()> {
        if self.paused {
            self.qmp.execute("cont", json!({})).await?;
            self.paused = false;
        }
        Ok(())
    }

    pub async fn pause(&mut self) -> anyhow::Result<()> {
        if !self.paused {
            self.qmp.execute("stop", json!({})).await?;
            self.paused = true;
        }
        Ok(())
    }

    /// Restores a clone of `template`, paused and confined ([`Confined`]).
    pub async fn restore(inner: &Inner, template: &Template) -> anyhow::Result<Vm> {
        let confined = Confined::open(inner, &template.snapshot)?;
        let mut vm = Vm::spawn_with(inner, &template.args, &["-S"], Some(confined)).await?;
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        loop {
            match vm.qmp.status().await?.as_str() {
                "inmigrate" => {}
                "paused" | "prelaunch" | "postmigrate" => break,
                other => bail!("the clone is {other} after restoring: {}", vm.log_text()),
            }
            if Instant::now() > deadline {
                bail!("restoring the snapshot took over {RESTORE_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        vm.paused = true;
        Ok(vm)
    }

    /// Runs a shell once in the clone (so that a job starts on translated code), then
    /// pauses it.
    pub async fn warm(&mut self) -> anyhow::Result<()> {
        self.resume().await?;
        let mut entropy = [0u8; 64];
        fill_random(&mut entropy);
        self.send(b'W', &entropy).await?;
        self.expect(b'w', RESTORE_TIMEOUT).await?;
        self.pause().await
    }

    /// Sends the job; with a barrier, waits until the agent is armed.
    pub async fn start(&mut self, job: &JobFrame) -> anyhow::Result<()> {
        self.resume().await?;
        self.send(b'J', &job.encode()).await?;
        if job.barrier {
            self.expect(b'A', RESTORE_TIMEOUT).await?;
        }
        Ok(())
    }

    /// Streams the job's output until it exits, the deadline passes or `cancel` fires.
    pub async fn finish(
        &mut self,
        req: &RunRequest,
        live: &Arc<dyn OutputSink>,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> JobOutcome {
        let mut out = Capped::new(req.output_cap);
        let mut err = Capped::new(req.output_cap);
        let end = loop {
            tokio::select! {
                frame = self.recv() => match frame {
                    Ok((b'O', d)) => out.push(&d, OutputStream::Stdout, live),
                    Ok((b'E', d)) => err.push(&d, OutputStream::Stderr, live),
                    Ok((b'X', d)) if frame::parse_exit(&d).is_some() => {
                        let (code, oom) = frame::parse_exit(&d).unwrap();
                        break End::Exit(code, oom);
                    }
                    Ok(_) => {}
                    Err(e) => break End::Lost(e.to_string(), String::new()),
                },
                _ = tokio::time::sleep_until(deadline) => break End::Timeout,
                _ = cancel.cancelled() => break End::Cancelled,
            }
        };
        let _ = self.child.start_kill();
        let mut outcome = JobOutcome {
            stdout: out.bytes,
            stderr: err.bytes,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            ..JobOutcome::default()
        };
        let end = match end {
            End::Lost(cause, _) => End::Lost(cause, self.log_text()),
            end => end,
        };
        settle(&mut outcome, end, req);
        outcome
    }
}

/// Fills the status, exit code and error of `outcome` from how the job ended.
fn settle(outcome: &mut JobOutcome, end: End, req: &RunRequest) {
    let error = |kind: &str, message: String| Some(JobError { kind: kind.into(), message });
    match end {
        End::Timeout => {
            outcome.status = JobStatus::TimedOut;
            outcome.error = error(
                "timeout",
                format!("killed after the timeout of {} ms", req.timeout.as_millis()),
            );
        }
        End::Cancelled => {
            outcome.status = JobStatus::Cancelled;
            outcome.error = error("cancelled", "cancelled while running".into());
        }
        End::Lost(cause, log) => {
            outcome.status = JobStatus::Failed;
            outcome.error = error("executor", format!("the VM stopped answering ({cause}): {log}"));
        }
        End::Exit(code, oom) => {
            // A signal is reported as a shell would: 128 + its number.
            let exit_code = if code < 0 { 128 - code } else { code };
            outcome.exit_code = Some(exit_code);
            if oom {
                outcome.status = JobStatus::Failed;
                outcome.error = error(
                    "memory_limit",
                    format!("killed by the guest's memory limit of {} MiB", req.memory_bytes >> 20),
                );
            } else if code == 0 {
                outcome.status = JobStatus::Succeeded;
            } else {
                outcome.status = JobStatus::Failed;
                let message = match code < 0 {
                    true => format!("killed by signal {}", -code),
                    false => format!("exited with code {code}"),
                };
                outcome.error = error("exit", message);
            }
        }
    }
}

/// `path` quoted for `sh -c` (QEMU runs `exec:` migrations through the shell).
pub(super) fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_the_shell_even_with_quotes_in_them() {
        assert_eq!(shell_quote(Path::new("/a b/s")), "'/a b/s'");
        assert_eq!(shell_quote(Path::new("/it's")), r"'/it'\''s'");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(Path::new("/x'; echo $HOME '"))))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/x'; echo $HOME '");
    }

    fn settled(end: End) -> JobOutcome {
        let req = RunRequest {
            timeout: Duration::from_millis(1500),
            memory_bytes: 64 << 20,
            ..RunRequest::default()
        };
        let mut o = JobOutcome::default();
        settle(&mut o, end, &req);
        o
    }

    #[test]
    fn exits_signals_and_the_memory_limit_become_outcomes() {
        let o = settled(End::Exit(0, false));
        assert_eq!((o.status, o.exit_code, o.error), (JobStatus::Succeeded, Some(0), None));
        let o = settled(End::Exit(3, false));
        assert_eq!((o.status, o.exit_code), (JobStatus::Failed, Some(3)));
        assert_eq!(o.error.unwrap().message, "exited with code 3");
        let o = settled(End::Exit(-9, false));
        assert_eq!(o.exit_code, Some(137), "128 + the signal, as a shell says");
        assert_eq!(o.error.unwrap().message, "killed by signal 9");
        let o = settled(End::Exit(-9, true));
        let e = o.error.unwrap();
        assert_eq!(
            (e.kind.as_str(), e.message.as_str()),
            ("memory_limit", "killed by the guest's memory limit of 64 MiB")
        );
        let o = settled(End::Timeout);
        assert_eq!(o.status, JobStatus::TimedOut);
        assert_eq!(o.error.unwrap().message, "killed after the timeout of 1500 ms");
        assert_eq!(settled(End::Cancelled).status, JobStatus::Cancelled);
        let o = settled(End::Lost("eof".into(), "the log".into()));
        assert_eq!(o.error.unwrap().message, "the VM stopped answering (eof): the log");
    }
}
