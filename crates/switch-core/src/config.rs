//! The switch's declarative configuration document and its validation.
//!
//! One TOML (or JSON) document describes the whole switch: table limits,
//! port groups (the policy), uplinks and host ports. VM ports are not in
//! it: they come and go with VMs and name a port group. A document is
//! validated completely — every problem is reported with the path of the
//! field that has it — before anything is changed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::shaper::ShapingPolicy;

pub const DEFAULT_TABLE_LIMIT: usize = 4096;
pub const DEFAULT_AGING_S: u64 = 300;
pub const DEFAULT_QUEUE_FRAMES: usize = 1024;
/// The VLAN an access port group uses when it names none.
pub const DEFAULT_VLAN: u16 = 1;
/// The smallest MTU an interface may be given: IPv4's minimum.
pub const MIN_MTU: u32 = 68;
/// The smallest MTU of an interface that carries IPv6 (RFC 8200); below
/// it the kernel takes IPv6 off the interface.
pub const MIN_MTU_V6: u32 = 1280;
/// The largest MTU a port may be given: the payload of the largest frame
/// the switch carries ([`crate::port::MAX_FRAME`] less the Ethernet
/// header and two tags). A larger MTU would let the host send frames the
/// switch can only drop.
pub const MAX_MTU: u32 = 1500;
/// Most addresses on one host port.
pub const MAX_HOST_ADDRESSES: usize = 64;
/// Longest declared neighbour of an uplink, in bytes: LLDP's own limit for
/// a system name.
pub const MAX_NEIGHBOUR: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchDocument {
    #[serde(default)]
    pub switch: SwitchSettings,
    #[serde(default, rename = "port_group")]
    pub port_groups: Vec<PortGroup>,
    #[serde(default, rename = "uplink")]
    pub uplinks: Vec<UplinkSpec>,
    #[serde(default, rename = "host_port")]
    pub host_ports: Vec<HostPortSpec>,
}

impl Default for SwitchDocument {
    /// A switch with one port group, `default` (access VLAN 1), and no
    /// uplinks: VMs on one host can reach each other, nothing else.
    fn default() -> Self {
        Self {
            switch: SwitchSettings::default(),
            port_groups: vec![PortGroup::named("default")],
            uplinks: vec![],
            host_ports: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwitchSettings {
    /// Most MAC table entries (all VLANs together).
    pub mac_table_limit: usize,
    /// Seconds after which an address not seen again is forgotten.
    pub mac_aging_s: u64,
    /// Frames each port may have waiting to leave before it drops.
    pub port_queue_frames: usize,
}

impl Default for SwitchSettings {
    fn default() -> Self {
        Self {
            mac_table_limit: DEFAULT_TABLE_LIMIT,
            mac_aging_s: DEFAULT_AGING_S,
            port_queue_frames: DEFAULT_QUEUE_FRAMES,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VlanMode {
    /// Untagged frames on the port, in one VLAN (`vlan`).
    #[default]
    Access,
    /// 802.1Q-tagged frames of the `allowed_vlans`; untagged frames belong
    /// to `native_vlan` if one is set and are dropped otherwise.
    Trunk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortGroup {
    pub name: String,
    #[serde(default)]
    pub vlan_mode: VlanMode,
    /// Access VLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Trunk VLANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_vlans: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_vlan: Option<u16>,
    /// Policing of what the port sends into the switch (a VM's transmit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping_in: Option<ShapingPolicy>,
    /// Policing of what the switch delivers to the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping_out: Option<ShapingPolicy>,
    /// May a VM send with a source MAC other than its NIC's?
    #[serde(default)]
    pub allow_mac_change: bool,
    /// Does a port see every frame of its VLAN, not only its own?
    #[serde(default)]
    pub allow_promiscuous: bool,
    /// Most addresses learned on one port (0: only the table's limit).
    #[serde(default)]
    pub learn_limit: usize,
    /// Every port of the group (VM ports, host ports, uplinks) forwards
    /// nothing, either way; what it would have sent or received is counted
    /// as a `blocked` drop. Left out of the serialized form when false, so
    /// documents written before the field keep their digest.
    #[serde(default, skip_serializing_if = "is_false")]
    pub blocked: bool,
    /// DHCP snooping: bindings (MAC, IP, VLAN, port, lease) are learned
    /// from the server's ACKs, and DHCP server messages from this group's
    /// VM ports are dropped (counted `dhcp-server`) unless `dhcp_trusted`.
    /// Uplinks and host ports are always trusted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dhcp_snooping: bool,
    /// This group's VM ports may answer as DHCP servers.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dhcp_trusted: bool,
    /// Where a host asks (RFC 4388 lease query, or an assisted renewal)
    /// for the lease of a VM that arrives without its binding (a failover,
    /// a migration from a host that had none). Servers recorded in a
    /// binding are asked first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dhcp_servers: Vec<std::net::Ipv4Addr>,
    /// IP source guard (needs `dhcp_snooping`): a VM port sends IPv4 and
    /// ARP only from an address it holds a binding for (DHCP to a server
    /// always passes); others are dropped, counted `source-guard`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ip_source_guard: bool,
    /// A VM that arrives (migrated, failed over) and whose lease nobody
    /// can vouch for: `open` lets it send until its next DHCP exchange
    /// gives it a binding; `block` holds it to DHCP until then.
    #[serde(default, skip_serializing_if = "UnknownLease::is_open")]
    pub unknown_lease: UnknownLease,
    /// IGMP snooping: IPv4 multicast (outside 224.0.0.0/24) reaches this
    /// group's ports only when they joined the group; router ports
    /// (uplinks, ports a query came from) get every group.
    #[serde(default, skip_serializing_if = "is_false")]
    pub igmp_snooping: bool,
}

/// [`PortGroup::unknown_lease`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownLease {
    #[default]
    Open,
    Block,
}

impl UnknownLease {
    fn is_open(&self) -> bool {
        *self == UnknownLease::Open
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl PortGroup {
    pub fn named(name: &str) -> Self {
        Self {
            name: name.into(),
            vlan_mode: VlanMode::Access,
            vlan: None,
            allowed_vlans: vec![],
            native_vlan: None,
            shaping_in: None,
            shaping_out: None,
            allow_mac_change: false,
            allow_promiscuous: false,
            learn_limit: 0,
            blocked: false,
            dhcp_snooping: false,
            dhcp_trusted: false,
            dhcp_servers: vec![],
            ip_source_guard: false,
            unknown_lease: UnknownLease::Open,
            igmp_snooping: false,
        }
    }

    /// Which VLAN an incoming frame belongs to, and whether the port group
    /// accepts it at all (`None`: drop). `tag` is the frame's outer VID.
    pub fn classify(&self, tag: Option<u16>) -> Option<u16> {
        match (self.vlan_mode, tag) {
            (VlanMode::Access, None) => Some(self.vlan.unwrap_or(DEFAULT_VLAN)),
            (VlanMode::Access, Some(_)) => None,
            (VlanMode::Trunk, Some(v)) => self.allowed_vlans.contains(&v).then_some(v),
            (VlanMode::Trunk, None) => self.native_vlan,
        }
    }

    /// How a frame of `vlan` leaves a port of this group: `None` (not a
    /// member), `Some(false)` untagged, `Some(true)` tagged.
    pub fn egress_tagging(&self, vlan: u16) -> Option<bool> {
        match self.vlan_mode {
            VlanMode::Access => (self.vlan.unwrap_or(DEFAULT_VLAN) == vlan).then_some(false),
            VlanMode::Trunk => {
                if self.native_vlan == Some(vlan) {
                    Some(false)
                } else {
                    self.allowed_vlans.contains(&vlan).then_some(true)
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSpec {
    pub name: String,
    /// Host interfaces in failover order: the first one with carrier
    /// carries the traffic.
    pub interfaces: Vec<String>,
    pub port_group: String,
    /// MTU tandem sets on every member interface ([`MIN_MTU`]..=[`MAX_MTU`]);
    /// `None` leaves the interfaces' MTU as it is (and gives back what
    /// tandem changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// What the uplink's members connect to, in the operator's words
    /// (`"tor-1 Ethernet12"`): reported in the host's inventory beside
    /// what LLDP hears, and compared with it. Free-form, printable,
    /// 1..=[`MAX_NEIGHBOUR`] bytes. Left out of the serialized form when
    /// unset, so documents written before the field keep their digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPortSpec {
    pub name: String,
    /// The tap interface tandem creates for the host's stack.
    pub tap: String,
    pub port_group: String,
    /// Addresses tandem assigns to the tap, in CIDR form (`10.0.0.1/24`,
    /// `fd00::1/64`); an apply adds and removes addresses to match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The tap's MTU; `None` keeps the kernel's default (1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl HostPortSpec {
    /// The addresses, parsed; the ones that do not parse (which a
    /// validated document has none of) are left out.
    pub fn cidrs(&self) -> Vec<Cidr> {
        self.addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

impl UplinkSpec {
    /// Whether `other` is the same uplink but for its MTU (and declared
    /// neighbour, which only the inventory reads): it can be changed in
    /// place instead of being recreated.
    pub fn same_but_mtu(&self, other: &UplinkSpec) -> bool {
        self.name == other.name
            && self.interfaces == other.interfaces
            && self.port_group == other.port_group
    }
}

impl HostPortSpec {
    /// Whether `other` is the same host port but for its addresses and
    /// MTU: the tap can be reconfigured in place instead of recreated.
    pub fn same_but_addressing(&self, other: &HostPortSpec) -> bool {
        self.name == other.name && self.tap == other.tap && self.port_group == other.port_group
    }
}

/// An interface address with its prefix length, `ADDR/LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    fn max_prefix(addr: &IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDR/LEN` with a usable host address: not unspecified, loopback,
    /// multicast or the IPv4 broadcast address.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not ADDRESS/PREFIX-LENGTH"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 or IPv6 address"))?;
        let max = Cidr::max_prefix(&addr);
        let prefix: u8 = match p.parse() {
            Ok(n) if (1..=max).contains(&n) && !p.starts_with(['+', '0']) => n,
            _ => return Err(format!("prefix length {p} is not 1..={max}")),
        };
        let unusable = match addr {
            IpAddr::V4(v4) => {
                v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast()
            }
            IpAddr::V6(v6) => v6.is_unspecified() || v6.is_loopback() || v6.is_multicast(),
        };
        if unusable {
            return Err(format!("{addr} cannot be an interface's address"));
        }
        Ok(Cidr { addr, prefix })
    }
}

/// One problem in a document, located by its field path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidDocument(pub Vec<FieldProblem>);

impl fmt::Display for InvalidDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid switch document: ")?;
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// A port that is not in the document but uses one of its port groups.
#[derive(Debug, Clone)]
pub struct PortGroupUser {
    pub port_group: String,
    /// e.g. `vm web1 nic 0`.
    pub who: String,
}

impl SwitchDocument {
    /// Parses TOML; syntax errors and unknown fields name the field.
    pub fn from_toml(text: &str) -> Result<Self, InvalidDocument> {
        toml::from_str(text).map_err(|e| {
            InvalidDocument(vec![FieldProblem {
                field: "document".into(),
                message: e.message().to_string()
                    + &e.span()
                        .map(|s| {
                            let line = text[..s.start.min(text.len())].lines().count().max(1);
                            format!(" (line {line})")
                        })
                        .unwrap_or_default(),
            }])
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// What this configuration is, in 64 hex digits: the SHA-256 of its
    /// canonical JSON (fields in declaration order, defaults spelled out),
    /// so two documents that configure the same switch have the same
    /// digest however their TOML was written. The manager and the hosts
    /// compare running configurations by it.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let d = ring::digest::digest(&ring::digest::SHA256, &json);
        d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn port_group(&self, name: &str) -> Option<&PortGroup> {
        self.port_groups.iter().find(|g| g.name == name)
    }

    /// Checks everything; `users` are the VM ports currently attached, so
    /// a document cannot remove a port group that is in use. Problems are
    /// reported in the order of the document's fields.
    pub fn validate(&self, users: &[PortGroupUser]) -> Result<(), InvalidDocument> {
        let mut c = Checker::default();
        c.settings(&self.switch);
        for (i, g) in self.port_groups.iter().enumerate() {
            c.port_group(i, g);
        }
        for (i, u) in self.uplinks.iter().enumerate() {
            c.uplink(i, u);
        }
        for (i, h) in self.host_ports.iter().enumerate() {
            c.host_port(i, h);
        }
        for u in users {
            c.user(u);
        }
        if c.problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidDocument(c.problems))
        }
    }
}

/// What [`SwitchDocument::validate`] has seen and found so far.
#[derive(Default)]
struct Checker<'a> {
    problems: Vec<FieldProblem>,
    group_names: BTreeSet<&'a str>,
    /// Port name → the field that named it first.
    port_names: BTreeMap<&'a str, String>,
    /// Interface name → the field that used it first.
    ifaces: BTreeMap<&'a str, String>,
    /// Host port address → the field that assigned it first.
    addresses: BTreeMap<IpAddr, String>,
}

fn vid_ok(v: u16) -> bool {
    (1..=4094).contains(&v)
}

impl<'a> Checker<'a> {
    fn bad(&mut self, field: String, message: String) {
        self.problems.push(FieldProblem { field, message });
    }

    fn settings(&mut self, s: &SwitchSettings) {
        if s.mac_table_limit == 0 || s.mac_table_limit > 1_000_000 {
            self.bad(
                "switch.mac_table_limit".into(),
                format!("{} is out of range (1..=1000000)", s.mac_table_limit),
            );
        }
        if s.mac_aging_s == 0 || s.mac_aging_s > 1_000_000 {
            self.bad(
                "switch.mac_aging_s".into(),
                format!("{} is out of range (1..=1000000 seconds)", s.mac_aging_s),
            );
        }
        if s.port_queue_frames < 16 || s.port_queue_frames > 65536 {
            self.bad(
                "switch.port_queue_frames".into(),
                format!("{} is out of range (16..=65536)", s.port_queue_frames),
            );
        }
    }

    fn port_group(&mut self, i: usize, g: &'a PortGroup) {
        let at = |f: &str| format!("port_group[{i}].{f}");
        if let Err(m) = check_name(&g.name, 32) {
            self.bad(at("name"), m);
        }
        if !self.group_names.insert(g.name.as_str()) {
            self.bad(at("name"), format!("duplicate port group `{}`", g.name));
        }
        match g.vlan_mode {
            VlanMode::Access => self.access_vlans(i, g),
            VlanMode::Trunk => self.trunk_vlans(i, g),
        }
        for (f, sp) in [
            ("shaping_in", &g.shaping_in),
            ("shaping_out", &g.shaping_out),
        ] {
            if let Some(sp) = sp {
                self.shaping(&at(f), sp);
            }
        }
        if g.ip_source_guard && !g.dhcp_snooping {
            self.bad(
                at("ip_source_guard"),
                "IP source guard needs dhcp_snooping (its bindings say which addresses a VM holds)"
                    .into(),
            );
        }
        for (j, a) in g.dhcp_servers.iter().enumerate() {
            if a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback() {
                self.bad(
                    at(&format!("dhcp_servers[{j}]")),
                    format!("{a} is not a unicast address"),
                );
            }
        }
    }

    fn access_vlans(&mut self, i: usize, g: &PortGroup) {
        let at = |f: &str| format!("port_group[{i}].{f}");
        if let Some(v) = g.vlan {
            if !vid_ok(v) {
                self.bad(at("vlan"), format!("VLAN {v} is not usable (1..=4094)"));
            }
        }
        if !g.allowed_vlans.is_empty() {
            self.bad(
                at("allowed_vlans"),
                "only a trunk port group has allowed_vlans".into(),
            );
        }
        if g.native_vlan.is_some() {
            self.bad(
                at("native_vlan"),
                "only a trunk port group has a native VLAN".into(),
            );
        }
    }

    fn trunk_vlans(&mut self, i: usize, g: &PortGroup) {
        let at = |f: &str| format!("port_group[{i}].{f}");
        if g.vlan.is_some() {
            self.bad(
                at("vlan"),
                "a trunk port group uses allowed_vlans, not vlan".into(),
            );
        }
        if g.allowed_vlans.is_empty() && g.native_vlan.is_none() {
            self.bad(
                at("allowed_vlans"),
                "a trunk needs at least one VLAN".into(),
            );
        }
        let mut seen = BTreeSet::new();
        for (j, &v) in g.allowed_vlans.iter().enumerate() {
            if !vid_ok(v) {
                self.bad(
                    format!("port_group[{i}].allowed_vlans[{j}]"),
                    format!("VLAN {v} is not usable (1..=4094)"),
                );
            }
            if !seen.insert(v) {
                self.bad(
                    format!("port_group[{i}].allowed_vlans[{j}]"),
                    format!("VLAN {v} is listed twice"),
                );
            }
        }
        if let Some(v) = g.native_vlan {
            if !vid_ok(v) {
                self.bad(
                    at("native_vlan"),
                    format!("VLAN {v} is not usable (1..=4094)"),
                );
            }
        }
    }

    /// `field` is the policy's own field (`port_group[0].shaping_in`).
    fn shaping(&mut self, field: &str, sp: &ShapingPolicy) {
        if sp.average_kbps == 0 {
            self.bad(format!("{field}.average_kbps"), "must be above 0".into());
        }
        if sp.peak_kbps < sp.average_kbps {
            self.bad(
                format!("{field}.peak_kbps"),
                format!(
                    "{} is below the average rate {}",
                    sp.peak_kbps, sp.average_kbps
                ),
            );
        }
        if sp.burst_bytes < crate::port::MAX_FRAME as u64 {
            self.bad(
                format!("{field}.burst_bytes"),
                format!(
                    "{} cannot pass one full frame (at least {})",
                    sp.burst_bytes,
                    crate::port::MAX_FRAME
                ),
            );
        }
    }

    /// A port's name, unique among uplinks and host ports.
    fn port_name(&mut self, at: &dyn Fn(&str) -> String, name: &'a str) {
        if let Err(m) = check_name(name, 32) {
            self.bad(at("name"), m);
        }
        if let Some(prev) = self.port_names.insert(name, at("name")) {
            self.bad(
                at("name"),
                format!("duplicate port name `{name}` (also {prev})"),
            );
        }
    }

    /// A host interface, used by one port only.
    fn iface(&mut self, field: String, ifname: &'a str) {
        if let Err(m) = check_ifname(ifname) {
            self.bad(field.clone(), m);
        }
        if let Some(prev) = self.ifaces.insert(ifname, field.clone()) {
            self.bad(
                field,
                format!("interface `{ifname}` is already used by {prev}"),
            );
        }
    }

    fn known_group(&mut self, field: String, group: &str) {
        if !self.group_names.contains(group) {
            self.bad(field, format!("unknown port group `{group}`"));
        }
    }

    fn uplink(&mut self, i: usize, u: &'a UplinkSpec) {
        let at = |f: &str| format!("uplink[{i}].{f}");
        self.port_name(&at, &u.name);
        if u.interfaces.is_empty() {
            self.bad(
                at("interfaces"),
                "an uplink needs at least one interface".into(),
            );
        }
        for (j, ifname) in u.interfaces.iter().enumerate() {
            self.iface(format!("uplink[{i}].interfaces[{j}]"), ifname);
        }
        self.known_group(at("port_group"), &u.port_group);
        if let Some(mtu) = u.mtu {
            self.mtu(at("mtu"), mtu, false);
        }
        if let Some(n) = &u.neighbour {
            if let Err(m) = check_neighbour(n) {
                self.bad(at("neighbour"), m);
            }
        }
    }

    fn mtu(&mut self, field: String, mtu: u32, has_v6: bool) {
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            self.bad(
                field,
                format!(
                    "MTU {mtu} is out of range ({MIN_MTU}..={MAX_MTU}; the switch carries \
                     frames of at most {MAX_MTU} bytes of payload)"
                ),
            );
        } else if has_v6 && mtu < MIN_MTU_V6 {
            self.bad(
                field,
                format!("MTU {mtu} is below {MIN_MTU_V6}, the least an interface with an IPv6 address needs"),
            );
        }
    }

    fn host_port(&mut self, i: usize, h: &'a HostPortSpec) {
        let at = |f: &str| format!("host_port[{i}].{f}");
        self.port_name(&at, &h.name);
        self.iface(at("tap"), &h.tap);
        self.known_group(at("port_group"), &h.port_group);
        if h.addresses.len() > MAX_HOST_ADDRESSES {
            self.bad(
                at("addresses"),
                format!(
                    "{} addresses; at most {MAX_HOST_ADDRESSES}",
                    h.addresses.len()
                ),
            );
        }
        let mut has_v6 = false;
        for (j, a) in h.addresses.iter().enumerate() {
            let field = format!("host_port[{i}].addresses[{j}]");
            match a.parse::<Cidr>() {
                Ok(c) => {
                    has_v6 |= c.addr.is_ipv6();
                    match self.addresses.get(&c.addr) {
                        Some(prev) => {
                            let m = format!("address {} is already on {prev}", c.addr);
                            self.bad(field, m);
                        }
                        None => {
                            self.addresses.insert(c.addr, field);
                        }
                    }
                }
                Err(m) => self.bad(field, m),
            }
        }
        if let Some(mtu) = h.mtu {
            self.mtu(at("mtu"), mtu, has_v6);
        }
    }

    fn user(&mut self, u: &PortGroupUser) {
        if !self.group_names.contains(u.port_group.as_str()) {
            self.bad(
                "port_group".into(),
                format!(
                    "port group `{}` is in use by {} and cannot be removed",
                    u.port_group, u.who
                ),
            );
        }
    }
}

fn check_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() || name.len() > max {
        return Err(format!("`{name}` must be 1..={max} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "`{name}` may hold only letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

/// A declared neighbour goes into inventories and terminals: printable
/// text with something in it, no longer than LLDP would carry.
fn check_neighbour(text: &str) -> Result<(), String> {
    if text.trim().is_empty() || text.len() > MAX_NEIGHBOUR {
        return Err(format!(
            "a neighbour is 1..={MAX_NEIGHBOUR} bytes of text, not only spaces"
        ));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(format!(
            "a neighbour is printable text; it holds the control character {:?}",
            c
        ));
    }
    Ok(())
}

/// Linux interface names: 1..=15 bytes, no `/`, whitespace or `:`.
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("interface name `{name}` must be 1..=15 characters"));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_names_the_configuration_not_its_spelling() {
        let a = SwitchDocument::from_toml("[[port_group]]\nname = \"web\"\nvlan = 10\n").unwrap();
        let b = SwitchDocument::from_toml(
            "[switch]\nmac_aging_s = 300\n\n[[port_group]]\nvlan = 10\nname = \"web\"\n",
        )
        .unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest().len(), 64);
        let mut c = a.clone();
        c.port_groups[0].vlan = Some(20);
        assert_ne!(a.digest(), c.digest());
    }

    const GOOD: &str = r#"
[switch]
mac_table_limit = 1000

[[port_group]]
name = "web"
vlan = 10

[[port_group]]
name = "db"
vlan = 20
shaping_in = { average_kbps = 10000, peak_kbps = 20000, burst_bytes = 65536 }

[[port_group]]
name = "trunk"
vlan_mode = "trunk"
allowed_vlans = [10, 20]

[[uplink]]
name = "up0"
interfaces = ["eth1", "eth2"]
port_group = "trunk"

[[host_port]]
name = "mgmt"
tap = "tdm-mgmt"
port_group = "web"
"#;

    fn fields(e: InvalidDocument) -> Vec<String> {
        e.0.into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn a_good_document_validates() {
        let d = SwitchDocument::from_toml(GOOD).unwrap();
        d.validate(&[]).unwrap();
        assert_eq!(d.switch.mac_aging_s, DEFAULT_AGING_S, "defaults fill in");
        let again = SwitchDocument::from_toml(&d.to_toml()).unwrap();
        assert_eq!(again, d, "round-trips through TOML");
        SwitchDocument::default().validate(&[]).unwrap();
    }

    #[test]
    fn every_problem_is_named() {
        let text = GOOD
            .replace("vlan = 20", "vlan = 4095")
            .replace("port_group = \"trunk\"", "port_group = \"nope\"")
            .replace("name = \"mgmt\"", "name = \"up0\"");
        let e = SwitchDocument::from_toml(&text)
            .unwrap()
            .validate(&[])
            .unwrap_err();
        let f = fields(e.clone());
        assert!(f.contains(&"port_group[1].vlan".to_string()), "{e}");
        assert!(f.contains(&"uplink[0].port_group".to_string()), "{e}");
        assert!(f.contains(&"host_port[0].name".to_string()), "{e}");
        assert!(e.to_string().contains("4095"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_shapes_are_rejected() {
        let e = SwitchDocument::from_toml("[switch]\nmac_tabel_limit = 3\n").unwrap_err();
        assert!(e.to_string().contains("mac_tabel_limit"), "{e}");
        let text = GOOD.replace("peak_kbps = 20000", "peak_kbps = 5");
        let e = SwitchDocument::from_toml(&text)
            .unwrap()
            .validate(&[])
            .unwrap_err();
        assert_eq!(fields(e), vec!["port_group[1].shaping_in.peak_kbps"]);
        let text = GOOD.replace("allowed_vlans = [10, 20]", "allowed_vlans = [10, 10]");
        let e = SwitchDocument::from_toml(&text)
            .unwrap()
            .validate(&[])
            .unwrap_err();
        assert_eq!(fields(e), vec!["port_group[2].allowed_vlans[1]"]);
    }

    #[test]
    fn a_port_group_in_use_cannot_go() {
        let d = SwitchDocument::from_toml(GOOD).unwrap();
        let users = [PortGroupUser {
            port_group: "gone".into(),
            who: "vm a nic 0".into(),
        }];
        let e = d.validate(&users).unwrap_err();
        assert!(e.to_string().contains("vm a nic 0"), "{e}");
    }

    /// Digests computed by the code before `blocked`, `addresses` and
    /// `mtu` existed: documents that do not use them keep their digest.
    #[test]
    fn documents_without_the_new_fields_keep_their_digest() {
        let d = SwitchDocument::from_toml(GOOD).unwrap();
        assert_eq!(
            d.digest(),
            "849b3e4c9a9a750876941ecfe3d963f296c788b2f4272d86f562e908e1eacdb2"
        );
        assert_eq!(
            SwitchDocument::default().digest(),
            "3084657577d70a8f4fbaa8fafade77615b0c0fe157b97ad4b3c72d09ab09b038"
        );
        // Spelling the new fields with their defaults changes nothing.
        let text = GOOD
            .replace("vlan = 10\n", "vlan = 10\nblocked = false\n")
            .replace(
                "port_group = \"web\"\n",
                "port_group = \"web\"\naddresses = []\n",
            );
        let spelled = SwitchDocument::from_toml(&text).unwrap();
        assert_eq!(spelled.digest(), d.digest());
        assert!(!d.to_toml().contains("blocked"), "{}", d.to_toml());
    }

    proptest::proptest! {
        /// Serializing a document without the new fields writes none of
        /// them, whatever else it holds: the canonical JSON (and so the
        /// digest) is what it was before they existed.
        #[test]
        fn the_new_fields_stay_out_of_documents_that_do_not_use_them(
            vlans in proptest::collection::vec(1u16..4095, 0..4),
            promisc in proptest::prelude::any::<bool>(),
            learn in 0usize..10,
            ifaces in proptest::collection::vec("[a-z]{1,8}", 1..3),
        ) {
            let mut d = SwitchDocument::default();
            for (i, v) in vlans.iter().enumerate() {
                let mut g = PortGroup::named(&format!("g{i}"));
                g.vlan = Some(*v);
                g.allow_promiscuous = promisc;
                g.learn_limit = learn;
                d.port_groups.push(g);
            }
            d.uplinks.push(UplinkSpec {
                name: "up".into(),
                interfaces: ifaces,
                port_group: "default".into(),
                mtu: None,
                neighbour: None,
            });
            d.host_ports.push(HostPortSpec {
                name: "h".into(),
                tap: "t".into(),
                port_group: "default".into(),
                addresses: vec![],
                mtu: None,
            });
            let json = serde_json::to_string(&d).unwrap();
            for field in ["blocked", "addresses", "mtu", "neighbour"] {
                // As a key: an interface may be called `mtu`.
                let key = format!("\"{field}\":");
                proptest::prop_assert!(!json.contains(&key), "{json}");
            }
            let again = SwitchDocument::from_toml(&d.to_toml()).unwrap();
            proptest::prop_assert_eq!(again.digest(), d.digest());
        }
    }

    #[test]
    fn the_new_fields_parse_round_trip_and_count_in_the_digest() {
        let text = GOOD.replace(
            "tap = \"tdm-mgmt\"\n",
            "tap = \"tdm-mgmt\"\naddresses = [\"10.1.0.5/24\", \"fd00::5/64\"]\nmtu = 1400\n",
        ) + "\n[[port_group]]\nname = \"cut\"\nblocked = true\n";
        let text = text.replace(
            "interfaces = [\"eth1\", \"eth2\"]\n",
            "interfaces = [\"eth1\", \"eth2\"]\nmtu = 1500\n",
        );
        let d = SwitchDocument::from_toml(&text).unwrap();
        d.validate(&[]).unwrap();
        assert_eq!(d.host_ports[0].mtu, Some(1400));
        assert_eq!(d.uplinks[0].mtu, Some(1500));
        assert!(d.port_group("cut").unwrap().blocked);
        let cidrs = d.host_ports[0].cidrs();
        assert_eq!(cidrs.len(), 2);
        assert_eq!(cidrs[0].to_string(), "10.1.0.5/24");
        assert_eq!(cidrs[1].prefix, 64);
        assert_eq!(SwitchDocument::from_toml(&d.to_toml()).unwrap(), d);
        let base = SwitchDocument::from_toml(GOOD).unwrap();
        assert_ne!(d.digest(), base.digest());
        let mut b = base.clone();
        b.port_groups[0].blocked = true;
        assert_ne!(b.digest(), base.digest());
    }

    #[test]
    fn bad_addresses_and_mtus_are_named() {
        let with = |addrs: &str, mtu: &str, up_mtu: &str| {
            let text = GOOD
                .replace(
                    "tap = \"tdm-mgmt\"\n",
                    &format!("tap = \"tdm-mgmt\"\naddresses = {addrs}\n{mtu}"),
                )
                .replace(
                    "interfaces = [\"eth1\", \"eth2\"]\n",
                    &format!("interfaces = [\"eth1\", \"eth2\"]\n{up_mtu}"),
                );
            SwitchDocument::from_toml(&text).unwrap().validate(&[])
        };
        with(r#"["10.0.0.1/32", "fe80::1/64"]"#, "mtu = 1280\n", "").unwrap();
        let e = with(
            r#"["10.0.0.1", "10.0.0.1/33", "300.0.0.1/24", "fd00::1/129", "fd00::1/0", "127.0.0.1/8", "224.0.0.1/4", "::/64", "x/1", "10.0.0.2/24", "10.0.0.2/16", "10.0.0.3/+8"]"#,
            "mtu = 67\n",
            "mtu = 1501\n",
        )
        .unwrap_err();
        let f = fields(e.clone());
        let want: Vec<String> = (0..12)
            .filter(|&j| j != 9)
            .map(|j| format!("host_port[0].addresses[{j}]"))
            .chain(["host_port[0].mtu".to_string()])
            .collect();
        let mut want = want;
        want.insert(0, "uplink[0].mtu".into());
        assert_eq!(f, want, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("already on host_port[0].addresses[9]"),
            "{msg}"
        );
        assert!(msg.contains("prefix length 33 is not 1..=32"), "{msg}");
        assert!(msg.contains("MTU 1501 is out of range"), "{msg}");

        // IPv6 needs an MTU of 1280.
        let e = with(r#"["fd00::1/64"]"#, "mtu = 1279\n", "").unwrap_err();
        assert_eq!(fields(e.clone()), vec!["host_port[0].mtu"]);
        assert!(e.to_string().contains("1280"), "{e}");
        with(r#"["10.0.0.1/24"]"#, "mtu = 576\n", "mtu = 68\n").unwrap();

        // One address on two host ports.
        let text = GOOD.replace(
            "tap = \"tdm-mgmt\"\n",
            "tap = \"tdm-mgmt\"\naddresses = [\"10.0.0.1/24\"]\n",
        ) + "\n[[host_port]]\nname = \"m2\"\ntap = \"tdm-m2\"\nport_group = \"web\"\naddresses = [\"10.0.0.1/16\"]\n";
        let e = SwitchDocument::from_toml(&text)
            .unwrap()
            .validate(&[])
            .unwrap_err();
        assert_eq!(fields(e), vec!["host_port[1].addresses[0]"]);
    }

    #[test]
    fn a_declared_neighbour_is_printable_text_and_counts_in_the_digest() {
        let with = |line: &str| {
            let text = GOOD.replace(
                "interfaces = [\"eth1\", \"eth2\"]\n",
                &format!("interfaces = [\"eth1\", \"eth2\"]\n{line}\n"),
            );
            SwitchDocument::from_toml(&text).unwrap()
        };
        let d = with("neighbour = \"tor-1 Ethernet12\"");
        d.validate(&[]).unwrap();
        assert_eq!(d.uplinks[0].neighbour.as_deref(), Some("tor-1 Ethernet12"));
        assert_eq!(SwitchDocument::from_toml(&d.to_toml()).unwrap(), d);
        let base = SwitchDocument::from_toml(GOOD).unwrap();
        assert_ne!(d.digest(), base.digest());
        assert!(
            d.uplinks[0].same_but_mtu(&base.uplinks[0]),
            "changed in place"
        );
        with(&format!("neighbour = \"{}\"", "é".repeat(127)))
            .validate(&[])
            .unwrap();
        for bad in [
            "\"\"".to_string(),
            "\"   \"".to_string(),
            "\"tor-1\\u001b[2J\"".to_string(),
            "\"tor-1\\nEthernet12\"".to_string(),
            format!("\"{}\"", "x".repeat(256)),
        ] {
            let e = with(&format!("neighbour = {bad}"))
                .validate(&[])
                .unwrap_err();
            assert_eq!(fields(e), vec!["uplink[0].neighbour"], "{bad}");
        }
    }

    #[test]
    fn vlan_membership() {
        let d = SwitchDocument::from_toml(GOOD).unwrap();
        let web = d.port_group("web").unwrap();
        assert_eq!(web.classify(None), Some(10));
        assert_eq!(web.classify(Some(10)), None, "access ports take no tags");
        assert_eq!(web.egress_tagging(10), Some(false));
        assert_eq!(web.egress_tagging(20), None);
        let t = d.port_group("trunk").unwrap();
        assert_eq!(t.classify(Some(20)), Some(20));
        assert_eq!(t.classify(Some(30)), None);
        assert_eq!(t.classify(None), None, "no native VLAN");
        assert_eq!(t.egress_tagging(10), Some(true));
    }
}
