//! HTTP functions in the CGI style.
//!
//! A command deployed as a web endpoint (`cargo cloudpipe deploy`) answers at
//! `/fn/{name}/...`: the server puts the request in CGI variables (`REQUEST_METHOD`,
//! `PATH_INFO`, `QUERY_STRING`, `CONTENT_TYPE`, `HTTP_*`) and the body on stdin, and
//! reads the response from stdout: CGI headers (`Status`, `Content-Type`, any other),
//! an empty line, the body. A non-zero exit is a 500; stderr goes to the function's log.
//!
//! # Example
//!
//! A whole `src/main.rs`:
//!
//! ```no_run
//! use cloudpipe_guest::http::{self, Request, Response};
//!
//! fn main() -> std::process::ExitCode {
//!     http::serve(|req: Request| match (req.method.as_str(), req.path.as_str()) {
//!         ("GET", "/hello") => {
//!             let who = req.query("name").unwrap_or_else(|| "world".into());
//!             Response::text(200, format!("hello, {who}!\n"))
//!         }
//!         _ => Response::text(404, "not found\n"),
//!     })
//! }
//! ```

use std::io::{Read, Write};
use std::process::ExitCode;

/// One request, as the server handed it over in CGI variables and on stdin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path below the function's mount point: `/fn/web/a/b` arrives as `/a/b`
    /// (empty for `/fn/web` itself).
    pub path: String,
    /// The raw query string, without `?`.
    pub query_string: String,
    /// Header names in lower case (`content-type`, `x-request-id`), in the order given.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The request this process was started for: CGI variables from the environment,
    /// the body from stdin.
    pub fn from_cgi() -> std::io::Result<Request> {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body)?;
        Ok(Request::from_parts(std::env::vars(), body))
    }

    /// A request from CGI variables and a body; [`Request::from_cgi`] with the
    /// process's environment and stdin.
    ///
    /// ```
    /// use cloudpipe_guest::http::Request;
    /// let env = [("REQUEST_METHOD", "POST"), ("PATH_INFO", "/items"),
    ///            ("QUERY_STRING", "tag=a%20b&n=1"), ("CONTENT_TYPE", "text/plain"),
    ///            ("HTTP_X_TRACE", "t1")];
    /// let req = Request::from_parts(env.map(|(k, v)| (k.to_string(), v.to_string())), b"hi".to_vec());
    /// assert_eq!(req.method, "POST");
    /// assert_eq!(req.query("tag").as_deref(), Some("a b"));
    /// assert_eq!(req.header("content-type"), Some("text/plain"));
    /// assert_eq!(req.header("X-Trace"), Some("t1"));
    /// ```
    pub fn from_parts(vars: impl IntoIterator<Item = (String, String)>, body: Vec<u8>) -> Request {
        let mut req = Request { body, ..Request::default() };
        for (k, v) in vars {
            match k.as_str() {
                "REQUEST_METHOD" => req.method = v,
                "PATH_INFO" => req.path = v,
                "QUERY_STRING" => req.query_string = v,
                "CONTENT_TYPE" => req.headers.push(("content-type".into(), v)),
                "CONTENT_LENGTH" => req.headers.push(("content-length".into(), v)),
                _ => {
                    if let Some(h) = k.strip_prefix("HTTP_") {
                        req.headers.push((h.to_ascii_lowercase().replace('_', "-"), v));
                    }
                }
            }
        }
        req
    }

    /// The first value of a header (the name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The query's pairs, percent-decoded (`+` is a space).
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query_string
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        self.query_pairs().into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.body)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// One response: status, headers and body, written to stdout in CGI form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// An empty response with this status.
    pub fn new(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new() }
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status)
            .header("Content-Type", "text/plain; charset=utf-8")
            .body(body.into().into_bytes())
    }

    /// An `application/json` response.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response::new(status).header("Content-Type", "application/json").body(body),
            Err(e) => Response::text(500, format!("encoding the response: {e}\n")),
        }
    }

    /// A redirect (`Location`) with this status (301, 302, 303, 307 or 308).
    pub fn redirect(status: u16, location: &str) -> Response {
        Response::new(status).header("Location", location)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Response {
        self.body = body.into();
        self
    }

    /// Writes the response in CGI form: `Status:`, the headers, an empty line, the body.
    ///
    /// ```
    /// use cloudpipe_guest::http::Response;
    /// let mut out = Vec::new();
    /// Response::text(201, "made\n").header("X-Id", "7").write_cgi(&mut out).unwrap();
    /// assert_eq!(out, b"Status: 201\nContent-Type: text/plain; charset=utf-8\nX-Id: 7\n\nmade\n");
    /// ```
    pub fn write_cgi(&self, mut w: impl Write) -> std::io::Result<()> {
        let mut head = format!("Status: {}\n", self.status);
        for (k, v) in &self.headers {
            // A line break would end the header block early: such a header is dropped.
            if k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
                continue;
            }
            head.push_str(&format!("{k}: {v}\n"));
        }
        head.push('\n');
        w.write_all(head.as_bytes())?;
        w.write_all(&self.body)?;
        w.flush()
    }
}

/// Reads the request, calls `handler` and writes its response: the whole `main` of a
/// CGI-style HTTP function. Fails (exit code 1, a 500 for the caller) only when the
/// request cannot be read or the response cannot be written.
pub fn serve(handler: impl FnOnce(Request) -> Response) -> ExitCode {
    let req = match Request::from_cgi() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: reading the request body: {e}");
            return ExitCode::FAILURE;
        }
    };
    match handler(req).write_cgi(std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the response: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_plus_escapes_and_stray_percents() {
        assert_eq!(percent_decode("a+b%21%zz%"), "a b!%zz%");
        assert_eq!(percent_decode("%E2%82%AC"), "€");
    }

    #[test]
    fn headers_with_line_breaks_are_dropped() {
        let mut out = Vec::new();
        Response::new(200).header("X-Bad", "a\nStatus: 500").write_cgi(&mut out).unwrap();
        assert_eq!(out, b"Status: 200\n\n");
    }
}
