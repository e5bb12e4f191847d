//! [`Runtime`]: the runtime's parts wired together, one per process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::executor::Executors;
use crate::executor::docker::{DockerConfig, DockerExecutor};
use crate::executor::vm::{VmConfig, VmExecutor};
use crate::executor::wasm::{WasmConfig, WasmExecutor};
use crate::registry::FunctionRegistry;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::secrets::{Secrets, SecretsConfig};
use crate::store::{self, Backend, SpaceConfig, Store};

/// Everything needed to start a [`Runtime`]; plain data.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Holds `store/` (the database) and `cache/` (compiled functions).
    pub data_dir: PathBuf,
    pub backend: Backend,
    pub scheduler: SchedulerConfig,
    pub wasm: WasmConfig,
    /// The docker executor (`instance` is derived from `data_dir`).
    pub docker: DockerConfig,
    /// The vm executor (`instance` and `run_dir` are derived from `data_dir`).
    pub vm: VmConfig,
    /// Largest function binary accepted, in bytes.
    pub max_function_bytes: usize,
    /// The secrets' key file and limits.
    pub secrets: SecretsConfig,
    /// Free space the store keeps on its disk: under it, new work is refused.
    pub space: SpaceConfig,
}

impl RuntimeConfig {
    /// Defaults with the given data directory.
    pub fn new(data_dir: impl AsRef<Path>) -> RuntimeConfig {
        RuntimeConfig {
            data_dir: data_dir.as_ref().to_path_buf(),
            backend: Backend::default(),
            scheduler: SchedulerConfig::default(),
            wasm: WasmConfig::default(),
            docker: DockerConfig::default(),
            vm: VmConfig::from_env(),
            max_function_bytes: 64 << 20,
            secrets: SecretsConfig::new(data_dir.as_ref()),
            space: SpaceConfig::default(),
        }
    }
}

/// The store, the executors, the registry and the scheduler of one process.
#[derive(Clone)]
pub struct Runtime {
    pub store: Arc<dyn Store>,
    pub executor: Arc<WasmExecutor>,
    pub docker: Arc<DockerExecutor>,
    pub vm: Arc<VmExecutor>,
    pub executors: Arc<Executors>,
    pub registry: FunctionRegistry,
    pub scheduler: Scheduler,
    pub batches: crate::batch::Batches,
    pub secrets: Arc<Secrets>,
}

impl Runtime {
    /// Opens the store (compacting it), recovers jobs cut off by a crash and starts
    /// running queued jobs. Call inside a tokio runtime.
    pub async fn start(config: RuntimeConfig) -> anyhow::Result<Runtime> {
        let store_dir = config.data_dir.join("store").join(config.backend.as_str());
        let cache_dir = config.data_dir.join("cache");
        for d in [&store_dir, &cache_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let (backend, space) = (config.backend, config.space);
        let store =
            tokio::task::spawn_blocking(move || store::open_with(backend, &store_dir, space))
                .await?
                .context("opening the store")?;
        let mut wasm = config.wasm.clone();
        wasm.max_instances = wasm.max_instances.max(config.scheduler.concurrency as u32);
        wasm.max_memory_bytes = wasm.max_memory_bytes.max(config.scheduler.max_memory_mb << 20);
        let executor = Arc::new(
            WasmExecutor::new(wasm, &cache_dir, store.clone())
                .context("starting the wasm executor")?,
        );
        let registry =
            FunctionRegistry::new(store.clone(), executor.clone(), config.max_function_bytes);
        let mut docker_config = config.docker.clone();
        docker_config.instance = instance_id(&config.data_dir);
        if docker_config.scratch_dir.is_none() {
            docker_config.scratch_dir = Some(config.data_dir.join("scratch"));
        }
        let docker = Arc::new(DockerExecutor::new(docker_config));
        // Containers left by a previous life of this server (killed with them running)
        // go before any job starts; their jobs are requeued by the store's recovery.
        if std::env::var_os("DOCKER_HOST").is_some() || Path::new("/var/run/docker.sock").exists() {
            match tokio::time::timeout(std::time::Duration::from_secs(10), docker.reap()).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                Ok(Ok(n)) => tracing::warn!(containers = n, "removed containers left by a crash"),
                Err(_) => tracing::warn!("the Docker engine did not answer; containers not reaped"),
            }
        }
        let mut vm_config = config.vm.clone();
        vm_config.instance = instance_id(&config.data_dir);
        vm_config.run_dir = config.data_dir.join("vm");
        let vm = Arc::new(VmExecutor::new(vm_config));
        // QEMU processes left by a previous life of this server go too.
        match vm.reap() {
            0 => {}
            n => tracing::warn!(processes = n, "killed QEMU processes left by a crash"),
        }
        if vm.configured() {
            vm.warm_up();
        }
        let executors =
            Arc::new(Executors::new(vec![executor.clone(), docker.clone(), vm.clone()]));
        let secrets = Arc::new(
            Secrets::open(store.clone(), config.secrets.clone())
                .context("loading the secrets key")?,
        );
        let scheduler = Scheduler::start(
            store.clone(),
            executors.clone(),
            secrets.clone(),
            config.scheduler.clone(),
        )
        .await?;
        let batches = crate::batch::Batches::start(store.clone(), scheduler.clone()).await?;
        Ok(Runtime {
            store,
            executor,
            docker,
            vm,
            executors,
            registry,
            scheduler,
            batches,
            secrets,
        })
    }
}

/// A stable id of the server owning `data_dir`, for labelling what it makes outside
/// itself (containers).
fn instance_id(data_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    hex::encode(&Sha256::digest(path.as_os_str().as_encoded_bytes())[..8])
}
