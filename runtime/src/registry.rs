//! [`FunctionRegistry`]: the upload path of functions. A binary is content-addressed
//! (sha256), checked and prepared once by the executor (compiled, cached on disk), then
//! stored; a name points at its newest version, older versions stay addressable by id.

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::account::Tenant;
use crate::executor::{Binaries, Executor, PrepareError};
use crate::model::{Scope, now_micros};
use crate::store::{FunctionMeta, PutFunction, Store};

/// The [`Binaries`] of function versions as the registry stores them: what the wasm
/// executor compiles when it has no artefact of a version.
pub fn stored_binaries(store: Arc<dyn Store>) -> Arc<dyn Binaries> {
    Arc::new(StoredBinaries(store))
}

struct StoredBinaries(Arc<dyn Store>);

#[async_trait::async_trait]
impl Binaries for StoredBinaries {
    async fn binary(&self, id: &str) -> anyhow::Result<Option<Bytes>> {
        self.0.function_binary(id).await
    }
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(
        "invalid function name {0:?}: use 1 to 63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
    )]
    BadName(String),
    #[error("function binary is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Invalid(String),
    /// Over the server's per-component limits of the instance pool.
    #[error("{0}")]
    ComponentTooLarge(String),
    #[error("the name {0:?} belongs to another account: choose another name")]
    NameTaken(String),
    #[error(
        "storing this version ({size} bytes) would pass the account's quota of {limit} function bytes ({used} used): delete old versions or ask for a larger quota"
    )]
    OverQuota { size: u64, used: u64, limit: u64 },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Owns function uploads. One per process; cheap to clone.
#[derive(Clone)]
pub struct FunctionRegistry {
    store: Arc<dyn Store>,
    executor: Arc<dyn Executor>,
    max_size: usize,
}

/// The content address of a binary: `sha256:` and 64 lowercase hex digits.
pub fn function_id(binary: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(binary)))
}

/// True for a well-formed content address.
pub fn is_function_id(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Names are URL path segments and DNS-label-like: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

impl FunctionRegistry {
    /// `max_size` bounds an uploaded binary, in bytes.
    pub fn new(store: Arc<dyn Store>, executor: Arc<dyn Executor>, max_size: usize) -> Self {
        FunctionRegistry { store, executor, max_size }
    }

    /// Largest binary accepted, in bytes.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Checks, prepares and stores `binary` for `owner`, pointing `name` at it when
    /// given. Uploading the same binary again is cheap and returns the same id.
    pub async fn upload(
        &self,
        owner: &Tenant,
        name: Option<String>,
        binary: Bytes,
    ) -> Result<FunctionMeta, UploadError> {
        if let Some(n) = &name
            && !is_valid_name(n)
        {
            return Err(UploadError::BadName(n.clone()));
        }
        if binary.len() > self.max_size {
            return Err(UploadError::TooLarge { size: binary.len(), limit: self.max_size });
        }
        let id = function_id(&binary);
        let kind = self.executor.prepare(&id, &binary).await.map_err(|e| match e {
            PrepareError::Invalid(m) => UploadError::Invalid(m),
            PrepareError::OverLimits(m) => UploadError::ComponentTooLarge(m),
            PrepareError::Internal(e) => UploadError::Internal(e),
        })?;
        let meta = FunctionMeta {
            id,
            account: owner.account.clone(),
            name: name.clone(),
            kind,
            size: binary.len() as u64,
            created_at: now_micros(),
            settings: Default::default(),
        };
        let size = meta.size;
        let stored =
            match self.store.put_function(meta, binary, owner.limits.max_function_bytes).await? {
                PutFunction::Stored(meta) => meta,
                PutFunction::NameTaken => {
                    return Err(UploadError::NameTaken(name.unwrap_or_default()));
                }
                PutFunction::OverQuota { used, limit } => {
                    return Err(UploadError::OverQuota { size, used, limit });
                }
            };
        tracing::info!(account = %stored.account, function = stored.name.as_deref().unwrap_or(""), id = %stored.id, kind = stored.kind.as_str(), size = stored.size, "function uploaded");
        Ok(stored)
    }

    /// Replaces the settings of a name (checked by the caller). `None`: no such name.
    pub async fn configure(
        &self,
        scope: &Scope,
        name: &str,
        settings: cloudpipe_types::FunctionSettings,
    ) -> anyhow::Result<Option<FunctionMeta>> {
        self.store.put_settings(scope, name, settings).await
    }

    /// A function by name or id, as `scope` sees it.
    pub async fn get(
        &self,
        scope: &Scope,
        name_or_id: &str,
    ) -> anyhow::Result<Option<FunctionMeta>> {
        self.store.get_function(scope, name_or_id).await
    }

    pub async fn list(&self, scope: &Scope) -> anyhow::Result<Vec<FunctionMeta>> {
        self.store.list_functions(scope).await
    }

    pub async fn delete(
        &self,
        scope: &Scope,
        name_or_id: &str,
    ) -> anyhow::Result<Vec<FunctionMeta>> {
        let doomed = self.store.delete_function(scope, name_or_id).await?;
        // A binary no account has any more goes from the store: its compiled code too.
        for meta in &doomed {
            if self.store.function_binary(&meta.id).await?.is_none() {
                self.executor.forget(&meta.id);
            }
        }
        Ok(doomed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_path_safe() {
        for ok in ["hello", "a", "my-fn_2", "0day"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "Hello", "-x", "a/b", "sha256:00", "a b", &"x".repeat(64), "é"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn ids_are_sha256_of_the_binary() {
        let id = function_id(b"");
        assert_eq!(id, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!(is_function_id(&id));
        assert!(!is_function_id("sha256:E3B0"));
        assert!(!is_function_id("hello"));
    }
}
