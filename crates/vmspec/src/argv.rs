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

/// Node name of a disk's format layer; later work (mirroring) refers to it.
pub fn disk_node_name(disk: &str) -> String {
    format!("disk-{disk}")
}

/// Builds the full argv (without the binary itself) for `spec`.
///
/// The guest starts paused (`-S`): the supervisor connects QMP first and then
/// resumes it, so no guest instruction runs before tandem is watching.
pub fn build_argv(spec: &VmSpec, rt: &RuntimePaths) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-S"]);
    push(&["-msg", "timestamp=on"]);
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
            rt.ram_file.display()
        ),
    ]);
    push(&["-machine", &format!("{},memory-backend=ram0", spec.machine)]);

    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            rt.qmp_socket.display()
        ),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", rt.serial_log.display()),
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
        let mut dev = format!("virtio-blk-pci,drive={node},id=blk-{}", d.name);
        if spec.boot.disk.as_deref() == Some(d.name.as_str()) {
            dev.push_str(",bootindex=0");
        }
        push(&["-device", &dev]);
    }

    for n in &spec.nics {
        let netdev = match n.backend {
            NicBackend::User => {
                let mut s = format!("user,id=net-{}", n.name);
                for f in &n.host_forwards {
                    s.push_str(&format!(
                        ",hostfwd=tcp:127.0.0.1:{}-:{}",
                        f.host_port, f.guest_port
                    ));
                }
                s
            }
            NicBackend::Tap => {
                let tap = n.tap.as_deref().unwrap_or_default();
                format!("tap,id=net-{},ifname={tap},script=no,downscript=no", n.name)
            }
            NicBackend::Switch => {
                let sock = switch_socket(&rt.switch_dir, &spec.name, &n.name);
                // reconnect-ms: if the switch restarts (tandemd upgrade or
                // crash), QEMU re-attaches the NIC by itself.
                push(&[
                    "-chardev",
                    &format!(
                        "socket,id=vu-{},path={},reconnect-ms=1000",
                        n.name,
                        sock.display()
                    ),
                ]);
                format!("vhost-user,id=net-{0},chardev=vu-{0}", n.name)
            }
        };
        push(&["-netdev", &netdev]);
        push(&[
            "-device",
            &format!(
                "virtio-net-pci,netdev=net-{0},mac={1},id=nic-{0}",
                n.name, n.mac
            ),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_and_validate;

    fn rt(accel: Accel) -> RuntimePaths {
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
