//! The Wasm executor against real guests (`tests/test-programs`) and a real store.
//!
//! Modules by topic: `io` (argv, env, stdin, outputs, exit codes), `limits` (time,
//! memory, stack, output, cancellation), `prepare` (what is refused, the compiled
//! cache), `concurrency`, `http` (wasi:http proxies).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cloudpipe_runtime::executor::wasm::{WasmConfig, WasmExecutor};
use cloudpipe_runtime::executor::{Executor, NoLiveOutput, OutputSink, OutputStream, RunRequest};
use cloudpipe_runtime::registry::stored_binaries;
use cloudpipe_runtime::store::{self, Backend, FunctionMeta};
use cloudpipe_runtime::{JobOutcome, Store};
use cloudpipe_test_programs_artifacts as programs;
use cloudpipe_types::FunctionKind;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

mod concurrency;
mod http;
mod io;
mod limits;
mod prepare;

/// Compiled artefacts shared by every test of this binary, so that each guest is
/// compiled about once per run (tests of the cache itself use their own directory).
fn shared_cache_dir() -> &'static std::path::Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// An executor over a fresh redb store.
struct Harness {
    _data: TempDir,
    store: Arc<dyn Store>,
    executor: WasmExecutor,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_cache(shared_cache_dir())
    }

    fn with_cache(cache_dir: &std::path::Path) -> Harness {
        let data = tempfile::tempdir().unwrap();
        let store = store::open(Backend::Redb, data.path()).unwrap();
        let executor =
            WasmExecutor::new(test_config(), cache_dir, stored_binaries(store.clone())).unwrap();
        Harness { _data: data, store, executor }
    }

    /// Stores the program at `path` and prepares it; returns its id.
    async fn upload(&self, path: &str) -> String {
        let binary = programs::read(path);
        let id = put(&*self.store, &binary).await;
        self.executor
            .prepare(&id, &binary)
            .await
            .unwrap_or_else(|e| panic!("preparing {path}: {e}"));
        id
    }

    async fn run(&self, req: RunRequest) -> JobOutcome {
        self.executor.run(req, Arc::new(NoLiveOutput), CancellationToken::new()).await
    }
}

fn test_config() -> WasmConfig {
    WasmConfig { max_instances: 32, ..WasmConfig::default() }
}

/// Puts a binary in the store (not through the executor); returns its id.
async fn put(store: &dyn Store, binary: &[u8]) -> String {
    let id = format!("sha256:{}", hex::encode(Sha256::digest(binary)));
    let meta = FunctionMeta {
        id: id.clone(),
        account: "admin".into(),
        name: None,
        kind: FunctionKind::Command,
        size: binary.len() as u64,
        created_at: 0,
        settings: Default::default(),
    };
    store.put_function(meta, binary.to_vec().into(), None).await.unwrap();
    id
}

/// A request for `function_id` with small limits; tests change what they need.
fn request(function: &str, function_id: &str) -> RunRequest {
    RunRequest {
        job_id: "job-1".into(),
        function: function.into(),
        function_id: function_id.into(),
        args: vec![],
        env: vec![],
        stdin: Default::default(),
        attempt: 1,
        timeout: Duration::from_secs(30),
        memory_bytes: 64 << 20,
        output_cap: 1 << 20,
        ..Default::default()
    }
}

/// Records what the executor sends live.
#[derive(Default)]
struct Recorder {
    stdout: Mutex<Vec<u8>>,
    stderr: Mutex<Vec<u8>>,
}

impl OutputSink for Recorder {
    fn chunk(&self, stream: OutputStream, data: &[u8]) {
        let buf = match stream {
            OutputStream::Stdout => &self.stdout,
            OutputStream::Stderr => &self.stderr,
        };
        buf.lock().unwrap().extend_from_slice(data);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
