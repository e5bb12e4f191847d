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
    // The executors table, wasm first and always ready.
    assert!(stdout.contains("executors:\n  wasm       ready\n"), "{stdout}");
    // The JS runner is built in, and loaded before the table is printed.
    assert!(stdout.contains("\n  runner:js  ready\n"), "{stdout}");
    for name in ["docker", "vm"] {
        assert!(stdout.contains(&format!("\n  {name} ")), "{name} missing:\n{stdout}");
    }
}

#[test]
fn the_hint_of_up_works_pasted_into_a_new_shell() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudpipe"))
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("CLOUDPIPE_ADMIN_KEY")
        .env("CLOUDPIPE_CREDENTIALS", dir.path().join("credentials.json"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let hint = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("up ended without a hint:\n{seen}");
        };
        seen += &line;
        seen.push('\n');
        if seen.contains("Next, in another shell") && line.starts_with("  ") {
            break line.trim().to_string();
        }
    };
    // A new shell: nothing of this process's environment but PATH and an empty HOME.
    let out = Command::new("sh")
        .args(["-c", &hint])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", dir.path().join("home"))
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{hint}:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"admin\""), "{hint}:\n{stdout}");
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let mut s = crate::server::TestServer::start(&[]).await;
    let status = s.terminate();
    assert_eq!(status.code(), Some(0), "{}", s.log());
}
