"""A QMP-compatible control server, so QEMU's tools drive a cprfast VMM unchanged.

It speaks the QMP wire protocol (newline-delimited JSON on a UNIX socket): a
greeting, ``qmp_capabilities`` negotiation, ``id`` echoed, errors as
``{"error": {"class", "desc"}}``, timestamped events. Commands map onto a
:class:`~cprfast.migration.MigrationState` with QEMU's names; a VMM adds its own
with :meth:`QMPServer.register_command`. The server is asyncio-based but
embeddable in threaded VMMs via :meth:`QMPServer.start_in_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cprfast import channels
from cprfast.errors import CprError
from cprfast.migration import MigrationState
from cprfast.status import MigrationStatus, RunState

log = logging.getLogger(__name__)

#: A command handler: takes the (already checked) arguments, returns the
#: ``return`` value (None means ``{}``); may be a coroutine function.
Handler = Callable[[dict[str, Any]], Any]

_MAX_MESSAGE = 16 << 20


class QMPError(Exception):
    """An error reply with a QMP error class (``GenericError`` unless told)."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def check_args(arguments: dict[str, Any], required: Iterable[str] = (), optional: Iterable[str] = ()) -> None:
    """QAPI's argument checks, with its texts: unknown members, then missing ones."""
    req = tuple(required)
    allowed = set(req) | set(optional)
    for name in arguments:
        if name not in allowed:
            raise QMPError(f"Parameter '{name}' is unexpected")
    for name in req:
        if name not in arguments:
            raise QMPError(f"Parameter '{name}' is missing")


def _typed(arguments: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = arguments.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise QMPError(f"Invalid parameter type for '{name}', expected: {what}")
    return value


class _Command:
    def __init__(self, handler: Handler, blocking: bool) -> None:
        self.handler = handler
        self.is_async = inspect.iscoroutinefunction(handler)
        self.blocking = blocking


class QMPServer:
    """QMP over a UNIX socket for one :class:`MigrationState`.

    The socket is opened like the cpr channel's (:func:`cprfast.channels.listen`): mode
    0600 from the start, in a checked directory, and a peer whose uid is not in
    ``allowed_uids`` (default: ours) is logged and closed before it gets even the
    greeting, since QMP can hand guest memory to whoever asks for a migration.
    """

    def __init__(
        self,
        migration: MigrationState,
        path: str | os.PathLike[str],
        *,
        package: str | None = None,
        on_quit: Callable[[], None] | None = None,
        allowed_uids: Sequence[int] | None = None,
    ) -> None:
        from cprfast import __version__

        self.migration = migration
        self.path = Path(path)
        self.package = package if package is not None else f"cprfast {__version__}"
        self.on_quit = on_quit
        self.allowed_uids = allowed_uids
        self._commands: dict[str, _Command] = {}
        self._listener: channels.Listener | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: list[dict[str, Any]] | None = None
        """Events raised while the guest is stopped for a migration; sent when that ends."""
        self._held_lock = threading.Lock()
        self._clients: set[_Session] = set()
        self._closed: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._register_builtins()

    # ------------------------------------------------------------------ commands

    def register_command(self, name: str, handler: Handler, *, blocking: bool = True) -> None:
        """Add command ``name``. Sync handlers run in a worker thread unless ``blocking=False``."""
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        self._commands[name] = _Command(handler, blocking)

    def _register_builtins(self) -> None:
        m = self.migration

        def set_parameters(a: dict[str, Any]) -> None:
            m.parameters.set(a)

        def query_parameters(a: dict[str, Any]) -> object:
            check_args(a)
            return m.parameters.query()

        def set_capabilities(a: dict[str, Any]) -> None:
            check_args(a, required=("capabilities",))
            m.set_capabilities(a["capabilities"])

        def query_capabilities(a: dict[str, Any]) -> object:
            check_args(a)
            return m.capabilities.query()

        def migrate(a: dict[str, Any]) -> None:
            check_args(a, optional=("uri", "channels", "detach", "resume"))
            _typed(a, "uri", str, "string")
            _typed(a, "channels", list, "array")
            _typed(a, "detach", bool, "boolean")  # deprecated in QEMU, ignored there too
            if _typed(a, "resume", bool, "boolean"):
                raise QMPError("cprfast does not implement postcopy recovery ('resume')")
            m.migrate(uri=a.get("uri"), channels=a.get("channels"))

        def migrate_incoming(a: dict[str, Any]) -> None:
            check_args(a, optional=("uri", "channels"))
            _typed(a, "uri", str, "string")
            _typed(a, "channels", list, "array")
            m.migrate_incoming(uri=a.get("uri"), channels=a.get("channels"))

        def no_args(fn: Callable[[], object]) -> Handler:
            def handler(a: dict[str, Any]) -> object:
                check_args(a)
                return fn()

            return handler

        builtins: dict[str, Handler] = {
            "migrate-set-parameters": set_parameters,
            "query-migrate-parameters": query_parameters,
            "migrate-set-capabilities": set_capabilities,
            "query-migrate-capabilities": query_capabilities,
            "migrate": migrate,
            "migrate-incoming": migrate_incoming,
            "migrate_cancel": no_args(m.cancel),
            "query-migrate": no_args(m.query_migrate),
            "query-status": no_args(m.query_status),
            "stop": no_args(m.stop),
            "cont": no_args(m.cont),
            "query-commands": no_args(lambda: [{"name": n} for n in ["qmp_capabilities", *self._commands]]),
        }
        for name, handler in builtins.items():
            self.register_command(name, handler)
        self.register_command("quit", self._quit, blocking=False)

    async def _quit(self, a: dict[str, Any]) -> None:
        check_args(a)
        loop = asyncio.get_running_loop()
        loop.call_soon(self._begin_quit)

    def _begin_quit(self) -> None:
        if self.on_quit is not None:
            try:
                self.on_quit()
            except Exception:
                log.exception("QMP quit handler failed")
        asyncio.get_running_loop().create_task(self.close())

    # ------------------------------------------------------------------ events

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` to every negotiated client; callable from any thread."""
        now = time.time()
        msg: dict[str, Any] = {"event": name}
        if data is not None:
            msg["data"] = data
        seconds = int(now)
        msg["timestamp"] = {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}
        with self._held_lock:
            if self._held is not None:
                self._held.append(msg)
                return
        self._send_soon([msg])

    def _send_soon(self, msgs: list[dict[str, Any]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            loop.call_soon_threadsafe(self._broadcast, msgs)

    def _broadcast(self, msgs: list[dict[str, Any]]) -> None:
        for client in list(self._clients):
            if client.negotiated:
                for msg in msgs:
                    client.send(msg)

    def _hold_events(self, hold: bool) -> None:
        """While the guest is stopped for a migration, events wait: waking the monitor's thread
        then would take the interpreter from the switchover, lengthening the guest's pause."""
        with self._held_lock:  # (sent under the lock: an event raised meanwhile queues behind them)
            held, self._held = self._held, ([] if hold else None)
            if held:
                self._send_soon(held)

    def _on_status(self, status: MigrationStatus) -> None:
        if self.migration.capabilities["events"]:
            self.emit_event("MIGRATION", {"status": str(status)})
        if status.is_terminal:
            self._hold_events(False)

    def _on_run_state(self, old: RunState, new: RunState) -> None:
        if new is RunState.FINISH_MIGRATE:
            self._hold_events(True)
        if old is RunState.RUNNING and new is not RunState.RUNNING:
            self.emit_event("STOP")
        elif new is RunState.RUNNING:
            self.emit_event("RESUME")
        if old is RunState.FINISH_MIGRATE:
            self._hold_events(False)

    # ------------------------------------------------------------------ serving

    async def start(self) -> None:
        """Listen on the socket (replacing a stale one) and start accepting clients."""
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._listener = channels.listen(channels.UnixAddress(str(self.path)), allowed_uids=self.allowed_uids)
        self._loop.add_reader(self._listener.fileno(), self._accept)
        m = self.migration
        self._unsubscribe = [
            m.status.subscribe(self._on_status),
            m.incoming_status.subscribe(self._on_status),
            m.subscribe_run_state(self._on_run_state),
        ]
        log.info("QMP listening on %s", self.path)

    def _accept(self) -> None:
        """A peer knocked: take it if its uid is allowed (the listener logs and closes any other)."""
        assert self._listener is not None and self._loop is not None
        try:
            sock = self._listener.accept(0)
        except TimeoutError:
            return  # it was a refused peer, or it went away again
        except OSError:
            log.exception("QMP accept on %s failed", self.path)
            return
        task = self._loop.create_task(self._serve_socket(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_socket(self, sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 16)
        except BaseException:
            sock.close()
            raise
        await self._serve_client(reader, writer)

    async def serve_forever(self) -> None:
        """Serve until ``quit`` or :meth:`close`."""
        if self._listener is None:
            await self.start()
        assert self._closed is not None
        await self._closed.wait()

    async def close(self) -> None:
        """Stop listening, disconnect the clients, remove the socket file (if still ours)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        listener, self._listener = self._listener, None
        if listener is not None:
            if self._loop is not None:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        for client in list(self._clients):
            client.close()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._closed is not None:
            self._closed.set()

    def start_in_thread(self) -> None:
        """Run the server on its own event loop in a daemon thread; returns once it listens."""
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                await self.start()
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            ready.set()
            await self.serve_forever()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="cprfast-qmp", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    def stop_thread(self, timeout: float | None = 10.0) -> None:
        """Close a server started with :meth:`start_in_thread` and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout)
        thread.join(timeout)
        self._thread = None

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(self, writer)
        self._clients.add(session)
        try:
            await session.run(reader)
        finally:
            self._clients.discard(session)
            session.close()

    async def _execute(self, name: str, arguments: dict[str, Any]) -> Any:
        cmd = self._commands.get(name)
        if cmd is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        try:
            if cmd.is_async:
                result = await cmd.handler(arguments)
            elif cmd.blocking:
                result = await asyncio.get_running_loop().run_in_executor(None, cmd.handler, arguments)
            else:
                result = cmd.handler(arguments)
        except QMPError:
            raise
        except (CprError, ValueError) as e:
            raise QMPError(str(e)) from e
        except Exception as e:
            log.exception("QMP command %s failed", name)
            raise QMPError(f"{name}: internal error: {e}") from e
        return {} if result is None else result


class _Session:
    """One client connection."""

    def __init__(self, server: QMPServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self.negotiated = False

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(json.dumps(msg).encode() + b"\r\n")

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def run(self, reader: asyncio.StreamReader) -> None:
        qemu = {"micro": 0, "minor": 0, "major": 10}
        self.send({"QMP": {"version": {"qemu": qemu, "package": self.server.package}, "capabilities": []}})
        splitter = _JsonSplitter()
        while True:
            try:
                chunk = await reader.read(1 << 16)
            except ConnectionError:
                return
            if not chunk:
                return
            for message in splitter.feed(chunk):
                self.send(await self._handle(message))
            if splitter.pending > _MAX_MESSAGE:
                self.send(_error("JSON parse error, message too long"))
                return
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError) as e:  # also: numbers over 4300 digits, nesting too deep
            return _error(f"JSON parse error, {e}")
        if not isinstance(msg, dict):
            return _error("QMP input must be a JSON object")
        reply: dict[str, Any]
        try:
            reply = {"return": await self._dispatch(msg)}
        except QMPError as e:
            reply = _error(e.desc, e.error_class)
        if "id" in msg:
            reply["id"] = msg["id"]
        return reply

    async def _dispatch(self, msg: dict[str, Any]) -> Any:
        for key in msg:
            if key not in ("execute", "arguments", "id"):
                if key == "exec-oob":
                    raise QMPError("QMP input member 'exec-oob' is unexpected")
                raise QMPError(f"QMP input member '{key}' is unexpected")
        if "execute" not in msg:
            raise QMPError("QMP input lacks member 'execute'")
        name = msg["execute"]
        if not isinstance(name, str):
            raise QMPError("QMP input member 'execute' must be a string")
        arguments = msg.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QMPError("QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            if self.negotiated:
                raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
            check_args(arguments, optional=("enable",))
            for cap in arguments.get("enable", []):
                raise QMPError(f"Parameter 'enable' does not accept value '{cap}'")
            self.negotiated = True
            return {}
        if not self.negotiated:
            raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        return await self.server._execute(name, arguments)


class _JsonSplitter:
    """Cuts a byte stream into JSON texts the way QEMU's JSON streamer does: by nesting depth.

    QMP has no framing: clients (qemu.qmp among them) send objects back to back
    without newlines. Structural characters are ASCII, so scanning bytes is safe
    for UTF-8. A top-level scalar ends at a newline or at the next ``{``/``[``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = 0  # start of the text being collected
        self._depth = 0
        self._in_str = False
        self._escape = False
        self._scalar = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished text held."""
        return len(self._buf) - self._start

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the texts it completed."""
        out: list[bytes] = []
        buf = self._buf
        buf += data
        i = self._pos
        while i < len(buf):
            c = buf[i]
            if self._in_str:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:  # quote
                    self._in_str = False
            elif self._depth:
                if c == 0x22:
                    self._in_str = True
                elif c in b"{[":
                    self._depth += 1
                elif c in b"}]":
                    self._depth -= 1
                    if not self._depth:
                        out.append(bytes(buf[self._start : i + 1]))
                        self._start = i + 1
            elif self._scalar:
                if c in b"\r\n{[":
                    out.append(bytes(buf[self._start : i]))
                    self._scalar = False
                    self._start = i
                    continue  # look at this byte again outside the scalar
            elif c in b" \t\r\n":
                self._start = i + 1
            elif c in b"{[":
                self._start, self._depth = i, 1
            else:
                self._start, self._scalar = i, True
            i += 1
        del buf[: self._start]
        self._pos, self._start = i - self._start, 0
        return out


def _error(desc: str, error_class: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


__all__ = ["Handler", "QMPError", "QMPServer", "check_args"]
