//! Compressed Write frames (compress.rs): an LZ4 or zstd payload of the
//! fuzzer's choosing with a declared decompressed length, good checksums.
//! The decoder must never yield data of another length than declared, nor
//! allocate past it; a valid compression of real data must round-trip.
#![no_main]
use blockmirror_fuzz::{framed, Take};
use blockmirror_repl::wire::{Codec, Kind, FLAG_LZ4, FLAG_ZSTD, MAX_DATA};
use blockmirror_repl::{encode_encoded_write_header, EncodedWrite, Frame, FrameDecoder};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut t = Take(data);
    let sel = t.u8();
    let len = t.u32() % (MAX_DATA + 2);
    let payload = t.rest();
    let flag = if sel & 1 == 0 { FLAG_LZ4 } else { FLAG_ZSTD };
    let wire = framed(Kind::Write.code(), flag, 1, 0, len, payload);
    let mut buf = BytesMut::from(&wire[..]);
    if let Ok(Some(Frame::Write { data, .. })) = FrameDecoder::new().decode(&mut buf) {
        assert_eq!(data.len() as u64, u64::from(len));
    }

    // And the encoder's side: real data through either codec decodes back.
    let codec = if sel & 2 == 0 { Codec::Lz4 } else { Codec::Zstd };
    let w = EncodedWrite::new(Bytes::copy_from_slice(payload), codec);
    let mut out = BytesMut::new();
    encode_encoded_write_header(7, 4096, sel & 4 != 0, &w, &mut out);
    out.extend_from_slice(&w.payload);
    match FrameDecoder::new().decode(&mut out) {
        Ok(Some(Frame::Write { id, offset, data, .. })) => {
            assert_eq!((id, offset), (7, 4096));
            assert_eq!(&data[..], payload);
        }
        other => panic!("encoded write did not decode: {other:?}"),
    }
});
