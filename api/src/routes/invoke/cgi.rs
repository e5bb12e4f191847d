//! Command components and WASI modules behind CGI/1.1 (RFC 3875), as WAGI ran them:
//! the request body on stdin, the request in environment variables, stdout the
//! response with optional leading CGI headers.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use cloudpipe_runtime::JobOutcome;
use cloudpipe_runtime::account::Limits;
use cloudpipe_runtime::executor::{Executor, NoLiveOutput, RunRequest};
use cloudpipe_runtime::store::FunctionMeta;
use cloudpipe_types::JobStatus;

use super::admission::{admit, body_timeout};
use super::{Run, function_env};
use crate::auth::ClientAddr;
use crate::{ApiError, AppState, read_body};

/// Runs a CGI function: the request body on stdin (read whole, then a slot taken),
/// the request in its environment, its stdout the response.
#[allow(clippy::too_many_arguments)]
pub(super) async fn invoke_cgi(
    state: &AppState,
    meta: &FunctionMeta,
    name: &str,
    path: &str,
    invocation: &str,
    req: Request,
    run: Run,
    limits: &Limits,
    stderr: &mut Vec<u8>,
) -> Result<Response, ApiError> {
    let config = state.invocations.config();
    let cgi = cgi_env(name, path, &req);
    // The function's own variables, then the request's (which win).
    let mut env: Vec<(String, String)> = function_env(state, meta)
        .await?
        .into_iter()
        .filter(|(k, _)| !cgi.iter().any(|(c, _)| c == k))
        .collect();
    env.extend(cgi);
    let body = tokio::time::timeout(
        config.body_timeout,
        read_body(req.into_body(), config.max_request_body),
    )
    .await
    .map_err(|_| body_timeout(config.body_timeout))??;
    let _admitted = admit(state, name, meta, limits)?;
    let outcome = state
        .runtime
        .executor
        .run(
            RunRequest {
                job_id: invocation.to_string(),
                function: name.to_string(),
                function_id: meta.id.clone(),
                args: Vec::new(),
                env,
                stdin: body,
                attempt: 1,
                timeout: run.timeout,
                memory_bytes: run.memory_bytes,
                output_cap: config.max_response_body,
                ..Default::default()
            },
            Arc::new(NoLiveOutput),
            Default::default(),
        )
        .await;
    *stderr = outcome.stderr.clone();
    cgi_response(meta, invocation, outcome)
}

/// The CGI/1.1 environment of a request (RFC 3875), as WAGI passes it.
fn cgi_env(name: &str, path: &str, req: &Request) -> Vec<(String, String)> {
    let uri = req.uri();
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let (server_name, server_port) = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h.to_string(), p.to_string()),
        _ => (host.to_string(), "80".to_string()),
    };
    let remote = req
        .extensions()
        .get::<ConnectInfo<ClientAddr>>()
        .map(|c| c.0.0.ip().to_string())
        .unwrap_or_default();
    let path_info = if path.is_empty() && !uri.path().ends_with('/') {
        String::new()
    } else {
        format!("/{path}")
    };
    let mut env = vec![
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        ("SERVER_PROTOCOL".into(), format!("{:?}", req.version())),
        ("SERVER_SOFTWARE".into(), concat!("cloudpipe/", env!("CARGO_PKG_VERSION")).into()),
        ("REQUEST_METHOD".into(), req.method().to_string()),
        ("SCRIPT_NAME".into(), format!("/fn/{name}")),
        ("PATH_INFO".into(), path_info),
        ("QUERY_STRING".into(), uri.query().unwrap_or("").to_string()),
        ("REQUEST_URI".into(), uri.path_and_query().map(|p| p.to_string()).unwrap_or_default()),
        ("SERVER_NAME".into(), server_name),
        ("SERVER_PORT".into(), server_port),
        ("REMOTE_ADDR".into(), remote),
    ];
    for (var, h) in
        [("CONTENT_TYPE", header::CONTENT_TYPE), ("CONTENT_LENGTH", header::CONTENT_LENGTH)]
    {
        if let Some(v) = headers.get(&h).and_then(|v| v.to_str().ok()) {
            env.push((var.into(), v.to_string()));
        }
    }
    for (k, v) in headers {
        // Credentials stay with the server: a function never sees the caller's key.
        if k == header::AUTHORIZATION || k == header::CONTENT_TYPE || k == header::CONTENT_LENGTH {
            continue;
        }
        if let Ok(v) = v.to_str() {
            env.push((
                format!("HTTP_{}", k.as_str().to_ascii_uppercase().replace('-', "_")),
                v.to_string(),
            ));
        }
    }
    env
}

/// Turns a CGI function's outcome into the response.
fn cgi_response(
    meta: &FunctionMeta,
    invocation: &str,
    outcome: JobOutcome,
) -> Result<Response, ApiError> {
    let failed = |what: String| {
        ApiError::FunctionFailed(format!(
            "function {:?} {what} (invocation {invocation}; see its logs)",
            meta_name(meta)
        ))
    };
    if outcome.is_busy() {
        return Err(ApiError::Unavailable(
            "the server has no room for another instance now".into(),
        ));
    }
    match outcome.status {
        JobStatus::Succeeded => {}
        JobStatus::TimedOut => {
            return Err(ApiError::Timeout(format!(
                "function {:?} timed out (invocation {invocation})",
                meta_name(meta)
            )));
        }
        _ => {
            let why = match (&outcome.error, outcome.exit_code) {
                (Some(e), _) if e.kind == "exit" => {
                    format!("exited with code {}", outcome.exit_code.unwrap_or(1))
                }
                (Some(e), _) => format!("failed ({})", e.kind),
                (None, Some(c)) => format!("exited with code {c}"),
                (None, None) => "failed".into(),
            };
            return Err(failed(why));
        }
    }
    if outcome.stdout_truncated {
        return Err(failed("wrote a response over the size limit".into()));
    }
    let (status, headers, body) =
        parse_cgi_output(outcome.stdout).map_err(|e| failed(format!("wrote {e}")))?;
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    Ok(res)
}

fn meta_name(meta: &FunctionMeta) -> &str {
    meta.name.as_deref().unwrap_or(&meta.id)
}

/// Splits CGI output into status, headers and body. Output that does not open with a
/// header line is all body, `200 text/plain`.
fn parse_cgi_output(stdout: Vec<u8>) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let stdout = Bytes::from(stdout);
    let plain = |body: Bytes| {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        Ok((StatusCode::OK, h, body))
    };
    // The header block ends at the first empty line.
    let Some((head_len, sep_len)) = header_end(&stdout) else { return plain(stdout) };
    let head = &stdout[..head_len];
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    if !looks_like_header(first) {
        return plain(stdout);
    }
    let mut headers = HeaderMap::new();
    let mut status = None;
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text =
            std::str::from_utf8(line).map_err(|_| "CGI headers that are not UTF-8".to_string())?;
        let (k, v) =
            text.split_once(':').ok_or_else(|| format!("a malformed CGI header line {text:?}"))?;
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            let code = v.split_whitespace().next().and_then(|c| c.parse::<u16>().ok());
            status = Some(
                code.and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| format!("a bad CGI Status {v:?}"))?,
            );
            continue;
        }
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| format!("a bad CGI header name {k:?}"))?;
        if is_hop_by_hop(&name) {
            continue;
        }
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("a bad value for CGI header {k:?}"))?;
        headers.append(name, value);
    }
    let status = status.unwrap_or(if headers.contains_key(header::LOCATION) {
        StatusCode::FOUND
    } else {
        StatusCode::OK
    });
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    }
    Ok((status, headers, stdout.slice(head_len + sep_len..)))
}

/// Where the header block ends: (its length, the length of the blank line after it).
fn header_end(out: &[u8]) -> Option<(usize, usize)> {
    // Headers are small; a blank line far into the output is body text.
    let window = &out[..out.len().min(64 << 10)];
    let lf = window.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = window.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn looks_like_header(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else { return false };
    colon > 0 && line[..colon].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_without_headers_is_plain_text() {
        let (st, h, body) =
            parse_cgi_output(b"hello: world is not a header block".to_vec()).unwrap();
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(&body[..], b"hello: world is not a header block");
        let (_, _, body) = parse_cgi_output(b"just text\n\nwith a blank line".to_vec()).unwrap();
        assert_eq!(&body[..], b"just text\n\nwith a blank line");
    }

    #[test]
    fn cgi_headers_status_and_location_are_parsed() {
        let out =
            b"Content-Type: application/json\r\nStatus: 201 Created\r\nX-A: 1\r\nX-A: 2\r\n\r\n{}"
                .to_vec();
        let (st, h, body) = parse_cgi_output(out).unwrap();
        assert_eq!(st, StatusCode::CREATED);
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert_eq!(&body[..], b"{}");
        let (st, h, body) = parse_cgi_output(b"Location: /elsewhere\n\n".to_vec()).unwrap();
        assert_eq!(st, StatusCode::FOUND);
        assert_eq!(h[header::LOCATION], "/elsewhere");
        assert!(body.is_empty());
    }

    #[test]
    fn bad_cgi_headers_are_errors_not_panics() {
        for bad in
            [&b"Status: banana\n\nx"[..], b"Content-Type: a\nno colon here\n\n", b"X-Bad: \x01\n\n"]
        {
            assert!(parse_cgi_output(bad.to_vec()).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // Hop-by-hop headers from the guest are dropped.
        let (_, h, _) =
            parse_cgi_output(b"Transfer-Encoding: chunked\nX-Ok: y\n\nbody".to_vec()).unwrap();
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h["x-ok"], "y");
    }
}
