//! The replication link's frame decoder (frame/, wire.rs, compress.rs) on a
//! raw byte stream, delivered in pieces as a socket would: every frame a
//! mirror or primary can be sent, compressed Writes and job frames included.
//! Each decoded frame that re-encodes must decode back to itself.
#![no_main]
use blockmirror_fuzz::Take;
use blockmirror_repl::{Frame, FrameDecoder};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut t = Take(data);
    let chunk = usize::from(t.u8()).max(1) * 7;
    let input = t.rest();
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    'outer: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => roundtrip(&f),
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
});

fn roundtrip(f: &Frame) {
    let mut out = BytesMut::new();
    f.encode(&mut out);
    let mut dec = FrameDecoder::new();
    let back = dec.decode(&mut out).expect("a decoded frame re-encodes validly");
    assert_eq!(back.as_ref(), Some(f));
    assert!(out.is_empty());
}
