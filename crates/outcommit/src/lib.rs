//! Output commit for protected VMs.
//!
//! A protected VM's frames are classified as they leave it: `hold` frames
//! change state the outside world may rely on and wait until the epoch that
//! produced them is committed on the backup; `pass` frames leave at once.
//! This crate owns the pure logic — frame parsing ([`packet`]), the rule
//! table and shipped profiles ([`rules`]), TCP acknowledgement clamping
//! ([`tcp`]) and the gate's queue and epoch bookkeeping ([`gate`]) — with no
//! I/O, so all of it is tested without QEMU. The switch calls the gate on
//! every frame a VM port sends (its verdict, [`GateDecision`], is the
//! switch's, and its [`PortId`] the switch's port numbering); the
//! replication engine feeds it epochs; the API reports its
//! [`GateCounters`].
//!
//! The one test-only hook, letting TCP acknowledgements out unclamped
//! ([`GateConfig::skip_clamp`]), exists only with the `fault-injection`
//! feature.

/// Whether this build carries the project's test-only hooks (the
/// `fault-injection` feature, which the end-to-end tests turn on): tandemd
/// asks here, so one feature switches every hook of one build.
pub const FAULT_INJECTION: bool = cfg!(feature = "fault-injection");

pub mod gate;
pub mod packet;
pub mod rules;
pub mod tcp;

pub use gate::{Gate, GateConfig, GateCounters, GateDecision, GateMode, OverflowPolicy, PortId};
pub use packet::{Origin, PacketMeta};
pub use rules::{Class, Classifier, FrameHint, Profile, Rule, RuleError, RuleSet};
