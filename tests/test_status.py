"""Migration status values, transitions, compare-and-swap and run states."""

from __future__ import annotations

import threading

import pytest

from cprfast.errors import MigrationError
from cprfast.status import TRANSITIONS, IllegalTransitionError, MigMode, MigrationStatus, RunState, StatusCell

S = MigrationStatus


def test_values_are_qemus() -> None:
    assert [s.value for s in MigrationStatus] == [
        "none", "setup", "cancelling", "cancelled", "active", "postcopy-device", "postcopy-active",
        "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "completed", "failed",
        "colo", "pre-switchover", "device", "wait-unplug",
    ]  # fmt: skip
    assert {r.value for r in RunState} == {
        "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
        "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
        "guest-panicked", "colo",
    }  # fmt: skip
    assert [m.value for m in MigMode] == ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]


def test_every_status_has_a_row_and_every_status_is_reachable_from_none() -> None:
    assert set(TRANSITIONS) == set(MigrationStatus)
    seen, todo = {S.NONE}, [S.NONE]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(MigrationStatus)


def test_every_running_status_can_end_and_be_cancelled_or_failed() -> None:
    for s in MigrationStatus:
        if s.is_running:
            assert TRANSITIONS[s] & {S.CANCELLING, S.FAILED, S.CANCELLED}, s


def test_is_live_matches_runstate_is_live() -> None:
    assert {r for r in RunState if r.is_live} == {RunState.RUNNING, RunState.SUSPENDED}
    assert {r for r in RunState if r.needs_reset} == {
        RunState.INTERNAL_ERROR, RunState.SHUTDOWN, RunState.GUEST_PANICKED,
    }  # fmt: skip


def test_cas_applies_emits_and_refuses_stale() -> None:
    cell = StatusCell()
    seen: list[MigrationStatus] = []
    unsubscribe = cell.subscribe(seen.append)
    assert cell.transition(S.NONE, S.SETUP)
    assert cell.status is S.SETUP
    # stale: expects none, the status is setup -> refused, nothing emitted
    assert not cell.transition(S.NONE, S.SETUP)
    assert cell.transition(S.SETUP, S.ACTIVE)
    assert seen == [S.SETUP, S.ACTIVE]
    unsubscribe()
    assert cell.transition(S.ACTIVE, S.COMPLETED)
    assert seen == [S.SETUP, S.ACTIVE]


def test_illegal_transition_raises_and_changes_nothing() -> None:
    cell = StatusCell()
    with pytest.raises(IllegalTransitionError, match="illegal migration status transition none -> completed"):
        cell.transition(S.NONE, S.COMPLETED)
    assert cell.status is S.NONE
    assert isinstance(IllegalTransitionError("x"), MigrationError)


def test_failing_listener_is_logged_and_does_not_stop_others(caplog: pytest.LogCaptureFixture) -> None:
    cell = StatusCell()
    seen: list[MigrationStatus] = []

    def broken(_: MigrationStatus) -> None:
        raise RuntimeError("listener bug")

    cell.subscribe(broken)
    cell.subscribe(seen.append)
    assert cell.transition(S.NONE, S.SETUP)
    assert seen == [S.SETUP]
    assert "listener bug" in caplog.text


def test_concurrent_cas_exactly_one_wins() -> None:
    for _ in range(50):
        cell = StatusCell(S.ACTIVE)
        barrier = threading.Barrier(8)
        wins: list[MigrationStatus] = []
        targets = [S.CANCELLING, S.FAILED, S.DEVICE, S.COMPLETED] * 2

        def race(target: MigrationStatus) -> None:
            barrier.wait()
            if cell.transition(S.ACTIVE, target):
                wins.append(target)

        threads = [threading.Thread(target=race, args=(t,)) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert cell.status is wins[0]


def test_wait_for() -> None:
    cell = StatusCell()
    assert not cell.wait_for(lambda s: s is S.SETUP, timeout=0.01)
    threading.Timer(0.01, cell.transition, args=(S.NONE, S.SETUP)).start()
    assert cell.wait_for(lambda s: s is S.SETUP, timeout=10)
