"""Start ``ram_vmm.py`` processes and talk QMP to them (helpers for the precopy / reboot tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cprfast import _core

HERE = Path(__file__).parent


def kvm_or_skip(kind: str) -> None:
    """Skip a KVM-guest test with the probe's reason when /dev/kvm is not usable."""
    if kind == "kvm":
        probe = _core.probe_kvm()
        if not probe.get("available"):
            pytest.skip(f"KVM guest: {probe.get('detail')}")


class Vmm:
    """One ram_vmm.py child process and a QMP connection to it."""

    def __init__(self, tmp: Path, name: str, *args: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.qmp_path = str(tmp / f"{name}.qmp")
        with open(tmp / f"{name}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "ram_vmm.py"), "--qmp", self.qmp_path, *args],
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=pass_fds,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(self.qmp_path)
                break
            except OSError:
                self.sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start: {(tmp / f'{name}.log').read_text()}") from None
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")
        self.pid = self.proc.pid

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **arguments: Any) -> Any:
        """Run a command; raise RuntimeError with the error description on an error reply."""
        self.file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"]["desc"])
        return reply["return"]

    def wait_status(self, statuses: set[str], timeout: float = 120.0) -> dict[str, Any]:
        """Poll query-migrate until its status is in ``statuses``."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.cmd("query-migrate")
            if info.get("status") in statuses:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration status stayed {info}")
            time.sleep(0.02)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("quit")
                self.proc.wait(10)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.file.close()
        self.sock.close()
