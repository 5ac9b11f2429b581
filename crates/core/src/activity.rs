//! The activity log: which coarse extents of a volume may have writes in
//! flight, so that a write does not need a metadata fsync of its own.
//!
//! This is DRBD's approach to guarantee 3 ("every block a mirror may lack is
//! recorded before the host is told the write is done"). Marking the
//! out-of-sync [`Bitmap`] durably before every write would cost an fsync per
//! write. Instead the volume is cut into *extents* (4 MiB by default) and a
//! small durable record lists the *active* ones: a write may only proceed once
//! every extent it touches is in the last durable record. After a crash,
//! recovery marks every extent of that record in the bitmap, which covers
//! every write that was in flight, whether or not it reached the mirror. The
//! record changes only when a write touches an extent that is not active: a
//! workload with a hot set smaller than the capacity (1024 extents = 4 GiB by
//! default) writes metadata almost never.
//!
//! [`ActivityLog`] is the pure decision engine; `node::oos_store` persists its
//! [`Transaction`]s as [`ActivityRecord`]s.
//!
//! # The protocol a caller follows
//!
//! For each write (or TRIM, WRITE_ZEROES) to `[offset, offset + len)`, with
//! the log behind a mutex:
//!
//! 1. [`ActivityLog::begin`]:
//!    - [`Begin::Ready`]: every extent is durably active and now counts the
//!      write as in flight. Send it to the local disk and the mirror.
//!    - [`Begin::NeedsCommit`]: this caller must persist the transaction
//!      (outside the lock), then call [`ActivityLog::committed`], after which
//!      the write is in flight exactly as with `Ready`; or, if persisting
//!      failed, [`ActivityLog::abort`] and fail the write. If
//!      [`Transaction::evicted`] is not empty, the bitmap must be stored
//!      durably *before* the record is written (it may be skipped when the
//!      bitmap has not changed since it was last stored, see
//!      [`Bitmap::changes`]): a mark made while an extent was active is only
//!      covered by the activity log until the extent leaves it.
//!    - [`Begin::Wait`]: call `begin` again after the event named by
//!      [`WaitFor`]. The log keeps no waiter list; the caller wakes waiters
//!      (a `tokio::sync::Notify` or a `Condvar`) after every `committed`,
//!      `abort`, and `end` that returned `true`. With a `Notify`, create the
//!      `notified()` future before releasing the lock that guarded `begin`, so
//!      that a wake-up in between is not lost.
//! 2. When the write is complete on the local disk **and** each mirror has
//!    acknowledged it or the caller has marked its range in the bitmap, call
//!    [`ActivityLog::end`].
//!
//! Only one transaction is committed at a time. Extents wanted by writes that
//! arrive meanwhile are remembered and go into the next transaction together,
//! so a burst of writes to new extents costs two metadata writes, not one
//! each.
//!
//! # Invariants
//!
//! - A write proceeds only when each extent it touches is in the last durable
//!   record and in the record being committed, if any.
//! - An extent with writes in flight is never evicted; eviction takes the
//!   least recently used idle extents.
//! - The active set never holds more than the capacity; a write that needs a
//!   slot when every slot is busy waits ([`WaitFor::Capacity`]); a write
//!   spanning more extents than the capacity is refused
//!   ([`ActivityError::SpanTooLarge`]): the caller marks such a range (a huge
//!   TRIM, say) in the bitmap and stores the bitmap before issuing it.
//!
//! # After a crash
//!
//! The store reads the last valid [`ActivityRecord`] and marks its extents in
//! the stored bitmap ([`ActivityRecord::mark_into`]), stores that bitmap, and
//! the node starts a fresh, empty [`ActivityLog`].
//!
//! # The record on disk
//!
//! All integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BMACTLG1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | flags (bit 0: clean shutdown; a clean record lists no extents) |
//! | 16 | 8 | sequence number (the store's; higher is newer) |
//! | 24 | 8 | extent size in bytes |
//! | 32 | 8 | extent count `n` (at most [`MAX_CAPACITY`]) |
//! | 40 | 8·n | extent numbers, strictly ascending |
//! | 40 + 8·n | 4 | crc32c of every preceding byte |

use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;

use thiserror::Error;

use crate::bitmap::Bitmap;

pub const ACTIVITY_MAGIC: [u8; 8] = *b"BMACTLG1";
pub const ACTIVITY_VERSION: u32 = 1;
/// Smallest extent: one 4 KiB block.
pub const MIN_EXTENT_SIZE: u64 = 4096;
/// The usual extent size, 4 MiB.
pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
/// The usual capacity: 1024 extents of 4 MiB, a 4 GiB hot set.
pub const DEFAULT_CAPACITY: usize = 1024;
/// Largest capacity, which bounds the size of a record.
pub const MAX_CAPACITY: usize = 4096;
/// Largest encoded record: a store's slot must hold at least this.
pub const MAX_RECORD_LEN: usize = HEADER_LEN + 8 * MAX_CAPACITY + CRC_LEN;

const HEADER_LEN: usize = 40;
const CRC_LEN: usize = 4;
const FLAG_CLEAN: u32 = 1;

/// A misuse of the activity log, or a configuration it cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ActivityError {
    #[error("activity log extent size {0} is not a power of two of at least {MIN_EXTENT_SIZE}")]
    ExtentSize(u64),
    #[error("activity log capacity {0} is not between 1 and {MAX_CAPACITY}")]
    Capacity(usize),
    #[error("range {offset}+{len} wraps past the largest offset")]
    RangeOverflow { offset: u64, len: u64 },
    #[error(
        "range {offset}+{len} spans {extents} extents, more than the activity log's \
         capacity of {capacity}; mark it in the bitmap instead"
    )]
    SpanTooLarge {
        offset: u64,
        len: u64,
        extents: u64,
        capacity: usize,
    },
    #[error("end of range {offset}+{len}, but extent {extent} has no write in flight")]
    NotInFlight { offset: u64, len: u64, extent: u64 },
    #[error("transaction {0:?} is not the one being committed")]
    UnknownTransaction(TxId),
}

/// Why an encoded activity record was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ActivityRecordError {
    #[error("activity record is {len} bytes, expected {expected}")]
    Length { len: usize, expected: usize },
    #[error("bad activity record magic")]
    Magic,
    #[error("unsupported activity record version {0}")]
    Version(u32),
    #[error(
        "activity record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown activity record flags {0:#x}")]
    Flags(u32),
    #[error("activity record extent size {0} is not a power of two of at least {MIN_EXTENT_SIZE}")]
    ExtentSize(u64),
    #[error("activity record lists {0} extents, more than the maximum of {MAX_CAPACITY}")]
    TooManyExtents(u64),
    #[error("activity record extents are not strictly ascending at index {0}")]
    NotAscending(usize),
    #[error("a clean-shutdown activity record lists {0} extents")]
    CleanWithExtents(usize),
}

/// Names a transaction, so a stale or foreign one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxId(pub u64);

/// What a write must do before it proceeds; see the module documentation.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    /// Proceed; call [`ActivityLog::end`] when the write is complete.
    Ready,
    /// Persist this transaction, then [`ActivityLog::committed`] (the write
    /// then proceeds) or, on failure, [`ActivityLog::abort`].
    NeedsCommit(Transaction),
    /// Call [`ActivityLog::begin`] again after this event.
    Wait(WaitFor),
}

/// The event a waiting write retries after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// A transaction is being committed, and the write needs an extent that is
    /// in it or that will be in the next one.
    Commit(TxId),
    /// Every free slot is taken by extents with writes in flight: retry after
    /// an [`ActivityLog::end`] that returns `true`.
    Capacity,
}

/// A change of the active set that must be made durable before the write
/// that caused it (and any batched with it) proceeds.
#[derive(Debug, PartialEq, Eq)]
pub struct Transaction {
    id: TxId,
    extent_size: u64,
    added: Vec<u64>,
    evicted: Vec<u64>,
    extents: Vec<u64>,
}

impl Transaction {
    pub fn id(&self) -> TxId {
        self.id
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// Extents that become active, ascending.
    pub fn added(&self) -> &[u64] {
        &self.added
    }

    /// Idle extents that leave the active set, ascending. When this is not
    /// empty, store the bitmap durably before persisting the record.
    pub fn evicted(&self) -> &[u64] {
        &self.evicted
    }

    /// The whole active set after the transaction, ascending: what the
    /// record lists.
    pub fn extents(&self) -> &[u64] {
        &self.extents
    }

    /// The record to persist, with the store's sequence number.
    pub fn record(&self, seq: u64) -> ActivityRecord {
        ActivityRecord {
            seq,
            extent_size: self.extent_size,
            clean: false,
            extents: self.extents.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    in_flight: u32,
    last_use: u64,
}

/// The transaction being committed, as the log remembers it.
#[derive(Debug)]
struct Pending {
    id: TxId,
    added: Vec<u64>,
    /// The creating write's extents among `added`: they start with one write in flight.
    own_added: Vec<u64>,
    /// The creating write's extents that were already active, counted in flight
    /// at creation so nothing evicts them; released again on abort.
    own_pinned: Vec<u64>,
}

/// The in-memory activity log of one (volume, mirror) pair. Pure: no I/O.
#[derive(Debug)]
pub struct ActivityLog {
    shift: u32,
    capacity: usize,
    /// Extents in the last committed record (minus those being evicted by the
    /// transaction in progress), with their writes in flight.
    active: HashMap<u64, Extent>,
    committing: Option<Pending>,
    /// Extents that waiting writes need, for the next transaction. A hint
    /// only (waiters retry anyway); at most `capacity` entries.
    wanted: BTreeSet<u64>,
    clock: u64,
    next_tx: u64,
}

impl ActivityLog {
    /// An empty log of `capacity` extents of `extent_size` bytes.
    pub fn new(extent_size: u64, capacity: usize) -> Result<Self, ActivityError> {
        if !valid_extent_size(extent_size) {
            return Err(ActivityError::ExtentSize(extent_size));
        }
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(ActivityError::Capacity(capacity));
        }
        Ok(Self {
            shift: extent_size.trailing_zeros(),
            capacity,
            active: HashMap::with_capacity(capacity),
            committing: None,
            wanted: BTreeSet::new(),
            clock: 0,
            next_tx: 1,
        })
    }

    pub fn extent_size(&self) -> u64 {
        1 << self.shift
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The committed active set, ascending (without extents a transaction in
    /// progress is adding or evicting).
    pub fn active_extents(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.active.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The transaction being committed, if any.
    pub fn committing(&self) -> Option<TxId> {
        self.committing.as_ref().map(|p| p.id)
    }

    /// True when no write is in flight and no transaction is being committed:
    /// the moment for a clean shutdown.
    pub fn is_idle(&self) -> bool {
        self.committing.is_none() && self.active.values().all(|x| x.in_flight == 0)
    }

    /// Asks to start a write to `[offset, offset + len)`. A zero-length range
    /// is `Ready` and tracks nothing (its `end` is a no-op too).
    pub fn begin(&mut self, offset: u64, len: u64) -> Result<Begin, ActivityError> {
        let Some(span) = self.span(offset, len)? else {
            return Ok(Begin::Ready);
        };
        let missing: Vec<u64> = span
            .clone()
            .filter(|e| !self.active.contains_key(e))
            .collect();
        if missing.is_empty() {
            self.clock += 1;
            for e in span {
                let x = self.active.get_mut(&e).expect("checked active");
                x.in_flight += 1;
                x.last_use = self.clock;
            }
            return Ok(Begin::Ready);
        }
        if let Some(p) = &self.committing {
            let id = p.id;
            let later: Vec<u64> = missing
                .into_iter()
                .filter(|e| !p.added.contains(e))
                .collect();
            self.want(later);
            return Ok(Begin::Wait(WaitFor::Commit(id)));
        }

        // A new transaction: this write's missing extents, then wanted ones
        // as room allows, evicting least recently used idle extents.
        let active = &self.active;
        self.wanted.retain(|e| !active.contains_key(e));
        let mut idle: Vec<(u64, u64)> = self
            .active
            .iter()
            .filter(|(e, x)| x.in_flight == 0 && !span.contains(e))
            .map(|(e, x)| (x.last_use, *e))
            .collect();
        let room = self.capacity - self.active.len() + idle.len();
        if missing.len() > room {
            self.want(missing);
            return Ok(Begin::Wait(WaitFor::Capacity));
        }
        let mut added = missing.clone();
        added.extend(
            self.wanted
                .iter()
                .filter(|e| !span.contains(e))
                .take(room - missing.len())
                .copied()
                .collect::<Vec<_>>(),
        );
        for e in &added {
            self.wanted.remove(e);
        }
        let evict = (self.active.len() + added.len()).saturating_sub(self.capacity);
        idle.sort_unstable();
        let mut evicted: Vec<u64> = idle[..evict].iter().map(|(_, e)| *e).collect();
        for e in &evicted {
            self.active.remove(e);
        }
        self.clock += 1;
        let own_pinned: Vec<u64> = span.filter(|e| self.active.contains_key(e)).collect();
        for e in &own_pinned {
            let x = self.active.get_mut(e).expect("checked active");
            x.in_flight += 1;
            x.last_use = self.clock;
        }
        added.sort_unstable();
        evicted.sort_unstable();
        let mut extents: Vec<u64> = self.active.keys().chain(&added).copied().collect();
        extents.sort_unstable();
        let id = TxId(self.next_tx);
        self.next_tx += 1;
        self.committing = Some(Pending {
            id,
            added: added.clone(),
            own_added: missing,
            own_pinned,
        });
        Ok(Begin::NeedsCommit(Transaction {
            id,
            extent_size: self.extent_size(),
            added,
            evicted,
            extents,
        }))
    }

    /// The transaction's record is durable: its extents become active, and
    /// the write that received it is in flight on all its extents.
    pub fn committed(&mut self, tx: Transaction) -> Result<(), ActivityError> {
        let p = self.take_pending(&tx)?;
        self.clock += 1;
        for e in p.added {
            let own = p.own_added.binary_search(&e).is_ok();
            self.active.insert(
                e,
                Extent {
                    in_flight: u32::from(own),
                    last_use: self.clock,
                },
            );
        }
        Ok(())
    }

    /// Persisting the transaction failed; the write that received it does not
    /// proceed. Its additions are dropped and its evictions stand: the record
    /// on disk is now the old one or the new one, and the next transaction
    /// writes the whole active set again, which both of them cover.
    pub fn abort(&mut self, tx: Transaction) -> Result<(), ActivityError> {
        let p = self.take_pending(&tx)?;
        for e in p.own_pinned {
            let x = self.active.get_mut(&e).expect("pinned extents stay active");
            x.in_flight -= 1;
        }
        Ok(())
    }

    /// A write that `begin` let proceed is complete (see the module
    /// documentation for what "complete" requires). Returns true when an
    /// extent became idle, so that writes waiting for capacity should retry.
    /// A range with no write in flight is refused and changes nothing.
    pub fn end(&mut self, offset: u64, len: u64) -> Result<bool, ActivityError> {
        let Some(span) = self.span(offset, len)? else {
            return Ok(false);
        };
        for e in span.clone() {
            if self.active.get(&e).is_none_or(|x| x.in_flight == 0) {
                return Err(ActivityError::NotInFlight {
                    offset,
                    len,
                    extent: e,
                });
            }
        }
        let mut idle = false;
        for e in span {
            let x = self.active.get_mut(&e).expect("checked active");
            x.in_flight -= 1;
            idle |= x.in_flight == 0;
        }
        Ok(idle)
    }

    /// Extents `[first, last]` touched by a range; `None` when it is empty.
    fn span(&self, offset: u64, len: u64) -> Result<Option<RangeInclusive<u64>>, ActivityError> {
        if len == 0 {
            return Ok(None);
        }
        let last_byte = offset
            .checked_add(len - 1)
            .ok_or(ActivityError::RangeOverflow { offset, len })?;
        let (first, last) = (offset >> self.shift, last_byte >> self.shift);
        let extents = last - first + 1;
        if extents > self.capacity as u64 {
            return Err(ActivityError::SpanTooLarge {
                offset,
                len,
                extents,
                capacity: self.capacity,
            });
        }
        Ok(Some(first..=last))
    }

    fn want(&mut self, extents: Vec<u64>) {
        for e in extents {
            if self.wanted.len() >= self.capacity {
                break;
            }
            self.wanted.insert(e);
        }
    }

    fn take_pending(&mut self, tx: &Transaction) -> Result<Pending, ActivityError> {
        match self.committing.take() {
            Some(p) if p.id == tx.id => Ok(p),
            other => {
                self.committing = other;
                Err(ActivityError::UnknownTransaction(tx.id))
            }
        }
    }
}

fn valid_extent_size(size: u64) -> bool {
    size.is_power_of_two() && size >= MIN_EXTENT_SIZE
}

/// One durable state of the activity log: the active extents at a sequence
/// number, or a clean-shutdown marker. Always canonical (extents strictly
/// ascending, at most [`MAX_CAPACITY`], a valid extent size), so anything it
/// encodes decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityRecord {
    seq: u64,
    extent_size: u64,
    clean: bool,
    extents: Vec<u64>,
}

impl ActivityRecord {
    /// A record of active extents (sorted and deduplicated here).
    pub fn new(
        seq: u64,
        extent_size: u64,
        extents: impl IntoIterator<Item = u64>,
    ) -> Result<Self, ActivityRecordError> {
        if !valid_extent_size(extent_size) {
            return Err(ActivityRecordError::ExtentSize(extent_size));
        }
        let mut extents: Vec<u64> = extents.into_iter().collect();
        extents.sort_unstable();
        extents.dedup();
        if extents.len() > MAX_CAPACITY {
            return Err(ActivityRecordError::TooManyExtents(extents.len() as u64));
        }
        Ok(Self {
            seq,
            extent_size,
            clean: false,
            extents,
        })
    }

    /// The marker written last at a clean shutdown: no write was in flight and
    /// the bitmap stored just before it is complete.
    pub fn clean(seq: u64, extent_size: u64) -> Result<Self, ActivityRecordError> {
        Ok(Self {
            clean: true,
            ..Self::new(seq, extent_size, [])?
        })
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    pub fn is_clean(&self) -> bool {
        self.clean
    }

    /// The active extents, ascending.
    pub fn extents(&self) -> &[u64] {
        &self.extents
    }

    /// Marks every extent of the record in `bitmap` (clipped to the volume):
    /// the crash recovery of everything that may have been in flight.
    pub fn mark_into(&self, bitmap: &mut Bitmap) {
        for e in &self.extents {
            if let Some(offset) = e.checked_mul(self.extent_size) {
                bitmap.mark(offset, self.extent_size);
            }
        }
    }

    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + 8 * self.extents.len() + CRC_LEN
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len());
        b.extend_from_slice(&ACTIVITY_MAGIC);
        b.extend_from_slice(&ACTIVITY_VERSION.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.extent_size.to_le_bytes());
        b.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        for e in &self.extents {
            b.extend_from_slice(&e.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes exactly one record: trailing bytes are an error.
    pub fn decode(b: &[u8]) -> Result<Self, ActivityRecordError> {
        let (record, used) = Self::decode_prefix(b)?;
        if used != b.len() {
            return Err(ActivityRecordError::Length {
                len: b.len(),
                expected: used,
            });
        }
        Ok(record)
    }

    /// Decodes the record at the start of `b` (a store's fixed-size slot),
    /// returning it and its length; the bytes after it are ignored. The
    /// extent count is bounded before the checksum is computed, so a forged
    /// count cannot make it read or allocate past `b`.
    pub fn decode_prefix(b: &[u8]) -> Result<(Self, usize), ActivityRecordError> {
        let min = HEADER_LEN + CRC_LEN;
        if b.len() < min {
            return Err(ActivityRecordError::Length {
                len: b.len(),
                expected: min,
            });
        }
        if b[0..8] != ACTIVITY_MAGIC {
            return Err(ActivityRecordError::Magic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != ACTIVITY_VERSION {
            return Err(ActivityRecordError::Version(version));
        }
        let count = u64_at(32);
        if count > MAX_CAPACITY as u64 {
            return Err(ActivityRecordError::TooManyExtents(count));
        }
        let count = count as usize;
        let body = HEADER_LEN + 8 * count;
        if b.len() < body + CRC_LEN {
            return Err(ActivityRecordError::Length {
                len: b.len(),
                expected: body + CRC_LEN,
            });
        }
        let stored = u32_at(body);
        let computed = crc32c::crc32c(&b[..body]);
        if stored != computed {
            return Err(ActivityRecordError::Checksum { stored, computed });
        }
        let flags = u32_at(12);
        if flags & !FLAG_CLEAN != 0 {
            return Err(ActivityRecordError::Flags(flags));
        }
        let extent_size = u64_at(24);
        if !valid_extent_size(extent_size) {
            return Err(ActivityRecordError::ExtentSize(extent_size));
        }
        let extents: Vec<u64> = (0..count).map(|i| u64_at(HEADER_LEN + 8 * i)).collect();
        if let Some(i) = extents.windows(2).position(|w| w[0] >= w[1]) {
            return Err(ActivityRecordError::NotAscending(i + 1));
        }
        let clean = flags & FLAG_CLEAN != 0;
        if clean && count != 0 {
            return Err(ActivityRecordError::CleanWithExtents(count));
        }
        let record = Self {
            seq: u64_at(16),
            extent_size,
            clean,
            extents,
        };
        Ok((record, body + CRC_LEN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const E: u64 = 16 * 1024;

    fn begin(log: &mut ActivityLog, off: u64, len: u64) -> Begin {
        log.begin(off, len).unwrap()
    }

    fn tx(b: Begin) -> Transaction {
        match b {
            Begin::NeedsCommit(tx) => tx,
            other => panic!("expected a transaction, got {other:?}"),
        }
    }

    #[test]
    fn config_is_checked() {
        assert_eq!(
            ActivityLog::new(4095, 4).unwrap_err(),
            ActivityError::ExtentSize(4095)
        );
        assert_eq!(
            ActivityLog::new(E, 0).unwrap_err(),
            ActivityError::Capacity(0)
        );
        assert_eq!(
            ActivityLog::new(E, MAX_CAPACITY + 1).unwrap_err(),
            ActivityError::Capacity(MAX_CAPACITY + 1)
        );
        let log = ActivityLog::new(DEFAULT_EXTENT_SIZE, DEFAULT_CAPACITY).unwrap();
        assert!(log.is_idle());
    }

    #[test]
    fn hot_extents_need_no_commit() {
        let mut log = ActivityLog::new(E, 4).unwrap();
        let t = tx(begin(&mut log, E - 1, 2));
        assert_eq!(
            (t.added(), t.evicted(), t.extents()),
            (&[0, 1][..], &[][..], &[0, 1][..])
        );
        assert_eq!(log.committing(), Some(t.id()));
        log.committed(t).unwrap();
        // The creator is already in flight on both extents.
        assert!(!log.is_idle());
        assert_eq!(begin(&mut log, 0, E), Begin::Ready);
        assert_eq!(begin(&mut log, E, 10), Begin::Ready);
        assert_eq!(log.end(E - 1, 2), Ok(false));
        assert_eq!(log.end(0, E), Ok(true));
        assert_eq!(log.end(E, 10), Ok(true));
        assert!(log.is_idle());
        assert!(matches!(
            log.end(0, 1),
            Err(ActivityError::NotInFlight { extent: 0, .. })
        ));
        assert_eq!(log.begin(5, 0), Ok(Begin::Ready));
        assert_eq!(log.end(5, 0), Ok(false));
    }

    #[test]
    fn writes_wait_for_the_commit_and_are_batched() {
        let mut log = ActivityLog::new(E, 8).unwrap();
        let t1 = tx(begin(&mut log, 0, 1));
        // Same extent, being committed: wait for it.
        assert_eq!(begin(&mut log, 0, 1), Begin::Wait(WaitFor::Commit(t1.id())));
        // Other extents: wait too, and go into the next transaction together.
        assert_eq!(
            begin(&mut log, 3 * E, 1),
            Begin::Wait(WaitFor::Commit(t1.id()))
        );
        assert_eq!(
            begin(&mut log, 5 * E, 1),
            Begin::Wait(WaitFor::Commit(t1.id()))
        );
        log.committed(t1).unwrap();
        let t2 = tx(begin(&mut log, 3 * E, 1));
        assert_eq!(t2.added(), &[3, 5]);
        assert_eq!(t2.extents(), &[0, 3, 5]);
        assert_eq!(
            begin(&mut log, 5 * E, 1),
            Begin::Wait(WaitFor::Commit(t2.id()))
        );
        log.committed(t2).unwrap();
        assert_eq!(begin(&mut log, 5 * E, 1), Begin::Ready);
        assert_eq!(begin(&mut log, 0, 1), Begin::Ready);
    }

    #[test]
    fn eviction_is_lru_among_idle_extents() {
        let mut log = ActivityLog::new(E, 3).unwrap();
        for e in 0..3 {
            let t = tx(begin(&mut log, e * E, 1));
            log.committed(t).unwrap();
        }
        // Touch 0 again, so 1 is the least recently used; 2 stays busy.
        log.end(0, 1).unwrap();
        log.end(E, 1).unwrap();
        assert_eq!(begin(&mut log, 0, 1), Begin::Ready);
        log.end(0, 1).unwrap();
        let t = tx(begin(&mut log, 7 * E, 1));
        assert_eq!(
            (t.added(), t.evicted(), t.extents()),
            (&[7][..], &[1][..], &[0, 2, 7][..])
        );
        // An evicted extent is not active even before the commit.
        assert_eq!(begin(&mut log, E, 1), Begin::Wait(WaitFor::Commit(t.id())));
        log.committed(t).unwrap();
        // Now 0 is idle, 2 and 7 busy: 1 comes back by evicting 0.
        let t = tx(begin(&mut log, E, 1));
        assert_eq!(t.evicted(), &[0]);
        log.committed(t).unwrap();
        // Everything busy: capacity wait, until an end frees a slot.
        assert_eq!(begin(&mut log, 9 * E, 1), Begin::Wait(WaitFor::Capacity));
        assert_eq!(log.end(2 * E, 1), Ok(true));
        let t = tx(begin(&mut log, 9 * E, 1));
        assert_eq!(t.evicted(), &[2]);
    }

    #[test]
    fn abort_releases_pins_and_keeps_evictions() {
        let mut log = ActivityLog::new(E, 2).unwrap();
        let t = tx(begin(&mut log, 0, 2 * E));
        log.committed(t).unwrap();
        log.end(0, 2 * E).unwrap();
        // Write to extents 1 and 2: pins 1, evicts 0, adds 2.
        let t = tx(begin(&mut log, E, 2 * E));
        assert_eq!((t.added(), t.evicted()), (&[2][..], &[0][..]));
        assert!(!log.is_idle());
        let stale = Transaction {
            id: TxId(99),
            extent_size: E,
            added: vec![],
            evicted: vec![],
            extents: vec![],
        };
        assert_eq!(
            log.abort(stale),
            Err(ActivityError::UnknownTransaction(TxId(99)))
        );
        log.abort(t).unwrap();
        assert!(log.is_idle());
        assert_eq!(log.active_extents(), vec![1]);
        assert_eq!(log.committing(), None);
    }

    #[test]
    fn oversized_and_wrapping_ranges_are_refused() {
        let mut log = ActivityLog::new(E, 4).unwrap();
        assert!(matches!(
            log.begin(1, 4 * E),
            Err(ActivityError::SpanTooLarge { extents: 5, .. })
        ));
        assert!(matches!(
            log.begin(u64::MAX, 2),
            Err(ActivityError::RangeOverflow { .. })
        ));
        assert!(matches!(tx(begin(&mut log, 0, 4 * E)).extents().len(), 4));
    }

    // ---- The whole protocol against a crash, as a model ----

    /// Volume of 32 extents, bitmap at 4 KiB.
    const VOL: u64 = 32 * E;
    const CAP: usize = 4;

    #[derive(Debug, Clone)]
    enum Op {
        New(u64, u64),
        Retry(prop::sample::Index),
        Commit,
        Abort,
        End(prop::sample::Index, bool),
        StoreBitmap,
        Resync(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..VOL, 1..3 * E).prop_map(|(o, l)| Op::New(o, l.min(VOL - o))),
            3 => any::<prop::sample::Index>().prop_map(Op::Retry),
            3 => Just(Op::Commit),
            1 => Just(Op::Abort),
            4 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(i, a)| Op::End(i, a)),
            1 => Just(Op::StoreBitmap),
            1 => (0..VOL / 4096).prop_map(Op::Resync),
        ]
    }

    #[derive(Debug, PartialEq)]
    enum State {
        Waiting,
        Committing,
        InFlight,
        Done,
    }

    struct Model {
        log: ActivityLog,
        writes: Vec<(u64, u64, State)>,
        pending: Option<(Transaction, usize)>,
        /// Extents in every record recovery might read now.
        durable: BTreeSet<u64>,
        mem: Bitmap,
        stored: Bitmap,
        /// What the mirror may really lack because of writes that ended unacknowledged.
        lacking: Bitmap,
    }

    impl Model {
        fn new() -> Self {
            let bm = Bitmap::new(VOL, 4096).unwrap();
            Self {
                log: ActivityLog::new(E, CAP).unwrap(),
                writes: Vec::new(),
                pending: None,
                durable: BTreeSet::new(),
                mem: bm.clone(),
                stored: bm.clone(),
                lacking: bm,
            }
        }

        fn extents(&self, i: usize) -> RangeInclusive<u64> {
            let (o, l, _) = self.writes[i];
            o / E..=(o + l - 1) / E
        }

        fn in_flight_extents(&self) -> BTreeSet<u64> {
            (0..self.writes.len())
                .filter(|&i| self.writes[i].2 == State::InFlight)
                .flat_map(|i| self.extents(i))
                .collect()
        }

        fn try_begin(&mut self, i: usize) -> Result<(), TestCaseError> {
            let (o, l, _) = self.writes[i];
            match self.log.begin(o, l).unwrap() {
                Begin::Ready => {
                    for e in self.extents(i) {
                        prop_assert!(
                            self.durable.contains(&e),
                            "write proceeds on non-durable extent {}",
                            e
                        );
                        if let Some((tx, _)) = &self.pending {
                            prop_assert!(tx.extents().contains(&e));
                        }
                    }
                    self.writes[i].2 = State::InFlight;
                }
                Begin::NeedsCommit(tx) => {
                    prop_assert!(self.pending.is_none(), "two transactions at once");
                    let busy = self.in_flight_extents();
                    prop_assert!(tx.extents().len() <= CAP);
                    prop_assert!(
                        busy.iter().all(|e| tx.extents().contains(e)),
                        "busy extent dropped"
                    );
                    prop_assert!(tx.evicted().iter().all(|e| !busy.contains(e)));
                    prop_assert!(self.extents(i).all(|e| tx.extents().contains(&e)));
                    // The caller's rule: the bitmap is durable before evictions are.
                    if !tx.evicted().is_empty() {
                        self.stored = self.mem.clone();
                    }
                    self.writes[i].2 = State::Committing;
                    self.pending = Some((tx, i));
                }
                Begin::Wait(WaitFor::Commit(id)) => {
                    prop_assert_eq!(self.pending.as_ref().map(|p| p.0.id()), Some(id));
                }
                Begin::Wait(WaitFor::Capacity) => {
                    prop_assert!(self.pending.is_none());
                    let busy = self.in_flight_extents();
                    let span: BTreeSet<u64> = self.extents(i).collect();
                    prop_assert!(busy.union(&span).count() > CAP, "needless capacity wait");
                }
            }
            Ok(())
        }

        fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
            let pick = |state: State, idx: &prop::sample::Index, w: &[(u64, u64, State)]| {
                let c: Vec<usize> = (0..w.len()).filter(|&i| w[i].2 == state).collect();
                (!c.is_empty()).then(|| c[idx.index(c.len())])
            };
            match op {
                Op::New(o, l) => {
                    self.writes.push((*o, *l, State::Waiting));
                    self.try_begin(self.writes.len() - 1)?;
                }
                Op::Retry(idx) => {
                    if let Some(i) = pick(State::Waiting, idx, &self.writes) {
                        self.try_begin(i)?;
                    }
                }
                Op::Commit => {
                    if let Some((tx, i)) = self.pending.take() {
                        self.durable = tx.extents().iter().copied().collect();
                        self.log.committed(tx).unwrap();
                        self.writes[i].2 = State::InFlight;
                    }
                }
                Op::Abort => {
                    if let Some((tx, i)) = self.pending.take() {
                        let new: BTreeSet<u64> = tx.extents().iter().copied().collect();
                        self.durable = self.durable.intersection(&new).copied().collect();
                        self.log.abort(tx).unwrap();
                        self.writes[i].2 = State::Waiting;
                    }
                }
                Op::End(idx, acked) => {
                    if let Some(i) = pick(State::InFlight, idx, &self.writes) {
                        let (o, l, _) = self.writes[i];
                        if !acked {
                            self.mem.mark(o, l);
                            self.lacking.mark(o, l);
                        }
                        self.log.end(o, l).unwrap();
                        self.writes[i].2 = State::Done;
                    }
                }
                Op::StoreBitmap => self.stored = self.mem.clone(),
                Op::Resync(r) => {
                    let (o, l) = self.mem.region_range(*r).unwrap();
                    let busy = self
                        .writes
                        .iter()
                        .any(|(wo, wl, s)| *s == State::InFlight && *wo < o + l && o < wo + wl);
                    if !busy {
                        self.mem.clear(o, l);
                        self.lacking.clear(o, l);
                    }
                }
            }
            Ok(())
        }

        /// A crash now: recovery is the stored bitmap plus the extents of
        /// whichever record is read. It must cover everything the mirror may lack.
        fn check_crash(&self) -> Result<(), TestCaseError> {
            let mut durable = self.durable.clone();
            if let Some((tx, _)) = &self.pending {
                durable.retain(|e| tx.extents().contains(e));
            }
            let mut recovered = self.stored.clone();
            ActivityRecord::new(1, E, durable)
                .unwrap()
                .mark_into(&mut recovered);
            let mut truth = self.lacking.clone();
            for (o, l, s) in &self.writes {
                if *s == State::InFlight {
                    truth.mark(*o, *l);
                }
            }
            let mut both = recovered.clone();
            both.union_with(&truth).unwrap();
            prop_assert_eq!(
                both,
                recovered,
                "recovery misses a block the mirror may lack"
            );
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random interleavings of writes, commits, aborts, ends, bitmap
        /// stores and resyncs: writes only proceed on durable extents, busy
        /// extents are never evicted, the set stays bounded, a crash at any
        /// point recovers a superset of what the mirror may lack, and once the
        /// traffic stops every waiting write gets through.
        #[test]
        fn protocol_never_loses_a_block(ops in proptest::collection::vec(op(), 0..150)) {
            let mut m = Model::new();
            for op in &ops {
                m.apply(op)?;
                prop_assert!(m.log.active_extents().len() <= CAP);
                m.check_crash()?;
            }
            // Drain: finish the commit and all writes, then every waiter proceeds.
            m.apply(&Op::Commit)?;
            let flying: Vec<usize> = (0..m.writes.len()).filter(|&i| m.writes[i].2 == State::InFlight).collect();
            for i in flying {
                let (o, l, _) = m.writes[i];
                m.log.end(o, l).unwrap();
                m.writes[i].2 = State::Done;
            }
            prop_assert!(m.log.is_idle());
            for i in 0..m.writes.len() {
                if m.writes[i].2 != State::Waiting {
                    continue;
                }
                m.try_begin(i)?;
                m.apply(&Op::Commit)?;
                prop_assert_eq!(&m.writes[i].2, &State::InFlight, "write {} starved", i);
                let (o, l, _) = m.writes[i];
                m.log.end(o, l).unwrap();
                m.writes[i].2 = State::Done;
                m.check_crash()?;
            }
        }
    }

    // ---- The record ----

    fn record() -> impl Strategy<Value = ActivityRecord> {
        (
            any::<u64>(),
            12u32..40,
            any::<bool>(),
            proptest::collection::btree_set(any::<u64>(), 0..64),
        )
            .prop_map(|(seq, shift, clean, extents)| {
                if clean {
                    ActivityRecord::clean(seq, 1 << shift).unwrap()
                } else {
                    ActivityRecord::new(seq, 1 << shift, extents).unwrap()
                }
            })
    }

    proptest! {
        #[test]
        fn record_roundtrips(r in record(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let b = r.encode();
            prop_assert_eq!(b.len(), r.encoded_len());
            prop_assert_eq!(ActivityRecord::decode(&b), Ok(r.clone()));
            let mut slot = b.clone();
            slot.extend_from_slice(&tail);
            prop_assert_eq!(ActivityRecord::decode_prefix(&slot), Ok((r, b.len())));
            if !tail.is_empty() {
                prop_assert!(ActivityRecord::decode(&slot).is_err());
            }
        }

        /// Any single corrupted byte is detected, in a slot with trailing bytes too.
        #[test]
        fn record_corruption_is_detected(r in record(), at in any::<prop::sample::Index>(), x in 1u8..=255, tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let mut b = r.encode();
            let at = at.index(b.len());
            b[at] ^= x;
            prop_assert!(ActivityRecord::decode(&b).is_err());
            b.extend_from_slice(&tail);
            prop_assert!(ActivityRecord::decode_prefix(&b).is_err());
        }

        #[test]
        fn record_truncation_is_detected(r in record(), cut in any::<prop::sample::Index>()) {
            let b = r.encode();
            prop_assert!(ActivityRecord::decode_prefix(&b[..cut.index(b.len())]).is_err());
        }

        #[test]
        fn record_arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ActivityRecord::decode_prefix(&b);
        }
    }

    #[test]
    fn record_errors_are_specific() {
        assert_eq!(
            ActivityRecord::new(1, 3000, []),
            Err(ActivityRecordError::ExtentSize(3000))
        );
        assert_eq!(
            ActivityRecord::new(1, E, 0..MAX_CAPACITY as u64 + 1),
            Err(ActivityRecordError::TooManyExtents(MAX_CAPACITY as u64 + 1))
        );
        let full = ActivityRecord::new(1, E, 0..MAX_CAPACITY as u64).unwrap();
        assert_eq!(full.encoded_len(), MAX_RECORD_LEN);
        let r = ActivityRecord::new(7, E, [9, 3, 3]).unwrap();
        assert_eq!(r.extents(), &[3, 9]);
        let good = r.encode();
        let forge = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            let n = b.len() - 4;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            ActivityRecord::decode(&b)
        };
        assert_eq!(forge(&|b| b[0] = 0), Err(ActivityRecordError::Magic));
        assert_eq!(forge(&|b| b[8] = 2), Err(ActivityRecordError::Version(2)));
        assert_eq!(forge(&|b| b[12] = 2), Err(ActivityRecordError::Flags(2)));
        assert_eq!(
            forge(&|b| b[12] = 1),
            Err(ActivityRecordError::CleanWithExtents(2))
        );
        assert_eq!(
            forge(&|b| b[24] = 1),
            Err(ActivityRecordError::ExtentSize(E + 1))
        );
        assert_eq!(
            forge(&|b| b[40] = 9),
            Err(ActivityRecordError::NotAscending(1))
        );
        assert_eq!(
            forge(&|b| b[32..40].copy_from_slice(&u64::MAX.to_le_bytes())),
            Err(ActivityRecordError::TooManyExtents(u64::MAX))
        );
        let mut b = good.clone();
        b[45] ^= 1;
        assert!(matches!(
            ActivityRecord::decode(&b),
            Err(ActivityRecordError::Checksum { .. })
        ));
        let mut bm = Bitmap::new(10 * E - 1, 4096).unwrap();
        r.mark_into(&mut bm);
        assert_eq!(
            bm.runs().collect::<Vec<_>>(),
            vec![(3 * E, E), (9 * E, E - 1)]
        );
    }
}
