"""The KVM VM, vCPU thread and tiny guest on the real /dev/kvm.

The heartbeat and hot pages are read through the memfd's page cache with
os.pread: that sees the guest's writes without touching the mapping.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from cprfast import StreamError, _core

HEARTBEAT = 0x1000
HOT_PASSES = 0x1008
HOT_START = 0x10_0000
PAGE = 4096
GIB = 1 << 30

PROBE = _core.probe_kvm()
pytestmark = pytest.mark.skipif(not PROBE["available"], reason=f"KVM unusable: {PROBE['detail']}")


def u64(region: _core.Region, offset: int) -> int:
    return int(struct.unpack("<Q", os.pread(region.fileno(), 8, offset))[0])


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def boot(region: _core.Region, hot_start: int = HOT_START, hot_len: int = 16 << 20) -> _core.KvmVm:
    vm = _core.KvmVm()
    try:
        vm.set_memory(region)
        vm.create_vcpu()
        vm.setup_guest(hot_start, hot_len)
        vm.start()
    except BaseException:
        vm.close()
        raise
    return vm


@pytest.fixture
def ram() -> Iterator[_core.Region]:
    r = _core.Region.create("kvm-test-ram", GIB)
    yield r
    r.close()


def test_probe_reports_capabilities() -> None:
    assert PROBE["api_version"] == 12
    assert isinstance(PROBE["max_memslots"], int) and PROBE["max_memslots"] > 0
    assert PROBE["errno"] is None
    assert set(PROBE) >= {"manual_dirty_log_protect2", "dirty_log_ring", "dirty_log_ring_acq_rel", "module"}


def test_guest_beats_and_writes_its_hot_set(ram: _core.Region) -> None:
    hot_len = 16 << 20
    with boot(ram, HOT_START, hot_len) as vm:
        assert vm.running and vm.exit_reason is None
        wait_until(lambda: u64(ram, HEARTBEAT) > 100_000, "heartbeat")
        wait_until(lambda: u64(ram, HOT_PASSES) >= 2, "two passes over the hot set")
        for page in range(0, hot_len // PAGE, 97):
            assert u64(ram, HOT_START + page * PAGE) != 0, f"hot page {page} never written"
        assert u64(ram, HOT_START + hot_len) == 0, "the guest wrote past its hot set"
        assert u64(ram, GIB - PAGE) == 0
        assert vm.running


def test_pause_stops_the_guest_and_resume_continues(ram: _core.Region) -> None:
    with boot(ram) as vm:
        wait_until(lambda: u64(ram, HEARTBEAT) > 1000, "heartbeat")
        took = vm.pause()
        assert 0 < took < 5
        assert not vm.running
        frozen = u64(ram, HEARTBEAT)
        time.sleep(0.05)
        assert u64(ram, HEARTBEAT) == frozen, "heartbeat moved while paused"
        assert vm.pause() >= 0  # pausing twice is harmless
        assert vm.resume() > 0
        assert vm.running
        wait_until(lambda: u64(ram, HEARTBEAT) > frozen, "heartbeat after resume")
        for _ in range(20):  # many quick cycles: no lost kicks, no hang
            vm.pause()
            vm.resume()
        assert vm.exit_reason is None


def test_state_hands_over_to_a_second_vm_in_process(ram: _core.Region) -> None:
    vm1 = boot(ram)
    try:
        wait_until(lambda: u64(ram, HOT_PASSES) >= 1, "a pass over the hot set")
        vm1.pause()
        frozen, passes = u64(ram, HEARTBEAT), u64(ram, HOT_PASSES)
        state = vm1.save_state()
        assert state[:8] == b"CPRVCPU\0"
    finally:
        vm1.close()
    with _core.KvmVm() as vm2:
        vm2.set_memory(ram)
        vm2.create_vcpu()
        vm2.load_state(state)  # no setup_guest: RAM already holds the guest
        time.sleep(0.01)
        assert u64(ram, HEARTBEAT) == frozen
        vm2.start()
        wait_until(lambda: u64(ram, HEARTBEAT) > frozen + 1000, "heartbeat in the second VM")
        wait_until(lambda: u64(ram, HOT_PASSES) > passes, "hot passes in the second VM")
        assert vm2.exit_reason is None
        vm2.pause()
        # The second VM's state round-trips too.
        again = vm2.save_state()
        assert len(again) == len(state)


def test_a_target_warms_up_beside_the_running_guest(ram: _core.Region) -> None:
    """The reference VMM's target guest warms its new VM up while the source still runs the guest;
    the guest neither stalls nor changes for it, and continues in the warmed VM. As in a
    cpr-transfer target, its vCPU thread spins for the resume and loads the state itself."""
    from cprfast.vmm.guest import Guest

    vm1 = boot(ram)
    try:
        wait_until(lambda: u64(ram, HEARTBEAT) > 1000, "heartbeat")
        target = Guest("kvm", ram, 16 << 20, fresh=False, warm_up=True)
        cold = Guest("kvm", ram, 16 << 20, fresh=False)
        assert (target.warmed, cold.warmed) == (True, False)
        beat = u64(ram, HEARTBEAT)
        wait_until(lambda: u64(ram, HEARTBEAT) > beat + 1000, "the source guest beating on")
        assert vm1.exit_reason is None
        vm1.pause()
        frozen = u64(ram, HEARTBEAT)
        target.expect_resume()
        target.load_state(vm1.save_state(), 1)
        target.wait_loaded()
        assert u64(ram, HEARTBEAT) == frozen
    finally:
        vm1.close()
    cold.close()
    target.resume()
    wait_until(lambda: u64(ram, HEARTBEAT) > frozen + 1000, "heartbeat in the warmed VM")
    target.pause()
    target.close()



def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The KVM guest section's example, as written: a target prepared while the guest runs."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("## The KVM guest", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md#the-kvm-guest", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "target warmed up: True"
    paused = re.fullmatch(r"paused in \d+ us at heartbeat (\d+)", out[1])
    continued = re.fullmatch(r"continued to (\d+), exit_reason=None", out[2])
    assert paused is not None and continued is not None, out
    assert int(continued.group(1)) > int(paused.group(1)), out


CHILD = r"""
import json, os, struct, sys, time
from cprfast import _core
fd, size, frozen = (int(a) for a in sys.argv[1:4])
state = sys.stdin.buffer.read()
ram = _core.Region.adopt(fd, size)
beat = lambda: struct.unpack("<Q", os.pread(ram.fileno(), 8, 0x1000))[0]
with _core.KvmVm() as vm:
    vm.set_memory(ram)
    vm.create_vcpu()
    vm.load_state(state)
    first = beat()
    vm.start()
    deadline = time.monotonic() + 10
    while beat() <= frozen + 1000 and time.monotonic() < deadline:
        time.sleep(0.001)
    vm.pause()
    print(json.dumps({"first": first, "last": beat(), "exit_reason": vm.exit_reason}))
"""


@pytest.mark.skipif(not hasattr(_core.Region, "adopt"), reason="needs Region.adopt (memfd branch)")
def test_state_hands_over_to_another_process(ram: _core.Region) -> None:
    vm = boot(ram)
    try:
        wait_until(lambda: u64(ram, HEARTBEAT) > 1000, "heartbeat")
        vm.pause()
        frozen = u64(ram, HEARTBEAT)
        state = vm.save_state()
    finally:
        vm.close()
    fd = ram.fileno()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(fd), str(ram.size), str(frozen)],
        input=state,
        pass_fds=[fd],
        capture_output=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(out.stdout)
    assert seen["exit_reason"] is None
    assert seen["first"] == frozen, "the target started from a different heartbeat"
    assert seen["last"] > frozen + 1000, "the guest did not continue in the other process"
    assert u64(ram, HEARTBEAT) == seen["last"], "nothing runs the guest once the target paused"


def test_16g_identity_map_reaches_the_top_of_ram(record_property: Callable[[str, object], None]) -> None:
    size, hot_len = 16 * GIB, 4 << 20
    small = _core.Region.create("kvm-1g", GIB)
    big = _core.Region.create("kvm-16g", size)  # sparse: only touched pages cost memory
    try:
        with _core.KvmVm() as vm:
            record_property("set_memory_1g_s", vm.set_memory(small, slot=1, guest_addr=size))
        with _core.KvmVm() as vm:
            record_property("set_memory_16g_s", vm.set_memory(big))
            vm.create_vcpu()
            vm.setup_guest(size - hot_len, hot_len)
            vm.start()
            wait_until(lambda: u64(big, HOT_PASSES) >= 1, "a pass over the hot set at the top of RAM")
            assert u64(big, size - PAGE) != 0, "the last page of 16 GiB was not written"
            assert u64(big, size - hot_len) != 0
            assert vm.exit_reason is None
    finally:
        big.close()
        small.close()


def test_corrupt_or_misplaced_state_is_rejected(ram: _core.Region) -> None:
    with boot(ram) as vm:
        with pytest.raises(ValueError, match="paused"):
            vm.save_state()
        vm.pause()
        state = vm.save_state()
        vm.resume()
        with pytest.raises(ValueError, match="paused"):
            vm.load_state(state)
        vm.pause()
        flipped = bytearray(state)
        flipped[100] ^= 0x40
        for bad, why in [
            (bytes(flipped), "checksum"),
            (state[:-1], "header says"),
            (b"not a state at all", "magic"),
            (state[:8] + b"\x07" + state[9:], "version 7"),
        ]:
            with pytest.raises(StreamError, match=why):
                vm.load_state(bad)
        vm.load_state(state)  # the real one still loads
        vm.resume()
        frozen = u64(ram, HEARTBEAT)
        wait_until(lambda: u64(ram, HEARTBEAT) > frozen, "heartbeat after the refusals")


def test_misuse_is_refused_and_nothing_leaks(ram: _core.Region) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    vm = _core.KvmVm()
    assert os.readlink(f"/proc/self/fd/{vm.fileno()}") == "anon_inode:kvm-vm"
    with pytest.raises(ValueError, match="create_vcpu"):
        vm.setup_guest(HOT_START, PAGE)
    vm.create_vcpu()
    with pytest.raises(ValueError, match="already exists"):
        vm.create_vcpu()
    with pytest.raises(ValueError, match="set_memory"):
        vm.setup_guest(HOT_START, PAGE)
    assert vm.set_memory(ram) > 0
    with pytest.raises(ValueError, match="not registered"):
        vm.set_dirty_log(5, True)
    assert vm.set_dirty_log(0, True) > 0
    assert vm.set_dirty_log(0, False) > 0
    with pytest.raises(ValueError, match="hot set"):
        vm.setup_guest(0x1000, PAGE)
    with pytest.raises(ValueError, match="hot set"):
        vm.setup_guest(GIB - PAGE, 2 * PAGE)
    with pytest.raises(ValueError, match="setup_guest"):
        vm.start()
    with pytest.raises(ValueError, match="not started"):
        vm.resume()
    with pytest.raises(ValueError, match="timeout"):
        vm.pause(-1)
    vm.setup_guest(HOT_START, PAGE)
    vm.start()
    with pytest.raises(ValueError, match="already started"):
        vm.start()
    vm.close()
    vm.close()
    assert not vm.running
    with pytest.raises(ValueError, match="closed"):
        vm.fileno()
    closed = _core.Region.create("closed", 1 << 21)
    closed.close()
    with _core.KvmVm() as vm2, pytest.raises(ValueError, match="closed"):
        vm2.set_memory(closed)
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (b"\x0f\x0b", "KVM_EXIT_SHUTDOWN"),  # ud2 with no IDT: triple fault
        (b"\xf4", "KVM_EXIT_SHUTDOWN"),  # hlt at CPL 3: #GP, triple fault
        (b"\x48\x89\x04\x25\x00\x00\x00\x70", "KVM_EXIT_MMIO (address 0x70000000)"),  # store past RAM
    ],
)
def test_unexpected_exit_is_reported_not_looped(code: bytes, reason: str) -> None:
    ram = _core.Region.create("kvm-exit", GIB + (2 << 20))  # mapped up to 2 GiB, backed up to 1 GiB + 2 MiB
    vm = _core.KvmVm()
    try:
        vm.set_memory(ram)
        vm.create_vcpu()
        vm.setup_guest(HOT_START, PAGE)
        os.pwrite(ram.fileno(), code, 0x4000)  # over the guest's first instruction
        vm.start()
        wait_until(lambda: not vm.running, "the vCPU to stop on its own")
        assert vm.exit_reason is not None and reason in vm.exit_reason
        assert vm.pause() >= 0
        with pytest.raises(ValueError, match=re.escape(reason)):
            vm.resume()
        with pytest.raises(ValueError, match=re.escape(reason)):
            vm.start()
        # The state is still readable for diagnosis, and a fresh boot recovers.
        assert vm.save_state()[:8] == b"CPRVCPU\0"
        vm.setup_guest(HOT_START, PAGE)
        assert vm.exit_reason is None
        vm.start()
        wait_until(lambda: u64(ram, HEARTBEAT) > 1000, "heartbeat after a fresh boot")
    finally:
        vm.close()
        ram.close()


NO_KVM_CHILD = r"""
import errno
import json
from cprfast import FeatureUnavailableError, _core
probe = _core.probe_kvm()
try:
    _core.KvmVm()
except FeatureUnavailableError as e:
    print(json.dumps({"probe": probe, "errno": e.errno, "text": str(e)}))
"""


def test_unusable_dev_kvm_names_the_feature_and_errno() -> None:
    """/dev/null bind-mounted over /dev/kvm in a private mount namespace: opens, but is not KVM."""
    script = f"mount --bind /dev/null /dev/kvm && exec {sys.executable} -c '{NO_KVM_CHILD}'"
    try:
        out = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("unshare(1) not installed")
    if out.returncode != 0 and b"mount" in out.stderr + out.stdout:
        pytest.skip(f"cannot make a private mount namespace: {out.stderr.decode().strip()}")
    assert out.returncode == 0, out.stderr.decode()
    seen = json.loads(out.stdout)
    assert seen["errno"] == errno.ENOTTY
    assert "KVM (/dev/kvm)" in seen["text"]
    assert seen["probe"]["available"] is False
    assert seen["probe"]["errno"] == errno.ENOTTY
    assert "KVM (/dev/kvm)" in seen["probe"]["detail"]
