//! Builds the parts of the server that run inside its sandboxes, so that a plain
//! `cargo build` (or `cargo install --path api`) gives a server with every executor:
//!
//! - the vm executor's guest agent (`../guest-runners/vm-agent`), a static binary for
//!   `x86_64-unknown-linux-musl`, written to `$OUT_DIR/cloudpipe-vm-agent` and
//!   embedded by `main.rs`.
//!
//! As the test programs' build script does, the agent is built by a nested cargo with
//! its own target directory (sharing ours would deadlock on cargo's build lock), and a
//! missing target is added with rustup. When the agent cannot be built (no rustup, no
//! network for the target) the build goes on with an empty file and a warning: the
//! server then reports the vm executor as not ready, saying why and what to do.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let agent_dir = manifest_dir.join("../guest-runners/vm-agent");
    let out = out_dir.join("cloudpipe-vm-agent");
    match build_agent(&agent_dir, &out_dir.join("vm-agent-target")) {
        Ok(binary) => {
            fs::copy(&binary, &out).unwrap();
        }
        Err(why) => {
            println!(
                "cargo:warning=the vm guest agent was not built ({why}); this server's vm executor will not be ready"
            );
            fs::write(&out, b"").unwrap();
        }
    }
}

/// Builds the agent; returns the path of the static binary.
fn build_agent(dir: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    for watched in ["Cargo.toml", "Cargo.lock", "src"] {
        println!("cargo:rerun-if-changed={}", dir.join(watched).display());
    }
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Err("the vm executor runs on Linux only".into());
    }
    ensure_target(AGENT_TARGET)?;
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--target", AGENT_TARGET, "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        // Flags meant for the server's own build must not reach the guest's.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of {} failed", dir.display()));
    }
    let binary = target_dir.join(AGENT_TARGET).join("release/cloudpipe-vm-agent");
    match binary.is_file() {
        true => Ok(binary),
        false => Err(format!("{} was not built", binary.display())),
    }
}

/// A fresh machine may lack the target: add it, as `rustup target add` would be the
/// first thing a developer is told to run.
fn ensure_target(target: &str) -> Result<(), String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir =
        Command::new(&rustc).args(["--print", "target-libdir", "--target", target]).output();
    let installed = libdir
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| Path::new(String::from_utf8_lossy(&o.stdout).trim()).exists());
    if installed {
        return Ok(());
    }
    println!("cargo:warning=the {target} target is missing; running `rustup target add {target}`");
    match Command::new("rustup").args(["target", "add", target]).status() {
        Ok(s) if s.success() => Ok(()),
        _ => Err(format!("the {target} target is missing: rustup target add {target}")),
    }
}
