//! Header checks, control payloads, and the plain Write encoders.

use super::*;

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
