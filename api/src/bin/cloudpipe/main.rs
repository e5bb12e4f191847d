//! The `cloudpipe` binary: `serve` runs the API; `up` serves and runs the bundled
//! example function end to end; `accounts`, `keys`, `secrets`, `me` and `batch` talk
//! to a running server; `admin` works on a stopped server's store.
//!
//! # Layout
//! - `flags`: the server's flags, in groups, each filling its part of the config.
//! - `serve`: `serve` and `up`: start, the built-in runners, the first start's key.
//! - `admin`: the client commands (on the `cloudpipe` client crate; `batch` is
//!   `cloudpipe-cli`'s, shared with `cargo cloudpipe`) and `admin reset-key`.

mod admin;
mod flags;
mod serve;

use clap::{Parser, Subcommand};

use admin::{AccountsCommand, AdminCommand, BatchArgs, ClientArgs, KeysCommand, SecretsCommand};
use flags::ServeArgs;

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
            Command::Serve(args) => serve::serve(args).await,
            Command::Up { serve, once } => serve::up(serve, once).await,
            Command::Accounts { client, command } => admin::accounts(client, command).await,
            Command::Keys { client, command } => admin::keys(client, command).await,
            Command::Me { client } => admin::me(client).await,
            Command::Secrets { client, command } => admin::secrets(client, command).await,
            Command::Batch(args) => {
                let code = admin::batch(args).await?;
                std::process::exit(code);
            }
            Command::Admin { command: AdminCommand::ResetKey { data_dir, store, account } } => {
                admin::reset_key(&data_dir, &store, &account).await
            }
        }
    })
}
