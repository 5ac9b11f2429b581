//! The admin HTTP server (`GET /status`, `GET /metrics`, and the control
//! endpoints `POST /volumes/{name}/promote`, `.../demote` and `.../resync`
//! behind `blockmirror promote`, `demote` and `resync`) and the small client
//! the CLI uses to talk to it.
//!
//! Control requests take a JSON body (`{"force": true}`,
//! `{"discard_local": true}`; an empty body means all defaults) and answer
//! 200 with a one-line text message, 404 for an unknown volume, 409 when
//! refused (the message says why and what to do), 400 for a bad body, 500
//! when the change could not be stored.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::daemon::admin_auth::{AdminAuth, AdminListener};
use crate::daemon::status::NodeStatus;

/// `POST /volumes/{name}/promote`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromoteRequest {
    /// Promote even while the primary is connected, or the mirror is inconsistent.
    #[serde(default)]
    pub force: bool,
}

/// `POST /volumes/{name}/demote`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DemoteRequest {}

/// `POST /volumes/{name}/resync`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncRequest {
    /// This side gives up its own changes (resolves a split brain): it
    /// becomes or stays the mirror and takes a full copy from its primary.
    #[serde(default)]
    pub discard_local: bool,
    /// On a primary: a new resync rate for its mirrors, bytes per second
    /// (0: unlimited); applies at once, also to a copy that is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
}

/// Why a control request was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no volume named {0:?}")]
    UnknownVolume(String),
    /// Not allowed now; the text says why and what to do.
    #[error("volume {volume}: {reason}")]
    Refused { volume: String, reason: String },
    /// Allowed, but the change could not be made durable.
    #[error("volume {volume}: {reason}")]
    Failed { volume: String, reason: String },
}

/// The `Content-Type` of `GET /metrics`: Prometheus text format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = crate::daemon::metrics::CONTENT_TYPE;

/// How long the client waits for a whole exchange with a node.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest response body the client accepts.
pub const CLIENT_MAX_BODY: usize = 16 << 20;

/// What the admin server shows. The node implements it; tests use fakes.
pub trait AdminSource: Send + Sync + 'static {
    /// The current `GET /status` document.
    fn status(&self) -> NodeStatus;
    /// The current `GET /metrics` text (Prometheus exposition format).
    fn metrics(&self) -> String;
    /// The node's event channel and chart history (`GET /events`,
    /// `/events/recent`, `/history`); `None` answers those with 404.
    fn observer(&self) -> Option<Arc<crate::daemon::events::Observer>> {
        None
    }
    /// `POST /verify/VOLUME`: starts a verify; its id, or the HTTP status
    /// and reason it was refused.
    fn start_verify(&self, volume: &str, req: &VerifyRequest) -> Result<u64, (u16, String)> {
        let _ = (volume, req);
        Err((404, "verify is not available on this node".into()))
    }
    /// `POST /mode/VOLUME`: switches mirrors of a primary volume between
    /// sync and async; the peers switched, or the HTTP status and reason.
    fn set_mode(&self, volume: &str, req: &ModeRequest) -> Result<Vec<String>, (u16, String)> {
        let _ = (volume, req);
        Err((404, "mode switching is not available on this node".into()))
    }
    /// `POST /volumes/{name}/faults` (tests only): replaces the faults
    /// injected into the volume's backend; 409 unless `fault_injection`.
    fn set_faults(
        &self,
        volume: &str,
        req: &crate::volume::local_disk::FaultRequest,
    ) -> Result<(), (u16, String)> {
        let _ = (volume, req);
        Err((404, "fault injection is not available on this node".into()))
    }
    /// `POST /admin/reload-tls`: reads the `[tls]` files again; the message,
    /// or the HTTP status and reason.
    fn reload_tls(&self) -> Result<String, (u16, String)> {
        Err((404, "TLS reload is not available on this node".into()))
    }
    /// Makes a mirror volume the primary. Called on the blocking pool.
    fn promote(&self, volume: &str, _req: &PromoteRequest) -> Result<String, ControlError> {
        Err(ControlError::Refused {
            volume: volume.into(),
            reason: "promote is not supported by this node".into(),
        })
    }
    /// Makes every mirror volume of consistency group `group` the primary,
    /// together: every link of the old primary is cut before any volume is
    /// promoted. Called on the blocking pool.
    fn promote_group(&self, group: &str, _req: &PromoteRequest) -> Result<String, ControlError> {
        Err(ControlError::Refused {
            volume: format!("group {group}"),
            reason: "group promote is not supported by this node".into(),
        })
    }
    /// Makes a primary volume a mirror (read-only export, waits for a
    /// primary). Called on the blocking pool.
    fn demote(&self, volume: &str, _req: &DemoteRequest) -> Result<String, ControlError> {
        Err(ControlError::Refused {
            volume: volume.into(),
            reason: "demote is not supported by this node".into(),
        })
    }
    /// Starts, resumes or (with `discard_local`) forces a resync. Called on
    /// the blocking pool.
    fn resync(&self, volume: &str, _req: &ResyncRequest) -> Result<String, ControlError> {
        Err(ControlError::Refused {
            volume: volume.into(),
            reason: "resync is not supported by this node".into(),
        })
    }
}

/// The body of `POST /mode/VOLUME`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModeRequest {
    /// "sync" or "async".
    pub mode: String,
    /// One mirror (its `peer` as configured); every mirror when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// The answer of `POST /mode/VOLUME`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModeSet {
    pub peers: Vec<String>,
}

/// The body of `POST /verify/VOLUME`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyRequest {
    /// Compare the data itself (remote reads), not checksums.
    #[serde(default)]
    pub full: bool,
    /// Mark differing ranges out of sync so a resync repairs them.
    #[serde(default)]
    pub mark: bool,
    /// Jobs (parallel requests) per mirror; the node's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<usize>,
}

/// The answer of `POST /verify/VOLUME`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerifyStarted {
    pub id: u64,
}

/// The admin routes, for callers that want to add their own before serving.
pub fn router(source: Arc<dyn AdminSource>) -> Router {
    Router::new()
        .route("/", get(crate::daemon::page::get_page))
        .route("/events", get(crate::daemon::page::get_events))
        .route("/events/recent", get(crate::daemon::page::get_recent))
        .route("/history", get(crate::daemon::page::get_history))
        .route("/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .route("/verify/{volume}", axum::routing::post(post_verify))
        .route("/mode/{volume}", axum::routing::post(post_mode))
        .route("/volumes/{name}/promote", post(post_promote))
        .route("/groups/{name}/promote", post(post_promote_group))
        .route("/volumes/{name}/demote", post(post_demote))
        .route("/volumes/{name}/resync", post(post_resync))
        .route("/volumes/{name}/faults", post(post_faults))
        .route("/admin/reload-tls", post(post_reload_tls))
        .fallback(not_found)
        .with_state(source)
}

/// Serves the admin API on `listener` until `shutdown` completes, then lets
/// in-flight requests finish and returns.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn AdminSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(AdminListener::plain(listener)?, source, None, shutdown).await
}

/// [`serve`] on a plain or HTTPS listener, with a bearer token if `auth`.
pub async fn serve_with(
    listener: AdminListener,
    source: Arc<dyn AdminSource>,
    auth: Option<Arc<AdminAuth>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = router(source);
    if let Some(a) = auth {
        app = app.layer(axum::middleware::from_fn_with_state(
            a,
            crate::daemon::admin_auth::authorize,
        ));
    }
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<crate::daemon::admin_auth::AdminPeer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn get_status(State(source): State<Arc<dyn AdminSource>>) -> Json<NodeStatus> {
    Json(source.status())
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the
/// Prometheus text format (curl, older collectors), as Go's promhttp does.
async fn get_metrics(
    State(source): State<Arc<dyn AdminSource>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let text = source.metrics();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if crate::daemon::metrics::accepts_openmetrics(accept) {
        ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text)
    } else {
        (
            [(
                header::CONTENT_TYPE,
                crate::daemon::metrics::PROMETHEUS_CONTENT_TYPE,
            )],
            crate::daemon::metrics::to_prometheus_text(&text),
        )
    }
}

async fn post_verify(
    State(source): State<Arc<dyn AdminSource>>,
    axum::extract::Path(volume): axum::extract::Path<String>,
    body: Bytes,
) -> axum::response::Response {
    let req: VerifyRequest = if body.is_empty() {
        VerifyRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("bad request body: {e}\n"))
                    .into_response()
            }
        }
    };
    match source.start_verify(&volume, &req) {
        Ok(id) => (StatusCode::ACCEPTED, Json(VerifyStarted { id })).into_response(),
        Err((code, msg)) => refused(code, &msg),
    }
}

/// A refusal from an [`AdminSource`] call as an HTTP answer.
fn refused(code: u16, msg: &str) -> axum::response::Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        format!("{msg}\n"),
    )
        .into_response()
}

async fn post_mode(
    State(source): State<Arc<dyn AdminSource>>,
    axum::extract::Path(volume): axum::extract::Path<String>,
    body: Bytes,
) -> axum::response::Response {
    let req: ModeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("bad request body: {e}\n")).into_response()
        }
    };
    match source.set_mode(&volume, &req) {
        Ok(peers) => Json(ModeSet { peers }).into_response(),
        Err((code, msg)) => refused(code, &msg),
    }
}

/// `POST /mode/VOLUME` on the node at `addr`; returns the peers switched.
pub async fn set_mode(
    addr: SocketAddr,
    volume: &str,
    req: &ModeRequest,
) -> Result<Vec<String>, AdminClientError> {
    let s: ModeSet = post_json(addr, format!("/mode/{volume}"), req).await?;
    Ok(s.peers)
}

/// `POST /verify/VOLUME` on the node at `addr`; returns the run's id.
pub async fn start_verify(
    addr: SocketAddr,
    volume: &str,
    req: &VerifyRequest,
) -> Result<u64, AdminClientError> {
    let s: VerifyStarted = post_json(addr, format!("/verify/{volume}"), req).await?;
    Ok(s.id)
}

/// POSTs `req` as JSON and decodes a 2xx answer's JSON body.
async fn post_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: String,
    req: &impl serde::Serialize,
) -> Result<T, AdminClientError> {
    let body = Bytes::from(serde_json::to_vec(req).expect("serialisable"));
    let resp = request(addr, Method::POST, &path, body).await?;
    if !(200..300).contains(&resp.status) {
        return Err(AdminClientError::Status {
            addr,
            path,
            status: resp.status,
            body: String::from_utf8_lossy(&resp.body).into_owned(),
        });
    }
    serde_json::from_slice(&resp.body).map_err(|source| AdminClientError::Decode {
        addr,
        path,
        source,
    })
}

fn control_reply(r: Result<Result<String, ControlError>, String>) -> (StatusCode, String) {
    match r {
        Ok(Ok(msg)) => (StatusCode::OK, msg + "\n"),
        Ok(Err(e)) => {
            let code = match e {
                ControlError::UnknownVolume(_) => StatusCode::NOT_FOUND,
                ControlError::Refused { .. } => StatusCode::CONFLICT,
                ControlError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (code, e.to_string() + "\n")
        }
        Err(e) => (StatusCode::BAD_REQUEST, e + "\n"),
    }
}

fn parse_body<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("bad request body: {e}"))
}

async fn post_promote(
    State(source): State<Arc<dyn AdminSource>>,
    Path(name): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    let r = match parse_body::<PromoteRequest>(&body) {
        Ok(req) => tokio::task::spawn_blocking(move || source.promote(&name, &req))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    control_reply(r)
}

async fn post_promote_group(
    State(source): State<Arc<dyn AdminSource>>,
    Path(name): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    let r = match parse_body::<PromoteRequest>(&body) {
        Ok(req) => tokio::task::spawn_blocking(move || source.promote_group(&name, &req))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    control_reply(r)
}

async fn post_demote(
    State(source): State<Arc<dyn AdminSource>>,
    Path(name): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    let r = match parse_body::<DemoteRequest>(&body) {
        Ok(req) => tokio::task::spawn_blocking(move || source.demote(&name, &req))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    control_reply(r)
}

async fn post_resync(
    State(source): State<Arc<dyn AdminSource>>,
    Path(name): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    let r = match parse_body::<ResyncRequest>(&body) {
        Ok(req) => tokio::task::spawn_blocking(move || source.resync(&name, &req))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    control_reply(r)
}

async fn post_faults(
    State(source): State<Arc<dyn AdminSource>>,
    Path(name): Path<String>,
    body: Bytes,
) -> axum::response::Response {
    match parse_body::<crate::volume::local_disk::FaultRequest>(&body) {
        Ok(req) => match source.set_faults(&name, &req) {
            Ok(()) => (StatusCode::OK, format!("{name}: faults set\n")).into_response(),
            Err((code, msg)) => refused(code, &msg),
        },
        Err(e) => (StatusCode::BAD_REQUEST, e + "\n").into_response(),
    }
}

async fn post_reload_tls(State(source): State<Arc<dyn AdminSource>>) -> axum::response::Response {
    match tokio::task::spawn_blocking(move || source.reload_tls()).await {
        Ok(Ok(msg)) => (StatusCode::OK, msg + "\n").into_response(),
        Ok(Err((code, msg))) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            msg + "\n",
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found\n")
}

// ---------------------------------------------------------------------------
// Client.

/// Why a request to a node's admin API failed. Each variant names the address.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error(
        "admin API at {addr}: cannot connect: {source} (is `blockmirror serve` running there?)"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "admin API at {addr}: TLS: {source} (is --ca the CA that signed the node's certificate?)"
    )]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API at {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("admin API at {addr}: no answer within {}s", .timeout.as_secs())]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The node answered with a non-success status; `body` is its text.
    #[error("admin API at {addr}: {path}: HTTP {status}: {}", .body.trim())]
    Status {
        addr: SocketAddr,
        path: String,
        status: u16,
        body: String,
    },
    #[error("admin API at {addr}: {path}: unexpected response: {source}")]
    Decode {
        addr: SocketAddr,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// How this process's admin client talks to nodes: a bearer token and, for
/// HTTPS, the CA that signed the nodes' certificates. Set once, by the CLI.
#[derive(Default)]
pub struct ClientSettings {
    pub token: Option<String>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

static CLIENT: std::sync::OnceLock<ClientSettings> = std::sync::OnceLock::new();

/// Sets the admin client's token and TLS (first call wins).
pub fn configure_client(settings: ClientSettings) {
    let _ = CLIENT.set(settings);
}

fn client() -> &'static ClientSettings {
    CLIENT.get_or_init(ClientSettings::default)
}

/// TCP, then TLS if the client has a CA (the node's certificate must name
/// the IP address dialled).
async fn open(addr: SocketAddr) -> Result<blockmirror_repl::LinkStream, AdminClientError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| AdminClientError::Connect { addr, source })?;
    match &client().tls {
        None => Ok(tcp.into()),
        Some(c) => blockmirror_repl::LinkStream::connect_tls(
            tcp,
            c.clone(),
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
        )
        .await
        .map_err(|source| AdminClientError::Tls { addr, source }),
    }
}

fn with_token(req: axum::http::request::Builder) -> axum::http::request::Builder {
    match &client().token {
        Some(t) => req.header(header::AUTHORIZATION, format!("Bearer {t}")),
        None => req,
    }
}

/// A response from the admin API.
#[derive(Debug, Clone)]
pub struct AdminResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// Sends one HTTP/1.1 request (`Connection: close`) to the admin API at
/// `addr` and returns the response, whatever its status. A non-empty `body`
/// is sent as JSON.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<AdminResponse, AdminClientError> {
    match tokio::time::timeout(CLIENT_TIMEOUT, request_inner(addr, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(AdminClientError::Timeout {
            addr,
            timeout: CLIENT_TIMEOUT,
        }),
    }
}

async fn request_inner(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<AdminResponse, AdminClientError> {
    let http =
        |e: Box<dyn std::error::Error + Send + Sync>| AdminClientError::Http { addr, source: e };
    let stream = open(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.into()))?;
    // Drives the connection; aborted when this function returns.
    let conn = AbortOnDrop(tokio::spawn(conn));

    let mut req = with_token(Request::builder())
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close");
    if !body.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(body)).map_err(|e| http(e.into()))?;
    let resp = sender.send_request(req).await.map_err(|e| http(e.into()))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Limited::new(resp.into_body(), CLIENT_MAX_BODY)
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    drop(conn);
    Ok(AdminResponse {
        status,
        content_type,
        body,
    })
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// GETs `path` and returns the body of a 2xx response.
async fn get_ok(addr: SocketAddr, path: &str) -> Result<Bytes, AdminClientError> {
    let resp = request(addr, Method::GET, path, Bytes::new()).await?;
    if !(200..300).contains(&resp.status) {
        return Err(AdminClientError::Status {
            addr,
            path: path.to_string(),
            status: resp.status,
            body: String::from_utf8_lossy(&resp.body).into_owned(),
        });
    }
    Ok(resp.body)
}

/// `GET /status` from the node whose admin API is at `addr`.
pub async fn fetch_status(addr: SocketAddr) -> Result<NodeStatus, AdminClientError> {
    let body = get_ok(addr, "/status").await?;
    serde_json::from_slice(&body).map_err(|source| AdminClientError::Decode {
        addr,
        path: "/status".to_string(),
        source,
    })
}

/// POSTs a control request (`body` as JSON) and returns the node's message
/// on success; a refusal is [`AdminClientError::Status`] with its text.
pub async fn post_control(
    addr: SocketAddr,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<String, AdminClientError> {
    let json = serde_json::to_vec(body).map_err(|source| AdminClientError::Decode {
        addr,
        path: path.to_string(),
        source,
    })?;
    let resp = request(addr, Method::POST, path, Bytes::from(json)).await?;
    let text = String::from_utf8_lossy(&resp.body).trim().to_string();
    if !(200..300).contains(&resp.status) {
        return Err(AdminClientError::Status {
            addr,
            path: path.to_string(),
            status: resp.status,
            body: text,
        });
    }
    Ok(text)
}

/// `GET /metrics` from the node whose admin API is at `addr`.
pub async fn fetch_metrics(addr: SocketAddr) -> Result<String, AdminClientError> {
    let body = get_ok(addr, "/metrics").await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Follows `GET /events` (`?now=true` with `now`) on the node at `addr` and
/// calls `each` for every event until the node closes the stream (shutdown)
/// or `each` returns false. No overall timeout: the stream is meant to last.
pub async fn follow_events(
    addr: SocketAddr,
    now: bool,
    mut each: impl FnMut(crate::daemon::events::Event) -> bool,
) -> Result<(), AdminClientError> {
    let http =
        |e: Box<dyn std::error::Error + Send + Sync>| AdminClientError::Http { addr, source: e };
    let path = if now { "/events?now=true" } else { "/events" };
    let stream = tokio::time::timeout(CLIENT_TIMEOUT, open(addr))
        .await
        .map_err(|_| AdminClientError::Timeout {
            addr,
            timeout: CLIENT_TIMEOUT,
        })??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(e.into()))?;
    let conn = AbortOnDrop(tokio::spawn(conn));
    let req = with_token(Request::builder())
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::ACCEPT, "text/event-stream")
        .body(Full::new(Bytes::new()))
        .map_err(|e| http(e.into()))?;
    let resp = sender.send_request(req).await.map_err(|e| http(e.into()))?;
    if !resp.status().is_success() {
        return Err(AdminClientError::Status {
            addr,
            path: path.to_string(),
            status: resp.status().as_u16(),
            body: String::new(),
        });
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| http(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        // One SSE message ends with an empty line.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let msg: Vec<u8> = buf.drain(..end + 2).collect();
            let msg = String::from_utf8_lossy(&msg);
            let mut is_event = true;
            let mut data = String::new();
            for line in msg.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    is_event = name.trim() == "message";
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if !is_event || data.is_empty() {
                continue;
            }
            let ev = serde_json::from_str(&data).map_err(|source| AdminClientError::Decode {
                addr,
                path: path.to_string(),
                source,
            })?;
            if !each(ev) {
                return Ok(());
            }
        }
    }
    drop(conn);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::{MirrorStatus, VolumeStatus};

    struct Fake;

    impl AdminSource for Fake {
        fn status(&self) -> NodeStatus {
            NodeStatus {
                cluster: None,
                node: "site-a".into(),
                volumes: vec![VolumeStatus {
                    name: "db".into(),
                    role: "primary".into(),
                    size_bytes: 1 << 30,
                    generation: "abc123".into(),
                    nbd: "nbd://127.0.0.1:10809/db".into(),
                    read_only: false,
                    connections: 2,
                    mirrors: vec![MirrorStatus {
                        peer: "127.0.0.1:7701".into(),
                        mode: "async".into(),
                        connection: "connecting".into(),
                        state: "degraded".into(),
                        out_of_sync_bytes: 4096,
                        lag_bytes: 0,
                        lag_seconds: 1.5,
                        resync_done_bytes: 0,
                        resync_total_bytes: 0,
                        peer_node: None,
                        inflight_requests: 0,
                        oldest_request_ms: 0,
                        last_error: None,
                        last_verify: None,
                        resync_passes: 0,
                        resync_suspension_us: None,
                        resync_rate_bytes_per_sec: 0,
                        reads_served: 0,
                    }],
                    primary: None,
                    ..Default::default()
                }],
            }
        }

        fn metrics(&self) -> String {
            "# TYPE blockmirror_up gauge\nblockmirror_up 1\n# EOF\n".to_string()
        }
    }

    /// Starts a server on an ephemeral port; returns its address, a shutdown
    /// trigger and the server task.
    async fn start() -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, Arc::new(Fake), async {
            let _ = rx.await;
        }));
        (addr, tx, task)
    }

    #[tokio::test]
    async fn status_metrics_and_not_found() {
        let (addr, stop, task) = start().await;

        let status = fetch_status(addr).await.unwrap();
        assert_eq!(status, Fake.status());

        let resp = request(addr, Method::GET, "/status", Bytes::new())
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.content_type.as_deref(), Some("application/json"));

        let resp = request(addr, Method::GET, "/metrics", Bytes::new())
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        let ct = resp.content_type.unwrap();
        // No Accept header: the Prometheus text format.
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = crate::daemon::metrics::to_prometheus_text(&Fake.metrics());
        assert_eq!(resp.body, text.as_bytes());
        assert_eq!(fetch_metrics(addr).await.unwrap(), text);

        let resp = request(addr, Method::GET, "/nope", Bytes::new())
            .await
            .unwrap();
        assert_eq!(resp.status, 404);
        let e = get_ok(addr, "/nope").await.unwrap_err();
        assert!(
            matches!(e, AdminClientError::Status { status: 404, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&addr.to_string()), "{e}");

        let resp = request(addr, Method::POST, "/status", Bytes::new())
            .await
            .unwrap();
        assert_eq!(resp.status, 405);

        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn control_endpoints_map_errors_to_status_codes() {
        struct Ctl;
        impl AdminSource for Ctl {
            fn status(&self) -> NodeStatus {
                Fake.status()
            }
            fn metrics(&self) -> String {
                String::new()
            }
            fn promote(&self, volume: &str, req: &PromoteRequest) -> Result<String, ControlError> {
                match (volume, req.force) {
                    ("db", true) => Ok("promoted db".into()),
                    ("db", false) => Err(ControlError::Refused {
                        volume: "db".into(),
                        reason: "primary connected; use --force".into(),
                    }),
                    (v, _) => Err(ControlError::UnknownVolume(v.into())),
                }
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, Arc::new(Ctl), async {
            let _ = rx.await;
        }));
        let ok = post_control(addr, "/volumes/db/promote", &PromoteRequest { force: true })
            .await
            .unwrap();
        assert_eq!(ok, "promoted db");
        let e = post_control(addr, "/volumes/db/promote", &PromoteRequest::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, AdminClientError::Status { status: 409, body, .. } if body.contains("--force")),
            "{e}"
        );
        let e = post_control(addr, "/volumes/nope/promote", &PromoteRequest::default())
            .await
            .unwrap_err();
        assert!(
            matches!(e, AdminClientError::Status { status: 404, .. }),
            "{e}"
        );
        // The default resync handler refuses; a malformed body is a 400.
        let e = post_control(addr, "/volumes/db/resync", &ResyncRequest::default())
            .await
            .unwrap_err();
        assert!(
            matches!(e, AdminClientError::Status { status: 409, .. }),
            "{e}"
        );
        let resp = request(
            addr,
            Method::POST,
            "/volumes/db/resync",
            Bytes::from_static(b"{nope"),
        )
        .await
        .unwrap();
        assert_eq!(resp.status, 400);
        tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn connect_error_names_the_address() {
        // Bind then drop, so nothing listens on the port.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let e = fetch_status(addr).await.unwrap_err();
        assert!(matches!(e, AdminClientError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    #[tokio::test]
    async fn non_json_status_is_a_decode_error() {
        // A server that answers /status with something that is not NodeStatus.
        let app = Router::new().route("/status", get(|| async { "not json" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
        });
        let e = fetch_status(addr).await.unwrap_err();
        assert!(matches!(e, AdminClientError::Decode { .. }), "{e}");
        tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
}
