//! The volume metadata record: a volume's identity, its generation ids, its
//! mirror label, and whether it was shut down cleanly.
//!
//! On disk (all integers little-endian), version 3, 128 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BMVOLMD1` |
//! | 8 | 4 | format version (3) |
//! | 12 | 4 | flags (bit 0: clean shutdown) |
//! | 16 | 16 | volume id (random, fixed at creation) |
//! | 32 | 8 | current generation id (0: blank) |
//! | 40 | 8 | size in bytes |
//! | 48 | 32 | generation history: 4 ids, most recent first (0: unused) |
//! | 80 | 1 | mirror label: 0 none (primary), 1 in sync, 2 consistent, 3 inconsistent |
//! | 81 | 7 | reserved, zero |
//! | 88 | 8 | promoted from: the generation that was current when this node was last promoted (0: never) |
//! | 96 | 8 | primary at: the last generation this node wrote as a primary (0: never) |
//! | 104 | 20 | reserved, zero |
//! | 124 | 4 | crc32c of bytes 0..124 |
//!
//! Version 2 records (the same layout with 81..124 reserved) still load:
//! "promoted from" is 0, and "primary at" is the current generation when the
//! label says primary (0 otherwise).
//! Version 1 records (64 bytes: the same fields up to the size, then 12
//! reserved bytes and the crc32c at 60) still load: their generation becomes
//! the current id with an empty history, and the label is "consistent".
//! Every store writes version 3.

use thiserror::Error;

use crate::generation::{Generations, HISTORY_LEN};

pub const META_MAGIC: [u8; 8] = *b"BMVOLMD1";
pub const META_VERSION: u32 = 3;
pub const META_LEN: usize = 128;
/// Length of a version 1 record.
pub const META_V1_LEN: usize = 64;
const FLAG_CLEAN: u32 = 1;
const LABEL_AT: usize = 80;
const PROMOTED_FROM_AT: usize = 88;
const PRIMARY_AT_AT: usize = 96;
const CRC_AT: usize = META_LEN - 4;

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

/// Why a metadata record was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetaError {
    #[error("metadata is {0} bytes, expected {META_LEN} (or {META_V1_LEN} for version 1)")]
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

    pub fn encode(&self) -> [u8; META_LEN] {
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
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        if b.len() != META_LEN && b.len() != META_V1_LEN {
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
            (2 | META_VERSION, META_LEN) => CRC_AT,
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
                let tail = &b[PRIMARY_AT_AT + 8..CRC_AT];
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn label() -> impl Strategy<Value = MirrorLabel> {
        (0u8..4).prop_map(|c| MirrorLabel::from_code(c).unwrap())
    }

    fn meta() -> impl Strategy<Value = VolumeMeta> {
        (
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<[u64; HISTORY_LEN]>(),
            label(),
            any::<u64>(),
            any::<bool>(),
            any::<(u64, u64)>(),
        )
            .prop_map(
                |(volume_id, current, history, label, size, clean, (promoted_from, primary_at))| {
                    VolumeMeta {
                        volume_id,
                        generations: Generations { current, history },
                        label,
                        size,
                        clean,
                        promoted_from,
                        primary_at,
                    }
                },
            )
    }

    /// A version 1 record as the previous build wrote it.
    fn v1(id: [u8; 16], generation: u64, size: u64, clean: bool) -> [u8; META_V1_LEN] {
        let mut b = [0u8; META_V1_LEN];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(clean).to_le_bytes());
        b[16..32].copy_from_slice(&id);
        b[32..40].copy_from_slice(&generation.to_le_bytes());
        b[40..48].copy_from_slice(&size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    proptest! {
        #[test]
        fn roundtrips(m in meta()) {
            prop_assert_eq!(VolumeMeta::decode(&m.encode()), Ok(m));
        }

        /// Any single corrupted byte is detected, never decoded as a valid record.
        #[test]
        fn corruption_is_detected(m in meta(), at in 0usize..META_LEN, x in 1u8..=255) {
            let mut b = m.encode();
            b[at] ^= x;
            prop_assert!(VolumeMeta::decode(&b).is_err());
        }

        #[test]
        fn v1_corruption_is_detected(id in any::<[u8; 16]>(), g in any::<u64>(), size in any::<u64>(), at in 0usize..META_V1_LEN, x in 1u8..=255) {
            let mut b = v1(id, g, size, true);
            b[at] ^= x;
            prop_assert!(VolumeMeta::decode(&b).is_err());
        }

        #[test]
        fn v1_records_load(id in any::<[u8; 16]>(), g in any::<u64>(), size in any::<u64>(), clean in any::<bool>()) {
            let m = VolumeMeta::decode(&v1(id, g, size, clean)).unwrap();
            prop_assert_eq!(m.volume_id, id);
            prop_assert_eq!(m.generations, Generations { current: g, history: [0; HISTORY_LEN] });
            prop_assert_eq!(m.size, size);
            prop_assert_eq!(m.clean, clean);
            prop_assert_eq!(m.label, MirrorLabel::Consistent);
        }

        /// A version 2 record (as the previous build wrote it) loads, with
        /// "primary at" derived from its label.
        #[test]
        fn v2_records_load(m in meta()) {
            let mut b = m.encode();
            b[8..12].copy_from_slice(&2u32.to_le_bytes());
            b[PROMOTED_FROM_AT..PRIMARY_AT_AT + 8].fill(0);
            let crc = crc32c::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            let d = VolumeMeta::decode(&b).unwrap();
            prop_assert_eq!(d.generations, m.generations);
            prop_assert_eq!(d.label, m.label);
            prop_assert_eq!(d.promoted_from, 0);
            let expect = if m.label == MirrorLabel::None { m.generations.current } else { 0 };
            prop_assert_eq!(d.primary_at, expect);
            // A v2 record with bytes in what v3 uses is refused (they were reserved).
            let mut bad = b;
            bad[PROMOTED_FROM_AT] = 1;
            let crc = crc32c::crc32c(&bad[..CRC_AT]);
            bad[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            prop_assert_eq!(VolumeMeta::decode(&bad), Err(MetaError::Reserved));
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = VolumeMeta::decode(&b);
        }

        /// Arbitrary bytes behind a valid magic, version and checksum: still
        /// judged field by field, never a panic.
        #[test]
        fn arbitrary_fields_with_valid_crc(b in proptest::array::uniform32(any::<u8>()), tail in proptest::collection::vec(any::<u8>(), 96)) {
            let mut rec = [0u8; META_LEN];
            rec[..32].copy_from_slice(&b);
            rec[32..].copy_from_slice(&tail);
            rec[0..8].copy_from_slice(&META_MAGIC);
            rec[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
            let crc = crc32c::crc32c(&rec[..CRC_AT]);
            rec[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            if let Ok(m) = VolumeMeta::decode(&rec) {
                prop_assert_eq!(m.encode(), rec);
            }
        }
    }

    #[test]
    fn errors_are_specific() {
        let m = VolumeMeta::new([7; 16], 4096, 0x1234);
        assert_eq!(VolumeMeta::decode(&[0; 10]), Err(MetaError::Length(10)));
        let mut b = m.encode();
        b[0] = b'X';
        assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Magic));
        let mut b = m.encode();
        b[8] = 9;
        assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Version(9)));
        // A v2 or v3 header on a v1-sized record.
        for v in [2, 3] {
            let mut b = v1([1; 16], 1, 4096, false);
            b[8] = v;
            assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Length(64)));
        }
        let reseal = |mut b: [u8; META_LEN]| {
            let crc = crc32c::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut b = m.encode();
        b[LABEL_AT] = 9;
        assert_eq!(VolumeMeta::decode(&reseal(b)), Err(MetaError::Label(9)));
        for at in [84, 110] {
            let mut b = m.encode();
            b[at] = 1;
            assert_eq!(VolumeMeta::decode(&reseal(b)), Err(MetaError::Reserved));
        }
        assert_eq!(m.primary_at, 0x1234);
        assert_eq!(
            m.generation_string(),
            format!("{}:0000000000001234", "07".repeat(16))
        );
        let mirror = VolumeMeta::new_mirror([1; 16], 4096);
        assert!(mirror.generations.is_blank());
        assert_eq!(mirror.label, MirrorLabel::Inconsistent);
    }
}
