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
//! server is root, as their own user in an empty chroot ([`Confined`]). The guest has `memory_mb` of RAM (the template's); the
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

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use cloudpipe_types::{FunctionKind, JobError, JobStatus};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

use super::{
    Capped, Executor, NoLiveOutput, OutputSink, OutputStream, PrepareError, RunRequest, Unready,
};
use crate::job::JobOutcome;

/// Largest frame accepted from a guest (its job can write to the serial port itself).
const MAX_FRAME: usize = 4 << 20;
/// How long a template may take to boot to a ready agent (TCG is slow, and the
/// machine may be busy).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restore may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the vm executor; plain data.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The guest kernel; `None`: the newest `/boot/vmlinuz-*` (Debian's
    /// linux-image-amd64).
    pub kernel: Option<PathBuf>,
    /// A statically linked busybox (Debian's busybox-static): the guest's userland.
    pub busybox: PathBuf,
    /// The guest agent (`guest-runners/vm-agent`, a static binary): the `cloudpipe`
    /// binary carries one and writes it under its data directory; `None`: the executor
    /// is unavailable.
    pub agent: Option<PathBuf>,
    /// RAM of each VM, in MiB.
    pub memory_mb: u64,
    /// Restored clones kept ready.
    pub pool_size: usize,
    /// `tcg` or `kvm`; `None`: tcg (a `/dev/kvm` that opens may still fail to run a
    /// guest, as on nested hosts, so kvm is asked for, not guessed).
    pub accel: Option<String>,
    /// Where templates (initramfs and snapshot) are cached; servers may share it.
    /// `None`: `<run_dir>/templates`.
    pub snapshot_dir: Option<PathBuf>,
    /// Pidfiles and sockets of running VMs (set from the data directory).
    pub run_dir: PathBuf,
    /// Identifies this server's QEMU processes (set from the data directory).
    pub instance: String,
    /// `uid:gid` that clones run as once QEMU has set up, when the server runs as
    /// root (QEMU's `-runas`); a server that is not root runs them as itself.
    pub run_as: (u32, u32),
}

/// The ids clones run as by default when the server is root: a user of their own,
/// owning no file.
pub const DEFAULT_RUN_AS: (u32, u32) = (64_999, 64_999);

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            qemu: "qemu-system-x86_64".into(),
            kernel: None,
            busybox: "/bin/busybox".into(),
            agent: None,
            memory_mb: 128,
            pool_size: 2,
            accel: None,
            snapshot_dir: None,
            run_dir: std::env::temp_dir().join("cloudpipe-vm"),
            instance: "default".into(),
            run_as: DEFAULT_RUN_AS,
        }
    }
}

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
    /// [`Inner::check`] passed once (it runs QEMU; not on every submission).
    checked: AtomicBool,
    seq: AtomicU64,
}

/// A booted-and-snapshotted template: how to start QEMU and where its state is.
#[derive(Debug)]
struct Template {
    /// QEMU's arguments shared by the template and every clone.
    args: Vec<String>,
    snapshot: PathBuf,
    /// How long the template took to boot to a ready agent (zero when cached).
    boot_time: Duration,
}

/// A failed attempt with an error kind and message.
fn failed(kind: &str, message: impl Into<String>) -> JobOutcome {
    JobOutcome::error(JobStatus::Failed, kind, message)
}

/// What one clone is to run.
#[derive(Debug, Clone, Default)]
struct JobFrame {
    clone_id: u32,
    clones: u32,
    barrier: bool,
    memory_bytes: u64,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Vec<u8>,
}

impl JobFrame {
    fn from_request(req: &RunRequest) -> JobFrame {
        let mut argv = req.container.as_ref().map(|c| c.command.clone()).unwrap_or_default();
        argv.extend(req.args.iter().cloned());
        let mut env = req.env.clone();
        env.push(("CLOUDPIPE_JOB_ID".into(), req.job_id.clone()));
        env.push(("CLOUDPIPE_FUNCTION".into(), req.function.clone()));
        env.push(("CLOUDPIPE_ATTEMPT".into(), req.attempt.to_string()));
        JobFrame {
            clone_id: 0,
            clones: 1,
            barrier: false,
            memory_bytes: req.memory_bytes,
            argv,
            env,
            stdin: req.stdin.to_vec(),
        }
    }

    /// The payload of a `J` frame, as the agent parses it.
    fn encode(&self) -> Vec<u8> {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        let mut entropy = [0u8; 64];
        fill_random(&mut entropy);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let mut out = Vec::with_capacity(256 + self.stdin.len());
        out.extend_from_slice(&self.clone_id.to_le_bytes());
        out.extend_from_slice(&self.clones.to_le_bytes());
        out.extend_from_slice(&now.to_le_bytes());
        out.extend_from_slice(&self.memory_bytes.to_le_bytes());
        out.push(self.barrier as u8);
        bytes(&mut out, &entropy);
        out.extend_from_slice(&(self.argv.len() as u32).to_le_bytes());
        for a in &self.argv {
            bytes(&mut out, a.as_bytes());
        }
        out.extend_from_slice(&(self.env.len() as u32).to_le_bytes());
        for (k, v) in &self.env {
            bytes(&mut out, format!("{k}={v}").as_bytes());
        }
        bytes(&mut out, &self.stdin);
        out
    }
}

/// Fresh entropy from the host kernel.
fn fill_random(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(buf);
    }
}

/// A QMP connection.
struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects to QEMU's QMP socket (retrying while QEMU starts) and negotiates.
    async fn connect(path: &Path, child: &mut Child, deadline: Instant) -> anyhow::Result<Qmp> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(status) = child.try_wait()? {
                        bail!("QEMU exited ({status}) before its monitor came up");
                    }
                    if Instant::now() > deadline {
                        bail!("QEMU's monitor did not come up: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        let (r, writer) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting).await?;
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value (events are skipped).
    async fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut line = serde_json::to_string(&json!({"execute": command, "arguments": arguments}))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let mut answer = String::new();
            if self.reader.read_line(&mut answer).await? == 0 {
                bail!("QEMU closed its monitor");
            }
            let v: Value = serde_json::from_str(&answer)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QEMU refused {command}: {}", e["desc"]);
            }
        }
    }

    async fn status(&mut self) -> anyhow::Result<String> {
        let s = self.execute("query-status", json!({})).await?;
        Ok(s["status"].as_str().unwrap_or_default().to_string())
    }
}

/// One QEMU process: the template while it boots, or a clone. Killed when dropped.
struct Vm {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    qmp: Qmp,
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

/// The fd a clone reads its snapshot from.
const SNAPSHOT_FD: i32 = 3;

/// How a clone (where jobs' commands run) is confined, beside having no network
/// device: QEMU's seccomp sandbox with no process spawning, no obsolete or
/// resource-control system calls; its snapshot handed over as an open fd (it opens
/// no file by name); and, when the server is root, QEMU drops to
/// [`VmConfig::run_as`] and chroots into an empty directory once it has set up, so a
/// guest that escaped into QEMU could neither read the data directory (nor any other
/// file) nor act as root. A server that is not root runs clones as itself, with
/// privilege-raising system calls denied too.
///
/// Changing its user clears QEMU's `PR_SET_PDEATHSIG`: after a `kill -9` of a root
/// server its clones live on (paused) until [`VmExecutor::reap`] at the next start.
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
                Some((uid, gid, inner.empty_dir()?))
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

impl Vm {
    /// Starts QEMU with `args` plus this server's label, a pidfile and a monitor, under
    /// QEMU's seccomp sandbox. Used for templates (which run only the agent, never a
    /// job's command); clones are [`Vm::restore`]d.
    async fn spawn(inner: &Inner, args: &[String], extra: &[&str]) -> anyhow::Result<Vm> {
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
        let dir = inner.clones_dir();
        let base = dir.join(format!("{}-{n}", std::process::id()));
        let (pidfile, sock, log) =
            (base.with_extension("pid"), base.with_extension("qmp"), base.with_extension("log"));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(&inner.config.qemu);
        cmd.args(args)
            .args(extra)
            .arg("-name")
            .arg(inner.label())
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

    async fn send(&mut self, kind: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.stdin.write_all(&head).await?;
        self.stdin.write_all(payload).await?;
        self.stdin.flush().await
    }

    /// The next frame from the agent. Not cancel safe: a dropped read loses the VM.
    async fn recv(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.stdout.read_exact(&mut head).await?;
        let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the guest sent a frame of {len} bytes"),
            ));
        }
        let mut payload = vec![0u8; len];
        self.stdout.read_exact(&mut payload).await?;
        Ok((head[0], payload))
    }

    /// The next frame of `kind`, skipping others, within `limit`.
    async fn expect(&mut self, kind: u8, limit: Duration) -> anyhow::Result<Vec<u8>> {
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

    async fn pause(&mut self) -> anyhow::Result<()> {
        if !self.paused {
            self.qmp.execute("stop", json!({})).await?;
            self.paused = true;
        }
        Ok(())
    }

    /// Restores a clone of `template`, paused and confined ([`Confined`]).
    async fn restore(inner: &Inner, template: &Template) -> anyhow::Result<Vm> {
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
    async fn warm(&mut self) -> anyhow::Result<()> {
        self.resume().await?;
        let mut entropy = [0u8; 64];
        fill_random(&mut entropy);
        self.send(b'W', &entropy).await?;
        self.expect(b'w', RESTORE_TIMEOUT).await?;
        self.pause().await
    }

    /// Sends the job; with a barrier, waits until the agent is armed.
    async fn start(&mut self, job: &JobFrame) -> anyhow::Result<()> {
        self.resume().await?;
        self.send(b'J', &job.encode()).await?;
        if job.barrier {
            self.expect(b'A', RESTORE_TIMEOUT).await?;
        }
        Ok(())
    }

    /// Streams the job's output until it exits, the deadline passes or `cancel` fires.
    async fn finish(
        &mut self,
        req: &RunRequest,
        live: &Arc<dyn OutputSink>,
        deadline: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> JobOutcome {
        let mut out = Capped::new(req.output_cap);
        let mut err = Capped::new(req.output_cap);
        enum End {
            Exit(i32, bool),
            Lost(String),
            Timeout,
            Cancelled,
        }
        let end = loop {
            tokio::select! {
                frame = self.recv() => match frame {
                    Ok((b'O', d)) => out.push(&d, OutputStream::Stdout, live),
                    Ok((b'E', d)) => err.push(&d, OutputStream::Stderr, live),
                    Ok((b'X', d)) if d.len() >= 5 => {
                        let code = i32::from_le_bytes(d[..4].try_into().unwrap());
                        break End::Exit(code, d[4] != 0);
                    }
                    Ok(_) => {}
                    Err(e) => break End::Lost(e.to_string()),
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
            End::Lost(e) => {
                outcome.status = JobStatus::Failed;
                outcome.error = error(
                    "executor",
                    format!("the VM stopped answering ({e}): {}", self.log_text()),
                );
            }
            End::Exit(code, oom) => {
                // A signal is reported as a shell would: 128 + its number.
                let exit_code = if code < 0 { 128 - code } else { code };
                outcome.exit_code = Some(exit_code);
                if oom {
                    outcome.status = JobStatus::Failed;
                    outcome.error = error(
                        "memory_limit",
                        format!(
                            "killed by the guest's memory limit of {} MiB",
                            req.memory_bytes >> 20
                        ),
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
        outcome
    }
}

/// `path` quoted for `sh -c` (QEMU runs `exec:` migrations through the shell).
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

impl Inner {
    fn label(&self) -> String {
        format!("cloudpipe-vm-{}", self.config.instance)
    }

    /// An empty directory, read-only, that confined clones chroot into.
    fn empty_dir(&self) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.config.run_dir.join("empty");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555))?;
        Ok(dir)
    }

    fn clones_dir(&self) -> PathBuf {
        // Unix socket paths are short (108 bytes): a deep data directory falls back
        // to the temporary directory.
        let dir = self.config.run_dir.join("clones");
        if dir.as_os_str().len() > 70 {
            std::env::temp_dir().join(format!("cloudpipe-vm-{}", self.config.instance))
        } else {
            dir
        }
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.config.snapshot_dir.clone().unwrap_or_else(|| self.config.run_dir.join("templates"))
    }

    /// The configured kernel, else the newest in `/boot`; `Err` says what is missing.
    fn kernel(&self) -> Result<PathBuf, String> {
        if let Some(k) = &self.config.kernel {
            return Ok(k.clone());
        }
        let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
            .map_err(|e| format!("reading /boot: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
            .collect();
        kernels.sort();
        kernels.pop().ok_or_else(|| "no kernel in /boot".to_string())
    }

    fn accel(&self) -> String {
        self.config.accel.clone().unwrap_or_else(|| "tcg".into())
    }

    /// Whether everything a template needs is here; `Err` names what is missing and
    /// the packages (or the setting) that bring it, all of them at once.
    fn check(&self) -> Result<(), Unready> {
        let mut missing = Vec::new();
        let mut packages = Vec::new();
        let runs = std::process::Command::new(&self.config.qemu)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !runs {
            missing.push(format!("{} does not run", self.config.qemu.display()));
            packages.push("qemu-system-x86");
        }
        match self.kernel() {
            Ok(k) if std::fs::File::open(&k).is_ok() => {}
            Ok(k) => {
                missing.push(format!("cannot read the kernel {}", k.display()));
                packages.push("linux-image-amd64");
            }
            Err(e) => {
                missing.push(e);
                packages.push("linux-image-amd64");
            }
        }
        if !self.config.busybox.is_file() {
            missing.push(format!("{} is missing", self.config.busybox.display()));
            packages.push("busybox-static");
        }
        if !packages.is_empty() {
            return Err(Unready::new(
                missing.join("; "),
                format!("apt-get install -y {}", packages.join(" ")),
            ));
        }
        match &self.config.agent {
            None => Err(Unready::new(
                "this server was built without the vm guest agent",
                "install rustup's x86_64-unknown-linux-musl target and build the server again, \
                 or give the agent's path (guest-runners/vm-agent/build.sh prints it)",
            )),
            Some(agent) if !agent.is_file() => Err(Unready::new(
                format!("the guest agent {} is missing", agent.display()),
                "guest-runners/vm-agent/build.sh builds it",
            )),
            Some(_) => Ok(()),
        }
    }

    /// The template, booted and snapshotted on first use (or found in the cache).
    async fn template(self: &Arc<Self>) -> anyhow::Result<Arc<Template>> {
        self.template
            .get_or_try_init(|| async {
                self.check().map_err(|e| anyhow!("{e}"))?;
                let this = self.clone();
                let template = tokio::spawn(async move { this.make_template().await }).await??;
                Ok(Arc::new(template))
            })
            .await
            .cloned()
    }

    async fn make_template(&self) -> anyhow::Result<Template> {
        let dir = self.snapshot_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir_all(self.clones_dir())?;
        let agent = std::fs::read(self.config.agent.as_ref().unwrap())?;
        let busybox = std::fs::read(&self.config.busybox)?;
        let initramfs = initramfs(&busybox, &agent);
        let initramfs_path =
            dir.join(format!("initramfs-{}.cpio", &hex::encode(Sha256::digest(&initramfs))[..16]));
        if !initramfs_path.exists() {
            write_atomically(&initramfs_path, &initramfs)?;
        }
        let kernel = self.kernel().map_err(|e| anyhow!(e))?;
        let accel = self.accel();
        let mut args: Vec<String> = vec![
            "-accel".into(),
            accel.clone(),
            "-M".into(),
            "pc".into(),
            "-cpu".into(),
            if accel == "kvm" { "host" } else { "qemu64" }.into(),
            "-m".into(),
            self.config.memory_mb.to_string(),
            "-smp".into(),
            "1".into(),
            "-display".into(),
            "none".into(),
            // A guest that reboots (a kernel panic) ends its QEMU instead of booting again.
            "-no-reboot".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initramfs_path.display().to_string(),
            "-append".into(),
            // init_on_free: freed pages are zero, so the snapshot is smaller.
            "quiet panic=-1 console=ttyS1 init_on_free=1 rdinit=/init".into(),
            "-chardev".into(),
            "stdio,id=agent,signal=off".into(),
            "-serial".into(),
            "chardev:agent".into(),
        ];
        let mut key = Sha256::new();
        for a in &args {
            key.update(a.as_bytes());
            key.update([0]);
        }
        for f in [&self.config.qemu, &kernel] {
            let path = which(f);
            if let Ok(m) = std::fs::metadata(&path) {
                key.update(format!("{}:{}:{:?}", path.display(), m.len(), m.modified().ok()));
            }
        }
        let key = &hex::encode(key.finalize())[..16];
        let snapshot = dir.join(format!("template-{key}.snapshot"));
        // One booter per snapshot, across the servers sharing the directory.
        let lock = std::fs::File::create(dir.join(format!("template-{key}.lock")))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|_| lock)).await??;
        if snapshot.exists() {
            drop(lock);
            args.shrink_to_fit();
            return Ok(Template { args, snapshot, boot_time: Duration::ZERO });
        }
        let started = Instant::now();
        let mut vm = Vm::spawn(self, &args, &[]).await.context("booting the template VM")?;
        let ready = vm.expect(b'R', BOOT_TIMEOUT).await.context("booting the template VM")?;
        let boot_time = started.elapsed();
        tracing::info!(
            duration_ms = boot_time.as_millis() as u64,
            agent = %String::from_utf8_lossy(&ready),
            "vm template booted"
        );
        vm.pause().await?;
        let partial = dir.join(format!("template-{key}.snapshot.partial"));
        let uri = format!("exec:cat > {}", shell_quote(&partial));
        vm.qmp.execute("migrate", json!({"uri": uri})).await?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let m = vm.qmp.execute("query-migrate", json!({})).await?;
            match m["status"].as_str() {
                Some("completed") => break,
                Some("failed" | "cancelled") => bail!("snapshotting the template failed: {m}"),
                _ if Instant::now() > deadline => bail!("snapshotting the template timed out"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        drop(vm);
        std::fs::rename(&partial, &snapshot)?;
        drop(lock);
        tracing::info!(
            snapshot = %snapshot.display(),
            bytes = std::fs::metadata(&snapshot).map(|m| m.len()).unwrap_or(0),
            "vm template snapshotted"
        );
        Ok(Template { args, snapshot, boot_time })
    }

    /// A clone ready for a job: from the pool, else restored now. Refills the pool.
    async fn acquire(self: &Arc<Self>) -> anyhow::Result<Vm> {
        let template = self.template().await?;
        let pooled = self.pool.lock().unwrap().pop_front();
        let vm = match pooled {
            Some(vm) => vm,
            None => Vm::restore(self, &template).await?,
        };
        self.refill();
        Ok(vm)
    }

    /// Tops the pool up in the background (one filler at a time).
    fn refill(self: &Arc<Self>) {
        if self.config.pool_size == 0 || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            while this.pool.lock().unwrap().len() < this.config.pool_size {
                let made = async {
                    let template = this.template().await?;
                    let mut vm = Vm::restore(&this, &template).await?;
                    vm.warm().await?;
                    Ok::<_, anyhow::Error>(vm)
                };
                match made.await {
                    Ok(vm) => this.pool.lock().unwrap().push_back(vm),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "filling the vm pool failed");
                        break;
                    }
                }
            }
            this.filling.store(false, Ordering::Release);
        });
    }
}

/// `program` resolved through `PATH` (for the snapshot key).
fn which(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_path_buf();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_path_buf())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// An initramfs (an uncompressed `newc` cpio archive): busybox at `/bin/busybox`, the
/// agent as `/init`, and the mount points it uses.
pub fn initramfs(busybox: &[u8], agent: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(busybox.len() + agent.len() + 4096);
    let entries: [(&str, u32, &[u8]); 8] = [
        ("bin", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox),
        ("init", 0o100755, agent),
        ("dev", 0o040755, b""),
        ("proc", 0o040755, b""),
        ("sys", 0o040755, b""),
        ("tmp", 0o041777, b""),
        ("TRAILER!!!", 0, b""),
    ];
    for (ino, (name, mode, data)) in entries.into_iter().enumerate() {
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            ino + 1,
            0,
            0,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

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
        self.inner.check().is_ok()
    }

    /// Boots (or finds) the template and fills the pool, in the background, when the
    /// executor is configured and its tools are installed. Call once at start.
    pub fn warm_up(&self) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let checking = inner.clone();
            match tokio::task::spawn_blocking(move || checking.check()).await {
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

    /// Kills every QEMU process labelled as this server's (left by an earlier life
    /// killed with `kill -9`) and removes their files; how many were killed.
    pub fn reap(&self) -> usize {
        let label = self.inner.label();
        let mut killed = 0;
        for pid in labelled_processes(&label) {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
            let r = unsafe { libc::kill(pid, libc::SIGKILL) };
            if r == 0 {
                killed += 1;
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.inner.clones_dir()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        killed
    }

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

    /// Boots a fresh VM from the template's arguments (no snapshot), runs `command`
    /// and returns the time to its first output frame: the baseline clones beat.
    pub async fn boot_to_first_output(&self, command: &[&str]) -> anyhow::Result<Duration> {
        let template = self.inner.template().await?;
        let started = Instant::now();
        let mut vm = Vm::spawn(&self.inner, &template.args, &[]).await?;
        vm.expect(b'R', BOOT_TIMEOUT).await?;
        vm.start(&probe(command)).await?;
        vm.expect(b'O', BOOT_TIMEOUT).await?;
        Ok(started.elapsed())
    }

    /// Restores a clone (bypassing the pool), runs `command` and returns the time to
    /// its first output frame.
    pub async fn clone_to_first_output(&self, command: &[&str]) -> anyhow::Result<Duration> {
        let template = self.inner.template().await?;
        let started = Instant::now();
        let mut vm = Vm::restore(&self.inner, &template).await?;
        vm.start(&probe(command)).await?;
        vm.expect(b'O', RESTORE_TIMEOUT).await?;
        Ok(started.elapsed())
    }

    /// Waits until the pool is full and its filler idle, takes a clone from it, runs
    /// `command` and returns the time to its first output.
    pub async fn pooled_to_first_output(&self, command: &[&str]) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        while (self.pooled() < self.inner.config.pool_size.max(1)
            || self.inner.filling.load(Ordering::Acquire))
            && Instant::now() < deadline
        {
            self.inner.refill();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        let mut vm = self.inner.acquire().await?;
        vm.start(&probe(command)).await?;
        vm.expect(b'O', RESTORE_TIMEOUT).await?;
        Ok(started.elapsed())
    }
}

fn probe(command: &[&str]) -> JobFrame {
    JobFrame {
        argv: command.iter().map(|s| s.to_string()).collect(),
        clones: 1,
        ..JobFrame::default()
    }
}

/// Pids of processes with `label` among their arguments.
fn labelled_processes(label: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == label.as_bytes()))
        })
        .collect()
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
        self.inner.check()?;
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
