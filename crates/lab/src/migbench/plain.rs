//! The plain QEMU side, as libvirt migrates by default: two QEMUs from
//! the same spec (`tandem_vmspec::build_argv`), the guest's NIC a tap on a
//! Linux bridge with the host's uplink, `migrate` over QMP with libvirt's
//! default settings, no ladder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tandem_qmp::QmpClient;
use tandem_vmspec::{build_argv, parse_and_validate, Accel, RuntimePaths, VmSpec};

use super::netfollow::{self, Dhcpd, Streams};
use super::{
    check_interrupted, guest_spec, shape_link, wait_ready, MigOptions, Moved, System,
    LIBVIRT_BANDWIDTH_MAX_MIB,
};
use crate::tail;
use crate::topology::{in_ns, Topology, REPL_A, REPL_B, UPLINK_A, UPLINK_B};

/// The destination's port for the stream (inside the site's namespaces).
const PORT: u16 = 49152;
const TAP: &str = "tq0";
const BRIDGE: &str = "brq";
const QMP_CALL: Duration = Duration::from_secs(20);
/// After the source reports `completed`, the destination's event is
/// awaited this long before its state is read instead.
const EVENT_GRACE: Duration = Duration::from_secs(2);

/// One QEMU of the site; killed (and its RAM file removed) when dropped.
struct Qemu {
    child: Child,
    qmp: QmpClient,
    ram: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ram);
    }
}

pub(super) struct PlainSite {
    // Field order is drop order: the QEMUs, their monitors' runtime, then
    // the namespaces.
    /// `--netfollow`: the sender, then dhcpd.
    streams: Option<Streams>,
    _dhcpd: Option<Dhcpd>,
    qemus: [Option<Qemu>; 2],
    rt: tokio::runtime::Runtime,
    topo: Topology,
    /// Which host runs the guest: 0 = A, 1 = B.
    at: usize,
    seq: u32,
    spec: VmSpec,
    qemu: PathBuf,
    qboot_rom: PathBuf,
    bound: Duration,
    work: PathBuf,
}

impl PlainSite {
    pub(super) fn start(
        o: &MigOptions,
        tag: &str,
        work: &Path,
        say: &mut dyn FnMut(&str),
    ) -> anyhow::Result<PlainSite> {
        std::fs::create_dir_all(work)?;
        let spec_text = guest_spec(o, &format!("backend = \"tap\"\ntap = \"{TAP}\""));
        let spec = parse_and_validate(&spec_text, |p| p.exists())
            .map_err(|e| anyhow!("the plain QEMU's spec: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for QMP")?;
        let topo = Topology::create(tag).context("building the plain QEMU's namespaces")?;
        let dhcpd = if o.netfollow {
            Some(netfollow::prepare_fabric(&topo.c, &work.join("dhcpd"))?)
        } else {
            None
        };
        let mut site = PlainSite {
            streams: None,
            _dhcpd: dhcpd,
            qemus: [None, None],
            rt,
            topo,
            at: 0,
            seq: 0,
            spec,
            qemu: o.qemu.clone(),
            qboot_rom: o.qboot_rom.clone(),
            bound: Duration::from_secs(o.bound_s),
            work: work.to_path_buf(),
        };
        shape_link(&site.topo, o.bandwidth_mib_s)?;
        // Each host: the guest's tap and the uplink on one Linux bridge.
        for (ns, uplink) in [
            (site.topo.a.clone(), UPLINK_A),
            (site.topo.b.clone(), UPLINK_B),
        ] {
            in_ns(&ns, &["tuntap", "add", "dev", TAP, "mode", "tap"])?;
            in_ns(
                &ns,
                &[
                    "link",
                    "add",
                    BRIDGE,
                    "type",
                    "bridge",
                    "forward_delay",
                    "0",
                ],
            )?;
            for dev in [uplink, TAP] {
                in_ns(&ns, &["link", "set", dev, "master", BRIDGE, "up"])?;
            }
            in_ns(&ns, &["link", "set", BRIDGE, "up"])?;
        }
        say("  plain QEMU: booting the guest on A");
        let q = site.spawn(0, false)?;
        site.rt
            .block_on(q.qmp.execute_raw("cont", json!({}), QMP_CALL))
            .context("cont (plain QEMU)")?;
        let serial = site.serial(site.seq);
        let log = site.log(site.seq);
        site.qemus[0] = Some(q);
        let child = &mut site.qemus[0];
        wait_ready(
            "the plain QEMU's guest",
            Duration::from_secs(180),
            || std::fs::read_to_string(&serial).ok(),
            || match child.as_mut().map(|q| q.child.try_wait()) {
                Some(Ok(Some(st))) => bail!("QEMU exited ({st}): {}", tail(&log, 8)),
                _ => Ok(()),
            },
        )?;
        if o.netfollow {
            site.streams = Some(Streams::start(&site.topo.c).context("the guest's streams")?);
        }
        Ok(site)
    }

    fn serial(&self, n: u32) -> PathBuf {
        self.work.join(format!("q{n}.serial"))
    }

    fn log(&self, n: u32) -> PathBuf {
        self.work.join(format!("q{n}.log"))
    }

    /// A QEMU of the guest on host `host` (0 = A), its monitor connected;
    /// `-incoming defer` for a destination. Stopped (`-S`) either way.
    fn spawn(&mut self, host: usize, incoming: bool) -> anyhow::Result<Qemu> {
        self.seq += 1;
        let n = self.seq;
        let ns = if host == 0 {
            &self.topo.a
        } else {
            &self.topo.b
        };
        let name = self
            .work
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tmigbench");
        let qmp_path = self.work.join(format!("q{n}.qmp"));
        let paths = RuntimePaths {
            qemu_binary: self.qemu.clone(),
            qmp_socket: qmp_path.clone(),
            serial_log: self.serial(n),
            ram_file: PathBuf::from(format!("/dev/shm/{name}-{n}.ram")),
            qboot_rom: self.qboot_rom.clone(),
            accel: Accel::Tcg,
            incoming,
            switch_dir: self.work.clone(),
        };
        let log = self.log(n);
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.qemu)
            .args(build_argv(&self.spec, &paths))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .with_context(|| format!("starting {}", self.qemu.display()))?;
        let mut child = Some(child);
        let connected = self
            .rt
            .block_on(QmpClient::connect_retry(&qmp_path, Duration::from_secs(30)));
        match connected {
            Ok(qmp) => Ok(Qemu {
                child: child.take().ok_or_else(|| anyhow!("no child"))?,
                qmp,
                ram: paths.ram_file,
            }),
            Err(e) => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let _ = std::fs::remove_file(&paths.ram_file);
                Err(anyhow!(
                    "the plain QEMU's monitor: {e}; its log: {}",
                    tail(&log, 8)
                ))
            }
        }
    }
}

impl System for PlainSite {
    fn name(&self) -> &'static str {
        "plain"
    }

    fn streams(&self) -> Option<&Streams> {
        self.streams.as_ref()
    }

    fn client_ns(&self) -> &str {
        &self.topo.c
    }

    fn direction(&self) -> &'static str {
        if self.at == 0 {
            "A->B"
        } else {
            "B->A"
        }
    }

    fn migrate(&mut self, _say: &mut dyn FnMut(&str)) -> anyhow::Result<Moved> {
        let (src_i, dst_i) = (self.at, 1 - self.at);
        let dst_ip = if dst_i == 1 { REPL_B } else { REPL_A };
        let uri = format!("tcp:{dst_ip}:{PORT}");
        let src = self.qemus[src_i]
            .as_ref()
            .map(|q| q.qmp.clone())
            .ok_or_else(|| anyhow!("no QEMU runs the guest"))?;
        // libvirt's Prepare: the destination QEMU, stopped, listening.
        let t0 = Instant::now();
        let dst = self.spawn(dst_i, true)?;
        let ended = self
            .rt
            .block_on(drive(&src, &dst.qmp, &uri, self.bound, t0));
        let ended = match ended {
            Ok(e) => e,
            Err(e) => {
                // The source runs on (a failed stream leaves it running);
                // the destination goes.
                drop(dst);
                let _ = self
                    .rt
                    .block_on(src.execute_raw("cont", json!({}), QMP_CALL));
                return Err(e);
            }
        };
        let ram = &ended.last["ram"];
        let mut moved = Moved {
            stream_ms: ended.last["total-time"].as_f64(),
            downtime_ms: ended.last["downtime"].as_f64(),
            transferred_bytes: ram["transferred"].as_u64().unwrap_or(0),
            rung: "precopy".into(),
            dirty_seen_mib_s: (ended.dirty_max_bps > 0)
                .then(|| ended.dirty_max_bps as f64 / (1u64 << 20) as f64),
            ..Moved::default()
        };
        match ended.running_ms {
            Some(ms) => {
                moved.converged = true;
                moved.total_ms = Some(ms);
                // libvirt's Confirm: the source QEMU quits.
                self.qemus[src_i] = None;
                self.qemus[dst_i] = Some(dst);
                self.at = dst_i;
            }
            None => {
                drop(dst);
                moved.downtime_ms = None;
                moved.note = Some(format!(
                    "still `active` after {} s (cancelled): {} MiB remaining, expected downtime {} ms vs the 300 ms limit, iteration {}",
                    self.bound.as_secs(),
                    ram["remaining"].as_u64().unwrap_or(0) >> 20,
                    ended.last["expected-downtime"]
                        .as_u64()
                        .map_or_else(|| "?".to_string(), |d| d.to_string()),
                    ram["dirty-sync-count"].as_u64().unwrap_or(0)
                ));
            }
        }
        check_interrupted()?;
        Ok(moved)
    }
}

/// How a plain migration ended.
struct Ended {
    /// The destination running (its `cont` done), ms after `t0`; `None`:
    /// cancelled at the bound.
    running_ms: Option<f64>,
    /// The source's last `query-migrate` (completed or cancelled).
    last: Value,
    dirty_max_bps: u64,
}

/// `query-migrate`'s `dirty-pages-rate` × `page-size`, bytes per second.
fn dirty_bps(q: &Value) -> u64 {
    let ram = &q["ram"];
    ram["dirty-pages-rate"]
        .as_u64()
        .unwrap_or(0)
        .saturating_mul(ram["page-size"].as_u64().unwrap_or(4096))
}

/// The migration, libvirt's way: capability `events` on both ends,
/// `max-bandwidth` libvirt's unlimited, QEMU's default downtime limit;
/// the destination `cont`ed on its `MIGRATION completed` event. Cancelled
/// (`migrate_cancel`) if still running after `bound`.
async fn drive(
    src: &QmpClient,
    dst: &QmpClient,
    uri: &str,
    bound: Duration,
    t0: Instant,
) -> anyhow::Result<Ended> {
    let caps = json!({"capabilities": [{"capability": "events", "state": true}]});
    let call = |q: &QmpClient, cmd: &'static str, args: Value| {
        let q = q.clone();
        async move {
            q.execute_raw(cmd, args, QMP_CALL)
                .await
                .map_err(|e| anyhow!("{cmd}: {e}"))
        }
    };
    let mut events = dst.events();
    call(dst, "migrate-set-capabilities", caps.clone()).await?;
    call(dst, "migrate-incoming", json!({ "uri": uri })).await?;
    call(src, "migrate-set-capabilities", caps).await?;
    call(
        src,
        "migrate-set-parameters",
        json!({ "max-bandwidth": LIBVIRT_BANDWIDTH_MAX_MIB << 20 }),
    )
    .await?;
    let started = Instant::now();
    call(src, "migrate", json!({ "uri": uri })).await?;
    let mut dirty_max_bps = 0u64;
    let mut src_completed: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(e) if e.name == "MIGRATION" => match e.data["status"].as_str() {
                    Some("completed") => break,
                    Some("failed") => bail!("the destination's incoming migration failed"),
                    _ => {}
                },
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    bail!("the destination QEMU's monitor closed (QEMU exited?)")
                }
            },
            _ = tick.tick() => {
                if super::interrupted() {
                    let _ = call(src, "migrate_cancel", json!({})).await;
                    bail!("interrupted");
                }
                let q = call(src, "query-migrate", json!({})).await?;
                dirty_max_bps = dirty_max_bps.max(dirty_bps(&q));
                match q["status"].as_str().unwrap_or("") {
                    "completed" => {
                        let at = *src_completed.get_or_insert_with(Instant::now);
                        if at.elapsed() > EVENT_GRACE {
                            // No event seen: the destination's own state.
                            let s = call(dst, "query-status", json!({})).await?;
                            if s["status"] == "paused" {
                                break;
                            }
                            bail!("the source completed, the destination is `{}`", s["status"]);
                        }
                    }
                    "failed" => bail!(
                        "the migration failed: {}",
                        q["error-desc"].as_str().unwrap_or("no reason given")
                    ),
                    "cancelled" => bail!("the migration was cancelled"),
                    _ if started.elapsed() > bound => {
                        return cancel(src, q, dirty_max_bps).await;
                    }
                    _ => {}
                }
            }
        }
    }
    // libvirt's Finish: the destination runs the guest.
    call(dst, "cont", json!({})).await?;
    let running_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The source's account of it, once it says completed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = loop {
        let q = call(src, "query-migrate", json!({})).await?;
        if q["status"] == "completed" || Instant::now() > deadline {
            break q;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    dirty_max_bps = dirty_max_bps.max(dirty_bps(&last));
    Ok(Ended {
        running_ms: Some(running_ms),
        last,
        dirty_max_bps,
    })
}

/// `migrate_cancel` at the bound; waits (≤ 30 s) for the source to say
/// it is over and runs the guest on.
async fn cancel(src: &QmpClient, at_bound: Value, dirty_max_bps: u64) -> anyhow::Result<Ended> {
    src.execute_raw("migrate_cancel", json!({}), QMP_CALL)
        .await
        .map_err(|e| anyhow!("migrate_cancel: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = src
            .execute_raw("query-migrate", json!({}), QMP_CALL)
            .await
            .map_err(|e| anyhow!("query-migrate: {e}"))?;
        match q["status"].as_str().unwrap_or("") {
            "cancelled" | "failed" => break,
            "completed" => bail!("the migration completed as it was cancelled"),
            _ if Instant::now() > deadline => bail!("migrate_cancel did not end it within 30 s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let s = src
        .execute_raw("query-status", json!({}), QMP_CALL)
        .await
        .map_err(|e| anyhow!("query-status: {e}"))?;
    if s["status"] != "running" {
        bail!("after the cancel the source is `{}`", s["status"]);
    }
    Ok(Ended {
        running_ms: None,
        last: at_bound,
        dirty_max_bps,
    })
}
