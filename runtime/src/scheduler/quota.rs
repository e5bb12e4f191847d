//! Account quotas as the scheduler applies them: the concurrent-jobs count of each
//! account on one machine ([`Active`]), and the resolution of a job's limits against
//! the account's and the server's ([`resolve_limit`]).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::SubmitError;
use crate::model::JobId;

/// The queued and running jobs of each account, for its concurrent-jobs quota. A job
/// joins when it is admitted and leaves when it ends; both are idempotent, so no path
/// counts a job twice.
#[derive(Default)]
pub(super) struct Active(Mutex<HashMap<String, HashSet<JobId>>>);

impl Active {
    /// Admits `id` unless `account` already has `limit` jobs.
    pub(super) fn admit(&self, account: &str, id: JobId, limit: Option<u64>) -> bool {
        let mut map = self.0.lock().unwrap();
        let jobs = map.entry(account.to_string()).or_default();
        if limit.is_some_and(|l| jobs.len() as u64 >= l) {
            return false;
        }
        jobs.insert(id);
        true
    }

    pub(super) fn leave(&self, account: &str, id: JobId) {
        let mut map = self.0.lock().unwrap();
        if let Some(jobs) = map.get_mut(account) {
            jobs.remove(&id);
            if jobs.is_empty() {
                map.remove(account);
            }
        }
    }

    pub(super) fn count(&self, account: &str) -> u64 {
        self.0.lock().unwrap().get(account).map_or(0, |j| j.len() as u64)
    }
}

/// The value of a per-job limit (`timeout_ms`, `memory_mb`): what the job asked for,
/// else the server's default lowered to the account's limit. Past the account's limit
/// is [`SubmitError::OverQuota`]; zero or past the server's maximum is
/// [`SubmitError::Invalid`].
pub(super) fn resolve_limit(
    what: &str,
    asked: Option<u64>,
    default: u64,
    account_limit: Option<u64>,
    server_max: u64,
) -> Result<u64, SubmitError> {
    let value = asked.unwrap_or(match account_limit {
        Some(l) => default.min(l),
        None => default,
    });
    if let Some(l) = account_limit
        && value > l
    {
        return Err(SubmitError::OverQuota(format!(
            "`{what}` {value} is over the account's limit of {l}"
        )));
    }
    if value == 0 || value > server_max {
        return Err(SubmitError::Invalid(format!("`{what}` must be between 1 and {server_max}")));
    }
    Ok(value)
}
