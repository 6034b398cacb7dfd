//! The drill's invariants, as pure functions over what was observed.
//!
//! - Every reply the client *received* (after the commit gate) names a
//!   record the resumed VM knows, with the same text.
//! - Every such record is on the replica's disk.
//! - The resumed VM's record numbering continues (no record it reports
//!   contradicts one the client saw).

use std::collections::BTreeMap;

/// A reply the client was given: record `seq` holds `text`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Delivered {
    pub seq: u64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Violation {
    /// The resumed VM does not know a record the client was told about.
    LostReply {
        seq: u64,
        text: String,
        vm_said: String,
    },
    /// The replica's disk lacks a record the client was told about.
    NotOnDisk { seq: u64, text: String },
    /// The disk holds a different text for a record the client saw.
    DiskMismatch {
        seq: u64,
        client: String,
        disk: String,
    },
    /// The resumed VM's last record is below one the client saw.
    Regressed { last: u64, seen: u64 },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::LostReply { seq, text, vm_said } => write!(
                f,
                "client saw `OK {seq}` for {text:?}, the resumed VM answers {vm_said:?}"
            ),
            Violation::NotOnDisk { seq, text } => {
                write!(
                    f,
                    "record {seq} ({text:?}) was acknowledged but is not on the replica disk"
                )
            }
            Violation::DiskMismatch { seq, client, disk } => {
                write!(
                    f,
                    "record {seq}: client saw {client:?}, disk holds {disk:?}"
                )
            }
            Violation::Regressed { last, seen } => {
                write!(
                    f,
                    "resumed VM's last record is {last}, the client saw {seen}"
                )
            }
        }
    }
}

/// Checks the client's delivered replies against the resumed VM's answers
/// to `GET seq` (`answers[seq]` is the raw reply line) and its `LAST`.
pub fn check_vm(
    delivered: &[Delivered],
    answers: &BTreeMap<u64, String>,
    last: u64,
) -> Vec<Violation> {
    let mut out = Vec::new();
    for d in delivered {
        let want = format!("REC {} {}", d.seq, d.text);
        let got = answers
            .get(&d.seq)
            .cloned()
            .unwrap_or_else(|| "no answer".into());
        if got != want {
            out.push(Violation::LostReply {
                seq: d.seq,
                text: d.text.clone(),
                vm_said: got,
            });
        }
    }
    if let Some(max) = delivered.iter().map(|d| d.seq).max() {
        if last < max {
            out.push(Violation::Regressed { last, seen: max });
        }
    }
    out
}

/// Checks the delivered replies against the record log read off the
/// replica disk (`<seq> <text>` lines; a torn tail is ignored).
pub fn check_disk(delivered: &[Delivered], log: &str) -> Vec<Violation> {
    let mut on_disk = BTreeMap::new();
    for line in log.lines() {
        if let Some((seq, text)) = line.split_once(' ') {
            if let Ok(seq) = seq.parse::<u64>() {
                on_disk.insert(seq, text.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for d in delivered {
        match on_disk.get(&d.seq) {
            None => out.push(Violation::NotOnDisk {
                seq: d.seq,
                text: d.text.clone(),
            }),
            Some(t) if *t != d.text => out.push(Violation::DiskMismatch {
                seq: d.seq,
                client: d.text.clone(),
                disk: t.clone(),
            }),
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(seq: u64, text: &str) -> Delivered {
        Delivered {
            seq,
            text: text.into(),
        }
    }

    #[test]
    fn a_known_reply_passes_and_a_lost_one_is_caught() {
        let delivered = vec![d(1, "a"), d(2, "b")];
        let mut answers = BTreeMap::new();
        answers.insert(1, "REC 1 a".to_string());
        answers.insert(2, "REC 2 b".to_string());
        assert!(check_vm(&delivered, &answers, 2).is_empty());
        answers.insert(2, "NONE 2".to_string());
        let v = check_vm(&delivered, &answers, 1);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(matches!(v[0], Violation::LostReply { seq: 2, .. }));
        assert!(matches!(v[1], Violation::Regressed { last: 1, seen: 2 }));
    }

    #[test]
    fn disk_check_finds_missing_and_mismatched_records() {
        let delivered = vec![d(1, "a"), d(2, "b"), d(3, "c")];
        let log = "1 a\n2 x\n3 c";
        let v = check_disk(&delivered, log);
        assert_eq!(
            v,
            vec![Violation::DiskMismatch {
                seq: 2,
                client: "b".into(),
                disk: "x".into()
            }]
        );
        let v = check_disk(&delivered, "1 a\n");
        assert_eq!(v.len(), 2);
    }
}
