//! The core's one error type. Every syscall failure keeps its errno so the
//! bindings can raise the matching `OSError` subclass; every other failure
//! says precisely what was wrong.

use std::fmt;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An errno value with its `strerror` text.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current errno.
    #[must_use]
    pub fn last() -> Self {
        Self(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl From<rustix::io::Errno> for Errno {
    fn from(e: rustix::io::Errno) -> Self {
        Self(e.raw_os_error())
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({})", self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `io::Error`'s Display appends " (os error N)"; we want just the text.
        let text = std::io::Error::from_raw_os_error(self.0).to_string();
        let text = text.split(" (os error").next().unwrap_or(&text);
        f.write_str(text)
    }
}

/// Everything the core can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed. `op` names the call and its object.
    #[error("{op}: {errno}")]
    Os {
        /// What was being done, e.g. `"memfd_create(guest-ram)"`.
        op: String,
        /// The errno the kernel returned.
        errno: Errno,
    },
    /// A kernel feature this operation needs is missing on this machine.
    #[error("{feature} is not available on this kernel: {errno}")]
    Unsupported {
        /// The feature, e.g. `"userfaultfd UFFD_FEATURE_WP_ASYNC"`.
        feature: &'static str,
        /// The errno the probe returned (ENOSYS, EINVAL, ENOTTY, EPERM, ...).
        errno: Errno,
    },
    /// An argument was out of range or inconsistent.
    #[error("{0}")]
    InvalidArgument(String),
    /// An fd handed to us is not what it claims to be (type, size, seals).
    #[error("{0}")]
    BadFd(String),
    /// Bytes read from outside (a socket, a file) are corrupt or truncated.
    #[error("{0}")]
    Corrupt(String),
    /// A peer on a UNIX socket is not authorized.
    #[error("peer pid {pid} uid {uid} gid {gid} is not authorized")]
    PeerRefused {
        /// Peer process id.
        pid: i32,
        /// Peer user id.
        uid: u32,
        /// Peer group id.
        gid: u32,
    },
    /// Control data was truncated (MSG_CTRUNC); the fds that did arrive were closed.
    #[error("SCM_RIGHTS control data truncated (MSG_CTRUNC); closed {closed} received fds")]
    Truncated {
        /// How many received fds were closed.
        closed: usize,
    },
    /// A wait ran out of time.
    #[error("{0} timed out")]
    TimedOut(String),
    /// The object is in use (e.g. a buffer is still exported) or closed.
    #[error("{0}")]
    Busy(String),
    /// The peer closed the connection before the operation finished.
    #[error("{0}: peer closed the connection")]
    PeerClosed(String),
}

impl Error {
    /// A failed syscall, from a rustix errno.
    pub fn os(op: impl Into<String>, errno: impl Into<Errno>) -> Self {
        Self::Os { op: op.into(), errno: errno.into() }
    }

    /// A failed syscall, from the thread's current errno (for raw libc calls).
    pub fn last_os(op: impl Into<String>) -> Self {
        Self::Os { op: op.into(), errno: Errno::last() }
    }

    /// The errno carried by this error, if it came from the kernel.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Os { errno, .. } | Self::Unsupported { errno, .. } => Some(errno.0),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_error_keeps_errno_and_text() {
        let e = Error::os("open(/nope)", rustix::io::Errno::NOENT);
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert_eq!(e.to_string(), "open(/nope): No such file or directory");
    }
}
