//! A wrapper that injects latency and errors into another backend.
//!
//! Faults can be changed at any time from any thread; each call reads the
//! configuration once when it starts. Latency is a `std::thread::sleep`, so
//! [`FaultBackend::is_fast`](Backend::is_fast) is false while any latency is
//! set, and callers then run the backend off their async runtime.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::{Backend, Extent, Op, Result, StorageError};

/// Error numbers commonly injected (Linux values).
pub mod errno {
    /// I/O error.
    pub const EIO: i32 = rustix::io::Errno::IO.raw_os_error();
    /// No space left on device.
    pub const ENOSPC: i32 = rustix::io::Errno::NOSPC.raw_os_error();
    /// Disk quota exceeded.
    pub const EDQUOT: i32 = rustix::io::Errno::DQUOT.raw_os_error();
}

/// What a [`FaultBackend`] injects. `Default` injects nothing.
///
/// "Writes" here are `write_at` and `write_zeroes` (the calls that store
/// data); `trim` is never failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Sleep before every read (`read_at`).
    pub read_latency: Option<Duration>,
    /// Sleep before every write, trim and flush.
    pub write_latency: Option<Duration>,
    /// Fail this many next writes (counting down) with `fail_writes_errno`.
    pub fail_writes: u32,
    /// Error number for `fail_writes` (0 means EIO).
    pub fail_writes_errno: i32,
    /// Fail every write overlapping this byte range with this error number.
    pub fail_write_range: Option<(Range<u64>, i32)>,
    /// Fail every read overlapping this byte range with this error number.
    pub fail_read_range: Option<(Range<u64>, i32)>,
    /// Fail every flush with EIO.
    pub fail_flush: bool,
    /// Seeded random faults on top of the fixed ones.
    pub random: Option<RandomFaults>,
}

/// Faults drawn per call from a seeded generator: each write fails with EIO
/// or ENOSPC, and each read, write or flush has a latency spike, with the
/// given probabilities (in parts per million). For a given sequence of calls
/// a seed gives the same faults; concurrent callers draw in the order they
/// take the backend's lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RandomFaults {
    pub seed: u64,
    pub eio_ppm: u32,
    pub enospc_ppm: u32,
    pub spike_ppm: u32,
    /// How long a spike sleeps.
    pub spike: Duration,
}

impl RandomFaults {
    /// What a call with draws `(fail, spike)` gets: an errno to fail with,
    /// and whether it sleeps a spike.
    fn judge(&self, fail: u64, spike: u64, write: bool) -> (Option<i32>, Option<Duration>) {
        let fail = fail % 1_000_000;
        let eio = u64::from(self.eio_ppm);
        let errno = if !write {
            None
        } else if fail < eio {
            Some(errno::EIO)
        } else if fail < eio + u64::from(self.enospc_ppm) {
            Some(errno::ENOSPC)
        } else {
            None
        };
        let spike = (spike % 1_000_000 < u64::from(self.spike_ppm) && !self.spike.is_zero())
            .then_some(self.spike);
        (errno, spike)
    }
}

/// SplitMix64 step (the generator `crates/sim` and the testkit use).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The fixed faults and the random generator's state, under one lock.
#[derive(Debug)]
struct State {
    faults: Faults,
    rng: u64,
}

impl State {
    fn new(faults: Faults) -> Self {
        let rng = faults.random.map_or(0, |r| r.seed ^ 0x9e37_79b9_7f4a_7c15);
        Self { faults, rng }
    }

    /// Draws the random faults of one call.
    fn draw(&mut self, write: bool) -> (Option<i32>, Option<Duration>) {
        match self.faults.random {
            None => (None, None),
            Some(r) => {
                let fail = splitmix(&mut self.rng);
                let spike = splitmix(&mut self.rng);
                r.judge(fail, spike, write)
            }
        }
    }
}

/// A [`Backend`] that forwards to `inner` after injecting [`Faults`].
#[derive(Debug)]
pub struct FaultBackend<B: Backend> {
    inner: B,
    state: Mutex<State>,
    injected: AtomicU64,
}

impl<B: Backend> FaultBackend<B> {
    /// Wraps `inner` with the given faults.
    pub fn new(inner: B, faults: Faults) -> Self {
        Self {
            inner,
            state: Mutex::new(State::new(faults)),
            injected: AtomicU64::new(0),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// A copy of the current faults.
    pub fn faults(&self) -> Faults {
        self.state().faults.clone()
    }

    /// Replaces all faults (and restarts the random generator from the
    /// new faults' seed).
    pub fn set_faults(&self, faults: Faults) {
        *self.state() = State::new(faults);
    }

    /// Changes faults in place (the random generator keeps its place).
    pub fn update(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.state().faults);
    }

    /// Removes every fault and latency.
    pub fn clear(&self) {
        self.set_faults(Faults::default());
    }

    /// Fails the next `n` writes with `errno`.
    pub fn fail_next_writes(&self, n: u32, errno: i32) {
        self.update(|f| {
            f.fail_writes = n;
            f.fail_writes_errno = errno;
        });
    }

    /// Fails writes overlapping `range` with `errno`; `None` stops it.
    pub fn fail_writes_in(&self, range: Option<Range<u64>>, errno: i32) {
        self.update(|f| f.fail_write_range = range.map(|r| (r, errno)));
    }

    /// Fails reads overlapping `range` with `errno`; `None` stops it.
    pub fn fail_reads_in(&self, range: Option<Range<u64>>, errno: i32) {
        self.update(|f| f.fail_read_range = range.map(|r| (r, errno)));
    }

    /// Makes flushes fail with EIO (or succeed again).
    pub fn set_fail_flush(&self, fail: bool) {
        self.update(|f| f.fail_flush = fail);
    }

    /// Sets the latency added to each read.
    pub fn set_read_latency(&self, latency: Option<Duration>) {
        self.update(|f| f.read_latency = latency);
    }

    /// Sets the latency added to each write, trim and flush.
    pub fn set_write_latency(&self, latency: Option<Duration>) {
        self.update(|f| f.write_latency = latency);
    }

    /// How many errors have been injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, op: Op, offset: u64, len: u64, errno: i32) -> StorageError {
        self.injected.fetch_add(1, Ordering::Relaxed);
        let errno = if errno == 0 { errno::EIO } else { errno };
        StorageError::new(
            self.inner.volume(),
            op,
            offset,
            len,
            io::Error::from_raw_os_error(errno),
        )
    }

    /// Applies write faults: sleeps, then returns the injected error if any.
    fn before_write(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        let (latency, errno, spike) = {
            let mut st = self.state();
            let (random, spike) = st.draw(true);
            let f = &mut st.faults;
            let errno = if f.fail_writes > 0 {
                f.fail_writes -= 1;
                Some(f.fail_writes_errno)
            } else {
                f.fail_write_range
                    .as_ref()
                    .filter(|(r, _)| overlaps(r, offset, len))
                    .map(|(_, e)| *e)
                    .or(random)
            };
            (f.write_latency, errno, spike)
        };
        sleep(latency);
        sleep(spike);
        match errno {
            Some(e) => Err(self.fail(op, offset, len, e)),
            None => Ok(()),
        }
    }

    fn read_fault(f: &Faults, offset: u64, len: u64) -> Option<i32> {
        f.fail_read_range
            .as_ref()
            .filter(|(r, _)| overlaps(r, offset, len))
            .map(|(_, e)| *e)
    }
}

impl<B: Backend> Backend for FaultBackend<B> {
    fn volume(&self) -> &str {
        self.inner.volume()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let (latency, errno, spike) = {
            let mut st = self.state();
            let (_, spike) = st.draw(false);
            let f = &st.faults;
            (f.read_latency, Self::read_fault(f, offset, len), spike)
        };
        sleep(latency);
        sleep(spike);
        match errno {
            Some(e) => Err(self.fail(Op::Read, offset, len, e)),
            None => self.inner.read_at(buf, offset),
        }
    }

    /// `Ok(false)` while read latency is set or a read fault covers the
    /// range (so `read_at` applies them); otherwise forwards.
    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        {
            let st = self.state();
            let f = &st.faults;
            if f.read_latency.is_some()
                || f.random.is_some()
                || Self::read_fault(f, offset, buf.len() as u64).is_some()
            {
                return Ok(false);
            }
        }
        self.inner.try_read_at_nowait(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.before_write(Op::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset, fua)
    }

    fn flush(&self) -> Result<()> {
        let (latency, fail, spike) = {
            let mut st = self.state();
            let (_, spike) = st.draw(false);
            (st.faults.write_latency, st.faults.fail_flush, spike)
        };
        sleep(latency);
        sleep(spike);
        if fail {
            return Err(self.fail(Op::Flush, 0, self.size(), errno::EIO));
        }
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        sleep(self.state().faults.write_latency);
        self.inner.trim(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.before_write(Op::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }

    fn fast_zeroes(&self) -> bool {
        self.inner.fast_zeroes()
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.allocation(offset, len)
    }

    /// The inner backend's answer, but false while any latency is set.
    fn is_fast(&self) -> bool {
        let st = self.state();
        let f = &st.faults;
        f.read_latency.is_none()
            && f.write_latency.is_none()
            && f.random.is_none()
            && self.inner.is_fast()
    }
}

fn overlaps(r: &Range<u64>, offset: u64, len: u64) -> bool {
    len > 0 && offset < r.end && r.start < offset.saturating_add(len)
}

fn sleep(latency: Option<Duration>) {
    if let Some(d) = latency {
        std::thread::sleep(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBackend;
    use std::time::Instant;

    fn backend() -> FaultBackend<MemBackend> {
        FaultBackend::new(MemBackend::new("fv", 1 << 16), Faults::default())
    }

    #[test]
    fn passthrough() {
        let b = backend();
        assert!(b.is_fast() && b.fast_zeroes());
        assert_eq!(b.volume(), "fv");
        assert_eq!(b.size(), 1 << 16);
        b.write_at(&[1; 10], 5, false).unwrap();
        b.write_zeroes(6, 2, false, false).unwrap();
        b.trim(9, 1).unwrap();
        b.flush().unwrap();
        let mut buf = [9u8; 12];
        assert!(b.try_read_at_nowait(&mut buf, 4).unwrap());
        assert_eq!(buf, [0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1, 0]);
        assert_eq!(b.inner().snapshot()[4..16], buf);
        assert_eq!(b.injected(), 0);
    }

    #[test]
    fn enospc_in_range_carries_context() {
        let b = backend();
        b.fail_writes_in(Some(4096..8192), errno::ENOSPC);
        b.write_at(&[1; 4096], 0, false).unwrap();
        let e = b.write_at(&[1; 100], 8000, true).unwrap_err();
        assert!(e.is_no_space());
        assert_eq!(e.errno(), errno::ENOSPC);
        assert_eq!(
            (e.volume.as_str(), e.op, e.offset, e.len),
            ("fv", Op::Write, 8000, 100)
        );
        let e = b.write_zeroes(4095, 2, false, false).unwrap_err();
        assert_eq!(e.op, Op::WriteZeroes);
        b.write_at(&[1; 1], 8192, false).unwrap();
        b.trim(4096, 4096).unwrap();
        assert_eq!(
            b.inner().snapshot()[8000],
            0,
            "failed write must not reach inner"
        );
        assert_eq!(b.injected(), 2);
        b.fail_writes_in(None, 0);
        b.write_at(&[1; 100], 8000, false).unwrap();
    }

    #[test]
    fn fail_next_writes_counts_down() {
        let b = backend();
        b.fail_next_writes(2, errno::EIO);
        let e = b.write_at(&[1], 0, false).unwrap_err();
        assert_eq!(e.errno(), errno::EIO);
        assert!(!e.is_no_space());
        assert!(b.write_zeroes(0, 1, false, false).is_err());
        b.write_at(&[1], 0, false).unwrap();
        assert_eq!(b.faults().fail_writes, 0);
    }

    #[test]
    fn read_and_flush_faults() {
        let b = backend();
        b.fail_reads_in(Some(100..101), errno::EIO);
        let mut buf = [0u8; 10];
        b.read_at(&mut buf, 0).unwrap();
        assert!(!b.try_read_at_nowait(&mut buf, 95).unwrap());
        let e = b.read_at(&mut buf, 95).unwrap_err();
        assert_eq!((e.op, e.offset, e.len), (Op::Read, 95, 10));
        b.set_fail_flush(true);
        assert_eq!(b.flush().unwrap_err().op, Op::Flush);
        b.clear();
        b.flush().unwrap();
        b.read_at(&mut buf, 95).unwrap();
    }

    #[test]
    fn latency() {
        let b = backend();
        b.set_write_latency(Some(Duration::from_millis(20)));
        assert!(!b.is_fast());
        let t = Instant::now();
        b.write_at(&[1], 0, false).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(20));
        b.update(|f| {
            f.write_latency = None;
            f.read_latency = Some(Duration::from_millis(20));
        });
        assert!(!b.is_fast());
        let mut buf = [0u8; 1];
        assert!(!b.try_read_at_nowait(&mut buf, 0).unwrap());
        let t = Instant::now();
        b.read_at(&mut buf, 0).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert_eq!(buf, [1]);
        b.set_read_latency(None);
        assert!(b.is_fast());
    }

    #[test]
    fn random_faults_replay_from_their_seed() {
        let random = RandomFaults {
            seed: 99,
            eio_ppm: 100_000,
            enospc_ppm: 100_000,
            spike_ppm: 0,
            spike: Duration::ZERO,
        };
        let run = |seed| {
            let b = backend();
            b.set_faults(Faults {
                random: Some(RandomFaults { seed, ..random }),
                ..Faults::default()
            });
            assert!(!b.is_fast());
            (0..400)
                .map(|i| b.write_at(&[1], i, false).err().map(|e| e.errno()))
                .collect::<Vec<_>>()
        };
        let a = run(99);
        assert_eq!(a, run(99), "a seed replays");
        assert_ne!(a, run(100));
        let eio = a.iter().filter(|e| **e == Some(errno::EIO)).count();
        let enospc = a.iter().filter(|e| **e == Some(errno::ENOSPC)).count();
        // 10% each of 400: far from 0 and from 400.
        assert!((10..80).contains(&eio), "{eio} EIO");
        assert!((10..80).contains(&enospc), "{enospc} ENOSPC");
        // Reads and flushes never fail from the random faults.
        let b = backend();
        b.set_faults(Faults {
            random: Some(random),
            ..Faults::default()
        });
        let mut buf = [0u8; 4];
        for _ in 0..100 {
            b.read_at(&mut buf, 0).unwrap();
            b.flush().unwrap();
        }
        b.clear();
        assert!(b.is_fast());
        b.write_at(&[1], 0, false).unwrap();
    }

    #[test]
    fn random_latency_spikes() {
        let b = backend();
        b.set_faults(Faults {
            random: Some(RandomFaults {
                seed: 1,
                spike_ppm: 1_000_000,
                spike: Duration::from_millis(15),
                ..RandomFaults::default()
            }),
            ..Faults::default()
        });
        let t = Instant::now();
        b.write_at(&[1], 0, false).unwrap();
        let mut buf = [0u8; 1];
        b.read_at(&mut buf, 0).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(b.injected(), 0, "a spike is not an error");
    }

    #[test]
    fn shared_across_threads() {
        let b = std::sync::Arc::new(backend());
        b.fail_next_writes(50, errno::EIO);
        let failed: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|t| {
                    let b = &b;
                    s.spawn(move || {
                        (0..100)
                            .filter(|i| b.write_at(&[1], t * 100 + i, false).is_err())
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(failed, 50);
        assert_eq!(b.injected(), 50);
    }
}
