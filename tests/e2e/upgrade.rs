//! Upgrades keep the data: a store written in the format before accounts (by the
//! writer kept for this in `store::format::legacy`) is served by the real binary; a
//! store from a newer Cloudpipe is refused with both versions named.

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
