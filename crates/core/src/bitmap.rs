//! The out-of-sync bitmap: which regions of a volume a mirror may lack.
//!
//! The volume is cut into fixed-size *regions* (the granularity, a power of
//! two of at least 4 KiB, 64 KiB by default). Region `r` covers bytes
//! `[r * granularity, (r + 1) * granularity)`, clipped to the volume's size for
//! the last region. A set bit means "the mirror may not hold this region's
//! current contents"; a resync copies exactly the set regions.
//!
//! Invariants the type keeps:
//!
//! - bits past the last region (in the last word) are always zero, so counts,
//!   equality and the encoding are canonical;
//! - the count of set bits is cached and always equal to the popcount;
//! - every operation on a byte range works on whole 64-bit words in the
//!   middle of the range, so marking all of a 1 TiB volume at 64 KiB (16 Mi
//!   regions, 2 MiB of bits) touches 256 Ki words, not 16 Mi bits.
//!
//! Byte ranges given to [`Bitmap::mark`] and the clears are clipped to the
//! volume: bytes past its end do not exist, so there is nothing to record.
//!
//! On disk (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BMOOSBM1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | flags, zero (reserved) |
//! | 16 | 8 | granularity in bytes |
//! | 24 | 8 | volume size in bytes |
//! | 32 | 8 | word count `n` (= ceil(regions / 64)) |
//! | 40 | 8·n | the words; region `r` is bit `r % 64` of word `r / 64` |
//! | 40 + 8·n | 4 | crc32c of every preceding byte |

use thiserror::Error;

pub const BITMAP_MAGIC: [u8; 8] = *b"BMOOSBM1";
pub const BITMAP_VERSION: u32 = 1;
/// Smallest region size: one 4 KiB block.
pub const MIN_GRANULARITY: u64 = 4096;
/// The usual region size: 64 KiB (a 1 TiB volume needs 2 MiB of bits).
pub const DEFAULT_GRANULARITY: u64 = 64 * 1024;
/// Most regions a bitmap may have (2^32 bits = 512 MiB of memory; 256 TiB at
/// 64 KiB). A guard against a size typo allocating the machine away.
pub const MAX_REGIONS: u64 = 1 << 32;

const HEADER_LEN: usize = 40;
const CRC_LEN: usize = 4;

/// Why a bitmap could not be built, combined or decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitmapError {
    #[error("bitmap granularity {0} is not a power of two of at least {MIN_GRANULARITY}")]
    Granularity(u64),
    #[error(
        "a volume of {volume_size} bytes at granularity {granularity} needs {regions} regions, \
         more than the maximum of {MAX_REGIONS}"
    )]
    TooManyRegions {
        volume_size: u64,
        granularity: u64,
        regions: u64,
    },
    #[error(
        "bitmaps differ in shape: {volume_size} bytes at granularity {granularity} vs \
         {other_volume_size} bytes at granularity {other_granularity}"
    )]
    Mismatch {
        volume_size: u64,
        granularity: u64,
        other_volume_size: u64,
        other_granularity: u64,
    },
    #[error("encoded bitmap is {len} bytes, expected {expected}")]
    Length { len: usize, expected: u64 },
    #[error("bad bitmap magic")]
    Magic,
    #[error("unsupported bitmap version {0}")]
    Version(u32),
    #[error("bitmap checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown bitmap flags {0:#x}")]
    Flags(u32),
    #[error("encoded bitmap has {stored} words, its geometry needs {expected}")]
    WordCount { stored: u64, expected: u64 },
    #[error("encoded bitmap has bits set past its last region")]
    TrailingBits,
}

/// A fixed-granularity out-of-sync bitmap over one volume. Pure: no I/O.
#[derive(Debug, Clone)]
pub struct Bitmap {
    volume_size: u64,
    shift: u32,
    regions: u64,
    words: Vec<u64>,
    /// Number of set bits; always the popcount of `words`.
    dirty: u64,
    /// Advances whenever at least one bit changes. See [`Bitmap::changes`].
    changes: u64,
}

/// Two bitmaps are equal when they have the same shape and the same bits
/// (their [`Bitmap::changes`] histories do not matter).
impl PartialEq for Bitmap {
    fn eq(&self, other: &Self) -> bool {
        self.volume_size == other.volume_size
            && self.shift == other.shift
            && self.words == other.words
    }
}

impl Eq for Bitmap {}

/// Mask of bits `[lo, hi)` of a word, `lo < hi <= 64`.
fn mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let width = hi - lo;
    let ones = if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    ones << lo
}

impl Bitmap {
    /// An all-clear bitmap over `volume_size` bytes, one bit per `granularity`
    /// bytes (the last region may be shorter).
    pub fn new(volume_size: u64, granularity: u64) -> Result<Self, BitmapError> {
        let regions = Self::regions_for(volume_size, granularity)?;
        let words = usize::try_from(regions.div_ceil(64)).expect("MAX_REGIONS fits in usize");
        Ok(Self {
            volume_size,
            shift: granularity.trailing_zeros(),
            regions,
            words: vec![0; words],
            dirty: 0,
            changes: 0,
        })
    }

    /// Number of regions of a volume, after checking the granularity.
    fn regions_for(volume_size: u64, granularity: u64) -> Result<u64, BitmapError> {
        if !granularity.is_power_of_two() || granularity < MIN_GRANULARITY {
            return Err(BitmapError::Granularity(granularity));
        }
        let regions = volume_size.div_ceil(granularity);
        if regions > MAX_REGIONS {
            return Err(BitmapError::TooManyRegions {
                volume_size,
                granularity,
                regions,
            });
        }
        Ok(regions)
    }

    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of regions (bits) in the bitmap.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The region holding byte `offset` (which may lie past the volume's end).
    pub fn region_of(&self, offset: u64) -> u64 {
        offset >> self.shift
    }

    /// The byte range `(offset, len)` of a region, clipped to the volume's
    /// size; `None` past the last region.
    pub fn region_range(&self, region: u64) -> Option<(u64, u64)> {
        if region >= self.regions {
            return None;
        }
        let start = region << self.shift;
        let end = (start + self.granularity()).min(self.volume_size);
        Some((start, end - start))
    }

    /// A counter that advances whenever a bit of this bitmap changes (and
    /// never otherwise). Comparing two readings tells whether anything changed
    /// in between; a writer uses it to skip storing a bitmap that is already
    /// on disk. A decoded bitmap starts at 0.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Marks every region that `[offset, offset + len)` touches.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if let Some((first, end)) = self.touched(offset, len) {
            self.set_regions(first, end);
        }
    }

    /// Clears every region that `[offset, offset + len)` touches, including
    /// regions the range only partly covers.
    ///
    /// Calling it states that **each whole touched region** is in sync on the
    /// mirror, not only the given bytes: a resync that copied whole regions, or
    /// a caller that knows no other byte of those regions is missing. A caller
    /// that only knows the given bytes reached the mirror uses
    /// [`Bitmap::clear_covered`] instead.
    pub fn clear(&mut self, offset: u64, len: u64) {
        if let Some((first, end)) = self.touched(offset, len) {
            self.clear_regions(first, end);
        }
    }

    /// Clears only the regions that `[offset, offset + len)` covers entirely
    /// (the last, short region counts as covered when the range reaches the
    /// volume's end). Regions the range only partly covers stay as they are.
    pub fn clear_covered(&mut self, offset: u64, len: u64) {
        let Some(end) = self.clipped_end(offset, len) else {
            return;
        };
        let g = self.granularity();
        let first = offset.div_ceil(g);
        let last_end = if end == self.volume_size {
            self.regions
        } else {
            end >> self.shift
        };
        if first < last_end {
            self.clear_regions(first, last_end);
        }
    }

    /// Whether the region holding byte `offset` is marked (false past the end).
    pub fn is_marked(&self, offset: u64) -> bool {
        offset < self.volume_size && self.is_region_marked(offset >> self.shift)
    }

    /// Whether region `region` is marked (false past the last region).
    pub fn is_region_marked(&self, region: u64) -> bool {
        region < self.regions && self.words[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    /// Number of marked regions.
    pub fn dirty_regions(&self) -> u64 {
        self.dirty
    }

    /// Bytes covered by marked regions, the last region clipped to the
    /// volume's size: what a resync has to copy.
    pub fn dirty_bytes(&self) -> u64 {
        match self.regions.checked_sub(1) {
            // The last region counts with its clipped length.
            Some(last) if self.is_region_marked(last) => {
                ((self.dirty - 1) << self.shift) + (self.volume_size - (last << self.shift))
            }
            _ => self.dirty << self.shift,
        }
    }

    /// True when no region is marked.
    pub fn is_clear(&self) -> bool {
        self.dirty == 0
    }

    /// The first marked region at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        self.next_with(from, false)
    }

    /// The first unmarked region at or after `from`.
    pub fn next_clean(&self, from: u64) -> Option<u64> {
        self.next_with(from, true)
    }

    /// Maximal runs of marked regions as byte ranges `(offset, len)`, in
    /// ascending order, the last clipped to the volume's size. Skips clear
    /// words 64 regions at a time.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bitmap: self,
            next: 0,
        }
    }

    /// Marks every region marked in `other` (same size and granularity).
    pub fn union_with(&mut self, other: &Bitmap) -> Result<(), BitmapError> {
        if self.volume_size != other.volume_size || self.shift != other.shift {
            return Err(BitmapError::Mismatch {
                volume_size: self.volume_size,
                granularity: self.granularity(),
                other_volume_size: other.volume_size,
                other_granularity: other.granularity(),
            });
        }
        let before = self.dirty;
        let mut dirty = 0;
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
            dirty += u64::from(w.count_ones());
        }
        self.dirty = dirty;
        if dirty != before {
            self.changes += 1;
        }
        Ok(())
    }

    /// Marks every region (a full resync).
    pub fn mark_all(&mut self) {
        self.set_regions(0, self.regions);
    }

    /// Clears every region.
    pub fn clear_all(&mut self) {
        self.clear_regions(0, self.regions);
    }

    /// The same marks on another shape: every byte range marked here is
    /// marked in the result (so coarser or finer regions give a superset,
    /// never a subset), and if the volume grew, its new tail is marked too,
    /// because the mirror has never held it.
    pub fn resized(&self, volume_size: u64, granularity: u64) -> Result<Bitmap, BitmapError> {
        let mut out = Bitmap::new(volume_size, granularity)?;
        for (offset, len) in self.runs() {
            out.mark(offset, len);
        }
        if volume_size > self.volume_size {
            out.mark(self.volume_size, volume_size - self.volume_size);
        }
        Ok(out)
    }

    /// The encoded bitmap (see the module documentation for the layout).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + self.words.len() * 8 + CRC_LEN);
        b.extend_from_slice(&BITMAP_MAGIC);
        b.extend_from_slice(&BITMAP_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.granularity().to_le_bytes());
        b.extend_from_slice(&self.volume_size.to_le_bytes());
        b.extend_from_slice(&(self.words.len() as u64).to_le_bytes());
        for w in &self.words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes [`Bitmap::encode`]'s output. Any damage is an error: the
    /// length must match the stored word count before anything is allocated,
    /// the checksum covers every byte, and the geometry, word count and unused
    /// trailing bits are checked for consistency.
    pub fn decode(b: &[u8]) -> Result<Self, BitmapError> {
        let min = HEADER_LEN + CRC_LEN;
        if b.len() < min {
            return Err(BitmapError::Length {
                len: b.len(),
                expected: min as u64,
            });
        }
        if b[0..8] != BITMAP_MAGIC {
            return Err(BitmapError::Magic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != BITMAP_VERSION {
            return Err(BitmapError::Version(version));
        }
        let stored_words = u64_at(32);
        let expected_len = stored_words
            .checked_mul(8)
            .and_then(|n| n.checked_add(min as u64));
        if expected_len != Some(b.len() as u64) {
            return Err(BitmapError::Length {
                len: b.len(),
                expected: expected_len.unwrap_or(u64::MAX),
            });
        }
        let body = b.len() - CRC_LEN;
        let stored = u32_at(body);
        let computed = crc32c::crc32c(&b[..body]);
        if stored != computed {
            return Err(BitmapError::Checksum { stored, computed });
        }
        let flags = u32_at(12);
        if flags != 0 {
            return Err(BitmapError::Flags(flags));
        }
        let (granularity, volume_size) = (u64_at(16), u64_at(24));
        // Check the word count before allocating, so a forged size cannot
        // allocate more than the input holds.
        let expected = Self::regions_for(volume_size, granularity)?.div_ceil(64);
        if stored_words != expected {
            return Err(BitmapError::WordCount {
                stored: stored_words,
                expected,
            });
        }
        let mut bitmap = Bitmap::new(volume_size, granularity)?;
        for (i, w) in bitmap.words.iter_mut().enumerate() {
            *w = u64_at(HEADER_LEN + i * 8);
        }
        if let Some(&last) = bitmap.words.last() {
            let used = bitmap.regions % 64;
            if used != 0 && last & !mask(0, used) != 0 {
                return Err(BitmapError::TrailingBits);
            }
        }
        bitmap.dirty = bitmap.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(bitmap)
    }

    /// End of `[offset, offset + len)` clipped to the volume; `None` when the
    /// clipped range is empty.
    fn clipped_end(&self, offset: u64, len: u64) -> Option<u64> {
        if len == 0 || offset >= self.volume_size {
            return None;
        }
        Some(offset.saturating_add(len).min(self.volume_size))
    }

    /// Regions `[first, end)` touched by a byte range, clipped.
    fn touched(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = self.clipped_end(offset, len)?;
        Some((offset >> self.shift, ((end - 1) >> self.shift) + 1))
    }

    /// Applies `f(word, mask)` to each word part covering regions
    /// `[first, end)`, `first < end <= regions`.
    fn for_each_word(&mut self, first: u64, end: u64, f: impl Fn(&mut u64, u64)) {
        debug_assert!(first < end && end <= self.regions);
        let (fw, lw) = (first / 64, (end - 1) / 64);
        for wi in fw..=lw {
            let lo = if wi == fw { first % 64 } else { 0 };
            let hi = if wi == lw { (end - 1) % 64 + 1 } else { 64 };
            f(&mut self.words[wi as usize], mask(lo, hi));
        }
    }

    fn set_regions(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let before: u64 = self.count_in(first, end);
        self.for_each_word(first, end, |w, m| *w |= m);
        let added = (end - first) - before;
        if added != 0 {
            self.dirty += added;
            self.changes += 1;
        }
    }

    fn clear_regions(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let removed = self.count_in(first, end);
        self.for_each_word(first, end, |w, m| *w &= !m);
        if removed != 0 {
            self.dirty -= removed;
            self.changes += 1;
        }
    }

    /// Number of set bits among regions `[first, end)`.
    fn count_in(&self, first: u64, end: u64) -> u64 {
        let (fw, lw) = (first / 64, (end - 1) / 64);
        (fw..=lw)
            .map(|wi| {
                let lo = if wi == fw { first % 64 } else { 0 };
                let hi = if wi == lw { (end - 1) % 64 + 1 } else { 64 };
                u64::from((self.words[wi as usize] & mask(lo, hi)).count_ones())
            })
            .sum()
    }

    /// First region at or after `from` whose bit is set (`inverted`: clear).
    fn next_with(&self, from: u64, inverted: bool) -> Option<u64> {
        if from >= self.regions {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut m = mask(from % 64, 64);
        while wi < self.words.len() {
            let w = if inverted {
                !self.words[wi]
            } else {
                self.words[wi]
            };
            let hits = w & m;
            if hits != 0 {
                let r = wi as u64 * 64 + u64::from(hits.trailing_zeros());
                return (r < self.regions).then_some(r);
            }
            wi += 1;
            m = u64::MAX;
        }
        None
    }
}

/// Iterator over a bitmap's marked runs; see [`Bitmap::runs`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    bitmap: &'a Bitmap,
    next: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let bm = self.bitmap;
        let start = bm.next_dirty(self.next)?;
        let end = bm.next_clean(start).unwrap_or(bm.regions);
        self.next = end;
        let offset = start << bm.shift;
        let stop = (end << bm.shift).min(bm.volume_size);
        Some((offset, stop - offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: u64 = 4096;

    /// A bit-per-region model, the obviously-correct reference.
    fn model_runs(bits: &[bool], size: u64) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut r = 0;
        while r < bits.len() {
            if bits[r] {
                let s = r;
                while r < bits.len() && bits[r] {
                    r += 1;
                }
                let off = s as u64 * G;
                runs.push((off, (r as u64 * G).min(size) - off));
            } else {
                r += 1;
            }
        }
        runs
    }

    #[derive(Debug, Clone)]
    enum Op {
        Mark(u64, u64),
        Clear(u64, u64),
        ClearCovered(u64, u64),
        MarkAll,
        ClearAll,
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        let range = (0..size + 3 * G, 0..size / 2 + 2 * G);
        prop_oneof![
            4 => range.clone().prop_map(|(o, l)| Op::Mark(o, l)),
            3 => range.clone().prop_map(|(o, l)| Op::Clear(o, l)),
            3 => range.prop_map(|(o, l)| Op::ClearCovered(o, l)),
            1 => Just(Op::MarkAll),
            1 => Just(Op::ClearAll),
        ]
    }

    fn apply_model(bits: &mut [bool], size: u64, op: &Op) {
        let n = bits.len() as u64;
        for r in 0..n {
            let (s, e) = (r * G, ((r + 1) * G).min(size));
            let touched = |o: u64, l: u64| l > 0 && o < e && o.saturating_add(l) > s;
            let covered = |o: u64, l: u64| o <= s && o.saturating_add(l) >= e;
            match *op {
                Op::Mark(o, l) if touched(o, l) => bits[r as usize] = true,
                Op::Clear(o, l) if touched(o, l) => bits[r as usize] = false,
                Op::ClearCovered(o, l) if l > 0 && covered(o, l) => bits[r as usize] = false,
                Op::MarkAll => bits[r as usize] = true,
                Op::ClearAll => bits[r as usize] = false,
                _ => {}
            }
        }
    }

    fn sizes() -> impl Strategy<Value = u64> {
        // Around word boundaries, with and without a short last region.
        prop_oneof![
            Just(0u64),
            (0u64..200).prop_map(|r| r * G),
            (1u64..200 * G),
            (60u64..70).prop_map(|r| r * G),
            (126u64..131).prop_map(|r| r * G - 1),
        ]
    }

    fn bitmap(size: u64) -> impl Strategy<Value = Bitmap> {
        let regions = size.div_ceil(G) as usize;
        proptest::collection::vec(any::<bool>(), regions).prop_map(move |bits| {
            let mut bm = Bitmap::new(size, G).unwrap();
            for (r, b) in bits.iter().enumerate() {
                if *b {
                    bm.mark(r as u64 * G, 1);
                }
            }
            bm
        })
    }

    fn any_bitmap() -> impl Strategy<Value = Bitmap> {
        sizes().prop_flat_map(bitmap)
    }

    proptest! {
        /// Every query agrees with the bit-per-region model after any sequence of operations.
        #[test]
        fn matches_model((size, ops) in sizes().prop_flat_map(|s| (Just(s), proptest::collection::vec(op(s), 0..40)))) {
            let mut bm = Bitmap::new(size, G).unwrap();
            let mut bits = vec![false; size.div_ceil(G) as usize];
            for op in &ops {
                let changes = bm.changes();
                let before = bm.clone();
                match *op {
                    Op::Mark(o, l) => bm.mark(o, l),
                    Op::Clear(o, l) => bm.clear(o, l),
                    Op::ClearCovered(o, l) => bm.clear_covered(o, l),
                    Op::MarkAll => bm.mark_all(),
                    Op::ClearAll => bm.clear_all(),
                }
                apply_model(&mut bits, size, op);
                prop_assert_eq!(bm.changes() != changes, bm != before, "changes() tracks bit changes");
            }
            let dirty = bits.iter().filter(|b| **b).count() as u64;
            prop_assert_eq!(bm.dirty_regions(), dirty);
            let runs: Vec<_> = bm.runs().collect();
            prop_assert_eq!(&runs, &model_runs(&bits, size));
            prop_assert_eq!(bm.dirty_bytes(), runs.iter().map(|r| r.1).sum::<u64>());
            for (r, b) in bits.iter().enumerate() {
                let r = r as u64;
                prop_assert_eq!(bm.is_region_marked(r), *b);
                prop_assert_eq!(bm.is_marked(r * G + (G / 2).min(size - r * G - 1)), *b);
                let next = bits[r as usize..].iter().position(|b| *b).map(|p| r + p as u64);
                prop_assert_eq!(bm.next_dirty(r), next);
                let next = bits[r as usize..].iter().position(|b| !*b).map(|p| r + p as u64);
                prop_assert_eq!(bm.next_clean(r), next);
            }
            prop_assert!(!bm.is_marked(size));
            prop_assert_eq!(bm.next_dirty(bits.len() as u64), None);
        }

        #[test]
        fn union_is_bitwise_or((a, b) in sizes().prop_flat_map(|s| (bitmap(s), bitmap(s)))) {
            let mut u = a.clone();
            u.union_with(&b).unwrap();
            for r in 0..a.regions() {
                prop_assert_eq!(u.is_region_marked(r), a.is_region_marked(r) || b.is_region_marked(r));
            }
            prop_assert_eq!(u.dirty_regions(), (0..a.regions()).filter(|r| u.is_region_marked(*r)).count() as u64);
        }

        /// Resizing never loses a marked byte, and marks a grown tail.
        #[test]
        fn resize_is_a_superset(a in any_bitmap(), size in 0u64..300 * G, shift in 12u32..18) {
            let r = a.resized(size, 1 << shift).unwrap();
            for (o, l) in a.runs() {
                for off in [o, o + l - 1] {
                    prop_assert!(off >= size || r.is_marked(off));
                }
            }
            if size > a.volume_size() {
                prop_assert!(r.is_marked(a.volume_size()) && r.is_marked(size - 1));
            }
        }

        #[test]
        fn roundtrips(a in any_bitmap()) {
            let d = Bitmap::decode(&a.encode()).unwrap();
            prop_assert_eq!(d.dirty_regions(), a.dirty_regions());
            prop_assert_eq!(d, a);
        }

        /// Any single corrupted byte is detected, never decoded as a bitmap.
        #[test]
        fn corruption_is_detected(a in any_bitmap(), at in any::<prop::sample::Index>(), x in 1u8..=255) {
            let mut b = a.encode();
            let at = at.index(b.len());
            b[at] ^= x;
            prop_assert!(Bitmap::decode(&b).is_err());
        }

        #[test]
        fn truncation_and_extension_are_detected(a in any_bitmap(), cut in any::<prop::sample::Index>(), extra in 1usize..16) {
            let b = a.encode();
            prop_assert!(Bitmap::decode(&b[..cut.index(b.len())]).is_err());
            let mut longer = b.clone();
            longer.resize(b.len() + extra, 0);
            prop_assert!(Bitmap::decode(&longer).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Bitmap::decode(&b);
        }

        /// A header with a valid checksum but any field value never panics and
        /// never allocates past the input.
        #[test]
        fn forged_headers_never_panic(gran in any::<u64>(), size in any::<u64>(), words in 0u64..8, flags in 0u32..2, fill in any::<u64>()) {
            let mut b = Vec::new();
            b.extend_from_slice(&BITMAP_MAGIC);
            b.extend_from_slice(&BITMAP_VERSION.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&gran.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&words.to_le_bytes());
            for _ in 0..words {
                b.extend_from_slice(&fill.to_le_bytes());
            }
            let crc = crc32c::crc32c(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            if let Ok(bm) = Bitmap::decode(&b) {
                prop_assert_eq!(bm.encode(), b.clone());
            }
            // A huge size with few words is refused without allocating it.
            let mut huge = b.clone();
            huge[16..24].copy_from_slice(&4096u64.to_le_bytes());
            huge[24..32].copy_from_slice(&(1u64 << 44).to_le_bytes());
            let n = huge.len() - 4;
            let crc = crc32c::crc32c(&huge[..n]);
            huge[n..].copy_from_slice(&crc.to_le_bytes());
            let refused = matches!(Bitmap::decode(&huge), Err(BitmapError::WordCount { .. } | BitmapError::Flags(_)));
            prop_assert!(refused);
        }
    }

    #[test]
    fn geometry_is_checked() {
        assert_eq!(Bitmap::new(1, 4095), Err(BitmapError::Granularity(4095)));
        assert_eq!(Bitmap::new(1, 12288), Err(BitmapError::Granularity(12288)));
        assert_eq!(Bitmap::new(1, 0), Err(BitmapError::Granularity(0)));
        assert!(matches!(
            Bitmap::new(u64::MAX, 4096),
            Err(BitmapError::TooManyRegions { .. })
        ));
        let bm = Bitmap::new(0, G).unwrap();
        assert_eq!((bm.regions(), bm.dirty_bytes()), (0, 0));
        assert_eq!(bm.runs().count(), 0);
        assert_eq!(Bitmap::decode(&bm.encode()), Ok(bm));
        let mut a = Bitmap::new(10 * G, G).unwrap();
        assert!(matches!(
            a.union_with(&Bitmap::new(10 * G, 2 * G).unwrap()),
            Err(BitmapError::Mismatch { .. })
        ));
    }

    #[test]
    fn clear_semantics_are_precise() {
        // 10 regions of 4 KiB, the last one 100 bytes short.
        let size = 10 * G - 100;
        let mut bm = Bitmap::new(size, G).unwrap();
        bm.mark_all();
        assert_eq!(bm.dirty_bytes(), size);
        // Touching one byte of region 3 clears it all.
        bm.clear(3 * G + 5, 1);
        assert!(!bm.is_region_marked(3));
        // Covering regions 5 and 8 only partly leaves them marked; 6 and 7 are covered.
        bm.clear_covered(5 * G + 1, 3 * G);
        assert!(bm.is_region_marked(5) && !bm.is_region_marked(6));
        assert!(!bm.is_region_marked(7) && bm.is_region_marked(8));
        // The short last region is covered by a range that reaches the end.
        bm.clear_covered(9 * G, G - 100);
        assert!(!bm.is_region_marked(9));
        // Ranges past the end and empty ranges change nothing.
        let before = bm.clone();
        bm.mark(size, G);
        bm.mark(0, 0);
        bm.clear(u64::MAX, u64::MAX);
        bm.clear_covered(8 * G + 1, G);
        assert_eq!(bm, before);
        assert_eq!(
            bm.runs().collect::<Vec<_>>(),
            vec![(0, 3 * G), (4 * G, 2 * G), (8 * G, G)]
        );
        assert_eq!(bm.dirty_bytes(), 6 * G);
        // Only the short last region marked: its clipped length.
        let mut bm = Bitmap::new(G + 663, G).unwrap();
        bm.mark(G, 4);
        assert_eq!((bm.dirty_bytes(), bm.runs().next()), (663, Some((G, 663))));
    }

    #[test]
    fn large_volume_is_word_level() {
        // 1 TiB at 64 KiB: 16 Mi regions, 2 MiB of words.
        let size = 1u64 << 40;
        let mut bm = Bitmap::new(size, DEFAULT_GRANULARITY).unwrap();
        assert_eq!(bm.regions(), 1 << 24);
        bm.mark(12345, size);
        assert_eq!(bm.dirty_bytes(), size);
        bm.clear(DEFAULT_GRANULARITY, size - 2 * DEFAULT_GRANULARITY);
        assert_eq!(
            bm.runs().collect::<Vec<_>>(),
            vec![
                (0, DEFAULT_GRANULARITY),
                (size - DEFAULT_GRANULARITY, DEFAULT_GRANULARITY)
            ]
        );
        assert_eq!(bm.next_dirty(1), Some((1 << 24) - 1));
        assert_eq!(bm.encode().len(), 40 + (2 << 20) + 4);
    }

    #[test]
    fn errors_are_specific() {
        let bm = Bitmap::new(100 * G, G).unwrap();
        let good = bm.encode();
        assert!(matches!(
            Bitmap::decode(&good[..10]),
            Err(BitmapError::Length { .. })
        ));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Bitmap::decode(&b), Err(BitmapError::Magic));
        let mut b = good.clone();
        b[8] = 2;
        assert_eq!(Bitmap::decode(&b), Err(BitmapError::Version(2)));
        let mut b = good.clone();
        b[50] ^= 1;
        assert!(matches!(
            Bitmap::decode(&b),
            Err(BitmapError::Checksum { .. })
        ));
        // Bits past the last region, with a fixed-up checksum.
        let mut b = good.clone();
        let last_word = 40 + 8;
        b[last_word + 7] = 0x80;
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Bitmap::decode(&b), Err(BitmapError::TrailingBits));
    }
}
