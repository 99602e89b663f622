"""Type stubs for the Rust extension ``cprfast._core`` (keep in step with rust/py/src).

Every class is ``@final``: PyO3 classes cannot be subclassed.
"""

from typing import final

__all__ = ["Region", "core_version"]

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
