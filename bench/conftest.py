"""Benchmark session options: where results go, and which scenario set runs.

- Micro-benchmark results (pytest-benchmark) go to ``<results>/micro.json``
  unless ``--benchmark-json`` says otherwise.
- ``--scenarios full|quick|off`` picks the live-update scenario plan
  (``bench/scenarios.py``); its JSON and plots go to ``--results`` and its
  summary table is printed at the end of the session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).parent / "results"
SUMMARY = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cprfast")
    group.addoption("--scenarios", choices=("full", "quick", "off"), default="full",
                    help="live-update scenario set (default full: 1/4/16G x hot 16M/256M x 5 runs)")
    group.addoption("--results", type=Path, default=RESULTS, help="directory for JSON results and plots")


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "benchmark_json", None) is None and hasattr(config.option, "benchmark_json"):
        results: Path = config.getoption("--results")
        results.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = results / "micro.json"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    summary = config.stash.get(SUMMARY, None)
    if summary is not None:
        terminalreporter.section("live-update scenarios")
        terminalreporter.write(summary)
