"""Observer sampling rate and resolution, threads-guest heartbeat rate, pause latency.

Each figure is set beside a pure-Python baseline doing the same job in the same
run; the ratios are the claim (absolute numbers on shared machines are noise).
"""

from __future__ import annotations

import mmap
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cprfast._core import Observer, Region, ThreadsGuest

HEARTBEAT = 0x1000  # rust/core/src/layout.rs
HOT_START = 0x10_0000
HOT = 8 << 20
PAGE = mmap.PAGESIZE
WINDOW = 0.2


@pytest.fixture
def region() -> Iterator[Region]:
    r = Region.create("bench-ram", HOT_START + HOT)
    yield r
    r.close()


@pytest.fixture
def guest(region: Region) -> Iterator[ThreadsGuest]:
    with ThreadsGuest(region, hot_len=HOT) as g:
        g.start()
        while g.heartbeat < 1000:
            time.sleep(0.001)
        yield g


def python_poller(fd: int, seconds: float) -> tuple[int, int]:
    """Baseline observer: poll the heartbeat through mmap from Python. Returns (samples, changes)."""
    m = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=HEARTBEAT & ~(PAGE - 1))
    try:
        off = HEARTBEAT % PAGE
        samples = changes = 0
        last = struct.unpack_from("<Q", m, off)[0]
        end = time.monotonic_ns() + int(seconds * 1e9)
        while time.monotonic_ns() < end:
            v = struct.unpack_from("<Q", m, off)[0]
            samples += 1
            if v != last:
                changes += 1
                last = v
        return samples, changes
    finally:
        m.close()


def test_observer_sampling_rate(benchmark: Any, region: Region, guest: ThreadsGuest) -> None:
    obs = Observer(region.fileno())

    def window() -> tuple[int, int, int, int]:
        obs.start()
        time.sleep(WINDOW)
        rep = obs.stop()
        return rep.samples, rep.duration_ns, rep.max_sample_gap_ns, rep.changes

    samples, duration, max_gap, changes = benchmark.pedantic(window, rounds=3, iterations=1)
    native_rate = samples / (duration / 1e9)
    py_samples, py_changes = python_poller(region.fileno(), WINDOW)
    py_rate = py_samples / WINDOW
    benchmark.extra_info.update(
        native_samples_per_s=native_rate,
        native_resolution_ns=duration / samples,
        native_max_sample_gap_ns=max_gap,
        native_changes_per_s=changes / (duration / 1e9),
        python_samples_per_s=py_rate,
        python_changes_per_s=py_changes / WINDOW,
        ratio_vs_python=native_rate / py_rate,
    )
    print(f"\nobserver: {benchmark.extra_info}")
    assert samples > 0 and py_samples > 0


def python_guest(fd: int, seconds: float) -> int:
    """Baseline guest: the same 4-page-per-beat writes from Python. Returns beats."""
    m = mmap.mmap(fd, HOT_START + HOT, mmap.MAP_SHARED)
    try:
        pages = HOT // PAGE
        hb = pos = 0
        end = time.monotonic_ns() + int(seconds * 1e9)
        while time.monotonic_ns() < end:
            hb += 1
            for _ in range(4):
                struct.pack_into("<Q", m, HOT_START + pos * PAGE, hb)
                pos = (pos + 1) % pages
            struct.pack_into("<Q", m, HEARTBEAT, hb)
        return hb
    finally:
        m.close()


def test_guest_heartbeat_rate(benchmark: Any, region: Region, guest: ThreadsGuest) -> None:
    def window() -> float:
        h0, t0 = guest.heartbeat, time.monotonic_ns()
        time.sleep(WINDOW)
        return (guest.heartbeat - h0) / ((time.monotonic_ns() - t0) / 1e9)

    native = benchmark.pedantic(window, rounds=3, iterations=1)
    guest.pause()
    other = Region.create("bench-py-ram", HOT_START + HOT)
    try:
        py = python_guest(other.fileno(), WINDOW) / WINDOW
    finally:
        other.close()
    benchmark.extra_info.update(native_beats_per_s=native, python_beats_per_s=py, ratio_vs_python=native / py)
    print(f"\nguest: {benchmark.extra_info}")
    assert native > 0 and py > 0


def quantile(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))]


def python_pause_latency(rounds: int) -> list[float]:
    """Baseline: a Python worker thread parked through a flag and an Event handshake."""
    run = threading.Event()
    parked = threading.Event()
    stop = False
    beats = 0

    def worker() -> None:
        nonlocal beats
        while not stop:
            if not run.is_set():
                parked.set()
                run.wait()
                continue
            beats += 1

    run.set()
    t = threading.Thread(target=worker)
    t.start()
    out = []
    try:
        for _ in range(rounds):
            time.sleep(0.002)
            parked.clear()
            t0 = time.perf_counter()
            run.clear()
            parked.wait()
            out.append(time.perf_counter() - t0)
            run.set()
    finally:
        stop = True
        run.set()
        t.join()
    return out


def test_guest_pause_latency(benchmark: Any, guest: ThreadsGuest) -> None:
    latencies: list[float] = []

    def cycle() -> None:
        time.sleep(0.002)  # let it run between pauses
        latencies.append(guest.pause())
        guest.resume()

    benchmark.pedantic(cycle, rounds=50, iterations=1)
    baseline = python_pause_latency(50)
    # p10 is the mechanism (the parked thread was on a CPU); the median on a
    # loaded machine is mostly waiting for the thread to be scheduled at all.
    native_p10, native_med = quantile(latencies, 0.1), statistics.median(latencies)
    py_p10, py_med = quantile(baseline, 0.1), statistics.median(baseline)
    benchmark.extra_info.update(
        native_pause_p10_us=native_p10 * 1e6,
        native_pause_median_us=native_med * 1e6,
        python_pause_p10_us=py_p10 * 1e6,
        python_pause_median_us=py_med * 1e6,
        ratio_p10_python_over_native=py_p10 / native_p10,
        ratio_median_python_over_native=py_med / native_med,
    )
    print(f"\npause: {benchmark.extra_info}")
    assert native_p10 > 0 and py_p10 > 0

