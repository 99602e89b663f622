//! `ThreadsGuest`: the native-threads guest on a `Region`.

use std::borrow::Cow;
use std::time::Duration;

use cprfast_core::guest_threads::ThreadsGuest;
use cprfast_core::layout;
use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::errors::PyResultCore;
use crate::memfd::PyRegion;

const _: () = assert!(layout::HOT_START == 0x10_0000, "update the text_signature below");

/// A native thread keeping the heartbeat and dirtying the hot set of a region.
#[pyclass(name = "ThreadsGuest", module = "cprfast._core", frozen)]
pub struct PyThreadsGuest {
    inner: ThreadsGuest,
}

#[pymethods]
impl PyThreadsGuest {
    #[new]
    #[pyo3(signature = (region, hot_start = layout::HOT_START, hot_len = 64 << 20))]
    #[pyo3(text_signature = "(region, hot_start=0x100000, hot_len=0x4000000)")]
    fn new(region: &Bound<'_, PyRegion>, hot_start: usize, hot_len: usize) -> PyResult<Self> {
        let mapping = region.get().mapping()?;
        let inner = ThreadsGuest::new(mapping, hot_start, hot_len).map_err(crate::errors::CoreError)?;
        Ok(Self { inner })
    }

    /// Write the parameter block and start the guest thread (once), pinned to `cpus` if given.
    #[pyo3(signature = (cpus=None))]
    fn start(&self, py: Python<'_>, cpus: Option<Vec<usize>>) -> PyResultCore<()> {
        let cpus = crate::sched::cpus(cpus)?;
        py.detach(|| self.inner.start(cpus.as_ref()))?;
        Ok(())
    }

    /// Stop the guest; returns the seconds until the thread acknowledged.
    /// After it returns, the guest writes nothing until `resume()`.
    fn pause(&self, py: Python<'_>) -> PyResult<f64> {
        let ticket = self.inner.request_pause().map_err(crate::errors::CoreError)?;
        loop {
            if let Some(d) = py.detach(|| self.inner.wait_parked(&ticket, Duration::from_millis(50))) {
                return Ok(d.as_secs_f64());
            }
            py.check_signals()?;
        }
    }

    /// Let the paused guest run again.
    fn resume(&self) -> PyResultCore<()> {
        Ok(self.inner.resume()?)
    }

    /// Whether the guest runs (started, not paused, not closed).
    #[getter]
    fn running(&self) -> bool {
        self.inner.running()
    }

    /// The heartbeat in guest memory now.
    #[getter]
    fn heartbeat(&self) -> u64 {
        self.inner.heartbeat()
    }

    /// Offset of the hot working set.
    #[getter]
    fn hot_start(&self) -> usize {
        self.inner.hot_start()
    }

    /// Length of the hot working set in bytes.
    #[getter]
    fn hot_len(&self) -> usize {
        self.inner.hot_len()
    }

    /// Versioned, checksummed state (hot-set position, counters); paused or unstarted only.
    fn save_state(&self) -> PyResultCore<Cow<'static, [u8]>> {
        Ok(Cow::Owned(self.inner.save_state()?))
    }

    /// Adopt a predecessor's state on the same memory before `start()`.
    fn load_state(&self, state: &[u8]) -> PyResultCore<()> {
        Ok(self.inner.load_state(state)?)
    }

    /// Stop and join the thread. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (_exc_type = None, _exc = None, _tb = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<&Bound<'_, PyType>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.close(py);
    }
}
