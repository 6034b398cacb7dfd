//! Dirty-page tracking, from `tandem-dirty`, and how the primary picks a
//! tracker for a VM.

use std::os::fd::AsRawFd;

pub use tandem_dirty::{
    data_pages, soft_dirty_support, DirtyTracker, PageSet, RamView, ScanTracker, SoftDirtyTracker,
    TrackError, UffdTracker,
};

/// Which dirty-page tracker a protection uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrackerChoice {
    /// `uffd` where QEMU's preload registers guest RAM and its probe
    /// passes, else `soft-dirty` where the kernel has it, else `scan`;
    /// page-table trackers only where nothing writes guest RAM behind
    /// QEMU's page tables unlogged.
    #[default]
    Auto,
    Scan,
    SoftDirty,
    Uffd,
}

/// A tracker name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tracker {0:?} (expected auto, scan, soft-dirty or uffd)")]
pub struct UnknownTracker(pub String);

impl std::str::FromStr for TrackerChoice {
    type Err = UnknownTracker;
    fn from_str(s: &str) -> Result<Self, UnknownTracker> {
        match s {
            "auto" => Ok(TrackerChoice::Auto),
            "scan" => Ok(TrackerChoice::Scan),
            "soft-dirty" => Ok(TrackerChoice::SoftDirty),
            "uffd" => Ok(TrackerChoice::Uffd),
            other => Err(UnknownTracker(other.to_string())),
        }
    }
}

/// The tracker demanded cannot be had.
#[derive(Debug, thiserror::Error)]
#[error("{tracker} tracking unavailable: {why}")]
pub struct TrackerUnavailable {
    pub tracker: TrackerChoice,
    pub why: String,
}

impl std::fmt::Display for TrackerChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrackerChoice::Auto => "auto",
            TrackerChoice::Scan => "scan",
            TrackerChoice::SoftDirty => "soft-dirty",
            TrackerChoice::Uffd => "uffd",
        })
    }
}

/// What the primary knows when it picks a tracker.
pub struct TrackerContext<'a> {
    /// Where QEMU's uffd preload listens (the shim's socket beside the
    /// fence lease). `None`: beside the RAM file.
    pub uffd_socket: Option<std::path::PathBuf>,
    pub qemu_pid: Option<u32>,
    pub ram_file: &'a std::fs::File,
    pub pages: usize,
    /// Something other than QEMU writes guest RAM (a vhost-user switch port)
    /// and does not report its writes; page-table tracking would miss them.
    pub external_writers: bool,
}

/// Where QEMU's uffd preload listens when the context does not say: beside
/// the RAM file (see [`tandem_supervisor::shim::uffd_socket`]; the shim
/// names it after the lease, which sits beside the RAM file unless QEMU
/// runs on a replica's RAM in place).
fn uffd_socket_beside(ram_file: &std::fs::File) -> Result<std::path::PathBuf, String> {
    let path = std::fs::read_link(format!("/proc/self/fd/{}", ram_file.as_raw_fd()))
        .map_err(|e| format!("the RAM file's path: {e}"))?;
    Ok(tandem_supervisor::shim::uffd_socket(&path))
}

const UNLOGGED: &str = "a vhost-user NIC writes guest RAM outside QEMU's page tables";

/// Picks and builds the tracker. `Err` only when a page-table tracker was
/// demanded and cannot be had; `auto` falls back (`uffd`, then
/// `soft-dirty`, then `scan`) and says why in the returned note, which
/// `ft status` shows.
pub fn choose(
    choice: TrackerChoice,
    ctx: &TrackerContext<'_>,
) -> Result<(Box<dyn DirtyTracker>, String), TrackerUnavailable> {
    let scan = || -> Box<dyn DirtyTracker> { Box::new(ScanTracker::new(ctx.pages, 0)) };
    // Each page-table tracker with what `ft status` should say about it
    // (how it registered, how it notices punched pages: an operator should
    // know when it is the slow `ctime` fallback).
    let uffd = || -> Result<(Box<dyn DirtyTracker>, String), String> {
        if ctx.external_writers {
            return Err(UNLOGGED.into());
        }
        let socket = match &ctx.uffd_socket {
            Some(s) => s.clone(),
            None => uffd_socket_beside(ctx.ram_file)?,
        };
        let t = UffdTracker::connect(&socket, ctx.ram_file, ctx.pages).map_err(|e| match e {
            TrackError::Uffd(why) => why.to_string(),
            e => e.to_string(),
        })?;
        let note = format!(
            "{}; punches seen by {}",
            t.registration(),
            t.punch_detection()
        );
        Ok((Box::new(t), note))
    };
    let soft_dirty = || -> Result<(Box<dyn DirtyTracker>, String), String> {
        if ctx.external_writers {
            return Err(UNLOGGED.into());
        }
        let pid = ctx.qemu_pid.ok_or("QEMU's pid is unknown")?;
        let t = SoftDirtyTracker::new(pid, ctx.ram_file, ctx.pages).map_err(|e| e.to_string())?;
        let note = format!("punches seen by {}", t.punch_detection());
        Ok((Box::new(t), note))
    };
    let demanded = |tracker, r: Result<(Box<dyn DirtyTracker>, String), String>| {
        r.map(|(t, note)| (t, format!("{tracker} (chosen; {note})")))
            .map_err(|why| TrackerUnavailable { tracker, why })
    };
    match choice {
        TrackerChoice::Scan => Ok((scan(), "scan (chosen)".into())),
        TrackerChoice::SoftDirty => demanded(TrackerChoice::SoftDirty, soft_dirty()),
        TrackerChoice::Uffd => demanded(TrackerChoice::Uffd, uffd()),
        TrackerChoice::Auto => Ok(match uffd() {
            Ok((t, note)) => (t, format!("uffd (auto; {note})")),
            Err(no_uffd) => match soft_dirty() {
                Ok((t, note)) => (
                    t,
                    format!("soft-dirty (auto; {note}; uffd unavailable: {no_uffd})"),
                ),
                Err(why) => (
                    scan(),
                    format!(
                        "scan (auto: soft-dirty unavailable: {why}; uffd unavailable: {no_uffd})"
                    ),
                ),
            },
        }),
    }
}

/// Whether switch ports must log their writes into guest RAM for a
/// protection with `choice`: for any tracker that reads page tables (so
/// for all but `scan`, which reads content and sees every write).
pub fn needs_write_log(choice: TrackerChoice) -> bool {
    choice != TrackerChoice::Scan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_choices() {
        for c in ["auto", "scan", "soft-dirty", "uffd"] {
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
            uffd_socket: None,
            qemu_pid: Some(std::process::id()),
            ram_file: &f,
            pages: 4,
            external_writers: true,
        };
        let (t, note) = choose(TrackerChoice::Auto, &ctx).unwrap();
        assert_eq!(t.name(), "scan");
        assert!(note.contains("vhost-user"), "{note}");
        for demanded in [TrackerChoice::SoftDirty, TrackerChoice::Uffd] {
            let err = choose(demanded, &ctx).err().unwrap();
            assert!(err.to_string().contains("vhost-user"), "{err}");
            assert!(err.to_string().starts_with(&demanded.to_string()), "{err}");
        }
    }

    /// Without a preload listening beside the RAM file, `auto` says so and
    /// goes on; demanding `uffd` is refused with the same reason.
    #[test]
    fn auto_says_why_uffd_was_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.ram");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(4 * 4096).unwrap();
        let ctx = TrackerContext {
            uffd_socket: None,
            qemu_pid: None,
            ram_file: &f,
            pages: 4,
            external_writers: false,
        };
        let (t, note) = choose(TrackerChoice::Auto, &ctx).unwrap();
        assert_eq!(t.name(), "scan");
        assert!(
            note.starts_with("scan (auto: soft-dirty unavailable: QEMU's pid is unknown; uffd unavailable: QEMU was started without tandem's uffd preload"),
            "{note}"
        );
        assert!(note.contains("vm.uffd"), "{note}");
        let err = choose(TrackerChoice::Uffd, &ctx).err().unwrap();
        assert!(
            err.to_string()
                .starts_with("uffd tracking unavailable: QEMU was started without"),
            "{err}"
        );
        // A socket the context names is the one asked (QEMU on a
        // replica's RAM in place: the shim's socket is beside the lease).
        let ctx = TrackerContext {
            uffd_socket: Some(dir.path().join("elsewhere.uffd")),
            ..ctx
        };
        let err = choose(TrackerChoice::Uffd, &ctx).err().unwrap();
        assert!(err.to_string().contains("elsewhere.uffd"), "{err}");
    }

    #[test]
    fn switch_ports_log_for_every_page_table_tracker() {
        assert!(!needs_write_log(TrackerChoice::Scan));
        for c in [
            TrackerChoice::Auto,
            TrackerChoice::SoftDirty,
            TrackerChoice::Uffd,
        ] {
            assert!(needs_write_log(c));
        }
    }
}
