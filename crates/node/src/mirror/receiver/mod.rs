//! The mirror's side: the replication listener, and the loop that applies
//! what the authenticated primary sends.
//!
//! Only an authenticated primary changes a mirror volume (its NBD export is
//! read-only). One primary at a time feeds a volume: a link from another
//! primary node while one is connected is refused with an Error frame. A new
//! link from the *same* primary replaces the old one (which may be a
//! half-open leftover of a partition): the old apply loop is cancelled and
//! the new one starts only after it has stopped, so no frame of the old
//! link can be applied after one of the new.
//!
//! Operations are handed, in arrival order, to the apply engine
//! ([`super::apply`], seed 003): many tasks write the backend at once, and
//! operations whose ranges overlap apply in arrival order (the primary sends
//! overlapping writes in the order it applied them locally, so both images
//! stay equal). Each operation is acknowledged as soon as it is applied, in
//! whatever order they finish; the primary matches acknowledgements by id.
//!
//! Durability never holds the queue up: a FLUSH waits only for the
//! operations that arrived before it, runs its fdatasync on a task of its
//! own while later writes go on, and is acknowledged when the sync returns.
//! A FUA write is written with RWF_DSYNC on its task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockmirror_core::{compare_generations, Generations, MirrorLabel, Relation, VolumeMeta};
use blockmirror_repl::{ErrorCode, Frame, FrameReader, FrameWriter, SyncPhase, VolumeIdentity};
use blockmirror_storage::Backend;

use crate::volume::meta_file::{MetaCell, MetaFileError};
use crate::volume::role::RoleCell;

use super::apply::{Applied, ApplyConfig, ApplyEngine, ApplyMetrics, ApplyOp};
use blockmirror_repl::{LinkStream, LinkWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

mod error;
pub use error::ReceiveError;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A link that brings no frame for this long is taken as dead, unless the
/// node's `primary_silence` says otherwise: a primary pings an idle link at
/// least every second (its watchdog), so only a primary that is gone (power
/// loss, partition: no FIN ever arrives) stays this silent. The mirror then
/// shows no primary, and can be promoted without `--force`.
pub const PRIMARY_SILENCE: Duration = crate::daemon::config::DEFAULT_PRIMARY_SILENCE;
/// The apply tag of an operation nobody waits for (a Barrier with id 0).
const UNANSWERED: u64 = u64::MAX;

/// The link feeding a target now.
struct Feeding {
    node: String,
    conn: u64,
    token: CancellationToken,
    /// The primary's fencing epoch (its Hello's).
    epoch: u64,
}

/// A mirror volume as the receiver sees it.
pub struct MirrorTarget {
    /// The volume's fencing state: the newest epoch known here (0 without
    /// a cluster). A link from an older epoch is refused, and one already
    /// running is cut at its next frame once a newer epoch is known.
    pub fence: Arc<crate::cluster::fence::Fence>,
    pub name: String,
    pub backend: Arc<dyn Backend>,
    /// The volume's record: generations and mirror label.
    pub meta: Arc<MetaCell>,
    /// The volume's role: only a mirror takes a primary's link (a volume
    /// that is primary here, or promoting, or demoting, refuses them).
    role: Arc<RoleCell>,
    /// The link feeding it now: primary node, connection number, and what
    /// cancels that link.
    current: Mutex<Option<Feeding>>,
    next_conn: AtomicU64,
    /// Held by the running apply loop: one at a time, strictly.
    apply_slot: Arc<tokio::sync::Semaphore>,
    pub applied_bytes: AtomicU64,
    pub applied_ops: AtomicU64,
    /// How the apply engine is cut up, and what it has done.
    pub apply: ApplyConfig,
    pub apply_metrics: Arc<ApplyMetrics>,
    /// The volume's own links (its `[[volume.mirror]]` tables), dormant while
    /// it is a mirror: their bitmaps are what this node wrote as a primary
    /// that its peers may lack, reported to a new primary (failback).
    own_links: std::sync::OnceLock<Vec<Arc<crate::primary::MirrorLink>>>,
    /// A link silent this long is taken as dead ([`PRIMARY_SILENCE`] unless
    /// set by [`MirrorTarget::with_primary_silence`]).
    primary_silence: Duration,
}

impl MirrorTarget {
    /// A target that accepts its primary while `role` says mirror (a
    /// primary volume on a node that can also serve it as a mirror refuses
    /// links until demoted).
    pub fn new(
        name: &str,
        meta: Arc<MetaCell>,
        backend: Arc<dyn Backend>,
        apply: ApplyConfig,
        role: Arc<RoleCell>,
    ) -> Self {
        Self {
            fence: Arc::new(crate::cluster::fence::Fence::new()),
            apply,
            apply_metrics: Arc::new(ApplyMetrics::new(apply.groups)),
            name: name.to_owned(),
            meta,
            role,
            own_links: std::sync::OnceLock::new(),
            backend,
            current: Mutex::new(None),
            next_conn: AtomicU64::new(1),
            apply_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            applied_bytes: AtomicU64::new(0),
            applied_ops: AtomicU64::new(0),
            primary_silence: PRIMARY_SILENCE,
        }
    }

    /// Shares the volume's fencing state.
    pub fn with_fence(mut self, fence: Arc<crate::cluster::fence::Fence>) -> Self {
        self.fence = fence;
        self
    }

    /// A newer epoch is known (the cluster agent read it): a link from an
    /// older one is cut now, not at its next frame (it may be silent).
    pub fn epoch_raised(&self, epoch: u64) {
        if let Some(f) = self.current.lock().expect("poisoned").as_ref() {
            if f.epoch < epoch {
                warn!(volume = %self.name, primary = %f.node, old = f.epoch, new = epoch,
                    "a newer primary was elected: cutting the link of the old one");
                f.token.cancel();
            }
        }
    }

    /// Sets how long a silent link lives (the node's `primary_silence`).
    pub fn with_primary_silence(mut self, silence: Duration) -> Self {
        self.primary_silence = silence;
        self
    }

    pub fn primary_silence(&self) -> Duration {
        self.primary_silence
    }

    /// The identity the handshake reports: the record as it is now.
    pub fn identity(&self) -> VolumeIdentity {
        let m = self.meta.get();
        VolumeIdentity {
            name: self.name.clone(),
            volume_id: m.volume_id,
            size: m.size,
            generation: m.generations.current,
            history: m.generations.history,
        }
    }

    /// Gives the target the volume's own links (once, at start).
    pub fn set_own_links(&self, links: Vec<Arc<crate::primary::MirrorLink>>) {
        let _ = self.own_links.set(links);
    }

    /// What this volume reports to a new primary: whether it wrote its
    /// current generation as a primary itself, and if so the regions its own
    /// links mark (writes some peer may lack: the new primary among them).
    pub fn divergence(&self) -> (bool, Vec<(u64, u64)>) {
        let m = self.meta.get();
        let was_primary = m.generations.current != 0 && m.primary_at == m.generations.current;
        if !was_primary {
            return (false, Vec::new());
        }
        let mut marks: Option<blockmirror_core::bitmap::Bitmap> = None;
        for l in self.own_links.get().into_iter().flatten() {
            let b = l.bitmap();
            match &mut marks {
                None => marks = Some(b),
                Some(m) => {
                    if m.union_with(&b).is_err() {
                        // Different shapes cannot happen (one volume); be safe.
                        m.mark_all();
                    }
                }
            }
        }
        (true, marks.map(|b| b.runs().collect()).unwrap_or_default())
    }

    /// Whether a primary may feed the volume now (it is a mirror here).
    pub fn accepts_primary(&self) -> bool {
        self.role.accepts_primary()
    }

    /// Ends the current link, if any (`Action::CutLink`): after a promotion
    /// nothing of the old primary lands any more; after `--discard-local`
    /// its primary reconnects and judges the generations again (a full
    /// copy).
    pub fn cut_link(&self) {
        if let Some(f) = self.current.lock().expect("poisoned").as_ref() {
            f.token.cancel();
        }
    }

    /// The mirror's own state for /status: `in_sync`, `resyncing`,
    /// `inconsistent` or `degraded` (consistent but not connected); None
    /// when it is not a mirror here (primary, promoting, demoting).
    pub fn state(&self) -> Option<&'static str> {
        if !self.accepts_primary() {
            return None;
        }
        let connected = self.primary().is_some();
        Some(match (self.meta.get().label, connected) {
            (MirrorLabel::InSync, true) => "in_sync",
            (MirrorLabel::Inconsistent, true) => "resyncing",
            (MirrorLabel::Inconsistent, false) => "inconsistent",
            _ => "degraded",
        })
    }

    /// Stores what a SyncState frame announces.
    async fn store_sync_state(
        &self,
        phase: SyncPhase,
        generations: Generations,
    ) -> Result<VolumeMeta, MetaFileError> {
        self.update_meta(move |m| match phase {
            SyncPhase::Resyncing => m.label = MirrorLabel::Inconsistent,
            SyncPhase::InSync => {
                m.generations = generations;
                m.label = MirrorLabel::InSync;
            }
        })
        .await
        .inspect(|_| {
            if phase == SyncPhase::InSync {
                // In step with this primary: what this node once wrote as a
                // primary is superseded (and already reported to it).
                for l in self.own_links.get().into_iter().flatten() {
                    l.clear_marks();
                }
            }
        })
    }

    async fn update_meta(
        &self,
        f: impl FnOnce(&mut VolumeMeta) + Send + 'static,
    ) -> Result<VolumeMeta, MetaFileError> {
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || meta.update(f))
            .await
            .unwrap_or_else(|e| {
                Err(MetaFileError::Io {
                    path: self.meta.path().to_owned(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

    pub fn primary(&self) -> Option<String> {
        self.current
            .lock()
            .expect("poisoned")
            .as_ref()
            .map(|f| f.node.clone())
    }
}

/// The volumes a node's receiver applies to, by name (cluster mode adds
/// volumes while the node runs).
#[derive(Default)]
pub struct Targets {
    by_name: std::sync::RwLock<HashMap<String, Arc<MirrorTarget>>>,
}

impl Targets {
    pub fn insert(&self, t: Arc<MirrorTarget>) {
        self.by_name
            .write()
            .expect("poisoned")
            .insert(t.name.clone(), t);
    }

    pub fn get(&self, name: &str) -> Option<Arc<MirrorTarget>> {
        self.by_name.read().expect("poisoned").get(name).cloned()
    }
}

/// Accepts replication links until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    node: String,
    secret: Option<Arc<[u8]>>,
    tls: Option<Arc<crate::tls::TlsStore>>,
    targets: Arc<Targets>,
    jobs: Arc<super::jobs::JobService>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (node, secret, tls, targets, jobs, shutdown) = (
            node.clone(),
            secret.clone(),
            tls.clone(),
            targets.clone(),
            jobs.clone(),
            shutdown.clone(),
        );
        tracker.spawn(async move {
            handle(
                stream,
                peer.to_string(),
                &node,
                secret.as_deref(),
                tls.as_deref(),
                &targets,
                jobs,
                shutdown,
            )
            .await;
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    tcp: TcpStream,
    peer: String,
    node: &str,
    secret: Option<&[u8]>,
    tls: Option<&crate::tls::TlsStore>,
    targets: &Targets,
    jobs: Arc<super::jobs::JobService>,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let lookup = |name: &str| targets.get(name).map(|t| t.identity());
    // TLS first (with `[tls]`: the primary's certificate must chain to the
    // CA), then the HMAC handshake inside it, keyed by the secret, the TLS
    // session, or both (`LinkStream::link_key`); one deadline for both.
    let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut stream = match crate::tls::accept(tcp, tls).await {
            Ok(s) => s,
            Err(e) => return Err(format!("TLS handshake failed: {e}")),
        };
        let key = stream.link_key(secret).map_err(|e| e.to_string())?;
        match blockmirror_repl::accept_any(&mut stream, &key, node, lookup).await {
            Ok(x) => Ok((stream, x, key.mode())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let (mut stream, (primary, volume, purpose), key_mode) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "replication peer refused");
            return;
        }
        Err(_) => {
            warn!(%peer, "replication peer refused: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    // TLS alone: the certificate is the primary's only credential, so it
    // must name the node the Hello claims (else any node of the CA could
    // pass for another, and replace its link). With the secret too, the
    // secret's holders are trusted to say who they are, as without TLS.
    if key_mode == blockmirror_repl::KeyMode::Tls {
        if let Err(reason) = crate::tls::check_peer_is(&stream, &primary.node) {
            let e = ReceiveError::CertificateName {
                peer: primary.node.clone(),
                reason,
            };
            refuse(stream, &peer, e).await;
            return;
        }
    }
    // A job connection (verify, remote read) goes to the job handler, never
    // near the replication link's replacement logic below.
    if matches!(purpose, blockmirror_repl::Purpose::Jobs) {
        return jobs.serve(stream, primary, &volume.name, shutdown).await;
    }
    let Some(target) = targets.get(&volume.name) else {
        return;
    };
    // Generations (authenticated by the handshake): a mirror takes data only
    // from a primary that is at its generation or ahead of it, or when it
    // holds nothing (blank). A promoted volume takes nothing.
    let mine = Generations {
        current: volume.generation,
        history: volume.history,
    };
    let theirs = Generations {
        current: primary.volume.generation,
        history: primary.volume.history,
    };
    let rel = compare_generations(&mine, &theirs);
    let refusal = if !target.accepts_primary() {
        Some(ReceiveError::Promoted {
            volume: target.name.clone(),
            peer: primary.node.clone(),
        })
    } else if !target.fence.synced() {
        Some(ReceiveError::EpochUnknown {
            volume: target.name.clone(),
            peer: primary.node.clone(),
        })
    } else if primary.epoch < target.fence.epoch() {
        Some(ReceiveError::StaleEpoch {
            volume: target.name.clone(),
            peer: primary.node.clone(),
            epoch: primary.epoch,
            newest: target.fence.epoch(),
        })
    } else if matches!(
        rel,
        Relation::Same | Relation::PeerAhead | Relation::LocalBlank
    ) {
        None
    } else {
        Some(ReceiveError::Generations {
            volume: target.name.clone(),
            peer: primary.node.clone(),
            relation: rel,
            ours: mine.to_display(),
            theirs: theirs.to_display(),
        })
    };
    if let Some(e) = refusal {
        refuse(stream, &peer, e).await;
        return;
    }
    let conn = target.next_conn.fetch_add(1, Relaxed);
    let token = shutdown.child_token();
    let busy = {
        let mut current = target.current.lock().expect("poisoned");
        match current.as_ref() {
            // Another primary of the same epoch: one feeds at a time. (Of
            // an older epoch: it was deposed, the newer one replaces it.)
            Some(f) if f.node != primary.node && f.epoch >= primary.epoch => {
                Some(ReceiveError::AlreadyFed {
                    volume: target.name.clone(),
                    peer: primary.node.clone(),
                    current: f.node.clone(),
                })
            }
            other => {
                if let Some(f) = other {
                    if f.node == primary.node {
                        info!(volume = %target.name, primary = %primary.node, old_link = f.conn,
                            "a new link from the same primary replaces the old one");
                    } else {
                        warn!(volume = %target.name, primary = %primary.node, epoch = primary.epoch,
                            old = %f.node, old_epoch = f.epoch,
                            "a primary of a newer epoch replaces the old one's link");
                    }
                    f.token.cancel();
                }
                target.fence.raise(primary.epoch);
                *current = Some(Feeding {
                    node: primary.node.clone(),
                    conn,
                    token: token.clone(),
                    epoch: primary.epoch,
                });
                None
            }
        }
    };
    if let Some(e) = busy {
        refuse(stream, &peer, e).await;
        return;
    }
    // Wait until a replaced link's apply loop has stopped.
    let slot = tokio::select! {
        p = target.apply_slot.clone().acquire_owned() => p.expect("never closed"),
        _ = token.cancelled() => return,
    };
    // Before anything else, tell the primary what this side may hold that
    // it lacks (a returning old primary's own writes; usually nothing).
    let (was_primary, ranges) = target.divergence();
    let reported: u64 = ranges.iter().map(|r| r.1).sum();
    if was_primary {
        info!(volume = %target.name, primary = %primary.node, regions = ranges.len(), bytes = reported,
            "this node wrote its current generation as a primary: reporting its divergent regions");
    }
    let reason = {
        let mut w = FrameWriter::new(&mut stream);
        let mut sent = Ok(());
        for f in blockmirror_repl::divergence_frames(was_primary, &ranges) {
            w.queue(&f);
        }
        if let Err(e) = w.flush().await {
            sent = Err(e);
        }
        sent.err()
            .map(|e| format!("sending the divergence report: {e}"))
    };
    let reason = match reason {
        Some(r) => r,
        None => {
            info!(volume = %target.name, primary = %primary.node, %peer,
                compression = %primary.compression, tls = stream.is_tls(), "replication link up");
            apply_loop(stream, &target, &primary.node, primary.epoch, token).await
        }
    };
    // Without its primary, an in-sync mirror is a point in time the primary
    // passed through, and may fall behind.
    if target.meta.get().label == MirrorLabel::InSync {
        // Conditional inside the update: a promote may have run meanwhile.
        if let Err(e) = target
            .update_meta(|m| {
                if m.label == MirrorLabel::InSync {
                    m.label = MirrorLabel::Consistent;
                }
            })
            .await
        {
            warn!(volume = %target.name, error = %e, "storing the mirror label failed");
        }
    }
    drop(slot);
    {
        let mut current = target.current.lock().expect("poisoned");
        if current.as_ref().is_some_and(|f| f.conn == conn) {
            *current = None;
        }
    }
    info!(volume = %target.name, primary = %primary.node, %reason, "replication link down");
}

/// Applies frames until the link ends; returns why it ended.
///
/// Frames are decoded in arrival order and handed to the apply engine
/// ([`super::apply`]), which runs them on many tasks while keeping
/// overlapping ones in order. Acknowledgements are collected as operations
/// finish and written, in one vectored write, whenever the loop would wait
/// (no hand-off to another task: one wake-up less per batch). The primary
/// reads acknowledgements on a task of its own, so that write does not wait
/// on the primary's sending. While the engine is full the socket is not read
/// (back-pressure to the primary).
async fn apply_loop(
    stream: LinkStream,
    t: &MirrorTarget,
    peer: &str,
    epoch: u64,
    shutdown: CancellationToken,
) -> String {
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    // Replies computed off the loop (checksum-resync hashes).
    let (bg_tx, mut bg_rx) = mpsc::unbounded_channel::<Frame>();
    let mut engine = match ApplyEngine::new(t.backend.clone(), t.apply, t.apply_metrics.clone()) {
        Ok(e) => e,
        Err(e) => {
            warn!(volume = %t.name, error = %e, "cannot apply");
            let _ = writer
                .send(&Frame::Error {
                    id: 0,
                    code: ErrorCode::Protocol,
                    message: e.to_string(),
                })
                .await;
            return e.to_string();
        }
    };
    let size = t.meta.get().size;
    let in_range = |offset: u64, len: u64| match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ReceiveError::OutOfRange {
            volume: t.name.clone(),
            peer: peer.to_owned(),
            offset,
            len,
            size,
        }),
    };
    // Replies gathered until the loop would wait, then sent together.
    let mut acks: Vec<Frame> = Vec::new();
    let mut applied: Vec<Applied> = Vec::new();
    let mut heard = tokio::time::Instant::now();
    let silence = t.primary_silence;
    let reason = loop {
        engine.ready(&mut applied);
        to_acks(t, peer, &mut applied, &mut acks);
        while let Ok(f) = bg_rx.try_recv() {
            acks.push(f);
        }
        let frame = if engine.is_full() {
            None
        } else {
            match reader.next_buffered() {
                Ok(f) => f.map(Ok),
                Err(e) => Some(Err(e)),
            }
        };
        let frame = match frame {
            Some(f) => f,
            None => {
                // About to wait: reply to everything so far first.
                engine.publish();
                if let Err(why) = send_acks(&mut writer, &mut acks, &shutdown).await {
                    break why;
                }
                if engine.is_full() {
                    t.apply_metrics.full_stalls.fetch_add(1, Relaxed);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break "link closed (replaced, or the node is shutting down)".to_string(),
                    _ = engine.completions(&mut applied) => {
                        // The primary's silence counts from the last answer.
                        heard = tokio::time::Instant::now();
                        continue;
                    }
                    Some(f) = bg_rx.recv() => {
                        acks.push(f);
                        continue;
                    }
                    f = reader.next(), if !engine.is_full() => match f {
                        Ok(Some(f)) => Ok(f),
                        Ok(None) => break "primary closed the link".into(),
                        Err(e) => Err(e),
                    },
                    // Only while nothing is being applied: a primary waiting
                    // for a slow operation here sends nothing, rightly.
                    _ = tokio::time::sleep_until(heard + silence), if engine.held() == 0 && !engine.has_running() => {
                        warn!(volume = %t.name, silent_ms = silence.as_millis() as u64,
                            "no frame from the primary (not even its pings): taking the link as dead");
                        break format!("no frame from the primary for {silence:?}");
                    }
                }
            }
        };
        heard = tokio::time::Instant::now();
        // Every frame is judged against the newest epoch known here: once a
        // newer primary is elected, nothing more of this one lands.
        let newest = t.fence.epoch();
        if epoch < newest {
            warn!(volume = %t.name, primary = peer, epoch, newest,
                "frame from a primary of an older fencing epoch: refused, closing its link");
            acks.push(Frame::Error {
                id: 0,
                code: ErrorCode::Protocol,
                message: format!("fencing epoch {epoch} is older than {newest}"),
            });
            let _ = send_acks(&mut writer, &mut acks, &shutdown).await;
            break format!("fenced: epoch {epoch} superseded by {newest}");
        }
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // Corrupted or truncated: nothing of this frame was applied.
                warn!(volume = %t.name, error = %e, "closing replication link");
                acks.push(Frame::Error {
                    id: 0,
                    code: ErrorCode::Protocol,
                    message: e.to_string(),
                });
                break e.to_string();
            }
        };
        let (id, range, op) = match frame {
            Frame::Write {
                id,
                offset,
                fua,
                data,
            } => (
                id,
                in_range(offset, data.len() as u64),
                ApplyOp::Write { offset, data, fua },
            ),
            Frame::Flush { id } => (id, Ok(()), ApplyOp::Flush),
            // An asynchronous primary's epoch boundary: what follows waits
            // for everything before it (crash consistency, DESIGN.md 2).
            Frame::Barrier { id, durable } => (
                if id == 0 { UNANSWERED } else { id },
                Ok(()),
                ApplyOp::Barrier { durable },
            ),
            Frame::Trim {
                id,
                offset,
                len,
                fua,
            } => (
                id,
                in_range(offset, u64::from(len)),
                ApplyOp::Trim {
                    offset,
                    len: u64::from(len),
                    fua,
                },
            ),
            Frame::WriteZeroes {
                id,
                offset,
                len,
                fua,
                may_trim,
            } => (
                id,
                in_range(offset, u64::from(len)),
                ApplyOp::Zeroes {
                    offset,
                    len: u64::from(len),
                    may_trim,
                    fua,
                },
            ),
            Frame::Ping { id } => {
                acks.push(Frame::Pong { id });
                continue;
            }
            Frame::HashRequest { id, offset, len } => {
                // Hashed on the blocking pool; the reply goes out when ready.
                match in_range(offset, u64::from(len)) {
                    Ok(()) => {
                        let (backend, tx) = (t.backend.clone(), bg_tx.clone());
                        let peer = peer.to_owned();
                        tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; len as usize];
                            let reply = match backend.read_at(&mut buf, offset) {
                                Ok(()) => Frame::HashReply {
                                    id,
                                    hash: *blake3::hash(&buf).as_bytes(),
                                },
                                Err(source) => ReceiveError::Storage { peer, source }.nack(id),
                            };
                            let _ = tx.send(reply);
                        });
                    }
                    Err(e) => acks.push(e.nack(id)),
                }
                continue;
            }
            Frame::SyncState {
                id,
                phase,
                generation,
                history,
            } => {
                // Rare (a resync's start and end): stored before the Ack.
                let g = Generations {
                    current: generation,
                    history,
                };
                acks.push(match t.store_sync_state(phase, g).await {
                    Ok(m) => {
                        info!(volume = %t.name, label = m.label.as_str(),
                            generations = %m.generations.to_display(), "mirror state stored");
                        crate::daemon::events::poke();
                        Frame::Ack { id }
                    }
                    Err(source) => {
                        let e = ReceiveError::StoreState {
                            volume: t.name.clone(),
                            peer: peer.to_owned(),
                            source,
                        };
                        warn!(error = %e, "storing the mirror state failed");
                        e.nack(id)
                    }
                });
                continue;
            }
            f => {
                let e = ReceiveError::UnexpectedFrame {
                    volume: t.name.clone(),
                    peer: peer.to_owned(),
                    kind: format!("{:?}", f.kind()),
                };
                acks.push(Frame::Error {
                    id: f.id(),
                    code: ErrorCode::Protocol,
                    message: e.to_string(),
                });
                break e.to_string();
            }
        };
        match range {
            Ok(()) => engine.submit(id, op, &mut applied),
            Err(e) => {
                t.applied_ops.fetch_add(1, Relaxed);
                acks.push(e.nack(id));
            }
        }
        if acks.len() >= 256 {
            if let Err(why) = send_acks(&mut writer, &mut acks, &shutdown).await {
                break why;
            }
        }
    };
    // What is running finishes (never half-applied); what has not started
    // is dropped, unacknowledged, so the primary has it marked for resync.
    applied.extend(engine.drain().await);
    to_acks(t, peer, &mut applied, &mut acks);
    let _ = send_acks(&mut writer, &mut acks, &shutdown).await;
    reason
}

/// Refuses a link: logs why and tells the primary in an Error frame.
async fn refuse(stream: LinkStream, addr: &str, e: ReceiveError) {
    let primary = match &e {
        ReceiveError::Promoted { peer, .. }
        | ReceiveError::Generations { peer, .. }
        | ReceiveError::AlreadyFed { peer, .. }
        | ReceiveError::StaleEpoch { peer, .. }
        | ReceiveError::EpochUnknown { peer, .. }
        | ReceiveError::CertificateName { peer, .. } => peer.as_str(),
        _ => "?",
    };
    if matches!(e, ReceiveError::AlreadyFed { .. }) {
        warn!(peer = %addr, %primary, "{e}; refusing the second link");
    } else {
        warn!(peer = %addr, %primary, "{e}");
    }
    let code = match e {
        ReceiveError::CertificateName { .. } => ErrorCode::AuthFailed,
        _ => ErrorCode::Busy,
    };
    let mut w = FrameWriter::new(stream);
    let _ = w
        .send(&Frame::Error {
            id: 0,
            code,
            message: e.to_string(),
        })
        .await;
}

/// Writes the gathered replies; gives up when the node shuts down (a
/// primary that stopped reading must not hold the shutdown).
async fn send_acks(
    w: &mut FrameWriter<LinkWrite>,
    acks: &mut Vec<Frame>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    if acks.is_empty() {
        return Ok(());
    }
    acks.iter().for_each(|f| w.queue(f));
    acks.clear();
    tokio::select! {
        // A flush that can finish at once does, even during shutdown.
        biased;
        r = w.flush() => r.map_err(|e| format!("primary went away: {e}")),
        _ = shutdown.cancelled() => Err("link closed (replaced, or the node is shutting down)".into()),
    }
}

/// Turns applied operations into Ack or Nack frames, and counts them.
fn to_acks(t: &MirrorTarget, peer: &str, applied: &mut Vec<Applied>, acks: &mut Vec<Frame>) {
    for a in applied.drain(..) {
        if a.tag == UNANSWERED {
            // An epoch barrier with id 0: the primary does not wait for it.
            continue;
        }
        t.applied_ops.fetch_add(1, Relaxed);
        acks.push(match a.result {
            Ok(()) => {
                t.applied_bytes.fetch_add(a.written, Relaxed);
                Frame::Ack { id: a.tag }
            }
            Err(source) => {
                let e = ReceiveError::Storage {
                    peer: peer.to_owned(),
                    source,
                };
                warn!(error = %e, "mirror apply failed");
                e.nack(a.tag)
            }
        });
    }
}

#[cfg(test)]
mod tests;
