//! `tandem bench switch`: tandem's vhost-user switch against QEMU's tap
//! networking on a Linux bridge (the usual KVM set-up), side by side in one
//! run on the same host, with the same guests.
//!
//! One namespace holds a tandemd (its switch with a host port) and a Linux
//! bridge with two taps. Two guests boot on the switch, are measured and
//! destroyed; then two guests on the bridge; and the pairs alternate for
//! `rounds`, so drift in the machine affects both sides alike. Measured:
//! host ↔ guest request/response on a persistent connection (PING/PONG),
//! and guest → guest TCP bulk throughput (BLAST into the guest's discard
//! service). There is no vhost-net in this kernel, so the tap side is
//! QEMU's userspace virtio-net: that is the comparison an operator here has.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use crate::bench::round_trips;
use crate::topology::{delete_netns, in_ns, ip, spawn_in_ns};
use crate::{block_on, exchange_at, stats_ms, wait_for, DrillOptions, Host};

const HOST_SW: &str = "10.66.1.1";
const HOST_BR: &str = "10.66.0.1";

#[derive(Debug, Clone, Serialize)]
pub struct SwitchBenchRow {
    pub path: String,
    pub rr_p50_ms: f64,
    pub rr_p99_ms: f64,
    pub bulk_mbit_s_median: f64,
    pub bulk_runs: usize,
}

/// The bench's namespace; processes in it are killed and it is deleted on
/// every exit path.
struct BenchNs(String);

impl Drop for BenchNs {
    fn drop(&mut self) {
        delete_netns(&self.0);
    }
}

fn guest_spec(
    opts: &DrillOptions,
    work: &std::path::Path,
    name: &str,
    ip: &str,
    mac: &str,
    nic: &str,
) -> anyhow::Result<String> {
    let disk = work.join(format!("{name}-data.qcow2"));
    std::fs::copy(opts.image_dir.join("data.qcow2"), &disk)?;
    Ok(format!(
        r#"name = "{name}"
memory_mib = {mem}
accelerator = "tcg"
shutdown_timeout_s = 5
[boot]
kernel = "{k}"
initrd = "{i}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip={ip}/24"
[[disks]]
name = "data"
path = "{d}"
[[nics]]
name = "eth0"
mac = "{mac}"
{nic}
"#,
        mem = opts.memory_mib,
        k = opts.image_dir.join("vmlinux").display(),
        i = opts.image_dir.join("initrd.img").display(),
        d = disk.display(),
    ))
}

fn boot(host: &Host, spec: String, name: &str) -> anyhow::Result<()> {
    let api = host.api();
    let _: tandem_api::VmInfo = block_on(api.post(
        "/v1/vms",
        &tandem_api::CreateVmRequest {
            spec_toml: spec,
            uuid: None,
        },
    ))?;
    let _: tandem_api::VmInfo = block_on(api.post(&format!("/v1/vms/{name}/start"), &()))?;
    wait_for("guest ready", Duration::from_secs(120), || {
        let c: tandem_api::ConsoleChunk =
            block_on(api.get(&format!("/v1/vms/{name}/console?offset=0"))).ok()?;
        c.data.contains("TANDEM-GUEST-READY").then_some(())
    })
}

fn destroy(host: &Host, name: &str) {
    let _ = block_on(
        host.api()
            .delete::<serde_json::Value>(&format!("/v1/vms/{name}")),
    );
}

/// One line to a guest's service from the namespace, with a bound.
fn ask(ns: &str, addr: String, line: String, timeout: Duration) -> anyhow::Result<String> {
    spawn_in_ns(ns, move || exchange_at(&addr, &line, timeout))?
        .join()
        .map_err(|_| anyhow!("request thread panicked"))??
}

/// Measures one pair of guests `a` → `b` reached from the namespace.
fn measure(
    ns: &str,
    a: &str,
    b: &str,
    requests: usize,
    bulk_ms: u64,
) -> anyhow::Result<(Vec<f64>, f64)> {
    // Warm-up: TCG's translation cache and ARP on every path.
    let _ = round_trips(ns, a, "PING", 20)?;
    let _ = ask(
        ns,
        format!("{a}:7070"),
        format!("BLAST {b}:7072 300"),
        Duration::from_secs(20),
    )?;
    let rtt = round_trips(ns, a, "PING", requests)?;
    let reply = ask(
        ns,
        format!("{a}:7070"),
        format!("BLAST {b}:7072 {bulk_ms}"),
        Duration::from_millis(bulk_ms + 20_000),
    )?;
    let mut it = reply.split_whitespace();
    let (Some("BLASTED"), Some(bytes), Some(ms)) = (it.next(), it.next(), it.next()) else {
        bail!("guest {a} answered {reply:?} to BLAST");
    };
    let bytes: f64 = bytes.parse().context("BLASTED bytes")?;
    let ms: f64 = ms.parse().context("BLASTED ms")?;
    Ok((rtt, bytes * 8.0 / (ms / 1e3) / 1e6))
}

pub fn switch_vs_bridge(
    opts: &DrillOptions,
    rounds: usize,
    requests: usize,
    bulk_ms: u64,
    mut say: impl FnMut(&str),
) -> anyhow::Result<Vec<SwitchBenchRow>> {
    let tag = std::process::id() % 100_000;
    let ns = BenchNs(format!("tsbench-{tag}"));
    ip(&["netns", "add", &ns.0])?;
    let ns_name = ns.0.clone();
    in_ns(&ns_name, &["link", "set", "lo", "up"])?;
    in_ns(&ns_name, &["link", "add", "br0", "type", "bridge"])?;
    in_ns(
        &ns_name,
        &["link", "set", "br0", "type", "bridge", "forward_delay", "0"],
    )?;
    in_ns(
        &ns_name,
        &["addr", "add", &format!("{HOST_BR}/24"), "dev", "br0"],
    )?;
    in_ns(&ns_name, &["link", "set", "br0", "up"])?;
    for t in ["tbg1", "tbg2"] {
        in_ns(&ns_name, &["tuntap", "add", "dev", t, "mode", "tap"])?;
        in_ns(&ns_name, &["link", "set", t, "master", "br0", "up"])?;
    }
    let work = opts.work_dir.join(format!("tsbench-{tag}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let doc = "[[port_group]]\nname = \"vms\"\n\n[[host_port]]\nname = \"host\"\ntap = \"tdmh0\"\nport_group = \"vms\"\n";
    let host = Host::start_with_switch("h", &ns_name, doc, opts, &work, &[])?;
    in_ns(
        &ns_name,
        &["addr", "add", &format!("{HOST_SW}/24"), "dev", "tdmh0"],
    )?;
    in_ns(&ns_name, &["link", "set", "tdmh0", "up"])?;

    let mut sw_rtt = Vec::new();
    let mut br_rtt = Vec::new();
    let mut sw_bulk = Vec::new();
    let mut br_bulk = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for r in 1..=rounds {
            say(&format!(
                "round {r}/{rounds}: two guests on tandem's switch"
            ));
            boot(
                &host,
                guest_spec(
                    opts,
                    &work,
                    "sw1",
                    "10.66.1.11",
                    "52:54:00:66:01:11",
                    "backend = \"switch\"\nport_group = \"vms\"",
                )?,
                "sw1",
            )?;
            boot(
                &host,
                guest_spec(
                    opts,
                    &work,
                    "sw2",
                    "10.66.1.12",
                    "52:54:00:66:01:12",
                    "backend = \"switch\"\nport_group = \"vms\"",
                )?,
                "sw2",
            )?;
            let (rtt, bulk) = measure(&ns_name, "10.66.1.11", "10.66.1.12", requests, bulk_ms)?;
            sw_rtt.extend(rtt);
            sw_bulk.push(bulk);
            destroy(&host, "sw1");
            destroy(&host, "sw2");
            say(&format!(
                "round {r}/{rounds}: two guests on taps in a Linux bridge"
            ));
            boot(
                &host,
                guest_spec(
                    opts,
                    &work,
                    "br1",
                    "10.66.0.11",
                    "52:54:00:66:00:11",
                    "backend = \"tap\"\ntap = \"tbg1\"",
                )?,
                "br1",
            )?;
            boot(
                &host,
                guest_spec(
                    opts,
                    &work,
                    "br2",
                    "10.66.0.12",
                    "52:54:00:66:00:12",
                    "backend = \"tap\"\ntap = \"tbg2\"",
                )?,
                "br2",
            )?;
            let (rtt, bulk) = measure(&ns_name, "10.66.0.11", "10.66.0.12", requests, bulk_ms)?;
            br_rtt.extend(rtt);
            br_bulk.push(bulk);
            destroy(&host, "br1");
            destroy(&host, "br2");
        }
        Ok(())
    })();
    drop(host);
    drop(ns);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    let row = |path: &str, rtt: &mut Vec<f64>, bulk: &mut Vec<f64>| SwitchBenchRow {
        path: path.to_string(),
        rr_p50_ms: stats_ms(rtt, 50.0),
        rr_p99_ms: stats_ms(rtt, 99.0),
        bulk_mbit_s_median: stats_ms(bulk, 50.0),
        bulk_runs: bulk.len(),
    };
    Ok(vec![
        row("tandem switch (vhost-user)", &mut sw_rtt, &mut sw_bulk),
        row("tap + Linux bridge", &mut br_rtt, &mut br_bulk),
    ])
}
