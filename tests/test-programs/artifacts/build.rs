//! Builds the guest programs of `../guest` and the wasi:http proxy of `../http-guest`
//! for wasm32-wasip2 and the WAT files of `../wat`, then writes `programs.rs`: one
//! `&str` constant per program holding the path of its `.wasm` (`ECHO`, `HELLO`,
//! `HTTP_ECHO`, `PROC_EXIT`, ...).
//!
//! As wasmtime's `test-programs-artifacts` does, the guests are built by a nested cargo
//! with its own target dir: sharing ours would deadlock on cargo's build-directory lock.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let programs = manifest_dir.parent().unwrap();
    let guest = programs.join("guest");
    let http_guest = programs.join("http-guest");
    let wat_dir = programs.join("wat");

    ensure_target(TARGET);
    // Not for these programs: `cargo cloudpipe submit` builds jobs for wasm32-wasip1,
    // and its tests (sdk-rust/cargo-cloudpipe) run in the same `cargo test --workspace`.
    ensure_target("wasm32-wasip1");
    let mut consts = String::new();
    let target_dir = out_dir.join("guest-target");
    for (name, path) in build_guests(&guest, &target_dir) {
        consts += &constant(&name, &path);
    }
    let (name, path) = build_proxy(&http_guest, &target_dir);
    consts += &constant(&name, &path);
    for (name, path) in build_wat(&wat_dir, &out_dir) {
        consts += &constant(&name, &path);
    }
    fs::write(out_dir.join("programs.rs"), consts).unwrap();
}

/// A fresh machine may lack the guests' target: add it (as `rustup target add` would
/// be the first thing a developer is told to run) rather than fail the whole build.
fn ensure_target(target: &str) {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir =
        Command::new(&rustc).args(["--print", "target-libdir", "--target", target]).output();
    let installed = libdir
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| Path::new(String::from_utf8_lossy(&o.stdout).trim()).exists());
    if installed {
        return;
    }
    println!("cargo:warning=the {target} target is missing; running `rustup target add {target}`");
    let added = Command::new("rustup").args(["target", "add", target]).status();
    assert!(
        added.is_ok_and(|s| s.success()),
        "the {target} target is missing and `rustup target add {target}` failed: install it and build again"
    );
}

/// Runs cargo on the guest crate; returns (bin name, path of its component).
fn build_guests(guest: &Path, target_dir: &Path) -> Vec<(String, PathBuf)> {
    cargo_build(guest, target_dir);
    let mut bins: Vec<(String, PathBuf)> = fs::read_dir(guest.join("src/bin"))
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let stem = path.file_stem()?.to_str()?.to_string();
            (path.extension()? == "rs").then_some(stem)
        })
        .map(|name| {
            let wasm = target_dir.join(TARGET).join("release").join(format!("{name}.wasm"));
            assert!(wasm.exists(), "{} was not built", wasm.display());
            (name, wasm)
        })
        .collect();
    bins.sort();
    bins
}

/// Runs cargo on a proxy crate (one `cdylib`, named after its package); returns (its
/// name, path of its component).
fn build_proxy(dir: &Path, target_dir: &Path) -> (String, PathBuf) {
    cargo_build(dir, target_dir);
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let name = manifest
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .map(|n| n.trim().trim_matches('"').to_string())
        .expect("the proxy crate's package name");
    let wasm = target_dir.join(TARGET).join("release").join(format!("{name}.wasm"));
    assert!(wasm.exists(), "{} was not built", wasm.display());
    (name, wasm)
}

/// `cargo build --release --target wasm32-wasip2` of the crate in `dir`.
fn cargo_build(dir: &Path, target_dir: &Path) {
    for watched in ["Cargo.toml", "Cargo.lock", "src"] {
        println!("cargo:rerun-if-changed={}", dir.join(watched).display());
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(TARGET)
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        // Flags meant for our host build must not reach the guests.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    let status = cmd.status().expect("running cargo for the guest programs");
    assert!(
        status.success(),
        "building the guest programs of {} failed (is the {TARGET} target installed? `rustup target add {TARGET}`)",
        dir.display()
    );
}

/// Assembles every `*.wat` of `dir` into `out_dir`; returns (file stem, path).
fn build_wat(dir: &Path, out_dir: &Path) -> Vec<(String, PathBuf)> {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut built = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "wat") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let wasm = wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let out = out_dir.join(format!("{name}.wasm"));
        fs::write(&out, wasm).unwrap();
        built.push((name, out));
    }
    built.sort();
    built
}

fn constant(name: &str, path: &Path) -> String {
    format!("pub const {}: &str = {:?};\n", name.to_uppercase(), path.to_str().unwrap())
}
