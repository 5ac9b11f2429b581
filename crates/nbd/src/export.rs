//! What the server needs from the thing it exports.

use bytes::Bytes;
use std::future::Future;
use std::time::Duration;

use crate::proto::Errno;

/// The command kinds the server counts, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmdKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

impl CmdKind {
    pub const ALL: [CmdKind; 7] = [
        CmdKind::Read,
        CmdKind::Write,
        CmdKind::Flush,
        CmdKind::Trim,
        CmdKind::WriteZeroes,
        CmdKind::Cache,
        CmdKind::BlockStatus,
    ];

    /// Stable lower-case name, used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            CmdKind::Read => "read",
            CmdKind::Write => "write",
            CmdKind::Flush => "flush",
            CmdKind::Trim => "trim",
            CmdKind::WriteZeroes => "write_zeroes",
            CmdKind::Cache => "cache",
            CmdKind::BlockStatus => "block_status",
        }
    }

    /// The kind of a wire command type, if it is one we count.
    pub fn from_wire(kind: u16) -> Option<CmdKind> {
        use crate::proto::*;
        Some(match kind {
            CMD_READ => CmdKind::Read,
            CMD_WRITE => CmdKind::Write,
            CMD_FLUSH => CmdKind::Flush,
            CMD_TRIM => CmdKind::Trim,
            CMD_WRITE_ZEROES => CmdKind::WriteZeroes,
            CMD_CACHE => CmdKind::Cache,
            CMD_BLOCK_STATUS => CmdKind::BlockStatus,
            _ => return None,
        })
    }

    /// Dense index into [`CmdKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One extent of a base:allocation block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub len: u32,
    /// NBD_STATE_HOLE (1) | NBD_STATE_ZERO (2), or 0 for data.
    pub flags: u32,
}

/// An exported volume. The server range-checks every request against
/// [`Export::size`] before calling these, and never calls a write method on a
/// read-only export.
///
/// The futures should complete on their first poll when the work is cheap
/// (the server polls once inline and only spawns a task for futures that are
/// still pending), and should move slow work (fsync, O_DIRECT, uncached reads)
/// off the async worker threads.
pub trait Export: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Whether WRITE_ZEROES with FAST_ZERO can be honoured.
    fn fast_zeroes(&self) -> bool {
        false
    }
    /// How this export takes NBD_OPT_STARTTLS (used only when the
    /// [`crate::Exports`] have a TLS source).
    fn tls(&self) -> crate::tls::TlsMode {
        crate::tls::TlsMode::Off
    }

    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, Errno>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;
    /// Every write already answered, on any connection, becomes durable.
    fn flush(&self) -> impl Future<Output = Result<(), Errno>> + Send;
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;
    /// base:allocation extents starting at `offset`, covering a non-empty prefix of `len`.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<StatusExtent>, Errno>> + Send;

    /// Called when a client enters and leaves the transmission phase.
    fn connection_opened(&self) {}
    fn connection_closed(&self) {}

    /// Called once per completed request, for metrics.
    fn record(&self, _cmd: CmdKind, _bytes: u64, _latency: Duration, _ok: bool) {}
}
