//! QEMU's `query-migrate` answer, read into a typed [`Sample`].
//!
//! The answer comes from a QEMU process, so nothing in it is trusted to be
//! present or sane: missing counters read as zero, an unknown status is an
//! error the caller reports (it never guesses that a migration finished).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where QEMU says a migration is (`MigrationStatus` in QEMU's schema,
/// folded to what a driver must tell apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// `none`: no migration has started.
    None,
    /// `setup`, `wait-unplug`: connecting, not yet sending RAM.
    Setup,
    /// `active`, `pre-switchover`, `device`: precopy is sending RAM (or the
    /// final stop-and-copy is under way).
    Active,
    /// `postcopy-active` and the postcopy recovery states: the destination
    /// runs the guest and pulls the pages it lacks.
    Postcopy,
    /// `completed`: the source has stopped; the destination has everything.
    Completed,
    /// `failed`.
    Failed,
    /// `cancelling`: QEMU is still tearing the stream down; the source is
    /// not free for another migration (or a checkpoint) yet.
    Cancelling,
    /// `cancelled`.
    Cancelled,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "none" => Status::None,
            "setup" | "wait-unplug" => Status::Setup,
            "active" | "pre-switchover" | "device" => Status::Active,
            "postcopy-active"
            | "postcopy-paused"
            | "postcopy-recover-setup"
            | "postcopy-recover" => Status::Postcopy,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "cancelling" => Status::Cancelling,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    /// The migration has ended, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// One reading of `query-migrate`, at a time the caller measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds on the caller's monotonic clock.
    pub at_ms: u64,
    pub status: Option<Status>,
    /// Bytes of RAM sent so far.
    pub transferred: u64,
    /// Of `transferred`, the bytes sent over multifd streams.
    pub multifd_bytes: u64,
    /// Bytes of RAM QEMU still has to send (grows again when the guest
    /// re-dirties pages).
    pub remaining: u64,
    /// The guest's RAM size.
    pub total: u64,
    /// Pages per second the guest dirties, as QEMU measured it in its last
    /// pass (0 before the first).
    pub dirty_pages_rate: u64,
    pub page_size: u64,
    /// Throughput QEMU measured, in megabits per second.
    pub mbps: f64,
    /// Completed passes over the dirty bitmap: precopy's iteration.
    pub iteration: u64,
    /// QEMU's estimate of the stop-and-copy time at the current rate.
    pub expected_downtime_ms: Option<u64>,
    /// The guest's vCPU throttle (auto-converge), 0 when none.
    pub cpu_throttle_pct: u64,
    /// The final downtime, once completed.
    pub downtime_ms: Option<u64>,
    pub total_time_ms: Option<u64>,
    /// Pages the destination asked for during postcopy.
    pub postcopy_requests: u64,
    /// QEMU's own words on a failure.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SampleError {
    #[error("query-migrate answered with something that is not an object")]
    NotAnObject,
    #[error("query-migrate reports an unknown status `{0}`")]
    UnknownStatus(String),
}

fn u64_at(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

impl Sample {
    /// Reads `query-migrate`'s return value. A reply without `status` is a
    /// QEMU on which no migration ever started (`status: None`).
    pub fn from_query_migrate(v: &Value, at_ms: u64) -> Result<Sample, SampleError> {
        if !v.is_object() {
            return Err(SampleError::NotAnObject);
        }
        let status = match v.get("status").and_then(Value::as_str) {
            None => Some(Status::None),
            Some(s) => {
                Some(Status::parse(s).ok_or_else(|| SampleError::UnknownStatus(s.to_string()))?)
            }
        };
        let null = Value::Null;
        let ram = v.get("ram").unwrap_or(&null);
        let mbps = ram
            .get("mbps")
            .and_then(Value::as_f64)
            .filter(|m| m.is_finite() && *m >= 0.0)
            .unwrap_or(0.0);
        Ok(Sample {
            at_ms,
            status,
            transferred: u64_at(ram, "transferred").unwrap_or(0),
            multifd_bytes: u64_at(ram, "multifd-bytes").unwrap_or(0),
            remaining: u64_at(ram, "remaining").unwrap_or(0),
            total: u64_at(ram, "total").unwrap_or(0),
            dirty_pages_rate: u64_at(ram, "dirty-pages-rate").unwrap_or(0),
            page_size: u64_at(ram, "page-size").unwrap_or(4096),
            mbps,
            iteration: u64_at(ram, "dirty-sync-count").unwrap_or(0),
            expected_downtime_ms: u64_at(v, "expected-downtime"),
            cpu_throttle_pct: u64_at(v, "cpu-throttle-percentage").unwrap_or(0),
            downtime_ms: u64_at(v, "downtime"),
            total_time_ms: u64_at(v, "total-time"),
            postcopy_requests: u64_at(ram, "postcopy-requests").unwrap_or(0),
            error: v
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Bytes per second the guest dirties.
    pub fn dirty_rate_bps(&self) -> u64 {
        self.dirty_pages_rate.saturating_mul(self.page_size)
    }

    /// Bytes per second the link carries, by QEMU's measure.
    pub fn bandwidth_bps(&self) -> u64 {
        (self.mbps * 1_000_000.0 / 8.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_an_active_migration() {
        // The shape QEMU 10.0 answers with while precopy runs.
        let v = json!({
            "status": "active", "expected-downtime": 663, "total-time": 2100,
            "setup-time": 3, "cpu-throttle-percentage": 20,
            "ram": {"transferred": 104857600u64, "remaining": 67108864u64, "total": 1073741824u64,
                    "duplicate": 10, "normal": 100, "normal-bytes": 409600, "dirty-pages-rate": 16384,
                    "mbps": 800.5, "dirty-sync-count": 7, "page-size": 4096,
                    "postcopy-requests": 0}
        });
        let s = Sample::from_query_migrate(&v, 42).unwrap();
        assert_eq!(s.status, Some(Status::Active));
        assert_eq!(s.remaining, 64 << 20);
        assert_eq!(s.iteration, 7);
        assert_eq!(s.expected_downtime_ms, Some(663));
        assert_eq!(s.cpu_throttle_pct, 20);
        assert_eq!(s.dirty_rate_bps(), 64 << 20);
        assert_eq!(s.bandwidth_bps(), 100_062_500);
        assert_eq!(s.at_ms, 42);
    }

    #[test]
    fn reads_every_status_qemu_has() {
        for (s, want) in [
            ("none", Status::None),
            ("setup", Status::Setup),
            ("wait-unplug", Status::Setup),
            ("active", Status::Active),
            ("pre-switchover", Status::Active),
            ("device", Status::Active),
            ("postcopy-active", Status::Postcopy),
            ("postcopy-paused", Status::Postcopy),
            ("postcopy-recover-setup", Status::Postcopy),
            ("postcopy-recover", Status::Postcopy),
            ("completed", Status::Completed),
            ("failed", Status::Failed),
            ("cancelling", Status::Cancelling),
            ("cancelled", Status::Cancelled),
        ] {
            let got = Sample::from_query_migrate(&json!({ "status": s }), 0).unwrap();
            assert_eq!(got.status, Some(want), "{s}");
        }
        // `colo` is not a migration tandem starts: never taken for done.
        assert_eq!(
            Sample::from_query_migrate(&json!({"status": "colo"}), 0),
            Err(SampleError::UnknownStatus("colo".into()))
        );
    }

    #[test]
    fn a_qemu_that_never_migrated_has_no_status() {
        let s = Sample::from_query_migrate(&json!({}), 0).unwrap();
        assert_eq!(s.status, Some(Status::None));
        assert_eq!(s.remaining, 0);
    }

    #[test]
    fn garbage_is_an_error_or_zero_never_a_panic() {
        assert_eq!(
            Sample::from_query_migrate(&json!([1, 2]), 0),
            Err(SampleError::NotAnObject)
        );
        let s = Sample::from_query_migrate(
            &json!({"status": "failed", "error-desc": "Unable to write", "ram": {"mbps": "fast", "remaining": -1}}),
            0,
        )
        .unwrap();
        assert_eq!(s.mbps, 0.0);
        assert_eq!(s.remaining, 0);
        assert_eq!(s.error.as_deref(), Some("Unable to write"));
    }

    proptest::proptest! {
        #[test]
        fn any_json_object_reads_without_panicking(
            status in proptest::option::of("[a-z-]{0,20}"),
            nums in proptest::collection::vec(proptest::num::f64::ANY, 6),
        ) {
            let mut v = json!({"ram": {
                "transferred": nums[0], "remaining": nums[1], "total": nums[2],
                "dirty-pages-rate": nums[3], "mbps": nums[4], "page-size": nums[5],
            }});
            if let Some(s) = status {
                v["status"] = json!(s);
            }
            if let Ok(s) = Sample::from_query_migrate(&v, 1) {
                let _ = s.dirty_rate_bps();
                let _ = s.bandwidth_bps();
            }
        }
    }
}
