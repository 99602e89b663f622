"""Precopy migration of a 1 GiB threads guest between two processes: guest pause and total time.

The guest pause is measured from outside by the heartbeat observer: it follows
the source memfd and, the moment the source stops (status device/completed),
switches to the target's memfd; the longest window without a heartbeat change
is the pause. The claim is a ratio measured in one run: a guest dirtying a
64 MiB hot set against an idle guest (one hot page), same RAM, same machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cprfast._core import Observer

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from vmm_client import Vmm  # noqa: E402

RAM = 1 << 30
ROUNDS = 3


def _migrate_once(tmp: Path, hot: int, n: int) -> dict[str, float]:
    uri = f"unix:{tmp}/mig{n}.sock"
    common = ["--ram", str(RAM), "--hot", str(hot), "--guest", "threads"]
    dst = Vmm(tmp, f"dst{n}", *common, "--incoming", uri)
    src = Vmm(tmp, f"src{n}", *common)
    try:
        time.sleep(0.3)  # the hot set is being dirtied
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 30})
        obs = Observer(f"/proc/{src.pid}/fd/{src.cmd('x-query')['ram-fd']}")
        dst_ram = f"/proc/{dst.pid}/fd/{dst.cmd('x-query')['ram-fd']}"
        obs.start()
        t0 = time.monotonic()
        src.cmd("migrate", uri=uri)
        while src.cmd("query-migrate")["status"] in ("setup", "active"):
            time.sleep(0.001)
        obs.retarget(dst_ram)
        info = src.wait_status({"completed", "failed"})
        total = time.monotonic() - t0
        assert info["status"] == "completed", info
        dst.wait_status({"completed"})
        time.sleep(0.1)
        report = obs.stop()
        return {
            "pause_ms": report.max_stall_ns / 1e6,
            "downtime_ms": float(info["downtime"]),
            "total_s": total,
            "syncs": float(info["ram"]["dirty-sync-count"]),
        }
    finally:
        src.close()
        dst.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[dict[str, float]]]]:
    tmp = tmp_path_factory.mktemp("precopy")
    out = {
        "idle": [_migrate_once(tmp, 4096, i) for i in range(ROUNDS)],
        "hot64M": [_migrate_once(tmp, 64 << 20, ROUNDS + i) for i in range(ROUNDS)],
    }
    yield out


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def test_precopy_1g_hot_set_vs_idle(benchmark: Any, results: dict[str, list[dict[str, float]]]) -> None:
    hot, idle = results["hot64M"], results["idle"]
    for name, runs in results.items():
        for key in ("pause_ms", "downtime_ms", "total_s", "syncs"):
            benchmark.extra_info[f"{name}_{key}_median"] = _median(runs, key)
    benchmark.extra_info["pause_ratio_hot_vs_idle"] = _median(hot, "pause_ms") / max(_median(idle, "pause_ms"), 1e-3)
    benchmark.extra_info["total_ratio_hot_vs_idle"] = _median(hot, "total_s") / _median(idle, "total_s")
    benchmark.pedantic(lambda: None, rounds=1)
    assert all(r["pause_ms"] > 0 for r in hot + idle)
