//! The external pause observer: a native thread that maps one page of a
//! guest-RAM memfd read-only and polls the guest's heartbeat (a little-endian
//! u64 the running guest keeps incrementing) with `CLOCK_MONOTONIC`
//! timestamps. The guest pause is the longest window in which the heartbeat
//! did not move.
//!
//! A stall is measured conservatively, as the smallest window sure to contain
//! it: from the last sample that still showed the value before the change that
//! began it, to the first sample that showed the change that ended it. It
//! exceeds the true stall by at most the two sampling intervals at its edges
//! (normally well under a microsecond; `max_sample_gap_ns` bounds them).
//!
//! The memfd may be ours (by fd) or any process's, reopened through
//! `/proc/PID/fd/N` (a QEMU with a memfd memory backend works the same way).
//! [`Observer::retarget`] switches to another memfd while sampling, to follow
//! a normal migration from the source's RAM to the target's: the value last
//! seen on the old mapping stays the reference, so a stall spanning the switch
//! runs from the last change seen on the old mapping to the first change seen
//! on the new one.

use std::collections::BinaryHeap;
use std::cmp::Reverse;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rustix::fs::{Mode, OFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::error::{Error, Result};
use crate::memfd::host_page_size;
use crate::sched::{Cpus, set_fifo, spawn_pinned};

/// How many of the longest stalls a report keeps individually.
pub const TOP_GAPS: usize = 64;
/// The longest pause between samples [`Observer::new`] accepts (1 ms).
pub const MAX_INTERVAL_NS: u64 = 1_000_000;
/// Number of log2 histogram buckets; bucket `i` holds gaps below `1 µs << i`.
const BUCKETS: usize = 48;

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock `time.monotonic_ns()` reads).
#[must_use]
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    // The monotonic clock is never negative.
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where the heartbeat lives: a memfd we hold, or a path to reopen (e.g. `/proc/PID/fd/N`).
#[derive(Debug)]
pub enum Target<'a> {
    /// An open fd (not taken over; only mapped).
    Fd(BorrowedFd<'a>),
    /// A path opened read-only.
    Path(&'a Path),
}

/// A read-only `MAP_SHARED` mapping of the page(s) holding one u64.
#[derive(Debug)]
struct HeartbeatMap {
    base: *mut u8,
    len: usize,
    value: *const u64,
    what: String,
}

// SAFETY: the mapping is only read with volatile loads through raw pointers;
// no Rust reference to it exists, so moving it between threads is sound.
unsafe impl Send for HeartbeatMap {}
// SAFETY: see `Send`: concurrent volatile reads of shared memory are sound.
unsafe impl Sync for HeartbeatMap {}

impl HeartbeatMap {
    fn open(target: &Target<'_>, offset: usize) -> Result<Self> {
        if offset % 8 != 0 {
            return Err(Error::InvalidArgument(format!("heartbeat offset {offset:#x} is not 8-byte aligned")));
        }
        let owned: OwnedFd;
        let (fd, what) = match target {
            Target::Fd(fd) => (*fd, format!("fd {}", fd.as_raw_fd())),
            Target::Path(path) => {
                owned = rustix::fs::open(*path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| Error::os(format!("open({})", path.display()), e))?;
                (owned.as_fd(), path.display().to_string())
            }
        };
        let st = rustix::fs::fstat(fd).map_err(|e| Error::os(format!("fstat({what})"), e))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(Error::BadFd(format!("{what} is not a regular file (a memfd) and cannot hold guest RAM")));
        }
        let size = st.st_size as u64;
        if offset as u64 + 8 > size {
            return Err(Error::InvalidArgument(format!(
                "heartbeat offset {offset:#x} is outside {what} of {size:#x} bytes"
            )));
        }
        // hugetlbfs reports its huge page size as the block size; mmap offsets
        // must be aligned to it there.
        let blk = st.st_blksize as usize;
        let align = if blk.is_power_of_two() { blk.max(host_page_size()) } else { host_page_size() };
        let map_off = offset & !(align - 1);
        let len = (offset + 8 - map_off).next_multiple_of(align);
        // SAFETY: a fresh read-only mapping at an address the kernel picks; it
        // aliases no Rust object and is read only through volatile loads.
        let base = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ, MapFlags::SHARED, fd, map_off as u64)
        }
        .map_err(|e| Error::os(format!("mmap({what}, offset {map_off:#x})"), e))?;
        let base = base.cast::<u8>();
        // SAFETY: `offset - map_off + 8 <= len`, so the pointer stays inside the mapping.
        let value = unsafe { base.add(offset - map_off) }.cast::<u64>();
        Ok(Self { base, len, value, what })
    }

    fn read(&self) -> u64 {
        // SAFETY: `value` is 8-aligned and inside a live mapping owned by `self`;
        // the guest may write it concurrently, hence a volatile load (a single
        // aligned 8-byte load on 64-bit targets, so it never tears).
        u64::from_le(unsafe { std::ptr::read_volatile(self.value) })
    }
}

impl Drop for HeartbeatMap {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` come from a successful mmap owned by this value,
        // and nothing can read through it once it is dropped.
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.len) };
    }
}

/// What an observer saw. Times are nanoseconds of `CLOCK_MONOTONIC`; `*_at_ns`
/// are relative to [`Report::started_at_ns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Absolute `CLOCK_MONOTONIC` time sampling started.
    pub started_at_ns: u64,
    /// Time from start to the end of the report (now, or the stop).
    pub duration_ns: u64,
    /// Samples taken.
    pub samples: u64,
    /// Times the heartbeat was seen to change.
    pub changes: u64,
    /// The longest window in which the heartbeat did not move (the guest pause),
    /// including a stall still open at the end of the report.
    pub max_stall_ns: u64,
    /// When that window started.
    pub max_stall_at_ns: u64,
    /// The last change happened after this time (the sample before it still
    /// showed the previous value): where a stall open now began.
    pub last_change_at_ns: u64,
    /// The heartbeat value last read.
    pub last_value: u64,
    /// The longest time between two consecutive samples: the observer's own
    /// blind spot (it was descheduled), hence its resolution.
    pub max_sample_gap_ns: u64,
    /// False if the heartbeat ever went backwards (memory was not preserved).
    pub heartbeat_monotonic: bool,
    /// Gaps between changes in log2 buckets: `(upper_bound_ns, count)`, non-empty buckets only.
    pub histogram: Vec<(u64, u64)>,
    /// The [`TOP_GAPS`] longest stalls as `(start_ns, length_ns)`, sorted by start.
    pub top_gaps: Vec<(u64, u64)>,
}

impl Report {
    /// The kept stalls longer than `threshold_ns`, as `(start_ns, length_ns)` by start.
    #[must_use]
    pub fn gaps_over(&self, threshold_ns: u64) -> Vec<(u64, u64)> {
        self.top_gaps.iter().copied().filter(|&(_, len)| len > threshold_ns).collect()
    }
}

/// The sampling thread's running totals (published under a mutex on each change).
#[derive(Debug, Clone)]
struct Stats {
    started_at: u64,
    changes: u64,
    last_change: u64,
    last_value: u64,
    max_sample_gap: u64,
    monotonic: bool,
    hist: [u64; BUCKETS],
    /// Min-heap of `(length, start)` keeping the longest gaps.
    top: BinaryHeap<Reverse<(u64, u64)>>,
}

impl Stats {
    fn new(now: u64, value: u64) -> Self {
        Self {
            started_at: now,
            changes: 0,
            last_change: now,
            last_value: value,
            max_sample_gap: 0,
            monotonic: true,
            hist: [0; BUCKETS],
            top: BinaryHeap::with_capacity(TOP_GAPS + 1),
        }
    }

    /// A change first seen at `seen`; the sample before it, at `before`, still
    /// showed the previous value, so the change happened in `(before, seen]`.
    fn record_change(&mut self, before: u64, seen: u64, value: u64) {
        if value < self.last_value {
            self.monotonic = false;
        }
        let gap = seen - self.last_change;
        let us = gap / 1000;
        let bucket = if us == 0 { 0 } else { (64 - us.leading_zeros() as usize).min(BUCKETS - 1) };
        self.hist[bucket] += 1;
        let entry = Reverse((gap, self.last_change - self.started_at));
        if self.top.len() < TOP_GAPS {
            self.top.push(entry);
        } else if self.top.peek().is_some_and(|min| entry < *min) {
            self.top.pop();
            self.top.push(entry);
        }
        self.changes += 1;
        self.last_change = before;
        self.last_value = value;
    }

    fn report(&self, end: u64, samples: u64) -> Report {
        let end = end.max(self.last_change);
        let mut gaps: Vec<(u64, u64)> = self.top.iter().map(|Reverse((len, start))| (*start, *len)).collect();
        // The stall still open at the end of the window counts too.
        let open = end - self.last_change;
        if open > 0 {
            gaps.push((self.last_change - self.started_at, open));
        }
        // Longest first (earliest on ties), keep the top, then order by start.
        gaps.sort_unstable_by_key(|&(start, len)| (Reverse(len), start));
        gaps.truncate(TOP_GAPS);
        let (max_stall_at_ns, max_stall_ns) = gaps.first().copied().unwrap_or((0, 0));
        gaps.sort_unstable();
        let histogram = self
            .hist
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (1000u64 << i, *n))
            .collect();
        Report {
            started_at_ns: self.started_at,
            duration_ns: end - self.started_at,
            samples,
            changes: self.changes,
            max_stall_ns,
            max_stall_at_ns,
            last_change_at_ns: self.last_change - self.started_at,
            last_value: self.last_value,
            max_sample_gap_ns: self.max_sample_gap,
            heartbeat_monotonic: self.monotonic,
            histogram,
            top_gaps: gaps,
        }
    }
}

/// State shared with the sampling thread.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// Set when `pending` holds a mapping to switch to.
    switch: AtomicBool,
    pending: Mutex<Option<Arc<HeartbeatMap>>>,
    samples: AtomicU64,
    stats: Mutex<Option<Stats>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in the sampler cannot leave the totals half-updated in a way that
    // matters more than losing them; keep going with what is there.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Polls a heartbeat in a native thread. See the module docs.
#[derive(Debug)]
pub struct Observer {
    offset: usize,
    interval_ns: u64,
    map: Mutex<Arc<HeartbeatMap>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<u64>>>,
}

impl Observer {
    /// Map the page holding the u64 at `offset` of `target`. `interval_ns` = 0
    /// busy-polls; otherwise the thread sleeps that long between samples.
    pub fn new(target: &Target<'_>, offset: usize, interval_ns: u64) -> Result<Self> {
        if interval_ns > MAX_INTERVAL_NS {
            return Err(Error::InvalidArgument(format!(
                "sampling interval {interval_ns} ns is above {MAX_INTERVAL_NS} ns: too coarse to measure a pause"
            )));
        }
        let map = HeartbeatMap::open(target, offset)?;
        Ok(Self {
            offset,
            interval_ns,
            map: Mutex::new(Arc::new(map)),
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                switch: AtomicBool::new(false),
                pending: Mutex::new(None),
                samples: AtomicU64::new(0),
                stats: Mutex::new(None),
            }),
            thread: Mutex::new(None),
        })
    }

    /// Whether the sampling thread runs.
    #[must_use]
    pub fn running(&self) -> bool {
        lock(&self.thread).is_some()
    }

    /// Start sampling (a fresh window), at `SCHED_FIFO` `priority` if given
    /// (a sleeping sampler then wakes on time however busy the host is) and
    /// on `cpus` if given. Errors if already running, or if the priority is
    /// refused (EPERM).
    pub fn start(&self, priority: Option<i32>, cpus: Option<&Cpus>) -> Result<()> {
        let mut thread = lock(&self.thread);
        if thread.is_some() {
            return Err(Error::InvalidArgument("observer is already running".into()));
        }
        let map = Arc::clone(&lock(&self.map));
        self.shared.stop.store(false, Ordering::Relaxed);
        self.shared.switch.store(false, Ordering::Relaxed);
        lock(&self.shared.pending).take();
        self.shared.samples.store(0, Ordering::Relaxed);
        *lock(&self.shared.stats) = Some(Stats::new(monotonic_ns(), map.read()));
        let shared = Arc::clone(&self.shared);
        let interval = self.interval_ns;
        let handle = spawn_pinned(std::thread::Builder::new().name("cprfast-obs".into()), cpus, move || {
            sample(&shared, map, interval)
        })?;
        if let Some(priority) = priority
            && let Err(e) = set_fifo(&handle, priority)
        {
            self.shared.stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
            return Err(e);
        }
        *thread = Some(handle);
        Ok(())
    }

    /// The report so far, while running.
    pub fn snapshot(&self) -> Result<Report> {
        let thread = lock(&self.thread);
        if thread.is_none() {
            return Err(Error::InvalidArgument("observer is not running".into()));
        }
        Ok(self.current_report(monotonic_ns()))
    }

    /// Stop the thread and return the final report.
    pub fn stop(&self) -> Result<Report> {
        let handle = lock(&self.thread).take();
        let Some(handle) = handle else {
            return Err(Error::InvalidArgument("observer is not running".into()));
        };
        // The window runs until now, or until the thread's last sample if it
        // was taken later (a thread descheduled before its last look took it earlier).
        let now = monotonic_ns();
        self.shared.stop.store(true, Ordering::Relaxed);
        let last = handle.join().unwrap_or(now);
        Ok(self.current_report(now.max(last)))
    }

    fn current_report(&self, end: u64) -> Report {
        // Read the sample count before the stats so it is never behind them.
        let samples = self.shared.samples.load(Ordering::Relaxed);
        let stats = lock(&self.shared.stats);
        stats.as_ref().map_or_else(|| Stats::new(end, 0).report(end, 0), |s| s.report(end, samples))
    }

    /// Switch to the heartbeat of another memfd (same offset). While running,
    /// the thread swaps mappings between two samples.
    pub fn retarget(&self, target: &Target<'_>) -> Result<()> {
        let map = Arc::new(HeartbeatMap::open(target, self.offset)?);
        let thread = lock(&self.thread);
        *lock(&self.map) = Arc::clone(&map);
        if thread.is_some() {
            *lock(&self.shared.pending) = Some(map);
            self.shared.switch.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// What is being observed (the fd or path last mapped).
    #[must_use]
    pub fn target(&self) -> String {
        lock(&self.map).what.clone()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(handle) = lock(&self.thread).take() {
            self.shared.stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

/// Set the calling thread's timer slack to 1 ns so short sleeps stay short.
fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// The sampling loop; returns the time of its last sample.
///
/// Every read is bracketed by the timestamps taken before it and before the
/// next read, so a change seen by read `k` happened after `T[k-1]` (read `k-1`
/// still showed the old value) and is recorded as seen at `T[k+1]`, even if
/// the thread was descheduled between a read and a timestamp.
fn sample(shared: &Shared, mut map: Arc<HeartbeatMap>, interval_ns: u64) -> u64 {
    let (mut last, mut prev_t) = {
        let stats = lock(&shared.stats);
        stats.as_ref().map_or((map.read(), monotonic_ns()), |s| (s.last_value, s.started_at))
    };
    if interval_ns > 0 {
        tight_timer_slack();
    }
    let pause = std::time::Duration::from_nanos(interval_ns);
    let mut samples = 0u64;
    let mut max_sample_gap = 0u64;
    // A change read but not yet recorded: (time before the previous read, value).
    let mut pending: Option<(u64, u64)> = None;
    loop {
        let t = monotonic_ns();
        if let Some((before, value)) = pending.take()
            && let Some(s) = lock(&shared.stats).as_mut()
        {
            s.record_change(before, t, value);
        }
        if t - prev_t > max_sample_gap {
            max_sample_gap = t - prev_t;
            if let Some(s) = lock(&shared.stats).as_mut() {
                s.max_sample_gap = max_sample_gap;
            }
        }
        if shared.stop.load(Ordering::Relaxed) {
            return t;
        }
        if shared.switch.load(Ordering::Acquire) {
            shared.switch.store(false, Ordering::Relaxed);
            if let Some(next) = lock(&shared.pending).take() {
                // The old mapping is unmapped here if nothing else holds it.
                map = next;
            }
        }
        let v = map.read();
        samples += 1;
        shared.samples.store(samples, Ordering::Relaxed);
        if v != last {
            last = v;
            pending = Some((prev_t, v));
        }
        prev_t = t;
        if interval_ns > 0 {
            std::thread::sleep(pause);
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::{CreateOptions, Region};

    fn region() -> Region {
        Region::create("obs-test", 1 << 16, &CreateOptions { seal: true, ..Default::default() }).unwrap()
    }

    fn wait_changes(obs: &Observer, n: u64) {
        while obs.snapshot().unwrap().changes < n {
            std::thread::yield_now();
        }
    }

    #[test]
    fn sees_changes_stalls_and_backwards_jumps() {
        let r = region();
        let m = r.mapping();
        let obs = Observer::new(&Target::Fd(r.fd()), 0x1000, 0).unwrap();
        obs.start(None, None).unwrap();
        for v in 1..=3u64 {
            m.write(0x1000, &v.to_le_bytes()).unwrap();
            wait_changes(&obs, v);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        m.write(0x1000, &2u64.to_le_bytes()).unwrap();
        wait_changes(&obs, 4);
        let rep = obs.stop().unwrap();
        assert_eq!(rep.changes, 4);
        assert_eq!(rep.last_value, 2);
        assert!(!rep.heartbeat_monotonic);
        assert!(rep.max_stall_ns >= 5_000_000, "{rep:?}");
        assert!(rep.samples > rep.changes);
        assert_eq!(rep.histogram.iter().map(|h| h.1).sum::<u64>(), 4);
        assert!(obs.stop().is_err());
    }

    #[test]
    fn bad_targets() {
        let r = region();
        assert!(matches!(Observer::new(&Target::Fd(r.fd()), 0x1004, 0), Err(Error::InvalidArgument(_))));
        assert!(matches!(Observer::new(&Target::Fd(r.fd()), 1 << 16, 0), Err(Error::InvalidArgument(_))));
        let e = Observer::new(&Target::Path(Path::new("/nonexistent/x")), 0, 0).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert!(matches!(Observer::new(&Target::Path(Path::new("/proc/self")), 0, 0), Err(Error::BadFd(_))));
    }

    #[test]
    fn top_gaps_keep_the_longest() {
        let mut s = Stats::new(0, 0);
        let mut t = 0;
        for i in 1..=200u64 {
            t += i * 1000;
            s.record_change(t, t, i);
        }
        let rep = s.report(t, 0);
        assert_eq!(rep.top_gaps.len(), TOP_GAPS);
        assert_eq!(rep.max_stall_ns, 200_000);
        assert!(rep.top_gaps.iter().all(|g| g.1 > (200 - TOP_GAPS as u64) * 1000));
        assert_eq!(rep.gaps_over(199_000).len(), 1);
    }
}
