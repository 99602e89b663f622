"""``cprfast demo``: live-update the reference VMM through every mode, watched from outside.

One guest lives through a chain of processes: the reference VMM boots it, then
each mode hands it to a fresh process (cpr-transfer: a new process receives the
fds; cpr-exec: the same PID exec's a new program image; cpr-reboot: save to a
file, restore in a new process; normal: precopy into a new process). Everything
is driven over QMP, as a management tool drives QEMU.

What each step reports, measured here and not taken from the VMM's word:

- **guest pause**: the longest stall of the guest's heartbeat overlapping the
  update (from ``migrate`` until the new process answers QMP with its guest
  running), seen by a native :class:`cprfast._core.Observer` mapping the
  guest-RAM memfd through ``/proc/PID/fd/N``. When RAM moves to a new memfd (normal, cpr-reboot), a
  follower thread retargets the observer once the target's heartbeat has
  passed the source's (only a running target guest can do that).
- **memory identical**: a fingerprint of every page the guest does not write
  (all but the heartbeat page and the hot set) matches the one taken at boot,
  after the demo seeded one in 64 of those pages with data; plus heartbeat
  continuity (it never went backwards, and the target resumed from the value
  the source stopped at).
- **same fd**: the console pipe, a preserved device fd, is the same kernel
  object (st_dev, st_ino) in the new process (CPR modes only; normal and
  cpr-reboot start new processes with new fds, as in QEMU).

:class:`LiveGuest` is the machinery; the scenario benchmarks (``bench/``) use it too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
from qemu.qmp.legacy import QEMUMonitorProtocol

from cprfast import _core
from cprfast.realtime import check_priority
from cprfast.vmm.cli import command as vmm_command
from cprfast.vmm.guest import HEARTBEAT, HOT_START

MODES = ("cpr-transfer", "cpr-exec", "cpr-reboot", "normal")
"""Every live-update mode, in the demo's order."""
CPR_MODES = frozenset({"cpr-transfer", "cpr-exec"})
"""The modes that keep guest RAM and device fds in place."""
PAGE = 4096
SEED_STRIDE = 64
"""The demo writes data into one in SEED_STRIDE of the pages the guest leaves alone ..."""
SEED_RUN = 64
"""... in runs of SEED_RUN pages: a mapped-ram save (cpr-reboot) keeps every page at its own
offset, and deleting a file of scattered 4 KiB extents costs a discard each on a disk mounted
with ``discard`` (3 minutes for 16 GiB of RAM here, against 3 s in 256 KiB runs)."""
TIMEOUT = 120.0
NORMAL_BANDWIDTH = 8 << 30
"""``max-bandwidth`` for normal migration (bytes/s): a local UNIX socket, not a shared link."""
BASELINE_S = 1.0
"""How long the guest is watched with no update, for the noise floor."""
OBSERVER_INTERVAL_NS = 50_000
"""The observer sleeps this long between samples: it must not take a CPU from the guest."""
OBSERVER_PRIORITY = 1
"""SCHED_FIFO priority of the observer's sampler, so it wakes on time next to a busy VMM."""
SWITCHOVER_PRIORITY = 1
"""The VMMs' ``--switchover-priority`` (where we may use SCHED_FIFO): see :mod:`cprfast.realtime`."""
_CHUNK = 64 << 20
_WEIGHTS = np.random.default_rng(0x5EED).integers(1, 1 << 63, PAGE // 8, dtype=np.uint64) | np.uint64(1)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Footprint:
    """What a process holds, from ``/proc/PID``: the numbers a leak makes grow."""

    fds: int
    maps: int
    """Lines of ``/proc/PID/maps`` (every mapping, guest RAM included)."""
    file_maps: int
    """Mappings of files, memfds included: a guest-RAM mapping kept after an update is one of them."""
    rss_kib: int
    rss_anon_kib: int
    """Private memory only: guest RAM (a shared memfd) moves in and out of RSS as it is touched."""

    @classmethod
    def of(cls, pid: int | str = "self") -> Footprint:
        """Read it now (``"self"``: this process)."""
        proc = Path(f"/proc/{pid}")
        fds = len(os.listdir(proc / "fd"))
        with open(proc / "maps", "rb") as f:
            lines = f.read().splitlines()
        file_maps = sum(1 for line in lines if b" /" in line)
        status = dict(
            line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line
        )
        return cls(fds, len(lines), file_maps, int(status["VmRSS"].split()[0]), int(status["RssAnon"].split()[0]))


@dataclass
class StepResult:
    """One live update, as observed from outside."""

    mode: str
    guest: str
    mem: int
    hot: int
    pid_before: int
    pid_after: int
    pause_ms: float
    """Longest heartbeat stall the observer saw overlapping the update, from ``migrate`` until the
    new process answers QMP with its guest running (the guest pause users feel; QEMU's runner
    measures QEMU by the same rule)."""
    baseline_ms: float
    """The longest stall over 1 s of the same guest with no update (this machine's noise floor)."""
    blind_ms: float
    """The observer's longest gap between two samples (its own descheduling: the measurement's error bar)."""
    total_ms: float
    """From ``migrate`` until the new process answers QMP with its guest running."""
    downtime_ms: float | None
    """What the VMM itself reports (query-migrate ``downtime``), when it does."""
    bytes_moved: int
    """Main-channel bytes (RAM pages and device state)."""
    memory_identical: bool
    heartbeat_continuous: bool
    devices_ok: bool
    """The doorbell device's state (rings) arrived."""
    fd_same: bool | None
    """The preserved console pipe is the same kernel object; None where the mode preserves no fds."""
    dirty_pages: list[int] = field(default_factory=list)
    """Normal mode: dirty pages found at each sync (query-migrate's x-dirty-history)."""
    footprint: Footprint | None = None
    """The VMM that runs the guest afterwards, read from /proc when the update ended."""

    @property
    def ok(self) -> bool:
        """Every check passed."""
        return self.memory_identical and self.heartbeat_continuous and self.devices_ok and self.fd_same is not False


@contextlib.contextmanager
def _swallow() -> Iterator[None]:
    """``contextlib.suppress(Exception)`` that also clears the swallowed exception's frames.

    qemu.qmp leaves its exceptions in reference cycles; a frame kept alive that way keeps
    its callers' frames and their locals, the observer that maps the old guest RAM among
    them, so the old memfd would stay mapped (and allocated) until the garbage collector
    ran. The soak counts the driver's file mappings to catch exactly that.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the caller expects failures here
        seen: set[int] = set()
        exc: BaseException | None = e
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
            exc = exc.__context__


class Vmm:
    """One reference-VMM process (its own session, so Ctrl-C reaches only the demo) and its QMP."""

    def __init__(
        self, workdir: Path, generation: int, args: Sequence[str], *extra: str, pass_fds: Sequence[int] = ()
    ) -> None:
        self.workdir = workdir
        self.log_path = workdir / "vmm.log"
        self.qmp_path = workdir / f"qmp-{generation}.sock"
        self.machine_args = list(args)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(generation, *extra),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
            )
        self._qmp: QEMUMonitorProtocol | None = None

    def argv(self, generation: int, *extra: str) -> list[str]:
        """A command line for this VMM's machine (its own, or its cpr-exec successor's)."""
        qmp = self.workdir / f"qmp-{generation}.sock"
        return vmm_command(*self.machine_args, *extra, "-qmp", f"unix:{qmp},server=on,wait=off")

    @property
    def pid(self) -> int:
        """The process id (kept by a cpr-exec)."""
        return self.proc.pid

    def log_tail(self) -> str:
        """The end of the VMM log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def reconnect(self, generation: int) -> None:
        """After a cpr-exec: drop the old connection; the successor serves QMP on a new path."""
        self._drop()
        self.qmp_path = self.workdir / f"qmp-{generation}.sock"

    def qmp(self) -> QEMUMonitorProtocol:
        """A negotiated connection (waits for the server to listen)."""
        if self._qmp is None:
            deadline = time.monotonic() + TIMEOUT
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the VMM exited with status {self.proc.returncode}:\n{self.log_tail()}")
                if self.qmp_path.exists():
                    qmp = QEMUMonitorProtocol(str(self.qmp_path))
                    try:
                        qmp.connect()
                        qmp.settimeout(TIMEOUT)
                        self._qmp = qmp
                        break
                    except Exception:  # noqa: BLE001 - not accepting yet: retry until the deadline
                        with _swallow():
                            qmp.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the VMM's QMP {self.qmp_path} did not come up:\n{self.log_tail()}")
                time.sleep(0.005)
        return self._qmp

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a QMP command; an error reply raises (qemu.qmp's ExecuteError)."""
        return self.qmp().cmd(name, **args)

    def guest(self) -> dict[str, Any]:
        """``x-query-guest``."""
        info: dict[str, Any] = self.cmd("x-query-guest")
        return info

    def wait_listening(self, path: Path) -> None:
        """Wait until this process listens on the UNIX socket ``path`` (it exists)."""
        deadline = time.monotonic() + TIMEOUT
        while not path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the VMM exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the VMM did not listen on {path}:\n{self.log_tail()}")
            time.sleep(0.002)

    def ram_path(self) -> str:
        """The guest-RAM memfd as a path any process can open."""
        return f"/proc/{self.pid}/fd/{self.guest()['ram']['fd']}"

    def _drop(self) -> None:
        if self._qmp is not None:
            with _swallow():
                self._qmp.close()
            self._qmp = None

    def quit(self) -> None:
        """QMP ``quit`` and reap; a VMM that does not go in 10 s is killed."""
        if self.proc.poll() is None:
            with _swallow():
                self.cmd("quit")
        self._drop()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL and reap."""
        self._drop()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _identity(pid: int, fd: int) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/fd/{fd}")
    return (st.st_dev, st.st_ino)


def fingerprint(path: str, size: int, hot: int) -> npt.NDArray[np.uint64]:
    """Per-page fingerprints of a memfd; the pages the guest writes (its first MiB, the hot set) are 0.

    Reads with ``pread`` between ``SEEK_DATA`` and ``SEEK_HOLE`` (never maps, so
    holes stay holes); a hole and a zero page both give 0. A page's
    fingerprint is a weighted sum of its words with odd weights, so any one
    changed word changes it.
    """
    out = np.zeros(size // PAGE, dtype=np.uint64)
    buf = np.empty(_CHUNK // 8, dtype=np.uint64)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            for off in range(start, end, _CHUNK):
                n = min(_CHUNK, end - off)
                view = buf[: n // 8]
                if os.preadv(fd, [view.data], off) != n:
                    raise RuntimeError(f"short read of {path} at {off}")
                out[off // PAGE : (off + n) // PAGE] = (view.reshape(-1, PAGE // 8) * _WEIGHTS).sum(axis=1)
            pos = end
    finally:
        os.close(fd)
    out[: (HOT_START + hot) // PAGE] = 0
    return out


def seed(path: str, size: int, hot: int) -> None:
    """Write distinct data into one page in :data:`SEED_STRIDE` after the hot set, in runs of
    :data:`SEED_RUN` pages (each page starts with its own number)."""
    pool = np.random.default_rng(7).integers(0, 256, SEED_RUN * PAGE, dtype=np.uint8)
    words = pool.view(np.uint64).reshape(SEED_RUN, PAGE // 8)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        first, last = -(-(HOT_START + hot) // PAGE), size // PAGE
        for page in range(first, last, SEED_STRIDE * SEED_RUN):
            n = min(SEED_RUN, last - page)
            words[:, 0] = np.arange(page, page + SEED_RUN, dtype=np.uint64)
            os.pwrite(fd, pool[: n * PAGE].data, page * PAGE)
    finally:
        os.close(fd)


def _heartbeat(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int.from_bytes(os.pread(fd, 8, HEARTBEAT), "little")
    finally:
        os.close(fd)


def stall_overlapping(report: _core.ObserverReport, start_ns: int, end_ns: int) -> int:
    """The longest stall the observer kept that overlaps ``[start_ns, end_ns]`` (CLOCK_MONOTONIC):
    the update's pause, from ``migrate`` until the new process runs the guest. A host stall
    inside that span counts; one before ``migrate`` or after the guest runs on does not.
    If the report kept none there (it keeps only its longest stalls), the shortest it kept:
    no stall it dropped was longer, so that bounds the pause from above."""
    kept = report.gaps_over(0)
    lo, hi = start_ns - report.started_at_ns, end_ns - report.started_at_ns
    inside = [length for at, length in kept if at < hi and at + length > lo]
    if inside:
        return max(inside)
    return min((length for _, length in kept), default=report.max_stall_ns)


class _Follower:
    """Retarget the observer to the target's memfd once the target's guest runs.

    The target's heartbeat can only pass the source's when the target runs the
    guest (during precopy it holds an older copy), so that is the moment to
    switch; the observer then ends the stall at the first change it sees there.
    """

    def __init__(self, observer: _core.Observer, source: str, target: str) -> None:
        self.error: BaseException | None = None
        self._observer = observer
        self._paths = (source, target)
        self._stop = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cprfast-demo-follow", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with open(self._paths[0], "rb", buffering=0) as src, open(self._paths[1], "rb", buffering=0) as tgt:
                while not self._stop.is_set():
                    ahead = int.from_bytes(os.pread(tgt.fileno(), 8, HEARTBEAT), "little")
                    if ahead > int.from_bytes(os.pread(src.fileno(), 8, HEARTBEAT), "little"):
                        self._observer.retarget(self._paths[1])
                        break
                    time.sleep(50e-6)
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self.error = e
        finally:
            self.done.set()

    def wait(self, timeout: float) -> None:
        """Wait for the switch; raise if it did not happen."""
        if not self.done.wait(timeout):
            raise RuntimeError("the target's guest heartbeat never passed the source's")
        if self.error is not None:
            raise RuntimeError(f"following the migration failed: {self.error}") from self.error

    def stop(self) -> None:
        """End the thread (at once, whether or not it switched)."""
        self._stop.set()
        self._thread.join()


def _wait(pred: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _completed(vmm: Vmm, what: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        info: dict[str, Any] = vmm.cmd("query-migrate")
        if info.get("status") == "failed":
            raise RuntimeError(f"{what}: migration failed: {info.get('error-desc')}\n{vmm.log_tail()}")
        return info if info.get("status") == "completed" else None

    result: dict[str, Any] = _wait(done, f"{what} to complete")
    return result


class LiveGuest:
    """One guest and the chain of VMM processes it lives in; a context manager that cleans up.

    Every process it starts is killed and reaped, and its work directory
    removed, when the ``with`` block ends, however it ends.
    """

    def __init__(
        self,
        mem: int = 1 << 30,
        hot: int = 64 << 20,
        guest: str = "auto",
        progress: Progress = _quiet,
        *,
        pin: bool = True,
        realtime: bool = True,
    ) -> None:
        self.mem, self.hot, self.guest_kind = mem, hot, guest
        self.progress = progress
        self._affinity = os.sched_getaffinity(0)
        self.vcpu_cpus = pin_vcpu() if pin else None
        self.observer_priority: int | None = OBSERVER_PRIORITY
        """SCHED_FIFO priority of the observer's sampler; None once the kernel refused it."""
        self.switchover_priority = SWITCHOVER_PRIORITY if realtime and _may_realtime(SWITCHOVER_PRIORITY) else None
        """The VMMs' ``--switchover-priority``; None with ``realtime=False`` or without CAP_SYS_NICE."""
        self._generation = 0
        self._vmms: list[Vmm] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="cprfast-demo-"))
        self.vmm: Vmm | None = None
        self.kind = ""
        self._cold: npt.NDArray[np.uint64] | None = None
        self._rings = 0
        self.baseline_ms = 0.0

    def __enter__(self) -> LiveGuest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(graceful=exc_type is None)

    def close(self, graceful: bool = True) -> None:
        """Quit the current VMM (``graceful``), kill every other, remove the work directory."""
        for vmm in reversed(self._vmms):
            if graceful and vmm is self.vmm:
                vmm.quit()
            vmm.kill()
        self._vmms.clear()
        self.vmm = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.sched_setaffinity(0, self._affinity)

    def _args(self) -> list[str]:
        pin = ["--vcpu-cpus", ",".join(map(str, self.vcpu_cpus))] if self.vcpu_cpus else []
        if self.switchover_priority is not None:
            pin += ["--switchover-priority", str(self.switchover_priority)]
        return ["-m", f"{self.mem >> 20}M", "--hot", f"{self.hot >> 20}M", "--guest", self.guest_kind, *pin]

    def observer(self, path: str) -> _core.Observer:
        """A started observer of the heartbeat in ``path`` (:func:`start_observer`)."""
        observer, realtime = start_observer(path, self.vcpu_cpus)
        if not realtime:
            self.observer_priority = None
        return observer

    def _start(self, *extra: str, pass_fds: Sequence[int] = ()) -> Vmm:
        self._generation += 1
        vmm = Vmm(self.workdir, self._generation, self._args(), *extra, pass_fds=pass_fds)
        self._vmms.append(vmm)
        return vmm

    def boot(self) -> None:
        """Start the first VMM, wait for its guest to run, ring the doorbell and seed cold memory."""
        vmm = self.vmm = self._start()
        first = vmm.guest()
        self.kind = str(first["kind"])
        _wait(lambda: vmm.guest()["heartbeat"] > first["heartbeat"], "the guest's heartbeat")
        path = vmm.ram_path()
        seed(path, self.mem, self.hot)
        self._cold = fingerprint(path, self.mem, self.hot)
        observer = self.observer(path)
        time.sleep(BASELINE_S)
        self.baseline_ms = observer.stop().max_stall_ns / 1e6
        self.progress(
            f"booted pid {vmm.pid}: {self.mem >> 20} MiB, {self.kind} guest, hot set {self.hot >> 20} MiB; "
            f"longest stall with no update over {BASELINE_S:g} s: {self.baseline_ms:.3f} ms; "
            + (f"vCPU pinned to CPU {self.vcpu_cpus}" if self.vcpu_cpus else "vCPU not pinned")
            + ("" if self.observer_priority else "; observer at normal priority (SCHED_FIFO refused)")
            + (
                f"; switchover at SCHED_FIFO {self.switchover_priority}"
                if self.switchover_priority
                else "; switchover at normal priority"
            )
        )

    def update(self, mode: str) -> StepResult:
        """Live-update the guest into a fresh process with ``mode``; returns what was observed."""
        src = self.vmm
        if src is None:
            raise RuntimeError("boot() first")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self._rings += 1
        src.cmd("x-doorbell", message=f"before {mode}")
        before = src.guest()
        src_pid, src_ram = src.pid, f"/proc/{src.pid}/fd/{before['ram']['fd']}"
        preserved = (_identity(src_pid, before["console"]["read-fd"]), _identity(src_pid, before["ram"]["fd"]))
        src.cmd("migrate-set-parameters", mode=mode)
        observer = self.observer(src_ram)
        try:
            time.sleep(0.01)
            step = getattr(self, "_" + mode.replace("-", "_"))
            dst, extra = step(src, src_ram, observer)
            time.sleep(0.02)  # the heartbeat moves on in the new process: the stall is closed
        finally:
            report = observer.stop()
        start_ns, end_ns = extra["window"]
        pause_ns = stall_overlapping(report, start_ns, end_ns)
        after = dst.guest()
        dst_ram = f"/proc/{dst.pid}/fd/{after['ram']['fd']}"
        identical = self._cold is not None and np.array_equal(fingerprint(dst_ram, self.mem, self.hot), self._cold)
        stopped_at = extra.get("heartbeat-at-stop")
        resumed_at = after["heartbeat-at-start"]
        continuous = (
            report.heartbeat_monotonic
            and (resumed_at == stopped_at if stopped_at is not None else resumed_at >= before["heartbeat"])
            and _heartbeat(dst_ram) > resumed_at
        )
        fd_same = None
        if mode in CPR_MODES:
            fd_same = preserved == (
                _identity(dst.pid, after["console"]["read-fd"]),
                _identity(dst.pid, after["ram"]["fd"]),
            )
        if dst is not src:
            src.quit()
            self._vmms.remove(src)
        self.vmm = dst
        result = StepResult(
            mode=mode,
            guest=self.kind,
            mem=self.mem,
            hot=self.hot,
            pid_before=src_pid,
            pid_after=dst.pid,
            pause_ms=pause_ns / 1e6,
            baseline_ms=self.baseline_ms,
            blind_ms=report.max_sample_gap_ns / 1e6,
            total_ms=(end_ns - start_ns) / 1e6,
            downtime_ms=extra.get("downtime"),
            bytes_moved=extra["bytes"],
            memory_identical=identical,
            heartbeat_continuous=continuous,
            devices_ok=after["doorbell"]["rings"] == self._rings,
            fd_same=fd_same,
            dirty_pages=extra.get("dirty_pages", []),
            footprint=Footprint.of(dst.pid),
        )
        self.progress(
            f"{mode}: pid {src_pid} -> {dst.pid}, pause {result.pause_ms:.3f} ms, total {result.total_ms:.0f} ms"
            + ("" if result.ok else "  CHECK FAILED")
        )
        return result

    # ------------------------------------------------------------------ one method per mode

    def _ready(self, dst: Vmm, start_ns: int) -> tuple[int, int]:
        """Wait until the new process answers QMP with its guest running; returns the update's
        window: ``(start_ns, now)``."""
        _wait(lambda: dst.cmd("query-status")["status"] == "running", "the new process to run the guest")
        return start_ns, time.monotonic_ns()

    def _cpr_transfer(self, src: Vmm, src_ram: str, observer: _core.Observer) -> tuple[Vmm, dict[str, Any]]:
        n = self._generation + 1
        cpr_path, main_path = self.workdir / f"cpr-{n}.sock", self.workdir / f"main-{n}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(cpr_path))
            listener.listen(4)
            cpr: dict[str, Any] = {
                "channel-type": "cpr",
                "addr": {"transport": "socket", "type": "fd", "str": str(listener.fileno())},
            }
            main = {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main_path)}}
            dst = self._start("-incoming", json.dumps(main), "-incoming", json.dumps(cpr), pass_fds=[listener.fileno()])
        finally:
            listener.close()
        cpr["addr"] = {"transport": "socket", "type": "unix", "path": str(cpr_path)}
        dst.wait_listening(main_path)  # as QEMU's runner waits for its target: start-up is not the update
        start = time.monotonic_ns()
        src.cmd("migrate", channels=[main, cpr])
        info = _completed(src, "cpr-transfer")
        return dst, {
            "window": self._ready(dst, start),
            "bytes": info.get("ram", {}).get("transferred", 0),
            "downtime": info.get("downtime"),
            "heartbeat-at-stop": src.guest()["heartbeat-at-stop"],
        }

    def _cpr_exec(self, src: Vmm, src_ram: str, observer: _core.Observer) -> tuple[Vmm, dict[str, Any]]:
        main = self.workdir / "exec.main"
        self._generation += 1
        argv = src.argv(self._generation, "-incoming", f"file:{main}")
        src.cmd("migrate-set-parameters", **{"cpr-exec-command": argv})
        start = time.monotonic_ns()
        with _swallow():  # the reply may be lost: the process exec's its successor
            src.cmd("migrate", uri=f"file:{main}")
        src.reconnect(self._generation)
        window = self._ready(src, start)
        if src.guest()["pid"] != src.pid:
            raise RuntimeError(f"cpr-exec: the successor does not run as pid {src.pid}")
        size = main.stat().st_size
        main.unlink()
        return src, {"window": window, "bytes": size}

    def _cpr_reboot(self, src: Vmm, src_ram: str, observer: _core.Observer) -> tuple[Vmm, dict[str, Any]]:
        save = self.workdir / "reboot.save"
        dst = self._start("-incoming", "defer")
        dst.cmd("migrate-set-parameters", mode="cpr-reboot")
        follower = _Follower(observer, src_ram, dst.ram_path())
        try:
            start = time.monotonic_ns()
            src.cmd("migrate", uri=f"file:{save}")
            info = _completed(src, "cpr-reboot save")
            dst.cmd("migrate-incoming", uri=f"file:{save}")
            _completed(dst, "cpr-reboot restore")
            window = self._ready(dst, start)
            follower.wait(TIMEOUT)
        finally:
            follower.stop()
        size = save.stat().st_blocks * 512
        save.unlink()
        stopped = src.guest()["heartbeat-at-stop"]
        return dst, {"window": window, "bytes": size, "downtime": info.get("downtime"), "heartbeat-at-stop": stopped}

    def _normal(self, src: Vmm, src_ram: str, observer: _core.Observer) -> tuple[Vmm, dict[str, Any]]:
        uri = f"unix:{self.workdir / f'migrate-{self._generation + 1}.sock'}"
        # A local socket: lift QEMU's default 128 MiB/s cap, which a 64M hot set outruns forever.
        src.cmd("migrate-set-parameters", **{"max-bandwidth": NORMAL_BANDWIDTH})
        dst = self._start("-incoming", uri)
        follower = _Follower(observer, src_ram, dst.ram_path())
        try:
            start = time.monotonic_ns()
            src.cmd("migrate", uri=uri)
            info = _completed(src, "normal migration")
            window = self._ready(dst, start)
            follower.wait(TIMEOUT)
        finally:
            follower.stop()
        return dst, {
            "window": window,
            "bytes": info["ram"]["transferred"],
            "downtime": info.get("downtime"),
            "heartbeat-at-stop": src.guest()["heartbeat-at-stop"],
            "dirty_pages": info["ram"]["x-dirty-history"],
        }


# --------------------------------------------------------------------------- the command


def start_observer(path: str, cpus: tuple[int, ...] | None = None) -> tuple[_core.Observer, bool]:
    """A started observer of the heartbeat in ``path``, sleeping between samples, at real-time
    priority where we may; returns it and whether it got that priority.

    ``cpus``: where its sampler runs. The demo puts it on the guest's own CPU: it then
    takes its few microseconds per sample from the guest, which only makes the guest
    slower, never from the VMMs doing the switchover, which would lengthen the pause
    it measures (while the guest is paused, that CPU is the observer's alone).
    """
    observer = _core.Observer(path, HEARTBEAT, interval_ns=OBSERVER_INTERVAL_NS)
    try:
        observer.start(OBSERVER_PRIORITY, cpus)
    except PermissionError:
        observer.start(None, cpus)
        return observer, False
    return observer, True


def _may_realtime(priority: int) -> bool:
    try:
        check_priority(priority)
    except PermissionError:
        return False
    return True


def pin_vcpu() -> tuple[int, ...] | None:
    """Give the guest's vCPU a CPU of its own: the last this process may use; the demo itself
    (and every thread it starts from now on) keeps to the others. None (nothing pinned)
    with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, cpus[:-1])
    return (cpus[-1],)


def run(
    mem: int = 1 << 30,
    modes: Sequence[str] = MODES,
    guest: str = "auto",
    hot: int = 64 << 20,
    progress: Progress = _quiet,
) -> list[StepResult]:
    """Boot one guest and live-update it through ``modes`` in turn, each into a fresh process."""
    with LiveGuest(mem, hot, guest, progress) as live:
        live.boot()
        return [live.update(mode) for mode in modes]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _yes(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def render(results: Sequence[StepResult]) -> str:
    """The demo's table."""
    head = ("mode", "pid", "guest pause", "total", "bytes moved", "memory identical", "same fd", "devices")
    rows = [
        (
            r.mode,
            f"{r.pid_before}->{r.pid_after}" if r.pid_before != r.pid_after else f"{r.pid_after} (same)",
            f"{r.pause_ms:.3f} ms",
            f"{r.total_ms:.0f} ms",
            _size(r.bytes_moved),
            _yes(r.memory_identical and r.heartbeat_continuous),
            _yes(r.fd_same),
            _yes(r.devices_ok),
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if results:
        r = results[0]
        lines.append(f"guest: {r.guest}, {_size(r.mem)} RAM, hot set {_size(r.hot)}")
        lines.append(
            f"noise floor: the same guest, not updated, stalled up to {r.baseline_ms:.3f} ms in {BASELINE_S:g} s"
        )
    return "\n".join(lines) + "\n"


def as_json(results: Sequence[StepResult]) -> str:
    """The results as JSON (one object per step)."""
    return json.dumps([{**asdict(r), "ok": r.ok} for r in results], indent=2)


def stderr_progress(stream: TextIO = sys.stderr) -> Progress:
    """A progress display: one timestamped line per step on ``stream``."""
    t0 = time.monotonic()

    def show(msg: str) -> None:
        stream.write(f"[{time.monotonic() - t0:6.2f}s] {msg}\n")
        stream.flush()

    return show


__all__ = ["MODES", "Footprint", "LiveGuest", "StepResult", "Vmm", "as_json", "fingerprint", "render", "run", "seed"]
