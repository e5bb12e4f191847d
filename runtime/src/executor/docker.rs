//! The `docker` executor: a job in a container, through the Docker Engine API
//! (bollard, over the engine's socket; never the CLI).
//!
//! Safe by default, whatever the job asks: no network (unless the account's policy
//! allows it), every capability dropped, `no-new-privileges`, a read-only root with a
//! size-capped `/tmp`, a pids limit, a memory limit without swap, and a non-root user. stdin
//! is streamed in; stdout and stderr are streamed out live and kept capped; timeout and
//! cancel kill the container; the container is always removed. A result file
//! (`result_source: file:/tmp/…`) is copied out after exit. Containers carry the
//! labels `cloudpipe.instance` (this server's data directory) and `cloudpipe.job`, so
//! that a server restarted after `kill -9` removes what its previous life left behind
//! ([`DockerExecutor::reap`]) while the store puts those jobs back in the queue.
//!
//! An image that is not on the engine is pulled first ([`PullPolicy`]), through the
//! Engine API, with the credentials of the server user's `~/.docker/config.json` for
//! its registry and only from the registries of [`DockerConfig::registries`] when that
//! is not empty. Pull progress goes to the job's live stderr events (prefixed
//! `[pull]`), not into its record; a failed pull is `image_pull_failed` with the
//! registry's own message.
//! `/tmp` never grows past [`DockerConfig::tmp_size`], so that no job can fill the
//! disk: a tmpfs of that size inside the container; or, for a job whose result file
//! must outlive the container (a container's tmpfs goes with it), a tmpfs of that size
//! that this server mounts on the host under [`DockerConfig::scratch_dir`] and binds at
//! `/tmp` (the result is then copied out by the engine, as before). Mounting needs root
//! and the engine on this host; without them such jobs get an anonymous volume, not
//! capped, and the server says so once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder,
    DownloadFromContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use cloudpipe_types::{FunctionKind, JobError, JobStatus};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::{Capped, Executor, OutputSink, OutputStream, PrepareError, RunRequest, Unready};
use crate::model::JobOutcome;

/// Label naming the server (its data directory) that made a container.
pub const INSTANCE_LABEL: &str = "cloudpipe.instance";
/// Label naming the job a container runs.
pub const JOB_LABEL: &str = "cloudpipe.job";

/// When the docker executor pulls a job's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// When the engine does not have it (the default).
    #[default]
    Missing,
    /// Before every job (a moving tag such as `latest` is then always current).
    Always,
    /// Never: an image not on the engine fails the job as `image_not_found`.
    Never,
}

impl PullPolicy {
    pub fn parse(s: &str) -> Option<PullPolicy> {
        match s {
            "missing" => Some(PullPolicy::Missing),
            "always" => Some(PullPolicy::Always),
            "never" => Some(PullPolicy::Never),
            _ => None,
        }
    }
}

/// Settings of the docker executor; plain data.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// When images are pulled.
    pub pull: PullPolicy,
    /// Registries images may be pulled from (`host` or `host:port`; `docker.io` for
    /// Docker Hub); empty: any.
    pub registries: Vec<String>,
    /// Docker's client configuration, read for registry credentials (`auths`) at each
    /// pull; `None`: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<std::path::PathBuf>,
    /// The engine's socket; `None`: `DOCKER_HOST`, else `/var/run/docker.sock`.
    pub socket: Option<String>,
    /// `uid:gid` the container runs as.
    pub user: String,
    /// Most processes (and threads) in one container: a fork bomb stops here.
    pub pids_limit: i64,
    /// CPU limit of a job that asks for none, in billionths of a CPU (`None`: none).
    pub default_nano_cpus: Option<u64>,
    /// Size of the tmpfs mounted at `/tmp`, the only writable place (`64m`).
    pub tmp_size: String,
    /// Where the size-capped `/tmp` of jobs with a result file is mounted on the host
    /// (one directory per attempt); `None`: such jobs get an uncapped volume.
    pub scratch_dir: Option<std::path::PathBuf>,
    /// Identifies this server's containers (see [`INSTANCE_LABEL`]).
    pub instance: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            pull: PullPolicy::Missing,
            registries: Vec::new(),
            docker_config: None,
            socket: None,
            user: "65534:65534".into(),
            pids_limit: 256,
            default_nano_cpus: Some(1_000_000_000),
            tmp_size: "64m".into(),
            scratch_dir: None,
            instance: "default".into(),
        }
    }
}

pub struct DockerExecutor {
    config: DockerConfig,
    client: tokio::sync::OnceCell<Docker>,
    /// The uncapped fallback was announced.
    warned_uncapped: std::sync::atomic::AtomicBool,
}

/// A failed attempt with an error kind and message.
fn failed(kind: &str, message: impl Into<String>) -> JobOutcome {
    JobOutcome::error(JobStatus::Failed, kind, message)
}

impl DockerExecutor {
    pub fn new(config: DockerConfig) -> DockerExecutor {
        DockerExecutor {
            config,
            client: tokio::sync::OnceCell::new(),
            warned_uncapped: Default::default(),
        }
    }

    /// The engine's client, connected and version-negotiated on first use (a failure
    /// is not cached: the engine may come up later).
    async fn client(&self) -> Result<&Docker, String> {
        self.client
            .get_or_try_init(|| async {
                let docker = match &self.config.socket {
                    Some(s) => Docker::connect_with_unix(s, 120, bollard::API_DEFAULT_VERSION),
                    None => Docker::connect_with_local_defaults(),
                }
                .map_err(|e| format!("cannot reach the Docker engine: {e}"))?;
                let docker =
                    tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
                        .await
                        .map_err(|_| "the Docker engine did not answer".to_string())?
                        .map_err(|e| format!("cannot reach the Docker engine: {e}"))?;
                Ok(docker)
            })
            .await
    }

    /// Removes every container this server made, whatever its state: after a crash,
    /// the jobs they ran are recovered by the store; their containers must go.
    pub async fn reap(&self) -> Result<usize, String> {
        let docker = self.client().await?;
        let filters =
            HashMap::from([("label", vec![format!("{INSTANCE_LABEL}={}", self.config.instance)])]);
        let list = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers = docker.list_containers(Some(list)).await.map_err(|e| e.to_string())?;
        // Scratch mounts of attempts cut off by a crash.
        if let Some(dir) = &self.config.scratch_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for e in entries.flatten() {
                Scratch { dir: e.path() }.release().await;
            }
        }
        let mut removed = 0;
        for c in containers {
            if let Some(id) = c.id {
                let force = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
                if docker.remove_container(&id, Some(force)).await.is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// A capped `/tmp` on the host for an attempt whose result file must outlive its
    /// container, when this server can make one.
    async fn scratch(&self, req: &RunRequest) -> Option<Scratch> {
        let wants = req.container.as_ref().is_some_and(|c| c.result_file.is_some());
        let base = self.config.scratch_dir.as_ref().filter(|_| wants)?;
        let local = self.config.socket.is_some() || std::env::var_os("DOCKER_HOST").is_none();
        let dir = base.join(format!("{}-{}", req.job_id, req.attempt));
        let made = match local {
            true => Scratch::mount(&dir, &self.config.tmp_size).await,
            false => Err("the Docker engine is not on this host".into()),
        };
        match made {
            Ok(s) => Some(s),
            Err(why) => {
                if !self.warned_uncapped.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        reason = %why,
                        "docker jobs with a result file get an uncapped /tmp volume (a size-capped one needs root and a local engine)"
                    );
                }
                None
            }
        }
    }

    fn create_body(&self, req: &RunRequest, scratch: Option<&Scratch>) -> ContainerCreateBody {
        let c = req.container.clone().unwrap_or_default();
        let mut cmd = c.command.clone();
        cmd.extend(req.args.iter().cloned());
        let mut env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("CLOUDPIPE_JOB_ID={}", req.job_id));
        env.push(format!("CLOUDPIPE_FUNCTION={}", c.image));
        env.push(format!("CLOUDPIPE_ATTEMPT={}", req.attempt));
        let memory = req.memory_bytes.min(i64::MAX as u64) as i64;
        let host = HostConfig {
            network_mode: Some(if c.network { "bridge" } else { "none" }.into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            readonly_rootfs: Some(true),
            // `/tmp` is the one writable place: a tmpfs, or, when a result file is to be
            // copied out after exit (when a tmpfs is already gone), the capped scratch
            // mount of the host, else an anonymous volume removed with the container.
            tmpfs: c.result_file.is_none().then(|| {
                HashMap::from([(
                    "/tmp".to_string(),
                    format!("rw,nosuid,nodev,mode=1777,size={}", self.config.tmp_size),
                )])
            }),
            mounts: c.result_file.is_some().then(|| {
                vec![match scratch {
                    Some(s) => Mount {
                        target: Some("/tmp".into()),
                        source: Some(s.dir.to_string_lossy().into_owned()),
                        typ: Some(MountType::BIND),
                        ..Default::default()
                    },
                    None => Mount {
                        target: Some("/tmp".into()),
                        typ: Some(MountType::VOLUME),
                        ..Default::default()
                    },
                }]
            }),
            pids_limit: Some(self.config.pids_limit),
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: c
                .nano_cpus
                .or(self.config.default_nano_cpus)
                .map(|n| n.min(i64::MAX as u64) as i64),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(c.image.clone()),
            cmd: (!cmd.is_empty()).then_some(cmd),
            env: Some(env),
            user: Some(self.config.user.clone()),
            labels: Some(HashMap::from([
                (INSTANCE_LABEL.to_string(), self.config.instance.clone()),
                (JOB_LABEL.to_string(), req.job_id.clone()),
            ])),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(true),
            tty: Some(false),
            network_disabled: Some(!c.network),
            host_config: Some(host),
            ..Default::default()
        }
    }

    async fn attempt(
        &self,
        docker: &Docker,
        id: &str,
        req: &RunRequest,
        live: &Arc<dyn OutputSink>,
        cancel: &CancellationToken,
    ) -> JobOutcome {
        let attach = AttachContainerOptionsBuilder::new()
            .stream(true)
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .build();
        let attached = match docker.attach_container(id, Some(attach)).await {
            Ok(a) => a,
            Err(e) => return failed("executor", format!("attaching to the container: {e}")),
        };
        let mut output = attached.output;
        let mut input = attached.input;
        if let Err(e) = docker.start_container(id, None).await {
            return failed("executor", format!("starting the container: {e}"));
        }
        let deadline = tokio::time::Instant::now() + req.timeout;
        // stdin goes in beside the output coming out, so neither side can block the
        // other; closing it is the container's EOF.
        let stdin = req.stdin.clone();
        let writer = tokio::spawn(async move {
            let _ = input.write_all(&stdin).await;
            let _ = input.shutdown().await;
        });
        let mut out = Capped::new(req.output_cap);
        let mut err = Capped::new(req.output_cap);
        let mut ended_by: Option<JobStatus> = None;
        loop {
            tokio::select! {
                chunk = output.next() => match chunk {
                    Some(Ok(bollard::container::LogOutput::StdOut { message })) => {
                        out.push(&message, OutputStream::Stdout, live);
                    }
                    Some(Ok(bollard::container::LogOutput::StdErr { message })) => {
                        err.push(&message, OutputStream::Stderr, live);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                _ = tokio::time::sleep_until(deadline), if ended_by.is_none() => {
                    ended_by = Some(JobStatus::TimedOut);
                    self.kill(docker, id).await;
                }
                _ = cancel.cancelled(), if ended_by.is_none() => {
                    ended_by = Some(JobStatus::Cancelled);
                    self.kill(docker, id).await;
                }
            }
        }
        writer.abort();
        let state = match docker.inspect_container(id, None).await {
            Ok(i) => i.state.unwrap_or_default(),
            Err(e) => return failed("executor", format!("inspecting the container: {e}")),
        };
        let code = state.exit_code.map(|c| c as i32);
        let mut outcome = JobOutcome {
            exit_code: code,
            stdout: out.bytes,
            stderr: err.bytes,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            ..JobOutcome::default()
        };
        let error = |kind: &str, message: String| Some(JobError { kind: kind.into(), message });
        match ended_by {
            Some(JobStatus::TimedOut) => {
                outcome.status = JobStatus::TimedOut;
                outcome.exit_code = None;
                outcome.error = error(
                    "timeout",
                    format!("killed after the timeout of {} ms", req.timeout.as_millis()),
                );
            }
            Some(_) => {
                outcome.status = JobStatus::Cancelled;
                outcome.exit_code = None;
                outcome.error = error("cancelled", "cancelled while running".into());
            }
            None if state.oom_killed == Some(true) => {
                outcome.status = JobStatus::Failed;
                outcome.error = error(
                    "memory_limit",
                    format!("killed by the memory limit of {} MiB", req.memory_bytes >> 20),
                );
            }
            None if code == Some(0) => outcome.status = JobStatus::Succeeded,
            None => {
                outcome.status = JobStatus::Failed;
                let c = code.unwrap_or(-1);
                outcome.error = error("exit", format!("exited with code {c}"));
            }
        }
        if outcome.status == JobStatus::Succeeded
            && let Some(path) = req.container.as_ref().and_then(|c| c.result_file.as_deref())
        {
            match self.copy_out(docker, id, path, req.output_cap).await {
                Ok((bytes, truncated)) => {
                    outcome.stdout = bytes;
                    outcome.stdout_truncated = truncated;
                }
                Err(m) => {
                    outcome.status = JobStatus::Failed;
                    outcome.error = error("result_missing", m);
                }
            }
        }
        outcome
    }

    /// Pulls `image` when the policy says so; `Err` is the attempt's outcome (a failed
    /// or refused pull, or a cancel during it).
    async fn ensure_image(
        &self,
        docker: &Docker,
        image: &str,
        live: &Arc<dyn OutputSink>,
        cancel: &CancellationToken,
    ) -> Result<(), Box<JobOutcome>> {
        let pull = match self.config.pull {
            PullPolicy::Never => false,
            PullPolicy::Always => true,
            PullPolicy::Missing => match docker.inspect_image(image).await {
                Ok(_) => false,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => true,
                Err(e) => {
                    return Err(Box::new(failed("executor", format!("inspecting {image}: {e}"))));
                }
            },
        };
        if !pull {
            return Ok(());
        }
        let reference = ImageRef::parse(image);
        if !self.config.registries.is_empty()
            && !self.config.registries.iter().any(|r| r == &reference.registry)
        {
            return Err(Box::new(failed(
                "image_pull_failed",
                format!(
                    "{image} is not on the Docker engine and its registry {} is not one this server pulls from ({})",
                    reference.registry,
                    self.config.registries.join(", ")
                ),
            )));
        }
        let progress = |line: String| live.chunk(OutputStream::Stderr, line.as_bytes());
        progress(format!("[pull] pulling {image} from {}\n", reference.registry));
        let opts = bollard::query_parameters::CreateImageOptionsBuilder::new()
            .from_image(&reference.repository)
            .tag(&reference.tag)
            .build();
        let credentials = self.credentials(&reference.registry);
        let mut stream = docker.create_image(Some(opts), None, credentials);
        let mut last = String::new();
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    None => break,
                    Some(Ok(info)) => {
                        let line = match (info.id, info.status, info.progress_detail) {
                            (_, None, _) => continue,
                            (id, Some(status), detail) => {
                                let mut l = String::from("[pull] ");
                                if let Some(id) = id {
                                    l += &format!("{id}: ");
                                }
                                l += &status;
                                if let Some((cur, total)) =
                                    detail.and_then(|d| Some((d.current?, d.total?)))
                                {
                                    l += &format!(" {cur}/{total} bytes");
                                }
                                l
                            }
                        };
                        // Docker repeats a status per byte count; only changes go out.
                        if line != last {
                            progress(format!("{line}\n"));
                            last = line;
                        }
                    }
                    Some(Err(e)) => {
                        let message = match e {
                            bollard::errors::Error::DockerStreamError { error } => error,
                            bollard::errors::Error::DockerResponseServerError { message, .. } => message,
                            other => other.to_string(),
                        };
                        return Err(Box::new(failed(
                            "image_pull_failed",
                            format!("pulling {image}: {message}"),
                        )));
                    }
                },
                _ = cancel.cancelled() => {
                    return Err(Box::new(JobOutcome::error(
                        JobStatus::Cancelled,
                        "cancelled",
                        "cancelled while pulling the image",
                    )));
                }
            }
        }
        tracing::info!(image, registry = %reference.registry, "image pulled");
        Ok(())
    }

    /// The credentials `~/.docker/config.json` (or `$DOCKER_CONFIG`) holds for
    /// `registry` (its `auths` entries; credential helpers are not run).
    fn credentials(&self, registry: &str) -> Option<bollard::auth::DockerCredentials> {
        let path = match &self.config.docker_config {
            Some(p) => p.clone(),
            None => match std::env::var_os("DOCKER_CONFIG") {
                Some(d) => std::path::PathBuf::from(d).join("config.json"),
                None => {
                    std::path::PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json")
                }
            },
        };
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let auths = config["auths"].as_object()?;
        // Docker Hub's entry is keyed by its v1 index URL; others by host, with or
        // without a scheme.
        let entry = auths.iter().find(|(k, _)| {
            let host = k.trim_start_matches("https://").trim_start_matches("http://");
            let host = host.split('/').next().unwrap_or_default();
            host == registry
                || (registry == "docker.io"
                    && matches!(host, "index.docker.io" | "registry-1.docker.io"))
        })?;
        let (server, v) = entry;
        let mut creds = bollard::auth::DockerCredentials {
            serveraddress: Some(server.clone()),
            ..Default::default()
        };
        if let Some(token) = v["identitytoken"].as_str() {
            creds.identitytoken = Some(token.to_string());
        } else if let Some(auth) = v["auth"].as_str() {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD.decode(auth).ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            let (user, password) = decoded.split_once(':')?;
            creds.username = Some(user.to_string());
            creds.password = Some(password.to_string());
        } else {
            creds.username = v["username"].as_str().map(str::to_string);
            creds.password = v["password"].as_str().map(str::to_string);
        }
        Some(creds)
    }

    async fn kill(&self, docker: &Docker, id: &str) {
        let kill = KillContainerOptionsBuilder::new().signal("KILL").build();
        let _ = docker.kill_container(id, Some(kill)).await;
    }

    /// The content of one regular file of the (stopped) container, capped.
    async fn copy_out(
        &self,
        docker: &Docker,
        id: &str,
        path: &str,
        cap: usize,
    ) -> Result<(Vec<u8>, bool), String> {
        let opts = DownloadFromContainerOptionsBuilder::new().path(path).build();
        let mut stream = docker.download_from_container(id, Some(opts));
        // The archive of one file is the file plus headers; read a little past the cap.
        let limit = cap.saturating_add(64 << 10);
        let mut tar_bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("result file {path:?} not found: {e}"))?;
            if tar_bytes.len() < limit {
                tar_bytes.extend_from_slice(&chunk);
            }
        }
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let entries = archive.entries().map_err(|e| format!("reading the result: {e}"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| format!("reading the result: {e}"))?;
            if entry.header().entry_type().is_file() {
                let size = entry.header().size().unwrap_or(0) as usize;
                let mut bytes = Vec::with_capacity(size.min(cap));
                let _ = std::io::Read::read_to_end(
                    &mut std::io::Read::take(&mut entry, cap as u64),
                    &mut bytes,
                );
                return Ok((bytes, size > cap));
            }
        }
        Err(format!("result file {path:?} is not a regular file"))
    }
}

#[async_trait]
impl Executor for DockerExecutor {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn prepare(&self, _id: &str, _binary: &[u8]) -> Result<FunctionKind, PrepareError> {
        Err(PrepareError::Invalid("the docker executor runs images, not uploaded binaries".into()))
    }

    async fn available(&self) -> Result<(), Unready> {
        const FIX: &str = "apt-get install -y docker.io and start dockerd (or set DOCKER_HOST)";
        let docker = self.client().await.map_err(|e| Unready::new(e, FIX))?;
        match tokio::time::timeout(Duration::from_secs(2), docker.ping()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Unready::new(format!("the Docker engine does not answer: {e}"), FIX)),
            Err(_) => Err(Unready::new("the Docker engine does not answer", FIX)),
        }
    }

    async fn run(
        &self,
        req: RunRequest,
        live: Arc<dyn OutputSink>,
        cancel: CancellationToken,
    ) -> JobOutcome {
        let docker = match self.client().await {
            Ok(d) => d.clone(),
            Err(e) => return failed("executor_unavailable", e),
        };
        let image = req.container.as_ref().map(|c| c.image.clone()).unwrap_or_default();
        if let Err(outcome) = self.ensure_image(&docker, &image, &live, &cancel).await {
            return *outcome;
        }
        let name = format!("cloudpipe-{}-{}", req.job_id, req.attempt);
        let create = CreateContainerOptionsBuilder::new().name(&name).build();
        let scratch = self.scratch(&req).await;
        let body = self.create_body(&req, scratch.as_ref());
        let mut created = docker.create_container(Some(create.clone()), body.clone()).await;
        if let Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) =
            &created
        {
            // A container of this very attempt left by an earlier life of the server.
            let force = RemoveContainerOptionsBuilder::new().force(true).build();
            let _ = docker.remove_container(&name, Some(force)).await;
            created = docker.create_container(Some(create), body).await;
        }
        let id = match created {
            Ok(c) => c.id,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            }) => {
                return failed(
                    "image_not_found",
                    format!("image not on the Docker engine (--docker-pull never): {message}"),
                );
            }
            Err(e) => {
                if let Some(s) = scratch {
                    s.release().await;
                }
                return failed("executor", format!("creating the container: {e}"));
            }
        };
        // Removed whatever happens, even if this future is dropped half-way (a scratch
        // mount left then is released by the next start's reap).
        let remover = Remover { docker: docker.clone(), id: id.clone(), done: false };
        let outcome = self.attempt(&docker, &id, &req, &live, &cancel).await;
        remover.remove().await;
        if let Some(s) = scratch {
            s.release().await;
        }
        outcome
    }
}

/// An image reference split as the Engine API's pull wants it.
#[derive(Debug, PartialEq, Eq)]
struct ImageRef {
    /// `host[:port]`, or `docker.io` for Docker Hub.
    registry: String,
    /// Everything before the tag or digest (`127.0.0.1:5000/team/tool`, `debian`).
    repository: String,
    /// The tag, or the digest (`sha256:…`); `latest` when the reference names none.
    tag: String,
}

impl ImageRef {
    /// Splits a reference the way the Docker CLI does: the first path component is a
    /// registry when it has a `.` or a `:`, or is `localhost`.
    fn parse(image: &str) -> ImageRef {
        let (name, tag) = match image.split_once('@') {
            Some((name, digest)) => (name, digest.to_string()),
            None => {
                let slash = image.rfind('/').map_or(0, |i| i + 1);
                match image[slash..].rfind(':') {
                    Some(i) => (&image[..slash + i], image[slash + i + 1..].to_string()),
                    None => (image, "latest".to_string()),
                }
            }
        };
        let registry = match name.split_once('/') {
            Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
                first.to_string()
            }
            _ => "docker.io".to_string(),
        };
        ImageRef { registry, repository: name.to_string(), tag }
    }
}

/// A size-capped tmpfs on the host, bound at a container's `/tmp`.
struct Scratch {
    dir: std::path::PathBuf,
}

impl Scratch {
    /// Mounts a tmpfs of `size` at `dir` (made if missing).
    async fn mount(dir: &std::path::Path, size: &str) -> Result<Scratch, String> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let out = tokio::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("rw,nosuid,nodev,mode=1777,size={size}"))
            .arg("cloudpipe-scratch")
            .arg(dir)
            .output()
            .await
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            let _ = tokio::fs::remove_dir(dir).await;
            return Err(format!("mount: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Scratch { dir: dir.to_path_buf() })
    }

    /// Unmounts (lazily: the engine may still hold it a moment) and removes it.
    async fn release(self) {
        let _ = tokio::process::Command::new("umount").arg("-l").arg(&self.dir).output().await;
        if let Err(e) = tokio::fs::remove_dir(&self.dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing a scratch mount failed");
        }
    }
}

/// Removes a container when dropped (from a task) unless [`Remover::remove`] did.
struct Remover {
    docker: Docker,
    id: String,
    done: bool,
}

impl Remover {
    async fn remove(mut self) {
        let force = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        if let Err(e) = self.docker.remove_container(&self.id, Some(force)).await {
            tracing::warn!(container = %self.id, error = %e, "removing a container failed");
        }
        self.done = true;
    }
}

impl Drop for Remover {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (docker, id) = (self.docker.clone(), std::mem::take(&mut self.id));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let force = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
                let _ = docker.remove_container(&id, Some(force)).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_into_registry_repository_and_tag() {
        let r = |s: &str| {
            let i = ImageRef::parse(s);
            (i.registry, i.repository, i.tag)
        };
        let own = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(r("debian:bookworm-slim"), own("docker.io", "debian", "bookworm-slim"));
        assert_eq!(r("debian"), own("docker.io", "debian", "latest"));
        assert_eq!(r("team/tool:1"), own("docker.io", "team/tool", "1"));
        assert_eq!(
            r("127.0.0.1:5000/team/tool"),
            own("127.0.0.1:5000", "127.0.0.1:5000/team/tool", "latest")
        );
        assert_eq!(r("ghcr.io/a/b:v2"), own("ghcr.io", "ghcr.io/a/b", "v2"));
        assert_eq!(r("localhost/x@sha256:ab"), own("localhost", "localhost/x", "sha256:ab"));
    }
}
