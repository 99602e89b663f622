"""PNG plots of a scenario results document (``bench/scenarios.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the non-interactive backend

G, M = 1 << 30, 1 << 20


def pause_vs_ram(doc: dict[str, Any], path: Path) -> Path:
    """Guest pause (median, log scale) against RAM size: one line per mode and hot set; QEMU dashed."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for who, rows, style in (("cprfast", doc["summary"], "-o"), ("QEMU", doc["qemu"], "--s")):
        series: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for r in rows:
            series.setdefault((r["mode"], r["hot"]), []).append((r["mem"] / G, max(r["pause_ms_median"], 1e-3)))
        for (mode, hot), points in sorted(series.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, style, label=f"{who} {mode}, hot {hot // M}M")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(300.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("guest RAM (GiB)")
    ax.set_ylabel("guest pause, observed (ms, median)")
    ax.set_title(f"Guest pause per live-update mode ({doc['produced']})")
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def dirty_per_iteration(doc: dict[str, Any], path: Path) -> Path:
    """Dirty pages found at each sync of a normal migration: the first run of each (RAM, hot set)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    seen: set[tuple[int, int]] = set()
    for r in doc["runs"]:
        key = (r["mem"], r["hot"])
        if r["mode"] != "normal" or not r["dirty_pages"] or key in seen:
            continue
        seen.add(key)
        ax.plot(range(1, len(r["dirty_pages"]) + 1), r["dirty_pages"], "-o", label=f"{r['mem'] // M}M RAM, hot {r['hot'] // M}M")
    ax.set_xlabel("precopy iteration (dirty sync)")
    ax.set_ylabel("dirty pages")
    ax.set_title("Normal migration: dirty pages per iteration")
    if seen:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(doc: dict[str, Any], results: Path) -> list[Path]:
    """Both plots into ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    return [pause_vs_ram(doc, results / "pause-vs-ram.png"), dirty_per_iteration(doc, results / "dirty-per-iteration.png")]
