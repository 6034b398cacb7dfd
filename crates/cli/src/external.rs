//! External commands, git-style: `tandem drill …` and `tandem bench …` are
//! `tandem-lab drill …` and `tandem-lab bench …`. The lab (the drill, the
//! benchmarks and everything they link: the switch, output commit) is a
//! binary of its own, so the operator CLI stays small.
//!
//! `tandem-lab` is looked for next to the running `tandem` first, then on
//! `PATH`. On Unix this process is replaced by it (`exec`), so its exit
//! status and signals are the command's own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The lab's binary.
const LAB: &str = "tandem-lab";

/// Everything after `tandem drill` / `tandem bench`, for the lab to parse
/// (`--help` included).
#[derive(clap::Args, Debug)]
pub struct ExternalArgs {
    /// Passed to tandem-lab as they are (`--help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

/// Runs `tandem-lab [--json] <sub> ARGS…`. On Unix it returns only if the
/// lab could not be started.
pub fn run(sub: &str, args: ExternalArgs, json: bool) -> anyhow::Result<()> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let Some(lab) = find_lab(beside.as_deref(), std::env::var_os("PATH").as_deref()) else {
        bail!(
            "`tandem {sub}` is run by {LAB}, which is not installed next to tandem ({}) nor on PATH; build it with `cargo build -p {LAB}` (`--release` for target/release), or install it next to tandem",
            beside
                .as_deref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "the directory of this executable is unknown".into())
        );
    };
    let mut cmd = Command::new(&lab);
    if json {
        // `--json` before the subcommand was taken by tandem's own parser.
        cmd.arg("--json");
    }
    cmd.arg(sub).args(&args.args);
    exec(cmd, &lab)
}

#[cfg(unix)]
fn exec(mut cmd: Command, lab: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    // The lab's usage and help then read `tandem drill …`, as typed.
    let err = cmd.arg0("tandem").exec();
    Err(err).with_context(|| format!("running {}", lab.display()))
}

#[cfg(not(unix))]
fn exec(mut cmd: Command, lab: &Path) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {}", lab.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// `tandem-lab` in `beside` (the running executable's directory), else the
/// first one on `path`.
fn find_lab(beside: Option<&Path>, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let on_path = path.into_iter().flat_map(std::env::split_paths);
    beside
        .map(Path::to_path_buf)
        .into_iter()
        .chain(on_path)
        .map(|dir| dir.join(LAB))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_in(dir: &Path) -> PathBuf {
        let p = dir.join(LAB);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        p
    }

    #[test]
    fn the_lab_next_to_tandem_wins_over_path() {
        let beside = tempfile::tempdir().unwrap();
        let on_path = tempfile::tempdir().unwrap();
        let want = lab_in(beside.path());
        lab_in(on_path.path());
        let path = std::env::join_paths([on_path.path()]).unwrap();
        assert_eq!(find_lab(Some(beside.path()), Some(&path)), Some(want));
    }

    #[test]
    fn path_is_searched_in_order_when_nothing_is_beside() {
        let beside = tempfile::tempdir().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let want = lab_in(first.path());
        lab_in(second.path());
        let path = std::env::join_paths([empty.path(), first.path(), second.path()]).unwrap();
        assert_eq!(find_lab(Some(beside.path()), Some(&path)), Some(want));
        assert_eq!(find_lab(None, Some(&path)), Some(first.path().join(LAB)));
    }

    #[test]
    fn nothing_found_is_none() {
        let beside = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([beside.path()]).unwrap();
        assert_eq!(find_lab(Some(beside.path()), Some(&path)), None);
        assert_eq!(find_lab(None, None), None);
    }

    /// `tandem ARGV…` as parsed: `--json` taken by tandem, and what the
    /// lab is given.
    fn passed_on(argv: &[&str]) -> (bool, Vec<String>) {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from(argv).unwrap();
        let (crate::Cmd::Bench(a) | crate::Cmd::Drill(a)) = cli.cmd else {
            panic!("not an external command: {argv:?}");
        };
        let args = a.args.iter().map(|s| s.to_string_lossy().into()).collect();
        (cli.json, args)
    }

    #[test]
    fn everything_after_the_command_goes_to_the_lab() {
        assert_eq!(
            passed_on(&["tandem", "drill", "--help"]),
            (false, vec!["--help".into()])
        );
        assert_eq!(
            passed_on(&["tandem", "bench", "output", "--epoch-ms", "25", "--json"]),
            (
                false,
                ["output", "--epoch-ms", "25", "--json"]
                    .map(String::from)
                    .to_vec()
            )
        );
        assert_eq!(
            passed_on(&["tandem", "drill", "--rounds", "1", "--unsafe-no-clamp"]),
            (
                false,
                ["--rounds", "1", "--unsafe-no-clamp"]
                    .map(String::from)
                    .to_vec()
            )
        );
    }

    #[test]
    fn json_taken_by_tandem_is_passed_on() {
        assert_eq!(
            passed_on(&["tandem", "--json", "bench", "output"]),
            (true, vec!["output".into()])
        );
        assert_eq!(
            passed_on(&["tandem", "drill", "--json", "--rounds", "1"]),
            (true, ["--rounds", "1"].map(String::from).to_vec())
        );
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        crate::Cli::command().debug_assert();
    }

    #[cfg(unix)]
    #[test]
    fn a_file_that_is_not_executable_is_skipped() {
        let beside = tempfile::tempdir().unwrap();
        std::fs::write(beside.path().join(LAB), "not a program").unwrap();
        assert_eq!(find_lab(Some(beside.path()), None), None);
    }
}
