//! The docker executor against a real engine (started by the tests when needed), with
//! an image built here from busybox-static.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::{TestServer, code, with};

pub(crate) use cloudpipe_test_support::docker as docker_support;
use docker_support::{Registry, TEST_IMAGE, ensure_image, job_containers};

/// A docker job of the test image running `sh -c script`.
fn sh(script: &str) -> Value {
    json!({"executor": "docker", "image": TEST_IMAGE, "command": ["sh", "-c", script]})
}

#[tokio::test]
async fn containers_get_stdin_env_args_and_give_output_and_exit_codes() {
    ensure_image();
    let s = TestServer::start(&[]).await;
    let job = s
        .run(with(
            sh(r#"cat; echo "FOO=$FOO job=$CLOUDPIPE_JOB_ID"; echo "args: $0 $1"; echo oops >&2"#),
            json!({"args": ["first", "second"], "env": {"FOO": "bar"}, "stdin": "line one\n"}),
        ))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["executor"], "docker");
    assert_eq!(job["function"], TEST_IMAGE);
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["stdout"], format!("line one\nFOO=bar job={id}\nargs: first second\n"), "{job}");
    assert_eq!(job["stderr"], "oops\n");

    // Binary stdin, byte for byte.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let job = s.run(with(sh("cat"), json!({"stdin_base64": b64}))).await;
    let (st, raw) = {
        let res = s
            .client
            .get(format!("{}/v1/jobs/{}/stdout", s.url, job["id"].as_str().unwrap()))
            .send()
            .await
            .unwrap();
        (res.status(), res.bytes().await.unwrap())
    };
    assert_eq!(st, StatusCode::OK);
    assert_eq!(&raw[..], &bytes[..]);

    let job = s.run(sh("echo partial; exit 7")).await;
    assert_eq!((job["status"].as_str(), job["exit_code"].as_i64()), (Some("failed"), Some(7)));
    assert_eq!(job["error"]["kind"], "exit");
    assert_eq!(job["stdout"], "partial\n");

    // The result can come from a file instead of stdout (Cloudpipe's `file:`).
    let job = s
        .run(with(
            sh("echo noise; echo result > /tmp/out.txt"),
            json!({"result_source": "file:/tmp/out.txt"}),
        ))
        .await;
    assert_eq!(
        (job["status"].as_str(), job["stdout"].as_str()),
        (Some("succeeded"), Some("result\n"))
    );
    let job = s.run(with(sh("true"), json!({"result_source": "file:/tmp/none"}))).await;
    assert_eq!(job["error"]["kind"], "result_missing", "{job}");

    let job =
        s.run(json!({"executor": "docker", "image": "127.0.0.1:9/cloudpipe-test/absent:0"})).await;
    assert_eq!(job["error"]["kind"], "image_pull_failed", "{job}");
    // Its container is gone.
    assert!(job_containers(job["id"].as_str().unwrap()).is_empty());
}

#[tokio::test]
async fn containers_are_locked_down_by_default() {
    ensure_image();
    let s = TestServer::start(&[]).await;
    let job = s
        .run(sh("id -u; id -g; ls /sys/class/net; grep CapEff /proc/self/status; \
             touch /tmp/ok && echo tmp-writable; touch /root-file 2>&1 || echo root-read-only; \
             grep NoNewPrivs /proc/self/status"))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = job["stdout"].as_str().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["65534", "65534"], "non-root: {out}");
    assert_eq!(lines[2], "lo", "no network but loopback: {out}");
    assert!(lines[3].ends_with("0000000000000000"), "no capabilities: {out}");
    assert!(out.contains("tmp-writable"), "{out}");
    assert!(out.contains("Read-only file system") && out.contains("root-read-only"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    // The same flags on the job do nothing: relaxing is an account policy.
    let (st, body) = s.post_json("/v1/jobs", &with(sh("true"), json!({"network": true}))).await;
    assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_json"), "{body}");

    // An account whose policy allows the network gets one.
    let (st, _) = s.post_json("/v1/accounts", &json!({"name": "net", "allow_network": true})).await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, key) = s.post_json("/v1/accounts/net/keys", &json!({})).await;
    let res = reqwest::Client::new()
        .post(format!("{}/v1/jobs?wait=60s", s.url))
        .bearer_auth(key["key"].as_str().unwrap())
        .json(&sh("ls /sys/class/net | sort | tr '\\n' ' '"))
        .send()
        .await
        .unwrap();
    let job: Value = res.json().await.unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["stdout"].as_str().unwrap().contains("eth0"), "{job}");
}

#[tokio::test]
async fn timeout_memory_and_fork_bombs_are_stopped_and_reported() {
    ensure_image();
    let s = TestServer::start(&[]).await;
    let started = std::time::Instant::now();
    let job = s.run(with(sh("echo before; sleep 60"), json!({"timeout_ms": 1500}))).await;
    assert_eq!(job["status"], "timed_out", "{job}");
    assert_eq!(job["stdout"], "before\n", "output before the kill is kept");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert!(job_containers(job["id"].as_str().unwrap()).is_empty(), "removed after the kill");

    let job = s
        .run(with(
            sh("dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived"),
            json!({"memory_mb": 16}),
        ))
        .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["kind"], "memory_limit", "{job}");

    // A fork bomb meets the pids limit; the timeout ends it; the engine is fine.
    let job = s
        .run(with(sh("bomb() { bomb | bomb & }; bomb; sleep 30"), json!({"timeout_ms": 3000})))
        .await;
    assert!(matches!(job["status"].as_str(), Some("timed_out") | Some("failed")), "{job}");
    assert!(job_containers(job["id"].as_str().unwrap()).is_empty());
    let job = s.run(sh("echo still here")).await;
    assert_eq!(job["stdout"], "still here\n", "{job}");
}

#[tokio::test]
async fn cancel_kills_a_running_container() {
    ensure_image();
    let s = TestServer::start(&[]).await;
    let (st, job) = s.post_json("/v1/jobs", &sh("echo up; sleep 60")).await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    // Wait until it is running with its container.
    for _ in 0..200 {
        if !job_containers(&id).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, _) = s.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    assert_eq!(st, StatusCode::OK);
    // The answer comes once the job ended or after a few seconds; on a loaded engine
    // the kill can take longer: wait for the end.
    let done = s.wait_terminal(&id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !job_containers(&id).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the container was not removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_restart_after_kill_9_reaps_containers_and_runs_their_jobs_again() {
    ensure_image();
    let data = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(data.path(), &[]).await;
    let (st, job) = s.post_json("/v1/jobs", &sh("sleep 4; echo finished")).await;
    assert_eq!(st, StatusCode::CREATED);
    let id = job["id"].as_str().unwrap().to_string();
    for _ in 0..200 {
        if !job_containers(&id).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.kill9();
    assert_eq!(job_containers(&id).len(), 1, "the container outlived the server");
    let s = TestServer::start_in(data.path(), &[]).await;
    let done = s.wait_terminal(&id).await;
    assert_eq!(
        (done["status"].as_str(), done["stdout"].as_str()),
        (Some("succeeded"), Some("finished\n"))
    );
    assert_eq!(done["attempts"], 2, "{done}");
    assert!(job_containers(&id).is_empty(), "the old container was reaped, the new one removed");
    assert!(s.log().contains("removed containers left by a crash"), "{}", s.log());
}

#[tokio::test]
async fn without_an_engine_docker_jobs_are_refused_and_wasm_jobs_run() {
    let s = TestServer::start_env(&[], &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")]).await;
    let (st, body) = s.post_json("/v1/jobs", &sh("true")).await;
    assert_eq!((st, code(&body)), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("docker"), "{body}");
    s.upload("hello", &crate::server::program(cloudpipe_test_programs_artifacts::HELLO)).await;
    let job = s.run(json!({"function": "hello"})).await;
    assert_eq!(job["status"], "succeeded");
    // Bad docker specs are 400 before anything runs.
    for (spec, what) in [
        (json!({"executor": "docker"}), "image"),
        (json!({"executor": "docker", "image": "x", "function": "hello"}), "function"),
        (json!({"executor": "docker", "image": "x", "cpus": -1}), "cpus"),
        (json!({"executor": "docker", "image": "x", "result_source": "file:rel"}), "result_source"),
        (json!({"executor": "vm-of-the-future", "function": "hello"}), "executor"),
        (json!({"function": "hello", "image": "x"}), "docker"),
    ] {
        let (st, body) = s.post_json("/v1/jobs", &spec).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{spec}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(what), "{spec}: {body}");
    }
}

/// The events of job `id` until it ends, as (event, data) pairs.
async fn events(s: &TestServer, id: &str) -> Vec<(String, Value)> {
    let res = s.client.get(format!("{}/v1/jobs/{id}/events", s.url)).send().await.unwrap();
    let text = tokio::time::timeout(Duration::from_secs(120), res.text())
        .await
        .expect("the events stream ends with the job")
        .unwrap();
    text.split("\n\n")
        .filter_map(|ev| {
            let name = ev.lines().find_map(|l| l.strip_prefix("event:"))?.trim().to_string();
            let data = ev.lines().find_map(|l| l.strip_prefix("data:"))?.trim();
            Some((name, serde_json::from_str(data).unwrap()))
        })
        .collect()
}

#[tokio::test]
async fn a_missing_image_is_pulled_from_its_registry_with_progress_in_the_events() {
    ensure_image();
    let mut registry = Registry::start();
    let image = registry.push(TEST_IMAGE, "cloudpipe-test/pulled:1");
    // One job at a time: the pulling job waits in the queue behind the first, so its
    // events are followed from before it starts.
    let s = TestServer::start(&["--concurrency", "1"]).await;
    let (st, blocker) = s.post_json("/v1/jobs", &sh("sleep 1")).await;
    assert_eq!(st, StatusCode::CREATED, "{blocker}");
    let spec =
        json!({"executor": "docker", "image": image, "command": ["cat", "/data/answer.txt"]});
    let (st, job) = s.post_json("/v1/jobs", &spec).await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap();
    let events = events(&s, id).await;
    let pull: String = events
        .iter()
        .filter(|(e, _)| e == "stderr")
        .filter_map(|(_, d)| d["data"].as_str())
        .collect();
    assert!(pull.contains(&format!("[pull] pulling {image} from {}", registry.host)), "{pull}");
    assert!(pull.contains("[pull] Status: "), "{pull}");
    let (_, last) = events.last().unwrap();
    let record = &last["record"];
    assert_eq!(record["status"], "succeeded", "{last}\n{}", s.log());
    assert_eq!(record["stdout"], "42\n");
    // The progress is not the container's stderr.
    assert_eq!(record["stderr"], "");
    assert!(s.log().contains("image pulled"), "{}", s.log());

    // An image the registry does not have: its own message.
    let spec = json!({"executor": "docker", "image": format!("{}/cloudpipe-test/nothing:1", registry.host)});
    let job = s.run(spec).await;
    assert_eq!(job["error"]["kind"], "image_pull_failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("manifest unknown") || message.contains("not found"), "{message}");

    // A registry outside the allowlist is not asked; `never` pulls nothing.
    let other = format!("{}/cloudpipe-test/pulled:2", registry.host);
    let _ = registry.push(TEST_IMAGE, "cloudpipe-test/pulled:2");
    let only = TestServer::start(&["--docker-registries", "registry.example.com"]).await;
    let job = only.run(json!({"executor": "docker", "image": other})).await;
    assert_eq!(job["error"]["kind"], "image_pull_failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("registry.example.com") && message.contains(&registry.host),
        "{message}"
    );
    let never = TestServer::start(&["--docker-pull", "never"]).await;
    let job = never.run(json!({"executor": "docker", "image": other})).await;
    assert_eq!(job["error"]["kind"], "image_not_found", "{job}");

    // A registry that is down: the engine's message names it.
    registry.stop();
    let job = s.run(json!({"executor": "docker", "image": other})).await;
    assert_eq!(job["error"]["kind"], "image_pull_failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains(&registry.host), "{message}");
}

/// A job cannot fill the disk through `/tmp`: it is capped with or without a result
/// file (which must then outlive the container), and the result still comes out.
#[tokio::test]
async fn tmp_is_capped_even_for_jobs_with_a_result_file() {
    ensure_image();
    let data = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(data.path(), &["--docker-tmp-mb", "8"]).await;
    // 32 MiB into an 8 MiB /tmp: dd stops at the cap.
    let fill = "dd if=/dev/zero of=/tmp/big bs=1M count=32 2>/dev/null; \
                n=$(ls -l /tmp/big | awk '{print $5}'); rm /tmp/big; echo $n > /tmp/size; cat /tmp/size";
    for extra in [json!({}), json!({"result_source": "file:/tmp/size"})] {
        let job = s.run(with(sh(fill), extra.clone())).await;
        assert_eq!(job["status"], "succeeded", "{extra}: {job}");
        let size: u64 =
            job["stdout"].as_str().unwrap().trim().parse().unwrap_or_else(|_| panic!("{job}"));
        assert!(size <= 8 << 20, "{extra}: /tmp took {size} bytes past its 8 MiB cap");
        assert!(size >= 6 << 20, "{extra}: the cap is about 8 MiB, got {size}");
    }
    // The host's scratch mounts are gone with their jobs.
    let scratch = data.path().join("scratch");
    let left: Vec<_> =
        std::fs::read_dir(&scratch).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(
        left.is_empty(),
        "scratch mounts left behind: {:?}",
        left.iter().map(|e| e.path()).collect::<Vec<_>>()
    );
    assert!(!s.log().contains("uncapped"), "{}", s.log());
}

#[tokio::test]
async fn jobs_get_a_default_cpu_limit_and_only_allowed_images_run() {
    ensure_image();
    let allowed = format!("{TEST_IMAGE},docker.io/acme/*");
    let s = TestServer::start(&["--docker-cpus", "0.5", "--docker-images", &allowed]).await;
    // No `cpus` in the spec: the server's default (half a CPU) holds; a job's own
    // `cpus` replaces it.
    // `quota period`, from cgroup v2 or v1.
    let cpu_max = "cat /sys/fs/cgroup/cpu.max 2>/dev/null || \
         echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)";
    let job = s.run(sh(cpu_max)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["stdout"], "50000 100000\n", "{job}");
    let job = s.run(with(sh(cpu_max), json!({"cpus": 2}))).await;
    assert_eq!(job["stdout"], "200000 100000\n", "{job}");
    // Images off the operator's list are refused before anything runs.
    for image in ["ubuntu:24.04", "docker.io/evil/acme", &format!("{TEST_IMAGE}-other")] {
        let spec = json!({"executor": "docker", "image": image, "command": ["true"]});
        let (st, body) = s.post_json("/v1/jobs", &spec).await;
        assert_eq!((st, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"), "{body}");
        assert!(body.to_string().contains("not one this server runs"), "{body}");
    }
    let spec = json!({"executor": "docker", "image": "docker.io/acme/tool:1", "command": ["true"]});
    let (st, body) = s.post_json("/v1/jobs", &spec).await;
    assert_ne!(st, StatusCode::BAD_REQUEST, "a prefix match is allowed: {body}");
}
