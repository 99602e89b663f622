"""Dirty tracking speed, each beside a pure-Python baseline doing the same job
in the same run; the ratios are printed at the end of the module.

1. Sync of a 4 GiB region (populated) with 0.1 %, 1 %, 10 % of its pages
   written: kernel write tracking (userfaultfd WP + PAGEMAP_SCAN) against a
   per-page CRC32 compare with the previous pass. The baseline is timed on a
   256 MiB slice of the region (same fraction dirty) and scaled to 4 GiB:
   its cost is linear in the pages hashed.
2. The atomic bitmap against a Python set: marking pages one by one, marking
   16-page runs, and sync + iterate the dirty runs.
"""

from __future__ import annotations

import ctypes
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from cprfast import _core

PS = os.sysconf("SC_PAGE_SIZE")
SIZE = 4 << 30
NPAGES = SIZE // PS
SUBSET = (256 << 20) // PS  # pages the Python baseline hashes per round
MADV_POPULATE_WRITE = 23
FRACTIONS = [0.001, 0.01, 0.1]

if not _core.probe_write_tracking()["available"]:
    pytest.skip(f"kernel write tracking: {_core.probe_write_tracking()['detail']}", allow_module_level=True)

# name -> (rust median s, python median s scaled to the same job)
RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    lines = ["", "dirty tracking: cprfast vs pure-Python baseline (medians, same run)"]
    for name, r in RESULTS.items():
        if "rust" in r and "python" in r:
            lines.append(
                f"  {name:<44} cprfast {r['rust'] * 1e3:9.3f} ms   python {r['python'] * 1e3:10.1f} ms"
                f"   ratio {r['python'] / r['rust']:8.1f}x"
            )
    with capture.global_and_fixture_disabled():
        print("\n".join(lines))


def record(benchmark: Any, name: str, impl: str, scale: float = 1.0) -> None:
    median = benchmark.stats.stats.median * scale
    RESULTS.setdefault(name, {})[impl] = median
    benchmark.extra_info.update({"job": name, "impl": impl, "scale": scale, "scaled_median_s": median})


@pytest.fixture(scope="module")
def big() -> Iterator[tuple[_core.Region, np.ndarray[Any, np.dtype[np.uint8]]]]:
    region = _core.Region.create("bench-dirty", SIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(region.address, SIZE, MADV_POPULATE_WRITE) != 0:
        ctypes.memset(region.address, 0, SIZE)
    view = np.ctypeslib.as_array((ctypes.c_uint8 * SIZE).from_address(region.address))
    yield region, view
    del view
    region.close()


def dirty_offsets(npages: int, fraction: float, seed: int) -> np.ndarray[Any, np.dtype[np.intp]]:
    rng = np.random.default_rng(seed)
    pages = rng.choice(npages, size=max(1, int(npages * fraction)), replace=False)
    return pages.astype(np.intp) * PS + rng.integers(0, PS, size=pages.size)


@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"{f:.1%}")
def test_sync_4gib_kernel(benchmark: Any, big: Any, fraction: float) -> None:
    region, view = big
    offsets = dirty_offsets(NPAGES, fraction, 1)
    value = iter(range(1, 1 << 30))
    counts: list[int] = []
    benchmark.group = f"sync 4 GiB, {fraction:.1%} dirty"
    with _core.Tracker(region, kernel=True) as t:

        def dirty() -> None:
            view[offsets] = next(value) & 0xFF or 1

        def sync() -> None:
            counts.append(t.sync().count)

        benchmark.pedantic(sync, setup=dirty, rounds=5, iterations=1)
    assert counts == [offsets.size] * len(counts)  # every written page, nothing else
    record(benchmark, f"sync 4 GiB {fraction:.1%} dirty", "rust")


@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"{f:.1%}")
def test_sync_4gib_python_crc_baseline(benchmark: Any, big: Any, fraction: float) -> None:
    region, view = big
    mv = memoryview(view)[: SUBSET * PS]
    snapshot = [zlib.crc32(mv[o : o + PS]) for o in range(0, SUBSET * PS, PS)]
    offsets = dirty_offsets(SUBSET, fraction, 2)
    value = iter(range(1, 1 << 30))
    found: list[int] = []
    benchmark.group = f"sync 4 GiB, {fraction:.1%} dirty"

    def dirty() -> None:
        view[offsets] = next(value) & 0xFF or 1

    def compare() -> None:
        dirty_pages = []
        for i in range(SUBSET):
            c = zlib.crc32(mv[i * PS : (i + 1) * PS])
            if c != snapshot[i]:
                snapshot[i] = c
                dirty_pages.append(i)
        found.append(len(dirty_pages))

    benchmark.pedantic(compare, setup=dirty, rounds=3, iterations=1)
    assert found == [offsets.size] * len(found)
    mv.release()
    record(benchmark, f"sync 4 GiB {fraction:.1%} dirty", "python", scale=NPAGES / SUBSET)


# --- bitmap vs a Python set ------------------------------------------------------

BITMAP_PAGES = NPAGES  # one bit per page of 4 GiB
MARKS = np.random.default_rng(3).choice(BITMAP_PAGES, size=BITMAP_PAGES // 100, replace=False).tolist()
RUNS = list(range(0, BITMAP_PAGES, BITMAP_PAGES // 1000))[:1000]  # 1,000 runs of 16 pages


def coalesce(pages: set[int]) -> list[tuple[int, int]]:
    """The Python baseline's range table: sort, then merge adjacent pages."""
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


Job = tuple[Callable[[], Any] | None, Callable[[], Any]]  # (untimed setup, timed job)


def bitmap_jobs() -> dict[str, tuple[Job, Job]]:
    b = _core.DirtyBitmap(BITMAP_PAGES)
    s: set[int] = set()

    def rust_mark() -> None:
        mark = b.mark
        for p in MARKS:
            mark(p)

    def py_mark() -> None:
        add = s.add
        for p in MARKS:
            add(p)

    def rust_runs() -> None:
        mark_range = b.mark_range
        for p in RUNS:
            mark_range(p, 16)

    def py_runs() -> None:
        for p in RUNS:
            s.update(range(p, p + 16))

    def rust_sync() -> list[tuple[int, int]]:
        return b.sync().ranges()

    def py_sync() -> list[tuple[int, int]]:
        out = coalesce(s)
        s.clear()
        return out

    none = None
    return {
        "mark 1% of 1M pages one by one": ((none, rust_mark), (none, py_mark)),
        "mark 1,000 runs of 16 pages": ((none, rust_runs), (none, py_runs)),
        "sync + iterate runs (1% marked)": ((rust_mark, rust_sync), (py_mark, py_sync)),
    }


@pytest.mark.parametrize("impl", ["rust", "python"])
@pytest.mark.parametrize("job", list(bitmap_jobs()))
def test_bitmap_throughput(benchmark: Any, job: str, impl: str) -> None:
    rust, py = bitmap_jobs()[job]
    setup, fn = rust if impl == "rust" else py
    benchmark.group = f"bitmap: {job}"
    result = benchmark.pedantic(fn, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    if "sync" in job:
        assert result == coalesce(set(MARKS))
    record(benchmark, f"bitmap: {job}", impl)
