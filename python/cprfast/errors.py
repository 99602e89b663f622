"""The cprfast exception hierarchy.

Everything cprfast raises on purpose derives from :class:`CprError`. Errors
that come from a system call also derive from :class:`OSError` and carry the
kernel's ``errno``, so callers can branch on ``e.errno`` exactly as they would
for the syscall itself.
"""

from __future__ import annotations


class CprError(Exception):
    """Base class of every error cprfast raises on purpose."""


class FeatureUnavailableError(CprError, OSError):
    """A kernel feature is missing on this machine (the errno says how it failed)."""


class BadFdError(CprError, ValueError):
    """An fd handed to us is not what it should be (type, size or seals)."""


class StreamError(CprError):
    """Bytes read from outside are corrupt, truncated or of an unknown format."""


class FdPassingError(CprError, OSError):
    """SCM_RIGHTS passing failed in a way the kernel did not report as an errno."""


class PeerRefusedError(CprError, PermissionError):
    """A peer on a UNIX socket is not authorized (checked with SO_PEERCRED)."""


class PeerClosedError(CprError, ConnectionError):
    """The peer closed the connection before the operation finished."""


class MigrationError(CprError):
    """A migration could not start or failed; the text is what query-migrate shows."""


class MigrationBlockedError(MigrationError):
    """A registered migration blocker forbids the requested mode."""


class NotifierVetoError(MigrationError):
    """A PRECOPY_SETUP notifier refused the migration."""


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
]
