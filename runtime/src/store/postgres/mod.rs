//! [`PgStore`]: the [`Store`] on PostgreSQL, shared by the nodes of a cluster.
//!
//! Built on `tokio-postgres` with a `deadpool-postgres` pool rather than `sqlx`: the
//! queries here are few and hand-written, the listener needs the raw connection's
//! notification stream, and the two crates add no macros, no compile-time database
//! and far less to the build than sqlx.
//!
//! The job record is the same JSON as in the embedded stores (`record`: the job's
//! summary); the columns beside it are what queries select and order by, and stdin
//! and output are rows of `cp_job_data`, read only by what returns them. Every method is one transaction.
//! Claims take jobs with `FOR UPDATE SKIP LOCKED` (two nodes never take the same
//! job) and stamp them with this node's name and a lease ([`cluster`]); finishing a
//! job is fenced by that claim, so a node that lost a job to another never writes
//! over the other's result. Finishes are grouped: outcomes that arrive together are
//! written in one transaction (one WAL flush), as the embedded writer does.
//!
//! No index reads a column that changes while a job is queued or running (schema 5):
//! claims, lease renewals, cancels and requeues are HOT updates, which write no index
//! entry. Unfinished jobs are found through one index and their `status` column;
//! finished ones through `outcome` and `ran_on`, computed when a job finishes.

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
use tokio_postgres::{NoTls, Row};

use recent::Recent;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::{
    BatchCaps, BatchFilter, CreateBatch, FunctionMeta, Inserted, JobFilter, PutFunction, PutSecret,
    Recovery, Result, Retention, Store,
};
use crate::cluster::{ClusterEvent, NodeConfig};
use crate::model::{
    AccountRecord, BatchState, Job, JobId, JobOutcome, KeyRecord, Micros, Scope, SecretRecord,
    now_micros,
};

mod batches;
mod cluster;
mod recent;
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
    /// Functions by name and accounts, as the submit path reads them.
    recent_functions: Recent<FunctionMeta>,
    recent_accounts: Recent<AccountRecord>,
    /// The account whose job this node's last claim took: the next claim starts after it.
    turn: Mutex<String>,
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

/// Queries through the connection's cache of prepared statements: a query is parsed
/// and planned once per connection, and then runs in one round trip instead of two.
#[async_trait]
pub(crate) trait Cached: deadpool_postgres::GenericClient {
    async fn q(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Vec<Row>> {
        self.query(&self.prepare_cached(sql).await?, params).await
    }

    async fn q_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Option<Row>> {
        self.query_opt(&self.prepare_cached(sql).await?, params).await
    }

    async fn q_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Row> {
        self.query_one(&self.prepare_cached(sql).await?, params).await
    }

    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> PgResult<u64> {
        self.execute(&self.prepare_cached(sql).await?, params).await
    }
}

impl<C: deadpool_postgres::GenericClient + ?Sized> Cached for C {}

type PgResult<T> = std::result::Result<T, tokio_postgres::Error>;

fn status_str(s: JobStatus) -> &'static str {
    s.as_str()
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

fn decode_job(bytes: &[u8]) -> Result<Job> {
    serde_json::from_slice(bytes).context("decoding a stored job")
}

/// The `record` column of a job: its summary (stdin and output go to `cp_job_data`).
fn encode_record(job: &Job) -> Result<Vec<u8>> {
    encode(&job.summary())
}

/// Writes the output of `jobs` and, when `with_stdin`, their stdin to `cp_job_data`
/// (jobs with nothing to write are skipped; stdin never changes after the insert).
async fn put_data(
    c: &impl deadpool_postgres::GenericClient,
    jobs: &[&Job],
    with_stdin: bool,
) -> Result<()> {
    let empty: &[u8] = &[];
    let (mut ids, mut stdins, mut stdouts, mut stderrs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for job in jobs {
        let stdin = if with_stdin { &job.stdin[..] } else { empty };
        if stdin.is_empty() && job.stdout.is_empty() && job.stderr.is_empty() {
            continue;
        }
        ids.push(job.id.0);
        stdins.push(stdin);
        stdouts.push(&job.stdout[..]);
        stderrs.push(&job.stderr[..]);
    }
    if ids.is_empty() {
        return Ok(());
    }
    c.execute(
        "INSERT INTO cp_job_data (id, stdin, stdout, stderr)
         SELECT * FROM unnest($1::uuid[], $2::bytea[], $3::bytea[], $4::bytea[])
         ON CONFLICT (id) DO UPDATE SET stdout = EXCLUDED.stdout, stderr = EXCLUDED.stderr",
        &[&ids, &stdins, &stdouts, &stderrs],
    )
    .await?;
    Ok(())
}

/// Reads the output of `jobs` (and, when `with_stdin`, their stdin) from `cp_job_data`.
async fn fill_data(
    c: &impl deadpool_postgres::GenericClient,
    jobs: &mut [Job],
    with_stdin: bool,
    with_output: bool,
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|j| j.id.0).collect();
    let rows = c
        .query(
            "SELECT id, CASE WHEN $2 THEN stdin ELSE ''::bytea END,
               CASE WHEN $3 THEN stdout ELSE ''::bytea END,
               CASE WHEN $3 THEN stderr ELSE ''::bytea END
             FROM cp_job_data WHERE id = ANY($1)",
            &[&ids, &with_stdin, &with_output],
        )
        .await?;
    let mut by_id: HashMap<uuid::Uuid, tokio_postgres::Row> =
        rows.into_iter().map(|r| (r.get(0), r)).collect();
    for job in jobs {
        // No row: nothing to read (or a record written inline before schema 2).
        let Some(row) = by_id.remove(&job.id.0) else { continue };
        if with_stdin {
            job.stdin = row.get(1);
        }
        if with_output {
            job.stdout = row.get(2);
            job.stderr = row.get(3);
        }
    }
    Ok(())
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
            turn: Mutex::default(),
            recent_functions: Recent::default(),
            recent_accounts: Recent::default(),
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

    /// [`Store::get_function`], from the database.
    async fn read_function(&self, scope: &Scope, name_or_id: &str) -> Result<Option<FunctionMeta>> {
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
                    .q_opt(
                        "SELECT meta FROM cp_functions WHERE account = $1 AND id = $2",
                        &[a, &name_or_id],
                    )
                    .await?
            }
            Scope::All => {
                client
                    .q_opt(
                        "SELECT meta FROM cp_functions WHERE id = $1 ORDER BY account LIMIT 1",
                        &[&name_or_id],
                    )
                    .await?
            }
        };
        row.map(|r| decode_meta(r.get(0))).transpose()
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
            records.push(encode_record(job)?);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .q(
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
        let written: Vec<&Job> = jobs.iter().filter(|j| inserted.contains(&j.id.0)).collect();
        put_data(&tx, &written, true).await?;
        if !woken.is_empty() {
            tx.exec("SELECT pg_notify('cp_queued', e) FROM unnest($1::text[]) e", &[&woken])
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
                    .q_opt(
                        "SELECT record FROM cp_jobs WHERE account = $1 AND idempotency_key = $2",
                        &[&job.account, &column_text(key)],
                    )
                    .await?,
                None => None,
            };
            let existing = match existing {
                Some(row) => Some(row),
                None => {
                    client.q_opt("SELECT record FROM cp_jobs WHERE id = $1", &[&job.id.0]).await?
                }
            };
            match existing {
                Some(row) => {
                    let mut existing = decode_job(row.get(0))?;
                    fill_data(&client, std::slice::from_mut(&mut existing), false, true).await?;
                    out.push(Inserted::Existing(existing));
                }
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
            tx.q("SELECT record FROM cp_jobs WHERE id = ANY($1) FOR UPDATE", &[&ids]).await?;
        let mut current: HashMap<JobId, Job> = HashMap::new();
        for row in rows {
            let mut job = decode_job(row.get(0))?;
            // A job this call leaves as it is comes back with its output.
            if !self.holds(&job) {
                fill_data(&tx, std::slice::from_mut(&mut job), false, true).await?;
            }
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
            update_jobs(&tx, &updates, self.lease_micros()).await?;
            put_data(&tx, &updates.iter().collect::<Vec<_>>(), false).await?;
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
/// A job that turns `running` gets a lease of `lease` microseconds; one already
/// running keeps its own.
async fn update_jobs(
    tx: &impl deadpool_postgres::GenericClient,
    jobs: &[Job],
    lease: i64,
) -> Result<()> {
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
        records.push(encode_record(job)?);
    }
    tx.exec(
        "UPDATE cp_jobs SET status = u.status, attempts = u.attempts, finished_at = u.finished_at,
                node = u.node, record = u.record,
                lease_expires = CASE WHEN u.status = 'running'
                  THEN coalesce(lease_expires, cp_now() + $7) END,
                cancel_requested = cancel_requested AND u.status = 'running'
         FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::int8[], $5::text[], $6::bytea[])
           AS u(id, status, attempts, finished_at, node, record)
         WHERE cp_jobs.id = u.id",
        &[&ids, &statuses, &attempts, &finished, &nodes, &records, &lease],
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
            "SELECT record FROM cp_jobs
             WHERE finished_at IS NULL AND status = 'running' AND ({condition})
             ORDER BY created_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
        );
        let rows = match condition.contains("$1") {
            true => tx.q(&sql, &[&self.node.name, &limit]).await?,
            false => {
                let sql = sql.replace("$2", "$1");
                tx.q(&sql, &[&limit]).await?
            }
        };
        let jobs = rows.iter().map(|r| decode_job(r.get(0))).collect::<Result<Vec<_>>>()?;
        let mut recovery = Recovery::default();
        let jobs = rescued(jobs, now, &mut recovery);
        if !jobs.is_empty() {
            update_jobs(&tx, &jobs, self.lease_micros()).await?;
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
/// Query parameters built at run time.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// The conditions of `filter` but its node, with their parameters numbered from 1,
/// and the number of the node's parameter.
fn filter_sql(filter: &JobFilter) -> (String, Option<usize>, Params) {
    let mut conds: Vec<String> = Vec::new();
    let mut params: Params = Vec::new();
    // The number of the parameter it adds.
    let next = |params: &mut Params, v: Box<dyn ToSql + Sync + Send>| {
        params.push(v);
        params.len()
    };
    if let Some(a) = &filter.account {
        let i = next(&mut params, Box::new(a.clone()));
        conds.push(format!("account = ${i}"));
    }
    if let Some(b) = &filter.batch {
        let i = next(&mut params, Box::new(b.clone()));
        conds.push(format!("batch = ${i}"));
    }
    // Finished jobs by the columns written when they finish (indexed); queued and
    // running ones among the unfinished (see schema 5).
    if let Some(s) = filter.status {
        let i = next(&mut params, Box::new(status_str(s).to_string()));
        conds.push(match s.is_terminal() {
            true => format!("outcome = ${i}"),
            false => format!("finished_at IS NULL AND status = ${i}"),
        });
    }
    if let Some(t) = &filter.tag {
        let i = next(&mut params, Box::new(vec![column_text(t)]));
        conds.push(format!("tags @> ${i} AND tags <> '{{}}'"));
    }
    if let Some(f) = &filter.function {
        let i = next(&mut params, Box::new(f.clone()));
        conds.push(format!("(function = ${i} OR function_id = ${i})"));
    }
    let node = filter.node.as_ref().map(|node| next(&mut params, Box::new(node.clone())));
    if let Some(before) = filter.before {
        let i = next(&mut params, Box::new(before.0));
        conds.push(format!("id < ${i}"));
    }
    let sql = match conds.is_empty() {
        true => "true".to_string(),
        false => conds.join(" AND "),
    };
    (sql, node, params)
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
    Ok(c.q_opt(sql, &[&name]).await?.map(|r| NameRow {
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
        .q_opt(
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
    c.exec("SELECT pg_advisory_xact_lock(hashtext('cp_functions'), hashtext($1))", &[&account])
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
            .q_opt(
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
                tx.exec(
                    "UPDATE cp_functions SET meta = $3 WHERE account = $1 AND id = $2",
                    &[&meta.account, &meta.id, &encode(&existing)?],
                )
                .await?;
                existing
            }
            None => {
                if let Some(limit) = max_bytes {
                    let used: i64 = tx
                        .q_one(
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
                tx.exec(
                    "INSERT INTO cp_binaries (id, bytes) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                    &[&meta.id, &binary.as_ref()],
                )
                .await?;
                tx.exec(
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
                .exec(
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
        self.shared.recent_functions.clear();
        Ok(PutFunction::Stored(result))
    }

    async fn get_function(&self, scope: &Scope, name_or_id: &str) -> Result<Option<FunctionMeta>> {
        let key = match scope {
            Scope::All => format!("*\0{name_or_id}"),
            Scope::Account(a) => format!("{a}\0{name_or_id}"),
        };
        let generation = match self.shared.recent_functions.get(&key) {
            Ok(meta) => return Ok(Some(meta)),
            Err(generation) => generation,
        };
        let meta = self.read_function(scope, name_or_id).await?;
        if let Some(meta) = &meta {
            self.shared.recent_functions.keep(generation, key, meta.clone());
        }
        Ok(meta)
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
        tx.exec("UPDATE cp_names SET settings = $2 WHERE name = $1", &[&name, &bytes]).await?;
        entry.settings = Some(bytes);
        let meta = named(&tx, name, &entry).await?;
        tx.batch_execute("NOTIFY cp_functions").await?;
        tx.commit().await?;
        self.shared.recent_functions.clear();
        Ok(meta)
    }

    async fn function_binary(&self, id: &str) -> Result<Option<Bytes>> {
        let client = self.client().await?;
        let row = client.q_opt("SELECT bytes FROM cp_binaries WHERE id = $1", &[&id]).await?;
        Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
    }

    async fn list_functions(&self, scope: &Scope) -> Result<Vec<FunctionMeta>> {
        let client = self.client().await?;
        let rows = match scope {
            Scope::All => {
                client
                    .q(
                        "SELECT n.name, f.meta, n.settings FROM cp_names n
                         JOIN cp_functions f ON f.account = n.account AND f.id = n.id
                         ORDER BY n.name",
                        &[],
                    )
                    .await?
            }
            Scope::Account(a) => {
                client
                    .q(
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
            tx.exec("DELETE FROM cp_names WHERE name = $1", &[&name_or_id]).await?;
            let kept: HashSet<String> = tx
                .q("SELECT id FROM cp_names WHERE account = $1", &[&entry.account])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let rows =
                tx.q("SELECT meta FROM cp_functions WHERE account = $1", &[&entry.account]).await?;
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
                .q("SELECT meta FROM cp_functions WHERE id = $1 ORDER BY account", &[&name_or_id])
                .await?;
            for row in rows {
                let meta = decode_meta(row.get(0))?;
                if !scope.sees(&meta.account) {
                    continue;
                }
                tx.exec(
                    "DELETE FROM cp_names WHERE id = $1 AND account = $2",
                    &[&name_or_id, &meta.account],
                )
                .await?;
                doomed.push(meta);
            }
        }
        for meta in &doomed {
            tx.exec(
                "DELETE FROM cp_functions WHERE account = $1 AND id = $2",
                &[&meta.account, &meta.id],
            )
            .await?;
            tx.exec(
                "DELETE FROM cp_binaries b WHERE b.id = $1
                 AND NOT EXISTS (SELECT 1 FROM cp_functions f WHERE f.id = $1)",
                &[&meta.id],
            )
            .await?;
        }
        tx.batch_execute("NOTIFY cp_functions").await?;
        tx.commit().await?;
        self.shared.recent_functions.clear();
        Ok(doomed)
    }

    async fn function_bytes(&self, account: &str) -> Result<u64> {
        let client = self.client().await?;
        let used: i64 = client
            .q_one(
                "SELECT coalesce(sum(size), 0)::int8 FROM cp_functions WHERE account = $1",
                &[&account],
            )
            .await?
            .get(0);
        Ok(used as u64)
    }

    async fn create_batch(
        &self,
        batch: BatchState,
        inputs: Vec<Vec<String>>,
        caps: BatchCaps,
    ) -> Result<CreateBatch> {
        self.create_batch_row(batch, inputs, caps).await
    }

    async fn put_batch(&self, batch: BatchState) -> Result<bool> {
        self.put_batch_row(batch).await
    }

    async fn get_batch(&self, id: &str) -> Result<Option<BatchState>> {
        self.get_batch_row(id).await
    }

    async fn batch_inputs(&self, id: &str, start: u64, count: usize) -> Result<Vec<Vec<String>>> {
        self.batch_input_rows(id, start, count).await
    }

    async fn list_batches(&self, filter: &BatchFilter) -> Result<Vec<BatchState>> {
        self.list_batch_rows(filter).await
    }

    async fn open_batches(&self) -> Result<Vec<BatchState>> {
        self.open_batch_rows().await
    }

    async fn delete_batch(&self, id: &str) -> Result<Option<BatchState>> {
        self.delete_batch_row(id).await
    }

    async fn purge_batches(
        &self,
        max_age_micros: u64,
        now: Micros,
        max_batch: usize,
    ) -> Result<usize> {
        self.purge_batch_rows(max_age_micros, now, max_batch).await
    }

    async fn insert_account(&self, account: AccountRecord) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .exec(
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
            .exec(
                "UPDATE cp_accounts SET record = $2 WHERE name = $1",
                &[&account.name, &encode(&account)?],
            )
            .await?;
        tx.batch_execute("NOTIFY cp_auth").await?;
        tx.commit().await?;
        self.shared.recent_accounts.clear();
        Ok(n == 1)
    }

    async fn get_account(&self, name: &str) -> Result<Option<AccountRecord>> {
        let generation = match self.shared.recent_accounts.get(name) {
            Ok(account) => return Ok(Some(account)),
            Err(generation) => generation,
        };
        let client = self.client().await?;
        let row = client.q_opt("SELECT record FROM cp_accounts WHERE name = $1", &[&name]).await?;
        let account: Option<AccountRecord> =
            row.map(|r| serde_json::from_slice(r.get(0)).context("stored account")).transpose()?;
        if let Some(account) = &account {
            self.shared.recent_accounts.keep(generation, name.to_string(), account.clone());
        }
        Ok(account)
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>> {
        let client = self.client().await?;
        let rows = client.q("SELECT record FROM cp_accounts ORDER BY name", &[]).await?;
        rows.iter().map(|r| serde_json::from_slice(r.get(0)).context("stored account")).collect()
    }

    async fn insert_key(&self, key: KeyRecord) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .exec(
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
        let row = client.q_opt("SELECT record FROM cp_keys WHERE hash = $1", &[&hash]).await?;
        row.map(|r| serde_json::from_slice(r.get(0)).context("stored key")).transpose()
    }

    async fn list_keys(&self, account: Option<&str>) -> Result<Vec<KeyRecord>> {
        let client = self.client().await?;
        let rows = match account {
            Some(a) => {
                client.q("SELECT record FROM cp_keys WHERE account = $1 ORDER BY id", &[&a]).await?
            }
            None => client.q("SELECT record FROM cp_keys ORDER BY id", &[]).await?,
        };
        rows.iter().map(|r| serde_json::from_slice(r.get(0)).context("stored key")).collect()
    }

    async fn delete_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx.q_opt("DELETE FROM cp_keys WHERE id = $1 RETURNING record", &[&id]).await?;
        tx.batch_execute("NOTIFY cp_auth").await?;
        tx.commit().await?;
        self.shared.recent_accounts.clear();
        row.map(|r| serde_json::from_slice(r.get(0)).context("stored key")).transpose()
    }

    async fn put_secret(
        &self,
        mut record: SecretRecord,
        max_per_account: Option<u64>,
    ) -> Result<PutSecret> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.exec(
            "SELECT pg_advisory_xact_lock(hashtext('cp_secrets'), hashtext($1))",
            &[&record.account],
        )
        .await?;
        let existing = tx
            .q_opt(
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
                        .q_one(
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
        tx.exec(
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
            .q_opt(
                "SELECT record FROM cp_secrets WHERE account = $1 AND name = $2",
                &[&account, &name],
            )
            .await?;
        row.map(|r| serde_json::from_slice(r.get(0)).context("stored secret")).transpose()
    }

    async fn list_secrets(&self, account: &str) -> Result<Vec<SecretRecord>> {
        let client = self.client().await?;
        let rows = client
            .q("SELECT record FROM cp_secrets WHERE account = $1 ORDER BY name", &[&account])
            .await?;
        rows.iter().map(|r| serde_json::from_slice(r.get(0)).context("stored secret")).collect()
    }

    async fn delete_secret(&self, account: &str, name: &str) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .exec("DELETE FROM cp_secrets WHERE account = $1 AND name = $2", &[&account, &name])
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
        // Accounts take turns, each first in, first out: one account's flood of jobs
        // does not starve the others. The accounts with queued work, in name order
        // going on after the one this node's last claim served; at most `limit` of
        // them, each offered an equal share of the claim.
        let accounts: Vec<String> = client
            .q(
                "WITH RECURSIVE a(account) AS (
                   (SELECT account FROM cp_jobs WHERE finished_at IS NULL AND status = 'queued'
                    ORDER BY account LIMIT 1)
                   UNION ALL
                   SELECT (SELECT j.account FROM cp_jobs j
                           WHERE j.finished_at IS NULL AND j.status = 'queued'
                             AND j.account > a.account
                           ORDER BY j.account LIMIT 1)
                   FROM a WHERE a.account IS NOT NULL
                 )
                 SELECT account FROM a WHERE account IS NOT NULL",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if accounts.is_empty() {
            return Ok(Vec::new());
        }
        let turn = self.shared.turn.lock().unwrap().clone();
        let mut order: Vec<String> = accounts.iter().filter(|a| **a > turn).cloned().collect();
        order.extend(accounts.into_iter().filter(|a| *a <= turn));
        order.truncate(limit);
        let tx = client.transaction().await?;
        let any: Vec<String> = Vec::new();
        let executors = executors.as_ref();
        // (place in the turn, place in its account's queue, job)
        let mut taken: Vec<(usize, i64, Job)> = Vec::with_capacity(limit);
        let mut open: Vec<usize> = (0..order.len()).collect();
        let mut per = vec![0i64; order.len()];
        while taken.len() < limit && !open.is_empty() {
            let share = (limit - taken.len()).div_ceil(open.len()) as i64;
            let names: Vec<&str> = open.iter().map(|&i| order[i].as_str()).collect();
            let have: Vec<uuid::Uuid> = taken.iter().map(|(.., j)| j.id.0).collect();
            let rows = tx
                .q(
                    "SELECT a.turn, q.rn, q.record
                     FROM unnest($1::text[]) WITH ORDINALITY AS a(account, turn)
                     CROSS JOIN LATERAL (
                       SELECT record, row_number() OVER () AS rn FROM (
                         SELECT record FROM cp_jobs
                         WHERE finished_at IS NULL AND status = 'queued' AND account = a.account
                           AND ($2 OR executor = ANY($3)) AND id <> ALL($5)
                         ORDER BY created_at, id
                         LIMIT $4
                         FOR UPDATE SKIP LOCKED
                       ) l
                     ) q",
                    &[&names, &executors.is_none(), executors.unwrap_or(&any), &share, &have],
                )
                .await?;
            let mut got = vec![0i64; open.len()];
            for row in &rows {
                let k = row.get::<_, i64>(0) as usize - 1;
                got[k] += 1;
                let rn = per[open[k]] + row.get::<_, i64>(1);
                taken.push((open[k], rn, decode_job(row.get(2))?));
            }
            for (k, n) in got.iter().enumerate() {
                per[open[k]] += n;
            }
            // An account that gave less than its share has nothing more to give.
            open = open.iter().zip(&got).filter(|(_, n)| **n == share).map(|(&i, _)| i).collect();
        }
        // Round-robin: every account's first job, then every account's second...
        taken.sort_by_key(|(turn, rn, _)| (*rn, *turn));
        taken.truncate(limit);
        let mut jobs = Vec::with_capacity(taken.len());
        for (.., mut job) in taken {
            job.status = JobStatus::Running;
            job.attempts += 1;
            job.started_at = Some(now);
            job.node = Some(self.shared.node.name.clone());
            jobs.push(job);
        }
        if let Some(last) = jobs.last() {
            update_jobs(&tx, &jobs, self.shared.lease_micros()).await?;
            *self.shared.turn.lock().unwrap() = last.account.clone();
            // The one read of stdin: the jobs are about to run.
            fill_data(&tx, &mut jobs, true, false).await?;
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
            tx.q_opt("SELECT record FROM cp_jobs WHERE id = $1 FOR UPDATE", &[&id.0]).await?
        else {
            return Ok(None);
        };
        let mut job = decode_job(row.get(0))?;
        if job.status != JobStatus::Queued {
            fill_data(&tx, std::slice::from_mut(&mut job), false, true).await?;
            return Ok(Some(job));
        }
        job.finish(
            JobOutcome::error(JobStatus::Cancelled, "cancelled", "cancelled before it started"),
            now,
        );
        update_jobs(&tx, std::slice::from_ref(&job), self.shared.lease_micros()).await?;
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
            tx.q_opt("SELECT record FROM cp_jobs WHERE id = $1 FOR UPDATE", &[&id.0]).await?
        else {
            return Ok(None);
        };
        let mut job = decode_job(row.get(0))?;
        if !self.shared.holds(&job) {
            fill_data(&tx, std::slice::from_mut(&mut job), false, true).await?;
            return Ok(Some(job));
        }
        job.status = JobStatus::Queued;
        job.started_at = None;
        job.attempts = job.attempts.saturating_sub(1);
        update_jobs(&tx, std::slice::from_ref(&job), self.shared.lease_micros()).await?;
        tx.batch_execute("NOTIFY cp_queued").await?;
        tx.commit().await?;
        self.shared.claims.lock().unwrap().remove(&id);
        Ok(Some(job))
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let client = self.client().await?;
        let row = client.q_opt("SELECT record FROM cp_jobs WHERE id = $1", &[&id.0]).await?;
        let Some(row) = row else { return Ok(None) };
        let mut job = decode_job(row.get(0))?;
        fill_data(&client, std::slice::from_mut(&mut job), false, true).await?;
        Ok(Some(job))
    }

    async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>> {
        let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
        let client = self.client().await?;
        let rows = client.q("SELECT record FROM cp_jobs WHERE id = ANY($1)", &[&ids]).await?;
        let mut jobs = rows.iter().map(|r| decode_job(r.get(0))).collect::<Result<Vec<_>>>()?;
        fill_data(&client, &mut jobs, false, true).await?;
        Ok(jobs)
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
        let (cond, node, mut params) = filter_sql(filter);
        let limit = filter.limit.min(i64::MAX as usize) as i64;
        params.push(Box::new(limit));
        let l = params.len();
        let sql = match node {
            None => format!("SELECT record FROM cp_jobs WHERE {cond} ORDER BY id DESC LIMIT ${l}"),
            // A finished job's node is indexed, an unfinished one's is not (it changes
            // at every claim): each part in its own order, then merged.
            Some(n) => format!(
                "SELECT record FROM (
                   (SELECT id, record FROM cp_jobs WHERE {cond} AND ran_on = ${n}
                    ORDER BY id DESC LIMIT ${l})
                   UNION ALL
                   (SELECT id, record FROM cp_jobs
                    WHERE {cond} AND finished_at IS NULL AND node = ${n}
                    ORDER BY id DESC LIMIT ${l})
                 ) j ORDER BY id DESC LIMIT ${l}"
            ),
        };
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let rows = client.q(&sql, &refs).await?;
        rows.iter().map(|r| decode_job(r.get(0))).collect()
    }

    async fn active_jobs(&self) -> Result<Vec<(JobId, String)>> {
        let client = self.client().await?;
        let rows = client
            .q(
                "SELECT id, account FROM cp_jobs
                 WHERE finished_at IS NULL AND status IN ('queued', 'running') ORDER BY id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (JobId(r.get(0)), r.get(1))).collect())
    }

    async fn count_jobs(&self) -> Result<BTreeMap<JobStatus, u64>> {
        let client = self.client().await?;
        let rows =
            client.q("SELECT status, sum(n)::int8 FROM cp_job_counts GROUP BY status", &[]).await?;
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
        let cutoff = now.saturating_sub(policy.max_age_micros) as i64;
        let client = self.client().await?;
        // By age: the oldest finished first, whoever owns them.
        let mut purged = client
            .exec(
                "DELETE FROM cp_jobs WHERE id IN (
                   SELECT id FROM cp_jobs WHERE finished_at IS NOT NULL AND finished_at < $1
                   ORDER BY finished_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&cutoff, &(max_batch as i64)],
            )
            .await? as usize;
        // By count: each account's oldest past its own limit (its quota, read from its
        // record, else the policy's), never another account's.
        let rows = client
            .q(
                "SELECT c.account, c.n, a.record FROM (
                   SELECT account, sum(n)::int8 AS n FROM cp_finished_counts
                   GROUP BY account HAVING sum(n) > 0) c
                 LEFT JOIN cp_accounts a ON a.name = c.account",
                &[],
            )
            .await?;
        for row in rows {
            if purged >= max_batch {
                break;
            }
            let account: &str = row.get(0);
            let count = row.get::<_, i64>(1).max(0) as u64;
            let own = match row.get::<_, Option<&[u8]>>(2) {
                Some(record) => {
                    serde_json::from_slice::<AccountRecord>(record)
                        .context("stored account")?
                        .quotas
                        .max_finished_jobs
                }
                None => None,
            };
            let excess = count.saturating_sub(own.unwrap_or(policy.max_finished_per_account));
            let n = excess.min((max_batch - purged) as u64) as i64;
            if n == 0 {
                continue;
            }
            purged += client
                .exec(
                    "DELETE FROM cp_jobs WHERE id IN (
                       SELECT id FROM cp_jobs WHERE account = $1 AND finished_at IS NOT NULL
                       ORDER BY finished_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    &[&account, &n],
                )
                .await? as usize;
        }
        Ok(purged)
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

    /// A schema-3 database (records with stdin and output inline, no `cp_job_data`) is
    /// brought to the current schema at open: nothing lost, records left without their
    /// data, the jobs found by the indexes of schema 5.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn schema_3_upgrades_keep_every_job() {
        let db = testdb::shared();
        let config = || PgConfig {
            url: db.url(),
            schema: Some("mig_data".into()),
            node: NodeConfig::new("mig"),
        };
        let mut queued = crate::model::job::tests::queued_job("f");
        queued.stdin = b"in\"put\x00".to_vec();
        let mut done = crate::model::job::tests::queued_job("f");
        done.status = JobStatus::Running;
        done.attempts = 1;
        done.started_at = Some(1);
        done.finish(JobOutcome { stderr: b"e".to_vec(), ..succeeded(&[0xff; 70_000]) }, 2);
        let store = PgStore::open(config()).await.unwrap();
        store.insert_job(queued.clone()).await.unwrap();
        store.insert_job(done.clone()).await.unwrap();
        drop(store);

        // Back to schema 3, as its code wrote the rows.
        let (client, conn) = tokio_postgres::connect(&db.url(), NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute("SET search_path = mig_data").await.unwrap();
        for job in [&queued, &done] {
            client
                .execute(
                    "UPDATE cp_jobs SET record = $2 WHERE id = $1",
                    &[&job.id.0, &encode(job).unwrap()],
                )
                .await
                .unwrap();
        }
        client
            .batch_execute(
                "DROP INDEX cp_jobs_active, cp_jobs_account_outcome, cp_jobs_outcome,
                   cp_jobs_ran_on, cp_jobs_tags;
                 ALTER TABLE cp_jobs DROP COLUMN outcome, DROP COLUMN ran_on;
                 CREATE INDEX cp_jobs_queue_accounts ON cp_jobs (account, created_at, id)
                   WHERE status = 'queued';
                 CREATE INDEX cp_jobs_leases ON cp_jobs (lease_expires) WHERE status = 'running';
                 CREATE INDEX cp_jobs_account_status ON cp_jobs (account, status, id);
                 CREATE INDEX cp_jobs_status ON cp_jobs (status, id);
                 CREATE INDEX cp_jobs_node ON cp_jobs (node, id) WHERE node IS NOT NULL;
                 CREATE INDEX cp_jobs_tags ON cp_jobs USING gin (tags);
                 DROP TABLE cp_job_data;
                 DROP TABLE cp_batch_inputs;
                 DROP INDEX cp_batches_stopped, cp_batches_open;
                 ALTER TABLE cp_batches DROP COLUMN inputs, DROP COLUMN stopped_at,
                   DROP COLUMN open;
                 DELETE FROM cp_migrations WHERE version >= 4",
            )
            .await
            .unwrap();

        let store = PgStore::open(config()).await.unwrap();
        let got = store.get_job(done.id).await.unwrap().unwrap();
        assert_eq!(got, Job { stdin: Vec::new(), ..done.clone() });
        let all = JobFilter { limit: 10, ..Default::default() };
        let listed = store.list_jobs(&all).await.unwrap();
        assert_eq!(listed, [done.summary(), queued.summary()]);
        let by = |status| JobFilter { status: Some(status), limit: 10, ..Default::default() };
        assert_eq!(store.list_jobs(&by(JobStatus::Succeeded)).await.unwrap(), [done.summary()]);
        assert_eq!(store.list_jobs(&by(JobStatus::Queued)).await.unwrap(), [queued.summary()]);
        let claimed = store.claim_jobs(10, 3).await.unwrap();
        assert_eq!(claimed[0].stdin, queued.stdin);
        let record: Vec<u8> = client
            .query_one("SELECT record FROM cp_jobs WHERE id = $1", &[&done.id.0])
            .await
            .unwrap()
            .get(0);
        assert_eq!(decode_job(&record).unwrap(), done.summary(), "the record holds no output");
    }

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
            a.insert_job(crate::model::job::tests::queued_job("f")).await.unwrap();
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

    /// Claims are HOT updates (no index entry written), and lists by node and status
    /// find jobs whether they run or have finished (schema 5).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lists_by_node_find_running_and_finished_jobs() {
        let (a, b) = two_nodes("by_node").await;
        for _ in 0..3 {
            a.insert_job(crate::model::job::tests::queued_job("f")).await.unwrap();
        }
        let on_a = a.claim_jobs(2, 1).await.unwrap();
        let on_b = b.claim_jobs(1, 1).await.unwrap();
        a.finish_job(on_a[0].id, succeeded(b"x"), 2).await.unwrap();
        let ids = |node: &str, status: Option<JobStatus>| {
            let filter =
                JobFilter { node: Some(node.into()), status, limit: 10, ..Default::default() };
            let store = &a;
            async move {
                let mut got: Vec<JobId> =
                    store.list_jobs(&filter).await.unwrap().iter().map(|j| j.id).collect();
                got.sort();
                got
            }
        };
        let mut both = vec![on_a[0].id, on_a[1].id];
        both.sort();
        assert_eq!(ids("a", None).await, both);
        assert_eq!(ids("a", Some(JobStatus::Running)).await, [on_a[1].id]);
        assert_eq!(ids("a", Some(JobStatus::Succeeded)).await, [on_a[0].id]);
        assert_eq!(ids("b", None).await, [on_b[0].id]);
        assert_eq!(ids("c", None).await, []);
        // No index reads a column that a claim, a renewal or a cancel changes.
        let client = a.client().await.unwrap();
        let defs = client
            .q("SELECT indexdef FROM pg_indexes WHERE tablename = 'cp_jobs'", &[])
            .await
            .unwrap();
        assert!(defs.len() >= 10, "{} indexes", defs.len());
        for def in defs {
            let def: String = def.get(0);
            for word in def.split(|c: char| !c.is_alphanumeric() && c != '_') {
                let changing =
                    ["status", "node", "attempts", "lease_expires", "cancel_requested", "record"];
                assert!(!changing.contains(&word), "{def} reads {word}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_node_that_lost_its_lease_never_writes_over_the_new_attempt() {
        let (a, b) = two_nodes("fence").await;
        let job =
            a.insert_job(crate::model::job::tests::queued_job("f")).await.unwrap().job().clone();
        let mut events = a.subscribe();
        assert_eq!(a.claim_jobs(1, 1).await.unwrap().len(), 1);
        // A falls silent: its lease runs out, B rescues and runs the job.
        let client = a.client().await.unwrap();
        client.exec("UPDATE cp_jobs SET lease_expires = 0", &[]).await.unwrap();
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

    /// Reads kept for the submit path follow changes made on any node: at once on the
    /// node that made them, within a notification on the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn kept_reads_follow_a_change_made_on_another_node() {
        use crate::store::conformance::owned;
        let (a, b) = two_nodes("recent").await;
        let carol = Scope::Account("carol".into());
        let record = AccountRecord {
            name: "carol".into(),
            role: cloudpipe_types::Role::User,
            disabled: false,
            quotas: Default::default(),
            allow_network: false,
            allowed_outbound: vec![],
            created_at: 1,
        };
        assert!(b.get_account("carol").await.unwrap().is_none(), "a miss is not kept");
        assert!(a.insert_account(record.clone()).await.unwrap());
        // From here B keeps what it reads, until `recent::KEEP` has passed.
        let kept = std::time::Instant::now();
        assert!(!b.get_account("carol").await.unwrap().unwrap().disabled);
        let bin = || Bytes::from_static(b"abc");
        assert!(b.get_function(&carol, "web").await.unwrap().is_none());
        a.put_function(owned("carol", 'a', Some("web")), bin(), None).await.unwrap();
        assert_eq!(
            b.get_function(&carol, "web").await.unwrap().unwrap().id,
            owned("carol", 'a', None).id
        );

        // Changed on A: B follows once it hears of it, well before the values expire.
        a.update_account(AccountRecord { disabled: true, ..record }).await.unwrap();
        a.put_function(owned("carol", 'b', Some("web")), bin(), None).await.unwrap();
        assert!(a.get_account("carol").await.unwrap().unwrap().disabled, "at once on A");
        loop {
            let disabled = b.get_account("carol").await.unwrap().unwrap().disabled;
            let id = b.get_function(&carol, "web").await.unwrap().unwrap().id;
            if disabled && id == owned("carol", 'b', None).id {
                break;
            }
            assert!(kept.elapsed() < recent::KEEP * 9 / 10, "B still reads the old values");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancel_through_one_node_reaches_the_node_running_the_job() {
        let (a, b) = two_nodes("cancel").await;
        let job =
            a.insert_job(crate::model::job::tests::queued_job("f")).await.unwrap().job().clone();
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
