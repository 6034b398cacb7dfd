//! The per-VM output-commit gate.
//!
//! Every frame a protected VM sends is stamped with the epoch that is open
//! when the switch sees it: the next checkpoint to be taken. A `hold` frame
//! waits in a bounded FIFO until that epoch (or a later one) commits on the
//! backup; a `pass` frame leaves at once. TCP segments that pass have their
//! acknowledgement clamped to what the VM had acknowledged as of the last
//! committed epoch, so a client never sees an ACK for bytes a failover
//! would lose. SYN, FIN and RST are always held: a connection's existence
//! and end are state.
//!
//! Why stamping at the switch is safe: the replication engine moves the
//! stamp forward while the guest is stopped for a checkpoint. A frame the
//! guest sent after that checkpoint can only reach the switch after the
//! guest resumed, so it carries the new stamp; a frame the guest sent before
//! it may be seen late and stamped one epoch too new, which only holds it
//! longer.

use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::packet::{self, IpAddrs, Origin, PacketMeta, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::rules::{Class, Classifier};
use crate::tcp;

/// A switch port as the switch numbers it: where a frame came in and where
/// a held frame goes back out. The switch's `port::PortId` is this type, so
/// port numbers cross between the switch and the gate unconverted.
pub type PortId = u32;

/// How a protected VM's output is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateMode {
    /// The product: the rule set decides, TCP acknowledgements are clamped.
    #[default]
    Classified,
    /// Every frame waits for its epoch: the Remus baseline.
    AllHold,
    /// Nothing is held. Output a failover can contradict reaches clients;
    /// for comparison only.
    Off,
}

impl std::fmt::Display for GateMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GateMode::Classified => "classified",
            GateMode::AllHold => "all-hold",
            GateMode::Off => "off",
        })
    }
}

impl std::str::FromStr for GateMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "classified" => Ok(GateMode::Classified),
            "all-hold" => Ok(GateMode::AllHold),
            "off" => Ok(GateMode::Off),
            _ => Err(format!(
                "unknown output mode `{s}` (expected classified, all-hold or off)"
            )),
        }
    }
}

/// What happens to a `hold` frame when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// The new frame is dropped and counted. Nothing held is ever
    /// acknowledged to anyone, so this loses no acknowledged data: the
    /// guest's TCP retransmits, as after any loss on a wire.
    #[default]
    DropNewest,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GateConfig {
    pub mode: GateMode,
    /// Bounds on the held queue.
    pub max_frames: usize,
    pub max_bytes: usize,
    pub overflow: OverflowPolicy,
    /// TEST ONLY: let `pass` TCP segments out with the VM's real
    /// acknowledgement. Exists so the drill can prove its checker fails
    /// when clamping is wrong; only built with the `fault-injection`
    /// feature, so a shipped gate cannot be told to skip clamping.
    #[cfg(feature = "fault-injection")]
    #[serde(default)]
    pub unsafe_skip_clamp: bool,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            mode: GateMode::Classified,
            max_frames: 8192,
            max_bytes: 16 << 20,
            overflow: OverflowPolicy::DropNewest,
            #[cfg(feature = "fault-injection")]
            unsafe_skip_clamp: false,
        }
    }
}

/// Refusal of a test-only hook: this build lacks the `fault-injection`
/// feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("built without the fault-injection feature")]
pub struct NoFaultInjection;

impl GateConfig {
    /// TEST ONLY: let `pass` TCP segments out unclamped (see
    /// `unsafe_skip_clamp`). Refused unless this crate was built with the
    /// `fault-injection` feature, so a caller cannot believe it asked for
    /// something a shipped build ignores.
    pub fn skip_clamp(&mut self) -> Result<(), NoFaultInjection> {
        #[cfg(feature = "fault-injection")]
        {
            self.unsafe_skip_clamp = true;
            Ok(())
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            Err(NoFaultInjection)
        }
    }

    /// Whether `pass` TCP segments leave unclamped (never, without the
    /// `fault-injection` feature).
    pub fn skips_clamp(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.unsafe_skip_clamp
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }
}

/// The gate's answer for one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateDecision {
    /// Send the frame as it is, now.
    Pass,
    /// Send this rewritten frame (clamped acknowledgement) now.
    PassRewritten(Vec<u8>),
    /// The gate keeps a copy; it comes back from [`Gate::commit`].
    Hold,
    /// The queue is full; the frame is gone.
    Drop,
}

/// Hold latency histogram: bucket `i` counts holds shorter than
/// `64 µs << i`; the last bucket is everything longer.
pub const LATENCY_BUCKETS: usize = 18;

/// One protected VM's output-commit counters: what the gate counted, and
/// the rule table it classifies with. This is the type the API reports
/// (`tandem_api::OutputCounters` is this type), so the field order is the
/// order of the JSON object and must not change.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GateCounters {
    pub mode: GateMode,
    /// The profile the rule table was last loaded from, if any. The gate
    /// sees only a [`Classifier`]: its owner, which keeps the table, fills
    /// this and `rules` in.
    pub profile: Option<String>,
    /// How many rules the table has (filled in by the table's owner).
    pub rules: usize,
    pub open_epoch: u64,
    pub committed_epoch: u64,
    pub passed_frames: u64,
    pub passed_bytes: u64,
    /// Pass segments whose acknowledgement was clamped.
    pub clamped_frames: u64,
    /// Bare ACKs queued to carry a clamped segment's real acknowledgement
    /// (sent at commit).
    pub bare_acks: u64,
    pub held_frames: u64,
    pub held_bytes: u64,
    pub released_frames: u64,
    pub released_bytes: u64,
    /// Held frames of uncommitted epochs thrown away (failover, fencing).
    pub discarded_frames: u64,
    pub discarded_bytes: u64,
    /// `hold` frames refused because the queue was full.
    pub overflow_drops: u64,
    pub queued_frames: u64,
    pub queued_bytes: u64,
    pub high_water_frames: u64,
    pub high_water_bytes: u64,
    pub tracked_flows: u64,
    /// Histogram of hold time: bucket i counts holds under 64 µs << i
    /// ([`LATENCY_BUCKETS`] buckets, the last one open-ended).
    pub hold_latency_us: Vec<u64>,
    pub hold_p50_us: u64,
    pub hold_p99_us: u64,
}

/// The latency a hold spent in the queue, estimated from the histogram as
/// the upper bound of the bucket holding quantile `q`.
fn quantile(buckets: &[u64], q: f64) -> u64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= want {
            return 64u64 << i;
        }
    }
    64u64 << (buckets.len() - 1)
}

/// A TCP connection as the VM sends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    src: [u8; 16],
    dst: [u8; 16],
    v6: bool,
    src_port: u16,
    dst_port: u16,
}

impl FlowKey {
    fn of(meta: &PacketMeta) -> Option<FlowKey> {
        let ip = meta.ip?;
        let l4 = meta.l4?;
        let (src, dst, v6) = match ip.addrs {
            IpAddrs::V4 { src, dst } => {
                let mut s = [0u8; 16];
                let mut d = [0u8; 16];
                s[..4].copy_from_slice(&src);
                d[..4].copy_from_slice(&dst);
                (s, d, false)
            }
            IpAddrs::V6 { src, dst } => (src, dst, true),
        };
        Some(FlowKey {
            src,
            dst,
            v6,
            src_port: l4.src_port,
            dst_port: l4.dst_port,
        })
    }
}

/// What the VM acknowledged on one flow: committed, and per open epoch.
#[derive(Debug, Default)]
struct FlowAcks {
    committed: Option<(u32, u16)>,
    /// (epoch stamp, highest ack in it, window with that ack), oldest first.
    pending: VecDeque<(u64, u32, u16)>,
    /// The highest acknowledgement already waiting in the hold queue (in a
    /// held segment or a bare ACK): the real ACK reaches the wire at commit.
    queued_ack: Option<u32>,
    /// The newest TCP timestamp (TSval) the peer has been sent on this
    /// flow by a segment that passed: held segments released later carry
    /// at least this, or the peer drops them as old (PAWS).
    max_tsval: Option<u32>,
    last_seen: Option<Instant>,
}

/// More open epochs than this on one flow means the backup is far behind;
/// older entries are merged into newer ones, which only delays trust.
const MAX_PENDING_PER_FLOW: usize = 64;
const MAX_FLOWS: usize = 16_384;

impl FlowAcks {
    fn record(&mut self, epoch: u64, ack: u32, window: u16, now: Instant) {
        self.last_seen = Some(now);
        if let Some(last) = self.pending.back_mut() {
            if last.0 >= epoch {
                if tcp::seq_le(last.1, ack) {
                    last.1 = ack;
                    last.2 = window;
                }
                return;
            }
        }
        if self.pending.len() >= MAX_PENDING_PER_FLOW {
            // Merge the oldest into the next: later stamp, later ack.
            if let Some(old) = self.pending.pop_front() {
                if let Some(next) = self.pending.front_mut() {
                    if tcp::seq_lt(next.1, old.1) {
                        next.1 = old.1;
                        next.2 = old.2;
                    }
                }
            }
        }
        self.pending.push_back((epoch, ack, window));
    }

    fn commit(&mut self, epoch: u64) {
        while let Some(&(e, ack, win)) = self.pending.front() {
            if e > epoch {
                break;
            }
            self.pending.pop_front();
            self.committed = match self.committed {
                Some((c, _)) if tcp::seq_lt(ack, c) => self.committed,
                _ => Some((ack, win)),
            };
        }
    }
}

struct Held {
    port: PortId,
    epoch: u64,
    at: Instant,
    frame: Vec<u8>,
    /// The VM's TCP connection the frame belongs to, if any.
    flow: Option<FlowKey>,
}

#[derive(Default)]
struct Inner {
    committed: u64,
    queue: VecDeque<Held>,
    queued_bytes: usize,
    flows: HashMap<FlowKey, FlowAcks>,
    counters: GateCounters,
    latency: [u64; LATENCY_BUCKETS],
    /// Protection degraded on purpose (the backup holds nothing it could
    /// resume): frames pass unheld until the next session.
    unprotected: bool,
}

/// One protected VM's gate, shared by all its NIC ports. `check` runs on
/// the switch's port threads; the epoch calls come from the replication
/// engine.
pub struct Gate {
    config: RwLock<GateConfig>,
    classifier: RwLock<Arc<dyn Classifier>>,
    vm_macs: Vec<[u8; 6]>,
    open_epoch: AtomicU64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("config", &self.config())
            .field("open_epoch", &self.open_epoch.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate for a VM whose NICs have `vm_macs`. Until the engine opens an
    /// epoch, frames are stamped 1 and nothing is committed: all `hold`
    /// output waits for the first commit.
    pub fn new(config: GateConfig, classifier: Arc<dyn Classifier>, vm_macs: Vec<[u8; 6]>) -> Gate {
        Gate {
            config: RwLock::new(config),
            classifier: RwLock::new(classifier),
            vm_macs,
            open_epoch: AtomicU64::new(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    pub fn config(&self) -> GateConfig {
        self.config.read().clone()
    }

    /// Takes effect for the next frame.
    pub fn set_config(&self, config: GateConfig) {
        *self.config.write() = config;
    }

    /// Takes effect for the next frame.
    pub fn set_classifier(&self, classifier: Arc<dyn Classifier>) {
        *self.classifier.write() = classifier;
    }

    fn origin(&self, meta: &PacketMeta) -> Origin {
        if self.vm_macs.contains(&meta.src_mac) {
            Origin::Vm
        } else {
            Origin::Forwarded
        }
    }

    /// Decides one frame the VM sent on `port`.
    pub fn check(&self, port: PortId, frame: &[u8]) -> GateDecision {
        let cfg = self.config();
        let epoch = self.open_epoch.load(Ordering::SeqCst);
        let now = Instant::now();
        let Some(meta) = packet::parse(frame) else {
            return self.hold(&cfg, port, epoch, now, frame, None);
        };
        if cfg.mode == GateMode::Off || self.lock().unprotected {
            self.count_pass(frame.len(), false);
            return GateDecision::Pass;
        }
        let origin = self.origin(&meta);
        let tcp = meta.l4.and_then(|l| l.tcp);
        // The VM's acknowledgements are tracked whatever happens to the
        // frame: once its epoch commits, the backup's TCP state includes it.
        let flow = match (origin, tcp) {
            (Origin::Vm, Some(t)) if t.flags & TCP_ACK != 0 => FlowKey::of(&meta),
            _ => None,
        };
        if let (Some(key), Some(t)) = (flow, tcp) {
            let mut g = self.lock();
            if !g.flows.contains_key(&key) && g.flows.len() >= MAX_FLOWS {
                // Forget flows with nothing pending; an untracked flow's
                // pass segments are held, which is only slower.
                g.flows.retain(|_, f| !f.pending.is_empty());
            }
            if g.flows.len() < MAX_FLOWS || g.flows.contains_key(&key) {
                g.flows
                    .entry(key)
                    .or_default()
                    .record(epoch, t.ack, t.window, now);
            }
        }
        let mut class = match cfg.mode {
            GateMode::AllHold => Class::Hold,
            _ => self.classifier.read().classify(frame, &meta, origin, None),
        };
        if let Some(t) = tcp {
            if t.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 && origin == Origin::Vm {
                class = Class::Hold;
            }
        }
        if class == Class::Hold {
            let d = self.hold(&cfg, port, epoch, now, frame, flow);
            if let (GateDecision::Hold, Some(key), Some(t)) = (&d, flow, tcp) {
                self.note_queued_ack(key, t.ack);
            }
            return d;
        }
        let (Some(key), Some(t)) = (flow, tcp) else {
            self.count_pass(frame.len(), false);
            return GateDecision::Pass;
        };
        #[cfg(feature = "fault-injection")]
        if cfg.unsafe_skip_clamp {
            self.note_passed(key, frame, &meta);
            self.count_pass(frame.len(), false);
            return GateDecision::Pass;
        }
        let committed = self.lock().flows.get(&key).and_then(|f| f.committed);
        match committed {
            // Nothing acknowledged on this flow is committed yet.
            None => self.hold(&cfg, port, epoch, now, frame, flow),
            Some((ack, _)) if tcp::seq_le(t.ack, ack) => {
                self.note_passed(key, frame, &meta);
                self.count_pass(frame.len(), false);
                GateDecision::Pass
            }
            // A bare ACK clamped back would say nothing new; its real value
            // goes out with the commit.
            Some(_) if meta.payload_len == 0 => self.hold(&cfg, port, epoch, now, frame, flow),
            Some((ack, window)) => {
                let mut out = frame.to_vec();
                if !tcp::rewrite_ack(&mut out, &meta, ack, window) {
                    return self.hold(&cfg, port, epoch, now, frame, flow);
                }
                // The real acknowledgement follows at commit, once.
                let queued = self
                    .lock()
                    .flows
                    .get(&key)
                    .and_then(|f| f.queued_ack)
                    .is_some_and(|q| tcp::seq_le(t.ack, q));
                if !queued {
                    if let Some(bare) = tcp::bare_ack(frame, &meta) {
                        if self.hold(&cfg, port, epoch, now, &bare, flow) == GateDecision::Hold {
                            self.note_queued_ack(key, t.ack);
                            self.lock().counters.bare_acks += 1;
                        }
                    }
                }
                self.note_passed(key, frame, &meta);
                self.count_pass(frame.len(), true);
                GateDecision::PassRewritten(out)
            }
        }
    }

    fn count_pass(&self, len: usize, clamped: bool) {
        let mut g = self.lock();
        g.counters.passed_frames += 1;
        g.counters.passed_bytes += len as u64;
        if clamped {
            g.counters.clamped_frames += 1;
        }
    }

    /// A segment of `key` passed carrying `frame`'s timestamp.
    fn note_passed(&self, key: FlowKey, frame: &[u8], meta: &PacketMeta) {
        let Some((_, ts)) = tcp::tsval(frame, meta) else {
            return;
        };
        if let Some(f) = self.lock().flows.get_mut(&key) {
            f.max_tsval = Some(match f.max_tsval {
                Some(m) => tcp::seq_max(m, ts),
                None => ts,
            });
        }
    }

    fn note_queued_ack(&self, key: FlowKey, ack: u32) {
        if let Some(f) = self.lock().flows.get_mut(&key) {
            f.queued_ack = Some(match f.queued_ack {
                Some(q) => tcp::seq_max(q, ack),
                None => ack,
            });
        }
    }

    fn hold(
        &self,
        cfg: &GateConfig,
        port: PortId,
        epoch: u64,
        now: Instant,
        frame: &[u8],
        flow: Option<FlowKey>,
    ) -> GateDecision {
        let mut g = self.lock();
        if g.unprotected {
            // Raced with `unprotected`: nothing waits any more.
            drop(g);
            self.count_pass(frame.len(), false);
            return GateDecision::Pass;
        }
        if g.queue.len() >= cfg.max_frames || g.queued_bytes + frame.len() > cfg.max_bytes {
            match cfg.overflow {
                OverflowPolicy::DropNewest => {
                    g.counters.overflow_drops += 1;
                    return GateDecision::Drop;
                }
            }
        }
        g.queue.push_back(Held {
            port,
            epoch,
            at: now,
            frame: frame.to_vec(),
            flow,
        });
        g.queued_bytes += frame.len();
        g.counters.held_frames += 1;
        g.counters.held_bytes += frame.len() as u64;
        let (n, b) = (g.queue.len() as u64, g.queued_bytes as u64);
        g.counters.high_water_frames = g.counters.high_water_frames.max(n);
        g.counters.high_water_bytes = g.counters.high_water_bytes.max(b);
        GateDecision::Hold
    }

    /// The engine stopped the guest to take checkpoint `epoch - 1`: what
    /// the guest sends from now on is covered only by checkpoint `epoch`.
    pub fn epoch_opened(&self, epoch: u64) {
        self.open_epoch.fetch_max(epoch, Ordering::SeqCst);
    }

    /// A new replication session: the backup holds `base`, and the first
    /// checkpoint that can cover anything held now is `first`. Epoch
    /// numbers may restart lower (a backup that lost its replica), so what
    /// is held is re-stamped to `first` and flow knowledge newer than
    /// `base` is forgotten.
    pub fn session_started(&self, base: u64, first: u64) {
        let mut g = self.lock();
        g.unprotected = false;
        for h in g.queue.iter_mut() {
            h.epoch = first;
        }
        let forget = base < g.committed;
        for f in g.flows.values_mut() {
            for p in f.pending.iter_mut() {
                p.0 = first;
            }
            if forget {
                f.committed = None;
            }
        }
        g.committed = base;
        self.open_epoch.store(first, Ordering::SeqCst);
    }

    /// Epoch `epoch` is durable on the backup: returns the held frames it
    /// covers, oldest first, as (port, frame) for the switch to send.
    pub fn commit(&self, epoch: u64) -> Vec<(PortId, Vec<u8>)> {
        let mut g = self.lock();
        if epoch <= g.committed {
            return Vec::new();
        }
        g.committed = epoch;
        for f in g.flows.values_mut() {
            f.commit(epoch);
        }
        let now = Instant::now();
        let mut out = Vec::new();
        while g.queue.front().is_some_and(|h| h.epoch <= epoch) {
            let Some(mut h) = g.queue.pop_front() else {
                break;
            };
            g.queued_bytes -= h.frame.len();
            let newest = h
                .flow
                .and_then(|k| g.flows.get(&k))
                .and_then(|f| f.max_tsval);
            if let (Some(newest), Some(meta)) = (newest, packet::parse(&h.frame)) {
                if tcp::tsval(&h.frame, &meta).is_some_and(|(_, ts)| tcp::seq_lt(ts, newest)) {
                    tcp::set_tsval(&mut h.frame, &meta, newest);
                }
            }
            g.counters.released_frames += 1;
            g.counters.released_bytes += h.frame.len() as u64;
            let us = now.duration_since(h.at).as_micros() as u64;
            let bucket = (0..LATENCY_BUCKETS - 1)
                .find(|&i| us < (64u64 << i))
                .unwrap_or(LATENCY_BUCKETS - 1);
            g.latency[bucket] += 1;
            out.push((h.port, h.frame));
        }
        out
    }

    /// The VM will not continue from here (its QEMU died, or it fenced
    /// itself): held frames belong to epochs that never committed and must
    /// never be sent.
    pub fn discard_uncommitted(&self) -> usize {
        let mut g = self.lock();
        let n = g.queue.len();
        let bytes: usize = g.queued_bytes;
        g.queue.clear();
        g.queued_bytes = 0;
        g.counters.discarded_frames += n as u64;
        g.counters.discarded_bytes += bytes as u64;
        n
    }

    /// Protection ended on purpose: the VM keeps running here, unprotected,
    /// so what it said is simply sent.
    pub fn release_all(&self) -> Vec<(PortId, Vec<u8>)> {
        let mut g = self.lock();
        g.queued_bytes = 0;
        let out: Vec<_> = g.queue.drain(..).map(|h| (h.port, h.frame)).collect();
        g.counters.released_frames += out.len() as u64;
        g.counters.released_bytes += out.iter().map(|(_, f)| f.len() as u64).sum::<u64>();
        out
    }

    /// Protection degraded on purpose: the backup confirmed it holds
    /// nothing it could resume, so no failover can contradict what the VM
    /// says. Returns every held frame to send, and lets frames pass unheld
    /// until the next [`Gate::session_started`].
    pub fn unprotected(&self) -> Vec<(PortId, Vec<u8>)> {
        let mut g = self.lock();
        g.unprotected = true;
        drop(g);
        self.release_all()
    }

    pub fn counters(&self) -> GateCounters {
        let g = self.lock();
        let mut c = g.counters.clone();
        c.mode = self.config().mode;
        c.open_epoch = self.open_epoch.load(Ordering::SeqCst);
        c.committed_epoch = g.committed;
        c.queued_frames = g.queue.len() as u64;
        c.queued_bytes = g.queued_bytes as u64;
        c.tracked_flows = g.flows.len() as u64;
        c.hold_latency_us = g.latency.to_vec();
        c.hold_p50_us = quantile(&g.latency, 0.5);
        c.hold_p99_us = quantile(&g.latency, 0.99);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{TCP_ACK, TCP_PSH};
    use crate::rules::{Profile, RuleSet};

    const VM: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    fn gate(mode: GateMode, rules: RuleSet) -> Gate {
        let cfg = GateConfig {
            mode,
            max_frames: 16,
            max_bytes: 1 << 20,
            ..Default::default()
        };
        Gate::new(cfg, Arc::new(rules), vec![VM])
    }

    fn from_vm(mut f: Vec<u8>) -> Vec<u8> {
        f[6..12].copy_from_slice(&VM);
        f
    }

    fn seg(ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        from_vm(tcp::build_tcp_frame(
            false, 7070, 40000, 1000, ack, flags, 500, payload,
        ))
    }

    #[test]
    fn conservative_holds_vm_output_until_its_epoch_commits() {
        let g = gate(GateMode::Classified, Profile::Conservative.rules());
        let f = seg(1, TCP_ACK | TCP_PSH, b"OK 1\n");
        assert_eq!(g.check(3, &f), GateDecision::Hold);
        // Checkpoint 1 is being taken; output after it is epoch 2.
        g.epoch_opened(2);
        let f2 = seg(1, TCP_ACK | TCP_PSH, b"OK 2\n");
        assert_eq!(g.check(3, &f2), GateDecision::Hold);
        assert_eq!(g.commit(1), vec![(3, f.clone())]);
        assert!(g.commit(1).is_empty(), "a commit is applied once");
        assert_eq!(g.commit(2), vec![(3, f2)]);
        let c = g.counters();
        assert_eq!(
            (c.held_frames, c.released_frames, c.queued_frames),
            (2, 2, 0)
        );
    }

    #[test]
    fn a_degraded_protection_releases_what_is_held_and_holds_again_in_the_next_session() {
        let g = gate(GateMode::Classified, Profile::Conservative.rules());
        let f = seg(1, TCP_ACK | TCP_PSH, b"OK 1\n");
        assert_eq!(g.check(3, &f), GateDecision::Hold);
        assert_eq!(g.unprotected(), vec![(3, f.clone())]);
        let f2 = seg(1, TCP_ACK | TCP_PSH, b"OK 2\n");
        assert_eq!(
            g.check(3, &f2),
            GateDecision::Pass,
            "nothing waits while unprotected"
        );
        g.session_started(0, 1);
        assert_eq!(g.check(3, &f2), GateDecision::Hold, "protection is back");
        assert_eq!(g.commit(1), vec![(3, f2)]);
    }

    #[test]
    fn forwarded_frames_and_arp_pass() {
        let g = gate(GateMode::Classified, Profile::Conservative.rules());
        let other = tcp::build_tcp_frame(false, 1, 2, 3, 4, TCP_ACK, 5, b"x");
        assert_eq!(g.check(0, &other), GateDecision::Pass);
    }

    #[test]
    fn all_hold_holds_what_classified_passes_and_off_passes_everything() {
        let udp = from_vm(tcp::build_udp_frame(5004, 5004, b"media"));
        let rules = RuleSet::from_texts(&["pass udp sport 5004"]).unwrap();
        assert_eq!(
            gate(GateMode::Classified, rules.clone()).check(0, &udp),
            GateDecision::Pass
        );
        assert_eq!(
            gate(GateMode::AllHold, rules.clone()).check(0, &udp),
            GateDecision::Hold
        );
        let syn = seg(0, TCP_SYN, b"");
        assert_eq!(
            gate(GateMode::Off, rules).check(0, &syn),
            GateDecision::Pass
        );
    }

    #[test]
    fn syn_fin_rst_are_held_even_when_a_rule_passes_tcp() {
        let g = gate(GateMode::Classified, Profile::BulkTcp.rules());
        for flags in [TCP_SYN, TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST] {
            assert_eq!(
                g.check(0, &seg(9, flags, b"")),
                GateDecision::Hold,
                "{flags:#x}"
            );
        }
    }

    #[test]
    fn pass_segments_carry_only_committed_acknowledgements() {
        let g = gate(GateMode::Classified, Profile::BulkTcp.rules());
        // Nothing committed on this flow: even a pass segment waits.
        assert_eq!(g.check(0, &seg(100, TCP_ACK, b"data")), GateDecision::Hold);
        g.epoch_opened(2);
        assert_eq!(g.commit(1).len(), 1);
        // Ack 100 is committed now; the VM acknowledges 250 in epoch 2.
        let f = seg(250, TCP_ACK | TCP_PSH, b"more");
        let GateDecision::PassRewritten(out) = g.check(0, &f) else {
            panic!("expected a clamped pass");
        };
        let meta = packet::parse(&out).unwrap();
        let t = meta.l4.unwrap().tcp.unwrap();
        assert_eq!((t.ack, t.window), (100, 500));
        assert!(tcp::tcp_checksum_valid(&out, &meta));
        // A bare ACK that would need clamping is held instead.
        assert_eq!(g.check(0, &seg(260, TCP_ACK, b"")), GateDecision::Hold);
        // An ACK no newer than the committed one passes untouched.
        assert_eq!(g.check(0, &seg(100, TCP_ACK, b"x")), GateDecision::Pass);
        g.epoch_opened(3);
        g.commit(2);
        let f = seg(260, TCP_ACK, b"y");
        assert_eq!(
            g.check(0, &f),
            GateDecision::Pass,
            "260 committed with epoch 2"
        );
        assert_eq!(g.counters().clamped_frames, 1);
    }

    #[test]
    fn a_held_segment_released_after_newer_ones_passed_carries_their_timestamp() {
        let g = gate(GateMode::Classified, Profile::BulkTcp.rules());
        let ts = |f: Vec<u8>, v: u32| tcp::with_timestamp_option(&f, v).unwrap();
        // Something acknowledged on the flow is committed.
        g.check(0, &ts(seg(100, TCP_ACK, b"a"), 10));
        g.epoch_opened(2);
        g.commit(1);
        // A FIN (always held) at TSval 20, then data passes at TSval 30.
        let fin = ts(seg(100, TCP_FIN | TCP_ACK, b""), 20);
        assert_eq!(g.check(0, &fin), GateDecision::Hold);
        assert_eq!(
            g.check(0, &ts(seg(100, TCP_ACK, b"b"), 30)),
            GateDecision::Pass
        );
        g.epoch_opened(3);
        let out = g.commit(2);
        assert_eq!(out.len(), 1);
        let m = packet::parse(&out[0].1).unwrap();
        assert_eq!(tcp::tsval(&out[0].1, &m).map(|t| t.1), Some(30));
        assert!(tcp::tcp_checksum_valid(&out[0].1, &m));
    }

    #[test]
    fn a_clamped_acknowledgement_goes_out_bare_at_commit() {
        let g = gate(GateMode::Classified, Profile::BulkTcp.rules());
        g.check(0, &seg(100, TCP_ACK, b"first"));
        g.epoch_opened(2);
        assert_eq!(g.commit(1).len(), 1);
        let f = seg(250, TCP_ACK | TCP_PSH, b"more");
        assert!(matches!(g.check(0, &f), GateDecision::PassRewritten(_)));
        // A second clamped segment with the same ack queues nothing new.
        assert!(matches!(
            g.check(0, &seg(250, TCP_ACK, b"again")),
            GateDecision::PassRewritten(_)
        ));
        g.epoch_opened(3);
        let out = g.commit(2);
        assert_eq!(out.len(), 1, "one bare ACK for ack 250");
        let m = packet::parse(&out[0].1).unwrap();
        let t = m.l4.unwrap().tcp.unwrap();
        assert_eq!((t.ack, m.payload_len), (250, 0));
        assert!(tcp::tcp_checksum_valid(&out[0].1, &m));
        assert_eq!(g.counters().bare_acks, 1);
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn the_test_only_switch_lets_real_acks_out() {
        let g = gate(GateMode::Classified, Profile::BulkTcp.rules());
        let mut cfg = g.config();
        cfg.skip_clamp().unwrap();
        assert!(cfg.skips_clamp());
        g.set_config(cfg);
        assert_eq!(g.check(0, &seg(100, TCP_ACK, b"d")), GateDecision::Pass);
    }

    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn without_fault_injection_clamping_cannot_be_skipped() {
        let mut cfg = GateConfig::default();
        assert_eq!(cfg.skip_clamp(), Err(NoFaultInjection));
        assert!(!cfg.skips_clamp());
    }

    #[test]
    fn a_full_queue_drops_the_newest_and_keeps_the_rest() {
        let g = gate(GateMode::AllHold, RuleSet::default());
        let frames: Vec<_> = (0..20).map(|i| seg(i, TCP_ACK, b"z")).collect();
        let decisions: Vec<_> = frames.iter().map(|f| g.check(0, f)).collect();
        assert!(decisions[..16].iter().all(|d| *d == GateDecision::Hold));
        assert!(decisions[16..].iter().all(|d| *d == GateDecision::Drop));
        let out = g.commit(1);
        assert_eq!(out.len(), 16);
        assert!(
            out.iter().zip(&frames).all(|((_, a), b)| a == b),
            "order kept"
        );
        let c = g.counters();
        assert_eq!((c.overflow_drops, c.high_water_frames), (4, 16));
    }

    #[test]
    fn failover_discards_and_unprotect_releases() {
        let g = gate(GateMode::AllHold, RuleSet::default());
        g.check(0, &seg(1, TCP_ACK, b"a"));
        g.check(0, &seg(2, TCP_ACK, b"b"));
        assert_eq!(g.discard_uncommitted(), 2);
        assert!(g.commit(5).is_empty(), "discarded frames never come back");
        g.check(1, &seg(3, TCP_ACK, b"c"));
        assert_eq!(g.release_all().len(), 1);
        assert_eq!(g.counters().discarded_frames, 2);
    }

    #[test]
    fn a_new_session_with_lower_numbers_restamps_what_is_held() {
        let g = gate(GateMode::AllHold, RuleSet::default());
        g.epoch_opened(40);
        g.commit(39);
        g.check(0, &seg(1, TCP_ACK, b"a"));
        // The backup lost its replica: numbering restarts at 1, and the
        // first checkpoint able to cover the held frame is 3.
        g.session_started(0, 3);
        assert!(
            g.commit(2).is_empty(),
            "epoch 2 of the new session is not enough"
        );
        assert_eq!(g.commit(3).len(), 1);
    }

    #[test]
    fn rules_changed_at_runtime_apply_to_the_next_frame() {
        let g = gate(GateMode::Classified, Profile::Conservative.rules());
        let udp = from_vm(tcp::build_udp_frame(5004, 6000, b"m"));
        assert_eq!(g.check(0, &udp), GateDecision::Hold);
        g.set_classifier(Arc::new(RuleSet::from_texts(&["pass udp"]).unwrap()));
        assert_eq!(g.check(0, &udp), GateDecision::Pass);
    }

    #[test]
    fn counters_keep_the_api_json_shape() {
        // `GET /v1/ft/{vm}` has always carried these fields, in this order,
        // with the mode as its word.
        let c = GateCounters {
            mode: GateMode::AllHold,
            profile: Some("bulk-tcp".into()),
            rules: 1,
            hold_latency_us: vec![3, 0],
            ..Default::default()
        };
        let fields = [
            "open_epoch",
            "committed_epoch",
            "passed_frames",
            "passed_bytes",
            "clamped_frames",
            "bare_acks",
            "held_frames",
            "held_bytes",
            "released_frames",
            "released_bytes",
            "discarded_frames",
            "discarded_bytes",
            "overflow_drops",
            "queued_frames",
            "queued_bytes",
            "high_water_frames",
            "high_water_bytes",
            "tracked_flows",
        ];
        let mut want = String::from(r#"{"mode":"all-hold","profile":"bulk-tcp","rules":1"#);
        for f in fields {
            want += &format!(r#","{f}":0"#);
        }
        want += r#","hold_latency_us":[3,0],"hold_p50_us":0,"hold_p99_us":0}"#;
        assert_eq!(serde_json::to_string(&c).unwrap(), want);
        let back: GateCounters = serde_json::from_str(&want).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn quantiles_come_from_bucket_bounds() {
        let mut b = [0u64; LATENCY_BUCKETS];
        b[3] = 99;
        b[10] = 1;
        assert_eq!(quantile(&b, 0.5), 64 << 3);
        assert_eq!(quantile(&b, 0.99), 64 << 3);
        assert_eq!(quantile(&b, 1.0), 64 << 10);
        assert_eq!(quantile(&[0; 4], 0.5), 0);
    }
}
