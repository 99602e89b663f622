"""The reference VMM's devices: one with state on the main channel, one with a preserved fd.

- :class:`Doorbell` keeps a ring counter and the last messages; its state
  travels on the main channel (packed with ``struct``: a cpr-exec successor
  loads it before the guest resumes, and ``json`` would import ``re``). While "held" (a ring in flight) it vetoes a
  migration in PRECOPY_SETUP, the way a VFIO device refuses a mode it cannot do.
- :class:`Console` owns a pipe, a kernel object that must survive the update:
  bytes written into it by (or through) the old process are read by the new
  one, because the new process adopts the very same pipe from the CPR state.
"""

from __future__ import annotations

import os
import struct

from cprfast.devices import DeviceRegistry
from cprfast.errors import CprError, StreamError
from cprfast.vmm import fault

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cprfast.cpr_state import CprState

MAX_LOG = 16
_HEAD = struct.Struct(">QH")  # rings, number of messages
_LEN = struct.Struct(">I")  # one message's UTF-8 length


class Doorbell:
    """Rings counted and logged; state on the main channel (``doorbell``, version 2).

    Version 2 is ``>QH`` (rings, message count), then each message as ``>I``
    length and UTF-8 bytes; version 1 was JSON and is still read.
    """

    NAME = "doorbell"
    VERSION = 2

    def __init__(self) -> None:
        self.rings = 0
        self.log: list[str] = []
        self.hold: str | None = None

    def ring(self, message: str) -> int:
        """Ring once; returns the new count."""
        self.rings += 1
        self.log = [*self.log, message][-MAX_LOG:]
        return self.rings

    def save_state(self) -> bytes:
        """Counter and log (version 2)."""
        fault.point("device-save")
        out = bytearray(_HEAD.pack(self.rings, len(self.log)))
        for message in self.log:
            raw = message.encode("utf-8", "surrogateescape")
            out += _LEN.pack(len(raw)) + raw
        return bytes(out)

    def load_state(self, data: bytes, version: int) -> None:
        """Adopt the predecessor's counter and log; a malformed state is a StreamError."""
        fault.point("device-load")
        if version == 1:
            import json

            state = json.loads(data)
            self.rings = int(state["rings"])
            self.log = [str(m) for m in state["log"]][-MAX_LOG:]
            return
        try:
            rings, count = _HEAD.unpack_from(data)
            pos, log = _HEAD.size, []
            for _ in range(count):
                (n,) = _LEN.unpack_from(data, pos)
                pos += _LEN.size
                if pos + n > len(data):
                    raise StreamError(f"doorbell state: message of {n} bytes runs past the end")
                log.append(data[pos : pos + n].decode("utf-8", "surrogateescape"))
                pos += n
        except struct.error as e:
            raise StreamError(f"doorbell state is truncated: {e}") from None
        if pos != len(data):
            raise StreamError(f"doorbell state has {len(data) - pos} bytes after its messages")
        self.rings, self.log = rings, log[-MAX_LOG:]

    def notifier(self, event: object, mode: object) -> str | None:
        """Migration notifier: refuse PRECOPY_SETUP while a ring is held."""
        if getattr(event, "name", None) != "PRECOPY_SETUP":
            return None
        fault.point("setup")
        return f"doorbell: {self.hold}" if self.hold is not None else None

    def query(self) -> dict[str, object]:
        """What ``x-query-guest`` shows of it."""
        return {"rings": self.rings, "log": list(self.log), "hold": self.hold}


class Console:
    """A pipe preserved across live updates (CPR fds ``console`` ids 0 = read end, 1 = write end).

    With ``adopt`` (an incoming CPR state) the pipe must be there: a new, empty
    pipe would silently lose what the guest's peer wrote into the old one.
    """

    NAME = "console"

    def __init__(self, cpr: CprState, *, adopt: bool = False) -> None:
        found = [cpr.find_fd(self.NAME, i) for i in (0, 1)]
        if None in found and adopt:
            raise CprError(f"the incoming CPR state has no console pipe ({self.NAME!r} ids 0 and 1): refusing to start")
        if None in found:
            for i in (0, 1):
                cpr.delete_fd(self.NAME, i)
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            found = [
                DeviceRegistry.preserved_fd(cpr, self.NAME, lambda: r, instance=0),
                DeviceRegistry.preserved_fd(cpr, self.NAME, lambda: w, instance=1),
            ]
        self.read_fd, self.write_fd = (fd for fd in found if fd is not None)

    def read(self, limit: int = 65536) -> bytes:
        """Whatever is in the pipe now (non-blocking)."""
        try:
            return os.read(self.read_fd, limit)
        except BlockingIOError:
            return b""

    def write(self, data: bytes) -> int:
        """Write into the pipe; returns the bytes written."""
        return os.write(self.write_fd, data)

    def query(self) -> dict[str, object]:
        """fd numbers and the pipe's identity (``pipe:[inode]``), the same in old and new process."""
        return {
            "read-fd": self.read_fd,
            "write-fd": self.write_fd,
            "pipe": os.readlink(f"/proc/self/fd/{self.read_fd}"),
        }
