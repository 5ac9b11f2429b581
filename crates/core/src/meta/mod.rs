//! The volume metadata record: a volume's identity, its generation ids, its
//! mirror label, whether it was shut down cleanly, and the last verify of
//! each of its mirrors.
//!
//! On disk (all integers little-endian), version 4: a 128-byte header, then
//! (when its length is not 0) the verify section.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BMVOLMD1` |
//! | 8 | 4 | format version (4) |
//! | 12 | 4 | flags (bit 0: clean shutdown) |
//! | 16 | 16 | volume id (random, fixed at creation) |
//! | 32 | 8 | current generation id (0: blank) |
//! | 40 | 8 | size in bytes |
//! | 48 | 32 | generation history: 4 ids, most recent first (0: unused) |
//! | 80 | 1 | mirror label: 0 none (primary), 1 in sync, 2 consistent, 3 inconsistent |
//! | 81 | 7 | reserved, zero |
//! | 88 | 8 | promoted from: the generation that was current when this node was last promoted (0: never) |
//! | 96 | 8 | primary at: the last generation this node wrote as a primary (0: never) |
//! | 104 | 4 | n: length of the verify section (0: none, and the record ends at 128) |
//! | 108 | 16 | reserved, zero |
//! | 124 | 4 | crc32c of bytes 0..124 |
//! | 128 | n | verify section |
//! | 128+n | 4 | crc32c of the verify section (only when n > 0) |
//!
//! The verify section (at most [`MAX_VERIFY_SECTION`] bytes): a u8 count of
//! records (at most [`MAX_VERIFY_PEERS`]), then each [`VerifyRecord`]:
//!
//! | size | field |
//! |---|---|
//! | 2 + p | peer: u16 length p (1 to [`MAX_VERIFY_PEER_LEN`]), UTF-8 |
//! | 8 | verify run id |
//! | 1 | outcome: 1 identical, 2 differ, 3 failed |
//! | 1 | flags: bit 0 full, bit 1 mark, bit 2 differing list truncated |
//! | 72 | started, finished (Unix seconds), total, done, skipped bytes, regions waited, not-ready answers, differing bytes, marked bytes: 9 u64 |
//! | 4 + 16r | differing ranges: u32 count r (at most [`MAX_VERIFY_RANGES`]), each u64 offset, u64 length |
//! | 2 + e | error: u16 length e (at most [`MAX_VERIFY_ERROR_LEN`]), UTF-8; 0: none |
//!
//! Nothing may follow the last record. Version 3 records (the same header
//! with 104..124 reserved, exactly 128 bytes) still load, with no verify
//! records.
//! Version 2 records (the same layout with 81..124 reserved) still load:
//! "promoted from" is 0, and "primary at" is the current generation when the
//! label says primary (0 otherwise).
//! Version 1 records (64 bytes: the same fields up to the size, then 12
//! reserved bytes and the crc32c at 60) still load: their generation becomes
//! the current id with an empty history, and the label is "consistent".
//! Every store writes version 4.

use thiserror::Error;

use crate::generation::{Generations, HISTORY_LEN};

pub const META_MAGIC: [u8; 8] = *b"BMVOLMD1";
pub const META_VERSION: u32 = 4;
/// Length of the header (and of a version 2 or 3 record).
pub const META_LEN: usize = 128;
/// Most verify records one record keeps (one per mirror).
pub const MAX_VERIFY_PEERS: usize = 16;
/// Longest peer name kept, in bytes.
pub const MAX_VERIFY_PEER_LEN: usize = 512;
/// Most differing ranges one verify record keeps (the rest are counted in
/// its differing bytes, and the record says its list is truncated).
pub const MAX_VERIFY_RANGES: usize = 256;
/// Longest error message kept, in bytes.
pub const MAX_VERIFY_ERROR_LEN: usize = 1024;
/// Largest verify section accepted.
pub const MAX_VERIFY_SECTION: usize = 128 << 10;
/// Length of a version 1 record.
pub const META_V1_LEN: usize = 64;
const FLAG_CLEAN: u32 = 1;
const LABEL_AT: usize = 80;
const PROMOTED_FROM_AT: usize = 88;
const PRIMARY_AT_AT: usize = 96;
const SECTION_LEN_AT: usize = 104;
const CRC_AT: usize = META_LEN - 4;
const FLAG_FULL: u8 = 1;
const FLAG_MARK: u8 = 2;
const FLAG_TRUNCATED: u8 = 4;

/// What a mirror's data is worth (seed 004's mirror label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MirrorLabel {
    /// A primary's record (or a promoted mirror's).
    None,
    /// Identical to the primary at `generations.current` when last connected.
    InSync,
    /// A point in time the primary passed through, possibly behind it.
    Consistent,
    /// A resync was running: a mix of old and new data, usable only by force.
    Inconsistent,
}

impl MirrorLabel {
    pub fn code(self) -> u8 {
        match self {
            MirrorLabel::None => 0,
            MirrorLabel::InSync => 1,
            MirrorLabel::Consistent => 2,
            MirrorLabel::Inconsistent => 3,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => MirrorLabel::None,
            1 => MirrorLabel::InSync,
            2 => MirrorLabel::Consistent,
            3 => MirrorLabel::Inconsistent,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MirrorLabel::None => "none",
            MirrorLabel::InSync => "in_sync",
            MirrorLabel::Consistent => "consistent",
            MirrorLabel::Inconsistent => "inconsistent",
        }
    }
}

/// A volume's durable identity and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeMeta {
    pub volume_id: [u8; 16],
    pub generations: Generations,
    pub label: MirrorLabel,
    pub size: u64,
    /// True only while the volume is closed after a clean shutdown. A node
    /// clears it when it opens the volume, so finding it false at start means
    /// the last run crashed.
    pub clean: bool,
    /// The generation that was current when this node was last promoted
    /// (its old primary's), 0 if never. A bitmap this node keeps for a peer
    /// starts at the promotion: a peer still at (or before) this generation
    /// is resynced from what it reports (failback), not from the bitmap.
    pub promoted_from: u64,
    /// The last generation this node wrote as a primary, 0 if never. When it
    /// equals the current generation, this node's own writes of that
    /// generation may be missing on its peers (their bitmaps here say where).
    pub primary_at: u64,
}

/// How a finished verify ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VerifyOutcome {
    Identical,
    Differ,
    Failed,
}

impl VerifyOutcome {
    pub fn code(self) -> u8 {
        match self {
            VerifyOutcome::Identical => 1,
            VerifyOutcome::Differ => 2,
            VerifyOutcome::Failed => 3,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => VerifyOutcome::Identical,
            2 => VerifyOutcome::Differ,
            3 => VerifyOutcome::Failed,
            _ => return None,
        })
    }

    /// The /status spelling: `identical`, `differ` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyOutcome::Identical => "identical",
            VerifyOutcome::Differ => "differ",
            VerifyOutcome::Failed => "failed",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        [
            VerifyOutcome::Identical,
            VerifyOutcome::Differ,
            VerifyOutcome::Failed,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// The last finished verify of one mirror, as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyRecord {
    /// The mirror (its `peer` as configured).
    pub peer: String,
    pub id: u64,
    pub outcome: VerifyOutcome,
    pub full: bool,
    pub mark: bool,
    pub started_unix: u64,
    pub finished_unix: u64,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub skipped_bytes: u64,
    pub regions_waited: u64,
    pub not_ready: u64,
    pub differing_bytes: u64,
    pub marked_bytes: u64,
    /// (offset, length), at most [`MAX_VERIFY_RANGES`].
    pub differing: Vec<(u64, u64)>,
    /// More ranges differed than `differing` holds.
    pub differing_truncated: bool,
    /// Why it failed; empty when it did not.
    pub error: String,
}

impl VerifyRecord {
    /// The record within the format's limits: ranges past
    /// [`MAX_VERIFY_RANGES`] dropped (and the list marked truncated), peer
    /// and error cut at a character boundary. What [`MetaRecord::encode`]
    /// stores.
    pub fn bounded(&self) -> VerifyRecord {
        let mut r = self.clone();
        if r.differing.len() > MAX_VERIFY_RANGES {
            r.differing.truncate(MAX_VERIFY_RANGES);
            r.differing_truncated = true;
        }
        cut(&mut r.peer, MAX_VERIFY_PEER_LEN);
        cut(&mut r.error, MAX_VERIFY_ERROR_LEN);
        r
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let r = self.bounded();
        out.extend_from_slice(&(r.peer.len() as u16).to_le_bytes());
        out.extend_from_slice(r.peer.as_bytes());
        out.extend_from_slice(&r.id.to_le_bytes());
        out.push(r.outcome.code());
        let flags = if r.full { FLAG_FULL } else { 0 }
            | if r.mark { FLAG_MARK } else { 0 }
            | if r.differing_truncated {
                FLAG_TRUNCATED
            } else {
                0
            };
        out.push(flags);
        for n in [
            r.started_unix,
            r.finished_unix,
            r.total_bytes,
            r.done_bytes,
            r.skipped_bytes,
            r.regions_waited,
            r.not_ready,
            r.differing_bytes,
            r.marked_bytes,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&(r.differing.len() as u32).to_le_bytes());
        for (o, l) in &r.differing {
            out.extend_from_slice(&o.to_le_bytes());
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&(r.error.len() as u16).to_le_bytes());
        out.extend_from_slice(r.error.as_bytes());
    }

    fn decode_from(c: &mut Cursor<'_>) -> Result<Self, MetaError> {
        let bad = MetaError::Verify;
        let p = usize::from(c.u16()?);
        if p == 0 || p > MAX_VERIFY_PEER_LEN {
            return Err(bad("peer name length"));
        }
        let peer = c.utf8(p)?;
        let id = c.u64()?;
        let outcome = VerifyOutcome::from_code(c.u8()?).ok_or(bad("unknown outcome"))?;
        let flags = c.u8()?;
        if flags & !(FLAG_FULL | FLAG_MARK | FLAG_TRUNCATED) != 0 {
            return Err(bad("unknown flags"));
        }
        let mut n = [0u64; 9];
        for x in &mut n {
            *x = c.u64()?;
        }
        let count = c.u32()? as usize;
        if count > MAX_VERIFY_RANGES {
            return Err(bad("too many ranges"));
        }
        let mut differing = Vec::with_capacity(count);
        for _ in 0..count {
            differing.push((c.u64()?, c.u64()?));
        }
        let e = usize::from(c.u16()?);
        if e > MAX_VERIFY_ERROR_LEN {
            return Err(bad("error message length"));
        }
        let error = c.utf8(e)?;
        Ok(VerifyRecord {
            peer,
            id,
            outcome,
            full: flags & FLAG_FULL != 0,
            mark: flags & FLAG_MARK != 0,
            started_unix: n[0],
            finished_unix: n[1],
            total_bytes: n[2],
            done_bytes: n[3],
            skipped_bytes: n[4],
            regions_waited: n[5],
            not_ready: n[6],
            differing_bytes: n[7],
            marked_bytes: n[8],
            differing,
            differing_truncated: flags & FLAG_TRUNCATED != 0,
            error,
        })
    }
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let end = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(end);
    }
}

/// Reads a verify section front to back; running out is an error.
struct Cursor<'a> {
    b: &'a [u8],
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], MetaError> {
        if self.b.len() < n {
            return Err(MetaError::Verify("truncated"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, MetaError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, MetaError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, MetaError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, MetaError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn utf8(&mut self, n: usize) -> Result<String, MetaError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| MetaError::Verify("not UTF-8"))
    }
}

/// A volume's record as stored: the fixed fields ([`VolumeMeta`], which it
/// dereferences to) and the last verify of each mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRecord {
    pub meta: VolumeMeta,
    /// At most [`MAX_VERIFY_PEERS`] (more are not stored), one per peer.
    pub verify: Vec<VerifyRecord>,
}

impl std::ops::Deref for MetaRecord {
    type Target = VolumeMeta;
    fn deref(&self) -> &VolumeMeta {
        &self.meta
    }
}

impl std::ops::DerefMut for MetaRecord {
    fn deref_mut(&mut self) -> &mut VolumeMeta {
        &mut self.meta
    }
}

impl From<VolumeMeta> for MetaRecord {
    fn from(meta: VolumeMeta) -> Self {
        MetaRecord {
            meta,
            verify: Vec::new(),
        }
    }
}

impl MetaRecord {
    /// The record as stored (version 4).
    pub fn encode(&self) -> Vec<u8> {
        let mut section = Vec::new();
        if !self.verify.is_empty() {
            let n = self.verify.len().min(MAX_VERIFY_PEERS);
            section.push(n as u8);
            for r in &self.verify[..n] {
                r.encode_into(&mut section);
            }
        }
        debug_assert!(section.len() <= MAX_VERIFY_SECTION);
        let mut out = self.meta.header(section.len() as u32).to_vec();
        if !section.is_empty() {
            let crc = crc32c::crc32c(&section);
            out.extend_from_slice(&section);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out
    }

    /// Reads a record of any version (1 to 4).
    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        let meta = VolumeMeta::decode_header(b)?;
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version < 4 {
            return Ok(meta.into());
        }
        let n = u32::from_le_bytes(
            b[SECTION_LEN_AT..SECTION_LEN_AT + 4]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        if n == 0 {
            return if b.len() == META_LEN {
                Ok(meta.into())
            } else {
                Err(MetaError::Length(b.len()))
            };
        }
        if n > MAX_VERIFY_SECTION {
            return Err(MetaError::Verify("section too large"));
        }
        if b.len() != META_LEN + n + 4 {
            return Err(MetaError::Length(b.len()));
        }
        let section = &b[META_LEN..META_LEN + n];
        let stored = u32::from_le_bytes(b[META_LEN + n..].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(section);
        if stored != computed {
            return Err(MetaError::Checksum { stored, computed });
        }
        let mut c = Cursor { b: section };
        let count = usize::from(c.u8()?);
        if count == 0 || count > MAX_VERIFY_PEERS {
            return Err(MetaError::Verify("record count"));
        }
        let mut verify = Vec::with_capacity(count);
        for _ in 0..count {
            verify.push(VerifyRecord::decode_from(&mut c)?);
        }
        if !c.b.is_empty() {
            return Err(MetaError::Verify("bytes after the last record"));
        }
        Ok(MetaRecord { meta, verify })
    }

    /// The verify record of `peer`, if any.
    pub fn verify_of(&self, peer: &str) -> Option<&VerifyRecord> {
        self.verify.iter().find(|r| r.peer == peer)
    }

    /// Replaces `record.peer`'s verify record (or adds it; past
    /// [`MAX_VERIFY_PEERS`], the oldest finished one goes).
    pub fn set_verify(&mut self, record: VerifyRecord) {
        let record = record.bounded();
        match self.verify.iter_mut().find(|r| r.peer == record.peer) {
            Some(r) => *r = record,
            None => {
                if self.verify.len() >= MAX_VERIFY_PEERS {
                    if let Some(oldest) =
                        (0..self.verify.len()).min_by_key(|&i| self.verify[i].finished_unix)
                    {
                        self.verify.remove(oldest);
                    }
                }
                self.verify.push(record);
            }
        }
    }
}

/// Why a metadata record was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetaError {
    #[error("metadata is {0} bytes, expected {META_LEN} (version 4: plus its verify section; {META_V1_LEN} for version 1)")]
    Length(usize),
    #[error("bad metadata magic")]
    Magic,
    #[error("unsupported metadata version {0}")]
    Version(u32),
    #[error("metadata checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown metadata flags {0:#x}")]
    Flags(u32),
    #[error("unknown mirror label {0}")]
    Label(u8),
    #[error("reserved metadata bytes are not zero")]
    Reserved,
    #[error("malformed verify section: {0}")]
    Verify(&'static str),
}

impl VolumeMeta {
    /// A new primary volume's record: a fresh lineage `generation`.
    pub fn new(volume_id: [u8; 16], size: u64, generation: u64) -> Self {
        Self {
            volume_id,
            generations: Generations::fresh(generation),
            label: MirrorLabel::None,
            size,
            clean: false,
            promoted_from: 0,
            primary_at: generation,
        }
    }

    /// A new mirror volume's record: blank (accepts a full copy) and
    /// inconsistent until that copy completes.
    pub fn new_mirror(volume_id: [u8; 16], size: u64) -> Self {
        Self {
            volume_id,
            generations: Generations::blank(),
            label: MirrorLabel::Inconsistent,
            size,
            clean: false,
            promoted_from: 0,
            primary_at: 0,
        }
    }

    /// The id as lower-case hex, for logs and /status.
    pub fn id_hex(&self) -> String {
        self.volume_id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `<volume id>:<current generation>`, as /status shows it.
    pub fn generation_string(&self) -> String {
        format!("{}:{:016x}", self.id_hex(), self.generations.current)
    }

    /// This record without verify results, as stored (version 4, 128 bytes).
    pub fn encode(&self) -> [u8; META_LEN] {
        self.header(0)
    }

    /// The version 4 header announcing a verify section of `section_len` bytes.
    fn header(&self, section_len: u32) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id);
        b[32..40].copy_from_slice(&self.generations.current.to_le_bytes());
        b[40..48].copy_from_slice(&self.size.to_le_bytes());
        for (i, h) in self.generations.history.iter().enumerate() {
            b[48 + 8 * i..56 + 8 * i].copy_from_slice(&h.to_le_bytes());
        }
        b[LABEL_AT] = self.label.code();
        b[PROMOTED_FROM_AT..PROMOTED_FROM_AT + 8]
            .copy_from_slice(&self.promoted_from.to_le_bytes());
        b[PRIMARY_AT_AT..PRIMARY_AT_AT + 8].copy_from_slice(&self.primary_at.to_le_bytes());
        b[SECTION_LEN_AT..SECTION_LEN_AT + 4].copy_from_slice(&section_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The fixed fields of a record of any version (its verify section, if
    /// any, is checked and dropped: see [`MetaRecord::decode`]).
    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        MetaRecord::decode(b).map(|r| r.meta)
    }

    /// The header alone: everything but a version 4 record's length and
    /// verify section.
    fn decode_header(b: &[u8]) -> Result<Self, MetaError> {
        if b.len() < META_LEN && b.len() != META_V1_LEN {
            return Err(MetaError::Length(b.len()));
        }
        if b[0..8] != META_MAGIC {
            return Err(MetaError::Magic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        let crc_at = match (version, b.len()) {
            (1, META_V1_LEN) => META_V1_LEN - 4,
            (2 | 3, META_LEN) => CRC_AT,
            (META_VERSION, n) if n >= META_LEN => CRC_AT,
            (1..=META_VERSION, n) => return Err(MetaError::Length(n)),
            (v, _) => return Err(MetaError::Version(v)),
        };
        let stored = u32_at(crc_at);
        let computed = crc32c::crc32c(&b[..crc_at]);
        if stored != computed {
            return Err(MetaError::Checksum { stored, computed });
        }
        let flags = u32_at(12);
        if flags & !FLAG_CLEAN != 0 {
            return Err(MetaError::Flags(flags));
        }
        let mut generations = Generations {
            current: u64_at(32),
            history: [0; HISTORY_LEN],
        };
        let (label, promoted_from, primary_at) = match version {
            1 => (MirrorLabel::Consistent, 0, 0),
            _ => {
                for (i, h) in generations.history.iter_mut().enumerate() {
                    *h = u64_at(48 + 8 * i);
                }
                let reserved = if version == 2 {
                    &b[LABEL_AT + 1..CRC_AT]
                } else {
                    &b[LABEL_AT + 1..PROMOTED_FROM_AT]
                };
                // Version 4 uses 104..108 for the verify section's length.
                let tail = if version == 3 {
                    &b[PRIMARY_AT_AT + 8..CRC_AT]
                } else {
                    &b[SECTION_LEN_AT + 4..CRC_AT]
                };
                if reserved
                    .iter()
                    .chain(if version == 2 { &[][..] } else { tail })
                    .any(|&x| x != 0)
                {
                    return Err(MetaError::Reserved);
                }
                let label =
                    MirrorLabel::from_code(b[LABEL_AT]).ok_or(MetaError::Label(b[LABEL_AT]))?;
                if version == 2 {
                    let primary_at = if label == MirrorLabel::None {
                        generations.current
                    } else {
                        0
                    };
                    (label, 0, primary_at)
                } else {
                    (label, u64_at(PROMOTED_FROM_AT), u64_at(PRIMARY_AT_AT))
                }
            }
        };
        Ok(Self {
            volume_id: b[16..32].try_into().expect("16 bytes"),
            generations,
            label,
            size: u64_at(40),
            clean: flags & FLAG_CLEAN != 0,
            promoted_from,
            primary_at,
        })
    }
}

#[cfg(test)]
mod tests;
