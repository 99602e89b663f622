"""The fault-injection matrix (issue 8): every mode, every phase a fault can hit, all automated.

Faults are placed deterministically by the reference VMM's fault hook
(``CPRFAST_VMM_FAULT`` at start-up or QMP ``x-fault``: ``PHASE:kill|stop|hold``),
not by timers. After every cell the surviving side is checked:

- the guest runs on exactly one side (its heartbeat advances there; the other
  side is dead or its guest is not running);
- its memory is intact (checksums of the cold pages, filled with a pattern at boot);
- ``query-migrate`` there says failed (with ``error-desc``) or cancelled;
- no fd and no mapping leaked (``/proc/PID/fd`` and the non-library mappings of
  ``/proc/PID/maps`` as before the cell).

One booted guest per kind is reused across all cells, so each cell's migration
starts from the state the previous fault left (the next migration from that
state is the next cell), and each mode ends with a migration that succeeds,
whose target is the source of the next mode's cells.

Not cells, and why: killing a cpr-exec successor (it *is* the source process:
there is no second side, as in QEMU); cancelling in a status a mode only passes
through with nothing to wait for and no VMM hook in it (cpr-transfer's active,
cpr-exec's active and device, cpr-reboot's active); the cpr stream's bytes (no
checksum in QEMU's format: the fuzz targets cover it, and a target whose state
lacks guest RAM or the console pipe refuses to start, see ``test_vmm``).

One cell deviates: normal mode has no return path (as QEMU without one), so a
target killed after the last byte leaves the source completed, not failed; the
``kill-target-after-last-byte`` cell checks that ``cont`` resumes it there intact.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _vmm import (
    PYTHON,
    Vmm,
    channel,
    cold_checksums,
    fd_targets,
    fill_cold,
    listening_socket,
    ram_of,
    wait_until,
)
from qemu.qmp import ExecInterruptedError
from qemu_runner import close_thread_loop

from cprfast import _core

MEM = "64M"
HOT = 8 << 20
KVM = _core.probe_kvm()
KINDS = ["threads", pytest.param("kvm", marks=pytest.mark.skipif(not KVM["available"], reason=f"KVM: {KVM['detail']}"))]


@pytest.fixture(scope="module", autouse=True)
def _qmp_loop() -> Iterator[None]:
    """qemu.qmp's loop is closed once, after every source of the module is gone."""
    yield
    close_thread_loop()


# --------------------------------------------------------------------------- the surviving side


def mappings(pid: int) -> collections.Counter[str]:
    """What a process maps besides libraries and anonymous memory (memfds, KVM, files)."""
    out: collections.Counter[str] = collections.Counter()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            path = parts[5].strip() if len(parts) == 6 else ""
            if path and not path.startswith("[") and ".so" not in path:
                out[path] += 1
    return out


def assert_intact(vm: Vmm, cold: Any, before: tuple[list[str], collections.Counter[str]]) -> None:
    """The guest runs here with its cold memory unchanged, and nothing leaked since ``before``."""
    vm.wait_heartbeat_moves()
    with ram_of(vm) as ram:
        np.testing.assert_array_equal(cold_checksums(ram, HOT), cold)
    wait_until(lambda: fd_targets(vm.pid) == before[0], what="no fd leaked")
    assert mappings(vm.pid) == before[1]


class Source:
    """A booted VMM whose guest the matrix must never lose, with what it looked like before a cell."""

    def __init__(self, tmp: Path, guest: str, name: str = "src") -> None:
        self.tmp, self.guest_kind, self.count = tmp, guest, 0
        self.vm = self._boot(name)
        with ram_of(self.vm) as ram:
            fill_cold(ram, HOT)
            self.cold = cold_checksums(ram, HOT)
        self.others: list[Vmm] = []

    def _boot(self, name: str) -> Vmm:
        vm = Vmm(self.tmp, name, "-m", MEM, "--hot", "8M", "--guest", self.guest_kind)
        vm.wait_heartbeat_moves()
        return vm

    def path(self, what: str) -> Path:
        self.count += 1
        return self.tmp / f"{what}{self.count}"

    def snapshot(self) -> tuple[list[str], collections.Counter[str]]:
        """Health between cells, then the fds and mappings to compare after the next one."""
        vm = self.vm
        assert vm.status() == "running", vm.log()
        vm.wait_heartbeat_moves()
        return fd_targets(vm.pid), mappings(vm.pid)

    def survived(
        self, before: tuple[list[str], collections.Counter[str]], status: str, error: str | None = None
    ) -> dict[str, Any]:
        """The cell's checks on the source side: the guest runs here, intact, error reported, nothing leaked."""
        vm = self.vm
        # (completed is no end here: a failed exec goes completed -> failed)
        info = vm.wait_migration(status, *({"failed", "cancelled"} - {status}))
        assert info["status"] == status, (info, vm.log()[-3000:])
        if status == "failed":
            assert error is not None and error in info["error-desc"], info
        wait_until(lambda: vm.status() == "running", what="source guest running again")
        assert_intact(vm, self.cold, before)
        return info

    def target(self, name: str, *incoming: str, fault: str | None = None, pass_fds: tuple[int, ...] = ()) -> Vmm:
        env = dict(os.environ)
        if fault is not None:
            env["CPRFAST_VMM_FAULT"] = fault
        vm = Vmm(self.tmp, f"{name}{self.count}", "-m", MEM, "--hot", "8M", "--guest", self.guest_kind,
                 *[a for spec in incoming for a in ("-incoming", spec)], pass_fds=pass_fds, env=env)
        self.others.append(vm)
        return vm

    def close(self) -> None:
        for vm in [self.vm, *self.others]:
            if vm.proc.poll() is None:
                vm.proc.kill()
            vm.close()


def guest_stays_put(vm: Vmm, source: Vmm, *, shared: bool = False) -> None:
    """The other side does not run the guest: dead, or alive with its vCPU stopped while the
    source's guest moves (and, unless the two share guest RAM, its heartbeat still)."""
    if vm.proc.poll() is not None:
        return
    first = vm.guest()
    source.wait_heartbeat_moves()
    later = vm.guest()
    assert not later["running"], later
    assert shared or later["heartbeat"] == first["heartbeat"], later


def wait_fault(vm: Vmm, phase: str) -> None:
    """Wait until ``vm`` reached the injected fault (it logs the line first)."""
    wait_until(lambda: f"fault {phase}" in vm.log() or vm.proc.poll() is not None, what=f"fault at {phase}")


def release(vm: Vmm) -> None:
    """Let a held VMM go on."""
    os.kill(vm.pid, signal.SIGUSR1)


def raw_qmp(vm: Vmm, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """One command on a connection of its own, with plain sockets (the first connection's client
    is busy, and qemu.qmp runs one event loop): for a ``migrate`` the test will hold."""
    with socket.socket(socket.AF_UNIX) as sock, sock.makefile("rwb") as f:
        sock.connect(str(vm.qmp_path))
        replies = 0
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": name, "arguments": args}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
        while line := f.readline():
            msg: dict[str, Any] = json.loads(line)
            if "return" in msg or "error" in msg:
                replies += 1
                if replies == 2:
                    return msg
    raise AssertionError(f"{vm.name}: QMP connection closed before {name} answered")


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


# --------------------------------------------------------------------------- main-stream sections


def stream_pieces(data: bytes, pos: int = 12) -> dict[str, tuple[int, int]] | None:
    """Offsets of a main stream's header, device sections and end marker from ``pos`` on
    (None: not all here yet)."""
    if len(data) < 12:
        return None
    out = {"header": (0, 12)}
    while pos < len(data):
        if data[pos] == 0xFF:
            if len(data) < pos + 9:
                return None
            out["end"] = (pos, pos + 9)
            return out
        if len(data) < pos + 3:
            return None
        (nlen,) = struct.unpack_from(">H", data, pos + 1)
        if len(data) < pos + 3 + nlen + 16:
            return None
        name = data[pos + 3 : pos + 3 + nlen].decode()
        (length,) = struct.unpack_from(">Q", data, pos + 3 + nlen + 8)
        end = pos + 3 + nlen + 16 + length + 4
        if len(data) < end:
            return None
        out[name] = (pos, end)
        pos = end
    return None


def flip_at(piece: str, pieces: dict[str, tuple[int, int]]) -> int:
    """The byte to corrupt in ``piece``: a magic byte, the end's section count, or a section's last payload byte."""
    start, end = pieces[piece]
    return {"header": start + 2, "end": start + 4}.get(piece, end - 5)


class Relay:
    """A main-channel man in the middle. With ``change``: reads the whole (device-only) stream,
    then forwards what ``change`` makes of it (None: half of it, then closes both ends). With
    ``cut`` (a normal migration's long stream): forwards it as it comes, flipping the byte at
    ``cut`` if ``flip``, else closing both ends there."""

    def __init__(
        self,
        path: Path,
        target: Path,
        change: Callable[[bytearray], bytes | None] | None = None,
        *,
        cut: int = 0,
        flip: bool = False,
    ) -> None:
        self.target, self.change, self.cut, self.flip = target, change, cut, flip
        self.listener = listening_socket(path)
        self.listener.settimeout(60)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        a, _ = self.listener.accept()
        with a, socket.socket(socket.AF_UNIX) as b:
            b.connect(str(self.target))
            if self.change is None:
                self._stream(a, b)
                return
            data = bytearray()
            while stream_pieces(bytes(data)) is None and (chunk := a.recv(65536)):
                data += chunk
            out = self.change(data)
            if out is None:  # close the channel mid-stream
                b.sendall(bytes(data[: len(data) // 2]))
                return
            b.sendall(out)
            with contextlib.suppress(OSError):
                while chunk := b.recv(1):
                    a.sendall(chunk)

    def _stream(self, a: socket.socket, b: socket.socket) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while chunk := a.recv(65536):
                if sent <= self.cut < sent + len(chunk):
                    if not self.flip:
                        b.sendall(chunk[: self.cut - sent])
                        return
                    changed = bytearray(chunk)
                    changed[self.cut - sent] ^= 0xFF
                    chunk = bytes(changed)
                b.sendall(chunk)
                sent += len(chunk)

    def close(self) -> None:
        self.thread.join(60)
        self.listener.close()


# --------------------------------------------------------------------------- cpr-transfer


TRANSFER_CELLS = [
    "kill-before-cpr-connect",
    "kill-after-ram-fds",
    "kill-after-device-fds",
    "kill-during-device-load",
    "kill-after-load-before-resume",
    "notifier-veto",
    "cancel-in-setup",
    "cancel-in-device",
    "close-main-mid-stream",
    "corrupt-header",
    "corrupt-cprfast/run-state",
    "corrupt-cpu",
    "corrupt-doorbell",
    "corrupt-end",
    "kill-source-after-hand-over",
]
KVM_TRANSFER_CELLS = ["kill-during-device-load", "cancel-in-device", "kill-after-load-before-resume"]


@pytest.fixture(scope="module", params=KINDS)
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """One guest per kind for the whole matrix: each mode's cells, then its successful
    migration, whose target is the source of the next mode's cells."""
    src = Source(tmp_path_factory.mktemp(f"matrix-{request.param}"), request.param)
    try:
        yield src
    finally:
        src.close()


def threads_only(src: Source) -> None:
    if src.guest_kind != "threads":
        pytest.skip("threads guest only: the mode has no KVM-specific path")


def moved_to(src: Source, dst: Vmm) -> None:
    """The guest now lives in ``dst``: it becomes the source, the old process goes."""
    old = src.vm
    src.others.remove(dst)
    src.vm = dst
    old.quit()


def transfer_target(src: Source, fault: str | None, *, defer: bool = False) -> tuple[Vmm, Path, Path]:
    """A cpr-transfer target on a pre-listened cpr socket; returns it with its main and cpr paths."""
    cpr_path, main_path = src.path("cpr.sock"), src.tmp / f"main{src.count}.sock"
    sock = listening_socket(cpr_path)
    cpr = json.dumps({"channel-type": "cpr", "addr": {"transport": "socket", "type": "fd", "str": str(sock.fileno())}})
    try:
        dst = src.target("dst", "defer" if defer else channel("main", main_path), cpr, fault=fault,
                         pass_fds=(sock.fileno(),))
    finally:
        sock.close()
    return dst, main_path, cpr_path


def transfer_channels(main: Path, cpr: Path) -> list[dict[str, Any]]:
    return [json.loads(channel("main", main)), json.loads(channel("cpr", cpr))]


@pytest.mark.parametrize("cell", TRANSFER_CELLS)
def test_cpr_transfer(source: Source, cell: str) -> None:
    src = source
    if src.guest_kind == "kvm" and cell not in KVM_TRANSFER_CELLS:
        pytest.skip("the KVM guest runs a subset: the other cells exercise no KVM-specific path")
    vm = src.vm
    vm.cmd("migrate-set-parameters", mode="cpr-transfer")
    fault = {
        "kill-before-cpr-connect": "cpr-accept:kill",
        "kill-after-ram-fds": "ram-received:kill",
        "kill-after-device-fds": "fds-received:kill",
        "kill-during-device-load": "device-load:kill",
        "kill-after-load-before-resume": "loaded:kill",
        "cancel-in-device": "fds-received:hold",
        "kill-source-after-hand-over": "fds-received:hold",
    }.get(cell)
    dst, main_path, cpr_path = transfer_target(src, fault)
    before = src.snapshot()  # while the target starts
    chans = transfer_channels(main_path, cpr_path)

    if cell == "kill-before-cpr-connect":
        dst.proc.wait(60)
        reply = vm.raw("migrate", channels=chans)
        assert "cannot connect the cpr channel" in reply["error"]["desc"]
        src.survived(before, "failed", "cannot connect the cpr channel")
    elif cell == "kill-after-ram-fds":
        reply = vm.raw("migrate", channels=chans)
        assert "target closed the connection before adopted guest RAM" in reply["error"]["desc"], reply
        src.survived(before, "failed", "target closed the connection")
    elif cell in ("kill-after-device-fds", "kill-during-device-load", "kill-after-load-before-resume"):
        vm.cmd("migrate", channels=chans)
        src.survived(before, "failed", "target closed the connection before confirmed it runs the guest")
        assert dst.proc.wait(60) == -signal.SIGKILL
    elif cell == "notifier-veto":
        vm.cmd("x-doorbell", hold="a ring is in flight")
        try:
            reply = vm.raw("migrate", channels=chans)
        finally:
            vm.cmd("x-doorbell", hold=None)
        assert reply["error"]["desc"] == "doorbell: a ring is in flight"
        src.survived(before, "failed", "doorbell: a ring is in flight")
        assert dst.proc.wait(60) == 1
    elif cell == "cancel-in-setup":
        reply = cancel_while_held(src, "setup", {"channels": chans}, "setup")
        assert "error" in reply, reply  # cancelled inside the migrate command (before the hand-over)
        src.survived(before, "cancelled")
        assert dst.proc.wait(60) == 1  # the target saw the hand-over end and gave up
    elif cell == "cancel-in-device":
        vm.cmd("migrate", channels=chans)
        wait_fault(dst, "fds-received")
        assert vm.wait_migration("device")["status"] == "device"  # waiting for the target's answer
        vm.cmd("migrate_cancel")
        src.survived(before, "cancelled")
        release(dst)  # it has every fd and the whole device state: it must still not resume
        assert dst.proc.wait(60) == 1
        # Refused by the answer that could not be delivered, or before it: the guest ran on at the
        # source, so the memory no longer matches the vCPU state the target received.
        assert "the source gave up before the guest resumed here" in dst.log() or "memory was not preserved" in dst.log()
    elif cell == "kill-source-after-hand-over":
        vm.cmd("migrate", channels=chans)
        wait_fault(dst, "fds-received")
        vm.kill()
        release(dst)
        wait_until(lambda: dst.status() == "running", what="target running the guest")
        dst.wait_heartbeat_moves()
        with ram_of(dst) as ram:
            np.testing.assert_array_equal(cold_checksums(ram, HOT), src.cold)
        assert "died after the hand-over; the guest runs here" in dst.log()
        src.others.remove(dst)
        src.vm = dst  # the guest lives on in the target: it is the source of what follows
        dst.cmd("migrate-set-parameters", mode="cpr-transfer")
        return
    else:
        relay_path = src.tmp / f"relay{src.count}.sock"
        piece = cell.removeprefix("corrupt-")

        def change(data: bytearray) -> bytes | None:
            if cell == "close-main-mid-stream":
                return None
            pieces = stream_pieces(bytes(data))
            assert pieces is not None and piece in pieces, pieces
            data[flip_at(piece, pieces)] ^= 0xFF
            return bytes(data)

        relay = Relay(relay_path, main_path, change)
        try:
            vm.cmd("migrate", channels=transfer_channels(relay_path, cpr_path))
            assert dst.proc.wait(60) == 1
        finally:
            relay.close()
        src.survived(before, "failed", "target closed the connection")
        if cell != "close-main-mid-stream":
            assert "corrupt" in dst.log() or "mismatch" in dst.log() or "bad" in dst.log(), dst.log()
    guest_stays_put(dst, vm, shared=True)


def test_cpr_transfer_then_succeeds(source: Source) -> None:
    """After every fault above, a migration from that state succeeds."""
    src = source
    before = src.snapshot()
    dst, main_path, cpr_path = transfer_target(src, None)
    src.vm.cmd("migrate", channels=transfer_channels(main_path, cpr_path))
    assert src.vm.wait_migration("completed", "failed")["status"] == "completed"
    wait_until(lambda: dst.status() == "running", what="target running")
    dst.wait_heartbeat_moves()
    with ram_of(dst) as ram:
        np.testing.assert_array_equal(cold_checksums(ram, HOT), src.cold)
    guest_stays_put(src.vm, dst, shared=True)
    assert fd_targets(src.vm.pid) == before[0]
    moved_to(src, dst)


# --------------------------------------------------------------------------- disk full


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny tmpfs with not a byte left: every file channel on it hits ENOSPC."""
    mnt = tmp_path_factory.mktemp("full")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\1" * 4096)
        os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --------------------------------------------------------------------------- cells shared by the modes


def cancel_while_held(src: Source, phase: str, migrate: dict[str, Any], status: str) -> dict[str, Any]:
    """Hold the source at ``phase`` (``migrate`` sent on a second monitor), check ``status``, cancel, release."""
    vm = src.vm
    line = f"fault {phase}:hold"
    held = vm.log().count(line)
    vm.cmd("x-fault", spec=f"{phase}:hold")
    t, reply = in_background(lambda: raw_qmp(vm, "migrate", migrate))
    wait_until(lambda: vm.log().count(line) > held, what=f"held at {phase}")
    vm.cmd("x-fault", spec="")
    assert vm.migrate_status()["status"] == status
    vm.cmd("migrate_cancel")
    release(vm)
    t.join(60)
    return dict(reply[0])


def veto(src: Source, migrate: dict[str, Any]) -> None:
    vm = src.vm
    vm.cmd("x-doorbell", hold="a ring is in flight")
    try:
        reply = vm.raw("migrate", **migrate)
    finally:
        vm.cmd("x-doorbell", hold=None)
    assert reply["error"]["desc"] == "doorbell: a ring is in flight"


# --------------------------------------------------------------------------- normal (precopy)


NORMAL_CELLS = [
    "no-target",
    "kill-target-mid-stream",
    "kill-target-after-last-byte",
    "exec-channel-fails",
    "notifier-veto",
    "cancel-in-setup",
    "cancel-in-active",
    "cancel-in-device",
    "disk-full",
    "close-main-mid-stream",
    "corrupt-ram",
]
KVM_NORMAL_CELLS = ["kill-target-mid-stream", "cancel-in-active", "cancel-in-device"]


def normal_target(src: Source, fault: str | None = None) -> tuple[Vmm, Path]:
    path = src.path("main.sock")
    dst = src.target("dst", f"unix:{path}", fault=fault)
    wait_until(lambda: os.path.exists(path) or dst.proc.poll() is not None, what="target listening")
    return dst, path


def never_converges(vm: Vmm) -> None:
    """A zero downtime limit: the migration stays active while the guest writes."""
    vm.cmd("migrate-set-parameters", **{"downtime-limit": 0})


def converges(vm: Vmm) -> None:
    vm.cmd("migrate-set-parameters", **{"downtime-limit": 300})


@pytest.mark.parametrize("cell", NORMAL_CELLS)
def test_normal(source: Source, cell: str, full_disk: Path) -> None:
    src = source
    if src.guest_kind == "kvm" and cell not in KVM_NORMAL_CELLS:
        pytest.skip("the KVM guest runs a subset: the other cells exercise no KVM-specific path")
    vm = src.vm
    vm.cmd("migrate-set-parameters", mode="normal")
    before = src.snapshot()
    dst: Vmm | None = None
    if cell == "no-target":
        vm.cmd("migrate", uri=f"unix:{src.path('nobody.sock')}")
        src.survived(before, "failed", "No such file")
    elif cell in ("kill-target-mid-stream", "cancel-in-active"):
        dst, path = normal_target(src)
        never_converges(vm)
        try:
            vm.cmd("migrate", uri=f"unix:{path}")
            wait_until(lambda: vm.migrate_status().get("ram", {}).get("dirty-sync-count", 0) >= 2, what="iterating")
            assert vm.migrate_status()["status"] == "active"
            if cell == "cancel-in-active":
                vm.cmd("migrate_cancel")
            else:
                dst.kill()
        finally:
            converges(vm)
        if cell == "cancel-in-active":
            src.survived(before, "cancelled")
        else:
            src.survived(before, "failed", "")
    elif cell == "kill-target-after-last-byte":
        # No return path (as QEMU without one): the source completes; cont resumes the guest there.
        dst, path = normal_target(src, "device-load:kill")
        vm.cmd("migrate", uri=f"unix:{path}")
        assert vm.wait_migration("completed", "failed")["status"] == "completed"
        assert dst.proc.wait(60) == -signal.SIGKILL
        assert vm.status() == "postmigrate"
        vm.cmd("cont")
        wait_until(lambda: vm.status() == "running", what="source running after cont")
        assert_intact(vm, src.cold, before)
    elif cell == "exec-channel-fails":
        vm.cmd("migrate", uri="exec:exit 3")
        src.survived(before, "failed", "exited with status 3")
    elif cell == "notifier-veto":
        veto(src, {"uri": f"unix:{src.path('veto.sock')}"})
        src.survived(before, "failed", "doorbell: a ring is in flight")
    elif cell == "cancel-in-setup":
        reply = cancel_while_held(src, "setup", {"uri": f"unix:{src.path('nobody.sock')}"}, "setup")
        assert "return" in reply, reply  # migrate returned: the worker saw the cancel
        src.survived(before, "cancelled")
    elif cell == "cancel-in-device":
        dst, path = normal_target(src)
        cancel_while_held(src, "device-save", {"uri": f"unix:{path}"}, "device")
        src.survived(before, "cancelled")
        wait_until(lambda: dst.migrate_status().get("status") == "failed", what="target's load failed")
    elif cell == "disk-full":
        vm.cmd("migrate", uri=f"file:{full_disk}/vm.mig")
        src.survived(before, "failed", "No space left")
    else:  # close-main-mid-stream, corrupt-ram: 1 MiB into the first RAM pass
        dst, path = normal_target(src)
        relay_path = src.path("relay.sock")
        relay = Relay(relay_path, path, cut=1 << 20, flip=cell == "corrupt-ram")
        try:
            vm.cmd("migrate", uri=f"unix:{relay_path}")
            src.survived(before, "failed", "")
        finally:
            relay.close()
        wait_until(lambda: dst.migrate_status().get("status") == "failed", what="target's load failed")
        assert dst.migrate_status()["error-desc"]
    if dst is not None:
        guest_stays_put(dst, vm)
        dst.kill()


def test_normal_then_succeeds(source: Source) -> None:
    src = source
    src.vm.cmd("migrate-set-parameters", mode="normal")
    dst, path = normal_target(src)
    src.vm.cmd("migrate", uri=f"unix:{path}")
    assert src.vm.wait_migration("completed", "failed")["status"] == "completed"
    wait_until(lambda: dst.status() == "running", what="target running")
    dst.wait_heartbeat_moves()
    with ram_of(dst) as ram:
        np.testing.assert_array_equal(cold_checksums(ram, HOT), src.cold)
    guest_stays_put(src.vm, dst)
    moved_to(src, dst)


# --------------------------------------------------------------------------- cpr-exec


EXEC_CELLS = ["exec-fails", "notifier-veto", "cancel-in-setup", "disk-full"]


def successor(src: Source, incoming: str) -> list[str]:
    return [PYTHON, "-m", "cprfast.vmm", "-m", MEM, "--hot", "8M", "--guest", src.guest_kind,
            "-qmp", f"unix:{src.vm.qmp_path},server=on,wait=off", "-incoming", incoming]


@pytest.mark.parametrize("cell", EXEC_CELLS)
def test_cpr_exec(source: Source, cell: str, full_disk: Path) -> None:
    src = source
    threads_only(src)
    vm = src.vm
    main = src.path("vm.state")
    command = ["/nonexistent/cprfast-vmm"] if cell == "exec-fails" else successor(src, f"file:{main}")
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": command})
    before = src.snapshot()
    if cell == "exec-fails":
        vm.cmd("migrate", uri=f"file:{main}")
        src.survived(before, "failed", "execvp /nonexistent/cprfast-vmm failed: No such file or directory")
        console = vm.guest()["console"]
        for fd in (console["read-fd"], console["write-fd"]):  # close-on-exec again
            flags = int(Path(f"/proc/{vm.pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
            assert flags & os.O_CLOEXEC
    elif cell == "notifier-veto":
        veto(src, {"uri": f"file:{main}"})
        src.survived(before, "failed", "doorbell: a ring is in flight")
    elif cell == "cancel-in-setup":
        reply = cancel_while_held(src, "setup", {"uri": f"file:{main}"}, "setup")
        assert "return" in reply, reply
        src.survived(before, "cancelled")
    else:
        vm.cmd("migrate", uri=f"file:{full_disk}/vm.state")
        src.survived(before, "failed", "No space left")
    assert vm.guest()["pid"] == vm.pid  # never exec'd


def test_cpr_exec_then_succeeds(source: Source) -> None:
    src = source
    threads_only(src)
    vm = src.vm
    main = src.path("vm.state")
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": successor(src, f"file:{main}")})
    with contextlib.suppress(ExecInterruptedError):
        vm.cmd("migrate", uri=f"file:{main}")
    vm.reconnect()
    wait_until(lambda: vm.status() == "running", what="successor running")
    vm.wait_heartbeat_moves()
    assert vm.guest()["pid"] == vm.pid
    with ram_of(vm) as ram:
        np.testing.assert_array_equal(cold_checksums(ram, HOT), src.cold)


# --------------------------------------------------------------------------- cpr-reboot


REBOOT_CELLS = ["notifier-veto", "cancel-in-setup", "cancel-in-device", "disk-full"]
REBOOT_PIECES = ["ram-pointer", "ram-page", "doorbell"]
"""The RAM section's pieces, and one device section (every device section and the header and
end marker are corrupted one by one in the cpr-transfer cells: the same reader)."""


@pytest.mark.parametrize("cell", REBOOT_CELLS)
def test_cpr_reboot(source: Source, cell: str, full_disk: Path) -> None:
    src = source
    threads_only(src)
    src.vm.cmd("migrate-set-parameters", mode="cpr-reboot")
    save = f"file:{src.path('vm.sav')}"
    before = src.snapshot()
    if cell == "notifier-veto":
        veto(src, {"uri": save})
        src.survived(before, "failed", "doorbell: a ring is in flight")
    elif cell in ("cancel-in-setup", "cancel-in-device"):
        phase, status = ("setup", "setup") if cell == "cancel-in-setup" else ("device-save", "device")
        reply = cancel_while_held(src, phase, {"uri": save}, status)
        assert "return" in reply, reply
        src.survived(before, "cancelled")
    else:
        src.vm.cmd("migrate", uri=f"file:{full_disk}/vm.sav")
        src.survived(before, "failed", "No space left")


@pytest.fixture(scope="module")
def reboot_saved(source: Source) -> tuple[Source, Path]:
    """The source saved (after every cell above) and gone, as before a host reboot."""
    src = source
    threads_only(src)
    src.vm.cmd("migrate-set-parameters", mode="cpr-reboot")
    path = src.path("good.sav")
    src.vm.cmd("migrate", uri=f"file:{path}")
    assert src.vm.wait_migration("completed", "failed")["status"] == "completed"
    src.vm.quit()
    return src, path


def reboot_pieces(data: bytes) -> dict[str, int]:
    """The byte to corrupt in each piece of a cpr-reboot save."""
    pointer = data.index(b"CPRFMAPD")
    (at,) = struct.unpack_from(">Q", data, pointer + 8)
    mapped = data.index(b"CPRMRAM1", at)
    (pages,) = struct.unpack_from("<Q", data, mapped + 40)
    devices = at + _core.mapped_file_size(int(MEM[:-1]) << 20, 4096)
    pieces = stream_pieces(data, devices)
    assert pieces is not None, "no device sections after the mapped-ram save"
    out = {name: flip_at(name, pieces) for name in pieces}
    out["ram-pointer"] = pointer + 3
    out["ram-page"] = mapped + pages + (1 << 20) + HOT + 100  # a cold page's data
    return out


@pytest.mark.parametrize("piece", REBOOT_PIECES)
def test_cpr_reboot_corrupt_save(reboot_saved: tuple[Source, Path], piece: str) -> None:
    """One byte of each piece of the save flipped: the restore refuses it and starts no guest."""
    src, good = reboot_saved
    data = bytearray(good.read_bytes())
    data[reboot_pieces(bytes(data))[piece]] ^= 0xFF
    bad = src.path("bad.sav")
    bad.write_bytes(bytes(data))
    dst = src.target("restore", "defer")
    dst.cmd("migrate-set-parameters", mode="cpr-reboot")
    fds = fd_targets(dst.pid)
    dst.cmd("migrate-incoming", uri=f"file:{bad}")
    info = dst.wait_migration("failed", "completed")
    assert info["status"] == "failed" and info["error-desc"], info
    assert dst.status() == "inmigrate" and not dst.guest()["running"]
    assert fd_targets(dst.pid) == fds
    dst.kill()


def test_cpr_reboot_then_succeeds(reboot_saved: tuple[Source, Path]) -> None:
    src, good = reboot_saved
    dst = src.target("restore", "defer")
    dst.cmd("migrate-set-parameters", mode="cpr-reboot")
    dst.cmd("migrate-incoming", uri=f"file:{good}")
    assert dst.wait_migration("failed", "completed")["status"] == "completed"
    wait_until(lambda: dst.status() == "running", what="restored guest running")
    dst.wait_heartbeat_moves()
    with ram_of(dst) as ram:
        np.testing.assert_array_equal(cold_checksums(ram, HOT), src.cold)
    src.others.remove(dst)
    src.vm = dst
