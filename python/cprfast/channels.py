"""Migration channel addresses: QEMU's URIs and JSON channel lists, and how to open them.

A migration has a *main* channel (device state, RAM for precopy) and, for
cpr-transfer, a *cpr* channel (the CPR state with its fds). Both are named the
way QEMU names them, so the same command lines and QMP arguments work here:

- URIs: ``unix:PATH``, ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6),
  ``file:PATH[,offset=N]``, ``fd:N`` (a number or a named monitor fd) and
  ``exec:CMD``;
- ``-incoming`` values: a URI, ``defer``, or one channel in JSON
  (``{"channel-type": "cpr", "addr": {...}}``) or QEMU's keyval form
  (``cpr,addr.transport=socket,addr.type=unix,addr.path=/run/cpr.sock``);
- QMP ``channels`` lists: ``[{"channel-type": "main", "addr": {...}}, ...]``.

Error texts follow QEMU's (``unknown migration protocol: foo``, ``Channel list has
no main entry``, ...) so that tools matching on them keep working.

``exec:CMD`` is the one place where a shell is involved: like QEMU, the command
is stored as ``/bin/sh -c CMD``. Nothing here runs it; whoever runs it passes the
argv to ``subprocess`` without ``shell=True``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import os
import re
import shlex
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cprfast import _core
from cprfast.errors import MigrationError

__all__ = [
    "DEFER",
    "Channel",
    "ChannelType",
    "Defer",
    "ExecAddress",
    "FdAddress",
    "FileAddress",
    "Listener",
    "MigrationAddress",
    "TcpAddress",
    "UnixAddress",
    "connect",
    "listen",
    "open_file",
    "parse_channel",
    "parse_channels",
    "parse_incoming",
    "parse_uri",
]

log = logging.getLogger(__name__)

SHELL_ARGV = ("/bin/sh", "-c")
"""What ``exec:CMD`` runs: QEMU hands CMD to ``/bin/sh -c`` too."""


class ChannelType(enum.StrEnum):
    """QEMU's MigrationChannelType."""

    MAIN = "main"
    CPR = "cpr"


@dataclass(frozen=True)
class UnixAddress:
    """A UNIX stream socket path."""

    path: str

    @property
    def uri(self) -> str:
        """The ``unix:`` URI that parses back to this address."""
        return f"unix:{self.path}"

    @property
    def streamable(self) -> bool:
        """True: a socket carries a stream the peer reads as it arrives."""
        return True


@dataclass(frozen=True)
class TcpAddress:
    """A TCP endpoint; an empty host means every local address (``tcp::PORT``)."""

    host: str
    port: int

    @property
    def uri(self) -> str:
        """The ``tcp:`` URI that parses back to this address (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def streamable(self) -> bool:
        """True: a socket carries a stream the peer reads as it arrives."""
        return True


@dataclass(frozen=True)
class FileAddress:
    """A file the stream is written to (or read from) starting at ``offset``."""

    path: str
    offset: int = 0

    @property
    def uri(self) -> str:
        """The ``file:`` URI that parses back to this address."""
        return f"file:{self.path},offset={self.offset}" if self.offset else f"file:{self.path}"

    @property
    def streamable(self) -> bool:
        """False: a file holds all data until the reader opens it (cpr-reboot, cpr-exec)."""
        return False


@dataclass(frozen=True)
class FdAddress:
    """An fd already open in this process: a number, or the name of a monitor fd (``getfd``)."""

    fd: int | str

    @property
    def uri(self) -> str:
        """The ``fd:`` URI that parses back to this address."""
        return f"fd:{self.fd}"

    @property
    def streamable(self) -> bool:
        """True: QEMU treats an fd channel as a socket stream."""
        return True


@dataclass(frozen=True)
class ExecAddress:
    """A command whose stdin/stdout carry the stream; ``exec:CMD`` is ``/bin/sh -c CMD``."""

    argv: tuple[str, ...]

    @property
    def uri(self) -> str:
        """An ``exec:`` URI: exact for ``/bin/sh -c CMD``, else a shell-quoted equivalent."""
        if len(self.argv) == 3 and self.argv[:2] == SHELL_ARGV:
            return f"exec:{self.argv[2]}"
        return f"exec:{shlex.join(self.argv)}"

    @property
    def streamable(self) -> bool:
        """True: the command reads a pipe as it is written."""
        return True


MigrationAddress = UnixAddress | TcpAddress | FileAddress | FdAddress | ExecAddress


class Defer(enum.Enum):
    """``-incoming defer``: the channel comes later, with QMP ``migrate-incoming``."""

    DEFER = "defer"


DEFER = Defer.DEFER


@dataclass(frozen=True)
class Channel:
    """One entry of a channel list: its type and address."""

    channel_type: ChannelType
    addr: MigrationAddress


# --------------------------------------------------------------------------- URIs

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE_RE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)([bBkKmMgGtTpPeE]?)")


_U64_DIGITS = 20
"""Decimal digits of the largest u64; a longer number is out of every range we accept
(and ``int()`` refuses strings over 4300 digits with a ValueError)."""


def _decimal(text: str) -> int | None:
    """``text`` as a non-negative ASCII decimal, or None; beyond 20 digits it reads as ``2**64``."""
    if not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0")
    return int(digits or "0") if len(digits) <= _U64_DIGITS else 1 << 64


def _parse_offset(text: str) -> int:
    """Parse a file offset like QEMU's ``qemu_strtosz``: decimal or 0x hex, optional K/M/G/... suffix."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise MigrationError(f"file URI has bad offset {text}: Invalid argument")
    number = m.group(1)
    value = int(number, 16) if number[:2].lower() == "0x" else _decimal(number)
    assert value is not None  # the regex admits only digits
    value *= _SUFFIXES[m.group(2).upper()]
    if value >= 1 << 64:
        raise MigrationError(f"file URI has bad offset {text}: Numerical result out of range")
    return value


def _parse_inet(rest: str) -> TcpAddress:
    """Parse ``HOST:PORT`` / ``[V6]:PORT`` / ``:PORT`` with inet_parse's error texts.

    QEMU also accepts service names and ``,ipv4``-style options; we accept only a
    decimal port in 0..65535 and say so, rather than failing later in getaddrinfo.
    """
    if rest.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\]:([^,]*)", rest)
        if m is None:
            raise MigrationError(f"error parsing IPv6 address '{rest}'")
        host, port = m.group(1), m.group(2)
    elif rest.startswith(":"):
        host, port = "", rest[1:]
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not host or ":" in host:
            raise MigrationError(f"error parsing address '{rest}'")
    value = _decimal(port)
    if value is None:
        raise MigrationError(f"error parsing port in address '{rest}'")
    if value > 65535:
        raise MigrationError(f"port {port} out of range in address '{rest}'")
    return TcpAddress(host, value)


def _fd_value(text: str) -> int | str:
    """An fd given as text: a decimal number, or the name of a monitor fd."""
    number = _decimal(text)
    if number is None:
        return text
    if number >= 1 << 31:
        raise MigrationError(f"Invalid file descriptor number '{text}'")
    return number


def parse_uri(uri: str) -> MigrationAddress:
    """Parse a migration URI the way QEMU's ``migrate_uri_parse`` does."""
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise MigrationError(f"unknown migration protocol: {uri}")
    if scheme == "exec":
        return ExecAddress((*SHELL_ARGV, rest))
    if scheme == "unix":
        if not rest:
            raise MigrationError("invalid Unix socket address")
        return UnixAddress(rest)
    if scheme == "fd":
        if not rest:
            raise MigrationError("invalid file descriptor address")
        return FdAddress(_fd_value(rest))
    if scheme == "tcp":
        return _parse_inet(rest)
    if scheme == "file":
        path, opt, offset = rest.partition(",offset=")
        if not path:
            raise MigrationError("file URI has an empty path")
        return FileAddress(path, _parse_offset(offset) if opt else 0)
    if scheme in ("rdma", "vsock"):
        raise MigrationError(f"{scheme} migration is not supported by cprfast")
    raise MigrationError(f"unknown migration protocol: {uri}")


# ----------------------------------------------------------------- JSON channels


class _Members:
    """A QAPI-style reader of one JSON object: missing, mistyped and unexpected members are errors."""

    def __init__(self, obj: object, path: str) -> None:
        if not isinstance(obj, dict):
            raise MigrationError(f"Invalid parameter type for '{path or 'channel'}', expected: object")
        self._obj: dict[str, Any] = dict(obj)
        self._path = path

    def name(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def take(self, key: str, kind: type | tuple[type, ...], expected: str, *, default: Any = None) -> Any:
        if key not in self._obj:
            if default is not None:
                return default
            raise MigrationError(f"Parameter '{self.name(key)}' is missing")
        value = self._obj.pop(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MigrationError(f"Invalid parameter type for '{self.name(key)}', expected: {expected}")
        return value

    def enum(self, key: str, allowed: tuple[str, ...]) -> str:
        value: str = self.take(key, str, "string")
        if value not in allowed:
            raise MigrationError(f"Parameter '{self.name(key)}' does not accept value '{value}'")
        return value

    def done(self) -> None:
        for key in self._obj:
            raise MigrationError(f"Parameter '{self.name(key)}' is unexpected")


def _int_member(m: _Members, key: str, expected: str, *, default: int | None = None) -> int:
    """An integer member; keyval gives every value as a string, so decimal strings count too."""
    value = m.take(key, (int, str), expected, default=default)
    if isinstance(value, str):
        number = _decimal(value)
        if number is None:
            raise MigrationError(f"Parameter '{m.name(key)}' expects {expected}")
        value = number
    if not 0 <= value < 1 << 64:
        raise MigrationError(f"Parameter '{m.name(key)}' expects {expected}")
    return int(value)


def _parse_address(obj: object, path: str) -> MigrationAddress:
    """A QAPI MigrationAddress object -> our address."""
    m = _Members(obj, path)
    transport = m.enum("transport", ("socket", "exec", "rdma", "file"))
    addr: MigrationAddress
    if transport == "socket":
        kind = m.enum("type", ("inet", "unix", "vsock", "fd"))
        if kind == "unix":
            addr = UnixAddress(m.take("path", str, "string"))
        elif kind == "inet":
            host: str = m.take("host", str, "string")
            port = _int_member(m, "port", "a port number")
            if port > 65535:
                raise MigrationError(f"Parameter '{m.name('port')}' expects a port number")
            addr = TcpAddress(host, port)
        elif kind == "fd":
            addr = FdAddress(_fd_value(m.take("str", str, "string")))
        else:
            raise MigrationError("vsock migration is not supported by cprfast")
    elif transport == "file":
        addr = FileAddress(m.take("filename", str, "string"), _int_member(m, "offset", "uint64", default=0))
    elif transport == "exec":
        args = m.take("args", list, "array")
        if not args or not all(isinstance(a, str) for a in args):
            raise MigrationError(f"Parameter '{m.name('args')}' expects a non-empty list of strings")
        addr = ExecAddress(tuple(args))
    else:
        raise MigrationError("rdma migration is not supported by cprfast")
    m.done()
    return addr


def parse_channel(obj: object, path: str = "") -> Channel:
    """One QAPI MigrationChannel (``{"channel-type": ..., "addr": {...}}``)."""
    m = _Members(obj, path)
    channel_type = ChannelType(m.enum("channel-type", tuple(ChannelType)))
    addr = _parse_address(m.take("addr", dict, "object"), m.name("addr"))
    m.done()
    return Channel(channel_type, addr)


def parse_channels(channels: list[dict[str, Any]]) -> dict[ChannelType, MigrationAddress]:
    """A QMP ``channels`` list -> one address per channel type (QEMU's ``migrate_channels_parse``)."""
    if not isinstance(channels, list):
        raise MigrationError("Invalid parameter type for 'channels', expected: array")
    out: dict[ChannelType, MigrationAddress] = {}
    for i, obj in enumerate(channels):
        channel = parse_channel(obj, f"channels[{i}]")
        if channel.channel_type in out:
            raise MigrationError(f"Channel list has more than one {channel.channel_type} entry")
        out[channel.channel_type] = channel.addr
    if ChannelType.MAIN not in out:
        raise MigrationError("Channel list has no main entry")
    return out


_KEYVAL_DEPTH = 8
"""Most dotted levels a keyval key may have; a channel needs three (``addr.args.0``)."""


def _keyval(text: str) -> dict[str, Any]:
    """QEMU's keyval syntax with ``channel-type`` as the implied first key.

    ``cpr,addr.transport=socket,addr.type=fd,addr.str=5`` -> nested dicts; ``,,``
    is a literal comma; keys made only of digits build lists (``addr.args.0=...``).
    """
    parts = [p.replace("\0", ",") for p in text.replace(",,", "\0").split(",")]
    root: dict[str, Any] = {}
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if i != 0:
                raise MigrationError(f"Expected '=' after parameter '{part}'")
            key, value = "channel-type", part
        node = root
        *parents, leaf = key.split(".")
        if len(parents) >= _KEYVAL_DEPTH:
            raise MigrationError(f"Parameter '{key[:64]}' is nested more than {_KEYVAL_DEPTH} levels deep")
        for name in parents:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise MigrationError(f"Parameter '{key}' conflicts with an earlier value")
            node = child
        if leaf in node:
            raise MigrationError(f"Parameter '{key}' is set more than once")
        node[leaf] = value
    return _lists(root)  # type: ignore[no-any-return]


def _lists(node: Any) -> Any:
    """Turn keyval dicts whose keys are 0..n-1 into lists."""
    if not isinstance(node, dict):
        return node
    items = {k: _lists(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        if sorted(items) != sorted(str(i) for i in range(len(items))):
            raise MigrationError("list indexes must be 0, 1, 2, ... without gaps")
        return [items[str(i)] for i in range(len(items))]
    return items


def parse_incoming(spec: str) -> Defer | list[Channel]:
    """One ``-incoming`` value: ``defer``, a URI, or channels in JSON or keyval form.

    A URI gives the main channel. JSON may be one channel object or a list of them.
    """
    if spec == "defer":
        return DEFER
    if re.match(r"[A-Za-z]+:", spec):
        return [Channel(ChannelType.MAIN, parse_uri(spec))]
    if spec.startswith(("{", "[")):
        try:
            obj = json.loads(spec)
        except json.JSONDecodeError as e:
            raise MigrationError(f"JSON parse error, {e.msg}") from None
        except (ValueError, RecursionError) as e:  # a number over 4300 digits; nesting too deep
            raise MigrationError(f"JSON parse error, {e}") from None
        if isinstance(obj, list):
            return [parse_channel(o, f"channels[{i}]") for i, o in enumerate(obj)]
        return [parse_channel(obj)]
    return [parse_channel(_keyval(spec))]


# ------------------------------------------------------------- opening channels


def _resolve_fd(addr: FdAddress, named_fds: Mapping[str, int] | None) -> int:
    """The fd number behind an fd address (named fds come from the monitor's ``getfd``)."""
    if isinstance(addr.fd, int):
        return addr.fd
    if named_fds is None or addr.fd not in named_fds:
        raise MigrationError(f"File descriptor named '{addr.fd}' has not been found")
    return named_fds[addr.fd]


def _fd_socket(fd: int) -> socket.socket:
    """Adopt an inherited socket fd (the socket owns it from now on, as in QEMU)."""
    try:
        return socket.socket(fileno=fd)
    except OSError as e:
        if e.errno == errno.ENOTSOCK:
            raise MigrationError(f"File descriptor '{fd}' is not a socket") from None
        raise


def connect(
    addr: MigrationAddress, *, timeout: float | None = None, named_fds: Mapping[str, int] | None = None
) -> socket.socket:
    """Connect the outgoing side of a socket channel; the result is a blocking socket.

    ``fd:N`` adopts fd N as an already connected socket, as QEMU does.
    """
    if isinstance(addr, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr.path)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock
    if isinstance(addr, TcpAddress):
        sock = socket.create_connection((addr.host or "localhost", addr.port), timeout=timeout)
        sock.settimeout(None)
        return sock
    if isinstance(addr, FdAddress):
        return _fd_socket(_resolve_fd(addr, named_fds))
    raise MigrationError(f"cannot connect to {addr.uri}: not a socket channel")


class Listener:
    """A listening socket channel; :meth:`accept` returns one connected client.

    UNIX channels listen through :class:`cprfast._core.UnixListener`: the socket
    file is mode 0600 and peers of another uid are refused (SO_PEERCRED), since
    the channel hands out guest memory. An ``fd:`` address that is already
    connected (not listening) is itself the incoming stream, returned by the
    first :meth:`accept` (QEMU's ``-incoming fd:N``).
    """

    def __init__(self, sock: socket.socket | _core.UnixListener, addr: MigrationAddress) -> None:
        self._sock: socket.socket | _core.UnixListener | None = sock
        self._listening = isinstance(sock, _core.UnixListener) or bool(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        )
        self.address = addr
        """The bound address; for ``tcp:HOST:0`` it carries the port the kernel chose."""

    def fileno(self) -> int:
        """The listening fd (for poll/select)."""
        if self._sock is None:
            raise ValueError("listener is closed")
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Wait up to ``timeout`` seconds for one client; returns a blocking socket."""
        sock = self._sock
        if sock is None:
            raise ValueError("listener is closed")
        if not self._listening and isinstance(sock, socket.socket):
            self._sock = None
            return sock
        try:
            if isinstance(sock, _core.UnixListener):
                return socket.socket(fileno=sock.accept(timeout))
            sock.settimeout(timeout)
            try:
                conn, _ = sock.accept()
            finally:
                sock.settimeout(None)
        except TimeoutError:
            raise TimeoutError(f"no client connected to {self.address.uri} within {timeout} s") from None
        conn.settimeout(None)
        return conn

    def close(self) -> None:
        """Stop listening; a UNIX socket file we created is removed (only if still ours)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listen(
    addr: MigrationAddress, *, named_fds: Mapping[str, int] | None = None, allowed_uids: Sequence[int] | None = None
) -> Listener:
    """Open the incoming side of a socket channel (unix, tcp, or an inherited fd).

    A UNIX socket lets in only peers whose uid is in ``allowed_uids`` (default: ours),
    and is created only in a directory no other user can tamper with.
    """
    if isinstance(addr, UnixAddress):
        # QEMU unlinks whatever is at the path; we replace only a stale socket.
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(addr.path).st_mode):
                raise MigrationError(f"cannot listen on {addr.path}: it exists and is not a socket")
            os.unlink(addr.path)
        return Listener(_core.UnixListener(addr.path, allowed_uids=allowed_uids), addr)
    if isinstance(addr, TcpAddress):
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.create_server((addr.host, addr.port), family=family)
        return Listener(sock, TcpAddress(addr.host, sock.getsockname()[1]))
    if isinstance(addr, FdAddress):
        return Listener(_fd_socket(_resolve_fd(addr, named_fds)), addr)
    raise MigrationError(f"cannot listen on {addr.uri}: not a socket channel")


def open_file(addr: FileAddress, write: bool) -> int:
    """Open a file channel positioned at its offset; returns an O_CLOEXEC fd.

    Writing creates the file 0600. QEMU truncates the whole file even with an
    offset; we keep the bytes before the offset (a header someone put there) and
    drop only what follows it.
    """
    if write:
        fd = os.open(addr.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    else:
        fd = os.open(addr.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if write:
            os.ftruncate(fd, addr.offset)
        os.lseek(fd, addr.offset, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
