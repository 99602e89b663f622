"""Type stubs for the Rust extension ``cprfast._core`` (keep in step with rust/py/src).

Every class is ``@final``: PyO3 classes cannot be subclassed.
"""

from collections.abc import Sequence
from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Region",
    "StreamProgress",
    "StreamStats",
    "core_version",
    "load_mapped",
    "mapped_file_size",
    "recv_pages",
    "save_mapped",
    "send_pages",
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

# --- page streaming and the mapped-ram save file (rust/py/src/pagestream.rs) ---

@final
class StreamProgress:
    """Counters of a running send/recv/save/load, readable from another thread."""

    def __new__(cls) -> StreamProgress: ...
    @property
    def bytes(self) -> int: ...
    @property
    def pages(self) -> int: ...
    @property
    def zero_pages(self) -> int: ...
    @property
    def chunks(self) -> int: ...

@final
class StreamStats:
    """Totals of a finished send/recv/save/load."""

    @property
    def bytes(self) -> int: ...
    @property
    def pages(self) -> int: ...
    @property
    def zero_pages(self) -> int: ...
    @property
    def chunks(self) -> int: ...
    @property
    def seconds(self) -> float: ...

def send_pages(
    region: Region,
    fd: int,
    *,
    dirty: npt.NDArray[np.uint64] | None = None,
    bandwidth: int = 0,
    progress: StreamProgress | None = None,
    channels: Sequence[int] = (),
) -> StreamStats: ...
def recv_pages(
    region: Region, fd: int, *, progress: StreamProgress | None = None, channels: Sequence[int] = ()
) -> StreamStats: ...
def save_mapped(
    region: Region,
    fd: int,
    offset: int = 0,
    *,
    dirty: npt.NDArray[np.uint64] | None = None,
    threads: int = 0,
    progress: StreamProgress | None = None,
) -> StreamStats: ...
def load_mapped(
    region: Region, fd: int, offset: int = 0, *, threads: int = 0, progress: StreamProgress | None = None
) -> StreamStats: ...
def mapped_file_size(region_size: int, page_size: int | None = None) -> int: ...
