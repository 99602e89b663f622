//! An atomic dirty bitmap the VMM marks itself (device DMA, emulated writes).
//!
//! One bit per page in `AtomicU64` words: any thread may mark while another
//! syncs, without a lock. A range is marked with one `fetch_or` per word.
//! Marks use `Release` and syncs `Acquire`, so a reader that sees a page as
//! dirty after a sync also sees the data written before it was marked.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{DirtySet, check_pages, word_masks, words_for};
use crate::error::{Error, Result};
use crate::memfd::host_page_size;

/// A fixed-size atomic bitmap of dirty pages.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    npages: usize,
}

impl DirtyBitmap {
    /// A clean bitmap of `npages` pages.
    pub fn new(npages: usize) -> Result<Self> {
        if npages == 0 {
            return Err(Error::InvalidArgument("a dirty bitmap needs at least one page".into()));
        }
        Ok(Self { words: (0..words_for(npages)).map(|_| AtomicU64::new(0)).collect(), npages })
    }

    /// Number of pages.
    #[must_use]
    pub fn npages(&self) -> usize {
        self.npages
    }

    /// Mark one page dirty.
    pub fn mark(&self, page: usize) -> Result<()> {
        self.mark_range(page, 1)
    }

    /// Mark pages `[first, first + count)` dirty, one atomic OR per word.
    pub fn mark_range(&self, first: usize, count: usize) -> Result<()> {
        check_pages(first, count, self.npages)?;
        for (w, mask) in word_masks(first, count) {
            self.words[w].fetch_or(mask, Ordering::Release);
        }
        Ok(())
    }

    /// Mark every host page overlapping bytes `[offset, offset + length)`.
    pub fn mark_bytes(&self, offset: usize, length: usize) -> Result<()> {
        let ps = host_page_size();
        let end = offset.checked_add(length).ok_or_else(|| {
            Error::InvalidArgument(format!("byte range {offset:#x}+{length:#x} overflows"))
        })?;
        if length == 0 {
            return check_pages(offset / ps, 0, self.npages);
        }
        let first = offset / ps;
        self.mark_range(first, end.div_ceil(ps) - first)
    }

    /// Whether `page` is dirty.
    pub fn test(&self, page: usize) -> Result<bool> {
        check_pages(page, 1, self.npages)?;
        Ok(self.words[page / 64].load(Ordering::Acquire) >> (page % 64) & 1 == 1)
    }

    /// Number of dirty pages right now.
    #[must_use]
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum()
    }

    /// Get and clear: every word is swapped with zero, so a mark racing with
    /// the sync lands either in this result or in the next one, never in neither.
    #[must_use]
    pub fn sync(&self) -> DirtySet {
        let mut words = vec![0u64; self.words.len()];
        self.sync_into(&mut words);
        DirtySet::from_words(words, self.npages).expect("word count matches npages")
    }

    /// Get and clear, OR-ing the dirty bits into `words` (at least as long as the bitmap's).
    pub fn sync_into(&self, words: &mut [u64]) {
        for (out, w) in words.iter_mut().zip(self.words.iter()) {
            // A plain load first skips the locked swap for clean words.
            if w.load(Ordering::Relaxed) != 0 {
                *out |= w.swap(0, Ordering::Acquire);
            }
        }
    }

    /// Forget every mark.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn mark_test_count_sync_clear() {
        let b = DirtyBitmap::new(130).unwrap();
        b.mark(0).unwrap();
        b.mark(129).unwrap();
        b.mark_range(60, 10).unwrap();
        assert!(b.test(65).unwrap() && !b.test(70).unwrap());
        assert_eq!(b.count(), 12);
        let s = b.sync();
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(0, 1), (60, 10), (129, 1)]);
        assert_eq!(b.count(), 0);
        assert_eq!(b.sync().count(), 0);
        b.mark_bytes(host_page_size() - 1, 2).unwrap();
        assert_eq!(b.sync().ranges().collect::<Vec<_>>(), vec![(0, 2)]);
        b.mark_range(0, 130).unwrap();
        b.clear();
        assert_eq!(b.count(), 0);
        assert!(b.mark(130).is_err());
        assert!(b.mark_range(100, 31).is_err());
        assert!(b.mark_bytes(130 * host_page_size(), 1).is_err());
        assert!(DirtyBitmap::new(0).is_err());
    }

    #[test]
    fn concurrent_marks_are_each_reported_once() {
        let b = Arc::new(DirtyBitmap::new(1 << 16).unwrap());
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    for p in (t..1 << 16).step_by(4) {
                        b.mark(p).unwrap();
                    }
                })
            })
            .collect();
        let mut total = vec![0u64; words_for(1 << 16)];
        while !writers.iter().all(|w| w.is_finished()) {
            let s = b.sync();
            for (t, w) in total.iter_mut().zip(s.words()) {
                assert_eq!(*t & w, 0, "a page was reported twice");
                *t |= w;
            }
        }
        writers.into_iter().for_each(|w| w.join().unwrap());
        b.sync_into(&mut total);
        assert!(total.iter().all(|&w| w == u64::MAX));
    }
}
