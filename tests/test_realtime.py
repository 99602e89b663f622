"""cprfast.realtime: SCHED_FIFO for the calling thread inside a block, and a clear refusal without the capability."""

from __future__ import annotations

import errno
import gc
import os
import threading

import pytest

from cprfast.realtime import check_priority, end_inherited, realtime, switchover

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_SYS_NICE) to grant and drop SCHED_FIFO")


def test_raises_only_the_calling_thread_inside_the_block() -> None:
    before = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    seen: dict[str, int] = {}

    def child() -> None:
        seen["policy"] = os.sched_getscheduler(0)

    with realtime(3):
        assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
        assert os.sched_getparam(0).sched_priority == 3
        t = threading.Thread(target=child)
        t.start()
        t.join()
    assert seen["policy"] == os.SCHED_OTHER  # a thread started inside does not inherit it
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before


def test_restored_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), realtime(1):
        raise RuntimeError("boom")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_none_changes_nothing_and_bad_priorities_are_refused() -> None:
    with realtime(None):
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    for bad in (0, 100):
        with pytest.raises(ValueError, match="outside 1..99"):
            check_priority(bad)


def test_without_the_capability_a_clear_permission_error() -> None:
    """As an unprivileged uid (no RLIMIT_RTPRIO): EPERM naming the capability, policy untouched."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        try:
            os.setresuid(65534, 65534, 65534)
            try:
                check_priority(1)
                msg = "granted"
            except PermissionError as e:
                msg = f"{e.errno} {e} policy={os.sched_getscheduler(0)}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    assert msg.startswith(f"{errno.EPERM} "), msg
    assert "CAP_SYS_NICE" in msg and f"policy={os.SCHED_OTHER}" in msg


def test_end_inherited_ends_only_what_realtime_set() -> None:
    """A cpr-exec successor's call: ends SCHED_FIFO|RESET_ON_FORK (ours), keeps a plain SCHED_FIFO (someone else's)."""
    results: list[tuple[bool, int]] = []

    def worker(flags: int) -> None:
        os.sched_setscheduler(0, os.SCHED_FIFO | flags, os.sched_param(1))
        results.append((end_inherited(), os.sched_getscheduler(0)))

    for flags in (os.SCHED_RESET_ON_FORK, 0):
        t = threading.Thread(target=worker, args=(flags,))
        t.start()
        t.join()
    assert results == [(True, os.SCHED_OTHER), (False, os.SCHED_FIFO)]
    assert end_inherited() is False  # this thread runs normally


def test_switchover_holds_the_garbage_collector() -> None:
    """Inside: no collection (at no priority too); after: as before, even when the block raised."""
    assert gc.isenabled()
    with switchover(None):
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), switchover(None):
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with switchover(None):
            pass
        assert not gc.isenabled(), "a collector someone else held stays held"
    finally:
        gc.enable()
