//! `cloudpipe serve` and `cloudpipe up`: open the runtime, bind the listener, load the
//! built-in runners, write the admin's credentials on a first start, serve until
//! SIGTERM or Ctrl-C.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cloudpipe::Credentials;
use cloudpipe_api::AppState;
use cloudpipe_runtime::Runtime;
use cloudpipe_runtime::account::Tenant;
use cloudpipe_runtime::executor::Unready;
use cloudpipe_types::JobSpec;

use crate::flags::ServeArgs;

/// The JS runner (guest-runners/js), pre-initialised, as `guest-runners/js/build.sh`
/// makes it. It is committed (`guest-runners/js/runner-js.wasm`) rather than built
/// here: QuickJS's C code needs clang and wasi-libc, which a machine running `cargo
/// install` may lack. `.ci/run` rebuilds it from source and runs the JS SDK's suite on
/// the rebuilt one.
const RUNNER_JS: &[u8] = include_bytes!("../../../../guest-runners/js/runner-js.wasm");

/// The vm executor's guest agent, built by the build script (empty when it could not
/// be built there: the vm executor then says so).
const VM_AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cloudpipe-vm-agent"));

/// The bundled example: a WASI module, kept as WAT source.
const HELLO_WAT: &str = include_str!("../../../../examples/hello.wat");

/// `cloudpipe serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let signal = shutdown_signal()?;
    let started = start(&args).await?;
    started.listener.serve(started.state, signal).await
}

/// A server opened and bound, not yet serving.
struct Started {
    listener: Listener,
    state: AppState,
    /// Where clients reach it.
    url: String,
    /// Loads the built-in runners in the background.
    runners: tokio::task::JoinHandle<()>,
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
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        match self {
            Listener::Plain(l) => cloudpipe_api::serve(l, state, signal).await,
            Listener::Tls(l) => cloudpipe_api::serve(l, state, signal).await,
        }
    }
}

/// Where the first start writes the admin's credentials.
fn credentials_path(args: &ServeArgs) -> PathBuf {
    args.auth
        .credentials_file
        .clone()
        .or_else(Credentials::path)
        .unwrap_or_else(|| PathBuf::from("cloudpipe").join("credentials.json"))
}

/// Opens everything and binds the listener.
async fn start(args: &ServeArgs) -> anyhow::Result<Started> {
    let tls = match (&args.tls.tls_cert, &args.tls.tls_key) {
        (Some(cert), Some(key)) => Some(cloudpipe_api::tls::server_config(cert, key)?),
        _ => None,
    };
    // Bound first: a cluster node advertises the address it got.
    let tcp = tokio::net::TcpListener::bind(args.listen).await.with_context(|| {
        format!("cannot listen on {} (use --listen to pick another address)", args.listen)
    })?;
    let addr = tcp.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let host = match addr.ip().is_unspecified() {
        true => std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port()),
        false => addr,
    };
    let url = format!("{scheme}://{host}");
    let config = args.runtime_config(&url, VM_AGENT)?;
    let runtime = Runtime::start(config).await?;
    let state = AppState::new(runtime, args.api_config())?;
    let boot = cloudpipe_api::auth::bootstrap(&state, args.auth.admin_key.as_deref()).await?;
    let runners = load_runners(args, &state)?;
    if let Some(key) = boot.new_admin_key {
        let path = credentials_path(args);
        let creds = Credentials {
            url: Some(url.clone()),
            account: Some(cloudpipe_runtime::account::ADMIN.into()),
            api_key: Some(key.clone()),
        };
        creds.save(&path)?;
        // Shown once, on the terminal, not through the log.
        println!("Created the admin account. Its API key (shown only now):\n\n    {key}\n");
        println!("Saved to {} (mode 0600) for the CLIs.\n", path.display());
    }
    let listener = match tls {
        Some(config) => Listener::Tls(cloudpipe_api::tls::TlsListener::new(tcp, config)?),
        None => Listener::Plain(tcp),
    };
    tracing::info!(listen = %addr, url = %url, data_dir = %args.data_dir.display(), store = state.runtime.store.backend(), node = %state.node, role = %args.cluster.role, auth = state.auth.backend().name(), "cloudpipe serving");
    Ok(Started { listener, state, url, runners })
}

/// Registers the built-in runners. The JS runner is compiled (on a first start; later
/// the compiled cache has it) in the background: `/healthz` does not wait for it.
fn load_runners(args: &ServeArgs, state: &AppState) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let rt = state.runtime.clone();
    if args.executors.no_runner_js {
        let why = Unready::new("turned off by --no-runner-js", "start without that flag");
        rt.runner_unready("runner:js", why);
        return Ok(tokio::spawn(async {}));
    }
    let js = match &args.executors.runner_js {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading the JS runner {}", path.display()))?
            .into(),
        None => bytes::Bytes::from_static(RUNNER_JS),
    };
    rt.runner_unready("runner:js", Unready::reason("loading: the runner is being compiled"));
    Ok(tokio::spawn(async move {
        match rt.add_runner("runner:js", js).await {
            Ok(id) => tracing::info!(id = %id, "built-in function runner:js ready"),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the JS runner failed to load");
                rt.runner_unready("runner:js", Unready::reason(format!("{e:#}")));
            }
        }
    }))
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed here, before the server
/// says it is serving, so that a signal sent right after that line is never missed
/// (which would kill the process without a clean shutdown).
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
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

/// `cloudpipe up`: serves, runs the bundled example once and prints what to do next.
pub async fn up(args: ServeArgs, once: bool) -> anyhow::Result<()> {
    let signal = shutdown_signal()?;
    let Started { listener, state, url, runners } = start(&args).await?;
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
    let creds = credentials_path(&args);
    let saved = Credentials::load(&creds).ok().flatten();
    let cloudpipe = command_name("cloudpipe");
    if saved.is_some_and(|c| c.url.as_deref() == Some(url.as_str())) {
        // The CLIs find this server and the admin's key in the credentials file.
        let env = match Some(&creds) == Credentials::home_path().as_ref() {
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
