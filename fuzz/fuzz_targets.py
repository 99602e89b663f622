"""Fuzz targets: every parser that reads bytes from outside, fed arbitrary bytes.

Each target turns one input (bytes) into a call of a real parser over a real fd
(a socketpair, a pipe or a memfd) and checks what must hold whatever the input:

- only the error types the parser documents may escape (anything else is a bug);
- no fd is leaked, on success or on error (``/proc/self/fd`` before and after);
- for the page stream and mapped-ram loads, nothing outside the receiving
  region changes (guards mapped right below and above it keep their sentinel).

Checksums guard every frame and table, so mutated bytes would rarely get past
them; an input flag has the harness recompute them (:func:`reseal_stream`,
:func:`reseal_mapped`), so the fuzzer also reaches the checks behind.

The same targets serve the atheris driver (``fuzz/run.py``) and the corpus
replay in ``tests/test_fuzz.py``; the corpus lives in ``fuzz/corpus/<target>/``.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from cprfast import _core, channels, cpr_state, qmp, stream
from cprfast.migration import MigrationState
from cprfast.status import RunState
from cprfast.errors import (
    FdPassingError,
    MigrationError,
    PeerClosedError,
    StreamError,
)

MAX_INPUT = 1 << 16
"""Inputs are cut to this size: a socket or pipe buffer takes them without a reader."""


@dataclass(frozen=True)
class Target:
    """One parser under fuzzing and the errors it documents."""

    name: str
    parse: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]

    def __call__(self, data: bytes) -> None:
        """Run one input; raise only for a finding (an undocumented error or a leak)."""
        before = _open_fds()
        try:
            self.parse(data[:MAX_INPUT])
        except self.allowed:
            pass
        leaked = _open_fds() - before
        if leaked:
            raise AssertionError(f"{self.name}: fds leaked: {sorted(leaked)}")


def _open_fds() -> set[int]:
    """The fds open now (the one ``listdir`` used for the listing is closed again by then)."""
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def _memfd_with(data: bytes) -> int:
    """A CLOEXEC memfd holding ``data``, positioned at 0 (a file channel's reader sees the same)."""
    fd = os.memfd_create("fuzz-input", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# ------------------------------------------------------------------ cpr stream


def _fd_count(data: bytes) -> tuple[int, bytes]:
    """The first input byte says how many fds ride along (0..7); the rest is the stream."""
    return (data[0] & 7, data[1:]) if data else (0, b"")


def _cpr_inline(data: bytes) -> None:
    """cpr-transfer: the stream and its fds arrive on a UNIX socket, as from a source VMM."""
    nfds, payload = _fd_count(data)
    tx, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    carried = [os.memfd_create("fuzz-fd", os.MFD_CLOEXEC) for _ in range(nfds)]
    try:
        if payload:
            # Half the fds come with the first byte and half with the rest, so
            # the reader's fd queue is filled by more than one recvmsg.
            half = len(carried) // 2
            _core.sendmsg_fds(tx.fileno(), payload[:1], carried[:half])
            if len(payload) > 1:
                _core.sendmsg_fds(tx.fileno(), payload[1:], carried[half:])
        tx.shutdown(socket.SHUT_WR)
        cpr_state.receive_state(rx, timeout=5).close()
    finally:
        for fd in carried:
            os.close(fd)
        tx.close()
        rx.close()


def _cpr_numbers(data: bytes) -> None:
    """cpr-exec: the stream names fds by number; a few are open at low numbers to be found."""
    nfds, payload = _fd_count(data)
    opened = [os.memfd_create("fuzz-fd", os.MFD_CLOEXEC) for _ in range(nfds)]
    before = _open_fds()
    try:
        state = cpr_state.decode(cpr_state.StreamReader(payload, inline_fds=False))
    finally:
        for fd in opened:
            os.close(fd)
    # The decoder adopts fds that were open before (the harness's, or even
    # stdin): a real successor inherited them for this. Close only the fds the
    # decoder itself made, and let the state forget the adopted ones unclosed.
    for _, _, fd in state.entries():
        if fd not in before:
            os.close(fd)
    state._fds.clear()


# ----------------------------------------------------------------- main stream


def _main_stream(data: bytes) -> None:
    """The main stream as read from a file channel (RAM sections carry no pages here)."""
    fd = _memfd_with(data)
    try:
        stream.read_stream(fd, lambda name, fd: None)
    finally:
        os.close(fd)


# ------------------------------------------------------------------- channels


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _channels_uri(data: bytes) -> None:
    """A migration URI, as given to ``migrate`` or ``-incoming``; it must parse back to itself."""
    addr = channels.parse_uri(_text(data))
    if not isinstance(addr, channels.ExecAddress | channels.FileAddress):
        assert channels.parse_uri(addr.uri) == addr, (data, addr)


def _channels_incoming(data: bytes) -> None:
    """An ``-incoming`` value: defer, a URI, JSON or keyval."""
    channels.parse_incoming(_text(data))


def _channels_json(data: bytes) -> None:
    """A QMP ``channels`` argument: any JSON value, as a client may send one."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return  # not JSON: the QMP layer refuses it before channels see it
    channels.parse_channels(obj)


# --------------------------------------------------------------- fd bundles


def _scm_bundle(data: bytes) -> None:
    """An SCM_RIGHTS fd bundle header and body from a peer, some fds attached (Rust scm.rs)."""
    nfds, payload = _fd_count(data)
    tx, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    carried = [os.memfd_create("fuzz-fd", os.MFD_CLOEXEC) for _ in range(nfds)]
    try:
        if payload:
            # The fds ride on the byte after the 24-byte header, where a batch marker goes.
            split = min(len(payload) - 1, 24)
            if split:
                _core.sendmsg_fds(tx.fileno(), payload[:split], [])
            _core.sendmsg_fds(tx.fileno(), payload[split:], carried)
        tx.shutdown(socket.SHUT_WR)
        _, fds = _core.recv_fds(rx.fileno(), max_fds=64, max_data=MAX_INPUT, timeout=5)
        for fd in fds:
            os.close(fd)
    finally:
        for fd in carried:
            os.close(fd)
        tx.close()
        rx.close()


# ----------------------------------------------------- page stream, mapped-ram

PAGE = 4096
GUARD = 4 * PAGE
SENTINEL = bytes(range(256)) * (GUARD // 256)
REGION_PAGES = 8
"""The receiving region: small, so a whole seed stream or save fits in one input."""
FLAG_RESEAL = 1
"""Input flag (first byte): recompute every checksum, so mutations reach the checks behind them."""
FLAG_TWO_CHANNELS = 2
"""Page stream: the input is two channels' streams (a u16 LE after the flags says where to cut)."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_PRIVATE_ANON = 0x22
_MAP_FIXED_NOREPLACE = 0x100000


def _map_at(addr: int, size: int) -> bool:
    """Map anonymous read-write memory at exactly ``addr``; False if something is already there."""
    got = _libc.mmap(addr, size, 3, _MAP_PRIVATE_ANON | _MAP_FIXED_NOREPLACE, -1, 0)
    if got == addr:
        return True
    if got not in (None, ctypes.c_void_p(-1).value):
        _libc.munmap(got, size)  # an old kernel took the address as a hint only
    return False


class GuardedRegion:
    """A guest-RAM region with sentinel-filled guards mapped right below and above it.

    The kernel places the region where it likes, so a hole of its size is made between
    two guards (map the three, unmap the middle) and regions are created until one
    lands in it; the ones that land elsewhere fill the higher holes meanwhile. A write
    outside the region that stays within a guard's reach changes a sentinel
    (:meth:`check`); one that goes further faults, which the fuzzer reports as a crash.
    """

    def __init__(self, pages: int) -> None:
        size = pages * PAGE
        misses: list[_core.Region] = []
        try:
            for _ in range(64):
                base = _libc.mmap(None, size + 2 * GUARD, 3, _MAP_PRIVATE_ANON, -1, 0)
                if base in (None, ctypes.c_void_p(-1).value):
                    raise OSError(ctypes.get_errno(), "mmap of the guards failed")
                _libc.munmap(base + GUARD, size)
                region = _core.Region.create("fuzz-ram", size)
                if region.address == base + GUARD:
                    break
                misses.append(region)
                _libc.munmap(base, GUARD)
                _libc.munmap(base + GUARD + size, GUARD)
            else:
                raise RuntimeError("could not place the region between guards")
        finally:
            for r in misses:
                r.close()
        self.region = region
        self._guards = (base, base + GUARD + size)
        for g in self._guards:
            ctypes.memmove(g, SENTINEL, GUARD)

    def check(self, target: str) -> None:
        """Raise if either guard changed."""
        for g, where in zip(self._guards, ("below", "above"), strict=True):
            if ctypes.string_at(g, GUARD) != SENTINEL:
                raise AssertionError(f"{target}: the guard {where} the region was written")


_GUARDED = GuardedRegion(REGION_PAGES)
"""The region both targets receive into, made once (its fd stays open, so it is made before any input)."""


def reseal_stream(stream: bytearray) -> None:
    """Give every frame of a page stream the checksum its contents hash to."""
    pos = 0
    while pos + 88 <= len(stream):
        kind, data_pages = int.from_bytes(stream[pos + 4 : pos + 8], "little"), int.from_bytes(
            stream[pos + 20 : pos + 24], "little"
        )
        end = pos + 88 + (data_pages * PAGE if kind == 2 else 0)
        if end + 8 > len(stream):
            return
        stream[end : end + 8] = _core.checksum(bytes(stream[pos:end])).to_bytes(8, "little")
        pos = end + 8


def _pagestream(data: bytes) -> None:
    """Page-stream frames from a sender, on one or two channels (pipes fed from memfds)."""
    flags, payload = (data[0], data[1:]) if data else (0, b"")
    streams = [payload]
    if flags & FLAG_TWO_CHANNELS and len(payload) >= 2:
        cut = int.from_bytes(payload[:2], "little")
        streams = [payload[2 : 2 + cut], payload[2 + cut :]]
    if flags & FLAG_RESEAL:
        sealed = [bytearray(s) for s in streams]
        for s in sealed:
            reseal_stream(s)
        streams = [bytes(s) for s in sealed]
    fds = [_memfd_with(s) for s in streams]
    try:
        _core.recv_pages(_GUARDED.region, fds[0], channels=fds[1:])
    finally:
        for fd in fds:
            os.close(fd)
        _GUARDED.check("pagestream")


MAPPED_BITMAP, MAPPED_SUMS, MAPPED_DATA = PAGE, 2 * PAGE, 3 * PAGE
"""Where a save of the fuzz region keeps its tables and its pages (a page per table suffices)."""


def reseal_mapped(save: bytearray) -> None:
    """Give a mapped-ram save of the fuzz region the page, table and header checksums its bytes hash to."""
    if len(save) < MAPPED_DATA:
        return
    bitmap = int.from_bytes(save[MAPPED_BITMAP : MAPPED_BITMAP + 8], "little")
    for page in range(REGION_PAGES):
        at = MAPPED_DATA + page * PAGE
        if bitmap >> page & 1 and at + PAGE <= len(save):
            save[MAPPED_SUMS + 8 * page : MAPPED_SUMS + 8 * page + 8] = _core.checksum(
                bytes(save[at : at + PAGE])
            ).to_bytes(8, "little")
    tables = bytes(save[MAPPED_BITMAP : MAPPED_BITMAP + 8] + save[MAPPED_SUMS : MAPPED_SUMS + 8 * REGION_PAGES])
    save[48:56] = _core.checksum(tables).to_bytes(8, "little")
    save[56:64] = _core.checksum(bytes(save[:56])).to_bytes(8, "little")


def _mapped_ram(data: bytes) -> None:
    """A mapped-ram save file (cpr-reboot, file: migration) made of the input, loaded by 1-4 threads."""
    flags, payload = (data[0], data[1:]) if data else (0, b"")
    if flags & FLAG_RESEAL:
        save = bytearray(payload)
        reseal_mapped(save)
        payload = bytes(save)
    fd = _memfd_with(payload)
    try:
        _core.load_mapped(_GUARDED.region, fd, 0, threads=1 + (flags >> 1 & 3))
    finally:
        os.close(fd)
        _GUARDED.check("mapped_ram")


# ------------------------------------------------------------------------ QMP


class _Vcpus:
    """VmHooks of a VMM with nothing to stop."""

    def vm_stop(self, state: RunState) -> None:
        pass

    def vm_start(self, state: RunState) -> None:
        pass


_QMP_LOOP = asyncio.new_event_loop()
_QMP_UNSAFE = ("migrate", "migrate-incoming", "quit")
"""Commands left out: they open channels named by the input (``exec:`` runs a shell) or
stop the server; their arguments are channel addresses, fuzzed by the channels targets."""


def _qmp(data: bytes) -> None:
    """Raw bytes from a QMP client: split into JSON texts, each parsed and dispatched.

    Every text must get a reply that can be sent (no exception at all escapes).
    """
    server = qmp.QMPServer(MigrationState(_Vcpus()), "/nonexistent/qmp.sock")
    for name in _QMP_UNSAFE:
        del server._commands[name]
    session = qmp._Session(server, writer=None)  # type: ignore[arg-type]  # _handle never writes

    async def run() -> None:
        for text in qmp._JsonSplitter().feed(data):
            json.dumps(await session._handle(text))

    _QMP_LOOP.run_until_complete(run())


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpr_inline", _cpr_inline, (StreamError,)),
        Target("cpr_numbers", _cpr_numbers, (StreamError,)),
        Target("main_stream", _main_stream, (StreamError,)),
        Target("channels_uri", _channels_uri, (MigrationError,)),
        Target("channels_incoming", _channels_incoming, (MigrationError,)),
        Target("channels_json", _channels_json, (MigrationError,)),
        # Truncated: more fds than declared in one message; PeerClosed: a short bundle.
        Target("scm_bundle", _scm_bundle, (StreamError, PeerClosedError, FdPassingError)),
        Target("qmp", _qmp, ()),
        Target("pagestream", _pagestream, (StreamError,)),
        Target("mapped_ram", _mapped_ram, (StreamError,)),
    )
}
"""Every fuzz target by name."""
