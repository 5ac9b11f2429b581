//! Who may use the admin API, and over what: a bearer token (`[admin_auth]
//! token_file`) or a client certificate from the node's CA (`client_certs
//! = true`, over HTTPS), checked by a middleware (GET requests open with
//! `open_reads = true`), and HTTPS with the node's certificate when `[tls]`
//! is set ([`AdminListener`]). A refused request is 401 (no credentials)
//! or 403 (a wrong token), logged with the peer's address; a client
//! certificate that does not chain to the CA fails the TLS handshake,
//! logged with the peer's address too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use blockmirror_repl::LinkStream;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::tls::TlsStore;

/// How long a client may take over its TLS handshake on the admin port.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPT_QUEUE: usize = 64;
/// A token shorter than this is refused at start.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin token file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin token file {}: the token must be at least {MIN_TOKEN_LEN} characters (32 random hex digits recommended)", .path.display())]
    TooShort { path: PathBuf },
}

/// Reads a bearer token: the file's first line, trimmed.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort {
            path: path.to_path_buf(),
        });
    }
    Ok(token)
}

/// The admin API's authorization.
pub struct AdminAuth {
    /// `None`: no token is accepted (client certificates only).
    token: Option<String>,
    open_reads: bool,
    client_certs: bool,
}

impl AdminAuth {
    pub fn new(token: Option<String>, open_reads: bool, client_certs: bool) -> Self {
        Self {
            token,
            open_reads,
            client_certs,
        }
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether a client certificate from the CA authorizes a request (the
    /// HTTPS listener then asks for one).
    pub fn client_certs(&self) -> bool {
        self.client_certs
    }
}

/// Equal without an early exit (the token's prefix is not leaked by timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Who is on the other end of an admin connection (axum's connect info on
/// [`AdminListener`]): its address, for logs, and the client certificate
/// it presented over TLS, if any (the handshake verified it against the CA).
#[derive(Debug, Clone)]
pub struct AdminPeer {
    pub addr: SocketAddr,
    /// The certificate's first DNS subject name (`"?"` when it has none);
    /// `None`: no client certificate.
    pub client_cert: Option<Arc<str>>,
}

/// The name a client certificate is logged by.
fn cert_name(c: &rustls::pki_types::CertificateDer<'_>) -> Arc<str> {
    webpki::EndEntityCert::try_from(c)
        .ok()
        .and_then(|e| e.valid_dns_names().next().map(Arc::from))
        .unwrap_or_else(|| Arc::from("?"))
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, AdminListener>>
    for AdminPeer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, AdminListener>) -> Self {
        AdminPeer {
            addr: *s.remote_addr(),
            client_cert: s
                .io()
                .peer_certificates()
                .and_then(|c| c.first())
                .map(cert_name),
        }
    }
}

/// The middleware: reads pass when `open_reads`; everything else needs
/// `Authorization: Bearer TOKEN` or, with `client_certs`, a client
/// certificate from the CA.
pub async fn authorize(
    State(auth): State<Arc<AdminAuth>>,
    ConnectInfo(who): ConnectInfo<AdminPeer>,
    req: Request,
    next: Next,
) -> Response {
    let peer = who.addr;
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if read && auth.open_reads {
        return next.run(req).await;
    }
    if auth.client_certs {
        if let Some(name) = &who.client_cert {
            debug!(%peer, cert = %name, method = %req.method(), path = %req.uri().path(),
                "admin request authorized by client certificate");
            return next.run(req).await;
        }
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match (given, &auth.token) {
        (Some(t), Some(token)) if same(t.as_bytes(), token.as_bytes()) => next.run(req).await,
        (Some(_), Some(_)) => {
            warn!(%peer, %method, %path, "admin request refused: wrong token");
            (StatusCode::FORBIDDEN, "wrong token\n").into_response()
        }
        (Some(_), None) => {
            warn!(%peer, %method, %path,
                "admin request refused: a token, but this node takes client certificates only");
            (
                StatusCode::FORBIDDEN,
                "this node takes no token: present a client certificate from its CA \
                 (blockmirror --cert FILE --key FILE)\n",
            )
                .into_response()
        }
        (None, _) => {
            let (why, hint) = match (auth.token.is_some(), auth.client_certs) {
                (true, false) => (
                    "no bearer token",
                    "a bearer token is required (blockmirror --token-file FILE)\n",
                ),
                (true, true) => (
                    "no bearer token or client certificate",
                    "a bearer token or a client certificate from the node's CA is required \
                     (blockmirror --token-file FILE, or --cert FILE --key FILE)\n",
                ),
                (false, _) => (
                    "no client certificate",
                    "a client certificate from the node's CA is required \
                     (blockmirror --cert FILE --key FILE)\n",
                ),
            };
            warn!(%peer, %method, %path, "admin request refused: {why}");
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                hint,
            )
                .into_response()
        }
    }
}

/// The admin port's listener: plain TCP, or TLS with the node's certificate
/// (handshakes run on tasks of their own, so a slow client holds up no one).
pub struct AdminListener {
    local: SocketAddr,
    inner: Inner,
}

enum Inner {
    Plain(TcpListener),
    Tls {
        rx: mpsc::Receiver<(LinkStream, SocketAddr)>,
        task: tokio::task::JoinHandle<()>,
    },
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        if let Inner::Tls { task, .. } = &self.inner {
            task.abort();
        }
    }
}

impl AdminListener {
    pub fn plain(l: TcpListener) -> std::io::Result<Self> {
        Ok(Self {
            local: l.local_addr()?,
            inner: Inner::Plain(l),
        })
    }

    /// HTTPS: the current admin config of `tls` at each handshake; with
    /// `client_certs`, one that asks for a client certificate (optional,
    /// verified against the CA when presented).
    pub fn tls(l: TcpListener, tls: Arc<TlsStore>, client_certs: bool) -> std::io::Result<Self> {
        let local = l.local_addr()?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match l.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let current = tls.current();
                let config = if client_certs {
                    current.admin_client_certs.clone()
                } else {
                    current.admin.clone()
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let hs = tokio::time::timeout(
                        TLS_HANDSHAKE_TIMEOUT,
                        LinkStream::accept_tls(tcp, config),
                    )
                    .await;
                    match hs {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => {
                            warn!(%peer, error = %e, "admin connection refused: TLS handshake failed")
                        }
                        Err(_) => debug!(%peer, "admin connection: no TLS handshake in time"),
                    }
                });
            }
        });
        Ok(Self {
            local,
            inner: Inner::Tls { rx, task },
        })
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = LinkStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LinkStream, SocketAddr) {
        match &mut self.inner {
            Inner::Plain(l) => loop {
                match TcpListener::accept(l).await {
                    Ok((s, a)) => return (LinkStream::Plain(s), a),
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            },
            Inner::Tls { rx, .. } => match rx.recv().await {
                Some(x) => x,
                // The acceptor is gone (only when the listener is dropped).
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
