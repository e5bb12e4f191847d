//! Echoes its inputs so a test can check each one exactly.
//!
//! stdout: `argv=<argv as debug list>`, the `CLOUDPIPE_*` variables, `GREETING`, the
//! number of environment variables, then `stdin=` and stdin's bytes.
//! stderr: `to stderr`. An argument `--exit=N` makes it exit with N.
use std::io::{Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).unwrap();

    let mut out = std::io::stdout().lock();
    writeln!(out, "argv={args:?}").unwrap();
    for name in [
        "CLOUDPIPE_JOB_ID",
        "CLOUDPIPE_FUNCTION",
        "CLOUDPIPE_ATTEMPT",
        "GREETING",
    ] {
        writeln!(out, "{name}={}", std::env::var(name).unwrap_or_default()).unwrap();
    }
    writeln!(out, "env_count={}", std::env::vars().count()).unwrap();
    write!(out, "stdin=").unwrap();
    out.write_all(&stdin).unwrap();
    out.flush().unwrap();
    eprintln!("to stderr");

    let code = args
        .iter()
        .find_map(|a| a.strip_prefix("--exit="))
        .map(|n| n.parse().unwrap());
    if let Some(code) = code {
        std::process::exit(code);
    }
}
