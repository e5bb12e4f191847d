//! Spins without ever calling the host: only epoch interruption can stop it.
fn main() {
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}
