"""CPR state: the registry of named fds a VMM preserves across a live update, in QEMU's format.

A device that must survive an update (a guest-RAM memfd, a vhost or VFIO fd, a
tap) saves its fd here under a ``(name, id)`` key. A CPR migration then hands
the whole registry to the next process before that process creates any device,
and each new device finds its fd by the same key instead of opening a new one.

The stream is QEMU's own ``CprState`` (``migration/cpr.c``), byte for byte, so a
cprfast VMM and QEMU 10 can read each other's cpr channel:

- ``be32 0x51435052`` ("QCPR"), ``be32 1``;
- per fd, in list order: ``0x01``, ``be32 namelen`` (strlen + 1), the name with
  its NUL, ``be32 id``, then the fd field; ``0x00`` ends the list;
- the subsection ``0x05``, a length byte, ``"CprState/vfio devices"``, ``be32 1``,
  then the VFIO devices as a list of the same shape (name, ``be32 devid``,
  ``be32 ioas_id``, ``be32 hwpt_id``); no end-of-file marker.

The fd field is a service byte ``0x20`` whose fd rides along in SCM_RIGHTS
(cpr-transfer, over a UNIX socket), or a ``be32`` fd number (cpr-exec, where the
fds survive ``exec`` under the same numbers).

Where we do better than QEMU (each said again where it happens): a duplicate key
or a different fd for a saved key is a :class:`CprError`, not a silent second
entry or an abort; a corrupt stream is a :class:`StreamError` naming the problem
with every fd received so far closed; fds are sent in batches.

A cpr-exec successor loads its state with this module before it resumes the
guest, so at import it loads only what that needs (no ``logging``, ``socket``,
``typing``, ``dataclasses``, ``collections`` or ``contextlib``); the cpr-transfer parts import theirs when called.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

from cprfast import _core
from cprfast.errors import CprError, MigrationError, StreamError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import socket
    from collections.abc import Callable, Iterable, MutableMapping, Sequence
    from typing import Literal

    from cprfast.channels import MigrationAddress

    IncomingMode = Literal["cpr-exec", "cpr-transfer"]

__all__ = [
    "EXEC_STATE_ENV",
    "MAGIC",
    "QEMU_READER_MAX_FDS",
    "SCM_MAX_FD",
    "VERSION",
    "VFIO_SUBSECTION",
    "CprState",
    "IncomingCpr",
    "OutgoingState",
    "SocketStreamReader",
    "StreamReader",
    "VfioDevice",
    "decode",
    "encode",
    "incoming_mode",
    "load_exec_state",
    "load_incoming",
    "persist_exec_state",
    "receive_state",
    "reset_incoming_mode",
    "send_state",
    "transfer_outgoing",
    "unpersist_exec_state",
    "wait_hup",
    "write_exec_state",
]

MAGIC = 0x51435052
"""``QEMU_CPR_FILE_MAGIC``, "QCPR"."""
VERSION = 1
"""``QEMU_CPR_FILE_VERSION``."""
VFIO_SUBSECTION = "CprState/vfio devices"
"""The name of the VFIO subsection QEMU always writes after the fd list."""
VFIO_SUBSECTION_VERSION = 1
EXEC_STATE_ENV = "QEMU_CPR_EXEC_STATE"
"""The environment variable (and memfd name) that carries cpr-exec state across ``exec``."""
SCM_MAX_FD = 253
"""The kernel's limit of fds in one SCM_RIGHTS message."""
QEMU_READER_MAX_FDS = 16
"""QEMU's socket reader has room for 16 fds per ``recvmsg`` (``SOCKET_MAX_FDS`` in
io/channel-socket.c); a bigger batch would be truncated there, so it is our default."""
MAX_NAME_LEN = 4096
"""Longest name (with its NUL) we accept from a stream; QEMU has no limit."""
MAX_ENTRIES = 1 << 16
"""Most fd or VFIO entries we accept from a stream."""

_SUBSECTION = 0x05
_SERVICE_BYTE = 0x20
_RECV_BUFSIZE = 1 << 16


def _log() -> logging.Logger:
    """This module's logger, imported when first needed (never on the cpr-exec load path)."""
    import logging

    return logging.getLogger(__name__)


def _name_bytes(name: str, what: str) -> bytes:
    """A key name as it goes on the wire (UTF-8, NUL-terminated), checked."""
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8", "surrogateescape") + b"\0"
    if b"\0" in raw[:-1]:
        raise ValueError(f"{what} name {name!r} contains a NUL character")
    if len(raw) > MAX_NAME_LEN:
        raise ValueError(f"{what} name is {len(raw)} bytes with its NUL; the limit is {MAX_NAME_LEN}")
    return raw


def _check_s32(value: int, what: str) -> None:
    if not -(1 << 31) <= value < (1 << 31):
        raise ValueError(f"{what} {value} does not fit in 32 signed bits")


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value < (1 << 32):
        raise ValueError(f"{what} {value} does not fit in 32 unsigned bits")


class VfioDevice:
    """One entry of QEMU's VFIO subsection: an iommufd-backed device to reattach (immutable)."""

    __slots__ = ("devid", "hwpt_id", "ioas_id", "name")
    name: str
    devid: int
    ioas_id: int
    hwpt_id: int

    def __init__(self, name: str, devid: int, ioas_id: int, hwpt_id: int) -> None:
        _name_bytes(name, "vfio device")
        _check_s32(devid, "vfio devid")
        _check_u32(ioas_id, "vfio ioas_id")
        _check_u32(hwpt_id, "vfio hwpt_id")
        for attr, value in (("name", name), ("devid", devid), ("ioas_id", ioas_id), ("hwpt_id", hwpt_id)):
            object.__setattr__(self, attr, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"VfioDevice is immutable: cannot set {name!r}")

    def _key(self) -> tuple[str, int, int, int]:
        return (self.name, self.devid, self.ioas_id, self.hwpt_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VfioDevice) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"VfioDevice(name={self.name!r}, devid={self.devid}, ioas_id={self.ioas_id}, hwpt_id={self.hwpt_id})"


def _same_file(a: int, b: int) -> bool:
    """Whether two fds refer to the same kernel object (same device and inode)."""
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class CprState:
    """The registry of preserved fds, keyed by ``(name, id)``; it owns the fds it holds.

    ``save_fd`` stores a CLOEXEC duplicate, so the caller keeps its own fd;
    ``delete_fd``/``delete_all``/``close`` close the registry's copies. The list
    order is QEMU's: the newest entry first (QEMU inserts at the head), which is
    the order the stream is written in. Not thread-safe (QEMU's runs under the
    BQL): use it from one thread, or lock around it.
    """

    def __init__(self) -> None:
        self._fds: dict[tuple[str, int], int] = {}  # oldest first; the wire order is the reverse
        self.vfio_devices: list[VfioDevice] = []
        """VFIO devices, written in list order (index 0 first, like QEMU's list head)."""

    def save_fd(self, name: str, id: int, fd: int) -> int:
        """Save a duplicate of ``fd`` under ``(name, id)``; returns the registry's copy.

        QEMU appends a second entry for a key already saved; we refuse it.
        """
        _name_bytes(name, "cpr fd")
        _check_s32(id, "cpr fd id")
        if (name, id) in self._fds:
            raise CprError(f"cpr fd '{name}' id {id} is already saved")
        copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        self._fds[(name, id)] = copy
        return copy

    def find_fd(self, name: str, id: int) -> int | None:
        """The registry's fd for ``(name, id)``, or None (QEMU returns -1)."""
        return self._fds.get((name, id))

    def delete_fd(self, name: str, id: int) -> None:
        """Forget ``(name, id)`` and close the registry's fd; absent keys are ignored."""
        fd = self._fds.pop((name, id), None)
        if fd is not None:
            os.close(fd)

    def resave_fd(self, name: str, id: int, fd: int) -> None:
        """Save ``fd`` unless the key already holds the same kernel object.

        A different object under the key is a :class:`CprError` naming it (QEMU
        aborts the process).
        """
        held = self._fds.get((name, id))
        if held is None:
            self.save_fd(name, id, fd)
        elif held != fd and not _same_file(held, fd):
            raise CprError(f"cpr fd '{name}' id {id} value {fd} already saved with a different value {held}")

    def walk_fd(self, cb: Callable[[str, int, int], bool]) -> bool:
        """Call ``cb(name, id, fd)`` in list order; stop and return False at the first False."""
        return all(cb(name, id, fd) for name, id, fd in self.entries())

    def delete_all(self, name: str) -> None:
        """Delete every id saved under ``name`` (QEMU's pending ``cpr_delete_fd_all``)."""
        for key in [k for k in self._fds if k[0] == name]:
            os.close(self._fds.pop(key))

    def entries(self) -> list[tuple[str, int, int]]:
        """``(name, id, fd)`` in QEMU's list order: newest first."""
        return [(name, id, fd) for (name, id), fd in reversed(self._fds.items())]

    def __len__(self) -> int:
        return len(self._fds)

    def __contains__(self, key: object) -> bool:
        return key in self._fds

    def preserve(self) -> None:
        """Clear close-on-exec on every fd, just before cpr-exec runs ``exec``."""
        for fd in self._fds.values():
            os.set_inheritable(fd, True)

    def unpreserve(self) -> None:
        """Set close-on-exec again (the exec failed, or the state was loaded)."""
        for fd in self._fds.values():
            os.set_inheritable(fd, False)

    def close(self) -> None:
        """Close every fd and forget all entries, VFIO devices included."""
        fds, self._fds = list(self._fds.values()), {}
        self.vfio_devices.clear()
        for fd in fds:
            os.close(fd)

    def take_all(self, other: CprState) -> None:
        """Move every fd of ``other`` here (no duplicates made; ``other`` ends up empty).
        A key both hold is refused before anything moves."""
        clash = self._fds.keys() & other._fds.keys()
        if clash:
            name, id = min(clash)
            raise CprError(f"cpr fd '{name}' id {id} is already saved")
        self._fds.update(other._fds)
        other._fds.clear()

    def _adopt(self, entries: Sequence[tuple[str, int, int]]) -> None:
        """Take ownership of decoded entries given in wire order."""
        for name, id, fd in reversed(entries):
            self._fds[(name, id)] = fd

    def __enter__(self) -> CprState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CprState {len(self._fds)} fds, {len(self.vfio_devices)} vfio devices>"


# ------------------------------------------------------------------------ encode


def _encode(state: CprState, *, inline_fds: bool) -> tuple[bytes, list[int], list[int]]:
    """The stream, the fds it refers to, and the offset of each fd's service byte."""
    out = bytearray(struct.pack(">II", MAGIC, VERSION))
    fds: list[int] = []
    marks: list[int] = []
    for name, id, fd in state.entries():
        raw = _name_bytes(name, "cpr fd")
        out += b"\x01" + struct.pack(">I", len(raw)) + raw + struct.pack(">i", id)
        fds.append(fd)
        if inline_fds:
            marks.append(len(out))
            out.append(_SERVICE_BYTE)
        else:
            out += struct.pack(">i", fd)
    out.append(0)
    sub = VFIO_SUBSECTION.encode()
    out += bytes([_SUBSECTION, len(sub)]) + sub + struct.pack(">I", VFIO_SUBSECTION_VERSION)
    for dev in state.vfio_devices:
        raw = _name_bytes(dev.name, "vfio device")
        out += b"\x01" + struct.pack(">I", len(raw)) + raw + struct.pack(">iII", dev.devid, dev.ioas_id, dev.hwpt_id)
    out.append(0)
    return bytes(out), fds, marks


def encode(state: CprState, *, inline_fds: bool) -> tuple[bytes, list[int]]:
    """Serialize ``state``; returns the bytes and the fds they refer to, in stream order.

    ``inline_fds=True`` (cpr-transfer): each fd is a service byte, and the fds must
    travel with the bytes over SCM_RIGHTS. ``False`` (cpr-exec): each fd is its
    number, and the fds must survive ``exec``. The fds stay owned by ``state``.
    """
    data, fds, _ = _encode(state, inline_fds=inline_fds)
    return data, fds


# ------------------------------------------------------------------------ decode


class StreamReader:
    """A cpr stream being read: bytes, plus the fds that arrived with them, in order.

    The reader owns its fds until :func:`decode` adopts them. This base class
    reads from memory (a byte string, or a memfd's contents);
    :class:`SocketStreamReader` fills itself from a socket as the parser needs more.
    """

    def __init__(self, data: bytes = b"", fds: Iterable[int] = (), *, inline_fds: bool) -> None:
        self.data = bytearray(data)
        self.fds: list[int] = list(fds)
        self.inline_fds = inline_fds
        """True when fd fields are service bytes (cpr-transfer), False for numbers (cpr-exec)."""
        self.ended = False
        """No more input will come (set once :meth:`more` found none)."""

    def more(self) -> bool:
        """Append more input; False (and :attr:`ended`) at the end of input."""
        self.ended = True
        return False


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _sendmsg_fds(sock: socket.socket, data: bytes, fds: Sequence[int], timeout: float | None) -> int:
    return _core.sendmsg_fds(sock.fileno(), data, fds, timeout=timeout)


class SocketStreamReader(StreamReader):
    """A cpr stream arriving on a UNIX socket; fds are queued as they arrive.

    Reads only as far as the parser needs, so it never waits for more than the
    sender sent; ``timeout`` bounds the whole read.
    """

    def __init__(self, sock: socket.socket, *, timeout: float | None = None) -> None:
        super().__init__(inline_fds=True)
        self._sock = sock
        self._deadline = _deadline(timeout)

    def more(self) -> bool:
        data, fds = _core.recvmsg_fds(self._sock.fileno(), _RECV_BUFSIZE, SCM_MAX_FD, timeout=_remaining(self._deadline))
        self.fds.extend(fds)
        self.data += data
        if not data:
            self.ended = True
        return bool(data)


def _adopt_numbers(raw: list[tuple[str, int, int]], owned: list[int]) -> list[tuple[str, int, int]]:
    """cpr-exec: check that each named fd is open here; a number named twice is duplicated
    so each key owns its own fd (QEMU lets two keys share one). Dups go to ``owned``."""
    numbers: set[int] = set()
    out = []
    for name, id, number in raw:
        try:
            fcntl.fcntl(number, fcntl.F_GETFD)
        except (OSError, ValueError):  # ValueError: a negative number
            raise StreamError(f"cpr fd '{name}' id {id}: fd {number} is not open in this process") from None
        if number in numbers:
            try:
                dup = fcntl.fcntl(number, fcntl.F_DUPFD_CLOEXEC, 0)
            except OSError as e:  # EMFILE: a stream naming one fd more times than we may open fds
                raise StreamError(f"cpr fd '{name}' id {id}: cannot duplicate fd {number}: {e.strerror}") from None
            owned.append(dup)
            numbers.add(dup)  # a later entry naming this number gets its own fd too
            number = dup
        numbers.add(number)
        out.append((name, id, number))
    return out


def decode(reader: StreamReader) -> CprState:
    """Parse a cpr stream (``rust/core/src/cprstate.rs``) into a new :class:`CprState` that owns its fds.

    Any error raises :class:`StreamError` (socket readers may also raise OSError
    or TimeoutError) after closing every fd received so far. In number mode the
    fds named by the stream are adopted, not duplicated (they were inherited
    under those numbers); a number that appears twice is duplicated so each key
    owns its own fd. Received fds nobody claimed are closed with a warning.
    """
    owned: list[int] = []
    try:
        while True:
            parsed = _core.parse_cpr_state(
                bytes(reader.data),
                len(reader.fds),
                inline_fds=reader.inline_fds,
                eof=reader.ended,
                max_name=MAX_NAME_LEN,
                max_entries=MAX_ENTRIES,
            )
            if parsed is not None:
                break
            reader.more()
        raw_entries, raw_vfio, _ = parsed
        named = [(raw.decode("utf-8", "surrogateescape"), id, fd) for raw, id, fd in raw_entries]
        if reader.inline_fds:
            entries = [(name, id, reader.fds[index]) for name, id, index in named]
            claimed = {index for _, _, index in named}
            unclaimed = [fd for i, fd in enumerate(reader.fds) if i not in claimed]
        else:
            entries, unclaimed = _adopt_numbers(named, owned), list(reader.fds)
        devices = [VfioDevice(raw.decode("utf-8", "surrogateescape"), *ids) for raw, *ids in raw_vfio]
    except BaseException:
        for fd in owned + reader.fds:
            os.close(fd)
        reader.fds.clear()
        raise
    reader.fds.clear()
    for fd in unclaimed:
        _log().warning("received fd %d was never claimed", fd)
        os.close(fd)
    state = CprState()
    state._adopt(entries)
    state.vfio_devices = devices
    return state


# ---------------------------------------------------------------- cpr-transfer


class OutgoingState:
    """A CPR state encoded for in-band sending, split into its ``sendmsg`` messages.

    Built ahead of time (off a pause path), sent later with :meth:`send`: each
    message carries up to ``fds_per_message`` fds on its first byte and runs up
    to the next message's first service byte, so any reader that queues fds -
    QEMU's included - finds every fd by the time it reads its byte, and a state
    whose fds fit in one message leaves in one ``sendmsg``. The default, 16, is
    what QEMU's reader takes per ``recvmsg``; a cprfast reader takes up to 253.
    The fds stay owned by the state, which must stay open until the send.
    """

    def __init__(self, state: CprState, *, fds_per_message: int = QEMU_READER_MAX_FDS) -> None:
        if not 1 <= fds_per_message <= SCM_MAX_FD:
            raise ValueError(f"fds_per_message must be in 1..{SCM_MAX_FD}, not {fds_per_message}")
        data, fds, marks = _encode(state, inline_fds=True)
        starts = [0, *(marks[i] for i in range(fds_per_message, len(fds), fds_per_message)), len(data)]
        self.messages = [
            (data[start:end], fds[i * fds_per_message : (i + 1) * fds_per_message])
            for i, (start, end) in enumerate(zip(starts, starts[1:], strict=False))
        ]

    def send(self, sock: socket.socket, *, timeout: float | None = None) -> None:
        """Send every message, then shut down our write side (the socket stays open:
        :func:`wait_hup` sees the target close it)."""
        import socket

        deadline = _deadline(timeout)
        for data, fds in self.messages:
            sent = _sendmsg_fds(sock, data, fds, _remaining(deadline))
            while sent < len(data):
                sent += _sendmsg_fds(sock, data[sent:], (), _remaining(deadline))
        sock.shutdown(socket.SHUT_WR)


def send_state(
    state: CprState, sock: socket.socket, *, fds_per_message: int = QEMU_READER_MAX_FDS, timeout: float | None = None
) -> None:
    """Send ``state`` in-band on a connected UNIX socket, then shut down our write side
    (:class:`OutgoingState` says how it is split into messages)."""
    OutgoingState(state, fds_per_message=fds_per_message).send(sock, timeout=timeout)


def wait_hup(sock: socket.socket, timeout: float | None = None) -> bool:
    """After :func:`send_state`, wait for the target to close the cpr socket (QEMU's HUP watch).

    True when it did; False on timeout. Bytes the target sends are discarded. A
    HUP cannot tell "target listening" from "target died": the caller learns
    which when it connects the main channel.
    """
    import select
    import socket

    deadline = _deadline(timeout)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        remaining = _remaining(deadline)
        events = poller.poll(None if remaining is None else int(remaining * 1000))
        if not events:
            return False
        revents = events[0][1]
        if revents & (select.POLLHUP | select.POLLERR):
            return True
        if not sock.recv(4096, socket.MSG_DONTWAIT):
            poller.modify(sock, 0)  # peer shut its write side: from now on only HUP matters


def receive_state(sock: socket.socket, *, timeout: float | None = None) -> CprState:
    """Read a cpr-transfer stream (fds in-band) from a connected UNIX socket."""
    return decode(SocketStreamReader(sock, timeout=timeout))


def transfer_outgoing(
    state: CprState,
    cpr_channel: MigrationAddress,
    *,
    fds_per_message: int = QEMU_READER_MAX_FDS,
    timeout: float | None = None,
) -> socket.socket:
    """The source half of cpr-transfer: connect the cpr channel and send the state.

    Returns the socket, write side shut; pass it to :func:`wait_hup`, then close it.
    """
    from cprfast.channels import UnixAddress, connect

    if not isinstance(cpr_channel, UnixAddress):
        raise MigrationError("bad cpr channel address; must be unix")
    sock = connect(cpr_channel, timeout=timeout)
    try:
        send_state(state, sock, fds_per_message=fds_per_message, timeout=timeout)
    except BaseException:
        sock.close()
        raise
    return sock


# -------------------------------------------------------------------- cpr-exec


def write_exec_state(state: CprState) -> int:
    """Write ``state`` (fd numbers, not fds) to a new CLOEXEC memfd named QEMU_CPR_EXEC_STATE."""
    data, _ = encode(state, inline_fds=False)
    fd = os.memfd_create(EXEC_STATE_ENV, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def persist_exec_state(fd: int, env: MutableMapping[str, str]) -> None:
    """Let the state memfd survive ``exec`` and name it in ``env`` (``os.environ`` for a real exec)."""
    os.set_inheritable(fd, True)
    env[EXEC_STATE_ENV] = str(fd)


def unpersist_exec_state(fd: int, env: MutableMapping[str, str]) -> None:
    """Undo :func:`persist_exec_state` after a failed exec.

    QEMU asserts the variable is set; we tolerate its absence, so a failure before
    the state was persisted cannot abort the VMM.
    """
    env.pop(EXEC_STATE_ENV, None)
    os.set_inheritable(fd, False)


def _check_exec_state_fd(fd: int) -> None:
    """Refuse an fd that is not a memfd before reading (or closing) it.

    The variable may be stale or forged: fd 0 or a pipe would block the reader,
    and closing a file it merely names would take it from whoever owns it, so
    such an fd is left open. QEMU reads and closes whatever the number is.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        raise StreamError(f"cannot read cpr-exec state from fd {fd}: Bad file descriptor") from None
    if not target.startswith("/memfd:"):
        raise StreamError(f"{EXEC_STATE_ENV} fd {fd} is not a memfd (it is {target}); left open")


def _read_exec_state(fd: int) -> bytes:
    """The whole state memfd, read from offset 0."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ early load


class IncomingCpr:
    """What :func:`load_incoming` found: the mode, the state, and for cpr-transfer the channel.

    Close ``channel_sock`` once the main channel is listening: that close is the
    HUP the source waits for before it connects.
    """

    def __init__(self, mode: IncomingMode, state: CprState, channel_sock: socket.socket | None = None) -> None:
        self.mode: IncomingMode = mode
        self.state = state
        self.channel_sock = channel_sock

    def __repr__(self) -> str:
        return f"<IncomingCpr {self.mode} {self.state!r}>"


_incoming_mode: IncomingMode | None = None


def incoming_mode() -> IncomingMode | None:
    """The mode :func:`load_incoming` loaded state for, or None (QEMU's ``cpr_get_incoming_mode``)."""
    return _incoming_mode


def reset_incoming_mode() -> None:
    """Forget the incoming mode once the incoming migration is over (QEMU does it on destroy)."""
    global _incoming_mode
    _incoming_mode = None


def load_exec_state(environ: MutableMapping[str, str] = os.environ) -> CprState | None:
    """Load cpr-exec state at start-up, before any device exists; None without the variable.

    The ``QEMU_CPR_EXEC_STATE`` variable is read and unset, the memfd checked,
    read from offset 0 and closed, the stream decoded, and close-on-exec set
    again on every loaded fd. This is the whole of a cpr-exec successor's state
    loading, so it imports and logs nothing (it runs while the guest is paused).
    """
    global _incoming_mode
    value = environ.pop(EXEC_STATE_ENV, None)
    if value is not None:
        if not value.isascii() or not value.isdigit():
            raise StreamError(f"{EXEC_STATE_ENV}={value!r} is not an fd number")
        fd = int(value)
        _check_exec_state_fd(fd)
        try:
            data = _read_exec_state(fd)
        except OSError as e:
            raise StreamError(f"cannot read cpr-exec state from fd {fd}: {e.strerror}") from None
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        state = decode(StreamReader(data, inline_fds=False))
        state.unpreserve()
        _incoming_mode = "cpr-exec"
        return state
    return None


def load_incoming(
    *,
    cpr_channel: MigrationAddress | None,
    environ: MutableMapping[str, str] = os.environ,
    timeout: float | None = None,
) -> IncomingCpr | None:
    """Load incoming CPR state at start-up, before any device exists; None if there is none.

    cpr-exec state (the ``QEMU_CPR_EXEC_STATE`` variable, :func:`load_exec_state`)
    wins over a cpr channel, as in QEMU. Otherwise, with a cpr channel (a UNIX
    path, or an inherited listening fd), one client is accepted and the state
    received; its socket is kept open in the result.
    """
    global _incoming_mode
    from cprfast.channels import FdAddress, UnixAddress, listen

    log = _log()
    if EXEC_STATE_ENV in environ and cpr_channel is not None:
        log.info("ignoring cpr channel for migration mode cpr-exec")
    state = load_exec_state(environ)
    if state is not None:
        log.info("loaded cpr-exec state: %d fds", len(state))
        return IncomingCpr("cpr-exec", state)
    if cpr_channel is None:
        return None
    if not isinstance(cpr_channel, UnixAddress | FdAddress):
        raise MigrationError("bad cpr channel socket type; must be unix")
    deadline = _deadline(timeout)
    with listen(cpr_channel) as listener:
        sock = listener.accept(timeout)
    try:
        state = receive_state(sock, timeout=_remaining(deadline))
    except BaseException:
        sock.close()
        raise
    _incoming_mode = "cpr-transfer"
    log.info("loaded cpr-transfer state: %d fds", len(state))
    return IncomingCpr("cpr-transfer", state, sock)
