"""cpr-transfer end to end: two reference-VMM processes, driven over QMP with qemu.qmp."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _vmm import (
    Vmm,
    channel,
    channels,
    cold_checksums,
    fd_count,
    fifo_threads,
    fill_cold,
    guest_kinds,
    listening_socket,
    ram_of,
    same_object,
    threads_cpus,
    vmms,
    wait_until,
)

from cprfast import _core

HOT = 16 << 20
MEM = "256M"


def boot(tmp: Path, guest: str, procs: list[Vmm], mem: str = MEM, name: str = "src", *extra: str) -> Vmm:
    src = Vmm(tmp, name, "-m", mem, "--hot", "16M", "--guest", guest, *extra)
    procs.append(src)
    src.wait_heartbeat_moves()
    return src


def start_target(
    tmp: Path, guest: str, procs: list[Vmm], *, defer: bool = False, mem: str = MEM, extra: tuple[str, ...] = ()
) -> Vmm:
    """A target listening on a pre-listened cpr socket passed as an fd (QEMU's race-free form)."""
    sock = listening_socket(tmp / "cpr.sock")
    cpr = json.dumps({"channel-type": "cpr", "addr": {"transport": "socket", "type": "fd", "str": str(sock.fileno())}})
    main = "defer" if defer else channel("main", tmp / "main.sock")
    try:
        dst = Vmm(tmp, "dst", "-m", mem, "--hot", "16M", "--guest", guest, "-incoming", main, "-incoming", cpr,
                  *extra, pass_fds=(sock.fileno(),))
    finally:
        sock.close()
    procs.append(dst)
    return dst


def prepare_source(src: Vmm) -> dict[str, Any]:
    """Give the source guest something to carry: doorbell state, bytes in the console pipe, a RAM pattern."""
    src.cmd("x-doorbell", message="one")
    src.cmd("x-doorbell", message="two")
    info = src.guest()
    with open(f"/proc/{src.pid}/fd/{info['console']['write-fd']}", "wb", buffering=0) as pipe:
        pipe.write(b"written-before-the-update")
    with ram_of(src) as ram:
        fill_cold(ram, HOT)
        info["cold"] = cold_checksums(ram, HOT)
    src.cmd("migrate-set-parameters", mode="cpr-transfer")
    return info


def check_switchover(src: Vmm, dst: Vmm, before: dict[str, Any]) -> None:
    """Memory, heartbeat, devices and preserved fds all arrived; the source is done."""
    assert src.status() == "postmigrate"
    wait_until(lambda: dst.status() == "running", what="target running")
    assert dst.migrate_status()["status"] == "completed"
    after_src, after_dst = src.guest(), dst.guest()
    assert after_src["running"] is False
    # Heartbeat continuity: the target resumed exactly where the source stopped, and runs on.
    assert after_dst["heartbeat-at-start"] == after_src["heartbeat-at-stop"]
    assert dst.wait_heartbeat_moves() > after_src["heartbeat-at-stop"]
    # Same memory: the target's RAM fd is the source's memfd, and every page the guest does not write is identical.
    assert same_object(src.pid, after_src["ram"]["fd"], dst.pid, after_dst["ram"]["fd"])
    with ram_of(dst) as ram:
        np.testing.assert_array_equal(cold_checksums(ram, HOT), before["cold"])
    # Device state on the main channel, preserved fd adopted (the very same pipe, with the bytes in it).
    assert after_dst["doorbell"]["rings"] == 2 and after_dst["doorbell"]["log"] == ["one", "two"]
    assert after_dst["console"]["pipe"] == before["console"]["pipe"]
    assert same_object(src.pid, before["console"]["read-fd"], dst.pid, after_dst["console"]["read-fd"])
    assert dst.cmd("x-console-read")["data"] == "written-before-the-update"


@pytest.mark.parametrize("guest", guest_kinds())
def test_transfer_end_to_end(tmp_path: Path, guest: str) -> None:
    with vmms() as procs:
        src = boot(tmp_path, guest, procs)
        dst = start_target(tmp_path, guest, procs)
        before = prepare_source(src)
        fds_before = fd_count(src.pid)
        observer = _core.Observer(f"/proc/{src.pid}/fd/{before['ram']['fd']}", 0x1000)
        observer.start()
        src.cmd("migrate", channels=channels(tmp_path / "main.sock", tmp_path / "cpr.sock"))
        info = src.wait_migration("completed", "failed")
        assert info["status"] == "completed", (info, dst.proc.poll(), dst.log())
        time.sleep(0.05)
        report = observer.stop()
        print(f"cpr-transfer {guest} {MEM}: guest pause {report.max_stall_ns / 1e3:.0f} us, "
              f"downtime {info.get('downtime')} ms, total {info.get('total-time')} ms")
        assert report.heartbeat_monotonic
        # RAM stayed in place: only the device state crossed, all of it with the guest stopped.
        assert 0 < info["ram"]["transferred"] == info["ram"]["downtime-bytes"] < 64 << 10
        check_switchover(src, dst, before)
        assert fd_count(src.pid) == fds_before  # every socket of the hand-over is closed
        src.quit()
        dst.quit()
        assert dst.proc.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs CAP_SYS_NICE")
def test_transfer_at_switchover_priority(tmp_path: Path) -> None:
    """--switchover-priority on both sides: the update completes, and no thread stays at SCHED_FIFO after it."""
    prio = ("--switchover-priority", "2")
    with vmms() as procs:
        src = boot(tmp_path, "threads", procs, MEM, "src", *prio)
        dst = start_target(tmp_path, "threads", procs, extra=prio)
        before = prepare_source(src)
        src.cmd("migrate", channels=channels(tmp_path / "main.sock", tmp_path / "cpr.sock"))
        assert src.wait_migration("completed", "failed")["status"] == "completed"
        check_switchover(src, dst, before)
        assert fifo_threads(src.pid) == [] and fifo_threads(dst.pid) == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs at least two CPUs")
@pytest.mark.parametrize("guest", guest_kinds())
def test_transfer_with_pinned_vcpus(tmp_path: Path, guest: str) -> None:
    """--vcpu-cpus on both sides: the target's guest thread runs on the guest's CPU and every
    other thread elsewhere, as on the source (the switchover's real-time work stays off it)."""
    cpus = sorted(os.sched_getaffinity(0))
    pin = ("--vcpu-cpus", str(cpus[-1]))
    with vmms() as procs:
        src = boot(tmp_path, guest, procs, MEM, "src", *pin)
        dst = start_target(tmp_path, guest, procs, extra=pin)
        before = prepare_source(src)
        src.cmd("migrate", channels=channels(tmp_path / "main.sock", tmp_path / "cpr.sock"))
        assert src.wait_migration("completed", "failed")["status"] == "completed"
        check_switchover(src, dst, before)
        threads = {n: c for n, c in threads_cpus(dst.pid).items() if not n.startswith("kvm-")}
        assert threads.pop("cprfast-vcpu" if guest == "kvm" else "cprfast-guest") == {cpus[-1]}
        assert threads and all(allowed == set(cpus[:-1]) for allowed in threads.values()), threads


def test_transfer_defer_and_unix_path(tmp_path: Path) -> None:
    """A target with -incoming defer on a cpr UNIX path; migrate-incoming comes later, as in QEMU."""
    with vmms() as procs:
        src = boot(tmp_path, "threads", procs)
        dst = Vmm(tmp_path, "dst", "-m", MEM, "--hot", "16M", "--guest", "threads",
                  "-incoming", "defer", "-incoming", channel("cpr", tmp_path / "cpr.sock"))
        procs.append(dst)
        wait_until(lambda: (tmp_path / "cpr.sock").exists(), what="cpr listener")
        before = prepare_source(src)
        src.cmd("migrate", channels=channels(tmp_path / "main.sock", tmp_path / "cpr.sock"))
        assert dst.status() == "inmigrate"  # QMP is up once the fds arrived; the guest waits
        assert src.status() == "finish-migrate"
        dst.cmd("migrate-incoming", channels=[json.loads(channel("main", tmp_path / "main.sock"))])
        assert src.wait_migration("completed", "failed")["status"] == "completed"
        check_switchover(src, dst, before)


def _failed_and_running(src: Vmm, fds_before: int, *, status: str = "failed") -> dict[str, Any]:
    info = src.wait_migration(status)
    wait_until(lambda: src.status() == "running", what="source running again")
    src.wait_heartbeat_moves()
    wait_until(lambda: fd_count(src.pid) == fds_before, what=f"source fds back to {fds_before}")
    return info


def test_target_killed_after_fds(tmp_path: Path) -> None:
    """The target dies holding every fd (waiting for migrate-incoming): the source resumes its guest."""
    with vmms() as procs:
        src = boot(tmp_path, "threads", procs)
        dst = start_target(tmp_path, "threads", procs, defer=True)
        prepare_source(src)
        fds_before = fd_count(src.pid)
        src.cmd("migrate", channels=channels(tmp_path / "main.sock", tmp_path / "cpr.sock"))
        assert dst.status() == "inmigrate"  # it has RAM and device fds now
        dst.kill()
        info = _failed_and_running(src, fds_before)
        assert "main channel" in info["error-desc"]
        assert src.guest()["doorbell"]["rings"] == 2


def test_cancel_while_waiting_for_hup(tmp_path: Path) -> None:
    with vmms() as procs:
        src = boot(tmp_path, "threads", procs)
        dst = start_target(tmp_path, "threads", procs, defer=True)
        prepare_source(src)
        fds_before = fd_count(src.pid)
        src.cmd("migrate", channels=channels(tmp_path / "main.sock", tmp_path / "cpr.sock"))
        assert dst.status() == "inmigrate"  # it holds every fd and waits for migrate-incoming
        assert src.status() == "finish-migrate"
        assert src.migrate_status()["status"] == "setup"  # waiting for the target's HUP
        src.cmd("migrate_cancel")
        _failed_and_running(src, fds_before, status="cancelled")
        assert dst.status() == "inmigrate"  # never resumed there: the guest runs on exactly one side
        dst.kill()


def test_pause_measurements(tmp_path: Path) -> None:
    """Not an assertion on time: records the observed pause of a few runs (median printed)."""
    pauses = []
    for i in range(3):
        run = tmp_path / str(i)
        run.mkdir()
        with vmms() as procs:
            src = boot(run, "threads", procs)
            start_target(run, "threads", procs)
            src.cmd("migrate-set-parameters", mode="cpr-transfer")
            observer = _core.Observer(f"/proc/{src.pid}/fd/{src.guest()['ram']['fd']}", 0x1000)
            observer.start()
            src.cmd("migrate", channels=channels(run / "main.sock", run / "cpr.sock"))
            assert src.wait_migration("completed", "failed")["status"] == "completed"
            time.sleep(0.05)
            pauses.append(observer.stop().max_stall_ns / 1e3)
    print(f"cpr-transfer threads {MEM}: median pause {statistics.median(pauses):.0f} us of {pauses}")
    assert all(p > 0 for p in pauses)


def test_the_rehearsal_leaves_nothing_behind() -> None:
    """Both sides rehearse the hand-over before the stop: it must not keep an fd."""
    from cprfast.modes.transfer import rehearse

    before = sorted(os.listdir("/proc/self/fd"))
    rehearse()
    rehearse()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_failed_rehearsal_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """Out of fds, the rehearsal only costs its speed-up: a warning, no error, nothing leaked."""
    import resource

    from cprfast.modes.transfer import rehearse

    before = sorted(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # stdin, stdout and stderr: no room for more
    try:
        rehearse()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "rehearsal of the hand-over" in caplog.text
    assert "Too many open files" in caplog.text
    assert sorted(os.listdir("/proc/self/fd")) == before
