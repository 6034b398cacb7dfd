//! `--netfollow`: what the network does to a migrating guest (issue 19's
//! benchmark). Each site's client namespace runs ISC dhcpd (the guest
//! takes its address by DHCP) and a sender that streams numbered UDP
//! datagrams every [`STREAM_EVERY`] to the guest (unicast) and to a
//! multicast group the guest joined; the guest service counts both
//! (`USTAT`, `MSTAT`: datagrams, last number, numbers skipped). Per
//! migration: inbound datagrams lost, the multicast gap, and (tandem's
//! snooping switches) the time until the destination holds the guest's
//! DHCP binding.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use super::check_interrupted;
use crate::topology::{spawn_in_ns, CLIENT_IP, GUEST_IP};

/// The sender's period, for both streams.
pub(super) const STREAM_EVERY: Duration = Duration::from_millis(10);
pub(super) const GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 2, 3);
const GROUP_PORT: u16 = 5000;
const UNICAST_PORT: u16 = 5001;
/// A stream counts as flowing when the guest's last number is at most
/// this far behind the sender's (datagrams in flight, the read's own
/// round trip).
const FLOWING_SLACK: u64 = 10;
/// No sender outlives this.
const HARD_STOP: Duration = Duration::from_secs(3600);
/// How long after a migration the binding is waited for (the issue's
/// 15 s bound for the positive cases).
pub(super) const BINDING_BOUND: Duration = Duration::from_secs(15);
/// The window after the migration over which losses are counted: the
/// multicast stream of a switch that lost the membership does not come
/// back within it (its next query is up to 125 s away).
pub(super) const SETTLE: Duration = Duration::from_secs(3);

/// The switch document of a tandem host in `--netfollow`: the guest's
/// group snoops DHCP (the client namespace's dhcpd is the server) and
/// IGMP, with IP source guard where `guard`.
pub(super) fn switch_doc(uplink: &str, guard: bool) -> String {
    format!(
        "[[port_group]]\nname = \"vms\"\nvlan = 10\ndhcp_snooping = true\ndhcp_servers = [\"{CLIENT_IP}\"]\nigmp_snooping = true\n{}\n[[uplink]]\nname = \"fabric\"\ninterfaces = [\"{uplink}\"]\nport_group = \"vms\"\n",
        if guard { "ip_source_guard = true\n" } else { "" }
    )
}

/// The client namespace as `--netfollow` needs it: its bridge (the
/// fabric between the hosts) forwards multicast plainly, so what is
/// measured is the hosts' switches, and dhcpd serves the guest.
pub(super) fn prepare_fabric(ns: &str, dir: &Path) -> anyhow::Result<Dhcpd> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "ip", "link", "set", "br0", "type", "bridge",
        ])
        .args(["mcast_snooping", "0"])
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "turning multicast snooping off on the fabric bridge: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Dhcpd::start(ns, dir)
}

/// ISC dhcpd on the client namespace's bridge, leasing the guest its
/// usual address (a one-address pool), with lease query allowed. Killed
/// on drop.
pub(super) struct Dhcpd {
    child: Child,
}

impl Dhcpd {
    pub(super) fn start(ns: &str, dir: &Path) -> anyhow::Result<Dhcpd> {
        let dhcpd = Path::new("/usr/sbin/dhcpd");
        if !dhcpd.exists() {
            bail!("--netfollow needs ISC dhcpd: apt-get install isc-dhcp-server (ci/setup-host.sh does)");
        }
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("dhcpd.conf");
        let leases = dir.join("dhcpd.leases");
        let log = dir.join("dhcpd.log");
        std::fs::write(
            &conf,
            format!(
                "authoritative;\nallow leasequery;\ndefault-lease-time 3600;\nmax-lease-time 3600;\n\
                 subnet 10.77.0.0 netmask 255.255.255.0 {{\n  range {GUEST_IP} {GUEST_IP};\n}}\n"
            ),
        )?;
        std::fs::write(&leases, "")?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(dhcpd)
            .args(["-4", "-f", "-d", "-cf"])
            .arg(&conf)
            .arg("-lf")
            .arg(&leases)
            .arg("-pf")
            .arg(dir.join("dhcpd.pid"))
            .arg("br0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .context("starting dhcpd")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            check_interrupted()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Sending on") {
                return Ok(Dhcpd { child });
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("dhcpd exited ({status}): {}", text.trim());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("dhcpd did not start within 10 s: {}", text.trim());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dhcpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request line to the guest service from the client namespace, its
/// reply line (2 s bound each way).
pub(super) fn ask(ns: &str, line: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = format!("{GUEST_IP}:7070").parse()?;
    let request = format!("{line}\n");
    spawn_in_ns(ns, move || -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(request.as_bytes())?;
        let mut reply = Vec::new();
        let mut b = [0u8; 256];
        while !reply.contains(&b'\n') && reply.len() < 4096 {
            let n = s.read(&mut b)?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&b[..n]);
        }
        let text = String::from_utf8_lossy(&reply);
        Ok(text.lines().next().unwrap_or("").to_string())
    })?
    .join()
    .map_err(|_| anyhow!("the request thread panicked"))??
}

/// The guest's count of one numbered stream.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    last: u64,
    missing: u64,
    /// Came at or below the highest number seen: late (a held frame
    /// delivered after newer ones), which `missing` counted when the
    /// newer one arrived.
    disordered: u64,
}

fn parse_count(word: &str, reply: &str) -> anyhow::Result<Count> {
    let f: Vec<&str> = reply.split_whitespace().collect();
    if f.len() != 5 || f[0] != word {
        bail!("the guest answered {reply:?} to {word}");
    }
    let n = |i: usize| f[i].parse::<u64>().map_err(|e| anyhow!("{reply:?}: {e}"));
    Ok(Count {
        last: n(2)?,
        missing: n(3)?,
        disordered: n(4)?,
    })
}

/// Both streams as the guest and the sender saw them at one moment.
#[derive(Debug, Clone, Copy)]
pub(super) struct Snapshot {
    sent: u64,
    unicast: Count,
    multicast: Count,
}

impl Snapshot {
    fn flowing(sent: u64, c: Count) -> bool {
        c.last > 0 && sent.saturating_sub(c.last) <= FLOWING_SLACK
    }
}

/// A run's network account.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetRun {
    /// Unicast datagrams to the guest lost across the migration (skipped
    /// numbers, and the tail not delivered at the end of the window).
    pub unicast_lost: u64,
    /// Unicast datagrams that arrived after newer ones (held during the
    /// switchover and delivered late): not lost, but out of order.
    pub unicast_late: u64,
    /// The multicast stream's gap at the guest, ms: datagrams lost times
    /// the sender's period. `None`: not flowing again at the end of the
    /// window (then `multicast_lost` counts up to its end).
    pub multicast_gap_ms: Option<f64>,
    pub multicast_lost: u64,
    /// Whether the multicast stream was flowing when the migration began.
    pub multicast_before: bool,
    /// tandem only: when the destination held the guest's DHCP binding,
    /// ms after the migrate command returned (0: already); `None` for a
    /// switch that did not within [`BINDING_BOUND`] (or a plain bridge,
    /// which keeps none: see `binding_kept`).
    pub binding_ms: Option<f64>,
    /// Whether the system keeps DHCP bindings at all (plain: no).
    pub binding_kept: bool,
}

/// The sender and the guest's counters of one site.
pub(super) struct Streams {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>>,
    ns: String,
}

impl Streams {
    /// Has the guest count both streams, then starts the sender.
    pub(super) fn start(ns: &str) -> anyhow::Result<Streams> {
        let joined = ask(ns, &format!("MJOIN {GROUP} {GROUP_PORT}"))?;
        if joined != format!("MJOINED {GROUP} {GROUP_PORT}") {
            bail!("MJOIN: the guest answered {joined:?}");
        }
        let counting = ask(ns, &format!("UCOUNT {UNICAST_PORT}"))?;
        if counting != format!("UCOUNTING {UNICAST_PORT}") {
            bail!("UCOUNT: the guest answered {counting:?} (an image older than this bench: rebuild it with images/build.sh)");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), sent.clone());
        let thread = spawn_in_ns(ns, move || -> anyhow::Result<()> {
            let sock = UdpSocket::bind((CLIENT_IP, 0)).context("the sender's socket")?;
            sock.set_multicast_ttl_v4(1)?;
            let unicast: SocketAddr = format!("{GUEST_IP}:{UNICAST_PORT}").parse()?;
            let group = SocketAddr::from((GROUP, GROUP_PORT));
            let hard = Instant::now() + HARD_STOP;
            let mut next = Instant::now();
            let mut seq = 0u64;
            while !flag.load(Ordering::SeqCst) && Instant::now() < hard {
                seq += 1;
                let text = format!("{seq}\n");
                // A send that fails (no ARP answer yet) is a datagram the
                // guest misses, like one lost on the wire.
                let _ = sock.send_to(text.as_bytes(), unicast);
                let _ = sock.send_to(text.as_bytes(), group);
                count.store(seq, Ordering::SeqCst);
                next += STREAM_EVERY;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            Ok(())
        })?;
        let s = Streams {
            stop,
            sent,
            thread: Some(thread),
            ns: ns.to_string(),
        };
        // Both streams reach the guest before the first run.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            check_interrupted()?;
            let snap = s.snapshot()?;
            if Snapshot::flowing(snap.sent, snap.unicast)
                && Snapshot::flowing(snap.sent, snap.multicast)
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "the streams do not reach the guest within 10 s (sent {}, unicast last {}, multicast last {})",
                    snap.sent,
                    snap.unicast.last,
                    snap.multicast.last
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(super) fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let sent = self.sent.load(Ordering::SeqCst);
        let unicast = parse_count("USTAT", &ask(&self.ns, "USTAT")?)?;
        let multicast = parse_count("MSTAT", &ask(&self.ns, "MSTAT")?)?;
        Ok(Snapshot {
            sent,
            unicast,
            multicast,
        })
    }
}

/// What was lost between two snapshots (before the migration, and at the
/// end of the window after it).
pub(super) fn account(before: &Snapshot, after: &Snapshot) -> NetRun {
    let tail = |c: Count| {
        if Snapshot::flowing(after.sent, c) {
            0
        } else {
            after.sent.saturating_sub(c.last.max(before.sent))
        }
    };
    // Skipped numbers that later came late were delayed, not lost.
    let lost = |b: Count, a: Count| {
        let skipped = a.missing.saturating_sub(b.missing);
        skipped.saturating_sub(a.disordered.saturating_sub(b.disordered)) + tail(a)
    };
    let unicast_lost = lost(before.unicast, after.unicast);
    let multicast_lost = lost(before.multicast, after.multicast);
    let back = Snapshot::flowing(after.sent, after.multicast);
    NetRun {
        unicast_lost,
        unicast_late: after
            .unicast
            .disordered
            .saturating_sub(before.unicast.disordered),
        multicast_gap_ms: back.then(|| multicast_lost as f64 * STREAM_EVERY.as_secs_f64() * 1e3),
        multicast_lost,
        multicast_before: Snapshot::flowing(before.sent, before.multicast),
        binding_ms: None,
        binding_kept: false,
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(sent: u64, u: (u64, u64), m: (u64, u64)) -> Snapshot {
        Snapshot {
            sent,
            unicast: Count {
                last: u.0,
                missing: u.1,
                disordered: 0,
            },
            multicast: Count {
                last: m.0,
                missing: m.1,
                disordered: 0,
            },
        }
    }

    #[test]
    fn frames_that_came_late_are_not_lost() {
        let before = snap(100, (100, 0), (100, 0));
        let mut after = snap(400, (400, 7), (400, 0));
        after.unicast.disordered = 5;
        let r = account(&before, &after);
        assert_eq!((r.unicast_lost, r.unicast_late), (2, 5));
    }

    #[test]
    fn losses_are_skipped_numbers_plus_an_undelivered_tail() {
        let before = snap(100, (99, 2), (100, 0));
        // Unicast: 3 more skipped, flowing. Multicast: stopped at 150.
        let after = snap(400, (398, 5), (150, 0));
        let r = account(&before, &after);
        assert_eq!(r.unicast_lost, 3);
        assert_eq!(r.multicast_lost, 250);
        assert_eq!(r.multicast_gap_ms, None, "not flowing again");
        assert!(r.multicast_before);
    }

    #[test]
    fn a_flowing_stream_s_gap_is_its_losses_times_the_period() {
        let before = snap(100, (100, 0), (100, 0));
        let after = snap(400, (400, 0), (399, 12));
        let r = account(&before, &after);
        assert_eq!(r.unicast_lost, 0);
        assert_eq!(r.multicast_lost, 12);
        assert_eq!(r.multicast_gap_ms, Some(120.0));
    }

    #[test]
    fn a_stream_already_stopped_before_counts_only_this_run() {
        // Multicast stopped at 50, before this run began at 100.
        let before = snap(100, (100, 0), (50, 0));
        let after = snap(400, (400, 0), (50, 0));
        let r = account(&before, &after);
        assert!(!r.multicast_before);
        assert_eq!(r.multicast_lost, 300);
    }

    #[test]
    fn replies_that_are_not_counts_are_errors() {
        assert!(parse_count("USTAT", "USTAT 1 2 3 4").is_ok());
        assert!(parse_count("USTAT", "MSTAT 1 2 3 4").is_err());
        assert!(parse_count("USTAT", "USTAT 1 2 x 4").is_err());
        assert!(parse_count("USTAT", "ERR unknown").is_err());
    }

    #[test]
    fn the_switch_document_snoops_and_guards_only_when_asked() {
        let with = switch_doc("a-fab", true);
        let without = switch_doc("a-fab", false);
        for d in [&with, &without] {
            let parsed = tandem_switch_core::config::SwitchDocument::from_toml(d)
                .and_then(|doc| doc.validate(&[]).map(|()| doc));
            assert!(parsed.is_ok(), "{d}: {parsed:?}");
        }
        assert!(with.contains("ip_source_guard = true"));
        assert!(!without.contains("ip_source_guard"));
    }
}
