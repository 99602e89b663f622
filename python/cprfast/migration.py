"""The migration object: QEMU's ``MigrationState`` orchestration, with the mode work plugged in.

:class:`MigrationState` owns the parameters, capabilities, status, VM run state,
notifiers and blockers of one VMM, and runs a migration in QEMU's order. The
mode-specific work (sending CPR state, streaming pages, exec'ing the successor)
lives in *mode drivers* registered per mode; the orchestration around them is
the same for every mode:

1. ``migrate`` checks policy and channels; status none -> setup.
2. CPR modes stop the VM first (finish-migrate), remembering the old run state
   (seed 004: no device may be driven by two processes at once).
3. PRECOPY_SETUP notifiers; a veto fails the migration and ``migrate`` reports it.
4. The driver runs in a worker thread, so ``migrate`` returns at once as in
   QEMU; later errors are visible in :meth:`query_migrate` and the events.
5. On success: setup -> active -> device -> completed, run state postmigrate,
   PRECOPY_DONE, then the driver's optional ``complete`` step (cpr-exec's exec).
6. On any failure or cancel: the driver's cleanup stack unwinds, the VM resumes
   in its old run state, PRECOPY_FAILED, and only then the status becomes failed
   or cancelled, so whoever sees that status sees the guest running again.

Unlike QEMU, a cancel while cpr-transfer waits for the target's HUP resumes the
guest and tells the notifiers (QEMU leaves that path to its own devices), and
``cont`` is refused after a CPR hand-over, because the guest runs in the new
process and its RAM is shared with it. Likewise once a driver *commits*
(:meth:`MigrationContext.commit`: the target has the guest, or the last byte
left for it) a cancel is refused, and a cancel that raced the commit does not
resume the guest here: the migration completes (cancelling -> completed), since
the guest runs on the target and must not run on both sides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cprfast.errors import MigrationError
from cprfast.notifiers import Dispatch, Notifiers
from cprfast.policy import Blockers, MigrationCapabilities, MigrationParameters, check_channels, check_prepare
from cprfast.realtime import switchover
from cprfast.status import MigMode, MigrationStatus, RunState, StatusCell

if TYPE_CHECKING:
    from cprfast.channels import ChannelType, MigrationAddress

log = logging.getLogger(__name__)

S = MigrationStatus


class VmHooks(Protocol):
    """How the orchestration stops and resumes the VMM's vCPUs."""

    def vm_stop(self, state: RunState) -> None:
        """Stop every vCPU (and device activity); ``state`` is the run state being entered."""

    def vm_start(self, state: RunState) -> None:
        """Resume the guest in ``state``: running, or suspended (a sleeping guest stays asleep)."""


class MigrationCancelledError(MigrationError):
    """Raised inside a driver (by :meth:`MigrationContext.check_cancelled`) when the migration was cancelled."""


@runtime_checkable
class ModeDriver(Protocol):
    """The mode-specific part of an outgoing migration.

    ``run`` does the work in the worker thread and raises on failure. Optional
    methods, looked up by name: ``prepare(ctx)`` runs in ``migrate`` before the VM
    stops (cpr-transfer hands over passive guest-RAM fds there, so the target maps
    them while the guest still runs; raising fails the migration with the guest
    never stopped); ``handover(ctx)`` runs in ``migrate`` right after PRECOPY_SETUP,
    in the caller's thread (the latency-critical start of a CPR switchover, with no
    thread start on the guest's pause path; raising fails the migration);
    ``cancel(ctx)`` unblocks ``run`` or ``prepare`` (e.g. shuts a
    socket down) when the migration is cancelled; ``complete(ctx)`` runs after
    PRECOPY_DONE (cpr-exec execs here); if it raises, the migration fails after all:
    completed -> failed, PRECOPY_FAILED follows DONE, and the VM resumes, as QEMU does.
    """

    def run(self, ctx: MigrationContext) -> None:
        """Do the mode's work; the VM is already stopped for CPR modes."""


@runtime_checkable
class IncomingDriver(Protocol):
    """The mode-specific part of an incoming migration."""

    def run(self, ctx: IncomingContext) -> RunState | None:
        """Load the stream; return the source's run state (None if it did not say)."""


@dataclasses.dataclass
class RamCounters:
    """RAM figures of ``query-migrate``, updated by the driver (bytes and pages)."""

    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0
    normal: int = 0
    normal_bytes: int = 0
    dirty_sync_count: int = 0
    page_size: int = 4096
    pages_per_second: int = 0
    dirty_pages_rate: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    mbps: float = 0.0
    dirty_history: list[int] = dataclasses.field(default_factory=list)
    """Pages found dirty by each sync, in order (``x-dirty-history``: plots, convergence checks)."""

    def as_qmp(self, with_remaining: bool) -> dict[str, object]:
        """The ``ram`` member of ``query-migrate``."""
        out: dict[str, object] = {
            "transferred": self.transferred,
            "total": self.total,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal_bytes,
            "dirty-sync-count": self.dirty_sync_count,
            "page-size": self.page_size,
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "mbps": self.mbps,
            "x-dirty-history": list(self.dirty_history),
        }
        if with_remaining:
            out["remaining"] = self.remaining
            out["dirty-pages-rate"] = self.dirty_pages_rate
        return out


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class _Timing:
    """Start, setup and downtime clocks of one migration (QEMU's figures, in ms)."""

    def __init__(self, expected_downtime: int) -> None:
        self.start = _now_ms()
        self.setup_time: int | None = None
        self.downtime_start: float | None = None
        self.downtime: int | None = None
        self.total_time: int | None = None
        self.expected_downtime = expected_downtime

    def elapsed(self) -> int:
        return int(_now_ms() - self.start)


class MigrationContext:
    """What an outgoing driver sees of the migration it runs."""

    def __init__(
        self,
        owner: MigrationState,
        mode: MigMode,
        channels: Mapping[ChannelType, MigrationAddress],
        timing: _Timing,
    ) -> None:
        self._owner = owner
        self.mode = mode
        self.channels = channels
        self.params = owner.parameters
        self.caps = owner.capabilities
        self.ram = RamCounters()
        self.switchover_priority = owner.switchover_priority
        self.cleanup = contextlib.ExitStack()
        self.cancelled = threading.Event()
        self._timing = timing

    @property
    def main_channel(self) -> MigrationAddress:
        """The address of the main channel (device state, RAM)."""
        from cprfast.channels import ChannelType

        return self.channels[ChannelType.MAIN]

    def check_cancelled(self) -> None:
        """Raise :class:`MigrationCancelledError` if ``migrate_cancel`` was issued (and not committed)."""
        if self.cancelled.is_set() and not self.committed:
            raise MigrationCancelledError("migration cancelled")

    @property
    def committed(self) -> bool:
        """Whether :meth:`commit` was called."""
        return self._owner._committed is self

    def commit(self) -> None:
        """The point of no return: the target has (or will run) the guest. The migration then
        completes whatever happens, and ``migrate_cancel`` is refused."""
        self._owner._commit(self)

    def activate(self) -> None:
        """setup -> active (the setup phase is over); a no-op if already past setup."""
        self._owner._advance_to(S.ACTIVE)

    def stop_vm(self) -> None:
        """Stop the VM for the switchover (normal mode; CPR modes stopped it already)."""
        self._owner._stop_vm_for_migration()

    def switchover(self) -> None:
        """Stop the VM if needed and move to device: device state is sent from here on."""
        self.stop_vm()
        self._owner._advance_to(S.DEVICE)

    def set_expected_downtime(self, ms: int) -> None:
        """Report the downtime expected if switching over now (``expected-downtime``)."""
        self._timing.expected_downtime = ms


class IncomingContext:
    """What an incoming driver sees of the migration it loads."""

    def __init__(self, owner: MigrationState, mode: MigMode, address: MigrationAddress) -> None:
        self._owner = owner
        self.mode = mode
        self.address = address
        self.params = owner.parameters
        self.caps = owner.capabilities
        self.ram = RamCounters()
        self.cleanup = contextlib.ExitStack()

    def activate(self) -> None:
        """setup -> active: the stream started arriving."""
        self._owner.incoming_status.transition(S.SETUP, S.ACTIVE)


RunStateListener = Callable[[RunState, RunState], None]


class MigrationState:
    """One VMM's migration object: source side and target side."""

    def __init__(
        self,
        hooks: VmHooks,
        *,
        run_state: RunState = RunState.RUNNING,
        incoming: bool = False,
        incoming_mode: MigMode | None = None,
    ) -> None:
        """``incoming`` is QEMU's ``-incoming``: the VM waits in inmigrate for ``migrate_incoming``.

        ``incoming_mode`` is the mode found by the early CPR-state load
        (cpr-transfer or cpr-exec); otherwise the ``mode`` parameter applies.
        """
        self.hooks = hooks
        self.parameters = MigrationParameters()
        self.capabilities = MigrationCapabilities()
        self.notifiers = Notifiers()
        self.blockers = Blockers()
        self.status = StatusCell()
        self.incoming_status = StatusCell()
        self._lock = threading.RLock()
        self._run_state = RunState.INMIGRATE if incoming else run_state
        self._run_state_listeners: list[RunStateListener] = []
        self._incoming = incoming
        self._incoming_started = False
        self._incoming_mode = incoming_mode
        self._autostart = True
        self._handed_over = False
        self.switchover_priority: int | None = None
        """SCHED_FIFO priority for the threads that stop the guest and hand it over in a CPR
        mode (:mod:`cprfast.realtime`): ``migrate``'s own from the stop to the end of the
        hand-over, and a cpr-exec worker until it exec's; None: they keep their own. Set by
        the VMM, checked early with :func:`cprfast.realtime.check_priority`."""
        self._drivers: dict[MigMode, ModeDriver] = {}
        self._incoming_drivers: dict[MigMode, IncomingDriver] = {}
        self._ctx: MigrationContext | None = None
        self._committed: MigrationContext | None = None
        self._driver: ModeDriver | None = None
        self._timing: _Timing | None = None
        self._vm_old_state: RunState | None = None
        self._error: str | None = None
        self._incoming_error: str | None = None
        self._incoming_ram: RamCounters | None = None
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ drivers and run state

    def register_mode_driver(self, mode: MigMode, driver: ModeDriver) -> None:
        """Use ``driver`` for outgoing migrations in ``mode`` (replacing any earlier one)."""
        with self._lock:
            self._drivers[MigMode(mode)] = driver

    def register_incoming_driver(self, mode: MigMode, driver: IncomingDriver) -> None:
        """Use ``driver`` for incoming migrations in ``mode``."""
        with self._lock:
            self._incoming_drivers[MigMode(mode)] = driver

    @property
    def run_state(self) -> RunState:
        """The VM's current run state."""
        return self._run_state

    def subscribe_run_state(self, listener: RunStateListener) -> Callable[[], None]:
        """Call ``listener(old, new)`` on every run-state change; returns the unsubscriber."""
        with self._lock:
            self._run_state_listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._run_state_listeners:
                    self._run_state_listeners.remove(listener)

        return unsubscribe

    def _set_run_state(self, new: RunState) -> None:
        with self._lock:
            old, self._run_state = self._run_state, new
            if old is new:
                return
            for listener in list(self._run_state_listeners):
                try:
                    listener(old, new)
                except Exception:
                    log.exception("run-state listener failed on %s -> %s", old, new)

    def _vm_stop(self, state: RunState) -> None:
        with self._lock:
            if self._run_state.is_live:
                self.hooks.vm_stop(state)
            self._set_run_state(state)

    def _vm_resume(self, state: RunState) -> None:
        """QEMU's ``vm_resume``: start the vCPUs if ``state`` is live, else just enter it."""
        with self._lock:
            if state.is_live:
                self.hooks.vm_start(state)
            self._set_run_state(state)

    def stop(self) -> None:
        """QMP ``stop``: pause the guest (while waiting for an incoming migration: do not autostart)."""
        with self._lock:
            if self._run_state is RunState.INMIGRATE:
                self._autostart = False
            elif self._run_state.is_live:
                self._vm_stop(RunState.PAUSED)

    def cont(self) -> None:
        """QMP ``cont``: resume the guest, with QEMU's refusals (and one of ours)."""
        with self._lock:
            state = self._run_state
            if state.needs_reset:
                raise MigrationError("Resetting the Virtual Machine is required")
            if state is RunState.INMIGRATE:
                self._autostart = True
                return
            if state is RunState.FINISH_MIGRATE:
                raise MigrationError("Migration is not finalized yet")
            if state is RunState.POSTMIGRATE and self._handed_over:
                raise MigrationError(
                    "The guest was handed over by a CPR migration and runs in the new process; "
                    "it cannot be resumed here"
                )
            if not state.is_live:
                self._vm_resume(RunState.RUNNING)

    def query_status(self) -> dict[str, object]:
        """QMP ``query-status``."""
        state = self._run_state
        return {"running": state is RunState.RUNNING, "status": str(state)}

    def set_capabilities(self, capabilities: object) -> None:
        """QMP ``migrate-set-capabilities``: refused while a migration runs, as in QEMU."""
        with self._lock:
            if self.status.status.is_running:
                raise MigrationError("There's a migration process in progress")
            self.capabilities.set(capabilities)

    # ------------------------------------------------------------------ outgoing

    def migrate(
        self,
        uri: str | None = None,
        channels: Sequence[Mapping[str, object]] | None = None,
    ) -> None:
        """QMP ``migrate``: check, stop the VM (CPR), run SETUP notifiers, start the driver.

        Errors found before the driver starts are raised (and a failure after
        setup began is also recorded for ``query-migrate``); later errors only
        show in :meth:`query_migrate` and the MIGRATION events.
        """
        from cprfast import channels as ch

        if (uri is None) == (channels is None):
            raise MigrationError("need either 'uri' or 'channels' argument")
        addresses = (
            {ch.ChannelType.MAIN: ch.parse_uri(uri)}
            if uri is not None
            else ch.parse_channels([dict(c) for c in channels or ()])
        )
        with self._lock:
            mode = self.parameters.mode
            check_prepare(
                status=self.status.status,
                run_state=self._run_state,
                incoming=self._incoming,
                params=self.parameters,
                caps=self.capabilities,
                blockers=self.blockers,
            )
            check_channels(mode, addresses)
            driver = self._drivers.get(mode)
            if driver is None:
                raise MigrationError(f"no migration driver is registered for mode {mode}")
            if not self.status.transition(self.status.status, S.SETUP):
                raise MigrationError("There's a migration process in progress")
            self._error = None
            self._vm_old_state = None
            self._timing = _Timing(self.parameters.int("downtime-limit"))
            ctx = MigrationContext(self, mode, addresses, self._timing)
            self._ctx, self._driver = ctx, driver
        dispatch = self.notifiers.dispatch(mode)
        try:
            prepare = getattr(driver, "prepare", None)
            if prepare is not None:
                prepare(ctx)
            with switchover(self.switchover_priority if mode.is_cpr else None):
                if mode.is_cpr:
                    self._stop_vm_for_migration()
                dispatch.setup()
                handover = getattr(driver, "handover", None)
                if handover is not None:
                    handover(ctx)
        except BaseException as e:
            self._unwind(ctx, dispatch, e)
            raise
        self._worker = threading.Thread(
            target=self._run_outgoing, args=(ctx, driver, dispatch), name=f"cprfast-migrate-{mode}", daemon=True
        )
        self._worker.start()

    def _stop_vm_for_migration(self) -> None:
        """QEMU's ``migration_stop_vm``: record downtime start and the old run state, then stop."""
        with self._lock:
            if self._vm_old_state is not None:
                return
            timing = self._timing
            assert timing is not None
            timing.downtime_start = _now_ms()
            self._vm_old_state = self._run_state
            self._vm_stop(RunState.FINISH_MIGRATE)

    def _advance_to(self, target: MigrationStatus) -> None:
        """Walk setup -> active -> device -> completed up to ``target`` by compare-and-swap."""
        order = (S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED)
        while True:
            current = self.status.status
            if current is S.CANCELLING and self._committed is self._ctx is not None:
                self.status.transition(S.CANCELLING, S.COMPLETED)  # the cancel came too late
                continue
            if current not in order:
                raise MigrationCancelledError("migration cancelled")
            if order.index(current) >= order.index(target):
                return
            nxt = order[order.index(current) + 1]
            if self.status.transition(current, nxt) and nxt is S.ACTIVE and self._timing is not None:
                self._timing.setup_time = self._timing.elapsed()

    def _run_outgoing(self, ctx: MigrationContext, driver: ModeDriver, dispatch: Dispatch) -> None:
        try:
            driver.run(ctx)
            ctx.check_cancelled()
            ctx.switchover()
            with self._lock:
                self._advance_to(S.COMPLETED)
                timing = self._timing
                assert timing is not None and timing.downtime_start is not None
                timing.total_time = timing.elapsed()
                timing.downtime = int(_now_ms() - timing.downtime_start)
                self._set_run_state(RunState.POSTMIGRATE)
                self._handed_over = ctx.mode.is_cpr
        except BaseException as e:
            self._unwind(ctx, dispatch, e)
            return
        with contextlib.suppress(Exception):
            self._close_cleanup(ctx)
        dispatch.finish(ok=True)
        complete = getattr(driver, "complete", None)
        if complete is None:
            return
        try:
            complete(ctx)
        except BaseException as e:
            log.error("migration failed after completion: %s", e)
            with self._lock:
                self._error = str(e)
                self._handed_over = False
                self._resume_old_state()
            dispatch.fail_after_done()
            self.status.transition(S.COMPLETED, S.FAILED)

    def _commit(self, ctx: MigrationContext) -> None:
        with self._lock:
            self._committed = ctx

    def _close_cleanup(self, ctx: MigrationContext) -> None:
        try:
            ctx.cleanup.close()
        except Exception:
            log.exception("migration cleanup failed")
            raise

    def _resume_old_state(self) -> None:
        old = self._vm_old_state
        self._vm_old_state = None
        if old is not None:
            self._vm_resume(old)

    def _unwind(self, ctx: MigrationContext, dispatch: Dispatch, error: BaseException) -> None:
        """Every failure and cancel ends here: clean up, resume, notify, then the final status."""
        cancelled = isinstance(error, MigrationCancelledError) or ctx.cancelled.is_set()
        if not cancelled:
            log.error("migration failed: %s", error)
        with contextlib.suppress(Exception):
            self._close_cleanup(ctx)
        with self._lock:
            if not cancelled:
                self._error = str(error) or type(error).__name__
            self._resume_old_state()
        dispatch.finish(ok=False)
        while True:
            current = self.status.status
            if current is S.CANCELLING:
                new = S.CANCELLED
            elif current.is_terminal:
                return
            else:
                new = S.FAILED
            if self.status.transition(current, new):
                return

    def cancel(self) -> None:
        """QMP ``migrate_cancel``: a no-op when nothing runs; refused once the driver committed."""
        with self._lock:
            ctx, driver = self._ctx, self._driver
            while True:
                current = self.status.status
                if not current.is_running or current is S.CANCELLING:
                    return
                if ctx is not None and self._committed is ctx:
                    raise MigrationError(
                        "The migration has switched over: the guest runs on the target; it cannot be cancelled"
                    )
                if self.status.transition(current, S.CANCELLING):
                    break
        assert ctx is not None
        ctx.cancelled.set()
        cancel_hook = getattr(driver, "cancel", None)
        if cancel_hook is not None:
            try:
                cancel_hook(ctx)
            except Exception:
                log.exception("driver cancel hook failed")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the current outgoing or incoming migration's worker to finish; False on timeout."""
        worker = self._worker
        if worker is None:
            return True
        worker.join(timeout)
        return not worker.is_alive()

    # ------------------------------------------------------------------ incoming

    def migrate_incoming(
        self,
        uri: str | None = None,
        channels: Sequence[Mapping[str, object]] | None = None,
    ) -> None:
        """QMP ``migrate-incoming``: start loading from ``uri`` / the main channel in a worker."""
        from cprfast import channels as ch

        with self._lock:
            if not self._incoming:
                raise MigrationError("'-incoming' was not specified on the command line")
            if self._incoming_started:
                raise MigrationError("The incoming migration has already been started")
            if (uri is None) == (channels is None):
                raise MigrationError("need either 'uri' or 'channels' argument")
            address = (
                ch.parse_uri(uri)
                if uri is not None
                else ch.parse_channels([dict(c) for c in channels or ()]).get(ch.ChannelType.MAIN)
            )
            if address is None:
                raise MigrationError("Channel list has no main entry")
            mode = self._incoming_mode or self.parameters.mode
            driver = self._incoming_drivers.get(mode)
            if driver is None:
                raise MigrationError(f"no incoming migration driver is registered for mode {mode}")
            self._incoming_started = True
            self._incoming_error = None
            self.incoming_status.transition(S.NONE, S.SETUP)
            ictx = IncomingContext(self, mode, address)
            self._incoming_ram = ictx.ram
        self._worker = threading.Thread(
            target=self._run_incoming, args=(ictx, driver), name=f"cprfast-incoming-{mode}", daemon=True
        )
        self._worker.start()

    def _run_incoming(self, ictx: IncomingContext, driver: IncomingDriver) -> None:
        try:
            source_state = driver.run(ictx)
            with contextlib.suppress(Exception):
                ictx.cleanup.close()
        except BaseException as e:
            log.error("incoming migration failed: %s", e)
            with contextlib.suppress(Exception):
                ictx.cleanup.close()
            with self._lock:
                self._incoming_error = str(e) or type(e).__name__
            self.incoming_status.transition(self.incoming_status.status, S.FAILED)
            return
        with self._lock:
            self.incoming_status.transition(S.SETUP, S.ACTIVE)
            self._incoming = False
            # QEMU's process_incoming_migration_bh: resume if the source was live.
            if source_state is None or source_state.is_live:
                if self._autostart:
                    self._vm_resume(source_state or RunState.RUNNING)
                else:
                    self._set_run_state(RunState.PAUSED)
            else:
                self._set_run_state(source_state)
            self.incoming_status.transition(S.ACTIVE, S.COMPLETED)

    # ------------------------------------------------------------------ query

    def query_migrate(self) -> dict[str, object]:
        """QMP ``query-migrate``, in QEMU's shape for the current status."""
        with self._lock:
            status = self.status.status
            if status is S.NONE:
                return self._query_incoming()
            info: dict[str, object] = {"status": str(status)}
            timing, ctx = self._timing, self._ctx
            assert timing is not None and ctx is not None
            if status in (S.ACTIVE, S.DEVICE, S.CANCELLING, S.PRE_SWITCHOVER, S.COMPLETED):
                if timing.setup_time is not None:
                    info["setup-time"] = timing.setup_time
                if status is S.COMPLETED:
                    info["total-time"] = timing.total_time
                    info["downtime"] = timing.downtime
                else:
                    info["total-time"] = timing.elapsed()
                    info["expected-downtime"] = timing.expected_downtime
                info["ram"] = ctx.ram.as_qmp(with_remaining=status is not S.COMPLETED)
            if self._error is not None:
                info["error-desc"] = self._error
            return info

    def _query_incoming(self) -> dict[str, object]:
        status = self.incoming_status.status
        if status is S.NONE:
            return {}
        info: dict[str, object] = {"status": str(status)}
        if status is S.COMPLETED and self._incoming_ram is not None:
            info["ram"] = self._incoming_ram.as_qmp(with_remaining=False)
        if self._incoming_error is not None:
            info["error-desc"] = self._incoming_error
        return info

