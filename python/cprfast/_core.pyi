"""Type stubs for the Rust extension ``cprfast._core`` (keep in step with rust/py/src).

Every class is ``@final``: PyO3 classes cannot be subclassed.
"""

from collections.abc import Sequence
from os import PathLike
from types import TracebackType
from typing import Final, Self, final

__all__ = [
    "SCM_MAX_FD",
    "Region",
    "UnixListener",
    "connect_unix",
    "core_version",
    "peer_credentials",
    "probe_features",
    "recv_fds",
    "recvmsg_fds",
    "send_fds",
    "sendmsg_fds",
]

def core_version() -> str: ...
@final
class Region:
    """A named guest-RAM region backed by a sealed memfd, mapped MAP_SHARED."""

    @staticmethod
    def create(name: str, size: int, *, hugetlb: int | None = None, seal: bool = True) -> Region: ...
    def fileno(self) -> int: ...
    @property
    def size(self) -> int: ...
    def close(self) -> None: ...

# --- fd passing (scm) -------------------------------------------------------

SCM_MAX_FD: Final[int]

def sendmsg_fds(sock: int, data: bytes, fds: Sequence[int], *, timeout: float | None = None) -> int: ...
def recvmsg_fds(
    sock: int, bufsize: int, max_fds: int = 253, *, timeout: float | None = None
) -> tuple[bytes, list[int]]: ...
def send_fds(sock: int, data: bytes, fds: Sequence[int], *, timeout: float | None = None) -> None: ...
def recv_fds(
    sock: int, *, max_fds: int = 65536, max_data: int = 16777216, timeout: float | None = None
) -> tuple[bytes, list[int]]: ...
def peer_credentials(sock: int) -> tuple[int, int, int]: ...
def connect_unix(path: str | PathLike[str], *, timeout: float | None = None) -> int: ...
@final
class UnixListener:
    """A listening UNIX socket that accepts only peers with an allowed uid."""

    def __new__(
        cls, path: str | PathLike[str], *, mode: int = 0o600, allowed_uids: Sequence[int] | None = None, backlog: int = 16
    ) -> Self: ...
    @staticmethod
    def from_fd(fd: int, *, allowed_uids: Sequence[int] | None = None) -> UnixListener: ...
    @property
    def path(self) -> str: ...
    def fileno(self) -> int: ...
    def accept(self, timeout: float | None = None) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

# --- feature probes ---------------------------------------------------------

def probe_features() -> dict[str, dict[str, bool | str | int | None]]: ...
