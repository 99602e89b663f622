"""Run one fuzz target under atheris (libFuzzer with Python coverage guidance).

    python fuzz/run.py TARGET [libFuzzer options] [CORPUS_DIR ...]

e.g. ``python fuzz/run.py cpr_inline -max_total_time=60 fuzz/corpus/cpr_inline``.
A crash (an undocumented exception, an fd leak, a write outside a region), a
hang (``-timeout``) or an out-of-memory (``-rss_limit_mb``) ends the run with a
non-zero status and leaves the input in ``crash-*``/``timeout-*``/``oom-*``
(see ``-artifact_prefix``). The cprfast Python modules are instrumented; the
Rust parsers run through the extension, whose code carries no coverage
counters, so for them the guidance is what their errors do on the Python side.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["cprfast", "fuzz_targets"]):
    import fuzz_targets


def main() -> None:
    """Fuzz the target named by the first argument; the rest go to libFuzzer."""
    if len(sys.argv) < 2 or sys.argv[1] not in fuzz_targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} TARGET [libFuzzer args]; targets: {' '.join(fuzz_targets.TARGETS)}")
    target = fuzz_targets.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
