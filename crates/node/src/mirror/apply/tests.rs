//! Tests of the apply engine: order on overlapping ranges, parallelism
//! elsewhere, barriers, and a model check of random streams.
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
