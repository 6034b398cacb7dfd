//! A joined host and what it reports about itself.

use serde::{Deserialize, Serialize};

use crate::store::typed::Record;

/// One of a host's certificates, by serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRef {
    /// Lowercase hex, as `tandem_pki::Peer::serial`.
    pub serial: String,
    /// Unix seconds.
    pub not_after: u64,
}

/// What the host says about its own health.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthState {
    /// Nothing reported yet.
    #[default]
    Unknown,
    Ok,
    /// Working, with problems (listed in `problems`).
    Degraded,
    /// Not able to run VMs.
    Failed,
}

impl HealthState {
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Ok => "ok",
            HealthState::Degraded => "degraded",
            HealthState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Health {
    pub state: HealthState,
    /// One line each, for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Shared storage is visible to several hosts (same path, same data);
/// local storage to this host only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatastoreKind {
    Shared,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub kind: DatastoreKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QemuInfo {
    /// e.g. `10.0.2`.
    pub version: String,
    /// e.g. `pc-q35-10.0`, `microvm`.
    #[serde(default)]
    pub machine_types: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    /// What the host can still give VMs (MemAvailable).
    pub free_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortGroupInfo {
    pub name: String,
    /// Access VLAN, if the group is an access group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Allowed VLANs of a trunk group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunk: Vec<u16>,
}

/// The other end of an uplink: a switch (chassis) and its port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Neighbour {
    /// LLDP chassis id or system name; for a declared neighbour, the name
    /// the operator gave.
    pub chassis: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uplink {
    /// The host interface, e.g. `eth1`.
    pub name: String,
    /// What the operator says it connects to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_neighbour: Option<Neighbour>,
    /// What LLDP says it connects to, where a neighbour speaks LLDP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lldp_neighbour: Option<Neighbour>,
}

impl Uplink {
    /// `Some(false)` when both are known and disagree: a cabling mistake.
    pub fn neighbour_matches(&self) -> Option<bool> {
        match (&self.declared_neighbour, &self.lldp_neighbour) {
            (Some(d), Some(l)) => {
                Some(d.chassis == l.chassis && (d.port.is_none() || d.port == l.port))
            }
            _ => None,
        }
    }
}

/// What a host reports about itself (`PUT /v1/host/inventory`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Inventory {
    #[serde(default)]
    pub datastores: Vec<Datastore>,
    #[serde(default)]
    pub qemu: QemuInfo,
    #[serde(default)]
    pub memory: MemoryInfo,
    #[serde(default)]
    pub port_groups: Vec<PortGroupInfo>,
    #[serde(default)]
    pub uplinks: Vec<Uplink>,
    /// tandemd's version.
    #[serde(default)]
    pub tandem_version: String,
}

/// A member host: `hosts/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// The newest certificate issued to it.
    pub cert: CertRef,
    /// Older certificates that may still be valid (a renewal does not
    /// revoke the one it replaces); `host remove` revokes them all.
    #[serde(default)]
    pub previous_certs: Vec<CertRef>,
    /// Unix seconds.
    pub joined_at: u64,
    /// Unix seconds of the last request from it the manager recorded
    /// (heartbeats are kept in memory and written at most every minute).
    #[serde(default)]
    pub last_seen: Option<u64>,
    /// The address it last called from.
    #[serde(default)]
    pub address: Option<String>,
    /// Where the manager reaches its API (`HOST:PORT`, tandemd's
    /// `--host-api`), as its heartbeats report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_api: Option<String>,
    #[serde(default)]
    pub health: Health,
    /// The last inventory it reported, and when (unix seconds).
    #[serde(default)]
    pub inventory: Option<Inventory>,
    #[serde(default)]
    pub inventory_at: Option<u64>,
    /// The id of the token it joined with.
    #[serde(default)]
    pub joined_with: String,
}

impl HostRecord {
    /// Every serial of this host's that is not yet expired at `now`.
    pub fn live_serials(&self, now: u64) -> Vec<CertRef> {
        std::iter::once(&self.cert)
            .chain(&self.previous_certs)
            .filter(|c| c.not_after > now)
            .cloned()
            .collect()
    }

    /// Whether `serial` is one of this host's certificates.
    pub fn owns_serial(&self, serial: &str) -> bool {
        self.cert.serial == serial || self.previous_certs.iter().any(|c| c.serial == serial)
    }
}

impl Record for HostRecord {
    const KIND: &'static str = "host";
    const SCHEMA: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbour_check() {
        let n = |c: &str, p: Option<&str>| Neighbour {
            chassis: c.into(),
            port: p.map(String::from),
        };
        let mut u = Uplink {
            name: "eth1".into(),
            declared_neighbour: Some(n("sw1", Some("1/1"))),
            lldp_neighbour: None,
        };
        assert_eq!(u.neighbour_matches(), None);
        u.lldp_neighbour = Some(n("sw1", Some("1/1")));
        assert_eq!(u.neighbour_matches(), Some(true));
        u.lldp_neighbour = Some(n("sw1", Some("1/2")));
        assert_eq!(u.neighbour_matches(), Some(false));
        u.declared_neighbour = Some(n("sw1", None));
        assert_eq!(u.neighbour_matches(), Some(true));
    }

    #[test]
    fn serials() {
        let r = HostRecord {
            name: "h".into(),
            cert: CertRef {
                serial: "bb".into(),
                not_after: 200,
            },
            previous_certs: vec![
                CertRef {
                    serial: "aa".into(),
                    not_after: 100,
                },
                CertRef {
                    serial: "a0".into(),
                    not_after: 50,
                },
            ],
            joined_at: 0,
            last_seen: None,
            address: None,
            host_api: None,
            health: Health::default(),
            inventory: None,
            inventory_at: None,
            joined_with: String::new(),
        };
        let live: Vec<_> = r.live_serials(60).into_iter().map(|c| c.serial).collect();
        assert_eq!(live, ["bb", "aa"]);
        assert!(r.owns_serial("a0"));
        assert!(!r.owns_serial("cc"));
    }
}
