//! The manager's state store: a small keyed store with revisions, behind a
//! trait so that the embedded [`RedbStore`] (the default) and a later etcd
//! backend are interchangeable.
//!
//! The trait is deliberately what etcd offers natively and nothing more:
//! get, put, delete, list by prefix, and compare-and-swap on a key's
//! revision. Every write bumps one store-wide revision counter and stamps
//! the written key with it (etcd's `mod_revision`), so a revision read with
//! a value is the token a later compare-and-swap presents. Deleting a key
//! bumps the counter too; a re-created key gets a new, higher revision, so
//! an old revision can never match it (no ABA).
//!
//! Values are bytes to the trait. The typed helpers in [`typed`] keep JSON
//! records in a versioned envelope and run read-modify-write loops on CAS.

mod redb_store;
pub mod typed;

use async_trait::async_trait;

pub use redb_store::{RedbStore, DB_FILE};

/// A store-wide write counter. A key's revision is the counter's value of
/// the write that last changed it. Never 0 for a stored key.
pub type Revision = u64;

/// A key with its value and the revision of its last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub revision: Revision,
}

/// What a compare-and-swap expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key exists and was last written at exactly this revision.
    Revision(Revision),
}

/// What a compare-and-swap did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The expectation held and the write (or delete) happened at `revision`.
    Swapped { revision: Revision },
    /// The expectation did not hold; nothing was written. `current` is the
    /// key as it is now (`None`: absent), to retry from.
    Conflict { current: Option<Entry> },
}

impl CasOutcome {
    pub fn swapped(&self) -> bool {
        matches!(self, CasOutcome::Swapped { .. })
    }
}

/// Errors a store can return. None of them is a panic: a corrupt or locked
/// database file is reported with its path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: the database is in use by another process (is a tandem-manager already running on this state directory?)")]
    Locked { path: String },
    #[error("{path}: the database file is damaged: {detail} (restore it from a backup: `tandem cluster restore`)")]
    Corrupt { path: String, detail: String },
    #[error("{path}: the database was written by a newer tandem-manager (format {found}, this one reads up to {known})")]
    TooNew {
        path: String,
        found: u64,
        known: u64,
    },
    #[error("{path}: {detail}")]
    Io { path: String, detail: String },
    #[error("store: {0}")]
    Backend(String),
    #[error("record {key}: {detail}")]
    Decode { key: String, detail: String },
    #[error("record {key} has schema {found}; this manager reads up to {known} (written by a newer tandem-manager?)")]
    Schema { key: String, found: u32, known: u32 },
    #[error("record {key} kept changing under concurrent writers; gave up after {tries} tries")]
    Contended { key: String, tries: u32 },
    #[error("invalid key {0:?}: keys are non-empty printable ASCII without spaces")]
    InvalidKey(String),
}

/// A keyed store with revisions and compare-and-swap. Keys are printable
/// ASCII (see [`check_key`]); `list` returns keys in byte order.
///
/// Implementations are shared between tasks (`Send + Sync`) and must make
/// each call atomic and durable before it returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key's value and revision, or `None`.
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Writes `value` unconditionally; returns the write's revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError>;

    /// Deletes the key; `false` if it did not exist (no revision is used then).
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Every key starting with `prefix` (all keys for `""`), in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;

    /// If the key is as `expect` says, writes `new` (`None`: deletes the
    /// key) and returns the new revision; otherwise writes nothing and
    /// returns the key as it is. Deleting an absent key with
    /// `Expect::Absent` swaps without writing.
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<CasOutcome, StoreError>;

    /// The store-wide revision: that of the last write.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// One line for status output, e.g. `redb /var/lib/tandem-manager/manager.redb`.
    fn describe(&self) -> String;
}

/// Keys are 1..=512 bytes of printable ASCII without spaces, so they read
/// the same in logs, dumps and etcd.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > 512 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(StoreError::InvalidKey(key.chars().take(80).collect()));
    }
    Ok(())
}

/// Checks a list prefix: empty, or a valid key.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    check_key(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in ["a", "hosts/h1", "vms/0b2c-..", "x".repeat(512).as_str()] {
            check_key(ok).unwrap();
        }
        for bad in ["", "a b", "é", "a\n", &"x".repeat(513)] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        check_prefix("").unwrap();
    }
}
