//! The `cloudpipe` binary: `serve` runs the API; `up` serves and runs the bundled
//! example function end to end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use cloudpipe_api::routes::invoke::InvokeConfig;
use cloudpipe_api::{ApiConfig, AppState};
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
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CLOUDPIPE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where the store and the compiled-function cache live.
    #[arg(long, env = "CLOUDPIPE_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Store backend: redb (default) or sled.
    #[arg(long, env = "CLOUDPIPE_STORE", default_value = "redb", value_parser = ["redb", "sled"])]
    store: String,
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
    /// Fixes the admin API key (for automation); used once accounts exist.
    #[arg(long, env = "CLOUDPIPE_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
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
    fn runtime_config(&self) -> anyhow::Result<RuntimeConfig> {
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
        c.backend = Backend::parse(&self.store).context("unknown --store")?;
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
        // Jobs and invocations share the instance pool.
        c.wasm.max_instances = (self.concurrency + self.max_invocations) as u32;
        Ok(c)
    }

    fn api_config(&self) -> ApiConfig {
        ApiConfig {
            admin_key: self.admin_key.clone(),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            invoke: InvokeConfig {
                max_concurrency_per_function: self.fn_max_concurrency,
                max_concurrency: self.max_invocations,
                timeout: Duration::from_millis(self.fn_timeout_ms),
                memory_bytes: self.fn_memory_mb << 20,
                ..InvokeConfig::default()
            },
            ..ApiConfig::default()
        }
    }

    async fn start(&self) -> anyhow::Result<(tokio::net::TcpListener, AppState)> {
        let config = self.runtime_config()?;
        let runtime = Runtime::start(config).await?;
        let listener = tokio::net::TcpListener::bind(self.listen).await.with_context(|| {
            format!("cannot listen on {} (use --listen to pick another address)", self.listen)
        })?;
        let api = self.api_config();
        tracing::info!(listen = %listener.local_addr()?, data_dir = %self.data_dir.display(), store = %self.store, "cloudpipe serving");
        Ok((listener, AppState::new(runtime, api)))
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

async fn up(args: ServeArgs, once: bool) -> anyhow::Result<()> {
    let signal = shutdown_signal()?;
    let (listener, state) = args.start().await?;
    let addr = listener.local_addr()?;
    let rt = state.runtime.clone();
    let wasm = wat::parse_str(HELLO_WAT).context("compiling the bundled example")?;
    let f = rt
        .registry
        .upload(Some("hello".into()), wasm.into())
        .await
        .context("uploading the example")?;
    let spec =
        JobSpec { function: "hello".into(), args: vec!["cloudpipe".into()], ..JobSpec::default() };
    let job = rt.scheduler.submit(spec).await.context("submitting the example job")?.job().clone();
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
    println!("\nserving on http://{addr} (Ctrl-C to stop). Try:");
    println!(
        "  curl -s -XPOST 'http://{addr}/v1/jobs?wait=10s' -d '{{\"function\":\"hello\",\"args\":[\"you\"]}}'"
    );
    cloudpipe_api::serve(listener, state, signal).await
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,cranelift=warn,wasmtime=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let signal = shutdown_signal()?;
                let (listener, state) = args.start().await?;
                cloudpipe_api::serve(listener, state, signal).await
            }
            Command::Up { serve, once } => up(serve, once).await,
        }
    })
}
