//! The Wasm executor (placeholder being written).
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudpipe_types::FunctionKind;
use tokio_util::sync::CancellationToken;

use super::{Executor, OutputSink, PrepareError, RunRequest};
use crate::job::JobOutcome;
use crate::store::Store;

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
        WasmConfig { max_instances: 256, max_memory_bytes: 4 << 30, epoch_tick: Duration::from_millis(5) }
    }
}

pub struct WasmExecutor {}

impl WasmExecutor {
    pub fn new(_config: WasmConfig, _cache_dir: &Path, _store: Arc<dyn Store>) -> anyhow::Result<Self> {
        todo!()
    }
}

#[async_trait]
impl Executor for WasmExecutor {
    fn name(&self) -> &'static str {
        "wasm"
    }
    async fn prepare(&self, _id: &str, _binary: &[u8]) -> Result<FunctionKind, PrepareError> {
        todo!()
    }
    async fn run(&self, _req: RunRequest, _live: Arc<dyn OutputSink>, _cancel: CancellationToken) -> JobOutcome {
        todo!()
    }
}
