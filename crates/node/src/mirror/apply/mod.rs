//! The mirror's apply engine (seed 003): one ordered stream of operations
//! from the primary, applied to the backend by many tasks.
//!
//! The decisions come from [`blockmirror_core::scheduler::Scheduler`] (range
//! groups, main queues, mini-queues, the active-task table and the overlap
//! counter; see its module docs for why the result equals a one-by-one
//! apply). This module is the I/O around it:
//!
//! - Operations the scheduler dispatches run on a node-wide pool of worker
//!   threads ([`APPLY_THREADS`]), shared by every volume's engine. A backend
//!   call is synchronous and may sleep (O_DIRECT, a slow device, a full
//!   page cache), so operations of different tasks need threads to overlap;
//!   a task runs one operation at a time (the scheduler gives it the next
//!   only when the last completed), so any thread may run any task's
//!   operation. A node with a hundred mirror volumes runs as many apply
//!   threads as a node with one.
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

use crate::daemon::metrics::{self, MetricType};
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
    done_tx: mpsc::UnboundedSender<Done>,
    /// The node-wide pool.
    pool: &'static Pool,
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
    /// An engine of `groups * tasks_per_group` tasks over `backend`.
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
        let pool = pool().map_err(|source| ApplyError::Spawn {
            volume: volume.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        })?;
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
            done_tx,
            pool,
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
                let (b, done) = (self.backend.clone(), self.done_tx.clone());
                self.pool
                    .send(Box::new(move || run_job(b.as_ref(), job, &done)));
            }
        }
        todo.clear();
        self.scratch = todo;
    }

    fn runs_inline(&self, op: &ApplyOp) -> bool {
        matches!(op, ApplyOp::Write { data, fua: false, .. } if (data.len() as u64) <= self.inline_max)
    }
}

/// Threads of the node-wide apply pool.
pub const APPLY_THREADS: usize = 16;

type PoolTask = Box<dyn FnOnce() + Send>;

/// The node-wide apply pool: a queue and the threads that wait on it. A
/// job wakes one waiting thread (a condition variable); a shared
/// `mpsc::Receiver` behind a mutex woke two per job (the receiver, then the
/// next thread queued on the mutex).
struct Pool {
    queue: std::sync::Mutex<std::collections::VecDeque<PoolTask>>,
    ready: std::sync::Condvar,
}

impl Pool {
    fn send(&self, task: PoolTask) {
        self.queue
            .lock()
            .expect("apply pool poisoned")
            .push_back(task);
        self.ready.notify_one();
    }

    fn work(&self) {
        loop {
            let task = {
                let mut q = self.queue.lock().expect("apply pool poisoned");
                loop {
                    match q.pop_front() {
                        Some(t) => break t,
                        None => q = self.ready.wait(q).expect("apply pool poisoned"),
                    }
                }
            };
            task();
        }
    }
}

/// The node-wide apply pool, started on first use.
fn pool() -> Result<&'static Pool, &'static std::io::Error> {
    static POOL: std::sync::OnceLock<Result<Arc<Pool>, std::io::Error>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let pool = Arc::new(Pool {
            queue: std::sync::Mutex::new(std::collections::VecDeque::new()),
            ready: std::sync::Condvar::new(),
        });
        for i in 0..APPLY_THREADS {
            let p = pool.clone();
            std::thread::Builder::new()
                .name(format!("bm-apply-{i}"))
                .spawn(move || p.work())?;
        }
        Ok(pool)
    })
    .as_ref()
    .map(|p| &**p)
}

fn run_job(b: &dyn Backend, job: Job, done: &mpsc::UnboundedSender<Done>) {
    let result = job.op.run(b);
    let _ = done.send(Done {
        task: job.task,
        seq: job.seq,
        tag: job.tag,
        written: job.op.data_len(),
        result,
    });
}

/// Registers the apply engines' families of `targets` (volume name, its
/// engine's counters) for /metrics.
pub fn register_apply_metrics(
    registry: &mut metrics::Registry,
    targets: Arc<dyn Fn() -> Vec<(String, Arc<ApplyMetrics>)> + Send + Sync>,
) {
    registry.register_collector(metrics::FnCollector::boxed("apply", move |enc| {
        let targets = targets();
        let t: Vec<(&str, &ApplyMetrics)> =
            targets.iter().map(|(v, m)| (v.as_str(), &**m)).collect();
        encode_apply_metrics(enc, &t)
    }));
}

/// The apply engine's families in /metrics, labelled by volume.
pub fn encode_apply_metrics(
    enc: &mut metrics::Encoder<'_>,
    targets: &[(&str, &ApplyMetrics)],
) -> std::fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    type Get = fn(&ApplyMetrics) -> u64;
    let families: [(&str, MetricType, &str, Get); 9] = [
        (
            "blockmirror_apply_ops_total",
            MetricType::Counter,
            "Operations the mirror's apply engine has applied.",
            |m| m.ops.load(Relaxed),
        ),
        (
            "blockmirror_apply_inline_ops_total",
            MetricType::Counter,
            "Of those, small writes to a fast backend run on the receive loop.",
            |m| m.inline_ops.load(Relaxed),
        ),
        (
            "blockmirror_apply_independent_total",
            MetricType::Counter,
            "Operations that overlapped nothing earlier when they arrived.",
            |m| m.independent.load(Relaxed),
        ),
        (
            "blockmirror_apply_delegated_total",
            MetricType::Counter,
            "Operations delegated to the mini-queue of the task working on their range.",
            |m| m.delegated.load(Relaxed),
        ),
        (
            "blockmirror_apply_counter_waits_total",
            MetricType::Counter,
            "Operations that waited on an overlap counter (several earlier overlaps).",
            |m| m.counter_waits.load(Relaxed),
        ),
        (
            "blockmirror_apply_barriers_total",
            MetricType::Counter,
            "Async epoch barriers that lifted (everything before each was applied).",
            |m| m.barriers.load(Relaxed),
        ),
        (
            "blockmirror_apply_durable_barriers_total",
            MetricType::Counter,
            "Async epoch barriers that were made durable (durable_barriers: an fdatasync each).",
            |m| m.durable_barriers.load(Relaxed),
        ),
        (
            "blockmirror_apply_full_stalls_total",
            MetricType::Counter,
            "Times the link was not read because the apply engine was full.",
            |m| m.full_stalls.load(Relaxed),
        ),
        (
            "blockmirror_apply_held_ops",
            MetricType::Gauge,
            "Operations received and not yet applied.",
            |m| m.held.load(Relaxed),
        ),
    ];
    if targets.is_empty() {
        return Ok(());
    }
    for (name, kind, help, get) in families {
        let mut f = metrics::family(enc, name, kind, help)?;
        for (vol, t) in targets {
            f.sample(&[("volume", vol)], get(t))?;
        }
    }
    let name = "blockmirror_apply_group_queue_depth";
    let mut f = metrics::family(
        enc,
        name,
        MetricType::Gauge,
        "Operations homed in a range group and not yet started.",
    )?;
    for (vol, t) in targets {
        for (g, depth) in t.group_queued.iter().enumerate() {
            let g = g.to_string();
            f.sample(&[("volume", vol), ("group", &g)], depth.load(Relaxed))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
