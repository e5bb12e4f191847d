//! `http_echo`: a wasi:http proxy for the executor's tests and benchmarks.
//!
//! - `/hello`: `hello, world\n` (the benchmark's handler).
//! - `/trap`: panics before answering. `/loop`: spins forever before answering.
//! - `/memory-bomb`: allocates 1 GiB before answering.
//! - `/stream-loop`: answers 200, writes one chunk, then spins forever.
//! - `/outbound?url=http://HOST:PORT/PATH`: sends a GET there and answers 200 with
//!   `status NNN\n` and the body it got, or 502 with `error: CODE`.
//! - anything else: echoes. Response headers `x-echo-method`, `x-echo-path` (path and
//!   query), `x-echo-scheme`, `x-echo-authority`, `x-echo-<name>` for each request
//!   header `x-test-<name>`, `x-powered-by: http-echo`; `content-type` copied; the
//!   request body streamed back as it arrives; request trailers sent back as response
//!   trailers, plus `x-echo-bytes: N` (the body length) when the request asks for
//!   trailers with `x-test-trailers: 1`. Writes `echo PATH` to stderr.

use std::io::{Read, Write};

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

struct Echo;

wasi::http::proxy::export!(Echo);

impl Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let route = path.split('?').next().unwrap_or("");
        match route {
            "/hello" => respond(out, 200, &[("content-type", "text/plain")], b"hello, world\n"),
            "/trap" => panic!("the guest was asked to trap"),
            "/loop" => spin(),
            "/memory-bomb" => {
                let hoard: Vec<u8> = vec![1; 1 << 30];
                std::hint::black_box(hoard);
                respond(out, 200, &[], b"got a GiB\n");
            }
            "/stream-loop" => {
                let response = OutgoingResponse::new(Fields::new());
                let body = response.body().unwrap();
                ResponseOutparam::set(out, Ok(response));
                let mut stream = body.write().unwrap();
                stream.write_all(b"first chunk\n").unwrap();
                Write::flush(&mut stream).unwrap();
                spin();
            }
            "/outbound" => outbound(&path, out),
            _ => echo(request, &path, out),
        }
    }
}

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let fields = Fields::new();
    for (name, value) in headers {
        fields.append(name, value.as_bytes()).unwrap();
    }
    let response = OutgoingResponse::new(fields);
    response.set_status_code(status).unwrap();
    let outgoing = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));
    {
        let mut stream = outgoing.write().unwrap();
        stream.write_all(body).unwrap();
        Write::flush(&mut stream).unwrap();
    }
    OutgoingBody::finish(outgoing, None).unwrap();
}

fn echo(request: IncomingRequest, path: &str, out: ResponseOutparam) {
    eprintln!("echo {path}");
    let method = match request.method() {
        Method::Get => "GET".to_string(),
        Method::Head => "HEAD".to_string(),
        Method::Post => "POST".to_string(),
        Method::Put => "PUT".to_string(),
        Method::Delete => "DELETE".to_string(),
        Method::Connect => "CONNECT".to_string(),
        Method::Options => "OPTIONS".to_string(),
        Method::Trace => "TRACE".to_string(),
        Method::Patch => "PATCH".to_string(),
        Method::Other(m) => m,
    };
    let scheme = match request.scheme() {
        Some(Scheme::Http) => "http".to_string(),
        Some(Scheme::Https) => "https".to_string(),
        Some(Scheme::Other(s)) => s,
        None => String::new(),
    };
    let fields = Fields::new();
    fields.append("x-echo-method", method.as_bytes()).unwrap();
    fields.append("x-echo-path", path.as_bytes()).unwrap();
    fields.append("x-echo-scheme", scheme.as_bytes()).unwrap();
    fields.append("x-echo-authority", request.authority().unwrap_or_default().as_bytes()).unwrap();
    fields.append("x-powered-by", b"http-echo").unwrap();
    let mut want_trailers = false;
    for (name, value) in request.headers().entries() {
        if let Some(rest) = name.strip_prefix("x-test-") {
            fields.append(&format!("x-echo-{rest}"), &value).unwrap();
            want_trailers |= rest == "trailers" && value == b"1";
        } else if name == "content-type" {
            fields.append(&name, &value).unwrap();
        }
    }

    let response = OutgoingResponse::new(fields);
    let outgoing = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));

    let incoming = request.consume().unwrap();
    let mut total: u64 = 0;
    {
        let mut input = incoming.stream().unwrap();
        let mut output = outgoing.write().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = Read::read(&mut input, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
            output.write_all(&buf[..n]).unwrap();
        }
        Write::flush(&mut output).unwrap();
    }
    let trailers = wasi::http::types::IncomingBody::finish(incoming);
    trailers.subscribe().block();
    let received = trailers.get().and_then(|r| r.ok()).and_then(|r| r.ok()).flatten();
    let send = match received {
        Some(t) => Some(t.clone()),
        None if want_trailers => Some(Fields::new()),
        None => None,
    };
    if let Some(t) = &send
        && want_trailers
    {
        t.append("x-echo-bytes", total.to_string().as_bytes()).unwrap();
    }
    OutgoingBody::finish(outgoing, send).unwrap();
}

fn outbound(path: &str, out: ResponseOutparam) {
    let url = path.split_once("?url=").map(|(_, u)| u).unwrap_or("");
    let (scheme, rest) = match url.split_once("://") {
        Some(("https", rest)) => (Scheme::Https, rest),
        Some((_, rest)) => (Scheme::Http, rest),
        None => (Scheme::Http, url),
    };
    let (authority, target) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&scheme)).unwrap();
    request.set_authority(Some(authority)).unwrap();
    request.set_path_with_query(Some(target)).unwrap();
    let result = outgoing_handler::handle(request, None).and_then(|future| {
        future.subscribe().block();
        future.get().expect("ready").expect("first get")
    });
    match result {
        Ok(response) => {
            let status = response.status();
            let body = response.consume().unwrap();
            let mut got = Vec::new();
            body.stream().unwrap().read_to_end(&mut got).unwrap();
            let mut text = format!("status {status}\n").into_bytes();
            text.extend_from_slice(&got);
            respond(out, 200, &[], &text);
        }
        Err(e) => {
            let text = format!("error: {}", code_name(&e));
            respond(out, 502, &[], text.as_bytes());
        }
    }
}

fn code_name(e: &ErrorCode) -> String {
    match e {
        ErrorCode::HttpRequestDenied => "HttpRequestDenied".to_string(),
        ErrorCode::ConnectionRefused => "ConnectionRefused".to_string(),
        other => format!("{other:?}"),
    }
}
