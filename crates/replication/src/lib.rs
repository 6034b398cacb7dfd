//! Remus-style replication of a running QEMU guest to a backup host.
//!
//! This crate owns the replication wire protocol ([`wire`]) and its
//! transport ([`link`]), dirty-page tracking ([`tracker`]), epoch assembly
//! and checking ([`assembler`]), the backup's atomic replica store
//! ([`replica`]), and the two roles: the primary's epoch loop with fencing
//! ([`primary`]) and the backup's commit/takeover service ([`backup`]).
//! It holds no policy about *which* VMs are protected; tandemd decides that.

pub mod assembler;
pub mod backup;
pub mod disklog;
pub mod link;
pub mod primary;
pub mod ram;
pub mod replica;
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
}
