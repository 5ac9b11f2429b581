//! Recovery of the out-of-sync store (node/src/primary/oos_store) from a
//! bitmap file and an activity-log file the fuzzer writes: `OosStore::open`
//! must never panic or fail on bad contents (only on I/O), its start bitmap
//! has the configured shape, and a new or unreadable state marks everything.
//! Input: u16 length of the
//! bitmap file, the bitmap file, then the activity log (its two slots).
#![no_main]
use blockmirror_fuzz::Take;
use blockmirror_node::primary::oos_store::{OosStore, RecoveryOutcome};
use libfuzzer_sys::fuzz_target;

const VOLUME: u64 = 64 << 20;
const GRANULARITY: u64 = 64 << 10;
const EXTENT: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let mut t = Take(data);
    let n = usize::from(t.u16());
    let bitmap = t.bytes(n);
    let al = t.rest();
    let dir = tempfile::tempdir_in(tmp()).expect("tempdir");
    if !bitmap.is_empty() {
        std::fs::write(dir.path().join("v@p.bitmap"), bitmap).unwrap();
    }
    if !al.is_empty() {
        std::fs::write(dir.path().join("v@p.al"), al).unwrap();
    }
    let opened = OosStore::open(dir.path(), "v", "p", VOLUME, GRANULARITY, EXTENT);
    let (_store, rec) = opened.expect("damaged files cost a resync, never an error");
    {
        assert_eq!(rec.bitmap.volume_size(), VOLUME);
        if matches!(rec.outcome, RecoveryOutcome::New | RecoveryOutcome::FullResync(_)) {
            assert_eq!(rec.bitmap.dirty_bytes(), VOLUME);
        }
    }
});

fn tmp() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
