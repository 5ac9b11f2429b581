//! Frame codec tests: strategies and helpers, and the property tests over
//! every kind; the example-based tests are by topic in the submodules.

use super::*;
use crate::compress::{encode_encoded_write_header, EncodedWrite};
use bytes::BufMut;
use divergence::divergence_bytes;
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

#[test]
fn kind_codes_roundtrip() {
    for k in Kind::ALL {
        assert_eq!(Kind::from_code(k.code()), Some(k));
    }
    assert_eq!(Kind::from_code(0), None);
}

mod compression;
mod divergence;
mod header;
mod job;
