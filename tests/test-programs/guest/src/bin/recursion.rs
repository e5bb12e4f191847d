//! Recurses without end: the stack overflows and the guest traps.
#[allow(unconditional_recursion)]
fn depth(n: u64) -> u64 {
    let frame = std::hint::black_box([n; 16]);
    1 + depth(std::hint::black_box(frame[3] + 1))
}

fn main() {
    println!("{}", depth(0));
}
