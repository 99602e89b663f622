"""Conformance with a real QEMU 10: we play the target's cpr channel of QEMU's cpr-transfer.

A real ``qemu-system-x86_64`` source (memfd backend, ``aux-ram-share=on``,
``mode=cpr-transfer``, the tiny guest of bench/qemu) connects to a cpr socket
we listen on; :func:`cprfast.cpr_state.receive_state` must parse what it sends
and hand us the live guest RAM. Closing the socket is the HUP QEMU waits for;
it then fails to connect the main channel (nobody listens) and must keep the
guest running, as its docs promise for a target that died.

The stream is also recorded (tests/data/qemu10-cpr-transfer.bin, without its
fds; the .json beside it says where each fd rode and how big it was), so that
the replay tests run on machines without QEMU. Re-record with
``CPRFAST_RECORD_QEMU_STREAM=1`` when a new QEMU changes the stream.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import qemu_runner as qr

from cprfast import _core
from cprfast._core import Region
from cprfast.cpr_state import StreamReader, decode, receive_state
from cprfast.errors import StreamError

DATA = Path(__file__).parent / "data"
RECORDING = DATA / "qemu10-cpr-transfer.bin"
RECORDING_NOTE = DATA / "qemu10-cpr-transfer.json"
RAM = 64 << 20
SERVICE_BYTE = b" "

needs_qemu = pytest.mark.skipif(qr.qemu10_missing() is not None, reason=qr.qemu10_missing() or "")


@dataclass
class Source:
    """A running QEMU source and the paths of its channels."""

    vm: qr.Qemu
    workdir: Path

    def migrate(self, attempt: int) -> socket.socket:
        """Start a cpr-transfer to a cpr socket we listen on; returns our end, accepted."""
        cpr = str(self.workdir / f"cpr{attempt}.sock")
        main = str(self.workdir / f"main{attempt}.sock")  # nobody listens: the target "died"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(cpr)
            listener.listen(1)
            self.vm.cmd(
                "migrate",
                channels=[
                    {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main}},
                    {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr}},
                ],
            )
            listener.settimeout(30)
            sock, _ = listener.accept()
        return sock

    def hang_up_and_check_rollback(self, sock: socket.socket, attempt: int) -> None:
        """Close the cpr socket; QEMU must fail on the dead main channel and keep the guest running."""
        sock.close()
        deadline = time.monotonic() + 30
        while (info := self.vm.cmd("query-migrate"))["status"] != "failed":
            assert time.monotonic() < deadline, f"QEMU stays in {info['status']} after the HUP"
            time.sleep(0.01)
        assert f"main{attempt}.sock" in info["error-desc"]
        assert self.vm.cmd("query-status") == {"status": "running", "running": True}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    workdir = tmp_path_factory.mktemp("qemu")
    image = qr.build_guest(workdir)
    vm, _ = qr.start_source(image, RAM, "tcg", 1 << 20, workdir)
    try:
        vm.cmd("migrate-set-parameters", mode="cpr-transfer")
        yield Source(vm, workdir)
    finally:
        vm.close()
        qr.close_thread_loop()


def heartbeat(region: Region) -> int:
    value: int = struct.unpack("<Q", region.read(qr.HEARTBEAT, 8))[0]
    return value


def wait_moving(region: Region) -> None:
    start = heartbeat(region)
    deadline = time.monotonic() + 30
    while heartbeat(region) == start:
        assert time.monotonic() < deadline, "the guest's heartbeat does not move"
        time.sleep(0.001)


@needs_qemu
def test_real_qemu_cpr_stream_parses_and_hands_over_live_guest_ram(source: Source) -> None:
    sock = source.migrate(1)
    with receive_state(sock, timeout=30) as state:
        entries = state.entries()
        names = [name for name, _, _ in entries]
        # The backend is saved under its id (hostmem-memfd.c); the aux-ram-share
        # RAM blocks under their MR names. QEMU's list is LIFO: the backend,
        # created first, comes last.
        assert names[-1] == "ram0"
        assert {"pc.bios", "pc.rom"} <= set(names)
        assert all(id == 0 for _, id, _ in entries)
        assert state.vfio_devices == []
        for name, _, fd in entries:
            assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"), name
        ram_fd = state.find_fd("ram0", 0)
        assert ram_fd is not None
        assert os.fstat(ram_fd).st_size == RAM
        assert "memory-backend-memfd" in os.readlink(f"/proc/self/fd/{ram_fd}")
        with Region.adopt(ram_fd, RAM, name="qemu-ram0", require_seals=False) as ram:
            wait_moving(ram)  # QEMU's guest runs in the memory we now hold
            source.hang_up_and_check_rollback(sock, 1)
            wait_moving(ram)  # still running after the failed migration


@needs_qemu
def test_real_qemu_sends_one_fd_per_message_and_matches_the_recording(source: Source) -> None:
    sock = source.migrate(2)
    data = bytearray()
    services: list[int] = []
    sizes: list[int] = []
    try:
        while True:
            chunk, fds = _core.recvmsg_fds(sock.fileno(), 1 << 16, 253, timeout=30)
            for fd in fds:
                sizes.append(os.fstat(fd).st_size)
                os.close(fd)
            if not chunk:
                break
            if fds:  # QEMU's qemu_file_put_fd: flush, then one ' ' carrying exactly one fd
                assert len(fds) == 1
                assert chunk.endswith(SERVICE_BYTE)
                services.append(len(data) + len(chunk) - 1)
            data += chunk
    finally:
        source.hang_up_and_check_rollback(sock, 2)
    version = qr.qemu_version()
    if os.environ.get("CPRFAST_RECORD_QEMU_STREAM"):
        DATA.mkdir(exist_ok=True)
        RECORDING.write_bytes(data)
        note = {
            "what": "QEMU's cpr-transfer stream (cpr channel), fds removed; see tests/test_qemu_conformance.py",
            "qemu": version,
            "command": " ".join(qr.machine_args(Path("guest.bin"), RAM, "tcg")[1:]),
            "service_byte_offsets": services,
            "fd_sizes": sizes,
        }
        RECORDING_NOTE.write_text(json.dumps(note, indent=2) + "\n")
    recorded = json.loads(RECORDING_NOTE.read_text())
    if recorded["qemu"] != version:
        pytest.skip(f"the recording is from QEMU {recorded['qemu']}, this is {version}")
    assert bytes(data) == RECORDING.read_bytes()
    assert services == recorded["service_byte_offsets"]


# ------------------------------------------------- replays of the recording (no QEMU needed)


def recording() -> tuple[bytes, list[int], list[int]]:
    note = json.loads(RECORDING_NOTE.read_text())
    return RECORDING.read_bytes(), note["service_byte_offsets"], note["fd_sizes"]


def dummy_memfds(sizes: list[int]) -> list[int]:
    fds = []
    for i, size in enumerate(sizes):
        fd = os.memfd_create(f"replay-{i}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        fds.append(fd)
    return fds


def expected_names(data: bytes, services: list[int]) -> list[str]:
    """The fd names, read from the recording by the documented layout (not by our parser).

    Each entry is ``0x01``, ``be32 namelen``, the name with its NUL, ``be32 id``
    and then the service byte, so the name ends 5 bytes before the service byte.
    """
    names = []
    for off in services:
        end = off - 5  # NUL
        start = data.rindex(b"\x01", 0, end - 4)
        while struct.unpack(">I", data[start + 1 : start + 5])[0] != end - start - 4:
            start = data.rindex(b"\x01", 0, start)
        names.append(data[start + 5 : end].decode())
    return names


def test_recorded_qemu_stream_replays_over_a_socket_one_fd_per_message() -> None:
    data, services, sizes = recording()
    assert data[:8] == b"QCPR\x00\x00\x00\x01"
    fds = dummy_memfds(sizes)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        start = 0
        for off, fd in zip(services, fds, strict=True):  # QEMU's way: one fd per sendmsg
            _core.sendmsg_fds(a.fileno(), data[start : off + 1], [fd])
            start = off + 1
        a.sendall(data[start:])
        a.shutdown(socket.SHUT_WR)
        with receive_state(b, timeout=10) as state:
            entries = state.entries()
            assert [name for name, _, _ in entries] == expected_names(data, services)
            assert [os.fstat(fd).st_size for _, _, fd in entries] == sizes
            assert [os.readlink(f"/proc/self/fd/{fd}") for _, _, fd in entries] == [
                f"/memfd:replay-{i} (deleted)" for i in range(len(fds))
            ]
    finally:
        a.close()
        b.close()
        for fd in fds:
            os.close(fd)


def test_recorded_qemu_stream_decodes_in_number_mode() -> None:
    """The same stream as cpr-exec writes it: each service byte becomes the fd's be32 number."""
    data, services, sizes = recording()
    fds = dummy_memfds(sizes)
    numbered = bytearray()
    start = 0
    for off, fd in zip(services, fds, strict=True):
        numbered += data[start:off] + struct.pack(">i", fd)
        start = off + 1
    numbered += data[start:]
    with decode(StreamReader(bytes(numbered), inline_fds=False)) as state:  # adopts (and closes) fds
        assert [fd for _, _, fd in state.entries()] == fds
        assert [name for name, _, _ in state.entries()] == expected_names(data, services)


def test_every_truncation_of_the_recorded_stream_is_refused_without_leaking_fds() -> None:
    data, services, sizes = recording()
    before = set(os.listdir("/proc/self/fd"))
    for cut in range(len(data)):
        fds = dummy_memfds([sizes[i] for i, off in enumerate(services) if off < cut])
        with pytest.raises(StreamError, match="truncated cpr stream"):
            decode(StreamReader(data[:cut], fds, inline_fds=True))  # closes every fd it was given
    assert set(os.listdir("/proc/self/fd")) == before
