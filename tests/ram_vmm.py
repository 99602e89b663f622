"""A minimal VMM process for the precopy / cpr-reboot tests, driven over QMP.

    python tests/ram_vmm.py --qmp PATH --ram BYTES --hot BYTES --guest threads|kvm [--incoming defer|URI]

Guest RAM is one fresh memfd region (``pc.ram``) with the reference VMM's guest
on it; devices: the vCPU state and a ``blob`` whose bytes tests set and read.
Extra QMP commands: ``x-query`` (pid, RAM fd, heartbeat, blob, whether a
userfaultfd is open), ``x-set-blob``, ``x-suspend``, ``x-save-checksums PATH``
(per-page checksums, as a NumPy file). ``--start-sums`` saves them when an
incoming guest is first started (the target's memory at switchover); whenever the run state becomes
postmigrate, the checksums are saved to ``--postmigrate-sums`` (the source's
memory at switchover). The process exits on ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import numpy as np

from cprfast import _core
from cprfast.devices import DeviceRegistry
from cprfast.migration import MigrationState
from cprfast.modes import precopy, reboot
from cprfast.qmp import QMPServer
from cprfast.status import RunState
from cprfast.vmm.guest import Guest

RAM_NAME = "pc.ram"


class Blob:
    """A device whose whole state is some bytes."""

    def __init__(self) -> None:
        self.data = b""

    def save_state(self) -> bytes:
        return self.data

    def load_state(self, data: bytes, version: int) -> None:
        self.data = data


def _uffd_open() -> bool:
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[userfaultfd]":
                return True
        except OSError:
            continue
    return False


class Vmm:
    """Region + guest + devices + migration: what :class:`precopy.RamHost` asks for."""

    def __init__(self, ram: int, hot: int, kind: str, start_sums: str | None = None) -> None:
        self.start_sums = start_sums
        self.region = _core.Region.create(RAM_NAME, ram)
        self.guest = Guest(kind, self.region, hot, fresh=True)  # type: ignore[arg-type]
        self.blob = Blob()
        self.devices = DeviceRegistry()
        self.devices.register("cpu", self.guest)
        self.devices.register("blob", self.blob)

    def dirty_log(self, on: bool) -> tuple[int, int] | None:
        vm = self.guest._vm
        if vm is None:
            return None
        vm.set_dirty_log(0, on)
        return (vm.fileno(), 0)

    def vm_stop(self, state: RunState) -> None:
        self.guest.pause()

    def vm_start(self, state: RunState) -> None:
        if self.start_sums:
            np.save(self.start_sums, self.region.checksums())
            self.start_sums = None
        if state == RunState.RUNNING:
            self.guest.resume()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qmp", required=True)
    ap.add_argument("--ram", type=int, default=64 << 20)
    ap.add_argument("--hot", type=int, default=16 << 20)
    ap.add_argument("--guest", default="threads")
    ap.add_argument("--incoming")
    ap.add_argument("--postmigrate-sums")
    ap.add_argument("--start-sums")
    args = ap.parse_args()

    vmm = Vmm(args.ram, args.hot, args.guest, args.start_sums)
    incoming = args.incoming is not None
    migration = MigrationState(vmm, incoming=incoming)
    precopy.register(migration, vmm)
    reboot.register(migration, vmm)

    def on_run_state(old: RunState, new: RunState) -> None:
        if new == RunState.POSTMIGRATE and args.postmigrate_sums:
            np.save(args.postmigrate_sums, vmm.region.checksums())

    migration.subscribe_run_state(on_run_state)
    if not incoming:
        vmm.guest.resume()
    elif args.incoming != "defer":
        migration.migrate_incoming(uri=args.incoming)

    server = QMPServer(migration, args.qmp, package="ram-vmm")

    def query(a: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "ram-fd": vmm.region.fileno(),
            "heartbeat": vmm.guest.heartbeat,
            "running": vmm.guest.running,
            "blob": vmm.blob.data.decode(),
            "uffd": _uffd_open(),
        }

    def set_blob(a: dict[str, Any]) -> None:
        vmm.blob.data = str(a["data"]).encode()

    def suspend(a: dict[str, Any]) -> None:
        migration._vm_stop(RunState.SUSPENDED)

    def save_sums(a: dict[str, Any]) -> None:
        np.save(str(a["path"]), vmm.region.checksums())

    server.register_command("x-query", query, blocking=False)
    server.register_command("x-set-blob", set_blob, blocking=False)
    server.register_command("x-suspend", suspend, blocking=False)
    server.register_command("x-save-checksums", save_sums)
    try:
        asyncio.run(server.serve_forever())
    finally:
        vmm.guest.close()
        vmm.region.close()


if __name__ == "__main__":
    main()
