//! Running a blocking core call from Python: the GIL is released, the wait
//! is cut into short slices, and between slices Python gets to run signal
//! handlers, so Ctrl-C interrupts any wait.

use std::time::Duration;

use cprfast_core::wait::Waiter;
use cprfast_core::{Errno, Error};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::CoreError;

/// A Python `timeout` argument (seconds, or `None` for no limit) as a `Duration`.
pub fn timeout_arg(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    timeout
        .map(|t| {
            Duration::try_from_secs_f64(t)
                .map_err(|_| PyValueError::new_err(format!("timeout must be None or seconds >= 0, not {t}")))
        })
        .transpose()
}

/// Run `f` with the GIL released and a [`Waiter`] bounded by `timeout`.
/// Between poll slices, `check` runs and then Python's signal handlers; an
/// exception from a handler (e.g. `KeyboardInterrupt`) aborts the call and
/// is raised as is.
pub fn blocking<T: Send>(
    py: Python<'_>,
    timeout: Option<Duration>,
    check: impl Fn() -> cprfast_core::Result<()> + Sync,
    f: impl for<'w> FnOnce(&mut Waiter<'w>) -> cprfast_core::Result<T> + Send,
) -> PyResult<T> {
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut hook = || {
            check()?;
            Python::attach(|py| py.check_signals()).map_err(|e| {
                raised = Some(e);
                Error::Os { op: "wait interrupted by a signal".into(), errno: Errno(libc::EINTR) }
            })
        };
        f(&mut Waiter::new(timeout).with_hook(&mut hook))
    });
    match raised {
        Some(e) => Err(e),
        None => result.map_err(|e| CoreError(e).into()),
    }
}
