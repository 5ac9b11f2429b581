//! The mirror's parallel apply scheduler (seed 003): overlapping operations
//! apply in arrival order, all others in parallel.
//!
//! A mirror receives one ordered stream of operations and applies them to its
//! backend with many tasks. The final image must equal a one-by-one apply of
//! the stream, so operations whose byte ranges overlap must apply in arrival
//! order; operations that overlap nothing earlier may run at once. This type
//! is the I/O-free decision engine: events in ([`Scheduler::submit`] when an
//! operation arrives, [`Scheduler::complete`] when a task has applied one),
//! decisions out (the [`Dispatch`]es that may start now, each on a named
//! task). The daemon runs one worker per task and feeds the results back.
//!
//! # The seed's parts, here
//!
//! - **Range groups.** The volume is cut into `groups` contiguous slices of
//!   equal size (the last one also owns everything past the volume's end).
//!   An operation belongs to the group of its first byte, its *home*.
//! - **Tasks.** Each group has `tasks_per_group` tasks, numbered
//!   `group * tasks_per_group + i`. A task runs one operation at a time; when
//!   it finishes one it takes the next from its own *mini-queue*, and only when
//!   that is empty the oldest operation of its group's *main queue*.
//! - **Active table.** Each group keeps a table of disjoint byte ranges, each
//!   naming the latest not-yet-complete operation that writes it. As in the
//!   seed the ranges are exact, not the whole group's slice; unlike the seed
//!   they are kept per operation rather than per task (see below).
//! - **Delegation.** An operation whose earlier overlapping operations (the
//!   ones the table names for its bytes) all sit with one task, running there
//!   or waiting in its mini-queue, joins that task's mini-queue and runs after
//!   them, in order.
//! - **Counter.** Any other operation that overlaps earlier ones (several
//!   tasks, or operations that have no task yet) waits on a counter set to how
//!   many they are; each decrements it when it completes, and at zero the
//!   operation joins its group's main queue. Unlike the seed no task sleeps on
//!   a counter: a waiting operation holds no task.
//! - **Main queue.** Per group, operations that may run now and wait for an
//!   idle task, oldest first. An operation that overlaps nothing goes there,
//!   and straight to an idle task of its group if there is one.
//!
//! # Why order is kept
//!
//! For every byte, the table names the latest incomplete operation that
//! writes it. A new operation waits for each operation it names, either on a
//! counter or by standing behind it on the same task; and each of those waited
//! in the same way for the operation before it on those bytes. So any two
//! overlapping operations complete in arrival order and never run at the same
//! time. Operations that are queued, not running, are in the table as well, so
//! an operation that overlaps only queued ones waits for them just the same.
//! Operations wait only for earlier ones, so nothing can wait forever.
//!
//! # Departures from the seed, and why
//!
//! - The seed's table entry is a task's range, widened to the span of every
//!   operation delegated to it and, for a counter waiter, of every range it
//!   waited on; it shrinks only when the task runs dry. Under steady load a
//!   task that keeps receiving work keeps a growing range, and after one long
//!   TRIM it can hold its whole group, serialising every later write. Here an
//!   entry covers only bytes its operation writes, and leaves when it
//!   completes.
//! - A mini-queue holds at most `max_mini_queue` operations; past that an
//!   operation waits on a counter instead, so that when the operation it
//!   waited for completes it can run on any idle task rather than queue
//!   behind unrelated work. `max_mini_queue = 0` turns delegation off.
//! - Operations are classified as they arrive, so the main queue holds only
//!   runnable operations, and the daemon's receive loop never waits for a
//!   task to come free before it can look at the next operation.
//!
//! # Operations that span groups
//!
//! An operation is never split: it runs on one task (its home group's, or
//! the task it is delegated to, which may be in a neighbouring group), and
//! completes once, so an acknowledgement maps to one completion. Its claim is
//! recorded in the table of every group it touches, so an overlap check in any
//! group sees it. A long TRIM or WRITE_ZEROES needs no special case: a claim
//! is one table entry per group touched however long it is.
//!
//! # FLUSH
//!
//! A flush is a barrier behind: it is dispatched only once every operation
//! submitted before it (flushes included) has completed, so when it completes
//! every earlier operation is durable. It claims no bytes, so operations after
//! it are not held back by it and may start, and even complete, before it
//! does: a flush promises nothing about later writes, and a write that lands
//! early is harmless. A flush runs on any idle task; an idle task takes the
//! older of its main queue's head and the oldest runnable flush.
//!
//! # The bound
//!
//! At most `max_ops` operations are held (submitted, not yet completed).
//! [`Scheduler::submit`] past it returns [`SubmitError::Full`] and does not
//! take the operation; the caller stops reading the stream and submits the
//! same operation again after its next [`Scheduler::complete`]. Every held
//! operation can complete without any later one, so a full scheduler always
//! drains. The table, queues and counters are bounded by the held operations.
//!
//! # Costs
//!
//! With `n` operations held and `k` table entries overlapping an operation:
//! submit is `O((k + 1) log n)`, complete `O((k + w + 1) log n)` with `w` the
//! operations waiting on its counter. No call scans a queue or a whole table.
//! The `k` entries a submit overlaps are replaced by its own, so over a stream
//! they add up to at most a few per operation. Held operations live in a slab
//! (O(1) lookups); the flush barrier counts the operations of each interval
//! between flushes, so checking it is O(1).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use thiserror::Error;

/// An operation's position in the stream (its arrival order).
pub type Seq = u64;
/// A task, `group * tasks_per_group + index`.
pub type TaskId = usize;

/// Default bound on operations held (submitted, not yet completed).
pub const DEFAULT_MAX_OPS: usize = 4096;
/// Default bound on one task's mini-queue.
pub const DEFAULT_MAX_MINI_QUEUE: usize = 16;

/// What an operation does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Write,
    Trim,
    Zero,
    /// Makes every earlier operation durable; its range is ignored.
    Flush,
}

/// One operation of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Op {
    /// Arrival order; must increase from one submitted operation to the next.
    pub seq: Seq,
    pub offset: u64,
    pub len: u64,
    pub kind: OpKind,
}

impl Op {
    pub fn write(seq: Seq, offset: u64, len: u64) -> Self {
        Self {
            seq,
            offset,
            len,
            kind: OpKind::Write,
        }
    }

    pub fn flush(seq: Seq) -> Self {
        Self {
            seq,
            offset: 0,
            len: 0,
            kind: OpKind::Flush,
        }
    }

    /// True if both operations write a common byte. Flushes and empty ranges
    /// overlap nothing.
    pub fn overlaps(&self, other: &Op) -> bool {
        self.kind != OpKind::Flush
            && other.kind != OpKind::Flush
            && self.len > 0
            && other.len > 0
            && self.offset < other.offset.saturating_add(other.len)
            && other.offset < self.offset.saturating_add(self.len)
    }
}

/// A decision: `task` may start `op` now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    pub task: TaskId,
    pub op: Op,
}

/// How the scheduler is cut up and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Bytes of the volume; cut into `groups` equal slices.
    pub volume_size: u64,
    pub groups: usize,
    pub tasks_per_group: usize,
    /// Most operations held at once (see "The bound" above).
    pub max_ops: usize,
    /// Most operations one task's mini-queue holds; 0 disables delegation.
    pub max_mini_queue: usize,
}

impl SchedulerConfig {
    /// `groups * tasks_per_group` tasks over a volume, with the default bounds.
    pub fn new(volume_size: u64, groups: usize, tasks_per_group: usize) -> Self {
        Self {
            volume_size,
            groups,
            tasks_per_group,
            max_ops: DEFAULT_MAX_OPS,
            max_mini_queue: DEFAULT_MAX_MINI_QUEUE,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("the scheduler needs at least one {0}")]
    Zero(&'static str),
    #[error("{groups} groups of {tasks_per_group} tasks is too many tasks")]
    TooManyTasks {
        groups: usize,
        tasks_per_group: usize,
    },
}

/// Why [`Scheduler::submit`] did not take an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SubmitError {
    /// Back-pressure: submit it again after the next completion.
    #[error("the scheduler already holds its maximum of {max} operations")]
    Full { max: usize },
    #[error("operation {seq} arrived after operation {last}: sequence numbers must increase")]
    OutOfOrder { seq: Seq, last: Seq },
    #[error("operation {seq}: range {offset}+{len} overflows the address space")]
    Overflow { seq: Seq, offset: u64, len: u64 },
}

/// Why [`Scheduler::complete`] refused a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CompleteError {
    #[error("task {task} is not running operation {seq}")]
    NotRunning { task: TaskId, seq: Seq },
}

/// Counters and gauges for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Operations submitted and not yet completed.
    pub held: usize,
    /// Tasks running an operation.
    pub running: usize,
    pub submitted: u64,
    pub dispatched: u64,
    pub completed: u64,
    /// Operations that overlapped nothing earlier when they arrived.
    pub independent: u64,
    /// Operations put on a task's mini-queue.
    pub delegated: u64,
    /// Operations that waited on a counter.
    pub counter_waits: u64,
    /// Submits refused at the bound.
    pub rejected: u64,
    /// Flushes submitted and not yet completed.
    pub flushes_waiting: usize,
    pub groups: Vec<GroupStats>,
}

/// One group's gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Operations homed here, held and not yet dispatched: the group's
    /// queue depth (main queue, mini-queues and counter waits together).
    pub queued: usize,
    /// Of those, runnable ones waiting for an idle task.
    pub main_queue: usize,
    /// Operations waiting in this group's tasks' mini-queues.
    pub mini_queues: usize,
    /// This group's tasks that are running an operation.
    pub running: usize,
    /// Entries in the active table.
    pub claims: usize,
}

/// Where a held operation lives in the slab.
type Slot = usize;

/// One entry of a group's active table: `[start, end)` is last written by
/// the operation in `slot` (the start is the map's key).
#[derive(Debug, Clone, Copy)]
struct Claim {
    end: u64,
    slot: Slot,
}

#[derive(Debug)]
struct Group {
    start: u64,
    /// Exclusive; `u64::MAX` for the last group.
    end: u64,
    table: BTreeMap<u64, Claim>,
    /// Runnable operations homed here, waiting for a task, oldest first.
    main: BinaryHeap<Reverse<(Seq, Slot)>>,
    idle: Vec<TaskId>,
    queued: usize,
    running: usize,
}

#[derive(Debug)]
struct Task {
    group: usize,
    running: Option<(Seq, Slot)>,
    mini: VecDeque<Slot>,
}

/// A held operation.
#[derive(Debug)]
struct Held {
    op: Op,
    home: usize,
    /// The epoch it belongs to (see [`Epoch`]).
    epoch: u64,
    /// The task it runs on, or whose mini-queue it waits in.
    task: Option<TaskId>,
    /// Earlier overlapping operations still to complete (counter waits only).
    counter: usize,
    /// Operations whose counter this one decrements when it completes.
    waiters: Vec<Slot>,
    /// Table entries that still name it.
    claims: usize,
}

/// The operations between two flushes. A flush closes the current epoch; it
/// may run once every operation of its epoch, and the flush before it, have
/// completed (so every operation before it has). Only the oldest epoch's
/// flush can be runnable, which makes the check O(1) per completion.
#[derive(Debug, Default)]
struct Epoch {
    /// Operations of this epoch (not its flush) still held.
    live: usize,
    flush: FlushState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum FlushState {
    /// The epoch is the current one: no flush has closed it yet.
    #[default]
    Open,
    /// Closed by the flush in this slot, which waits for the epoch.
    Waiting(Slot),
    /// The flush may run (or runs).
    Released,
}

/// The scheduler. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    group_size: u64,
    groups: Vec<Group>,
    tasks: Vec<Task>,
    /// Held operations, by slot; freed slots are reused.
    slots: Vec<Option<Held>>,
    free: Vec<Slot>,
    live: usize,
    /// Epochs from the oldest with a flush not yet complete to the current one.
    epochs: VecDeque<Epoch>,
    /// The number of `epochs[0]`.
    first_epoch: u64,
    /// Flushes that may run, waiting for an idle task, in order.
    flushes_ready: VecDeque<(Seq, Slot)>,
    last_seq: Option<Seq>,
    stats: Stats,
    /// Scratch for table lookups, kept to avoid an allocation per call.
    hits: Vec<(u64, Claim)>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self, ConfigError> {
        for (value, what) in [
            (cfg.volume_size == 0, "byte of volume"),
            (cfg.groups == 0, "group"),
            (cfg.tasks_per_group == 0, "task per group"),
            (cfg.max_ops == 0, "operation held"),
        ] {
            if value {
                return Err(ConfigError::Zero(what));
            }
        }
        let ntasks =
            cfg.groups
                .checked_mul(cfg.tasks_per_group)
                .ok_or(ConfigError::TooManyTasks {
                    groups: cfg.groups,
                    tasks_per_group: cfg.tasks_per_group,
                })?;
        let group_size = cfg.volume_size.div_ceil(cfg.groups as u64);
        let groups = (0..cfg.groups)
            .map(|g| {
                let first = g * cfg.tasks_per_group;
                Group {
                    start: (g as u64).saturating_mul(group_size),
                    end: if g + 1 == cfg.groups {
                        u64::MAX
                    } else {
                        (g as u64 + 1).saturating_mul(group_size)
                    },
                    table: BTreeMap::new(),
                    main: BinaryHeap::new(),
                    // Reversed so that the lowest-numbered idle task is used first.
                    idle: (first..first + cfg.tasks_per_group).rev().collect(),
                    queued: 0,
                    running: 0,
                }
            })
            .collect();
        let tasks = (0..ntasks)
            .map(|t| Task {
                group: t / cfg.tasks_per_group,
                running: None,
                mini: VecDeque::new(),
            })
            .collect();
        Ok(Self {
            cfg,
            group_size,
            groups,
            tasks,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            epochs: VecDeque::from([Epoch::default()]),
            first_epoch: 0,
            flushes_ready: VecDeque::new(),
            last_seq: None,
            stats: Stats::default(),
            hits: Vec::new(),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Number of tasks; ids are `0..tasks()`.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// The group a task belongs to.
    pub fn task_group(&self, task: TaskId) -> usize {
        task / self.cfg.tasks_per_group
    }

    /// The group that owns a byte.
    pub fn group_of(&self, offset: u64) -> usize {
        usize::try_from(offset / self.group_size)
            .map_or(self.groups.len() - 1, |g| g.min(self.groups.len() - 1))
    }

    /// Operations submitted and not yet completed.
    pub fn held(&self) -> usize {
        self.live
    }

    /// True when [`Scheduler::submit`] would refuse with [`SubmitError::Full`].
    pub fn is_full(&self) -> bool {
        self.live >= self.cfg.max_ops
    }

    /// The operation a task is running, if any.
    pub fn running(&self, task: TaskId) -> Option<Seq> {
        self.tasks
            .get(task)
            .and_then(|t| t.running)
            .map(|(seq, _)| seq)
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.held = self.live;
        s.flushes_waiting = self
            .epochs
            .iter()
            .filter(|e| e.flush != FlushState::Open)
            .count();
        s.groups = self
            .groups
            .iter()
            .map(|g| GroupStats {
                queued: g.queued,
                main_queue: g.main.len(),
                mini_queues: 0,
                running: g.running,
                claims: g.table.len(),
            })
            .collect();
        for t in &self.tasks {
            s.groups[t.group].mini_queues += t.mini.len();
        }
        s.running = s.groups.iter().map(|g| g.running).sum();
        s
    }

    /// An operation arrived. Returns the operations that may start now (this
    /// one, if it overlaps nothing earlier and a task of its group is idle;
    /// a flush may start on an idle task of any group).
    pub fn submit(&mut self, op: Op) -> Result<Vec<Dispatch>, SubmitError> {
        if let Some(last) = self.last_seq {
            if op.seq <= last {
                return Err(SubmitError::OutOfOrder { seq: op.seq, last });
            }
        }
        let end = match op.kind {
            OpKind::Flush => op.offset,
            _ => op.offset.checked_add(op.len).ok_or(SubmitError::Overflow {
                seq: op.seq,
                offset: op.offset,
                len: op.len,
            })?,
        };
        if self.is_full() {
            self.stats.rejected += 1;
            return Err(SubmitError::Full {
                max: self.cfg.max_ops,
            });
        }
        self.last_seq = Some(op.seq);
        self.stats.submitted += 1;
        let mut out = Vec::new();
        let home = self.group_of(op.offset);
        let slot = self.alloc(Held {
            op,
            home,
            epoch: self.first_epoch + self.epochs.len() as u64 - 1,
            task: None,
            counter: 0,
            waiters: Vec::new(),
            claims: 0,
        });

        if op.kind == OpKind::Flush {
            let current = self.epochs.back_mut().expect("there is a current epoch");
            current.flush = FlushState::Waiting(slot);
            self.epochs.push_back(Epoch::default());
            self.release_flush(&mut out);
            return Ok(out);
        }
        self.epochs
            .back_mut()
            .expect("there is a current epoch")
            .live += 1;

        let mut deps = Vec::new();
        if op.len > 0 {
            for g in home..=self.group_of(end - 1) {
                let group = &self.groups[g];
                let (s, e) = (op.offset.max(group.start), end.min(group.end));
                self.claim(g, s, e, slot, &mut deps);
            }
            deps.sort_unstable();
            deps.dedup();
        }
        self.groups[home].queued += 1;

        if deps.is_empty() {
            self.stats.independent += 1;
            self.groups[home].main.push(Reverse((op.seq, slot)));
            self.pump(home, &mut out);
        } else if let Some(t) = self.single_task(&deps) {
            self.stats.delegated += 1;
            self.held_mut(slot).task = Some(t);
            self.tasks[t].mini.push_back(slot);
        } else {
            self.stats.counter_waits += 1;
            self.held_mut(slot).counter = deps.len();
            for d in deps {
                self.held_mut(d).waiters.push(slot);
            }
        }
        Ok(out)
    }

    /// `task` has applied operation `seq`. Returns the operations that may
    /// start now: the task's next mini-queue entry, operations whose counter
    /// reached zero, a flush whose barrier lifted, and main-queue operations
    /// for the task if it is now idle.
    pub fn complete(&mut self, task: TaskId, seq: Seq) -> Result<Vec<Dispatch>, CompleteError> {
        let slot = match self.tasks.get(task).and_then(|t| t.running) {
            Some((s, slot)) if s == seq => slot,
            _ => return Err(CompleteError::NotRunning { task, seq }),
        };
        let g = self.tasks[task].group;
        self.tasks[task].running = None;
        self.groups[g].running -= 1;
        self.stats.completed += 1;
        let mut out = Vec::new();

        if self.held_mut(slot).claims > 0 {
            self.release_claims(slot);
        }
        let held = self.slots[slot]
            .take()
            .expect("a running operation is held");
        self.free.push(slot);
        self.live -= 1;

        // The seed's order: a task first looks at its own mini-queue.
        match self.tasks[task].mini.pop_front() {
            Some(next) => self.start(task, next, &mut out),
            None => self.groups[g].idle.push(task),
        }
        for w in held.waiters {
            let waiter = self.held_mut(w);
            waiter.counter -= 1;
            if waiter.counter == 0 {
                let (home, wseq) = (waiter.home, waiter.op.seq);
                self.groups[home].main.push(Reverse((wseq, w)));
                self.pump(home, &mut out);
            }
        }
        let i = (held.epoch - self.first_epoch) as usize;
        if held.op.kind == OpKind::Flush {
            // Only the oldest epoch's flush is ever released.
            debug_assert_eq!(i, 0);
            self.epochs.pop_front();
            self.first_epoch += 1;
            self.release_flush(&mut out);
        } else {
            self.epochs[i].live -= 1;
            if i == 0 {
                self.release_flush(&mut out);
            }
        }
        self.pump(g, &mut out);
        Ok(out)
    }

    /// Makes the oldest epoch's flush runnable if every operation before it
    /// has completed.
    fn release_flush(&mut self, out: &mut Vec<Dispatch>) {
        let oldest = &mut self.epochs[0];
        if let (0, FlushState::Waiting(slot)) = (oldest.live, oldest.flush) {
            oldest.flush = FlushState::Released;
            let seq = self.held_mut(slot).op.seq;
            self.flushes_ready.push_back((seq, slot));
            for g in 0..self.groups.len() {
                if self.flushes_ready.is_empty() {
                    break;
                }
                self.pump(g, out);
            }
        }
    }

    /// Records `[s, e)` in group `g`'s table as last written by `slot`, and
    /// adds the operations it overlaps to `deps`.
    fn claim(&mut self, g: usize, s: u64, e: u64, slot: Slot, deps: &mut Vec<Slot>) {
        let Self {
            groups,
            slots,
            hits,
            ..
        } = self;
        let table = &mut groups[g].table;
        // Entries are disjoint and sorted, so those overlapping [s, e) are
        // the last ones starting before e, back to the first ending after s.
        hits.clear();
        hits.extend(
            table
                .range(..e)
                .rev()
                .take_while(|(_, c)| c.end > s)
                .map(|(&a, &c)| (a, c)),
        );
        for &(a, c) in hits.iter() {
            deps.push(c.slot);
            table.remove(&a);
            let mut pieces = 0;
            if a < s {
                table.insert(
                    a,
                    Claim {
                        end: s,
                        slot: c.slot,
                    },
                );
                pieces += 1;
            }
            if c.end > e {
                table.insert(e, c);
                pieces += 1;
            }
            let owner = slots[c.slot].as_mut().expect("a claim names a held op");
            owner.claims = owner.claims + pieces - 1;
        }
        table.insert(s, Claim { end: e, slot });
        slots[slot].as_mut().expect("the claimant is held").claims += 1;
    }

    /// Removes the table entries that still name the operation in `slot`.
    fn release_claims(&mut self, slot: Slot) {
        let Self {
            groups,
            slots,
            hits,
            ..
        } = self;
        let held = slots[slot].as_ref().expect("the operation is held");
        let end = held.op.offset + held.op.len;
        let mut left = held.claims;
        for group in &mut groups[held.home..] {
            if left == 0 || group.start >= end {
                break;
            }
            let (s, e) = (held.op.offset.max(group.start), end.min(group.end));
            hits.clear();
            hits.extend(
                group
                    .table
                    .range(s..e)
                    .filter(|(_, c)| c.slot == slot)
                    .take(left)
                    .map(|(&a, &c)| (a, c)),
            );
            for (a, _) in hits.iter() {
                group.table.remove(a);
            }
            left -= hits.len();
        }
        debug_assert_eq!(left, 0, "operation {} left claims behind", held.op.seq);
    }

    /// The task all of `deps` run on or are queued on, if it is one task and
    /// its mini-queue has room.
    fn single_task(&self, deps: &[Slot]) -> Option<TaskId> {
        let task = |d: &Slot| self.slots[*d].as_ref().and_then(|h| h.task);
        let t = task(&deps[0])?;
        let same = deps[1..].iter().all(|d| task(d) == Some(t));
        (same && self.tasks[t].mini.len() < self.cfg.max_mini_queue).then_some(t)
    }

    /// Gives idle tasks of group `g` the oldest runnable work: its main
    /// queue, or a runnable flush.
    fn pump(&mut self, g: usize, out: &mut Vec<Dispatch>) {
        while let Some(&task) = self.groups[g].idle.last() {
            let main = self.groups[g].main.peek().map(|r| r.0);
            let flush = self.flushes_ready.front().copied();
            let slot = match (main, flush) {
                (Some(m), Some(f)) if f.0 < m.0 => self.flushes_ready.pop_front().map(|f| f.1),
                (Some(_), _) => self.groups[g].main.pop().map(|r| r.0 .1),
                (None, Some(_)) => self.flushes_ready.pop_front().map(|f| f.1),
                (None, None) => break,
            };
            self.groups[g].idle.pop();
            self.start(task, slot.expect("peeked above"), out);
        }
    }

    fn start(&mut self, task: TaskId, slot: Slot, out: &mut Vec<Dispatch>) {
        let held = self.held_mut(slot);
        held.task = Some(task);
        let (op, home) = (held.op, held.home);
        if op.kind != OpKind::Flush {
            self.groups[home].queued -= 1;
        }
        let t = &mut self.tasks[task];
        debug_assert!(t.running.is_none(), "task {task} is busy");
        t.running = Some((op.seq, slot));
        self.groups[t.group].running += 1;
        self.stats.dispatched += 1;
        out.push(Dispatch { task, op });
    }

    fn alloc(&mut self, held: Held) -> Slot {
        self.live += 1;
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(held);
                slot
            }
            None => {
                self.slots.push(Some(held));
                self.slots.len() - 1
            }
        }
    }

    fn held_mut(&mut self, slot: Slot) -> &mut Held {
        self.slots[slot].as_mut().expect("the operation is held")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn sched(groups: usize, tasks: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig::new(1 << 20, groups, tasks)).unwrap()
    }

    fn d(task: TaskId, op: Op) -> Dispatch {
        Dispatch { task, op }
    }

    #[test]
    fn non_overlapping_ops_run_in_parallel() {
        let mut s = sched(1, 3);
        let (a, b, c) = (Op::write(1, 0, 8), Op::write(2, 8, 8), Op::write(3, 100, 1));
        assert_eq!(s.submit(a).unwrap(), vec![d(0, a)]);
        assert_eq!(s.submit(b).unwrap(), vec![d(1, b)]);
        assert_eq!(s.submit(c).unwrap(), vec![d(2, c)]);
        let st = s.stats();
        assert_eq!(
            (st.running, st.independent, st.delegated, st.counter_waits),
            (3, 3, 0, 0)
        );
        // Nothing else to do: completing frees the tasks.
        assert_eq!(s.complete(1, 2).unwrap(), vec![]);
        assert_eq!(s.stats().running, 2);
    }

    #[test]
    fn overlapping_one_task_is_delegated_to_its_mini_queue() {
        let mut s = sched(1, 2);
        let a = Op::write(1, 0, 8);
        let b = Op::write(2, 4, 8);
        let c = Op::write(3, 0, 2);
        assert_eq!(s.submit(a).unwrap(), vec![d(0, a)]);
        assert_eq!(s.submit(b).unwrap(), vec![]);
        // c overlaps a (running on task 0) and nothing else of b: also task 0.
        assert_eq!(s.submit(c).unwrap(), vec![]);
        let st = s.stats();
        assert_eq!((st.delegated, st.groups[0].mini_queues), (2, 2));
        assert_eq!(st.groups[0].queued, 2);
        // Task 1 is idle but the mini-queue is task 0's, in arrival order.
        assert_eq!(s.complete(0, 1).unwrap(), vec![d(0, b)]);
        assert_eq!(s.complete(0, 2).unwrap(), vec![d(0, c)]);
        assert_eq!(s.complete(0, 3).unwrap(), vec![]);
        assert_eq!(s.held(), 0);
        assert_eq!(s.stats().groups[0].claims, 0);
    }

    #[test]
    fn overlapping_several_tasks_waits_on_a_counter() {
        let mut s = sched(1, 3);
        let a = Op::write(1, 0, 8);
        let b = Op::write(2, 8, 8);
        let c = Op::write(3, 4, 8);
        s.submit(a).unwrap();
        s.submit(b).unwrap();
        assert_eq!(s.submit(c).unwrap(), vec![]);
        assert_eq!(s.stats().counter_waits, 1);
        // The counter is 2: one completion is not enough.
        assert_eq!(s.complete(1, 2).unwrap(), vec![]);
        // At zero, c runs on an idle task (the one freed last).
        assert_eq!(s.complete(0, 1).unwrap(), vec![d(0, c)]);
    }

    #[test]
    fn overlapping_a_queued_op_waits_for_it() {
        // One task: a runs, b (disjoint from a) waits in the main queue for a
        // task, c overlaps the queued b and must run after it.
        let mut s = sched(1, 1);
        let a = Op::write(1, 0, 8);
        let b = Op::write(2, 16, 8);
        let c = Op::write(3, 20, 8);
        assert_eq!(s.submit(a).unwrap(), vec![d(0, a)]);
        assert_eq!(s.submit(b).unwrap(), vec![]);
        assert_eq!(s.submit(c).unwrap(), vec![]);
        let st = s.stats();
        assert_eq!((st.independent, st.counter_waits), (2, 1));
        assert_eq!((st.groups[0].main_queue, st.groups[0].queued), (1, 2));
        assert_eq!(s.complete(0, 1).unwrap(), vec![d(0, b)]);
        assert_eq!(s.complete(0, 2).unwrap(), vec![d(0, c)]);
    }

    #[test]
    fn full_mini_queue_falls_back_to_a_counter() {
        let mut cfg = SchedulerConfig::new(1 << 20, 1, 2);
        cfg.max_mini_queue = 1;
        let mut s = Scheduler::new(cfg).unwrap();
        let a = Op::write(1, 0, 100);
        let b = Op::write(2, 0, 4);
        let c = Op::write(3, 50, 4);
        s.submit(a).unwrap();
        s.submit(b).unwrap();
        s.submit(c).unwrap();
        assert_eq!((s.stats().delegated, s.stats().counter_waits), (1, 1));
        // When a completes, b continues on task 0 and c takes idle task 1.
        assert_eq!(s.complete(0, 1).unwrap(), vec![d(0, b), d(1, c)]);
    }

    #[test]
    fn flush_waits_for_every_earlier_op_but_blocks_no_later_one() {
        let mut s = sched(2, 2);
        let a = Op::write(1, 0, 8);
        let b = Op::write(2, 1 << 19, 8);
        let f = Op::flush(3);
        let c = Op::write(4, 4, 8);
        let e = Op::write(5, 1000, 8);
        assert_eq!(s.submit(a).unwrap(), vec![d(0, a)]);
        assert_eq!(s.submit(b).unwrap(), vec![d(2, b)]);
        assert_eq!(s.submit(f).unwrap(), vec![]);
        assert_eq!(s.stats().flushes_waiting, 1);
        // Later ops run; c overlaps a so it follows a, as always.
        assert_eq!(s.submit(c).unwrap(), vec![]);
        assert_eq!(s.submit(e).unwrap(), vec![d(1, e)]);
        assert_eq!(s.complete(0, 1).unwrap(), vec![d(0, c)]);
        // The last op before the flush completes: the flush goes to the freed task.
        assert_eq!(s.complete(2, 2).unwrap(), vec![d(2, f)]);
        assert_eq!(s.complete(1, 5).unwrap(), vec![]);
        assert_eq!(s.complete(2, 3).unwrap(), vec![]);
        assert_eq!(s.complete(0, 4).unwrap(), vec![]);
        assert_eq!(s.stats().flushes_waiting, 0);
        // A flush with nothing before it runs at once.
        assert_eq!(s.submit(Op::flush(9)).unwrap(), vec![d(0, Op::flush(9))]);
    }

    #[test]
    fn spanning_op_is_claimed_in_every_group_it_touches() {
        // Two groups of 16 bytes. x spans both; y lies in group 1 and overlaps x.
        let mut s = Scheduler::new(SchedulerConfig::new(32, 2, 1)).unwrap();
        let x = Op::write(1, 12, 8);
        let y = Op::write(2, 18, 4);
        let z = Op::write(3, 24, 4);
        assert_eq!(s.submit(x).unwrap(), vec![d(0, x)]);
        assert_eq!(s.stats().groups.iter().map(|g| g.claims).sum::<usize>(), 2);
        // y is delegated to x's task, in group 0.
        assert_eq!(s.submit(y).unwrap(), vec![]);
        assert_eq!(s.submit(z).unwrap(), vec![d(1, z)]);
        assert_eq!(s.complete(0, 1).unwrap(), vec![d(0, y)]);
        s.complete(0, 2).unwrap();
        s.complete(1, 3).unwrap();
        let st = s.stats();
        assert_eq!(
            st.groups.iter().map(|g| g.claims + g.queued).sum::<usize>(),
            0
        );
        // Past the volume's end belongs to the last group.
        assert_eq!(s.group_of(u64::MAX), 1);
    }

    #[test]
    fn bound_refuses_then_accepts_after_a_completion() {
        let mut cfg = SchedulerConfig::new(1 << 20, 1, 1);
        cfg.max_ops = 2;
        let mut s = Scheduler::new(cfg).unwrap();
        s.submit(Op::write(1, 0, 8)).unwrap();
        s.submit(Op::write(2, 0, 8)).unwrap();
        let third = Op::write(3, 64, 8);
        assert_eq!(s.submit(third), Err(SubmitError::Full { max: 2 }));
        assert!(s.is_full());
        assert_eq!(s.stats().rejected, 1);
        assert_eq!(s.complete(0, 1).unwrap(), vec![d(0, Op::write(2, 0, 8))]);
        assert_eq!(s.submit(third).unwrap(), vec![]);
    }

    #[test]
    fn refuses_bad_input() {
        let mut s = sched(1, 1);
        s.submit(Op::write(5, 0, 8)).unwrap();
        assert_eq!(
            s.submit(Op::write(5, 8, 8)),
            Err(SubmitError::OutOfOrder { seq: 5, last: 5 })
        );
        assert!(matches!(
            s.submit(Op::write(6, u64::MAX, 2)),
            Err(SubmitError::Overflow { .. })
        ));
        assert_eq!(
            s.complete(0, 6),
            Err(CompleteError::NotRunning { task: 0, seq: 6 })
        );
        assert!(s.complete(7, 5).is_err());
        assert_eq!(s.complete(0, 5).unwrap(), vec![]);
        assert!(s.complete(0, 5).is_err(), "a second completion is refused");
        assert_eq!(
            Scheduler::new(SchedulerConfig::new(0, 1, 1)).err(),
            Some(ConfigError::Zero("byte of volume"))
        );
        assert!(Scheduler::new(SchedulerConfig::new(1, 0, 1)).is_err());
        assert!(Scheduler::new(SchedulerConfig::new(1, usize::MAX, 2)).is_err());
    }

    #[test]
    fn long_trim_does_not_serialise_later_writes_once_done() {
        // A trim of the whole group, then disjoint writes: they all follow the
        // trim, but once it is done, later disjoint writes run in parallel.
        let mut cfg = SchedulerConfig::new(1 << 20, 1, 4);
        cfg.max_mini_queue = 2;
        let mut s = Scheduler::new(cfg).unwrap();
        let trim = Op {
            seq: 1,
            offset: 0,
            len: 1 << 20,
            kind: OpKind::Trim,
        };
        s.submit(trim).unwrap();
        for i in 0..4 {
            assert_eq!(s.submit(Op::write(2 + i, i * 4096, 4096)).unwrap(), vec![]);
        }
        let out = s.complete(0, 1).unwrap();
        // The first two were delegated and continue on task 0, one after the
        // other; the two that waited on a counter take idle tasks.
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], d(0, Op::write(2, 0, 4096)));
        let tasks: BTreeSet<TaskId> = out.iter().map(|d| d.task).collect();
        assert_eq!(tasks.len(), 3);
        // The trim's claim is gone: a write that overlaps only bytes it
        // trimmed runs at once on the last idle task.
        let w = Op::write(10, 65536, 4096);
        assert_eq!(s.submit(w).unwrap(), vec![d(3, w)]);
        assert_eq!(s.stats().groups[0].mini_queues, 1);
    }

    /// A payload byte for a write: unique per (seq, position).
    fn payload(seq: Seq, i: u64) -> u64 {
        (seq << 16) | i
    }

    fn apply(image: &mut [u64], op: &Op) {
        let end = (op.offset + op.len).min(image.len() as u64);
        for p in op.offset.min(end)..end {
            image[p as usize] = match op.kind {
                OpKind::Write => payload(op.seq, p - op.offset),
                OpKind::Trim | OpKind::Zero => 0,
                OpKind::Flush => unreachable!(),
            };
        }
    }

    fn op_strategy() -> impl Strategy<Value = (u8, u64, u64)> {
        // A small address space so that overlaps are frequent.
        (0u8..20, 0u64..64, 0u64..16)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random streams, random completion orders: overlapping ops never run
        /// together and complete in arrival order, a flush follows every
        /// earlier op, each op is dispatched exactly once, a task runs one op
        /// at a time, the bound holds, and the image equals a serial apply.
        #[test]
        fn parallel_apply_equals_serial_apply(
            raw in proptest::collection::vec(op_strategy(), 1..120),
            volume in 8u64..80,
            groups in 1usize..5,
            tasks in 1usize..4,
            max_ops in 1usize..16,
            max_mini in 0usize..4,
            choices in proptest::collection::vec((any::<bool>(), any::<usize>()), 0..400),
        ) {
            let ops: Vec<Op> = raw.iter().enumerate().map(|(i, &(k, offset, len))| Op {
                seq: 7 + 3 * i as u64,
                offset,
                len,
                kind: match k {
                    0 => OpKind::Flush,
                    1 => OpKind::Trim,
                    2 => OpKind::Zero,
                    _ => OpKind::Write,
                },
            }).collect();
            let index: BTreeMap<Seq, usize> = ops.iter().enumerate().map(|(i, o)| (o.seq, i)).collect();
            let cfg = SchedulerConfig { volume_size: volume, groups, tasks_per_group: tasks, max_ops, max_mini_queue: max_mini };
            let mut s = Scheduler::new(cfg).unwrap();
            let mut running: Vec<(TaskId, Seq)> = Vec::new();
            let mut dispatched = vec![false; ops.len()];
            let mut completed = vec![false; ops.len()];
            let mut next = 0;
            let mut at_dispatch = vec![0u64; 96];
            let mut at_completion = vec![0u64; 96];
            let mut choices = choices.into_iter();

            let mut step = 0;
            while next < ops.len() || !running.is_empty() {
                step += 1;
                prop_assert!(step < 10_000, "no progress");
                let (want_submit, pick) = choices.next()
                    .unwrap_or((next < ops.len(), 0));
                let mut out = None;
                if want_submit && next < ops.len() {
                    match s.submit(ops[next]) {
                        Ok(o) => { next += 1; out = Some(o); }
                        Err(SubmitError::Full { max }) => {
                            prop_assert_eq!(max, max_ops);
                            prop_assert_eq!(s.held(), max_ops);
                        }
                        Err(e) => prop_assert!(false, "unexpected {}", e),
                    }
                }
                if out.is_none() {
                    if running.is_empty() {
                        // Nothing runs: the scheduler must take the next op.
                        prop_assert!(next < ops.len());
                        prop_assert!(!s.is_full(), "full with nothing running");
                        out = Some(s.submit(ops[next]).unwrap());
                        next += 1;
                    } else {
                        let (task, seq) = running.swap_remove(pick % running.len());
                        let i = index[&seq];
                        completed[i] = true;
                        if ops[i].kind != OpKind::Flush {
                            apply(&mut at_completion, &ops[i]);
                        }
                        prop_assert_eq!(s.running(task), Some(seq));
                        out = Some(s.complete(task, seq).unwrap());
                    }
                }
                for Dispatch { task, op } in out.unwrap() {
                    let i = index[&op.seq];
                    prop_assert_eq!(op, ops[i], "dispatched op differs from submitted");
                    prop_assert!(i < next, "dispatched before submitted");
                    prop_assert!(!dispatched[i], "op {} dispatched twice", op.seq);
                    dispatched[i] = true;
                    prop_assert!(task < s.tasks());
                    prop_assert!(running.iter().all(|&(t, _)| t != task), "task {} runs two ops", task);
                    for &(_, other) in &running {
                        prop_assert!(!op.overlaps(&ops[index[&other]]), "{} runs with overlapping {}", op.seq, other);
                    }
                    for (j, earlier) in ops[..i].iter().enumerate() {
                        if op.kind == OpKind::Flush || earlier.overlaps(&op) {
                            prop_assert!(completed[j], "{} dispatched before earlier {} completed", op.seq, earlier.seq);
                        }
                    }
                    if op.kind != OpKind::Flush {
                        apply(&mut at_dispatch, &op);
                    }
                    running.push((task, op.seq));
                }
                prop_assert!(s.held() <= max_ops);
                prop_assert_eq!(s.stats().running, running.len());
            }

            prop_assert!(dispatched.iter().all(|&x| x), "an op was never dispatched");
            let mut serial = vec![0u64; 96];
            for op in ops.iter().filter(|o| o.kind != OpKind::Flush) {
                apply(&mut serial, op);
            }
            prop_assert_eq!(&at_dispatch, &serial);
            prop_assert_eq!(&at_completion, &serial);

            let st = s.stats();
            let n = ops.len() as u64;
            let flushes = ops.iter().filter(|o| o.kind == OpKind::Flush).count() as u64;
            prop_assert_eq!((st.submitted, st.dispatched, st.completed), (n, n, n));
            prop_assert_eq!(st.independent + st.delegated + st.counter_waits, n - flushes);
            prop_assert_eq!((st.held, st.running, st.flushes_waiting), (0, 0, 0));
            for g in &st.groups {
                prop_assert_eq!(*g, GroupStats::default(), "group left state behind");
            }
        }
    }
}
