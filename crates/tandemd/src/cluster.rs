//! tandemd's place in a cluster: its certificate, who may replicate to it,
//! and, for a host that joined a manager, the agent that keeps both
//! current.
//!
//! A host with an identity (`STATE/identity/identity.pem`, from `tandem
//! host join` or `tandem cluster init --standalone`) speaks mutual TLS on
//! every TCP replication link, in both directions, and admits a primary
//! only as its authority says: the manager's records as last fetched
//! (cached on disk, so a manager outage changes nothing), or for a
//! standalone pair the optional `--repl-peers` list (without one, any host
//! certificate of the pair's own CA may protect any VM). A host without
//! an identity keeps the behaviour from before the cluster, and says at
//! start that its TCP listener authenticates nobody.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use parking_lot::RwLock;
use tandem_manager::agent::{AgentConfig, HostAgent, Reporter};
use tandem_manager::api::HostAuthority;
use tandem_manager::model::host::{
    Datastore, DatastoreKind, Health, HealthState, Inventory, MemoryInfo, Neighbour, PortGroupInfo,
    QemuInfo, Uplink,
};
use tandem_pki::rustls::{ClientConfig, ServerConfig};
use tandem_pki::{Identity, NoRevocations, Revocations, Role};
use tandem_replication::authority::{
    AllowList, Authority, PeerIdentity, RecordedPrimaries, Unrestricted, VmAuthority,
};
use tandem_replication::wire::Hello;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::switchtxn::SwitchTxns;

/// This host's cluster identity and the rules that go with it.
pub struct ClusterLink {
    identity: watch::Receiver<Arc<Identity>>,
    revocations: Arc<dyn Revocations>,
    authority: Arc<CurrentAuthority>,
    /// "manager" or "standalone".
    pub mode: &'static str,
    /// The switch's transactions, once tandemd made them (after the
    /// cluster link: they need to know whether a manager manages the host).
    txns: Arc<OnceLock<Arc<SwitchTxns>>>,
    /// Where host-syncs go (a joined host's agent).
    agent: Option<tandem_manager::agent::AgentHandle>,
}

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLink")
            .field("name", &self.name())
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ClusterLink {
    /// This host's certificate name.
    pub fn name(&self) -> String {
        self.identity.borrow().name().to_string()
    }

    /// The replication listener's TLS: only host certificates of this
    /// cluster, checked against the current revocation list. Built per
    /// connection from the current identity, so a renewal takes effect at
    /// once.
    pub fn replication_server(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let id = self.identity.borrow().clone();
        tandem_pki::server_config_for_roles(&id, self.revocations.clone(), &[Role::Host])
            .context("building the replication listener's TLS")
    }

    /// The host API's TLS: the cluster's manager and operators only (never
    /// another host), checked against the current revocation list; built
    /// per connection like the replication listener's.
    pub fn host_api_server(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let id = self.identity.borrow().clone();
        tandem_pki::server_config_for_roles(
            &id,
            self.revocations.clone(),
            &[Role::Manager, Role::Operator],
        )
        .context("building the host API's TLS")
    }

    /// The image service's TLS: the cluster's hosts (which pull copies),
    /// its manager and operators, checked against the revocation list.
    pub fn image_service_server(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let id = self.identity.borrow().clone();
        tandem_pki::server_config_for_roles(
            &id,
            self.revocations.clone(),
            &[Role::Host, Role::Manager, Role::Operator],
        )
        .context("building the image service's TLS")
    }

    /// TLS for dialling another host of the cluster.
    pub fn client(&self) -> anyhow::Result<Arc<ClientConfig>> {
        let id = self.identity.borrow().clone();
        tandem_pki::client_config(&id, self.revocations.clone())
            .context("building the replication link's TLS")
    }

    /// The revocation list every TLS configuration of this host checks.
    pub fn revocations(&self) -> Arc<dyn Revocations> {
        self.revocations.clone()
    }

    pub fn authority(&self) -> Arc<dyn Authority> {
        self.authority.clone()
    }

    /// The manager agent, on a host that joined a manager.
    pub fn agent(&self) -> Option<&tandem_manager::agent::AgentHandle> {
        self.agent.as_ref()
    }

    /// Lets the agent report the switch's transactions (status in every
    /// heartbeat, host-syncs after a rollback).
    pub fn attach_switch_txns(&self, txns: Arc<SwitchTxns>) {
        let agent = self.agent.clone();
        txns.set_sync(Arc::new(move |s: crate::switchtxn::HostSync| {
            info!(
                txid = s.txid.as_deref().unwrap_or("-"),
                outcome = ?s.outcome,
                digest = %s.running_digest,
                alarm = s.alarm.as_deref().unwrap_or("-"),
                "host-sync"
            );
            let Some(agent) = &agent else { return };
            let msg = tandem_manager::api::HostSwitchSync {
                txid: s.txid,
                outcome: s.outcome,
                running_digest: s.running_digest,
                document_toml: s.document_toml,
            };
            if let Err(e) = agent.switch_sync(msg) {
                warn!("host-sync not queued for the manager: {e} (its heartbeats carry the switch's state)");
            }
        }));
        let _ = self.txns.set(txns);
    }
}

/// The authority in force, replaced when the manager's records change.
struct CurrentAuthority {
    rule: RwLock<Arc<dyn Authority>>,
    /// A joined host's agent: a refusal asks it to fetch the records now.
    agent: Option<tandem_manager::agent::AgentHandle>,
}

impl std::fmt::Debug for CurrentAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentAuthority")
            .field("rule", &self.rule.read())
            .finish_non_exhaustive()
    }
}

impl CurrentAuthority {
    fn new(rule: Arc<dyn Authority>, agent: Option<tandem_manager::agent::AgentHandle>) -> Self {
        CurrentAuthority {
            rule: RwLock::new(rule),
            agent,
        }
    }
}

impl Authority for CurrentAuthority {
    fn admit_primary(&self, peer: &PeerIdentity, hello: &Hello) -> Result<(), String> {
        let current = self.rule.read().clone();
        let verdict = current.admit_primary(peer, hello);
        // The cache may be older than the record the primary just made
        // (a VM registered, a new backup): fetch it now, so that the
        // primary's next try, a heartbeat later, meets the manager's
        // record instead of waiting for this host's next tick. The agent
        // rate-limits it, so a primary refused for good costs at most a
        // request a second.
        if verdict.is_err() && matches!(peer, PeerIdentity::Certified { .. }) {
            if let Some(agent) = &self.agent {
                if agent.refresh_authority() {
                    info!(vm = %hello.vm, uuid = %hello.uuid, "refused a primary: fetching the VM authority from the manager now");
                }
            }
        }
        verdict
    }
}

fn recorded(a: &HostAuthority) -> RecordedPrimaries {
    RecordedPrimaries {
        this_host: a.host.clone(),
        vms: a
            .vms
            .iter()
            .map(|r| {
                (
                    r.uuid.hyphenated().to_string(),
                    VmAuthority {
                        name: r.name.clone(),
                        primary: r.primary.clone(),
                        backup: r.backup.clone().unwrap_or_default(),
                        generation: r.generation,
                    },
                )
            })
            .collect(),
    }
}

/// What tandemd reports to the manager about this host.
pub struct HostReporter {
    /// Where the manager reaches this host's API (`--host-api`).
    pub host_api: Option<String>,
    /// Where other hosts reach its image service (`--image-listen`).
    pub image_service: Option<String>,
    pub txns: Arc<OnceLock<Arc<SwitchTxns>>>,
    pub state_dir: PathBuf,
    pub image_dir: Option<PathBuf>,
    /// Where deployments copy to (`--datastore`).
    pub datastore: Option<PathBuf>,
    pub qemu: QemuInfo,
    pub switch: Arc<tandem_switch::host::SwitchHost>,
}

impl HostReporter {
    /// Asks the QEMU binary for its version and machine types once.
    pub fn probe_qemu(binary: &Path) -> QemuInfo {
        let run = |args: &[&str]| {
            std::process::Command::new(binary)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let version = run(&["--version"])
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .unwrap_or("")
            .to_string();
        let machine_types = run(&["-machine", "help"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        QemuInfo {
            version,
            machine_types,
        }
    }

    fn datastore(path: &Path) -> Option<Datastore> {
        let st = nix::sys::statvfs::statvfs(path).ok()?;
        let unit = st.fragment_size() as u64;
        Some(Datastore {
            path: path.display().to_string(),
            total_bytes: (st.blocks() as u64).saturating_mul(unit),
            free_bytes: (st.blocks_available() as u64).saturating_mul(unit),
            kind: DatastoreKind::Local,
        })
    }

    /// One uplink member as the inventory reports it: the neighbour the
    /// document declares for its uplink, the one LLDP hears on it (while
    /// its TTL lasts), and, when they disagree, a line that says so. A
    /// field of the uplink rather than a health problem: the uplink still
    /// carries traffic, LLDP comes and goes with its TTL (health would
    /// flap with it), and the manager and CLI show it beside the uplink
    /// it concerns.
    fn uplink(
        member: &str,
        declared: Option<&str>,
        lldp: Option<&tandem_switch::lldp::LldpNeighbour>,
    ) -> Uplink {
        let mut u = Uplink {
            name: member.to_string(),
            declared_neighbour: declared.map(|d| Neighbour {
                chassis: d.to_string(),
                port: None,
                chassis_id: None,
            }),
            lldp_neighbour: lldp.map(|n| Neighbour {
                chassis: n
                    .system_name
                    .clone()
                    .unwrap_or_else(|| n.chassis_id.to_string()),
                port: Some(n.port_id.to_string()),
                chassis_id: Some(n.chassis_id.to_string()),
            }),
            neighbour_mismatch: None,
        };
        if let (Some(d), Some(n), Some(false)) = (declared, lldp, u.neighbour_matches()) {
            u.neighbour_mismatch = Some(format!("{member}: declared \"{d}\", LLDP hears {n}"));
        }
        u
    }

    fn memory() -> MemoryInfo {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
                .map_or(0, |kib| kib.saturating_mul(1024))
        };
        MemoryInfo {
            total_bytes: field("MemTotal:"),
            free_bytes: field("MemAvailable:"),
        }
    }
}

impl Reporter for HostReporter {
    fn host_api(&self) -> Option<String> {
        self.host_api.clone()
    }

    fn switch_status(&self) -> Option<tandem_api::SwitchTxnStatus> {
        self.txns.get().map(|t| t.status())
    }

    fn health(&self) -> Health {
        let mut problems = Vec::new();
        if let Some(alarm) = self.txns.get().and_then(|t| t.status().alarm) {
            problems.push(alarm);
        }
        if let Some(ds) = Self::datastore(&self.state_dir) {
            // Below 1 GiB free, replicas and checkpoints start failing.
            if ds.free_bytes < 1 << 30 {
                problems.push(format!("{} has {} MiB free", ds.path, ds.free_bytes >> 20));
            }
        }
        Health {
            state: if problems.is_empty() {
                HealthState::Ok
            } else {
                HealthState::Degraded
            },
            problems,
        }
    }

    fn inventory(&self) -> Inventory {
        let doc = self.switch.document();
        let mut datastores: Vec<Datastore> = std::iter::once(self.state_dir.as_path())
            .chain(self.image_dir.as_deref())
            .chain(self.datastore.as_deref())
            .filter_map(Self::datastore)
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        datastores.retain(|d| seen.insert(d.path.clone()));
        Inventory {
            datastores,
            deploy_dir: self.datastore.as_ref().map(|d| d.display().to_string()),
            image_service: self.image_service.clone(),
            qemu: self.qemu.clone(),
            memory: Self::memory(),
            port_groups: doc
                .port_groups
                .iter()
                .map(|g| PortGroupInfo {
                    name: g.name.clone(),
                    vlan: g.vlan,
                    trunk: g.allowed_vlans.clone(),
                })
                .collect(),
            uplinks: {
                let heard = self.switch.uplink_neighbours();
                doc.uplinks
                    .iter()
                    .flat_map(|u| u.interfaces.iter().map(move |i| (u, i)))
                    .map(|(u, member)| {
                        let lldp = heard
                            .iter()
                            .find(|h| h.uplink == u.name && h.member == *member)
                            .and_then(|h| h.neighbour.as_ref());
                        Self::uplink(member, u.neighbour.as_deref(), lldp)
                    })
                    .collect()
            },
            tandem_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Sets up this host's cluster identity, if it has one: the manager agent
/// (joined hosts) or the standalone rules. `None`: no identity.
pub fn start(
    identity_dir: &Path,
    peers: Option<&Path>,
    reporter: impl FnOnce(Arc<OnceLock<Arc<SwitchTxns>>>) -> HostReporter,
) -> anyhow::Result<Option<Arc<ClusterLink>>> {
    let txns = Arc::new(OnceLock::new());
    if !tandem_manager::agent::has_identity(identity_dir) {
        if peers.is_some() {
            anyhow::bail!(
                "--repl-peers needs a cluster identity in {} (tandem cluster init --standalone, or tandem host join)",
                identity_dir.display()
            );
        }
        return Ok(None);
    }
    let joined = identity_dir
        .join(tandem_manager::state::MANAGER_FILE)
        .exists();
    if joined {
        let (agent, handle) = HostAgent::open(AgentConfig::new(identity_dir))
            .with_context(|| format!("opening the host identity in {}", identity_dir.display()))?;
        let initial: Arc<dyn Authority> = Arc::new(recorded(&handle.authority.borrow()));
        let authority = Arc::new(CurrentAuthority::new(initial, Some(handle.clone())));
        let mut changes = handle.authority.clone();
        let current = authority.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let next: Arc<dyn Authority> = Arc::new(recorded(&changes.borrow()));
                *current.rule.write() = next;
                info!("VM authority records updated from the manager");
            }
        });
        let reporter = reporter(txns.clone());
        if let Some(a) = &reporter.host_api {
            info!(host_api = %a, "reporting the host API's address to the manager");
        }
        let reporter: Arc<dyn Reporter> = Arc::new(reporter);
        tokio::spawn(agent.run(reporter, std::future::pending()));
        let link = ClusterLink {
            identity: handle.identity.clone(),
            revocations: handle.revocations.clone(),
            authority,
            mode: "manager",
            txns,
            agent: Some(handle.clone()),
        };
        info!(host = %link.name(), "cluster member: mutual TLS on replication links, the manager's authority");
        return Ok(Some(Arc::new(link)));
    }
    let identity = Identity::load(identity_dir)
        .with_context(|| format!("loading the host identity in {}", identity_dir.display()))?;
    if identity.role() != Role::Host {
        anyhow::bail!(
            "{} holds a {} certificate; tandemd needs a host certificate",
            identity_dir.display(),
            identity.role()
        );
    }
    if identity.expires_within(std::time::Duration::from_secs(30 * 86_400)) {
        warn!(
            "this host's certificate expires within 30 days: renew it (tandem cluster renew --standalone)"
        );
    }
    let rule: Arc<dyn Authority> = match peers {
        Some(p) => Arc::new(
            AllowList::load(p).with_context(|| format!("loading the peer list {}", p.display()))?,
        ),
        None => {
            info!(
                "no --repl-peers: any host certificate of this pair's CA may protect any VM here"
            );
            Arc::new(Unrestricted)
        }
    };
    let (_keep, identity) = watch::channel(Arc::new(identity));
    // The sender is dropped: a standalone identity changes only at restart.
    let link = ClusterLink {
        identity,
        revocations: Arc::new(NoRevocations),
        authority: Arc::new(CurrentAuthority::new(rule, None)),
        mode: "standalone",
        txns,
        agent: None,
    };
    info!(host = %link.name(), "standalone pair: mutual TLS on replication links");
    Ok(Some(Arc::new(link)))
}

#[cfg(test)]
mod inventory_tests {
    use super::HostReporter;
    use tandem_switch::frame::Mac;
    use tandem_switch::lldp::{LldpId, LldpNeighbour};

    #[test]
    fn an_uplink_member_reports_both_neighbours_and_a_mismatch() {
        let heard = |name: Option<&str>| LldpNeighbour {
            chassis_id: LldpId::Mac(Mac([0x00, 0x1c, 0x73, 0xaa, 0xbb, 0xcc])),
            port_id: LldpId::InterfaceName("Ethernet12".into()),
            system_name: name.map(String::from),
            port_description: None,
            ttl_s: 120,
        };
        let tor1 = heard(Some("tor-1"));
        let u = HostReporter::uplink("eth1", Some("tor-1 Ethernet12"), Some(&tor1));
        let l = u.lldp_neighbour.as_ref().unwrap();
        assert_eq!(l.chassis, "tor-1");
        assert_eq!(l.port.as_deref(), Some("Ethernet12"));
        assert_eq!(l.chassis_id.as_deref(), Some("00:1c:73:aa:bb:cc"));
        assert_eq!(
            u.declared_neighbour.as_ref().unwrap().chassis,
            "tor-1 Ethernet12"
        );
        assert_eq!(
            (u.neighbour_matches(), u.neighbour_mismatch),
            (Some(true), None)
        );

        let u = HostReporter::uplink("eth1", Some("tor-2 Ethernet12"), Some(&tor1));
        assert_eq!(u.neighbour_matches(), Some(false));
        assert_eq!(
            u.neighbour_mismatch.as_deref(),
            Some("eth1: declared \"tor-2 Ethernet12\", LLDP hears tor-1 Ethernet12 (chassis 00:1c:73:aa:bb:cc)")
        );
        // Nothing to compare: no mismatch.
        let anonymous = heard(None);
        let u = HostReporter::uplink("eth1", Some("tor-2 Ethernet12"), Some(&anonymous));
        assert_eq!(u.lldp_neighbour.unwrap().chassis, "00:1c:73:aa:bb:cc");
        assert_eq!(u.neighbour_mismatch, None);
        let u = HostReporter::uplink("eth2", None, Some(&tor1));
        assert_eq!((u.declared_neighbour, u.neighbour_mismatch), (None, None));
        let u = HostReporter::uplink("eth2", Some("tor-1"), None);
        assert_eq!((u.lldp_neighbour, u.neighbour_mismatch), (None, None));
    }
}
