//! What an account may do: its resolved [`Limits`] and the [`Tenant`] a job is
//! submitted for. The stored account and key records are in [`crate::model`]; they
//! are re-exported here beside the policy that reads them.

use cloudpipe_types::Quotas;

pub use crate::model::{ADMIN, AccountRecord, KeyRecord, Scope};

/// Limits of one account, resolved: `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent_jobs: Option<u64>,
    pub max_timeout_ms: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub max_function_bytes: Option<u64>,
    pub max_finished_jobs: Option<u64>,
    pub max_batch_inputs: Option<u64>,
    pub max_batches: Option<u64>,
    pub max_stored_batch_inputs: Option<u64>,
}

impl Limits {
    /// The account's own quotas over `defaults` (the server's).
    pub fn resolve(own: &Quotas, defaults: &Quotas) -> Limits {
        Limits {
            max_concurrent_jobs: own.max_concurrent_jobs.or(defaults.max_concurrent_jobs),
            max_timeout_ms: own.max_timeout_ms.or(defaults.max_timeout_ms),
            max_memory_mb: own.max_memory_mb.or(defaults.max_memory_mb),
            max_function_bytes: own.max_function_bytes.or(defaults.max_function_bytes),
            max_finished_jobs: own.max_finished_jobs.or(defaults.max_finished_jobs),
            max_batch_inputs: own.max_batch_inputs.or(defaults.max_batch_inputs),
            max_batches: own.max_batches.or(defaults.max_batches),
            max_stored_batch_inputs: own
                .max_stored_batch_inputs
                .or(defaults.max_stored_batch_inputs),
        }
    }

    pub fn to_quotas(self) -> Quotas {
        Quotas {
            max_concurrent_jobs: self.max_concurrent_jobs,
            max_timeout_ms: self.max_timeout_ms,
            max_memory_mb: self.max_memory_mb,
            max_function_bytes: self.max_function_bytes,
            max_finished_jobs: self.max_finished_jobs,
            max_batch_inputs: self.max_batch_inputs,
            max_batches: self.max_batches,
            max_stored_batch_inputs: self.max_stored_batch_inputs,
        }
    }
}

/// Who submits a job: the account that will own it and the limits it runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub account: String,
    /// An admin sees every account's functions.
    pub admin: bool,
    pub limits: Limits,
    /// The account's containers get a network (an admin policy, never a job flag).
    pub allow_network: bool,
}

impl Tenant {
    /// The admin account, without limits.
    pub fn admin() -> Tenant {
        Tenant {
            account: ADMIN.to_string(),
            admin: true,
            limits: Limits::default(),
            allow_network: false,
        }
    }

    /// What this tenant sees.
    pub fn scope(&self) -> Scope {
        match self.admin {
            true => Scope::All,
            false => Scope::Account(self.account.clone()),
        }
    }
}
