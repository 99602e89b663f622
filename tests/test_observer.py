"""The external pause observer against real guests, in this and in another process."""

from __future__ import annotations

import errno
import gc
import os
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _vmm import wait_until

from cprfast import BadFdError
from cprfast._core import Observer, ObserverReport, Region, ThreadsGuest

HEARTBEAT = 0x1000  # rust/core/src/layout.rs
HOT_START = 0x10_0000
HOT = 2 << 20
MS = 1_000_000


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def set_heartbeat(region: Region, value: int) -> None:
    os.pwrite(region.fileno(), struct.pack("<Q", value), HEARTBEAT)


def gap_covering(rep: ObserverReport, start_ns: int, end_ns: int, floor_ns: int) -> tuple[int, int]:
    """The one kept stall (relative times) longer than floor_ns covering [start_ns, end_ns].

    Stall windows are conservative: two neighbours share the sampling intervals
    around the change between them, so both cover the window only if the
    observer itself was descheduled for all of it (its max_sample_gap says so).
    """
    found = [(s, n) for s, n in rep.gaps_over(floor_ns) if s <= start_ns and s + n >= end_ns]
    assert found, (rep.gaps_over(floor_ns), start_ns, end_ns)
    assert len(found) == 1 or rep.max_sample_gap_ns >= end_ns - start_ns, (found, rep.max_sample_gap_ns)
    return found[0]


def observer_threads() -> int:
    return sum(1 for t in Path("/proc/self/task").iterdir() if (t / "comm").read_text().strip() == "cprfast-obs")


@pytest.fixture
def region() -> Iterator[Region]:
    r = Region.create("guest-ram", HOT_START + HOT)
    yield r
    r.close()


@pytest.fixture
def guest(region: Region) -> Iterator[ThreadsGuest]:
    with ThreadsGuest(region, hot_len=HOT) as g:
        g.start()
        wait_for(lambda: g.heartbeat > 100, "heartbeat")
        yield g


def busy_window(obs: Observer, seconds: float = 0.2, tries: int = 50) -> ObserverReport:
    """A sampling window in which guest and observer ran at the same time.

    With 2 cores shared by many processes, the spinning guest and the spinning
    observer sometimes only take turns on one core; the observer then sees one
    change per scheduler slice. Retry until a window shows them overlapping.
    """
    for _ in range(tries):
        obs.start()
        time.sleep(seconds)
        rep = obs.stop()
        if rep.changes > 1000:
            return rep
    pytest.skip("guest and observer never ran at the same time: the machine is too loaded")


def test_running_guest_shows_short_gaps(region: Region, guest: ThreadsGuest) -> None:
    obs = Observer(region.fileno())
    obs.start()
    assert obs.running
    time.sleep(0.05)
    wait_for(lambda: obs.snapshot().changes > 0, "a change")
    snap = obs.snapshot()
    rep = obs.stop()
    assert not obs.running
    assert 0 < snap.changes <= rep.changes
    assert rep.samples >= rep.changes
    assert rep.heartbeat_monotonic
    assert snap.last_value <= rep.last_value <= guest.heartbeat
    assert rep.duration_ns >= 50 * MS
    assert sum(n for _, n in rep.histogram) == rep.changes

    rep = busy_window(obs)
    assert sum(n for _, n in rep.histogram) == rep.changes
    # The guest beats about every microsecond: the typical gap is a few µs,
    # and nearly every gap is far below 1 ms (the exceptions are this machine
    # descheduling the guest or the observer).
    typical = max(rep.histogram, key=lambda b: b[1])[0]
    assert typical <= 16_000, rep.histogram
    short = sum(n for bound, n in rep.histogram if bound <= 512_000)
    assert short >= 0.99 * rep.changes, rep.histogram


def test_pause_is_measured_where_it_happened(region: Region, guest: ThreadsGuest) -> None:
    obs = Observer(region.fileno())
    obs.start()
    wait_for(lambda: obs.snapshot().changes > 100, "observer to see the guest")
    before = obs.snapshot()
    guest.pause()
    paused_at = time.monotonic_ns() - before.started_at_ns
    time.sleep(0.02)
    resumed_at = time.monotonic_ns() - before.started_at_ns
    guest.resume()
    hb = guest.heartbeat
    wait_for(lambda: obs.snapshot().last_value > hb, "observer to see the resumed guest")
    rep = obs.stop()
    assert rep.max_stall_ns >= 20 * MS
    # The stall covering the pause began at the guest's last beat before it
    # parked (after what the snapshot saw), and lasted at least the sleep.
    start, length = gap_covering(rep, paused_at, resumed_at, 20 * MS)
    assert start >= before.last_change_at_ns
    assert length >= 20 * MS
    assert rep.heartbeat_monotonic


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from cprfast._core import Region, ThreadsGuest
    r = Region.create("child-guest-ram", 0x100000 + (2 << 20))
    g = ThreadsGuest(r, hot_len=2 << 20)
    g.start()
    print(os.getpid(), r.fileno(), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "pause":
            g.pause()
            t0 = time.monotonic_ns()
            time.sleep(int(cmd[1]) / 1000)
            t1 = time.monotonic_ns()
            g.resume()
            print(t0, t1, flush=True)
        else:
            break
    g.close()
    """
)


def test_observes_a_guest_in_another_process() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        pid, fd = map(int, child.stdout.readline().split())
        assert pid == child.pid
        obs = Observer(f"/proc/{pid}/fd/{fd}")
        assert obs.target == f"/proc/{pid}/fd/{fd}"
        obs.start()
        wait_for(lambda: obs.snapshot().changes > 100, "observer to see the child's guest")
        child.stdin.write("pause 20\n")
        child.stdin.flush()
        # CLOCK_MONOTONIC is system-wide, so the child's times compare with ours.
        t0, t1 = map(int, child.stdout.readline().split())
        last = obs.snapshot().last_value
        wait_for(lambda: obs.snapshot().last_value > last, "the child's guest to resume")
        rep = obs.stop()
        assert rep.heartbeat_monotonic
        assert rep.max_stall_ns >= 20 * MS
        assert gap_covering(rep, t0 - rep.started_at_ns, t1 - rep.started_at_ns, 20 * MS)[1] >= 20 * MS
    finally:
        child.stdin.write("quit\n")
        child.stdin.close()
        assert child.wait(timeout=30) == 0
        child.stdout.close()


@pytest.mark.parametrize("order", ["start-then-retarget", "retarget-then-start"])
def test_retarget_follows_a_migration(order: str) -> None:
    src = Region.create("src-ram", HOT_START + HOT)
    dst = Region.create("dst-ram", HOT_START + HOT)
    g_src = ThreadsGuest(src, hot_len=HOT)
    g_dst = ThreadsGuest(dst, hot_len=HOT)
    try:
        g_src.start()
        wait_for(lambda: g_src.heartbeat > 100, "source heartbeat")
        obs = Observer(src.fileno())
        obs.start()
        wait_for(lambda: obs.snapshot().changes > 100, "observer to see the source")
        g_src.pause()
        t_paused = time.monotonic_ns()
        moved = g_src.heartbeat
        set_heartbeat(dst, moved)  # the last precopy round carries the heartbeat page
        time.sleep(0.01)
        t_switch = time.monotonic_ns()
        if order == "start-then-retarget":
            g_dst.start()
            obs.retarget(dst.fileno())
        else:
            obs.retarget(dst.fileno())
            g_dst.start()
        wait_for(lambda: obs.snapshot().last_value > moved + 100, "observer to see the target")
        rep = obs.stop()
        assert rep.heartbeat_monotonic
        assert rep.last_value > moved
        base = rep.started_at_ns
        # One stall from the source's last beat to the first beat seen on the target.
        assert gap_covering(rep, t_paused - base, t_switch - base, 10 * MS)[1] >= 10 * MS
    finally:
        g_src.close()
        g_dst.close()
        src.close()
        dst.close()


def test_backwards_heartbeat_is_detected(region: Region) -> None:
    obs = Observer(region.fileno())
    obs.start()
    for n, value in enumerate([5, 6, 7], start=1):
        set_heartbeat(region, value)
        wait_for(lambda: obs.snapshot().last_value == value, f"change {n}")
    assert obs.snapshot().heartbeat_monotonic
    set_heartbeat(region, 3)
    wait_for(lambda: obs.snapshot().changes >= 4, "the backwards change")
    rep = obs.stop()
    assert not rep.heartbeat_monotonic
    assert rep.last_value == 3


def _beat_for(region: Region, value: int, seconds: float) -> int:
    """Move the heartbeat as fast as Python can for ``seconds``; returns its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value += 1
        set_heartbeat(region, value)
    return value


def test_an_update_s_pause_is_the_stall_overlapping_it(region: Region) -> None:
    """The demo's and the QEMU runner's rule: a longer stall before the update does not count."""
    from cprfast.demo import stall_overlapping

    obs = Observer(region.fileno(), interval_ns=20_000)
    obs.start()
    value = _beat_for(region, 1, 0.005)
    time.sleep(0.080)  # a host hiccup before the update
    value = _beat_for(region, value, 0.005)
    start = time.monotonic_ns()
    value = _beat_for(region, value, 0.002)
    time.sleep(0.005)  # the update's own pause
    value = _beat_for(region, value, 0.002)
    end = time.monotonic_ns()
    _beat_for(region, value, 0.005)
    rep = obs.stop()
    assert rep.max_stall_ns >= 80 * MS
    assert 5 * MS <= stall_overlapping(rep, start, end) < 80 * MS


def test_an_update_s_pause_is_bounded_when_longer_stalls_crowd_it_out(region: Region) -> None:
    """A report keeps only its longest stalls: with more long ones outside the update than it
    keeps, the pause is still reported, as an upper bound (the shortest kept), not an error."""
    from cprfast.demo import stall_overlapping

    obs = Observer(region.fileno(), interval_ns=20_000)
    obs.start()
    value = 1
    for _ in range(80):  # more 3 ms stalls than a report keeps (64)
        value += 1
        set_heartbeat(region, value)
        time.sleep(0.003)
    start = time.monotonic_ns()
    value = _beat_for(region, value, 0.002)  # an update with no stall of its own worth keeping
    end = time.monotonic_ns()
    _beat_for(region, value, 0.002)
    rep = obs.stop()
    kept = [length for _, length in rep.gaps_over(0)]
    assert len(kept) == 64
    assert stall_overlapping(rep, start, end) >= min(kept) >= 3 * MS


def test_retarget_onto_unpreserved_memory_is_not_monotonic(region: Region) -> None:
    other = Region.create("other-ram", HOT_START + HOT)
    try:
        set_heartbeat(region, 1000)
        set_heartbeat(other, 10)
        obs = Observer(region.fileno())
        obs.start()
        obs.retarget(other.fileno())
        wait_for(lambda: obs.snapshot().last_value == 10, "the switch")
        assert not obs.stop().heartbeat_monotonic
    finally:
        other.close()


def test_sleeping_observer_samples_at_most_once_per_interval(region: Region, guest: ThreadsGuest) -> None:
    obs = Observer(region.fileno(), interval_ns=200_000)
    obs.start()
    time.sleep(0.05)
    rep = obs.stop()
    assert 0 < rep.changes <= rep.samples <= rep.duration_ns // 200_000 + 1
    assert rep.max_sample_gap_ns >= 200_000


def test_real_time_sampler_or_a_clear_refusal(region: Region, guest: ThreadsGuest) -> None:
    """start(priority, cpus): the sampling thread runs SCHED_FIFO where it is pinned; without
    CAP_SYS_NICE, EPERM and no thread."""
    obs = Observer(region.fileno(), interval_ns=50_000)
    with pytest.raises(ValueError, match="outside 1..=99"):
        obs.start(0)
    assert not obs.running
    last = max(os.sched_getaffinity(0))
    try:
        obs.start(1, cpus=[last])
    except PermissionError:
        assert not obs.running
        return
    try:
        tids = [t for t in os.listdir("/proc/self/task") if Path(f"/proc/self/task/{t}/comm").read_text() == "cprfast-obs\n"]
        assert len(tids) == 1 and os.sched_getscheduler(int(tids[0])) == os.SCHED_FIFO
        assert os.sched_getaffinity(int(tids[0])) == {last}
        wait_until(lambda: obs.snapshot().changes > 0, what="the pinned sampler seeing the heartbeat move")
    finally:
        rep = obs.stop()
    assert rep.changes > 0


def test_bad_targets_raise_and_leak_nothing(region: Region) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        Observer("/nonexistent/guest-ram")
    with pytest.raises(BadFdError, match="negative"):
        Observer(-1)
    r, w = os.pipe()
    try:
        with pytest.raises(BadFdError, match="not a regular file"):
            Observer(r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(OSError) as e:
        Observer(r)  # closed now
    assert e.value.errno == errno.EBADF
    with pytest.raises(ValueError, match="not 8-byte aligned"):
        Observer(region.fileno(), 0x1004)
    with pytest.raises(ValueError, match="outside"):
        Observer(region.fileno(), region.size)
    with pytest.raises(ValueError, match="too coarse"):
        Observer(region.fileno(), interval_ns=2_000_000)
    obs = Observer(region.fileno())
    with pytest.raises(ValueError, match="not running"):
        obs.snapshot()
    with pytest.raises(ValueError, match="not running"):
        obs.stop()
    with pytest.raises(FileNotFoundError):
        obs.retarget("/nonexistent/guest-ram")
    obs.start()
    with pytest.raises(ValueError, match="already running"):
        obs.start()
    obs.stop()
    assert set(os.listdir("/proc/self/fd")) == fds_before


def test_dropping_a_running_observer_stops_its_thread(region: Region) -> None:
    before = observer_threads()
    obs = Observer(region.fileno())
    obs.start()
    wait_for(lambda: observer_threads() == before + 1, "the observer thread")
    del obs
    gc.collect()
    # The drop joins the thread; the kernel unlists an exited thread from /proc a moment after.
    wait_for(lambda: observer_threads() == before, "the observer thread gone from /proc after the drop")
