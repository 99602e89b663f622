"""Live-update scenarios as one benchmark: every mode, per RAM size and hot set (``bench/scenarios.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plots
import pytest
import scenarios
from conftest import SUMMARY


def test_live_update_scenarios(benchmark: Any, request: pytest.FixtureRequest) -> None:
    choice = request.config.getoption("--scenarios")
    if choice == "off":
        pytest.skip("--scenarios off")
    plan = scenarios.FULL if choice == "full" else scenarios.QUICK
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def progress(msg: str) -> None:
        if reporter is not None:
            reporter.write_line(f"  {msg}")

    results: Path = request.config.getoption("--results")
    doc = benchmark.pedantic(scenarios.run, args=(plan, progress, results), rounds=1, iterations=1)
    path = scenarios.write(doc, results)
    pngs = plots.write_all(doc, results)
    table = scenarios.render(doc)
    request.config.stash[SUMMARY] = table + f"results: {path}\nplots: {', '.join(map(str, pngs))}\n"
    benchmark.extra_info["summary"] = doc["summary"]
    assert not doc["errors"], doc["errors"]
    assert {r["mode"] for r in doc["summary"]} == set(plan.modes)
    assert all(r["all_ok"] for r in doc["summary"]), table
