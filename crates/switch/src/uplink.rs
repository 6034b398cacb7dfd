//! An uplink port: the switch's way out to the physical network through one
//! or more host interfaces, an ordered failover team.
//!
//! Every member interface gets an `AF_PACKET`/`SOCK_RAW` socket bound to
//! it, promiscuous, non-blocking. Exactly one member — the first in the
//! configured order whose link is up — is *active*: frames are sent on it
//! and only frames received on it reach the switch; what arrives on standby
//! members is read and discarded (a failover team, not a bond). A member's
//! link is up when it is administratively up and has carrier
//! (`IFF_UP | IFF_LOWER_UP`, not `IFF_DORMANT`, read over rtnetlink: the
//! carrier bit changes at once, while `IFF_RUNNING`/operstate can lag up
//! to a second behind it). Link state is re-read every [`EVALUATE_EVERY`]
//! and after a send fails because the link went away; a member that disappears is treated as down and picked
//! up again (new socket) if an interface of that name comes back.
//!
//! # What the switch sees
//!
//! The kernel hands a packet socket a frame after its receive path has
//! already taken it apart a little, and this module puts it back together
//! so that [`Ingress`] sees the frame as it was on the wire:
//!
//! * **VLAN tags.** The outer 802.1Q/802.1ad tag is removed on receive
//!   (hardware or software "VLAN acceleration", on every device) and
//!   reported out of band in `PACKET_AUXDATA`; it is re-inserted here.
//! * **Checksums.** A frame that comes from a local stack over a virtual
//!   device (a veth whose peer is in another namespace, say) may still
//!   carry an unfinished TCP/UDP checksum, to be filled in by "hardware"
//!   that never runs. The socket is opened with `PACKET_VNET_HDR`, which
//!   says where that checksum is, and it is completed here.
//!
//! Frames sent by this host on a member (`PACKET_OUTGOING`) are ignored,
//! so nothing the switch transmits comes back in.
//!
//! # LLDP
//!
//! LLDP frames (ethertype 0x88cc to one of the three LLDP groups, tagged
//! or not) are for the link, not for the switch: a bridge never forwards
//! them. They are taken out of the receive path on *every* member, the
//! standbys included (so a standby's cabling is checked too), and recorded
//! in the uplink's [`NeighbourTable`]: per member, the last neighbour heard
//! and when, until its TTL runs out. They count as LLDP frames of the
//! member, not as frames the port received.
//!
//! # MTU
//!
//! [`UplinkHandle::set_mtu`] sets the document's MTU on every member.
//! The uplink remembers each member's MTU from before it first changed
//! it and gives it back when the document stops setting one or the
//! uplink goes away; a member that disappears and comes back gets the
//! document's MTU again when its socket is reopened.
//!
//! Not handled: receive offloads that merge frames (GRO/LRO) produce
//! frames larger than [`MAX_FRAME`], which are dropped as `Malformed`; a
//! member with GRO on is warned about at spawn.

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{
    self, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike,
    SockaddrStorage,
};
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::lldp::{self, Heard, NeighbourTable, UplinkNeighbour};
use crate::netsys::{self, LinkQuery, SendFn, TxOutcome, TxState, Worker, BATCH, TX_RETRY};
use crate::offload::{
    self, complete_checksum, Offload, RxOffloads, VnetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM,
};
use crate::port::{DropReason, EgressQueue, Ingress, PortCounters, PortId, MAX_FRAME, MIN_FRAME};

/// How often the members' link state is re-read.
pub const EVALUATE_EVERY: Duration = Duration::from_millis(200);

const VLAN_HLEN: usize = 4;
const TPID_8021Q: u16 = 0x8100;
/// `struct virtio_net_hdr` without `num_buffers`, the default size for
/// `PACKET_VNET_HDR`.
const VNET_HDR_LEN: usize = 10;
/// Socket receive buffer asked for (the kernel caps it at `rmem_max`).
const RCVBUF: usize = 4 << 20;

/// An uplink: its port id, a name for logs, and its member interfaces in
/// order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    pub id: PortId,
    pub name: String,
    /// Ordered failover list: the first member whose link is up carries
    /// the traffic.
    pub interfaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink `{uplink}` has no member interfaces")]
    NoMembers { uplink: String },
    #[error("uplink `{uplink}`: `{interface}` is not a valid interface name: {why}")]
    InvalidName {
        uplink: String,
        interface: String,
        why: &'static str,
    },
    #[error("uplink `{uplink}`: interface `{interface}` is listed twice")]
    Duplicate { uplink: String, interface: String },
    #[error("uplink `{uplink}`: interface `{interface}` does not exist")]
    NoSuchInterface { uplink: String, interface: String },
    #[error("uplink `{uplink}`: interface `{interface}`: {what}: {source}")]
    Interface {
        uplink: String,
        interface: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("uplink `{uplink}`: {what}: {source}")]
    Setup {
        uplink: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A running uplink. Dropping it stops it like [`UplinkHandle::shutdown`].
pub struct UplinkHandle {
    name: String,
    members: Vec<String>,
    active: Arc<Mutex<Option<String>>>,
    worker: Worker,
    /// Interface ioctls in the uplink's namespace.
    ctl: OwnedFd,
    mtu: Arc<Mutex<MtuState>>,
    neighbours: Arc<Mutex<NeighbourTable>>,
}

/// The MTU the document gives the members, shared with the I/O thread.
#[derive(Default)]
struct MtuState {
    want: Option<u32>,
    /// Member → its MTU before the uplink first changed it.
    original: BTreeMap<String, u32>,
}

impl MtuState {
    /// Sets the wanted MTU on `member` if there is one, remembering what
    /// it had; `Ok(false)` if the member does not exist.
    fn apply(&mut self, ctl: &OwnedFd, member: &str) -> io::Result<bool> {
        let Some(want) = self.want else {
            return Ok(true);
        };
        let Some(have) = netsys::mtu(ctl, member)? else {
            return Ok(false);
        };
        if have != want {
            self.original.entry(member.to_owned()).or_insert(have);
            netsys::set_mtu(ctl, member, want)?;
        }
        Ok(true)
    }

    /// Gives every member the MTU it had before the uplink changed it.
    fn restore(&mut self, ctl: &OwnedFd, uplink: &str) -> Result<(), (String, io::Error)> {
        while let Some((member, mtu)) = self.original.pop_first() {
            match netsys::set_mtu(ctl, &member, mtu) {
                Ok(()) => info!(uplink = %uplink, member = %member, mtu, "MTU given back"),
                // Gone: there is nothing to give it back to.
                Err(e) if e.raw_os_error() == Some(Errno::ENODEV as i32) => {}
                Err(e) => {
                    self.original.insert(member.clone(), mtu);
                    return Err((member, e));
                }
            }
        }
        Ok(())
    }
}

impl UplinkHandle {
    /// Opens a packet socket on every member and starts the uplink's I/O
    /// thread. Sockets belong to the network namespace of the calling
    /// thread (see [`netsys::in_netns`]), and so does the I/O thread.
    pub fn spawn(
        cfg: UplinkConfig,
        egress: Arc<EgressQueue>,
        counters: Arc<PortCounters>,
        ingress: Arc<dyn Ingress>,
    ) -> Result<UplinkHandle, UplinkError> {
        let uplink = cfg.name.clone();
        if cfg.interfaces.is_empty() {
            return Err(UplinkError::NoMembers { uplink });
        }
        for (i, name) in cfg.interfaces.iter().enumerate() {
            if let Err(why) = netsys::check_ifname(name) {
                return Err(UplinkError::InvalidName {
                    uplink,
                    interface: name.clone(),
                    why,
                });
            }
            if cfg.interfaces[..i].contains(name) {
                return Err(UplinkError::Duplicate {
                    uplink,
                    interface: name.clone(),
                });
            }
        }
        let setup = |what, source| UplinkError::Setup {
            uplink: uplink.clone(),
            what,
            source,
        };
        let ctl = netsys::control_socket().map_err(|e| setup("control socket", e))?;
        let handle_ctl = netsys::control_socket().map_err(|e| setup("control socket", e))?;
        let mtu = Arc::new(Mutex::new(MtuState::default()));
        // The packet sockets take a vnet header: the kernel finishes
        // checksums and segments TSO packets, so a guest's 64 KiB segments
        // leave as they are.
        egress.set_accepts(RxOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        });
        let links = LinkQuery::new().map_err(|e| setup("rtnetlink socket", e))?;

        let mut members = Vec::with_capacity(cfg.interfaces.len());
        for name in &cfg.interfaces {
            let iface_err = |what, source| UplinkError::Interface {
                uplink: uplink.clone(),
                interface: name.clone(),
                what,
                source,
            };
            let index = netsys::ifindex(&ctl, name)
                .map_err(|e| iface_err("looking up the interface", e))?
                .ok_or_else(|| UplinkError::NoSuchInterface {
                    uplink: uplink.clone(),
                    interface: name.clone(),
                })?;
            let sock =
                PacketSocket::open(index).map_err(|e| iface_err("opening a packet socket", e))?;
            if netsys::gro_enabled(&ctl, name) == Some(true) {
                warn!(
                    uplink = %uplink,
                    member = %name,
                    "generic receive offload is on: merged frames larger than {MAX_FRAME} bytes \
                     will be dropped; turn it off with `ethtool -K {name} gro off lro off`"
                );
            }
            members.push(Member {
                name: name.clone(),
                sock: Some(sock),
                up: false,
                reopen_failed: false,
            });
        }

        let stop = Worker::stop_fd().map_err(|e| setup("stop eventfd", e))?;
        let active = Arc::new(Mutex::new(None));
        let neighbours = Arc::new(Mutex::new(NeighbourTable::new(&cfg.interfaces)));
        let mut core = Uplink {
            id: cfg.id,
            name: uplink.clone(),
            members,
            active: None,
            shared_active: active.clone(),
            ctl,
            mtu: mtu.clone(),
            neighbours: neighbours.clone(),
            links,
            egress,
            counters,
            ingress,
            stop: stop.clone(),
            vnet: [0; VNET_HDR_LEN],
            scratch: vec![0; VLAN_HLEN + MAX_FRAME],
            tx: TxState::new(),
        };
        core.evaluate();
        info!(
            uplink = %uplink,
            members = ?cfg.interfaces,
            active = ?core.active_name(),
            "uplink started"
        );
        let worker = Worker::spawn(
            uplink.clone(),
            format!("uplink-{uplink}"),
            stop,
            move || core.run(),
        )
        .map_err(|e| setup("spawning the I/O thread", e))?;
        Ok(UplinkHandle {
            name: uplink,
            members: cfg.interfaces,
            active,
            worker,
            ctl: handle_ctl,
            mtu,
            neighbours,
        })
    }

    /// The members that do not exist (in the uplink's namespace) now.
    pub fn missing_members(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| !matches!(netsys::ifindex(&self.ctl, m), Ok(Some(_))))
            .cloned()
            .collect()
    }

    /// Sets `mtu` on every member, or with `None` gives each the MTU it
    /// had before the uplink changed it. A member that does not exist now
    /// gets it when it comes back. On error some members may have the new
    /// MTU; setting the previous value puts them back.
    pub fn set_mtu(&self, mtu: Option<u32>) -> Result<(), UplinkError> {
        let mut st = self.mtu.lock().unwrap_or_else(|p| p.into_inner());
        st.want = mtu;
        let fail = |interface: String, source| UplinkError::Interface {
            uplink: self.name.clone(),
            interface,
            what: "setting the MTU",
            source,
        };
        if mtu.is_none() {
            return st
                .restore(&self.ctl, &self.name)
                .map_err(|(m, e)| fail(m, e));
        }
        for m in &self.members {
            match st.apply(&self.ctl, m) {
                Ok(true) => {}
                Ok(false) => {
                    debug!(uplink = %self.name, member = %m, "member missing; MTU set when it comes back")
                }
                Err(e) => return Err(fail(m.clone(), e)),
            }
        }
        info!(uplink = %self.name, mtu = ?mtu, "uplink MTU set");
        Ok(())
    }

    /// The member interface currently carrying traffic, `None` if no member
    /// has its link up.
    pub fn active(&self) -> Option<String> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every member, with the LLDP neighbour heard on it if its TTL has not
    /// run out, and its LLDP frame counts.
    pub fn neighbours(&self) -> Vec<UplinkNeighbour> {
        self.neighbours
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot(&self.name, Instant::now())
    }

    /// Stops the I/O thread and closes the sockets, and gives the members
    /// back the MTU they had; waits at most [`netsys::STOP_TIMEOUT`].
    pub fn shutdown(mut self) {
        self.worker.stop();
        // Drop gives the MTUs back.
    }
}

impl Drop for UplinkHandle {
    fn drop(&mut self) {
        self.worker.stop();
        let mut st = self.mtu.lock().unwrap_or_else(|p| p.into_inner());
        st.want = None;
        if let Err((member, e)) = st.restore(&self.ctl, &self.name) {
            warn!(uplink = %self.name, member = %member, error = %e, "cannot give the member its MTU back");
        }
    }
}

struct Member {
    name: String,
    sock: Option<PacketSocket>,
    /// Administratively up with carrier, and with an open socket.
    up: bool,
    /// A reopen failed and was logged; do not log it again every round.
    reopen_failed: bool,
}

/// The uplink's state, owned by its I/O thread.
struct Uplink {
    id: PortId,
    name: String,
    members: Vec<Member>,
    active: Option<usize>,
    shared_active: Arc<Mutex<Option<String>>>,
    ctl: OwnedFd,
    mtu: Arc<Mutex<MtuState>>,
    neighbours: Arc<Mutex<NeighbourTable>>,
    links: LinkQuery,
    egress: Arc<EgressQueue>,
    counters: Arc<PortCounters>,
    ingress: Arc<dyn Ingress>,
    stop: Arc<EventFd>,
    vnet: [u8; VNET_HDR_LEN],
    /// `VLAN_HLEN` bytes of headroom for a re-inserted tag, then room for
    /// a received frame.
    scratch: Vec<u8>,
    tx: TxState,
}

impl Uplink {
    fn active_name(&self) -> Option<&str> {
        self.active.map(|i| self.members[i].name.as_str())
    }

    /// Polls the stop and egress eventfds and every member's socket for at
    /// most `timeout`. Returns what happened on the two eventfds, and puts
    /// what happened on each member's socket in `members` (nothing for a
    /// member without a socket, which is left out of the poll set as
    /// poll(2) would skip a negative descriptor).
    fn wait(&self, timeout: Duration, members: &mut Vec<PollFlags>) -> io::Result<[PollFlags; 2]> {
        let mut fds = Vec::with_capacity(2 + self.members.len());
        fds.push(PollFd::new(
            netsys::eventfd_fd(&self.stop),
            PollFlags::POLLIN,
        ));
        fds.push(PollFd::new(
            netsys::eventfd_fd(self.egress.notifier()),
            PollFlags::POLLIN,
        ));
        for (i, m) in self.members.iter().enumerate() {
            let Some(s) = &m.sock else {
                continue;
            };
            let mut events = PollFlags::POLLIN;
            if self.tx.wants_writable() && self.active == Some(i) {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(s.fd.as_fd(), events));
        }
        netsys::poll(&mut fds, timeout)?;
        let mut polled = fds[2..].iter();
        members.clear();
        members.extend(self.members.iter().map(|m| match m.sock {
            Some(_) => polled.next().map_or(PollFlags::empty(), netsys::revents),
            None => PollFlags::empty(),
        }));
        Ok([netsys::revents(&fds[0]), netsys::revents(&fds[1])])
    }

    fn run(mut self) {
        let mut member_events: Vec<PollFlags> = Vec::with_capacity(self.members.len());
        let mut next_eval = Instant::now() + EVALUATE_EVERY;
        loop {
            let now = Instant::now();
            let timeout = self.tx.timeout(next_eval.saturating_duration_since(now));
            let [stop, notify] = match self.wait(timeout, &mut member_events) {
                Ok(r) => r,
                Err(e) => {
                    warn!(uplink = %self.name, error = %e, "poll failed");
                    std::thread::sleep(TX_RETRY);
                    continue;
                }
            };
            if !stop.is_empty() {
                break;
            }
            if notify.contains(PollFlags::POLLIN) {
                netsys::drain_eventfd(self.egress.notifier());
                self.tx.notified();
            }
            for (i, &rev) in member_events.iter().enumerate() {
                if rev.contains(PollFlags::POLLERR) {
                    if let Some(s) = &self.members[i].sock {
                        if let Some(e) = netsys::take_socket_error(&s.fd) {
                            debug!(uplink = %self.name, member = %self.members[i].name, error = %e, "socket error");
                        }
                    }
                }
                if rev.contains(PollFlags::POLLNVAL) {
                    // Cannot happen with descriptors we own; reopen anyway.
                    self.members[i].sock = None;
                }
                if rev.contains(PollFlags::POLLIN) {
                    self.receive(i);
                }
            }
            if Instant::now() >= next_eval {
                self.evaluate();
                next_eval = Instant::now() + EVALUATE_EVERY;
            }
            if self.tx.pending() {
                self.transmit();
            }
        }
        debug!(uplink = %self.name, "I/O thread stopping");
    }

    /// Reads up to [`BATCH`] frames from member `i`; hands them to the
    /// switch if `i` is the active member, discards them otherwise.
    fn receive(&mut self, i: usize) {
        for _ in 0..BATCH {
            let Some(sock) = self.members[i].sock.as_ref() else {
                return;
            };
            let got = sock.recv(&mut self.vnet, &mut self.scratch[VLAN_HLEN..]);
            let meta = match got {
                Ok(Some(meta)) => meta,
                Ok(None) => return,
                // The kernel could not describe the frame in a vnet header
                // (an unusual offload); the frame is consumed.
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    if self.active == Some(i) {
                        self.counters.dropped(DropReason::Malformed);
                    }
                    continue;
                }
                Err(e) => {
                    debug!(uplink = %self.name, member = %self.members[i].name, error = %e, "receive failed");
                    return;
                }
            };
            if meta.outgoing {
                continue;
            }
            // The kernel took any tag off, so the bytes as received start
            // with the LLDP ethertype whether the frame was tagged or not.
            // A frame larger than the buffer is no LLDPDU (and is
            // malformed below).
            let raw = self.scratch.get(VLAN_HLEN..VLAN_HLEN + meta.info.len);
            if let Some(frame) = raw.filter(|f| lldp::is_lldp(f)) {
                let heard = self
                    .neighbours
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .receive(i, frame, Instant::now());
                self.log_lldp(i, heard);
                continue;
            }
            if self.active != Some(i) {
                continue;
            }
            match rebuild(&mut self.scratch, &meta.info) {
                Some(r) => {
                    self.counters.received(r.len());
                    self.ingress.ingress(self.id, &self.scratch[r]);
                }
                None => self.counters.dropped(DropReason::Malformed),
            }
        }
    }

    fn log_lldp(&self, i: usize, heard: Heard) {
        let member = &self.members[i].name;
        match heard {
            Heard::New(n) => {
                info!(uplink = %self.name, member = %member, neighbour = %n, ttl_s = n.ttl_s, "LLDP neighbour heard")
            }
            Heard::Refreshed => {}
            Heard::Withdrawn(Some(n)) => {
                info!(uplink = %self.name, member = %member, neighbour = %n, "LLDP neighbour withdrew (TTL 0)")
            }
            Heard::Withdrawn(None) => {}
            // Debug: whoever sends garbage would otherwise fill the log.
            Heard::Invalid(e) => {
                debug!(uplink = %self.name, member = %member, error = %e, "invalid LLDP frame")
            }
        }
    }

    /// Sends queued frames on the active member (drops them if there is
    /// none), at most [`netsys::BATCH`] per call.
    fn transmit(&mut self) {
        let sock = self.active.and_then(|a| self.members[a].sock.as_ref());
        let mut send = sock.map(|s| move |f: &[u8], off: &Offload| s.send(f, off));
        let outcome = self.tx.transmit(
            &self.name,
            &self.egress,
            &self.counters,
            send.as_mut().map(|f| f as &mut SendFn),
        );
        if outcome == TxOutcome::LinkDown {
            self.evaluate();
        }
    }

    /// Re-reads every member's existence and link state, reopens sockets of
    /// members that came back, and picks the active member.
    fn evaluate(&mut self) {
        let gone = self
            .neighbours
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expire(Instant::now());
        for (member, n) in gone {
            info!(uplink = %self.name, member = %member, neighbour = %n, "LLDP neighbour not heard within its TTL; forgotten");
        }
        for m in &mut self.members {
            let index = match netsys::ifindex(&self.ctl, &m.name) {
                Ok(i) => i,
                Err(e) => {
                    debug!(uplink = %self.name, member = %m.name, error = %e, "interface look-up failed");
                    None
                }
            };
            match index {
                None => {
                    if m.sock.take().is_some() {
                        warn!(uplink = %self.name, member = %m.name, "member interface disappeared");
                    }
                }
                Some(index) => {
                    let current = m.sock.as_ref().is_some_and(|s| s.is_bound_to(index));
                    if !current {
                        m.sock = None;
                        match PacketSocket::open(index) {
                            Ok(s) => {
                                info!(uplink = %self.name, member = %m.name, "member interface (re)opened");
                                m.sock = Some(s);
                                m.reopen_failed = false;
                                // A member that came back has the MTU
                                // its new device was made with.
                                let mut st = self.mtu.lock().unwrap_or_else(|p| p.into_inner());
                                if let Err(e) = st.apply(&self.ctl, &m.name) {
                                    warn!(uplink = %self.name, member = %m.name, error = %e, "cannot set the MTU on the member");
                                }
                            }
                            Err(e) => {
                                if !m.reopen_failed {
                                    warn!(uplink = %self.name, member = %m.name, error = %e, "cannot open a packet socket on the member");
                                }
                                m.reopen_failed = true;
                            }
                        }
                    }
                }
            }
            let up = match &m.sock {
                None => false,
                Some(s) => match self.links.flags(s.ifindex) {
                    Ok(Some(flags)) => netsys::link_is_up(flags),
                    Ok(None) => false,
                    Err(e) => {
                        debug!(uplink = %self.name, member = %m.name, error = %e, "rtnetlink link query failed; using SIOCGIFFLAGS");
                        netsys::is_running(&self.ctl, &m.name)
                    }
                },
            };
            if up != m.up {
                debug!(uplink = %self.name, member = %m.name, up, "member link state changed");
                m.up = up;
            }
        }
        let active = self.members.iter().position(|m| m.up);
        if active != self.active {
            let old = self.active_name().map(str::to_owned);
            self.active = active;
            let new = self.active_name().map(str::to_owned);
            match &new {
                Some(n) => {
                    info!(uplink = %self.name, from = ?old, to = %n, "uplink active member changed")
                }
                None => {
                    warn!(uplink = %self.name, from = ?old, "uplink has no member with link up; dropping egress")
                }
            }
            if new.is_some() {
                self.ingress.uplink_active_changed(self.id);
            }
            *self.shared_active.lock().unwrap_or_else(|p| p.into_inner()) = new;
            // Frames waiting for a member go out now, or are dropped.
            self.tx.notified();
        }
    }
}

/// An `AF_PACKET` raw socket bound to one interface, promiscuous,
/// non-blocking, with `PACKET_AUXDATA` and `PACKET_VNET_HDR`.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: c_int,
}

/// What came with a received frame.
struct RecvMeta {
    outgoing: bool,
    info: RxInfo,
}

impl PacketSocket {
    fn open(ifindex: c_int) -> io::Result<PacketSocket> {
        // Protocol 0: the socket receives nothing until bind() below names
        // the interface, so no frame of another interface slips in.
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // libc: nix has no sockopt for PACKET_AUXDATA, PACKET_VNET_HDR or
        // PACKET_IGNORE_OUTGOING.
        netsys::setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)?;
        netsys::setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        // Linux ≥ 4.20; older kernels still report PACKET_OUTGOING, which
        // the receive path checks too.
        let _ = netsys::setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);

        // libc: nix's LinkAddr cannot be built from its fields; it wraps a
        // `sockaddr_ll` made here.
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a live, initialised sockaddr_ll of the size
        // passed along.
        let addr = unsafe {
            LinkAddr::from_raw(
                (&sll as *const libc::sockaddr_ll).cast(),
                Some(std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t),
            )
        }
        .ok_or_else(|| io::Error::from(Errno::EINVAL))?;
        socket::bind(fd.as_raw_fd(), &addr)?;

        // libc: nix has no sockopt for PACKET_ADD_MEMBERSHIP (`packet_mreq`).
        // SAFETY: packet_mreq is plain old data; all-zero is valid.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = ifindex;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        // SAFETY: `mreq` is a live packet_mreq and its size is passed along.
        Errno::result(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                (&mreq as *const libc::packet_mreq).cast(),
                std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
            )
        })?;
        Ok(PacketSocket { fd, ifindex })
    }

    /// Whether the socket is still attached to interface `index`. When its
    /// interface is unregistered the kernel detaches the socket (its bound
    /// index becomes -1), even if an interface of the same name and index
    /// shows up again later.
    fn is_bound_to(&self, index: c_int) -> bool {
        if self.ifindex != index {
            return false;
        }
        // Not `getsockname::<LinkAddr>`: a packet socket's address is
        // shorter than a `sockaddr_ll` (it ends with the hardware address),
        // which LinkAddr refuses.
        let Ok(addr) = socket::getsockname::<SockaddrStorage>(self.fd.as_raw_fd()) else {
            return false;
        };
        addr.as_link_addr()
            .is_some_and(|ll| ll.as_ref().sll_ifindex == index)
    }

    /// Receives one frame into `data` (its vnet header into `vnet`).
    /// `Ok(None)` when nothing is waiting.
    // libc: nix has no PACKET_AUXDATA control message (its `recvmsg` hands
    // such a message back opaque), so the whole call is libc's.
    fn recv(&self, vnet: &mut [u8; VNET_HDR_LEN], data: &mut [u8]) -> io::Result<Option<RecvMeta>> {
        let mut iov = [
            libc::iovec {
                iov_base: vnet.as_mut_ptr().cast(),
                iov_len: vnet.len(),
            },
            libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            },
        ];
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every pointer in `msg` refers to a live, exclusively
        // borrowed buffer of the stated length.
        let r = unsafe {
            libc::recvmsg(
                self.fd.as_raw_fd(),
                &mut msg,
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        let n = match Errno::result(r) {
            Ok(n) => n as usize,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        };

        let mut aux = None;
        // SAFETY: `msg` was filled by recvmsg(2); the CMSG_* macros walk
        // its control buffer within `msg_controllen`, and the payload is
        // read unaligned only when the header says it is large enough.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let want = libc::CMSG_LEN(std::mem::size_of::<libc::tpacket_auxdata>() as u32);
                if (*c).cmsg_level == libc::SOL_PACKET
                    && (*c).cmsg_type == libc::PACKET_AUXDATA
                    && (*c).cmsg_len as usize >= want as usize
                {
                    aux = Some(std::ptr::read_unaligned(
                        libc::CMSG_DATA(c) as *const libc::tpacket_auxdata
                    ));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }

        // `struct virtio_net_hdr` in host byte order: little-endian here,
        // as `offload::VnetHdr` reads it.
        let vnet_hdr = VnetHdr::parse(&vnet[..]).unwrap_or_default();
        Ok(Some(RecvMeta {
            outgoing: addr.sll_pkttype == libc::PACKET_OUTGOING,
            info: RxInfo {
                // With MSG_TRUNC the length is the frame's full length even
                // if it did not fit.
                len: n.saturating_sub(VNET_HDR_LEN),
                tag: aux.and_then(|a| stripped_tag(a.tp_status, a.tp_vlan_tci, a.tp_vlan_tpid)),
                csum: (vnet_hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0)
                    .then_some((vnet_hdr.csum_start, vnet_hdr.csum_offset)),
            },
        }))
    }

    /// Sends one frame. Its vnet header asks the kernel for what is left
    /// to do: complete a checksum, or segment a 64 KiB TCP packet from a
    /// TSO guest (the kernel segments in software where the device cannot,
    /// and a veth passes it on whole). `struct virtio_net_hdr` here is in
    /// host byte order, little-endian on the hosts tandem runs on.
    fn send(&self, frame: &[u8], off: &Offload) -> io::Result<()> {
        let hdr: [u8; VNET_HDR_LEN] = offload::rx_header(frame, off).to_bytes();
        // No address and no control data.
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(&hdr), IoSlice::new(frame)],
            &[],
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        Ok(())
    }
}

/// An 802.1Q/802.1ad tag the kernel removed from a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tag {
    pub tpid: u16,
    pub tci: u16,
}

/// The tag described by `PACKET_AUXDATA`, if the frame had one. As in
/// packet(7): a TCI of zero with `TP_STATUS_VLAN_VALID` clear means no
/// tag; kernels without `TP_STATUS_VLAN_TPID_VALID` only strip 802.1Q.
pub(crate) fn stripped_tag(status: u32, tci: u16, tpid: u16) -> Option<Tag> {
    // libc: nix has no TP_STATUS_* constants.
    if status & libc::TP_STATUS_VLAN_VALID == 0 && tci == 0 {
        return None;
    }
    let tpid = if status & libc::TP_STATUS_VLAN_TPID_VALID != 0 && tpid != 0 {
        tpid
    } else {
        TPID_8021Q
    };
    Some(Tag { tpid, tci })
}

/// What the kernel said about a received frame besides its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RxInfo {
    /// The frame's full length as received, without the removed tag.
    pub len: usize,
    /// The outer tag the kernel removed.
    pub tag: Option<Tag>,
    /// An unfinished checksum: where summing starts and where the result
    /// goes (relative to that start), both counted in the received frame.
    pub csum: Option<(u16, u16)>,
}

/// Turns a received frame back into its wire form, in place. `scratch`
/// holds [`VLAN_HLEN`] bytes of headroom and then the frame as received
/// (possibly truncated to the buffer). Completes an unfinished checksum,
/// re-inserts the removed tag, and returns where the frame now is; `None`
/// if it was truncated, ends up outside the frame size limits, or carries
/// checksum offsets outside itself.
pub(crate) fn rebuild(scratch: &mut [u8], info: &RxInfo) -> Option<Range<usize>> {
    let room = scratch.len().checked_sub(VLAN_HLEN)?;
    // The kernel only removes a tag from a frame with a full header
    // behind it, so even a tagged frame arrives with at least a header.
    if info.len > room || info.len < MIN_FRAME {
        return None;
    }
    let wire_len = info.len + if info.tag.is_some() { VLAN_HLEN } else { 0 };
    if !netsys::frame_size_ok(wire_len) {
        return None;
    }
    let frame = &mut scratch[VLAN_HLEN..VLAN_HLEN + info.len];
    if let Some((start, offset)) = info.csum {
        if !complete_checksum(frame, usize::from(start), usize::from(offset)) {
            return None;
        }
    }
    match info.tag {
        None => Some(VLAN_HLEN..VLAN_HLEN + info.len),
        Some(tag) => {
            // Both MACs move into the headroom; the tag goes after them.
            scratch.copy_within(VLAN_HLEN..VLAN_HLEN + 12, 0);
            scratch[12..14].copy_from_slice(&tag.tpid.to_be_bytes());
            scratch[14..16].copy_from_slice(&tag.tci.to_be_bytes());
            Some(0..wire_len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{fold, ones_complement_sum};
    use proptest::prelude::*;

    fn scratch_with(frame: &[u8]) -> Vec<u8> {
        let mut s = vec![0xee; VLAN_HLEN + MAX_FRAME];
        s[VLAN_HLEN..VLAN_HLEN + frame.len()].copy_from_slice(frame);
        s
    }

    #[test]
    fn auxdata_tags() {
        use libc::{TP_STATUS_VLAN_TPID_VALID as TPID, TP_STATUS_VLAN_VALID as VALID};
        assert_eq!(stripped_tag(0, 0, 0), None);
        assert_eq!(stripped_tag(TPID, 0, 0x8100), None, "TPID alone is no tag");
        assert_eq!(
            stripped_tag(VALID, 0, 0),
            Some(Tag {
                tpid: 0x8100,
                tci: 0
            }),
            "priority-only tag"
        );
        assert_eq!(
            stripped_tag(VALID | TPID, 0x600a, 0x88a8),
            Some(Tag {
                tpid: 0x88a8,
                tci: 0x600a
            })
        );
        // Old kernels: no VALID bit but a TCI, no TPID.
        assert_eq!(
            stripped_tag(0, 10, 0),
            Some(Tag {
                tpid: 0x8100,
                tci: 10
            })
        );
        assert_eq!(
            stripped_tag(VALID | TPID, 10, 0),
            Some(Tag {
                tpid: 0x8100,
                tci: 10
            })
        );
    }

    #[test]
    fn size_limits() {
        let untagged = |len| RxInfo {
            len,
            ..Default::default()
        };
        let tagged = |len| RxInfo {
            len,
            tag: Some(Tag {
                tpid: 0x8100,
                tci: 5,
            }),
            csum: None,
        };
        let mut s = vec![0; VLAN_HLEN + MAX_FRAME];
        assert_eq!(rebuild(&mut s, &untagged(MIN_FRAME - 1)), None);
        assert_eq!(
            rebuild(&mut s, &untagged(MIN_FRAME)),
            Some(4..4 + MIN_FRAME)
        );
        assert_eq!(
            rebuild(&mut s, &untagged(MAX_FRAME)),
            Some(4..4 + MAX_FRAME)
        );
        assert_eq!(rebuild(&mut s, &untagged(MAX_FRAME + 1)), None, "truncated");
        assert_eq!(rebuild(&mut s, &untagged(65_000)), None, "GRO-sized");
        assert_eq!(rebuild(&mut s, &tagged(MAX_FRAME - 4)), Some(0..MAX_FRAME));
        assert_eq!(
            rebuild(&mut s, &tagged(MAX_FRAME - 3)),
            None,
            "too big once tagged"
        );
        assert_eq!(rebuild(&mut s, &tagged(MIN_FRAME)), Some(0..MIN_FRAME + 4));
        assert_eq!(rebuild(&mut s, &tagged(MIN_FRAME - 1)), None);
        let mut tiny = vec![0; 3];
        assert_eq!(rebuild(&mut tiny, &untagged(0)), None);
    }

    #[test]
    fn reinserts_tag_after_macs() {
        let mut f: Vec<u8> = (1..=12).collect();
        f.extend_from_slice(&[0x08, 0x00, 0xaa, 0xbb]);
        let mut s = scratch_with(&f);
        let info = RxInfo {
            len: f.len(),
            tag: Some(Tag {
                tpid: 0x8100,
                tci: 0x600a,
            }),
            csum: None,
        };
        let r = rebuild(&mut s, &info).unwrap();
        let mut want: Vec<u8> = (1..=12).collect();
        want.extend_from_slice(&[0x81, 0x00, 0x60, 0x0a, 0x08, 0x00, 0xaa, 0xbb]);
        assert_eq!(&s[r], &want[..]);
    }

    /// A reference Internet checksum over the pseudo header and segment.
    fn reference_udp_checksum(src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> u16 {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&src);
        bytes.extend_from_slice(&dst);
        bytes.extend_from_slice(&[0, 17]);
        bytes.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        bytes.extend_from_slice(udp);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u32 = 0;
        for w in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let c = !(sum as u16);
        if c == 0 {
            0xffff
        } else {
            c
        }
    }

    /// An Ethernet/IPv4/UDP frame whose UDP checksum field holds the
    /// pseudo-header sum, as the kernel leaves it for the hardware.
    fn partial_udp_frame(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> (Vec<u8>, usize) {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        let udp_len = 8 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        let l4 = f.len();
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&fold(ones_complement_sum(&pseudo)).to_be_bytes());
        f.extend_from_slice(payload);
        (f, l4)
    }

    #[test]
    fn checksum_offsets_outside_frame_are_refused() {
        let mut f = vec![0u8; 40];
        assert!(!complete_checksum(&mut f, 41, 0));
        assert!(!complete_checksum(&mut f, 34, 5));
        assert!(!complete_checksum(&mut f, usize::MAX, 6));
        assert!(complete_checksum(&mut f, 34, 4));
        let mut s = scratch_with(&f);
        let info = RxInfo {
            len: f.len(),
            tag: None,
            csum: Some((38, 6)),
        };
        assert_eq!(rebuild(&mut s, &info), None);
    }

    proptest! {
        #[test]
        fn completes_udp_checksums(
            src in any::<[u8; 4]>(),
            dst in any::<[u8; 4]>(),
            payload in proptest::collection::vec(any::<u8>(), 0..1400),
            tagged in any::<bool>(),
        ) {
            let (f, l4) = partial_udp_frame(src, dst, &payload);
            let mut s = scratch_with(&f);
            let tag = tagged.then_some(Tag { tpid: 0x8100, tci: 10 });
            let info = RxInfo { len: f.len(), tag, csum: Some((l4 as u16, 6)) };
            let r = rebuild(&mut s, &info).unwrap();
            let out = &s[r];
            let shift = if tagged { VLAN_HLEN } else { 0 };
            let mut udp = f[l4..].to_vec();
            udp[6] = 0;
            udp[7] = 0;
            let want = reference_udp_checksum(src, dst, &udp);
            prop_assert_eq!(
                u16::from_be_bytes([out[l4 + shift + 6], out[l4 + shift + 7]]),
                want
            );
        }

        #[test]
        fn rebuild_restores_the_wire_frame(
            frame in proptest::collection::vec(any::<u8>(), MIN_FRAME..=MAX_FRAME),
            tpid in prop_oneof![Just(0x8100u16), Just(0x88a8u16)],
            tci in any::<u16>(),
        ) {
            // The wire frame carries a tag after the MACs; the kernel hands
            // over the frame without it, plus the tag out of band.
            let mut wire = frame[..12].to_vec();
            wire.extend_from_slice(&tpid.to_be_bytes());
            wire.extend_from_slice(&tci.to_be_bytes());
            wire.extend_from_slice(&frame[12..]);
            let mut s = scratch_with(&frame);
            let info = RxInfo { len: frame.len(), tag: Some(Tag { tpid, tci }), csum: None };
            match rebuild(&mut s, &info) {
                Some(r) => prop_assert_eq!(&s[r], &wire[..]),
                None => prop_assert!(wire.len() > MAX_FRAME),
            }
        }

        #[test]
        fn rebuild_never_panics(
            len in 0usize..70_000,
            tag in any::<Option<(u16, u16)>>(),
            csum in any::<Option<(u16, u16)>>(),
            buf in 0usize..2000,
        ) {
            let mut s = vec![0u8; buf];
            let info = RxInfo { len, tag: tag.map(|(tpid, tci)| Tag { tpid, tci }), csum };
            if let Some(r) = rebuild(&mut s, &info) {
                prop_assert!(netsys::frame_size_ok(r.len()));
                prop_assert!(r.end <= s.len());
            }
        }
    }
}
