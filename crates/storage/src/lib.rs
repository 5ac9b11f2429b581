//! Storage backends: where a volume's bytes live.
//!
//! A [`Backend`] is a fixed-size byte array with positional, concurrent I/O.
//! Methods are synchronous: the caller decides where they run (inline on an
//! async task when [`Backend::is_fast`] says the call will not block for long,
//! or on a blocking thread pool otherwise).
//!
//! - [`file`]: a regular file (created sparse) or a block device, optionally O_DIRECT.
//! - [`mem`]: an in-memory backend for tests.
//! - [`durable`]: the durable small-file write path of every on-disk format
//!   (replace by rename, pwrite + fdatasync) and a recorder of it for
//!   crash-point tests.
//! - [`fault`]: a wrapper that injects latency and errors, for tests and benchmarks.

pub mod durable;
pub mod error;
pub mod fault;
pub mod file;
pub mod mem;

pub use error::{Op, StorageError};
pub use fault::{FaultBackend, Faults};
pub use file::{FileBackend, FileOptions};
pub use mem::MemBackend;

/// Result of backend calls.
pub type Result<T> = std::result::Result<T, StorageError>;

/// One run of the allocation map reported by [`Backend::allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// True when the run is a hole (unallocated; reads as zeroes).
    pub hole: bool,
}

/// A volume's storage. Every method may be called from many threads at once.
///
/// Offsets and lengths have been range-checked by the caller against
/// [`Backend::size`]; a backend may still fail with an I/O error.
pub trait Backend: Send + Sync + 'static {
    /// The volume name, for error context.
    fn volume(&self) -> &str;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Fills `buf` from `offset` only if that needs no wait for the disk
    /// (page-cache hit). `Ok(false)` means "would block: use `read_at` off the
    /// async runtime". The default never tries.
    fn try_read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> Result<bool> {
        Ok(false)
    }

    /// Writes `buf` at `offset`; with `fua`, the data is durable on return.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> Result<()>;

    /// Discards a range (a hint: contents afterwards are unspecified, but
    /// backends here punch holes, so the range reads as zeroes).
    fn trim(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes a range read back as zeroes. With `may_trim`, the backend may
    /// deallocate it. With `fua`, durable on return.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()>;

    /// Whether `write_zeroes` is cheap (no data written): NBD's FAST_ZERO.
    fn fast_zeroes(&self) -> bool {
        false
    }

    /// Allocation status of `[offset, offset+len)`: extents covering at least
    /// a prefix of the range, in order. The default reports all data.
    fn allocation(&self, _offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent { len, hole: false }])
    }

    /// True when reads and writes normally finish in microseconds (buffered
    /// I/O to the page cache), so the caller may run them inline.
    fn is_fast(&self) -> bool {
        false
    }
}
