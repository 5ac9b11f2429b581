//! A volume stored in a regular file or on a block device.
//!
//! Regular files are created sparse and grown (sparse) to the configured size.
//! Block devices must be at least the configured size. All I/O is positional
//! (`pread`/`pwrite` and friends), so one [`FileBackend`] serves many threads.
//!
//! With [`FileOptions::direct`] the file is opened `O_DIRECT`: every transfer
//! goes through an aligned bounce buffer, and writes that do not cover whole
//! blocks read-modify-write the partial blocks at their edges. A per-block
//! lock (striped) serialises those read-modify-write cycles, so concurrent
//! unaligned writes to *different* bytes of one block do not lose each other;
//! writes that overlap each other keep NBD's rule (the result is unspecified).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use rustix::fs::{FallocateFlags, FileType, OFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

use crate::{Backend, Extent, Op, Result, StorageError};

/// Offset and length alignment used for `O_DIRECT` on regular files. Safe on
/// every Linux filesystem with blocks up to 4 KiB.
const FILE_DIRECT_ALIGN: u64 = 4096;

/// Memory alignment of bounce buffers for `O_DIRECT`.
const MEM_ALIGN: usize = 4096;

/// Largest bounce buffer (and zero buffer) allocated for one transfer.
const MAX_CHUNK: usize = 1 << 20;

/// Number of lock stripes for `O_DIRECT` read-modify-write of partial blocks.
const RMW_STRIPES: usize = 64;

/// How to open a [`FileBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// A regular file or a block device.
    pub path: PathBuf,
    /// Volume size in bytes.
    pub size: u64,
    /// Open with `O_DIRECT` (bypass the page cache).
    pub direct: bool,
    /// Create a missing regular file (sparse). Ignored with `read_only`.
    pub create: bool,
    /// Open read-only: writes, trims and zeroing fail with `EROFS`, and a
    /// regular file smaller than `size` is refused instead of grown.
    pub read_only: bool,
}

impl FileOptions {
    /// Options for a buffered, read-write volume of `size` bytes at `path`,
    /// created if missing.
    pub fn new(path: impl Into<PathBuf>, size: u64) -> Self {
        Self {
            path: path.into(),
            size,
            direct: false,
            create: true,
            read_only: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    BlockDevice,
}

/// State for `O_DIRECT` I/O.
#[derive(Debug)]
struct Direct {
    /// Offset and length alignment (a power of two).
    align: u64,
    /// Stripes serialising read-modify-write of partial blocks.
    rmw_locks: Box<[Mutex<()>]>,
}

/// A [`Backend`] on a regular file or a block device.
#[derive(Debug)]
pub struct FileBackend {
    volume: String,
    path: PathBuf,
    file: File,
    size: u64,
    kind: Kind,
    read_only: bool,
    direct: Option<Direct>,
    /// Logical block size of a block device (alignment `fallocate` needs).
    device_block: u64,
    /// `pwritev2(RWF_DSYNC)` not yet seen to be unsupported.
    dsync_ok: AtomicBool,
    /// `preadv2(RWF_NOWAIT)` not yet seen to be unsupported.
    nowait_ok: AtomicBool,
    /// `FALLOC_FL_PUNCH_HOLE` not yet seen to be unsupported.
    punch_ok: AtomicBool,
    /// `FALLOC_FL_ZERO_RANGE` not yet seen to be unsupported.
    zero_range_ok: AtomicBool,
}

impl FileBackend {
    /// Opens (and for a missing regular file with `create`, creates) the
    /// volume's storage.
    ///
    /// A regular file smaller than `opts.size` is extended sparse (with
    /// `direct`, to the next multiple of 4 KiB, so whole-block transfers
    /// never pass its end); a larger one keeps its size, and the backend uses
    /// its first `opts.size` bytes. A block device smaller than `opts.size`
    /// is refused.
    pub fn open(volume: &str, opts: &FileOptions) -> Result<FileBackend> {
        let open_err = |e: io::Error| {
            StorageError::new(volume, Op::Open, 0, opts.size, with_path(&opts.path, e))
        };

        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.create && !opts.read_only {
            oo.create(true);
        }
        if opts.direct {
            oo.custom_flags(OFlags::DIRECT.bits() as i32);
        }
        let file = oo.open(&opts.path).map_err(open_err)?;

        let stat = rustix::fs::fstat(&file).map_err(|e| open_err(e.into()))?;
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Kind::Regular,
            FileType::BlockDevice => Kind::BlockDevice,
            other => {
                return Err(open_err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a regular file or block device ({other:?})"),
                )))
            }
        };

        let mut device_block = 512;
        let direct_align = match kind {
            Kind::Regular => {
                let have = u64::try_from(stat.st_size).unwrap_or(0);
                let want = if opts.direct {
                    align_up(opts.size, FILE_DIRECT_ALIGN)
                } else {
                    opts.size
                };
                if have < want {
                    if opts.read_only {
                        if have < opts.size {
                            return Err(open_err(too_small("file", have, opts.size)));
                        }
                    } else {
                        file.set_len(want).map_err(open_err)?;
                    }
                }
                FILE_DIRECT_ALIGN
            }
            Kind::BlockDevice => {
                let have =
                    rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| open_err(e.into()))?;
                if have < opts.size {
                    return Err(open_err(too_small("block device", have, opts.size)));
                }
                if let Ok(b) = rustix::fs::ioctl_blksszget(&file) {
                    if b.is_power_of_two() && b >= 512 {
                        device_block = u64::from(b);
                    }
                }
                device_block
            }
        };

        let direct = opts.direct.then(|| Direct {
            align: direct_align,
            rmw_locks: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
        });

        Ok(FileBackend {
            volume: volume.to_owned(),
            path: opts.path.clone(),
            file,
            size: opts.size,
            kind,
            read_only: opts.read_only,
            direct,
            device_block,
            dsync_ok: AtomicBool::new(true),
            nowait_ok: AtomicBool::new(true),
            punch_ok: AtomicBool::new(true),
            zero_range_ok: AtomicBool::new(true),
        })
    }

    /// The path this backend was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the storage is a block device.
    pub fn is_block_device(&self) -> bool {
        self.kind == Kind::BlockDevice
    }

    /// True when opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn err(&self, op: Op, offset: u64, len: u64, e: io::Error) -> StorageError {
        StorageError::new(&self.volume, op, offset, len, e)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(Errno::ROFS.into())
        } else {
            Ok(())
        }
    }

    // ---- reads ----

    fn read_impl(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            None => self.file.read_exact_at(buf, offset),
            Some(d) => self.direct_read(d, buf, offset),
        }
    }

    fn direct_read(&self, d: &Direct, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let mut bounce =
            AlignedBuf::new(MAX_CHUNK.min(align_up(buf.len() as u64 + d.align, d.align) as usize));
        while pos < end {
            let start = align_down(pos, d.align);
            let chunk_end = end.min(start + bounce.len() as u64);
            let span = (align_up(chunk_end, d.align) - start) as usize;
            let b = &mut bounce.as_mut()[..span];
            let got = read_full(&self.file, b, start)?;
            if start + (got as u64) < chunk_end {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short read: end of file",
                ));
            }
            let from = (pos - start) as usize;
            let n = (chunk_end - pos) as usize;
            let at = (pos - offset) as usize;
            buf[at..at + n].copy_from_slice(&b[from..from + n]);
            pos = chunk_end;
        }
        Ok(())
    }

    fn nowait_read(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let mut iov = [IoSliceMut::new(&mut buf[done..])];
            match rustix::io::preadv2(
                &self.file,
                &mut iov,
                offset + done as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "short read: end of file",
                    ))
                }
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Ok(false),
                Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) | Err(Errno::INVAL) => {
                    if self.nowait_ok.swap(false, Ordering::Relaxed) {
                        tracing::debug!(volume = %self.volume, "preadv2(RWF_NOWAIT) unsupported");
                    }
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    // ---- writes ----

    fn write_impl(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        match &self.direct {
            None => self.write_full(buf, offset, fua),
            Some(d) => self.direct_write(d, buf, offset, fua),
        }
    }

    /// Writes all of `buf` at `offset` (already aligned in direct mode).
    fn write_full(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if !fua {
            return self.file.write_all_at(buf, offset);
        }
        let mut done = 0;
        while done < buf.len() && self.dsync_ok.load(Ordering::Relaxed) {
            let iov = [IoSlice::new(&buf[done..])];
            match rustix::io::pwritev2(
                &self.file,
                &iov,
                offset + done as u64,
                ReadWriteFlags::DSYNC,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => {
                    if self.dsync_ok.swap(false, Ordering::Relaxed) {
                        tracing::debug!(volume = %self.volume, "pwritev2(RWF_DSYNC) unsupported; using fdatasync");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        if done < buf.len() {
            self.file.write_all_at(&buf[done..], offset + done as u64)?;
            fdatasync(&self.file)?;
        }
        Ok(())
    }

    fn direct_write(&self, d: &Direct, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        // Partial first block (or the whole request within one block).
        if pos & (d.align - 1) != 0 || end - pos < d.align {
            let block = align_down(pos, d.align);
            let n = (end.min(block + d.align) - pos) as usize;
            self.rmw_block(d, block, &buf[..n], (pos - block) as usize, fua)?;
            pos += n as u64;
        }
        // Whole blocks.
        let whole_end = align_down(end, d.align);
        if pos < whole_end {
            let mut bounce = AlignedBuf::new(MAX_CHUNK.min((whole_end - pos) as usize));
            while pos < whole_end {
                let n = (whole_end - pos).min(bounce.len() as u64) as usize;
                let at = (pos - offset) as usize;
                let b = &mut bounce.as_mut()[..n];
                b.copy_from_slice(&buf[at..at + n]);
                self.write_full(b, pos, fua)?;
                pos += n as u64;
            }
        }
        // Partial last block.
        if pos < end {
            let at = (pos - offset) as usize;
            self.rmw_block(d, pos, &buf[at..], 0, fua)?;
        }
        Ok(())
    }

    /// Read-modify-write of the block at `block`: `data` lands at byte `at`.
    fn rmw_block(
        &self,
        d: &Direct,
        block: u64,
        data: &[u8],
        at: usize,
        fua: bool,
    ) -> io::Result<()> {
        let stripe = ((block / d.align) as usize) % d.rmw_locks.len();
        let _guard = d.rmw_locks[stripe]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut bounce = AlignedBuf::new(d.align as usize);
        let b = bounce.as_mut();
        // Past the end of the file (possible only for a file shrunk behind
        // our back) the block reads as zeroes.
        let got = read_full(&self.file, b, block)?;
        b[got..].fill(0);
        b[at..at + data.len()].copy_from_slice(data);
        self.write_full(b, block, fua)
    }

    // ---- zeroing ----

    /// Calls `fallocate`; `Ok(false)` when the mode is unsupported here.
    fn try_fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<bool> {
        loop {
            match rustix::fs::fallocate(&self.file, flags, offset, len) {
                Ok(()) => return Ok(true),
                Err(Errno::INTR) => {}
                Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) | Err(Errno::NODEV) => return Ok(false),
                // Block devices reject modes they lack with EINVAL too.
                Err(Errno::INVAL) if self.kind == Kind::BlockDevice => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Punches a hole (which reads back as zeroes); `Ok(false)` if unsupported.
    fn punch(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.punch_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let ok = self.try_fallocate(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )?;
        if !ok && self.punch_ok.swap(false, Ordering::Relaxed) {
            tracing::debug!(volume = %self.volume, "fallocate(PUNCH_HOLE) unsupported");
        }
        Ok(ok)
    }

    /// Zeroes a range keeping it allocated; `Ok(false)` if unsupported.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.zero_range_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let ok = self.try_fallocate(
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )?;
        if !ok && self.zero_range_ok.swap(false, Ordering::Relaxed) {
            tracing::debug!(volume = %self.volume, "fallocate(ZERO_RANGE) unsupported; writing zeroes");
        }
        Ok(ok)
    }

    /// The part of `[offset, end)` that `fallocate` accepts: all of it for a
    /// regular file, whole logical blocks for a block device.
    fn fallocate_span(&self, offset: u64, end: u64) -> (u64, u64) {
        match self.kind {
            Kind::Regular => (offset, end),
            Kind::BlockDevice => (
                align_up(offset, self.device_block),
                align_down(end, self.device_block),
            ),
        }
    }

    fn trim_impl(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let end = offset + len;
        let (lo, hi) = self.fallocate_span(offset, end);
        // TRIM is a hint: if the storage cannot punch holes, leave the data.
        let punched = if lo < hi {
            self.punch(lo, hi - lo)?
        } else {
            self.punch_ok.load(Ordering::Relaxed)
        };
        if !punched {
            return Ok(());
        }
        // Partial logical blocks at a block device's edges: write zeroes, so
        // the whole range reads back as zeroes as it does on a file.
        if lo >= hi {
            self.write_zero_bytes(offset, len)?;
        } else {
            if lo > offset {
                self.write_zero_bytes(offset, lo - offset)?;
            }
            if hi < end {
                self.write_zero_bytes(hi, end - hi)?;
            }
        }
        Ok(())
    }

    fn write_zeroes_impl(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.check_writable()?;
        let end = offset + len;
        let (lo, hi) = self.fallocate_span(offset, end);
        let mut done = false;
        if lo < hi {
            done = (may_trim && self.punch(lo, hi - lo)?) || self.zero_range(lo, hi - lo)?;
        }
        if done {
            if lo > offset {
                self.write_zero_bytes(offset, lo - offset)?;
            }
            if hi < end {
                self.write_zero_bytes(hi, end - hi)?;
            }
        } else {
            self.write_zero_bytes(offset, len)?;
        }
        if fua {
            fdatasync(&self.file)?;
        }
        Ok(())
    }

    /// Writes zero buffers (at most [`MAX_CHUNK`] at a time) over a range.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; MAX_CHUNK.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            self.write_impl(&zeroes[..n], pos, false)?;
            pos += n as u64;
        }
        Ok(())
    }

    // ---- allocation ----

    fn allocation_impl(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |len: u64, hole: bool| match extents.last_mut() {
            Some(last) if last.hole == hole => last.len += len,
            _ => extents.push(Extent { len, hole }),
        };
        let mut pos = offset;
        while pos < end {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(Errno::NXIO) => end,
                // No SEEK_DATA support: everything is data.
                Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => {
                    push(end - pos, false);
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                let hole_end = data.min(end);
                push(hole_end - pos, true);
                pos = hole_end;
            }
            if pos >= end {
                break;
            }
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                // The file shrank under us: the rest reads as a hole.
                Err(Errno::NXIO) => pos,
                Err(e) => return Err(e.into()),
            };
            if hole > pos {
                let data_end = hole.min(end);
                push(data_end - pos, false);
                pos = data_end;
            } else {
                push(end - pos, true);
                pos = end;
            }
        }
        Ok(extents)
    }
}

impl Backend for FileBackend {
    fn volume(&self) -> &str {
        &self.volume
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_impl(buf, offset)
            .map_err(|e| self.err(Op::Read, offset, buf.len() as u64, e))
    }

    /// Uses `preadv2(RWF_NOWAIT)`; buffered mode only (`O_DIRECT` always
    /// returns `Ok(false)`).
    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        if self.direct.is_some() || !self.nowait_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.nowait_read(buf, offset)
            .map_err(|e| self.err(Op::Read, offset, buf.len() as u64, e))
    }

    /// With `fua`, uses `pwritev2(RWF_DSYNC)`, or write then `fdatasync`
    /// where that flag is unsupported.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.write_impl(buf, offset, fua)
            .map_err(|e| self.err(Op::Write, offset, buf.len() as u64, e))
    }

    fn flush(&self) -> Result<()> {
        fdatasync(&self.file).map_err(|e| self.err(Op::Flush, 0, self.size, e))
    }

    /// Punches a hole (`FALLOC_FL_PUNCH_HOLE`), so the range reads back as
    /// zeroes; on a block device, over its whole logical blocks, with zeroes
    /// written to partial blocks at the edges. Where the storage cannot
    /// punch holes the call succeeds and the data is left as it was (so two
    /// replicas on different storage may then differ in trimmed ranges).
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.trim_impl(offset, len)
            .map_err(|e| self.err(Op::Trim, offset, len, e))
    }

    /// Uses `fallocate` (`PUNCH_HOLE` when `may_trim`, else `ZERO_RANGE`)
    /// and falls back to writing zeroes where that is unsupported.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.write_zeroes_impl(offset, len, may_trim, fua)
            .map_err(|e| self.err(Op::WriteZeroes, offset, len, e))
    }

    /// True for regular files until `FALLOC_FL_ZERO_RANGE` has been seen to
    /// be unsupported; false for block devices.
    fn fast_zeroes(&self) -> bool {
        self.kind == Kind::Regular && self.zero_range_ok.load(Ordering::Relaxed)
    }

    /// From `SEEK_DATA`/`SEEK_HOLE` for regular files; block devices report
    /// all data.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        match self.kind {
            Kind::BlockDevice => Ok(vec![Extent { len, hole: false }]),
            Kind::Regular => self
                .allocation_impl(offset, len)
                .map_err(|e| self.err(Op::Allocation, offset, len, e)),
        }
    }

    /// True for a buffered regular file.
    fn is_fast(&self) -> bool {
        self.kind == Kind::Regular && self.direct.is_none()
    }
}

/// A zeroed buffer whose start is aligned to [`MEM_ALIGN`], for `O_DIRECT`.
struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let vec = vec![0u8; len + MEM_ALIGN];
        let start = (MEM_ALIGN - vec.as_ptr().addr() % MEM_ALIGN) % MEM_ALIGN;
        Self { vec, start, len }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn fdatasync(file: &File) -> io::Result<()> {
    loop {
        match rustix::fs::fdatasync(file) {
            Err(Errno::INTR) => {}
            r => return r.map_err(Into::into),
        }
    }
}

fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

fn align_up(x: u64, align: u64) -> u64 {
    align_down(x + (align - 1), align)
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn too_small(what: &str, have: u64, want: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} is {have} bytes, smaller than the configured size {want}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn opts(path: &Path, size: u64) -> FileOptions {
        FileOptions::new(path, size)
    }

    /// Opens with O_DIRECT, or `None` (printing why) when the filesystem
    /// does not support it.
    fn open_direct(path: &Path, size: u64) -> Option<FileBackend> {
        let mut o = opts(path, size);
        o.direct = true;
        match FileBackend::open("vd", &o) {
            Ok(b) => Some(b),
            Err(e) if e.cause.kind() == io::ErrorKind::InvalidInput => {
                println!("skipping: O_DIRECT unsupported here: {e}");
                None
            }
            Err(e) => panic!("open O_DIRECT: {e}"),
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn creates_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let b = FileBackend::open("vol", &opts(&path, 64 << 20)).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 64 << 20);
        assert_eq!(md.blocks(), 0, "file should be sparse");
        assert_eq!(b.size(), 64 << 20);
        assert!(b.is_fast());
        assert!(b.fast_zeroes());
        assert!(!b.is_block_device());
        assert_eq!(
            b.allocation(0, 64 << 20).unwrap(),
            vec![Extent {
                len: 64 << 20,
                hole: true
            }]
        );
    }

    #[test]
    fn grows_small_file_and_keeps_large_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        std::fs::write(&path, b"hello").unwrap();
        let b = FileBackend::open("vol", &opts(&path, 1 << 20)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        let mut buf = [0u8; 8];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello\0\0\0");
        drop(b);

        let b = FileBackend::open("vol", &opts(&path, 4096)).unwrap();
        assert_eq!(b.size(), 4096);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing");
        let mut o = opts(&path, 4096);
        o.create = false;
        let e = FileBackend::open("vol", &o).unwrap_err();
        assert_eq!(e.op, Op::Open);
        assert_eq!(e.cause.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("missing"), "{e}");

        let e = FileBackend::open("vol", &opts(dir.path(), 4096)).unwrap_err();
        assert!(
            e.to_string().contains(&*dir.path().to_string_lossy()),
            "{e}"
        );

        let mut o = opts(Path::new("/dev/null"), 4096);
        o.create = false;
        let e = FileBackend::open("vol", &o).unwrap_err();
        assert!(
            e.to_string().contains("/dev/null: not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let mut o = opts(&path, 8192);
        o.read_only = true;
        let b = FileBackend::open("vol", &o).unwrap();
        let mut buf = [0u8; 4];
        b.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [7; 4]);
        let e = b.write_at(&buf, 0, false).unwrap_err();
        assert_eq!(e.errno(), Errno::ROFS.raw_os_error());
        assert!(b.trim(0, 4096).is_err());
        assert!(b.write_zeroes(0, 4096, false, false).is_err());
        b.flush().unwrap();

        o.size = 8193;
        let e = FileBackend::open("vol", &o).unwrap_err();
        assert!(
            e.to_string().contains("smaller than the configured size"),
            "{e}"
        );
    }

    #[test]
    fn write_read_roundtrip_and_flush() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open("vol", &opts(&dir.path().join("vol"), 1 << 20)).unwrap();
        let data = pattern(10_000, 3);
        b.write_at(&data, 12_345, false).unwrap();
        let fua = pattern(777, 9);
        b.write_at(&fua, 100_001, true).unwrap();
        b.flush().unwrap();
        let mut buf = vec![0u8; 10_000];
        b.read_at(&mut buf, 12_345).unwrap();
        assert_eq!(buf, data);
        let mut buf = vec![0u8; 777];
        b.read_at(&mut buf, 100_001).unwrap();
        assert_eq!(buf, fua);
        // Read spanning written data and untouched zeroes.
        let mut buf = vec![1u8; 20];
        b.read_at(&mut buf, 12_335).unwrap();
        assert_eq!(&buf[..10], &[0; 10]);
        assert_eq!(&buf[10..], &data[..10]);
    }

    #[test]
    fn read_past_end_of_shrunk_file_is_an_error_with_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let b = FileBackend::open("myvol", &opts(&path, 8192)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        let mut buf = [0u8; 512];
        let e = b.read_at(&mut buf, 4096).unwrap_err();
        assert_eq!(
            (e.volume.as_str(), e.op, e.offset, e.len),
            ("myvol", Op::Read, 4096, 512)
        );
        assert_eq!(e.errno(), Errno::IO.raw_os_error());
    }

    #[test]
    fn trim_punches_hole_and_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let b = FileBackend::open("vol", &opts(&path, 1 << 20)).unwrap();
        b.write_at(&vec![0xaa; 256 << 10], 0, false).unwrap();
        b.flush().unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        b.trim(64 << 10, 128 << 10).unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(after < before, "blocks {before} -> {after}");
        let mut buf = vec![1u8; 256 << 10];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf[..64 << 10].iter().all(|&x| x == 0xaa));
        assert!(buf[64 << 10..192 << 10].iter().all(|&x| x == 0));
        assert!(buf[192 << 10..].iter().all(|&x| x == 0xaa));
        assert_eq!(
            b.allocation(0, 1 << 20).unwrap(),
            vec![
                Extent {
                    len: 64 << 10,
                    hole: false
                },
                Extent {
                    len: 128 << 10,
                    hole: true
                },
                Extent {
                    len: 64 << 10,
                    hole: false
                },
                Extent {
                    len: 768 << 10,
                    hole: true
                },
            ]
        );
        // Unaligned trim zeroes exactly its range.
        b.trim(1000, 10).unwrap();
        let mut buf = vec![1u8; 20];
        b.read_at(&mut buf, 995).unwrap();
        assert_eq!(buf, [&[0xaa; 5][..], &[0; 10], &[0xaa; 5]].concat());
    }

    #[test]
    fn write_zeroes_with_and_without_trim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let b = FileBackend::open("vol", &opts(&path, 1 << 20)).unwrap();
        b.write_at(&vec![0x55; 1 << 20], 0, false).unwrap();

        b.write_zeroes(4096, 64 << 10, false, true).unwrap();
        let ext = b.allocation(0, 1 << 20).unwrap();
        assert!(
            ext.iter().all(|e| !e.hole),
            "NO_HOLE zeroing must stay allocated: {ext:?}"
        );

        b.write_zeroes(512 << 10, 128 << 10, true, false).unwrap();
        let ext = b.allocation(512 << 10, 128 << 10).unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                len: 128 << 10,
                hole: true
            }]
        );

        b.write_zeroes(3, 5, true, false).unwrap();

        let mut buf = vec![1u8; 1 << 20];
        b.read_at(&mut buf, 0).unwrap();
        for (i, &x) in buf.iter().enumerate() {
            let zero = (3..8).contains(&i)
                || (4096..4096 + (64 << 10)).contains(&i)
                || ((512 << 10)..(640 << 10)).contains(&i);
            assert_eq!(x, if zero { 0 } else { 0x55 }, "byte {i}");
        }
    }

    #[test]
    fn write_zero_bytes_fallback_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open("vol", &opts(&dir.path().join("vol"), 4 << 20)).unwrap();
        b.write_at(&vec![9; 4 << 20], 0, false).unwrap();
        b.write_zero_bytes(100, (2 << 20) + 100).unwrap();
        let mut buf = vec![1u8; 4 << 20];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&x| x == 9));
        assert!(buf[100..(2 << 20) + 200].iter().all(|&x| x == 0));
        assert!(buf[(2 << 20) + 200..].iter().all(|&x| x == 9));
    }

    #[test]
    fn allocation_pattern_and_clipping() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open("vol", &opts(&dir.path().join("vol"), 1 << 20)).unwrap();
        // Data at [64K,128K) and [256K,260K).
        b.write_at(&vec![1; 64 << 10], 64 << 10, false).unwrap();
        b.write_at(&[2; 4096], 256 << 10, false).unwrap();
        let h = |len| Extent { len, hole: true };
        let d = |len| Extent { len, hole: false };
        assert_eq!(
            b.allocation(0, 1 << 20).unwrap(),
            vec![
                h(64 << 10),
                d(64 << 10),
                h(128 << 10),
                d(4096),
                h((1 << 20) - (260 << 10))
            ]
        );
        // Starting inside data, ending inside a hole.
        assert_eq!(
            b.allocation(100 << 10, 50 << 10).unwrap(),
            vec![d(28 << 10), h(22 << 10)]
        );
        // Entirely inside data.
        assert_eq!(b.allocation(70 << 10, 1000).unwrap(), vec![d(1000)]);
        // Tail hole to the end (SEEK_DATA gives ENXIO).
        assert_eq!(b.allocation(300 << 10, 10).unwrap(), vec![h(10)]);
        assert_eq!(b.allocation(0, 0).unwrap(), vec![]);
    }

    #[test]
    fn allocation_of_file_larger_than_volume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1; 4096], 512 << 10).unwrap();
        let b = FileBackend::open("vol", &opts(&path, 256 << 10)).unwrap();
        assert_eq!(
            b.allocation(0, 256 << 10).unwrap(),
            vec![Extent {
                len: 256 << 10,
                hole: true
            }]
        );
    }

    #[test]
    fn nowait_read_hits_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open("vol", &opts(&dir.path().join("vol"), 1 << 20)).unwrap();
        let data = pattern(4096, 5);
        b.write_at(&data, 8192, false).unwrap();
        let mut buf = vec![0u8; 4096];
        let hit = b.try_read_at_nowait(&mut buf, 8192).unwrap();
        if !hit && !b.nowait_ok.load(Ordering::Relaxed) {
            println!("skipping: RWF_NOWAIT unsupported on this filesystem");
            return;
        }
        assert!(hit);
        assert_eq!(buf, data);
    }

    #[test]
    fn direct_roundtrip_unaligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let size = (1 << 20) + 1536;
        let Some(b) = open_direct(&path, size) else {
            return;
        };
        assert!(b.is_direct());
        assert!(!b.is_fast());
        assert_eq!(b.size(), size);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            align_up(size, 4096)
        );
        let mut buf = [0u8; 16];
        assert!(!b.try_read_at_nowait(&mut buf, 0).unwrap());

        // Misaligned memory: slice the data at an odd address.
        let backing = pattern(3 * 4096 + 1, 7);
        let data = &backing[1..];
        for &(off, len) in &[
            (512u64, 4096usize),
            (4096 + 1536, 3 * 4096),
            (8192, 512),
            (size - 1536, 1536),
            (7, 5),
        ] {
            let d = &data[..len];
            b.write_at(d, off, off % 1024 == 0).unwrap();
            let mut out = vec![0u8; len + 1];
            b.read_at(&mut out[1..], off).unwrap();
            assert_eq!(&out[1..], d, "offset {off} len {len}");
        }
        b.flush().unwrap();

        // Neighbours of an unaligned write are preserved.
        b.write_at(&[0xee; 512], 0, false).unwrap();
        b.write_at(&[0xdd; 512], 1024, false).unwrap();
        let mut out = vec![0u8; 2048];
        b.read_at(&mut out, 0).unwrap();
        assert!(out[..512].iter().all(|&x| x == 0xee));
        assert_eq!(&out[512..1024], &data[..512]);
        assert!(out[1024..1536].iter().all(|&x| x == 0xdd));

        b.write_zeroes(100, 10_000, false, false).unwrap();
        b.trim(20_000, 8192).unwrap();
        let mut out = vec![1u8; 30_000];
        b.read_at(&mut out, 0).unwrap();
        assert!(out[100..10_100].iter().all(|&x| x == 0));
        assert!(out[20_000..28_192].iter().all(|&x| x == 0));
    }

    #[test]
    fn direct_concurrent_unaligned_writes_to_one_block() {
        let dir = tempfile::tempdir().unwrap();
        let Some(b) = open_direct(&dir.path().join("vol"), 64 << 10) else {
            return;
        };
        let b = std::sync::Arc::new(b);
        for round in 0..20u8 {
            std::thread::scope(|s| {
                for i in 0..8u64 {
                    let b = &b;
                    s.spawn(move || {
                        b.write_at(&[round ^ (i as u8 + 1); 512], i * 512, false)
                            .unwrap()
                    });
                }
            });
            let mut out = vec![0u8; 4096];
            b.read_at(&mut out, 0).unwrap();
            for i in 0..8 {
                assert!(out[i * 512..(i + 1) * 512]
                    .iter()
                    .all(|&x| x == round ^ (i as u8 + 1)));
            }
        }
    }

    /// Opt-in: `BLOCKMIRROR_TEST_BLOCKDEV=/dev/loopN` (its contents are destroyed).
    #[test]
    fn block_device_when_configured() {
        let Ok(dev) = std::env::var("BLOCKMIRROR_TEST_BLOCKDEV") else {
            println!("skipping: BLOCKMIRROR_TEST_BLOCKDEV not set");
            return;
        };
        let dev = PathBuf::from(dev);
        let mut o = opts(&dev, 0);
        o.create = false;
        let probe = FileBackend::open("dev", &o).unwrap();
        assert!(probe.is_block_device());
        let devsize = rustix::fs::seek(&probe.file, SeekFrom::End(0)).unwrap();
        drop(probe);

        o.size = devsize + 512;
        let e = FileBackend::open("dev", &o).unwrap_err();
        assert!(e.to_string().contains(&*dev.to_string_lossy()), "{e}");

        for direct in [false, true] {
            o.size = devsize.min(8 << 20);
            o.direct = direct;
            let b = FileBackend::open("dev", &o).unwrap();
            assert!(!b.is_fast() && !b.fast_zeroes());
            assert_eq!(
                b.allocation(0, 4096).unwrap(),
                vec![Extent {
                    len: 4096,
                    hole: false
                }]
            );
            let data = pattern(70_000, 1);
            b.write_at(&data, 1000, true).unwrap();
            let mut out = vec![0u8; 70_000];
            b.read_at(&mut out, 1000).unwrap();
            assert_eq!(out, data);
            b.write_zeroes(1500, 66_000, false, false).unwrap();
            b.write_zeroes(1500, 66_000, true, true).unwrap();
            b.trim(0, 4096).unwrap();
            b.read_at(&mut out, 1000).unwrap();
            assert!(out[500..66_500].iter().all(|&x| x == 0));
            assert_eq!(&out[66_500..], &data[66_500..]);
            b.flush().unwrap();
        }
    }
}
