//! Write-only secrets: [`Secrets`] seals each value with a server key before the store
//! sees it, and opens it only to put it into the environment of a job that starts or a
//! function that is invoked. No route answers with a value; records, events, logs and
//! `/metrics` carry only the reference `{"secret": "name"}`.
//!
//! # Sealing
//! ChaCha20-Poly1305 (ring) with a random 96-bit nonce per value; the additional data
//! binds a ciphertext to its account and name, so that a record copied under another
//! account or name does not open.
//!
//! # Keys and rotation
//! The key file (`--secrets-key-file`, by default `DATA_DIR/secrets.key`, made on the
//! first start with mode 0600) holds one key a line, `ID BASE64-OF-32-BYTES`; `#` starts
//! a comment. The **last** line seals new values; every line opens what it sealed (each
//! record keeps the id of its key). To rotate without downtime, append a line with a new
//! id: the server rereads the file when it changes (looked at on each put, and whenever
//! a record names an id it does not know), so new puts use the new key at once while
//! older records still open. Put a secret again to move it to the new key; drop an old
//! line only once no record names it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudpipe_types::EnvValue;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::model::{SecretRecord, now_micros};
use crate::store::{PutSecret, Store};

/// Limits and the key file; plain data.
#[derive(Debug, Clone)]
pub struct SecretsConfig {
    /// Made on the first start when missing.
    pub key_file: PathBuf,
    /// Secrets per account.
    pub max_per_account: u64,
    /// Bytes of one value.
    pub max_value_bytes: usize,
}

impl SecretsConfig {
    /// Defaults with the key file in `data_dir`.
    pub fn new(data_dir: &Path) -> SecretsConfig {
        SecretsConfig {
            key_file: data_dir.join("secrets.key"),
            max_per_account: 100,
            max_value_bytes: 64 << 10,
        }
    }
}

/// Why a secret operation failed. Messages name secrets, never values.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "secret name {0:?} is not valid: 1 to 128 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
    )]
    BadName(String),
    #[error("the value is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("a secret value may not contain NUL (it goes into an environment variable)")]
    BadValue,
    #[error("the account has {limit} secrets, its limit: delete one first")]
    OverQuota { limit: u64 },
    #[error("secret {0:?} not found in the account")]
    NotFound(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The account's secrets, sealed with the server's keys. One per process (it holds the
/// key ring); cheap to share through an `Arc`.
pub struct Secrets {
    store: Arc<dyn Store>,
    keys: KeyRing,
    config: SecretsConfig,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").field("key_file", &self.config.key_file).finish_non_exhaustive()
    }
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

impl Secrets {
    /// Loads the key file, making it (mode 0600) when it is missing.
    pub fn open(store: Arc<dyn Store>, config: SecretsConfig) -> anyhow::Result<Secrets> {
        let keys = KeyRing::load(&config.key_file)?;
        Ok(Secrets { store, keys, config })
    }

    pub fn config(&self) -> &SecretsConfig {
        &self.config
    }

    /// Creates or replaces `account`'s secret `name`.
    pub async fn put(
        &self,
        account: &str,
        name: &str,
        value: &str,
    ) -> Result<SecretRecord, SecretError> {
        if !valid_name(name) {
            return Err(SecretError::BadName(name.to_string()));
        }
        if value.len() > self.config.max_value_bytes {
            return Err(SecretError::TooLarge {
                size: value.len(),
                limit: self.config.max_value_bytes,
            });
        }
        if value.contains('\0') {
            return Err(SecretError::BadValue);
        }
        let (key_id, nonce, sealed) = self.keys.seal(&aad(account, name), value.as_bytes())?;
        let now = now_micros();
        let record = SecretRecord {
            account: account.to_string(),
            name: name.to_string(),
            key_id,
            nonce,
            sealed,
            created_at: now,
            updated_at: now,
        };
        match self.store.put_secret(record, Some(self.config.max_per_account)).await? {
            PutSecret::Stored(r) => Ok(r),
            PutSecret::OverQuota { limit } => Err(SecretError::OverQuota { limit }),
        }
    }

    /// The account's secrets (sealed), sorted by name.
    pub async fn list(&self, account: &str) -> Result<Vec<SecretRecord>, SecretError> {
        Ok(self.store.list_secrets(account).await?)
    }

    /// Deletes a secret; `false` if there was none by that name.
    pub async fn delete(&self, account: &str, name: &str) -> Result<bool, SecretError> {
        Ok(self.store.delete_secret(account, name).await?)
    }

    /// Checks that every secret `env` refers to exists, at submit or when settings
    /// change, so that a typo is a 400 rather than a failed run.
    pub async fn check(
        &self,
        account: &str,
        env: &BTreeMap<String, EnvValue>,
    ) -> Result<(), SecretError> {
        for name in env.values().filter_map(EnvValue::secret_name) {
            if !valid_name(name) {
                return Err(SecretError::BadName(name.to_string()));
            }
            if self.store.get_secret(account, name).await?.is_none() {
                return Err(SecretError::NotFound(name.to_string()));
            }
        }
        Ok(())
    }

    /// `env` with every secret reference replaced by the value of `account`'s secret,
    /// as run time needs it. The values live only in the returned list.
    pub async fn resolve(
        &self,
        account: &str,
        env: &BTreeMap<String, EnvValue>,
    ) -> Result<Vec<(String, String)>, SecretError> {
        let mut out = Vec::with_capacity(env.len());
        for (k, v) in env {
            let value = match v {
                EnvValue::Text(t) => t.clone(),
                EnvValue::Secret(r) => {
                    let record = self
                        .store
                        .get_secret(account, &r.secret)
                        .await?
                        .ok_or_else(|| SecretError::NotFound(r.secret.clone()))?;
                    self.open_record(&record)?
                }
            };
            out.push((k.clone(), value));
        }
        Ok(out)
    }

    fn open_record(&self, r: &SecretRecord) -> anyhow::Result<String> {
        let bytes = self
            .keys
            .open(&r.key_id, &aad(&r.account, &r.name), &r.nonce, &r.sealed)
            .with_context(|| format!("opening secret {:?} of account {:?}", r.name, r.account))?;
        String::from_utf8(bytes).context("a secret value is not UTF-8")
    }
}

/// Binds a ciphertext to its owner and name.
fn aad(account: &str, name: &str) -> Vec<u8> {
    let mut a = b"cloudpipe-secret\0".to_vec();
    a.extend_from_slice(account.as_bytes());
    a.push(0);
    a.extend_from_slice(name.as_bytes());
    a
}

/// The keys of the key file, reread when the file changes.
struct KeyRing {
    path: PathBuf,
    loaded: Mutex<Loaded>,
    rng: SystemRandom,
}

struct Loaded {
    /// In file order: the last one seals.
    keys: Vec<(String, [u8; 32])>,
    /// The file's modification time and size when read.
    stamp: Option<(SystemTime, u64)>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl KeyRing {
    fn load(path: &Path) -> anyhow::Result<KeyRing> {
        if !path.exists() {
            create_key_file(path)?;
            tracing::info!(path = %path.display(), "made a new secrets key file (mode 0600)");
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the secrets key file is readable by other users: chmod 600 it"
                );
            }
        }
        let loaded = Loaded { keys: read_key_file(path)?, stamp: stamp(path) };
        Ok(KeyRing {
            path: path.to_path_buf(),
            loaded: Mutex::new(loaded),
            rng: SystemRandom::new(),
        })
    }

    /// Rereads the file if it changed since it was read. A file that became unreadable
    /// or bad keeps the keys in use (and says so): running jobs must not lose them.
    fn refresh(&self, force: bool) {
        let now = stamp(&self.path);
        let mut loaded = self.loaded.lock().unwrap();
        if !force && now == loaded.stamp {
            return;
        }
        match read_key_file(&self.path) {
            Ok(keys) => {
                if keys.len() != loaded.keys.len() {
                    tracing::info!(keys = keys.len(), "reread the secrets key file");
                }
                loaded.keys = keys;
                loaded.stamp = now;
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "the secrets key file changed and cannot be read; keeping the keys in use"
            ),
        }
    }

    /// Seals with the newest key: its id, the nonce, the ciphertext and tag.
    fn seal(&self, aad: &[u8], plain: &[u8]) -> anyhow::Result<(String, Vec<u8>, Vec<u8>)> {
        self.refresh(false);
        let (id, key) = {
            let loaded = self.loaded.lock().unwrap();
            loaded.keys.last().cloned().context("the secrets key file holds no key")?
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| anyhow::anyhow!("no randomness for a nonce"))?;
        let mut buf = plain.to_vec();
        aead_key(&key)?
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        Ok((id, nonce.to_vec(), buf))
    }

    fn open(
        &self,
        key_id: &str,
        aad: &[u8],
        nonce: &[u8],
        sealed: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        let find = || {
            let loaded = self.loaded.lock().unwrap();
            loaded.keys.iter().find(|(id, _)| id == key_id).map(|(_, k)| *k)
        };
        let key = match find() {
            Some(k) => k,
            None => {
                self.refresh(true);
                find().with_context(|| {
                    format!("the key {key_id:?} that sealed it is not in {}", self.path.display())
                })?
            }
        };
        let nonce: [u8; NONCE_LEN] =
            nonce.try_into().map_err(|_| anyhow::anyhow!("a stored nonce is not 12 bytes"))?;
        let mut buf = sealed.to_vec();
        let plain = aead_key(&key)?
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
            .map_err(|_| anyhow::anyhow!("the sealed value does not open with key {key_id:?}"))?;
        Ok(plain.to_vec())
    }
}

fn aead_key(key: &[u8; 32]) -> anyhow::Result<LessSafeKey> {
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, key)
        .map_err(|_| anyhow::anyhow!("a secrets key is not 32 bytes"))?;
    Ok(LessSafeKey::new(unbound))
}

/// `ID BASE64` lines; blank lines and `#` comments skipped.
fn read_key_file(path: &Path) -> anyhow::Result<Vec<(String, [u8; 32])>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the secrets key file {}", path.display()))?;
    let mut keys: Vec<(String, [u8; 32])> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("{} line {}: expected `ID BASE64-OF-32-BYTES`", path.display(), i + 1);
        let mut words = line.split_whitespace();
        let (Some(id), Some(b64), None) = (words.next(), words.next(), words.next()) else {
            bail!(bad());
        };
        let bytes = BASE64.decode(b64).ok().with_context(bad)?;
        let key: [u8; 32] = bytes.try_into().ok().with_context(bad)?;
        if keys.iter().any(|(k, _)| k == id) {
            bail!("{} line {}: key id {id:?} is used twice", path.display(), i + 1);
        }
        keys.push((id.to_string(), key));
    }
    if keys.is_empty() {
        bail!("the secrets key file {} holds no key", path.display());
    }
    Ok(keys)
}

/// A new key file with one random key, mode 0600, synced.
fn create_key_file(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let rng = SystemRandom::new();
    let mut key = [0u8; 32];
    rng.fill(&mut key).map_err(|_| anyhow::anyhow!("no randomness for a key"))?;
    let mut id = [0u8; 4];
    rng.fill(&mut id).map_err(|_| anyhow::anyhow!("no randomness for a key id"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the secrets key file {}", path.display()))?;
    writeln!(
        f,
        "# Cloudpipe secrets keys: one `ID BASE64` a line; the last one seals new values.\n\
         # Append a line to rotate; keep old lines while secrets sealed with them remain.\n\
         k-{} {}",
        hex::encode(id),
        BASE64.encode(key)
    )?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(dir: &Path) -> KeyRing {
        KeyRing::load(&dir.join("secrets.key")).unwrap()
    }

    #[test]
    fn a_new_key_file_is_private_and_opens_what_it_sealed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys = ring(dir.path());
        let mode = std::fs::metadata(dir.path().join("secrets.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (id, nonce, sealed) = keys.seal(b"a", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"), "sealed bytes hide the value");
        assert_eq!(keys.open(&id, b"a", &nonce, &sealed).unwrap(), b"hunter2");
        // Another owner or name (the additional data) does not open it.
        assert!(keys.open(&id, b"b", &nonce, &sealed).is_err());
        // Neither does a changed byte.
        let mut bent = sealed.clone();
        bent[0] ^= 1;
        assert!(keys.open(&id, b"a", &nonce, &bent).is_err());
    }

    #[test]
    fn an_appended_key_seals_new_values_and_old_ones_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let keys = ring(dir.path());
        let (old_id, nonce, sealed) = keys.seal(b"a", b"old").unwrap();
        // Rotation: a line appended while the ring is in use. (Sizes differ, so the
        // change is seen even within the file system's timestamp granularity.)
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(f, "k-new {}", BASE64.encode([7u8; 32])).unwrap();
        drop(f);
        let (new_id, nonce2, sealed2) = keys.seal(b"a", b"new").unwrap();
        assert_eq!(new_id, "k-new");
        assert_ne!(old_id, new_id);
        assert_eq!(keys.open(&old_id, b"a", &nonce, &sealed).unwrap(), b"old");
        assert_eq!(keys.open(&new_id, b"a", &nonce2, &sealed2).unwrap(), b"new");
        // A fresh process reading the file opens both too.
        let again = ring(dir.path());
        assert_eq!(again.open(&old_id, b"a", &nonce, &sealed).unwrap(), b"old");
    }

    #[test]
    fn bad_key_files_are_refused_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        for (text, want) in [
            ("k1 notbase64!\n", "line 1"),
            ("# only a comment\n", "holds no key"),
            (&format!("k1 {}\n", BASE64.encode([1u8; 16])), "line 1"),
            (&format!("k1 {0}\nk1 {0}\n", BASE64.encode([1u8; 32])), "used twice"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", KeyRing::load(&path).err().unwrap());
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["api-token", "A", "db.password", "x_1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(129), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
