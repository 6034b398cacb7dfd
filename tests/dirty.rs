//! Dirty-page tracking against real kernels.
//!
//! The soft-dirty tracker needs `CONFIG_MEM_SOFT_DIRTY`, which this host's
//! kernel may lack; the test guest runs Debian's kernel, which has it. So
//! the tracker is checked *inside the guest* (`SOFTDIRTY n`: a child maps a
//! memfd as QEMU maps guest RAM, and a replica updated with only the pages
//! the tracker reports must equal the memfd after every epoch), and on the
//! host tandemd must pick the tracker the host can actually run.

use std::time::Duration;

use tandem_tests::{request, serial_guard, Daemon, Netns, READY};

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn soft_dirty_tracker_misses_no_write_on_a_soft_dirty_kernel() {
    let _serial = serial_guard();
    let ns = Netns::new("sd");
    let d = Daemon::start_in_netns(&ns.name, &[]);
    // User networking: the guest must have slirp's address for the forward.
    let spec = d
        .guest_spec("sd", "")
        .replace("tandem.ip=10.99.0.2/24", "tandem.ip=10.0.2.15/24")
        .replace(
            "backend = \"user\"\n",
            "backend = \"user\"\nhost_forwards = [{ host_port = 17070, guest_port = 7070 }]\n",
        );
    let path = std::env::temp_dir().join(format!("tandem-sd-{}.toml", std::process::id()));
    std::fs::write(&path, spec).expect("write spec");
    d.cli_ok(&["vm", "create", path.to_str().expect("utf8")]);
    let _ = std::fs::remove_file(&path);
    d.cli_ok(&["vm", "start", "sd"]);
    d.wait_console("sd", READY, BOOT);

    let reply = ns.within(|| {
        request("127.0.0.1:17070", "SOFTDIRTY 40", Duration::from_secs(180))
            .map_err(|e| e.to_string())
    });
    let reply = reply.unwrap_or_else(|e| {
        panic!(
            "SOFTDIRTY request failed: {e}\nconsole:\n{}",
            tandem_tests::tail(&d.console("sd"), 30)
        )
    });
    eprintln!("guest: {reply}");
    assert!(
        reply.starts_with("SOFTDIRTY ok "),
        "the tracker failed inside the guest: {reply}"
    );
    // One run on a memfd (punches seen through the file's ctime), one on
    // a tmpfs file (through an inotify watch, as tandemd's RAM files).
    let runs: Vec<&str> = reply
        .trim_start_matches("SOFTDIRTY ok ")
        .split(" | ")
        .collect();
    let kinds: Vec<&str> = runs.iter().map(|r| field_str(r, "punches")).collect();
    assert_eq!(kinds, ["ctime", "inotify"], "{reply}");
    for run in runs {
        let field = |k: &str| -> usize {
            field_str(run, k)
                .parse()
                .unwrap_or_else(|_| panic!("{k}= is not a number in {run}"))
        };
        assert_eq!(field("missed"), 0);
        assert!(
            field("writes") > 100,
            "too little was written to mean anything: {run}"
        );
        // Pages only read, never written, must not be reported: the bit
        // is per write, not per fault.
        assert_eq!(field("extra"), 0, "pages reported that nobody wrote: {run}");
    }
    d.cli_ok(&["vm", "stop", "sd", "--force"]);
}

/// The value of `key=` in a `key=value …` summary.
fn field_str<'a>(summary: &'a str, key: &str) -> &'a str {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {summary}"))
}
