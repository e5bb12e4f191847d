//! Nodes sharing one store: what the scheduler, the batches and the API need to know
//! of the other nodes when the store is PostgreSQL.
//!
//! The embedded stores (redb, sled) serve one process: there is no [`Cluster`], and
//! every job this process knows of runs here. With PostgreSQL, several processes
//! (nodes) share the jobs. Each node has a [`Role`]; a node that runs jobs claims them
//! with a *lease* that its heartbeat renews, so a node that dies loses its jobs to the
//! others after one lease. Every state change is a row in the database; notifications
//! ([`ClusterEvent`]) only make the other nodes look sooner, and every path that waits
//! on one also polls, because a listener misses notifications while it reconnects.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::model::{JobId, Micros};

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Serves the API and runs jobs: the single-node default.
    #[default]
    All,
    /// Serves the API and `/fn/…`; runs no queued jobs.
    Api,
    /// Runs jobs; serves only `/healthz`, `/metrics` and the live events of its jobs.
    Worker,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "all" => Some(Role::All),
            "api" => Some(Role::Api),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Api => "api",
            Role::Worker => "worker",
        }
    }

    /// Whether this node claims and runs jobs.
    pub fn runs_jobs(self) -> bool {
        self != Role::Api
    }

    /// Whether this node serves the API.
    pub fn serves_api(self) -> bool {
        self != Role::Worker
    }
}

/// Who this node is in a cluster; plain data, built by the binary.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unique among the nodes of one database.
    pub name: String,
    pub role: Role,
    /// Where the other nodes reach this one (`http://host:port`), for live events of
    /// the jobs it runs.
    pub advertise_url: Option<String>,
    /// How long a claim holds without a heartbeat. A node renews its leases every
    /// third of this; a node silent for longer loses its jobs to the others.
    pub lease: Duration,
    /// Connections this node keeps to the database.
    pub max_connections: usize,
}

impl NodeConfig {
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

    /// A node named `name` with the defaults.
    pub fn new(name: impl Into<String>) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            role: Role::All,
            advertise_url: None,
            lease: Self::DEFAULT_LEASE,
            max_connections: 16,
        }
    }
}

/// What happened elsewhere in the cluster, as this node hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// Jobs were queued: a node with free slots should claim.
    Queued,
    /// These jobs ended (on any node).
    Finished(Vec<JobId>),
    /// A client asked to cancel this job; the node running it stops it.
    Cancel(JobId),
    /// This node no longer holds the lease of a job it runs (it was silent too long
    /// and another node took the job over): stop the run; its result is not written.
    LeaseLost(JobId),
    /// Keys or accounts changed: cached credentials are stale.
    AuthChanged,
    /// A function was uploaded, reconfigured or deleted: cached metadata is stale.
    FunctionsChanged,
    /// A client asked to cancel this batch; the node driving it stops it.
    BatchCancel(String),
    /// The notification channel was down: anything may have been missed.
    Resync,
}

/// One node as the cluster sees it (`GET /v1/nodes`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub role: Role,
    pub executors: Vec<String>,
    pub version: String,
    pub advertise_url: Option<String>,
    pub started_at: Micros,
    /// By the database's clock.
    pub heartbeat_at: Micros,
    /// Jobs it runs now (as of its last heartbeat).
    pub running: u64,
    /// Whether it holds the leader lease (rescuer, retention).
    pub leader: bool,
    /// Whether its heartbeat is older than one lease.
    pub stale: bool,
}

/// The cluster side of a shared store. One per process.
#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// This node's name.
    fn node(&self) -> &str;

    /// This node's role.
    fn role(&self) -> Role;

    /// Events from now on.
    fn subscribe(&self) -> broadcast::Receiver<ClusterEvent>;

    /// The executors this node runs, once they are known: its claims match only
    /// jobs of these. Called at start-up, before the first claim.
    fn set_executors(&self, names: Vec<String>);

    /// Whether this node holds the leader lease now.
    fn is_leader(&self) -> bool;

    /// Asks the node running job `id` to stop it.
    async fn request_cancel(&self, id: JobId) -> anyhow::Result<()>;

    /// Queued and running jobs of `account`, counted in the database.
    async fn active_jobs(&self, account: &str) -> anyhow::Result<u64>;

    /// Every node that heartbeated recently, sorted by name.
    async fn nodes(&self) -> anyhow::Result<Vec<NodeInfo>>;

    /// Takes the driver lease of batch `id`: `true` if this node now drives it.
    async fn claim_batch(&self, id: &str) -> anyhow::Result<bool>;

    /// Gives up the driver lease of batch `id` (its driver ended).
    async fn release_batch(&self, id: &str) -> anyhow::Result<()>;

    /// Running batches whose driver lease ran out (their node died).
    async fn orphaned_batches(&self) -> anyhow::Result<Vec<String>>;

    /// Asks the node driving batch `id` to cancel it.
    async fn request_batch_cancel(&self, id: &str) -> anyhow::Result<()>;

    /// Tells every node that keys or accounts changed.
    async fn auth_changed(&self) -> anyhow::Result<()>;

    /// Leaves the cluster at a clean shutdown: the leader lease and the node's row
    /// go, so others take over at once rather than after a lease.
    async fn leave(&self);
}
