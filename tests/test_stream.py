"""The main stream: round trip, and every kind of damage refused before anything is applied."""

from __future__ import annotations

import os
import struct

import pytest

from cprfast.devices import DeviceRegistry
from cprfast.errors import StreamError
from cprfast.stream import Section, StreamWriter, read_stream


class Counter:
    """A device whose whole state is one integer."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.loaded_version: int | None = None

    def save_state(self) -> bytes:
        return struct.pack(">Q", self.value)

    def load_state(self, data: bytes, version: int) -> None:
        (self.value,) = struct.unpack(">Q", data)
        self.loaded_version = version


def _record(sections: list[Section], tmp_path: os.PathLike[str]) -> bytes:
    path = os.path.join(tmp_path, "main.bin")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        w = StreamWriter(fd)
        for s in sections:
            w.device(s)
        w.end()
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        return f.read()


def _read(data: bytes) -> list[Section]:
    r, w = os.pipe()
    try:
        os.write(w, data)  # small enough for the pipe buffer
        os.close(w)
        w = -1
        return read_stream(r, lambda name, fd: pytest.fail(f"unexpected RAM section {name}"))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_round_trip_through_registry(tmp_path: os.PathLike[str]) -> None:
    src, dst = DeviceRegistry(), DeviceRegistry()
    src.register("counter", Counter(41), version=2)
    src.register("counter", Counter(7), instance=1)
    a, b = Counter(), Counter()
    dst.register("counter", a, version=3)
    dst.register("counter", b, instance=1)
    dst.load(_read(_record(src.save(), tmp_path)))
    assert (a.value, a.loaded_version) == (41, 2)
    assert (b.value, b.loaded_version) == (7, 1)


def test_newer_version_refused_before_any_device_loads(tmp_path: os.PathLike[str]) -> None:
    src, dst = DeviceRegistry(), DeviceRegistry()
    src.register("a", Counter(1))
    src.register("b", Counter(2), version=5)
    a, b = Counter(), Counter()
    dst.register("a", a)
    dst.register("b", b, version=4)
    with pytest.raises(StreamError, match=r"device 'b' state version 5 is newer than this VMM supports \(4\)"):
        dst.load(_read(_record(src.save(), tmp_path)))
    assert a.loaded_version is None and b.loaded_version is None


def test_unknown_device_refused(tmp_path: os.PathLike[str]) -> None:
    dst = DeviceRegistry()
    with pytest.raises(StreamError, match="state for unknown device 'x' instance 0"):
        dst.load(_read(_record([Section("x", 0, 1, b"")], tmp_path)))


def test_every_corrupted_byte_is_detected(tmp_path: os.PathLike[str]) -> None:
    data = _record([Section("dev", 3, 1, b"payload-bytes"), Section("two", 0, 2, b"\x00" * 40)], tmp_path)
    assert [s.payload for s in _read(data)] == [b"payload-bytes", b"\x00" * 40]
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x41
        with pytest.raises(StreamError):
            _read(bytes(damaged))


def test_every_truncation_is_detected(tmp_path: os.PathLike[str]) -> None:
    data = _record([Section("dev", 0, 1, b"abc")], tmp_path)
    for cut in range(len(data)):
        with pytest.raises(StreamError):
            _read(data[:cut])


def test_error_texts(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(StreamError, match=r"not a cprfast main stream \(bad magic b'XXXXXXXX'\)"):
        _read(b"XXXXXXXX\x00\x00\x00\x01")
    with pytest.raises(StreamError, match=r"unsupported main stream version 9 \(this cprfast reads 1\)"):
        _read(b"CPRFMAIN\x00\x00\x00\x09")
    huge = b"CPRFMAIN\x00\x00\x00\x01" + struct.pack(">BH", 1, 1) + b"x" + struct.pack(">IIQ", 0, 1, 1 << 40)
    with pytest.raises(StreamError, match="section length 1099511627776 exceeds the limit"):
        _read(huge)
    with pytest.raises(StreamError, match="main stream truncated while reading the stream header"):
        _read(b"CPRF")
