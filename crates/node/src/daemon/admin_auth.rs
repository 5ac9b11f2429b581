//! Who may use the admin API, and over what: a bearer token (`[admin_auth]
//! token_file`; GET requests open with `open_reads = true`) checked by a
//! middleware, and HTTPS with the node's certificate when `[tls]` is set
//! ([`AdminListener`]). A refused request is 401 (no token) or 403 (a wrong
//! one), logged with the peer's address.

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
    token: String,
    open_reads: bool,
}

impl AdminAuth {
    pub fn new(token: String, open_reads: bool) -> Self {
        Self { token, open_reads }
    }
}

/// Equal without an early exit (the token's prefix is not leaked by timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The peer's address, for logs (axum's connect info on [`AdminListener`]).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, AdminListener>>
    for PeerAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, AdminListener>) -> Self {
        PeerAddr(*s.remote_addr())
    }
}

/// The middleware: reads pass when `open_reads`; everything else needs
/// `Authorization: Bearer TOKEN`.
pub async fn authorize(
    State(auth): State<Arc<AdminAuth>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    req: Request,
    next: Next,
) -> Response {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if read && auth.open_reads {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match given {
        Some(t) if same(t.as_bytes(), auth.token.as_bytes()) => next.run(req).await,
        Some(_) => {
            warn!(%peer, %method, %path, "admin request refused: wrong token");
            (StatusCode::FORBIDDEN, "wrong token\n").into_response()
        }
        None => {
            warn!(%peer, %method, %path, "admin request refused: no bearer token");
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token is required (blockmirror --token-file FILE)\n",
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

    /// HTTPS: the current admin config of `tls` at each handshake.
    pub fn tls(l: TcpListener, tls: Arc<TlsStore>) -> std::io::Result<Self> {
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
                let (tx, config) = (tx.clone(), tls.current().admin.clone());
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
