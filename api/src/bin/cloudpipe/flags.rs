//! The server's flags (`cloudpipe serve`, `cloudpipe up`), grouped as `serve --help`
//! shows them: each group is one struct that checks its values and fills its part of
//! the plain config structs the runtime and the API take. Every flag has a
//! `CLOUDPIPE_…` environment name; the library crates read no environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use cloudpipe_api::ApiConfig;
use cloudpipe_api::routes::invoke::InvokeConfig;
use cloudpipe_runtime::RuntimeConfig;
use cloudpipe_runtime::cluster::{NodeConfig, Role};
use cloudpipe_runtime::executor::docker::PullPolicy;
use cloudpipe_runtime::executor::vm::VmConfig;
use cloudpipe_runtime::scheduler::SchedulerConfig;
use cloudpipe_runtime::store::{Backend, Retention};

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CLOUDPIPE_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Where the store and the compiled-function cache live.
    #[arg(long, env = "CLOUDPIPE_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Store: `redb` (default) or `sled`, embedded in --data-dir for one machine; or
    /// a PostgreSQL URL (`postgres://user:password@host:port/db`) shared by the nodes
    /// of a cluster.
    #[arg(long, env = "CLOUDPIPE_STORE", default_value = "redb", hide_env_values = true)]
    pub store: String,
    /// At shutdown (SIGTERM, Ctrl-C), how long requests and running jobs get to finish,
    /// in milliseconds; jobs still running then go back to the queue.
    #[arg(long, env = "CLOUDPIPE_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Free space the store keeps on its disk, in MiB: under it, new work (submits,
    /// uploads) is refused with 507 while reads and running jobs go on (0: no check).
    #[arg(long, env = "CLOUDPIPE_MIN_FREE_DISK_MB", default_value_t = 64)]
    pub min_free_disk_mb: u64,
    /// Browser origins allowed to call the API from their pages, comma-separated
    /// (`https://app.example.com,http://localhost:5173`, or `*` for any). Default: none,
    /// CORS off.
    #[arg(long, env = "CLOUDPIPE_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_cors_origin)]
    pub cors_origins: Vec<String>,
    /// Internal addresses (comma-separated CIDR blocks, e.g. `10.1.0.0/16,fd00::/8`)
    /// that functions' outgoing requests and batch hooks may reach. Loopback, private,
    /// link-local (cloud metadata), unique-local and other non-public addresses are
    /// refused otherwise, whatever a function or account allows.
    #[arg(long, env = "CLOUDPIPE_ALLOW_INTERNAL_OUTBOUND", default_value = "")]
    pub allow_internal_outbound: String,
    #[command(flatten)]
    pub cluster: ClusterFlags,
    #[command(flatten)]
    pub jobs: JobFlags,
    #[command(flatten)]
    pub invoke: InvokeFlags,
    #[command(flatten)]
    pub auth: AuthFlags,
    #[command(flatten)]
    pub quotas: QuotaFlags,
    #[command(flatten)]
    pub secrets: SecretFlags,
    #[command(flatten)]
    pub tls: TlsFlags,
    #[command(flatten)]
    pub executors: ExecutorFlags,
    #[command(flatten)]
    pub vm: VmFlags,
}

/// A PostgreSQL store's nodes.
#[derive(Args, Clone)]
#[command(next_help_heading = "Cluster (with a PostgreSQL store)")]
pub struct ClusterFlags {
    /// With a PostgreSQL store: what this node does. `all` serves the API and runs
    /// jobs; `api` only serves; `worker` only runs jobs (and serves /healthz,
    /// /metrics and the live events of its jobs).
    #[arg(long, env = "CLOUDPIPE_ROLE", default_value = "all", value_parser = ["all", "api", "worker"])]
    pub role: String,
    /// With a PostgreSQL store: this node's name, unique in the cluster [default: the
    /// host name and a random suffix].
    #[arg(long, env = "CLOUDPIPE_NODE")]
    pub node: Option<String>,
    /// With a PostgreSQL store: the URL other nodes reach this one at, to relay live
    /// output of its jobs [default: the URL it listens on].
    #[arg(long, env = "CLOUDPIPE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// With a PostgreSQL store: how long a node's claim on a job holds without a
    /// heartbeat, in milliseconds. A node that dies loses its jobs to the others after
    /// this (plus up to a third of it).
    #[arg(long, env = "CLOUDPIPE_LEASE_MS", default_value_t = 5_000)]
    pub lease_ms: u64,
    /// With a PostgreSQL store: connections this node keeps to the database.
    #[arg(long, env = "CLOUDPIPE_DB_CONNECTIONS", default_value_t = 16)]
    pub db_connections: usize,
}

/// Jobs: how many run, their default and largest limits, how long they are kept.
#[derive(Args, Clone)]
#[command(next_help_heading = "Jobs")]
pub struct JobFlags {
    /// Jobs running at once.
    #[arg(long, env = "CLOUDPIPE_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Timeout of a job that names none, in milliseconds.
    #[arg(long, env = "CLOUDPIPE_DEFAULT_TIMEOUT_MS", default_value_t = 30_000)]
    pub default_timeout_ms: u64,
    /// Largest timeout a job may ask for, in milliseconds.
    #[arg(long, env = "CLOUDPIPE_MAX_TIMEOUT_MS", default_value_t = 900_000)]
    pub max_timeout_ms: u64,
    /// Memory cap of a job that names none, in MiB.
    #[arg(long, env = "CLOUDPIPE_DEFAULT_MEMORY_MB", default_value_t = 128)]
    pub default_memory_mb: u64,
    /// Largest memory cap a job may ask for, in MiB.
    #[arg(long, env = "CLOUDPIPE_MAX_MEMORY_MB", default_value_t = 4096)]
    pub max_memory_mb: u64,
    /// Bytes of stdout and of stderr kept per job; the rest is cut (and flagged).
    #[arg(long, env = "CLOUDPIPE_OUTPUT_CAP", default_value_t = 1 << 20)]
    pub output_cap: usize,
    /// Finished jobs are deleted after this many seconds.
    #[arg(long, env = "CLOUDPIPE_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub retention_secs: u64,
    /// At most this many finished jobs are kept per account (the account's oldest go
    /// first; never another account's); an account's `max_finished_jobs` quota
    /// replaces it for that account.
    #[arg(long, env = "CLOUDPIPE_RETENTION_MAX_JOBS", default_value_t = 1_000_000)]
    pub retention_max_jobs: u64,
}

/// HTTP invocation (`/fn/NAME`).
#[derive(Args, Clone)]
#[command(next_help_heading = "HTTP invocation")]
pub struct InvokeFlags {
    /// Timeout of one HTTP invocation (`/fn/NAME`), in milliseconds.
    #[arg(long, env = "CLOUDPIPE_FN_TIMEOUT_MS", default_value_t = 30_000)]
    pub fn_timeout_ms: u64,
    /// Memory cap of one HTTP invocation, in MiB.
    #[arg(long, env = "CLOUDPIPE_FN_MEMORY_MB", default_value_t = 128)]
    pub fn_memory_mb: u64,
    /// HTTP invocations of one function running at once (past it: 503).
    #[arg(long, env = "CLOUDPIPE_FN_MAX_CONCURRENCY", default_value_t = 64)]
    pub fn_max_concurrency: usize,
    /// HTTP invocations of all functions running at once (past it: 503).
    #[arg(long, env = "CLOUDPIPE_MAX_INVOCATIONS", default_value_t = 192)]
    pub max_invocations: usize,
    /// Wasm instances alive at once (the pooling allocator's slots, each reserving
    /// room for the limits admitted per component: 2 memories of --max-memory-mb of
    /// address space, 16 core instances, 8 tables) [default: --concurrency plus
    /// --max-invocations]. Under that default, a job that finds the pool full goes
    /// back to the queue and an invocation gets 503.
    #[arg(long, env = "CLOUDPIPE_WASM_INSTANCES")]
    pub wasm_instances: Option<u32>,
    /// HTTP invocations of one account's functions running at once (past it: 429).
    #[arg(long, env = "CLOUDPIPE_FN_MAX_CONCURRENCY_PER_ACCOUNT", default_value_t = 96)]
    pub fn_max_concurrency_per_account: usize,
    /// How long a client has to send an invocation's request body (its first MiB
    /// when streamed) before the server answers 408, in milliseconds; no invocation
    /// slot is held meanwhile.
    #[arg(long, env = "CLOUDPIPE_FN_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub fn_body_timeout_ms: u64,
}

/// API keys: the admin's, an external validator, lockout.
#[derive(Args, Clone)]
#[command(next_help_heading = "Auth")]
pub struct AuthFlags {
    /// Fixes the admin's API key (for automation; at least 16 characters). Without it
    /// the first start makes a key, prints it once and writes the credentials file.
    #[arg(long, env = "CLOUDPIPE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Where the first start writes the admin's credentials [default:
    /// $CLOUDPIPE_CREDENTIALS, else ~/.config/cloudpipe/credentials.json].
    #[arg(long)]
    pub credentials_file: Option<PathBuf>,
    /// Validate API keys with an external auth service (Cloudpipe's protocol:
    /// `GET URL/validate?accountName=…&apiKey=…`, 204 valid, 404 invalid).
    #[arg(long, env = "CLOUDPIPE_AUTH_URL")]
    pub auth_url: Option<String>,
    /// How long a key the external service vouched for is trusted without asking again.
    #[arg(long, env = "CLOUDPIPE_AUTH_CACHE_SECS", default_value_t = 30)]
    pub auth_cache_secs: u64,
    /// Failed authentications allowed per client address per minute (0: no limit).
    #[arg(long, env = "CLOUDPIPE_AUTH_FAILURES_PER_MINUTE", default_value_t = 30)]
    pub auth_failures_per_minute: u32,
}

/// The quotas of an account that sets none.
#[derive(Args, Clone)]
#[command(next_help_heading = "Default quotas")]
pub struct QuotaFlags {
    /// Default quota: jobs queued or running at once per account (0: none).
    #[arg(long, env = "CLOUDPIPE_QUOTA_CONCURRENT_JOBS", default_value_t = 1000)]
    pub quota_concurrent_jobs: u64,
    /// Default quota: longest job timeout per account, in ms (0: the server's maximum).
    #[arg(long, env = "CLOUDPIPE_QUOTA_TIMEOUT_MS", default_value_t = 0)]
    pub quota_timeout_ms: u64,
    /// Default quota: largest job memory per account, in MiB (0: the server's maximum).
    #[arg(long, env = "CLOUDPIPE_QUOTA_MEMORY_MB", default_value_t = 0)]
    pub quota_memory_mb: u64,
    /// Default quota: bytes of function versions stored per account (0: none).
    #[arg(long, env = "CLOUDPIPE_QUOTA_FUNCTION_BYTES", default_value_t = 1 << 30)]
    pub quota_function_bytes: u64,
    /// Default quota: inputs of one batch (0: the server's maximum, 1000000).
    #[arg(long, env = "CLOUDPIPE_QUOTA_BATCH_INPUTS", default_value_t = 100_000)]
    pub quota_batch_inputs: u64,
    /// Default quota: batches stored per account, whatever their status (0: none).
    #[arg(long, env = "CLOUDPIPE_QUOTA_BATCHES", default_value_t = 1000)]
    pub quota_batches: u64,
    /// Default quota: inputs of all of an account's stored batches (0: none).
    #[arg(long, env = "CLOUDPIPE_QUOTA_STORED_BATCH_INPUTS", default_value_t = 10_000_000)]
    pub quota_stored_batch_inputs: u64,
}

/// Write-only secrets, sealed at rest.
#[derive(Args, Clone)]
#[command(next_help_heading = "Secrets")]
pub struct SecretFlags {
    /// The key file that seals secrets at rest (one `ID BASE64` key a line, the last one
    /// sealing; append a line to rotate) [default: DATA_DIR/secrets.key, made on the
    /// first start with mode 0600].
    #[arg(long, env = "CLOUDPIPE_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// Secrets per account.
    #[arg(long, env = "CLOUDPIPE_MAX_SECRETS", default_value_t = 100)]
    pub max_secrets: u64,
    /// Bytes of one secret's value.
    #[arg(long, env = "CLOUDPIPE_MAX_SECRET_BYTES", default_value_t = 64 << 10)]
    pub max_secret_bytes: usize,
}

/// HTTPS.
#[derive(Args, Clone)]
#[command(next_help_heading = "TLS")]
pub struct TlsFlags {
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "CLOUDPIPE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "CLOUDPIPE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// The docker executor and the built-in runners.
#[derive(Args, Clone)]
#[command(next_help_heading = "Executors")]
pub struct ExecutorFlags {
    /// The JS runner component (guest-runners/js, `build.sh`) to register as the
    /// built-in `runner:js` that every account may run [default: the one built into
    /// this binary].
    #[arg(long, env = "CLOUDPIPE_RUNNER_JS")]
    pub runner_js: Option<PathBuf>,
    /// Do not offer runner:js (nor spend the memory and CPU of compiling it on a first
    /// start).
    #[arg(long, conflicts_with = "runner_js")]
    pub no_runner_js: bool,
    /// When docker jobs pull their image: missing (when the engine lacks it), always,
    /// never.
    #[arg(long, env = "CLOUDPIPE_DOCKER_PULL", default_value = "missing", value_parser = ["missing", "always", "never"])]
    pub docker_pull: String,
    /// Registries docker images may be pulled from, comma-separated (`host[:port]`,
    /// `docker.io` for Docker Hub) [default: any].
    #[arg(long, env = "CLOUDPIPE_DOCKER_REGISTRIES", value_delimiter = ',')]
    pub docker_registries: Vec<String>,
    /// Size of a docker job's `/tmp` (its only writable place), in MiB.
    #[arg(long, env = "CLOUDPIPE_DOCKER_TMP_MB", default_value_t = 64)]
    pub docker_tmp_mb: u64,
    /// CPUs a docker job gets when it names none (`cpus`); 0: no limit.
    #[arg(long, env = "CLOUDPIPE_DOCKER_CPUS", default_value_t = 1.0)]
    pub docker_cpus: f64,
    /// Images docker jobs may run, comma-separated: exact references, or prefixes
    /// ending in `*` (`docker.io/library/*,ghcr.io/acme/*`) [default: any].
    #[arg(long, env = "CLOUDPIPE_DOCKER_IMAGES", value_delimiter = ',')]
    pub docker_images: Vec<String>,
    /// The image Cloudpipe v1 jobs (`POST /v1/job`) run in (present on the engine).
    #[arg(long, env = "CLOUDPIPE_V1_IMAGE", default_value = "cloudpipe/runner:latest")]
    pub v1_image: String,
}

/// The vm executor's settings.
#[derive(Args, Clone)]
#[command(next_help_heading = "VM executor")]
pub struct VmFlags {
    /// The vm executor's guest agent (a static binary, guest-runners/vm-agent/build.sh)
    /// [default: the one built into this binary].
    #[arg(long, env = "CLOUDPIPE_VM_AGENT")]
    pub vm_agent: Option<PathBuf>,
    /// The QEMU binary of the vm executor.
    #[arg(long, env = "CLOUDPIPE_VM_QEMU", default_value = "qemu-system-x86_64")]
    pub vm_qemu: PathBuf,
    /// The guest kernel [default: the newest /boot/vmlinuz-* (Debian's linux-image-amd64)].
    #[arg(long, env = "CLOUDPIPE_VM_KERNEL")]
    pub vm_kernel: Option<PathBuf>,
    /// A statically linked busybox, the guest's userland (Debian's busybox-static).
    #[arg(long, env = "CLOUDPIPE_VM_BUSYBOX", default_value = "/bin/busybox")]
    pub vm_busybox: PathBuf,
    /// RAM of each VM, in MiB.
    #[arg(long, env = "CLOUDPIPE_VM_MEMORY_MB", default_value_t = 128)]
    pub vm_memory_mb: u64,
    /// Restored clones kept ready.
    #[arg(long, env = "CLOUDPIPE_VM_POOL", default_value_t = 2)]
    pub vm_pool: usize,
    /// QEMU's accelerator: tcg, or kvm where /dev/kvm runs guests.
    #[arg(long, env = "CLOUDPIPE_VM_ACCEL", default_value = "tcg", value_parser = ["tcg", "kvm"])]
    pub vm_accel: String,
    /// Where VM templates (initramfs and snapshot) are cached; servers may share it
    /// [default: DATA_DIR/vm/templates].
    #[arg(long, env = "CLOUDPIPE_VM_SNAPSHOT_DIR")]
    pub vm_snapshot_dir: Option<PathBuf>,
    /// `UID:GID` that clones (where jobs' commands run) drop to when the server runs
    /// as root; they also chroot into an empty directory. A user of their own, owning
    /// no file.
    #[arg(long, env = "CLOUDPIPE_VM_RUN_AS", default_value = "64999:64999", value_parser = parse_ids)]
    pub vm_run_as: (u32, u32),
}

fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = s.split_once(':').ok_or("use UID:GID (numbers)")?;
    let id = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("{v:?} is not a number"));
    let (uid, gid) = (id(uid)?, id(gid)?);
    if uid == 0 || gid == 0 {
        return Err("clones must not run as root (0)".into());
    }
    Ok((uid, gid))
}

fn parse_cors_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    cloudpipe_api::check_cors_origin(s).map(|()| s.to_string())
}

/// `$XDG_DATA_HOME/cloudpipe`, else `~/.local/share/cloudpipe`.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) => PathBuf::from(d).join("cloudpipe"),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".local/share/cloudpipe"),
            None => PathBuf::from("cloudpipe-data"),
        },
    }
}

/// The host name and a random suffix, so that a node restarted on the same host is a
/// new node (the old one's jobs go back to the queue when its leases run out).
fn default_node_name() -> String {
    let id = cloudpipe_runtime::JobId::new().to_bytes();
    format!("{}-{}", cloudpipe_api::host_name(), hex::encode(&id[12..]))
}

impl ServeArgs {
    /// The runtime's config; `url` is where this server is reached (a cluster node
    /// advertises it). `vm_agent` is the agent built into the binary.
    pub fn runtime_config(&self, url: &str, vm_agent: &[u8]) -> anyhow::Result<RuntimeConfig> {
        let mut c = RuntimeConfig::new(&self.data_dir);
        self.jobs.configure(&mut c.scheduler)?;
        anyhow::ensure!(
            (1..=100_000).contains(&self.invoke.max_invocations),
            "--max-invocations must be 1 to 100000"
        );
        anyhow::ensure!(
            self.invoke.fn_max_concurrency >= 1,
            "--fn-max-concurrency must be at least 1"
        );
        anyhow::ensure!(self.invoke.fn_memory_mb <= 1 << 20, "memory caps are at most 1048576 MiB");
        self.cluster.configure(&mut c, &self.store, url)?;
        c.egress =
            cloudpipe_runtime::egress::EgressConfig::parse_internal(&self.allow_internal_outbound)
                .map_err(|e| anyhow::anyhow!("--allow-internal-outbound: {e}"))?;
        if let Some(path) = &self.secrets.secrets_key_file {
            c.secrets.key_file = path.clone();
        }
        c.secrets.max_per_account = self.secrets.max_secrets;
        c.secrets.max_value_bytes = self.secrets.max_secret_bytes;
        c.space.reserve_bytes = self.min_free_disk_mb << 20;
        self.executors.configure(&mut c)?;
        // Jobs and invocations share the instance pool.
        c.wasm.max_instances = self
            .invoke
            .wasm_instances
            .unwrap_or((self.jobs.concurrency + self.invoke.max_invocations) as u32);
        anyhow::ensure!(
            (1..=1_000_000).contains(&c.wasm.max_instances),
            "--wasm-instances must be 1 to 1000000"
        );
        self.vm.configure(&mut c.vm, &self.data_dir, vm_agent)?;
        Ok(c)
    }

    pub fn api_config(&self) -> ApiConfig {
        let some = |v: u64| (v > 0).then_some(v);
        let (q, a, i) = (&self.quotas, &self.auth, &self.invoke);
        ApiConfig {
            admin_key: a.admin_key.clone(),
            default_quotas: cloudpipe_types::Quotas {
                max_concurrent_jobs: some(q.quota_concurrent_jobs),
                max_timeout_ms: some(q.quota_timeout_ms),
                max_memory_mb: some(q.quota_memory_mb),
                max_function_bytes: some(q.quota_function_bytes),
                max_finished_jobs: Some(self.jobs.retention_max_jobs),
                max_batch_inputs: some(q.quota_batch_inputs),
                max_batches: some(q.quota_batches),
                max_stored_batch_inputs: some(q.quota_stored_batch_inputs),
            },
            external_auth: a.auth_url.clone().map(|u| (u, Duration::from_secs(a.auth_cache_secs))),
            auth_failures_per_minute: a.auth_failures_per_minute,
            v1_image: self.executors.v1_image.clone(),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            cors_origins: self.cors_origins.clone(),
            invoke: InvokeConfig {
                max_concurrency_per_function: i.fn_max_concurrency,
                max_concurrency: i.max_invocations,
                timeout: Duration::from_millis(i.fn_timeout_ms),
                memory_bytes: i.fn_memory_mb << 20,
                max_concurrency_per_account: i.fn_max_concurrency_per_account.max(1),
                body_timeout: Duration::from_millis(i.fn_body_timeout_ms),
                ..InvokeConfig::default()
            },
            ..ApiConfig::default()
        }
    }
}

impl JobFlags {
    fn configure(&self, s: &mut SchedulerConfig) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=100_000).contains(&self.concurrency),
            "--concurrency must be 1 to 100000"
        );
        anyhow::ensure!(self.max_memory_mb <= 1 << 20, "memory caps are at most 1048576 MiB");
        anyhow::ensure!(
            self.retention_secs <= 100 * 365 * 86_400,
            "--retention-secs is at most 100 years"
        );
        anyhow::ensure!(
            self.default_timeout_ms <= self.max_timeout_ms,
            "--default-timeout-ms is over --max-timeout-ms"
        );
        anyhow::ensure!(
            self.default_memory_mb <= self.max_memory_mb,
            "--default-memory-mb is over --max-memory-mb"
        );
        s.concurrency = self.concurrency;
        s.default_timeout = Duration::from_millis(self.default_timeout_ms);
        s.max_timeout = Duration::from_millis(self.max_timeout_ms);
        s.default_memory_mb = self.default_memory_mb;
        s.max_memory_mb = self.max_memory_mb;
        s.output_cap = self.output_cap;
        s.retention = Retention {
            max_age_micros: self.retention_secs * 1_000_000,
            max_finished_per_account: self.retention_max_jobs,
        };
        Ok(())
    }
}

impl ClusterFlags {
    /// The store: embedded (`redb`, `sled`) for one machine, or PostgreSQL with this
    /// node's settings.
    fn configure(&self, c: &mut RuntimeConfig, store: &str, url: &str) -> anyhow::Result<()> {
        let role = Role::parse(&self.role).context("unknown --role")?;
        if !(store.starts_with("postgres://") || store.starts_with("postgresql://")) {
            c.backend = Backend::parse(store).with_context(|| {
                format!("--store {store:?}: use redb, sled or a postgres:// URL")
            })?;
            anyhow::ensure!(
                role == Role::All,
                "--role {} needs a PostgreSQL store (--store postgres://…): one machine does everything",
                self.role
            );
            return Ok(());
        }
        anyhow::ensure!(
            (300..=600_000).contains(&self.lease_ms),
            "--lease-ms must be 300 to 600000"
        );
        anyhow::ensure!(
            (2..=1000).contains(&self.db_connections),
            "--db-connections must be 2 to 1000"
        );
        let name = self.node.clone().unwrap_or_else(default_node_name);
        anyhow::ensure!(
            !name.is_empty() && name.len() <= 128 && !name.contains(char::is_whitespace),
            "--node must be 1 to 128 characters without spaces"
        );
        let mut node = NodeConfig::new(name);
        node.role = role;
        node.advertise_url = Some(self.advertise_url.clone().unwrap_or_else(|| url.to_string()));
        node.lease = Duration::from_millis(self.lease_ms);
        node.max_connections = self.db_connections;
        c.postgres = Some(cloudpipe_runtime::store::postgres::PgConfig {
            url: store.to_string(),
            schema: None,
            node,
        });
        Ok(())
    }
}

impl ExecutorFlags {
    fn configure(&self, c: &mut RuntimeConfig) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=1 << 20).contains(&self.docker_tmp_mb),
            "--docker-tmp-mb must be 1 to 1048576"
        );
        c.docker.tmp_size = format!("{}m", self.docker_tmp_mb);
        anyhow::ensure!(
            self.docker_cpus.is_finite() && (0.0..=1024.0).contains(&self.docker_cpus),
            "--docker-cpus must be 0 to 1024"
        );
        c.docker.default_nano_cpus =
            (self.docker_cpus > 0.0).then_some((self.docker_cpus * 1e9) as u64);
        c.scheduler.docker_images = self
            .docker_images
            .iter()
            .map(|i| i.trim().to_string())
            .filter(|i| !i.is_empty())
            .collect();
        c.docker.pull = PullPolicy::parse(&self.docker_pull).context("unknown --docker-pull")?;
        c.docker.registries = self
            .docker_registries
            .iter()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        Ok(())
    }
}

impl VmFlags {
    /// Fills `c`; the built-in agent (`built_in`, empty when the build could not make
    /// it) is written under `data_dir` (by content, once).
    fn configure(&self, c: &mut VmConfig, data_dir: &Path, built_in: &[u8]) -> anyhow::Result<()> {
        c.qemu = self.vm_qemu.clone();
        c.kernel = self.vm_kernel.clone();
        c.busybox = self.vm_busybox.clone();
        c.memory_mb = self.vm_memory_mb;
        c.pool_size = self.vm_pool;
        c.accel = Some(self.vm_accel.clone());
        c.snapshot_dir = self.vm_snapshot_dir.clone();
        c.run_as = self.vm_run_as;
        c.agent = match &self.vm_agent {
            Some(p) => Some(p.clone()),
            None if built_in.is_empty() => None,
            None => Some(write_by_content(&data_dir.join("vm"), "cloudpipe-vm-agent", built_in)?),
        };
        Ok(())
    }
}

/// Writes `bytes` as `dir/NAME-HASH` unless there already, executable; its path.
fn write_by_content(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("{name}-{}", &hex::encode(Sha256::digest(bytes))[..16]));
    if !path.is_file() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        Serve::try_parse_from([&["serve"], args].concat()).unwrap().serve
    }

    #[test]
    fn groups_fill_their_part_of_the_config() {
        let a = parse(&["--concurrency", "3", "--max-invocations", "5", "--docker-tmp-mb", "7"]);
        let c = a.runtime_config("http://127.0.0.1:1", b"").unwrap();
        assert_eq!(c.scheduler.concurrency, 3);
        assert_eq!(c.wasm.max_instances, 8, "jobs and invocations share the pool");
        assert_eq!(c.docker.tmp_size, "7m");
        assert!(c.postgres.is_none());
        let c = parse(&["--wasm-instances", "9"]).runtime_config("http://x", b"").unwrap();
        assert_eq!(c.wasm.max_instances, 9);
        let api = parse(&["--quota-timeout-ms", "0", "--fn-max-concurrency-per-account", "0"])
            .api_config();
        assert_eq!(api.default_quotas.max_timeout_ms, None, "0 means the server's maximum");
        assert_eq!(api.invoke.max_concurrency_per_account, 1);
    }

    #[test]
    fn bad_combinations_name_the_flag() {
        let err = |args: &[&str]| {
            format!("{:#}", parse(args).runtime_config("http://x", b"").unwrap_err())
        };
        assert!(
            err(&["--default-timeout-ms", "2", "--max-timeout-ms", "1"])
                .contains("--default-timeout-ms")
        );
        assert!(err(&["--role", "worker"]).contains("PostgreSQL"));
        assert!(err(&["--store", "mysql"]).contains("--store"));
        assert!(err(&["--store", "postgres://h/db", "--lease-ms", "1"]).contains("--lease-ms"));
        assert!(
            Serve::try_parse_from(["serve", "--tls-cert", "c.pem"]).is_err(),
            "needs --tls-key"
        );
    }
}
