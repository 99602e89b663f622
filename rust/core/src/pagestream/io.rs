//! Blocking fd I/O for page transfers: whole-buffer reads and writes that
//! retry short transfers, wait on non-blocking fds, and give the caller a
//! chance to abort when a signal interrupts them; and the bandwidth limiter.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use super::Control;
use crate::error::{Error, Result};

/// Handle an errno that means "try again": `Ok(())` to retry, else the error.
fn retry(fd: BorrowedFd<'_>, e: Errno, out: bool, ctl: &Control<'_>, op: &dyn Fn() -> String) -> Result<()> {
    match e {
        Errno::INTR if ctl.interrupted() => Err(Error::os(op(), e)),
        Errno::INTR => Ok(()),
        Errno::AGAIN => {
            let flags = if out { PollFlags::OUT } else { PollFlags::IN };
            let timeout = Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            match rustix::event::poll(&mut [PollFd::new(&fd, flags)], Some(&timeout)) {
                Ok(_) => Ok(()),
                Err(e) => retry(fd, e, out, ctl, op),
            }
        }
        _ => Err(Error::os(op(), e)),
    }
}

/// Write all of `buf` to a stream fd (socket, pipe or file at its position).
///
/// A signal that arrives after part of a blocking write was done makes the
/// write return short instead of failing with `EINTR`; a short write that
/// blocked for a while therefore also asks `ctl` whether to abort.
pub(super) fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8], ctl: &Control<'_>, op: &dyn Fn() -> String) -> Result<()> {
    const LONG_BLOCK: Duration = Duration::from_millis(20);
    while !buf.is_empty() {
        let t = Instant::now();
        match rustix::io::write(fd, buf) {
            Ok(0) => return Err(Error::PeerClosed(op())),
            Ok(n) => {
                buf = &buf[n..];
                if !buf.is_empty() && t.elapsed() >= LONG_BLOCK && ctl.interrupted() {
                    return Err(Error::os(op(), Errno::INTR));
                }
            }
            Err(Errno::PIPE | Errno::CONNRESET) => return Err(Error::PeerClosed(op())),
            Err(e) => retry(fd, e, true, ctl, op)?,
        }
    }
    Ok(())
}

/// Fill `buf` from a stream fd; returns how many bytes arrived before end of
/// file (less than `buf.len()` only if the peer closed; a reset counts as closed).
pub(super) fn read_full(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    ctl: &Control<'_>,
    op: &dyn Fn() -> String,
) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(fd, &mut buf[got..]) {
            Ok(0) | Err(Errno::CONNRESET) => break,
            Ok(n) => got += n,
            Err(e) => retry(fd, e, false, ctl, op)?,
        }
    }
    Ok(got)
}

/// `pwrite` all of `buf` at `off`.
pub(super) fn pwrite_all(
    fd: BorrowedFd<'_>,
    mut buf: &[u8],
    mut off: u64,
    ctl: &Control<'_>,
    op: &dyn Fn() -> String,
) -> Result<()> {
    while !buf.is_empty() {
        match rustix::io::pwrite(fd, buf, off) {
            Ok(0) => return Err(Error::os(op(), Errno::NOSPC)),
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(e) => retry(fd, e, true, ctl, op)?,
        }
    }
    Ok(())
}

/// `pread` into all of `buf` from `off`; returns the bytes read before end of file.
pub(super) fn pread_full(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    off: u64,
    ctl: &Control<'_>,
    op: &dyn Fn() -> String,
) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::pread(fd, &mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => retry(fd, e, false, ctl, op)?,
        }
    }
    Ok(got)
}

/// Paces writers (all channels together) to `rate` bytes per second: after
/// `n` bytes in total, nobody continues before `start + n / rate`.
#[derive(Debug)]
pub(super) struct Limiter {
    rate: u64,
    start: Instant,
    total: AtomicU64,
}

impl Limiter {
    /// A limiter for `rate` bytes/s; 0 means unlimited.
    pub(super) fn new(rate: u64) -> Self {
        Self {
            rate,
            start: Instant::now(),
            total: AtomicU64::new(0),
        }
    }

    /// Account for `bytes` just written and sleep until they are within budget.
    pub(super) fn pace(&self, bytes: u64, ctl: &Control<'_>) -> Result<()> {
        if self.rate == 0 {
            return Ok(());
        }
        let total = self.total.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let due = self.start + Duration::from_secs_f64(total as f64 / self.rate as f64);
        loop {
            let now = Instant::now();
            if now >= due {
                return Ok(());
            }
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            if ctl.interrupted() {
                return Err(Error::os("bandwidth limiter sleep", Errno::INTR));
            }
        }
    }
}
