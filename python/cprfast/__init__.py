"""cprfast: live update and migration for any VMM, the way QEMU's CPR modes do it.

The Rust core (:mod:`cprfast._core`) owns memory and file descriptors; the
Python modules here hold QEMU's migration policy and orchestration.
"""

from __future__ import annotations

from cprfast.errors import (
    BadFdError,
    CprError,
    FdPassingError,
    FeatureUnavailableError,
    MigrationBlockedError,
    MigrationError,
    NotifierVetoError,
    PeerClosedError,
    PeerRefusedError,
    StreamError,
)

__version__ = "0.1.0"

__all__ = [
    "BadFdError",
    "CprError",
    "FdPassingError",
    "FeatureUnavailableError",
    "MigrationBlockedError",
    "MigrationError",
    "NotifierVetoError",
    "PeerClosedError",
    "PeerRefusedError",
    "StreamError",
    "__version__",
]
