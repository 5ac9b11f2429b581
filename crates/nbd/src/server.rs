//! Listeners, connections and the transmission phase.
//!
//! Each connection has two tasks:
//!
//! - the **reader** parses as many requests as the socket has delivered
//!   (one `read` often brings dozens), validates each, and starts it. A
//!   request's future is polled once inline: cheap work (a buffered write to
//!   the page cache) completes right there and its reply joins the batch;
//!   anything still pending (fsync, O_DIRECT, an uncached read, a mirror's
//!   acknowledgement) goes with the batch to the writer, which finishes it.
//! - the **writer** owns every request still pending (one `FuturesUnordered`,
//!   not a task each) and the reply channel. Woken by either, it takes every
//!   reply that is ready (many mirrored writes settled by one acknowledgement
//!   batch finish in one wake-up) and sends them with one vectored write,
//!   out of order; while a write waits for the socket it keeps finishing
//!   requests for the next one.
//!
//! In-flight work per connection is bounded in requests and in bytes
//! ([`MAX_INFLIGHT_REQUESTS`], [`MAX_INFLIGHT_BYTES`]): a permit is taken
//! before a request starts and released only once its reply is on the wire,
//! so a client that stops reading replies stops being read.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::export::{CmdKind, Export, StatusExtent};
use crate::handshake::BASE_ALLOCATION_ID;
use crate::handshake::{greet, options, Exports, HandshakeError, Negotiated, Step, Transport};
use crate::proto::*;
use blockmirror_core::geometry::{Geometry, RangeError};

/// Requests in flight on one connection (qemu uses 16, the kernel up to 128).
pub const MAX_INFLIGHT_REQUESTS: usize = 256;
/// Payload bytes in flight on one connection (write payloads and read buffers).
pub const MAX_INFLIGHT_BYTES: usize = 256 * 1024 * 1024;
/// The reader asks the socket for at least this much at a time.
const READ_CHUNK: usize = 256 * 1024;
/// Replies with less data than this are copied into the writer's buffer;
/// larger ones go out as their own iovec.
const COPY_THRESHOLD: usize = 16 * 1024;

/// Why a connection ended abnormally.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(p) => {
                // A stale socket from an earlier run would make bind fail.
                if std::fs::symlink_metadata(p)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    .unwrap_or(false)
                {
                    std::fs::remove_file(p)?;
                }
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
            Listener::Unix(_, p) => Ok(ListenAddr::Unix(p.clone())),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Accepts connections until `shutdown` fires, then waits for every
/// connection to finish its in-flight requests.
pub async fn serve<E: Export>(
    listener: Listener,
    exports: Arc<Exports<E>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = accept(&listener) => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and the like: log, back off a little, keep serving.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let exports = exports.clone();
                let shutdown = shutdown.clone();
                let span = tracing::info_span!("nbd", %peer);
                tracker.spawn(async move {
                    debug!(%peer, "connection opened");
                    let r = match stream {
                        Stream::Tcp(s) => serve_connection(s, &exports, shutdown).await,
                        Stream::Unix(s) => serve_connection(s, &exports, shutdown).await,
                    };
                    match r {
                        Ok(()) => debug!(%peer, "connection closed"),
                        Err(ConnError::Handshake(HandshakeError::Io(e)))
                            if e.kind() == io::ErrorKind::UnexpectedEof =>
                        {
                            debug!(%peer, "client left during handshake")
                        }
                        Err(e @ ConnError::Handshake(
                            HandshakeError::Tls(_) | HandshakeError::TlsRequired(_),
                        )) => warn!(%peer, error = %e, "refused"),
                        Err(e) => info!(%peer, error = %e, "connection ended"),
                    }
                }.instrument(span));
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<(Stream, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            s.set_nodelay(true)?;
            Ok((Stream::Tcp(s), a.to_string()))
        }
        Listener::Unix(l, p) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), format!("unix:{}", p.display())))
        }
    }
}

/// A byte stream that can be split into owned halves for the two tasks.
pub trait SplitStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: AsyncWrite + Unpin + Send + 'static;
    fn split(self) -> (Self::R, Self::W);
}

impl SplitStream for tokio::net::TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl SplitStream for tokio::net::UnixStream {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    fn split(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

/// A TLS session after STARTTLS: split with `tokio::io::split` (a lock
/// per poll; the plaintext types above split without one).
impl<S: SplitStream> SplitStream for tokio_rustls::server::TlsStream<S> {
    type R = tokio::io::ReadHalf<Self>;
    type W = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
}

impl SplitStream for tokio::io::DuplexStream {
    type R = tokio::io::ReadHalf<tokio::io::DuplexStream>;
    type W = tokio::io::WriteHalf<tokio::io::DuplexStream>;
    fn split(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
}

/// Serves one client: handshake (with STARTTLS if the exports offer it),
/// then transmission until it disconnects or `shutdown` fires (in-flight
/// requests are finished and answered first).
///
/// The plaintext and the TLS session are different stream types, each with
/// its own monomorphised transmission phase: plaintext pays nothing for TLS.
pub async fn serve_connection<E: Export, S: SplitStream>(
    mut stream: S,
    exports: &Exports<E>,
    shutdown: CancellationToken,
) -> Result<(), ConnError> {
    let plain = async {
        let no_zeroes = greet(&mut stream).await?;
        let step = options(
            &mut stream,
            exports,
            no_zeroes,
            Transport::Plain { tls: true },
        )
        .await?;
        Ok::<_, HandshakeError>((no_zeroes, step))
    };
    let (no_zeroes, step) = tokio::select! {
        r = plain => match r {
            Ok(x) => x,
            Err(HandshakeError::Aborted) => return Ok(()),
            Err(e) => return Err(e.into()),
        },
        _ = shutdown.cancelled() => return Ok(()),
    };
    match step {
        Step::Negotiated(n) => transmission(stream, n, shutdown).await,
        Step::StartTls(config) => {
            let upgrade = async {
                // The handshake read exactly up to the end of STARTTLS, so
                // the TLS layer sees every byte after it: plaintext a man in
                // the middle injected there fails the TLS handshake.
                let mut tls = tokio_rustls::TlsAcceptor::from(config)
                    .accept(stream)
                    .await
                    .map_err(HandshakeError::Tls)?;
                let client_cert = tls.get_ref().1.peer_certificates().is_some();
                debug!(client_cert, "TLS up");
                let step = options(&mut tls, exports, no_zeroes, Transport::Tls).await?;
                Ok::<_, HandshakeError>((tls, step))
            };
            let (tls, step) = tokio::select! {
                r = upgrade => match r {
                    Ok(x) => x,
                    Err(HandshakeError::Aborted) => return Ok(()),
                    Err(e) => return Err(e.into()),
                },
                _ = shutdown.cancelled() => return Ok(()),
            };
            match step {
                Step::Negotiated(n) => transmission(tls, n, shutdown).await,
                Step::StartTls(_) => unreachable!("STARTTLS over TLS is refused"),
            }
        }
    }
}

async fn transmission<E: Export, S: SplitStream>(
    stream: S,
    negotiated: Negotiated<E>,
    shutdown: CancellationToken,
) -> Result<(), ConnError> {
    let export = negotiated.export;
    let session = negotiated.session;
    debug!(
        export = export.name(),
        structured = session.structured,
        "transmission"
    );
    let (rd, wr) = stream.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(writer_loop::<E, _>(wr, rx, session.structured));
    export.connection_opened();
    let mut reader = Reader {
        export: export.clone(),
        geometry: Geometry::new(export.size()),
        session,
        tx,
        batch: Vec::new(),
        pending: Vec::new(),
        requests: Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS)),
        bytes: Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES)),
    };
    let read_result = reader.run(rd, &shutdown).await;
    // Dropping the reader drops the sender; the writer finishes once every
    // request it holds has been answered.
    drop(reader);
    let write_result = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    export.connection_closed();
    read_result?;
    match write_result {
        Err(e) if is_disconnect(&e) => Ok(()),
        r => r.map_err(Into::into),
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    )
}

/// What a finished request sends back.
enum Outcome {
    Done,
    Error(Errno),
    Data(Bytes),
    Extents(Vec<StatusExtent>),
}

struct Reply {
    cookie: u64,
    /// The request's command type, which decides the reply's shape.
    kind: u16,
    offset: u64,
    outcome: Outcome,
    /// Released when the reply has been written.
    _permits: Permits,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What the reader hands the writer after each read: the replies of the
/// requests that completed inline, and the requests still pending.
struct Message<E> {
    replies: Vec<Reply>,
    pending: Vec<InFlight<E>>,
}

type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A request that did not complete on its first poll: its future and what
/// its reply needs. Polled to completion by the writer.
struct InFlight<E> {
    fut: BoxFuture,
    export: Arc<E>,
    kind: CmdKind,
    cookie: u64,
    cmd: u16,
    offset: u64,
    payload: u64,
    started: Instant,
    permits: Option<Permits>,
}

impl<E: Export> Future for InFlight<E> {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        // Every field is Unpin (the future is boxed), so is InFlight.
        let this = &mut *self;
        let outcome = std::task::ready!(this.fut.as_mut().poll(cx));
        record(
            this.export.as_ref(),
            this.kind,
            this.payload,
            this.started,
            &outcome,
        );
        Poll::Ready(Reply {
            cookie: this.cookie,
            kind: this.cmd,
            offset: this.offset,
            outcome,
            _permits: this.permits.take().expect("an InFlight completes once"),
        })
    }
}

struct Reader<E> {
    export: Arc<E>,
    geometry: Geometry,
    session: Session,
    tx: mpsc::UnboundedSender<Message<E>>,
    /// Replies of requests that completed inline, sent as one message.
    batch: Vec<Reply>,
    /// Requests still pending after their first poll, sent with `batch`.
    pending: Vec<InFlight<E>>,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

enum Flow {
    Continue,
    Disconnect,
}

impl<E: Export> Reader<E> {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut rd: R,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnError> {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        // How much a new buffer is given: a read chunk, or the size of the
        // last large WRITE, so that a stream of large writes lands each in
        // one allocation instead of growing one (a copy of what arrived).
        let mut chunk = READ_CHUNK;
        // Bytes of a refused WRITE payload still to be skipped.
        let mut discard: u64 = 0;
        loop {
            // Parse everything that has arrived.
            let need = loop {
                if discard > 0 {
                    let n = discard.min(buf.len() as u64);
                    buf.advance(n as usize);
                    discard -= n;
                    if discard > 0 {
                        break 1;
                    }
                }
                if buf.len() < REQUEST_HEADER_LEN {
                    break REQUEST_HEADER_LEN;
                }
                let hb: &[u8; REQUEST_HEADER_LEN] = buf[..REQUEST_HEADER_LEN]
                    .try_into()
                    .expect("length checked");
                let h = RequestHeader::decode(hb)?;
                if h.has_payload() {
                    let len = h.len as usize;
                    match self.check_write(&h) {
                        Ok(()) => {
                            if buf.len() < REQUEST_HEADER_LEN + len {
                                break REQUEST_HEADER_LEN + len;
                            }
                            buf.advance(REQUEST_HEADER_LEN);
                            chunk = (REQUEST_HEADER_LEN + len).max(READ_CHUNK);
                            let data = buf.split_to(len).freeze();
                            self.start(&h, Some(data)).await;
                        }
                        Err(errno) => {
                            // Keep in step with the client: skip the payload.
                            buf.advance(REQUEST_HEADER_LEN);
                            discard = u64::from(h.len);
                            self.reply_error(&h, errno).await;
                        }
                    }
                } else {
                    buf.advance(REQUEST_HEADER_LEN);
                    if let Flow::Disconnect = self.start(&h, None).await {
                        self.send_batch();
                        return Ok(());
                    }
                }
            };
            self.send_batch();

            let missing = need.saturating_sub(buf.len());
            if buf.capacity() - buf.len() < missing.max(READ_CHUNK / 4) {
                buf.reserve(missing.max(chunk));
            }
            let n = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                n = rd.read_buf(&mut buf) => match n {
                    Ok(n) => n,
                    // TLS: the client closed without close_notify (most do,
                    // after NBD_CMD_DISC); judged like a plain EOF below.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                    Err(e) => return Err(e.into()),
                },
            };
            if n == 0 {
                if buf.is_empty() && discard == 0 {
                    return Ok(()); // Clean EOF between requests.
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection in the middle of a request",
                )
                .into());
            }
        }
    }

    fn send_batch(&mut self) {
        if self.batch.is_empty() && self.pending.is_empty() {
            return;
        }
        let m = Message {
            replies: std::mem::take(&mut self.batch),
            pending: std::mem::take(&mut self.pending),
        };
        // A send error means the writer is gone (the client vanished); the
        // reader sees that as EOF on its next read. A request already
        // started is never dropped half-way (a mirrored write still has to
        // settle its links): it finishes on a task of its own, unanswered.
        if let Err(mpsc::error::SendError(m)) = self.tx.send(m) {
            for p in m.pending {
                tokio::spawn(p);
            }
        }
    }

    /// Judges a WRITE before its payload is buffered.
    fn check_write(&self, h: &RequestHeader) -> Result<(), Errno> {
        Command::validate(h, &self.session)?;
        self.geometry
            .check_payload(h.offset, u64::from(h.len))
            .map_err(|e| match e {
                RangeError::PastEnd { .. } => Errno::NoSpc,
                _ => Errno::Inval,
            })
    }

    /// Takes the in-flight permits for a request. When they are exhausted,
    /// the replies batched so far go to the writer first (they hold permits
    /// themselves), then the reader waits: back-pressure on the client.
    async fn permits(&mut self, bytes: u32) -> Permits {
        let request = match self.requests.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.send_batch();
                // The semaphores are never closed, so acquiring cannot fail.
                self.requests
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed")
            }
        };
        let bytes = if bytes == 0 {
            None
        } else {
            Some(match self.bytes.clone().try_acquire_many_owned(bytes) {
                Ok(p) => p,
                Err(_) => {
                    self.send_batch();
                    self.bytes
                        .clone()
                        .acquire_many_owned(bytes)
                        .await
                        .expect("never closed")
                }
            })
        };
        Permits {
            _request: request,
            _bytes: bytes,
        }
    }

    async fn reply_error(&mut self, h: &RequestHeader, errno: Errno) {
        let permits = self.permits(0).await;
        debug!(cookie = h.cookie, kind = h.kind, offset = h.offset, len = h.len, %errno, "request refused");
        if let Some(kind) = CmdKind::from_wire(h.kind) {
            self.export
                .record(kind, 0, std::time::Duration::ZERO, false);
        }
        self.batch.push(Reply {
            cookie: h.cookie,
            kind: h.kind,
            offset: h.offset,
            outcome: Outcome::Error(errno),
            _permits: permits,
        });
    }

    /// Validates and starts one request.
    async fn start(&mut self, h: &RequestHeader, data: Option<Bytes>) -> Flow {
        let cmd = match Command::validate(h, &self.session) {
            Ok(c) => c,
            Err(errno) => {
                self.reply_error(h, errno).await;
                return Flow::Continue;
            }
        };
        let g = self.geometry;
        let e = self.export.clone();
        let (kind, bytes, fut): (CmdKind, u32, BoxFuture) = match cmd {
            Command::Disconnect => return Flow::Disconnect,
            Command::Read { offset, len } => {
                if let Err(err) = g.check_payload(offset, u64::from(len)) {
                    let errno = match err {
                        RangeError::TooLarge { .. } if self.session.structured => Errno::Overflow,
                        _ => Errno::Inval,
                    };
                    self.reply_error(h, errno).await;
                    return Flow::Continue;
                }
                let fut = Box::pin(async move {
                    match e.read(offset, len).await {
                        Ok(d) => Outcome::Data(d),
                        Err(errno) => Outcome::Error(errno),
                    }
                });
                (CmdKind::Read, len, fut)
            }
            Command::Write { offset, fua, .. } => {
                let data = data.expect("WRITE carries its payload");
                let len = data.len() as u32;
                let fut = Box::pin(async move { done(e.write(offset, data, fua).await) });
                (CmdKind::Write, len, fut)
            }
            Command::Flush => (
                CmdKind::Flush,
                0,
                Box::pin(async move { done(e.flush().await) }),
            ),
            Command::Trim { offset, len, fua } => {
                if g.check(offset, u64::from(len)).is_err() {
                    self.reply_error(h, Errno::Inval).await;
                    return Flow::Continue;
                }
                let fut = Box::pin(async move { done(e.trim(offset, u64::from(len), fua).await) });
                (CmdKind::Trim, 0, fut)
            }
            Command::WriteZeroes {
                offset,
                len,
                fua,
                may_trim,
                fast: _,
            } => {
                if let Err(err) = g.check(offset, u64::from(len)) {
                    let errno = match err {
                        RangeError::PastEnd { .. } => Errno::NoSpc,
                        _ => Errno::Inval,
                    };
                    self.reply_error(h, errno).await;
                    return Flow::Continue;
                }
                let fut = Box::pin(async move {
                    done(e.write_zeroes(offset, u64::from(len), may_trim, fua).await)
                });
                (CmdKind::WriteZeroes, 0, fut)
            }
            Command::Cache { offset, len } => {
                // A hint; the page cache already does this for buffered files.
                let outcome = match g.check(offset, u64::from(len)) {
                    Ok(()) => Outcome::Done,
                    Err(_) => Outcome::Error(Errno::Inval),
                };
                (CmdKind::Cache, 0, Box::pin(async move { outcome }))
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                if g.check(offset, u64::from(len)).is_err() {
                    self.reply_error(h, Errno::Inval).await;
                    return Flow::Continue;
                }
                let fut = Box::pin(async move {
                    match e.block_status(offset, len).await {
                        Ok(mut x) if !x.is_empty() => {
                            if req_one {
                                x.truncate(1);
                            }
                            Outcome::Extents(x)
                        }
                        Ok(_) => Outcome::Extents(vec![StatusExtent { len, flags: 0 }]),
                        Err(errno) => Outcome::Error(errno),
                    }
                });
                (CmdKind::BlockStatus, 0, fut)
            }
        };
        let permits = self.permits(bytes).await;
        self.run_request(h, kind, fut, permits);
        Flow::Continue
    }

    /// Polls a request once inline; hands it to the writer if it is not
    /// done yet.
    fn run_request(
        &mut self,
        h: &RequestHeader,
        kind: CmdKind,
        mut fut: BoxFuture,
        permits: Permits,
    ) {
        let started = Instant::now();
        let (cookie, cmd, offset) = (h.cookie, h.kind, h.offset);
        let payload = u64::from(h.len);
        let mut cx = Context::from_waker(Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(outcome) => {
                record(self.export.as_ref(), kind, payload, started, &outcome);
                self.batch.push(Reply {
                    cookie,
                    kind: cmd,
                    offset,
                    outcome,
                    _permits: permits,
                });
            }
            Poll::Pending => self.pending.push(InFlight {
                fut,
                export: self.export.clone(),
                kind,
                cookie,
                cmd,
                offset,
                payload,
                started,
                permits: Some(permits),
            }),
        }
    }
}

fn done(r: Result<(), Errno>) -> Outcome {
    match r {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Error(e),
    }
}

fn record<E: Export>(e: &E, kind: CmdKind, payload: u64, started: Instant, outcome: &Outcome) {
    let ok = !matches!(outcome, Outcome::Error(_));
    let bytes = match kind {
        CmdKind::Read | CmdKind::Write | CmdKind::Trim | CmdKind::WriteZeroes if ok => payload,
        _ => 0,
    };
    e.record(kind, bytes, started.elapsed(), ok);
}

/// The writer's side of a connection: the requests it finishes and the
/// replies ready to go.
struct Replies<E> {
    rx: mpsc::UnboundedReceiver<Message<E>>,
    /// The reader is gone: no more requests will come.
    closed: bool,
    inflight: FuturesUnordered<InFlight<E>>,
    ready: Vec<Reply>,
}

impl<E: Export> Replies<E> {
    /// Takes whatever has arrived and every request that has finished,
    /// registering `cx` to be woken by the next of either. The reader's
    /// requests are polled here right away: their first poll (on the
    /// reader) had no waker.
    fn take_in(&mut self, cx: &mut Context<'_>) {
        while !self.closed {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(m)) => {
                    self.ready.extend(m.replies);
                    self.inflight.extend(m.pending);
                }
                Poll::Ready(None) => self.closed = true,
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(r)) = self.inflight.poll_next_unpin(cx) {
            self.ready.push(r);
        }
    }

    fn done(&self) -> bool {
        self.closed && self.inflight.is_empty()
    }

    /// The client is gone: no more replies, but every request that started
    /// still finishes (a mirrored write must settle its links).
    async fn finish_unanswered(&mut self) {
        self.rx.close();
        while let Some(m) = self.rx.recv().await {
            self.inflight.extend(m.pending);
        }
        self.closed = true;
        while self.inflight.next().await.is_some() {}
    }
}

/// Sends replies: waits until one is ready, takes every one that is, sends
/// them with one vectored write, and keeps taking in while that write waits.
async fn writer_loop<E: Export, W: AsyncWrite + Unpin>(
    mut wr: W,
    rx: mpsc::UnboundedReceiver<Message<E>>,
    structured: bool,
) -> io::Result<()> {
    let mut hdr = BytesMut::with_capacity(64 * 1024);
    let mut segs: Vec<Bytes> = Vec::new();
    // Replies written but whose permits are released only after the write.
    let mut sent: Vec<Reply> = Vec::new();
    let mut q = Replies {
        rx,
        closed: false,
        inflight: FuturesUnordered::new(),
        ready: Vec::new(),
    };
    loop {
        poll_fn(|cx| {
            q.take_in(cx);
            if q.ready.is_empty() && !q.done() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        if q.ready.is_empty() {
            break; // The reader is gone and every request has been answered.
        }
        for r in q.ready.drain(..) {
            encode_reply(&r, structured, &mut hdr, &mut segs);
            sent.push(r);
        }
        if !hdr.is_empty() {
            segs.push(hdr.split().freeze());
        }
        let result = {
            let mut write = std::pin::pin!(write_all_vectored(&mut wr, &mut segs));
            poll_fn(|cx| {
                if let Poll::Ready(r) = write.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                q.take_in(cx);
                Poll::Pending
            })
            .await
        };
        sent.clear();
        if let Err(e) = result {
            q.ready.clear();
            q.finish_unanswered().await;
            return Err(e);
        }
    }
    wr.flush().await?;
    let _ = wr.shutdown().await;
    Ok(())
}

/// Appends a reply's bytes: small parts into `hdr`, large data as its own
/// segment (after moving what `hdr` holds so far into `segs`, keeping order).
/// Returns the bytes added as separate segments.
fn encode_reply(r: &Reply, structured: bool, hdr: &mut BytesMut, segs: &mut Vec<Bytes>) -> usize {
    let read_like = r.kind == CMD_READ || r.kind == CMD_BLOCK_STATUS;
    match &r.outcome {
        Outcome::Error(errno) if structured && read_like => {
            encode_error_chunk(hdr, r.cookie, *errno, "");
            0
        }
        Outcome::Error(errno) => {
            encode_simple_reply(hdr, r.cookie, errno.code());
            0
        }
        Outcome::Done => {
            encode_simple_reply(hdr, r.cookie, 0);
            0
        }
        Outcome::Data(d) => {
            if structured {
                let len = 8 + d.len() as u32;
                encode_chunk_header(hdr, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.cookie, len);
                hdr.put_u64(r.offset);
            } else {
                encode_simple_reply(hdr, r.cookie, 0);
            }
            if d.len() < COPY_THRESHOLD {
                hdr.put_slice(d);
                0
            } else {
                segs.push(hdr.split().freeze());
                segs.push(d.clone());
                d.len()
            }
        }
        Outcome::Extents(x) => {
            let len = 4 + 8 * x.len() as u32;
            encode_chunk_header(hdr, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.cookie, len);
            hdr.put_u32(BASE_ALLOCATION_ID);
            for e in x {
                hdr.put_u32(e.len);
                hdr.put_u32(e.flags);
            }
            0
        }
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    segs: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    while first < segs.len() {
        let slices: Vec<IoSlice<'_>> = segs[first..]
            .iter()
            .take(64)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let s = &mut segs[first];
            if n >= s.len() {
                n -= s.len();
                first += 1;
            } else {
                s.advance(n);
                n = 0;
            }
        }
        while first < segs.len() && segs[first].is_empty() {
            first += 1;
        }
    }
    segs.clear();
    Ok(())
}
