//! Revoked certificates: `revocations`, one record with a generation.
//!
//! One record (not a key per serial) so that the list and its generation
//! change together in one compare-and-swap; hosts receive it whole and
//! apply it with `tandem_pki::RevocationList::replace(generation, …)`,
//! which ignores an older generation. It stays small: an entry is pruned
//! once its certificate has been expired for a day (a certificate that
//! has expired is refused anyway).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::typed::Record;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCert {
    /// The certificate's name (a host's, an operator's).
    pub name: String,
    /// Unix seconds.
    pub revoked_at: u64,
    /// When the certificate expires anyway (unix seconds); 0 if unknown,
    /// which is never pruned.
    pub not_after: u64,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// Bumped on every change (revocation or pruning). 0: never changed.
    pub generation: u64,
    /// Serial (lowercase hex, normalised) → what it was.
    pub serials: BTreeMap<String, RevokedCert>,
}

/// How long after its expiry a revoked certificate stays on the list, for
/// peers whose clocks are behind.
pub const PRUNE_AFTER_EXPIRY_SECS: u64 = 24 * 3600;

impl RevocationRecord {
    /// Entries whose certificate expired more than a day before `now`.
    pub fn prunable(&self, now: u64) -> Vec<String> {
        self.serials
            .iter()
            .filter(|(_, c)| c.not_after != 0 && c.not_after + PRUNE_AFTER_EXPIRY_SECS < now)
            .map(|(s, _)| s.clone())
            .collect()
    }
}

impl Record for RevocationRecord {
    const KIND: &'static str = "revocations";
    const SCHEMA: u32 = 1;
}
