"""Page streaming and the mapped-ram save file, over real sockets, pipes and files.

Region contents are written with ``os.pwrite`` on the memfd and read back with
``os.pread`` (the memfd's page cache is the mapping), and compared page by page.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from cprfast import BadFdError, StreamError, _core

PAGE = os.sysconf("SC_PAGE_SIZE")
HEADER, SUM = 88, 8  # frame header and checksum sizes of the stream format


@contextmanager
def regions(*sizes: int) -> Iterator[list[_core.Region]]:
    rs = [_core.Region.create(f"r{i}", s) for i, s in enumerate(sizes)]
    try:
        yield rs
    finally:
        for r in rs:
            r.close()


def page_hashes(r: _core.Region) -> list[bytes]:
    """One hash per page, read through the memfd (zero pages found with NumPy, not hashed)."""
    out: list[bytes] = []
    step = 1 << 20
    zero_hash = hashlib.blake2b(bytes(PAGE), digest_size=16).digest()
    for off in range(0, r.size, step):
        raw = os.pread(r.fileno(), min(step, r.size - off), off)
        rows = np.frombuffer(raw, dtype=np.uint64).reshape(-1, PAGE // 8)
        nonzero = np.any(rows, axis=1).astype(bool).tolist()
        view = memoryview(raw)
        out.extend(
            hashlib.blake2b(view[i * PAGE : (i + 1) * PAGE], digest_size=16).digest() if nz else zero_hash
            for i, nz in enumerate(nonzero)
        )
    return out


def read_page(r: _core.Region, page: int) -> bytes:
    return os.pread(r.fileno(), PAGE, page * PAGE)


def write_pages(r: _core.Region, pages: Sequence[int], rng: random.Random) -> None:
    for p in pages:
        os.pwrite(r.fileno(), rng.randbytes(PAGE), p * PAGE)


def bitmap(pages: Sequence[int], npages: int) -> npt.NDArray[np.uint64]:
    words = np.zeros((npages + 63) // 64, dtype=np.uint64)
    for p in pages:
        words[p >> 6] |= np.uint64(1) << np.uint64(p & 63)
    return words


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run fn in a thread; the returned callable joins and returns (or raises) its result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the joiner
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()

    def join() -> Any:
        t.join(60)
        assert not t.is_alive(), "worker thread hung"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def transfer(src: _core.Region, dst: _core.Region, n_channels: int = 1, **kw: Any) -> tuple[Any, Any]:
    pairs = [socket.socketpair() for _ in range(n_channels)]
    try:
        tx, rx = [a.fileno() for a, _ in pairs], [b.fileno() for _, b in pairs]
        join = in_thread(lambda: _core.recv_pages(dst, rx[0], channels=rx[1:]))
        sent = _core.send_pages(src, tx[0], channels=tx[1:], **kw)
        return sent, join()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def record(src: _core.Region, **kw: Any) -> bytes:
    """The bytes of a stream of src, sent to a file."""
    with tempfile.TemporaryFile() as f:
        _core.send_pages(src, f.fileno(), **kw)
        f.seek(0)
        return f.read()


def replay(dst: _core.Region, data: bytes) -> Any:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        return _core.recv_pages(dst, f.fileno())


def test_sparse_1gib_region_arrives_bit_identical_over_a_socketpair() -> None:
    rng = random.Random(1)
    with regions(1 << 30, 1 << 30) as (src, dst):
        npages = src.size // PAGE
        data_pages = sorted(rng.sample(range(npages), 3000)) + list(range(1000, 1000 + 1024))
        write_pages(src, data_pages, rng)
        zero_written = [5, 77777, npages - 1]  # populated but all zeros
        for p in zero_written:
            os.pwrite(src.fileno(), bytes(PAGE), p * PAGE)
        garbage = [6, 5000, npages - 2]  # stale data on the receiver must become zero
        write_pages(dst, garbage, rng)
        progress = _core.StreamProgress()
        sent, got = transfer(src, dst, progress=progress)
        nonzero = len(set(data_pages) - set(zero_written))
        assert (sent.pages, sent.zero_pages) == (npages, npages - nonzero)
        assert (got.pages, got.zero_pages, got.bytes, got.chunks) == (sent.pages, sent.zero_pages, sent.bytes, sent.chunks)
        assert (progress.pages, progress.bytes, progress.chunks) == (sent.pages, sent.bytes, sent.chunks)
        assert sent.bytes < nonzero * PAGE * 1.01 + npages * 2  # zero pages carry no data
        assert page_hashes(src) == page_hashes(dst)


@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_roundtrip_over_a_pipe_and_a_file(kind: str) -> None:
    rng = random.Random(2)
    with regions(8 << 20, 8 << 20) as (src, dst):
        write_pages(src, rng.sample(range(src.size // PAGE), 700), rng)
        if kind == "pipe":
            r, w = os.pipe()
            try:
                join = in_thread(lambda: _core.recv_pages(dst, r))
                _core.send_pages(src, w)
                os.close(w)
                w = -1
                join()
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
        else:
            replay(dst, record(src))
        assert page_hashes(src) == page_hashes(dst)


def test_dirty_subset_sends_only_those_pages() -> None:
    rng = random.Random(3)
    with regions(16 << 20, 16 << 20) as (src, dst):
        npages = src.size // PAGE
        write_pages(src, range(npages), rng)
        write_pages(dst, range(0, npages, 7), rng)
        before = page_hashes(dst)
        dirty = sorted(rng.sample(range(npages), 300)) + [npages - 1]
        sent, got = transfer(src, dst, dirty=bitmap(dirty, npages))
        assert sent.pages == got.pages == len(dirty)
        src_h, dst_h = page_hashes(src), page_hashes(dst)
        dirty_set = set(dirty)
        for p in range(npages):
            assert dst_h[p] == (src_h[p] if p in dirty_set else before[p]), f"page {p}"


def test_concurrent_writes_then_final_pass_of_written_pages() -> None:
    rng = random.Random(4)
    with regions(32 << 20, 32 << 20) as (src, dst):
        npages = src.size // PAGE
        write_pages(src, range(0, npages, 3), rng)
        progress = _core.StreamProgress()
        written: set[int] = set()
        during: list[int] = []
        stop = threading.Event()

        def writer() -> None:
            wrng = random.Random(5)
            while not stop.is_set():
                p = wrng.randrange(npages)
                os.pwrite(src.fileno(), wrng.randbytes(PAGE), p * PAGE)
                written.add(p)
                if 0 < progress.pages < npages:
                    during.append(p)
                time.sleep(0.0005)

        w = threading.Thread(target=writer)
        w.start()
        try:
            # 32 MiB at 200 MB/s: the first pass takes a while, with writes landing meanwhile.
            transfer(src, dst, progress=progress, bandwidth=200_000_000)
        finally:
            stop.set()
            w.join()
        assert during, "no write landed while the first pass ran"
        sent, _ = transfer(src, dst, dirty=bitmap(sorted(written), npages))
        assert sent.pages == len(written)
        assert page_hashes(src) == page_hashes(dst)


def test_parallel_channels() -> None:
    rng = random.Random(6)
    with regions(64 << 20, 64 << 20) as (src, dst):
        npages = src.size // PAGE
        write_pages(src, rng.sample(range(npages), 5000), rng)
        sent, got = transfer(src, dst, n_channels=4)
        assert sent.pages == got.pages == npages
        assert page_hashes(src) == page_hashes(dst)


def test_channel_count_mismatch_is_a_stream_error() -> None:
    with regions(1 << 20, 1 << 20) as (src, dst):
        (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
        with a1, b1, a2, b2:
            join = in_thread(lambda: _core.recv_pages(dst, b1.fileno(), channels=[b2.fileno()]))
            _core.send_pages(src, a1.fileno())  # one channel only (all zero pages: a small stream)
            a2.close()
            with pytest.raises(StreamError, match="receiver channel 0 of 2"):
                join()


def test_bandwidth_limit_is_respected() -> None:
    rng = random.Random(7)
    limit = 20_000_000
    with regions(4 << 20, 4 << 20) as (src, dst):
        write_pages(src, range(src.size // PAGE), rng)
        t0 = time.monotonic()
        sent, _ = transfer(src, dst, bandwidth=limit)
        elapsed = time.monotonic() - t0
        assert sent.bytes > 4 << 20
        assert sent.bytes / elapsed <= limit * 1.2
        assert sent.bytes / sent.seconds <= limit * 1.2


def test_progress_is_readable_while_sending() -> None:
    rng = random.Random(8)
    with regions(8 << 20, 8 << 20) as (src, dst):
        npages = src.size // PAGE
        write_pages(src, range(npages), rng)
        progress = _core.StreamProgress()
        seen: list[int] = []
        a, b = socket.socketpair()
        with a, b:
            join_recv = in_thread(lambda: _core.recv_pages(dst, b.fileno()))
            join_send = in_thread(lambda: _core.send_pages(src, a.fileno(), progress=progress, bandwidth=40_000_000))
            deadline = time.monotonic() + 30
            while (not seen or seen[-1] < npages) and time.monotonic() < deadline:
                seen.append(progress.pages)
                time.sleep(0.01)
            join_send()
            join_recv()
        assert any(0 < s < npages for s in seen)
        assert seen == sorted(seen)


PARTS = (
    "start frame",
    "chunk header (first page)",
    "chunk header (page count)",
    "chunk header (zero bitmap)",
    "chunk data",
    "chunk checksum",
    "end marker",
    "end checksum",
)


def _stream_layout(data: bytes, chunk_pages: Sequence[int]) -> dict[str, int]:
    """Byte offsets of one byte inside each part of a recorded stream."""
    first_chunk = HEADER + SUM
    second_chunk = first_chunk + HEADER + chunk_pages[0] * PAGE + SUM
    end = len(data) - HEADER - SUM
    offsets = {
        "start frame": 20,
        "chunk header (first page)": second_chunk + 8,
        "chunk header (page count)": second_chunk + 16,
        "chunk header (zero bitmap)": second_chunk + 60,
        "chunk data": second_chunk + HEADER + 3 * PAGE + 100,
        "chunk checksum": second_chunk + HEADER + chunk_pages[1] * PAGE + 3,
        "end marker": end + 9,
        "end checksum": len(data) - 1,
    }
    assert tuple(offsets) == PARTS
    return offsets


@pytest.mark.parametrize("part", PARTS)
def test_corrupt_stream_is_rejected_and_the_chunk_not_applied(part: str) -> None:
    rng = random.Random(9)
    with regions(600 * PAGE, 600 * PAGE) as (src, dst):
        write_pages(src, range(600), rng)
        data = record(src)
        where = _stream_layout(data, [256, 256])[part]
        bad = bytearray(data)
        bad[where] ^= 0x40
        marker = b"\xee" * PAGE
        for p in range(600):
            os.pwrite(dst.fileno(), marker, p * PAGE)
        with pytest.raises(StreamError) as exc:
            replay(dst, bytes(bad))
        assert "frame" in str(exc.value)
        # The second chunk (pages 256..511) is the one corrupted (or a later part): never applied.
        if part not in ("start frame",):
            assert all(read_page(dst, p) == read_page(src, p) for p in range(256))
        if part.startswith("chunk") or part == "start frame":
            assert all(read_page(dst, p) == marker for p in range(256, 512))
        # The pristine stream applies.
        replay(dst, data)
        assert page_hashes(src) == page_hashes(dst)


@pytest.mark.parametrize("cut", [0, 50, HEADER + SUM + 40, HEADER + SUM + HEADER + 5000, -1, -(HEADER + SUM)])
def test_truncated_stream_is_rejected(cut: int) -> None:
    rng = random.Random(10)
    with regions(300 * PAGE, 300 * PAGE) as (src, dst):
        write_pages(src, range(300), rng)
        data = record(src)
        with pytest.raises(StreamError, match="truncated"):
            replay(dst, data[:cut])


def test_peer_closing_early_is_truncated() -> None:
    rng = random.Random(11)
    with regions(300 * PAGE, 300 * PAGE) as (src, dst):
        write_pages(src, range(300), rng)
        data = record(src)
        a, b = socket.socketpair()
        with a, b:
            join = in_thread(lambda: _core.recv_pages(dst, b.fileno()))
            a.sendall(data[: len(data) // 2])
            a.close()
            with pytest.raises(StreamError, match="truncated"):
                join()


def test_absurd_header_values_are_rejected_without_reading_on() -> None:
    with regions(300 * PAGE, 300 * PAGE) as (src, dst):
        start = record(src)[: HEADER + SUM]
        magic = b"CPGS"
        for first, span, count, match in [
            (0, 2**32 - 1, 1, "bad chunk"),
            (0, 256, 2**32 - 1, "data pages"),
            (2**63, 256, 1, "outside the region"),
            (256, 256, 1, "outside the region"),
        ]:
            hdr = magic + struct.pack("<IQII", 2, first, span, count) + struct.pack("<8Q", 1, 0, 0, 0, 0, 0, 0, 0)
            with pytest.raises(StreamError, match=match):
                replay(dst, start + hdr + bytes(SUM))
        with pytest.raises(StreamError, match="bad magic"):
            replay(dst, start + b"XXXX" + bytes(HEADER))


def test_region_size_mismatch_is_a_stream_error() -> None:
    with regions(1 << 20, 2 << 20) as (src, dst):
        with pytest.raises(StreamError, match="pages of"):
            replay(dst, record(src))


def test_bad_arguments() -> None:
    with regions(100 * PAGE) as (src,):
        with pytest.raises(BadFdError, match="not open"):
            _core.send_pages(src, 9999)
        with pytest.raises(ValueError, match="dirty bitmap has 3 words; a region of 100 pages needs 2"):
            record(src, dirty=np.zeros(3, dtype=np.uint64))
        with pytest.raises(ValueError, match="beyond the region"):
            record(src, dirty=np.full(2, 2**64 - 1, dtype=np.uint64))
        src.close()
        with pytest.raises(ValueError, match="closed"):
            record(src)


@pytest.mark.parametrize("direction", ["recv", "send"])
def test_a_signal_interrupts_a_blocked_transfer(direction: str) -> None:
    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        with regions(64 << 20) as (r,):
            os.pwrite(r.fileno(), os.urandom(1 << 20) * 64, 0)
            a, b = socket.socketpair()
            with a, b:
                timer.start()
                with pytest.raises(Interrupted):
                    if direction == "recv":  # nothing ever arrives
                        _core.recv_pages(r, b.fileno())
                    else:  # nobody reads: the socket buffer fills up
                        _core.send_pages(r, a.fileno())
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, old)


# --- mapped-ram save file ---


@pytest.mark.parametrize("threads", [0, 4])
def test_mapped_roundtrip_in_parallel_leaves_zero_pages_as_holes(threads: int) -> None:
    rng = random.Random(12)
    with regions(256 << 20, 256 << 20) as (src, dst), tempfile.TemporaryFile() as f:
        npages = src.size // PAGE
        pages = rng.sample(range(npages), 2000)
        write_pages(src, pages, rng)
        write_pages(dst, rng.sample(range(npages), 100), rng)  # stale data to be zeroed
        offset = 3 * PAGE
        saved = _core.save_mapped(src, f.fileno(), offset, threads=threads)
        assert (saved.pages, saved.zero_pages) == (npages, npages - 2000)
        st = os.fstat(f.fileno())
        assert st.st_size == offset + _core.mapped_file_size(src.size)
        assert st.st_blocks * 512 < 2000 * PAGE + (4 << 20)  # zero pages are holes
        loaded = _core.load_mapped(dst, f.fileno(), offset, threads=threads)
        assert (loaded.pages, loaded.zero_pages) == (npages, npages - 2000)
        assert page_hashes(src) == page_hashes(dst)


def test_mapped_incremental_update() -> None:
    rng = random.Random(13)
    with regions(32 << 20, 32 << 20) as (src, dst), tempfile.TemporaryFile() as f:
        npages = src.size // PAGE
        write_pages(src, rng.sample(range(npages), 1000), rng)
        _core.save_mapped(src, f.fileno(), threads=2)
        changed = rng.sample(range(npages), 200)
        write_pages(src, changed[:150], rng)
        for p in changed[150:]:
            os.pwrite(src.fileno(), bytes(PAGE), p * PAGE)  # now zero pages
        stats = _core.save_mapped(src, f.fileno(), dirty=bitmap(changed, npages), threads=2)
        assert (stats.pages, stats.zero_pages) == (200, 50)
        _core.load_mapped(dst, f.fileno(), threads=2)
        assert page_hashes(src) == page_hashes(dst)


def test_mapped_rejects_wrong_region_and_corruption() -> None:
    rng = random.Random(14)
    with regions(4 << 20, 8 << 20, 4 << 20) as (src, big, dst), tempfile.TemporaryFile() as f:
        npages = src.size // PAGE
        write_pages(src, range(0, npages, 2), rng)
        _core.save_mapped(src, f.fileno())
        with pytest.raises(StreamError, match="2048 pages"):
            _core.load_mapped(big, f.fileno())
        with pytest.raises(ValueError, match="multiple of the page size"):
            _core.load_mapped(dst, f.fileno(), 100)
        with pytest.raises(StreamError, match="no mapped-ram header"):
            _core.load_mapped(dst, f.fileno(), PAGE)
        with pytest.raises(StreamError, match="no mapped-ram header"):
            _core.save_mapped(src, f.fileno(), PAGE, dirty=bitmap([1], npages))
        data_at = _core.mapped_file_size(src.size) - src.size
        for where, match in [
            (data_at + 10 * PAGE + 5, "page 10 checksum mismatch"),
            (PAGE + 3, "table checksum"),  # the bitmap
            (20, "header checksum"),
        ]:
            orig = os.pread(f.fileno(), 1, where)
            os.pwrite(f.fileno(), bytes([orig[0] ^ 1]), where)
            with pytest.raises(StreamError, match=match):
                _core.load_mapped(dst, f.fileno())
            os.pwrite(f.fileno(), orig, where)
        os.truncate(f.fileno(), data_at + 100 * PAGE)
        with pytest.raises(StreamError, match="truncated"):
            _core.load_mapped(dst, f.fileno())
