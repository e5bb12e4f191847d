//! A CGI function for the HTTP invocation tests; what it answers depends on PATH_INFO:
//! - `/plain`: text with no CGI headers;
//! - `/status`: `Status: 404` with a body;
//! - `/redirect`: `Location` only;
//! - `/binary`: stdin echoed back as `application/octet-stream`;
//! - `/fail`: a line on stderr, exit code 2;
//! - `/loop`: spins for ever; `/sleep`: sleeps one second;
//! - anything else: the CGI variables it got, one `NAME=value` a line, and a header.
use std::io::{Read, Write};

fn main() {
    let var = |n: &str| std::env::var(n).unwrap_or_default();
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body).unwrap();
    let mut out = std::io::stdout().lock();
    match var("PATH_INFO").as_str() {
        "/plain" => write!(out, "just text").unwrap(),
        "/status" => write!(out, "Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope").unwrap(),
        "/redirect" => write!(out, "Location: /fn/cgi/elsewhere\n\n").unwrap(),
        "/binary" => {
            write!(out, "Content-Type: application/octet-stream\n\n").unwrap();
            out.write_all(&body).unwrap();
        }
        "/fail" => {
            eprintln!("something broke");
            std::process::exit(2);
        }
        "/loop" => loop {
            std::hint::black_box(&body);
        },
        "/sleep" => {
            std::thread::sleep(std::time::Duration::from_secs(1));
            write!(out, "slept").unwrap();
        }
        _ => {
            write!(out, "Content-Type: text/x-cgi-vars\nX-Reply: yes\n\n").unwrap();
            for name in [
                "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
                "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT", "REMOTE_ADDR", "HTTP_X_TEST",
                "HTTP_AUTHORIZATION", "GREETING",
            ] {
                writeln!(out, "{name}={}", var(name)).unwrap();
            }
            write!(out, "BODY=").unwrap();
            out.write_all(&body).unwrap();
        }
    }
    eprintln!("handled {}", var("PATH_INFO"));
}
