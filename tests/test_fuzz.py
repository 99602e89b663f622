"""Fuzzing in the normal test run: the whole regression corpus, then a few seconds of atheris per target.

Longer runs: ``make fuzz FUZZ_SECONDS=600`` (see fuzz/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzz_targets  # noqa: E402

SECONDS = int(os.environ.get("FUZZ_TEST_SECONDS", "3"))
"""Seconds of fuzzing per target in ``make test``; every target shares the ~60 s budget."""


def _corpus(target: str) -> list[Path]:
    return sorted((FUZZ / "corpus" / target).iterdir())


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_corpus_replays_cleanly(target: str) -> None:
    """Every seed and every input a fuzzer once found still gets only a documented error."""
    files = _corpus(target)
    assert files, f"no corpus for {target}"
    for path in files:
        fuzz_targets.TARGETS[target](path.read_bytes())


def test_every_corpus_folder_has_a_target() -> None:
    assert {p.name for p in (FUZZ / "corpus").iterdir()} == set(fuzz_targets.TARGETS)


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_fuzz_for_a_few_seconds(target: str, tmp_path: Path) -> None:
    """Coverage-guided fuzzing, bounded: any crash, hang (10 s) or RSS above 2 GiB fails."""
    pytest.importorskip("atheris")
    found = tmp_path / "new"
    found.mkdir()
    cmd = [
        sys.executable,
        str(FUZZ / "run.py"),
        target,
        f"-max_total_time={SECONDS}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        str(found),
        str(FUZZ / "corpus" / target),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 60, check=False)
    artifacts = [p.name for p in tmp_path.iterdir() if p.name != "new"]
    assert proc.returncode == 0 and not artifacts, f"{target}: {artifacts}\n{proc.stderr[-4000:]}"
    assert "Done" in proc.stderr and "runs in" in proc.stderr
