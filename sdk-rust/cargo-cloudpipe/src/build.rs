//! Builds the current crate for WASI in release mode and finds the binary.
//!
//! Jobs (`submit`, `batch`) build for `wasm32-wasip1`: a core WASI module, whose
//! `proc_exit` carries the whole exit code, so `std::process::exit(5)` in a plain Rust
//! crate ends the job with code 5 (WASI 0.2's `exit` carries only ok or err, and Rust's
//! std on `wasm32-wasip2` can say no more). HTTP functions (`deploy`) build for
//! `wasm32-wasip2`: components, which is what `wasi:http` needs.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// What a build makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A core WASI preview1 module (`wasm32-wasip1`): what jobs run; keeps exit codes.
    Module,
    /// A WASI 0.2 component (`wasm32-wasip2`): HTTP functions, or jobs built with
    /// `--component`.
    Component,
}

impl Target {
    pub fn triple(self) -> &'static str {
        match self {
            Target::Module => "wasm32-wasip1",
            Target::Component => "wasm32-wasip2",
        }
    }
}

/// Which crate and binary to build.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BuildArgs {
    /// Path to the crate's Cargo.toml (default: the crate in the current directory).
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,
    /// The binary to build, when the crate has several.
    #[arg(long, value_name = "NAME")]
    pub bin: Option<String>,
}

/// A built function: its binary's name and path.
#[derive(Debug)]
pub struct Built {
    pub name: String,
    pub wasm: PathBuf,
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The directory builds run in: the manifest's, so that toolchain files apply.
fn crate_dir(args: &BuildArgs) -> PathBuf {
    match args.manifest_path.as_deref().and_then(Path::parent) {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fails with the exact command to run when the toolchain that builds the crate lacks
/// the target's standard library.
pub fn check_target(dir: &Path, target: Target) -> anyhow::Result<()> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running `{rustc} --print sysroot`: is Rust installed?"))?;
    if !out.status.success() {
        bail!("`{rustc} --print sysroot` failed");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    target_installed(&sysroot, target)
}

fn target_installed(sysroot: &Path, target: Target) -> anyhow::Result<()> {
    let triple = target.triple();
    if sysroot.join("lib/rustlib").join(triple).join("lib").is_dir() {
        return Ok(());
    }
    bail!(
        "the {triple} target is not installed for the toolchain at {}; install it with:\n\n    \
         rustup target add {triple}\n",
        sysroot.display()
    )
}

/// Runs `cargo build --release --target TRIPLE`, its progress and diagnostics going
/// straight to stderr, and returns the binary it built.
pub fn build(args: &BuildArgs, target: Target, quiet: bool) -> anyhow::Result<Built> {
    check_target(&crate_dir(args), target)?;
    let mut cmd = Command::new(cargo());
    cmd.args([
        "build",
        "--release",
        "--target",
        target.triple(),
        "--message-format=json-render-diagnostics",
    ]);
    if let Some(m) = &args.manifest_path {
        cmd.arg("--manifest-path").arg(m);
    }
    if let Some(b) = &args.bin {
        cmd.args(["--bin", b]);
    }
    if quiet {
        cmd.arg("--quiet");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .spawn()
        .context("running cargo")?;
    let mut bins = Vec::new();
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let is_bin = msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin"));
        if let (true, Some(exe)) = (is_bin, msg["executable"].as_str()) {
            let name = msg["target"]["name"].as_str().unwrap_or_default().to_string();
            bins.push(Built { name, wasm: PathBuf::from(exe) });
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("the build failed (cargo's output is above)");
    }
    match bins.len() {
        0 => bail!("the crate has no binary to run: a function is a `src/main.rs` (or a [[bin]])"),
        1 => Ok(bins.pop().expect("one")),
        _ => {
            let names: Vec<&str> = bins.iter().map(|b| b.name.as_str()).collect();
            bail!("the crate has several binaries ({}): pick one with --bin", names.join(", "))
        }
    }
}

/// A function name from a binary's name: lower case, and only the characters the
/// server accepts (`[a-z0-9][a-z0-9_-]{0,62}`).
pub fn function_name(bin: &str) -> anyhow::Result<String> {
    let name: String = bin.to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        bail!(
            "{bin:?} is not a usable function name (a-z, 0-9, `_` and `-`, at most 63): give one with --name"
        );
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sysroot_without_the_target_gives_the_rustup_command() {
        let dir = tempfile::tempdir().unwrap();
        let e = target_installed(dir.path(), Target::Module).unwrap_err().to_string();
        assert!(e.contains("rustup target add wasm32-wasip1"), "{e}");
        let e = target_installed(dir.path(), Target::Component).unwrap_err().to_string();
        assert!(e.contains("rustup target add wasm32-wasip2"), "{e}");
        std::fs::create_dir_all(dir.path().join("lib/rustlib/wasm32-wasip1/lib")).unwrap();
        target_installed(dir.path(), Target::Module).unwrap();
        assert!(target_installed(dir.path(), Target::Component).is_err());
    }

    #[test]
    fn function_names_follow_the_server_rules() {
        assert_eq!(function_name("My_Calc-2").unwrap(), "my_calc-2");
        assert!(function_name("_x").is_err());
        assert!(function_name(&"a".repeat(64)).is_err());
    }
}
