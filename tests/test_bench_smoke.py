"""`cprfast bench --quick` once, as a smoke test: it runs, and its results hold every mode with sane fields.

Not a timed assertion: the numbers are only checked for being measurements at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = {"cpr-transfer", "cpr-exec", "cpr-reboot", "normal"}


@pytest.mark.timeout(600)
def test_bench_quick(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "cprfast", "bench", "--quick", "--results", str(tmp_path), "--checkout", str(ROOT)],
        capture_output=True, text=True, timeout=590,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "live-update scenarios" in r.stdout
    doc = json.loads((tmp_path / "scenarios-latest.json").read_text())
    assert not doc["errors"]
    assert {s["mode"] for s in doc["summary"]} == MODES
    for s in doc["summary"]:
        assert s["all_ok"] and s["runs"] >= 1
        assert s["pause_ms_median"] > 0 and s["total_ms_median"] > 0, s
        assert s["mem"] > 0 and s["hot"] > 0
    normal = next(r for r in doc["runs"] if r["mode"] == "normal")
    assert normal["bytes_moved"] > 0 and normal["dirty_pages"]
    assert json.loads((tmp_path / "micro.json").read_text())["benchmarks"]
    for png in ("pause-vs-ram.png", "dirty-per-iteration.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
