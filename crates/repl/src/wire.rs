//! The wire's lowest layer: the frame header layout and its constants, frame
//! kinds and their shapes, the header codec ([`RawHeader`]), the compression
//! codec names and flags ([`Codec`]), and [`WireError`]. Everything above it
//! ([`crate::compress`], [`crate::frame`]) builds on this module, and this
//! module on nothing in the crate.
//!
//! ## Frame byte layout
//!
//! Every frame is a 40-byte header followed by `payload_len` bytes of
//! payload. All integers are big-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `0x424D5250` ("BMRP") |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | kind (see [`Kind`]) |
//! | 6 | 2 | flags ([`FLAG_FUA`], [`FLAG_NO_TRIM`], [`FLAG_LZ4`], [`FLAG_ZSTD`]; which are allowed depends on the kind) |
//! | 8 | 8 | id: the request id; 0 for handshake and Divergence frames |
//! | 16 | 8 | offset: byte offset of a Write, Trim or WriteZeroes; 0 otherwise |
//! | 24 | 4 | len: bytes written, trimmed or zeroed; the payload length for frames with a payload (for a compressed Write: the data's length before compression); 0 otherwise |
//! | 28 | 4 | payload_len |
//! | 32 | 4 | payload crc32c |
//! | 36 | 4 | header crc32c, over bytes 0..36 |
//!
//! | kind | code | id | flags | payload |
//! |---|---|---|---|---|
//! | Hello | 1 | 0 | none | handshake message, <= [`MAX_CONTROL_PAYLOAD`] |
//! | Challenge | 2 | 0 | none | handshake message |
//! | Auth | 3 | 0 | none | handshake message |
//! | Welcome | 4 | 0 | none | handshake message |
//! | Write | 16 | request | FUA, LZ4 or ZSTD | the data, <= [`MAX_DATA`], `len` equals it; with LZ4 or ZSTD the data compressed, shorter than `len` (see [`crate::compress`]) |
//! | Trim | 17 | request | FUA | none |
//! | WriteZeroes | 18 | request | FUA, NO_TRIM | none |
//! | Flush | 19 | request | none | none |
//! | Barrier | 20 | request, or 0: not answered | FUA | none: an epoch boundary of an asynchronous link (FUA: durable) |
//! | Ack | 32 | echoed | none | none |
//! | Nack | 33 | echoed | none | u32 errno, then a UTF-8 message |
//! | Error | 34 | request or 0 | none | u32 [`ErrorCode`](crate::ErrorCode), then a UTF-8 message; fatal |
//! | Ping | 48 | any | none | none |
//! | Pong | 49 | echoed | none | none |
//! | JobHash | 64 | request | none | link id u64, block u32 (offset/len: the range) |
//! | JobRead | 65 | request | none | link id u64 (offset/len: the range, len <= [`MAX_DATA`]) |
//! | JobClose | 66 | request | none | link id u64 |
//! | JobHashes | 67 | echoed | none | link id u64, block u32, one 32-byte blake3 digest per block |
//! | JobData | 68 | echoed | none | link id u64, then `len` bytes of data |
//! | JobNotReady | 69 | echoed | none | link id u64, retry_after_ms u32 |
//! | JobClosed | 70 | echoed | none | link id u64 |
//! | JobError | 71 | echoed | none | link id u64, u32 [`JobErrorCode`](crate::JobErrorCode), UTF-8 message |
//! | SyncState | 80 | request | none | exactly [`SYNC_STATE_LEN`] bytes: u8 state (1 resyncing, 2 in sync), u64 generation, 4 x u64 history |
//! | HashRequest | 81 | request | none | none; offset and len are the range to hash (checksum resync) |
//! | HashReply | 82 | echoed | none | exactly [`HASH_LEN`] bytes: the BLAKE3 hash of the mirror's range |
//! | Divergence | 83 | 0 | none | u8 flags (bit 0 was_primary, bit 1 last), 3 zero bytes, u32 count, count x (u64 offset, u64 len): non-empty ranges, ascending, disjoint; <= [`MAX_CONTROL_PAYLOAD`] (see [`divergence_frames`](crate::divergence_frames)) |
//!
//! The job kinds (64 and up) travel on a *job connection*: one the primary
//! opened for verify and remote reads (see [`crate::handshake::Purpose`]),
//! never on the replication link. Each request names its job by a link id
//! (seed 002); the invalid link id 0 asks the mirror for a new job, and
//! every reply carries the link id of the job that answered. For every job
//! kind except JobClose, JobClosed and JobError, offset and len are a byte
//! range; for those three they must be zero.
//!
//! Fields a kind does not use must be zero, so each frame has exactly one
//! encoding. Decoding is two steps: [`RawHeader::decode`] judges magic,
//! version and header checksum; [`RawHeader::validate`] judges the kind, its
//! flags, its fields and its payload length against the kind's limit, all
//! before the payload is read, so a forged length never makes the receiver
//! allocate. [`Frame::from_parts`](crate::Frame::from_parts) then checks the payload checksum and
//! parses the payload.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

/// "BMRP": the first four bytes of every frame.
pub const MAGIC: u32 = 0x424D_5250;
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 40;
/// Largest Write payload: the NBD front end's largest request (32 MiB), so
/// one host write is at most one frame.
pub const MAX_DATA: u32 = 32 * 1024 * 1024;
/// Largest payload of a handshake, Nack or Error frame.
pub const MAX_CONTROL_PAYLOAD: u32 = 64 * 1024;

/// Write, Trim, WriteZeroes: durable on the mirror before the Ack.
pub const FLAG_FUA: u16 = 1 << 0;
/// WriteZeroes: the mirror must allocate the zeroed range, not punch a hole.
pub const FLAG_NO_TRIM: u16 = 1 << 1;
/// Write: the payload is LZ4 block data that expands to `len` bytes.
pub const FLAG_LZ4: u16 = 1 << 2;
/// Write: the payload is a zstd frame that expands to `len` bytes.
pub const FLAG_ZSTD: u16 = 1 << 3;

/// Bytes of the header covered by the header checksum.
const HEADER_CRC_SPAN: usize = HEADER_LEN - 4;
/// Bytes of a Nack or Error payload before its message.
pub(crate) const CODE_LEN: usize = 4;
/// Bytes of the link id at the start of every job payload.
pub const LINK_LEN: usize = 8;
/// Most digests one JobHash may ask for (so a JobHashes payload stays
/// within [`MAX_CONTROL_PAYLOAD`] plus its 12-byte prefix).
pub const MAX_JOB_HASHES: u32 = 2048;
/// Smallest and largest block a JobHash may ask to be hashed by.
pub const MIN_HASH_BLOCK: u32 = 4096;
pub const MAX_HASH_BLOCK: u32 = 16 << 20;
/// Length of a blake3 digest.
pub const DIGEST_LEN: usize = 32;
/// Bytes of a Divergence payload before its ranges: flags, 3 reserved
/// bytes, count.
pub(crate) const DIVERGENCE_PREFIX: usize = 8;
/// Bytes of one Divergence range: u64 offset, u64 len.
pub(crate) const DIVERGENCE_RANGE_LEN: usize = 16;
/// Most ranges one Divergence frame carries (its payload stays within
/// [`MAX_CONTROL_PAYLOAD`]).
pub const MAX_DIVERGENCE_RANGES: usize =
    (MAX_CONTROL_PAYLOAD as usize - DIVERGENCE_PREFIX) / DIVERGENCE_RANGE_LEN;
/// Divergence payload flags: the sender was a primary before it was demoted.
pub(crate) const DIVERGENCE_WAS_PRIMARY: u8 = 1 << 0;
/// Divergence payload flags: the sender's last Divergence frame.
pub(crate) const DIVERGENCE_LAST: u8 = 1 << 1;

/// Length of a [`Frame::HashReply`](crate::Frame::HashReply) payload (a BLAKE3 hash).
pub const HASH_LEN: usize = 32;

/// Generation ids a SyncState frame carries besides the current one.
pub const SYNC_HISTORY_LEN: usize = 4;
/// The exact payload length of a SyncState frame.
pub const SYNC_STATE_LEN: u32 = 1 + 8 + 8 * SYNC_HISTORY_LEN as u32;

/// A frame's kind: the byte at offset 5.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Hello = 1,
    Challenge = 2,
    Auth = 3,
    Welcome = 4,
    Write = 16,
    Trim = 17,
    WriteZeroes = 18,
    Flush = 19,
    Barrier = 20,
    Ack = 32,
    Nack = 33,
    Error = 34,
    Ping = 48,
    Pong = 49,
    JobHash = 64,
    JobRead = 65,
    JobClose = 66,
    JobHashes = 67,
    JobData = 68,
    JobNotReady = 69,
    JobClosed = 70,
    JobError = 71,
    /// The primary tells its mirror how its data relates to the primary's
    /// (resync starting, or in sync at a generation); acknowledged once stored.
    SyncState = 80,
    /// Checksum resync (DRBD's csums-alg): the primary asks for the hash of
    /// a range of the mirror's data before deciding to send it.
    HashRequest = 81,
    /// The mirror's answer: the BLAKE3 hash of that range.
    HashReply = 82,
    /// Right after the handshake, the mirror lists the regions where its
    /// data may differ from the primary's (for a demoted primary: what its
    /// out-of-sync bitmaps mark), so the primary copies them too.
    Divergence = 83,
}

/// How a kind uses the header's id, offset and len fields and its payload.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// id, offset and len are all zero; payload_len = 0.
    Bare { id_zero: bool },
    /// offset zero; len = payload_len <= max.
    Control { id_zero: bool },
    /// offset and len are a range; payload_len = 0.
    Range,
    /// offset is a range start; len = payload_len <= MAX_DATA.
    Data,
    /// A job frame: the payload starts with a link id and obeys `payload`;
    /// offset and len are a range when `range`, else zero.
    Job { range: bool, payload: JobPayload },
    /// offset zero; len = payload_len = exactly this many bytes.
    Fixed(u32),
    /// id and offset zero; len = payload_len = `prefix` + n x `record`
    /// bytes, <= MAX_CONTROL_PAYLOAD.
    Records { prefix: u32, record: u32 },
}

/// How a job kind's payload length follows from its header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum JobPayload {
    /// Exactly this many bytes.
    Exact(u32),
    /// `len` + the link id (JobData).
    LinkPlusLen,
    /// At least this many bytes, at most the kind's limit.
    AtLeast(u32),
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 26] = [
        Kind::Hello,
        Kind::Challenge,
        Kind::Auth,
        Kind::Welcome,
        Kind::Write,
        Kind::Trim,
        Kind::WriteZeroes,
        Kind::Flush,
        Kind::Barrier,
        Kind::Ack,
        Kind::Nack,
        Kind::Error,
        Kind::Ping,
        Kind::Pong,
        Kind::JobHash,
        Kind::JobRead,
        Kind::JobClose,
        Kind::JobHashes,
        Kind::JobData,
        Kind::JobNotReady,
        Kind::JobClosed,
        Kind::JobError,
        Kind::SyncState,
        Kind::HashRequest,
        Kind::HashReply,
        Kind::Divergence,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.code() == code)
    }

    /// True for the four kinds exchanged before the link carries requests.
    pub fn is_handshake(self) -> bool {
        matches!(
            self,
            Kind::Hello | Kind::Challenge | Kind::Auth | Kind::Welcome
        )
    }

    /// The flags a frame of this kind may carry.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Kind::Write => FLAG_FUA | FLAG_LZ4 | FLAG_ZSTD,
            Kind::Trim | Kind::Barrier => FLAG_FUA,
            Kind::WriteZeroes => FLAG_FUA | FLAG_NO_TRIM,
            _ => 0,
        }
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_payload(self) -> u32 {
        match self.shape() {
            Shape::Data => MAX_DATA,
            Shape::Control { .. } | Shape::Records { .. } => MAX_CONTROL_PAYLOAD,
            Shape::Fixed(n) => n,
            Shape::Bare { .. } | Shape::Range => 0,
            Shape::Job { payload, .. } => match payload {
                JobPayload::Exact(n) => n,
                JobPayload::LinkPlusLen => MAX_DATA + LINK_LEN as u32,
                JobPayload::AtLeast(_) if self == Kind::JobHashes => {
                    (LINK_LEN + 4) as u32 + MAX_JOB_HASHES * DIGEST_LEN as u32
                }
                JobPayload::AtLeast(_) => MAX_CONTROL_PAYLOAD,
            },
        }
    }

    /// True for the kinds of a job connection.
    pub fn is_job(self) -> bool {
        matches!(self.shape(), Shape::Job { .. })
    }

    fn shape(self) -> Shape {
        match self {
            Kind::Hello | Kind::Challenge | Kind::Auth | Kind::Welcome => {
                Shape::Control { id_zero: true }
            }
            Kind::Nack | Kind::Error => Shape::Control { id_zero: false },
            Kind::Write => Shape::Data,
            Kind::Trim | Kind::WriteZeroes => Shape::Range,
            Kind::Flush | Kind::Barrier | Kind::Ack | Kind::Ping | Kind::Pong => {
                Shape::Bare { id_zero: false }
            }
            Kind::JobHash => Shape::Job {
                range: true,
                payload: JobPayload::Exact(LINK_LEN as u32 + 4),
            },
            Kind::JobRead => Shape::Job {
                range: true,
                payload: JobPayload::Exact(LINK_LEN as u32),
            },
            Kind::JobClose | Kind::JobClosed => Shape::Job {
                range: false,
                payload: JobPayload::Exact(LINK_LEN as u32),
            },
            Kind::JobHashes => Shape::Job {
                range: true,
                payload: JobPayload::AtLeast(LINK_LEN as u32 + 4),
            },
            Kind::JobData => Shape::Job {
                range: true,
                payload: JobPayload::LinkPlusLen,
            },
            Kind::JobNotReady => Shape::Job {
                range: true,
                payload: JobPayload::Exact(LINK_LEN as u32 + 4),
            },
            Kind::JobError => Shape::Job {
                range: false,
                payload: JobPayload::AtLeast((LINK_LEN + CODE_LEN) as u32),
            },
            Kind::SyncState => Shape::Fixed(SYNC_STATE_LEN),
            Kind::HashRequest => Shape::Range,
            Kind::HashReply => Shape::Fixed(HASH_LEN as u32),
            Kind::Divergence => Shape::Records {
                prefix: DIVERGENCE_PREFIX as u32,
                record: DIVERGENCE_RANGE_LEN as u32,
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::Challenge => "Challenge",
            Kind::Auth => "Auth",
            Kind::Welcome => "Welcome",
            Kind::Write => "Write",
            Kind::Trim => "Trim",
            Kind::WriteZeroes => "WriteZeroes",
            Kind::Flush => "Flush",
            Kind::Barrier => "Barrier",
            Kind::Ack => "Ack",
            Kind::Nack => "Nack",
            Kind::Error => "Error",
            Kind::Ping => "Ping",
            Kind::Pong => "Pong",
            Kind::JobHash => "JobHash",
            Kind::JobRead => "JobRead",
            Kind::JobClose => "JobClose",
            Kind::JobHashes => "JobHashes",
            Kind::JobData => "JobData",
            Kind::JobNotReady => "JobNotReady",
            Kind::JobClosed => "JobClosed",
            Kind::JobError => "JobError",
            Kind::SyncState => "SyncState",
            Kind::HashRequest => "HashRequest",
            Kind::HashReply => "HashReply",
            Kind::Divergence => "Divergence",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a mirror link compresses Write data (`compression` in
/// `[[volume.mirror]]`). The codecs themselves are in [`crate::compress`];
/// this is their name on the wire (a Write's flags, the handshake's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// Data goes as it is (the default: on a LAN compression costs more CPU
    /// than it saves).
    #[default]
    None,
    /// LZ4 block format: cheap, modest ratio.
    Lz4,
    /// zstd at [`ZSTD_LEVEL`](crate::compress::ZSTD_LEVEL): better ratio, more CPU.
    Zstd,
}

impl Codec {
    pub const ALL: [Codec; 3] = [Codec::None, Codec::Lz4, Codec::Zstd];

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    pub fn from_name(s: &str) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The codec's code in the handshake (what a primary asks for, and the
    /// bit `1 << code` of the codecs a mirror supports).
    pub fn code(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
        }
    }

    /// The codec of a handshake code; `None` (the Rust one) for a code this
    /// build does not know.
    pub fn from_code(code: u8) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The frame flag meaning "payload compressed with this codec".
    pub fn flag(self) -> u16 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => FLAG_LZ4,
            Codec::Zstd => FLAG_ZSTD,
        }
    }

    /// The codec a Write's flags name; `None` (the Rust one) when both
    /// compression flags are set.
    pub(crate) fn from_flags(flags: u16) -> Option<Codec> {
        match (flags & FLAG_LZ4 != 0, flags & FLAG_ZSTD != 0) {
            (false, false) => Some(Codec::None),
            (true, false) => Some(Codec::Lz4),
            (false, true) => Some(Codec::Zstd),
            (true, true) => None,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame that cannot be accepted. Every variant ends the link: the stream
/// can no longer be trusted to be in step with the peer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x} (expected {MAGIC:#010x})")]
    BadMagic(u32),
    #[error("unsupported replication protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("frame header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("{kind} frame {id}: payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadChecksum {
        id: u64,
        kind: Kind,
        stored: u32,
        computed: u32,
    },
    #[error("unknown frame kind {kind} (id {id})")]
    UnknownKind { kind: u8, id: u64 },
    #[error("{kind} frame {id}: flags {flags:#06x} not allowed (allowed {allowed:#06x})")]
    BadFlags {
        kind: Kind,
        id: u64,
        flags: u16,
        allowed: u16,
    },
    #[error("{kind} frame {id}: payload of {len} bytes exceeds {max}")]
    PayloadTooLarge {
        kind: Kind,
        id: u64,
        len: u32,
        max: u32,
    },
    #[error("{kind} frame {id}: length {len} does not match payload length {payload_len}")]
    LengthMismatch {
        kind: Kind,
        id: u64,
        len: u32,
        payload_len: u32,
    },
    #[error("{kind} frame {id}: unused field {field} must be zero, is {value}")]
    NonZeroField {
        kind: Kind,
        id: u64,
        field: &'static str,
        value: u64,
    },
    #[error("{kind} frame {id}: range of {len} bytes at offset {offset} overflows")]
    RangeOverflow {
        kind: Kind,
        id: u64,
        offset: u64,
        len: u32,
    },
    #[error("{kind} frame {id}: malformed payload: {reason}")]
    Malformed {
        kind: Kind,
        id: u64,
        reason: PayloadError,
    },
    #[error("{kind} frame {id}: both LZ4 and ZSTD flags set (flags {flags:#06x})")]
    TwoCodecs { kind: Kind, id: u64, flags: u16 },
    #[error(
        "{kind} frame {id}: compressed payload of {payload_len} bytes for {len} bytes of data \
         (must be shorter than the data, and the data at most {MAX_DATA})"
    )]
    CompressedLength {
        kind: Kind,
        id: u64,
        len: u32,
        payload_len: u32,
    },
    #[error("{kind} frame {id} at offset {offset}: {codec} payload does not decompress: {reason}")]
    Decompress {
        kind: Kind,
        id: u64,
        offset: u64,
        codec: Codec,
        reason: DecompressError,
    },
    #[error("{kind} frame {id}: payload of {payload_len} bytes, expected {expected}")]
    PayloadLength {
        kind: Kind,
        id: u64,
        payload_len: u32,
        expected: u64,
    },
}

/// What is wrong with a frame's payload: the reason of
/// [`WireError::Malformed`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PayloadError {
    #[error("payload is {got} bytes, header says {header}")]
    LengthDiffers { got: usize, header: u32 },
    #[error("payload is {got} bytes, must be {expected}")]
    NotExactly { got: u32, expected: u32 },
    #[error("payload is {got} bytes, must be {prefix} plus a multiple of {record}")]
    NotRecords { got: u32, prefix: u32, record: u32 },
    #[error("payload of {got} bytes is shorter than its {prefix}-byte {what}")]
    ShorterThanPrefix {
        got: usize,
        prefix: usize,
        what: &'static str,
    },
    #[error("unknown sync phase {0}")]
    UnknownSyncPhase(u8),
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlagBits(u8),
    #[error("reserved bytes {0:02x?} must be zero")]
    ReservedNotZero([u8; 3]),
    #[error("count {count} does not match {bytes} bytes of ranges ({DIVERGENCE_RANGE_LEN} each)")]
    CountMismatch { count: u32, bytes: usize },
    #[error(transparent)]
    Range(#[from] RangeError),
    #[error("hash block {0} is not a power of two in {MIN_HASH_BLOCK}..={MAX_HASH_BLOCK}")]
    HashBlock(u32),
    #[error("{len} bytes in blocks of {block}: not 1..={MAX_JOB_HASHES} digests")]
    DigestCount { len: u32, block: u32 },
    #[error("read of {0} bytes: not 1..={MAX_DATA}")]
    ReadLength(u32),
    #[error("{got} digest bytes for {blocks} blocks")]
    DigestBytes { got: usize, blocks: usize },
    #[error("message is not UTF-8: {0}")]
    NotUtf8(std::str::Utf8Error),
}

/// Why a list of Divergence ranges is refused (they must be non-empty,
/// within u64, ascending and disjoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RangeError {
    #[error("range {index} at offset {offset} is empty")]
    Empty { index: usize, offset: u64 },
    #[error("range {index} of {len} bytes at offset {offset} overflows")]
    Overflow { index: usize, offset: u64, len: u64 },
    #[error(
        "range {index} at offset {offset} starts before the end of range {prev} ({prev_end}): \
         ranges must ascend and not overlap"
    )]
    Overlap {
        index: usize,
        offset: u64,
        prev: usize,
        prev_end: u64,
    },
}

/// Why a compressed Write payload does not decompress: the reason of
/// [`WireError::Decompress`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecompressError {
    /// The codec library refused the data (or could not be set up); its
    /// own error, as text (its error types are neither `Clone` nor `Eq`).
    #[error("{0}")]
    Codec(String),
    #[error("expands to {got} bytes, the header says {expected}")]
    WrongLength { got: usize, expected: u32 },
}

/// A frame header exactly as it was on the wire, with a good magic, version
/// and header checksum. Nothing else about it is judged yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    pub kind: u8,
    pub flags: u16,
    pub id: u64,
    pub offset: u64,
    pub len: u32,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl RawHeader {
    /// Decodes a 40-byte header; judges magic, then version, then the header
    /// checksum.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let u32_at = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(WireError::UnsupportedVersion(b[4]));
        }
        let stored = u32_at(HEADER_CRC_SPAN);
        let computed = crc32c::crc32c(&b[..HEADER_CRC_SPAN]);
        if stored != computed {
            return Err(WireError::HeaderChecksum { stored, computed });
        }
        Ok(Self {
            kind: b[5],
            flags: u16::from_be_bytes([b[6], b[7]]),
            id: u64_at(8),
            offset: u64_at(16),
            len: u32_at(24),
            payload_len: u32_at(28),
            payload_crc: u32_at(32),
        })
    }

    /// The header's 40 bytes, with magic, version and header checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4] = VERSION;
        b[5] = self.kind;
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_be_bytes());
        b[32..36].copy_from_slice(&self.payload_crc.to_be_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_SPAN]);
        b[HEADER_CRC_SPAN..].copy_from_slice(&crc.to_be_bytes());
        b
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&self.to_bytes());
    }

    /// Judges everything the header alone can tell: the kind, its flags, its
    /// unused fields, its range, and its payload length against the kind's
    /// limit. Passing this bounds the payload the caller must read.
    pub fn validate(&self) -> Result<Kind, WireError> {
        let id = self.id;
        let kind = Kind::from_code(self.kind).ok_or(WireError::UnknownKind {
            kind: self.kind,
            id,
        })?;
        let allowed = kind.allowed_flags();
        if self.flags & !allowed != 0 {
            return Err(WireError::BadFlags {
                kind,
                id,
                flags: self.flags,
                allowed,
            });
        }
        let max = kind.max_payload();
        if self.payload_len > max {
            return Err(WireError::PayloadTooLarge {
                kind,
                id,
                len: self.payload_len,
                max,
            });
        }
        let zero = |field: &'static str, value: u64| {
            if value == 0 {
                Ok(())
            } else {
                Err(WireError::NonZeroField {
                    kind,
                    id,
                    field,
                    value,
                })
            }
        };
        let len_is_payload = || {
            if self.len == self.payload_len {
                Ok(())
            } else {
                Err(WireError::LengthMismatch {
                    kind,
                    id,
                    len: self.len,
                    payload_len: self.payload_len,
                })
            }
        };
        let range = || {
            if self.offset.checked_add(u64::from(self.len)).is_some() {
                Ok(())
            } else {
                Err(WireError::RangeOverflow {
                    kind,
                    id,
                    offset: self.offset,
                    len: self.len,
                })
            }
        };
        match kind.shape() {
            Shape::Bare { id_zero } => {
                if id_zero {
                    zero("id", id)?;
                }
                zero("offset", self.offset)?;
                zero("len", u64::from(self.len))?;
            }
            Shape::Control { id_zero } => {
                if id_zero {
                    zero("id", id)?;
                }
                zero("offset", self.offset)?;
                len_is_payload()?;
            }
            Shape::Fixed(n) => {
                zero("offset", self.offset)?;
                len_is_payload()?;
                if self.payload_len != n {
                    return Err(WireError::Malformed {
                        kind,
                        id,
                        reason: PayloadError::NotExactly {
                            got: self.payload_len,
                            expected: n,
                        },
                    });
                }
            }
            Shape::Records { prefix, record } => {
                zero("id", id)?;
                zero("offset", self.offset)?;
                len_is_payload()?;
                let n = self.payload_len;
                if n < prefix || (n - prefix) % record != 0 {
                    return Err(WireError::Malformed {
                        kind,
                        id,
                        reason: PayloadError::NotRecords {
                            got: n,
                            prefix,
                            record,
                        },
                    });
                }
            }
            Shape::Range => range()?,
            Shape::Data => {
                match Codec::from_flags(self.flags) {
                    Some(Codec::None) => len_is_payload()?,
                    Some(_) => {
                        if self.len > MAX_DATA || self.payload_len >= self.len {
                            return Err(WireError::CompressedLength {
                                kind,
                                id,
                                len: self.len,
                                payload_len: self.payload_len,
                            });
                        }
                    }
                    None => {
                        return Err(WireError::TwoCodecs {
                            kind,
                            id,
                            flags: self.flags,
                        })
                    }
                }
                range()?;
            }
            Shape::Job {
                range: is_range,
                payload,
            } => {
                if is_range {
                    range()?;
                } else {
                    zero("offset", self.offset)?;
                    zero("len", u64::from(self.len))?;
                }
                let bad = |expected: u64| {
                    Err(WireError::PayloadLength {
                        kind,
                        id,
                        payload_len: self.payload_len,
                        expected,
                    })
                };
                match payload {
                    JobPayload::Exact(n) if self.payload_len != n => return bad(n.into()),
                    JobPayload::AtLeast(n) if self.payload_len < n => return bad(n.into()),
                    JobPayload::LinkPlusLen
                        if u64::from(self.payload_len) != u64::from(self.len) + LINK_LEN as u64 =>
                    {
                        return bad(u64::from(self.len) + LINK_LEN as u64)
                    }
                    _ => {}
                }
            }
        }
        Ok(kind)
    }
}
