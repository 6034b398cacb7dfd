//! The HTTP/JSON routes of the VM lifecycle (errors answer through
//! [`HttpError`]).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tandem_api::{CreateVmRequest, StopRequest, VmState};
use tandem_supervisor::Supervisor;

use crate::error::HttpError;

type Sup = Arc<Supervisor>;

pub fn router(sup: Sup) -> Router {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(info).delete(destroy))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/checkpoint", post(checkpoint))
        .route("/v1/vms/{name}/restore", post(restore))
        .route("/v1/vms/{name}/migration", get(migration))
        .route("/v1/vms/{name}/migration/cancel", post(cancel_migration))
        .route("/v1/vms/{name}/migration/disks", post(migration_disks))
        .route("/v1/vms/{name}/migration/run", post(run_incoming))
        .route("/v1/vms/{name}/announce", post(announce))
        .route("/metrics", get(metrics))
        .with_state(sup)
}

type ApiResult<T> = Result<Json<T>, HttpError>;

async fn host(State(s): State<Sup>) -> Json<tandem_api::HostInfo> {
    Json(s.host_info().await)
}

async fn list(State(s): State<Sup>) -> Json<Vec<tandem_api::VmSummary>> {
    Json(s.list().await)
}

async fn create(
    State(s): State<Sup>,
    Json(req): Json<CreateVmRequest>,
) -> Result<(StatusCode, Json<tandem_api::VmInfo>), HttpError> {
    let info = match req.uuid.as_deref() {
        None => s.create(&req.spec_toml).await?,
        Some(u) => {
            let uuid = tandem_supervisor::Uuid::parse_str(u)
                .map_err(|e| HttpError::invalid(format!("uuid {u:?}: {e}")))?;
            s.create_with_uuid(&req.spec_toml, uuid).await?
        }
    };
    Ok((StatusCode::CREATED, Json(info)))
}

async fn info(State(s): State<Sup>, Path(name): Path<String>) -> ApiResult<tandem_api::VmInfo> {
    Ok(Json(s.info(&name).await?))
}

async fn start(State(s): State<Sup>, Path(name): Path<String>) -> ApiResult<tandem_api::VmInfo> {
    Ok(Json(s.start(&name).await?))
}

async fn pause(State(s): State<Sup>, Path(name): Path<String>) -> ApiResult<tandem_api::VmInfo> {
    Ok(Json(s.pause(&name).await?))
}

async fn resume(State(s): State<Sup>, Path(name): Path<String>) -> ApiResult<tandem_api::VmInfo> {
    Ok(Json(s.resume(&name).await?))
}

async fn stop(
    State(s): State<Sup>,
    Path(name): Path<String>,
    Json(req): Json<StopRequest>,
) -> ApiResult<tandem_api::VmInfo> {
    Ok(Json(s.stop(&name, req).await?))
}

async fn destroy(State(s): State<Sup>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    s.destroy(&name).await?;
    Ok(Json(serde_json::json!({ "destroyed": name })))
}

async fn checkpoint(
    State(s): State<Sup>,
    Path(name): Path<String>,
    Json(req): Json<tandem_api::CheckpointRequest>,
) -> ApiResult<tandem_supervisor::CheckpointReport> {
    // Only under the checkpoint root (audit M5), checked before anything.
    let dir = s.checkpoint_dir(&req.dir, false)?;
    Ok(Json(s.checkpoint_to(&name, &dir).await?))
}

async fn restore(
    State(s): State<Sup>,
    Path(name): Path<String>,
    Json(req): Json<tandem_api::CheckpointRequest>,
) -> ApiResult<tandem_api::VmInfo> {
    let dir = s.checkpoint_dir(&req.dir, true)?;
    Ok(Json(s.restore_from(&name, &dir).await?))
}

/// Has QEMU announce the guest's MACs from this host again.
async fn announce(State(s): State<Sup>, Path(name): Path<String>) -> ApiResult<()> {
    s.announce(&name).await?;
    Ok(Json(()))
}

/// The source, before the destination prepares: its disks and name.
async fn migration_disks(
    State(s): State<Sup>,
    Path(name): Path<String>,
    Json(req): Json<tandem_api::MigrationDisksRequest>,
) -> ApiResult<tandem_api::MigrationSource> {
    Ok(Json(s.migration_source(&name, req.copy_all).await?))
}

/// The destination, told by the source that the disks' copies are whole.
async fn run_incoming(State(s): State<Sup>, Path(name): Path<String>) -> ApiResult<()> {
    s.release_incoming(&name).await?;
    Ok(Json(()))
}

async fn migration(
    State(s): State<Sup>,
    Path(name): Path<String>,
) -> ApiResult<tandem_api::MigrationReport> {
    Ok(Json(s.migration(&name).await?))
}

async fn cancel_migration(
    State(s): State<Sup>,
    Path(name): Path<String>,
) -> ApiResult<tandem_api::MigrationReport> {
    Ok(Json(s.cancel_migration(&name).await?))
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
}

async fn console(
    State(s): State<Sup>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> ApiResult<tandem_api::ConsoleChunk> {
    Ok(Json(s.console(&name, q.offset).await?))
}

/// Prometheus text exposition.
async fn metrics(State(s): State<Sup>) -> String {
    let vms = s.list().await;
    let mut out = String::from(
        "# HELP tandem_vms VMs known to this tandemd, by state.\n# TYPE tandem_vms gauge\n",
    );
    for state in [
        VmState::Defined,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Shutoff,
        VmState::Crashed,
    ] {
        let n = vms.iter().filter(|v| v.state == state).count();
        out.push_str(&format!("tandem_vms{{state=\"{state}\"}} {n}\n"));
    }
    out
}
