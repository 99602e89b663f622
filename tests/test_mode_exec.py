"""cpr-exec end to end: the reference VMM exec's its successor in place (same PID), driven over QMP."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu.qmp import ExecInterruptedError
from _vmm import (
    PYTHON,
    Vmm,
    cold_checksums,
    fd_targets,
    fifo_threads,
    fill_cold,
    guest_kinds,
    ram_of,
    vmms,
    wait_until,
)

from cprfast import _core
from cprfast.vmm.cli import command

HOT = 16 << 20
MEM = "256M"
O_CLOEXEC = 0o2000000


def boot(tmp: Path, guest: str, procs: list[Vmm]) -> Vmm:
    src = Vmm(tmp, "vm", "-m", MEM, "--hot", "16M", "--guest", guest)
    procs.append(src)
    src.wait_heartbeat_moves()
    return src


def successor_argv(vm: Vmm, guest: str, incoming: str) -> list[str]:
    """The cpr-exec-command: the same VMM, by the interpreter's path (no shell, no pyenv shim)."""
    return [PYTHON, "-m", "cprfast.vmm", "-m", MEM, "--hot", "16M", "--guest", guest,
            "-qmp", f"unix:{vm.qmp_path},server=on,wait=off", "-incoming", incoming]


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a cpr-exec keeper is one, until the successor releases it)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def migrate_exec(vm: Vmm, uri: str) -> None:
    """``migrate``, then reconnect to the successor; the exec may beat the reply (the client then sees a disconnect)."""
    with contextlib.suppress(ExecInterruptedError):
        vm.cmd("migrate", uri=uri)
    vm.reconnect()


def identity(pid: int, fd: int) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/fd/{fd}")
    return st.st_dev, st.st_ino


def prepare(vm: Vmm, argv: list[str]) -> dict[str, Any]:
    vm.cmd("x-doorbell", message="before-exec")
    info = vm.guest()
    with open(f"/proc/{vm.pid}/fd/{info['console']['write-fd']}", "wb", buffering=0) as pipe:
        pipe.write(b"kept-across-exec")
    with ram_of(vm) as ram:
        fill_cold(ram, HOT)
        info["cold"] = cold_checksums(ram, HOT)
    info["ram-id"] = identity(vm.pid, info["ram"]["fd"])
    info["fds"] = fd_targets(vm.pid)
    vm.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": argv})
    return info


def check_successor(vm: Vmm, before: dict[str, Any], pid: int) -> None:
    after = vm.guest()
    assert after["pid"] == pid == vm.proc.pid  # exec, not a new process
    assert vm.status() == "running"
    assert after["heartbeat-at-start"] >= before["heartbeat"]
    assert vm.wait_heartbeat_moves() > after["heartbeat-at-start"]
    assert identity(pid, after["ram"]["fd"]) == before["ram-id"]
    with ram_of(vm) as ram:
        np.testing.assert_array_equal(cold_checksums(ram, HOT), before["cold"])
    assert after["doorbell"]["log"] == ["before-exec"]
    assert after["console"]["pipe"] == before["console"]["pipe"]
    assert vm.cmd("x-console-read")["data"] == "kept-across-exec"
    # Nothing leaked across exec: the same kinds of fds as before (state memfd and main file closed),
    # and the preserved fds are close-on-exec again.
    def kinds(targets: list[str]) -> list[str]:
        return sorted(t.split("[")[0] for t in targets)

    assert kinds(fd_targets(pid)) == kinds(before["fds"])
    for fd in (after["ram"]["fd"], after["console"]["read-fd"], after["console"]["write-fd"]):
        flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
        assert flags & O_CLOEXEC


@pytest.mark.parametrize("guest", guest_kinds())
def test_exec_file_incoming(tmp_path: Path, guest: str) -> None:
    """Successor started with -incoming file:PATH loads and resumes at once."""
    with vmms() as procs:
        vm = boot(tmp_path, guest, procs)
        state = tmp_path / "vm.state"
        before = prepare(vm, successor_argv(vm, guest, f"file:{state}"))
        observer = _core.Observer(f"/proc/{vm.pid}/fd/{before['ram']['fd']}", 0x1000)
        observer.start()
        migrate_exec(vm, f"file:{state}")
        wait_until(lambda: vm.status() == "running", what="successor running")
        time.sleep(0.05)
        report = observer.stop()
        print(f"cpr-exec {guest} {MEM}: guest pause {report.max_stall_ns / 1e3:.0f} us")
        assert report.heartbeat_monotonic
        assert vm.migrate_status()["status"] == "completed"  # the successor's incoming side
        check_successor(vm, before, vm.pid)
        vm.quit()
        assert vm.proc.returncode == 0


def test_exec_defer_then_migrate_incoming(tmp_path: Path) -> None:
    """Successor started with -incoming defer waits paused in inmigrate until migrate-incoming."""
    with vmms() as procs:
        vm = boot(tmp_path, "threads", procs)
        state = tmp_path / "vm.state"
        before = prepare(vm, successor_argv(vm, "threads", "defer"))
        migrate_exec(vm, f"file:{state}")
        assert vm.status() == "inmigrate"
        frozen = vm.guest()["heartbeat"]
        time.sleep(0.05)
        assert vm.guest()["heartbeat"] == frozen  # nobody runs the guest meanwhile
        vm.cmd("migrate-incoming", uri=f"file:{state}")
        wait_until(lambda: vm.status() == "running", what="successor running")
        assert vm.migrate_status()["status"] == "completed"
        check_successor(vm, before, vm.pid)


def _still_running(vm: Vmm, fds: list[str]) -> dict[str, Any]:
    info = vm.wait_migration("failed")
    wait_until(lambda: vm.status() == "running", what="guest running again")
    vm.wait_heartbeat_moves()
    assert fd_targets(vm.pid) == fds
    return info


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs CAP_SYS_NICE")
def test_exec_at_switchover_priority(tmp_path: Path) -> None:
    """--switchover-priority: a failed exec leaves no thread at SCHED_FIFO; a good one's successor
    inherits the priority and ends it once its guest runs."""
    prio = ["--switchover-priority", "2"]
    with vmms() as procs:
        vm = Vmm(tmp_path, "vm", "-m", MEM, "--hot", "16M", "--guest", "threads", *prio)
        procs.append(vm)
        vm.wait_heartbeat_moves()
        before = prepare(vm, ["/nonexistent/cprfast-vmm", "-incoming", "defer"])
        vm.cmd("migrate", uri=f"file:{tmp_path / 'vm.state'}")
        _still_running(vm, before["fds"])
        wait_until(lambda: fifo_threads(vm.pid) == [], what="the failed migration's worker gone")
        assert children(vm.pid) == []  # no keeper left behind: the failed exec ended it
        state = tmp_path / "vm2.state"
        vm.cmd("migrate-set-parameters", **{"cpr-exec-command": [*successor_argv(vm, "threads", f"file:{state}"), *prio]})
        migrate_exec(vm, f"file:{state}")
        wait_until(lambda: vm.status() == "running", what="successor running")
        check_successor(vm, before, vm.pid)
        assert fifo_threads(vm.pid) == []


@pytest.mark.parametrize("guest", guest_kinds())
def test_exec_lean_command_and_keeper(tmp_path: Path, guest: str) -> None:
    """cli.command()'s ``python -S -c`` successor resumes the guest and releases the predecessor's keeper."""
    with vmms() as procs:
        vm = boot(tmp_path, guest, procs)
        state = tmp_path / "vm.state"
        argv = command("-m", MEM, "--hot", "16M", "--guest", guest,
                       "-qmp", f"unix:{vm.qmp_path},server=on,wait=off", "-incoming", f"file:{state}")
        assert argv[1:3] == ["-S", "-c"]
        before = prepare(vm, argv)
        assert children(vm.pid) == []
        migrate_exec(vm, f"file:{state}")
        wait_until(lambda: vm.status() == "running", what="successor running")
        timeline = vm.guest()["timeline"]
        assert timeline["stopped"] < timeline["exec"] < timeline["main"] < timeline["resumed"]
        # The keeper (a child sharing the old address space) is gone once the successor released it.
        wait_until(lambda: children(vm.pid) == [], what="the cpr-exec keeper released")
        check_successor(vm, before, vm.pid)
        cmdline = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-S", b"-c"]
        vm.quit()
        assert vm.proc.returncode == 0


def test_exec_unwritable_main_file(tmp_path: Path) -> None:
    with vmms() as procs:
        vm = boot(tmp_path, "threads", procs)
        before = prepare(vm, successor_argv(vm, "threads", "defer"))
        vm.cmd("migrate", uri="file:/nonexistent-dir/vm.state")
        info = _still_running(vm, before["fds"])
        assert "cannot write the main channel" in info["error-desc"]


def test_exec_pause_measurements(tmp_path: Path) -> None:
    """Records the observed pause of a few cpr-exec updates of one VM (median printed; no timing asserts)."""
    pauses = []
    with vmms() as procs:
        vm = boot(tmp_path, "threads", procs)
        fd = vm.guest()["ram"]["fd"]
        observer = _core.Observer(f"/proc/{vm.pid}/fd/{fd}", 0x1000)
        for i in range(3):
            state = tmp_path / f"vm{i}.state"
            vm.cmd("migrate-set-parameters", mode="cpr-exec",
                   **{"cpr-exec-command": successor_argv(vm, "threads", f"file:{state}")})
            observer.start()
            migrate_exec(vm, f"file:{state}")
            wait_until(lambda: vm.status() == "running", what="successor running")
            time.sleep(0.05)
            pauses.append(observer.stop().max_stall_ns / 1e3)
    print(f"cpr-exec threads {MEM}: median pause {statistics.median(pauses):.0f} us of {pauses}")
    assert all(p > 0 for p in pauses)
