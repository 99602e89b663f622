//! Page-dirty tracking: which pages of a region changed since the last sync.
//!
//! Three sources, one result type:
//! - [`bitmap::DirtyBitmap`]: an atomic bitmap the VMM marks itself (device
//!   DMA, emulated writes);
//! - [`uffd_wp::UffdWp`]: the kernel tracks writes by any thread of this
//!   process (userfaultfd async write-protect + the `PAGEMAP_SCAN` ioctl);
//! - [`kvm_log::KvmDirtyLog`]: the KVM dirty log of a VM memory slot (guest writes).
//!
//! [`tracker::Tracker`] merges any of them over one region. Every sync is a
//! get-and-clear and yields a [`DirtySet`]: one bit per host page, in `u64`
//! words (bit `i % 64` of word `i / 64` is page `i`), plus its runs.

pub mod bitmap;
pub mod kvm_log;
pub mod tracker;
pub mod uffd_wp;

use std::os::fd::AsFd;

use rustix::ioctl::{Ioctl, IoctlOutput, Opcode};

use crate::error::{Error, Result};

/// Number of `u64` words holding `npages` bits.
#[must_use]
pub const fn words_for(npages: usize) -> usize {
    npages.div_ceil(64)
}

/// The words touched by pages `[first, first + count)`, each with the mask of
/// its bits in that range: a range costs one operation per word, not per page.
/// The caller has checked that the range lies inside its bitmap.
pub(crate) fn word_masks(first: usize, count: usize) -> impl Iterator<Item = (usize, u64)> {
    let end = first + count;
    let (w0, w1) = (first / 64, end.div_ceil(64));
    (w0..w1).map(move |w| {
        let lo = if w == w0 { first % 64 } else { 0 };
        let hi = if w + 1 == w1 && end % 64 != 0 { end % 64 } else { 64 };
        let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
        (w, mask)
    })
}

/// Check that pages `[first, first + count)` lie inside `npages`.
pub(crate) fn check_pages(first: usize, count: usize, npages: usize) -> Result<()> {
    match first.checked_add(count) {
        Some(end) if end <= npages => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "pages {first}+{count} are outside the bitmap of {npages} pages"
        ))),
    }
}

/// The result of one sync: the pages written since the previous sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    words: Vec<u64>,
    npages: usize,
    count: usize,
}

impl DirtySet {
    /// Wrap a word array of `npages` bits; bits past `npages` must be clear.
    pub fn from_words(words: Vec<u64>, npages: usize) -> Result<Self> {
        if words.len() != words_for(npages) {
            return Err(Error::InvalidArgument(format!(
                "{} words do not hold exactly {npages} pages",
                words.len()
            )));
        }
        if npages % 64 != 0 && words.last().is_some_and(|w| w >> (npages % 64) != 0) {
            return Err(Error::InvalidArgument(format!("bits past page {npages} are set")));
        }
        let count = words.iter().map(|w| w.count_ones() as usize).sum();
        Ok(Self { words, npages, count })
    }

    /// The bitmap words.
    #[must_use]
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Give up the words (e.g. to hand them to NumPy without a copy).
    #[must_use]
    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    /// Number of pages the set covers.
    #[must_use]
    pub fn npages(&self) -> usize {
        self.npages
    }

    /// Number of dirty pages.
    #[must_use]
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether page `page` is dirty (false past the end).
    #[must_use]
    pub fn test(&self, page: usize) -> bool {
        page < self.npages && self.words[page / 64] >> (page % 64) & 1 == 1
    }

    /// The dirty pages as coalesced runs `(first page, count)`, in order.
    #[must_use]
    pub fn ranges(&self) -> Ranges<'_> {
        Ranges::new(&self.words, self.npages)
    }
}

/// Iterator over the runs of set bits of a word array: `(first page, count)`.
#[derive(Debug, Clone)]
pub struct Ranges<'a> {
    words: &'a [u64],
    npages: usize,
    pos: usize,
}

impl<'a> Ranges<'a> {
    /// Runs of `words`, ignoring any bit at or past `npages`.
    #[must_use]
    pub fn new(words: &'a [u64], npages: usize) -> Self {
        Self { words, npages: npages.min(words.len() * 64), pos: 0 }
    }

    /// First page at or after `from` whose bit equals `set`, below `npages`.
    fn next_bit(&self, from: usize, set: bool) -> Option<usize> {
        let flip = if set { 0 } else { u64::MAX };
        let mut i = from / 64;
        let mut w = (*self.words.get(i)? ^ flip) & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let page = i * 64 + w.trailing_zeros() as usize;
                return (page < self.npages).then_some(page);
            }
            i += 1;
            w = *self.words.get(i)? ^ flip;
        }
    }
}

impl Iterator for Ranges<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let start = self.next_bit(self.pos, true)?;
        let end = self.next_bit(start, false).unwrap_or(self.npages);
        self.pos = end;
        Some((start, end - start))
    }
}

/// An ioctl whose argument is a pointer or integer and whose result is the
/// syscall's return value (rustix's typed patterns drop it; `PAGEMAP_SCAN`
/// and `KVM_CHECK_EXTENSION` answer through it).
struct RawIoctl {
    opcode: Opcode,
    arg: *mut libc::c_void,
}

// SAFETY: `raw_ioctl`'s contract makes the caller vouch that `opcode` and
// `arg` are what the driver expects; the output is the plain return value.
unsafe impl Ioctl for RawIoctl {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut libc::c_void {
        self.arg
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut libc::c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// `ioctl(fd, opcode, arg)`, returning the syscall's non-negative result.
///
/// # Safety
/// `opcode` must be an ioctl of the driver behind `fd` that takes `arg`
/// (an integer, or a pointer to a live object of the type the kernel expects,
/// valid for the reads and writes that ioctl does).
pub(crate) unsafe fn raw_ioctl(fd: impl AsFd, opcode: Opcode, arg: *mut libc::c_void) -> rustix::io::Result<i32> {
    // SAFETY: forwarded to the caller (see `# Safety`).
    unsafe { rustix::ioctl::ioctl(fd, RawIoctl { opcode, arg }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(pages: &[usize], npages: usize) -> DirtySet {
        let mut words = vec![0u64; words_for(npages)];
        for &p in pages {
            words[p / 64] |= 1 << (p % 64);
        }
        DirtySet::from_words(words, npages).unwrap()
    }

    #[test]
    fn ranges_coalesce_runs_across_words() {
        let s = set_of(&[0, 1, 2, 63, 64, 65, 127, 128, 199], 200);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(0, 3), (63, 3), (127, 2), (199, 1)]);
        assert_eq!(s.count(), 9);
        let full = set_of(&(0..128).collect::<Vec<_>>(), 128);
        assert_eq!(full.ranges().collect::<Vec<_>>(), vec![(0, 128)]);
        assert_eq!(set_of(&[], 70).ranges().count(), 0);
    }

    #[test]
    fn word_masks_cover_exactly_the_range() {
        for (first, count) in [(0, 1), (3, 61), (3, 62), (60, 10), (0, 128), (5, 300), (64, 64)] {
            let mut words = vec![0u64; 8];
            for (w, m) in word_masks(first, count) {
                words[w] |= m;
            }
            let s = DirtySet::from_words(words, 512).unwrap();
            assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(first, count)], "{first}+{count}");
        }
    }

    #[test]
    fn from_words_rejects_bad_shapes() {
        assert!(DirtySet::from_words(vec![0; 2], 64).is_err());
        assert!(DirtySet::from_words(vec![1 << 10], 10).is_err());
        assert!(check_pages(5, 6, 10).is_err());
        assert!(check_pages(usize::MAX, 2, 10).is_err());
    }
}
