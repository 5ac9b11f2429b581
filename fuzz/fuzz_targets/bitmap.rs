//! The out-of-sync bitmap file codec (core/src/bitmap.rs). Byte 0 bit 0
//! asks the harness to fix the trailing checksum. A bitmap that decodes
//! re-encodes to exactly the input, and its counters agree with its bits.
#![no_main]
use blockmirror_core::bitmap::Bitmap;
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
    if let Ok(bm) = Bitmap::decode(&b) {
        assert_eq!(bm.encode(), b);
        let marked = (0..bm.regions().min(1 << 16))
            .filter(|&r| bm.is_region_marked(r))
            .count() as u64;
        if bm.regions() <= 1 << 16 {
            assert_eq!(marked, bm.dirty_regions());
        }
        let run_bytes: u64 = bm.runs().map(|(o, l)| {
            assert!(o + l <= bm.volume_size());
            l
        }).sum();
        assert_eq!(run_bytes, bm.dirty_bytes());
    }
});
