"""fd passing over real UNIX sockets between real processes: bundles, single
messages, truncation, corrupt input, peer authorization, timeouts, signals."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cprfast import FdPassingError, PeerClosedError, StreamError, _core
from cprfast.errors import BadFdError

NOBODY = 65534


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("scm-test")
    yield fd
    os.close(fd)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse, so another uid can reach a socket in it."""
    d = Path(tempfile.mkdtemp(prefix="cprfast-scm-"))
    d.chmod(0o755)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def header(n_fds: int, data_len: int, magic: bytes = b"CPFD", version: int = 1) -> bytes:
    return magic + struct.pack("<IQQ", version, n_fds, data_len)


SENDER = """
import json, os, sys
from cprfast import _core
sock, n = int(sys.argv[1]), int(sys.argv[2])
fds = [os.memfd_create(f"m{i}") for i in range(n)]
ids = [[os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in fds]
_core.send_fds(sock, json.dumps(ids).encode(), fds, timeout=60)
"""


def test_5000_fds_in_one_bundle_from_another_process(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    before = open_fds()
    child = subprocess.Popen([sys.executable, "-c", SENDER, str(b.fileno()), "5000"], pass_fds=[b.fileno()])
    try:
        data, fds = _core.recv_fds(a.fileno(), timeout=60)
    finally:
        assert child.wait(60) == 0
    try:
        ids = json.loads(data)
        assert len(fds) == len(ids) == 5000
        assert len(set(fds)) == 5000
        for fd, (dev, ino) in zip(fds, ids, strict=True):
            st = os.fstat(fd)
            assert (st.st_dev, st.st_ino) == (dev, ino)
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        for fd in fds:
            os.close(fd)
    assert open_fds() == before


def test_bundle_with_no_fds_and_empty_data(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    _core.send_fds(a.fileno(), b"", [])
    _core.send_fds(a.fileno(), b"second", [])
    assert _core.recv_fds(b.fileno(), timeout=5) == (b"", [])
    assert _core.recv_fds(b.fileno(), timeout=5) == (b"second", [])


def test_consecutive_bundles_keep_their_own_fds(pair: tuple[socket.socket, socket.socket], memfd: int) -> None:
    a, b = pair
    other = os.memfd_create("other")
    try:
        _core.send_fds(a.fileno(), b"one", [memfd] * 300)
        _core.send_fds(a.fileno(), b"two", [other] * 2)
        d1, f1 = _core.recv_fds(b.fileno(), timeout=5)
        d2, f2 = _core.recv_fds(b.fileno(), timeout=5)
        assert (d1, len(f1), d2, len(f2)) == (b"one", 300, b"two", 2)
        assert {os.fstat(fd).st_ino for fd in f1} == {os.fstat(memfd).st_ino}
        assert {os.fstat(fd).st_ino for fd in f2} == {os.fstat(other).st_ino}
        for fd in f1 + f2:
            os.close(fd)
    finally:
        os.close(other)


def test_single_message_limit_and_round_trip(pair: tuple[socket.socket, socket.socket], memfd: int) -> None:
    a, b = pair
    assert _core.SCM_MAX_FD == 253
    with pytest.raises(ValueError, match="at most 253"):
        _core.sendmsg_fds(a.fileno(), b"x", [memfd] * 254)
    with pytest.raises(ValueError, match="at least one data byte"):
        _core.sendmsg_fds(a.fileno(), b"", [memfd])
    assert _core.sendmsg_fds(a.fileno(), b"hello", [memfd] * 253) == 5
    data, fds = _core.recvmsg_fds(b.fileno(), 100, timeout=5)
    assert data == b"hello" and len(fds) == 253
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("max_fds", [0, 1, 2])
def test_truncated_control_data_closes_every_fd(
    pair: tuple[socket.socket, socket.socket], memfd: int, max_fds: int
) -> None:
    a, b = pair
    _core.sendmsg_fds(a.fileno(), b"x", [memfd] * 3)
    before = open_fds()
    with pytest.raises(FdPassingError) as e:
        _core.recvmsg_fds(b.fileno(), 16, max_fds, timeout=5)
    assert e.value.errno == errno.ENOBUFS
    assert open_fds() == before


def test_eof_is_empty_bytes_for_recvmsg_and_peer_closed_for_bundle(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert _core.recvmsg_fds(b.fileno(), 16, timeout=5) == (b"", [])
    with pytest.raises(PeerClosedError):
        _core.recv_fds(b.fileno(), timeout=5)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (header(1, 0, magic=b"QCPR"), "not an fd bundle"),
        (header(1, 0, version=7), "version 7"),
        (header(2**60, 0), "declares 1152921504606846976 fds"),
        (header(0, 2**63), "declares 9223372036854775808 data bytes"),
    ],
)
def test_corrupt_header_is_stream_error(pair: tuple[socket.socket, socket.socket], raw: bytes, match: str) -> None:
    a, b = pair
    a.sendall(raw)
    before = open_fds()
    with pytest.raises(StreamError, match=match):
        _core.recv_fds(b.fileno(), timeout=5)
    assert open_fds() == before


def test_more_fds_than_declared_closes_all(pair: tuple[socket.socket, socket.socket], memfd: int) -> None:
    a, b = pair
    a.sendall(header(1, 0))
    _core.sendmsg_fds(a.fileno(), b"\x01", [memfd] * 3)
    before = open_fds()
    with pytest.raises(StreamError, match="more fds than"):
        _core.recv_fds(b.fileno(), timeout=5)
    assert open_fds() == before


def test_wrong_batch_marker_closes_all(pair: tuple[socket.socket, socket.socket], memfd: int) -> None:
    a, b = pair
    a.sendall(header(2, 0))
    _core.sendmsg_fds(a.fileno(), b"\x07", [memfd] * 2)
    before = open_fds()
    with pytest.raises(StreamError, match="marker says 7 fds, expected 2"):
        _core.recv_fds(b.fileno(), timeout=5)
    assert open_fds() == before


def test_peer_gone_mid_bundle_closes_received_fds(pair: tuple[socket.socket, socket.socket], memfd: int) -> None:
    a, b = pair
    a.sendall(header(300, 10))
    _core.sendmsg_fds(a.fileno(), b"\xfd", [memfd] * 253)
    a.shutdown(socket.SHUT_WR)
    before = open_fds()
    with pytest.raises(PeerClosedError, match="after 1 of 12 bytes"):
        _core.recv_fds(b.fileno(), timeout=5)
    assert open_fds() == before


def test_bundle_limits(pair: tuple[socket.socket, socket.socket], memfd: int) -> None:
    a, b = pair
    _core.send_fds(a.fileno(), b"abc", [memfd] * 4)
    with pytest.raises(StreamError, match="declares 4 fds; the limit is 3"):
        _core.recv_fds(b.fileno(), max_fds=3, timeout=5)


def test_bad_arguments(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match="invalid file descriptor"):
        _core.send_fds(a.fileno(), b"x", [-1])
    with pytest.raises(ValueError, match="timeout"):
        _core.recv_fds(a.fileno(), timeout=-1)
    with pytest.raises(ValueError, match="at least one byte"):
        _core.recvmsg_fds(a.fileno(), 0)
    with pytest.raises(ValueError, match="exceeds SCM_MAX_FD"):
        _core.recvmsg_fds(a.fileno(), 1, 254)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as e:
            _core.send_fds(r, b"x", [])
        assert e.value.errno == errno.ENOTSOCK
        with pytest.raises(BadFdError):
            _core.UnixListener.from_fd(r)
        os.fstat(r)  # still open: from_fd leaves a rejected fd to its owner
    finally:
        os.close(r)
        os.close(w)


def test_send_to_closed_peer_is_peer_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    with pytest.raises(PeerClosedError):
        _core.send_fds(a.fileno(), b"x", [], timeout=5)


def test_timeouts(pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    a, b = pair
    with pytest.raises(TimeoutError):
        _core.recvmsg_fds(b.fileno(), 16, timeout=0.05)
    with pytest.raises(TimeoutError):
        _core.recv_fds(b.fileno(), timeout=0)
    with pytest.raises(TimeoutError):  # nobody reads: the socket buffer fills up
        _core.send_fds(a.fileno(), bytes(64 << 20), [], timeout=0.2)
    with _core.UnixListener(str(tmp_path / "l.sock")) as listener, pytest.raises(TimeoutError):
        listener.accept(timeout=0.05)


def test_signal_handler_interrupts_a_wait(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        with pytest.raises(Interrupted):
            _core.recv_fds(b.fileno())  # no timeout: only the signal can end it
    finally:
        timer.join()
        signal.signal(signal.SIGUSR1, old)


def test_peer_credentials_of_socketpair(pair: tuple[socket.socket, socket.socket]) -> None:
    assert _core.peer_credentials(pair[0].fileno()) == (os.getpid(), os.getuid(), os.getgid())
    with pytest.raises(OSError):
        _core.peer_credentials(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))


def test_listener_mode_ignores_umask_and_close_unlinks(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    old = os.umask(0)
    try:
        with _core.UnixListener(str(path)) as listener:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert listener.path == str(path)
            assert listener.fileno() >= 0
        assert not path.exists()
        assert listener.fileno() == -1
        os.umask(0o077)
        with _core.UnixListener(path, mode=0o666):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    finally:
        os.umask(old)
    with pytest.raises(ValueError, match="beyond 0o777"):
        _core.UnixListener(str(path), mode=0o4777)


def test_listener_refuses_to_bind_over_existing_path(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError) as e:
        _core.UnixListener(str(path))
    assert e.value.errno == errno.EADDRINUSE
    assert path.read_text() == "not a socket"


def test_accept_returns_authorized_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sock")
    with _core.UnixListener(path) as listener:
        client = _core.connect_unix(path, timeout=5)
        server = listener.accept(timeout=5)
        try:
            assert _core.peer_credentials(server) == (os.getpid(), os.getuid(), os.getgid())
            assert fcntl.fcntl(server, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert os.get_blocking(client) and os.get_blocking(server)
            _core.send_fds(client, b"over the listener", [client])
            data, fds = _core.recv_fds(server, timeout=5)
            assert data == b"over the listener" and len(fds) == 1
            os.close(fds[0])
        finally:
            os.close(client)
            os.close(server)


def test_close_from_another_thread_ends_accept(tmp_path: Path) -> None:
    listener = _core.UnixListener(str(tmp_path / "l.sock"))
    timer = threading.Timer(0.1, listener.close)
    timer.start()
    with pytest.raises(OSError) as e:
        listener.accept(timeout=10)
    timer.join()
    assert e.value.errno == errno.EBADF
    with pytest.raises(OSError):
        listener.accept()


def test_from_fd_adopts_an_inherited_listener(tmp_path: Path) -> None:
    path = tmp_path / "inherited.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    listener = _core.UnixListener.from_fd(s.detach())
    assert listener.path == str(path)
    client = _core.connect_unix(str(path), timeout=5)
    conn = listener.accept(timeout=5)
    os.close(conn)
    os.close(client)
    listener.close()
    assert path.exists(), "an adopted listener must not unlink its creator's socket"


def test_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _core.connect_unix(str(tmp_path / "missing.sock"), timeout=1)
    with pytest.raises(OSError):
        _core.connect_unix("/tmp/" + "x" * 200, timeout=1)


def connect_as_nobody(path: Path) -> tuple[int, int]:
    """Fork a child that becomes uid nobody and connects to `path`. It reports
    on a pipe "C" once connected then "EOF" when the server closes it, or
    "E<errno>" if connect fails. Returns (pid, read end of the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            os.close(r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
            except OSError as e:
                os.write(w, f"E{e.errno}".encode())
            else:
                os.write(w, b"C")
                s.settimeout(10)
                os.write(w, b"EOF" if s.recv(1) == b"" else b"DATA")
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    return pid, r


def read_report(r: int, n: int) -> bytes:
    assert select.select([r], [], [], 10)[0], "child did not report"
    return os.read(r, n)


def reap(pid: int, r: int) -> None:
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_mode_0600_keeps_other_users_out(public_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch a child to uid nobody")
    path = public_dir / "l.sock"
    with _core.UnixListener(str(path)):
        pid, r = connect_as_nobody(path)
        assert read_report(r, 16) == f"E{errno.EACCES}".encode()
        reap(pid, r)


def test_peer_with_other_uid_is_refused_and_accept_keeps_waiting(
    public_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch a child to uid nobody")
    path = public_dir / "l.sock"
    with _core.UnixListener(str(path), mode=0o666) as listener:
        pid, r = connect_as_nobody(path)
        assert read_report(r, 1) == b"C"
        mine = _core.connect_unix(str(path), timeout=5)  # queued behind the refused peer
        with caplog.at_level(logging.WARNING, logger="cprfast.scm"):
            conn = listener.accept(timeout=10)
        try:
            assert _core.peer_credentials(conn)[:2] == (os.getpid(), os.getuid())
        finally:
            os.close(conn)
            os.close(mine)
        assert read_report(r, 3) == b"EOF", "the refused peer's connection was not closed"
        reap(pid, r)
    refusals = [rec for rec in caplog.records if rec.name == "cprfast.scm"]
    assert len(refusals) == 1
    assert f"pid {pid} uid {NOBODY}" in refusals[0].getMessage()


def test_allowed_uids_admits_another_user(public_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch a child to uid nobody")
    path = public_dir / "l.sock"
    with _core.UnixListener(str(path), mode=0o666, allowed_uids=[NOBODY]) as listener:
        pid, r = connect_as_nobody(path)
        assert read_report(r, 1) == b"C"
        conn = listener.accept(timeout=10)
        assert _core.peer_credentials(conn) == (pid, NOBODY, NOBODY)
        os.close(conn)
        assert read_report(r, 3) == b"EOF"
        reap(pid, r)
