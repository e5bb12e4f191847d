//! [`Server`]: the real `cloudpipe serve` for tests of crates that do not build the
//! binary themselves (the SDK's `cloudpipe` and `cargo-cloudpipe`): [`server_bin`]
//! finds it, or builds it when its sources are newer.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

use crate::serve::ADMIN_KEY;

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
        let newest_source = [
            "api/src",
            "types/src",
            "runtime/src",
            "sdk-rust/cloudpipe/src",
            "sdk-rust/cloudpipe-cli/src",
            "Cargo.lock",
        ]
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

/// A `cloudpipe serve` child with its own data directory, started with
/// [`ADMIN_KEY`](crate::serve::ADMIN_KEY) as its admin key; killed on drop.
pub struct Server {
    process: crate::serve::ServeProcess,
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
        let bin = server_bin().to_str().expect("a UTF-8 path").to_string();
        let process = crate::serve::spawn_serve_on(
            &bin,
            addr,
            &data.path().join("data"),
            &[],
            &[("CLOUDPIPE_ADMIN_KEY", ADMIN_KEY)],
        );
        Server { url: process.url.clone(), process, _data: data }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
    }
}

/// Runs `cmd` with `input` on its stdin (then closed) and its output captured.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Sends SIGINT (a Ctrl-C) to `child` and waits up to `limit` for it to exit.
pub fn interrupt(child: &mut std::process::Child, limit: std::time::Duration) -> ExitStatus {
    let pid = child.id().to_string();
    let ok = Command::new("kill").args(["-INT", &pid]).status().unwrap().success();
    assert!(ok, "kill -INT {pid}");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "process {pid} did not stop after Ctrl-C");
        std::thread::sleep(std::time::Duration::from_millis(50));
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
