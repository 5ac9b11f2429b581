//! Compressed Write frames.

use super::*;

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
