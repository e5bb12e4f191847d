//! Accounts and API keys as the store keeps them, and the [`Scope`] through which an
//! account sees functions and jobs.
//!
//! Every function version, name and job belongs to one account. Keys are stored as
//! the SHA-256 of the secret: a stolen store file gives no usable key.

use cloudpipe_types::{Quotas, Role};
use serde::{Deserialize, Serialize};

use crate::job::Micros;

/// The account created on first start; it owns whatever was stored before accounts
/// existed.
pub const ADMIN: &str = "admin";

pub(crate) fn admin_name() -> String {
    ADMIN.to_string()
}

/// One account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub name: String,
    pub role: Role,
    pub disabled: bool,
    /// Limits set on this account; unset fields take the server's defaults.
    pub quotas: Quotas,
    /// Policy: the account's containers may use the network.
    #[serde(default)]
    pub allow_network: bool,
    /// Policy: where the account's functions may send requests, at most (destination
    /// patterns, see [`crate::egress`]). Empty: nowhere. Ignored for an admin, who may
    /// go anywhere; internal addresses stay the operator's to allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_outbound: Vec<String>,
    pub created_at: Micros,
}

impl AccountRecord {
    /// The destinations the account's functions and hooks may reach at most.
    pub fn egress(&self) -> Vec<String> {
        match self.role {
            Role::Admin => vec!["*".to_string()],
            Role::User => self.allowed_outbound.clone(),
        }
    }
}

/// One API key: the hash of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id (`key_…`), used to list and revoke it.
    pub id: String,
    pub account: String,
    pub label: Option<String>,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    pub created_at: Micros,
}

/// What a caller may see: one account's resources, or (the admin) everyone's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Account(String),
}

impl Scope {
    /// True when a resource owned by `account` is visible in this scope.
    pub fn sees(&self, account: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Account(a) => a == account,
        }
    }
}

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
