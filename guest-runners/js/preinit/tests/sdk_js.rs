//! The JS runner and the JS SDK, tested as part of `cargo test --workspace`: sdk-js's
//! node:test suite (`sdk-js/test/`) against the real `cloudpipe` server with the real
//! runner built in, the browser test (headless Chromium) included.
//!
//! 1. `guest-runners/js/build.sh --preinit <this crate's binary>` compiles the runner
//!    for wasm32-wasip2 (cargo in the runner's own workspace: nothing to do when it is
//!    up to date) and pre-initialises it, checking the snapshot with one job, into
//!    `dist/runner-js.wasm`.
//! 2. The server is the `cloudpipe` binary beside this crate's binary (`target/debug`):
//!    `cargo test --workspace` builds it for cloudpipe-api's tests. When it is missing or
//!    older than the server's sources (this crate tested alone), `cargo build -p
//!    cloudpipe-api --bin cloudpipe` builds it; the build directory is free by then.
//!    `CLOUDPIPE_BIN` names another server binary.
//! 3. `node --test` on sdk-js's test files, with `CLOUDPIPE_BIN` and
//!    `CLOUDPIPE_RUNNER_JS` pointing at both.
//! 4. The runner the `cloudpipe` binary carries is the committed
//!    `guest-runners/js/runner-js.wasm` (built by build.sh; a machine installing the
//!    server need not have clang). When the rebuilt one differs from it byte for byte
//!    (paths and tool versions end up in the binary), the suite runs again on the
//!    committed one: both must pass the same tests. To refresh the committed one:
//!    `cp guest-runners/js/dist/runner-js.wasm guest-runners/js/runner-js.wasm`.
//!
//! A missing tool (node, Chromium, clang, wasi-libc) fails the test with the command
//! that installs it: nothing here is skipped.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// The whole node suite takes well under a minute; past this it is hung (a browser
/// that never reports, a server that never answers) and is killed.
const NODE_SUITE_LIMIT: Duration = Duration::from_secs(600);

const PREINIT: &str = env!("CARGO_BIN_EXE_cloudpipe-runner-js-preinit");

#[test]
fn sdk_js_suite_passes_against_the_real_server_and_runner() {
    let root = workspace_root();
    let node = require_node();
    require_chromium();

    let started = Instant::now();
    let runner = build_runner(&root);
    println!("runner built and pre-initialised in {:.1?}", started.elapsed());

    let server = server_binary(&root);

    let sdk = root.join("sdk-js");
    let mut tests = Vec::new();
    collect_test_files(&sdk.join("test"), &mut tests);
    tests.sort();
    assert!(!tests.is_empty(), "no *.test.js under {}", sdk.join("test").display());

    let committed = root.join("guest-runners/js/runner-js.wasm");
    let same = std::fs::read(&committed).ok() == std::fs::read(&runner).ok();
    println!(
        "the rebuilt runner is {} the committed {}",
        if same { "byte for byte" } else { "not byte for byte" },
        committed.display()
    );
    let mut runners = vec![runner];
    if !same {
        assert!(committed.is_file(), "{} is missing", committed.display());
        runners.push(committed);
    }
    for runner in runners {
        run_suite(&node, &sdk, &tests, &server, &runner);
    }
}

/// `node --test` of `tests` with the server `server` running `runner`; fails loudly.
fn run_suite(node: &str, sdk: &Path, tests: &[PathBuf], server: &Path, runner: &Path) {
    let started = Instant::now();
    let mut cmd = Command::new(node);
    cmd.arg("--test")
        .args(tests)
        .current_dir(sdk)
        .env("CLOUDPIPE_BIN", server)
        .env("CLOUDPIPE_RUNNER_JS", runner);
    let (ok, output) = run_with_limit(cmd, NODE_SUITE_LIMIT);
    println!("node --test sdk-js/test/ on {} took {:.1?}", runner.display(), started.elapsed());
    println!("{output}");
    assert!(
        ok,
        "\n{bar}\nsdk-js's node:test suite FAILED (node's output above; run it alone with \
         `cd sdk-js && CLOUDPIPE_BIN={} CLOUDPIPE_RUNNER_JS={} node --test test/`)\n{bar}",
        server.display(),
        runner.display(),
        bar = "=".repeat(80),
    );
}

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..");
    root.canonicalize().unwrap_or(root)
}

/// Fails the test loudly, with what to run.
fn missing(what: &str, install: &str) -> ! {
    let bar = "=".repeat(80);
    panic!("\n{bar}\n{what}\nInstall it with:\n  {install}\n{bar}\n");
}

/// `node` (>= 18, the SDK's floor), or a loud failure.
fn require_node() -> String {
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let version = Command::new(&node).arg("--version").output();
    let Ok(version) = version.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) else {
        missing(
            "NO NODE: the JS SDK's tests (sdk-js/test/) run on Node.js >= 18.",
            "apt-get update && apt-get install -y nodejs",
        );
    };
    let major: u32 =
        version.trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    if major < 18 {
        missing(
            &format!("node {version} is too old: the JS SDK's tests need Node.js >= 18."),
            "apt-get update && apt-get install -y nodejs",
        );
    }
    node
}

/// Checked here, before minutes of building, with the browser test's own candidates
/// (sdk-js/test/browser.test.js).
fn require_chromium() {
    let mut candidates = std::env::var("CHROMIUM")
        .into_iter()
        .chain(["chromium", "chromium-browser", "google-chrome"].into_iter().map(String::from));
    let found = candidates.any(|c| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        missing(
            "NO CHROMIUM: sdk-js's browser test runs the SDK in headless Chromium \
             (or set CHROMIUM to a Chromium or Chrome binary).",
            "apt-get update && apt-get install -y chromium",
        );
    }
}

/// Runs build.sh with this crate's pre-initialiser; the pre-initialised runner's path.
/// build.sh fails loudly, naming the install command, without clang or wasi-libc.
fn build_runner(root: &Path) -> PathBuf {
    let dir = root.join("guest-runners/js");
    let output = Command::new("bash")
        .arg(dir.join("build.sh"))
        .arg("--preinit")
        .arg(PREINIT)
        .stdin(Stdio::null())
        .output()
        .expect("running guest-runners/js/build.sh");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "guest-runners/js/build.sh --preinit {PREINIT} failed ({}):\n{text}",
        output.status
    );
    // Its timings, for --nocapture.
    for line in text.lines().filter(|l| l.starts_with("build.sh:")) {
        println!("{line}");
    }
    let runner = dir.join("dist/runner-js.wasm");
    assert!(runner.exists(), "build.sh succeeded but {} is missing", runner.display());
    runner
}

/// The `cloudpipe` binary of this build (same target dir and profile as this crate's
/// binary), built first when it is missing or older than the server's sources.
/// `CLOUDPIPE_BIN`, as for the node suite alone, names another one.
fn server_binary(root: &Path) -> PathBuf {
    if let Some(bin) = std::env::var_os("CLOUDPIPE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.exists(), "CLOUDPIPE_BIN={} does not exist", bin.display());
        return bin;
    }
    let profile_dir = Path::new(PREINIT).parent().expect("the binary's directory");
    let server = profile_dir.join(format!("cloudpipe{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&server).and_then(|m| m.modified()).ok();
    let mut sources = vec![root.join("Cargo.lock"), root.join("Cargo.toml")];
    for krate in ["api", "types", "runtime", "sdk-rust/cloudpipe", "sdk-rust/cloudpipe-cli"] {
        sources.push(root.join(krate).join("Cargo.toml"));
        sources.push(root.join(krate).join("src"));
    }
    let newest = sources.iter().filter_map(|p| newest_mtime(p)).max();
    let fresh = matches!((built, newest), (Some(b), Some(n)) if b >= n);
    if fresh {
        return server;
    }
    println!(
        "{} is {}: building it",
        server.display(),
        if built.is_some() { "older than its sources" } else { "missing" }
    );
    let target_dir = profile_dir.parent().expect("the target dir");
    let profile = profile_dir.file_name().and_then(OsStr::to_str).unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--locked", "-p", "cloudpipe-api", "--bin", "cloudpipe"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(root);
    if profile != "debug" {
        cmd.args(["--profile", profile]);
    }
    let status = cmd.status().expect("running cargo build for the server");
    assert!(status.success(), "`cargo build -p cloudpipe-api --bin cloudpipe` failed");
    assert!(server.exists(), "cargo built no {}", server.display());
    server
}

/// The newest modification time of a file, or of any file under a directory.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path).ok()?.filter_map(|e| newest_mtime(&e.ok()?.path())).max()
}

fn collect_test_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().and_then(OsStr::to_str).unwrap_or("");
        if path.is_dir() {
            collect_test_files(&path, out);
        } else if name.ends_with(".test.js") || name.ends_with(".test.mjs") {
            out.push(path);
        }
    }
}

/// Runs `cmd` (stdout and stderr merged in the answer) for at most `limit`; past it,
/// kills its process group (node and the servers and browsers it started).
fn run_with_limit(mut cmd: Command, limit: Duration) -> (bool, String) {
    use std::os::unix::process::CommandExt as _;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for node") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ =
                Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = stdout.join().unwrap();
    let err = stderr.join().unwrap();
    if !err.is_empty() {
        text += "\n--- stderr ---\n";
        text += &err;
    }
    match status {
        Some(s) => (s.success(), text),
        None => (false, format!("{text}\n--- KILLED: still running after {limit:?} ---")),
    }
}
