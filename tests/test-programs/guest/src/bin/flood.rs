//! Writes `argv[1]` MiB (default 200) of `x` to stdout, then `done` to stderr.
use std::io::Write;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().unwrap())
        .unwrap_or(200);
    let chunk = vec![b'x'; 64 << 10];
    let mut out = std::io::stdout().lock();
    for _ in 0..mib * 16 {
        out.write_all(&chunk).unwrap();
    }
    out.flush().unwrap();
    eprintln!("done");
}
