//! Server-sent events: the parser ([`SseParser`]) and the job event stream built on
//! it ([`JobEvents`]).

use cloudpipe_types::JobEvent;

use crate::{Error, Result};

/// One event of a `text/event-stream`, as the SSE specification assembles it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `message` when the event named none.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last `id:` seen on the stream, if any.
    pub id: Option<String>,
}

/// An incremental `text/event-stream` parser: feed it bytes as they arrive, take
/// whole events out. Cheap; one per stream.
///
/// ```
/// use cloudpipe::sse::SseParser;
/// let mut p = SseParser::default();
/// p.push(b"event: stdout\ndata: {\"a\":");
/// assert!(p.next_event().is_none()); // not complete yet
/// p.push(b"1}\n\n: a comment\n\n");
/// let ev = p.next_event().unwrap();
/// assert_eq!((ev.event.as_str(), ev.data.as_str()), ("stdout", "{\"a\":1}"));
/// assert!(p.next_event().is_none()); // a comment alone is no event
/// ```
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Where the scan for the next line end resumes.
    scanned: usize,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
    /// The previous chunk ended in `\r`: a `\n` opening the next one belongs to it.
    after_cr: bool,
}

impl SseParser {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, or `None` until more bytes arrive.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if self.after_cr && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    self.buf.remove(0);
                }
                self.after_cr = false;
            }
            let Some(rel) =
                self.buf[self.scanned..].iter().position(|b| *b == b'\n' || *b == b'\r')
            else {
                self.scanned = self.buf.len();
                return None;
            };
            let end = self.scanned + rel;
            let mut next = end + 1;
            if self.buf[end] == b'\r' {
                match self.buf.get(end + 1) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..next);
            self.scanned = 0;
            if let Some(ev) = self.line(&line) {
                return Some(ev);
            }
        }
    }

    /// Handles one line; an empty line dispatches the event gathered so far.
    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            return data.map(|data| SseEvent {
                event: event.unwrap_or_else(|| "message".into()),
                data,
                id: self.id.clone(),
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            _ => {}
        }
        None
    }
}

/// The events of one job (`GET /v1/jobs/{id}/events`): its current status first, then
/// live stdout/stderr chunks and status changes; the last event carries the terminal
/// status and the full record. Made by [`Client::events`](crate::Client::events).
#[derive(Debug)]
pub struct JobEvents {
    url: String,
    response: reqwest::Response,
    parser: SseParser,
    done: bool,
}

impl JobEvents {
    pub(crate) fn new(url: String, response: reqwest::Response) -> JobEvents {
        JobEvents { url, response, parser: SseParser::default(), done: false }
    }

    /// The next event; `Ok(None)` once the stream has ended (after a terminal status,
    /// or when the connection closed early: then the job may still be running, and
    /// [`Client::wait`](crate::Client::wait) gives its end).
    pub async fn next(&mut self) -> Result<Option<JobEvent>> {
        loop {
            if let Some(ev) = self.parser.next_event() {
                if !matches!(ev.event.as_str(), "status" | "stdout" | "stderr") {
                    continue;
                }
                let parsed: JobEvent =
                    serde_json::from_str(&ev.data).map_err(|e| Error::Protocol {
                        url: self.url.clone(),
                        message: format!("bad {} event: {e}", ev.event),
                    })?;
                return Ok(Some(parsed));
            }
            if self.done {
                return Ok(None);
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.parser.push(&bytes),
                Ok(None) => {
                    // A last event without its blank line still counts.
                    self.parser.push(b"\n\n");
                    self.done = true;
                }
                Err(e) => return Err(Error::Request { url: self.url.clone(), source: e }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser) -> Vec<SseEvent> {
        std::iter::from_fn(|| p.next_event()).collect()
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = b"event: status\ndata: {\"x\":1}\n\nevent: stdout\ndata: a\ndata: b\n\n";
        for cut in 0..stream.len() {
            let mut p = SseParser::default();
            p.push(&stream[..cut]);
            let mut got = all(&mut p);
            p.push(&stream[cut..]);
            got.extend(all(&mut p));
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].data, "{\"x\":1}");
            assert_eq!((got[1].event.as_str(), got[1].data.as_str()), ("stdout", "a\nb"));
        }
    }

    #[test]
    fn crlf_and_cr_line_ends_are_line_ends() {
        let mut p = SseParser::default();
        p.push(b"data: one\r");
        assert!(p.next_event().is_none());
        p.push(b"\n\r\ndata: two\r\r");
        let got = all(&mut p);
        assert_eq!(got.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["one", "two"]);
        assert_eq!(got[0].event, "message");
    }

    #[test]
    fn comments_ids_and_fields_without_colon() {
        let mut p = SseParser::default();
        p.push(b": keep-alive\n\nid: 7\ndata\nevent:x\n\n");
        let got = all(&mut p);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0], SseEvent { event: "x".into(), data: "".into(), id: Some("7".into()) });
    }
}
