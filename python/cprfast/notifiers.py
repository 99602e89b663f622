"""Migration notifiers: per-mode lists told of PRECOPY_SETUP, PRECOPY_DONE and PRECOPY_FAILED.

As in QEMU (``migration_add_notifier_modes``), a notifier registers for a set
of modes, the newest runs first, and only PRECOPY_SETUP may refuse the
migration. A migration talks to its notifiers through one :class:`Dispatch`,
which snapshots the mode's list and guarantees each notifier one of the
documented sequences: SETUP -> DONE, SETUP -> FAILED, or FAILED alone (a
migration that failed before SETUP). The single exception is QEMU's own:
cpr-exec's exec can fail after DONE was delivered, and then FAILED follows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from enum import Enum

from cprfast.errors import NotifierVetoError
from cprfast.status import MigMode

log = logging.getLogger(__name__)


class MigrationEvent(Enum):
    """QEMU's ``MigrationEventType``."""

    PRECOPY_SETUP = "precopy-setup"
    PRECOPY_DONE = "precopy-done"
    PRECOPY_FAILED = "precopy-failed"


#: A notifier: called with the event and the migration's mode. On PRECOPY_SETUP
#: it refuses the migration by raising, or by returning an exception (or a
#: message string); on DONE/FAILED its return value is ignored and an exception is logged.
Notifier = Callable[[MigrationEvent, MigMode], "BaseException | str | None"]

ALL_MODES: frozenset[MigMode] = frozenset(MigMode)


class Notifiers:
    """The per-mode notifier lists of one migration object."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lists: dict[MigMode, list[Notifier]] = {m: [] for m in MigMode}

    def add(self, notifier: Notifier, modes: Iterable[MigMode] = (MigMode.NORMAL,)) -> Notifier:
        """Register ``notifier`` for ``modes`` (default normal only, like QEMU); it runs before older ones."""
        wanted = frozenset(modes)
        if not wanted:
            raise ValueError("a notifier needs at least one migration mode")
        with self._lock:
            for mode in wanted:
                if notifier in self._lists[mode]:
                    raise ValueError(f"notifier {notifier!r} is already registered for {mode}")
            for mode in wanted:
                self._lists[mode].insert(0, notifier)
        return notifier

    def remove(self, notifier: Notifier) -> None:
        """Unregister ``notifier`` from every mode (a no-op for one never added)."""
        with self._lock:
            for lst in self._lists.values():
                if notifier in lst:
                    lst.remove(notifier)

    def for_mode(self, mode: MigMode) -> list[Notifier]:
        """The notifiers of ``mode``, in call order (newest first)."""
        with self._lock:
            return list(self._lists[mode])

    def dispatch(self, mode: MigMode) -> Dispatch:
        """Start talking to the notifiers of ``mode`` for one migration."""
        return Dispatch(mode, self.for_mode(mode))


def _veto_text(result: BaseException | str) -> str:
    text = str(result)
    return text if text else type(result).__name__


class Dispatch:
    """One migration's conversation with its notifiers (a snapshot of the list)."""

    def __init__(self, mode: MigMode, notifiers: list[Notifier]) -> None:
        self.mode = mode
        self._notifiers = notifiers
        self._lock = threading.Lock()
        self._setup_sent = False
        self._outcome: MigrationEvent | None = None

    def setup(self) -> None:
        """Send PRECOPY_SETUP; the first notifier that refuses stops the rest.

        Raises :class:`NotifierVetoError` with the notifier's reason. Notifiers
        that already ran (the refusing one included) get PRECOPY_FAILED from
        :meth:`finish`, as in QEMU.
        """
        with self._lock:
            if self._setup_sent or self._outcome is not None:
                raise RuntimeError("PRECOPY_SETUP already sent for this migration")
            self._setup_sent = True
        for notifier in self._notifiers:
            try:
                result = notifier(MigrationEvent.PRECOPY_SETUP, self.mode)
            except Exception as e:
                raise NotifierVetoError(_veto_text(e)) from e
            if isinstance(result, BaseException | str):
                raise NotifierVetoError(_veto_text(result))

    def finish(self, ok: bool) -> None:
        """Send PRECOPY_DONE (``ok``) or PRECOPY_FAILED, once; later calls do nothing.

        DONE is only possible after SETUP; FAILED alone is QEMU's sequence for a
        migration that failed before it reached SETUP.
        """
        with self._lock:
            if self._outcome is not None:
                return
            if ok and not self._setup_sent:
                raise RuntimeError("PRECOPY_DONE without PRECOPY_SETUP")
            self._outcome = MigrationEvent.PRECOPY_DONE if ok else MigrationEvent.PRECOPY_FAILED
        self._send(self._outcome)

    def fail_after_done(self) -> None:
        """cpr-exec only: the exec failed after DONE was delivered, so FAILED follows DONE."""
        with self._lock:
            if self._outcome is not MigrationEvent.PRECOPY_DONE:
                raise RuntimeError("fail_after_done needs PRECOPY_DONE to have been sent")
            self._outcome = MigrationEvent.PRECOPY_FAILED
        self._send(MigrationEvent.PRECOPY_FAILED)

    def _send(self, event: MigrationEvent) -> None:
        for notifier in self._notifiers:
            try:
                notifier(event, self.mode)
            except Exception:
                log.exception("migration notifier %r failed on %s", notifier, event.name)
