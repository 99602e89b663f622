"""Test doubles for the orchestration tests: VM hooks that record, and mode drivers.

These stand in for the VMM and for issue 5's mode drivers, not for the kernel:
what is under test is the orchestration around them.
"""

from __future__ import annotations

import threading

from cprfast.migration import IncomingContext, MigrationContext
from cprfast.notifiers import MigrationEvent
from cprfast.status import MigMode, RunState


class RecordingHooks:
    """VmHooks that record every call (the VMM's vCPU stop/start)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, RunState]] = []
        self.vcpus_running = True

    def vm_stop(self, state: RunState) -> None:
        assert self.vcpus_running, "vm_stop called on a stopped VM"
        self.vcpus_running = False
        self.calls.append(("stop", state))

    def vm_start(self, state: RunState) -> None:
        assert not self.vcpus_running, "vm_start called on a running VM"
        self.vcpus_running = True
        self.calls.append(("start", state))


class OkDriver:
    """Succeeds; records the run state it saw and closes what it 'opened' via the cleanup stack."""

    def __init__(self) -> None:
        self.seen_run_state: RunState | None = None
        self.closed = threading.Event()

    def run(self, ctx: MigrationContext) -> None:
        self.seen_run_state = ctx._owner.run_state
        ctx.cleanup.callback(self.closed.set)
        ctx.ram.transferred = 4096
        ctx.ram.total = 8192
        ctx.activate()
        ctx.switchover()


class FailingDriver:
    """Raises a given error after registering a cleanup."""

    def __init__(self, message: str = "target went away") -> None:
        self.message = message
        self.closed = threading.Event()

    def run(self, ctx: MigrationContext) -> None:
        ctx.cleanup.callback(self.closed.set)
        raise OSError(self.message)


class BlockingDriver:
    """Blocks (as if waiting for the target's HUP) until cancelled; its cancel hook records the call."""

    def __init__(self, activate: bool = False) -> None:
        self.started = threading.Event()
        self.cancel_called = threading.Event()
        self.closed = threading.Event()
        self.activate = activate

    def run(self, ctx: MigrationContext) -> None:
        ctx.cleanup.callback(self.closed.set)
        if self.activate:
            ctx.activate()
        self.started.set()
        assert ctx.cancelled.wait(30), "never cancelled"
        ctx.check_cancelled()

    def cancel(self, ctx: MigrationContext) -> None:
        self.cancel_called.set()


class ExecFailDriver(OkDriver):
    """Succeeds, then its post-DONE completion step fails (cpr-exec's failed execvp)."""

    def complete(self, ctx: MigrationContext) -> None:
        raise FileNotFoundError(2, "execvp /nonexistent failed")


class IncomingOk:
    """An incoming driver that 'loads' and reports the source's run state."""

    def __init__(self, source_state: RunState | None = RunState.RUNNING, fail: str | None = None) -> None:
        self.source_state = source_state
        self.fail = fail

    def run(self, ctx: IncomingContext) -> RunState | None:
        ctx.activate()
        if self.fail:
            raise ValueError(self.fail)
        ctx.ram.transferred = 123
        return self.source_state


class EventLog:
    """A notifier that records (event, mode) pairs, optionally vetoing SETUP."""

    def __init__(self, veto: str | None = None, raise_on: MigrationEvent | None = None) -> None:
        self.events: list[MigrationEvent] = []
        self.veto = veto
        self.raise_on = raise_on

    def __call__(self, event: MigrationEvent, mode: MigMode) -> str | None:
        self.events.append(event)
        if event is self.raise_on:
            raise RuntimeError(f"notifier broke on {event.name}")
        if event is MigrationEvent.PRECOPY_SETUP and self.veto:
            return self.veto
        return None
