"""Real-time priority for the switchover, so that a busy host cannot make the paused guest wait.

A live-updated guest is paused from the moment its VMM stops it until the new
process resumes it. The work in between is short, but on a shared host the
threads doing it queue behind every other runnable thread before they run (on
a loaded 2-CPU machine: milliseconds per wake-up). At ``SCHED_FIFO`` they run
as soon as they are runnable. Only the calling thread is raised, only inside
the block, and threads it starts meanwhile do not inherit the priority.
Needs ``CAP_SYS_NICE`` (or an ``RLIMIT_RTPRIO`` allowing ``priority``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def check_priority(priority: int) -> None:
    """Fail now, not at the switchover, if this thread may not run at ``priority``.

    Raises ValueError outside 1..99 and PermissionError (EPERM) without the capability.
    """
    if not 1 <= priority <= 99:
        raise ValueError(f"switchover priority {priority} is outside 1..99 (SCHED_FIFO)")
    with realtime(priority):
        pass


@contextlib.contextmanager
def realtime(priority: int | None) -> Iterator[None]:
    """Run the calling thread at ``SCHED_FIFO`` ``priority`` inside the block (None: as it is)."""
    if priority is None:
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"SCHED_FIFO priority {priority} for the switchover: {e.strerror} (needs CAP_SYS_NICE)"
        ) from None
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)
