"""The migration orchestration, driven with fake mode drivers and recording VM hooks."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from _doubles import BlockingDriver, EventLog, ExecFailDriver, FailingDriver, IncomingOk, OkDriver, RecordingHooks
from cprfast.errors import MigrationError, NotifierVetoError
from cprfast.migration import MigrationState
from cprfast.notifiers import MigrationEvent
from cprfast.status import MigMode, MigrationStatus, RunState

E = MigrationEvent
S = MigrationStatus
ALL = tuple(MigMode)
URI = {
    MigMode.NORMAL: {"uri": "unix:/tmp/cprfast-test-main.sock"},
    MigMode.CPR_REBOOT: {"uri": "file:/tmp/cprfast-test.state"},
    MigMode.CPR_EXEC: {"uri": "file:/tmp/cprfast-test.state"},
    MigMode.CPR_TRANSFER: {
        "channels": [
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/cprfast-m.sock"}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/cprfast-c.sock"}},
        ]
    },
}


def make(mode: MigMode, driver: Any, run_state: RunState = RunState.RUNNING) -> tuple[MigrationState, RecordingHooks, EventLog, list[S]]:
    hooks = RecordingHooks()
    hooks.vcpus_running = run_state.is_live
    ms = MigrationState(hooks, run_state=run_state)
    ms.parameters.set({"mode": str(mode), "cpr-exec-command": ["/nonexistent"]})
    ms.register_mode_driver(mode, driver)
    log = EventLog()
    ms.notifiers.add(log, modes=ALL)
    statuses: list[S] = []
    ms.status.subscribe(statuses.append)
    return ms, hooks, log, statuses


def test_normal_success() -> None:
    driver = OkDriver()
    ms, hooks, log, statuses = make(MigMode.NORMAL, driver)
    assert ms.query_migrate() == {}
    ms.migrate(**URI[MigMode.NORMAL])
    assert ms.wait(10)
    assert statuses == [S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED]
    assert driver.seen_run_state is RunState.RUNNING  # normal mode: the VM runs while the driver iterates
    assert hooks.calls == [("stop", RunState.FINISH_MIGRATE)]
    assert ms.run_state is RunState.POSTMIGRATE
    assert log.events == [E.PRECOPY_SETUP, E.PRECOPY_DONE]
    assert driver.closed.is_set()
    q = ms.query_migrate()
    assert q["status"] == "completed"
    assert {"total-time", "downtime", "setup-time"} <= q.keys() and "error-desc" not in q
    assert q["ram"]["transferred"] == 4096 and q["ram"]["total"] == 8192 and "remaining" not in q["ram"]
    assert ms.query_status() == {"running": False, "status": "postmigrate"}
    ms.cont()  # normal mode: QEMU lets the source resume after a migration
    assert ms.run_state is RunState.RUNNING
    ms.migrate(**URI[MigMode.NORMAL])  # and migrate again
    assert ms.wait(10)
    assert statuses[-1] is S.COMPLETED


@pytest.mark.parametrize("mode", [MigMode.CPR_TRANSFER, MigMode.CPR_EXEC, MigMode.CPR_REBOOT])
def test_cpr_stops_vm_before_setup_notifiers_and_driver(mode: MigMode) -> None:
    driver = OkDriver()
    ms, hooks, log, statuses = make(mode, driver)
    at_setup: list[RunState] = []
    ms.notifiers.add(lambda ev, m: at_setup.append(ms.run_state) if ev is E.PRECOPY_SETUP else None, modes=ALL)
    ms.migrate(**URI[mode])
    assert ms.wait(10)
    assert at_setup == [RunState.FINISH_MIGRATE]
    assert driver.seen_run_state is RunState.FINISH_MIGRATE
    assert hooks.calls == [("stop", RunState.FINISH_MIGRATE)]
    assert statuses == [S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED]
    assert ms.run_state is RunState.POSTMIGRATE
    with pytest.raises(MigrationError, match="^The guest was handed over by a CPR migration and runs in the new process; it cannot be resumed here$"):
        ms.cont()
    with pytest.raises(MigrationError, match="^Can't migrate the vm that was paused due to previous migration$"):
        ms.migrate(**URI[mode])


def test_failure_resumes_vm_before_failed_status_is_visible() -> None:
    driver = FailingDriver("target went away")
    ms, hooks, log, statuses = make(MigMode.CPR_TRANSFER, driver)
    seen_at_failed: list[RunState] = []
    ms.status.subscribe(lambda s: seen_at_failed.append(ms.run_state) if s is S.FAILED else None)
    ms.migrate(**URI[MigMode.CPR_TRANSFER])
    assert ms.wait(10)
    assert statuses == [S.SETUP, S.FAILED]
    assert seen_at_failed == [RunState.RUNNING]
    assert hooks.calls == [("stop", RunState.FINISH_MIGRATE), ("start", RunState.RUNNING)]
    assert log.events == [E.PRECOPY_SETUP, E.PRECOPY_FAILED]
    assert driver.closed.is_set()
    assert ms.query_migrate() == {"status": "failed", "error-desc": "target went away"}
    # a new migration may start after a failure, and the error is cleared
    ms.register_mode_driver(MigMode.CPR_TRANSFER, OkDriver())
    ms.migrate(**URI[MigMode.CPR_TRANSFER])
    assert ms.wait(10)
    assert "error-desc" not in ms.query_migrate()


def test_veto_fails_migrate_and_resumes() -> None:
    driver = OkDriver()
    ms, hooks, log, statuses = make(MigMode.CPR_EXEC, driver)
    ms.notifiers.add(lambda ev, m: "vhost device refuses" if ev is E.PRECOPY_SETUP else None, modes=ALL)
    with pytest.raises(NotifierVetoError, match="^vhost device refuses$"):
        ms.migrate(**URI[MigMode.CPR_EXEC])
    assert driver.seen_run_state is None
    assert statuses == [S.SETUP, S.FAILED]
    assert hooks.calls == [("stop", RunState.FINISH_MIGRATE), ("start", RunState.RUNNING)]
    assert log.events == [E.PRECOPY_FAILED]  # newer notifier vetoed: the older one never got SETUP
    assert ms.query_migrate() == {"status": "failed", "error-desc": "vhost device refuses"}
    assert ms.run_state is RunState.RUNNING


def test_cancel_while_waiting_for_hup_resumes_the_source() -> None:
    driver = BlockingDriver()
    ms, hooks, log, statuses = make(MigMode.CPR_TRANSFER, driver)
    ms.migrate(**URI[MigMode.CPR_TRANSFER])
    assert driver.started.wait(10)
    assert ms.query_migrate() == {"status": "setup"}
    with pytest.raises(MigrationError, match="^Migration is not finalized yet$"):
        ms.cont()
    with pytest.raises(MigrationError, match="^There's a migration process in progress$"):
        ms.migrate(**URI[MigMode.CPR_TRANSFER])
    with pytest.raises(MigrationError, match="^There's a migration process in progress$"):
        ms.set_capabilities([{"capability": "events", "state": True}])
    ms.stop()  # the VM is already stopped: nothing to do
    ms.cancel()
    assert ms.wait(10)
    assert driver.cancel_called.is_set() and driver.closed.is_set()
    assert statuses == [S.SETUP, S.CANCELLING, S.CANCELLED]
    assert hooks.calls == [("stop", RunState.FINISH_MIGRATE), ("start", RunState.RUNNING)]
    assert ms.run_state is RunState.RUNNING
    assert log.events == [E.PRECOPY_SETUP, E.PRECOPY_FAILED]
    assert ms.query_migrate() == {"status": "cancelled"}
    ms.cancel()  # no-op once ended
    assert statuses[-1] is S.CANCELLED


def test_cancel_active_normal_migration_never_stops_the_vm() -> None:
    driver = BlockingDriver(activate=True)
    ms, hooks, log, statuses = make(MigMode.NORMAL, driver)
    ms.migrate(**URI[MigMode.NORMAL])
    assert driver.started.wait(10)
    q = ms.query_migrate()
    assert q["status"] == "active" and q["expected-downtime"] == 300 and "remaining" in q["ram"]
    ms.cancel()
    assert ms.wait(10)
    assert statuses == [S.SETUP, S.ACTIVE, S.CANCELLING, S.CANCELLED]
    assert hooks.calls == []
    assert ms.run_state is RunState.RUNNING


@pytest.mark.parametrize("start", [RunState.SUSPENDED, RunState.PAUSED])
def test_failure_restores_a_suspended_or_paused_guest(start: RunState) -> None:
    ms, hooks, log, statuses = make(MigMode.CPR_REBOOT, FailingDriver("disk full"), run_state=start)
    ms.migrate(**URI[MigMode.CPR_REBOOT])
    assert ms.wait(10)
    assert ms.run_state is start
    if start is RunState.SUSPENDED:
        assert hooks.calls == [("stop", RunState.FINISH_MIGRATE), ("start", RunState.SUSPENDED)]
    else:
        assert hooks.calls == []


def test_exec_failure_after_done() -> None:
    ms, hooks, log, statuses = make(MigMode.CPR_EXEC, ExecFailDriver())
    ms.migrate(**URI[MigMode.CPR_EXEC])
    assert ms.wait(10)
    assert statuses == [S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED, S.FAILED]
    assert log.events == [E.PRECOPY_SETUP, E.PRECOPY_DONE, E.PRECOPY_FAILED]
    assert ms.run_state is RunState.RUNNING
    assert hooks.calls == [("stop", RunState.FINISH_MIGRATE), ("start", RunState.RUNNING)]
    assert ms.query_migrate()["error-desc"] == "[Errno 2] execvp /nonexistent failed"
    ms.cont()  # no longer handed over: the guest runs here


def test_migrate_argument_and_driver_errors() -> None:
    ms, hooks, log, statuses = make(MigMode.NORMAL, OkDriver())
    with pytest.raises(MigrationError, match="^need either 'uri' or 'channels' argument$"):
        ms.migrate()
    with pytest.raises(MigrationError, match="^need either 'uri' or 'channels' argument$"):
        ms.migrate(uri="unix:/x", channels=[])
    ms.parameters.set({"mode": "cpr-reboot"})
    with pytest.raises(MigrationError, match="^no migration driver is registered for mode cpr-reboot$"):
        ms.migrate(uri="file:/tmp/x")
    assert statuses == [] and hooks.calls == [] and log.events == []


def test_cont_and_stop() -> None:
    hooks = RecordingHooks()
    ms = MigrationState(hooks)
    ms.stop()
    assert ms.query_status() == {"running": False, "status": "paused"}
    ms.stop()
    ms.cont()
    ms.cont()
    assert hooks.calls == [("stop", RunState.PAUSED), ("start", RunState.RUNNING)]
    assert ms.query_status() == {"running": True, "status": "running"}
    for broken in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR, RunState.GUEST_PANICKED):
        with pytest.raises(MigrationError, match="^Resetting the Virtual Machine is required$"):
            MigrationState(RecordingHooks(), run_state=broken).cont()


def test_run_state_listeners() -> None:
    ms = MigrationState(RecordingHooks())
    seen: list[tuple[RunState, RunState]] = []
    unsubscribe = ms.subscribe_run_state(lambda a, b: seen.append((a, b)))
    ms.stop()
    unsubscribe()
    ms.cont()
    assert seen == [(RunState.RUNNING, RunState.PAUSED)]


# --------------------------------------------------------------------------- incoming


def incoming(driver: Any, mode: MigMode | None = None) -> tuple[MigrationState, RecordingHooks]:
    hooks = RecordingHooks()
    hooks.vcpus_running = False
    ms = MigrationState(hooks, incoming=True, incoming_mode=mode)
    ms.register_incoming_driver(mode or MigMode.NORMAL, driver)
    return ms, hooks


def test_incoming_success_resumes_if_source_ran() -> None:
    ms, hooks = incoming(IncomingOk(RunState.RUNNING), MigMode.CPR_TRANSFER)
    assert ms.run_state is RunState.INMIGRATE
    statuses: list[S] = []
    ms.incoming_status.subscribe(statuses.append)
    with pytest.raises(MigrationError, match="^Guest is waiting for an incoming migration$"):
        ms.migrate(uri="unix:/tmp/x")
    ms.cont()  # while inmigrate: only sets autostart
    assert hooks.calls == []
    ms.migrate_incoming(uri="unix:/tmp/cprfast-in.sock")
    assert ms.wait(10)
    assert statuses == [S.SETUP, S.ACTIVE, S.COMPLETED]
    assert hooks.calls == [("start", RunState.RUNNING)]
    assert ms.run_state is RunState.RUNNING
    q = ms.query_migrate()
    assert q["status"] == "completed" and q["ram"]["transferred"] == 123
    with pytest.raises(MigrationError, match="^'-incoming' was not specified on the command line$"):
        ms.migrate_incoming(uri="unix:/tmp/y")


@pytest.mark.parametrize(
    ("source", "stopped", "expect"),
    [
        (RunState.PAUSED, False, RunState.PAUSED),
        (RunState.RUNNING, True, RunState.PAUSED),
        (RunState.SUSPENDED, False, RunState.SUSPENDED),
        (None, False, RunState.RUNNING),
    ],
)
def test_incoming_end_state(source: RunState | None, stopped: bool, expect: RunState) -> None:
    ms, hooks = incoming(IncomingOk(source))
    if stopped:
        ms.stop()  # QEMU: stop during inmigrate clears autostart
    ms.migrate_incoming(channels=[{"channel-type": "main", "addr": {"transport": "file", "filename": "/tmp/x"}}])
    assert ms.wait(10)
    assert ms.run_state is expect
    assert hooks.vcpus_running == expect.is_live


def test_incoming_errors() -> None:
    with pytest.raises(MigrationError, match="^'-incoming' was not specified on the command line$"):
        MigrationState(RecordingHooks()).migrate_incoming(uri="unix:/x")
    ms, hooks = incoming(IncomingOk(fail="bad section checksum"))
    with pytest.raises(MigrationError, match="^need either 'uri' or 'channels' argument$"):
        ms.migrate_incoming()
    with pytest.raises(MigrationError, match="^Channel list has no main entry$"):
        ms.migrate_incoming(channels=[{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/x"}}])
    ms.parameters.set({"mode": "cpr-reboot"})
    with pytest.raises(MigrationError, match="^no incoming migration driver is registered for mode cpr-reboot$"):
        ms.migrate_incoming(uri="file:/x")
    ms.parameters.set({"mode": "normal"})
    ms.migrate_incoming(uri="unix:/x")
    assert ms.wait(10)
    assert ms.query_migrate() == {"status": "failed", "error-desc": "bad section checksum"}
    assert ms.run_state is RunState.INMIGRATE and hooks.calls == []
    with pytest.raises(MigrationError, match="^The incoming migration has already been started$"):
        ms.migrate_incoming(uri="unix:/x")


def test_cancel_races_with_completion() -> None:
    """Cancel issued at random moments: the outcome is always completed or cancelled, never stuck."""
    for _ in range(30):
        ms, hooks, log, statuses = make(MigMode.CPR_TRANSFER, OkDriver())
        ms.migrate(**URI[MigMode.CPR_TRANSFER])
        t = threading.Thread(target=ms.cancel)
        t.start()
        t.join()
        assert ms.wait(10)
        assert statuses[-1] in (S.COMPLETED, S.CANCELLED)
        if statuses[-1] is S.CANCELLED:
            assert ms.run_state is RunState.RUNNING and log.events[-1] is E.PRECOPY_FAILED
        else:
            assert ms.run_state is RunState.POSTMIGRATE and log.events[-1] is E.PRECOPY_DONE


class CommittingDriver:
    """Commits (the target has the guest) once ``go`` is set, then waits for ``done``."""

    def __init__(self) -> None:
        self.go, self.committed, self.done = threading.Event(), threading.Event(), threading.Event()

    def run(self, ctx: Any) -> None:
        assert self.go.wait(10)
        ctx.commit()
        self.committed.set()
        assert self.done.wait(10)


def test_cancel_after_commit_is_refused() -> None:
    """Once the target has the guest, a cancel must not resume it here as well."""
    driver = CommittingDriver()
    ms, hooks, log, statuses = make(MigMode.CPR_TRANSFER, driver)
    ms.migrate(**URI[MigMode.CPR_TRANSFER])
    driver.go.set()
    assert driver.committed.wait(10)
    with pytest.raises(MigrationError, match="switched over"):
        ms.cancel()
    driver.done.set()
    assert ms.wait(10)
    assert statuses[-1] is S.COMPLETED and ms.run_state is RunState.POSTMIGRATE
    assert hooks.calls == [("stop", RunState.FINISH_MIGRATE)]  # never resumed here


def test_cancel_that_crossed_the_commit_completes() -> None:
    """A cancel issued before the driver learnt the target took over: completed, not resumed."""
    driver = CommittingDriver()
    ms, hooks, log, statuses = make(MigMode.CPR_TRANSFER, driver)
    ms.migrate(**URI[MigMode.CPR_TRANSFER])
    ms.cancel()
    assert ms.status.status is S.CANCELLING
    driver.go.set()
    driver.done.set()
    assert ms.wait(10)
    assert statuses[-2:] == [S.CANCELLING, S.COMPLETED]
    assert ms.run_state is RunState.POSTMIGRATE and log.events[-1] is E.PRECOPY_DONE
    assert hooks.calls == [("stop", RunState.FINISH_MIGRATE)]
