"""CPR state: the fd registry, QEMU's cpr stream byte for byte, in-band and exec transport, early load."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _vmm import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cprfast import cpr_state as cs
from cprfast.channels import FdAddress, TcpAddress, UnixAddress
from cprfast.cpr_state import CprState, StreamReader, VfioDevice, decode, encode
from cprfast.errors import CprError, MigrationError, StreamError

# ---------------------------------------------------------------- helpers


def open_fds() -> set[int]:
    """The fds open in this process (the listing's own, closed by now, drops out)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        out.add(int(name))
    return out


def inode(fd: int) -> tuple[int, int]:
    s = os.fstat(fd)
    return (s.st_dev, s.st_ino)


@pytest.fixture
def memfds() -> Iterator[Callable[[int], list[int]]]:
    """Make n fresh memfds; all are closed after the test."""
    made: list[int] = []

    def make(n: int) -> list[int]:
        fds = [os.memfd_create(f"t{len(made) + i}", os.MFD_CLOEXEC) for i in range(n)]
        made.extend(fds)
        return fds

    yield make
    for fd in made:
        os.close(fd)


@pytest.fixture(autouse=True)
def _no_incoming_mode() -> Iterator[None]:
    cs.reset_incoming_mode()
    yield
    cs.reset_incoming_mode()


# ------------------------------------------------------------------ the reference format, written by hand
# These helpers spell out QEMU's CprState stream from migration/cpr.c and
# vmstate-types.c, independently of cprfast's encoder.

REF_HEADER = struct.pack(">II", 0x51435052, 1)
REF_VFIO_HEADER = b"\x05" + bytes([len(b"CprState/vfio devices")]) + b"CprState/vfio devices" + struct.pack(">I", 1)


def ref_fd_entry(name: bytes, id: int, fd_field: bytes) -> bytes:
    return b"\x01" + struct.pack(">I", len(name) + 1) + name + b"\x00" + struct.pack(">i", id) + fd_field


def ref_vfio_entry(name: bytes, devid: int, ioas_id: int, hwpt_id: int) -> bytes:
    return b"\x01" + struct.pack(">I", len(name) + 1) + name + b"\x00" + struct.pack(">iII", devid, ioas_id, hwpt_id)


def ref_stream(fd_entries: list[bytes], vfio_entries: list[bytes] | None = None) -> bytes:
    """A whole stream; ``vfio_entries=None`` means no VFIO list at all (a QEMU without iommufd)."""
    out = REF_HEADER + b"".join(fd_entries) + b"\x00" + REF_VFIO_HEADER
    if vfio_entries is not None:
        out += b"".join(vfio_entries) + b"\x00"
    return out


def NUM(fd: int) -> bytes:  # noqa: N802 - reads like the constant SERVICE beside it
    """The cpr-exec fd field: the fd number."""
    return struct.pack(">i", fd)


SERVICE = b" "  # cpr-transfer fd field; the fd rides in SCM_RIGHTS


# ------------------------------------------------------------------ registry


def test_registry_save_find_delete_owns_copies(memfds: Callable[[int], list[int]]) -> None:
    (a, b) = memfds(2)
    with CprState() as state:
        copy = state.save_fd("pc.ram", 0, a)
        assert copy != a and inode(copy) == inode(a)
        assert not os.get_inheritable(copy)
        assert state.find_fd("pc.ram", 0) == copy
        assert state.find_fd("pc.ram", 1) is None
        assert ("pc.ram", 0) in state and len(state) == 1
        state.save_fd("vfio0_interrupt", 3, b)
        assert [(n, i) for n, i, _ in state.entries()] == [("vfio0_interrupt", 3), ("pc.ram", 0)]  # newest first
        state.delete_fd("pc.ram", 0)
        with pytest.raises(OSError):
            os.fstat(copy)  # the registry's copy is closed ...
        os.fstat(a)  # ... the caller's fd is not
        state.delete_fd("pc.ram", 0)  # absent: no-op, as in QEMU
        assert len(state) == 1


def test_registry_duplicate_and_resave(memfds: Callable[[int], list[int]]) -> None:
    (a, b) = memfds(2)
    with CprState() as state:
        held = state.save_fd("tap", 1, a)
        with pytest.raises(CprError) as e:
            state.save_fd("tap", 1, a)
        assert str(e.value) == "cpr fd 'tap' id 1 is already saved"
        state.resave_fd("tap", 1, a)  # same kernel object (the caller's fd): no-op
        state.resave_fd("tap", 1, held)  # the registry's own fd: no-op
        assert len(state) == 1 and state.find_fd("tap", 1) == held
        with pytest.raises(CprError) as e:
            state.resave_fd("tap", 1, b)
        assert str(e.value) == f"cpr fd 'tap' id 1 value {b} already saved with a different value {held}"
        state.resave_fd("tap", 2, b)  # absent: saved
        assert inode(state.find_fd("tap", 2) or -1) == inode(b)


def test_registry_walk_delete_all_preserve_close(memfds: Callable[[int], list[int]]) -> None:
    fds = memfds(4)
    state = CprState()
    for i, fd in enumerate(fds[:3]):
        state.save_fd("vec", i, fd)
    state.save_fd("other", 0, fds[3])
    seen: list[tuple[str, int]] = []

    def visit(name: str, id: int, fd: int) -> bool:
        seen.append((name, id))
        return name == "other" or len(seen) < 99

    assert state.walk_fd(visit)
    assert seen == [("other", 0), ("vec", 2), ("vec", 1), ("vec", 0)]
    seen.clear()
    seen.extend([("pad", 0)] * 97)
    assert not state.walk_fd(visit)
    assert seen[97:] == [("other", 0), ("vec", 2)]  # stopped at the first False
    state.preserve()
    assert all(os.get_inheritable(fd) for _, _, fd in state.entries())
    state.unpreserve()
    assert not any(os.get_inheritable(fd) for _, _, fd in state.entries())
    before = open_fds()
    state.delete_all("vec")
    assert [(n, i) for n, i, _ in state.entries()] == [("other", 0)]
    assert len(before - open_fds()) == 3
    state.vfio_devices.append(VfioDevice("d", 1, 2, 3))
    state.close()
    assert len(state) == 0 and state.vfio_devices == []
    assert len(before - open_fds()) == 4


@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [
        (lambda s, fd: s.save_fd("a\0b", 0, fd), ValueError, "cpr fd name 'a\\x00b' contains a NUL character"),
        (lambda s, fd: s.save_fd("x" * 4096, 0, fd), ValueError, "cpr fd name is 4097 bytes with its NUL; the limit is 4096"),
        (lambda s, fd: s.save_fd("a", 1 << 31, fd), ValueError, "cpr fd id 2147483648 does not fit in 32 signed bits"),
        (lambda s, fd: s.save_fd(b"a", 0, fd), TypeError, "cpr fd name must be a str, not bytes"),
        (lambda s, fd: VfioDevice("d", 0, -1, 0), ValueError, "vfio ioas_id -1 does not fit in 32 unsigned bits"),
        (lambda s, fd: VfioDevice("d", 0, 0, 1 << 32), ValueError, "vfio hwpt_id 4294967296 does not fit in 32 unsigned bits"),
        (lambda s, fd: VfioDevice("d", 1 << 31, 0, 0), ValueError, "vfio devid 2147483648 does not fit in 32 signed bits"),
    ],
)
def test_registry_rejects_bad_keys(
    memfds: Callable[[int], list[int]], call: Callable[[CprState, int], object], exc: type[Exception], message: str
) -> None:
    (fd,) = memfds(1)
    with CprState() as state:
        with pytest.raises(exc) as e:
            call(state, fd)
        assert str(e.value) == message
        assert len(state) == 0


def test_save_fd_of_closed_fd_is_ebadf() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with CprState() as state, pytest.raises(OSError) as e:
        state.save_fd("gone", 0, r)
    assert e.value.errno == 9  # EBADF
    assert len(state) == 0


# --------------------------------------------------------- byte for byte vs the reference format


def test_encoder_matches_reference_bytes(memfds: Callable[[int], list[int]]) -> None:
    (a, b) = memfds(2)
    with CprState() as state:
        state.save_fd("vfio0_interrupt", 3, a)
        state.save_fd("pc.ram", 0, b)
        state.vfio_devices.append(VfioDevice("vfio0", 7, 1, 2))
        ram, vec = state.find_fd("pc.ram", 0), state.find_fd("vfio0_interrupt", 3)
        assert ram is not None and vec is not None
        expected_num = ref_stream(
            [ref_fd_entry(b"pc.ram", 0, NUM(ram)), ref_fd_entry(b"vfio0_interrupt", 3, NUM(vec))],
            [ref_vfio_entry(b"vfio0", 7, 1, 2)],
        )
        assert encode(state, inline_fds=False) == (expected_num, [ram, vec])
        expected_inline = ref_stream(
            [ref_fd_entry(b"pc.ram", 0, SERVICE), ref_fd_entry(b"vfio0_interrupt", 3, SERVICE)],
            [ref_vfio_entry(b"vfio0", 7, 1, 2)],
        )
        assert encode(state, inline_fds=True) == (expected_inline, [ram, vec])
    with CprState() as empty:
        assert encode(empty, inline_fds=True) == (REF_HEADER + b"\x00" + REF_VFIO_HEADER + b"\x00", [])


def test_decode_reference_number_mode(memfds: Callable[[int], list[int]]) -> None:
    (a, b) = memfds(2)
    da, db = os.dup(a), os.dup(b)  # "inherited" fds; the decoded state adopts these numbers
    data = ref_stream(
        [ref_fd_entry(b"pc.ram", 0, NUM(da)), ref_fd_entry("ünï".encode(), -5, NUM(db))],
        [ref_vfio_entry(b"vfio1", -1, 0xFFFFFFFF, 9), ref_vfio_entry(b"vfio0", 2, 3, 4)],
    )
    state = decode(StreamReader(data, inline_fds=False))
    assert state.entries() == [("pc.ram", 0, da), ("ünï", -5, db)]
    assert state.vfio_devices == [VfioDevice("vfio1", -1, 0xFFFFFFFF, 9), VfioDevice("vfio0", 2, 3, 4)]
    assert encode(state, inline_fds=False)[0] == data  # re-encoding keeps QEMU's order
    state.close()
    for fd in (da, db):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_non_utf8_names_round_trip(memfds: Callable[[int], list[int]]) -> None:
    (fd,) = memfds(1)
    data = ref_stream([ref_fd_entry(b"\xff\xfedev", 0, SERVICE)], [ref_vfio_entry(b"\x80", 1, 2, 3)])
    state = decode(StreamReader(data, [os.dup(fd)], inline_fds=True))
    assert [n for n, _, _ in state.entries()] == ["\udcff\udcfedev"]
    assert encode(state, inline_fds=True)[0] == data
    state.close()


def _qemu_writer(sock: socket.socket, pieces: list[bytes | int]) -> None:
    """QEMU's writer: buffered bytes are flushed, then each fd goes alone with its ' ' in one sendmsg."""
    for piece in pieces:
        if isinstance(piece, int):
            assert socket.send_fds(sock, [SERVICE], [piece]) == 1
        else:
            sock.sendall(piece)
    sock.shutdown(socket.SHUT_WR)


def test_decode_reference_in_band_one_fd_per_message(memfds: Callable[[int], list[int]]) -> None:
    fds = memfds(3)
    names = [b"pc.ram", b"vfio0_interrupt", b"vfio0_kvm_interrupt"]
    pieces: list[bytes | int] = [REF_HEADER]
    for i, (name, fd) in enumerate(zip(names, fds, strict=True)):
        pieces += [ref_fd_entry(name, i, b""), fd]
    pieces.append(b"\x00" + REF_VFIO_HEADER + ref_vfio_entry(b"vfio0", 1, 2, 3) + b"\x00")
    assert b"".join(SERVICE if isinstance(p, int) else p for p in pieces) == ref_stream(
        [ref_fd_entry(n, i, SERVICE) for i, n in enumerate(names)], [ref_vfio_entry(b"vfio0", 1, 2, 3)]
    )
    a, b = socket.socketpair()
    writer = threading.Thread(target=_qemu_writer, args=(a, pieces))
    before = open_fds()
    writer.start()
    state = cs.receive_state(b, timeout=10)
    writer.join()
    try:
        got = state.entries()
        assert [(n, i) for n, i, _ in got] == [(n.decode(), i) for i, n in enumerate(names)]
        assert [inode(fd) for _, _, fd in got] == [inode(fd) for fd in fds]  # the very same kernel objects
        assert all(not os.get_inheritable(fd) for _, _, fd in got)  # MSG_CMSG_CLOEXEC
        assert state.vfio_devices == [VfioDevice("vfio0", 1, 2, 3)]
    finally:
        state.close()
        a.close()
        b.close()
    assert open_fds() <= before


def test_decode_qemu_without_iommufd_and_qemu_10_0_streams(memfds: Callable[[int], list[int]]) -> None:
    (fd,) = memfds(1)
    # QEMU built without iommufd: the subsection is there but has no fields
    stub = ref_stream([ref_fd_entry(b"m", 0, SERVICE)], None)
    # QEMU 10.0 (before the VFIO subsection existed): the fd list and nothing else
    v10_0 = REF_HEADER + ref_fd_entry(b"m", 0, SERVICE) + b"\x00"
    for data in (stub, v10_0):
        state = decode(StreamReader(data, [os.dup(fd)], inline_fds=True))
        assert [(n, i) for n, i, _ in state.entries()] == [("m", 0)]
        assert state.vfio_devices == []
        state.close()


# ------------------------------------------------------------------ errors


def _decode_error(data: bytes, fds: list[int] | None = None, *, inline: bool = True) -> str:
    with pytest.raises(StreamError) as e:
        decode(StreamReader(data, fds or [], inline_fds=inline))
    return str(e.value)


GOOD_ENTRY = ref_fd_entry(b"a", 1, SERVICE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack(">II", 0x51435053, 1), "Not a migration stream (bad magic 51435053)"),
        (b"QEVM" + b"\0\0\0\3", "Not a migration stream (bad magic 5145564d)"),
        (REF_HEADER[:4] + struct.pack(">I", 2), "Unsupported migration stream version 2"),
        (REF_HEADER[:4] + b"\xff\xff\xff\xff", "Unsupported migration stream version -1"),
        (b"", "truncated cpr stream: magic needs 4 bytes at offset 0, only 0 left"),
        (REF_HEADER[:6], "truncated cpr stream: version needs 4 bytes at offset 4, only 2 left"),
        (REF_HEADER, "truncated cpr stream: cpr fd list marker needs 1 bytes at offset 8, only 0 left"),
        (REF_HEADER + b"\x02", "bad cpr fd list marker 0x02 (expected 0x00 or 0x01)"),
        (REF_HEADER + b"\x01" + struct.pack(">I", 0), "cpr fd name length 0 is out of range (1..4096)"),
        (REF_HEADER + b"\x01" + struct.pack(">I", 0xFFFFFFFF), "cpr fd name length 4294967295 is out of range (1..4096)"),
        (REF_HEADER + b"\x01" + struct.pack(">I", 4097), "cpr fd name length 4097 is out of range (1..4096)"),
        (REF_HEADER + b"\x01" + struct.pack(">I", 100) + b"ab",
         "truncated cpr stream: cpr fd name needs 100 bytes at offset 13, only 2 left"),
        (REF_HEADER + b"\x01" + struct.pack(">I", 2) + b"ab", "cpr fd name is not NUL-terminated"),
        (REF_HEADER + b"\x01" + struct.pack(">I", 3) + b"a\0\0", "cpr fd name has a NUL byte inside"),
        (REF_HEADER + ref_fd_entry(b"a", 1, b"A"), "cpr-in unexpected service byte: 65(A)"),
        (REF_HEADER + ref_fd_entry(b"a", 1, b"\x00"), "cpr-in unexpected service byte: 0(?)"),
        (REF_HEADER + GOOD_ENTRY, "cpr-in no FD come with service byte"),
        (REF_HEADER + b"\x00\x05\x15CprState/vfio deviceX" + struct.pack(">I", 1),
         "VM subsection 'CprState/vfio deviceX' in 'CprState' does not exist"),
        (REF_HEADER + b"\x00\x05\x03abc", "VM subsection 'abc' in 'CprState' does not exist"),
        (REF_HEADER + b"\x00" + REF_VFIO_HEADER[:-4] + struct.pack(">I", 2),
         "CprState/vfio devices: incoming version_id 2 is too new for local version_id 1"),
        (REF_HEADER + b"\x00" + REF_VFIO_HEADER[:-4] + struct.pack(">I", 0),
         "CprState/vfio devices: incoming version_id 0 is too old for local minimum_version_id 1"),
        (REF_HEADER + b"\x00" + REF_VFIO_HEADER + b"\x01" + struct.pack(">I", 5000),
         "cpr vfio device name length 5000 is out of range (1..4096)"),
        (REF_HEADER + b"\x00" + REF_VFIO_HEADER + b"\x07", "bad cpr vfio device list marker 0x07 (expected 0x00 or 0x01)"),
        (REF_HEADER + b"\x00" + REF_VFIO_HEADER + ref_vfio_entry(b"d", 1, 2, 3)[:-2],
         "truncated cpr stream: vfio hwpt_id needs 4 bytes at offset 51, only 2 left"),
        (REF_HEADER + b"\x00" + REF_VFIO_HEADER + ref_vfio_entry(b"d", 1, 2, 3),
         "truncated cpr stream: cpr vfio device list marker needs 1 bytes at offset 55, only 0 left"),
    ],
)
def test_decode_error_messages(data: bytes, message: str) -> None:
    assert _decode_error(data) == message


def test_decode_errors_close_every_received_fd(memfds: Callable[[int], list[int]]) -> None:
    (fd,) = memfds(1)
    before = open_fds()
    # two fds claimed by good entries, then a bad marker, plus one never claimed
    data = REF_HEADER + ref_fd_entry(b"a", 1, SERVICE) + ref_fd_entry(b"b", 2, SERVICE) + b"\x09"
    received = [os.dup(fd) for _ in range(3)]
    assert _decode_error(data, received) == "bad cpr fd list marker 0x09 (expected 0x00 or 0x01)"
    assert open_fds() == before


def test_decode_duplicate_key_is_refused(memfds: Callable[[int], list[int]]) -> None:
    (fd,) = memfds(1)
    before = open_fds()
    data = ref_stream([GOOD_ENTRY, GOOD_ENTRY], [])
    assert _decode_error(data, [os.dup(fd), os.dup(fd)]) == "cpr fd 'a' id 1 appears twice in the stream"
    assert open_fds() == before


def test_unclaimed_fds_are_closed_with_warning(memfds: Callable[[int], list[int]], caplog: pytest.LogCaptureFixture) -> None:
    (fd,) = memfds(1)
    before = open_fds()
    extra = os.dup(fd)
    claimed = os.dup(fd)
    with caplog.at_level(logging.WARNING, logger="cprfast.cpr_state"):
        state = decode(StreamReader(ref_stream([GOOD_ENTRY], []), [claimed, extra], inline_fds=True))
    assert f"received fd {extra} was never claimed" in caplog.messages
    assert state.entries() == [("a", 1, claimed)]
    state.close()
    assert open_fds() == before


def test_number_mode_fd_must_be_open_and_repeats_get_their_own_fd(memfds: Callable[[int], list[int]]) -> None:
    (fd,) = memfds(1)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    before = open_fds()
    data = ref_stream([ref_fd_entry(b"a", 1, NUM(r))], [])
    assert _decode_error(data, inline=False) == f"cpr fd 'a' id 1: fd {r} is not open in this process"
    assert _decode_error(ref_stream([ref_fd_entry(b"a", 1, NUM(-3))], []), inline=False) == (
        "cpr fd 'a' id 1: fd -3 is not open in this process"
    )
    mine = os.dup(fd)
    data = ref_stream([ref_fd_entry(b"a", 1, NUM(mine)), ref_fd_entry(b"b", 2, NUM(mine))], [])
    state = decode(StreamReader(data, inline_fds=False))
    (_, _, fa), (_, _, fb) = state.entries()
    assert fa == mine and fb != mine and inode(fb) == inode(mine)
    state.close()
    assert open_fds() == before
    # a later entry naming the number our dup happened to get still owns a distinct fd
    mine = os.dup(fd)
    predicted = min(set(range(max(open_fds()) + 2)) - open_fds())
    data = ref_stream([ref_fd_entry(n, 0, NUM(x)) for n, x in ((b"a", mine), (b"b", mine), (b"c", predicted))], [])
    state = decode(StreamReader(data, inline_fds=False))
    held = [fd for _, _, fd in state.entries()]
    assert held[1] == predicted and len(set(held)) == 3
    state.close()
    assert open_fds() == before
    # a repeated number whose dup was made, then an error: the dup is closed, the adopted fd is not
    mine = os.dup(fd)
    data = REF_HEADER + ref_fd_entry(b"a", 1, NUM(mine)) + ref_fd_entry(b"b", 2, NUM(mine)) + b"\x03"
    assert _decode_error(data, inline=False) == "bad cpr fd list marker 0x03 (expected 0x00 or 0x01)"
    assert open_fds() == before | {mine}
    os.close(mine)


def test_too_many_entries(monkeypatch: pytest.MonkeyPatch, memfds: Callable[[int], list[int]]) -> None:
    monkeypatch.setattr(cs, "MAX_ENTRIES", 2)
    (fd,) = memfds(1)
    before = open_fds()
    data = ref_stream([ref_fd_entry(n, 0, SERVICE) for n in (b"a", b"b", b"c")], [])
    assert _decode_error(data, [os.dup(fd) for _ in range(3)]) == "cpr fd list has more than 2 entries"
    assert open_fds() == before


def test_every_truncation_of_a_valid_stream(memfds: Callable[[int], list[int]]) -> None:
    fds = memfds(2)
    data = ref_stream([ref_fd_entry(b"x", 0, SERVICE), ref_fd_entry(b"y", 1, SERVICE)], [ref_vfio_entry(b"d", 1, 2, 3)])
    list_end = len(REF_HEADER) + 2 * len(ref_fd_entry(b"x", 0, SERVICE)) + 1  # a QEMU 10.0 stream ends here
    stub_end = list_end + len(REF_VFIO_HEADER)  # a QEMU without iommufd ends here
    complete = {list_end, stub_end, len(data)}
    before = open_fds()
    for cut in range(len(data) + 1):
        reader = StreamReader(data[:cut], [os.dup(fd) for fd in fds], inline_fds=True)
        if cut in complete:
            decode(reader).close()
        else:
            with pytest.raises(StreamError, match="^truncated cpr stream: "):
                decode(reader)
        assert open_fds() == before


# ------------------------------------------------------------------ in-band over a socket


def _send_in_thread(state: CprState, sock: socket.socket, **kw: int) -> threading.Thread:
    t = threading.Thread(target=cs.send_state, args=(state, sock), kwargs=kw)
    t.start()
    return t


@pytest.mark.parametrize("per_message", [1, 16, 253])
def test_600_fds_round_trip_over_socketpair_no_leaks(memfds: Callable[[int], list[int]], per_message: int) -> None:
    fds = memfds(600)
    before = open_fds()
    source = CprState()
    for i, fd in enumerate(fds):
        source.save_fd("ram" if i % 2 else "vec", i, fd)
    source.vfio_devices.append(VfioDevice("vfio0", 1, 2, 3))
    a, b = socket.socketpair()
    t = _send_in_thread(source, a, fds_per_message=per_message)
    target = cs.receive_state(b, timeout=30)
    t.join()
    assert [(n, i) for n, i, _ in target.entries()] == [(n, i) for n, i, _ in source.entries()]
    assert [inode(fd) for _, _, fd in target.entries()] == [inode(fd) for _, _, fd in source.entries()]
    assert target.vfio_devices == source.vfio_devices
    b.close()  # the target closing its end is the source's HUP
    assert cs.wait_hup(a, timeout=10)
    a.close()
    target.close()
    source.close()
    assert open_fds() == before


@pytest.mark.parametrize(("count", "per_message", "messages"), [(0, 16, 1), (2, 253, 1), (16, 16, 1), (17, 16, 2), (600, 253, 3)])
def test_outgoing_state_splits_at_service_bytes(
    memfds: Callable[[int], list[int]], count: int, per_message: int, messages: int
) -> None:
    """Each message carries its fds on its first byte and holds their service bytes; a state
    whose fds fit in one message is one message (one sendmsg on a pause path)."""
    with CprState() as state:
        for i, fd in enumerate(memfds(count)):
            state.save_fd(f"m{i}", 0, fd)
        out = cs.OutgoingState(state, fds_per_message=per_message)
        data, fds = encode(state, inline_fds=True)
        assert len(out.messages) == messages
        assert b"".join(m for m, _ in out.messages) == data
        assert [fd for _, batch in out.messages for fd in batch] == fds
        for i, (message, batch) in enumerate(out.messages):
            assert len(batch) <= per_message
            services = message.count(b"\x00" * 5 + SERVICE)  # a name's NUL, id 0, a service byte
            if i:
                assert message[:1] == SERVICE, "a later message starts at its first fd's service byte"
                services += 1
            assert services == len(batch)


def test_outgoing_state_of_two_fds_arrives_in_one_recvmsg(memfds: Callable[[int], list[int]]) -> None:
    with CprState() as state:
        for i, fd in enumerate(memfds(2)):
            state.save_fd("dev", i, fd)
        a, b = socket.socketpair()
        cs.OutgoingState(state, fds_per_message=cs.SCM_MAX_FD).send(a)
        data, fds, _, _ = socket.recv_fds(b, 4096, 10)
        assert data == encode(state, inline_fds=True)[0]
        assert len(fds) == 2
        assert b.recv(1) == b"", "the write side is shut after the send"
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_take_all_moves_fds_without_duplicates(memfds: Callable[[int], list[int]]) -> None:
    x, y, z = memfds(3)
    before = open_fds()
    with CprState() as into, CprState() as other:
        into.save_fd("ram", 0, x)
        other.save_fd("dev", 0, y)
        moved = other.find_fd("dev", 0)
        into.take_all(other)
        assert len(other) == 0
        assert into.find_fd("dev", 0) == moved, "the very fd moves: no dup"
        clash = CprState()
        clash.save_fd("ram", 0, z)
        with pytest.raises(CprError, match="cpr fd 'ram' id 0 is already saved"):
            into.take_all(clash)
        assert len(clash) == 1 and len(into) == 2, "a refused move moves nothing"
        clash.close()
    assert open_fds() == before


def test_wait_hup_times_out_while_target_holds_socket(memfds: Callable[[int], list[int]]) -> None:
    with CprState() as state:
        state.save_fd("m", 0, memfds(1)[0])
        a, b = socket.socketpair()
        t = _send_in_thread(state, a)
        received = cs.receive_state(b, timeout=10)
        t.join()
        b.sendall(b"noise")  # bytes from the target are discarded, not a HUP
        assert not cs.wait_hup(a, timeout=0.1)
        b.close()
        assert cs.wait_hup(a, timeout=10)
        a.close()
        received.close()


def test_receive_timeout_closes_partial_fds(memfds: Callable[[int], list[int]]) -> None:
    (fd,) = memfds(1)
    a, b = socket.socketpair()
    before = open_fds()
    head = REF_HEADER + ref_fd_entry(b"a", 1, b"")
    a.sendall(head)
    socket.send_fds(a, [SERVICE], [fd])  # one fd arrives, then the source stalls
    with pytest.raises(TimeoutError, match="timed out"):
        cs.receive_state(b, timeout=0.2)
    assert open_fds() == before
    a.close()
    b.close()


def test_receive_from_dead_source_is_truncated() -> None:
    a, b = socket.socketpair()
    a.sendall(REF_HEADER + b"\x01")
    a.close()
    with pytest.raises(StreamError) as e:
        cs.receive_state(b, timeout=5)
    assert str(e.value) == "truncated cpr stream: cpr fd name length needs 4 bytes at offset 9, only 0 left"
    b.close()


def test_send_state_argument_check() -> None:
    a, b = socket.socketpair()
    with CprState() as state, pytest.raises(ValueError) as e:
        cs.send_state(state, a, fds_per_message=0)
    assert str(e.value) == "fds_per_message must be in 1..253, not 0"
    a.close()
    b.close()


def test_transfer_outgoing_and_load_incoming_over_unix(memfds: Callable[[int], list[int]], tmp_path: Path) -> None:
    fds = memfds(5)
    path = str(tmp_path / "cpr.sock")
    source = CprState()
    for i, fd in enumerate(fds):
        source.save_fd("pc.ram", i, fd)
    result: list[cs.IncomingCpr | None] = []
    target = threading.Thread(
        target=lambda: result.append(cs.load_incoming(cpr_channel=UnixAddress(path), environ={}, timeout=20))
    )
    target.start()
    wait_until(lambda: os.path.exists(path), what="cpr listener")  # (the file appears only once it listens)
    sock = cs.transfer_outgoing(source, UnixAddress(path), timeout=20)
    target.join()
    (incoming,) = result
    assert incoming is not None and incoming.mode == "cpr-transfer"
    assert cs.incoming_mode() == "cpr-transfer"
    assert [inode(fd) for _, _, fd in incoming.state.entries()] == [inode(fd) for _, _, fd in source.entries()]
    assert not os.path.exists(path)  # the listener is gone once the client is accepted
    assert incoming.channel_sock is not None
    assert not cs.wait_hup(sock, timeout=0.05)  # the target keeps the channel open ...
    incoming.channel_sock.close()  # ... until its main channel listens
    assert cs.wait_hup(sock, timeout=10)
    sock.close()
    incoming.state.close()
    source.close()


def test_load_incoming_from_prelistened_fd(memfds: Callable[[int], list[int]], tmp_path: Path) -> None:
    path = str(tmp_path / "pre.sock")
    pre = socket.socket(socket.AF_UNIX)
    pre.bind(path)
    pre.listen(1)
    with CprState() as source:
        source.save_fd("m", 0, memfds(1)[0])
        result: list[cs.IncomingCpr | None] = []
        target = threading.Thread(
            target=lambda: result.append(cs.load_incoming(cpr_channel=FdAddress(pre.detach()), environ={}, timeout=20))
        )
        target.start()
        sock = cs.transfer_outgoing(source, UnixAddress(path), timeout=20)
        target.join()
        (incoming,) = result
        assert incoming is not None and [(n, i) for n, i, _ in incoming.state.entries()] == [("m", 0)]
        assert incoming.channel_sock is not None
        incoming.channel_sock.close()
        assert cs.wait_hup(sock, timeout=10)
        sock.close()
        incoming.state.close()


def test_channel_type_errors() -> None:
    with CprState() as state, pytest.raises(MigrationError) as e:
        cs.transfer_outgoing(state, TcpAddress("localhost", 1))
    assert str(e.value) == "bad cpr channel address; must be unix"
    with pytest.raises(MigrationError) as e:
        cs.load_incoming(cpr_channel=TcpAddress("localhost", 1), environ={})
    assert str(e.value) == "bad cpr channel socket type; must be unix"
    assert cs.load_incoming(cpr_channel=None, environ={}) is None
    assert cs.incoming_mode() is None


# ------------------------------------------------------------------ cpr-exec


def test_exec_state_memfd_env_and_load(memfds: Callable[[int], list[int]], caplog: pytest.LogCaptureFixture) -> None:
    fds = memfds(3)
    source = CprState()
    for i, fd in enumerate(fds):
        source.save_fd("pc.ram", i, fd)
    source.vfio_devices.append(VfioDevice("vfio0", 4, 5, 6))
    state_fd = cs.write_exec_state(source)
    assert os.readlink(f"/proc/self/fd/{state_fd}") == "/memfd:QEMU_CPR_EXEC_STATE (deleted)"
    assert not os.get_inheritable(state_fd)
    env: dict[str, str] = {"OTHER": "1"}
    cs.persist_exec_state(state_fd, env)
    assert env == {"OTHER": "1", "QEMU_CPR_EXEC_STATE": str(state_fd)} and os.get_inheritable(state_fd)
    cs.unpersist_exec_state(state_fd, env)
    assert env == {"OTHER": "1"} and not os.get_inheritable(state_fd)
    cs.unpersist_exec_state(state_fd, env)  # tolerated twice (QEMU would assert)
    cs.persist_exec_state(state_fd, env)
    source.preserve()
    # "after exec": the loader adopts the same numbers; the source object is dropped without closing
    with caplog.at_level(logging.INFO, logger="cprfast.cpr_state"):
        incoming = cs.load_incoming(cpr_channel=UnixAddress("/nonexistent/cpr.sock"), environ=env)
    assert "ignoring cpr channel for migration mode cpr-exec" in caplog.messages
    assert incoming is not None and incoming.mode == "cpr-exec" and incoming.channel_sock is None
    assert cs.incoming_mode() == "cpr-exec"
    assert "QEMU_CPR_EXEC_STATE" not in env
    with pytest.raises(OSError):
        os.fstat(state_fd)  # the state memfd is closed after loading
    assert incoming.state.entries() == source.entries()
    assert incoming.state.vfio_devices == source.vfio_devices
    assert not any(os.get_inheritable(fd) for _, _, fd in incoming.state.entries())  # CLOEXEC restored
    incoming.state.close()


def test_exec_state_survives_into_a_child_process(memfds: Callable[[int], list[int]], tmp_path: Path) -> None:
    fds = memfds(4)
    with CprState() as source:
        for i, fd in enumerate(fds):
            source.save_fd(f"dev{i}", i * 10, fd)
        state_fd = cs.write_exec_state(source)
        env = dict(os.environ)
        cs.persist_exec_state(state_fd, env)
        source.preserve()
        child = (
            "import json, os\n"
            "from cprfast import cpr_state as cs\n"
            "inc = cs.load_incoming(cpr_channel=None)\n"
            "out = {'mode': cs.incoming_mode(), 'env': os.environ.get('QEMU_CPR_EXEC_STATE'),\n"
            "       'entries': [(n, i, os.fstat(fd).st_ino, os.get_inheritable(fd)) for n, i, fd in inc.state.entries()]}\n"
            "inc.state.close()\n"
            "print(json.dumps(out))\n"
        )
        held = [fd for _, _, fd in source.entries()]
        proc = subprocess.run(
            [sys.executable, "-c", child], env=env, pass_fds=(state_fd, *held), capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["mode"] == "cpr-exec" and out["env"] is None
        assert out["entries"] == [[n, i, os.fstat(fd).st_ino, False] for n, i, fd in source.entries()]
        cs.unpersist_exec_state(state_fd, env)
        os.close(state_fd)


def test_exec_env_errors(memfds: Callable[[int], list[int]]) -> None:
    env = {"QEMU_CPR_EXEC_STATE": "abc"}
    with pytest.raises(StreamError) as e:
        cs.load_incoming(cpr_channel=None, environ=env)
    assert str(e.value) == "QEMU_CPR_EXEC_STATE='abc' is not an fd number"
    assert env == {}
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(StreamError) as e:
        cs.load_incoming(cpr_channel=None, environ={"QEMU_CPR_EXEC_STATE": str(r)})
    assert str(e.value) == f"cannot read cpr-exec state from fd {r}: Bad file descriptor"
    (bad,) = memfds(1)
    junk = os.dup(bad)
    os.write(junk, b"QEVM\0\0\0\3")
    with pytest.raises(StreamError) as e:
        cs.load_incoming(cpr_channel=None, environ={"QEMU_CPR_EXEC_STATE": str(junk)})
    assert str(e.value) == "Not a migration stream (bad magic 5145564d)"
    with pytest.raises(OSError):
        os.fstat(junk)  # closed even though the state was bad
    assert cs.incoming_mode() is None


# ------------------------------------------------------------------ properties

_names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)
_ids = st.integers(-(1 << 31), (1 << 31) - 1)
_vfio = st.builds(VfioDevice, _names, _ids, st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1))
_registries = st.tuples(
    st.lists(st.tuples(_names, _ids), unique=True, max_size=12),
    st.lists(_vfio, max_size=4),
)


def _build(keys: list[tuple[str, int]], devices: list[VfioDevice]) -> CprState:
    state = CprState()
    for name, id in keys:
        fd = os.memfd_create("p", os.MFD_CLOEXEC)
        try:
            state.save_fd(name, id, fd)
        finally:
            os.close(fd)
    state.vfio_devices.extend(devices)
    return state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_registries)
def test_property_round_trip_in_band_and_numbers(registry: tuple[list[tuple[str, int]], list[VfioDevice]]) -> None:
    before = open_fds()
    source = _build(*registry)
    data, fds = encode(source, inline_fds=True)
    got = decode(StreamReader(data, [os.dup(fd) for fd in fds], inline_fds=True))
    assert [(n, i) for n, i, _ in got.entries()] == [(n, i) for n, i, _ in source.entries()]
    assert [inode(fd) for _, _, fd in got.entries()] == [inode(fd) for fd in fds]
    assert got.vfio_devices == source.vfio_devices
    assert encode(got, inline_fds=True)[0] == data
    got.close()
    numbers, _ = encode(source, inline_fds=False)
    adopted = decode(StreamReader(numbers, inline_fds=False))  # adopts source's numbers: do not close twice
    assert adopted.entries() == source.entries() and adopted.vfio_devices == source.vfio_devices
    source.close()
    assert open_fds() == before


@settings(max_examples=25, deadline=None)
@given(_registries, st.integers(1, 253))
def test_property_round_trip_over_socket(registry: tuple[list[tuple[str, int]], list[VfioDevice]], per: int) -> None:
    before = open_fds()
    source = _build(*registry)
    a, b = socket.socketpair()
    t = _send_in_thread(source, a, fds_per_message=per)
    got = cs.receive_state(b, timeout=20)
    t.join()
    assert [(n, i, inode(fd)) for n, i, fd in got.entries()] == [(n, i, inode(fd)) for n, i, fd in source.entries()]
    got.close()
    source.close()
    a.close()
    b.close()
    assert open_fds() == before


def _valid_stream() -> bytes:
    return ref_stream([ref_fd_entry(b"ab", 1, SERVICE), ref_fd_entry(b"c", -2, SERVICE)], [ref_vfio_entry(b"v", 1, 2, 3)])


_fuzz_bytes = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda tail: REF_HEADER + tail),
    st.tuples(st.integers(0, 120), st.binary(min_size=1, max_size=8)).map(
        lambda p: (lambda s: s[: p[0] % len(s)] + p[1] + s[p[0] % len(s) + len(p[1]) :])(_valid_stream())
    ),
)


@settings(max_examples=400, deadline=None)
@given(_fuzz_bytes, st.integers(0, 3))
def test_property_arbitrary_bytes_in_band(data: bytes, nfds: int) -> None:
    before = open_fds()
    fds = [os.memfd_create("f", os.MFD_CLOEXEC) for _ in range(nfds)]
    try:
        state = decode(StreamReader(data, fds, inline_fds=True))
    except StreamError:
        pass
    else:
        state.close()
    assert open_fds() == before


@settings(max_examples=400, deadline=None)
@given(_fuzz_bytes)
def test_property_arbitrary_bytes_numbers(data: bytes) -> None:
    before = open_fds()
    try:
        state = decode(StreamReader(data, inline_fds=False))
    except StreamError:
        pass
    else:
        # adopted numbers were open already; only duplicates for repeated numbers are new
        for _, _, fd in state.entries():
            if fd not in before:
                os.close(fd)
    assert open_fds() == before


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("## CPR state", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    before = open_fds()
    exec(compile(code, "README.md#cpr-state", "exec"), {})
    assert capsys.readouterr().out == "{'main': 'tcp:[::1]:4444', 'cpr': 'unix:/run/vm/cpr.sock'}\n"
    assert open_fds() == before
