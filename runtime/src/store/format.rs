//! The format version of an embedded store, and the upgrades from older formats.
//!
//! The version is one entry of the keyspace (`M format`, a big-endian u32). At open,
//! before any other access, [`upgrade`] reads it and, in one write transaction:
//! - a fresh store gets [`CURRENT`];
//! - an older format is rewritten to the current one (all or nothing: a crash midway
//!   leaves the old format, upgraded again at the next open);
//! - a newer format is refused with both versions named, so that a downgraded server
//!   never misreads data it does not know.
//!
//! | version | what changed |
//! | --- | --- |
//! | 0 | (no record) before accounts: `f id`, names `n name` → the bare id, `i key` |
//! | 1 | (no record) accounts: `f account 0 id`, owners `v`, names as JSON, `i account 0 key`; batches |
//! | 2 | the format record; the secrets table `x` |
//! | 3 | finished jobs by account `D` and their counts `C` (retention counts per account) |
//! | 4 | stdin and output apart from job records (`o` id stream), records are summaries |
//! | 5 | batch inputs apart from batch records (`I`), batches by account (`E`), open (`U`) and stopped (`F`) batches, counts per account (`G`) |
//!
//! Stores of versions 0 and 1 carry no record and are told apart by their keys.

use anyhow::{Context, bail};

use super::Result;
use super::keyspace::{key, pair_key, put_job};
use super::kv::{KvBackend, KvRead, KvWrite};
use crate::model::{ADMIN, Job};

/// The format this version of Cloudpipe writes.
pub const CURRENT: u32 = 5;

const META: u8 = b'M';
const FORMAT: &[u8] = b"format";

// Tables the upgrades rewrite (see the keyspace's table).
const FUNCTIONS: u8 = b'f';
const OWNERS: u8 = b'v';
const NAMES: u8 = b'n';
const IDEMPOTENCY: u8 = b'i';
const JOBS: u8 = b'j';

fn format_key() -> Vec<u8> {
    key(META, FORMAT)
}

/// The store's format version: the record, or what its keys say.
fn read_version(r: &dyn KvRead) -> Result<Option<u32>> {
    if let Some(v) = r.get(&format_key())? {
        let b: [u8; 4] =
            v.as_slice().try_into().context("the store's format record is not 4 bytes")?;
        return Ok(Some(u32::from_be_bytes(b)));
    }
    if r.scan(&[], None, false, 1)?.is_empty() {
        return Ok(None);
    }
    // Before accounts, function keys had no account and names held the bare id.
    let bare_function =
        r.scan(&[FUNCTIONS], None, false, 1)?.first().is_some_and(|(k, _)| !k.contains(&0));
    let bare_name =
        r.scan(&[NAMES], None, false, 1)?.first().is_some_and(|(_, v)| !v.starts_with(b"{"));
    Ok(Some(if bare_function || bare_name { 0 } else { 1 }))
}

/// Brings the store at `backend` to [`CURRENT`] (see the module docs). Runs once at
/// open, before the writer starts.
pub(super) fn upgrade<B: KvBackend>(backend: &B) -> Result<()> {
    let found = backend.read(read_version)?;
    match found {
        Some(v) if v == CURRENT => return Ok(()),
        Some(v) if v > CURRENT => bail!(
            "the store is in format {v}, newer than format {CURRENT} that this version of \
             Cloudpipe ({}) reads: run a newer Cloudpipe, or restore a backup made for this one",
            env!("CARGO_PKG_VERSION")
        ),
        _ => {}
    }
    backend.write(|tx| {
        // Read again inside the transaction: it is the one that counts.
        // The step from 0 skips what is in format 1 already, so it also runs on a store
        // whose keys looked like format 1: no guess of the sniffing can lose data.
        if read_version(&*tx)?.is_some_and(|v| v <= 1) {
            before_accounts_to_1(tx)?;
        }
        // Any store before format 3 with jobs; none in a fresh one.
        if read_version(&*tx)?.is_some_and(|v| v < 3) {
            super::keyspace::index_finished_by_account(tx)?;
        }
        if read_version(&*tx)?.is_none_or(|v| v <= 3) {
            job_data_apart_4(tx)?;
        }
        if read_version(&*tx)?.is_none_or(|v| v <= 4) {
            super::keyspace::inputs_apart_5(tx)?;
        }
        tx.put(&format_key(), &CURRENT.to_be_bytes())?;
        Ok(())
    })?;
    if let Some(v) = found {
        tracing::warn!(from = v, to = CURRENT, "upgraded the store's format");
    }
    Ok(())
}

/// Every entry under `prefix` (the stores being upgraded are read whole).
fn all(r: &dyn KvRead, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        let after = out.last().map(|(k, _)| k.clone());
        let chunk = r.scan(prefix, after.as_deref(), false, 1024)?;
        if chunk.is_empty() {
            return Ok(out);
        }
        out.extend(chunk);
    }
}

/// Format 0 → 1: whatever was stored before accounts is the admin's. Job records need
/// nothing (a record without `account` reads as the admin's).
fn before_accounts_to_1(tx: &mut dyn KvWrite) -> Result<()> {
    for (k, v) in all(&*tx, &[FUNCTIONS])? {
        if k.contains(&0) {
            continue;
        }
        let id = std::str::from_utf8(&k[1..]).context("a stored function id is not UTF-8")?;
        let mut meta: serde_json::Value =
            serde_json::from_slice(&v).context("decoding a stored function of format 0")?;
        meta["account"] = ADMIN.into();
        tx.put(&pair_key(FUNCTIONS, ADMIN, id), &serde_json::to_vec(&meta)?)?;
        tx.put(&pair_key(OWNERS, id, ADMIN), &[])?;
        tx.delete(&k)?;
    }
    for (k, v) in all(&*tx, &[NAMES])? {
        if v.starts_with(b"{") {
            continue;
        }
        let id = std::str::from_utf8(&v).context("a stored function name's id is not UTF-8")?;
        let entry = serde_json::json!({ "account": ADMIN, "id": id });
        tx.put(&k, &serde_json::to_vec(&entry)?)?;
    }
    for (k, v) in all(&*tx, &[IDEMPOTENCY])? {
        if k.contains(&0) {
            continue;
        }
        let idem = std::str::from_utf8(&k[1..]).context("a stored idempotency key is not UTF-8")?;
        tx.put(&pair_key(IDEMPOTENCY, ADMIN, idem), &v)?;
        tx.delete(&k)?;
    }
    Ok(())
}

/// Format 3 → 4: stdin and output move out of the job records to keys of their own,
/// so that lists read records without them.
fn job_data_apart_4(tx: &mut dyn KvWrite) -> Result<()> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = tx.scan(&[JOBS], after.as_deref(), false, 256)?;
        let Some((last, _)) = chunk.last() else { return Ok(()) };
        after = Some(last.clone());
        for (_, v) in chunk {
            let job: Job =
                serde_json::from_slice(&v).context("decoding a stored job of format 3")?;
            if !(job.stdin.is_empty() && job.stdout.is_empty() && job.stderr.is_empty()) {
                put_job(tx, &job, true)?;
            }
        }
    }
}

/// Writers of older formats, kept to test the upgrades (here and end to end): they
/// write what the Cloudpipe of that format wrote, byte for byte, without this
/// version's code.
pub mod legacy {
    use std::path::Path;

    use super::*;
    use crate::store::Backend;

    /// What a format-0 store holds: one named function and its binary, and jobs.
    #[derive(Debug, Clone)]
    pub struct Format0 {
        pub function_name: String,
        pub binary: Vec<u8>,
        /// Jobs as format 0 stored them (JSON without `account`, `container`, `batch`).
        pub jobs: Vec<serde_json::Value>,
    }

    impl Format0 {
        /// `name` → `binary`, and one queued job of it with the idempotency key `once`.
        pub fn with_function(name: &str, binary: Vec<u8>) -> Format0 {
            let id = function_id(&binary);
            let job = serde_json::json!({
                "id": crate::model::JobId::new().to_string(),
                "function": name, "function_id": id, "args": ["from-format-0"],
                "env": {"GREETING": "hi"}, "stdin": "", "tags": ["old"],
                "idempotency_key": "once", "timeout_ms": 10000, "memory_mb": 64,
                "max_attempts": 3, "executor": "wasm", "status": "queued", "attempts": 0,
                "created_at": crate::model::now_micros(), "started_at": null,
                "finished_at": null, "exit_code": null, "stdout": "", "stderr": "",
                "stdout_truncated": false, "stderr_truncated": false, "error": null
            });
            Format0 { function_name: name.into(), binary, jobs: vec![job] }
        }
    }

    /// `sha256:` and the hex digest, as function ids are.
    pub fn function_id(binary: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        format!("sha256:{}", hex::encode(Sha256::digest(binary)))
    }

    /// Writes `content` into a new store in `dir` as format 0 wrote it.
    pub fn write_format0(backend: Backend, dir: &Path, content: &Format0) -> Result<()> {
        with_raw(backend, dir, |tx| {
            let id = function_id(&content.binary);
            let meta = serde_json::json!({
                "id": id, "name": content.function_name, "kind": kind_of(&content.binary),
                "size": content.binary.len(), "created_at": crate::model::now_micros()
            });
            tx.put(&key(b'f', id.as_bytes()), &serde_json::to_vec(&meta)?)?;
            tx.put(&key(b'b', id.as_bytes()), &content.binary)?;
            tx.put(&key(b'n', content.function_name.as_bytes()), id.as_bytes())?;
            let mut queued = 0u64;
            for job in &content.jobs {
                let jid: crate::model::JobId =
                    job["id"].as_str().context("job id")?.parse().context("job id")?;
                tx.put(&key(b'j', &jid.to_bytes()), &serde_json::to_vec(job)?)?;
                let created = job["created_at"].as_u64().context("created_at")?;
                let mut q = created.to_be_bytes().to_vec();
                q.extend_from_slice(&jid.to_bytes());
                tx.put(&key(b'q', &q), &[])?;
                if let Some(k) = job["idempotency_key"].as_str() {
                    tx.put(&key(b'i', k.as_bytes()), &jid.to_bytes())?;
                }
                queued += 1;
            }
            // Counters: index 0 is `queued`.
            tx.put(&key(b'c', &[0]), &queued.to_be_bytes())?;
            Ok(())
        })
    }

    /// Turns the store in `dir`, written by this version and holding `jobs`, into the
    /// format-3 store that held them: format 3 differs from 4 only in that each job
    /// record held its stdin and output inline (as base64 in the JSON) and there were
    /// no `o` keys.
    pub fn inline_job_data(backend: Backend, dir: &Path, jobs: &[Job]) -> Result<()> {
        with_raw(backend, dir, |tx| {
            for job in jobs {
                let id = job.id.to_bytes();
                tx.put(&key(b'j', &id), &serde_json::to_vec(job)?)?;
                for stream in [b'i', b'o', b'e'] {
                    tx.delete(&[&[b'o'][..], &id, &[stream]].concat())?;
                }
            }
            tx.put(&format_key(), &3u32.to_be_bytes())
        })
    }

    /// A batch as format 4 stored it: one record holding its inputs inline, and no
    /// other key. Written into the store in `dir`, whose format record is set to 4.
    pub fn write_format4_batch(
        backend: Backend,
        dir: &Path,
        batch: &serde_json::Value,
    ) -> Result<()> {
        with_raw(backend, dir, |tx| {
            let id = batch["id"].as_str().context("batch id")?;
            tx.put(&key(b'B', id.as_bytes()), &serde_json::to_vec(batch)?)?;
            tx.put(&format_key(), &4u32.to_be_bytes())
        })
    }

    /// Sets the format record of the store in `dir` (a store "from the future").
    pub fn write_format_version(backend: Backend, dir: &Path, version: u32) -> Result<()> {
        with_raw(backend, dir, |tx| tx.put(&format_key(), &version.to_be_bytes()))
    }

    /// Turns the (current) store in `dir` into format 2: what format 2 wrote is
    /// format 3 without the finished entries by account and their counts. (Job data
    /// stays apart: the step to format 4 leaves such records as they are.)
    pub fn write_format2(backend: Backend, dir: &Path) -> Result<()> {
        use crate::store::keyspace::{FINISHED_BY_ACCOUNT, FINISHED_COUNTS};
        with_raw(backend, dir, |tx| {
            for table in [FINISHED_BY_ACCOUNT, FINISHED_COUNTS] {
                for (k, _) in super::all(&*tx, &[table])? {
                    tx.delete(&k)?;
                }
            }
            tx.put(&format_key(), &2u32.to_be_bytes())
        })
    }

    /// The kind format 0 recorded: a component is a `command`, a core module a `module`
    /// (told apart by the layer field of the preamble, 1 for components).
    fn kind_of(binary: &[u8]) -> &'static str {
        match binary.get(6) {
            Some(1) => "command",
            _ => "module",
        }
    }

    /// The backend opened without any upgrade, for one transaction.
    fn with_raw(
        backend: Backend,
        dir: &Path,
        f: impl FnOnce(&mut dyn KvWrite) -> Result<()>,
    ) -> Result<()> {
        match backend {
            Backend::Redb => crate::store::redb::RedbKv::open(dir)?.write(f),
            Backend::Sled => crate::store::sled::SledKv::open(dir)?.write(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::legacy::{Format0, write_format_version, write_format0, write_format2};
    use super::*;
    use crate::model::Scope;
    use crate::model::job::tests::queued_job;
    use crate::model::now_micros;
    use crate::store::{Backend, Inserted, open};

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    async fn format0_store_is_upgraded_and_owned_by_the_admin(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let old = Format0::with_function("hello", WASM.to_vec());
        write_format0(backend, dir.path(), &old).unwrap();
        let old_job = &old.jobs[0];
        let id = legacy::function_id(WASM);

        let store = open(backend, dir.path()).unwrap();
        let admin = Scope::Account(ADMIN.into());
        let f = store.get_function(&admin, "hello").await.unwrap().expect("the name survives");
        assert_eq!((f.account.as_str(), f.id.as_str()), (ADMIN, id.as_str()));
        let by_id = store.get_function(&admin, &id).await.unwrap().expect("the version survives");
        assert_eq!(by_id.account, ADMIN);
        assert_eq!(store.list_functions(&admin).await.unwrap().len(), 1);
        assert_eq!(store.function_bytes(ADMIN).await.unwrap(), WASM.len() as u64);
        assert_eq!(store.function_binary(&id).await.unwrap().as_deref(), Some(WASM));
        // Another account sees none of it.
        let other = Scope::Account("bob".into());
        assert!(store.get_function(&other, "hello").await.unwrap().is_none());

        // The job is the admin's, its idempotency key still holds, and it runs.
        let jid = old_job["id"].as_str().unwrap().parse().unwrap();
        let job = store.get_job(jid).await.unwrap().expect("the job survives");
        assert_eq!(job.account, ADMIN);
        assert_eq!(job.env["GREETING"], cloudpipe_types::EnvValue::from("hi"));
        let mut again = queued_job("hello");
        again.idempotency_key = Some("once".into());
        match store.insert_job(again).await.unwrap() {
            Inserted::Existing(j) => assert_eq!(j.id, jid),
            other => panic!("the old idempotency key was lost: {other:?}"),
        }
        let claimed = store.claim_jobs(10, now_micros()).await.unwrap();
        assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![jid]);
        drop(store);

        // Reopening finds the current format and changes nothing.
        let raw = match backend {
            Backend::Redb => {
                crate::store::redb::RedbKv::open(dir.path()).unwrap().read(read_version)
            }
            Backend::Sled => {
                crate::store::sled::SledKv::open(dir.path()).unwrap().read(read_version)
            }
        };
        assert_eq!(raw.unwrap(), Some(CURRENT));
        let store = open(backend, dir.path()).unwrap();
        assert_eq!(store.get_job(jid).await.unwrap().unwrap().account, ADMIN);
    }

    async fn a_newer_format_is_refused_naming_both_versions(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        drop(open(backend, dir.path()).unwrap());
        write_format_version(backend, dir.path(), CURRENT + 1).unwrap();
        let err = format!("{:#}", open(backend, dir.path()).err().expect("refused"));
        assert!(err.contains(&format!("format {}", CURRENT + 1)), "{err}");
        assert!(err.contains(&format!("format {CURRENT}")), "{err}");
    }

    async fn a_fresh_store_gets_the_current_format(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        drop(open(backend, dir.path()).unwrap());
        let raw = match backend {
            Backend::Redb => {
                crate::store::redb::RedbKv::open(dir.path()).unwrap().read(read_version)
            }
            Backend::Sled => {
                crate::store::sled::SledKv::open(dir.path()).unwrap().read(read_version)
            }
        };
        assert_eq!(raw.unwrap(), Some(CURRENT));
    }

    /// Reads the store in `dir` without opening it as a store (no upgrade).
    fn raw_read<T>(
        backend: Backend,
        dir: &std::path::Path,
        f: impl FnOnce(&dyn KvRead) -> Result<T>,
    ) -> T {
        match backend {
            Backend::Redb => crate::store::redb::RedbKv::open(dir).unwrap().read(f),
            Backend::Sled => crate::store::sled::SledKv::open(dir).unwrap().read(f),
        }
        .unwrap()
    }

    async fn format3_job_data_moves_out_of_the_records(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let mut queued = queued_job("f");
        queued.stdin = b"in\0put".to_vec();
        let mut done = queued_job("f");
        done.stdin = b"data".to_vec();
        done.status = cloudpipe_types::JobStatus::Succeeded;
        done.attempts = 1;
        done.started_at = Some(now_micros());
        done.finished_at = Some(now_micros());
        done.stdout = b"out\xff".to_vec();
        done.stderr = b"err".to_vec();
        let store = open(backend, dir.path()).unwrap();
        store.insert_job(queued.clone()).await.unwrap();
        store.insert_job(done.clone()).await.unwrap();
        drop(store);
        legacy::inline_job_data(backend, dir.path(), &[queued.clone(), done.clone()]).unwrap();
        let record = |id: crate::model::JobId| {
            move |r: &dyn KvRead| -> Result<Job> {
                let bytes = r.get(&key(JOBS, &id.to_bytes()))?.context("the record")?;
                Ok(serde_json::from_slice(&bytes)?)
            }
        };
        assert_eq!(raw_read(backend, dir.path(), read_version), Some(3));
        assert_eq!(raw_read(backend, dir.path(), record(done.id)).stdout, b"out\xff");

        let store = open(backend, dir.path()).unwrap();
        let got = store.get_job(done.id).await.unwrap().expect("the finished job survives");
        assert_eq!((got.stdout.as_slice(), got.stderr.as_slice()), (&b"out\xff"[..], &b"err"[..]));
        let listed =
            store.list_jobs(&crate::store::JobFilter { limit: 10, ..Default::default() }).await;
        let listed = listed.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|j| j.stdout.is_empty() && j.stdin.is_empty()), "{listed:?}");
        let claimed = store.claim_jobs(10, now_micros()).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].stdin, b"in\0put", "stdin survives the move");
        drop(store);

        assert_eq!(raw_read(backend, dir.path(), read_version), Some(CURRENT));
        let stored = raw_read(backend, dir.path(), record(done.id));
        assert!(stored.stdout.is_empty() && stored.stdin.is_empty(), "{stored:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redb_format3_job_data_moves_out_of_the_records() {
        format3_job_data_moves_out_of_the_records(Backend::Redb).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sled_format3_job_data_moves_out_of_the_records() {
        format3_job_data_moves_out_of_the_records(Backend::Sled).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redb_format0_store_is_upgraded_and_owned_by_the_admin() {
        format0_store_is_upgraded_and_owned_by_the_admin(Backend::Redb).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sled_format0_store_is_upgraded_and_owned_by_the_admin() {
        format0_store_is_upgraded_and_owned_by_the_admin(Backend::Sled).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn redb_newer_format_is_refused_naming_both_versions() {
        a_newer_format_is_refused_naming_both_versions(Backend::Redb).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sled_newer_format_is_refused_naming_both_versions() {
        a_newer_format_is_refused_naming_both_versions(Backend::Sled).await;
    }

    /// Format 2 → 3: finished jobs are counted per account, so that retention trims
    /// each account apart.
    async fn format2_store_counts_finished_jobs_per_account(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        {
            let store = open(backend, dir.path()).unwrap();
            for (i, account) in ["alice", "bob", "bob", "bob"].into_iter().enumerate() {
                let mut job = queued_job("f");
                job.account = account.into();
                store.insert_job(job.clone()).await.unwrap();
                store.claim_jobs(1, 10).await.unwrap();
                let outcome = crate::store::conformance::succeeded(b"");
                store.finish_job(job.id, outcome, 100 + i as u64).await.unwrap();
                ids.push(job.id);
            }
        }
        write_format2(backend, dir.path()).unwrap();
        let store = open(backend, dir.path()).unwrap();
        let keep =
            crate::store::Retention { max_age_micros: u64::MAX, max_finished_per_account: 1 };
        assert_eq!(store.purge_finished(keep, 1000, 10).await.unwrap(), 2);
        let kept: Vec<bool> = futures::future::join_all(ids.iter().map(|id| store.get_job(*id)))
            .await
            .into_iter()
            .map(|j| j.unwrap().is_some())
            .collect();
        assert_eq!(kept, [true, false, false, true]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn format2_stores_count_finished_jobs_per_account() {
        format2_store_counts_finished_jobs_per_account(Backend::Redb).await;
        format2_store_counts_finished_jobs_per_account(Backend::Sled).await;
    }

    /// Format 4 → 5: a batch's inputs move out of its record into chunks; it is
    /// indexed by account, counted, and found by a start-up while it runs.
    async fn format4_batch_inputs_move_out_of_the_record(backend: Backend) {
        use crate::store::{BATCH_CHUNK, BatchCaps, BatchFilter, CreateBatch};
        let dir = tempfile::tempdir().unwrap();
        drop(open(backend, dir.path()).unwrap());
        let n = BATCH_CHUNK + 3;
        let inputs: Vec<Vec<String>> = (0..n).map(|i| vec![format!("w{i}"), "x".into()]).collect();
        let id = crate::model::JobId::new().to_string();
        // As format 4 wrote it: the whole state, inputs inline.
        let old = serde_json::json!({
            "id": id, "account": "alice", "admin": false,
            "limits": {"max_concurrent_jobs": 5, "max_timeout_ms": null,
                       "max_memory_mb": null, "max_function_bytes": null},
            "allow_network": false, "template": {"function": "f", "args": ["a"]},
            "inputs": inputs, "split": 4, "retries": 1, "strikes": 0, "hook": null,
            "status": "running", "round": 0, "created_at": 7, "finished_at": null,
            "final_counts": null, "final_job_micros": 0, "hook_called": false
        });
        legacy::write_format4_batch(backend, dir.path(), &old).unwrap();
        assert_eq!(raw_read(backend, dir.path(), read_version), Some(4));

        let store = open(backend, dir.path()).unwrap();
        let b = store.get_batch(&id).await.unwrap().expect("the batch survives");
        assert_eq!((b.total, b.split, b.account.as_str()), (n as u64, 4, "alice"));
        assert_eq!(b.template.args, ["a"]);
        let all = store.batch_inputs(&id, 0, n).await.unwrap();
        assert_eq!(all, inputs, "every input, in order");
        let opened: Vec<String> =
            store.open_batches().await.unwrap().into_iter().map(|b| b.id).collect();
        assert_eq!(opened, [id.as_str()]);
        let alice = BatchFilter { account: Some("alice".into()), before: None, limit: 10 };
        assert_eq!(store.list_batches(&alice).await.unwrap().len(), 1);
        // Counted: a cap of one batch is reached.
        let caps = BatchCaps { max_batches: Some(1), max_inputs: None };
        let mut again = b.clone();
        again.id = crate::model::JobId::new().to_string();
        let refused = store.create_batch(again, vec![vec![]], caps).await.unwrap();
        assert_eq!(refused, CreateBatch::TooManyBatches { used: 1, limit: 1 });
        drop(store);
        assert_eq!(raw_read(backend, dir.path(), read_version), Some(CURRENT));
        let record = raw_read(backend, dir.path(), |r| {
            let bytes = r.get(&key(b'B', id.as_bytes()))?.context("the record")?;
            Ok(serde_json::from_slice::<serde_json::Value>(&bytes)?)
        });
        assert!(record.get("inputs").is_none(), "the record holds no inputs: {record}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn format4_batch_inputs_move_out_of_the_records() {
        format4_batch_inputs_move_out_of_the_record(Backend::Redb).await;
        format4_batch_inputs_move_out_of_the_record(Backend::Sled).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn fresh_stores_get_the_current_format() {
        a_fresh_store_gets_the_current_format(Backend::Redb).await;
        a_fresh_store_gets_the_current_format(Backend::Sled).await;
    }
}
