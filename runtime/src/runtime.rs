//! [`Runtime`]: the runtime's parts wired together, one per process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::account::Tenant;
use crate::cluster::Cluster;
use crate::egress::EgressConfig;
use crate::executor::docker::{DockerConfig, DockerExecutor};
use crate::executor::vm::{VmConfig, VmExecutor};
use crate::executor::wasm::{WasmConfig, WasmExecutor};
use crate::executor::{Executors, Unready};
use crate::registry::FunctionRegistry;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::store::postgres::{PgConfig, PgStore};

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
    /// A PostgreSQL store shared with other nodes, instead of the embedded `backend`.
    pub postgres: Option<PgConfig>,
    /// Internal addresses that functions' requests and batch hooks may reach.
    pub egress: EgressConfig,
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
            vm: VmConfig::default(),
            max_function_bytes: 64 << 20,
            postgres: None,
            egress: EgressConfig::default(),
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
    /// The other nodes, when the store is PostgreSQL.
    pub cluster: Option<Arc<dyn Cluster>>,
    /// The operator's egress settings, for the requests sent on tenants' behalf.
    pub egress: Arc<EgressConfig>,
    pub secrets: Arc<Secrets>,
    /// The built-in runners (`runner:js`) by name: the stored version each runs, or
    /// why it is not there.
    runners: Arc<std::sync::RwLock<BTreeMap<String, Result<String, Unready>>>>,
}

/// Whether one executor or built-in runner can take jobs now ([`Runtime::readiness`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// The executor's name (`wasm`, `docker`, `vm`) or the runner's (`runner:js`).
    pub name: String,
    /// A built-in runner rather than an executor.
    pub runner: bool,
    pub state: Result<(), Unready>,
}

impl Runtime {
    /// Opens the store (compacting it), recovers jobs cut off by a crash and starts
    /// running queued jobs. Call inside a tokio runtime.
    pub async fn start(config: RuntimeConfig) -> anyhow::Result<Runtime> {
        let cache_dir = config.data_dir.join("cache");
        std::fs::create_dir_all(&cache_dir)
            .with_context(|| format!("creating {}", cache_dir.display()))?;
        let (store, cluster): (Arc<dyn Store>, Option<Arc<dyn Cluster>>) = match &config.postgres {
            Some(pg) => {
                let pg = Arc::new(
                    PgStore::open(pg.clone()).await.context("opening the PostgreSQL store")?,
                );
                (pg.clone(), Some(pg))
            }
            None => {
                let store_dir = config.data_dir.join("store").join(config.backend.as_str());
                std::fs::create_dir_all(&store_dir)
                    .with_context(|| format!("creating {}", store_dir.display()))?;
                let (backend, space) = (config.backend, config.space);
                let store = tokio::task::spawn_blocking(move || {
                    store::open_with(backend, &store_dir, space)
                })
                .await?
                .context("opening the store")?;
                (store, None)
            }
        };
        let mut wasm = config.wasm.clone();
        // `max_instances` may be under the concurrency (an operator keeping the pool's
        // reservation small): jobs that find the pool full wait in the queue.
        wasm.max_memory_bytes = wasm.max_memory_bytes.max(config.scheduler.max_memory_mb << 20);
        let executor = Arc::new(
            WasmExecutor::new(wasm, &cache_dir, crate::registry::stored_binaries(store.clone()))
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
        // In the background: checking for QEMU runs it, and booting the template
        // takes seconds; only vm jobs wait for it. A cluster's API node runs no jobs:
        // it boots nothing.
        if config.postgres.as_ref().is_none_or(|pg| pg.node.role.runs_jobs()) {
            vm.warm_up();
        }
        let executors =
            Arc::new(Executors::new(vec![executor.clone(), docker.clone(), vm.clone()]));
        let secrets = Arc::new(
            Secrets::open(store.clone(), config.secrets.clone())
                .context("loading the secrets key")?,
        );
        if let Some(cluster) = &cluster {
            cluster.set_executors(available_executors(cluster.as_ref(), &executors).await);
        }
        let scheduler = Scheduler::start(
            store.clone(),
            executors.clone(),
            secrets.clone(),
            config.scheduler.clone(),
            cluster.clone(),
        )
        .await?;
        if let Some(cluster) = &cluster
            && cluster.role().runs_jobs()
        {
            tokio::spawn(follow_executors(
                cluster.clone(),
                executors.clone(),
                scheduler.stopping().clone(),
            ));
        }
        let egress = Arc::new(config.egress.clone());
        let batches =
            crate::batch::Batches::start(store.clone(), scheduler.clone(), egress.clone()).await?;
        Ok(Runtime {
            store,
            executor,
            docker,
            vm,
            executors,
            registry,
            scheduler,
            batches,
            cluster,
            egress,
            secrets,
            runners: Arc::default(),
        })
    }

    /// Stores `binary` (a Wasm function) as the admin's and makes it runnable by every
    /// account as the built-in `name` (a name no upload can take, e.g. `runner:js`);
    /// returns its version id. Runs once per runner, at start.
    pub async fn add_runner(&self, name: &str, binary: bytes::Bytes) -> anyhow::Result<String> {
        let meta = self
            .registry
            .upload(&Tenant::admin(), None, binary)
            .await
            .with_context(|| format!("loading the built-in runner {name}"))?;
        self.scheduler.add_builtin(name, &meta.id);
        self.runners.write().unwrap().insert(name.to_string(), Ok(meta.id.clone()));
        Ok(meta.id)
    }

    /// Records that the built-in runner `name` is not offered, and why (shown by
    /// [`Runtime::readiness`]).
    pub fn runner_unready(&self, name: &str, why: Unready) {
        self.runners.write().unwrap().insert(name.to_string(), Err(why));
    }

    /// Every executor, then every built-in runner, and whether each can take jobs now
    /// (the engines are asked: a down Docker engine costs up to its timeout).
    pub async fn readiness(&self) -> Vec<Readiness> {
        let mut all = Vec::new();
        for name in self.executors.names() {
            let state = self.executors.available(name).await.unwrap_or(Ok(()));
            all.push(Readiness { name: name.to_string(), runner: false, state });
        }
        let runners = self.runners.read().unwrap().clone();
        for (name, r) in runners {
            all.push(Readiness { name, runner: true, state: r.map(|_| ()) });
        }
        all
    }
}

/// A stable id of the server owning `data_dir`, for labelling what it makes outside
/// itself (containers).
fn instance_id(data_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    hex::encode(&Sha256::digest(path.as_os_str().as_encoded_bytes())[..8])
}

/// The executors of this node that can take jobs now: what its claims match.
async fn available_executors(cluster: &dyn Cluster, executors: &Executors) -> Vec<String> {
    let mut names = Vec::new();
    if cluster.role().runs_jobs() {
        for name in executors.names() {
            if matches!(executors.available(name).await, Some(Ok(()))) {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// How often a worker looks again at which of its executors can take jobs.
const EXECUTORS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the executors a worker claims for in step with what it can run: a Docker
/// engine that stops (or starts), a VM template that finished booting.
async fn follow_executors(
    cluster: Arc<dyn Cluster>,
    executors: Arc<Executors>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut current = available_executors(cluster.as_ref(), &executors).await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EXECUTORS_EVERY) => {}
        }
        let now = available_executors(cluster.as_ref(), &executors).await;
        if now != current {
            tracing::info!(executors = ?now, was = ?current, "the executors this node runs changed");
            cluster.set_executors(now.clone());
            current = now;
        }
    }
}
