//! The one authority for who runs a VM: `vms/<uuid>`.
//!
//! For each VM (by UUID) the manager keeps which host is its primary, which
//! its backup, and a generation. Every change of primary or backup is a
//! handover: a compare-and-swap that names the generation it replaces and
//! bumps it by one, so two concurrent handovers cannot both win, and a host
//! holding an older generation knows it has been superseded. Hosts cache
//! their records durably and enforce them on every stream.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::typed::Record;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityRecord {
    pub uuid: Uuid,
    /// The VM's name (informative; the UUID is the key).
    pub name: String,
    /// The host that runs the VM (certificate name).
    pub primary: String,
    /// The host that keeps its replica, if protected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// 1 when created; +1 on every handover.
    pub generation: u64,
    /// Unix seconds of the last change.
    pub updated_at: u64,
    /// Who made the last change (certificate name).
    #[serde(default)]
    pub updated_by: String,
}

impl AuthorityRecord {
    /// Whether `host` has a role in this VM.
    pub fn involves(&self, host: &str) -> bool {
        self.primary == host || self.backup.as_deref() == Some(host)
    }
}

impl Record for AuthorityRecord {
    const KIND: &'static str = "vm-authority";
    const SCHEMA: u32 = 1;
}
