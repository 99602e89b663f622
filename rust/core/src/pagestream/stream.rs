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
use std::sync::mpsc;
use std::time::Instant;

use super::io::{Limiter, Prealloc, read_full, write_all};
use super::{
    Control, checksum, Holes, Selection, Stats, bit, copy_in, count, fetch, parallel, runs, set_bit, window_pages, zero_pages,
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
    let sum = checksum(&buf[..end]);
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

/// A sealed frame on its way to a channel's writer thread.
struct Out {
    buf: Vec<u8>,
    len: usize,
    pages: u64,
    zero: u64,
    chunks: u64,
    what: String,
}

/// Send one channel: a producer thread fills and seals frames while this
/// thread writes the previous one (two buffers rotate between them; more
/// buffers, and writing several ready frames in one `writev`, measured no
/// faster to a file: they only cost cache).
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
    let fd = fds[ch];
    let (full_tx, full_rx) = mpsc::sync_channel::<Out>(1);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..2 {
        free_tx
            .send(vec![0u8; HEADER + window_pages(m.page_size()) * m.page_size() + SUM])
            .expect("receiver is here");
    }
    std::thread::scope(|s| {
        let producer = s.spawn(move || produce(m, holes, fds.len(), ch, sel, failed, &free_rx, full_tx));
        // Writing stays on this thread: for channel 0 that is the caller's, where
        // a signal interrupts a blocked write and the caller's hook can abort.
        let written = (|| {
            let mut local = Stats::default();
            let mut prealloc = Prealloc::new(fd);
            for out in &full_rx {
                prealloc.ahead(out.len as u64);
                write_all(fd, &out.buf[..out.len], ctl, &|| {
                    format!("page stream channel {ch}: sending {}", out.what)
                })?;
                ctl.count(&mut local, out.len as u64, out.pages, out.zero, out.chunks);
                limiter.pace(out.len as u64, ctl)?;
                // The producer may have stopped already; then the buffer is just dropped.
                let _ = free_tx.send(out.buf);
            }
            Ok(local)
        })();
        // Unblock a producer waiting for a buffer or a free slot.
        drop((full_rx, free_tx));
        let produced = producer.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        // A writer error explains why the producer stopped early: report it first.
        let local = written?;
        produced?;
        Ok(local)
    })
}

/// Fill and seal the frames of channel `ch` and hand them to its writer;
/// returns early (`Ok`) if the writer has stopped; it reports its own error.
#[allow(clippy::too_many_arguments)]
fn produce(
    m: &Mapping,
    holes: Option<BorrowedFd<'_>>,
    channels: usize,
    ch: usize,
    sel: Selection<'_>,
    failed: &AtomicBool,
    free: &mpsc::Receiver<Vec<u8>>,
    full: mpsc::SyncSender<Out>,
) -> Result<()> {
    let (ps, pages, win) = (m.page_size(), m.pages(), window_pages(m.page_size()));
    let mut holes = Holes::new(holes);
    let (mut chunks, mut sent_pages, mut zero_pages) = (0u64, 0u64, 0u64);
    let ship = |buf: Vec<u8>, len: usize, pages: u64, zero: u64, chunks: u64, what: String| {
        full.send(Out {
            buf,
            len,
            pages,
            zero,
            chunks,
            what,
        })
        .is_ok()
    };
    let Ok(mut buf) = free.recv() else { return Ok(()) };
    let start = Frame {
        kind: KIND_START,
        a: pages as u64,
        b: u32::try_from(ps).map_err(|_| Error::InvalidArgument(format!("page size {ps} too large")))?,
        c: VERSION,
        sent: [ch as u64, channels as u64, win as u64, 0],
        zero: [0; 4],
    };
    let n = seal(&mut buf, &start, 0);
    if !ship(buf, n, 0, 0, 0, "the start frame".into()) {
        return Ok(());
    }
    for w in (ch..pages.div_ceil(win)).step_by(channels) {
        if failed.load(Ordering::Relaxed) {
            // Another channel failed and reports why; this one just stops.
            return Ok(());
        }
        let (first, span) = (w * win, win.min(pages - w * win));
        let sent = sel.window(first, span);
        if sent == [0; 4] {
            continue;
        }
        let Ok(mut buf) = free.recv() else { return Ok(()) };
        let mut zero = [0u64; 4];
        let mut data = 0;
        for i in (0..span).filter(|&i| bit(&sent, i)) {
            if fetch(
                m,
                &mut holes,
                first + i,
                &mut buf[HEADER + data * ps..HEADER + (data + 1) * ps],
            )? {
                data += 1;
            } else {
                set_bit(&mut zero, i);
            }
        }
        let frame = Frame {
            kind: KIND_CHUNK,
            a: first as u64,
            b: span as u32,
            c: data as u32,
            sent,
            zero,
        };
        let n = seal(&mut buf, &frame, data * ps);
        let what = format!("chunk {chunks} (pages {first}..{})", first + span);
        if !ship(buf, n, count(&sent), count(&zero), 1, what) {
            return Ok(());
        }
        (chunks, sent_pages, zero_pages) = (chunks + 1, sent_pages + count(&sent), zero_pages + count(&zero));
    }
    let Ok(mut buf) = free.recv() else { return Ok(()) };
    let end = Frame {
        kind: KIND_END,
        a: chunks,
        sent: [sent_pages, zero_pages, 0, 0],
        ..Frame::default()
    };
    let n = seal(&mut buf, &end, 0);
    ship(buf, n, 0, 0, 0, "the end frame".into());
    Ok(())
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
            return Err(err(
                nframe,
                format!("truncated: the stream ended after {got} of {HEADER} header bytes (no end marker)"),
            ));
        }
        let f = Frame::decode(&buf[..HEADER]).ok_or_else(|| {
            err(
                nframe,
                format!(
                    "bad magic {:#010x} (expected {MAGIC:#010x})",
                    u32::from_le_bytes(buf[..4].try_into().expect("4"))
                ),
            )
        })?;
        let expected_kind = if nframe == 0 {
            "a start frame"
        } else {
            "a chunk or end frame"
        };
        let data = match f.kind {
            KIND_START if nframe == 0 => 0,
            KIND_CHUNK | KIND_END if nframe > 0 => {
                if f.kind == KIND_CHUNK {
                    check_chunk(&f, pages, win).map_err(|e| err(nframe, e))?
                } else {
                    0
                }
            }
            k => {
                return Err(err(
                    nframe,
                    format!("unexpected frame kind {k} (expected {expected_kind})"),
                ));
            }
        };
        let len = HEADER + data * ps + SUM;
        let got = read_full(fd, &mut buf[HEADER..len], ctl, &op)?;
        if got < len - HEADER {
            return Err(err(
                nframe,
                format!(
                    "truncated: the stream ended after {got} of {} bytes of data and checksum",
                    len - HEADER
                ),
            ));
        }
        let sum = u64::from_le_bytes(buf[len - SUM..len].try_into().expect("8 bytes"));
        let want = checksum(&buf[..len - SUM]);
        if sum != want {
            return Err(err(
                nframe,
                format!("checksum mismatch (frame says {sum:#018x}, contents hash to {want:#018x})"),
            ));
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
                    return Err(err(
                        nframe - 1,
                        format!(
                            "end marker says {chunks} chunks, {sent_pages} pages, {zero} zero pages; \
                         received {} chunks, {} pages, {} zero pages",
                            local.chunks, local.pages, local.zero_pages
                        ),
                    ));
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
            f.a,
            f.b,
            m.pages(),
            m.page_size()
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
        return Err(format!(
            "bad chunk: first page {} span {span} (windows are {win} pages)",
            f.a
        ));
    }
    if f.a.checked_add(span as u64).is_none_or(|end| end > pages as u64) {
        return Err(format!(
            "chunk pages {}+{span} lie outside the region of {pages} pages",
            f.a
        ));
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
        assert_eq!(
            (s.pages, s.zero_pages, s.chunks, s.bytes),
            (r.pages, r.zero_pages, r.chunks, r.bytes)
        );
        assert_eq!((s.pages, s.zero_pages), (1000, 666));
        let (mut a, mut b) = (vec![0u8; 1000 * 4096], vec![0u8; 1000 * 4096]);
        sm.read(0, &mut a).unwrap();
        dm.read(0, &mut b).unwrap();
        assert!(a == b);
    }

    #[test]
    fn roundtrip_through_a_file_after_existing_bytes_leaves_nothing_preallocated() {
        use super::super::io::tests::{allocated, tmpfile};
        let (src, dst) = (region(3000), region(3000));
        let sm = src.mapping();
        for p in (0..3000).filter(|p| p % 5 != 0) {
            sm.write(p * 4096, &[(p % 251) as u8 + 1; 4096]).unwrap();
        }
        let f = tmpfile();
        rustix::io::write(&f, b"prefix").unwrap();
        let ctl = Control::default();
        let st = send(&sm, Some(src.fd()), &[f.as_fd()], None, 0, &ctl).unwrap();
        let size = rustix::fs::fstat(&f).unwrap().st_size as u64;
        assert_eq!(size, 6 + st.bytes);
        // Exactly what was written was preallocated: no blocks past the end
        // (a little slack for extent-tree blocks; a stray frame would be 1 MiB).
        let slack = 64 << 10;
        assert!(allocated(f.as_fd()) <= size.next_multiple_of(4096) + slack, "{} allocated", allocated(f.as_fd()));
        rustix::fs::seek(&f, rustix::fs::SeekFrom::Start(6)).unwrap();
        let r = recv(&dst.mapping(), &[f.as_fd()], &ctl).unwrap();
        assert_eq!((r.pages, r.zero_pages, r.bytes), (3000, 600, st.bytes));
        let (mut a, mut b) = (vec![0u8; 3000 * 4096], vec![0u8; 3000 * 4096]);
        sm.read(0, &mut a).unwrap();
        dst.mapping().read(0, &mut b).unwrap();
        assert!(a == b);
    }

    #[test]
    fn frame_roundtrip_and_checks() {
        let f = Frame {
            kind: KIND_CHUNK,
            a: 256,
            b: 256,
            c: 1,
            sent: [3, 0, 0, 0],
            zero: [1, 0, 0, 0],
        };
        let mut b = [0u8; HEADER];
        f.encode(&mut b);
        assert_eq!(Frame::decode(&b), Some(f));
        assert_eq!(check_chunk(&f, 512, 256), Ok(1));
        assert!(check_chunk(&f, 511, 256).is_err());
        assert!(check_chunk(&Frame { b: 1 << 31, ..f }, 512, 256).is_err());
        assert!(check_chunk(&Frame { a: u64::MAX - 255, ..f }, 512, 256).is_err());
        assert!(check_chunk(&Frame { c: 2, ..f }, 512, 256).is_err());
        assert!(
            check_chunk(
                &Frame {
                    zero: [4, 0, 0, 0],
                    ..f
                },
                512,
                256
            )
            .is_err()
        );
    }
}
