"""``python -m cprfast.vmm``: the reference VMM."""

import time

STARTED_NS = time.monotonic_ns()  # before any import of ours: the first mark of a successor's timeline

import sys  # noqa: E402

from cprfast.vmm.cli import main  # noqa: E402

sys.exit(main(started_ns=STARTED_NS))
