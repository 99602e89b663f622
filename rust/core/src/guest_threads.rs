//! The "threads" guest: a native thread that behaves like the reference VMM's
//! KVM guest on the shared [`layout`](crate::layout), for machines without KVM
//! and for tests. While running it increments the heartbeat after every
//! [`PAGES_PER_BEAT`] pages it writes in the hot working set (one volatile
//! 8-byte store of the new heartbeat value per page dirties it) and bumps
//! `HOT_PASSES` after each full pass.
//!
//! [`ThreadsGuest::pause`] is a real stop: once the thread acknowledges, it
//! writes nothing more until resumed. The heartbeat and pass count live only in
//! guest memory (the thread reloads them on every resume), so a successor
//! process adopting the same memfd continues from what is in memory; the
//! position in the hot set travels in [`ThreadsGuest::save_state`].

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sched::{spawn_pinned, Cpus};
use crate::layout;
use crate::memfd::Mapping;

/// Hot-set pages written per heartbeat increment.
pub const PAGES_PER_BEAT: usize = 4;

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

const STATE_MAGIC: &[u8; 8] = b"CPRTHRDS";
const STATE_VERSION: u32 = 1;
/// magic, version, page size, hot start, hot len, position, heartbeat, passes, checksum.
const STATE_LEN: usize = 8 + 4 + 8 * 6 + 8;

/// What the controller wants; guarded by `Shared::ctl`.
#[derive(Debug)]
struct Ctl {
    want: u8,
    /// Bumped by every pause request.
    epoch: u64,
    /// The epoch the thread last parked for.
    parked_epoch: u64,
    /// Page index in the hot set where the thread continues.
    pos: u64,
}

#[derive(Debug)]
struct Shared {
    /// Mirror of `Ctl::want` for the thread's hot loop.
    want: AtomicU8,
    /// Mirror of `Ctl::parked_epoch`, for the controller to spin on.
    parked_epoch: AtomicU64,
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

fn lock(m: &Mutex<Ctl>) -> MutexGuard<'_, Ctl> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A pending pause, returned by [`ThreadsGuest::request_pause`].
#[derive(Debug, Clone, Copy)]
pub struct PauseTicket {
    epoch: u64,
    requested: Instant,
}

/// The threads guest. All methods take `&self`; see the module docs.
#[derive(Debug)]
pub struct ThreadsGuest {
    mapping: Arc<Mapping>,
    hot_start: usize,
    hot_len: usize,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set once started; never cleared (a closed guest cannot restart).
    started: AtomicBool,
}

impl ThreadsGuest {
    /// A stopped guest writing `[hot_start, hot_start + hot_len)` of `mapping`.
    pub fn new(mapping: Arc<Mapping>, hot_start: usize, hot_len: usize) -> Result<Self> {
        let ps = mapping.page_size();
        if hot_start < layout::RESERVED_END || hot_start % ps != 0 || hot_len == 0 || hot_len % ps != 0 {
            return Err(Error::InvalidArgument(format!(
                "hot set {hot_start:#x}+{hot_len:#x} must be a nonempty run of whole {ps}-byte pages at or above {:#x}",
                layout::RESERVED_END
            )));
        }
        mapping.check_range(hot_start, hot_len)?;
        Ok(Self {
            mapping,
            hot_start,
            hot_len,
            shared: Arc::new(Shared {
                want: AtomicU8::new(PAUSE),
                parked_epoch: AtomicU64::new(0),
                ctl: Mutex::new(Ctl { want: PAUSE, epoch: 0, parked_epoch: 0, pos: 0 }),
                cv: Condvar::new(),
            }),
            thread: Mutex::new(None),
            started: AtomicBool::new(false),
        })
    }

    /// Offset of the hot set.
    #[must_use]
    pub fn hot_start(&self) -> usize {
        self.hot_start
    }

    /// Length of the hot set in bytes.
    #[must_use]
    pub fn hot_len(&self) -> usize {
        self.hot_len
    }

    /// The heartbeat in guest memory now.
    #[must_use]
    pub fn heartbeat(&self) -> u64 {
        read_u64(&self.mapping, layout::HEARTBEAT)
    }

    /// Whether the guest thread runs (started, not paused, not closed).
    #[must_use]
    pub fn running(&self) -> bool {
        self.shared.want.load(Ordering::Acquire) == RUN
    }

    /// Write the parameter block and start the thread, pinned to `cpus` if
    /// given. Only once.
    pub fn start(&self, cpus: Option<&Cpus>) -> Result<()> {
        let mut thread = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.started.swap(true, Ordering::AcqRel) {
            return Err(Error::InvalidArgument("threads guest was already started (or is closed)".into()));
        }
        for (off, v) in [
            (layout::PARAM_HOT_START, self.hot_start),
            (layout::PARAM_HOT_LEN, self.hot_len),
            (layout::PARAM_RAM_SIZE, self.mapping.len()),
        ] {
            self.mapping.write(off, &(v as u64).to_le_bytes())?;
        }
        {
            let mut ctl = lock(&self.shared.ctl);
            ctl.want = RUN;
            self.shared.want.store(RUN, Ordering::Release);
        }
        let shared = Arc::clone(&self.shared);
        let mapping = Arc::clone(&self.mapping);
        let (hot_start, pages) = (self.hot_start, self.hot_len / self.mapping.page_size());
        let builder = std::thread::Builder::new().name("cprfast-guest".into());
        let handle = spawn_pinned(builder, cpus, move || run(&shared, &mapping, hot_start, pages)).inspect_err(|_| {
            self.shared.want.store(STOP, Ordering::Release);
        })?;
        *thread = Some(handle);
        Ok(())
    }

    /// Ask the thread to park; wait for it with [`ThreadsGuest::wait_parked`].
    pub fn request_pause(&self) -> Result<PauseTicket> {
        if !self.started.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument("threads guest was not started".into()));
        }
        let mut ctl = lock(&self.shared.ctl);
        if ctl.want == STOP {
            return Err(Error::InvalidArgument("threads guest is closed".into()));
        }
        let requested = Instant::now();
        ctl.epoch += 1;
        ctl.want = PAUSE;
        self.shared.want.store(PAUSE, Ordering::Release);
        self.shared.cv.notify_all();
        Ok(PauseTicket { epoch: ctl.epoch, requested })
    }

    /// Wait up to `timeout` for the thread to acknowledge `ticket`. Returns the
    /// time from the request to the acknowledgement, or `None` on timeout.
    /// After `Some`, the thread writes nothing until [`ThreadsGuest::resume`].
    pub fn wait_parked(&self, ticket: &PauseTicket, timeout: Duration) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        // A running thread parks within one heartbeat (well under a µs): poll
        // briefly, yielding so a guest thread queued on our CPU gets to run,
        // then sleep on the condition variable.
        let spin_until = Instant::now() + Duration::from_micros(20).min(timeout);
        while Instant::now() < spin_until {
            if self.shared.parked_epoch.load(Ordering::Acquire) >= ticket.epoch {
                return Some(ticket.requested.elapsed());
            }
            std::thread::yield_now();
        }
        let mut ctl = lock(&self.shared.ctl);
        while ctl.parked_epoch < ticket.epoch {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            ctl = self.shared.cv.wait_timeout(ctl, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        Some(ticket.requested.elapsed())
    }

    /// Let a paused guest run again (a no-op if it runs).
    pub fn resume(&self) -> Result<()> {
        if !self.started.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument("threads guest was not started".into()));
        }
        let mut ctl = lock(&self.shared.ctl);
        if ctl.want == STOP {
            return Err(Error::InvalidArgument("threads guest is closed".into()));
        }
        ctl.want = RUN;
        self.shared.want.store(RUN, Ordering::Release);
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Error unless the thread is parked (or was never started) and will not write.
    fn quiescent(&self) -> Result<MutexGuard<'_, Ctl>> {
        let ctl = lock(&self.shared.ctl);
        let acknowledged = ctl.want == PAUSE && ctl.epoch > 0 && ctl.parked_epoch == ctl.epoch;
        if self.started.load(Ordering::Acquire) && !acknowledged {
            return Err(Error::InvalidArgument(
                "threads guest must be paused (pause() returned), or not yet started, for its state".into(),
            ));
        }
        Ok(ctl)
    }

    /// The guest's state: position in the hot set plus the counters in memory,
    /// versioned and checksummed. The guest must be paused or not yet started.
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let ctl = self.quiescent()?;
        let mut out = Vec::with_capacity(STATE_LEN);
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        for v in [
            self.mapping.page_size() as u64,
            self.hot_start as u64,
            self.hot_len as u64,
            ctl.pos,
            read_u64(&self.mapping, layout::HEARTBEAT),
            read_u64(&self.mapping, layout::HOT_PASSES),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        Ok(out)
    }

    /// Adopt a state from [`ThreadsGuest::save_state`] (of a predecessor on the
    /// same memory). Corrupt bytes → [`Error::Corrupt`]; a state for another
    /// hot set, or memory that does not hold the saved heartbeat → errors too.
    pub fn load_state(&self, state: &[u8]) -> Result<()> {
        if state.len() != STATE_LEN || &state[..8] != STATE_MAGIC {
            return Err(Error::Corrupt(format!(
                "threads guest state: {} bytes without the {STATE_LEN}-byte CPRTHRDS header",
                state.len()
            )));
        }
        let (body, sum) = state.split_at(STATE_LEN - 8);
        if fnv1a(body) != u64::from_le_bytes(sum.try_into().unwrap_or_default()) {
            return Err(Error::Corrupt("threads guest state: checksum mismatch".into()));
        }
        let version = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
        if version != STATE_VERSION {
            return Err(Error::Corrupt(format!("threads guest state version {version}, expected {STATE_VERSION}")));
        }
        let f: Vec<u64> = body[12..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        let [page_size, hot_start, hot_len, pos, heartbeat, _passes] = f[..] else {
            return Err(Error::Corrupt("threads guest state: wrong field count".into()));
        };
        let mine = (self.mapping.page_size() as u64, self.hot_start as u64, self.hot_len as u64);
        if (page_size, hot_start, hot_len) != mine {
            return Err(Error::InvalidArgument(format!(
                "state is for a hot set {hot_start:#x}+{hot_len:#x} of {page_size}-byte pages, this guest has {:#x}+{:#x} of {}",
                mine.1, mine.2, mine.0
            )));
        }
        if pos >= hot_len / page_size {
            return Err(Error::Corrupt(format!("threads guest state: position {pos} is outside the hot set")));
        }
        let mut ctl = self.quiescent()?;
        let in_memory = read_u64(&self.mapping, layout::HEARTBEAT);
        if in_memory != heartbeat {
            return Err(Error::Corrupt(format!(
                "guest memory holds heartbeat {in_memory}, the state says {heartbeat}: memory was not preserved"
            )));
        }
        ctl.pos = pos;
        Ok(())
    }

    /// Stop and join the thread. Idempotent; the guest cannot run again.
    pub fn close(&self) {
        {
            let mut ctl = lock(&self.shared.ctl);
            ctl.want = STOP;
            self.shared.want.store(STOP, Ordering::Release);
            self.shared.cv.notify_all();
        }
        self.started.store(true, Ordering::Release);
        let handle = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for ThreadsGuest {
    fn drop(&mut self) {
        self.close();
    }
}

fn read_u64(m: &Mapping, offset: usize) -> u64 {
    let mut b = [0u8; 8];
    // Offsets are layout constants inside the reserved area, checked at construction.
    let _ = m.read(offset, &mut b);
    u64::from_le_bytes(b)
}

/// 64-bit FNV-1a, enough to catch corruption of a small state blob.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The guest thread.
fn run(shared: &Shared, mapping: &Mapping, hot_start: usize, pages: usize) {
    let ps = mapping.page_size();
    let base = mapping.as_ptr();
    // SAFETY: HEARTBEAT and HOT_PASSES are 8-aligned offsets below RESERVED_END,
    // inside the mapping (ThreadsGuest::new checked it reaches past the hot set).
    let (hb_ptr, passes_ptr) = unsafe {
        (base.add(layout::HEARTBEAT).cast::<u64>(), base.add(layout::HOT_PASSES).cast::<u64>())
    };
    let (mut hb, mut passes, mut pos) = (0u64, 0u64, 0usize);
    let mut resume = true;
    loop {
        if resume {
            // (Re)load what lives in memory: a predecessor or a migration may have put it there.
            // SAFETY: both pointers are in bounds and aligned (above); volatile
            // because other processes may write guest memory.
            unsafe {
                hb = u64::from_le(std::ptr::read_volatile(hb_ptr));
                passes = u64::from_le(std::ptr::read_volatile(passes_ptr));
            }
            pos = lock(&shared.ctl).pos as usize % pages;
            resume = false;
        }
        if shared.want.load(Ordering::Acquire) != RUN {
            let mut ctl = lock(&shared.ctl);
            ctl.pos = pos as u64;
            loop {
                match ctl.want {
                    RUN => break,
                    STOP => return,
                    _ => {
                        if ctl.parked_epoch != ctl.epoch {
                            ctl.parked_epoch = ctl.epoch;
                            shared.parked_epoch.store(ctl.epoch, Ordering::Release);
                            shared.cv.notify_all();
                        }
                        ctl = shared.cv.wait(ctl).unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                }
            }
            drop(ctl);
            resume = true;
            continue;
        }
        // Pages carry the heartbeat value of the beat that wrote them.
        hb = hb.wrapping_add(1);
        for _ in 0..PAGES_PER_BEAT {
            // SAFETY: pos < pages, so the 8 bytes at hot_start + pos*ps lie inside
            // the hot set, which ThreadsGuest::new bounds-checked; page-aligned.
            unsafe { std::ptr::write_volatile(base.add(hot_start + pos * ps).cast::<u64>(), hb.to_le()) };
            pos += 1;
            if pos == pages {
                pos = 0;
                passes += 1;
                // SAFETY: in bounds and aligned (above).
                unsafe { std::ptr::write_volatile(passes_ptr, passes.to_le()) };
            }
        }
        // SAFETY: in bounds and aligned (above).
        unsafe { std::ptr::write_volatile(hb_ptr, hb.to_le()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::{CreateOptions, Region};

    const HOT: usize = 256 << 10;

    fn guest() -> (Region, ThreadsGuest) {
        let r = Region::create("guest-test", layout::HOT_START + HOT, &CreateOptions { seal: true, ..Default::default() })
            .unwrap();
        let g = ThreadsGuest::new(r.mapping(), layout::HOT_START, HOT).unwrap();
        (r, g)
    }

    fn pause(g: &ThreadsGuest) {
        let t = g.request_pause().unwrap();
        assert!(g.wait_parked(&t, Duration::from_secs(10)).is_some());
    }

    #[test]
    fn runs_pauses_and_resumes() {
        let (_r, g) = guest();
        g.start(None).unwrap();
        while read_u64(&g.mapping, layout::HOT_PASSES) < 2 {
            std::thread::yield_now();
        }
        pause(&g);
        let hb = g.heartbeat();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(g.heartbeat(), hb, "paused guest wrote");
        pause(&g); // pausing twice is fine
        g.resume().unwrap();
        while g.heartbeat() == hb {
            std::thread::yield_now();
        }
        assert!(g.heartbeat() > hb);
        g.close();
        assert!(g.resume().is_err());
        assert_eq!(read_u64(&g.mapping, layout::PARAM_HOT_LEN), HOT as u64);
    }

    #[test]
    fn state_round_trip_and_corruption() {
        let (r, g) = guest();
        assert!(g.save_state().is_ok());
        g.start(None).unwrap();
        assert!(g.save_state().is_err(), "state of a running guest");
        while g.heartbeat() < 1000 {
            std::thread::yield_now();
        }
        pause(&g);
        let state = g.save_state().unwrap();
        let hb = g.heartbeat();
        g.close();
        let g2 = ThreadsGuest::new(r.mapping(), layout::HOT_START, HOT).unwrap();
        let mut bad = state.clone();
        bad[30] ^= 1;
        assert!(matches!(g2.load_state(&bad), Err(Error::Corrupt(_))));
        assert!(matches!(g2.load_state(&state[..20]), Err(Error::Corrupt(_))));
        g2.load_state(&state).unwrap();
        assert_eq!(lock(&g2.shared.ctl).pos, lock(&g.shared.ctl).pos);
        g2.start(None).unwrap();
        while g2.heartbeat() == hb {
            std::thread::yield_now();
        }
        assert!(g2.heartbeat() > hb);
        let other = ThreadsGuest::new(r.mapping(), layout::HOT_START, HOT / 2).unwrap();
        assert!(matches!(other.load_state(&state), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn rejects_bad_hot_sets() {
        let r = Region::create("guest-test", 4 << 20, &CreateOptions::default()).unwrap();
        for (start, len) in [(0, 4096), (layout::HOT_START + 1, 4096), (layout::HOT_START, 0), (layout::HOT_START, 4 << 20)] {
            assert!(matches!(ThreadsGuest::new(r.mapping(), start, len), Err(Error::InvalidArgument(_))), "{start} {len}");
        }
    }
}
