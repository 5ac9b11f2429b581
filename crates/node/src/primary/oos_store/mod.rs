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
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use blockmirror_core::activity::{
    ActivityRecord, ActivityRecordError, Transaction, MAX_RECORD_LEN,
};
use blockmirror_core::bitmap::{Bitmap, BitmapError};
use blockmirror_storage::durable;
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
            Ok(bytes) => {
                if let Some((slot, error)) = damaged_slot(&bytes) {
                    tracing::warn!(volume, peer, slot, %error,
                        "activity log: one slot is damaged, recovering from the other: after a \
                         power cut this is the torn update of a write never issued (harmless); \
                         otherwise the medium damaged it, and extents it added may be missed: \
                         run `blockmirror verify` once the mirror is in sync");
                }
                Some(newest_record(&bytes))
            }
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
        durable::write_at_sync(
            &al.file,
            &self.files.al_path,
            &bytes,
            al.next_slot * SLOT_SIZE,
        )
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
        durable::replace_file(path, Path::new(&tmp), bytes).map_err(|e| self.io(&e.path, e.source))
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

/// A slot that holds bytes but no valid record while the other slot holds
/// one (a slot never written is all zeroes): recovery uses the other, and
/// says so.
fn damaged_slot(file: &[u8]) -> Option<(u64, ActivityRecordError)> {
    let slot = |i: u64| {
        let start = ((i * SLOT_SIZE) as usize).min(file.len());
        let end = (((i + 1) * SLOT_SIZE) as usize).min(file.len());
        &file[start..end]
    };
    let (a, b) = (slot(0), slot(1));
    match (
        ActivityRecord::decode_prefix(a),
        ActivityRecord::decode_prefix(b),
    ) {
        (Ok(_), Err(e)) if b.iter().any(|&x| x != 0) => Some((1, e)),
        (Err(e), Ok(_)) if a.iter().any(|&x| x != 0) => Some((0, e)),
        _ => None,
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
mod crash_points;
#[cfg(test)]
mod tests;
