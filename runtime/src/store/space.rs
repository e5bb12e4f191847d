//! A full disk loses nothing and stops nobody for good: [`SpaceGuard`] watches the free
//! space of the store's file system and turns new work away *before* the disk is full.
//!
//! An embedded engine that hits `ENOSPC` mid-commit may refuse every later call, reads
//! included, until it is reopened (redb does). So the store never lets it get there:
//! - writes that **admit** new work (a job, a function, a batch, an account, a key, a
//!   secret) are refused with [`StorageFull`] once the free space falls under the
//!   reserve; the API answers them 507 `storage_full` with `Retry-After`;
//! - writes that **finish** work already admitted (a job's outcome, a claim, a cancel,
//!   recovery) go on into the reserve, down to a quarter of it: running jobs finish and
//!   their results are kept (and retried, if even that floor is reached);
//! - retention's deletes always go through: they give space back.
//!
//! Reads never touch the guard. It looks at the file system at each group commit (one
//! `statvfs`, next to an fsync) and whenever asked ([`SpaceGuard::degraded`]), so the
//! store resumes by itself when space returns. Each change of state is logged once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::keyspace::WriteOp;

/// How much free space the store keeps for itself; plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceConfig {
    /// Under this many free bytes, new work is refused (0: never).
    pub reserve_bytes: u64,
}

impl Default for SpaceConfig {
    fn default() -> Self {
        SpaceConfig { reserve_bytes: 64 << 20 }
    }
}

/// A write refused because the store's disk is (nearly) full. Callers find it with
/// `anyhow::Error::downcast_ref`; the API answers it 507.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the server's disk is full ({free_mib} MiB free, under the {reserve_mib} MiB it keeps): \
     new work is refused until space returns; reads still work"
)]
pub struct StorageFull {
    pub free_mib: u64,
    pub reserve_mib: u64,
}

/// Watches one store's file system. One per store.
#[derive(Debug)]
pub struct SpaceGuard {
    dir: PathBuf,
    reserve: u64,
    /// New work is being refused (for logging each change once).
    full: AtomicBool,
}

/// Which way a write moves the store's size, for [`SpaceGuard::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteKind {
    /// Admits new work: refused under the reserve.
    Admit,
    /// Finishes admitted work: refused only under a quarter of the reserve.
    Finish,
    /// Gives space back: never refused.
    Free,
}

impl WriteKind {
    pub(crate) fn of(op: &WriteOp) -> WriteKind {
        match op {
            WriteOp::Purge { .. }
            | WriteOp::PurgeBatches { .. }
            | WriteOp::DeleteBatch(_)
            | WriteOp::DeleteKey(_)
            | WriteOp::DeleteFunction(..)
            | WriteOp::Secret(super::keyspace::SecretOp::Delete(..)) => WriteKind::Free,
            // A batch's record is written again when it stops: its outcome.
            WriteOp::PutBatch(_)
            | WriteOp::ClaimJobs { .. }
            | WriteOp::FinishJob { .. }
            | WriteOp::CancelQueued { .. }
            | WriteOp::Release { .. }
            | WriteOp::Recover { .. } => WriteKind::Finish,
            // A finished job written once (the fast path) is the outcome of work that
            // already ran: keep it if the floor allows.
            WriteOp::InsertJob(job) if job.status.is_terminal() => WriteKind::Finish,
            _ => WriteKind::Admit,
        }
    }
}

/// Free bytes of the file system holding `path` (for unprivileged users: root's own
/// reserve does not count).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid C string and `st` points to writable memory of the right
    // type, which statvfs fills when it returns 0.
    #[allow(unsafe_code)]
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        st.assume_init()
    };
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl SpaceGuard {
    pub fn new(dir: &Path, config: SpaceConfig) -> SpaceGuard {
        SpaceGuard {
            dir: dir.to_path_buf(),
            reserve: config.reserve_bytes,
            full: AtomicBool::new(false),
        }
    }

    /// Whether a write of `kind` may go ahead now.
    pub(crate) fn admit(&self, kind: WriteKind) -> Result<(), StorageFull> {
        if self.reserve == 0 || kind == WriteKind::Free {
            return Ok(());
        }
        let free = self.free();
        let low = free < self.reserve;
        self.note(low, free);
        let floor = match kind {
            WriteKind::Admit => self.reserve,
            _ => self.reserve / 4,
        };
        match free < floor {
            true => Err(self.error(free)),
            false => Ok(()),
        }
    }

    /// Why new work is refused now, if it is.
    pub fn degraded(&self) -> Option<StorageFull> {
        if self.reserve == 0 {
            return None;
        }
        let free = self.free();
        let low = free < self.reserve;
        self.note(low, free);
        low.then(|| self.error(free))
    }

    fn free(&self) -> u64 {
        // A file system that cannot be asked is not taken for a full one.
        free_bytes(&self.dir).unwrap_or(u64::MAX)
    }

    fn error(&self, free: u64) -> StorageFull {
        StorageFull { free_mib: free >> 20, reserve_mib: self.reserve.div_ceil(1 << 20) }
    }

    /// Logs each change of state once.
    fn note(&self, low: bool, free: u64) {
        if self.full.swap(low, Ordering::Relaxed) == low {
            return;
        }
        match low {
            true => tracing::warn!(
                dir = %self.dir.display(),
                free_mib = free >> 20,
                reserve_mib = self.reserve >> 20,
                "the store's disk is nearly full: new work is refused (507) until space returns; running jobs finish"
            ),
            false => tracing::info!(
                dir = %self.dir.display(),
                free_mib = free >> 20,
                "disk space is back: accepting new work again"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn admitting_writes_stop_at_the_reserve_finishing_ones_at_a_quarter_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        // A reserve just over the free space: new work is refused, finishing goes on.
        let g = SpaceGuard::new(dir.path(), SpaceConfig { reserve_bytes: free + (1 << 30) });
        assert!(g.admit(WriteKind::Admit).is_err());
        assert!(g.admit(WriteKind::Free).is_ok());
        let full = g.degraded().expect("degraded");
        assert!(full.to_string().contains("disk is full"), "{full}");
        // Finishing writes may use three quarters of the reserve.
        let g = SpaceGuard::new(dir.path(), SpaceConfig { reserve_bytes: free + free / 2 });
        assert!(g.admit(WriteKind::Admit).is_err());
        assert!(g.admit(WriteKind::Finish).is_ok());
        let g = SpaceGuard::new(dir.path(), SpaceConfig { reserve_bytes: 1 << 20 });
        assert!(g.admit(WriteKind::Admit).is_ok());
        assert!(g.degraded().is_none());
        let off = SpaceGuard::new(dir.path(), SpaceConfig { reserve_bytes: 0 });
        assert!(off.admit(WriteKind::Admit).is_ok() && off.degraded().is_none());
    }
}
