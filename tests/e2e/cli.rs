use std::process::Command;

#[test]
fn up_runs_the_bundled_example_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloudpipe"))
        .args(["up", "--once", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("CLOUDPIPE_ADMIN_KEY")
        .env("CLOUDPIPE_CREDENTIALS", dir.path().join("credentials.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("hello, cloudpipe!\n"), "{stdout}");
    assert!(stdout.contains(": succeeded"), "{stdout}");
    assert!(stdout.contains("Created the admin account"), "{stdout}");
    assert!(dir.path().join("credentials.json").exists());
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut s = crate::server::TestServer::start(&[]).await;
    let status = s.terminate();
    assert_eq!(status.code(), Some(0), "{}", s.log());
}
