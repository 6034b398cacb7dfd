//! `tandem dvs …`: the distributed switch, through the manager (see
//! docs/cluster.md, "Distributed switch").
//!
//! `apply` and `rollback` wait for the rollout to end and print each
//! host's result. Exit status: 0 completed; 7 not completed (rolled back,
//! or hosts out of sync: `dvs show` says which); 8 the document is invalid
//! (every problem printed with its field path); the other cluster codes
//! as usual (6: the manager is unreachable).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use tandem_dvs::RolloutOutcome;
use tandem_manager::api::{
    DvsApplyReport, DvsApplyRequest, DvsRevision, DvsRollbackRequest, DvsView,
};
use tandem_manager::client::ClientError;
use tandem_manager::clock::rfc3339;

use crate::cluster::ManagerOpts;
use crate::print_json;

/// A change that did not complete on every host (exit 7).
#[derive(Debug, thiserror::Error)]
#[error("revision {revision} {outcome}: the distributed switch stays at revision {current}")]
pub struct NotSynchronized {
    pub revision: u64,
    pub outcome: &'static str,
    pub current: u64,
}

/// How to reach the manager: as every cluster command, but `--timeout` is
/// the transaction's here, so the request's own bound is derived from it.
#[derive(Args, Debug, Clone)]
pub struct DvsManagerOpts {
    /// The manager, HOST:PORT (default: manager.json beside the identity).
    #[arg(long, env = "TANDEM_MANAGER")]
    manager: Option<String>,
    /// The manager's certificate name (default: manager.json's).
    #[arg(long, env = "TANDEM_MANAGER_NAME")]
    manager_name: Option<String>,
    /// The operator identity directory (identity.pem, manager.json).
    #[arg(long, env = "TANDEM_IDENTITY", default_value_t = format!("{}/operator", tandem_manager::state::DEFAULT_STATE_DIR))]
    identity: String,
}

impl DvsManagerOpts {
    pub(crate) fn opts(&self, request_timeout: Duration) -> ManagerOpts {
        ManagerOpts {
            manager: self.manager.clone(),
            manager_name: self.manager_name.clone(),
            identity: self.identity.clone(),
            timeout: request_timeout,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DvsCmd {
    /// The current revision and each host's state: the revision it runs,
    /// its digest, in-sync / pending / out-of-sync / resynced / failed.
    Show {
        #[command(flatten)]
        m: DvsManagerOpts,
    },
    /// Roll a document out to its hosts: a canary first, then the rest at
    /// once; at the first host that does not commit, the hosts that did
    /// are reverted. Waits for the end.
    Apply {
        /// The distributed switch document (TOML).
        file: PathBuf,
        /// Each host's transaction timeout in seconds (5..=60): a host that
        /// hears no commit by then restores its previous configuration.
        #[arg(long, default_value_t = tandem_api::TXN_TIMEOUT_DEFAULT_S)]
        timeout: u32,
        /// The host that goes first, alone (default: the first host of the
        /// document whose configuration changes).
        #[arg(long)]
        canary: Option<String>,
        #[command(flatten)]
        m: DvsManagerOpts,
    },
    /// Every revision: who applied it, when, how it ended.
    History {
        #[command(flatten)]
        m: DvsManagerOpts,
    },
    /// Apply an earlier revision's document again, as a new revision.
    Rollback {
        revision: u64,
        #[arg(long, default_value_t = tandem_api::TXN_TIMEOUT_DEFAULT_S)]
        timeout: u32,
        #[arg(long)]
        canary: Option<String>,
        #[command(flatten)]
        m: DvsManagerOpts,
    },
}

/// A rollout takes at most the canary's transaction, the wave's and the
/// reverts', each bounded by the timeout; plus slack for the manager.
fn rollout_bound(timeout_s: u32) -> Duration {
    Duration::from_secs(u64::from(timeout_s) * 3 + 30)
}

pub async fn run(cmd: DvsCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        DvsCmd::Show { m } => {
            let v: DvsView = m
                .opts(Duration::from_secs(30))
                .client()?
                .get("/v1/dvs")
                .await?;
            if json {
                return print_json(&v);
            }
            print_view(&v);
            Ok(())
        }
        DvsCmd::Apply {
            file,
            timeout,
            canary,
            m,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let req = DvsApplyRequest {
                document_toml: text,
                timeout_s: Some(timeout),
                canary,
            };
            let r = m
                .opts(rollout_bound(timeout))
                .client()?
                .post("/v1/dvs/apply", &req)
                .await
                .map_err(with_fields)?;
            report(r, json)
        }
        DvsCmd::History { m } => {
            let h: Vec<DvsRevision> = m
                .opts(Duration::from_secs(30))
                .client()?
                .get("/v1/dvs/history")
                .await?;
            if json {
                return print_json(&h);
            }
            println!(
                "{:>8}  {:<20}  {:<16}  {:<18}  HOSTS",
                "REVISION", "AT", "AUTHOR", "OUTCOME"
            );
            for r in h {
                let committed = r.hosts.iter().filter(|x| x.result == "committed").count();
                let note = r
                    .rollback_of
                    .map(|o| format!("  (rollback to {o})"))
                    .unwrap_or_default();
                println!(
                    "{:>8}  {:<20}  {:<16}  {:<18}  {committed}/{} committed{note}",
                    r.revision,
                    rfc3339(r.at),
                    r.author,
                    r.outcome,
                    r.hosts.len()
                );
            }
            Ok(())
        }
        DvsCmd::Rollback {
            revision,
            timeout,
            canary,
            m,
        } => {
            let req = DvsRollbackRequest {
                revision,
                timeout_s: Some(timeout),
                canary,
            };
            let r = m
                .opts(rollout_bound(timeout))
                .client()?
                .post("/v1/dvs/rollback", &req)
                .await
                .map_err(with_fields)?;
            report(r, json)
        }
    }
}

/// An invalid document's problems, one a line, under the message.
fn with_fields(e: ClientError) -> anyhow::Error {
    let lines: Vec<String> = match &e {
        ClientError::Server { fields, .. } => fields
            .iter()
            .map(|f| format!("  {}: {}", f.field, f.message))
            .collect(),
        _ => Vec::new(),
    };
    if lines.is_empty() {
        anyhow::Error::new(e)
    } else {
        let summary = format!("the document is invalid:\n{}", lines.join("\n"));
        anyhow::Error::new(e).context(summary)
    }
}

fn report(r: DvsApplyReport, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(&r)?;
    } else {
        println!(
            "revision {}: {} in {} ms (current revision {})",
            r.revision,
            r.outcome.word(),
            r.elapsed_ms,
            r.current_revision
        );
        println!(
            "{:<16}  {:<9}  {:<12}  {:<18}  {:<12}  DETAIL",
            "HOST", "ROLE", "RESULT", "REVERT", "STATE"
        );
        for h in &r.hosts {
            let detail = [h.detail.as_deref(), h.revert_detail.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ");
            println!(
                "{:<16}  {:<9}  {:<12}  {:<18}  {:<12}  {}",
                h.host,
                h.role,
                h.result,
                h.revert.as_deref().unwrap_or("-"),
                h.state,
                detail
            );
        }
    }
    if r.outcome == RolloutOutcome::Completed {
        Ok(())
    } else {
        Err(NotSynchronized {
            revision: r.revision,
            outcome: r.outcome.word(),
            current: r.current_revision,
        }
        .into())
    }
}

fn print_view(v: &DvsView) {
    if v.revision == 0 {
        println!("revision:     none yet (tandem dvs apply FILE)");
    } else {
        println!(
            "revision:     {} by {} at {}",
            v.revision,
            v.updated_by.as_deref().unwrap_or("?"),
            v.updated_at.map(rfc3339).unwrap_or_else(|| "?".into())
        );
    }
    if let Some(p) = v.rollout_in_progress {
        println!("rolling out:  revision {p}");
    }
    println!(
        "{:<16}  {:<12}  {:>8}  {:<7}  {:<14}  {:<20}  DETAIL",
        "HOST", "STATE", "REVISION", "CURRENT", "DIGEST", "SINCE"
    );
    for h in &v.hosts {
        let revision = match (h.state.as_str(), h.revision) {
            ("out-of-sync", _) => "?".to_string(),
            (_, Some(r)) => r.to_string(),
            (_, None) => "unknown".to_string(),
        };
        let current = if !h.in_document {
            "not in"
        } else if h.matches_current {
            "yes"
        } else {
            "no"
        };
        println!(
            "{:<16}  {:<12}  {:>8}  {:<7}  {:<14}  {:<20}  {}",
            h.host,
            h.state,
            revision,
            current,
            h.digest
                .as_deref()
                .map(|d| d.get(..12).unwrap_or(d))
                .unwrap_or("-"),
            rfc3339(h.since),
            h.detail.as_deref().unwrap_or("")
        );
    }
}
