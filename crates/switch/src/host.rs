//! The switch as a host runs it: the forwarding core plus the I/O of every
//! port, the configuration document kept on disk, and a housekeeping
//! thread (MAC aging, VM port up/down). tandemd owns one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::{FieldProblem, HostPortSpec, InvalidDocument, SwitchDocument, UplinkSpec};
use crate::frame::Mac;
use crate::hostport::{HostPortConfig, HostPortError, HostPortHandle};
use crate::lldp::UplinkNeighbour;
use crate::netsys;
use crate::port::{Ingress, PortId};
use crate::switch::{PortKind, Switch, SwitchError};
use crate::uplink::{UplinkConfig, UplinkHandle};
use crate::vhost::{VmPortConfig, VmPortHandle};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Invalid(#[from] InvalidDocument),
    #[error("{what}: {why}")]
    Port { what: String, why: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Switch(#[from] SwitchError),
    /// A port's field could not be put in place (an address, an MTU);
    /// `field` is its path in the document (`host_port[0].addresses[1]`).
    #[error("{port}: {field}: {why}")]
    Field {
        port: String,
        field: String,
        why: String,
    },
}

/// A port changed in place by an apply, with what it was before, so a
/// failed apply can put it back.
enum Retuned {
    Uplink(UplinkSpec),
    Host(HostPortSpec),
}

pub use tandem_switch_core::switch::{ApplyReport, SwitchStats};

struct VmPort {
    nic: String,
    port_group: String,
    mac: Mac,
    socket: PathBuf,
    id: PortId,
    handle: VmPortHandle,
    /// (connected, connections) as last seen by housekeeping.
    seen: (bool, u64),
}

#[derive(Default)]
struct Ports {
    uplinks: BTreeMap<String, (UplinkSpec, PortId, UplinkHandle)>,
    host_ports: BTreeMap<String, (HostPortSpec, PortId, HostPortHandle)>,
    vms: BTreeMap<String, Vec<VmPort>>,
}

pub struct SwitchHost {
    sw: Arc<Switch>,
    ports: Arc<Mutex<Ports>>,
    doc_path: PathBuf,
    stop: Arc<AtomicBool>,
    housekeeping: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SwitchHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchHost")
            .field("doc_path", &self.doc_path)
            .finish()
    }
}

impl SwitchHost {
    /// Starts the switch with the document saved at `doc_path` (the
    /// default document if there is none yet).
    pub fn start(doc_path: &Path) -> Result<Arc<Self>, HostError> {
        let doc = match std::fs::read_to_string(doc_path) {
            Ok(text) => SwitchDocument::from_toml(&text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SwitchDocument::default(),
            Err(source) => {
                return Err(HostError::Io {
                    op: "reading",
                    path: doc_path.into(),
                    source,
                })
            }
        };
        let sw = Switch::new(SwitchDocument::default())?;
        let host = Arc::new(Self {
            sw,
            ports: Arc::new(Mutex::new(Ports::default())),
            doc_path: doc_path.into(),
            stop: Arc::new(AtomicBool::new(false)),
            housekeeping: Mutex::new(None),
        });
        host.apply(doc)?;
        let (sw, ports, stop) = (host.sw.clone(), host.ports.clone(), host.stop.clone());
        let t = std::thread::Builder::new()
            .name("switch-housekeeping".into())
            .spawn(move || housekeeping(sw, ports, stop))
            .map_err(|source| HostError::Io {
                op: "starting",
                path: "switch housekeeping thread".into(),
                source,
            })?;
        *host.housekeeping.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(host)
    }

    pub fn switch(&self) -> &Arc<Switch> {
        &self.sw
    }

    pub fn document(&self) -> SwitchDocument {
        (*self.sw.document()).clone()
    }

    /// Makes `doc` the switch's configuration, all or nothing: it is
    /// validated completely first (including that the interfaces of the
    /// uplinks it creates exist); then the policy of every port changes at
    /// once, uplinks and host ports are created and removed to match, host
    /// ports' addresses and MTU and uplinks' MTU are set (in place when
    /// nothing else about the port changed), and the document is saved. If
    /// a port cannot be created or configured, everything is put back as it
    /// was and the error names the port (and the field).
    pub fn apply(&self, doc: SwitchDocument) -> Result<ApplyReport, HostError> {
        doc.validate(&self.sw.port_group_users())?;
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let prev = self.sw.document();
        let mut report = ApplyReport::default();

        // A port whose interfaces, tap or port group change is recreated;
        // one whose addresses or MTU alone change is changed in place.
        let stale_uplinks: Vec<String> = ports
            .uplinks
            .iter()
            .filter(|(_, (spec, _, _))| !doc.uplinks.iter().any(|u| u.same_but_mtu(spec)))
            .map(|(n, _)| n.clone())
            .collect();
        let stale_hosts: Vec<String> = ports
            .host_ports
            .iter()
            .filter(|(_, (spec, _, _))| !doc.host_ports.iter().any(|h| h.same_but_addressing(spec)))
            .map(|(n, _)| n.clone())
            .collect();
        let retune_uplinks: Vec<UplinkSpec> = doc
            .uplinks
            .iter()
            .filter(|u| {
                ports
                    .uplinks
                    .get(&u.name)
                    .is_some_and(|(s, _, _)| s.same_but_mtu(u) && s != *u)
            })
            .cloned()
            .collect();
        let retune_hosts: Vec<HostPortSpec> = doc
            .host_ports
            .iter()
            .filter(|h| {
                ports
                    .host_ports
                    .get(&h.name)
                    .is_some_and(|(s, _, _)| s.same_but_addressing(h) && s != *h)
            })
            .cloned()
            .collect();
        check_new_uplinks(&doc, &ports)?;

        // Stale ports go first: a changed port is recreated under its name
        // (and a tap under its interface name), which must be free.
        let mut removed_uplinks = Vec::new();
        for n in &stale_uplinks {
            if let Some((spec, id, h)) = ports.uplinks.remove(n) {
                // Gives the members back the MTU they had.
                h.shutdown();
                self.sw.remove_port(id);
                removed_uplinks.push(spec);
                report.removed.push(n.clone());
            }
        }
        let mut removed_hosts = Vec::new();
        for n in &stale_hosts {
            if let Some((spec, id, h)) = ports.host_ports.remove(n) {
                h.shutdown();
                self.sw.remove_port(id);
                removed_hosts.push(spec);
                report.removed.push(n.clone());
            }
        }
        self.sw.set_document(doc.clone())?;

        let mut retuned = Vec::new();
        let result = self
            .create_ports(&mut ports, &doc.uplinks, &doc.host_ports, &mut report)
            .and_then(|()| {
                self.retune(
                    &mut ports,
                    &retune_uplinks,
                    &retune_hosts,
                    &mut retuned,
                    &mut report,
                )
            });
        if let Err(e) = result {
            warn!("switch apply failed, restoring the previous configuration: {e}");
            self.undo_retunes(&mut ports, retuned);
            for n in &report.added {
                if let Some((_, id, h)) = ports.uplinks.remove(n) {
                    h.shutdown();
                    self.sw.remove_port(id);
                }
                if let Some((_, id, h)) = ports.host_ports.remove(n) {
                    h.shutdown();
                    self.sw.remove_port(id);
                }
            }
            let _ = self.sw.set_document((*prev).clone());
            let mut ignored = ApplyReport::default();
            if let Err(e2) =
                self.create_ports(&mut ports, &removed_uplinks, &removed_hosts, &mut ignored)
            {
                warn!("restoring the previous switch ports: {e2}");
            }
            return Err(e);
        }
        for name in doc
            .uplinks
            .iter()
            .map(|u| &u.name)
            .chain(doc.host_ports.iter().map(|h| &h.name))
        {
            if !report.added.contains(name) && !report.changed.contains(name) {
                report.unchanged.push(name.clone());
            }
        }
        save(&self.doc_path, &doc)?;
        info!(
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            "switch configuration applied"
        );
        Ok(report)
    }

    /// Changes ports in place: uplinks' MTU, host ports' addresses and
    /// MTU. What each was before goes to `done` before it is touched, so a
    /// port that fails half-way is put back too.
    fn retune(
        &self,
        ports: &mut Ports,
        uplinks: &[UplinkSpec],
        hosts: &[HostPortSpec],
        done: &mut Vec<Retuned>,
        report: &mut ApplyReport,
    ) -> Result<(), HostError> {
        for u in uplinks {
            let Some((spec, _, h)) = ports.uplinks.get_mut(&u.name) else {
                continue;
            };
            done.push(Retuned::Uplink(spec.clone()));
            h.set_mtu(u.mtu).map_err(|e| HostError::Field {
                port: format!("uplink `{}`", u.name),
                field: self.field_of_uplink(&u.name, "mtu"),
                why: e.to_string(),
            })?;
            *spec = u.clone();
            report.changed.push(u.name.clone());
        }
        for hp in hosts {
            let Some((spec, _, h)) = ports.host_ports.get_mut(&hp.name) else {
                continue;
            };
            done.push(Retuned::Host(spec.clone()));
            h.configure(&hp.cidrs(), hp.mtu)
                .map_err(|e| self.host_field_error(&hp.name, e))?;
            *spec = hp.clone();
            report.changed.push(hp.name.clone());
        }
        Ok(())
    }

    /// Puts ports changed in place back as they were, last change first.
    fn undo_retunes(&self, ports: &mut Ports, done: Vec<Retuned>) {
        for r in done.into_iter().rev() {
            match r {
                Retuned::Uplink(old) => {
                    if let Some((spec, _, h)) = ports.uplinks.get_mut(&old.name) {
                        if let Err(e) = h.set_mtu(old.mtu) {
                            warn!(uplink = %old.name, "restoring the MTU: {e}");
                        }
                        *spec = old;
                    }
                }
                Retuned::Host(old) => {
                    if let Some((spec, _, h)) = ports.host_ports.get_mut(&old.name) {
                        if let Err(e) = h.configure(&old.cidrs(), old.mtu) {
                            warn!(port = %old.name, "restoring addresses and MTU: {e}");
                        }
                        *spec = old;
                    }
                }
            }
        }
    }

    /// `uplink[I].FIELD` in the document the switch has now.
    fn field_of_uplink(&self, name: &str, field: &str) -> String {
        let doc = self.sw.document();
        match doc.uplinks.iter().position(|u| u.name == name) {
            Some(i) => format!("uplink[{i}].{field}"),
            None => field.to_string(),
        }
    }

    /// A host port's configuration error, named by its field in the
    /// document the switch has now.
    fn host_field_error(&self, name: &str, e: HostPortError) -> HostError {
        let doc = self.sw.document();
        let at = doc.host_ports.iter().position(|h| h.name == name);
        match (e, at) {
            (
                HostPortError::Configure {
                    field,
                    what,
                    source,
                    ..
                },
                Some(i),
            ) => HostError::Field {
                port: format!("host port `{name}`"),
                field: format!("host_port[{i}].{field}"),
                why: format!("{what}: {source}"),
            },
            (e, _) => HostError::Port {
                what: format!("host port `{name}`"),
                why: e.to_string(),
            },
        }
    }

    fn create_ports(
        &self,
        ports: &mut Ports,
        uplinks: &[UplinkSpec],
        hosts: &[HostPortSpec],
        report: &mut ApplyReport,
    ) -> Result<(), HostError> {
        let ingress: Arc<dyn Ingress> = self.sw.clone();
        for u in uplinks {
            if ports.uplinks.contains_key(&u.name) {
                continue;
            }
            let (id, egress, counters) =
                self.sw.add_port(&u.name, PortKind::Uplink, &u.port_group)?;
            let cfg = UplinkConfig {
                id,
                name: u.name.clone(),
                interfaces: u.interfaces.clone(),
            };
            let h = match UplinkHandle::spawn(cfg, egress, counters, ingress.clone()) {
                Ok(h) => h,
                Err(e) => {
                    self.sw.remove_port(id);
                    return Err(HostError::Port {
                        what: format!("uplink `{}`", u.name),
                        why: e.to_string(),
                    });
                }
            };
            if u.mtu.is_some() {
                if let Err(e) = h.set_mtu(u.mtu) {
                    // Shutting down gives the members their MTU back.
                    h.shutdown();
                    self.sw.remove_port(id);
                    return Err(HostError::Field {
                        port: format!("uplink `{}`", u.name),
                        field: self.field_of_uplink(&u.name, "mtu"),
                        why: e.to_string(),
                    });
                }
            }
            self.sw.port_up(id);
            ports.uplinks.insert(u.name.clone(), (u.clone(), id, h));
            report.added.push(u.name.clone());
        }
        for hp in hosts {
            if ports.host_ports.contains_key(&hp.name) {
                continue;
            }
            let (id, egress, counters) =
                self.sw.add_port(&hp.name, PortKind::Host, &hp.port_group)?;
            let cfg = HostPortConfig {
                id,
                name: hp.name.clone(),
                tap: hp.tap.clone(),
            };
            let h = match HostPortHandle::spawn(cfg, egress, counters, ingress.clone()) {
                Ok(h) => h,
                Err(e) => {
                    self.sw.remove_port(id);
                    return Err(HostError::Port {
                        what: format!("host port `{}`", hp.name),
                        why: e.to_string(),
                    });
                }
            };
            if let Err(e) = h.configure(&hp.cidrs(), hp.mtu) {
                // The tap, and what was configured on it, goes with it.
                h.shutdown();
                self.sw.remove_port(id);
                return Err(self.host_field_error(&hp.name, e));
            }
            self.sw.port_up(id);
            ports
                .host_ports
                .insert(hp.name.clone(), (hp.clone(), id, h));
            report.added.push(hp.name.clone());
        }
        Ok(())
    }

    /// Creates the vhost-user port for a VM NIC (idempotent: the same NIC
    /// with the same settings is left as it is).
    pub fn attach_vm(
        &self,
        vm: &str,
        nic: &str,
        mac: Mac,
        port_group: &str,
        socket: &Path,
    ) -> Result<(), HostError> {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = ports.vms.get(vm) {
            if let Some(p) = list.iter().find(|p| p.nic == nic) {
                if p.port_group == port_group && p.mac == mac && p.socket == socket {
                    return Ok(());
                }
                return Err(HostError::Port {
                    what: format!("vm {vm} nic {nic}"),
                    why: "already attached with other settings".into(),
                });
            }
        }
        if let Some(dir) = socket.parent() {
            create_socket_dir(dir).map_err(|source| HostError::Io {
                op: "creating",
                path: dir.into(),
                source,
            })?;
        }
        let kind = PortKind::Vm {
            vm: vm.into(),
            nic: ports.vms.get(vm).map_or(0, |l| l.len()),
            mac,
        };
        let name = format!("{vm}.{nic}");
        let (id, egress, counters) = self.sw.add_port(&name, kind, port_group)?;
        let cfg = VmPortConfig {
            id,
            socket: socket.into(),
            name: name.clone(),
        };
        let handle = match VmPortHandle::spawn(cfg, egress, counters, self.sw.clone()) {
            Ok(h) => h,
            Err(e) => {
                self.sw.remove_port(id);
                return Err(HostError::Port {
                    what: format!("vm {vm} nic {nic}"),
                    why: format!("serving {}: {e}", socket.display()),
                });
            }
        };
        info!(port = %name, %port_group, socket = %socket.display(), "VM port attached");
        ports.vms.entry(vm.into()).or_default().push(VmPort {
            nic: nic.into(),
            port_group: port_group.into(),
            mac,
            socket: socket.into(),
            id,
            handle,
            seen: (false, 0),
        });
        Ok(())
    }

    /// Records every write `vm`'s ports make into its RAM (as pages of the
    /// RAM file) in `log`, or stops recording (`None`). Returns how many
    /// ports now record. Ports attached later do not inherit the log.
    pub fn set_vm_write_log(&self, vm: &str, log: Option<Arc<tandem_dirty::PageLog>>) -> usize {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let list = ports.vms.get(vm).map(Vec::as_slice).unwrap_or_default();
        for p in list {
            p.handle.set_write_log(log.clone());
        }
        list.len()
    }

    /// The switch ports of `vm`'s NICs, with their MAC addresses.
    pub fn vm_ports(&self, vm: &str) -> Vec<(PortId, Mac)> {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports
            .vms
            .get(vm)
            .map(|list| list.iter().map(|p| (p.id, p.mac)).collect())
            .unwrap_or_default()
    }

    /// A migration's switchover for `vm`'s ports (see
    /// `Switch::switchover_hold`): `Some(true)` the VM moved, `Some(false)`
    /// it stays, `None` the migration starts. Returns the frames that
    /// arrived meanwhile (forwarded on, or waiting for the VM here).
    pub fn switchover(&self, vm: &str, outcome: Option<bool>) -> usize {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for p in ports.vms.get(vm).map(Vec::as_slice).unwrap_or_default() {
            match outcome {
                None => {
                    self.sw.switchover_hold(p.id);
                    p.handle.hold_egress(true);
                }
                Some(moved) => {
                    p.handle.hold_egress(false);
                    n += if moved {
                        self.sw.switchover_moved(p.id)
                    } else {
                        self.sw.switchover_stay(p.id)
                    };
                    // Frames kept for a guest that stays go in as soon as
                    // its rings run.
                    p.handle.poke();
                }
            }
        }
        if outcome.is_some() {
            info!(vm, frames = n, moved = outcome, "switchover ended");
        }
        n
    }

    /// `vm`'s NICs by name, with their ports.
    pub fn vm_nics(&self, vm: &str) -> Vec<(String, PortId)> {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports
            .vms
            .get(vm)
            .map(|list| list.iter().map(|p| (p.nic.clone(), p.id)).collect())
            .unwrap_or_default()
    }

    /// The VM port whose NIC has `mac`.
    /// Keeps (or stops keeping) what is queued for the VM port `id`
    /// while its rings are not running.
    pub(crate) fn hold_port_egress(&self, id: PortId, on: bool) {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = ports.vms.values().flatten().find(|p| p.id == id) {
            p.handle.hold_egress(on);
        }
    }

    pub fn vm_port_by_mac(&self, mac: Mac) -> Option<PortId> {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports
            .vms
            .values()
            .flatten()
            .find(|p| p.mac == mac)
            .map(|p| p.id)
    }

    pub fn detach_vm(&self, vm: &str) {
        let list = self
            .ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vms
            .remove(vm);
        for p in list.unwrap_or_default() {
            p.handle.shutdown();
            // VDP de-associate: the VM's bindings and groups leave with it.
            self.sw.de_associate(p.id);
            self.sw.remove_port(p.id);
            info!(vm, nic = %p.nic, "VM port detached");
        }
    }

    pub fn stats(&self) -> SwitchStats {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        SwitchStats {
            ports: self.sw.stats(),
            uplinks_active: ports
                .uplinks
                .iter()
                .map(|(n, (_, _, h))| (n.clone(), h.active()))
                .collect(),
            mac_table: self.sw.fdb_entries(),
            uplink_neighbours: ports
                .uplinks
                .values()
                .flat_map(|(_, _, h)| h.neighbours())
                .collect(),
            snooping: self.sw.snooping_stats(),
        }
    }

    /// Every member of every uplink (uplinks by name, members in failover
    /// order), with the LLDP neighbour heard on it while its TTL lasts,
    /// how long ago, and the member's LLDP frame counts.
    pub fn uplink_neighbours(&self) -> Vec<UplinkNeighbour> {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports
            .uplinks
            .values()
            .flat_map(|(_, _, h)| h.neighbours())
            .collect()
    }

    /// Stops every port (tandemd shutting down). VM ports' sockets go away;
    /// QEMU keeps reconnecting until a switch serves them again.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self
            .housekeeping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        for (_, (_, _, h)) in std::mem::take(&mut ports.uplinks) {
            h.shutdown();
        }
        for (_, (_, _, h)) in std::mem::take(&mut ports.host_ports) {
            h.shutdown();
        }
        for (_, list) in std::mem::take(&mut ports.vms) {
            for p in list {
                p.handle.shutdown();
            }
        }
    }
}

/// Refuses a document that would create an uplink on an interface that
/// does not exist (in the calling thread's namespace, where the uplink
/// would be created): it names the member by its field. An interface
/// without carrier is fine, the uplink waits for it. Uplinks the apply
/// keeps (or only changes the MTU of) are not checked: a member of theirs
/// that went away is their failover's business, and a document that
/// merely keeps them (a rollback, say) must still apply.
fn check_new_uplinks(doc: &SwitchDocument, ports: &Ports) -> Result<(), HostError> {
    let new: Vec<(usize, &UplinkSpec)> = doc
        .uplinks
        .iter()
        .enumerate()
        .filter(|(_, u)| {
            !ports
                .uplinks
                .get(&u.name)
                .is_some_and(|(s, _, _)| s.same_but_mtu(u))
        })
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let ctl = netsys::control_socket().map_err(|source| HostError::Io {
        op: "opening",
        path: "a control socket".into(),
        source,
    })?;
    let mut problems = Vec::new();
    for (i, u) in new {
        for (j, ifname) in u.interfaces.iter().enumerate() {
            match netsys::ifindex(&ctl, ifname) {
                Ok(Some(_)) => {}
                Ok(None) => problems.push(FieldProblem {
                    field: format!("uplink[{i}].interfaces[{j}]"),
                    message: format!("interface `{ifname}` does not exist"),
                }),
                Err(e) => problems.push(FieldProblem {
                    field: format!("uplink[{i}].interfaces[{j}]"),
                    message: format!("cannot look up interface `{ifname}`: {e}"),
                }),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(InvalidDocument(problems).into())
    }
}

/// Creates the directory of VM ports' sockets if missing: 0700, whatever
/// the umask (only root's QEMUs connect to them). An existing directory
/// (the operator's `--switch-dir`) is left as it is.
fn create_socket_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn save(path: &Path, doc: &SwitchDocument) -> Result<(), HostError> {
    let io = |op: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| HostError::Io { op, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, doc.to_toml()).map_err(io("writing", &tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("replacing", path))?;
    // The rename is durable only once the directory is (audit L9): a
    // power loss must not bring back the configuration before the change.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

/// Ages the MAC table and follows VM ports' frontends coming and going:
/// a (re)connected frontend is the VM announcing itself on this port.
fn housekeeping(sw: Arc<Switch>, ports: Arc<Mutex<Ports>>, stop: Arc<AtomicBool>) {
    let mut last_age = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        {
            let mut ports = ports.lock().unwrap_or_else(|p| p.into_inner());
            for list in ports.vms.values_mut() {
                for p in list.iter_mut() {
                    p.handle.poke();
                    let now = (p.handle.is_connected(), p.handle.connections());
                    if now == p.seen {
                        continue;
                    }
                    if now.0 {
                        let arrived = sw.is_arriving(p.id);
                        sw.port_up(p.id);
                        if arrived && !sw.is_departing(p.id) {
                            // An arriving VM's rings run: its queue is
                            // served now, and dropped as usual later.
                            p.handle.hold_egress(false);
                        }
                    } else {
                        sw.port_down(p.id);
                    }
                    p.seen = now;
                }
            }
        }
        if last_age.elapsed() >= Duration::from_secs(1) {
            sw.age();
            last_age = Instant::now();
        }
        crate::association::serve_requests(&sw, |vlan| {
            host_address_in(&sw, &ports.lock().unwrap_or_else(|p| p.into_inner()), vlan)
        });
    }
}

/// This host's own IPv4 address in `vlan`: the first one the document
/// gives a host port of that VLAN (lease queries go out from it, and
/// their answers come back to it).
fn host_address_in(sw: &Switch, ports: &Ports, vlan: u16) -> Option<std::net::Ipv4Addr> {
    let doc = sw.document();
    ports.host_ports.values().find_map(|(spec, _, _)| {
        let g = doc.port_group(&spec.port_group)?;
        if g.classify(None) != Some(vlan) {
            return None;
        }
        spec.cidrs().into_iter().find_map(|c| match c.addr {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        })
    })
}

#[cfg(test)]
mod socket_dir_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_socket_dir_is_made_private_and_an_existing_one_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state").join("switch");
        create_socket_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        create_socket_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o750);
    }
}
