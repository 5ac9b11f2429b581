//! TLS for the node: the `[tls]` files loaded into rustls configs, reloaded
//! on SIGHUP or `POST /admin/reload-tls` (new connections use the new ones;
//! established connections keep theirs), and `certs init` ([`certs`]).
//!
//! One CA, one certificate and key per node, used for:
//!
//! - replication links: mutual TLS. The mirror accepts a primary whose
//!   certificate chains to the CA; the primary accepts a mirror whose
//!   certificate chains to the CA *and* names the peer it dials: the
//!   mirror table's `peer_name` if set, else the host of its `peer`
//!   address (an IP address must then be an IP subject name).
//! - NBD exports (STARTTLS): the node's certificate; a client certificate
//!   is verified against the CA when presented, and required with
//!   `[tls] nbd_client_certs = "require"`.
//! - the admin API (HTTPS): the node's certificate; with `[admin_auth]
//!   client_certs = true` a client certificate is asked for and, when
//!   presented, must chain to the CA (it then authorizes the request).
//!   Without, none is asked for.

pub mod certs;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tracing::info;

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: {what} {}: {message}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("tls: {what}: {message}")]
    Config { what: &'static str, message: String },
    #[error("tls: {0:?} is not a name a certificate can hold")]
    BadName(String),
}

/// Whether NBD clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientCerts {
    /// Verified against the CA when presented, not required.
    #[default]
    Optional,
    /// Required, and from the CA.
    Require,
}

impl ClientCerts {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientCerts::Optional => "optional",
            ClientCerts::Require => "require",
        }
    }
}

/// The `[tls]` table, validated (paths resolved against the config's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub nbd_client_certs: ClientCerts,
    /// HTTPS on the admin port with the node's certificate (key
    /// `admin_https`, default true).
    pub admin_https: bool,
}

/// The rustls configs made from one reading of the files.
pub struct TlsConfigs {
    /// NBD STARTTLS.
    pub nbd: Arc<ServerConfig>,
    /// The mirror's side of a replication or job connection (client
    /// certificate required, from the CA).
    pub repl_server: Arc<ServerConfig>,
    /// The primary's side (presents this node's certificate).
    pub repl_client: Arc<ClientConfig>,
    /// HTTPS on the admin port.
    pub admin: Arc<ServerConfig>,
    /// HTTPS on the admin port asking for a client certificate (optional;
    /// verified against the CA when presented): `[admin_auth] client_certs`.
    pub admin_client_certs: Arc<ServerConfig>,
}

/// The node's TLS state: the files and the configs last read from them.
pub struct TlsStore {
    settings: TlsSettings,
    current: RwLock<Arc<TlsConfigs>>,
}

/// ring's provider with AES-128-GCM preferred over AES-256-GCM (rustls'
/// default order): the replication link encrypts every byte a host writes,
/// twice (once per side), and AES-128 has 10 rounds to AES-256's 14. Both
/// ends of a link are ours, so this order is what links negotiate;
/// docs/BENCHMARKS.md has the measurement.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(String) -> TlsError + 'a {
    move |message| TlsError::File {
        what,
        path: path.to_path_buf(),
        message,
    }
}

/// The certificates in a PEM file (at least one).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path)(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path)(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(what, path)("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err("key", path)(e.to_string()))
}

/// A root store holding the certificates of the CA file.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs("ca", path)? {
        roots
            .add(c)
            .map_err(|e| file_err("ca", path)(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

fn config_err(what: &'static str) -> impl FnOnce(rustls::Error) -> TlsError {
    move |e| TlsError::Config {
        what,
        message: e.to_string(),
    }
}

impl TlsConfigs {
    /// Reads the files of `s` and builds every config.
    pub fn load(s: &TlsSettings) -> Result<TlsConfigs, TlsError> {
        let roots = load_roots(&s.ca)?;
        let chain = load_certs("cert", &s.cert)?;
        let key = load_key(&s.key)?;
        let p = provider();

        let server = |verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
                      what: &'static str|
         -> Result<Arc<ServerConfig>, TlsError> {
            let b = ServerConfig::builder_with_provider(p.clone())
                .with_safe_default_protocol_versions()
                .map_err(config_err(what))?;
            let b = match verifier {
                Some(v) => b.with_client_cert_verifier(v),
                None => b.with_no_client_auth(),
            };
            let mut c = b
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(config_err(what))?;
            c.max_early_data_size = 0;
            Ok(Arc::new(c))
        };
        let verr = |what: &'static str| {
            move |e: rustls::server::VerifierBuilderError| TlsError::Config {
                what,
                message: e.to_string(),
            }
        };
        let required = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
            .build()
            .map_err(verr("replication server"))?;
        let optional = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
            .allow_unauthenticated()
            .build()
            .map_err(verr("nbd"))?;
        let nbd_verifier = match s.nbd_client_certs {
            ClientCerts::Require => required.clone(),
            ClientCerts::Optional => optional.clone(),
        };
        let repl_client = ClientConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err("replication client"))?
            .with_webpki_verifier(
                WebPkiServerVerifier::builder_with_provider(roots, p.clone())
                    .build()
                    .map_err(|e| TlsError::Config {
                        what: "replication client",
                        message: e.to_string(),
                    })?,
            )
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(config_err("replication client"))?;
        Ok(TlsConfigs {
            nbd: server(Some(nbd_verifier), "nbd")?,
            repl_server: server(Some(required), "replication server")?,
            repl_client: Arc::new(repl_client),
            admin: server(None, "admin")?,
            admin_client_certs: server(Some(optional), "admin")?,
        })
    }
}

impl TlsStore {
    /// Reads the files; fails if any is missing or does not match.
    pub fn load(settings: TlsSettings) -> Result<TlsStore, TlsError> {
        let configs = TlsConfigs::load(&settings)?;
        Ok(TlsStore {
            settings,
            current: RwLock::new(Arc::new(configs)),
        })
    }

    /// The configs new connections use.
    pub fn current(&self) -> Arc<TlsConfigs> {
        self.current.read().expect("tls lock").clone()
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// Reads the files again; on success new connections use them, on
    /// failure the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let configs = TlsConfigs::load(&self.settings)?;
        *self.current.write().expect("tls lock") = Arc::new(configs);
        info!(cert = %self.settings.cert.display(), "tls certificates reloaded");
        Ok(())
    }
}

impl blockmirror_nbd::TlsSource for TlsStore {
    fn server_config(&self) -> Option<Arc<ServerConfig>> {
        Some(self.current().nbd.clone())
    }
}

/// The name a primary expects in its mirror's certificate: `peer_name`
/// if the config has one, else the host part of the peer address.
pub fn expected_name(
    peer_name: Option<&str>,
    addr: std::net::SocketAddr,
) -> Result<ServerName<'static>, TlsError> {
    match peer_name {
        Some(n) => {
            ServerName::try_from(n.to_string()).map_err(|_| TlsError::BadName(n.to_string()))
        }
        None => Ok(ServerName::IpAddress(addr.ip().into())),
    }
}

/// Checks that the certificate the peer of `stream` presented (verified
/// against the CA by the TLS handshake) is valid for the DNS name `node`:
/// with TLS alone authenticating a link, the certificate is the only proof
/// of which node a primary is, so the mirror holds it to the node name its
/// Hello claims. The error says why, for the log and the primary.
pub fn check_peer_is(stream: &blockmirror_repl::LinkStream, node: &str) -> Result<(), String> {
    let Some(cert) = stream.peer_certificates().and_then(|c| c.first()) else {
        return Err("it presented no certificate".into());
    };
    let name = ServerName::try_from(node.to_string())
        .map_err(|_| format!("node name {node:?} is not a name a certificate can hold"))?;
    let cert = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("its certificate cannot be read: {e}"))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|e| format!("its certificate does not name {node:?} ({e})"))
}

/// A client config that trusts `ca` (for the CLI talking HTTPS to a node).
pub fn client_config_for_ca(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    client_config(ca, None)
}

/// A client config that trusts `ca` and, with `identity` (certificate,
/// key), presents that certificate: the CLI authorizing itself to a node
/// with `[admin_auth] client_certs = true`.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(ca)?;
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err("admin client"))?
        .with_root_certificates(roots);
    let c = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(load_certs("cert", cert)?, load_key(key)?)
            .map_err(config_err("admin client"))?,
    };
    Ok(Arc::new(c))
}

/// Why a primary could not open a connection to its mirror.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with mirror {addr} (its certificate must chain to the CA and name {expected}): {source}")]
    Tls {
        addr: std::net::SocketAddr,
        expected: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Name(#[from] TlsError),
}

/// Opens a replication or job connection to the mirror at `addr`: TCP, then
/// TLS with this node's certificate when `tls` is set, checking that the
/// mirror's certificate names `peer_name` (else `addr`'s IP address).
pub async fn dial(
    addr: std::net::SocketAddr,
    tls: Option<&TlsStore>,
    peer_name: Option<&str>,
) -> Result<blockmirror_repl::LinkStream, DialError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| DialError::Connect { addr, source })?;
    tcp.set_nodelay(true)
        .map_err(|source| DialError::Connect { addr, source })?;
    let Some(tls) = tls else {
        return Ok(tcp.into());
    };
    let name = expected_name(peer_name, addr)?;
    let expected = peer_name.map_or_else(|| addr.ip().to_string(), str::to_string);
    blockmirror_repl::LinkStream::connect_tls(tcp, tls.current().repl_client.clone(), name)
        .await
        .map_err(|source| DialError::Tls {
            addr,
            expected,
            source,
        })
}

/// The mirror's side: TLS (a client certificate from the CA required) when
/// `tls` is set, else the plain stream.
pub async fn accept(
    tcp: tokio::net::TcpStream,
    tls: Option<&TlsStore>,
) -> std::io::Result<blockmirror_repl::LinkStream> {
    match tls {
        None => Ok(tcp.into()),
        Some(t) => {
            blockmirror_repl::LinkStream::accept_tls(tcp, t.current().repl_server.clone()).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_repl::{KeyMode, NodeHello, Purpose, VolumeIdentity};

    fn store(dir: &Path, node: &str) -> TlsStore {
        TlsStore::load(TlsSettings {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}.key")),
            nbd_client_certs: ClientCerts::Optional,
            admin_https: false,
        })
        .unwrap()
    }

    fn vol() -> VolumeIdentity {
        VolumeIdentity {
            name: "db".into(),
            volume_id: [1; 16],
            size: 4096,
            generation: 1,
            history: [0; blockmirror_repl::HISTORY_LEN],
        }
    }

    /// Over a real mutual TLS connection both ends draw the same exporter,
    /// and a handshake keyed by it alone (no secret), or by it and a
    /// secret, completes; each connection draws a different one.
    #[tokio::test]
    async fn both_ends_of_a_tls_link_derive_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(
            dir.path(),
            &["site-a".into(), "site-b".into()],
            &certs::InitOptions::default(),
        )
        .unwrap();
        let (a, b) = (store(dir.path(), "site-a"), store(dir.path(), "site-b"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut seen = Vec::new();
        for secret in [None, Some(&b"0123456789abcdef"[..])] {
            let mirror = async {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut s = accept(tcp, Some(&b)).await.unwrap();
                let e = s.exporter().unwrap().unwrap();
                let key = s.link_key(secret).unwrap();
                let r = blockmirror_repl::accept_any(&mut s, &key, "site-b", |_| Some(vol())).await;
                (e, key.mode(), r.map(|(p, _, _)| p.node))
            };
            let primary = async {
                let mut s = dial(addr, Some(&a), Some("site-b")).await.unwrap();
                let e = s.exporter().unwrap().unwrap();
                let key = s.link_key(secret).unwrap();
                let hello = NodeHello {
                    node: "site-a".into(),
                    volume: vol(),
                };
                let r =
                    blockmirror_repl::connect_for(&mut s, &key, &hello, Purpose::Replication).await;
                (e, key.mode(), r.map(|p| p.node))
            };
            let ((em, mm, rm), (ep, mp, rp)) = tokio::join!(mirror, primary);
            assert_eq!(em, ep, "one session, one exporter");
            let want = if secret.is_some() {
                KeyMode::TlsAndSecret
            } else {
                KeyMode::Tls
            };
            assert_eq!((mm, mp), (want, want));
            assert_eq!(rm.unwrap(), "site-a");
            assert_eq!(rp.unwrap(), "site-b");
            seen.push(em);
        }
        assert_ne!(seen[0], seen[1], "each session has its own exporter");
    }
}
