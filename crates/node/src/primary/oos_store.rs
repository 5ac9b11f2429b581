//! Durable out-of-sync state of one (volume, mirror peer) pair: the bitmap
//! of regions the mirror may lack, and the activity log of extents where
//! writes may be in flight (see `blockmirror_core::activity` for the protocol).
//!
//! Two files in the store's directory, named `<volume>@<peer>.bitmap` and
//! `<volume>@<peer>.al`. Characters other than ASCII letters, digits, `.`,
//! `_` and `-` in the names are written as `%XX` (so `10.0.0.2:7000` becomes
//! `10.0.0.2%3A7000`, and distinct names never share files):
//!
//! - **The bitmap file** holds one encoded [`Bitmap`]. It is replaced whole:
//!   write a temporary file, fsync, rename over the old one, fsync the
//!   directory. After a crash it holds the old bitmap or the new one. It is
//!   written lazily: periodically, at a clean shutdown, and before an
//!   activity-log transaction that evicts extents (when the bitmap changed).
//! - **The activity-log file** is a checksummed double buffer: two slots of
//!   [`SLOT_SIZE`] bytes, each holding one [`ActivityRecord`]. A commit writes
//!   the slot not holding the newest record (pwrite, then fdatasync) and only
//!   then switches to the other slot for the next commit, so a torn or failed
//!   write never touches the newest valid record. Recovery takes the valid
//!   record with the highest sequence number.
//!
//! **The clean flag lives in the activity log**: a clean shutdown stores the
//! bitmap, then writes a clean record (no extents) as the log's last word.
//! The first transaction after a restart supersedes it with an ordinary
//! record, so the flag needs no write at open and cannot outlive a write.
//!
//! At [`OosStore::open`] the start bitmap is decided as follows, and made
//! durable before `open` returns:
//!
//! | bitmap file | activity log | start bitmap | outcome |
//! |---|---|---|---|
//! | missing | missing | everything marked | [`RecoveryOutcome::New`]: a new mirror relationship has never been synced |
//! | valid | valid, clean | the stored bitmap | [`RecoveryOutcome::Clean`] |
//! | valid | valid, not clean | stored bitmap ∪ the record's extents | [`RecoveryOutcome::Crash`] |
//! | missing or corrupt | any | everything marked | [`RecoveryOutcome::FullResync`] |
//! | valid | missing, or both slots corrupt | everything marked | [`RecoveryOutcome::FullResync`] |
//!
//! Losing either file thus costs a full resync, never silent divergence. A
//! stored bitmap of another size or granularity (the volume was grown, the
//! config changed) is converted to a superset ([`Bitmap::resized`]).
//!
//! Every method does blocking file I/O: call it from `spawn_blocking` in
//! async code. One process owns a store's files at a time.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use blockmirror_core::activity::{
    ActivityRecord, ActivityRecordError, Transaction, MAX_RECORD_LEN,
};
use blockmirror_core::bitmap::{Bitmap, BitmapError};
use thiserror::Error;

/// Size of each of the activity log's two slots.
pub const SLOT_SIZE: u64 = 64 * 1024;
const _: () = assert!(MAX_RECORD_LEN as u64 <= SLOT_SIZE);

/// Why the out-of-sync store failed. Each message names the volume and the
/// peer, and the file where there is one.
#[derive(Debug, Error)]
pub enum OosStoreError {
    #[error("out-of-sync state of volume {volume} for peer {peer}: {path}: {source}")]
    Io {
        volume: String,
        peer: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("out-of-sync state of volume {volume} for peer {peer}: {source}")]
    Geometry {
        volume: String,
        peer: String,
        #[source]
        source: BitmapError,
    },
    #[error(
        "out-of-sync state of volume {volume} for peer {peer}: activity log extent size \
         {extent_size} is not a power of two of at least 4096"
    )]
    ExtentSize {
        volume: String,
        peer: String,
        extent_size: u64,
    },
    #[error(
        "out-of-sync state of volume {volume} for peer {peer}: {path}: given a bitmap of \
         {got_size} bytes at granularity {got_granularity}, the store keeps {size} bytes at \
         granularity {granularity}"
    )]
    BitmapMismatch {
        volume: String,
        peer: String,
        path: PathBuf,
        got_size: u64,
        got_granularity: u64,
        size: u64,
        granularity: u64,
    },
    #[error(
        "out-of-sync state of volume {volume} for peer {peer}: {path}: transaction for extents \
         of {got} bytes, the store's are {expected}"
    )]
    ExtentSizeMismatch {
        volume: String,
        peer: String,
        path: PathBuf,
        got: u64,
        expected: u64,
    },
}

/// What [`OosStore::open`] found, and the bitmap to start from.
#[derive(Debug)]
pub struct Recovery {
    /// The bitmap to start from; already durable when `open` returns.
    pub bitmap: Bitmap,
    pub outcome: RecoveryOutcome,
    /// `(volume size, granularity)` of the stored bitmap when it differed
    /// from the configured shape and was converted.
    pub converted_from: Option<(u64, u64)>,
}

impl Recovery {
    /// Whether the previous run ended with [`OosStore::mark_clean_shutdown`]
    /// (and no write since).
    pub fn was_clean(&self) -> bool {
        self.outcome == RecoveryOutcome::Clean
    }
}

/// How the start bitmap was obtained; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryOutcome {
    /// No state: a new mirror relationship, everything marked.
    New,
    /// Clean shutdown: the stored bitmap, exactly.
    Clean,
    /// The last run did not shut down cleanly: the stored bitmap plus every
    /// extent of the last activity record (`replayed_extents` of them).
    Crash { replayed_extents: usize },
    /// The stored state is unusable: everything marked.
    FullResync(FullResyncReason),
}

/// Why the stored state could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullResyncReason {
    BitmapMissing,
    BitmapCorrupt(BitmapError),
    ActivityLogMissing,
    ActivityLogCorrupt {
        slot0: ActivityRecordError,
        slot1: ActivityRecordError,
    },
}

impl fmt::Display for FullResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BitmapMissing => write!(f, "the bitmap file is missing"),
            Self::BitmapCorrupt(e) => write!(f, "the bitmap file is corrupt: {e}"),
            Self::ActivityLogMissing => write!(f, "the activity log file is missing"),
            Self::ActivityLogCorrupt { slot0, slot1 } => write!(
                f,
                "both activity log slots are corrupt (slot 0: {slot0}; slot 1: {slot1})"
            ),
        }
    }
}

/// Where the next activity record goes.
#[derive(Debug)]
struct AlState {
    file: File,
    next_slot: u64,
    next_seq: u64,
}

/// Names, shape and file helpers of a store.
#[derive(Debug)]
struct Files {
    volume: String,
    peer: String,
    dir: PathBuf,
    bitmap_path: PathBuf,
    al_path: PathBuf,
    volume_size: u64,
    granularity: u64,
    extent_size: u64,
}

/// The durable out-of-sync state of one (volume, mirror peer) pair. Shared
/// by reference: commits and bitmap stores may run from different threads.
#[derive(Debug)]
pub struct OosStore {
    files: Files,
    al: Mutex<AlState>,
    /// Serialises bitmap stores (they share the temporary file).
    bitmap_write: Mutex<()>,
}

impl OosStore {
    /// Opens (or creates) the state of `volume`'s mirror on `peer` in `dir`,
    /// and recovers the bitmap to start from (see the module documentation).
    pub fn open(
        dir: &Path,
        volume: &str,
        peer: &str,
        volume_size: u64,
        granularity: u64,
        extent_size: u64,
    ) -> Result<(Self, Recovery), OosStoreError> {
        let mut all =
            Bitmap::new(volume_size, granularity).map_err(|source| OosStoreError::Geometry {
                volume: volume.to_owned(),
                peer: peer.to_owned(),
                source,
            })?;
        all.mark_all();
        if ActivityRecord::new(0, extent_size, []).is_err() {
            return Err(OosStoreError::ExtentSize {
                volume: volume.to_owned(),
                peer: peer.to_owned(),
                extent_size,
            });
        }
        let base = format!("{}@{}", sanitise(volume), sanitise(peer));
        let files = Files {
            volume: volume.to_owned(),
            peer: peer.to_owned(),
            dir: dir.to_owned(),
            bitmap_path: dir.join(format!("{base}.bitmap")),
            al_path: dir.join(format!("{base}.al")),
            volume_size,
            granularity,
            extent_size,
        };
        fs::create_dir_all(dir).map_err(|e| files.io(dir, e))?;

        let stored = match fs::read(&files.bitmap_path) {
            Ok(bytes) => Some(Bitmap::decode(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(files.io(&files.bitmap_path, e)),
        };
        let newest = match fs::read(&files.al_path) {
            Ok(bytes) => Some(newest_record(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(files.io(&files.al_path, e)),
        };

        let full = |reason| (all.clone(), RecoveryOutcome::FullResync(reason), None);
        let (bitmap, outcome, converted_from) = match (stored, &newest) {
            (None, None) => (all.clone(), RecoveryOutcome::New, None),
            (None, Some(_)) => full(FullResyncReason::BitmapMissing),
            (Some(Err(e)), _) => full(FullResyncReason::BitmapCorrupt(e)),
            (Some(Ok(_)), None) => full(FullResyncReason::ActivityLogMissing),
            (Some(Ok(_)), Some(Err((slot0, slot1)))) => {
                full(FullResyncReason::ActivityLogCorrupt {
                    slot0: slot0.clone(),
                    slot1: slot1.clone(),
                })
            }
            (Some(Ok(bm)), Some(Ok((_, record)))) => {
                let (mut bm, converted_from) =
                    if bm.volume_size() == volume_size && bm.granularity() == granularity {
                        (bm, None)
                    } else {
                        let from = (bm.volume_size(), bm.granularity());
                        let bm = bm.resized(volume_size, granularity).map_err(|source| {
                            OosStoreError::Geometry {
                                volume: volume.to_owned(),
                                peer: peer.to_owned(),
                                source,
                            }
                        })?;
                        (bm, Some(from))
                    };
                let outcome = if record.is_clean() {
                    RecoveryOutcome::Clean
                } else {
                    record.mark_into(&mut bm);
                    RecoveryOutcome::Crash {
                        replayed_extents: record.extents().len(),
                    }
                };
                (bm, outcome, converted_from)
            }
        };

        // Make the start bitmap durable before any new activity record can
        // supersede the extents it absorbed.
        if outcome != RecoveryOutcome::Clean || converted_from.is_some() {
            files.replace_file(&files.bitmap_path, &bitmap.encode())?;
        }
        let al = match newest {
            Some(Ok((slot, record))) => AlState {
                file: files.open_activity_log()?,
                next_slot: 1 - slot,
                next_seq: record.seq() + 1,
            },
            _ => files.create_activity_log()?,
        };
        let store = Self {
            files,
            al: Mutex::new(al),
            bitmap_write: Mutex::new(()),
        };
        let recovery = Recovery {
            bitmap,
            outcome,
            converted_from,
        };
        Ok((store, recovery))
    }

    pub fn volume(&self) -> &str {
        &self.files.volume
    }

    pub fn peer(&self) -> &str {
        &self.files.peer
    }

    pub fn bitmap_path(&self) -> &Path {
        &self.files.bitmap_path
    }

    pub fn activity_log_path(&self) -> &Path {
        &self.files.al_path
    }

    /// Makes an activity-log transaction durable (pwrite + fdatasync of the
    /// older slot); when this returns `Ok`, the caller may call
    /// `ActivityLog::committed`. On error the slot is reused next time, so
    /// the newest valid record is never overwritten by a retry.
    ///
    /// If the transaction evicts extents, [`OosStore::store_bitmap`] must
    /// have stored a bitmap taken after `begin` returned it (unless the
    /// bitmap has not changed since the last store).
    pub fn commit_activity(&self, tx: &Transaction) -> Result<(), OosStoreError> {
        if tx.extent_size() != self.files.extent_size {
            return Err(OosStoreError::ExtentSizeMismatch {
                volume: self.files.volume.clone(),
                peer: self.files.peer.clone(),
                path: self.files.al_path.clone(),
                got: tx.extent_size(),
                expected: self.files.extent_size,
            });
        }
        let mut al = self.al_state();
        let record = tx.record(al.next_seq);
        self.write_record(&mut al, &record)
    }

    /// Durably replaces the stored bitmap (temporary file, fsync, rename,
    /// directory fsync). Lazy by design: call it periodically, before
    /// committing a transaction that evicts extents, and at shutdown. To keep
    /// the bitmap's lock short, clone the bitmap under it and store the clone.
    pub fn store_bitmap(&self, bitmap: &Bitmap) -> Result<(), OosStoreError> {
        if bitmap.volume_size() != self.files.volume_size
            || bitmap.granularity() != self.files.granularity
        {
            return Err(OosStoreError::BitmapMismatch {
                volume: self.files.volume.clone(),
                peer: self.files.peer.clone(),
                path: self.files.bitmap_path.clone(),
                got_size: bitmap.volume_size(),
                got_granularity: bitmap.granularity(),
                size: self.files.volume_size,
                granularity: self.files.granularity,
            });
        }
        let _guard = self
            .bitmap_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.files
            .replace_file(&self.files.bitmap_path, &bitmap.encode())
    }

    /// Records a clean shutdown: stores `bitmap`, then writes the clean
    /// activity record. Call it only when no write is in flight
    /// (`ActivityLog::is_idle`) and none will start through the current
    /// `ActivityLog`: a write it let through as `Ready` would not be covered.
    /// A later transaction supersedes the clean record, so a store may keep
    /// being used with a fresh `ActivityLog`.
    pub fn mark_clean_shutdown(&self, bitmap: &Bitmap) -> Result<(), OosStoreError> {
        self.store_bitmap(bitmap)?;
        let mut al = self.al_state();
        let record = ActivityRecord::clean(al.next_seq, self.files.extent_size)
            .expect("extent size checked at open");
        self.write_record(&mut al, &record)
    }

    fn al_state(&self) -> MutexGuard<'_, AlState> {
        self.al.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_record(&self, al: &mut AlState, record: &ActivityRecord) -> Result<(), OosStoreError> {
        let bytes = record.encode();
        al.file
            .write_all_at(&bytes, al.next_slot * SLOT_SIZE)
            .and_then(|()| al.file.sync_data())
            .map_err(|e| self.files.io(&self.files.al_path, e))?;
        al.next_slot = 1 - al.next_slot;
        al.next_seq += 1;
        Ok(())
    }
}

impl Files {
    fn open_activity_log(&self) -> Result<File, OosStoreError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.al_path)
            .map_err(|e| self.io(&self.al_path, e))
    }

    /// Creates a fresh activity log holding one empty record (sequence 1) in
    /// slot 0, atomically.
    fn create_activity_log(&self) -> Result<AlState, OosStoreError> {
        let record = ActivityRecord::new(1, self.extent_size, [])
            .expect("extent size checked at open")
            .encode();
        let mut bytes = vec![0u8; 2 * SLOT_SIZE as usize];
        bytes[..record.len()].copy_from_slice(&record);
        self.replace_file(&self.al_path, &bytes)?;
        Ok(AlState {
            file: self.open_activity_log()?,
            next_slot: 1,
            next_seq: 2,
        })
    }

    /// Write-temp, fsync, rename, fsync the directory.
    fn replace_file(&self, path: &Path, bytes: &[u8]) -> Result<(), OosStoreError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp).map_err(|e| self.io(&tmp, e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| self.io(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| self.io(path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(&self.dir, e))
    }

    fn io(&self, path: &Path, source: io::Error) -> OosStoreError {
        OosStoreError::Io {
            volume: self.volume.clone(),
            peer: self.peer.clone(),
            path: path.to_owned(),
            source,
        }
    }
}

/// The valid record with the highest sequence number and its slot, or why
/// each slot is invalid.
fn newest_record(
    file: &[u8],
) -> Result<(u64, ActivityRecord), (ActivityRecordError, ActivityRecordError)> {
    let slot = |i: u64| {
        let start = (i * SLOT_SIZE) as usize;
        let end = ((i + 1) * SLOT_SIZE) as usize;
        let bytes = file.get(start..end.min(file.len())).unwrap_or(&[]);
        ActivityRecord::decode_prefix(bytes).map(|(r, _)| (i, r))
    };
    match (slot(0), slot(1)) {
        (Ok(a), Ok(b)) => Ok(if b.1.seq() > a.1.seq() { b } else { a }),
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(a), Err(b)) => Err((a, b)),
    }
}

/// A name as a file-name component: ASCII letters, digits, `.`, `_` and `-`
/// stay, every other byte becomes `%XX`. Injective, so distinct names never
/// share a file.
fn sanitise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
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
}
