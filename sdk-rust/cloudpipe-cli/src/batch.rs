//! The batch command of both command lines (`cloudpipe batch`, `cargo cloudpipe
//! batch`): one function over the lines of stdin (cloudtask-style), followed to its
//! end with a progress line, then a one-line summary.
//!
//! The summary goes to stdout: `x/y OK`, or `x/y !OK - P pending, T timeouts, E errors,
//! S OK`; the exit code is 0 only when every input succeeded, 1 otherwise, 130 after
//! Ctrl-C (which cancels the batch and says how to resume it).

use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use cloudpipe::{BatchRecord, BatchSpec, BatchStatus, Client, JobSpec};

use crate::{Interrupts, Ui};

/// How often the batch is looked at while it runs.
const POLL: Duration = Duration::from_millis(200);

/// The flags of the batch command both binaries share; each adds how the function
/// is named (`--function`, or a crate to build), which conflicts with `--resume` and
/// `--retry`.
#[derive(Args, Debug, Clone)]
pub struct BatchFlags {
    /// Most jobs running at once.
    #[arg(long, default_value_t = 8)]
    pub split: u32,
    /// Extra attempts of an input that failed or timed out.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Timeout of each job (`30s`, `500ms`, `2m`).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Stop after this many inputs failed in a row.
    #[arg(long)]
    pub strikes: Option<u32>,
    /// URL called once with the summary when the batch ends.
    #[arg(long)]
    pub hook: Option<String>,
    /// Run the pending inputs of a stopped batch instead of starting one.
    #[arg(long, value_name = "ID", conflicts_with = "retry")]
    pub resume: Option<String>,
    /// Run the failed and timed-out inputs of a batch again.
    #[arg(long, value_name = "ID")]
    pub retry: Option<String>,
    /// Arguments before each input's words (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

/// A job timeout: as the server reads a wait (`30s`, `500ms`, `2m`, `1.5s`, a bare
/// number is seconds), above zero and at most a day.
fn parse_duration(s: &str) -> Result<Duration, String> {
    cloudpipe_types::parse_duration(s)
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(86_400))
        .ok_or_else(|| format!("bad duration {s:?}: use e.g. 30s, 500ms or 2m"))
}

/// Starts (or resumes, or retries) the batch, follows it, prints the summary; the
/// process's exit code. `function` names the function every input runs; it is
/// called once the inputs are read (so that a mistake in them shows before a build).
/// `program` is how the user ran this command (`cloudpipe`, `cargo cloudpipe`), for
/// the hint after Ctrl-C.
pub async fn run(
    client: &Client,
    a: &BatchFlags,
    function: impl AsyncFnOnce() -> anyhow::Result<String>,
    ui: Ui,
    program: &str,
) -> anyhow::Result<i32> {
    let (verb, starting) = match (&a.resume, &a.retry) {
        (Some(id), _) => ("Resumed", Starting::Resume(id.clone())),
        (_, Some(id)) => ("Retrying", Starting::Retry(id.clone())),
        _ => {
            // The inputs first: a mistake shows before a build, not after.
            let stdin = std::io::stdin();
            if stdin.is_terminal() && !ui.is_quiet() {
                eprintln!("reading inputs from stdin, one per line (Ctrl-D to end)");
            }
            let mut input = String::new();
            stdin.lock().read_to_string(&mut input).context("reading inputs from stdin")?;
            if input.trim().is_empty() {
                bail!("no inputs on stdin: give one per line (its words are the job's arguments)");
            }
            let function = function().await?;
            let spec = BatchSpec {
                template: JobSpec { function, args: a.args.clone(), ..JobSpec::default() },
                input_text: Some(input),
                split: Some(a.split),
                retries: Some(a.retries),
                timeout_ms: a.timeout.map(|t| t.as_millis().max(1) as u64),
                strikes: a.strikes,
                hook: a.hook.clone(),
                ..BatchSpec::default()
            };
            ("Started", Starting::Create(Box::new(spec)))
        }
    };
    // From here on Ctrl-C cancels the batch rather than killing this process (before,
    // while inputs are typed or the crate builds, it stops this process as usual).
    let mut interrupts = Interrupts::catch()?;
    let starting = async {
        match &starting {
            Starting::Create(spec) => client.create_batch(spec).await,
            Starting::Resume(id) => client.resume_batch(id).await,
            Starting::Retry(id) => client.retry_batch(id).await,
        }
    };
    let (created, interrupted) = interrupts.finish(starting).await;
    let created = created?;
    let id = created.id.clone();
    ui.status(verb, format_args!("batch {id}: {} inputs, split {}", created.total, created.split));
    if interrupted {
        return cancel(client, &id, ui, program).await;
    }

    let progress = Progress::new(ui);
    let mut b = created;
    loop {
        progress.show(&b);
        if b.status != BatchStatus::Running {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = interrupts.next() => {
                progress.end();
                return cancel(client, &id, ui, program).await;
            }
        }
        b = client.batch(&id).await?;
    }
    progress.end();
    println!("{}", summary(&b));
    ui.status(
        "Finished",
        format_args!(
            "batch {id} ({}): wall {:.1} s, job time {:.1} s, efficiency {:.0}%",
            status_str(b.status),
            b.wall_ms / 1000.0,
            b.job_ms / 1000.0,
            b.efficiency * 100.0
        ),
    );
    Ok(if b.counts.ok == b.total { 0 } else { 1 })
}

enum Starting {
    Create(Box<BatchSpec>),
    Resume(String),
    Retry(String),
}

/// Cancels the batch after Ctrl-C and says how to run what is left; exit code 130.
async fn cancel(client: &Client, id: &str, ui: Ui, program: &str) -> anyhow::Result<i32> {
    ui.status("Cancelling", format_args!("batch {id}"));
    let mut tries = 0;
    let b = loop {
        match client.cancel_batch(id).await {
            // A batch a moment from its start: the server asks to try again.
            Err(e) if e.status() == Some(409) && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => break r.context("cancelling the batch")?,
        }
    };
    // Printed even with --quiet: without it the batch is hard to pick up again.
    eprintln!(
        "batch {id} {} with {} of {} inputs pending; run what is left with: \
         {program} batch --resume {id}",
        status_str(b.status),
        b.counts.pending,
        b.total
    );
    Ok(130)
}

/// `x/y OK`, or `x/y !OK - P pending, T timeouts, E errors, S OK`.
fn summary(b: &BatchRecord) -> String {
    let (ok, total, c) = (b.counts.ok, b.total, &b.counts);
    if ok == total {
        format!("{ok}/{total} OK")
    } else {
        format!(
            "{ok}/{total} !OK - {} pending, {} timeouts, {} errors, {ok} OK",
            c.pending,
            c.timed_out,
            c.failed + c.cancelled
        )
    }
}

/// The batch's status as the API spells it.
fn status_str(s: BatchStatus) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// The progress of a running batch on stderr: one line redrawn on a terminal, plain
/// lines (at most one a second, only on change) elsewhere, nothing with --quiet.
struct Progress {
    ui: Ui,
    tty: bool,
    last: std::cell::RefCell<(String, Instant)>,
}

impl Progress {
    fn new(ui: Ui) -> Progress {
        Progress {
            ui,
            tty: !ui.is_quiet() && ui.is_tty(),
            last: std::cell::RefCell::new((String::new(), Instant::now())),
        }
    }

    fn show(&self, b: &BatchRecord) {
        if self.ui.is_quiet() {
            return;
        }
        let c = &b.counts;
        let done = c.ok + c.failed + c.timed_out + c.cancelled;
        let line = format!(
            "{} ok, {} failed, {} timed out, {} running, {} pending",
            c.ok, c.failed, c.timed_out, c.running, c.pending
        );
        let mut last = self.last.borrow_mut();
        if self.tty {
            const WIDTH: u64 = 30;
            let filled = (done * WIDTH).checked_div(b.total).unwrap_or(0).min(WIDTH) as usize;
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r[{}{}] {done}/{}  {line}\x1b[K",
                "#".repeat(filled),
                ".".repeat(WIDTH as usize - filled),
                b.total
            );
            let _ = err.flush();
        } else if line != last.0 && last.1.elapsed() >= Duration::from_secs(1) {
            self.ui.status("Progress", format_args!("{done}/{}: {line}", b.total));
            last.1 = Instant::now();
        }
        last.0 = line;
    }

    /// Ends the redrawn line.
    fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudpipe::BatchCounts;

    #[test]
    fn durations_as_the_server_reads_them_but_positive() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "3h", "-1s", "0s", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_summary_line_counts_errors_and_pending() {
        let mut b = BatchRecord {
            id: "b".into(),
            account: "admin".into(),
            status: BatchStatus::Finished,
            total: 3,
            counts: BatchCounts { ok: 3, ..BatchCounts::default() },
            split: 8,
            retries: 0,
            strikes: 0,
            created_at: String::new(),
            finished_at: None,
            wall_ms: 0.0,
            job_ms: 0.0,
            efficiency: 0.0,
            hook: None,
        };
        assert_eq!(summary(&b), "3/3 OK");
        assert_eq!(status_str(b.status), "finished");
        b.total = 7;
        b.counts = BatchCounts {
            ok: 2,
            failed: 1,
            cancelled: 1,
            timed_out: 1,
            pending: 2,
            ..BatchCounts::default()
        };
        assert_eq!(summary(&b), "2/7 !OK - 2 pending, 1 timeouts, 2 errors, 2 OK");
    }
}
