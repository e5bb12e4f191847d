//! Upgrades keep the data: a store written in the format before accounts (by the
//! writer kept for this in `store::format::legacy`) is served by the real binary; a
//! store from a newer Cloudpipe is refused with both versions named; a batch of
//! format 4 (inputs inline) keeps its inputs and runs on after the upgrade.

use cloudpipe_runtime::store::Backend;
use cloudpipe_runtime::store::format::{CURRENT, legacy};
use cloudpipe_test_programs_artifacts as programs;
use reqwest::StatusCode;

use crate::server::{TestServer, program};

#[tokio::test]
async fn a_store_from_before_accounts_is_served_its_data_owned_by_the_admin() {
    let data = tempfile::tempdir().unwrap();
    for backend in [Backend::Redb, Backend::Sled] {
        let dir = data.path().join(backend.as_str());
        let old = legacy::Format0::with_function("hello", program(programs::HELLO));
        let job_id = old.jobs[0]["id"].as_str().unwrap().to_string();
        legacy::write_format0(backend, &dir.join("store").join(backend.as_str()), &old).unwrap();

        let s = TestServer::start_in(&dir, &["--store", backend.as_str()]).await;
        let (st, f) = s.get("/v1/functions/hello").await;
        assert_eq!((st, f["account"].as_str()), (StatusCode::OK, Some("admin")), "{f}");
        // The job queued in the old format runs now, as the admin's.
        let job = s.wait_terminal(&job_id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["account"], "admin");
        assert_eq!(job["stdout"], "hello, world\n", "{job}");
        assert_eq!(job["tags"], serde_json::json!(["old"]), "its record read whole: {job}");
        assert!(s.log().contains("upgraded the store's format"), "{}", s.log());
        // New jobs of the old function run too.
        let again = s.run(serde_json::json!({"function": "hello", "args": ["again"]})).await;
        assert_eq!(again["status"], "succeeded", "{again}");
    }
}

#[test]
fn a_store_from_a_newer_cloudpipe_is_refused_naming_both_formats() {
    let data = tempfile::tempdir().unwrap();
    let store = data.path().join("store").join("redb");
    legacy::write_format_version(Backend::Redb, &store, CURRENT + 1).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudpipe"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("CLOUDPIPE_ADMIN_KEY", crate::server::ADMIN_KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("format {}", CURRENT + 1)), "{err}");
    assert!(err.contains(&format!("format {CURRENT}")), "{err}");
}

/// Format 4 → 5: a batch stored with its inputs inline (as format 4 wrote it) is
/// served after the upgrade, and a running one continues with its inputs.
#[tokio::test]
async fn a_format4_batch_keeps_its_inputs_and_continues_after_the_upgrade() {
    let data = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(data.path(), &[]).await;
    s.upload("echo", &program(programs::ECHO)).await;
    s.terminate();
    let id = cloudpipe_runtime::model::JobId::new().to_string();
    let inputs: Vec<Vec<String>> = (0..3).map(|i| vec![format!("word{i}")]).collect();
    let batch = serde_json::json!({
        "id": id, "account": "admin", "admin": true, "limits": {},
        "allow_network": false, "template": {"function": "echo"},
        "inputs": inputs, "split": 2, "retries": 0, "strikes": 0, "hook": null,
        "status": "running", "round": 0, "created_at": 1, "finished_at": null,
        "final_counts": null, "final_job_micros": 0, "hook_called": false
    });
    let store = data.path().join("store").join("redb");
    legacy::write_format4_batch(Backend::Redb, &store, &batch).unwrap();

    let s = TestServer::start_in(data.path(), &[]).await;
    assert!(s.log().contains("upgraded the store's format"), "{}", s.log());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let b = loop {
        let (st, b) = s.get(&format!("/v1/batches/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{b}");
        if b["status"] != "running" {
            break b;
        }
        assert!(std::time::Instant::now() < deadline, "the batch did not end: {b}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!((b["status"].as_str(), b["total"].as_u64()), (Some("finished"), Some(3)), "{b}");
    assert_eq!(b["counts"]["ok"], 3, "{b}");
    let (st, jobs) = s.get(&format!("/v1/jobs?batch={id}&include=output")).await;
    assert_eq!(st, StatusCode::OK, "{jobs}");
    for job in jobs["jobs"].as_array().unwrap() {
        let i = job["batch_index"].as_u64().unwrap();
        let stdout = job["stdout"].as_str().unwrap();
        assert!(stdout.starts_with(&format!("argv=[\"echo\", \"word{i}\"]")), "{job}");
    }
    let (st, list) = s.get("/v1/batches").await;
    assert_eq!((st, list["batches"][0]["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
}
