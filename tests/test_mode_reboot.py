"""cpr-reboot: save to a file, exit, restore in a new process (tests/ram_vmm.py over QMP)."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import _vmm as ref
import numpy as np
import pytest
from _vmm import guest_kinds, vmms
from vmm_client import Vmm, kvm_or_skip

RAM = 128 << 20
HOT = 64 << 20
HOT_START = 0x10_0000
KINDS = ["threads", "kvm"]


def _source(tmp: Path, kind: str = "threads") -> Vmm:
    src = Vmm(tmp, "src", "--ram", str(RAM), "--hot", str(HOT), "--guest", kind,
              "--postmigrate-sums", str(tmp / "src.npy"))
    src.cmd("x-set-blob", data="device state")
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    return src


def _restore(tmp: Path, uri: str, kind: str = "threads") -> Vmm:
    dst = Vmm(tmp, "dst", "--ram", str(RAM), "--hot", str(HOT), "--guest", kind, "--incoming", "defer",
              "--start-sums", str(tmp / "dst.npy"))
    dst.cmd("migrate-set-parameters", mode="cpr-reboot")
    dst.cmd("migrate-incoming", uri=uri)
    return dst


def _save_and_exit(tmp: Path, src: Vmm, uri: str) -> None:
    src.cmd("migrate", uri=uri)
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert src.cmd("query-status")["status"] == "postmigrate"
    ram = info["ram"]
    assert ram["total"] == RAM and ram["normal"] > 0 and ram["normal"] + ram["duplicate"] == RAM // 4096
    src.close()  # the old process is gone before the new one starts
    assert src.proc.returncode is not None


@pytest.mark.parametrize("kind", KINDS)
def test_reboot_save_and_restore(tmp_path: Path, kind: str) -> None:
    kvm_or_skip(kind)
    path = tmp_path / "vm.sav"
    src = _source(tmp_path, kind)
    time.sleep(0.2)
    _save_and_exit(tmp_path, src, f"file:{path},offset=4096")
    dst = _restore(tmp_path, f"file:{path},offset=4096", kind)
    try:
        assert dst.wait_status({"completed", "failed"})["status"] == "completed"
        assert np.array_equal(np.load(tmp_path / "src.npy"), np.load(tmp_path / "dst.npy"))
        assert dst.cmd("x-query")["blob"] == "device state"
        assert dst.cmd("query-status")["status"] == "running"
        assert dst.heartbeat_moves()
    finally:
        dst.close()


def test_suspended_guest_stays_suspended(tmp_path: Path) -> None:
    path = tmp_path / "vm.sav"
    src = _source(tmp_path)
    src.cmd("x-suspend")
    assert src.cmd("query-status")["status"] == "suspended"
    _save_and_exit(tmp_path, src, f"file:{path}")
    dst = _restore(tmp_path, f"file:{path}")
    try:
        assert dst.wait_status({"completed", "failed"})["status"] == "completed"
        assert dst.cmd("query-status")["status"] == "suspended"
        assert not dst.cmd("x-query")["running"]
        dst.cmd("x-save-checksums", path=str(tmp_path / "dst.npy"))
        assert np.array_equal(np.load(tmp_path / "src.npy"), np.load(tmp_path / "dst.npy"))
    finally:
        dst.close()


def _check_failed_save(tmp: Path, src: Vmm, uri: str, fds: int, expect: str) -> None:
    src.cmd("migrate", uri=uri)
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "failed", info
    assert expect in info["error-desc"], info
    assert src.cmd("query-status")["status"] == "running"
    assert src.heartbeat_moves(), "the guest was not resumed"
    assert src.fd_count() == fds


def test_unwritable_file(tmp_path: Path) -> None:
    src = _source(tmp_path)
    try:
        _check_failed_save(tmp_path, src, f"file:{tmp_path}/missing/vm.sav", src.fd_count(), "No such file")
    finally:
        src.close()


def test_x_ignore_shared_is_refused(tmp_path: Path) -> None:
    """Our RAM is a memfd: leaving it out of the save would lose it, so the save fails instead."""
    src = _source(tmp_path)
    try:
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        _check_failed_save(tmp_path, src, f"file:{tmp_path}/vm.sav", src.fd_count(), "x-ignore-shared")
    finally:
        src.close()


@pytest.mark.parametrize("where", ["ram", "device", "truncated"])
def test_corrupt_file_is_refused(tmp_path: Path, where: str) -> None:
    path = tmp_path / "vm.sav"
    src = _source(tmp_path)
    _save_and_exit(tmp_path, src, f"file:{path}")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if where == "truncated":
            f.truncate(size - 100)
        else:
            data = f.read()
            if where == "device":
                at = data.rindex(b"device state")  # the blob device's payload
            else:  # a byte of the hot set, in the mapped-ram save's page data
                base = data.index(b"CPRMRAM1")
                at = base + struct.unpack_from("<Q", data, base + 40)[0] + HOT_START + 100
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
    dst = _restore(tmp_path, f"file:{path}")
    try:
        info = dst.wait_status({"completed", "failed"})
        assert info["status"] == "failed" and info["error-desc"], info
        assert dst.cmd("query-status")["status"] == "inmigrate"
        assert not dst.cmd("x-query")["running"]
        assert not os.path.exists(tmp_path / "dst.npy"), "a guest was started from a corrupt save"
    finally:
        dst.close()


@pytest.mark.parametrize("guest", guest_kinds())
def test_reference_vmm_reboot(tmp_path: Path, guest: str) -> None:
    """``python -m cprfast.vmm``: save with cpr-reboot, quit, restore in a new process with defer."""
    uri = f"file:{tmp_path}/vm.sav"
    with vmms() as procs:
        src = ref.Vmm(tmp_path, "src", "-m", "256M", "--hot", "64M", "--guest", guest)
        procs.append(src)
        src.wait_heartbeat_moves()
        src.cmd("x-doorbell", message="one")
        src.cmd("migrate-set-parameters", mode="cpr-reboot")
        src.cmd("migrate", uri=uri)
        assert src.wait_migration("completed", "failed")["status"] == "completed"
        stopped_at = src.guest()["heartbeat-at-stop"]
        with ref.ram_of(src) as ram:
            sums = ram.checksums()
        src.quit()
        dst = ref.Vmm(tmp_path, "dst", "-m", "256M", "--hot", "64M", "--guest", guest, "-incoming", "defer")
        procs.append(dst)
        dst.cmd("migrate-set-parameters", mode="cpr-reboot")
        dst.cmd("stop")  # stay paused after the load, to compare memory
        dst.cmd("migrate-incoming", uri=uri)
        assert dst.wait_migration("completed", "failed")["status"] == "completed"
        assert dst.status() == "paused"
        with ref.ram_of(dst) as ram:
            np.testing.assert_array_equal(ram.checksums(), sums)
        assert dst.guest()["doorbell"]["log"] == ["one"]
        dst.cmd("cont")
        assert dst.wait_heartbeat_moves() > stopped_at
