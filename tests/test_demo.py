"""`cprfast demo`: one guest live-updated through every mode, each into a fresh process, observed from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cprfast import _core, demo
from cprfast.vmm.guest import HOT_START

MEM, HOT = 128 << 20, 8 << 20


def guest_kinds() -> list[Any]:
    probe = _core.probe_kvm()
    kvm = pytest.mark.skipif(not probe["available"], reason=f"KVM unusable: {probe['detail']}")
    return ["threads", pytest.param("kvm", marks=kvm)]


def _ours(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our temp dir): strays if any are left."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


@pytest.mark.parametrize("guest", guest_kinds())
def test_every_mode_into_a_fresh_process(guest: str) -> None:
    results = demo.run(MEM, demo.MODES, guest, HOT)
    assert [r.mode for r in results] == list(demo.MODES)
    for r in results:
        assert r.ok, r
        assert r.guest == guest
        assert r.pause_ms > 0 and r.total_ms > 0
    transfer, exec_, reboot, normal = results
    assert exec_.pid_before == exec_.pid_after == transfer.pid_after  # cpr-exec: same PID, new image
    pids = [transfer.pid_before, transfer.pid_after, reboot.pid_after, normal.pid_after]
    assert len(set(pids)) == 4  # every other mode: a fresh process
    assert transfer.fd_same is exec_.fd_same is True
    assert reboot.fd_same is normal.fd_same is None
    assert normal.bytes_moved > HOT and normal.dirty_pages  # RAM copied, iterations seen
    assert reboot.bytes_moved > HOT  # RAM saved to the file
    assert all(_ours(str(r.pid_after)) == [] for r in results)


def test_fingerprint_sees_one_changed_word_and_treats_holes_as_zero() -> None:
    size = HOT_START + (4 << 20)
    with _core.Region.create("fp-a", size) as a, _core.Region.create("fp-b", size) as b:
        path_a, path_b = f"/proc/self/fd/{a.fileno()}", f"/proc/self/fd/{b.fileno()}"
        b.write(size - 4096, bytes(4096))  # b holds a zero page where a has a hole
        demo.seed(path_a, size, 1 << 20)
        demo.seed(path_b, size, 1 << 20)
        fa, fb = demo.fingerprint(path_a, size, 1 << 20), demo.fingerprint(path_b, size, 1 << 20)
        assert np.array_equal(fa, fb) and np.count_nonzero(fa) > 0
        b.write(size - 2 * 4096 + 808, b"\x01")
        changed = np.nonzero(demo.fingerprint(path_b, size, 1 << 20) != fa)[0]
        assert list(changed) == [size // 4096 - 2]
        b.write(HOT_START + 4096, b"hot")  # the guest's own pages are not compared
        assert np.array_equal(demo.fingerprint(path_b, size, 1 << 20)[: size // 4096 - 2], fa[: size // 4096 - 2])


def _demo(tmp: Path, *args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cprfast", "demo", *args],
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_demo_command_json_and_clean_exit(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--mem", "128M", "--hot", "8M", "--modes", "cpr-exec,normal", "--guest", "threads", "--json")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    steps = json.loads(out)
    assert [s["mode"] for s in steps] == ["cpr-exec", "normal"]
    assert all(s["ok"] and s["memory_identical"] and s["heartbeat_continuous"] for s in steps)
    assert "cpr-exec: pid" in err and "booted pid" in err  # the progress display
    assert list(tmp_path.iterdir()) == []  # work directory removed
    assert _ours(str(tmp_path)) == []  # no VMM left behind


def test_demo_table(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--mem", "64M", "--hot", "4M", "--modes", "cpr-transfer", "--guest", "threads")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    header, rule, row, footer, noise = out.splitlines()
    assert header.split()[:3] == ["mode", "pid", "guest"]
    assert row.split()[0] == "cpr-transfer" and row.split()[-3:] == ["yes", "yes", "yes"]
    assert footer == "guest: threads, 64.0 MiB RAM, hot set 4.0 MiB"
    assert noise.startswith("noise floor: ")


def test_ctrl_c_stops_every_vmm_and_removes_the_work_directory(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--mem", "64M", "--hot", "4M", "--guest", "threads")
    deadline = time.monotonic() + 60
    while not _ours(str(tmp_path)) or not any(tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere in the middle of booting or updating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert _ours(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--modes", "cpr-transfer,bogus"], "unknown mode"), (["--mem", "lots"], "bad size"), (["--guest", "xen"], "invalid choice")],
)
def test_bad_arguments(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "cprfast", "demo", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr
