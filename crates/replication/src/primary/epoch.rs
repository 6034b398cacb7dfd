//! One checkpoint: stop → collect dirty pages → device state and disk
//! writes → resume (the pause ends there) → ship. And the running copy that
//! opens every session.

use std::time::Duration;

use tracing::{info, warn};

use super::fence::Contact;
use super::guest::{CheckpointWindow, Guest, GuestError};
use super::io::{differing_pages, LinkWriter};
use super::Engine;
use crate::assembler::EpochBuilder;
use crate::clock::Instant;
use crate::ram::RamMap;
use crate::tracker::{DirtyTracker, RamView, ScanTracker};
use crate::wire::PAGE_SIZE;
use crate::DiskFailure;

pub(super) enum EpochError {
    /// The guest could not be stopped, saved or resumed.
    Guest(String),
    /// The epoch could not be sent.
    Link(String),
}

/// What one stop window captured.
struct Captured {
    dirty: Vec<u64>,
    pages: Vec<u8>,
    device_state: Vec<u8>,
    disk_writes: Vec<Vec<u8>>,
}

impl<G: Guest> Engine<G> {
    /// The running copy that opens a session: every page the tracker (just
    /// marked all-dirty) reports, less those the backup's digest shows it
    /// already has, copied while the guest runs.
    pub(super) async fn send_running_copy(
        &mut self,
        wr: &LinkWriter,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        epoch: u64,
        digest: Option<Vec<u64>>,
    ) -> Result<(), String> {
        let t = Instant::now();
        if let Some(log) = &self.cfg.external_log {
            // Everything is copied now; marks from before are moot.
            let _ = log.drain();
        }
        // Copying and hashing all of RAM takes a while: off the runtime, so
        // the link's writer keeps the heartbeats going meanwhile.
        let (dirty, pages, collected) = off_the_runtime(|| -> Result<_, String> {
            let (snapshot, dirty) = if tracker.tracks_moments() {
                // Every write after this collect is caught by the next one;
                // the copy, taken after it, holds every write before.
                let data = ram.data_pages();
                let dirty = tracker
                    .collect(RamView {
                        bytes: ram.live(),
                        data: data.as_ref(),
                    })
                    .map_err(|e| e.to_string())?;
                (ram.snapshot(), dirty)
            } else {
                let snapshot = ram.snapshot();
                let dirty = tracker
                    .collect(RamView::dense(&snapshot))
                    .map_err(|e| e.to_string())?;
                (snapshot, dirty)
            };
            let collected = dirty.len();
            let dirty = match &digest {
                Some(replica) => differing_pages(RamView::dense(&snapshot), dirty, replica),
                None => dirty,
            };
            let pages = copy_pages(&snapshot, &dirty);
            Ok((dirty, pages, collected))
        })?;
        let disk_writes: Vec<Vec<u8>> = self.disks.iter().map(|d| d.take_writes()).collect();
        let frames = EpochBuilder::build(
            self.port.ram_size(),
            epoch,
            &dirty,
            &pages,
            &[],
            &disk_writes,
        );
        // A full copy may take a while to ship; it is bounded by its size,
        // not by the fencing timeout (acks and heartbeats keep flowing).
        let bound = Duration::from_secs(600);
        self.sent.store(epoch, std::sync::atomic::Ordering::SeqCst);
        let bytes = wr.send(frames, bound).await.map_err(|e| e.to_string())?;
        info!(
            vm = %self.port.name(),
            pages = dirty.len(),
            of = collected,
            digest = digest.is_some(),
            bytes,
            ms = t.elapsed().as_millis() as u64,
            "initial copy sent"
        );
        self.set(|s| {
            s.detail = match &digest {
                Some(_) => format!(
                    "initial copy: {} of {collected} pages differed from the replica",
                    dirty.len()
                ),
                None => format!("initial copy: {} pages", dirty.len()),
            }
        });
        Ok(())
    }

    /// Checkpoint `epoch`: captured inside one stop window, then shipped
    /// while the guest runs.
    pub(super) async fn epoch(
        &mut self,
        wr: &LinkWriter,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        epoch: u64,
        write_bound: Duration,
        contact: &Contact,
    ) -> Result<(), EpochError> {
        let started = Instant::now();
        let captured = self
            .capture(ram, tracker, epoch, started)
            .await
            .map_err(|e| EpochError::Guest(e.to_string()))?;
        let pause = started.elapsed();
        let Captured {
            dirty,
            pages,
            device_state,
            disk_writes,
        } = captured;
        if device_state.is_empty() {
            // Once the backup commits this epoch its replica's RAM is ahead
            // of its device state: nothing there is resumable until an
            // epoch with device state follows.
            self.stateless_since.get_or_insert(epoch);
        } else {
            if self.first_consistent.is_none() || self.stateless_since.is_some() {
                self.first_consistent = Some(epoch);
            }
            self.stateless_since = None;
            // Armed before the epoch is sent: the backup can only arm
            // itself with an epoch the primary sent.
            if contact.arm() {
                info!(vm = %self.port.name(), epoch, "first consistent epoch: fencing armed");
            }
        }
        self.pauses.record(pause);
        let frames = EpochBuilder::build(
            self.port.ram_size(),
            epoch,
            &dirty,
            &pages,
            &device_state,
            &disk_writes,
        );
        self.sent.store(epoch, std::sync::atomic::Ordering::SeqCst);
        let bytes = wr
            .send(frames, write_bound)
            .await
            .map_err(|e| EpochError::Link(e.to_string()))?;
        let (p50, p99) = self.pauses.p50_p99();
        let rate = {
            let (t0, n0) = *self.epochs_started.get_or_insert((Instant::now(), epoch));
            let dt = t0.elapsed().as_secs_f64();
            if dt > 0.5 {
                (epoch - n0) as f64 / dt
            } else {
                0.0
            }
        };
        self.set(|s| {
            s.last_sent = epoch;
            s.pause_p50_ms = p50;
            s.pause_p99_ms = p99;
            s.bytes_per_epoch = bytes;
            s.dirty_pages_last = dirty.len() as u64;
            s.epochs_per_s = rate;
        });
        Ok(())
    }

    /// The stop window of one checkpoint. The guest is resumed before this
    /// returns, whatever happened inside.
    async fn capture(
        &mut self,
        ram: &RamMap,
        tracker: &mut Box<dyn DirtyTracker>,
        epoch: u64,
        started: Instant,
    ) -> Result<Captured, GuestError> {
        // The window borrows its own handle, so the engine stays free to
        // update its status while the guest is stopped.
        let port = self.port.clone();
        let window = port.stop_for_checkpoint().await?;
        // From here on the guest's activity belongs to the next epoch.
        self.set(|s| s.open_epoch = epoch + 1);
        if let Some(o) = &self.cfg.observer {
            o.epoch_opened(epoch + 1);
        }
        let stopped_at = Instant::now();
        // Until every disk's initial copy is done, an epoch is RAM only:
        // resuming it would find an incomplete disk. Likewise while a disk's
        // log has lost writes (its mirror failed): that is checked now, with
        // the guest stopped, so no write acknowledged before the stop can be
        // missing from an epoch that carries device state.
        let failed = self.check_disks().await;
        let with_state = failed.is_none() && self.disks.iter().all(|d| d.is_synced());
        // QEMU saving its devices beside the scan could, in principle,
        // write guest RAM. A content scan catches that (it copies after
        // hashing, and re-reports next epoch a page whose hash it took
        // before the write); a moment tracker (soft-dirty) could lose a
        // write landing between reading the bits and clearing them, so it
        // collects first.
        let ds_timeout = self.cfg.device_state_timeout;
        let overlap = !tracker.tracks_moments();
        let mut device_state =
            (with_state && overlap).then(|| window.spawn_device_state(ds_timeout));
        let collect_started = Instant::now();
        let dirty = self.collect_dirty(ram, tracker);
        let collect_us = collect_started.elapsed().as_micros() as u64;
        if with_state && device_state.is_none() {
            device_state = Some(window.spawn_device_state(ds_timeout));
        }
        let pages = copy_pages(ram.live(), &dirty);
        let scanned_at = Instant::now();
        let saved = match device_state {
            Some(save) => save.await,
            None => Ok(Vec::new()),
        };
        let disk_writes: Vec<Vec<u8>> = self.disks.iter().map(|d| d.take_writes()).collect();
        tracing::debug!(
            epoch,
            stop_us = (stopped_at - started).as_micros() as u64,
            collect_us,
            scan_us = (scanned_at - stopped_at).as_micros() as u64,
            device_state_wait_us = scanned_at.elapsed().as_micros() as u64,
            "epoch captured"
        );
        // Resumed even when the save failed: the guest must not stay
        // stopped because a checkpoint did.
        let resumed = window.resume().await;
        let device_state = saved?;
        resumed?;
        Ok(Captured {
            dirty,
            pages,
            device_state,
            disk_writes,
        })
    }

    /// Every disk's check; the first failure, which is also published (the
    /// protection is degraded until the disk is copied again).
    async fn check_disks(&mut self) -> Option<DiskFailure> {
        let mut failed = None;
        for d in &self.disks {
            if let Err(e) = d.check().await {
                failed.get_or_insert(e);
            }
        }
        match &failed {
            Some(e) => {
                if self.disk_failure.as_ref() != Some(e) {
                    warn!(vm = %self.port.name(), "{e}: epochs carry no device state until the disk is copied again");
                }
                self.disk_failure = Some(e.clone());
            }
            None => self.disk_failure = None,
        }
        failed
    }

    /// The pages written since the last checkpoint (the guest is stopped).
    fn collect_dirty(&mut self, ram: &RamMap, tracker: &mut Box<dyn DirtyTracker>) -> Vec<u64> {
        let name = self.port.name().to_string();
        let live = ram.live();
        if let Some(log) = &self.cfg.external_log {
            match log.drain() {
                Ok(pages) => tracker.note_external_writes(&mut pages.into_iter()),
                Err(_) => {
                    warn!(vm = %name, "a switch write could not be placed in the RAM file: copying all of RAM");
                    tracker.mark_all_dirty();
                }
            }
        }
        let collect = || {
            let data = tracker
                .wants_data_pages()
                .then(|| ram.data_pages())
                .flatten();
            let view = RamView {
                bytes: live,
                data: data.as_ref(),
            };
            tracker.collect(view).map_err(|e| (e, data))
        };
        match off_the_runtime(collect) {
            Ok(d) => d,
            Err((e, data)) => {
                // The tracker can no longer vouch for anything: copy all of
                // RAM in this pause and scan from now on.
                warn!(vm = %name, "dirty tracking failed, falling back to scan: {e}");
                let failed = tracker.name();
                let data = data.or_else(|| ram.data_pages());
                let mut scan = ScanTracker::new(live.len() / PAGE_SIZE, 0);
                let d = scan.scan(RamView {
                    bytes: live,
                    data: data.as_ref(),
                });
                *tracker = Box::new(scan);
                self.set(|s| s.tracker = format!("scan ({failed} failed: {e})"));
                d
            }
        }
    }
}

pub(super) fn copy_pages(ram: &[u8], dirty: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dirty.len() * PAGE_SIZE);
    for &p in dirty {
        let off = p as usize * PAGE_SIZE;
        out.extend_from_slice(&ram[off..off + PAGE_SIZE]);
    }
    out
}

/// When the epoch after one due at `due` (and starting at `now`) is due.
pub(super) fn next_schedule(due: Instant, now: Instant, epoch: Duration) -> Instant {
    if now.saturating_duration_since(due) >= epoch {
        now + epoch
    } else {
        due + epoch
    }
}

/// Runs CPU-bound work (a RAM scan) from async code without starving the
/// runtime: on a multi-threaded runtime the worker's other tasks, among
/// them the device-state save started just before (which a fresh spawn
/// leaves in this worker's unstealable LIFO slot), move to another thread
/// meanwhile. Elsewhere (a current-thread runtime in a test) it just runs.
fn off_the_runtime<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
