//! [`Error`]: what every call of the client can fail with.

/// A failed call. Callers match on the variant (or on [`Error::code`], the API's
/// stable code) to decide what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be reached (connection refused, DNS, TLS), even after the
    /// retries of the [`RetryPolicy`](crate::RetryPolicy).
    #[error("cannot reach the Cloudpipe server at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error: `{"error": {"code", "message"}}` and a status.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The API's stable code (`not_found`, `invalid_wasm`, `unauthorized`, ...);
        /// `http_STATUS` when the body carried none.
        code: String,
        message: String,
    },
    /// The request failed on the way (a timeout, a connection cut mid-answer).
    #[error("request to {url} failed: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server's answer was not what the API promises.
    #[error("unexpected answer from {url}: {message}")]
    Protocol { url: String, message: String },
    /// A job run through [`Client::call`](crate::Client::call) did not succeed; the
    /// record has its exit code, stderr and error.
    #[error("job {} {}: {}", .0.id, .0.status.as_str(), failure(.0))]
    JobFailed(Box<cloudpipe_types::JobRecord>),
    /// The client's configuration is unusable (a bad URL, an unreadable credentials file).
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// The API's error code, for [`Error::Api`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, for [`Error::Api`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when the server refused the credentials (401) or the account may not do
    /// this (403).
    pub fn is_auth(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
    }

    /// True for a 404 (no such job or function).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// True when the server could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }

    /// The error of an answer with a non-success status and this body.
    pub(crate) fn from_answer(status: u16, body: &[u8]) -> Error {
        match serde_json::from_slice::<cloudpipe_types::ErrorBody>(body) {
            Ok(b) => Error::Api { status, code: b.error.code, message: b.error.message },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                let message = if text.is_empty() {
                    format!("the server answered {status}")
                } else {
                    text.chars().take(500).collect()
                };
                Error::Api { status, code: format!("http_{status}"), message }
            }
        }
    }
}

/// Why a job failed, in a line: its error, else the last line of its stderr.
fn failure(r: &cloudpipe_types::JobRecord) -> String {
    let last = r.stderr.lines().rev().find(|l| !l.trim().is_empty());
    match (&r.error, last) {
        (_, Some(line)) => line.trim().to_string(),
        (Some(e), None) => e.message.clone(),
        (None, None) => format!("exit code {}", r.exit_code.unwrap_or(-1)),
    }
}

/// What the client's calls return.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_bodies_keep_code_and_message() {
        let e = Error::from_answer(
            404,
            br#"{"error":{"code":"not_found","message":"job \"x\" not found"}}"#,
        );
        assert_eq!(e.code(), Some("not_found"));
        assert!(e.is_not_found());
        assert_eq!(e.to_string(), "job \"x\" not found (HTTP 404, not_found)");
    }

    #[test]
    fn other_bodies_get_a_code_from_the_status() {
        let e = Error::from_answer(401, b"");
        assert_eq!(e.code(), Some("http_401"));
        assert!(e.is_auth());
    }
}
