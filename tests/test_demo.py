"""`cprfast demo` hands a memfd to a child process and reads back what it wrote."""

from __future__ import annotations

import subprocess
import sys

from cprfast import demo


def test_demo_round_trip_in_process() -> None:
    report = demo.run(size=4 << 20)
    assert report.same_inode
    assert report.marker == f"written by child pid {report.child_pid}".encode()
    assert report.pass_us > 0 and report.round_trip_ms > 0


def test_demo_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cprfast", "demo"], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert "same inode in both: True" in out
    assert "parent read it back" in out
