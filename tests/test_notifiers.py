"""Per-mode notifier lists and the SETUP/DONE/FAILED sequences."""

from __future__ import annotations

import pytest

from _doubles import EventLog
from cprfast.errors import NotifierVetoError
from cprfast.notifiers import MigrationEvent, Notifiers
from cprfast.status import MigMode

E = MigrationEvent


def test_newest_first_and_per_mode() -> None:
    order: list[str] = []
    n = Notifiers()

    def make(name: str):  # type: ignore[no-untyped-def]
        def f(event: MigrationEvent, mode: MigMode) -> None:
            order.append(f"{name}:{event.name}:{mode}")

        return f

    a, b, c = make("a"), make("b"), make("c")
    n.add(a, modes={MigMode.CPR_TRANSFER, MigMode.CPR_EXEC})
    n.add(b, modes={MigMode.CPR_TRANSFER})
    n.add(c)  # default: normal only, like migration_add_notifier
    d = n.dispatch(MigMode.CPR_TRANSFER)
    d.setup()
    d.finish(ok=True)
    assert order == [
        "b:PRECOPY_SETUP:cpr-transfer", "a:PRECOPY_SETUP:cpr-transfer",
        "b:PRECOPY_DONE:cpr-transfer", "a:PRECOPY_DONE:cpr-transfer",
    ]  # fmt: skip
    assert n.for_mode(MigMode.CPR_EXEC) == [a]
    assert n.for_mode(MigMode.NORMAL) == [c]
    assert n.for_mode(MigMode.CPR_REBOOT) == []
    n.remove(a)
    assert n.for_mode(MigMode.CPR_EXEC) == [] and n.for_mode(MigMode.CPR_TRANSFER) == [b]
    n.remove(a)  # no-op


def test_add_errors() -> None:
    n = Notifiers()
    log = EventLog()
    with pytest.raises(ValueError, match="at least one migration mode"):
        n.add(log, modes=())
    n.add(log)
    with pytest.raises(ValueError, match="already registered for normal"):
        n.add(log, modes={MigMode.NORMAL, MigMode.CPR_EXEC})
    assert n.for_mode(MigMode.CPR_EXEC) == []  # all-or-nothing


@pytest.mark.parametrize("how", ["return-str", "return-exc", "raise"])
def test_setup_veto_stops_the_rest_and_everyone_gets_failed_once(how: str) -> None:
    n = Notifiers()
    oldest, newest = EventLog(), EventLog()

    def vetoer(event: MigrationEvent, mode: MigMode) -> object:
        vetoer_log.append(event)
        if event is E.PRECOPY_SETUP:
            if how == "raise":
                raise PermissionError("device busy")
            return "device busy" if how == "return-str" else PermissionError("device busy")
        return None

    vetoer_log: list[MigrationEvent] = []
    n.add(oldest)
    n.add(vetoer)  # type: ignore[arg-type]
    n.add(newest)
    d = n.dispatch(MigMode.NORMAL)
    with pytest.raises(NotifierVetoError, match="^device busy$"):
        d.setup()
    d.finish(ok=False)
    d.finish(ok=False)  # once only
    assert newest.events == [E.PRECOPY_SETUP, E.PRECOPY_FAILED]
    assert vetoer_log == [E.PRECOPY_SETUP, E.PRECOPY_FAILED]
    assert oldest.events == [E.PRECOPY_FAILED]  # FAILED alone: a documented QEMU sequence


def test_failed_alone_and_done_requires_setup() -> None:
    n = Notifiers()
    log = EventLog()
    n.add(log)
    d = n.dispatch(MigMode.NORMAL)
    with pytest.raises(RuntimeError, match="PRECOPY_DONE without PRECOPY_SETUP"):
        d.finish(ok=True)
    d.finish(ok=False)
    assert log.events == [E.PRECOPY_FAILED]
    with pytest.raises(RuntimeError, match="already sent"):
        d.setup()


def test_raising_on_done_is_logged_and_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifiers()
    older, broken = EventLog(), EventLog(raise_on=E.PRECOPY_DONE)
    n.add(older)
    n.add(broken)
    d = n.dispatch(MigMode.NORMAL)
    d.setup()
    d.finish(ok=True)
    assert older.events == [E.PRECOPY_SETUP, E.PRECOPY_DONE]
    assert "notifier broke on PRECOPY_DONE" in caplog.text
    assert any(r.exc_info for r in caplog.records)  # logged with the traceback


def test_fail_after_done_only_after_done() -> None:
    n = Notifiers()
    log = EventLog()
    n.add(log, modes={MigMode.CPR_EXEC})
    d = n.dispatch(MigMode.CPR_EXEC)
    d.setup()
    with pytest.raises(RuntimeError, match="needs PRECOPY_DONE"):
        d.fail_after_done()
    d.finish(ok=True)
    d.fail_after_done()
    assert log.events == [E.PRECOPY_SETUP, E.PRECOPY_DONE, E.PRECOPY_FAILED]
    with pytest.raises(RuntimeError, match="needs PRECOPY_DONE"):
        d.fail_after_done()


def test_dispatch_is_a_snapshot() -> None:
    n = Notifiers()
    early, late = EventLog(), EventLog()
    n.add(early)
    d = n.dispatch(MigMode.NORMAL)
    d.setup()
    n.add(late)
    n.remove(early)
    d.finish(ok=True)
    assert early.events == [E.PRECOPY_SETUP, E.PRECOPY_DONE]
    assert late.events == []


def test_veto_with_empty_message_names_the_exception() -> None:
    n = Notifiers()

    def v(event: MigrationEvent, mode: MigMode) -> None:
        raise KeyError()

    n.add(v)
    with pytest.raises(NotifierVetoError, match="^KeyError$"):
        n.dispatch(MigMode.NORMAL).setup()
