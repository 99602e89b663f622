"""The interim ``cprfast demo``: guest RAM handed to another process by fd.

The parent creates a memfd region and writes a greeting into it, a child
process receives the memfd over SCM_RIGHTS, maps it, checks the greeting and
writes a marker, and the parent reads that marker back through its own
memfd: one piece of memory, two processes, no copy. This is the core move of
a cpr-transfer live update (the live-update demo will replace this one).
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from cprfast import _core

GREETING = b"hello from the parent"
MARKER_OFFSET = 1 << 20
TIMEOUT = 30.0


@dataclass(frozen=True)
class DemoReport:
    """What the round trip showed."""

    region_size: int
    child_pid: int
    send_us: float
    """Time spent in send_fds on the parent side."""
    pass_us: float
    """From the start of send_fds until the child held the fd (one CLOCK_MONOTONIC for both)."""
    round_trip_ms: float
    """From the start of send_fds until the child's reply arrived, marker written."""
    same_inode: bool
    marker: bytes

    def render(self) -> str:
        """A short human report."""
        return (
            f"region: {self.region_size >> 20} MiB memfd\n"
            f"child pid {self.child_pid} got it over SCM_RIGHTS in {self.pass_us:.0f} us "
            f"(send_fds took {self.send_us:.0f} us), same inode in both: {self.same_inode}\n"
            f"child wrote {self.marker!r} at offset {MARKER_OFFSET:#x}; "
            f"parent read it back; round trip {self.round_trip_ms:.2f} ms\n"
        )


def run(size: int = 16 << 20) -> DemoReport:
    """Run the round trip with a child process; raise if anything does not match."""
    region = _core.Region.create("cprfast-demo", size)
    parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.pwrite(region.fileno(), GREETING, 0)
        with child_end:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cprfast.demo", str(child_end.fileno())], pass_fds=[child_end.fileno()]
            )
        try:
            _core.recv_fds(parent.fileno(), max_fds=0, max_data=16, timeout=TIMEOUT)  # child is ready
            meta = json.dumps({"size": size, "offset": MARKER_OFFSET, "greeting": GREETING.decode()})
            start = time.monotonic_ns()
            _core.send_fds(parent.fileno(), meta.encode(), [region.fileno()], timeout=TIMEOUT)
            sent = time.monotonic_ns()
            data, _ = _core.recv_fds(parent.fileno(), max_fds=0, max_data=4096, timeout=TIMEOUT)
            done = time.monotonic_ns()
            if proc.wait(TIMEOUT) != 0:
                raise RuntimeError(f"demo child exited with status {proc.returncode}")
        finally:
            proc.kill()
            proc.wait()
        reply = json.loads(data)
        marker = reply["marker"].encode()
        if os.pread(region.fileno(), len(marker), MARKER_OFFSET) != marker:
            raise RuntimeError("the child's marker is not in the parent's memfd")
        return DemoReport(
            region_size=size,
            child_pid=proc.pid,
            send_us=(sent - start) / 1e3,
            pass_us=(reply["received_ns"] - start) / 1e3,
            round_trip_ms=(done - start) / 1e6,
            same_inode=reply["ino"] == os.fstat(region.fileno()).st_ino,
            marker=marker,
        )
    finally:
        parent.close()
        region.close()


def child(sock: int) -> None:
    """The child side: receive the memfd, check the greeting, write a marker, reply."""
    _core.send_fds(sock, b"ready", [], timeout=TIMEOUT)
    data, fds = _core.recv_fds(sock, max_fds=1, max_data=4096, timeout=TIMEOUT)
    received = time.monotonic_ns()
    (memfd,) = fds
    meta = json.loads(data)
    marker = f"written by child pid {os.getpid()}"
    with mmap.mmap(memfd, meta["size"]) as ram:
        if ram[: len(meta["greeting"])] != meta["greeting"].encode():
            raise RuntimeError("greeting missing from the received memfd")
        ram[meta["offset"] : meta["offset"] + len(marker)] = marker.encode()
    ino = os.fstat(memfd).st_ino
    os.close(memfd)
    reply = {"received_ns": received, "ino": ino, "marker": marker}
    _core.send_fds(sock, json.dumps(reply).encode(), [], timeout=TIMEOUT)


if __name__ == "__main__":
    child(int(sys.argv[1]))
