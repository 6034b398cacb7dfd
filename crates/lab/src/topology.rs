//! The drill's two-host network, built from namespaces on this machine:
//!
//! ```text
//!   ns A (host A)            ns C (client + fabric)          ns B (host B)
//!   tandemd switch           br0 (10.77.0.100) ── c-a ─┐     tandemd switch
//!    └── uplink a-fab ─────────────────────────────── ─┘ │     uplink b-fab
//!   a-repl 10.88.0.1 ──────── replication link ──────── b-repl 10.88.0.2
//! ```
//!
//! The guest is 10.77.0.10 on whichever host runs it; the fabric bridge in
//! C learns its MAC's new port from QEMU's `announce-self` after failover.
//! Every name carries a per-run tag, and [`Topology`] removes everything it
//! made when dropped, on every exit path.
//!
//! The cluster steps add a manager namespace M on the same fabric
//! ([`Topology::add_manager`]): `m0` (10.79.0.1) cabled to `br0`. A host's
//! management address (10.79.0.11, .12) is on a host port of its tandem
//! switch, so the manager reaches a host only through that switch and its
//! uplink. The fabric is untagged (this kernel has neither 802.1Q
//! interfaces nor VLAN-filtering bridges), so the management VLAN is the
//! uplink trunk's native VLAN, shared with the guest's port group: a
//! change that moves the management port group to another VLAN cuts the
//! host off from the manager and leaves the guest's path alone.

use std::process::Command;

use anyhow::{anyhow, bail, Context};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const GUEST_IP: &str = "10.77.0.10";
pub const CLIENT_IP: &str = "10.77.0.100";
pub const REPL_A: &str = "10.88.0.1";
pub const REPL_B: &str = "10.88.0.2";
/// The switch uplink of each host, by host.
pub const UPLINK_A: &str = "a-fab";
pub const UPLINK_B: &str = "b-fab";
/// The management network of the cluster steps (inside M, A and B only).
pub const MANAGER_IP: &str = "10.79.0.1";
pub const MGMT_A: &str = "10.79.0.11";
pub const MGMT_B: &str = "10.79.0.12";
pub const MANAGER_PORT: u16 = 7443;
pub const HOST_API_PORT: u16 = 7444;

pub struct Topology {
    pub a: String,
    pub b: String,
    pub c: String,
    tag: String,
    made: Vec<String>,
}

pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub(crate) fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut a = vec!["netns", "exec", ns, "ip"];
    a.extend_from_slice(args);
    ip(&a)
}

impl Topology {
    pub fn create(tag: &str) -> anyhow::Result<Topology> {
        let mut t = Topology {
            a: format!("tdrill-{tag}-a"),
            b: format!("tdrill-{tag}-b"),
            c: format!("tdrill-{tag}-c"),
            tag: tag.to_string(),
            made: Vec::new(),
        };
        for ns in [t.a.clone(), t.b.clone(), t.c.clone()] {
            ip(&["netns", "add", &ns])?;
            t.made.push(ns.clone());
            in_ns(&ns, &["link", "set", "lo", "up"])?;
        }
        let c = t.c.clone();
        in_ns(&c, &["link", "add", "br0", "type", "bridge"])?;
        // Forward at once: the drill measures failover, not STP timers.
        in_ns(
            &c,
            &["link", "set", "br0", "type", "bridge", "forward_delay", "0"],
        )?;
        in_ns(&c, &["link", "set", "br0", "up"])?;
        let (a, b) = (t.a.clone(), t.b.clone());
        // Host uplinks into the fabric.
        for (host, inner, outer) in [(&a, "a-fab", "c-a"), (&b, "b-fab", "c-b")] {
            in_ns(
                host,
                &[
                    "link", "add", inner, "type", "veth", "peer", "name", outer, "netns", &c,
                ],
            )?;
            // The host's switch uplink: tandemd's switch owns it.
            in_ns(host, &["link", "set", inner, "up"])?;
            in_ns(&c, &["link", "set", outer, "master", "br0", "up"])?;
        }
        in_ns(
            &c,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "br0"],
        )?;
        // The replication link.
        in_ns(
            &a,
            &[
                "link", "add", "a-repl", "type", "veth", "peer", "name", "b-repl", "netns", &b,
            ],
        )?;
        in_ns(
            &a,
            &["addr", "add", &format!("{REPL_A}/30"), "dev", "a-repl"],
        )?;
        in_ns(
            &b,
            &["addr", "add", &format!("{REPL_B}/30"), "dev", "b-repl"],
        )?;
        in_ns(&a, &["link", "set", "a-repl", "up"])?;
        in_ns(&b, &["link", "set", "b-repl", "up"])?;
        Ok(t)
    }

    /// The manager's namespace on the fabric: `m0` with [`MANAGER_IP`],
    /// its peer on the client namespace's bridge. Removed with the rest.
    pub fn add_manager(&mut self) -> anyhow::Result<String> {
        let m = format!("tdrill-{}-m", self.tag);
        ip(&["netns", "add", &m])?;
        self.made.push(m.clone());
        in_ns(&m, &["link", "set", "lo", "up"])?;
        let c = self.c.clone();
        in_ns(
            &m,
            &[
                "link", "add", "m0", "type", "veth", "peer", "name", "c-m", "netns", &c,
            ],
        )?;
        in_ns(&c, &["link", "set", "c-m", "master", "br0", "up"])?;
        in_ns(
            &m,
            &["addr", "add", &format!("{MANAGER_IP}/24"), "dev", "m0"],
        )?;
        in_ns(&m, &["link", "set", "m0", "up"])?;
        Ok(m)
    }

    /// Cuts host A off every network: fabric and replication link.
    pub fn isolate_a(&self) -> anyhow::Result<()> {
        in_ns(&self.a, &["link", "set", "a-fab", "down"])?;
        in_ns(&self.a, &["link", "set", "a-repl", "down"])
    }
}

/// Kills every process still inside the drill's namespace `ns`. After a
/// `tandemd` kill round, host A's QEMU outlives its daemon (a daemon exit
/// never takes VMs down with it), and a process started by `ip netns exec`
/// keeps a mount of the namespace file that makes `ip netns delete` fail
/// with EBUSY. Only processes in a namespace this drill made are touched.
fn kill_processes_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|&p| p > 1 && p != std::process::id() as i32)
    {
        // A process living in a namespace this drill created.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Deletes a namespace this drill made, killing what still runs in it. A
/// dying process may hold the namespace file for a moment, so deletion is
/// retried for a bounded time.
pub(crate) fn delete_netns(ns: &str) {
    for _ in 0..50 {
        kill_processes_in(ns);
        let gone = Command::new("ip")
            .args(["netns", "delete", ns])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if gone || !std::path::Path::new("/var/run/netns").join(ns).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace removes its veths, bridges and taps.
        for ns in self.made.drain(..).rev() {
            delete_netns(&ns);
        }
    }
}

/// Runs `f` on a thread that has entered the network namespace `ns`, so
/// every socket it opens lives there.
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    Ok(std::thread::spawn(move || {
        // Affects only the calling thread, which is this freshly spawned one.
        setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow!("setns: {}", std::io::Error::from(e)))?;
        Ok(f())
    }))
}
