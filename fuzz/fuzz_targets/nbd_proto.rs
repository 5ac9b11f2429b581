//! NBD request headers, command validation and option payloads.
#![no_main]
use blockmirror_nbd::proto::{
    Command, InfoRequest, MetaContextRequest, OptionHeader, RequestHeader, Session,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let s = Session {
        structured: sel & 1 != 0,
        meta_context: sel & 2 != 0,
        read_only: sel & 4 != 0,
        fast_zero: sel & 8 != 0,
    };
    let mut chunks = rest.chunks_exact(28);
    for c in &mut chunks {
        if let Ok(h) = RequestHeader::decode(c.try_into().unwrap()) {
            let _ = Command::validate(&h, &s);
            let mut out = bytes::BytesMut::new();
            h.encode(&mut out);
            assert_eq!(&out[..], c, "request header does not round-trip");
        }
    }
    if rest.len() >= 16 {
        let _ = OptionHeader::decode(rest[..16].try_into().unwrap());
    }
    if let Ok(r) = InfoRequest::decode(rest) {
        let mut out = bytes::BytesMut::new();
        r.encode(&mut out);
        assert_eq!(InfoRequest::decode(&out).ok().as_ref(), Some(&r));
    }
    if let Ok(r) = MetaContextRequest::decode(rest) {
        let mut out = bytes::BytesMut::new();
        r.encode(&mut out);
        assert_eq!(MetaContextRequest::decode(&out).ok().as_ref(), Some(&r));
    }
});
