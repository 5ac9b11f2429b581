//! One replication or job frame whose header fields and payload come from
//! the fuzzer, with good header and payload checksums, so every payload
//! parser behind the CRCs is reached (Frame::from_parts and FrameDecoder
//! must agree).
#![no_main]
use blockmirror_fuzz::{framed, Take};
use blockmirror_repl::wire::RawHeader;
use blockmirror_repl::{Frame, FrameDecoder};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut t = Take(data);
    let (kind, flags, id, offset, len) = (t.u8(), t.u16(), t.u64(), t.u64(), t.u32());
    let payload = t.rest();
    let wire = framed(kind, flags, id, offset, len, payload);
    let h = RawHeader::decode(wire[..40].try_into().unwrap()).expect("good header");
    let direct = Frame::from_parts(&h, Bytes::copy_from_slice(payload));
    let mut buf = BytesMut::from(&wire[..]);
    let streamed = FrameDecoder::new().decode(&mut buf);
    match (&direct, &streamed) {
        (Ok(a), Ok(Some(b))) => {
            assert_eq!(a, b);
            let mut out = BytesMut::new();
            a.encode(&mut out);
            let back = FrameDecoder::new().decode(&mut out).expect("re-encoded frame decodes");
            assert_eq!(back.as_ref(), Some(a));
        }
        (Err(_), Err(_)) => {}
        // The whole frame is in the buffer: the stream decoder cannot wait.
        (a, b) => panic!("from_parts {a:?} but the stream decoder {b:?}"),
    }
});
