"""The main migration stream: a header, one section per device, RAM sections, an end marker.

Layout (all integers big-endian)::

    header   b"CPRFMAIN" | u32 version
    section  u8 kind | u16 name_len | name | u32 instance | u32 version | u64 length
             | payload[length] | u32 crc32(section header + payload)
    ram      u8 KIND_RAM | u16 name_len | name | u32 0 | u32 1 | u64 0 | u32 crc32
             followed by a page stream written by ``cprfast._core.send_pages``
             (it carries its own per-chunk checksums and end marker)
    end      u8 KIND_END | u32 section_count | u32 crc32

Device sections are read and verified in full (every checksum, the end marker
and the section count) before any of them is applied, so a truncated or
corrupt stream changes nothing on the target. RAM pages are applied as they
arrive, chunk by verified chunk, into a guest that is not running yet.
"""

from __future__ import annotations

import os
import struct
import zlib

from cprfast.errors import StreamError

TYPE_CHECKING = False  # no collections.abc at run time: a cpr-exec successor reads its main file with this
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

MAGIC = b"CPRFMAIN"
VERSION = 1
KIND_DEVICE = 1
KIND_RAM = 2
KIND_END = 0xFF
MAX_NAME = 256
MAX_SECTION = 256 << 20

_HEADER = struct.Struct(">8sI")
_SECTION = struct.Struct(">BH")
_SECTION_TAIL = struct.Struct(">IIQ")
_END = struct.Struct(">BI")
_CRC = struct.Struct(">I")


class Section:
    """One device's saved state as it travels on the main stream.

    A plain class, not a dataclass: a cpr-exec successor reads sections before
    it resumes the guest, and ``dataclasses`` (with ``inspect``) costs it milliseconds.
    """

    __slots__ = ("instance", "name", "payload", "version")

    def __init__(self, name: str, instance: int, version: int, payload: bytes) -> None:
        self.name = name
        self.instance = instance
        self.version = version
        self.payload = payload

    def _key(self) -> tuple[str, int, int, bytes]:
        return (self.name, self.instance, self.version, self.payload)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Section) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Section({self.name!r}, {self.instance}, {self.version}, <{len(self.payload)} bytes>)"


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return len(data)


class _Reader:
    """Exact reads from ``fd``. ``greedy`` reads ahead in large chunks (one syscall for a
    whole device stream); only for streams where nobody else reads the fd after us."""

    def __init__(self, fd: int, *, greedy: bool) -> None:
        self.fd = fd
        self.ahead = (1 << 16) if greedy else 0
        self.buf = b""

    def exact(self, n: int, what: str) -> bytes:
        if len(self.buf) >= n:
            data, self.buf = self.buf[:n], self.buf[n:]
            return data
        chunks, left = [self.buf], n - len(self.buf)
        self.buf = b""
        while left:
            chunk = os.read(self.fd, min(max(left, self.ahead), 1 << 20))
            if not chunk:
                raise StreamError(f"main stream truncated while reading {what} ({n - left} of {n} bytes)")
            if len(chunk) > left:
                chunk, self.buf = chunk[:left], chunk[left:]
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


class StreamWriter:
    """Writes the main stream to a file descriptor (socket, pipe or file), or to memory (``fd`` None).

    Device sections are gathered and written with one call, before a RAM section
    and at the end, so a device stream leaves in one syscall on a pause path.
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.sections = 0
        self.bytes = 0
        self._pending = [_HEADER.pack(MAGIC, VERSION)]
        self._written: list[bytes] = []

    def _section_head(self, kind: int, name: str, instance: int, version: int, length: int) -> bytes:
        raw = name.encode()
        if not 0 < len(raw) <= MAX_NAME:
            raise ValueError(f"section name must be 1..{MAX_NAME} bytes: {name!r}")
        return _SECTION.pack(kind, len(raw)) + raw + _SECTION_TAIL.pack(instance, version, length)

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        if self.fd is None:
            self._written.append(data)
            self.bytes += len(data)
        else:
            self.bytes += _write_all(self.fd, data)

    def device(self, section: Section) -> None:
        """Add one device section with its checksum."""
        if len(section.payload) > MAX_SECTION:
            raise ValueError(f"device {section.name!r} state is larger than {MAX_SECTION} bytes")
        head = self._section_head(KIND_DEVICE, section.name, section.instance, section.version, len(section.payload))
        crc = zlib.crc32(section.payload, zlib.crc32(head))
        self._pending += (head, section.payload, _CRC.pack(crc))
        self.sections += 1

    def ram(self, name: str, send: Callable[[int], int]) -> None:
        """Write a RAM section header, then let ``send(fd)`` stream the pages; it returns bytes sent."""
        if self.fd is None:
            raise ValueError("RAM sections need a file descriptor to stream pages to")
        head = self._section_head(KIND_RAM, name, 0, 1, 0)
        self._pending += (head, _CRC.pack(zlib.crc32(head)))
        self._flush()
        self.bytes += send(self.fd)
        self.sections += 1

    def end(self) -> None:
        """Close the stream with the section count, so truncation at a section boundary is caught."""
        body = _END.pack(KIND_END, self.sections)
        self._pending += (body, _CRC.pack(zlib.crc32(body)))
        self._flush()

    def getvalue(self) -> bytes:
        """The whole stream, for a writer to memory (after :meth:`end`)."""
        return b"".join(self._written)


def read_stream(fd: int, receive_ram: Callable[[str, int], None] | None = None) -> list[Section]:
    """Read a whole main stream; return its verified device sections, in order.

    ``receive_ram(name, fd)`` is called for each RAM section and must consume
    its page stream; without it a RAM section is an error, and the stream is
    read ahead in large chunks. Nothing is returned (so nothing is applied)
    unless every checksum, the end marker and the section count are correct.
    """
    reader = _Reader(fd, greedy=receive_ram is None)
    magic, version = _HEADER.unpack(reader.exact(_HEADER.size, "the stream header"))
    if magic != MAGIC:
        raise StreamError(f"not a cprfast main stream (bad magic {magic!r})")
    if version != VERSION:
        raise StreamError(f"unsupported main stream version {version} (this cprfast reads {VERSION})")
    return list(_sections(reader, receive_ram))


def _sections(reader: _Reader, receive_ram: Callable[[str, int], None] | None) -> Iterator[Section]:
    read = reader.exact
    count = 0
    while True:
        kind_raw = read(1, "a section kind")
        kind = kind_raw[0]
        if kind == KIND_END:
            rest = read(4 + _CRC.size, "the end marker")
            (total,) = struct.unpack(">I", rest[:4])
            (crc,) = _CRC.unpack(rest[4:])
            if crc != zlib.crc32(kind_raw + rest[:4]):
                raise StreamError("main stream end marker is corrupt (checksum mismatch)")
            if total != count:
                raise StreamError(f"main stream end marker counts {total} sections but {count} arrived")
            return
        if kind not in (KIND_DEVICE, KIND_RAM):
            raise StreamError(f"unknown main stream section kind {kind:#x}")
        name_len_raw = read(2, "a section name length")
        (name_len,) = struct.unpack(">H", name_len_raw)
        if not 0 < name_len <= MAX_NAME:
            raise StreamError(f"section name length {name_len} is out of range 1..{MAX_NAME}")
        name_raw = read(name_len, "a section name")
        tail = read(_SECTION_TAIL.size, "a section header")
        instance, version, length = _SECTION_TAIL.unpack(tail)
        if length > MAX_SECTION:
            raise StreamError(f"section length {length} exceeds the limit of {MAX_SECTION} bytes")
        head = kind_raw + name_len_raw + name_raw + tail
        try:
            name = name_raw.decode()
        except UnicodeDecodeError as e:
            raise StreamError(f"section name is not UTF-8: {name_raw!r}") from e
        payload = read(length, f"section {name!r}")
        (crc,) = _CRC.unpack(read(_CRC.size, f"the checksum of section {name!r}"))
        if crc != zlib.crc32(payload, zlib.crc32(head)):
            raise StreamError(f"section {name!r} is corrupt (checksum mismatch)")
        count += 1
        if kind == KIND_RAM:
            if receive_ram is None:
                raise StreamError(f"main stream carries RAM section {name!r}: RAM must stay in place")
            receive_ram(name, reader.fd)
        else:
            yield Section(name, instance, version, payload)
