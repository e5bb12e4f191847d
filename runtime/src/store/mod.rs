//! The durable [`Store`]: functions, jobs and the job queue, behind one trait with one
//! conformance suite ([`conformance`]) that every backend passes.
//!
//! Backends: [`redb`](self::redb) (the default: one fdatasync per commit, compacts) and
//! [`sled`](self::sled) (the design card's choice, made durable by an fdatasync after
//! each flush). A networked backend (PostgreSQL) fits the same trait: nothing here
//! assumes the store lives in the executor's process.
//!
//! Every write is durable when its future resolves: the API answers only after that.
//! Concurrent writes share commits (one writer fed by a channel).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cloudpipe_types::{FunctionSettings, JobStatus};

pub use crate::model::FunctionMeta;
use crate::model::{
    AccountRecord, BatchState, Job, JobId, JobOutcome, KeyRecord, Micros, Scope, SecretRecord,
};

pub mod format;
mod keyspace;
pub mod kv;
pub mod postgres;
pub mod redb;
pub mod sled;
pub mod space;
mod writer;

pub use space::{SpaceConfig, StorageFull};

#[cfg(test)]
pub(crate) mod conformance;

/// Memory each embedded engine may use to cache pages. Their defaults (1 GiB for both
/// redb and sled) fill with whatever was written last, so a server that stored 1 GiB
/// of output held 1 GiB of it in memory; records are small (stdin and output are
/// apart from them), so this holds the records of hundreds of thousands of jobs.
pub(crate) const CACHE_BYTES: usize = 64 << 20;

/// Store errors are I/O or corruption: callers cannot do much but report them.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

/// What [`Store::insert_job`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The job is new and now durable.
    Created(Job),
    /// A job with the same idempotency key exists; this is it, unchanged.
    Existing(Job),
}

impl Inserted {
    pub fn job(&self) -> &Job {
        match self {
            Inserted::Created(j) | Inserted::Existing(j) => j,
        }
    }
}

/// What [`Store::put_function`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutFunction {
    Stored(FunctionMeta),
    /// The name belongs to another account; nothing was written.
    NameTaken,
    /// The account's versions would pass its byte quota; nothing was written.
    OverQuota {
        used: u64,
        limit: u64,
    },
}

/// What [`Store::put_secret`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutSecret {
    /// Created, or replaced (keeping the first `created_at`); this is it as stored.
    Stored(SecretRecord),
    /// The account has `limit` secrets already and this name is new; nothing written.
    OverQuota { limit: u64 },
}

/// Filter of [`Store::list_jobs`]; every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// The owning account.
    pub account: Option<String>,
    /// Jobs of this batch.
    pub batch: Option<String>,
    pub status: Option<JobStatus>,
    /// The job carries this tag.
    pub tag: Option<String>,
    /// `Job::function` or `Job::function_id` equals this.
    pub function: Option<String>,
    /// The node the job runs or last ran on (clusters only).
    pub node: Option<String>,
    /// Only jobs strictly older than this id (the previous page's last id).
    pub before: Option<JobId>,
    /// At most this many jobs (newest first).
    pub limit: usize,
}

/// What [`Store::recover`] did at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Jobs found running and put back in the queue.
    pub requeued: usize,
    /// Jobs found running that had used all their attempts: now `failed`
    /// with error kind `attempts_exhausted`.
    pub exhausted: usize,
}

/// How many inputs one stored chunk of a batch holds.
pub const BATCH_CHUNK: usize = 1024;

/// An account's caps on what its batches store, checked by [`Store::create_batch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCaps {
    /// Batches the account stores (any status).
    pub max_batches: Option<u64>,
    /// Inputs of all the account's stored batches together.
    pub max_inputs: Option<u64>,
}

/// What [`Store::create_batch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateBatch {
    Created,
    /// The account has `used` batches already, and `limit` at most; nothing written.
    TooManyBatches {
        used: u64,
        limit: u64,
    },
    /// The account's batches hold `used` inputs already, and with this batch's
    /// would pass `limit`; nothing written.
    TooManyInputs {
        used: u64,
        limit: u64,
    },
}

/// Which page [`Store::list_batches`] returns.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    /// The owning account (every account: `None`).
    pub account: Option<String>,
    /// Only batches strictly older than this id (the previous page's last).
    pub before: Option<String>,
    pub limit: usize,
}

/// How long finished jobs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished jobs older than this (by `finished_at`) are deleted.
    pub max_age_micros: u64,
    /// Beyond this many finished jobs of one account, that account's oldest are
    /// deleted; an account's `max_finished_jobs` quota replaces it for that account.
    pub max_finished_per_account: u64,
}

/// The durable state of a Cloudpipe node. One per process, shared (`Arc<dyn Store>`).
///
/// Each method is one transaction: a job record and its queue entry never disagree,
/// even after `kill -9` or a power cut. A returned `Ok` means the write is on disk.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's name (`redb`, `sled`).
    fn backend(&self) -> &'static str;

    /// Why the store refuses new work now (its disk is nearly full: see
    /// [`space`](self::space)), if it does. Cheap: asked at each submit and by
    /// `/healthz`. Writes it refuses fail with [`StorageFull`]; reads go on.
    fn degraded(&self) -> Option<StorageFull> {
        None
    }

    // ---- functions ----
    //
    // Names are global (they are the `/fn/{name}` URL) and each belongs to one account;
    // versions are kept per account (two accounts uploading the same binary each own
    // a version; the bytes are stored once). A scope sees only its account's names and
    // versions; `Scope::All` sees every one.

    /// Stores a function version for `meta.account` (idempotent by id: a second upload
    /// of the same binary keeps the first `created_at`) and, when `meta.name` is set,
    /// points that name at it. `max_bytes` bounds the total size of the account's
    /// versions, checked in the same transaction.
    async fn put_function(
        &self,
        meta: FunctionMeta,
        binary: Bytes,
        max_bytes: Option<u64>,
    ) -> Result<PutFunction>;

    /// A function by name (the version the name points at) or by id (`sha256:…`), as
    /// seen in `scope`.
    async fn get_function(&self, scope: &Scope, name_or_id: &str) -> Result<Option<FunctionMeta>>;

    /// Replaces the settings of a name visible in `scope`. Returns the function as it
    /// now is, or `None` if there is no such name.
    async fn put_settings(
        &self,
        scope: &Scope,
        name: &str,
        settings: FunctionSettings,
    ) -> Result<Option<FunctionMeta>>;

    /// The binary of a version, by id.
    async fn function_binary(&self, id: &str) -> Result<Option<Bytes>>;

    /// Every named function visible in `scope` (the version each name points at),
    /// sorted by name.
    async fn list_functions(&self, scope: &Scope) -> Result<Vec<FunctionMeta>>;

    /// Deletes a name and every version of its account uploaded under it that no other
    /// name points at; or, given an id, that version and any name pointing at it.
    /// Returns what was deleted (empty: nothing matched in `scope`).
    async fn delete_function(&self, scope: &Scope, name_or_id: &str) -> Result<Vec<FunctionMeta>>;

    /// Total size of the versions `account` stores, in bytes.
    async fn function_bytes(&self, account: &str) -> Result<u64>;

    // ---- batches ----
    //
    // A batch is a small record (`BatchState`, read by every poll) and its inputs,
    // stored apart in chunks of [`BATCH_CHUNK`] that only its driver reads. Each
    // account's batches are indexed, and counted (batches and inputs) for its caps.

    /// Stores a new batch: its record (`batch.total` is `inputs.len()`) and its
    /// inputs. Refused (nothing written) when the account would pass `caps`, checked
    /// in the same transaction.
    async fn create_batch(
        &self,
        batch: BatchState,
        inputs: Vec<Vec<String>>,
        caps: BatchCaps,
    ) -> Result<CreateBatch>;

    /// Replaces the record of an existing batch (its account, total and inputs stay
    /// as they are); `false` (nothing written) if there is none, e.g. deleted.
    async fn put_batch(&self, batch: BatchState) -> Result<bool>;

    /// A batch's record, without its inputs.
    async fn get_batch(&self, id: &str) -> Result<Option<BatchState>>;

    /// Inputs `start..start + count` of a batch (fewer past its end; none if there is
    /// no such batch). Reads only the chunks that hold them.
    async fn batch_inputs(&self, id: &str, start: u64, count: usize) -> Result<Vec<Vec<String>>>;

    /// A page of batch records, newest first: those of `filter.account` (every
    /// account: `None`) older than `filter.before`. Indexed: a page costs its size.
    async fn list_batches(&self, filter: &BatchFilter) -> Result<Vec<BatchState>>;

    /// The batches a start-up takes up: running ones, and those ended whose report
    /// hook is still to be called. Records only.
    async fn open_batches(&self) -> Result<Vec<BatchState>>;

    /// Deletes a batch, its inputs and its counts (its jobs stay, until job retention
    /// takes them). Returns its record, or `None` if there was none.
    async fn delete_batch(&self, id: &str) -> Result<Option<BatchState>>;

    /// Deletes up to `max_batch` batches that stopped (finished, struck or cancelled)
    /// more than `max_age_micros` before `now`, oldest first, as
    /// [`delete_batch`](Store::delete_batch) does. Returns how many; the caller calls
    /// again while it returns `max_batch`.
    async fn purge_batches(
        &self,
        max_age_micros: u64,
        now: Micros,
        max_batch: usize,
    ) -> Result<usize>;

    // ---- accounts and keys ----

    /// Creates an account; `false` (and nothing written) if the name exists.
    async fn insert_account(&self, account: AccountRecord) -> Result<bool>;

    /// Replaces an existing account; `false` if there is none by that name.
    async fn update_account(&self, account: AccountRecord) -> Result<bool>;

    async fn get_account(&self, name: &str) -> Result<Option<AccountRecord>>;

    /// Every account, sorted by name.
    async fn list_accounts(&self) -> Result<Vec<AccountRecord>>;

    /// Stores a key (its account must exist: `false` otherwise).
    async fn insert_key(&self, key: KeyRecord) -> Result<bool>;

    /// The key whose secret hashes to `hash` (hex SHA-256).
    async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>>;

    /// Keys of `account`, or every key, sorted by id.
    async fn list_keys(&self, account: Option<&str>) -> Result<Vec<KeyRecord>>;

    /// Revokes a key: it is gone at once. Returns it, or `None` if unknown.
    async fn delete_key(&self, id: &str) -> Result<Option<KeyRecord>>;

    // ---- jobs ----

    /// Makes a job durable. A `Queued` job also gets its queue entry; a job may also
    /// be inserted already `Running` (attempts and `started_at` set) when the
    /// scheduler has a free slot, or already finished when it ran before it was
    /// written (a waiting client's short job): each saves a commit. If
    /// `job.idempotency_key` is already known, nothing is written and the existing
    /// job is returned. Idempotency keys are per account.
    async fn insert_job(&self, job: Job) -> Result<Inserted>;

    /// Takes up to `limit` queued jobs and marks them running: `attempts += 1`,
    /// `started_at = now`, queue entry removed. Returns them in the order taken, with
    /// their stdin (the only read that loads it: the jobs are about to run).
    ///
    /// Fair across accounts: one job of each account with queued work in turn, the
    /// accounts in name order starting after the account the previous claim took its
    /// last job from (remembered durably, so a restart does not reset the turn); within
    /// one account, the oldest `created_at` first. One account's backlog thus delays
    /// another account's job by at most one turn.
    async fn claim_jobs(&self, limit: usize, now: Micros) -> Result<Vec<Job>>;

    /// Records the outcome of a running job (`finished_at = now`). If the job is not
    /// running (unknown, or already terminal), nothing changes and the current job
    /// (if any) is returned.
    async fn finish_job(&self, id: JobId, outcome: JobOutcome, now: Micros) -> Result<Option<Job>>;

    /// Cancels a queued job (status `cancelled`, queue entry removed, error kind
    /// `cancelled`). A job in any other status is left as it is. Returns the job as
    /// it now is. (A running job is stopped by the scheduler through its token.)
    async fn cancel_queued_job(&self, id: JobId, now: Micros) -> Result<Option<Job>>;

    /// Gives a running job back unrun, when a clean shutdown cut its attempt short:
    /// `queued` again, in its original place, with the attempt not counted. A job in
    /// any other status is left as it is. Returns the job as it now is.
    async fn release_job(&self, id: JobId) -> Result<Option<Job>>;

    /// A job with its stdout and stderr; its `stdin` is empty (stdin and output are
    /// stored apart from the record, and stdin is read only by the claim that runs
    /// the job). The jobs other methods return are in this form too, except where
    /// they say otherwise.
    async fn get_job(&self, id: JobId) -> Result<Option<Job>>;

    /// The jobs of `ids` that exist, in any order: one read for many where the
    /// backend can (a shared store answers a burst of notifications in one query).
    async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>> {
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            jobs.extend(self.get_job(*id).await?);
        }
        Ok(jobs)
    }

    /// The job that idempotency key `key` of `account` names, if any: the lookup
    /// `insert_job` makes, for a caller that must know before it writes (a waiting
    /// client's keyed job runs before it is written).
    async fn job_by_idempotency_key(&self, account: &str, key: &str) -> Result<Option<Job>>;

    /// Jobs matching `filter`, newest first, as summaries ([`Job::summary`]: no stdin,
    /// no output), so that a page costs its records, not their output. Indexed: a page
    /// costs about its own size whatever else is stored, for every filter and
    /// combination of filters (a backend must not scan and skip).
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>>;

    /// Id and account of every queued or running job.
    async fn active_jobs(&self) -> Result<Vec<(JobId, String)>>;

    /// Number of jobs in each status (kept as counters, not counted by a scan).
    async fn count_jobs(&self) -> Result<BTreeMap<JobStatus, u64>>;

    /// At start-up, before any job runs: every `Running` job was cut off by a crash.
    /// Those with attempts left go back to the queue (ahead of newer jobs, attempts
    /// kept); the others become `failed` with error kind `attempts_exhausted`.
    async fn recover(&self, now: Micros) -> Result<Recovery>;

    /// Deletes up to `max_batch` finished jobs that `policy` no longer keeps, with
    /// their index entries and idempotency keys: those finished before the age limit
    /// (oldest first), and each account's oldest past its own count (its
    /// `max_finished_jobs` quota, else `policy.max_finished_per_account`), so that one
    /// account's volume never deletes another's jobs. Returns how many were deleted;
    /// the caller calls again while it returns `max_batch`.
    async fn purge_finished(
        &self,
        policy: Retention,
        now: Micros,
        max_batch: usize,
    ) -> Result<usize>;

    // ---- secrets ----
    //
    // Sealed values (see `crate::secrets`), per account and name; the store never sees
    // a plain value.

    /// Creates or replaces the secret `record.name` of `record.account`. A replacement
    /// keeps the stored `created_at`. A new name is refused (nothing written) when the
    /// account already has `max_per_account` secrets; a replacement always fits.
    async fn put_secret(
        &self,
        record: SecretRecord,
        max_per_account: Option<u64>,
    ) -> Result<PutSecret>;

    async fn get_secret(&self, account: &str, name: &str) -> Result<Option<SecretRecord>>;

    /// The secrets of `account`, sorted by name.
    async fn list_secrets(&self, account: &str) -> Result<Vec<SecretRecord>>;

    /// Deletes a secret; `false` if there was none.
    async fn delete_secret(&self, account: &str, name: &str) -> Result<bool>;
}

/// Which embedded backend to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Redb,
    Sled,
}

impl Backend {
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "redb" => Some(Backend::Redb),
            "sled" => Some(Backend::Sled),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Redb => "redb",
            Backend::Sled => "sled",
        }
    }
}

/// Opens (creating if needed) the store of `backend` in `dir`, compacting it first.
pub fn open(backend: Backend, dir: &Path) -> Result<Arc<dyn Store>> {
    match backend {
        Backend::Redb => Ok(Arc::new(self::redb::RedbStore::open(dir)?)),
        Backend::Sled => Ok(Arc::new(self::sled::SledStore::open(dir)?)),
    }
}

/// [`open`], keeping `space` free on the store's file system (see [`space`](self::space)).
pub fn open_with(backend: Backend, dir: &Path, space: SpaceConfig) -> Result<Arc<dyn Store>> {
    let guard = Some(space::SpaceGuard::new(dir, space));
    match backend {
        Backend::Redb => {
            Ok(Arc::new(kv::KvStore::with_space(self::redb::RedbKv::open(dir)?, guard)?))
        }
        Backend::Sled => {
            Ok(Arc::new(kv::KvStore::with_space(self::sled::SledKv::open(dir)?, guard)?))
        }
    }
}
