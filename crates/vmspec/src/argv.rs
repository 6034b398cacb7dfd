//! Translation of a validated spec into QEMU's argv.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::spec::{DiskFormat, Firmware, NicBackend, VmSpec};

/// The accelerator after `auto` has been resolved on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Host-side paths and decisions that are not part of the spec.
#[derive(Debug, Clone)]
pub struct RuntimePaths {
    pub qemu_binary: PathBuf,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    /// The file that backs guest RAM. It lives on a shared-memory file
    /// system so the replication engine and the switch can map it.
    pub ram_file: PathBuf,
    pub qboot_rom: PathBuf,
    pub accel: Accel,
    /// Start with `-incoming defer`: the guest's devices will be loaded from
    /// a checkpoint (its RAM is already in `ram_file`) instead of booting.
    pub incoming: bool,
    /// Where the switch serves its vhost-user sockets, for switch NICs.
    pub switch_dir: PathBuf,
}

/// The vhost-user socket of a VM's switch NIC: the switch listens on it and
/// QEMU connects.
pub fn switch_socket(switch_dir: &std::path::Path, vm: &str, nic: &str) -> PathBuf {
    switch_dir.join(format!("{vm}.{nic}.sock"))
}

/// A value for QEMU's `key=value,…` option syntax: every `,` doubled, so
/// the value can never end early and start an option of its own. (Spec
/// validation already refuses `,` in the strings it knows of; this covers
/// every value, including the host's own paths.)
pub fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn escape_path(path: &std::path::Path) -> String {
    escape_opt(&path.to_string_lossy())
}

/// Node name of a disk's format layer; later work (mirroring) refers to it.
pub fn disk_node_name(disk: &str) -> String {
    format!("disk-{disk}")
}

/// QEMU's seccomp sandbox as `sandbox = true` asks for it: on, with the
/// optional groups denied as libvirt denies them. tandem's own code inside
/// QEMU (the uffd preload's thread) makes none of those calls.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Builds the full argv (without the binary itself) for `spec`.
///
/// The guest starts paused (`-S`): the supervisor connects QMP first and then
/// resumes it, so no guest instruction runs before tandem is watching.
pub fn build_argv(spec: &VmSpec, rt: &RuntimePaths) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    push(&[
        "-name",
        &format!("guest={},debug-threads=on", escape_opt(&spec.name)),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-S"]);
    push(&["-msg", "timestamp=on"]);
    if spec.sandbox {
        push(&["-sandbox", SANDBOX]);
    }
    push(&["-accel", rt.accel.as_str()]);
    if rt.accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-smp", &spec.vcpus.to_string()]);

    // Guest RAM in a shared file: the core primitive of checkpointing
    // (device-state-only migration with x-ignore-shared) and of vhost-user.
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
            spec.memory_mib,
            escape_path(&rt.ram_file)
        ),
    ]);
    push(&[
        "-machine",
        &format!("{},memory-backend=ram0", escape_opt(&spec.machine)),
    ]);

    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            escape_path(&rt.qmp_socket)
        ),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", escape_path(&rt.serial_log)),
    ]);
    push(&["-serial", "chardev:serial0"]);
    if rt.incoming {
        push(&["-incoming", "defer"]);
    }

    let firmware = match spec.boot.firmware {
        Firmware::Auto if spec.boot.kernel.is_some() => Firmware::Qboot,
        Firmware::Auto => Firmware::Seabios,
        f => f,
    };
    if firmware == Firmware::Qboot {
        push(&["-bios", &rt.qboot_rom.display().to_string()]);
    }
    if let Some(kernel) = &spec.boot.kernel {
        push(&["-kernel", &kernel.display().to_string()]);
        if let Some(initrd) = &spec.boot.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        if !spec.boot.cmdline.is_empty() {
            push(&["-append", &spec.boot.cmdline]);
        }
    }

    for d in &spec.disks {
        let node = disk_node_name(&d.name);
        let blockdev = json!({
            "driver": match d.format { DiskFormat::Qcow2 => "qcow2", DiskFormat::Raw => "raw" },
            "node-name": node,
            "read-only": d.readonly,
            "file": {
                "driver": "file",
                "filename": d.path,
                "node-name": format!("{node}-file"),
                "read-only": d.readonly,
            },
        });
        push(&["-blockdev", &blockdev.to_string()]);
        let mut dev = format!(
            "virtio-blk-pci,drive={},id=blk-{}",
            escape_opt(&node),
            escape_opt(&d.name)
        );
        if spec.boot.disk.as_deref() == Some(d.name.as_str()) {
            dev.push_str(",bootindex=0");
        }
        push(&["-device", &dev]);
    }

    for n in &spec.nics {
        let name = escape_opt(&n.name);
        let netdev = match n.backend {
            NicBackend::User => {
                let mut s = format!("user,id=net-{name}");
                for f in &n.host_forwards {
                    s.push_str(&format!(
                        ",hostfwd=tcp:127.0.0.1:{}-:{}",
                        f.host_port, f.guest_port
                    ));
                }
                s
            }
            NicBackend::Tap => {
                let tap = escape_opt(n.tap.as_deref().unwrap_or_default());
                format!("tap,id=net-{name},ifname={tap},script=no,downscript=no")
            }
            NicBackend::Switch => {
                let sock = switch_socket(&rt.switch_dir, &spec.name, &n.name);
                // reconnect-ms: if the switch restarts (tandemd upgrade or
                // crash), QEMU re-attaches the NIC by itself.
                push(&[
                    "-chardev",
                    &format!(
                        "socket,id=vu-{name},path={},reconnect-ms=1000",
                        escape_path(&sock)
                    ),
                ]);
                format!("vhost-user,id=net-{name},chardev=vu-{name}")
            }
        };
        push(&["-netdev", &netdev]);
        push(&[
            "-device",
            &format!(
                "virtio-net-pci,netdev=net-{name},mac={},id=nic-{name}",
                n.mac
            ),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_and_validate;

    pub(super) fn rt(accel: Accel) -> RuntimePaths {
        RuntimePaths {
            qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
            qmp_socket: "/run/t/qmp.sock".into(),
            serial_log: "/var/t/serial.log".into(),
            ram_file: "/dev/shm/tandem-vm1.ram".into(),
            qboot_rom: "/usr/share/qemu/qboot.rom".into(),
            accel,
            incoming: false,
            switch_dir: "/run/t/switch".into(),
        }
    }

    #[test]
    fn the_sandbox_is_off_unless_asked_for() {
        let spec = parse_and_validate(SPEC, |_| true).unwrap();
        assert!(!spec.sandbox);
        assert!(value_after(&build_argv(&spec, &rt(Accel::Tcg)), "-sandbox").is_empty());
        let text = format!("sandbox = true\n{SPEC}");
        let spec = parse_and_validate(&text, |_| true).unwrap();
        assert_eq!(
            value_after(&build_argv(&spec, &rt(Accel::Tcg)), "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
    }

    #[test]
    fn incoming_waits_for_a_checkpoint() {
        let spec = parse_and_validate(SPEC, |_| true).unwrap();
        let plain = build_argv(&spec, &rt(Accel::Tcg));
        assert!(!plain.iter().any(|a| a == "-incoming"));
        let mut r = rt(Accel::Tcg);
        r.incoming = true;
        let a = build_argv(&spec, &r);
        assert_eq!(value_after(&a, "-incoming"), ["defer"]);
    }

    const SPEC: &str = r#"
name = "vm1"
memory_mib = 128
[boot]
kernel = "/img/vmlinux"
cmdline = "console=ttyS0 tandem.ip=10.0.0.2/24"
[[disks]]
name = "data"
path = "/img/data.qcow2"
[[nics]]
name = "eth0"
mac = "52:54:00:00:00:01"
backend = "user"
host_forwards = [{ host_port = 17070, guest_port = 7070 }]
"#;

    fn argv(accel: Accel) -> Vec<String> {
        build_argv(&parse_and_validate(SPEC, |_| true).unwrap(), &rt(accel))
    }

    fn value_after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn ram_is_a_shared_file_backend() {
        let a = argv(Accel::Tcg);
        assert_eq!(
            value_after(&a, "-object"),
            ["memory-backend-file,id=ram0,size=128M,mem-path=/dev/shm/tandem-vm1.ram,share=on"]
        );
        assert_eq!(value_after(&a, "-machine"), ["pc,memory-backend=ram0"]);
    }

    #[test]
    fn starts_paused_with_qmp_and_serial() {
        let a = argv(Accel::Tcg);
        assert!(a.contains(&"-S".to_string()));
        assert!(value_after(&a, "-chardev")
            .contains(&"socket,id=qmp,path=/run/t/qmp.sock,server=on,wait=off"));
        assert_eq!(value_after(&a, "-serial"), ["chardev:serial0"]);
    }

    #[test]
    fn kernel_boot_uses_qboot() {
        let a = argv(Accel::Tcg);
        assert_eq!(value_after(&a, "-bios"), ["/usr/share/qemu/qboot.rom"]);
        assert_eq!(
            value_after(&a, "-append"),
            ["console=ttyS0 tandem.ip=10.0.0.2/24"]
        );
    }

    #[test]
    fn accel_kvm_uses_host_cpu_and_tcg_does_not() {
        assert_eq!(value_after(&argv(Accel::Kvm), "-cpu"), ["host"]);
        assert!(value_after(&argv(Accel::Tcg), "-cpu").is_empty());
        assert_eq!(value_after(&argv(Accel::Tcg), "-accel"), ["tcg"]);
    }

    #[test]
    fn disks_are_named_blockdevs_and_nics_carry_macs() {
        let a = argv(Accel::Tcg);
        let bd: serde_json::Value = serde_json::from_str(value_after(&a, "-blockdev")[0]).unwrap();
        assert_eq!(bd["node-name"], "disk-data");
        assert_eq!(bd["file"]["filename"], "/img/data.qcow2");
        let devs = value_after(&a, "-device");
        assert!(devs.contains(&"virtio-blk-pci,drive=disk-data,id=blk-data"));
        assert!(devs.contains(&"virtio-net-pci,netdev=net-eth0,mac=52:54:00:00:00:01,id=nic-eth0"));
        assert_eq!(
            value_after(&a, "-netdev"),
            ["user,id=net-eth0,hostfwd=tcp:127.0.0.1:17070-:7070"]
        );
    }
}

/// M1: whatever a valid spec (and the host's paths) hold, every option
/// value QEMU parses by its comma rules has exactly the keys tandem put
/// there, and every user string is a value, never an option of its own.
#[cfg(test)]
mod injection {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use super::*;
    use crate::spec::{Boot, DiskSpec, HostForward, MacAddr, NicSpec};
    use crate::{Accelerator, DiskFormat, Firmware, NicBackend, VmSpec};

    /// Flags that take no value; every other flag takes exactly one.
    const NO_VALUE: &[&str] = &["-nodefaults", "-no-user-config", "-S"];
    const WITH_VALUE: &[&str] = &[
        "-name",
        "-display",
        "-msg",
        "-sandbox",
        "-accel",
        "-cpu",
        "-smp",
        "-m",
        "-object",
        "-machine",
        "-chardev",
        "-mon",
        "-serial",
        "-incoming",
        "-bios",
        "-kernel",
        "-initrd",
        "-append",
        "-blockdev",
        "-device",
        "-netdev",
    ];
    /// Flags whose value QEMU reads as `[type,]key=value,…`.
    const KEYED: &[&str] = &[
        "-name", "-msg", "-sandbox", "-object", "-machine", "-chardev", "-mon", "-device",
        "-netdev",
    ];

    /// Splits an option value the way QEMU does (QemuOpts and keyval alike):
    /// `,` ends an element, `,,` is a literal comma; an element is
    /// `key=value` (split at its first `=`) or, first only, the implied
    /// type. Returns (key, value) with key `""` for the implied type.
    fn qemu_opts(s: &str) -> Vec<(String, String)> {
        let mut elems = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    elems.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        elems.push(cur);
        elems
            .into_iter()
            .enumerate()
            .map(|(i, e)| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None if i == 0 => (String::new(), e),
                // An element without `=` after the first: QEMU reads it as
                // a boolean flag, i.e. an injected option.
                None => (e, String::from("on")),
            })
            .collect()
    }

    fn keys(opts: &[(String, String)]) -> Vec<&str> {
        opts.iter().map(|(k, _)| k.as_str()).collect()
    }

    fn value<'a>(opts: &'a [(String, String)], key: &str) -> &'a str {
        opts.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no `{key}` in {opts:?}"))
    }

    fn lossy(p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }

    /// Checks one argv against the spec and runtime it was built from.
    fn check(spec: &VmSpec, rt: &RuntimePaths, argv: &[String]) -> Result<(), TestCaseError> {
        // Every element is a flag or the one value of the flag before it.
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        let mut i = 0;
        while i < argv.len() {
            let flag = argv[i].as_str();
            if NO_VALUE.contains(&flag) {
                i += 1;
            } else {
                prop_assert!(WITH_VALUE.contains(&flag), "unexpected flag {flag:?}");
                prop_assert!(i + 1 < argv.len(), "{flag} without a value");
                pairs.push((flag, argv[i + 1].as_str()));
                i += 2;
            }
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (flag, val) in &pairs {
            *seen.entry(flag).or_default() += 1;
            if !KEYED.contains(flag) {
                continue;
            }
            let opts = qemu_opts(val);
            let k = keys(&opts);
            match *flag {
                "-name" => {
                    prop_assert_eq!(&k, &["guest", "debug-threads"]);
                    prop_assert_eq!(value(&opts, "guest"), spec.name.as_str());
                }
                "-msg" => prop_assert_eq!(&k, &["timestamp"]),
                "-sandbox" => {
                    prop_assert!(spec.sandbox);
                    prop_assert_eq!(
                        &k,
                        &[
                            "",
                            "obsolete",
                            "elevateprivileges",
                            "spawn",
                            "resourcecontrol"
                        ]
                    );
                }
                "-mon" => prop_assert_eq!(&k, &["chardev", "mode"]),
                "-object" => {
                    prop_assert_eq!(&k, &["", "id", "size", "mem-path", "share"]);
                    prop_assert_eq!(value(&opts, ""), "memory-backend-file");
                    prop_assert_eq!(value(&opts, "mem-path"), lossy(&rt.ram_file));
                }
                "-machine" => {
                    prop_assert_eq!(&k, &["", "memory-backend"]);
                    prop_assert_eq!(value(&opts, ""), spec.machine.as_str());
                }
                "-chardev" => match (value(&opts, ""), value(&opts, "id")) {
                    ("socket", "qmp") => {
                        prop_assert_eq!(&k, &["", "id", "path", "server", "wait"]);
                        prop_assert_eq!(value(&opts, "path"), lossy(&rt.qmp_socket));
                    }
                    ("file", "serial0") => {
                        prop_assert_eq!(&k, &["", "id", "path"]);
                        prop_assert_eq!(value(&opts, "path"), lossy(&rt.serial_log));
                    }
                    ("socket", id) => {
                        prop_assert_eq!(&k, &["", "id", "path", "reconnect-ms"]);
                        let nic = id.strip_prefix("vu-").expect("vhost-user chardev");
                        let sock = switch_socket(&rt.switch_dir, &spec.name, nic);
                        prop_assert_eq!(value(&opts, "path"), lossy(&sock));
                    }
                    other => prop_assert!(false, "unexpected chardev {other:?}"),
                },
                "-netdev" => {
                    let id = value(&opts, "id");
                    let nic = spec
                        .nics
                        .iter()
                        .find(|n| format!("net-{}", n.name) == id)
                        .expect("a netdev of a spec NIC");
                    match nic.backend {
                        NicBackend::User => {
                            let mut want = vec!["", "id"];
                            want.extend(nic.host_forwards.iter().map(|_| "hostfwd"));
                            prop_assert_eq!(&k, &want);
                            prop_assert_eq!(value(&opts, ""), "user");
                        }
                        NicBackend::Tap => {
                            prop_assert_eq!(&k, &["", "id", "ifname", "script", "downscript"]);
                            prop_assert_eq!(value(&opts, ""), "tap");
                            prop_assert_eq!(
                                value(&opts, "ifname"),
                                nic.tap.as_deref().unwrap_or_default()
                            );
                        }
                        NicBackend::Switch => {
                            prop_assert_eq!(&k, &["", "id", "chardev"]);
                            prop_assert_eq!(value(&opts, ""), "vhost-user");
                        }
                    }
                }
                "-device" => match value(&opts, "") {
                    "virtio-blk-pci" => {
                        let id = value(&opts, "id");
                        let disk = spec
                            .disks
                            .iter()
                            .find(|d| format!("blk-{}", d.name) == id)
                            .expect("a device of a spec disk");
                        let mut want = vec!["", "drive", "id"];
                        if spec.boot.disk.as_deref() == Some(disk.name.as_str()) {
                            want.push("bootindex");
                        }
                        prop_assert_eq!(&k, &want);
                        prop_assert_eq!(value(&opts, "drive"), disk_node_name(&disk.name));
                    }
                    "virtio-net-pci" => {
                        prop_assert_eq!(&k, &["", "netdev", "mac", "id"]);
                    }
                    other => prop_assert!(false, "unexpected device {other:?}"),
                },
                _ => unreachable!(),
            }
        }
        for (flag, val) in &pairs {
            if *flag == "-blockdev" {
                let bd: serde_json::Value = serde_json::from_str(val).expect("JSON blockdev");
                let obj = bd.as_object().expect("object");
                let mut top: Vec<&str> = obj.keys().map(String::as_str).collect();
                top.sort_unstable();
                prop_assert_eq!(top, ["driver", "file", "node-name", "read-only"]);
                let file = bd["file"].as_object().expect("file object");
                let mut fk: Vec<&str> = file.keys().map(String::as_str).collect();
                fk.sort_unstable();
                prop_assert_eq!(fk, ["driver", "filename", "node-name", "read-only"]);
                prop_assert!(spec
                    .disks
                    .iter()
                    .any(|d| bd["file"]["filename"] == lossy(&d.path).as_str()));
            }
            if *flag == "-append" {
                prop_assert_eq!(*val, spec.boot.cmdline.as_str());
            }
        }
        let switch_nics = spec
            .nics
            .iter()
            .filter(|n| n.backend == NicBackend::Switch)
            .count();
        prop_assert_eq!(seen.get("-object").copied(), Some(1));
        prop_assert_eq!(seen.get("-machine").copied(), Some(1));
        prop_assert_eq!(seen.get("-chardev").copied(), Some(2 + switch_nics));
        prop_assert_eq!(seen.get("-netdev").copied().unwrap_or(0), spec.nics.len());
        prop_assert_eq!(
            seen.get("-device").copied().unwrap_or(0),
            spec.nics.len() + spec.disks.len()
        );
        prop_assert_eq!(
            seen.get("-blockdev").copied().unwrap_or(0),
            spec.disks.len()
        );
        Ok(())
    }

    /// Mostly well-formed strings, sometimes hostile ones: QEMU option
    /// syntax (`,`, `=`), flags, anything printable.
    fn text(good: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![
            12 => proptest::string::string_regex(good).unwrap(),
            1 => "[a-z0-9,=.-]{1,12}",
            1 => "[ -~]{0,16}",
        ]
    }

    fn path() -> impl Strategy<Value = PathBuf> {
        prop_oneof![
            12 => "(/[a-zA-Z0-9_.=-]{1,8}){1,3}",
            1 => "(/[a-z0-9,=.-]{1,8}){1,3}",
            1 => "[ -~]{0,16}",
        ]
        .prop_map(PathBuf::from)
    }

    fn host_path() -> impl Strategy<Value = PathBuf> {
        // The host's own paths (state and RAM directories) are not checked
        // by spec validation at all: commas must be escaped.
        "(/[a-z0-9,=. -]{1,8}){1,3}".prop_map(PathBuf::from)
    }

    fn name() -> impl Strategy<Value = String> {
        text("[a-zA-Z0-9][a-zA-Z0-9._-]{0,10}")
    }

    fn machine() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => Just("pc".to_string()),
            2 => Just("q35".to_string()),
            1 => Just("microvm".to_string()),
            3 => "pc-[a-z0-9.-]{0,12}",
            2 => "pc-[a-z0-9.,=/-]{0,16}",
            1 => "[ -~]{0,16}",
        ]
    }

    fn disk() -> impl Strategy<Value = DiskSpec> {
        (name(), path(), any::<bool>(), any::<bool>()).prop_map(|(name, path, qcow, readonly)| {
            DiskSpec {
                name,
                path,
                format: if qcow {
                    DiskFormat::Qcow2
                } else {
                    DiskFormat::Raw
                },
                readonly,
            }
        })
    }

    fn nic() -> impl Strategy<Value = NicSpec> {
        (
            name(),
            any::<[u8; 5]>(),
            0u8..3,
            text("[a-z0-9_.-]{1,15}"),
            name(),
            proptest::collection::vec((1u16.., 1u16..), 0..3),
        )
            .prop_map(|(name, mac, backend, tap, group, forwards)| {
                let backend =
                    [NicBackend::User, NicBackend::Tap, NicBackend::Switch][backend as usize];
                NicSpec {
                    name,
                    mac: MacAddr([0x52, mac[0], mac[1], mac[2], mac[3], mac[4]]),
                    backend,
                    tap: (backend == NicBackend::Tap).then_some(tap),
                    port_group: (backend == NicBackend::Switch).then_some(group),
                    host_forwards: if backend == NicBackend::User {
                        forwards
                            .into_iter()
                            .map(|(host_port, guest_port)| HostForward {
                                host_port,
                                guest_port,
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                }
            })
    }

    fn spec() -> impl Strategy<Value = VmSpec> {
        (
            (name(), 1u32..4, 32u64..1024, machine(), any::<bool>()),
            (
                any::<bool>(),
                path(),
                proptest::option::of(path()),
                "[ -~]{0,40}",
            ),
            proptest::collection::vec(disk(), 0..3),
            proptest::collection::vec(nic(), 0..3),
        )
            .prop_map(
                |(
                    (name, vcpus, memory_mib, machine, sandbox),
                    (by_kernel, kernel, initrd, cmdline),
                    disks,
                    nics,
                )| {
                    let boot = if by_kernel || disks.is_empty() {
                        Boot {
                            kernel: Some(kernel),
                            initrd,
                            cmdline,
                            disk: None,
                            firmware: Firmware::Auto,
                        }
                    } else {
                        Boot {
                            kernel: None,
                            initrd: None,
                            cmdline: String::new(),
                            disk: Some(disks[0].name.clone()),
                            firmware: Firmware::Seabios,
                        }
                    };
                    VmSpec {
                        name,
                        vcpus,
                        memory_mib,
                        accelerator: Accelerator::Auto,
                        machine,
                        shutdown_timeout_s: 30,
                        sandbox,
                        boot,
                        disks,
                        nics,
                    }
                },
            )
    }

    fn runtime() -> impl Strategy<Value = RuntimePaths> {
        (
            host_path(),
            host_path(),
            host_path(),
            host_path(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(qmp, serial, ram, switch_dir, kvm, incoming)| RuntimePaths {
                    qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
                    qmp_socket: qmp,
                    serial_log: serial,
                    ram_file: ram,
                    qboot_rom: "/usr/share/qemu/qboot.rom".into(),
                    accel: if kvm { Accel::Kvm } else { Accel::Tcg },
                    incoming,
                    switch_dir,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            max_global_rejects: 1 << 16,
            ..ProptestConfig::default()
        })]

        #[test]
        fn no_option_is_injected(spec in spec(), rt in runtime()) {
            prop_assume!(spec.validate(|_| true).is_ok());
            let argv = build_argv(&spec, &rt);
            check(&spec, &rt, &argv)?;
        }
    }

    /// The checker itself catches an injection: an unescaped comma in a
    /// path, or a machine with options, gives extra keys.
    #[test]
    fn the_checker_sees_injected_options() {
        let opts = qemu_opts("memory-backend-file,id=ram0,mem-path=/a,,b,share=on");
        assert_eq!(keys(&opts), ["", "id", "mem-path", "share"]);
        assert_eq!(value(&opts, "mem-path"), "/a,b");
        let opts = qemu_opts("pc,initrd=/etc/shadow,memory-backend=ram0");
        assert_eq!(keys(&opts), ["", "initrd", "memory-backend"]);
        let opts = qemu_opts("file,id=serial0,path=/x,mux");
        assert_eq!(keys(&opts), ["", "id", "path", "mux"]);
    }

    /// Host paths with commas reach QEMU escaped.
    #[test]
    fn host_paths_are_escaped() {
        let spec = crate::parse_and_validate(
            "name = \"vm1\"\nmemory_mib = 128\n[boot]\nkernel = \"/k\"\n",
            |_| true,
        )
        .unwrap();
        let mut rt = super::tests::rt(Accel::Tcg);
        rt.ram_file = "/dev/shm/a,share=off,x/vm1.ram".into();
        let argv = build_argv(&spec, &rt);
        assert!(argv.contains(
            &"memory-backend-file,id=ram0,size=128M,mem-path=/dev/shm/a,,share=off,,x/vm1.ram,share=on"
                .to_string()
        ));
        check(&spec, &rt, &argv).unwrap();
    }
}
