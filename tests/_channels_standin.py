"""A stand-in for ``cprfast.channels`` until the channels branch is merged.

conftest.py installs it only when the real module is missing. It implements the
agreed contract (ChannelType, the address dataclasses with ``uri`` and
``streamable``, ``parse_uri``, ``parse_channels``) for the well-formed inputs
these tests use; the real module owns parsing and its error texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cprfast.errors import MigrationError


class ChannelType(StrEnum):
    MAIN = "main"
    CPR = "cpr"


@dataclass(frozen=True)
class UnixAddress:
    path: str
    streamable = True

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int
    streamable = True

    @property
    def uri(self) -> str:
        return f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class FileAddress:
    path: str
    offset: int = 0
    streamable = False

    @property
    def uri(self) -> str:
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")


@dataclass(frozen=True)
class FdAddress:
    fd: int
    streamable = True

    @property
    def uri(self) -> str:
        return f"fd:{self.fd}"


@dataclass(frozen=True)
class ExecAddress:
    argv: tuple[str, ...]
    streamable = True

    @property
    def uri(self) -> str:
        return "exec:" + " ".join(self.argv)


MigrationAddress = UnixAddress | TcpAddress | FileAddress | FdAddress | ExecAddress


def parse_uri(uri: str) -> MigrationAddress:
    scheme, _, rest = uri.partition(":")
    if scheme == "unix":
        return UnixAddress(rest)
    if scheme == "file":
        return FileAddress(rest)
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        return TcpAddress(host, int(port))
    if scheme == "fd":
        return FdAddress(int(rest))
    if scheme == "exec":
        return ExecAddress(("/bin/sh", "-c", rest))
    raise MigrationError(f"unknown migration protocol: {uri}")


def _parse_addr(addr: dict[str, object]) -> MigrationAddress:
    transport = addr["transport"]
    if transport == "socket":
        if addr["type"] == "unix":
            return UnixAddress(str(addr["path"]))
        return TcpAddress(str(addr["host"]), int(str(addr["port"])))
    if transport == "file":
        return FileAddress(str(addr["filename"]), int(str(addr.get("offset", 0))))
    if transport == "exec":
        args = addr["args"]
        assert isinstance(args, list)
        return ExecAddress(tuple(str(a) for a in args))
    raise MigrationError(f"unknown transport {transport}")


def parse_channels(channels: list[dict[str, object]]) -> dict[ChannelType, MigrationAddress]:
    out: dict[ChannelType, MigrationAddress] = {}
    for ch in channels:
        addr = ch["addr"]
        assert isinstance(addr, dict)
        out[ChannelType(str(ch["channel-type"]))] = _parse_addr(addr)
    return out
