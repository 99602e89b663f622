"""SECURITY.md's claims that no other test checks: socket modes, peer refusal via channels, the exec-state variable."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cprfast import cpr_state
from cprfast.channels import UnixAddress, listen
from cprfast.errors import StreamError
from cprfast.migration import MigrationState
from cprfast.qmp import QMPServer
from cprfast.status import RunState
from test_scm import NOBODY, connect_as_nobody, read_report, reap


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may traverse, so another uid can reach a socket in it."""
    d = Path(tempfile.mkdtemp(prefix="cprfast-sec-"))
    d.chmod(0o755)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


class _Vcpus:
    def vm_stop(self, state: RunState) -> None:
        pass

    def vm_start(self, state: RunState) -> None:
        pass


def test_qmp_socket_is_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"

    async def main() -> int:
        server = QMPServer(MigrationState(_Vcpus()), path)
        await server.start()
        try:
            return stat.S_IMODE(os.stat(path).st_mode)
        finally:
            await server.close()

    assert asyncio.run(main()) == 0o600


def _qmp_server(path: Path, allowed_uids: list[int] | None = None) -> QMPServer:
    server = QMPServer(MigrationState(_Vcpus()), path, allowed_uids=allowed_uids)
    server.start_in_thread()
    return server


def _greeting(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        return s.recv(4096)


def test_qmp_refuses_another_uid_before_the_greeting(public_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Even with the socket opened up to everyone, a stranger is logged with pid and uid and
    closed without a byte; our own uid still gets the greeting afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch a child to uid nobody")
    path = public_dir / "qmp.sock"
    server = _qmp_server(path)
    try:
        with caplog.at_level(logging.WARNING, logger="cprfast.scm"):
            path.chmod(0o666)
            pid, r = connect_as_nobody(path)
            assert read_report(r, 1) == b"C"
            assert read_report(r, 4) == b"EOF", "the refused peer got data (the greeting?)"
            reap(pid, r)
        assert b'"QMP"' in _greeting(path)
    finally:
        server.stop_thread()
    refusals = [rec.getMessage() for rec in caplog.records if rec.name == "cprfast.scm"]
    assert len(refusals) == 1 and f"pid {pid} uid {NOBODY}" in refusals[0], refusals
    assert not path.exists(), "the QMP socket file was left behind"


def test_qmp_allow_list_lets_a_named_uid_in(public_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch a child to uid nobody")
    path = public_dir / "qmp.sock"
    server = _qmp_server(path, allowed_uids=[os.geteuid(), NOBODY])
    try:
        path.chmod(0o666)
        pid, r = connect_as_nobody(path)
        assert read_report(r, 1) == b"C"
        assert read_report(r, 4) == b"DATA", "the allowed uid did not get the greeting"
        reap(pid, r)
    finally:
        server.stop_thread()


def _open_qmp(path: Path) -> None:
    _qmp_server(path).stop_thread()


def _open_cpr(path: Path) -> None:
    listen(UnixAddress(str(path))).close()


@pytest.mark.parametrize("open_socket", [_open_qmp, _open_cpr], ids=["qmp", "cpr"])
def test_socket_directory_anyone_may_write_to_is_refused(
    open_socket: Callable[[Path], None], tmp_path: Path
) -> None:
    """Anyone could swap the socket file in a world-writable directory without the sticky bit."""
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by everyone without the sticky bit"):
        open_socket(d / "x.sock")
    assert list(d.iterdir()) == []
    d.chmod(0o1777)  # the sticky bit, as /tmp: others cannot remove our file
    open_socket(d / "x.sock")


@pytest.mark.parametrize("open_socket", [_open_qmp, _open_cpr], ids=["qmp", "cpr"])
def test_socket_directory_owned_by_another_user_is_refused(
    open_socket: Callable[[Path], None], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to uid nobody")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o755)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match=f"owned by uid {NOBODY}"):
        open_socket(d / "x.sock")
    assert list(d.iterdir()) == []


def test_cpr_channel_socket_is_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "cpr.sock"
    with listen(UnixAddress(str(path))):
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_cpr_channel_refuses_another_uid_even_if_the_socket_is_opened_up(
    public_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mode 0600 keeps other users out; if someone widened it, SO_PEERCRED still does: the
    stranger is logged with pid and uid and gets nothing, and the real source's state loads."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch a child to uid nobody")
    path = public_dir / "cpr.sock"
    result: list[cpr_state.IncomingCpr | BaseException] = []

    def target() -> None:
        try:
            incoming = cpr_state.load_incoming(cpr_channel=UnixAddress(str(path)), environ={}, timeout=20)
            assert incoming is not None
            result.append(incoming)
        except BaseException as e:
            result.append(e)

    with caplog.at_level(logging.WARNING, logger="cprfast.scm"):
        thread = threading.Thread(target=target)
        thread.start()
        for _ in range(200):
            if path.exists():
                break
            thread.join(0.05)
        path.chmod(0o666)
        pid, r = connect_as_nobody(path)
        assert read_report(r, 1) == b"C"
        source = cpr_state.CprState()
        fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        try:
            source.save_fd("ram", 0, fd)
            sock = cpr_state.transfer_outgoing(source, UnixAddress(str(path)), timeout=20)
            thread.join(20)
            sock.close()
        finally:
            os.close(fd)
            source.close()
        assert read_report(r, 3) == b"EOF", "the refused peer was not closed"
        reap(pid, r)
    (incoming,) = result
    assert isinstance(incoming, cpr_state.IncomingCpr), incoming
    try:
        assert [(n, i) for n, i, _ in incoming.state.entries()] == [("ram", 0)]
    finally:
        incoming.state.close()
        assert incoming.channel_sock is not None
        incoming.channel_sock.close()
        cpr_state.reset_incoming_mode()
    refusals = [rec.getMessage() for rec in caplog.records if rec.name == "cprfast.scm"]
    assert len(refusals) == 1 and f"pid {pid} uid {NOBODY}" in refusals[0]


@pytest.mark.parametrize("kind", ["pipe", "file", "socket"])
def test_exec_state_variable_naming_a_non_memfd_is_refused_and_left_open(kind: str, tmp_path: Path) -> None:
    """A stale or forged QEMU_CPR_EXEC_STATE must not make us read a pipe (it would block) or
    close a file that is not ours; the variable is removed all the same."""
    extra: list[int] = []
    if kind == "pipe":
        fd, w = os.pipe()  # the writer stays open: reading would block forever
        extra.append(w)
    elif kind == "file":
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, b"QCPR")
    else:
        a, b = socket.socketpair()
        fd, _ = a.detach(), extra.append(b.detach())
    env = {cpr_state.EXEC_STATE_ENV: str(fd)}
    try:
        with pytest.raises(StreamError, match=f"fd {fd} is not a memfd"):
            cpr_state.load_incoming(cpr_channel=None, environ=env)
        assert env == {}
        os.fstat(fd)  # still open
        assert cpr_state.incoming_mode() is None
    finally:
        for n in (fd, *extra):
            os.close(n)


@pytest.mark.parametrize("value", ["", "-1", "3x", " 3", "٣", "99999999999999999999999"])
def test_exec_state_variable_garbage(value: str) -> None:
    env = {cpr_state.EXEC_STATE_ENV: value}
    with pytest.raises(StreamError):
        cpr_state.load_incoming(cpr_channel=None, environ=env)
    assert env == {}
