use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::{Value, json};

pub use cloudpipe_test_support::serve;
pub use cloudpipe_test_support::server::output_with_stdin;
use serve::spawn_serve;
pub use serve::{ADMIN_KEY, admin_headers, peak_rss_mib, rss_mib};

/// The binary under test: the workspace's `cloudpipe`, or `CLOUDPIPE_E2E_BIN` (to run
/// the suite against another build, e.g. one from before a fix).
pub fn bin() -> String {
    std::env::var("CLOUDPIPE_E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cloudpipe").into())
}

/// `cloudpipe admin reset-key ARGS`: the key it prints, after checking that it ran.
pub fn admin_reset_key(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(bin())
        .args(["admin", "reset-key"])
        .args(args)
        .env_remove("CLOUDPIPE_DATA_DIR")
        .env_remove("CLOUDPIPE_STORE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("cpk_"), "{key}");
    key
}

/// A `cloudpipe serve` process on 127.0.0.1 with a port the OS picked.
pub struct TestServer {
    child: Child,
    pub url: String,
    _tmp: Option<tempfile::TempDir>,
    pub client: reqwest::Client,
    log: Arc<Mutex<Vec<String>>>,
}

impl TestServer {
    /// A server with a fresh data directory and the given extra flags.
    pub async fn start(extra: &[&str]) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = TestServer::start_in(&dir, extra).await;
        s._tmp = Some(tmp);
        s
    }

    /// A server with a fresh data directory, extra flags and extra environment.
    pub async fn start_env(extra: &[&str], env: &[(&str, &str)]) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let mut all = vec![("CLOUDPIPE_ADMIN_KEY", ADMIN_KEY)];
        all.extend_from_slice(env);
        let p = serve::spawn_serve_with(&bin(), tmp.path(), extra, &all);
        TestServer {
            child: p.child,
            url: p.url,
            _tmp: Some(tmp),
            client: admin_client(),
            log: p.log,
        }
    }

    /// [`TestServer::start_in`] with extra environment.
    pub async fn start_in_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> TestServer {
        let mut all = vec![("CLOUDPIPE_ADMIN_KEY", ADMIN_KEY)];
        all.extend_from_slice(env);
        let p = serve::spawn_serve_with(env!("CARGO_BIN_EXE_cloudpipe"), dir, extra, &all);
        TestServer { child: p.child, url: p.url, _tmp: None, client: admin_client(), log: p.log }
    }

    /// A server over an existing data directory (which the caller keeps alive).
    pub async fn start_in(dir: &Path, extra: &[&str]) -> TestServer {
        let p = spawn_serve(&bin(), dir, extra);
        TestServer { child: p.child, url: p.url, _tmp: None, client: admin_client(), log: p.log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_free_sigterm(self.child.id());
        self.child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub async fn upload(&self, name: &str, wasm: &[u8]) -> Value {
        let (st, body) = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/functions?name={name}"),
                Some(wasm.to_vec()),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "upload of {name}: {body}");
        body
    }

    /// Creates account `name` (as the admin) with the fields of `extra` and one key:
    /// the key and its id.
    pub async fn account(&self, name: &str, extra: Value) -> (String, String) {
        let (st, body) = self.post_json("/v1/accounts", &with(json!({"name": name}), extra)).await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
        let (st, key) =
            self.post_json(&format!("/v1/accounts/{name}/keys"), &json!({"label": "test"})).await;
        assert_eq!(st, StatusCode::CREATED, "{key}");
        (key["key"].as_str().unwrap().to_string(), key["id"].as_str().unwrap().to_string())
    }

    /// Submits a job and waits for it to end (up to `wait`).
    pub async fn run(&self, spec: Value) -> Value {
        let (st, body) = self.post_json("/v1/jobs?wait=60s", &spec).await;
        assert!(st.is_success(), "submit: {st} {body}");
        assert!(is_terminal(&body), "job did not end: {body}");
        body
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.request(reqwest::Method::POST, path, Some(serde_json::to_vec(body).unwrap())).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        self.request_as(None, method, path, body).await
    }

    /// [`request`](Self::request) with the API key `key` instead of the admin's.
    pub async fn request_as(
        &self,
        key: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}\n{}", self.log()));
        let st = res.status();
        let bytes = res.bytes().await.unwrap();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
        (st, v)
    }

    /// Polls until the job ends.
    pub async fn wait_terminal(&self, id: &str) -> Value {
        let (st, body) = self.get(&format!("/v1/jobs/{id}/result?wait=60s")).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        body
    }

    /// A metric's value from `/metrics` (the first line starting with `name`).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = serve::metrics(&self.client, &self.url).await;
        serve::metric_value(&text, name).unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_free_sigterm(pid: u32) {
    let ok = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM {pid}");
}

/// A client that sends the admin's key.
pub fn admin_client() -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers(admin_headers())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub fn is_terminal(job: &Value) -> bool {
    !matches!(job["status"].as_str(), Some("queued") | Some("running"))
}

/// `spec` with the fields of `extra` set (replacing any it had).
pub fn with(mut spec: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

/// The code of an error answer.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}

pub fn program(path: &str) -> Vec<u8> {
    cloudpipe_test_programs_artifacts::read(path)
}
