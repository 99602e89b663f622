"""Normal (precopy) migration between real processes (tests/ram_vmm.py), driven over QMP."""

from __future__ import annotations

import os
import socket
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
PAGE = 4096
KINDS = ["threads", "kvm"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pair(tmp: Path, kind: str, target_uri: str | None) -> tuple[Vmm, Vmm | None]:
    common = ["--ram", str(RAM), "--hot", str(HOT), "--guest", kind]
    dst = None
    if target_uri is not None:
        dst = Vmm(tmp, "dst", *common, "--incoming", target_uri, "--start-sums", str(tmp / "dst.npy"))
    src = Vmm(tmp, "src", *common, "--postmigrate-sums", str(tmp / "src.npy"))
    return src, dst


def _check_switchover(tmp: Path, src: Vmm, dst: Vmm) -> None:
    """Target memory at its start equals source memory when it stopped; device state and run states."""
    src_sums, dst_sums = np.load(tmp / "src.npy"), np.load(tmp / "dst.npy")
    assert len(src_sums) == RAM // PAGE
    assert np.array_equal(src_sums, dst_sums), f"{int((src_sums != dst_sums).sum())} pages differ"
    assert dst.cmd("x-query")["blob"] == "device state"
    assert src.cmd("query-status")["status"] == "postmigrate"
    assert dst.cmd("query-status")["status"] == "running"
    assert dst.heartbeat_moves(), "the target guest does not run"
    assert not src.cmd("x-query")["uffd"], "dirty tracking left on"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_precopy_socket(tmp_path: Path, kind: str, transport: str) -> None:
    kvm_or_skip(kind)
    uri = f"unix:{tmp_path}/mig.sock" if transport == "unix" else f"tcp:127.0.0.1:{_free_port()}"
    src, dst = _pair(tmp_path, kind, uri)
    assert dst is not None
    try:
        src.cmd("x-set-blob", data="device state")
        time.sleep(0.2)  # the hot set is being dirtied
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
        src.cmd("migrate", uri=uri)
        info = src.wait_status({"completed", "failed", "cancelled"})
        assert info["status"] == "completed", info
        assert dst.wait_status({"completed", "failed"})["status"] == "completed"
        ram = info["ram"]
        assert ram["total"] == RAM
        assert ram["dirty-sync-count"] >= 2  # at least one iteration sync and the final one
        assert ram["duplicate"] > 0 and ram["normal"] >= HOT // PAGE
        assert ram["transferred"] >= ram["normal-bytes"]
        assert info["downtime"] >= 0 and info["total-time"] >= info["downtime"]
        _check_switchover(tmp_path, src, dst)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("transport", ["file", "exec"])
def test_precopy_to_file_and_exec(tmp_path: Path, transport: str) -> None:
    """Non-socket channels: the stream is complete before the target reads it."""
    path = tmp_path / "stream.bin"
    out, into = (f"file:{path}", f"file:{path}") if transport == "file" else (
        f"exec:cat > {path}", f"exec:cat {path}")
    src, _ = _pair(tmp_path, "threads", None)
    try:
        src.cmd("x-set-blob", data="device state")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
        src.cmd("migrate", uri=out)
        assert src.wait_status({"completed", "failed"})["status"] == "completed"
        dst = Vmm(tmp_path, "dst", "--ram", str(RAM), "--hot", str(HOT), "--incoming", into,
                  "--start-sums", str(tmp_path / "dst.npy"))
        try:
            assert dst.wait_status({"completed", "failed"})["status"] == "completed"
            _check_switchover(tmp_path, src, dst)
        finally:
            dst.close()
    finally:
        src.close()


@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
def test_precopy_over_inherited_fd(tmp_path: Path, kind: str) -> None:
    """``fd:N`` on both sides: an inherited connected socket (or a pipe) carries the stream."""
    a, b = socket.socketpair() if kind == "socketpair" else (None, None)
    r, w = (b.fileno(), a.fileno()) if a is not None and b is not None else os.pipe()
    common = ["--ram", str(RAM), "--hot", str(HOT)]
    try:
        dst = Vmm(tmp_path, "dst", *common, "--incoming", f"fd:{r}", "--start-sums", str(tmp_path / "dst.npy"),
                  pass_fds=(r,))
        src = Vmm(tmp_path, "src", *common, "--postmigrate-sums", str(tmp_path / "src.npy"), pass_fds=(w,))
    finally:
        for s in (a, b):
            if s is not None:
                s.close()
        if a is None:
            os.close(r)
            os.close(w)
    try:
        src.cmd("x-set-blob", data="device state")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
        src.cmd("migrate", uri=f"fd:{w}")
        assert src.wait_status({"completed", "failed"})["status"] == "completed"
        assert dst.wait_status({"completed", "failed"})["status"] == "completed"
        _check_switchover(tmp_path, src, dst)
    finally:
        src.close()
        dst.close()


def _cold_pages(sums: np.ndarray) -> np.ndarray:
    """Checksums of pages no guest writes: above the hot set (below it a KVM guest has its
    stack, page tables with accessed/dirty bits, and the heartbeat)."""
    return sums[(HOT_START + HOT) // PAGE :]


def _check_source_intact(tmp_path: Path, src: Vmm, before: np.ndarray, fds: int) -> None:
    assert src.cmd("query-status")["status"] == "running"
    assert src.heartbeat_moves(), "the source guest was not resumed"
    q = src.cmd("x-query")
    assert not q["uffd"], "dirty tracking left on"
    assert q["blob"] == "device state"
    src.cmd("x-save-checksums", path=str(tmp_path / "after.npy"))
    assert np.array_equal(_cold_pages(before), _cold_pages(np.load(tmp_path / "after.npy")))
    assert src.fd_count() == fds, "fds leaked"


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_while_not_converging(tmp_path: Path, kind: str) -> None:
    """A zero downtime limit never converges while the guest writes: it iterates until cancelled."""
    kvm_or_skip(kind)
    uri = f"unix:{tmp_path}/mig.sock"
    src, dst = _pair(tmp_path, kind, uri)
    assert dst is not None
    try:
        src.cmd("x-set-blob", data="device state")
        src.cmd("x-save-checksums", path=str(tmp_path / "before.npy"))
        fds = src.fd_count()
        src.cmd("migrate-set-parameters", **{"downtime-limit": 0, "max-bandwidth": 256 << 20})
        src.cmd("migrate", uri=uri)
        deadline = time.monotonic() + 60
        while True:
            info = src.cmd("query-migrate")
            assert info["status"] in ("setup", "active"), info
            if info["status"] == "active" and info["ram"]["dirty-sync-count"] >= 3:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert info["ram"]["remaining"] > 0 and info["expected-downtime"] >= 0
        assert src.cmd("x-query")["uffd"] == (kind == "threads")
        src.cmd("migrate_cancel")
        assert src.wait_status({"cancelled", "failed", "completed"})["status"] == "cancelled"
        _check_source_intact(tmp_path, src, np.load(tmp_path / "before.npy"), fds)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("guest", guest_kinds())
def test_reference_vmm_precopy(tmp_path: Path, guest: str) -> None:
    """The reference VMM migrates with mode normal: RAM pattern, heartbeat and device state arrive."""
    uri = f"unix:{tmp_path}/main.sock"
    with vmms() as procs:
        dst = ref.Vmm(tmp_path, "dst", "-m", "256M", "--hot", "64M", "--guest", guest, "-incoming", uri)
        procs.append(dst)
        src = ref.Vmm(tmp_path, "src", "-m", "256M", "--hot", "64M", "--guest", guest)
        procs.append(src)
        src.wait_heartbeat_moves()
        src.cmd("x-doorbell", message="one")
        with ref.ram_of(src) as ram:
            ref.fill_cold(ram, HOT)
            cold = ref.cold_checksums(ram, HOT)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
        src.cmd("migrate", uri=uri)
        done = src.wait_migration("completed", "failed")
        assert done["status"] == "completed"
        assert len(done["ram"]["x-dirty-history"]) == done["ram"]["dirty-sync-count"] >= 2
        ref.wait_until(lambda: dst.status() == "running", what="target running")
        after_src, after_dst = src.guest(), dst.guest()
        assert src.status() == "postmigrate" and not after_src["running"]
        assert after_dst["heartbeat-at-start"] == after_src["heartbeat-at-stop"]
        assert dst.wait_heartbeat_moves() > after_src["heartbeat-at-stop"]
        assert after_dst["doorbell"]["log"] == ["one"]
        with ref.ram_of(dst) as ram:
            np.testing.assert_array_equal(ref.cold_checksums(ram, HOT), cold)
