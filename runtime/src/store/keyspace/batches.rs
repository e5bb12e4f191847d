//! The batch tables of the keyspace (see the table in the parent module): records,
//! inputs in chunks, each account's batches and counts, open and stopped batches.

use anyhow::Context;

use super::super::kv::{KvRead, KvWrite};
use super::super::{BATCH_CHUNK, BatchCaps, BatchFilter, CreateBatch, Result};
use super::{CHUNK, decode_u64, key, pair_key, put_json, scan_all};
use crate::model::{BatchState, Micros};

pub(in crate::store) const BATCHES: u8 = b'B';
/// Inputs: `I` id 0 chunk(8) → a JSON array of up to [`BATCH_CHUNK`] inputs.
const INPUTS: u8 = b'I';
/// Each account's batches: `E` account 0 id → empty.
const BY_ACCOUNT: u8 = b'E';
/// Batches a start-up takes up (running, or a report hook still due): `U` id → empty.
const OPEN: u8 = b'U';
/// Stopped batches by when they stopped: `F` finished_at(8) id → empty (retention).
const STOPPED: u8 = b'F';
/// Each account's batch counts: `G` account → batches(8) inputs(8).
const COUNTS: u8 = b'G';

fn chunk_key(id: &str, chunk: u64) -> Vec<u8> {
    let mut k = pair_key(INPUTS, id, "");
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

fn stopped_key(at: Micros, id: &str) -> Vec<u8> {
    let mut k = vec![STOPPED];
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The index entries of a record that depend on its status.
fn status_entries(b: &BatchState) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    if b.is_open() {
        keys.push(key(OPEN, b.id.as_bytes()));
    }
    if let Some(at) = b.stopped_at() {
        keys.push(stopped_key(at, &b.id));
    }
    keys
}

fn counts(r: &dyn KvRead, account: &str) -> Result<(u64, u64)> {
    match r.get(&key(COUNTS, account.as_bytes()))? {
        None => Ok((0, 0)),
        Some(v) if v.len() == 16 => Ok((decode_u64(&v[..8])?, decode_u64(&v[8..])?)),
        Some(_) => anyhow::bail!("stored batch counts are not 16 bytes"),
    }
}

fn add_counts(tx: &mut dyn KvWrite, account: &str, batches: i64, inputs: i64) -> Result<()> {
    let (b, i) = counts(&*tx, account)?;
    let (b, i) = (b.saturating_add_signed(batches), i.saturating_add_signed(inputs));
    let k = key(COUNTS, account.as_bytes());
    match b {
        0 => tx.delete(&k),
        _ => tx.put(&k, &[b.to_be_bytes(), i.to_be_bytes()].concat()),
    }
}

/// Writes a batch's inputs in chunks and its indexes and counts (its record is
/// written by the caller). Also the format upgrade's step for stored batches.
pub(in crate::store) fn store_inputs_and_index(
    tx: &mut dyn KvWrite,
    b: &BatchState,
    inputs: &[Vec<String>],
) -> Result<()> {
    for (n, chunk) in inputs.chunks(BATCH_CHUNK).enumerate() {
        put_json(tx, &chunk_key(&b.id, n as u64), &chunk)?;
    }
    tx.put(&pair_key(BY_ACCOUNT, &b.account, &b.id), &[])?;
    for k in status_entries(b) {
        tx.put(&k, &[])?;
    }
    add_counts(tx, &b.account, 1, inputs.len() as i64)
}

pub(super) fn create_batch(
    tx: &mut dyn KvWrite,
    b: &BatchState,
    inputs: &[Vec<String>],
    caps: BatchCaps,
) -> Result<CreateBatch> {
    let (batches, stored) = counts(&*tx, &b.account)?;
    if let Some(limit) = caps.max_batches
        && batches >= limit
    {
        return Ok(CreateBatch::TooManyBatches { used: batches, limit });
    }
    if let Some(limit) = caps.max_inputs
        && stored.saturating_add(inputs.len() as u64) > limit
    {
        return Ok(CreateBatch::TooManyInputs { used: stored, limit });
    }
    let rkey = key(BATCHES, b.id.as_bytes());
    if tx.get(&rkey)?.is_some() {
        anyhow::bail!("batch {:?} exists already", b.id);
    }
    let mut record = b.clone();
    record.total = inputs.len() as u64;
    put_json(tx, &rkey, &record)?;
    store_inputs_and_index(tx, &record, inputs)?;
    Ok(CreateBatch::Created)
}

pub(super) fn put_batch(tx: &mut dyn KvWrite, b: &BatchState) -> Result<bool> {
    let rkey = key(BATCHES, b.id.as_bytes());
    let Some(old) = get_batch(&*tx, &b.id)? else { return Ok(false) };
    let mut record = b.clone();
    record.account = old.account.clone();
    record.total = old.total;
    for k in status_entries(&old) {
        tx.delete(&k)?;
    }
    for k in status_entries(&record) {
        tx.put(&k, &[])?;
    }
    put_json(tx, &rkey, &record)?;
    Ok(true)
}

pub(super) fn delete_batch(tx: &mut dyn KvWrite, id: &str) -> Result<Option<BatchState>> {
    let Some(b) = get_batch(&*tx, id)? else { return Ok(None) };
    tx.delete(&key(BATCHES, id.as_bytes()))?;
    for n in 0..b.total.div_ceil(BATCH_CHUNK as u64) {
        tx.delete(&chunk_key(id, n))?;
    }
    tx.delete(&pair_key(BY_ACCOUNT, &b.account, id))?;
    for k in status_entries(&b) {
        tx.delete(&k)?;
    }
    add_counts(tx, &b.account, -1, -(b.total as i64))?;
    Ok(Some(b))
}

pub(super) fn purge_batches(
    tx: &mut dyn KvWrite,
    max_age: u64,
    now: Micros,
    max_batch: usize,
) -> Result<usize> {
    let mut purged = 0;
    for (k, _) in tx.scan(&[STOPPED], None, false, max_batch)? {
        let at = decode_u64(k.get(1..9).context("stopped batch key too short")?)?;
        if now.saturating_sub(at) <= max_age {
            // Oldest first: every later one is kept too.
            break;
        }
        let id = std::str::from_utf8(&k[9..]).context("stored batch id")?.to_string();
        // The entry goes even if its record is gone (never, unless the file was
        // edited), rather than stop retention.
        tx.delete(&k)?;
        delete_batch(tx, &id)?;
        purged += 1;
    }
    Ok(purged)
}

pub(crate) fn get_batch(r: &dyn KvRead, id: &str) -> Result<Option<BatchState>> {
    r.get(&key(BATCHES, id.as_bytes()))?
        .map(|b| serde_json::from_slice(&b).context("stored batch"))
        .transpose()
}

pub(crate) fn batch_inputs(
    r: &dyn KvRead,
    id: &str,
    start: u64,
    count: usize,
) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::with_capacity(count.min(BATCH_CHUNK));
    let chunk = BATCH_CHUNK as u64;
    let mut at = start;
    while out.len() < count {
        let Some(bytes) = r.get(&chunk_key(id, at / chunk))? else { break };
        let inputs: Vec<Vec<String>> =
            serde_json::from_slice(&bytes).context("stored batch inputs")?;
        let from = (at % chunk) as usize;
        if from >= inputs.len() {
            break;
        }
        let take = (count - out.len()).min(inputs.len() - from);
        out.extend(inputs.into_iter().skip(from).take(take));
        at += take as u64;
    }
    Ok(out)
}

pub(crate) fn list_batches(r: &dyn KvRead, filter: &BatchFilter) -> Result<Vec<BatchState>> {
    let prefix = match &filter.account {
        Some(a) => pair_key(BY_ACCOUNT, a, ""),
        None => vec![BATCHES],
    };
    let mut out = Vec::new();
    let mut after = filter.before.as_ref().map(|id| [prefix.as_slice(), id.as_bytes()].concat());
    while out.len() < filter.limit {
        let entries = r.scan(&prefix, after.as_deref(), true, CHUNK.min(filter.limit))?;
        let Some((last, _)) = entries.last() else { break };
        after = Some(last.clone());
        for (k, v) in entries {
            let b = match filter.account {
                None => serde_json::from_slice(&v).context("stored batch")?,
                Some(_) => {
                    let id = std::str::from_utf8(&k[prefix.len()..]).context("stored batch id")?;
                    match get_batch(r, id)? {
                        Some(b) => b,
                        None => continue,
                    }
                }
            };
            out.push(b);
            if out.len() == filter.limit {
                break;
            }
        }
    }
    Ok(out)
}

pub(crate) fn open_batches(r: &dyn KvRead) -> Result<Vec<BatchState>> {
    let mut out = Vec::new();
    for (k, _) in scan_all(r, &[OPEN])? {
        let id = std::str::from_utf8(&k[1..]).context("stored batch id")?;
        out.extend(get_batch(r, id)?);
    }
    Ok(out)
}

/// Format 4 → 5: each batch's inputs move out of its record into chunks, and its
/// indexes and counts are built.
pub(in crate::store) fn inputs_apart_5(tx: &mut dyn KvWrite) -> Result<()> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let entries = tx.scan(&[BATCHES], after.as_deref(), false, CHUNK)?;
        let Some((last, _)) = entries.last() else { return Ok(()) };
        after = Some(last.clone());
        for (k, v) in entries {
            let mut record: serde_json::Value =
                serde_json::from_slice(&v).context("decoding a stored batch of format 4")?;
            // A record without inputs is in this format already (a store some test
            // turned back to an older format): it is indexed already.
            let Some(inputs) = record.get_mut("inputs").map(|v| v.take()) else { continue };
            let inputs: Vec<Vec<String>> =
                serde_json::from_value(inputs).context("a batch's inputs")?;
            if let Some(fields) = record.as_object_mut() {
                fields.remove("inputs");
                fields.insert("total".into(), inputs.len().into());
            }
            let b: BatchState =
                serde_json::from_value(record).context("decoding a stored batch of format 4")?;
            tx.put(&k, &serde_json::to_vec(&b)?)?;
            store_inputs_and_index(tx, &b, &inputs)?;
        }
    }
}
