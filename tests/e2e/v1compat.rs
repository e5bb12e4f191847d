//! Cloudpipe v1's job API (`/v1/job`), driven the way the multyvac client drove it:
//! HTTP Basic with the account name and key, JSON submits with base64 stdin,
//! form-encoded kills, and polling `GET /v1/job?jid=` until the job ends. The jobs
//! run in containers on a real Docker engine.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::server::TestServer;

use cloudpipe_test_support::docker::{TEST_IMAGE, ensure_image};

/// A job as `GET /v1/job` shows it. Typed, because a jid is a 128-bit integer, more
/// than a `serde_json::Value` keeps exactly.
#[derive(Debug, Clone, Deserialize)]
struct V1Job {
    jid: u128,
    id: String,
    name: Option<String>,
    cmd: String,
    status: String,
    tags: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    result_source: String,
    result_type: String,
    max_runtime: f64,
    restartable: bool,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    runtime: Option<f64>,
    result: Option<String>,
    stdout: Option<String>,
    stderr: String,
    exit: Option<i32>,
    return_code: Option<String>,
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct JobList {
    jobs: Vec<V1Job>,
}

#[derive(Debug, Deserialize)]
struct Submitted {
    jids: Vec<u128>,
}

const FINISHED: [&str; 4] = ["done", "error", "killed", "stalled"];

/// A v1 client of one account.
struct V1Client {
    http: reqwest::Client,
    url: String,
    account: String,
    key: String,
}

impl V1Client {
    /// Creates `account` (as the admin) and a key for it.
    async fn new(s: &TestServer, account: &str, quotas: Value) -> V1Client {
        let (st, body) =
            s.post_json("/v1/accounts", &json!({"name": account, "quotas": quotas})).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
        let (st, key) = s.post_json(&format!("/v1/accounts/{account}/keys"), &json!({})).await;
        assert_eq!(st, StatusCode::CREATED, "{key}");
        V1Client {
            http: reqwest::Client::new(),
            url: s.url.clone(),
            account: account.into(),
            key: key["key"].as_str().unwrap().into(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Vec<u8>) {
        let res = req.basic_auth(&self.account, Some(&self.key)).send().await.unwrap();
        (res.status(), res.bytes().await.unwrap().to_vec())
    }

    /// `POST /v1/job`: the status and the raw answer.
    async fn submit_raw(&self, body: &Value) -> (StatusCode, Vec<u8>) {
        let req = self
            .http
            .post(format!("{}/v1/job", self.url))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(req).await
    }

    /// Submits jobs that must be accepted; their jids.
    async fn submit(&self, jobs: Value) -> Vec<u128> {
        let (st, body) = self.submit_raw(&json!({ "jobs": jobs })).await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice::<Submitted>(&body).unwrap().jids
    }

    async fn get(&self, path_and_query: &str) -> (StatusCode, Vec<u8>) {
        self.send(self.http.get(format!("{}{path_and_query}", self.url))).await
    }

    async fn list(&self, query: &str) -> Vec<V1Job> {
        let (st, body) = self.get(&format!("/v1/job?{query}")).await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice::<JobList>(&body).unwrap().jobs
    }

    /// The job, as multyvac's `get(jid)` asks for it.
    async fn job(&self, jid: u128) -> Option<V1Job> {
        self.list(&format!("jid={jid}&limit=1")).await.pop()
    }

    /// Polls until the job is finished, as multyvac's `Job.wait()` does.
    async fn wait(&self, jid: u128) -> V1Job {
        let start = Instant::now();
        loop {
            let job = self.job(jid).await.unwrap_or_else(|| panic!("job {jid} is not listed"));
            if FINISHED.contains(&job.status.as_str()) {
                return job;
            }
            assert!(start.elapsed() < Duration::from_secs(90), "job never finished: {job:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls until the job has the given status.
    async fn wait_for(&self, jid: u128, status: &str) -> V1Job {
        let start = Instant::now();
        loop {
            let job = self.job(jid).await.unwrap();
            if job.status == status {
                return job;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "never {status}: {job:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A form POST (`/v1/job/kill`, `/v1/job/kill_all`); the answer as JSON.
    async fn post_form(&self, path: &str, form: &str) -> (StatusCode, Value) {
        let req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string());
        let (st, body) = self.send(req).await;
        (st, serde_json::from_slice(&body).unwrap())
    }

    async fn queue_stats(&self) -> Value {
        let (st, body) = self.get("/v1/job/queue_stats").await;
        assert_eq!(st, StatusCode::OK);
        serde_json::from_slice::<Value>(&body).unwrap()["stats"].clone()
    }
}

/// An error answer in v1's envelope: its code, after checking the envelope's shape.
fn v1_error(st: StatusCode, body: &[u8], want: StatusCode) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(st, want, "{v}");
    let e = &v["error"];
    assert!(e["message"].is_string() && e["hint"].is_string(), "{v}");
    assert!(e["retry"].is_boolean(), "{v}");
    e["code"].as_str().unwrap().to_string()
}

fn server_flags() -> [&'static str; 2] {
    ["--v1-image", TEST_IMAGE]
}

#[tokio::test]
async fn v1_jobs_run_shell_commands_with_stdin_env_exit_codes_result_files_and_timeouts() {
    ensure_image();
    let s = TestServer::start(&server_flags()).await;
    // The account's longest timeout is 20 s: max_runtime is capped by it.
    let c = V1Client::new(&s, "multy", json!({"max_timeout_ms": 20_000})).await;

    let stdin: Vec<u8> = (0..=255u8).collect();
    let jids = c
        .submit(json!([
            {
                // What multyvac's shell_submit sends, fields it always adds included.
                "cmd": "cat; echo \"FOO=$FOO\"; echo to-stderr >&2",
                "name": "round-trip",
                "core": "c1",
                "multicore": 1,
                "profile": false,
                "restartable": true,
                "tags": {"team": "blue"},
                "env": {"FOO": "bar baz"},
                "result_source": "stdout",
                "result_type": "binary",
                "stdin": B64.encode(&stdin),
            },
            {"cmd": "echo partial; exit 3", "result_type": "binary"},
            {
                "cmd": "echo noise; cp /data/answer.txt /tmp/.result",
                "result_source": "file:/tmp/.result",
                "result_type": "pickle",
                "restartable": false,
            },
            {"cmd": "echo started; sleep 30; echo never", "max_runtime": 0.05},
            {"cmd": "sleep 30", "max_runtime": 100},
        ]))
        .await;
    assert_eq!(jids.len(), 5);
    assert!(jids.windows(2).all(|w| w[0] < w[1]), "jids grow with time: {jids:?}");

    // stdin in, stdout and stderr out, env passed; the result is base64, as v1 sent it.
    let j = c.wait(jids[0]).await;
    assert_eq!(j.status, "done", "{j:?}");
    let mut want = stdin.clone();
    want.extend_from_slice(b"FOO=bar baz\n");
    assert_eq!(B64.decode(j.result.as_deref().unwrap()).unwrap(), want);
    assert!(j.stdout.as_deref().unwrap().ends_with("FOO=bar baz\n"), "{j:?}");
    assert_eq!(j.stderr, "to-stderr\n");
    assert_eq!((j.exit, j.return_code.as_deref()), (Some(0), Some("0")));
    assert_eq!(j.name.as_deref(), Some("round-trip"));
    assert_eq!(
        j.tags.get("name").map(String::as_str),
        Some("round-trip"),
        "multyvac reads it here"
    );
    assert_eq!(j.tags.get("team").map(String::as_str), Some("blue"));
    assert_eq!(j.env.get("FOO").map(String::as_str), Some("bar baz"));
    assert_eq!(j.cmd, "cat; echo \"FOO=$FOO\"; echo to-stderr >&2");
    assert_eq!((j.result_source.as_str(), j.result_type.as_str()), ("stdout", "binary"));
    assert!(j.restartable);
    assert!(j.error.is_none(), "{j:?}");
    // Times in v1's form, which multyvac parses with '%Y-%m-%d %H:%M:%S.%f'.
    for t in [Some(&j.created_at), j.started_at.as_ref(), j.finished_at.as_ref()] {
        let t = t.unwrap();
        assert_eq!(t.len(), 26, "{t}");
        assert_eq!((&t[4..5], &t[10..11], &t[19..20]), ("-", " ", "."), "{t}");
    }
    assert!(j.runtime.unwrap() >= 0.0);
    // The same job under its usual id, through the native API.
    let (st, native) = s.get(&format!("/v1/jobs/{}", j.id)).await;
    assert_eq!((st, native["status"].as_str()), (StatusCode::OK, Some("succeeded")));
    assert_eq!(native["account"], "multy");
    assert_eq!(native["executor"], "docker");
    assert_eq!(native["function"], TEST_IMAGE, "the v1 image");
    // A jid may also be given as that id.
    assert_eq!(c.list(&format!("jid={}", j.id)).await[0].jid, jids[0]);

    // A non-zero exit is v1's `error`, with the code.
    let j = c.wait(jids[1]).await;
    assert_eq!(j.status, "error", "{j:?}");
    assert_eq!((j.exit, j.return_code.as_deref()), (Some(3), Some("3")));
    assert_eq!(j.stdout.as_deref(), Some("partial\n"));
    assert_eq!(j.error.as_ref().unwrap()["kind"], "exit");

    // result_source file: the result is the file's content; the result type is kept.
    let j = c.wait(jids[2]).await;
    assert_eq!(j.status, "done", "{j:?}");
    assert_eq!(B64.decode(j.result.as_deref().unwrap()).unwrap(), b"42\n");
    assert_eq!(j.stdout, None, "stdout is not kept when the result comes from a file");
    assert_eq!((j.result_source.as_str(), j.result_type.as_str()), ("file:/tmp/.result", "pickle"));
    assert!(!j.restartable);
    let (_, native) = s.get(&format!("/v1/jobs/{}", j.id)).await;
    assert_eq!(native["max_attempts"], 1, "{native}");

    // max_runtime is enforced: the job is killed and shows as `stalled`.
    let j = c.wait(jids[3]).await;
    assert_eq!(j.status, "stalled", "{j:?}");
    assert_eq!(j.stdout.as_deref(), Some("started\n"));
    assert_eq!(j.error.as_ref().unwrap()["kind"], "timeout");
    assert!((j.max_runtime - 0.05).abs() < 1e-9, "{j:?}");
    assert!(j.runtime.unwrap() < 15.0, "killed at about 3 s: {j:?}");
    // Asking for more than the quota gets the quota.
    let j = c.job(jids[4]).await.unwrap();
    assert!((j.max_runtime - 20_000.0 / 60_000.0).abs() < 1e-9, "{j:?}");
    let j = c.wait(jids[4]).await;
    assert_eq!(j.status, "stalled", "{j:?}");

    // Listing: by name, by status (v1's names, repeated or comma-separated), by jid
    // list, with before/after and limit; newest first.
    let named = c.list("name=round-trip").await;
    assert_eq!(named.iter().map(|j| j.jid).collect::<Vec<_>>(), [jids[0]]);
    let failed = c.list("status=error&status=stalled").await;
    assert_eq!(failed.iter().map(|j| j.jid).collect::<Vec<_>>(), [jids[4], jids[3], jids[1]]);
    assert_eq!(c.list("status=done,error").await.len(), 3);
    assert!(c.list("status=waiting").await.is_empty(), "no job waits outside the queue");
    let some = c.list(&format!("jid={},{}&jid={}", jids[0], jids[2], jids[4])).await;
    assert_eq!(some.iter().map(|j| j.jid).collect::<Vec<_>>(), [jids[4], jids[2], jids[0]]);
    let page = c.list(&format!("before={}&after={}", jids[4], jids[0])).await;
    assert_eq!(page.iter().map(|j| j.jid).collect::<Vec<_>>(), [jids[3], jids[2], jids[1]]);
    assert_eq!(
        c.list("limit=2").await.iter().map(|j| j.jid).collect::<Vec<_>>(),
        [jids[4], jids[3]]
    );
    assert_eq!(c.list("field=jid&field=status").await.len(), 5, "field is accepted");

    // Bad values of the fields used are 400 in v1's envelope, and nothing is submitted.
    for (job, want) in [
        (json!({"name": "no command"}), "JCMD"),
        (json!({"cmd": "true", "result_source": "somewhere"}), "JRSRC"),
        (json!({"cmd": "true", "result_type": "json"}), "JRTYPE"),
        (json!({"cmd": "true", "max_runtime": -1}), "JINVAL"),
        (json!({"cmd": "true", "max_runtime": "soon"}), "JPRS"),
        (json!({"cmd": "true", "stdin": "not base64!"}), "JINVAL"),
        (json!({"cmd": "true", "env": {"A=B": "x"}}), "JINVAL"),
        (json!({"cmd": "true", "depends_on": "123"}), "JINVAL"),
        (json!({"cmd": "true", "vol": [{"name": "data"}]}), "JINVAL"),
        (json!({"cmd": "true", "comand": "typo"}), "JPRS"),
    ] {
        let (st, body) = c.submit_raw(&json!({"jobs": [{"cmd": "echo first"}, job]})).await;
        assert_eq!(v1_error(st, &body, StatusCode::BAD_REQUEST), want, "{job}");
    }
    let (st, body) = c.submit_raw(&json!("not an object")).await;
    assert_eq!(v1_error(st, &body, StatusCode::BAD_REQUEST), "JPRS");
    assert_eq!(c.list("").await.len(), 5, "no job of a refused request was submitted");
    for q in ["status=running", "limit=0", "jid=abc", "before=x", "colour=red"] {
        let (st, body) = c.get(&format!("/v1/job?{q}")).await;
        assert_eq!(v1_error(st, &body, StatusCode::BAD_REQUEST), "QINVAL", "{q}");
    }
}

#[tokio::test]
async fn kill_kill_all_and_queue_stats_reach_only_the_callers_jobs() {
    ensure_image();
    // One run slot: the first job runs, the others wait in the queue.
    let s = TestServer::start(&["--v1-image", TEST_IMAGE, "--concurrency", "1"]).await;
    let c = V1Client::new(&s, "multy", json!({})).await;
    let other = V1Client::new(&s, "other", json!({})).await;

    let jids = c
        .submit(json!([
            {"cmd": "echo started; sleep 60", "max_runtime": 2},
            {"cmd": "sleep 60", "max_runtime": 2},
            {"cmd": "sleep 60", "max_runtime": 2},
        ]))
        .await;
    c.wait_for(jids[0], "processing").await;
    assert_eq!(c.queue_stats().await, json!({"waiting": 0, "queued": 2, "processing": 1}));

    // Another account sees none of it and can kill none of it.
    assert_eq!(other.queue_stats().await, json!({"waiting": 0, "queued": 0, "processing": 0}));
    assert!(other.list("").await.is_empty());
    assert!(other.list(&format!("jid={}", jids[0])).await.is_empty());
    let (st, body) = other.post_form("/v1/job/kill", &format!("jid={}", jids[0])).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "JNF");
    assert_eq!(body["error"]["retry"], false);
    // v1's `sudo` switch opens nothing.
    let (st, _) = other.post_form("/v1/job/kill", &format!("jid={}&sudo=true", jids[1])).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, body) = other.post_form("/v1/job/kill_all", "").await;
    assert_eq!(
        (st, body["status"].as_str(), body["killed"].as_u64()),
        (StatusCode::OK, Some("ok"), Some(0))
    );
    assert_eq!(c.job(jids[0]).await.unwrap().status, "processing");
    assert_eq!(c.job(jids[1]).await.unwrap().status, "queued");

    // The admin reaches every account's jobs by jid.
    let (st, body) = s.get(&format!("/v1/job?jid={}", jids[1])).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["jobs"][0]["id"].as_str(), Some(c.job(jids[1]).await.unwrap().id.as_str()));

    // Killing the running job stops its container; the next one starts.
    let (st, body) = c.post_form("/v1/job/kill", &format!("jid={}", jids[0])).await;
    assert_eq!((st, body["status"].as_str()), (StatusCode::OK, Some("ok")), "{body}");
    let j = c.job(jids[0]).await.unwrap();
    assert_eq!(j.status, "killed", "{j:?}");
    assert!(j.finished_at.is_some());
    c.wait_for(jids[1], "processing").await;
    assert_eq!(c.queue_stats().await, json!({"waiting": 0, "queued": 1, "processing": 1}));
    // Killing a job that already ended changes nothing.
    let (st, body) = c.post_form("/v1/job/kill", &format!("jid={}", jids[0])).await;
    assert_eq!((st, body["killed"].as_u64()), (StatusCode::OK, Some(0)));
    // A jid that does not exist, and a form without one.
    let (st, body) = c.post_form("/v1/job/kill", "jid=12345").await;
    assert_eq!((st, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("JNF")));
    let (st, body) = c.post_form("/v1/job/kill", "").await;
    assert_eq!((st, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("JINVAL")));

    // kill_all: the running job and the queued one.
    let (st, body) = c.post_form("/v1/job/kill_all", "").await;
    assert_eq!((st, body["killed"].as_u64()), (StatusCode::OK, Some(2)), "{body}");
    for jid in &jids {
        assert_eq!(c.job(*jid).await.unwrap().status, "killed");
    }
    let queued_one = c.job(jids[2]).await.unwrap();
    assert!(queued_one.started_at.is_none(), "a queued job never ran: {queued_one:?}");
    assert_eq!(c.queue_stats().await, json!({"waiting": 0, "queued": 0, "processing": 0}));
    assert_eq!(c.list("status=killed").await.len(), 3);

    // A new job runs at once, so nothing was left holding the slot.
    let jid = c.submit(json!([{"cmd": "echo again"}])).await[0];
    let j = c.wait(jid).await;
    assert_eq!((j.status.as_str(), j.stdout.as_deref()), ("done", Some("again\n")), "{j:?}");
}
