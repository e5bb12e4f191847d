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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_admitted_up_to_its_limit_and_a_job_that_ends_frees_its_place() {
        let active = Active::default();
        let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
        assert!(active.admit("acme", a, Some(2)));
        assert!(active.admit("acme", b, Some(2)));
        assert!(!active.admit("acme", c, Some(2)));
        assert!(active.admit("other", c, Some(2)), "limits are per account");
        assert_eq!(active.count("acme"), 2);
        active.leave("acme", a);
        active.leave("acme", a);
        assert_eq!(active.count("acme"), 1, "leaving twice counts once");
        assert!(active.admit("acme", c, Some(2)));
        assert!(active.admit("acme", JobId::new(), None), "no limit: always");
        active.leave("nobody", a);
        assert_eq!(active.count("nobody"), 0);
    }

    #[test]
    fn a_job_admitted_twice_counts_once() {
        let active = Active::default();
        let id = JobId::new();
        assert!(active.admit("acme", id, Some(1)));
        assert!(!active.admit("acme", id, Some(1)), "at the limit, even for itself");
        assert!(active.admit("acme", id, None));
        assert_eq!(active.count("acme"), 1);
    }

    #[test]
    fn the_default_is_lowered_to_the_account_limit() {
        assert_eq!(resolve_limit("t", None, 30, None, 100).unwrap(), 30);
        assert_eq!(resolve_limit("t", None, 30, Some(10), 100).unwrap(), 10);
        assert_eq!(resolve_limit("t", Some(10), 30, Some(10), 100).unwrap(), 10);
        assert_eq!(resolve_limit("t", Some(100), 30, None, 100).unwrap(), 100);
    }

    #[test]
    fn past_the_account_is_over_quota_past_the_server_is_invalid() {
        match resolve_limit("memory_mb", Some(11), 30, Some(10), 100) {
            Err(SubmitError::OverQuota(m)) => {
                assert_eq!(m, "`memory_mb` 11 is over the account's limit of 10")
            }
            other => panic!("{other:?}"),
        }
        for asked in [0, 101] {
            match resolve_limit("memory_mb", Some(asked), 30, None, 100) {
                Err(SubmitError::Invalid(m)) => {
                    assert_eq!(m, "`memory_mb` must be between 1 and 100")
                }
                other => panic!("{asked}: {other:?}"),
            }
        }
    }
}
