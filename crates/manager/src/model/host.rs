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
    /// LLDP system name, or its chassis id if it sent none; for a declared
    /// neighbour, the operator's text (`tor-1 Ethernet12`) whole.
    pub chassis: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// LLDP only: the chassis id as text (`00:1c:73:aa:bb:cc`). When it
    /// equals `chassis` the neighbour sent no system name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chassis_id: Option<String>,
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
    /// Set by the host when [`Uplink::neighbour_matches`] is `Some(false)`:
    /// what was declared and what LLDP hears, in one line for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour_mismatch: Option<String>,
}

impl Uplink {
    /// `Some(false)` when both are known and disagree: a cabling mistake.
    /// They agree when the declared text names LLDP's system as a word of
    /// its own (any case; `tor-1` names `tor-1.dc1.example` too), and, if
    /// the declared neighbour has a `port` of its own, that port is
    /// LLDP's. `None` when either is unknown, or when LLDP gave no system
    /// name and the declared text does not spell its chassis id: a
    /// description rarely does, so that is no evidence of a mistake.
    pub fn neighbour_matches(&self) -> Option<bool> {
        let (Some(d), Some(l)) = (&self.declared_neighbour, &self.lldp_neighbour) else {
            return None;
        };
        let declared = match &d.port {
            Some(p) => format!("{} {p}", d.chassis),
            None => d.chassis.clone(),
        };
        let named = names(&declared, &l.chassis);
        let anonymous = l.chassis_id.as_deref() == Some(l.chassis.as_str());
        if anonymous && !named {
            return None;
        }
        Some(named && (d.port.is_none() || d.port == l.port))
    }
}

/// Whether free `text` names `name` as a word (split at whitespace and
/// punctuation that does not occur in host names), ignoring case and,
/// for host names, the domain.
fn names(text: &str, name: &str) -> bool {
    let name = name.trim().to_lowercase();
    if name.is_empty() {
        return false;
    }
    let text = text.to_lowercase();
    if name.contains(char::is_whitespace) {
        return text.contains(&name);
    }
    // An address's first label is no host name: 10.0.0.1 is not 10.0.0.2.
    let host = |w: &str| -> String {
        if w.parse::<std::net::IpAddr>().is_ok() {
            w.to_string()
        } else {
            w.split('.').next().unwrap_or(w).to_string()
        }
    };
    text.split(|c: char| c.is_whitespace() || ",;()[]{}<>\"'`|".contains(c))
        .filter(|w| !w.is_empty())
        .any(|w| w == name || host(w) == host(&name))
}

/// What a host reports about itself (`PUT /v1/host/inventory`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Inventory {
    #[serde(default)]
    pub datastores: Vec<Datastore>,
    /// The datastore deployments copy images into and clone from
    /// (tandemd `--datastore`, by default its image directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_dir: Option<String>,
    /// Where other hosts pull images from (`--image-listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_service: Option<String>,
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
            chassis_id: None,
        };
        let mut u = Uplink {
            name: "eth1".into(),
            declared_neighbour: Some(n("sw1", Some("1/1"))),
            lldp_neighbour: None,
            neighbour_mismatch: None,
        };
        assert_eq!(u.neighbour_matches(), None);
        u.lldp_neighbour = Some(n("sw1", Some("1/1")));
        assert_eq!(u.neighbour_matches(), Some(true));
        u.lldp_neighbour = Some(n("sw1", Some("1/2")));
        assert_eq!(u.neighbour_matches(), Some(false));
        u.declared_neighbour = Some(n("sw1", None));
        assert_eq!(u.neighbour_matches(), Some(true));
    }

    /// A declared neighbour is the operator's text; LLDP's is a system
    /// name, a port id and a chassis id.
    #[test]
    fn declared_text_against_lldp() {
        let lldp = |name: Option<&str>, port: &str| Neighbour {
            chassis: name.unwrap_or("00:1c:73:aa:bb:cc").into(),
            port: Some(port.into()),
            chassis_id: Some("00:1c:73:aa:bb:cc".into()),
        };
        let check = |declared: &str, heard: Neighbour| {
            Uplink {
                name: "eth1".into(),
                declared_neighbour: Some(Neighbour {
                    chassis: declared.into(),
                    port: None,
                    chassis_id: None,
                }),
                lldp_neighbour: Some(heard),
                neighbour_mismatch: None,
            }
            .neighbour_matches()
        };
        let tor1 = || lldp(Some("tor-1"), "Ethernet12");
        assert_eq!(check("tor-1 Ethernet12", tor1()), Some(true));
        assert_eq!(check("TOR-1, port 12", tor1()), Some(true));
        assert_eq!(check("tor-1.dc1.example Et12", tor1()), Some(true));
        assert_eq!(
            check("tor-1 Et12", lldp(Some("tor-1.dc1.example"), "x")),
            Some(true)
        );
        assert_eq!(
            check("tor-2 Ethernet12 / tor-1 Ethernet12", tor1()),
            Some(true)
        );
        assert_eq!(check("tor-2 Ethernet12", tor1()), Some(false));
        assert_eq!(check("tor-10 Ethernet12", tor1()), Some(false), "a word");
        assert_eq!(check("rack tor-1x", tor1()), Some(false));
        assert_eq!(
            check("core switch 7", lldp(Some("Core Switch"), "1")),
            Some(true)
        );
        // No system name: only a declared chassis id says anything.
        assert_eq!(check("tor-1 Ethernet12", lldp(None, "12")), None);
        assert_eq!(
            check("00:1C:73:AA:BB:CC port 12", lldp(None, "12")),
            Some(true)
        );
        // Addresses are compared whole.
        let by_ip = Neighbour {
            chassis: "10.0.0.1".into(),
            port: Some("1".into()),
            chassis_id: Some("10.0.0.1".into()),
        };
        assert_eq!(check("10.0.0.2", by_ip.clone()), None);
        assert_eq!(check("10.0.0.1 port 1", by_ip), Some(true));
    }

    /// Inventories from before the LLDP fields read as they did, and the
    /// fields stay out of what an uplink without them writes.
    #[test]
    fn uplinks_read_and_write_compatibly() {
        let old = r#"{"name":"eth1","declared_neighbour":{"chassis":"sw1","port":"1/1"}}"#;
        let u: Uplink = serde_json::from_str(old).unwrap();
        assert_eq!(u.declared_neighbour.as_ref().unwrap().chassis_id, None);
        assert_eq!(u.neighbour_mismatch, None);
        assert_eq!(serde_json::to_string(&u).unwrap(), old);
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
