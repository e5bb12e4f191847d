//! Cost of one job of a warm `hello` component: (a) a bare wasmtime embedding with the
//! executor's engine configuration (new `Store`, instantiate from `InstancePre`, call
//! `wasi:cli/run`), against (b) `WasmExecutor::run` of the same component from the
//! warm cache. After criterion's report, prints p50/mean of both from an interleaved
//! run and their ratio. See `benches/README.md`.
//!
//! `cargo bench -p cloudpipe-runtime --bench instantiate`

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudpipe_runtime::executor::wasm::{WasmConfig, WasmExecutor};
use cloudpipe_runtime::executor::{Executor, NoLiveOutput, RunRequest};
use cloudpipe_runtime::registry::stored_binaries;
use cloudpipe_runtime::store::{self, Backend};
use cloudpipe_types::JobStatus;
use criterion::Criterion;
use tokio_util::sync::CancellationToken;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

struct Bare {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// (a): what any embedding has to do for one call, with stdout captured in memory.
struct BareEmbedding {
    engine: Engine,
    pre: CommandPre<Bare>,
}

impl BareEmbedding {
    fn new(hello: &[u8]) -> BareEmbedding {
        let engine = Engine::new(&WasmConfig::default().wasmtime_config()).unwrap();
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        let component = Component::new(&engine, hello).unwrap();
        let pre = CommandPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
        BareEmbedding { engine, pre }
    }

    async fn run(&self) {
        let stdout = MemoryOutputPipe::new(1 << 20);
        let wasi = WasiCtxBuilder::new().stdout(stdout.clone()).arg("hello").build();
        let mut store = Store::new(&self.engine, Bare { wasi, table: ResourceTable::new() });
        // Epoch interruption is on in this config; no ticker runs here.
        store.set_epoch_deadline(u64::MAX / 2);
        let command = self.pre.instantiate_async(&mut store).await.unwrap();
        command.wasi_cli_run().call_run(&mut store).await.unwrap().unwrap();
        assert_eq!(&stdout.contents()[..], b"hello, world\n");
    }
}

/// (b): the executor, warm.
struct ExecutorRun {
    _dir: tempfile::TempDir,
    executor: WasmExecutor,
    id: String,
}

impl ExecutorRun {
    async fn new(hello: &[u8]) -> ExecutorRun {
        let dir = tempfile::tempdir().unwrap();
        let store = store::open(Backend::Redb, &dir.path().join("data")).unwrap();
        let executor = WasmExecutor::new(
            WasmConfig::default(),
            &dir.path().join("compiled"),
            stored_binaries(store),
        )
        .unwrap();
        let id = "sha256:".to_string() + &"ab".repeat(32);
        executor.prepare(&id, hello).await.unwrap();
        ExecutorRun { _dir: dir, executor, id }
    }

    async fn run(&self) {
        let req = RunRequest {
            job_id: "0190b1c2-0000-7000-8000-000000000000".into(),
            function: "hello".into(),
            function_id: self.id.clone(),
            args: vec![],
            env: vec![],
            stdin: Default::default(),
            attempt: 1,
            timeout: Duration::from_secs(10),
            memory_bytes: 64 << 20,
            output_cap: 1 << 20,
            ..Default::default()
        };
        let outcome =
            self.executor.run(req, Arc::new(NoLiveOutput), CancellationToken::new()).await;
        assert_eq!(outcome.status, JobStatus::Succeeded);
        assert_eq!(outcome.stdout, b"hello, world\n");
    }
}

fn main() {
    let hello = std::fs::read(cloudpipe_test_programs_artifacts::HELLO).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let bare = BareEmbedding::new(&hello);
    let exec = rt.block_on(ExecutorRun::new(&hello));

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("hello");
    group.bench_function("bare_wasmtime", |b| b.to_async(&rt).iter(|| bare.run()));
    group.bench_function("executor_run", |b| b.to_async(&rt).iter(|| exec.run()));
    group.finish();
    c.final_summary();

    // Interleaved, so that both see the same machine state.
    const ROUNDS: usize = 20_000;
    let (mut a, mut b) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    rt.block_on(async {
        for _ in 0..ROUNDS {
            let t = Instant::now();
            bare.run().await;
            a.push(t.elapsed());
            let t = Instant::now();
            exec.run().await;
            b.push(t.elapsed());
        }
    });
    let (pa, ma) = stats(&mut a);
    let (pb, mb) = stats(&mut b);
    println!("interleaved, {ROUNDS} rounds:");
    println!("  bare wasmtime : p50 {:>7.2} µs  mean {:>7.2} µs", micros(pa), micros(ma));
    println!("  executor run  : p50 {:>7.2} µs  mean {:>7.2} µs", micros(pb), micros(mb));
    println!(
        "  ratio         : p50 {:.2}x  mean {:.2}x",
        micros(pb) / micros(pa),
        micros(mb) / micros(ma)
    );
}

fn stats(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    (samples[samples.len() / 2], mean)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
