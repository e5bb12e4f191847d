//! What the two command lines, the server's `cloudpipe` and `cargo cloudpipe`, share,
//! so that each exists once: the batch command, the status lines on stderr and Ctrl-C
//! as an event. Where a command line connects and with which key is
//! [`cloudpipe::Config::resolve`] (flags, then the environment, then the credentials
//! file).
//!
//! # Layout
//! - [`batch`]: the batch command's shared flags ([`batch::BatchFlags`]) and its run:
//!   start, resume or retry a batch, follow it, summarise it.
//! - [`Ui`]: cargo-style status lines, a spinner on a terminal, `--quiet`.
//! - [`Interrupts`]: Ctrl-C caught from the moment it matters.
//!
//! # Example
//!
//! A command line with a `batch` subcommand of its own naming the function:
//!
//! ```no_run
//! use clap::Parser;
//! use cloudpipe_cli::{Ui, batch::BatchFlags};
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[arg(long, conflicts_with_all = ["resume", "retry"])]
//!     function: Option<String>,
//!     #[command(flatten)]
//!     batch: BatchFlags,
//! }
//!
//! # async fn run() -> anyhow::Result<i32> {
//! let cli = Cli::parse();
//! let client = cloudpipe::Client::from_env()?;
//! let function = cli.function.clone().unwrap_or_else(|| "hello".into());
//! cloudpipe_cli::batch::run(&client, &cli.batch, async || Ok(function), Ui::new(false), "mytool")
//!     .await
//! # }
//! ```

pub mod batch;
mod interrupts;
mod ui;

pub use interrupts::Interrupts;
pub use ui::Ui;
