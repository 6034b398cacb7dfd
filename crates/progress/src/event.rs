//! One progress reading as scripts see it: the `--json` line format.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The job is still going.
pub const RUNNING: &str = "running";
/// The job finished; `fraction` is 1.
pub const DONE: &str = "done";
/// The job stopped on an error (see `message`).
pub const FAILED: &str = "failed";
/// The job was stopped on request.
pub const CANCELLED: &str = "cancelled";

/// The keys an event writes itself: `extra` cannot override them, or a
/// reader would see the same key twice.
const RESERVED: [&str; 9] = [
    "job",
    "phase",
    "state",
    "fraction",
    "done",
    "remaining",
    "rate_bps",
    "eta_s",
    "message",
];

/// One progress reading (`--json`: one per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// What is progressing, e.g. `migrate vm1`.
    pub job: String,
    /// The part of the job under way, e.g. `memory`.
    pub phase: String,
    /// [`RUNNING`], [`DONE`], [`FAILED`] or [`CANCELLED`].
    pub state: String,
    /// In [0, 1]; 1 only when done.
    pub fraction: f64,
    pub done: u64,
    pub remaining: u64,
    /// Bytes per second, smoothed.
    pub rate_bps: f64,
    /// Seconds left; `null` when there is no rate to estimate from.
    pub eta_s: Option<f64>,
    /// Why a job failed or was cancelled, or a note while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Job-specific fields (a migration's rung, iteration, dirty rate),
    /// written at the top level of the object.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// JSON has no NaN or infinity.
pub(crate) fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

impl Event {
    /// The event as one JSON line, `\n` included. Non-finite numbers
    /// become 0 (`eta_s`: null), so a reader always gets numbers, and
    /// `extra` keys that clash with the fixed ones are left out.
    pub fn to_json_line(&self) -> String {
        let mut e = self.clone();
        e.fraction = finite(e.fraction).clamp(0.0, 1.0);
        e.rate_bps = finite(e.rate_bps).max(0.0);
        e.eta_s = e.eta_s.filter(|s| s.is_finite() && *s >= 0.0);
        e.extra.retain(|k, _| !RESERVED.contains(&k.as_str()));
        // Cannot fail: string keys, and serde_json values hold no NaN.
        let json = serde_json::to_string(&e).unwrap_or_else(|_| "{}".to_string());
        // serde_json escapes only C0 controls; DEL and C1 (U+009B is a
        // CSI to some terminals) are escaped too, in case the JSON is read
        // on one. They can only occur inside strings, where `\u` is valid.
        let mut line = String::with_capacity(json.len() + 1);
        for c in json.chars() {
            if ('\u{7f}'..='\u{9f}').contains(&c) {
                line.push_str(&format!("\\u{:04x}", c as u32));
            } else {
                line.push(c);
            }
        }
        line.push('\n');
        line
    }

    /// Whether this is the job's last event (any state but running).
    pub fn is_final(&self) -> bool {
        self.state != RUNNING
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{Sample, Tracker};
    use serde_json::{json, Value};

    fn event() -> Event {
        let mut t = Tracker::new();
        t.observe(Sample {
            done: 0,
            remaining: 4096,
            at_ms: 0,
        });
        t.observe(Sample {
            done: 1024,
            remaining: 3072,
            at_ms: 1000,
        });
        let mut e = t.event("migrate vm1", "memory");
        e.extra.insert("rung".into(), json!("precopy"));
        e.extra.insert("iteration".into(), json!(4));
        e
    }

    #[test]
    fn json_line_round_trips_with_extra_flat() {
        let e = event();
        let line = e.to_json_line();
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        let o = v.as_object().unwrap();
        for k in [
            "job",
            "phase",
            "state",
            "fraction",
            "done",
            "remaining",
            "rate_bps",
            "eta_s",
            "rung",
            "iteration",
        ] {
            assert!(o.contains_key(k), "{k} missing from {line}");
        }
        assert!(!o.contains_key("extra"));
        assert!(!o.contains_key("message"));
        assert_eq!(v["job"], "migrate vm1");
        assert_eq!(v["state"], "running");
        assert_eq!(v["fraction"], 0.25);
        assert_eq!(v["done"], 1024);
        assert_eq!(v["remaining"], 3072);
        assert_eq!(v["rate_bps"], 1024.0);
        assert_eq!(v["eta_s"], 3.0);
        assert_eq!(v["rung"], "precopy");
        assert_eq!(v["iteration"], 4);
        // And back into an event.
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn final_event_carries_state_and_message() {
        let mut e = event();
        e.state = FAILED.into();
        e.message = Some("destination refused".into());
        e.eta_s = None;
        assert!(e.is_final());
        let v: Value = serde_json::from_str(&e.to_json_line()).unwrap();
        assert_eq!(v["state"], "failed");
        assert_eq!(v["message"], "destination refused");
        assert_eq!(v["eta_s"], Value::Null);
    }

    #[test]
    fn non_finite_numbers_do_not_reach_json() {
        let mut e = event();
        e.fraction = f64::NAN;
        e.rate_bps = f64::INFINITY;
        e.eta_s = Some(f64::NEG_INFINITY);
        let v: Value = serde_json::from_str(&e.to_json_line()).unwrap();
        assert_eq!(v["fraction"], 0.0);
        assert_eq!(v["rate_bps"], 0.0);
        assert_eq!(v["eta_s"], Value::Null);
        e.fraction = 7.0;
        e.rate_bps = -3.0;
        let v: Value = serde_json::from_str(&e.to_json_line()).unwrap();
        assert_eq!(v["fraction"], 1.0);
        assert_eq!(v["rate_bps"], 0.0);
    }

    #[test]
    fn extra_cannot_shadow_the_fixed_keys() {
        let mut e = event();
        e.extra.insert("fraction".into(), json!("lies"));
        e.extra.insert("job".into(), json!(1));
        let line = e.to_json_line();
        assert_eq!(line.matches("\"fraction\"").count(), 1, "{line}");
        assert_eq!(line.matches("\"job\"").count(), 1, "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["fraction"], 0.25);
        assert_eq!(v["job"], "migrate vm1");
    }

    proptest::proptest! {
        #[test]
        fn any_event_is_one_valid_json_line(
            job in proptest::prelude::any::<String>(),
            key in proptest::prelude::any::<String>(),
            val in proptest::prelude::any::<String>(),
            f in proptest::prelude::any::<f64>(),
            rate in proptest::prelude::any::<f64>(),
            eta in proptest::prelude::any::<Option<f64>>(),
        ) {
            let mut e = event();
            e.job = job.clone();
            e.fraction = f;
            e.rate_bps = rate;
            e.eta_s = eta;
            e.message = Some(val.clone());
            e.extra.insert(key, json!(val));
            let line = e.to_json_line();
            proptest::prop_assert!(line.ends_with('\n'));
            let body = line.trim_end_matches('\n');
            proptest::prop_assert!(!body.chars().any(|c| c.is_control()));
            let v: Value = serde_json::from_str(body).unwrap();
            let fr = v["fraction"].as_f64().unwrap();
            proptest::prop_assert!((0.0..=1.0).contains(&fr));
            proptest::prop_assert!(v["rate_bps"].as_f64().unwrap().is_finite());
            proptest::prop_assert!(v["eta_s"].is_null() || v["eta_s"].as_f64().is_some());
            proptest::prop_assert_eq!(v["job"].as_str().unwrap(), job.as_str());
        }
    }

    #[test]
    fn control_characters_are_escaped_in_json() {
        let mut e = event();
        e.job = "vm\x1b[2J\n\u{7f}\u{9b}é".into();
        let line = e.to_json_line();
        assert!(!line.trim_end_matches('\n').chars().any(|c| c.is_control()));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["job"], "vm\x1b[2J\n\u{7f}\u{9b}é");
    }
}
