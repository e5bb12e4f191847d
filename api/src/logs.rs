//! [`FunctionLogs`]: the recent log of each function invoked over HTTP, in memory: the
//! lines its guest wrote to stderr and one access record per invocation, in a bounded
//! ring per function, with live followers. Nothing here touches the store: the
//! invocation path writes nothing durable.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use cloudpipe_runtime::executor::{OutputSink, OutputStream};

use cloudpipe_runtime::model::{now_micros, rfc3339};
use cloudpipe_types::LogLine;
use tokio::sync::broadcast;

/// Lines kept per function.
pub const RING_LINES: usize = 1000;

/// Longest line kept; longer stderr lines are cut.
const MAX_LINE: usize = 4096;

/// The ring of function `name` of `account`. Rings are per account: a name deleted
/// and taken by another account starts with an empty log.
pub fn key(account: &str, name: &str) -> String {
    format!("{account}/{name}")
}

/// Logs of every function, by [`key`]; one per process.
#[derive(Default)]
pub struct FunctionLogs {
    rings: Mutex<HashMap<String, Ring>>,
}

struct Ring {
    lines: VecDeque<LogLine>,
    live: broadcast::Sender<LogLine>,
}

impl Ring {
    fn new() -> Ring {
        Ring { lines: VecDeque::with_capacity(64), live: broadcast::channel(256).0 }
    }
}

impl FunctionLogs {
    /// Records the lines of one invocation: its stderr, then its access record.
    pub fn record(&self, function: &str, invocation: &str, stderr: &[u8], access: String) {
        let text = String::from_utf8_lossy(stderr);
        let mut lines: Vec<(&str, &str)> = text.lines().map(|l| ("stderr", l)).collect();
        lines.push(("access", &access));
        self.push(function, invocation, &lines);
    }

    /// Appends `(stream, text)` lines to a function's ring.
    pub fn push(&self, function: &str, invocation: &str, lines: &[(&str, &str)]) {
        let time = rfc3339(now_micros());
        let mut rings = self.rings.lock().unwrap();
        let ring = rings.entry(function.to_string()).or_insert_with(Ring::new);
        for (stream, text) in lines {
            let l = LogLine {
                time: time.clone(),
                invocation: invocation.to_string(),
                stream: stream.to_string(),
                line: cut(text),
            };
            if ring.lines.len() == RING_LINES {
                ring.lines.pop_front();
            }
            let _ = ring.live.send(l.clone());
            ring.lines.push_back(l);
        }
    }

    /// The lines kept for `function`, oldest first, and a receiver of the lines that
    /// follow (taken under the same lock, so none is missed or repeated).
    pub fn snapshot(&self, function: &str) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let mut rings = self.rings.lock().unwrap();
        let ring = rings.entry(function.to_string()).or_insert_with(Ring::new);
        (ring.lines.iter().cloned().collect(), ring.live.subscribe())
    }

    /// Forgets a function's log (when it is deleted).
    pub fn remove(&self, function: &str) {
        self.rings.lock().unwrap().remove(function);
    }
}

/// Writes a streaming guest's stderr into its function's ring, a line at a time (for
/// wasi:http functions, whose output continues after the response head).
pub struct StderrLines {
    logs: Arc<FunctionLogs>,
    function: String,
    invocation: String,
    partial: Mutex<Vec<u8>>,
}

impl StderrLines {
    pub fn new(logs: Arc<FunctionLogs>, function: &str, invocation: &str) -> StderrLines {
        StderrLines {
            logs,
            function: function.to_string(),
            invocation: invocation.to_string(),
            partial: Mutex::new(Vec::new()),
        }
    }

    fn flush(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<(&str, &str)> = text.lines().map(|l| ("stderr", l)).collect();
        self.logs.push(&self.function, &self.invocation, &lines);
    }
}

impl OutputSink for StderrLines {
    fn chunk(&self, stream: OutputStream, data: &[u8]) {
        if stream != OutputStream::Stderr {
            return;
        }
        let mut partial = self.partial.lock().unwrap();
        partial.extend_from_slice(data);
        if let Some(end) = partial.iter().rposition(|b| *b == b'\n') {
            let done: Vec<u8> = partial.drain(..=end).collect();
            drop(partial);
            self.flush(&done);
        } else if partial.len() > MAX_LINE {
            let done = std::mem::take(&mut *partial);
            drop(partial);
            self.flush(&done);
        }
    }
}

impl Drop for StderrLines {
    fn drop(&mut self) {
        let rest = std::mem::take(self.partial.get_mut().unwrap());
        if !rest.is_empty() {
            self.flush(&rest);
        }
    }
}

fn cut(text: &str) -> String {
    if text.len() <= MAX_LINE {
        return text.to_string();
    }
    let mut end = MAX_LINE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_lines() {
        let logs = FunctionLogs::default();
        for i in 0..RING_LINES {
            logs.record("f", &format!("inv{i}"), b"", format!("GET / 200 {i}"));
        }
        logs.record("f", "last", "é\n".repeat(3000).as_bytes(), "GET / 500".into());
        let (lines, _) = logs.snapshot("f");
        assert_eq!(lines.len(), RING_LINES);
        assert_eq!(lines.last().unwrap().line, "GET / 500");
        assert_eq!(lines.last().unwrap().stream, "access");
        // 1000 access lines, then 3000 stderr lines and one access line: only the
        // last invocation's newest lines are left.
        assert_eq!((lines[0].invocation.as_str(), lines[0].stream.as_str()), ("last", "stderr"));
        let (_, mut live) = logs.snapshot("f");
        logs.record("f", "next", b"oops\n", "GET / 200".into());
        assert_eq!(live.try_recv().unwrap().line, "oops");
        assert_eq!(live.try_recv().unwrap().line, "GET / 200");
        assert!(logs.snapshot("g").0.is_empty());
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_LINE);
        let c = cut(&long);
        assert!(c.len() <= MAX_LINE + "…".len());
        assert!(c.ends_with('…'));
    }
}
