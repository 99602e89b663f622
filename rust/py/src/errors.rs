//! The one place where core errors become Python exceptions. OSError-family
//! exceptions are always built from `(errno, strerror)` so `.errno` is set and
//! Python picks the right subclass (`PermissionError` for EPERM, ...).

use cprfast_core::Error;
use pyo3::exceptions::{PyBufferError, PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

pyo3::import_exception!(cprfast.errors, FeatureUnavailableError);
pyo3::import_exception!(cprfast.errors, BadFdError);
pyo3::import_exception!(cprfast.errors, StreamError);
pyo3::import_exception!(cprfast.errors, PeerRefusedError);
pyo3::import_exception!(cprfast.errors, FdPassingError);
pyo3::import_exception!(cprfast.errors, PeerClosedError);

/// Wrapper so `?` converts core errors into `PyErr` (orphan rule).
#[derive(Debug)]
pub struct CoreError(pub Error);

impl From<Error> for CoreError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

/// Result alias for binding functions.
pub type PyResultCore<T> = Result<T, CoreError>;

impl From<CoreError> for PyErr {
    fn from(CoreError(e): CoreError) -> Self {
        let msg = e.to_string();
        match e {
            Error::Os { errno, .. } => PyOSError::new_err((errno.0, msg)),
            Error::Unsupported { errno, .. } => FeatureUnavailableError::new_err((errno.0, msg)),
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::BadFd(_) => BadFdError::new_err(msg),
            Error::Corrupt(_) => StreamError::new_err(msg),
            Error::PeerRefused { .. } => PeerRefusedError::new_err((libc::EACCES, msg)),
            Error::Truncated { .. } => FdPassingError::new_err((libc::ENOBUFS, msg)),
            Error::TimedOut(_) => PyTimeoutError::new_err((libc::ETIMEDOUT, msg)),
            Error::Busy(_) => PyBufferError::new_err(msg),
            Error::PeerClosed(_) => PeerClosedError::new_err((libc::EPIPE, msg)),
        }
    }
}
