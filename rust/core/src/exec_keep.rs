//! Keep the old program's address space (and chosen fds) alive across a
//! cpr-exec, so `execve` does not tear them down while the guest is paused.
//!
//! `execve` drops the old `mm`; when it was the last user, the kernel unmaps
//! every page the old program had mapped (`exit_mmap`: on this machine about
//! 0.3 µs per resident page, 60-170 ms for 1 GiB of touched guest RAM) and
//! closing the close-on-exec KVM fds destroys the old VM, all before the new
//! program runs a line. A [`Keeper`] is a process created with `CLONE_VM` just
//! before `execve`: it shares the old `mm`, so `execve` only drops a
//! reference, and it holds its own copy of the fds the caller names. The
//! successor resumes the guest, then [`release`]s it: the teardown then runs
//! in the keeper's exit, off the pause path.
//!
//! The keeper runs on its own small stack and makes raw system calls only (it
//! shares the caller's memory, so it must not touch the allocator or locks).
//! It dies with its parent (`PR_SET_PDEATHSIG`) and exits on its own after
//! `linger` if nobody releases it. It is created with exit signal 0 (no
//! `SIGCHLD`), so only [`release`] / [`Keeper::cancel`] (`__WALL`) reap it.

use std::ffi::c_void;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::error::{Errno, Error, Result};

const STACK_LEN: usize = 64 << 10;

/// A keeper process holding the old address space; see the module docs.
#[derive(Debug)]
pub struct Keeper {
    pid: i32,
    stack: *mut c_void,
}

// SAFETY: `stack` is only unmapped by `cancel`, after the keeper is reaped; no
// thread of ours dereferences it.
unsafe impl Send for Keeper {}

/// Most fds a keeper holds.
pub const MAX_KEPT_FDS: usize = 64;

/// What the keeper needs; written at the bottom of its stack mapping, so it
/// lives exactly as long as that stack (and the old address space).
#[repr(C)]
struct Args {
    parent: libc::c_long,
    n: usize,
    keep: [RawFd; MAX_KEPT_FDS],
    linger: rustix::thread::Timespec,
}

extern "C" fn keeper_main(arg: *mut c_void) -> libc::c_int {
    // SAFETY: `arg` points at the `Args` that `spawn` wrote into the keeper's
    // stack mapping, which stays mapped until the keeper is reaped. Raw system
    // calls only, which leave errno alone on success (no allocation, no locks:
    // the caller's memory is shared): block every signal (SIGKILL still ends
    // us), PR_SET_PDEATHSIG, close_range over the gaps between kept fds,
    // nanosleep, exit.
    unsafe {
        let args = &*arg.cast::<Args>();
        let all: u64 = !0;
        libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &raw const all, std::ptr::null_mut::<u64>(), 8);
        let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
        if libc::syscall(libc::SYS_getppid) != args.parent {
            libc::syscall(libc::SYS_exit, 0); // the parent died before PR_SET_PDEATHSIG took effect
        }
        let mut low: u32 = 0;
        for &fd in &args.keep[..args.n] {
            let fd = fd as u32;
            if fd > low {
                libc::syscall(libc::SYS_close_range, low, fd - 1, 0);
            }
            low = fd.saturating_add(1);
        }
        libc::syscall(libc::SYS_close_range, low, u32::MAX, 0);
        let _ = rustix::thread::nanosleep(&args.linger);
        libc::syscall(libc::SYS_exit, 0);
    }
    0
}

impl Keeper {
    /// Start a keeper sharing this process's address space and holding copies
    /// of the fds in `keep` (all others are closed in the keeper); it exits by
    /// itself after `linger`. Call it right before `execve`.
    pub fn spawn(keep: &[RawFd], linger: Duration) -> Result<Self> {
        if keep.len() > MAX_KEPT_FDS || keep.iter().any(|&fd| fd < 0) {
            return Err(Error::InvalidArgument(format!(
                "a keeper holds at most {MAX_KEPT_FDS} fds, each >= 0, not {keep:?}"
            )));
        }
        let mut args = Args {
            parent: libc::c_long::from(rustix::process::getpid().as_raw_nonzero().get()),
            n: 0,
            keep: [0; MAX_KEPT_FDS],
            linger: rustix::thread::Timespec {
                tv_sec: linger.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: linger.subsec_nanos().into(),
            },
        };
        let mut sorted = keep.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        args.n = sorted.len();
        args.keep[..sorted.len()].copy_from_slice(&sorted);
        // SAFETY: a fresh private anonymous mapping for the keeper's stack and arguments.
        let stack = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                STACK_LEN,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::os("mmap(keeper stack)", e))?;
        let arg = stack.cast::<Args>();
        // SAFETY: the mapping is page-aligned and far larger than `Args`; the
        // stack grows down from the other end and never reaches it.
        unsafe { arg.write(args) };
        // SAFETY: `keeper_main` runs on the top of the new stack in a process
        // sharing our memory (CLONE_VM, exit signal 0) and touches nothing but
        // its `Args`; the mapping stays until the keeper is reaped (`cancel`),
        // or goes with the old address space after `execve`.
        let pid =
            unsafe { libc::clone(keeper_main, stack.cast::<u8>().add(STACK_LEN).cast(), libc::CLONE_VM, arg.cast()) };
        if pid < 0 {
            let errno = Errno::last();
            // SAFETY: no keeper runs: the mapping is ours again.
            let _ = unsafe { rustix::mm::munmap(stack, STACK_LEN) };
            return Err(Error::Os { op: "clone(CLONE_VM keeper)".into(), errno });
        }
        Ok(Self { pid, stack })
    }

    /// The keeper's process id (the successor passes it to [`release`]).
    #[must_use]
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The `execve` failed: end and reap the keeper, free its stack.
    pub fn cancel(self) -> Result<()> {
        release(self.pid)?;
        // SAFETY: the keeper is reaped, so nothing runs on its stack any more.
        unsafe {
            let _ = rustix::mm::munmap(self.stack, STACK_LEN);
        }
        Ok(())
    }
}

/// End the keeper `pid` (our child) and reap it; the old address space and the
/// fds it kept are released as it exits. Refuses a pid that is not our child.
pub fn release(pid: i32) -> Result<()> {
    if pid <= 0 {
        return Err(Error::InvalidArgument(format!("keeper pid must be > 0, not {pid}")));
    }
    let mut status = 0;
    // SAFETY: waitpid writes one int; WNOHANG: only asks whether `pid` is our (live) child.
    let r = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG | libc::__WALL) };
    if r < 0 {
        return Err(Error::Os { op: format!("waitpid(keeper {pid})"), errno: Errno::last() });
    }
    if r == pid {
        return Ok(()); // it had exited by itself (linger over) and is reaped now
    }
    // SAFETY: `pid` is our unreaped child (waitpid above), so it cannot be a recycled pid.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(Error::Os { op: format!("kill(keeper {pid})"), errno: Errno::last() });
    }
    loop {
        // SAFETY: as above, blocking this time.
        let r = unsafe { libc::waitpid(pid, &raw mut status, libc::__WALL) };
        if r == pid {
            return Ok(());
        }
        let errno = Errno::last();
        if errno.0 != libc::EINTR {
            return Err(Error::Os { op: format!("waitpid(keeper {pid})"), errno });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists(pid: i32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn keeps_chosen_fds_and_is_released() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        use std::os::fd::AsRawFd;
        let keeper = Keeper::spawn(&[w.as_raw_fd()], Duration::from_secs(30)).unwrap();
        let pid = keeper.pid();
        assert!(exists(pid));
        // The keeper shares our memory: its /proc/PID/maps is ours.
        let ours = std::fs::read_to_string("/proc/self/maps").unwrap().lines().count();
        let theirs = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap().lines().count();
        assert!(theirs.abs_diff(ours) < 8, "{ours} vs {theirs} mappings");
        // Wait until it has closed all but the kept fd.
        let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
        let t0 = std::time::Instant::now();
        while fds() != 1 {
            assert!(t0.elapsed() < Duration::from_secs(10), "keeper holds {} fds", fds());
            std::thread::sleep(Duration::from_millis(1));
        }
        // Our write end closed, the keeper's copy still holds the pipe open: no EOF yet.
        drop(w);
        rustix::io::ioctl_fionbio(&r, true).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(rustix::io::read(&r, &mut b).unwrap_err(), rustix::io::Errno::AGAIN);
        keeper.cancel().unwrap();
        assert!(!exists(pid));
        assert_eq!(rustix::io::read(&r, &mut b).unwrap(), 0, "EOF once the keeper is gone");
        assert!(release(pid).is_err(), "not our child any more");
        assert!(release(1).is_err(), "init is not our child");
    }

    #[test]
    fn exits_by_itself_after_linger() {
        let keeper = Keeper::spawn(&[], Duration::from_millis(1)).unwrap();
        let pid = keeper.pid();
        let t0 = std::time::Instant::now();
        // A zombie until reaped: wait for its state to say so.
        while !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z") {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(1));
        }
        keeper.cancel().unwrap();
        assert!(!exists(pid));
    }
}
