//! The credentials file: where the server's first start leaves the admin's key, and
//! where the CLIs (`cloudpipe accounts …`, `cargo cloudpipe`) find a URL and a key.
//!
//! Path: `$CLOUDPIPE_CREDENTIALS`, else `$XDG_CONFIG_HOME/cloudpipe/credentials.json`,
//! else `$HOME/.config/cloudpipe/credentials.json`. Content:
//! `{"url": "http://127.0.0.1:7070", "account": "admin", "api_key": "cpk_…"}`, mode 0600.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub account: String,
    pub api_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ url: {:?}, account: {:?}, api_key: <secret> }}",
            self.url, self.account
        )
    }
}

/// Where the credentials file is.
pub fn default_path() -> PathBuf {
    match std::env::var_os("CLOUDPIPE_CREDENTIALS") {
        Some(p) => PathBuf::from(p),
        None => home_path(),
    }
}

/// Where the credentials file is when `$CLOUDPIPE_CREDENTIALS` is not set (as in a new
/// shell).
pub fn home_path() -> PathBuf {
    let config = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".config"),
            None => PathBuf::from("."),
        },
    };
    config.join("cloudpipe").join("credentials.json")
}

/// Reads the file; `Ok(None)` if there is none.
pub fn read(path: &Path) -> anyhow::Result<Option<Credentials>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a credentials file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the file readable by its owner only, atomically (a reader never sees half
/// of it).
pub fn write(path: &Path, creds: &Credentials) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // A fresh name opened with O_EXCL: an existing file or link there (planted by
    // another user of a shared directory) is never written through.
    let (tmp, mut f) = loop {
        let mut suffix = [0u8; 8];
        getrandom::getrandom(&mut suffix)
            .map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
        let tmp = dir.join(format!(".credentials.{}.tmp", hex::encode(suffix)));
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("writing {}", tmp.display())),
        }
    };
    f.write_all(&serde_json::to_vec_pretty(creds)?)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn written_owner_only_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/credentials.json");
        let c =
            Credentials { url: "http://x".into(), account: "admin".into(), api_key: "k".into() };
        write(&path, &c).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = read(&path).unwrap().unwrap();
        assert_eq!((&back.url, &back.account, &back.api_key), (&c.url, &c.account, &c.api_key));
        assert!(read(&dir.path().join("none")).unwrap().is_none());
        assert!(!format!("{c:?}").contains("\"k\""));
    }
}
