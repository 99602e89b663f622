"""cpr-transfer: hand the guest's RAM and device fds to a new process over a UNIX socket.

QEMU stops the guest, then sends every fd, and the target maps guest RAM and
registers it with KVM inside the pause (7.5 ms for a 16 GiB memory slot here).
Guest-RAM memfds are passive memory, so we hand over in two phases:

1. **RAM, while the guest runs** (driver ``prepare``, before the stop): a first
   CPR state carrying only the RAM fds. The target adopts and maps them,
   registers its KVM memory slot, creates its vCPU, then answers one byte:
   ``L`` (its main channel is already listening) or ``D`` (deferred: it waits for
   ``migrate-incoming``). The source then pre-connects the main channel (``L``)
   and the second cpr connection; the target accepts both and answers ``W`` on
   the second once it is about to wait for the device fds. Only then does the
   source stop the guest: no connect, accept or set-up is left on the pause path.
   Both sides run the hand-over's code once on a socketpair just before
   (:func:`rehearse`), so the pause runs it warm.
2. **Devices, after the stop** (seed 004: no device fd is driven by two
   processes): a second CPR state with the device fds, encoded before the stop
   and sent in one message, then the main stream (run state + device state; RAM
   stays in place). A listening target adopts the fds and readies its devices
   while the source encodes the device state; a deferred target first closes
   the cpr socket once it listens (QEMU's HUP) and the source connects and
   sends the device state then.

The target answers ``K`` on the main channel once it has loaded the device
state, and resumes the guest only if that answer was delivered; the source
completes only when it reads it, and from then on refuses a cancel
(:meth:`~cprfast.migration.MigrationContext.commit`). So a target that dies
before answering leaves the guest running on the source (QEMU would complete
into a dead target), and a cancel that shut the channel first keeps the target
from resuming: the guest runs on exactly one side.

Each phase is one QEMU-format CPR state on its own connection to the cpr
socket, so the cpr codec is QEMU's; the two-connection protocol is cprfast's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING

from cprfast import _core
from cprfast.channels import ChannelType, FdAddress, MigrationAddress, UnixAddress, connect, listen
from cprfast.cpr_state import SCM_MAX_FD, CprState, OutgoingState, receive_state, send_state, wait_hup
from cprfast.errors import MigrationError
from cprfast.modes import PreStopState, encode_main, read_main

if TYPE_CHECKING:
    from cprfast.modes import CprHost
    from cprfast.channels import Listener
    from cprfast.devices import DeviceRegistry
    from cprfast.migration import IncomingContext, MigrationContext
    from cprfast.status import RunState

log = logging.getLogger(__name__)

ACK_LISTENING = b"L"
"""Phase-1 answer: RAM adopted and registered; the target's main channel listens already."""
ACK_DEFERRED = b"D"
"""Phase-1 answer: RAM adopted; the main channel comes with ``migrate-incoming`` (wait for HUP)."""
ACK_WAITING = b"W"
"""Second cpr connection's answer: accepted; the target now waits for the device fds."""
ACK_RUNNING = b"K"
"""Main-channel answer: the target loaded the device state and runs the guest."""


REHEARSAL = "cprfast/rehearsal"
"""The name of the fds and the device :func:`rehearse` passes around (never a real one's)."""


class _Echo:
    """The one device of a rehearsal: its state is what it last loaded."""

    def __init__(self) -> None:
        self.state = bytes(256)

    def save_state(self) -> bytes:
        return self.state

    def load_state(self, data: bytes, version: int) -> None:
        self.state = data


def rehearse() -> None:
    """Run the hand-over's own code once on a socketpair, just before the guest stops.

    A CPR state with two fds goes out in one message and is received and adopted,
    and a main stream with a run state and one device is framed, read, verified and
    loaded: the code, and the interpreter's paths through it, that the pause runs
    next. On a virtualized host, code and data left alone for a few milliseconds run
    several times slower (this takes ~0.2 ms hot, ~0.9 ms after 10 ms idle); rehearsed
    on both sides, the 1 GiB cpr-transfer pause came out 0.13 ms shorter. Uses none of
    the migration's own fds, sockets or devices, and a failure here (the fd limit
    reached, say) only costs that speed-up: it is logged, not raised.
    """
    from cprfast.devices import DeviceRegistry

    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:
        log.warning("cpr-transfer: no rehearsal of the hand-over: %s", e)
        return
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            with CprState() as state:
                state.save_fd(REHEARSAL, 0, r)
                state.save_fd(REHEARSAL, 1, w)
                send_state(state, b, fds_per_message=SCM_MAX_FD)
        finally:
            os.close(r)
            os.close(w)
        with receive_state(a) as received, CprState() as adopted:
            adopted.take_all(received)
        devices = DeviceRegistry()
        devices.register(REHEARSAL, _Echo())
        a.sendall(encode_main(devices, "running"))
        read_main(b.fileno(), devices)
    except OSError as e:
        log.warning("cpr-transfer: the rehearsal of the hand-over failed: %s", e)
    finally:
        a.close()
        b.close()


def _recv_ack(sock: socket.socket, ctx: MigrationContext, what: str) -> bytes:
    try:
        data = sock.recv(1)
    except OSError as e:
        ctx.check_cancelled()
        raise MigrationError(f"cpr-transfer: the target closed the connection before {what} ({e.strerror})") from e
    if not data:
        ctx.check_cancelled()
        raise MigrationError(f"cpr-transfer: the target closed the connection before {what}")
    return data


class _Outgoing:
    """The sockets of one outgoing cpr-transfer."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.devices_sock: socket.socket | None = None
        self.main: socket.socket | None = None
        self.devices: CprState | None = None
        self.devices_out: OutgoingState | None = None

    def connect(self, addr: MigrationAddress, ctx: MigrationContext, what: str) -> socket.socket:
        ctx.check_cancelled()
        try:
            sock = connect(addr)
        except OSError as e:
            raise MigrationError(f"cpr-transfer: cannot connect the {what} {addr.uri}: {e.strerror or e}") from e
        self.sockets.append(sock)
        return sock

    def shutdown(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        if self.devices is not None:
            self.devices.close()
            self.devices = None


def _subset(cpr: CprState, keys: object, *, ram: bool) -> CprState:
    """A CPR state holding duplicates of the RAM fds (``ram``) or of every other fd."""
    out = CprState()
    try:
        for name, id, fd in reversed(cpr.entries()):
            if ((name, id) in keys) is ram:  # type: ignore[operator]
                out.save_fd(name, id, fd)
    except BaseException:
        out.close()
        raise
    return out


class TransferDriver:
    """The source side of cpr-transfer (a :class:`~cprfast.migration.ModeDriver`)."""

    def __init__(self, host: CprHost, pre_stop: PreStopState) -> None:
        self.host = host
        self.pre_stop = pre_stop
        self._out: _Outgoing | None = None
        self._sent = 0

    def prepare(self, ctx: MigrationContext) -> None:
        """Phase 1, guest running: hand over the RAM fds and wait until the target is ready."""
        out = self._out = _Outgoing()
        ctx.cleanup.callback(out.close)
        cpr_addr = ctx.channels[ChannelType.CPR]
        ram_keys = set(self.host.ram_keys)
        missing = [k for k in ram_keys if k not in self.host.cpr]
        if missing:
            raise MigrationError(f"cpr-transfer: guest RAM {missing} is not in the CPR state")
        sock = out.connect(cpr_addr, ctx, "cpr channel")
        with _subset(self.host.cpr, ram_keys, ram=True) as ram:
            send_state(ram, sock, fds_per_message=SCM_MAX_FD)
        ack = _recv_ack(sock, ctx, "adopted guest RAM")
        if ack == ACK_LISTENING:
            out.main = out.connect(ctx.channels[ChannelType.MAIN], ctx, "main channel")
        elif ack != ACK_DEFERRED:
            raise MigrationError(f"cpr-transfer: the target answered {ack!r} to the RAM hand-over")
        out.devices_sock = out.connect(cpr_addr, ctx, "cpr channel")
        ack = _recv_ack(out.devices_sock, ctx, "waiting for the device fds")
        if ack != ACK_WAITING:
            raise MigrationError(f"cpr-transfer: the target answered {ack!r} on the second cpr connection")
        # Duplicates of the device fds, sent only after the stop: built and encoded now, off the pause path.
        out.devices = _subset(self.host.cpr, ram_keys, ram=False)
        out.devices_out = OutgoingState(out.devices, fds_per_message=SCM_MAX_FD)
        rehearse()

    def handover(self, ctx: MigrationContext) -> None:
        """Guest just stopped, in ``migrate``'s thread: device state and device fds to a listening target."""
        out = self._out
        assert out is not None and out.devices_sock is not None, "prepare() did not run"
        if out.main is not None:
            self._send_devices(ctx, out, out.main)

    def run(self, ctx: MigrationContext) -> None:
        """A deferred target: device fds, HUP, main channel, device state; then wait until the target runs."""
        out = self._out
        assert out is not None and out.devices_sock is not None, "prepare() did not run"
        if out.main is None:
            self._send_devices(ctx, out, None)
        assert out.main is not None
        # The status moves after the bytes left, to keep the pause path lean.
        ctx.activate()
        ctx.switchover()
        ack = _recv_ack(out.main, ctx, "confirmed it runs the guest")
        if ack != ACK_RUNNING:
            raise MigrationError(f"cpr-transfer: the target answered {ack!r} to the device state")
        ctx.commit()  # the target resumes the guest: too late to cancel, even a cancel racing this answer
        # As QEMU counts it: the main stream's bytes, all sent with the guest stopped.
        ctx.ram.transferred = ctx.ram.downtime_bytes = self._sent

    def _send_devices(self, ctx: MigrationContext, out: _Outgoing, main: socket.socket | None) -> None:
        """Phase 2: the device fds first (one message, encoded in ``prepare``), so a listening
        target adopts them and readies its devices while we encode the device state; then the
        device state. A deferred target connects its main channel in between (QEMU's order)."""
        assert out.devices_sock is not None and out.devices_out is not None
        try:
            out.devices_out.send(out.devices_sock)
            stream = encode_main(self.host.devices, self.pre_stop.value)
            self._sent = len(stream)
            if main is None:
                wait_hup(out.devices_sock)
                main = out.main = out.connect(ctx.channels[ChannelType.MAIN], ctx, "main channel")
            try:
                main.sendall(stream)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the target died holding the fds: it never answers K, and run() reports that
        except OSError as e:
            ctx.check_cancelled()
            raise MigrationError(f"cpr-transfer: sending device state failed: {e}") from e

    def cancel(self, ctx: MigrationContext) -> None:
        """Unblock ``prepare`` or ``run`` (they then see the cancel and unwind)."""
        if self._out is not None:
            self._out.shutdown()


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not: it will never resume a guest)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


class TransferTarget:
    """The target of a cpr-transfer, from start-up until the guest runs.

    Call, in order: :meth:`receive_ram` (adopt the RAM fds, set up the guest),
    :meth:`ram_ready`, :meth:`receive_devices` (blocks until the source stopped
    its guest; then create the devices), :meth:`load` (main channel),
    :meth:`confirm`, resume the guest, :meth:`close`. ``main`` is the main
    channel when known at start-up (it listens from the start); None for
    ``-incoming defer``.
    """

    def __init__(self, cpr: MigrationAddress, main: MigrationAddress | None) -> None:
        if not isinstance(cpr, UnixAddress | FdAddress):
            raise MigrationError("bad cpr channel socket type; must be unix")
        self._cpr: Listener | None = listen(cpr)
        self._main: Listener | None = None
        try:
            if main is not None:
                self._main = listen(main)
        except BaseException:
            self.close()
            raise
        self._ram_sock: socket.socket | None = None
        self._devices_sock: socket.socket | None = None
        self._conn: socket.socket | None = None

    def _accept(self, timeout: float | None) -> socket.socket:
        if self._cpr is None:
            raise MigrationError("cpr-transfer: the cpr channel is closed")
        return self._cpr.accept(timeout)

    def receive_ram(self, timeout: float | None = None) -> CprState:
        """Phase 1: accept the source and receive the guest-RAM fds (the caller owns the state)."""
        self._ram_sock = self._accept(timeout)
        return receive_state(self._ram_sock, timeout=timeout)

    def ram_ready(self, timeout: float | None = None) -> None:
        """Tell the source that RAM is mapped and registered, and whether the main channel listens;
        then accept its main (if listening) and second cpr connections while its guest still runs,
        and tell it we wait for the device fds: the source stops its guest only after that."""
        sock, self._ram_sock = self._ram_sock, None
        if sock is None:
            raise MigrationError("cpr-transfer: ram_ready() before receive_ram()")
        with sock:
            sock.sendall(ACK_LISTENING if self._main is not None else ACK_DEFERRED)
        listener, self._main = self._main, None
        if listener is not None:
            with listener:
                self._conn = listener.accept(timeout)
        self._devices_sock = self._accept(timeout)
        cpr, self._cpr = self._cpr, None
        if cpr is not None:
            cpr.close()
        self._devices_sock.sendall(ACK_WAITING)
        rehearse()  # (the source, waiting for our CPU, stops its guest only once we block)

    def receive_devices(self, into: CprState, timeout: float | None = None) -> None:
        """Phase 2: receive the device fds into ``into`` (blocks until the source stopped its guest)."""
        if self._devices_sock is None:
            raise MigrationError("cpr-transfer: receive_devices() before ram_ready()")
        with receive_state(self._devices_sock, timeout=timeout) as state:
            into.take_all(state)

    def load(self, address: MigrationAddress | None, devices: DeviceRegistry, timeout: float | None = None) -> str:
        """Load device state from the main channel (accepted by :meth:`ram_ready`, or now, hanging
        up the cpr socket first, for ``-incoming defer``); returns the source run state."""
        if self._conn is None:
            if address is None:
                raise MigrationError("cpr-transfer: no main channel")
            with listen(address) as listener:
                self.hang_up()
                self._conn = listener.accept(timeout)
        return read_main(self._conn.fileno(), devices)

    def hang_up(self) -> None:
        """Close the cpr socket: the HUP a deferred source waits for before it connects."""
        sock, self._devices_sock = self._devices_sock, None
        if sock is not None:
            sock.close()

    def confirm(self) -> None:
        """Tell the source the guest is taken over here, before resuming it: it completes and stays
        in postmigrate. Raises if the source is gone or cancelled (the guest must not run here).
        The sockets stay open until :meth:`close`, so closing them is not on the pause path."""
        conn = self._conn
        if conn is None:
            raise MigrationError("cpr-transfer: confirm() without a main channel")
        try:
            conn.send(ACK_RUNNING, socket.MSG_NOSIGNAL)
        except OSError as e:
            try:
                pid = _core.peer_credentials(conn.fileno())[0]  # (not a UNIX socket: no pid)
            except OSError:
                pid = 0
            if pid and not _process_alive(pid):
                log.warning("cpr-transfer: the source (pid %d) died after the hand-over; the guest runs here", pid)
                return
            raise MigrationError(f"cpr-transfer: the source gave up before the guest resumed here ({e.strerror})") from e

    def close(self) -> None:
        """Close every socket and listener (the source sees the failure and resumes its guest)."""
        for sock in (self._ram_sock, self._devices_sock, self._conn):
            if sock is not None:
                sock.close()
        self._ram_sock = self._devices_sock = self._conn = None
        for listener in (self._cpr, self._main):
            if listener is not None:
                listener.close()
        self._cpr = self._main = None


class TransferIncoming:
    """The target side after start-up, for ``-incoming defer`` (an :class:`~cprfast.migration.IncomingDriver`)."""

    def __init__(self, target: TransferTarget, host: CprHost) -> None:
        self.target = target
        self.host = host

    def run(self, ctx: IncomingContext) -> RunState:
        """Listen on the main channel, hang up the cpr socket, load, confirm (the guest resumes after)."""
        from cprfast.status import RunState

        try:
            state = RunState(self.target.load(ctx.address, self.host.devices))
            self.target.confirm()
        finally:
            self.target.close()
        return state
