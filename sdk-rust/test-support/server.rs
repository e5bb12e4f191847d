//! The real `cloudpipe serve` for the SDK's tests (`#[path]`-included by the test
//! binaries of `cloudpipe` and `cargo-cloudpipe`, each using part of it).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The admin key every test server is started with.
pub const KEY: &str = "sdk-test-admin-key-0123456789abcdef";

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The `cloudpipe` server binary. `cargo test --workspace` has built it (for
/// cloudpipe-api's tests) and it is used as it is when newer than the server's
/// sources; otherwise (these crates tested alone, after an edit) it is built here.
/// Building it here with `-p cloudpipe-api` resolves features for that package alone,
/// which would recompile wasmtime: the workspace's own build is preferred.
pub fn server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let built = target.join("debug").join("cloudpipe");
        let newest_source = ["api/src", "api/types/src", "runtime/src", "Cargo.lock"]
            .iter()
            .filter_map(|p| newest_mtime(&root.join(p)))
            .max();
        let built_at = std::fs::metadata(&built).and_then(|m| m.modified()).ok();
        if let (Some(b), Some(s)) = (built_at, newest_source)
            && b >= s
        {
            return built;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        without_test_env(&mut cmd);
        let out = cmd
            .args(["build", "-p", "cloudpipe-api", "--bin", "cloudpipe", "--message-format=json"])
            .current_dir(workspace())
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build for the server");
        assert!(out.status.success(), "building the server failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "cloudpipe")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo named no cloudpipe executable")
    })
}

/// Removes what cargo sets for a test process (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...)
/// from a command that runs cargo: build scripts that watch these variables (ring's
/// does) would otherwise rebuild on every switch between the outer and the nested build.
pub fn without_test_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let set_for_tests = matches!(
            k,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_PRIMARY_PACKAGE"
                | "OUT_DIR"
        ) || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_");
        if set_for_tests {
            cmd.env_remove(k);
        }
    }
}

/// A `cloudpipe serve` child with its own data directory, started with [`KEY`] as
/// its admin key; killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    _data: tempfile::TempDir,
}

impl Server {
    /// A server on a port the OS picks.
    pub fn start() -> Server {
        Server::start_on("127.0.0.1:0")
    }

    /// A server listening on `addr`; waits until it serves.
    pub fn start_on(addr: &str) -> Server {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(server_bin())
            .args(["serve", "--listen", addr, "--data-dir"])
            .arg(data.path().join("data"))
            .env("CLOUDPIPE_ADMIN_KEY", KEY)
            // Where the server writes its credentials file on first start: not $HOME.
            .env("CLOUDPIPE_CREDENTIALS", data.path().join("server-credentials.json"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting cloudpipe serve");
        let lines = lines_of(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut log = String::new();
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = lines.recv_timeout(left) else {
                let _ = child.kill();
                panic!("cloudpipe serve did not start:\n{log}");
            };
            log.push_str(&line);
            log.push('\n');
            if line.contains("cloudpipe serving")
                && let Some(a) = line.split_whitespace().find_map(|w| w.strip_prefix("listen="))
            {
                break format!("http://{a}");
            }
        };
        // Keep draining the log so that the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, url, _data: data }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a reader, as they come, through a channel (so callers can time out).
pub fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The newest modification time of a file or of anything under a directory.
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path).ok()?.filter_map(|e| newest_mtime(&e.ok()?.path())).max()
}
