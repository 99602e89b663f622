"""KVM costs the reference VMM pays: registering guest RAM with KVM as the
slot grows (1/4/16 GiB; the design keeps this out of the guest pause), VM +
vCPU creation, and pausing/resuming the running vCPU.

Nothing here asserts a time. Within each group pytest-benchmark's relative
columns give the ratios; ``extra_info`` holds the times the calls themselves
report (the ioctl alone for set_memory; kick-to-parked for pause).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from cprfast import _core

GiB = 1 << 30
PROBE = _core.probe_kvm()
pytestmark = pytest.mark.skipif(not PROBE["available"], reason=f"KVM unusable: {PROBE['detail']}")


@pytest.mark.parametrize("gib", [1, 4, 16])
def test_set_memory(benchmark: BenchmarkFixture, gib: int) -> None:
    """KVM_SET_USER_MEMORY_REGION of a fresh slot, each round in a new VM."""
    vms: list[_core.KvmVm] = []
    ioctl: list[float] = []

    def new_vm() -> None:
        while vms:
            vms.pop().close()
        vms.append(_core.KvmVm())

    region = _core.Region.create(f"bench-kvm-{gib}g", gib * GiB)
    try:
        benchmark.group = "KVM set_memory (1/4/16 GiB)"
        benchmark.pedantic(lambda: ioctl.append(vms[-1].set_memory(region)), setup=new_vm, rounds=15, warmup_rounds=1)
    finally:
        while vms:
            vms.pop().close()
        region.close()
    benchmark.extra_info["median_ioctl_s"] = statistics.median(ioctl)


def test_create_vm_and_vcpu(benchmark: BenchmarkFixture) -> None:
    """KVM_CREATE_VM + supported CPUID/MSR lists + KVM_CREATE_VCPU + mmap(kvm_run) + SET_CPUID2."""

    def create() -> None:
        with _core.KvmVm() as vm:
            vm.create_vcpu()

    benchmark.group = "KVM VM + vCPU creation"
    benchmark.pedantic(create, rounds=50, warmup_rounds=2)


@pytest.fixture(scope="module")
def running_guest() -> Iterator[_core.KvmVm]:
    ram = _core.Region.create("bench-kvm-guest", GiB)
    try:
        with _core.KvmVm() as vm:
            vm.set_memory(ram)
            vm.create_vcpu()
            vm.setup_guest(1 << 20, 64 << 20)
            vm.start()
            yield vm
    finally:
        ram.close()


def test_pause_resume(benchmark: BenchmarkFixture, running_guest: _core.KvmVm) -> None:
    """One pause (kick out of KVM_RUN, wait parked) + one resume of a guest dirtying 64 MiB."""
    pauses: list[float] = []
    resumes: list[float] = []

    def cycle() -> None:
        pauses.append(running_guest.pause())
        resumes.append(running_guest.resume())

    benchmark.group = "KVM vCPU pause+resume"
    benchmark.pedantic(cycle, rounds=200, warmup_rounds=5)
    assert running_guest.exit_reason is None
    benchmark.extra_info["median_pause_s"] = statistics.median(pauses)
    benchmark.extra_info["median_resume_s"] = statistics.median(resumes)
