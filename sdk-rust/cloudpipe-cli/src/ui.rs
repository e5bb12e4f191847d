//! [`Ui`]: what the command lines say on stderr: cargo-style status lines and a
//! spinner on a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Where status lines go; one per run.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    quiet: bool,
    /// stderr is a terminal: colours and spinners.
    tty: bool,
}

impl Ui {
    pub fn new(quiet: bool) -> Ui {
        Ui { quiet, tty: std::io::stderr().is_terminal() }
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// stderr is a terminal.
    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// A status line in cargo's style: a right-aligned verb, then the detail.
    pub fn status(&self, verb: &str, detail: impl std::fmt::Display) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\x1b[1;32m{verb:>12}\x1b[0m {detail}");
        } else {
            let _ = writeln!(err, "{verb:>12} {detail}");
        }
    }

    /// A warning line.
    pub fn warn(&self, msg: impl std::fmt::Display) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\x1b[1;33mwarning\x1b[0m: {msg}");
        } else {
            let _ = writeln!(err, "warning: {msg}");
        }
    }

    /// Runs `fut` while a status line with a spinner and the elapsed time turns on a
    /// terminal; elsewhere the line is printed once.
    pub async fn progress<T>(&self, verb: &str, detail: &str, fut: impl Future<Output = T>) -> T {
        if self.quiet || !self.tty {
            self.status(verb, detail);
            return fut.await;
        }
        let start = Instant::now();
        let mut fut = std::pin::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        let mut frame = 0;
        let out = loop {
            tokio::select! {
                out = &mut fut => break out,
                _ = tick.tick() => {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r\x1b[1;36m{verb:>12}\x1b[0m {detail} {} {:.1}s\x1b[K",
                        FRAMES[frame % FRAMES.len()],
                        start.elapsed().as_secs_f64()
                    );
                    let _ = err.flush();
                    frame += 1;
                }
            }
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        drop(err);
        self.status(verb, format_args!("{detail} ({:.1}s)", start.elapsed().as_secs_f64()));
        out
    }
}
