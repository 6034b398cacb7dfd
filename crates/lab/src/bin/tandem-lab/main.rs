//! `tandem-lab`: the failover drill and the benchmarks on this machine.
//!
//! The operator CLI runs it for `tandem drill …` and `tandem bench …`
//! (git-style: it execs this binary with the same arguments), so the
//! options, output and exit codes here are those of `tandem drill` and
//! `tandem bench <kind>`. Human-readable output by default; `--json`
//! prints the results as JSON. Exit status is non-zero on any error and
//! on a drill round that violated an invariant.

mod bench;
mod drill;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "tandem-lab",
    version,
    about = "tandem's lab: the failover drill and the benchmarks (also run as `tandem drill` and `tandem bench`)"
)]
struct Cli {
    // Declared before `json` as in tandem's own parser, so options list
    // in the order `tandem bench … --help` has always shown.
    /// Accepted (and ignored) so that `tandem … --socket PATH bench …`
    /// keeps working: the lab starts tandemds of its own.
    #[arg(long, global = true, hide = true)]
    socket: Option<PathBuf>,
    /// Print JSON instead of human-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Benchmarks (timing lives here, not in tests).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// The failover drill on this machine: two hosts in network namespaces,
    /// a protected guest under a durable client workload, a random kill,
    /// and the invariants checked. Needs root. Exits non-zero on a violation.
    Drill(drill::DrillArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Bench(cmd) => bench::run(cmd, cli.json),
        Cmd::Drill(args) => drill::run(args, cli.json),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The tandemd installed next to this binary (and so next to `tandem`).
fn tandemd_beside_lab() -> anyhow::Result<PathBuf> {
    std::env::current_exe()?
        .parent()
        .map(|d| d.join("tandemd"))
        .context("locating tandemd")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn json_and_socket_are_accepted_before_and_after_the_command() {
        for argv in [
            &["tandem", "--json", "bench", "output"][..],
            &["tandem", "bench", "output", "--json", "--socket", "/x"],
            &[
                "tandem", "--socket", "/x", "drill", "--rounds", "1", "--json",
            ],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            assert!(cli.json, "{argv:?}");
        }
    }
}
