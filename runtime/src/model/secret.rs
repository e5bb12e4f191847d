//! Secrets as the store keeps them: sealed by [`crate::secrets`], never the value.

use serde::{Deserialize, Serialize};

use super::b64;
use super::clock::Micros;

/// One secret as the store keeps it: sealed, never the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    pub account: String,
    pub name: String,
    /// The id of the server key that sealed it (a line of the key file).
    pub key_id: String,
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    /// The value, sealed, with its authentication tag.
    #[serde(with = "b64")]
    pub sealed: Vec<u8>,
    pub created_at: Micros,
    pub updated_at: Micros,
}

// By hand, so that no debug print can show even the sealed bytes.
impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("account", &self.account)
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}
