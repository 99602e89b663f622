"""Every Python example in README.md runs as written, each in a fresh interpreter.

The CPR-state and KVM sections' examples have their output checked as well, in
``test_cpr_state.py`` and ``test_kvm.py``; here each block only has to finish
with status 0 within its time limit.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cprfast import _core

README = Path(__file__).parent.parent / "README.md"


def _examples() -> list[tuple[str, str]]:
    """``(section heading, code)`` for every fenced ``python`` block, in order."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        heading = [line for line in text[: match.start()].splitlines() if line.startswith("#")][-1]
        found.append((heading.lstrip("# ").strip(), match.group(1)))
    return found


EXAMPLES = _examples()


def test_the_readme_has_its_examples() -> None:
    sections = {section for section, _ in EXAMPLES}
    assert {"Embedding cprfast in a VMM", "Driving cprfast over QMP", "The KVM guest"} <= sections, sections


@pytest.mark.parametrize(("section", "code"), EXAMPLES, ids=[f"{i}-{s}" for i, (s, _) in enumerate(EXAMPLES)])
def test_example_runs_as_written(section: str, code: str, tmp_path: Path) -> None:
    if "KvmVm" in code and not _core.probe_kvm()["available"]:
        pytest.skip(f"the example needs KVM: {_core.probe_kvm()['detail']}")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"README section {section!r} failed:\n{done.stdout}\n{done.stderr}"
