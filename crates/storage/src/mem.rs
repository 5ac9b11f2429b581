//! An in-memory backend, for tests.

use std::io;
use std::ops::Range;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{Backend, Op, Result, StorageError};

/// A volume held in memory. Trim and write-zeroes store zeroes; the
/// allocation map reports everything as data.
#[derive(Debug)]
pub struct MemBackend {
    volume: String,
    size: u64,
    data: RwLock<Vec<u8>>,
}

impl MemBackend {
    /// A zero-filled volume of `size` bytes.
    ///
    /// # Panics
    /// If `size` does not fit in memory's address space (`usize`).
    pub fn new(volume: &str, size: u64) -> Self {
        let len = usize::try_from(size).expect("MemBackend size exceeds usize");
        Self::from_vec(volume, vec![0; len])
    }

    /// A volume with the given contents (its size is `data.len()`).
    pub fn from_vec(volume: &str, data: Vec<u8>) -> Self {
        Self {
            volume: volume.to_owned(),
            size: data.len() as u64,
            data: RwLock::new(data),
        }
    }

    /// A copy of the whole volume.
    pub fn snapshot(&self) -> Vec<u8> {
        self.read().clone()
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The byte range for `[offset, offset+len)`, or an `EINVAL` error.
    fn range(&self, op: Op, offset: u64, len: u64) -> Result<Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset as usize..end as usize),
            _ => Err(StorageError::new(
                &self.volume,
                op,
                offset,
                len,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "range past the end of the volume",
                ),
            )),
        }
    }

    fn zero(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        let r = self.range(op, offset, len)?;
        self.write()[r].fill(0);
        Ok(())
    }
}

impl Backend for MemBackend {
    fn volume(&self) -> &str {
        &self.volume
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self.range(Op::Read, offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.read()[r]);
        Ok(())
    }

    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        let r = self.range(Op::Write, offset, buf.len() as u64)?;
        self.write()[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zero(Op::Trim, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> Result<()> {
        self.zero(Op::WriteZeroes, offset, len)
    }

    fn fast_zeroes(&self) -> bool {
        true
    }

    fn is_fast(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Extent;

    #[test]
    fn ops() {
        let b = MemBackend::new("m", 100);
        assert_eq!(b.size(), 100);
        assert!(b.is_fast() && b.fast_zeroes());
        b.write_at(&[1, 2, 3, 4, 5], 10, false).unwrap();
        let mut buf = [0u8; 7];
        b.read_at(&mut buf, 9).unwrap();
        assert_eq!(buf, [0, 1, 2, 3, 4, 5, 0]);
        assert!(b.try_read_at_nowait(&mut buf, 9).unwrap());
        b.trim(10, 2).unwrap();
        b.write_zeroes(14, 1, true, true).unwrap();
        b.flush().unwrap();
        assert_eq!(&b.snapshot()[9..16], &[0, 0, 0, 3, 4, 0, 0]);
        assert_eq!(
            b.allocation(0, 100).unwrap(),
            vec![Extent {
                len: 100,
                hole: false
            }]
        );
    }

    #[test]
    fn out_of_range_is_an_error() {
        let b = MemBackend::from_vec("m", vec![7; 10]);
        let e = b.write_at(&[0; 4], 8, false).unwrap_err();
        assert_eq!(
            (e.volume.as_str(), e.op, e.offset, e.len),
            ("m", Op::Write, 8, 4)
        );
        assert!(b.read_at(&mut [0; 1], u64::MAX).is_err());
        assert_eq!(b.snapshot(), vec![7; 10]);
    }
}
