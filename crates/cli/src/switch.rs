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
    let document_toml = if document.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(document)
            .with_context(|| format!("reading {}", document.display()))?
    };
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
          "no_buffer": 0
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
  ]
}"#;

    #[test]
    fn stats_json_is_printed_as_tandemd_sent_it() {
        let st: SwitchStats = serde_json::from_str(STATS).unwrap();
        assert_eq!(serde_json::to_string_pretty(&st).unwrap(), STATS);
        assert_eq!(st.ports[0].counters.drops.total(), 3);
    }
}
