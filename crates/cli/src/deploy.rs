//! `tandem deploy`: many copies of one template across many hosts,
//! through the manager (see docs/deploy.md).
//!
//! Prints the plan (the matrix, the routes and the steps) before anything
//! moves, then what happens and, every second, each host's copies and
//! bytes (on stderr, so that `--json` leaves stdout to the final view).
//! Exit status 0 when every copy is verified on its host.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use tandem_manager::deploy::{DeployRequest, DeployState, DeploymentView, LinkSeconds};

use crate::cluster::ManagerOpts;
use crate::print_json;
use tandem_progress::{Sample, Tracker};

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// The template: a file of the source host's image directory.
    template: String,
    /// The host that holds the template.
    #[arg(long)]
    from: String,
    /// The target hosts, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// Copies on each target host, or `auto` to spread `--count` by free
    /// room.
    #[arg(long)]
    per_host: Option<String>,
    /// Copies in all (with `--per-host auto`, or alone).
    #[arg(long)]
    count: Option<u32>,
    /// Clones are named PREFIX-NN.EXT (default: the template's stem).
    #[arg(long)]
    name_prefix: Option<String>,
    /// Plan with these link times instead of probing every link: a TOML
    /// file of `[[link]] from = "a"  to = "b"  seconds = 10.0`.
    #[arg(long)]
    links: Option<PathBuf>,
    /// Bytes each link probe moves.
    #[arg(long)]
    probe_bytes: Option<u64>,
    /// Copies one host sends at once (hosts that share one NIC).
    #[arg(long)]
    egress_slots: Option<u32>,
    /// Define a VM on each clone from this spec (TOML): `{name}`,
    /// `{uuid}`, `{mac}`, `{disk}`, `{ip}`, `{ip_addr}`, `{index}` are
    /// filled in per clone.
    #[arg(long)]
    vm_spec: Option<PathBuf>,
    /// The first clone's address, A.B.C.D/LEN (`{ip}`); the next clones
    /// get the next addresses.
    #[arg(long)]
    addresses: Option<String>,
    /// Start each clone's VM once defined.
    #[arg(long)]
    start: bool,
    /// Show the plan; copy nothing.
    #[arg(long)]
    dry_run: bool,
    /// Give up waiting after this many seconds (the deployment goes on).
    #[arg(long, default_value_t = 3600)]
    wait_s: u64,
    #[command(flatten)]
    m: crate::dvs::DvsManagerOpts,
}

/// How long the manager may be unreachable while a deployment runs.
const MANAGER_GONE: Duration = Duration::from_secs(90);

#[derive(Deserialize)]
struct LinksFile {
    #[serde(default)]
    link: Vec<LinkSeconds>,
}

pub async fn run(a: DeployArgs, json: bool) -> anyhow::Result<()> {
    let links = match &a.links {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let f: LinksFile = toml::from_str(&text)
                .with_context(|| format!("{}: not a links file", p.display()))?;
            if f.link.is_empty() {
                bail!("{}: no [[link]] entries", p.display());
            }
            Some(f.link)
        }
        None => None,
    };
    let (per_host, count) = match a.per_host.as_deref() {
        None => (None, a.count),
        Some("auto") => {
            let Some(n) = a.count else {
                bail!("--per-host auto needs --count N");
            };
            (None, Some(n))
        }
        Some(k) => (
            Some(
                k.parse::<u32>()
                    .with_context(|| format!("--per-host {k}: a number or `auto`"))?,
            ),
            a.count,
        ),
    };
    let vm_spec = match &a.vm_spec {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let req = DeployRequest {
        template: a.template.clone(),
        from: a.from.clone(),
        hosts: a.hosts.clone(),
        per_host,
        count,
        name_prefix: a.name_prefix.clone(),
        links,
        probe_bytes: a.probe_bytes,
        egress_slots: a.egress_slots,
        dry_run: a.dry_run,
        vm_spec,
        addresses: a.addresses.clone(),
        start: a.start,
    };
    let opts: ManagerOpts = a.m.opts(Duration::from_secs(900));
    let client = opts.client()?;
    let first: DeploymentView = client.post("/v1/deployments", &req).await?;
    if a.dry_run {
        if json {
            return print_json(&first);
        }
        print_plan(&first);
        return Ok(());
    }
    if json {
        eprintln!("{}", first.plan_text);
    } else {
        print_plan(&first);
    }
    let poll = a.m.opts(Duration::from_secs(10)).client()?;
    let deadline = Instant::now() + Duration::from_secs(a.wait_s);
    let mut shown = 0usize;
    let mut last_bars = Instant::now();
    // The manager may restart meanwhile: it resumes the deployment, and
    // this goes on asking for it.
    let mut unreachable_since: Option<Instant> = None;
    let mut bars = Bars::new(json);
    let view = loop {
        let v: DeploymentView = match poll.get(&format!("/v1/deployments/{}", first.id)).await {
            Ok(v) => {
                unreachable_since = None;
                v
            }
            Err(e) if e.kind_str().is_none() => {
                let since = *unreachable_since.get_or_insert_with(|| {
                    eprintln!("the manager does not answer ({e}); asking again");
                    Instant::now()
                });
                if since.elapsed() > MANAGER_GONE {
                    return Err(e).context(format!(
                        "the manager has not answered for {} s; deployment {} may go on",
                        MANAGER_GONE.as_secs(),
                        first.id
                    ));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for line in v.log.iter().skip(shown) {
            eprintln!("{}", tandem_progress::sanitize(line));
        }
        shown = v.log.len();
        if v.state != DeployState::Running {
            break v;
        }
        if last_bars.elapsed() >= Duration::from_secs(1) {
            last_bars = Instant::now();
            bars.show(&v);
        }
        if Instant::now() >= deadline {
            bail!(
                "deployment {} still running after {} s; it goes on (the manager's /v1/deployments/{})",
                v.id,
                a.wait_s,
                v.id
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if json {
        print_json(&view)?;
    } else {
        bars.show(&view);
        for c in &view.copies {
            println!("{}:{}  ({})", c.host, c.file, c.via);
        }
        for v in &view.vms {
            println!(
                "VM {} on {}: uuid {} mac {}{}{}",
                v.name,
                v.host,
                v.uuid,
                v.mac,
                v.ip.as_deref().map(|i| format!(" {i}")).unwrap_or_default(),
                if v.started { ", started" } else { "" }
            );
        }
    }
    match view.state {
        DeployState::Done => Ok(()),
        _ => bail!(
            "deployment {} failed: {}",
            view.id,
            view.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

fn print_plan(v: &DeploymentView) {
    println!(
        "template {} on {}: {} ({}), sha256 {}",
        v.template,
        v.from,
        tandem_progress::human_bytes(v.image_bytes),
        v.image_bytes,
        v.sha256
    );
    println!(
        "links ({}), seconds per image:",
        if v.links_probed { "probed" } else { "given" }
    );
    for l in &v.links {
        println!("  {:>10} -> {:<10} {:>10.2}", l.from, l.to, l.seconds);
    }
    println!("{}", v.plan_text);
}

/// The overall bar and one per host, from the project's progress module:
/// bytes of the host's copies (its network copy as it arrives, each local
/// copy whole once made), with rate and ETA; JSON lines with `--json`.
struct Bars {
    hosts: std::collections::BTreeMap<String, Tracker>,
    overall: Tracker,
    t0: Instant,
    json: bool,
}

impl Bars {
    fn new(json: bool) -> Bars {
        Bars {
            hosts: Default::default(),
            overall: Tracker::new(),
            t0: Instant::now(),
            json,
        }
    }

    fn show(&mut self, v: &DeploymentView) {
        let at_ms = self.t0.elapsed().as_millis() as u64;
        let image = v.image_bytes;
        let (mut all_done, mut all_planned) = (0u64, 0u64);
        let mut lines = Vec::new();
        let mut copies = (0u32, 0u32);
        for h in &v.hosts {
            let planned = u64::from(h.copies_planned).saturating_mul(image);
            let done = if h.copies_done == 0 {
                h.bytes_received.min(image)
            } else {
                u64::from(h.copies_done).saturating_mul(image)
            }
            .min(planned);
            all_done += done;
            all_planned += planned;
            copies.0 += h.copies_done;
            copies.1 += h.copies_planned;
            let t = self.hosts.entry(h.host.clone()).or_default();
            t.observe(Sample {
                done,
                remaining: planned - done,
                at_ms,
            });
            if done == planned {
                t.finish();
            }
            let mut e = t.event(&format!("deploy {}", h.host), "copies");
            e.message = Some(format!("{}/{} copies", h.copies_done, h.copies_planned));
            if h.failed {
                e.state = tandem_progress::FAILED.into();
            }
            lines.push(e);
        }
        self.overall.observe(Sample {
            done: all_done,
            remaining: all_planned - all_done,
            at_ms,
        });
        if all_done == all_planned {
            self.overall.finish();
        }
        let mut e = self.overall.event(&format!("deploy {}", v.template), "all");
        e.message = Some(format!("{}/{} copies", copies.0, copies.1));
        match v.state {
            DeployState::Failed => e.state = tandem_progress::FAILED.into(),
            DeployState::Running | DeployState::Planned | DeployState::Done => {}
        }
        lines.insert(0, e);
        for e in lines {
            if self.json {
                eprint!("{}", e.to_json_line());
            } else {
                eprintln!("{}", tandem_progress::render_bar(&e, 100));
            }
        }
    }
}
