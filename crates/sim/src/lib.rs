//! Deterministic simulation of blockmirror's pure core, in the style of
//! FoundationDB's and TigerBeetle's simulators.
//!
//! # What is simulated
//!
//! One seeded run builds a small world and plays it out on a simulated clock
//! (`u64` ticks) with one event queue, ordered by (time, insertion), and one
//! PRNG ([`rng::Rng`]): nothing in a run depends on anything but its seed.
//!
//! - **A model primary** with a volume of [`BLOCKS`] blocks (one 4 KiB bitmap
//!   region each; the model keeps 8 bytes of data per block, a write's unique
//!   id) and 1 or 2 mirrors (chosen by the seed). Per mirror it drives one
//!   [`blockmirror_core::link::LinkMachine`] the way the node's driver
//!   (`crates/node/src/primary/`) does: connect with backoff, handshake and
//!   judge the generations ([`blockmirror_core::compare_generations`]), read
//!   the divergence report, go live, catch up what the
//!   [`blockmirror_core::bitmap::Bitmap`] marks (or fill a blank mirror
//!   iteratively, with a final copy under suspended host writes), announce
//!   "resyncing" / "in sync" (after a FLUSH), a watchdog that pings an idle
//!   link and fails it with `Lost{Timeout}`, a periodic FLUSH, the
//!   acknowledged-but-unflushed regions marked when a link fails, an activity
//!   log (small, with evictions that store the bitmap first) and a bitmap
//!   stored lazily, recovered as `stored ∪ activity log` after a crash. Host
//!   writes follow `Replicator::replicate`: prepare per link (marked when
//!   the link is away, deferred while it fills), rotate the generation before
//!   the local write when a link is away, local write, send, wait for every
//!   live sync mirror, rotate again before the host is answered if a mirror
//!   missed the write. Every phase decision goes through `LinkMachine::on`;
//!   the model performs the actions it returns.
//! - **Model mirrors** that apply writes in arrival order into a page cache,
//!   acknowledge, make the cache durable on FLUSH, store the generation and
//!   label a SyncState announces, and check the primary's generation at the
//!   handshake as the node's receiver does.
//! - **A network**: each connection is FIFO per direction (TCP's rule) with
//!   a random delay; a *reset* ends the connection for both ends and drops
//!   what is in flight; a *partition* makes a connection attempt time out and
//!   an open connection stall silently (until a watchdog or handshake timeout
//!   fires, or the partition heals and the stalled messages go on).
//! - **Faults**: connection resets, partitions, kill and restart of the
//!   primary (in-memory state lost; data, generations, stored bitmaps and
//!   activity logs survive) or of a mirror (each unflushed block survives or
//!   not, at random), a mirror's I/O error (a Nack), and local disk errors on
//!   the primary (the write fails, may or may not have landed, the region is
//!   marked on every link).
//!
//! After every step these invariants are checked, each by name:
//! `no_illegal_event`, `in_sync_means_bitmap_clear`,
//! `every_difference_is_marked` (a block where a mirror differs from the
//! primary is marked, unflushed, or in flight on its link, unless the
//! mirror is blank), `acked_write_held_by_in_sync_mirror`,
//! `driver_holds_connection_iff_machine_connected`,
//! `attempt_iff_connecting`, `nothing_in_flight_unless_live`,
//! `no_fence_without_promotion`, `mirror_lineage_is_ours`,
//! `missed_write_starts_new_generation` (when a write a mirror missed is
//! answered), `no_demote_without_promotion`, `resync_basis_is_bitmap`;
//! then everything is healed, the run goes on until it is quiet, and every
//! mirror must hold the primary's data byte for byte, at its generation,
//! with every link in sync.
//!
//! # What is not simulated
//!
//! The tokio driver itself (its tasks, locks, channels and the real
//! protocol codec), consistency groups (`CutGroup` is a no-op), async mode
//! and its lag bound (`OverLag`/`LagRecovered`/`Inconsistent`), promotion,
//! demotion and failback (so `PeerAhead`/`SplitBrain` judgments never
//! legitimately occur and are reported as failures), checksum resync and the
//! mirror's divergence report (always empty without promotion), compression,
//! the pipeline (writes are one block), host FLUSH and FUA, partial writes
//! within a block, and the primary's own page cache (its local writes are
//! durable at once).
//!
//! # Where the model departs from the node (findings)
//!
//! The simulation found four places where `crates/node` failed an
//! invariant. The model drives the corrected rule for each; the first two
//! are fixed in the node too, and [`Rules::BEFORE_FIX`] keeps the old rules
//! for the tests that show each failure:
//!
//! - generation rotation (`GenState`): one flag per volume, set on an
//!   acknowledged "in sync", rotated on every write a mirror missed while
//!   another was re-announced (the away mirror fell off `HISTORY_LEN` and
//!   returned `Unrelated`), and missed a rotation when the mirror stored an
//!   "in sync" whose acknowledgement was lost ([`GenRule`]). Fixed: one
//!   flag per link, set when "in sync" is sent (`MirrorLink::holds_current`);
//! - the stored bitmap forgot regions acknowledged but not flushed by the
//!   mirror (`Rules::store_unflushed`). Fixed: `Shared::bitmap_to_store`;
//! - open in the node: a catch-up whose "in sync" raced a rotation leaves
//!   the mirror at the older generation (re-announcements reach only links
//!   already in sync): the model announces again;
//! - open in the node: a failed local write marks links in sync without
//!   copying the region until the next reconnection: the model feeds
//!   `MarkedRegions`.
//!
//! # Replaying a seed
//!
//! A failure prints its seed, the check that failed and the last events.
//! `SIM_SEED=<seed> cargo test -p blockmirror-sim` replays one seed with the
//! trace; `SIM_SEEDS=<n>` runs more seeds;
//! `cargo run -p blockmirror-sim --release -- --seeds 100000 [--from S]`
//! runs long campaigns and `-- --seed S` replays one with its trace.

// Links, mirrors and their per-block arrays are addressed by index in step.
#![allow(clippy::needless_range_loop)]

pub mod rng;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use blockmirror_core::bitmap::Bitmap;
use blockmirror_core::generation::{compare, resync_basis, Generations, Relation, ResyncBasis};
use blockmirror_core::link::{Action, Event, FailCause, Judgment, LinkMachine, Outcome, Phase};

use rng::Rng;

/// Blocks (bitmap regions) in the simulated volume.
pub const BLOCKS: usize = 64;
const REGION: u64 = 4096;
const VOLUME: u64 = BLOCKS as u64 * REGION;

// Timing, in ticks.
const NET_DELAY: (u64, u64) = (1, 8);
const TICK: u64 = 25;
/// `mirror_timeout`: a request unanswered this long fails the link.
const TIMEOUT: u64 = 200;
const CONNECT_TIMEOUT: u64 = 120;
const DIVERGENCE_TIMEOUT: u64 = 150;
const BACKOFF: (u64, u64) = (10, 80);
/// Faults and host writes happen until then; then everything heals.
const FAULT_PHASE: u64 = 4000;
/// After the heal, the run must be quiet within this long.
const QUIET_LIMIT: u64 = 40_000;
/// Activity-log extents (one block each) per link.
const AL_CAP: usize = 6;
/// Host writes in progress at once (below `AL_CAP`: an extent can be evicted).
const MAX_HOST_WRITES: usize = 4;
/// Catch-up copies in flight at once.
const WINDOW: usize = 4;
/// An iterative fill goes to its final copy when at most this many regions
/// are left after a pass.
const THRESHOLD: u64 = 2;
const MAX_PASSES: u32 = 8;

/// When the primary starts a new generation before answering a write that
/// a mirror missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenRule {
    /// `GenState` in `crates/node` before the fix: one flag for
    /// the volume, set when any mirror acknowledges an "in sync"
    /// announcement. With one mirror in sync and another away, every
    /// re-announcement to the first sets it again, so every write the away
    /// mirror misses rotates: after `HISTORY_LEN` rotations the away
    /// mirror's generation has left the history and it is judged
    /// `Unrelated` when it returns (seed 1).
    NodeGlobal,
    /// One flag per mirror, set when an "in sync" is *sent* to it (it may
    /// store it even if the acknowledgement is lost); a write rotates only
    /// if a mirror that missed it may hold the current generation.
    PerLink,
}

/// The driver's rules where the simulation found the node wanting (since fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub gen: GenRule,
    /// The stored bitmap includes what mirrors acknowledged but may not
    /// have flushed (the node stores the bare bitmap: a catch-up copy, or a
    /// host write whose activity-log extent was evicted, is forgotten by a
    /// primary crash, and lost if the mirror then crashes before flushing).
    pub store_unflushed: bool,
}

impl Rules {
    /// What `crates/node` did before the simulation's findings were fixed.
    pub const BEFORE_FIX: Rules = Rules {
        gen: GenRule::NodeGlobal,
        store_unflushed: false,
    };
    /// The rules the simulation passes with.
    pub const FIXED: Rules = Rules {
        gen: GenRule::PerLink,
        store_unflushed: true,
    };
}

/// How a run ended well.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub mirrors: usize,
    pub iterative: bool,
    pub steps: u64,
    pub end_time: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub faults: u64,
    pub rotations: u64,
    pub link_failures: u64,
    /// Mirrors judged `Unrelated` because their generation fell off the
    /// primary's `HISTORY_LEN` history (an operator discarded them).
    pub history_overflows: u64,
}

/// A failed check: its name, what it saw, and (when traced) the last events.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub check: &'static str,
    pub message: String,
    pub time: u64,
    pub step: u64,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed check `{}` at t={} (step {}): {}",
            self.seed, self.check, self.time, self.step, self.message
        )?;
        if !self.trace.is_empty() {
            writeln!(f, "last {} events:", self.trace.len())?;
            for l in &self.trace {
                writeln!(f, "  {l}")?;
            }
        }
        writeln!(
            f,
            "replay: SIM_SEED={} cargo test -p blockmirror-sim",
            self.seed
        )
    }
}

/// Runs one seed; on failure, runs it again with the trace on and checks
/// that it fails the same way (the run is deterministic).
pub fn check_seed(seed: u64) -> Result<Summary, Box<Failure>> {
    match run(seed, false) {
        Ok(s) => Ok(s),
        Err(first) => match run(seed, true) {
            Ok(_) => Err(Box::new(Failure {
                check: "deterministic_replay",
                message: format!(
                    "the traced replay passed, the first run failed `{}`: {}",
                    first.check, first.message
                ),
                ..*first
            })),
            Err(f) => {
                if f.check != first.check || f.step != first.step {
                    return Err(Box::new(Failure {
                        check: "deterministic_replay",
                        message: format!(
                            "replay failed differently: `{}` at step {} vs `{}` at step {}",
                            f.check, f.step, first.check, first.step
                        ),
                        ..*f
                    }));
                }
                Err(f)
            }
        },
    }
}

/// Runs one seed, with a trace of the last events if `trace`.
pub fn run(seed: u64, trace: bool) -> Result<Summary, Box<Failure>> {
    run_with(seed, trace, Rules::FIXED)
}

/// [`run`] with a chosen generation rule.
pub fn run_with(seed: u64, trace: bool, rules: Rules) -> Result<Summary, Box<Failure>> {
    let mut w = World::new(seed, trace);
    w.rules = rules;
    w.play();
    match w.failure.take() {
        Some(f) => Err(Box::new(f)),
        None => Ok(w.summary()),
    }
}

// ---------------------------------------------------------------------------
// The world: scheduler, network, nodes.

#[derive(Debug, Clone)]
enum Ev {
    HostWrite,
    /// Deliver the next message of a connection's direction, if it is due.
    Pump {
        conn: usize,
        to_mirror: bool,
    },
    /// The primary learns that a connection was reset.
    ConnEnd {
        conn: usize,
    },
    Retry {
        link: usize,
        inc: u64,
    },
    HandshakeTimeout {
        link: usize,
        conn: usize,
        stage: u8,
    },
    Tick,
    Fault,
    RestartPrimary,
    RestartMirror(usize),
    Heal(usize),
    EndFaults,
}

#[derive(Debug, Clone)]
enum Msg {
    Hello {
        gen: Generations,
    },
    HelloOk {
        gen: Generations,
    },
    Divergence,
    Refused,
    Write {
        id: u64,
        block: usize,
        value: u64,
    },
    Flush {
        id: u64,
    },
    Ping {
        id: u64,
    },
    State {
        id: u64,
        in_sync: bool,
        gen: Generations,
    },
    Ack {
        id: u64,
    },
    Nack {
        id: u64,
    },
}

struct Conn {
    mirror: usize,
    /// The primary's incarnation that opened it.
    inc: u64,
    to_m: VecDeque<(u64, Msg)>,
    to_p: VecDeque<(u64, Msg)>,
    last: [u64; 2],
    open_m: bool,
    open_p: bool,
}

struct Mirror {
    alive: bool,
    /// What the mirror holds now (its page cache over its disk).
    cache: [u64; BLOCKS],
    /// What survives a crash.
    disk: [u64; BLOCKS],
    gen: Generations,
    /// The durable label: true after an "in sync" SyncState, false after
    /// "resyncing".
    label_in_sync: bool,
    /// The connection it serves (a new one replaces the old).
    current: Option<usize>,
    nack_next: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Host(u64),
    Copy {
        cu: u64,
    },
    Flush,
    Ping,
    /// The catch-up's FLUSH before "in sync"; `start`: the catch-up found
    /// nothing to copy.
    CuFlush {
        cu: u64,
        start: bool,
    },
    CuState {
        cu: u64,
        in_sync: bool,
        start: bool,
    },
    /// A re-announcement after a rotation.
    ReFlush,
    ReState,
}

impl Kind {
    fn is_flush(self) -> bool {
        matches!(self, Kind::Flush | Kind::CuFlush { .. } | Kind::ReFlush)
    }
}

struct Pending {
    kind: Kind,
    block: Option<usize>,
    sent_at: u64,
    epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Announcing,
    Copying,
}

struct CatchUp {
    id: u64,
    epoch: u64,
    stage: Stage,
    cursor: usize,
    window: usize,
    pass: u32,
    final_copy: bool,
    /// The generation its last "in sync" carried.
    sent_gen: u64,
}

struct Link {
    m: LinkMachine,
    bitmap: Bitmap,
    unflushed: Bitmap,
    flushing: VecDeque<(u64, Bitmap)>,
    stored: Bitmap,
    stored_changes: u64,
    /// Activity log: (block, writes using it), least recently used first.
    al: Vec<(usize, u32)>,
    inflight: BTreeMap<u64, Pending>,
    /// The connection being attempted (Connecting, Handshaking).
    attempt: Option<usize>,
    /// The adopted connection (Joining, live).
    conn: Option<usize>,
    cu: Option<CatchUp>,
    retry: bool,
    /// [`GenRule::PerLink`]: this mirror may hold the current generation
    /// as in sync (an "in sync" was sent to it since the last rotation).
    announced: bool,
}

impl Link {
    fn new(bitmap: Bitmap) -> Link {
        Link {
            m: LinkMachine::new(true),
            unflushed: empty(),
            flushing: VecDeque::new(),
            stored: bitmap.clone(),
            stored_changes: bitmap.changes(),
            bitmap,
            al: Vec::new(),
            inflight: BTreeMap::new(),
            attempt: None,
            conn: None,
            cu: None,
            retry: false,
            announced: true,
        }
    }

    /// Stores the bitmap: with `unflushed`, what the mirror acknowledged
    /// but may not have flushed is stored as marked too.
    fn store(&mut self, unflushed: bool) {
        if !unflushed {
            if self.bitmap.changes() != self.stored_changes {
                self.stored = self.bitmap.clone();
                self.stored_changes = self.bitmap.changes();
            }
            return;
        }
        let mut b = self.bitmap.clone();
        for u in std::iter::once(&self.unflushed).chain(self.flushing.iter().map(|(_, f)| f)) {
            b.union_with(u).expect("same shape");
        }
        self.stored = b;
    }
}

struct HostWrite {
    block: usize,
    value: u64,
    waiting: usize,
    missed: Vec<bool>,
}

struct Primary {
    alive: bool,
    inc: u64,
    data: [u64; BLOCKS],
    gen: Generations,
    announced: bool,
    links: Vec<Link>,
    writes: BTreeMap<u64, HostWrite>,
    queue: VecDeque<(usize, u64)>,
    /// An iterative fill's final copy holds host writes (its link).
    suspended: Option<usize>,
    copy_locks: [u32; BLOCKS],
}

struct World {
    seed: u64,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    conns: Vec<Conn>,
    partitioned: Vec<bool>,
    p: Primary,
    mirrors: Vec<Mirror>,
    iterative: bool,
    rules: Rules,
    faults_on: bool,
    healed: bool,
    next_value: u64,
    /// Every generation id the primary has had, oldest first.
    lineage: Vec<u64>,
    /// Link fenced because its mirror's generation fell off the history.
    overflowed: Vec<bool>,
    next_id: u64,
    next_cu: u64,
    ticks: u64,
    stats: Summary,
    tracing: bool,
    trace: VecDeque<String>,
    failure: Option<Failure>,
}

macro_rules! tr {
    ($w:expr, $($arg:tt)*) => {
        if $w.tracing {
            let line = format!("t={:>5} {}", $w.now, format_args!($($arg)*));
            $w.push_trace(line);
        }
    };
}

fn empty() -> Bitmap {
    Bitmap::new(VOLUME, REGION).expect("valid geometry")
}

fn off(b: usize) -> u64 {
    b as u64 * REGION
}

/// The marked blocks of `b` as a mask (bit `i`: block `i`).
fn mask(b: &Bitmap) -> u64 {
    let mut m = 0u64;
    for (o, l) in b.runs() {
        let (s, e) = ((o / REGION) as usize, ((o + l) / REGION) as usize);
        for i in s..e {
            m |= 1 << i;
        }
    }
    m
}

impl World {
    fn new(seed: u64, tracing: bool) -> World {
        let mut rng = Rng::new(seed);
        let nm = 1 + rng.index(2);
        let iterative = rng.chance(50);
        let gen = Generations::fresh(rng.next_u64());
        let mut mirrors = Vec::new();
        let mut links = Vec::new();
        for _ in 0..nm {
            // A blank mirror (a full copy) or one in sync from the start.
            let blank = rng.chance(50);
            mirrors.push(Mirror {
                alive: true,
                cache: [0; BLOCKS],
                disk: [0; BLOCKS],
                gen: if blank { Generations::blank() } else { gen },
                label_in_sync: !blank,
                current: None,
                nack_next: false,
            });
            links.push(Link::new(empty()));
        }
        let mut w = World {
            seed,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            conns: Vec::new(),
            partitioned: vec![false; nm],
            p: Primary {
                alive: true,
                inc: 1,
                data: [0; BLOCKS],
                gen,
                announced: true,
                links,
                writes: BTreeMap::new(),
                queue: VecDeque::new(),
                suspended: None,
                copy_locks: [0; BLOCKS],
            },
            mirrors,
            iterative,
            rules: Rules::FIXED,
            faults_on: true,
            healed: false,
            next_value: 1,
            lineage: vec![gen.current],
            overflowed: vec![false; nm],
            next_id: 1,
            next_cu: 1,
            ticks: 0,
            stats: Summary {
                mirrors: nm,
                iterative,
                ..Summary::default()
            },
            tracing,
            trace: VecDeque::new(),
            failure: None,
        };
        tr!(
            w,
            "seed {seed}: {nm} mirror(s), iterative {iterative}, blank {:?}, gen {}",
            w.mirrors
                .iter()
                .map(|m| m.gen.is_blank())
                .collect::<Vec<_>>(),
            gen.to_display()
        );
        w.at(1, Ev::HostWrite);
        w.at(TICK, Ev::Tick);
        let f = w.rng.range(20, 200);
        w.at(f, Ev::Fault);
        w.at(FAULT_PHASE, Ev::EndFaults);
        w
    }

    fn push_trace(&mut self, line: String) {
        if self.trace.len() >= 300 {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn summary(&self) -> Summary {
        let mut s = self.stats.clone();
        s.end_time = self.now;
        s
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn after(&mut self, d: u64, ev: Ev) {
        self.at(self.now + d, ev);
    }

    fn fail(&mut self, check: &'static str, message: String) {
        if self.failure.is_some() {
            return;
        }
        tr!(self, "FAILED {check}: {message}");
        self.failure = Some(Failure {
            seed: self.seed,
            check,
            message,
            time: self.now,
            step: self.stats.steps,
            trace: self.trace.iter().cloned().collect(),
        });
    }

    fn play(&mut self) {
        while self.failure.is_none() {
            let Some(((t, _), ev)) = self.queue.pop_first() else {
                self.fail("run_until_quiet", "the event queue ran dry".into());
                return;
            };
            self.now = t;
            self.stats.steps += 1;
            self.step(ev);
            if self.failure.is_some() {
                return;
            }
            self.after_step();
            self.check();
            if self.healed && self.quiet() {
                tr!(self, "quiet");
                self.final_checks();
                return;
            }
            if self.healed && self.now > FAULT_PHASE + QUIET_LIMIT {
                let why = self.not_quiet_why();
                self.fail(
                    "run_until_quiet",
                    format!("not quiet {QUIET_LIMIT} ticks after the heal: {why}"),
                );
            }
        }
    }

    // -----------------------------------------------------------------------
    // Events.

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::HostWrite => {
                if self.faults_on {
                    if self.p.alive {
                        let b = self.rng.index(BLOCKS);
                        let v = self.next_value;
                        self.next_value += 1;
                        tr!(self, "host write #{v} to block {b} queued");
                        self.p.queue.push_back((b, v));
                    }
                    let d = self.rng.range(1, 30);
                    self.after(d, Ev::HostWrite);
                }
            }
            Ev::Pump { conn, to_mirror } => self.pump(conn, to_mirror),
            Ev::ConnEnd { conn } => {
                if !self.p.alive || self.conns[conn].inc != self.p.inc {
                    return;
                }
                let l = self.conns[conn].mirror;
                if self.p.links[l].conn == Some(conn) {
                    tr!(self, "link {l}: connection {conn} reset");
                    let epoch = self.p.links[l].m.epoch();
                    self.feed(
                        l,
                        Event::Lost {
                            epoch: Some(epoch),
                            cause: FailCause::Peer,
                        },
                    );
                } else if self.p.links[l].attempt == Some(conn) {
                    tr!(self, "link {l}: attempt {conn} refused or reset");
                    self.fail_attempt(l);
                }
            }
            Ev::Retry { link, inc } => {
                if !self.p.alive || inc != self.p.inc {
                    return;
                }
                self.p.links[link].retry = false;
                if matches!(self.p.links[link].m.phase(), Phase::Idle { .. }) {
                    self.connect(link);
                }
            }
            Ev::HandshakeTimeout { link, conn, stage } => {
                if !self.p.alive || self.conns[conn].inc != self.p.inc {
                    return;
                }
                let l = &self.p.links[link];
                let due = l.attempt == Some(conn)
                    && matches!(
                        (stage, l.m.phase()),
                        (0, Phase::Connecting { .. }) | (1, Phase::Handshaking)
                    );
                if due {
                    tr!(self, "link {link}: handshake stage {stage} timed out");
                    self.fail_attempt(link);
                }
            }
            Ev::Tick => self.tick(),
            Ev::Fault => {
                if self.faults_on {
                    self.fault();
                    let d = self.rng.range(30, 300);
                    self.after(d, Ev::Fault);
                }
            }
            Ev::RestartPrimary => self.restart_primary(),
            Ev::RestartMirror(i) => {
                if !self.mirrors[i].alive {
                    tr!(self, "mirror {i} restarts");
                    self.mirrors[i].alive = true;
                }
            }
            Ev::Heal(i) => self.heal(i),
            Ev::EndFaults => {
                tr!(self, "heal everything; no more faults or host writes");
                self.faults_on = false;
                self.healed = true;
                for i in 0..self.mirrors.len() {
                    self.heal(i);
                    self.mirrors[i].nack_next = false;
                    if !self.mirrors[i].alive {
                        self.after(1, Ev::RestartMirror(i));
                    }
                }
                if !self.p.alive {
                    self.after(1, Ev::RestartPrimary);
                }
            }
        }
    }

    fn after_step(&mut self) {
        if !self.p.alive {
            return;
        }
        for l in 0..self.p.links.len() {
            let link = &self.p.links[l];
            if matches!(link.m.phase(), Phase::Idle { .. }) && !link.retry {
                self.p.links[l].retry = true;
                let d = self.rng.range(BACKOFF.0, BACKOFF.1);
                let inc = self.p.inc;
                self.after(d, Ev::Retry { link: l, inc });
            }
        }
        self.start_writes();
    }

    // -----------------------------------------------------------------------
    // The network.

    fn open_conn(&mut self, mirror: usize) -> usize {
        self.conns.push(Conn {
            mirror,
            inc: self.p.inc,
            to_m: VecDeque::new(),
            to_p: VecDeque::new(),
            last: [0; 2],
            open_m: true,
            open_p: true,
        });
        self.conns.len() - 1
    }

    fn send(&mut self, conn: usize, to_mirror: bool, msg: Msg) {
        let d = self.rng.range(NET_DELAY.0, NET_DELAY.1);
        let c = &mut self.conns[conn];
        let open = if to_mirror { c.open_m } else { c.open_p };
        if !open {
            return;
        }
        let dir = usize::from(to_mirror);
        let t = (self.now + d).max(c.last[dir]);
        c.last[dir] = t;
        if to_mirror {
            c.to_m.push_back((t, msg));
        } else {
            c.to_p.push_back((t, msg));
        }
        self.at(t, Ev::Pump { conn, to_mirror });
    }

    fn pump(&mut self, conn: usize, to_mirror: bool) {
        let c = &mut self.conns[conn];
        if self.partitioned[c.mirror] {
            return;
        }
        let q = if to_mirror { &mut c.to_m } else { &mut c.to_p };
        let Some(&(t, _)) = q.front() else { return };
        if t > self.now {
            return;
        }
        let (_, msg) = q.pop_front().expect("checked");
        if let Some(&(t2, _)) = q.front() {
            let t2 = t2.max(self.now);
            self.at(t2, Ev::Pump { conn, to_mirror });
        }
        if to_mirror {
            self.mirror_receive(conn, msg);
        } else {
            self.primary_receive(conn, msg);
        }
    }

    /// Both ends lose the connection; what was in flight vanishes.
    fn reset(&mut self, conn: usize) {
        let c = &mut self.conns[conn];
        let was_open = c.open_m || c.open_p;
        c.open_m = false;
        c.open_p = false;
        c.to_m.clear();
        c.to_p.clear();
        let (mirror, inc) = (c.mirror, c.inc);
        if was_open && self.p.alive && inc == self.p.inc && !self.partitioned[mirror] {
            let d = self.rng.range(1, 5);
            self.after(d, Ev::ConnEnd { conn });
        }
    }

    /// The primary drops a connection: its end is gone at once; toward the
    /// mirror, what was sent is delivered (FIN) or dropped (RST).
    fn close_by_primary(&mut self, conn: usize) {
        let rst = self.rng.chance(50);
        let c = &mut self.conns[conn];
        c.open_p = false;
        c.to_p.clear();
        if rst {
            c.open_m = false;
            c.to_m.clear();
        }
    }

    fn heal(&mut self, i: usize) {
        if !self.partitioned[i] {
            return;
        }
        tr!(self, "partition of mirror {i} heals");
        self.partitioned[i] = false;
        for c in 0..self.conns.len() {
            if self.conns[c].mirror == i {
                self.after(
                    1,
                    Ev::Pump {
                        conn: c,
                        to_mirror: true,
                    },
                );
                self.after(
                    1,
                    Ev::Pump {
                        conn: c,
                        to_mirror: false,
                    },
                );
            }
        }
    }

    // -----------------------------------------------------------------------
    // Faults.

    fn fault(&mut self) {
        self.stats.faults += 1;
        let nm = self.mirrors.len();
        match self.rng.index(6) {
            0 | 1 => {
                let open: Vec<usize> = (0..self.conns.len())
                    .filter(|&c| self.conns[c].open_m && self.conns[c].open_p)
                    .collect();
                if !open.is_empty() {
                    let c = open[self.rng.index(open.len())];
                    tr!(self, "fault: connection {c} reset");
                    self.reset(c);
                }
            }
            2 => {
                let i = self.rng.index(nm);
                if !self.partitioned[i] {
                    let d = self.rng.range(50, 600);
                    tr!(self, "fault: mirror {i} partitioned for {d}");
                    self.partitioned[i] = true;
                    self.after(d, Ev::Heal(i));
                }
            }
            3 => {
                let i = self.rng.index(nm);
                if self.mirrors[i].alive {
                    self.kill_mirror(i);
                    let d = self.rng.range(50, 800);
                    self.after(d, Ev::RestartMirror(i));
                }
            }
            4 => {
                if self.p.alive {
                    self.kill_primary();
                    let d = self.rng.range(50, 500);
                    self.after(d, Ev::RestartPrimary);
                }
            }
            _ => {
                let i = self.rng.index(nm);
                tr!(self, "fault: mirror {i} fails its next write (Nack)");
                self.mirrors[i].nack_next = true;
            }
        }
    }

    fn kill_mirror(&mut self, i: usize) {
        let mut lost = Vec::new();
        for b in 0..BLOCKS {
            let m = &self.mirrors[i];
            if m.cache[b] != m.disk[b] {
                if self.rng.chance(50) {
                    self.mirrors[i].disk[b] = self.mirrors[i].cache[b];
                } else {
                    lost.push(b);
                }
            }
        }
        let m = &mut self.mirrors[i];
        m.cache = m.disk;
        m.alive = false;
        m.current = None;
        tr!(
            self,
            "fault: mirror {i} killed; unflushed blocks lost: {lost:?}"
        );
        for c in 0..self.conns.len() {
            if self.conns[c].mirror == i {
                self.reset(c);
            }
        }
    }

    fn kill_primary(&mut self) {
        tr!(
            self,
            "fault: primary killed ({} writes in progress, {} queued: never answered)",
            self.p.writes.len(),
            self.p.queue.len()
        );
        self.stats.writes_failed += (self.p.writes.len() + self.p.queue.len()) as u64;
        self.p.alive = false;
        self.p.writes.clear();
        self.p.queue.clear();
        for c in 0..self.conns.len() {
            if self.conns[c].inc == self.p.inc {
                self.reset(c);
            }
        }
    }

    fn restart_primary(&mut self) {
        if self.p.alive {
            return;
        }
        self.p.alive = true;
        self.p.inc += 1;
        self.p.announced = true;
        self.p.suspended = None;
        self.p.copy_locks = [0; BLOCKS];
        let old = std::mem::take(&mut self.p.links);
        for o in old {
            // Crash recovery: the stored bitmap plus every active extent.
            let mut bm = o.stored.clone();
            for &(b, _) in &o.al {
                bm.mark(off(b), REGION);
            }
            self.p.links.push(Link::new(bm));
        }
        tr!(
            self,
            "primary restarts (gen {}), recovered bitmaps {:?}",
            self.p.gen.to_display(),
            self.p
                .links
                .iter()
                .map(|l| format!("{:#x}", mask(&l.bitmap)))
                .collect::<Vec<_>>()
        );
    }

    // -----------------------------------------------------------------------
    // The mirror.

    fn mirror_receive(&mut self, conn: usize, msg: Msg) {
        let i = self.conns[conn].mirror;
        if !self.mirrors[i].alive {
            return;
        }
        if let Msg::Hello { gen } = msg {
            if self.p.alive && self.overflowed_lineage(&self.mirrors[i].gen.clone()) {
                // The mirror would refuse an unrelated primary; it is ours
                // from before the history: an operator discards it.
                self.stats.history_overflows += 1;
                tr!(
                    self,
                    "mirror {i}: generation fell off the primary's history: operator discards it"
                );
                self.mirrors[i].gen.discard();
            }
            let rel = compare(&self.mirrors[i].gen, &gen);
            if matches!(
                rel,
                Relation::Same | Relation::PeerAhead | Relation::LocalBlank
            ) {
                self.mirrors[i].current = Some(conn);
                let mine = self.mirrors[i].gen;
                self.send(conn, false, Msg::HelloOk { gen: mine });
                self.send(conn, false, Msg::Divergence);
            } else {
                tr!(
                    self,
                    "mirror {i} refuses connection {conn}: {}",
                    rel.as_str()
                );
                self.send(conn, false, Msg::Refused);
                self.conns[conn].open_m = false;
            }
            return;
        }
        if self.mirrors[i].current != Some(conn) {
            // Replaced by a newer link: what it had not applied is dropped.
            return;
        }
        let m = &mut self.mirrors[i];
        let reply = match msg {
            Msg::Write { id, block, value } => {
                if std::mem::take(&mut m.nack_next) {
                    Msg::Nack { id }
                } else {
                    m.cache[block] = value;
                    Msg::Ack { id }
                }
            }
            Msg::Flush { id } => {
                m.disk = m.cache;
                Msg::Ack { id }
            }
            Msg::Ping { id } => Msg::Ack { id },
            Msg::State { id, in_sync, gen } => {
                if in_sync {
                    m.gen = gen;
                    m.label_in_sync = true;
                } else {
                    m.label_in_sync = false;
                }
                Msg::Ack { id }
            }
            _ => return,
        };
        self.send(conn, false, reply);
    }

    // -----------------------------------------------------------------------
    // The primary's link driver.

    /// Feeds `ev` to link `l`'s machine and performs the actions it returns.
    fn feed(&mut self, l: usize, ev: Event) -> bool {
        if self.failure.is_some() {
            return false;
        }
        let before = self.p.links[l].m.phase();
        match self.p.links[l].m.on(ev) {
            Err(e) => {
                self.fail("no_illegal_event", format!("link {l}: {e}"));
                false
            }
            Ok(Outcome::Stale) => {
                tr!(self, "link {l}: {ev:?} is stale");
                false
            }
            Ok(Outcome::Moved(actions)) => {
                tr!(
                    self,
                    "link {l}: {before:?} --{ev:?}--> {:?} {actions:?}",
                    self.p.links[l].m.phase()
                );
                for a in actions {
                    self.perform(l, a);
                }
                true
            }
        }
    }

    fn perform(&mut self, l: usize, a: Action) {
        match a {
            Action::Adopt { .. } => {
                let link = &mut self.p.links[l];
                link.conn = link.attempt.take();
            }
            Action::GoLive { .. } => {}
            Action::StartCatchUp { epoch } => self.start_catch_up(l, epoch),
            Action::CancelConnection => {
                self.p.links[l].cu = None;
                if self.p.suspended == Some(l) {
                    self.p.suspended = None;
                }
                if let Some(c) = self.p.links[l].conn.take() {
                    self.close_by_primary(c);
                }
            }
            Action::FailInflight => self.fail_inflight(l),
            Action::CountFailure => self.stats.link_failures += 1,
            Action::CutGroup | Action::ReportMet | Action::WarnInconsistent => {}
            Action::DemoteVolume => self.fail(
                "no_demote_without_promotion",
                format!("link {l}: DemoteVolume, yet nothing was promoted"),
            ),
        }
    }

    fn connect(&mut self, l: usize) {
        if !self.feed(l, Event::Connect) {
            return;
        }
        let c = self.open_conn(l);
        self.p.links[l].attempt = Some(c);
        tr!(self, "link {l}: connecting on {c}");
        if self.mirrors[l].alive {
            let gen = self.p.gen;
            self.send(c, true, Msg::Hello { gen });
        } else {
            // Connection refused.
            self.reset(c);
        }
        self.after(
            CONNECT_TIMEOUT,
            Ev::HandshakeTimeout {
                link: l,
                conn: c,
                stage: 0,
            },
        );
    }

    fn fail_attempt(&mut self, l: usize) {
        let Some(c) = self.p.links[l].attempt.take() else {
            return;
        };
        self.close_by_primary(c);
        let ev = match self.p.links[l].m.phase() {
            Phase::Handshaking => Event::DivergenceFailed,
            _ => Event::ConnectFailed,
        };
        self.feed(l, ev);
    }

    fn primary_receive(&mut self, conn: usize, msg: Msg) {
        if !self.p.alive || self.conns[conn].inc != self.p.inc {
            return;
        }
        let l = self.conns[conn].mirror;
        match msg {
            Msg::HelloOk { gen } => {
                let link = &self.p.links[l];
                if link.attempt != Some(conn) || !matches!(link.m.phase(), Phase::Connecting { .. })
                {
                    return;
                }
                // judge_generations.
                let rel = compare(&self.p.gen, &gen);
                let j = if rel.primary_may_sync() {
                    if rel.needs_full_copy() {
                        self.p.links[l].bitmap.mark_all();
                    }
                    Judgment::Sync {
                        full_copy: rel.needs_full_copy(),
                    }
                } else {
                    match rel {
                        Relation::PeerAhead => Judgment::PeerAhead,
                        Relation::SplitBrain => Judgment::SplitBrain,
                        _ => Judgment::Unrelated,
                    }
                };
                tr!(
                    self,
                    "link {l}: handshake: ours {} mirror {}: {}",
                    self.p.gen.to_display(),
                    gen.to_display(),
                    rel.as_str()
                );
                let overflow = self.overflowed_lineage(&gen);
                if overflow {
                    // The mirror is ours, from further back than the history
                    // reaches: fenced; an operator runs `resync
                    // --discard-local` on it (a full copy follows).
                    self.stats.history_overflows += 1;
                    self.overflowed[l] = true;
                    tr!(
                        self,
                        "link {l}: mirror's generation fell off the history: operator discards it"
                    );
                    self.mirrors[l].gen.discard();
                } else if matches!(j, Judgment::Sync { .. }) {
                    self.overflowed[l] = false;
                }
                self.feed(l, Event::Handshake(j));
                match self.p.links[l].m.phase() {
                    Phase::Handshaking => self.after(
                        DIVERGENCE_TIMEOUT,
                        Ev::HandshakeTimeout {
                            link: l,
                            conn,
                            stage: 1,
                        },
                    ),
                    _ => {
                        if let Some(c) = self.p.links[l].attempt.take() {
                            self.close_by_primary(c);
                        }
                    }
                }
                if !overflow {
                    self.mirror_gen_seen(l, gen);
                }
            }
            Msg::Divergence => {
                let link = &self.p.links[l];
                if link.attempt != Some(conn) || link.m.phase() != Phase::Handshaking {
                    return;
                }
                // take_divergence: never promoted, so the bitmap covers it all.
                let basis = resync_basis(&self.p.gen, 0, &self.mirrors[l].gen, false);
                if basis != ResyncBasis::Bitmap {
                    self.fail(
                        "resync_basis_is_bitmap",
                        format!("link {l}: {basis:?} without a promotion"),
                    );
                    return;
                }
                if !self.feed(l, Event::DivergenceRead) {
                    return;
                }
                // No consistency group: every member has arrived.
                let epoch = self.p.links[l].m.epoch();
                let bitmap_clear = self.p.links[l].bitmap.is_clear();
                let iterative = self.iterative;
                self.feed(
                    l,
                    Event::Joined {
                        epoch,
                        bitmap_clear,
                        iterative,
                    },
                );
            }
            Msg::Refused if self.p.links[l].attempt == Some(conn) => self.fail_attempt(l),
            Msg::Ack { id }
                if self.p.links[l].conn == Some(conn) && self.p.links[l].m.is_live() =>
            {
                self.acked(l, id)
            }
            Msg::Nack { id } if self.p.links[l].conn == Some(conn) => {
                tr!(self, "link {l}: mirror failed request {id}");
                let epoch = self.p.links[l].m.epoch();
                self.feed(
                    l,
                    Event::Lost {
                        epoch: Some(epoch),
                        cause: FailCause::Peer,
                    },
                );
            }
            _ => {}
        }
    }

    /// Whether `gen` is the primary's own lineage from before its history.
    fn overflowed_lineage(&self, gen: &Generations) -> bool {
        compare(&self.p.gen, gen) == Relation::Unrelated && self.lineage.contains(&gen.current)
    }

    /// The generation record a handshake showed: without a promotion the
    /// primary may always sync it.
    fn mirror_gen_seen(&mut self, l: usize, gen: Generations) {
        let rel = compare(&self.p.gen, &gen);
        if !rel.primary_may_sync() {
            self.fail(
                "mirror_lineage_is_ours",
                format!(
                    "link {l}: mirror {} vs primary {}: {} without a promotion",
                    gen.to_display(),
                    self.p.gen.to_display(),
                    rel.as_str()
                ),
            );
        }
    }

    /// A mirror acknowledged an "in sync" announcement (GenState::announced).
    fn announce_acked(&mut self) {
        if self.rules.gen == GenRule::NodeGlobal {
            self.p.announced = true;
        }
    }

    /// Registers a request on link `l`'s live connection and sends it.
    fn request(
        &mut self,
        l: usize,
        kind: Kind,
        block: Option<usize>,
        msg: impl FnOnce(u64) -> Msg,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let link = &mut self.p.links[l];
        let conn = link.conn.expect("a live link has a connection");
        link.inflight.insert(
            id,
            Pending {
                kind,
                block,
                sent_at: self.now,
                epoch: link.m.epoch(),
            },
        );
        let m = msg(id);
        self.send(conn, true, m);
    }

    /// `prepare_flush` + send: None when the link is away or filling.
    fn flush(&mut self, l: usize, kind: Kind) -> bool {
        let link = &mut self.p.links[l];
        if !link.m.is_live() || link.m.is_filling() {
            return false;
        }
        let id = self.next_id;
        let covered = std::mem::replace(&mut link.unflushed, empty());
        link.flushing.push_back((id, covered));
        self.request(l, kind, None, |id| Msg::Flush { id });
        true
    }

    fn state(&mut self, l: usize, kind: Kind, in_sync: bool) {
        if in_sync && self.rules.gen == GenRule::PerLink {
            self.p.links[l].announced = true;
        }
        let gen = self.p.gen;
        self.request(l, kind, None, |id| Msg::State { id, in_sync, gen });
    }

    fn acked(&mut self, l: usize, id: u64) {
        let Some(p) = self.p.links[l].inflight.remove(&id) else {
            return;
        };
        let link = &mut self.p.links[l];
        if p.kind.is_flush() {
            while link.flushing.front().is_some_and(|(f, _)| *f <= id) {
                link.flushing.pop_front();
            }
        } else if let Some(b) = p.block {
            link.unflushed.mark(off(b), REGION);
        }
        let epoch_ok = p.epoch == link.m.epoch() && link.m.is_live();
        let cu_is = |cu: u64, link: &Link| link.cu.as_ref().is_some_and(|c| c.id == cu);
        match p.kind {
            Kind::Host(hw) => self.host_resolved(hw, l, true),
            Kind::Copy { cu } => {
                let b = p.block.expect("a copy has a block");
                self.p.copy_locks[b] -= 1;
                let link = &mut self.p.links[l];
                if epoch_ok {
                    link.bitmap.clear(off(b), REGION);
                }
                if cu_is(cu, link) {
                    link.cu.as_mut().expect("checked").window -= 1;
                    self.pump_catch_up(l);
                }
            }
            Kind::Flush | Kind::Ping => {}
            Kind::CuFlush { cu, start } => {
                if epoch_ok && cu_is(cu, &self.p.links[l]) {
                    let g = self.p.gen.current;
                    self.p.links[l].cu.as_mut().expect("checked").sent_gen = g;
                    self.state(
                        l,
                        Kind::CuState {
                            cu,
                            in_sync: true,
                            start,
                        },
                        true,
                    );
                }
            }
            Kind::CuState { cu, in_sync, start } => {
                if in_sync {
                    self.announce_acked();
                }
                if !epoch_ok || !cu_is(cu, &self.p.links[l]) {
                    return;
                }
                if !in_sync {
                    self.p.links[l].cu.as_mut().expect("checked").stage = Stage::Copying;
                    self.pump_catch_up(l);
                } else if self.p.links[l].cu.as_ref().expect("checked").sent_gen
                    != self.p.gen.current
                {
                    // A rotation came between: the mirror stored an older
                    // generation, and re-announcements only reach links in
                    // sync. Announce again (the node does not).
                    if !self.flush(l, Kind::CuFlush { cu, start }) {
                        self.p.links[l].cu = None;
                    }
                } else if start {
                    self.p.links[l].cu = None;
                } else if self.p.links[l].bitmap.is_clear() {
                    self.p.links[l].cu = None;
                    self.feed(l, Event::CatchUpDone { epoch: p.epoch });
                } else {
                    let cu = self.p.links[l].cu.as_mut().expect("checked");
                    cu.stage = Stage::Copying;
                    cu.cursor = 0;
                    self.pump_catch_up(l);
                }
            }
            Kind::ReFlush => {
                if epoch_ok {
                    self.state(l, Kind::ReState, true);
                }
            }
            Kind::ReState => self.announce_acked(),
        }
    }

    /// FailInflight: every request fails and its region is marked, and what
    /// the mirror acknowledged but may not have flushed is marked too.
    fn fail_inflight(&mut self, l: usize) {
        let link = &mut self.p.links[l];
        let inflight = std::mem::take(&mut link.inflight);
        for p in inflight.values() {
            if let Some(b) = p.block {
                link.bitmap.mark(off(b), REGION);
            }
        }
        let unflushed = std::mem::replace(&mut link.unflushed, empty());
        let flushing = std::mem::take(&mut link.flushing);
        for b in std::iter::once(&unflushed).chain(flushing.iter().map(|(_, b)| b)) {
            link.bitmap.union_with(b).expect("same shape");
        }
        for p in inflight.values() {
            match p.kind {
                Kind::Host(hw) => self.host_resolved(hw, l, false),
                Kind::Copy { .. } => {
                    self.p.copy_locks[p.block.expect("a copy has a block")] -= 1;
                }
                _ => {}
            }
        }
    }

    fn start_catch_up(&mut self, l: usize, epoch: u64) {
        let id = self.next_cu;
        self.next_cu += 1;
        let dirty = self.p.links[l].bitmap.dirty_regions();
        self.p.links[l].cu = Some(CatchUp {
            id,
            epoch,
            stage: Stage::Announcing,
            cursor: 0,
            window: 0,
            pass: 1,
            final_copy: false,
            sent_gen: 0,
        });
        if dirty == 0 {
            // Nothing to copy: announce that the mirror holds our generation.
            if !self.flush(
                l,
                Kind::CuFlush {
                    cu: id,
                    start: true,
                },
            ) {
                self.p.links[l].cu = None;
            }
        } else {
            self.state(
                l,
                Kind::CuState {
                    cu: id,
                    in_sync: false,
                    start: false,
                },
                false,
            );
        }
    }

    /// Moves the catch-up of link `l` on as far as it can go now.
    fn pump_catch_up(&mut self, l: usize) {
        loop {
            if self.failure.is_some() {
                return;
            }
            let link = &self.p.links[l];
            let Some(cu) = &link.cu else { return };
            if cu.epoch != link.m.epoch() || !link.m.is_live() {
                self.p.links[l].cu = None;
                return;
            }
            if cu.stage != Stage::Copying {
                return;
            }
            let (cu_id, cursor, window) = (cu.id, cu.cursor, cu.window);
            let next = if cursor < BLOCKS {
                link.bitmap
                    .next_dirty(cursor as u64)
                    .map(|r| r as usize)
                    .filter(|&r| r < BLOCKS)
            } else {
                None
            };
            if let Some(b) = next {
                if window >= WINDOW {
                    return;
                }
                let cu = self.p.links[l].cu.as_mut().expect("checked");
                cu.cursor = b + 1;
                cu.window += 1;
                // The copy holds the block's range lock until it is acked.
                self.p.copy_locks[b] += 1;
                let value = self.p.data[b];
                self.request(l, Kind::Copy { cu: cu_id }, Some(b), |id| Msg::Write {
                    id,
                    block: b,
                    value,
                });
                continue;
            }
            if window > 0 {
                return;
            }
            // A pass is done.
            let epoch = cu.epoch;
            if link.m.is_filling() {
                let left = link.bitmap.dirty_regions();
                let (final_copy, pass) = (cu.final_copy, cu.pass);
                if final_copy {
                    // Host writes are held: nothing was marked meanwhile.
                    self.feed(l, Event::FillDone { epoch });
                    self.p.suspended = None;
                    if let Some(cu) = self.p.links[l].cu.as_mut() {
                        cu.final_copy = false;
                        cu.cursor = 0;
                    }
                } else if left <= THRESHOLD {
                    tr!(self, "link {l}: fill pass {pass} left {left}: final copy");
                    self.p.suspended = Some(l);
                    let cu = self.p.links[l].cu.as_mut().expect("checked");
                    cu.final_copy = true;
                    cu.cursor = 0;
                } else if pass >= MAX_PASSES {
                    self.feed(l, Event::FillDone { epoch });
                    if let Some(cu) = self.p.links[l].cu.as_mut() {
                        cu.cursor = 0;
                    }
                } else {
                    let cu = self.p.links[l].cu.as_mut().expect("checked");
                    cu.pass += 1;
                    cu.cursor = 0;
                }
                continue;
            }
            if link.bitmap.is_clear() {
                self.p.links[l].cu.as_mut().expect("checked").stage = Stage::Announcing;
                if !self.flush(
                    l,
                    Kind::CuFlush {
                        cu: cu_id,
                        start: false,
                    },
                ) {
                    self.p.links[l].cu = None;
                }
                return;
            }
            self.p.links[l].cu.as_mut().expect("checked").cursor = 0;
        }
    }

    /// GenState::diverge: a new generation if a mirror may hold this one,
    /// and the links in sync are told it.
    fn diverge(&mut self, missed: &[bool]) {
        let may_hold = match self.rules.gen {
            GenRule::NodeGlobal => self.p.announced,
            GenRule::PerLink => missed
                .iter()
                .zip(&self.p.links)
                .any(|(&m, l)| m && l.announced),
        };
        if !may_hold {
            return;
        }
        for l in &mut self.p.links {
            l.announced = false;
        }
        let id = self.rng.next_u64();
        self.p.gen.rotate(id);
        self.lineage.push(self.p.gen.current);
        self.p.announced = false;
        self.stats.rotations += 1;
        tr!(self, "new generation {}", self.p.gen.to_display());
        for l in 0..self.p.links.len() {
            if self.p.links[l].m.in_sync() && self.p.links[l].conn.is_some() {
                self.flush(l, Kind::ReFlush);
            }
        }
    }

    fn al_activate(&mut self, l: usize, b: usize) {
        let link = &mut self.p.links[l];
        if let Some(pos) = link.al.iter().position(|e| e.0 == b) {
            let mut e = link.al.remove(pos);
            e.1 += 1;
            link.al.push(e);
            return;
        }
        if link.al.len() >= AL_CAP {
            let pos = link
                .al
                .iter()
                .position(|e| e.1 == 0)
                .expect("fewer host writes than extents");
            // Marks made while the evicted extent was active are covered only
            // by the log: the bitmap is stored first.
            link.store(self.rules.store_unflushed);
            link.al.remove(pos);
        }
        link.al.push((b, 1));
    }

    fn al_end(&mut self, l: usize, b: usize) {
        if let Some(e) = self.p.links[l].al.iter_mut().find(|e| e.0 == b) {
            e.1 -= 1;
        }
    }

    fn start_writes(&mut self) {
        while self.p.alive
            && self.p.suspended.is_none()
            && self.p.writes.len() < MAX_HOST_WRITES
            && self.failure.is_none()
        {
            let Some(&(b, _)) = self.p.queue.front() else {
                return;
            };
            if self.p.copy_locks[b] > 0 {
                return;
            }
            let (b, v) = self.p.queue.pop_front().expect("checked");
            self.host_write(b, v);
        }
    }

    /// Replicator::replicate for one block.
    fn host_write(&mut self, b: usize, v: u64) {
        let n = self.p.links.len();
        for l in 0..n {
            self.al_activate(l, b);
        }
        let mut missed = vec![false; n];
        let mut live = vec![false; n];
        for l in 0..n {
            let link = &mut self.p.links[l];
            if !link.m.is_live() {
                link.bitmap.mark(off(b), REGION);
                missed[l] = true;
            } else if link.m.is_filling() {
                link.bitmap.mark(off(b), REGION);
            } else {
                live[l] = true;
            }
        }
        if missed.iter().any(|&m| m) {
            self.diverge(&missed);
        }
        if self.faults_on && self.rng.chance(3) {
            // The local write fails (and may have landed): nothing is sent,
            // every link marks the region; links in sync copy it again.
            let landed = self.rng.chance(50);
            if landed {
                self.p.data[b] = v;
            }
            tr!(
                self,
                "host write #{v} to block {b}: local disk error (landed: {landed})"
            );
            for l in 0..n {
                self.p.links[l].bitmap.mark(off(b), REGION);
                if self.p.links[l].m.in_sync() {
                    self.feed(l, Event::MarkedRegions);
                }
                self.al_end(l, b);
            }
            self.stats.writes_failed += 1;
            return;
        }
        self.p.data[b] = v;
        let hw = v;
        self.p.writes.insert(
            hw,
            HostWrite {
                block: b,
                value: v,
                waiting: 0,
                missed,
            },
        );
        for l in 0..n {
            if live[l] {
                self.p.writes.get_mut(&hw).expect("inserted").waiting += 1;
                self.request(l, Kind::Host(hw), Some(b), |id| Msg::Write {
                    id,
                    block: b,
                    value: v,
                });
            }
        }
        tr!(
            self,
            "host write #{v} to block {b}: sent to {live:?}, missed by {:?}",
            self.p.writes[&hw].missed
        );
        if self.p.writes[&hw].waiting == 0 {
            self.finish(hw);
        }
    }

    fn host_resolved(&mut self, hw: u64, l: usize, ok: bool) {
        let Some(w) = self.p.writes.get_mut(&hw) else {
            return;
        };
        w.waiting -= 1;
        if !ok {
            w.missed[l] = true;
        }
        if w.waiting == 0 {
            self.finish(hw);
        }
    }

    /// The end of a host write: a new generation if a mirror missed it, then
    /// the host is answered.
    fn finish(&mut self, hw: u64) {
        let w = self.p.writes.remove(&hw).expect("in progress");
        if w.missed.iter().any(|&m| m) {
            self.diverge(&w.missed);
            for (l, &m) in w.missed.iter().enumerate() {
                let mi = &self.mirrors[l];
                if m && mi.label_in_sync
                    && mi.gen.current == self.p.gen.current
                    && mi.cache[w.block] < w.value
                {
                    self.fail(
                        "missed_write_starts_new_generation",
                        format!(
                            "host write #{} to block {} acknowledged, missed by mirror {l}, which \
                             lacks it yet holds the primary's current generation {} as in sync",
                            w.value,
                            w.block,
                            self.p.gen.to_display()
                        ),
                    );
                }
            }
        }
        for l in 0..self.p.links.len() {
            self.al_end(l, w.block);
        }
        self.stats.writes_acked += 1;
        tr!(
            self,
            "host write #{} to block {} acknowledged",
            w.value,
            w.block
        );
    }

    fn tick(&mut self) {
        self.after(TICK, Ev::Tick);
        if !self.p.alive {
            return;
        }
        self.ticks += 1;
        for l in 0..self.p.links.len() {
            if !self.p.links[l].m.is_live() {
                continue;
            }
            if self.ticks % 2 == 0 {
                // The watchdog.
                let link = &self.p.links[l];
                let oldest = link.inflight.values().map(|p| p.sent_at).min();
                match oldest {
                    Some(t) if self.now - t >= TIMEOUT => {
                        let epoch = link.m.epoch();
                        tr!(self, "link {l}: watchdog: request unanswered since t={t}");
                        self.feed(
                            l,
                            Event::Lost {
                                epoch: Some(epoch),
                                cause: FailCause::Timeout,
                            },
                        );
                        continue;
                    }
                    Some(_) => {}
                    None => self.request(l, Kind::Ping, None, |id| Msg::Ping { id }),
                }
            }
            if self.ticks % 4 == 0 && !self.p.links[l].unflushed.is_clear() {
                self.flush(l, Kind::Flush);
            }
        }
        if self.ticks % 20 == 0 {
            for link in &mut self.p.links {
                link.store(self.rules.store_unflushed);
            }
        }
    }

    // -----------------------------------------------------------------------
    // Checks.

    /// The invariants, after every step.
    fn check(&mut self) {
        if self.failure.is_some() || !self.p.alive {
            return;
        }
        let mut diff_all = vec![0u64; self.mirrors.len()];
        for (i, d) in diff_all.iter_mut().enumerate() {
            for b in 0..BLOCKS {
                if self.mirrors[i].cache[b] != self.p.data[b] {
                    *d |= 1 << b;
                }
            }
        }
        for l in 0..self.p.links.len() {
            let link = &self.p.links[l];
            let m = &link.m;
            let phase = m.phase();
            if matches!(phase, Phase::Idle { fence: Some(_) }) && !self.overflowed[l] {
                let msg = format!("link {l} fenced ({phase:?}) without a promotion");
                return self.fail("no_fence_without_promotion", msg);
            }
            if m.in_sync() && !link.bitmap.is_clear() {
                let msg = format!(
                    "link {l} is InSync with blocks {:#x} marked",
                    mask(&link.bitmap)
                );
                return self.fail("in_sync_means_bitmap_clear", msg);
            }
            if m.has_connection() != link.conn.is_some() {
                let msg = format!(
                    "link {l}: machine {phase:?} has_connection {} but driver holds {:?}",
                    m.has_connection(),
                    link.conn
                );
                return self.fail("driver_holds_connection_iff_machine_connected", msg);
            }
            let connecting = matches!(phase, Phase::Connecting { .. } | Phase::Handshaking);
            if connecting != link.attempt.is_some() {
                let msg = format!("link {l}: {phase:?} with attempt {:?}", link.attempt);
                return self.fail("attempt_iff_connecting", msg);
            }
            if !m.is_live() && (!link.inflight.is_empty() || link.cu.is_some()) {
                let msg = format!(
                    "link {l}: {phase:?} with {} requests in flight, catch-up {}",
                    link.inflight.len(),
                    link.cu.is_some()
                );
                return self.fail("nothing_in_flight_unless_live", msg);
            }
            let mut inflight = 0u64;
            for p in link.inflight.values() {
                if let Some(b) = p.block {
                    inflight |= 1 << b;
                }
            }
            let mut covered = mask(&link.bitmap) | mask(&link.unflushed) | inflight;
            for (_, f) in &link.flushing {
                covered |= mask(f);
            }
            // A blank mirror is copied whole by its next connection.
            let diff = if self.mirrors[l].gen.is_blank() {
                0
            } else {
                diff_all[l]
            };
            if diff & !covered != 0 {
                let b = (diff & !covered).trailing_zeros() as usize;
                let msg = format!(
                    "link {l} ({phase:?}): mirror {l} holds #{} at block {b}, the primary #{}, \
                     and nothing marks it (bitmap {:#x}, unflushed {:#x}, in flight {inflight:#x})",
                    self.mirrors[l].cache[b],
                    self.p.data[b],
                    mask(&link.bitmap),
                    mask(&link.unflushed)
                );
                return self.fail("every_difference_is_marked", msg);
            }
            let mi = &self.mirrors[l];
            let serving = mi.alive
                && link.conn.is_some()
                && mi.current == link.conn
                && self.conns[link.conn.expect("checked")].open_m;
            if m.in_sync() && serving && diff & !inflight != 0 {
                let b = (diff & !inflight).trailing_zeros() as usize;
                let msg = format!(
                    "link {l} is InSync and its mirror serves it, but holds #{} at block {b} \
                     where the primary acknowledged #{}",
                    mi.cache[b], self.p.data[b]
                );
                return self.fail("acked_write_held_by_in_sync_mirror", msg);
            }
            let rel = compare(&self.p.gen, &mi.gen);
            if !rel.primary_may_sync() && !self.overflowed_lineage(&mi.gen) {
                let msg = format!(
                    "mirror {l} {} vs primary {}: {}",
                    mi.gen.to_display(),
                    self.p.gen.to_display(),
                    rel.as_str()
                );
                return self.fail("mirror_lineage_is_ours", msg);
            }
        }
    }

    fn quiet(&self) -> bool {
        self.not_quiet_why().is_empty()
    }

    fn not_quiet_why(&self) -> String {
        let mut s = String::new();
        if !self.p.alive {
            s.push_str("primary down; ");
        }
        if !self.p.writes.is_empty() || !self.p.queue.is_empty() {
            let _ = write!(s, "{} host writes pending; ", self.p.writes.len());
        }
        for (l, link) in self.p.links.iter().enumerate() {
            if !self.mirrors[l].alive {
                let _ = write!(s, "mirror {l} down; ");
            }
            if !link.m.in_sync() {
                let _ = write!(s, "link {l} {:?}; ", link.m.phase());
            }
            if !link.inflight.is_empty() || link.cu.is_some() {
                let _ = write!(
                    s,
                    "link {l}: {} in flight, catch-up {}; ",
                    link.inflight.len(),
                    link.cu.is_some()
                );
            }
            if !link.unflushed.is_clear() || !link.flushing.is_empty() {
                let _ = write!(s, "link {l} unflushed; ");
            }
            if self.mirrors[l].gen != self.p.gen {
                let _ = write!(s, "mirror {l} not at the primary's generation; ");
            }
        }
        s
    }

    fn final_checks(&mut self) {
        for l in 0..self.p.links.len() {
            let mi = &self.mirrors[l];
            for b in 0..BLOCKS {
                if mi.cache[b] != self.p.data[b] || mi.disk[b] != self.p.data[b] {
                    let msg = format!(
                        "mirror {l} block {b}: cache #{} disk #{}, primary #{}",
                        mi.cache[b], mi.disk[b], self.p.data[b]
                    );
                    return self.fail("mirror_equals_primary_at_the_end", msg);
                }
            }
            if !mi.label_in_sync || mi.gen != self.p.gen {
                let msg = format!(
                    "mirror {l}: label in sync {} gen {}, primary gen {}",
                    mi.label_in_sync,
                    mi.gen.to_display(),
                    self.p.gen.to_display()
                );
                return self.fail("mirror_holds_primary_generation_at_the_end", msg);
            }
        }
    }
}
