//! End-to-end: the real `cargo cloudpipe` binary against the real `cloudpipe serve`,
//! on crates made by `cargo cloudpipe new` in a temporary directory.
//!
//! The server binary is built once per run (`cargo build -p cloudpipe-api --bin
//! cloudpipe`); the guests build for wasm32-wasip1 (jobs) and wasm32-wasip2 (HTTP
//! functions, `--component`) into one shared target directory
//! (`target/cloudpipe-guests`), so their dependencies compile once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cloudpipe_test_support::serve::ADMIN_KEY as KEY;
use cloudpipe_test_support::server;
use server::{Server, interrupt, lines_of, output_with_stdin, server_bin, workspace};

/// Where every guest of every test builds: beside the server's own build output.
fn guests_target() -> PathBuf {
    // server_bin() is TARGET/debug/cloudpipe.
    server_bin().parent().unwrap().parent().unwrap().join("cloudpipe-guests")
}

/// A server, and a scratch directory for the crates and credentials of one test.
struct Env {
    _server: Server,
    url: String,
    tmp: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        let server = Server::start();
        let url = server.url.clone();
        Env { _server: server, url, tmp: tempfile::tempdir().unwrap() }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `cargo cloudpipe ARGS` in `cwd`, configured by environment for this server.
    fn cmd(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cargo-cloudpipe"));
        server::without_test_env(&mut c);
        c.arg("cloudpipe")
            .args(args)
            .current_dir(cwd)
            .env("CLOUDPIPE_URL", &self.url)
            .env("CLOUDPIPE_API_KEY", KEY)
            .env("CLOUDPIPE_CREDENTIALS", self.dir().join("credentials.json"))
            .env("CARGO_TARGET_DIR", guests_target())
            .stdin(Stdio::null());
        c
    }

    fn run(&self, cwd: &Path, args: &[&str]) -> Output {
        self.cmd(cwd, args).output().expect("running cargo-cloudpipe")
    }

    /// `cargo cloudpipe new NAME STYLE...` in the scratch directory; the crate's path.
    fn new_crate(&self, name: &str, style: &[&str]) -> PathBuf {
        let guest = workspace().join("sdk-rust/cloudpipe-guest");
        let mut args = vec!["new", name, "--guest-path", guest.to_str().unwrap()];
        args.extend(style);
        let out = self.run(self.dir(), &args);
        assert_ok(&out, "new");
        self.dir().join(name)
    }

    /// A GET of the API with the admin key.
    fn api(&self, path: &str) -> serde_json::Value {
        let res = http::get(&format!("{}{path}", self.url), KEY);
        serde_json::from_str(&res).unwrap_or_else(|e| panic!("{path}: {e}: {res}"))
    }
}

/// A tiny blocking GET over the workspace's async reqwest, for checks from outside
/// the CLI.
mod http {
    pub fn get(url: &str, key: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let res = ::reqwest::Client::new().get(url).bearer_auth(key).send().await.unwrap();
            let status = res.status();
            let text = res.text().await.unwrap();
            assert!(status.is_success(), "GET {url}: {status} {text}");
            text
        })
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn command_submit_prints_output_and_propagates_the_exit_code() {
    let env = Env::start();
    let dir = env.new_crate("hello", &[]);

    let out = env.run(&dir, &["submit", "--", "a", "b"]);
    assert_ok(&out, "submit");
    assert_eq!(text(&out.stdout), "hello, a!\nhello, b!\n");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("Uploaded hello as sha256:"), "{stderr}");

    // Without arguments the function prints its usage and exits 1: so does submit.
    let out = env.run(&dir, &["submit"]);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert!(text(&out.stderr).contains("usage: hello NAME..."), "{}", text(&out.stderr));

    // Detached, then read back with `result`.
    let out = env.run(&dir, &["submit", "--detach", "-q", "--", "z"]);
    assert_ok(&out, "submit --detach");
    let id = text(&out.stdout).trim().to_string();
    let out = env.run(&dir, &["result", &id]);
    assert_ok(&out, "result");
    assert_eq!(text(&out.stdout), "hello, z!\n");
    let out = env.run(&dir, &["logs", &id]);
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "hello, z!\n".to_string()));
    let out = env.run(&dir, &["jobs", "--function", "hello", "--status", "succeeded"]);
    let listed = text(&out.stdout);
    assert_eq!(listed.lines().count(), 3, "a header and two jobs:\n{listed}");
    assert!(listed.lines().nth(1).unwrap().starts_with(&format!("{id}  succeeded")), "{listed}");
    // Cancelling a job that has ended leaves it as it was.
    let out = env.run(&dir, &["cancel", &id]);
    assert_eq!(text(&out.stdout), format!("{id} succeeded\n"));

    // A build that fails shows cargo's own diagnostics, and nothing is submitted.
    std::fs::write(dir.join("src/main.rs"), "fn main() { let x: u8 = \"no\"; }\n").unwrap();
    let out = env.run(&dir, &["submit"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("error[E0308]: mismatched types"), "{stderr}");
    assert!(stderr.contains("the build failed"), "{stderr}");

    // A server that is not there is named, with what to do.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = env.run(&dir, &["jobs", "--url", &format!("http://{closed}")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot reach the Cloudpipe server")
            && stderr.contains("Is the server running?"),
        "{stderr}"
    );
}

#[test]
fn a_plain_crate_that_exits_5_gives_a_job_with_exit_code_5() {
    let env = Env::start();
    let dir = env.dir().join("five");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    // No Cloudpipe crate at all: what any Rust user would write.
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"five\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("src/main.rs"),
        "fn main() {\n    println!(\"five\");\n    std::process::exit(5)\n}\n",
    )
    .unwrap();
    let out = env.run(&dir, &["submit"]);
    assert_eq!(out.status.code(), Some(5), "stderr:\n{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "five\n");
    let jobs = env.api("/v1/jobs?function=five");
    let job = &jobs["jobs"][0];
    assert_eq!((&job["status"], &job["exit_code"]), (&"failed".into(), &5.into()), "{job}");
    assert_eq!(env.api("/v1/functions/five")["kind"], "module");

    // Built as a component, a crate keeps its code through `cloudpipe_guest::exit`.
    let guest = workspace().join("sdk-rust/cloudpipe-guest");
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"five\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
             [dependencies]\ncloudpipe-guest = {{ path = {:?} }}\n\n[workspace]\n",
            guest.display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("src/main.rs"),
        "fn main() {\n    println!(\"seven\");\n    cloudpipe_guest::exit(7)\n}\n",
    )
    .unwrap();
    let out = env.run(&dir, &["submit", "--component"]);
    assert_eq!(out.status.code(), Some(7), "stderr:\n{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "seven\n");
    let jobs = env.api("/v1/jobs?function=five");
    assert_eq!(jobs["jobs"][0]["exit_code"], 7, "{jobs}");
    assert_eq!(env.api("/v1/functions/five")["kind"], "command");
}

#[test]
fn typed_add_of_3_and_4_returns_7() {
    let env = Env::start();
    let dir = env.new_crate("calc", &["--typed"]);

    let out = env.run(&dir, &["submit", "--fn", "add", "3", "4"]);
    assert_ok(&out, "submit --fn add");
    assert_eq!(text(&out.stdout), "7\n");

    let out = env.run(&dir, &["submit", "--wait", "-q", "--fn", "add", "40", "2"]);
    assert_ok(&out, "submit --wait");
    assert_eq!(text(&out.stdout), "42\n");

    // The uploaded crate, called from the client library.
    let config =
        cloudpipe::Config { api_key: Some(KEY.into()), ..cloudpipe::Config::new(&env.url) };
    let client = cloudpipe::blocking::Client::new(config).unwrap();
    assert_eq!(client.call::<i64>("calc", "add", (3, 4)).unwrap(), 7);
    let greeting: String = client.call("calc", "greet", ("you",)).unwrap();
    assert_eq!(greeting, "hello, you!");
    match client.call::<String>("calc", "greet", ("",)) {
        Err(cloudpipe::Error::JobFailed(job)) => {
            assert_eq!(job.exit_code, Some(1));
            assert!(job.stderr.contains("greet needs a name"), "{job:?}");
        }
        other => panic!("expected a failed job, got {other:?}"),
    }

    // A returned Err fails the job, its message on stderr.
    let out = env.run(&dir, &["submit", "--fn", "greet", "\"\""]);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("error: greet needs a name"), "{}", text(&out.stderr));

    // So do arguments of the wrong type.
    let out = env.run(&dir, &["submit", "-q", "--fn", "add", "3", "four"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("argument 2 (`b: i64`)"), "{}", text(&out.stderr));
}

#[test]
fn deploy_then_invoke_over_http() {
    let env = Env::start();
    let dir = env.new_crate("web", &["--http"]);
    let creds = env.dir().join("credentials.json");

    // Log in, then work from the credentials file alone.
    let out = env.run(&dir, &["login", "--url", &env.url, "--api-key", KEY, "--account", "admin"]);
    assert_ok(&out, "login");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
    assert_eq!(
        (saved["url"].as_str(), saved["api_key"].as_str()),
        (Some(env.url.as_str()), Some(KEY))
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let from_file = |args: &[&str]| {
        let mut c = env.cmd(&dir, args);
        c.env_remove("CLOUDPIPE_URL").env_remove("CLOUDPIPE_API_KEY");
        c.output().unwrap()
    };

    let out = from_file(&["deploy"]);
    assert_ok(&out, "deploy");
    let url = text(&out.stdout).trim().to_string();
    assert_eq!(url, format!("{}/fn/web", env.url));

    let body = http::get(&format!("{url}/hello?name=you"), KEY);
    assert_eq!(body, "hello, you!\n");

    let out = from_file(&["invoke", "web", "/hello?name=me"]);
    assert_ok(&out, "invoke");
    assert_eq!(text(&out.stdout), "hello, me!\n");
    let out = from_file(&["invoke", "web", "/echo", "-d", "ping"]);
    assert_eq!(text(&out.stdout), "ping");
    let out = from_file(&["invoke", "web", "/nowhere"]);
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(1), "not found\n".to_string()));

    // A wrong key is refused, and the error says what to do.
    let out = env
        .cmd(&dir, &["invoke", "web", "/hello"])
        .env("CLOUDPIPE_API_KEY", "wrong-key-0123456789")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "stdout: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("cargo cloudpipe login"), "{}", text(&out.stderr));
}

#[test]
fn ctrl_c_during_submit_cancels_the_job() {
    let env = Env::start();
    let dir = env.new_crate("sleeper", &[]);
    std::fs::write(
        dir.join("src/main.rs"),
        r#"use std::io::Write;
use std::time::Duration;
fn main() {
    // Late enough that `submit` follows the job by then.
    std::thread::sleep(Duration::from_millis(500));
    println!("started");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
    println!("not cancelled");
}
"#,
    )
    .unwrap();
    let mut child =
        env.cmd(&dir, &["submit"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    let stderr = lines_of(child.stderr.take().unwrap());
    match stdout.recv_timeout(Duration::from_secs(300)) {
        Ok(line) => assert_eq!(line, "started"),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "the job never said it started; stderr:\n{}",
                stderr.try_iter().collect::<Vec<_>>().join("\n")
            );
        }
    }
    let jobs = env.api("/v1/jobs?function=sleeper");
    assert_eq!(jobs["jobs"][0]["status"], "running", "{jobs}");
    let id = jobs["jobs"][0]["id"].as_str().unwrap().to_string();

    let status = interrupt(&mut child, Duration::from_secs(30));
    let log = stderr.iter().collect::<Vec<_>>().join("\n");
    assert_eq!(status.code(), Some(130), "stderr:\n{log}");
    assert!(log.contains(&format!("Cancelling job {id}")), "{log}");

    let job = env.api(&format!("/v1/jobs/{id}"));
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(!job["stdout"].as_str().unwrap().contains("not cancelled"));
}

#[test]
fn batch_runs_stdin_lines_summarises_and_exits_non_zero_on_failures() {
    let env = Env::start();
    let dir = env.new_crate("work", &[]);
    std::fs::write(
        dir.join("src/main.rs"),
        r#"fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    if arg == "bad" {
        eprintln!("bad input");
        std::process::exit(1);
    }
    if let Ok(secs) = arg.parse::<u64>() {
        std::thread::sleep(std::time::Duration::from_secs(secs));
    }
    println!("done {arg}");
}
"#,
    )
    .unwrap();
    let batch = |args: &[&str], input: &str| {
        output_with_stdin(&mut env.cmd(&dir, &[&["batch"], args].concat()), input.as_bytes())
    };
    let batch_id = |stderr: &str| {
        let line = stderr.lines().find(|l| l.contains(" batch ")).expect("no batch line");
        line.split("batch ").nth(1).unwrap().split(':').next().unwrap().to_string()
    };

    // Without --function the crate here is built and uploaded, as `submit` does.
    let out = batch(&["--split", "4", "--timeout", "30s"], "a\nbad\n\nb\nbad\nc\n");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert_eq!(text(&out.stdout), "3/5 !OK - 0 pending, 0 timeouts, 2 errors, 3 OK\n", "{stderr}");
    assert!(stderr.contains("Uploaded work as sha256:"), "{stderr}");
    let id = batch_id(&stderr);
    let out = env.run(&dir, &["jobs", "--batch", &id]);
    assert_eq!(text(&out.stdout).lines().count(), 6, "a header and 5 jobs:\n{}", text(&out.stdout));

    // --retry runs the two failures again (they fail again); --function names an
    // uploaded function, and `--` gives arguments before each input's words.
    let out = batch(&["-q", "--retry", &id], "");
    assert_eq!(out.status.code(), Some(1), "stderr:\n{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "3/5 !OK - 0 pending, 0 timeouts, 2 errors, 3 OK\n");
    let out = batch(&["--function", "work", "--retries", "1", "--", "x"], "0\n0\n");
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "2/2 OK\n");

    // Ctrl-C cancels the batch and says how to resume it.
    let mut child = env
        .cmd(&dir, &["batch", "--function", "work"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"60\n60\n").unwrap();
    }
    let stderr = lines_of(child.stderr.take().unwrap());
    let started = stderr.recv_timeout(Duration::from_secs(60)).expect("the batch never started");
    let id = batch_id(&started);
    let status = interrupt(&mut child, Duration::from_secs(30));
    let log = stderr.iter().collect::<Vec<_>>().join("\n");
    assert_eq!(status.code(), Some(130), "stderr:\n{log}");
    assert!(log.contains(&format!("cargo cloudpipe batch --resume {id}")), "{log}");
    let b = env.api(&format!("/v1/batches/{id}"));
    assert_eq!(
        (b["status"].as_str(), b["counts"]["pending"].as_u64()),
        (Some("cancelled"), Some(2))
    );
}
