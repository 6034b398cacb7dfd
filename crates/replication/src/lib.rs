//! Remus-style replication of a running QEMU guest to a backup host.
//!
//! This crate owns the replication wire protocol ([`wire`]), and grows the
//! dirty-page trackers, epoch assembly and the backup's atomic replica store.
//! It holds no policy about *which* VMs are protected; tandemd decides that.

pub mod wire;
