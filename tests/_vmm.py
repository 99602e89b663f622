"""Helpers for the integration tests: reference-VMM processes driven over QMP by qemu.qmp."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu_runner import close_thread_loop

from cprfast import _core

PYTHON = sys.executable
"""The venv's interpreter (a link to the real binary, not a pyenv shim): what cpr-exec runs."""
HEARTBEAT = 0x1000
HOT_START = 0x10_0000
PAGE = 4096


def guest_kinds() -> list[Any]:
    """Both guest kinds; KVM skips with the probe's reason where /dev/kvm is unusable."""
    probe = _core.probe_kvm()
    kvm_mark = pytest.mark.skipif(not probe["available"], reason=f"KVM unusable: {probe['detail']}")
    return ["threads", pytest.param("kvm", marks=kvm_mark)]


def wait_until(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def fifo_threads(pid: int) -> list[str]:
    """Names of ``pid``'s threads running at SCHED_FIFO now."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            if os.sched_getscheduler(int(tid)) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO:
                names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
    return names


def threads_cpus(pid: int) -> dict[str, set[int]]:
    """Each thread's name and the CPUs it may run on."""
    out: dict[str, set[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        out.setdefault(name, set()).update(os.sched_getaffinity(int(tid)))
    return out


def fd_count(pid: int) -> int:
    """Open fds of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What a process's fds point to (sorted), for leak comparisons."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return sorted(out)


class Vmm:
    """One ``python -m cprfast.vmm`` process with a QMP socket."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        *args: str,
        pass_fds: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.qmp_path = tmp / f"{name}.qmp"
        self.log_path = tmp / f"{name}.log"
        self.argv = [PYTHON, "-m", "cprfast.vmm", *args, "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, pass_fds=pass_fds, env=env)
        self._qmp: QEMUMonitorProtocol | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def qmp(self, timeout: float = 60.0) -> QEMUMonitorProtocol:
        """A negotiated QMP connection (waits for the server; reconnects after an exec)."""
        if self._qmp is None:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: no QMP server at {self.qmp_path}:\n{self.log()}")
                if not self._listening():
                    time.sleep(0.02)
                    continue
                qmp = QEMUMonitorProtocol(str(self.qmp_path))
                try:
                    qmp.connect()
                    break
                except Exception:  # noqa: BLE001 (the old server going away under an exec: retry)
                    with contextlib.suppress(Exception):
                        qmp.close()
                    time.sleep(0.02)
            qmp.settimeout(60)
            self._qmp = qmp
        return self._qmp

    def _listening(self) -> bool:
        """Whether a server accepts at the QMP path (after an exec the old file stays until the
        successor's server replaces it, and connecting there is refused)."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.qmp_path))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def reconnect(self) -> QEMUMonitorProtocol:
        """Wait until the process exec's (its QMP connection drops), then connect to the new server."""
        if self._qmp is not None:
            deadline = time.monotonic() + 60
            with contextlib.suppress(Exception):  # the disconnect ends the loop
                while time.monotonic() < deadline:
                    self._qmp.cmd("query-status")
                    time.sleep(0.005)
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        return self.qmp()

    def cmd(self, name: str, **args: Any) -> Any:
        return self.qmp().cmd(name, **args)

    def raw(self, name: str, **args: Any) -> dict[str, Any]:
        return self.qmp().cmd_raw(name, args or None)

    def guest(self) -> dict[str, Any]:
        result: dict[str, Any] = self.cmd("x-query-guest")
        return result

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def migrate_status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.cmd("query-migrate")
        return result

    def wait_migration(self, *done: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll query-migrate until its status is one of ``done``."""
        info: dict[str, Any] = wait_until(
            lambda: (i := self.migrate_status()).get("status") in done and i,
            timeout,
            f"{self.name} migration status in {done}",
        )
        return info

    def wait_heartbeat_moves(self) -> int:
        """Wait until the guest's heartbeat advances; returns the later value."""
        first = self.guest()["heartbeat"]
        return int(wait_until(lambda: (h := self.guest()["heartbeat"]) > first and h, what="heartbeat"))

    def quit(self) -> None:
        """QMP quit, then wait for the process (kill it if it does not go)."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.qmp().cmd("quit")
        self.close()

    def close(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.close()


@contextlib.contextmanager
def vmms() -> Iterator[list[Vmm]]:
    """A list to put Vmm processes in; all are killed at the end."""
    procs: list[Vmm] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
            p.close()
        close_thread_loop()


def ram_of(vmm: Vmm) -> _core.Region:
    """The guest-RAM memfd of a VMM, opened through /proc (the same pages, not a copy)."""
    info = vmm.guest()["ram"]
    fd = os.open(f"/proc/{vmm.pid}/fd/{info['fd']}", os.O_RDWR | os.O_CLOEXEC)
    try:
        return _core.Region.adopt(fd, info["size"], name="test-view")
    finally:
        os.close(fd)


def fill_cold(ram: _core.Region, hot_len: int, seed: int = 7) -> None:
    """Write a random pattern into the pages the guest never writes (after the hot set)."""
    rng = np.random.default_rng(seed)
    start = HOT_START + hot_len
    chunk = 4 << 20
    for off in range(start, ram.size, chunk):
        n = min(chunk, ram.size - off)
        ram.write(off, rng.integers(0, 255, n, dtype=np.uint8).tobytes())


def cold_checksums(ram: _core.Region, hot_len: int) -> np.ndarray[Any, Any]:
    """Per-page checksums of every page the guest does not write: after the hot set. The first
    MiB is left out too: the heartbeat is there, and a KVM guest's page tables (accessed and
    dirty bits) and stack."""
    sums = ram.checksums()
    return np.asarray(sums[(HOT_START + hot_len) // PAGE :])


def same_object(pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool:
    """Whether two processes' fds are the same kernel object (device and inode)."""
    a, b = os.stat(f"/proc/{pid_a}/fd/{fd_a}"), os.stat(f"/proc/{pid_b}/fd/{fd_b}")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def channel(kind: str, path: Path) -> str:
    """A QEMU JSON channel on a UNIX path, as -incoming takes it."""
    return json.dumps({"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": str(path)}})


def channels(main: Path, cpr: Path) -> list[dict[str, Any]]:
    """The QMP ``migrate`` channels of a cpr-transfer."""
    return [json.loads(channel("main", main)), json.loads(channel("cpr", cpr))]


def listening_socket(path: Path) -> socket.socket:
    """A pre-listened UNIX socket to pass as an inherited fd (QEMU's race-free cpr channel)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock
