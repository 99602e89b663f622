//! The page stream: pages of a region over one or more stream fds.
//!
//! Each channel carries one self-contained section of frames. A frame is an
//! 88-byte little-endian header, then (chunks only) the non-zero pages' data,
//! then an xxh3-64 checksum of header and data:
//!
//! ```text
//! header: magic u32 "CPGS" | kind u32 | a u64 | b u32 | c u32 | sent [u64;4] | zero [u64;4]
//! START  a = region pages, b = page size, c = version; sent[0] = channel, sent[1] = channels,
//!        sent[2] = pages per window
//! CHUNK  a = first page, b = span (pages in the window), c = data pages;
//!        sent = pages carried, zero = those carried as zero pages (no data)
//! END    a = chunks, sent[0] = pages, sent[1] = zero pages
//! ```
//!
//! Window `w` (pages `[w*W, (w+1)*W)`) travels on channel `w % channels`, so
//! the channels carry disjoint pages and can be applied in parallel.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64;

use super::io::{Limiter, read_full, write_all};
use super::{
    Control, Holes, Selection, Stats, bit, copy_in, copy_out, count, is_zero, parallel, runs, set_bit, window_pages,
    zero_pages,
};
use crate::error::{Error, Result};
use crate::memfd::Mapping;

const MAGIC: u32 = u32::from_le_bytes(*b"CPGS");
const VERSION: u32 = 1;
const KIND_START: u32 = 1;
const KIND_CHUNK: u32 = 2;
const KIND_END: u32 = 3;
const HEADER: usize = 88;
const SUM: usize = 8;

/// One frame header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Frame {
    kind: u32,
    a: u64,
    b: u32,
    c: u32,
    sent: [u64; 4],
    zero: [u64; 4],
}

impl Frame {
    fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..16].copy_from_slice(&self.a.to_le_bytes());
        out[16..20].copy_from_slice(&self.b.to_le_bytes());
        out[20..24].copy_from_slice(&self.c.to_le_bytes());
        for (i, w) in self.sent.iter().chain(&self.zero).enumerate() {
            out[24 + 8 * i..32 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
    }

    /// Decode a header; `None` if the magic is wrong.
    fn decode(b: &[u8]) -> Option<Self> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        (u32_at(0) == MAGIC).then(|| Self {
            kind: u32_at(4),
            a: u64_at(8),
            b: u32_at(16),
            c: u32_at(20),
            sent: [0, 1, 2, 3].map(|i| u64_at(24 + 8 * i)),
            zero: [4, 5, 6, 7].map(|i| u64_at(24 + 8 * i)),
        })
    }
}

/// Encode `frame` at the start of `buf`, append the checksum over header and
/// the `data` bytes already after it, and return the frame's total length.
fn seal(buf: &mut [u8], frame: &Frame, data: usize) -> usize {
    frame.encode(&mut buf[..HEADER]);
    let end = HEADER + data;
    let sum = xxh3_64(&buf[..end]);
    buf[end..end + SUM].copy_from_slice(&sum.to_le_bytes());
    end + SUM
}

/// Send the selected pages of `m` (all if `dirty` is `None`) over `fds`.
///
/// `holes` is the region's memfd, opened for reading, to skip holes as zero
/// pages without touching them; `bandwidth` limits all channels together in
/// bytes per second (0 = unlimited).
pub fn send(
    m: &Mapping,
    holes: Option<BorrowedFd<'_>>,
    fds: &[BorrowedFd<'_>],
    dirty: Option<&[u64]>,
    bandwidth: u64,
    ctl: &Control<'_>,
) -> Result<Stats> {
    let start = Instant::now();
    if fds.is_empty() {
        return Err(Error::InvalidArgument("send needs at least one fd".into()));
    }
    let sel = Selection::new(dirty, m.pages())?;
    let limiter = Limiter::new(bandwidth);
    let failed = AtomicBool::new(false);
    let mut stats = parallel(fds.len(), |ch| {
        let r = send_channel(m, holes, fds, ch, sel, &limiter, &failed, ctl);
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        r
    })?;
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

#[allow(clippy::too_many_arguments)]
fn send_channel(
    m: &Mapping,
    holes: Option<BorrowedFd<'_>>,
    fds: &[BorrowedFd<'_>],
    ch: usize,
    sel: Selection<'_>,
    limiter: &Limiter,
    failed: &AtomicBool,
    ctl: &Control<'_>,
) -> Result<Stats> {
    let (ps, pages, win) = (m.page_size(), m.pages(), window_pages(m.page_size()));
    let fd = fds[ch];
    let mut holes = Holes::new(holes);
    let mut buf = vec![0u8; HEADER + win * ps + SUM];
    let mut local = Stats::default();
    let emit = |buf: &[u8], what: &str, local: &mut Stats, pages: u64, zero: u64, chunks: u64| -> Result<()> {
        write_all(fd, buf, ctl, &|| format!("page stream channel {ch}: sending {what}"))?;
        ctl.count(local, buf.len() as u64, pages, zero, chunks);
        limiter.pace(buf.len() as u64, ctl)
    };
    let start = Frame {
        kind: KIND_START,
        a: pages as u64,
        b: u32::try_from(ps).map_err(|_| Error::InvalidArgument(format!("page size {ps} too large")))?,
        c: VERSION,
        sent: [ch as u64, fds.len() as u64, win as u64, 0],
        zero: [0; 4],
    };
    let n = seal(&mut buf, &start, 0);
    emit(&buf[..n], "the start frame", &mut local, 0, 0, 0)?;
    for w in (ch..pages.div_ceil(win)).step_by(fds.len()) {
        if failed.load(Ordering::Relaxed) {
            return Err(Error::Corrupt(format!("page stream channel {ch}: stopped because another channel failed")));
        }
        let (first, span) = (w * win, win.min(pages - w * win));
        let sent = sel.window(first, span);
        if sent == [0; 4] {
            continue;
        }
        let mut zero = [0u64; 4];
        let mut data = 0;
        for i in (0..span).filter(|&i| bit(&sent, i)) {
            let page = first + i;
            if holes.is_hole((page * ps) as u64)? {
                set_bit(&mut zero, i);
                continue;
            }
            let dst = &mut buf[HEADER + data * ps..HEADER + (data + 1) * ps];
            copy_out(m, page, dst);
            if is_zero(dst) {
                set_bit(&mut zero, i);
            } else {
                data += 1;
            }
        }
        let frame = Frame { kind: KIND_CHUNK, a: first as u64, b: span as u32, c: data as u32, sent, zero };
        let n = seal(&mut buf, &frame, data * ps);
        emit(&buf[..n], &format!("chunk {} (pages {first}..{})", local.chunks, first + span), &mut local, count(&sent), count(&zero), 1)?;
    }
    let end = Frame {
        kind: KIND_END,
        a: local.chunks,
        sent: [local.pages, local.zero_pages, 0, 0],
        ..Frame::default()
    };
    let n = seal(&mut buf, &end, 0);
    emit(&buf[..n], "the end frame", &mut local, 0, 0, 0)?;
    Ok(local)
}

/// Receive a stream sent by [`send`] over the same number of `fds` into `m`,
/// verifying every frame before applying it.
pub fn recv(m: &Mapping, fds: &[BorrowedFd<'_>], ctl: &Control<'_>) -> Result<Stats> {
    let start = Instant::now();
    if fds.is_empty() {
        return Err(Error::InvalidArgument("recv needs at least one fd".into()));
    }
    let mut stats = parallel(fds.len(), |ch| recv_channel(m, fds, ch, ctl))?;
    stats.seconds = start.elapsed().as_secs_f64();
    Ok(stats)
}

fn recv_channel(m: &Mapping, fds: &[BorrowedFd<'_>], ch: usize, ctl: &Control<'_>) -> Result<Stats> {
    let (ps, pages, win) = (m.page_size(), m.pages(), window_pages(m.page_size()));
    let fd = fds[ch];
    let mut buf = vec![0u8; HEADER + win * ps + SUM];
    let mut local = Stats::default();
    // Frame number within this channel (0 = start frame), for messages.
    let mut nframe = 0u64;
    let err = |nframe: u64, what: String| Error::Corrupt(format!("page stream channel {ch}, frame {nframe}: {what}"));
    loop {
        let op = || format!("page stream channel {ch}: receiving frame {nframe}");
        let got = read_full(fd, &mut buf[..HEADER], ctl, &op)?;
        if got < HEADER {
            return Err(err(nframe, format!("truncated: the stream ended after {got} of {HEADER} header bytes (no end marker)")));
        }
        let f = Frame::decode(&buf[..HEADER]).ok_or_else(|| {
            err(nframe, format!("bad magic {:#010x} (expected {MAGIC:#010x})", u32::from_le_bytes(buf[..4].try_into().expect("4"))))
        })?;
        let expected_kind = if nframe == 0 { "a start frame" } else { "a chunk or end frame" };
        let data = match f.kind {
            KIND_START if nframe == 0 => 0,
            KIND_CHUNK | KIND_END if nframe > 0 => {
                if f.kind == KIND_CHUNK { check_chunk(&f, pages, win).map_err(|e| err(nframe, e))? } else { 0 }
            }
            k => return Err(err(nframe, format!("unexpected frame kind {k} (expected {expected_kind})"))),
        };
        let len = HEADER + data * ps + SUM;
        let got = read_full(fd, &mut buf[HEADER..len], ctl, &op)?;
        if got < len - HEADER {
            return Err(err(nframe, format!("truncated: the stream ended after {got} of {} bytes of data and checksum", len - HEADER)));
        }
        let sum = u64::from_le_bytes(buf[len - SUM..len].try_into().expect("8 bytes"));
        let want = xxh3_64(&buf[..len - SUM]);
        if sum != want {
            return Err(err(nframe, format!("checksum mismatch (frame says {sum:#018x}, contents hash to {want:#018x})")));
        }
        nframe += 1;
        match f.kind {
            KIND_START => check_start(&f, m, fds.len(), ch, win).map_err(|e| err(0, e))?,
            KIND_CHUNK => {
                let first = f.a as usize;
                let mut src = HEADER;
                for (s, n) in runs(f.b as usize, |i| bit(&f.sent, i) && !bit(&f.zero, i)) {
                    copy_in(m, first + s, &buf[src..src + n * ps]);
                    src += n * ps;
                }
                for (s, n) in runs(f.b as usize, |i| bit(&f.zero, i)) {
                    zero_pages(m, first + s, n)?;
                }
                ctl.count(&mut local, len as u64, count(&f.sent), count(&f.zero), 1);
                continue;
            }
            _ => {
                let (chunks, sent_pages, zero) = (f.a, f.sent[0], f.sent[1]);
                if (chunks, sent_pages, zero) != (local.chunks, local.pages, local.zero_pages) {
                    return Err(err(nframe - 1, format!(
                        "end marker says {chunks} chunks, {sent_pages} pages, {zero} zero pages; \
                         received {} chunks, {} pages, {} zero pages",
                        local.chunks, local.pages, local.zero_pages
                    )));
                }
                ctl.count(&mut local, len as u64, 0, 0, 0);
                return Ok(local);
            }
        }
        // The start frame.
        ctl.count(&mut local, len as u64, 0, 0, 0);
    }
}

/// Validate a start frame against the receiving region and channel layout.
fn check_start(f: &Frame, m: &Mapping, channels: usize, ch: usize, win: usize) -> Result<(), String> {
    if f.c != VERSION {
        return Err(format!("unsupported stream version {} (expected {VERSION})", f.c));
    }
    if f.b as usize != m.page_size() || f.a != m.pages() as u64 {
        return Err(format!(
            "the sender's region has {} pages of {} bytes; this region has {} pages of {} bytes",
            f.a, f.b, m.pages(), m.page_size()
        ));
    }
    if f.sent[..3] != [ch as u64, channels as u64, win as u64] {
        return Err(format!(
            "sender's channel {} of {} (window {}) arrived on receiver channel {ch} of {channels} (window {win})",
            f.sent[0], f.sent[1], f.sent[2]
        ));
    }
    Ok(())
}

/// Validate a chunk header before reading its data; returns its data pages.
fn check_chunk(f: &Frame, pages: usize, win: usize) -> Result<usize, String> {
    let span = f.b as usize;
    if span == 0 || span > win || f.a % win as u64 != 0 {
        return Err(format!("bad chunk: first page {} span {span} (windows are {win} pages)", f.a));
    }
    if f.a.checked_add(span as u64).is_none_or(|end| end > pages as u64) {
        return Err(format!("chunk pages {}+{span} lie outside the region of {pages} pages", f.a));
    }
    let beyond = (span..256).any(|i| bit(&f.sent, i) || bit(&f.zero, i));
    let stray_zero = f.zero.iter().zip(&f.sent).any(|(z, s)| z & !s != 0);
    if f.sent == [0; 4] || beyond || stray_zero {
        return Err(format!("bad chunk page bitmaps for pages {}+{span}", f.a));
    }
    let data = (count(&f.sent) - count(&f.zero)) as usize;
    if f.c as usize != data {
        return Err(format!("chunk says {} data pages but its bitmaps give {data}", f.c));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::{CreateOptions, Region};
    use std::os::fd::AsFd;

    fn region(pages: usize) -> Region {
        Region::create("t", pages * 4096, &CreateOptions::default()).unwrap()
    }

    #[test]
    fn roundtrip_over_a_socketpair_with_channels() {
        let (src, dst) = (region(1000), region(1000));
        let sm = src.mapping();
        for p in (0..1000).step_by(3) {
            sm.write(p * 4096 + 7, &[p as u8 | 1; 100]).unwrap();
        }
        let dm = dst.mapping();
        dm.write(4096, &[9; 4096]).unwrap(); // page 1: must be zeroed
        let pairs: Vec<_> = (0..2)
            .map(|_| {
                rustix::net::socketpair(
                    rustix::net::AddressFamily::UNIX,
                    rustix::net::SocketType::STREAM,
                    rustix::net::SocketFlags::CLOEXEC,
                    None,
                )
                .unwrap()
            })
            .collect();
        let (tx, rx): (Vec<_>, Vec<_>) = pairs.iter().map(|(a, b)| (a.as_fd(), b.as_fd())).unzip();
        let ctl = Control::default();
        let (s, r) = std::thread::scope(|s| {
            let h = s.spawn(|| recv(&dm, &rx, &ctl).unwrap());
            let st = send(&sm, Some(src.fd()), &tx, None, 0, &ctl).unwrap();
            (st, h.join().unwrap())
        });
        assert_eq!((s.pages, s.zero_pages, s.chunks, s.bytes), (r.pages, r.zero_pages, r.chunks, r.bytes));
        assert_eq!((s.pages, s.zero_pages), (1000, 666));
        let (mut a, mut b) = (vec![0u8; 1000 * 4096], vec![0u8; 1000 * 4096]);
        sm.read(0, &mut a).unwrap();
        dm.read(0, &mut b).unwrap();
        assert!(a == b);
    }

    #[test]
    fn frame_roundtrip_and_checks() {
        let f = Frame { kind: KIND_CHUNK, a: 256, b: 256, c: 1, sent: [3, 0, 0, 0], zero: [1, 0, 0, 0] };
        let mut b = [0u8; HEADER];
        f.encode(&mut b);
        assert_eq!(Frame::decode(&b), Some(f));
        assert_eq!(check_chunk(&f, 512, 256), Ok(1));
        assert!(check_chunk(&f, 511, 256).is_err());
        assert!(check_chunk(&Frame { b: 1 << 31, ..f }, 512, 256).is_err());
        assert!(check_chunk(&Frame { a: u64::MAX - 255, ..f }, 512, 256).is_err());
        assert!(check_chunk(&Frame { c: 2, ..f }, 512, 256).is_err());
        assert!(check_chunk(&Frame { zero: [4, 0, 0, 0], ..f }, 512, 256).is_err());
    }
}
