//! Throughput of the apply scheduler: submit + complete per operation, for a
//! stream of 4 KiB writes that never overlap and for one where 10% rewrite a
//! block written shortly before (and so overlap an operation still held).
//!
//! The driver stands in for the daemon: it submits until the scheduler is
//! full, then completes the oldest running operation, and drains at the end.

use std::collections::VecDeque;
use std::hint::black_box;

use blockmirror_core::scheduler::{Op, Scheduler, SchedulerConfig, TaskId};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const OPS: usize = 100_000;
const BLOCK: u64 = 4096;
/// 64 GiB of 4 KiB blocks.
const BLOCKS: u64 = 1 << 24;

/// A deterministic stream: block numbers from an odd-multiplier permutation
/// (so all distinct), and `overlap_pct` percent that reuse one of the last 64.
fn stream(overlap_pct: u64) -> Vec<Op> {
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut recent = VecDeque::with_capacity(64);
    (0..OPS as u64)
        .map(|i| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let block = if rng % 100 < overlap_pct && !recent.is_empty() {
                recent[(rng >> 32) as usize % recent.len()]
            } else {
                (i * 0x9E37_79B1) % BLOCKS
            };
            if recent.len() == 64 {
                recent.pop_front();
            }
            recent.push_back(block);
            Op::write(i + 1, block * BLOCK, BLOCK)
        })
        .collect()
}

fn run(cfg: SchedulerConfig, ops: &[Op]) -> u64 {
    let mut s = Scheduler::new(cfg).expect("valid config");
    let mut running: VecDeque<(TaskId, u64)> = VecDeque::new();
    let mut next = 0;
    while next < ops.len() || !running.is_empty() {
        if next < ops.len() && !s.is_full() {
            let out = s.submit(ops[next]).expect("room was checked");
            next += 1;
            running.extend(out.iter().map(|d| (d.task, d.op.seq)));
        } else {
            let (task, seq) = running.pop_front().expect("held ops drain");
            let out = s.complete(task, seq).expect("task runs seq");
            running.extend(out.iter().map(|d| (d.task, d.op.seq)));
        }
    }
    s.stats().completed
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    g.throughput(Throughput::Elements(OPS as u64));
    g.sample_size(20);
    for overlap in [0u64, 10] {
        let ops = stream(overlap);
        for (groups, tasks) in [(1, 8), (8, 4)] {
            let mut cfg = SchedulerConfig::new(BLOCKS * BLOCK, groups, tasks);
            cfg.max_ops = 1024;
            let id = BenchmarkId::new(format!("overlap{overlap}pct"), format!("{groups}x{tasks}"));
            g.bench_with_input(id, &ops, |b, ops| b.iter(|| black_box(run(cfg, ops))));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
