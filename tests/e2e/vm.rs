//! The vm executor with real QEMU (TCG here): jobs in clones of a template VM booted
//! from Debian's kernel and an initramfs of busybox and the guest agent
//! (`guest-runners/vm-agent`: the servers use the one built into the binary; the
//! executor-level fan-out test builds its own).
//!
//! The template's snapshot is cached by content under the target directory, so the
//! servers these tests start boot it once between them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::serve::{ADMIN_KEY, get_json, spawn_serve_with};
use crate::server::{TestServer, with};
use cloudpipe_runtime::executor::RunRequest;
use cloudpipe_runtime::executor::vm::{VmConfig, VmExecutor};

/// Checks that QEMU, a kernel and a static busybox are installed; panics saying what
/// to install otherwise.
fn tools_installed() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let install = "apt-get install -y qemu-system-x86 linux-image-amd64 busybox-static";
        let qemu = std::process::Command::new("qemu-system-x86_64").arg("--version").output();
        assert!(
            qemu.is_ok_and(|o| o.status.success()),
            "qemu-system-x86_64 is not installed: {install}"
        );
        let kernel = std::fs::read_dir("/boot")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"));
        assert!(kernel, "no kernel in /boot: {install}");
        let busybox = std::fs::read("/bin/busybox").unwrap_or_default();
        // A static ELF has no PT_INTERP program header; the guest has no libc.
        assert!(
            !busybox.is_empty() && !busybox.windows(13).any(|w| w == b"/lib64/ld-lin"),
            "/bin/busybox is missing or not static: {install}"
        );
    });
}

/// Builds the guest agent (once per process) for the executor-level tests.
fn agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    tools_installed();
    AGENT.get_or_init(|| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-runners/vm-agent/build.sh");
        let out = std::process::Command::new(&script).output().expect("running vm-agent/build.sh");
        assert!(
            out.status.success(),
            "building the guest agent failed (needs rustup's x86_64-unknown-linux-musl target): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// Where the tests' template snapshots are cached.
fn snapshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm-templates")
}

/// No agent setting: the server's own agent must do.
fn vm_env(pool: &str) -> Vec<(&'static str, String)> {
    tools_installed();
    vec![
        ("CLOUDPIPE_VM_SNAPSHOT_DIR", snapshot_dir().display().to_string()),
        ("CLOUDPIPE_VM_POOL", pool.to_string()),
    ]
}

async fn server(pool: &str) -> TestServer {
    let env = vm_env(pool);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestServer::start_env(&[], &env).await
}

/// A vm job running `sh -c script`.
fn sh(script: &str) -> Value {
    json!({"executor": "vm", "command": ["sh", "-c", script]})
}

#[tokio::test]
async fn vm_jobs_get_stdin_env_args_and_give_output_and_exit_codes() {
    let s = server("1").await;
    // Ready with no setting: QEMU is installed and the agent is the server's own.
    let (_, list) = s.get("/v1/executors").await;
    let vm = list["executors"].as_array().unwrap().iter().find(|e| e["name"] == "vm").unwrap();
    assert_eq!(vm["ready"], true, "{vm}");
    let job = s
        .run(with(
            sh(r#"cat; echo "FOO=$FOO job=$CLOUDPIPE_JOB_ID clone=$CLOUDPIPE_CLONE_ID/$CLOUDPIPE_CLONES"; echo "args: $0 $1"; echo oops >&2"#),
            json!({"args": ["first", "second"], "env": {"FOO": "bar"}, "stdin": "line one\n"}),
        ))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", s.log());
    assert_eq!(job["executor"], "vm");
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        job["stdout"],
        format!("line one\nFOO=bar job={id} clone=0/1\nargs: first second\n"),
        "{job}"
    );
    assert_eq!(job["stderr"], "oops\n");

    // Binary stdin comes back byte for byte.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(20_000).collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let job = s.run(with(sh("cat"), json!({"stdin_base64": b64}))).await;
    let raw = s
        .client
        .get(format!("{}/v1/jobs/{}/stdout", s.url, job["id"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&raw[..], &bytes[..]);

    let job = s.run(sh("echo partial; exit 7")).await;
    assert_eq!((job["status"].as_str(), job["exit_code"].as_i64()), (Some("failed"), Some(7)));
    assert_eq!(job["error"]["kind"], "exit");
    assert_eq!(job["stdout"], "partial\n");

    // No network device in the guest; a command that does not exist is exit 127.
    let job = s.run(sh("ls /sys/class/net | tr '\\n' ' '")).await;
    assert_eq!(job["stdout"], "lo ", "{job}");
    let job = s.run(json!({"executor": "vm", "command": ["/no/such/program"]})).await;
    assert_eq!(job["exit_code"], 127, "{job}");

    // Bad vm specs are 400 before anything runs.
    for (spec, what) in [
        (json!({"executor": "vm"}), "command"),
        (json!({"executor": "vm", "command": ["true"], "image": "x"}), "image"),
        (json!({"executor": "vm", "command": ["true"], "function": "f"}), "function"),
    ] {
        let (st, body) = s.post_json("/v1/jobs", &spec).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{spec}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(what), "{spec}: {body}");
    }
}

#[tokio::test]
async fn a_vm_job_past_its_timeout_or_cancelled_is_killed_and_memory_is_capped() {
    let s = server("1").await;
    let started = Instant::now();
    let job =
        s.run(with(sh("echo before; sleep 30; echo after"), json!({"timeout_ms": 3000}))).await;
    assert_eq!(job["status"], "timed_out", "{job}\n{}", s.log());
    assert_eq!(job["error"]["kind"], "timeout");
    assert_eq!(job["stdout"], "before\n", "output before the kill is kept");
    assert!(started.elapsed() < Duration::from_secs(25), "{:?}", started.elapsed());

    // Cancel kills a running clone.
    let (st, job) = s.post_json("/v1/jobs", &sh("echo started; sleep 30")).await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, j) = s.get(&format!("/v1/jobs/{id}")).await;
        if j["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "never ran: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, _) = s.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let done = s.wait_terminal(&id).await;
    assert_eq!(done["status"], "cancelled", "{done}");

    // The job's memory limit caps its address space inside the guest.
    let job = s
        .run(with(
            sh("dd if=/dev/zero bs=1M count=64 | od >/dev/null; echo status=$?; head -c 40000000 /dev/zero | sort >/dev/null"),
            json!({"memory_mb": 16}),
        ))
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    let err = job["stderr"].as_str().unwrap();
    assert!(err.contains("memory") || err.contains("Cannot allocate"), "{job}");
}

#[tokio::test]
async fn fan_out_runs_8_clones_with_distinct_ids_and_random_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let config = VmConfig {
        agent: Some(agent().to_path_buf()),
        snapshot_dir: Some(snapshot_dir()),
        run_dir: dir.path().join("vm"),
        instance: format!("fanout-test-{}", std::process::id()),
        pool_size: 0,
        ..VmConfig::default()
    };
    let vm = VmExecutor::new(config);
    vm.template_boot_time().await.expect("the template boots");
    let req = RunRequest {
        executor: "vm".into(),
        job_id: "fan-out".into(),
        function: "vm".into(),
        container: Some(cloudpipe_runtime::executor::ContainerRequest {
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo $CLOUDPIPE_CLONE_ID $CLOUDPIPE_CLONES $(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n') $(date +%s)".into(),
            ],
            ..Default::default()
        }),
        timeout: Duration::from_secs(60),
        memory_bytes: 64 << 20,
        output_cap: 1 << 20,
        ..Default::default()
    };
    let fan = vm.fan_out(req, 8).await.expect("fan-out");
    assert_eq!(fan.outcomes.len(), 8);
    let mut randoms = std::collections::HashSet::new();
    let host_now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
            as i64;
    for (i, o) in fan.outcomes.iter().enumerate() {
        assert_eq!(o.status, cloudpipe_types::JobStatus::Succeeded, "clone {i}: {o:?}");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "clone {i}: {out:?}");
        assert_eq!(fields[0], i.to_string(), "clone ids are 0..N-1 in order: {out:?}");
        assert_eq!(fields[1], "8");
        assert_eq!(fields[2].len(), 32, "{out:?}");
        randoms.insert(fields[2].to_string());
        let guest_now: i64 = fields[3].parse().unwrap();
        assert!((guest_now - host_now).abs() < 120, "the clone's clock is the host's: {out:?}");
    }
    assert_eq!(randoms.len(), 8, "each clone's RNG was reseeded: {randoms:?}");
    assert!(fan.ready <= fan.total);
    // Every clone is gone.
    drop(vm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(qemu_pids(dir.path()).is_empty(), "clones left: {:?}", qemu_pids(dir.path()));
}

/// Live QEMU processes whose arguments mention `data_dir` (their pidfile is there).
fn qemu_pids(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("qemu-system") && cmdline.contains(&needle)
        })
        .collect()
}

/// A field of `/proc/PID/status` (`Uid:` → its first value).
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn clones_run_sandboxed_as_their_own_user_in_an_empty_root() {
    let data = tempfile::tempdir().unwrap();
    let env = vm_env("1");
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("CLOUDPIPE_ADMIN_KEY", ADMIN_KEY));
    let s = TestServer::start_in_env(data.path(), &[], &env).await;
    let job = s.run(sh("echo inside")).await;
    assert_eq!(job["stdout"], "inside\n", "{job}\n{}", s.log());
    // The pool restores the next clone: find it (restored from its snapshot fd).
    let deadline = Instant::now() + Duration::from_secs(60);
    let clone = loop {
        let clones: Vec<u32> = qemu_pids(data.path())
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains("fd:3")
            })
            .collect();
        // Past QEMU's set-up: its ids have changed (or, not root, the sandbox is on).
        if let Some(pid) = clones.into_iter().find(|p| proc_status(*p, "Seccomp:") == "2") {
            break pid;
        }
        assert!(Instant::now() < deadline, "no restored clone:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cmdline = String::from_utf8(std::fs::read(format!("/proc/{clone}/cmdline")).unwrap())
        .unwrap()
        .replace('\0', " ");
    assert!(
        cmdline.contains("-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny"),
        "{cmdline}"
    );
    assert_eq!(proc_status(clone, "NoNewPrivs:"), "1", "{cmdline}");
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // QEMU drops to the clones' own user and chroots into an empty directory:
        // nothing of the data directory (store, secrets key) is in its reach.
        let deadline = Instant::now() + Duration::from_secs(10);
        while proc_status(clone, "Uid:") != "64999" {
            assert!(Instant::now() < deadline, "the clone still runs as root: {cmdline}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(proc_status(clone, "Gid:"), "64999");
        let root_dir = std::fs::read_link(format!("/proc/{clone}/root")).unwrap();
        assert_ne!(root_dir, Path::new("/"), "not chrooted: {cmdline}");
        assert_eq!(std::fs::read_dir(&root_dir).unwrap().count(), 0, "{}", root_dir.display());
        assert!(!root_dir.starts_with(data.path().join("store")));
    } else {
        assert!(cmdline.contains("elevateprivileges=deny"), "{cmdline}");
    }
    // And it still runs jobs.
    let job = s.run(sh("echo again")).await;
    assert_eq!(job["stdout"], "again\n", "{job}\n{}", s.log());
}

#[tokio::test]
async fn a_restart_after_kill_9_kills_the_qemu_processes_left_behind() {
    let data = tempfile::tempdir().unwrap();
    let env = vm_env("1");
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("CLOUDPIPE_ADMIN_KEY", ADMIN_KEY));
    let bin = env!("CARGO_BIN_EXE_cloudpipe");
    let mut first = spawn_serve_with(bin, data.path(), &[], &env);
    let client = crate::server::admin_client();
    let res = client
        .post(format!("{}/v1/jobs", first.url))
        .json(&sh("sleep 4; echo finished"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    // Wait until the job runs (its clone exists).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let job = get_json(&client, &format!("{}/v1/jobs/{id}", first.url)).await;
        if job["status"] == "running" && !qemu_pids(data.path()).is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the job never ran: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let left = qemu_pids(data.path());
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // QEMU dies with the server (PR_SET_PDEATHSIG), unless it changed its user (a
    // confined clone of a root server: the kernel clears the death signal then), in
    // which case the restart below kills it.
    let (dropped, kept): (Vec<u32>, Vec<u32>) =
        left.iter().partition(|p| !matches!(proc_status(**p, "Uid:").as_str(), "0" | ""));
    let deadline = Instant::now() + Duration::from_secs(10);
    while kept.iter().any(|p| qemu_pids(data.path()).contains(p)) {
        assert!(Instant::now() < deadline, "QEMU processes outlived the server: {kept:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One that escaped anyway (its parent thread's death missed, say) carries the
    // server's label: the restarted server kills it before running anything.
    let instance = {
        use sha2::Digest;
        let path = std::fs::canonicalize(data.path()).unwrap();
        let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut stray = std::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-display", "none", "-nodefaults", "-S", "-name"])
        .arg(format!("cloudpipe-vm-{instance}"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stray.try_wait().unwrap().is_none(), "the stray QEMU runs");

    let second = spawn_serve_with(bin, data.path(), &[], &env);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stray.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the restarted server did not kill the stray QEMU");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = second.log.lock().unwrap().join("\n");
    assert!(log.contains("killed QEMU processes left by a crash"), "{log}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while dropped.iter().any(|p| qemu_pids(data.path()).contains(p)) {
        assert!(Instant::now() < deadline, "confined clones outlived the restart: {dropped:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The job runs again, in a new clone, and finishes.
    let done = get_json(&client, &format!("{}/v1/jobs/{id}/result?wait=60s", second.url)).await;
    assert_eq!(
        (done["status"].as_str(), done["stdout"].as_str()),
        (Some("succeeded"), Some("finished\n")),
        "{done}"
    );
    assert_eq!(done["attempts"], 2, "{done}");
    let mut second = second;
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}
