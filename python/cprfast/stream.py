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

from cprfast import _core
from cprfast.errors import StreamError

TYPE_CHECKING = False  # no collections.abc at run time: a cpr-exec successor reads its main file with this
if TYPE_CHECKING:
    from collections.abc import Callable

# The framing and the parser are rust/core/src/mainstream.rs; these are its constants.
MAGIC = _core.MAIN_MAGIC
VERSION = _core.MAIN_VERSION
KIND_DEVICE = _core.MAIN_KIND_DEVICE
KIND_RAM = _core.MAIN_KIND_RAM
KIND_END = _core.MAIN_KIND_END
MAX_NAME = _core.MAIN_MAX_NAME
MAX_SECTION = _core.MAIN_MAX_SECTION

_READ_AHEAD = 1 << 16
_MAX_READ = 1 << 20


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


class StreamWriter:
    """Writes the main stream to a file descriptor (socket, pipe or file), or to memory (``fd`` None).

    Device sections are gathered and framed and written with one call, before a
    RAM section and at the end, so a device stream leaves in one syscall on a
    pause path. A bad section (name, size) is a ValueError before anything is written.
    """

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.sections = 0
        self.bytes = 0
        self._pending: list[tuple[str, int, int, bytes] | str] = []
        self._header = True
        self._written: list[bytes] = []

    def _flush(self, end: int | None = None) -> None:
        data = _core.frame_main(self._pending, header=self._header, end=end)
        self._header = False
        self._pending.clear()
        if self.fd is None:
            self._written.append(data)
            self.bytes += len(data)
        else:
            self.bytes += _write_all(self.fd, data)

    def device(self, section: Section) -> None:
        """Add one device section (checksummed when written)."""
        self._pending.append((section.name, section.instance, section.version, section.payload))
        self.sections += 1

    def ram(self, name: str, send: Callable[[int], int]) -> None:
        """Write a RAM section header, then let ``send(fd)`` stream the pages; it returns bytes sent."""
        if self.fd is None:
            raise ValueError("RAM sections need a file descriptor to stream pages to")
        self._pending.append(name)
        self._flush()
        self.bytes += send(self.fd)
        self.sections += 1

    def end(self) -> None:
        """Close the stream with the section count, so truncation at a section boundary is caught."""
        self._flush(end=self.sections)

    def getvalue(self) -> bytes:
        """The whole stream, for a writer to memory (after :meth:`end`)."""
        return b"".join(self._written)


def read_stream(fd: int, receive_ram: Callable[[str, int], None] | None = None) -> list[Section]:
    """Read a whole main stream; return its verified device sections, in order.

    ``receive_ram(name, fd)`` is called for each RAM section and must consume
    its page stream; the stream is then read exactly as far as each element
    needs. Without it a RAM section is an error, and the stream is read ahead
    in large chunks (one syscall for a device stream): only for streams that
    nobody reads after us. Nothing is returned (so nothing is applied) unless
    every checksum, the end marker and the section count are correct.
    """
    parser = _core.MainStreamParser()
    ahead = _READ_AHEAD if receive_ram is None else 0
    sections: list[Section] = []
    buf = b""
    while True:
        items, used = parser.parse(buf)
        buf = buf[used:]
        for item in items:
            if isinstance(item, str):
                if receive_ram is None:
                    raise StreamError(f"main stream carries RAM section {item!r}: RAM must stay in place")
                receive_ram(item, fd)  # (read exactly so far: the page stream is next on the fd)
            else:
                sections.append(Section(*item))
        if parser.ended:
            return sections
        need = parser.need
        chunks = [buf]
        while need > 0:
            chunk = os.read(fd, min(max(need, ahead), _MAX_READ))
            if not chunk:
                parser.parse(b"".join(chunks))  # (so the error says how much of the element arrived)
                parser.eof()
            chunks.append(chunk)
            need -= len(chunk)
        buf = b"".join(chunks)
