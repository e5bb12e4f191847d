//! The sled backend (sled 0.34.7), made durable by an fdatasync after each flush.
//!
//! Each group of writes is gathered in memory on top of the tree (its reads see its own
//! writes), then applied as one atomic [`sled::Batch`], flushed, and synced:
//!
//! - sled 0.34.7's `flush()` writes its log with `pwrite` and `sync_file_range` only
//!   (sled issue #1452). `sync_file_range` neither flushes the drive's write cache nor
//!   persists the file's size when the log grew, so a power cut can lose a write that
//!   `flush()` reported done. We `sync_data()` the log file (`db`) after each flush.
//! - Values too large for a log segment (over 128 KiB by default, e.g. function
//!   binaries) go to files under `blobs/`, which sled writes without any sync at all.
//!   After each flush we sync every blob file we have not synced yet, and the `blobs`
//!   directory so that their names survive too.
//!
//! Snapshots (`snap.*`) and `conf` are synced by sled itself.
//!
//! Only the writer thread writes, so reads taken outside the batch are consistent with
//! it. Readers, however, see a group's writes from the moment the batch is applied,
//! a sync before its writers are answered; and a scan is not a snapshot. If a flush or
//! sync fails, the tree in memory may hold writes that are not on disk, so the store
//! refuses every later write until it is reopened (as PostgreSQL does on a failed
//! fsync: retrying one cannot tell what reached the disk).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::iter::Peekable;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

use anyhow::{Context, bail};

use super::Result;
use super::kv::{Entry, KvBackend, KvRead, KvStore, KvWrite, scan_bounds};

/// Values at least this long may be written as blob files. sled's own threshold is
/// far higher (a fraction of its 512 KiB segments); erring low costs only a listing.
const BLOB_HINT: usize = 16 << 10;

/// The store on sled. One per process: sled locks its directory.
pub type SledStore = KvStore<SledKv>;

impl SledStore {
    /// Opens (creating if needed) the sled database in `dir/sled` and starts the writer
    /// thread. (sled cannot be compacted; its file grows under churn.)
    pub fn open(dir: &Path) -> Result<SledStore> {
        KvStore::new(SledKv::open(dir)?)
    }
}

/// The sled database of a [`SledStore`] and the files it must sync.
pub struct SledKv {
    db: sled::Db,
    path: PathBuf,
    /// sled's log: every tree page and small value.
    log: File,
    /// Names of the files in `blobs/` that are known to be synced.
    synced_blobs: Mutex<HashSet<OsString>>,
    /// A flush or sync failed: writes are refused (see the module docs).
    poisoned: AtomicBool,
}

impl SledKv {
    pub(crate) fn open(dir: &Path) -> Result<SledKv> {
        let path = dir.join("sled");
        let config = sled::Config::new().path(&path).cache_capacity(super::CACHE_BYTES as u64);
        // The directory's lock may still be held for a moment by a store of this
        // process just dropped: sled's flusher thread lets go of the database last.
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if tries < 40 && e.to_string().contains("could not acquire lock") =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other.with_context(|| format!("opening {}", path.display()))?,
            }
        };
        let log_path = path.join("db");
        let log = File::open(&log_path)
            .with_context(|| format!("opening {} to sync it", log_path.display()))?;
        let kv = SledKv {
            db,
            path,
            log,
            synced_blobs: Mutex::new(HashSet::new()),
            poisoned: AtomicBool::new(false),
        };
        // What a previous process wrote may not have been synced (it may have died
        // between its flush and its sync): sync it all once, names included.
        kv.log.sync_all()?;
        kv.sync_new_blobs()?;
        File::open(&kv.path)?.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(kv)
    }

    /// Flushes sled and syncs what its flush leaves unsynced.
    fn sync(&self, may_blob: bool) -> Result<()> {
        self.db.flush().context("flushing sled")?;
        self.log.sync_data().context("syncing sled's log")?;
        if may_blob { self.sync_new_blobs() } else { Ok(()) }
    }

    fn sync_new_blobs(&self) -> Result<()> {
        let blobs = self.path.join("blobs");
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut present = HashSet::with_capacity(synced.len());
        let mut any_new = false;
        for entry in
            std::fs::read_dir(&blobs).with_context(|| format!("listing {}", blobs.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                // A blob that sled removed meanwhile needs no sync.
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data().with_context(|| format!("syncing blob {:?}", name))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                any_new = true;
            }
            present.insert(name);
        }
        if any_new {
            File::open(&blobs)?.sync_all().context("syncing sled's blob directory")?;
        }
        *synced = present;
        Ok(())
    }
}

impl KvBackend for SledKv {
    fn name(&self) -> &'static str {
        "sled"
    }

    fn read<T>(&self, f: impl FnOnce(&dyn KvRead) -> Result<T>) -> Result<T> {
        f(&Overlay { tree: &self.db, writes: BTreeMap::new() })
    }

    fn write<T>(&self, f: impl FnOnce(&mut dyn KvWrite) -> Result<T>) -> Result<T> {
        if self.poisoned.load(AtomicOrdering::SeqCst) {
            bail!("sled store refuses writes after a failed sync; restart the server");
        }
        let mut overlay = Overlay { tree: &self.db, writes: BTreeMap::new() };
        let out = f(&mut overlay)?;
        if overlay.writes.is_empty() {
            // Nothing to write (a claim of an empty queue, a finish that missed): what
            // the group read was made durable before earlier writers were answered.
            return Ok(out);
        }
        // Only a large value can become a blob file: skip listing `blobs/` otherwise.
        let may_blob = overlay.writes.values().flatten().any(|v| v.len() >= BLOB_HINT);
        let mut batch = sled::Batch::default();
        for (k, v) in overlay.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        let applied = self.db.apply_batch(batch).context("applying a batch to sled");
        if let Err(e) = applied.and_then(|()| self.sync(may_blob)) {
            self.poisoned.store(true, AtomicOrdering::SeqCst);
            return Err(e);
        }
        Ok(out)
    }
}

/// The writes of a group (`None`: deleted) over the tree they will be applied to.
struct Overlay<'a> {
    tree: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl KvRead for Overlay<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let bounds = scan_bounds(prefix, after, reverse);
        let tree = self.tree.range::<Vec<u8>, _>(bounds.clone());
        let writes = self.writes.range(bounds);
        if reverse {
            merge(tree.rev().peekable(), writes.rev().peekable(), true, limit)
        } else {
            merge(tree.peekable(), writes.peekable(), false, limit)
        }
    }
}

/// Merges the tree's entries with the group's writes, which win on equal keys.
fn merge<'w>(
    mut tree: Peekable<impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>>,
    mut writes: Peekable<impl Iterator<Item = (&'w Vec<u8>, &'w Option<Vec<u8>>)>>,
    reverse: bool,
    limit: usize,
) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    while out.len() < limit {
        let order = match (tree.peek(), writes.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) => {
                tree.next().transpose()?;
                unreachable!("peeked an error");
            }
            (Some(Ok(_)), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(Ok((tk, _))), Some((wk, _))) => {
                let o = tk.as_ref().cmp(wk.as_slice());
                if reverse { o.reverse() } else { o }
            }
        };
        if order != Ordering::Greater {
            let (k, v) = tree.next().transpose()?.expect("peeked an entry");
            if order == Ordering::Less {
                out.push((k.to_vec(), v.to_vec()));
                continue;
            }
        }
        let (k, v) = writes.next().expect("peeked a write");
        if let Some(v) = v {
            out.push((k.clone(), v.clone()));
        }
    }
    Ok(out)
}

impl KvWrite for Overlay<'_> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.writes.insert(key.to_vec(), None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    crate::store::conformance::suite!(sled, crate::store::sled::SledStore::open, None);
}
