//! SCM_RIGHTS fd passing, peer credentials and the authorizing `UnixListener`.
//! Sockets and fds are plain ints; received fds are new, close-on-exec, and
//! owned by the caller.

use std::os::fd::{BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use cprfast_core::scm::{self, Accepted, BundleLimits, PeerCred};
use cprfast_core::{Errno, Error};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::PyResultCore;
use crate::wait::{blocking, timeout_arg};

/// Borrow a caller-owned fd number for the duration of one call.
fn borrow<'a>(fd: RawFd) -> PyResult<BorrowedFd<'a>> {
    if fd < 0 {
        return Err(PyValueError::new_err(format!("invalid file descriptor {fd}")));
    }
    // SAFETY: the fd is non-negative and owned by the Python caller, which
    // keeps it open for this call. Were it closed meanwhile, the kernel
    // would report EBADF (or act on whatever reused the number); no memory
    // is accessed through it, so this is never undefined behaviour.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

fn borrow_all<'a>(fds: &[RawFd]) -> PyResult<Vec<BorrowedFd<'a>>> {
    fds.iter().map(|&fd| borrow(fd)).collect()
}

/// Hand received fds to Python: from here on the caller owns them.
fn into_raw(fds: Vec<OwnedFd>) -> Vec<RawFd> {
    fds.into_iter().map(IntoRawFd::into_raw_fd).collect()
}

// Signature defaults are literals so Python shows them; keep them in step.
const _: () = assert!(scm::SCM_MAX_FD == 253);

fn no_check() -> cprfast_core::Result<()> {
    Ok(())
}

/// Send `data` with up to SCM_MAX_FD fds in ONE sendmsg; returns the bytes sent.
#[pyfunction]
#[pyo3(signature = (sock, data, fds, *, timeout=None))]
pub fn sendmsg_fds(py: Python<'_>, sock: RawFd, data: &[u8], fds: Vec<RawFd>, timeout: Option<f64>) -> PyResult<usize> {
    let (sock, fds, timeout) = (borrow(sock)?, borrow_all(&fds)?, timeout_arg(timeout)?);
    blocking(py, timeout, no_check, |w| scm::sendmsg_fds(sock, data, &fds, w))
}

/// Most bytes one `recvmsg_fds` call reads: a stream socket never returns more
/// than its receive buffer in one call, and a bigger `bufsize` must not cost
/// that much memory (the buffer is zero-filled before the call).
const MAX_RECV_BUF: usize = 16 << 20;

/// ONE recvmsg of up to `bufsize` bytes (at most 16 MiB) and `max_fds` fds; b"" means end of stream.
#[pyfunction]
#[pyo3(signature = (sock, bufsize, max_fds=253, *, timeout=None))]
pub fn recvmsg_fds(
    py: Python<'_>,
    sock: RawFd,
    bufsize: usize,
    max_fds: usize,
    timeout: Option<f64>,
) -> PyResult<(Py<PyBytes>, Vec<RawFd>)> {
    let (sock, timeout) = (borrow(sock)?, timeout_arg(timeout)?);
    let bufsize = bufsize.min(MAX_RECV_BUF);
    let mut buf = Vec::new();
    buf.try_reserve_exact(bufsize).map_err(|_| PyMemoryError::new_err(format!("bufsize {bufsize}")))?;
    buf.resize(bufsize, 0);
    let (n, fds) = blocking(py, timeout, no_check, |w| scm::recvmsg_fds(sock, &mut buf, max_fds, w))?;
    Ok((PyBytes::new(py, &buf[..n]).unbind(), into_raw(fds)))
}

/// Send `data` and any number of fds as one bundle (batched SCM_MAX_FD per message).
#[pyfunction]
#[pyo3(signature = (sock, data, fds, *, timeout=None))]
pub fn send_fds(py: Python<'_>, sock: RawFd, data: &[u8], fds: Vec<RawFd>, timeout: Option<f64>) -> PyResult<()> {
    let (sock, fds, timeout) = (borrow(sock)?, borrow_all(&fds)?, timeout_arg(timeout)?);
    blocking(py, timeout, no_check, |w| scm::send_fds(sock, data, &fds, w))
}

/// Receive one bundle sent by `send_fds`: exactly its data and its fds.
/// End of stream raises PeerClosedError; a bad header raises StreamError.
#[pyfunction]
#[pyo3(signature = (sock, *, max_fds=65536, max_data=16_777_216, timeout=None))]
pub fn recv_fds(
    py: Python<'_>,
    sock: RawFd,
    max_fds: usize,
    max_data: usize,
    timeout: Option<f64>,
) -> PyResult<(Py<PyBytes>, Vec<RawFd>)> {
    let (sock, timeout) = (borrow(sock)?, timeout_arg(timeout)?);
    let limits = BundleLimits { max_fds, max_data };
    let (data, fds) = blocking(py, timeout, no_check, |w| scm::recv_fds(sock, limits, w))?;
    Ok((PyBytes::new(py, &data).unbind(), into_raw(fds)))
}

/// (pid, uid, gid) of the peer of a connected UNIX socket (SO_PEERCRED).
#[pyfunction]
pub fn peer_credentials(sock: RawFd) -> PyResult<(i32, u32, u32)> {
    let c = scm::peer_credentials(borrow(sock)?).map_err(crate::errors::CoreError)?;
    Ok((c.pid, c.uid, c.gid))
}

/// Connect to the UNIX socket at `path`; returns a close-on-exec socket fd.
#[pyfunction]
#[pyo3(signature = (path, *, timeout=None))]
pub fn connect_unix(py: Python<'_>, path: PathBuf, timeout: Option<f64>) -> PyResult<RawFd> {
    let timeout = timeout_arg(timeout)?;
    let fd = blocking(py, timeout, no_check, |w| scm::connect_unix(&path, w))?;
    Ok(fd.into_raw_fd())
}

/// A listening UNIX socket that accepts only peers with an allowed uid.
#[pyclass(name = "UnixListener", module = "cprfast._core", frozen)]
pub struct PyUnixListener {
    inner: RwLock<Option<Arc<scm::UnixListener>>>,
    path: String,
}

impl PyUnixListener {
    fn wrap(listener: scm::UnixListener) -> Self {
        let path = listener.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        Self { inner: RwLock::new(Some(Arc::new(listener))), path }
    }

    fn get(&self) -> Option<Arc<scm::UnixListener>> {
        self.inner.read().ok().and_then(|g| g.clone())
    }

    fn closed() -> Error {
        Error::Os { op: "UnixListener is closed".into(), errno: Errno(libc::EBADF) }
    }
}

fn log_refused(py: Python<'_>, path: &str, c: PeerCred) -> PyResult<()> {
    let logger = py.import("logging")?.call_method1("getLogger", ("cprfast.scm",))?;
    logger.call_method1(
        "warning",
        ("refused connection on %s from pid %d uid %d gid %d: uid not allowed", path, c.pid, c.uid, c.gid),
    )?;
    Ok(())
}

#[pymethods]
impl PyUnixListener {
    /// Bind and listen at `path` with exactly `mode` (never wider at any moment).
    #[new]
    #[pyo3(signature = (path, *, mode=0o600, allowed_uids=None, backlog=16))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        mode: u32,
        allowed_uids: Option<Vec<u32>>,
        backlog: i32,
    ) -> PyResultCore<Self> {
        let listener = py.detach(|| scm::UnixListener::bind(&path, mode, allowed_uids, backlog))?;
        Ok(Self::wrap(listener))
    }

    /// Adopt an inherited listening socket fd. Once it is checked to be a
    /// listening UNIX socket, the listener owns it (the caller's fd is left
    /// alone on error); its path is not unlinked on close.
    #[staticmethod]
    #[pyo3(signature = (fd, *, allowed_uids=None))]
    fn from_fd(fd: RawFd, allowed_uids: Option<Vec<u32>>) -> PyResult<Self> {
        scm::UnixListener::check_listening(borrow(fd)?).map_err(crate::errors::CoreError)?;
        // SAFETY: `fd` is non-negative and the caller hands its ownership to us,
        // as documented; it is closed exactly once, by the listener.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let listener = scm::UnixListener::from_fd(owned, allowed_uids).map_err(crate::errors::CoreError)?;
        Ok(Self::wrap(listener))
    }

    /// The socket file path ("" if the socket has none).
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// The listening fd, or -1 once closed.
    fn fileno(&self) -> RawFd {
        self.get().map_or(-1, |l| std::os::fd::AsRawFd::as_raw_fd(&l.fd()))
    }

    /// Wait for an authorized peer and return its connection fd (close-on-exec).
    /// Unauthorized peers are closed, logged on the `cprfast.scm` logger, and
    /// waited past; `timeout` bounds the whole call.
    #[pyo3(signature = (timeout=None))]
    fn accept(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<RawFd> {
        let listener = self.get().ok_or_else(|| crate::errors::CoreError(Self::closed()))?;
        let end = timeout_arg(timeout)?.map(|t| Instant::now() + t);
        let check = || if self.get().is_some() { Ok(()) } else { Err(Self::closed()) };
        loop {
            let left = end.map(|e| e.saturating_duration_since(Instant::now()));
            match blocking(py, left, check, |w| listener.accept(w))? {
                Accepted::Peer(fd, _) => return Ok(fd.into_raw_fd()),
                Accepted::Refused(cred) => log_refused(py, &self.path, cred)?,
            }
        }
    }

    /// Close the listener and unlink its socket file. Idempotent; a concurrent
    /// `accept` fails with EBADF within one poll slice.
    fn close(&self) {
        if let Ok(mut g) = self.inner.write() {
            g.take();
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) {
        self.close();
    }
}
