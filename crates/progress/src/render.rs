//! The text forms: pure functions from an event to what a person reads.

use std::time::Duration;

use crate::event::{finite, Event};

/// Text from elsewhere (a VM's name, a peer's message), safe to print on
/// a terminal: C0 and C1 control characters and DEL, which could move the
/// cursor or start an escape sequence, and the bidirectional overrides,
/// which could make the line read differently than it is, become `?`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if is_unsafe(c) { '?' } else { c })
        .collect()
}

fn is_unsafe(c: char) -> bool {
    let u = c as u32;
    u < 0x20
        || (0x7f..=0x9f).contains(&u)
        || (0x202a..=0x202e).contains(&u)
        || (0x2066..=0x2069).contains(&u)
}

/// `1536` → `1.5 KiB` (binary units, as memory and disk sizes are).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    // 1023.96 KiB would print as "1024.0 KiB": move up a unit first.
    while v >= 1023.95 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Bytes per second, as `12.0 MiB/s`; nonsense (NaN, negative) as 0.
pub fn human_rate(bps: f64) -> String {
    let bps = finite(bps).max(0.0);
    // `as` saturates: no overflow for huge rates.
    format!("{}/s", human_bytes(bps as u64))
}

/// `3s`, `2m05s`, `1h02m`: an ETA needs no more precision than that.
pub fn human_duration(d: Duration) -> String {
    // Rounded up: "0s" while something remains would be a lie.
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// An `extra` field as text; suffixes `_bps`, `_bytes` and `_ms` name the
/// unit, so the value is shown in it.
fn extra_field(key: &str, v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let (label, value) = match v {
        Value::Null => return None,
        Value::String(s) => (key, s.clone()),
        Value::Number(n) => {
            let x = n.as_f64().map(finite).unwrap_or(0.0);
            if let Some(label) = key.strip_suffix("_bps") {
                (label, human_rate(x))
            } else if let Some(label) = key.strip_suffix("_bytes") {
                (label, human_bytes(x.max(0.0) as u64))
            } else if let Some(label) = key.strip_suffix("_ms") {
                (label, format!("{n} ms"))
            } else {
                (key, n.to_string())
            }
        }
        other => (key, other.to_string()),
    };
    Some(format!("{} {}", sanitize(label), sanitize(&value)))
}

/// The one-line form:
/// `migrate vm1 memory  [########------------]   40.0%  412.0 MiB/s  ETA 3s  iteration 4, rung precopy`.
/// Never longer than `width` characters, never a control character.
pub fn render_bar(e: &Event, width: usize) -> String {
    let f = finite(e.fraction).clamp(0.0, 1.0);
    // Narrow lines get a shorter bar rather than losing everything after it.
    let cells = (width / 4).clamp(5, 20);
    // Floor, not round: the bar is full only at 100 %.
    let filled = ((f * cells as f64) as usize).min(cells);
    let mut label = sanitize(&e.job);
    if !e.phase.is_empty() {
        label.push(' ');
        label.push_str(&sanitize(&e.phase));
    }
    // A long name may take a third of the line, the bar stays visible.
    let max_label = (width / 3).max(8);
    if label.chars().count() > max_label {
        label = label.chars().take(max_label.saturating_sub(3)).collect();
        label.push_str("...");
    }
    let mut line = Fit::new(width);
    line.push("", &label, true);
    line.push(
        "  ",
        &format!("[{}{}]", "#".repeat(filled), "-".repeat(cells - filled)),
        false,
    );
    // An event not from a Tracker may say 0.9999: that is not "100.0%".
    let pct = if f < 1.0 {
        (f * 100.0).min(99.9)
    } else {
        100.0
    };
    line.push("  ", &format!("{pct:5.1}%"), false);
    if e.is_final() {
        line.push("  ", &sanitize(&e.state), true);
    } else {
        line.push("  ", &human_rate(e.rate_bps), false);
        if let Some(eta) = e.eta_s.and_then(|s| Duration::try_from_secs_f64(s).ok()) {
            line.push("  ", &format!("ETA {}", human_duration(eta)), false);
        }
    }
    if let Some(m) = e.message.as_deref().filter(|m| !m.is_empty()) {
        line.push("  ", &sanitize(m), true);
    }
    let mut sep = "  ";
    for field in e.extra.iter().filter_map(|(k, v)| extra_field(k, v)) {
        line.push(sep, &field, false);
        sep = ", ";
    }
    line.text
}

/// A line built from whole fields while they fit: a cut number (`0 B` of
/// `0 B/s`) would read as another number. Text may be cut, marked `...`.
struct Fit {
    text: String,
    used: usize,
    width: usize,
    full: bool,
}

impl Fit {
    fn new(width: usize) -> Fit {
        Fit {
            text: String::new(),
            used: 0,
            width,
            full: false,
        }
    }

    fn push(&mut self, sep: &str, field: &str, cuttable: bool) {
        if self.full {
            return;
        }
        let sep = if self.text.is_empty() { "" } else { sep };
        let (sep_n, field_n) = (sep.chars().count(), field.chars().count());
        let room = self.width.saturating_sub(self.used);
        if sep_n + field_n <= room {
            self.text.push_str(sep);
            self.text.push_str(field);
            self.used += sep_n + field_n;
            return;
        }
        // Later fields would be out of order after a gap: stop here.
        self.full = true;
        if !cuttable {
            return;
        }
        if room > sep_n + 3 {
            self.text.push_str(sep);
            self.text.extend(field.chars().take(room - sep_n - 3));
            self.text.push_str("...");
        } else if self.text.is_empty() {
            self.text.extend(field.chars().take(room));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{CANCELLED, DONE, FAILED};
    use crate::tracker::{Sample, Tracker};
    use proptest::prelude::*;
    use serde_json::json;

    fn no_controls(s: &str) -> bool {
        !s.chars().any(|c| (c as u32) < 0x20 || c as u32 == 0x7f)
    }

    fn running() -> Event {
        let mut t = Tracker::new();
        t.observe(Sample {
            done: 0,
            remaining: 100 << 20,
            at_ms: 0,
        });
        t.observe(Sample {
            done: 40 << 20,
            remaining: 60 << 20,
            at_ms: 1000,
        });
        t.event("migrate vm1", "memory")
    }

    #[test]
    fn sanitize_replaces_control_characters() {
        assert_eq!(sanitize("vm1"), "vm1");
        assert_eq!(sanitize("a\x1b[2Jb"), "a?[2Jb");
        assert_eq!(sanitize("\r\n\t\0"), "????");
        assert_eq!(sanitize("\x7f\u{80}\u{9b}\u{9f}\u{a0}"), "????\u{a0}");
        assert_eq!(sanitize("abc\u{202e}fed"), "abc?fed");
        assert_eq!(sanitize("héllo wörld ☃"), "héllo wörld ☃");
        assert_eq!(sanitize(""), "");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_bytes(412 << 20), "412.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_rate(0.0), "0 B/s");
        assert_eq!(human_rate(1.5 * 1024.0 * 1024.0), "1.5 MiB/s");
        assert_eq!(human_rate(2.0 * 1024.0 * 1024.0 * 1024.0), "2.0 GiB/s");
        assert_eq!(human_rate(f64::INFINITY), "0 B/s");
        assert_eq!(human_rate(f64::NAN), "0 B/s");
        assert_eq!(human_rate(-5.0), "0 B/s");
        assert_eq!(human_rate(1e300), "16.0 EiB/s");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(Duration::ZERO), "0s");
        assert_eq!(human_duration(Duration::from_millis(2100)), "3s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1h02m");
        assert!(!human_duration(Duration::MAX).is_empty());
    }

    #[test]
    fn bar_shows_progress_rate_eta_and_extra() {
        let mut e = running();
        e.extra.insert("iteration".into(), json!(4));
        e.extra.insert("rung".into(), json!("precopy"));
        e.extra.insert("dirty_rate_bps".into(), json!(2097152.0));
        e.extra.insert("expected_downtime_ms".into(), json!(300));
        e.extra.insert("nothing".into(), json!(null));
        let bar = render_bar(&e, 200);
        assert_eq!(
            bar,
            "migrate vm1 memory  [########------------]   40.0%  40.0 MiB/s  ETA 2s  \
             dirty_rate 2.0 MiB/s, expected_downtime 300 ms, iteration 4, rung precopy"
        );
    }

    #[test]
    fn bar_is_full_only_when_done() {
        let mut t = Tracker::new();
        t.observe(Sample {
            done: 1 << 30,
            remaining: 0,
            at_ms: 0,
        });
        let bar = render_bar(&t.event("j", ""), 80);
        assert!(bar.contains("[###################-]"), "{bar}");
        assert!(bar.contains(" 99.9%"), "{bar}");
        let mut e = t.event("j", "");
        e.fraction = 0.99999;
        assert!(render_bar(&e, 80).contains(" 99.9%"));
        t.finish();
        let bar = render_bar(&t.event("j", ""), 80);
        assert!(
            bar.starts_with("j  [####################]  100.0%  done"),
            "{bar}"
        );
    }

    #[test]
    fn final_states_show_the_state_and_message() {
        for state in [DONE, FAILED, CANCELLED] {
            let mut e = running();
            e.state = state.into();
            e.message = Some("peer said\x1b[31m no\r\n".into());
            let bar = render_bar(&e, 200);
            assert!(
                bar.contains(&format!("%  {state}  peer said?[31m no??")),
                "{bar}"
            );
            assert!(!bar.contains("ETA"));
            assert!(no_controls(&bar));
        }
    }

    #[test]
    fn bar_has_no_control_characters_and_respects_width() {
        let mut e = running();
        e.job = "vm\x1b[2J\u{9b}31m".into();
        e.phase = "p\x07".into();
        e.message = Some("bad\rthing".into());
        e.extra.insert("k\x1b".into(), json!("v\n"));
        let bar = render_bar(&e, 500);
        assert!(bar.starts_with("vm?[2J?31m p?  [####"), "{bar}");
        assert!(no_controls(&bar), "{bar:?}");
        for w in [0, 1, 10, 40, 79, 80, 120] {
            let b = render_bar(&e, w);
            assert!(b.chars().count() <= w, "{w}: {b}");
            assert!(no_controls(&b));
        }
    }

    #[test]
    fn long_names_leave_room_for_the_bar() {
        let mut e = running();
        e.job = "x".repeat(500);
        let bar = render_bar(&e, 80);
        assert!(bar.contains("xxx...  [########"), "{bar}");
        assert!(bar.contains("40.0%"), "{bar}");
        assert!(bar.chars().count() <= 80);
    }

    #[test]
    fn narrow_lines_drop_whole_fields() {
        let mut e = running();
        e.extra.insert("rung".into(), json!("precopy"));
        e.message = Some("a long note about what is going on".into());
        let full = render_bar(&e, 200);
        assert_eq!(full.chars().count(), 120, "{full}");
        assert_eq!(render_bar(&e, 120), full);
        // A field that does not fit is left out whole.
        assert!(render_bar(&e, 119).ends_with("going on"));
        // Text is cut and marked.
        let cut = render_bar(&e, 100);
        assert!(cut.ends_with("  a long note about what is..."), "{cut}");
        assert_eq!(cut.chars().count(), 100);
        // The rate does not fit: neither it nor anything after it.
        assert_eq!(
            render_bar(&e, 60),
            "migrate vm1 memory  [######---------]   40.0%  40.0 MiB/s"
        );
        assert_eq!(
            render_bar(&e, 54),
            "migrate vm1 memory  [#####--------]   40.0%"
        );
        assert_eq!(render_bar(&e, 5), "mi...");
        assert_eq!(render_bar(&e, 3), "mig");
        assert_eq!(render_bar(&e, 0), "");
    }

    proptest! {
        #[test]
        fn the_bar_never_panics_or_carries_control_characters(
            job in any::<String>(),
            phase in any::<String>(),
            msg in any::<String>(),
            key in any::<String>(),
            val in any::<String>(),
            state in prop::sample::select(vec!["running", "done", "failed", "cancelled", "\x1b"]),
            f in any::<f64>(),
            rate in any::<f64>(),
            eta in any::<Option<f64>>(),
            width in 0usize..300,
        ) {
            let mut e = Tracker::new().event(&job, &phase);
            e.state = state.to_string();
            e.fraction = f;
            e.rate_bps = rate;
            e.eta_s = eta;
            e.message = Some(msg);
            e.extra.insert(key, json!(val));
            e.extra.insert("n_bps".into(), json!(rate));
            let bar = render_bar(&e, width);
            prop_assert!(no_controls(&bar), "{:?}", bar);
            prop_assert!(!bar.chars().any(|c| (0x80..=0x9f).contains(&(c as u32))));
            prop_assert!(bar.chars().count() <= width);
        }

        #[test]
        fn sanitize_leaves_no_controls(s in any::<String>()) {
            let t = sanitize(&s);
            prop_assert!(!t.chars().any(|c| c.is_control()));
            prop_assert_eq!(t.chars().count(), s.chars().count());
        }
    }
}
