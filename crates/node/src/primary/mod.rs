//! The primary's side: its write path to its mirrors and what serves it.
//!
//! - [`locks`]: async range locks (overlapping writes in one order).
//! - [`group`]: consistency groups (suspend together, resume together).
//! - [`link`]: one mirror of a primary volume (connection, requests in
//!   flight, out-of-sync bitmap, catch-up, watchdog).
//! - [`pipeline`]: large writes split into tracks, prepared in parallel,
//!   released to every link in order (seeds 000/001).
//! - [`oos_store`]: each link's out-of-sync bitmap and activity log on disk.
//! - [`verify`]: online verify against the mirrors (seed 002).
//! - [`reads`]: read balancing and remote reads (seed 004 FIG. 9).
//! - [`job_conn`]: the client of a mirror's job connection (verify, reads).
//!
//! The write path ([`Replicator::replicate`]), seed 004's detour rebuilt:
//!
//! 1. With `on_mirror_failure = "fence"` and a mirror away, refuse (EIO)
//!    before anything is written: nothing lands that the mirror lacks.
//! 2. Lock the byte range (overlapping writes queue in arrival order), and
//!    make sure its extents are durably active in each mirror's activity log
//!    (after a crash, those extents are resynced).
//! 3. Create each mirror's request (registered, not sent); a mirror that is
//!    away has the region marked in its bitmap instead.
//! 4. Run the local I/O. If it fails, nothing is sent, every mirror marks the
//!    region (the local disk may now differ), and the host gets the error.
//! 5. Send every request, then release the range lock. A write larger than
//!    the volume's track size goes through the [`pipeline`] instead: its
//!    tracks are prepared by worker threads while the local I/O runs, and
//!    released to every link in track order once it succeeded; the range
//!    lock is held until the last track was handed to the links.
//! 6. Wait for every acknowledgement. A mirror that fails (error, closed
//!    link, or the watchdog's timeout) has the region marked and is
//!    degraded; the host's request succeeds ("degrade") or fails with EIO
//!    ("fence").
//!
//! Generations ([`GenState`], `blockmirror_core::generation`): the first
//! write that some mirror will lack (its link is away, or fails under the
//! write) starts a new generation, durably, before the host is told the
//! write is done, but only when a mirror may hold the current generation as
//! "in sync" (it was announced to one since the last rotation, or the node
//! just started). So a mirror promoted during the outage, and written, is
//! seen as a split brain when the link comes back.

pub mod gen_state;
pub mod group;
pub mod job_conn;
pub mod link;
pub mod locks;
pub mod oos_store;
pub mod pipeline;
pub mod reads;
pub mod verify;

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use blockmirror_nbd::Errno;
use bytes::Bytes;
use tracing::{debug, warn};

use crate::daemon::config::{FailurePolicy, LagPolicy};
use crate::daemon::metrics::{self, MetricType};
use crate::volume::role::RoleCell;
pub use gen_state::GenState;
pub use link::{MirrorLink, MirrorOp};

/// One value per mirror link of a write, kept inline: a volume has a few
/// mirrors, and the write path builds several of these per host write (an
/// allocation each, before).
type PerLink<T> = smallvec::SmallVec<[T; 4]>;
pub use locks::RangeLocks;
pub use pipeline::Pipeline;

/// The mirrors of one primary volume.
pub struct Replicator {
    pub volume: String,
    pub links: Vec<Arc<MirrorLink>>,
    pub locks: RangeLocks,
    pub policy: FailurePolicy,
    pub pipeline: Pipeline,
    pub gen: Arc<GenState>,
    /// The volume's role: host writes that got past the role check before a
    /// demote are refused under their range lock (it is no longer the
    /// primary), so none lands after the links were parked.
    role: Arc<RoleCell>,
}

impl Replicator {
    /// The mirrors `links` of `volume`, with a pipeline that splits writes
    /// into `track_size` tracks, the volume's generation state and its role.
    pub fn new(
        volume: &str,
        links: Vec<Arc<MirrorLink>>,
        policy: FailurePolicy,
        track_size: u64,
        gen: Arc<GenState>,
        role: Arc<RoleCell>,
    ) -> Replicator {
        gen.set_links(
            links
                .iter()
                .map(|l| Arc::downgrade(l) as std::sync::Weak<dyn gen_state::Reannounce>)
                .collect(),
        );
        Replicator {
            gen,
            volume: volume.to_owned(),
            pipeline: Pipeline::new(
                volume,
                links
                    .iter()
                    .map(|l| l.clone() as Arc<dyn pipeline::TrackSink>)
                    .collect(),
                track_size,
            ),
            links,
            locks: RangeLocks::new(),
            policy,
            role,
        }
    }

    /// The volume opens as a mirror on this node: its links stay dormant
    /// (`Action::ParkLinks`, before any write).
    pub fn start_parked(&self) {
        for l in &self.links {
            l.set_active(false);
        }
    }

    /// The volume becomes a mirror here (demote, `Action::DrainAndParkLinks`;
    /// its role already refuses host writes): waits for the host writes in
    /// progress (the range lock over the whole volume), makes what every live mirror acknowledged durable there (a
    /// FLUSH each, async mirrors too), then parks every link. What was
    /// still in flight is marked in the bitmaps, which a new primary is told
    /// about when it connects (failback).
    pub async fn park(&self, size: u64) {
        let _all = self.locks.lock(0, size).await;
        let sent: Vec<_> = self
            .links
            .iter()
            .filter_map(|l| l.prepare_flush().map(|p| (l, l.send(p, &MirrorOp::Flush))))
            .collect();
        for (l, s) in sent {
            if let Err(e) = l.wait(s).await {
                warn!(volume = %self.volume, error = %e, "last flush before the demote failed");
            }
        }
        for l in &self.links {
            l.set_active(false);
        }
        if let Err(e) = self.persist().await {
            warn!(volume = %self.volume, error = %e, "storing the out-of-sync bitmaps failed");
        }
    }

    /// The volume became the primary here by promotion: every link starts
    /// from an empty bitmap (see `MirrorLink::reset_for_promotion`) and
    /// connects (`Action::StartLinks`; host writes are taken once the role
    /// says primary, after this).
    pub async fn unpark_promoted(&self) {
        for l in &self.links {
            l.reset_for_promotion();
        }
        if let Err(e) = self.persist().await {
            warn!(volume = %self.volume, error = %e, "storing the out-of-sync bitmaps failed");
        }
        self.gen.open_gate();
        for l in &self.links {
            l.set_active(true);
        }
    }

    /// Whether host writes are refused under their range lock: the volume
    /// is not the primary here (a mirror, or promoting, or demoting).
    pub fn is_parked(&self) -> bool {
        !self.role.accepts_host_writes()
    }

    async fn persist(&self) -> Result<(), link::ActivateError> {
        for l in &self.links {
            l.persist_bitmap().await?;
        }
        Ok(())
    }

    /// Applies `op` locally with `local` and on every mirror, as described
    /// in the module docs.
    pub async fn replicate<F, Fut>(&self, op: MirrorOp, local: F) -> Result<(), Errno>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Errno>>,
    {
        self.replicate_with(op, local, &|| false).await
    }

    /// [`Replicator::replicate`], where the host's request succeeds only if
    /// an in-sync sync mirror acknowledged it whenever `mirror_required()`
    /// is true once the mirrors answered. That is `on_primary_failure =
    /// "serve_from_mirror"` with a failed local disk: `local` did not touch
    /// the disk (or detached it), so a mirror is the only copy.
    pub async fn replicate_with<F, Fut>(
        &self,
        op: MirrorOp,
        local: F,
        mirror_required: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), Errno>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Errno>>,
    {
        self.check_fence()?;
        if let MirrorOp::Write { offset, data, fua } = &op {
            if self.pipeline.splits(data.len() as u64) && self.links.iter().any(|l| l.is_live()) {
                self.pipeline.counters.split_writes.fetch_add(1, Relaxed);
                return self
                    .replicate_split(*offset, data, *fua, local, mirror_required)
                    .await;
            }
            self.pipeline.counters.direct_writes.fetch_add(1, Relaxed);
        }
        let (offset, len) = op.range();
        self.gen.wait_start().await;
        let guard = self.locks.lock(offset, len).await;
        if self.is_parked() {
            return Err(Errno::Perm);
        }
        for l in &self.links {
            l.note_host_write();
        }
        for (i, l) in self.links.iter().enumerate() {
            if let Err(e) = l.activate(offset, len).await {
                warn!(error = %e, "write refused: it could not be recorded for resync");
                for done in &self.links[..i] {
                    done.end(offset, len);
                }
                return Err(Errno::Io);
            }
        }
        let modes = self.modes();
        let prepared: PerLink<_> = self
            .links
            .iter()
            .zip(&modes)
            .map(|(l, m)| m.prepare(l, offset, len))
            .collect();
        let marked: PerLink<bool> = prepared
            .iter()
            .map(|p| matches!(p, link::Prepared::Marked))
            .collect();
        if marked.contains(&true) {
            if let Err(e) = self.gen.diverge(|| self.holder_missed(&marked)).await {
                warn!(error = %e, "write refused: a new generation could not be stored");
                for (l, p) in self.links.iter().zip(prepared) {
                    l.abandon(p, offset, len);
                    l.end(offset, len);
                }
                return Err(Errno::Io);
            }
        }
        if let Err(e) = local().await {
            for (l, p) in self.links.iter().zip(prepared) {
                l.abandon(p, offset, len);
                l.end(offset, len);
            }
            return Err(e);
        }
        // An async mirror's activity-log range ends when the mirror has the
        // write, not when the host is answered.
        let deferred: PerLink<bool> = self
            .links
            .iter()
            .zip(&prepared)
            .zip(&modes)
            .map(|((l, p), m)| {
                m.is_async()
                    && p.ticket()
                        .is_some_and(|t| l.end_when_done(&[t], offset, len))
            })
            .collect();
        let sent: PerLink<_> = self
            .links
            .iter()
            .zip(prepared)
            .map(|(l, p)| l.send(p, &op))
            .collect();
        drop(guard);
        let (result, missed, confirmed) = self
            .wait_links(sent.into_iter().map(std::iter::once), &modes)
            .await;
        let result = require_mirror(result, confirmed, mirror_required);
        self.finish(offset, len, &modes, &deferred, result, missed)
            .await
    }

    /// The end of a host write on every link: a new generation if a mirror
    /// missed it, activity-log ends that are not deferred to an async
    /// mirror's acknowledgement, and the epoch note for async links.
    async fn finish(
        &self,
        offset: u64,
        len: u64,
        modes: &[LinkWrite],
        deferred: &[bool],
        mut result: Result<(), Errno>,
        missed: PerLink<bool>,
    ) -> Result<(), Errno> {
        if missed.contains(&true) {
            // A mirror lacks (part of) this write: the host hears "done" only
            // once a new generation records that (if that mirror may hold
            // the current one).
            if let Err(e) = self.gen.diverge(|| self.holder_missed(&missed)).await {
                warn!(error = %e, "a new generation could not be stored");
                result = Err(Errno::Io);
            }
        }
        // Cluster mode: the coordinator hears of a new generation before a
        // write under it is acknowledged (one atomic load otherwise).
        if result.is_ok() && self.gen.publish_pending() {
            // Rare (the first write under a new generation): boxed, so the
            // future of every write stays small.
            if let Err(e) = Box::pin(self.gen.ensure_published()).await {
                warn!(volume = %self.gen.volume, error = %e,
                    "write not acknowledged: its generation could not be published in the cluster");
                result = Err(Errno::Io);
            }
        }
        for (l, d) in self.links.iter().zip(deferred) {
            if !d {
                l.end(offset, len);
            }
        }
        self.answered(modes, &result);
        result
    }

    /// How each link takes the next write: decided once per write, so a
    /// mode switch takes effect between writes.
    fn modes(&self) -> PerLink<LinkWrite> {
        self.links
            .iter()
            .map(|l| {
                if !l.is_async() {
                    return LinkWrite::Sync;
                }
                if l.lag_policy == LagPolicy::Bitmap {
                    if l.over_lag() {
                        return LinkWrite::Record;
                    }
                    l.resync_if_recovered();
                }
                LinkWrite::Async
            })
            .collect()
    }

    /// The host is about to be answered: async links start a new epoch
    /// before the next write they send.
    fn answered(&self, modes: &[LinkWrite], result: &Result<(), Errno>) {
        if result.is_ok() {
            for (l, m) in self.links.iter().zip(modes) {
                if m.is_async() {
                    l.completed();
                }
            }
        }
    }

    /// [`Replicator::replicate`] for a write larger than a track: the same
    /// steps, with the sending done by the pipeline.
    async fn replicate_split<F, Fut>(
        &self,
        offset: u64,
        data: &Bytes,
        fua: bool,
        local: F,
        mirror_required: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), Errno>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Errno>>,
    {
        let len = data.len() as u64;
        self.gen.wait_start().await;
        let guard = self.locks.lock(offset, len).await;
        if self.is_parked() {
            return Err(Errno::Perm);
        }
        for (i, l) in self.links.iter().enumerate() {
            if let Err(e) = l.activate(offset, len).await {
                warn!(error = %e, "write refused: it could not be recorded for resync");
                for done in &self.links[..i] {
                    done.end(offset, len);
                }
                return Err(Errno::Io);
            }
        }
        let end_all = || {
            for l in &self.links {
                l.end(offset, len);
            }
        };
        let modes = self.modes();
        let track = self.pipeline.track_size();
        let pieces: Vec<(u64, u64)> = pipeline::tracks(offset, len, track).collect();
        let ctx = match self
            .pipeline
            .open(&self.volume, offset, len, pieces.len())
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "write refused");
                end_all();
                return Err(Errno::Io);
            }
        };
        // Each mirror's requests, created before the local I/O; the tracks
        // go to the workers now, so preparing them overlaps the local write.
        let mut waits: Vec<Vec<link::Sent>> = self
            .links
            .iter()
            .map(|_| Vec::with_capacity(pieces.len()))
            .collect();
        let mut tickets_all: Vec<(usize, link::Ticket)> = Vec::new();
        let mut marked = vec![false; self.links.len()];
        for (i, &(off, n)) in pieces.iter().enumerate() {
            let tickets: Vec<_> = self
                .links
                .iter()
                .zip(waits.iter_mut())
                .enumerate()
                .map(|(li, (l, w))| {
                    let p = modes[li].prepare(l, off, n);
                    marked[li] |= matches!(p, link::Prepared::Marked);
                    let (t, sent) = p.split();
                    w.push(sent);
                    if let Some(t) = t {
                        tickets_all.push((li, t));
                    }
                    t
                })
                .collect();
            let at = (off - offset) as usize;
            ctx.dispatch(i, off, fua, data.slice(at..at + n as usize), tickets);
        }
        if let Err(e) = local().await {
            // Aborts the context: nothing of it is sent.
            drop(ctx);
            for (li, t) in tickets_all {
                self.links[li].abandon_ticket(t);
            }
            for l in &self.links {
                l.mark(offset, len);
            }
            end_all();
            return Err(e);
        }
        // An async mirror's activity-log range ends when its last track is
        // acknowledged (or failed and marked).
        let deferred: Vec<bool> = self
            .links
            .iter()
            .enumerate()
            .map(|(li, l)| {
                let mine: Vec<link::Ticket> = tickets_all
                    .iter()
                    .filter(|(i, _)| *i == li)
                    .map(|(_, t)| *t)
                    .collect();
                modes[li].is_async() && l.end_when_done(&mine, offset, len)
            })
            .collect();
        ctx.release().await;
        drop(guard);
        let (result, mut missed, confirmed) = self.wait_links(waits, &modes).await;
        for (m, k) in missed.iter_mut().zip(marked) {
            *m |= k;
        }
        let result = require_mirror(result, confirmed, mirror_required);
        self.finish(offset, len, &modes, &deferred, result, missed)
            .await
    }

    /// FLUSH: durable locally (by `local`) and on every live mirror.
    pub async fn flush<F, Fut>(&self, local: F) -> Result<(), Errno>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Errno>>,
    {
        self.flush_with(local, &|| false).await
    }

    /// [`Replicator::flush`], requiring an in-sync sync mirror's
    /// acknowledgement when `mirror_required()` (see
    /// [`Replicator::replicate_with`]).
    pub async fn flush_with<F, Fut>(
        &self,
        local: F,
        mirror_required: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), Errno>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), Errno>>,
    {
        self.check_fence()?;
        // Only live links take the flush; an away mirror has nothing to
        // flush that its bitmap does not already cover.
        let sent: PerLink<_> = self
            .links
            .iter()
            .map(|l| match l.prepare_flush() {
                Some(p) => l.send(p, &MirrorOp::Flush),
                // Connected but filling (iterative initial sync): the mirror
                // holds no host data to flush yet.
                None if l.is_live() => link::Sent::Deferred,
                None => link::Sent::Marked,
            })
            .collect();
        let local = local().await;
        // An async mirror is flushed too (it keeps what a mirror crash can
        // lose small), but the host does not wait for it.
        let modes: PerLink<LinkWrite> = self
            .links
            .iter()
            .map(|l| {
                if l.is_async() {
                    LinkWrite::Async
                } else {
                    LinkWrite::Sync
                }
            })
            .collect();
        let (mirrors, _, confirmed) = self
            .wait_links(sent.into_iter().map(std::iter::once), &modes)
            .await;
        require_mirror(local.and(mirrors), confirmed, mirror_required)
    }

    /// Whether a link that missed a write (`missed[i]`) may hold the
    /// current generation as in sync: then the write needs a new one.
    fn holder_missed(&self, missed: &[bool]) -> bool {
        self.links
            .iter()
            .zip(missed)
            .any(|(l, &m)| m && l.may_hold_current())
    }

    /// With "fence", a mirror that is away refuses host writes up front:
    /// nothing lands that it lacks.
    fn check_fence(&self) -> Result<(), Errno> {
        if self.policy == FailurePolicy::Fence && self.links.iter().any(|l| !l.is_live()) {
            return Err(Errno::Io);
        }
        Ok(())
    }

    /// Waits for what each link must have before the host is answered:
    /// everything on a sync link; nothing on an async one, unless its lag is
    /// past the bound with lag_policy "throttle", where the write waits for
    /// its own acknowledgement (the host slows to the link's pace and the
    /// lag stays near the bound).
    async fn wait_links<S: IntoIterator<Item = link::Sent>>(
        &self,
        sent: impl IntoIterator<Item = S>,
        modes: &[LinkWrite],
    ) -> (Result<(), Errno>, PerLink<bool>, usize) {
        let mut result = Ok(());
        // Per link: it did not take (part of) the write.
        let mut missed: PerLink<bool> = smallvec::smallvec![false; self.links.len()];
        // Sync links that acknowledged everything and are in sync after it.
        let mut confirmed = 0;
        for (li, ((l, sent), m)) in self.links.iter().zip(sent).zip(modes).enumerate() {
            let wait = match m {
                LinkWrite::Sync => true,
                LinkWrite::Async => l.lag_policy == LagPolicy::Throttle && l.over_lag(),
                LinkWrite::Record => false,
            };
            if !wait {
                if m.is_async() {
                    l.counters.async_unwaited.fetch_add(1, Relaxed);
                }
                continue;
            }
            if m.is_async() {
                l.counters.throttled.fetch_add(1, Relaxed);
            }
            let mut all = true;
            let mut any = false;
            for s in sent {
                any = true;
                // Deferred: the mirror is filling and does not have it yet.
                all &= matches!(s, link::Sent::Waiting(_));
                if let Err(e) = l.wait(s).await {
                    all = false;
                    debug!(error = %e, "mirror did not take a request");
                    missed[li] = true;
                    if self.policy == FailurePolicy::Fence {
                        result = Err(Errno::Io);
                    }
                }
            }
            if all && any && *m == LinkWrite::Sync && l.state() == link::SyncState::InSync {
                confirmed += 1;
            }
        }
        (result, missed, confirmed)
    }
}

/// EIO when a mirror's acknowledgement is required and no in-sync sync
/// mirror gave one.
fn require_mirror(
    result: Result<(), Errno>,
    confirmed: usize,
    mirror_required: &(dyn Fn() -> bool + Sync),
) -> Result<(), Errno> {
    if result.is_ok() && confirmed == 0 && mirror_required() {
        warn!("local disk failed and no in-sync sync mirror acknowledged the request: EIO");
        return Err(Errno::Io);
    }
    result
}

/// How one link takes one host write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkWrite {
    /// The host waits for the mirror.
    Sync,
    /// Sent; the host does not wait (unless throttled).
    Async,
    /// Async past its lag bound with lag_policy "bitmap": recorded in the
    /// bitmap instead of sent.
    Record,
}

impl LinkWrite {
    fn is_async(self) -> bool {
        self != LinkWrite::Sync
    }

    fn prepare(self, l: &MirrorLink, offset: u64, len: u64) -> link::Prepared {
        match self {
            LinkWrite::Record => {
                l.mark_inconsistent(offset, len);
                link::Prepared::Marked
            }
            _ => l.prepare(offset, len),
        }
    }
}

/// Registers the pipeline's and the links' compression metric families of
/// every volume among `volumes` with mirrors.
pub fn register_metrics(registry: &mut metrics::Registry, volumes: metrics::VolumeList) {
    registry.register_collector(metrics::FnCollector::boxed("pipeline", move |enc| {
        let volumes = volumes();
        let replicators: Vec<&Replicator> = volumes
            .iter()
            .filter_map(|v| v.replicator().map(|r| &**r))
            .collect();
        encode_metrics(enc, &replicators)
    }));
}

/// The pipeline's and the links' compression metric families, labelled by
/// volume (and peer), for every primary volume with mirrors.
pub fn encode_metrics(
    enc: &mut metrics::Encoder<'_>,
    replicators: &[&Replicator],
) -> std::fmt::Result {
    if replicators.is_empty() {
        return Ok(());
    }
    let stats: Vec<_> = replicators.iter().map(|r| r.pipeline.stats()).collect();
    type Get = fn(&Replicator, &blockmirror_core::sequencer::SequencerStats) -> u64;
    let families: [(&str, MetricType, &str, Get); 8] = [
        (
            "blockmirror_pipeline_subtasks_queued_total",
            MetricType::Counter,
            "Track subtasks handed to the sequencer by the workers (gates included).",
            |_, s| s.queued_total,
        ),
        (
            "blockmirror_pipeline_subtasks_released_total",
            MetricType::Counter,
            "Track subtasks released to the mirror links in order (gates included).",
            |_, s| s.released_total,
        ),
        (
            "blockmirror_pipeline_subtasks_held_out_of_order",
            MetricType::Gauge,
            "Subtasks prepared and held because an earlier subtask of their write is not.",
            |_, s| s.held_out_of_order as u64,
        ),
        (
            "blockmirror_pipeline_deepest_backlog",
            MetricType::Gauge,
            "Most subtasks one write holds in the sequencer now.",
            |_, s| s.deepest_backlog as u64,
        ),
        (
            "blockmirror_pipeline_deepest_backlog_peak",
            MetricType::Gauge,
            "Most subtasks one write has held in the sequencer at once since start.",
            |_, s| s.deepest_backlog_peak as u64,
        ),
        (
            "blockmirror_pipeline_subtasks_admitted",
            MetricType::Gauge,
            "Subtasks admitted and not yet released (in the workers or held).",
            |_, s| s.admitted as u64,
        ),
        (
            "blockmirror_pipeline_split_writes_total",
            MetricType::Counter,
            "Host writes larger than a track, split into track subtasks.",
            |r, _| r.pipeline.counters.split_writes.load(Relaxed),
        ),
        (
            "blockmirror_pipeline_direct_writes_total",
            MetricType::Counter,
            "Host writes no larger than a track, sent straight to the links.",
            |r, _| r.pipeline.counters.direct_writes.load(Relaxed),
        ),
    ];
    for (name, kind, help, get) in families {
        let mut f = metrics::family(enc, name, kind, help)?;
        for (r, s) in replicators.iter().zip(&stats) {
            f.sample(&[("volume", &r.volume)], get(r, s))?;
        }
    }
    type LinkGet = fn(&MirrorLink) -> u64;
    let link_families: [(&str, &str, LinkGet); 2] = [
        (
            "blockmirror_replication_data_bytes_total",
            "Write data sent to the mirror, before compression.",
            |l| l.counters.data_bytes.load(Relaxed),
        ),
        (
            "blockmirror_replication_wire_bytes_total",
            "Write data sent to the mirror as it went on the wire (after compression).",
            |l| l.counters.wire_bytes.load(Relaxed),
        ),
    ];
    for (name, help, get) in link_families {
        let mut f = metrics::family(enc, name, MetricType::Counter, help)?;
        for r in replicators {
            for l in &r.links {
                let labels = [
                    ("volume", r.volume.as_str()),
                    ("peer", l.peer.as_str()),
                    ("compression", l.compression().as_str()),
                ];
                f.sample(&labels, get(l))?;
            }
        }
    }
    Ok(())
}
