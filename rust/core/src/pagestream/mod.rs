//! Moving a region's pages in bulk: to and from a byte stream ([`send`],
//! [`recv`]) and to and from a file in which every page has a fixed offset
//! ([`save_mapped`], [`load_mapped`], QEMU's "mapped-ram" idea).
//!
//! Shared rules:
//! - Pages are selected by a dirty bitmap (`u64` words, bit `i` = page `i`) or
//!   taken all; they are handled in *windows* of up to 256 pages (at most 1 MiB).
//! - Guest memory is only reached through raw pointers. Pages are copied into a
//!   private buffer before they are inspected, hashed or written out, and data
//!   read from outside is verified in a private buffer before it is copied in.
//! - Zero pages carry no data. On the sending side a hole in the memfd (found
//!   with `SEEK_DATA`) is a zero page without touching (and so allocating) it.
//! - Progress is published in atomics ([`Progress`]) readable while work runs.

mod io;
mod mapped;
mod stream;

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};

pub use mapped::{load_mapped, mapped_file_size, save_mapped};
pub use stream::{recv, send};

/// xxh3-64 of `data`, the checksum of every page-stream frame, mapped-ram
/// table and mapped-ram page.
#[must_use]
pub fn checksum(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

use crate::error::{Error, Result};
use crate::memfd::Mapping;

/// Most pages in one window (one chunk of a stream).
pub const MAX_WINDOW_PAGES: usize = 256;
/// Most bytes of page data in one window.
const MAX_WINDOW_BYTES: usize = 1 << 20;

/// Pages per window for a page size: a power of two in `1..=256`.
#[must_use]
pub fn window_pages(page_size: usize) -> usize {
    (MAX_WINDOW_BYTES / page_size).clamp(1, MAX_WINDOW_PAGES)
}

/// Counters of work done so far, updated atomically as each window completes.
#[derive(Debug, Default)]
pub struct Progress {
    bytes: AtomicU64,
    pages: AtomicU64,
    zero_pages: AtomicU64,
    chunks: AtomicU64,
}

impl Progress {
    /// Bytes written or read so far (headers, checksums and page data).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Pages handled so far, zero pages included.
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }
    /// Pages handled as zero pages (no data).
    #[must_use]
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages.load(Ordering::Relaxed)
    }
    /// Chunks (windows) handled so far.
    #[must_use]
    pub fn chunks(&self) -> u64 {
        self.chunks.load(Ordering::Relaxed)
    }
}

/// Totals of one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Bytes written or read (headers, checksums, tables and page data).
    pub bytes: u64,
    /// Pages handled, zero pages included.
    pub pages: u64,
    /// Pages handled as zero pages.
    pub zero_pages: u64,
    /// Chunks (stream) or windows (file) handled.
    pub chunks: u64,
    /// Wall-clock seconds the operation took.
    pub seconds: f64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.bytes += o.bytes;
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.chunks += o.chunks;
    }
}

/// Hooks the caller gives to a long operation.
#[derive(Default)]
pub struct Control<'a> {
    /// Counters to update as work proceeds.
    pub progress: Option<&'a Progress>,
    /// Called when a blocking call was interrupted by a signal (and while the
    /// bandwidth limiter sleeps); returning `true` aborts with `EINTR`.
    pub interrupted: Option<&'a (dyn Fn() -> bool + Sync)>,
}

impl std::fmt::Debug for Control<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

impl Control<'_> {
    fn count(&self, local: &mut Stats, bytes: u64, pages: u64, zero_pages: u64, chunks: u64) {
        local.add(&Stats {
            bytes,
            pages,
            zero_pages,
            chunks,
            seconds: 0.0,
        });
        if let Some(p) = self.progress {
            p.bytes.fetch_add(bytes, Ordering::Relaxed);
            p.pages.fetch_add(pages, Ordering::Relaxed);
            p.zero_pages.fetch_add(zero_pages, Ordering::Relaxed);
            p.chunks.fetch_add(chunks, Ordering::Relaxed);
        }
    }

    fn interrupted(&self) -> bool {
        self.interrupted.is_some_and(|f| f())
    }
}

/// Which pages of a region an operation covers.
#[derive(Debug, Clone, Copy)]
struct Selection<'a> {
    dirty: Option<&'a [u64]>,
}

impl<'a> Selection<'a> {
    fn new(dirty: Option<&'a [u64]>, pages: usize) -> Result<Self> {
        if let Some(words) = dirty {
            let want = pages.div_ceil(64);
            if words.len() != want {
                return Err(Error::InvalidArgument(format!(
                    "dirty bitmap has {} words; a region of {pages} pages needs {want}",
                    words.len()
                )));
            }
            if pages % 64 != 0 && words[want - 1] >> (pages % 64) != 0 {
                return Err(Error::InvalidArgument(format!(
                    "dirty bitmap marks pages beyond the region's {pages} pages"
                )));
            }
        }
        Ok(Self { dirty })
    }

    /// Selected pages in `[first, first+span)` as a bitmap relative to `first`.
    fn window(&self, first: usize, span: usize) -> [u64; 4] {
        let mut out = [0u64; 4];
        for (k, word) in out.iter_mut().enumerate() {
            let start = k * 64;
            if start >= span {
                break;
            }
            let len = (span - start).min(64);
            let mask = if len == 64 { u64::MAX } else { (1u64 << len) - 1 };
            *word = match self.dirty {
                None => mask,
                Some(words) => bits_at(words, first + start) & mask,
            };
        }
        out
    }
}

/// The 64 bits of `words` starting at bit `at` (bits past the end read as 0).
fn bits_at(words: &[u64], at: usize) -> u64 {
    let (w, s) = (at / 64, at % 64);
    let lo = words.get(w).copied().unwrap_or(0) >> s;
    let hi = if s == 0 {
        0
    } else {
        words.get(w + 1).copied().unwrap_or(0) << (64 - s)
    };
    lo | hi
}

fn bit(bits: &[u64; 4], i: usize) -> bool {
    bits[i / 64] >> (i % 64) & 1 == 1
}

fn set_bit(bits: &mut [u64; 4], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

fn count(bits: &[u64; 4]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Maximal runs `(start, len)` of indices `< span` for which `pred` holds.
fn runs(span: usize, pred: impl Fn(usize) -> bool) -> impl Iterator<Item = (usize, usize)> {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < span && !pred(i) {
            i += 1;
        }
        if i >= span {
            return None;
        }
        let start = i;
        while i < span && pred(i) {
            i += 1;
        }
        Some((start, i - start))
    })
}

/// True if the private buffer is all zero bytes.
#[cfg(test)]
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(512).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// True if page `page` of the mapping reads as zeros. Volatile word reads,
/// stopping at the first non-zero block, so a zero page is never copied.
fn page_is_zero(m: &Mapping, page: usize) -> bool {
    let ps = m.page_size();
    assert!(page < m.pages(), "page {page} out of range");
    // SAFETY: in range (asserted); the mapping is page-aligned, so u64-aligned.
    let base = unsafe { m.as_ptr().add(page * ps) }.cast::<u64>();
    (0..ps / 8).step_by(8).all(|i| {
        // SAFETY: words `i..i+8` lie inside the page (`ps` is a multiple of 64);
        // volatile reads of shared memory another thread may be writing.
        (0..8).fold(0, |acc, j| acc | unsafe { base.add(i + j).read_volatile() }) == 0
    })
}

/// Fetch page `page` into the private one-page buffer `dst`, unless it is a
/// hole or reads as zeros: then return `false` and leave `dst` alone.
fn fetch(m: &Mapping, holes: &mut Holes<'_>, page: usize, dst: &mut [u8]) -> Result<bool> {
    let ps = m.page_size();
    if holes.is_hole((page * ps) as u64)? || page_is_zero(m, page) {
        return Ok(false);
    }
    assert!(dst.len() == ps, "buffer is not one page");
    // SAFETY: `page` is inside the mapping (checked by `page_is_zero`); `dst` is
    // a private buffer of exactly one page that cannot overlap the shared
    // mapping. The guest may write the page meanwhile: we only copy raw bytes.
    unsafe { std::ptr::copy_nonoverlapping(m.as_ptr().add(page * ps), dst.as_mut_ptr(), ps) };
    Ok(true)
}

/// Copy verified bytes from a private buffer into pages `[page, page+n)`.
fn copy_in(m: &Mapping, page: usize, src: &[u8]) {
    let ps = m.page_size();
    assert!(
        src.len() % ps == 0 && page + src.len() / ps <= m.pages(),
        "pages out of range"
    );
    // SAFETY: the destination range lies inside the mapping (asserted above)
    // and the source is a private buffer, so the two cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), m.as_ptr().add(page * ps), src.len()) };
}

/// Zero pages `[page, page+n)`: long runs are given back to the memfd with
/// `MADV_REMOVE` (reads then return zeros, nothing stays allocated), short
/// ones are overwritten with zeros.
fn zero_pages(m: &Mapping, page: usize, n: usize) -> Result<()> {
    const REMOVE_MIN_BYTES: usize = 64 << 10;
    let ps = m.page_size();
    assert!(page + n <= m.pages(), "pages out of range");
    // SAFETY: the range lies inside the mapping (asserted above).
    let ptr = unsafe { m.as_ptr().add(page * ps) };
    if n * ps >= REMOVE_MIN_BYTES {
        // SAFETY: a page-aligned range of our own MAP_SHARED mapping; freeing
        // its backing pages makes later reads return zeros, which is the intent.
        unsafe { rustix::mm::madvise(ptr.cast(), n * ps, rustix::mm::Advice::LinuxRemove) }
            .map_err(|e| Error::os(format!("madvise(MADV_REMOVE, {} pages at page {page})", n), e))
    } else {
        // SAFETY: same range as above, written through a raw pointer only.
        unsafe { std::ptr::write_bytes(ptr, 0, n * ps) };
        Ok(())
    }
}

/// Finds holes in the region's memfd with `SEEK_DATA`/`SEEK_HOLE`, for
/// offsets asked in increasing order (one pair of calls per data extent).
struct Holes<'a> {
    fd: Option<BorrowedFd<'a>>,
    asked: u64,
    data: (u64, u64),
}

impl<'a> Holes<'a> {
    /// Hole lookups in `fd`, none at all if every byte of it is allocated:
    /// then there are no holes, and `SEEK_HOLE` would only walk the whole
    /// file page by page (4 ms for 128 MiB here, 6% of sending it).
    fn new(fd: Option<BorrowedFd<'a>>) -> Self {
        let full = |fd| {
            rustix::fs::fstat(fd).is_ok_and(|st| st.st_blocks.saturating_mul(512) as u64 >= st.st_size as u64)
        };
        Self {
            fd: fd.filter(|&fd| !full(fd)),
            asked: u64::MAX,
            data: (0, 0),
        }
    }

    /// True if the page at byte offset `off` is a hole (reads as zeros).
    fn is_hole(&mut self, off: u64) -> Result<bool> {
        use rustix::fs::SeekFrom;
        let Some(fd) = self.fd else { return Ok(false) };
        if off < self.asked || off >= self.data.1 {
            self.asked = off;
            self.data = match rustix::fs::seek(fd, SeekFrom::Data(off)) {
                Ok(start) => {
                    let end = rustix::fs::seek(fd, SeekFrom::Hole(start))
                        .map_err(|e| Error::os(format!("lseek(SEEK_HOLE, {start})"), e))?;
                    (start, end)
                }
                Err(rustix::io::Errno::NXIO) => (u64::MAX, u64::MAX),
                Err(e) => return Err(Error::os(format!("lseek(SEEK_DATA, {off})"), e)),
            };
        }
        Ok(off < self.data.0)
    }
}

/// Run `work(i)` for `i` in `0..n`, `i = 0` on the calling thread, the rest on
/// scoped threads; return their stats summed, or the first error.
fn parallel(n: usize, work: impl Fn(usize) -> Result<Stats> + Sync) -> Result<Stats> {
    let results: Vec<Result<Stats>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..n)
            .map(|i| {
                s.spawn({
                    let work = &work;
                    move || work(i)
                })
            })
            .collect();
        let mut out = vec![work(0)];
        out.extend(
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
        );
        out
    });
    let mut total = Stats::default();
    for r in results {
        total.add(&r?);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_windows_and_validation() {
        let words = [0b1010u64, 1 << 63, 0b1];
        let sel = Selection::new(Some(&words), 129).unwrap();
        let w = sel.window(0, 256);
        assert_eq!(w, [0b1010, 1 << 63, 1, 0]);
        assert_eq!(sel.window(1, 64)[0], 0b101);
        assert_eq!(sel.window(126, 3)[0], 0b110);
        assert!(Selection::new(Some(&words), 128).is_err(), "wrong length");
        assert!(Selection::new(Some(&[0, 0, 2]), 129).is_err(), "bit beyond the region");
        assert_eq!(Selection::new(None, 10).unwrap().window(0, 10), [0x3ff, 0, 0, 0]);
    }

    #[test]
    fn holes_are_found_and_a_fully_allocated_file_is_not_searched() {
        use crate::memfd::{CreateOptions, Region};
        let r = Region::create("t", 64 * 4096, &CreateOptions::default()).unwrap();
        let m = r.mapping();
        m.write(5 * 4096, &[1; 4096]).unwrap();
        let mut h = Holes::new(Some(r.fd()));
        assert!(h.fd.is_some());
        let holes: Vec<_> = (0..64).filter(|&p| h.is_hole(p * 4096).unwrap()).collect();
        assert_eq!(holes, (0..64).filter(|&p| p != 5).collect::<Vec<_>>());
        m.write(0, &vec![0; 64 * 4096]).unwrap(); // zeros written are data, not holes
        let mut h = Holes::new(Some(r.fd()));
        assert!(h.fd.is_none(), "every page is allocated: nothing to look up");
        assert!((0..64).all(|p| !h.is_hole(p * 4096).unwrap()));
    }

    #[test]
    fn runs_and_zero() {
        let v: Vec<_> = runs(10, |i| matches!(i, 1 | 2 | 5 | 9)).collect();
        assert_eq!(v, [(1, 2), (5, 1), (9, 1)]);
        assert!(is_zero(&[0; 4096]));
        let mut b = [0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        assert_eq!(window_pages(4096), 256);
        assert_eq!(window_pages(2 << 20), 1);
    }
}
