"""cpr-reboot: save the stopped VM to a file, restore it in a new process (after a host reboot, say).

The orchestration stops the VM before :class:`RebootDriver` runs (a CPR mode),
so the save is consistent and needs no dirty tracking. The file, from the
``file:`` URI's offset on, is an ordinary main stream:

    header | RAM section | device sections (run state first) | end

whose RAM section carries no page stream but a pointer: ``b"CPRFMAPD"`` and the
page-aligned file offset of a mapped-ram save (``_core.save_mapped``: a header,
a presence bitmap, per-page checksums, every page at a fixed offset, zero pages
left as holes). The stream resumes right after that save, so the device
sections are read, verified and applied only after RAM loaded and checked.

``x-ignore-shared`` (QEMU: leave shared RAM in place, do not copy it) is
refused: our guest RAM is a memfd, which dies with the process, so a restore
would find nothing. RAM is always saved.

A suspended guest is saved as suspended and restored suspended.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import TYPE_CHECKING

from cprfast import _core
from cprfast import channels as ch
from cprfast.errors import MigrationError, StreamError
from cprfast.modes import PreStopState, load_devices, write_devices
from cprfast.modes.precopy import RamHost
from cprfast.stream import StreamWriter, read_stream

if TYPE_CHECKING:
    from cprfast.migration import IncomingContext, MigrationContext, MigrationState, RamCounters
    from cprfast.status import RunState

log = logging.getLogger(__name__)

_POINTER = struct.Struct(">8sQ")
POINTER_MAGIC = b"CPRFMAPD"


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


class RebootDriver:
    """The saving side of cpr-reboot (``register_mode_driver(cpr-reboot, ...)``)."""

    def __init__(self, host: RamHost, migration: MigrationState) -> None:
        self.host = host
        self.before_stop = PreStopState(migration)

    def run(self, ctx: MigrationContext) -> None:
        """Write RAM and device state to the file (the VM is stopped already)."""
        addr = ctx.channels[ch.ChannelType.MAIN]
        if not isinstance(addr, ch.FileAddress):
            raise MigrationError(f"cpr-reboot saves to a file: URI (seekable, fixed offsets), not {addr.uri}")
        region = self.host.region
        if ctx.caps["x-ignore-shared"]:
            raise MigrationError(
                f"cpr-reboot with x-ignore-shared would not save guest RAM {region.name!r}, but it is a memfd "
                "that does not survive this process; turn x-ignore-shared off"
            )
        ram = ctx.ram
        ram.page_size = region.page_size
        ram.total = region.size
        ctx.activate()
        fd = ch.open_file(addr, write=True)
        try:
            writer = StreamWriter(fd)
            writer.ram(region.name, lambda f: _save(region, f, ram))
            ctx.switchover()
            write_devices(writer, self.host.devices, self.before_stop.value)
            os.fsync(fd)
        finally:
            os.close(fd)
        ram.transferred = writer.bytes
        ram.remaining = 0


def _save(region: _core.Region, fd: int, ram: RamCounters) -> int:
    """The RAM section's body: a pointer, then a mapped-ram save at that offset; returns bytes used."""
    start = os.lseek(fd, 0, os.SEEK_CUR)
    at = _align_up(start + _POINTER.size, region.page_size)
    os.write(fd, _POINTER.pack(POINTER_MAGIC, at))
    st = _core.save_mapped(region, fd, at)
    end = at + _core.mapped_file_size(region.size, region.page_size)
    os.lseek(fd, end, os.SEEK_SET)
    ram.duplicate = st.zero_pages
    ram.normal = st.pages - st.zero_pages
    ram.normal_bytes = ram.normal * region.page_size
    return end - start


class RebootIncoming:
    """The restoring side: ``-incoming defer``, mode cpr-reboot, ``migrate-incoming file:PATH``."""

    def __init__(self, host: RamHost) -> None:
        self.host = host

    def run(self, ctx: IncomingContext) -> RunState:
        """Load RAM, verify and load device state; returns the saved run state."""
        from cprfast.status import RunState

        addr = ctx.address
        if not isinstance(addr, ch.FileAddress):
            raise MigrationError(f"cpr-reboot restores from a file: URI, not {addr.uri}")
        region = self.host.region
        ctx.ram.page_size = region.page_size
        ctx.ram.total = region.size
        fd = ch.open_file(addr, write=False)
        try:
            ctx.activate()
            sections = read_stream(fd, lambda name, f: _load(region, name, f, ctx.ram))
        finally:
            os.close(fd)
        return RunState(load_devices(sections, self.host.devices))


def _load(region: _core.Region, name: str, fd: int, ram: RamCounters) -> None:
    if name != region.name:
        raise StreamError(f"saved file holds RAM {name!r}, this VMM has only {region.name!r}")
    start = os.lseek(fd, 0, os.SEEK_CUR)
    raw = os.read(fd, _POINTER.size)
    if len(raw) != _POINTER.size:
        raise StreamError("saved file truncated in the RAM section")
    magic, at = _POINTER.unpack(raw)
    if magic != POINTER_MAGIC or at < start + _POINTER.size or at % region.page_size:
        raise StreamError("saved file's RAM section is corrupt (bad mapped-ram pointer)")
    st = _core.load_mapped(region, fd, at)
    os.lseek(fd, at + _core.mapped_file_size(region.size, region.page_size), os.SEEK_SET)
    ram.transferred = st.bytes
    ram.duplicate = st.zero_pages
    ram.normal = st.pages - st.zero_pages
    ram.normal_bytes = ram.normal * region.page_size


def register(migration: MigrationState, host: RamHost) -> None:
    """Register the cpr-reboot drivers, saving and restoring, on ``migration``."""
    from cprfast.status import MigMode

    migration.register_mode_driver(MigMode.CPR_REBOOT, RebootDriver(host, migration))
    migration.register_incoming_driver(MigMode.CPR_REBOOT, RebootIncoming(host))
