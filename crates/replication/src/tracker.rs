//! Dirty-page tracking, from `tandem-dirty`, and how the primary picks a
//! tracker for a VM.

pub use tandem_dirty::{
    data_pages, soft_dirty_support, DirtyTracker, PageSet, RamView, ScanTracker, SoftDirtyTracker,
    TrackError,
};

/// Which dirty-page tracker a protection uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrackerChoice {
    /// `soft-dirty` where the kernel has it and nothing writes guest RAM
    /// behind QEMU's page tables; `scan` otherwise.
    #[default]
    Auto,
    Scan,
    SoftDirty,
}

/// A tracker name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tracker {0:?} (expected auto, scan or soft-dirty)")]
pub struct UnknownTracker(pub String);

impl std::str::FromStr for TrackerChoice {
    type Err = UnknownTracker;
    fn from_str(s: &str) -> Result<Self, UnknownTracker> {
        match s {
            "auto" => Ok(TrackerChoice::Auto),
            "scan" => Ok(TrackerChoice::Scan),
            "soft-dirty" => Ok(TrackerChoice::SoftDirty),
            other => Err(UnknownTracker(other.to_string())),
        }
    }
}

/// Soft-dirty tracking was demanded and cannot be had.
#[derive(Debug, thiserror::Error)]
#[error("soft-dirty tracking unavailable: {0}")]
pub struct TrackerUnavailable(String);

impl std::fmt::Display for TrackerChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrackerChoice::Auto => "auto",
            TrackerChoice::Scan => "scan",
            TrackerChoice::SoftDirty => "soft-dirty",
        })
    }
}

/// What the primary knows when it picks a tracker.
pub struct TrackerContext<'a> {
    pub qemu_pid: Option<u32>,
    pub ram_file: &'a std::fs::File,
    pub pages: usize,
    /// Something other than QEMU writes guest RAM (a vhost-user switch port)
    /// and does not report its writes; page-table tracking would miss them.
    pub external_writers: bool,
}

/// Picks and builds the tracker. `Err` only when soft-dirty was demanded
/// and cannot be had; `auto` falls back to `scan` and says why in the
/// returned note.
pub fn choose(
    choice: TrackerChoice,
    ctx: &TrackerContext<'_>,
) -> Result<(Box<dyn DirtyTracker>, String), TrackerUnavailable> {
    let scan = || -> Box<dyn DirtyTracker> { Box::new(ScanTracker::new(ctx.pages, 0)) };
    // The tracker, and how it notices punched pages (an operator should
    // know when it is the slow `ctime` fallback).
    let soft_dirty = || -> Result<(Box<dyn DirtyTracker>, &'static str), String> {
        if ctx.external_writers {
            return Err("a vhost-user NIC writes guest RAM outside QEMU's page tables".into());
        }
        let pid = ctx.qemu_pid.ok_or("QEMU's pid is unknown")?;
        let t = SoftDirtyTracker::new(pid, ctx.ram_file, ctx.pages).map_err(|e| e.to_string())?;
        let punches = t.punch_detection();
        Ok((Box::new(t), punches))
    };
    match choice {
        TrackerChoice::Scan => Ok((scan(), "scan (chosen)".into())),
        TrackerChoice::SoftDirty => soft_dirty()
            .map(|(t, punches)| (t, format!("soft-dirty (chosen; punches seen by {punches})")))
            .map_err(TrackerUnavailable),
        TrackerChoice::Auto => Ok(match soft_dirty() {
            Ok((t, punches)) => (t, format!("soft-dirty (auto; punches seen by {punches})")),
            Err(why) => (
                scan(),
                format!("scan (auto: soft-dirty unavailable: {why})"),
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_choices() {
        for c in ["auto", "scan", "soft-dirty"] {
            assert_eq!(c.parse::<TrackerChoice>().unwrap().to_string(), c);
        }
        assert!("softdirty"
            .parse::<TrackerChoice>()
            .unwrap_err()
            .to_string()
            .contains("expected"));
    }

    #[test]
    fn auto_never_tracks_by_page_tables_past_a_switch_port() {
        let f = tempfile::tempfile().unwrap();
        let ctx = TrackerContext {
            qemu_pid: Some(std::process::id()),
            ram_file: &f,
            pages: 4,
            external_writers: true,
        };
        let (t, note) = choose(TrackerChoice::Auto, &ctx).unwrap();
        assert_eq!(t.name(), "scan");
        assert!(note.contains("vhost-user"), "{note}");
        let err = choose(TrackerChoice::SoftDirty, &ctx).err().unwrap();
        assert!(err.to_string().contains("vhost-user"), "{err}");
    }
}
