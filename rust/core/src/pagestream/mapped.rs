//! The mapped-ram save file: every page of a region at a fixed offset, so a
//! save can be written and read by several threads with `pwrite`/`pread`,
//! updated in place for just the dirty pages, and restored by mapping.
//!
//! Layout, relative to the (page-aligned) start offset, each part page-aligned:
//!
//! ```text
//! header   64 bytes: magic "CPRMRAM1" | version u32 | page size u32 | pages u64 |
//!          bitmap offset u64 | sums offset u64 | data offset u64 |
//!          xxh3 of (bitmap ++ sums) u64 | xxh3 of the 56 bytes before it u64
//! bitmap   one bit per page (u64 words, LE): page holds data; clear = zero page (a hole)
//! sums     xxh3-64 of each present page, u64 LE (0 for zero pages)
//! data     page i at data offset + i * page size
//! ```

use std::os::fd::BorrowedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rustix::fs::FallocateFlags;
use super::io::{pread_full, pwrite_all};
use super::{
    Control, checksum, Holes, Selection, Stats, bit, copy_in, count, fetch, parallel, runs, set_bit, window_pages, zero_pages,
};
use crate::error::{Error, Result};
use crate::memfd::Mapping;

const MAGIC: &[u8; 8] = b"CPRMRAM1";
const VERSION: u32 = 1;
const HEADER: usize = 64;

/// Where each part of the file lies, relative to its start offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    page_size: usize,
    pages: usize,
    bitmap: u64,
    sums: u64,
    data: u64,
    total: u64,
}

impl Layout {
    fn new(page_size: usize, pages: usize) -> Self {
        let up = |n: usize| n.div_ceil(page_size) * page_size;
        let bitmap = up(HEADER);
        let sums = bitmap + up(pages.div_ceil(64) * 8);
        let data = sums + up(pages * 8);
        Self {
            page_size,
            pages,
            bitmap: bitmap as u64,
            sums: sums as u64,
            data: data as u64,
            total: (data + pages * page_size) as u64,
        }
    }

    fn encode(&self, tables_sum: u64) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(self.page_size as u32).to_le_bytes());
        for (i, v) in [self.pages as u64, self.bitmap, self.sums, self.data, tables_sum]
            .iter()
            .enumerate()
        {
            h[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let sum = checksum(&h[..56]);
        h[56..].copy_from_slice(&sum.to_le_bytes());
        h
    }
}

/// Bytes a mapped-ram save of a region of `region_size` bytes occupies.
pub fn mapped_file_size(region_size: usize, page_size: usize) -> Result<u64> {
    if page_size == 0 || !page_size.is_power_of_two() || region_size % page_size != 0 {
        return Err(Error::InvalidArgument(format!(
            "region size {region_size} must be a multiple of a power-of-two page size ({page_size})"
        )));
    }
    Ok(Layout::new(page_size, region_size / page_size).total)
}

fn check_offset(m: &Mapping, offset: u64) -> Result<()> {
    if offset % m.page_size() as u64 != 0 {
        return Err(Error::InvalidArgument(format!(
            "save file offset {offset} must be a multiple of the page size {}",
            m.page_size()
        )));
    }
    Ok(())
}

/// The bitmap and the page sums, as read from or written to the file.
struct Tables {
    bitmap: Vec<AtomicU64>,
    sums: Vec<u64>,
}

impl Tables {
    fn bytes(&self) -> (Vec<u8>, Vec<u8>) {
        let bitmap = self
            .bitmap
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        let sums = self.sums.iter().flat_map(|s| s.to_le_bytes()).collect();
        (bitmap, sums)
    }

    fn checksum(bitmap: &[u8], sums: &[u8]) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(bitmap);
        h.update(sums);
        h.digest()
    }

    fn present(&self, page: usize) -> bool {
        self.bitmap[page / 64].load(Ordering::Relaxed) >> (page % 64) & 1 == 1
    }
}

/// Read and verify the header and tables of a save at `offset` for region `m`.
fn read_tables(m: &Mapping, fd: BorrowedFd<'_>, offset: u64, ctl: &Control<'_>) -> Result<(Tables, u64)> {
    let lay = Layout::new(m.page_size(), m.pages());
    let bad = |what: String| Error::Corrupt(format!("mapped-ram save at offset {offset}: {what}"));
    let mut h = [0u8; HEADER];
    let got = pread_full(fd, &mut h, offset, ctl, &|| {
        format!("pread(mapped-ram header at {offset})")
    })?;
    if got < HEADER {
        return Err(bad(format!("truncated: only {got} of {HEADER} header bytes")));
    }
    if &h[..8] != MAGIC {
        return Err(bad("no mapped-ram header (bad magic)".into()));
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    if checksum(&h[..56]) != u64_at(56) {
        return Err(bad("header checksum mismatch".into()));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(format!("unsupported version {version} (expected {VERSION})")));
    }
    let (ps, pages) = (u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")), u64_at(16));
    if ps as usize != m.page_size() || pages != m.pages() as u64 {
        return Err(bad(format!(
            "the save holds {pages} pages of {ps} bytes; this region has {} pages of {} bytes",
            m.pages(),
            m.page_size()
        )));
    }
    if lay.encode(u64_at(48))[..56] != h[..56] {
        return Err(bad("table offsets do not match the layout for this region".into()));
    }
    let mut bitmap = vec![0u8; m.pages().div_ceil(64) * 8];
    let mut sums = vec![0u8; m.pages() * 8];
    for (buf, at, what) in [(&mut bitmap, lay.bitmap, "bitmap"), (&mut sums, lay.sums, "page sums")] {
        let got = pread_full(fd, buf, offset + at, ctl, &|| format!("pread(mapped-ram {what})"))?;
        if got < buf.len() {
            return Err(bad(format!("truncated {what}: {got} of {} bytes", buf.len())));
        }
    }
    if Tables::checksum(&bitmap, &sums) != u64_at(48) {
        return Err(bad("bitmap or page sums corrupt (table checksum mismatch)".into()));
    }
    let words = |b: &[u8]| -> Vec<u64> {
        b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect()
    };
    let tables = Tables {
        bitmap: words(&bitmap).into_iter().map(AtomicU64::new).collect(),
        sums: words(&sums),
    };
    if (0..m.pages()).any(|p| !tables.present(p) && tables.sums[p] != 0) {
        return Err(bad("a zero page has a page sum".into()));
    }
    Ok((tables, (HEADER + bitmap.len() + sums.len()) as u64))
}

/// Punch a hole in the file (the range then reads as zeros).
fn punch(fd: BorrowedFd<'_>, off: u64, len: u64) -> Result<()> {
    rustix::fs::fallocate(fd, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, off, len).map_err(|e| match e {
        rustix::io::Errno::OPNOTSUPP => Error::Unsupported {
            feature: "fallocate(FALLOC_FL_PUNCH_HOLE) on the save file",
            errno: e.into(),
        },
        e => Error::os(format!("fallocate(PUNCH_HOLE, {off}+{len})"), e),
    })
}

/// Split `0..windows` into `threads` contiguous ranges of windows.
fn split(windows: usize, threads: usize) -> (usize, usize) {
    let per = windows.div_ceil(threads.clamp(1, windows.max(1))).max(1);
    (windows.div_ceil(per).max(1), per)
}

/// Save the selected pages of `m` (all if `dirty` is `None`) into the file
/// `fd` at `offset`, with `threads` threads (0 or 1 = the calling thread).
///
/// Without `dirty` the file gets a new header and tables and every page;
/// with `dirty`, an existing save at `offset` (of the same region) is updated
/// in place for those pages only. `holes` is the region's memfd, to skip
/// holes as zero pages without touching them.
pub fn save_mapped(
    m: &Mapping,
    holes: Option<BorrowedFd<'_>>,
    fd: BorrowedFd<'_>,
    offset: u64,
    dirty: Option<&[u64]>,
    threads: usize,
    ctl: &Control<'_>,
) -> Result<Stats> {
    let start = Instant::now();
    check_offset(m, offset)?;
    let (ps, pages, win) = (m.page_size(), m.pages(), window_pages(m.page_size()));
    let lay = Layout::new(ps, pages);
    let sel = Selection::new(dirty, pages)?;
    let tables = if dirty.is_some() {
        read_tables(m, fd, offset, ctl)?.0
    } else {
        let size = rustix::fs::fstat(fd)
            .map_err(|e| Error::os("fstat(save file)", e))?
            .st_size as u64;
        if size > offset + lay.data {
            // Old contents of a reused file would show through zero pages when mapped.
            punch(
                fd,
                offset + lay.data,
                (size - offset - lay.data).min(lay.total - lay.data),
            )?;
        }
        if size < offset + lay.total {
            rustix::fs::ftruncate(fd, offset + lay.total)
                .map_err(|e| Error::os(format!("ftruncate(save file, {})", offset + lay.total), e))?;
        }
        Tables {
            bitmap: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            sums: vec![0; pages],
        }
    };
    let (threads, per) = split(pages.div_ceil(win), threads);
    let old = &tables;
    let mut sums_new = old.sums.clone();
    let sums_parts: Vec<Mutex<&mut [u64]>> = sums_new.chunks_mut(per * win).map(Mutex::new).collect();
    let mut stats = parallel(threads, |t| {
        let mut sums = sums_parts[t]
            .lock()
            .map_err(|_| Error::Busy("page sums lock poisoned".into()))?;
        let mut holes = Holes::new(holes);
        let mut buf = vec![0u8; win * ps];
        let mut local = Stats::default();
        for w in t * per..((t + 1) * per).min(pages.div_ceil(win)) {
            let (first, span) = (w * win, win.min(pages - w * win));
            let sent = sel.window(first, span);
            if sent == [0; 4] {
                continue;
            }
            let mut zero = [0u64; 4];
            for i in (0..span).filter(|&i| bit(&sent, i)) {
                let page = first + i;
                let dst = &mut buf[i * ps..(i + 1) * ps];
                let sum = &mut sums[page - t * per * win];
                if fetch(m, &mut holes, page, dst)? {
                    *sum = checksum(dst);
                } else {
                    set_bit(&mut zero, i);
                    *sum = 0;
                }
            }
            let data_at = |i: usize| offset + lay.data + ((first + i) * ps) as u64;
            for (s, n) in runs(span, |i| bit(&sent, i) && !bit(&zero, i)) {
                pwrite_all(fd, &buf[s * ps..(s + n) * ps], data_at(s), ctl, &|| {
                    format!("pwrite(save file, pages {}..{})", first + s, first + s + n)
                })?;
            }
            for (s, n) in runs(span, |i| bit(&zero, i) && old.present(first + i)) {
                punch(fd, data_at(s), (n * ps) as u64)?;
            }
            for i in (0..span).filter(|&i| bit(&sent, i)) {
                let (page, mask) = (first + i, 1u64 << ((first + i) % 64));
                if bit(&zero, i) {
                    old.bitmap[page / 64].fetch_and(!mask, Ordering::Relaxed);
                } else {
                    old.bitmap[page / 64].fetch_or(mask, Ordering::Relaxed);
                }
            }
            let data = count(&sent) - count(&zero);
            ctl.count(&mut local, data * ps as u64, count(&sent), count(&zero), 1);
        }
        Ok(local)
    })?;
    drop(sums_parts);
    let tables = Tables {
        bitmap: tables.bitmap,
        sums: sums_new,
    };
    let (bitmap, sums) = tables.bytes();
    pwrite_all(fd, &bitmap, offset + lay.bitmap, ctl, &|| {
        "pwrite(save file bitmap)".into()
    })?;
    pwrite_all(fd, &sums, offset + lay.sums, ctl, &|| {
        "pwrite(save file page sums)".into()
    })?;
    let header = lay.encode(Tables::checksum(&bitmap, &sums));
    pwrite_all(fd, &header, offset, ctl, &|| "pwrite(save file header)".into())?;
    let meta = (HEADER + bitmap.len() + sums.len()) as u64;
    ctl.count(&mut stats, meta, 0, 0, 0);
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

/// Load a save made by [`save_mapped`] at `offset` of `fd` into `m`, with
/// `threads` threads; every page is verified against its sum before it is
/// copied in, and zero pages are zeroed.
pub fn load_mapped(m: &Mapping, fd: BorrowedFd<'_>, offset: u64, threads: usize, ctl: &Control<'_>) -> Result<Stats> {
    let start = Instant::now();
    check_offset(m, offset)?;
    let (ps, pages, win) = (m.page_size(), m.pages(), window_pages(m.page_size()));
    let lay = Layout::new(ps, pages);
    let (tables, meta) = read_tables(m, fd, offset, ctl)?;
    let (threads, per) = split(pages.div_ceil(win), threads);
    let mut stats = parallel(threads, |t| {
        let mut buf = vec![0u8; win * ps];
        let mut local = Stats::default();
        for w in t * per..((t + 1) * per).min(pages.div_ceil(win)) {
            let (first, span) = (w * win, win.min(pages - w * win));
            let present = |i: usize| tables.present(first + i);
            for (s, n) in runs(span, present) {
                let (off, len) = (offset + lay.data + ((first + s) * ps) as u64, n * ps);
                let what = || format!("pread(save file, pages {}..{})", first + s, first + s + n);
                let got = pread_full(fd, &mut buf[s * ps..s * ps + len], off, ctl, &what)?;
                if got < len {
                    return Err(Error::Corrupt(format!(
                        "mapped-ram save at offset {offset}: truncated: the file ends inside page {}",
                        first + s + got / ps
                    )));
                }
                for i in s..s + n {
                    let sum = checksum(&buf[i * ps..(i + 1) * ps]);
                    if sum != tables.sums[first + i] {
                        return Err(Error::Corrupt(format!(
                            "mapped-ram save at offset {offset}: page {} checksum mismatch",
                            first + i
                        )));
                    }
                }
            }
            for (s, n) in runs(span, present) {
                copy_in(m, first + s, &buf[s * ps..(s + n) * ps]);
            }
            for (s, n) in runs(span, |i| !present(i)) {
                zero_pages(m, first + s, n)?;
            }
            let data = (0..span).filter(|&i| present(i)).count() as u64;
            ctl.count(&mut local, data * ps as u64, span as u64, span as u64 - data, 1);
        }
        Ok(local)
    })?;
    ctl.count(&mut stats, meta, 0, 0, 0);
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::{CreateOptions, Region};
    use std::os::fd::AsFd;

    #[test]
    fn layout_is_page_aligned() {
        let l = Layout::new(4096, 1000);
        assert_eq!((l.bitmap, l.sums, l.data), (4096, 8192, 8192 + 8192));
        assert_eq!(l.total, 16384 + 1000 * 4096);
        assert_eq!(mapped_file_size(1000 * 4096, 4096).unwrap(), l.total);
        assert!(mapped_file_size(1000, 4096).is_err());
    }

    #[test]
    fn save_load_incremental() {
        let opts = CreateOptions::default();
        let (src, dst) = (
            Region::create("s", 300 * 4096, &opts).unwrap(),
            Region::create("d", 300 * 4096, &opts).unwrap(),
        );
        let file = Region::create("file", 4096, &CreateOptions { seal: false, ..opts }).unwrap();
        let (sm, dm) = (src.mapping(), dst.mapping());
        sm.write(5 * 4096, &[1; 4096]).unwrap();
        sm.write(299 * 4096, &[2; 10]).unwrap();
        let ctl = Control::default();
        let s = save_mapped(&sm, Some(src.fd()), file.fd(), 4096, None, 2, &ctl).unwrap();
        assert_eq!((s.pages, s.zero_pages), (300, 298));
        // Incremental: page 5 becomes zero, page 7 gets data.
        sm.write(5 * 4096, &[0; 4096]).unwrap();
        sm.write(7 * 4096, &[3; 4096]).unwrap();
        let mut dirty = [0u64; 5];
        dirty[0] = 1 << 5 | 1 << 7;
        let s = save_mapped(&sm, None, file.fd(), 4096, Some(&dirty), 1, &ctl).unwrap();
        assert_eq!((s.pages, s.zero_pages), (2, 1));
        dm.write(5 * 4096, &[9; 4096]).unwrap();
        let l = load_mapped(&dm, file.fd().as_fd(), 4096, 3, &ctl).unwrap();
        assert_eq!((l.pages, l.zero_pages), (300, 298));
        let (mut a, mut b) = (vec![0u8; 300 * 4096], vec![0u8; 300 * 4096]);
        sm.read(0, &mut a).unwrap();
        dm.read(0, &mut b).unwrap();
        assert!(a == b);
    }
}
