//! Frame payload parsing: from a validated header and its payload to a
//! [`Frame`].

use bytes::Bytes;

use super::{check_divergence_ranges, hash_count, ErrorCode, Frame, JobErrorCode, SyncPhase};
use crate::wire::*;

impl Frame {
    /// [`Frame::from_parts`] for a header already validated as `kind`.
    pub(super) fn build(kind: Kind, h: &RawHeader, payload: Bytes) -> Result<Frame, WireError> {
        let id = h.id;
        if payload.len() != h.payload_len as usize {
            return Err(WireError::Malformed {
                kind,
                id,
                reason: PayloadError::LengthDiffers {
                    got: payload.len(),
                    header: h.payload_len,
                },
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
                        reason: PayloadError::UnknownSyncPhase(payload[0]),
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
}

/// Parses a Divergence payload (the header is validated: id and offset are
/// zero, the length is the prefix plus whole ranges, within the limit).
fn parse_divergence(id: u64, payload: &[u8]) -> Result<Frame, WireError> {
    let kind = Kind::Divergence;
    let malformed = |reason: PayloadError| WireError::Malformed { kind, id, reason };
    if payload.len() < DIVERGENCE_PREFIX {
        return Err(malformed(PayloadError::ShorterThanPrefix {
            got: payload.len(),
            prefix: DIVERGENCE_PREFIX,
            what: "prefix",
        }));
    }
    let flags = payload[0];
    let unknown = flags & !(DIVERGENCE_WAS_PRIMARY | DIVERGENCE_LAST);
    if unknown != 0 {
        return Err(malformed(PayloadError::UnknownFlagBits(unknown)));
    }
    if payload[1..4] != [0; 3] {
        return Err(malformed(PayloadError::ReservedNotZero(
            payload[1..4].try_into().expect("3 bytes"),
        )));
    }
    let count = u32::from_be_bytes(payload[4..8].try_into().expect("4 bytes"));
    let body = &payload[DIVERGENCE_PREFIX..];
    if body.len() as u64 != u64::from(count) * DIVERGENCE_RANGE_LEN as u64 {
        return Err(malformed(PayloadError::CountMismatch {
            count,
            bytes: body.len(),
        }));
    }
    let u64_at = |c: &[u8], o: usize| u64::from_be_bytes(c[o..o + 8].try_into().expect("8 bytes"));
    let ranges: Vec<(u64, u64)> = body
        .chunks_exact(DIVERGENCE_RANGE_LEN)
        .map(|c| (u64_at(c, 0), u64_at(c, 8)))
        .collect();
    check_divergence_ranges(&ranges).map_err(|e| malformed(e.into()))?;
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
    let malformed = |reason: PayloadError| WireError::Malformed { kind, id, reason };
    let (offset, len) = (h.offset, h.len);
    let link = u64::from_be_bytes(payload[..LINK_LEN].try_into().expect("validated length"));
    let u32_at = |o: usize| u32::from_be_bytes(payload[o..o + 4].try_into().expect("4 bytes"));
    let check_block = |block: u32| {
        if !block.is_power_of_two() || !(MIN_HASH_BLOCK..=MAX_HASH_BLOCK).contains(&block) {
            return Err(malformed(PayloadError::HashBlock(block)));
        }
        if len == 0 || hash_count(len, block) > MAX_JOB_HASHES {
            return Err(malformed(PayloadError::DigestCount { len, block }));
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
                return Err(malformed(PayloadError::ReadLength(len)));
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
                return Err(malformed(PayloadError::DigestBytes {
                    got: body.len(),
                    blocks: n,
                }));
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

fn code_and_message(kind: Kind, id: u64, payload: &[u8]) -> Result<(u32, String), WireError> {
    let malformed = |reason: PayloadError| WireError::Malformed { kind, id, reason };
    if payload.len() < CODE_LEN {
        return Err(malformed(PayloadError::ShorterThanPrefix {
            got: payload.len(),
            prefix: CODE_LEN,
            what: "code",
        }));
    }
    let (code, message) = payload.split_at(CODE_LEN);
    let code = u32::from_be_bytes(code.try_into().expect("4 bytes"));
    let message = std::str::from_utf8(message).map_err(|e| malformed(PayloadError::NotUtf8(e)))?;
    Ok((code, message.to_owned()))
}
