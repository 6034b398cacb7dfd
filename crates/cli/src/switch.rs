//! `tandem switch …`: the host's virtual switch — its configuration
//! document, applying a new one, and its statistics.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::print_json;

#[derive(Subcommand, Debug)]
pub enum SwitchCmd {
    /// The switch's configuration document (TOML).
    Show,
    /// Replace the whole configuration with a document (`-`: standard
    /// input). It is validated completely first; an invalid document, or a
    /// port that cannot be created, changes nothing.
    Apply { document: PathBuf },
    /// Apply a document provisionally: unless `tandem switch confirm TXID`
    /// follows within the timeout, the host restores its configuration
    /// from before by itself (for a change that may cut you off). On a
    /// host a manager manages, this is the only local change allowed.
    Try {
        document: PathBuf,
        /// Seconds to confirm in (5 to 60).
        #[arg(long, default_value_t = tandem_api::TXN_TIMEOUT_DEFAULT_S)]
        timeout: u32,
    },
    /// Confirm a provisional change (`tandem switch try`).
    Confirm { txid: String },
    /// The pending transaction, the last one that ended, any alarm.
    Txn,
    /// Ports, their counters and drops by reason, uplink members, MAC table.
    Stats,
}

use tandem_api::{ApplyReport, SwitchStats};

pub async fn run(client: &tandem_api::Client, cmd: SwitchCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        SwitchCmd::Show => {
            let d: tandem_api::SwitchDocumentBody = client.get("/v1/switch").await?;
            if json {
                return print_json(&d);
            }
            print!("{}", d.document_toml);
            Ok(())
        }
        SwitchCmd::Apply { document } => apply(client, &document, json).await,
        SwitchCmd::Try { document, timeout } => {
            let document_toml = read_document(&document)?;
            let txid = format!(
                "local-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            );
            let r: tandem_api::SwitchTxnApplied = client
                .post(
                    "/v1/switch/txn",
                    &tandem_api::SwitchTxnRequest {
                        txid,
                        document_toml,
                        timeout_s: Some(timeout),
                    },
                )
                .await?;
            if json {
                return print_json(&r);
            }
            println!(
                "applied provisionally as {txid}; it rolls back in {s} s unless confirmed:\n  tandem switch confirm {txid}",
                txid = r.txid,
                s = r.deadline_in_ms.div_ceil(1000)
            );
            Ok(())
        }
        SwitchCmd::Confirm { txid } => {
            let r: tandem_api::SwitchCommitted = client
                .post(
                    "/v1/switch/commit",
                    &tandem_api::SwitchCommitRequest { txid },
                )
                .await?;
            if json {
                return print_json(&r);
            }
            println!(
                "committed {} (configuration {})",
                r.txid,
                &r.digest[..12.min(r.digest.len())]
            );
            Ok(())
        }
        SwitchCmd::Txn => {
            let st: tandem_api::SwitchTxnStatus = client.get("/v1/switch/txn").await?;
            if json {
                return print_json(&st);
            }
            println!("running configuration {}", st.running_digest);
            match &st.pending {
                Some(p) => println!(
                    "pending: {} ({:?}), rolls back in {} ms to {}",
                    p.txid, p.origin, p.deadline_in_ms, p.saved_digest
                ),
                None => println!("pending: none"),
            }
            if let Some(l) = &st.last {
                println!(
                    "last: {} {:?}{}",
                    l.txid,
                    l.outcome,
                    l.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
            }
            if let Some(a) = &st.alarm {
                println!("ALARM: {a}");
            }
            Ok(())
        }
        SwitchCmd::Stats => {
            let st: SwitchStats = client.get("/v1/switch/stats").await?;
            if json {
                return print_json(&st);
            }
            print_switch_stats(&st);
            Ok(())
        }
    }
}

async fn apply(
    client: &tandem_api::Client,
    document: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    let document_toml = read_document(document)?;
    let r: ApplyReport = client
        .post(
            "/v1/switch/apply",
            &tandem_api::SwitchDocumentBody { document_toml },
        )
        .await?;
    if json {
        return print_json(&r);
    }
    println!(
        "applied: {} port(s) added, {} removed, {} unchanged",
        r.added.len(),
        r.removed.len(),
        r.unchanged.len()
    );
    for n in &r.added {
        println!("  + {n}");
    }
    for n in &r.removed {
        println!("  - {n}");
    }
    Ok(())
}

fn read_document(document: &std::path::Path) -> anyhow::Result<String> {
    if document.as_os_str() == "-" {
        Ok(std::io::read_to_string(std::io::stdin())?)
    } else {
        std::fs::read_to_string(document).with_context(|| format!("reading {}", document.display()))
    }
}

fn print_switch_stats(st: &SwitchStats) {
    println!(
        "{:<20} {:<14} {:<12} {:<4} {:>10} {:>12} {:>10} {:>12} {:>8}",
        "PORT", "KIND", "GROUP", "UP", "RX FRAMES", "RX BYTES", "TX FRAMES", "TX BYTES", "DROPS"
    );
    for p in &st.ports {
        let d = &p.counters.drops;
        let drops = d.total();
        println!(
            "{:<20} {:<14} {:<12} {:<4} {:>10} {:>12} {:>10} {:>12} {:>8}",
            p.name,
            p.kind,
            p.port_group,
            if p.up { "yes" } else { "no" },
            p.counters.rx_frames,
            p.counters.rx_bytes,
            p.counters.tx_frames,
            p.counters.tx_bytes,
            drops
        );
        if drops > 0 {
            let line: Vec<String> = d
                .by_reason()
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            println!("{:<20} drops: {}", "", line.join(" "));
        }
    }
    for (u, active) in &st.uplinks_active {
        println!(
            "uplink {u}: active member {}",
            active.as_deref().unwrap_or("none (no member has carrier)")
        );
    }
    for n in &st.uplink_neighbours {
        match &n.neighbour {
            Some(nb) => println!(
                "uplink {} member {}: LLDP neighbour {nb} (heard {} ms ago)",
                n.uplink,
                n.member,
                n.age_ms.unwrap_or(0)
            ),
            None if n.lldp_frames > 0 => println!(
                "uplink {} member {}: no LLDP neighbour now ({} frames, {} invalid)",
                n.uplink, n.member, n.lldp_frames, n.lldp_errors
            ),
            None => {}
        }
    }
    println!("MAC table: {} entries", st.mac_table.len());
    for e in &st.mac_table {
        println!(
            "  vlan {:<5} {} port {:<4} age {:>4}s{}",
            e.vlan,
            e.mac,
            e.port,
            e.age_s,
            if e.pinned { " (VM)" } else { "" }
        );
    }
    let sn = &st.snooping;
    if !sn.bindings.is_empty() {
        println!("DHCP bindings: {}", sn.bindings.len());
        for b in &sn.bindings {
            println!(
                "  vlan {:<5} {} {:<15} port {:<4} lease {}",
                b.vlan,
                b.mac,
                b.ip,
                b.port,
                b.lease_remaining_s
                    .map_or("infinite".to_string(), |s| format!("{s}s left"))
            );
        }
    }
    if !sn.groups.is_empty() {
        println!("IGMP groups: {}", sn.groups.len());
        for g in &sn.groups {
            let ports: Vec<String> = g.ports.iter().map(|p| p.to_string()).collect();
            println!(
                "  vlan {:<5} {:<15} ports {}",
                g.vlan,
                g.group,
                ports.join(",")
            );
        }
    }
    for a in &sn.associations {
        if a.migrated {
            println!(
                "port {}: migrated here{}{}",
                a.port,
                if a.associated {
                    ", associated"
                } else {
                    ", pre-associated"
                },
                if a.guard_open {
                    ", source guard open until its lease is known"
                } else {
                    ""
                }
            );
        }
    }
    for e in sn.log.iter().rev().take(10).rev() {
        println!("  snoop: {} {}", e.port, e.event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /v1/switch/stats` as tandemd serialises it.
    const STATS: &str = r#"{
  "ports": [
    {
      "id": 1,
      "name": "vm1.eth0",
      "kind": "vm",
      "port_group": "web",
      "up": true,
      "queued": 0,
      "counters": {
        "rx_frames": 10,
        "rx_bytes": 1000,
        "tx_frames": 12,
        "tx_bytes": 1400,
        "drops": {
          "malformed": 0,
          "bad_descriptor": 0,
          "queue_full": 2,
          "vlan": 0,
          "shaped": 0,
          "security": 0,
          "learn_limit": 0,
          "gate": 1,
          "no_buffer": 0,
          "blocked": 0,
          "mtu": 0,
          "dhcp_server": 0,
          "source_guard": 0
        }
      }
    }
  ],
  "uplinks_active": {
    "fabric": "eth1",
    "spare": null
  },
  "mac_table": [
    {
      "vlan": 10,
      "mac": "52:54:00:10:00:01",
      "port": 1,
      "age_s": 3,
      "pinned": true
    }
  ],
  "snooping": {
    "bindings": [],
    "groups": [],
    "associations": [],
    "counters": {
      "bindings_learned": 0,
      "bindings_handed_over": 0,
      "bindings_from_lease_query": 0,
      "bindings_removed": 0,
      "binding_table_full": 0,
      "dhcp_server_dropped": 0,
      "source_guard_dropped": 0,
      "igmp_reports": 0,
      "igmp_queries_heard": 0,
      "igmp_queries_sent": 0,
      "triggered_queries": 0,
      "lease_refreshes_asked": 0,
      "leases_unknown": 0,
      "switchover_forwarded": 0,
      "switchover_delivered": 0,
      "associations": 0,
      "migrated_associations": 0,
      "de_associations": 0
    },
    "log": []
  }
}"#;

    #[test]
    fn stats_json_is_printed_as_tandemd_sent_it() {
        let st: SwitchStats = serde_json::from_str(STATS).unwrap();
        assert_eq!(serde_json::to_string_pretty(&st).unwrap(), STATS);
        assert_eq!(st.ports[0].counters.drops.total(), 3);
    }

    #[test]
    fn stats_from_a_tandemd_before_snooping_still_parse() {
        let mut old: serde_json::Value = serde_json::from_str(STATS).unwrap();
        old.as_object_mut().unwrap().remove("snooping");
        let drops = &mut old["ports"][0]["counters"]["drops"];
        drops.as_object_mut().unwrap().remove("dhcp_server");
        drops.as_object_mut().unwrap().remove("source_guard");
        let st: SwitchStats = serde_json::from_value(old).unwrap();
        assert!(st.snooping.bindings.is_empty());
        assert_eq!(st.ports[0].counters.drops.total(), 3);
    }
}
