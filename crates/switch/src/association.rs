//! VM port association, as a host runs it: the switch's side of IEEE
//! 802.1Qbg VDP (the station, tandemd, sends VSI TLVs: pre-associate with
//! or without the migrate-to hint, associate, de-associate), the network
//! state a VM carries to its next host, and the lease refresh a migrated
//! VM's association asks for (RFC 4388 lease query, then an assisted
//! renewal) over UDP from the host's own address in the VM's VLAN.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tandem_vdp::vdp22::{Filter, Hint, Mode, VsiTlv};
use tracing::{info, warn};

use crate::dhcp::BindingRecord;
use crate::dhcp_client::{self, LeaseQueryAnswer};
use crate::host::{HostError, SwitchHost};
use crate::switch::{Association, NicNetState, SnoopRequest, Switch};

/// Lease-query tries per server, and how long each waits for the answer.
const QUERY_TRIES: u32 = 3;
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the assisted renewal waits for the switch to snoop the ACK.
const ASSIST_WAIT: Duration = Duration::from_secs(3);

impl SwitchHost {
    /// One VDP request from the station: `request` is an encoded VDP22 VSI
    /// TLV naming the VM's interface by its MAC (a MAC/VID filter). The
    /// answer is the same TLV as a response. `handover` is the source's
    /// state for that interface (a migration's), kept for association.
    pub fn vdp_request(
        &self,
        request: &[u8],
        handover: Option<NicNetState>,
    ) -> Result<Vec<u8>, HostError> {
        let bad = |why: String| HostError::Port {
            what: "VDP request".into(),
            why,
        };
        let (tlv, _) = VsiTlv::decode(request).map_err(|e| bad(e.to_string()))?;
        let hint = tlv.hint().map_err(|e| bad(e.to_string()))?;
        let mac = tlv
            .filters
            .iter()
            .find_map(|f| match f {
                Filter::MacVid { mac, .. } | Filter::GroupMacVid { mac, .. } => {
                    Some(crate::frame::Mac(*mac))
                }
                _ => None,
            })
            .ok_or_else(|| bad("the VSI TLV names no MAC address".into()))?;
        let port = self
            .vm_port_by_mac(mac)
            .ok_or_else(|| bad(format!("no VM port has MAC {mac}")))?;
        let sw = self.switch();
        match tlv.mode {
            Mode::PreAssociate | Mode::PreAssociateWithReservation | Mode::Associate => {
                // Association proper happens when the VM's rings first run
                // here (the switch sees that itself); an associate that
                // comes first is a pre-associate with the same hint.
                sw.pre_associate(
                    port,
                    Association {
                        migrated: hint == Hint::MigrateTo,
                        handover,
                    },
                )?;
                if sw.is_arriving(port) {
                    // What arrives for the VM before its rings run waits
                    // for them (the port's own I/O would drop it as
                    // stale); released when they run.
                    self.hold_port_egress(port, true);
                }
            }
            Mode::DeAssociate => {
                sw.de_associate(port);
            }
        }
        info!(%tlv, "VDP request applied");
        // A response with no error: the request's hint bits cleared (in a
        // response they mean hard error and keep).
        let mut answer = tlv.clone();
        answer.status = tandem_vdp::vdp22::STATUS_RESPONSE;
        answer.encode().map_err(|e| bad(e.to_string()))
    }

    /// The network state of `vm`'s NICs (nic name, state), for handover.
    pub fn vm_net_state(&self, vm: &str) -> Vec<(String, NicNetState)> {
        self.vm_nics(vm)
            .into_iter()
            .map(|(nic, id)| (nic, self.switch().net_state(id)))
            .collect()
    }
}

/// Runs the lease refreshes the switch asked for, each in a thread of its
/// own (a lease query waits on the network). `giaddr` finds this host's
/// address in a VLAN (a host port's).
pub(crate) fn serve_requests(sw: &Arc<Switch>, giaddr: impl Fn(u16) -> Option<Ipv4Addr>) {
    for req in sw.take_snoop_requests() {
        let SnoopRequest::LeaseRefresh {
            port,
            port_name,
            mac,
            vlan,
            client_id,
            servers,
            ip_hint,
        } = req;
        let from = giaddr(vlan);
        let sw = sw.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("lease-{port}"))
            .spawn(move || {
                let Some(from) = from else {
                    sw.lease_unknown(
                        port,
                        &format!("this host has no address in VLAN {vlan} to ask from"),
                    );
                    return;
                };
                refresh(
                    &sw, port, &port_name, mac, vlan, client_id, &servers, ip_hint, from,
                );
            });
        if let Err(e) = spawned {
            warn!(port, "cannot start a lease refresh: {e}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn refresh(
    sw: &Switch,
    port: crate::port::PortId,
    port_name: &str,
    mac: crate::frame::Mac,
    vlan: u16,
    client_id: Option<Vec<u8>>,
    servers: &[Ipv4Addr],
    ip_hint: Option<Ipv4Addr>,
    from: Ipv4Addr,
) {
    if servers.is_empty() {
        sw.lease_unknown(
            port,
            "no DHCP server is known (set the port group's dhcp_servers)",
        );
        return;
    }
    let mut answers = Vec::new();
    for &server in servers {
        match dhcp_client::lease_query(
            from,
            server,
            mac,
            client_id.as_deref(),
            QUERY_TRIES,
            QUERY_TIMEOUT,
        ) {
            Ok(LeaseQueryAnswer::Active {
                ip,
                lease_remaining_s,
                server,
            }) => {
                info!(port = port_name, %mac, %ip, %server, "lease query: active");
                sw.install_lease(
                    port,
                    &BindingRecord {
                        mac,
                        ip,
                        vlan,
                        lease_remaining_s,
                        client_id: client_id
                            .as_ref()
                            .map(|c| c.iter().map(|b| format!("{b:02x}")).collect()),
                        server: Some(server),
                        port,
                    },
                );
                return;
            }
            Ok(a) => answers.push(format!("{server}: {a:?}")),
            Err(e) => answers.push(format!("{server}: {e}")),
        }
    }
    // No lease query answered for it: renew on the VM's behalf where its
    // address is known (from the handover, else from what the VM sent
    // here meanwhile); the switch snoops the server's ACK.
    if let Some(ip) = ip_hint.or_else(|| sw.seen_ip(port)) {
        for &server in servers {
            match dhcp_client::assisted_renew(from, server, mac, ip, client_id.as_deref()) {
                Ok(_) => {
                    let deadline = std::time::Instant::now() + ASSIST_WAIT;
                    while std::time::Instant::now() < deadline {
                        if sw.net_state(port).bindings.iter().any(|b| b.mac == mac) {
                            info!(port = port_name, %mac, %ip, %server, "assisted renewal: bound");
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    answers.push(format!("{server}: no ACK to the assisted renewal"));
                }
                Err(e) => answers.push(format!("{server}: assisted renewal: {e}")),
            }
        }
    }
    sw.lease_unknown(port, &answers.join("; "));
}
