//! A throwaway PostgreSQL for tests and benchmarks: `initdb` into a temporary
//! directory, `postgres` on a free loopback port, gone with the process that started
//! it (its parent-death signal is SIGKILL). Needs Debian's `postgresql` package; when
//! it is missing, starting one panics with the command that installs it, so a test
//! that needs PostgreSQL never passes without it.
//!
//! Plain `std`, so that the end-to-end tests and benchmarks include this file with
//! `#[path]`. As root, PostgreSQL runs as the `postgres` user (it refuses root).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running test cluster. Dropping it kills the server and removes its files.
pub struct TestDb {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    child: Mutex<Option<Child>>,
}

/// One cluster shared by the tests of a process, started on first use by a thread
/// that lives as long as the process (the parent-death signal follows the thread).
pub fn shared() -> &'static TestDb {
    static DB: OnceLock<&'static TestDb> = OnceLock::new();
    DB.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let db: &'static TestDb = Box::leak(Box::new(TestDb::start()));
            tx.send(db).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("starting the test PostgreSQL")
    })
}

/// The directory holding `initdb` and `postgres`: the newest of Debian's
/// `/usr/lib/postgresql/N/bin`, else whatever `PATH` has.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(newest) = versions.pop() {
        return newest;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("postgres").exists() && dir.join("initdb").exists() {
            return dir;
        }
    }
    panic!(
        "PostgreSQL is not installed, and this test needs a real one: \
         apt-get install -y postgresql (.ci/run installs it)"
    );
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `program args…` as the `postgres` user when we are root, with `pdeathsig`.
fn command(program: &Path, pdeathsig: bool) -> Command {
    let mut cmd = Command::new("setpriv");
    if is_root() {
        cmd.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]);
    }
    if pdeathsig {
        cmd.arg("--pdeathsig=KILL");
    }
    cmd.arg("--").arg(program);
    cmd.env("LC_ALL", "C");
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TestDb {
    /// Creates and starts a new cluster (a few seconds).
    pub fn start() -> TestDb {
        let bin = bin_dir();
        let base = std::env::temp_dir().join(format!(
            "cloudpipe-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&base).unwrap();
        if is_root() {
            let status = Command::new("chown").arg("postgres:postgres").arg(&base).status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "chown postgres {}: is the postgres user there? (apt-get install -y postgresql)",
                base.display()
            );
        }
        let data = base.join("data");
        let out = command(&bin.join("initdb"), false)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .expect("running initdb (setpriv from util-linux is needed too)");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let db = TestDb { port: free_port(), dir: base, bin, child: Mutex::new(None) };
        db.start_server();
        db
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The URL of database `name`, created if needed.
    pub fn database(&self, name: &str) -> String {
        let psql = self.bin.join("psql");
        let out = Command::new(&psql)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-Atc"])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .output()
            .expect("running psql");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() || err.contains("already exists"), "createdb {name}: {err}");
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn start_server(&self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        if is_root() {
            let _ = Command::new("chown").arg("postgres:postgres").arg(self.log_path()).status();
        }
        let child = command(&self.bin.join("postgres"), true)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=400",
                "-c",
                "shared_buffers=128MB",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        *self.child.lock().unwrap() = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = "database system is ready to accept connections";
        loop {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            // Count readiness lines: a restart adds one more.
            let starts = log.matches("starting PostgreSQL").count();
            if starts > 0 && log.matches(ready).count() >= starts {
                return;
            }
            if let Some(child) = self.child.lock().unwrap().as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("postgres exited ({status}): {log}");
            }
            assert!(Instant::now() < deadline, "postgres did not start in 60 s: {log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: clients are disconnected, nothing committed
    /// is lost) and waits for it to exit.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // setpriv execs postgres, so the child's pid is the postmaster's.
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// Starts the server again after [`TestDb::stop`], on the same port and data.
    pub fn restart(&self) {
        self.stop();
        self.start_server();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
