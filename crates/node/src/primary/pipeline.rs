//! The ordered subtask pipeline (seeds 000 and 001) between a primary's
//! write path and its mirror links.
//!
//! A host write larger than the volume's track size becomes a *context* of
//! track subtasks, cut at track boundaries; a subtask's sequence number is
//! its track's index within the write (seed 001, claim 8). A fixed pool of
//! worker threads prepares them (crc32c of the payload, and LZ4 or zstd for
//! links that compress) and they finish in any order; the core
//! [`Sequencer`] hands them to every mirror link strictly in order.
//!
//! Each context has one extra subtask in front, index 0: the *gate*, which
//! the write path inserts once the local write succeeded (seed 004: a mirror
//! request is issued only after the primary I/O went well). So preparation
//! overlaps the local write, tracks that are ready wait in the sequencer for
//! the gate, and a failed local write aborts the context: nothing of it was
//! sent, and what the workers still deliver is dropped.
//!
//! Threads: the sequencer and the map of waiting writers sit behind one
//! `Mutex` ([`State`]); released subtasks are handed to the links' sender
//! queues while it is held, so two workers can never reorder what the
//! sequencer released. (With one mutex around the queue there is no
//! lock-free sharing, so no loom model.) Lock order: this mutex, then a
//! link's.
//!
//! Memory: the sequencer admits at most [`PIPELINE_MAX_BYTES`] of tracks;
//! a write that does not fit waits (back-pressure) until contexts complete.
//! The job queue to the workers is as long as that bound, so handing a job
//! over never blocks.
//!
//! Order between writes: overlapping writes are ordered by the range lock
//! that [`super::Replicator::replicate`] holds until every subtask of its
//! context was released to the links; in sync mode a host write completes
//! only when every mirror acknowledged every track, so a later dependent
//! write is opened after it completed, and the sequencer's cross-context
//! rule has nothing to hold (see `blockmirror_core::sequencer`). Async mode
//! replies before the mirrors have a write, but only after
//! [`OpenContext::release`] returned, that is after every track was handed to
//! every link's sender queue: a write issued after that reply is queued
//! behind all of them (and behind the epoch barrier the link puts first), so
//! the cross-context rule is not needed there either.
//!
//! A track of a FUA write carries FUA itself: the mirror may apply the
//! tracks of one write in parallel (seed 003), so one sync after the last
//! track would not cover the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};

use blockmirror_core::sequencer::{
    ContextId, Sequencer, SequencerError, SequencerLimits, SequencerStats, SubtaskIndex,
    DEFAULT_MAX_CONTEXTS,
};
use blockmirror_repl::{Codec, EncodedWrite, MAX_DATA};
use bytes::Bytes;
use tokio::sync::{oneshot, Notify};
use tracing::{debug, warn};

use super::link::{MirrorLink, Ticket};

/// Where the pipeline releases tracks: a mirror link (a fake in tests).
pub trait TrackSink: Send + Sync {
    /// How this sink wants Write data compressed.
    fn compression(&self) -> Codec;
    /// Sends a prepared track (the ticket's request, registered earlier).
    fn send_track(&self, ticket: Ticket, offset: u64, fua: bool, write: EncodedWrite);
}

impl TrackSink for MirrorLink {
    fn compression(&self) -> Codec {
        MirrorLink::compression(self)
    }

    fn send_track(&self, ticket: Ticket, offset: u64, fua: bool, write: EncodedWrite) {
        // A failed connection marks the region itself.
        self.send_encoded(ticket, offset, fua, write);
    }
}

/// Most bytes of track data admitted to the pipeline at once (the NBD front
/// end bounds a connection's requests in flight to the same).
pub const PIPELINE_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Most worker threads per volume (fewer on a machine with fewer cores).
pub const MAX_WORKERS: usize = 4;

/// What the sequencer orders.
enum Item {
    /// Subtask 0: the local write succeeded.
    Gate,
    Track(Track),
}

/// A track prepared for every link.
struct Track {
    offset: u64,
    fua: bool,
    /// One per distinct codec of the links when it was prepared.
    encoded: Vec<EncodedWrite>,
    /// Per link: its codec's index in `encoded`. Read from each link when
    /// the track is prepared: a link's codec is what its last handshake
    /// negotiated, and changes only with a new connection (whose requests
    /// these tickets are not).
    link_codec: Vec<usize>,
    /// Per link: the request to send, or None (the link was away and the
    /// region is marked).
    tickets: Vec<Option<Ticket>>,
}

/// A track for a worker to prepare.
struct Job {
    ctx: ContextId,
    index: SubtaskIndex,
    offset: u64,
    fua: bool,
    data: Bytes,
    tickets: Vec<Option<Ticket>>,
}

struct State {
    seq: Sequencer<Item>,
    /// Told when a context's last subtask was released to the links.
    done: HashMap<ContextId, oneshot::Sender<()>>,
}

/// Counters for /metrics beside the sequencer's own.
#[derive(Default)]
pub struct PipelineCounters {
    /// Host writes that were split into track subtasks.
    pub split_writes: AtomicU64,
    /// Host writes no larger than a track: sent straight to the links.
    pub direct_writes: AtomicU64,
    /// Times a write waited for room in the pipeline.
    pub backpressure_waits: AtomicU64,
}

struct Shared {
    volume: String,
    state: Mutex<State>,
    /// Woken whenever a context completes or is aborted (room freed).
    room: Notify,
    links: Vec<Arc<dyn TrackSink>>,
}

/// The pipeline of one primary volume; see the module documentation.
pub struct Pipeline {
    shared: Arc<Shared>,
    /// The node-wide pool's queue ([`pool`]).
    jobs: SyncSender<PoolJob>,
    track_size: u64,
    next_ctx: AtomicU64,
    workers: usize,
    /// The process has one CPU: a track that needs only its checksum is
    /// prepared by the writer itself. A worker thread there adds a hand-off
    /// and two context switches per track and no parallelism (issue 16's
    /// profile: 1 MiB writes pinned to one core, 782 -> 454 us each
    /// prepared inline). Compression still goes to the worker: ~1 ms per
    /// MiB on the runtime's only thread would hold up every other request.
    inline_plain: bool,
    pub counters: PipelineCounters,
}

/// Why a write could not enter the pipeline.
#[derive(Debug, thiserror::Error)]
#[error(
    "volume {volume}: write of {len} bytes at offset {offset} refused by the pipeline: {source}"
)]
pub struct PipelineError {
    pub volume: String,
    pub offset: u64,
    pub len: u64,
    #[source]
    pub source: SequencerError,
}

/// An open context, until its gate is in. Dropping it before (the write was
/// cancelled, or the local write failed) aborts the context, so its room is
/// never lost and nothing of it is sent.
pub struct OpenContext<'a> {
    pipeline: &'a Pipeline,
    ctx: ContextId,
    done: Option<oneshot::Receiver<()>>,
    gated: bool,
}

impl Pipeline {
    /// A pipeline to `links`, splitting writes into `track_size` tracks
    /// (a power of two), with its worker threads started.
    pub fn new(volume: &str, links: Vec<Arc<dyn TrackSink>>, track_size: u64) -> Pipeline {
        assert!(track_size.is_power_of_two() && track_size <= u64::from(MAX_DATA));
        // A MAX_DATA write not aligned to tracks spans one more; plus the gate.
        let per_context = (u64::from(MAX_DATA) / track_size + 2) as u32;
        let limits = SequencerLimits {
            max_subtasks: ((PIPELINE_MAX_BYTES / track_size) as usize).max(per_context as usize),
            max_context_subtasks: per_context,
            max_contexts: DEFAULT_MAX_CONTEXTS,
        };
        let seq = Sequencer::new(limits).expect("pipeline limits are valid");
        let shared = Arc::new(Shared {
            volume: volume.to_owned(),
            state: Mutex::new(State {
                seq,
                done: HashMap::new(),
            }),
            room: Notify::new(),
            links,
        });
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (jobs, workers) = pool();
        let jobs = jobs.clone();
        Pipeline {
            shared,
            jobs,
            track_size,
            next_ctx: AtomicU64::new(1),
            workers: *workers,
            inline_plain: cpus == 1,
            counters: PipelineCounters::default(),
        }
    }

    pub fn track_size(&self) -> u64 {
        self.track_size
    }

    /// Worker threads preparing tracks.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// True when a write of `len` bytes is split (larger than a track).
    pub fn splits(&self, len: u64) -> bool {
        len > self.track_size
    }

    /// The sequencer's counters and gauges.
    pub fn stats(&self) -> SequencerStats {
        self.shared.state().seq.stats()
    }

    /// Opens a context for `tracks` track subtasks (plus the gate), waiting
    /// while the pipeline is full.
    pub async fn open(
        &self,
        volume: &str,
        offset: u64,
        len: u64,
        tracks: usize,
    ) -> Result<OpenContext<'_>, PipelineError> {
        let ctx = self.next_ctx.fetch_add(1, Relaxed);
        let total = tracks as u32 + 1;
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut st = self.shared.state();
                match st.seq.open_context(ctx, total) {
                    Ok(()) => {
                        let (tx, rx) = oneshot::channel();
                        st.done.insert(ctx, tx);
                        return Ok(OpenContext {
                            pipeline: self,
                            ctx,
                            done: Some(rx),
                            gated: false,
                        });
                    }
                    Err(e) if e.is_backpressure() => {}
                    Err(source) => {
                        return Err(PipelineError {
                            volume: volume.to_owned(),
                            offset,
                            len,
                            source,
                        })
                    }
                }
            }
            self.counters.backpressure_waits.fetch_add(1, Relaxed);
            room.await;
        }
    }
}

impl OpenContext<'_> {
    /// Hands track `index` (0-based, in write order) to the workers.
    /// `tickets` holds each link's request for it.
    pub fn dispatch(
        &self,
        index: usize,
        offset: u64,
        fua: bool,
        data: Bytes,
        tickets: Vec<Option<Ticket>>,
    ) {
        let job = Job {
            ctx: self.ctx,
            index: index as SubtaskIndex + 1,
            offset,
            fua,
            data,
            tickets,
        };
        if self.pipeline.inline_plain
            && self
                .pipeline
                .shared
                .links
                .iter()
                .all(|l| l.compression() == Codec::None)
        {
            self.pipeline.shared.prepare(job);
            return;
        }
        match self
            .pipeline
            .jobs
            .try_send((self.pipeline.shared.clone(), job))
        {
            Ok(()) => {}
            // The node-wide queue is full (many volumes' large writes at
            // once): prepare it here rather than wait.
            Err(TrySendError::Full((_, job))) | Err(TrySendError::Disconnected((_, job))) => {
                warn!(volume = %self.pipeline.shared.volume, ctx = self.ctx, "pipeline job queue unavailable; preparing inline");
                self.pipeline.shared.prepare(job);
            }
        }
    }

    /// The local write succeeded: lets the tracks go to the links, in
    /// order, and waits until the last one has been handed over.
    pub async fn release(mut self) {
        self.gated = true;
        self.pipeline.shared.insert(self.ctx, 0, Item::Gate);
        if let Some(done) = self.done.take() {
            // A dropped sender means the context was aborted: nothing to wait for.
            let _ = done.await;
        }
    }
}

impl Drop for OpenContext<'_> {
    fn drop(&mut self) {
        if self.gated {
            return;
        }
        let shared = &self.pipeline.shared;
        let mut st = shared.state();
        st.done.remove(&self.ctx);
        match st.seq.abort_context(self.ctx) {
            Ok(aborted) => {
                debug!(volume = %shared.volume, ctx = self.ctx, discarded = aborted.discarded.len(), "pipeline context aborted");
                // Nothing waits on another context in sync mode; send
                // whatever an abort could free all the same.
                shared.deliver(&mut st, aborted.released);
            }
            Err(e) => {
                warn!(volume = %shared.volume, ctx = self.ctx, error = %e, "aborting a pipeline context")
            }
        }
        drop(st);
        shared.room.notify_waiters();
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pipeline state poisoned")
    }

    /// A worker's job: checksum (and compress) once per codec, then insert.
    fn prepare(&self, job: Job) {
        let mut codecs: Vec<Codec> = Vec::with_capacity(1);
        let link_codec = self
            .links
            .iter()
            .map(|l| {
                let c = l.compression();
                codecs.iter().position(|&x| x == c).unwrap_or_else(|| {
                    codecs.push(c);
                    codecs.len() - 1
                })
            })
            .collect();
        let encoded = codecs
            .iter()
            .map(|&c| EncodedWrite::new(job.data.clone(), c))
            .collect();
        let track = Track {
            offset: job.offset,
            fua: job.fua,
            encoded,
            link_codec,
            tickets: job.tickets,
        };
        self.insert(job.ctx, job.index, Item::Track(track));
    }

    fn insert(&self, ctx: ContextId, index: SubtaskIndex, item: Item) {
        let mut st = self.state();
        match st.seq.insert(ctx, index, item) {
            Ok(released) => {
                let freed = !released.completed.is_empty();
                self.deliver(&mut st, released);
                drop(st);
                if freed {
                    self.room.notify_waiters();
                }
            }
            // Aborted (its local write failed): the track is never sent.
            Err(SequencerError::UnknownContext(_)) => {}
            Err(e) => {
                warn!(volume = %self.volume, ctx, index, error = %e, "pipeline subtask refused")
            }
        }
    }

    /// Hands released tracks to every link, in the order released, and
    /// tells the writers whose contexts completed. Called with the state
    /// locked, so releases never overtake each other.
    fn deliver(&self, st: &mut State, released: blockmirror_core::sequencer::Released<Item>) {
        for s in released.subtasks {
            let Item::Track(t) = s.item else { continue };
            let Track {
                offset,
                fua,
                mut encoded,
                link_codec,
                tickets,
            } = t;
            for (i, (link, ticket)) in self.links.iter().zip(tickets).enumerate() {
                let Some(ticket) = ticket else { continue };
                let c = link_codec[i];
                // The last link using a codec takes the prepared write, the
                // others a cheap clone (reference-counted payload).
                let last = link_codec[i + 1..].iter().all(|&x| x != c);
                let write = if last {
                    std::mem::replace(&mut encoded[c], placeholder())
                } else {
                    encoded[c].clone()
                };
                link.send_track(ticket, offset, fua, write);
            }
        }
        for ctx in released.completed {
            if let Some(tx) = st.done.remove(&ctx) {
                let _ = tx.send(());
            }
        }
    }
}

fn placeholder() -> EncodedWrite {
    EncodedWrite {
        codec: Codec::None,
        len: 0,
        payload: Bytes::new(),
        crc: 0,
    }
}

/// A track to prepare, with the pipeline it belongs to.
type PoolJob = (Arc<Shared>, Job);

/// Tracks the node-wide queue holds before a write prepares its own.
const POOL_QUEUE: usize = 4096;

/// The node-wide pool of track-preparing threads, shared by every volume's
/// pipeline (one per CPU, at most [`MAX_WORKERS`]): a node with a hundred
/// volumes runs as many of these threads as a node with one. Its queue and
/// its worker count.
fn pool() -> &'static (SyncSender<PoolJob>, usize) {
    static POOL: std::sync::OnceLock<(SyncSender<PoolJob>, usize)> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = cpus.min(MAX_WORKERS);
        let (tx, rx) = sync_channel::<PoolJob>(POOL_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("bm-pipe-{i}"))
                .spawn(move || worker(rx))
                .expect("spawning a pipeline worker thread");
        }
        (tx, workers)
    })
}

fn worker(rx: Arc<Mutex<Receiver<PoolJob>>>) {
    loop {
        let job = {
            let rx = rx.lock().expect("pipeline job queue poisoned");
            rx.recv()
        };
        match job {
            Ok((shared, job)) => shared.prepare(job),
            // Never: the pool's sender lives as long as the process.
            Err(_) => return,
        }
    }
}

/// Cuts `[offset, offset+len)` at multiples of `track` (a power of two).
pub fn tracks(offset: u64, len: u64, track: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = ((at / track) + 1) * track;
        let piece = (at, next.min(end) - at);
        at = next.min(end);
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_repl::{encode_encoded_write_header, Frame, FrameDecoder};
    use bytes::{BufMut, BytesMut};
    use std::time::Duration;

    /// A link that decodes what it is sent, as a mirror would, and records
    /// it: (ticket id, offset, data).
    struct Recorder {
        codec: Codec,
        got: Mutex<Vec<(u64, u64, Bytes)>>,
    }

    impl Recorder {
        fn new(codec: Codec) -> Arc<Recorder> {
            Arc::new(Recorder {
                codec,
                got: Mutex::new(Vec::new()),
            })
        }

        fn got(&self) -> Vec<(u64, u64, Bytes)> {
            self.got.lock().unwrap().clone()
        }
    }

    impl TrackSink for Recorder {
        fn compression(&self) -> Codec {
            self.codec
        }

        fn send_track(&self, t: Ticket, offset: u64, fua: bool, write: EncodedWrite) {
            let mut b = BytesMut::new();
            encode_encoded_write_header(t.id(), offset, fua, &write, &mut b);
            b.put_slice(&write.payload);
            let f = FrameDecoder::new().decode(&mut b).unwrap().unwrap();
            let Frame::Write { data, .. } = f else {
                panic!("{f:?}")
            };
            self.got.lock().unwrap().push((t.id(), offset, data));
        }
    }

    fn sinks(rs: &[Arc<Recorder>]) -> Vec<Arc<dyn TrackSink>> {
        rs.iter().map(|r| r.clone() as Arc<dyn TrackSink>).collect()
    }

    /// Track `i` of write `w`: runs that compress, with some noise.
    fn track_data(w: u64, i: u64, len: usize) -> Bytes {
        let mut x = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i;
        (0..len)
            .map(|k| {
                if k % 64 < 40 {
                    (w + i) as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect::<Vec<u8>>()
            .into()
    }

    /// A fixed-seed shuffle of `0..n`.
    fn shuffled(n: usize, seed: u64) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        let mut x = seed | 1;
        for i in (1..n).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    const TRACK: u64 = 4096;

    /// Many writes at once, their tracks handed to the workers in random
    /// order and finishing out of order on several threads: every link gets
    /// every track exactly once, each write's tracks in index order, with
    /// the data intact through each link's codec.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_reach_every_link_once_and_in_order() {
        let recs = [
            Recorder::new(Codec::Lz4),
            Recorder::new(Codec::None),
            Recorder::new(Codec::Lz4),
            Recorder::new(Codec::Zstd),
        ];
        let p = Arc::new(Pipeline::new("t", sinks(&recs), TRACK));
        const WRITES: u64 = 64;
        let mut tasks = Vec::new();
        for w in 0..WRITES {
            let (p, links) = (p.clone(), recs.len());
            tasks.push(tokio::spawn(async move {
                let n = 2 + (w * 7 % 19) as usize;
                let offset = w * 1024 * TRACK;
                let ctx = p.open("t", offset, n as u64 * TRACK, n).await.unwrap();
                for i in shuffled(n, w + 1) {
                    let id = w * 1000 + i as u64;
                    let data = track_data(w, i as u64, TRACK as usize);
                    let tickets = vec![Some(Ticket::for_test(id, 1)); links];
                    ctx.dispatch(i, offset + i as u64 * TRACK, false, data, tickets);
                }
                ctx.release().await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for r in &recs {
            let got = r.got();
            let mut next = vec![0u64; WRITES as usize];
            for (id, offset, data) in got {
                let (w, i) = (id / 1000, id % 1000);
                assert_eq!(i, next[w as usize], "write {w}: track {i} out of order");
                next[w as usize] += 1;
                assert_eq!(offset, w * 1024 * TRACK + i * TRACK);
                assert_eq!(
                    data,
                    track_data(w, i, TRACK as usize),
                    "write {w} track {i}"
                );
            }
            for w in 0..WRITES {
                assert_eq!(
                    next[w as usize],
                    2 + w * 7 % 19,
                    "write {w}: tracks missing"
                );
            }
        }
        let st = p.stats();
        assert_eq!((st.admitted, st.open_contexts, st.held), (0, 0, 0));
        assert_eq!(st.queued_total, st.released_total);
    }

    /// At the bound a write waits for room (nothing is dropped) and gets in
    /// when an earlier write completes; an aborted write (its local write
    /// failed) frees its room and sends nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_pipeline_makes_writers_wait_and_abort_frees_room() {
        let rec = Recorder::new(Codec::Lz4);
        // 32 MiB tracks: room for 8 subtasks, i.e. two writes of 2 tracks
        // (each plus its gate) and not a third.
        let track = u64::from(MAX_DATA);
        let p = Pipeline::new("t", sinks(std::slice::from_ref(&rec)), track);
        let a = p.open("t", 0, 2 * track, 2).await.unwrap();
        let b = p.open("t", 2 * track, 2 * track, 2).await.unwrap();
        let mut c = Box::pin(p.open("t", 4 * track, 2 * track, 2));
        // Polled once: it has to wait.
        assert!(tokio::time::timeout(Duration::ZERO, &mut c).await.is_err());
        assert_eq!(p.counters.backpressure_waits.load(Relaxed), 1);
        for i in [1, 0] {
            let data = track_data(1, i, 100);
            a.dispatch(
                i as usize,
                i * track,
                true,
                data,
                vec![Some(Ticket::for_test(i, 1))],
            );
        }
        // A completes: its room lets C in.
        a.release().await;
        let c = c.await.unwrap();
        assert_eq!(p.stats().admitted, 6);
        // B's local write fails after its tracks went to the workers.
        for i in 0..2u64 {
            let data = track_data(2, i, 100);
            b.dispatch(
                i as usize,
                (2 + i) * track,
                false,
                data,
                vec![Some(Ticket::for_test(10 + i, 1))],
            );
        }
        drop(b);
        assert_eq!(p.stats().admitted, 3);
        drop(c);
        // A write after them all goes through; what B's workers deliver
        // late is discarded.
        let d = p.open("t", 6 * track, 2 * track, 2).await.unwrap();
        for i in 0..2u64 {
            let data = track_data(3, i, 100);
            d.dispatch(
                i as usize,
                (6 + i) * track,
                false,
                data,
                vec![Some(Ticket::for_test(20 + i, 1))],
            );
        }
        d.release().await;
        let ids: Vec<u64> = rec.got().into_iter().map(|(id, _, _)| id).collect();
        assert_eq!(ids, vec![0, 1, 20, 21], "only A's and D's tracks, in order");
        let st = p.stats();
        assert_eq!((st.admitted, st.open_contexts), (0, 0));
    }

    #[test]
    fn tracks_cut_at_track_boundaries() {
        let t = 64 * 1024;
        let got: Vec<_> = tracks(0, 3 * t, t).collect();
        assert_eq!(got, vec![(0, t), (t, t), (2 * t, t)]);
        let got: Vec<_> = tracks(t - 512, t + 1024, t).collect();
        assert_eq!(got, vec![(t - 512, 512), (t, t), (2 * t, 512)]);
        assert_eq!(tracks(5, 0, t).count(), 0);
        // Pieces always cover the range exactly, in order.
        for (off, len) in [(1, 1_000_000), (4096, 32 << 20), (123_456, 65_537)] {
            let mut at = off;
            for (o, l) in tracks(off, len, t) {
                assert_eq!(o, at);
                assert!(l > 0 && l <= t);
                at += l;
            }
            assert_eq!(at, off + len);
        }
    }
}
