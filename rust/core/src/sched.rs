//! Where native threads run: CPU pinning for vCPU threads (what libvirt's
//! `vcpupin` does for QEMU) and real-time priority for the pause observer.
//!
//! On a small host a vCPU that shares its CPU with the VMM's own threads is
//! preempted for whole scheduler slices (4–16 ms here) whenever those threads
//! are busy, e.g. during a migration; pinning it to a CPU of its own keeps
//! the guest's timing the guest's.

use std::thread::{Builder, JoinHandle};

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

use crate::error::{Errno, Error, Result};

/// A set of CPUs to pin a thread to, checked against those this process may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpus {
    cpus: Vec<usize>,
}

impl Cpus {
    /// The CPUs in `cpus`. An empty list or a CPU number past the kernel's
    /// limit is refused here; a CPU this process may not use is refused when
    /// a thread is pinned (the kernel knows the cpuset), before it runs.
    pub fn new(cpus: &[usize]) -> Result<Self> {
        if cpus.is_empty() {
            return Err(Error::InvalidArgument("an empty CPU list pins a thread nowhere".into()));
        }
        if let Some(bad) = cpus.iter().find(|&&c| c >= CpuSet::MAX_CPU) {
            return Err(Error::InvalidArgument(format!("CPU {bad} is past the kernel's limit of {}", CpuSet::MAX_CPU)));
        }
        let mut sorted = cpus.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        Ok(Self { cpus: sorted })
    }

    /// The CPUs, ascending.
    #[must_use]
    pub fn as_slice(&self) -> &[usize] {
        &self.cpus
    }

    fn set(&self) -> CpuSet {
        let mut set = CpuSet::new();
        for &cpu in &self.cpus {
            set.set(cpu);
        }
        set
    }
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(None).map_err(|e| Error::os("sched_getaffinity", e))?;
    Ok((0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect())
}

/// Spawn `f` on a thread that is pinned to `cpus` from its first instruction
/// (`None`: it runs wherever its creator may).
///
/// A new thread inherits its creator's affinity, so the caller is pinned to
/// `cpus` for the length of the `clone` and then restored: the thread never
/// runs unpinned, and a failure leaves no thread behind.
pub fn spawn_pinned<F, T>(builder: Builder, cpus: Option<&Cpus>, f: F) -> Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let spawn = |b: Builder, f: F| {
        b.spawn(f).map_err(|e| Error::os("spawn thread", Errno(e.raw_os_error().unwrap_or(libc::EAGAIN))))
    };
    let Some(cpus) = cpus else { return spawn(builder, f) };
    let saved = sched_getaffinity(None).map_err(|e| Error::os("sched_getaffinity", e))?;
    sched_setaffinity(None, &cpus.set()).map_err(|e| Error::os(format!("sched_setaffinity({:?})", cpus.cpus), e))?;
    // The kernel silently drops CPUs outside this process's cpuset: check.
    let got = allowed_cpus();
    let handle = match got {
        Ok(got) if got == cpus.cpus => spawn(builder, f),
        Ok(got) => Err(Error::InvalidArgument(format!(
            "cannot pin to CPUs {:?}: this process may use only {got:?} of them",
            cpus.cpus
        ))),
        Err(e) => Err(e),
    };
    // Restoring a set the kernel gave us a moment ago cannot be refused.
    let _ = sched_setaffinity(None, &saved);
    handle
}

/// Give a running thread `SCHED_FIFO` at `priority` (1–99): it preempts every
/// normal thread the moment it wakes. Needs `CAP_SYS_NICE` (EPERM otherwise).
pub fn set_fifo<T>(thread: &JoinHandle<T>, priority: i32) -> Result<()> {
    use std::os::unix::thread::JoinHandleExt;
    if !(1..=99).contains(&priority) {
        return Err(Error::InvalidArgument(format!("SCHED_FIFO priority {priority} is outside 1..=99")));
    }
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: the handle's pthread_t names a thread that has not been joined
    // (we hold its JoinHandle), and `param` is a valid sched_param.
    let rc = unsafe { libc::pthread_setschedparam(thread.as_pthread_t(), libc::SCHED_FIFO, &raw const param) };
    if rc != 0 {
        return Err(Error::os(format!("pthread_setschedparam(SCHED_FIFO, {priority})"), Errno(rc)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> Vec<usize> {
        allowed_cpus().unwrap()
    }

    #[test]
    fn refuses_empty_absurd_and_unavailable_cpus() {
        assert!(matches!(Cpus::new(&[]), Err(Error::InvalidArgument(_))));
        assert!(matches!(Cpus::new(&[CpuSet::MAX_CPU]), Err(Error::InvalidArgument(_))));
        let offline = Cpus::new(&[CpuSet::MAX_CPU - 1]).unwrap();
        let before = current();
        assert!(spawn_pinned(Builder::new(), Some(&offline), || ()).is_err());
        assert_eq!(current(), before);
    }

    #[test]
    fn pinned_thread_runs_only_on_its_cpus_and_caller_is_restored() {
        let before = current();
        let last = *before.last().unwrap();
        let cpus = Cpus::new(&[last, last]).unwrap();
        assert_eq!(cpus.as_slice(), &[last]);
        let inside = spawn_pinned(Builder::new(), Some(&cpus), current).unwrap().join().unwrap();
        assert_eq!(inside, vec![last]);
        assert_eq!(current(), before);
        let free = spawn_pinned(Builder::new(), None, current).unwrap().join().unwrap();
        assert_eq!(free, before);
    }

    #[test]
    fn fifo_priority_is_checked_and_applied_or_refused_with_eperm() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        assert!(matches!(set_fifo(&t, 0), Err(Error::InvalidArgument(_))));
        match set_fifo(&t, 1) {
            Ok(()) => {}
            Err(Error::Os { errno, .. }) => assert_eq!(errno, Errno(libc::EPERM)),
            Err(e) => panic!("unexpected {e}"),
        }
        tx.send(()).unwrap();
        t.join().unwrap();
    }
}
