//! Per-job store state: the WASI context, the memory limiter and why the executor
//! stopped the guest, if it did.

use std::time::Instant;

use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Why the executor stopped a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Timeout,
    Cancelled,
}

/// Caps each linear memory at `cap` bytes and remembers a refused growth, so that a
/// guest that then aborts by itself (Rust's `handle_alloc_error`) is still reported as
/// having hit the memory limit.
pub(super) struct Limiter {
    cap: usize,
    /// The size (bytes) of the largest refused growth.
    pub refused: Option<usize>,
}

impl Limiter {
    pub(super) fn new(cap: usize) -> Limiter {
        Limiter { cap, refused: None }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.refused = Some(self.refused.unwrap_or(0).max(desired));
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables are bounded by the pooling allocator's `table_elements`.
        Ok(true)
    }
}

/// What the executor needs from a store's state, whatever the guest's kind.
pub(super) trait GuestState: Send + 'static {
    fn limiter(&mut self) -> &mut Limiter;
    fn stop(&mut self) -> &mut Option<Stop>;
}

/// State of a store running a `wasi:cli/command` component.
pub(super) struct ComponentState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: Limiter,
    pub stop: Option<Stop>,
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl GuestState for ComponentState {
    fn limiter(&mut self) -> &mut Limiter {
        &mut self.limiter
    }
    fn stop(&mut self) -> &mut Option<Stop> {
        &mut self.stop
    }
}

/// State of a store running a core WASI preview1 module.
pub(super) struct ModuleState {
    pub wasi: WasiP1Ctx,
    pub limiter: Limiter,
    pub stop: Option<Stop>,
}

impl GuestState for ModuleState {
    fn limiter(&mut self) -> &mut Limiter {
        &mut self.limiter
    }
    fn stop(&mut self) -> &mut Option<Stop> {
        &mut self.stop
    }
}

/// A fresh store for one job: memory limited, and checked at every epoch tick against
/// the deadline and the cancellation token. Between checks the guest yields to the
/// async runtime, so a spinning guest never holds a tokio worker for more than a tick.
pub(super) fn new_store<T: GuestState>(
    engine: &Engine,
    state: T,
    deadline: Instant,
    cancel: CancellationToken,
) -> Store<T> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| s.limiter());
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |mut cx| {
        let stop = if cancel.is_cancelled() {
            Stop::Cancelled
        } else if Instant::now() >= deadline {
            Stop::Timeout
        } else {
            return Ok(UpdateDeadline::Yield(1));
        };
        *cx.data_mut().stop() = Some(stop);
        Ok(UpdateDeadline::Interrupt)
    });
    store
}
