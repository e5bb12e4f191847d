//! The redb backend, the default: one file, `Durability::Immediate` (one fdatasync per
//! commit, and commits are shared by concurrent writes), compacted at open so that the
//! file stays near the size of the live data.

use std::ops::Bound;
use std::path::Path;

use anyhow::Context;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::Result;
use super::kv::{Entry, KvBackend, KvRead, KvStore, KvWrite, scan_bounds};

/// The whole keyspace in one table (see the `keyspace` module for its layout).
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("cloudpipe");

/// The file in the data directory.
const FILE: &str = "cloudpipe.redb";

/// The store on redb. One per process: it holds the file lock.
pub type RedbStore = KvStore<RedbKv>;

impl RedbStore {
    /// Opens (creating if needed) `dir/cloudpipe.redb`, repairs it if the last process
    /// did not close it, compacts it and starts the writer thread.
    pub fn open(dir: &Path) -> Result<RedbStore> {
        KvStore::new(RedbKv::open(dir)?)
    }
}

/// The redb database of a [`RedbStore`].
pub struct RedbKv {
    db: Database,
}

impl RedbKv {
    pub(crate) fn open(dir: &Path) -> Result<RedbKv> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(FILE);
        let mut db = Database::builder()
            .set_cache_size(super::CACHE_BYTES)
            .create(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Retention deletes in small batches; without compaction the file would keep
        // the size of its high-water mark forever.
        db.compact().with_context(|| format!("compacting {}", path.display()))?;
        // Create the table, so that read transactions always find it.
        let tx = db.begin_write()?;
        tx.open_table(TABLE)?;
        tx.commit()?;
        Ok(RedbKv { db })
    }
}

impl KvBackend for RedbKv {
    fn name(&self) -> &'static str {
        "redb"
    }

    fn read<T>(&self, f: impl FnOnce(&dyn KvRead) -> Result<T>) -> Result<T> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(TABLE)?;
        f(&Tx { table, dirty: false })
    }

    fn write<T>(&self, f: impl FnOnce(&mut dyn KvWrite) -> Result<T>) -> Result<T> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let (out, dirty) = {
            let mut table = Tx { table: tx.open_table(TABLE)?, dirty: false };
            // On error the transaction is dropped, which aborts it.
            let out = f(&mut table)?;
            (out, table.dirty)
        };
        if dirty {
            tx.commit().context("committing to redb")?;
        } else {
            // Nothing written (a claim of an empty queue, a finish that missed): spare
            // the sync. What the group read was committed before it began.
            tx.abort()?;
        }
        Ok(out)
    }
}

/// A table of a read or write transaction.
struct Tx<T> {
    table: T,
    /// Something was written.
    dirty: bool,
}

impl<T: ReadableTable<&'static [u8], &'static [u8]>> KvRead for Tx<T> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.table.get(key)?.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let (lo, hi) = scan_bounds(prefix, after, reverse);
        let range = self.table.range::<&[u8]>((as_slice(&lo), as_slice(&hi)))?;
        let entry = |item: Result<_, redb::StorageError>| -> Result<Entry> {
            let (k, v): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) = item?;
            Ok((k.value().to_vec(), v.value().to_vec()))
        };
        if reverse {
            range.rev().take(limit).map(entry).collect()
        } else {
            range.take(limit).map(entry).collect()
        }
    }
}

fn as_slice(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    b.as_ref().map(Vec::as_slice)
}

impl KvWrite for Tx<redb::Table<'_, &'static [u8], &'static [u8]>> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.dirty = true;
        self.table.insert(key, value)?;
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.dirty = true;
        self.table.remove(key)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    crate::store::conformance::suite!(redb, crate::store::redb::RedbStore::open, Some(4.0));
}
