//! Job frames.

use super::*;

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
