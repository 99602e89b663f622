"""The reference VMM on its own: command line, guests, QMP commands, embedding."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from _vmm import PYTHON, Vmm, fd_targets, guest_kinds, threads_cpus, vmms, wait_until

from cprfast.vmm import RAM_NAME, Machine
from cprfast.vmm.cli import UsageError, parse_args, parse_cpus, parse_qmp, parse_size


def test_parse_command_line() -> None:
    cfg = parse_args(["-m", "1G", "--guest", "threads", "--hot=32M", "-qmp", "unix:/tmp/x.qmp,server=on,wait=off",
                      "-incoming", "defer", "-incoming", '{"channel-type": "cpr", "addr": {}}'])
    assert (cfg.ram_size, cfg.hot_size, cfg.guest, cfg.qmp) == (1 << 30, 32 << 20, "threads", "/tmp/x.qmp")
    assert cfg.incoming == ["defer", '{"channel-type": "cpr", "addr": {}}']
    assert parse_size("512", "-m") == 512 << 20  # QEMU: no suffix means MiB
    assert parse_size("16G", "-m") == 16 << 30
    assert parse_args(["-m", "16G"]).ram_size == 16 << 30
    for bad, text in [
        (["-m", "17G"], "between 2M and 16G"),
        (["-m", "lots"], "bad size"),
        (["--guest", "xen"], "kvm, threads or auto"),
        (["-m"], "needs a value"),
        (["-display", "none"], "unknown option"),
        (["--vcpu-cpus", "1-"], "bad CPU list"),
        (["--vcpu-cpus", "x"], "bad CPU list"),
        (["--switchover-priority", "0"], "1..99"),
        (["--switchover-priority", "high"], "1..99"),
    ]:
        with pytest.raises(UsageError, match=text):
            parse_args(bad)
    assert parse_cpus("3") == (3,) and parse_cpus("2,0-1,2") == (0, 1, 2)
    assert parse_args(["--vcpu-cpus", "1"]).vcpu_cpus == (1,)
    assert parse_args(["--switchover-priority", "1"]).switchover_priority == 1
    with pytest.raises(UsageError, match="only unix"):
        parse_qmp("tcp:localhost:4444,server=on")
    with pytest.raises(UsageError, match="wait=on"):
        parse_qmp("unix:/tmp/q,server=on,wait=on")


def test_bad_command_lines_exit_with_a_message(tmp_path: Path) -> None:
    for argv, text in [
        (["-m", "99G"], "between 2M and 16G"),
        (["-incoming", "defer", "-incoming", "unix:/tmp/x"], "exclude each other"),
        (["-incoming", f'{{"channel-type": "cpr", "addr": {{"transport": "socket", "type": "unix", "path": "{tmp_path}/c"}}}}'],
         "needs a main channel or -incoming defer"),
    ]:
        proc = subprocess.run([PYTHON, "-m", "cprfast.vmm", *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert text in proc.stderr


@pytest.mark.parametrize("guest", guest_kinds())
def test_guest_runs_and_stops_over_qmp(tmp_path: Path, guest: str) -> None:
    with vmms() as procs:
        vm = Vmm(tmp_path, "vm", "-m", "64M", "--hot", "8M", "--guest", guest)
        procs.append(vm)
        vm.wait_heartbeat_moves()
        info = vm.guest()
        assert info["kind"] == guest and info["running"] is True
        assert info["ram"] == {"name": RAM_NAME, "size": 64 << 20, "fd": info["ram"]["fd"]}
        assert Path(f"/proc/{vm.pid}/fd/{info['ram']['fd']}").resolve().name.startswith("memfd:pc.ram")
        assert vm.status() == "running"
        vm.cmd("stop")
        assert vm.status() == "paused"
        frozen = vm.guest()["heartbeat"]
        time.sleep(0.05)
        assert vm.guest()["heartbeat"] == frozen
        vm.cmd("cont")
        assert vm.wait_heartbeat_moves() > frozen
        assert vm.cmd("x-doorbell", message="hi")["rings"] == 1
        assert vm.cmd("x-console-write", data="echo")["written"] == 4
        assert vm.cmd("x-console-read")["data"] == "echo"
        assert "x-query-guest" in [c["name"] for c in vm.cmd("query-commands")]
        vm.quit()
        assert vm.proc.returncode == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs at least two CPUs")
@pytest.mark.parametrize("guest", guest_kinds())
def test_vcpu_pinned_and_vmm_kept_off_its_cpu(tmp_path: Path, guest: str) -> None:
    """--vcpu-cpus: the guest's thread runs only there, every other VMM thread elsewhere."""
    cpus = sorted(os.sched_getaffinity(0))
    with vmms() as procs:
        vm = Vmm(tmp_path, "vm", "-m", "64M", "--hot", "8M", "--guest", guest, "--vcpu-cpus", str(cpus[-1]))
        procs.append(vm)
        vm.wait_heartbeat_moves()
        # (KVM's own kernel worker, started by the vCPU thread's first KVM_RUN, is not ours to place.)
        threads = {n: c for n, c in threads_cpus(vm.pid).items() if not n.startswith("kvm-")}
        guest_thread = "cprfast-vcpu" if guest == "kvm" else "cprfast-guest"
        assert threads.pop(guest_thread) == {cpus[-1]}
        assert threads and all(allowed == set(cpus[:-1]) for allowed in threads.values()), threads
    argv = [PYTHON, "-m", "cprfast.vmm", "-m", "64M", "--guest", guest, "--vcpu-cpus", "1023"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "sched_setaffinity([1023])" in proc.stderr, proc.stderr


def test_auto_guest_follows_the_probe(tmp_path: Path) -> None:
    from cprfast import _core

    with vmms() as procs:
        vm = Vmm(tmp_path, "vm", "-m", "64M", "--hot", "8M")
        procs.append(vm)
        assert vm.guest()["kind"] == ("kvm" if _core.probe_kvm()["available"] else "threads")


def test_embedded_machine_and_cpr_exec_state() -> None:
    """The embedding API in one process: a Machine, its CPR state, and its devices' fds."""
    machine = Machine(32 << 20, hot_size=4 << 20, guest="threads")
    try:
        machine.create_devices()
        machine.attach_migration("running")
        machine.resume_loaded("running")
        wait_until(lambda: machine.guest.heartbeat > 0, what="heartbeat")
        assert machine.cpr.find_fd(RAM_NAME, 0) is not None
        assert machine.console is not None
        assert machine.cpr.find_fd("console", 0) == machine.console.read_fd
        assert machine.migration is not None and machine.migration.run_state == "running"
        machine.migration.stop()
        assert machine.guest.running is False and machine.heartbeat_at_stop == machine.guest.heartbeat
    finally:
        machine.close()


def test_no_fd_leak_over_stop_cont(tmp_path: Path) -> None:
    with vmms() as procs:
        vm = Vmm(tmp_path, "vm", "-m", "64M", "--hot", "8M", "--guest", "threads")
        procs.append(vm)
        vm.wait_heartbeat_moves()
        before = fd_targets(vm.pid)
        for _ in range(3):
            vm.cmd("stop")
            vm.cmd("cont")
        assert fd_targets(vm.pid) == before


def test_incoming_state_without_ram_or_console_is_refused() -> None:
    """A target must not start a blank guest (or an empty console) in place of the live one."""
    from cprfast import _core
    from cprfast.cpr_state import CprState
    from cprfast.errors import CprError
    from cprfast.vmm.devices import Console

    with CprState() as state, pytest.raises(CprError, match="no guest RAM"):
        Machine(4 << 20, guest="threads", cpr=state)
    with CprState() as state, _core.Region.create(RAM_NAME, 4 << 20) as ram:
        state.save_fd(RAM_NAME, 0, ram.fileno())
        with pytest.raises(CprError, match="no console pipe"):
            Console(state, adopt=True)
        assert Console(state).read() == b""  # a fresh machine makes its own pipe


def test_fault_spec_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``x-fault`` / CPRFAST_VMM_FAULT: an unknown phase or action is refused and leaves no fault set."""
    from cprfast.vmm import fault

    monkeypatch.delenv(fault.FAULT_ENV, raising=False)
    for bad in ("nowhere:kill", "setup:explode"):
        with pytest.raises(ValueError, match="phase must be one of"):
            fault.inject(bad)
        assert fault.FAULT_ENV not in os.environ
    fault.inject("device-save:kill")
    fault.point("device-load")  # another phase: nothing happens
    fault.inject("")
    assert fault.FAULT_ENV not in os.environ
