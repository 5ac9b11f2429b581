//! Frame encoding: [`Frame::encode`], and the header-only encoders for data
//! that goes out as its own iovec.

use bytes::{BufMut, BytesMut};

use super::{check_divergence_ranges, hash_count, Frame};
use crate::wire::*;

impl Frame {
    /// Appends the encoded frame to `out`. A Nack or Error message longer
    /// than the control payload limit is cut at a character boundary.
    ///
    /// # Panics
    ///
    /// If a Write's data exceeds [`MAX_DATA`], a handshake payload exceeds
    /// [`MAX_CONTROL_PAYLOAD`] or a Divergence carries more than
    /// [`MAX_DIVERGENCE_RANGES`]: the sender must split writes (the NBD front
    /// end already caps requests at the same size), handshake messages are a
    /// few hundred bytes, and [`divergence_frames`](super::divergence_frames) splits range lists.
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
