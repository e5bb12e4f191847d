//! Function versions as the store keeps them.

use cloudpipe_types::{FunctionKind, FunctionSettings};
use serde::{Deserialize, Serialize};

use super::account::admin_name;
use super::clock::Micros;

/// One uploaded function version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionMeta {
    /// `sha256:` and 64 lowercase hex digits.
    pub id: String,
    /// The account that owns this version (and its name).
    #[serde(default = "admin_name")]
    pub account: String,
    /// The name it was last uploaded under, if any.
    pub name: Option<String>,
    pub kind: FunctionKind,
    pub size: u64,
    pub created_at: Micros,
    /// The settings of `name` (kept per name, not in the version's record; defaults
    /// when looked up by id).
    #[serde(default, skip_serializing)]
    pub settings: FunctionSettings,
}
