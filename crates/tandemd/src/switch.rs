//! The host's switch in tandemd: its routes and the supervisor's hook for
//! VM switch NICs.

use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use tandem_api::SwitchDocumentBody;
use tandem_supervisor::NicPorts;
use tandem_switch::config::SwitchDocument;
use tandem_switch::frame::Mac;
use tandem_switch::host::{ApplyReport, SwitchHost, SwitchStats};

use crate::error::HttpError;
use crate::switchtxn::SwitchTxns;

/// Adapts the switch to the supervisor's [`NicPorts`].
#[derive(Debug)]
pub struct SwitchPorts(pub Arc<SwitchHost>);

impl NicPorts for SwitchPorts {
    fn attach(
        &self,
        vm: &str,
        nic: &tandem_vmspec::NicSpec,
        socket: &Path,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let group = nic.port_group.as_deref().unwrap_or_default();
        // The spec's MAC as the switch's type: the same six bytes, never
        // text on the way (the switch enforces it as the port's source).
        let mac = Mac(nic.mac.0);
        self.0
            .attach_vm(vm, &nic.name, mac, group, socket)
            .map_err(Into::into)
    }

    fn detach(&self, vm: &str) {
        self.0.detach_vm(vm)
    }

    fn switchover(&self, vm: &str, step: tandem_supervisor::Switchover) {
        use tandem_supervisor::Switchover;
        self.0.switchover(
            vm,
            match step {
                Switchover::Hold => None,
                Switchover::Moved => Some(true),
                Switchover::Stay => Some(false),
            },
        );
    }
}

#[derive(Clone)]
struct Routes {
    host: Arc<SwitchHost>,
    txns: Arc<SwitchTxns>,
}

/// The station's side of VDP (tandemd tells its switch about a VM's
/// interfaces in IEEE 802.1Qbg VSI TLVs): pre-associates each switch NIC
/// of `vm`, with the migrate-to hint when the VM arrives from another host
/// (a migration, a failover), handing over what the source knew.
/// Failures are logged, never fatal: the VM runs either way, and its own
/// DHCP and IGMP exchanges rebuild the state, only later.
pub fn pre_associate(
    host: &SwitchHost,
    vm: &str,
    uuid: &str,
    migrated: bool,
    network: &[tandem_api::NicHandover],
) {
    use tandem_vdp::vdp22::{Filter, Hint, Mode, VsiId, VsiTlv};
    let migrated = migrated && !crate::faults::associate_as_new();
    let uuid_bytes = uuid::Uuid::parse_str(uuid)
        .map(|u| *u.as_bytes())
        .unwrap_or_default();
    let doc = host.document();
    let macs = host.vm_ports(vm);
    for ((nic, id), (_, mac)) in host.vm_nics(vm).into_iter().zip(macs) {
        let vid = host
            .switch()
            .port_group_of(id)
            .and_then(|g| doc.port_group(&g).and_then(|g| g.classify(None)))
            .unwrap_or(1);
        let mut tlv = VsiTlv {
            mode: Mode::PreAssociate,
            status: 0,
            type_id: 0,
            type_version: 0,
            vsi_id: VsiId::Uuid(uuid_bytes),
            filters: vec![Filter::MacVid {
                mac: mac.0,
                ps: false,
                pcp: 0,
                vid,
            }],
        };
        tlv.set_hint(if migrated {
            Hint::MigrateTo
        } else {
            Hint::None
        });
        let handover = network
            .iter()
            .filter(|_| !crate::faults::drop_handover())
            .find(|h| h.nic == nic || h.state.mac == mac)
            .map(|h| h.state.clone());
        let answer = tlv
            .encode()
            .map_err(|e| e.to_string())
            .and_then(|req| host.vdp_request(&req, handover).map_err(|e| e.to_string()));
        match answer {
            Ok(_) => tracing::info!(vm, nic, migrated, "VM interface pre-associated"),
            Err(e) => tracing::warn!(vm, nic, "pre-associating the VM's interface: {e}"),
        }
    }
}

pub fn router(host: Arc<SwitchHost>, txns: Arc<SwitchTxns>) -> Router {
    Router::new()
        .route("/v1/vms/{name}/network", get(vm_network))
        .route("/v1/switch", get(show))
        .route("/v1/switch/apply", post(apply))
        .route("/v1/switch/stats", get(stats))
        .with_state(Routes { host, txns })
}

async fn show(State(r): State<Routes>) -> Json<SwitchDocumentBody> {
    Json(SwitchDocumentBody {
        document_toml: r.host.document().to_toml(),
    })
}

/// `GET /v1/vms/{name}/network`: the VM's switch NICs' DHCP bindings and
/// multicast groups, as a migration hands them to the destination.
async fn vm_network(
    State(r): State<Routes>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<Vec<tandem_api::NicHandover>>, HttpError> {
    let nics = r.host.vm_net_state(&name);
    if nics.is_empty() {
        return Err(HttpError::not_found(format!(
            "`{name}` has no switch NIC on this host"
        )));
    }
    Ok(Json(
        nics.into_iter()
            .map(|(nic, state)| tandem_api::NicHandover { nic, state })
            .collect(),
    ))
}

async fn stats(State(r): State<Routes>) -> Json<SwitchStats> {
    Json(tokio::task::block_in_place(|| r.host.stats()))
}

async fn apply(
    State(r): State<Routes>,
    Json(body): Json<SwitchDocumentBody>,
) -> Result<Json<ApplyReport>, HttpError> {
    let doc = SwitchDocument::from_toml(&body.document_toml)?;
    // Creating ports touches sockets and taps; keep it off the reactor.
    Ok(Json(tokio::task::block_in_place(|| {
        r.txns.apply_plain(doc)
    })?))
}
