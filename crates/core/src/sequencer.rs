//! The sequencer: subtasks prepared out of order leave for the link in order.
//!
//! Seeds 000 and 001. A host write larger than a track becomes a *context*
//! (the seed's write task) of track-sized *subtasks*, numbered `0..total` by
//! position. A pool of workers prepares them (frame encoding, crc32c,
//! compression) and finishes them in any order; the sequencer hands them to
//! the replication links strictly in index order within each context.
//!
//! # The seed's data model, and what changed
//!
//! - Every subtask names its context ([`ContextId`], the seed's field 52) and
//!   its position ([`SubtaskIndex`], field 56).
//! - Each open context has a control block (232) holding the next index to
//!   release (index field 230) and its subqueue (206) of held subtasks.
//! - A subtask is released only when it is the next of its context; contexts
//!   are otherwise independent: a stalled context never holds up another
//!   (except by the cross-context rule below, which the caller asks for).
//!
//! The seed keeps one queue sorted by (context, index) and walks all of it
//! after every insertion (FIG. 4, claim 7): O(queued) per subtask. Here the
//! subqueue is a window indexed by `index - next` (the seed allows "sorting
//! by indexing", seed 000 §0064), so an insertion costs one hash lookup of the
//! context and one slot write (a window never has more slots than its
//! context has subtasks), and releasing `k` subtasks costs O(k). Nothing
//! ever looks at another context's subtasks, except when a context completes
//! and unblocks later ones (O(log n) per acknowledged context). The seed's
//! algorithm is kept in [`naive`] as the reference for tests and the
//! baseline of `benches/sequencer.rs`.
//!
//! # Tasks without subtasks
//!
//! A task that is not split (seed 000 §0061: a one-track write, a FLUSH, a TRIM) is a
//! context of one subtask. [`Sequencer::submit`] hands it over in one call;
//! unless the cross-context rule holds it, it is released at once without a
//! control block. `open_context(ctx, 1)` followed by `insert(ctx, 0, item)`
//! does the same for a task whose single subtask is prepared by a worker. A
//! context of zero subtasks has nothing to order and is complete on opening.
//!
//! # Order across contexts (DESIGN.md, guarantee 2)
//!
//! In async mode the host is told a write is done after the local write,
//! while its subtasks may still be in the workers. A write B issued after
//! that must not reach the mirror before A. The rule the sequencer keeps:
//!
//! > If [`Sequencer::acknowledged`]`(A)` was called before
//! > [`Sequencer::open_context`]`(B)` (or `submit(B, ..)`), every subtask of
//! > A is released before any subtask of B: B's subtasks are held, even in
//! > order, until A has completed (or was aborted). Contexts with no such
//! > relation are independent.
//!
//! So the write path calls `acknowledged(ctx)` *before* replying to the host,
//! and opens a context when its write is issued (after range locking). A host
//! that issued B after seeing A's reply then had B opened after A's
//! acknowledgement, and B follows A on every link. Writes in flight together
//! (neither acknowledged when the other was issued) stay independent, as NBD
//! allows. In sync mode the reply comes after the mirror has the write, so A
//! is complete and `acknowledged(A)` is a no-op: nothing is ever held for
//! order. Calling `acknowledged(ctx)` right after every `open_context(ctx)`
//! gives strict FIFO: contexts are emitted whole, in the order they were
//! opened.
//!
//! Dependencies only point from a later-opened context to an earlier
//! acknowledged one, so they never form a cycle, and the oldest incomplete
//! acknowledged context is never held.
//!
//! # Memory bound and back-pressure
//!
//! The bound is on *admitted* subtasks: those of open contexts not yet
//! released, whether a worker is still preparing them or the sequencer holds
//! them. Opening a context admits all its subtasks at once and is refused
//! when they do not fit ([`SequencerError::Full`]), when
//! [`SequencerLimits::max_contexts`] control blocks are open
//! ([`SequencerError::TooManyContexts`]), or, for good, when the context is
//! larger than [`SequencerLimits::max_context_subtasks`]
//! ([`SequencerError::ContextTooLarge`]). A refused opener waits (a
//! `Notify` woken whenever a call released something) and tries again; the
//! sequencer keeps nothing of a refused call.
//!
//! [`Sequencer::insert`] is never refused for capacity: the room was taken
//! when the context opened. This is what makes the bound deadlock-free.
//! Refusing the insert of a held-back worker's subtask could starve the very
//! subtask that would release the others, and workers stuck in the sequencer
//! would leave nobody to prepare it. With admission at open, in issue order,
//! every admitted subtask can always be inserted, so every admitted context
//! completes and gives its room back. Nothing is dropped: an `open_context`
//! refusal holds no item, and a refused `submit` hands its item back
//! ([`Rejected`]).
//!
//! # Abort
//!
//! A context whose subtasks will never all arrive (its local write failed,
//! the write was cancelled) is ended with [`Sequencer::abort_context`]: its
//! held subtasks come back to the caller, its room is freed, and contexts
//! that followed it proceed. Its blocks must then be recorded out of sync
//! (guarantee 3); a mirror may hold later writes without it.
//!
//! # Threads
//!
//! The type is plain data with `&mut self` methods; the daemon keeps it behind
//! one mutex (an insert is a few tens of nanoseconds), so there is no
//! lock-free sharing to model-check.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use thiserror::Error;

/// Names a context: one write task, unique among open contexts.
pub type ContextId = u64;
/// A subtask's position in its context, from 0.
pub type SubtaskIndex = u32;

/// Admitted subtasks by default: 1 GiB of 64 KiB tracks.
pub const DEFAULT_MAX_SUBTASKS: usize = 16 * 1024;
/// Subtasks per context by default: a 32 MiB write (the NBD request size
/// limit clients use) in 64 KiB tracks.
pub const DEFAULT_MAX_CONTEXT_SUBTASKS: u32 = 512;
/// Open contexts by default.
pub const DEFAULT_MAX_CONTEXTS: usize = 4096;

/// The sequencer's bounds; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequencerLimits {
    /// Most subtasks admitted and not yet released, across all contexts.
    pub max_subtasks: usize,
    /// Most subtasks in one context. At most `max_subtasks`.
    pub max_context_subtasks: u32,
    /// Most open contexts (control blocks).
    pub max_contexts: usize,
}

impl Default for SequencerLimits {
    fn default() -> Self {
        Self {
            max_subtasks: DEFAULT_MAX_SUBTASKS,
            max_context_subtasks: DEFAULT_MAX_CONTEXT_SUBTASKS,
            max_contexts: DEFAULT_MAX_CONTEXTS,
        }
    }
}

/// Why the sequencer refused a call.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SequencerError {
    #[error(
        "sequencer limits invalid: {max_subtasks} subtasks, {max_context_subtasks} per context, \
         {max_contexts} contexts (each must be at least 1, and a context no larger than the total)"
    )]
    InvalidLimits {
        max_subtasks: usize,
        max_context_subtasks: u32,
        max_contexts: usize,
    },
    /// Back-pressure: wait for releases and open again.
    #[error(
        "context {ctx} needs room for {needed} subtasks, only {available} of {max} are free; \
         wait for releases"
    )]
    Full {
        ctx: ContextId,
        needed: u32,
        available: usize,
        max: usize,
    },
    /// Back-pressure: wait for a context to complete and open again.
    #[error("context {ctx} cannot open: all {max} control blocks are in use; wait for a context to complete")]
    TooManyContexts { ctx: ContextId, max: usize },
    #[error("context {ctx} has {subtasks} subtasks, more than the limit of {max}; split the task")]
    ContextTooLarge {
        ctx: ContextId,
        subtasks: u32,
        max: u32,
    },
    #[error("context {0} is already open")]
    AlreadyOpen(ContextId),
    #[error("context {0} is not open (never opened, already complete, or aborted)")]
    UnknownContext(ContextId),
    #[error("subtask {index} of context {ctx} was already inserted")]
    Duplicate { ctx: ContextId, index: SubtaskIndex },
    #[error("subtask {index} of context {ctx} is beyond its {total} subtasks")]
    IndexOutOfRange {
        ctx: ContextId,
        index: SubtaskIndex,
        total: SubtaskIndex,
    },
}

impl SequencerError {
    /// True for the refusals that clear by themselves once subtasks are
    /// released: the caller waits and retries.
    pub fn is_backpressure(&self) -> bool {
        matches!(self, Self::Full { .. } | Self::TooManyContexts { .. })
    }
}

/// An item the sequencer did not take, handed back with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected<T> {
    pub error: SequencerError,
    pub item: T,
}

impl<T> fmt::Display for Rejected<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl<T: fmt::Debug> std::error::Error for Rejected<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// One subtask with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subtask<T> {
    pub ctx: ContextId,
    pub index: SubtaskIndex,
    pub item: T,
}

/// What one call released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released<T> {
    /// Subtasks to hand to every link, in exactly this order.
    pub subtasks: Vec<Subtask<T>>,
    /// Contexts whose last subtask is in `subtasks` (their control blocks are
    /// freed), in the order they completed.
    pub completed: Vec<ContextId>,
}

impl<T> Default for Released<T> {
    fn default() -> Self {
        Self {
            subtasks: Vec::new(),
            completed: Vec::new(),
        }
    }
}

impl<T> Released<T> {
    pub fn is_empty(&self) -> bool {
        self.subtasks.is_empty() && self.completed.is_empty()
    }

    /// Empties both lists, keeping their allocations (for
    /// [`Sequencer::insert_into`]).
    pub fn clear(&mut self) {
        self.subtasks.clear();
        self.completed.clear();
    }

    fn emit(&mut self, ctx: ContextId, index: SubtaskIndex, item: T) {
        self.subtasks.push(Subtask { ctx, index, item });
    }
}

/// What [`Sequencer::abort_context`] gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aborted<T> {
    /// The aborted context's held subtasks, in index order. They were never
    /// released.
    pub discarded: Vec<Subtask<T>>,
    /// Subtasks of other contexts that no longer wait for the aborted one.
    pub released: Released<T>,
}

/// Counters and gauges for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequencerStats {
    /// Subtasks accepted since creation (counter).
    pub queued_total: u64,
    /// Subtasks released since creation (counter).
    pub released_total: u64,
    /// Subtasks held now: accepted, not released.
    pub held: usize,
    /// Of `held`, those in contexts that only wait for their own
    /// predecessors: each is out of order.
    pub held_out_of_order: usize,
    /// Of `held`, those in contexts that wait for an earlier acknowledged
    /// context (in order or not).
    pub held_for_order: usize,
    /// Subtasks admitted and not released: held plus those still in the
    /// workers. At most [`SequencerLimits::max_subtasks`].
    pub admitted: usize,
    pub open_contexts: usize,
    /// Open contexts waiting for an earlier acknowledged context.
    pub waiting_contexts: usize,
    /// Most subtasks held by one context now.
    pub deepest_backlog: usize,
    /// Most subtasks one context has held at once, since creation.
    pub deepest_backlog_peak: usize,
}

/// The seed's control block (232), with the context's subqueue.
#[derive(Debug)]
struct ControlBlock<T> {
    /// Unique per opening: tells a stale waiting-list entry from a context
    /// that reused the id.
    serial: u64,
    total: SubtaskIndex,
    /// The next index to release (the seed's index field 230).
    next: SubtaskIndex,
    /// Held subtasks: slot `i` holds index `next + i`. Unless `waiting`, slot
    /// 0 is empty (it would have been released) and the last slot is full.
    window: VecDeque<Option<T>>,
    held: usize,
    /// Held for an earlier acknowledged context (cross-context rule).
    waiting: bool,
    /// This context's place in acknowledgement order, once acknowledged.
    ack: Option<u64>,
}

/// A context held by the cross-context rule, in opening order.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    /// Acknowledgements made before it opened: it proceeds once every
    /// acknowledged context numbered up to this has completed.
    after: u64,
    ctx: ContextId,
    serial: u64,
}

/// Hashes context ids (a u64 each, made by the daemon, not by a peer):
/// one multiply and a fold instead of SipHash's rounds, on every insert.
#[derive(Debug, Default, Clone, Copy)]
struct CtxHasher(u64);

impl Hasher for CtxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let x = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }
}

type CtxMap<V> = HashMap<ContextId, V, BuildHasherDefault<CtxHasher>>;

/// Releases subtasks to the link in order; see the module documentation.
#[derive(Debug)]
pub struct Sequencer<T> {
    limits: SequencerLimits,
    blocks: CtxMap<ControlBlock<T>>,
    /// Acknowledgement numbers of acknowledged contexts not yet complete.
    acked_open: BTreeSet<u64>,
    /// The last acknowledgement number given.
    acks: u64,
    /// Contexts held by the cross-context rule, in opening order (so `after`
    /// never decreases). Aborted ones stay until they reach the front.
    waiters: VecDeque<Waiter>,
    serials: u64,
    admitted: usize,
    held: usize,
    held_for_order: usize,
    waiting_contexts: usize,
    queued_total: u64,
    released_total: u64,
    deepest_peak: usize,
}

impl<T> Sequencer<T> {
    pub fn new(limits: SequencerLimits) -> Result<Self, SequencerError> {
        if limits.max_subtasks == 0
            || limits.max_context_subtasks == 0
            || limits.max_contexts == 0
            || limits.max_context_subtasks as usize > limits.max_subtasks
        {
            return Err(SequencerError::InvalidLimits {
                max_subtasks: limits.max_subtasks,
                max_context_subtasks: limits.max_context_subtasks,
                max_contexts: limits.max_contexts,
            });
        }
        Ok(Self {
            limits,
            blocks: CtxMap::default(),
            acked_open: BTreeSet::new(),
            acks: 0,
            waiters: VecDeque::new(),
            serials: 0,
            admitted: 0,
            held: 0,
            held_for_order: 0,
            waiting_contexts: 0,
            queued_total: 0,
            released_total: 0,
            deepest_peak: 0,
        })
    }

    pub fn limits(&self) -> SequencerLimits {
        self.limits
    }

    /// Opens a context of `total` subtasks and admits them all (see
    /// "Memory bound" in the module documentation). A refusal changes
    /// nothing; [`SequencerError::is_backpressure`] tells the caller to wait
    /// and retry. A context of zero subtasks is complete at once: nothing is
    /// recorded.
    pub fn open_context(
        &mut self,
        ctx: ContextId,
        total: SubtaskIndex,
    ) -> Result<(), SequencerError> {
        if self.blocks.contains_key(&ctx) {
            return Err(SequencerError::AlreadyOpen(ctx));
        }
        if total > self.limits.max_context_subtasks {
            return Err(SequencerError::ContextTooLarge {
                ctx,
                subtasks: total,
                max: self.limits.max_context_subtasks,
            });
        }
        if total == 0 {
            return Ok(());
        }
        if self.blocks.len() >= self.limits.max_contexts {
            return Err(SequencerError::TooManyContexts {
                ctx,
                max: self.limits.max_contexts,
            });
        }
        let available = self.limits.max_subtasks - self.admitted;
        if total as usize > available {
            return Err(SequencerError::Full {
                ctx,
                needed: total,
                available,
                max: self.limits.max_subtasks,
            });
        }
        self.admitted += total as usize;
        self.serials += 1;
        // Held iff some acknowledged context is incomplete: every one of them
        // was acknowledged before this opening.
        let waiting = !self.acked_open.is_empty();
        if waiting {
            self.push_waiter(Waiter {
                after: self.acks,
                ctx,
                serial: self.serials,
            });
            self.waiting_contexts += 1;
        }
        self.blocks.insert(
            ctx,
            ControlBlock {
                serial: self.serials,
                total,
                next: 0,
                window: VecDeque::new(),
                held: 0,
                waiting,
                ack: None,
            },
        );
        Ok(())
    }

    /// Hands over subtask `index` of `ctx`, prepared. Returns what is
    /// released now, in order: this subtask and the run of held ones after
    /// it if it is the next of its context, and the subtasks of contexts
    /// that waited for this one if it completes its context.
    ///
    /// Never refused for capacity. An error is a caller bug (the subtask is
    /// dropped and nothing changes).
    pub fn insert(
        &mut self,
        ctx: ContextId,
        index: SubtaskIndex,
        item: T,
    ) -> Result<Released<T>, SequencerError> {
        let mut out = Released::default();
        self.insert_into(ctx, index, item, &mut out)?;
        Ok(out)
    }

    /// [`Sequencer::insert`], appending to `out` so that a caller can reuse
    /// its allocations.
    pub fn insert_into(
        &mut self,
        ctx: ContextId,
        index: SubtaskIndex,
        item: T,
        out: &mut Released<T>,
    ) -> Result<(), SequencerError> {
        let cb = self
            .blocks
            .get_mut(&ctx)
            .ok_or(SequencerError::UnknownContext(ctx))?;
        if index >= cb.total {
            return Err(SequencerError::IndexOutOfRange {
                ctx,
                index,
                total: cb.total,
            });
        }
        if index < cb.next {
            return Err(SequencerError::Duplicate { ctx, index });
        }
        let slot = (index - cb.next) as usize;
        if slot == 0 && !cb.waiting {
            // Its turn: release it and the run it completes.
            self.queued_total += 1;
            cb.window.pop_front();
            out.emit(ctx, index, item);
            cb.next += 1;
            let run = drain_run(ctx, cb, out);
            let done = cb.next == cb.total;
            self.released(1 + run);
            self.held -= run;
            if done {
                self.complete(ctx, out);
            }
            return Ok(());
        }
        if slot < cb.window.len() {
            if cb.window[slot].is_some() {
                return Err(SequencerError::Duplicate { ctx, index });
            }
            cb.window[slot] = Some(item);
        } else {
            cb.window.resize_with(slot, || None);
            cb.window.push_back(Some(item));
        }
        self.queued_total += 1;
        cb.held += 1;
        self.held += 1;
        if cb.waiting {
            self.held_for_order += 1;
        }
        self.deepest_peak = self.deepest_peak.max(cb.held);
        Ok(())
    }

    /// A task without subtasks (seed 000 §0061): opens `ctx` as a context of one
    /// subtask and inserts `item` as its subtask 0. It is released at once
    /// unless the cross-context rule holds it; then it takes room like any
    /// subtask, and a refusal hands the item back.
    pub fn submit(&mut self, ctx: ContextId, item: T) -> Result<Released<T>, Rejected<T>> {
        if self.acked_open.is_empty() && !self.blocks.contains_key(&ctx) {
            // Straight through: no control block, no room taken.
            self.queued_total += 1;
            self.released_total += 1;
            let mut out = Released::default();
            out.emit(ctx, 0, item);
            out.completed.push(ctx);
            return Ok(out);
        }
        if let Err(error) = self.open_context(ctx, 1) {
            return Err(Rejected { error, item });
        }
        Ok(self
            .insert(ctx, 0, item)
            .expect("subtask 0 of a context just opened"))
    }

    /// Records that the host was told `ctx` is done: contexts opened from now
    /// on follow it (see "Order across contexts"). Returns false, doing
    /// nothing, when `ctx` is complete (or was never opened) or was already
    /// acknowledged.
    pub fn acknowledged(&mut self, ctx: ContextId) -> bool {
        let Some(cb) = self.blocks.get_mut(&ctx) else {
            return false;
        };
        if cb.ack.is_some() {
            return false;
        }
        self.acks += 1;
        cb.ack = Some(self.acks);
        self.acked_open.insert(self.acks);
        true
    }

    /// Ends a context that will not complete: see "Abort" in the module
    /// documentation.
    pub fn abort_context(&mut self, ctx: ContextId) -> Result<Aborted<T>, SequencerError> {
        let cb = self
            .blocks
            .remove(&ctx)
            .ok_or(SequencerError::UnknownContext(ctx))?;
        self.admitted -= (cb.total - cb.next) as usize;
        self.held -= cb.held;
        if cb.waiting {
            self.held_for_order -= cb.held;
            self.waiting_contexts -= 1;
        }
        let discarded = cb
            .window
            .into_iter()
            .zip(cb.next..)
            .filter_map(|(slot, index)| slot.map(|item| Subtask { ctx, index, item }))
            .collect();
        let mut released = Released::default();
        if let Some(ack) = cb.ack {
            self.acked_open.remove(&ack);
            self.wake_waiters(&mut released);
        }
        Ok(Aborted {
            discarded,
            released,
        })
    }

    /// True if `ctx` is open (admitted, not complete, not aborted).
    pub fn is_open(&self, ctx: ContextId) -> bool {
        self.blocks.contains_key(&ctx)
    }

    /// The next index `ctx` will release, if it is open.
    pub fn next_index(&self, ctx: ContextId) -> Option<SubtaskIndex> {
        self.blocks.get(&ctx).map(|cb| cb.next)
    }

    /// Room for this many more subtasks now.
    pub fn available(&self) -> usize {
        self.limits.max_subtasks - self.admitted
    }

    /// Counters and gauges; `deepest_backlog` looks at every open context.
    pub fn stats(&self) -> SequencerStats {
        SequencerStats {
            queued_total: self.queued_total,
            released_total: self.released_total,
            held: self.held,
            held_out_of_order: self.held - self.held_for_order,
            held_for_order: self.held_for_order,
            admitted: self.admitted,
            open_contexts: self.blocks.len(),
            waiting_contexts: self.waiting_contexts,
            deepest_backlog: self.blocks.values().map(|cb| cb.held).max().unwrap_or(0),
            deepest_backlog_peak: self.deepest_peak,
        }
    }

    fn released(&mut self, n: usize) {
        self.released_total += n as u64;
        self.admitted -= n;
    }

    /// Frees the control block of a context whose last subtask was released,
    /// and lets go of the contexts that waited for it.
    fn complete(&mut self, ctx: ContextId, out: &mut Released<T>) {
        let cb = self
            .blocks
            .remove(&ctx)
            .expect("completing an open context");
        out.completed.push(ctx);
        if let Some(ack) = cb.ack {
            self.acked_open.remove(&ack);
            self.wake_waiters(out);
        }
    }

    /// Releases, in opening order, every waiting context whose acknowledged
    /// predecessors have all completed. Completing one of them may free more.
    fn wake_waiters(&mut self, out: &mut Released<T>) {
        loop {
            let oldest = self.acked_open.first().copied().unwrap_or(u64::MAX);
            match self.waiters.front() {
                Some(w) if w.after < oldest => {}
                _ => return,
            }
            let w = self.waiters.pop_front().expect("front checked");
            let Some(cb) = self.blocks.get_mut(&w.ctx) else {
                continue;
            };
            if cb.serial != w.serial {
                continue;
            }
            cb.waiting = false;
            self.waiting_contexts -= 1;
            self.held_for_order -= cb.held;
            let run = drain_run(w.ctx, cb, out);
            let done = cb.next == cb.total;
            self.released(run);
            self.held -= run;
            if done {
                let cb = self.blocks.remove(&w.ctx).expect("still open");
                out.completed.push(w.ctx);
                if let Some(ack) = cb.ack {
                    self.acked_open.remove(&ack);
                }
            }
        }
    }

    fn push_waiter(&mut self, w: Waiter) {
        // Aborted waiters stay in the list until they reach the front; if
        // they pile up behind a long-stalled context, sweep them.
        if self.waiters.len() >= 2 * self.waiting_contexts + 64 {
            let blocks = &self.blocks;
            self.waiters.retain(|w| {
                blocks
                    .get(&w.ctx)
                    .is_some_and(|cb| cb.serial == w.serial && cb.waiting)
            });
        }
        self.waiters.push_back(w);
    }
}

/// Releases the run of held subtasks at the front of `cb`'s window; returns
/// how many.
fn drain_run<T>(ctx: ContextId, cb: &mut ControlBlock<T>, out: &mut Released<T>) -> usize {
    let mut n = 0;
    while let Some(slot) = cb.window.front_mut() {
        let Some(item) = slot.take() else { break };
        cb.window.pop_front();
        out.emit(ctx, cb.next, item);
        cb.next += 1;
        n += 1;
    }
    cb.held -= n;
    n
}

pub mod naive {
    //! Seed 000's FIG. 4 as written, kept as the reference model for the
    //! tests and the baseline for `benches/sequencer.rs`. Not for the daemon.
    //!
    //! One queue sorted by (context, index); after every insertion the whole
    //! queue is walked and each subtask's index is compared with its
    //! context's control block (claim 7), so each insertion costs
    //! O(queued). It keeps the same cross-context rule as
    //! [`Sequencer`](super::Sequencer) the plain way: a context remembers
    //! which acknowledged contexts were incomplete when it opened, and is
    //! skipped in the walk until they all are complete. No limits and no
    //! error checks.

    use std::collections::{BTreeSet, HashMap};

    use super::{ContextId, Subtask, SubtaskIndex};

    #[derive(Debug)]
    struct Block {
        serial: u64,
        total: SubtaskIndex,
        next: SubtaskIndex,
        acked: bool,
        /// Serials of the acknowledged contexts incomplete at opening.
        after: Vec<u64>,
    }

    #[derive(Debug)]
    struct Entry<T> {
        ctx: ContextId,
        index: SubtaskIndex,
        item: Option<T>,
    }

    #[derive(Debug)]
    pub struct NaiveSequencer<T> {
        queue: Vec<Entry<T>>,
        blocks: HashMap<ContextId, Block>,
        /// Serials of acknowledged contexts not yet complete.
        acked_open: BTreeSet<u64>,
        serials: u64,
    }

    impl<T> Default for NaiveSequencer<T> {
        fn default() -> Self {
            Self::new()
        }
    }

    impl<T> NaiveSequencer<T> {
        pub fn new() -> Self {
            Self {
                queue: Vec::new(),
                blocks: HashMap::new(),
                acked_open: BTreeSet::new(),
                serials: 0,
            }
        }

        pub fn open(&mut self, ctx: ContextId, total: SubtaskIndex) {
            if total == 0 {
                return;
            }
            self.serials += 1;
            let block = Block {
                serial: self.serials,
                total,
                next: 0,
                acked: false,
                after: self.acked_open.iter().copied().collect(),
            };
            self.blocks.insert(ctx, block);
        }

        pub fn acknowledged(&mut self, ctx: ContextId) {
            if let Some(b) = self.blocks.get_mut(&ctx) {
                if !b.acked {
                    b.acked = true;
                    self.acked_open.insert(b.serial);
                }
            }
        }

        /// Queues the subtask in its sorted place, then walks the queue.
        pub fn insert(&mut self, ctx: ContextId, index: SubtaskIndex, item: T) -> Vec<Subtask<T>> {
            let at = self
                .queue
                .partition_point(|e| (e.ctx, e.index) < (ctx, index));
            self.queue.insert(
                at,
                Entry {
                    ctx,
                    index,
                    item: Some(item),
                },
            );
            let mut out = Vec::new();
            loop {
                // A completed acknowledged context can free subtasks the walk
                // has passed already: walk again.
                let mut again = false;
                let (blocks, acked_open) = (&mut self.blocks, &mut self.acked_open);
                self.queue.retain_mut(|e| {
                    let b = blocks
                        .get_mut(&e.ctx)
                        .expect("queued subtask of an open context");
                    if e.index != b.next || b.after.iter().any(|s| acked_open.contains(s)) {
                        return true;
                    }
                    out.push(Subtask {
                        ctx: e.ctx,
                        index: e.index,
                        item: e.item.take().expect("released once"),
                    });
                    b.next += 1;
                    if b.next == b.total {
                        if b.acked {
                            acked_open.remove(&b.serial);
                            again = true;
                        }
                        blocks.remove(&e.ctx);
                    }
                    false
                });
                if !again {
                    return out;
                }
            }
        }

        /// Subtasks queued.
        pub fn len(&self) -> usize {
            self.queue.len()
        }

        pub fn is_empty(&self) -> bool {
            self.queue.is_empty()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::naive::NaiveSequencer;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn seq(limits: SequencerLimits) -> Sequencer<u64> {
        Sequencer::new(limits).unwrap()
    }

    fn ids(r: &Released<u64>) -> Vec<(ContextId, SubtaskIndex)> {
        r.subtasks.iter().map(|s| (s.ctx, s.index)).collect()
    }

    const A: ContextId = 0xA;
    const B: ContextId = 0xB;
    const C: ContextId = 0xC;

    /// The seed's walk-through (FIGs. 5B to 5E), with its 1-based sequence
    /// numbers shifted to 0-based: A has released 0 and holds 1, 3, 6; B has
    /// released 0 and holds 3, 4, 5.
    #[test]
    fn seed_example() {
        let mut s = seq(SequencerLimits::default());
        s.open_context(A, 8).unwrap();
        s.open_context(B, 6).unwrap();
        assert_eq!(ids(&s.insert(B, 0, 0).unwrap()), vec![(B, 0)]);
        for (c, i) in [(A, 1), (A, 3), (A, 6), (B, 3), (B, 4), (B, 5)] {
            assert!(s.insert(c, i, 0).unwrap().is_empty());
        }
        // 5B: A's "3" (index 2) goes between 1 and 3; nothing is next.
        assert!(s.insert(A, 2, 0).unwrap().is_empty());
        // 5C: B's "3" (index 2); B waits for index 1.
        assert!(s.insert(B, 2, 0).unwrap().is_empty());
        assert_eq!(s.stats().held, 8);
        assert_eq!(s.stats().deepest_backlog, 4);
        // 5D: A's "1" releases 1 to 4; "7" (index 6) stays.
        assert_eq!(
            ids(&s.insert(A, 0, 0).unwrap()),
            vec![(A, 0), (A, 1), (A, 2), (A, 3)]
        );
        assert_eq!(s.next_index(A), Some(4));
        // 5E: B's "2" releases the rest of B, which completes.
        let r = s.insert(B, 1, 0).unwrap();
        assert_eq!(ids(&r), vec![(B, 1), (B, 2), (B, 3), (B, 4), (B, 5)]);
        assert_eq!(r.completed, vec![B]);
        assert!(!s.is_open(B));
        let st = s.stats();
        assert_eq!((st.held, st.held_out_of_order, st.open_contexts), (1, 1, 1));
        assert_eq!((st.queued_total, st.released_total), (11, 10));
        assert_eq!(st.deepest_backlog_peak, 4);
        assert_eq!(
            st.admitted, 4,
            "A's indices 4 to 7 (6 held) are still admitted"
        );
    }

    #[test]
    fn in_order_passes_straight_through() {
        let mut s = seq(SequencerLimits::default());
        s.open_context(A, 3).unwrap();
        for i in 0..3 {
            let r = s.insert(A, i, u64::from(i)).unwrap();
            assert_eq!(
                r.subtasks,
                vec![Subtask {
                    ctx: A,
                    index: i,
                    item: u64::from(i)
                }]
            );
            assert_eq!(r.completed, if i == 2 { vec![A] } else { vec![] });
        }
        assert_eq!(s.stats().deepest_backlog_peak, 0);
    }

    /// [0061]: a task without subtasks goes straight through, with or without
    /// a control block in between.
    #[test]
    fn single_subtask_tasks_pass_straight_through() {
        let mut s = seq(SequencerLimits::default());
        let r = s.submit(A, 7).unwrap();
        assert_eq!(
            r.subtasks,
            vec![Subtask {
                ctx: A,
                index: 0,
                item: 7
            }]
        );
        assert_eq!(r.completed, vec![A]);
        assert!(!s.is_open(A));
        s.open_context(B, 1).unwrap();
        assert_eq!(s.insert(B, 0, 8).unwrap().completed, vec![B]);
        // Zero subtasks: complete on opening; nothing to insert.
        s.open_context(C, 0).unwrap();
        assert!(!s.is_open(C));
        assert_eq!(s.insert(C, 0, 9), Err(SequencerError::UnknownContext(C)));
        let st = s.stats();
        assert_eq!(
            (
                st.queued_total,
                st.released_total,
                st.admitted,
                st.open_contexts
            ),
            (2, 2, 0, 0)
        );
        // Submitting to an open context is a caller bug; the item comes back.
        s.open_context(A, 2).unwrap();
        let e = s.submit(A, 5).unwrap_err();
        assert_eq!((e.error, e.item), (SequencerError::AlreadyOpen(A), 5));
    }

    #[test]
    fn contexts_are_independent() {
        let mut s = seq(SequencerLimits::default());
        s.open_context(A, 4).unwrap();
        s.open_context(B, 2).unwrap();
        assert!(s.insert(A, 3, 0).unwrap().is_empty());
        assert_eq!(ids(&s.insert(B, 0, 0).unwrap()), vec![(B, 0)]);
        assert_eq!(ids(&s.insert(B, 1, 0).unwrap()), vec![(B, 1)]);
        assert_eq!(s.stats().held_out_of_order, 1);
    }

    #[test]
    fn misuse_is_refused_and_changes_nothing() {
        let mut s = seq(SequencerLimits::default());
        assert_eq!(s.insert(A, 0, 0), Err(SequencerError::UnknownContext(A)));
        s.open_context(A, 3).unwrap();
        assert_eq!(s.open_context(A, 3), Err(SequencerError::AlreadyOpen(A)));
        assert_eq!(s.open_context(A, 0), Err(SequencerError::AlreadyOpen(A)));
        assert_eq!(
            s.insert(A, 3, 0),
            Err(SequencerError::IndexOutOfRange {
                ctx: A,
                index: 3,
                total: 3
            })
        );
        s.insert(A, 0, 0).unwrap();
        s.insert(A, 2, 0).unwrap();
        // Already released, and already held.
        assert_eq!(
            s.insert(A, 0, 0),
            Err(SequencerError::Duplicate { ctx: A, index: 0 })
        );
        assert_eq!(
            s.insert(A, 2, 0),
            Err(SequencerError::Duplicate { ctx: A, index: 2 })
        );
        let st = s.stats();
        assert_eq!((st.queued_total, st.held), (2, 1));
        assert_eq!(s.insert(A, 1, 0).unwrap().completed, vec![A]);
        // Complete: its control block is gone.
        assert_eq!(s.insert(A, 1, 0), Err(SequencerError::UnknownContext(A)));
        assert_eq!(s.abort_context(A), Err(SequencerError::UnknownContext(A)));
        // Reusing the id afterwards is a new context.
        s.open_context(A, 1).unwrap();
        assert_eq!(s.insert(A, 0, 0).unwrap().completed, vec![A]);
    }

    #[test]
    fn limits_are_validated() {
        let bad = [
            SequencerLimits {
                max_subtasks: 0,
                ..Default::default()
            },
            SequencerLimits {
                max_contexts: 0,
                ..Default::default()
            },
            SequencerLimits {
                max_context_subtasks: 0,
                ..Default::default()
            },
            SequencerLimits {
                max_subtasks: 8,
                max_context_subtasks: 9,
                max_contexts: 1,
            },
        ];
        for l in bad {
            assert!(
                matches!(
                    Sequencer::<u64>::new(l),
                    Err(SequencerError::InvalidLimits { .. })
                ),
                "{l:?}"
            );
        }
        assert!(Sequencer::<u64>::new(SequencerLimits {
            max_subtasks: 8,
            max_context_subtasks: 8,
            max_contexts: 1
        })
        .is_ok());
    }

    /// At the bound, opening is refused (nothing recorded) and succeeds once
    /// releases make room; inserts into admitted contexts never are.
    #[test]
    fn backpressure_at_open_never_at_insert() {
        let limits = SequencerLimits {
            max_subtasks: 6,
            max_context_subtasks: 4,
            max_contexts: 2,
        };
        let mut s = seq(limits);
        assert_eq!(
            s.open_context(A, 5),
            Err(SequencerError::ContextTooLarge {
                ctx: A,
                subtasks: 5,
                max: 4
            })
        );
        s.open_context(A, 4).unwrap();
        let e = s.open_context(B, 3).unwrap_err();
        assert_eq!(
            e,
            SequencerError::Full {
                ctx: B,
                needed: 3,
                available: 2,
                max: 6
            }
        );
        assert!(e.is_backpressure());
        assert!(!s.is_open(B));
        s.open_context(B, 2).unwrap();
        s.open_context(C, 0).unwrap();
        let e = s.open_context(C, 1).unwrap_err();
        assert_eq!(e, SequencerError::TooManyContexts { ctx: C, max: 2 });
        assert!(e.is_backpressure());
        // Held subtasks are accepted at the bound, out of order.
        for i in [3, 2, 1] {
            assert!(s.insert(A, i, u64::from(i)).unwrap().is_empty());
        }
        assert_eq!((s.stats().admitted, s.available()), (6, 0));
        // A pass-through that must wait for order is refused with its item.
        assert!(s.acknowledged(B));
        let r = s.submit(C, 99).unwrap_err();
        assert!(r.error.is_backpressure());
        assert_eq!(r.item, 99);
        let r = s.insert(A, 0, 0).unwrap();
        assert_eq!(ids(&r), vec![(A, 0), (A, 1), (A, 2), (A, 3)]);
        assert_eq!(s.available(), 4);
        s.open_context(C, 3).unwrap();
        assert_eq!(
            s.stats().waiting_contexts,
            1,
            "C follows the acknowledged B"
        );
    }

    /// Guarantee 2: a context opened after another was acknowledged is held,
    /// even in order, until that one completes; one opened before is not.
    #[test]
    fn a_context_follows_those_acknowledged_before_it_opened() {
        let mut s = seq(SequencerLimits::default());
        s.open_context(A, 2).unwrap();
        s.open_context(B, 1).unwrap(); // in flight together with A
        assert!(s.acknowledged(A));
        assert!(!s.acknowledged(A), "acknowledging twice changes nothing");
        s.open_context(C, 2).unwrap(); // issued after A's reply
        assert_eq!(ids(&s.insert(B, 0, 0).unwrap()), vec![(B, 0)]);
        assert!(s.insert(C, 0, 0).unwrap().is_empty());
        assert!(s.insert(C, 1, 0).unwrap().is_empty());
        let st = s.stats();
        assert_eq!(
            (
                st.held,
                st.held_for_order,
                st.held_out_of_order,
                st.waiting_contexts
            ),
            (2, 2, 0, 1)
        );
        assert!(s.insert(A, 1, 0).unwrap().is_empty());
        let r = s.insert(A, 0, 0).unwrap();
        assert_eq!(ids(&r), vec![(A, 0), (A, 1), (C, 0), (C, 1)]);
        assert_eq!(r.completed, vec![A, C]);
        assert_eq!(
            s.stats(),
            SequencerStats {
                queued_total: 5,
                released_total: 5,
                deepest_backlog_peak: 2,
                ..Default::default()
            }
        );
        // Acknowledging a complete context is a no-op (sync mode).
        assert!(!s.acknowledged(A));
        assert!(s.submit(A, 0).is_ok());
    }

    /// Chains: D follows C which follows A; D also follows A directly.
    #[test]
    fn waiting_cascades_in_order() {
        let mut s = seq(SequencerLimits::default());
        s.open_context(A, 1).unwrap();
        s.acknowledged(A);
        s.open_context(C, 1).unwrap();
        s.acknowledged(C);
        let d = s.submit(0xD, 4).unwrap();
        assert!(d.is_empty(), "D waits for A and C");
        assert!(s.insert(C, 0, 3).unwrap().is_empty(), "C waits for A");
        let r = s.insert(A, 0, 1).unwrap();
        assert_eq!(ids(&r), vec![(A, 0), (C, 0), (0xD, 0)]);
        assert_eq!(r.completed, vec![A, C, 0xD]);
    }

    /// Acknowledging every context as it opens makes whole contexts leave in
    /// opening order.
    #[test]
    fn acknowledging_at_open_gives_fifo_contexts() {
        let mut s = seq(SequencerLimits::default());
        for c in [A, B, C] {
            s.open_context(c, 2).unwrap();
            s.acknowledged(c);
        }
        assert!(s.insert(C, 0, 0).unwrap().is_empty());
        assert!(s.insert(C, 1, 0).unwrap().is_empty());
        assert!(s.insert(B, 1, 0).unwrap().is_empty());
        assert_eq!(ids(&s.insert(A, 0, 0).unwrap()), vec![(A, 0)]);
        assert!(s.insert(B, 0, 0).unwrap().is_empty());
        let r = s.insert(A, 1, 0).unwrap();
        assert_eq!(ids(&r), vec![(A, 1), (B, 0), (B, 1), (C, 0), (C, 1)]);
        assert_eq!(r.completed, vec![A, B, C]);
    }

    #[test]
    fn abort_returns_held_subtasks_and_frees_followers() {
        let mut s = seq(SequencerLimits {
            max_subtasks: 8,
            max_context_subtasks: 8,
            max_contexts: 4,
        });
        s.open_context(A, 5).unwrap();
        s.acknowledged(A);
        s.open_context(B, 2).unwrap();
        s.insert(A, 0, 10).unwrap();
        s.insert(A, 2, 12).unwrap();
        s.insert(A, 4, 14).unwrap();
        s.insert(B, 0, 20).unwrap();
        assert_eq!(s.available(), 2);
        let ab = s.abort_context(A).unwrap();
        assert_eq!(
            ab.discarded,
            vec![
                Subtask {
                    ctx: A,
                    index: 2,
                    item: 12
                },
                Subtask {
                    ctx: A,
                    index: 4,
                    item: 14
                }
            ]
        );
        assert_eq!(ids(&ab.released), vec![(B, 0)]);
        assert!(ab.released.completed.is_empty());
        assert_eq!(s.available(), 7);
        assert_eq!(s.insert(A, 1, 11), Err(SequencerError::UnknownContext(A)));
        assert_eq!(s.insert(B, 1, 21).unwrap().completed, vec![B]);
        // Aborting a waiting context: its followers do not wait for it, and a
        // later context that reuses its id is not confused with it.
        s.open_context(A, 2).unwrap();
        s.acknowledged(A);
        s.open_context(B, 1).unwrap();
        s.insert(B, 0, 0).unwrap();
        assert!(s.abort_context(B).unwrap().discarded.len() == 1);
        s.open_context(B, 1).unwrap();
        assert_eq!(s.stats().waiting_contexts, 1);
        s.insert(A, 0, 0).unwrap();
        let r = s.insert(A, 1, 0).unwrap();
        assert_eq!(r.completed, vec![A]);
        assert_eq!(ids(&s.insert(B, 0, 0).unwrap()), vec![(B, 0)]);
        assert_eq!(s.stats().admitted, 0);
    }

    /// Aborted waiters do not pile up in the waiting list behind a stalled
    /// context.
    #[test]
    fn aborted_waiters_are_swept() {
        let mut s = seq(SequencerLimits::default());
        s.open_context(A, 2).unwrap();
        s.acknowledged(A);
        for c in 100..10_100 {
            s.open_context(c, 1).unwrap();
            s.abort_context(c).unwrap();
        }
        assert!(s.waiters.len() <= 65);
        s.open_context(B, 1).unwrap();
        s.insert(B, 0, 0).unwrap();
        s.insert(A, 0, 0).unwrap();
        assert_eq!(ids(&s.insert(A, 1, 0).unwrap()), vec![(A, 1), (B, 0)]);
    }

    #[test]
    fn insert_into_appends() {
        let mut s = seq(SequencerLimits::default());
        s.open_context(A, 2).unwrap();
        let mut out = Released::default();
        s.insert_into(A, 1, 1, &mut out).unwrap();
        s.insert_into(A, 0, 0, &mut out).unwrap();
        assert_eq!(ids(&out), vec![(A, 0), (A, 1)]);
        out.clear();
        assert!(out.is_empty());
    }

    #[test]
    fn naive_model_matches_the_seed_example() {
        let mut n = NaiveSequencer::new();
        n.open(A, 8);
        n.open(B, 6);
        for (c, i) in [
            (B, 0),
            (A, 1),
            (A, 3),
            (A, 6),
            (B, 3),
            (B, 4),
            (B, 5),
            (A, 2),
            (B, 2),
        ] {
            let _ = n.insert(c, i, ());
        }
        let got: Vec<_> = n
            .insert(A, 0, ())
            .iter()
            .map(|s| (s.ctx, s.index))
            .collect();
        assert_eq!(got, vec![(A, 0), (A, 1), (A, 2), (A, 3)]);
        assert_eq!(n.insert(B, 1, ()).len(), 5);
        assert_eq!(n.len(), 1);
    }

    // ---- property tests ----

    #[derive(Debug, Clone)]
    struct CtxPlan {
        total: u32,
        acked: bool,
        /// Submit (a task without subtasks) rather than open + insert.
        submit: bool,
        /// Where each event falls in the interleaving: [open, insert 0..total, ack].
        keys: Vec<u16>,
        /// Arrival order of the indices.
        order: Vec<u32>,
    }

    fn ctx_plan(max_total: u32) -> impl Strategy<Value = CtxPlan> {
        (0..=max_total, any::<bool>(), any::<bool>()).prop_flat_map(|(total, acked, submit)| {
            let order: Vec<u32> = (0..total).collect();
            (
                Just(total),
                Just(acked),
                Just(submit && total == 1),
                proptest::collection::vec(any::<u16>(), total as usize + 2),
                Just(order).prop_shuffle(),
            )
                .prop_map(|(total, acked, submit, keys, order)| CtxPlan {
                    total,
                    acked,
                    submit,
                    keys,
                    order,
                })
        })
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Ev {
        Open(usize),
        Insert(usize, u32),
        Ack(usize),
    }

    /// Interleaves the contexts' events by their keys; each context opens
    /// before its other events.
    fn schedule(plans: &[CtxPlan]) -> Vec<Ev> {
        let mut evs: Vec<(u16, u8, Ev)> = Vec::new();
        for (c, p) in plans.iter().enumerate() {
            let open_key = *p.keys.iter().min().unwrap();
            evs.push((open_key, 0, Ev::Open(c)));
            for (k, &i) in p.order.iter().enumerate() {
                evs.push((p.keys[k + 1], 1, Ev::Insert(c, i)));
            }
            if p.acked {
                evs.push((p.keys[p.total as usize + 1], 1, Ev::Ack(c)));
            }
        }
        evs.sort_by_key(|&(k, o, _)| (k, o));
        evs.into_iter().map(|(_, _, e)| e).collect()
    }

    /// Drives the sequencer as the write path would: producers refused at
    /// the bound wait (their events are deferred) and retry, in order, after
    /// every call that released something. The naive model sees the same
    /// successful calls. Checks every invariant on the way.
    struct Harness {
        s: Sequencer<u64>,
        n: NaiveSequencer<u64>,
        plans: Vec<CtxPlan>,
        limits: SequencerLimits,
        opened: Vec<bool>,
        /// Contexts refused at open, in order, with their deferred events.
        waiting: VecDeque<(usize, Vec<Ev>)>,
        /// Global release sequence.
        emitted: Vec<(usize, u32, u64)>,
        completed: Vec<usize>,
        /// Per context: position in `emitted` of its first release, or the
        /// emitted length when it opened / was acknowledged.
        opened_at: Vec<usize>,
        acked_at: Vec<Option<usize>>,
        /// Pairs (a, b): b was opened after a was acknowledged.
        follows: Vec<(usize, usize)>,
        refusals: usize,
    }

    fn payload(c: usize, i: u32) -> u64 {
        ((c as u64) << 32) | u64::from(i)
    }

    impl Harness {
        fn new(plans: Vec<CtxPlan>, limits: SequencerLimits) -> Self {
            let k = plans.len();
            Harness {
                s: Sequencer::new(limits).unwrap(),
                n: NaiveSequencer::new(),
                plans,
                limits,
                opened: vec![false; k],
                waiting: VecDeque::new(),
                emitted: Vec::new(),
                completed: Vec::new(),
                opened_at: vec![0; k],
                acked_at: vec![None; k],
                follows: Vec::new(),
                refusals: 0,
            }
        }

        fn record(
            &mut self,
            r: Released<u64>,
            naive: Vec<Subtask<u64>>,
        ) -> Result<(), TestCaseError> {
            let mut mine: Vec<_> = r
                .subtasks
                .iter()
                .map(|s| (s.ctx, s.index, s.item))
                .collect();
            let mut theirs: Vec<_> = naive.iter().map(|s| (s.ctx, s.index, s.item)).collect();
            for s in &r.subtasks {
                prop_assert_eq!(s.item, payload(s.ctx as usize, s.index));
                self.emitted.push((s.ctx as usize, s.index, s.item));
            }
            for &c in &r.completed {
                self.completed.push(c as usize);
            }
            mine.sort_unstable();
            theirs.sort_unstable();
            prop_assert_eq!(
                mine,
                theirs,
                "sequencer and the seed's walk release different subtasks"
            );
            Ok(())
        }

        fn check_bounds(&self) -> Result<(), TestCaseError> {
            let st = self.s.stats();
            prop_assert!(st.admitted <= self.limits.max_subtasks);
            prop_assert!(st.open_contexts <= self.limits.max_contexts);
            prop_assert!(st.held <= st.admitted);
            prop_assert_eq!(st.held, st.held_out_of_order + st.held_for_order);
            prop_assert_eq!(st.queued_total - st.released_total, st.held as u64);
            prop_assert_eq!(st.held, self.n.len());
            Ok(())
        }

        /// Tries to open context `c`; false if refused (back-pressure).
        fn open(&mut self, c: usize) -> Result<bool, TestCaseError> {
            let p = self.plans[c].clone();
            let before = self.s.stats();
            if p.submit {
                match self.s.submit(c as u64, payload(c, 0)) {
                    Ok(r) => {
                        self.note_open(c);
                        self.n.open(c as u64, 1);
                        let naive = self.n.insert(c as u64, 0, payload(c, 0));
                        self.record(r, naive)?;
                    }
                    Err(rej) => {
                        prop_assert!(rej.error.is_backpressure(), "{}", rej.error);
                        prop_assert_eq!(rej.item, payload(c, 0), "the refused item comes back");
                        self.refused(before, 1)?;
                        return Ok(false);
                    }
                }
            } else {
                match self.s.open_context(c as u64, p.total) {
                    Ok(()) => {
                        self.note_open(c);
                        self.n.open(c as u64, p.total);
                    }
                    Err(e) => {
                        prop_assert!(e.is_backpressure(), "{}", e);
                        self.refused(before, p.total)?;
                        return Ok(false);
                    }
                }
            }
            self.opened[c] = true;
            Ok(true)
        }

        fn note_open(&mut self, c: usize) {
            self.opened_at[c] = self.emitted.len();
            for a in 0..self.plans.len() {
                if self.acked_at[a].is_some() {
                    self.follows.push((a, c));
                }
            }
        }

        /// A refusal must be at the bound, and change nothing.
        fn refused(&mut self, before: SequencerStats, total: u32) -> Result<(), TestCaseError> {
            self.refusals += 1;
            prop_assert!(
                before.admitted + total as usize > self.limits.max_subtasks
                    || before.open_contexts >= self.limits.max_contexts,
                "refused below the bound: {:?}, {} more",
                before,
                total
            );
            prop_assert_eq!(self.s.stats(), before);
            Ok(())
        }

        fn apply(&mut self, ev: Ev) -> Result<(), TestCaseError> {
            match ev {
                Ev::Open(c) => {
                    if !self.waiting.is_empty() || !self.open(c)? {
                        // Producers wait in issue order.
                        self.waiting.push_back((c, Vec::new()));
                    }
                }
                Ev::Insert(c, _) | Ev::Ack(c) if !self.opened[c] => {
                    let w = self
                        .waiting
                        .iter_mut()
                        .find(|(w, _)| *w == c)
                        .expect("deferred context");
                    w.1.push(ev);
                }
                Ev::Insert(c, i) => {
                    if self.plans[c].submit {
                        return Ok(()); // its item went in with the open
                    }
                    let r = self.s.insert(c as u64, i, payload(c, i));
                    let r = r.map_err(|e| TestCaseError::fail(format!("insert refused: {e}")))?;
                    let naive = self.n.insert(c as u64, i, payload(c, i));
                    self.record(r, naive)?;
                    self.admit_waiting()?;
                }
                Ev::Ack(c) => {
                    self.s.acknowledged(c as u64);
                    self.n.acknowledged(c as u64);
                    if self.acked_at[c].is_none() {
                        self.acked_at[c] = Some(self.emitted.len());
                    }
                }
            }
            self.check_bounds()
        }

        /// Retries refused producers in order; each admitted one runs its
        /// deferred events.
        fn admit_waiting(&mut self) -> Result<(), TestCaseError> {
            while let Some((c, evs)) = self.waiting.pop_front() {
                if !self.open(c)? {
                    self.waiting.push_front((c, evs));
                    return Ok(());
                }
                for ev in evs {
                    self.apply(ev)?;
                }
            }
            Ok(())
        }

        fn run(&mut self, evs: Vec<Ev>) -> Result<(), TestCaseError> {
            for ev in evs {
                self.apply(ev)?;
            }
            self.admit_waiting()?;
            prop_assert!(
                self.waiting.is_empty(),
                "producers left waiting: {:?}",
                self.waiting
            );
            self.check_final()
        }

        fn check_final(&self) -> Result<(), TestCaseError> {
            // Exactly once, in order within each context.
            let mut per_ctx: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
            let mut pos: BTreeMap<(usize, u32), usize> = BTreeMap::new();
            for (p, &(c, i, _)) in self.emitted.iter().enumerate() {
                per_ctx.entry(c).or_default().push(i);
                prop_assert!(
                    pos.insert((c, i), p).is_none(),
                    "({}, {}) released twice",
                    c,
                    i
                );
            }
            for (c, p) in self.plans.iter().enumerate() {
                let got = per_ctx.remove(&c).unwrap_or_default();
                prop_assert_eq!(got, (0..p.total).collect::<Vec<_>>(), "context {}", c);
            }
            // Each non-empty context completes exactly once.
            let mut completed = self.completed.clone();
            completed.sort_unstable();
            let expect: Vec<usize> = (0..self.plans.len())
                .filter(|&c| self.plans[c].total > 0)
                .collect();
            prop_assert_eq!(completed, expect);
            // The cross-context rule.
            for &(a, b) in &self.follows {
                let ta = self.plans[a].total;
                if ta == 0 || self.plans[b].total == 0 {
                    continue;
                }
                let last_a = pos[&(a, ta - 1)];
                let first_b = pos[&(b, 0)];
                prop_assert!(
                    last_a < first_b,
                    "context {} opened after {} was acknowledged but went first",
                    b,
                    a
                );
            }
            let st = self.s.stats();
            prop_assert_eq!(
                (st.held, st.admitted, st.open_contexts, st.waiting_contexts),
                (0, 0, 0, 0)
            );
            prop_assert_eq!(st.queued_total, st.released_total);
            prop_assert_eq!(st.released_total as usize, self.emitted.len());
            prop_assert!(self.n.is_empty());
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random interleavings of many contexts, random arrival orders,
        /// random acknowledgements, roomy limits: every subtask is released
        /// exactly once, in order, never before its predecessor, and never
        /// before a context acknowledged before its own opened; the seed's
        /// walk releases the same subtasks at every step.
        #[test]
        fn released_once_in_order_like_the_seed(plans in proptest::collection::vec(ctx_plan(12), 1..24)) {
            let evs = schedule(&plans);
            let mut h = Harness::new(plans, SequencerLimits::default());
            h.run(evs)?;
            prop_assert_eq!(h.refusals, 0);
        }

        /// The same under tight limits: producers are refused only at the
        /// bound, wait, get in, and nothing is lost or duplicated.
        #[test]
        fn at_the_bound_producers_wait_and_nothing_is_lost(
            plans in proptest::collection::vec(ctx_plan(6), 1..24),
            max_subtasks in 6usize..14,
            max_contexts in 1usize..5,
        ) {
            let limits = SequencerLimits { max_subtasks, max_context_subtasks: 6, max_contexts };
            let evs = schedule(&plans);
            let mut h = Harness::new(plans, limits);
            h.run(evs)?;
        }

        /// Without acknowledgements, every insertion releases exactly what
        /// the seed's walk releases, in the same order.
        #[test]
        fn same_sequence_as_the_seed_without_acknowledgements(plans in proptest::collection::vec(ctx_plan(16), 1..8)) {
            let plans: Vec<CtxPlan> = plans.into_iter().map(|p| CtxPlan { acked: false, ..p }).collect();
            let mut s = seq(SequencerLimits::default());
            let mut n = NaiveSequencer::new();
            for ev in schedule(&plans) {
                match ev {
                    Ev::Open(c) => { s.open_context(c as u64, plans[c].total).unwrap(); n.open(c as u64, plans[c].total); }
                    Ev::Insert(c, i) => {
                        let a = s.insert(c as u64, i, payload(c, i)).unwrap();
                        let b = n.insert(c as u64, i, payload(c, i));
                        prop_assert_eq!(a.subtasks, b);
                    }
                    Ev::Ack(_) => unreachable!(),
                }
            }
        }
    }
}
