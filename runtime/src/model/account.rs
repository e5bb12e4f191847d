//! Accounts and API keys as the store keeps them, and the [`Scope`] through which an
//! account sees functions and jobs.
//!
//! Every function version, name and job belongs to one account. Keys are stored as
//! the SHA-256 of the secret: a stolen store file gives no usable key.

use cloudpipe_types::{Quotas, Role};
use serde::{Deserialize, Serialize};

use super::clock::Micros;

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
