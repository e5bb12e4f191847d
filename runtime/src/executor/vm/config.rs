//! [`VmConfig`]: the vm executor's settings, plain data.

use std::path::PathBuf;

/// Settings of the vm executor; plain data.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The guest kernel; `None`: the newest `/boot/vmlinuz-*` (Debian's
    /// linux-image-amd64).
    pub kernel: Option<PathBuf>,
    /// A statically linked busybox (Debian's busybox-static): the guest's userland.
    pub busybox: PathBuf,
    /// The guest agent (`guest-runners/vm-agent`, a static binary): the `cloudpipe`
    /// binary carries one and writes it under its data directory; `None`: the executor
    /// is unavailable.
    pub agent: Option<PathBuf>,
    /// RAM of each VM, in MiB.
    pub memory_mb: u64,
    /// Restored clones kept ready.
    pub pool_size: usize,
    /// `tcg` or `kvm`; `None`: tcg (a `/dev/kvm` that opens may still fail to run a
    /// guest, as on nested hosts, so kvm is asked for, not guessed).
    pub accel: Option<String>,
    /// Where templates (initramfs and snapshot) are cached; servers may share it.
    /// `None`: `<run_dir>/templates`.
    pub snapshot_dir: Option<PathBuf>,
    /// Pidfiles and sockets of running VMs (set from the data directory).
    pub run_dir: PathBuf,
    /// Identifies this server's QEMU processes (set from the data directory).
    pub instance: String,
    /// `uid:gid` that clones run as once QEMU has set up, when the server runs as
    /// root (QEMU's `-runas`); a server that is not root runs them as itself.
    pub run_as: (u32, u32),
}

/// The ids clones run as by default when the server is root: a user of their own,
/// owning no file.
pub const DEFAULT_RUN_AS: (u32, u32) = (64_999, 64_999);

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            qemu: "qemu-system-x86_64".into(),
            kernel: None,
            busybox: "/bin/busybox".into(),
            agent: None,
            memory_mb: 128,
            pool_size: 2,
            accel: None,
            snapshot_dir: None,
            run_dir: std::env::temp_dir().join("cloudpipe-vm"),
            instance: "default".into(),
            run_as: DEFAULT_RUN_AS,
        }
    }
}

impl VmConfig {
    /// The accelerator asked for: `tcg` unless `kvm` was.
    pub(super) fn accel(&self) -> &str {
        self.accel.as_deref().unwrap_or("tcg")
    }

    /// The label on every QEMU process of this server (`-name`), by which the reaper
    /// finds them.
    pub(super) fn label(&self) -> String {
        format!("cloudpipe-vm-{}", self.instance)
    }

    /// An empty directory, read-only, that confined clones chroot into.
    pub(super) fn empty_dir(&self) -> anyhow::Result<PathBuf> {
        use anyhow::Context;
        use std::os::unix::fs::PermissionsExt;
        let dir = self.run_dir.join("empty");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555))?;
        Ok(dir)
    }

    /// Pidfiles, monitor sockets and logs of running VMs.
    pub(super) fn clones_dir(&self) -> PathBuf {
        // Unix socket paths are short (108 bytes): a deep data directory falls back
        // to the temporary directory.
        let dir = self.run_dir.join("clones");
        if dir.as_os_str().len() > 70 {
            std::env::temp_dir().join(format!("cloudpipe-vm-{}", self.instance))
        } else {
            dir
        }
    }

    /// Where templates are cached.
    pub(super) fn snapshot_dir(&self) -> PathBuf {
        self.snapshot_dir.clone().unwrap_or_else(|| self.run_dir.join("templates"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deep_run_dir_keeps_sockets_in_the_temporary_directory() {
        let short = VmConfig { run_dir: "/d".into(), ..VmConfig::default() };
        assert_eq!(short.clones_dir(), PathBuf::from("/d/clones"));
        let deep = VmConfig { run_dir: "/d".repeat(40).into(), ..VmConfig::default() };
        assert_eq!(deep.clones_dir(), std::env::temp_dir().join("cloudpipe-vm-default"));
        assert_eq!(short.snapshot_dir(), PathBuf::from("/d/templates"));
        assert_eq!(short.accel(), "tcg");
        assert_eq!(short.label(), "cloudpipe-vm-default");
    }
}
