//! Running a command to completion within a time bound: the drill, the
//! cluster steps and the benchmarks all start `tandem` commands that must
//! never hang them.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What a bounded command left.
#[derive(Debug)]
pub struct CmdOut {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    /// Status and output on one line, for an error message.
    pub fn text(&self) -> String {
        format!(
            "{}: {}{}",
            self.status,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// Runs `cmd` to completion within `timeout` (killed after), its output
/// through files in `dir` (a pipe nobody reads could stall it). `stop`
/// is asked every 5 ms: true kills the command at once (an operator's
/// Ctrl-C in a benchmark).
pub fn run_bounded(
    mut cmd: Command,
    dir: &Path,
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<CmdOut> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let (out, err) = (dir.join(format!(".out{n}")), dir.join(format!(".err{n}")));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        let stopped = stop();
        if stopped || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_file(&err);
            if stopped {
                bail!("{cmd:?}: interrupted");
            }
            bail!("{cmd:?}: not done within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&err);
    Ok(CmdOut {
        status,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_run_killed_at_its_bound_or_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut echo = Command::new("sh");
        echo.args(["-c", "echo out; echo err >&2; exit 3"]);
        let o = run_bounded(echo, dir.path(), Duration::from_secs(10), &|| false).unwrap();
        assert_eq!(o.status.code(), Some(3));
        assert_eq!((o.stdout.trim(), o.stderr.trim()), ("out", "err"));

        let t = Instant::now();
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let e = run_bounded(sleep, dir.path(), Duration::from_millis(200), &|| false).unwrap_err();
        assert!(e.to_string().contains("not done within"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));

        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let e = run_bounded(sleep, dir.path(), Duration::from_secs(30), &|| true).unwrap_err();
        assert!(e.to_string().contains("interrupted"), "{e}");
        // Nothing is left behind in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
