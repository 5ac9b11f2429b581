//! The start of a replication link: volume matching and mutual
//! authentication with a key: a shared secret, a TLS session's exporter,
//! or both ([`LinkKey`]).
//!
//! ```text
//! primary                                              mirror
//!   Hello(node_p, volume_p, Np)           ------->
//!                                                      look up volume_p.name:
//!                                                        none       -> Error(UnknownVolume)
//!                                                        too small  -> Error(MirrorTooSmall)
//!                                         <-------     Challenge(node_m, volume_m, Nm, proof_m)
//!   verify proof_m (else Error(AuthFailed))
//!   Auth(proof_p)                         ------->
//!                                                      verify proof_p (else Error(AuthFailed))
//!                                         <-------     Welcome
//! ```
//!
//! With `T = SHA-256("blockmirror-v1 transcript" || u32 len || Hello payload
//! || u32 len || Challenge payload without its proof)`:
//!
//! - `proof_m = HMAC-SHA256(K, "blockmirror-v1 mirror" || Np || Nm || T)`
//! - `proof_p = HMAC-SHA256(K, "blockmirror-v1 primary" || Nm || Np || T)`
//!
//! The key `K` ([`LinkKey`], its [`KeyMode`] said in both Hello and
//! Challenge, so inside `T`):
//!
//! - [`KeyMode::Secret`] (no TLS): `K = secret`, the bytes of `secret_file`.
//! - [`KeyMode::Tls`] (TLS, no secret): `K = E`, where `E` is 32 bytes of
//!   the TLS session's keying material exporter (RFC 5705/8446,
//!   label [`EXPORTER_LABEL`], no context). Both ends of one session, and
//!   only they, compute the same `E`, so the proofs bind the handshake to
//!   that session: a relay that terminates TLS on each side (even with a
//!   certificate from the CA) holds two sessions with different exporters,
//!   and its proofs fail.
//! - [`KeyMode::TlsAndSecret`]: `K = HMAC-SHA256(secret, "blockmirror-v1
//!   link key" || E)`: a peer needs both the session and the secret.
//!
//! Both sides must use the same mode (`secret_file` on both or on neither):
//! the mirror compares the primary's mode with its own before anything
//! else and refuses a mismatch with a message naming both nodes and modes
//! ([`HandshakeError::KeyModeMismatch`] on the mirror,
//! [`HandshakeError::Refused`] carrying that message on the primary).
//!
//! Each side proves it holds the secret over a fresh nonce of the other
//! side, so a recorded proof is useless later, and the distinct labels stop a
//! proof from being reflected back as the other role's. `T` binds both
//! hellos, so the identities each side reports cannot be altered in flight.
//! Neither the secret nor `E` ever crosses the wire. Proofs are compared in constant
//! time.
//!
//! Limits, stated plainly:
//! - The handshake authenticates the two ends; it does not protect the frames
//!   that follow. Run the link over TLS (both functions are generic over the
//!   stream so it can be wrapped) where the network is not trusted.
//! - With [`KeyMode::Tls`] the handshake proves possession of the TLS
//!   session, nothing more: who may connect is decided by the certificates
//!   (the CA, and the name the primary checks in the mirror's).
//! - Anyone who can connect sees a proof made with the secret, so a guessable
//!   secret can be attacked offline: use at least 32 random bytes.
//! - Before authentication the mirror tells a caller whether a volume of a
//!   name exists and its identity; the data stays protected.
//!
//! Payload layouts (big-endian; a string is a u16 byte length then UTF-8, at
//! most [`MAX_NAME_LEN`] bytes; a volume identity is name string, 16-byte
//! volume id, u64 size, u64 current generation, then [`HISTORY_LEN`] u64
//! earlier generations, most recent first). Both identities are inside the
//! transcript `T`, so the generation ids each side reports are authenticated
//! with the rest; they decide the resync direction and detect a split brain
//! (`blockmirror_core::generation`). A build from before the history was added
//! is refused with a malformed-payload error (the identity is 32 bytes longer).
//!
//! | frame | payload |
//! |---|---|
//! | Hello | node string, volume identity, 32-byte nonce Np, u8 handshake version ([`HANDSHAKE_VERSION`]), u8 purpose (0 replication, 1 jobs), u8 compression the primary wants ([`Codec::code`]), u64 fencing epoch (0: no cluster), u8 key mode ([`KeyMode::code`]) |
//! | Challenge | node string, volume identity, 32-byte nonce Nm, u8 handshake version, u8 codecs the mirror supports (bit `1 << code` per codec; bit 0, none, always set), u8 key mode, 32-byte proof_m |
//! | Auth | 32-byte proof_p |
//! | Welcome | empty |
//!
//! Compression is negotiated, not configured on both sides: the primary says
//! which codec its link is configured with, the mirror which codecs it can
//! decode, and both take the primary's codec if the mirror supports it, else
//! none (and log it). The result is [`PeerInfo::compression`] on both sides.
//! A codec code or supported bit this build does not know counts as
//! unsupported, so a newer peer's codecs fall back to none instead of
//! failing the handshake. Both fields are inside `T`, so a man in the middle
//! cannot downgrade (or upgrade) the link's compression unnoticed.
//!
//! Version 1 (before compression was negotiated) had no version, purpose or
//! codec bytes in the Hello, except a purpose byte 1 for a job connection,
//! and none in the Challenge. A version 1 Hello is refused with a
//! malformed-payload error that names both versions; a version 1 mirror
//! refuses a version 2 Hello as an unknown connection purpose.
//!
//! Timeouts are the caller's: wrap [`connect`] or [`accept`] in
//! `tokio::time::timeout`, so a peer that stops answering mid-handshake does
//! not hold a task forever. Both read exactly the handshake's frames and no
//! byte beyond, so the stream can be handed to a [`crate::FrameReader`]
//! afterwards.

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{ErrorCode, Frame};
use crate::wire::{Codec, Kind, RawHeader, WireError, HEADER_LEN};

/// Length of each side's random nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 proof.
pub const PROOF_LEN: usize = 32;
/// Longest node or volume name accepted.
pub const MAX_NAME_LEN: usize = 4096;
/// The handshake payload version this build speaks (1: before compression
/// was negotiated; 2: before the Hello carried the fencing epoch; 3: before
/// both carried the key mode).
pub const HANDSHAKE_VERSION: u8 = 4;
/// The label of the TLS exporter a link's key is drawn from (RFC 5705
/// wants exporter labels to begin with "EXPORTER").
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-blockmirror-link-v1";
/// Bytes drawn from the TLS exporter.
pub const EXPORTER_LEN: usize = 32;

const MIRROR_LABEL: &[u8] = b"blockmirror-v1 mirror";
const PRIMARY_LABEL: &[u8] = b"blockmirror-v1 primary";
const TRANSCRIPT_LABEL: &[u8] = b"blockmirror-v1 transcript";
const LINK_KEY_LABEL: &[u8] = b"blockmirror-v1 link key";

type HmacSha256 = Hmac<Sha256>;

/// What a connection is for, said in the Hello (so it is covered by both
/// proofs). A replication link's Hello has no purpose byte, exactly as
/// before job connections existed; a job connection's Hello ends with one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Purpose {
    /// The replication link: writes, in order, acknowledged.
    #[default]
    Replication,
    /// Jobs (seed 002): verify and remote reads, beside the replication
    /// link so they never hold its stream up.
    Jobs,
}

impl Purpose {
    fn code(self) -> u8 {
        match self {
            Purpose::Replication => 0,
            Purpose::Jobs => 1,
        }
    }

    fn from_code(code: u8) -> Option<Purpose> {
        match code {
            0 => Some(Purpose::Replication),
            1 => Some(Purpose::Jobs),
            _ => None,
        }
    }
}

/// What a link's handshake key is made of (see the module doc): the node
/// config decides it, `secret_file` and `[tls]`, and both ends of a link
/// must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyMode {
    /// The shared secret alone (no TLS).
    Secret,
    /// The TLS session alone (its exporter).
    Tls,
    /// Both: the secret and the TLS session.
    TlsAndSecret,
}

impl KeyMode {
    /// The byte Hello and Challenge carry.
    pub fn code(self) -> u8 {
        match self {
            KeyMode::Secret => 0,
            KeyMode::Tls => 1,
            KeyMode::TlsAndSecret => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<KeyMode> {
        match code {
            0 => Some(KeyMode::Secret),
            1 => Some(KeyMode::Tls),
            2 => Some(KeyMode::TlsAndSecret),
            _ => None,
        }
    }

    /// Short name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::Secret => "secret",
            KeyMode::Tls => "tls",
            KeyMode::TlsAndSecret => "tls+secret",
        }
    }
}

impl std::fmt::Display for KeyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyMode::Secret => "the shared secret alone (no TLS)",
            KeyMode::Tls => "TLS alone (no secret_file)",
            KeyMode::TlsAndSecret => "TLS and the shared secret",
        })
    }
}

/// The HMAC key of a link's handshake and how it was made. Made by
/// [`LinkKey::derive`] from what the node has (`secret_file`, the TLS
/// session's exporter); a bare secret converts into a [`KeyMode::Secret`]
/// key (`From<&[u8]>`), which is what a plaintext link uses.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkKey {
    mode: KeyMode,
    key: Vec<u8>,
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("LinkKey")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl LinkKey {
    /// The key for a link with `secret` (the node's `secret_file`, if any)
    /// over a stream whose TLS exporter is `exporter` (`None`: not TLS).
    /// Neither: [`HandshakeError::NoKey`]; an empty secret:
    /// [`HandshakeError::EmptySecret`].
    pub fn derive(
        secret: Option<&[u8]>,
        exporter: Option<&[u8; EXPORTER_LEN]>,
    ) -> Result<LinkKey, HandshakeError> {
        if secret.is_some_and(<[u8]>::is_empty) {
            return Err(HandshakeError::EmptySecret);
        }
        match (secret, exporter) {
            (None, None) => Err(HandshakeError::NoKey),
            (Some(s), None) => Ok(LinkKey {
                mode: KeyMode::Secret,
                key: s.to_vec(),
            }),
            (None, Some(e)) => Ok(LinkKey {
                mode: KeyMode::Tls,
                key: e.to_vec(),
            }),
            (Some(s), Some(e)) => {
                let mut m = HmacSha256::new_from_slice(s).expect("HMAC takes a key of any length");
                m.update(LINK_KEY_LABEL);
                m.update(e);
                Ok(LinkKey {
                    mode: KeyMode::TlsAndSecret,
                    key: m.finalize().into_bytes().to_vec(),
                })
            }
        }
    }

    pub fn mode(&self) -> KeyMode {
        self.mode
    }

    fn bytes(&self) -> &[u8] {
        &self.key
    }
}

impl From<&[u8]> for LinkKey {
    fn from(secret: &[u8]) -> Self {
        LinkKey {
            mode: KeyMode::Secret,
            key: secret.to_vec(),
        }
    }
}

impl<const N: usize> From<&[u8; N]> for LinkKey {
    fn from(secret: &[u8; N]) -> Self {
        LinkKey::from(&secret[..])
    }
}

impl From<&LinkKey> for LinkKey {
    fn from(k: &LinkKey) -> Self {
        k.clone()
    }
}

/// What the primary asks for in its Hello, besides its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ConnectOptions {
    pub purpose: Purpose,
    /// The codec the primary's link is configured with (`compression` in
    /// `[[volume.mirror]]`); what it gets is [`PeerInfo::compression`].
    pub compression: Codec,
    /// The fencing epoch under which the primary holds its volume (cluster
    /// mode: the epoch it took in etcd; 0 without a cluster). Inside the
    /// transcript, so it cannot be altered in flight; a mirror refuses a
    /// primary whose epoch is older than one it has seen.
    pub epoch: u64,
}

/// A set of codecs, as the Challenge carries it: bit `1 << code` per codec.
fn codec_mask(codecs: &[Codec]) -> u8 {
    codecs
        .iter()
        .fold(1 << Codec::None.code(), |m, c| m | 1 << c.code())
}

/// The codec both sides use: the primary's `wanted` code if the mirror's
/// `supported` mask has it, else none.
fn negotiate(wanted: u8, supported: u8) -> Codec {
    match Codec::from_code(wanted) {
        Some(c) if supported & (1 << c.code()) != 0 => c,
        _ => Codec::None,
    }
}

/// What identifies a volume across nodes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeIdentity {
    pub name: String,
    /// Random, fixed when the volume was created.
    pub volume_id: [u8; 16],
    /// Size in bytes.
    pub size: u64,
    /// The current generation id (0: a blank volume).
    pub generation: u64,
    /// Earlier generation ids, most recent first (0: unused).
    pub history: [u64; HISTORY_LEN],
}

/// Earlier generation ids a volume identity carries.
pub const HISTORY_LEN: usize = 4;

/// What the primary announces about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHello {
    pub node: String,
    pub volume: VolumeIdentity,
}

/// The authenticated peer: its node name and its volume's identity, and what
/// the handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub node: String,
    pub volume: VolumeIdentity,
    /// How Write data is compressed on this link, the same on both sides:
    /// the primary's [`ConnectOptions::compression`] if the mirror supports
    /// it, else [`Codec::None`].
    pub compression: Codec,
    /// The primary's fencing epoch ([`ConnectOptions::epoch`]): on the
    /// mirror side what the Hello said; on the primary side its own.
    pub epoch: u64,
}

/// Which way an authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// The peer's proof did not verify: a different secret, or an impostor.
    BadProof,
    /// The peer refused our proof: it holds a different secret.
    RejectedByPeer,
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthFailure::BadProof => "its proof did not verify (different secret, or an impostor)",
            AuthFailure::RejectedByPeer => "it refused our proof (different secret)",
        })
    }
}

/// What is wrong with a handshake payload: the reason of
/// [`HandshakeError::Malformed`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformation {
    #[error("truncated: needed {needed} more bytes, {left} left")]
    Truncated { needed: usize, left: usize },
    #[error("name of {0} bytes exceeds {MAX_NAME_LEN}")]
    NameTooLong(usize),
    #[error("name is not UTF-8")]
    NameNotUtf8,
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A Hello from a build before compression was negotiated.
    #[error(
        "handshake version 1 (no compression negotiation); this build speaks \
         {HANDSHAKE_VERSION}: upgrade the primary"
    )]
    Version1,
    #[error("handshake version {0} (this build speaks {HANDSHAKE_VERSION})")]
    Version(u8),
    #[error("unknown connection purpose {0}")]
    UnknownPurpose(u8),
    #[error("supported codecs {0:#04x} lack uncompressed data (bit 0)")]
    NoPlainCodec(u8),
    #[error("unknown key mode {0}")]
    UnknownKeyMode(u8),
}

fn from_peer(peer: &Option<String>) -> String {
    peer.as_ref()
        .map_or(String::new(), |p| format!(" from {p:?}"))
}

/// Why a handshake did not complete. The link must be closed.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("handshake I/O error while {stage}: {source}")]
    Io {
        stage: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("peer closed the connection while {stage}")]
    PeerClosed { stage: &'static str },
    #[error("bad handshake frame: {0}")]
    Wire(#[from] WireError),
    #[error("expected a {expected} frame, got {got}")]
    Unexpected { expected: Kind, got: Kind },
    #[error("malformed {kind} payload{}: {reason}", from_peer(.peer))]
    Malformed {
        kind: Kind,
        /// The peer's node name, when the handshake got far enough to know
        /// it (a malformed Auth or Welcome).
        peer: Option<String>,
        reason: Malformation,
    },
    #[error("no replication secret configured")]
    EmptySecret,
    #[error(
        "no replication secret configured and the link is not TLS: nothing to \
         authenticate it with (set secret_file, or [tls] on both nodes)"
    )]
    NoKey,
    #[error("cannot draw the link key from the TLS session: {0}")]
    Exporter(String),
    #[error(
        "{peer:?} authenticates links with {theirs}, this node with {ours}: \
         give both nodes the same secret_file, or neither (TLS alone)"
    )]
    KeyModeMismatch {
        peer: String,
        ours: KeyMode,
        theirs: KeyMode,
    },
    #[error("{what} name of {len} bytes exceeds {MAX_NAME_LEN}")]
    NameTooLong { what: &'static str, len: usize },
    #[error("cannot draw a random nonce: {0}")]
    Nonce(getrandom::Error),
    #[error("no volume named {volume:?}")]
    UnknownVolume { volume: String },
    #[error(
        "mirror volume {volume:?} is too small: {mirror_size} bytes, \
         the primary's is {primary_size} bytes"
    )]
    MirrorTooSmall {
        volume: String,
        mirror_size: u64,
        primary_size: u64,
    },
    #[error("mirror {peer:?} answered for volume {got:?}, not {expected:?}")]
    VolumeMismatch {
        peer: String,
        expected: String,
        got: String,
    },
    #[error("authentication failed with {peer:?}: {reason}")]
    AuthFailed { peer: String, reason: AuthFailure },
    #[error("peer refused the handshake ({code}): {message}")]
    Refused { code: ErrorCode, message: String },
}

/// Primary side of a replication link that asks for no compression:
/// [`connect_with`] with the default [`ConnectOptions`].
pub async fn connect<S>(
    s: &mut S,
    key: impl Into<LinkKey>,
    local: &NodeHello,
) -> Result<PeerInfo, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    connect_with(s, key, local, ConnectOptions::default()).await
}

/// [`connect_with`] for a connection of the given purpose, asking for no
/// compression.
pub async fn connect_for<S>(
    s: &mut S,
    key: impl Into<LinkKey>,
    local: &NodeHello,
    purpose: Purpose,
) -> Result<PeerInfo, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let opts = ConnectOptions {
        purpose,
        compression: Codec::None,
        epoch: 0,
    };
    connect_with(s, key, local, opts).await
}

/// Primary side: announces `local` and what it asks for (`opts`), checks
/// the mirror's proof, proves itself, and returns the mirror's identity and
/// the negotiated compression ([`PeerInfo::compression`]) once it says
/// Welcome.
///
/// On a refusal it can explain (bad proof, wrong volume, mirror too small)
/// it sends an Error frame before returning, so the mirror logs the same
/// reason. Wrap the call in a timeout (see the module doc).
pub async fn connect_with<S>(
    s: &mut S,
    key: impl Into<LinkKey>,
    local: &NodeHello,
    opts: ConnectOptions,
) -> Result<PeerInfo, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let key: LinkKey = key.into();
    check_key(&key)?;
    let secret = key.bytes();
    check_name("node", &local.node)?;
    check_name("volume", &local.volume.name)?;
    let np = nonce()?;

    let mut hello = BytesMut::new();
    put_string(&mut hello, &local.node);
    put_volume(&mut hello, &local.volume);
    hello.put_slice(&np);
    hello.put_u8(HANDSHAKE_VERSION);
    hello.put_u8(opts.purpose.code());
    hello.put_u8(opts.compression.code());
    hello.put_u64(opts.epoch);
    hello.put_u8(key.mode().code());
    let hello = hello.freeze();
    send(
        s,
        &Frame::Hello {
            payload: hello.clone(),
        },
        "sending Hello",
    )
    .await?;

    let challenge = match read_frame(s, Kind::Challenge, "waiting for Challenge").await? {
        Frame::Challenge { payload } => payload,
        Frame::Error { code, message, .. } => return Err(refused(code, message, None)),
        f => unreachable!("read_frame returned {:?}", f.kind()),
    };
    let body_len = challenge.len().saturating_sub(PROOF_LEN);
    let decoded = (|| {
        let mut c = Cursor::new(&challenge);
        let node = c.string()?;
        let volume = c.volume()?;
        let nm: [u8; NONCE_LEN] = c.array()?;
        let [version, supported] = c.array()?;
        if version != HANDSHAKE_VERSION {
            return Err(Malformation::Version(version));
        }
        if supported & (1 << Codec::None.code()) == 0 {
            return Err(Malformation::NoPlainCodec(supported));
        }
        let [mode] = c.array()?;
        let mode = KeyMode::from_code(mode).ok_or(Malformation::UnknownKeyMode(mode))?;
        let proof: [u8; PROOF_LEN] = c.array()?;
        c.finish()?;
        Ok((node, volume, nm, supported, mode, proof))
    })();
    let (node_m, volume_m, nm, supported_m, mode_m, proof_m) = match decoded {
        Ok(d) => d,
        Err(reason) => {
            return Err(protocol_error(s, Kind::Challenge, None, reason).await);
        }
    };

    // The mirror refuses a mismatch itself; one that does not is refused here.
    if mode_m != key.mode() {
        let e = HandshakeError::KeyModeMismatch {
            peer: node_m,
            ours: key.mode(),
            theirs: mode_m,
        };
        send_error(s, ErrorCode::AuthFailed, &e.to_string()).await;
        return Err(e);
    }
    let t = transcript(&hello, &challenge[..body_len]);
    if verify(secret, MIRROR_LABEL, &np, &nm, &t, &proof_m).is_err() {
        let e = HandshakeError::AuthFailed {
            peer: node_m,
            reason: AuthFailure::BadProof,
        };
        send_error(s, ErrorCode::AuthFailed, "authentication failed").await;
        return Err(e);
    }
    // The mirror already checks these; checking again keeps a confused
    // mirror from being written past its end.
    if volume_m.name != local.volume.name {
        let e = HandshakeError::VolumeMismatch {
            peer: node_m,
            expected: local.volume.name.clone(),
            got: volume_m.name,
        };
        send_error(s, ErrorCode::Protocol, &e.to_string()).await;
        return Err(e);
    }
    if volume_m.size < local.volume.size {
        let e = HandshakeError::MirrorTooSmall {
            volume: volume_m.name,
            mirror_size: volume_m.size,
            primary_size: local.volume.size,
        };
        send_error(s, ErrorCode::MirrorTooSmall, &e.to_string()).await;
        return Err(e);
    }

    let proof_p = prove(secret, PRIMARY_LABEL, &nm, &np, &t);
    send(
        s,
        &Frame::Auth {
            payload: Bytes::copy_from_slice(&proof_p),
        },
        "sending Auth",
    )
    .await?;

    match read_frame(s, Kind::Welcome, "waiting for Welcome").await? {
        Frame::Welcome { payload } if payload.is_empty() => {}
        Frame::Welcome { payload } => {
            let reason = Malformation::Trailing(payload.len());
            return Err(protocol_error(s, Kind::Welcome, Some(node_m), reason).await);
        }
        Frame::Error { code, message, .. } => {
            return Err(refused(code, message, Some(node_m)));
        }
        f => unreachable!("read_frame returned {:?}", f.kind()),
    }
    let compression = negotiate(opts.compression.code(), supported_m);
    if compression != opts.compression {
        tracing::warn!(peer = %node_m, volume = %volume_m.name, wanted = %opts.compression,
            "the mirror does not support the configured compression: Write data goes uncompressed");
    }
    tracing::debug!(peer = %node_m, volume = %volume_m.name, %compression,
        "replication handshake complete (primary)");
    Ok(PeerInfo {
        node: node_m,
        volume: volume_m,
        compression,
        epoch: opts.epoch,
    })
}

/// Mirror side: reads the primary's Hello, looks its volume up with
/// `lookup`, proves itself, checks the primary's proof, and says Welcome.
/// Returns the primary's identity and the mirror's own volume.
///
/// Refusals (unknown volume, volume too small, bad proof, malformed Hello)
/// are sent to the primary as an Error frame before returning. Wrap the call
/// in a timeout (see the module doc).
pub async fn accept<S, F>(
    s: &mut S,
    key: impl Into<LinkKey>,
    node: &str,
    lookup: F,
) -> Result<(PeerInfo, VolumeIdentity), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&str) -> Option<VolumeIdentity>,
{
    accept_any(s, key, node, lookup)
        .await
        .map(|(p, v, _)| (p, v))
}

/// [`accept`] that also says what the connection is for.
pub async fn accept_any<S, F>(
    s: &mut S,
    key: impl Into<LinkKey>,
    node: &str,
    lookup: F,
) -> Result<(PeerInfo, VolumeIdentity, Purpose), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&str) -> Option<VolumeIdentity>,
{
    accept_with(s, key, node, &Codec::ALL, lookup).await
}

/// [`accept_any`] for a mirror that decodes only the codecs in `supported`
/// (uncompressed data always). The primary's codec is taken if it is among
/// them, else none ([`PeerInfo::compression`]).
pub async fn accept_with<S, F>(
    s: &mut S,
    key: impl Into<LinkKey>,
    node: &str,
    supported: &[Codec],
    lookup: F,
) -> Result<(PeerInfo, VolumeIdentity, Purpose), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&str) -> Option<VolumeIdentity>,
{
    let key: LinkKey = key.into();
    check_key(&key)?;
    let secret = key.bytes();
    check_name("node", node)?;

    let hello = match read_frame(s, Kind::Hello, "waiting for Hello").await? {
        Frame::Hello { payload } => payload,
        Frame::Error { code, message, .. } => return Err(refused(code, message, None)),
        f => unreachable!("read_frame returned {:?}", f.kind()),
    };
    let decoded = (|| {
        let mut c = Cursor::new(&hello);
        let node = c.string()?;
        let volume = c.volume()?;
        let np: [u8; NONCE_LEN] = c.array()?;
        // A version 1 Hello ends here, or after a purpose byte 1 (jobs).
        if c.b.len() <= 1 {
            return Err(Malformation::Version1);
        }
        let [version] = c.array()?;
        if version != HANDSHAKE_VERSION {
            return Err(Malformation::Version(version));
        }
        let [purpose, wanted] = c.array()?;
        let purpose = Purpose::from_code(purpose).ok_or(Malformation::UnknownPurpose(purpose))?;
        let epoch = c.u64()?;
        let [mode] = c.array()?;
        let mode = KeyMode::from_code(mode).ok_or(Malformation::UnknownKeyMode(mode))?;
        c.finish()?;
        Ok((node, volume, np, purpose, wanted, epoch, mode))
    })();
    let (node_p, volume_p, np, purpose, wanted, epoch, mode_p) = match decoded {
        Ok(d) => d,
        Err(reason) => return Err(protocol_error(s, Kind::Hello, None, reason).await),
    };
    // Before anything else: with different keys the proofs could only
    // fail, and say less.
    if mode_p != key.mode() {
        let message = format!(
            "mirror {node:?} authenticates links with {}, primary {node_p:?} with {}: \
             give both nodes the same secret_file, or neither (TLS alone)",
            key.mode(),
            mode_p
        );
        send_error(s, ErrorCode::AuthFailed, &message).await;
        return Err(HandshakeError::KeyModeMismatch {
            peer: node_p,
            ours: key.mode(),
            theirs: mode_p,
        });
    }

    let Some(volume_m) = lookup(&volume_p.name) else {
        let e = HandshakeError::UnknownVolume {
            volume: volume_p.name,
        };
        send_error(s, ErrorCode::UnknownVolume, &e.to_string()).await;
        return Err(e);
    };
    if volume_m.size < volume_p.size {
        let e = HandshakeError::MirrorTooSmall {
            volume: volume_p.name,
            mirror_size: volume_m.size,
            primary_size: volume_p.size,
        };
        send_error(s, ErrorCode::MirrorTooSmall, &e.to_string()).await;
        return Err(e);
    }
    if let Err(e) = check_name("volume", &volume_m.name) {
        send_error(s, ErrorCode::Internal, &e.to_string()).await;
        return Err(e);
    }

    let supported = codec_mask(supported);
    let compression = negotiate(wanted, supported);
    if compression.code() != wanted {
        let wanted = Codec::from_code(wanted).map_or(format!("codec {wanted}"), |c| c.to_string());
        tracing::warn!(peer = %node_p, volume = %volume_m.name, %wanted,
            "the primary asked for a compression this mirror does not support: Write data comes uncompressed");
    }

    let nm = nonce()?;
    let mut challenge = BytesMut::new();
    put_string(&mut challenge, node);
    put_volume(&mut challenge, &volume_m);
    challenge.put_slice(&nm);
    challenge.put_u8(HANDSHAKE_VERSION);
    challenge.put_u8(supported);
    challenge.put_u8(key.mode().code());
    let t = transcript(&hello, &challenge);
    challenge.put_slice(&prove(secret, MIRROR_LABEL, &np, &nm, &t));
    send(
        s,
        &Frame::Challenge {
            payload: challenge.freeze(),
        },
        "sending Challenge",
    )
    .await?;

    let auth = match read_frame(s, Kind::Auth, "waiting for Auth").await? {
        Frame::Auth { payload } => payload,
        Frame::Error { code, message, .. } => {
            return Err(refused(code, message, Some(node_p)));
        }
        f => unreachable!("read_frame returned {:?}", f.kind()),
    };
    let proof_p: [u8; PROOF_LEN] = match (|| {
        let mut c = Cursor::new(&auth);
        let p = c.array()?;
        c.finish()?;
        Ok(p)
    })() {
        Ok(p) => p,
        Err(reason) => return Err(protocol_error(s, Kind::Auth, Some(node_p), reason).await),
    };
    if verify(secret, PRIMARY_LABEL, &nm, &np, &t, &proof_p).is_err() {
        send_error(s, ErrorCode::AuthFailed, "authentication failed").await;
        return Err(HandshakeError::AuthFailed {
            peer: node_p,
            reason: AuthFailure::BadProof,
        });
    }

    send(
        s,
        &Frame::Welcome {
            payload: Bytes::new(),
        },
        "sending Welcome",
    )
    .await?;
    tracing::debug!(peer = %node_p, volume = %volume_m.name, %compression,
        "replication handshake complete (mirror)");
    Ok((
        PeerInfo {
            node: node_p,
            volume: volume_p,
            compression,
            epoch,
        },
        volume_m,
        purpose,
    ))
}

fn check_key(key: &LinkKey) -> Result<(), HandshakeError> {
    if key.bytes().is_empty() {
        Err(HandshakeError::EmptySecret)
    } else {
        Ok(())
    }
}

fn check_name(what: &'static str, name: &str) -> Result<(), HandshakeError> {
    if name.len() > MAX_NAME_LEN {
        Err(HandshakeError::NameTooLong {
            what,
            len: name.len(),
        })
    } else {
        Ok(())
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(HandshakeError::Nonce)?;
    Ok(n)
}

fn transcript(hello: &[u8], challenge_body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TRANSCRIPT_LABEL);
    h.update((hello.len() as u32).to_be_bytes());
    h.update(hello);
    h.update((challenge_body.len() as u32).to_be_bytes());
    h.update(challenge_body);
    h.finalize().into()
}

fn mac(secret: &[u8], label: &[u8], first: &[u8], second: &[u8], t: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    m.update(label);
    m.update(first);
    m.update(second);
    m.update(t);
    m
}

fn prove(secret: &[u8], label: &[u8], first: &[u8], second: &[u8], t: &[u8]) -> [u8; PROOF_LEN] {
    mac(secret, label, first, second, t)
        .finalize()
        .into_bytes()
        .into()
}

/// Constant-time check of a peer's proof.
fn verify(
    secret: &[u8],
    label: &[u8],
    first: &[u8],
    second: &[u8],
    t: &[u8],
    proof: &[u8],
) -> Result<(), hmac::digest::MacError> {
    mac(secret, label, first, second, t).verify_slice(proof)
}

/// Turns a peer's Error frame into our error. `peer` is the peer's node
/// name once known (an auth refusal names it).
fn refused(code: ErrorCode, message: String, peer: Option<String>) -> HandshakeError {
    match (code, peer) {
        (ErrorCode::AuthFailed, Some(peer)) => HandshakeError::AuthFailed {
            peer,
            reason: AuthFailure::RejectedByPeer,
        },
        _ => HandshakeError::Refused { code, message },
    }
}

/// Reports a malformed payload to the peer and returns the error.
async fn protocol_error<S>(
    s: &mut S,
    kind: Kind,
    peer: Option<String>,
    reason: Malformation,
) -> HandshakeError
where
    S: AsyncWrite + Unpin,
{
    let e = HandshakeError::Malformed { kind, peer, reason };
    send_error(s, ErrorCode::Protocol, &e.to_string()).await;
    e
}

/// Best effort: the peer may already be gone, and the error we return is
/// the one that matters.
async fn send_error<S>(s: &mut S, code: ErrorCode, message: &str)
where
    S: AsyncWrite + Unpin,
{
    let f = Frame::Error {
        id: 0,
        code,
        message: message.to_owned(),
    };
    let _ = send(s, &f, "sending Error").await;
}

async fn send<S>(s: &mut S, f: &Frame, stage: &'static str) -> Result<(), HandshakeError>
where
    S: AsyncWrite + Unpin,
{
    let mut b = BytesMut::new();
    f.encode(&mut b);
    let io = |source| HandshakeError::Io { stage, source };
    s.write_all(&b).await.map_err(io)?;
    s.flush().await.map_err(io)
}

/// Reads exactly one frame, which must be `expected` or an Error. The header
/// is judged before the payload is read, so a peer cannot make us allocate
/// more than a control payload.
async fn read_frame<S>(
    s: &mut S,
    expected: Kind,
    stage: &'static str,
) -> Result<Frame, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            HandshakeError::PeerClosed { stage }
        } else {
            HandshakeError::Io { stage, source }
        }
    };
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).await.map_err(io)?;
    let h = RawHeader::decode(&head)?;
    let kind = h.validate()?;
    if kind != expected && kind != Kind::Error {
        return Err(HandshakeError::Unexpected {
            expected,
            got: kind,
        });
    }
    // Both kinds are control frames: validate() bounded this by 64 KiB.
    let mut payload = vec![0u8; h.payload_len as usize];
    s.read_exact(&mut payload).await.map_err(io)?;
    Ok(Frame::from_parts(&h, Bytes::from(payload))?)
}

fn put_string(out: &mut BytesMut, s: &str) {
    debug_assert!(s.len() <= MAX_NAME_LEN);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_volume(out: &mut BytesMut, v: &VolumeIdentity) {
    put_string(out, &v.name);
    out.put_slice(&v.volume_id);
    out.put_u64(v.size);
    out.put_u64(v.generation);
    for h in &v.history {
        out.put_u64(*h);
    }
}

/// A cursor over a handshake payload that never reads out of bounds. Errors
/// are the reason of [`HandshakeError::Malformed`].
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformation> {
        if self.b.len() < n {
            return Err(Malformation::Truncated {
                needed: n,
                left: self.b.len(),
            });
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformation> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u64(&mut self) -> Result<u64, Malformation> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, Malformation> {
        let n = usize::from(u16::from_be_bytes(self.array()?));
        if n > MAX_NAME_LEN {
            return Err(Malformation::NameTooLong(n));
        }
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| Malformation::NameNotUtf8)
    }

    fn volume(&mut self) -> Result<VolumeIdentity, Malformation> {
        Ok(VolumeIdentity {
            name: self.string()?,
            volume_id: self.array()?,
            size: self.u64()?,
            generation: self.u64()?,
            history: {
                let mut h = [0u64; HISTORY_LEN];
                for x in h.iter_mut() {
                    *x = self.u64()?;
                }
                h
            },
        })
    }

    fn finish(self) -> Result<(), Malformation> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(Malformation::Trailing(self.b.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vol(name: &str, size: u64) -> VolumeIdentity {
        VolumeIdentity {
            name: name.into(),
            volume_id: [3; 16],
            size,
            generation: 9,
            history: [8, 7, 0, 0],
        }
    }

    #[test]
    fn cursor_reads_volume_and_refuses_junk() {
        let v = vol("db", 1 << 30);
        let mut b = BytesMut::new();
        put_volume(&mut b, &v);
        let mut c = Cursor::new(&b);
        assert_eq!(c.volume(), Ok(v));
        assert!(c.finish().is_ok());
        // Truncated anywhere.
        for cut in 0..b.len() {
            assert!(Cursor::new(&b[..cut]).volume().is_err(), "cut at {cut}");
        }
        // Length past the limit, and non-UTF-8 names.
        assert!(Cursor::new(&[0xff, 0xff]).string().is_err());
        assert!(Cursor::new(&[0, 2, 0xc3, 0x28]).string().is_err());
    }

    #[test]
    fn proofs_depend_on_every_input() {
        let t = [1u8; 32];
        let (np, nm) = ([2u8; 32], [3u8; 32]);
        let base = prove(b"s", MIRROR_LABEL, &np, &nm, &t);
        assert_ne!(base, prove(b"t", MIRROR_LABEL, &np, &nm, &t));
        assert_ne!(base, prove(b"s", PRIMARY_LABEL, &np, &nm, &t));
        assert_ne!(base, prove(b"s", MIRROR_LABEL, &nm, &np, &t));
        assert_ne!(base, prove(b"s", MIRROR_LABEL, &np, &nm, &[0u8; 32]));
        assert!(verify(b"s", MIRROR_LABEL, &np, &nm, &t, &base).is_ok());
        assert!(verify(b"s", MIRROR_LABEL, &np, &nm, &t, &base[..31]).is_err());
    }

    #[tokio::test]
    async fn the_purpose_travels_in_the_hello_and_defaults_to_replication() {
        for purpose in [Purpose::Replication, Purpose::Jobs] {
            let (mut a, mut b) = tokio::io::duplex(4096);
            let hello = NodeHello {
                node: "p".into(),
                volume: vol("db", 4096),
            };
            let primary = async { connect_for(&mut a, b"0123456789abcdef", &hello, purpose).await };
            let mirror = async {
                accept_any(&mut b, b"0123456789abcdef", "m", |_| Some(vol("db", 4096))).await
            };
            let (p, m) = tokio::join!(primary, mirror);
            assert_eq!(p.unwrap().node, "m");
            assert_eq!(m.unwrap().2, purpose);
        }
        // A purpose byte this build does not know is refused.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let mut hello = BytesMut::new();
        put_string(&mut hello, "p");
        put_volume(&mut hello, &vol("db", 4096));
        hello.put_slice(&[0; NONCE_LEN]);
        hello.put_slice(&[HANDSHAKE_VERSION, 7, 0]);
        hello.put_u64(0);
        send(
            &mut a,
            &Frame::Hello {
                payload: hello.freeze(),
            },
            "test",
        )
        .await
        .unwrap();
        let e = accept_any(&mut b, b"0123456789abcdef", "m", |_| Some(vol("db", 4096)))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("unknown connection purpose 7"),
            "{e}"
        );
    }

    #[test]
    fn the_link_key_follows_what_the_node_has() {
        let (e1, e2) = ([1u8; EXPORTER_LEN], [2u8; EXPORTER_LEN]);
        let secret: &[u8] = b"0123456789abcdef";
        assert!(matches!(
            LinkKey::derive(None, None),
            Err(HandshakeError::NoKey)
        ));
        assert!(matches!(
            LinkKey::derive(Some(b""), Some(&e1)),
            Err(HandshakeError::EmptySecret)
        ));
        // The secret alone: the key is the secret, as before TLS.
        let k = LinkKey::derive(Some(secret), None).unwrap();
        assert_eq!((k.mode(), k.bytes()), (KeyMode::Secret, secret));
        assert_eq!(k, LinkKey::from(secret));
        // TLS alone: the exporter.
        let k = LinkKey::derive(None, Some(&e1)).unwrap();
        assert_eq!((k.mode(), k.bytes()), (KeyMode::Tls, &e1[..]));
        // Both: a key neither input gives alone, that changes with each.
        let both = LinkKey::derive(Some(secret), Some(&e1)).unwrap();
        assert_eq!(both.mode(), KeyMode::TlsAndSecret);
        assert_eq!(both.bytes().len(), 32);
        assert_ne!(both.bytes(), secret);
        assert_ne!(both.bytes(), &e1[..]);
        assert_ne!(
            both,
            LinkKey::derive(Some(b"0123456789abcdeX"), Some(&e1)).unwrap()
        );
        assert_ne!(both, LinkKey::derive(Some(secret), Some(&e2)).unwrap());
        // Deterministic: both ends compute it alike.
        assert_eq!(both, LinkKey::derive(Some(secret), Some(&e1)).unwrap());
        // Debug never shows the key.
        let text = format!("{both:?}");
        assert!(
            text.contains("TlsAndSecret") && !text.contains("key:"),
            "{text}"
        );
        for m in [KeyMode::Secret, KeyMode::Tls, KeyMode::TlsAndSecret] {
            assert_eq!(KeyMode::from_code(m.code()), Some(m));
        }
        assert_eq!(KeyMode::from_code(3), None);
    }

    async fn pair_with(
        pk: LinkKey,
        mk: LinkKey,
    ) -> (
        Result<PeerInfo, HandshakeError>,
        Result<(PeerInfo, VolumeIdentity, Purpose), HandshakeError>,
    ) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let hello = NodeHello {
            node: "site-a".into(),
            volume: vol("db", 4096),
        };
        let primary = async { connect_for(&mut a, &pk, &hello, Purpose::Replication).await };
        let mirror = async { accept_any(&mut b, &mk, "site-b", |_| Some(vol("db", 4096))).await };
        tokio::join!(primary, mirror)
    }

    #[tokio::test]
    async fn tls_keys_bind_the_handshake_to_the_session() {
        let (e1, e2) = ([1u8; EXPORTER_LEN], [2u8; EXPORTER_LEN]);
        let secret: &[u8] = b"0123456789abcdef";
        // One session (one exporter): TLS alone, and TLS with the secret.
        for s in [None, Some(secret)] {
            let k = LinkKey::derive(s, Some(&e1)).unwrap();
            let (p, m) = pair_with(k.clone(), k).await;
            assert_eq!(p.unwrap().node, "site-b");
            assert_eq!(m.unwrap().0.node, "site-a");
        }
        // Two sessions (a relay terminating TLS on each side): refused.
        let (p, m) = pair_with(
            LinkKey::derive(None, Some(&e1)).unwrap(),
            LinkKey::derive(None, Some(&e2)).unwrap(),
        )
        .await;
        assert!(
            matches!(p, Err(HandshakeError::AuthFailed { ref peer, .. }) if peer == "site-b"),
            "{p:?}"
        );
        assert!(m.is_err());
        // One session, different secrets: refused.
        let (p, _) = pair_with(
            LinkKey::derive(Some(secret), Some(&e1)).unwrap(),
            LinkKey::derive(Some(b"another secret!!"), Some(&e1)).unwrap(),
        )
        .await;
        assert!(matches!(p, Err(HandshakeError::AuthFailed { .. })), "{p:?}");
    }

    #[tokio::test]
    async fn a_key_mode_mismatch_is_refused_naming_both_nodes() {
        let e = [1u8; EXPORTER_LEN];
        let secret: &[u8] = b"0123456789abcdef";
        let tls = LinkKey::derive(None, Some(&e)).unwrap();
        let both = LinkKey::derive(Some(secret), Some(&e)).unwrap();
        for (pk, mk) in [(tls.clone(), both.clone()), (both, tls)] {
            let (p, m) = pair_with(pk.clone(), mk.clone()).await;
            match m {
                Err(HandshakeError::KeyModeMismatch { peer, ours, theirs }) => {
                    assert_eq!(peer, "site-a");
                    assert_eq!((ours, theirs), (mk.mode(), pk.mode()));
                }
                other => panic!("mirror: {other:?}"),
            }
            let text = p.unwrap_err().to_string();
            assert!(
                text.contains("mirror \"site-b\"") && text.contains("primary \"site-a\""),
                "{text}"
            );
            assert!(text.contains(&pk.mode().to_string()), "{text}");
            assert!(text.contains(&mk.mode().to_string()), "{text}");
        }
    }

    proptest! {
        #[test]
        fn cursor_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut c = Cursor::new(&b);
            let _ = c.string();
            let _ = c.volume();
            let _ = c.array::<NONCE_LEN>();
        }
    }
}
