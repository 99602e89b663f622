//! `Region`: a guest-RAM memfd region as a Python object.
//!
//! The region lives in a `RwLock<Option<Region>>`: readers hold the lock only
//! for the instant they need the fd, or clone the `Arc<Mapping>` and drop the
//! lock before bulk work, so nothing ever waits for the GIL while holding it.
//! Exported buffers are counted; `close()` refuses while any is alive, like
//! `mmap.close()`, so a `memoryview` can never outlive the mapping.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use cprfast_core::Error;
use cprfast_core::memfd::{self, CreateOptions, Mapping, Region, Timings};
use numpy::{IntoPyArray, PyArray1};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::{CoreError, PyResultCore};

/// Convert a core result for a `PyResult` function.
fn core<T>(r: cprfast_core::Result<T>) -> PyResult<T> {
    r.map_err(|e| CoreError(e).into())
}

fn closed() -> PyErr {
    PyValueError::new_err("region is closed")
}

/// A named guest-RAM region backed by a sealed memfd, mapped MAP_SHARED.
#[pyclass(name = "Region", module = "cprfast._core", frozen)]
pub struct PyRegion {
    inner: RwLock<Option<Region>>,
    /// Buffers exported through the buffer protocol and not yet released.
    exports: AtomicUsize,
    /// Set-up timings; `prefault` is updated by every `prefault()` call.
    timings: Mutex<Timings>,
}

impl PyRegion {
    fn new(region: Region) -> Self {
        let timings = Mutex::new(region.timings());
        Self { inner: RwLock::new(Some(region)), exports: AtomicUsize::new(0), timings }
    }

    fn guard(&self) -> PyResult<RwLockReadGuard<'_, Option<Region>>> {
        self.inner.read().map_err(|_| PyValueError::new_err("region lock poisoned"))
    }

    /// Run `f` on the open region under the read lock.
    fn with<T>(&self, f: impl FnOnce(&Region) -> PyResult<T>) -> PyResult<T> {
        f(self.guard()?.as_ref().ok_or_else(closed)?)
    }

    /// The live mapping, for other binding modules; errors if closed.
    pub fn mapping(&self) -> PyResult<Arc<Mapping>> {
        self.with(|r| Ok(r.mapping()))
    }

    fn timings_lock(&self) -> PyResult<std::sync::MutexGuard<'_, Timings>> {
        self.timings.lock().map_err(|_| PyValueError::new_err("region lock poisoned"))
    }
}

#[pymethods]
impl PyRegion {
    /// Create a region of `size` bytes named `name`: a memfd (MFD_CLOEXEC),
    /// sealed against grow and shrink unless `seal=False`, optionally backed by
    /// hugetlb pages (2 MiB or 1 GiB), advised to use shmem THP (`thp=True`),
    /// and populated up front (`prefault=True`).
    #[staticmethod]
    #[pyo3(signature = (name, size, *, hugetlb=None, seal=true, thp=false, prefault=false))]
    fn create(
        py: Python<'_>,
        name: &str,
        size: usize,
        hugetlb: Option<usize>,
        seal: bool,
        thp: bool,
        prefault: bool,
    ) -> PyResult<Self> {
        let opts = CreateOptions { hugetlb, seal, thp, prefault };
        let region = core(py.detach(|| Region::create(name, size, &opts)))?;
        if let Some(mode @ ("never" | "deny")) = region.thp_mode() {
            let msg = format!(
                "region {name}: thp=True advised MADV_HUGEPAGE, but shmem THP is '{mode}' in {}: \
                 the advice has no effect and pages stay {} bytes",
                memfd::SHMEM_THP_SYSFS,
                memfd::host_page_size()
            );
            py.import("logging")?.call_method1("getLogger", ("cprfast.memfd",))?.call_method1("warning", (msg,))?;
        }
        Ok(Self::new(region))
    }

    /// Adopt a memfd received from another process: refuse it (BadFdError) unless
    /// it is a memfd open read-write, of exactly `size` bytes, sealed against
    /// grow and shrink (if `require_seals`). The region maps its own
    /// close-on-exec duplicate; the caller still owns and closes `fd`.
    #[staticmethod]
    #[pyo3(signature = (fd, size, *, name=None, require_seals=true))]
    fn adopt(py: Python<'_>, fd: i32, size: usize, name: Option<&str>, require_seals: bool) -> PyResultCore<Self> {
        if fd < 0 {
            return Err(Error::BadFd(format!("fd {fd} is not a file descriptor")).into());
        }
        // SAFETY: the fd is only used for the duration of this call, to dup it;
        // if it is not open, the dup fails with EBADF and nothing else touches it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let region = py.detach(|| Region::adopt(borrowed, size, name, require_seals))?;
        Ok(Self::new(region))
    }

    /// The memfd number (owned by the region).
    fn fileno(&self) -> PyResult<i32> {
        self.with(|r| Ok(r.fd().as_raw_fd()))
    }

    /// The region's name (the memfd's name in /proc/PID/fd).
    #[getter]
    fn name(&self) -> PyResult<String> {
        self.with(|r| Ok(r.name().to_owned()))
    }

    /// Size in bytes.
    #[getter]
    fn size(&self) -> PyResult<usize> {
        Ok(self.mapping()?.len())
    }

    /// Page size of the backing memory (host page, or the hugetlb page size).
    #[getter]
    fn page_size(&self) -> PyResult<usize> {
        Ok(self.mapping()?.page_size())
    }

    /// Number of pages.
    #[getter]
    fn pages(&self) -> PyResult<usize> {
        Ok(self.mapping()?.pages())
    }

    /// Base address of the mapping in this process (for KVM memory slots).
    #[getter]
    fn address(&self) -> PyResult<usize> {
        Ok(self.mapping()?.as_ptr() as usize)
    }

    /// The memfd's seals as an int of F_SEAL_* bits.
    #[getter]
    fn seals(&self, py: Python<'_>) -> PyResult<u32> {
        py.detach(|| self.with(|r| core(r.seals()).map(|s| s.bits())))
    }

    /// The shmem THP mode in force when created with `thp=True`, else None.
    #[getter]
    fn thp(&self) -> PyResult<Option<String>> {
        self.with(|r| Ok(r.thp_mode().map(str::to_owned)))
    }

    /// Seconds spent in "create" (or adopt checks), "map" and "prefault" (0.0 until prefaulted).
    #[getter]
    fn timings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = *self.timings_lock()?;
        let d = PyDict::new(py);
        d.set_item("create", t.create.as_secs_f64())?;
        d.set_item("map", t.map.as_secs_f64())?;
        d.set_item("prefault", t.prefault.as_secs_f64())?;
        Ok(d)
    }

    /// True once closed.
    #[getter]
    fn closed(&self) -> PyResult<bool> {
        Ok(self.guard()?.is_none())
    }

    /// Whether the memfd stays open across exec (FD_CLOEXEC clear).
    #[getter]
    fn preserved(&self, py: Python<'_>) -> PyResult<bool> {
        py.detach(|| self.with(|r| core(r.preserved())))
    }

    /// Keep the memfd open across exec (clear FD_CLOEXEC), for cpr-exec.
    fn preserve(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.with(|r| core(r.set_preserved(true))))
    }

    /// Close the memfd on exec again (set FD_CLOEXEC).
    fn unpreserve(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.with(|r| core(r.set_preserved(false))))
    }

    /// Populate every page now (MADV_POPULATE_WRITE) with `threads` threads
    /// (0 = available parallelism); returns the seconds it took.
    #[pyo3(signature = (threads=0))]
    fn prefault(&self, py: Python<'_>, threads: usize) -> PyResult<f64> {
        let m = self.mapping()?;
        let took = core(py.detach(|| m.prefault(threads)))?;
        self.timings_lock()?.prefault = took;
        Ok(took.as_secs_f64())
    }

    /// One xxh3-64 checksum per page as a uint64 array, computed by `threads`
    /// threads (0 = available parallelism).
    #[pyo3(signature = (threads=0))]
    fn checksums<'py>(&self, py: Python<'py>, threads: usize) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let m = self.mapping()?;
        Ok(py.detach(|| m.checksums(threads)).into_pyarray(py))
    }

    /// The checksum `checksums()` gives a page of zeros in this region.
    fn zero_page_checksum(&self) -> PyResult<u64> {
        Ok(memfd::zero_page_checksum(self.mapping()?.page_size()))
    }

    /// Copy `length` bytes at `offset` out of the region.
    fn read<'py>(&self, py: Python<'py>, offset: usize, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let m = self.mapping()?;
        core(m.check_range(offset, length))?;
        PyBytes::new_with(py, length, |out| core(py.detach(|| m.read(offset, out))))
    }

    /// Copy any C-contiguous bytes-like object into the region at `offset`.
    fn write(&self, py: Python<'_>, offset: usize, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = PyUntypedBuffer::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(PyBufferError::new_err("data must be a C-contiguous buffer"));
        }
        let m = self.mapping()?;
        let (src, len) = (buf.buf_ptr() as usize, buf.len_bytes());
        // SAFETY: `buf` holds the exporter's buffer (`len` readable bytes at
        // `src`) until it drops after this call.
        core(py.detach(|| unsafe { m.write_raw(offset, src as *const u8, len) }))
    }

    /// Unmap and close the memfd. Idempotent. Raises BufferError while a
    /// buffer (memoryview, NumPy array) of the region is still alive.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut guard = self.inner.write().map_err(|_| PyValueError::new_err("region lock poisoned"))?;
            let exports = self.exports.load(Ordering::SeqCst);
            if exports > 0 && guard.is_some() {
                return Err(CoreError(Error::Busy(format!(
                    "cannot close region: {exports} exported buffer(s) (memoryview, NumPy array) still alive"
                )))
                .into());
            }
            drop(guard.take());
            Ok(())
        })
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> PyResult<String> {
        Ok(match self.guard()?.as_ref() {
            Some(r) => format!("<Region {:?} size={} fd={}>", r.name(), r.size(), r.fd().as_raw_fd()),
            None => "<Region closed>".to_owned(),
        })
    }

    /// Export the mapping as writable 1-D unsigned bytes, without a copy.
    ///
    /// # Safety
    /// `view` must be a `Py_buffer` CPython hands us to fill.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        let this = slf.get();
        let (ptr, len) = this.with(|r| {
            let len = isize::try_from(r.size()).map_err(|_| PyBufferError::new_err("region too large"))?;
            // Counted under the read lock, so `close()` (write lock) sees it.
            this.exports.fetch_add(1, Ordering::SeqCst);
            Ok((r.mapping().as_ptr(), len))
        })?;
        // SAFETY: `view` is non-null and ours to fill. The mapping stays mapped
        // while this export is counted (close refuses) and `obj` keeps the region
        // alive; `format` points to a static string CPython never writes, and
        // `shape`/`strides` point into the view itself, as CPython allows.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr.cast();
            (*view).len = len;
            (*view).readonly = 0;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape =
                if flags & ffi::PyBUF_ND == ffi::PyBUF_ND { &raw mut (*view).len } else { std::ptr::null_mut() };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                &raw mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    /// Forget one export; the last one lets `close()` proceed.
    ///
    /// # Safety
    /// Called by CPython once per successful `__getbuffer__`.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.exports.fetch_sub(1, Ordering::SeqCst);
    }
}
