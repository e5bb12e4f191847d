//! Sleeps `argv[1]` seconds (default 60): blocked in a host call, not in wasm.
fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .map(|n| n.parse().unwrap())
        .unwrap_or(60);
    println!("sleeping");
    std::thread::sleep(std::time::Duration::from_secs(secs));
    println!("woke up");
}
