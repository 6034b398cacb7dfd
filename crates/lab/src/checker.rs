//! The drill's invariants, as pure functions over what was observed.
//!
//! - Every reply the client *received* (after the commit gate) names a
//!   record the resumed VM knows, with the same text.
//! - Every such record is on the replica's disk.
//! - The resumed VM's record numbering continues (no record it reports
//!   contradicts one the client saw).
//!
//! And, for the cluster steps, what a client may see of a change that is
//! not supposed to touch its path ([`service_window`], [`check_service`]).

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

/// One request of a probe client: when its answer came (ms from a common
/// start), how long it took, and whether it was answered at all.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Probe {
    pub at_ms: f64,
    pub latency_ms: f64,
    pub ok: bool,
}

/// How a service behaved for a probe client before a window (a switch
/// change, say) and during it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ServiceWindow {
    pub before_answered: usize,
    pub before_p50_ms: f64,
    pub before_max_ms: f64,
    pub during_answered: usize,
    pub during_failed: usize,
    pub during_p50_ms: f64,
    pub during_max_ms: f64,
    /// The longest stretch of the window without an answer (its edges
    /// count: nothing answered at all is the whole window).
    pub during_longest_gap_ms: f64,
    /// Failed requests over the whole run, window or not.
    pub failed_total: usize,
}

/// A stretch with no answer that a client would notice as an outage
/// rather than as latency: longer than TCP's first retransmissions and a
/// slow fsync in a TCG guest put together.
pub const ALLOWED_GAP_MS: f64 = 3000.0;

/// Summarises `probes` around the window `[from_ms, to_ms]`. A request is
/// in the window if any part of it (sent to answered) overlaps it.
pub fn service_window(probes: &[Probe], from_ms: f64, to_ms: f64) -> ServiceWindow {
    let mut before: Vec<f64> = probes
        .iter()
        .filter(|p| p.ok && p.at_ms < from_ms)
        .map(|p| p.latency_ms)
        .collect();
    let inside: Vec<&Probe> = probes
        .iter()
        .filter(|p| p.at_ms >= from_ms && p.at_ms - p.latency_ms <= to_ms)
        .collect();
    let mut during: Vec<f64> = inside
        .iter()
        .filter(|p| p.ok)
        .map(|p| p.latency_ms)
        .collect();
    let mut answers: Vec<f64> = inside
        .iter()
        .filter(|p| p.ok)
        .map(|p| p.at_ms.min(to_ms))
        .collect();
    answers.sort_by(f64::total_cmp);
    let mut gap: f64 = 0.0;
    let mut last = from_ms;
    for t in answers.iter().copied().chain(std::iter::once(to_ms)) {
        gap = gap.max(t - last);
        last = t;
    }
    ServiceWindow {
        before_answered: before.len(),
        before_p50_ms: crate::stats_ms(&mut before, 50.0),
        before_max_ms: before.last().copied().unwrap_or(0.0),
        during_answered: during.len(),
        during_failed: inside.iter().filter(|p| !p.ok).count(),
        during_p50_ms: crate::stats_ms(&mut during, 50.0),
        during_max_ms: during.last().copied().unwrap_or(0.0),
        during_longest_gap_ms: gap,
        failed_total: probes.iter().filter(|p| !p.ok).count(),
    }
}

/// What the drill allows of a service during a change away from its path:
/// no request failed, and answers kept coming (no gap above
/// [`ALLOWED_GAP_MS`]). Latency alone is reported, not judged.
pub fn check_service(w: &ServiceWindow) -> Vec<String> {
    let mut out = Vec::new();
    if w.failed_total > 0 {
        out.push(format!(
            "{} client request(s) failed ({} during the change)",
            w.failed_total, w.during_failed
        ));
    }
    if w.during_answered == 0 {
        out.push("the guest answered no request during the change".to_string());
    } else if w.during_longest_gap_ms > ALLOWED_GAP_MS {
        out.push(format!(
            "the guest answered nothing for {:.0} ms during the change (allowed: {ALLOWED_GAP_MS:.0} ms)",
            w.during_longest_gap_ms
        ));
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

    fn probe(at_ms: f64, latency_ms: f64, ok: bool) -> Probe {
        Probe {
            at_ms,
            latency_ms,
            ok,
        }
    }

    #[test]
    fn a_steady_service_passes_and_a_stall_or_a_failure_is_caught() {
        let steady: Vec<Probe> = (0..100)
            .map(|i| probe(i as f64 * 100.0, 20.0, true))
            .collect();
        let w = service_window(&steady, 2000.0, 8000.0);
        assert_eq!(w.before_answered, 20);
        assert_eq!(w.during_answered, 61);
        assert!((w.during_longest_gap_ms - 100.0).abs() < 1e-9, "{w:?}");
        assert!(check_service(&w).is_empty(), "{w:?}");

        // Nothing answered between 3 s and 7 s: a 4 s gap.
        let stalled: Vec<Probe> = steady
            .iter()
            .copied()
            .filter(|p| !(3000.0..7000.0).contains(&p.at_ms))
            .collect();
        let w = service_window(&stalled, 2000.0, 8000.0);
        assert!(w.during_longest_gap_ms >= 4000.0, "{w:?}");
        assert_eq!(check_service(&w).len(), 1);

        // A failed request anywhere fails the check.
        let mut failed = steady.clone();
        failed.push(probe(9500.0, 5000.0, false));
        let w = service_window(&failed, 2000.0, 8000.0);
        assert_eq!(w.failed_total, 1);
        assert_eq!(w.during_failed, 1, "it was in flight during the window");
        assert_eq!(check_service(&w).len(), 1);

        // Nothing at all during the window.
        let w = service_window(&steady[..10], 2000.0, 8000.0);
        assert_eq!(w.during_answered, 0);
        assert!(!check_service(&w).is_empty());
    }
}
