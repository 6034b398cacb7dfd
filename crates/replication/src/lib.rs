//! Remus-style replication of a running QEMU guest to a backup host.
//!
//! This crate owns the replication wire protocol ([`wire`]) and its
//! transport ([`link`]), dirty-page tracking ([`tracker`]), epoch assembly
//! and checking ([`assembler`]), the backup's atomic replica store
//! ([`replica`]), and the two roles: the primary's epoch loop with fencing
//! ([`primary`]) and the backup's commit/takeover service ([`backup`]).
//! It holds no policy about *which* VMs are protected; tandemd decides that.

pub mod assembler;
pub mod authority;
pub mod backup;
pub mod clock;
pub mod disklog;
#[cfg(any(test, fuzzing, feature = "fault-injection"))]
pub mod fuzzing;
pub mod link;
pub mod primary;
pub mod ram;
pub mod replica;
#[cfg(test)]
mod sim;
pub mod stats;
pub mod tracker;
pub mod wire;

/// A replicated disk as the primary's epoch loop sees it: a source of the
/// writes made since the previous epoch (the NBD mirror target records them).
pub trait DiskSource: Send + Sync {
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The encoded write log of everything written since the previous call.
    fn take_writes(&self) -> Vec<u8>;
    /// Makes the next [`DiskSource::take_writes`] return the whole disk: a
    /// new connection cannot know what the backup holds beyond its commit.
    /// Pending writes are dropped (the full copy supersedes them), which
    /// also bounds memory while the backup is unreachable.
    fn resync_all(&self);
    /// Whether the disk's initial copy is complete. Until every disk is,
    /// epochs carry no device state and so are not resumable.
    fn is_synced(&self) -> bool {
        true
    }
    /// Called with the guest stopped, before the epoch's device state is
    /// taken: whether every write the guest has had acknowledged is in this
    /// disk's log. An error (the mirror job failed or was cancelled, the
    /// target refused a write) makes the epoch carry no device state, so a
    /// checkpoint is never committed without its disk writes.
    fn check(&self) -> link::BoxFuture<'_, Result<(), DiskFailure>> {
        Box::pin(async { Ok(()) })
    }
}

/// Why a replicated disk's log can no longer vouch for every write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk `{disk}`: {reason}")]
pub struct DiskFailure {
    pub disk: String,
    pub reason: String,
}

/// How a protection's epochs reach whoever holds the VM's output (the
/// switch's output-commit gate). Calls are cheap and never block: they run
/// inside the epoch loop and the backup-ack reader.
pub trait EpochObserver: Send + Sync {
    /// The guest is stopped for checkpoint `epoch - 1`; output it produces
    /// after it resumes is covered only by checkpoint `epoch`.
    fn epoch_opened(&self, epoch: u64);
    /// A new session with the backup: it holds `base`; `first` is the first
    /// checkpoint of this session that can cover output produced until now.
    fn session_started(&self, base: u64, first: u64);
    /// Checkpoint `epoch` is durable on the backup (called in order).
    fn committed(&self, epoch: u64);
    /// The guest will not continue past its last commit here (its QEMU is
    /// gone, or it fenced itself): uncommitted output must be dropped.
    fn abandoned(&self);
    /// Protection ended on purpose; the guest runs on, unprotected.
    fn ended(&self);
    /// The backup has confirmed it holds nothing it could resume (the
    /// degrade policy ended its protection): held output may go out, and
    /// output passes unheld until the next [`session_started`].
    ///
    /// [`session_started`]: EpochObserver::session_started
    fn unprotected(&self);
}
