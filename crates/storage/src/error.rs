//! Typed storage errors that carry the volume, operation and range they concern.

use std::io;
use thiserror::Error;

/// The backend operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Allocation,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write-zeroes",
            Op::Allocation => "allocation",
        };
        f.write_str(s)
    }
}

/// A backend I/O failure.
///
/// Its message includes the cause, so it is not also reported as `source()`
/// (error reporters would print the cause twice).
#[derive(Debug, Error)]
pub struct StorageError {
    pub volume: String,
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub cause: io::Error,
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.op {
            Op::Open => write!(f, "volume {}: open: {}", self.volume, self.cause),
            op => write!(
                f,
                "volume {}: {op} at offset {} length {}: {}",
                self.volume, self.offset, self.len, self.cause
            ),
        }
    }
}

impl StorageError {
    pub fn new(volume: &str, op: Op, offset: u64, len: u64, source: io::Error) -> Self {
        Self {
            volume: volume.to_owned(),
            op,
            offset,
            len,
            cause: source,
        }
    }

    /// The OS error number, or EIO when the error has none.
    pub fn errno(&self) -> i32 {
        self.cause
            .raw_os_error()
            .unwrap_or(rustix::io::Errno::IO.raw_os_error())
    }

    /// True for "out of space" (ENOSPC, EDQUOT), which NBD reports as ENOSPC.
    pub fn is_no_space(&self) -> bool {
        let e = self.errno();
        e == rustix::io::Errno::NOSPC.raw_os_error() || e == rustix::io::Errno::DQUOT.raw_os_error()
    }
}
