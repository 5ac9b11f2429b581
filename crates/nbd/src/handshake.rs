//! The fixed-newstyle handshake: option haggling up to the transmission phase.
//!
//! The handshake reads with exact-length reads straight from the socket, so no
//! byte of the transmission phase (or of a TLS handshake after
//! NBD_OPT_STARTTLS) is ever left behind in a buffer.
//!
//! TLS (proto.md "TLS support"): an export's [`TlsMode`] decides. With
//! `Require`, the listener is in FORCEDTLS mode (its one export requires
//! TLS): before STARTTLS every option but STARTTLS and ABORT is answered
//! NBD_REP_ERR_TLS_REQD, and EXPORT_NAME closes the connection. With
//! `Allow`, STARTTLS is accepted and plaintext is served too; with `Off`
//! (or no TLS configured) STARTTLS gets NBD_REP_ERR_POLICY. After
//! STARTTLS the negotiation starts again over TLS with nothing carried
//! over from before; STARTTLS once TLS is up is NBD_REP_ERR_INVALID.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tracing::{debug, warn};

use crate::export::Export;
use crate::proto::*;
use crate::tls::{TlsMode, TlsSource};
use blockmirror_core::geometry::{MAX_PAYLOAD, MIN_BLOCK, PREFERRED_BLOCK};

/// Options with a payload larger than this are not read but end the connection.
const MAX_DISCARDED_OPTION: u32 = 16 * 1024 * 1024;
/// Context id of base:allocation in BLOCK_STATUS replies.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The exports one listener serves, by name.
pub struct Exports<E> {
    by_name: BTreeMap<String, Arc<E>>,
    tls: Option<Arc<dyn TlsSource>>,
}

impl<E: Export> Exports<E> {
    pub fn new(exports: impl IntoIterator<Item = Arc<E>>) -> Self {
        Self {
            by_name: exports
                .into_iter()
                .map(|e| (e.name().to_owned(), e))
                .collect(),
            tls: None,
        }
    }

    /// Where STARTTLS gets its server config (without one, no export is
    /// served over TLS whatever its mode).
    pub fn with_tls(mut self, tls: Arc<dyn TlsSource>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Whether STARTTLS is accepted: TLS configured and some export allows it.
    fn tls_offered(&self) -> bool {
        self.tls.is_some() && self.by_name.values().any(|e| e.tls() != TlsMode::Off)
    }

    /// FORCEDTLS: every export requires TLS.
    fn tls_forced(&self) -> bool {
        !self.by_name.is_empty() && self.by_name.values().all(|e| e.tls() == TlsMode::Require)
    }

    /// Looks an export up; the empty name means the only export, if there is one.
    pub fn get(&self, name: &str) -> Option<&Arc<E>> {
        if name.is_empty() && self.by_name.len() == 1 {
            return self.by_name.values().next();
        }
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<E>> {
        self.by_name.values()
    }
}

/// Transmission flags for an export.
pub fn transmission_flags<E: Export>(e: &E) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF | TF_CAN_MULTI_CONN;
    f |= TF_SEND_CACHE;
    if e.read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        if e.fast_zeroes() {
            f |= TF_SEND_FAST_ZERO;
        }
    }
    f
}

/// Why a handshake ended without reaching transmission.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("i/o during handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("client flags {0:#x} not understood")]
    ClientFlags(u32),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client aborted the handshake")]
    Aborted,
    #[error("client asked for export {0:?} with NBD_OPT_EXPORT_NAME before TLS; the export requires TLS")]
    TlsRequired(String),
    #[error("TLS handshake after NBD_OPT_STARTTLS failed: {0}")]
    Tls(std::io::Error),
}

/// Where the option haggling ended.
pub enum Step<E> {
    /// The transmission phase begins.
    Negotiated(Negotiated<E>),
    /// STARTTLS was acknowledged: run the TLS handshake with this config on
    /// the same socket, then [`options`] again over TLS.
    StartTls(Arc<rustls::ServerConfig>),
}

/// The result of a successful handshake.
pub struct Negotiated<E> {
    pub export: Arc<E>,
    pub session: Session,
}

#[derive(Default)]
struct State {
    structured: bool,
    /// Export name for which base:allocation was selected.
    meta_export: Option<String>,
}

/// Runs the server side of the handshake on `s`, without TLS (STARTTLS is
/// answered NBD_REP_ERR_POLICY whatever the exports' modes). The server
/// uses [`greet`] and [`options`].
pub async fn handshake<E, S>(
    s: &mut S,
    exports: &Exports<E>,
) -> Result<Negotiated<E>, HandshakeError>
where
    E: Export,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greet(s).await?;
    match options(s, exports, no_zeroes, Transport::Plain { tls: false }).await? {
        Step::Negotiated(n) => Ok(n),
        Step::StartTls(_) => unreachable!("STARTTLS is refused without TLS"),
    }
}

/// Sends the greeting and reads the client's flags; returns whether the
/// client asked for NO_ZEROES.
pub async fn greet<S>(s: &mut S) -> Result<bool, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(32);
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&out).await?;

    let client_flags = s.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(client_flags));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// What the option phase runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext; `tls`: STARTTLS may be offered (the server can do the
    /// TLS handshake that follows).
    Plain { tls: bool },
    /// TLS is up.
    Tls,
}

/// The option phase: answers options until the client picks an export
/// (GO or EXPORT_NAME) or STARTTLS is acknowledged.
pub async fn options<E, S>(
    s: &mut S,
    exports: &Exports<E>,
    no_zeroes: bool,
    transport: Transport,
) -> Result<Step<E>, HandshakeError>
where
    E: Export,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(256);
    // Fresh state: nothing negotiated before STARTTLS carries over.
    let mut st = State::default();
    let tls_up = transport == Transport::Tls;
    let tls_offered = transport == (Transport::Plain { tls: true }) && exports.tls_offered();
    // FORCEDTLS before the upgrade (a node whose exports all require TLS).
    let forced = !tls_up && exports.tls_forced();
    // Whether export `e` may be used on this connection now.
    let usable = |e: &E| tls_up || e.tls() != TlsMode::Require;

    loop {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut hb).await?;
        let h = OptionHeader::decode(&hb)?;
        if h.len > MAX_OPTION_LEN {
            if h.len > MAX_DISCARDED_OPTION {
                return Err(ProtoError::OptionTooLong {
                    option: h.option,
                    len: h.len,
                    max: MAX_OPTION_LEN,
                }
                .into());
            }
            discard(s, u64::from(h.len)).await?;
            reply(s, &mut out, h.option, REP_ERR_TOO_BIG, b"option too long").await?;
            continue;
        }
        let mut payload = vec![0u8; h.len as usize];
        s.read_exact(&mut payload).await?;

        if forced && !matches!(h.option, OPT_STARTTLS | OPT_ABORT | OPT_EXPORT_NAME) {
            if matches!(h.option, OPT_INFO | OPT_GO) {
                warn!(
                    option = h.option,
                    "export asked for before STARTTLS: refused, it requires TLS"
                );
            } else {
                debug!(option = h.option, "option before STARTTLS: TLS required");
            }
            reply(s, &mut out, h.option, REP_ERR_TLS_REQD, b"TLS required").await?;
            continue;
        }

        match h.option {
            OPT_STARTTLS => {
                if tls_up {
                    let msg = b"TLS is already up";
                    reply(s, &mut out, h.option, REP_ERR_INVALID, msg).await?;
                    continue;
                }
                if !payload.is_empty() {
                    let msg = b"STARTTLS takes no data";
                    reply(s, &mut out, h.option, REP_ERR_INVALID, msg).await?;
                    continue;
                }
                let config = match &exports.tls {
                    Some(src) if tls_offered => src.server_config(),
                    _ => None,
                };
                let Some(config) = config else {
                    let msg = b"TLS is not offered here";
                    reply(s, &mut out, h.option, REP_ERR_POLICY, msg).await?;
                    continue;
                };
                reply(s, &mut out, h.option, REP_ACK, &[]).await?;
                return Ok(Step::StartTls(config));
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&payload).into_owned();
                let Some(e) = exports.get(&name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                if !usable(e) {
                    // EXPORT_NAME cannot be answered with an error.
                    warn!(export = %name, "EXPORT_NAME before STARTTLS: the export requires TLS; closing");
                    return Err(HandshakeError::TlsRequired(name));
                }
                out.put_u64(e.size());
                out.put_u16(transmission_flags(e.as_ref()));
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                s.write_all(&out).await?;
                return Ok(Step::Negotiated(negotiated(e.clone(), &st)));
            }
            OPT_ABORT => {
                // Best effort: the client may already be gone.
                let _ = reply(s, &mut out, h.option, REP_ACK, &[]).await;
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => {
                if !payload.is_empty() {
                    reply(
                        s,
                        &mut out,
                        h.option,
                        REP_ERR_INVALID,
                        b"LIST takes no data",
                    )
                    .await?;
                    continue;
                }
                for e in exports.iter() {
                    let mut d = BytesMut::new();
                    d.put_u32(e.name().len() as u32);
                    d.put_slice(e.name().as_bytes());
                    encode_option_reply(&mut out, h.option, REP_SERVER, &d);
                }
                reply(s, &mut out, h.option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match InfoRequest::decode(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(
                            s,
                            &mut out,
                            h.option,
                            REP_ERR_INVALID,
                            e.to_string().as_bytes(),
                        )
                        .await?;
                        continue;
                    }
                };
                let Some(e) = exports.get(&req.export) else {
                    let msg = format!("no export named {:?}", req.export);
                    reply(s, &mut out, h.option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                if !usable(e) {
                    warn!(export = %req.export, "export asked for before STARTTLS: refused, it requires TLS");
                    let msg = b"this export requires TLS (NBD_OPT_STARTTLS first)";
                    reply(s, &mut out, h.option, REP_ERR_TLS_REQD, msg).await?;
                    continue;
                }
                let e = e.clone();
                let info = info_export(e.size(), transmission_flags(e.as_ref()));
                encode_option_reply(&mut out, h.option, REP_INFO, &info);
                for &i in &req.infos {
                    match i {
                        INFO_BLOCK_SIZE => {
                            let b = info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD);
                            encode_option_reply(&mut out, h.option, REP_INFO, &b);
                        }
                        INFO_NAME => {
                            let mut d = BytesMut::new();
                            d.put_u16(INFO_NAME);
                            d.put_slice(e.name().as_bytes());
                            encode_option_reply(&mut out, h.option, REP_INFO, &d);
                        }
                        INFO_DESCRIPTION => {
                            let mut d = BytesMut::new();
                            d.put_u16(INFO_DESCRIPTION);
                            let role = if e.read_only() {
                                "read-only"
                            } else {
                                "read-write"
                            };
                            d.put_slice(
                                format!("blockmirror volume {} ({role})", e.name()).as_bytes(),
                            );
                            encode_option_reply(&mut out, h.option, REP_INFO, &d);
                        }
                        _ => {} // Unknown info requests are ignored, as the spec allows.
                    }
                }
                reply(s, &mut out, h.option, REP_ACK, &[]).await?;
                if h.option == OPT_GO {
                    return Ok(Step::Negotiated(negotiated(e, &st)));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    reply(s, &mut out, h.option, REP_ERR_INVALID, b"takes no data").await?;
                } else {
                    st.structured = true;
                    reply(s, &mut out, h.option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = h.option == OPT_SET_META_CONTEXT;
                if !st.structured {
                    let msg = b"structured replies must be negotiated first";
                    reply(s, &mut out, h.option, REP_ERR_INVALID, msg).await?;
                    continue;
                }
                let req = match MetaContextRequest::decode(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(
                            s,
                            &mut out,
                            h.option,
                            REP_ERR_INVALID,
                            e.to_string().as_bytes(),
                        )
                        .await?;
                        continue;
                    }
                };
                let Some(target) = exports.get(&req.export).map(|e| e.name().to_owned()) else {
                    let msg = format!("no export named {:?}", req.export);
                    reply(s, &mut out, h.option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                if set {
                    st.meta_export = None;
                }
                let wants_base =
                    |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q == "base"));
                let selected = if !set && req.queries.is_empty() {
                    true
                } else {
                    req.queries.iter().any(|q| wants_base(q))
                };
                if selected {
                    let mut d = BytesMut::new();
                    d.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
                    d.put_slice(BASE_ALLOCATION.as_bytes());
                    encode_option_reply(&mut out, h.option, REP_META_CONTEXT, &d);
                    if set {
                        st.meta_export = Some(target);
                    }
                }
                reply(s, &mut out, h.option, REP_ACK, &[]).await?;
            }
            _ => {
                // EXTENDED_HEADERS and anything unknown.
                reply(s, &mut out, h.option, REP_ERR_UNSUP, b"not supported").await?;
            }
        }
    }
}

fn negotiated<E: Export>(export: Arc<E>, st: &State) -> Negotiated<E> {
    // A context selected for a different export does not carry over.
    let meta_context = st.structured && st.meta_export.as_deref() == Some(export.name());
    let session = Session {
        structured: st.structured,
        meta_context,
        read_only: export.read_only(),
        fast_zero: export.fast_zeroes(),
    };
    Negotiated { export, session }
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    out: &mut BytesMut,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    encode_option_reply(out, option, kind, data);
    s.write_all(out).await?;
    out.clear();
    Ok(())
}

async fn discard<S: AsyncRead + Unpin>(s: &mut S, mut n: u64) -> std::io::Result<()> {
    let mut sink = [0u8; 8192];
    while n > 0 {
        let want = n.min(sink.len() as u64) as usize;
        s.read_exact(&mut sink[..want]).await?;
        n -= want as u64;
    }
    Ok(())
}
