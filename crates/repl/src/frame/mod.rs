//! Validated replication messages: [`Frame`], its encoder ([`Frame::encode`]
//! and the header-only encoders for data sent as its own iovec), its decoder
//! ([`Frame::from_parts`], [`FrameDecoder`]). The byte layout, header checks
//! and kinds are in [`crate::wire`]; this module gives the payloads meaning.

use bytes::{Buf, Bytes, BytesMut};

use crate::wire::*;

mod decode;
mod encode;
#[cfg(test)]
mod tests;

pub use encode::{encode_job_data_header, encode_write_header};

/// Why a peer ends the link (the code of an Error frame). Codes this build
/// does not know are kept as [`ErrorCode::Unknown`], so a newer peer's
/// reason is still reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The peer broke the protocol (malformed or unexpected frame).
    Protocol,
    /// The handshake's proof did not verify.
    AuthFailed,
    /// The mirror has no volume of the requested name.
    UnknownVolume,
    /// The mirror's volume is smaller than the primary's.
    MirrorTooSmall,
    /// No room for another link or job (a full job table).
    Busy,
    /// The sender is shutting down.
    ShuttingDown,
    /// The sender hit an internal error.
    Internal,
    Unknown(u32),
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::Protocol => 1,
            ErrorCode::AuthFailed => 2,
            ErrorCode::UnknownVolume => 3,
            ErrorCode::MirrorTooSmall => 4,
            ErrorCode::Busy => 5,
            ErrorCode::ShuttingDown => 6,
            ErrorCode::Internal => 7,
            ErrorCode::Unknown(c) => c,
        }
    }

    pub fn from_code(code: u32) -> ErrorCode {
        match code {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::AuthFailed,
            3 => ErrorCode::UnknownVolume,
            4 => ErrorCode::MirrorTooSmall,
            5 => ErrorCode::Busy,
            6 => ErrorCode::ShuttingDown,
            7 => ErrorCode::Internal,
            c => ErrorCode::Unknown(c),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Protocol => f.write_str("protocol error"),
            ErrorCode::AuthFailed => f.write_str("authentication failed"),
            ErrorCode::UnknownVolume => f.write_str("unknown volume"),
            ErrorCode::MirrorTooSmall => f.write_str("mirror too small"),
            ErrorCode::Busy => f.write_str("busy"),
            ErrorCode::ShuttingDown => f.write_str("shutting down"),
            ErrorCode::Internal => f.write_str("internal error"),
            ErrorCode::Unknown(c) => write!(f, "error code {c}"),
        }
    }
}

/// A validated replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Handshake messages; [`crate::handshake`] owns their payloads.
    Hello {
        payload: Bytes,
    },
    Challenge {
        payload: Bytes,
    },
    Auth {
        payload: Bytes,
    },
    Welcome {
        payload: Bytes,
    },
    /// Write `data` at `offset`.
    Write {
        id: u64,
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    /// Discard `len` bytes at `offset`.
    Trim {
        id: u64,
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Zero `len` bytes at `offset`; `may_trim` is false when the sender set
    /// NO_TRIM (the range must stay allocated).
    WriteZeroes {
        id: u64,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    },
    /// Make every acknowledged operation durable.
    Flush {
        id: u64,
    },
    /// An epoch boundary on an asynchronous link: nothing after it may be
    /// applied before everything before it is (and, with `durable`, is
    /// durable). Acknowledged when it lifts.
    Barrier {
        id: u64,
        durable: bool,
    },
    /// Request `id` completed.
    Ack {
        id: u64,
    },
    /// Request `id` failed with `errno` (an NBD error number).
    Nack {
        id: u64,
        errno: u32,
        message: String,
    },
    /// Fatal: the sender closes the link after this frame. `id` names the
    /// request that caused it, or is 0.
    Error {
        id: u64,
        code: ErrorCode,
        message: String,
    },
    Ping {
        id: u64,
    },
    Pong {
        id: u64,
    },
    /// Job request: the blake3 digest of each `block` bytes of
    /// `[offset, offset+len)` (the last block may be short). `link` 0 opens
    /// a new job.
    JobHash {
        id: u64,
        link: u64,
        offset: u64,
        len: u32,
        block: u32,
    },
    /// Job request: the data of `[offset, offset+len)` (remote read).
    JobRead {
        id: u64,
        link: u64,
        offset: u64,
        len: u32,
    },
    /// Job request: end the job; its slot is freed.
    JobClose {
        id: u64,
        link: u64,
    },
    /// Reply to JobHash: one digest per block.
    JobHashes {
        id: u64,
        link: u64,
        offset: u64,
        len: u32,
        block: u32,
        digests: Vec<[u8; DIGEST_LEN]>,
    },
    /// Reply to JobRead.
    JobData {
        id: u64,
        link: u64,
        offset: u64,
        data: Bytes,
    },
    /// Interim reply to JobRead (seed 002's "data not found"): the data is
    /// being fetched and follows in a JobData (or a JobError) for the same
    /// request id, without being asked again.
    JobNotReady {
        id: u64,
        link: u64,
        offset: u64,
        len: u32,
        retry_after_ms: u32,
    },
    /// Reply to JobClose.
    JobClosed {
        id: u64,
        link: u64,
    },
    /// A job request failed; the connection stays up.
    JobError {
        id: u64,
        link: u64,
        code: JobErrorCode,
        message: String,
    },
    /// The primary's view of the mirror's data (see [`SyncPhase`]).
    SyncState {
        id: u64,
        phase: SyncPhase,
        generation: u64,
        history: [u64; SYNC_HISTORY_LEN],
    },
    /// Hash `len` bytes of the mirror's data at `offset` (checksum resync).
    HashRequest {
        id: u64,
        offset: u64,
        len: u32,
    },
    /// The hash of request `id`'s range.
    HashReply {
        id: u64,
        hash: [u8; HASH_LEN],
    },
    /// The mirror's regions that may differ from the primary's data, as
    /// `(offset, len)` byte ranges: non-empty, ascending, disjoint. Sent
    /// right after the handshake, in as many frames as it takes (see
    /// [`divergence_frames`]); `last` marks the final one. `was_primary`:
    /// the mirror was a primary before it was demoted, and the ranges are
    /// what its out-of-sync bitmaps mark (writes its peers may lack).
    Divergence {
        was_primary: bool,
        last: bool,
        ranges: Vec<(u64, u64)>,
    },
}

/// Why a job request failed (the code of a JobError frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobErrorCode {
    /// The job table is full: no new job now (seed 002's posted error).
    Busy,
    /// The link id names no live job.
    UnknownLink,
    /// Fetching the data took longer than the job's deadline; the job is
    /// ended. Distinct from "not ready yet".
    Timeout,
    /// The mirror's backend failed.
    Io,
    /// The range is past the end of the mirror's volume.
    OutOfRange,
    /// The request's parameters are invalid (e.g. a hash block size).
    Invalid,
    Unknown(u32),
}

impl JobErrorCode {
    pub fn code(self) -> u32 {
        match self {
            JobErrorCode::Busy => 1,
            JobErrorCode::UnknownLink => 2,
            JobErrorCode::Timeout => 3,
            JobErrorCode::Io => 4,
            JobErrorCode::OutOfRange => 5,
            JobErrorCode::Invalid => 6,
            JobErrorCode::Unknown(c) => c,
        }
    }

    pub fn from_code(code: u32) -> JobErrorCode {
        match code {
            1 => JobErrorCode::Busy,
            2 => JobErrorCode::UnknownLink,
            3 => JobErrorCode::Timeout,
            4 => JobErrorCode::Io,
            5 => JobErrorCode::OutOfRange,
            6 => JobErrorCode::Invalid,
            c => JobErrorCode::Unknown(c),
        }
    }
}

impl std::fmt::Display for JobErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobErrorCode::Busy => f.write_str("busy (job table full)"),
            JobErrorCode::UnknownLink => f.write_str("unknown link id"),
            JobErrorCode::Timeout => f.write_str("timed out"),
            JobErrorCode::Io => f.write_str("I/O error"),
            JobErrorCode::OutOfRange => f.write_str("out of range"),
            JobErrorCode::Invalid => f.write_str("invalid request"),
            JobErrorCode::Unknown(c) => write!(f, "job error code {c}"),
        }
    }
}

/// Digests a JobHash of `len` bytes in blocks of `block` asks for.
pub fn hash_count(len: u32, block: u32) -> u32 {
    len.div_ceil(block.max(1))
}

/// What a [`Frame::SyncState`] announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncPhase {
    /// A resync starts: until it ends the mirror's image is inconsistent.
    Resyncing,
    /// Every region is copied and acknowledged: the mirror holds the
    /// primary's data of `generation` and adopts its record.
    InSync,
}

impl SyncPhase {
    pub fn code(self) -> u8 {
        match self {
            SyncPhase::Resyncing => 1,
            SyncPhase::InSync => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(SyncPhase::Resyncing),
            2 => Some(SyncPhase::InSync),
            _ => None,
        }
    }
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello { .. } => Kind::Hello,
            Frame::Challenge { .. } => Kind::Challenge,
            Frame::Auth { .. } => Kind::Auth,
            Frame::Welcome { .. } => Kind::Welcome,
            Frame::Write { .. } => Kind::Write,
            Frame::Trim { .. } => Kind::Trim,
            Frame::WriteZeroes { .. } => Kind::WriteZeroes,
            Frame::Flush { .. } => Kind::Flush,
            Frame::Barrier { .. } => Kind::Barrier,
            Frame::Ack { .. } => Kind::Ack,
            Frame::Nack { .. } => Kind::Nack,
            Frame::Error { .. } => Kind::Error,
            Frame::Ping { .. } => Kind::Ping,
            Frame::Pong { .. } => Kind::Pong,
            Frame::JobHash { .. } => Kind::JobHash,
            Frame::JobRead { .. } => Kind::JobRead,
            Frame::JobClose { .. } => Kind::JobClose,
            Frame::JobHashes { .. } => Kind::JobHashes,
            Frame::JobData { .. } => Kind::JobData,
            Frame::JobNotReady { .. } => Kind::JobNotReady,
            Frame::JobClosed { .. } => Kind::JobClosed,
            Frame::JobError { .. } => Kind::JobError,
            Frame::SyncState { .. } => Kind::SyncState,
            Frame::HashRequest { .. } => Kind::HashRequest,
            Frame::HashReply { .. } => Kind::HashReply,
            Frame::Divergence { .. } => Kind::Divergence,
        }
    }

    /// The request id (0 for handshake and Divergence frames).
    pub fn id(&self) -> u64 {
        match self {
            Frame::Hello { .. }
            | Frame::Challenge { .. }
            | Frame::Auth { .. }
            | Frame::Welcome { .. }
            | Frame::Divergence { .. } => 0,
            Frame::Write { id, .. }
            | Frame::Trim { id, .. }
            | Frame::WriteZeroes { id, .. }
            | Frame::Flush { id }
            | Frame::Barrier { id, .. }
            | Frame::Ack { id }
            | Frame::Nack { id, .. }
            | Frame::Error { id, .. }
            | Frame::Ping { id }
            | Frame::Pong { id }
            | Frame::SyncState { id, .. }
            | Frame::HashRequest { id, .. }
            | Frame::HashReply { id, .. } => *id,
            Frame::JobHash { id, .. }
            | Frame::JobRead { id, .. }
            | Frame::JobClose { id, .. }
            | Frame::JobHashes { id, .. }
            | Frame::JobData { id, .. }
            | Frame::JobNotReady { id, .. }
            | Frame::JobClosed { id, .. }
            | Frame::JobError { id, .. } => *id,
        }
    }

    /// Builds a frame from a header and its payload: validates the header,
    /// checks the payload's length and checksum, and parses it.
    pub fn from_parts(h: &RawHeader, payload: Bytes) -> Result<Frame, WireError> {
        let kind = h.validate()?;
        Frame::build(kind, h, payload)
    }
}

/// Cuts a region list into Divergence frames: always at least one (an
/// empty list is one frame without ranges), at most
/// [`MAX_DIVERGENCE_RANGES`] ranges each, `last` set only on the final one.
///
/// `ranges` must be what a receiver accepts: each `(offset, len)` non-empty
/// and within u64, sorted by offset, none overlapping the next
/// (`next.offset >= prev.offset + prev.len`; touching is fine). The frames
/// then carry them in order, so the order also holds across frames.
/// Checked in debug builds only.
pub fn divergence_frames(was_primary: bool, ranges: &[(u64, u64)]) -> Vec<Frame> {
    debug_assert_eq!(check_divergence_ranges(ranges), Ok(()));
    if ranges.is_empty() {
        return vec![Frame::Divergence {
            was_primary,
            last: true,
            ranges: Vec::new(),
        }];
    }
    let n = ranges.len().div_ceil(MAX_DIVERGENCE_RANGES);
    ranges
        .chunks(MAX_DIVERGENCE_RANGES)
        .enumerate()
        .map(|(i, chunk)| Frame::Divergence {
            was_primary,
            last: i + 1 == n,
            ranges: chunk.to_vec(),
        })
        .collect()
}

/// Why `ranges` may not be sent in a Divergence frame, if they may not:
/// an empty range, one past u64, or one that does not start at or after
/// the end of the one before.
fn check_divergence_ranges(ranges: &[(u64, u64)]) -> Result<(), RangeError> {
    let mut prev_end: Option<u64> = None;
    for (index, &(offset, len)) in ranges.iter().enumerate() {
        if len == 0 {
            return Err(RangeError::Empty { index, offset });
        }
        let end = offset
            .checked_add(len)
            .ok_or(RangeError::Overflow { index, offset, len })?;
        if let Some(prev_end) = prev_end {
            if offset < prev_end {
                return Err(RangeError::Overlap {
                    index,
                    offset,
                    prev: index - 1,
                    prev_end,
                });
            }
        }
        prev_end = Some(end);
    }
    Ok(())
}

/// Cuts frames out of a byte stream's buffer.
///
/// Bound to one stream: it remembers a header whose payload has not fully
/// arrived. After an error the stream is out of step and must be closed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// A validated header whose payload is still arriving (its 40 bytes are
    /// already consumed from the buffer).
    pending: Option<(RawHeader, Kind)>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next whole frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` while the frame is incomplete: that is a normal
    /// state, the caller reads more and calls again. The header is checked
    /// as soon as its 40 bytes are in, before the payload is waited for; a
    /// header that passes reserves room in `buf` for exactly its (bounded)
    /// payload. The payload is taken without copying (`split_to().freeze()`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let (h, kind) = match self.pending {
            Some(p) => p,
            None => {
                let Some(head) = buf.get(..HEADER_LEN) else {
                    return Ok(None);
                };
                let h = RawHeader::decode(head.try_into().expect("HEADER_LEN bytes"))?;
                let kind = h.validate()?;
                buf.advance(HEADER_LEN);
                self.pending = Some((h, kind));
                (h, kind)
            }
        };
        let need = h.payload_len as usize;
        if buf.len() < need {
            buf.reserve(need - buf.len());
            return Ok(None);
        }
        self.pending = None;
        let payload = buf.split_to(need).freeze();
        Frame::build(kind, &h, payload).map(Some)
    }

    /// True when a frame has been started (its header consumed) but not
    /// finished: EOF now would cut a frame.
    pub fn is_mid_frame(&self) -> bool {
        self.pending.is_some()
    }
}
