"""Guest-RAM region costs: create+map must not grow with size (1 vs 16 GiB),
prefault is reported on its own (1 vs 2 threads), and checksum throughput is
compared with a plain memory copy of the same region measured in the same run.

Nothing here asserts a time; the ratios are in pytest-benchmark's table (the
parenthesized relative columns within each group) and in ``extra_info``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from cprfast import FeatureUnavailableError
from cprfast._core import Region

GiB = 1 << 30


@pytest.mark.parametrize("gib", [1, 16])
def test_create_and_map(benchmark: BenchmarkFixture, gib: int) -> None:
    """memfd_create + ftruncate + seals + mmap, then close outside the timing."""
    made: list[Region] = []

    def create() -> None:
        made.append(Region.create(f"bench-{gib}g", gib * GiB))

    def close() -> None:
        made.pop().close()

    timings: list[dict[str, float]] = []

    def create_and_record() -> None:
        create()
        timings.append(made[-1].timings)

    benchmark.group = "region create+map (1 vs 16 GiB)"
    benchmark.pedantic(create_and_record, teardown=close, rounds=300, warmup_rounds=10)
    benchmark.extra_info["median_create_s"] = statistics.median(t["create"] for t in timings)
    benchmark.extra_info["median_map_s"] = statistics.median(t["map"] for t in timings)


@pytest.fixture(scope="module")
def gib_region() -> Iterator[Region]:
    with Region.create("bench-1g-data", GiB) as r:
        try:
            r.prefault()
        except FeatureUnavailableError as e:
            pytest.skip(f"MADV_POPULATE_WRITE unavailable: {e}")
        words = np.frombuffer(r, dtype=np.uint64)
        words[::512] = np.arange(words.size // 512, dtype=np.uint64)  # distinct pages
        del words
        yield r


@pytest.mark.parametrize("threads", [1, 2])
def test_prefault_1gib(benchmark: BenchmarkFixture, threads: int) -> None:
    """MADV_POPULATE_WRITE of a fresh 1 GiB region (allocating and zeroing every page)."""
    fresh: list[Region] = []

    def setup() -> None:
        fresh.append(Region.create("bench-prefault", GiB))

    def prefault() -> None:
        try:
            fresh[-1].prefault(threads)
        except FeatureUnavailableError as e:
            pytest.skip(f"MADV_POPULATE_WRITE unavailable: {e}")

    def close() -> None:
        fresh.pop().close()

    benchmark.group = "prefault 1 GiB (1 vs 2 threads)"
    benchmark.pedantic(prefault, setup=setup, teardown=close, rounds=5, warmup_rounds=1)


def test_checksum_baseline_copy_1gib(benchmark: BenchmarkFixture, gib_region: Region) -> None:
    """Baseline: one copy of the same 1 GiB with NumPy (single-threaded memcpy)."""
    src = np.frombuffer(gib_region, dtype=np.uint8)
    dst = np.empty_like(src)
    benchmark.group = "checksums 1 GiB vs memcpy"
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=5, warmup_rounds=1)
    benchmark.extra_info["GiB_per_s"] = 1 / benchmark.stats.stats.median
    del src


@pytest.mark.parametrize("threads", [1, 2])
def test_checksums_1gib(benchmark: BenchmarkFixture, gib_region: Region, threads: int) -> None:
    """One xxh3-64 per 4 KiB page of a prefaulted 1 GiB region."""
    benchmark.group = "checksums 1 GiB vs memcpy"
    sums = benchmark.pedantic(gib_region.checksums, args=(threads,), rounds=5, warmup_rounds=1)
    assert sums.shape == (gib_region.pages,)
    benchmark.extra_info["GiB_per_s"] = 1 / benchmark.stats.stats.median
