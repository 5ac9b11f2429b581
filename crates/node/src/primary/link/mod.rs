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
//!
//! The link's phase (connecting, live, in sync, fenced...) is a
//! [`blockmirror_core::link::LinkMachine`]: every change of it goes through
//! [`MirrorLink::drive`]. The files here:
//!
//! - [`session`]: connections, handshake, generation check, the
//!   connection's tasks, and what a failure does.
//! - [`inflight`]: requests in flight, acknowledgements, read eligibility.
//! - [`catchup`]: catch-up, iterative initial sync, checksum resync, pacing.
//! - [`activity`]: the activity log and the bitmap's persistence.
//! - [`metrics`]: the link's families in /metrics.

mod activity;
mod catchup;
mod error;
mod inflight;
mod metrics;
mod session;

pub use activity::ActivateError;
pub use blockmirror_core::link::{Connection, SyncState};
pub use error::{LinkError, MirrorFailure};
use inflight::Pending;
pub use inflight::{Prepared, Sent, Ticket};
pub use metrics::{encode_link_metrics, register_link_metrics};

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blockmirror_core::activity::ActivityLog;
use blockmirror_core::bitmap::Bitmap;
use blockmirror_core::link::{Action, Event, FailCause, IllegalEvent, LinkMachine, Outcome};
use blockmirror_core::rate::TokenBucket;
use blockmirror_core::Generations;
use blockmirror_repl::{Codec, EncodedWrite, Frame, NodeHello, SyncPhase, VolumeIdentity};
use blockmirror_storage::Backend;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::daemon::config::{LagPolicy, MirrorConfig, MirrorMode, ResyncConfig};
use crate::primary::gen_state::{GenState, Reannounce};
use crate::primary::group::{GroupMember, SiteGroup};
use crate::primary::locks::RangeLocks;
use crate::primary::oos_store::OosStore;

/// What a state-machine step leaves to do once the link's lock is released.
#[derive(Default)]
#[must_use = "a step's waiters, group cut and start-gate report happen in finish()"]
pub(super) struct Step {
    /// The actions only the caller can perform.
    actions: Vec<Action>,
    /// The event was not allowed in the link's phase (nothing changed).
    pub illegal: bool,
    failed: BTreeMap<u64, Pending>,
    freed: bool,
    error: Option<LinkError>,
    cut_group: Option<String>,
    demote: bool,
    report_met: bool,
}

impl Step {
    /// Performs what must not run under the lock: the group is cut before
    /// any failed write is answered to the host (no write that depends on
    /// one of these can reach the site), then the waiters are failed.
    pub(super) fn finish(self, link: &MirrorLink) -> Vec<Action> {
        if let Some(reason) = &self.cut_group {
            if let Some((group, idx)) = link.group.get() {
                group.suspend(
                    *idx,
                    &format!("volume {} lost its mirror: {reason}", link.volume),
                );
            }
        }
        if self.freed {
            link.al_wake.notify_waiters();
        }
        if let Some(error) = &self.error {
            for (_, p) in self.failed {
                let _ = p.done.send(Err(MirrorFailure::Failed {
                    volume: link.volume.clone(),
                    peer: link.peer.clone(),
                    offset: p.offset,
                    error: error.clone(),
                }));
            }
        }
        if let Some(ctx) = link.ctx.get() {
            if self.demote {
                if let Some(hook) = &ctx.on_peer_ahead {
                    let node = link.shared().peer_node.clone().unwrap_or_default();
                    hook(format!(
                        "mirror {} ({node}) holds a newer generation (it was promoted)",
                        link.peer
                    ));
                }
            }
            // After the demotion: a volume that must demote refuses host
            // writes before the start gate lets them through.
            if self.report_met {
                ctx.gen.link_judged();
            }
        }
        self.actions
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

/// What the sender task writes: a frame, or a Write whose data the
/// pipeline (or the caller) already made ready for the wire.
pub(crate) enum Outgoing {
    Frame(Frame),
    /// Consistency group: send nothing after this until each sibling's
    /// writes up to the given send number are acknowledged.
    Gate(crate::primary::group::Gate),
    Encoded {
        id: u64,
        offset: u64,
        fua: bool,
        write: EncodedWrite,
    },
}

pub(super) struct Shared {
    /// The link's phase and connection epoch: every change of them goes
    /// through [`MirrorLink::drive`].
    link: LinkMachine,
    /// The sender task's queue while connected.
    tx: Option<mpsc::UnboundedSender<Outgoing>>,
    /// Cancels the current connection's tasks.
    conn_cancel: Option<CancellationToken>,
    inflight: BTreeMap<u64, Pending>,
    /// Send sequence numbers of writes sent and not yet acknowledged, and
    /// the last one given (a consistency group's siblings wait on them).
    unacked_sends: std::collections::BTreeSet<u64>,
    next_send: u64,
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

impl Shared {
    /// What the mirror acknowledged but may not have flushed: since the
    /// last FLUSH was sent, and covered by FLUSHes not yet acknowledged.
    /// Lost if the mirror crashes, so it counts as out of sync wherever the
    /// bitmap is stored, and is marked when the link fails (a crash here,
    /// then one there, must not forget it: the simulation's seed 24).
    fn unflushed_maps(&self) -> impl Iterator<Item = &Bitmap> {
        std::iter::once(&self.unflushed).chain(self.flushing.iter().map(|(_, b)| b))
    }

    fn unflushed_touches(&self, offset: u64, len: u64) -> bool {
        self.unflushed_maps().any(|b| marked_in(b, offset, len))
    }

    /// The bitmap as it is stored: what is marked plus what the mirror
    /// acknowledged and may not have flushed. With the bitmap's change
    /// count it covers.
    fn bitmap_to_store(&self) -> (Bitmap, u64) {
        let mut bm = self.bitmap.clone();
        for b in self.unflushed_maps() {
            bm.union_with(b).expect("same shape");
        }
        (bm, self.bitmap.changes())
    }

    /// True while a request that changes bytes of `[offset, offset+len)`
    /// is in flight (prepared or sent, not yet acknowledged or failed).
    fn inflight_overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.inflight
            .values()
            .any(|p| p.len > 0 && p.offset < end && offset < p.offset.saturating_add(p.len))
    }

    /// Whether the stored bitmap may lack something.
    fn store_due(&self) -> bool {
        self.bitmap.changes() != self.stored_changes
            || !self.unflushed.is_clear()
            || !self.flushing.is_empty()
    }
}

/// Counters for /metrics.
#[derive(Default)]
pub struct LinkCounters {
    /// Consistency group: writes held until the siblings' earlier writes
    /// were acknowledged (one per cross-volume epoch).
    pub group_gates: AtomicU64,
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
    /// With `[tls]`: the name the mirror's certificate must hold (`peer_name`).
    peer_name: Option<String>,
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
    /// Consistency group: the last send sequence number given, the lowest
    /// one not yet acknowledged, and the group's answer count at this
    /// link's last gate.
    last_sent: AtomicU64,
    acked_low: tokio::sync::watch::Sender<u64>,
    group_seen: AtomicU64,
    /// What the link runs with, kept to start a catch-up from the write path.
    ctx: std::sync::OnceLock<LinkContext>,
    /// The mirror may hold the current generation as in sync: it was sent
    /// an "in sync" since the last rotation (or the node just started, and
    /// nothing is known). A write this mirror misses then starts a new
    /// generation first.
    holds_current: AtomicBool,
    /// The codec this link's config asks for (`compression`).
    configured_codec: Codec,
    /// The codec the last handshake agreed on ([`Codec::code`]): the
    /// configured one if the mirror supports it, else none. Write data is
    /// compressed with this one.
    codec: AtomicU8,
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
}

pub(super) fn mode_code(m: MirrorMode) -> u8 {
    match m {
        MirrorMode::Sync => 0,
        MirrorMode::Async => 1,
    }
}

/// True when `b` marks any region of `[offset, offset+len)`: O(1) for a
/// clear bitmap, else only the range's own regions, never a scan.
fn marked_in(b: &Bitmap, offset: u64, len: u64) -> bool {
    if len == 0 || b.is_clear() {
        return false;
    }
    let first = b.region_of(offset);
    let last = b.region_of(offset.saturating_add(len - 1));
    (first..=last).any(|r| b.is_region_marked(r))
}

/// A clear bitmap of the same shape as `b`.
pub(super) fn empty_like(b: &Bitmap) -> Bitmap {
    Bitmap::new(b.volume_size(), b.granularity()).expect("same shape as a valid bitmap")
}

/// What a link needs from its volume and node.
#[derive(Clone)]
pub struct LinkContext {
    /// `secret_file`; `None` with `[tls]` alone (validated: one of the two
    /// is set). The handshake key is made from it and the TLS session
    /// ([`blockmirror_repl::LinkStream::link_key`]).
    pub secret: Option<Arc<[u8]>>,
    /// `[tls]`: connections to mirrors use mutual TLS.
    pub tls: Option<Arc<crate::tls::TlsStore>>,
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
            peer_name: cfg.peer_name.clone(),
            mode: AtomicU8::new(mode_code(cfg.mode)),
            max_lag_bytes: cfg.max_lag_bytes,
            max_lag: cfg.max_lag,
            lag_policy: cfg.lag_policy,
            durable_barriers: cfg.durable_barriers,
            completed: AtomicBool::new(false),
            barriers: AtomicU64::new(0),
            last_sent: AtomicU64::new(0),
            acked_low: tokio::sync::watch::channel(1).0,
            group_seen: AtomicU64::new(0),
            ctx: std::sync::OnceLock::new(),
            holds_current: AtomicBool::new(true),
            configured_codec: cfg.compression,
            codec: AtomicU8::new(cfg.compression.code()),
            volume: volume.to_owned(),
            timeout: tuning.timeout,
            next_id: AtomicU64::new(1),
            shared: Mutex::new(Shared {
                link: LinkMachine::new(true),
                tx: None,
                conn_cancel: None,
                inflight: BTreeMap::new(),
                unacked_sends: Default::default(),
                next_send: 0,
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
                passes: 0,
                last_suspension: None,
                maybe: None,
            }),
            resync: tuning.resync,
            bucket: Mutex::new(TokenBucket::new(tuning.resync.rate, catchup::RATE_BURST, 0)),
            born: Instant::now(),
            hashes: Mutex::new(std::collections::HashMap::new()),
            last_host_write: AtomicU64::new(0),
            active: watch::Sender::new(true),
            counters: LinkCounters::default(),
            al_wake: tokio::sync::Notify::new(),
            group: std::sync::OnceLock::new(),
            store,
            local,
        }
    }

    pub(super) fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().expect("mirror link state poisoned")
    }

    /// True when host writes reach this mirror now.
    pub fn is_live(&self) -> bool {
        self.shared().link.is_live()
    }

    /// Feeds `event` to the link's state machine and performs what it
    /// decided; returns the actions only the caller can perform (adopt a
    /// connection, go live, start a catch-up, demote the volume). `why`
    /// says why a connection ends, for events that end one.
    pub(super) fn drive(&self, event: Event, why: Option<LinkError>) -> Vec<Action> {
        let step = {
            let mut sh = self.shared();
            self.step(&mut sh, event, why)
        };
        step.finish(self)
    }

    /// [`MirrorLink::drive`] for a caller that holds the lock (and must
    /// call [`Step::finish`] once it released it).
    pub(super) fn step(&self, sh: &mut Shared, event: Event, why: Option<LinkError>) -> Step {
        let mut step = Step::default();
        let actions = match sh.link.on(event) {
            Ok(Outcome::Moved(a)) => {
                crate::daemon::events::poke();
                a
            }
            Ok(Outcome::Stale) => return step,
            Err(IllegalEvent { phase, event }) => {
                // A race the driver resolves by dropping what it holds (a
                // connection that arrived after the link was parked).
                debug!(volume = %self.volume, peer = %self.peer, ?phase, ?event, "link event not taken in this phase");
                step.illegal = true;
                return step;
            }
        };
        let why = why.unwrap_or(LinkError::Closed);
        for a in actions {
            match a {
                Action::CancelConnection => {
                    if let Some(c) = sh.conn_cancel.take() {
                        c.cancel();
                    }
                    sh.last_error = Some(why.to_string());
                }
                Action::FailInflight => {
                    sh.tx = None;
                    if why.expected() {
                        info!(volume = %self.volume, peer = %self.peer, inflight = sh.inflight.len(), reason = %why, "mirror link closed");
                    } else {
                        warn!(volume = %self.volume, peer = %self.peer, reason = %why, inflight = sh.inflight.len(), "mirror link failed; degraded");
                    }
                    let (failed, freed) = self.fail_requests(sh);
                    step.failed = failed;
                    step.freed = freed;
                    step.error = Some(why.clone());
                }
                Action::CutGroup => step.cut_group = Some(why.to_string()),
                Action::CountFailure => {
                    self.counters.failures.fetch_add(1, Relaxed);
                }
                Action::ReportMet => step.report_met = true,
                Action::DemoteVolume => step.demote = true,
                Action::WarnInconsistent => {
                    warn!(volume = %self.volume, peer = %self.peer, lag_bytes = sh.inflight_bytes,
                        "async mirror past its lag bound: recording writes for resync; mirror inconsistent");
                }
                other => step.actions.push(other),
            }
        }
        debug_assert_eq!(
            sh.link.is_live(),
            sh.tx.is_some()
                || step
                    .actions
                    .iter()
                    .any(|a| matches!(a, Action::GoLive { .. }))
        );
        step
    }

    /// Whether a write this mirror misses must start a new generation: it
    /// may hold the current one as in sync.
    pub fn may_hold_current(&self) -> bool {
        self.holds_current.load(SeqCst)
    }

    /// Async: the configured lag bound in bytes (`max_lag_bytes`).
    pub fn max_lag_bytes(&self) -> u64 {
        self.max_lag_bytes
    }

    /// Async: the configured lag bound in time (`max_lag`).
    pub fn max_lag(&self) -> Duration {
        self.max_lag
    }

    /// How Write data is compressed on this link now (as negotiated).
    pub fn compression(&self) -> Codec {
        Codec::from_code(self.codec.load(Relaxed)).unwrap_or(Codec::None)
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
        if let Some((group, _)) = self.group.get() {
            group.answered();
        }
    }

    /// The link's state now.
    pub fn state(&self) -> SyncState {
        self.shared().link.sync_state()
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
            connection: sh.link.connection(),
            state: sh.link.sync_state(),
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

    /// Marks a region out of sync (the caller knows the mirror may lack it).
    pub fn mark(&self, offset: u64, len: u64) {
        self.shared().bitmap.mark(offset, len);
    }

    /// Puts this link in a consistency group (once, before it runs).
    pub fn set_group(&self, group: Arc<SiteGroup>, idx: usize) {
        let _ = self.group.set((group, idx));
    }

    /// The mirror's replication address (job connections go there too).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name the mirror's certificate must hold, if configured.
    pub fn peer_name(&self) -> Option<&str> {
        self.peer_name.as_deref()
    }

    /// What the link runs with (secret, hello), once it started.
    pub fn context(&self) -> Option<&LinkContext> {
        self.ctx.get()
    }

    /// Whether the link may connect (false while the volume is a mirror).
    pub fn is_active(&self) -> bool {
        *self.active.borrow()
    }

    /// Wakes a dormant link, or parks a running one: its connection closes
    /// (what was in flight is marked) and it stays disconnected.
    pub fn set_active(&self, on: bool) {
        // The machine first when waking (the run loop, woken by the flag,
        // finds the link ready to connect), the flag first when parking (a
        // connection attempt that starts after it is refused by the machine).
        if on {
            self.drive(Event::Activate, None);
            self.active.send_replace(true);
        } else {
            self.active.send_replace(false);
            self.drive(Event::Park, Some(LinkError::Parked));
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
}

impl GroupMember for MirrorLink {
    /// A sibling in this link's consistency group lost its mirror: cut this
    /// link too (whatever its epoch), without propagating further.
    fn suspend_for_group(&self, reason: &str) {
        self.drive(
            Event::Lost {
                epoch: None,
                cause: FailCause::Group,
            },
            Some(LinkError::Group(reason.to_owned())),
        );
    }

    fn last_sent(&self) -> u64 {
        self.last_sent.load(SeqCst)
    }

    fn acked_low(&self) -> tokio::sync::watch::Receiver<u64> {
        self.acked_low.subscribe()
    }
}

impl Reannounce for MirrorLink {
    fn forget_current(&self) {
        self.holds_current.store(false, SeqCst);
    }

    fn assume_current(&self) {
        self.holds_current.store(true, SeqCst);
    }

    fn reannounce(self: Arc<Self>) {
        MirrorLink::reannounce(self);
    }
}
