//! A host port: the host's own network stack as a port of the switch,
//! through a tap interface.
//!
//! The port creates a non-persistent tap (`IFF_TAP | IFF_NO_PI`) and sets
//! it up; the tap vanishes when the port closes it. What the host stack
//! sends on the tap reaches the switch; what the switch sends to the port
//! is written to the tap and received by the host stack.
//!
//! [`HostPortHandle::configure`] gives the tap the document's addresses
//! and MTU. The port keeps the sockets it does this with from its
//! creation, so it configures the tap in the tap's own network namespace
//! whichever thread asks later.
//!
//! The tap offers no receive offloads unless asked (`TUNSETOFFLOAD`, never
//! done here), so frames read from it carry finished checksums and are at
//! most MTU-sized; a VLAN tag the host stack offloaded to the tap is
//! written in-band by the tun driver.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags};
use nix::sys::stat::Mode;
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::config::Cidr;
use crate::netsys::{self, Rtnl, SendFn, TxState, Worker, BATCH, TX_RETRY};
use crate::offload::Offload;
use crate::port::{DropReason, EgressQueue, Ingress, PortCounters, PortId};

/// A read buffer large enough for anything a tap hands over (its MTU can
/// be raised), so that oversize frames are seen whole and counted.
const READ_BUF: usize = 65_536;
/// Poll time-out when idle; only bounds how stale the loop can get.
const IDLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPortConfig {
    pub id: PortId,
    pub name: String,
    /// The tap interface to create, at most 15 bytes.
    pub tap: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HostPortError {
    #[error("host port `{port}`: `{tap}` is not a valid interface name: {why}")]
    InvalidName {
        port: String,
        tap: String,
        why: &'static str,
    },
    #[error(
        "host port `{port}`: cannot create tap `{tap}`: an interface of that name already exists"
    )]
    Exists { port: String, tap: String },
    #[error("host port `{port}`: cannot create tap `{tap}`: {what}: {source}")]
    Create {
        port: String,
        tap: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("host port `{port}`: {what}: {source}")]
    Setup {
        port: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// Configuring the tap failed; `field` is the spec's field
    /// (`addresses[1]`, `mtu`).
    #[error("host port `{port}`: {field}: {what}: {source}")]
    Configure {
        port: String,
        field: String,
        what: String,
        #[source]
        source: io::Error,
    },
}

impl HostPortError {
    /// The host port's field that could not be configured, if that is
    /// what failed.
    pub fn field(&self) -> Option<&str> {
        match self {
            HostPortError::Configure { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// A running host port. Dropping it stops it like
/// [`HostPortHandle::shutdown`].
pub struct HostPortHandle {
    name: String,
    tap: String,
    worker: Worker,
    /// Interface ioctls and rtnetlink, in the tap's namespace.
    ctl: OwnedFd,
    addressing: Mutex<Addressing>,
}

/// What [`HostPortHandle::configure`] has done to the tap.
struct Addressing {
    rtnl: Rtnl,
    /// The addresses tandem put on the tap (and will take off when the
    /// document drops them); addresses others added are left alone.
    addresses: Vec<Cidr>,
    /// The MTU the tap was created with, given back when the document
    /// stops setting one.
    default_mtu: u32,
}

impl HostPortHandle {
    /// Creates the tap, sets it up and starts the port's I/O thread. The
    /// tap is created in the network namespace of the calling thread (see
    /// [`netsys::in_netns`]).
    pub fn spawn(
        cfg: HostPortConfig,
        egress: Arc<EgressQueue>,
        counters: Arc<PortCounters>,
        ingress: Arc<dyn Ingress>,
    ) -> Result<HostPortHandle, HostPortError> {
        let port = cfg.name.clone();
        let tap = cfg.tap.clone();
        if let Err(why) = netsys::check_ifname(&tap) {
            return Err(HostPortError::InvalidName { port, tap, why });
        }
        let create = |what, source| HostPortError::Create {
            port: port.clone(),
            tap: tap.clone(),
            what,
            source,
        };
        let exists = || HostPortError::Exists {
            port: port.clone(),
            tap: tap.clone(),
        };
        let ctl = netsys::control_socket().map_err(|e| HostPortError::Setup {
            port: port.clone(),
            what: "control socket",
            source: e,
        })?;
        // TUNSETIFF on an existing tap would attach to it; refuse early with
        // a clear message, and IFF_TUN_EXCL closes the race.
        if netsys::ifindex(&ctl, &tap)
            .map_err(|e| create("looking up the name", e))?
            .is_some()
        {
            return Err(exists());
        }
        let fd = open_tun().map_err(|e| create("opening /dev/net/tun", e))?;
        // libc: these are TUNSETIFF flags, and nix has no IFF_TUN_EXCL.
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL;
        let got = match netsys::tun_set_iff(&fd, &tap, flags) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(Errno::EBUSY as i32) => return Err(exists()),
            Err(e) => return Err(create("TUNSETIFF", e)),
        };
        if got != tap {
            return Err(create(
                "TUNSETIFF",
                io::Error::other(format!("the kernel named the device `{got}`")),
            ));
        }
        netsys::set_up(&ctl, &tap).map_err(|e| create("setting it up", e))?;
        let default_mtu = netsys::mtu(&ctl, &tap)
            .map_err(|e| create("reading its MTU", e))?
            .unwrap_or(1500);
        let rtnl = Rtnl::new().map_err(|e| HostPortError::Setup {
            port: port.clone(),
            what: "rtnetlink socket",
            source: e,
        })?;

        let stop = Worker::stop_fd().map_err(|e| HostPortError::Setup {
            port: port.clone(),
            what: "stop eventfd",
            source: e,
        })?;
        let core = HostPort {
            id: cfg.id,
            name: port.clone(),
            tap: tap.clone(),
            fd: Some(fd),
            egress,
            counters,
            ingress,
            stop: stop.clone(),
            buf: vec![0; READ_BUF],
            tx: TxState::new(),
        };
        let worker = Worker::spawn(port.clone(), format!("hostport-{port}"), stop, move || {
            core.run()
        })
        .map_err(|e| HostPortError::Setup {
            port: port.clone(),
            what: "spawning the I/O thread",
            source: e,
        })?;
        info!(port = %port, tap = %tap, "host port started");
        Ok(HostPortHandle {
            name: port,
            tap,
            worker,
            ctl,
            addressing: Mutex::new(Addressing {
                rtnl,
                addresses: Vec::new(),
                default_mtu,
            }),
        })
    }

    /// Makes the tap's addresses and MTU what the document says: removes
    /// the addresses tandem added that `addresses` no longer holds, sets
    /// the MTU (`None`: the tap's default), adds what is missing, and
    /// sets the tap up. On error the tap may be half-way; configuring it
    /// again with the previous values puts it back, which is what an
    /// apply that fails does.
    pub fn configure(&self, addresses: &[Cidr], mtu: Option<u32>) -> Result<(), HostPortError> {
        let mut a = self.addressing.lock().unwrap_or_else(|p| p.into_inner());
        let fail = |field: String, what: String, source: io::Error| HostPortError::Configure {
            port: self.name.clone(),
            field,
            what,
            source,
        };
        let index = netsys::ifindex(&self.ctl, &self.tap)
            .and_then(|i| i.ok_or_else(|| io::Error::from(Errno::ENODEV)))
            .map_err(|e| fail("tap".into(), format!("looking up `{}`", self.tap), e))?;
        // Old addresses go first: a prefix that changes is a removal and
        // an addition of the same address.
        let stale: Vec<Cidr> = a
            .addresses
            .iter()
            .filter(|c| !addresses.contains(c))
            .copied()
            .collect();
        for c in stale {
            a.rtnl
                .del_address(index, &c)
                .map_err(|e| fail("addresses".into(), format!("removing {c}"), e))?;
            a.addresses.retain(|x| *x != c);
            info!(port = %self.name, tap = %self.tap, address = %c, "address removed");
        }
        // Before the additions: IPv6 addresses need the MTU of 1280 that
        // validation asked for, and the kernel takes IPv6 off an
        // interface below it.
        let want = mtu.unwrap_or(a.default_mtu);
        let have = netsys::mtu(&self.ctl, &self.tap)
            .map_err(|e| fail("mtu".into(), "reading the MTU".into(), e))?;
        if have != Some(want) {
            netsys::set_mtu(&self.ctl, &self.tap, want).map_err(|e| {
                fail(
                    "mtu".into(),
                    format!("setting MTU {want} on `{}`", self.tap),
                    e,
                )
            })?;
            info!(port = %self.name, tap = %self.tap, mtu = want, "MTU set");
        }
        for (j, c) in addresses.iter().enumerate() {
            if a.addresses.contains(c) {
                continue;
            }
            a.rtnl
                .add_address(index, c)
                .map_err(|e| fail(format!("addresses[{j}]"), format!("adding {c}"), e))?;
            a.addresses.push(*c);
            info!(port = %self.name, tap = %self.tap, address = %c, "address added");
        }
        netsys::set_up(&self.ctl, &self.tap)
            .map_err(|e| fail("tap".into(), format!("setting `{}` up", self.tap), e))?;
        Ok(())
    }

    /// The tap interface's name.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// Stops the I/O thread and closes the tap, which removes it; waits at
    /// most [`netsys::STOP_TIMEOUT`].
    pub fn shutdown(mut self) {
        self.worker.stop();
    }
}

fn open_tun() -> io::Result<OwnedFd> {
    let raw = nix::fcntl::open(
        c"/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `raw` was just returned by open(2) and is owned by nobody
    // else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The host port's state, owned by its I/O thread.
struct HostPort {
    id: PortId,
    name: String,
    tap: String,
    /// `None` once the tap is gone (deleted under us).
    fd: Option<OwnedFd>,
    egress: Arc<EgressQueue>,
    counters: Arc<PortCounters>,
    ingress: Arc<dyn Ingress>,
    stop: Arc<EventFd>,
    buf: Vec<u8>,
    tx: TxState,
}

impl HostPort {
    /// Polls the stop and egress eventfds and the tap for at most
    /// `timeout`; returns what happened on each. Without a tap (it was
    /// deleted) only the eventfds are polled, as poll(2) would skip a
    /// negative descriptor, and nothing happened on the tap.
    fn wait(&self, timeout: Duration) -> io::Result<[PollFlags; 3]> {
        let stop = PollFd::new(netsys::eventfd_fd(&self.stop), PollFlags::POLLIN);
        let notify = PollFd::new(
            netsys::eventfd_fd(self.egress.notifier()),
            PollFlags::POLLIN,
        );
        let mut fds = [stop, notify, stop];
        let polled = match &self.fd {
            Some(fd) => {
                let mut tap_events = PollFlags::POLLIN;
                if self.tx.wants_writable() {
                    tap_events |= PollFlags::POLLOUT;
                }
                fds[2] = PollFd::new(fd.as_fd(), tap_events);
                3
            }
            None => 2,
        };
        netsys::poll(&mut fds[..polled], timeout)?;
        let tap = if polled == 3 {
            netsys::revents(&fds[2])
        } else {
            PollFlags::empty()
        };
        Ok([netsys::revents(&fds[0]), netsys::revents(&fds[1]), tap])
    }

    fn run(mut self) {
        loop {
            let timeout = self.tx.timeout(IDLE);
            let [stop, notify, rev] = match self.wait(timeout) {
                Ok(r) => r,
                Err(e) => {
                    warn!(port = %self.name, error = %e, "poll failed");
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
            if rev.contains(PollFlags::POLLIN) {
                self.receive();
            }
            if rev.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
                && !rev.contains(PollFlags::POLLIN)
            {
                // The tun driver reports an error on a descriptor whose
                // device was deleted: stop using it rather than spin.
                warn!(port = %self.name, tap = %self.tap, "tap is gone; dropping egress");
                self.fd = None;
            }
            if self.tx.pending() {
                let fd = self.fd.as_ref();
                // The tap has no vnet header: its queue accepts no offloads.
                let mut write = fd.map(|fd| move |f: &[u8], _: &Offload| write_frame(fd, f));
                // A tap has no link to re-evaluate: LinkDown is just a drop.
                let _ = self.tx.transmit(
                    &self.name,
                    &self.egress,
                    &self.counters,
                    write.as_mut().map(|f| f as &mut SendFn),
                );
            }
        }
        debug!(port = %self.name, "I/O thread stopping");
    }

    fn receive(&mut self) {
        let Some(fd) = self.fd.as_ref() else {
            return;
        };
        for _ in 0..BATCH {
            match nix::unistd::read(fd.as_raw_fd(), &mut self.buf) {
                Ok(n) if netsys::frame_size_ok(n) => {
                    self.counters.received(n);
                    self.ingress.ingress(self.id, &self.buf[..n]);
                }
                Ok(_) => self.counters.dropped(DropReason::Malformed),
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    let e = io::Error::from(e);
                    debug!(port = %self.name, tap = %self.tap, error = %e, "tap read failed");
                    return;
                }
            }
        }
    }
}

/// Writes one frame to the tap.
fn write_frame(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    nix::unistd::write(fd, frame)?;
    Ok(())
}
