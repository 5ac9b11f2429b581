//! NBD wire format: constants, raw structures and their validated forms.
//!
//! Two layers, as the protocol spec (NetworkBlockDevice/nbd doc/proto.md) lays
//! them out: raw fixed-size structures decoded from bytes without judgement
//! ([`RequestHeader`], [`OptionHeader`]), then validated commands
//! ([`Command`]) that the server acts on. All integers are big-endian.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// "NBDMAGIC": the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) | 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

/// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// Block status flags of the base:allocation context.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Sizes of fixed headers on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
pub const OPTION_HEADER_LEN: usize = 16;

/// Longest option payload accepted during the handshake. Real options are a
/// few hundred bytes at most (an export name is at most 4096).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, context query) accepted.
pub const MAX_STRING_LEN: u32 = 4096;

/// NBD error numbers sent in replies (the protocol's own values).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    pub fn code(self) -> u32 {
        self as u32
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(s)
    }
}

/// A decoding failure that ends the connection (the stream can no longer be
/// trusted to be in step with the client).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} payload of {len} bytes exceeds {max}")]
    OptionTooLong { option: u32, len: u32, max: u32 },
}

/// A request header exactly as it was on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Decodes a 28-byte request header; only the magic is judged here.
    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadRequestMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.len);
    }

    /// True when a payload of `len` bytes follows this header on the wire.
    pub fn has_payload(&self) -> bool {
        self.kind == CMD_WRITE
    }
}

/// What the negotiated session allows, for validating commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub structured: bool,
    pub meta_context: bool,
    pub read_only: bool,
    pub fast_zero: bool,
}

/// A validated command. Ranges are not yet checked against the export size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

impl Command {
    /// Validates a header's command and flags for this session. An error is
    /// answered to the client (the stream stays in step: a WRITE's payload is
    /// still consumed by the caller).
    pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Errno> {
        let allow = |allowed: u16| {
            if h.flags & !allowed != 0 {
                Err(Errno::Inval)
            } else {
                Ok(())
            }
        };
        let writable = || {
            if s.read_only {
                Err(Errno::Perm)
            } else {
                Ok(())
            }
        };
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let (offset, len) = (h.offset, h.len);
        match h.kind {
            CMD_READ => {
                // DF is meaningful only with structured replies; we never fragment.
                allow(if s.structured { CMD_FLAG_DF } else { 0 })?;
                Ok(Command::Read { offset, len })
            }
            CMD_WRITE => {
                allow(CMD_FLAG_FUA)?;
                writable()?;
                Ok(Command::Write { offset, len, fua })
            }
            CMD_DISC => Ok(Command::Disconnect),
            CMD_FLUSH => {
                allow(0)?;
                Ok(Command::Flush)
            }
            CMD_TRIM => {
                allow(CMD_FLAG_FUA)?;
                writable()?;
                Ok(Command::Trim { offset, len, fua })
            }
            CMD_CACHE => {
                allow(0)?;
                Ok(Command::Cache { offset, len })
            }
            CMD_WRITE_ZEROES => {
                allow(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
                writable()?;
                let fast = h.flags & CMD_FLAG_FAST_ZERO != 0;
                if fast && !s.fast_zero {
                    return Err(Errno::NotSup);
                }
                Ok(Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
                    fast,
                })
            }
            CMD_BLOCK_STATUS => {
                allow(CMD_FLAG_REQ_ONE)?;
                if !s.meta_context {
                    return Err(Errno::Inval);
                }
                Ok(Command::BlockStatus {
                    offset,
                    len,
                    req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
                })
            }
            _ => Err(Errno::Inval),
        }
    }
}

/// An option request header (the 16 bytes before the option's payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(ProtoError::BadOptionMagic(magic));
        }
        Ok(Self {
            option: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
            len: u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u64(IHAVEOPT);
        out.put_u32(self.option);
        out.put_u32(self.len);
    }
}

/// Why an option's payload was refused (answered with NBD_REP_ERR_INVALID).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionPayloadError {
    #[error("option payload truncated")]
    Truncated,
    #[error("option payload has {0} trailing bytes")]
    Trailing(usize),
    #[error("string of {0} bytes is too long")]
    StringTooLong(u32),
    #[error("string is not UTF-8")]
    NotUtf8,
}

/// A cursor over an option payload that never reads out of bounds.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionPayloadError> {
        if self.b.len() < n {
            return Err(OptionPayloadError::Truncated);
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, OptionPayloadError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, OptionPayloadError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn string(&mut self) -> Result<String, OptionPayloadError> {
        let n = self.u32()?;
        if n > MAX_STRING_LEN {
            return Err(OptionPayloadError::StringTooLong(n));
        }
        let raw = self.take(n as usize)?;
        String::from_utf8(raw.to_vec()).map_err(|_| OptionPayloadError::NotUtf8)
    }
    fn finish(self) -> Result<(), OptionPayloadError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(OptionPayloadError::Trailing(self.b.len()))
        }
    }
}

/// Payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub export: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(b: &[u8]) -> Result<Self, OptionPayloadError> {
        let mut c = Cursor { b };
        let export = c.string()?;
        let n = c.u16()?;
        let mut infos = Vec::with_capacity(usize::from(n).min(16));
        for _ in 0..n {
            infos.push(c.u16()?);
        }
        c.finish()?;
        Ok(Self { export, infos })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.export.len() as u32);
        out.put_slice(self.export.as_bytes());
        out.put_u16(self.infos.len() as u16);
        for i in &self.infos {
            out.put_u16(*i);
        }
    }
}

/// Payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn decode(b: &[u8]) -> Result<Self, OptionPayloadError> {
        let mut c = Cursor { b };
        let export = c.string()?;
        let n = c.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(c.string()?);
        }
        c.finish()?;
        Ok(Self { export, queries })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.export.len() as u32);
        out.put_slice(self.export.as_bytes());
        out.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            out.put_u32(q.len() as u32);
            out.put_slice(q.as_bytes());
        }
    }
}

/// Encodes an option reply header followed by `data`.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Encodes a simple reply header (data, if any, follows separately).
pub fn encode_simple_reply(out: &mut BytesMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Encodes a structured reply chunk header (its payload follows separately).
pub fn encode_chunk_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(len);
}

/// Encodes a complete structured error chunk with the DONE flag.
pub fn encode_error_chunk(out: &mut BytesMut, cookie: u64, error: Errno, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        (4 + 2 + msg.len()) as u32,
    );
    out.put_u32(error.code());
    out.put_u16(msg.len() as u16);
    out.put_slice(msg);
}

/// Encodes the NBD_INFO_EXPORT payload.
pub fn info_export(size: u64, tflags: u16) -> Bytes {
    let mut b = BytesMut::with_capacity(12);
    b.put_u16(INFO_EXPORT);
    b.put_u64(size);
    b.put_u16(tflags);
    b.freeze()
}

/// Encodes the NBD_INFO_BLOCK_SIZE payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(14);
    b.put_u16(INFO_BLOCK_SIZE);
    b.put_u32(min);
    b.put_u32(preferred);
    b.put_u32(max);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SESSION: Session = Session {
        structured: true,
        meta_context: true,
        read_only: false,
        fast_zero: true,
    };

    fn header(kind: u16, flags: u16) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset: 4096,
            len: 512,
        }
    }

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let h = header(CMD_WRITE, CMD_FLAG_FUA);
        let mut b = BytesMut::new();
        h.encode(&mut b);
        let arr: [u8; REQUEST_HEADER_LEN] = b[..].try_into().unwrap();
        assert_eq!(RequestHeader::decode(&arr), Ok(h));
        let mut bad = arr;
        bad[0] ^= 1;
        assert!(matches!(
            RequestHeader::decode(&bad),
            Err(ProtoError::BadRequestMagic(_))
        ));
    }

    #[test]
    fn command_validation() {
        let v = |k, f, s: &Session| Command::validate(&header(k, f), s);
        assert_eq!(
            v(CMD_WRITE, CMD_FLAG_FUA, &SESSION),
            Ok(Command::Write {
                offset: 4096,
                len: 512,
                fua: true
            })
        );
        // Unknown command, unknown flag, flag on the wrong command.
        assert_eq!(v(99, 0, &SESSION), Err(Errno::Inval));
        assert_eq!(v(CMD_READ, 1 << 9, &SESSION), Err(Errno::Inval));
        assert_eq!(v(CMD_FLUSH, CMD_FLAG_FUA, &SESSION), Err(Errno::Inval));
        // Read-only exports refuse writes with EPERM.
        let ro = Session {
            read_only: true,
            ..SESSION
        };
        for k in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(v(k, 0, &ro), Err(Errno::Perm));
        }
        assert!(v(CMD_READ, 0, &ro).is_ok());
        // Block status needs a negotiated context; DF needs structured replies.
        let plain = Session {
            structured: false,
            meta_context: false,
            ..SESSION
        };
        assert_eq!(v(CMD_BLOCK_STATUS, 0, &plain), Err(Errno::Inval));
        assert_eq!(v(CMD_READ, CMD_FLAG_DF, &plain), Err(Errno::Inval));
        // FAST_ZERO when zeroing is not cheap.
        let slow = Session {
            fast_zero: false,
            ..SESSION
        };
        assert_eq!(
            v(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, &slow),
            Err(Errno::NotSup)
        );
        assert_eq!(
            v(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, &SESSION),
            Ok(Command::WriteZeroes {
                offset: 4096,
                len: 512,
                fua: false,
                may_trim: false,
                fast: false
            })
        );
    }

    #[test]
    fn option_payloads() {
        let go = InfoRequest {
            export: "db".into(),
            infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let mut b = BytesMut::new();
        go.encode(&mut b);
        assert_eq!(InfoRequest::decode(&b), Ok(go));
        assert_eq!(
            InfoRequest::decode(&b[..b.len() - 1]),
            Err(OptionPayloadError::Truncated)
        );
        let mut long = b.clone();
        long.put_u8(0);
        assert_eq!(
            InfoRequest::decode(&long),
            Err(OptionPayloadError::Trailing(1))
        );
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        assert_eq!(
            InfoRequest::decode(&huge),
            Err(OptionPayloadError::StringTooLong(u32::MAX))
        );

        let meta = MetaContextRequest {
            export: "db".into(),
            queries: vec![BASE_ALLOCATION.into(), "qemu:".into()],
        };
        let mut b = BytesMut::new();
        meta.encode(&mut b);
        assert_eq!(MetaContextRequest::decode(&b), Ok(meta));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = InfoRequest::decode(&data);
            let _ = MetaContextRequest::decode(&data);
            if data.len() >= REQUEST_HEADER_LEN {
                let arr: [u8; REQUEST_HEADER_LEN] = data[..REQUEST_HEADER_LEN].try_into().unwrap();
                if let Ok(h) = RequestHeader::decode(&arr) {
                    let _ = Command::validate(&h, &SESSION);
                }
            }
            if data.len() >= OPTION_HEADER_LEN {
                let arr: [u8; OPTION_HEADER_LEN] = data[..OPTION_HEADER_LEN].try_into().unwrap();
                let _ = OptionHeader::decode(&arr);
            }
        }

        #[test]
        fn request_header_roundtrips(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
                                     offset in any::<u64>(), len in any::<u32>()) {
            let h = RequestHeader { flags, kind, cookie, offset, len };
            let mut b = BytesMut::new();
            h.encode(&mut b);
            let arr: [u8; REQUEST_HEADER_LEN] = b[..].try_into().unwrap();
            prop_assert_eq!(RequestHeader::decode(&arr), Ok(h));
        }

        #[test]
        fn info_request_roundtrips(export in "[a-z0-9]{0,64}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { export, infos };
            let mut b = BytesMut::new();
            r.encode(&mut b);
            prop_assert_eq!(InfoRequest::decode(&b), Ok(r));
        }

        #[test]
        fn truncated_info_request_is_refused(export in "[a-z0-9]{0,64}", infos in proptest::collection::vec(any::<u16>(), 0..8), cut in 1usize..64) {
            let r = InfoRequest { export, infos };
            let mut b = BytesMut::new();
            r.encode(&mut b);
            let cut = cut.min(b.len());
            prop_assert!(InfoRequest::decode(&b[..b.len() - cut]).is_err());
        }
    }
}
