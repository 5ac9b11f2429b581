//! Activity-log records (core/src/activity.rs): `decode` (exact) and
//! `decode_prefix` (a store slot). Byte 0 bit 0 asks the harness to fix the
//! trailing checksum. What decodes re-encodes to the bytes it came from.
#![no_main]
use blockmirror_core::activity::ActivityRecord;
use blockmirror_fuzz::fix_trailing_crc;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 {
        fix_trailing_crc(&mut b);
    }
    if let Ok(r) = ActivityRecord::decode(&b) {
        assert_eq!(r.encode(), b);
        assert_eq!(r.encoded_len(), b.len());
    }
    if let Ok((r, used)) = ActivityRecord::decode_prefix(rest) {
        assert!(used <= rest.len());
        assert_eq!(r.encode(), &rest[..used]);
    }
});
