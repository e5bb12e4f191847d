//! Where the client connects and with which key: [`Config`] and the credentials file
//! ([`Credentials`]).
//!
//! The order, first found wins: what the program sets explicitly, then the
//! `CLOUDPIPE_URL` / `CLOUDPIPE_API_KEY` environment variables, then the credentials
//! file, then the default URL `http://127.0.0.1:7070` (and no key).
//!
//! The credentials file is `$CLOUDPIPE_CREDENTIALS` when set, else
//! `$XDG_CONFIG_HOME/cloudpipe/credentials.json`, else
//! `$HOME/.config/cloudpipe/credentials.json`. The server writes it on its first start
//! and `cargo cloudpipe login` writes it; it holds
//! `{"url": "...", "account": "...", "api_key": "..."}` and is readable by its owner only.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The URL used when nothing else names one.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// The contents of the credentials file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

impl Credentials {
    /// Where the credentials file is (whether or not it exists); `None` when neither
    /// `CLOUDPIPE_CREDENTIALS`, `XDG_CONFIG_HOME` nor `HOME` is set. An empty variable
    /// counts as unset.
    pub fn path() -> Option<PathBuf> {
        match var("CLOUDPIPE_CREDENTIALS") {
            Some(p) => Some(PathBuf::from(p)),
            None => Credentials::home_path(),
        }
    }

    /// Where the credentials file is when `CLOUDPIPE_CREDENTIALS` is not set (as in a
    /// new shell).
    pub fn home_path() -> Option<PathBuf> {
        let config = match var("XDG_CONFIG_HOME") {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(var("HOME")?).join(".config"),
        };
        Some(config.join("cloudpipe").join("credentials.json"))
    }

    /// Reads a credentials file; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Credentials>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Config(format!("cannot read {}: {e}", path.display())));
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::Config(format!("{} is not a credentials file: {e}", path.display()))
        })
    }

    /// Writes a credentials file, readable and writable by its owner only (mode 0600
    /// from the moment it exists), creating its directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        let fail = |what: &str, e: std::io::Error| {
            Error::Config(format!("cannot {what} {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail("create the directory of", e))?;
        }
        let mut text = serde_json::to_string_pretty(self).expect("credentials serialize");
        text.push('\n');
        // Written beside the target under a fresh name opened with O_EXCL (an existing
        // file or link there, planted by another user of a shared directory, is never
        // written through), mode 0600 from the moment it exists, and renamed over the
        // target, so that a reader never sees half a file.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let (tmp, mut f) = (0u32..)
            .map(|n| dir.join(format!(".credentials.{}.{nanos}.{n}.tmp", std::process::id())))
            .find_map(|tmp| {
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                match opts.open(&tmp) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                    r => Some(r.map(|f| (tmp, f))),
                }
            })
            .expect("an endless range")
            .map_err(|e| fail("write", e))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| fail("write", e))?;
        f.sync_all().map_err(|e| fail("write", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| fail("write", e))
    }
}

/// An environment variable's value; an empty one counts as unset.
fn var(key: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(key).filter(|v| !v.is_empty())
}

/// Where to connect and how to authenticate; plain data, see the module docs for
/// the order in which [`Config::from_env`] fills it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// The server's base URL, e.g. `http://127.0.0.1:7070`.
    pub url: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The account the key belongs to (informational; the key alone identifies it).
    pub account: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("account", &self.account)
            .finish()
    }
}

impl Config {
    /// A configuration for this URL, without a key.
    pub fn new(url: impl Into<String>) -> Config {
        Config { url: url.into(), api_key: None, account: None }
    }

    /// The configuration from `CLOUDPIPE_URL` / `CLOUDPIPE_API_KEY`, then the
    /// credentials file, then the default URL.
    pub fn from_env() -> Result<Config> {
        Config::resolve(None, None)
    }

    /// Like [`Config::from_env`] with values given explicitly (command-line flags)
    /// taking precedence over everything else.
    pub fn resolve(url: Option<String>, api_key: Option<String>) -> Result<Config> {
        let env = |k: &str| var(k).and_then(|v| v.into_string().ok());
        let file = match Credentials::path() {
            Some(p) => Credentials::load(&p)?.unwrap_or_default(),
            None => Credentials::default(),
        };
        // A flag given empty (`--url ""`, or clap's env fallback of an empty variable)
        // counts as unset, like an empty variable.
        let given = |v: Option<String>| v.filter(|v| !v.is_empty());
        Ok(Config::layer(
            [given(url), env("CLOUDPIPE_URL"), file.url],
            [given(api_key), env("CLOUDPIPE_API_KEY"), file.api_key],
            file.account,
        ))
    }

    /// The first given URL and key of each list, in order of precedence.
    fn layer(
        urls: [Option<String>; 3],
        keys: [Option<String>; 3],
        account: Option<String>,
    ) -> Config {
        let url = urls.into_iter().flatten().next().unwrap_or_else(|| DEFAULT_URL.to_string());
        Config { url, api_key: keys.into_iter().flatten().next(), account }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_env_beat_file_beat_default() {
        let s = |v: &str| Some(v.to_string());
        let c = Config::layer(
            [None, s("http://env"), s("http://file")],
            [s("flag"), s("env"), None],
            None,
        );
        assert_eq!((c.url.as_str(), c.api_key.as_deref()), ("http://env", Some("flag")));
        let c = Config::layer([None, None, None], [None, None, s("file")], s("admin"));
        assert_eq!((c.url.as_str(), c.api_key.as_deref()), (DEFAULT_URL, Some("file")));
    }

    #[test]
    fn saved_credentials_load_back_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/credentials.json");
        assert_eq!(Credentials::load(&path).unwrap(), None);
        let c = Credentials {
            url: Some("http://h:1".into()),
            account: Some("admin".into()),
            api_key: Some("k".into()),
        };
        c.save(&path).unwrap();
        assert_eq!(Credentials::load(&path).unwrap(), Some(c));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let c = Config { api_key: Some("secret".into()), ..Config::new("http://x") };
        assert!(!format!("{c:?}").contains("secret"));
    }
}
