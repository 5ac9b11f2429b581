//! The replication handshake end to end over in-memory streams: both roles,
//! wrong secrets, impostors and replays, volume refusals, malformed input.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use blockmirror_repl::handshake::{HISTORY_LEN, NONCE_LEN, PROOF_LEN};
use blockmirror_repl::{
    accept, accept_with, connect, connect_with, AuthFailure, Codec, ConnectOptions, ErrorCode,
    Frame, FrameReader, FrameWriter, HandshakeError, Kind, Malformation, NodeHello, PeerInfo,
    Purpose, RawHeader, VolumeIdentity, WireError, HANDSHAKE_VERSION, HEADER_LEN,
};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio::io::{
    duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf,
};

const SECRET: &[u8] = b"0123456789abcdef-correct-horse-battery-staple";
const PRIMARY: &str = "site-a";
const MIRROR: &str = "site-b";

fn vol(name: &str, size: u64, id: u8) -> VolumeIdentity {
    VolumeIdentity {
        name: name.into(),
        volume_id: [id; 16],
        size,
        generation: u64::from(id) * 10,
        history: [u64::from(id) * 10 - 1, 3, 0, 0],
    }
}

fn primary_hello(size: u64) -> NodeHello {
    NodeHello {
        node: PRIMARY.into(),
        volume: vol("db", size, 1),
    }
}

/// A stream that records every byte read and written, in one shared log
/// per direction.
struct Recording<S> {
    inner: S,
    read: Arc<Mutex<Vec<u8>>>,
    written: Arc<Mutex<Vec<u8>>>,
}

impl<S> Recording<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            read: Arc::default(),
            written: Arc::default(),
        }
    }
    fn all(&self) -> Vec<u8> {
        let mut v = self.read.lock().unwrap().clone();
        v.extend_from_slice(&self.written.lock().unwrap());
        v
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read
            .lock()
            .unwrap()
            .extend_from_slice(&buf.filled()[before..]);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs both roles against each other; each gets its own secret and the
/// mirror serves `mirror_vols`.
async fn run(
    primary_secret: &'static [u8],
    mirror_secret: &'static [u8],
    hello: NodeHello,
    mirror_vols: Vec<VolumeIdentity>,
) -> (
    Result<PeerInfo, HandshakeError>,
    Result<(PeerInfo, VolumeIdentity), HandshakeError>,
    Vec<u8>,
) {
    let (a, b) = duplex(4096);
    let mut a = Recording::new(a);
    let mirror = tokio::spawn(async move {
        let mut b = b;
        let r = accept(&mut b, mirror_secret, MIRROR, |name| {
            mirror_vols.into_iter().find(|v| v.name == name)
        })
        .await;
        (r, b)
    });
    let p = connect(&mut a, primary_secret, &hello).await;
    let (m, _b) = mirror.await.unwrap();
    (p, m, a.all())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Encodes a frame into bytes.
fn enc(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    b.to_vec()
}

/// Reads one frame from a raw stream (as an impostor would).
async fn read_one(s: &mut DuplexStream) -> Frame {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).await.unwrap();
    let h = RawHeader::decode(&head).unwrap();
    let mut p = vec![0u8; h.payload_len as usize];
    s.read_exact(&mut p).await.unwrap();
    Frame::from_parts(&h, Bytes::from(p)).unwrap()
}

/// Splits a recorded byte stream into frames.
fn frames_of(bytes: &[u8]) -> Vec<Frame> {
    let mut b = BytesMut::from(bytes);
    let mut d = blockmirror_repl::FrameDecoder::new();
    let mut out = Vec::new();
    while let Some(f) = d.decode(&mut b).unwrap() {
        out.push(f);
    }
    out
}

#[tokio::test]
async fn same_secret_succeeds_and_both_sides_learn_the_peer() {
    let mirror_vol = vol("db", 2 << 30, 2);
    let (p, m, wire) = run(
        SECRET,
        SECRET,
        primary_hello(1 << 30),
        vec![vol("logs", 1 << 20, 7), mirror_vol.clone()],
    )
    .await;
    let p = p.unwrap();
    assert_eq!(
        p,
        PeerInfo {
            node: MIRROR.into(),
            volume: mirror_vol.clone(),
            compression: Codec::None,
            epoch: 0,
        }
    );
    let (m_peer, m_vol) = m.unwrap();
    assert_eq!(
        m_peer,
        PeerInfo {
            node: PRIMARY.into(),
            volume: vol("db", 1 << 30, 1),
            compression: Codec::None,
            epoch: 0,
        }
    );
    assert_eq!(m_vol, mirror_vol);
    let kinds: Vec<Kind> = frames_of(&wire).iter().map(Frame::kind).collect();
    // What the primary read, then what it wrote.
    assert_eq!(
        kinds,
        [Kind::Challenge, Kind::Welcome, Kind::Hello, Kind::Auth]
    );
}

#[tokio::test]
async fn wrong_secret_fails_on_both_sides() {
    let (p, m, _) = run(
        SECRET,
        b"another secret entirely",
        primary_hello(1 << 20),
        vec![vol("db", 1 << 20, 2)],
    )
    .await;
    let p = p.unwrap_err();
    let m = m.unwrap_err();
    assert!(
        matches!(&p, HandshakeError::AuthFailed { peer, reason: AuthFailure::BadProof } if peer == MIRROR),
        "{p:?}"
    );
    assert!(
        matches!(&m, HandshakeError::AuthFailed { peer, reason: AuthFailure::RejectedByPeer } if peer == PRIMARY),
        "{m:?}"
    );
    assert!(p.to_string().contains("authentication failed"), "{p}");
    assert!(m.to_string().contains("authentication failed"), "{m}");
}

#[tokio::test]
async fn the_secret_never_crosses_the_wire() {
    for other in [SECRET, b"wrong secret, also never sent".as_slice()] {
        let (_, _, wire) = run(
            SECRET,
            // Leak to 'static for the spawned mirror.
            Box::leak(other.to_vec().into_boxed_slice()),
            primary_hello(1 << 20),
            vec![vol("db", 1 << 20, 2)],
        )
        .await;
        assert!(!wire.is_empty());
        for secret in [SECRET, other] {
            // Neither the secret nor any 8-byte piece of it.
            for piece in secret.windows(8) {
                assert!(
                    !contains(&wire, piece),
                    "secret piece {piece:?} on the wire"
                );
            }
        }
    }
}

#[tokio::test]
async fn impostor_mirror_without_the_secret_is_refused() {
    let (mut a, mut b) = duplex(4096);
    let impostor = tokio::spawn(async move {
        let Frame::Hello { .. } = read_one(&mut b).await else {
            panic!("expected Hello")
        };
        // A well-formed Challenge claiming a big volume, with a made-up proof.
        let mut p = Vec::new();
        p.extend_from_slice(&(MIRROR.len() as u16).to_be_bytes());
        p.extend_from_slice(MIRROR.as_bytes());
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(b"db");
        p.extend_from_slice(&[2; 16]);
        p.extend_from_slice(&u64::MAX.to_be_bytes());
        p.extend_from_slice(&1u64.to_be_bytes());
        p.extend_from_slice(&[0; 8 * HISTORY_LEN]);
        p.extend_from_slice(&[9; NONCE_LEN]);
        // Version, codecs none/lz4/zstd, key mode 0 (the secret).
        p.extend_from_slice(&[HANDSHAKE_VERSION, 0b111, 0]);
        p.extend_from_slice(&[0xab; PROOF_LEN]);
        b.write_all(&enc(&Frame::Challenge { payload: p.into() }))
            .await
            .unwrap();
        read_one(&mut b).await
    });
    let e = connect(&mut a, SECRET, &primary_hello(1 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, HandshakeError::AuthFailed { peer, reason: AuthFailure::BadProof } if peer == MIRROR),
        "{e:?}"
    );
    // The impostor is told why, and never got an Auth.
    match impostor.await.unwrap() {
        Frame::Error { code, .. } => assert_eq!(code, ErrorCode::AuthFailed),
        f => panic!("impostor got {f:?}"),
    }
}

/// A Challenge recorded from a real mirror is useless later: the primary's
/// nonce is fresh each time.
#[tokio::test]
async fn replayed_challenge_is_refused() {
    let (_, _, wire) = run(
        SECRET,
        SECRET,
        primary_hello(1 << 20),
        vec![vol("db", 1 << 20, 2)],
    )
    .await;
    let challenge = frames_of(&wire)
        .into_iter()
        .find(|f| f.kind() == Kind::Challenge)
        .unwrap();

    let (mut a, mut b) = duplex(4096);
    let impostor = tokio::spawn(async move {
        read_one(&mut b).await;
        b.write_all(&enc(&challenge)).await.unwrap();
        read_one(&mut b).await
    });
    let e = connect(&mut a, SECRET, &primary_hello(1 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            HandshakeError::AuthFailed {
                reason: AuthFailure::BadProof,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(matches!(impostor.await.unwrap(), Frame::Error { .. }));
}

/// A primary impostor replaying a recorded Hello and Auth is refused by the
/// mirror: the mirror's nonce is fresh each time.
#[tokio::test]
async fn replayed_auth_is_refused() {
    let (_, _, wire) = run(
        SECRET,
        SECRET,
        primary_hello(1 << 20),
        vec![vol("db", 1 << 20, 2)],
    )
    .await;
    let frames = frames_of(&wire);
    let hello = frames.iter().find(|f| f.kind() == Kind::Hello).unwrap();
    let auth = frames.iter().find(|f| f.kind() == Kind::Auth).unwrap();

    let (mut a, mut b) = duplex(4096);
    let mirror = tokio::spawn(async move {
        accept(&mut b, SECRET, MIRROR, |_| Some(vol("db", 1 << 20, 2))).await
    });
    a.write_all(&enc(hello)).await.unwrap();
    assert_eq!(read_one(&mut a).await.kind(), Kind::Challenge);
    a.write_all(&enc(auth)).await.unwrap();
    match read_one(&mut a).await {
        Frame::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::AuthFailed);
            assert_eq!(message, "authentication failed");
        }
        f => panic!("{f:?}"),
    }
    let e = mirror.await.unwrap().unwrap_err();
    assert!(
        matches!(&e, HandshakeError::AuthFailed { peer, reason: AuthFailure::BadProof } if peer == PRIMARY),
        "{e:?}"
    );
}

/// A malformed Auth is a typed error that names the primary (known by
/// then from its Hello).
#[tokio::test]
async fn malformed_auth_names_the_peer() {
    let (_, _, wire) = run(
        SECRET,
        SECRET,
        primary_hello(1 << 20),
        vec![vol("db", 1 << 20, 2)],
    )
    .await;
    let hello = frames_of(&wire)
        .into_iter()
        .find(|f| f.kind() == Kind::Hello)
        .unwrap();
    let (mut a, mut b) = duplex(4096);
    let mirror = tokio::spawn(async move {
        accept(&mut b, SECRET, MIRROR, |_| Some(vol("db", 1 << 20, 2))).await
    });
    a.write_all(&enc(&hello)).await.unwrap();
    assert_eq!(read_one(&mut a).await.kind(), Kind::Challenge);
    a.write_all(&enc(&Frame::Auth {
        payload: Bytes::from_static(b"short"),
    }))
    .await
    .unwrap();
    let e = mirror.await.unwrap().unwrap_err();
    match &e {
        HandshakeError::Malformed {
            kind: Kind::Auth,
            peer: Some(peer),
            reason: Malformation::Truncated { needed, left: 5 },
        } => {
            assert_eq!(peer, PRIMARY);
            assert_eq!(*needed, PROOF_LEN);
        }
        e => panic!("{e:?}"),
    }
    assert!(e.to_string().contains("from \"site-a\""), "{e}");
}

#[tokio::test]
async fn mirror_too_small_is_a_clear_error_on_both_sides() {
    let (p, m, _) = run(
        SECRET,
        SECRET,
        primary_hello(2 << 20),
        vec![vol("db", 1 << 20, 2)],
    )
    .await;
    let m = m.unwrap_err();
    match &m {
        HandshakeError::MirrorTooSmall {
            volume,
            mirror_size,
            primary_size,
        } => {
            assert_eq!(volume, "db");
            assert_eq!(*mirror_size, 1 << 20);
            assert_eq!(*primary_size, 2 << 20);
        }
        e => panic!("{e:?}"),
    }
    let p = p.unwrap_err();
    match &p {
        HandshakeError::Refused { code, message } => {
            assert_eq!(*code, ErrorCode::MirrorTooSmall);
            assert_eq!(message, &m.to_string());
        }
        e => panic!("{e:?}"),
    }
    let text = p.to_string();
    for needle in ["too small", "db", "1048576", "2097152"] {
        assert!(text.contains(needle), "{needle:?} missing from {text:?}");
    }
}

#[tokio::test]
async fn unknown_volume_is_refused() {
    let (p, m, _) = run(
        SECRET,
        SECRET,
        primary_hello(1 << 20),
        vec![vol("logs", 1 << 20, 2)],
    )
    .await;
    let m = m.unwrap_err();
    assert!(
        matches!(&m, HandshakeError::UnknownVolume { volume } if volume == "db"),
        "{m:?}"
    );
    let p = p.unwrap_err();
    assert!(
        matches!(&p, HandshakeError::Refused { code: ErrorCode::UnknownVolume, message } if message.contains("no volume named \"db\"")),
        "{p:?}"
    );
}

/// Sends `frame_bytes` to a mirror as the first thing on the link; returns
/// the mirror's error and what it answered.
async fn mirror_given(frame_bytes: Vec<u8>) -> (HandshakeError, Vec<u8>) {
    let (mut a, mut b) = duplex(1 << 17);
    let mirror = tokio::spawn(async move {
        accept(&mut b, SECRET, MIRROR, |_| Some(vol("db", 1 << 20, 2))).await
    });
    a.write_all(&frame_bytes).await.unwrap();
    a.shutdown().await.unwrap();
    let e = mirror.await.unwrap().unwrap_err();
    let mut answer = Vec::new();
    a.read_to_end(&mut answer).await.unwrap();
    (e, answer)
}

#[tokio::test]
async fn malformed_hello_is_refused() {
    // Truncated, trailing bytes, name length past the payload, bad UTF-8.
    let mut good = Vec::new();
    good.extend_from_slice(&2u16.to_be_bytes());
    good.extend_from_slice(b"pa");
    good.extend_from_slice(&2u16.to_be_bytes());
    good.extend_from_slice(b"db");
    good.extend_from_slice(&[1; 16]);
    good.extend_from_slice(&(1u64 << 20).to_be_bytes());
    good.extend_from_slice(&1u64.to_be_bytes());
    good.extend_from_slice(&[0; 8 * HISTORY_LEN]);
    good.extend_from_slice(&[5; NONCE_LEN]);
    // This version, replication, asking for lz4, epoch 9, key mode 0 (the secret).
    good.extend_from_slice(&[HANDSHAKE_VERSION, 0, 1]);
    good.extend_from_slice(&9u64.to_be_bytes());
    good.push(0);
    let mut trailing = good.clone();
    trailing.push(0);
    let mut bad_utf8 = good.clone();
    bad_utf8[2] = 0xff;
    let cases = [
        good[..good.len() - 1].to_vec(),
        trailing,
        vec![0xff, 0xff, b'x'],
        bad_utf8,
        Vec::new(),
    ];
    for payload in cases {
        let (e, answer) = mirror_given(enc(&Frame::Hello {
            payload: payload.clone().into(),
        }))
        .await;
        assert!(
            matches!(
                e,
                HandshakeError::Malformed {
                    kind: Kind::Hello,
                    ..
                }
            ),
            "{payload:?}: {e:?}"
        );
        match frames_of(&answer).as_slice() {
            [Frame::Error { code, .. }] => assert_eq!(*code, ErrorCode::Protocol),
            other => panic!("{other:?}"),
        }
    }
    // The well-formed one passes the parse (and then waits for Auth).
    let (e, _) = mirror_given(enc(&Frame::Hello {
        payload: good.into(),
    }))
    .await;
    assert!(
        matches!(e, HandshakeError::PeerClosed { stage } if stage.contains("Auth")),
        "{e:?}"
    );
}

#[tokio::test]
async fn wrong_or_corrupt_first_frame_is_refused() {
    // A Write before the handshake.
    let (e, _) = mirror_given(enc(&Frame::Write {
        id: 1,
        offset: 0,
        fua: false,
        data: Bytes::from_static(b"data"),
    }))
    .await;
    assert!(
        matches!(
            e,
            HandshakeError::Unexpected {
                expected: Kind::Hello,
                got: Kind::Write
            }
        ),
        "{e:?}"
    );
    // A Hello whose header was corrupted in flight.
    let mut b = enc(&Frame::Hello {
        payload: Bytes::from_static(b"x"),
    });
    b[20] ^= 0x10;
    let (e, _) = mirror_given(b).await;
    assert!(
        matches!(e, HandshakeError::Wire(WireError::HeaderChecksum { .. })),
        "{e:?}"
    );
    // Nothing at all.
    let (e, _) = mirror_given(Vec::new()).await;
    assert!(matches!(e, HandshakeError::PeerClosed { .. }), "{e:?}");
}

#[tokio::test]
async fn empty_secret_is_refused_before_anything_is_sent() {
    let (mut a, _b) = duplex(64);
    let e = connect(&mut a, b"", &primary_hello(1)).await.unwrap_err();
    assert!(matches!(e, HandshakeError::EmptySecret), "{e:?}");
}

/// A silent mirror: the caller's timeout ends the wait (the documented way).
#[tokio::test(start_paused = true)]
async fn silent_peer_is_ended_by_the_callers_timeout() {
    let (mut a, _b) = duplex(4096);
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        connect(&mut a, SECRET, &primary_hello(1)),
    )
    .await;
    assert!(r.is_err(), "expected a timeout");
}

/// After the handshake the same stream carries frames, with no byte lost or
/// taken early by the handshake.
#[tokio::test]
async fn link_carries_frames_after_the_handshake() {
    let (mut a, b) = duplex(1 << 16);
    let mirror = tokio::spawn(async move {
        let mut b = b;
        accept(&mut b, SECRET, MIRROR, |_| Some(vol("db", 1 << 20, 2)))
            .await
            .unwrap();
        let (r, w) = tokio::io::split(b);
        let mut r = FrameReader::new(r);
        let mut w = FrameWriter::new(w);
        let mut n = 0;
        while let Some(f) = r.next().await.unwrap() {
            match f {
                Frame::Write { id, data, .. } => {
                    assert_eq!(data.len(), 8192);
                    w.queue(&Frame::Ack { id });
                    n += 1;
                }
                Frame::Flush { id } => {
                    w.queue(&Frame::Ack { id });
                    w.flush().await.unwrap();
                }
                f => panic!("{f:?}"),
            }
        }
        n
    });
    connect(&mut a, SECRET, &primary_hello(1 << 20))
        .await
        .unwrap();
    let (r, w) = tokio::io::split(a);
    let mut w = FrameWriter::new(w);
    let data = Bytes::from(vec![0x42; 8192]);
    for id in 1..=10 {
        w.queue_write(id, id * 8192, false, data.clone());
    }
    w.queue(&Frame::Flush { id: 11 });
    w.flush().await.unwrap();
    let mut r = FrameReader::new(r);
    for id in 1..=11 {
        assert_eq!(r.next().await.unwrap(), Some(Frame::Ack { id }));
    }
    w.get_mut().shutdown().await.unwrap();
    assert_eq!(mirror.await.unwrap(), 10);
}

/// Runs both roles: the primary asks for `wanted`, the mirror supports
/// `supported`. Returns what each side negotiated.
async fn negotiate(wanted: Codec, supported: &'static [Codec]) -> (Codec, Codec) {
    let (mut a, mut b) = duplex(4096);
    let mirror = tokio::spawn(async move {
        accept_with(&mut b, SECRET, MIRROR, supported, |_| {
            Some(vol("db", 1 << 20, 2))
        })
        .await
    });
    let opts = ConnectOptions {
        purpose: Purpose::Replication,
        compression: wanted,
        epoch: 0,
    };
    let p = connect_with(&mut a, SECRET, &primary_hello(1 << 20), opts)
        .await
        .unwrap();
    let (m, _, purpose) = mirror.await.unwrap().unwrap();
    assert_eq!(purpose, Purpose::Replication);
    (p.compression, m.compression)
}

#[tokio::test]
async fn compression_is_the_primarys_codec_when_the_mirror_supports_it() {
    for c in [Codec::Lz4, Codec::Zstd] {
        assert_eq!(negotiate(c, &Codec::ALL).await, (c, c), "{c}");
    }
    // Supporting just that one (none is implied) is enough.
    assert_eq!(
        negotiate(Codec::Zstd, &[Codec::Zstd]).await,
        (Codec::Zstd, Codec::Zstd)
    );
}

#[tokio::test]
async fn compression_falls_back_to_none_when_the_mirror_lacks_the_codec() {
    assert_eq!(
        negotiate(Codec::Zstd, &[Codec::None, Codec::Lz4]).await,
        (Codec::None, Codec::None)
    );
    assert_eq!(negotiate(Codec::Lz4, &[]).await, (Codec::None, Codec::None));
}

#[tokio::test]
async fn a_primary_that_wants_no_compression_gets_none() {
    assert_eq!(
        negotiate(Codec::None, &Codec::ALL).await,
        (Codec::None, Codec::None)
    );
    // The plain entry points ask for none.
    let (p, m, _) = run(
        SECRET,
        SECRET,
        primary_hello(1 << 20),
        vec![vol("db", 1 << 20, 2)],
    )
    .await;
    assert_eq!(p.unwrap().compression, Codec::None);
    assert_eq!(m.unwrap().0.compression, Codec::None);
}

/// A codec code from a newer primary that this mirror does not know is
/// unsupported, not an error.
#[tokio::test]
async fn an_unknown_codec_code_negotiates_none() {
    let (mut a, mut b) = duplex(4096);
    let mirror = tokio::spawn(async move {
        accept(&mut b, SECRET, MIRROR, |_| Some(vol("db", 1 << 20, 2))).await
    });
    let mut hello = Vec::new();
    hello.extend_from_slice(&(PRIMARY.len() as u16).to_be_bytes());
    hello.extend_from_slice(PRIMARY.as_bytes());
    hello.extend_from_slice(&2u16.to_be_bytes());
    hello.extend_from_slice(b"db");
    hello.extend_from_slice(&[1; 16]);
    hello.extend_from_slice(&(1u64 << 20).to_be_bytes());
    hello.extend_from_slice(&[0; 8 * (1 + HISTORY_LEN)]);
    hello.extend_from_slice(&[5; NONCE_LEN]);
    hello.extend_from_slice(&[HANDSHAKE_VERSION, 0, 200]);
    hello.extend_from_slice(&0u64.to_be_bytes());
    hello.push(0);
    a.write_all(&enc(&Frame::Hello {
        payload: hello.into(),
    }))
    .await
    .unwrap();
    let Frame::Challenge { payload } = read_one(&mut a).await else {
        panic!("expected a Challenge")
    };
    // The mirror's supported codecs: none, lz4 and zstd; then its key mode.
    let at = payload.len() - PROOF_LEN - 3;
    assert_eq!(payload[at..at + 3], [HANDSHAKE_VERSION, 0b111, 0]);
    // Without the secret this side cannot go on; the mirror was not refused
    // before the proof.
    drop(a);
    let e = mirror.await.unwrap().unwrap_err();
    assert!(matches!(e, HandshakeError::PeerClosed { .. }), "{e:?}");
}

/// A version 1 Hello (no version, purpose or codec bytes) is refused with a
/// reason naming both versions.
#[tokio::test]
async fn a_version_1_hello_is_refused_clearly() {
    let mut v1 = Vec::new();
    v1.extend_from_slice(&2u16.to_be_bytes());
    v1.extend_from_slice(b"pa");
    v1.extend_from_slice(&2u16.to_be_bytes());
    v1.extend_from_slice(b"db");
    v1.extend_from_slice(&[1; 16]);
    v1.extend_from_slice(&(1u64 << 20).to_be_bytes());
    v1.extend_from_slice(&[0; 8 * (1 + HISTORY_LEN)]);
    v1.extend_from_slice(&[5; NONCE_LEN]);
    let mut v1_jobs = v1.clone();
    v1_jobs.push(1);
    let mut v2 = v1.clone();
    v2.extend_from_slice(&[2, 0, 0]);
    // Version 3: the epoch, no key mode.
    let mut v3 = v1.clone();
    v3.extend_from_slice(&[3, 0, 0]);
    v3.extend_from_slice(&0u64.to_be_bytes());
    let mut v5 = v1.clone();
    v5.extend_from_slice(&[5, 0, 0]);
    v5.extend_from_slice(&0u64.to_be_bytes());
    v5.push(0);
    for (payload, needle) in [
        (v1, "handshake version 1"),
        (v1_jobs, "handshake version 1"),
        (v2, "handshake version 2"),
        (v3, "handshake version 3"),
        (v5, "handshake version 5"),
    ] {
        let (e, answer) = mirror_given(enc(&Frame::Hello {
            payload: payload.into(),
        }))
        .await;
        assert!(
            matches!(
                &e,
                HandshakeError::Malformed {
                    kind: Kind::Hello,
                    ..
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(needle) && text.contains("speaks 4"), "{text}");
        match frames_of(&answer).as_slice() {
            [Frame::Error { code, message, .. }] => {
                assert_eq!(*code, ErrorCode::Protocol);
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Reads one frame from `from`, lets `edit` change its payload, and writes
/// it (with fresh checksums) to `to`.
async fn relay(from: &mut DuplexStream, to: &mut DuplexStream, edit: impl FnOnce(&mut Vec<u8>)) {
    let f = read_one(from).await;
    let f = match f {
        Frame::Hello { payload } => {
            let mut p = payload.to_vec();
            edit(&mut p);
            Frame::Hello { payload: p.into() }
        }
        Frame::Challenge { payload } => {
            let mut p = payload.to_vec();
            edit(&mut p);
            Frame::Challenge { payload: p.into() }
        }
        f => f,
    };
    to.write_all(&enc(&f)).await.unwrap();
}

/// A man in the middle who rewrites the compression fields (to force a
/// downgrade, or a codec the mirror cannot decode) breaks the proofs.
#[tokio::test]
async fn the_proofs_cover_the_compression_fields() {
    // Which frame to rewrite, and how: the primary's wanted codec, or the
    // mirror's supported set.
    type Edit = fn(&mut Vec<u8>);
    let cases: [(Kind, Edit); 3] = [
        // The wanted codec sits before the 8-byte epoch and the key mode.
        (Kind::Hello, |p| {
            let at = p.len() - 10;
            p[at] = Codec::None.code();
        }),
        // The epoch itself: a man in the middle cannot make a deposed
        // primary look current.
        (Kind::Hello, |p| {
            let at = p.len() - 2;
            p[at] ^= 1;
        }),
        // The supported codecs, before the key mode and the proof.
        (Kind::Challenge, |p| {
            let at = p.len() - PROOF_LEN - 2;
            p[at] = 0b001;
        }),
    ];
    for (kind, edit) in cases {
        let (mut a, mut m1) = duplex(4096);
        let (mut m2, mut b) = duplex(4096);
        let mirror = tokio::spawn(async move {
            accept(&mut b, SECRET, MIRROR, |_| Some(vol("db", 1 << 20, 2))).await
        });
        let mitm = tokio::spawn(async move {
            let hello_edit: Edit = if kind == Kind::Hello { edit } else { |_| {} };
            let challenge_edit: Edit = if kind == Kind::Challenge {
                edit
            } else {
                |_| {}
            };
            relay(&mut m1, &mut m2, hello_edit).await;
            relay(&mut m2, &mut m1, challenge_edit).await;
            // The primary's answer (an Error), then whatever follows.
            let f = read_one(&mut m1).await;
            let _ = m2.write_all(&enc(&f)).await;
            f
        });
        let opts = ConnectOptions {
            purpose: Purpose::Replication,
            compression: Codec::Zstd,
            epoch: 0,
        };
        let e = connect_with(&mut a, SECRET, &primary_hello(1 << 20), opts)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &e,
                HandshakeError::AuthFailed {
                    reason: AuthFailure::BadProof,
                    ..
                }
            ),
            "{kind}: {e:?}"
        );
        assert!(
            matches!(
                mitm.await.unwrap(),
                Frame::Error {
                    code: ErrorCode::AuthFailed,
                    ..
                }
            ),
            "{kind}"
        );
        assert!(mirror.await.unwrap().is_err(), "{kind}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary Hello payloads never panic the mirror; anything that is not
    /// a well-formed Hello is Malformed.
    #[test]
    fn arbitrary_hello_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(mirror_given(enc(&Frame::Hello { payload: payload.into() }))).0;
        prop_assert!(
            matches!(e, HandshakeError::Malformed { kind: Kind::Hello, .. } | HandshakeError::PeerClosed { .. }),
            "{:?}", e
        );
    }

    /// A well-formed Hello up to its nonce with an arbitrary tail: refused
    /// as malformed unless the tail is exactly this version's (version, a
    /// known purpose, any codec code, an epoch, a known key mode), which
    /// passes the parse (and a key mode other than the mirror's is refused
    /// as such).
    #[test]
    fn hello_tails_are_judged_exactly(
        tail in proptest::collection::vec(any::<u8>(), 0..14),
        shape in 0u8..3,
    ) {
        // A third of the cases start as a good tail with some bytes cut or changed.
        let tail = match shape {
            0 => tail,
            _ => {
                let mut good = vec![HANDSHAKE_VERSION, tail.first().copied().unwrap_or(0) % 2, 1];
                good.extend_from_slice(&7u64.to_be_bytes());
                good.push(tail.get(1).copied().unwrap_or(0) % 4);
                let cut = if shape == 1 { good.len() } else { tail.len().min(good.len()) };
                good.truncate(cut);
                good
            }
        };
        let mut p = Vec::new();
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(b"pa");
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(b"db");
        p.extend_from_slice(&[1; 16]);
        p.extend_from_slice(&(1u64 << 20).to_be_bytes());
        p.extend_from_slice(&[0; 8 * (1 + HISTORY_LEN)]);
        p.extend_from_slice(&[5; NONCE_LEN]);
        p.extend_from_slice(&tail);
        let parses = tail.len() == 12 && tail[0] == HANDSHAKE_VERSION && tail[1] <= 1 && tail[11] <= 2;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(mirror_given(enc(&Frame::Hello { payload: p.into() }))).0;
        if parses && tail[11] == 0 {
            prop_assert!(matches!(e, HandshakeError::PeerClosed { .. }), "{:?}", e);
        } else if parses {
            prop_assert!(matches!(e, HandshakeError::KeyModeMismatch { .. }), "{:?}", e);
        } else {
            prop_assert!(matches!(e, HandshakeError::Malformed { kind: Kind::Hello, .. }), "{:?}", e);
        }
    }

    /// Arbitrary Challenge payloads never panic the primary and never pass.
    #[test]
    fn arbitrary_challenge_payloads_never_pass(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(async move {
            let (mut a, mut b) = duplex(1 << 16);
            let imp = tokio::spawn(async move {
                read_one(&mut b).await;
                b.write_all(&enc(&Frame::Challenge { payload: payload.into() })).await.unwrap();
                b
            });
            let r = connect(&mut a, SECRET, &primary_hello(1)).await;
            drop(imp.await.unwrap());
            r
        }).unwrap_err();
        prop_assert!(
            matches!(e, HandshakeError::Malformed { kind: Kind::Challenge, .. } | HandshakeError::AuthFailed { .. }),
            "{:?}", e
        );
    }
}

#[tokio::test]
async fn the_fencing_epoch_travels_in_the_hello() {
    let (mut a, mut b) = duplex(4096);
    let mirror = tokio::spawn(async move {
        accept_with(&mut b, SECRET, MIRROR, &Codec::ALL, |_| {
            Some(vol("db", 1 << 20, 2))
        })
        .await
    });
    let opts = ConnectOptions {
        purpose: Purpose::Replication,
        compression: Codec::None,
        epoch: 42,
    };
    let p = connect_with(&mut a, SECRET, &primary_hello(1 << 20), opts)
        .await
        .unwrap();
    let (m, _, _) = mirror.await.unwrap().unwrap();
    assert_eq!((p.epoch, m.epoch), (42, 42));
}
