//! `Observer` and `ObserverReport`: the external pause observer.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use cprfast_core::layout;
use cprfast_core::observe::{Observer, Report, Target};
use cprfast_core::Error;
use pyo3::prelude::*;

use crate::errors::PyResultCore;

const _: () = assert!(layout::HEARTBEAT == 0x1000, "update the text_signature below");

/// A memfd given as an open fd number or as a path (e.g. `/proc/PID/fd/N`).
#[derive(FromPyObject)]
pub enum PathOrFd {
    /// An fd we do not own.
    Fd(i32),
    /// A path to open read-only.
    Path(PathBuf),
}

impl PathOrFd {
    /// Run `f` with the core's view of this target.
    fn with<T>(&self, f: impl FnOnce(&Target<'_>) -> cprfast_core::Result<T>) -> PyResultCore<T> {
        match self {
            Self::Fd(fd) if *fd < 0 => Err(Error::BadFd(format!("fd {fd} is negative")).into()),
            Self::Fd(fd) => {
                // SAFETY: the fd is only borrowed for this call and never closed;
                // if the caller passed a number that is not open, fstat/mmap fail
                // with EBADF.
                let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
                Ok(f(&Target::Fd(fd))?)
            }
            Self::Path(p) => Ok(f(&Target::Path(p))?),
        }
    }
}

/// What an observer saw; times in ns of CLOCK_MONOTONIC, `*_at_ns` relative to the start.
#[pyclass(name = "ObserverReport", module = "cprfast._core", frozen)]
pub struct PyObserverReport {
    inner: Report,
}

#[pymethods]
impl PyObserverReport {
    /// The longest window in which the heartbeat did not move: the guest pause
    /// (conservative: the smallest window sure to contain it).
    #[getter]
    fn max_stall_ns(&self) -> u64 {
        self.inner.max_stall_ns
    }
    /// Same as `max_stall_ns`.
    #[getter]
    fn pause_ns(&self) -> u64 {
        self.inner.max_stall_ns
    }
    /// When the longest stall started, relative to the start.
    #[getter]
    fn max_stall_at_ns(&self) -> u64 {
        self.inner.max_stall_at_ns
    }
    /// Samples taken.
    #[getter]
    fn samples(&self) -> u64 {
        self.inner.samples
    }
    /// Times the heartbeat was seen to change.
    #[getter]
    fn changes(&self) -> u64 {
        self.inner.changes
    }
    /// Length of the observed window.
    #[getter]
    fn duration_ns(&self) -> u64 {
        self.inner.duration_ns
    }
    /// Absolute CLOCK_MONOTONIC time (as `time.monotonic_ns()`) sampling started.
    #[getter]
    fn started_at_ns(&self) -> u64 {
        self.inner.started_at_ns
    }
    /// The last change happened after this time (relative): where an open stall began.
    #[getter]
    fn last_change_at_ns(&self) -> u64 {
        self.inner.last_change_at_ns
    }
    /// The heartbeat value last read.
    #[getter]
    fn last_value(&self) -> u64 {
        self.inner.last_value
    }
    /// The longest time between two samples: the observer's own resolution.
    #[getter]
    fn max_sample_gap_ns(&self) -> u64 {
        self.inner.max_sample_gap_ns
    }
    /// False if the heartbeat ever went backwards (memory was not preserved).
    #[getter]
    fn heartbeat_monotonic(&self) -> bool {
        self.inner.heartbeat_monotonic
    }
    /// Gap counts in log2 µs buckets: `[(upper_bound_ns, count)]`, non-empty buckets.
    #[getter]
    fn histogram(&self) -> Vec<(u64, u64)> {
        self.inner.histogram.clone()
    }
    /// The stalls longer than `threshold_ns` among the 64 longest: `[(start_ns, length_ns)]`.
    fn gaps_over(&self, threshold_ns: u64) -> Vec<(u64, u64)> {
        self.inner.gaps_over(threshold_ns)
    }
    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "ObserverReport(max_stall_ns={}, max_stall_at_ns={}, samples={}, changes={}, duration_ns={}, last_value={}, heartbeat_monotonic={})",
            r.max_stall_ns,
            r.max_stall_at_ns,
            r.samples,
            r.changes,
            r.duration_ns,
            r.last_value,
            if r.heartbeat_monotonic { "True" } else { "False" }
        )
    }
}

/// Polls the u64 heartbeat at `offset` of a guest-RAM memfd from a native thread.
#[pyclass(name = "Observer", module = "cprfast._core", frozen)]
pub struct PyObserver {
    inner: Observer,
}

#[pymethods]
impl PyObserver {
    #[new]
    #[pyo3(signature = (path_or_fd, offset = layout::HEARTBEAT, *, interval_ns = 0))]
    #[pyo3(text_signature = "(path_or_fd, offset=0x1000, *, interval_ns=0)")]
    fn new(py: Python<'_>, path_or_fd: PathOrFd, offset: usize, interval_ns: u64) -> PyResultCore<Self> {
        let inner = py.detach(|| path_or_fd.with(|t| Observer::new(t, offset, interval_ns)))?;
        Ok(Self { inner })
    }

    /// Start sampling a fresh window; `priority` runs the sampler at that SCHED_FIFO priority,
    /// `cpus` pins it.
    #[pyo3(signature = (priority=None, cpus=None))]
    fn start(&self, priority: Option<i32>, cpus: Option<Vec<usize>>) -> PyResultCore<()> {
        let cpus = crate::sched::cpus(cpus)?;
        Ok(self.inner.start(priority, cpus.as_ref())?)
    }

    /// Stop sampling and return the report of the whole window.
    fn stop(&self, py: Python<'_>) -> PyResultCore<PyObserverReport> {
        let inner = py.detach(|| self.inner.stop())?;
        Ok(PyObserverReport { inner })
    }

    /// The report so far, while running.
    fn snapshot(&self) -> PyResultCore<PyObserverReport> {
        Ok(PyObserverReport { inner: self.inner.snapshot()? })
    }

    /// Follow the heartbeat into another memfd (e.g. a migration target's).
    fn retarget(&self, py: Python<'_>, path_or_fd: PathOrFd) -> PyResultCore<()> {
        py.detach(|| path_or_fd.with(|t| self.inner.retarget(t)))
    }

    /// Whether the sampling thread runs.
    #[getter]
    fn running(&self) -> bool {
        self.inner.running()
    }

    /// The fd or path being observed.
    #[getter]
    fn target(&self) -> String {
        self.inner.target()
    }
}
