//! The one wasmtime [`Engine`] of a [`WasmExecutor`](super::WasmExecutor): its
//! configuration and the thread that advances its epoch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig,
    WasmBacktraceDetails,
};

use super::WasmConfig;

/// Wasm pages are 64 KiB; memory sizes given to the pooling allocator are whole pages.
const WASM_PAGE: u64 = 64 << 10;

/// Frames kept in a trap's backtrace: enough to see where it happened, bounded so that
/// a deep recursion does not make a huge error message.
const BACKTRACE_FRAMES: usize = 16;

/// The most one component may hold of each pooled resource. Uploads over one of them
/// are refused (wasmtime checks them when it compiles), and the pool has room for
/// every instance at all of them at once: a tenant's heavy components then cannot
/// take the slots other tenants' jobs need.
///
/// Rust's wasm32-wasip2 components have 3-4 core instances (the program and the shims
/// of its lowered imports), one memory and two tables; adapted preview1 programs a few
/// more instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentLimits {
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

/// What the server admits per component.
pub const COMPONENT_LIMITS: ComponentLimits =
    ComponentLimits { core_instances: 16, memories: 2, tables: 8 };

/// The wasmtime configuration the executor runs with: pooling allocator sized from
/// `config.max_instances` times [`COMPONENT_LIMITS`], copy-on-write memory images,
/// async calls, epoch interruption, the component model.
///
/// Cost: each memory slot reserves (virtual, not resident) the largest memory a job
/// may ask for plus a guard, so the reservation is `max_instances` × 2 × that; core
/// instances are allocated when used and tables reserve 160 KiB each.
pub(super) fn wasmtime_config(config: &WasmConfig) -> Config {
    let instances = config.max_instances.max(1);
    // The largest memory a job may ask for, in whole pages, at least one page.
    let max_memory = config.max_memory_bytes.max(WASM_PAGE).div_ceil(WASM_PAGE) * WASM_PAGE;
    let limits = COMPONENT_LIMITS;

    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(limits.core_instances))
        .max_core_instances_per_component(limits.core_instances)
        .total_memories(instances.saturating_mul(limits.memories))
        .max_memories_per_component(limits.memories)
        .max_memories_per_module(1)
        .total_tables(instances.saturating_mul(limits.tables))
        .max_tables_per_component(limits.tables)
        .total_stacks(instances)
        .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
        // Keep the first 2 MiB of a freed slot resident (zeroed, not decommitted): a
        // small guest (a Rust program's 1 MiB stack and its data) then reuses them
        // without page faults. Costs up to this much per warm slot (wasmtime keeps at
        // most 100 unused warm slots by default); measured in benches/README.md.
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(16 << 10)
        // Where the kernel has PAGEMAP_SCAN (Linux 6.7+), reset only the pages the
        // guest dirtied, not the whole resident prefix: a hello guest touches a few
        // dozen pages of its ≈ 1 MiB, and a memset of all of it on every request was
        // most of a wasi:http request's teardown.
        .pagemap_scan(Enabled::Auto);

    let mut cfg = Config::new();
    cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .wasm_component_model(true)
        .epoch_interruption(true)
        .memory_init_cow(true)
        .parallel_compilation(true)
        // Reserve exactly the largest allowed memory: with the 4 GiB default, bounds
        // checks are elided; with a smaller cap the reservation (virtual memory per
        // slot, times `max_instances`) shrinks with it.
        .memory_reservation(max_memory)
        .memory_reservation_for_growth(0)
        .wasm_backtrace_details(WasmBacktraceDetails::Disable)
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(BACKTRACE_FRAMES));
    cfg
}

/// Advances the engine's epoch every `tick` from a plain thread, so that each store's
/// deadline callback runs (to yield, or to stop the guest) within one tick. Stops when
/// dropped or when the engine is gone.
pub(super) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub(super) fn start(engine: &Engine, tick: Duration) -> std::io::Result<EpochTicker> {
        let engine = engine.weak();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let tick = tick.max(Duration::from_micros(100));
        let thread =
            std::thread::Builder::new().name("cloudpipe-epoch".into()).spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Not joined: the thread ends within one tick by itself, and waiting here
        // would block whichever (possibly async) context drops the executor.
        self.thread.take();
    }
}
