//! Write payload compression for WAN links.
//!
//! A Write frame may carry its data compressed: one of the flags
//! [`FLAG_LZ4`](crate::FLAG_LZ4) or [`FLAG_ZSTD`](crate::FLAG_ZSTD) is set,
//! `len` is the data's length (the bytes written on the mirror) and
//! `payload_len` the compressed length on the wire, which is always smaller
//! (a sender whose data does not shrink sends it plain). The payload crc32c
//! covers the bytes on the wire, so corruption is caught before anything is
//! decompressed.
//!
//! The decoder ([`crate::FrameDecoder`], [`crate::Frame::from_parts`])
//! decompresses into a buffer of exactly `len` bytes, which the header check
//! already bounded by [`MAX_DATA`](crate::MAX_DATA): a lying length or a
//! decompression bomb fails with [`WireError::Decompress`] and never makes
//! the receiver allocate more. What it yields is a plain
//! [`Frame::Write`](crate::Frame::Write), so the mirror's apply path does not
//! know compression exists.
//!
//! [`EncodedWrite`] is the sender's side: data made ready for the wire
//! (compressed or not, its crc32c computed) by the primary's pipeline
//! workers, so the link's sender task only writes a 40-byte header.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};

use crate::wire::{Codec, DecompressError, Kind, RawHeader, WireError, FLAG_FUA};

/// zstd level for links: the fastest of the regular levels. Replication
/// wants throughput on a busy primary more than the last percent of ratio.
pub const ZSTD_LEVEL: i32 = 1;
/// The mirror's zstd decoder refuses frames that ask for a larger window
/// (2^25 = 32 MiB, the largest Write).
const ZSTD_WINDOW_LOG_MAX: u32 = 25;

thread_local! {
    /// One zstd context per thread (a pipeline worker, a mirror's reader),
    /// made once: a context costs more to set up than to compress a track.
    static ZSTD_COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

impl Codec {
    /// Compresses `data`; `None` when the result would not be smaller (then
    /// the data goes plain). Both encoders take their worst case (a little
    /// over `data.len()`) as room, briefly.
    pub fn compress(self, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < 2 {
            return None;
        }
        match self {
            Codec::None => None,
            Codec::Lz4 => Some(lz4_flex::block::compress(data)),
            Codec::Zstd => ZSTD_COMPRESSOR.with_borrow_mut(|c| {
                if c.is_none() {
                    *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
                }
                c.as_mut()?.compress(data).ok()
            }),
        }
        .filter(|out| out.len() < data.len())
    }

    /// Decompresses a Write payload that must expand to exactly `len` bytes.
    /// The output buffer is `len` bytes and never grows.
    pub(crate) fn decompress(
        self,
        id: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Bytes, WireError> {
        let fail = |reason: DecompressError| WireError::Decompress {
            kind: Kind::Write,
            id,
            offset,
            codec: self,
            reason,
        };
        let mut out = vec![0u8; len as usize];
        let n = match self {
            Codec::None => return Ok(Bytes::copy_from_slice(payload)),
            Codec::Lz4 => lz4_flex::block::decompress_into(payload, &mut out)
                .map_err(|e| fail(DecompressError::Codec(e.to_string())))?,
            Codec::Zstd => ZSTD_DECOMPRESSOR.with_borrow_mut(|slot| {
                if slot.is_none() {
                    let mut d = zstd::bulk::Decompressor::new()
                        .map_err(|e| fail(DecompressError::Codec(e.to_string())))?;
                    d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                        ZSTD_WINDOW_LOG_MAX,
                    ))
                    .map_err(|e| fail(DecompressError::Codec(e.to_string())))?;
                    *slot = Some(d);
                }
                let d = slot.as_mut().expect("set above");
                d.decompress_to_buffer(payload, &mut out[..])
                    .map_err(|e| fail(DecompressError::Codec(e.to_string())))
            })?,
        };
        if n != len as usize {
            return Err(fail(DecompressError::WrongLength {
                got: n,
                expected: len,
            }));
        }
        Ok(Bytes::from(out))
    }
}

/// Write data ready for the wire: compressed when that made it smaller, its
/// payload crc32c computed. Built off the link's sender task (by the
/// primary's pipeline workers); the sender only adds the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedWrite {
    /// The codec actually used: [`Codec::None`] if compression did not pay.
    pub codec: Codec,
    /// The data's length (the `len` field).
    pub len: u32,
    /// The bytes on the wire.
    pub payload: Bytes,
    /// crc32c of `payload`.
    pub crc: u32,
}

impl EncodedWrite {
    /// Compresses `data` with `codec` if that makes it smaller, and computes
    /// the checksum of what will be sent.
    ///
    /// # Panics
    ///
    /// If `data` is longer than [`MAX_DATA`](crate::MAX_DATA).
    pub fn new(data: Bytes, codec: Codec) -> EncodedWrite {
        assert!(
            data.len() <= crate::MAX_DATA as usize,
            "write of {} bytes exceeds MAX_DATA",
            data.len()
        );
        let len = data.len() as u32;
        let (codec, payload) = match codec.compress(&data) {
            Some(c) => (codec, Bytes::from(c)),
            None => (Codec::None, data),
        };
        let crc = crc32c::crc32c(&payload);
        EncodedWrite {
            codec,
            len,
            payload,
            crc,
        }
    }

    /// Bytes this write puts on the wire after its header.
    pub fn wire_len(&self) -> usize {
        self.payload.len()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        for c in Codec::ALL {
            assert_eq!(Codec::from_name(c.as_str()), Some(c));
            assert_eq!(Codec::from_code(c.code()), Some(c));
        }
        assert_eq!(Codec::from_name("gzip"), None);
        assert_eq!(Codec::from_code(3), None);
    }

    #[test]
    fn incompressible_data_goes_plain() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for c in Codec::ALL {
            let e = EncodedWrite::new(Bytes::from(noise.clone()), c);
            assert_eq!(e.codec, Codec::None, "{c}");
            assert_eq!(e.payload.len(), noise.len());
            assert_eq!(e.crc, crc32c::crc32c(&noise));
        }
    }

    #[test]
    fn compressible_data_shrinks_and_comes_back() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 64) as u8).collect();
        for c in [Codec::Lz4, Codec::Zstd] {
            let e = EncodedWrite::new(Bytes::from(data.clone()), c);
            assert_eq!(e.codec, c);
            assert!(e.payload.len() < data.len() / 4, "{c}: {}", e.payload.len());
            let back = c.decompress(1, 0, e.len, &e.payload).unwrap();
            assert_eq!(back, data);
        }
    }
}
