//! One connection to the backup, as named steps: hello and the backup's
//! base, lifting a fence the backup has granted, the running copy, then the
//! epoch loop until the connection ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tandem_api::FtState;
use tokio::io::{split, ReadHalf};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::epoch::{next_schedule, EpochError};
use super::fence::Contact;
use super::guest::{Guest, GuestExit};
use super::io::{
    backup_reason, read_loop, receive_digest, AbortOnDrop, FromBackup, LinkWriter, ReadLoop,
};
use super::{Ended, Engine};
use crate::clock::Instant;
use crate::link::BoxStream;
use crate::ram::RamMap;
use crate::tracker::DirtyTracker;
use crate::wire::{Frame, FrameKind, Hello, HelloDisk, PAGE_SIZE};

/// How long the supervisor may take to notice and record that QEMU ended.
const GUEST_EXIT_WAIT: Duration = Duration::from_secs(2);

/// What the backup says it holds when a connection opens.
struct Opened {
    base: u64,
    acks: mpsc::UnboundedReceiver<FromBackup>,
    _reader: AbortOnDrop,
}

impl<G: Guest> Engine<G> {
    pub(super) async fn session(
        &mut self,
        conn: BoxStream,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        contact: &Arc<Contact>,
    ) -> Ended {
        // Whatever an earlier session had committed under a hold, this one
        // has not yet.
        self.held_tx.send_replace(None);
        let (rd, wr) = split(conn);
        let origin = Instant::now();
        let wr = LinkWriter::spawn(
            wr,
            self.cfg.heartbeat,
            origin,
            self.heartbeats_only_when_idle(),
        );
        let opened = match self.open(&wr, rd, contact, origin).await {
            Ok(o) => o,
            Err(why) => return Ended::Lost(why),
        };
        let Opened { base, mut acks, .. } = opened;
        info!(vm = %self.port.name(), base, "connected to backup");
        if contact.is_fenced() {
            if let Err(why) = self.lift_fence(contact, origin).await {
                return Ended::Lost(why);
            }
        }
        if base > 0 {
            // An earlier session's commits: they may be consistent, and the
            // backup may be armed on them.
            contact.arm();
        }
        if let Err(why) = self.start_copy(&wr, &mut acks, ram, tracker, base).await {
            return Ended::Lost(why);
        }
        self.epoch_loop(&wr, &mut acks, ram, tracker, contact, base)
            .await
    }

    /// Sends hello, starts the reader, and waits for the backup's base (the
    /// epoch it has committed; 0: none).
    async fn open(
        &mut self,
        wr: &LinkWriter,
        rd: ReadHalf<BoxStream>,
        contact: &Arc<Contact>,
        origin: Instant,
    ) -> Result<Opened, String> {
        let hello = Hello {
            vm: self.port.name().to_string(),
            uuid: self.port.uuid(),
            generation: self.cfg.generation,
            instance: self.instance,
            ram_size: self.port.ram_size(),
            page_size: PAGE_SIZE as u64,
            spec_toml: self.port.spec_toml(),
            disks: self
                .disks
                .iter()
                .map(|d| HelloDisk {
                    name: d.name().to_string(),
                    size: d.size(),
                })
                .collect(),
        };
        let payload = serde_json::to_vec(&hello).map_err(|e| format!("encoding hello: {e}"))?;
        wr.send_one(
            Frame::new(FrameKind::Hello, 0, 0, payload),
            self.cfg.fence_timeout,
        )
        .await
        .map_err(|e| format!("sending hello: {e}"))?;
        let (ack_tx, mut acks) = mpsc::unbounded_channel::<FromBackup>();
        // Nothing of this session is sent yet: until the base is known no
        // acknowledgement but the answer to hello is believed.
        self.sent.store(0, Ordering::SeqCst);
        let reader = tokio::spawn(read_loop(
            rd,
            ack_tx,
            ReadLoop {
                contact: contact.clone(),
                committed: self.committed_tx.clone(),
                observer: self.cfg.observer.clone(),
                sent: self.sent.clone(),
                origin,
                one_way: self.one_way_liveness(),
            },
        ));
        let reader = AbortOnDrop(reader);
        let base = match tokio::time::timeout(self.cfg.fence_timeout, acks.recv()).await {
            Ok(Some(Ok(f))) if f.kind == FrameKind::Committed => f.epoch,
            Ok(Some(Ok(f))) if f.kind == FrameKind::Resync => {
                return Err(format!("backup refused the replica: {}", f.reason()));
            }
            Ok(Some(Ok(f))) => return Err(format!("backup answered hello with {f:?}")),
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err("backup closed the connection".into()),
            Err(_) => return Err("backup did not answer hello".into()),
        };
        self.sent.store(base, Ordering::SeqCst);
        Ok(Opened {
            base,
            acks,
            _reader: reader,
        })
    }

    /// The backup took this connection, so it had not taken over, and it
    /// has restarted its silence clock: it cannot take over before we are
    /// silent for its takeover timeout again, and our own fencing
    /// (restarted now) comes first. Resume.
    async fn lift_fence(&mut self, contact: &Contact, origin: Instant) -> Result<(), String> {
        // The shim's lease goes back first: a tandemd that dies right after
        // the resume must not leave the guest running unfenced. The backup
        // heard our hello, sent at `origin` (the reader has recorded that).
        contact.heard_as_of(origin);
        let deadline = contact.lease_deadline(self.cfg.fence_timeout);
        self.port
            .renew_lease(deadline)
            .map_err(|e| format!("renewing the fence lease before resuming: {e}"))?;
        if contact.fence() == (super::fence::Fence::Fenced { paused: true }) {
            if let Err(e) = self.port.unfence().await {
                // Still fenced, and paused: the shim must not freeze QEMU
                // for good when that lease runs out.
                self.port.clear_lease();
                return Err(format!("resuming after the fence: {e}"));
            }
        }
        self.fenced_retries = 0;
        contact.lift();
        warn!(vm = %self.port.name(), "the backup answered again: fence lifted");
        Ok(())
    }

    /// The start of every session: the backup's digest, then a running copy
    /// of everything that differs from it (what the backup holds beyond its
    /// last commit is unknown).
    async fn start_copy(
        &mut self,
        wr: &LinkWriter,
        acks: &mut mpsc::UnboundedReceiver<FromBackup>,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        base: u64,
    ) -> Result<(), String> {
        let epoch = base + 1;
        self.first_consistent = None;
        self.stateless_since = Some(epoch);
        // The running copy is not consistent; the first consistent epoch
        // is the one after it.
        self.set(|s| s.open_epoch = s.open_epoch.max(epoch + 1));
        if let Some(o) = &self.cfg.observer {
            o.session_started(base, epoch + 1);
        }
        let pages = (self.port.ram_size() / PAGE_SIZE as u64) as usize;
        let digest = receive_digest(acks, pages).await?;
        tracker.mark_all_dirty();
        for d in &self.disks {
            d.resync_all();
        }
        let last_error = self.last_error.clone();
        self.set(|s| {
            match last_error {
                // Still failing: stay visibly degraded while retrying.
                Some(e) => {
                    s.state = FtState::Degraded;
                    s.detail = format!("{e}; resending from epoch {base}");
                }
                None => {
                    s.state = FtState::Syncing;
                    s.detail = "initial copy".into();
                }
            }
            s.last_committed = base;
        });
        // Initial copy while the guest runs: pages are copied first and
        // hashed as copied, so later changes show up in the next scan.
        self.send_running_copy(wr, ram, tracker, epoch, digest)
            .await
    }

    /// Epochs on a fixed schedule, heartbeats between them, until the
    /// connection ends.
    async fn epoch_loop(
        &mut self,
        wr: &LinkWriter,
        acks: &mut mpsc::UnboundedReceiver<FromBackup>,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        contact: &Arc<Contact>,
        base: u64,
    ) -> Ended {
        let write_bound = self.cfg.fence_timeout;
        let mut epoch = base + 2;
        let mut next_epoch = Instant::now();
        loop {
            if let Some(ended) = self.interrupted(wr, acks, contact).await {
                return ended;
            }
            let inflight = self.refresh_status(contact, epoch);
            if inflight > 0 && self.stalled() {
                return Ended::Stalled(format!(
                    "{inflight} epoch(s) sent, none committed; last commit {}",
                    *self.committed_tx.borrow()
                ));
            }
            let holding = *self.hold.borrow();
            self.note_hold(holding, inflight);
            let now = Instant::now();
            if now < next_epoch || inflight >= self.cfg.max_inflight || holding {
                // Heartbeats go out from the link's writer meanwhile.
                wr.set_idle(true);
                let wake = if inflight >= self.cfg.max_inflight {
                    now + Duration::from_millis(2)
                } else if holding {
                    now + self.cfg.heartbeat
                } else {
                    next_epoch.min(now + self.cfg.heartbeat)
                };
                let owner_gone = tokio::select! {
                    _ = tokio::time::sleep_until(wake) => false,
                    r = self.stop.changed() => r.is_err(),
                    r = self.hold.changed() => r.is_err(),
                };
                wr.set_idle(false);
                if owner_gone {
                    return Ended::Stopped {
                        bye_confirmed: self.bye(wr, acks).await.is_ok(),
                    };
                }
                continue;
            }
            // Epochs start on a fixed schedule, so timer slack does not add
            // up; one that starts more than an epoch late (the backup held
            // us back) restarts the schedule instead of bursting.
            next_epoch = next_schedule(next_epoch, now, self.cfg.epoch);
            match self
                .epoch(wr, ram, tracker, epoch, write_bound, contact)
                .await
            {
                Ok(()) => {}
                Err(EpochError::Guest(e)) => {
                    if contact.is_fenced() {
                        return Ended::Fenced;
                    }
                    // A QMP error in the middle of a checkpoint is most often
                    // QEMU dying under it, before the monitor's close is
                    // noticed. Treating that as a link failure would start a
                    // resync whose running copy leaves the backup nothing to
                    // resume: find out first.
                    if self.guest_ends_soon().await {
                        return self.guest_gone(wr, write_bound).await;
                    }
                    return Ended::Lost(format!("epoch {epoch}: {e}"));
                }
                Err(EpochError::Link(e)) => {
                    // The backup may have said why before it hung up.
                    let why = backup_reason(acks).await;
                    return Ended::Lost(why.unwrap_or_else(|| format!("epoch {epoch}: {e}")));
                }
            }
            epoch += 1;
        }
    }

    /// Publishes whether checkpoints are held with nothing in flight (what
    /// [`super::Primary::hold_epochs`] waits for), and says so in the
    /// status while they are.
    fn note_hold(&mut self, holding: bool, inflight: u64) {
        let committed = *self.committed_tx.borrow();
        let held = (holding && inflight == 0).then_some(committed);
        self.held_tx.send_if_modified(|h| {
            let changed = *h != held;
            *h = held;
            changed
        });
        if holding {
            // "Held" only once nothing is in flight: the epoch named is
            // then the last the backup will have until the hold ends.
            self.set(|s| {
                s.detail = match held {
                    Some(e) => format!(
                        "checkpoints held for a live migration after epoch {e}: output waits for the destination's first commit"
                    ),
                    None => format!(
                        "holding checkpoints for a live migration: {inflight} epoch(s) in flight to be committed first"
                    ),
                }
            });
        }
    }

    /// Says `Bye` and waits for the backup to confirm it (it has disarmed
    /// its replica), within the fencing timeout.
    async fn bye(
        &self,
        wr: &LinkWriter,
        acks: &mut mpsc::UnboundedReceiver<FromBackup>,
    ) -> Result<(), String> {
        let bound = self.cfg.fence_timeout;
        wr.send_one(Frame::new(FrameKind::Bye, 0, 0, vec![]), bound)
            .await
            .map_err(|e| format!("sending bye: {e}"))?;
        let deadline = Instant::now() + bound;
        loop {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some(Ok(f))) if f.kind == FrameKind::ByeAck => return Ok(()),
                Ok(Some(Ok(f))) if f.kind == FrameKind::Resync => {
                    return Err(format!("backup refused: {}", f.reason()))
                }
                // The replica digest, an ack in flight: not the answer.
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err("backup closed the connection".into()),
                Err(_) => return Err("the backup did not confirm bye".into()),
            }
        }
    }

    /// A connection only to end protection: hello, then `Bye`.
    pub(super) async fn say_bye(
        &mut self,
        conn: BoxStream,
        contact: &Arc<Contact>,
    ) -> Result<(), String> {
        let (rd, wr) = split(conn);
        let origin = Instant::now();
        let wr = LinkWriter::spawn(wr, self.cfg.heartbeat, origin, false);
        let mut opened = self.open(&wr, rd, contact, origin).await?;
        self.bye(&wr, &mut opened.acks).await
    }

    /// Whatever ends the session before the next step: a resync or error
    /// from the backup, a fence, a stop, or the guest gone.
    async fn interrupted(
        &mut self,
        wr: &LinkWriter,
        acks: &mut mpsc::UnboundedReceiver<FromBackup>,
        contact: &Contact,
    ) -> Option<Ended> {
        let write_bound = self.cfg.fence_timeout;
        if let Ok(msg) = acks.try_recv() {
            return Some(match msg {
                Ok(f) if f.kind == FrameKind::Resync => Ended::Lost(format!(
                    "backup resyncs from epoch {}: {}",
                    f.epoch,
                    f.reason()
                )),
                Ok(f) => Ended::Lost(format!("unexpected {f:?} from backup")),
                Err(e) => Ended::Lost(e),
            });
        }
        if contact.is_fenced() {
            return Some(Ended::Fenced);
        }
        if *self.stop.borrow() {
            let bye = self.bye(wr, acks).await;
            if let Err(why) = &bye {
                self.last_error = Some(why.clone());
            }
            return Some(Ended::Stopped {
                bye_confirmed: bye.is_ok(),
            });
        }
        if self.port.is_closed() {
            return Some(self.guest_gone(wr, write_bound).await);
        }
        None
    }

    /// Publishes what the backup has committed; returns the epochs in
    /// flight. `epoch` is the next one to send.
    fn refresh_status(&mut self, contact: &Contact, epoch: u64) -> u64 {
        let committed = *self.committed_tx.borrow();
        self.note_progress(committed);
        // Once the backup has committed an epoch without device state (this
        // session's running copy, or an epoch after a disk lost writes), and
        // no epoch with device state has been sent since, it holds nothing
        // it could resume (it disarmed on that commit): a fence would only
        // pause the guest for nothing. Not before that commit: until then
        // the backup may still be armed on its previous consistent epoch.
        let stale = self.stateless_since.is_some_and(|e| committed >= e);
        if stale && contact.disarm() {
            info!(vm = %self.port.name(), "the backup holds nothing resumable: fencing disarmed until the next epoch with device state");
        }
        let inflight = (epoch - 1).saturating_sub(committed);
        let consistent = !stale && self.first_consistent.is_some_and(|e| committed >= e);
        if consistent {
            self.last_error = None;
        }
        let syncing_disks = self.disks.iter().filter(|d| !d.is_synced()).count();
        let disk_failure = self.disk_failure.clone();
        self.set(|s| {
            s.last_committed = committed;
            s.lag_epochs = inflight;
            if let Some(e) = disk_failure {
                // Loud: the backup's replica stops at the last consistent
                // epoch until the disk is copied again.
                s.state = FtState::Degraded;
                s.detail = format!("{e}; no new consistent epoch until it is copied again");
            } else if consistent {
                s.state = FtState::Protected;
                s.detail.clear();
            } else if s.state == FtState::Degraded {
                // Keep the failure visible until protection is back.
            } else if syncing_disks > 0 {
                s.detail = format!("initial copy of {syncing_disks} disk(s)");
            }
        });
        inflight
    }

    /// Whether the guest turns out to be gone (its monitor closed, or its
    /// exit recorded) within a short, bounded wait.
    async fn guest_ends_soon(&self) -> bool {
        let deadline = Instant::now() + GUEST_EXIT_WAIT;
        loop {
            if self.port.is_closed() || self.port.exit().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The guest's QMP connection closed. Once the supervisor has recorded
    /// how QEMU ended (bounded wait), tell the backup: after a crash nothing
    /// runs the guest here, so it may take over at once instead of waiting
    /// out its takeover timeout; after a shutdown (the guest powered off, or
    /// a stop was asked for) it must not take over at all. Unrecorded: say
    /// nothing, and the backup decides by silence as for any failure.
    pub(super) async fn guest_gone(&self, wr: &LinkWriter, bound: Duration) -> Ended {
        let noticed = Instant::now();
        let deadline = noticed + GUEST_EXIT_WAIT;
        let exit = loop {
            if let Some(c) = self.port.exit() {
                break Some(c);
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let vm = self.port.name();
        match exit {
            Some(GuestExit::Crashed) => {
                let ms = noticed.elapsed().as_millis() as u64;
                let lost = Frame::new(FrameKind::GuestLost, 0, 0, ms.to_le_bytes().to_vec());
                match wr.send_one(lost, bound).await {
                    Ok(()) => warn!(%vm, "QEMU crashed: the backup is told to take over now"),
                    Err(e) => {
                        warn!(%vm, "QEMU crashed; telling the backup failed ({e}): it takes over by silence")
                    }
                }
            }
            Some(GuestExit::ShutDown) => {
                let bye = Frame::new(FrameKind::Bye, 0, 0, vec![]);
                let _ = wr.send_one(bye, bound).await;
                info!(%vm, "the guest shut down: the backup is told not to take over");
            }
            None => warn!(
                %vm,
                "QEMU's monitor closed but its exit is not recorded; the backup decides by silence"
            ),
        }
        Ended::GuestGone
    }
}
