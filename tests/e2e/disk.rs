//! A full disk loses nothing and stops nobody for good: the server's data directory on
//! a small tmpfs this test mounts (as root), filled from outside while jobs run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloudpipe_test_programs_artifacts as programs;
use reqwest::StatusCode;
use serde_json::json;

use crate::server::{TestServer, code, program};

/// A tmpfs of a few MiB, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_mib: u64) -> SmallDisk {
        #[allow(unsafe_code)]
        let root = unsafe { libc::geteuid() } == 0;
        assert!(root, "this test mounts a tmpfs and must run as root (as CI does)");
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "cloudpipe-test"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", dir.path().display());
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Writes a filler file until `leave` bytes are free (or the disk is full).
    fn fill_to(&self, name: &str, leave: u64) -> PathBuf {
        let path = self.path().join(name);
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let chunk = vec![0x5a; 64 << 10];
        while self.free() > leave {
            let want = (self.free() - leave).min(chunk.len() as u64) as usize;
            if f.write_all(&chunk[..want.max(4096).min(chunk.len())]).is_err() {
                break;
            }
            let _ = f.sync_data();
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_new_work_keeps_reads_and_results_and_recovers_by_itself() {
    let disk = SmallDisk::mount(24);
    let data = disk.path().join("data");
    let mut s =
        TestServer::start_in(&data, &["--min-free-disk-mb", "4", "--concurrency", "4"]).await;
    s.upload("nap", &program(programs::SLEEP)).await;
    s.upload("hello", &program(programs::HELLO)).await;
    let done = s.run(json!({"function": "hello"})).await;
    assert_eq!(done["status"], "succeeded");
    let (st, health) = s.get("/healthz").await;
    assert_eq!((st, health["status"].as_str()), (StatusCode::OK, Some("ok")), "{health}");

    // Two jobs running when the disk fills: a short one, and one that outlives even
    // the reserve.
    let (_, short) = s.post_json("/v1/jobs", &json!({"function": "nap", "args": ["2"]})).await;
    // Long enough to be running still when the disk is full, even on a loaded machine.
    let long_ends = std::time::Instant::now() + Duration::from_secs(10);
    let (_, long) = s.post_json("/v1/jobs", &json!({"function": "nap", "args": ["10"]})).await;
    let (short, long) =
        (short["id"].as_str().unwrap().to_string(), long["id"].as_str().unwrap().to_string());

    // Another process takes the disk down to 2 MiB: under the 4 MiB reserve.
    let filler = disk.fill_to("filler", 2 << 20);
    for _ in 0..5 {
        let (st, body) = s.post_json("/v1/jobs", &json!({"function": "hello"})).await;
        assert_eq!(st, StatusCode::INSUFFICIENT_STORAGE, "{body}");
        assert_eq!(code(&body), "storage_full");
        assert!(body["error"]["message"].as_str().unwrap().contains("disk is full"), "{body}");
    }
    let res = s
        .client
        .post(format!("{}/v1/jobs", s.url))
        .json(&json!({"function": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INSUFFICIENT_STORAGE);
    assert!(res.headers().get("retry-after").is_some(), "507 carries Retry-After");
    let (st, body) = s
        .request(reqwest::Method::POST, "/v1/functions?name=more", Some(program(programs::ECHO)))
        .await;
    assert_eq!((st, code(&body)), (StatusCode::INSUFFICIENT_STORAGE, "storage_full"), "{body}");
    // Reads go on, keys are checked as ever.
    let (st, list) = s.get("/v1/jobs?limit=10").await;
    assert_eq!(st, StatusCode::OK, "{list}");
    let (st, _) = s.get("/v1/me").await;
    assert_eq!(st, StatusCode::OK);
    let (st, health) = s.get("/healthz").await;
    assert_eq!((st, health["status"].as_str()), (StatusCode::OK, Some("degraded")), "{health}");
    assert!(health["reason"].as_str().unwrap().contains("disk is full"), "{health}");

    // The short job ends inside the reserve: its result is kept.
    let job = s.wait_terminal(&short).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // Now the disk is full to the last block: the long job's result cannot be written
    // when it ends; it is kept and retried, and lands once space returns.
    let filler2 = disk.fill_to("filler2", 0);
    let (st, running) = s.get(&format!("/v1/jobs/{long}")).await;
    assert_eq!((st, running["status"].as_str()), (StatusCode::OK, Some("running")), "{running}");
    // It ends while the disk is full; its result waits for space.
    tokio::time::sleep_until((long_ends + Duration::from_secs(2)).into()).await;
    let (st, still) = s.get(&format!("/v1/jobs/{long}")).await;
    assert_eq!(st, StatusCode::OK, "reads work on a full disk: {still}");
    std::fs::remove_file(&filler2).unwrap();
    std::fs::remove_file(&filler).unwrap();
    let job = s.wait_terminal(&long).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // Resumed by itself.
    let started = Instant::now();
    let done = s.run(json!({"function": "hello"})).await;
    assert_eq!(done["status"], "succeeded");
    assert!(started.elapsed() < Duration::from_secs(10));
    let (_, health) = s.get("/healthz").await;
    assert_eq!(health["status"], "ok", "{health}");

    // Said once each way, however many requests were refused.
    assert_eq!(s.terminate().code(), Some(0));
    let log = s.log();
    let full = log.lines().filter(|l| l.contains("disk is nearly full")).count();
    let back = log.lines().filter(|l| l.contains("disk space is back")).count();
    assert_eq!((full, back), (1, 1), "{log}");
    assert!(!log.contains("internal error"), "{log}");
    let retries = log.lines().filter(|l| l.contains("recording outcome failed")).count();
    assert!(retries <= 1, "one line for the retried outcome, not one per retry:\n{log}");
}
