"""The soak: a short real run shows nothing grows; the growth judgement catches a one-per-update leak."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cprfast import cli, soak
from cprfast.demo import MODES, Footprint

UPDATES = 20


def test_short_soak_nothing_grows(capsys: pytest.CaptureFixture[str]) -> None:
    """20 live updates of the reference VMM across all modes, through the CLI: every update's
    checks pass, and neither the VMM nor the driver holds more fds, file mappings or RSS at
    the end than after the warm-up. Floors are lifted: on a loaded machine pauses vary,
    growth does not."""
    floors = [f"--floor={mode}=100000" for mode in MODES]
    status = cli.main(["soak", "--updates", str(UPDATES), "--mem", "64M", "--hot", "4M", "--json", *floors])
    report = json.loads(capsys.readouterr().out)
    assert report["failures"] == [] and status == 0, report["failures"]
    samples = report["samples"]
    assert [s["mode"] for s in samples] == [MODES[i % 4] for i in range(UPDATES)]
    assert all(s["ok"] and s["pause_ms"] > 0 for s in samples)
    growth = {(g["who"], g["what"]): g for g in report["growth"]}
    assert len(growth) == 5 * 4, sorted(growth)  # 4 VMM modes + the driver, 4 counts each
    for who in [f"vmm {m}" for m in MODES] + ["driver"]:
        assert growth[(who, "fds")]["end"] == growth[(who, "fds")]["start"], who
        assert growth[(who, "file_maps")]["end"] <= growth[(who, "file_maps")]["start"], who
    # The VMM holds the guest RAM memfd mapped: its file mappings are counted.
    assert all(s["vmm"]["file_maps"] > 0 for s in samples)


def _samples(n: int, leak: str | None, per_update: int = 1) -> list[soak.Sample]:
    base = Footprint(fds=12, maps=150, file_maps=60, rss_kib=20000, rss_anon_kib=12000)
    out = []
    for i in range(n):
        grown = dataclasses.replace(base, **{leak: getattr(base, leak) + i * per_update}) if leak else base
        out.append(soak.Sample(i, MODES[i % 4], 1.0, 2.0, True, base, grown))
    return out


@pytest.mark.parametrize("count", ["fds", "file_maps"])
def test_a_driver_leak_of_one_per_update_is_caught(count: str) -> None:
    verdicts = soak.growth(_samples(20, count), cycle=4, warmup=4)
    bad = [(g.who, g.what) for g in verdicts if not g.ok]
    assert bad == [("driver", count)]


def test_anonymous_mappings_and_rss_may_wobble_but_not_climb() -> None:
    assert all(g.ok for g in soak.growth(_samples(20, "maps", per_update=1), cycle=4, warmup=4))
    assert not all(g.ok for g in soak.growth(_samples(20, "maps", per_update=4), cycle=4, warmup=4))
    assert not all(g.ok for g in soak.growth(_samples(20, "rss_anon_kib", per_update=1024), cycle=4, warmup=4))


@pytest.mark.parametrize("n", [21, 22, 23])
def test_a_run_cut_mid_cycle_compares_like_with_like(n: int) -> None:
    """A time bound stops a run anywhere: the cycles compared still start with the same mode."""
    verdicts = soak.growth(_samples(n, "fds"), cycle=4, warmup=n // 10)
    assert [(g.who, g.start, g.end) for g in verdicts if not g.ok] == [("driver", 19, 28)]  # updates 4-7 against 16-19


def test_too_few_updates_cannot_be_judged() -> None:
    with pytest.raises(ValueError, match="too few"):
        soak.growth(_samples(11, None), cycle=4, warmup=4)


def test_bad_floor_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["soak", "--floor", "warp=1"])
    assert exc.value.code == 2 and "expected MODE=MS" in capsys.readouterr().err
