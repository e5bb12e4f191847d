//! The smallest useful command: the benchmark's guest.
fn main() {
    println!("hello, world");
}
