//! Replication frames: byte layout, raw header, validated frames, decoder.
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
//! | Error | 34 | request or 0 | none | u32 [`ErrorCode`], then a UTF-8 message; fatal |
//! | Ping | 48 | any | none | none |
//! | Pong | 49 | echoed | none | none |
//! | JobHash | 64 | request | none | link id u64, block u32 (offset/len: the range) |
//! | JobRead | 65 | request | none | link id u64 (offset/len: the range, len <= [`MAX_DATA`]) |
//! | JobClose | 66 | request | none | link id u64 |
//! | JobHashes | 67 | echoed | none | link id u64, block u32, one 32-byte blake3 digest per block |
//! | JobData | 68 | echoed | none | link id u64, then `len` bytes of data |
//! | JobNotReady | 69 | echoed | none | link id u64, retry_after_ms u32 |
//! | JobClosed | 70 | echoed | none | link id u64 |
//! | JobError | 71 | echoed | none | link id u64, u32 [`JobErrorCode`], UTF-8 message |
//! | SyncState | 80 | request | none | exactly [`SYNC_STATE_LEN`] bytes: u8 state (1 resyncing, 2 in sync), u64 generation, 4 x u64 history |
//! | HashRequest | 81 | request | none | none; offset and len are the range to hash (checksum resync) |
//! | HashReply | 82 | echoed | none | exactly [`HASH_LEN`] bytes: the BLAKE3 hash of the mirror's range |
//! | Divergence | 83 | 0 | none | u8 flags (bit 0 was_primary, bit 1 last), 3 zero bytes, u32 count, count x (u64 offset, u64 len): non-empty ranges, ascending, disjoint; <= [`MAX_CONTROL_PAYLOAD`] (see [`divergence_frames`]) |
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
//! allocate. [`Frame::from_parts`] then checks the payload checksum and
//! parses the payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::compress::{Codec, EncodedWrite};

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
const CODE_LEN: usize = 4;
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
const DIVERGENCE_PREFIX: usize = 8;
/// Bytes of one Divergence range: u64 offset, u64 len.
const DIVERGENCE_RANGE_LEN: usize = 16;
/// Most ranges one Divergence frame carries (its payload stays within
/// [`MAX_CONTROL_PAYLOAD`]).
pub const MAX_DIVERGENCE_RANGES: usize =
    (MAX_CONTROL_PAYLOAD as usize - DIVERGENCE_PREFIX) / DIVERGENCE_RANGE_LEN;
/// Divergence payload flags: the sender was a primary before it was demoted.
const DIVERGENCE_WAS_PRIMARY: u8 = 1 << 0;
/// Divergence payload flags: the sender's last Divergence frame.
const DIVERGENCE_LAST: u8 = 1 << 1;

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
    Malformed { kind: Kind, id: u64, reason: String },
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
        reason: String,
    },
    #[error("{kind} frame {id}: payload of {payload_len} bytes, expected {expected}")]
    PayloadLength {
        kind: Kind,
        id: u64,
        payload_len: u32,
        expected: u64,
    },
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
                        reason: format!("payload is {} bytes, must be {n}", self.payload_len),
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
                        reason: format!(
                            "payload is {n} bytes, must be {prefix} plus a multiple of {record}"
                        ),
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

/// Length of a [`Frame::HashReply`] payload (a BLAKE3 hash).
pub const HASH_LEN: usize = 32;

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

/// Generation ids a SyncState frame carries besides the current one.
pub const SYNC_HISTORY_LEN: usize = 4;
/// The exact payload length of a SyncState frame.
pub const SYNC_STATE_LEN: u32 = 1 + 8 + 8 * SYNC_HISTORY_LEN as u32;

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

    /// [`Frame::from_parts`] for a header already validated as `kind`.
    fn build(kind: Kind, h: &RawHeader, payload: Bytes) -> Result<Frame, WireError> {
        let id = h.id;
        if payload.len() != h.payload_len as usize {
            return Err(WireError::Malformed {
                kind,
                id,
                reason: format!(
                    "payload is {} bytes, header says {}",
                    payload.len(),
                    h.payload_len
                ),
            });
        }
        let computed = crc32c::crc32c(&payload);
        if computed != h.payload_crc {
            return Err(WireError::PayloadChecksum {
                id,
                kind,
                stored: h.payload_crc,
                computed,
            });
        }
        let fua = h.flags & FLAG_FUA != 0;
        let (offset, len) = (h.offset, h.len);
        Ok(match kind {
            Kind::Hello => Frame::Hello { payload },
            Kind::Challenge => Frame::Challenge { payload },
            Kind::Auth => Frame::Auth { payload },
            Kind::Welcome => Frame::Welcome { payload },
            Kind::Write => {
                let codec = Codec::from_flags(h.flags).expect("validated flags");
                let data = match codec {
                    Codec::None => payload,
                    c => c.decompress(id, offset, len, &payload)?,
                };
                Frame::Write {
                    id,
                    offset,
                    fua,
                    data,
                }
            }
            Kind::Trim => Frame::Trim {
                id,
                offset,
                len,
                fua,
            },
            Kind::WriteZeroes => Frame::WriteZeroes {
                id,
                offset,
                len,
                fua,
                may_trim: h.flags & FLAG_NO_TRIM == 0,
            },
            Kind::Flush => Frame::Flush { id },
            Kind::Barrier => Frame::Barrier {
                id,
                durable: h.flags & FLAG_FUA != 0,
            },
            Kind::Ack => Frame::Ack { id },
            Kind::Nack => {
                let (errno, message) = code_and_message(kind, id, &payload)?;
                Frame::Nack { id, errno, message }
            }
            Kind::Error => {
                let (code, message) = code_and_message(kind, id, &payload)?;
                Frame::Error {
                    id,
                    code: ErrorCode::from_code(code),
                    message,
                }
            }
            Kind::Ping => Frame::Ping { id },
            Kind::Pong => Frame::Pong { id },
            Kind::SyncState => {
                // validate() fixed the length; judge the contents.
                let phase =
                    SyncPhase::from_code(payload[0]).ok_or_else(|| WireError::Malformed {
                        kind,
                        id,
                        reason: format!("unknown sync phase {}", payload[0]),
                    })?;
                let u64_at =
                    |o: usize| u64::from_be_bytes(payload[o..o + 8].try_into().expect("8 bytes"));
                let mut history = [0u64; SYNC_HISTORY_LEN];
                for (i, h) in history.iter_mut().enumerate() {
                    *h = u64_at(9 + 8 * i);
                }
                Frame::SyncState {
                    id,
                    phase,
                    generation: u64_at(1),
                    history,
                }
            }
            Kind::HashRequest => Frame::HashRequest { id, offset, len },
            Kind::HashReply => Frame::HashReply {
                id,
                // validate() fixed the length.
                hash: payload[..].try_into().expect("HASH_LEN bytes"),
            },
            Kind::Divergence => parse_divergence(id, &payload)?,
            k if k.is_job() => build_job(k, h, payload)?,
            k => unreachable!("every kind is handled: {k}"),
        })
    }

    /// Appends the encoded frame to `out`. A Nack or Error message longer
    /// than the control payload limit is cut at a character boundary.
    ///
    /// # Panics
    ///
    /// If a Write's data exceeds [`MAX_DATA`], a handshake payload exceeds
    /// [`MAX_CONTROL_PAYLOAD`] or a Divergence carries more than
    /// [`MAX_DIVERGENCE_RANGES`]: the sender must split writes (the NBD front
    /// end already caps requests at the same size), handshake messages are a
    /// few hundred bytes, and [`divergence_frames`] splits range lists.
    pub fn encode(&self, out: &mut BytesMut) {
        let bare = |kind: Kind, id: u64| RawHeader {
            kind: kind.code(),
            flags: 0,
            id,
            offset: 0,
            len: 0,
            payload_len: 0,
            payload_crc: crc32c::crc32c(&[]),
        };
        match self {
            Frame::Hello { payload }
            | Frame::Challenge { payload }
            | Frame::Auth { payload }
            | Frame::Welcome { payload } => {
                assert!(
                    payload.len() <= MAX_CONTROL_PAYLOAD as usize,
                    "{} payload of {} bytes exceeds {MAX_CONTROL_PAYLOAD}",
                    self.kind(),
                    payload.len()
                );
                let n = payload.len() as u32;
                RawHeader {
                    kind: self.kind().code(),
                    flags: 0,
                    id: 0,
                    offset: 0,
                    len: n,
                    payload_len: n,
                    payload_crc: crc32c::crc32c(payload),
                }
                .encode(out);
                out.put_slice(payload);
            }
            Frame::Write {
                id,
                offset,
                fua,
                data,
            } => {
                encode_write_header(*id, *offset, *fua, data, out);
                out.put_slice(data);
            }
            Frame::Trim {
                id,
                offset,
                len,
                fua,
            } => RawHeader {
                flags: if *fua { FLAG_FUA } else { 0 },
                offset: *offset,
                len: *len,
                ..bare(Kind::Trim, *id)
            }
            .encode(out),
            Frame::WriteZeroes {
                id,
                offset,
                len,
                fua,
                may_trim,
            } => RawHeader {
                flags: (if *fua { FLAG_FUA } else { 0 })
                    | (if *may_trim { 0 } else { FLAG_NO_TRIM }),
                offset: *offset,
                len: *len,
                ..bare(Kind::WriteZeroes, *id)
            }
            .encode(out),
            Frame::Flush { id } => bare(Kind::Flush, *id).encode(out),
            Frame::Barrier { id, durable } => RawHeader {
                flags: if *durable { FLAG_FUA } else { 0 },
                ..bare(Kind::Barrier, *id)
            }
            .encode(out),
            Frame::Ack { id } => bare(Kind::Ack, *id).encode(out),
            Frame::Ping { id } => bare(Kind::Ping, *id).encode(out),
            Frame::Pong { id } => bare(Kind::Pong, *id).encode(out),
            Frame::SyncState {
                id,
                phase,
                generation,
                history,
            } => {
                let mut p = BytesMut::with_capacity(SYNC_STATE_LEN as usize);
                p.put_u8(phase.code());
                p.put_u64(*generation);
                for h in history {
                    p.put_u64(*h);
                }
                RawHeader {
                    kind: Kind::SyncState.code(),
                    flags: 0,
                    id: *id,
                    offset: 0,
                    len: SYNC_STATE_LEN,
                    payload_len: SYNC_STATE_LEN,
                    payload_crc: crc32c::crc32c(&p),
                }
                .encode(out);
                out.put_slice(&p);
            }
            Frame::HashRequest { id, offset, len } => RawHeader {
                offset: *offset,
                len: *len,
                ..bare(Kind::HashRequest, *id)
            }
            .encode(out),
            Frame::HashReply { id, hash } => {
                RawHeader {
                    kind: Kind::HashReply.code(),
                    flags: 0,
                    id: *id,
                    offset: 0,
                    len: HASH_LEN as u32,
                    payload_len: HASH_LEN as u32,
                    payload_crc: crc32c::crc32c(hash),
                }
                .encode(out);
                out.put_slice(hash);
            }
            Frame::Divergence {
                was_primary,
                last,
                ranges,
            } => {
                assert!(
                    ranges.len() <= MAX_DIVERGENCE_RANGES,
                    "Divergence of {} ranges exceeds {MAX_DIVERGENCE_RANGES}",
                    ranges.len()
                );
                debug_assert_eq!(check_divergence_ranges(ranges), Ok(()));
                let n = DIVERGENCE_PREFIX + ranges.len() * DIVERGENCE_RANGE_LEN;
                let mut p = BytesMut::with_capacity(n);
                p.put_u8(
                    (if *was_primary {
                        DIVERGENCE_WAS_PRIMARY
                    } else {
                        0
                    }) | (if *last { DIVERGENCE_LAST } else { 0 }),
                );
                p.put_bytes(0, 3);
                p.put_u32(ranges.len() as u32);
                for &(offset, len) in ranges {
                    p.put_u64(offset);
                    p.put_u64(len);
                }
                RawHeader {
                    kind: Kind::Divergence.code(),
                    flags: 0,
                    id: 0,
                    offset: 0,
                    len: n as u32,
                    payload_len: n as u32,
                    payload_crc: crc32c::crc32c(&p),
                }
                .encode(out);
                out.put_slice(&p);
            }
            Frame::Nack { id, errno, message } => {
                encode_code_and_message(Kind::Nack, *id, *errno, message, out)
            }
            Frame::Error { id, code, message } => {
                encode_code_and_message(Kind::Error, *id, code.code(), message, out)
            }
            f => encode_job(f, out),
        }
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
fn check_divergence_ranges(ranges: &[(u64, u64)]) -> Result<(), String> {
    let mut prev_end: Option<u64> = None;
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        if len == 0 {
            return Err(format!("range {i} at offset {offset} is empty"));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| format!("range {i} of {len} bytes at offset {offset} overflows"))?;
        if let Some(prev_end) = prev_end {
            if offset < prev_end {
                return Err(format!(
                    "range {i} at offset {offset} starts before the end of range {} ({prev_end}): \
                     ranges must ascend and not overlap",
                    i - 1
                ));
            }
        }
        prev_end = Some(end);
    }
    Ok(())
}

/// Parses a Divergence payload (the header is validated: id and offset are
/// zero, the length is the prefix plus whole ranges, within the limit).
fn parse_divergence(id: u64, payload: &[u8]) -> Result<Frame, WireError> {
    let kind = Kind::Divergence;
    let malformed = |reason: String| WireError::Malformed { kind, id, reason };
    if payload.len() < DIVERGENCE_PREFIX {
        return Err(malformed(format!(
            "payload of {} bytes is shorter than its {DIVERGENCE_PREFIX}-byte prefix",
            payload.len()
        )));
    }
    let flags = payload[0];
    let unknown = flags & !(DIVERGENCE_WAS_PRIMARY | DIVERGENCE_LAST);
    if unknown != 0 {
        return Err(malformed(format!("unknown flag bits {unknown:#04x}")));
    }
    if payload[1..4] != [0; 3] {
        return Err(malformed(format!(
            "reserved bytes {:02x?} must be zero",
            &payload[1..4]
        )));
    }
    let count = u32::from_be_bytes(payload[4..8].try_into().expect("4 bytes"));
    let body = &payload[DIVERGENCE_PREFIX..];
    if body.len() as u64 != u64::from(count) * DIVERGENCE_RANGE_LEN as u64 {
        return Err(malformed(format!(
            "count {count} does not match {} bytes of ranges ({DIVERGENCE_RANGE_LEN} each)",
            body.len()
        )));
    }
    let u64_at = |c: &[u8], o: usize| u64::from_be_bytes(c[o..o + 8].try_into().expect("8 bytes"));
    let ranges: Vec<(u64, u64)> = body
        .chunks_exact(DIVERGENCE_RANGE_LEN)
        .map(|c| (u64_at(c, 0), u64_at(c, 8)))
        .collect();
    check_divergence_ranges(&ranges).map_err(malformed)?;
    Ok(Frame::Divergence {
        was_primary: flags & DIVERGENCE_WAS_PRIMARY != 0,
        last: flags & DIVERGENCE_LAST != 0,
        ranges,
    })
}

/// Parses a job frame's payload (the header is validated: its length fits
/// the kind, and its range does not overflow).
fn build_job(kind: Kind, h: &RawHeader, payload: Bytes) -> Result<Frame, WireError> {
    let id = h.id;
    let malformed = |reason: String| WireError::Malformed { kind, id, reason };
    let (offset, len) = (h.offset, h.len);
    let link = u64::from_be_bytes(payload[..LINK_LEN].try_into().expect("validated length"));
    let u32_at = |o: usize| u32::from_be_bytes(payload[o..o + 4].try_into().expect("4 bytes"));
    let check_block = |block: u32| {
        if !block.is_power_of_two() || !(MIN_HASH_BLOCK..=MAX_HASH_BLOCK).contains(&block) {
            return Err(malformed(format!(
                "hash block {block} is not a power of two in {MIN_HASH_BLOCK}..={MAX_HASH_BLOCK}"
            )));
        }
        if len == 0 || hash_count(len, block) > MAX_JOB_HASHES {
            return Err(malformed(format!(
                "{len} bytes in blocks of {block}: not 1..={MAX_JOB_HASHES} digests"
            )));
        }
        Ok(())
    };
    Ok(match kind {
        Kind::JobHash => {
            let block = u32_at(LINK_LEN);
            check_block(block)?;
            Frame::JobHash {
                id,
                link,
                offset,
                len,
                block,
            }
        }
        Kind::JobRead => {
            if len == 0 || len > MAX_DATA {
                return Err(malformed(format!(
                    "read of {len} bytes: not 1..={MAX_DATA}"
                )));
            }
            Frame::JobRead {
                id,
                link,
                offset,
                len,
            }
        }
        Kind::JobClose => Frame::JobClose { id, link },
        Kind::JobClosed => Frame::JobClosed { id, link },
        Kind::JobHashes => {
            let block = u32_at(LINK_LEN);
            check_block(block)?;
            let body = &payload[LINK_LEN + 4..];
            let n = hash_count(len, block) as usize;
            if body.len() != n * DIGEST_LEN {
                return Err(malformed(format!(
                    "{} digest bytes for {n} blocks",
                    body.len()
                )));
            }
            Frame::JobHashes {
                id,
                link,
                offset,
                len,
                block,
                digests: body
                    .chunks_exact(DIGEST_LEN)
                    .map(|c| c.try_into().expect("DIGEST_LEN"))
                    .collect(),
            }
        }
        Kind::JobData => Frame::JobData {
            id,
            link,
            offset,
            data: payload.slice(LINK_LEN..),
        },
        Kind::JobNotReady => Frame::JobNotReady {
            id,
            link,
            offset,
            len,
            retry_after_ms: u32_at(LINK_LEN),
        },
        Kind::JobError => {
            let (code, message) = code_and_message(kind, id, &payload[LINK_LEN..])?;
            Frame::JobError {
                id,
                link,
                code: JobErrorCode::from_code(code),
                message,
            }
        }
        k => unreachable!("not a job kind: {k}"),
    })
}

/// Appends the header and link id of a JobData frame carrying `data`; the
/// caller sends `data` right after (as its own iovec, without copying).
///
/// # Panics
///
/// If `data` is longer than [`MAX_DATA`] or the range overflows.
pub fn encode_job_data_header(id: u64, link: u64, offset: u64, data: &[u8], out: &mut BytesMut) {
    assert!(data.len() <= MAX_DATA as usize, "JobData above MAX_DATA");
    let n = data.len() as u32;
    assert!(
        offset.checked_add(u64::from(n)).is_some(),
        "job range overflows"
    );
    let link = link.to_be_bytes();
    RawHeader {
        kind: Kind::JobData.code(),
        flags: 0,
        id,
        offset,
        len: n,
        payload_len: n + LINK_LEN as u32,
        payload_crc: crc32c::crc32c_append(crc32c::crc32c(&link), data),
    }
    .encode(out);
    out.put_slice(&link);
}

/// Encodes a job frame.
///
/// # Panics
///
/// On a frame no receiver would accept: JobData above [`MAX_DATA`], a
/// JobHashes whose digest count does not match its range, or a range that
/// overflows.
fn encode_job(f: &Frame, out: &mut BytesMut) {
    let mut payload = BytesMut::with_capacity(64);
    let (kind, id, offset, len) = match f {
        Frame::JobHash {
            id,
            link,
            offset,
            len,
            block,
        } => {
            payload.put_u64(*link);
            payload.put_u32(*block);
            (Kind::JobHash, *id, *offset, *len)
        }
        Frame::JobRead {
            id,
            link,
            offset,
            len,
        } => {
            payload.put_u64(*link);
            (Kind::JobRead, *id, *offset, *len)
        }
        Frame::JobClose { id, link } => {
            payload.put_u64(*link);
            (Kind::JobClose, *id, 0, 0)
        }
        Frame::JobClosed { id, link } => {
            payload.put_u64(*link);
            (Kind::JobClosed, *id, 0, 0)
        }
        Frame::JobHashes {
            id,
            link,
            offset,
            len,
            block,
            digests,
        } => {
            assert_eq!(
                digests.len(),
                hash_count(*len, *block) as usize,
                "digest count"
            );
            payload.reserve(digests.len() * DIGEST_LEN);
            payload.put_u64(*link);
            payload.put_u32(*block);
            digests.iter().for_each(|d| payload.put_slice(d));
            (Kind::JobHashes, *id, *offset, *len)
        }
        Frame::JobData {
            id,
            link,
            offset,
            data,
        } => {
            encode_job_data_header(*id, *link, *offset, data, out);
            out.put_slice(data);
            return;
        }
        Frame::JobNotReady {
            id,
            link,
            offset,
            len,
            retry_after_ms,
        } => {
            payload.put_u64(*link);
            payload.put_u32(*retry_after_ms);
            (Kind::JobNotReady, *id, *offset, *len)
        }
        Frame::JobError {
            id,
            link,
            code,
            message,
        } => {
            let message = clip(message, MAX_CONTROL_PAYLOAD as usize - CODE_LEN - LINK_LEN);
            payload.put_u64(*link);
            payload.put_u32(code.code());
            payload.put_slice(message.as_bytes());
            (Kind::JobError, *id, 0, 0)
        }
        other => unreachable!("not a job frame: {:?}", other.kind()),
    };
    assert!(
        offset.checked_add(u64::from(len)).is_some(),
        "job range overflows"
    );
    RawHeader {
        kind: kind.code(),
        flags: 0,
        id,
        offset,
        len,
        payload_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(&payload),
    }
    .encode(out);
    out.put_slice(&payload);
}

/// Appends the header of a Write frame carrying `data`; the caller sends
/// `data` itself right after it (as a separate iovec, without copying).
///
/// # Panics
///
/// If `data` is longer than [`MAX_DATA`] (see [`Frame::encode`]), or the
/// range overflows u64.
pub fn encode_write_header(id: u64, offset: u64, fua: bool, data: &[u8], out: &mut BytesMut) {
    assert!(
        data.len() <= MAX_DATA as usize,
        "write of {} bytes exceeds MAX_DATA ({MAX_DATA})",
        data.len()
    );
    let n = data.len() as u32;
    assert!(
        offset.checked_add(u64::from(n)).is_some(),
        "write of {n} bytes at offset {offset} overflows"
    );
    RawHeader {
        kind: Kind::Write.code(),
        flags: if fua { FLAG_FUA } else { 0 },
        id,
        offset,
        len: n,
        payload_len: n,
        payload_crc: crc32c::crc32c(data),
    }
    .encode(out);
}

/// Appends the header of a Write frame whose data was made ready for the wire
/// by [`EncodedWrite::new`] (compressed or not, checksummed); the caller sends
/// `w.payload` right after it.
///
/// # Panics
///
/// If the range overflows u64.
pub fn encode_encoded_write_header(
    id: u64,
    offset: u64,
    fua: bool,
    w: &EncodedWrite,
    out: &mut BytesMut,
) {
    assert!(
        offset.checked_add(u64::from(w.len)).is_some(),
        "write of {} bytes at offset {offset} overflows",
        w.len
    );
    RawHeader {
        kind: Kind::Write.code(),
        flags: (if fua { FLAG_FUA } else { 0 }) | w.codec.flag(),
        id,
        offset,
        len: w.len,
        payload_len: w.payload.len() as u32,
        payload_crc: w.crc,
    }
    .encode(out);
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn encode_code_and_message(kind: Kind, id: u64, code: u32, message: &str, out: &mut BytesMut) {
    let message = clip(message, MAX_CONTROL_PAYLOAD as usize - CODE_LEN);
    let n = (CODE_LEN + message.len()) as u32;
    let code = code.to_be_bytes();
    let mut crc = crc32c::crc32c(&code);
    crc = crc32c::crc32c_append(crc, message.as_bytes());
    RawHeader {
        kind: kind.code(),
        flags: 0,
        id,
        offset: 0,
        len: n,
        payload_len: n,
        payload_crc: crc,
    }
    .encode(out);
    out.put_slice(&code);
    out.put_slice(message.as_bytes());
}

fn code_and_message(kind: Kind, id: u64, payload: &[u8]) -> Result<(u32, String), WireError> {
    let malformed = |reason: String| WireError::Malformed { kind, id, reason };
    if payload.len() < CODE_LEN {
        return Err(malformed(format!(
            "payload of {} bytes is shorter than its {CODE_LEN}-byte code",
            payload.len()
        )));
    }
    let (code, message) = payload.split_at(CODE_LEN);
    let code = u32::from_be_bytes(code.try_into().expect("4 bytes"));
    let message = std::str::from_utf8(message)
        .map_err(|e| malformed(format!("message is not UTF-8: {e}")))?;
    Ok((code, message.to_owned()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
    }

    /// Every kind of frame, with small payloads.
    fn frame() -> impl Strategy<Value = Frame> {
        let range = (any::<u64>(), any::<u32>()).prop_filter("range fits u64", |(o, l)| {
            o.checked_add(u64::from(*l)).is_some()
        });
        prop_oneof![
            bytes(300).prop_map(|payload| Frame::Hello { payload }),
            bytes(300).prop_map(|payload| Frame::Challenge { payload }),
            bytes(64).prop_map(|payload| Frame::Auth { payload }),
            bytes(16).prop_map(|payload| Frame::Welcome { payload }),
            (any::<u64>(), 0..u64::MAX / 2, any::<bool>(), bytes(600)).prop_map(
                |(id, offset, fua, data)| Frame::Write {
                    id,
                    offset,
                    fua,
                    data
                }
            ),
            (any::<u64>(), range.clone(), any::<bool>()).prop_map(|(id, (offset, len), fua)| {
                Frame::Trim {
                    id,
                    offset,
                    len,
                    fua,
                }
            }),
            (any::<u64>(), range, any::<bool>(), any::<bool>()).prop_map(
                |(id, (offset, len), fua, may_trim)| Frame::WriteZeroes {
                    id,
                    offset,
                    len,
                    fua,
                    may_trim
                }
            ),
            any::<u64>().prop_map(|id| Frame::Flush { id }),
            (any::<u64>(), any::<bool>()).prop_map(|(id, durable)| Frame::Barrier { id, durable }),
            any::<u64>().prop_map(|id| Frame::Ack { id }),
            (any::<u64>(), any::<u32>(), ".{0,40}")
                .prop_map(|(id, errno, message)| { Frame::Nack { id, errno, message } }),
            (any::<u64>(), any::<u32>(), ".{0,40}").prop_map(|(id, code, message)| {
                Frame::Error {
                    id,
                    code: ErrorCode::from_code(code),
                    message,
                }
            }),
            any::<u64>().prop_map(|id| Frame::Ping { id }),
            any::<u64>().prop_map(|id| Frame::Pong { id }),
            (
                any::<u64>(),
                any::<bool>(),
                any::<u64>(),
                any::<[u64; SYNC_HISTORY_LEN]>()
            )
                .prop_map(|(id, in_sync, generation, history)| Frame::SyncState {
                    id,
                    phase: if in_sync {
                        SyncPhase::InSync
                    } else {
                        SyncPhase::Resyncing
                    },
                    generation,
                    history,
                }),
            (any::<u64>(), 0..u64::MAX / 2, any::<u32>())
                .prop_map(|(id, offset, len)| Frame::HashRequest { id, offset, len }),
            (any::<u64>(), any::<[u8; HASH_LEN]>())
                .prop_map(|(id, hash)| Frame::HashReply { id, hash }),
            (any::<bool>(), any::<bool>(), divergence_ranges(40)).prop_map(
                |(was_primary, last, ranges)| Frame::Divergence {
                    was_primary,
                    last,
                    ranges
                }
            ),
            job_frame(),
        ]
    }

    /// Up to `max` non-empty, ascending, disjoint (sometimes touching)
    /// ranges, some ending at the top of u64.
    fn divergence_ranges(max: usize) -> impl Strategy<Value = Vec<(u64, u64)>> {
        let step = (
            prop_oneof![Just(0u64), 1u64..1 << 40],
            prop_oneof![Just(1u64), 1u64..1 << 40],
        );
        (0..u64::MAX / 2, vec(step, 0..=max), any::<bool>()).prop_map(|(base, steps, to_top)| {
            let mut at = base;
            let mut out: Vec<(u64, u64)> = steps
                .into_iter()
                .map(|(gap, len)| {
                    let offset = at + gap;
                    at = offset + len;
                    (offset, len)
                })
                .collect();
            if to_top {
                if let Some(r) = out.last_mut() {
                    r.1 = u64::MAX - r.0;
                }
            }
            out
        })
    }

    /// Every job kind, with valid parameters.
    fn job_frame() -> impl Strategy<Value = Frame> {
        let block = (12u32..=24).prop_map(|b| 1u32 << b);
        let hash_range = (block.clone(), 1u32..=64)
            .prop_flat_map(|(block, n)| (Just(block), (block * (n - 1) + 1)..=block * n))
            .prop_map(|(block, len)| (block, len));
        prop_oneof![
            (
                any::<u64>(),
                any::<u64>(),
                0..u64::MAX / 2,
                hash_range.clone()
            )
                .prop_map(|(id, link, offset, (block, len))| Frame::JobHash {
                    id,
                    link,
                    offset,
                    len,
                    block
                }),
            (any::<u64>(), any::<u64>(), 0..u64::MAX / 2, 1..=MAX_DATA).prop_map(
                |(id, link, offset, len)| Frame::JobRead {
                    id,
                    link,
                    offset,
                    len
                }
            ),
            (any::<u64>(), any::<u64>()).prop_map(|(id, link)| Frame::JobClose { id, link }),
            (any::<u64>(), any::<u64>()).prop_map(|(id, link)| Frame::JobClosed { id, link }),
            (
                any::<u64>(),
                any::<u64>(),
                0..u64::MAX / 2,
                hash_range,
                any::<u8>()
            )
                .prop_map(|(id, link, offset, (block, len), fill)| Frame::JobHashes {
                    id,
                    link,
                    offset,
                    len,
                    block,
                    digests: (0..hash_count(len, block))
                        .map(|i| [fill ^ i as u8; DIGEST_LEN])
                        .collect(),
                }),
            (any::<u64>(), any::<u64>(), 0..u64::MAX / 2, bytes(600)).prop_map(
                |(id, link, offset, data)| Frame::JobData {
                    id,
                    link,
                    offset,
                    data
                }
            ),
            (
                any::<u64>(),
                any::<u64>(),
                0..u64::MAX / 2,
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(id, link, offset, len, retry_after_ms)| {
                    Frame::JobNotReady {
                        id,
                        link,
                        offset,
                        len,
                        retry_after_ms,
                    }
                }),
            (any::<u64>(), any::<u64>(), any::<u32>(), ".{0,40}").prop_map(
                |(id, link, code, message)| Frame::JobError {
                    id,
                    link,
                    code: JobErrorCode::from_code(code),
                    message
                }
            ),
        ]
    }

    fn encoded(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        b
    }

    fn decode_all(mut b: BytesMut) -> Result<Option<Frame>, WireError> {
        FrameDecoder::new().decode(&mut b)
    }

    /// A header with a valid checksum and whatever fields the test wants.
    fn header_bytes(h: RawHeader) -> BytesMut {
        let mut b = BytesMut::new();
        h.encode(&mut b);
        b
    }

    proptest! {
        #[test]
        fn every_frame_roundtrips(f in frame()) {
            let mut b = encoded(&f);
            let len = b.len();
            let mut d = FrameDecoder::new();
            prop_assert_eq!(d.decode(&mut b), Ok(Some(f.clone())));
            prop_assert!(b.is_empty(), "decoder left {} of {} bytes", b.len(), len);
            prop_assert!(!d.is_mid_frame());
        }

        /// Several frames back to back come out one by one, in order.
        #[test]
        fn frame_sequences_roundtrip(fs in vec(frame(), 0..8)) {
            let mut b = BytesMut::new();
            for f in &fs {
                f.encode(&mut b);
            }
            let mut d = FrameDecoder::new();
            for f in &fs {
                prop_assert_eq!(d.decode(&mut b), Ok(Some(f.clone())));
            }
            prop_assert_eq!(d.decode(&mut b), Ok(None));
        }

        /// Every single-bit flip anywhere in a frame is refused (magic,
        /// version, header checksum or payload checksum), never decoded.
        #[test]
        fn every_bit_flip_is_detected(f in frame()) {
            let good = encoded(&f);
            for bit in 0..good.len() * 8 {
                let mut b = good.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                let r = decode_all(b);
                prop_assert!(
                    matches!(
                        r,
                        Err(WireError::BadMagic(_)
                            | WireError::UnsupportedVersion(_)
                            | WireError::HeaderChecksum { .. }
                            | WireError::PayloadChecksum { .. })
                    ),
                    "flipping bit {} of {:?} gave {:?}", bit, f.kind(), r
                );
            }
        }

        /// A frame cut anywhere decodes to None (incomplete) until its last
        /// byte arrives, fed one byte at a time.
        #[test]
        fn truncated_frames_are_incomplete(f in frame()) {
            let all = encoded(&f);
            let mut d = FrameDecoder::new();
            let mut b = BytesMut::new();
            for (i, byte) in all.iter().enumerate() {
                b.put_u8(*byte);
                let r = d.decode(&mut b);
                if i + 1 < all.len() {
                    prop_assert_eq!(r, Ok(None), "byte {} of {}", i, all.len());
                } else {
                    prop_assert_eq!(r, Ok(Some(f.clone())));
                }
            }
        }

        /// Arbitrary bytes never panic and never make the decoder reserve
        /// more than its limits.
        #[test]
        fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..512)) {
            let mut b = BytesMut::from(&data[..]);
            let mut d = FrameDecoder::new();
            while let Ok(Some(_)) = d.decode(&mut b) {}
            // Random bytes never carry a valid header checksum, so nothing
            // may be reserved beyond what was handed in.
            prop_assert!(b.capacity() <= data.len());
        }

        /// Headers with valid checksums and arbitrary fields: the decoder
        /// refuses or waits, and waits only for a payload within the kind's
        /// limit; what it reserves is bounded by that limit.
        #[test]
        fn arbitrary_valid_headers_respect_limits(
            kind in any::<u8>(), flags in any::<u16>(), id in any::<u64>(), offset in any::<u64>(),
            len in any::<u32>(), payload_len in any::<u32>(), payload_crc in any::<u32>(),
            tail in vec(any::<u8>(), 0..64),
        ) {
            let h = RawHeader { kind, flags, id, offset, len, payload_len, payload_crc };
            let mut b = header_bytes(h);
            b.put_slice(&tail);
            let mut d = FrameDecoder::new();
            match d.decode(&mut b) {
                Ok(None) => {
                    let k = Kind::from_code(kind).expect("a known kind");
                    prop_assert!(payload_len <= k.max_payload());
                    prop_assert!(payload_len as usize > tail.len());
                    prop_assert!(b.capacity() <= 2 * k.max_payload() as usize + HEADER_LEN + 64);
                }
                Ok(Some(f)) => prop_assert!(payload_len as usize <= tail.len(), "{:?}", f),
                Err(_) => {}
            }
        }

        /// Compressed Writes of random, partly compressible data roundtrip to
        /// the plain Write the mirror applies.
        #[test]
        fn compressed_writes_roundtrip(
            id in any::<u64>(), offset in 0..u64::MAX / 2, fua in any::<bool>(),
            data in compressible(20_000), codec in codec(),
        ) {
            let b = encoded_write(id, offset, fua, &data, codec);
            let f = Frame::Write { id, offset, fua, data: Bytes::from(data) };
            prop_assert_eq!(decode_all(b), Ok(Some(f)));
        }

        /// Every bit flip in a compressed Write is caught by a checksum
        /// before anything is decompressed.
        #[test]
        fn every_bit_flip_in_a_compressed_write_is_detected(
            data in compressible(600), codec in codec(),
        ) {
            let good = encoded_write(3, 4096, false, &data, codec);
            for bit in 0..good.len() * 8 {
                let mut b = good.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                let r = decode_all(b);
                prop_assert!(
                    matches!(
                        r,
                        Err(WireError::BadMagic(_)
                            | WireError::UnsupportedVersion(_)
                            | WireError::HeaderChecksum { .. }
                            | WireError::PayloadChecksum { .. })
                    ),
                    "flipping bit {} gave {:?}", bit, r
                );
            }
        }

        /// A compressed Write cut anywhere is incomplete, never an error or
        /// a short write, until its last byte arrives.
        #[test]
        fn truncated_compressed_writes_are_incomplete(data in compressible(2000), codec in codec()) {
            let all = encoded_write(9, 0, true, &data, codec);
            let mut d = FrameDecoder::new();
            let mut b = BytesMut::new();
            for (i, byte) in all.iter().enumerate() {
                b.put_u8(*byte);
                let r = d.decode(&mut b);
                if i + 1 < all.len() {
                    prop_assert_eq!(r, Ok(None), "byte {} of {}", i, all.len());
                } else {
                    let whole = matches!(r, Ok(Some(Frame::Write { .. })));
                    prop_assert!(whole, "{:?}", r);
                }
            }
        }

        /// A sender that lies about `len` (the data's length) with valid
        /// checksums: refused with a typed error, never a write of another
        /// length, never a buffer beyond the declared `len`.
        #[test]
        fn lying_lengths_are_refused(
            data in compressible(20_000), codec in prop_oneof![Just(Codec::Lz4), Just(Codec::Zstd)],
            lie in any::<u32>(),
        ) {
            let w = EncodedWrite::new(Bytes::from(data.clone()), codec);
            prop_assume!(w.codec != Codec::None);
            prop_assume!(lie != w.len);
            let h = RawHeader {
                kind: Kind::Write.code(),
                flags: codec.flag(),
                id: 1,
                offset: 0,
                len: lie,
                payload_len: w.payload.len() as u32,
                payload_crc: w.crc,
            };
            match Frame::from_parts(&h, w.payload.clone()) {
                Err(WireError::CompressedLength { .. }) => {
                    prop_assert!(lie > MAX_DATA || w.payload.len() as u32 >= lie)
                }
                Err(WireError::Decompress { id: 1, offset: 0, codec: c, .. }) => prop_assert_eq!(c, codec),
                other => prop_assert!(false, "len {} for {} bytes gave {:?}", lie, w.len, other),
            }
        }

        /// Arbitrary payloads with a valid checksum behind a compression
        /// flag: refused, or (if they happen to be a valid stream) exactly
        /// `len` bytes; never a panic.
        #[test]
        fn garbage_compressed_payloads_are_refused(
            payload in vec(any::<u8>(), 0..300), len in 1u32..100_000,
            codec in prop_oneof![Just(Codec::Lz4), Just(Codec::Zstd)],
        ) {
            let h = RawHeader {
                kind: Kind::Write.code(),
                flags: codec.flag(),
                id: 2,
                offset: 512,
                len,
                payload_len: payload.len() as u32,
                payload_crc: crc32c::crc32c(&payload),
            };
            match Frame::from_parts(&h, Bytes::from(payload.clone())) {
                Ok(Frame::Write { data, .. }) => prop_assert_eq!(data.len(), len as usize),
                Ok(f) => prop_assert!(false, "{:?}", f),
                Err(WireError::CompressedLength { .. }) => prop_assert!(payload.len() as u32 >= len),
                Err(WireError::Decompress { id: 2, offset: 512, .. }) => {}
                Err(e) => prop_assert!(false, "{}", e),
            }
        }

        /// Job frames with a correct payload checksum and arbitrary header
        /// fields and payload: the decoder refuses, waits within the kind's
        /// limit, or decodes a frame whose encoding is exactly the input
        /// (one encoding per frame; nothing it accepts is lost or altered).
        #[test]
        fn arbitrary_job_frames_decode_canonically_or_are_refused(
            kind in 64u8..=71, id in any::<u64>(), offset in prop_oneof![Just(0u64), any::<u64>()],
            len in prop_oneof![Just(0u32), Just(4096u32), Just(8192u32), any::<u32>()],
            payload in prop_oneof![
                vec(any::<u8>(), 0..80),
                (any::<u64>(), 12u32..=24).prop_map(|(l, b)| [l.to_be_bytes().to_vec(), (1u32 << b).to_be_bytes().to_vec()].concat()),
            ],
        ) {
            let h = RawHeader {
                kind,
                flags: 0,
                id,
                offset,
                len,
                payload_len: payload.len() as u32,
                payload_crc: crc32c::crc32c(&payload),
            };
            let mut input = header_bytes(h);
            input.put_slice(&payload);
            let all = input.clone();
            match FrameDecoder::new().decode(&mut input) {
                Ok(Some(f)) => {
                    prop_assert!(f.kind().is_job());
                    prop_assert_eq!(encoded(&f), all, "{:?}", f);
                }
                Ok(None) => prop_assert!(payload.len() < h.payload_len as usize),
                Err(_) => {}
            }
        }

        /// Divergence payloads with a correct checksum, built from parts
        /// that are each sometimes wrong (flag bits, reserved bytes, count,
        /// range order, lengths, overflow): the decoder refuses them, or
        /// decodes a frame whose encoding is exactly the input.
        #[test]
        fn arbitrary_divergence_payloads_decode_canonically_or_are_refused(
            flags in prop_oneof![0u8..4, any::<u8>()],
            reserved in prop_oneof![Just([0u8; 3]), any::<[u8; 3]>()],
            count_skew in prop_oneof![Just(0i64), -2i64..=2, Just(i64::from(u32::MAX))],
            ranges in prop_oneof![
                divergence_ranges(6),
                vec((prop_oneof![Just(0u64), Just(u64::MAX), 0..1u64 << 20],
                     prop_oneof![Just(0u64), Just(u64::MAX), 0..1u64 << 20]), 0..6),
            ],
            tail in prop_oneof![Just(Vec::new()), vec(any::<u8>(), 1..20)],
        ) {
            let count = (ranges.len() as i64 + count_skew).clamp(0, i64::from(u32::MAX)) as u32;
            let mut payload = vec![flags];
            payload.extend_from_slice(&reserved);
            payload.extend_from_slice(&count.to_be_bytes());
            for (o, l) in &ranges {
                payload.extend_from_slice(&o.to_be_bytes());
                payload.extend_from_slice(&l.to_be_bytes());
            }
            payload.extend_from_slice(&tail);
            let input = divergence_bytes(&payload);
            let all = input.clone();
            match decode_all(input) {
                Ok(Some(f)) => {
                    prop_assert_eq!(encoded(&f), all, "{:?}", f);
                    let Frame::Divergence { ranges: got, .. } = f else {
                        return Err(TestCaseError::fail("not a Divergence"));
                    };
                    prop_assert_eq!(check_divergence_ranges(&got), Ok(()));
                }
                Ok(None) => prop_assert!(false, "a whole frame is incomplete"),
                Err(_) => {}
            }
        }

        #[test]
        fn error_codes_roundtrip(c in any::<u32>()) {
            prop_assert_eq!(ErrorCode::from_code(c).code(), c);
        }
    }

    fn codec() -> impl Strategy<Value = Codec> {
        prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd)]
    }

    /// Runs of repeated bytes mixed with noise: some compress, some not.
    fn compressible(max: usize) -> impl Strategy<Value = Vec<u8>> {
        vec((any::<u8>(), 1usize..200, any::<bool>()), 0..=max / 100).prop_map(move |runs| {
            let mut out = Vec::new();
            for (b, n, noisy) in runs {
                for i in 0..n {
                    out.push(if noisy {
                        b.wrapping_mul(i as u8 | 1)
                    } else {
                        b
                    });
                }
            }
            out.truncate(max);
            out
        })
    }

    /// A Write as the primary's pipeline sends it: header, then the payload.
    fn encoded_write(id: u64, offset: u64, fua: bool, data: &[u8], codec: Codec) -> BytesMut {
        let w = EncodedWrite::new(Bytes::copy_from_slice(data), codec);
        let mut b = BytesMut::new();
        encode_encoded_write_header(id, offset, fua, &w, &mut b);
        b.put_slice(&w.payload);
        b
    }

    /// Data that expands far beyond what the header declares: the decoder
    /// stops at the declared length instead of allocating the rest.
    #[test]
    fn decompression_bombs_are_refused() {
        let zeros = vec![0u8; MAX_DATA as usize];
        for codec in [Codec::Lz4, Codec::Zstd] {
            let w = EncodedWrite::new(Bytes::from(zeros.clone()), codec);
            assert_eq!(w.codec, codec);
            assert!(w.payload.len() < 256 * 1024, "{codec}: {}", w.payload.len());
            for declared in [w.payload.len() as u32 + 1, 1 << 20, MAX_DATA - 1] {
                let h = RawHeader {
                    kind: Kind::Write.code(),
                    flags: codec.flag(),
                    id: 4,
                    offset: 0,
                    len: declared,
                    payload_len: w.payload.len() as u32,
                    payload_crc: w.crc,
                };
                let r = Frame::from_parts(&h, w.payload.clone());
                assert!(
                    matches!(r, Err(WireError::Decompress { id: 4, codec: c, .. }) if c == codec),
                    "{codec}, declared {declared}: {r:?}"
                );
            }
            // Declaring more than MAX_DATA is refused from the header alone.
            let h = RawHeader {
                kind: Kind::Write.code(),
                flags: codec.flag(),
                id: 4,
                offset: 0,
                len: MAX_DATA + 1,
                payload_len: w.payload.len() as u32,
                payload_crc: w.crc,
            };
            assert!(matches!(
                decode_all(header_bytes(h)),
                Err(WireError::CompressedLength { .. })
            ));
        }
    }

    #[test]
    fn compression_flag_errors_are_specific() {
        let base = RawHeader {
            kind: Kind::Write.code(),
            flags: FLAG_LZ4 | FLAG_ZSTD,
            id: 6,
            offset: 0,
            len: 100,
            payload_len: 10,
            payload_crc: 0,
        };
        assert_eq!(
            decode_all(header_bytes(base)),
            Err(WireError::TwoCodecs {
                kind: Kind::Write,
                id: 6,
                flags: FLAG_LZ4 | FLAG_ZSTD
            })
        );
        // A "compressed" payload no shorter than its data.
        for payload_len in [100, 101] {
            let h = RawHeader {
                flags: FLAG_ZSTD,
                payload_len,
                ..base
            };
            assert_eq!(
                decode_all(header_bytes(h)),
                Err(WireError::CompressedLength {
                    kind: Kind::Write,
                    id: 6,
                    len: 100,
                    payload_len
                })
            );
        }
        // Compression flags belong to Write only.
        let h = RawHeader {
            kind: Kind::Trim.code(),
            flags: FLAG_LZ4,
            payload_len: 0,
            ..base
        };
        assert!(matches!(
            decode_all(header_bytes(h)),
            Err(WireError::BadFlags {
                kind: Kind::Trim,
                ..
            })
        ));
    }

    #[test]
    fn encoded_plain_write_equals_encode() {
        let data = Bytes::from(vec![0x3c; 8192]);
        let w = EncodedWrite::new(data.clone(), Codec::None);
        let mut b = BytesMut::new();
        encode_encoded_write_header(8, 512, false, &w, &mut b);
        b.put_slice(&w.payload);
        let f = Frame::Write {
            id: 8,
            offset: 512,
            fua: false,
            data,
        };
        assert_eq!(b, encoded(&f));
    }

    #[test]
    fn oversized_payload_is_refused_before_any_allocation() {
        for kind in Kind::ALL {
            let max = kind.max_payload();
            let h = RawHeader {
                kind: kind.code(),
                flags: 0,
                id: 0,
                offset: 0,
                len: u32::MAX,
                payload_len: u32::MAX,
                payload_crc: 0,
            };
            let mut b = header_bytes(h);
            let cap = b.capacity();
            assert_eq!(
                FrameDecoder::new().decode(&mut b),
                Err(WireError::PayloadTooLarge {
                    kind,
                    id: 0,
                    len: u32::MAX,
                    max
                })
            );
            assert_eq!(b.capacity(), cap, "{kind}: buffer grew");
            assert_eq!(b.len(), HEADER_LEN, "{kind}: header consumed");
        }
        // One past the Write limit, with len matching.
        let h = RawHeader {
            kind: Kind::Write.code(),
            flags: 0,
            id: 9,
            offset: 0,
            len: MAX_DATA + 1,
            payload_len: MAX_DATA + 1,
            payload_crc: 0,
        };
        assert!(matches!(
            decode_all(header_bytes(h)),
            Err(WireError::PayloadTooLarge { id: 9, .. })
        ));
    }

    #[test]
    fn forged_ack_with_wrong_header_crc_is_refused() {
        let mut b = encoded(&Frame::Ack { id: 42 });
        // Forge: change the id to another in-flight request, keep the old crc.
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert!(matches!(
            decode_all(b.clone()),
            Err(WireError::HeaderChecksum { .. })
        ));
        // Forge a header from scratch with a made-up crc.
        let mut raw = RawHeader {
            kind: Kind::Ack.code(),
            flags: 0,
            id: 7,
            offset: 0,
            len: 0,
            payload_len: 0,
            payload_crc: 0,
        }
        .to_bytes();
        raw[36..40].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        assert!(matches!(
            decode_all(BytesMut::from(&raw[..])),
            Err(WireError::HeaderChecksum {
                stored: 0xdead_beef,
                ..
            })
        ));
    }

    #[test]
    fn header_errors_are_specific() {
        let ack = encoded(&Frame::Ack { id: 1 });
        let mut b = ack.clone();
        b[0] = b'X';
        assert!(matches!(decode_all(b), Err(WireError::BadMagic(_))));
        let mut b = ack.clone();
        b[4] = 2;
        assert_eq!(decode_all(b), Err(WireError::UnsupportedVersion(2)));

        let base = RawHeader {
            kind: Kind::Ack.code(),
            flags: 0,
            id: 5,
            offset: 0,
            len: 0,
            payload_len: 0,
            payload_crc: 0,
        };
        let check = |h: RawHeader| decode_all(header_bytes(h));
        assert_eq!(
            check(RawHeader { kind: 99, ..base }),
            Err(WireError::UnknownKind { kind: 99, id: 5 })
        );
        assert_eq!(
            check(RawHeader {
                flags: FLAG_FUA,
                ..base
            }),
            Err(WireError::BadFlags {
                kind: Kind::Ack,
                id: 5,
                flags: FLAG_FUA,
                allowed: 0
            })
        );
        assert_eq!(
            check(RawHeader {
                kind: Kind::Write.code(),
                flags: FLAG_NO_TRIM,
                ..base
            }),
            Err(WireError::BadFlags {
                kind: Kind::Write,
                id: 5,
                flags: FLAG_NO_TRIM,
                allowed: FLAG_FUA | FLAG_LZ4 | FLAG_ZSTD
            })
        );
        assert_eq!(
            check(RawHeader {
                offset: 4096,
                ..base
            }),
            Err(WireError::NonZeroField {
                kind: Kind::Ack,
                id: 5,
                field: "offset",
                value: 4096
            })
        );
        assert_eq!(
            check(RawHeader {
                kind: Kind::Hello.code(),
                ..base
            }),
            Err(WireError::NonZeroField {
                kind: Kind::Hello,
                id: 5,
                field: "id",
                value: 5
            })
        );
        assert_eq!(
            check(RawHeader {
                kind: Kind::Write.code(),
                len: 4096,
                payload_len: 512,
                ..base
            }),
            Err(WireError::LengthMismatch {
                kind: Kind::Write,
                id: 5,
                len: 4096,
                payload_len: 512
            })
        );
        assert_eq!(
            check(RawHeader {
                kind: Kind::Trim.code(),
                offset: u64::MAX,
                len: 1,
                ..base
            }),
            Err(WireError::RangeOverflow {
                kind: Kind::Trim,
                id: 5,
                offset: u64::MAX,
                len: 1
            })
        );
    }

    #[test]
    fn malformed_control_payloads() {
        // A Nack too short for its errno, and one with a non-UTF-8 message.
        for payload in [&b"\0\0"[..], &b"\0\0\0\x05\xff\xfe"[..]] {
            let n = payload.len() as u32;
            let h = RawHeader {
                kind: Kind::Nack.code(),
                flags: 0,
                id: 3,
                offset: 0,
                len: n,
                payload_len: n,
                payload_crc: crc32c::crc32c(payload),
            };
            let mut b = header_bytes(h);
            b.put_slice(payload);
            assert!(matches!(
                decode_all(b),
                Err(WireError::Malformed {
                    kind: Kind::Nack,
                    id: 3,
                    ..
                })
            ));
        }
    }

    /// SyncState: the header layer refuses any length but the fixed one
    /// (before the payload is read); the payload layer refuses unknown phases.
    #[test]
    fn malformed_sync_state() {
        for n in [0u32, 1, SYNC_STATE_LEN - 1, SYNC_STATE_LEN + 1, 4096] {
            let h = RawHeader {
                kind: Kind::SyncState.code(),
                flags: 0,
                id: 9,
                offset: 0,
                len: n,
                payload_len: n,
                payload_crc: 0,
            };
            assert!(
                matches!(
                    h.validate(),
                    Err(WireError::Malformed {
                        kind: Kind::SyncState,
                        ..
                    } | WireError::PayloadTooLarge {
                        kind: Kind::SyncState,
                        ..
                    })
                ),
                "length {n}"
            );
        }
        let good = encoded(&Frame::SyncState {
            id: 9,
            phase: SyncPhase::InSync,
            generation: 7,
            history: [6, 5, 0, 0],
        });
        for phase in [0u8, 3, 255] {
            let mut payload = good[HEADER_LEN..].to_vec();
            payload[0] = phase;
            let h = RawHeader {
                kind: Kind::SyncState.code(),
                flags: 0,
                id: 9,
                offset: 0,
                len: SYNC_STATE_LEN,
                payload_len: SYNC_STATE_LEN,
                payload_crc: crc32c::crc32c(&payload),
            };
            let mut b = header_bytes(h);
            b.put_slice(&payload);
            assert!(matches!(
                decode_all(b),
                Err(WireError::Malformed {
                    kind: Kind::SyncState,
                    id: 9,
                    ..
                })
            ));
        }
        // Offset must be zero.
        let h = RawHeader {
            kind: Kind::SyncState.code(),
            flags: 0,
            id: 9,
            offset: 1,
            len: SYNC_STATE_LEN,
            payload_len: SYNC_STATE_LEN,
            payload_crc: 0,
        };
        assert!(matches!(
            h.validate(),
            Err(WireError::NonZeroField {
                field: "offset",
                ..
            })
        ));
    }

    /// HashReply has exactly one length; HashRequest's range must not overflow.
    #[test]
    fn malformed_hash_frames() {
        for n in [0u32, 31, 33] {
            let h = RawHeader {
                kind: Kind::HashReply.code(),
                flags: 0,
                id: 4,
                offset: 0,
                len: n,
                payload_len: n,
                payload_crc: 0,
            };
            assert!(
                matches!(
                    h.validate(),
                    Err(WireError::Malformed {
                        kind: Kind::HashReply,
                        ..
                    } | WireError::PayloadTooLarge {
                        kind: Kind::HashReply,
                        ..
                    })
                ),
                "length {n}"
            );
        }
        let h = RawHeader {
            kind: Kind::HashRequest.code(),
            flags: 0,
            id: 4,
            offset: u64::MAX,
            len: 2,
            payload_len: 0,
            payload_crc: crc32c::crc32c(&[]),
        };
        assert!(matches!(
            h.validate(),
            Err(WireError::RangeOverflow {
                kind: Kind::HashRequest,
                ..
            })
        ));
        let h = RawHeader {
            offset: 0,
            payload_len: 1,
            ..h
        };
        assert!(matches!(
            h.validate(),
            Err(WireError::PayloadTooLarge {
                kind: Kind::HashRequest,
                ..
            })
        ));
    }

    #[test]
    fn long_messages_are_clipped_on_a_char_boundary() {
        let message = "é".repeat(MAX_CONTROL_PAYLOAD as usize);
        let b = encoded(&Frame::Error {
            id: 0,
            code: ErrorCode::Internal,
            message,
        });
        match decode_all(b) {
            Ok(Some(Frame::Error { message, .. })) => {
                assert!(message.len() <= MAX_CONTROL_PAYLOAD as usize - CODE_LEN);
                assert!(message.len() >= MAX_CONTROL_PAYLOAD as usize - CODE_LEN - 1);
                assert!(message.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write_header_then_data_equals_encode() {
        let data = Bytes::from(vec![0xa5; 8192]);
        let f = Frame::Write {
            id: 11,
            offset: 1 << 20,
            fua: true,
            data: data.clone(),
        };
        let mut split = BytesMut::new();
        encode_write_header(11, 1 << 20, true, &data, &mut split);
        assert_eq!(split.len(), HEADER_LEN);
        split.put_slice(&data);
        assert_eq!(split, encoded(&f));
    }

    #[test]
    fn payload_is_taken_without_copying() {
        let mut b = encoded(&Frame::Write {
            id: 1,
            offset: 0,
            fua: false,
            data: Bytes::from(vec![7u8; 4096]),
        });
        let start = b.as_ptr() as usize;
        match FrameDecoder::new().decode(&mut b) {
            Ok(Some(Frame::Write { data, .. })) => {
                assert_eq!(data.as_ptr() as usize, start + HEADER_LEN);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn max_size_write_roundtrips() {
        let data = Bytes::from(vec![1u8; MAX_DATA as usize]);
        let f = Frame::Write {
            id: 1,
            offset: 0,
            fua: false,
            data,
        };
        assert_eq!(decode_all(encoded(&f)), Ok(Some(f)));
    }

    /// A job frame with a valid header checksum and `payload`.
    fn job_bytes(kind: Kind, offset: u64, len: u32, payload: &[u8]) -> BytesMut {
        let mut b = header_bytes(RawHeader {
            kind: kind.code(),
            flags: 0,
            id: 4,
            offset,
            len,
            payload_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(payload),
        });
        b.put_slice(payload);
        b
    }

    #[test]
    fn malformed_job_frames_are_refused() {
        let link = 9u64.to_be_bytes();
        let hash = |block: u32| [&link[..], &block.to_be_bytes()].concat();
        // Hash blocks: not a power of two, too small, too many digests, empty.
        for (len, block) in [
            (8192, 12288),
            (4096, 512),
            (MAX_JOB_HASHES * 4096 + 1, 4096),
            (0, 4096),
        ] {
            assert!(
                matches!(
                    decode_all(job_bytes(Kind::JobHash, 0, len, &hash(block))),
                    Err(WireError::Malformed {
                        kind: Kind::JobHash,
                        ..
                    })
                ),
                "len {len} block {block}"
            );
        }
        // A payload length the kind does not allow, judged from the header.
        assert!(matches!(
            decode_all(job_bytes(Kind::JobRead, 0, 4096, &link[..4])),
            Err(WireError::PayloadLength {
                kind: Kind::JobRead,
                expected: 8,
                ..
            })
        ));
        assert!(matches!(
            decode_all(job_bytes(Kind::JobData, 0, 100, &[0; 50])),
            Err(WireError::PayloadLength {
                kind: Kind::JobData,
                expected: 108,
                ..
            })
        ));
        // Read of nothing, or beyond MAX_DATA.
        for len in [0, MAX_DATA + 1] {
            assert!(matches!(
                decode_all(job_bytes(Kind::JobRead, 0, len, &link)),
                Err(WireError::Malformed {
                    kind: Kind::JobRead,
                    ..
                })
            ));
        }
        // A close with a range.
        assert!(matches!(
            decode_all(job_bytes(Kind::JobClose, 4096, 0, &link)),
            Err(WireError::NonZeroField {
                field: "offset",
                ..
            })
        ));
        // Digests that do not match the range.
        let mut p = hash(4096);
        p.extend_from_slice(&[0; DIGEST_LEN]);
        assert!(matches!(
            decode_all(job_bytes(Kind::JobHashes, 0, 8192, &p)),
            Err(WireError::Malformed {
                kind: Kind::JobHashes,
                ..
            })
        ));
        // A range that overflows.
        assert!(matches!(
            decode_all(job_bytes(Kind::JobRead, u64::MAX, 1, &link)),
            Err(WireError::RangeOverflow { .. })
        ));
        // A JobError whose message is not UTF-8.
        let p = [&link[..], &1u32.to_be_bytes(), &[0xff, 0xfe]].concat();
        assert!(matches!(
            decode_all(job_bytes(Kind::JobError, 0, 0, &p)),
            Err(WireError::Malformed {
                kind: Kind::JobError,
                ..
            })
        ));
    }

    #[test]
    fn max_size_job_data_roundtrips() {
        let f = Frame::JobData {
            id: 1,
            link: 2,
            offset: 0,
            data: Bytes::from(vec![3u8; MAX_DATA as usize]),
        };
        assert_eq!(decode_all(encoded(&f)), Ok(Some(f)));
    }

    /// A Divergence frame with a valid header (and checksums) for `payload`.
    fn divergence_bytes(payload: &[u8]) -> BytesMut {
        let n = payload.len() as u32;
        let mut b = header_bytes(RawHeader {
            kind: Kind::Divergence.code(),
            flags: 0,
            id: 0,
            offset: 0,
            len: n,
            payload_len: n,
            payload_crc: crc32c::crc32c(payload),
        });
        b.put_slice(payload);
        b
    }

    /// A Divergence payload: `flags`, zero reserved bytes, `count`, `ranges`.
    fn divergence_payload(flags: u8, count: u32, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut p = vec![flags, 0, 0, 0];
        p.extend_from_slice(&count.to_be_bytes());
        for (o, l) in ranges {
            p.extend_from_slice(&o.to_be_bytes());
            p.extend_from_slice(&l.to_be_bytes());
        }
        p
    }

    fn assert_divergence_malformed(payload: &[u8], what: &str) {
        let r = decode_all(divergence_bytes(payload));
        assert!(
            matches!(
                r,
                Err(WireError::Malformed {
                    kind: Kind::Divergence,
                    id: 0,
                    ..
                })
            ),
            "{what}: {r:?}"
        );
    }

    /// `n` ascending ranges of varying length and gap (some touching).
    fn sample_ranges(n: usize) -> Vec<(u64, u64)> {
        let mut at = 1u64 << 30;
        (0..n as u64)
            .map(|i| {
                let offset = at + (i % 3) * 4096;
                let len = 512 * (1 + i % 7);
                at = offset + len;
                (offset, len)
            })
            .collect()
    }

    #[test]
    fn max_divergence_ranges_fill_one_control_payload() {
        assert_eq!(
            MAX_DIVERGENCE_RANGES,
            (MAX_CONTROL_PAYLOAD as usize - 8) / 16
        );
        let f = Frame::Divergence {
            was_primary: true,
            last: true,
            ranges: sample_ranges(MAX_DIVERGENCE_RANGES),
        };
        let b = encoded(&f);
        assert_eq!(b.len(), HEADER_LEN + 8 + 16 * MAX_DIVERGENCE_RANGES);
        assert!(b.len() - HEADER_LEN <= MAX_CONTROL_PAYLOAD as usize);
        assert!(b.len() - HEADER_LEN + 16 > MAX_CONTROL_PAYLOAD as usize);
        assert_eq!(decode_all(b), Ok(Some(f)));
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn encoding_too_many_divergence_ranges_panics() {
        encoded(&Frame::Divergence {
            was_primary: false,
            last: true,
            ranges: sample_ranges(MAX_DIVERGENCE_RANGES + 1),
        });
    }

    /// divergence_frames: as many frames as needed (at least one), each
    /// within the limit, `last` only on the final one, `was_primary` on
    /// all; the frames' ranges, decoded and concatenated, are the input.
    #[test]
    fn divergence_frames_roundtrip() {
        let m = MAX_DIVERGENCE_RANGES;
        for (n, frames) in [(0, 1), (1, 1), (m, 1), (m + 1, 2), (3 * m + 5, 4)] {
            let input = sample_ranges(n);
            for was_primary in [false, true] {
                let fs = divergence_frames(was_primary, &input);
                assert_eq!(fs.len(), frames, "{n} ranges");
                let mut stream = BytesMut::new();
                for f in &fs {
                    f.encode(&mut stream);
                }
                let mut d = FrameDecoder::new();
                let mut got = Vec::new();
                for i in 0..frames {
                    match d.decode(&mut stream) {
                        Ok(Some(Frame::Divergence {
                            was_primary: w,
                            last,
                            ranges,
                        })) => {
                            assert_eq!(w, was_primary, "{n} ranges, frame {i}");
                            assert_eq!(last, i + 1 == frames, "{n} ranges, frame {i}");
                            assert!(ranges.len() <= m);
                            assert!(!ranges.is_empty() || n == 0);
                            got.extend(ranges);
                        }
                        other => panic!("{n} ranges, frame {i}: {other:?}"),
                    }
                }
                assert_eq!(d.decode(&mut stream), Ok(None));
                assert!(stream.is_empty());
                assert_eq!(got, input, "{n} ranges");
            }
        }
    }

    /// Every single-bit flip of an encoded Divergence is refused by a
    /// checksum. And with the checksum recomputed (a flip the checksum
    /// cannot see), a flip in the payload is refused by the payload checks
    /// or decodes to another frame, never silently to the same one.
    #[test]
    fn every_bit_flip_in_a_divergence_is_caught() {
        let f = Frame::Divergence {
            was_primary: true,
            last: false,
            ranges: vec![
                (0, 4096),
                (4096, 512),
                (1 << 40, 1 << 20),
                (u64::MAX - 7, 7),
            ],
        };
        let good = encoded(&f);
        for bit in 0..good.len() * 8 {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let r = decode_all(b);
            assert!(
                matches!(
                    r,
                    Err(WireError::BadMagic(_)
                        | WireError::UnsupportedVersion(_)
                        | WireError::HeaderChecksum { .. }
                        | WireError::PayloadChecksum { .. })
                ),
                "flipping bit {bit} gave {r:?}"
            );
        }
        let payload = &good[HEADER_LEN..];
        let (mut refused, mut changed) = (0, 0);
        for bit in 0..payload.len() * 8 {
            let mut p = payload.to_vec();
            p[bit / 8] ^= 1 << (bit % 8);
            let input = divergence_bytes(&p);
            match decode_all(input.clone()) {
                Err(WireError::Malformed {
                    kind: Kind::Divergence,
                    ..
                }) => refused += 1,
                Ok(Some(g)) => {
                    assert_ne!(g, f, "payload bit {bit}");
                    assert_eq!(encoded(&g), input, "payload bit {bit}");
                    changed += 1;
                }
                other => panic!("payload bit {bit}: {other:?}"),
            }
        }
        // Flags bits 2..8, the reserved bytes and the count are always
        // refused; flips in the ranges may still be valid ranges.
        assert!(refused >= 6 + 24 + 32, "{refused} refused");
        assert!(changed > 0);
    }

    /// A payload cut short: refused when the header promised more than
    /// arrived, and, when the header matches the cut payload, refused by
    /// the header's length rule or by the count.
    #[test]
    fn truncated_divergence_payloads_are_refused() {
        let f = Frame::Divergence {
            was_primary: false,
            last: true,
            ranges: sample_ranges(3),
        };
        let good = encoded(&f);
        let h = RawHeader::decode(good[..HEADER_LEN].try_into().unwrap()).unwrap();
        let payload = Bytes::copy_from_slice(&good[HEADER_LEN..]);
        for cut in 0..payload.len() {
            assert!(
                matches!(
                    Frame::from_parts(&h, payload.slice(..cut)),
                    Err(WireError::Malformed {
                        kind: Kind::Divergence,
                        ..
                    })
                ),
                "cut at {cut}"
            );
            assert_divergence_malformed(&payload[..cut], &format!("consistent cut at {cut}"));
        }
    }

    #[test]
    fn bad_divergence_ranges_are_refused() {
        let cases: [(&str, &[(u64, u64)]); 8] = [
            ("unsorted", &[(8192, 512), (0, 512)]),
            ("overlapping", &[(0, 4096), (4095, 512)]),
            ("duplicate", &[(0, 4096), (0, 4096)]),
            ("contained", &[(0, 8192), (4096, 512)]),
            ("zero length", &[(0, 512), (4096, 0)]),
            ("zero length first", &[(0, 0)]),
            ("overflowing", &[(u64::MAX - 511, 512)]),
            ("overflowing after others", &[(0, 512), (1, u64::MAX)]),
        ];
        for (what, ranges) in cases {
            let p = divergence_payload(DIVERGENCE_LAST, ranges.len() as u32, ranges);
            assert_divergence_malformed(&p, what);
        }
        // Touching ranges and one ending exactly at the top of u64 are fine.
        let ok = [(0, 512), (512, 512), (u64::MAX - 512, 512)];
        let p = divergence_payload(DIVERGENCE_LAST, 3, &ok);
        assert_eq!(
            decode_all(divergence_bytes(&p)),
            Ok(Some(Frame::Divergence {
                was_primary: false,
                last: true,
                ranges: ok.to_vec(),
            }))
        );
    }

    #[test]
    fn divergence_flag_and_reserved_bits_are_refused() {
        let ranges = [(0, 4096)];
        for bit in 2..8 {
            let p = divergence_payload(1 << bit, 1, &ranges);
            assert_divergence_malformed(&p, &format!("flag bit {bit}"));
        }
        for byte in 1..4 {
            let mut p = divergence_payload(0, 1, &ranges);
            p[byte] = 0x80;
            assert_divergence_malformed(&p, &format!("reserved byte {byte}"));
        }
        // Header flags, id and offset must be zero; len must equal the
        // payload length.
        let p = divergence_payload(0, 1, &ranges);
        let base = RawHeader {
            kind: Kind::Divergence.code(),
            flags: 0,
            id: 0,
            offset: 0,
            len: p.len() as u32,
            payload_len: p.len() as u32,
            payload_crc: crc32c::crc32c(&p),
        };
        assert!(matches!(
            RawHeader {
                flags: FLAG_FUA,
                ..base
            }
            .validate(),
            Err(WireError::BadFlags {
                kind: Kind::Divergence,
                ..
            })
        ));
        assert!(matches!(
            RawHeader { id: 3, ..base }.validate(),
            Err(WireError::NonZeroField { field: "id", .. })
        ));
        assert!(matches!(
            RawHeader { offset: 3, ..base }.validate(),
            Err(WireError::NonZeroField {
                field: "offset",
                ..
            })
        ));
        assert!(matches!(
            RawHeader { len: 0, ..base }.validate(),
            Err(WireError::LengthMismatch { .. })
        ));
        assert_eq!(base.validate(), Ok(Kind::Divergence));
    }

    /// The count must match the ranges that follow; a length that is not
    /// the prefix plus whole ranges is refused from the header alone.
    #[test]
    fn divergence_count_must_match_length() {
        let ranges = sample_ranges(3);
        for count in [0, 2, 4, 5, u32::MAX] {
            let p = divergence_payload(0, count, &ranges);
            assert_divergence_malformed(&p, &format!("count {count} for 3 ranges"));
        }
        for n in [0u32, 7, 9, 8 + 15, 8 + 17, MAX_CONTROL_PAYLOAD] {
            let h = RawHeader {
                kind: Kind::Divergence.code(),
                flags: 0,
                id: 0,
                offset: 0,
                len: n,
                payload_len: n,
                payload_crc: 0,
            };
            assert!(
                matches!(
                    h.validate(),
                    Err(WireError::Malformed {
                        kind: Kind::Divergence,
                        ..
                    })
                ),
                "length {n}"
            );
        }
        let h = RawHeader {
            kind: Kind::Divergence.code(),
            flags: 0,
            id: 0,
            offset: 0,
            len: MAX_CONTROL_PAYLOAD + 16,
            payload_len: MAX_CONTROL_PAYLOAD + 16,
            payload_crc: 0,
        };
        assert!(matches!(
            h.validate(),
            Err(WireError::PayloadTooLarge {
                kind: Kind::Divergence,
                ..
            })
        ));
    }

    #[test]
    fn kind_codes_roundtrip() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_code(k.code()), Some(k));
        }
        assert_eq!(Kind::from_code(0), None);
    }
}
