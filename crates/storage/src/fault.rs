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
}

/// A [`Backend`] that forwards to `inner` after injecting [`Faults`].
#[derive(Debug)]
pub struct FaultBackend<B: Backend> {
    inner: B,
    faults: Mutex<Faults>,
    injected: AtomicU64,
}

impl<B: Backend> FaultBackend<B> {
    /// Wraps `inner` with the given faults.
    pub fn new(inner: B, faults: Faults) -> Self {
        Self {
            inner,
            faults: Mutex::new(faults),
            injected: AtomicU64::new(0),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// A copy of the current faults.
    pub fn faults(&self) -> Faults {
        self.lock().clone()
    }

    /// Replaces all faults.
    pub fn set_faults(&self, faults: Faults) {
        *self.lock() = faults;
    }

    /// Changes faults in place.
    pub fn update(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.lock());
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

    fn lock(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
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
        let (latency, errno) = {
            let mut f = self.lock();
            let errno = if f.fail_writes > 0 {
                f.fail_writes -= 1;
                Some(f.fail_writes_errno)
            } else {
                f.fail_write_range
                    .as_ref()
                    .filter(|(r, _)| overlaps(r, offset, len))
                    .map(|(_, e)| *e)
            };
            (f.write_latency, errno)
        };
        sleep(latency);
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
        let (latency, errno) = {
            let f = self.lock();
            (f.read_latency, Self::read_fault(&f, offset, len))
        };
        sleep(latency);
        match errno {
            Some(e) => Err(self.fail(Op::Read, offset, len, e)),
            None => self.inner.read_at(buf, offset),
        }
    }

    /// `Ok(false)` while read latency is set or a read fault covers the
    /// range (so `read_at` applies them); otherwise forwards.
    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        {
            let f = self.lock();
            if f.read_latency.is_some() || Self::read_fault(&f, offset, buf.len() as u64).is_some()
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
        let (latency, fail) = {
            let f = self.lock();
            (f.write_latency, f.fail_flush)
        };
        sleep(latency);
        if fail {
            return Err(self.fail(Op::Flush, 0, self.size(), errno::EIO));
        }
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        sleep(self.lock().write_latency);
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
        let f = self.lock();
        f.read_latency.is_none() && f.write_latency.is_none() && self.inner.is_fast()
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
