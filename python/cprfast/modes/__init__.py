"""The CPR modes that keep guest RAM in place: cpr-transfer and cpr-exec.

A VMM hands its migration object and a :class:`CprHost` (its fd registry, its
devices, and which fds are guest RAM) to :func:`register`; from then on QMP
``migrate`` with ``mode`` cpr-transfer or cpr-exec live-updates it. RAM never
travels on the main channel in these modes: it stays in its memfds, whose fds
are handed over (cpr-transfer) or kept across ``exec`` (cpr-exec); the main
channel carries only device state, headed by the source's run state.

This module stays small on purpose: a cpr-exec successor imports it before it
resumes the guest, so nothing here may pull in the QMP server, NumPy, or even
``typing`` at run time (:class:`CprHost` exists for type checkers only).
"""

from __future__ import annotations

import os

from cprfast.errors import StreamError
from cprfast.stream import Section, StreamWriter, read_stream

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection
    from typing import Protocol

    from cprfast.cpr_state import CprState
    from cprfast.devices import DeviceRegistry
    from cprfast.migration import MigrationState
    from cprfast.modes.transfer import TransferTarget

    class CprHost(Protocol):
        """What the CPR modes need from a VMM."""

        @property
        def cpr(self) -> CprState:
            """Every preserved fd, guest RAM included (the registry owns them)."""
            ...

        @property
        def devices(self) -> DeviceRegistry:
            """The devices whose state travels on the main channel."""
            ...

        @property
        def ram_keys(self) -> Collection[tuple[str, int]]:
            """The ``(name, id)`` keys in :attr:`cpr` that are guest RAM: passive memory that
            cpr-transfer may hand over while the guest still runs."""
            ...

RUN_STATE_SECTION = "cprfast/run-state"
"""The first section of a CPR main stream: the source VM's run state before it stopped."""


def write_devices(writer: StreamWriter, devices: DeviceRegistry, run_state: str) -> None:
    """The device sections (the source's run state first) and the end marker; every mode ends so."""
    writer.device(Section(RUN_STATE_SECTION, 0, 1, run_state.encode()))
    for section in devices.save():
        writer.device(section)
    writer.end()


def load_devices(sections: list[Section], devices: DeviceRegistry) -> str:
    """Apply verified device sections; returns the source's run state."""
    if not sections or sections[0].name != RUN_STATE_SECTION:
        raise StreamError(f"main stream does not start with the {RUN_STATE_SECTION!r} section")
    devices.load(sections[1:])
    return sections[0].payload.decode()


def write_main(fd: int, devices: DeviceRegistry, run_state: str) -> int:
    """Write a CPR main stream (run state, then every device; no RAM); returns its bytes."""
    writer = StreamWriter(fd)
    write_devices(writer, devices, run_state)
    return writer.bytes


def encode_main(devices: DeviceRegistry, run_state: str) -> bytes:
    """The CPR main stream as bytes, for senders that must not block while writing it."""
    writer = StreamWriter(None)
    write_devices(writer, devices, run_state)
    return writer.getvalue()


def read_main(fd: int, devices: DeviceRegistry) -> str:
    """Read and verify a whole CPR main stream (it has no RAM), then load the devices;
    returns the source run state."""
    return load_devices(read_stream(fd), devices)


def read_main_file(path: str, offset: int, devices: DeviceRegistry) -> str:
    """:func:`read_main` from a file (cpr-exec's main channel), starting at ``offset``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        return read_main(fd, devices)
    finally:
        os.close(fd)


class PreStopState:
    """The VM's run state just before a migration stopped it (what the target resumes into)."""

    def __init__(self, migration: MigrationState) -> None:
        self.value = str(migration.run_state)
        migration.subscribe_run_state(self._changed)

    def _changed(self, old: str, new: str) -> None:
        if new == "finish-migrate":
            self.value = str(old)


def register(
    migration: MigrationState, host: CprHost, *, transfer_target: TransferTarget | None = None
) -> None:
    """Register the cpr-transfer and cpr-exec drivers on ``migration``.

    Outgoing drivers for both modes; the cpr-exec incoming driver (for a successor
    started with ``-incoming defer``); and, on a cpr-transfer target, the incoming
    driver that finishes what ``transfer_target`` began at start-up.
    """
    from typing import cast

    from cprfast.modes import precopy, reboot
    from cprfast.modes.exec import ExecDriver, ExecIncoming
    from cprfast.modes.transfer import TransferDriver, TransferIncoming
    from cprfast.status import MigMode

    precopy.register(migration, cast("precopy.RamHost", host))
    reboot.register(migration, cast("precopy.RamHost", host))
    pre_stop = PreStopState(migration)
    migration.register_mode_driver(MigMode.CPR_TRANSFER, TransferDriver(host, pre_stop))
    migration.register_mode_driver(MigMode.CPR_EXEC, ExecDriver(host, pre_stop))
    migration.register_incoming_driver(MigMode.CPR_EXEC, ExecIncoming(host))
    if transfer_target is not None:
        migration.register_incoming_driver(
            MigMode.CPR_TRANSFER, TransferIncoming(transfer_target, host)
        )


__all__ = [
    "RUN_STATE_SECTION",
    "PreStopState",
    "encode_main",
    "load_devices",
    "read_main",
    "read_main_file",
    "register",
    "write_devices",
    "write_main",
]
