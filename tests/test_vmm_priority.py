"""The reference VMM's cpr-exec priority boost: SCHED_FIFO on the calling thread only, never inherited."""

from __future__ import annotations

import os
import threading

import pytest

from cprfast.vmm import priority


def test_boost_is_per_thread_reset_on_fork_and_undone() -> None:
    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = os.sched_getscheduler(0)

    def body() -> None:
        if not priority.boost():
            seen["refused"] = 1
            return
        try:
            seen["boosted"] = os.sched_getscheduler(0)
            assert not priority.boost(), "a second boost must not stack"
            t = threading.Thread(target=child)
            t.start()
            t.join()
        finally:
            priority.unboost()
        seen["after"] = os.sched_getscheduler(0)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "refused" in seen:
        pytest.skip("SCHED_FIFO refused here (no CAP_SYS_NICE)")
    assert seen == {"boosted": priority.BOOSTED, "child": os.SCHED_OTHER, "after": os.SCHED_OTHER}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the test's own thread was never touched
    priority.unboost()  # not boosted: nothing happens
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
