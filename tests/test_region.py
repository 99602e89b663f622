"""Guest-RAM regions on the real kernel: sharing across processes, adopt checks,
buffer export, checksums, preserve across exec, prefault, hugetlb and THP."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cprfast import BadFdError, FeatureUnavailableError
from cprfast._core import Region

MiB = 1 << 20
HUGE_2M = 2 * MiB
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
SHMEM_THP = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def rss_bytes(address: int) -> int:
    """Rss of the mapping that starts at `address`, from /proc/self/smaps."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    start = f"{address:x}-"
    for i, line in enumerate(lines):
        if line.startswith(start):
            for field in lines[i + 1 :]:
                if field.startswith("Rss:"):
                    return int(field.split()[1]) * 1024
    raise AssertionError(f"no mapping at {address:#x}")


def run_child(code: str, *, pass_fds: tuple[int, ...] = (), close_fds: bool = True) -> str:
    """Run `code` in a fresh interpreter (a real second process) and return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        pass_fds=pass_fds,
        close_fds=close_fds,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def region() -> Iterator[Region]:
    with Region.create("test-ram", 4 * MiB) as r:
        yield r


def test_properties_and_seals(region: Region) -> None:
    assert region.name == "test-ram"
    assert region.size == 4 * MiB
    assert region.page_size == os.sysconf("SC_PAGE_SIZE")
    assert region.pages == region.size // region.page_size
    assert region.address > 0
    assert region.seals == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
    assert set(region.timings) == {"create", "map", "prefault"}
    assert region.timings["prefault"] == 0.0
    assert region.thp is None
    assert os.readlink(f"/proc/self/fd/{region.fileno()}") == "/memfd:test-ram (deleted)"
    with pytest.raises(PermissionError):
        os.ftruncate(region.fileno(), 8 * MiB)
    assert fcntl.fcntl(region.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    with Region.create("unsealed", MiB, seal=False) as r:
        assert r.seals == 0


def test_region_shared_with_a_second_process_over_scm_rights(region: Region) -> None:
    region.write(0, b"from parent")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent, child:
        code = f"""
            import os, socket
            from cprfast._core import Region
            sock = socket.socket(fileno={child.fileno()})
            msg, fds, _, _ = socket.recv_fds(sock, 16, 1)
            r = Region.adopt(fds[0], int(msg), require_seals=True)
            os.close(fds[0])
            assert r.read(0, 11) == b"from parent", r.read(0, 11)
            r.write({3 * MiB + 5}, b"written by child pid %d" % os.getpid())
            print(r.name, os.getpid())
        """
        socket.send_fds(parent, [str(region.size).encode()], [region.fileno()])
        name, pid = run_child(code, pass_fds=(child.fileno(),)).split()
    assert name == "test-ram"
    expected = b"written by child pid " + pid.encode()
    assert region.read(3 * MiB + 5, len(expected)) == expected


def test_adopt_owns_a_cloexec_dup_and_the_caller_keeps_theirs(region: Region) -> None:
    fd = os.dup(region.fileno())
    try:
        adopted = Region.adopt(fd, region.size, name="other")
    finally:
        os.close(fd)
    with adopted:
        assert adopted.name == "other"
        assert adopted.fileno() not in (fd, region.fileno())
        assert fcntl.fcntl(adopted.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        adopted.write(MiB, b"via adopted")
        assert region.read(MiB, 11) == b"via adopted"
        assert adopted.address != region.address


def test_adopt_refuses_wrong_size(region: Region) -> None:
    before = open_fds()
    with pytest.raises(BadFdError, match=f"wrong size: {4 * MiB} bytes vs expected {8 * MiB}"):
        Region.adopt(region.fileno(), 8 * MiB)
    assert open_fds() == before


def test_adopt_refuses_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "ram.img"
    path.write_bytes(bytes(MiB))
    before = open_fds()
    with path.open("r+b") as f, pytest.raises(BadFdError, match="not a memfd"):
        Region.adopt(f.fileno(), MiB)
    assert open_fds() == before


def test_adopt_refuses_a_tmpfs_file_that_is_no_memfd() -> None:
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, MiB)
        with pytest.raises(BadFdError, match="not a memfd: it is the file /dev/shm/"):
            Region.adopt(fd, MiB, require_seals=False)
    finally:
        os.close(fd)


def test_adopt_refuses_a_pipe() -> None:
    rd, wr = os.pipe()
    try:
        with pytest.raises(BadFdError, match="not a memfd: it is a Fifo"):
            Region.adopt(rd, MiB)
    finally:
        os.close(rd)
        os.close(wr)


def test_adopt_refuses_an_unsealed_memfd_unless_told_not_to() -> None:
    fd = os.memfd_create("plain")  # no MFD_ALLOW_SEALING: the kernel sets F_SEAL_SEAL
    try:
        os.ftruncate(fd, MiB)
        with pytest.raises(BadFdError, match=r"missing seals GROW\|SHRINK \(has SEAL\)"):
            Region.adopt(fd, MiB)
        with Region.adopt(fd, MiB, require_seals=False) as r:
            assert r.name == "plain"
            assert r.seals == fcntl.F_SEAL_SEAL
    finally:
        os.close(fd)


def test_adopt_refuses_read_only_closed_and_negative_fds(region: Region) -> None:
    ro = os.open(f"/proc/self/fd/{region.fileno()}", os.O_RDONLY)
    try:
        with pytest.raises(BadFdError, match="not open read-write"):
            Region.adopt(ro, region.size)
    finally:
        os.close(ro)
    with pytest.raises(BadFdError, match="not an open file descriptor"):
        Region.adopt(ro, region.size)
    with pytest.raises(BadFdError, match="fd -1 is not a file descriptor"):
        Region.adopt(-1, region.size)


def test_buffer_export_blocks_close_and_is_zero_copy() -> None:
    r = Region.create("buf", MiB)
    view = memoryview(r)
    assert (view.format, view.itemsize, view.ndim, view.nbytes, view.readonly) == ("B", 1, 1, MiB, False)
    words = np.frombuffer(r, dtype=np.uint64)
    assert words.ctypes.data == r.address  # the array is the mapping, not a copy
    words[3] = 0x1122334455667788
    assert r.read(24, 8) == (0x1122334455667788).to_bytes(8, "little")
    view[100:103] = b"xyz"
    assert r.read(100, 3) == b"xyz"
    with pytest.raises(BufferError, match="exported buffer"):
        r.close()
    assert not r.closed
    view.release()
    with pytest.raises(BufferError):
        r.close()
    del words
    r.close()
    assert r.closed
    r.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        r.read(0, 1)
    with pytest.raises(ValueError, match="closed"):
        memoryview(r)
    assert repr(r) == "<Region closed>"


def test_context_manager_closes() -> None:
    with Region.create("ctx", MiB) as r:
        fd = r.fileno()
        assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:ctx (deleted)"
    assert r.closed
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF


def test_read_write_accept_bytes_likes_and_check_bounds(region: Region) -> None:
    region.write(0, b"ab")
    region.write(2, bytearray(b"cd"))
    region.write(4, memoryview(b"__ef__")[2:4])
    region.write(6, np.array([0x64636261], dtype=np.uint32))
    assert region.read(0, 10) == b"abcdefabcd"
    region.write(20, memoryview(region)[0:10])  # source inside the region itself
    assert region.read(20, 10) == b"abcdefabcd"
    with pytest.raises(ValueError, match="outside the region"):
        region.write(region.size - 1, b"xy")
    with pytest.raises(ValueError, match="outside the region"):
        region.read(region.size, 1)
    with pytest.raises(BufferError, match="C-contiguous"):
        region.write(0, np.arange(8, dtype=np.uint8)[::2])
    with pytest.raises(TypeError):
        region.write(0, "text")  # type: ignore[arg-type]


def test_checksums_equal_for_equal_content_and_differ_on_one_byte() -> None:
    with Region.create("a", 4 * MiB) as a, Region.create("b", 4 * MiB) as b:
        for r in (a, b):
            r.write(5 * 4096, os.urandom(3 * 4096))
            r.write(700 * 4096 + 17, b"page 700")
        b.write(5 * 4096, a.read(5 * 4096, 3 * 4096))
        sa, sb = a.checksums(threads=2), b.checksums(threads=1)
        assert sa.dtype == np.uint64 and sa.shape == (a.pages,)
        assert np.array_equal(sa, sb)
        zero = a.zero_page_checksum()
        assert np.count_nonzero(sa == zero) == a.pages - 4
        b.write(6 * 4096 + 4095, bytes([a.read(6 * 4096 + 4095, 1)[0] ^ 1]))
        sb = b.checksums()
        assert np.flatnonzero(sa != sb).tolist() == [6]


def test_preserve_and_unpreserve_flip_cloexec(region: Region) -> None:
    fd = region.fileno()
    assert not region.preserved
    region.preserve()
    assert region.preserved
    assert not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    region.unpreserve()
    assert not region.preserved
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_preserved_region_survives_exec_and_unpreserved_does_not(region: Region) -> None:
    code = f"""
        from cprfast import BadFdError
        from cprfast._core import Region
        try:
            r = Region.adopt({region.fileno()}, {region.size})
        except BadFdError as e:
            print("refused:", e)
        else:
            r.write(0, b"exec'd child was here")
            print("adopted")
    """
    assert run_child(code, close_fds=False).startswith("refused: ")
    region.preserve()
    try:
        assert run_child(code, close_fds=False) == "adopted"
    finally:
        region.unpreserve()
    assert region.read(0, 21) == b"exec'd child was here"


def test_prefault_populates_every_page_and_is_timed() -> None:
    with Region.create("pf", 8 * MiB) as r:
        assert rss_bytes(r.address) == 0
        try:
            took = r.prefault(threads=2)
        except FeatureUnavailableError as e:
            pytest.skip(f"MADV_POPULATE_WRITE unavailable: {e}")
        assert took > 0 and r.timings["prefault"] == took
        assert rss_bytes(r.address) == 8 * MiB
    with Region.create("pf2", 8 * MiB, prefault=True) as r:
        assert r.timings["prefault"] > 0
        assert rss_bytes(r.address) == 8 * MiB


def test_thp_advice_reports_the_shmem_mode(caplog: pytest.LogCaptureFixture) -> None:
    mode = SHMEM_THP.read_text().split("[")[1].split("]")[0]
    with caplog.at_level(logging.WARNING, logger="cprfast.memfd"):
        with Region.create("thp", 4 * MiB, thp=True) as r:
            assert r.thp == mode
    warned = [rec.getMessage() for rec in caplog.records if rec.name == "cprfast.memfd"]
    if mode in ("never", "deny"):
        assert len(warned) == 1 and f"shmem THP is '{mode}'" in warned[0]
    else:
        assert warned == []
    with pytest.raises(ValueError, match="exclude each other"):
        Region.create("both", HUGE_2M, thp=True, hugetlb=HUGE_2M)


@contextlib.contextmanager
def reserved_hugepages(count: int) -> Iterator[None]:
    """Reserve `count` more 2 MiB huge pages for the test, and give them back."""
    if os.geteuid() != 0 or not NR_HUGEPAGES.exists():
        pytest.skip("reserving huge pages needs root and /proc/sys/vm/nr_hugepages")
    before = int(NR_HUGEPAGES.read_text())
    try:
        NR_HUGEPAGES.write_text(str(before + count))
        if int(NR_HUGEPAGES.read_text()) < before + count:
            pytest.skip(f"the kernel could not reserve {count} huge pages (memory too fragmented)")
        yield
    finally:
        NR_HUGEPAGES.write_text(str(before))


def test_hugetlb_region_with_reserved_pages() -> None:
    with reserved_hugepages(2):
        try:
            r = Region.create("huge", 2 * HUGE_2M, hugetlb=HUGE_2M)
        except FeatureUnavailableError as e:
            pytest.skip(f"hugetlb memfd unavailable: {e}")
        with r:
            assert (r.page_size, r.pages) == (HUGE_2M, 2)
            r.write(HUGE_2M + 1, b"huge")
            with Region.adopt(r.fileno(), r.size) as adopted:
                assert adopted.page_size == HUGE_2M
                assert adopted.read(HUGE_2M + 1, 4) == b"huge"
            sums = r.checksums()
            assert sums[0] == r.zero_page_checksum() != sums[1]
