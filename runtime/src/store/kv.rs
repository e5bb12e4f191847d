//! The seam between the [`Store`] semantics and an embedded engine: an ordered map of
//! byte keys to byte values, read in snapshots and written in transactions.
//!
//! Every [`Store`] method is written once, over these traits (the private `keyspace`
//! module), and run by [`KvStore`]: one writer thread that groups concurrent writes
//! into one commit. A backend only supplies [`KvBackend`]: a read view and a durable
//! write transaction. [`RedbStore`](super::redb::RedbStore) and
//! [`SledStore`](super::sled::SledStore) are `KvStore`s.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cloudpipe_types::{FunctionSettings, JobStatus};

use super::keyspace::{self, Reply, WriteOp};
use super::space::{SpaceGuard, StorageFull};
use super::writer::Writer;
use super::{
    BatchCaps, BatchFilter, CreateBatch, FunctionMeta, Inserted, JobFilter, PutFunction, PutSecret,
    Recovery, Result, Retention, Store,
};
use crate::model::{
    AccountRecord, BatchState, Job, JobId, JobOutcome, KeyRecord, Micros, Scope, SecretRecord,
};

/// One key and its value, as a scan returns them.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Reads of one consistent view (a read transaction, or the writer's own transaction).
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Up to `limit` entries whose key starts with `prefix`, in key order (`reverse`:
    /// descending), starting strictly after `after` in the direction of travel (a key
    /// with the same prefix, typically the last key of the previous chunk).
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>>;
}

/// A write transaction: its reads see its own writes.
pub trait KvWrite: KvRead {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()>;
    fn delete(&mut self, key: &[u8]) -> Result<()>;
}

/// An embedded engine, opened once per process and shared by the reads of the async
/// methods and the writer thread.
pub trait KvBackend: Send + Sync + 'static {
    /// The backend's name (`redb`, `sled`).
    fn name(&self) -> &'static str;

    /// Runs `f` over a consistent read view. Cheap for point reads; callers run scans
    /// on a blocking thread.
    fn read<T>(&self, f: impl FnOnce(&dyn KvRead) -> Result<T>) -> Result<T>;

    /// Runs `f` in one write transaction and makes it durable: when this returns `Ok`,
    /// every write of `f` is on disk; when `f` fails, nothing of it is written. Called
    /// by the writer thread only, so a backend may assume there is one writer.
    fn write<T>(&self, f: impl FnOnce(&mut dyn KvWrite) -> Result<T>) -> Result<T>;
}

/// The bounds of a scan as [`KvRead::scan`] describes it.
pub(crate) fn scan_bounds(
    prefix: &[u8],
    after: Option<&[u8]>,
    reverse: bool,
) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let end = match prefix_end(prefix) {
        Some(end) => Bound::Excluded(end),
        None => Bound::Unbounded,
    };
    match (after, reverse) {
        (Some(a), false) => (Bound::Excluded(a.to_vec()), end),
        (Some(a), true) => (Bound::Included(prefix.to_vec()), Bound::Excluded(a.to_vec())),
        (None, _) => (Bound::Included(prefix.to_vec()), end),
    }
}

/// The first key after every key that starts with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A [`Store`] over any [`KvBackend`]. One per process (it owns the writer thread and
/// the open database); shared as `Arc<dyn Store>`. Dropping it waits for the writer to
/// finish its current commit, then closes the database.
pub struct KvStore<B: KvBackend> {
    backend: Arc<B>,
    writer: Writer,
    space: Option<Arc<SpaceGuard>>,
}

impl<B: KvBackend> std::fmt::Debug for KvStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore").field("backend", &self.backend.name()).finish_non_exhaustive()
    }
}

impl<B: KvBackend> KvStore<B> {
    /// Brings the store's format up to this version's (refusing a newer one), then
    /// starts the writer thread of an opened backend.
    pub fn new(backend: B) -> Result<Self> {
        KvStore::with_space(backend, None)
    }

    /// [`KvStore::new`], with writes held to the free space that `space` watches.
    pub fn with_space(backend: B, space: Option<SpaceGuard>) -> Result<Self> {
        super::format::upgrade(&backend)?;
        if backend.write(keyspace::upgrade)? {
            tracing::info!(backend = backend.name(), "store indexed for job lists");
        }
        let backend = Arc::new(backend);
        let space = space.map(Arc::new);
        let writer = Writer::spawn(backend.clone(), space.clone())?;
        Ok(KvStore { backend, writer, space })
    }

    /// Runs a read that may scan on a blocking thread.
    async fn read_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn KvRead) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.read(f)).await?
    }
}

/// A reply of the wrong kind is a bug in this module, not a store error.
fn unexpected(reply: Reply) -> anyhow::Error {
    anyhow::anyhow!("store writer answered with an unexpected reply: {reply:?}")
}

#[async_trait]
impl<B: KvBackend> Store for KvStore<B> {
    fn backend(&self) -> &'static str {
        self.backend.name()
    }

    fn degraded(&self) -> Option<StorageFull> {
        self.space.as_ref().and_then(|s| s.degraded())
    }

    async fn put_function(
        &self,
        meta: FunctionMeta,
        binary: Bytes,
        max_bytes: Option<u64>,
    ) -> Result<PutFunction> {
        match self.writer.submit(WriteOp::PutFunction(meta, binary, max_bytes)).await? {
            Reply::Put(put) => Ok(put),
            other => Err(unexpected(other)),
        }
    }

    async fn get_function(&self, scope: &Scope, name_or_id: &str) -> Result<Option<FunctionMeta>> {
        self.backend.read(|r| keyspace::get_function(r, scope, name_or_id))
    }

    async fn put_settings(
        &self,
        scope: &Scope,
        name: &str,
        settings: FunctionSettings,
    ) -> Result<Option<FunctionMeta>> {
        let op = WriteOp::PutSettings(scope.clone(), name.to_string(), Box::new(settings));
        match self.writer.submit(op).await? {
            Reply::MaybeFunction(meta) => Ok(meta),
            other => Err(unexpected(other)),
        }
    }

    async fn function_binary(&self, id: &str) -> Result<Option<Bytes>> {
        let id = id.to_string();
        let binary = self.read_blocking(move |r| keyspace::function_binary(r, &id)).await?;
        Ok(binary.map(Bytes::from))
    }

    async fn list_functions(&self, scope: &Scope) -> Result<Vec<FunctionMeta>> {
        let scope = scope.clone();
        self.read_blocking(move |r| keyspace::list_functions(r, &scope)).await
    }

    async fn delete_function(&self, scope: &Scope, name_or_id: &str) -> Result<Vec<FunctionMeta>> {
        let op = WriteOp::DeleteFunction(scope.clone(), name_or_id.to_string());
        match self.writer.submit(op).await? {
            Reply::Deleted(metas) => Ok(metas),
            other => Err(unexpected(other)),
        }
    }

    async fn function_bytes(&self, account: &str) -> Result<u64> {
        let account = account.to_string();
        self.read_blocking(move |r| keyspace::function_bytes(r, &account)).await
    }

    async fn create_batch(
        &self,
        batch: BatchState,
        inputs: Vec<Vec<String>>,
        caps: BatchCaps,
    ) -> Result<CreateBatch> {
        match self.writer.submit(WriteOp::CreateBatch(Box::new(batch), inputs, caps)).await? {
            Reply::CreatedBatch(created) => Ok(created),
            other => Err(unexpected(other)),
        }
    }

    async fn put_batch(&self, batch: BatchState) -> Result<bool> {
        match self.writer.submit(WriteOp::PutBatch(Box::new(batch))).await? {
            Reply::Done(found) => Ok(found),
            other => Err(unexpected(other)),
        }
    }

    async fn get_batch(&self, id: &str) -> Result<Option<BatchState>> {
        let id = id.to_string();
        self.read_blocking(move |r| keyspace::get_batch(r, &id)).await
    }

    async fn batch_inputs(&self, id: &str, start: u64, count: usize) -> Result<Vec<Vec<String>>> {
        let id = id.to_string();
        self.read_blocking(move |r| keyspace::batch_inputs(r, &id, start, count)).await
    }

    async fn list_batches(&self, filter: &BatchFilter) -> Result<Vec<BatchState>> {
        let filter = filter.clone();
        self.read_blocking(move |r| keyspace::list_batches(r, &filter)).await
    }

    async fn open_batches(&self) -> Result<Vec<BatchState>> {
        self.read_blocking(keyspace::open_batches).await
    }

    async fn delete_batch(&self, id: &str) -> Result<Option<BatchState>> {
        match self.writer.submit(WriteOp::DeleteBatch(id.to_string())).await? {
            Reply::Batch(b) => Ok(b.map(|b| *b)),
            other => Err(unexpected(other)),
        }
    }

    async fn purge_batches(
        &self,
        max_age_micros: u64,
        now: Micros,
        max_batch: usize,
    ) -> Result<usize> {
        if max_batch == 0 {
            return Ok(0);
        }
        let op = WriteOp::PurgeBatches { max_age: max_age_micros, now, max_batch };
        match self.writer.submit(op).await? {
            Reply::Purged(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    async fn insert_account(&self, account: AccountRecord) -> Result<bool> {
        match self.writer.submit(WriteOp::InsertAccount(account)).await? {
            Reply::Done(done) => Ok(done),
            other => Err(unexpected(other)),
        }
    }

    async fn update_account(&self, account: AccountRecord) -> Result<bool> {
        match self.writer.submit(WriteOp::UpdateAccount(account)).await? {
            Reply::Done(done) => Ok(done),
            other => Err(unexpected(other)),
        }
    }

    async fn get_account(&self, name: &str) -> Result<Option<AccountRecord>> {
        self.backend.read(|r| keyspace::get_account(r, name))
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>> {
        self.read_blocking(keyspace::list_accounts).await
    }

    async fn insert_key(&self, key: KeyRecord) -> Result<bool> {
        match self.writer.submit(WriteOp::InsertKey(key)).await? {
            Reply::Done(done) => Ok(done),
            other => Err(unexpected(other)),
        }
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>> {
        self.backend.read(|r| keyspace::key_by_hash(r, hash))
    }

    async fn list_keys(&self, account: Option<&str>) -> Result<Vec<KeyRecord>> {
        let account = account.map(str::to_string);
        self.read_blocking(move |r| keyspace::list_keys(r, account.as_deref())).await
    }

    async fn delete_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        match self.writer.submit(WriteOp::DeleteKey(id.to_string())).await? {
            Reply::Key(key) => Ok(key),
            other => Err(unexpected(other)),
        }
    }

    async fn insert_job(&self, job: Job) -> Result<Inserted> {
        match self.writer.submit(WriteOp::InsertJob(Box::new(job))).await? {
            Reply::Inserted(inserted) => Ok(inserted),
            other => Err(unexpected(other)),
        }
    }

    async fn claim_jobs(&self, limit: usize, now: Micros) -> Result<Vec<Job>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        match self.writer.submit(WriteOp::ClaimJobs { limit, now }).await? {
            Reply::Jobs(jobs) => Ok(jobs),
            other => Err(unexpected(other)),
        }
    }

    async fn finish_job(&self, id: JobId, outcome: JobOutcome, now: Micros) -> Result<Option<Job>> {
        match self.writer.submit(WriteOp::FinishJob { id, outcome: Box::new(outcome), now }).await?
        {
            Reply::Job(job) => Ok(job),
            other => Err(unexpected(other)),
        }
    }

    async fn cancel_queued_job(&self, id: JobId, now: Micros) -> Result<Option<Job>> {
        match self.writer.submit(WriteOp::CancelQueued { id, now }).await? {
            Reply::Job(job) => Ok(job),
            other => Err(unexpected(other)),
        }
    }

    async fn release_job(&self, id: JobId) -> Result<Option<Job>> {
        match self.writer.submit(WriteOp::Release { id }).await? {
            Reply::Job(job) => Ok(job),
            other => Err(unexpected(other)),
        }
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        self.backend.read(|r| keyspace::get_job(r, id))
    }

    async fn job_by_idempotency_key(&self, account: &str, key: &str) -> Result<Option<Job>> {
        self.backend.read(|r| keyspace::job_by_idempotency_key(r, account, key))
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let filter = filter.clone();
        self.read_blocking(move |r| keyspace::list_jobs(r, &filter)).await
    }

    async fn active_jobs(&self) -> Result<Vec<(JobId, String)>> {
        self.read_blocking(keyspace::active_jobs).await
    }

    async fn count_jobs(&self) -> Result<BTreeMap<JobStatus, u64>> {
        self.backend.read(keyspace::count_jobs)
    }

    async fn recover(&self, now: Micros) -> Result<Recovery> {
        match self.writer.submit(WriteOp::Recover { now }).await? {
            Reply::Recovery(recovery) => Ok(recovery),
            other => Err(unexpected(other)),
        }
    }

    async fn purge_finished(
        &self,
        policy: Retention,
        now: Micros,
        max_batch: usize,
    ) -> Result<usize> {
        if max_batch == 0 {
            return Ok(0);
        }
        match self.writer.submit(WriteOp::Purge { policy, now, max_batch }).await? {
            Reply::Purged(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    async fn put_secret(
        &self,
        record: SecretRecord,
        max_per_account: Option<u64>,
    ) -> Result<PutSecret> {
        let op = keyspace::SecretOp::Put(Box::new(record), max_per_account);
        match self.writer.submit(WriteOp::Secret(op)).await? {
            Reply::Secret(put) => Ok(put),
            other => Err(unexpected(other)),
        }
    }

    async fn get_secret(&self, account: &str, name: &str) -> Result<Option<SecretRecord>> {
        self.backend.read(|r| keyspace::get_secret(r, account, name))
    }

    async fn list_secrets(&self, account: &str) -> Result<Vec<SecretRecord>> {
        let account = account.to_string();
        self.read_blocking(move |r| keyspace::list_secrets(r, &account)).await
    }

    async fn delete_secret(&self, account: &str, name: &str) -> Result<bool> {
        let op = keyspace::SecretOp::Delete(account.to_string(), name.to_string());
        match self.writer.submit(WriteOp::Secret(op)).await? {
            Reply::Done(done) => Ok(done),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An ordered map in memory: enough of a backend to lay out data by hand.
    #[derive(Default)]
    struct MemKv(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>);

    struct MemTx(BTreeMap<Vec<u8>, Vec<u8>>);

    impl KvRead for MemTx {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
            Ok(self.0.get(key).cloned())
        }

        fn scan(
            &self,
            prefix: &[u8],
            after: Option<&[u8]>,
            reverse: bool,
            limit: usize,
        ) -> Result<Vec<Entry>> {
            let range = self.0.range(scan_bounds(prefix, after, reverse));
            let entry = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
            Ok(match reverse {
                true => range.rev().take(limit).map(entry).collect(),
                false => range.take(limit).map(entry).collect(),
            })
        }
    }

    impl KvWrite for MemTx {
        fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
            self.0.insert(key.to_vec(), value.to_vec());
            Ok(())
        }

        fn delete(&mut self, key: &[u8]) -> Result<()> {
            self.0.remove(key);
            Ok(())
        }
    }

    impl KvBackend for MemKv {
        fn name(&self) -> &'static str {
            "memory"
        }

        fn read<T>(&self, f: impl FnOnce(&dyn KvRead) -> Result<T>) -> Result<T> {
            f(&MemTx(self.0.lock().unwrap().clone()))
        }

        fn write<T>(&self, f: impl FnOnce(&mut dyn KvWrite) -> Result<T>) -> Result<T> {
            let mut map = self.0.lock().unwrap();
            let mut tx = MemTx(map.clone());
            let out = f(&mut tx)?;
            *map = tx.0;
            Ok(out)
        }
    }

    /// A store written before the list index and the per-account queues: a queued
    /// and a finished job, laid out as that version wrote them.
    #[tokio::test]
    async fn store_written_before_the_list_index_is_indexed_at_open() {
        use crate::model::job::tests::queued_job;
        let mut queued = queued_job("f");
        queued.account = "alice".into();
        queued.tags = vec!["t".into()];
        let mut done = queued_job("g");
        done.status = JobStatus::Succeeded;
        done.finished_at = Some(done.created_at + 1);
        let mut map = BTreeMap::new();
        for job in [&queued, &done] {
            let id = job.id.to_bytes();
            map.insert([&b"j"[..], &id].concat(), serde_json::to_vec(job).unwrap());
        }
        let at = |t: Micros| t.to_be_bytes();
        map.insert([&b"q"[..], &at(queued.created_at), &queued.id.to_bytes()].concat(), vec![]);
        map.insert(
            [&b"d"[..], &at(done.finished_at.unwrap()), &done.id.to_bytes()].concat(),
            vec![],
        );
        let store = KvStore::new(MemKv(Mutex::new(map))).unwrap();

        let list = |filter: JobFilter| {
            let store = &store;
            async move {
                let filter = JobFilter { limit: 10, ..filter };
                store
                    .list_jobs(&filter)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|j| j.id)
                    .collect::<Vec<_>>()
            }
        };
        let alice = || Some("alice".to_string());
        assert_eq!(list(JobFilter { account: alice(), ..Default::default() }).await, [queued.id]);
        assert_eq!(
            list(JobFilter { tag: Some("t".into()), ..Default::default() }).await,
            [queued.id]
        );
        let succeeded = Some(JobStatus::Succeeded);
        assert_eq!(list(JobFilter { status: succeeded, ..Default::default() }).await, [done.id]);
        assert_eq!(store.active_jobs().await.unwrap(), [(queued.id, "alice".to_string())]);
        let claimed = store.claim_jobs(10, 5).await.unwrap();
        assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), [queued.id]);
        assert_eq!(store.backend.read(|r| r.scan(b"q", None, false, 10)).unwrap(), []);
        // Done once: a second open finds the index.
        assert!(!store.backend.write(keyspace::upgrade).unwrap());
    }

    #[test]
    fn prefix_end_carries_past_full_bytes() {
        assert_eq!(prefix_end(b"j"), Some(b"k".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }

    #[test]
    fn scan_bounds_exclude_the_cursor_in_the_direction_of_travel() {
        let (lo, hi) = scan_bounds(b"j", Some(b"j5"), true);
        assert_eq!(lo, Bound::Included(b"j".to_vec()));
        assert_eq!(hi, Bound::Excluded(b"j5".to_vec()));
        let (lo, hi) = scan_bounds(b"j", Some(b"j5"), false);
        assert_eq!(lo, Bound::Excluded(b"j5".to_vec()));
        assert_eq!(hi, Bound::Excluded(b"k".to_vec()));
    }
}
