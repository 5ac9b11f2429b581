//! The primary's side of one mirror: its connection, its requests in flight,
//! its out-of-sync bitmap and its state.
//!
//! Seed 004's write detour, per mirror: [`MirrorLink::prepare`] creates the
//! mirror request before the local I/O starts; [`Prepared::send`] sends it
//! only once the local I/O succeeded (or [`Prepared::abandon`] marks the
//! region instead); the caller then waits for the acknowledgement.
//!
//! A link has a connection epoch. Every request belongs to the epoch it was
//! sent in; when the connection fails, every request of that epoch fails at
//! once and its region is marked out of sync, and acknowledgements of an
//! older epoch can never be mistaken for new ones (request ids also never
//! repeat). A watchdog fails the connection when a request has been
//! outstanding longer than the mirror timeout (seed 004's monitor).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use blockmirror_core::activity::{ActivityError, ActivityLog, Begin};
use blockmirror_core::bitmap::Bitmap;
use blockmirror_core::rate::TokenBucket;
use blockmirror_core::{compare_generations, resync_basis, Generations, Relation, ResyncBasis};
use blockmirror_repl::{
    Codec, EncodedWrite, Frame, FrameReader, FrameWriter, NodeHello, PeerInfo, SyncPhase,
    VolumeIdentity,
};
use blockmirror_storage::Backend;
use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::group::SiteGroup;
use super::locks::RangeLocks;
use super::GenState;
use crate::daemon::config::{InitialSync, LagPolicy, MirrorConfig, MirrorMode, ResyncConfig};
use crate::primary::oos_store::OosStore;

/// The live link asks the mirror to flush this often when it has written
/// since the last flush, so that what a mirror crash can lose stays small.
const PERIODIC_FLUSH: Duration = Duration::from_secs(1);
/// The bitmap is stored this often when it changed.
const BITMAP_STORE_INTERVAL: Duration = Duration::from_secs(5);

/// How long connecting plus the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the mirror may take to report its divergent regions after the
/// handshake.
const DIVERGENCE_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Catch-up copies this much per request.
const CATCH_UP_CHUNK: u64 = 1024 * 1024;
/// Catch-up copies regions that may or may not differ (what a returning
/// peer reported) in pieces this large, each hashed first: a 4 KiB
/// difference then costs 64 KiB on the wire, not a whole chunk (measured:
/// a failback after a crash under fio sent 13.6 MiB of them with 1 MiB
/// pieces).
const MAYBE_CHUNK: u64 = 64 * 1024;
/// Catch-up requests in flight at once.
const CATCH_UP_WINDOW: usize = 16;
/// An iterative initial sync whose passes never leave less than the
/// threshold (host writes outpace the copy) goes live after this many.
const MAX_PASSES: u32 = 8;
/// The resync rate limiter lets this much go at once.
const RATE_BURST: u64 = 4 * CATCH_UP_CHUNK;
/// Final copies cut short by `resync_max_suspension` before it goes live.
const MAX_SUSPENSION_ATTEMPTS: u32 = 3;

/// The connection, as /status spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    Connected,
    Connecting,
    Disconnected,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Connected => "connected",
            Connection::Connecting => "connecting",
            Connection::Disconnected => "disconnected",
        }
    }
}

/// The mirror's data state, as /status spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    InSync,
    Resyncing,
    Degraded,
    /// Async with lag_policy "bitmap": writes past the lag bound were
    /// recorded instead of sent, so the mirror lacks some that later ones
    /// may depend on, until a resync copies them.
    Inconsistent,
    /// Automatic resync refused: the peer was promoted (it is ahead), or
    /// its data is unrelated. Nothing is copied.
    Suspended,
    /// Both sides were written since they last agreed. Nothing is copied
    /// until an operator discards one side (`resync --discard-local`).
    SplitBrain,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::InSync => "in_sync",
            SyncState::Resyncing => "resyncing",
            SyncState::Degraded => "degraded",
            SyncState::Inconsistent => "inconsistent",
            SyncState::Suspended => "suspended",
            SyncState::SplitBrain => "split_brain",
        }
    }
}

/// What a mirror operation does.
#[derive(Debug, Clone)]
pub enum MirrorOp {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    },
    Flush,
    /// A liveness probe on an idle link (answered by Pong).
    Ping,
    /// Asks the mirror for the BLAKE3 hash of a range (checksum resync).
    Hash {
        offset: u64,
        len: u32,
    },
    /// Tells the mirror a resync starts, or that it is in sync at a generation.
    SyncState {
        phase: SyncPhase,
        generations: Generations,
    },
}

impl MirrorOp {
    /// The byte range the operation changes (empty for FLUSH).
    pub fn range(&self) -> (u64, u64) {
        match self {
            MirrorOp::Write { offset, data, .. } => (*offset, data.len() as u64),
            MirrorOp::Trim { offset, len, .. } | MirrorOp::WriteZeroes { offset, len, .. } => {
                (*offset, u64::from(*len))
            }
            MirrorOp::Flush
            | MirrorOp::Ping
            | MirrorOp::Hash { .. }
            | MirrorOp::SyncState { .. } => (0, 0),
        }
    }

    fn frame(&self, id: u64) -> Frame {
        match self.clone() {
            MirrorOp::Write { offset, data, fua } => Frame::Write {
                id,
                offset,
                fua,
                data,
            },
            MirrorOp::Trim { offset, len, fua } => Frame::Trim {
                id,
                offset,
                len,
                fua,
            },
            MirrorOp::WriteZeroes {
                offset,
                len,
                fua,
                may_trim,
            } => Frame::WriteZeroes {
                id,
                offset,
                len,
                fua,
                may_trim,
            },
            MirrorOp::Flush => Frame::Flush { id },
            MirrorOp::Ping => Frame::Ping { id },
            MirrorOp::Hash { offset, len } => Frame::HashRequest { id, offset, len },
            MirrorOp::SyncState { phase, generations } => Frame::SyncState {
                id,
                phase,
                generation: generations.current,
                history: generations.history,
            },
        }
    }
}

/// Why a mirror did not take a request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("mirror {peer}: {reason}")]
pub struct MirrorFailure {
    pub peer: String,
    pub reason: String,
}

/// What the sender task writes: a frame, or a Write whose data the
/// pipeline (or the caller) already made ready for the wire.
pub(crate) enum Outgoing {
    Frame(Frame),
    Encoded {
        id: u64,
        offset: u64,
        fua: bool,
        write: EncodedWrite,
    },
}

struct Pending {
    offset: u64,
    len: u64,
    bytes: u64,
    flush: bool,
    /// An async write: its activity-log range ends when the mirror has it
    /// (acknowledged, or marked on failure), not when the host is answered.
    al_end: Option<Arc<AlEnd>>,
    sent: Option<Instant>,
    done: oneshot::Sender<Result<(), MirrorFailure>>,
}

/// An activity-log range held for an async write until every request that
/// carries it is gone from the link (acknowledged, or failed and marked).
pub(crate) struct AlEnd {
    remaining: std::sync::atomic::AtomicUsize,
    offset: u64,
    len: u64,
}

struct Shared {
    connection: Connection,
    state: SyncState,
    epoch: u64,
    /// The sender task's queue while connected.
    tx: Option<mpsc::UnboundedSender<Outgoing>>,
    /// Cancels the current connection's tasks.
    conn_cancel: Option<CancellationToken>,
    inflight: BTreeMap<u64, Pending>,
    /// Write data of `inflight` that was sent: an async link's lag in bytes.
    inflight_bytes: u64,
    /// What the mirror may lack. Persisted lazily; the activity log covers
    /// the regions marked since the last store.
    bitmap: Bitmap,
    /// `bitmap.changes()` when it was last stored.
    stored_changes: u64,
    /// The extents where writes may be in flight (durable before they start).
    al: ActivityLog,
    /// Regions the mirror acknowledged since the last FLUSH was sent: lost
    /// if the mirror crashes before it flushes, so marked if the link fails.
    unflushed: Bitmap,
    /// The same for FLUSHes sent and not yet acknowledged, by request id.
    flushing: VecDeque<(u64, Bitmap)>,
    peer_node: Option<String>,
    resync_done: u64,
    resync_total: u64,
    last_error: Option<String>,
    /// The generation check found a blank mirror: fill it from scratch.
    fill_from_scratch: bool,
    /// An iterative initial sync is running: host writes only mark the
    /// bitmap (the change mask), they are not sent.
    copy_only: bool,
    /// Passes of the current (or last) iterative initial sync.
    passes: u32,
    /// How long the last final copy held host writes.
    last_suspension: Option<Duration>,
    /// Marked regions the mirror only *may* lack (what it reported of its
    /// own after a crash, or everything when nothing records how it
    /// differs): the catch-up hashes them on both sides before sending.
    /// Regions marked here for this primary's own writes are sent at once.
    maybe: Option<Bitmap>,
}

/// Counters for /metrics.
#[derive(Default)]
pub struct LinkCounters {
    pub bytes_replicated: AtomicU64,
    pub requests_acked: AtomicU64,
    pub reconnects: AtomicU64,
    pub failures: AtomicU64,
    pub resync_bytes: AtomicU64,
    /// Bytes of Write data handed to the sender, before compression.
    pub data_bytes: AtomicU64,
    /// The same Write data as it goes on the wire (after compression).
    pub wire_bytes: AtomicU64,
    /// Async: host writes answered without waiting for this mirror.
    pub async_unwaited: AtomicU64,
    /// Async: host writes that waited because the lag was past its bound.
    pub throttled: AtomicU64,
    /// Host writes suspended, summed over final copies, in microseconds.
    pub suspended_us: AtomicU64,
    pub suspensions: AtomicU64,
    /// Bytes a checksum resync found equal on the mirror and did not send.
    pub resync_skipped_bytes: AtomicU64,
    /// Bytes the mirror reported as its own divergent writes (a returning
    /// old primary's, at failback), added to what is copied.
    pub divergent_bytes: AtomicU64,
    /// Catch-up chunks whose local read failed (they stay marked).
    pub catch_up_read_failures: AtomicU64,
}

/// A point-in-time view of a link, for /status and /metrics.
#[derive(Debug, Clone)]
pub struct LinkSnapshot {
    pub peer: String,
    pub mode: MirrorMode,
    pub connection: Connection,
    pub state: SyncState,
    pub peer_node: Option<String>,
    pub out_of_sync_bytes: u64,
    pub inflight: usize,
    pub oldest_inflight: Option<Duration>,
    /// Async lag: write data not yet acknowledged by the mirror, and the
    /// age of the oldest unacknowledged write (the RPO right now).
    pub lag_bytes: u64,
    pub lag: Duration,
    pub resync_done: u64,
    pub resync_total: u64,
    pub last_error: Option<String>,
    pub passes: u32,
    pub last_suspension: Option<Duration>,
    pub resync_rate: u64,
}

/// A link's timing settings from its volume's config.
#[derive(Debug, Clone, Copy)]
pub struct LinkTuning {
    /// `mirror_timeout`: a request unanswered this long fails the link.
    pub timeout: Duration,
    pub resync: ResyncConfig,
}

/// One mirror of one primary volume.
pub struct MirrorLink {
    pub peer: String,
    addr: SocketAddr,
    /// sync or async, switchable while running ([`MirrorLink::set_mode`]).
    mode: AtomicU8,
    max_lag_bytes: u64,
    max_lag: Duration,
    pub lag_policy: LagPolicy,
    /// Async: epochs are flushed on the mirror (`durable_barriers`).
    durable_barriers: bool,
    /// Async: a write was answered to the host since the last epoch
    /// barrier, so the next write sent must start a new epoch.
    completed: AtomicBool,
    /// Barriers sent (epochs closed), for /metrics.
    pub barriers: AtomicU64,
    /// What the link runs with, kept to start a catch-up from the write path.
    ctx: std::sync::OnceLock<LinkContext>,
    /// How this link compresses Write data.
    pub compression: Codec,
    volume: String,
    timeout: Duration,
    next_id: AtomicU64,
    shared: Mutex<Shared>,
    /// Wakes writes waiting on the activity log.
    al_wake: tokio::sync::Notify,
    store: Arc<OosStore>,
    /// This link's consistency group at its site, if the volume has one.
    group: std::sync::OnceLock<(Arc<SiteGroup>, usize)>,
    /// The primary's own backend: made durable before an activity-log
    /// eviction, so an evicted extent holds nothing the local disk could lose.
    local: Arc<dyn Backend>,
    pub counters: LinkCounters,
    resync: ResyncConfig,
    /// Paces the resync copy (`resync_rate`; 0: unlimited).
    bucket: Mutex<TokenBucket>,
    /// The bucket's clock.
    born: Instant,
    /// When a host write last came through, on the bucket's clock (ns + 1; 0: never).
    last_host_write: AtomicU64,
    /// HashReply payloads by request id, picked up by the copy that asked.
    hashes: Mutex<std::collections::HashMap<u64, [u8; 32]>>,
    /// False while the volume is a mirror on this node: the link stays
    /// disconnected (a dormant link, used once the volume is promoted).
    active: watch::Sender<bool>,
    /// Whether this link told the start gate it met its peer (once).
    reported: AtomicBool,
}

/// Why a write could not be protected by the activity log.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("volume {volume}, mirror {peer}: recording the write's extent failed: {reason}")]
    Store {
        volume: String,
        peer: String,
        reason: String,
    },
}

/// A mirror request created before the local I/O.
pub enum Prepared {
    /// Registered on a live connection; not yet sent.
    Live {
        id: u64,
        epoch: u64,
        rx: oneshot::Receiver<Result<(), MirrorFailure>>,
    },
    /// The mirror is not reachable: the region was marked out of sync.
    Marked,
    /// An iterative initial sync runs: the region was marked in its change
    /// mask and will be copied by it. Not a failure.
    Deferred,
}

/// The sending half of a [`Prepared::Live`] request: what the pipeline
/// carries to the point where the request is released to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    id: u64,
    epoch: u64,
}

impl Ticket {
    /// A ticket for request `id` of connection `epoch`, for tests of what
    /// carries tickets (the pipeline).
    #[cfg(test)]
    pub(crate) fn for_test(id: u64, epoch: u64) -> Ticket {
        Ticket { id, epoch }
    }

    #[cfg(test)]
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Prepared {
    /// The sending half, without giving the request up.
    pub fn ticket(&self) -> Option<Ticket> {
        match self {
            Prepared::Live { id, epoch, .. } => Some(Ticket {
                id: *id,
                epoch: *epoch,
            }),
            Prepared::Marked | Prepared::Deferred => None,
        }
    }

    /// Splits a request into what sends it (None when the region was
    /// marked instead) and what waits for its acknowledgement.
    pub fn split(self) -> (Option<Ticket>, Sent) {
        match self {
            Prepared::Live { id, epoch, rx } => (Some(Ticket { id, epoch }), Sent::Waiting(rx)),
            Prepared::Marked => (None, Sent::Marked),
            Prepared::Deferred => (None, Sent::Deferred),
        }
    }
}

/// A request sent (or marked), to be waited for.
pub enum Sent {
    Waiting(oneshot::Receiver<Result<(), MirrorFailure>>),
    Marked,
    /// See [`Prepared::Deferred`].
    Deferred,
}

impl MirrorLink {
    /// A link that starts disconnected, with the bitmap recovered from its
    /// store (everything, for a new mirror).
    pub fn new(
        volume: &str,
        cfg: &MirrorConfig,
        tuning: LinkTuning,
        bitmap: Bitmap,
        al: ActivityLog,
        store: Arc<OosStore>,
        local: Arc<dyn Backend>,
    ) -> Self {
        let unflushed = empty_like(&bitmap);
        let stored_changes = bitmap.changes();
        Self {
            peer: cfg.peer.clone(),
            addr: cfg.addr,
            mode: AtomicU8::new(mode_code(cfg.mode)),
            max_lag_bytes: cfg.max_lag_bytes,
            max_lag: cfg.max_lag,
            lag_policy: cfg.lag_policy,
            durable_barriers: cfg.durable_barriers,
            completed: AtomicBool::new(false),
            barriers: AtomicU64::new(0),
            ctx: std::sync::OnceLock::new(),
            compression: cfg.compression,
            volume: volume.to_owned(),
            timeout: tuning.timeout,
            next_id: AtomicU64::new(1),
            shared: Mutex::new(Shared {
                connection: Connection::Disconnected,
                state: SyncState::Degraded,
                epoch: 0,
                tx: None,
                conn_cancel: None,
                inflight: BTreeMap::new(),
                inflight_bytes: 0,
                bitmap,
                stored_changes,
                al,
                unflushed,
                flushing: VecDeque::new(),
                peer_node: None,
                resync_done: 0,
                resync_total: 0,
                last_error: None,
                fill_from_scratch: false,
                copy_only: false,
                passes: 0,
                last_suspension: None,
                maybe: None,
            }),
            resync: tuning.resync,
            bucket: Mutex::new(TokenBucket::new(tuning.resync.rate, RATE_BURST, 0)),
            born: Instant::now(),
            hashes: Mutex::new(std::collections::HashMap::new()),
            last_host_write: AtomicU64::new(0),
            active: watch::Sender::new(true),
            reported: AtomicBool::new(false),
            counters: LinkCounters::default(),
            al_wake: tokio::sync::Notify::new(),
            group: std::sync::OnceLock::new(),
            store,
            local,
        }
    }

    /// Makes sure the extents of `[offset, offset+len)` are durably active
    /// before a write there starts (DRBD's activity log). Usually nothing to
    /// do; otherwise one small synchronous metadata write, shared by the
    /// writes batched with it. Every successful call is paired with
    /// [`MirrorLink::end`].
    pub async fn activate(&self, offset: u64, len: u64) -> Result<(), ActivateError> {
        loop {
            let notified = self.al_wake.notified();
            tokio::pin!(notified);
            // Decide under the lock; act (wait, store) after releasing it.
            enum Next {
                Ready,
                Wait,
                Commit(blockmirror_core::activity::Transaction, Option<Bitmap>),
                StoreBitmap(Bitmap),
                Fail(String),
            }
            let next = {
                let mut sh = self.shared();
                match sh.al.begin(offset, len) {
                    Ok(Begin::Ready) => Next::Ready,
                    Ok(Begin::Wait(_)) => {
                        notified.as_mut().enable();
                        Next::Wait
                    }
                    Ok(Begin::NeedsCommit(tx)) => {
                        // Marks made while an evicted extent was active are
                        // covered only by the log: store the bitmap first.
                        let bitmap = (!tx.evicted().is_empty()
                            && sh.bitmap.changes() != sh.stored_changes)
                            .then(|| sh.bitmap.clone());
                        Next::Commit(tx, bitmap)
                    }
                    Err(ActivityError::SpanTooLarge { .. }) => {
                        // A huge TRIM or zeroing: record it in the bitmap
                        // durably instead; the resync after a crash copies it.
                        sh.bitmap.mark(offset, len);
                        Next::StoreBitmap(sh.bitmap.clone())
                    }
                    Err(e) => Next::Fail(e.to_string()),
                }
            };
            let (tx, bitmap) = match next {
                Next::Ready => return Ok(()),
                Next::Wait => {
                    notified.await;
                    continue;
                }
                Next::StoreBitmap(bm) => return self.store_bitmap_now(bm).await,
                Next::Fail(reason) => return Err(self.store_error(reason)),
                Next::Commit(tx, bitmap) => (tx, bitmap),
            };
            let evicting = !tx.evicted().is_empty();
            let (store, local) = (self.store.clone(), self.local.clone());
            let changes = bitmap.as_ref().map(Bitmap::changes);
            let joined = tokio::task::spawn_blocking(move || {
                let r = (|| {
                    if evicting {
                        local.flush().map_err(|e| e.to_string())?;
                    }
                    if let Some(bm) = &bitmap {
                        store.store_bitmap(bm).map_err(|e| e.to_string())?;
                    }
                    store.commit_activity(&tx).map_err(|e| e.to_string())
                })();
                (tx, r)
            })
            .await;
            let mut sh = self.shared();
            let outcome = match joined {
                Ok((tx, Ok(()))) => {
                    if let Some(c) = changes {
                        sh.stored_changes = sh.stored_changes.max(c);
                    }
                    sh.al
                        .committed(tx)
                        .map_err(|e| self.store_error(e.to_string()))
                }
                Ok((tx, Err(reason))) => {
                    warn!(volume = %self.volume, peer = %self.peer, %reason, "activity log commit failed");
                    let _ = sh.al.abort(tx);
                    Err(self.store_error(reason))
                }
                Err(join) => Err(self.store_error(join.to_string())),
            };
            drop(sh);
            self.al_wake.notify_waiters();
            return outcome;
        }
    }

    /// The write that [`MirrorLink::activate`] let through is complete here:
    /// acknowledged by the mirror, or recorded in the bitmap.
    pub fn end(&self, offset: u64, len: u64) {
        let freed = {
            let mut sh = self.shared();
            match sh.al.end(offset, len) {
                Ok(freed) => freed,
                Err(ActivityError::SpanTooLarge { .. }) => false,
                Err(e) => {
                    warn!(volume = %self.volume, peer = %self.peer, error = %e, "activity log end");
                    false
                }
            }
        };
        if freed {
            self.al_wake.notify_waiters();
        }
    }

    fn store_error(&self, reason: String) -> ActivateError {
        ActivateError::Store {
            volume: self.volume.clone(),
            peer: self.peer.clone(),
            reason,
        }
    }

    async fn store_bitmap_now(&self, bm: Bitmap) -> Result<(), ActivateError> {
        let store = self.store.clone();
        let changes = bm.changes();
        let r =
            tokio::task::spawn_blocking(move || store.store_bitmap(&bm).map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        match r {
            Ok(()) => {
                let mut sh = self.shared();
                sh.stored_changes = sh.stored_changes.max(changes);
                Ok(())
            }
            Err(reason) => Err(self.store_error(reason)),
        }
    }

    /// Stores the bitmap if it changed since the last store.
    pub async fn persist_bitmap(&self) -> Result<(), ActivateError> {
        let bm = {
            let sh = self.shared();
            if sh.bitmap.changes() == sh.stored_changes {
                return Ok(());
            }
            sh.bitmap.clone()
        };
        self.store_bitmap_now(bm).await
    }

    /// At a clean shutdown, after every write ended: stores the bitmap and
    /// a clean record, so the next start needs no crash recovery.
    pub fn close_clean(&self) -> Result<(), ActivateError> {
        let sh = self.shared();
        if !sh.al.is_idle() {
            return Err(self.store_error("writes still in flight at shutdown".into()));
        }
        let bm = sh.bitmap.clone();
        drop(sh);
        self.store
            .mark_clean_shutdown(&bm)
            .map_err(|e| self.store_error(e.to_string()))
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().expect("mirror link state poisoned")
    }

    /// True when host writes reach this mirror now.
    pub fn is_live(&self) -> bool {
        self.shared().tx.is_some()
    }

    /// Creates the mirror request for `[offset, offset+len)` before the local
    /// I/O starts. On a link that is down, marks the region instead.
    pub fn prepare(&self, offset: u64, len: u64) -> Prepared {
        let mut sh = self.shared();
        if sh.tx.is_none() {
            sh.bitmap.mark(offset, len);
            return Prepared::Marked;
        }
        if sh.copy_only {
            // Marked before the local I/O starts: a copy of this region that
            // is running now holds its range lock, so it finished before this
            // write started, and clears nothing this write marks.
            sh.bitmap.mark(offset, len);
            return Prepared::Deferred;
        }
        self.register(&mut sh, offset, len)
    }

    /// Registers a request on the live connection (the caller checked it).
    fn register(&self, sh: &mut Shared, offset: u64, len: u64) -> Prepared {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (done, rx) = oneshot::channel();
        let epoch = sh.epoch;
        sh.inflight.insert(
            id,
            Pending {
                offset,
                len,
                bytes: 0,
                flush: false,
                al_end: None,
                sent: None,
                done,
            },
        );
        Prepared::Live { id, epoch, rx }
    }

    /// Registers a FLUSH on a live link; None when the link is away. What
    /// the mirror acknowledged so far is covered by this FLUSH once it is
    /// acknowledged in turn.
    pub fn prepare_flush(&self) -> Option<Prepared> {
        let p = self.prepare_live(0, 0);
        let Prepared::Live { id, .. } = &p else {
            return None;
        };
        let mut sh = self.shared();
        if let Some(pending) = sh.inflight.get_mut(id) {
            pending.flush = true;
        }
        let fresh = empty_like(&sh.bitmap);
        let covered = std::mem::replace(&mut sh.unflushed, fresh);
        sh.flushing.push_back((*id, covered));
        Some(p)
    }

    /// Like [`MirrorLink::prepare`], but never marks.
    fn prepare_live(&self, offset: u64, len: u64) -> Prepared {
        if !self.is_live() {
            return Prepared::Marked;
        }
        self.prepare(offset, len)
    }

    /// Sends a prepared request (the local I/O succeeded). A Write on a
    /// link with compression is compressed here, on the caller's task: the
    /// path of writes no larger than a track, which skip the pipeline.
    pub fn send(&self, p: Prepared, op: &MirrorOp) -> Sent {
        let (ticket, sent) = p.split();
        let Some(ticket) = ticket else {
            // Marked, or deferred to a running initial sync.
            return sent;
        };
        let ok = match op {
            MirrorOp::Write { offset, data, fua } if self.compression != Codec::None => {
                let write = EncodedWrite::new(data.clone(), self.compression);
                self.send_encoded(ticket, *offset, *fua, write)
            }
            _ => self.send_outgoing(ticket, op.range(), |id| Outgoing::Frame(op.frame(id))),
        };
        if ok {
            sent
        } else {
            Sent::Marked
        }
    }

    /// Sends a Write whose data is ready for the wire; false (the region
    /// marked) when the connection failed since the request was prepared.
    pub fn send_encoded(&self, t: Ticket, offset: u64, fua: bool, write: EncodedWrite) -> bool {
        let range = (offset, u64::from(write.len));
        self.send_outgoing(t, range, |id| Outgoing::Encoded {
            id,
            offset,
            fua,
            write,
        })
    }

    fn send_outgoing(
        &self,
        t: Ticket,
        (off, len): (u64, u64),
        make: impl FnOnce(u64) -> Outgoing,
    ) -> bool {
        let Ticket { id, epoch } = t;
        let mut sh = self.shared();
        if sh.epoch == epoch && sh.inflight.contains_key(&id) {
            if let Some(tx) = sh.tx.clone() {
                if len > 0 && self.is_async() && self.completed.swap(false, SeqCst) {
                    // A write was answered since the last barrier: this one
                    // may depend on it, so it starts a new epoch (DESIGN.md
                    // guarantee 2). Under the lock, so no send overtakes it.
                    self.send_barrier(&sh, &tx);
                }
                let p = sh.inflight.get_mut(&id).expect("checked above");
                p.sent = Some(Instant::now());
                let out = make(id);
                match &out {
                    Outgoing::Frame(Frame::Write { data, .. }) => {
                        p.bytes = data.len() as u64;
                        self.counters.data_bytes.fetch_add(p.bytes, Relaxed);
                        self.counters.wire_bytes.fetch_add(p.bytes, Relaxed);
                    }
                    Outgoing::Encoded { write, .. } => {
                        p.bytes = u64::from(write.len);
                        self.counters.data_bytes.fetch_add(p.bytes, Relaxed);
                        let wire = write.wire_len() as u64;
                        self.counters.wire_bytes.fetch_add(wire, Relaxed);
                    }
                    Outgoing::Frame(_) => {}
                }
                let bytes = p.bytes;
                if tx.send(out).is_ok() {
                    sh.inflight_bytes += bytes;
                    return true;
                }
            }
        }
        // The connection failed between prepare and send: its failure
        // already marked the region (the entry was in flight) or will not
        // see it, so mark it here too.
        sh.bitmap.mark(off, len);
        if let Some(mut p) = sh.inflight.remove(&id) {
            sh.inflight_bytes -= p.bytes;
            if Self::release_al(&mut sh, p.al_end.take()) {
                drop(sh);
                self.al_wake.notify_waiters();
            }
        }
        false
    }

    /// Queues an epoch barrier. It has id 0: the mirror does not answer
    /// it (nothing waits for an epoch to lift; the writes after it are what
    /// the primary tracks), which keeps a barrier per write cheap. Taking
    /// the link's state shows the caller holds its lock: no other send can
    /// come between the barrier and the write it goes before.
    fn send_barrier(&self, _locked: &Shared, tx: &mpsc::UnboundedSender<Outgoing>) {
        if tx
            .send(Outgoing::Frame(Frame::Barrier {
                id: 0,
                durable: self.durable_barriers,
            }))
            .is_ok()
        {
            self.barriers.fetch_add(1, Relaxed);
        }
    }

    /// sync or async now.
    pub fn mode(&self) -> MirrorMode {
        if self.mode.load(SeqCst) == mode_code(MirrorMode::Async) {
            MirrorMode::Async
        } else {
            MirrorMode::Sync
        }
    }

    pub fn is_async(&self) -> bool {
        self.mode() == MirrorMode::Async
    }

    /// Switches between sync and async while running. Nothing is lost or
    /// reordered: every request goes through the same ordered queue either
    /// way. From async to sync, the writes still in flight keep their async
    /// promise (crash-consistent order); new writes wait for the mirror. A
    /// barrier goes before the first write after the switch if an async
    /// write was answered before it.
    pub fn set_mode(&self, mode: MirrorMode) {
        let old = self.mode.swap(mode_code(mode), SeqCst);
        if old != mode_code(mode) {
            info!(volume = %self.volume, peer = %self.peer, mode = mode.as_str(), "mirror mode changed");
            if mode == MirrorMode::Sync && self.completed.swap(false, SeqCst) {
                let sh = self.shared();
                if let Some(tx) = sh.tx.clone() {
                    self.send_barrier(&sh, &tx);
                }
            }
        }
    }

    /// Async: a write sent on this link was answered to the host. The next
    /// write sent starts a new epoch.
    pub fn completed(&self) {
        self.completed.store(true, SeqCst);
    }

    /// Async: true while the lag is past `max_lag_bytes` or the oldest
    /// unacknowledged write is older than `max_lag_seconds`.
    pub fn over_lag(&self) -> bool {
        let sh = self.shared();
        if sh.inflight_bytes > self.max_lag_bytes {
            return true;
        }
        sh.inflight
            .values()
            .find(|p| p.len > 0 && p.sent.is_some())
            .and_then(|p| p.sent)
            .is_some_and(|t| t.elapsed() > self.max_lag)
    }

    /// Async, lag_policy "bitmap": a write past the bound was recorded
    /// instead of sent. The mirror is inconsistent until a resync.
    pub fn mark_inconsistent(&self, offset: u64, len: u64) {
        let mut sh = self.shared();
        sh.bitmap.mark(offset, len);
        // A catch-up already running (resyncing) picks the new marks up.
        if sh.tx.is_some() && sh.state == SyncState::InSync {
            warn!(volume = %self.volume, peer = %self.peer, lag_bytes = sh.inflight_bytes,
                "async mirror past its lag bound: recording writes for resync; mirror inconsistent");
            sh.state = SyncState::Inconsistent;
        }
    }

    /// Async, lag_policy "bitmap": once the lag is back under the bound,
    /// copies what was recorded (the mirror is "resyncing" meanwhile and in
    /// sync, consistent again, when done).
    pub fn resync_if_recovered(self: &Arc<Self>) {
        let start = {
            let mut sh = self.shared();
            match (&sh.tx, &sh.conn_cancel, sh.state) {
                (Some(_), Some(cancel), SyncState::Inconsistent) => {
                    let cancel = cancel.clone();
                    sh.state = SyncState::Resyncing;
                    Some((sh.epoch, cancel))
                }
                _ => None,
            }
        };
        if let (Some((epoch, cancel)), Some(ctx)) = (start, self.ctx.get()) {
            info!(volume = %self.volume, peer = %self.peer, "async mirror lag back under its bound: resyncing what was recorded");
            tokio::spawn(self.clone().catch_up(epoch, ctx.clone(), cancel));
        }
    }

    /// The link's state now.
    pub fn state(&self) -> SyncState {
        self.shared().state
    }

    /// Async: hands the activity-log end of `[offset, offset+len)` (what
    /// [`MirrorLink::activate`] let through) to the requests `tickets`: the
    /// range ends when the last of them is acknowledged or failed. False
    /// (the caller ends it) when none of them is still in flight.
    pub fn end_when_done(&self, tickets: &[Ticket], offset: u64, len: u64) -> bool {
        let mut sh = self.shared();
        let live: Vec<u64> = tickets
            .iter()
            .filter(|t| t.epoch == sh.epoch && sh.inflight.contains_key(&t.id))
            .map(|t| t.id)
            .collect();
        if live.is_empty() {
            return false;
        }
        let guard = Arc::new(AlEnd {
            remaining: std::sync::atomic::AtomicUsize::new(live.len()),
            offset,
            len,
        });
        for id in live {
            if let Some(p) = sh.inflight.get_mut(&id) {
                p.al_end = Some(guard.clone());
            }
        }
        true
    }

    /// A request carrying an activity-log end left the link: ends the range
    /// when it was the last. True when an extent was freed.
    fn release_al(sh: &mut Shared, g: Option<Arc<AlEnd>>) -> bool {
        match g {
            Some(g) if g.remaining.fetch_sub(1, SeqCst) == 1 => {
                sh.al.end(g.offset, g.len).unwrap_or(false)
            }
            _ => false,
        }
    }

    /// The local I/O failed: the request is never sent. The caller marks
    /// the region (see [`MirrorLink::abandon`]).
    pub fn abandon_ticket(&self, t: Ticket) {
        self.shared().inflight.remove(&t.id);
    }

    /// The local I/O failed: nothing is sent, and the region is marked,
    /// since the local disk may now differ from the mirror.
    pub fn abandon(&self, p: Prepared, offset: u64, len: u64) {
        let mut sh = self.shared();
        if let Prepared::Live { id, .. } = p {
            sh.inflight.remove(&id);
        }
        sh.bitmap.mark(offset, len);
    }

    /// Waits for a sent request. The watchdog bounds the wait.
    pub async fn wait(&self, s: Sent) -> Result<(), MirrorFailure> {
        match s {
            Sent::Deferred => Ok(()),
            Sent::Marked => Err(self.failure("not connected; change recorded for resync")),
            Sent::Waiting(rx) => rx
                .await
                .unwrap_or_else(|_| Err(self.failure("request dropped"))),
        }
    }

    fn failure(&self, reason: impl Into<String>) -> MirrorFailure {
        MirrorFailure {
            peer: self.peer.clone(),
            reason: reason.into(),
        }
    }

    /// Fails the connection of `epoch`: every request in flight fails and
    /// its region is marked; the link is degraded until it reconnects and
    /// catches up.
    pub fn fail(&self, epoch: u64, reason: &str) {
        self.fail_inner(Some(epoch), reason, true, false);
    }

    /// A sibling in this link's consistency group lost its mirror: cut this
    /// link too (whatever its epoch), without propagating further.
    pub fn suspend_for_group(&self, reason: &str) {
        self.fail_inner(None, reason, false, false);
    }

    /// The node is shutting down: the link closes as a failure would (its
    /// requests fail and are marked), but that is expected, not reported.
    fn close_for_shutdown(&self, epoch: u64) {
        self.fail_inner(Some(epoch), "node shutting down", false, true);
    }

    fn fail_inner(&self, epoch: Option<u64>, reason: &str, propagate: bool, expected: bool) {
        let mut freed = false;
        let inflight = {
            let mut sh = self.shared();
            if epoch.is_some_and(|e| e != sh.epoch) || sh.conn_cancel.is_none() {
                return;
            }
            if let Some(c) = sh.conn_cancel.take() {
                c.cancel();
            }
            sh.epoch += 1;
            sh.connection = Connection::Disconnected;
            sh.last_error = Some(reason.to_owned());
            if std::mem::take(&mut sh.copy_only) {
                // Still blank in parts: the next connection fills it again.
                sh.fill_from_scratch = true;
            }
            if sh.tx.take().is_none() {
                // Connected but not yet live (waiting for its group): nothing
                // was sent on this connection.
                return;
            }
            if expected {
                info!(volume = %self.volume, peer = %self.peer, inflight = sh.inflight.len(), %reason, "mirror link closed");
            } else {
                warn!(volume = %self.volume, peer = %self.peer, %reason, inflight = sh.inflight.len(), "mirror link failed; degraded");
                self.counters.failures.fetch_add(1, Relaxed);
            }
            sh.state = SyncState::Degraded;
            let mut inflight = std::mem::take(&mut sh.inflight);
            sh.inflight_bytes = 0;
            for p in inflight.values_mut() {
                sh.bitmap.mark(p.offset, p.len);
                // Marked: the async write's extent may end.
                if Self::release_al(&mut sh, p.al_end.take()) {
                    freed = true;
                }
            }
            // Acknowledged but perhaps not durable on the mirror.
            let fresh = empty_like(&sh.bitmap);
            let unflushed = std::mem::replace(&mut sh.unflushed, fresh);
            let flushing = std::mem::take(&mut sh.flushing);
            for b in std::iter::once(&unflushed).chain(flushing.iter().map(|(_, b)| b)) {
                sh.bitmap.union_with(b).expect("same shape");
            }
            inflight
        };
        // The group is cut before any failed write is answered to the host:
        // no write that depends on one of these can reach the site.
        if propagate {
            if let Some((group, idx)) = self.group.get() {
                group.suspend(
                    *idx,
                    &format!("volume {} lost its mirror: {reason}", self.volume),
                );
            }
        }
        if freed {
            self.al_wake.notify_waiters();
        }
        for (_, p) in inflight {
            let _ = p.done.send(Err(self.failure(reason)));
        }
    }

    /// Puts this link in a consistency group (once, before it runs).
    pub fn set_group(&self, group: Arc<SiteGroup>, idx: usize) {
        let _ = self.group.set((group, idx));
    }

    /// Settles acknowledged requests under one lock, then completes their
    /// waiters outside it.
    fn acked(&self, ids: &[u64], epoch: u64) {
        let mut done = Vec::with_capacity(ids.len());
        let mut freed = false;
        {
            let mut sh = self.shared();
            if sh.epoch != epoch {
                return;
            }
            for &id in ids {
                let Some(mut p) = sh.inflight.remove(&id) else {
                    debug!(volume = %self.volume, peer = %self.peer, id, "acknowledgement for no request in flight; ignored");
                    continue;
                };
                if p.flush || p.len > 0 {
                    // Not a liveness probe.
                    self.counters.requests_acked.fetch_add(1, Relaxed);
                }
                self.counters.bytes_replicated.fetch_add(p.bytes, Relaxed);
                sh.inflight_bytes -= p.bytes;
                freed |= Self::release_al(&mut sh, p.al_end.take());
                if p.flush {
                    while sh.flushing.front().is_some_and(|(fid, _)| *fid <= id) {
                        sh.flushing.pop_front();
                    }
                } else if p.len > 0 {
                    sh.unflushed.mark(p.offset, p.len);
                }
                done.push(p.done);
            }
        }
        if freed {
            self.al_wake.notify_waiters();
        }
        for d in done {
            let _ = d.send(Ok(()));
        }
    }

    /// Marks a region out of sync (the caller knows the mirror may lack it).
    pub fn mark(&self, offset: u64, len: u64) {
        self.shared().bitmap.mark(offset, len);
    }

    pub fn snapshot(&self) -> LinkSnapshot {
        let sh = self.shared();
        let now = Instant::now();
        let oldest = sh
            .inflight
            .values()
            .filter_map(|p| p.sent)
            .min()
            .map(|t| now.saturating_duration_since(t));
        let lag = sh
            .inflight
            .values()
            .find(|p| p.len > 0 && p.sent.is_some())
            .and_then(|p| p.sent)
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        LinkSnapshot {
            peer: self.peer.clone(),
            mode: self.mode(),
            lag_bytes: sh.inflight_bytes,
            lag,
            connection: sh.connection,
            state: sh.state,
            peer_node: sh.peer_node.clone(),
            out_of_sync_bytes: sh.bitmap.dirty_bytes(),
            inflight: sh.inflight.len(),
            oldest_inflight: oldest,
            resync_done: sh.resync_done,
            resync_total: sh.resync_total,
            last_error: sh.last_error.clone(),
            passes: sh.passes,
            last_suspension: sh.last_suspension,
            resync_rate: self.resync_rate(),
        }
    }

    /// A copy of the out-of-sync bitmap (for persisting it).
    pub fn bitmap(&self) -> Bitmap {
        self.shared().bitmap.clone()
    }

    /// Connects, reconnects with backoff, catches up, until `shutdown`.
    pub async fn run(self: Arc<Self>, ctx: LinkContext, shutdown: CancellationToken) {
        let _ = self.ctx.set(ctx.clone());
        let mut backoff = BACKOFF_MIN;
        let mut first = true;
        let mut quiet = false;
        let mut active = self.active.subscribe();
        loop {
            if !*active.borrow_and_update() {
                // Dormant while the volume is a mirror here.
                self.shared().connection = Connection::Disconnected;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = active.wait_for(|a| *a) => {}
                }
                backoff = BACKOFF_MIN;
                continue;
            }
            self.shared().connection = Connection::Connecting;
            let started = Instant::now();
            match self.connect(&ctx).await {
                Ok((mut stream, peer)) => {
                    if !first {
                        self.counters.reconnects.fetch_add(1, Relaxed);
                    }
                    first = false;
                    quiet = false;
                    let peer_node = peer.node.clone();
                    let judged = self.judge_generations(&ctx, &peer);
                    let go = match judged {
                        Judged::Sync(rel) => match read_divergence(&mut stream).await {
                            Ok((was_primary, ranges)) => {
                                self.take_divergence(&ctx, &peer, rel, was_primary, &ranges);
                                true
                            }
                            Err(e) => {
                                warn!(volume = %self.volume, peer = %self.peer, error = %e, "mirror did not report its divergent regions");
                                self.shared().last_error = Some(e);
                                false
                            }
                        },
                        Judged::PeerAhead => {
                            if let Some(hook) = &ctx.on_peer_ahead {
                                hook(format!(
                                    "mirror {} ({peer_node}) holds a newer generation (it was promoted)",
                                    self.peer
                                ));
                            }
                            false
                        }
                        Judged::Refused => false,
                    };
                    if !go {
                        // After the PeerAhead hook: a volume that must
                        // demote refuses host writes before they pass. A
                        // link that goes live reports once it is live.
                        self.report_met(&ctx);
                    }
                    if go && *self.active.borrow() {
                        info!(volume = %self.volume, peer = %self.peer, peer_node = %peer_node, "mirror link connected");
                        self.clone()
                            .serve_connection(stream, peer_node, &ctx, &shutdown)
                            .await;
                    } else {
                        drop(stream);
                        let mut sh = self.shared();
                        sh.connection = Connection::Disconnected;
                        sh.peer_node = Some(peer_node);
                    }
                }
                Err(e) => {
                    let mut sh = self.shared();
                    sh.connection = Connection::Disconnected;
                    sh.last_error = Some(e.clone());
                    drop(sh);
                    // Unreachable: nothing to learn from it; writes go on.
                    self.report_met(&ctx);
                    if quiet {
                        debug!(volume = %self.volume, peer = %self.peer, error = %e, "mirror link connect failed");
                    } else {
                        warn!(volume = %self.volume, peer = %self.peer, error = %e, "mirror link connect failed; retrying with backoff");
                        quiet = true;
                    }
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            if started.elapsed() > BACKOFF_MAX * 2 {
                backoff = BACKOFF_MIN; // It had been up for a while: retry quickly.
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
                _ = active.wait_for(|a| !*a) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let epoch = self.shared().epoch;
        self.close_for_shutdown(epoch);
    }

    /// Compares the mirror's generation record with ours (both authenticated
    /// by the handshake). Says whether the link may go live; if not, the
    /// state says why (split brain, or suspended) and nothing is copied. A
    /// blank mirror gets the whole volume marked.
    fn judge_generations(&self, ctx: &LinkContext, peer: &PeerInfo) -> Judged {
        let local = ctx.gen.meta.get().generations;
        let theirs = Generations {
            current: peer.volume.generation,
            history: peer.volume.history,
        };
        let rel = compare_generations(&local, &theirs);
        let mut sh = self.shared();
        if rel.primary_may_sync() {
            if rel.needs_full_copy() {
                let size = sh.bitmap.volume_size();
                sh.bitmap.mark(0, size);
                sh.fill_from_scratch = true;
                info!(volume = %self.volume, peer = %self.peer, peer_node = %peer.node,
                    "mirror holds no data lineage (new, or discarded): copying the whole volume");
            } else if rel == Relation::LocalAhead {
                info!(volume = %self.volume, peer = %self.peer, out_of_sync = sh.bitmap.dirty_bytes(),
                    "this primary wrote while the mirror was away: copying what the bitmap marks");
            }
            return Judged::Sync(rel);
        }
        let (state, why) = match rel {
            Relation::SplitBrain => (
                SyncState::SplitBrain,
                format!(
                    "split brain: both sides were written since they last agreed \
                     (ours {}, mirror {}); no automatic resync: run `blockmirror resync \
                     {} --discard-local` on the side whose changes are to be thrown away",
                    local.to_display(),
                    theirs.to_display(),
                    self.volume
                ),
            ),
            Relation::PeerAhead => (
                SyncState::Suspended,
                format!(
                    "the mirror was promoted (its generation {} descends from ours {}): \
                     not overwriting it; this side must be demoted",
                    theirs.to_display(),
                    local.to_display()
                ),
            ),
            _ => (
                SyncState::Suspended,
                format!(
                    "mirror data is unrelated to ours ({}: ours {}, mirror {}); \
                     run `blockmirror resync {} --discard-local` on the mirror to replace it",
                    rel.as_str(),
                    local.to_display(),
                    theirs.to_display(),
                    self.volume
                ),
            ),
        };
        if sh.state != state || sh.last_error.as_deref() != Some(why.as_str()) {
            warn!(volume = %self.volume, peer = %self.peer, peer_node = %peer.node, relation = rel.as_str(), "{why}");
        }
        sh.state = state;
        sh.last_error = Some(why);
        if rel == Relation::PeerAhead {
            Judged::PeerAhead
        } else {
            Judged::Refused
        }
    }

    /// Adds what the mirror reported after the handshake to what is copied,
    /// and decides whether the bitmap can be trusted at all
    /// ([`resync_basis`]): after a promotion this node's bitmaps start
    /// empty, so a peer last in step before it is compared block by block,
    /// unless it is the old primary itself, whose report names its own
    /// writes (failback without a full copy).
    fn take_divergence(
        &self,
        ctx: &LinkContext,
        peer: &PeerInfo,
        rel: Relation,
        was_primary: bool,
        ranges: &[(u64, u64)],
    ) {
        let meta = ctx.gen.meta.get();
        let theirs = Generations {
            current: peer.volume.generation,
            history: peer.volume.history,
        };
        let mut sh = self.shared();
        sh.maybe = None;
        let size = sh.bitmap.volume_size();
        // What the peer reports is what it *may* hold (whole activity-log
        // extents after a crash, mostly equal to ours): hashed before it is
        // sent. What our own bitmap marks is sent at once.
        let mut maybe = empty_like(&sh.bitmap);
        let mut reported = 0u64;
        for &(off, len) in ranges {
            let end = off.saturating_add(len).min(size);
            if off < end {
                maybe.mark(off, end - off);
                reported += end - off;
            }
        }
        self.counters.divergent_bytes.fetch_add(reported, Relaxed);
        if rel.needs_full_copy() {
            sh.bitmap.mark(0, size);
            return;
        }
        match resync_basis(&meta.generations, meta.promoted_from, &theirs, was_primary) {
            ResyncBasis::Bitmap => {
                if reported > 0 {
                    info!(volume = %self.volume, peer = %self.peer, reported,
                        "the mirror reports regions of its own: copying them too");
                }
            }
            ResyncBasis::BitmapAndPeer => {
                info!(volume = %self.volume, peer = %self.peer, peer_node = %peer.node, reported,
                    written_here = sh.bitmap.dirty_bytes().saturating_sub(reported),
                    out_of_sync = sh.bitmap.dirty_bytes(),
                    "failback: the old primary returns as a mirror; copying what it wrote after the \
                     promotion missed it and what was written here since");
            }
            ResyncBasis::CompareAll => {
                maybe.mark(0, size);
                info!(volume = %self.volume, peer = %self.peer, peer_node = %peer.node,
                    "nothing here records how this mirror differs (it was last in step before \
                     this node was promoted): comparing every block by checksum");
            }
        }
        // Hashed first: what is only possibly different, less what this
        // primary knows it wrote (sent at once, at the bitmap's grain).
        let own: Vec<(u64, u64)> = sh.bitmap.runs().collect();
        for (off, len) in own {
            maybe.clear(off, len);
        }
        if !maybe.is_clear() {
            sh.bitmap.union_with(&maybe).expect("same shape");
            sh.maybe = Some(maybe);
        }
    }

    /// Tells the volume's start gate, once, that this link met its peer.
    fn report_met(&self, ctx: &LinkContext) {
        if !self.reported.swap(true, SeqCst) {
            ctx.gen.link_judged();
        }
    }

    /// Whether the link may connect (false while the volume is a mirror).
    pub fn is_active(&self) -> bool {
        *self.active.borrow()
    }

    /// Wakes a dormant link, or parks a running one: its connection closes
    /// (what was in flight is marked) and it stays disconnected.
    pub fn set_active(&self, on: bool) {
        self.active.send_replace(on);
        if !on {
            self.fail_inner(None, "the volume is a mirror on this node now", false, true);
        }
    }

    /// This node became the primary by promotion: what the bitmap marked
    /// belongs to an older role; from now on it records what this primary
    /// writes while the mirror is away ([`resync_basis`] decides what else
    /// a returning peer needs).
    pub fn reset_for_promotion(&self) {
        let mut sh = self.shared();
        sh.bitmap.clear_all();
        sh.unflushed.clear_all();
        sh.flushing.clear();
    }

    /// Forgets what the bitmap marks (this volume is a mirror in sync with
    /// another primary now: its own old writes are superseded).
    pub fn clear_marks(&self) {
        self.shared().bitmap.clear_all();
    }

    /// The primary started a new generation (another mirror misses writes):
    /// a mirror that is live and in sync holds every write, so it is told
    /// the new record (after a FLUSH, like every "in sync").
    pub fn reannounce(self: Arc<Self>) {
        let epoch = {
            let sh = self.shared();
            if sh.state != SyncState::InSync || sh.tx.is_none() {
                return;
            }
            sh.epoch
        };
        let Some(ctx) = self.ctx.get().cloned() else {
            return;
        };
        tokio::spawn(async move {
            self.announce(epoch, &ctx, SyncPhase::InSync).await;
        });
    }

    /// Sends a SyncState on this connection and waits for the mirror to store
    /// it. "In sync" is sent after a FLUSH, so what it covers is durable.
    async fn announce(&self, epoch: u64, ctx: &LinkContext, phase: SyncPhase) -> bool {
        if phase == SyncPhase::InSync {
            let Some(p) = self.prepare_flush() else {
                return false;
            };
            let sent = self.send(p, &MirrorOp::Flush);
            if self.wait(sent).await.is_err() {
                return false;
            }
        }
        let generations = ctx.gen.meta.get().generations;
        let Some(p) = self.prepare_for_epoch(epoch, 0, 0) else {
            return false;
        };
        let sent = self.send(p, &MirrorOp::SyncState { phase, generations });
        let ok = self.wait(sent).await.is_ok();
        if ok && phase == SyncPhase::InSync {
            ctx.gen.announced();
        }
        ok
    }

    async fn connect(&self, ctx: &LinkContext) -> Result<(TcpStream, PeerInfo), String> {
        let attempt = async {
            let mut s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            let peer = blockmirror_repl::connect(&mut s, &ctx.secret, &ctx.hello())
                .await
                .map_err(|e| e.to_string())?;
            Ok((s, peer))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no handshake within {CONNECT_TIMEOUT:?}")))
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer_node: String,
        ctx: &LinkContext,
        shutdown: &CancellationToken,
    ) {
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = shutdown.child_token();
        let epoch = {
            let mut sh = self.shared();
            // Checked under the lock that `set_active(false)` takes after
            // clearing the flag: either this sees it cleared, or that sees
            // this connection and closes it.
            if !*self.active.borrow() {
                return;
            }
            sh.epoch += 1;
            sh.conn_cancel = Some(cancel.clone());
            sh.connection = Connection::Connected;
            sh.peer_node = Some(peer_node);
            sh.last_error = None;
            sh.epoch
        };
        // A group member goes live only when every member is connected.
        if let Some((group, idx)) = self.group.get() {
            let arrived = tokio::select! {
                r = group.arrive(*idx) => r.is_ok(),
                _ = cancel.cancelled() => false,
            };
            if !arrived {
                let mut sh = self.shared();
                if sh.epoch == epoch {
                    sh.conn_cancel = None;
                    sh.connection = Connection::Disconnected;
                }
                return;
            }
        }
        {
            let mut sh = self.shared();
            if sh.epoch != epoch || cancel.is_cancelled() {
                return;
            }
            sh.tx = Some(tx);
            self.report_met(ctx);
            sh.copy_only = std::mem::take(&mut sh.fill_from_scratch)
                && self.resync.initial_sync == InitialSync::Iterative
                && !sh.bitmap.is_clear();
            sh.state = if sh.bitmap.is_clear() {
                SyncState::InSync
            } else {
                SyncState::Resyncing
            };
        }
        let sender = tokio::spawn(sender_loop(FrameWriter::new(wr), rx, cancel.clone()));
        let catch_up = tokio::spawn(self.clone().catch_up(epoch, ctx.clone(), cancel.clone()));
        let watchdog = tokio::spawn(self.clone().watchdog(epoch, cancel.clone()));
        let flusher = tokio::spawn(self.clone().periodic_flush(cancel.clone()));
        let reason = self.receive(FrameReader::new(rd), epoch, &cancel).await;
        if shutdown.is_cancelled() {
            self.close_for_shutdown(epoch);
        } else {
            self.fail(epoch, &reason);
        }
        cancel.cancel();
        let _ = sender.await;
        let _ = catch_up.await;
        let _ = watchdog.await;
        let _ = flusher.await;
    }

    /// Reads acknowledgements until the connection ends; returns why it ended.
    async fn receive(
        &self,
        mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
        epoch: u64,
        cancel: &CancellationToken,
    ) -> String {
        // Acknowledgements that one read brought are settled together.
        let mut ids: Vec<u64> = Vec::new();
        let reason = loop {
            let frame = match reader.next_buffered() {
                Ok(Some(f)) => Ok(Some(f)),
                Ok(None) => {
                    if !ids.is_empty() {
                        self.acked(&ids, epoch);
                        ids.clear();
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => break "connection closed".into(),
                        f = reader.next() => f,
                    }
                }
                Err(e) => Err(e),
            };
            match frame {
                Ok(Some(Frame::Ack { id })) | Ok(Some(Frame::Pong { id })) => ids.push(id),
                Ok(Some(Frame::HashReply { id, hash })) => {
                    self.hashes.lock().expect("poisoned").insert(id, hash);
                    ids.push(id);
                }
                Ok(Some(Frame::Nack { id, errno, message })) => {
                    break format!("mirror failed request {id} with errno {errno}: {message}");
                }
                Ok(Some(Frame::Error { code, message, .. })) => {
                    break format!("mirror closed the link: {code:?}: {message}");
                }
                Ok(Some(f)) => break format!("unexpected {:?} frame from the mirror", f.kind()),
                Ok(None) => break "mirror closed the connection".into(),
                Err(e) => break e.to_string(),
            }
        };
        // What was acknowledged before the link ended is on the mirror.
        self.acked(&ids, epoch);
        reason
    }

    /// Asks the mirror to flush when it acknowledged writes since the last
    /// flush, so that what a mirror crash can lose stays a second's worth.
    async fn periodic_flush(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PERIODIC_FLUSH) => {}
            }
            if self.shared().unflushed.is_clear() {
                continue;
            }
            if let Some(p) = self.prepare_flush() {
                let sent = self.send(p, &MirrorOp::Flush);
                let _ = self.wait(sent).await;
            }
        }
    }

    /// Stores the bitmap every few seconds when it changed, until `shutdown`.
    pub async fn persist_periodically(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(BITMAP_STORE_INTERVAL) => {}
            }
            if let Err(e) = self.persist_bitmap().await {
                warn!(error = %e, "storing the out-of-sync bitmap failed");
            }
        }
    }

    /// Fails the connection when a request has waited longer than the
    /// timeout; warns when one has waited half of it.
    async fn watchdog(self: Arc<Self>, epoch: u64, cancel: CancellationToken) {
        let tick = (self.timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let mut warned = 0u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let probe = {
                let sh = self.shared();
                let now = Instant::now();
                match sh
                    .inflight
                    .iter()
                    .filter_map(|(id, p)| p.sent.map(|t| (now.saturating_duration_since(t), *id)))
                    .max()
                {
                    Some(x) => Err(x),
                    None => Ok(()),
                }
            };
            let (oldest, id) = match probe {
                Err(x) => x,
                Ok(()) => {
                    // Idle: probe, so a dead peer is noticed before a host
                    // write has to wait for it. The probe is a request like
                    // any other: unanswered, it trips this watchdog.
                    if let p @ Prepared::Live { .. } = self.prepare_live(0, 0) {
                        if let Sent::Waiting(rx) = self.send(p, &MirrorOp::Ping) {
                            drop(rx);
                        }
                    }
                    continue;
                }
            };
            if oldest >= self.timeout {
                self.fail(
                    epoch,
                    &format!(
                        "request {id} unanswered for {} ms (mirror_timeout)",
                        oldest.as_millis()
                    ),
                );
                return;
            }
            if oldest >= self.timeout / 2 && id != warned {
                warned = id;
                warn!(volume = %self.volume, peer = %self.peer, id, waited_ms = oldest.as_millis() as u64, "mirror request outstanding long");
            }
        }
    }

    /// Copies every marked region to the mirror, then declares it in sync.
    ///
    /// Each chunk holds its range lock from the local read until the mirror
    /// acknowledged it, so a host write to the same bytes cannot slip between
    /// the copy and the clearing of its bits.
    async fn catch_up(self: Arc<Self>, epoch: u64, ctx: LinkContext, cancel: CancellationToken) {
        let total = self.shared().bitmap.dirty_bytes();
        if total == 0 {
            // Nothing to copy: the mirror holds our generation.
            self.announce(epoch, &ctx, SyncPhase::InSync).await;
            return;
        }
        {
            let mut sh = self.shared();
            sh.resync_total = total;
            sh.resync_done = 0;
        }
        // The mirror is inconsistent from its first resync write on.
        if !self.announce(epoch, &ctx, SyncPhase::Resyncing).await {
            return;
        }
        let started = Instant::now();
        if self.shared().copy_only && !self.iterative_fill(epoch, &ctx, &cancel).await {
            return;
        }
        info!(volume = %self.volume, peer = %self.peer, bytes = self.shared().bitmap.dirty_bytes(),
            "catching up (live): copying out-of-sync regions");
        let mut window = tokio::task::JoinSet::new();
        let mut cursor = 0u64;
        // A pass whose local reads failed is retried after a pause that
        // doubles (the disk is failing: no tight loop over it).
        let mut pause = Duration::from_millis(200);
        let mut failures = self.counters.catch_up_read_failures.load(Relaxed);
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let next = {
                let sh = self.shared();
                next_run_split(&sh.bitmap, sh.maybe.as_ref(), cursor, CATCH_UP_CHUNK)
            };
            let Some((off, len)) = next else {
                // Wait for what is in flight, then look again from the start:
                // regions marked meanwhile are copied too.
                while window.join_next().await.is_some() {}
                if cancel.is_cancelled() {
                    return;
                }
                if self.shared().bitmap.is_clear()
                    && !self.announce(epoch, &ctx, SyncPhase::InSync).await
                {
                    return;
                }
                let in_sync = {
                    let mut sh = self.shared();
                    if sh.epoch != epoch {
                        return;
                    }
                    let clear = sh.bitmap.is_clear();
                    if clear {
                        sh.state = SyncState::InSync;
                        sh.resync_done = sh.resync_total;
                        sh.maybe = None;
                    }
                    clear
                };
                if in_sync {
                    info!(volume = %self.volume, peer = %self.peer, bytes = total,
                        ms = started.elapsed().as_millis() as u64, "mirror in sync");
                    // Stored now rather than at the next periodic store: a
                    // crash soon after a long resync then replays only the
                    // activity log, not the whole resync again.
                    if let Err(e) = self.persist_bitmap().await {
                        warn!(volume = %self.volume, peer = %self.peer, error = %e, "storing the out-of-sync bitmap failed");
                    }
                    return;
                }
                let now = self.counters.catch_up_read_failures.load(Relaxed);
                if now != failures {
                    failures = now;
                    warn!(volume = %self.volume, peer = %self.peer, retry_ms = pause.as_millis() as u64,
                        "catch-up: local reads failed; retrying the marked regions after a pause");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(10));
                } else {
                    pause = Duration::from_millis(200);
                }
                cursor = 0;
                continue;
            };
            cursor = off + len;
            while window.len() >= CATCH_UP_WINDOW {
                window.join_next().await;
            }
            self.pace(len, &cancel).await;
            let link = self.clone();
            let ctx = ctx.clone();
            window.spawn(async move { link.copy_chunk(epoch, &ctx, off, len, true).await });
        }
    }

    /// Seed 004 FIG. 2, for a mirror filled from scratch. Host writes only
    /// mark the bitmap (the change mask, already clear of nothing: a blank
    /// mirror has every region marked). Each pass copies what is marked, each
    /// chunk under its range lock, so a host write racing with the copy of
    /// its region lands its mark after the copy cleared the bits, and the
    /// next pass copies it again. Once a pass leaves at most
    /// `resync_threshold` marked, host writes are suspended (the range lock
    /// over the whole volume), the rest is copied, and the link goes live
    /// before the lock is released: no write can fall between.
    ///
    /// Returns false when the connection ended. Returns true with the link
    /// live: either in sync, or (host writes outpacing the copy, or final
    /// copies too long for `resync_max_suspension`) handed to the live
    /// catch-up, which always converges.
    async fn iterative_fill(
        self: &Arc<Self>,
        epoch: u64,
        ctx: &LinkContext,
        cancel: &CancellationToken,
    ) -> bool {
        let size = self.shared().bitmap.volume_size();
        let mut attempts = 0;
        let started = Instant::now();
        info!(volume = %self.volume, peer = %self.peer, bytes = size, threshold = self.resync.threshold,
            "initial sync (iterative): host writes mark the change mask while passes copy");
        for pass in 1.. {
            {
                let mut sh = self.shared();
                sh.passes = pass;
                sh.resync_total = sh.resync_done + sh.bitmap.dirty_bytes();
            }
            if !self.copy_pass(epoch, ctx, cancel).await {
                return false;
            }
            let left = self.shared().bitmap.dirty_bytes();
            info!(volume = %self.volume, peer = %self.peer, pass, changed = left, "initial sync pass done");
            if left <= self.resync.threshold {
                match self.final_copy(epoch, ctx, cancel, size).await {
                    Some(true) => {
                        info!(volume = %self.volume, peer = %self.peer, passes = pass,
                            ms = started.elapsed().as_millis() as u64, "initial sync copied; live");
                        return true;
                    }
                    Some(false) => {
                        attempts += 1;
                        if attempts >= MAX_SUSPENSION_ATTEMPTS {
                            warn!(volume = %self.volume, peer = %self.peer, attempts,
                                "final copies keep exceeding resync_max_suspension: going live (range-locked catch-up)");
                            break;
                        }
                    }
                    None => return false,
                }
            } else if pass >= MAX_PASSES {
                warn!(volume = %self.volume, peer = %self.peer, passes = pass, changed = left,
                    "host writes outpace the copy: going live (range-locked catch-up)");
                break;
            }
        }
        let mut sh = self.shared();
        if sh.epoch != epoch {
            return false;
        }
        sh.copy_only = false;
        true
    }

    /// The resync rate in bytes per second (0: unlimited).
    pub fn resync_rate(&self) -> u64 {
        self.bucket.lock().expect("poisoned").rate()
    }

    /// Changes the resync rate at once, also for a copy that is running.
    pub fn set_resync_rate(&self, rate: u64) {
        let now = self.born.elapsed().as_nanos() as u64;
        self.bucket.lock().expect("poisoned").set_rate(rate, now);
        info!(volume = %self.volume, peer = %self.peer, rate, "resync rate set (bytes/s, 0: unlimited)");
    }

    /// A host write came through (for `resync_host_share`).
    pub fn note_host_write(&self) {
        if self.resync.host_share > 0 {
            let now = self.born.elapsed().as_nanos() as u64;
            self.last_host_write.store(now + 1, Relaxed);
        }
    }

    /// Waits until `len` more bytes of resync copy fit the rate (less the
    /// host's share while hosts write).
    async fn pace(&self, len: u64, cancel: &CancellationToken) {
        let wait = {
            let now = self.born.elapsed().as_nanos() as u64;
            let last = self.last_host_write.load(Relaxed);
            let active = last != 0 && now.saturating_sub(last - 1) < HOST_ACTIVE_NS;
            let charged = charged_bytes(len, self.resync.host_share, active);
            self.bucket.lock().expect("poisoned").take(charged, now)
        };
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_nanos(wait)) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// One walk over the bitmap, copying each marked run under its range lock.
    async fn copy_pass(
        self: &Arc<Self>,
        epoch: u64,
        ctx: &LinkContext,
        cancel: &CancellationToken,
    ) -> bool {
        let mut window = tokio::task::JoinSet::new();
        let mut cursor = 0u64;
        loop {
            if cancel.is_cancelled() || self.shared().epoch != epoch {
                return false;
            }
            let next = next_run(&self.shared().bitmap, cursor, CATCH_UP_CHUNK);
            let Some((off, len)) = next else { break };
            cursor = off + len;
            while window.len() >= CATCH_UP_WINDOW {
                window.join_next().await;
            }
            self.pace(len, cancel).await;
            let (link, ctx) = (self.clone(), ctx.clone());
            window.spawn(async move { link.copy_chunk(epoch, &ctx, off, len, true).await });
        }
        while window.join_next().await.is_some() {}
        !cancel.is_cancelled() && self.shared().epoch == epoch
    }

    /// Suspends host writes (the range lock over the whole volume), copies
    /// what is still marked, and goes live before resuming them. Some(true):
    /// done; Some(false): cut short by `resync_max_suspension` (host writes
    /// resume, still only marking); None: the connection ended.
    async fn final_copy(
        self: &Arc<Self>,
        epoch: u64,
        ctx: &LinkContext,
        cancel: &CancellationToken,
        size: u64,
    ) -> Option<bool> {
        let asked = Instant::now();
        let guard = tokio::select! {
            g = ctx.locks.lock(0, size) => g,
            _ = cancel.cancelled() => return None,
        };
        let locked_after = asked.elapsed();
        let deadline = asked + self.resync.max_suspension;
        let mut window = tokio::task::JoinSet::new();
        let mut cursor = 0u64;
        let mut cut_short = false;
        loop {
            if cancel.is_cancelled() || self.shared().epoch != epoch {
                return None;
            }
            if Instant::now() >= deadline {
                cut_short = true;
                break;
            }
            let next = next_run(&self.shared().bitmap, cursor, CATCH_UP_CHUNK);
            let Some((off, len)) = next else { break };
            cursor = off + len;
            while window.len() >= CATCH_UP_WINDOW {
                window.join_next().await;
            }
            let (link, ctx) = (self.clone(), ctx.clone());
            // We hold the whole volume: the chunk takes no lock of its own.
            window.spawn(async move { link.copy_chunk(epoch, &ctx, off, len, false).await });
        }
        while window.join_next().await.is_some() {}
        let done = {
            let mut sh = self.shared();
            if sh.epoch != epoch {
                return None;
            }
            let done = !cut_short && sh.bitmap.is_clear();
            if done {
                // Host writes waiting on the lock go to the mirror from now on.
                sh.copy_only = false;
            }
            done
        };
        drop(guard);
        let held = asked.elapsed();
        {
            let mut sh = self.shared();
            sh.last_suspension = Some(held);
        }
        self.counters
            .suspended_us
            .fetch_add(held.as_micros() as u64, Relaxed);
        self.counters.suspensions.fetch_add(1, Relaxed);
        if done {
            info!(volume = %self.volume, peer = %self.peer, suspended_us = held.as_micros() as u64,
                waited_for_writes_us = locked_after.as_micros() as u64,
                "initial sync final copy: host writes were suspended");
        } else {
            warn!(volume = %self.volume, peer = %self.peer, suspended_us = held.as_micros() as u64,
                max_ms = self.resync.max_suspension.as_millis() as u64,
                "initial sync final copy cut short at resync_max_suspension; host writes resumed");
        }
        Some(done)
    }

    async fn copy_chunk(&self, epoch: u64, ctx: &LinkContext, off: u64, len: u64, lock: bool) {
        let guard = if lock {
            Some(ctx.locks.lock(off, len).await)
        } else {
            None
        };
        let backend = ctx.backend.clone();
        let checksum = self.resync.checksum
            || self
                .shared()
                .maybe
                .as_ref()
                .is_some_and(|m| m.is_marked(off));
        // With checksums, ask for the mirror's hash while the local read runs.
        let asked = if checksum {
            self.prepare_for_epoch(epoch, 0, 0).map(|p| {
                let id = match &p {
                    Prepared::Live { id, .. } => *id,
                    _ => 0,
                };
                let sent = self.send(
                    p,
                    &MirrorOp::Hash {
                        offset: off,
                        len: len as u32,
                    },
                );
                (id, sent)
            })
        } else {
            None
        };
        let codec = self.compression;
        // Read, hash when asked, and compress when the link does, off the
        // runtime's threads.
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::zeroed(len as usize);
            backend.read_at(&mut buf, off).map(|()| {
                let hash = checksum.then(|| *blake3::hash(&buf).as_bytes());
                let data = buf.freeze();
                let data = if data.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(EncodedWrite::new(data, codec))
                };
                (data, hash)
            })
        })
        .await;
        let (data, local_hash) = match read {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                warn!(error = %e, "catch-up read failed; region stays marked");
                self.counters.catch_up_read_failures.fetch_add(1, Relaxed);
                self.shared().last_error = Some(format!("catch-up: {e}"));
                return;
            }
            Err(_) => return,
        };
        if let (Some((id, sent)), Some(local)) = (asked, local_hash) {
            // The mirror hashes without waiting for writes queued before the
            // request; under our range lock only a host write sent before it
            // can be queued there, and it carries the data we just read, so
            // "equal" can only be true of data the mirror ends up holding.
            let theirs = match self.wait(sent).await {
                Ok(()) => self.hashes.lock().expect("poisoned").remove(&id),
                Err(_) => None,
            };
            if theirs == Some(local) {
                let mut sh = self.shared();
                if sh.epoch == epoch {
                    sh.bitmap.clear(off, len);
                    sh.resync_done += len;
                    self.counters.resync_skipped_bytes.fetch_add(len, Relaxed);
                }
                return;
            }
        }
        let p = self.prepare_for_epoch(epoch, off, len);
        let Some(p) = p else { return };
        let sent = match data {
            None => self.send(
                p,
                &MirrorOp::WriteZeroes {
                    offset: off,
                    len: len as u32,
                    fua: false,
                    may_trim: true,
                },
            ),
            Some(write) => {
                let (ticket, sent) = p.split();
                match ticket {
                    Some(t) if self.send_encoded(t, off, false, write) => sent,
                    _ => Sent::Marked,
                }
            }
        };
        if self.wait(sent).await.is_ok() {
            let mut sh = self.shared();
            if sh.epoch == epoch {
                sh.bitmap.clear(off, len);
                sh.resync_done += len;
                self.counters.resync_bytes.fetch_add(len, Relaxed);
            }
        }
        drop(guard);
    }

    /// Like `prepare`, but only on the given connection and without marking.
    fn prepare_for_epoch(&self, epoch: u64, offset: u64, len: u64) -> Option<Prepared> {
        let mut sh = self.shared();
        if sh.epoch != epoch || sh.tx.is_none() {
            return None;
        }
        Some(self.register(&mut sh, offset, len))
    }
}

/// Host writes within this long count as "hosts are writing".
const HOST_ACTIVE_NS: u64 = 100_000_000;

/// What `len` bytes of copy cost in the rate limiter: more while hosts write,
/// so the copy runs at `(100 - share)%` of the rate and the rest is theirs.
fn charged_bytes(len: u64, share: u8, host_active: bool) -> u64 {
    if !host_active || share == 0 {
        return len;
    }
    let keep = 100 - u64::from(share.min(90));
    len.saturating_mul(100) / keep
}

/// A clear bitmap of the same shape as `b`.
fn empty_like(b: &Bitmap) -> Bitmap {
    Bitmap::new(b.volume_size(), b.granularity()).expect("same shape as a valid bitmap")
}

/// The first run of marked bytes at or after `from` (region-aligned), at
/// most `max` long (rounded to whole regions).
/// [`next_run`], cut where membership in `maybe` changes, so a run is
/// either all "hash first" or all "send".
fn next_run_split(b: &Bitmap, maybe: Option<&Bitmap>, from: u64, max: u64) -> Option<(u64, u64)> {
    let (start, len) = next_run(b, from, max)?;
    let Some(m) = maybe else {
        return Some((start, len));
    };
    let g = b.granularity();
    let region = b.region_of(start);
    let maybe = m.is_region_marked(region);
    let boundary = if maybe {
        m.next_clean(region)
    } else {
        m.next_dirty(region)
    };
    let mut end = boundary.map_or(start + len, |r| (r * g).min(start + len));
    if maybe {
        // Hashed runs are short: what differs in them (a crashed primary's
        // last writes, scattered) is then sent at a fine grain.
        end = end.min(start + MAYBE_CHUNK.max(g));
    }
    Some((start, end.max(start + g.min(len)) - start))
}

fn next_run(b: &Bitmap, from: u64, max: u64) -> Option<(u64, u64)> {
    if from >= b.volume_size() {
        return None;
    }
    let g = b.granularity();
    let max = max.max(g) / g * g;
    let region = b.next_dirty(b.region_of(from))?;
    let start = region * g;
    let end_region = b.next_clean(region).unwrap_or(b.regions());
    let end = (end_region * g).min(start + max).min(b.volume_size());
    Some((start, end - start))
}

/// What a link needs from its volume and node.
#[derive(Clone)]
pub struct LinkContext {
    pub secret: Arc<[u8]>,
    /// This node's name.
    pub node: String,
    pub volume: String,
    pub backend: Arc<dyn Backend>,
    pub locks: RangeLocks,
    pub gen: Arc<GenState>,
    /// Called when a mirror turns out to hold a newer generation than ours
    /// (it was promoted while this node was away): the node demotes the
    /// volume, which then becomes that primary's mirror (failback).
    pub on_peer_ahead: Option<Arc<dyn Fn(String) + Send + Sync>>,
}

/// What the generation check allows.
enum Judged {
    /// Copy and go live.
    Sync(Relation),
    /// The mirror was promoted past us: this side must become its mirror.
    PeerAhead,
    Refused,
}

/// Reads the Divergence frames a mirror sends right after the handshake:
/// whether it wrote its current generation as a primary, and the regions it
/// may hold that we lack. The mirror sends nothing else until it is asked,
/// so the reader dropped here buffers nothing of what follows.
async fn read_divergence(stream: &mut TcpStream) -> Result<(bool, Vec<(u64, u64)>), String> {
    let mut reader = FrameReader::new(stream);
    let mut all = Vec::new();
    let read = async {
        loop {
            match reader.next().await {
                Ok(Some(Frame::Divergence {
                    was_primary,
                    last,
                    ranges,
                })) => {
                    all.extend(ranges);
                    if last {
                        return Ok(was_primary);
                    }
                }
                Ok(Some(Frame::Error { code, message, .. })) => {
                    return Err(format!("mirror refused the link: {code:?}: {message}"))
                }
                Ok(Some(f)) => {
                    return Err(format!(
                        "expected the mirror's Divergence report, got {:?}",
                        f.kind()
                    ))
                }
                Ok(None) => return Err("mirror closed the connection after the handshake".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let was_primary = tokio::time::timeout(DIVERGENCE_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no Divergence report within {DIVERGENCE_TIMEOUT:?}"
            ))
        })?;
    Ok((was_primary, all))
}

impl LinkContext {
    /// The Hello of a new connection: the volume's record as it is now.
    pub fn hello(&self) -> NodeHello {
        let m = self.gen.meta.get();
        NodeHello {
            node: self.node.clone(),
            volume: VolumeIdentity {
                name: self.volume.clone(),
                volume_id: m.volume_id,
                size: m.size,
                generation: m.generations.current,
                history: m.generations.history,
            },
        }
    }
}

async fn sender_loop(
    mut w: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            f = rx.recv() => f,
        };
        let Some(out) = first else { return };
        queue(&mut w, out);
        while w.buffered() < 4 << 20 {
            match rx.try_recv() {
                Ok(out) => queue(&mut w, out),
                Err(_) => break,
            }
        }
        let flushed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = w.flush() => r,
        };
        if flushed.is_err() {
            // The receiver sees the broken connection and fails the epoch.
            cancel.cancel();
            return;
        }
    }
}

fn queue(w: &mut FrameWriter<tokio::net::tcp::OwnedWriteHalf>, out: Outgoing) {
    match out {
        Outgoing::Frame(f) => w.queue(&f),
        Outgoing::Encoded {
            id,
            offset,
            fua,
            write,
        } => w.queue_encoded_write(id, offset, fua, &write),
    }
}

// ---------------------------------------------------------------------------
// Verify support (issue 8): what `crate::primary::verify` needs from a link. Kept
// apart from the write path so it merges cleanly with work on it.

impl MirrorLink {
    /// The mirror's replication address (job connections go there too).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// True while a request that changes bytes of `[offset, offset+len)` is
    /// in flight (prepared or sent, not yet acknowledged or failed).
    pub fn has_inflight_in(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.shared()
            .inflight
            .values()
            .any(|p| p.len > 0 && p.offset < end && offset < p.offset.saturating_add(p.len))
    }

    /// Marks `[offset, offset+len)` out of sync and, on a live link that is
    /// in sync, starts copying the marked regions now (the catch-up that
    /// otherwise runs only when the link connects). On a link that is
    /// resyncing, the running catch-up picks the new marks up before it
    /// declares the mirror in sync; on a link that is down, the next
    /// connection copies them.
    pub fn mark_and_copy(self: &Arc<Self>, offset: u64, len: u64, ctx: &LinkContext) {
        let start = {
            let mut sh = self.shared();
            sh.bitmap.mark(offset, len);
            match (&sh.tx, &sh.conn_cancel, sh.state) {
                (Some(_), Some(cancel), SyncState::InSync) => {
                    let cancel = cancel.clone();
                    sh.state = SyncState::Resyncing;
                    Some((sh.epoch, cancel))
                }
                _ => None,
            }
        };
        if let Some((epoch, cancel)) = start {
            tokio::spawn(self.clone().catch_up(epoch, ctx.clone(), cancel));
        }
    }
}

// ---------------------------------------------------------------------------
// Read balancing and serve_from_mirror (issue 9): what `crate::primary::reads` needs
// from a link. Kept apart from the write path so it merges cleanly.

impl MirrorLink {
    /// True when a host read of `[offset, offset+len)` may be served by this
    /// mirror: it holds exactly the primary's data there. All of: the link
    /// is sync (an async mirror may lack acknowledged writes), live (host
    /// writes reach it now), in sync and not filling (no copy pending), the
    /// range is not marked in its bitmap (verify `--mark` can mark regions
    /// of a link that is still in sync), and no write to the range is in
    /// flight on it (an async write acknowledged before a switch to sync
    /// may still be on its way; a sync one in flight is concurrent with
    /// this read anyway, so either answer would do, and the local disk has
    /// it). Checked under the link's lock, so it is one consistent view.
    ///
    /// Why a read after an acknowledged write is safe: in sync mode the
    /// host hears "done" only after the mirror acknowledged the write, which
    /// it does once the write is applied to its backend; or after the link
    /// failed, and a failing link is degraded (not live) before any of its
    /// requests is failed, so this check is false from then on.
    pub fn serves_reads(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let sh = self.shared();
        if !self.in_sync_now(&sh) {
            return false;
        }
        // Usually clear (O(1)); otherwise only the read's own regions (at
        // most 32 MiB / granularity), never a scan to the volume's end.
        if !sh.bitmap.is_clear() {
            let first = sh.bitmap.region_of(offset);
            let last = sh.bitmap.region_of(offset.saturating_add(len - 1));
            if (first..=last).any(|r| sh.bitmap.is_region_marked(r)) {
                return false;
            }
        }
        let end = offset.saturating_add(len);
        !sh.inflight
            .values()
            .any(|p| p.len > 0 && p.offset < end && offset < p.offset.saturating_add(p.len))
    }

    /// True when this mirror can take over every host request of a primary
    /// whose local disk failed: sync, live, in sync, nothing marked.
    pub fn can_take_over(&self) -> bool {
        let sh = self.shared();
        self.in_sync_now(&sh) && sh.bitmap.is_clear()
    }

    fn in_sync_now(&self, sh: &Shared) -> bool {
        self.mode() == MirrorMode::Sync
            && sh.tx.is_some()
            && !sh.copy_only
            && sh.state == SyncState::InSync
            && sh.connection == Connection::Connected
    }

    /// What the link runs with (secret, hello), once it started.
    pub fn context(&self) -> Option<&LinkContext> {
        self.ctx.get()
    }
}

fn mode_code(m: MirrorMode) -> u8 {
    match m {
        MirrorMode::Sync => 0,
        MirrorMode::Async => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_share_slows_the_copy_only_while_hosts_write() {
        assert_eq!(charged_bytes(1 << 20, 0, true), 1 << 20);
        assert_eq!(charged_bytes(1 << 20, 50, false), 1 << 20);
        // Half the rate for the copy: each byte costs two.
        assert_eq!(charged_bytes(1 << 20, 50, true), 2 << 20);
        // 25% kept for hosts: the copy gets 75% of the rate.
        assert_eq!(charged_bytes(3 << 20, 25, true), 4 << 20);
        // Capped at 90%, so the copy always progresses.
        assert_eq!(charged_bytes(100, 200, true), 1000);
    }
}
