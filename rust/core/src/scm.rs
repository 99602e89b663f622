//! File descriptors over UNIX sockets: SCM_RIGHTS send/receive, bundles of
//! any number of fds, peer credentials, and an authorizing listener.
//!
//! Single messages ([`sendmsg_fds`], [`recvmsg_fds`]) carry at most
//! [`SCM_MAX_FD`] fds, the kernel's limit; QEMU's cpr-transfer sends one fd
//! per message this way. A *bundle* ([`send_fds`], [`recv_fds`]) carries any
//! number of fds plus data, batched [`SCM_MAX_FD`] per message:
//!
//! ```text
//! header  24 bytes, no fds: b"CPFD" | version u32 = 1 | n_fds u64 | data_len u64  (little-endian)
//! markers one byte per batch of fds, each sent with its batch; the byte is the batch size
//! data    data_len bytes
//! ```
//!
//! The receiver reads exactly the bundle's bytes, so it never takes fds that
//! belong to the next bundle (the kernel hands out the fds of one message
//! with the first read that touches its bytes, and never those of two
//! messages in one read). Every fd received is owned (`OwnedFd`), so any
//! error closes all fds received so far. After an error mid-bundle the
//! stream is out of step and the socket should be closed.
//!
//! All operations take a [`Waiter`]: sockets may be blocking or not, as
//! every call uses `MSG_DONTWAIT` and waits with `poll()`.

use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::event::PollFlags;
use rustix::fs::{Mode, OFlags};
use rustix::io::{Errno, IoSlice, IoSliceMut};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::error::{Error, Result};
use crate::wait::Waiter;

/// The kernel's limit on fds in one SCM_RIGHTS message (`SCM_MAX_FD`, unix(7)).
pub const SCM_MAX_FD: usize = 253;

/// Bundle header magic.
const MAGIC: &[u8; 4] = b"CPFD";
/// Bundle format version.
const VERSION: u32 = 1;
/// Bundle header size in bytes.
const HEADER_LEN: usize = 24;

/// Credentials of the process at the other end of a UNIX socket (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected UNIX socket.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> Result<PeerCred> {
    let c = rustix::net::sockopt::socket_peercred(sock).map_err(|e| Error::os("getsockopt(SO_PEERCRED)", e))?;
    Ok(PeerCred { pid: c.pid.as_raw_nonzero().get(), uid: c.uid.as_raw(), gid: c.gid.as_raw() })
}

/// EPIPE / ECONNRESET from a send or receive mean the peer went away.
fn peer_gone(e: Error) -> Error {
    match e {
        Error::Os { op, errno } if errno.0 == libc::EPIPE || errno.0 == libc::ECONNRESET => Error::PeerClosed(op),
        e => e,
    }
}

/// One `sendmsg` carrying `data` and up to [`SCM_MAX_FD`] fds; returns the
/// bytes sent (a stream socket may take fewer than `data.len()`; the fds go
/// with the first byte).
pub fn sendmsg_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>], w: &mut Waiter<'_>) -> Result<usize> {
    if fds.len() > SCM_MAX_FD {
        return Err(Error::InvalidArgument(format!(
            "{} fds in one message; the kernel allows at most {SCM_MAX_FD} (use send_fds for more)",
            fds.len()
        )));
    }
    if data.is_empty() && !fds.is_empty() {
        return Err(Error::InvalidArgument("fds must travel with at least one data byte".into()));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::InvalidArgument("control buffer too small for the fds".into()));
    }
    let iov = [IoSlice::new(data)];
    w.retry(sock, PollFlags::OUT, "sendmsg(SCM_RIGHTS)", || {
        rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::DONTWAIT | SendFlags::NOSIGNAL)
    })
    .map_err(peer_gone)
}

/// One `recvmsg` (with `MSG_CMSG_CLOEXEC`) into `buf`, accepting up to
/// `max_fds` fds. Returns the bytes read (0 at end of stream) and the fds.
/// If the control data was truncated, or more than `max_fds` fds came, every
/// fd of the message is closed and [`Error::Truncated`] returned.
pub fn recvmsg_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    w: &mut Waiter<'_>,
) -> Result<(usize, Vec<OwnedFd>)> {
    if buf.is_empty() {
        return Err(Error::InvalidArgument("recvmsg needs a buffer of at least one byte".into()));
    }
    if max_fds > SCM_MAX_FD {
        return Err(Error::InvalidArgument(format!("max_fds {max_fds} exceeds SCM_MAX_FD {SCM_MAX_FD}")));
    }
    let mut space = vec![MaybeUninit::uninit(); if max_fds == 0 { 0 } else { rustix::cmsg_space!(ScmRights(max_fds)) }];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = {
        let mut iov = [IoSliceMut::new(buf)];
        w.retry(sock, PollFlags::IN, "recvmsg(SCM_RIGHTS)", || {
            rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT)
        })
        .map_err(peer_gone)?
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    // CMSG_SPACE rounds up, so the kernel may fit one fd more than asked for:
    // that, too, means the sender sent more than we accept.
    if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() > max_fds {
        return Err(Error::Truncated { closed: fds.len() });
    }
    Ok((msg.bytes, fds))
}

/// Send all of `data` (no fds).
fn send_all(sock: BorrowedFd<'_>, mut data: &[u8], w: &mut Waiter<'_>) -> Result<()> {
    while !data.is_empty() {
        let n = sendmsg_fds(sock, data, &[], w)?;
        data = &data[n..];
    }
    Ok(())
}

/// Fill `buf` exactly, appending fds to `fds`, never holding more than `max_fds`.
fn recv_exact(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
    w: &mut Waiter<'_>,
) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let (n, more) = recvmsg_fds(sock, &mut buf[got..], SCM_MAX_FD, w)?;
        if n == 0 {
            return Err(Error::PeerClosed(format!("recv_fds after {got} of {} bytes", buf.len())));
        }
        got += n;
        fds.extend(more);
        if fds.len() > max_fds {
            return Err(Error::Corrupt(format!("bundle carries more fds than the {max_fds} it declared")));
        }
    }
    Ok(())
}

/// Send `data` and any number of `fds` as one bundle (see the module docs).
pub fn send_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>], w: &mut Waiter<'_>) -> Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4..8].copy_from_slice(&VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&(fds.len() as u64).to_le_bytes());
    header[16..24].copy_from_slice(&(data.len() as u64).to_le_bytes());
    send_all(sock, &header, w)?;
    for batch in fds.chunks(SCM_MAX_FD) {
        // SCM_MAX_FD < 256, so the batch size fits the marker byte.
        sendmsg_fds(sock, &[batch.len() as u8], batch, w)?;
    }
    send_all(sock, data, w)
}

/// Limits a receiver puts on a bundle before allocating anything for it.
#[derive(Debug, Clone, Copy)]
pub struct BundleLimits {
    /// Most fds accepted.
    pub max_fds: usize,
    /// Most data bytes accepted.
    pub max_data: usize,
}

/// Receive one bundle sent by [`send_fds`]: its data and exactly its fds.
pub fn recv_fds(sock: BorrowedFd<'_>, limits: BundleLimits, w: &mut Waiter<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    recv_exact(sock, &mut header, &mut fds, 0, w)?;
    if &header[..4] != MAGIC {
        return Err(Error::Corrupt(format!("not an fd bundle: magic {:02x?}", &header[..4])));
    }
    let field = |r: std::ops::Range<usize>| header[r].iter().rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let version = field(4..8);
    if version != u64::from(VERSION) {
        return Err(Error::Corrupt(format!("fd bundle version {version}, expected {VERSION}")));
    }
    let (n_fds, data_len) = (field(8..16), field(16..24));
    if n_fds > limits.max_fds as u64 {
        return Err(Error::Corrupt(format!("fd bundle declares {n_fds} fds; the limit is {}", limits.max_fds)));
    }
    if data_len > limits.max_data as u64 {
        return Err(Error::Corrupt(format!(
            "fd bundle declares {data_len} data bytes; the limit is {}",
            limits.max_data
        )));
    }
    let (n_fds, data_len) = (n_fds as usize, data_len as usize);
    let batches = n_fds.div_ceil(SCM_MAX_FD);
    let mut body = vec![0u8; batches + data_len];
    fds.reserve_exact(n_fds);
    recv_exact(sock, &mut body, &mut fds, n_fds, w)?;
    if fds.len() != n_fds {
        return Err(Error::Corrupt(format!("fd bundle declared {n_fds} fds but carried {}", fds.len())));
    }
    for (i, &marker) in body[..batches].iter().enumerate() {
        let expected = (n_fds - i * SCM_MAX_FD).min(SCM_MAX_FD);
        if usize::from(marker) != expected {
            return Err(Error::Corrupt(format!("fd bundle batch {i} marker says {marker} fds, expected {expected}")));
        }
    }
    body.drain(..batches);
    Ok((body, fds))
}

/// A fresh `AF_UNIX` stream socket, close-on-exec and non-blocking.
fn unix_socket() -> Result<OwnedFd> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| Error::os("socket(AF_UNIX)", e))
}

/// A name beside `path` to bind a socket under before it listens (unique in this process).
fn staging_path(path: &Path) -> Option<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(".cprfast-{}-{n}", rustix::process::getpid().as_raw_nonzero());
    Some(path.parent()?.join(name))
}

fn unix_addr(path: &Path) -> Result<SocketAddrUnix> {
    SocketAddrUnix::new(path).map_err(|e| Error::os(format!("UNIX socket address {}", path.display()), e))
}

/// Make `fd` blocking again, so callers that wrap it (e.g. Python's
/// `socket.socket(fileno=...)`) see an ordinary socket.
fn set_blocking(fd: BorrowedFd<'_>) -> Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|e| Error::os("fcntl(F_GETFL)", e))?;
    rustix::fs::fcntl_setfl(fd, flags - OFlags::NONBLOCK).map_err(|e| Error::os("fcntl(F_SETFL)", e))
}

/// Connect to the UNIX socket at `path`; the returned socket is close-on-exec
/// and blocking. A full listen backlog is waited out within `w`.
pub fn connect_unix(path: &Path, w: &mut Waiter<'_>) -> Result<OwnedFd> {
    let addr = unix_addr(path)?;
    let what = format!("connect({})", path.display());
    loop {
        let sock = unix_socket()?;
        match rustix::net::connect(&sock, &addr) {
            Ok(()) => {
                set_blocking(sock.as_fd())?;
                return Ok(sock);
            }
            Err(Errno::INTR) => {}
            // The backlog is full; a UNIX socket cannot report when that
            // changes, so sleep one slice and try again.
            Err(Errno::AGAIN) => w.pause(&what)?,
            Err(e) => return Err(Error::os(what, e)),
        }
    }
}

/// Refuse to create a socket in a directory another user could tamper with:
/// one writable by everyone without the sticky bit (anyone could replace the
/// socket file), or one owned by a user other than us or root (its owner
/// could). Fails with `EACCES` and says which.
pub fn check_socket_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let st = rustix::fs::stat(dir).map_err(|e| Error::os(format!("stat({})", dir.display()), e))?;
    let me = rustix::process::geteuid().as_raw();
    let refuse = |why: String| Error::Os {
        op: format!("socket directory {}: {why}", dir.display()),
        errno: crate::error::Errno(libc::EACCES),
    };
    if st.st_uid != me && st.st_uid != 0 {
        return Err(refuse(format!("owned by uid {}, neither us (uid {me}) nor root", st.st_uid)));
    }
    if st.st_mode & 0o002 != 0 && st.st_mode & 0o1000 == 0 {
        return Err(refuse(format!("mode {:#o} is writable by everyone without the sticky bit", st.st_mode & 0o7777)));
    }
    Ok(())
}

/// What one [`UnixListener::accept`] produced.
#[derive(Debug)]
pub enum Accepted {
    /// An authorized peer: its connection (close-on-exec, blocking) and credentials.
    Peer(OwnedFd, PeerCred),
    /// A peer whose uid is not allowed; its connection was already closed.
    Refused(PeerCred),
}

/// A listening UNIX socket that only lets chosen users in (by `SO_PEERCRED`).
#[derive(Debug)]
pub struct UnixListener {
    fd: OwnedFd,
    path: Option<PathBuf>,
    /// (st_dev, st_ino) of the socket file we created, to unlink only our own.
    created: Option<(u64, u64)>,
    allowed_uids: Vec<u32>,
}

impl UnixListener {
    /// Bind and listen at `path`. The socket file gets exactly `mode` and is
    /// never more open than that at any moment (the socket inode is chmod'ed
    /// before `bind`, so the umask can only narrow it; the final mode is set
    /// before `listen`). `allowed_uids` defaults to our effective uid. The
    /// directory is checked first ([`check_socket_dir`]).
    pub fn bind(path: &Path, mode: u32, allowed_uids: Option<Vec<u32>>, backlog: i32) -> Result<Self> {
        if mode & !0o777 != 0 {
            return Err(Error::InvalidArgument(format!("socket mode {mode:#o} has bits beyond 0o777")));
        }
        check_socket_dir(path)?;
        unix_addr(path)?;
        // Bound under a staging name beside `path` and renamed into place once it
        // listens: whoever sees the file can connect (no window of ECONNREFUSED).
        // A staging name too long for sun_path binds at `path` itself.
        let staging = staging_path(path).filter(|s| unix_addr(s).is_ok());
        let bind_at = staging.as_deref().unwrap_or(path);
        let fd = unix_socket()?;
        let mode = Mode::from_raw_mode(mode);
        rustix::fs::fchmod(&fd, mode).map_err(|e| Error::os("fchmod(socket)", e))?;
        if bind_at != path && rustix::fs::lstat(path).is_ok() {
            return Err(Error::os(format!("bind({})", path.display()), Errno::ADDRINUSE));
        }
        rustix::net::bind(&fd, &unix_addr(bind_at)?).map_err(|e| Error::os(format!("bind({})", path.display()), e))?;
        let mut listener = Self {
            fd,
            path: Some(bind_at.to_owned()),
            created: None,
            allowed_uids: allowed_uids.unwrap_or_else(|| vec![rustix::process::geteuid().as_raw()]),
        };
        // From here on, dropping `listener` unlinks the file once `created` is set.
        let file = rustix::fs::open(bind_at, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Error::os(format!("open({}, O_PATH)", bind_at.display()), e))?;
        let st = rustix::fs::fstat(&file).map_err(|e| Error::os("fstat(socket file)", e))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
            return Err(Error::BadFd(format!("{} was replaced by a non-socket after bind", bind_at.display())));
        }
        listener.created = Some((st.st_dev, st.st_ino));
        if Mode::from_raw_mode(st.st_mode) & Mode::from_raw_mode(0o777) != mode {
            // The umask narrowed it: chmod the very inode we just checked.
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
            rustix::fs::chmod(proc_path.as_str(), mode).map_err(|e| Error::os("chmod(socket file)", e))?;
        }
        rustix::net::listen(&listener.fd, backlog).map_err(|e| Error::os("listen", e))?;
        if bind_at != path {
            let cwd = rustix::fs::CWD;
            rustix::fs::renameat_with(cwd, bind_at, cwd, path, rustix::fs::RenameFlags::NOREPLACE).map_err(|e| {
                // Someone created `path` meanwhile: as bind(2) would have said.
                let e = if e == Errno::EXIST { Errno::ADDRINUSE } else { e };
                Error::os(format!("bind({})", path.display()), e)
            })?;
            listener.path = Some(path.to_owned());
        }
        Ok(listener)
    }

    /// Check that `fd` is a listening `AF_UNIX` stream socket, as
    /// [`UnixListener::from_fd`] requires (callers can check before giving
    /// up ownership).
    pub fn check_listening(fd: BorrowedFd<'_>) -> Result<()> {
        let domain = rustix::net::sockopt::socket_domain(fd);
        let kind = rustix::net::sockopt::socket_type(fd);
        let listening = rustix::net::sockopt::socket_acceptconn(fd);
        match (domain, kind, listening) {
            (Ok(AddressFamily::UNIX), Ok(SocketType::STREAM), Ok(true)) => Ok(()),
            _ => Err(Error::BadFd("fd is not a listening AF_UNIX stream socket".into())),
        }
    }

    /// Adopt an inherited listening socket (made non-blocking for `accept`).
    /// Its path, if any, is not unlinked on drop: whoever created it owns it.
    pub fn from_fd(fd: OwnedFd, allowed_uids: Option<Vec<u32>>) -> Result<Self> {
        Self::check_listening(fd.as_fd())?;
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| Error::os("fcntl(F_GETFL)", e))?;
        rustix::fs::fcntl_setfl(&fd, flags | OFlags::NONBLOCK).map_err(|e| Error::os("fcntl(F_SETFL)", e))?;
        let name = rustix::net::getsockname(&fd).map_err(|e| Error::os("getsockname", e))?;
        let path = SocketAddrUnix::try_from(name)
            .ok()
            .and_then(|a| a.path_bytes().map(|p| PathBuf::from(OsStr::from_bytes(p))));
        Ok(Self {
            fd,
            path,
            created: None,
            allowed_uids: allowed_uids.unwrap_or_else(|| vec![rustix::process::geteuid().as_raw()]),
        })
    }

    /// The listening socket.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The filesystem path, if the socket has one.
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Accept one connection. A peer whose uid is not allowed is closed at
    /// once and reported as [`Accepted::Refused`]; callers keep waiting, so
    /// an unauthorized local user cannot make a server give up.
    pub fn accept(&self, w: &mut Waiter<'_>) -> Result<Accepted> {
        let conn = w.retry(self.fd.as_fd(), PollFlags::IN, "accept", || {
            rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC)
        })?;
        let cred = peer_credentials(conn.as_fd())?;
        if self.allowed_uids.contains(&cred.uid) { Ok(Accepted::Peer(conn, cred)) } else { Ok(Accepted::Refused(cred)) }
    }
}

impl Drop for UnixListener {
    fn drop(&mut self) {
        if let (Some(path), Some(id)) = (&self.path, self.created) {
            // Unlink only the file we created, not a successor's socket at the same path.
            if rustix::fs::lstat(path).is_ok_and(|st| (st.st_dev, st.st_ino) == id) {
                let _ = rustix::fs::unlink(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap()
    }

    fn ino(fd: BorrowedFd<'_>) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn bundle_round_trip_many_fds() {
        let (a, b) = pair();
        let files: Vec<OwnedFd> =
            (0..600).map(|_| rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| send_fds(a.as_fd(), b"payload", &borrowed, &mut Waiter::new(None)));
            let got = recv_fds(b.as_fd(), BundleLimits { max_fds: 1000, max_data: 100 }, &mut Waiter::new(None));
            (h.join().unwrap(), got)
        });
        sender.0.unwrap();
        let (data, fds) = sender.1.unwrap();
        assert_eq!(data, b"payload");
        assert_eq!(fds.len(), 600);
        for (x, y) in files.iter().zip(&fds) {
            assert_eq!(ino(x.as_fd()), ino(y.as_fd()));
        }
    }

    #[test]
    fn bundle_limits_refuse_before_allocating() {
        let (a, b) = pair();
        let f = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        send_fds(a.as_fd(), b"", &[f.as_fd(), f.as_fd()], &mut Waiter::new(None)).unwrap();
        let e = recv_fds(b.as_fd(), BundleLimits { max_fds: 1, max_data: 0 }, &mut Waiter::new(None)).unwrap_err();
        assert!(matches!(e, Error::Corrupt(ref m) if m.contains("declares 2 fds")), "{e}");
    }

    #[test]
    fn truncated_control_closes_and_errors() {
        let (a, b) = pair();
        let f = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        sendmsg_fds(a.as_fd(), b"x", &[f.as_fd(); 3], &mut Waiter::new(None)).unwrap();
        let mut buf = [0u8; 4];
        let e = recvmsg_fds(b.as_fd(), &mut buf, 1, &mut Waiter::new(None)).unwrap_err();
        assert!(matches!(e, Error::Truncated { .. }), "{e}");
    }

    #[test]
    fn timeout_and_eof() {
        let (a, b) = pair();
        let mut buf = [0u8; 4];
        let e = recvmsg_fds(b.as_fd(), &mut buf, 1, &mut Waiter::new(Some(Duration::from_millis(30)))).unwrap_err();
        assert!(matches!(e, Error::TimedOut(_)));
        drop(a);
        assert_eq!(recvmsg_fds(b.as_fd(), &mut buf, 1, &mut Waiter::new(None)).unwrap().0, 0);
        let e = recv_fds(b.as_fd(), BundleLimits { max_fds: 1, max_data: 1 }, &mut Waiter::new(None)).unwrap_err();
        assert!(matches!(e, Error::PeerClosed(_)), "{e}");
    }

    #[test]
    fn listener_authorizes_by_uid() {
        let dir = std::env::temp_dir().join(format!("cprfast-scm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let me = rustix::process::geteuid().as_raw();
        let l = UnixListener::bind(&path, 0o600, None, 4).unwrap();
        let st = rustix::fs::stat(&path).unwrap();
        assert_eq!(st.st_mode & 0o777, 0o600);
        let c = connect_unix(&path, &mut Waiter::new(Some(Duration::from_secs(5)))).unwrap();
        match l.accept(&mut Waiter::new(Some(Duration::from_secs(5)))).unwrap() {
            Accepted::Peer(_, cred) => assert_eq!((cred.pid, cred.uid), (std::process::id() as i32, me)),
            Accepted::Refused(c) => panic!("refused {c:?}"),
        }
        drop(c);
        let strict = UnixListener::bind(&dir.join("s.sock"), 0o600, Some(vec![me.wrapping_add(1)]), 4).unwrap();
        let _c = connect_unix(&dir.join("s.sock"), &mut Waiter::new(None)).unwrap();
        assert!(matches!(strict.accept(&mut Waiter::new(None)).unwrap(), Accepted::Refused(_)));
        drop((l, strict));
        assert!(!path.exists(), "listener did not unlink its socket");
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn socket_dir_world_writable_without_sticky_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cprfast-scm-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = UnixListener::bind(&dir.join("l.sock"), 0o600, None, 4).unwrap_err();
        assert!(matches!(e, Error::Os { errno, .. } if errno.0 == libc::EACCES), "{e}");
        assert!(e.to_string().contains("without the sticky bit"), "{e}");
        assert!(!dir.join("l.sock").exists(), "a socket was created before the check");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        drop(UnixListener::bind(&dir.join("l.sock"), 0o600, None, 4).unwrap());
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn socket_file_appears_listening_and_never_replaces_one() {
        let dir = std::env::temp_dir().join(format!("cprfast-scm-stage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let l = UnixListener::bind(&path, 0o600, None, 4).unwrap();
        // The file exists only once it listens: a connect right away is accepted, not refused.
        let c = connect_unix(&path, &mut Waiter::new(Some(Duration::from_secs(5)))).unwrap();
        let e = UnixListener::bind(&path, 0o600, None, 4).unwrap_err();
        assert!(matches!(e, Error::Os { errno, .. } if errno.0 == libc::EADDRINUSE), "{e}");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("l.sock")], "a staging name was left behind");
        drop((c, l));
        std::fs::remove_dir(&dir).unwrap();
    }
}
