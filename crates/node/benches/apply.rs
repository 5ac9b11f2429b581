//! Mirror apply throughput with N tasks against one task (seed 003).
//!
//! Streams of 4 KiB writes, either never overlapping or with 10% rewriting
//! one of the last 64 blocks (so they overlap an operation still held), are
//! pushed through the real [`ApplyEngine`] against:
//!
//! - `latency`: an in-memory backend with 200 us injected per write (a
//!   stand-in for a device with per-write latency), and
//! - `odirect`: the file backend with O_DIRECT on a scratch file.
//!
//! Each configuration runs `--rounds` times, interleaved (N = 1, 2, ... then
//! again), and the median throughput of each is printed with its ratio to
//! N = 1 from the same run: absolute figures on a shared machine are noise.
//!
//! `cargo bench -p blockmirror-node --bench apply [-- --rounds 3 --quick]`

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockmirror_node::mirror::apply::{ApplyConfig, ApplyEngine, ApplyMetrics, ApplyOp};
use blockmirror_storage::{Backend, FaultBackend, Faults, FileBackend, FileOptions, MemBackend};
use bytes::Bytes;

const BLOCK: u64 = 4096;
const VOLUME: u64 = 256 << 20;

fn stream(n: usize, overlap_pct: u64) -> Vec<u64> {
    let blocks = VOLUME / BLOCK;
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut recent = VecDeque::with_capacity(64);
    (0..n as u64)
        .map(|i| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let block = if rng % 100 < overlap_pct && !recent.is_empty() {
                recent[(rng >> 32) as usize % recent.len()]
            } else {
                (i * 0x9E37_79B1) % blocks
            };
            if recent.len() == 64 {
                recent.pop_front();
            }
            recent.push_back(block);
            block * BLOCK
        })
        .collect()
}

/// Tasks as groups x tasks per group: up to two tasks per group.
fn shape(n: usize) -> (usize, usize) {
    let groups = (n / 2).max(1);
    (groups, n / groups)
}

/// Ops per second applying `offsets` with `n` tasks.
fn run(rt: &tokio::runtime::Runtime, backend: Arc<dyn Backend>, n: usize, offsets: &[u64]) -> f64 {
    let (groups, tasks_per_group) = shape(n);
    let cfg = ApplyConfig {
        groups,
        tasks_per_group,
        max_ops: 1024,
        max_bytes: 256 << 20,
        inline_max: 0,
    };
    let data = Bytes::from(vec![0x5a; BLOCK as usize]);
    rt.block_on(async {
        let metrics = Arc::new(ApplyMetrics::new(groups));
        let mut e = ApplyEngine::new(backend, cfg, metrics).expect("engine starts");
        let mut out = Vec::new();
        let start = Instant::now();
        for (i, &offset) in offsets.iter().enumerate() {
            while e.is_full() {
                e.completions(&mut out).await;
            }
            let op = ApplyOp::Write {
                offset,
                data: data.clone(),
                fua: false,
            };
            e.submit(i as u64, op, &mut out);
            e.ready(&mut out);
        }
        while e.has_running() {
            e.completions(&mut out).await;
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(out.len(), offsets.len());
        assert!(out.iter().all(|a| a.result.is_ok()), "a write failed");
        offsets.len() as f64 / secs
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(3usize);
    // `cargo test --all-targets` runs benches with --bench absent: do one
    // tiny round so the code is exercised without taking time.
    let smoke = !args.iter().any(|a| a == "--bench");
    let quick = smoke || args.iter().any(|a| a == "--quick");
    let ns: &[usize] = if smoke { &[1, 2] } else { &[1, 2, 4, 8, 16] };
    let rounds = if smoke { 1 } else { rounds };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let dir = tempfile::tempdir().expect("scratch dir");
    let file = FileBackend::open(
        "bench",
        &FileOptions {
            path: dir.path().join("apply.img"),
            size: VOLUME,
            direct: true,
            create: true,
            read_only: false,
        },
    );
    let odirect: Option<Arc<dyn Backend>> = match file {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            println!("odirect: skipped ({e})");
            None
        }
    };
    let latency: Arc<dyn Backend> = Arc::new(FaultBackend::new(
        MemBackend::new("bench", VOLUME),
        Faults {
            write_latency: Some(Duration::from_micros(200)),
            ..Faults::default()
        },
    ));

    println!(
        "{:<8} {:<7} {:>3} {:>12} {:>8} {:>10}",
        "backend", "overlap", "N", "ops/s", "vs N=1", "per task"
    );
    let mut backends = vec![("latency", latency)];
    if let Some(o) = odirect {
        backends.push(("odirect", o));
    }
    for (bname, backend) in backends {
        for overlap in [0u64, 10] {
            let mut results: Vec<Vec<f64>> = vec![Vec::new(); ns.len()];
            for _ in 0..rounds {
                for (i, &n) in ns.iter().enumerate() {
                    // Enough ops that each run lasts ~0.3 s or more.
                    let ops = if quick {
                        200 * n.max(2)
                    } else {
                        1500 * n.max(2)
                    };
                    let offsets = stream(ops, overlap);
                    results[i].push(run(&rt, backend.clone(), n, &offsets));
                }
            }
            let base = median(results[0].clone());
            for (i, &n) in ns.iter().enumerate() {
                let m = median(results[i].clone());
                println!(
                    "{:<8} {:<7} {:>3} {:>12.0} {:>7.2}x {:>9.2}",
                    bname,
                    format!("{overlap}%"),
                    n,
                    m,
                    m / base,
                    m / base / n as f64
                );
            }
        }
    }
}
