"""Scenario benchmarks: guest pause and total time of every live-update mode, per RAM size and hot set.

Each (RAM, hot set) configuration boots one guest with the demo's machinery
(:class:`cprfast.demo.LiveGuest`: the same processes, QMP driving, observer and
checks as ``cprfast demo``) and live-updates it through every mode, ``runs``
times round, each update into a fresh process. Results are medians per
(mode, RAM, hot set), written with every single run to ``bench/results/``
(``scenarios-<date>.json`` and ``scenarios-latest.json``), beside QEMU's
figures from ``bench/results/qemu-<mode>-<size>.json`` when the QEMU runner left them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cprfast.demo import MODES, LiveGuest, Progress, StepResult

RESULTS = Path(__file__).parent / "results"
G, M = 1 << 30, 1 << 20


@dataclass(frozen=True)
class Plan:
    """Which scenarios to run."""

    mems: tuple[int, ...]
    hots: tuple[int, ...]
    runs: int
    modes: tuple[str, ...] = MODES
    guest: str = "auto"


FULL = Plan(mems=(1 * G, 4 * G, 16 * G), hots=(16 * M, 256 * M), runs=5)
"""`make bench`: issue 7's matrix, medians of 5."""
QUICK = Plan(mems=(256 * M,), hots=(16 * M,), runs=1)
"""`make bench-quick` and the test suite's smoke run: every mode once."""


def run(plan: Plan, progress: Progress, results: Path = RESULTS) -> dict[str, Any]:
    """Run ``plan``; returns the results document (runs, medians, errors, QEMU's figures from ``results``)."""
    steps: list[StepResult] = []
    errors: list[dict[str, Any]] = []
    started = time.monotonic()
    for mem in plan.mems:
        for hot in plan.hots:
            try:
                with LiveGuest(mem, hot, plan.guest, progress) as live:
                    live.boot()
                    for i in range(plan.runs):
                        for mode in plan.modes:
                            progress(f"[{mem // M} MiB, hot {hot // M} MiB, run {i + 1}/{plan.runs}] {mode}")
                            steps.append(live.update(mode))
            except Exception as e:  # noqa: BLE001 - one broken configuration must not lose the others
                progress(f"{mem // M} MiB / hot {hot // M} MiB failed: {e}")
                errors.append({"mem": mem, "hot": hot, "error": str(e)})
    return {
        "produced": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "seconds": round(time.monotonic() - started, 1),
        "plan": asdict(plan),
        "summary": summarize(steps),
        "errors": errors,
        "runs": [{**asdict(s), "ok": s.ok} for s in steps],
        "qemu": load_qemu(results),
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0],
        "python": platform.python_version(),
    }


def summarize(steps: Sequence[StepResult]) -> list[dict[str, Any]]:
    """Medians per (mode, RAM, hot set), in the plan's order."""
    groups: dict[tuple[str, int, int], list[StepResult]] = {}
    for s in steps:
        groups.setdefault((s.mode, s.mem, s.hot), []).append(s)
    out = []
    for (mode, mem, hot), runs in groups.items():
        downtimes = [r.downtime_ms for r in runs if r.downtime_ms is not None]
        out.append({
            "mode": mode,
            "guest": runs[0].guest,
            "mem": mem,
            "hot": hot,
            "runs": len(runs),
            "pause_ms_median": statistics.median(r.pause_ms for r in runs),
            "pause_ms_min": min(r.pause_ms for r in runs),
            "blind_ms_median": statistics.median(r.blind_ms for r in runs),
            "baseline_ms": runs[0].baseline_ms,
            "total_ms_median": statistics.median(r.total_ms for r in runs),
            "downtime_ms_median": statistics.median(downtimes) if downtimes else None,
            "bytes_median": statistics.median(r.bytes_moved for r in runs),
            "all_ok": all(r.ok for r in runs),
        })
    out.sort(key=lambda r: (r["mem"], r["hot"], MODES.index(r["mode"])))
    return out


def load_qemu(results: Path = RESULTS) -> list[dict[str, Any]]:
    """QEMU's medians from the QEMU runner's ``qemu-<mode>-<size>.json`` files, in our summary's
    shape (``[]`` if it never ran)."""
    out = []
    for path in sorted(results.glob("qemu-*-*M.json")):
        s = json.loads(path.read_text())
        out.append({
            "mode": s["mode"],
            "mem": s["ram_bytes"],
            "hot": s["hot_bytes"],
            "runs": len(s.get("runs", [])),
            "pause_ms_median": s["pause_ms_median"],
            "total_ms_median": s["wall_ms_median"],
            "downtime_ms_median": s.get("qemu_downtime_ms_median"),
            "version": s.get("qemu_version"),
            "accel": s.get("accel"),
            "produced": s.get("produced"),
        })
    out.sort(key=lambda r: (r["mem"], r["hot"], MODES.index(r["mode"]) if r["mode"] in MODES else len(MODES)))
    return out


def render(doc: dict[str, Any]) -> str:
    """The summary table: ours, then QEMU's where measured."""
    head = ("who", "mode", "RAM", "hot", "runs", "pause (median)", "no-update stall", "total", "VMM downtime", "checks")
    rows = []
    for r in doc["summary"]:
        rows.append((
            "cprfast", r["mode"], _gib(r["mem"]), _gib(r["hot"]), str(r["runs"]), f"{r['pause_ms_median']:.3f} ms",
            f"{r['baseline_ms']:.3f} ms", f"{r['total_ms_median']:.0f} ms", _ms(r["downtime_ms_median"]),
            "ok" if r["all_ok"] else "FAILED",
        ))
    for r in doc["qemu"]:
        rows.append((
            f"QEMU {r.get('version') or ''} {r.get('accel') or ''}".strip(), r["mode"], _gib(r["mem"]), _gib(r["hot"]), str(r["runs"]),
            f"{r['pause_ms_median']:.3f} ms", "", f"{r['total_ms_median']:.0f} ms", _ms(r["downtime_ms_median"]), "",
        ))
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for e in doc["errors"]:
        lines.append(f"FAILED {_gib(e['mem'])} / hot {_gib(e['hot'])}: {e['error'].splitlines()[0]}")
    m = doc["machine"]
    lines.append(f"{doc['produced']}, {m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, load {m['load']:.1f}")
    return "\n".join(lines) + "\n"


def _gib(n: int) -> str:
    return f"{n / G:g}G" if n >= G else f"{n // M}M"


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.0f} ms"


def write(doc: dict[str, Any], results: Path = RESULTS) -> Path:
    """Write ``scenarios-<date>.json`` and ``scenarios-latest.json``; returns the dated path."""
    results.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2) + "\n"
    path = results / f"scenarios-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(text)
    (results / "scenarios-latest.json").write_text(text)
    return path
