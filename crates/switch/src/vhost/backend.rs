//! The vhost-user backend: one [`Conn`] per frontend connection, serving
//! the rings from the daemon's worker thread.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::getpid;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::ring::{process_rx, process_tx, rx_offloads, NetPath, RingError};
use super::{
    lock, offered_protocol_features, ConnectHook, Mem, Vring, ANNOUNCE_AFTER_PAUSE, EGRESS_EVENT,
    MAX_QUEUE_SIZE, NUM_QUEUES, OFFERED_FEATURES, RX_QUEUE, THROTTLE_EVENT, TX_MORE_EVENT,
    TX_QUEUE,
};
use crate::offload::RxOffloads;
use crate::port::{DropReason, EgressQueue, Ingress, PortCounters, PortId};
use tandem_dirty::PageLog;

/// What a port needs for its I/O, shared by the port and its connections.
pub(super) struct PortIo {
    pub(super) id: PortId,
    pub(super) name: String,
    pub(super) egress: Arc<EgressQueue>,
    pub(super) counters: Arc<PortCounters>,
    pub(super) ingress: Arc<dyn Ingress>,
    pub(super) on_connect: Option<ConnectHook>,
    /// The exit event of every connection's vring worker thread: one
    /// eventfd for the port's whole life, drained after each connection.
    ///
    /// Each connection's worker gets its own duplicate of it (see
    /// [`Conn::new`]). `vhost-user-backend` 0.24 turns that duplicate into
    /// a raw fd for its epoll and never closes it, so the port notes its
    /// number in `lent_exit` and closes it once the worker is gone, if the
    /// number still names this eventfd ([`Self::reclaim_lent_exit_fds`]).
    /// Every descriptor has one owner: no double close, whatever the
    /// library does with its copy, and no descriptor leaked per QEMU
    /// (re)connection.
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
    /// Numbers of the duplicates lent to workers and not yet reclaimed.
    lent_exit: Mutex<Vec<RawFd>>,
    /// Fires when a TX ring held back by shaping may be served again
    /// (non-blocking, so a read after a re-arm cannot block the worker).
    pub(super) throttle: Mutex<TimerFd>,
    /// Written when a TX run stopped at its budget ([`super::TX_BUDGET`]):
    /// the worker serves the ring again on its next turn, after whatever
    /// else is pending, without waiting for a kick.
    pub(super) tx_more: EventFd,
    /// Set while replication needs this port's writes into guest RAM.
    pub(super) write_log: Mutex<Option<Arc<PageLog>>>,
    /// Set while the VM migrates away: frames queued for it are kept when
    /// its rings stop (the switch forwards them to its new host, or they
    /// are delivered here if it stays), not dropped as stale.
    pub(super) hold_egress: std::sync::atomic::AtomicBool,
}

impl PortIo {
    pub(super) fn new(
        id: PortId,
        name: String,
        egress: Arc<EgressQueue>,
        counters: Arc<PortCounters>,
        ingress: Arc<dyn Ingress>,
        on_connect: Option<ConnectHook>,
    ) -> io::Result<PortIo> {
        let (exit_consumer, exit_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let throttle = TimerFd::new()?;
        fcntl(throttle.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        Ok(PortIo {
            id,
            name,
            egress,
            counters,
            ingress,
            on_connect,
            exit_consumer,
            exit_notifier,
            lent_exit: Mutex::new(Vec::new()),
            throttle: Mutex::new(throttle),
            tx_more: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            write_log: Mutex::new(None),
            hold_egress: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn arm_throttle(&self, wait: Duration) {
        if let Err(e) = lock(&self.throttle).reset(wait, None) {
            // Without the timer the watchdog poke still serves the ring.
            warn!(port = %self.name, error = %e, "cannot arm the shaping timer");
        }
    }

    /// Asks the worker to serve the TX ring again on its next turn.
    fn tx_again(&self) {
        if let Err(e) = self.tx_more.write(1) {
            // Without it the watchdog poke still serves the ring.
            warn!(port = %self.name, error = %e, "cannot re-arm the TX queue");
        }
    }

    /// Drops everything queued for the guest (the port is down).
    pub(super) fn drop_egress(&self) -> usize {
        if self.hold_egress.load(Ordering::Acquire) {
            return 0;
        }
        let n = self.egress.clear();
        for _ in 0..n {
            self.counters.dropped(DropReason::NoBuffer);
        }
        n
    }

    /// Tidies up after a connection whose daemon has been dropped (its
    /// worker thread joined): resets the exit event for the next worker,
    /// closes the duplicate lent to the old one and drops what was queued
    /// for its guest.
    pub(super) fn connection_ended(&self) {
        let _ = self.exit_consumer.consume();
        let _ = self.tx_more.read();
        self.reclaim_lent_exit_fds();
        self.drop_egress();
    }

    /// Closes the exit eventfd duplicates lent to workers that are gone;
    /// how many it closed. Only a number that still names the port's exit
    /// eventfd is closed: should the library have closed its copy itself,
    /// the number may since name someone else's descriptor, which is left
    /// alone.
    fn reclaim_lent_exit_fds(&self) -> usize {
        let mut closed = 0;
        for fd in lock(&self.lent_exit).drain(..) {
            match same_open_file(fd, self.exit_consumer.as_raw_fd()) {
                Ok(true) => {
                    // SAFETY: `fd` is the duplicate this port made in
                    // `Conn::new` and lent to a worker that has exited; the
                    // library gave up owning it (`into_raw_fd`) and keeps
                    // no reference to it once its daemon is dropped. kcmp
                    // just showed the number still names the port's exit
                    // eventfd, so it was not closed and reused: this
                    // OwnedFd is its only owner.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    closed += 1;
                }
                Ok(false) => {
                    debug!(port = %self.name, fd, "lent exit eventfd was closed by the library")
                }
                Err(e) => {
                    debug!(port = %self.name, fd, error = %e,
                        "cannot tell whether the lent exit eventfd is still ours; leaving it open")
                }
            }
        }
        closed
    }
}

/// Whether descriptors `a` and `b` of this process name the same open file
/// description (kcmp(2), `KCMP_FILE`). A closed `a` or `b` names none.
fn same_open_file(a: RawFd, b: RawFd) -> io::Result<bool> {
    /// `KCMP_FILE` of <linux/kcmp.h>.
    const KCMP_FILE: libc::c_long = 0;
    let pid = libc::c_long::from(getpid().as_raw());
    // libc, not nix: nix has no wrapper for kcmp(2).
    // SAFETY: kcmp takes only integers (pids, a type, descriptor numbers)
    // and neither reads nor writes this process's memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a),
            libc::c_long::from(b),
        )
    };
    match r {
        0 => Ok(true),
        r if r > 0 => Ok(false),
        _ => match Errno::last() {
            Errno::EBADF => Ok(false),
            e => Err(e.into()),
        },
    }
}

/// State of one frontend connection; it is the `VhostUserBackend`.
pub(super) struct Conn {
    pub(super) io: Arc<PortIo>,
    mem: Mutex<Mem>,
    features: AtomicU64,
    /// The vrings, as seen by the first event of the connection.
    vrings: Mutex<Vec<Vring>>,
    /// Both rings were ready and enabled at the last check.
    pub(super) running: AtomicBool,
    /// Whether the rings have run on this connection, and when they last
    /// stopped: a checkpoint stops and restarts them within milliseconds,
    /// which is not a new guest to announce.
    pub(super) started_once: AtomicBool,
    pub(super) stopped_at: Mutex<Option<Instant>>,
    /// Per queue: the ring was found corrupt and is ignored until reset.
    broken: [AtomicBool; NUM_QUEUES],
    /// The worker's own duplicates of the port's exit event, handed to
    /// the library by `exit_event` (made here, where failing is still
    /// harmless: a worker without exit event could never be stopped).
    exit_event: Mutex<Option<(EventConsumer, EventNotifier)>>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("port", &self.io.name).finish()
    }
}

impl Conn {
    pub(super) fn new(io: Arc<PortIo>, mem: Mem) -> io::Result<Self> {
        let exit_event = (io.exit_consumer.try_clone()?, io.exit_notifier.try_clone()?);
        // Nothing is negotiated yet on this connection.
        io.egress.set_accepts(RxOffloads::default());
        Ok(Self {
            io,
            mem: Mutex::new(mem),
            features: AtomicU64::new(0),
            vrings: Mutex::new(Vec::new()),
            running: AtomicBool::new(false),
            started_once: AtomicBool::new(false),
            stopped_at: Mutex::new(None),
            broken: [AtomicBool::new(false), AtomicBool::new(false)],
            exit_event: Mutex::new(Some(exit_event)),
        })
    }

    pub(super) fn rings_running(&self) -> bool {
        let vrings = lock(&self.vrings);
        vrings.len() == NUM_QUEUES
            && vrings.iter().all(|v| {
                let s = v.get_ref();
                s.get_queue().ready() && s.is_enabled()
            })
    }

    /// Follows the rings starting and stopping; runs the connect hook when
    /// they start for the first time on this connection or after a real
    /// pause (a guest reboot), not after a checkpoint's brief stop. Returns
    /// true when the rings just started.
    fn note_vrings(&self, vrings: &[Vring]) -> bool {
        {
            let mut cached = lock(&self.vrings);
            if cached.is_empty() && vrings.len() == NUM_QUEUES {
                *cached = vrings.to_vec();
            }
        }
        let running = self.rings_running();
        let was = self.running.swap(running, Ordering::AcqRel);
        if running && !was {
            let first = !self.started_once.swap(true, Ordering::AcqRel);
            let paused = lock(&self.stopped_at)
                .take()
                .map_or(Duration::MAX, |t| t.elapsed());
            if first || paused >= ANNOUNCE_AFTER_PAUSE {
                info!(port = %self.io.name, "guest rings started");
                if let Some(hook) = &self.io.on_connect {
                    hook();
                }
            } else {
                debug!(port = %self.io.name, ?paused, "guest rings restarted");
            }
            return true;
        } else if !running && was {
            *lock(&self.stopped_at) = Some(Instant::now());
            debug!(port = %self.io.name, "guest rings stopped");
        }
        false
    }

    fn ring_broken(&self, queue: u16, e: &RingError) {
        if let Some(flag) = self.broken.get(usize::from(queue)) {
            if !flag.swap(true, Ordering::AcqRel) {
                warn!(port = %self.io.name, queue, error = %e,
                    "guest virtqueue is corrupt; ignoring it until the guest resets the device");
                self.io.counters.dropped(DropReason::BadDescriptor);
            }
        }
    }

    fn is_broken(&self, queue: u16) -> bool {
        self.broken
            .get(usize::from(queue))
            .is_some_and(|b| b.load(Ordering::Acquire))
    }

    fn run_tx(&self, vring: &Vring) {
        if self.is_broken(TX_QUEUE) {
            return;
        }
        let mut state = vring.get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) {
            return;
        }
        let mem = lock(&self.mem).memory();
        let features = self.features.load(Ordering::Acquire);
        let log = lock(&self.io.write_log).clone();
        let path = NetPath::for_features(self.io.id, features, &self.io.counters, log.as_deref());
        match process_tx(&*mem, state.get_queue_mut(), &path, &*self.io.ingress) {
            Ok(run) => {
                if let Some(wait) = run.throttled {
                    self.io.arm_throttle(wait);
                }
                if run.budget_spent {
                    // The guest's notifications are off; come back for the
                    // rest after the worker's other events.
                    self.io.tx_again();
                }
                if run.signal {
                    if let Err(e) = state.signal_used_queue() {
                        debug!(port = %self.io.name, error = %e, "cannot signal TX queue");
                    }
                }
            }
            Err(e) => {
                drop(state);
                self.ring_broken(TX_QUEUE, &e);
            }
        }
    }

    fn run_rx(&self, vring: &Vring) {
        let mut state = vring.get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) || self.is_broken(RX_QUEUE) {
            drop(state);
            // Stopped for a checkpoint: the frames wait in the (bounded)
            // egress queue and are delivered when the ring restarts. A
            // ring that never ran, or is corrupt, takes nothing.
            let briefly_stopped = !self.is_broken(RX_QUEUE)
                && self.started_once.load(Ordering::Acquire)
                && lock(&self.stopped_at).is_some_and(|t| t.elapsed() < ANNOUNCE_AFTER_PAUSE);
            if !briefly_stopped {
                self.io.drop_egress();
            }
            return;
        }
        let mem = lock(&self.mem).memory();
        let features = self.features.load(Ordering::Acquire);
        let log = lock(&self.io.write_log).clone();
        let path = NetPath::for_features(self.io.id, features, &self.io.counters, log.as_deref());
        match process_rx(&*mem, state.get_queue_mut(), &path, &self.io.egress) {
            Ok(run) => {
                if run.signal {
                    if let Err(e) = state.signal_used_queue() {
                        debug!(port = %self.io.name, error = %e, "cannot signal RX queue");
                    }
                }
            }
            Err(e) => {
                drop(state);
                self.ring_broken(RX_QUEUE, &e);
                self.io.drop_egress();
            }
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct NetBackend(pub(super) Arc<Conn>);

impl VhostUserBackend for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn acked_features(&self, features: u64) {
        debug!(port = %self.0.io.name, features = format_args!("{features:#x}"), "features acked");
        self.0.features.store(features, Ordering::Release);
        self.0.io.egress.set_accepts(rx_offloads(features));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        offered_protocol_features()
    }

    fn reset_device(&self) {
        self.0.running.store(false, Ordering::Release);
        self.0.io.egress.set_accepts(RxOffloads::default());
        for b in &self.0.broken {
            b.store(false, Ordering::Release);
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets it on the queues; they are read from there.
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *lock(&self.0.mem) = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = lock(&self.0.exit_event).take()?;
        // The library owns this duplicate from here on. vhost-user-backend
        // 0.24 (`VringEpollHandler::new`) turns it into a raw fd for its
        // epoll and never closes it: the port closes it after the worker
        // is gone (`PortIo::connection_ended`).
        lock(&self.0.io.lent_exit).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend stopped the ring (GET_VRING_BASE: guest reset,
        // shutdown or migration); a restarted ring gets a fresh chance.
        if let Some(b) = self.0.broken.get(queue_index as usize) {
            b.store(false, Ordering::Release);
        }
        if self.0.running.swap(false, Ordering::AcqRel) {
            *lock(&self.0.stopped_at) = Some(Instant::now());
            debug!(port = %self.0.io.name, queue_index, "guest rings stopped");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: the library would end the worker thread
        // and with it the port.
        let conn = &self.0;
        match device_event {
            // Drain before serving so that no wake-up is lost.
            EGRESS_EVENT => {
                let _ = conn.io.egress.notifier().read();
            }
            TX_MORE_EVENT => {
                let _ = conn.io.tx_more.read();
            }
            _ => {}
        }
        if conn.note_vrings(vrings) {
            // A restarted ring may hold buffers the guest made available
            // while it was stopped, with the kick already spent: with
            // EVENT_IDX the guest will not kick again for them. Serve both
            // queues now, as if kicked.
            if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                conn.run_tx(v);
            }
            if let Some(v) = vrings.get(usize::from(RX_QUEUE)) {
                conn.run_rx(v);
            }
            // An interrupt sent while the ring was being stopped may have
            // gone to a call descriptor QEMU has since replaced; a guest
            // waiting for TX completions would then wait forever. A spare
            // interrupt costs the guest one look at its rings.
            for v in vrings {
                let _ = v.signal_used_queue();
            }
            return Ok(());
        }
        match device_event {
            EGRESS_EVENT => {
                // Also a watchdog tick (see `VmPortHandle::poke`): serve TX
                // too, in case a kick was lost around a ring restart.
                if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                    conn.run_tx(v);
                }
                match vrings.get(usize::from(RX_QUEUE)) {
                    Some(v) => conn.run_rx(v),
                    None => {
                        conn.io.drop_egress();
                    }
                }
            }
            RX_QUEUE => match vrings.get(usize::from(RX_QUEUE)) {
                Some(v) => conn.run_rx(v),
                None => {
                    conn.io.drop_egress();
                }
            },
            TX_QUEUE => {
                if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                    conn.run_tx(v);
                }
            }
            THROTTLE_EVENT => {
                // Non-blocking: nothing to read if it was re-armed since.
                let _ = lock(&conn.io.throttle).wait();
                if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                    conn.run_tx(v);
                }
            }
            TX_MORE_EVENT => {
                // The last TX run stopped at its budget.
                if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                    conn.run_tx(v);
                }
            }
            other => debug!(port = %conn.io.name, event = other, "unexpected event"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::sim::SimRing;
    use crate::vhost::TX_BUDGET;
    use std::fs::File;
    use vhost_user_backend::VhostUserDaemon;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    struct Discard;

    impl Ingress for Discard {
        fn ingress(&self, _: PortId, _: &[u8]) {}
    }

    fn port_io(ingress: Arc<dyn Ingress>) -> PortIo {
        PortIo::new(
            7,
            "t".into(),
            Arc::new(EgressQueue::new(4, 8192).unwrap()),
            Arc::new(PortCounters::default()),
            ingress,
            None,
        )
        .unwrap()
    }

    #[test]
    fn each_worker_gets_its_own_exit_eventfd_and_the_port_closes_it() {
        let io = Arc::new(port_io(Arc::new(Discard)));
        let own = io.exit_consumer.as_raw_fd();
        for _ in 0..3 {
            let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let conn = Arc::new(Conn::new(io.clone(), mem.clone()).unwrap());
            let daemon = VhostUserDaemon::new("t".into(), NetBackend(conn), mem).unwrap();
            let lent = lock(&io.lent_exit).clone();
            assert_eq!(lent.len(), 1, "one duplicate lent to the worker");
            assert_ne!(lent[0], own, "a descriptor of its own, not an alias");
            assert!(same_open_file(lent[0], own).unwrap());
            // Dropping it notifies the exit event and joins the worker.
            drop(daemon);
            io.exit_consumer
                .consume()
                .expect("the port's exit eventfd is open and was notified");
            let again = io.exit_consumer.consume().unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
            // vhost-user-backend 0.24 leaves its copy open: the port closes
            // it, once, and its own descriptor stays usable.
            assert_eq!(io.reclaim_lent_exit_fds(), 1);
            assert!(lock(&io.lent_exit).is_empty());
            assert!(!same_open_file(lent[0], own).unwrap(), "closed");
            assert_eq!(io.reclaim_lent_exit_fds(), 0);
            io.exit_notifier.notify().unwrap();
            io.exit_consumer.consume().unwrap();
        }
    }

    #[test]
    fn a_lent_number_that_names_another_file_is_left_open() {
        let io = port_io(Arc::new(Discard));
        // As if the library had closed its copy and the number had been
        // reused for something else.
        let other = File::open("/dev/null").unwrap();
        lock(&io.lent_exit).push(other.as_raw_fd());
        assert_eq!(io.reclaim_lent_exit_fds(), 0);
        other.metadata().expect("still open");
        assert!(same_open_file(other.as_raw_fd(), other.as_raw_fd()).unwrap());
    }

    #[test]
    fn a_tx_run_that_spends_its_budget_comes_back_without_a_kick() {
        // The simulated guest and the port map the same file, as QEMU's
        // guest RAM and the backend do.
        let file = tempfile::tempfile().unwrap();
        file.set_len(SimRing::MEM_SIZE).unwrap();
        let region = || {
            [(
                GuestAddress(0),
                SimRing::MEM_SIZE as usize,
                Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            )]
        };
        let mut ring = SimRing::new(64).unwrap();
        ring.mem = GuestMemoryMmap::from_ranges_with_files(region()).unwrap();
        // Features 0: a 10-byte header, then a 62-byte frame.
        ring.write(SimRing::BUF, &[0u8; 72]);
        for i in 0..64 {
            ring.set_desc(i, SimRing::BUF, 72, 0, 0);
        }
        let total = TX_BUDGET + 10;
        let guest = Arc::new(ring.busy_guest(total as u16));
        let io = Arc::new(port_io(guest.clone()));
        let mem: Mem =
            GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges_with_files(region()).unwrap());
        let backend = NetBackend(Arc::new(Conn::new(io.clone(), mem.clone()).unwrap()));
        let rx = Vring::new(mem.clone(), MAX_QUEUE_SIZE as u16).unwrap();
        let tx = Vring::new(mem, MAX_QUEUE_SIZE as u16).unwrap();
        tx.set_queue_info(SimRing::DESC, SimRing::AVAIL, SimRing::USED)
            .unwrap();
        tx.set_queue_size(64);
        tx.set_queue_ready(true);
        tx.set_enabled(true);

        // A kick: one run takes the budget and re-arms the worker.
        backend.0.run_tx(&tx);
        assert_eq!(guest.frames(), TX_BUDGET);
        assert_eq!(io.tx_more.read().unwrap(), 1, "re-armed");
        io.tx_more.write(1).unwrap();
        // The worker's next turn drains the event and serves the rest.
        let vrings = [rx, tx];
        backend
            .handle_event(TX_MORE_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(guest.frames(), total);
        let idle = io.tx_more.read().unwrap_err();
        assert_eq!(
            idle.kind(),
            io::ErrorKind::WouldBlock,
            "drained, not re-armed"
        );
        assert_eq!(io.counters.snapshot().rx_frames, total as u64);
    }
}
