"""Page streaming throughput vs a pure-Python per-page loop doing the same job.

The baseline does the Rust path's job per page: it reads each page, checks it
for zero, and writes a small header with a CRC-32 of the page (plus the page
unless zero); on a socket, a Python receiver in a thread parses the headers,
verifies each page's CRC and writes the pages into the destination region
(the Rust path checksums and verifies per chunk). Ratios are of
bytes of region per second, both measured in the same run on the same region:
the rounds alternate (the Python baseline runs as pytest-benchmark's untimed
setup before each timed Rust round) and the best round of each is compared.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from cprfast import _core

PAGE = os.sysconf("SC_PAGE_SIZE")
ZERO = bytes(PAGE)
HDR = struct.Struct("<QII")  # page index, is-zero flag, CRC-32 of the page (0 if zero)
RUST_SIZE = 128 << 20
PY_SIZE = 16 << 20


@contextmanager
def region(size: int, fill: str) -> Iterator[_core.Region]:
    r = _core.Region.create("bench", size)
    try:
        block = os.urandom(1 << 20) if fill == "random" else bytes(1 << 20)
        for off in range(0, size, 1 << 20):
            os.pwrite(r.fileno(), block, off)  # zero-filled pages are populated too
        yield r
    finally:
        r.close()


def py_send(src: _core.Region, out: Callable[[bytes], Any]) -> None:
    fd = src.fileno()
    for p in range(src.size // PAGE):
        page = os.pread(fd, PAGE, p * PAGE)
        if page == ZERO:
            out(HDR.pack(p, 1, 0))
        else:
            out(HDR.pack(p, 0, zlib.crc32(page)) + page)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return bytes(buf)


def py_recv(dst: _core.Region, sock: socket.socket, pages: int) -> None:
    fd = dst.fileno()
    for _ in range(pages):
        p, zero, crc = HDR.unpack(recv_exact(sock, HDR.size))
        page = ZERO if zero else recv_exact(sock, PAGE)
        if not zero and zlib.crc32(page) != crc:
            raise ValueError(f"page {p}: checksum mismatch")
        os.pwrite(fd, page, p * PAGE)


def over_socketpair(src: _core.Region, dst: _core.Region, python: bool) -> float:
    a, b = socket.socketpair()
    with a, b:
        t0 = time.perf_counter()
        if python:
            rx = threading.Thread(target=py_recv, args=(dst, b, src.size // PAGE))
            rx.start()
            py_send(src, a.sendall)
        else:
            rx = threading.Thread(target=_core.recv_pages, args=(dst, b.fileno()))
            rx.start()
            _core.send_pages(src, a.fileno())
        rx.join()
        return time.perf_counter() - t0


def to_file(src: _core.Region, python: bool) -> float:
    with tempfile.TemporaryFile() as f:
        t0 = time.perf_counter()
        if python:
            py_send(src, lambda b: os.write(f.fileno(), b))
        else:
            _core.send_pages(src, f.fileno())
        return time.perf_counter() - t0


def report(
    benchmark: Any, capsys: pytest.CaptureFixture[str], name: str, rust_bps: float, py_bps: float, floor: float
) -> float:
    """Record the ratio and whether it meets the issue's floor; never fail on it (shared, noisy machine)."""
    ratio = rust_bps / py_bps
    benchmark.extra_info.update(
        rust_MBps=round(rust_bps / 1e6),
        python_MBps=round(py_bps / 1e6),
        ratio=round(ratio, 1),
        floor=floor,
        floor_met=ratio >= floor,
    )
    verdict = "meets" if ratio >= floor else "BELOW"
    with capsys.disabled():
        print(
            f"\n{name}: rust {rust_bps / 1e6:.0f} MB/s, python loop {py_bps / 1e6:.0f} MB/s,"
            f" {ratio:.1f}x ({verdict} the {floor:g}x floor)"
        )
    return ratio


def compare(
    benchmark: Any,
    capsys: pytest.CaptureFixture[str],
    name: str,
    rust: Callable[[], float],
    py: Callable[[], float],
    floor: float = 5,
) -> float:
    """Alternate Python and Rust rounds; report and return the ratio of their best rates."""
    py_times: list[float] = []
    benchmark.pedantic(rust, setup=lambda: py_times.append(py()), rounds=10, iterations=1)
    rust_bps, py_bps = RUST_SIZE / min(benchmark.stats.stats.data), PY_SIZE / min(py_times)
    return report(benchmark, capsys, name, rust_bps, py_bps, floor)


@pytest.mark.parametrize("fill", ["random", "zero"])
def test_stream_socketpair(benchmark: Any, capsys: pytest.CaptureFixture[str], fill: str) -> None:
    with region(RUST_SIZE, fill) as src, region(RUST_SIZE, "zero") as dst:
        with region(PY_SIZE, fill) as py_src, region(PY_SIZE, "zero") as py_dst:
            compare(
                benchmark,
                capsys,
                f"socketpair, {fill} pages",
                lambda: over_socketpair(src, dst, False),
                lambda: over_socketpair(py_src, py_dst, True),
            )


def plain_writes(size: int, prealloc: bool) -> float:
    """The kernel's share alone: 1 MiB writes of ready data to a fresh file,
    optionally each after preallocating its blocks, as the Rust path does."""
    block = os.urandom(1 << 20)
    with tempfile.TemporaryFile() as f:
        t0 = time.perf_counter()
        for i in range(size >> 20):
            if prealloc:
                os.posix_fallocate(f.fileno(), i << 20, 1 << 20)
            os.write(f.fileno(), block)
        return time.perf_counter() - t0


@pytest.mark.parametrize("fill", ["random", "zero"])
def test_stream_to_file(benchmark: Any, capsys: pytest.CaptureFixture[str], fill: str) -> None:
    # The Python loop is not given preallocation: per 256 pages it measured no faster.
    with region(RUST_SIZE, fill) as src, region(PY_SIZE, fill) as py_src:
        compare(
            benchmark, capsys, f"file, {fill} pages", lambda: to_file(src, False), lambda: to_file(py_src, True)
        )
    if fill == "zero":
        return
    # Writing new data into a fresh file's page cache costs the kernel about as
    # much as all our work per page: the ceiling is plain writes of ready data.
    rust = benchmark.extra_info["rust_MBps"] * 1e6
    for prealloc, name in ((False, "plain 1 MiB writes"), (True, "the same, each preallocated")):
        ceiling = RUST_SIZE / min(plain_writes(RUST_SIZE, prealloc) for _ in range(5))
        benchmark.extra_info["kernel_ceiling_prealloc_MBps" if prealloc else "kernel_ceiling_MBps"] = round(
            ceiling / 1e6
        )
        with capsys.disabled():
            print(f"file, kernel ceiling ({name}): {ceiling / 1e6:.0f} MB/s; rust at {rust / ceiling:.0%} of it")


def test_mapped_save_load_threads(benchmark: Any, capsys: pytest.CaptureFixture[str]) -> None:
    size = 256 << 20
    times: dict[tuple[str, int], float] = {}
    with region(size, "random") as src, region(size, "zero") as dst, tempfile.TemporaryFile() as f:

        def both(threads: int) -> None:
            for name, fn in (("save", _core.save_mapped), ("load", _core.load_mapped)):
                t0 = time.perf_counter()
                fn(src if name == "save" else dst, f.fileno(), threads=threads)
                dt = time.perf_counter() - t0
                times[name, threads] = min(dt, times.get((name, threads), dt))

        both(1)  # warm the file's page cache
        times.clear()
        for _ in range(2):
            both(1)
        benchmark.pedantic(both, args=(2,), rounds=2, iterations=1)
    with capsys.disabled():
        for name in ("save", "load"):
            one, two = size / times[name, 1] / 1e6, size / times[name, 2] / 1e6
            benchmark.extra_info[f"{name}_MBps_1_2"] = (round(one), round(two))
            print(f"\nmapped-ram {name}: 1 thread {one:.0f} MB/s, 2 threads {two:.0f} MB/s ({two / one:.2f}x)")
