use super::*;
use blockmirror_core::activity::{ActivityLog, Begin};

const SIZE: u64 = 64 << 20;
const GRAN: u64 = 64 << 10;
const EXT: u64 = 4 << 20;

fn open(dir: &Path) -> (OosStore, Recovery) {
    OosStore::open(dir, "db", "10.0.0.2:7000", SIZE, GRAN, EXT).unwrap()
}

/// Runs a write through the activity-log protocol and commits what it needs.
fn write(log: &mut ActivityLog, store: &OosStore, bitmap: &Bitmap, off: u64, len: u64) {
    match log.begin(off, len).unwrap() {
        Begin::Ready => {}
        Begin::NeedsCommit(tx) => {
            if !tx.evicted().is_empty() {
                store.store_bitmap(bitmap).unwrap();
            }
            store.commit_activity(&tx).unwrap();
            log.committed(tx).unwrap();
        }
        Begin::Wait(w) => panic!("unexpected wait {w:?}"),
    }
}

fn marked(bm: &Bitmap) -> Vec<(u64, u64)> {
    bm.runs().collect()
}

#[test]
fn a_new_relationship_starts_fully_marked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rec) = open(dir.path());
    assert_eq!(rec.outcome, RecoveryOutcome::New);
    assert!(!rec.was_clean() && rec.converted_from.is_none());
    assert_eq!(rec.bitmap.dirty_bytes(), SIZE);
    assert!(store.bitmap_path().ends_with("db@10.0.0.2%3A7000.bitmap"));
    assert!(store.activity_log_path().ends_with("db@10.0.0.2%3A7000.al"));
    assert_eq!(
        fs::metadata(store.activity_log_path()).unwrap().len(),
        2 * SLOT_SIZE
    );
    drop(store);
    // Never shut down cleanly, never synced: still everything.
    let (_, rec) = open(dir.path());
    assert_eq!(
        rec.outcome,
        RecoveryOutcome::Crash {
            replayed_extents: 0
        }
    );
    assert_eq!(rec.bitmap.dirty_bytes(), SIZE);
}

#[test]
fn a_clean_reopen_returns_exactly_the_stored_bits() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rec) = open(dir.path());
    let mut bm = rec.bitmap;
    bm.clear_all();
    bm.mark(5 * GRAN + 1, 3 * GRAN);
    bm.mark(SIZE - 1, 1);
    let mut log = ActivityLog::new(EXT, 4).unwrap();
    write(&mut log, &store, &bm, 0, 4096);
    log.end(0, 4096).unwrap();
    assert!(log.is_idle());
    store.mark_clean_shutdown(&bm).unwrap();
    drop(store);
    let (store, rec) = open(dir.path());
    assert!(rec.was_clean());
    assert_eq!(rec.bitmap, bm);
    drop(store);
    // Nothing written since: still clean.
    let (_, rec) = open(dir.path());
    assert_eq!((rec.outcome, rec.bitmap), (RecoveryOutcome::Clean, bm));
}

#[test]
fn a_crash_replays_the_active_extents() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rec) = open(dir.path());
    let mut bm = rec.bitmap;
    bm.clear_all();
    bm.mark(50 << 20, 1);
    store.store_bitmap(&bm).unwrap();
    let mut log = ActivityLog::new(EXT, 4).unwrap();
    write(&mut log, &store, &bm, EXT - 1, 2); // extents 0 and 1
    write(&mut log, &store, &bm, 9 * EXT, 1); // extent 9
                                              // Crash: the store is dropped with writes in flight and no clean record.
    drop(store);
    let (store, rec) = open(dir.path());
    assert_eq!(
        rec.outcome,
        RecoveryOutcome::Crash {
            replayed_extents: 3
        }
    );
    let expected = vec![(0, 2 * EXT), (9 * EXT, EXT), (50 << 20, GRAN)];
    assert_eq!(marked(&rec.bitmap), expected);
    drop(store);
    // Recovery stored its result: a second crash recovers the same.
    let (_, rec) = open(dir.path());
    assert_eq!(marked(&rec.bitmap), expected);
}

#[test]
fn evictions_store_the_bitmap_first() {
    let dir = tempfile::tempdir().unwrap();
    let (store, rec) = open(dir.path());
    let mut bm = rec.bitmap;
    bm.clear_all();
    store.store_bitmap(&bm).unwrap();
    let mut log = ActivityLog::new(EXT, 2).unwrap();
    // A write to extent 3 that the mirror never acknowledged: marked in memory only.
    write(&mut log, &store, &bm, 3 * EXT, 4096);
    bm.mark(3 * EXT, 4096);
    log.end(3 * EXT, 4096).unwrap();
    write(&mut log, &store, &bm, 0, 1);
    // Extent 3 is evicted; the helper stores the bitmap before the record.
    write(&mut log, &store, &bm, 7 * EXT, 1);
    assert_eq!(log.active_extents(), vec![0, 7]);
    drop(store);
    // Active extents 0 and 7 are replayed whole; evicted extent 3 survives
    // only through the bitmap stored before the eviction.
    let (_, rec) = open(dir.path());
    assert_eq!(
        marked(&rec.bitmap),
        vec![(0, EXT), (3 * EXT, GRAN), (7 * EXT, EXT)]
    );
}

#[test]
fn slots_alternate_and_the_newest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    rec.bitmap.clear_all();
    store.store_bitmap(&rec.bitmap).unwrap();
    let mut log = ActivityLog::new(EXT, 8).unwrap();
    for e in 0..5u64 {
        write(&mut log, &store, &rec.bitmap, e * EXT, 1);
        // Read the file as recovery would. Creation wrote seq 1 to slot 0.
        let bytes = fs::read(store.activity_log_path()).unwrap();
        let (slot, record) = newest_record(&bytes).unwrap();
        assert_eq!((slot, record.seq()), ((e + 1) % 2, e + 2));
        assert_eq!(record.extents(), (0..=e).collect::<Vec<_>>());
    }
    drop(store);
    let (_, rec) = open(dir.path());
    assert_eq!(marked(&rec.bitmap), vec![(0, 5 * EXT)]);
}

#[test]
fn a_corrupt_newer_slot_falls_back_to_the_older() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    rec.bitmap.clear_all();
    store.store_bitmap(&rec.bitmap).unwrap();
    let mut log = ActivityLog::new(EXT, 8).unwrap();
    // Seq 1 (empty) in slot 0 from creation; seq 2 {0} in slot 1; seq 3 {0, 5} in slot 0.
    write(&mut log, &store, &rec.bitmap, 0, 1);
    write(&mut log, &store, &rec.bitmap, 5 * EXT, 1);
    drop(store);
    let al = dir.path().join("db@10.0.0.2%3A7000.al");
    let mut bytes = fs::read(&al).unwrap();
    bytes[50] ^= 0xff; // torn write of seq 3 in slot 0
    fs::write(&al, &bytes).unwrap();
    let (store, rec) = open(dir.path());
    assert_eq!(
        rec.outcome,
        RecoveryOutcome::Crash {
            replayed_extents: 1
        }
    );
    assert_eq!(marked(&rec.bitmap), vec![(0, EXT)]);
    // The next commit goes to the torn slot, not over the surviving record.
    let mut log = ActivityLog::new(EXT, 8).unwrap();
    write(&mut log, &store, &rec.bitmap, 2 * EXT, 1);
    let bytes = fs::read(&al).unwrap();
    let (slot, record) = newest_record(&bytes).unwrap();
    assert_eq!((slot, record.seq(), record.extents()), (0, 3, &[2][..]));
}

#[test]
fn a_corrupt_or_missing_file_means_a_full_resync() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    rec.bitmap.clear_all();
    store.mark_clean_shutdown(&rec.bitmap).unwrap();
    let (bitmap_path, al_path) = (
        store.bitmap_path().to_owned(),
        store.activity_log_path().to_owned(),
    );
    drop(store);

    let mut bytes = fs::read(&bitmap_path).unwrap();
    bytes[60] ^= 1;
    fs::write(&bitmap_path, &bytes).unwrap();
    let (store, rec) = open(dir.path());
    assert!(matches!(
        rec.outcome,
        RecoveryOutcome::FullResync(FullResyncReason::BitmapCorrupt(
            BitmapError::Checksum { .. }
        ))
    ));
    assert_eq!(rec.bitmap.dirty_bytes(), SIZE);
    let mut clear = rec.bitmap;
    clear.clear_all();
    store.mark_clean_shutdown(&clear).unwrap();
    drop(store);

    fs::remove_file(&bitmap_path).unwrap();
    let (store, rec) = open(dir.path());
    assert_eq!(
        rec.outcome,
        RecoveryOutcome::FullResync(FullResyncReason::BitmapMissing)
    );
    assert_eq!(rec.bitmap.dirty_bytes(), SIZE);
    store.mark_clean_shutdown(&clear).unwrap();
    drop(store);

    fs::remove_file(&al_path).unwrap();
    let (store, rec) = open(dir.path());
    assert_eq!(
        rec.outcome,
        RecoveryOutcome::FullResync(FullResyncReason::ActivityLogMissing)
    );
    assert_eq!(rec.bitmap.dirty_bytes(), SIZE);
    store.mark_clean_shutdown(&clear).unwrap();
    drop(store);

    fs::write(&al_path, vec![0xa5; 2 * SLOT_SIZE as usize]).unwrap();
    let (store, rec) = open(dir.path());
    let RecoveryOutcome::FullResync(reason) = &rec.outcome else {
        panic!("{:?}", rec.outcome)
    };
    assert!(
        reason.to_string().contains("both activity log slots"),
        "{reason}"
    );
    assert_eq!(rec.bitmap.dirty_bytes(), SIZE);
    drop(store);
    // The log was recreated: the next open is an ordinary crash recovery.
    let (_, rec) = open(dir.path());
    assert_eq!(
        rec.outcome,
        RecoveryOutcome::Crash {
            replayed_extents: 0
        }
    );
}

#[test]
fn a_write_after_the_clean_record_supersedes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    rec.bitmap.clear_all();
    store.mark_clean_shutdown(&rec.bitmap).unwrap();
    let mut log = ActivityLog::new(EXT, 8).unwrap();
    write(&mut log, &store, &rec.bitmap, 3 * EXT, 1);
    drop(store);
    let (_, rec) = open(dir.path());
    assert_eq!(
        rec.outcome,
        RecoveryOutcome::Crash {
            replayed_extents: 1
        }
    );
    assert_eq!(marked(&rec.bitmap), vec![(3 * EXT, EXT)]);
}

#[test]
fn a_changed_shape_converts_to_a_superset() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut rec) = open(dir.path());
    rec.bitmap.clear_all();
    rec.bitmap.mark(GRAN + 5, 1);
    store.mark_clean_shutdown(&rec.bitmap).unwrap();
    drop(store);
    // Coarser regions and a grown volume.
    let (store, rec) =
        OosStore::open(dir.path(), "db", "10.0.0.2:7000", 2 * SIZE, 4 * GRAN, EXT).unwrap();
    assert_eq!(rec.outcome, RecoveryOutcome::Clean);
    assert_eq!(rec.converted_from, Some((SIZE, GRAN)));
    assert_eq!(marked(&rec.bitmap), vec![(0, 4 * GRAN), (SIZE, SIZE)]);
    store.mark_clean_shutdown(&rec.bitmap).unwrap();
    drop(store);
    let (_, again) =
        OosStore::open(dir.path(), "db", "10.0.0.2:7000", 2 * SIZE, 4 * GRAN, EXT).unwrap();
    assert_eq!((again.converted_from, again.bitmap), (None, rec.bitmap));
}

#[test]
fn names_are_escaped_and_errors_carry_context() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(sanitise("a@b/c %"), "a%40b%2Fc%20%25");
    assert_ne!(sanitise("a:b"), sanitise("a_b"));
    let (a, _) = OosStore::open(dir.path(), "v@1", "p", SIZE, GRAN, EXT).unwrap();
    let (b, _) = OosStore::open(dir.path(), "v", "1@p", SIZE, GRAN, EXT).unwrap();
    assert_ne!(a.bitmap_path(), b.bitmap_path());
    assert!(a.bitmap_path().starts_with(dir.path()));

    let wrong = Bitmap::new(SIZE, 2 * GRAN).unwrap();
    let err = a.store_bitmap(&wrong).unwrap_err();
    assert!(matches!(err, OosStoreError::BitmapMismatch { .. }), "{err}");
    let mut log = ActivityLog::new(2 * EXT, 4).unwrap();
    let Begin::NeedsCommit(tx) = log.begin(0, 1).unwrap() else {
        panic!("expected a transaction")
    };
    let err = a.commit_activity(&tx).unwrap_err();
    assert!(
        matches!(err, OosStoreError::ExtentSizeMismatch { .. }),
        "{err}"
    );

    let err = OosStore::open(dir.path(), "v", "p", SIZE, 1000, EXT).unwrap_err();
    assert!(matches!(err, OosStoreError::Geometry { .. }), "{err}");
    let err = OosStore::open(dir.path(), "v", "p", SIZE, GRAN, 100).unwrap_err();
    assert!(matches!(err, OosStoreError::ExtentSize { .. }), "{err}");

    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let err = OosStore::open(&file.join("sub"), "vol7", "peer9", SIZE, GRAN, EXT).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OosStoreError::Io { .. }));
    assert!(
        msg.contains("vol7") && msg.contains("peer9") && msg.contains("not-a-dir"),
        "{msg}"
    );
}

#[test]
fn a_damaged_slot_is_named_and_a_blank_one_is_not() {
    let mut file = vec![0u8; 2 * SLOT_SIZE as usize];
    let rec = blockmirror_core::activity::ActivityRecord::new(
        7,
        blockmirror_core::activity::DEFAULT_EXTENT_SIZE,
        [3, 9],
    )
    .unwrap();
    let enc = rec.encode();
    file[..enc.len()].copy_from_slice(&enc);
    // Slot 1 never written: nothing to say.
    assert!(damaged_slot(&file).is_none());
    // Slot 1 holds bytes that are no record: named.
    file[SLOT_SIZE as usize + 3] = 0x5a;
    assert_eq!(damaged_slot(&file).map(|(s, _)| s), Some(1));
    // Both damaged: not this function's case (a full resync).
    file[0] ^= 0xff;
    assert!(damaged_slot(&file).is_none());
}
