"""The device-state registry: how a VMM's devices travel on the main stream.

A device registers once with a name, an instance id and the version of its
state format. On the source, :meth:`DeviceRegistry.save` collects every
device's state as :class:`~cprfast.stream.Section` objects; on the target,
:meth:`DeviceRegistry.load` hands each section to its device, after the whole
stream has been verified. A section from a newer state version than the
device knows is refused before any device is touched.

Devices whose *kernel object* must survive the update (an eventfd, a pipe, a
tap fd) use :meth:`DeviceRegistry.preserved_fd`: on a CPR target the fd comes
from the incoming CPR state, so the device adopts the very same kernel object
instead of opening a new one; otherwise it is opened and saved in the CPR state
for the next update.
"""

from __future__ import annotations

import os

from cprfast.errors import StreamError
from cprfast.stream import Section

TYPE_CHECKING = False  # no ``typing`` at run time: a cpr-exec successor loads devices before it resumes
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    from cprfast.cpr_state import CprState

    class Device(Protocol):
        """What a device implements to migrate its state (a type for checkers only)."""

        def save_state(self) -> bytes:
            """Return the device's state; called with the VM stopped."""
            ...

        def load_state(self, data: bytes, version: int) -> None:
            """Apply state saved by a device of format ``version`` (never newer than ours)."""
            ...


class _Entry:
    __slots__ = ("device", "instance", "name", "version")

    def __init__(self, name: str, instance: int, version: int, device: Device) -> None:
        self.name, self.instance, self.version, self.device = name, instance, version, device


class DeviceRegistry:
    """The devices of one VMM, keyed by (name, instance)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], _Entry] = {}

    def register(self, name: str, device: Device, *, instance: int = 0, version: int = 1) -> None:
        """Add a device; its (name, instance) must be unique."""
        key = (name, instance)
        if key in self._entries:
            raise ValueError(f"device {name!r} instance {instance} is already registered")
        if version < 1:
            raise ValueError(f"device {name!r}: state version must be >= 1, not {version}")
        self._entries[key] = _Entry(name, instance, version, device)

    def unregister(self, name: str, *, instance: int = 0) -> None:
        """Remove a device (e.g. on hot-unplug)."""
        self._entries.pop((name, instance), None)

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> list[Section]:
        """Collect every device's state, in registration order."""
        return [Section(e.name, e.instance, e.version, e.device.save_state()) for e in self._entries.values()]

    def load(self, sections: list[Section]) -> None:
        """Apply verified sections; refuse unknown devices and newer versions before applying any."""
        plan: list[tuple[_Entry, Section]] = []
        for section in sections:
            entry = self._entries.get((section.name, section.instance))
            if entry is None:
                raise StreamError(f"main stream has state for unknown device {section.name!r} "
                                  f"instance {section.instance}")
            if section.version > entry.version:
                raise StreamError(f"device {section.name!r} state version {section.version} is newer "
                                  f"than this VMM supports ({entry.version})")
            plan.append((entry, section))
        for entry, section in plan:
            entry.device.load_state(section.payload, section.version)

    @staticmethod
    def preserved_fd(cpr: CprState, name: str, open_fd: Callable[[], int], *, instance: int = 0) -> int:
        """Return the fd for a device's kernel object that must survive live updates.

        If the incoming CPR state holds ``(name, instance)``, that fd is returned
        (the same kernel object the old process used). Otherwise ``open_fd()``
        creates a new one, which is recorded in ``cpr`` for the next update.
        The returned fd is owned by ``cpr``; do not close it.
        """
        fd = cpr.find_fd(name, instance)
        if fd is not None:
            return fd
        new_fd = open_fd()
        try:
            return cpr.save_fd(name, instance, new_fd)
        finally:
            os.close(new_fd)
