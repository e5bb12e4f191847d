//! Allocates (and touches) 1 MiB blocks until memory runs out.
fn main() {
    let mut blocks = Vec::new();
    loop {
        let block = vec![1u8; 1 << 20];
        blocks.push(std::hint::black_box(block));
    }
}
