"""``cprfast soak``: live-update one guest many times in a row and show that nothing grows.

A leak that costs one fd or one mapping per update is invisible in a demo of four
updates and fatal to a VMM that is updated every week for years. The soak drives
the reference VMM through the modes in turn (each update into a fresh process,
with the guest running) and after every update reads, from ``/proc``, what the
VMM that now runs the guest holds (fds, file and all mappings, private RSS), and
what the driver itself holds: its observer maps a page of each guest's RAM, and
a mapping it keeps past an update keeps that old guest RAM allocated. It fails when:

- any update's own checks fail (memory identical, heartbeat continuous, devices, same fd);
- a heartbeat gap exceeds the mode's floor plus the noise allowance (the
  observer's stall with no update at all, plus its own blind spot that update);
- a count grew: the first full cycle of modes after the warm-up is compared with
  the last cycle (the VMM mode by mode, since each mode leaves a different
  process; the driver by the last cycle's lowest value against the first's highest).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from cprfast.demo import MODES, Footprint, LiveGuest, Progress, StepResult

FLOORS_MS: dict[str, float] = {"cpr-transfer": 1.0, "cpr-exec": 50.0, "cpr-reboot": 300.0, "normal": 300.0}
"""Longest heartbeat gap each mode may cause: cpr-transfer's target is ready before the stop,
cpr-exec restarts an interpreter, cpr-reboot and normal are bounded by downtime-limit (300 ms)."""
RSS_SLACK = 0.10
"""Private RSS may end this fraction above where it was after the warm-up (allocator noise,
and the driver keeps every sample)..."""
RSS_SLACK_KIB = 2 << 10
"""...plus this much."""
MAPS_SLACK = 32
"""Anonymous mappings come and go with no leak: glibc keeps the stacks of exited threads
(up to 40 MiB; every update starts observer threads), Python frees arenas in bursts. A
leaked guest-RAM mapping is a file mapping, and those may not grow at all, nor may fds."""


@dataclass
class Sample:
    """One update of the soak."""

    index: int
    mode: str
    pause_ms: float
    limit_ms: float
    """The mode's floor plus the noise allowance of this update."""
    ok: bool
    """The update's own checks (StepResult.ok)."""
    vmm: Footprint
    driver: Footprint


@dataclass
class Growth:
    """One count compared between the first cycle after the warm-up and the last."""

    who: str
    """``vmm <mode>`` or ``driver``."""
    what: str
    start: int
    end: int
    allowed: int
    """Growth tolerated (0 for fds)."""

    @property
    def ok(self) -> bool:
        """Within the tolerance."""
        return self.end - self.start <= self.allowed


@dataclass
class SoakReport:
    """The whole soak: every sample, the growth checks and why it failed, if it did."""

    updates_asked: int
    seconds: float
    baseline_ms: float
    """Longest heartbeat stall over 1 s with no update (the observer's noise floor)."""
    floors_ms: dict[str, float]
    samples: list[Sample] = field(default_factory=list)
    growth: list[Growth] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stopped: str = ""
    """Why it ended before ``updates_asked`` (the time bound), or empty."""

    @property
    def ok(self) -> bool:
        """No failure of any kind."""
        return not self.failures


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def growth(samples: Sequence[Sample], cycle: int, warmup: int) -> list[Growth]:
    """Compare the first full cycle after ``warmup`` updates with the last full cycle.

    Cycles start at multiples of ``cycle`` (the same mode at the same place in both).
    Needs two full cycles after the warm-up; raises ValueError with fewer.
    """
    start = -(-warmup // cycle) * cycle
    end = len(samples) // cycle * cycle
    if end - start < 2 * cycle:
        raise ValueError(f"{len(samples)} updates are too few to judge growth (need {start + 2 * cycle})")
    first = samples[start : start + cycle]
    last = samples[end - cycle : end]
    out: list[Growth] = []
    for a, b in zip(first, last, strict=True):
        assert a.mode == b.mode, (a.mode, b.mode)
        out += [Growth(f"vmm {a.mode}", k, getattr(a.vmm, k), getattr(b.vmm, k), _slack(k, a.vmm)) for k in _COUNTS]
    high = {k: max(getattr(s.driver, k) for s in first) for k in _COUNTS}
    low = {k: min(getattr(s.driver, k) for s in last) for k in _COUNTS}
    out += [Growth("driver", k, high[k], low[k], _slack(k, first[0].driver)) for k in _COUNTS]
    return out


_COUNTS = ("fds", "file_maps", "maps", "rss_anon_kib")


def _slack(count: str, at: Footprint) -> int:
    if count == "maps":
        return MAPS_SLACK
    if count == "rss_anon_kib":
        return int(at.rss_anon_kib * RSS_SLACK) + RSS_SLACK_KIB
    return 0


def run(
    updates: int = 1000,
    minutes: float = 14.0,
    *,
    mem: int = 128 << 20,
    hot: int = 8 << 20,
    guest: str = "auto",
    modes: Sequence[str] = MODES,
    floors_ms: Mapping[str, float] | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SoakReport:
    """Live-update one guest ``updates`` times cycling ``modes`` (stopping early, with a
    note, after ``minutes``), then judge the samples."""
    floors = {**FLOORS_MS, **(floors_ms or {})}
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(f"modes must be some of {', '.join(MODES)}; got {list(modes)}")
    note = progress or (lambda _: None)
    start = clock()
    with LiveGuest(mem, hot, guest) as live:
        live.boot()
        report = SoakReport(updates, 0.0, live.baseline_ms, floors)
        for i in range(updates):
            if clock() - start > minutes * 60:
                report.stopped = f"time bound of {minutes:g} min reached after {i} of {updates} updates"
                break
            mode = modes[i % len(modes)]
            step = live.update(mode)
            sample = _sample(i, step, floors[mode] + live.baseline_ms + step.blind_ms)
            report.samples.append(sample)
            if not sample.ok:
                report.failures.append(f"update {i} ({mode}): its checks failed: {_what_failed(step)}")
            if sample.pause_ms > sample.limit_ms:
                own = f"the VMM's downtime {step.downtime_ms:g} ms, " if step.downtime_ms is not None else ""
                report.failures.append(
                    f"update {i} ({mode}): heartbeat gap {sample.pause_ms:.3f} ms > {sample.limit_ms:.3f} ms "
                    f"(floor {floors[mode]:g} ms + noise {sample.limit_ms - floors[mode]:.3f} ms; "
                    f"{own}total {step.total_ms:.0f} ms)"
                )
            if i % 10 == 0 or not sample.ok:
                note(f"{i + 1}/{updates} {mode}: pause {step.pause_ms:.3f} ms, vmm fds {sample.vmm.fds}")
    report.seconds = clock() - start
    try:
        report.growth = growth(report.samples, len(modes), warmup=max(len(modes), len(report.samples) // 10))
    except ValueError as e:
        report.failures.append(str(e))
    report.failures += [
        f"{g.who} {g.what} grew {g.start} -> {g.end} (allowed +{g.allowed})" for g in report.growth if not g.ok
    ]
    return report


def _sample(index: int, step: StepResult, limit_ms: float) -> Sample:
    assert step.footprint is not None
    return Sample(index, step.mode, step.pause_ms, limit_ms, step.ok, step.footprint, Footprint.of())


def _what_failed(step: StepResult) -> str:
    checks = {
        "memory identical": step.memory_identical,
        "heartbeat continuous": step.heartbeat_continuous,
        "devices": step.devices_ok,
        "same fd": step.fd_same is not False,
    }
    return ", ".join(name for name, good in checks.items() if not good)


def render(report: SoakReport) -> str:
    """The summary table: pauses per mode, then every growth check, then the verdict."""
    lines = [
        f"{len(report.samples)} updates in {report.seconds:.0f} s; "
        f"noise allowance: {report.baseline_ms:.3f} ms (stall with no update) + each update's observer blind spot",
        "",
        f"{'mode':<13} {'n':>4} {'median':>10} {'p99':>10} {'max':>10} {'floor':>8} {'over':>5}",
    ]
    for mode in dict.fromkeys(s.mode for s in report.samples):
        mine = [s for s in report.samples if s.mode == mode]
        pauses = [s.pause_ms for s in mine]
        over = sum(s.pause_ms > s.limit_ms for s in mine)
        lines.append(
            f"{mode:<13} {len(pauses):>4} {statistics.median(pauses):>7.3f} ms {_percentile(pauses, 0.99):>7.3f} ms "
            f"{max(pauses):>7.3f} ms {report.floors_ms[mode]:>5g} ms {over:>5}"
        )
    if report.growth:
        lines += ["", f"{'process':<18} {'count':<13} {'after warm-up':>14} {'end':>10}  verdict"]
        for g in report.growth:
            verdict = "ok" if g.ok else f"GREW (allowed +{g.allowed})"
            lines.append(f"{g.who:<18} {g.what:<13} {g.start:>14} {g.end:>10}  {verdict}")
    if report.stopped:
        lines += ["", f"note: {report.stopped}"]
    lines += ["", "PASS" if report.ok else "FAIL:"]
    lines += [f"  {f}" for f in report.failures[:20]]
    if len(report.failures) > 20:
        lines.append(f"  ... and {len(report.failures) - 20} more")
    return "\n".join(lines) + "\n"


def as_json(report: SoakReport) -> str:
    """The report as JSON (every sample included)."""
    return json.dumps({**asdict(report), "ok": report.ok}, indent=2)


__all__ = ["FLOORS_MS", "Growth", "Sample", "SoakReport", "as_json", "growth", "render", "run"]
