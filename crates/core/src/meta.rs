//! The volume metadata record: a volume's identity and generation, and
//! whether it was shut down cleanly.
//!
//! On disk (all integers little-endian), 64 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BMVOLMD1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | flags (bit 0: clean shutdown) |
//! | 16 | 16 | volume id (random, fixed at creation) |
//! | 32 | 8 | generation (starts at 1; later issues advance it) |
//! | 40 | 8 | size in bytes |
//! | 48 | 12 | reserved, zero |
//! | 60 | 4 | crc32c of bytes 0..60 |

use thiserror::Error;

pub const META_MAGIC: [u8; 8] = *b"BMVOLMD1";
pub const META_VERSION: u32 = 1;
pub const META_LEN: usize = 64;
const FLAG_CLEAN: u32 = 1;

/// A volume's durable identity and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeMeta {
    pub volume_id: [u8; 16],
    pub generation: u64,
    pub size: u64,
    /// True only while the volume is closed after a clean shutdown. A node
    /// clears it when it opens the volume, so finding it false at start means
    /// the last run crashed.
    pub clean: bool,
}

/// Why a metadata record was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetaError {
    #[error("metadata is {0} bytes, expected {META_LEN}")]
    Length(usize),
    #[error("bad metadata magic")]
    Magic,
    #[error("unsupported metadata version {0}")]
    Version(u32),
    #[error("metadata checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown metadata flags {0:#x}")]
    Flags(u32),
}

impl VolumeMeta {
    /// A new volume's record.
    pub fn new(volume_id: [u8; 16], size: u64) -> Self {
        Self {
            volume_id,
            generation: 1,
            size,
            clean: false,
        }
    }

    /// The id as lower-case hex, for logs and /status.
    pub fn id_hex(&self) -> String {
        self.volume_id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `<volume id>:<generation>`, as /status shows it.
    pub fn generation_string(&self) -> String {
        format!("{}:{}", self.id_hex(), self.generation)
    }

    pub fn encode(&self) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id);
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b[40..48].copy_from_slice(&self.size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        if b.len() != META_LEN {
            return Err(MetaError::Length(b.len()));
        }
        if b[0..8] != META_MAGIC {
            return Err(MetaError::Magic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != META_VERSION {
            return Err(MetaError::Version(version));
        }
        let stored = u32_at(60);
        let computed = crc32c::crc32c(&b[..60]);
        if stored != computed {
            return Err(MetaError::Checksum { stored, computed });
        }
        let flags = u32_at(12);
        if flags & !FLAG_CLEAN != 0 {
            return Err(MetaError::Flags(flags));
        }
        Ok(Self {
            volume_id: b[16..32].try_into().expect("16 bytes"),
            generation: u64_at(32),
            size: u64_at(40),
            clean: flags & FLAG_CLEAN != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta() -> impl Strategy<Value = VolumeMeta> {
        (any::<[u8; 16]>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(volume_id, generation, size, clean)| VolumeMeta {
                volume_id,
                generation,
                size,
                clean,
            },
        )
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
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = VolumeMeta::decode(&b);
        }
    }

    #[test]
    fn errors_are_specific() {
        let m = VolumeMeta::new([7; 16], 4096);
        assert_eq!(VolumeMeta::decode(&[0; 10]), Err(MetaError::Length(10)));
        let mut b = m.encode();
        b[0] = b'X';
        assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Magic));
        let mut b = m.encode();
        b[8] = 9;
        assert_eq!(VolumeMeta::decode(&b), Err(MetaError::Version(9)));
        assert_eq!(m.generation_string(), format!("{}:1", "07".repeat(16)));
    }
}
