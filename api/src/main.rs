//! The `cloudpipe` binary: `serve` runs the API; `up` serves and runs the bundled
//! example function end to end; `accounts`, `keys` and `me` talk to a running server's
//! admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cloudpipe_api::routes::invoke::InvokeConfig;
use cloudpipe_api::{ApiConfig, AppState};
use cloudpipe_runtime::account::Tenant;
use cloudpipe_runtime::executor::Unready;
use cloudpipe_runtime::executor::docker::PullPolicy;
use cloudpipe_runtime::store::{Backend, Retention};
use cloudpipe_runtime::{Runtime, RuntimeConfig};
use cloudpipe_types::JobSpec;

/// Cloudpipe: compute on demand. Wasm functions run as durable jobs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve(ServeArgs),
    /// Serve, upload the bundled example function and run it once, printing its output.
    Up {
        #[command(flatten)]
        serve: ServeArgs,
        /// Exit after the example ran instead of serving on.
        #[arg(long)]
        once: bool,
    },
    /// Manage accounts (admin).
    Accounts {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// Manage API keys.
    Keys {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Run a batch: one job of FUNCTION per stdin line, the line's words appended to
    /// its args (cloudtask style); a live progress line, a closing summary, exit code 0
    /// only when every input succeeded.
    Batch(BatchArgs),
    /// Show the account the key belongs to, its quotas and usage.
    Me {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Work on a stopped server's data directory directly (recovery).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Manage the account's write-only secrets (jobs name them in env as
    /// `{"secret": "NAME"}`).
    Secrets {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: SecretsCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Make a new API key for an account (the admin's by default) straight in the
    /// store and print it: the way back in after its last key was revoked. Run it
    /// with the server stopped (the store is locked while it runs).
    ResetKey {
        /// The server's data directory.
        #[arg(long, env = "CLOUDPIPE_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
        /// Store backend: redb (default) or sled.
        #[arg(long, env = "CLOUDPIPE_STORE", default_value = "redb", value_parser = ["redb", "sled"])]
        store: String,
        /// The account that gets the key.
        #[arg(long, default_value = "admin")]
        account: String,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Create or replace a secret; its value is read from stdin (one trailing newline
    /// dropped), so that it never shows in a process list or a shell history.
    Put { name: String },
    /// List the secrets: names and times, never values.
    List,
    /// Delete a secret.
    Rm { name: String },
}

#[derive(Subcommand)]
enum AccountsCommand {
    /// Create an account.
    Create {
        name: String,
        /// Make it an admin.
        #[arg(long)]
        admin: bool,
        /// Jobs queued or running at once.
        #[arg(long)]
        max_concurrent_jobs: Option<u64>,
        /// Longest job timeout, in milliseconds.
        #[arg(long)]
        max_timeout_ms: Option<u64>,
        /// Largest job memory cap, in MiB.
        #[arg(long)]
        max_memory_mb: Option<u64>,
        /// Total bytes of stored function versions.
        #[arg(long)]
        max_function_bytes: Option<u64>,
    },
    /// List accounts.
    List,
    /// Show one account.
    Show { name: String },
    /// Disable an account: its keys are refused and its jobs cancelled.
    Disable { name: String },
    /// Enable a disabled account.
    Enable { name: String },
}

#[derive(Args)]
struct BatchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The function every input runs.
    #[arg(long, required_unless_present_any = ["resume", "retry"])]
    function: Option<String>,
    /// Most jobs running at once.
    #[arg(long, default_value_t = 8)]
    split: u32,
    /// Extra attempts of an input that failed or timed out.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Timeout of each job (`30s`, `500ms`, `2m`).
    #[arg(long)]
    timeout: Option<String>,
    /// Stop after this many inputs failed in a row.
    #[arg(long)]
    strikes: Option<u32>,
    /// URL called once with the summary when the batch ends.
    #[arg(long)]
    hook: Option<String>,
    /// Run the pending inputs of a stopped batch instead of starting one.
    #[arg(long, conflicts_with_all = ["retry", "function"])]
    resume: Option<String>,
    /// Run the failed and timed-out inputs of a batch again.
    #[arg(long, conflicts_with_all = ["resume", "function"])]
    retry: Option<String>,
    /// Arguments before each input's words.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for an account (printed once).
    Create {
        account: String,
        #[arg(long)]
        label: Option<String>,
    },
    /// List an account's keys (ids and labels, never secrets).
    List { account: String },
    /// Revoke a key by id.
    Revoke { id: String },
}

/// Where the server is and which key to use: flags, then the environment, then the
/// credentials file.
#[derive(Args, Clone)]
struct ClientArgs {
    /// Server URL [default: from the credentials file, else http://127.0.0.1:7070].
    #[arg(long, env = "CLOUDPIPE_URL")]
    url: Option<String>,
    /// API key [default: from the credentials file].
    #[arg(long, env = "CLOUDPIPE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CLOUDPIPE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where the store and the compiled-function cache live.
    #[arg(long, env = "CLOUDPIPE_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Store: `redb` (default) or `sled`, embedded in --data-dir for one machine; or
    /// a PostgreSQL URL (`postgres://user:password@host:port/db`) shared by the nodes
    /// of a cluster.
    #[arg(long, env = "CLOUDPIPE_STORE", default_value = "redb", hide_env_values = true)]
    store: String,
    /// With a PostgreSQL store: what this node does. `all` serves the API and runs
    /// jobs; `api` only serves; `worker` only runs jobs (and serves /healthz,
    /// /metrics and the live events of its jobs).
    #[arg(long, env = "CLOUDPIPE_ROLE", default_value = "all", value_parser = ["all", "api", "worker"])]
    role: String,
    /// With a PostgreSQL store: this node's name, unique in the cluster [default: the
    /// host name and a random suffix].
    #[arg(long, env = "CLOUDPIPE_NODE")]
    node: Option<String>,
    /// With a PostgreSQL store: the URL other nodes reach this one at, to relay live
    /// output of its jobs [default: the URL it listens on].
    #[arg(long, env = "CLOUDPIPE_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// With a PostgreSQL store: how long a node's claim on a job holds without a
    /// heartbeat, in milliseconds. A node that dies loses its jobs to the others after
    /// this (plus up to a third of it).
    #[arg(long, env = "CLOUDPIPE_LEASE_MS", default_value_t = 5_000)]
    lease_ms: u64,
    /// With a PostgreSQL store: connections this node keeps to the database.
    #[arg(long, env = "CLOUDPIPE_DB_CONNECTIONS", default_value_t = 16)]
    db_connections: usize,
    /// Jobs running at once.
    #[arg(long, env = "CLOUDPIPE_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// Timeout of a job that names none, in milliseconds.
    #[arg(long, env = "CLOUDPIPE_DEFAULT_TIMEOUT_MS", default_value_t = 30_000)]
    default_timeout_ms: u64,
    /// Largest timeout a job may ask for, in milliseconds.
    #[arg(long, env = "CLOUDPIPE_MAX_TIMEOUT_MS", default_value_t = 900_000)]
    max_timeout_ms: u64,
    /// Memory cap of a job that names none, in MiB.
    #[arg(long, env = "CLOUDPIPE_DEFAULT_MEMORY_MB", default_value_t = 128)]
    default_memory_mb: u64,
    /// Largest memory cap a job may ask for, in MiB.
    #[arg(long, env = "CLOUDPIPE_MAX_MEMORY_MB", default_value_t = 4096)]
    max_memory_mb: u64,
    /// Bytes of stdout and of stderr kept per job; the rest is cut (and flagged).
    #[arg(long, env = "CLOUDPIPE_OUTPUT_CAP", default_value_t = 1 << 20)]
    output_cap: usize,
    /// Finished jobs are deleted after this many seconds.
    #[arg(long, env = "CLOUDPIPE_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    retention_secs: u64,
    /// At most this many finished jobs are kept (the oldest go first).
    #[arg(long, env = "CLOUDPIPE_RETENTION_MAX_JOBS", default_value_t = 1_000_000)]
    retention_max_jobs: u64,
    /// Timeout of one HTTP invocation (`/fn/NAME`), in milliseconds.
    #[arg(long, env = "CLOUDPIPE_FN_TIMEOUT_MS", default_value_t = 30_000)]
    fn_timeout_ms: u64,
    /// Memory cap of one HTTP invocation, in MiB.
    #[arg(long, env = "CLOUDPIPE_FN_MEMORY_MB", default_value_t = 128)]
    fn_memory_mb: u64,
    /// HTTP invocations of one function running at once (past it: 503).
    #[arg(long, env = "CLOUDPIPE_FN_MAX_CONCURRENCY", default_value_t = 64)]
    fn_max_concurrency: usize,
    /// HTTP invocations of all functions running at once (past it: 503).
    #[arg(long, env = "CLOUDPIPE_MAX_INVOCATIONS", default_value_t = 192)]
    max_invocations: usize,
    /// At shutdown (SIGTERM, Ctrl-C), how long requests and running jobs get to finish,
    /// in milliseconds; jobs still running then go back to the queue.
    #[arg(long, env = "CLOUDPIPE_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// Fixes the admin's API key (for automation; at least 16 characters). Without it
    /// the first start makes a key, prints it once and writes the credentials file.
    #[arg(long, env = "CLOUDPIPE_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Where the first start writes the admin's credentials [default:
    /// $CLOUDPIPE_CREDENTIALS, else ~/.config/cloudpipe/credentials.json].
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Validate API keys with an external auth service (Cloudpipe's protocol:
    /// `GET URL/validate?accountName=…&apiKey=…`, 204 valid, 404 invalid).
    #[arg(long, env = "CLOUDPIPE_AUTH_URL")]
    auth_url: Option<String>,
    /// How long a key the external service vouched for is trusted without asking again.
    #[arg(long, env = "CLOUDPIPE_AUTH_CACHE_SECS", default_value_t = 30)]
    auth_cache_secs: u64,
    /// Failed authentications allowed per client address per minute (0: no limit).
    #[arg(long, env = "CLOUDPIPE_AUTH_FAILURES_PER_MINUTE", default_value_t = 30)]
    auth_failures_per_minute: u32,
    /// Default quota: jobs queued or running at once per account (0: none).
    #[arg(long, env = "CLOUDPIPE_QUOTA_CONCURRENT_JOBS", default_value_t = 1000)]
    quota_concurrent_jobs: u64,
    /// Default quota: longest job timeout per account, in ms (0: the server's maximum).
    #[arg(long, env = "CLOUDPIPE_QUOTA_TIMEOUT_MS", default_value_t = 0)]
    quota_timeout_ms: u64,
    /// Default quota: largest job memory per account, in MiB (0: the server's maximum).
    #[arg(long, env = "CLOUDPIPE_QUOTA_MEMORY_MB", default_value_t = 0)]
    quota_memory_mb: u64,
    /// Default quota: bytes of function versions stored per account (0: none).
    #[arg(long, env = "CLOUDPIPE_QUOTA_FUNCTION_BYTES", default_value_t = 1 << 30)]
    quota_function_bytes: u64,
    /// The JS runner component (guest-runners/js, `build.sh`) to register as the
    /// built-in `runner:js` that every account may run [default: the one built into
    /// this binary].
    #[arg(long, env = "CLOUDPIPE_RUNNER_JS")]
    runner_js: Option<PathBuf>,
    /// Do not offer runner:js (nor spend the memory and CPU of compiling it on a first
    /// start).
    #[arg(long, conflicts_with = "runner_js")]
    no_runner_js: bool,
    /// When docker jobs pull their image: missing (when the engine lacks it), always,
    /// never.
    #[arg(long, env = "CLOUDPIPE_DOCKER_PULL", default_value = "missing", value_parser = ["missing", "always", "never"])]
    docker_pull: String,
    /// Registries docker images may be pulled from, comma-separated (`host[:port]`,
    /// `docker.io` for Docker Hub) [default: any].
    #[arg(long, env = "CLOUDPIPE_DOCKER_REGISTRIES", value_delimiter = ',')]
    docker_registries: Vec<String>,
    #[command(flatten)]
    vm: VmArgs,
    /// The image Cloudpipe v1 jobs (`POST /v1/job`) run in (present on the engine).
    #[arg(long, env = "CLOUDPIPE_V1_IMAGE", default_value = "cloudpipe/runner:latest")]
    v1_image: String,
    /// Internal addresses (comma-separated CIDR blocks, e.g. `10.1.0.0/16,fd00::/8`)
    /// that functions' outgoing requests and batch hooks may reach. Loopback, private,
    /// link-local (cloud metadata), unique-local and other non-public addresses are
    /// refused otherwise, whatever a function or account allows.
    #[arg(long, env = "CLOUDPIPE_ALLOW_INTERNAL_OUTBOUND", default_value = "")]
    allow_internal_outbound: String,
    /// HTTP invocations of one account's functions running at once (past it: 429).
    #[arg(long, env = "CLOUDPIPE_FN_MAX_CONCURRENCY_PER_ACCOUNT", default_value_t = 96)]
    fn_max_concurrency_per_account: usize,
    /// How long a client has to send an invocation's request body (its first MiB
    /// when streamed) before the server answers 408, in milliseconds; no invocation
    /// slot is held meanwhile.
    #[arg(long, env = "CLOUDPIPE_FN_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    fn_body_timeout_ms: u64,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "CLOUDPIPE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "CLOUDPIPE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Browser origins allowed to call the API from their pages, comma-separated
    /// (`https://app.example.com,http://localhost:5173`, or `*` for any). Default: none,
    /// CORS off.
    #[arg(long, env = "CLOUDPIPE_CORS_ORIGINS", value_delimiter = ',', value_parser = parse_cors_origin)]
    cors_origins: Vec<String>,
    /// The key file that seals secrets at rest (one `ID BASE64` key a line, the last one
    /// sealing; append a line to rotate) [default: DATA_DIR/secrets.key, made on the
    /// first start with mode 0600].
    #[arg(long, env = "CLOUDPIPE_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Secrets per account.
    #[arg(long, env = "CLOUDPIPE_MAX_SECRETS", default_value_t = 100)]
    max_secrets: u64,
    /// Bytes of one secret's value.
    #[arg(long, env = "CLOUDPIPE_MAX_SECRET_BYTES", default_value_t = 64 << 10)]
    max_secret_bytes: usize,
    /// Free space the store keeps on its disk, in MiB: under it, new work (submits,
    /// uploads) is refused with 507 while reads and running jobs go on (0: no check).
    #[arg(long, env = "CLOUDPIPE_MIN_FREE_DISK_MB", default_value_t = 64)]
    min_free_disk_mb: u64,
    /// Size of a docker job's `/tmp` (its only writable place), in MiB.
    #[arg(long, env = "CLOUDPIPE_DOCKER_TMP_MB", default_value_t = 64)]
    docker_tmp_mb: u64,
}

fn parse_cors_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    cloudpipe_api::check_cors_origin(s).map(|()| s.to_string())
}

/// The vm executor's settings (`cloudpipe serve --help` lists them under these names).
#[derive(Args, Clone)]
struct VmArgs {
    /// The vm executor's guest agent (a static binary, guest-runners/vm-agent/build.sh)
    /// [default: the one built into this binary].
    #[arg(long, env = "CLOUDPIPE_VM_AGENT")]
    vm_agent: Option<PathBuf>,
    /// The QEMU binary of the vm executor.
    #[arg(long, env = "CLOUDPIPE_VM_QEMU", default_value = "qemu-system-x86_64")]
    vm_qemu: PathBuf,
    /// The guest kernel [default: the newest /boot/vmlinuz-* (Debian's linux-image-amd64)].
    #[arg(long, env = "CLOUDPIPE_VM_KERNEL")]
    vm_kernel: Option<PathBuf>,
    /// A statically linked busybox, the guest's userland (Debian's busybox-static).
    #[arg(long, env = "CLOUDPIPE_VM_BUSYBOX", default_value = "/bin/busybox")]
    vm_busybox: PathBuf,
    /// RAM of each VM, in MiB.
    #[arg(long, env = "CLOUDPIPE_VM_MEMORY_MB", default_value_t = 128)]
    vm_memory_mb: u64,
    /// Restored clones kept ready.
    #[arg(long, env = "CLOUDPIPE_VM_POOL", default_value_t = 2)]
    vm_pool: usize,
    /// QEMU's accelerator: tcg, or kvm where /dev/kvm runs guests.
    #[arg(long, env = "CLOUDPIPE_VM_ACCEL", default_value = "tcg", value_parser = ["tcg", "kvm"])]
    vm_accel: String,
    /// Where VM templates (initramfs and snapshot) are cached; servers may share it
    /// [default: DATA_DIR/vm/templates].
    #[arg(long, env = "CLOUDPIPE_VM_SNAPSHOT_DIR")]
    vm_snapshot_dir: Option<PathBuf>,
}

/// The JS runner (guest-runners/js), pre-initialised, as `guest-runners/js/build.sh`
/// makes it. It is committed (`guest-runners/js/runner-js.wasm`) rather than built
/// here: QuickJS's C code needs clang and wasi-libc, which a machine running `cargo
/// install` may lack. `.ci/run` rebuilds it from source and runs the JS SDK's suite on
/// the rebuilt one.
const RUNNER_JS: &[u8] = include_bytes!("../../guest-runners/js/runner-js.wasm");

/// The vm executor's guest agent, built by the build script (empty when it could not
/// be built there: the vm executor then says so).
const VM_AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cloudpipe-vm-agent"));

impl VmArgs {
    /// Fills `c`; the built-in agent is written under `data_dir` (by content, once).
    fn configure(
        &self,
        c: &mut cloudpipe_runtime::executor::vm::VmConfig,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<()> {
        c.qemu = self.vm_qemu.clone();
        c.kernel = self.vm_kernel.clone();
        c.busybox = self.vm_busybox.clone();
        c.memory_mb = self.vm_memory_mb;
        c.pool_size = self.vm_pool;
        c.accel = Some(self.vm_accel.clone());
        c.snapshot_dir = self.vm_snapshot_dir.clone();
        c.agent = match &self.vm_agent {
            Some(p) => Some(p.clone()),
            None if VM_AGENT.is_empty() => None,
            None => Some(write_by_content(&data_dir.join("vm"), "cloudpipe-vm-agent", VM_AGENT)?),
        };
        Ok(())
    }
}

/// Writes `bytes` as `dir/NAME-HASH` unless there already, executable; its path.
fn write_by_content(dir: &std::path::Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
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

/// Either listener `serve` can run on.
enum Listener {
    Plain(tokio::net::TcpListener),
    Tls(cloudpipe_api::tls::TlsListener),
}

impl Listener {
    async fn serve(
        self,
        state: AppState,
        signal: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        match self {
            Listener::Plain(l) => cloudpipe_api::serve(l, state, signal).await,
            Listener::Tls(l) => cloudpipe_api::serve(l, state, signal).await,
        }
    }
}

/// The host name and a random suffix, so that a node restarted on the same host is a
/// new node (the old one's jobs go back to the queue when its leases run out).
fn default_node_name() -> String {
    let id = cloudpipe_runtime::JobId::new().to_bytes();
    format!("{}-{}", cloudpipe_api::host_name(), hex::encode(&id[12..]))
}

fn default_data_dir() -> PathBuf {
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) => PathBuf::from(d).join("cloudpipe"),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".local/share/cloudpipe"),
            None => PathBuf::from("cloudpipe-data"),
        },
    }
}

impl ServeArgs {
    fn runtime_config(&self, url: &str) -> anyhow::Result<RuntimeConfig> {
        anyhow::ensure!(
            (1..=100_000).contains(&self.concurrency),
            "--concurrency must be 1 to 100000"
        );
        anyhow::ensure!(
            (1..=100_000).contains(&self.max_invocations),
            "--max-invocations must be 1 to 100000"
        );
        anyhow::ensure!(self.fn_max_concurrency >= 1, "--fn-max-concurrency must be at least 1");
        anyhow::ensure!(
            self.max_memory_mb <= 1 << 20 && self.fn_memory_mb <= 1 << 20,
            "memory caps are at most 1048576 MiB"
        );
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
        let mut c = RuntimeConfig::new(&self.data_dir);
        let role = cloudpipe_runtime::cluster::Role::parse(&self.role).context("unknown --role")?;
        if self.store.starts_with("postgres://") || self.store.starts_with("postgresql://") {
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
            let mut node = cloudpipe_runtime::cluster::NodeConfig::new(name);
            node.role = role;
            node.advertise_url =
                Some(self.advertise_url.clone().unwrap_or_else(|| url.to_string()));
            node.lease = Duration::from_millis(self.lease_ms);
            node.max_connections = self.db_connections;
            c.postgres = Some(cloudpipe_runtime::store::postgres::PgConfig {
                url: self.store.clone(),
                schema: None,
                node,
            });
        } else {
            c.backend = Backend::parse(&self.store).with_context(|| {
                format!("--store {:?}: use redb, sled or a postgres:// URL", self.store)
            })?;
            anyhow::ensure!(
                role == cloudpipe_runtime::cluster::Role::All,
                "--role {} needs a PostgreSQL store (--store postgres://…): one machine does everything",
                self.role
            );
        }
        let s = &mut c.scheduler;
        s.concurrency = self.concurrency;
        s.default_timeout = Duration::from_millis(self.default_timeout_ms);
        s.max_timeout = Duration::from_millis(self.max_timeout_ms);
        s.default_memory_mb = self.default_memory_mb;
        s.max_memory_mb = self.max_memory_mb;
        s.output_cap = self.output_cap;
        s.retention = Retention {
            max_age_micros: self.retention_secs * 1_000_000,
            max_finished: self.retention_max_jobs,
        };
        c.egress =
            cloudpipe_runtime::egress::EgressConfig::parse_internal(&self.allow_internal_outbound)
                .map_err(|e| anyhow::anyhow!("--allow-internal-outbound: {e}"))?;
        if let Some(path) = &self.secrets_key_file {
            c.secrets.key_file = path.clone();
        }
        anyhow::ensure!(
            (1..=1 << 20).contains(&self.docker_tmp_mb),
            "--docker-tmp-mb must be 1 to 1048576"
        );
        c.space.reserve_bytes = self.min_free_disk_mb << 20;
        c.docker.tmp_size = format!("{}m", self.docker_tmp_mb);
        c.secrets.max_per_account = self.max_secrets;
        c.secrets.max_value_bytes = self.max_secret_bytes;
        // Jobs and invocations share the instance pool.
        c.wasm.max_instances = (self.concurrency + self.max_invocations) as u32;
        self.vm.configure(&mut c.vm, &self.data_dir)?;
        c.docker.pull = PullPolicy::parse(&self.docker_pull).context("unknown --docker-pull")?;
        c.docker.registries = self
            .docker_registries
            .iter()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        Ok(c)
    }

    fn api_config(&self) -> ApiConfig {
        let some = |v: u64| (v > 0).then_some(v);
        ApiConfig {
            admin_key: self.admin_key.clone(),
            default_quotas: cloudpipe_types::Quotas {
                max_concurrent_jobs: some(self.quota_concurrent_jobs),
                max_timeout_ms: some(self.quota_timeout_ms),
                max_memory_mb: some(self.quota_memory_mb),
                max_function_bytes: some(self.quota_function_bytes),
            },
            external_auth: self
                .auth_url
                .clone()
                .map(|u| (u, Duration::from_secs(self.auth_cache_secs))),
            auth_failures_per_minute: self.auth_failures_per_minute,
            v1_image: self.v1_image.clone(),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            cors_origins: self.cors_origins.clone(),
            invoke: InvokeConfig {
                max_concurrency_per_function: self.fn_max_concurrency,
                max_concurrency: self.max_invocations,
                timeout: Duration::from_millis(self.fn_timeout_ms),
                memory_bytes: self.fn_memory_mb << 20,
                max_concurrency_per_account: self.fn_max_concurrency_per_account.max(1),
                body_timeout: Duration::from_millis(self.fn_body_timeout_ms),
                ..InvokeConfig::default()
            },
            ..ApiConfig::default()
        }
    }

    /// Opens everything and binds the listener; also returns the task loading the
    /// built-in runners.
    async fn start(
        &self,
    ) -> anyhow::Result<(Listener, AppState, String, tokio::task::JoinHandle<()>)> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(cloudpipe_api::tls::server_config(cert, key)?),
            _ => None,
        };
        // Bound first: a cluster node advertises the address it got.
        let tcp = tokio::net::TcpListener::bind(self.listen).await.with_context(|| {
            format!("cannot listen on {} (use --listen to pick another address)", self.listen)
        })?;
        let addr = tcp.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = match addr.ip().is_unspecified() {
            true => std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port()),
            false => addr,
        };
        let url = format!("{scheme}://{host}");
        let config = self.runtime_config(&url)?;
        let runtime = Runtime::start(config).await?;
        let state = AppState::new(runtime, self.api_config())?;
        let boot = cloudpipe_api::auth::bootstrap(&state, self.admin_key.as_deref()).await?;
        // The JS runner is compiled (on a first start; later the compiled cache has
        // it) in the background: `/healthz` does not wait for it.
        let js = match &self.runner_js {
            Some(path) => std::fs::read(path)
                .with_context(|| format!("reading the JS runner {}", path.display()))?
                .into(),
            None => bytes::Bytes::from_static(RUNNER_JS),
        };
        let rt = state.runtime.clone();
        let runners = if self.no_runner_js {
            let why = Unready::new("turned off by --no-runner-js", "start without that flag");
            rt.runner_unready("runner:js", why);
            tokio::spawn(async {})
        } else {
            rt.runner_unready(
                "runner:js",
                Unready::reason("loading: the runner is being compiled"),
            );
            tokio::spawn(async move {
                match rt.add_runner("runner:js", js).await {
                    Ok(id) => tracing::info!(id = %id, "built-in function runner:js ready"),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "the JS runner failed to load");
                        rt.runner_unready("runner:js", Unready::reason(format!("{e:#}")));
                    }
                }
            })
        };
        if let Some(key) = boot.new_admin_key {
            let path = self
                .credentials_file
                .clone()
                .unwrap_or_else(cloudpipe_api::credentials::default_path);
            let creds = cloudpipe_api::credentials::Credentials {
                url: url.clone(),
                account: cloudpipe_runtime::account::ADMIN.into(),
                api_key: key.clone(),
            };
            cloudpipe_api::credentials::write(&path, &creds)?;
            // Shown once, on the terminal, not through the log.
            println!(
                "Created the admin account. Its API key (shown only now):

    {key}
"
            );
            println!(
                "Saved to {} (mode 0600) for the CLIs.
",
                path.display()
            );
        }
        let listener = match tls {
            Some(config) => Listener::Tls(cloudpipe_api::tls::TlsListener::new(tcp, config)?),
            None => Listener::Plain(tcp),
        };
        tracing::info!(listen = %addr, url = %url, data_dir = %self.data_dir.display(), store = state.runtime.store.backend(), node = %state.node, role = %self.role, auth = state.auth.backend().name(), "cloudpipe serving");
        Ok((listener, state, url, runners))
    }
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed here, before the server
/// says it is serving, so that a signal sent right after that line is never missed
/// (which would kill the process without a clean shutdown).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    })
}

/// The bundled example: a WASI module, kept as WAT source.
const HELLO_WAT: &str = include_str!("../../examples/hello.wat");

/// The executors table `up` prints, one line per executor and runner (and the fix
/// under one that is not ready).
fn executors_table(list: &cloudpipe_types::ExecutorList) -> String {
    let width = list.executors.iter().map(|e| e.name.len()).max().unwrap_or(0);
    let mut out = String::from("executors:\n");
    for e in &list.executors {
        match (&e.reason, &e.fix) {
            (None, _) => out += &format!("  {:width$}  ready\n", e.name),
            (Some(reason), fix) => {
                out += &format!("  {:width$}  not ready: {reason}\n", e.name);
                if let Some(fix) = fix {
                    out += &format!("  {:width$}  fix: {fix}\n", "");
                }
            }
        }
    }
    out
}

/// How to call `program` from a new shell: its bare name when `PATH` finds this very
/// binary there, else its full path.
fn command_name(program: &str) -> String {
    let exe = std::env::current_exe().ok().and_then(|p| p.canonicalize().ok());
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok());
    match (exe, on_path) {
        (Some(e), Some(p)) if e == p => program.to_string(),
        (Some(e), _) => e.display().to_string(),
        _ => program.to_string(),
    }
}

async fn up(args: ServeArgs, once: bool) -> anyhow::Result<()> {
    let signal = shutdown_signal()?;
    let (listener, state, url, runners) = args.start().await?;
    // The table shows the runners loaded (or why not).
    let _ = runners.await;
    let rt = state.runtime.clone();
    let executors = cloudpipe_api::routes::system::executor_list(&rt).await;
    println!("{}", executors_table(&executors));
    let admin = Tenant::admin();
    let wasm = wat::parse_str(HELLO_WAT).context("compiling the bundled example")?;
    let f = rt
        .registry
        .upload(&admin, Some("hello".into()), wasm.into())
        .await
        .context("uploading the example")?;
    let spec =
        JobSpec { function: "hello".into(), args: vec!["cloudpipe".into()], ..JobSpec::default() };
    let job = rt
        .scheduler
        .submit(spec, &admin)
        .await
        .context("submitting the example job")?
        .job()
        .clone();
    let done = rt
        .scheduler
        .wait(job.id, Duration::from_secs(30))
        .await?
        .context("the example job vanished")?;
    let r = done.to_record();
    println!("function hello ({}) ran as job {}: {}", f.id, r.id, r.status.as_str());
    print!("{}", r.stdout);
    println!("queued {:.3} ms, ran {:.3} ms", r.queue_ms.unwrap_or(0.0), r.run_ms.unwrap_or(0.0));
    anyhow::ensure!(r.exit_code == Some(0), "the example job failed: {r:?}");
    if once {
        rt.scheduler.shutdown(Duration::from_secs(5)).await;
        return Ok(());
    }
    println!("\nserving on {url} (Ctrl-C to stop).");
    let creds =
        args.credentials_file.clone().unwrap_or_else(cloudpipe_api::credentials::default_path);
    let saved = cloudpipe_api::credentials::read(&creds).ok().flatten();
    let cloudpipe = command_name("cloudpipe");
    if saved.is_some_and(|c| c.url == url) {
        // The CLIs find this server and the admin's key in the credentials file.
        let env = match creds == cloudpipe_api::credentials::home_path() {
            true => String::new(),
            false => format!("CLOUDPIPE_CREDENTIALS={} ", creds.display()),
        };
        println!("Next, in another shell (the CLIs read {}):", creds.display());
        println!("  {env}{cloudpipe} me");
        println!(
            "  {env}cargo cloudpipe new hello && cd hello && {env}cargo cloudpipe submit -- world"
        );
    } else {
        println!("Next, in another shell, with the admin's key:");
        println!("  CLOUDPIPE_URL={url} CLOUDPIPE_API_KEY=<the admin's key> {cloudpipe} me");
    }
    listener.serve(state, signal).await
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,cranelift=warn,wasmtime=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Spans (all at debug level: off by default) log their busy and idle time as
        // they close: how `BENCHMARKS.md` breaks a submit down.
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let signal = shutdown_signal()?;
                let (listener, state, _, _) = args.start().await?;
                listener.serve(state, signal).await
            }
            Command::Up { serve, once } => up(serve, once).await,
            Command::Accounts { client, command } => accounts(client, command).await,
            Command::Keys { client, command } => keys(client, command).await,
            Command::Me { client } => client.call(reqwest::Method::GET, "/v1/me", None).await,
            Command::Secrets { client, command } => secrets(client, command).await,
            Command::Batch(args) => {
                let code = batch(args).await?;
                std::process::exit(code);
            }
            Command::Admin { command: AdminCommand::ResetKey { data_dir, store, account } } => {
                reset_key(&data_dir, &store, &account).await
            }
        }
    })
}

impl ClientArgs {
    /// URL and key: flags and environment first, then the credentials file.
    fn resolve(&self) -> anyhow::Result<(String, String)> {
        let path = cloudpipe_api::credentials::default_path();
        let file = cloudpipe_api::credentials::read(&path)?;
        let url = self
            .url
            .clone()
            .or_else(|| file.as_ref().map(|c| c.url.clone()))
            .unwrap_or_else(|| "http://127.0.0.1:7070".into());
        let key = self.api_key.clone().or_else(|| file.map(|c| c.api_key)).with_context(|| {
            format!(
                "no API key: pass --api-key, set CLOUDPIPE_API_KEY, or keep one in {}",
                path.display()
            )
        })?;
        Ok((url.trim_end_matches('/').to_string(), key))
    }

    /// One request; prints the JSON answer, or the error's message (exit code 1).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<()> {
        let (url, key) = self.resolve()?;
        let mut req =
            reqwest::Client::new().request(method, format!("{url}{path}")).bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.with_context(|| format!("cannot reach the server at {url}"))?;
        let status = res.status();
        let value: serde_json::Value = res.json().await.unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let msg = value["error"]["message"].as_str().unwrap_or("no message");
            let code = value["error"]["code"].as_str().unwrap_or("unknown");
            anyhow::bail!("{status}: {msg} ({code})");
        }
        // A 204 (a delete) has nothing to print.
        if !value.is_null() {
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Ok(())
    }
}

async fn accounts(client: ClientArgs, command: AccountsCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    use serde_json::json;
    match command {
        AccountsCommand::Create {
            name,
            admin,
            max_concurrent_jobs,
            max_timeout_ms,
            max_memory_mb,
            max_function_bytes,
        } => {
            let quotas = cloudpipe_types::Quotas {
                max_concurrent_jobs,
                max_timeout_ms,
                max_memory_mb,
                max_function_bytes,
            };
            let role = if admin { "admin" } else { "user" };
            let body = json!({"name": name, "role": role, "quotas": quotas});
            client.call(Method::POST, "/v1/accounts", Some(body)).await
        }
        AccountsCommand::List => client.call(Method::GET, "/v1/accounts", None).await,
        AccountsCommand::Show { name } => {
            client.call(Method::GET, &format!("/v1/accounts/{name}"), None).await
        }
        AccountsCommand::Disable { name } => {
            let body = json!({"disabled": true});
            client.call(Method::PATCH, &format!("/v1/accounts/{name}"), Some(body)).await
        }
        AccountsCommand::Enable { name } => {
            let body = json!({"disabled": false});
            client.call(Method::PATCH, &format!("/v1/accounts/{name}"), Some(body)).await
        }
    }
}

async fn secrets(client: ClientArgs, command: SecretsCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        SecretsCommand::Put { name } => {
            use std::io::Read;
            let mut value = String::new();
            std::io::stdin().read_to_string(&mut value).context("reading the value from stdin")?;
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            let body = serde_json::json!({ "value": value });
            client.call(Method::PUT, &format!("/v1/secrets/{name}"), Some(body)).await
        }
        SecretsCommand::List => client.call(Method::GET, "/v1/secrets", None).await,
        SecretsCommand::Rm { name } => {
            client.call(Method::DELETE, &format!("/v1/secrets/{name}"), None).await
        }
    }
}

async fn keys(client: ClientArgs, command: KeysCommand) -> anyhow::Result<()> {
    use reqwest::Method;
    match command {
        KeysCommand::Create { account, label } => {
            let body = serde_json::json!({ "label": label });
            client.call(Method::POST, &format!("/v1/accounts/{account}/keys"), Some(body)).await
        }
        KeysCommand::List { account } => {
            client.call(Method::GET, &format!("/v1/accounts/{account}/keys"), None).await
        }
        KeysCommand::Revoke { id } => {
            client.call(Method::DELETE, &format!("/v1/keys/{id}"), None).await
        }
    }
}

/// `cloudpipe admin reset-key`: a new key for `account`, written to the store of a
/// stopped server and printed once.
async fn reset_key(data_dir: &std::path::Path, store: &str, account: &str) -> anyhow::Result<()> {
    let backend = Backend::parse(store).context("unknown --store")?;
    let dir = data_dir.join("store").join(backend.as_str());
    anyhow::ensure!(
        dir.exists(),
        "no {store} store in {} (is --data-dir right?)",
        data_dir.display()
    );
    let store = tokio::task::spawn_blocking(move || cloudpipe_runtime::store::open(backend, &dir))
        .await?
        .context("opening the store (stop the server first: it holds the store's lock)")?;
    let record = store
        .get_account(account)
        .await?
        .with_context(|| format!("there is no account {account:?} in this store"))?;
    anyhow::ensure!(!record.disabled, "account {account:?} is disabled: enable it first");
    let key = cloudpipe_api::auth::generate_key();
    let record = cloudpipe_api::auth::key_record(account, &key, Some("admin reset-key".into()));
    anyhow::ensure!(store.insert_key(record.clone()).await?, "the account vanished");
    eprintln!("Added key {} to account {account:?}. Its secret (shown only now):", record.id);
    println!("{key}");
    Ok(())
}

/// `cloudpipe batch`: starts (or resumes, or retries) a batch and follows it to the end.
/// Returns the process's exit code.
async fn batch(args: BatchArgs) -> anyhow::Result<i32> {
    use std::io::{IsTerminal, Read, Write};
    let (url, key) = args.client.resolve()?;
    let http = reqwest::Client::new();
    let send = |req: reqwest::RequestBuilder| {
        let key = key.clone();
        async move {
            let res = req.bearer_auth(key).send().await.context("cannot reach the server")?;
            let status = res.status();
            let v: serde_json::Value = res.json().await.unwrap_or_default();
            if !status.is_success() {
                anyhow::bail!(
                    "{status}: {} ({})",
                    v["error"]["message"].as_str().unwrap_or("no message"),
                    v["error"]["code"].as_str().unwrap_or("unknown")
                );
            }
            Ok(v)
        }
    };
    let created = if let Some(id) = &args.resume {
        send(http.post(format!("{url}/v1/batches/{id}/resume"))).await?
    } else if let Some(id) = &args.retry {
        send(http.post(format!("{url}/v1/batches/{id}/retry"))).await?
    } else {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).context("reading inputs from stdin")?;
        let timeout_ms = match &args.timeout {
            Some(t) => Some(
                cloudpipe_api::parse_wait(t)
                    .map_err(|e| anyhow::anyhow!("--timeout: {e}"))?
                    .as_millis() as u64,
            ),
            None => None,
        };
        let spec = serde_json::json!({
            "template": {"function": args.function, "args": args.args},
            "input_text": input,
            "split": args.split,
            "retries": args.retries,
            "timeout_ms": timeout_ms,
            "strikes": args.strikes,
            "hook": args.hook,
        });
        send(http.post(format!("{url}/v1/batches")).json(&spec)).await?
    };
    let id = created["id"].as_str().context("the server sent no batch id")?.to_string();
    eprintln!("batch {id}: {} inputs, split {}", created["total"], created["split"]);
    let tty = std::io::stderr().is_terminal();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut last_line = String::new();
    let mut last_print = std::time::Instant::now();
    let done = loop {
        let b = send(http.get(format!("{url}/v1/batches/{id}"))).await?;
        let c = &b["counts"];
        let total = b["total"].as_u64().unwrap_or(0);
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        let finished = n("ok") + n("failed") + n("timed_out") + n("cancelled");
        let line = format!(
            "{} ok, {} failed, {} timed out, {} running, {} pending",
            n("ok"),
            n("failed"),
            n("timed_out"),
            n("running"),
            n("pending")
        );
        if tty {
            let width = 30usize;
            let filled = (finished as usize * width).checked_div(total as usize).unwrap_or(0);
            eprint!(
                "\r[{}{}] {finished}/{total}  {line}   ",
                "#".repeat(filled),
                ".".repeat(width - filled)
            );
            let _ = std::io::stderr().flush();
        } else if line != last_line && last_print.elapsed() >= Duration::from_secs(1) {
            eprintln!("{line}");
            last_print = std::time::Instant::now();
        }
        last_line = line;
        if b["status"] != "running" {
            break b;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut ctrl_c => {
                eprintln!("\ncancelling batch {id} ...");
                send(http.post(format!("{url}/v1/batches/{id}/cancel"))).await?;
                eprintln!("cancelled; run what is left with: cloudpipe batch --resume {id}");
                return Ok(130);
            }
        }
    };
    if tty {
        eprintln!();
    }
    let c = &done["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let total = done["total"].as_u64().unwrap_or(0);
    let ok = n("ok");
    let summary = if ok == total {
        format!("{ok}/{total} OK")
    } else {
        format!(
            "{ok}/{total} !OK - {} pending, {} timeouts, {} errors, {ok} OK",
            n("pending"),
            n("timed_out"),
            n("failed") + n("cancelled")
        )
    };
    println!("{summary}");
    eprintln!(
        "batch {id} {}: wall {:.1} s, job time {:.1} s, efficiency {:.0}%",
        done["status"].as_str().unwrap_or("?"),
        done["wall_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        done["job_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        done["efficiency"].as_f64().unwrap_or(0.0) * 100.0
    );
    Ok(if ok == total { 0 } else { 1 })
}
