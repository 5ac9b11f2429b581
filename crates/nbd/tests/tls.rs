//! NBD_OPT_STARTTLS over raw bytes: the FORCEDTLS refusals, the upgrade,
//! STARTTLS twice, a mode without TLS, client certificates.

use std::sync::{Arc, Mutex};

use blockmirror_nbd::proto::*;
use blockmirror_nbd::{serve_connection, Errno, Export, Exports, StatusExtent, TlsMode, TlsSource};
use bytes::{BufMut, Bytes, BytesMut};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Mem {
    data: Mutex<Vec<u8>>,
    tls: TlsMode,
}

impl Export for Mem {
    fn name(&self) -> &str {
        "db"
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn tls(&self) -> TlsMode {
        self.tls
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let d = self.data.lock().unwrap();
        Ok(Bytes::copy_from_slice(
            &d[offset as usize..offset as usize + len as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), Errno> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }
    async fn trim(&self, _o: u64, _l: u64, _f: bool) -> Result<(), Errno> {
        Ok(())
    }
    async fn write_zeroes(&self, _o: u64, _l: u64, _t: bool, _f: bool) -> Result<(), Errno> {
        Ok(())
    }
    async fn block_status(&self, _o: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        Ok(vec![StatusExtent { len, flags: 0 }])
    }
}

/// A CA, a server identity and a client identity (and a stranger's).
struct Pki {
    ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, PrivateKeyDer<'static>),
    client: (CertificateDer<'static>, PrivateKeyDer<'static>),
    stranger: (CertificateDer<'static>, PrivateKeyDer<'static>),
}

fn ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(
    name: &str,
    ca: &(rcgen::Certificate, rcgen::KeyPair),
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let c = p.signed_by(&key, &ca.0, &ca.1).unwrap();
    (
        c.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn pki() -> Pki {
    let a = ca();
    let other = ca();
    Pki {
        ca: a.0.der().clone(),
        server: leaf("localhost", &a),
        client: leaf("host", &a),
        stranger: leaf("host", &other),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(p: &Pki) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    r.add(p.ca.clone()).unwrap();
    Arc::new(r)
}

struct Source(Arc<rustls::ServerConfig>);

impl TlsSource for Source {
    fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        Some(self.0.clone())
    }
}

fn server_config(p: &Pki, require_client: bool) -> Arc<rustls::ServerConfig> {
    let mut v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(p), provider());
    if !require_client {
        v = v.allow_unauthenticated();
    }
    let c = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(v.build().unwrap())
        .with_single_cert(vec![p.server.0.clone()], p.server.1.clone_key())
        .unwrap();
    Arc::new(c)
}

fn client_config(
    p: &Pki,
    ident: Option<&(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(p));
    Arc::new(match ident {
        Some((c, k)) => b
            .with_client_auth_cert(vec![c.clone()], k.clone_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// Starts a server for one export in `mode`; returns the client end,
/// past the greeting, and the server's result.
async fn start(
    mode: TlsMode,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let (mut a, b) = tokio::io::duplex(1 << 20);
    let export = Arc::new(Mem {
        data: Mutex::new(vec![0; 1 << 20]),
        tls: mode,
    });
    let mut exports = Exports::new([export]);
    if let Some(c) = tls {
        exports = exports.with_tls(Arc::new(Source(c)));
    }
    let server = tokio::spawn(async move {
        serve_connection(b, &exports, CancellationToken::new())
            .await
            .map_err(|e| e.to_string())
    });
    assert_eq!(a.read_u64().await.unwrap(), NBD_MAGIC);
    assert_eq!(a.read_u64().await.unwrap(), IHAVEOPT);
    a.read_u16().await.unwrap();
    a.write_u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .await
        .unwrap();
    (a, server)
}

async fn option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    let mut b = BytesMut::new();
    OptionHeader {
        option,
        len: data.len() as u32,
    }
    .encode(&mut b);
    b.put_slice(data);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
}

/// The kind of the next option reply (its data skipped).
async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> u32 {
    assert_eq!(s.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
    let _option = s.read_u32().await.unwrap();
    let kind = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).await.unwrap();
    kind
}

fn go_payload() -> BytesMut {
    let mut b = BytesMut::new();
    InfoRequest {
        export: "db".into(),
        infos: vec![],
    }
    .encode(&mut b);
    b
}

/// GO for "db"; the reply kinds up to the last.
async fn go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> u32 {
    option(s, OPT_GO, &go_payload()).await;
    loop {
        match reply(s).await {
            REP_INFO => continue,
            k => return k,
        }
    }
}

/// A WRITE then a READ of it in the transmission phase (simple replies).
async fn write_read<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut b = BytesMut::new();
    RequestHeader {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 4096,
        len: 512,
    }
    .encode(&mut b);
    b.put_bytes(0x5a, 512);
    RequestHeader {
        flags: 0,
        kind: CMD_READ,
        cookie: 2,
        offset: 4096,
        len: 512,
    }
    .encode(&mut b);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        assert_eq!(s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        assert_eq!(s.read_u32().await.unwrap(), 0, "error");
        let cookie = s.read_u64().await.unwrap();
        if cookie == 2 {
            let mut d = vec![0; 512];
            s.read_exact(&mut d).await.unwrap();
            assert!(d.iter().all(|&x| x == 0x5a));
        }
        got.push(cookie);
    }
    got.sort();
    assert_eq!(got, vec![1, 2]);
}

async fn upgrade(
    s: tokio::io::DuplexStream,
    c: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    tokio_rustls::TlsConnector::from(c)
        .connect(ServerName::try_from("localhost").unwrap(), s)
        .await
}

#[tokio::test]
async fn require_refuses_everything_before_starttls_then_serves_over_tls() {
    let p = pki();
    let (mut s, server) = start(TlsMode::Require, Some(server_config(&p, false))).await;
    // Plaintext: LIST, STRUCTURED_REPLY and GO are refused with TLS_REQD.
    option(&mut s, OPT_LIST, &[]).await;
    assert_eq!(reply(&mut s).await, REP_ERR_TLS_REQD);
    option(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(reply(&mut s).await, REP_ERR_TLS_REQD);
    assert_eq!(go(&mut s).await, REP_ERR_TLS_REQD);
    option(&mut s, OPT_INFO, &go_payload()).await;
    assert_eq!(reply(&mut s).await, REP_ERR_TLS_REQD);
    // STARTTLS with data is invalid; without, acknowledged.
    option(&mut s, OPT_STARTTLS, b"x").await;
    assert_eq!(reply(&mut s).await, REP_ERR_INVALID);
    option(&mut s, OPT_STARTTLS, &[]).await;
    assert_eq!(reply(&mut s).await, REP_ACK);
    let mut t = upgrade(s, client_config(&p, Some(&p.client)))
        .await
        .unwrap();
    // Over TLS: a second STARTTLS is invalid, then GO and transmission.
    option(&mut t, OPT_STARTTLS, &[]).await;
    assert_eq!(reply(&mut t).await, REP_ERR_INVALID);
    option(&mut t, OPT_LIST, &[]).await;
    assert_eq!(reply(&mut t).await, REP_SERVER);
    assert_eq!(reply(&mut t).await, REP_ACK);
    assert_eq!(go(&mut t).await, REP_ACK);
    write_read(&mut t).await;
    drop(t);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn require_closes_on_export_name_before_tls() {
    let p = pki();
    let (mut s, server) = start(TlsMode::Require, Some(server_config(&p, false))).await;
    option(&mut s, OPT_EXPORT_NAME, b"db").await;
    let err = server.await.unwrap().unwrap_err();
    assert!(err.contains("requires TLS"), "{err}");
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).await.unwrap(), 0, "closed, nothing sent");
}

#[tokio::test]
async fn allow_serves_plaintext_and_off_refuses_starttls() {
    let p = pki();
    let (mut s, server) = start(TlsMode::Allow, Some(server_config(&p, false))).await;
    assert_eq!(go(&mut s).await, REP_ACK);
    write_read(&mut s).await;
    drop(s);
    server.await.unwrap().unwrap();

    for tls in [Some(server_config(&p, false)), None] {
        let (mut s, _server) = start(TlsMode::Off, tls).await;
        option(&mut s, OPT_STARTTLS, &[]).await;
        assert_eq!(reply(&mut s).await, REP_ERR_POLICY);
        assert_eq!(go(&mut s).await, REP_ACK);
    }
}

#[tokio::test]
async fn nothing_negotiated_before_starttls_carries_over() {
    let p = pki();
    let (mut s, server) = start(TlsMode::Allow, Some(server_config(&p, false))).await;
    // Structured replies in plaintext, then the upgrade: the session over
    // TLS has simple replies (write_read expects simple replies).
    option(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(reply(&mut s).await, REP_ACK);
    option(&mut s, OPT_STARTTLS, &[]).await;
    assert_eq!(reply(&mut s).await, REP_ACK);
    let mut t = upgrade(s, client_config(&p, None)).await.unwrap();
    assert_eq!(go(&mut t).await, REP_ACK);
    write_read(&mut t).await;
    drop(t);
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn client_certificates_from_another_ca_or_missing_when_required_are_refused() {
    let p = pki();
    // A stranger's certificate is refused even where certificates are optional.
    let (mut s, server) = start(TlsMode::Require, Some(server_config(&p, false))).await;
    option(&mut s, OPT_STARTTLS, &[]).await;
    assert_eq!(reply(&mut s).await, REP_ACK);
    let r = async {
        let mut t = upgrade(s, client_config(&p, Some(&p.stranger))).await?;
        // TLS 1.3: the client learns of the refusal on its first read.
        t.write_all(&[0; 16]).await?;
        t.read_u8().await
    };
    assert!(r.await.is_err());
    let err = server.await.unwrap().unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");

    // No certificate where one is required.
    let (mut s, server) = start(TlsMode::Require, Some(server_config(&p, true))).await;
    option(&mut s, OPT_STARTTLS, &[]).await;
    assert_eq!(reply(&mut s).await, REP_ACK);
    let r = async {
        let mut t = upgrade(s, client_config(&p, None)).await?;
        t.write_all(&[0; 16]).await?;
        t.read_u8().await
    };
    assert!(r.await.is_err());
    let err = server.await.unwrap().unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");
}
