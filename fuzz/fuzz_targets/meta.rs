//! The volume metadata file (core/src/meta): `MetaRecord::decode` (what
//! node/src/volume/meta_file.rs reads at start) and `VolumeMeta::decode`.
//! Byte 0 bit 0 asks the harness to fix the header checksum, so the fields
//! behind it are reached. A record that decodes re-encodes to one that
//! decodes to the same value.
#![no_main]
use blockmirror_core::meta::{MetaRecord, VolumeMeta, META_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 && b.len() >= META_LEN {
        let at = META_LEN - 4;
        let crc = crc32c::crc32c(&b[..at]);
        b[at..META_LEN].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(r) = MetaRecord::decode(&b) {
        let again = MetaRecord::decode(&r.encode()).expect("an encoded record decodes");
        assert_eq!(again, r);
    }
    if let Ok(m) = VolumeMeta::decode(&b) {
        let again = VolumeMeta::decode(&m.encode()).expect("encoded metadata decodes");
        assert_eq!(again, m);
    }
});
