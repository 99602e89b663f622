"""Absurd inputs: a length of 4 GiB in every length field, a million fds, impossible region sizes.

Each must give a clear error of the documented type, without allocating what
the input claims (VmRSS does not jump) and without leaking an fd.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cprfast import _core, cpr_state, stream
from cprfast.errors import PeerClosedError, StreamError

GIB4 = 0xFFFF_FFFF
RSS_SLACK = 64 << 20
"""More RSS growth than this after one bad input means the input's claim was believed."""

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
from fuzz_targets import _open_fds  # noqa: E402


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextmanager
def bounded() -> Iterator[None]:
    """Neither RSS (now and at peak) grows past RSS_SLACK nor an fd leaks inside the block."""
    fds, rss, peak = _open_fds(), _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    assert _rss() - rss < RSS_SLACK
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(peak, rss) < RSS_SLACK
    assert _open_fds() == fds


def _cpr_head() -> bytes:
    return struct.pack(">II", cpr_state.MAGIC, cpr_state.VERSION)


def _vfio_head() -> bytes:
    sub = cpr_state.VFIO_SUBSECTION.encode()
    return bytes([5, len(sub)]) + sub + struct.pack(">I", 1)


def _decode_socket(data: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        cpr_state.receive_state(b, timeout=5)


# --------------------------------------------------------------- cpr stream


@pytest.mark.parametrize("inline", [True, False])
def test_cpr_name_length_of_4gib(inline: bool) -> None:
    data = _cpr_head() + b"\x01" + struct.pack(">I", GIB4) + b"ram\0"
    with bounded(), pytest.raises(StreamError, match="name length 4294967295 is out of range"):
        if inline:
            _decode_socket(data)
        else:
            cpr_state.decode(cpr_state.StreamReader(data, inline_fds=False))


def test_cpr_vfio_name_length_of_4gib() -> None:
    data = _cpr_head() + b"\0" + _vfio_head() + b"\x01" + struct.pack(">I", GIB4)
    with bounded(), pytest.raises(StreamError, match="vfio device name length 4294967295"):
        _decode_socket(data)


def test_cpr_list_of_a_million_entries_stops_at_the_limit() -> None:
    entry = b"\x01" + struct.pack(">I", 2) + b"d\0" + struct.pack(">iII", 1, 2, 3)
    data = _cpr_head() + b"\0" + _vfio_head() + entry * (cpr_state.MAX_ENTRIES + 1) + b"\0"
    with bounded(), pytest.raises(StreamError, match=f"more than {cpr_state.MAX_ENTRIES} entries"):
        cpr_state.decode(cpr_state.StreamReader(data, inline_fds=False))


def test_cpr_one_fd_named_more_times_than_fds_may_be_open() -> None:
    """In cpr-exec mode each repeat of a number is duplicated; running out of fds is a StreamError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(_open_fds()) + 64
    entries = b"".join(b"\x01" + struct.pack(">I", 2) + b"a\0" + struct.pack(">ii", i, 0) for i in range(limit))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with bounded(), pytest.raises(StreamError, match="cannot duplicate fd 0: Too many open files"):
            cpr_state.decode(cpr_state.StreamReader(_cpr_head() + entries + b"\0", inline_fds=False))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -------------------------------------------------------------- main stream


def _section(name: bytes, length: int, name_len: int | None = None) -> bytes:
    return struct.pack(">BH", stream.KIND_DEVICE, len(name) if name_len is None else name_len) + name + struct.pack(
        ">IIQ", 0, 1, length
    )


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (_section(b"cpu", GIB4), "section length 4294967295 exceeds the limit"),
        (_section(b"cpu", 1 << 64 - 1), "exceeds the limit"),
        (_section(b"cpu", stream.MAX_SECTION) + b"tiny", "truncated while reading section 'cpu' \\(4 of"),
        (_section(b"", 0, name_len=0xFFFF), "section name length 65535 is out of range"),
        (struct.pack(">BI", stream.KIND_END, GIB4) + b"\0\0\0\0", "end marker is corrupt"),
    ],
)
def test_main_stream_absurd_lengths(body: bytes, error: str) -> None:
    r, w = os.pipe()
    try:
        os.write(w, struct.pack(">8sI", stream.MAGIC, stream.VERSION) + body)
        os.close(w)
        w = -1
        with bounded(), pytest.raises(StreamError, match=error):
            stream.read_stream(r, lambda name, fd: None)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# --------------------------------------------------------------- fd bundles


def _bundle_header(n_fds: int, data_len: int) -> bytes:
    return b"CPFD" + struct.pack("<IQQ", 1, n_fds, data_len)


@pytest.mark.parametrize(
    ("n_fds", "data_len", "error"),
    [
        (1_000_000, 0, "declares 1000000 fds; the limit is 65536"),
        ((1 << 64) - 1, 0, "declares 18446744073709551615 fds"),
        (0, GIB4, "declares 4294967295 data bytes; the limit is 16777216"),
        (0, (1 << 64) - 1, "data bytes; the limit"),
    ],
)
def test_fd_bundle_absurd_counts(n_fds: int, data_len: int, error: str) -> None:
    a, b = socket.socketpair()
    with a, b, bounded():
        a.sendall(_bundle_header(n_fds, data_len))
        with pytest.raises(StreamError, match=error):
            _core.recv_fds(b.fileno(), timeout=5)


def test_fd_bundle_claiming_a_million_fds_under_a_raised_limit_allocates_nothing_for_them() -> None:
    a, b = socket.socketpair()
    with a, b, bounded():
        a.sendall(_bundle_header(1_000_000, 0))
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(PeerClosedError):
            _core.recv_fds(b.fileno(), max_fds=1 << 20, timeout=5)


def test_recvmsg_with_a_huge_buffer_size_does_not_allocate_it() -> None:
    a, b = socket.socketpair()
    with a, b, bounded():
        a.send(b"x")
        assert _core.recvmsg_fds(b.fileno(), 1 << 40, 0, timeout=5) == (b"x", [])


# ------------------------------------------------------------------ regions


def _machine_bytes() -> int:
    """RAM + swap, as the region check reads them (sysinfo), from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemTotal"] + info["SwapTotal"]


@pytest.mark.parametrize(
    ("size", "error"),
    [
        (0, "must be a nonzero multiple of the page size"),
        (1 << 50, "exceeds this machine's RAM \\+ swap"),
        ("machine", "exceeds this machine's RAM \\+ swap"),
    ],
)
def test_region_sizes_that_can_never_be_backed(size: int | str, error: str) -> None:
    """A memfd could be truncated (and mapped) far beyond RAM, sparse; we refuse it up front."""
    page = os.sysconf("SC_PAGE_SIZE")
    n = (_machine_bytes() // page + 1) * page if size == "machine" else size
    assert isinstance(n, int)
    with bounded(), pytest.raises(ValueError, match=error):
        _core.Region.create("absurd", n)


def test_adopt_with_an_absurd_expected_size() -> None:
    with _core.Region.create("small", 1 << 16) as r, bounded(), pytest.raises(ValueError, match="RAM \\+ swap"):
        _core.Region.adopt(r.fileno(), 1 << 50)
