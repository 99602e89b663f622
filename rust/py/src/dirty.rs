//! Dirty tracking: `DirtyBitmap`, `DirtySet`, `Tracker`, `probe_write_tracking`.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cprfast_core::dirty::bitmap::DirtyBitmap;
use cprfast_core::dirty::tracker::{Sources, Tracker};
use cprfast_core::dirty::uffd_wp;
use cprfast_core::dirty::{DirtySet, Ranges};
use cprfast_core::memfd::host_page_size;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{CoreError, PyResultCore};
use crate::memfd::PyRegion;

/// An atomic dirty bitmap (one bit per host page) that a VMM marks itself,
/// e.g. from device emulation threads; safe to mark from any thread.
#[pyclass(name = "DirtyBitmap", module = "cprfast._core", frozen)]
pub struct PyDirtyBitmap {
    inner: Arc<DirtyBitmap>,
}

impl PyDirtyBitmap {
    /// The shared bitmap, for other binding modules.
    pub fn bitmap(&self) -> Arc<DirtyBitmap> {
        Arc::clone(&self.inner)
    }
}

#[pymethods]
impl PyDirtyBitmap {
    #[new]
    fn new(npages: usize) -> PyResultCore<Self> {
        Ok(Self { inner: Arc::new(DirtyBitmap::new(npages)?) })
    }

    /// Number of pages.
    #[getter]
    fn npages(&self) -> usize {
        self.inner.npages()
    }

    /// Mark one page dirty.
    fn mark(&self, page: usize) -> PyResultCore<()> {
        Ok(self.inner.mark(page)?)
    }

    /// Mark `count` pages from `first` (one atomic OR per 64 pages).
    fn mark_range(&self, py: Python<'_>, first: usize, count: usize) -> PyResultCore<()> {
        Ok(py.detach(|| self.inner.mark_range(first, count))?)
    }

    /// Mark every host page overlapping bytes `[offset, offset + length)`.
    fn mark_bytes(&self, py: Python<'_>, offset: usize, length: usize) -> PyResultCore<()> {
        Ok(py.detach(|| self.inner.mark_bytes(offset, length))?)
    }

    /// Whether `page` is dirty.
    fn test(&self, page: usize) -> PyResultCore<bool> {
        Ok(self.inner.test(page)?)
    }

    /// Number of dirty pages.
    fn count(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.count())
    }

    /// Get and clear (an atomic swap per word).
    fn sync(&self, py: Python<'_>) -> PyResult<PyDirtySet> {
        let set = py.detach(|| self.inner.sync());
        PyDirtySet::new(py, set)
    }

    /// Forget every mark.
    fn clear(&self, py: Python<'_>) {
        py.detach(|| self.inner.clear());
    }

    fn __repr__(&self) -> String {
        format!("DirtyBitmap(npages={}, count={})", self.inner.npages(), self.inner.count())
    }
}

/// The pages dirtied since the previous sync: a read-only NumPy uint64 word
/// array (bit `i % 64` of word `i // 64` is page `i`) that owns the sync's
/// buffer (no copy), and its coalesced runs.
#[pyclass(name = "DirtySet", module = "cprfast._core", frozen)]
pub struct PyDirtySet {
    words: Py<PyArray1<u64>>,
    count: usize,
    npages: usize,
}

impl PyDirtySet {
    fn new(py: Python<'_>, set: DirtySet) -> PyResult<Self> {
        let (count, npages) = (set.count(), set.npages());
        let words = PyArray1::from_vec(py, set.into_words());
        // Read-only, so `count` and `ranges()` can never disagree with `words`.
        words.call_method1("setflags", (false,))?;
        Ok(Self { words: words.unbind(), count, npages })
    }
}

#[pymethods]
impl PyDirtySet {
    /// The bitmap words (read-only uint64 array).
    #[getter]
    fn words<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        self.words.bind(py).clone()
    }

    /// Number of dirty pages.
    #[getter]
    fn count(&self) -> usize {
        self.count
    }

    /// Number of pages covered.
    #[getter]
    fn npages(&self) -> usize {
        self.npages
    }

    /// Bytes per page (the host page size).
    #[getter]
    fn page_size(&self) -> usize {
        host_page_size()
    }

    /// Coalesced runs of dirty pages: `[(first page, count), ...]`.
    fn ranges(&self, py: Python<'_>) -> PyResult<Vec<(usize, usize)>> {
        let words = self.words.bind(py).readonly();
        let slice = words.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Ranges::new(slice, self.npages).collect())
    }

    fn __len__(&self) -> usize {
        self.count
    }

    fn __repr__(&self) -> String {
        format!("DirtySet(count={}, npages={})", self.count, self.npages)
    }
}

/// Dirty tracking of one region, merging the kernel's write tracking, a
/// `DirtyBitmap` and a KVM memory slot's dirty log.
#[pyclass(name = "Tracker", module = "cprfast._core", frozen)]
pub struct PyTracker {
    inner: Mutex<Tracker>,
}

impl PyTracker {
    fn lock(&self) -> MutexGuard<'_, Tracker> {
        // A panic mid-sync leaves the tracker consistent (counters aside).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[pymethods]
impl PyTracker {
    #[new]
    #[pyo3(signature = (region, *, kernel=false, bitmap=None, kvm=None))]
    fn new(
        py: Python<'_>,
        region: &Bound<'_, PyRegion>,
        kernel: bool,
        bitmap: Option<&Bound<'_, PyDirtyBitmap>>,
        kvm: Option<(i32, u32)>,
    ) -> PyResult<Self> {
        let mapping = region.get().mapping()?;
        let bitmap = bitmap.map(|b| b.get().bitmap());
        if let Some((fd, _)) = kvm
            && fd < 0
        {
            return Err(PyValueError::new_err(format!("invalid KVM VM fd {fd}")));
        }
        let tracker = py.detach(|| {
            // SAFETY: the fd number is only borrowed for the duration of this
            // call, to duplicate it; a closed number makes dup fail with EBADF.
            let kvm = kvm.map(|(fd, slot)| (unsafe { BorrowedFd::borrow_raw(fd) }, slot));
            Tracker::new(mapping, Sources { kernel, bitmap, kvm })
        });
        Ok(Self { inner: Mutex::new(tracker.map_err(CoreError)?) })
    }

    /// Begin tracking (discards anything accumulated before).
    fn start(&self, py: Python<'_>) -> PyResultCore<()> {
        Ok(py.detach(|| self.lock().start())?)
    }

    /// Get and clear the pages dirtied since the last sync, from every source.
    fn sync(&self, py: Python<'_>) -> PyResult<PyDirtySet> {
        let set = py.detach(|| self.lock().sync()).map_err(CoreError)?;
        PyDirtySet::new(py, set)
    }

    /// Stop tracking; the mapping is untracked again. Idempotent.
    fn stop(&self, py: Python<'_>) -> PyResultCore<()> {
        Ok(py.detach(|| self.lock().stop())?)
    }

    /// Whether tracking is started.
    #[getter]
    fn active(&self) -> bool {
        self.lock().active()
    }

    /// Number of syncs so far.
    #[getter]
    fn syncs(&self) -> u64 {
        self.lock().syncs()
    }

    /// Dirty pages in the last sync.
    #[getter]
    fn last_count(&self) -> usize {
        self.lock().last_count()
    }

    /// Pages tracked (host pages of the region).
    #[getter]
    fn npages(&self) -> usize {
        self.lock().npages()
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().start(slf.py())?;
        Ok(slf)
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _ty: Option<&Bound<'_, PyAny>>,
        _value: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResultCore<()> {
        self.stop(py)
    }
}

/// Check userfaultfd async write-protect and PAGEMAP_SCAN on this kernel.
#[pyfunction]
pub fn probe_write_tracking(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let p = py.detach(uffd_wp::probe);
    let d = PyDict::new(py);
    d.set_item("available", p.available)?;
    d.set_item("detail", p.detail)?;
    d.set_item("errno", p.errno)?;
    d.set_item("userfaultfd", p.userfaultfd)?;
    d.set_item("wp_async", p.wp_async)?;
    d.set_item("pagemap_scan", p.pagemap_scan)?;
    Ok(d)
}
