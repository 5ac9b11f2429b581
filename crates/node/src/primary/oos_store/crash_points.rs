//! Crash-point tests of the out-of-sync store (bitmap file + activity log):
//! a scenario runs under `blockmirror_storage::durable::record`, then every
//! state a power cut could leave (each prefix of the recorded writes and
//! fsyncs, with everything issued on disk or only what was synced, and with
//! the last write torn: byte prefixes and sector subsets) is recovered with
//! [`OosStore::open`], and the start bitmap must cover every region the
//! acknowledged operations made durable: the stored bitmap and the active
//! extents, each as of the last acknowledged operation, intersected with
//! the one in flight (which may have landed: a bitmap store only clears
//! regions the mirror has, an evicting transaction only follows a bitmap
//! store). Recovery from a crash state is itself crash-tested.

use super::*;
use blockmirror_core::activity::{ActivityLog, Begin};
use blockmirror_storage::durable::{self, crash, Event};

const SIZE: u64 = 256 << 20;
const GRAN: u64 = 64 << 10;
const EXT: u64 = 4 << 20;
const PEER: &str = "10.0.0.2:7000";

/// What is durable once an operation returned: the stored bitmap and the
/// extents of the newest activity record.
#[derive(Clone)]
struct Durable {
    bitmap: Bitmap,
    extents: Vec<u64>,
}

fn scratch() -> tempfile::TempDir {
    // tmpfs when there is one: thousands of fsyncs.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// The scenario: a new relationship is synced (bitmap cleared), writes
/// activate extents (capacity 2, so later ones evict), some writes miss the
/// mirror (marked in the bitmap), the bitmap is stored, a resync clears
/// marks, and a clean shutdown ends it. After each operation a mark `m<n>`
/// records what is durable in `snaps[n]`.
fn scenario(dir: &Path, snaps: &mut Vec<Durable>) {
    let (store, rec) = OosStore::open(dir, "db", PEER, SIZE, GRAN, EXT).unwrap();
    let mut bitmap = rec.bitmap.clone();
    let mut active: Vec<u64> = Vec::new();
    snap(snaps, &bitmap, &active);
    // The initial sync finished: nothing is out of sync.
    bitmap.clear_all();
    store.store_bitmap(&bitmap).unwrap();
    let mut stored = bitmap.clone();
    snap(snaps, &stored, &active);

    let mut log = ActivityLog::new(EXT, 2).unwrap();
    // (offset, len, does the mirror miss it)
    let writes: [(u64, u64, bool); 8] = [
        (0, 4096, false),
        (EXT + 8192, 65536, true),
        (5 * EXT, 4096, true),
        (5 * EXT + 4096, 4096, false),
        (9 * EXT, 1 << 20, true),
        (2 * EXT, 4096, false),
        (EXT, 4096, true),
        (20 * EXT - 4096, 8192, false),
    ];
    for (off, len, missed) in writes {
        match log.begin(off, len).unwrap() {
            Begin::Ready => {}
            Begin::NeedsCommit(tx) => {
                if !tx.evicted().is_empty() && stored != bitmap {
                    store.store_bitmap(&bitmap).unwrap();
                    stored = bitmap.clone();
                    snap(snaps, &stored, &active);
                }
                store.commit_activity(&tx).unwrap();
                active = tx.extents().to_vec();
                log.committed(tx).unwrap();
                snap(snaps, &stored, &active);
            }
            Begin::Wait(w) => panic!("unexpected wait {w:?}"),
        }
        if missed {
            bitmap.mark(off, len);
        }
        assert!(log.end(off, len).is_ok());
    }
    // A periodic store, then a resync copies one marked region.
    store.store_bitmap(&bitmap).unwrap();
    stored = bitmap.clone();
    snap(snaps, &stored, &active);
    bitmap.clear(EXT, EXT);
    store.store_bitmap(&bitmap).unwrap();
    stored = bitmap.clone();
    snap(snaps, &stored, &active);
    // Clean shutdown: the bitmap, then the clean record.
    durable::mark("clean-begin");
    store.mark_clean_shutdown(&bitmap).unwrap();
    snap(snaps, &bitmap, &[]);
}

/// Marks the recording `m<n>` and keeps what is durable as `snaps[n]`.
fn snap(snaps: &mut Vec<Durable>, bm: &Bitmap, ext: &[u64]) {
    durable::mark(format!("m{}", snaps.len()));
    snaps.push(Durable {
        bitmap: bm.clone(),
        extents: ext.to_vec(),
    });
}

/// What the start bitmap must cover after a cut with these marks.
fn required(snaps: &[Durable], marks: &[String]) -> Bitmap {
    let n = marks
        .iter()
        .filter_map(|m| m.strip_prefix('m')?.parse::<usize>().ok())
        .max();
    let mut req = Bitmap::new(SIZE, GRAN).unwrap();
    let Some(n) = n else { return req };
    let now = &snaps[n];
    let next = snaps.get(n + 1).unwrap_or(now);
    let extents = |d: &Durable| {
        let mut b = Bitmap::new(SIZE, GRAN).unwrap();
        for e in &d.extents {
            b.mark(e * EXT, EXT);
        }
        b
    };
    let (ea, eb) = (extents(now), extents(next));
    for r in 0..req.regions() {
        let both = |a: &Bitmap, b: &Bitmap| a.is_region_marked(r) && b.is_region_marked(r);
        if both(&now.bitmap, &next.bitmap) || both(&ea, &eb) {
            let (o, l) = req.region_range(r).unwrap();
            req.mark(o, l);
        }
    }
    req
}

/// Recovers `dir` and checks the result against `req`; returns the events
/// the recovery itself wrote.
fn recover_and_check(dir: &Path, req: &Bitmap, marks: &[String], how: &str) -> Vec<Event> {
    let (r, events) = durable::record(|| OosStore::open(dir, "db", PEER, SIZE, GRAN, EXT));
    let (store, rec) = r.unwrap_or_else(|e| panic!("{how}: recovery failed: {e}"));
    drop(store);
    for r in 0..req.regions() {
        if req.is_region_marked(r) {
            assert!(
                rec.bitmap.is_region_marked(r),
                "{how}: region {r} was durably out of sync (or active) and recovery lost it; outcome {:?}",
                rec.outcome
            );
        }
    }
    if rec.outcome == RecoveryOutcome::Clean {
        assert!(
            marks.iter().any(|m| m == "clean-begin"),
            "{how}: recovered as clean before the clean shutdown began"
        );
    }
    if rec.outcome == RecoveryOutcome::New {
        assert!(
            !marks.iter().any(|m| m == "m0"),
            "{how}: an opened store came back as a new relationship"
        );
    }
    events
}

#[test]
fn every_power_cut_of_the_oos_store_recovers_a_covering_bitmap() {
    let dir = scratch();
    let mut snaps = Vec::new();
    let ((), events) = durable::record(|| scenario(dir.path(), &mut snaps));
    assert!(events.iter().any(|e| matches!(e, Event::Rename { .. })));
    let writes = events
        .iter()
        .filter(|e| matches!(e, Event::Write { .. }))
        .count();
    assert!(writes >= 12, "the scenario stores and commits: {events:?}");
    let states = crash::states(&crash::Files::new(), &events);
    let mut nested = 0;
    let mut torn = 0;
    for (i, st) in states.iter().enumerate() {
        torn += usize::from(st.how.contains("torn"));
        crash::restore(dir.path(), &st.files).unwrap();
        let req = required(&snaps, &st.marks);
        let rec_events = recover_and_check(dir.path(), &req, &st.marks, &st.how);
        // A cut during the recovery itself (every 40th state, to bound the
        // run time): recovering again still covers everything.
        if i % 40 == 0 {
            for st2 in crash::states(&st.files, &rec_events) {
                crash::restore(dir.path(), &st2.files).unwrap();
                let how = format!("{}; then during recovery: {}", st.how, st2.how);
                recover_and_check(dir.path(), &req, &st.marks, &how);
                nested += 1;
            }
        }
    }
    println!(
        "{} events, {} crash states ({torn} torn), {nested} cuts during recovery",
        events.len(),
        states.len()
    );
    assert!(torn > 20 && nested > 20);
}

#[test]
fn garbage_in_either_file_is_refused_and_recovery_falls_back() {
    let dir = scratch();
    let mut snaps = Vec::new();
    scenario(dir.path(), &mut snaps);
    let files = crash::snapshot(dir.path()).unwrap();
    let bitmap_path = dir.path().join(format!("db@{}.bitmap", sanitise(PEER)));
    let al_path = dir.path().join(format!("db@{}.al", sanitise(PEER)));
    let clean_bitmap = &snaps.last().unwrap().bitmap;
    // The bitmap file: truncated anywhere, or one byte flipped anywhere in
    // its header and first bytes: refused with a typed reason, everything marked.
    let good = files[&bitmap_path].clone();
    let mut cases: Vec<Vec<u8>> = (0..good.len())
        .step_by(7)
        .map(|n| good[..n].to_vec())
        .collect();
    for i in (0..good.len()).step_by(5) {
        let mut b = good.clone();
        b[i] ^= 0x20;
        cases.push(b);
    }
    for bad in cases {
        let mut f = files.clone();
        f.insert(bitmap_path.clone(), bad);
        crash::restore(dir.path(), &f).unwrap();
        let (_, rec) = OosStore::open(dir.path(), "db", PEER, SIZE, GRAN, EXT).unwrap();
        assert!(
            matches!(
                rec.outcome,
                RecoveryOutcome::FullResync(FullResyncReason::BitmapCorrupt(_))
            ),
            "{:?}",
            rec.outcome
        );
        assert_eq!(rec.bitmap.dirty_bytes(), SIZE);
    }
    // The activity log: garbage in the slot the clean record is not in is
    // ignored; in both slots, a full resync.
    let al = files[&al_path].clone();
    let newest = newest_record(&al).unwrap().0 as usize;
    let slot = SLOT_SIZE as usize;
    let mut f = files.clone();
    let mut b = al.clone();
    b[(1 - newest) * slot..(2 - newest) * slot].fill(0xa5);
    f.insert(al_path.clone(), b.clone());
    crash::restore(dir.path(), &f).unwrap();
    let (_, rec) = OosStore::open(dir.path(), "db", PEER, SIZE, GRAN, EXT).unwrap();
    assert_eq!(rec.outcome, RecoveryOutcome::Clean);
    assert_eq!(&rec.bitmap, clean_bitmap);
    b[newest * slot + 3] ^= 1;
    f.insert(al_path.clone(), b);
    crash::restore(dir.path(), &f).unwrap();
    let (_, rec) = OosStore::open(dir.path(), "db", PEER, SIZE, GRAN, EXT).unwrap();
    assert!(
        matches!(
            rec.outcome,
            RecoveryOutcome::FullResync(FullResyncReason::ActivityLogCorrupt { .. })
        ),
        "{:?}",
        rec.outcome
    );
    assert_eq!(rec.bitmap.dirty_bytes(), SIZE);
}
