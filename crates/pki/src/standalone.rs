//! Standalone pairs: two hosts, no manager (`tandem cluster init
//! --standalone`). An offline CA issues both host certificates at once.
//!
//! Layout under the directory given:
//!
//! ```text
//! DIR/ca/ca.pem, DIR/ca/ca.key         the CA: stays where it was made (offline)
//! DIR/hosts/<a>/identity.pem           copy to host a's identity directory
//! DIR/hosts/<b>/identity.pem           copy to host b's identity directory
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::{validate_name, ClusterCa, Identity, PkiError, Role};

/// How long standalone host certificates are valid: one year.
pub const STANDALONE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The cluster name of a standalone pair's CA.
pub const STANDALONE_CLUSTER_NAME: &str = "standalone";

/// What [`standalone_pair`] and [`standalone_renew`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandalonePair {
    pub cluster_id: String,
    pub ca_dir: PathBuf,
    /// Each host's name and the identity directory made for it.
    pub hosts: Vec<(String, PathBuf)>,
    /// When the earliest of the host certificates expires.
    pub not_after: SystemTime,
}

fn ca_dir(dir: &Path) -> PathBuf {
    dir.join("ca")
}

fn host_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join("hosts").join(name)
}

/// Makes the CA of a standalone pair in `DIR/ca` and host certificates for
/// `a` and `b` (role host, valid [`STANDALONE_VALIDITY`]) in
/// `DIR/hosts/<name>/`. Refuses if `DIR/ca` already holds a CA.
pub fn standalone_pair(dir: &Path, a: &str, b: &str) -> Result<StandalonePair, PkiError> {
    validate_name(a)?;
    validate_name(b)?;
    if a == b {
        return Err(PkiError::InvalidName {
            name: b.to_string(),
            reason: "both hosts of a pair have the same name",
        });
    }
    let ca = ClusterCa::create(&ca_dir(dir), STANDALONE_CLUSTER_NAME)?;
    let mut hosts = Vec::new();
    let mut not_after = ca.not_after();
    for name in [a, b] {
        let issued = ca.issue(name, Role::Host, STANDALONE_VALIDITY)?;
        not_after = not_after.min(issued.not_after);
        let out = host_dir(dir, name);
        ca.identity(&issued)?.save(&out)?;
        hosts.push((name.to_string(), out));
    }
    Ok(StandalonePair {
        cluster_id: ca.cluster_id().to_string(),
        ca_dir: ca_dir(dir),
        hosts,
        not_after,
    })
}

/// `tandem cluster renew --standalone`: new keys and certificates (same
/// names, another [`STANDALONE_VALIDITY`]) for every host identity under
/// `DIR/hosts/`, from the CA in `DIR/ca`. Works on expired certificates.
/// The old certificates stay valid until they expire (nothing revokes them
/// in a standalone pair): copy the new identities to the hosts.
pub fn standalone_renew(dir: &Path) -> Result<StandalonePair, PkiError> {
    let ca = ClusterCa::load(&ca_dir(dir))?;
    let hosts_dir = dir.join("hosts");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&hosts_dir).map_err(|e| PkiError::io(&hosts_dir, e))? {
        let entry = entry.map_err(|e| PkiError::io(&hosts_dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if validate_name(&name).is_ok() && entry.path().join(crate::IDENTITY_FILE).exists() {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(PkiError::Certificate(format!(
            "no host identities under {}",
            hosts_dir.display()
        )));
    }
    let mut hosts = Vec::new();
    let mut not_after = ca.not_after();
    for name in names {
        let out = host_dir(dir, &name);
        let current = Identity::load(&out)?;
        if current.name() != name {
            return Err(PkiError::Certificate(format!(
                "{} holds the identity of {:?}",
                out.display(),
                current.name()
            )));
        }
        let issued = ca.renew(&current, STANDALONE_VALIDITY)?;
        not_after = not_after.min(issued.not_after);
        ca.identity(&issued)?.save(&out)?;
        hosts.push((name, out));
    }
    Ok(StandalonePair {
        cluster_id: ca.cluster_id().to_string(),
        ca_dir: ca_dir(dir),
        hosts,
        not_after,
    })
}
