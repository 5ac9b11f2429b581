//! Divergence frames.

use super::*;

/// A Divergence frame with a valid header (and checksums) for `payload`.
pub(super) fn divergence_bytes(payload: &[u8]) -> BytesMut {
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
