"""Property-based tests of the migration state machine: random command sequences never break it."""

from __future__ import annotations

import threading

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from _doubles import EventLog, RecordingHooks
from cprfast.errors import MigrationError
from cprfast.migration import MigrationContext, MigrationState
from cprfast.notifiers import MigrationEvent
from cprfast.status import TRANSITIONS, MigMode, MigrationStatus, RunState
from test_migration import ALL, URI

E = MigrationEvent
S = MigrationStatus
VALID_SEQUENCES = (
    [E.PRECOPY_SETUP, E.PRECOPY_DONE],
    [E.PRECOPY_SETUP, E.PRECOPY_FAILED],
    [E.PRECOPY_FAILED],
    [E.PRECOPY_SETUP, E.PRECOPY_DONE, E.PRECOPY_FAILED],  # cpr-exec's failed exec only
)


class GatedDriver:
    """Reaches a phase, waits at a gate (where cancel may land), then succeeds or fails."""

    def __init__(self, outcome: str, phase: S) -> None:
        self.outcome = outcome
        self.phase = phase
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def run(self, ctx: MigrationContext) -> None:
        if self.phase in (S.ACTIVE, S.DEVICE):
            ctx.activate()
        if self.phase is S.DEVICE:
            ctx.switchover()
        self.waiting.set()
        while not self.gate.wait(0.005):
            if ctx.cancelled.is_set():
                ctx.check_cancelled()
        if self.outcome == "fail":
            raise OSError("injected failure")

    def cancel(self, ctx: MigrationContext) -> None:
        self.gate.set()

    def complete(self, ctx: MigrationContext) -> None:
        if self.outcome == "exec-fail":
            raise OSError("execvp failed")


class MigrationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fresh(RunState.RUNNING)

    def fresh(self, state: RunState) -> None:
        self.hooks = RecordingHooks()
        self.hooks.vcpus_running = state.is_live
        self.ms = MigrationState(self.hooks, run_state=state)
        self.ms.parameters.set({"cpr-exec-command": ["/nonexistent"]})
        self.log = EventLog()
        self.ms.notifiers.add(self.log, modes=ALL)
        self.pairs: list[tuple[S, S]] = []
        self.last = S.NONE
        self.ms.status.subscribe(self._record)
        self.driver: GatedDriver | None = None
        self.before: RunState | None = None
        self.log_mark = 0

    def _record(self, new: S) -> None:
        self.pairs.append((self.last, new))
        self.last = new

    def busy(self) -> bool:
        return self.driver is not None

    @precondition(lambda self: not self.busy())
    @rule(
        mode=st.sampled_from(list(MigMode)),
        outcome=st.sampled_from(["ok", "fail", "veto", "exec-fail"]),
        phase=st.sampled_from([S.SETUP, S.ACTIVE, S.DEVICE]),
    )
    def migrate(self, mode: MigMode, outcome: str, phase: S) -> None:
        self.ms.parameters.set({"mode": str(mode)})
        driver = GatedDriver(outcome, phase)
        self.ms.register_mode_driver(mode, driver)
        veto = (lambda ev, m: "veto!" if ev is E.PRECOPY_SETUP else None) if outcome == "veto" else None
        if veto is not None:
            self.ms.notifiers.add(veto, modes=ALL)
        before, mark = self.ms.run_state, len(self.log.events)
        try:
            self.ms.migrate(**URI[mode])
        except MigrationError as e:
            assert self.ms.run_state is before
            if str(e) == "Can't migrate the vm that was paused due to previous migration":
                # refused before setup: nothing happened
                assert self.log.events[mark:] == []
                return
            assert veto is not None and str(e) == "veto!"
            # the vetoer is newest: the older notifier never got SETUP, so it gets FAILED alone
            assert self.log.events[mark:] == [E.PRECOPY_FAILED]
            assert self.ms.query_migrate() == {"status": "failed", "error-desc": "veto!"}
            return
        finally:
            if veto is not None:
                self.ms.notifiers.remove(veto)
        self.driver, self.before, self.log_mark = driver, before, mark
        assert driver.waiting.wait(10)
        assert self.ms.status.status is phase  # cancel lands in each of setup, active, device

    @precondition(lambda self: self.busy())
    @rule()
    def release(self) -> None:
        assert self.driver is not None
        self.driver.gate.set()
        self.finish()

    @precondition(lambda self: self.busy())
    @rule()
    def cancel(self) -> None:
        self.ms.cancel()
        self.finish()

    @rule()
    def cancel_when_idle_is_harmless(self) -> None:
        if not self.busy():
            status = self.ms.status.status
            self.ms.cancel()
            assert self.ms.status.status is status

    @precondition(lambda self: not self.busy())
    @rule()
    def stop(self) -> None:
        self.ms.stop()

    @precondition(lambda self: not self.busy())
    @rule()
    def cont(self) -> None:
        try:
            self.ms.cont()
        except MigrationError as e:
            assert self.ms.run_state is RunState.POSTMIGRATE
            assert "handed over by a CPR migration" in str(e)

    @precondition(lambda self: not self.busy() and self.ms.run_state is RunState.POSTMIGRATE)
    @rule(state=st.sampled_from([RunState.RUNNING, RunState.PAUSED, RunState.SUSPENDED]))
    def new_vm(self, state: RunState) -> None:
        self.fresh(state)

    def finish(self) -> None:
        assert self.ms.wait(10)
        final = self.ms.status.status
        assert final.is_terminal
        seq = self.log.events[self.log_mark :]
        assert seq in VALID_SEQUENCES, seq
        if final is S.COMPLETED:
            assert self.ms.run_state is RunState.POSTMIGRATE
            assert seq == [E.PRECOPY_SETUP, E.PRECOPY_DONE]
        else:
            # failure or cancel: the guest is back in the state it had
            assert self.ms.run_state is self.before
            assert seq[-1] is E.PRECOPY_FAILED
            q = self.ms.query_migrate()
            assert q["status"] == str(final)
            assert ("error-desc" in q) == (final is S.FAILED)
        self.driver = None

    @invariant()
    def transitions_are_legal(self) -> None:
        for old, new in self.pairs:
            assert new in TRANSITIONS[old], (old, new)

    @invariant()
    def vcpus_match_run_state(self) -> None:
        if not self.busy():
            assert self.hooks.vcpus_running == self.ms.run_state.is_live
            assert self.ms.run_state is not RunState.FINISH_MIGRATE
            assert not self.ms.status.status.is_running


MigrationMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestMigrationMachine = MigrationMachine.TestCase

