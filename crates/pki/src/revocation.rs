//! Revoked certificate serials: what the TLS configs ask on every handshake.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use parking_lot::{Mutex, RwLock};

use crate::fsutil;
use crate::{truncate_for_message, PkiError};

/// Asked on every handshake, with the peer certificate's serial in the
/// form [`crate::Peer::serial`] has (lowercase hex, no separators).
pub trait Revocations: Send + Sync {
    fn is_revoked(&self, serial: &str) -> bool;
}

/// Nothing is revoked (standalone pairs, tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRevocations;

impl Revocations for NoRevocations {
    fn is_revoked(&self, _serial: &str) -> bool {
        false
    }
}

/// The canonical form of a serial: lowercase hex, no `:` separators, no
/// leading zero bytes. `None` if `s` is not hex (or absurdly long: RFC 5280
/// serials are at most 20 bytes).
pub fn normalize_serial(s: &str) -> Option<String> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|&c| c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.is_empty() || hex.len() > 42 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let digits = hex.trim_start_matches('0');
    Some(match digits.len() {
        0 => "00".to_string(),
        n if n % 2 == 1 => format!("0{digits}"),
        _ => digits.to_string(),
    })
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    generation: u64,
    serials: BTreeSet<String>,
}

/// The revoked serials, in memory and optionally in a file. The manager
/// keeps the authoritative list and pushes it whole, with a generation
/// number, to every host ([`replace`](Self::replace)); a host keeps it in a
/// file so that it survives a restart while the manager is down. Every
/// change is written first (atomic replace) and then made visible.
///
/// File format, one item a line: `generation N` once, `serial HEX` for each
/// revoked certificate, `#` comments.
#[derive(Debug, Default)]
pub struct RevocationList {
    state: RwLock<State>,
    /// Serialises writers across the file write and the swap.
    write: Mutex<()>,
    path: Option<PathBuf>,
}

impl Revocations for RevocationList {
    fn is_revoked(&self, serial: &str) -> bool {
        let state = self.state.read();
        if state.serials.contains(serial) {
            return true;
        }
        match normalize_serial(serial) {
            Some(n) => state.serials.contains(&n),
            None => false,
        }
    }
}

impl RevocationList {
    /// An empty list kept only in memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// The list kept in `path`: read if it exists (an unreadable or corrupt
    /// file is an error: revocations are not silently forgotten), empty
    /// with generation 0 if it does not.
    pub fn open(path: &Path) -> Result<Self, PkiError> {
        let state = match std::fs::symlink_metadata(path) {
            Ok(_) => {
                let text = fsutil::read_text(path)?;
                parse(&text).map_err(|reason| PkiError::RevocationList {
                    path: path.to_path_buf(),
                    reason,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(PkiError::io(path, e)),
        };
        Ok(RevocationList {
            state: RwLock::new(state),
            write: Mutex::new(()),
            path: Some(path.to_path_buf()),
        })
    }

    /// The file this list is kept in, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn generation(&self) -> u64 {
        self.state.read().generation
    }

    /// The revoked serials, sorted.
    pub fn serials(&self) -> Vec<String> {
        self.state.read().serials.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.state.read().serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.read().serials.is_empty()
    }

    /// Revokes `serial` (the manager's `host remove`) and bumps the
    /// generation. `Ok(false)` if it was already revoked.
    pub fn revoke(&self, serial: &str) -> Result<bool, PkiError> {
        let serial = normalize_serial(serial)
            .ok_or_else(|| PkiError::InvalidSerial(truncate_for_message(serial)))?;
        let _w = self.write.lock();
        let mut next = self.state.read().clone();
        if !next.serials.insert(serial) {
            return Ok(false);
        }
        next.generation = next.generation.saturating_add(1);
        self.commit(next)?;
        Ok(true)
    }

    /// Replaces the whole list with the manager's copy at `generation`.
    /// `Ok(false)`, and nothing changes, if this list is already at
    /// `generation` or newer: a delayed push cannot undo a revocation.
    pub fn replace<I, S>(&self, generation: u64, serials: I) -> Result<bool, PkiError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = BTreeSet::new();
        for s in serials {
            let s = s.as_ref();
            set.insert(
                normalize_serial(s)
                    .ok_or_else(|| PkiError::InvalidSerial(truncate_for_message(s)))?,
            );
        }
        let _w = self.write.lock();
        if generation <= self.state.read().generation {
            return Ok(false);
        }
        self.commit(State {
            generation,
            serials: set,
        })?;
        Ok(true)
    }

    /// The file's text for the current state.
    pub fn to_text(&self) -> String {
        render(&self.state.read())
    }

    fn commit(&self, next: State) -> Result<(), PkiError> {
        if let Some(path) = &self.path {
            fsutil::replace(path, render(&next).as_bytes(), fsutil::CERT_MODE)?;
        }
        *self.state.write() = next;
        Ok(())
    }
}

fn render(state: &State) -> String {
    let mut s = String::from(
        "# tandem revocation list: serials of certificates the cluster CA has revoked\n",
    );
    s.push_str(&format!("generation {}\n", state.generation));
    for serial in &state.serials {
        s.push_str("serial ");
        s.push_str(serial);
        s.push('\n');
    }
    s
}

fn parse(text: &str) -> Result<State, String> {
    let mut generation = None;
    let mut serials = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: {:?}", n + 1, truncate_for_message(line));
        match line.split_once(' ') {
            Some(("generation", g)) if generation.is_none() => {
                generation = Some(g.trim().parse::<u64>().map_err(|_| bad())?);
            }
            Some(("serial", s)) => {
                serials.insert(normalize_serial(s).ok_or_else(bad)?);
            }
            _ => return Err(bad()),
        }
    }
    Ok(State {
        generation: generation.ok_or("no generation line")?,
        serials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(normalize_serial("0A:bC").as_deref(), Some("0abc"));
        assert_eq!(normalize_serial("00:0a:bc").as_deref(), Some("0abc"));
        assert_eq!(normalize_serial("abc").as_deref(), Some("0abc"));
        assert_eq!(normalize_serial("0").as_deref(), Some("00"));
        assert_eq!(normalize_serial(""), None);
        assert_eq!(normalize_serial("xyz"), None);
        assert_eq!(normalize_serial(&"a".repeat(100)), None);
    }

    #[test]
    fn file_round_trip_and_generations() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("revoked");
        let l = RevocationList::open(&p).unwrap();
        assert_eq!(l.generation(), 0);
        assert!(l.revoke("AB:CD").unwrap());
        assert!(!l.revoke("abcd").unwrap());
        assert!(l.is_revoked("abcd"));
        assert!(l.is_revoked("AB:CD"));
        assert!(!l.is_revoked("abce"));
        assert_eq!(l.generation(), 1);

        let again = RevocationList::open(&p).unwrap();
        assert_eq!(again.serials(), vec!["abcd".to_string()]);
        assert_eq!(again.generation(), 1);

        // An older or equal push is ignored; a newer one replaces.
        assert!(!again.replace(1, ["ef01"]).unwrap());
        assert!(again.replace(5, ["ef01", "0123"]).unwrap());
        assert!(!again.is_revoked("abcd"));
        assert!(again.is_revoked("ef01"));
        let third = RevocationList::open(&p).unwrap();
        assert_eq!(third.generation(), 5);
        assert_eq!(third.len(), 2);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("revoked");
        for text in [
            "serial ab\n",
            "generation x\n",
            "generation 1\nserial zz\n",
            "generation 1\ngeneration 2\n",
            "generation 1\nwhat\n",
        ] {
            std::fs::write(&p, text).unwrap();
            assert!(RevocationList::open(&p).is_err(), "{text:?} accepted");
        }
        assert!(RevocationList::new().revoke("not hex").is_err());
    }
}
