"""The threads guest: heartbeat, hot-set writes, real pauses, and state handover."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cprfast import StreamError
from cprfast._core import Region, ThreadsGuest

HEARTBEAT = 0x1000  # rust/core/src/layout.rs
HOT_PASSES = 0x1008
PARAMS = 0x2000
HOT_START = 0x10_0000
PAGE = os.sysconf("SC_PAGE_SIZE")
PAGES_PER_BEAT = 4  # rust/core/src/guest_threads.rs


def u64_fd(fd: int, offset: int) -> int:
    value: int = struct.unpack("<Q", os.pread(fd, 8, offset))[0]
    return value


def u64(region: Region, offset: int) -> int:
    return u64_fd(region.fileno(), offset)


def page_heads(region: Region, start: int, length: int) -> list[int]:
    """The first u64 of every page in [start, start+length): what the guest stores."""
    data = os.pread(region.fileno(), length, start)
    return [struct.unpack_from("<Q", data, off)[0] for off in range(0, length, PAGE)]


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def guest_threads_alive() -> int:
    return sum(1 for t in Path("/proc/self/task").iterdir() if (t / "comm").read_text().strip() == "cprfast-guest")


HOT = 2 << 20


@pytest.fixture
def region() -> Iterator[Region]:
    r = Region.create("guest-ram", HOT_START + HOT)
    yield r
    r.close()


def test_heartbeat_runs_and_params_are_written(region: Region) -> None:
    with ThreadsGuest(region, hot_len=HOT) as g:
        assert not g.running
        g.start()
        assert g.running
        wait_for(lambda: u64(region, HEARTBEAT) > 1000, "heartbeat")
        first = g.heartbeat
        wait_for(lambda: g.heartbeat > first, "heartbeat to move on")
        assert struct.unpack("<3Q", os.pread(region.fileno(), 24, PARAMS)) == (HOT_START, HOT, region.size)


def test_every_hot_page_is_written_by_a_pass(region: Region) -> None:
    with ThreadsGuest(region, hot_len=HOT) as g:
        g.start()
        wait_for(lambda: u64(region, HOT_PASSES) >= 1, "a full pass")
        g.pause()
        heads = page_heads(region, HOT_START, HOT)
        hb = g.heartbeat
        assert all(0 < v <= hb for v in heads), "a hot page was never written"
        # The reserved page just below the hot set stays untouched.
        assert os.pread(region.fileno(), PAGE, HOT_START - PAGE) == bytes(PAGE)


def test_pause_is_a_real_stop(region: Region) -> None:
    with ThreadsGuest(region, hot_len=HOT) as g:
        g.start()
        wait_for(lambda: g.heartbeat > 1000, "heartbeat")
        took = g.pause()
        assert took > 0.0
        assert not g.running
        before = os.pread(region.fileno(), HOT_START + HOT, 0)
        time.sleep(0.02)
        assert os.pread(region.fileno(), HOT_START + HOT, 0) == before, "the paused guest wrote"
        assert g.pause() >= 0.0  # pausing a paused guest is fine
        hb = g.heartbeat
        g.resume()
        assert g.running
        wait_for(lambda: g.heartbeat > hb, "heartbeat after resume")


def test_successor_continues_heartbeat_and_position(region: Region) -> None:
    n = HOT // PAGE
    g1 = ThreadsGuest(region, hot_len=HOT)
    g1.start()
    wait_for(lambda: g1.heartbeat > 1000, "heartbeat")
    while True:
        g1.pause()
        saved_hb = g1.heartbeat
        heads = page_heads(region, HOT_START, HOT)
        pos = (max(i for i, v in enumerate(heads) if v == saved_hb) + 1) % n
        if pos != 0:  # position 0 would not tell a continued position from a reset
            break
        g1.resume()
    state = g1.save_state()
    g1.close()

    g2 = ThreadsGuest(region, hot_len=HOT)
    g2.load_state(state)
    assert g2.save_state() == state
    assert g2.heartbeat == saved_hb
    g2.start()
    wait_for(lambda: g2.heartbeat > saved_hb + 10, "successor heartbeat")
    g2.pause()
    heads = page_heads(region, HOT_START, HOT)
    # The successor's first beat (value saved_hb + 1) wrote page `pos` onwards;
    # later passes rewrite it with values in the same residue class.
    assert heads[pos] > saved_hb
    assert (heads[pos] - (saved_hb + 1)) % (n // PAGES_PER_BEAT) == 0
    g2.close()


def test_state_errors(region: Region) -> None:
    with ThreadsGuest(region, hot_len=HOT) as g:
        g.start()
        with pytest.raises(ValueError, match="must be paused"):
            g.save_state()
        wait_for(lambda: g.heartbeat > 100, "heartbeat")
        g.pause()
        state = g.save_state()
        saved_hb = g.heartbeat
        g.resume()
        with pytest.raises(ValueError, match="must be paused"):
            g.load_state(state)
    fresh = ThreadsGuest(region, hot_len=HOT)
    bad = bytearray(state)
    bad[40] ^= 0x10
    with pytest.raises(StreamError, match="checksum"):
        fresh.load_state(bytes(bad))
    with pytest.raises(StreamError, match="CPRTHRDS"):
        fresh.load_state(state[:-1])
    with pytest.raises(ValueError, match="hot set"):
        ThreadsGuest(region, hot_len=HOT // 2).load_state(state)
    # Memory that does not hold the saved heartbeat was not preserved.
    os.pwrite(region.fileno(), struct.pack("<Q", saved_hb + 1), HEARTBEAT)
    with pytest.raises(StreamError, match="not preserved"):
        fresh.load_state(state)
    fresh.close()


def test_bad_arguments_and_lifecycle(region: Region) -> None:
    with pytest.raises(ValueError, match="outside the region"):
        ThreadsGuest(region, hot_len=HOT + PAGE)
    with pytest.raises(ValueError, match="whole"):
        ThreadsGuest(region, hot_start=0x2000, hot_len=PAGE)
    g = ThreadsGuest(region, hot_len=HOT)
    with pytest.raises(ValueError, match="not started"):
        g.pause()
    before = guest_threads_alive()
    g.start()
    wait_for(lambda: guest_threads_alive() == before + 1, "the guest thread (named by itself once running)")
    with pytest.raises(ValueError, match="already started"):
        g.start()
    g.close()
    # close() joins the thread; the kernel unlists an exited thread from /proc a moment after
    # the join returns (the joiner is woken as the thread's memory is released, before that).
    wait_for(lambda: guest_threads_alive() == before, "the guest thread gone from /proc after close()")
    g.close()
    with pytest.raises(ValueError, match="closed"):
        g.resume()
    assert not g.running
    region.close()
    with pytest.raises(ValueError, match="closed"):
        ThreadsGuest(region)


def test_guest_keeps_pages_mapped_after_region_close() -> None:
    r = Region.create("guest-ram", HOT_START + HOT)
    fd = os.dup(r.fileno())
    try:
        g = ThreadsGuest(r, hot_len=HOT)
        r.close()  # the guest's Arc<Mapping> keeps the pages
        g.start()
        wait_for(lambda: u64_fd(fd, HEARTBEAT) > 100, "heartbeat after region close")
        g.close()
    finally:
        os.close(fd)

