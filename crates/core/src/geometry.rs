//! Volume geometry: size, block sizes, and request range validation.

use thiserror::Error;

/// Smallest block a client must respect (NBD_INFO_BLOCK_SIZE minimum).
pub const MIN_BLOCK: u32 = 512;
/// The block size clients should use for best performance.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ/WRITE payload accepted (32 MiB).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Why a request's range was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RangeError {
    #[error("zero-length request at offset {offset}")]
    ZeroLength { offset: u64 },
    #[error("range {offset}+{len} ends past the volume's end ({size})")]
    PastEnd { offset: u64, len: u64, size: u64 },
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: u32 },
}

/// The shape of a volume as its clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
}

impl Geometry {
    /// A volume of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self { size }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks a range that carries no payload (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS).
    pub fn check(&self, offset: u64, len: u64) -> Result<(), RangeError> {
        if len == 0 {
            return Err(RangeError::ZeroLength { offset });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(RangeError::PastEnd {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Checks a range that carries or returns a payload (READ, WRITE).
    pub fn check_payload(&self, offset: u64, len: u64) -> Result<(), RangeError> {
        if len > u64::from(MAX_PAYLOAD) {
            return Err(RangeError::TooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        self.check(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn edges() {
        let g = Geometry::new(4096);
        assert_eq!(g.check(0, 4096), Ok(()));
        assert_eq!(g.check(4095, 1), Ok(()));
        assert!(matches!(g.check(4096, 1), Err(RangeError::PastEnd { .. })));
        assert!(matches!(g.check(0, 0), Err(RangeError::ZeroLength { .. })));
        assert!(matches!(
            g.check(u64::MAX, 2),
            Err(RangeError::PastEnd { .. })
        ));
        assert!(matches!(
            Geometry::new(u64::MAX).check_payload(0, u64::from(MAX_PAYLOAD) + 1),
            Err(RangeError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn accepted_ranges_lie_inside(size in 0u64..1 << 40, off in any::<u64>(), len in any::<u64>()) {
            let g = Geometry::new(size);
            if g.check(off, len).is_ok() {
                prop_assert!(len > 0);
                prop_assert!(off < size);
                prop_assert!(off + len <= size);
            } else {
                prop_assert!(len == 0 || off.checked_add(len).is_none_or(|e| e > size));
            }
        }
    }
}
