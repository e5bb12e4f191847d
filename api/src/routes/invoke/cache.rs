//! [`FunctionCache`]: what `/fn/{name}` resolves to, kept in memory.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cloudpipe_runtime::account::Scope;
use cloudpipe_runtime::store::FunctionMeta;

use crate::AppState;

/// Functions as `/fn/{name}` resolves them (by name or id, in every account), kept in
/// memory so that an invocation reads no disk. Filled on first use; the functions
/// routes invalidate a name after an upload, a settings change or a delete and before
/// answering (and a node of a cluster does when told of a change elsewhere). Names
/// that resolve to nothing are not remembered: any URL must not grow memory.
#[derive(Default)]
pub struct FunctionCache {
    /// Bumped by every invalidation: a lookup that began before one is not cached.
    inner: RwLock<(u64, HashMap<String, Arc<FunctionMeta>>)>,
}

/// Entries the function cache holds before it starts again empty.
const MAX_CACHED_FUNCTIONS: usize = 10_000;

impl FunctionCache {
    pub(super) async fn get(
        &self,
        state: &AppState,
        name: &str,
    ) -> anyhow::Result<Option<Arc<FunctionMeta>>> {
        let generation = {
            let cached = self.inner.read().unwrap();
            if let Some(meta) = cached.1.get(name) {
                return Ok(Some(meta.clone()));
            }
            cached.0
        };
        let Some(meta) = state.runtime.registry.get(&Scope::All, name).await? else {
            return Ok(None);
        };
        let meta = Arc::new(meta);
        let mut cached = self.inner.write().unwrap();
        if cached.0 == generation {
            if cached.1.len() >= MAX_CACHED_FUNCTIONS {
                cached.1.clear();
            }
            cached.1.insert(name.to_string(), meta.clone());
        }
        Ok(Some(meta))
    }

    /// Forgets what `name` resolved to.
    pub fn invalidate(&self, name: &str) {
        let mut cached = self.inner.write().unwrap();
        cached.0 += 1;
        cached.1.remove(name);
    }

    /// Forgets every function (a version deleted by id may have had several names).
    pub fn invalidate_all(&self) {
        let mut cached = self.inner.write().unwrap();
        cached.0 += 1;
        cached.1.clear();
    }
}
