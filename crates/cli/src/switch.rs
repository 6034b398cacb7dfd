//! `tandem switch …`: the host's virtual switch — its configuration
//! document, applying a new one, and its statistics.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde::{Deserialize, Serialize};

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

// The bodies of `POST /v1/switch/apply` and `GET /v1/switch/stats`, as
// tandemd sends them (tandem-switch's `host::ApplyReport` and
// `host::SwitchStats`). They are mirrored here field for field, in the same
// order, so that `--json` prints exactly what it printed when the CLI
// linked the switch; a field the switch adds later is kept (`other`) and
// printed after the known ones.

/// What an apply changed.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

/// What `tandem switch stats` shows.
#[derive(Debug, Serialize, Deserialize)]
pub struct SwitchStats {
    pub ports: Vec<PortStats>,
    /// Uplink name → the member interface carrying its traffic.
    pub uplinks_active: BTreeMap<String, Option<String>>,
    pub mac_table: Vec<FdbEntry>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PortStats {
    pub id: u32,
    pub name: String,
    pub kind: String,
    pub port_group: String,
    pub up: bool,
    pub queued: usize,
    pub counters: CounterSnapshot,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub drops: DropSnapshot,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DropSnapshot {
    pub malformed: u64,
    pub bad_descriptor: u64,
    pub queue_full: u64,
    pub vlan: u64,
    pub shaped: u64,
    pub security: u64,
    pub learn_limit: u64,
    pub gate: u64,
    pub no_buffer: u64,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

impl DropSnapshot {
    /// Drops for every reason, by the name `switch stats` prints.
    fn by_reason(&self) -> [(&'static str, u64); 9] {
        [
            ("malformed", self.malformed),
            ("bad-descriptor", self.bad_descriptor),
            ("queue-full", self.queue_full),
            ("vlan", self.vlan),
            ("shaped", self.shaped),
            ("security", self.security),
            ("learn-limit", self.learn_limit),
            ("gate", self.gate),
            ("no-buffer", self.no_buffer),
        ]
    }

    /// Drops for every reason together.
    fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

/// One MAC table entry.
#[derive(Debug, Serialize, Deserialize)]
pub struct FdbEntry {
    pub vlan: u16,
    pub mac: String,
    pub port: u32,
    pub age_s: u64,
    pub pinned: bool,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

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

    #[test]
    fn fields_the_switch_adds_later_are_kept() {
        let body = r#"{"added":["a"],"removed":[],"unchanged":["b"],"warnings":["w"]}"#;
        let r: ApplyReport = serde_json::from_str(body).unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), body);
    }
}
