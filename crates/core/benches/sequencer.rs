//! Subtasks per second through the sequencer, beside the seed's queue walk.
//!
//! Workload: `C` write tasks in flight at once (C = 1, 16, 256), each of 16
//! subtasks (a 1 MiB write in 64 KiB tracks). Subtasks arrive in uniformly
//! random order among all those in flight, as from a pool of workers
//! finishing at random; when the last subtask of a task has arrived, a new
//! task opens. The queue depth (subtasks held out of order) grows with C.
//!
//! - `indexed`: [`Sequencer`], contexts independent (sync mode).
//! - `indexed_fifo`: [`Sequencer`] with every context acknowledged as it
//!   opens, so whole contexts leave in opening order and far more is held.
//! - `naive_walk`: the seed's FIG. 4 ([`NaiveSequencer`]): one sorted queue,
//!   walked on every insertion.
//!
//! After criterion's report, `cargo bench` prints a side-by-side table with
//! the mean queue depth and the ratio indexed / naive, measured in the same
//! run: `cargo bench -p blockmirror-core --bench sequencer`. A second table
//! runs the sequencer as the daemon's pipeline does, behind one `Mutex`
//! shared by T threads (each inserting its own contexts' subtasks), beside
//! the same work on one thread without a lock.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blockmirror_core::sequencer::naive::NaiveSequencer;
use blockmirror_core::sequencer::{ContextId, Sequencer, SequencerLimits, SubtaskIndex};
use criterion::{BenchmarkId, Criterion, Throughput};

/// Subtasks per write task: 1 MiB in 64 KiB tracks.
const SUBTASKS_PER_TASK: u32 = 16;
/// Subtasks per measured run.
const SUBTASKS_PER_RUN: usize = 32 * 1024;
/// Subtasks per run when `cargo test` runs each benchmark once as a smoke
/// test (unoptimised: the seed's walk would take seconds).
const SUBTASKS_PER_TEST_RUN: usize = 2 * 1024;
const CONTEXTS: [usize; 3] = [1, 16, 256];

#[derive(Debug, Clone, Copy)]
enum Ev {
    Open(ContextId, SubtaskIndex),
    Insert(ContextId, SubtaskIndex),
}

/// splitmix64: a fixed seed gives the same arrival order every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `contexts` tasks in flight; `subtasks` arrive at random among them.
fn workload(contexts: usize, subtasks: usize, seed: u64) -> Vec<Ev> {
    let mut rng = Rng(seed);
    let mut evs = Vec::with_capacity(subtasks + subtasks / 8);
    let mut pending: Vec<(ContextId, SubtaskIndex)> = Vec::new();
    let mut left: Vec<u32> = Vec::new(); // per context id, subtasks not yet arrived
    fn open(evs: &mut Vec<Ev>, pending: &mut Vec<(ContextId, SubtaskIndex)>, left: &mut Vec<u32>) {
        let ctx = left.len() as ContextId;
        left.push(SUBTASKS_PER_TASK);
        evs.push(Ev::Open(ctx, SUBTASKS_PER_TASK));
        pending.extend((0..SUBTASKS_PER_TASK).map(|i| (ctx, i)));
    }
    for _ in 0..contexts {
        open(&mut evs, &mut pending, &mut left);
    }
    let mut inserted = 0;
    while inserted < subtasks {
        let (ctx, i) = pending.swap_remove(rng.below(pending.len()));
        evs.push(Ev::Insert(ctx, i));
        inserted += 1;
        left[ctx as usize] -= 1;
        if left[ctx as usize] == 0 {
            open(&mut evs, &mut pending, &mut left);
        }
    }
    evs
}

fn limits() -> SequencerLimits {
    SequencerLimits {
        max_subtasks: 1 << 20,
        max_context_subtasks: SUBTASKS_PER_TASK,
        max_contexts: 1 << 16,
    }
}

/// Returns the number of subtasks released.
fn run_indexed(evs: &[Ev], fifo: bool) -> usize {
    let mut s = Sequencer::<u64>::new(limits()).expect("valid limits");
    let mut released = 0;
    for &ev in evs {
        match ev {
            Ev::Open(ctx, total) => {
                s.open_context(ctx, total).expect("room");
                if fifo {
                    s.acknowledged(ctx);
                }
            }
            Ev::Insert(ctx, i) => {
                let r = s.insert(ctx, i, u64::from(i)).expect("valid insert");
                released += r.subtasks.len();
                black_box(&r);
            }
        }
    }
    released
}

fn run_naive(evs: &[Ev]) -> usize {
    let mut s = NaiveSequencer::<u64>::new();
    let mut released = 0;
    for &ev in evs {
        match ev {
            Ev::Open(ctx, total) => s.open(ctx, total),
            Ev::Insert(ctx, i) => {
                let r = s.insert(ctx, i, u64::from(i));
                released += r.len();
                black_box(&r);
            }
        }
    }
    released
}

/// Mean subtasks held (queue depth) after each insertion, and the most.
fn depth(evs: &[Ev], fifo: bool) -> (f64, usize) {
    let mut s = Sequencer::<u64>::new(limits()).expect("valid limits");
    let (mut sum, mut max, mut n) = (0usize, 0usize, 0usize);
    for &ev in evs {
        match ev {
            Ev::Open(ctx, total) => {
                s.open_context(ctx, total).expect("room");
                if fifo {
                    s.acknowledged(ctx);
                }
            }
            Ev::Insert(ctx, i) => {
                s.insert(ctx, i, 0).expect("valid insert");
                let held = s.stats().held;
                sum += held;
                max = max.max(held);
                n += 1;
            }
        }
    }
    (sum as f64 / n as f64, max)
}

fn bench(c: &mut Criterion, subtasks: usize) {
    let mut g = c.benchmark_group("sequencer");
    g.throughput(Throughput::Elements(subtasks as u64));
    g.sample_size(10);
    for contexts in CONTEXTS {
        let evs = workload(contexts, subtasks, 0x5e9 + contexts as u64);
        g.bench_with_input(BenchmarkId::new("indexed", contexts), &evs, |b, evs| {
            b.iter(|| run_indexed(evs, false))
        });
        g.bench_with_input(
            BenchmarkId::new("indexed_fifo", contexts),
            &evs,
            |b, evs| b.iter(|| run_indexed(evs, true)),
        );
        g.bench_with_input(BenchmarkId::new("naive_walk", contexts), &evs, |b, evs| {
            b.iter(|| run_naive(evs))
        });
    }
    g.finish();
}

/// Best of several runs of `f`, within about `budget`; each run must
/// release `expect` subtasks (all but those of the tasks still in flight at
/// the end).
fn best(budget: Duration, expect: usize, mut f: impl FnMut() -> usize) -> Duration {
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || (start.elapsed() < budget && runs < 50) {
        let t = Instant::now();
        assert_eq!(black_box(f()), expect, "released subtasks");
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}

/// The daemon's way: one sequencer behind a `Mutex`, each thread running
/// its own workload (context ids kept apart by thread). Returns the
/// subtasks released.
fn run_shared(per_thread: &[Vec<Ev>]) -> usize {
    let s = Mutex::new(Sequencer::<u64>::new(limits()).expect("valid limits"));
    let released = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for (t, evs) in per_thread.iter().enumerate() {
            let (s, released) = (&s, &released);
            sc.spawn(move || {
                let base = (t as ContextId) << 40;
                let mut n = 0;
                for &ev in evs {
                    match ev {
                        Ev::Open(ctx, total) => s
                            .lock()
                            .unwrap()
                            .open_context(base + ctx, total)
                            .expect("room"),
                        Ev::Insert(ctx, i) => {
                            let r = s.lock().unwrap().insert(base + ctx, i, u64::from(i));
                            n += r.expect("valid insert").subtasks.len();
                        }
                    }
                }
                released.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    released.into_inner()
}

/// Threads sharing one sequencer behind a mutex, 16 contexts in flight in
/// all, against the same events on one thread without a lock.
fn shared_summary() {
    println!();
    println!(
        "sequencer behind one Mutex: 16 contexts in flight in all, split among T threads; \
         M subtasks/s (best run)"
    );
    println!(
        "{:>8} {:>14} {:>12} {:>9}",
        "threads", "mutex, shared", "no lock, 1", "vs 1"
    );
    for threads in [1usize, 2, 4] {
        let per: Vec<Vec<Ev>> = (0..threads)
            .map(|t| workload(16 / threads, SUBTASKS_PER_RUN / threads, 0x7e + t as u64))
            .collect();
        let expect: usize = per.iter().map(|evs| run_indexed(evs, false)).sum();
        let budget = Duration::from_millis(400);
        let shared = best(budget, expect, || run_shared(&per));
        let single = best(budget, expect, || {
            per.iter().map(|evs| run_indexed(evs, false)).sum()
        });
        println!(
            "{threads:>8} {:>14.2} {:>12.2} {:>8.2}x",
            mps(shared),
            mps(single),
            single.as_secs_f64() / shared.as_secs_f64()
        );
    }
}

/// Millions of subtasks inserted per second.
fn mps(d: Duration) -> f64 {
    SUBTASKS_PER_RUN as f64 / d.as_secs_f64() / 1e6
}

/// The side-by-side figures: both implementations on the same arrival
/// order, in the same process, best of several runs.
fn summary() {
    println!();
    println!(
        "sequencer: {SUBTASKS_PER_RUN} subtasks per run, {SUBTASKS_PER_TASK} per task, random arrival; \
         M subtasks/s (best run)"
    );
    println!(
        "{:>8} {:>10} {:>9} {:>10} {:>10} {:>9} {:>13} {:>12}",
        "contexts",
        "mean held",
        "max held",
        "indexed",
        "naive",
        "ratio",
        "indexed_fifo",
        "fifo held"
    );
    for contexts in CONTEXTS {
        let evs = workload(contexts, SUBTASKS_PER_RUN, 0x5e9 + contexts as u64);
        let (mean, max) = depth(&evs, false);
        let (fifo_mean, _) = depth(&evs, true);
        let budget = Duration::from_millis(400);
        let expect = run_naive(&evs);
        let expect_fifo = run_indexed(&evs, true);
        assert!(expect_fifo <= expect && expect <= SUBTASKS_PER_RUN);
        let indexed = best(budget, expect, || run_indexed(&evs, false));
        let fifo = best(budget, expect_fifo, || run_indexed(&evs, true));
        let naive = best(budget, expect, || run_naive(&evs));
        println!(
            "{contexts:>8} {mean:>10.1} {max:>9} {:>10.2} {:>10.3} {:>8.1}x {:>13.2} {fifo_mean:>12.1}",
            mps(indexed),
            mps(naive),
            naive.as_secs_f64() / indexed.as_secs_f64(),
            mps(fifo),
        );
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // criterion then runs each benchmark once.
    let measuring = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default().configure_from_args();
    let subtasks = if measuring {
        SUBTASKS_PER_RUN
    } else {
        SUBTASKS_PER_TEST_RUN
    };
    bench(&mut c, subtasks);
    c.final_summary();
    if measuring {
        summary();
        shared_summary();
    }
}
