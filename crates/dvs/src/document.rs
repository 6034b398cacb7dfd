//! The DVS document: one switch configuration spanning hosts.
//!
//! ```toml
//! [switch]                 # shared by every host (switch-core's settings)
//! mac_table_limit = 4096
//!
//! [[port_group]]           # shared: the policy (VLANs, shaping, security)
//! name = "mgmt"
//! vlan = 10
//!
//! [[host]]                 # one per host: its own uplinks and host ports
//! name = "host-a"
//! [[host.uplink]]
//! name = "up0"
//! interfaces = ["eth1"]
//! port_group = "trunk"
//! [[host.host_port]]
//! name = "mgmt"
//! tap = "tdm-mgmt"
//! port_group = "mgmt"
//! ```
//!
//! Port groups, uplinks and host ports are switch-core's own types, taken
//! whole, so fields added there (and their defaults) flow through without
//! a change here. What a host runs is [`DvsDocument::render`]: the shared
//! part plus its own ports, a complete
//! [`SwitchDocument`], compared across the cluster by its digest.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use tandem_switch_core::config::{
    FieldProblem, HostPortSpec, PortGroup, SwitchDocument, SwitchSettings, UplinkSpec,
};

/// The distributed switch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvsDocument {
    #[serde(default)]
    pub switch: SwitchSettings,
    #[serde(default, rename = "port_group")]
    pub port_groups: Vec<PortGroup>,
    #[serde(default, rename = "host")]
    pub hosts: Vec<DvsHost>,
}

/// One host's part of the distributed switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvsHost {
    /// The host's certificate name in the cluster.
    pub name: String,
    #[serde(default, rename = "uplink", skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<UplinkSpec>,
    #[serde(default, rename = "host_port", skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<HostPortSpec>,
}

/// Every problem of a document, each located by its field path
/// (`host[1].uplink[0].port_group`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidDvs(pub Vec<FieldProblem>);

impl fmt::Display for InvalidDvs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid distributed switch document: ")?;
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// The longest document the manager keeps: a revision history of many of
/// them must stay small, and 1 MiB is thousands of hosts.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

impl DvsDocument {
    /// Parses TOML. Syntax errors and unknown fields are one problem at
    /// `document`, with the line.
    pub fn from_toml(text: &str) -> Result<Self, InvalidDvs> {
        let problem = |message: String| {
            InvalidDvs(vec![FieldProblem {
                field: "document".into(),
                message,
            }])
        };
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(problem(format!(
                "{} bytes; a distributed switch document is at most {MAX_DOCUMENT_BYTES}",
                text.len()
            )));
        }
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    let upto = text.get(..s.start.min(text.len())).unwrap_or(text);
                    format!(" (line {})", upto.lines().count().max(1))
                })
                .unwrap_or_default();
            problem(format!("{}{line}", e.message()))
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    pub fn host(&self, name: &str) -> Option<&DvsHost> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Host names in document order (the default canary is the first).
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// What `host` runs: the shared settings and port groups with its own
    /// uplinks and host ports. `None` if the document has no such host.
    pub fn render(&self, host: &str) -> Option<SwitchDocument> {
        self.host(host).map(|h| self.render_part(h))
    }

    // Built from the default and assigned field by field, so that a field
    // switch-core adds to its document keeps its default here (a struct
    // literal would stop compiling, or worse, be filled in by hand).
    #[allow(clippy::field_reassign_with_default)]
    fn render_part(&self, h: &DvsHost) -> SwitchDocument {
        let mut doc = SwitchDocument::default();
        doc.switch = self.switch.clone();
        doc.port_groups = self.port_groups.clone();
        doc.uplinks = h.uplinks.clone();
        doc.host_ports = h.host_ports.clone();
        doc
    }

    /// Each host's rendering's digest, by host name.
    pub fn digests(&self) -> BTreeMap<String, String> {
        self.hosts
            .iter()
            .map(|h| (h.name.clone(), self.render_part(h).digest()))
            .collect()
    }

    /// Checks everything: host names (certificate names, unique, and
    /// members of the cluster when `members` is given), and every host's
    /// rendering as switch-core validates a switch document. A problem of
    /// the shared part is reported once, at its own path; a host's ports'
    /// problems at `host[i].…`.
    pub fn validate(&self, members: Option<&[String]>) -> Result<(), InvalidDvs> {
        let mut problems: Vec<FieldProblem> = Vec::new();
        let mut push = |p: FieldProblem| {
            if !problems.contains(&p) {
                problems.push(p);
            }
        };
        if self.hosts.is_empty() {
            push(FieldProblem {
                field: "host".into(),
                message: "a distributed switch spans at least one host".into(),
            });
        }
        // The shared part on its own: reported even with no hosts.
        let empty = DvsHost {
            name: String::new(),
            uplinks: vec![],
            host_ports: vec![],
        };
        if let Err(e) = self.render_part(&empty).validate(&[]) {
            for p in e.0 {
                push(p);
            }
        }
        let members: Option<BTreeSet<&str>> =
            members.map(|m| m.iter().map(String::as_str).collect());
        let mut seen = BTreeSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let at = format!("host[{i}]");
            if let Err(m) = check_host_name(&h.name) {
                push(FieldProblem {
                    field: format!("{at}.name"),
                    message: m,
                });
            } else if !seen.insert(h.name.as_str()) {
                push(FieldProblem {
                    field: format!("{at}.name"),
                    message: format!("host `{}` is listed twice", h.name),
                });
            } else if let Some(m) = &members {
                if !m.contains(h.name.as_str()) {
                    push(FieldProblem {
                        field: format!("{at}.name"),
                        message: format!("`{}` is not a member host of the cluster", h.name),
                    });
                }
            }
            if let Err(e) = self.render_part(h).validate(&[]) {
                for p in e.0 {
                    push(FieldProblem {
                        field: host_path(&at, &p.field),
                        message: p.message,
                    });
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidDvs(problems))
        }
    }
}

/// Where a problem of a host's rendering lives in the DVS document: the
/// host's own ports under `host[i]`, the shared part where it is.
fn host_path(at: &str, field: &str) -> String {
    if field.starts_with("uplink") || field.starts_with("host_port") {
        format!("{at}.{field}")
    } else {
        field.to_string()
    }
}

/// A host's certificate name: one DNS label in lower case, not a number
/// (the rule `tandem-pki` applies when it issues the certificate).
pub fn check_host_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("`{name}` must be 1..=63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "`{name}` is not a host's certificate name (a-z, 0-9 and `-` only)"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("`{name}` starts or ends with `-`"));
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{name}` is a number, not a host name"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const GOOD: &str = r#"
[switch]
mac_table_limit = 2000

[[port_group]]
name = "mgmt"
vlan = 10

[[port_group]]
name = "vmnet"
vlan = 20
shaping_in = { average_kbps = 10000, peak_kbps = 20000, burst_bytes = 65536 }

[[port_group]]
name = "trunk"
vlan_mode = "trunk"
allowed_vlans = [10, 20]

[[host]]
name = "host-a"
[[host.uplink]]
name = "up0"
interfaces = ["eth1", "eth2"]
port_group = "trunk"
[[host.host_port]]
name = "mgmt"
tap = "tdm-mgmt"
port_group = "mgmt"

[[host]]
name = "host-b"
[[host.uplink]]
name = "up0"
interfaces = ["ens3"]
port_group = "trunk"
"#;

    fn fields(e: InvalidDvs) -> Vec<String> {
        e.0.into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn a_good_document_renders_each_host() {
        let d = DvsDocument::from_toml(GOOD).unwrap();
        d.validate(None).unwrap();
        d.validate(Some(&["host-a".into(), "host-b".into(), "host-c".into()]))
            .unwrap();
        let a = d.render("host-a").unwrap();
        a.validate(&[]).unwrap();
        assert_eq!(a.switch.mac_table_limit, 2000);
        assert_eq!(a.port_groups.len(), 3);
        assert_eq!(a.uplinks[0].interfaces, ["eth1", "eth2"]);
        assert_eq!(a.host_ports[0].tap, "tdm-mgmt");
        let b = d.render("host-b").unwrap();
        assert!(b.host_ports.is_empty());
        assert!(d.render("host-c").is_none());
        let digests = d.digests();
        assert_eq!(digests["host-a"], a.digest());
        assert_ne!(digests["host-a"], digests["host-b"]);
        // What a host renders is a document the host itself parses back
        // to the same configuration.
        let again = SwitchDocument::from_toml(&a.to_toml()).unwrap();
        assert_eq!(again.digest(), a.digest());
        assert_eq!(DvsDocument::from_toml(&d.to_toml()).unwrap(), d);
    }

    #[test]
    fn problems_are_located_in_the_dvs_document() {
        let text = GOOD
            .replace("vlan = 20", "vlan = 4095")
            .replace(
                "interfaces = [\"ens3\"]",
                "interfaces = [\"ens3\", \"ens3\"]",
            )
            .replace("port_group = \"mgmt\"\n", "port_group = \"nope\"\n");
        let e = DvsDocument::from_toml(&text)
            .unwrap()
            .validate(None)
            .unwrap_err();
        let f = fields(e.clone());
        assert_eq!(
            f,
            [
                "port_group[1].vlan",
                "host[0].host_port[0].port_group",
                "host[1].uplink[0].interfaces[1]",
            ],
            "{e}"
        );
        assert_eq!(
            f.iter().filter(|x| *x == "port_group[1].vlan").count(),
            1,
            "a shared problem is reported once"
        );
    }

    #[test]
    fn host_names_are_members_unique_and_certificate_names() {
        let d = DvsDocument::from_toml(GOOD).unwrap();
        let e = d.validate(Some(&["host-a".into()])).unwrap_err();
        assert_eq!(fields(e.clone()), ["host[1].name"]);
        assert!(e.to_string().contains("not a member"), "{e}");
        let text = GOOD.replace("name = \"host-b\"", "name = \"host-a\"");
        let e = DvsDocument::from_toml(&text)
            .unwrap()
            .validate(None)
            .unwrap_err();
        assert_eq!(fields(e), ["host[1].name"]);
        let text = GOOD.replace("name = \"host-b\"", "name = \"hB\"");
        let e = DvsDocument::from_toml(&text)
            .unwrap()
            .validate(None)
            .unwrap_err();
        assert_eq!(fields(e), ["host[1].name"]);
        let e = DvsDocument::from_toml("[[port_group]]\nname = \"x\"\n")
            .unwrap()
            .validate(None)
            .unwrap_err();
        assert_eq!(fields(e), ["host"]);
    }

    #[test]
    fn syntax_and_unknown_fields_name_the_line() {
        let e = DvsDocument::from_toml("[[host]]\nname = \"a\"\nuplinks = []\n").unwrap_err();
        assert_eq!(fields(e.clone()), ["document"]);
        assert!(e.to_string().contains("uplinks"), "{e}");
        assert!(e.to_string().contains("line"), "{e}");
        let big = "#".repeat(MAX_DOCUMENT_BYTES + 1);
        assert!(DvsDocument::from_toml(&big).is_err());
    }

    #[test]
    fn host_names() {
        for ok in ["a", "host-1", "h0"] {
            check_host_name(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "Host", "a.b", "123", &"a".repeat(64)] {
            assert!(check_host_name(bad).is_err(), "{bad:?}");
        }
    }
}
