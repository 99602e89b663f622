//! One vCPU: its fd and shared `kvm_run` page, a native thread that loops in
//! `KVM_RUN`, pause/resume, and its state as bytes.
//!
//! Pausing kicks the thread out of `KVM_RUN`: set `kvm_run.immediate_exit`
//! (covers the window before the thread enters the guest) and send the
//! thread [`kick_signal`], whose handler does nothing and is installed without
//! `SA_RESTART`, so `KVM_RUN` returns `EINTR`. The thread then parks on a
//! condition variable, outside `KVM_RUN`, and says so; only then does
//! [`Vcpu::pause`] return. Any exit other than a kick (shutdown, HLT, I/O,
//! MMIO, internal error, a failed `KVM_RUN`) is recorded and ends the thread:
//! the guest we run never exits in steady state, so an exit is an error.

use std::ffi::c_void;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::mm::{MapFlags, ProtFlags};

use super::abi::{self, Fpu, MsrEntry, Msrs, Regs, Sregs, VcpuEvents};
use super::guest;
use super::state::{MAX_MSRS, SAVED_MSRS, VcpuState};
use super::vm::Vm;
use crate::error::{Errno, Error, Result};
use crate::sched::{spawn_pinned, Cpus};

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`
/// (`SIGRTMIN + 4`); reserved by cprfast in any process that runs a vCPU.
#[must_use]
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 4
}

extern "C" fn on_kick(_: libc::c_int) {}

/// How long [`Vcpu::pause`] spins for the run thread to park before it sleeps.
const PAUSE_SPIN: Duration = Duration::from_millis(2);

/// Install the no-op kick handler once per process (no `SA_RESTART`).
fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), Errno>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed `sigaction` is a valid "no flags, empty mask" value;
        // the handler is an `extern "C"` fn that touches nothing, so it is
        // async-signal-safe, and we replace only our own reserved signal.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as libc::sighandler_t;
            libc::sigemptyset(&raw mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &raw const sa, std::ptr::null_mut()) != 0 {
                return Err(Errno::last());
            }
        }
        Ok(())
    });
    r.map_err(|errno| Error::Os { op: "sigaction(vCPU kick signal)".into(), errno })
}

/// The vCPU's shared `kvm_run` area.
#[derive(Debug)]
struct RunPage {
    base: *mut u8,
    len: usize,
}

// SAFETY: the page is shared with the kernel and accessed only with volatile
// reads/writes of single fields, from any thread.
unsafe impl Send for RunPage {}
// SAFETY: as above.
unsafe impl Sync for RunPage {}

impl RunPage {
    fn set_immediate_exit(&self, on: bool) {
        // SAFETY: `immediate_exit` is a u8 inside the live mapping; KVM reads it with READ_ONCE.
        unsafe { self.base.add(abi::run::IMMEDIATE_EXIT).write_volatile(u8::from(on)) }
    }

    fn u32_at(&self, off: usize) -> u32 {
        // SAFETY: `off` is one of the aligned field offsets in `abi::run`, inside the mapping.
        unsafe { self.base.add(off).cast::<u32>().read_volatile() }
    }

    fn u64_at(&self, off: usize) -> u64 {
        // SAFETY: as for `u32_at`.
        unsafe { self.base.add(off).cast::<u64>().read_volatile() }
    }

    /// Say why `KVM_RUN` returned, in words.
    fn describe_exit(&self) -> String {
        let u = abi::run::UNION;
        match self.u32_at(abi::run::EXIT_REASON) {
            abi::KVM_EXIT_SHUTDOWN => "KVM_EXIT_SHUTDOWN (triple fault)".into(),
            abi::KVM_EXIT_HLT => "KVM_EXIT_HLT".into(),
            abi::KVM_EXIT_IO => format!("KVM_EXIT_IO (port {:#x})", (self.u32_at(u) >> 16) & 0xffff),
            abi::KVM_EXIT_MMIO => format!("KVM_EXIT_MMIO (address {:#x})", self.u64_at(u)),
            abi::KVM_EXIT_FAIL_ENTRY => format!("KVM_EXIT_FAIL_ENTRY (hardware reason {:#x})", self.u64_at(u)),
            abi::KVM_EXIT_INTERNAL_ERROR => format!("KVM_EXIT_INTERNAL_ERROR (suberror {})", self.u32_at(u)),
            abi::KVM_EXIT_SYSTEM_EVENT => format!("KVM_EXIT_SYSTEM_EVENT (type {})", self.u32_at(u)),
            r => format!("unexpected KVM exit reason {r}"),
        }
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` came from mmap; the last `Arc<Shared>` is dropping,
        // so neither the run thread nor a waiter can touch the page afterwards.
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.len) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

/// What the controller wants and what the run thread last said.
#[derive(Debug)]
struct Ctl {
    want: Want,
    /// The run thread is outside `KVM_RUN` and will not re-enter it (or there is no thread).
    parked: bool,
    /// The run thread has returned (or was never started).
    exited: bool,
    /// Why the guest stopped on its own, if it did.
    failure: Option<String>,
    /// Registers hold a guest to run (set by `setup_guest` or `load_state`).
    ready: bool,
    /// The run thread while it is not joined (its pthread_t stays valid until then).
    tid: Option<libc::pthread_t>,
    /// Until when a parked run thread spins for `go` instead of sleeping ([`Vcpu::expect_resume`]).
    spin_until: Option<Instant>,
    /// The state the run thread read as it parked, valid until the guest runs or is loaded again.
    saved: Option<Vec<u8>>,
    /// A state for the spinning run thread to load on its own CPU ([`Vcpu::load_state`]).
    pending: Option<Box<VcpuState>>,
    /// How the run thread's last load of a `pending` state went, until [`Vcpu::wait_loaded`] takes it.
    loaded: Option<Result<()>>,
    /// The run thread is reading or loading the state (no other vCPU ioctl may start meanwhile).
    busy: bool,
}

#[derive(Debug)]
struct Shared {
    fd: OwnedFd,
    run: RunPage,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// Mirrors `want != Pause`, for a spinning run thread to read without the lock.
    go: AtomicBool,
    /// Mirrors `pending.is_some()`, likewise.
    work: AtomicBool,
    /// MSRs from [`SAVED_MSRS`] that this KVM can get and set.
    msrs: Vec<u32>,
}

impl Shared {
    /// Set what the controller wants (under the lock), and its lock-free mirror.
    fn set_want(&self, c: &mut Ctl, want: Want) {
        c.want = want;
        if want == Want::Pause {
            c.spin_until = None;
        }
        self.go.store(want != Want::Pause, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lock the control block once the run thread is done reading or loading the vCPU state.
    fn settled(&self) -> MutexGuard<'_, Ctl> {
        let mut c = self.lock();
        while c.busy || c.pending.is_some() {
            c = self.cv.wait(c).unwrap_or_else(PoisonError::into_inner);
        }
        c
    }

    fn get<T>(&self, op: rustix::ioctl::Opcode, name: &str) -> Result<T> {
        let mut v = std::mem::MaybeUninit::<T>::zeroed();
        // SAFETY: `op` is the KVM_GET_* ioctl whose argument type is `T` (callers
        // pair them); KVM fills the whole struct, which starts zeroed anyway.
        unsafe {
            abi::ioctl(self.fd.as_fd(), op, v.as_mut_ptr().cast::<c_void>()).map_err(|e| Error::os(name, e))?;
            Ok(v.assume_init())
        }
    }

    /// Read the whole vCPU state (registers, special registers, FPU, events, MSRs) as bytes.
    fn read_state(&self) -> Result<Vec<u8>> {
        let mut m = Msrs::<MAX_MSRS> { nmsrs: self.msrs.len() as u32, pad: 0, entries: [MsrEntry::default(); MAX_MSRS] };
        for (e, &index) in m.entries.iter_mut().zip(&self.msrs) {
            e.index = index;
        }
        // SAFETY: a `kvm_msrs` header with `nmsrs` entries, all inside `m`; KVM fills their data.
        let got = unsafe { abi::ioctl(self.fd.as_fd(), abi::KVM_GET_MSRS, (&raw mut m).cast::<c_void>()) }
            .map_err(|e| Error::os("KVM_GET_MSRS", e))?;
        let state = VcpuState {
            regs: self.get::<Regs>(abi::KVM_GET_REGS, "KVM_GET_REGS")?,
            sregs: self.get::<Sregs>(abi::KVM_GET_SREGS, "KVM_GET_SREGS")?,
            fpu: self.get::<Fpu>(abi::KVM_GET_FPU, "KVM_GET_FPU")?,
            events: self.get::<VcpuEvents>(abi::KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")?,
            msrs: m.entries[..got as usize].to_vec(),
        };
        Ok(state.encode())
    }

    fn set<T>(&self, op: rustix::ioctl::Opcode, name: &str, v: &T) -> Result<()> {
        // SAFETY: `op` is the KVM_SET_* ioctl whose argument type is `T` (callers pair them); KVM only reads it.
        unsafe { abi::ioctl(self.fd.as_fd(), op, (v as *const T).cast_mut().cast::<c_void>()) }
            .map_err(|e| Error::os(name, e))?;
        Ok(())
    }

    /// Load a whole vCPU state (the inverse of [`read_state`](Self::read_state)).
    fn write_state(&self, state: &VcpuState) -> Result<()> {
        self.set(abi::KVM_SET_SREGS, "KVM_SET_SREGS", &state.sregs)?;
        self.set(abi::KVM_SET_REGS, "KVM_SET_REGS", &state.regs)?;
        self.set(abi::KVM_SET_FPU, "KVM_SET_FPU", &state.fpu)?;
        let mut m = Msrs::<MAX_MSRS> { nmsrs: state.msrs.len() as u32, pad: 0, entries: [MsrEntry::default(); MAX_MSRS] };
        m.entries[..state.msrs.len()].copy_from_slice(&state.msrs);
        // SAFETY: a `kvm_msrs` header with `nmsrs` (<= MAX_MSRS) entries, all inside `m`; KVM only reads it.
        let set = unsafe { abi::ioctl(self.fd.as_fd(), abi::KVM_SET_MSRS, (&raw mut m).cast::<c_void>()) }
            .map_err(|e| Error::os("KVM_SET_MSRS", e))?;
        if set as usize != state.msrs.len() {
            let bad = state.msrs[set as usize].index;
            return Err(Error::os(format!("KVM_SET_MSRS(MSR {bad:#x})"), rustix::io::Errno::INVAL));
        }
        self.set(abi::KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", &state.events)
    }
}

/// A vCPU of a [`Vm`], run by a native thread once started.
#[derive(Debug)]
pub struct Vcpu {
    vm: Arc<Vm>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Vcpu {
    /// `KVM_CREATE_VCPU` with id `id`, map its `kvm_run`, and give it the host's
    /// supported CPUID. Nothing runs until [`start`](Self::start).
    pub fn create(vm: Arc<Vm>, id: u32) -> Result<Self> {
        install_kick_handler()?;
        let raw = abi::ioctl_int(vm.fd(), abi::KVM_CREATE_VCPU, id as usize)
            .map_err(|e| Error::os(format!("KVM_CREATE_VCPU({id})"), e))?;
        // SAFETY: KVM_CREATE_VCPU returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a fresh shared mapping of the vCPU fd at an address the kernel picks.
        let base = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), vm.run_size, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, &fd, 0)
        }
        .map_err(|e| Error::os("mmap(kvm_run)", e))?;
        let run = RunPage { base: base.cast(), len: vm.run_size };
        let mut cpuid = vm.cpuid.clone();
        // SAFETY: KVM_SET_CPUID2 reads a `kvm_cpuid2` header and `nent` entries, all inside the box.
        unsafe { abi::ioctl(fd.as_fd(), abi::KVM_SET_CPUID2, (&raw mut *cpuid).cast::<c_void>()) }
            .map_err(|e| Error::os("KVM_SET_CPUID2", e))?;
        let msrs = SAVED_MSRS.into_iter().filter(|m| vm.msr_index.contains(m)).collect();
        let ctl = Ctl {
            want: Want::Pause,
            parked: true,
            exited: true,
            failure: None,
            ready: false,
            tid: None,
            spin_until: None,
            saved: None,
            pending: None,
            loaded: None,
            busy: false,
        };
        let shared = Shared {
            fd,
            run,
            ctl: Mutex::new(ctl),
            cv: Condvar::new(),
            go: AtomicBool::new(false),
            work: AtomicBool::new(false),
            msrs,
        };
        Ok(Self {
            vm,
            shared: Arc::new(shared),
            thread: Mutex::new(None),
        })
    }

    /// The vCPU fd.
    #[must_use]
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.fd.as_fd()
    }

    /// The guest is in `KVM_RUN` (or about to be): started, not paused, not stopped.
    #[must_use]
    pub fn running(&self) -> bool {
        let c = self.shared.lock();
        !c.exited && c.want == Want::Run
    }

    /// Why the guest stopped on its own (`None` while it is fine).
    #[must_use]
    pub fn exit_reason(&self) -> Option<String> {
        self.shared.lock().failure.clone()
    }

    /// Lock the control block and check that no thread is in `KVM_RUN`; wait
    /// until the run thread has finished reading the state it parked with, or
    /// loading one it was given.
    fn quiescent(&self, what: &str) -> Result<MutexGuard<'_, Ctl>> {
        let c = self.shared.settled();
        if !(c.exited || (c.parked && c.want != Want::Run)) {
            return Err(Error::InvalidArgument(format!("{what} needs the vCPU paused or not started")));
        }
        Ok(c)
    }

    /// Boot the tiny guest: write it into the RAM at guest address 0 and set
    /// the registers to its first instruction in long mode.
    pub fn setup_guest(&self, hot_start: usize, hot_len: usize) -> Result<()> {
        let mut c = self.quiescent("setup_guest")?;
        let ram = self.vm.ram()?;
        guest::write_image(&ram, hot_start, hot_len, self.vm.has_1g_pages())?;
        let sregs = guest::boot_sregs(self.get::<Sregs>(abi::KVM_GET_SREGS, "KVM_GET_SREGS")?);
        self.set(abi::KVM_SET_SREGS, "KVM_SET_SREGS", &sregs)?;
        self.set(abi::KVM_SET_REGS, "KVM_SET_REGS", &guest::boot_regs())?;
        c.ready = true;
        c.failure = None;
        c.saved = None;
        Ok(())
    }

    /// Build the new VM's memory mappings before the guest's state arrives: run the
    /// guest's read-only `warm:` routine once, in the calling thread, until it
    /// triple-faults. It only reads guest RAM, so a live-update target may do this
    /// while the source still runs the guest; the guest's first instructions after
    /// the switchover then run without the faults a fresh VM takes (about 0.2 ms
    /// when nested). Call before [`start`](Self::start) and before the state is
    /// loaded; returns false, running nothing, if the RAM holds another build's
    /// guest code. The registers are garbage after: [`load_state`](Self::load_state) follows.
    pub fn warm_up(&self) -> Result<bool> {
        let mut c = self.quiescent("warm_up")?;
        if !c.exited || c.ready {
            return Err(Error::InvalidArgument("warm_up() must come before start() and load_state()".into()));
        }
        if !guest::has_current_code(&*self.vm.ram()?)? {
            return Ok(false);
        }
        let sregs = guest::boot_sregs(self.get::<Sregs>(abi::KVM_GET_SREGS, "KVM_GET_SREGS")?);
        self.set(abi::KVM_SET_SREGS, "KVM_SET_SREGS", &sregs)?;
        self.set(abi::KVM_SET_REGS, "KVM_SET_REGS", &guest::warm_regs())?;
        self.shared.run.set_immediate_exit(false);
        let result = loop {
            match abi::ioctl_int(self.shared.fd.as_fd(), abi::KVM_RUN, 0) {
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(e) => break Err(Error::os("KVM_RUN (warm-up)", e)),
                Ok(_) => match self.shared.run.u32_at(abi::run::EXIT_REASON) {
                    abi::KVM_EXIT_INTR => {}
                    abi::KVM_EXIT_SHUTDOWN => break Ok(true),
                    _ => break Err(Error::InvalidArgument(format!("warm-up ended in {}", self.shared.run.describe_exit()))),
                },
            }
        };
        c.failure = None;
        result
    }

    /// Spawn the run thread, pinned to `cpus` if given; the guest runs until
    /// paused or stopped. With `paused`, the thread parks at once, before any
    /// guest state is loaded, and [`resume`](Self::resume) runs the guest: a
    /// live-update target spawns it before the source stops, off the pause path.
    pub fn start(&self, cpus: Option<&Cpus>, paused: bool) -> Result<()> {
        let mut thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        let mut c = self.shared.lock();
        if !c.exited {
            return Err(Error::InvalidArgument("the vCPU is already started".into()));
        }
        if !c.ready && !paused {
            return Err(Error::InvalidArgument("call setup_guest() or load_state() before start()".into()));
        }
        if let Some(f) = &c.failure {
            return Err(Error::InvalidArgument(format!("the guest stopped: {f}")));
        }
        if let Some(old) = thread.take() {
            c.tid = None;
            let _ = old.join(); // it has exited: returns at once
        }
        self.shared.set_want(&mut c, if paused { Want::Pause } else { Want::Run });
        c.exited = false;
        let shared = Arc::clone(&self.shared);
        let handle = spawn_pinned(std::thread::Builder::new().name("cprfast-vcpu".into()), cpus, move || {
            run_loop(&shared);
        });
        match handle {
            Ok(h) => {
                c.tid = Some(h.as_pthread_t());
                *thread = Some(h);
                Ok(())
            }
            Err(e) => {
                c.exited = true;
                Err(e)
            }
        }
    }

    /// Make the run thread leave (or not enter) `KVM_RUN`. Called with the control block locked.
    fn kick(&self, c: &Ctl) -> Result<()> {
        self.shared.run.set_immediate_exit(true);
        if let Some(tid) = c.tid {
            // SAFETY: `tid` is cleared before its thread is joined, so it names a
            // live or returned-but-unjoined thread: a valid pthread_t.
            let rc = unsafe { libc::pthread_kill(tid, kick_signal()) };
            if rc != 0 && rc != libc::ESRCH {
                return Err(Error::Os { op: "pthread_kill(vCPU)".into(), errno: Errno(rc) });
            }
        }
        Ok(())
    }

    /// Wait on the control block until `done` holds, kicking the thread each
    /// millisecond in case it was between checks; error after `timeout`.
    fn wait_for<'a>(
        &self,
        mut c: MutexGuard<'a, Ctl>,
        t0: Instant,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Ctl) -> bool,
    ) -> Result<MutexGuard<'a, Ctl>> {
        while !done(&c) {
            let (g, res) = self.shared.cv.wait_timeout(c, Duration::from_millis(1)).unwrap_or_else(PoisonError::into_inner);
            c = g;
            if res.timed_out() && !done(&c) {
                if t0.elapsed() > timeout {
                    return Err(Error::TimedOut(what.into()));
                }
                if c.want != Want::Run {
                    self.kick(&c)?;
                }
            }
        }
        Ok(c)
    }

    /// Stop the guest: returns once the run thread is parked outside `KVM_RUN`,
    /// with the time that took. A vCPU that is not running pauses at once.
    pub fn pause(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let mut c = self.shared.lock();
        if c.exited {
            return Ok(t0.elapsed());
        }
        self.shared.set_want(&mut c, Want::Pause);
        self.kick(&c)?;
        drop(c);
        // The run thread parks within microseconds of the kick: spin for that rather than
        // sleep, which would add a wake-up of this (idle) CPU to the guest's pause.
        while t0.elapsed() < PAUSE_SPIN {
            if self.shared.ctl.try_lock().is_ok_and(|c| c.parked) {
                return Ok(t0.elapsed());
            }
            std::hint::spin_loop();
        }
        let c = self.shared.lock();
        drop(self.wait_for(c, t0, timeout, "pausing the vCPU", |c| c.parked)?);
        Ok(t0.elapsed())
    }

    /// A resume is coming within `window`: until then the parked run thread
    /// spins instead of sleeping, so [`Vcpu::resume`] needs no wake-up (on a
    /// virtualized host, waking an idle CPU costs hundreds of microseconds).
    /// Call it once nothing else needs the vCPU's CPU, e.g. after the source
    /// of a live update stopped its guest. No effect unless paused.
    pub fn expect_resume(&self, window: Duration) {
        let mut c = self.shared.lock();
        if c.want == Want::Pause && !c.exited {
            c.spin_until = Some(Instant::now() + window);
            self.shared.cv.notify_all();
        }
    }

    /// Let a paused guest run again; returns once the run thread has left its
    /// parking spot (it enters `KVM_RUN` next), with the time that took.
    pub fn resume(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let mut c = self.shared.settled();
        if let Some(Err(e)) = c.loaded.take() {
            return Err(e);
        }
        if let Some(f) = &c.failure {
            return Err(Error::InvalidArgument(format!("cannot resume: the guest stopped: {f}")));
        }
        if c.exited {
            return Err(Error::InvalidArgument("cannot resume: the vCPU is not started".into()));
        }
        if !c.ready {
            return Err(Error::InvalidArgument("cannot resume: call setup_guest() or load_state() first".into()));
        }
        self.shared.set_want(&mut c, Want::Run);
        self.shared.cv.notify_all();
        drop(self.wait_for(c, t0, timeout, "resuming the vCPU", |c| !c.parked || c.exited)?);
        Ok(t0.elapsed())
    }

    /// End the run thread and join it. Idempotent. After a timeout the thread
    /// is left running detached (it owns what it uses) and the error says so.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        let mut c = self.shared.lock();
        if !c.exited {
            self.shared.set_want(&mut c, Want::Stop);
            self.shared.cv.notify_all();
            self.kick(&c)?;
            c = self.wait_for(c, t0, timeout, "stopping the vCPU thread", |c| c.exited)?;
        }
        c.tid = None;
        drop(c);
        if let Some(h) = thread.take() {
            let _ = h.join(); // it has returned: joins at once
        }
        Ok(())
    }

    fn get<T>(&self, op: rustix::ioctl::Opcode, name: &str) -> Result<T> {
        self.shared.get(op, name)
    }

    fn set<T>(&self, op: rustix::ioctl::Opcode, name: &str, v: &T) -> Result<()> {
        self.shared.set(op, name, v)
    }

    /// The vCPU's state as bytes (see [`super::state`]); only while paused or not
    /// started. After a pause of a running guest the run thread has read it
    /// already, on its own CPU, as it parked: this only waits for that.
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let c = self.quiescent("save_state")?;
        if !c.ready {
            return Err(Error::InvalidArgument("the vCPU holds no guest yet: nothing to save".into()));
        }
        match &c.saved {
            Some(state) => Ok(state.clone()),
            None => self.shared.read_state(),
        }
    }

    /// Verify `bytes` (see [`super::state`]) and load them into the vCPU, which
    /// must be paused or not started; [`start`](Self::start) or
    /// [`resume`](Self::resume) then continues the guest where it was saved.
    ///
    /// If the run thread is spinning for a resume ([`expect_resume`](Self::expect_resume)),
    /// it does the loading ioctls itself, on its own CPU, while the caller goes on
    /// (loading other devices): [`wait_loaded`](Self::wait_loaded) then reports how
    /// that went, and [`resume`](Self::resume) refuses to run a guest whose load failed.
    pub fn load_state(&self, bytes: &[u8]) -> Result<()> {
        let state = VcpuState::decode(bytes)?;
        let mut c = self.quiescent("load_state")?;
        c.saved = None;
        c.loaded = None;
        if !c.exited && c.spin_until.is_some() {
            c.ready = false;
            c.pending = Some(Box::new(state));
            self.shared.work.store(true, Ordering::Release);
            self.shared.cv.notify_all();
            return Ok(());
        }
        self.shared.write_state(&state)?;
        c.ready = true;
        c.failure = None;
        Ok(())
    }

    /// Wait until a state given to [`load_state`](Self::load_state) is loaded; its error if
    /// loading failed (the guest must not run). Returns at once if no load is outstanding.
    pub fn wait_loaded(&self) -> Result<()> {
        match self.shared.settled().loaded.take() {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(2));
    }
}

/// The run thread: park while paused, run the guest otherwise, and record
/// any exit that is not a kick as the guest's failure.
fn run_loop(sh: &Shared) {
    // SAFETY: an empty set plus one valid signal number; changes only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut());
    }
    let failure = loop {
        {
            let mut c = sh.lock();
            loop {
                match c.want {
                    Want::Stop => {
                        if c.pending.take().is_some() {
                            sh.work.store(false, Ordering::Relaxed);
                            c.loaded = Some(Err(Error::InvalidArgument("the vCPU stopped before loading its state".into())));
                        }
                        c.parked = true;
                        c.exited = true;
                        sh.cv.notify_all();
                        return;
                    }
                    Want::Pause => {
                        if !c.parked {
                            c.parked = true;
                            // A guest that ran is paused: read its state now, on this thread
                            // and CPU, while whoever paused it carries on (save_state waits).
                            let save = c.ready && c.saved.is_none();
                            c.busy = save;
                            sh.cv.notify_all();
                            if save {
                                drop(c);
                                let state = sh.read_state().ok(); // (an error: save_state reads again and reports it)
                                c = sh.lock();
                                c.saved = state;
                                c.busy = false;
                                sh.cv.notify_all();
                                continue;
                            }
                        }
                        if let Some(state) = c.pending.take() {
                            // A state to load: here, on the CPU this vCPU will run on.
                            sh.work.store(false, Ordering::Relaxed);
                            c.busy = true;
                            drop(c);
                            let result = sh.write_state(&state);
                            c = sh.lock();
                            c.ready = result.is_ok();
                            if result.is_ok() {
                                c.failure = None;
                            }
                            c.loaded = Some(result);
                            c.busy = false;
                            sh.cv.notify_all();
                            continue;
                        }
                        if let Some(until) = c.spin_until {
                            if Instant::now() >= until {
                                c.spin_until = None;
                                continue;
                            }
                            // Expecting a resume: spin (on our own, otherwise idle CPU) instead
                            // of sleeping, so it costs no wake-up; the lock is free meanwhile.
                            drop(c);
                            while !sh.go.load(Ordering::Acquire) && !sh.work.load(Ordering::Acquire) && Instant::now() < until {
                                std::hint::spin_loop();
                            }
                            c = sh.lock();
                            continue;
                        }
                        c = sh.cv.wait(c).unwrap_or_else(PoisonError::into_inner);
                    }
                    Want::Run => {
                        // Under the lock: a pause sets the flag again only after we release it.
                        sh.run.set_immediate_exit(false);
                        c.parked = false;
                        c.saved = None;
                        c.spin_until = None;
                        sh.cv.notify_all();
                        break;
                    }
                }
            }
        }
        match abi::ioctl_int(sh.fd.as_fd(), abi::KVM_RUN, 0) {
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(e) => break format!("KVM_RUN: {}", Errno::from(e)),
            Ok(_) if sh.run.u32_at(abi::run::EXIT_REASON) == abi::KVM_EXIT_INTR => {}
            Ok(_) => break sh.run.describe_exit(),
        }
    };
    let mut c = sh.lock();
    c.failure = Some(failure);
    c.parked = true;
    c.exited = true;
    sh.cv.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;
    use crate::memfd::{CreateOptions, Region};

    const T: Duration = Duration::from_secs(2);

    fn heartbeat(r: &Region) -> u64 {
        let mut b = [0u8; 8];
        r.mapping().read(layout::HEARTBEAT, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    fn wait_beats(r: &Region, past: u64) -> u64 {
        let t0 = Instant::now();
        loop {
            let h = heartbeat(r);
            if h > past {
                return h;
            }
            assert!(t0.elapsed() < T, "heartbeat stuck at {h}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn boots_pauses_and_hands_state_to_a_second_vm() {
        let Ok(vm) = Vm::create() else { return };
        let vm = Arc::new(vm);
        let r = Region::create("kvm-ram", 64 << 20, &CreateOptions::default()).unwrap();
        vm.set_memory(0, 0, r.mapping(), false).unwrap();
        let vcpu = Vcpu::create(Arc::clone(&vm), 0).unwrap();
        assert!(vcpu.start(None, false).is_err(), "start before setup must fail");
        vcpu.setup_guest(1 << 20, 8 << 20).unwrap();
        vcpu.start(None, false).unwrap();
        assert!(vcpu.running());
        let h = wait_beats(&r, 1000);
        assert!(vcpu.save_state().is_err(), "save while running must fail");
        vcpu.pause(T).unwrap();
        assert!(!vcpu.running());
        let frozen = heartbeat(&r);
        assert!(frozen >= h);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(heartbeat(&r), frozen);
        let state = vcpu.save_state().unwrap();
        vcpu.stop(T).unwrap();

        let vcpu2 = vcpu_on(&r);
        // A target spawns its run thread parked before it has the state; it runs nothing until resumed.
        vcpu2.start(None, true).unwrap();
        assert!(!vcpu2.running());
        assert!(vcpu2.resume(T).is_err(), "resume before load_state must fail");
        vcpu2.load_state(&state).unwrap();
        // Expecting a resume that does not come: the spinning thread still runs nothing,
        // then goes back to sleep; a later window ends in a resume.
        vcpu2.expect_resume(Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(heartbeat(&r), frozen);
        assert!(!vcpu2.running());
        vcpu2.expect_resume(T);
        vcpu2.resume(T).unwrap();
        wait_beats(&r, frozen);
        assert_eq!(vcpu2.exit_reason(), None);
        vcpu2.stop(T).unwrap();
        assert!(!vcpu2.running());
    }

    /// A saved state with the TSC MSR zeroed: the TSC counts on while the guest is paused.
    fn without_tsc(bytes: &[u8]) -> Vec<u8> {
        let mut state = VcpuState::decode(bytes).unwrap();
        state.msrs.iter_mut().filter(|m| m.index == 0x10).for_each(|m| m.data = 0);
        state.encode()
    }

    /// Registers of a paused guest, read through the ioctls (not the run thread's copy).
    fn rip_now(v: &Vcpu) -> u64 {
        v.get::<Regs>(abi::KVM_GET_REGS, "KVM_GET_REGS").unwrap().rip
    }

    /// A vCPU of a new VM whose memory is `r`: another process's VM over the same guest RAM.
    fn vcpu_on(r: &Region) -> Vcpu {
        let vm = Arc::new(Vm::create().unwrap());
        vm.set_memory(0, 0, r.mapping(), false).unwrap();
        Vcpu::create(vm, 0).unwrap()
    }

    /// A fresh 64 MiB RAM with the guest booted on a new VM and beating (None without KVM).
    fn booted() -> Option<(Region, Vcpu, u64)> {
        let vm = Arc::new(Vm::create().ok()?);
        let r = Region::create("kvm-ram", 64 << 20, &CreateOptions::default()).unwrap();
        vm.set_memory(0, 0, r.mapping(), false).unwrap();
        let vcpu = Vcpu::create(vm, 0).unwrap();
        vcpu.setup_guest(1 << 20, 8 << 20).unwrap();
        vcpu.start(None, false).unwrap();
        let h = wait_beats(&r, 100);
        Some((r, vcpu, h))
    }

    #[test]
    fn the_state_read_while_parking_is_the_state_and_never_stale() {
        let Some((r, vcpu, mut h)) = booted() else { return };
        let mut states = Vec::new();
        for _ in 0..3 {
            vcpu.pause(T).unwrap();
            let saved = vcpu.save_state().unwrap();
            assert_eq!(without_tsc(&saved), without_tsc(&vcpu.shared.read_state().unwrap()), "the parked copy differs from KVM's state");
            assert_eq!(VcpuState::decode(&saved).unwrap().regs.rip, rip_now(&vcpu));
            states.push(saved);
            vcpu.resume(T).unwrap();
            h = wait_beats(&r, h);
        }
        assert_ne!(states[0], states[2], "a resumed guest must not report the state of an earlier pause");
        // Loading another state replaces the parked copy.
        vcpu.pause(T).unwrap();
        vcpu.load_state(&states[0]).unwrap();
        assert_eq!(without_tsc(&vcpu.save_state().unwrap()), without_tsc(&states[0]));
        vcpu.stop(T).unwrap();
    }

    #[test]
    fn a_spinning_run_thread_loads_the_state_itself_and_never_runs_a_failed_load() {
        let Some((r, vcpu, _)) = booted() else { return };
        vcpu.pause(T).unwrap();
        let frozen = heartbeat(&r);
        let state = vcpu.save_state().unwrap();
        vcpu.stop(T).unwrap();

        let vcpu2 = vcpu_on(&r);
        vcpu2.start(None, true).unwrap();
        vcpu2.expect_resume(T);
        // A state KVM refuses (an MSR it has never heard of): load_state hands it over and
        // returns (done here, it would have failed), the run thread's load fails, and
        // neither wait_loaded nor resume lets that guest run.
        let mut bad = VcpuState::decode(&state).unwrap();
        bad.msrs[0].index = 0xdead_beef;
        vcpu2.load_state(&bad.encode()).unwrap();
        let err = vcpu2.wait_loaded().unwrap_err().to_string();
        assert!(err.contains("KVM_SET_MSRS"), "{err}");
        assert!(vcpu2.resume(T).is_err(), "a guest whose state failed to load must not run");
        // Failed without wait_loaded: resume itself reports the load's error.
        vcpu2.expect_resume(T);
        vcpu2.load_state(&bad.encode()).unwrap();
        assert!(vcpu2.resume(T).unwrap_err().to_string().contains("KVM_SET_MSRS"));
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(heartbeat(&r), frozen);
        assert!(!vcpu2.running());

        // The real state: loaded by the run thread, equal to what was saved, and it runs.
        vcpu2.expect_resume(T);
        vcpu2.load_state(&state).unwrap();
        vcpu2.wait_loaded().unwrap();
        assert_eq!(without_tsc(&vcpu2.save_state().unwrap()), without_tsc(&state));
        vcpu2.resume(T).unwrap();
        wait_beats(&r, frozen);
        assert_eq!(vcpu2.exit_reason(), None);

        // Stopped with a load outstanding: the load reports that, nothing hangs.
        vcpu2.pause(T).unwrap();
        vcpu2.expect_resume(T);
        vcpu2.load_state(&state).unwrap();
        vcpu2.stop(T).unwrap();
        let _ = vcpu2.wait_loaded(); // loaded before the stop (Ok) or cut short by it (Err): either way, it returns
    }

    #[test]
    fn warm_up_runs_beside_a_live_guest_and_writes_nothing() {
        let Some((r, vcpu, h)) = booted() else { return };

        // A second VM on the same RAM warms up while the first one runs the guest.
        let vcpu2 = vcpu_on(&r);
        assert!(vcpu2.warm_up().unwrap(), "this build's guest code is in RAM: the warm-up runs");
        assert_eq!(vcpu2.exit_reason(), None, "the warm-up's triple fault is not a guest failure");
        assert!(vcpu2.start(None, false).is_err(), "the warm-up leaves no guest to run");
        let h = wait_beats(&r, h);

        // The guest state arrives; the warmed vCPU continues the guest.
        vcpu.pause(T).unwrap();
        let state = vcpu.save_state().unwrap();
        vcpu.stop(T).unwrap();
        // Byte-for-byte: nothing in RAM changed from the pause to here (the warm-up only reads).
        let mut before = vec![0u8; 2 << 20];
        r.mapping().read(0, &mut before).unwrap();
        vcpu2.start(None, true).unwrap();
        assert!(vcpu2.warm_up().is_err(), "no warm-up once the run thread exists");
        vcpu2.load_state(&state).unwrap();
        let mut after = vec![0u8; 2 << 20];
        r.mapping().read(0, &mut after).unwrap();
        assert!(before == after, "guest RAM changed before the target resumed");
        vcpu2.resume(T).unwrap();
        wait_beats(&r, h);
        assert_eq!(vcpu2.exit_reason(), None);
        vcpu2.stop(T).unwrap();

        // RAM holding other guest code: no warm-up, nothing run.
        r.mapping().write(0x4000, &[0x90]).unwrap(); // (the guest is stopped: nobody runs this code)
        let vcpu3 = vcpu_on(&r);
        assert!(!vcpu3.warm_up().unwrap());
    }
}
