//! Routes and authorisation.
//!
//! The TLS layer ([`crate::server`]) authenticates each connection and puts
//! a [`ConnInfo`] into every request's extensions. Each handler names the
//! caller it needs by its extractor: [`HostCaller`] (a member host's
//! certificate), [`OperatorCaller`], or [`MemberCaller`] (host or
//! operator). The extractor refuses with 403 `forbidden` anything else, and
//! also a certificate revoked or expired since the connection's handshake,
//! so a long-lived connection cannot outlast `host remove`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tandem_pki::{Peer, Revocations as _, Role};
use uuid::Uuid;

use crate::api::{
    Ack, AuthorityRecord, ClusterStatus, CreateTokenRequest, CreateVmRequest, CreatedToken,
    Credentials, DeleteVmQuery, Dump, ErrorBody, ErrorKind, FieldProblem, HandoverRequest,
    HeartbeatRequest, HeartbeatResponse, HostAuthority, HostView, Inventory, JoinRequest,
    RegisterPrimaryRequest, RemovedHost, Revocations, RevokeRequest, TakeoverRequest, TokenInfo,
};
use crate::api::{
    DvsApplyReport, DvsApplyRequest, DvsRevision, DvsRollbackRequest, DvsView, HostSwitchSync,
};
use crate::service::{Manager, ManagerError};

/// Who is on the other end of a connection, as the TLS layer found.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The authenticated certificate; `None` on a join connection.
    pub peer: Option<Peer>,
    pub remote: Option<SocketAddr>,
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct HttpError {
    pub kind: ErrorKind,
    pub message: String,
    pub fields: Vec<FieldProblem>,
}

impl HttpError {
    pub fn new(kind: ErrorKind, message: impl std::fmt::Display) -> Self {
        HttpError {
            kind,
            message: message.to_string(),
            fields: Vec::new(),
        }
    }

    fn forbidden(message: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }
}

impl From<ManagerError> for HttpError {
    fn from(e: ManagerError) -> Self {
        if e.kind() == ErrorKind::Internal {
            tracing::error!("request failed: {e}");
        }
        let fields = e.fields();
        HttpError {
            fields,
            ..HttpError::new(e.kind(), e)
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            kind: self.kind.as_str().to_string(),
            message: self.message,
            fields: self.fields,
        };
        (status, Json(body)).into_response()
    }
}

type HttpResult<T> = Result<Json<T>, HttpError>;

/// A JSON body whose rejection is an [`ErrorBody`] like every other error.
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(HttpError::new(ErrorKind::Invalid, rejection_text(e))),
        }
    }
}

fn rejection_text(e: JsonRejection) -> String {
    format!("request body: {}", e.body_text())
}

#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: Peer,
    pub remote: Option<SocketAddr>,
}

fn caller(parts: &Parts, state: &AppState, roles: &[Role]) -> Result<Caller, HttpError> {
    let info = parts
        .extensions
        .get::<ConnInfo>()
        .ok_or_else(|| HttpError::forbidden("no authenticated connection"))?;
    let peer = info
        .peer
        .clone()
        .ok_or_else(|| HttpError::forbidden("this connection has no client certificate"))?;
    let revoked = state.manager.revocation_list();
    if revoked.is_revoked(&peer.serial) {
        return Err(HttpError::forbidden(format!(
            "certificate {} of {} is revoked",
            peer.serial, peer.name
        )));
    }
    if peer.not_after <= std::time::SystemTime::now() {
        return Err(HttpError::forbidden(format!(
            "certificate {} of {} has expired",
            peer.serial, peer.name
        )));
    }
    peer.require_role(roles).map_err(HttpError::forbidden)?;
    Ok(Caller {
        peer,
        remote: info.remote,
    })
}

/// A host certificate (membership is checked by the service).
pub struct HostCaller(pub Caller);
/// An operator certificate.
pub struct OperatorCaller(pub Caller);
/// A host or operator certificate.
pub struct MemberCaller(pub Caller);

impl FromRequestParts<AppState> for HostCaller {
    type Rejection = HttpError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        caller(parts, state, &[Role::Host]).map(HostCaller)
    }
}

impl FromRequestParts<AppState> for OperatorCaller {
    type Rejection = HttpError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        caller(parts, state, &[Role::Operator]).map(OperatorCaller)
    }
}

impl FromRequestParts<AppState> for MemberCaller {
    type Rejection = HttpError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        caller(parts, state, &[Role::Host, Role::Operator]).map(MemberCaller)
    }
}

fn addr(c: &Caller) -> Option<String> {
    c.remote.map(|a| a.ip().to_string())
}

/// The mutual-TLS API.
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/host/heartbeat", post(heartbeat))
        .route("/v1/host/inventory", put(inventory))
        .route("/v1/host/authority", get(host_authority))
        .route("/v1/host/renew", post(renew))
        .route("/v1/host/switch-sync", post(switch_sync))
        .route("/v1/host/vms", post(register_primary))
        .route("/v1/host/vms/{uuid}/takeover", post(record_takeover))
        .route("/v1/dvs", get(dvs_show))
        .route("/v1/dvs/apply", post(dvs_apply))
        .route("/v1/dvs/rollback", post(dvs_rollback))
        .route("/v1/dvs/history", get(dvs_history))
        .route("/v1/dvs/revisions/{revision}", get(dvs_revision))
        .route("/v1/revocations", get(revocations).post(revoke))
        .route("/v1/cluster", get(status))
        .route("/v1/cluster/dump", get(dump))
        .route("/v1/tokens", get(tokens).post(create_token))
        .route("/v1/tokens/{id}", delete(delete_token))
        .route("/v1/deployments", get(deployments).post(deploy))
        .route("/v1/deployments/{id}", get(deployment))
        .route("/v1/hosts", get(hosts))
        .route("/v1/hosts/{name}", get(host).delete(remove_host))
        .route("/v1/vms", get(vms).post(create_vm))
        .route("/v1/vms/{uuid}", get(vm).delete(delete_vm))
        .route("/v1/vms/{uuid}/handover", post(handover))
        .fallback(not_found)
        .with_state(AppState { manager })
}

/// The join connection's API: `POST /v1/join` and nothing else.
pub fn join_router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/join", post(join))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .with_state(AppState { manager })
}

async fn not_found(req: Request) -> HttpError {
    HttpError::new(
        ErrorKind::NotFound,
        format!("no endpoint {} {}", req.method(), req.uri().path()),
    )
}

async fn join(
    State(s): State<AppState>,
    axum::Extension(info): axum::Extension<ConnInfo>,
    Body(req): Body<JoinRequest>,
) -> HttpResult<Credentials> {
    let address = info.remote.map(|a| a.ip().to_string());
    Ok(Json(s.manager.join(req, address).await?))
}

async fn heartbeat(
    State(s): State<AppState>,
    HostCaller(c): HostCaller,
    Body(req): Body<HeartbeatRequest>,
) -> HttpResult<HeartbeatResponse> {
    Ok(Json(s.manager.heartbeat(&c.peer, req, addr(&c)).await?))
}

async fn inventory(
    State(s): State<AppState>,
    HostCaller(c): HostCaller,
    Body(inv): Body<Inventory>,
) -> HttpResult<Ack> {
    s.manager.report_inventory(&c.peer, inv, addr(&c)).await?;
    Ok(Json(Ack {}))
}

async fn host_authority(
    State(s): State<AppState>,
    HostCaller(c): HostCaller,
) -> HttpResult<HostAuthority> {
    Ok(Json(s.manager.host_authority(&c.peer).await?))
}

async fn renew(State(s): State<AppState>, HostCaller(c): HostCaller) -> HttpResult<Credentials> {
    Ok(Json(s.manager.renew(&c.peer).await?))
}

async fn revocations(
    State(s): State<AppState>,
    MemberCaller(c): MemberCaller,
) -> HttpResult<Revocations> {
    if c.peer.role == Role::Host {
        s.manager.member(&c.peer).await?;
    }
    Ok(Json(s.manager.revocation_snapshot()))
}

async fn revoke(
    State(s): State<AppState>,
    OperatorCaller(c): OperatorCaller,
    Body(req): Body<RevokeRequest>,
) -> HttpResult<Revocations> {
    Ok(Json(s.manager.revoke_serial(req, &c.peer).await?))
}

async fn status(
    State(s): State<AppState>,
    MemberCaller(c): MemberCaller,
) -> HttpResult<ClusterStatus> {
    if c.peer.role == Role::Host {
        s.manager.member(&c.peer).await?;
    }
    Ok(Json(s.manager.status().await?))
}

async fn dump(State(s): State<AppState>, OperatorCaller(_): OperatorCaller) -> HttpResult<Dump> {
    Ok(Json(s.manager.dump().await?))
}

async fn tokens(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
) -> HttpResult<Vec<TokenInfo>> {
    Ok(Json(s.manager.tokens().await?))
}

async fn create_token(
    State(s): State<AppState>,
    OperatorCaller(c): OperatorCaller,
    Body(req): Body<CreateTokenRequest>,
) -> HttpResult<CreatedToken> {
    Ok(Json(s.manager.create_token(req, &c.peer).await?))
}

async fn delete_token(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
    Path(id): Path<String>,
) -> HttpResult<Ack> {
    s.manager.delete_token(&id).await?;
    Ok(Json(Ack {}))
}

async fn deploy(
    State(s): State<AppState>,
    OperatorCaller(c): OperatorCaller,
    Body(req): Body<crate::deploy::DeployRequest>,
) -> HttpResult<crate::deploy::DeploymentView> {
    tracing::info!(by = %c.peer.name, template = %req.template, from = %req.from, dry_run = req.dry_run, "deployment asked");
    Ok(Json(s.manager.deploy(req).await?))
}

async fn deployments(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
) -> HttpResult<Vec<crate::deploy::DeploymentView>> {
    Ok(Json(s.manager.deployments()))
}

async fn deployment(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
    Path(id): Path<String>,
) -> HttpResult<crate::deploy::DeploymentView> {
    Ok(Json(s.manager.deployment(&id)?))
}

async fn hosts(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
) -> HttpResult<Vec<HostView>> {
    Ok(Json(s.manager.hosts().await?))
}

async fn host(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
    Path(name): Path<String>,
) -> HttpResult<HostView> {
    Ok(Json(s.manager.host(&name).await?))
}

async fn remove_host(
    State(s): State<AppState>,
    OperatorCaller(c): OperatorCaller,
    Path(name): Path<String>,
) -> HttpResult<RemovedHost> {
    Ok(Json(s.manager.remove_host(&name, &c.peer).await?))
}

fn parse_uuid(s: &str) -> Result<Uuid, HttpError> {
    s.parse()
        .map_err(|_| HttpError::new(ErrorKind::Invalid, format!("{s:?} is not a UUID")))
}

async fn vms(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
) -> HttpResult<Vec<AuthorityRecord>> {
    Ok(Json(s.manager.vms().await?))
}

async fn vm(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
    Path(uuid): Path<String>,
) -> HttpResult<AuthorityRecord> {
    Ok(Json(s.manager.vm(parse_uuid(&uuid)?).await?))
}

async fn create_vm(
    State(s): State<AppState>,
    OperatorCaller(c): OperatorCaller,
    Body(req): Body<CreateVmRequest>,
) -> HttpResult<AuthorityRecord> {
    Ok(Json(s.manager.create_vm(req, &c.peer).await?))
}

async fn handover(
    State(s): State<AppState>,
    OperatorCaller(c): OperatorCaller,
    Path(uuid): Path<String>,
    Body(req): Body<HandoverRequest>,
) -> HttpResult<AuthorityRecord> {
    Ok(Json(
        s.manager.handover(parse_uuid(&uuid)?, req, &c.peer).await?,
    ))
}

async fn delete_vm(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
    Path(uuid): Path<String>,
    q: Result<Query<DeleteVmQuery>, axum::extract::rejection::QueryRejection>,
) -> HttpResult<Ack> {
    let Query(q) = q.map_err(|_| {
        HttpError::new(
            ErrorKind::Invalid,
            "say which generation to delete: ?generation=N",
        )
    })?;
    s.manager
        .delete_vm(parse_uuid(&uuid)?, q.generation)
        .await?;
    Ok(Json(Ack {}))
}

// The caller's extractor comes before the body's: a wrong role is 403
// whatever it sent.
async fn register_primary(
    State(s): State<AppState>,
    HostCaller(c): HostCaller,
    Body(req): Body<RegisterPrimaryRequest>,
) -> HttpResult<AuthorityRecord> {
    Ok(Json(s.manager.register_primary(&c.peer, req).await?))
}

async fn record_takeover(
    State(s): State<AppState>,
    HostCaller(c): HostCaller,
    Path(uuid): Path<String>,
    Body(req): Body<TakeoverRequest>,
) -> HttpResult<AuthorityRecord> {
    Ok(Json(
        s.manager
            .record_takeover(&c.peer, parse_uuid(&uuid)?, req)
            .await?,
    ))
}

async fn switch_sync(
    State(s): State<AppState>,
    HostCaller(c): HostCaller,
    Body(msg): Body<HostSwitchSync>,
) -> HttpResult<Ack> {
    s.manager.switch_sync(&c.peer, msg).await?;
    Ok(Json(Ack {}))
}

async fn dvs_show(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
) -> HttpResult<DvsView> {
    Ok(Json(s.manager.dvs_view().await?))
}

/// Answers when the rollout has ended: at most a few transaction timeouts
/// (canary, wave, reverts), each bounded by the request's `timeout_s`.
async fn dvs_apply(
    State(s): State<AppState>,
    OperatorCaller(c): OperatorCaller,
    Body(req): Body<DvsApplyRequest>,
) -> HttpResult<DvsApplyReport> {
    Ok(Json(s.manager.dvs_apply(req, &c.peer).await?))
}

async fn dvs_rollback(
    State(s): State<AppState>,
    OperatorCaller(c): OperatorCaller,
    Body(req): Body<DvsRollbackRequest>,
) -> HttpResult<DvsApplyReport> {
    Ok(Json(s.manager.dvs_rollback(req, &c.peer).await?))
}

async fn dvs_history(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
) -> HttpResult<Vec<DvsRevision>> {
    Ok(Json(s.manager.dvs_history().await?))
}

async fn dvs_revision(
    State(s): State<AppState>,
    OperatorCaller(_): OperatorCaller,
    Path(revision): Path<String>,
) -> HttpResult<DvsRevision> {
    let n: u64 = revision.parse().map_err(|_| {
        HttpError::new(
            ErrorKind::Invalid,
            format!("{revision:?} is not a revision number"),
        )
    })?;
    Ok(Json(s.manager.dvs_revision(n).await?))
}
