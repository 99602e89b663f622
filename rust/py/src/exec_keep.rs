//! `ExecKeeper` and `release_exec_keeper`: the old address space and KVM fds outlive a cpr-exec.

use std::sync::Mutex;

use cprfast_core::exec_keep::{self, Keeper};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::CoreError;

/// A process sharing this one's address space and holding copies of `keep_fds`,
/// started right before a cpr-exec's `execve` so that `execve` tears nothing
/// down; the successor ends it with `release_exec_keeper(pid)` once its guest
/// runs. It exits by itself after `linger` seconds, or with this process.
#[pyclass(name = "ExecKeeper", module = "cprfast._core", frozen)]
pub struct PyExecKeeper {
    keeper: Mutex<Option<Keeper>>,
    pid: i32,
}

#[pymethods]
impl PyExecKeeper {
    #[new]
    #[pyo3(signature = (keep_fds=Vec::new(), linger=60.0))]
    fn new(py: Python<'_>, keep_fds: Vec<i32>, linger: f64) -> PyResult<Self> {
        let linger = std::time::Duration::try_from_secs_f64(linger)
            .map_err(|_| PyValueError::new_err(format!("linger must be >= 0 seconds, not {linger}")))?;
        let keeper = py.detach(|| Keeper::spawn(&keep_fds, linger)).map_err(CoreError)?;
        Ok(Self { pid: keeper.pid(), keeper: Mutex::new(Some(keeper)) })
    }

    /// The keeper's process id, for the successor.
    #[getter]
    fn pid(&self) -> i32 {
        self.pid
    }

    /// The exec failed: end and reap the keeper now. Idempotent.
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        let keeper = self.keeper.lock().map_err(|_| PyValueError::new_err("ExecKeeper lock poisoned"))?.take();
        if let Some(k) = keeper {
            py.detach(|| k.cancel()).map_err(CoreError)?;
        }
        Ok(())
    }
}

/// End and reap the predecessor's keeper `pid` (our child): its address space
/// and kept fds are torn down now. Blocks (GIL released) until it is gone.
#[pyfunction]
pub fn release_exec_keeper(py: Python<'_>, pid: i32) -> PyResult<()> {
    Ok(py.detach(|| exec_keep::release(pid)).map_err(CoreError)?)
}
