//! `cargo cloudpipe`: build, submit, deploy and follow Cloudpipe functions from a Rust
//! crate.
//!
//! Installed with `cargo install --path sdk-rust/cargo-cloudpipe`, cargo runs it as
//! `cargo cloudpipe ARGS` (argv then starts with `cloudpipe`, which is skipped).
//!
//! # Layout
//! - `main`: the command line and each command.
//! - `build`: `cargo build --release --target wasm32-wasip1` (jobs) or `wasm32-wasip2`
//!   (HTTP functions) and the binary it made.
//! - `scaffold`: `new` (command, typed and HTTP crates).
//! - `follow`: live output of a job, Ctrl-C to cancel, its exit code.
//! - `ui`: errors explained (the status lines and spinner are `cloudpipe-cli`'s).
//!
//! `batch` (one function over many inputs, its progress and summary) is the
//! `cloudpipe-cli` crate's, shared with the server's `cloudpipe batch`.
//!
//! Exit codes: the job's own for `submit` and `result` (130 when it was cancelled);
//! for `batch` 0 when every input succeeded, 1 otherwise, 130 on Ctrl-C; 2 when
//! `cargo cloudpipe` itself failed.

mod build;
mod follow;
mod scaffold;
mod ui;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use cloudpipe::{
    Client, Config, Credentials, FunctionSettingsPatch, Invocation, JobQuery, JobSpec, JobStatus,
};

use crate::build::BuildArgs;
use crate::follow::{Interrupts, OnInterrupt};
use crate::ui::Ui;

/// Build, submit, deploy and follow Cloudpipe functions from a Rust crate.
#[derive(Parser)]
#[command(name = "cargo cloudpipe", bin_name = "cargo cloudpipe", version)]
struct Cli {
    /// The server (else CLOUDPIPE_URL, the credentials file, http://127.0.0.1:7070).
    #[arg(long, global = true, env = "CLOUDPIPE_URL", value_name = "URL")]
    url: Option<String>,
    /// The API key (else CLOUDPIPE_API_KEY, the credentials file).
    #[arg(
        long,
        global = true,
        env = "CLOUDPIPE_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,
    /// No status lines on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a function crate (a command; --typed or --http for the other styles).
    New(NewArgs),
    /// Build the crate for wasm32-wasip1, upload it, run it as a job and stream its
    /// output; exits with the job's exit code.
    Submit(SubmitArgs),
    /// Build the crate and upload it as an HTTP function; prints its URL.
    Deploy(DeployArgs),
    /// Call a function over HTTP and print the answer's body.
    Invoke(InvokeArgs),
    /// List jobs, newest first.
    Jobs(JobsArgs),
    /// Print a job's output, following it live while it runs.
    Logs {
        /// The job's id.
        job: String,
    },
    /// Print a job's stdout once it has ended; exits with its exit code.
    Result {
        /// The job's id.
        job: String,
        /// Print the job's whole record as JSON instead.
        #[arg(long)]
        json: bool,
        /// Do not wait for a running job: print what it is now.
        #[arg(long)]
        no_wait: bool,
    },
    /// Cancel a job.
    Cancel {
        /// The job's id.
        job: String,
    },
    /// Store the server's URL and an API key in the credentials file.
    Login(LoginArgs),
    /// Run a function once per line of stdin (its words appended to the arguments),
    /// a few at a time; prints `x/y OK` at the end and exits 0 only if all succeeded.
    Batch(BatchArgs),
}

/// `cargo cloudpipe batch`: the shared batch command, its function named or built
/// from the crate here.
#[derive(Args)]
#[command(group(
    clap::ArgGroup::new("function_source")
        .args(["function", "name", "manifest_path", "bin"])
        .multiple(true)
        .conflicts_with_all(["resume", "retry"])
))]
struct BatchArgs {
    #[command(flatten)]
    build: BuildArgs,
    /// The function every input runs (default: build the crate here and upload it,
    /// as `submit` does).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["manifest_path", "bin", "name"])]
    function: Option<String>,
    /// Name to upload the crate under when there is no --function (default: the
    /// binary's name).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    batch: cloudpipe_cli::batch::BatchFlags,
}

#[derive(Args)]
struct NewArgs {
    /// The crate's name (and directory): a-z, 0-9, `_` and `-`.
    name: String,
    /// Typed functions (`#[cloudpipe_guest::function]`): JSON arguments, JSON result.
    #[arg(long, conflicts_with = "http")]
    typed: bool,
    /// An HTTP function in the CGI style, for `deploy`.
    #[arg(long)]
    http: bool,
    /// Use the cloudpipe-guest crate at this path (else the checkout this tool was
    /// built from, else crates.io).
    #[arg(long, env = "CLOUDPIPE_GUEST_PATH", value_name = "DIR")]
    guest_path: Option<PathBuf>,
}

#[derive(Args)]
struct SubmitArgs {
    #[command(flatten)]
    build: BuildArgs,
    /// Name to upload the function under (default: the binary's name).
    #[arg(long)]
    name: Option<String>,
    /// Call this typed function: the ARGS are its arguments, each JSON or else a string.
    #[arg(long = "fn", value_name = "FUNCTION")]
    function: Option<String>,
    /// Wait for the end and print the output then, instead of streaming it live.
    #[arg(long, conflicts_with = "detach")]
    wait: bool,
    /// Print the job's id and return at once.
    #[arg(long)]
    detach: bool,
    /// An environment variable for the job (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// A file to give the job as stdin (`-` for this program's stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "function")]
    stdin: Option<PathBuf>,
    /// Limit of the job's run, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Memory cap of the job, in MiB.
    #[arg(long)]
    memory_mb: Option<u64>,
    /// A tag for the job (repeatable).
    #[arg(long)]
    tag: Vec<String>,
    /// Build a WASI 0.2 component (wasm32-wasip2) instead of a WASI module
    /// (wasm32-wasip1), for crates that use WASI 0.2 interfaces. Its exit code is only
    /// 0 or 1 unless it calls `cloudpipe_guest::exit`.
    #[arg(long)]
    component: bool,
    /// Arguments of the job (after `--` when they start with `-`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(Args)]
struct DeployArgs {
    #[command(flatten)]
    build: BuildArgs,
    /// Name to deploy under (default: the binary's name); the URL is /fn/NAME.
    #[arg(long)]
    name: Option<String>,
    /// Invocable without an API key.
    #[arg(long)]
    public: bool,
}

#[derive(Args)]
struct InvokeArgs {
    /// The function's name.
    name: String,
    /// The path below the function, with any query (`/items?x=1`).
    #[arg(default_value = "")]
    path: String,
    /// The HTTP method (default GET, or POST with --data).
    #[arg(long, short = 'X')]
    method: Option<String>,
    /// The request body; `@FILE` reads a file, `@-` stdin.
    #[arg(long, short = 'd')]
    data: Option<String>,
    /// A request header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Print the status line and headers before the body.
    #[arg(long, short = 'i')]
    include: bool,
}

#[derive(Args)]
struct JobsArgs {
    /// Only jobs in this status (queued, running, succeeded, failed, timed_out, cancelled).
    #[arg(long)]
    status: Option<String>,
    /// Only jobs with this tag.
    #[arg(long)]
    tag: Option<String>,
    /// Only jobs of this function.
    #[arg(long = "function")]
    function: Option<String>,
    /// Only jobs of this batch.
    #[arg(long)]
    batch: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

#[derive(Args)]
struct LoginArgs {
    /// The account the key belongs to (stored for reference).
    #[arg(long)]
    account: Option<String>,
}

fn main() {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `cargo cloudpipe ARGS` runs `cargo-cloudpipe cloudpipe ARGS`.
    if argv.get(1).is_some_and(|a| a == "cloudpipe") {
        argv.remove(1);
    }
    let cli = Cli::parse_from(argv);
    let ui = Ui::new(cli.quiet);
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                std::process::exit(2);
            }
        };
    let (url, key) = (cli.url.clone(), cli.api_key.clone());
    let code = match rt.block_on(run(cli, ui)) {
        Ok(code) => code,
        Err(e) => {
            let config = Config::resolve(url, key).unwrap_or_default();
            ui::report(&e, &config.url, config.api_key.is_some());
            2
        }
    };
    let _ = std::io::stdout().flush();
    // The runtime may hold an events stream of a job left running: do not wait for it.
    rt.shutdown_background();
    std::process::exit(code);
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    let config = Config::resolve(cli.url.clone(), cli.api_key.clone())?;
    Ok(Client::new(config)?)
}

async fn run(cli: Cli, ui: Ui) -> anyhow::Result<i32> {
    match &cli.command {
        Cmd::New(a) => {
            let style = match (a.typed, a.http) {
                (true, _) => scaffold::Style::Typed,
                (_, true) => scaffold::Style::Http,
                _ => scaffold::Style::Command,
            };
            let dir =
                scaffold::create(&PathBuf::from(&a.name), &a.name, style, a.guest_path.as_deref())?;
            let next = match style {
                scaffold::Style::Command => "cargo cloudpipe submit -- world",
                scaffold::Style::Typed => "cargo cloudpipe submit --fn add 3 4",
                scaffold::Style::Http => "cargo cloudpipe deploy",
            };
            ui.status(
                "Created",
                format_args!("function crate `{}`; try: cd {} && {next}", a.name, dir.display()),
            );
            Ok(0)
        }
        Cmd::Submit(a) => submit(&cli, a, ui).await,
        Cmd::Deploy(a) => deploy(&cli, a, ui).await,
        Cmd::Invoke(a) => invoke(&client(&cli)?, a).await,
        Cmd::Jobs(a) => jobs(&client(&cli)?, a).await,
        Cmd::Logs { job } => {
            let client = client(&cli)?;
            let mut interrupts = Interrupts::catch()?;
            match follow::follow(&client, job, ui, &mut interrupts, OnInterrupt::Leave).await? {
                Some(r) => Ok(follow::exit_code(&r)),
                None => Ok(130),
            }
        }
        Cmd::Result { job, json, no_wait } => {
            let client = client(&cli)?;
            let r = if *no_wait { client.job(job).await? } else { client.wait(job, None).await? };
            if *json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else if r.status.is_terminal() {
                // The raw bytes: the record's text replaced invalid UTF-8.
                let out = client.stdout(job).await?;
                std::io::stdout().write_all(&out)?;
            }
            if !r.status.is_terminal() {
                ui.status("Pending", format_args!("job {job} is {}", r.status.as_str()));
                return Ok(1);
            }
            if !*json {
                follow::report_end(&r, ui);
            }
            Ok(follow::exit_code(&r))
        }
        Cmd::Cancel { job } => {
            let r = client(&cli)?.cancel(job).await?;
            println!("{} {}", r.id, r.status.as_str());
            Ok(0)
        }
        Cmd::Login(a) => login(&cli, a, ui).await,
        Cmd::Batch(a) => {
            let client = client(&cli)?;
            let function = async || match &a.function {
                Some(f) => Ok(f.clone()),
                None => {
                    let (target, settings) =
                        (build::Target::Module, FunctionSettingsPatch::default());
                    build_and_upload(&client, &a.build, target, a.name.as_deref(), &settings, ui)
                        .await
                }
            };
            cloudpipe_cli::batch::run(&client, &a.batch, function, ui, "cargo cloudpipe").await
        }
    }
}

/// Checks that the server is there and takes the key before a long build.
async fn preflight(client: &Client) -> anyhow::Result<()> {
    client.jobs(&JobQuery { limit: Some(1), ..JobQuery::default() }).await?;
    Ok(())
}

/// Builds and uploads the crate; returns the function's name.
async fn build_and_upload(
    client: &Client,
    build: &BuildArgs,
    target: build::Target,
    name: Option<&str>,
    settings: &FunctionSettingsPatch,
    ui: Ui,
) -> anyhow::Result<String> {
    preflight(client).await?;
    let build = build.clone();
    let quiet = ui.is_quiet();
    let built = tokio::task::spawn_blocking(move || build::build(&build, target, quiet)).await??;
    let name = match name {
        Some(n) => build::function_name(n)?,
        None => build::function_name(&built.name)?,
    };
    let wasm =
        std::fs::read(&built.wasm).with_context(|| format!("reading {}", built.wasm.display()))?;
    let detail = format!("{name} ({}) to {}", ui::size(wasm.len()), client.url());
    let info = ui
        .progress("Uploading", &detail, client.upload_function_with(Some(&name), wasm, settings))
        .await?;
    ui.status("Uploaded", format_args!("{name} as {}", info.id));
    Ok(name)
}

async fn submit(cli: &Cli, a: &SubmitArgs, ui: Ui) -> anyhow::Result<i32> {
    let client = client(cli)?;
    let mut env = BTreeMap::new();
    for kv in &a.env {
        let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv:?}: use KEY=VALUE"))?;
        env.insert(k.to_string(), cloudpipe::EnvValue::from(v));
    }
    let (args, stdin) = match &a.function {
        Some(f) => {
            let values: Vec<serde_json::Value> = a
                .args
                .iter()
                .map(|s| {
                    serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
                })
                .collect();
            (vec![f.clone()], Some(serde_json::to_string(&values)?))
        }
        None => (a.args.clone(), None),
    };
    let mut spec = JobSpec {
        args,
        env,
        stdin,
        timeout_ms: a.timeout_ms,
        memory_mb: a.memory_mb,
        tags: a.tag.clone(),
        ..JobSpec::default()
    };
    if let Some(path) = &a.stdin {
        let mut bytes = Vec::new();
        if path.as_os_str() == "-" {
            std::io::stdin().read_to_end(&mut bytes)?;
        } else {
            bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        }
        match String::from_utf8(bytes) {
            Ok(s) => spec.stdin = Some(s),
            Err(e) => {
                use base64::Engine;
                spec.stdin_base64 =
                    Some(base64::engine::general_purpose::STANDARD.encode(e.as_bytes()));
            }
        }
    }
    let target = if a.component { build::Target::Component } else { build::Target::Module };
    let name = build_and_upload(
        &client,
        &a.build,
        target,
        a.name.as_deref(),
        &FunctionSettingsPatch::default(),
        ui,
    )
    .await?;
    spec.function = name;
    // From here on Ctrl-C cancels the job rather than killing this process.
    let mut interrupts = Interrupts::catch()?;
    let (job, interrupted) = interrupts.finish(client.submit(&spec)).await;
    let job = job?;
    ui.status("Submitted", format_args!("job {}", job.id));
    if interrupted {
        ui.status("Cancelling", format_args!("job {}", job.id));
        let r = client.cancel(&job.id).await?;
        follow::report_end(&r, ui);
        return Ok(follow::exit_code(&r));
    }
    if a.detach {
        println!("{}", job.id);
        return Ok(0);
    }
    let record = if a.wait {
        let waiting = client.wait(&job.id, None);
        tokio::pin!(waiting);
        let r = tokio::select! {
            r = &mut waiting => r?,
            () = interrupts.next() => {
                ui.status("Cancelling", format_args!("job {}", job.id));
                client.cancel(&job.id).await?;
                client.wait(&job.id, Some(Duration::from_secs(30))).await?
            }
        };
        std::io::stdout().write_all(r.stdout.as_bytes())?;
        std::io::stderr().write_all(r.stderr.as_bytes())?;
        r
    } else {
        match follow::follow(&client, &job.id, ui, &mut interrupts, OnInterrupt::Cancel).await? {
            Some(r) => r,
            None => return Ok(130),
        }
    };
    follow::report_end(&record, ui);
    Ok(follow::exit_code(&record))
}

async fn deploy(cli: &Cli, a: &DeployArgs, ui: Ui) -> anyhow::Result<i32> {
    let client = client(cli)?;
    let settings = FunctionSettingsPatch { public: a.public.then_some(true), ..Default::default() };
    let name = build_and_upload(
        &client,
        &a.build,
        build::Target::Component,
        a.name.as_deref(),
        &settings,
        ui,
    )
    .await?;
    let url = client.function_url(&name);
    ui.status("Deployed", format_args!("{name}"));
    println!("{url}");
    Ok(0)
}

async fn invoke(client: &Client, a: &InvokeArgs) -> anyhow::Result<i32> {
    let body = match a.data.as_deref() {
        None => Vec::new(),
        Some("@-") => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            b
        }
        Some(d) => match d.strip_prefix('@') {
            Some(path) => std::fs::read(path).with_context(|| format!("reading {path}"))?,
            None => d.as_bytes().to_vec(),
        },
    };
    let method = match &a.method {
        Some(m) => m.to_ascii_uppercase().parse().with_context(|| format!("bad method {m:?}"))?,
        None if a.data.is_some() => cloudpipe::Method::POST,
        None => cloudpipe::Method::GET,
    };
    let mut inv =
        Invocation { method, path: a.path.clone(), headers: Vec::new(), body: body.into() };
    for h in &a.headers {
        let (k, v) =
            h.split_once(':').with_context(|| format!("--header {h:?}: use `Name: value`"))?;
        inv = inv.header(k.trim(), v.trim());
    }
    let res = client.invoke(&a.name, inv).await?;
    let mut out = std::io::stdout().lock();
    if a.include {
        writeln!(out, "HTTP {}", res.status)?;
        for (k, v) in &res.headers {
            writeln!(out, "{k}: {}", String::from_utf8_lossy(v.as_bytes()))?;
        }
        writeln!(out)?;
    }
    if res.status >= 400 {
        // An API error (the function failed, was not found) is explained on stderr.
        if let Err(e) = res.clone().error_for_status()
            && e.code().is_some_and(|c| !c.starts_with("http_"))
        {
            if e.is_auth() {
                // The server's own refusal, not the function's answer.
                return Err(e.into());
            }
            drop(out);
            eprintln!("error: {e}");
            return Ok(1);
        }
        out.write_all(&res.body)?;
        return Ok(1);
    }
    out.write_all(&res.body)?;
    Ok(0)
}

async fn jobs(client: &Client, a: &JobsArgs) -> anyhow::Result<i32> {
    let status = match &a.status {
        Some(s) => Some(JobStatus::parse(s).with_context(|| format!("unknown status {s:?}"))?),
        None => None,
    };
    let q = JobQuery {
        status,
        tag: a.tag.clone(),
        function: a.function.clone(),
        batch: a.batch.clone(),
        limit: Some(a.limit),
        cursor: None,
        include_output: false,
    };
    let list = client.jobs(&q).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<36}  {:<10}  {:>4}  {:<24}  FUNCTION", "ID", "STATUS", "EXIT", "CREATED")?;
    for j in &list.jobs {
        let exit = j.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<36}  {:<10}  {exit:>4}  {:<24}  {}",
            j.id,
            j.status.as_str(),
            j.created_at,
            j.function
        )?;
    }
    Ok(0)
}

async fn login(cli: &Cli, a: &LoginArgs, ui: Ui) -> anyhow::Result<i32> {
    let path = Credentials::path()
        .context("no place for the credentials file: set HOME or CLOUDPIPE_CREDENTIALS")?;
    let existing = Credentials::load(&path)?.unwrap_or_default();
    let url =
        cli.url.clone().or(existing.url).unwrap_or_else(|| cloudpipe::DEFAULT_URL.to_string());
    let key = match &cli.api_key {
        Some(k) => k.clone(),
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprint!("API key for {url}: ");
                std::io::stderr().flush()?;
            }
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim().to_string()
        }
    };
    if key.is_empty() {
        bail!("no API key given (use --api-key, CLOUDPIPE_API_KEY or type it on stdin)");
    }
    let client =
        Client::new(Config { url: url.clone(), api_key: Some(key.clone()), account: None })?;
    preflight(&client).await?;
    let creds = Credentials {
        url: Some(url.clone()),
        account: a.account.clone().or(existing.account),
        api_key: Some(key),
    };
    creds.save(&path)?;
    ui.status("Logged in", format_args!("to {url}; credentials in {}", path.display()));
    Ok(0)
}
