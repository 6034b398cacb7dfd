//! Fan-out deployment on the manager (seed 002): from one template on one
//! host, copies onto many hosts, each host that holds a whole copy
//! becoming a source for the others.
//!
//! `POST /v1/deployments` checks everything it can before a byte moves
//! (the hosts are members and serve images, the template exists on the
//! source and its hash is known, the clone names are free, every
//! datastore has room, a route reaches every host), fills the matrix
//! (injected link times, or a probe of every direct link), and shows the
//! plan. Unless it is a dry run it then runs the plan: `tandem-deploy-plan`
//! decides every step, this module does them through the hosts' APIs
//! (`/v1/deploy/…`, mutual TLS) and reports back what happened (a copy
//! started, progressed, completed or failed; a host stopped answering),
//! and re-plans after each report. A copy completes only once the
//! receiving host verified its SHA-256 and renamed it into place.
//!
//! Every deployment is saved in the manager's store (`deployments/<id>`)
//! whenever something happens to it, and every 2 s while it runs: the
//! plan's state, the copies asked of hosts (by id) and the executor's own
//! bookkeeping. A manager that starts resumes each one still running: the
//! hosts' copies went on meanwhile, and the executor asks after them by
//! their ids as before.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tandem_api::deploy::{
    valid_image_name, CopyRequest, CopyState, CopyStatus, ImageInfo, LocalCopyDone,
    LocalCopyRequest, ProbeRequest, ProbeResult,
};
use tandem_deploy_plan::{
    Action, Datastore, Deployment, Event, Matrix, PerHost, Plan, PlanError, Request,
};
use tandem_pki::rustls::ClientConfig;
use tracing::{info, warn};

use crate::client::{ClientError, ClusterClient};
use crate::service::{Manager, ManagerError};
use crate::store::typed;

type Result<T, E = ManagerError> = std::result::Result<T, E>;

/// How often the executor asks hosts how their copies are doing.
const POLL: Duration = Duration::from_millis(100);
/// A host that has not answered for this long is taken as failed.
const HOST_SILENT: Duration = Duration::from_secs(3);
/// Bound on one request to a host's API.
const HOST_REQUEST: Duration = Duration::from_secs(10);
/// A local copy's request may take this long (a full copy of a large
/// image on a slow disk).
const LOCAL_COPY_REQUEST: Duration = Duration::from_secs(1800);
/// The default probe per direct link.
pub const DEFAULT_PROBE_BYTES: u64 = 4 << 20;
/// Most copies one deployment makes.
pub const MAX_DEPLOY_COPIES: u32 = 999;
/// Deployments kept for `GET /v1/deployments`.
const KEEP_DEPLOYMENTS: usize = 64;
/// Lines kept in a deployment's log.
const KEEP_LOG: usize = 400;

/// One directed direct link and the seconds one whole image takes over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkSeconds {
    pub from: String,
    pub to: String,
    pub seconds: f64,
}

/// `POST /v1/deployments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployRequest {
    /// A file of the source host's image directory.
    pub template: String,
    /// The source host.
    pub from: String,
    /// The target hosts.
    pub hosts: Vec<String>,
    /// Copies on every target host.
    #[serde(default)]
    pub per_host: Option<u32>,
    /// Copies in all, spread by free room (`--per-host auto`).
    #[serde(default)]
    pub count: Option<u32>,
    /// Clones are `<prefix>-NN.<extension>` (default: the template's stem).
    #[serde(default)]
    pub name_prefix: Option<String>,
    /// Link times to plan with instead of probing.
    #[serde(default)]
    pub links: Option<Vec<LinkSeconds>>,
    /// Bytes per probe (default [`DEFAULT_PROBE_BYTES`]).
    #[serde(default)]
    pub probe_bytes: Option<u64>,
    /// How many copies one host sends at once (default: as many as the
    /// plan likes, the seed's independent links).
    #[serde(default)]
    pub egress_slots: Option<u32>,
    /// Plan only.
    #[serde(default)]
    pub dry_run: bool,
    /// A VM spec (TOML) to define each clone with once its copy is
    /// verified: `{name}`, `{uuid}`, `{mac}`, `{disk}`, `{ip}`
    /// (`A.B.C.D/LEN`), `{ip_addr}` and `{index}` are filled in per clone.
    #[serde(default)]
    pub vm_spec: Option<String>,
    /// The first clone's address, `A.B.C.D/LEN`; clone N gets the N-th.
    #[serde(default)]
    pub addresses: Option<String>,
    /// Start each clone once it is defined.
    #[serde(default)]
    pub start: bool,
}

/// One clone defined as a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneVm {
    pub host: String,
    pub name: String,
    pub uuid: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub disk: String,
    pub started: bool,
}

/// What a clone's spec is filled in with.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CloneIdentity {
    name: String,
    uuid: uuid::Uuid,
    mac: String,
    ip: Option<(std::net::Ipv4Addr, u8)>,
    index: u32,
}

impl CloneIdentity {
    fn render(&self, template: &str, disk: &str) -> String {
        let (ip, ip_addr) = match self.ip {
            Some((a, len)) => (format!("{a}/{len}"), a.to_string()),
            None => (String::new(), String::new()),
        };
        template
            .replace("{name}", &self.name)
            .replace("{uuid}", &self.uuid.to_string())
            .replace("{mac}", &self.mac)
            .replace("{disk}", disk)
            .replace("{ip}", &ip)
            .replace("{ip_addr}", &ip_addr)
            .replace("{index}", &self.index.to_string())
    }
}

/// `A.B.C.D/LEN` and how many addresses follow it in its subnet (the
/// broadcast address excluded).
fn parse_addresses(s: &str) -> Result<(std::net::Ipv4Addr, u8, u64)> {
    let bad =
        || ManagerError::Invalid(format!("--addresses {s:?}: A.B.C.D/LEN, e.g. 10.0.0.10/24"));
    let (a, len) = s.split_once('/').ok_or_else(bad)?;
    let a: std::net::Ipv4Addr = a.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(1..=30).contains(&len) {
        return Err(bad());
    }
    let host_bits = 32 - u32::from(len);
    let mask = u32::MAX << host_bits;
    let last = (u32::from(a) & mask) | !mask; // broadcast
    Ok((a, len, u64::from(last - u32::from(a))))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployState {
    /// A dry run's plan.
    Planned,
    Running,
    Done,
    Failed,
}

/// One copy a deployment made or is making.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneCopy {
    pub host: String,
    pub file: String,
    /// `network from H` or `local`.
    pub via: String,
    pub done: bool,
}

/// One network copy, as it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferView {
    pub from: String,
    pub to: String,
    pub file: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// running, done, failed, cancelled.
    pub state: String,
    pub seconds: f64,
}

/// What a host has, as far as this deployment goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostProgress {
    pub host: String,
    pub copies_planned: u32,
    pub copies_done: u32,
    /// Bytes of its network copy received so far.
    pub bytes_received: u64,
    pub failed: bool,
}

/// `GET /v1/deployments/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    pub id: String,
    pub state: DeployState,
    pub template: String,
    pub from: String,
    pub image_bytes: u64,
    pub sha256: String,
    /// The matrix planned with: injected, or probed (`links_probed`).
    pub links: Vec<LinkSeconds>,
    pub links_probed: bool,
    /// The plan as first shown (matrix, routes, steps).
    pub plan_text: String,
    /// The plan as data.
    pub plan: Plan,
    pub hosts: Vec<HostProgress>,
    pub copies: Vec<CloneCopy>,
    pub transfers: Vec<TransferView>,
    /// The clones defined as VMs (with `vm_spec`).
    #[serde(default)]
    pub vms: Vec<CloneVm>,
    /// Unix seconds.
    pub started_at: u64,
    pub elapsed_s: f64,
    /// What went wrong, when the state is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Events as they happened, one line each.
    pub log: Vec<String>,
}

impl DeploymentView {
    fn say(&mut self, started: Instant, line: String) {
        info!(deployment = %self.id, "{line}");
        if self.log.len() >= KEEP_LOG {
            self.log.remove(0);
        }
        self.log.push(format!(
            "[{:7.2} s] {line}",
            started.elapsed().as_secs_f64()
        ));
    }
}

/// The manager's deployments, in memory.
#[derive(Default)]
pub struct Deployments {
    deployments: Mutex<Vec<Arc<Mutex<DeploymentView>>>>,
}

/// A host's two addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostEnds {
    api: String,
    image: String,
    image_dir: String,
}

fn plan_error(e: PlanError) -> ManagerError {
    ManagerError::Invalid(format!("the deployment cannot be planned: {e}"))
}

fn host_error(host: &str, what: &str, e: ClientError) -> ManagerError {
    match e.kind_str() {
        Some("not-found") => ManagerError::NotFound(format!("{host}: {e}")),
        Some("invalid") => ManagerError::Invalid(format!("{host}: {e}")),
        _ => ManagerError::Conflict(format!("{what} on {host}: {e}")),
    }
}

impl Manager {
    fn host_client(&self, ends: &HostEnds, host: &str, tls: &Arc<ClientConfig>) -> ClusterClient {
        ClusterClient::to_host(&ends.api, host, Arc::clone(tls)).with_timeout(HOST_REQUEST)
    }

    /// Plans a deployment and, unless it is a dry run, starts it.
    pub async fn deploy(self: &Arc<Self>, req: DeployRequest) -> Result<DeploymentView> {
        valid_image_name(&req.template).map_err(ManagerError::Invalid)?;
        if req.hosts.is_empty() {
            return Err(ManagerError::Invalid("no target hosts (--hosts)".into()));
        }
        let per_host = match (req.per_host, req.count) {
            (Some(0), _) | (_, Some(0)) => {
                return Err(ManagerError::Invalid(
                    "zero copies asked for: --per-host and --count are at least 1".into(),
                ))
            }
            (Some(k), None) => PerHost::Count(k),
            (None, Some(n)) => PerHost::Auto { total: n },
            (Some(k), Some(n)) if u64::from(k) * req.hosts.len() as u64 == u64::from(n) => {
                PerHost::Count(k)
            }
            (Some(k), Some(n)) => {
                return Err(ManagerError::Invalid(format!(
                    "--count {n} is not --per-host {k} × {} hosts",
                    req.hosts.len()
                )))
            }
            (None, None) => PerHost::Count(1),
        };
        let total = match per_host {
            PerHost::Count(k) => u64::from(k) * req.hosts.len() as u64,
            PerHost::Auto { total } => u64::from(total),
        };
        if total > u64::from(MAX_DEPLOY_COPIES) {
            return Err(ManagerError::Invalid(format!(
                "{total} copies: one deployment makes at most {MAX_DEPLOY_COPIES}"
            )));
        }
        let (stem, ext) = match req.template.rsplit_once('.') {
            Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
            _ => (req.template.clone(), String::new()),
        };
        let prefix = req.name_prefix.clone().unwrap_or(stem);
        valid_image_name(&format!("{prefix}-01{ext}"))
            .map_err(|e| ManagerError::Invalid(format!("--name-prefix: {e}")))?;
        let tls = self.deploy_tls()?;

        // The hosts: members, reporting their API and image service.
        let mut all = vec![req.from.clone()];
        for h in &req.hosts {
            if all.contains(h) {
                return Err(ManagerError::Invalid(format!(
                    "{h} is named twice (the source is never a target)"
                )));
            }
            all.push(h.clone());
        }
        let mut ends = BTreeMap::new();
        let mut free = BTreeMap::new();
        for h in &all {
            let view = self.host(h).await?;
            let inv = view.record.inventory.clone().unwrap_or_default();
            let api = self.host_api_of(h).await?.ok_or_else(|| {
                ManagerError::Conflict(format!(
                    "{h} has not reported its API address (tandemd --host-api)"
                ))
            })?;
            let image = inv.image_service.clone().ok_or_else(|| {
                ManagerError::Conflict(format!(
                    "{h} serves no images (tandemd --image-listen): hosts copy from each other"
                ))
            })?;
            let image_dir = inv.deploy_dir.clone().unwrap_or_default();
            let room = inv
                .datastores
                .iter()
                .find(|d| d.path == image_dir)
                .map(|d| d.free_bytes)
                .unwrap_or(0);
            free.insert(h.clone(), room);
            ends.insert(
                h.clone(),
                HostEnds {
                    api,
                    image,
                    image_dir,
                },
            );
        }

        // The template, on the source.
        let src = &ends[&req.from];
        let info: ImageInfo = self
            .host_client(src, &req.from, &tls)
            .with_timeout(Duration::from_secs(600))
            .get(&format!("/v1/deploy/images/{}", req.template))
            .await
            .map_err(|e| host_error(&req.from, "reading the template", e))?;
        if info.bytes == 0 {
            return Err(ManagerError::Invalid(format!(
                "the template {} on {} is empty",
                req.template, req.from
            )));
        }

        // Clone names: free on every target.
        let names: Vec<String> = (1..=total)
            .map(|i| format!("{prefix}-{i:02}{ext}"))
            .collect();
        for h in &req.hosts {
            let c = self.host_client(&ends[h], h, &tls);
            for n in &names {
                match c.get::<ImageInfo>(&format!("/v1/deploy/images/{n}")).await {
                    Ok(_) => {
                        return Err(ManagerError::Conflict(format!(
                            "{h} already has {n}: choose another --name-prefix"
                        )))
                    }
                    Err(e) if e.kind_str() == Some("not-found") => {}
                    Err(e) => return Err(host_error(h, "checking the clone names", e)),
                }
            }
        }

        // The clones' VMs: every clone distinct (name, disk, MAC, UUID,
        // address), the spec valid, the names free on every target.
        let identities = match &req.vm_spec {
            None => {
                if req.start || req.addresses.is_some() {
                    return Err(ManagerError::Invalid(
                        "--start and --addresses need --vm-spec: the clones are files otherwise"
                            .into(),
                    ));
                }
                Vec::new()
            }
            Some(template) => {
                let ids = self
                    .clone_identities(&req, template, &names, &ext, &ends, &tls)
                    .await?;
                ids
            }
        };

        // The matrix.
        let mut matrix =
            Matrix::new(req.from.clone(), req.hosts.iter().cloned()).map_err(plan_error)?;
        let probed = req.links.is_none();
        let links = match &req.links {
            Some(l) => l.clone(),
            None => {
                self.probe_links(&all, &ends, &tls, info.bytes, req.probe_bytes)
                    .await?
            }
        };
        for l in &links {
            if !(l.seconds.is_finite() && l.seconds > 0.0) {
                return Err(ManagerError::Invalid(format!(
                    "link {} -> {}: {} s is not a time",
                    l.from, l.to, l.seconds
                )));
            }
            // Links into the source carry nothing; links of hosts outside
            // this deployment (a links file for the whole cluster) neither.
            if l.to == req.from || !all.contains(&l.from) || !all.contains(&l.to) {
                continue;
            }
            matrix
                .set_time(&l.from, &l.to, l.seconds)
                .map_err(plan_error)?;
        }
        if let Some(slots) = req.egress_slots {
            for h in &all {
                matrix
                    .set_egress_slots(h, Some(slots))
                    .map_err(plan_error)?;
            }
        }
        let datastores = all
            .iter()
            .map(|h| Datastore::local(format!("{h}:{}", ends[h].image_dir), h.clone(), free[h]))
            .collect();
        // A byte copy at disk speed; a reflink is quicker still. Only the
        // estimates use it.
        let local = info.bytes as f64 / 500e6;
        let request = Request {
            image_bytes: info.bytes,
            source_datastore: format!("{}:{}", req.from, ends[&req.from].image_dir),
            datastores,
            per_host,
            local_copy_time: local,
            cross_datastore_time: local,
        };
        let deployment = Deployment::new(matrix, request, 0.0).map_err(plan_error)?;
        let plan = deployment.plan().map_err(plan_error)?;
        let id = uuid::Uuid::new_v4().to_string()[..8].to_string();
        let mut view = DeploymentView {
            id: id.clone(),
            state: if req.dry_run {
                DeployState::Planned
            } else {
                DeployState::Running
            },
            template: req.template.clone(),
            from: req.from.clone(),
            image_bytes: info.bytes,
            sha256: info.sha256.clone(),
            links,
            links_probed: probed,
            plan_text: plan.to_string(),
            plan: plan.clone(),
            hosts: req
                .hosts
                .iter()
                .map(|h| HostProgress {
                    host: h.clone(),
                    copies_planned: deployment
                        .placement
                        .host(h)
                        .map(|p| p.copies())
                        .unwrap_or(0),
                    copies_done: 0,
                    bytes_received: 0,
                    failed: false,
                })
                .collect(),
            copies: Vec::new(),
            transfers: Vec::new(),
            vms: Vec::new(),
            started_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            elapsed_s: 0.0,
            error: None,
            log: Vec::new(),
        };
        if req.dry_run {
            return Ok(view);
        }
        let started = Instant::now();
        view.say(
            started,
            format!(
                "deploying {} ({} bytes) from {} to {}: {} copies",
                req.template,
                info.bytes,
                req.from,
                req.hosts.join(", "),
                deployment.placement.total()
            ),
        );
        let shared = Arc::new(Mutex::new(view.clone()));
        {
            let mut all = self.deploy.deployments.lock();
            if all.len() >= KEEP_DEPLOYMENTS {
                if let Some(i) = all
                    .iter()
                    .position(|d| d.lock().state != DeployState::Running)
                {
                    all.remove(i);
                }
            }
            all.push(shared.clone());
        }
        let mut exec = Executor {
            id,
            deployment,
            tls,
            ends,
            image: info,
            names,
            next_name: 0,
            base: BTreeMap::from([(req.from.clone(), req.template.clone())]),
            inflight: BTreeMap::new(),
            partials: Vec::new(),
            locals: tokio::task::JoinSet::new(),
            started,
            view: shared,
            silent_since: HashMap::new(),
            jobs: 0,
            vm_spec: req.vm_spec.clone().map(|t| (t, identities, req.start)),
            local_files: Vec::new(),
            store: Arc::clone(self.store()),
            saved_at: Instant::now(),
        };
        exec.save().await;
        self.prune_saved().await;
        tokio::spawn(exec.run());
        Ok(view)
    }

    /// Each clone's identity, checked before anything is copied: the
    /// spec renders and validates for every clone, no two clones share a
    /// name, disk or MAC, and no target host has a VM of a clone's name.
    async fn clone_identities(
        &self,
        req: &DeployRequest,
        template: &str,
        names: &[String],
        ext: &str,
        ends: &BTreeMap<String, HostEnds>,
        tls: &Arc<ClientConfig>,
    ) -> Result<Vec<CloneIdentity>> {
        for needed in ["{name}", "{disk}"] {
            if !template.contains(needed) {
                return Err(ManagerError::Invalid(format!(
                    "--vm-spec has no {needed}: every clone needs its own"
                )));
            }
        }
        let addresses = match &req.addresses {
            Some(a) => {
                let (first, len, room) = parse_addresses(a)?;
                if room < names.len() as u64 {
                    return Err(ManagerError::Invalid(format!(
                        "--addresses {a}: {room} addresses left in the subnet for {} clones",
                        names.len()
                    )));
                }
                Some((first, len))
            }
            None if template.contains("{ip}") || template.contains("{ip_addr}") => {
                return Err(ManagerError::Invalid(
                    "--vm-spec uses {ip}: give the first clone's address with --addresses".into(),
                ))
            }
            None => None,
        };
        // Locally administered, unicast (0x0a…), 24 random bits per
        // deployment and the clone's index: distinct within it, and
        // across deployments but by a 1-in-16-million chance.
        let seed = uuid::Uuid::new_v4();
        let r = seed.as_bytes();
        let mut ids = Vec::new();
        for (i, file) in names.iter().enumerate() {
            let index = i as u32 + 1;
            let name = file.strip_suffix(ext).unwrap_or(file).to_string();
            let ip = addresses
                .map(|(first, len)| (std::net::Ipv4Addr::from(u32::from(first) + i as u32), len));
            ids.push(CloneIdentity {
                name,
                uuid: uuid::Uuid::new_v4(),
                mac: format!(
                    "0a:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    r[0],
                    r[1],
                    r[2],
                    (index >> 8) as u8,
                    index as u8
                ),
                ip,
                index,
            });
        }
        // Render every clone and check it, before a byte moves.
        let mut macs = std::collections::BTreeSet::new();
        let mut disks = std::collections::BTreeSet::new();
        for (id, file) in ids.iter().zip(names) {
            let disk = format!("/clone-disks/{file}");
            // Files are the hosts' to check: the manager's filesystem is
            // not theirs.
            let spec = tandem_vmspec::parse_and_validate(&id.render(template, &disk), |_| true)
                .map_err(|e| ManagerError::Invalid(format!("--vm-spec for {}: {e}", id.name)))?;
            if spec.name != id.name {
                return Err(ManagerError::Invalid(format!(
                    "--vm-spec: name = \"{{name}}\" is what names each clone, not {:?}",
                    spec.name
                )));
            }
            if !spec.disks.iter().any(|d| d.path.to_string_lossy() == disk) {
                return Err(ManagerError::Invalid(
                    "--vm-spec: {disk} must be a disk's whole path".into(),
                ));
            }
            for n in &spec.nics {
                if !macs.insert(n.mac.0) {
                    return Err(ManagerError::Invalid(format!(
                        "--vm-spec: two clones share the MAC of NIC {}; use {{mac}}",
                        n.name
                    )));
                }
            }
            for d in &spec.disks {
                if !d.readonly && !disks.insert(d.path.clone()) {
                    return Err(ManagerError::Invalid(format!(
                        "--vm-spec: two clones share the writable disk {}",
                        d.path.display()
                    )));
                }
            }
        }
        for h in &req.hosts {
            let vms: Vec<tandem_api::VmSummary> = self
                .host_client(&ends[h], h, tls)
                .get("/v1/vms")
                .await
                .map_err(|e| host_error(h, "listing VMs", e))?;
            if let Some(v) = vms.iter().find(|v| ids.iter().any(|i| i.name == v.name)) {
                return Err(ManagerError::Conflict(format!(
                    "{h} already has a VM {}: choose another --name-prefix",
                    v.name
                )));
            }
        }
        Ok(ids)
    }

    /// Loads the saved deployments and resumes those still running
    /// (at start, once the manager can reach hosts).
    pub async fn resume_deployments(self: &Arc<Self>) -> Result<usize> {
        let tls = self.deploy_tls()?;
        let mut saved = typed::list::<SavedDeployment>(self.store().as_ref(), DEPLOYMENTS_PREFIX)
            .await?
            .into_iter()
            .map(|v| v.value)
            .collect::<Vec<_>>();
        saved.sort_by_key(|d| d.view.started_at);
        let mut resumed = 0;
        for d in saved {
            let shared = Arc::new(Mutex::new(d.view.clone()));
            self.deploy.deployments.lock().push(shared.clone());
            if d.view.state != DeployState::Running {
                continue;
            }
            let exec = Executor::resume(d, tls.clone(), Arc::clone(self.store()), shared);
            exec.say("resumed by a new manager: asking the hosts after their copies".into());
            tokio::spawn(exec.run());
            resumed += 1;
        }
        Ok(resumed)
    }

    /// Keeps the newest [`KEEP_DEPLOYMENTS`] finished deployments in the
    /// store.
    async fn prune_saved(&self) {
        let Ok(all) = self.store().list(DEPLOYMENTS_PREFIX).await else {
            return;
        };
        if all.len() <= KEEP_DEPLOYMENTS {
            return;
        }
        let mut ended: Vec<(u64, String)> = all
            .iter()
            .filter_map(|e| {
                let v: serde_json::Value = serde_json::from_slice(&e.value).ok()?;
                let view = &v["data"]["view"];
                (view["state"] != "running")
                    .then(|| (view["started_at"].as_u64().unwrap_or(0), e.key.clone()))
            })
            .collect();
        ended.sort();
        for (_, key) in ended.iter().take(all.len() - KEEP_DEPLOYMENTS) {
            let _ = self.store().delete(key).await;
        }
    }

    /// Every deployment this manager ran since it started.
    pub fn deployments(&self) -> Vec<DeploymentView> {
        self.deploy
            .deployments
            .lock()
            .iter()
            .map(|d| d.lock().clone())
            .collect()
    }

    pub fn deployment(&self, id: &str) -> Result<DeploymentView> {
        self.deploy
            .deployments
            .lock()
            .iter()
            .map(|d| d.lock().clone())
            .find(|d| d.id == id)
            .ok_or_else(|| ManagerError::NotFound(format!("no deployment {id}")))
    }

    fn deploy_tls(&self) -> Result<Arc<ClientConfig>> {
        self.dvs.host_tls.read().clone().ok_or_else(|| {
            ManagerError::Conflict(
                "this manager has no certificate to reach hosts with (Manager::set_identity)"
                    .into(),
            )
        })
    }

    /// Times `probe_bytes` over every direct link into a target, one link
    /// at a time (probes at once would share the hosts' NICs), and scales
    /// to the image.
    async fn probe_links(
        &self,
        all: &[String],
        ends: &BTreeMap<String, HostEnds>,
        tls: &Arc<ClientConfig>,
        image_bytes: u64,
        probe_bytes: Option<u64>,
    ) -> Result<Vec<LinkSeconds>> {
        let bytes = probe_bytes
            .unwrap_or(DEFAULT_PROBE_BYTES)
            .clamp(64 << 10, tandem_api::deploy::MAX_PROBE_BYTES);
        let mut links = Vec::new();
        for to in &all[1..] {
            let c = self
                .host_client(&ends[to], to, tls)
                .with_timeout(Duration::from_secs(120));
            for from in all {
                if from == to {
                    continue;
                }
                let req = ProbeRequest {
                    from_host: from.clone(),
                    from_address: ends[from].image.clone(),
                    bytes,
                };
                match c.post::<_, ProbeResult>("/v1/deploy/probe", &req).await {
                    Ok(r) if r.bytes_per_s > 0.0 => links.push(LinkSeconds {
                        from: from.clone(),
                        to: to.clone(),
                        seconds: image_bytes as f64 / r.bytes_per_s,
                    }),
                    Ok(_) => {}
                    // No probe, no link: the plan routes around it.
                    Err(e) => warn!(from = %from, to = %to, "probe failed: {e}"),
                }
            }
        }
        Ok(links)
    }
}

/// Where deployments are saved.
pub const DEPLOYMENTS_PREFIX: &str = "deployments/";
/// How often a running deployment is saved when nothing else happens.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// A deployment as saved in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedDeployment {
    view: DeploymentView,
    deployment: Deployment,
    ends: BTreeMap<String, HostEnds>,
    image: ImageInfo,
    names: Vec<String>,
    next_name: usize,
    base: BTreeMap<String, String>,
    inflight: Vec<SavedInflight>,
    partials: Vec<(String, String)>,
    /// Local copies asked for and not yet seen done: (host, datastore,
    /// file).
    locals: Vec<(String, String, String)>,
    jobs: u32,
    vm_spec: Option<(String, Vec<CloneIdentity>, bool)>,
    /// The executor's clock (the plan's time) when saved.
    elapsed_s: f64,
}

impl crate::store::typed::Record for SavedDeployment {
    const KIND: &'static str = "deployment";
    const SCHEMA: u32 = 1;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedInflight {
    from: String,
    to: String,
    job: String,
    file: String,
    elapsed_s: f64,
    last_fraction: f64,
    transfer: usize,
}

struct Inflight {
    job: String,
    file: String,
    started: Instant,
    last_fraction: f64,
    transfer: usize,
    /// The start of the current rate window: when, and the fraction done
    /// then.
    window: Option<(Instant, f64)>,
}

/// How long a copy is watched before its rate is compared with its
/// link's time.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// How far (a share of the link's time) a copy's rate may drift from the
/// matrix before the link's time is changed and the plan made again.
const RATE_DRIFT: f64 = 0.25;

struct Executor {
    id: String,
    deployment: Deployment,
    tls: Arc<ClientConfig>,
    ends: BTreeMap<String, HostEnds>,
    image: ImageInfo,
    names: Vec<String>,
    next_name: usize,
    /// A whole copy on each host that has one: what it sends from and
    /// copies locally from.
    base: BTreeMap<String, String>,
    /// Network copies in flight, by (from, to).
    inflight: BTreeMap<(String, String), Inflight>,
    /// Files of failed copies whose partial file is to be removed, by
    /// host.
    partials: Vec<(String, String)>,
    locals: tokio::task::JoinSet<(
        String,
        String,
        String,
        std::result::Result<LocalCopyDone, String>,
    )>,
    started: Instant,
    view: Arc<Mutex<DeploymentView>>,
    /// Hosts that did not answer, since when.
    silent_since: HashMap<String, Instant>,
    /// Copies asked of hosts so far: each gets its own id, also a retry
    /// of the same file.
    jobs: u32,
    /// The clones' spec template, their identities (by copy name, in
    /// order) and whether to start them.
    vm_spec: Option<(String, Vec<CloneIdentity>, bool)>,
    /// Local copies asked for and not yet done (host, datastore, file).
    local_files: Vec<(String, String, String)>,
    store: Arc<dyn crate::store::Store>,
    saved_at: Instant,
}

impl Executor {
    fn resume(
        d: SavedDeployment,
        tls: Arc<ClientConfig>,
        store: Arc<dyn crate::store::Store>,
        view: Arc<Mutex<DeploymentView>>,
    ) -> Executor {
        let now = Instant::now();
        let ago = |s: f64| {
            now.checked_sub(Duration::from_secs_f64(s.max(0.0)))
                .unwrap_or(now)
        };
        let mut exec = Executor {
            id: d.view.id.clone(),
            deployment: d.deployment,
            tls,
            ends: d.ends,
            image: d.image,
            names: d.names,
            next_name: d.next_name,
            base: d.base,
            inflight: d
                .inflight
                .into_iter()
                .map(|f| {
                    (
                        (f.from, f.to),
                        Inflight {
                            job: f.job,
                            file: f.file,
                            started: ago(f.elapsed_s),
                            last_fraction: f.last_fraction,
                            transfer: f.transfer,
                            window: None,
                        },
                    )
                })
                .collect(),
            partials: d.partials,
            locals: tokio::task::JoinSet::new(),
            started: ago(d.elapsed_s),
            view,
            silent_since: HashMap::new(),
            jobs: d.jobs,
            vm_spec: d.vm_spec,
            local_files: Vec::new(),
            store,
            saved_at: now,
        };
        // A local copy asked of a host before the restart goes on there
        // (the request's end does not stop it): wait for its file.
        for (host, datastore, file) in d.locals {
            let c = exec.client(&host).with_timeout(Duration::from_secs(5));
            exec.local_files
                .push((host.clone(), datastore.clone(), file.clone()));
            exec.locals.spawn(async move {
                let deadline = Instant::now() + LOCAL_COPY_REQUEST;
                let r = loop {
                    match c
                        .get::<ImageInfo>(&format!("/v1/deploy/images/{file}"))
                        .await
                    {
                        Ok(i) => {
                            break Ok(LocalCopyDone {
                                dest: i.name,
                                method: tandem_api::deploy::LocalCopyMethod::Copy,
                                bytes: i.bytes,
                                elapsed_ms: 0,
                            })
                        }
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(500)).await
                        }
                        Err(e) => break Err(format!("not seen after the restart: {e}")),
                    }
                };
                (host, datastore, file, r)
            });
        }
        exec
    }

    fn snapshot(&self) -> SavedDeployment {
        SavedDeployment {
            view: self.view.lock().clone(),
            deployment: self.deployment.clone(),
            ends: self.ends.clone(),
            image: self.image.clone(),
            names: self.names.clone(),
            next_name: self.next_name,
            base: self.base.clone(),
            inflight: self
                .inflight
                .iter()
                .map(|((from, to), f)| SavedInflight {
                    from: from.clone(),
                    to: to.clone(),
                    job: f.job.clone(),
                    file: f.file.clone(),
                    elapsed_s: f.started.elapsed().as_secs_f64(),
                    last_fraction: f.last_fraction,
                    transfer: f.transfer,
                })
                .collect(),
            partials: self.partials.clone(),
            locals: self.local_files.clone(),
            jobs: self.jobs,
            vm_spec: self.vm_spec.clone(),
            elapsed_s: self.now(),
        }
    }

    /// Saves the deployment; a store that fails is logged, not fatal (the
    /// deployment goes on; only a restart would lose it).
    async fn save(&mut self) {
        self.saved_at = Instant::now();
        let key = format!("{DEPLOYMENTS_PREFIX}{}", self.id);
        if let Err(e) = typed::put(self.store.as_ref(), &key, &self.snapshot()).await {
            warn!(deployment = %self.id, "saving the deployment: {e}");
        }
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn say(&self, line: String) {
        self.view.lock().say(self.started, line);
    }

    fn client(&self, host: &str) -> ClusterClient {
        ClusterClient::to_host(&self.ends[host].api, host, Arc::clone(&self.tls))
            .with_timeout(HOST_REQUEST)
    }

    fn next_name(&mut self) -> Option<String> {
        let n = self.names.get(self.next_name).cloned();
        self.next_name += 1;
        n
    }

    /// Records `event` and re-plans; an event the plan refuses ends the
    /// deployment (it is a bug here, not a state to go on from).
    fn apply(&mut self, event: Event) -> std::result::Result<Plan, String> {
        let at = self.now().max(self.deployment.progress.now);
        self.deployment
            .apply(at, &event)
            .map_err(|e| format!("the planner refused {event:?}: {e}"))
    }

    async fn run(mut self) {
        let mut outcome = self.drive().await;
        if outcome.is_ok() {
            outcome = self.define_vms().await;
        }
        let leftover = self.cleanup().await;
        self.finish(outcome, leftover);
        self.save().await;
    }

    fn finish(&self, outcome: std::result::Result<(), String>, leftover: Option<String>) {
        let mut v = self.view.lock();
        v.elapsed_s = self.started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {
                v.state = DeployState::Done;
                let line = format!("done in {:.1} s", v.elapsed_s);
                v.say(self.started, line);
            }
            Err(e) => {
                v.state = DeployState::Failed;
                let e = match leftover {
                    Some(l) => format!("{e}; {l}"),
                    None => e,
                };
                v.say(self.started, format!("failed: {e}"));
                v.error = Some(e);
            }
        }
    }

    async fn drive(&mut self) -> std::result::Result<(), String> {
        let mut plan = self.deployment.plan().map_err(|e| e.to_string())?;
        loop {
            if let Some(reason) = &plan.abort {
                return Err(format!("aborted: {reason}"));
            }
            // Start what is due; each start re-plans, so loop until
            // nothing more is due now (bounded by the number of steps).
            for _ in 0..4 * (self.names.len() + 8) {
                let Some(step) = plan.due().next().cloned() else {
                    break;
                };
                plan = self.start(step.action).await?;
                self.save().await;
                if let Some(reason) = &plan.abort {
                    return Err(format!("aborted: {reason}"));
                }
            }
            if plan.steps.is_empty() && self.inflight.is_empty() && self.locals.is_empty() {
                if !plan.unreachable.is_empty() || !plan.failed.is_empty() {
                    let mut missed = plan.unreachable.clone();
                    missed.extend(plan.failed.iter().cloned());
                    return Err(format!(
                        "no copies reached {}: no route from a host with a copy",
                        missed.join(", ")
                    ));
                }
                return Ok(());
            }
            // Wait for a local copy to end, or the next poll.
            let mut events = Vec::new();
            tokio::select! {
                Some(done) = self.locals.join_next(), if !self.locals.is_empty() => {
                    if let Ok(d) = done {
                        events.extend(self.local_done(d)?);
                    }
                }
                () = tokio::time::sleep(POLL) => {}
            }
            events.extend(self.poll().await);
            if events.is_empty() {
                events.push(Event::Tick);
            }
            let notable = events
                .iter()
                .any(|e| !matches!(e, Event::Tick | Event::TransferProgress { .. }));
            for e in events {
                plan = self.apply(e)?;
            }
            self.update_view(&plan);
            if notable || self.saved_at.elapsed() >= SAVE_EVERY {
                self.save().await;
            }
        }
    }

    fn update_view(&self, plan: &Plan) {
        let mut v = self.view.lock();
        v.plan = plan.clone();
        v.elapsed_s = self.started.elapsed().as_secs_f64();
        for h in &mut v.hosts {
            h.failed = self.deployment.progress.failed_hosts.contains(&h.host);
            h.copies_done = self
                .deployment
                .progress
                .copies
                .iter()
                .filter(|c| c.host == h.host)
                .map(|c| c.complete)
                .sum();
        }
    }

    fn local_done(
        &mut self,
        (host, datastore, file, r): (
            String,
            String,
            String,
            std::result::Result<LocalCopyDone, String>,
        ),
    ) -> std::result::Result<Vec<Event>, String> {
        self.local_files
            .retain(|(h, _, f)| !(*h == host && *f == file));
        match r {
            Ok(d) => {
                self.say(format!(
                    "{host}: {file} ready ({:?}, {} ms)",
                    d.method, d.elapsed_ms
                ));
                let mut v = self.view.lock();
                if let Some(c) = v
                    .copies
                    .iter_mut()
                    .find(|c| c.host == host && c.file == file)
                {
                    c.done = true;
                }
                drop(v);
                Ok(vec![Event::LocalCopyCompleted { host, datastore }])
            }
            // A local copy that fails is a host problem the plan has no
            // event for (the disk filled, the file vanished): end here.
            Err(e) => Err(format!("{host}: the local copy {file} failed: {e}")),
        }
    }

    async fn start(&mut self, action: Action) -> std::result::Result<Plan, String> {
        match action {
            Action::NetworkCopy {
                from,
                to,
                to_datastore,
                ..
            } => {
                let Some(source) = self.base.get(&from).cloned() else {
                    return Err(format!("the plan sends from {from}, which holds no copy"));
                };
                let Some(file) = self.next_name() else {
                    return Err("the plan makes more copies than were placed".into());
                };
                self.jobs += 1;
                let job = format!("{}-{}-{file}", self.id, self.jobs);
                let req = CopyRequest {
                    id: job.clone(),
                    from_host: from.clone(),
                    from_address: self.ends[&from].image.clone(),
                    image: source,
                    bytes: self.image.bytes,
                    sha256: self.image.sha256.clone(),
                    dest: file.clone(),
                };
                match self
                    .client(&to)
                    .post::<_, CopyStatus>("/v1/deploy/copies", &req)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.kind_str().is_none() => {
                        self.say(format!("{to} does not answer ({e}): taken as failed"));
                        return self.apply(Event::HostFailed { host: to });
                    }
                    Err(e) => return Err(format!("{to} refused the copy from {from}: {e}")),
                }
                self.say(format!("network copy {from} -> {to}: {file}"));
                let transfer = {
                    let mut v = self.view.lock();
                    v.copies.push(CloneCopy {
                        host: to.clone(),
                        file: file.clone(),
                        via: format!("network from {from}"),
                        done: false,
                    });
                    v.transfers.push(TransferView {
                        from: from.clone(),
                        to: to.clone(),
                        file: file.clone(),
                        bytes_done: 0,
                        bytes_total: self.image.bytes,
                        state: "running".into(),
                        seconds: 0.0,
                    });
                    v.transfers.len() - 1
                };
                self.inflight.insert(
                    (from.clone(), to.clone()),
                    Inflight {
                        job,
                        file,
                        started: Instant::now(),
                        last_fraction: 0.0,
                        transfer,
                        window: None,
                    },
                );
                self.apply(Event::TransferStarted {
                    from,
                    to,
                    datastore: to_datastore,
                })
            }
            Action::LocalCopy { host, datastore }
            | Action::CrossDatastoreCopy {
                host,
                to_datastore: datastore,
                ..
            } => {
                let Some(source) = self.base.get(&host).cloned() else {
                    return Err(format!(
                        "the plan copies locally on {host}, which holds no copy"
                    ));
                };
                let Some(file) = self.next_name() else {
                    return Err("the plan makes more copies than were placed".into());
                };
                self.view.lock().copies.push(CloneCopy {
                    host: host.clone(),
                    file: file.clone(),
                    via: "local".into(),
                    done: false,
                });
                let c = self.client(&host).with_timeout(LOCAL_COPY_REQUEST);
                let req = LocalCopyRequest {
                    source,
                    dest: file.clone(),
                };
                let (h, d) = (host.clone(), datastore.clone());
                self.local_files
                    .push((host.clone(), datastore.clone(), file.clone()));
                self.locals.spawn(async move {
                    let r = c
                        .post::<_, LocalCopyDone>("/v1/deploy/local-copies", &req)
                        .await
                        .map_err(|e| e.to_string());
                    (h, d, file, r)
                });
                self.apply(Event::LocalCopyStarted { host, datastore })
            }
            Action::CancelTransfer { from, to } => {
                if let Some(f) = self.inflight.remove(&(from.clone(), to.clone())) {
                    let _ = self
                        .client(&to)
                        .delete::<CopyStatus>(&format!("/v1/deploy/copies/{}", f.job))
                        .await;
                    self.say(format!(
                        "cancelled {from} -> {to}: a better route reaches {to}"
                    ));
                    self.mark_transfer(f.transfer, "cancelled", None);
                    self.view
                        .lock()
                        .copies
                        .retain(|c| !(c.host == to && c.file == f.file));
                    // The name goes back for the copy that replaces it.
                    self.names.push(f.file.clone());
                    self.partials.push((to.clone(), f.file));
                }
                self.apply(Event::TransferFailed { from, to })
            }
            Action::DeletePartial { host, datastore } => {
                if let Some(i) = self.partials.iter().position(|(h, _)| *h == host) {
                    let (_, file) = self.partials.remove(i);
                    match self
                        .client(&host)
                        .delete::<serde_json::Value>(&format!("/v1/deploy/partials/{file}"))
                        .await
                    {
                        Ok(_) => self.say(format!("{host}: {file}.partial removed")),
                        // The copy removes its own partial file when it
                        // ends; a host that does not answer is taken care
                        // of by its failure.
                        Err(e) => self.say(format!("{host}: removing {file}.partial: {e}")),
                    }
                }
                self.apply(Event::PartialDeleted { host, datastore })
            }
            Action::Abort { reason } => Err(format!("aborted: {reason}")),
        }
    }

    /// Defines (and starts) a VM on each verified copy.
    async fn define_vms(&mut self) -> std::result::Result<(), String> {
        let Some((template, ids, start)) = self.vm_spec.clone() else {
            return Ok(());
        };
        let copies: Vec<CloneCopy> = self.view.lock().copies.clone();
        for (i, id) in ids.iter().enumerate() {
            let file = &self.names[i];
            let Some(copy) = copies.iter().find(|c| c.file == *file && c.done) else {
                return Err(format!("no verified copy {file} to define {} on", id.name));
            };
            let host = copy.host.clone();
            let disk = format!("{}/{file}", self.ends[&host].image_dir);
            let spec = id.render(&template, &disk);
            let req = tandem_api::CreateVmRequest {
                spec_toml: spec,
                uuid: Some(id.uuid.to_string()),
            };
            let c = self.client(&host);
            c.post::<_, serde_json::Value>("/v1/vms", &req)
                .await
                .map_err(|e| format!("{host}: defining {}: {e}", id.name))?;
            let mut started = false;
            if start {
                c.with_timeout(Duration::from_secs(120))
                    .post::<_, serde_json::Value>(
                        &format!("/v1/vms/{}/start", id.name),
                        &serde_json::json!({}),
                    )
                    .await
                    .map_err(|e| format!("{host}: starting {}: {e}", id.name))?;
                started = true;
            }
            self.say(format!(
                "{host}: VM {} defined on {file} (uuid {}, mac {}{}){}",
                id.name,
                id.uuid,
                id.mac,
                id.ip.map(|(a, l)| format!(", {a}/{l}")).unwrap_or_default(),
                if started { ", started" } else { "" }
            ));
            self.view.lock().vms.push(CloneVm {
                host,
                name: id.name.clone(),
                uuid: id.uuid.to_string(),
                mac: id.mac.clone(),
                ip: id.ip.map(|(a, l)| format!("{a}/{l}")),
                disk,
                started,
            });
        }
        Ok(())
    }

    fn mark_transfer(&self, i: usize, state: &str, bytes: Option<u64>) {
        let mut v = self.view.lock();
        if let Some(t) = v.transfers.get_mut(i) {
            t.state = state.into();
            if let Some(b) = bytes {
                t.bytes_done = b;
            }
        }
    }

    /// Asks every receiving host how its copy goes.
    async fn poll(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let mut drift = Vec::new();
        let keys: Vec<(String, String)> = self.inflight.keys().cloned().collect();
        for (from, to) in keys {
            let job = self.inflight[&(from.clone(), to.clone())].job.clone();
            let answer = self
                .client(&to)
                .with_timeout(Duration::from_secs(2))
                .get::<CopyStatus>(&format!("/v1/deploy/copies/{job}"))
                .await;
            let status = match answer {
                Ok(s) => {
                    self.silent_since.remove(&to);
                    s
                }
                Err(e) => {
                    let since = *self
                        .silent_since
                        .entry(to.clone())
                        .or_insert_with(Instant::now);
                    if since.elapsed() >= HOST_SILENT {
                        self.say(format!(
                            "{to} has not answered for {} s ({e}): taken as failed",
                            HOST_SILENT.as_secs()
                        ));
                        let f = self.inflight.remove(&(from.clone(), to.clone()));
                        if let Some(f) = f {
                            self.mark_transfer(f.transfer, "failed", None);
                        }
                        events.push(Event::HostFailed { host: to.clone() });
                    }
                    continue;
                }
            };
            let f = self
                .inflight
                .get_mut(&(from.clone(), to.clone()))
                .expect("polled");
            let transfer = f.transfer;
            {
                let mut v = self.view.lock();
                if let Some(t) = v.transfers.get_mut(transfer) {
                    t.bytes_done = status.bytes_done;
                    t.seconds = status.elapsed_ms as f64 / 1000.0;
                }
                if let Some(h) = v.hosts.iter_mut().find(|h| h.host == to) {
                    h.bytes_received = status.bytes_done;
                }
            }
            match status.state {
                CopyState::Running => {
                    let fraction = if status.bytes_total > 0 {
                        (status.bytes_done as f64 / status.bytes_total as f64).clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    if fraction - f.last_fraction >= 0.01 {
                        f.last_fraction = fraction;
                        events.push(Event::TransferProgress {
                            from: from.clone(),
                            to: to.clone(),
                            done_fraction: fraction,
                        });
                    }
                    // The copy's own rate over the last window: when it
                    // drifts from the link's time (the link slowed, or was
                    // faster than probed), the link gets the time the copy
                    // shows and the plan is made again.
                    let now = Instant::now();
                    let (w_at, w_fraction) = *f.window.get_or_insert((now, fraction));
                    let dt = now.duration_since(w_at).as_secs_f64();
                    if dt >= RATE_WINDOW.as_secs_f64() {
                        f.window = Some((now, fraction));
                        let moved = fraction - w_fraction;
                        if let Ok(Some(planned)) = self.deployment.matrix.time(&from, &to) {
                            let shown = if moved > 0.0 {
                                (dt / moved).min(planned * 10.0)
                            } else {
                                planned * 10.0
                            };
                            if (shown - planned).abs() > RATE_DRIFT * planned {
                                drift.push(format!(
                                    "{from} -> {to}: the copy shows {shown:.1} s per image, the plan had {planned:.1} s"
                                ));
                                events.push(Event::LinkTime {
                                    from,
                                    to,
                                    time: shown,
                                });
                            }
                        }
                    }
                }
                CopyState::Done => {
                    let f = self
                        .inflight
                        .remove(&(from.clone(), to.clone()))
                        .expect("polled");
                    let took = f.started.elapsed().as_secs_f64();
                    self.say(format!(
                        "{to}: {} verified ({} bytes from {from} in {took:.2} s)",
                        f.file, status.bytes_done
                    ));
                    self.mark_transfer(transfer, "done", Some(status.bytes_done));
                    {
                        let mut v = self.view.lock();
                        if let Some(c) = v
                            .copies
                            .iter_mut()
                            .find(|c| c.host == to && c.file == f.file)
                        {
                            c.done = true;
                        }
                    }
                    self.base.entry(to.clone()).or_insert(f.file);
                    events.push(Event::TransferCompleted {
                        from,
                        to,
                        observed: Some(took.max(1e-3)),
                    });
                }
                CopyState::Failed | CopyState::Cancelled => {
                    let f = self
                        .inflight
                        .remove(&(from.clone(), to.clone()))
                        .expect("polled");
                    let why = status.error.unwrap_or_else(|| "cancelled".into());
                    self.say(format!("{from} -> {to} failed: {why}"));
                    self.mark_transfer(transfer, "failed", None);
                    {
                        let mut v = self.view.lock();
                        v.copies.retain(|c| !(c.host == to && c.file == f.file));
                    }
                    // The name goes back for the copy that replaces it.
                    self.names.push(f.file.clone());
                    self.partials.push((to.clone(), f.file));
                    events.push(Event::TransferFailed {
                        from: from.clone(),
                        to: to.clone(),
                    });
                    // A copy breaks off when its sender dies: ask it. If
                    // both ends live, the path between them failed (a
                    // link, a firewall, a stall): the plan routes around
                    // it rather than trying the same link again.
                    if !self.source_answers(&from).await {
                        self.say(format!("{from} does not answer: taken as failed"));
                        events.push(Event::HostFailed { host: from });
                    } else {
                        self.say(format!("the link {from} -> {to} is taken out of the plan"));
                        events.push(Event::LinkDown { from, to });
                    }
                }
            }
        }
        for d in drift {
            self.say(d);
        }
        events
    }

    async fn source_answers(&self, host: &str) -> bool {
        let Some(file) = self.base.get(host) else {
            return false;
        };
        self.client(host)
            .with_timeout(Duration::from_secs(3))
            .get::<ImageInfo>(&format!("/v1/deploy/images/{file}"))
            .await
            .is_ok()
    }

    /// Stops what runs and removes partial files; returns what could not
    /// be cleaned.
    async fn cleanup(&mut self) -> Option<String> {
        let mut left = Vec::new();
        let inflight = std::mem::take(&mut self.inflight);
        for ((_, to), f) in inflight {
            let r = self
                .client(&to)
                .delete::<CopyStatus>(&format!("/v1/deploy/copies/{}", f.job))
                .await;
            if r.is_err() {
                left.push(format!("{to}:{}.partial", f.file));
            }
        }
        self.locals.abort_all();
        for (host, file) in std::mem::take(&mut self.partials) {
            if self.deployment.progress.failed_hosts.contains(&host) {
                continue;
            }
            let _ = self
                .client(&host)
                .delete::<serde_json::Value>(&format!("/v1/deploy/partials/{file}"))
                .await;
        }
        (!left.is_empty())
            .then(|| format!("not cleaned (hosts did not answer): {}", left.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_count_what_is_left_in_the_subnet() {
        let (a, len, room) = parse_addresses("10.231.0.61/24").unwrap();
        assert_eq!((a.to_string(), len, room), ("10.231.0.61".into(), 24, 194));
        assert_eq!(parse_addresses("10.0.0.1/30").unwrap().2, 2);
        for bad in [
            "10.0.0.1",
            "10.0.0.1/0",
            "10.0.0.1/31",
            "x/24",
            "10.0.0.1/2x",
            "",
        ] {
            assert!(parse_addresses(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_clone_spec_is_filled_in_everywhere() {
        let id = CloneIdentity {
            name: "web-02".into(),
            uuid: uuid::Uuid::nil(),
            mac: "0a:01:02:03:00:02".into(),
            ip: Some(("10.0.0.11".parse().unwrap(), 24)),
            index: 2,
        };
        let out = id.render(
            "{name} {uuid} {mac} {disk} {ip} {ip_addr} {index} {name}",
            "/d/web-02.img",
        );
        assert_eq!(
            out,
            "web-02 00000000-0000-0000-0000-000000000000 0a:01:02:03:00:02 /d/web-02.img 10.0.0.11/24 10.0.0.11 2 web-02"
        );
    }
}
