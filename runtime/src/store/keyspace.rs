//! The one keyspace of every embedded backend, and every [`Store`](super::Store)
//! method written once over it ([`KvRead`], [`KvWrite`]).
//!
//! # Layout
//! The first byte of a key names its table; integers are big-endian so that byte
//! order is numeric order.
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | jobs | `j` id(16) | [`Job::summary`] as JSON (no stdin, no output) |
//! | job data | `o` id(16) stream(1) | stdin (`i`), stdout (`o`), stderr (`e`): raw bytes, absent when empty |
//! | queue | `Q` account 0 created_at(8) id(16) | empty |
//! | claim cursor | `Mclaim` | the account the last claim served last |
//! | lists | `l` dimension(1) len(4) account len(4) value id(16) | empty |
//! | list index version | `Mlists` | version(1) |
//! | running | `r` id(16) | empty |
//! | idempotency | `i` account 0 key | id(16) |
//! | finished | `d` finished_at(8) id(16) | empty |
//! | finished by account | `D` account 0 finished_at(8) id(16) | empty |
//! | counters | `c` status(1) | count(8) |
//! | finished counts | `C` account | the account's finished jobs, count(8) |
//! | functions | `f` account 0 id | [`FunctionMeta`] as JSON |
//! | owners | `v` id 0 account | empty |
//! | binaries | `b` id | the binary (once, whoever owns it) |
//! | names | `n` name | [`NameEntry`] as JSON |
//! | settings | `s` name | `FunctionSettings` as JSON |
//! | accounts | `a` name | [`AccountRecord`] as JSON |
//! | keys | `k` sha256 hex of the secret | [`KeyRecord`] as JSON |
//! | key ids | `K` key id | sha256 hex of the secret |
//! | batches | `B` batch id | [`BatchState`] as JSON (no inputs) |
//! | batch inputs | `I` batch id 0 chunk(8) | up to `BATCH_CHUNK` inputs, a JSON array |
//! | batches by account | `E` account 0 batch id | empty |
//! | open batches | `U` batch id | empty: running, or its report hook still due |
//! | stopped batches | `F` finished_at(8) batch id | empty (retention) |
//! | batch counts | `G` account | the account's batches(8) and their inputs(8) |
//! | secrets | `x` account 0 name | [`SecretRecord`] as JSON (sealed) |
//! | format | `M` `format` | the store's format version, u32 (see `format`) |
//!
//! Account names and function ids never contain a 0 byte, so `account 0` and `id 0`
//! are exact prefixes.
//!
//! Job ids are UUIDv7, so the jobs table is in creation order. Each account has its
//! queue, ordered by `created_at`, which a job keeps when recovery puts it back: a
//! requeued job goes ahead of every job of its account submitted after it. Claims take
//! one job of each account with queued work in turn (accounts in name order, starting
//! after the one the last claim served last), so one account's backlog does not starve
//! the others.
//!
//! # Lists
//! Every job has entries in the `l` table, one per way [`JobFilter`] can ask for it:
//! by status, by function (the name as submitted and the version's id), by tag and by
//! batch, each under its account and again under the empty account (every account),
//! and by creation under its account (every account's jobs by creation are the jobs
//! table itself). Lengths come before the variable parts, so each (dimension, account,
//! value) is an exact prefix whose entries are in id (creation) order: a list reads
//! one such range backwards from its cursor, or, for several filters at once, steps
//! through their ranges together (a leapfrog join), so a page costs about its own
//! size whatever else is stored. Only the status entries change after the insert.
//! Stores written before the index are indexed once at open ([`upgrade`]).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail};
use bytes::Bytes;
use cloudpipe_types::JobStatus;

use super::kv::{KvRead, KvWrite};
use super::{
    FunctionMeta, Inserted, JobFilter, PutFunction, PutSecret, Recovery, Result, Retention,
};
use crate::model::{
    AccountRecord, BatchState, Job, JobId, JobOutcome, KeyRecord, Micros, Scope, SecretRecord,
};

mod batches;
pub(super) use batches::inputs_apart_5;
pub(crate) use batches::{batch_inputs, get_batch, list_batches, open_batches};

const JOBS: u8 = b'j';
/// Stdin and output of jobs, apart from their records (see the module docs).
const DATA: u8 = b'o';
const STDIN: u8 = b'i';
const STDOUT: u8 = b'o';
const STDERR: u8 = b'e';
/// The single queue of stores written before queues were kept per account: moved to
/// [`QUEUE`] by [`upgrade`].
const LEGACY_QUEUE: u8 = b'q';
const QUEUE: u8 = b'Q';
const LISTS: u8 = b'l';
const RUNNING: u8 = b'r';
const IDEMPOTENCY: u8 = b'i';
const FINISHED: u8 = b'd';
/// Each account's finished jobs, oldest first: retention's count per account.
pub(super) const FINISHED_BY_ACCOUNT: u8 = b'D';
pub(super) const FINISHED_COUNTS: u8 = b'C';
const COUNTERS: u8 = b'c';
const FUNCTIONS: u8 = b'f';
const BINARIES: u8 = b'b';
const NAMES: u8 = b'n';
const SETTINGS: u8 = b's';
const OWNERS: u8 = b'v';
const ACCOUNTS: u8 = b'a';
const KEYS: u8 = b'k';
const KEY_IDS: u8 = b'K';
const SECRETS: u8 = b'x';

/// The list index's version; absent in stores written before it ([`upgrade`]).
const LIST_INDEX_VERSION: &[u8] = b"Mlists";
/// The account the last claim served last.
const CLAIM_CURSOR: &[u8] = b"Mclaim";

// Dimensions of the list index.
const BY_CREATION: u8 = b'c';
const BY_STATUS: u8 = b's';
const BY_FUNCTION: u8 = b'f';
const BY_TAG: u8 = b't';
const BY_BATCH: u8 = b'b';
/// The account part of the entries that list every account's jobs.
const EVERY_ACCOUNT: &str = "";

/// How many entries a scan loads at once.
const CHUNK: usize = 256;

/// Error kind of a job whose attempts ran out while the server was down.
pub(crate) const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";

pub(super) fn key(table: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(table);
    k.extend_from_slice(rest);
    k
}

/// `table a 0 b`
pub(super) fn pair_key(table: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + a.len() + b.len());
    k.push(table);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn idempotency_key(job: &Job) -> Option<Vec<u8>> {
    job.idempotency_key.as_deref().map(|k| pair_key(IDEMPOTENCY, &job.account, k))
}

fn job_key(id: JobId) -> Vec<u8> {
    key(JOBS, &id.to_bytes())
}

fn data_key(id: JobId, stream: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.push(DATA);
    k.extend_from_slice(&id.to_bytes());
    k.push(stream);
    k
}

/// Writes a job's record (its summary) and, apart, its output and, when `with_stdin`,
/// its stdin; empty streams are not written. Stdin never changes after the insert, so
/// later writes leave it alone.
pub(super) fn put_job(tx: &mut dyn KvWrite, job: &Job, with_stdin: bool) -> Result<()> {
    put_json(tx, &job_key(job.id), &job.summary())?;
    let stdin: &[u8] = if with_stdin { &job.stdin } else { &[] };
    for (stream, bytes) in [(STDIN, stdin), (STDOUT, &job.stdout[..]), (STDERR, &job.stderr[..])] {
        if !bytes.is_empty() {
            tx.put(&data_key(job.id, stream), bytes)?;
        }
    }
    Ok(())
}

fn delete_job_data(tx: &mut dyn KvWrite, id: JobId) -> Result<()> {
    for stream in [STDIN, STDOUT, STDERR] {
        tx.delete(&data_key(id, stream))?;
    }
    Ok(())
}

fn timed_key(table: u8, at: Micros, id: JobId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(table);
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(&id.to_bytes());
    k
}

fn queue_prefix(account: &str) -> Vec<u8> {
    pair_key(QUEUE, account, "")
}

fn queue_key(job: &Job) -> Vec<u8> {
    let mut k = queue_prefix(&job.account);
    k.extend_from_slice(&job.created_at.to_be_bytes());
    k.extend_from_slice(&job.id.to_bytes());
    k
}

/// `len(4) s`: a variable part of a key that is an exact prefix whatever bytes it holds.
fn push_sized(k: &mut Vec<u8>, s: &str) {
    k.extend_from_slice(&(s.len() as u32).to_be_bytes());
    k.extend_from_slice(s.as_bytes());
}

/// The range of list entries of one (dimension, account, value).
fn list_prefix(dim: u8, account: &str, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(26 + account.len() + value.len());
    k.push(LISTS);
    k.push(dim);
    push_sized(&mut k, account);
    push_sized(&mut k, value);
    k
}

/// The list entries of `job`: all of them, or only those that depend on its status.
fn list_entries(job: &Job, status_only: bool) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    for account in [job.account.as_str(), EVERY_ACCOUNT] {
        keys.push(list_prefix(BY_STATUS, account, job.status.as_str()));
        if status_only {
            continue;
        }
        keys.push(list_prefix(BY_FUNCTION, account, &job.function));
        if job.function_id != job.function {
            keys.push(list_prefix(BY_FUNCTION, account, &job.function_id));
        }
        for tag in &job.tags {
            keys.push(list_prefix(BY_TAG, account, tag));
        }
        if let Some(batch) = &job.batch {
            keys.push(list_prefix(BY_BATCH, account, &batch.id));
        }
    }
    if !status_only {
        keys.push(list_prefix(BY_CREATION, &job.account, ""));
    }
    for k in &mut keys {
        k.extend_from_slice(&job.id.to_bytes());
    }
    keys
}

/// When a terminal job ended, as its finished entries order it.
fn finished_at(job: &Job) -> Micros {
    // A terminal job always has `finished_at`; `created_at` is only a fallback for a
    // record inserted already terminal without one.
    job.finished_at.unwrap_or(job.created_at)
}

fn finished_key(job: &Job) -> Vec<u8> {
    timed_key(FINISHED, finished_at(job), job.id)
}

fn account_finished_key(job: &Job) -> Vec<u8> {
    let mut k = pair_key(FINISHED_BY_ACCOUNT, &job.account, "");
    k.extend_from_slice(&finished_at(job).to_be_bytes());
    k.extend_from_slice(&job.id.to_bytes());
    k
}

fn counter_key(status: JobStatus) -> Vec<u8> {
    let index = JobStatus::ALL.iter().position(|s| *s == status).unwrap_or(0);
    key(COUNTERS, &[index as u8])
}

/// The id at the end of a job, queue, running or finished key.
fn id_suffix(key: &[u8]) -> Result<JobId> {
    let tail = key.len().checked_sub(16).context("store key too short for a job id")?;
    let bytes: [u8; 16] = key[tail..].try_into().context("store key too short for a job id")?;
    Ok(JobId::from_bytes(bytes))
}

fn decode_job(bytes: &[u8]) -> Result<Job> {
    serde_json::from_slice(bytes).context("decoding a stored job")
}

fn decode_function(bytes: &[u8]) -> Result<FunctionMeta> {
    serde_json::from_slice(bytes).context("decoding stored function metadata")
}

fn decode_u64(bytes: &[u8]) -> Result<u64> {
    let b: [u8; 8] = bytes.try_into().context("stored counter is not 8 bytes")?;
    Ok(u64::from_be_bytes(b))
}

// ---- writes ----

/// One write, as the writer thread receives it. (Jobs are boxed: they are large and
/// the other writes small.)
#[derive(Debug)]
pub(crate) enum WriteOp {
    PutFunction(FunctionMeta, Bytes, Option<u64>),
    DeleteFunction(Scope, String),
    PutSettings(Scope, String, Box<cloudpipe_types::FunctionSettings>),
    InsertAccount(AccountRecord),
    UpdateAccount(AccountRecord),
    InsertKey(KeyRecord),
    DeleteKey(String),
    CreateBatch(Box<BatchState>, Vec<Vec<String>>, super::BatchCaps),
    PutBatch(Box<BatchState>),
    DeleteBatch(String),
    PurgeBatches { max_age: u64, now: Micros, max_batch: usize },
    InsertJob(Box<Job>),
    ClaimJobs { limit: usize, now: Micros },
    FinishJob { id: JobId, outcome: Box<JobOutcome>, now: Micros },
    CancelQueued { id: JobId, now: Micros },
    Release { id: JobId },
    Recover { now: Micros },
    Purge { policy: Retention, now: Micros, max_batch: usize },
    Secret(SecretOp),
}

/// What a [`WriteOp`] returns.
#[derive(Debug)]
pub(crate) enum Reply {
    Put(PutFunction),
    Done(bool),
    Key(Option<KeyRecord>),
    MaybeFunction(Option<FunctionMeta>),
    Deleted(Vec<FunctionMeta>),
    Inserted(Inserted),
    Jobs(Vec<Job>),
    Job(Option<Job>),
    Recovery(Recovery),
    Purged(usize),
    Secret(PutSecret),
    CreatedBatch(super::CreateBatch),
    Batch(Option<Box<BatchState>>),
}

/// Applies one write inside the writer's transaction. An error leaves the transaction
/// to be aborted (the writer then retries the other writes of its group without it).
pub(crate) fn apply(op: &WriteOp, tx: &mut dyn KvWrite) -> Result<Reply> {
    Ok(match op {
        WriteOp::PutFunction(meta, binary, max) => {
            Reply::Put(put_function(tx, meta, binary, *max)?)
        }
        WriteOp::PutSettings(scope, name, settings) => {
            Reply::MaybeFunction(put_settings(tx, scope, name, settings)?)
        }
        WriteOp::DeleteFunction(scope, name_or_id) => {
            Reply::Deleted(delete_function(tx, scope, name_or_id)?)
        }
        WriteOp::InsertAccount(a) => Reply::Done(insert_account(tx, a)?),
        WriteOp::UpdateAccount(a) => Reply::Done(update_account(tx, a)?),
        WriteOp::InsertKey(k) => Reply::Done(insert_key(tx, k)?),
        WriteOp::DeleteKey(id) => Reply::Key(delete_key(tx, id)?),
        WriteOp::CreateBatch(b, inputs, caps) => {
            Reply::CreatedBatch(batches::create_batch(tx, b, inputs, *caps)?)
        }
        WriteOp::PutBatch(b) => Reply::Done(batches::put_batch(tx, b)?),
        WriteOp::DeleteBatch(id) => Reply::Batch(batches::delete_batch(tx, id)?.map(Box::new)),
        WriteOp::PurgeBatches { max_age, now, max_batch } => {
            Reply::Purged(batches::purge_batches(tx, *max_age, *now, *max_batch)?)
        }
        WriteOp::InsertJob(job) => Reply::Inserted(insert_job(tx, job)?),
        WriteOp::ClaimJobs { limit, now } => Reply::Jobs(claim_jobs(tx, *limit, *now)?),
        WriteOp::FinishJob { id, outcome, now } => Reply::Job(finish_job(tx, *id, outcome, *now)?),
        WriteOp::CancelQueued { id, now } => Reply::Job(cancel_queued_job(tx, *id, *now)?),
        WriteOp::Release { id } => Reply::Job(release_job(tx, *id)?),
        WriteOp::Recover { now } => Reply::Recovery(recover(tx, *now)?),
        WriteOp::Purge { policy, now, max_batch } => {
            Reply::Purged(purge_finished(tx, *policy, *now, *max_batch)?)
        }
        WriteOp::Secret(op) => apply_secret(op, tx)?,
    })
}

fn put_json<T: serde::Serialize>(tx: &mut dyn KvWrite, key: &[u8], value: &T) -> Result<()> {
    tx.put(key, &serde_json::to_vec(value)?)
}

/// Counts `job` in (`delta` 1) or out (-1) of its status's counter, and of its
/// account's finished count when it is terminal.
fn bump(tx: &mut dyn KvWrite, job: &Job, delta: i64) -> Result<()> {
    add_to_counter(tx, &counter_key(job.status), delta, false)?;
    if job.status.is_terminal() {
        add_to_counter(tx, &key(FINISHED_COUNTS, job.account.as_bytes()), delta, true)?;
    }
    Ok(())
}

/// Adds `delta` to the counter at `key`; with `drop_zero`, a counter back at zero is
/// deleted (so that scanning the counters costs what is counted).
pub(super) fn add_to_counter(
    tx: &mut dyn KvWrite,
    key: &[u8],
    delta: i64,
    drop_zero: bool,
) -> Result<()> {
    let current = tx.get(key)?.map(|v| decode_u64(&v)).transpose()?.unwrap_or(0);
    let next = current.saturating_add_signed(delta);
    match next {
        0 if drop_zero => tx.delete(key),
        _ => tx.put(key, &next.to_be_bytes()),
    }
}

/// Replaces a stored job (`old`) by its new state: record, indexes and counters.
/// (A job's account, function, tags and batch never change: only its status entries
/// move.)
fn update_job(tx: &mut dyn KvWrite, old: &Job, job: &Job) -> Result<()> {
    remove_indexes(tx, old)?;
    add_indexes(tx, job)?;
    if old.status != job.status {
        for k in list_entries(old, true) {
            tx.delete(&k)?;
        }
        for k in list_entries(job, true) {
            tx.put(&k, &[])?;
        }
        bump(tx, old, -1)?;
        bump(tx, job, 1)?;
    }
    put_job(tx, job, false)
}

/// The queue, running or finished entry that a job's status calls for.
fn status_index(job: &Job) -> Vec<u8> {
    match job.status {
        JobStatus::Queued => queue_key(job),
        JobStatus::Running => key(RUNNING, &job.id.to_bytes()),
        _ => finished_key(job),
    }
}

fn add_indexes(tx: &mut dyn KvWrite, job: &Job) -> Result<()> {
    if job.status.is_terminal() {
        tx.put(&account_finished_key(job), &[])?;
    }
    tx.put(&status_index(job), &[])
}

fn remove_indexes(tx: &mut dyn KvWrite, job: &Job) -> Result<()> {
    if job.status.is_terminal() {
        tx.delete(&account_finished_key(job))?;
    }
    tx.delete(&status_index(job))
}

fn insert_job(tx: &mut dyn KvWrite, job: &Job) -> Result<Inserted> {
    let idem_key = idempotency_key(job);
    if let Some(idem_key) = &idem_key
        && let Some(id) = tx.get(idem_key)?
        // An entry whose job is gone (never, unless the file was edited) is
        // overwritten below.
        && let Some(existing) = get_job(&*tx, id_suffix(&id)?)?
    {
        return Ok(Inserted::Existing(existing));
    }
    // Ids are fresh UUIDv7s; a second insert of the same id is a retry of the first.
    if let Some(existing) = get_job(&*tx, job.id)? {
        return Ok(Inserted::Existing(existing));
    }
    put_job(tx, job, true)?;
    add_indexes(tx, job)?;
    for k in list_entries(job, false) {
        tx.put(&k, &[])?;
    }
    if let Some(idem_key) = &idem_key {
        tx.put(idem_key, &job.id.to_bytes())?;
    }
    bump(tx, job, 1)?;
    Ok(Inserted::Created(job.clone()))
}

/// Accounts with queued jobs, in name order.
fn queued_accounts(r: &dyn KvRead) -> Result<Vec<String>> {
    let mut accounts = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    while let Some((k, _)) = r.scan(&[QUEUE], after.as_deref(), false, 1)?.pop() {
        let end = k.iter().position(|b| *b == 0).context("queue key without an account")?;
        let account = std::str::from_utf8(&k[1..end]).context("queue key account")?;
        // Past every key of this account: its keys end in 24 bytes after the 0.
        let mut skip = queue_prefix(account);
        skip.extend_from_slice(&[u8::MAX; 25]);
        after = Some(skip);
        accounts.push(account.to_string());
    }
    Ok(accounts)
}

/// Round-robin across accounts, first in first out within one (see the module docs).
fn claim_jobs(tx: &mut dyn KvWrite, limit: usize, now: Micros) -> Result<Vec<Job>> {
    let mut claimed = Vec::new();
    let accounts = queued_accounts(&*tx)?;
    if accounts.is_empty() {
        return Ok(claimed);
    }
    let last = tx.get(CLAIM_CURSOR)?.map(String::from_utf8).transpose()?;
    let start = accounts.partition_point(|a| last.as_ref().is_some_and(|l| a <= l));
    let mut turn: std::collections::VecDeque<String> =
        accounts[start..].iter().chain(&accounts[..start]).cloned().collect();
    let mut served = None;
    while claimed.len() < limit
        && let Some(account) = turn.pop_front()
    {
        let Some((qkey, _)) = tx.scan(&queue_prefix(&account), None, false, 1)?.pop() else {
            continue;
        };
        let id = id_suffix(&qkey)?;
        match get_record(&*tx, id)? {
            Some(old) if old.status == JobStatus::Queued => {
                let mut job = old.clone();
                job.status = JobStatus::Running;
                job.attempts += 1;
                job.started_at = Some(now);
                update_job(tx, &old, &job)?;
                // The one read of stdin: the job is about to run.
                job.stdin = tx.get(&data_key(id, STDIN))?.unwrap_or_default();
                claimed.push(job);
                served = Some(account.clone());
            }
            // A queue entry without a queued job cannot be written by this module;
            // drop it rather than loop on it.
            _ => tx.delete(&qkey)?,
        }
        turn.push_back(account);
    }
    if let Some(account) = served {
        tx.put(CLAIM_CURSOR, account.as_bytes())?;
    }
    Ok(claimed)
}

fn finish_job(
    tx: &mut dyn KvWrite,
    id: JobId,
    outcome: &JobOutcome,
    now: Micros,
) -> Result<Option<Job>> {
    if !outcome.status.is_terminal() {
        bail!("finish_job with a non-terminal status {}", outcome.status.as_str());
    }
    let Some(old) = get_record(&*tx, id)? else { return Ok(None) };
    if old.status != JobStatus::Running {
        return get_job(&*tx, id);
    }
    let mut job = old.clone();
    job.finish(outcome.clone(), now);
    update_job(tx, &old, &job)?;
    Ok(Some(job))
}

fn cancel_queued_job(tx: &mut dyn KvWrite, id: JobId, now: Micros) -> Result<Option<Job>> {
    let Some(old) = get_record(&*tx, id)? else { return Ok(None) };
    if old.status != JobStatus::Queued {
        return get_job(&*tx, id);
    }
    let mut job = old.clone();
    job.finish(
        JobOutcome::error(JobStatus::Cancelled, "cancelled", "cancelled before it started"),
        now,
    );
    update_job(tx, &old, &job)?;
    Ok(Some(job))
}

fn recover(tx: &mut dyn KvWrite, now: Micros) -> Result<Recovery> {
    let mut recovery = Recovery::default();
    loop {
        // Each pass removes the running entries it read, so it always starts at the front.
        let entries = tx.scan(&[RUNNING], None, false, CHUNK)?;
        if entries.is_empty() {
            break;
        }
        for (rkey, _) in entries {
            let id = id_suffix(&rkey)?;
            let old = match get_record(&*tx, id)? {
                Some(job) if job.status == JobStatus::Running => job,
                _ => {
                    tx.delete(&rkey)?;
                    continue;
                }
            };
            let mut job = old.clone();
            if job.attempts < job.max_attempts {
                job.status = JobStatus::Queued;
                job.started_at = None;
                recovery.requeued += 1;
            } else {
                let message = format!(
                    "used {} of {} attempts; the server stopped while the last one ran",
                    job.attempts, job.max_attempts
                );
                job.finish(JobOutcome::error(JobStatus::Failed, ATTEMPTS_EXHAUSTED, message), now);
                recovery.exhausted += 1;
            }
            update_job(tx, &old, &job)?;
        }
    }
    Ok(recovery)
}

/// A running job given back unrun (its attempt was cut short by a clean shutdown):
/// queued again in its original place, the attempt not counted.
fn release_job(tx: &mut dyn KvWrite, id: JobId) -> Result<Option<Job>> {
    let Some(old) = get_record(&*tx, id)? else { return Ok(None) };
    if old.status != JobStatus::Running {
        return get_job(&*tx, id);
    }
    let mut job = old.clone();
    job.status = JobStatus::Queued;
    job.started_at = None;
    job.attempts = job.attempts.saturating_sub(1);
    update_job(tx, &old, &job)?;
    Ok(Some(job))
}

fn purge_finished(
    tx: &mut dyn KvWrite,
    policy: Retention,
    now: Micros,
    max_batch: usize,
) -> Result<usize> {
    let mut purged = 0;
    // By age: the oldest finished first, whoever owns them.
    for (dkey, _) in tx.scan(&[FINISHED], None, false, max_batch)? {
        let at = decode_u64(&dkey[1..9])?;
        if now.saturating_sub(at) <= policy.max_age_micros {
            // Entries are oldest first: every later one is kept too.
            break;
        }
        delete_finished(tx, &dkey)?;
        purged += 1;
    }
    // By count: each account's oldest past its own limit, never another account's.
    for (ckey, count) in scan_all(&*tx, &[FINISHED_COUNTS])? {
        if purged >= max_batch {
            break;
        }
        let account = std::str::from_utf8(&ckey[1..]).context("stored account name")?;
        let limit = get_account(&*tx, account)?
            .and_then(|a| a.quotas.max_finished_jobs)
            .unwrap_or(policy.max_finished_per_account);
        let excess = decode_u64(&count)?.saturating_sub(limit);
        let n = excess.min((max_batch - purged) as u64) as usize;
        if n == 0 {
            continue;
        }
        let prefix = pair_key(FINISHED_BY_ACCOUNT, account, "");
        for (k, _) in tx.scan(&prefix, None, false, n)? {
            delete_finished(tx, &k)?;
            purged += 1;
        }
    }
    Ok(purged)
}

/// Deletes the finished job that `entry` (its `d` or `D` entry) names: its record,
/// every index entry, its counts and its idempotency key.
fn delete_finished(tx: &mut dyn KvWrite, entry: &[u8]) -> Result<()> {
    // Deleted first: an entry whose job is gone (never, unless the file was edited)
    // goes too, rather than stop retention.
    tx.delete(entry)?;
    let id = id_suffix(entry)?;
    let Some(job) = get_record(&*tx, id)? else { return Ok(()) };
    tx.delete(&job_key(id))?;
    delete_job_data(tx, id)?;
    remove_indexes(tx, &job)?;
    for k in list_entries(&job, false) {
        tx.delete(&k)?;
    }
    if let Some(idem_key) = idempotency_key(&job) {
        // Only if it still names this job.
        if tx.get(&idem_key)?.as_deref() == Some(&id.to_bytes()[..]) {
            tx.delete(&idem_key)?;
        }
    }
    bump(tx, &job, -1)
}

/// Format 2 → 3: each finished job's entry by account and its account's count, built
/// afresh (whatever of them the store holds is dropped first).
pub(super) fn index_finished_by_account(tx: &mut dyn KvWrite) -> Result<()> {
    for table in [FINISHED_BY_ACCOUNT, FINISHED_COUNTS] {
        loop {
            let keys = tx.scan(&[table], None, false, CHUNK)?;
            if keys.is_empty() {
                break;
            }
            for (k, _) in keys {
                tx.delete(&k)?;
            }
        }
    }
    let mut after: Option<Vec<u8>> = None;
    loop {
        let entries = tx.scan(&[FINISHED], after.as_deref(), false, CHUNK)?;
        let Some((last, _)) = entries.last() else { break };
        after = Some(last.clone());
        for (dkey, _) in entries {
            if let Some(job) = get_record(&*tx, id_suffix(&dkey)?)?
                && job.status.is_terminal()
            {
                tx.put(&account_finished_key(&job), &[])?;
                add_to_counter(tx, &key(FINISHED_COUNTS, job.account.as_bytes()), 1, true)?;
            }
        }
    }
    Ok(())
}

/// Where a name points, and whose it is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct NameEntry {
    account: String,
    id: String,
}

fn name_entry(r: &dyn KvRead, name: &str) -> Result<Option<NameEntry>> {
    r.get(&key(NAMES, name.as_bytes()))?
        .map(|b| serde_json::from_slice(&b).context("stored function name"))
        .transpose()
}

fn put_function(
    tx: &mut dyn KvWrite,
    meta: &FunctionMeta,
    binary: &[u8],
    max_bytes: Option<u64>,
) -> Result<PutFunction> {
    if let Some(name) = &meta.name
        && let Some(entry) = name_entry(&*tx, name)?
        && entry.account != meta.account
    {
        return Ok(PutFunction::NameTaken);
    }
    let fkey = pair_key(FUNCTIONS, &meta.account, &meta.id);
    let stored = match tx.get(&fkey)? {
        Some(bytes) => {
            let mut existing = decode_function(&bytes)?;
            if meta.name.is_some() {
                existing.name = meta.name.clone();
            }
            existing
        }
        None => {
            if let Some(limit) = max_bytes {
                let used = function_bytes(&*tx, &meta.account)?;
                if used.saturating_add(meta.size) > limit {
                    return Ok(PutFunction::OverQuota { used, limit });
                }
            }
            let bkey = key(BINARIES, meta.id.as_bytes());
            if tx.get(&bkey)?.is_none() {
                tx.put(&bkey, binary)?;
            }
            tx.put(&pair_key(OWNERS, &meta.id, &meta.account), &[])?;
            meta.clone()
        }
    };
    put_json(tx, &fkey, &stored)?;
    if let Some(name) = &meta.name {
        let entry = NameEntry { account: meta.account.clone(), id: meta.id.clone() };
        put_json(tx, &key(NAMES, name.as_bytes()), &entry)?;
        // As seen through the name: with the name's settings, which it keeps.
        if let Some(named) = named(&*tx, name.clone(), &entry)? {
            return Ok(PutFunction::Stored(named));
        }
    }
    Ok(PutFunction::Stored(stored))
}

/// Every name and where it points, sorted by name.
fn names(r: &dyn KvRead) -> Result<Vec<(String, NameEntry)>> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let entries = r.scan(&[NAMES], after.as_deref(), false, CHUNK)?;
        let Some((last, _)) = entries.last() else { break };
        after = Some(last.clone());
        for (k, v) in entries {
            let name = String::from_utf8(k[1..].to_vec()).context("stored function name")?;
            let entry = serde_json::from_slice(&v).context("stored function name")?;
            out.push((name, entry));
        }
    }
    Ok(out)
}

/// Every entry under `prefix`.
fn scan_all(r: &dyn KvRead, prefix: &[u8]) -> Result<Vec<super::kv::Entry>> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let entries = r.scan(prefix, after.as_deref(), false, CHUNK)?;
        let Some((last, _)) = entries.last() else { break };
        after = Some(last.clone());
        out.extend(entries);
    }
    Ok(out)
}

/// The versions `account` owns.
fn versions_of(r: &dyn KvRead, account: &str) -> Result<Vec<FunctionMeta>> {
    scan_all(r, &pair_key(FUNCTIONS, account, ""))?
        .iter()
        .map(|(_, v)| decode_function(v))
        .collect()
}

/// The accounts owning version `id`.
fn owners_of(r: &dyn KvRead, id: &str) -> Result<Vec<String>> {
    let prefix = pair_key(OWNERS, id, "");
    scan_all(r, &prefix)?
        .into_iter()
        .map(|(k, _)| String::from_utf8(k[prefix.len()..].to_vec()).context("stored owner"))
        .collect()
}

fn delete_function(
    tx: &mut dyn KvWrite,
    scope: &Scope,
    name_or_id: &str,
) -> Result<Vec<FunctionMeta>> {
    let all_names = names(&*tx)?;
    let mut doomed: Vec<FunctionMeta> = Vec::new();
    let named = all_names.iter().find(|(n, e)| n == name_or_id && scope.sees(&e.account));
    if let Some((_, entry)) = named {
        // A name: it goes, and so does every version of its account last uploaded
        // under it (the one it points at included) that no other name points at.
        tx.delete(&key(NAMES, name_or_id.as_bytes()))?;
        tx.delete(&key(SETTINGS, name_or_id.as_bytes()))?;
        let kept: BTreeSet<&str> = all_names
            .iter()
            .filter(|(n, e)| n != name_or_id && e.account == entry.account)
            .map(|(_, e)| e.id.as_str())
            .collect();
        for meta in versions_of(&*tx, &entry.account)? {
            let uploaded_under = meta.name.as_deref() == Some(name_or_id);
            let pointed_at = meta.id == entry.id;
            if (uploaded_under || pointed_at) && !kept.contains(meta.id.as_str()) {
                doomed.push(meta);
            }
        }
    } else {
        // An id: that version of each visible owner, and every name pointing at it.
        for account in owners_of(&*tx, name_or_id)? {
            if !scope.sees(&account) {
                continue;
            }
            if let Some(bytes) = tx.get(&pair_key(FUNCTIONS, &account, name_or_id))? {
                doomed.push(decode_function(&bytes)?);
            }
            for (name, e) in &all_names {
                if e.id == name_or_id && e.account == account {
                    tx.delete(&key(NAMES, name.as_bytes()))?;
                    tx.delete(&key(SETTINGS, name.as_bytes()))?;
                }
            }
        }
    }
    for meta in &doomed {
        tx.delete(&pair_key(FUNCTIONS, &meta.account, &meta.id))?;
        tx.delete(&pair_key(OWNERS, &meta.id, &meta.account))?;
        if owners_of(&*tx, &meta.id)?.is_empty() {
            tx.delete(&key(BINARIES, meta.id.as_bytes()))?;
        }
    }
    Ok(doomed)
}

fn put_settings(
    tx: &mut dyn KvWrite,
    scope: &Scope,
    name: &str,
    settings: &cloudpipe_types::FunctionSettings,
) -> Result<Option<FunctionMeta>> {
    let Some(entry) = name_entry(&*tx, name)?.filter(|e| scope.sees(&e.account)) else {
        return Ok(None);
    };
    put_json(tx, &key(SETTINGS, name.as_bytes()), settings)?;
    named(&*tx, name.to_string(), &entry)
}

fn insert_account(tx: &mut dyn KvWrite, account: &AccountRecord) -> Result<bool> {
    let k = key(ACCOUNTS, account.name.as_bytes());
    if tx.get(&k)?.is_some() {
        return Ok(false);
    }
    put_json(tx, &k, account)?;
    Ok(true)
}

fn update_account(tx: &mut dyn KvWrite, account: &AccountRecord) -> Result<bool> {
    let k = key(ACCOUNTS, account.name.as_bytes());
    if tx.get(&k)?.is_none() {
        return Ok(false);
    }
    put_json(tx, &k, account)?;
    Ok(true)
}

fn insert_key(tx: &mut dyn KvWrite, record: &KeyRecord) -> Result<bool> {
    if tx.get(&key(ACCOUNTS, record.account.as_bytes()))?.is_none() {
        return Ok(false);
    }
    put_json(tx, &key(KEYS, record.hash.as_bytes()), record)?;
    tx.put(&key(KEY_IDS, record.id.as_bytes()), record.hash.as_bytes())?;
    Ok(true)
}

fn delete_key(tx: &mut dyn KvWrite, id: &str) -> Result<Option<KeyRecord>> {
    let Some(hash) = tx.get(&key(KEY_IDS, id.as_bytes()))? else { return Ok(None) };
    let hkey = key(KEYS, &hash);
    let record = tx.get(&hkey)?.map(|b| serde_json::from_slice(&b)).transpose()?;
    tx.delete(&hkey)?;
    tx.delete(&key(KEY_IDS, id.as_bytes()))?;
    Ok(record)
}

// ---- reads ----

/// A job's record: the job without stdin and output.
fn get_record(r: &dyn KvRead, id: JobId) -> Result<Option<Job>> {
    r.get(&job_key(id))?.map(|b| decode_job(&b)).transpose()
}

/// A job with its output (not its stdin: only a claim, which runs it, reads that).
pub(crate) fn get_job(r: &dyn KvRead, id: JobId) -> Result<Option<Job>> {
    let Some(mut job) = get_record(r, id)? else { return Ok(None) };
    job.stdout = r.get(&data_key(id, STDOUT))?.unwrap_or_default();
    job.stderr = r.get(&data_key(id, STDERR))?.unwrap_or_default();
    Ok(Some(job))
}

pub(crate) fn job_by_idempotency_key(
    r: &dyn KvRead,
    account: &str,
    key: &str,
) -> Result<Option<Job>> {
    match r.get(&pair_key(IDEMPOTENCY, account, key))? {
        Some(id) => get_job(r, id_suffix(&id)?),
        None => Ok(None),
    }
}

/// The index ranges whose common ids are the jobs `filter` asks for (see the module
/// docs); the jobs table itself when nothing narrows the list.
fn filter_ranges(filter: &JobFilter) -> Vec<Vec<u8>> {
    let account = filter.account.as_deref().unwrap_or(EVERY_ACCOUNT);
    let mut ranges = Vec::new();
    if let Some(status) = filter.status {
        ranges.push(list_prefix(BY_STATUS, account, status.as_str()));
    }
    if let Some(batch) = &filter.batch {
        ranges.push(list_prefix(BY_BATCH, account, batch));
    }
    if let Some(tag) = &filter.tag {
        ranges.push(list_prefix(BY_TAG, account, tag));
    }
    if let Some(function) = &filter.function {
        ranges.push(list_prefix(BY_FUNCTION, account, function));
    }
    if ranges.is_empty() {
        ranges.push(match &filter.account {
            Some(account) => list_prefix(BY_CREATION, account, ""),
            None => vec![JOBS],
        });
    }
    ranges
}

/// The newest id of `range` below `bound` (`inclusive`: or equal to it; no bound: the
/// newest of all).
fn newest_below(
    r: &dyn KvRead,
    range: &[u8],
    bound: Option<JobId>,
    inclusive: bool,
) -> Result<Option<JobId>> {
    let after = bound.map(|id| {
        let mut k = range.to_vec();
        k.extend_from_slice(&id.to_bytes());
        if inclusive {
            // Just past `range id`, so that it is included.
            k.push(0);
        }
        k
    });
    r.scan(range, after.as_deref(), true, 1)?.pop().map(|(k, _)| id_suffix(&k)).transpose()
}

pub(crate) fn list_jobs(r: &dyn KvRead, filter: &JobFilter) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    if filter.limit == 0 {
        return Ok(out);
    }
    // Entries and records are written together, so every id found matches; the check
    // is a guard against a damaged index, not a filter.
    let mut push = |job: Option<Job>| {
        if let Some(job) = job.filter(|j| matches(filter, j)) {
            out.push(job);
        }
        out.len() == filter.limit
    };
    let ranges = filter_ranges(filter);
    if let [range] = ranges.as_slice() {
        let mut after = filter.before.map(|id| [range.as_slice(), &id.to_bytes()].concat());
        loop {
            let entries = r.scan(range, after.as_deref(), true, CHUNK)?;
            let Some((last, _)) = entries.last() else { break };
            after = Some(last.clone());
            for (k, v) in entries {
                let job = match range[..] {
                    [JOBS] => decode_job(&v)?,
                    _ => match get_record(r, id_suffix(&k)?)? {
                        Some(job) => job,
                        None => continue,
                    },
                };
                if push(Some(job)) {
                    return Ok(out);
                }
            }
        }
        return Ok(out);
    }
    // Several ranges: the newest id of the first that every other holds too, each
    // step seeking every range to at most the current candidate.
    let (first, others) = ranges.split_first().expect("at least one range");
    let mut candidate = newest_below(r, first, filter.before, false)?;
    'candidates: while let Some(id) = candidate {
        for range in others {
            match newest_below(r, range, Some(id), true)? {
                None => break 'candidates,
                Some(found) if found == id => {}
                Some(found) => {
                    candidate = newest_below(r, first, Some(found), true)?;
                    continue 'candidates;
                }
            }
        }
        if push(get_record(r, id)?) {
            break;
        }
        candidate = newest_below(r, first, Some(id), false)?;
    }
    Ok(out)
}

fn matches(filter: &JobFilter, job: &Job) -> bool {
    filter.account.as_ref().is_none_or(|a| *a == job.account)
        && filter.batch.as_ref().is_none_or(|b| job.batch.as_ref().is_some_and(|jb| jb.id == *b))
        && filter.status.is_none_or(|s| s == job.status)
        && filter.tag.as_ref().is_none_or(|t| job.tags.contains(t))
        && filter.function.as_ref().is_none_or(|f| *f == job.function || *f == job.function_id)
        && filter.node.as_ref().is_none_or(|n| job.node.as_ref() == Some(n))
}

/// Every status, with zero for those that have no job.
pub(crate) fn count_jobs(r: &dyn KvRead) -> Result<BTreeMap<JobStatus, u64>> {
    let mut counts = BTreeMap::new();
    for status in JobStatus::ALL {
        let n = r.get(&counter_key(status))?.map(|v| decode_u64(&v)).transpose()?.unwrap_or(0);
        counts.insert(status, n);
    }
    Ok(counts)
}

/// By name first (the returned `name` is that name, with its settings), then by id;
/// only what `scope` sees.
pub(crate) fn get_function(
    r: &dyn KvRead,
    scope: &Scope,
    name_or_id: &str,
) -> Result<Option<FunctionMeta>> {
    if let Some(entry) = name_entry(r, name_or_id)? {
        if !scope.sees(&entry.account) {
            return Ok(None);
        }
        return named(r, name_or_id.to_string(), &entry);
    }
    let account = match scope {
        Scope::Account(a) => a.clone(),
        Scope::All => match owners_of(r, name_or_id)?.into_iter().next() {
            Some(a) => a,
            None => return Ok(None),
        },
    };
    r.get(&pair_key(FUNCTIONS, &account, name_or_id))?.map(|b| decode_function(&b)).transpose()
}

/// The version a name points at, as seen through that name.
fn named(r: &dyn KvRead, name: String, entry: &NameEntry) -> Result<Option<FunctionMeta>> {
    let Some(bytes) = r.get(&pair_key(FUNCTIONS, &entry.account, &entry.id))? else {
        return Ok(None);
    };
    let mut meta = decode_function(&bytes)?;
    if let Some(bytes) = r.get(&key(SETTINGS, name.as_bytes()))? {
        meta.settings = serde_json::from_slice(&bytes).context("stored function settings")?;
    }
    meta.name = Some(name);
    Ok(Some(meta))
}

pub(crate) fn function_binary(r: &dyn KvRead, id: &str) -> Result<Option<Vec<u8>>> {
    r.get(&key(BINARIES, id.as_bytes()))
}

/// Each name visible in `scope` with the version it points at (`name` set to that
/// name), sorted by name.
pub(crate) fn list_functions(r: &dyn KvRead, scope: &Scope) -> Result<Vec<FunctionMeta>> {
    let mut out = Vec::new();
    for (name, entry) in names(r)? {
        if scope.sees(&entry.account)
            && let Some(meta) = named(r, name, &entry)?
        {
            out.push(meta);
        }
    }
    Ok(out)
}

pub(crate) fn function_bytes(r: &dyn KvRead, account: &str) -> Result<u64> {
    Ok(versions_of(r, account)?.iter().map(|m| m.size).sum())
}

pub(crate) fn get_account(r: &dyn KvRead, name: &str) -> Result<Option<AccountRecord>> {
    r.get(&key(ACCOUNTS, name.as_bytes()))?
        .map(|b| serde_json::from_slice(&b).context("stored account"))
        .transpose()
}

pub(crate) fn list_accounts(r: &dyn KvRead) -> Result<Vec<AccountRecord>> {
    scan_all(r, &[ACCOUNTS])?
        .iter()
        .map(|(_, v)| serde_json::from_slice(v).context("stored account"))
        .collect()
}

pub(crate) fn key_by_hash(r: &dyn KvRead, hash: &str) -> Result<Option<KeyRecord>> {
    r.get(&key(KEYS, hash.as_bytes()))?
        .map(|b| serde_json::from_slice(&b).context("stored key"))
        .transpose()
}

pub(crate) fn list_keys(r: &dyn KvRead, account: Option<&str>) -> Result<Vec<KeyRecord>> {
    let mut out = Vec::new();
    for (_, hash) in scan_all(r, &[KEY_IDS])? {
        if let Some(bytes) = r.get(&key(KEYS, &hash))? {
            let record: KeyRecord = serde_json::from_slice(&bytes).context("stored key")?;
            if account.is_none_or(|a| a == record.account) {
                out.push(record);
            }
        }
    }
    Ok(out)
}

/// Id and account of each queued and running job.
pub(crate) fn active_jobs(r: &dyn KvRead) -> Result<Vec<(JobId, String)>> {
    let mut out = Vec::new();
    for (k, _) in scan_all(r, &[QUEUE])? {
        let end = k.iter().position(|b| *b == 0).context("queue key without an account")?;
        let account = String::from_utf8(k[1..end].to_vec()).context("queue key account")?;
        out.push((id_suffix(&k)?, account));
    }
    for (k, _) in scan_all(r, &[RUNNING])? {
        if let Some(job) = get_record(r, id_suffix(&k)?)? {
            out.push((job.id, job.account));
        }
    }
    Ok(out)
}

/// Brings a store written by an older version to this layout, in one transaction at
/// open: list entries for every job, and the single queue split by account. Returns
/// whether there was anything to do.
pub(crate) fn upgrade(tx: &mut dyn KvWrite) -> Result<bool> {
    if tx.get(LIST_INDEX_VERSION)?.is_some() {
        return Ok(false);
    }
    let mut after: Option<Vec<u8>> = None;
    loop {
        let entries = tx.scan(&[JOBS], after.as_deref(), false, CHUNK)?;
        let Some((last, _)) = entries.last() else { break };
        after = Some(last.clone());
        for (_, v) in entries {
            let job = decode_job(&v)?;
            for k in list_entries(&job, false) {
                tx.put(&k, &[])?;
            }
        }
    }
    loop {
        let entries = tx.scan(&[LEGACY_QUEUE], None, false, CHUNK)?;
        if entries.is_empty() {
            break;
        }
        for (k, _) in entries {
            tx.delete(&k)?;
            if let Some(job) = get_record(&*tx, id_suffix(&k)?)?
                && job.status == JobStatus::Queued
            {
                tx.put(&queue_key(&job), &[])?;
            }
        }
    }
    tx.put(LIST_INDEX_VERSION, &[1])?;
    Ok(true)
}

// ---- secrets ----

/// A write to the secrets table.
#[derive(Debug)]
pub(crate) enum SecretOp {
    Put(Box<SecretRecord>, Option<u64>),
    Delete(String, String),
}

fn apply_secret(op: &SecretOp, tx: &mut dyn KvWrite) -> Result<Reply> {
    Ok(match op {
        SecretOp::Put(record, max) => Reply::Secret(put_secret(tx, record, *max)?),
        SecretOp::Delete(account, name) => {
            let k = pair_key(SECRETS, account, name);
            let found = tx.get(&k)?.is_some();
            if found {
                tx.delete(&k)?;
            }
            Reply::Done(found)
        }
    })
}

fn decode_secret(bytes: &[u8]) -> Result<SecretRecord> {
    serde_json::from_slice(bytes).context("stored secret")
}

fn put_secret(tx: &mut dyn KvWrite, record: &SecretRecord, max: Option<u64>) -> Result<PutSecret> {
    let k = pair_key(SECRETS, &record.account, &record.name);
    let mut stored = record.clone();
    match tx.get(&k)? {
        Some(old) => stored.created_at = decode_secret(&old)?.created_at,
        None => {
            if let Some(limit) = max
                && scan_all(&*tx, &pair_key(SECRETS, &record.account, ""))?.len() as u64 >= limit
            {
                return Ok(PutSecret::OverQuota { limit });
            }
        }
    }
    put_json(tx, &k, &stored)?;
    Ok(PutSecret::Stored(stored))
}

pub(crate) fn get_secret(
    r: &dyn KvRead,
    account: &str,
    name: &str,
) -> Result<Option<SecretRecord>> {
    r.get(&pair_key(SECRETS, account, name))?.map(|b| decode_secret(&b)).transpose()
}

pub(crate) fn list_secrets(r: &dyn KvRead, account: &str) -> Result<Vec<SecretRecord>> {
    scan_all(r, &pair_key(SECRETS, account, ""))?.iter().map(|(_, v)| decode_secret(v)).collect()
}
