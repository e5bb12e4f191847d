//! [`PgStore`]: the [`Store`] on PostgreSQL, shared by the nodes of a cluster.
//!
//! Built on `tokio-postgres` with a `deadpool-postgres` pool rather than `sqlx`: the
//! queries here are few and hand-written, the listener needs the raw connection's
//! notification stream, and the two crates add no macros, no compile-time database
//! and far less to the build than sqlx.
//!
//! The job record is the same JSON as in the embedded stores (`record`); the columns
//! beside it are what queries select and order by. Every method is one transaction.
//! Claims take jobs with `FOR UPDATE SKIP LOCKED` (two nodes never take the same
//! job) and stamp them with this node's name and a lease ([`cluster`]); finishing a
//! job is fenced by that claim, so a node that lost a job to another never writes
//! over the other's result. Finishes are grouped: outcomes that arrive together are
//! written in one transaction (one WAL flush), as the embedded writer does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, bail};
use async_trait::async_trait;
use bytes::Bytes;
use cloudpipe_types::{FunctionSettings, JobStatus};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::{FunctionMeta, Inserted, JobFilter, PutFunction, Recovery, Result, Retention, Store};
use crate::account::{AccountRecord, KeyRecord, Scope};
use crate::batch::BatchState;
use crate::cluster::{ClusterEvent, NodeConfig};
use crate::job::{Job, JobId, JobOutcome, Micros, now_micros};
use crate::secrets::{PutSecret, SecretRecord};

mod cluster;
pub mod schema;
pub mod testdb;

/// Error kind of a job whose attempts ran out while its node was gone.
const ATTEMPTS_EXHAUSTED: &str = super::keyspace::ATTEMPTS_EXHAUSTED;

/// Where and how to connect; plain data.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/database` (libpq's URL and key=value forms).
    pub url: String,
    /// Tables go in this schema (created if needed) instead of the connection's
    /// default; tests give each store its own.
    pub schema: Option<String>,
    pub node: NodeConfig,
}

/// One claim this node holds: the attempt it runs is the fencing token.
type Claims = Mutex<HashMap<JobId, u32>>;

/// The state shared by the store's methods and its background tasks.
pub(crate) struct Shared {
    pool: Pool,
    pg: tokio_postgres::Config,
    node: NodeConfig,
    /// Jobs this node runs, with the attempt each runs.
    claims: Claims,
    /// Batches this node drives.
    batches: Mutex<HashSet<String>>,
    /// Executors whose jobs this node claims (`None`: any, until set).
    executors: RwLock<Option<Vec<String>>>,
    leader: AtomicBool,
    events: broadcast::Sender<ClusterEvent>,
    started_at: Micros,
    stop: CancellationToken,
}

/// A [`Store`] (and [`Cluster`](crate::cluster::Cluster)) on PostgreSQL. One per
/// process; dropping it stops its heartbeat and listener (its leases then run out).
pub struct PgStore {
    shared: Arc<Shared>,
    finisher: mpsc::Sender<Finish>,
    inserter: mpsc::Sender<Insert>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("node", &self.shared.node.name).finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    /// Stops the heartbeat and removes the node's row and leader lease (on a thread
    /// of its own: this may run inside or outside a runtime), so that a node started
    /// again under the same name is not taken for a live one. Its job leases are left
    /// to run out: the jobs it ran are recovered by whoever comes next.
    fn drop(&mut self) {
        self.shared.stop.cancel();
        let pg = self.shared.pg.clone();
        let name = self.shared.node.name.clone();
        let left = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async move {
                let (client, conn) = pg.connect(NoTls).await.ok()?;
                tokio::spawn(conn);
                client.execute("DELETE FROM cp_leader WHERE node = $1", &[&name]).await.ok()?;
                client.execute("DELETE FROM cp_nodes WHERE name = $1", &[&name]).await.ok()
            })
        });
        let _ = left.join();
    }
}

/// One insert waiting for the group writer.
struct Insert {
    job: Job,
    reply: oneshot::Sender<Result<Inserted>>,
}

/// One finish waiting for the group writer.
struct Finish {
    id: JobId,
    outcome: JobOutcome,
    now: Micros,
    reply: oneshot::Sender<Result<Option<Job>>>,
}

fn status_str(s: JobStatus) -> &'static str {
    s.as_str()
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

fn decode_job(bytes: &[u8]) -> Result<Job> {
    serde_json::from_slice(bytes).context("decoding a stored job")
}

/// Text as a PostgreSQL `text` column holds it: `text` cannot hold NUL, which tags and
/// idempotency keys may contain, so `%` and NUL are escaped (the record keeps the
/// original).
fn column_text(s: &str) -> String {
    if !s.contains(['%', '\0']) {
        return s.to_string();
    }
    s.replace('%', "%25").replace('\0', "%00")
}

/// The `finished_at` column of a job: set for terminal jobs only.
fn finished_column(job: &Job) -> Option<i64> {
    job.status.is_terminal().then(|| job.finished_at.unwrap_or(job.created_at) as i64)
}

impl PgStore {
    /// Connects, applies the schema's migrations and starts the node's heartbeat and
    /// listener. Refuses to start as a node whose name a live node uses.
    pub async fn open(config: PgConfig) -> Result<PgStore> {
        let mut pg = tokio_postgres::Config::from_str(&config.url)
            .with_context(|| "parsing the PostgreSQL URL (postgres://user@host:port/db)")?;
        if pg.get_application_name().is_none() {
            pg.application_name(format!("cloudpipe {}", config.node.name));
        }
        if let Some(schema) = &config.schema {
            pg.options(format!("-c search_path={}", schema::quote_ident(schema)));
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(std::time::Duration::from_secs(5));
        }
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(config.node.max_connections.max(2))
            .build()
            .context("building the connection pool")?;
        {
            let mut client = pool.get().await.context("connecting to PostgreSQL")?;
            schema::migrate(&mut client, config.schema.as_deref()).await?;
        }
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            pool,
            pg,
            node: config.node,
            claims: Mutex::default(),
            batches: Mutex::default(),
            executors: RwLock::new(None),
            leader: AtomicBool::new(false),
            events,
            started_at: now_micros(),
            stop: CancellationToken::new(),
        });
        shared.register_node().await?;
        let (finisher, rx) = mpsc::channel(4096);
        tokio::spawn(finish_writer(shared.clone(), rx));
        let (inserter, rx) = mpsc::channel(4096);
        tokio::spawn(insert_writer(shared.clone(), rx));
        cluster::start(&shared);
        Ok(PgStore { shared, finisher, inserter })
    }

    /// [`PgStore::open`] from synchronous code inside a multi-threaded tokio runtime.
    pub fn open_blocking(config: PgConfig) -> Result<PgStore> {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(PgStore::open(config))
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.shared.client().await
    }
}

impl Shared {
    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.context("connecting to PostgreSQL")
    }

    fn lease_micros(&self) -> i64 {
        self.node.lease.as_micros() as i64
    }

    /// The attempt this node runs of job `id`, if it holds its claim.
    fn claim(&self, id: JobId) -> Option<u32> {
        self.claims.lock().unwrap().get(&id).copied()
    }

    /// Whether `job` (as stored) is running here, in the attempt this node claimed:
    /// the fence on every write that ends or gives back an attempt.
    fn holds(&self, job: &Job) -> bool {
        job.status == JobStatus::Running
            && job.node.as_deref() == Some(self.node.name.as_str())
            && self.claim(job.id).is_none_or(|attempt| attempt == job.attempts)
    }
}

/// `NOTIFY channel, 'a,b,c'` for ids, in payloads under PostgreSQL's 8,000 bytes.
fn notify_ids(channel: &str, ids: &[JobId]) -> Vec<String> {
    ids.chunks(200)
        .map(|chunk| {
            let payload: Vec<String> = chunk.iter().map(|id| id.to_string()).collect();
            format!("NOTIFY {channel}, '{}'", payload.join(","))
        })
        .collect()
}

/// Writes new jobs, each group that arrives together in one transaction (one WAL
/// flush, one notification per executor).
async fn insert_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Insert>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < 256 {
            match rx.try_recv() {
                Ok(i) => group.push(i),
                Err(_) => break,
            }
        }
        let jobs: Vec<Job> = group.iter().map(|i| i.job.clone()).collect();
        match shared.insert_group(jobs).await {
            Ok(results) => {
                for (i, r) in group.into_iter().zip(results) {
                    let _ = i.reply.send(Ok(r));
                }
            }
            Err(e) if group.len() == 1 => {
                let _ = group.pop().unwrap().reply.send(Err(e));
            }
            // One bad write must not fail the others: each alone.
            Err(_) => {
                for i in group {
                    let r = shared.insert_group(vec![i.job]).await;
                    let _ = i.reply.send(r.map(|mut v| v.pop().expect("one result per job")));
                }
            }
        }
    }
}

impl Shared {
    /// Inserts new jobs in one transaction; a job whose id or idempotency key exists
    /// is not written and the existing job is returned for it.
    async fn insert_group(&self, mut jobs: Vec<Job>) -> Result<Vec<Inserted>> {
        let n = jobs.len();
        let (mut ids, mut accounts, mut statuses, mut executors, mut functions) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut function_ids, mut batches, mut tags, mut keys, mut created) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut finished, mut attempts, mut nodes, mut records) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for job in &mut jobs {
            if job.status == JobStatus::Running {
                job.node = Some(self.node.name.clone());
            }
            ids.push(job.id.0);
            accounts.push(job.account.clone());
            statuses.push(status_str(job.status));
            executors.push(job.executor.clone());
            functions.push(job.function.clone());
            function_ids.push(job.function_id.clone());
            batches.push(job.batch.as_ref().map(|b| b.id.clone()));
            let t: Vec<String> = job.tags.iter().map(|t| column_text(t)).collect();
            tags.push(serde_json::to_string(&t)?);
            keys.push(job.idempotency_key.as_deref().map(column_text));
            created.push(job.created_at as i64);
            finished.push(finished_column(job));
            attempts.push(job.attempts as i32);
            nodes.push(job.node.clone());
            records.push(encode(job)?);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "INSERT INTO cp_jobs (id, account, status, executor, function, function_id,
                   batch, tags, idempotency_key, created_at, finished_at, attempts, node,
                   lease_expires, record)
                 SELECT u.id, u.account, u.status, u.executor, u.function, u.function_id,
                   u.batch, ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb)),
                   u.idempotency_key, u.created_at, u.finished_at, u.attempts, u.node,
                   CASE WHEN u.status = 'running' THEN cp_now() + $15 END, u.record
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                   $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[],
                   $12::int4[], $13::text[], $14::bytea[])
                   AS u(id, account, status, executor, function, function_id, batch, tags,
                     idempotency_key, created_at, finished_at, attempts, node, record)
                 ON CONFLICT DO NOTHING
                 RETURNING id, status, executor",
                &[
                    &ids,
                    &accounts,
                    &statuses,
                    &executors,
                    &functions,
                    &function_ids,
                    &batches,
                    &tags,
                    &keys,
                    &created,
                    &finished,
                    &attempts,
                    &nodes,
                    &records,
                    &self.lease_micros(),
                ],
            )
            .await?;
        let mut woken: Vec<String> = Vec::new();
        let mut inserted = HashSet::new();
        for row in &rows {
            inserted.insert(row.get::<_, uuid::Uuid>(0));
            let status: &str = row.get(1);
            let executor: String = row.get(2);
            if status == "queued" && !woken.contains(&executor) {
                woken.push(executor);
            }
        }
        if !woken.is_empty() {
            tx.execute("SELECT pg_notify('cp_queued', e) FROM unnest($1::text[]) e", &[&woken])
                .await?;
        }
        tx.commit().await?;
        let mut out = Vec::with_capacity(n);
        for job in jobs {
            if inserted.contains(&job.id.0) {
                if job.status == JobStatus::Running {
                    self.claims.lock().unwrap().insert(job.id, job.attempts);
                }
                out.push(Inserted::Created(job));
                continue;
            }
            let existing = match &job.idempotency_key {
                Some(key) => client
                    .query_opt(
                        "SELECT record FROM cp_jobs WHERE account = $1 AND idempotency_key = $2",
                        &[&job.account, &column_text(key)],
                    )
                    .await?,
                None => None,
            };
            let existing = match existing {
                Some(row) => Some(row),
                None => {
                    client
                        .query_opt("SELECT record FROM cp_jobs WHERE id = $1", &[&job.id.0])
                        .await?
                }
            };
            match existing {
                Some(row) => out.push(Inserted::Existing(decode_job(row.get(0))?)),
                None => bail!("job {} conflicted with a job that is gone; retry", job.id),
            }
        }
        Ok(out)
    }
}

/// Writes queued finishes, each group in one transaction.
async fn finish_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Finish>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < 256 {
            match rx.try_recv() {
                Ok(f) => group.push(f),
                Err(_) => break,
            }
        }
        let requests: Vec<_> = group.iter().map(|f| (f.id, f.outcome.clone(), f.now)).collect();
        match shared.finish_group(&requests).await {
            Ok(results) => {
                for (f, r) in group.into_iter().zip(results) {
                    let _ = f.reply.send(Ok(r));
                }
            }
            Err(e) if group.len() == 1 => {
                let _ = group.pop().unwrap().reply.send(Err(e));
            }
            // One bad write must not fail the others: each alone.
            Err(_) => {
                for f in group {
                    let r = shared.finish_group(&[(f.id, f.outcome.clone(), f.now)]).await;
                    let _ = f.reply.send(r.map(|mut v| v.pop().flatten()));
                }
            }
        }
    }
}

impl Shared {
    /// Records the outcomes of running jobs this node holds. A job this node does not
    /// hold (its lease lost to another node) or that is not running is left as is.
    async fn finish_group(
        &self,
        requests: &[(JobId, JobOutcome, Micros)],
    ) -> Result<Vec<Option<Job>>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ids: Vec<uuid::Uuid> = requests.iter().map(|(id, ..)| id.0).collect();
        let rows =
            tx.query("SELECT record FROM cp_jobs WHERE id = ANY($1) FOR UPDATE", &[&ids]).await?;
        let mut current: HashMap<JobId, Job> = HashMap::new();
        for row in rows {
            let job = decode_job(row.get(0))?;
            current.insert(job.id, job);
        }
        let mut out = Vec::with_capacity(requests.len());
        let mut updates: Vec<Job> = Vec::new();
        for (id, outcome, now) in requests {
            let Some(old) = current.get(id) else {
                out.push(None);
                continue;
            };
            if !self.holds(old) {
                out.push(Some(old.clone()));
                continue;
            }
            let mut job = old.clone();
            job.finish(outcome.clone(), *now);
            current.insert(*id, job.clone());
            updates.push(job.clone());
            out.push(Some(job));
        }
        if !updates.is_empty() {
            update_jobs(&tx, &updates).await?;
            let done: Vec<JobId> = updates.iter().map(|j| j.id).collect();
            for sql in notify_ids("cp_finished", &done) {
                tx.batch_execute(&sql).await?;
            }
        }
        tx.commit().await?;
        let mut claims = self.claims.lock().unwrap();
        for job in &updates {
            claims.remove(&job.id);
        }
        Ok(out)
    }
}

/// Writes new states of existing jobs: record and columns, one statement.
async fn update_jobs(tx: &impl deadpool_postgres::GenericClient, jobs: &[Job]) -> Result<()> {
    let mut ids = Vec::with_capacity(jobs.len());
    let mut statuses = Vec::with_capacity(jobs.len());
    let mut attempts = Vec::with_capacity(jobs.len());
    let mut finished = Vec::with_capacity(jobs.len());
    let mut nodes = Vec::with_capacity(jobs.len());
    let mut records = Vec::with_capacity(jobs.len());
    for job in jobs {
        ids.push(job.id.0);
        statuses.push(status_str(job.status));
        attempts.push(job.attempts as i32);
        finished.push(finished_column(job));
        nodes.push(job.node.clone());
        records.push(encode(job)?);
    }
    tx.execute(
        "UPDATE cp_jobs SET status = u.status, attempts = u.attempts, finished_at = u.finished_at,
                node = u.node, record = u.record,
                lease_expires = CASE WHEN u.status = 'running' THEN lease_expires END,
                cancel_requested = cancel_requested AND u.status = 'running'
         FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::int8[], $5::text[], $6::bytea[])
           AS u(id, status, attempts, finished_at, node, record)
         WHERE cp_jobs.id = u.id",
        &[&ids, &statuses, &attempts, &finished, &nodes, &records],
    )
    .await?;
    Ok(())
}

/// Puts running jobs cut off by their node's death back in the queue, or ends those
/// that used all their attempts. `rows` are locked records.
fn rescued(jobs: Vec<Job>, now: Micros, recovery: &mut Recovery) -> Vec<Job> {
    jobs.into_iter()
        .map(|mut job| {
            if job.attempts < job.max_attempts {
                job.status = JobStatus::Queued;
                job.started_at = None;
                recovery.requeued += 1;
            } else {
                let message = format!(
                    "used {} of {} attempts; the node running the last one ({}) stopped",
                    job.attempts,
                    job.max_attempts,
                    job.node.as_deref().unwrap_or("?")
                );
                job.finish(JobOutcome::error(JobStatus::Failed, ATTEMPTS_EXHAUSTED, message), now);
                recovery.exhausted += 1;
            }
            job
        })
        .collect()
}

impl Shared {
    /// Rescues the running jobs matched by `condition` (an SQL condition on
    /// `cp_jobs`, where `$1`, if used, is this node's name), up to `limit`.
    async fn rescue(&self, condition: &str, now: Micros, limit: i64) -> Result<Recovery> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let sql = format!(
            "SELECT record FROM cp_jobs WHERE status = 'running' AND ({condition})
             ORDER BY created_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
        );
        let rows = match condition.contains("$1") {
            true => tx.query(&sql, &[&self.node.name, &limit]).await?,
            false => {
                let sql = sql.replace("$2", "$1");
                tx.query(&sql, &[&limit]).await?
            }
        };
        let jobs = rows.iter().map(|r| decode_job(r.get(0))).collect::<Result<Vec<_>>>()?;
        let mut recovery = Recovery::default();
        let jobs = rescued(jobs, now, &mut recovery);
        if !jobs.is_empty() {
            update_jobs(&tx, &jobs).await?;
            if recovery.requeued > 0 {
                tx.batch_execute("NOTIFY cp_queued").await?;
            }
            let ended: Vec<JobId> =
                jobs.iter().filter(|j| j.status.is_terminal()).map(|j| j.id).collect();
            for sql in notify_ids("cp_finished", &ended) {
                tx.batch_execute(&sql).await?;
            }
        }
        tx.commit().await?;
        Ok(recovery)
    }
}

/// The SQL condition and parameters of a [`JobFilter`], from `$first` on.
fn filter_sql(filter: &JobFilter, first: usize) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut conds: Vec<String> = Vec::new();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut n = first;
    let mut next = |params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
                    v: Box<dyn ToSql + Sync + Send>| {
        params.push(v);
        let i = n;
        n += 1;
        i
    };
    if let Some(a) = &filter.account {
        let i = next(&mut params, Box::new(a.clone()));
        conds.push(format!("account = ${i}"));
    }
    if let Some(b) = &filter.batch {
        let i = next(&mut params, Box::new(b.clone()));
        conds.push(format!("batch = ${i}"));
    }
    if let Some(s) = filter.status {
        let i = next(&mut params, Box::new(status_str(s).to_string()));
        conds.push(format!("status = ${i}"));
    }
    if let Some(t) = &filter.tag {
        let i = next(&mut params, Box::new(vec![column_text(t)]));
        conds.push(format!("tags @> ${i}"));
    }
    if let Some(f) = &filter.function {
        let i = next(&mut params, Box::new(f.clone()));
        conds.push(format!("(function = ${i} OR function_id = ${i})"));
    }
    if let Some(node) = &filter.node {
        let i = next(&mut params, Box::new(node.clone()));
        conds.push(format!("node = ${i}"));
    }
    if let Some(before) = filter.before {
        let i = next(&mut params, Box::new(before.0));
        conds.push(format!("id < ${i}"));
    }
    let sql = match conds.is_empty() {
        true => "true".to_string(),
        false => conds.join(" AND "),
    };
    (sql, params)
}

/// Where a function name points, and its settings.
struct NameRow {
    account: String,
    id: String,
    settings: Option<Vec<u8>>,
}

async fn name_row(
    c: &impl deadpool_postgres::GenericClient,
    name: &str,
    lock: bool,
) -> Result<Option<NameRow>> {
    let sql = match lock {
        true => "SELECT account, id, settings FROM cp_names WHERE name = $1 FOR UPDATE",
        false => "SELECT account, id, settings FROM cp_names WHERE name = $1",
    };
    Ok(c.query_opt(sql, &[&name]).await?.map(|r| NameRow {
        account: r.get(0),
        id: r.get(1),
        settings: r.get(2),
    }))
}

/// The version a name points at, as seen through that name (with its settings).
async fn named(
    c: &impl deadpool_postgres::GenericClient,
    name: &str,
    entry: &NameRow,
) -> Result<Option<FunctionMeta>> {
    let Some(row) = c
        .query_opt(
            "SELECT meta FROM cp_functions WHERE account = $1 AND id = $2",
            &[&entry.account, &entry.id],
        )
        .await?
    else {
        return Ok(None);
    };
    let mut meta: FunctionMeta =
        serde_json::from_slice(row.get(0)).context("stored function metadata")?;
    if let Some(s) = &entry.settings {
        meta.settings = serde_json::from_slice(s).context("stored function settings")?;
    }
    meta.name = Some(name.to_string());
    Ok(Some(meta))
}

fn decode_meta(bytes: &[u8]) -> Result<FunctionMeta> {
    serde_json::from_slice(bytes).context("stored function metadata")
}

/// Serialises the writes of one account's functions (quota sums, deletes).
async fn lock_account(c: &impl deadpool_postgres::GenericClient, account: &str) -> Result<()> {
    c.execute("SELECT pg_advisory_xact_lock(hashtext('cp_functions'), hashtext($1))", &[&account])
        .await?;
    Ok(())
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn put_function(
        &self,
        meta: FunctionMeta,
        binary: Bytes,
        max_bytes: Option<u64>,
    ) -> Result<PutFunction> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        lock_account(&tx, &meta.account).await?;
        if let Some(name) = &meta.name
            && let Some(entry) = name_row(&tx, name, true).await?
            && entry.account != meta.account
        {
            return Ok(PutFunction::NameTaken);
        }
        let existing = tx
            .query_opt(
                "SELECT meta FROM cp_functions WHERE account = $1 AND id = $2",
                &[&meta.account, &meta.id],
            )
            .await?;
        let stored = match existing {
            Some(row) => {
                let mut existing = decode_meta(row.get(0))?;
                if meta.name.is_some() {
                    existing.name = meta.name.clone();
                }
                tx.execute(
                    "UPDATE cp_functions SET meta = $3 WHERE account = $1 AND id = $2",
                    &[&meta.account, &meta.id, &encode(&existing)?],
                )
                .await?;
                existing
            }
            None => {
                if let Some(limit) = max_bytes {
                    let used: i64 = tx
                        .query_one(
                            "SELECT coalesce(sum(size), 0)::int8 FROM cp_functions WHERE account = $1",
                            &[&meta.account],
                        )
                        .await?
                        .get(0);
                    let used = used as u64;
                    if used.saturating_add(meta.size) > limit {
                        return Ok(PutFunction::OverQuota { used, limit });
                    }
                }
                tx.execute(
                    "INSERT INTO cp_binaries (id, bytes) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                    &[&meta.id, &binary.as_ref()],
                )
                .await?;
                tx.execute(
                    "INSERT INTO cp_functions (account, id, size, meta) VALUES ($1, $2, $3, $4)",
                    &[&meta.account, &meta.id, &(meta.size as i64), &encode(&meta)?],
                )
                .await?;
                meta.clone()
            }
        };
        let mut result = stored.clone();
        if let Some(name) = &meta.name {
            // A name another account took meanwhile is not overwritten.
            let n = tx
                .execute(
                    "INSERT INTO cp_names (name, account, id) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET id = EXCLUDED.id
                     WHERE cp_names.account = EXCLUDED.account",
                    &[name, &meta.account, &meta.id],
                )
                .await?;
            if n == 0 {
                return Ok(PutFunction::NameTaken);
            }
            if let Some(entry) = name_row(&tx, name, false).await?
                && let Some(named) = named(&tx, name, &entry).await?
            {
                result = named;
            }
        }
        tx.batch_execute("NOTIFY cp_functions").await?;
        tx.commit().await?;
        Ok(PutFunction::Stored(result))
    }

    async fn get_function(&self, scope: &Scope, name_or_id: &str) -> Result<Option<FunctionMeta>> {
        let client = self.client().await?;
        if let Some(entry) = name_row(&client, name_or_id, false).await? {
            if !scope.sees(&entry.account) {
                return Ok(None);
            }
            return named(&client, name_or_id, &entry).await;
        }
        let row = match scope {
            Scope::Account(a) => {
                client
                    .query_opt(
                        "SELECT meta FROM cp_functions WHERE account = $1 AND id = $2",
                        &[a, &name_or_id],
                    )
                    .await?
            }
            Scope::All => {
                client
                    .query_opt(
                        "SELECT meta FROM cp_functions WHERE id = $1 ORDER BY account LIMIT 1",
                        &[&name_or_id],
                    )
                    .await?
            }
        };
        row.map(|r| decode_meta(r.get(0))).transpose()
    }

    async fn put_settings(
        &self,
        scope: &Scope,
        name: &str,
        settings: FunctionSettings,
    ) -> Result<Option<FunctionMeta>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(mut entry) = name_row(&tx, name, true).await?.filter(|e| scope.sees(&e.account))
        else {
            return Ok(None);
        };
        let bytes = encode(&settings)?;
        tx.execute("UPDATE cp_names SET settings = $2 WHERE name = $1", &[&name, &bytes]).await?;
        entry.settings = Some(bytes);
        let meta = named(&tx, name, &entry).await?;
        tx.batch_execute("NOTIFY cp_functions").await?;
        tx.commit().await?;
        Ok(meta)
    }

    async fn function_binary(&self, id: &str) -> Result<Option<Bytes>> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT bytes FROM cp_binaries WHERE id = $1", &[&id]).await?;
        Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
    }

    async fn list_functions(&self, scope: &Scope) -> Result<Vec<FunctionMeta>> {
        let client = self.client().await?;
        let rows = match scope {
            Scope::All => {
                client
                    .query(
                        "SELECT n.name, f.meta, n.settings FROM cp_names n
                         JOIN cp_functions f ON f.account = n.account AND f.id = n.id
                         ORDER BY n.name",
                        &[],
                    )
                    .await?
            }
            Scope::Account(a) => {
                client
                    .query(
                        "SELECT n.name, f.meta, n.settings FROM cp_names n
                         JOIN cp_functions f ON f.account = n.account AND f.id = n.id
                         WHERE n.account = $1 ORDER BY n.name",
                        &[a],
                    )
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                let mut meta = decode_meta(r.get(1))?;
                if let Some(s) = r.get::<_, Option<&[u8]>>(2) {
                    meta.settings = serde_json::from_slice(s).context("stored settings")?;
                }
                meta.name = Some(r.get(0));
                Ok(meta)
            })
            .collect()
    }

    async fn delete_function(&self, scope: &Scope, name_or_id: &str) -> Result<Vec<FunctionMeta>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut doomed: Vec<FunctionMeta> = Vec::new();
        let entry = name_row(&tx, name_or_id, true).await?.filter(|e| scope.sees(&e.account));
        if let Some(entry) = entry {
            // A name: it goes, and so does every version of its account last uploaded
            // under it (the one it points at included) that no other name points at.
            lock_account(&tx, &entry.account).await?;
            tx.execute("DELETE FROM cp_names WHERE name = $1", &[&name_or_id]).await?;
            let kept: HashSet<String> = tx
                .query("SELECT id FROM cp_names WHERE account = $1", &[&entry.account])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let rows = tx
                .query("SELECT meta FROM cp_functions WHERE account = $1", &[&entry.account])
                .await?;
            for row in rows {
                let meta = decode_meta(row.get(0))?;
                let uploaded_under = meta.name.as_deref() == Some(name_or_id);
                if (uploaded_under || meta.id == entry.id) && !kept.contains(&meta.id) {
                    doomed.push(meta);
                }
            }
        } else {
            // An id: that version of each visible owner, and every name pointing at it.
            let rows = tx
                .query(
                    "SELECT meta FROM cp_functions WHERE id = $1 ORDER BY account",
                    &[&name_or_id],
                )
                .await?;
            for row in rows {
                let meta = decode_meta(row.get(0))?;
                if !scope.sees(&meta.account) {
                    continue;
                }
                tx.execute(
                    "DELETE FROM cp_names WHERE id = $1 AND account = $2",
                    &[&name_or_id, &meta.account],
                )
                .await?;
                doomed.push(meta);
            }
        }
        for meta in &doomed {
            tx.execute(
                "DELETE FROM cp_functions WHERE account = $1 AND id = $2",
                &[&meta.account, &meta.id],
            )
            .await?;
            tx.execute(
                "DELETE FROM cp_binaries b WHERE b.id = $1
                 AND NOT EXISTS (SELECT 1 FROM cp_functions f WHERE f.id = $1)",
                &[&meta.id],
            )
            .await?;
        }
        tx.batch_execute("NOTIFY cp_functions").await?;
        tx.commit().await?;
        Ok(doomed)
    }

    async fn function_bytes(&self, account: &str) -> Result<u64> {
        let client = self.client().await?;
        let used: i64 = client
            .query_one(
                "SELECT coalesce(sum(size), 0)::int8 FROM cp_functions WHERE account = $1",
                &[&account],
            )
            .await?
            .get(0);
        Ok(used as u64)
    }

    async fn put_batch(&self, batch: BatchState) -> Result<()> {
        let client = self.client().await?;
        let running = batch.status == cloudpipe_types::BatchStatus::Running;
        client
            .execute(
                "INSERT INTO cp_batches (id, account, running, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET running = EXCLUDED.running, record = EXCLUDED.record",
                &[&batch.id, &batch.account, &running, &encode(&batch)?],
            )
            .await?;
        Ok(())
    }

    async fn get_batch(&self, id: &str) -> Result<Option<BatchState>> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT record FROM cp_batches WHERE id = $1", &[&id]).await?;
        row.map(|r| serde_json::from_slice(r.get(0)).context("stored batch")).transpose()
    }

    async fn list_batches(&self, account: Option<&str>) -> Result<Vec<BatchState>> {
        let client = self.client().await?;
        let rows = match account {
            Some(a) => {
                client
                    .query("SELECT record FROM cp_batches WHERE account = $1 ORDER BY id", &[&a])
                    .await?
            }
            None => client.query("SELECT record FROM cp_batches ORDER BY id", &[]).await?,
        };
        rows.iter().map(|r| serde_json::from_slice(r.get(0)).context("stored batch")).collect()
    }

    async fn insert_account(&self, account: AccountRecord) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute(
                "INSERT INTO cp_accounts (name, record) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&account.name, &encode(&account)?],
            )
            .await?;
        Ok(n == 1)
    }

    async fn update_account(&self, account: AccountRecord) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = tx
            .execute(
                "UPDATE cp_accounts SET record = $2 WHERE name = $1",
                &[&account.name, &encode(&account)?],
            )
            .await?;
        tx.batch_execute("NOTIFY cp_auth").await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn get_account(&self, name: &str) -> Result<Option<AccountRecord>> {
        let client = self.client().await?;
        let row =
            client.query_opt("SELECT record FROM cp_accounts WHERE name = $1", &[&name]).await?;
        row.map(|r| serde_json::from_slice(r.get(0)).context("stored account")).transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>> {
        let client = self.client().await?;
        let rows = client.query("SELECT record FROM cp_accounts ORDER BY name", &[]).await?;
        rows.iter().map(|r| serde_json::from_slice(r.get(0)).context("stored account")).collect()
    }

    async fn insert_key(&self, key: KeyRecord) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute(
                "INSERT INTO cp_keys (hash, id, account, record)
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM cp_accounts WHERE name = $3)
                 ON CONFLICT (hash) DO UPDATE SET id = EXCLUDED.id, account = EXCLUDED.account,
                   record = EXCLUDED.record",
                &[&key.hash, &key.id, &key.account, &encode(&key)?],
            )
            .await?;
        Ok(n == 1)
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT record FROM cp_keys WHERE hash = $1", &[&hash]).await?;
        row.map(|r| serde_json::from_slice(r.get(0)).context("stored key")).transpose()
    }

    async fn list_keys(&self, account: Option<&str>) -> Result<Vec<KeyRecord>> {
        let client = self.client().await?;
        let rows = match account {
            Some(a) => {
                client
                    .query("SELECT record FROM cp_keys WHERE account = $1 ORDER BY id", &[&a])
                    .await?
            }
            None => client.query("SELECT record FROM cp_keys ORDER BY id", &[]).await?,
        };
        rows.iter().map(|r| serde_json::from_slice(r.get(0)).context("stored key")).collect()
    }

    async fn delete_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row =
            tx.query_opt("DELETE FROM cp_keys WHERE id = $1 RETURNING record", &[&id]).await?;
        tx.batch_execute("NOTIFY cp_auth").await?;
        tx.commit().await?;
        row.map(|r| serde_json::from_slice(r.get(0)).context("stored key")).transpose()
    }

    async fn put_secret(
        &self,
        mut record: SecretRecord,
        max_per_account: Option<u64>,
    ) -> Result<PutSecret> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('cp_secrets'), hashtext($1))",
            &[&record.account],
        )
        .await?;
        let existing = tx
            .query_opt(
                "SELECT record FROM cp_secrets WHERE account = $1 AND name = $2",
                &[&record.account, &record.name],
            )
            .await?;
        match existing {
            Some(row) => {
                let old: SecretRecord =
                    serde_json::from_slice(row.get(0)).context("stored secret")?;
                record.created_at = old.created_at;
            }
            None => {
                if let Some(limit) = max_per_account {
                    let n: i64 = tx
                        .query_one(
                            "SELECT count(*) FROM cp_secrets WHERE account = $1",
                            &[&record.account],
                        )
                        .await?
                        .get(0);
                    if n as u64 >= limit {
                        return Ok(PutSecret::OverQuota { limit });
                    }
                }
            }
        }
        tx.execute(
            "INSERT INTO cp_secrets (account, name, record) VALUES ($1, $2, $3)
             ON CONFLICT (account, name) DO UPDATE SET record = EXCLUDED.record",
            &[&record.account, &record.name, &encode(&record)?],
        )
        .await?;
        tx.commit().await?;
        Ok(PutSecret::Stored(record))
    }

    async fn get_secret(&self, account: &str, name: &str) -> Result<Option<SecretRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT record FROM cp_secrets WHERE account = $1 AND name = $2",
                &[&account, &name],
            )
            .await?;
        row.map(|r| serde_json::from_slice(r.get(0)).context("stored secret")).transpose()
    }

    async fn list_secrets(&self, account: &str) -> Result<Vec<SecretRecord>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record FROM cp_secrets WHERE account = $1 ORDER BY name", &[&account])
            .await?;
        rows.iter().map(|r| serde_json::from_slice(r.get(0)).context("stored secret")).collect()
    }

    async fn delete_secret(&self, account: &str, name: &str) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM cp_secrets WHERE account = $1 AND name = $2", &[&account, &name])
            .await?;
        Ok(n == 1)
    }

    async fn insert_job(&self, job: Job) -> Result<Inserted> {
        let (reply, rx) = oneshot::channel();
        self.inserter
            .send(Insert { job, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the store is closed"))?;
        rx.await.map_err(|_| anyhow::anyhow!("the store's writer stopped"))?
    }

    async fn claim_jobs(&self, limit: usize, now: Micros) -> Result<Vec<Job>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let executors = self.shared.executors.read().unwrap().clone();
        if executors.as_ref().is_some_and(|e| e.is_empty()) {
            return Ok(Vec::new());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let limit = limit as i64;
        // Accounts take turns (in name order, going on after the account the last
        // claim served), each first in, first out: one account's flood of jobs does
        // not starve the others. The turn row also makes claims take turns.
        let turn: String = tx
            .query_opt("SELECT account FROM cp_claim_turn WHERE id = 1 FOR UPDATE", &[])
            .await?
            .map(|r| r.get(0))
            .unwrap_or_default();
        let any: Vec<String> = Vec::new();
        let picked = tx
            .query(
                "SELECT id FROM (
                   SELECT id, account, created_at,
                     row_number() OVER (PARTITION BY account ORDER BY created_at, id) AS rn
                   FROM cp_jobs
                   WHERE status = 'queued' AND ($1 OR executor = ANY($2))
                 ) q WHERE rn <= $3
                 ORDER BY rn, account <= $4, account
                 LIMIT $3",
                &[&executors.is_none(), executors.as_ref().unwrap_or(&any), &limit, &turn],
            )
            .await?;
        let order: Vec<uuid::Uuid> = picked.iter().map(|r| r.get(0)).collect();
        let locked = tx
            .query(
                "SELECT id, record FROM cp_jobs WHERE id = ANY($1) AND status = 'queued'
                 FOR UPDATE SKIP LOCKED",
                &[&order],
            )
            .await?;
        let mut by_id: HashMap<uuid::Uuid, tokio_postgres::Row> =
            locked.into_iter().map(|r| (r.get(0), r)).collect();
        let rows: Vec<tokio_postgres::Row> =
            order.iter().filter_map(|id| by_id.remove(id)).collect();
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            let mut job = decode_job(row.get(1))?;
            job.status = JobStatus::Running;
            job.attempts += 1;
            job.started_at = Some(now);
            job.node = Some(self.shared.node.name.clone());
            jobs.push(job);
        }
        if !jobs.is_empty() {
            update_jobs(&tx, &jobs).await?;
            let ids: Vec<uuid::Uuid> = jobs.iter().map(|j| j.id.0).collect();
            tx.execute(
                "UPDATE cp_jobs SET lease_expires = cp_now() + $2 WHERE id = ANY($1)",
                &[&ids, &self.shared.lease_micros()],
            )
            .await?;
            let last = &jobs[jobs.len() - 1].account;
            tx.execute(
                "INSERT INTO cp_claim_turn (id, account) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET account = EXCLUDED.account",
                &[last],
            )
            .await?;
        }
        tx.commit().await?;
        let mut claims = self.shared.claims.lock().unwrap();
        for job in &jobs {
            claims.insert(job.id, job.attempts);
        }
        Ok(jobs)
    }

    async fn finish_job(&self, id: JobId, outcome: JobOutcome, now: Micros) -> Result<Option<Job>> {
        if !outcome.status.is_terminal() {
            bail!("finish_job with a non-terminal status {}", outcome.status.as_str());
        }
        let (reply, rx) = oneshot::channel();
        self.finisher
            .send(Finish { id, outcome, now, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the store is closed"))?;
        rx.await.map_err(|_| anyhow::anyhow!("the store's writer stopped"))?
    }

    async fn cancel_queued_job(&self, id: JobId, now: Micros) -> Result<Option<Job>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) =
            tx.query_opt("SELECT record FROM cp_jobs WHERE id = $1 FOR UPDATE", &[&id.0]).await?
        else {
            return Ok(None);
        };
        let mut job = decode_job(row.get(0))?;
        if job.status != JobStatus::Queued {
            return Ok(Some(job));
        }
        job.finish(
            JobOutcome::error(JobStatus::Cancelled, "cancelled", "cancelled before it started"),
            now,
        );
        update_jobs(&tx, std::slice::from_ref(&job)).await?;
        for sql in notify_ids("cp_finished", &[id]) {
            tx.batch_execute(&sql).await?;
        }
        tx.commit().await?;
        Ok(Some(job))
    }

    async fn release_job(&self, id: JobId) -> Result<Option<Job>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) =
            tx.query_opt("SELECT record FROM cp_jobs WHERE id = $1 FOR UPDATE", &[&id.0]).await?
        else {
            return Ok(None);
        };
        let mut job = decode_job(row.get(0))?;
        if !self.shared.holds(&job) {
            return Ok(Some(job));
        }
        job.status = JobStatus::Queued;
        job.started_at = None;
        job.attempts = job.attempts.saturating_sub(1);
        update_jobs(&tx, std::slice::from_ref(&job)).await?;
        tx.batch_execute("NOTIFY cp_queued").await?;
        tx.commit().await?;
        self.shared.claims.lock().unwrap().remove(&id);
        Ok(Some(job))
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT record FROM cp_jobs WHERE id = $1", &[&id.0]).await?;
        row.map(|r| decode_job(r.get(0))).transpose()
    }

    async fn job_by_idempotency_key(&self, account: &str, key: &str) -> Result<Option<Job>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT record FROM cp_jobs WHERE account = $1 AND idempotency_key = $2",
                &[&account, &column_text(key)],
            )
            .await?;
        row.map(|r| decode_job(r.get(0))).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let client = self.client().await?;
        let (cond, mut params) = filter_sql(filter, 1);
        let limit = filter.limit.min(i64::MAX as usize) as i64;
        params.push(Box::new(limit));
        let sql = format!(
            "SELECT record FROM cp_jobs WHERE {cond} ORDER BY id DESC LIMIT ${}",
            params.len()
        );
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let rows = client.query(&sql, &refs).await?;
        rows.iter().map(|r| decode_job(r.get(0))).collect()
    }

    async fn active_jobs(&self) -> Result<Vec<(JobId, String)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, account FROM cp_jobs WHERE status IN ('queued', 'running') ORDER BY id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (JobId(r.get(0)), r.get(1))).collect())
    }

    async fn count_jobs(&self) -> Result<BTreeMap<JobStatus, u64>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT status, sum(n)::int8 FROM cp_job_counts GROUP BY status", &[])
            .await?;
        let mut counts: BTreeMap<JobStatus, u64> = JobStatus::ALL.iter().map(|s| (*s, 0)).collect();
        for row in rows {
            let status: &str = row.get(0);
            if let Some(s) = JobStatus::ALL.iter().find(|s| s.as_str() == status) {
                counts.insert(*s, row.get::<_, i64>(1).max(0) as u64);
            }
        }
        Ok(counts)
    }

    /// Rescues the jobs this node ran in a previous life (same name) and every job
    /// whose lease ran out. Jobs other live nodes run are theirs.
    async fn recover(&self, now: Micros) -> Result<Recovery> {
        let mut total = Recovery::default();
        loop {
            let r = self
                .shared
                .rescue("node = $1 OR lease_expires IS NULL OR lease_expires < cp_now()", now, 512)
                .await?;
            total.requeued += r.requeued;
            total.exhausted += r.exhausted;
            if r.requeued + r.exhausted < 512 {
                return Ok(total);
            }
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
        let finished: u64 =
            self.count_jobs().await?.iter().filter(|(s, _)| s.is_terminal()).map(|(_, n)| *n).sum();
        let excess = finished.saturating_sub(policy.max_finished);
        let cutoff = now.saturating_sub(policy.max_age_micros) as i64;
        let client = self.client().await?;
        let max = max_batch as i64;
        let too_old: i64 = client
            .query_one(
                "SELECT count(*) FROM (SELECT 1 FROM cp_jobs WHERE finished_at IS NOT NULL
                   AND finished_at < $1 LIMIT $2) old",
                &[&cutoff, &max],
            )
            .await?
            .get(0);
        let n = (too_old as u64).max(excess).min(max_batch as u64) as i64;
        if n == 0 {
            return Ok(0);
        }
        let deleted = client
            .execute(
                "DELETE FROM cp_jobs WHERE id IN (
                   SELECT id FROM cp_jobs WHERE finished_at IS NOT NULL
                   ORDER BY finished_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)",
                &[&n],
            )
            .await?;
        Ok(deleted as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::store::conformance::succeeded;
    use std::path::Path;

    /// A store on the test cluster, in a schema of its own named after `dir`, so that
    /// opening the same directory again reopens the same store.
    fn open(dir: &Path) -> Result<PgStore> {
        use sha2::Digest;
        let db = testdb::shared();
        let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
        let schema = format!("t_{}", &hex::encode(digest)[..16]);
        let mut node = NodeConfig::new(format!("test-{schema}"));
        node.lease = std::time::Duration::from_secs(30);
        PgStore::open_blocking(PgConfig { url: db.url(), schema: Some(schema), node })
    }

    crate::store::conformance::suite!(postgres, |dir: &Path| open(dir), None);

    /// Two nodes on one schema.
    async fn two_nodes(schema: &str) -> (PgStore, PgStore) {
        let db = testdb::shared();
        let node = |name: &str| {
            let mut n = NodeConfig::new(name);
            n.lease = std::time::Duration::from_secs(30);
            PgConfig { url: db.url(), schema: Some(schema.to_string()), node: n }
        };
        let a = PgStore::open(node("a")).await.unwrap();
        let b = PgStore::open(node("b")).await.unwrap();
        (a, b)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_racing_never_claim_one_job_twice() {
        let (a, b) = two_nodes("race").await;
        for _ in 0..400 {
            a.insert_job(crate::job::tests::queued_job("f")).await.unwrap();
        }
        let (a, b) = (Arc::new(a), Arc::new(b));
        let drain = |s: Arc<PgStore>| {
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let jobs = s.claim_jobs(7, 1).await.unwrap();
                    if jobs.is_empty() {
                        return ids;
                    }
                    ids.extend(jobs.into_iter().map(|j| (j.id, j.node.unwrap())));
                }
            })
        };
        let tasks = [drain(a.clone()), drain(b.clone()), drain(a.clone()), drain(b.clone())];
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let mut ids: Vec<_> = all.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 400, "every job once");
        assert_eq!(all.len(), 400, "no job twice");
        for (id, node) in all {
            assert_eq!(a.get_job(id).await.unwrap().unwrap().node.as_deref(), Some(node.as_str()));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_node_that_lost_its_lease_never_writes_over_the_new_attempt() {
        let (a, b) = two_nodes("fence").await;
        let job = a.insert_job(crate::job::tests::queued_job("f")).await.unwrap().job().clone();
        let mut events = a.subscribe();
        assert_eq!(a.claim_jobs(1, 1).await.unwrap().len(), 1);
        // A falls silent: its lease runs out, B rescues and runs the job.
        let client = a.client().await.unwrap();
        client.execute("UPDATE cp_jobs SET lease_expires = 0", &[]).await.unwrap();
        assert_eq!(b.recover(2).await.unwrap(), Recovery { requeued: 1, exhausted: 0 });
        let taken = b.claim_jobs(1, 3).await.unwrap();
        assert_eq!((taken[0].attempts, taken[0].node.as_deref()), (2, Some("b")));
        // A's late result changes nothing; B's lands.
        let late = a.finish_job(job.id, succeeded(b"a"), 4).await.unwrap().unwrap();
        assert_eq!((late.status, late.node.as_deref()), (JobStatus::Running, Some("b")));
        let done = b.finish_job(job.id, succeeded(b"b"), 5).await.unwrap().unwrap();
        assert_eq!((done.status, done.stdout.as_slice()), (JobStatus::Succeeded, &b"b"[..]));
        // A's heartbeat tells it that the job is no longer its own.
        let lost = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if let Ok(ClusterEvent::LeaseLost(id)) = events.recv().await {
                    return id;
                }
            }
        });
        assert_eq!(lost.await.unwrap(), job.id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancel_through_one_node_reaches_the_node_running_the_job() {
        let (a, b) = two_nodes("cancel").await;
        let job = a.insert_job(crate::job::tests::queued_job("f")).await.unwrap().job().clone();
        a.claim_jobs(1, 1).await.unwrap();
        let mut events = a.subscribe();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await; // listeners up
        b.request_cancel(job.id).await.unwrap();
        let heard = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if let Ok(ClusterEvent::Cancel(id)) = events.recv().await {
                    return id;
                }
            }
        });
        assert_eq!(heard.await.unwrap(), job.id);
        assert!(b.is_leader() != a.is_leader() || !a.is_leader(), "at most one leader");
    }
}
