//! Who may replicate a VM to this host: the backup's admission rule for
//! the other end of a replication connection, checked at hello before the
//! replica is touched.
//!
//! The replica's own record (identity, generation, one live primary) says
//! which VM a replica belongs to; this says which *host* may send it. A
//! peer is known by how it connected: a local unix socket (root's, 0600:
//! the same host), plain TCP (nobody: refused unless the operator opted
//! out of authentication), or mutual TLS with a cluster certificate (its
//! name and role). The rule is one of:
//!
//! - [`AllowList`]: a standalone pair's static list, certificate name →
//!   the VM UUIDs it may protect here;
//! - [`RecordedPrimaries`]: the cluster manager's authority as this host
//!   caches it, VM UUID → {primary, backup, generation}: only the recorded
//!   primary, at no older a generation, to the recorded backup.

use std::collections::BTreeMap;
use std::path::Path;

use crate::wire::Hello;

/// The other end of an accepted replication connection.
#[derive(Debug, Clone)]
pub enum PeerIdentity {
    /// A unix socket (0600, root's): a process of this host.
    Local(String),
    /// Plain TCP: nothing is known of the peer but its address.
    Unauthenticated(String),
    /// Mutual TLS: the peer's cluster certificate, checked in the
    /// handshake (chain, cluster, validity, revocation).
    Certified {
        addr: String,
        peer: tandem_pki::Peer,
    },
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Local(p) => f.write_str(p),
            PeerIdentity::Unauthenticated(a) => write!(f, "{a} (unauthenticated)"),
            PeerIdentity::Certified { addr, peer } => {
                write!(f, "{} ({}, {addr})", peer.name, peer.role)
            }
        }
    }
}

/// Decides whether a peer may replicate the VM its hello names to this
/// host. `Err` is the refusal, sent to the peer and logged.
pub trait Authority: Send + Sync + std::fmt::Debug {
    fn admit_primary(&self, peer: &PeerIdentity, hello: &Hello) -> Result<(), String>;
}

/// No authority configured: local peers and (with a warning at start)
/// unauthenticated TCP are admitted, as before the cluster identity; a
/// certified peer must be a host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unrestricted;

impl Authority for Unrestricted {
    fn admit_primary(&self, peer: &PeerIdentity, _hello: &Hello) -> Result<(), String> {
        host_role(peer).map(|_| ())
    }
}

/// The peer's certificate name, if it holds a host certificate; local and
/// unauthenticated peers have none.
fn host_role(peer: &PeerIdentity) -> Result<Option<&str>, String> {
    match peer {
        PeerIdentity::Certified { peer, .. } => {
            peer.require_role(&[tandem_pki::Role::Host]).map_err(|_| {
                format!(
                    "`{}` holds a {} certificate; only a host may replicate a VM",
                    peer.name, peer.role
                )
            })?;
            Ok(Some(&peer.name))
        }
        _ => Ok(None),
    }
}

/// Requires a certificate: a local or unauthenticated peer is refused.
fn certified(peer: &PeerIdentity) -> Result<&str, String> {
    match host_role(peer)? {
        Some(name) => Ok(name),
        None if matches!(peer, PeerIdentity::Local(_)) => Ok(""),
        None => Err(format!(
            "{peer} presented no cluster certificate; this backup accepts replication only over mutual TLS"
        )),
    }
}

/// A standalone pair's list (`peers.toml`): which certificate names may
/// protect which VMs to this host.
///
/// ```toml
/// [[peer]]
/// name = "host-a"
/// vms = ["*"]          # or VM UUIDs
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowList {
    #[serde(default, rename = "peer")]
    pub peers: Vec<AllowedPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedPeer {
    pub name: String,
    /// VM UUIDs this peer may protect here; `"*"` for any.
    pub vms: Vec<String>,
}

/// A list or record file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
}

impl AllowList {
    pub fn parse(text: &str) -> Result<AllowList, String> {
        let list: AllowList = toml::from_str(text).map_err(|e| e.to_string())?;
        for p in &list.peers {
            tandem_pki::validate_name(&p.name).map_err(|e| e.to_string())?;
            if p.vms.is_empty() {
                return Err(format!(
                    "peer `{}` may protect no VM: list UUIDs or \"*\"",
                    p.name
                ));
            }
            for v in &p.vms {
                if v != "*" && v.parse::<uuid::Uuid>().is_err() {
                    return Err(format!(
                        "peer `{}`: `{v}` is neither a VM UUID nor \"*\"",
                        p.name
                    ));
                }
            }
        }
        Ok(list)
    }

    pub fn load(path: &Path) -> Result<AllowList, AuthorityFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthorityFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        AllowList::parse(&text).map_err(|why| AuthorityFileError::Invalid {
            path: path.display().to_string(),
            why,
        })
    }
}

impl Authority for AllowList {
    fn admit_primary(&self, peer: &PeerIdentity, hello: &Hello) -> Result<(), String> {
        let name = certified(peer)?;
        if name.is_empty() {
            // A process of this host (root's socket): the host itself.
            return Ok(());
        }
        let Some(entry) = self.peers.iter().find(|p| p.name == name) else {
            return Err(format!("`{name}` is not in this backup's list of peers"));
        };
        let uuid = hello.uuid.to_ascii_lowercase();
        if entry
            .vms
            .iter()
            .any(|v| v == "*" || v.to_ascii_lowercase() == uuid)
        {
            Ok(())
        } else {
            Err(format!(
                "`{name}` may not protect VM {} (`{}`) to this backup",
                hello.uuid, hello.vm
            ))
        }
    }
}

/// One VM's record in the cluster's authority: where it runs and where it
/// is replicated, and the generation of that assignment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmAuthority {
    pub name: String,
    pub primary: String,
    pub backup: String,
    pub generation: u64,
}

/// The manager's authority, as this host caches it (durably, so a host
/// keeps enforcing it while the manager is down).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordedPrimaries {
    /// This host's certificate name: the backup the records must name.
    pub this_host: String,
    /// By VM UUID (lower case).
    pub vms: BTreeMap<String, VmAuthority>,
}

impl RecordedPrimaries {
    pub fn load(path: &Path) -> Result<RecordedPrimaries, AuthorityFileError> {
        let bytes = std::fs::read(path).map_err(|source| AuthorityFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| AuthorityFileError::Invalid {
            path: path.display().to_string(),
            why: e.to_string(),
        })
    }
}

impl Authority for RecordedPrimaries {
    fn admit_primary(&self, peer: &PeerIdentity, hello: &Hello) -> Result<(), String> {
        let name = certified(peer)?;
        if name.is_empty() {
            return Ok(());
        }
        let uuid = hello.uuid.to_ascii_lowercase();
        let Some(rec) = self.vms.get(&uuid) else {
            return Err(format!(
                "VM {} (`{}`) has no record in the cluster's authority",
                hello.uuid, hello.vm
            ));
        };
        if rec.primary != name {
            return Err(format!(
                "`{name}` is not the recorded primary of VM {} (`{}`): `{}` is, at generation {}",
                hello.uuid, hello.vm, rec.primary, rec.generation
            ));
        }
        if rec.backup != self.this_host {
            return Err(format!(
                "VM {} (`{}`) is recorded with backup `{}`, not this host (`{}`)",
                hello.uuid, hello.vm, rec.backup, self.this_host
            ));
        }
        if hello.generation < rec.generation {
            return Err(format!(
                "`{name}` speaks for generation {} of VM {} (`{}`), older than the recorded {}",
                hello.generation, hello.uuid, hello.vm, rec.generation
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};
    use tandem_pki::{Peer, Role};

    const UUID_A: &str = "6f1c8a52-4a4e-4f4e-9d0c-3b1a2c3d4e5f";
    const UUID_B: &str = "0b9e7d1c-1111-4222-8333-944455556666";

    fn hello(uuid: &str, generation: u64) -> Hello {
        Hello {
            vm: "web".into(),
            uuid: uuid.into(),
            generation,
            instance: 1,
            ram_size: 4096,
            page_size: 4096,
            spec_toml: String::new(),
            disks: vec![],
        }
    }

    fn certified_as(name: &str, role: Role) -> PeerIdentity {
        PeerIdentity::Certified {
            addr: "10.0.0.1:1234".into(),
            peer: Peer {
                name: name.into(),
                role,
                cluster_id: "c".into(),
                serial: "01".into(),
                not_after: SystemTime::now() + Duration::from_secs(3600),
            },
        }
    }

    #[test]
    fn an_allow_list_admits_its_peers_for_their_vms_only() {
        let list = AllowList::parse(&format!(
            "[[peer]]\nname = \"host-a\"\nvms = [\"{UUID_A}\"]\n[[peer]]\nname = \"host-c\"\nvms = [\"*\"]\n"
        ))
        .unwrap();
        let a = certified_as("host-a", Role::Host);
        assert!(list.admit_primary(&a, &hello(UUID_A, 0)).is_ok());
        let e = list.admit_primary(&a, &hello(UUID_B, 0)).unwrap_err();
        assert!(e.contains("may not protect"), "{e}");
        assert!(list
            .admit_primary(&certified_as("host-c", Role::Host), &hello(UUID_B, 0))
            .is_ok());
        let e = list
            .admit_primary(&certified_as("host-x", Role::Host), &hello(UUID_A, 0))
            .unwrap_err();
        assert!(e.contains("not in this backup's list"), "{e}");
        let e = list
            .admit_primary(&certified_as("host-a", Role::Operator), &hello(UUID_A, 0))
            .unwrap_err();
        assert!(e.contains("only a host"), "{e}");
        let e = list
            .admit_primary(
                &PeerIdentity::Unauthenticated("10.0.0.9:5".into()),
                &hello(UUID_A, 0),
            )
            .unwrap_err();
        assert!(e.contains("no cluster certificate"), "{e}");
        assert!(list
            .admit_primary(
                &PeerIdentity::Local("unix:/run/x".into()),
                &hello(UUID_A, 0)
            )
            .is_ok());
    }

    #[test]
    fn a_bad_allow_list_is_refused_with_the_reason() {
        for (text, want) in [
            ("[[peer]]\nname = \"Host A\"\nvms = [\"*\"]\n", "name"),
            ("[[peer]]\nname = \"host-a\"\nvms = []\n", "no VM"),
            ("[[peer]]\nname = \"host-a\"\nvms = [\"web\"]\n", "neither"),
            (
                "[[peer]]\nname = \"host-a\"\nvm = [\"*\"]\n",
                "unknown field",
            ),
            ("peer = 3", "invalid type"),
        ] {
            let e = AllowList::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn only_the_recorded_primary_at_its_generation_is_admitted() {
        let mut rec = RecordedPrimaries {
            this_host: "host-b".into(),
            ..Default::default()
        };
        rec.vms.insert(
            UUID_A.into(),
            VmAuthority {
                name: "web".into(),
                primary: "host-a".into(),
                backup: "host-b".into(),
                generation: 3,
            },
        );
        let a = certified_as("host-a", Role::Host);
        assert!(rec.admit_primary(&a, &hello(UUID_A, 3)).is_ok());
        // A valid host certificate, but not the recorded primary.
        let e = rec
            .admit_primary(&certified_as("host-c", Role::Host), &hello(UUID_A, 3))
            .unwrap_err();
        assert!(e.contains("not the recorded primary"), "{e}");
        // The old primary after a handover.
        let e = rec.admit_primary(&a, &hello(UUID_A, 2)).unwrap_err();
        assert!(e.contains("older than the recorded 3"), "{e}");
        let e = rec.admit_primary(&a, &hello(UUID_B, 3)).unwrap_err();
        assert!(e.contains("no record"), "{e}");
        rec.this_host = "host-d".into();
        let e = rec.admit_primary(&a, &hello(UUID_A, 3)).unwrap_err();
        assert!(e.contains("not this host"), "{e}");
    }

    proptest::proptest! {
        /// Whatever an operator writes, parsing answers without panicking.
        #[test]
        fn allow_list_parsing_never_panics(text in ".{0,200}") {
            let _ = AllowList::parse(&text);
        }
    }
}
