//! Page streaming and the mapped-ram save file, over `cprfast_core::pagestream`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use cprfast_core::Error;
use cprfast_core::memfd::{Mapping, host_page_size};
use cprfast_core::pagestream::{self, Control, Progress, Stats};
use numpy::PyReadonlyArray1;
use pyo3::prelude::*;

use crate::errors::CoreError;
use crate::memfd::PyRegion;

/// Counters of a running send/recv/save/load, readable from another thread.
#[pyclass(name = "StreamProgress", module = "cprfast._core", frozen)]
#[derive(Default)]
pub struct PyStreamProgress {
    inner: Arc<Progress>,
}

#[pymethods]
impl PyStreamProgress {
    #[new]
    fn new() -> Self {
        Self::default()
    }
    /// Bytes written or read so far.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes()
    }
    /// Pages handled so far, zero pages included.
    #[getter]
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    /// Pages handled as zero pages (no data).
    #[getter]
    fn zero_pages(&self) -> u64 {
        self.inner.zero_pages()
    }
    /// Chunks (stream) or windows (file) handled so far.
    #[getter]
    fn chunks(&self) -> u64 {
        self.inner.chunks()
    }
    fn __repr__(&self) -> String {
        format!(
            "StreamProgress(bytes={}, pages={}, zero_pages={}, chunks={})",
            self.bytes(),
            self.pages(),
            self.zero_pages(),
            self.chunks()
        )
    }
}

/// Totals of a finished send/recv/save/load.
#[pyclass(name = "StreamStats", module = "cprfast._core", frozen, get_all)]
pub struct PyStreamStats {
    /// Bytes written or read (headers, checksums, tables and page data).
    bytes: u64,
    /// Pages handled, zero pages included.
    pages: u64,
    /// Pages handled as zero pages.
    zero_pages: u64,
    /// Chunks (stream) or windows (file) handled.
    chunks: u64,
    /// Wall-clock seconds.
    seconds: f64,
}

#[pymethods]
impl PyStreamStats {
    fn __repr__(&self) -> String {
        format!(
            "StreamStats(bytes={}, pages={}, zero_pages={}, chunks={}, seconds={:.6})",
            self.bytes, self.pages, self.zero_pages, self.chunks, self.seconds
        )
    }
}

impl From<Stats> for PyStreamStats {
    fn from(s: Stats) -> Self {
        Self {
            bytes: s.bytes,
            pages: s.pages,
            zero_pages: s.zero_pages,
            chunks: s.chunks,
            seconds: s.seconds,
        }
    }
}

/// Our own duplicate of a caller's fd, so it stays valid while the GIL is released.
fn dup_fd(fd: i32, what: &str) -> PyResult<OwnedFd> {
    if fd < 0 {
        return Err(CoreError(Error::BadFd(format!("{what} fd {fd} is negative"))).into());
    }
    // SAFETY: `fd` is only borrowed for the duration of the `fcntl` call below;
    // if it is not open the kernel returns EBADF, which we report.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_dupfd_cloexec(borrowed, 0).map_err(|e| {
        CoreError(if e == rustix::io::Errno::BADF {
            Error::BadFd(format!("{what} fd {fd} is not open"))
        } else {
            Error::os(format!("fcntl(F_DUPFD_CLOEXEC, {what} fd {fd})"), e)
        })
        .into()
    })
}

/// The region's mapping, and its memfd opened anew read-only (its own file
/// offset) for hole detection with `SEEK_DATA`.
fn source(region: &Bound<'_, PyRegion>) -> PyResult<(Arc<Mapping>, OwnedFd)> {
    let mapping = region.get().mapping()?;
    let memfd: i32 = region.call_method0("fileno")?.extract()?;
    let path = format!("/proc/self/fd/{memfd}");
    let fd = rustix::fs::open(
        &path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| CoreError(Error::os(format!("open({path})"), e)))?;
    Ok((mapping, fd))
}

/// A copy of the dirty words (small: 1 bit per page), so no NumPy borrow
/// is held while the GIL is released.
fn dirty_words(dirty: Option<PyReadonlyArray1<'_, u64>>) -> PyResult<Option<Vec<u64>>> {
    dirty.map(|a| Ok(a.as_array().iter().copied().collect())).transpose()
}

/// Run `f` with the GIL released; a signal that interrupts a blocking call
/// runs the Python handlers, and an exception they raise is re-raised here.
fn run<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyStreamProgress>>,
    f: impl FnOnce(&Control<'_>) -> cprfast_core::Result<T> + Send,
) -> PyResult<T> {
    let progress = progress.map(|p| Arc::clone(&p.get().inner));
    let pending: Mutex<Option<PyErr>> = Mutex::new(None);
    let hook = || {
        Python::attach(|py| py.check_signals()).map_or_else(
            |e| {
                if let Ok(mut p) = pending.lock() {
                    p.get_or_insert(e);
                }
                true
            },
            |()| false,
        )
    };
    let result = py.detach(|| {
        f(&Control {
            progress: progress.as_deref(),
            interrupted: Some(&hook),
        })
    });
    if let Some(e) = pending.into_inner().ok().flatten() {
        return Err(e);
    }
    result.map_err(|e| CoreError(e).into())
}

/// Send the pages set in `dirty` (all if None) to `fd` and the `channels`.
#[pyfunction]
#[pyo3(
    signature = (region, fd, *, dirty=None, bandwidth=0, progress=None, channels=Vec::new()),
    text_signature = "(region, fd, *, dirty=None, bandwidth=0, progress=None, channels=())"
)]
pub fn send_pages(
    py: Python<'_>,
    region: &Bound<'_, PyRegion>,
    fd: i32,
    dirty: Option<PyReadonlyArray1<'_, u64>>,
    bandwidth: u64,
    progress: Option<&Bound<'_, PyStreamProgress>>,
    channels: Vec<i32>,
) -> PyResult<PyStreamStats> {
    let (mapping, memfd) = source(region)?;
    let fds = std::iter::once(fd)
        .chain(channels)
        .map(|f| dup_fd(f, "stream"))
        .collect::<PyResult<Vec<_>>>()?;
    let dirty = dirty_words(dirty)?;
    run(py, progress, |ctl| {
        let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        pagestream::send(&mapping, Some(memfd.as_fd()), &fds, dirty.as_deref(), bandwidth, ctl)
    })
    .map(Into::into)
}

/// Receive a page stream from `fd` and the `channels` into `region`.
#[pyfunction]
#[pyo3(
    signature = (region, fd, *, progress=None, channels=Vec::new()),
    text_signature = "(region, fd, *, progress=None, channels=())"
)]
pub fn recv_pages(
    py: Python<'_>,
    region: &Bound<'_, PyRegion>,
    fd: i32,
    progress: Option<&Bound<'_, PyStreamProgress>>,
    channels: Vec<i32>,
) -> PyResult<PyStreamStats> {
    let mapping = region.get().mapping()?;
    let fds = std::iter::once(fd)
        .chain(channels)
        .map(|f| dup_fd(f, "stream"))
        .collect::<PyResult<Vec<_>>>()?;
    run(py, progress, |ctl| {
        let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        pagestream::recv(&mapping, &fds, ctl)
    })
    .map(Into::into)
}

/// Save `region` (or just its `dirty` pages, updating a save in place) to the file `fd` at `offset`.
#[pyfunction]
#[pyo3(signature = (region, fd, offset=0, *, dirty=None, threads=0, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn save_mapped(
    py: Python<'_>,
    region: &Bound<'_, PyRegion>,
    fd: i32,
    offset: u64,
    dirty: Option<PyReadonlyArray1<'_, u64>>,
    threads: usize,
    progress: Option<&Bound<'_, PyStreamProgress>>,
) -> PyResult<PyStreamStats> {
    let (mapping, memfd) = source(region)?;
    let file = dup_fd(fd, "save file")?;
    let dirty = dirty_words(dirty)?;
    run(py, progress, |ctl| {
        pagestream::save_mapped(
            &mapping,
            Some(memfd.as_fd()),
            file.as_fd(),
            offset,
            dirty.as_deref(),
            threads,
            ctl,
        )
    })
    .map(Into::into)
}

/// Load a save made by `save_mapped` from the file `fd` at `offset` into `region`.
#[pyfunction]
#[pyo3(signature = (region, fd, offset=0, *, threads=0, progress=None))]
pub fn load_mapped(
    py: Python<'_>,
    region: &Bound<'_, PyRegion>,
    fd: i32,
    offset: u64,
    threads: usize,
    progress: Option<&Bound<'_, PyStreamProgress>>,
) -> PyResult<PyStreamStats> {
    let mapping = region.get().mapping()?;
    let file = dup_fd(fd, "save file")?;
    run(py, progress, |ctl| {
        pagestream::load_mapped(&mapping, file.as_fd(), offset, threads, ctl)
    })
    .map(Into::into)
}

/// Bytes a mapped-ram save of a region of `region_size` bytes occupies.
#[pyfunction]
#[pyo3(signature = (region_size, page_size=None))]
pub fn mapped_file_size(region_size: usize, page_size: Option<usize>) -> PyResult<u64> {
    Ok(pagestream::mapped_file_size(region_size, page_size.unwrap_or_else(host_page_size)).map_err(CoreError)?)
}

/// xxh3-64 of `data`: the checksum page-stream frames and mapped-ram saves carry
/// (so tools and the fuzzers can write frames the receiver's checksum accepts).
#[pyfunction]
pub fn checksum(data: &[u8]) -> u64 {
    pagestream::checksum(data)
}
