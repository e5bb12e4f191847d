//! The template: checking that QEMU, a kernel, busybox and the agent are here, the
//! QEMU command line every VM shares ([`qemu_args`]), and booting the template once to
//! a ready agent and snapshotting it (cached on disk by a hash of what went in).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::clone::{Vm, shell_quote};
use super::initramfs::initramfs;
use super::{BOOT_TIMEOUT, Inner, VmConfig};
use crate::executor::Unready;

/// A booted-and-snapshotted template: how to start QEMU and where its state is.
#[derive(Debug)]
pub(super) struct Template {
    /// QEMU's arguments shared by the template and every clone.
    pub args: Vec<String>,
    pub snapshot: PathBuf,
    /// How long the template took to boot to a ready agent (zero when cached).
    pub boot_time: Duration,
}

/// QEMU's command line shared by the template and every clone (each VM adds its
/// label, pidfile and monitor; a clone adds `-S -incoming`). Everything that shapes
/// the VM is here, and it all goes into the snapshot's cache key.
fn qemu_args(config: &VmConfig, kernel: &Path, initramfs: &Path) -> Vec<String> {
    let accel = config.accel();
    vec![
        "-accel".into(),
        accel.into(),
        "-M".into(),
        "pc".into(),
        "-cpu".into(),
        if accel == "kvm" { "host" } else { "qemu64" }.into(),
        "-m".into(),
        config.memory_mb.to_string(),
        "-smp".into(),
        "1".into(),
        "-display".into(),
        "none".into(),
        // A guest that reboots (a kernel panic) ends its QEMU instead of booting again.
        "-no-reboot".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initramfs.display().to_string(),
        "-append".into(),
        // init_on_free: freed pages are zero, so the snapshot is smaller.
        "quiet panic=-1 console=ttyS1 init_on_free=1 rdinit=/init".into(),
        "-chardev".into(),
        "stdio,id=agent,signal=off".into(),
        "-serial".into(),
        "chardev:agent".into(),
    ]
}

/// The configured kernel, else the newest in `/boot`; `Err` says what is missing.
fn kernel(config: &VmConfig) -> Result<PathBuf, String> {
    if let Some(k) = &config.kernel {
        return Ok(k.clone());
    }
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map_err(|e| format!("reading /boot: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    kernels.sort();
    kernels.pop().ok_or_else(|| "no kernel in /boot".to_string())
}

/// Whether everything a template needs is here; `Err` names what is missing and the
/// packages (or the setting) that bring it, all of them at once.
pub(super) fn check(config: &VmConfig) -> Result<(), Unready> {
    let mut missing = Vec::new();
    let mut packages = Vec::new();
    let runs = std::process::Command::new(&config.qemu)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !runs {
        missing.push(format!("{} does not run", config.qemu.display()));
        packages.push("qemu-system-x86");
    }
    match kernel(config) {
        Ok(k) if std::fs::File::open(&k).is_ok() => {}
        Ok(k) => {
            missing.push(format!("cannot read the kernel {}", k.display()));
            packages.push("linux-image-amd64");
        }
        Err(e) => {
            missing.push(e);
            packages.push("linux-image-amd64");
        }
    }
    if !config.busybox.is_file() {
        missing.push(format!("{} is missing", config.busybox.display()));
        packages.push("busybox-static");
    }
    if !packages.is_empty() {
        return Err(Unready::new(
            missing.join("; "),
            format!("apt-get install -y {}", packages.join(" ")),
        ));
    }
    match &config.agent {
        None => Err(Unready::new(
            "this server was built without the vm guest agent",
            "install rustup's x86_64-unknown-linux-musl target and build the server again, \
             or give the agent's path (guest-runners/vm-agent/build.sh prints it)",
        )),
        Some(agent) if !agent.is_file() => Err(Unready::new(
            format!("the guest agent {} is missing", agent.display()),
            "guest-runners/vm-agent/build.sh builds it",
        )),
        Some(_) => Ok(()),
    }
}

/// The snapshot's cache key: QEMU's arguments, and the QEMU binary and kernel as
/// found (path, size, modification time).
fn snapshot_key(args: &[String], files: &[&Path]) -> String {
    let mut key = Sha256::new();
    for a in args {
        key.update(a.as_bytes());
        key.update([0]);
    }
    for f in files {
        let path = which(f);
        if let Ok(m) = std::fs::metadata(&path) {
            key.update(format!("{}:{}:{:?}", path.display(), m.len(), m.modified().ok()));
        }
    }
    hex::encode(key.finalize())[..16].to_string()
}

impl Inner {
    /// Boots the template to a ready agent and snapshots it, unless the cache has it.
    pub(super) async fn make_template(&self) -> anyhow::Result<Template> {
        let dir = self.config.snapshot_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir_all(self.config.clones_dir())?;
        let agent = std::fs::read(self.config.agent.as_ref().unwrap())?;
        let busybox = std::fs::read(&self.config.busybox)?;
        let initramfs = initramfs(&busybox, &agent);
        let initramfs_path =
            dir.join(format!("initramfs-{}.cpio", &hex::encode(Sha256::digest(&initramfs))[..16]));
        if !initramfs_path.exists() {
            write_atomically(&initramfs_path, &initramfs)?;
        }
        let kernel = kernel(&self.config).map_err(|e| anyhow!(e))?;
        let args = qemu_args(&self.config, &kernel, &initramfs_path);
        let key = snapshot_key(&args, &[&self.config.qemu, &kernel]);
        let snapshot = dir.join(format!("template-{key}.snapshot"));
        // One booter per snapshot, across the servers sharing the directory.
        let lock = std::fs::File::create(dir.join(format!("template-{key}.lock")))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|_| lock)).await??;
        if snapshot.exists() {
            drop(lock);
            return Ok(Template { args, snapshot, boot_time: Duration::ZERO });
        }
        let started = Instant::now();
        let mut vm = Vm::spawn(self, &args, &[]).await.context("booting the template VM")?;
        let ready = vm.expect(b'R', BOOT_TIMEOUT).await.context("booting the template VM")?;
        let boot_time = started.elapsed();
        tracing::info!(
            duration_ms = boot_time.as_millis() as u64,
            agent = %String::from_utf8_lossy(&ready),
            "vm template booted"
        );
        vm.pause().await?;
        let partial = dir.join(format!("template-{key}.snapshot.partial"));
        let uri = format!("exec:cat > {}", shell_quote(&partial));
        vm.qmp.execute("migrate", json!({"uri": uri})).await?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let m = vm.qmp.execute("query-migrate", json!({})).await?;
            match m["status"].as_str() {
                Some("completed") => break,
                Some("failed" | "cancelled") => bail!("snapshotting the template failed: {m}"),
                _ if Instant::now() > deadline => bail!("snapshotting the template timed out"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        drop(vm);
        std::fs::rename(&partial, &snapshot)?;
        drop(lock);
        tracing::info!(
            snapshot = %snapshot.display(),
            bytes = std::fs::metadata(&snapshot).map(|m| m.len()).unwrap_or(0),
            "vm template snapshotted"
        );
        Ok(Template { args, snapshot, boot_time })
    }
}

/// `program` resolved through `PATH` (for the snapshot key).
fn which(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_path_buf();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_path_buf())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_follows_the_config_and_keys_the_snapshot() {
        let tcg = VmConfig { memory_mb: 96, ..VmConfig::default() };
        let args = qemu_args(&tcg, Path::new("/k"), Path::new("/i.cpio"));
        let after =
            |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].as_str()).unwrap();
        assert_eq!((after("-accel"), after("-cpu"), after("-m")), ("tcg", "qemu64", "96"));
        assert_eq!((after("-kernel"), after("-initrd")), ("/k", "/i.cpio"));
        assert!(!args.iter().any(|a| a.starts_with("-net")), "no network device");
        let kvm = VmConfig { accel: Some("kvm".into()), ..tcg.clone() };
        let kvm_args = qemu_args(&kvm, Path::new("/k"), Path::new("/i.cpio"));
        assert!(kvm_args.windows(2).any(|w| w == ["-cpu", "host"]));
        assert_ne!(snapshot_key(&args, &[]), snapshot_key(&kvm_args, &[]));
        assert_eq!(snapshot_key(&args, &[]), snapshot_key(&args.clone(), &[]));
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let c = VmConfig {
            qemu: "/nonexistent/qemu".into(),
            busybox: "/nonexistent/busybox".into(),
            kernel: Some("/nonexistent/vmlinuz".into()),
            ..VmConfig::default()
        };
        let why = check(&c).unwrap_err().to_string();
        for package in ["qemu-system-x86", "linux-image-amd64", "busybox-static"] {
            assert!(why.contains(package), "{why}");
        }
    }
}
