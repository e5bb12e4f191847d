//! The Wasm executor: runs `wasi:cli/command` components and core WASI preview1 modules
//! as jobs, and serves `wasi:http/proxy` components over HTTP, in process with wasmtime.
//!
//! # Layout
//! - this file: [`WasmExecutor`] (one per process) and [`WasmConfig`]; `prepare`
//!   compiles, `run` instantiates and calls.
//! - `proxy`: [`WasmExecutor::handle_http`], one HTTP request to a proxy component.
//! - `outbound`: the proxies' outgoing requests, sent only to checked addresses
//!   ([`crate::egress`]).
//! - `engine`: the wasmtime configuration (pooling allocator, copy-on-write memory
//!   images, epoch interruption) and the thread that ticks the epoch.
//! - `cache`: compiled artefacts on disk and the bounded in-memory map of
//!   ready-to-instantiate functions.
//! - `guest`: per-job store state, the memory limiter, the deadline callback.
//! - `output`: capped stdout/stderr with live forwarding.
//!
//! # Cost of a job
//! A function is compiled once (at upload, or at its first run after its artefact was
//! lost), on a blocking thread, and its artefact is cached on disk. A restart maps the
//! artefact back in without compiling. A warm function's job costs a new `Store`, an
//! instantiation from the pooling allocator and the call: no blocking thread, no
//! compilation, no file access.
//!
//! # Example
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn cloudpipe_runtime::Store>) -> anyhow::Result<()> {
//! use cloudpipe_runtime::registry::stored_binaries;
//! use std::sync::Arc;
//! use cloudpipe_runtime::executor::wasm::{WasmConfig, WasmExecutor};
//! use cloudpipe_runtime::executor::{Executor, NoLiveOutput, RunRequest};
//!
//! let compiled = "/var/lib/cloudpipe/compiled".as_ref();
//! let executor = WasmExecutor::new(WasmConfig::default(), compiled, stored_binaries(store))?;
//! let wasm = std::fs::read("hello.wasm")?;
//! let id = "sha256:…"; // the binary's content address
//! executor.prepare(id, &wasm).await?;
//! let req = RunRequest {
//!     job_id: "job-1".into(), function: "hello".into(), function_id: id.into(),
//!     args: vec![], env: vec![], stdin: Default::default(), attempt: 1,
//!     timeout: std::time::Duration::from_secs(10), memory_bytes: 64 << 20, output_cap: 1 << 20, ..Default::default()
//! };
//! let outcome = executor.run(req, Arc::new(NoLiveOutput), Default::default()).await;
//! println!("{}", String::from_utf8_lossy(&outcome.stdout));
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudpipe_types::{FunctionKind, JobError, JobStatus};
use tokio_util::sync::CancellationToken;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Engine, ExternType, Module, Precompiled, Trap, WasmBacktrace};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use super::{Binaries, Executor, OutputSink, OutputStream, PrepareError, RunRequest};
use crate::model::JobOutcome;

mod cache;
mod engine;
mod guest;
mod outbound;
mod output;
mod proxy;

pub use engine::{COMPONENT_LIMITS, ComponentLimits};
pub use proxy::{HttpOptions, InvokeError, ResponseBody};

use cache::{DiskCache, WarmMap};
use guest::{ComponentState, GuestState, Limiter, ModuleState, Stop};
use output::CappedOutput;
use proxy::ProxyState;

/// Most functions kept ready to instantiate in memory. Each holds its compiled code
/// (mapped from the artefact) and its copy-on-write memory image.
const WARM_FUNCTIONS: usize = 512;

/// Longest trap message kept in a job record.
const MAX_TRAP_MESSAGE: usize = 4096;

/// Settings of the Wasm executor.
#[derive(Debug, Clone)]
pub struct WasmConfig {
    /// Most instances alive at once (sizes the pooling allocator).
    pub max_instances: u32,
    /// Largest memory cap any job may ask for, in bytes.
    pub max_memory_bytes: u64,
    /// Epoch tick: the granularity of timeouts and cancellation.
    pub epoch_tick: Duration,
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            max_instances: 256,
            max_memory_bytes: 4 << 30,
            epoch_tick: Duration::from_millis(5),
        }
    }
}

impl WasmConfig {
    /// The wasmtime configuration of the executor's engine, for embedders and benchmarks
    /// that want the same engine.
    pub fn wasmtime_config(&self) -> wasmtime::Config {
        engine::wasmtime_config(self)
    }
}

/// A function ready to instantiate: compiled, its imports resolved.
enum Ready {
    Command(CommandPre<ComponentState>),
    Module(wasmtime::InstancePre<ModuleState>),
    Http(ProxyPre<ProxyState>),
}

impl Ready {
    fn kind(&self) -> FunctionKind {
        match self {
            Ready::Command(_) => FunctionKind::Command,
            Ready::Module(_) => FunctionKind::Module,
            Ready::Http(_) => FunctionKind::Http,
        }
    }
}

/// Runs Wasm jobs in process. One per process (it owns the wasmtime engine, the epoch
/// thread and the compiled cache), shared by all jobs.
pub struct WasmExecutor {
    compiler: Arc<Compiler>,
    config: WasmConfig,
    binaries: Arc<dyn Binaries>,
    warm: Mutex<WarmMap<Arc<Ready>>>,
    /// One lock per function being loaded, so that concurrent first runs compile once.
    loading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    _ticker: engine::EpochTicker,
}

/// What compiling and loading need, shared with blocking threads.
struct Compiler {
    engine: Engine,
    component_linker: wasmtime::component::Linker<ComponentState>,
    module_linker: wasmtime::Linker<ModuleState>,
    /// All of WASI 0.2 (as `wasmtime serve -Scli`: a Rust proxy imports
    /// `wasi:cli/environment` and friends) plus `wasi:http`.
    proxy_linker: wasmtime::component::Linker<ProxyState>,
    disk: DiskCache,
    compiles: AtomicU64,
}

impl WasmExecutor {
    /// Builds the engine and the WASI linkers, opens (creating) the compiled cache in
    /// `cache_dir` and starts the epoch thread. `binaries` supplies the binaries of
    /// functions whose compiled artefact is missing.
    pub fn new(
        config: WasmConfig,
        cache_dir: &Path,
        binaries: Arc<dyn Binaries>,
    ) -> anyhow::Result<Self> {
        let engine = Engine::new(&config.wasmtime_config())?;

        let mut component_linker = wasmtime::component::Linker::new(&engine);
        // `wasi:cli/exit.exit-with-code` is stable since WASI 0.2.12 and linked by
        // default in wasmtime-wasi 48: no option to turn on.
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)?;
        let mut module_linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module_linker, |s: &mut ModuleState| {
            &mut s.wasi
        })?;

        let mut proxy_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut proxy_linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut proxy_linker)?;

        let disk = DiskCache::open(cache_dir, &engine)?;
        let ticker = engine::EpochTicker::start(&engine, config.epoch_tick)?;
        Ok(WasmExecutor {
            compiler: Arc::new(Compiler {
                engine,
                component_linker,
                module_linker,
                proxy_linker,
                disk,
                compiles: AtomicU64::new(0),
            }),
            config,
            binaries,
            warm: Mutex::new(WarmMap::new(WARM_FUNCTIONS)),
            loading: Mutex::new(HashMap::new()),
            _ticker: ticker,
        })
    }

    /// How many binaries this executor compiled (artefacts loaded from disk do not
    /// count). Lets tests and metrics see that the compiled cache is used.
    pub fn compiles(&self) -> u64 {
        self.compiler.compiles.load(Ordering::Relaxed)
    }

    /// The executor's wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.compiler.engine
    }

    fn warm(&self) -> MutexGuard<'_, WarmMap<Arc<Ready>>> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ready function `id`: from memory, else from its artefact on disk, else
    /// compiled from its binary. `Ok(None)`: there is no version `id`.
    async fn ready(&self, id: &str) -> Result<Option<Arc<Ready>>, PrepareError> {
        if let Some(ready) = self.warm().get(id) {
            return Ok(Some(ready));
        }
        self.load(id, None).await
    }

    /// The slow path of [`ready`](Self::ready) and [`Executor::prepare`]: one loader per
    /// id at a time; the others wait and then find it warm.
    async fn load(
        &self,
        id: &str,
        binary: Option<&[u8]>,
    ) -> Result<Option<Arc<Ready>>, PrepareError> {
        let lock = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            loading.entry(id.to_string()).or_default().clone()
        };
        let result = async {
            let _loading = lock.lock().await;
            if let Some(ready) = self.warm().get(id) {
                return Ok(Some(ready));
            }
            let compiler = self.compiler.clone();
            let key = id.to_string();
            let cached = tokio::task::spawn_blocking(move || compiler.load_artefact(&key))
                .await
                .map_err(join_error)?;
            let ready = match cached {
                Some(ready) => ready,
                None => {
                    let binary = match binary {
                        Some(binary) => bytes::Bytes::copy_from_slice(binary),
                        None => match self.binaries.binary(id).await? {
                            Some(binary) => binary,
                            None => return Ok(None),
                        },
                    };
                    let compiler = self.compiler.clone();
                    let key = id.to_string();
                    tokio::task::spawn_blocking(move || compiler.compile(&key, &binary))
                        .await
                        .map_err(join_error)??
                }
            };
            let ready = Arc::new(ready);
            self.warm().insert(id, ready.clone());
            Ok(Some(ready))
        }
        .await;
        let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if loading.get(id).is_some_and(|l| Arc::ptr_eq(l, &lock)) {
            loading.remove(id);
        }
        result
    }

    /// One attempt of a ready function, under the job's limits.
    async fn run_ready(
        &self,
        ready: &Ready,
        req: RunRequest,
        live: Arc<dyn OutputSink>,
        cancel: CancellationToken,
    ) -> JobOutcome {
        let timeout = req.timeout;
        let deadline = Instant::now() + timeout;
        let memory_cap = req.memory_bytes.min(self.config.max_memory_bytes);
        let stdout = CappedOutput::new(OutputStream::Stdout, req.output_cap, live.clone());
        let stderr = CappedOutput::new(OutputStream::Stderr, req.output_cap, live);
        let mut wasi = wasi_ctx(req, stdout.clone(), stderr.clone());
        let limiter = Limiter::new(usize::try_from(memory_cap).unwrap_or(usize::MAX));
        let engine = &self.compiler.engine;

        let guest = async {
            match ready {
                Ready::Command(pre) => {
                    let state = ComponentState {
                        wasi: wasi.build(),
                        table: ResourceTable::new(),
                        limiter,
                        stop: None,
                    };
                    let mut store = guest::new_store(engine, state, deadline, cancel.clone());
                    let result = match pre.instantiate_async(&mut store).await {
                        Ok(command) => Ran::Called(
                            command.wasi_cli_run().call_run(&mut store).await.map(|r| r.is_ok()),
                        ),
                        Err(e) => Ran::NotInstantiated(e),
                    };
                    ended(result, store.data_mut())
                }
                Ready::Module(pre) => {
                    let state = ModuleState { wasi: wasi.build_p1(), limiter, stop: None };
                    let mut store = guest::new_store(engine, state, deadline, cancel.clone());
                    let result = match pre.instantiate_async(&mut store).await {
                        Ok(instance) => Ran::Called(
                            match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                                Ok(start) => start.call_async(&mut store, ()).await.map(|()| true),
                                Err(e) => Err(e),
                            },
                        ),
                        Err(e) => Ran::NotInstantiated(e),
                    };
                    ended(result, store.data_mut())
                }
                Ready::Http(_) => Ended::NotRunnable,
            }
        };
        // The epoch callback stops a guest that runs wasm; these stop one that waits in
        // a host call (a sleep, a read), by dropping its future.
        let ended = tokio::select! {
            biased;
            ended = guest => ended,
            () = cancel.cancelled() => Ended::Stopped(Stop::Cancelled),
            () = tokio::time::sleep_until(deadline.into()) => Ended::Stopped(Stop::Timeout),
        };

        let (out, err) = (stdout.take(), stderr.take());
        let (status, exit_code, error) = ended.describe(timeout, memory_cap);
        JobOutcome {
            status,
            exit_code,
            stdout: out.bytes,
            stderr: err.bytes,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            error,
        }
    }
}

/// A WASI context builder for one job: argv, env, stdin and the captured outputs;
/// nothing inherited from the host, no preopened directory, no network.
fn wasi_ctx(inputs: RunRequest, stdout: CappedOutput, stderr: CappedOutput) -> WasiCtxBuilder {
    const OURS: [&str; 3] = ["CLOUDPIPE_JOB_ID", "CLOUDPIPE_FUNCTION", "CLOUDPIPE_ATTEMPT"];
    let mut b = WasiCtxBuilder::new();
    b.stdin(MemoryInputPipe::new(inputs.stdin))
        .stdout(stdout)
        .stderr(stderr)
        .arg(&inputs.function)
        .args(&inputs.args)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for (k, v) in inputs.env.iter().filter(|(k, _)| !OURS.contains(&k.as_str())) {
        b.env(k, v);
    }
    b.env("CLOUDPIPE_JOB_ID", &inputs.job_id)
        .env("CLOUDPIPE_FUNCTION", &inputs.function)
        .env("CLOUDPIPE_ATTEMPT", inputs.attempt.to_string());
    b
}

/// What instantiating and calling a guest gave.
enum Ran {
    NotInstantiated(wasmtime::Error),
    /// `Ok(true)`: the entry point returned success; `Ok(false)`: failure (a
    /// component's `run` returned `err`).
    Called(wasmtime::Result<bool>),
}

/// How a guest ended, before it becomes a [`JobOutcome`].
enum Ended {
    Exit(i32),
    Trap(String),
    /// The guest failed after a memory growth past its cap was refused.
    MemoryLimit {
        desired: usize,
        exit_code: Option<i32>,
    },
    Stopped(Stop),
    /// The instance pool had no room for the guest: not the guest's failure, and
    /// gone when other guests end.
    Busy(String),
    /// Our side failed.
    Internal(String),
    /// The function cannot run as a job (an http function).
    NotRunnable,
}

fn ended<T: GuestState>(ran: Ran, state: &mut T) -> Ended {
    if let Some(stop) = *state.stop() {
        return Ended::Stopped(stop);
    }
    let ended = match ran {
        Ran::Called(Ok(true)) => Ended::Exit(0),
        Ran::Called(Ok(false)) => Ended::Exit(1),
        Ran::Called(Err(e)) => match e.downcast_ref::<I32Exit>() {
            Some(exit) => Ended::Exit(exit.0),
            None => Ended::Trap(trap_message(&e)),
        },
        Ran::NotInstantiated(e) if e.downcast_ref::<Trap>().is_some() => {
            Ended::Trap(trap_message(&e))
        }
        Ran::NotInstantiated(e)
            if e.chain().any(|c| c.is::<wasmtime::PoolConcurrencyLimitError>()) =>
        {
            Ended::Busy(format!("no room in the instance pool: {e:#}"))
        }
        Ran::NotInstantiated(e) => Ended::Internal(format!("instantiating the function: {e:#}")),
    };
    match (state.limiter().refused, ended) {
        (_, Ended::Exit(0)) => Ended::Exit(0),
        (Some(desired), Ended::Exit(code)) => Ended::MemoryLimit { desired, exit_code: Some(code) },
        (Some(desired), _) => Ended::MemoryLimit { desired, exit_code: None },
        (None, ended) => ended,
    }
}

impl Ended {
    fn describe(
        self,
        timeout: Duration,
        memory_cap: u64,
    ) -> (JobStatus, Option<i32>, Option<JobError>) {
        let error =
            |kind: &str, message: String| Some(JobError { kind: kind.to_string(), message });
        match self {
            Ended::Exit(0) => (JobStatus::Succeeded, Some(0), None),
            Ended::Exit(code) => {
                (JobStatus::Failed, Some(code), error("exit", format!("exited with code {code}")))
            }
            Ended::Trap(message) => (JobStatus::Failed, None, error("trap", message)),
            Ended::MemoryLimit { desired, exit_code } => (
                JobStatus::Failed,
                exit_code,
                error(
                    "memory_limit",
                    format!(
                        "memory limit of {} reached: the guest asked to grow its memory to {}",
                        bytes_text(memory_cap),
                        bytes_text(desired as u64)
                    ),
                ),
            ),
            Ended::Stopped(Stop::Timeout) => (
                JobStatus::TimedOut,
                None,
                error("timeout", format!("time limit of {} ms reached", timeout.as_millis())),
            ),
            Ended::Stopped(Stop::Cancelled) => (
                JobStatus::Cancelled,
                None,
                error("cancelled", "cancelled while running".to_string()),
            ),
            Ended::Busy(message) => (JobStatus::Failed, None, error(crate::model::BUSY, message)),
            Ended::Internal(message) => (JobStatus::Failed, None, error("internal", message)),
            Ended::NotRunnable => (
                JobStatus::Failed,
                None,
                error(
                    "not_runnable",
                    "http functions are invoked at /fn/NAME, not run as jobs".to_string(),
                ),
            ),
        }
    }
}

/// `64 MiB`, `1.5 GiB`, `1000 bytes`.
fn bytes_text(n: u64) -> String {
    const MIB: u64 = 1 << 20;
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n >> 20)
    } else if n >= MIB {
        format!("{:.1} MiB ({n} bytes)", n as f64 / MIB as f64)
    } else {
        format!("{n} bytes")
    }
}

/// The trap (or host error) and where it happened: the innermost frames of the wasm
/// backtrace, by function name.
fn trap_message(e: &wasmtime::Error) -> String {
    let what = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{e:#}"),
    };
    let mut message = what;
    if let Some(backtrace) = e.downcast_ref::<WasmBacktrace>() {
        let frames = backtrace.frames();
        if !frames.is_empty() {
            message.push_str("\nwasm backtrace:");
            for (i, frame) in frames.iter().enumerate() {
                let module = frame.module().name().unwrap_or("<module>");
                let func = frame
                    .func_name()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("<func {}>", frame.func_index()));
                message.push_str(&format!("\n  {i}: {module}!{func}"));
            }
        }
    }
    if message.len() > MAX_TRAP_MESSAGE {
        let mut end = MAX_TRAP_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// Why wasmtime would not compile a binary: over the instance pool's limits per
/// component (wasmtime checks them as it compiles, saying "pooling allocator"), or
/// not valid Wasm.
fn compile_error(what: &str, e: wasmtime::Error) -> PrepareError {
    if e.chain().any(|c| c.to_string().contains("pooling allocator")) {
        let l = engine::COMPONENT_LIMITS;
        return PrepareError::OverLimits(format!(
            "the {what} is over this server's limits per component (at most {} core \
             instances, {} memories, {} tables, one memory and one table per module): {e:#}",
            l.core_instances, l.memories, l.tables
        ));
    }
    PrepareError::Invalid(format!("invalid {what}: {e:#}"))
}

fn join_error(e: tokio::task::JoinError) -> PrepareError {
    PrepareError::Internal(anyhow::anyhow!("compilation thread failed: {e}"))
}

/// What a binary's header says it is.
fn binary_kind(binary: &[u8]) -> Result<FunctionKind, PrepareError> {
    if binary.len() < 8 || &binary[..4] != b"\0asm" {
        return Err(PrepareError::Invalid(
            "not a WebAssembly binary: it does not start with the `\\0asm` magic number".into(),
        ));
    }
    match binary[4..8] {
        [1, 0, 0, 0] => Ok(FunctionKind::Module),
        // Components have layer 1 in the high half of the version field.
        [_, _, 1, 0] => Ok(FunctionKind::Command),
        _ => Err(PrepareError::Invalid(format!(
            "unsupported WebAssembly binary version {:02x?}",
            &binary[4..8]
        ))),
    }
}

impl Compiler {
    /// The function from its artefact on disk, if there is a usable one.
    fn load_artefact(&self, id: &str) -> Option<Ready> {
        let path = self.disk.path(id);
        let kind = Engine::detect_precompiled_file(&path).ok().flatten()?;
        let loaded = match kind {
            // SAFETY: the file is one we wrote (atomically, by rename) with
            // `serialize` of this engine's compilation; its name carries the engine's
            // compatibility hash, and wasmtime checks its header again.
            #[allow(unsafe_code)]
            Precompiled::Component => unsafe { Component::deserialize_file(&self.engine, &path) }
                .map_err(anyhow::Error::from)
                .and_then(|c| self.link_component(&c).map_err(anyhow::Error::from)),
            #[allow(unsafe_code)]
            // SAFETY: as above.
            Precompiled::Module => unsafe { Module::deserialize_file(&self.engine, &path) }
                .map_err(anyhow::Error::from)
                .and_then(|m| self.link_module(&m).map_err(anyhow::Error::from)),
        };
        match loaded {
            Ok(ready) => Some(ready),
            Err(e) => {
                tracing::warn!(function = id, error = %format!("{e:#}"), "unusable compiled artefact, compiling again");
                self.disk.remove(id);
                None
            }
        }
    }

    /// Validates and compiles `binary`, checks that it is a command or a proxy, and writes its
    /// artefact. CPU heavy: runs on a blocking thread.
    fn compile(&self, id: &str, binary: &[u8]) -> Result<Ready, PrepareError> {
        let started = Instant::now();
        let (ready, artefact) = match binary_kind(binary)? {
            FunctionKind::Command | FunctionKind::Http => {
                let component = Component::new(&self.engine, binary)
                    .map_err(|e| compile_error("component", e))?;
                self.compiles.fetch_add(1, Ordering::Relaxed);
                let ready = self.link_component(&component)?;
                (ready, component.serialize())
            }
            FunctionKind::Module => {
                let module =
                    Module::new(&self.engine, binary).map_err(|e| compile_error("module", e))?;
                self.compiles.fetch_add(1, Ordering::Relaxed);
                let ready = self.link_module(&module)?;
                (ready, module.serialize())
            }
        };
        let artefact = artefact.map_err(anyhow::Error::from)?;
        self.disk.write(id, &artefact)?;
        tracing::info!(
            function = id,
            kind = ready.kind().as_str(),
            duration_ms = started.elapsed().as_millis() as u64,
            "executor.compile"
        );
        Ok(ready)
    }

    fn link_component(&self, component: &Component) -> Result<Ready, PrepareError> {
        let ty = component.component_type();
        let exports: Vec<String> =
            ty.exports(&self.engine).map(|(name, _)| name.to_string()).collect();
        // A component exporting both is served as a proxy: it was written to answer
        // HTTP natively (streaming both ways), which CGI would lose.
        if exports.iter().any(|name| name.starts_with("wasi:http/incoming-handler@0.2.")) {
            return self.link_proxy(component);
        }
        if !exports.iter().any(|name| name.starts_with("wasi:cli/run@0.2.")) {
            return Err(PrepareError::Invalid(format!(
                "the component is not a wasi:cli/command: it does not export wasi:cli/run@0.2 \
                 (a library or reactor cannot run as a job), nor is it a wasi:http proxy \
                 (exporting wasi:http/incoming-handler@0.2); its exports: {}",
                if exports.is_empty() { "none".to_string() } else { exports.join(", ") }
            )));
        }
        let pre = self.component_linker.instantiate_pre(component).map_err(|e| {
            PrepareError::Invalid(format!(
                "the component needs imports that Cloudpipe does not provide: {e:#}"
            ))
        })?;
        let command = CommandPre::new(pre).map_err(|e| {
            PrepareError::Invalid(format!(
                "the component's wasi:cli/run export is not usable: {e:#}"
            ))
        })?;
        Ok(Ready::Command(command))
    }

    fn link_proxy(&self, component: &Component) -> Result<Ready, PrepareError> {
        let pre = self.proxy_linker.instantiate_pre(component).map_err(|e| {
            PrepareError::Invalid(format!(
                "the component needs imports that Cloudpipe does not provide: {e:#}"
            ))
        })?;
        let proxy = ProxyPre::new(pre).map_err(|e| {
            PrepareError::Invalid(format!(
                "the component's wasi:http/incoming-handler export is not usable: {e:#}"
            ))
        })?;
        Ok(Ready::Http(proxy))
    }

    fn link_module(&self, module: &Module) -> Result<Ready, PrepareError> {
        match module.get_export("_start") {
            Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => {}
            Some(_) => {
                return Err(PrepareError::Invalid(
                    "the module's `_start` export is not a function `() -> ()`".into(),
                ));
            }
            None => {
                return Err(PrepareError::Invalid(
                    "the module has no `_start` export: it is not a WASI command (a reactor or library cannot run as a job)".into(),
                ));
            }
        }
        if let Some(import) = module.imports().find(|i| i.module() != "wasi_snapshot_preview1") {
            return Err(PrepareError::Invalid(format!(
                "the module imports `{}::{}`; a WASI module may import only from wasi_snapshot_preview1",
                import.module(),
                import.name()
            )));
        }
        let pre = self.module_linker.instantiate_pre(module).map_err(|e| {
            PrepareError::Invalid(format!(
                "the module needs imports that Cloudpipe does not provide: {e:#}"
            ))
        })?;
        Ok(Ready::Module(pre))
    }
}

#[async_trait]
impl Executor for WasmExecutor {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn forget(&self, id: &str) {
        self.warm.lock().unwrap().remove(id);
        self.compiler.disk.remove(id);
    }

    /// Checks the kind from the header, then compiles on a blocking thread (unless the
    /// artefact is already on disk) and keeps the function warm.
    async fn prepare(&self, id: &str, binary: &[u8]) -> Result<FunctionKind, PrepareError> {
        binary_kind(binary)?;
        match self.load(id, Some(binary)).await? {
            Some(ready) => Ok(ready.kind()),
            None => {
                Err(PrepareError::Internal(anyhow::anyhow!("function {id} vanished while loading")))
            }
        }
    }

    async fn run(
        &self,
        req: RunRequest,
        live: Arc<dyn OutputSink>,
        cancel: CancellationToken,
    ) -> JobOutcome {
        let ready = match self.ready(&req.function_id).await {
            Ok(Some(ready)) => ready,
            Ok(None) => {
                return JobOutcome::error(
                    JobStatus::Failed,
                    "function_not_found",
                    format!("function {} is not in the store", req.function_id),
                );
            }
            Err(e) => {
                return JobOutcome::error(
                    JobStatus::Failed,
                    "internal",
                    format!("loading function {}: {e:#}", req.function_id),
                );
            }
        };
        if cancel.is_cancelled() {
            return JobOutcome::error(
                JobStatus::Cancelled,
                "cancelled",
                "cancelled before it started",
            );
        }
        self.run_ready(&ready, req, live, cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_decide_the_kind() {
        assert!(matches!(binary_kind(b"\0asm\x01\0\0\0"), Ok(FunctionKind::Module)));
        assert!(matches!(binary_kind(b"\0asm\x0d\0\x01\0"), Ok(FunctionKind::Command)));
        assert!(matches!(binary_kind(b"hello world"), Err(PrepareError::Invalid(_))));
        assert!(matches!(binary_kind(b"\0asm"), Err(PrepareError::Invalid(_))));
        assert!(matches!(binary_kind(b"\0asm\x02\0\0\0"), Err(PrepareError::Invalid(_))));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes_text(64 << 20), "64 MiB");
        assert_eq!(bytes_text(4 << 30), "4 GiB");
        assert_eq!(bytes_text(1000), "1000 bytes");
        assert_eq!(bytes_text(3 << 19), "1.5 MiB (1572864 bytes)");
    }
}
