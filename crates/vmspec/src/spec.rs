//! The VM spec document and its validation.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
pub const MAX_VCPUS: u32 = 64;
const MAX_NAME_LEN: usize = 48;
const MAX_DISKS: usize = 16;
const MAX_NICS: usize = 8;
const MAX_SHUTDOWN_TIMEOUT_S: u64 = 3600;

/// A complete VM definition. Unknown fields are rejected so a typo never
/// silently falls back to a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub accelerator: Accelerator,
    /// QEMU machine type.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Seconds an ACPI power-down may take before the VM is killed.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_s: u64,
    /// Run QEMU under its seccomp sandbox (`-sandbox on`, with obsolete
    /// calls, privilege changes, process spawning and resource control
    /// denied, as libvirt does). Off unless asked for, for now; written
    /// out only when on, so a spec without it reads as before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sandbox: bool,
    pub boot: Boot,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

fn is_false(b: &bool) -> bool {
    !b
}

fn default_vcpus() -> u32 {
    1
}
fn default_machine() -> String {
    "pc".to_string()
}
fn default_shutdown_timeout() -> u64 {
    30
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Kvm,
    Tcg,
    #[default]
    Auto,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
            Accelerator::Auto => "auto",
        })
    }
}

/// How the guest boots: a direct kernel (with optional initrd) or a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    /// Name of a disk in `disks` to boot from, instead of a kernel.
    pub disk: Option<String>,
    #[serde(default)]
    pub firmware: Firmware,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// qboot for a direct kernel boot (fast PVH entry), SeaBIOS for a disk.
    #[default]
    Auto,
    Qboot,
    Seabios,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Qcow2,
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub name: String,
    pub mac: MacAddr,
    #[serde(default)]
    pub backend: NicBackend,
    /// The host tap device, for `backend = "tap"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The switch port group, for `backend = "switch"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_group: Option<String>,
    /// TCP forwards from loopback, for `backend = "user"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_forwards: Vec<HostForward>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicBackend {
    /// QEMU user-mode networking.
    #[default]
    User,
    /// An existing tap device on the host.
    Tap,
    /// A port of tandem's vhost-user switch, in `port_group`.
    Switch,
}

/// A TCP forward from `127.0.0.1:host_port` to `guest_port` in the guest.
/// Only loopback is ever bound: tandem never opens a VM to other addresses
/// through user networking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostForward {
    pub host_port: u16,
    pub guest_port: u16,
}

/// An Ethernet MAC address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacAddrError {
    #[error("`{0}` is not a MAC address (want six hex bytes like 52:54:00:12:34:56)")]
    TooShort(String),
    #[error("`{0}` is not a MAC address (each byte is two hex digits)")]
    ByteWidth(String),
    #[error("`{input}` is not a MAC address (`{part}` is not hex)")]
    NotHex { input: String, part: String },
    #[error("`{0}` is not a MAC address (more than six bytes)")]
    TooLong(String),
}

impl FromStr for MacAddr {
    type Err = MacAddrError;
    fn from_str(s: &str) -> Result<Self, MacAddrError> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts
                .next()
                .ok_or_else(|| MacAddrError::TooShort(s.to_string()))?;
            if part.len() != 2 {
                return Err(MacAddrError::ByteWidth(s.to_string()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacAddrError::NotHex {
                input: s.to_string(),
                part: part.to_string(),
            })?;
        }
        if parts.next().is_some() {
            return Err(MacAddrError::TooLong(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One problem with a spec, located by its field path (`nics[1].mac`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The document is not valid TOML or does not fit the schema (unknown
    /// field, wrong type, missing required field).
    #[error("invalid VM spec: {0}")]
    Syntax(String),
    /// The document parsed but breaks one or more rules; all of them are listed.
    #[error("invalid VM spec: {}", join_errors(.0))]
    Invalid(Vec<FieldError>),
}

fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl SpecError {
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            SpecError::Invalid(e) => e,
            SpecError::Syntax(_) => &[],
        }
    }
}

/// Parses a TOML spec and validates it completely. `file_exists` answers
/// whether a path names an existing regular file; pass `|p| p.is_file()` in
/// production.
pub fn parse_and_validate(
    toml_text: &str,
    file_exists: impl Fn(&Path) -> bool,
) -> Result<VmSpec, SpecError> {
    let spec: VmSpec =
        toml::from_str(toml_text).map_err(|e| SpecError::Syntax(flatten_toml_error(&e)))?;
    spec.validate(file_exists)?;
    Ok(spec)
}

fn flatten_toml_error(e: &toml::de::Error) -> String {
    // toml's Display spans several lines with a source excerpt; an API error
    // reads better as one line that still carries the location.
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Longest machine type accepted (QEMU's are well under 32 characters).
const MAX_MACHINE_LEN: usize = 64;

/// The machine type is interpolated into `-machine TYPE,…`: only an
/// allow-listed alphabet (no `,`, which would start QEMU machine properties
/// such as `initrd=` or `kernel=`) and only the supported families.
fn check_machine(machine: &str) -> Result<(), String> {
    let alphabet = !machine.is_empty()
        && machine.len() <= MAX_MACHINE_LEN
        && machine
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !alphabet {
        let comma = if machine.contains(',') {
            " (a ',' would pass the rest to QEMU as machine options)"
        } else {
            ""
        };
        return Err(format!(
            "`{machine}` is not a machine type: 1-{MAX_MACHINE_LEN} characters of a-z, 0-9, '.' and '-'{comma}"
        ));
    }
    if !matches!(machine, "pc" | "q35" | "microvm") && !machine.starts_with("pc-") {
        return Err(format!(
            "`{machine}` is not a supported machine type (pc, q35, microvm, pc-*)"
        ));
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl VmSpec {
    /// Checks every rule and reports every violation, not just the first.
    pub fn validate(&self, file_exists: impl Fn(&Path) -> bool) -> Result<(), SpecError> {
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                field: field.to_string(),
                message,
            })
        };
        // In document order, so problems are listed as they appear.
        self.check_top(&mut err);
        self.check_boot(&mut err, &file_exists);
        self.check_disks(&mut err, &file_exists);
        self.check_nics(&mut err);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(SpecError::Invalid(errs))
        }
    }

    /// Name, sizes, machine type, shutdown timeout.
    fn check_top(&self, err: &mut impl FnMut(&str, String)) {
        if !valid_name(&self.name) {
            err(
                "name",
                format!("`{}` is not a valid VM name (1-{MAX_NAME_LEN} characters: letters, digits, '-', '_', '.'; starting with a letter or digit)", self.name),
            );
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            err(
                "vcpus",
                format!("must be between 1 and {MAX_VCPUS}, got {}", self.vcpus),
            );
        }
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > MAX_MEMORY_MIB {
            err(
                "memory_mib",
                format!(
                    "must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {}",
                    self.memory_mib
                ),
            );
        }
        if let Err(why) = check_machine(&self.machine) {
            err("machine", why);
        }
        if self.shutdown_timeout_s == 0 || self.shutdown_timeout_s > MAX_SHUTDOWN_TIMEOUT_S {
            err(
                "shutdown_timeout_s",
                format!(
                    "must be between 1 and {MAX_SHUTDOWN_TIMEOUT_S}, got {}",
                    self.shutdown_timeout_s
                ),
            );
        }
    }

    /// The boot source and its options.
    fn check_boot(&self, err: &mut impl FnMut(&str, String), file_exists: &impl Fn(&Path) -> bool) {
        // Boot source: exactly one of kernel or disk.
        match (&self.boot.kernel, &self.boot.disk) {
            (None, None) => err(
                "boot.kernel",
                "missing: give a kernel to boot directly, or boot.disk naming a disk".into(),
            ),
            (Some(_), Some(_)) => err(
                "boot.disk",
                "conflicts with boot.kernel: a VM boots from a kernel or a disk, not both".into(),
            ),
            (Some(kernel), None) => {
                check_path(err, "boot.kernel", kernel, file_exists);
            }
            (None, Some(disk)) => {
                if !self.disks.iter().any(|d| &d.name == disk) {
                    err(
                        "boot.disk",
                        format!("names disk `{disk}`, which is not in disks"),
                    );
                }
                if self.boot.initrd.is_some() {
                    err("boot.initrd", "needs boot.kernel".into());
                }
                if !self.boot.cmdline.is_empty() {
                    err("boot.cmdline", "needs boot.kernel".into());
                }
                if self.boot.firmware == Firmware::Qboot {
                    err(
                        "boot.firmware",
                        "qboot cannot boot from a disk; use seabios".into(),
                    );
                }
            }
        }
        if let Some(initrd) = &self.boot.initrd {
            check_path(err, "boot.initrd", initrd, file_exists);
        }
        if self.boot.cmdline.len() > 4096 {
            err("boot.cmdline", "longer than 4096 bytes".into());
        }
    }

    fn check_disks(
        &self,
        err: &mut impl FnMut(&str, String),
        file_exists: &impl Fn(&Path) -> bool,
    ) {
        if self.disks.len() > MAX_DISKS {
            err(
                "disks",
                format!("at most {MAX_DISKS} disks, got {}", self.disks.len()),
            );
        }
        let mut disk_names = HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_name(&d.name) {
                err(
                    &format!("disks[{i}].name"),
                    format!("`{}` is not a valid disk name", d.name),
                );
            } else if !disk_names.insert(d.name.as_str()) {
                err(
                    &format!("disks[{i}].name"),
                    format!("duplicate disk name `{}`", d.name),
                );
            }
            check_path(err, &format!("disks[{i}].path"), &d.path, file_exists);
        }
    }

    fn check_nics(&self, err: &mut impl FnMut(&str, String)) {
        if self.nics.len() > MAX_NICS {
            err(
                "nics",
                format!("at most {MAX_NICS} NICs, got {}", self.nics.len()),
            );
        }
        let mut nic_names = HashSet::new();
        let mut macs = HashSet::new();
        let mut host_ports = HashSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            if !valid_name(&n.name) {
                err(
                    &format!("nics[{i}].name"),
                    format!("`{}` is not a valid NIC name", n.name),
                );
            } else if !nic_names.insert(n.name.as_str()) {
                err(
                    &format!("nics[{i}].name"),
                    format!("duplicate NIC name `{}`", n.name),
                );
            }
            if n.mac.is_multicast() {
                err(
                    &format!("nics[{i}].mac"),
                    format!("{} is a multicast address", n.mac),
                );
            } else if n.mac.0 == [0; 6] {
                err(
                    &format!("nics[{i}].mac"),
                    "00:00:00:00:00:00 is not a usable address".into(),
                );
            }
            if !macs.insert(n.mac) {
                err(
                    &format!("nics[{i}].mac"),
                    format!("duplicate MAC {}", n.mac),
                );
            }
            for (j, f) in n.host_forwards.iter().enumerate() {
                if n.backend != NicBackend::User {
                    err(
                        &format!("nics[{i}].host_forwards"),
                        "only the user backend forwards ports".into(),
                    );
                    break;
                }
                if f.host_port == 0 || f.guest_port == 0 {
                    err(
                        &format!("nics[{i}].host_forwards[{j}]"),
                        "ports must be non-zero".into(),
                    );
                }
                if !host_ports.insert(f.host_port) {
                    err(
                        &format!("nics[{i}].host_forwards[{j}].host_port"),
                        format!("host port {} is forwarded twice", f.host_port),
                    );
                }
            }
            check_nic_backend(err, i, n);
        }
    }
}

/// The backend-specific fields of NIC `i`: a tap device for tap, a port
/// group for switch, neither otherwise.
fn check_nic_backend(err: &mut impl FnMut(&str, String), i: usize, n: &NicSpec) {
    match (n.backend, &n.tap) {
        (NicBackend::Tap, None) => err(
            &format!("nics[{i}].tap"),
            "missing: the tap backend needs a tap device name".into(),
        ),
        (NicBackend::Tap, Some(tap)) => {
            let ok = !tap.is_empty()
                && tap.len() < 16
                && tap
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !ok {
                err(
                    &format!("nics[{i}].tap"),
                    format!("`{tap}` is not a valid interface name"),
                );
            }
        }
        (NicBackend::User, Some(_)) => err(
            &format!("nics[{i}].tap"),
            "only the tap backend takes a tap device".into(),
        ),
        (NicBackend::User, None) | (NicBackend::Switch, None) => {}
        (NicBackend::Switch, Some(_)) => err(
            &format!("nics[{i}].tap"),
            "only the tap backend takes a tap device".into(),
        ),
    }
    match (n.backend, &n.port_group) {
        (NicBackend::Switch, None) => err(
            &format!("nics[{i}].port_group"),
            "missing: a switch NIC names its port group".into(),
        ),
        (NicBackend::Switch, Some(g)) if !valid_name(g) => err(
            &format!("nics[{i}].port_group"),
            format!("`{g}` is not a valid port group name"),
        ),
        (NicBackend::User | NicBackend::Tap, Some(_)) => err(
            &format!("nics[{i}].port_group"),
            "only a switch NIC has a port group".into(),
        ),
        _ => {}
    }
}

fn check_path(
    err: &mut impl FnMut(&str, String),
    field: &str,
    path: &Path,
    file_exists: &impl Fn(&Path) -> bool,
) {
    let s = path.to_string_lossy();
    if !path.is_absolute() {
        err(field, format!("`{s}` must be an absolute path"));
    } else if s.contains(',') {
        // QEMU option syntax uses ',' as a separator; refusing it here is
        // simpler and safer than escaping it in every option.
        err(
            field,
            format!("`{s}` contains ',', which QEMU options cannot carry"),
        );
    } else if !file_exists(path) {
        err(field, format!("`{s}` does not exist or is not a file"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web1"
vcpus = 1
memory_mib = 256
accelerator = "tcg"

[boot]
kernel = "/img/vmlinux"
initrd = "/img/initrd.img"
cmdline = "console=ttyS0"

[[disks]]
name = "data"
path = "/img/data.qcow2"

[[nics]]
name = "eth0"
mac = "52:54:00:00:00:01"
backend = "user"

[[nics]]
name = "eth1"
mac = "52:54:00:00:00:02"
backend = "tap"
tap = "tap-web1"
"#;

    fn all_exist(_: &Path) -> bool {
        true
    }

    fn errors_of(text: &str) -> Vec<FieldError> {
        match parse_and_validate(text, all_exist) {
            Err(SpecError::Invalid(e)) => e,
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn good_spec_parses_with_defaults() {
        let spec = parse_and_validate(GOOD, all_exist).unwrap();
        assert_eq!(spec.name, "web1");
        assert_eq!(spec.machine, "pc");
        assert_eq!(spec.shutdown_timeout_s, 30);
        assert_eq!(spec.nics[1].backend, NicBackend::Tap);
        assert_eq!(spec.nics[1].tap.as_deref(), Some("tap-web1"));
        assert_eq!(spec.disks[0].format, DiskFormat::Qcow2);
    }

    #[test]
    fn unknown_field_is_named() {
        let text = GOOD.replace("vcpus = 1", "vcpus = 1\ncpus = 2");
        match parse_and_validate(&text, all_exist) {
            Err(SpecError::Syntax(m)) => assert!(m.contains("unknown field `cpus`"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_nested_field_is_named() {
        let text = GOOD.replace(
            "path = \"/img/data.qcow2\"",
            "path = \"/img/data.qcow2\"\nsize = 3",
        );
        match parse_and_validate(&text, all_exist) {
            Err(SpecError::Syntax(m)) => assert!(m.contains("unknown field `size`"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn memory_zero_is_named() {
        let e = errors_of(&GOOD.replace("memory_mib = 256", "memory_mib = 0"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "memory_mib");
    }

    #[test]
    fn missing_kernel_file_is_named() {
        let r = parse_and_validate(GOOD, |p: &Path| !p.ends_with("vmlinux"));
        let e = r.unwrap_err();
        assert_eq!(e.field_errors().len(), 1);
        assert_eq!(e.field_errors()[0].field, "boot.kernel");
        assert!(e.to_string().contains("does not exist"));
    }

    #[test]
    fn absent_boot_source_is_named() {
        let text = GOOD.replace("kernel = \"/img/vmlinux\"\n", "");
        let e = errors_of(&text);
        assert!(
            e.iter()
                .any(|e| e.field == "boot.kernel" && e.message.starts_with("missing")),
            "{e:?}"
        );
    }

    #[test]
    fn duplicate_mac_is_named() {
        let e = errors_of(&GOOD.replace("52:54:00:00:00:02", "52:54:00:00:00:01"));
        assert_eq!(
            e,
            vec![FieldError {
                field: "nics[1].mac".into(),
                message: "duplicate MAC 52:54:00:00:00:01".into()
            }]
        );
    }

    #[test]
    fn all_errors_are_reported_together() {
        let text = GOOD
            .replace("memory_mib = 256", "memory_mib = 1")
            .replace("vcpus = 1", "vcpus = 0")
            .replace("name = \"web1\"", "name = \"bad name\"");
        let fields: Vec<_> = errors_of(&text).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["name", "vcpus", "memory_mib"]);
    }

    #[test]
    fn bad_mac_is_a_syntax_error_naming_the_value() {
        let text = GOOD.replace("52:54:00:00:00:02", "52:54:00:00:02");
        let e = parse_and_validate(&text, all_exist).unwrap_err();
        assert!(e.to_string().contains("52:54:00:00:02"), "{e}");
    }

    #[test]
    fn multicast_mac_rejected() {
        let e = errors_of(&GOOD.replace("52:54:00:00:00:02", "01:00:5e:00:00:01"));
        assert_eq!(e[0].field, "nics[1].mac");
    }

    #[test]
    fn relative_and_comma_paths_rejected() {
        let e = errors_of(&GOOD.replace("/img/data.qcow2", "data,x.qcow2"));
        assert_eq!(e[0].field, "disks[0].path");
        let e = errors_of(&GOOD.replace("/img/data.qcow2", "/img/da,ta.qcow2"));
        assert!(e[0].message.contains("','"));
    }

    #[test]
    fn machine_with_options_is_refused() {
        let e = errors_of(&GOOD.replace(
            "accelerator = \"tcg\"",
            "accelerator = \"tcg\"\nmachine = \"pc-q35-9.0,initrd=/etc/shadow\"",
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "machine");
        assert!(e[0].message.contains("machine options"), "{}", e[0].message);
        for bad in [
            "PC",
            "pc q35",
            "pc-i440fx=1",
            "",
            "isapc",
            "pc-\u{e9}",
            "virt",
        ] {
            assert!(check_machine(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["pc", "q35", "microvm", "pc-q35-9.0", "pc-i440fx-7.2"] {
            assert_eq!(check_machine(good), Ok(()), "{good:?}");
        }
        assert!(check_machine(&format!("pc-{}", "1".repeat(MAX_MACHINE_LEN))).is_err());
    }

    #[test]
    fn disk_boot_needs_existing_disk() {
        let text = GOOD
            .replace("kernel = \"/img/vmlinux\"\n", "disk = \"root\"\n")
            .replace("initrd = \"/img/initrd.img\"\n", "")
            .replace("cmdline = \"console=ttyS0\"\n", "");
        let e = errors_of(&text);
        assert_eq!(e[0].field, "boot.disk");
    }

    #[test]
    fn mac_roundtrip() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:01:02".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:zz".parse::<MacAddr>().is_err());
        assert!("5:54:00:ab:cd:01".parse::<MacAddr>().is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            // Whatever bytes arrive over the API, parsing returns an error
            // or a spec that validates; it never panics.
            #[test]
            fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
                let _ = parse_and_validate(&s, all_exist);
            }

            #[test]
            fn mac_display_parse_roundtrip(b in proptest::array::uniform6(any::<u8>())) {
                let m = MacAddr(b);
                prop_assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
            }

            #[test]
            fn memory_rule_matches_bounds(m in 0u64..4_000_000) {
                let text = GOOD.replace("memory_mib = 256", &format!("memory_mib = {m}"));
                let ok = parse_and_validate(&text, all_exist).is_ok();
                prop_assert_eq!(ok, (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m));
            }
        }
    }
}

#[cfg(test)]
mod example_tests {
    /// The example shipped in the repository stays valid.
    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../../examples/guest.toml");
        let spec = crate::parse_and_validate(text, |_| true).expect("examples/guest.toml is valid");
        assert_eq!(spec.name, "guest");
        assert_eq!(spec.nics[0].host_forwards[0].guest_port, 7070);
    }
}
