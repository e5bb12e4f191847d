//! Following a job to its end: live output from its events, Ctrl-C to cancel, and
//! the exit code it ended with.

use std::io::Write;

use anyhow::Context;
use cloudpipe::{Client, JobEvent, JobRecord, JobStatus};

use crate::ui::Ui;
pub use cloudpipe_cli::Interrupts;

/// What to do on Ctrl-C while following.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Cancel the job, then keep following it to its (cancelled) end.
    Cancel,
    /// Stop following; the job runs on.
    Leave,
}

/// The job's output so far, to find what the live events missed.
#[derive(Default)]
struct Seen {
    stdout: String,
    stderr: String,
}

/// Follows a job: prints its stdout and stderr as they come, and returns its final
/// record (`None` when the user left it running).
pub async fn follow(
    client: &Client,
    id: &str,
    ui: Ui,
    interrupts: &mut Interrupts,
    on_interrupt: OnInterrupt,
) -> anyhow::Result<Option<JobRecord>> {
    let mut seen = Seen::default();
    let mut cancelled = false;
    let mut events = client.events(id).await.context("following the job")?;
    let record = loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            () = interrupts.next() => {
                if on_interrupt == OnInterrupt::Leave {
                    ui.status("Leaving", format_args!("job {id} running (`cargo cloudpipe logs {id}` follows it again)"));
                    return Ok(None);
                }
                if cancelled {
                    ui.status("Leaving", format_args!("job {id} (cancel requested)"));
                    return Ok(None);
                }
                cancelled = true;
                ui.status("Cancelling", format_args!("job {id} (Ctrl-C again to stop waiting)"));
                let r = client.cancel(id).await.context("cancelling the job")?;
                if r.status.is_terminal() {
                    break r;
                }
                continue;
            }
        };
        match ev {
            Ok(Some(JobEvent::Stdout { data })) => {
                write_out(&mut std::io::stdout(), &data)?;
                seen.stdout.push_str(&data);
            }
            Ok(Some(JobEvent::Stderr { data })) => {
                write_out(&mut std::io::stderr(), &data)?;
                seen.stderr.push_str(&data);
            }
            Ok(Some(JobEvent::Status { status, record })) => {
                if status.is_terminal() {
                    match record {
                        Some(r) => break *r,
                        None => break client.job(id).await?,
                    }
                }
                if status == JobStatus::Running {
                    ui.status("Running", format_args!("job {id}"));
                }
            }
            // The stream ended early (a restart, a proxy): the record has the end.
            Ok(None) | Err(_) => break client.wait(id, None).await?,
        }
    };
    print_missed(&record, &seen, ui)?;
    Ok(Some(record))
}

fn write_out(w: &mut impl Write, data: &str) -> anyhow::Result<()> {
    w.write_all(data.as_bytes()).and_then(|_| w.flush()).context("writing the job's output")
}

/// Prints what the final record holds beyond what came live: all of it when the job
/// ended before the events stream opened, the tail when the stream ended first.
fn print_missed(record: &JobRecord, seen: &Seen, ui: Ui) -> anyhow::Result<()> {
    for (full, live, name) in
        [(&record.stdout, &seen.stdout, "stdout"), (&record.stderr, &seen.stderr, "stderr")]
    {
        let rest = match unseen(full, live) {
            Unseen::Rest(rest) => rest,
            Unseen::HeadMissed => {
                // The events stream has no replay: what the job wrote between its
                // start and the stream's opening was not shown.
                ui.warn(format_args!(
                    "the start of the job's {name} came before it was followed; all of it: \
                     `cargo cloudpipe result {}`",
                    record.id
                ));
                ""
            }
        };
        if name == "stdout" {
            write_out(&mut std::io::stdout(), rest)?;
        } else {
            write_out(&mut std::io::stderr(), rest)?;
        }
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Unseen<'a> {
    /// What follows the live output in the record (often nothing).
    Rest(&'a str),
    /// The live output is the record's end: its start was never shown.
    HeadMissed,
}

/// Compares a stream's full text in the record with what came live. Anything else
/// (the record cut at the output cap, a character split across live chunks) has
/// nothing left to add.
fn unseen<'a>(full: &'a str, live: &str) -> Unseen<'a> {
    match full.strip_prefix(live) {
        Some(rest) => Unseen::Rest(rest),
        None if full.ends_with(live) => Unseen::HeadMissed,
        None => Unseen::Rest(""),
    }
}

/// The process exit code for a job's end: its own exit code, 130 when cancelled
/// (as for a command stopped by Ctrl-C), 1 for other failures.
pub fn exit_code(record: &JobRecord) -> i32 {
    match (record.status, record.exit_code) {
        (JobStatus::Succeeded, _) => 0,
        (JobStatus::Cancelled, _) => 130,
        (_, Some(c)) if c != 0 => c.clamp(1, 255),
        _ => 1,
    }
}

/// One status line about how the job ended, with the error when there is one.
pub fn report_end(record: &JobRecord, ui: Ui) {
    let took = record.run_ms.map(|ms| format!(" in {ms:.1} ms")).unwrap_or_default();
    match (&record.error, record.status) {
        (None, JobStatus::Succeeded) => {
            ui.status("Finished", format_args!("job {} succeeded{took}", record.id));
        }
        (Some(e), st) => ui.warn(format_args!(
            "job {} {}{took}: {} ({})",
            record.id,
            st.as_str(),
            e.message,
            e.kind
        )),
        (None, st) => ui.warn(format_args!(
            "job {} {} with exit code {}",
            record.id,
            st.as_str(),
            record.exit_code.map_or("none".to_string(), |c| c.to_string())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_fills_in_what_the_stream_did_not_show() {
        assert_eq!(unseen("7\n", ""), Unseen::Rest("7\n"));
        assert_eq!(unseen("a\nb\n", "a\n"), Unseen::Rest("b\n"));
        assert_eq!(unseen("a\nb\n", "a\nb\n"), Unseen::Rest(""));
        assert_eq!(unseen("a\nb\n", "b\n"), Unseen::HeadMissed);
        // Cut at the cap: the stream showed more than the record kept.
        assert_eq!(unseen("a\n", "a\nb\n"), Unseen::Rest(""));
    }
}
