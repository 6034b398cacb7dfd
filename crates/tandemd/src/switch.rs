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
}

#[derive(Clone)]
struct Routes {
    host: Arc<SwitchHost>,
    txns: Arc<SwitchTxns>,
}

pub fn router(host: Arc<SwitchHost>, txns: Arc<SwitchTxns>) -> Router {
    Router::new()
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
