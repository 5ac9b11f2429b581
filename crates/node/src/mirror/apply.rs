//! The mirror's apply engine (seed 003): one ordered stream of operations
//! from the primary, applied to the backend by many tasks.
//!
//! The decisions come from [`blockmirror_core::scheduler::Scheduler`] (range
//! groups, main queues, mini-queues, the active-task table and the overlap
//! counter; see its module docs for why the result equals a one-by-one
//! apply). This module is the I/O around it:
//!
//! - One worker thread per scheduler task, each fed by its own channel. A
//!   backend call is synchronous and may sleep (O_DIRECT, a slow device, a
//!   full page cache), so each task needs a thread of its own to overlap
//!   with the others.
//! - The engine is owned by the link's receive loop, the scheduler's only
//!   user: no lock around it, and no memory-model questions to model-check
//!   (the workers share nothing with it but two channels).
//! - Cheap operations run inline. A plain write of at most
//!   [`ApplyConfig::inline_max`] bytes to a backend that says it is fast
//!   (buffered I/O into the page cache) costs a few microseconds, far less
//!   than handing it to a thread and waking the loop when it is done; the
//!   scheduler still decides *when* it may run, so the order guarantees hold.
//!   Everything else (FUA, FLUSH, TRIM, WRITE_ZEROES, large writes, any op on
//!   a slow backend) goes to the task the scheduler named.
//! - Back-pressure: the scheduler holds at most `max_ops` operations; the
//!   receive loop stops reading the socket while [`ApplyEngine::is_full`].
//! - Completions come back in any order; each becomes an [`Applied`] whose
//!   tag is the primary's request id, so acknowledgements go out as soon as
//!   an operation is applied (durable, for FLUSH and FUA).
//! - When the link ends, [`ApplyEngine::drain`] waits for the operations
//!   already running (a backend call is never abandoned half-way) and drops
//!   the ones not started: the primary never got their acknowledgements, so
//!   it has their regions marked out of sync already.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use blockmirror_core::scheduler::{Dispatch, Op, OpKind, Scheduler, SchedulerConfig, Seq, TaskId};
use blockmirror_storage::{Backend, StorageError};
use bytes::Bytes;
use tokio::sync::mpsc;

/// How often a busy engine publishes its scheduler's gauges.
const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// How a mirror volume's apply engine is cut up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyConfig {
    /// Range groups the volume is cut into.
    pub groups: usize,
    /// Tasks (worker threads) per group.
    pub tasks_per_group: usize,
    /// Operations held (received, not yet applied) before the link stops
    /// being read.
    pub max_ops: usize,
    /// Bytes of write data held before the link stops being read.
    pub max_bytes: u64,
    /// Largest plain write run inline on a fast backend; 0 runs everything
    /// on the workers.
    pub inline_max: usize,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        Self {
            groups: 4,
            tasks_per_group: 2,
            max_ops: 1024,
            max_bytes: 256 << 20,
            inline_max: 64 * 1024,
        }
    }
}

/// One operation of the stream, with what it needs to run.
#[derive(Debug, Clone)]
pub enum ApplyOp {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
    Flush,
    /// An epoch boundary (for crash-consistent asynchronous mirroring):
    /// nothing after it starts until everything before it has been applied,
    /// and, when `durable`, made durable (a flush). Completes when it lifts.
    Barrier {
        durable: bool,
    },
}

impl ApplyOp {
    fn sched_op(&self, seq: Seq) -> Op {
        let (offset, len, kind) = match self {
            ApplyOp::Write { offset, data, .. } => (*offset, data.len() as u64, OpKind::Write),
            ApplyOp::Trim { offset, len, .. } => (*offset, *len, OpKind::Trim),
            ApplyOp::Zeroes { offset, len, .. } => (*offset, *len, OpKind::Zero),
            ApplyOp::Flush | ApplyOp::Barrier { .. } => (0, 0, OpKind::Flush),
        };
        Op {
            seq,
            offset,
            len,
            kind,
        }
    }

    /// Bytes written (0 for a flush).
    pub fn data_len(&self) -> u64 {
        match self {
            ApplyOp::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
    }

    /// Runs it against the backend.
    pub fn run(&self, b: &dyn Backend) -> Result<(), StorageError> {
        match self {
            ApplyOp::Write { offset, data, fua } => b.write_at(data, *offset, *fua),
            ApplyOp::Trim { offset, len, fua } => {
                b.trim(*offset, *len)?;
                if *fua {
                    b.flush()?;
                }
                Ok(())
            }
            ApplyOp::Zeroes {
                offset,
                len,
                may_trim,
                fua,
            } => b.write_zeroes(*offset, *len, *may_trim, *fua),
            ApplyOp::Flush | ApplyOp::Barrier { durable: true } => b.flush(),
            ApplyOp::Barrier { durable: false } => Ok(()),
        }
    }
}

/// An operation that finished: `tag` is what the caller submitted it with
/// (the primary's request id).
#[derive(Debug)]
pub struct Applied {
    pub tag: u64,
    pub written: u64,
    pub result: Result<(), StorageError>,
}

/// Counters and gauges of a volume's apply engine, for /metrics. Counters
/// add up over every link the volume has had.
#[derive(Debug, Default)]
pub struct ApplyMetrics {
    pub ops: AtomicU64,
    pub inline_ops: AtomicU64,
    /// Operations that overlapped nothing earlier when they arrived.
    pub independent: AtomicU64,
    /// Operations put on a busy task's mini-queue (seed 003's delegation).
    pub delegated: AtomicU64,
    /// Operations that waited on an overlap counter.
    pub counter_waits: AtomicU64,
    /// Epoch barriers that lifted.
    pub barriers: AtomicU64,
    /// Epoch barriers that were durable (an fdatasync each).
    pub durable_barriers: AtomicU64,
    /// Times the receive loop stopped reading because the engine was full.
    pub full_stalls: AtomicU64,
    /// Operations held now.
    pub held: AtomicU64,
    /// Per group: operations homed there and not yet dispatched.
    pub group_queued: Vec<AtomicU64>,
}

impl ApplyMetrics {
    pub fn new(groups: usize) -> Self {
        Self {
            group_queued: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }
}

struct Job {
    task: TaskId,
    seq: Seq,
    tag: u64,
    op: ApplyOp,
}

struct Done {
    task: TaskId,
    seq: Seq,
    tag: u64,
    written: u64,
    result: Result<(), StorageError>,
}

/// Why [`ApplyEngine::new`] refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("volume {volume}: apply engine: {source}")]
    Config {
        volume: String,
        source: blockmirror_core::scheduler::ConfigError,
    },
    #[error("volume {volume}: cannot start apply worker: {source}")]
    Spawn {
        volume: String,
        source: std::io::Error,
    },
}

/// An epoch barrier waiting for what came before it.
#[derive(Debug, Clone, Copy)]
struct Barrier {
    tag: u64,
    /// The scheduler's flush that makes the epoch durable; None for a
    /// barrier that only orders (it lifts when nothing is held).
    flush: Option<Seq>,
}

/// See the module documentation.
pub struct ApplyEngine {
    backend: Arc<dyn Backend>,
    sched: Scheduler,
    /// Submitted, not yet dispatched.
    pending: HashMap<Seq, (u64, ApplyOp)>,
    /// The epoch barrier in force, if any, and what arrived after it.
    barrier: Option<Barrier>,
    deferred: std::collections::VecDeque<(u64, ApplyOp)>,
    max_ops: usize,
    workers: Vec<std::sync::mpsc::Sender<Job>>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    next_seq: Seq,
    /// Dispatched to a worker and not yet back.
    running: usize,
    inline_max: u64,
    /// Write data held (submitted, not yet applied), against `max_bytes`.
    held_bytes: u64,
    max_bytes: u64,
    metrics: Arc<ApplyMetrics>,
    /// Scheduler counters already added to `metrics`.
    published: (u64, u64, u64),
    published_at: std::time::Instant,
    published_idle: bool,
    scratch: Vec<Dispatch>,
}

impl ApplyEngine {
    /// Starts `groups * tasks_per_group` worker threads over `backend`.
    pub fn new(
        backend: Arc<dyn Backend>,
        cfg: ApplyConfig,
        metrics: Arc<ApplyMetrics>,
    ) -> Result<Self, ApplyError> {
        let volume = backend.volume().to_owned();
        let sched = Scheduler::new(SchedulerConfig {
            max_ops: cfg.max_ops.max(1),
            ..SchedulerConfig::new(backend.size().max(1), cfg.groups, cfg.tasks_per_group)
        })
        .map_err(|source| ApplyError::Config {
            volume: volume.clone(),
            source,
        })?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut workers = Vec::with_capacity(sched.tasks());
        for task in 0..sched.tasks() {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let (b, done) = (backend.clone(), done_tx.clone());
            std::thread::Builder::new()
                .name(format!("apply-{volume}-{task}"))
                .spawn(move || worker(b.as_ref(), rx, done))
                .map_err(|source| ApplyError::Spawn {
                    volume: volume.clone(),
                    source,
                })?;
            workers.push(tx);
        }
        let inline_max = if backend.is_fast() {
            cfg.inline_max as u64
        } else {
            0
        };
        Ok(Self {
            backend,
            sched,
            pending: HashMap::new(),
            barrier: None,
            deferred: std::collections::VecDeque::new(),
            max_ops: cfg.max_ops.max(1),
            workers,
            done_rx,
            next_seq: 0,
            running: 0,
            inline_max,
            held_bytes: 0,
            max_bytes: cfg.max_bytes.max(1),
            metrics,
            published: (0, 0, 0),
            published_at: std::time::Instant::now(),
            published_idle: false,
            scratch: Vec::new(),
        })
    }

    /// True while a new operation would be refused: stop reading the link.
    pub fn is_full(&self) -> bool {
        self.held() >= self.max_ops || self.held_bytes >= self.max_bytes
    }

    /// Operations submitted and not yet applied (a barrier and what waits
    /// behind it included).
    pub fn held(&self) -> usize {
        self.sched.held()
            + self.deferred.len()
            + usize::from(self.barrier.is_some_and(|b| b.flush.is_none()))
    }

    /// Takes an operation in stream order. Operations that can run now
    /// start (inline ones finish before this returns, into `out`). The
    /// caller must not submit while [`ApplyEngine::is_full`].
    pub fn submit(&mut self, tag: u64, op: ApplyOp, out: &mut Vec<Applied>) {
        assert!(!self.is_full(), "submit while the apply engine is full");
        self.held_bytes += op.data_len();
        if self.barrier.is_some() || !self.deferred.is_empty() {
            // Behind a barrier, or behind what waits for room after one.
            self.deferred.push_back((tag, op));
            return;
        }
        self.start_op(tag, op, out);
        self.settle(out);
    }

    /// Hands one operation (already counted in `held_bytes`) to the
    /// scheduler, or runs it at once; a barrier takes effect here.
    fn start_op(&mut self, tag: u64, op: ApplyOp, out: &mut Vec<Applied>) {
        if let ApplyOp::Barrier { durable: true } = op {
            self.metrics.durable_barriers.fetch_add(1, Relaxed);
        }
        if let ApplyOp::Barrier { durable: false } = op {
            // Lifts as soon as nothing before it is held (see `settle`).
            self.barrier = Some(Barrier { tag, flush: None });
            return;
        }
        if self.sched.held() == 0 && self.runs_inline(&op) {
            // Fast path: with nothing held there is nothing to overlap, so the
            // scheduler would dispatch this at once, and it completes here
            // before anything else is submitted. Skip the bookkeeping.
            let result = op.run(self.backend.as_ref());
            self.held_bytes -= op.data_len();
            self.metrics.ops.fetch_add(1, Relaxed);
            self.metrics.inline_ops.fetch_add(1, Relaxed);
            self.metrics.independent.fetch_add(1, Relaxed);
            out.push(Applied {
                tag,
                written: op.data_len(),
                result,
            });
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let sop = op.sched_op(seq);
        if let ApplyOp::Barrier { durable: true } = op {
            // The scheduler's flush waits for everything before it; later
            // operations wait for the flush.
            self.barrier = Some(Barrier {
                tag,
                flush: Some(seq),
            });
        }
        self.pending.insert(seq, (tag, op));
        match self.sched.submit(sop) {
            Ok(ds) => self.dispatch(ds, out),
            // Full was checked above; sequence numbers are ours and increase;
            // ranges were checked against the volume by the caller.
            Err(e) => unreachable!("scheduler refused a checked operation: {e}"),
        }
    }

    /// Lifts a barrier whose epoch is done and starts what waited behind
    /// it, until another barrier or the scheduler's bound stops that.
    fn settle(&mut self, out: &mut Vec<Applied>) {
        loop {
            match self.barrier {
                Some(Barrier { tag, flush: None }) if self.sched.held() == 0 => {
                    self.barrier = None;
                    self.metrics.barriers.fetch_add(1, Relaxed);
                    self.metrics.ops.fetch_add(1, Relaxed);
                    out.push(Applied {
                        tag,
                        written: 0,
                        result: Ok(()),
                    });
                }
                Some(_) => return,
                None => {}
            }
            if self.sched.is_full() {
                return;
            }
            let Some((tag, op)) = self.deferred.pop_front() else {
                return;
            };
            self.start_op(tag, op, out);
        }
    }

    /// True when a completion is still to come from a worker.
    pub fn has_running(&self) -> bool {
        self.running > 0
    }

    /// Waits for at least one worker completion, then takes every one that
    /// is ready. Cancel-safe: nothing is lost if the future is dropped
    /// before it returns. Never returns while nothing is running.
    pub async fn completions(&mut self, out: &mut Vec<Applied>) {
        if self.running == 0 {
            return std::future::pending().await;
        }
        if let Some(d) = self.done_rx.recv().await {
            self.finish(d, out);
        }
        self.ready(out);
    }

    /// Takes the worker completions that are ready, without waiting.
    pub fn ready(&mut self, out: &mut Vec<Applied>) {
        while let Ok(d) = self.done_rx.try_recv() {
            self.finish(d, out);
        }
        self.settle(out);
    }

    /// Publishes the scheduler's counters and gauges to the metrics: at
    /// most every `PUBLISH_EVERY` while busy (reading the scheduler's
    /// stats costs a little), and once whenever it has gone idle.
    pub fn publish(&mut self) {
        let idle = self.sched.held() == 0;
        if (idle && self.published_idle) || (!idle && self.published_at.elapsed() < PUBLISH_EVERY) {
            return;
        }
        self.published_idle = idle;
        self.published_at = std::time::Instant::now();
        let s = self.sched.stats();
        let m = &self.metrics;
        let (i, d, c) = self.published;
        m.independent.fetch_add(s.independent - i, Relaxed);
        m.delegated.fetch_add(s.delegated - d, Relaxed);
        m.counter_waits.fetch_add(s.counter_waits - c, Relaxed);
        self.published = (s.independent, s.delegated, s.counter_waits);
        m.held.store(s.held as u64, Relaxed);
        for (g, gs) in m.group_queued.iter().zip(&s.groups) {
            g.store(gs.queued as u64, Relaxed);
        }
    }

    /// The link ended: waits for what is running, drops what has not
    /// started, stops the workers. Returns the completions that came in
    /// meanwhile (their acknowledgements may still be sendable).
    pub async fn drain(mut self) -> Vec<Applied> {
        let mut out = Vec::new();
        // Nothing new starts: completions are not fed to the scheduler.
        self.pending.clear();
        self.deferred.clear();
        while self.running > 0 {
            match self.done_rx.recv().await {
                Some(d) => {
                    self.running -= 1;
                    self.metrics.ops.fetch_add(1, Relaxed);
                    out.push(Applied {
                        tag: d.tag,
                        written: d.written,
                        result: d.result,
                    });
                }
                None => break,
            }
        }
        self.metrics.held.store(0, Relaxed);
        for g in &self.metrics.group_queued {
            g.store(0, Relaxed);
        }
        // Dropping the senders ends the worker threads.
        out
    }

    fn finish(&mut self, d: Done, out: &mut Vec<Applied>) {
        self.running -= 1;
        self.held_bytes -= d.written;
        self.metrics.ops.fetch_add(1, Relaxed);
        out.push(Applied {
            tag: d.tag,
            written: d.written,
            result: d.result,
        });
        if self.barrier.is_some_and(|b| b.flush == Some(d.seq)) {
            self.barrier = None;
            self.metrics.barriers.fetch_add(1, Relaxed);
        }
        let next = self
            .sched
            .complete(d.task, d.seq)
            .expect("a worker completes only what it was given");
        self.dispatch(next, out);
    }

    fn dispatch(&mut self, ds: Vec<Dispatch>, out: &mut Vec<Applied>) {
        let mut todo = std::mem::take(&mut self.scratch);
        todo.extend(ds);
        let mut i = 0;
        while i < todo.len() {
            let Dispatch { task, op } = todo[i];
            i += 1;
            let (tag, aop) = self
                .pending
                .remove(&op.seq)
                .expect("a dispatched operation is pending");
            if self.runs_inline(&aop) {
                let result = aop.run(self.backend.as_ref());
                self.held_bytes -= aop.data_len();
                self.metrics.ops.fetch_add(1, Relaxed);
                self.metrics.inline_ops.fetch_add(1, Relaxed);
                out.push(Applied {
                    tag,
                    written: aop.data_len(),
                    result,
                });
                let next = self
                    .sched
                    .complete(task, op.seq)
                    .expect("the task was just given this operation");
                todo.extend(next);
            } else {
                self.running += 1;
                let job = Job {
                    task,
                    seq: op.seq,
                    tag,
                    op: aop,
                };
                // A worker only stops when its sender is dropped, which
                // happens with the engine.
                self.workers[task]
                    .send(job)
                    .expect("apply worker thread is alive");
            }
        }
        todo.clear();
        self.scratch = todo;
    }

    fn runs_inline(&self, op: &ApplyOp) -> bool {
        matches!(op, ApplyOp::Write { data, fua: false, .. } if (data.len() as u64) <= self.inline_max)
    }
}

fn worker(b: &dyn Backend, rx: std::sync::mpsc::Receiver<Job>, done: mpsc::UnboundedSender<Done>) {
    while let Ok(job) = rx.recv() {
        let result = job.op.run(b);
        let d = Done {
            task: job.task,
            seq: job.seq,
            tag: job.tag,
            written: job.op.data_len(),
            result,
        };
        if done.send(d).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_storage::MemBackend;
    use proptest::prelude::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A backend that records which ranges are being written at once,
    /// sleeps a random short time in each call (so completions come back in
    /// random orders), and fails the test if two overlapping calls ever run
    /// together.
    struct Watch {
        inner: MemBackend,
        active: Mutex<Vec<(u64, u64)>>,
        overlaps: AtomicU64,
        max_parallel: AtomicU64,
        seed: AtomicU64,
    }

    impl Watch {
        fn new(size: u64) -> Self {
            Self {
                inner: MemBackend::new("t", size),
                active: Mutex::new(Vec::new()),
                overlaps: AtomicU64::new(0),
                max_parallel: AtomicU64::new(0),
                seed: AtomicU64::new(1),
            }
        }

        fn around<T>(&self, off: u64, len: u64, f: impl FnOnce() -> T) -> T {
            {
                let mut a = self.active.lock().unwrap();
                if a.iter().any(|&(o, l)| off < o + l && o < off + len) {
                    self.overlaps.fetch_add(1, Relaxed);
                }
                a.push((off, len));
                self.max_parallel.fetch_max(a.len() as u64, Relaxed);
            }
            // xorshift: a few microseconds to ~0.3 ms.
            let mut x = self.seed.fetch_add(0x9E37_79B9, Relaxed) | 1;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::thread::sleep(Duration::from_micros(x % 300));
            let r = f();
            let mut a = self.active.lock().unwrap();
            let i = a.iter().position(|&r| r == (off, len)).unwrap();
            a.swap_remove(i);
            r
        }
    }

    impl Backend for Watch {
        fn volume(&self) -> &str {
            "t"
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> blockmirror_storage::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> blockmirror_storage::Result<()> {
            self.around(offset, buf.len() as u64, || {
                self.inner.write_at(buf, offset, fua)
            })
        }
        fn flush(&self) -> blockmirror_storage::Result<()> {
            self.inner.flush()
        }
        fn trim(&self, offset: u64, len: u64) -> blockmirror_storage::Result<()> {
            self.around(offset, len, || self.inner.trim(offset, len))
        }
        fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            may_trim: bool,
            fua: bool,
        ) -> blockmirror_storage::Result<()> {
            self.around(offset, len, || {
                self.inner.write_zeroes(offset, len, may_trim, fua)
            })
        }
    }

    const SIZE: u64 = 1 << 20;

    fn op_strategy() -> impl Strategy<Value = ApplyOp> {
        // Small volume, sizes up to 64 KiB: plenty of overlaps.
        (0u8..10, 0u64..SIZE / 512, 1u64..128, any::<u8>()).prop_map(|(k, block, blocks, fill)| {
            let offset = block * 512;
            let len = (blocks * 512).min(SIZE - offset);
            match k {
                0 => ApplyOp::Flush,
                1 => ApplyOp::Trim {
                    offset,
                    len,
                    fua: false,
                },
                2 => ApplyOp::Zeroes {
                    offset,
                    len,
                    may_trim: fill & 1 == 0,
                    fua: false,
                },
                _ => ApplyOp::Write {
                    offset,
                    data: Bytes::from(vec![fill; len as usize]),
                    fua: k == 3,
                },
            }
        })
    }

    async fn run_stream(cfg: ApplyConfig, ops: &[ApplyOp]) -> (Arc<Watch>, Vec<Applied>) {
        let backend = Arc::new(Watch::new(SIZE));
        let metrics = Arc::new(ApplyMetrics::new(cfg.groups));
        let mut e = ApplyEngine::new(backend.clone(), cfg, metrics).unwrap();
        let mut out = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            while e.is_full() {
                e.completions(&mut out).await;
            }
            e.submit(i as u64, op.clone(), &mut out);
        }
        while e.has_running() {
            e.completions(&mut out).await;
        }
        assert_eq!(e.held(), 0, "everything submitted was applied");
        (backend, out)
    }

    fn serial(ops: &[ApplyOp]) -> Vec<u8> {
        let m = MemBackend::new("s", SIZE);
        for op in ops {
            op.run(&m).unwrap();
        }
        m.snapshot()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any stream, applied by many tasks with random per-call latency,
        /// leaves the image a one-by-one apply leaves; overlapping calls
        /// never run at once; every operation completes exactly once.
        #[test]
        fn parallel_apply_equals_serial(
            ops in proptest::collection::vec(op_strategy(), 1..120),
            groups in 1usize..5,
            tasks in 1usize..4,
            max_ops in 1usize..40,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let cfg = ApplyConfig { groups, tasks_per_group: tasks, max_ops, max_bytes: 256 << 10, inline_max: 0 };
            let (b, out) = rt.block_on(run_stream(cfg, &ops));
            prop_assert_eq!(b.overlaps.load(Relaxed), 0);
            let mut tags: Vec<u64> = out.iter().map(|a| a.tag).collect();
            tags.sort_unstable();
            prop_assert_eq!(tags, (0..ops.len() as u64).collect::<Vec<_>>());
            prop_assert!(out.iter().all(|a| a.result.is_ok()));
            prop_assert!(b.inner.snapshot() == serial(&ops), "image differs from a serial apply");
        }
    }

    /// Records when each write starts and ends, by the index its data
    /// carries in its first 8 bytes.
    struct Events {
        inner: MemBackend,
        log: Mutex<Vec<(bool, u64)>>,
        flushes: AtomicU64,
    }

    impl Backend for Events {
        fn volume(&self) -> &str {
            "e"
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> blockmirror_storage::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> blockmirror_storage::Result<()> {
            let idx = u64::from_le_bytes(buf[..8].try_into().unwrap());
            self.log.lock().unwrap().push((true, idx));
            std::thread::sleep(Duration::from_micros(idx * 37 % 200));
            let r = self.inner.write_at(buf, offset, fua);
            self.log.lock().unwrap().push((false, idx));
            r
        }
        fn flush(&self) -> blockmirror_storage::Result<()> {
            self.flushes.fetch_add(1, Relaxed);
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64) -> blockmirror_storage::Result<()> {
            self.inner.trim(offset, len)
        }
        fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            may_trim: bool,
            fua: bool,
        ) -> blockmirror_storage::Result<()> {
            self.inner.write_zeroes(offset, len, may_trim, fua)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Epoch barriers: no write after a barrier starts before every
        /// write before it has ended; a durable barrier flushes; the image
        /// equals a serial apply; every operation (barriers too) completes
        /// exactly once.
        #[test]
        fn barriers_separate_epochs(
            plan in proptest::collection::vec((0u8..8, 0u64..64, 1u64..16), 1..80),
            tasks in 1usize..5,
            max_ops in 1usize..24,
        ) {
            let mut ops = Vec::new();
            let mut barriers = Vec::new();
            for (i, (k, block, blocks)) in plan.into_iter().enumerate() {
                let i = i as u64;
                if k < 2 {
                    barriers.push(i);
                    ops.push(ApplyOp::Barrier { durable: k == 0 });
                } else {
                    let len = (blocks * 512).min(SIZE - block * 512) as usize;
                    let mut data = vec![k; len.max(512)];
                    data[..8].copy_from_slice(&i.to_le_bytes());
                    ops.push(ApplyOp::Write { offset: block * 512, data: Bytes::from(data), fua: false });
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let b = Arc::new(Events { inner: MemBackend::new("e", SIZE), log: Mutex::new(Vec::new()), flushes: AtomicU64::new(0) });
            let cfg = ApplyConfig { groups: 2, tasks_per_group: tasks, max_ops, max_bytes: 1 << 30, inline_max: 0 };
            let out = rt.block_on(async {
                let mut e = ApplyEngine::new(b.clone(), cfg, Arc::new(ApplyMetrics::new(2))).unwrap();
                let mut out = Vec::new();
                for (i, op) in ops.iter().enumerate() {
                    while e.is_full() {
                        e.completions(&mut out).await;
                    }
                    e.submit(i as u64, op.clone(), &mut out);
                }
                while e.held() > 0 {
                    e.completions(&mut out).await;
                }
                out
            });
            let mut tags: Vec<u64> = out.iter().map(|a| a.tag).collect();
            tags.sort_unstable();
            prop_assert_eq!(tags, (0..ops.len() as u64).collect::<Vec<_>>());
            let log = b.log.lock().unwrap().clone();
            let pos = |start: bool, idx: u64| log.iter().position(|&e| e == (start, idx));
            for &bar in &barriers {
                let last_end = (0..bar).filter_map(|i| pos(false, i)).max();
                let first_start = (bar + 1..ops.len() as u64).filter_map(|i| pos(true, i)).min();
                if let (Some(end), Some(start)) = (last_end, first_start) {
                    prop_assert!(end < start, "barrier {} crossed: a later write started at event {} before an earlier one ended at {}", bar, start, end);
                }
            }
            let durable = ops.iter().filter(|o| matches!(o, ApplyOp::Barrier { durable: true })).count() as u64;
            prop_assert_eq!(b.flushes.load(Relaxed), durable);
            prop_assert!(b.inner.snapshot() == serial(&ops), "image differs from a serial apply");
        }
    }

    #[tokio::test]
    async fn non_overlapping_writes_run_in_parallel() {
        let ops: Vec<ApplyOp> = (0..64)
            .map(|i| ApplyOp::Write {
                offset: i * 4096,
                data: Bytes::from(vec![1u8; 4096]),
                fua: false,
            })
            .collect();
        let cfg = ApplyConfig {
            groups: 1,
            tasks_per_group: 8,
            max_ops: 64,
            max_bytes: 1 << 30,
            inline_max: 0,
        };
        let (b, _) = run_stream(cfg, &ops).await;
        assert!(
            b.max_parallel.load(Relaxed) > 1,
            "independent writes never overlapped in time"
        );
    }

    #[tokio::test]
    async fn flush_waits_for_every_earlier_op() {
        // A FUA-less write, then a flush: the flush's completion comes after
        // the write's, whatever the workers do.
        for _ in 0..20 {
            let ops = vec![
                ApplyOp::Write {
                    offset: 0,
                    data: Bytes::from(vec![7u8; 65536]),
                    fua: false,
                },
                ApplyOp::Write {
                    offset: 1 << 19,
                    data: Bytes::from(vec![8u8; 4096]),
                    fua: false,
                },
                ApplyOp::Flush,
            ];
            let cfg = ApplyConfig {
                groups: 2,
                tasks_per_group: 2,
                max_ops: 8,
                max_bytes: 1 << 30,
                inline_max: 0,
            };
            let (_, out) = run_stream(cfg, &ops).await;
            let pos = |t| out.iter().position(|a| a.tag == t).unwrap();
            assert!(
                pos(2) > pos(0) && pos(2) > pos(1),
                "flush acknowledged early"
            );
        }
    }

    #[tokio::test]
    async fn inline_writes_on_a_fast_backend_keep_order() {
        // MemBackend is fast: small writes run inline, the large one on a
        // worker; the overlapping small write after it must wait for it.
        let m = Arc::new(MemBackend::new("m", SIZE));
        assert!(m.is_fast());
        let metrics = Arc::new(ApplyMetrics::new(1));
        let mut e = ApplyEngine::new(m.clone(), ApplyConfig::default(), metrics.clone()).unwrap();
        let mut out = Vec::new();
        e.submit(
            0,
            ApplyOp::Write {
                offset: 0,
                data: Bytes::from(vec![1u8; 128 * 1024]),
                fua: false,
            },
            &mut out,
        );
        e.submit(
            1,
            ApplyOp::Write {
                offset: 4096,
                data: Bytes::from(vec![2u8; 4096]),
                fua: false,
            },
            &mut out,
        );
        e.submit(
            2,
            ApplyOp::Write {
                offset: 1 << 19,
                data: Bytes::from(vec![3u8; 4096]),
                fua: false,
            },
            &mut out,
        );
        // The independent small write ran inline already.
        assert!(out.iter().any(|a| a.tag == 2));
        while e.has_running() {
            e.completions(&mut out).await;
        }
        assert_eq!(out.len(), 3);
        let img = m.snapshot();
        assert_eq!(img[4096], 2, "the later overlapping write landed last");
        assert_eq!(img[0], 1);
        assert!(metrics.inline_ops.load(Relaxed) >= 2);
        e.publish();
        assert!(metrics.counter_waits.load(Relaxed) + metrics.delegated.load(Relaxed) >= 1);
    }

    #[tokio::test]
    async fn drain_waits_for_running_and_drops_queued() {
        let b = Arc::new(Watch::new(SIZE));
        let metrics = Arc::new(ApplyMetrics::new(1));
        let cfg = ApplyConfig {
            groups: 1,
            tasks_per_group: 1,
            max_ops: 16,
            max_bytes: 1 << 30,
            inline_max: 0,
        };
        let mut e = ApplyEngine::new(b.clone(), cfg, metrics).unwrap();
        let mut out = Vec::new();
        for i in 0..4 {
            e.submit(
                i,
                ApplyOp::Write {
                    offset: i * 4096,
                    data: Bytes::from(vec![9u8; 4096]),
                    fua: false,
                },
                &mut out,
            );
        }
        let done = e.drain().await;
        // One task: one op was running, the rest were queued and dropped.
        assert_eq!(done.len(), 1);
        assert!(b.active.lock().unwrap().is_empty(), "nothing left running");
    }
}
