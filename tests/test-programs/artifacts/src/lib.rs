//! Paths of the guest programs that the runtime's tests and benchmarks run, built by
//! this crate's build script (never committed as binaries).
//!
//! Components for wasm32-wasip2, from `tests/test-programs/guest/src/bin/*.rs`:
//! `HELLO`, `ECHO`, `LOOP_FOREVER`, `MEMORY_BOMB`, `RECURSION`, `FLOOD`,
//! `EXIT_WITH_CODE`, `SLEEP`, `CGI`. From `tests/test-programs/wat/*.wat`: the preview1 module
//! `PROC_EXIT`, and the refused `NO_START`, `UNKNOWN_IMPORT` and `LIBRARY`. The wasi:http
//! proxy `HTTP_ECHO`, from `tests/test-programs/http-guest` (see its `src/lib.rs`).
//!
//! ```no_run
//! let hello = std::fs::read(cloudpipe_test_programs_artifacts::HELLO).unwrap();
//! ```

include!(concat!(env!("OUT_DIR"), "/programs.rs"));

/// The bytes of a program, by one of the paths above.
pub fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}
