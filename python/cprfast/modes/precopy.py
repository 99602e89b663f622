"""Normal (precopy) migration: guest RAM copied while the guest runs, then a short switchover.

Source, in QEMU's order (``migration/ram.c``, ``migration.c``):

1. Dirty tracking on (uffd-wp + PAGEMAP_SCAN for guest writes from threads of
   this process, the KVM dirty log for a KVM guest), then a first pass sends
   every page (zero pages as flags, no data).
2. Iterate: sync the dirty log, measure bandwidth, and stop iterating once the
   dirty bytes fit ``bandwidth x downtime-limit`` (QEMU's ``threshold_size``;
   ``avail-switchover-bandwidth`` replaces the measured bandwidth when set).
   Otherwise send the dirty pages and go round again. A guest that dirties
   faster than we send never converges: we keep iterating (and stay
   cancellable) rather than blowing the downtime limit.
3. Stop the VM, final sync, send what is left, then the device sections
   (the source run state first), end marker, completed.

Each pass is one RAM section of the main stream (a page stream from
``_core.send_pages``, per-chunk checksums); device sections follow the last one.
``max-bandwidth`` limits the passes the guest runs through; the final pass,
inside the downtime, runs unthrottled.

The target receives into its own fresh memfd region, verifies every device
section, loads the devices and resumes if the source was running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Protocol

from cprfast import _core
from cprfast import channels as ch
from cprfast.errors import MigrationError, StreamError
from cprfast.modes import PreStopState, load_devices, write_devices
from cprfast.stream import StreamWriter, read_stream

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from cprfast.devices import DeviceRegistry
    from cprfast.migration import IncomingContext, MigrationContext, MigrationState, RamCounters
    from cprfast.status import RunState

log = logging.getLogger(__name__)

BANDWIDTH_WINDOW_S = 0.1
"""Bandwidth is re-measured over at least this much sending time (QEMU: 100 ms)."""


class RamHost(Protocol):
    """What the RAM-copying modes need from a VMM.

    Optionally also ``dirty_log(on: bool) -> tuple[int, int] | None``: switch the KVM
    dirty log of the RAM slot on or off and return ``(vm_fd, slot)`` (None: no KVM).
    With it, a KVM guest is tracked by the KVM dirty log; without it (or when it
    returns None) by kernel write tracking (uffd-wp + PAGEMAP_SCAN), which sees a
    KVM guest's writes as well: re-protecting a page makes KVM drop its mapping
    through the MMU notifier, so the guest's next write faults and is recorded.
    """

    @property
    def region(self) -> _core.Region:
        """Guest RAM."""
        ...

    @property
    def devices(self) -> DeviceRegistry:
        """The devices whose state travels on the main channel."""
        ...


# --------------------------------------------------------------------------- channels


@contextlib.contextmanager
def open_outgoing(addr: ch.MigrationAddress, register: Callable[[socket.socket], None]) -> Iterator[int]:
    """Open the main channel for writing; yields its fd. ``register`` gets sockets (cancel shuts them down)."""
    if isinstance(addr, ch.FileAddress):
        fd = ch.open_file(addr, write=True)
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
    elif isinstance(addr, ch.ExecAddress):
        with _child(addr, write=True) as pipe:
            yield pipe.fileno()
    elif isinstance(addr, ch.FdAddress) and not _is_socket(_inherited(addr)):
        fd = _inherited(addr)
        try:  # a pipe or a file: written as a stream, then closed (QEMU owns an fd: channel too)
            yield fd
        finally:
            os.close(fd)
    else:
        sock = ch.connect(addr, timeout=10.0)
        register(sock)
        with sock:
            yield sock.fileno()


@contextlib.contextmanager
def open_incoming(addr: ch.MigrationAddress) -> Iterator[int]:
    """Open the main channel for reading (listen and accept one client for sockets); yields its fd."""
    if isinstance(addr, ch.FileAddress):
        fd = ch.open_file(addr, write=False)
        try:
            yield fd
        finally:
            os.close(fd)
    elif isinstance(addr, ch.ExecAddress):
        with _child(addr, write=False) as pipe:
            yield pipe.fileno()
    elif isinstance(addr, ch.FdAddress) and not _is_listening(_inherited(addr)):
        fd = _inherited(addr)
        try:  # QEMU reads an fd: main channel directly (a connected socket or a pipe)
            yield fd
        finally:
            os.close(fd)
    else:
        with ch.listen(addr) as listener:
            sock = listener.accept()
        with sock:
            yield sock.fileno()


def _inherited(addr: ch.FdAddress) -> int:
    if isinstance(addr.fd, str):
        raise MigrationError(f"{addr.uri}: named monitor fds are not supported here; pass an fd number")
    try:
        os.fstat(addr.fd)
    except OSError as e:
        raise MigrationError(f"{addr.uri}: fd {addr.fd} is not open: {e.strerror}") from None
    return addr.fd


def _is_socket(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def _is_listening(fd: int) -> bool:
    if not _is_socket(fd):
        return False
    with socket.socket(fileno=os.dup(fd)) as sock:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


@contextlib.contextmanager
def _child(addr: ch.ExecAddress, *, write: bool) -> Iterator[IO[bytes]]:
    """``exec:CMD``: the stream goes to the command's stdin (source) or comes from its stdout (target)."""
    proc = subprocess.Popen(  # noqa: S603 - argv from the user's own exec: URI, no shell of ours
        addr.argv, stdin=subprocess.PIPE if write else None, stdout=None if write else subprocess.PIPE
    )
    pipe = proc.stdin if write else proc.stdout
    assert pipe is not None
    try:
        try:
            yield pipe
            pipe.close()
        except OSError as e:  # the pipe broke: the command is why, so name how it ended
            with contextlib.suppress(OSError):
                pipe.close()
            try:
                status = f"exited with status {proc.wait(10)}"
            except subprocess.TimeoutExpired:
                status = "did not exit"
            raise MigrationError(f"exec: {addr.uri} {status} ({e.strerror or e})") from e
        if proc.wait() != 0:
            raise MigrationError(f"exec: {addr.uri} exited with status {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pipe.close()


# --------------------------------------------------------------------------- source


class _Bandwidth:
    """Bytes per second over windows of at least :data:`BANDWIDTH_WINDOW_S` of sending."""

    def __init__(self) -> None:
        self.rate = 0.0
        self._bytes = 0
        self._seconds = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self._bytes += nbytes
        self._seconds += seconds
        if self._seconds >= BANDWIDTH_WINDOW_S or self.rate == 0.0:
            self.rate = self._bytes / max(self._seconds, 1e-6)
            self._bytes, self._seconds = 0, 0.0


class PrecopyDriver:
    """The source side of a normal migration (``MigrationState.register_mode_driver(normal, ...)``)."""

    def __init__(self, host: RamHost, migration: MigrationState) -> None:
        self.host = host
        self.before_stop = PreStopState(migration)
        self._sockets: list[socket.socket] = []

    def cancel(self, ctx: MigrationContext) -> None:
        """Unblock a pass in progress: shut the socket down (a file or exec pass ends by itself)."""
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self, ctx: MigrationContext) -> None:
        """Iterate until the dirty bytes fit the downtime, then switch over and send the rest."""
        region = self.host.region
        ram = ctx.ram
        ram.page_size = region.page_size
        ram.total = region.size
        addr = ctx.channels[ch.ChannelType.MAIN]
        with contextlib.ExitStack() as stack:
            fd = stack.enter_context(open_outgoing(addr, self._sockets.append))
            stack.callback(self._sockets.clear)
            tracker = stack.enter_context(self._tracking(region))
            writer = StreamWriter(fd)
            ctx.activate()
            self._precopy(ctx, tracker, writer)

    @contextlib.contextmanager
    def _tracking(self, region: _core.Region) -> Iterator[_core.Tracker]:
        dirty_log: Callable[[bool], tuple[int, int] | None] | None = getattr(self.host, "dirty_log", None)
        kvm = dirty_log(True) if dirty_log is not None else None
        try:
            tracker = _core.Tracker(region, kernel=kvm is None, kvm=kvm)
            with tracker:
                yield tracker
        finally:
            if dirty_log is not None and kvm is not None:
                dirty_log(False)

    def _send(
        self, ctx: MigrationContext, writer: StreamWriter, dirty: npt.NDArray[np.uint64] | None, bandwidth: int
    ) -> _core.StreamStats:
        region = self.host.region
        stats: list[_core.StreamStats] = []

        def send(fd: int) -> int:
            stats.append(_core.send_pages(region, fd, dirty=dirty, bandwidth=bandwidth))
            return stats[0].bytes

        writer.ram(region.name, send)
        st = stats[0]
        ram = ctx.ram
        ram.transferred = writer.bytes
        ram.duplicate += st.zero_pages
        ram.normal += st.pages - st.zero_pages
        ram.normal_bytes = ram.normal * ram.page_size
        ram.pages_per_second = int(st.pages / st.seconds) if st.seconds > 0 else 0
        ram.mbps = st.bytes * 8 / 1e6 / st.seconds if st.seconds > 0 else 0.0
        return st

    def _precopy(self, ctx: MigrationContext, tracker: _core.Tracker, writer: StreamWriter) -> None:
        ram = ctx.ram
        params = ctx.params
        bw = _Bandwidth()
        st = self._send(ctx, writer, None, params.int("max-bandwidth"))
        bw.add(st.bytes, st.seconds)
        ram.precopy_bytes = writer.bytes
        last_sync = time.monotonic()
        while True:
            ctx.check_cancelled()
            dirty = tracker.sync()
            now = time.monotonic()
            ram.dirty_sync_count += 1
            ram.dirty_history.append(dirty.count)
            ram.dirty_pages_rate = int(dirty.count / max(now - last_sync, 1e-6))
            last_sync = now
            pending = dirty.count * ram.page_size
            ram.remaining = pending
            switchover_bw = params.int("avail-switchover-bandwidth") or bw.rate
            per_ms = switchover_bw / 1000.0
            threshold = per_ms * params.int("downtime-limit")
            if per_ms > 0:
                ctx.set_expected_downtime(int(pending / per_ms))
            if pending <= threshold:
                break
            st = self._send(ctx, writer, dirty.words, params.int("max-bandwidth"))
            bw.add(st.bytes, st.seconds)
            ram.precopy_bytes = writer.bytes
        log.info("precopy converged after %d syncs: %d bytes left, threshold %d", ram.dirty_sync_count, pending,
                 int(threshold))
        ctx.switchover()
        final = tracker.sync()
        ram.dirty_sync_count += 1
        ram.dirty_history.append(final.count)
        before = writer.bytes
        self._send(ctx, writer, dirty.words | final.words, 0)
        write_devices(writer, self.host.devices, self.before_stop.value)
        ctx.commit()  # the whole stream is out: the target may run the guest now, a cancel is too late
        ram.downtime_bytes = writer.bytes - before
        ram.transferred = writer.bytes
        ram.remaining = 0


# --------------------------------------------------------------------------- target


class PrecopyIncoming:
    """The target side: receive every RAM pass into the host's region, then the devices."""

    def __init__(self, host: RamHost) -> None:
        self.host = host

    def run(self, ctx: IncomingContext) -> RunState:
        """Load the whole stream; returns the source's run state."""
        from cprfast.status import RunState

        region = self.host.region
        ram = ctx.ram
        ram.page_size = region.page_size
        ram.total = region.size
        with open_incoming(ctx.address) as fd:
            ctx.activate()
            sections = read_stream(fd, lambda name, f: _receive(region, name, f, ram))
        return RunState(load_devices(sections, self.host.devices))


def _receive(region: _core.Region, name: str, fd: int, ram: RamCounters) -> None:
    if name != region.name:
        raise StreamError(f"main stream carries RAM {name!r}, this VMM has only {region.name!r}")
    st = _core.recv_pages(region, fd)
    ram.transferred += st.bytes
    ram.duplicate += st.zero_pages
    ram.normal += st.pages - st.zero_pages
    ram.normal_bytes = ram.normal * ram.page_size


def register(migration: MigrationState, host: RamHost) -> None:
    """Register the normal-mode drivers, outgoing and incoming, on ``migration``."""
    from cprfast.status import MigMode

    migration.register_mode_driver(MigMode.NORMAL, PrecopyDriver(host, migration))
    migration.register_incoming_driver(MigMode.NORMAL, PrecopyIncoming(host))
