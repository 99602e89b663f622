//! `Region`: a guest-RAM memfd region as a Python object.

use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};

use cprfast_core::memfd::{CreateOptions, Mapping, Region};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::PyResultCore;

/// A named guest-RAM region backed by a sealed memfd, mapped MAP_SHARED.
#[pyclass(name = "Region", module = "cprfast._core", frozen)]
pub struct PyRegion {
    inner: RwLock<Option<Region>>,
}

impl PyRegion {
    /// The live mapping, for other binding modules; errors if closed.
    pub fn mapping(&self) -> PyResult<Arc<Mapping>> {
        let guard = self.inner.read().map_err(|_| PyValueError::new_err("region lock poisoned"))?;
        guard
            .as_ref()
            .map(Region::mapping)
            .ok_or_else(|| PyValueError::new_err("region is closed"))
    }
}

#[pymethods]
impl PyRegion {
    /// Create a region of `size` bytes named `name`.
    #[staticmethod]
    #[pyo3(signature = (name, size, *, hugetlb=None, seal=true))]
    fn create(py: Python<'_>, name: &str, size: usize, hugetlb: Option<usize>, seal: bool) -> PyResultCore<Self> {
        let opts = CreateOptions { hugetlb, seal };
        let region = py.detach(|| Region::create(name, size, &opts))?;
        Ok(Self { inner: RwLock::new(Some(region)) })
    }

    /// The memfd number (owned by the region).
    fn fileno(&self) -> PyResult<i32> {
        let guard = self.inner.read().map_err(|_| PyValueError::new_err("region lock poisoned"))?;
        guard.as_ref().map(|r| r.fd().as_raw_fd()).ok_or_else(|| PyValueError::new_err("region is closed"))
    }

    /// Size in bytes.
    #[getter]
    fn size(&self) -> PyResult<usize> {
        Ok(self.mapping()?.len())
    }

    /// Address of the first byte of the mapping (for ctypes/KVM).
    #[getter]
    fn address(&self) -> PyResult<usize> {
        Ok(self.mapping()?.as_ptr() as usize)
    }

    /// Unmap and close the memfd. Idempotent.
    fn close(&self) {
        if let Ok(mut guard) = self.inner.write() {
            guard.take();
        }
    }
}
