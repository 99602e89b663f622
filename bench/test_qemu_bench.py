"""QEMU 10 side by side: guest pause and total time of QEMU's cpr-transfer and normal migration.

Runs only where ``qemu-system-x86_64`` 10.x is installed (``make bench-qemu``).
Each scenario migrates the tiny guest of bench/qemu between two QEMU processes
``CPRFAST_QEMU_RUNS`` times (default 5) and writes the medians, the
accelerator used and QEMU's version to <results>/qemu-<mode>-<size>.json. The pause is
what the cprfast observer saw through /proc/PID/fd; QEMU's own total-time and
downtime are recorded beside it.

Knobs: ``CPRFAST_QEMU_SIZES`` (default ``1G``; e.g. ``1G,4G,16G``),
``CPRFAST_QEMU_MODES`` (default ``cpr-transfer,normal``), ``CPRFAST_QEMU_HOT``
(hot working set, default ``16M``), ``CPRFAST_QEMU_RUNS``, ``CPRFAST_QEMU_ACCEL``
(``kvm`` or ``tcg``; probed when unset).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import qemu_runner as qr

UNITS = {"M": 20, "G": 30}


def size(text: str) -> int:
    return int(text[:-1]) << UNITS[text[-1].upper()]


SIZES = os.environ.get("CPRFAST_QEMU_SIZES", "1G").split(",")
MODES = os.environ.get("CPRFAST_QEMU_MODES", "cpr-transfer,normal").split(",")
HOT = size(os.environ.get("CPRFAST_QEMU_HOT", "16M"))
RUNS = int(os.environ.get("CPRFAST_QEMU_RUNS", "5"))

pytestmark = [
    pytest.mark.skipif(qr.qemu10_missing() is not None, reason=qr.qemu10_missing() or ""),
    pytest.mark.timeout(3600),  # a normal migration of a big TCG guest takes minutes
]


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Path, str, str]]:
    """The guest image and the accelerator (probed once)."""
    with qr.guest_image() as image, tempfile.TemporaryDirectory(prefix="cprfast-qemu-probe-") as tmp:
        accel, note = qr.pick_accel(image, Path(tmp))
        yield image, accel, note


@pytest.mark.parametrize("ram", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_qemu_migration(
    benchmark: Any, request: pytest.FixtureRequest, setup: tuple[Path, str, str], mode: str, ram: str
) -> None:
    image, accel, note = setup
    if mode not in ("cpr-transfer", "normal"):
        pytest.fail(f"CPRFAST_QEMU_MODES: unknown mode {mode!r} (cpr-transfer or normal)")
    scenario = benchmark.pedantic(
        qr.run_scenario,
        args=(cast(qr.Mode, mode), size(ram), HOT, RUNS, image, accel, note),
        rounds=1,
        iterations=1,
    )
    assert len(scenario.runs) == RUNS
    assert all(r.pause_ms > 0 for r in scenario.runs)
    benchmark.extra_info.update(
        pause_ms=scenario.pause_ms_median,
        baseline_stall_ms=scenario.baseline_stall_ms_median,
        total_ms=scenario.wall_ms_median,
        qemu_downtime_ms=scenario.qemu_downtime_ms_median,
        accel=accel,
    )
    path = qr.write_result(scenario, request.config.getoption("--results"))
    print(
        f"\n{path.name}: pause {scenario.pause_ms_median:.1f} ms (no migration: {scenario.baseline_stall_ms_median:.1f} ms), "
        f"total {scenario.wall_ms_median:.1f} ms "
        f"(QEMU: downtime {scenario.qemu_downtime_ms_median} ms, total-time {scenario.qemu_total_ms_median} ms; {accel})"
    )
