"""Migration status, VM run states and migration modes, with QEMU's values.

The status of a migration only moves by compare-and-swap, as QEMU's
``migrate_set_state`` does: a transition names the status it expects to leave,
and if another thread moved the status first the transition is refused (not
applied, no event). Every applied transition emits a ``MIGRATION`` event to the
subscribers, in the order the transitions happened.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from enum import StrEnum

from cprfast.errors import MigrationError

log = logging.getLogger(__name__)


class MigMode(StrEnum):
    """QEMU's migration modes (the ``mode`` parameter)."""

    NORMAL = "normal"
    CPR_REBOOT = "cpr-reboot"
    CPR_TRANSFER = "cpr-transfer"
    CPR_EXEC = "cpr-exec"

    @property
    def is_cpr(self) -> bool:
        """Every mode but normal is a CPR mode (the VM stops before anything is handed over)."""
        return self is not MigMode.NORMAL


class MigrationStatus(StrEnum):
    """QEMU's ``MigrationStatus`` values (qapi/migration.json)."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_DEVICE = "postcopy-device"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @property
    def is_running(self) -> bool:
        """A migration is in progress (QEMU's ``migration_is_running``)."""
        return self not in _IDLE

    @property
    def is_terminal(self) -> bool:
        """The migration ended; a new one may start from here."""
        return self in _TERMINAL


S = MigrationStatus
_TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
_IDLE = _TERMINAL | {S.NONE}

# Who may go where: the transitions QEMU's migration.c performs. A terminal
# status may start a new migration (QEMU resets to none silently, then none ->
# setup; we go straight to setup so the event stream stays gap-free).
# completed -> failed is cpr-exec's failed execvp after the stream was written;
# cancelling -> completed (not QEMU's) a cancel that raced the driver's commit:
# the target runs the guest, so the source must not resume it.
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP}),
    S.SETUP: frozenset({S.ACTIVE, S.WAIT_UNPLUG, S.FAILED, S.CANCELLING, S.CANCELLED}),
    S.WAIT_UNPLUG: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING}),
    S.ACTIVE: frozenset(
        {
            S.PRE_SWITCHOVER,
            S.DEVICE,
            S.POSTCOPY_DEVICE,
            S.POSTCOPY_ACTIVE,
            S.COLO,
            S.COMPLETED,
            S.FAILED,
            S.CANCELLING,
        }
    ),
    S.PRE_SWITCHOVER: frozenset({S.DEVICE, S.FAILED, S.CANCELLING}),
    S.DEVICE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_DEVICE: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.POSTCOPY_PAUSED, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER, S.FAILED}),
    S.POSTCOPY_RECOVER_SETUP: frozenset({S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED, S.FAILED}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED}),
    S.COLO: frozenset({S.COMPLETED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.COMPLETED}),
    S.COMPLETED: frozenset({S.SETUP, S.FAILED}),
    S.FAILED: frozenset({S.SETUP}),
    S.CANCELLED: frozenset({S.SETUP}),
}
del S


class IllegalTransitionError(MigrationError):
    """A transition QEMU never makes was requested: a bug in the caller, never user input."""


class RunState(StrEnum):
    """QEMU's VM ``RunState`` values (qapi/run-state.json)."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"

    @property
    def is_live(self) -> bool:
        """QEMU's ``runstate_is_live``: the guest runs, or sleeps and may wake by itself."""
        return self in (RunState.RUNNING, RunState.SUSPENDED)

    @property
    def needs_reset(self) -> bool:
        """QEMU's ``runstate_needs_reset``: ``cont`` is refused until the VM is reset."""
        return self in (RunState.INTERNAL_ERROR, RunState.SHUTDOWN, RunState.GUEST_PANICKED)


StatusListener = Callable[[MigrationStatus], None]


class StatusCell:
    """A migration status that changes only by compare-and-swap.

    Listeners run under the cell's lock, so they see the transitions in the
    order they were applied; they must be quick (queue the event, nothing more).
    """

    def __init__(self, initial: MigrationStatus = MigrationStatus.NONE) -> None:
        self._status = initial
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._listeners: list[StatusListener] = []

    @property
    def status(self) -> MigrationStatus:
        """The current status (a snapshot: it may change right after)."""
        return self._status

    def subscribe(self, listener: StatusListener) -> Callable[[], None]:
        """Call ``listener(new_status)`` after every applied transition; returns the unsubscriber."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def transition(self, old: MigrationStatus, new: MigrationStatus) -> bool:
        """Move from ``old`` to ``new`` if the status is still ``old``.

        Returns False (and emits nothing) when the status is no longer ``old``.
        Raises :class:`IllegalTransitionError` if ``old -> new`` is not a transition QEMU makes.
        """
        if new not in TRANSITIONS[old]:
            raise IllegalTransitionError(f"illegal migration status transition {old} -> {new}")
        with self._lock:
            if self._status is not old:
                log.debug("stale transition %s -> %s refused (status is %s)", old, new, self._status)
                return False
            self._status = new
            for listener in list(self._listeners):
                try:
                    listener(new)
                except Exception:
                    log.exception("MIGRATION status listener failed on %s", new)
            self._changed.notify_all()
            return True

    def wait_for(self, predicate: Callable[[MigrationStatus], bool], timeout: float | None) -> bool:
        """Block until ``predicate(status)`` holds; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._status), timeout)
