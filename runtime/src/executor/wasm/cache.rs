//! Where compiled functions are kept: on disk (`*.cwasm`, survives restarts) and in
//! memory (a bounded map of ready-to-instantiate functions).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::Engine;

/// Compiled artefacts in one directory, one file per function version and engine:
/// `<sha256 hex>-<engine hash>.cwasm`. The engine hash
/// ([`Engine::precompile_compatibility_hash`]) changes with the wasmtime version and
/// the settings that shape compiled code, so a stale artefact is never loaded: it is
/// just not found, and the function is compiled again.
#[derive(Debug)]
pub(super) struct DiskCache {
    dir: PathBuf,
    engine_key: String,
}

impl DiskCache {
    pub(super) fn open(dir: &Path, engine: &Engine) -> anyhow::Result<DiskCache> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let digest = hasher.0.finalize();
        Ok(DiskCache { dir: dir.to_path_buf(), engine_key: hex::encode(&digest[..8]) })
    }

    /// The artefact's path for function version `id` (`sha256:<hex>`).
    pub(super) fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{}-{}.cwasm", file_key(id), self.engine_key))
    }

    /// Writes an artefact atomically: a temporary file in the same directory, synced,
    /// then renamed over the final name. A crash leaves either no file or a whole one.
    pub(super) fn write(&self, id: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.path(id);
        let mut tmp = tempfile_in(&self.dir)?;
        tmp.1
            .write_all(bytes)
            .and_then(|()| tmp.1.sync_all())
            .with_context(|| format!("writing {}", tmp.0.display()))?;
        drop(tmp.1);
        std::fs::rename(&tmp.0, &path)
            .with_context(|| format!("renaming to {}", path.display()))
            .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp.0);
        })?;
        Ok(())
    }

    /// Removes an artefact that could not be loaded, so it is compiled again.
    pub(super) fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.path(id));
    }
}

/// A new file `.<random>.tmp` in `dir`.
fn tempfile_in(dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    for _ in 0..8 {
        let path = dir.join(format!(".{}.tmp", uuid::Uuid::now_v7().simple()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    anyhow::bail!("could not create a temporary file in {}", dir.display())
}

/// The file-name part of an id: its hex digest when it is `sha256:<hex>` (the only
/// form the registry makes), else the hex of the id's sha256, so that any id is a safe
/// file name.
fn file_key(id: &str) -> String {
    match id.strip_prefix("sha256:") {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            hex.to_ascii_lowercase()
        }
        _ => hex::encode(Sha256::digest(id.as_bytes())),
    }
}

/// Feeds `Hash` into sha256: unlike `DefaultHasher`, stable across processes.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        unreachable!("only the digest is used")
    }
}

/// The ready-to-instantiate functions kept in memory, at most `capacity`; the least
/// recently used goes first.
pub(super) struct WarmMap<V> {
    entries: HashMap<String, (V, u64)>,
    clock: u64,
    capacity: usize,
}

impl<V: Clone> WarmMap<V> {
    pub(super) fn new(capacity: usize) -> WarmMap<V> {
        WarmMap { entries: HashMap::new(), clock: 0, capacity: capacity.max(1) }
    }

    pub(super) fn get(&mut self, id: &str) -> Option<V> {
        self.clock += 1;
        let (value, used) = self.entries.get_mut(id)?;
        *used = self.clock;
        Some(value.clone())
    }

    pub(super) fn insert(&mut self, id: &str, value: V) {
        self.clock += 1;
        if self.entries.len() >= self.capacity && !self.entries.contains_key(id) {
            // O(n), but only when a function becomes warm, which compiles or loads it.
            if let Some(oldest) =
                self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(id.to_string(), (value, self.clock));
    }

    pub(super) fn remove(&mut self, id: &str) {
        self.entries.remove(id);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_map_evicts_the_least_recently_used() {
        let mut warm = WarmMap::new(2);
        warm.insert("a", 1);
        warm.insert("b", 2);
        assert_eq!(warm.get("a"), Some(1));
        warm.insert("c", 3);
        assert_eq!(warm.get("b"), None);
        assert_eq!(warm.get("a"), Some(1));
        assert_eq!(warm.get("c"), Some(3));
        assert_eq!(warm.len(), 2);
    }

    #[test]
    fn file_keys_are_safe_names() {
        let hex = "ab".repeat(32);
        assert_eq!(file_key(&format!("sha256:{hex}")), hex);
        let odd = file_key("../../etc/passwd");
        assert_eq!(odd.len(), 64);
        assert!(odd.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn artefacts_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = DiskCache::open(dir.path(), &engine).unwrap();
        cache.write("sha256:00", b"compiled").unwrap();
        assert_eq!(std::fs::read(cache.path("sha256:00")).unwrap(), b"compiled");
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }
}
