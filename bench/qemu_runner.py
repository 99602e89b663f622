"""QEMU 10 side by side: run QEMU's own cpr-transfer and normal migration on our tiny guest.

The guest (bench/qemu/guest.S, loaded with ``-bios``) keeps the heartbeat of
rust/core/src/layout.rs in a ``memory-backend-memfd``; the same
:class:`cprfast._core.Observer` that measures cprfast's modes maps that memfd
through ``/proc/PID/fd/N`` and reports the longest heartbeat stall, the guest
pause. QEMU is started and driven as its docs and qtest do
(``tests/qtest/migration/cpr-tests.c``): the source with ``aux-ram-share=on``
and a shared memfd backend, the target with a main channel plus a cpr channel
(a UNIX path: QEMU 10.0 takes no pre-listened fd for it, so we wait until it
listens), ``mode=cpr-transfer`` set on the source only, and ``migrate`` given
both channels. QMP is spoken by the QEMU project's own client
(``qemu.qmp``).

On a host whose KVM cannot run a real-mode/protected-mode guest (the nested
kvm_pvm machines we develop on run only 64-bit PVM guests), :func:`pick_accel`
falls back to TCG and says so; results record the accelerator used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from qemu.qmp.legacy import QEMUMonitorProtocol

from cprfast._core import Observer
from cprfast.demo import pin_vcpu, stall_overlapping, start_observer

log = logging.getLogger(__name__)

HEARTBEAT = 0x1000  # rust/core/src/layout.rs
PARAMS = 0x2000  # hot start, hot len, RAM size (u64 each)
HOT_START = 0x10_0000
GUEST_SOURCE = Path(__file__).parent / "qemu" / "guest.S"
RAM_BACKEND_ID = "ram0"
RAM_MEMFD_NAME = "memfd:memory-backend-memfd"
"""How /proc/PID/fd shows QEMU's memfd backend (its memfd is named after the QOM type, not the id)."""
QEMU_BINARY = "qemu-system-x86_64"
FOLLOW_POLL_S = 0.0001
RESULTS_DIR = Path(__file__).parent / "results"

Mode = Literal["cpr-transfer", "normal"]
_FAILED = {"failed", "cancelled"}


def qemu_version(binary: str = QEMU_BINARY) -> str | None:
    """The ``major.minor.micro`` of the installed QEMU, or None when it is not installed."""
    path = shutil.which(binary)
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\d+\.\d+\.\d+)", out)
    return match.group(1) if match else None


def qemu10_missing() -> str | None:
    """Why the QEMU scenarios cannot run here (a skip reason), or None when QEMU 10.x is installed."""
    version = qemu_version()
    if version is None:
        return f"{QEMU_BINARY} is not installed (run `make bench-qemu` to install QEMU 10 from bookworm-backports)"
    if not version.startswith("10."):
        return f"{QEMU_BINARY} is version {version}, not 10.x (run `make bench-qemu`)"
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        return "building the tiny QEMU guest needs `as` and `objcopy` (binutils)"
    return None


def build_guest(directory: Path) -> Path:
    """Assemble bench/qemu/guest.S into the 64 KiB firmware image QEMU loads with ``-bios``."""
    obj, image = directory / "guest.o", directory / "guest.bin"
    subprocess.run(["as", "--32", "-o", str(obj), str(GUEST_SOURCE)], check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(image)], check=True, capture_output=True)
    if image.stat().st_size != 0x10000:
        raise RuntimeError(f"guest image is {image.stat().st_size} bytes, expected 64 KiB")
    return image


def machine_args(image: Path, ram: int, accel: str) -> list[str]:
    """The QEMU command line both sides share: a memfd backend that cpr-transfer can hand over."""
    mib = ram >> 20
    return [
        shutil.which(QEMU_BINARY) or QEMU_BINARY,
        "-machine", f"pc,aux-ram-share=on,memory-backend={RAM_BACKEND_ID}",
        "-accel", accel,
        "-m", f"{mib}M",
        "-object", f"memory-backend-memfd,id={RAM_BACKEND_ID},size={mib}M,share=on",
        "-nodefaults", "-display", "none", "-bios", str(image),
    ]  # fmt: skip


def find_ram_memfd(pid: int, size: int) -> str:
    """``/proc/PID/fd/N`` of the guest-RAM memfd of QEMU process ``pid`` (by name and size)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if RAM_MEMFD_NAME in os.readlink(entry) and os.stat(entry).st_size == size:
                return str(entry)
    raise RuntimeError(f"QEMU {pid} has no {RAM_MEMFD_NAME} of {size} bytes")


def read_u64(fd: int, offset: int) -> int:
    """A little-endian u64 of guest RAM read through the memfd."""
    value: int = struct.unpack("<Q", os.pread(fd, 8, offset))[0]
    return value


@dataclass
class Qemu:
    """One QEMU process and its QMP connection."""

    proc: subprocess.Popen[bytes]
    qmp_path: str
    qmp: QEMUMonitorProtocol | None = None
    stderr: Path | None = None

    def connect(self, timeout: float = 30.0) -> QEMUMonitorProtocol:
        """Connect QMP once QEMU listens (a cpr-transfer target only after its cpr state loaded)."""
        wait_listening(self, self.qmp_path, timeout)
        self.qmp = QEMUMonitorProtocol(self.qmp_path)
        self.qmp.connect()
        return self.qmp

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a QMP command; a QMP error is a RuntimeError with QEMU's text."""
        assert self.qmp is not None, "connect() first"
        reply = self.qmp.cmd_raw(name, args or None)
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']['desc']}")
        return reply["return"]

    def errors(self) -> str:
        """QEMU's stderr so far, for error messages."""
        return self.stderr.read_text(errors="replace").strip() if self.stderr and self.stderr.exists() else ""

    def close(self) -> None:
        """Quit QEMU (QMP ``quit``, then SIGKILL if it lingers) and close the connection."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):  # QEMU may hang up before it answers
                self.qmp.cmd_raw("quit")
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def close_thread_loop() -> None:
    """qemu.qmp's sync client runs on this thread's event loop and never closes it: close it here."""
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = policy.get_event_loop()
        except RuntimeError:
            return
    if not loop.is_running():
        loop.close()
        policy.set_event_loop(None)



def spawn(args: Sequence[str], workdir: Path, name: str, *, pass_fds: Sequence[int] = ()) -> Qemu:
    """Start QEMU with a QMP server socket named ``name`` in ``workdir``."""
    qmp_path = str(workdir / f"{name}.qmp")
    stderr = workdir / f"{name}.stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [*args, "-qmp", f"unix:{qmp_path},server=on,wait=off"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            pass_fds=pass_fds,
        )
    return Qemu(proc, qmp_path, stderr=stderr)


def start_source(
    image: Path, ram: int, accel: str, hot_len: int, workdir: Path, *, timeout: float = 30.0
) -> tuple[Qemu, str]:
    """A running source guest with its parameters set; returns it and its RAM memfd path."""
    src = spawn([*machine_args(image, ram, accel), "-S"], workdir, "src")
    try:
        src.connect()
        memfd = find_ram_memfd(src.proc.pid, ram)
        fd = os.open(memfd, os.O_RDWR)
        try:
            os.pwrite(fd, struct.pack("<QQQ", HOT_START, hot_len, ram), PARAMS)
            src.cmd("cont")
            wait_beats(fd, 1000, timeout)
        finally:
            os.close(fd)
    except BaseException:
        src.close()
        raise
    return src, memfd


def wait_listening(vm: Qemu, path: str, timeout: float = 30.0) -> None:
    """Wait until ``vm`` listens on the UNIX socket ``path`` (seen in /proc/net/unix, not by connecting:
    a cpr-transfer target accepts exactly one client)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
                return
        if vm.proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with {vm.proc.returncode}: {vm.errors()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU does not listen on {path}")
        time.sleep(0.002)


def wait_beats(fd: int, beats: int, timeout: float = 30.0) -> None:
    """Wait until the guest has counted ``beats`` more heartbeats (it runs)."""
    start = read_u64(fd, HEARTBEAT)
    deadline = time.monotonic() + timeout
    while read_u64(fd, HEARTBEAT) - start < beats:
        if time.monotonic() > deadline:
            raise TimeoutError("the QEMU guest's heartbeat does not move")
        time.sleep(0.001)


def pick_accel(image: Path, workdir: Path) -> tuple[str, str]:
    """``kvm`` if QEMU's KVM runs our guest here, else ``tcg``; with a note saying why."""
    if forced := os.environ.get("CPRFAST_QEMU_ACCEL"):
        return forced, f"forced by CPRFAST_QEMU_ACCEL={forced}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    ram = 64 << 20
    try:
        src, _ = start_source(image, ram, "kvm", 0, workdir, timeout=3.0)
    except (RuntimeError, TimeoutError) as e:
        note = str(e).splitlines()[0] if str(e) else type(e).__name__
        return "tcg", f"QEMU with -accel kvm does not run the guest on this host ({note}); using TCG"
    src.close()
    close_thread_loop()
    return "kvm", "KVM runs the guest"


@dataclass
class Run:
    """One migration: the pause the observer saw and QEMU's own figures.

    For a normal migration ``pause_ms`` may be a stall during precopy (QEMU's
    dirty-bitmap syncs), not the switch-over: both are pauses the guest feels.
    The TCG vCPU is a normal thread on a shared host, so it also stalls when
    the host does not run it; ``baseline_stall_ms`` shows how much.
    """

    pause_ms: float
    """The longest heartbeat stall overlapping the migration (from ``migrate`` to the guest running on the target)."""
    baseline_stall_ms: float
    """The longest stall in the time before ``migrate`` (at least 0.3 s): what this host's scheduling
    alone costs the guest."""
    max_stall_ms: float
    """The longest stall of the whole run, migration or not."""
    wall_ms: float
    """From ``migrate`` to the guest running on the target."""
    qemu_total_ms: float | None
    qemu_downtime_ms: float | None
    transferred_bytes: int | None
    observer_max_sample_gap_ms: float
    """The longest the observer itself went without a sample (descheduled): the noise floor of ``pause_ms``."""
    observer_realtime: bool
    """Whether the observer's thread ran at SCHED_FIFO (see :func:`start_observer`)."""


def _wait_status(vm: Qemu, done: set[str], timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = vm.cmd("query-migrate")
        status = info.get("status", "none")
        if status in done:
            return info
        if status in _FAILED:
            raise RuntimeError(f"QEMU migration {status}: {info.get('error-desc', '')} {vm.errors()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU migration still {status} after {timeout} s")
        time.sleep(0.001)


def _wait_running(vm: Qemu, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not vm.cmd("query-status")["running"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the target did not start running: {vm.errors()}")
        time.sleep(0.001)


def pin_vcpus(vm: Qemu, cpus: tuple[int, ...] | None) -> None:
    """Move ``vm``'s vCPU threads to ``cpus`` (libvirt's vcpupin), as the reference VMM's
    ``--vcpu-cpus`` places its own; its other threads keep the runner's CPUs."""
    if cpus is None:
        return
    for cpu in vm.cmd("query-cpus-fast"):
        os.sched_setaffinity(cpu["thread-id"], cpus)


def run_once(mode: Mode, image: Path, ram: int, hot_len: int, accel: str, settle: float = 0.3) -> Run:
    """Start a source guest, migrate it to a new QEMU in ``mode``, measure, and shut both down."""
    affinity = os.sched_getaffinity(0)
    vcpus = pin_vcpu()  # QEMU's emulator threads inherit the other CPUs; its vCPUs move to these
    with tempfile.TemporaryDirectory(prefix="cprfast-qemu-") as tmp:
        workdir = Path(tmp)
        main_sock = str(workdir / "main.sock")
        src: Qemu | None = None
        dst: Qemu | None = None
        observer: Observer | None = None
        try:
            src, src_memfd = start_source(image, ram, accel, hot_len, workdir)
            pin_vcpus(src, vcpus)
            observer, realtime = start_observer(src_memfd, vcpus)
            time.sleep(settle)
            if mode == "cpr-transfer":
                cpr_path = str(workdir / "cpr.sock")
                dst = spawn(
                    [
                        *machine_args(image, ram, accel),
                        "-incoming", f"unix:{main_sock}",
                        "-incoming", f"cpr,addr.transport=socket,addr.type=unix,addr.path={cpr_path}",
                    ],
                    workdir, "dst",
                )  # fmt: skip
                wait_listening(dst, cpr_path)
                src.cmd("migrate-set-parameters", mode="cpr-transfer")
                baseline = observer.snapshot().max_stall_ns
                t0 = time.monotonic_ns()
                src.cmd(
                    "migrate",
                    channels=[
                        {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main_sock}},
                        {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr_path}},
                    ],
                )
                dst.connect()  # its monitor comes up after it loaded the cpr state
                pin_vcpus(dst, vcpus)
                info = _wait_status(src, {"completed"})
                _wait_running(dst)
                t1 = time.monotonic_ns()
            else:
                dst = spawn([*machine_args(image, ram, accel), "-incoming", f"unix:{main_sock}"], workdir, "dst")
                dst.connect()  # QEMU listens on the main channel before its monitor runs
                pin_vcpus(dst, vcpus)
                dst_memfd = find_ram_memfd(dst.proc.pid, ram)
                dst_fd = os.open(dst_memfd, os.O_RDONLY)
                src_fd = os.open(src_memfd, os.O_RDONLY)
                try:
                    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})  # no artificial 128 MiB/s cap
                    baseline = observer.snapshot().max_stall_ns
                    t0 = time.monotonic_ns()
                    src.cmd("migrate", uri=f"unix:{main_sock}")
                    _follow_to_target(src, src_fd, dst_fd, observer, dst_memfd)
                finally:
                    os.close(dst_fd)
                    os.close(src_fd)
                info = _wait_status(src, {"completed"})
                _wait_running(dst)
                t1 = time.monotonic_ns()
            time.sleep(settle)
            fd = os.open(observer.target, os.O_RDONLY)  # the guest must run on after the migration
            try:
                wait_beats(fd, 1000)
            finally:
                os.close(fd)
            report = observer.stop()
        finally:
            if observer is not None and observer.running:
                observer.stop()
            if dst is not None:
                dst.close()
            if src is not None:
                src.close()
            close_thread_loop()
            os.sched_setaffinity(0, affinity)
        ram_info = info.get("ram", {})
        return Run(
            pause_ms=stall_overlapping(report, t0, t1) / 1e6,
            baseline_stall_ms=baseline / 1e6,
            max_stall_ms=report.max_stall_ns / 1e6,
            wall_ms=(t1 - t0) / 1e6,
            qemu_total_ms=info.get("total-time"),
            qemu_downtime_ms=info.get("downtime"),
            transferred_bytes=ram_info.get("transferred"),
            observer_max_sample_gap_ms=report.max_sample_gap_ns / 1e6,
            observer_realtime=realtime,
        )


def _follow_to_target(src: Qemu, src_fd: int, dst_fd: int, observer: Observer, dst_memfd: str) -> None:
    """Retarget the observer from the source's RAM to the target's once the guest runs there.

    The target's heartbeat page is rewritten by every precopy pass, so the
    observer must not look at it before the switch-over. Reading the target's
    heartbeat first and the source's second, the target can only be ahead while
    the guest runs on the target (precopy copies values the source already
    had). The first change the observer sees after the retarget then ends the
    pause; our polling latency (about 0.1 ms: we sleep between reads so as
    not to take a CPU from QEMU) is added to it.
    """
    deadline = time.monotonic() + 300
    next_check = time.monotonic() + 0.5
    while read_u64(dst_fd, HEARTBEAT) <= read_u64(src_fd, HEARTBEAT):
        if (now := time.monotonic()) > next_check:  # a failed migration never gets there
            _wait_status(src, {"setup", "active", "device", "completed"}, timeout=1)
            if now > deadline:
                raise TimeoutError("the guest never ran on the target")
            next_check = now + 0.5
        time.sleep(FOLLOW_POLL_S)
    observer.retarget(dst_memfd)


@dataclass
class Scenario:
    """The medians of several runs of one mode at one RAM size, as written to JSON."""

    mode: Mode
    ram_bytes: int
    hot_bytes: int
    runs: list[Run]
    accel: str
    accel_note: str
    qemu_version: str
    pause_ms_median: float = field(init=False)
    baseline_stall_ms_median: float = field(init=False)
    wall_ms_median: float = field(init=False)
    qemu_total_ms_median: float | None = field(init=False)
    qemu_downtime_ms_median: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.pause_ms_median = statistics.median(r.pause_ms for r in self.runs)
        self.baseline_stall_ms_median = statistics.median(r.baseline_stall_ms for r in self.runs)
        self.wall_ms_median = statistics.median(r.wall_ms for r in self.runs)
        totals = [r.qemu_total_ms for r in self.runs if r.qemu_total_ms is not None]
        downs = [r.qemu_downtime_ms for r in self.runs if r.qemu_downtime_ms is not None]
        self.qemu_total_ms_median = statistics.median(totals) if totals else None
        self.qemu_downtime_ms_median = statistics.median(downs) if downs else None


def run_scenario(mode: Mode, ram: int, hot_len: int, repeats: int, image: Path, accel: str, note: str) -> Scenario:
    """``repeats`` runs of one mode at one RAM size."""
    runs = [run_once(mode, image, ram, hot_len, accel) for _ in range(repeats)]
    return Scenario(mode, ram, hot_len, runs, accel, note, qemu_version() or "?")


def write_result(scenario: Scenario, directory: Path = RESULTS_DIR) -> Path:
    """Write ``qemu-<mode>-<size>.json`` in ``directory`` (replacing an older run); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "produced": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{os.uname().nodename} ({os.cpu_count()} CPUs, Linux {os.uname().release})",
        **asdict(scenario),
    }
    path = directory / f"qemu-{scenario.mode}-{scenario.ram_bytes >> 20}M.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


@contextlib.contextmanager
def guest_image() -> Iterator[Path]:
    """The assembled guest in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="cprfast-qemu-guest-") as tmp:
        yield build_guest(Path(tmp))
