"""Real-time priority for the switchover, so that a busy host cannot make the paused guest wait.

A live-updated guest is paused from the moment its VMM stops it until the new
process resumes it. The work in between is short, but on a shared host the
threads doing it queue behind every other runnable thread before they run (on
a loaded 2-CPU machine: milliseconds per wake-up). At ``SCHED_FIFO`` they run
as soon as they are runnable. Only the calling thread is raised, only inside
the block, and threads it starts meanwhile do not inherit the priority.
Needs ``CAP_SYS_NICE`` (or an ``RLIMIT_RTPRIO`` allowing ``priority``).

:func:`switchover` adds the other thing that could stall the pause from within:
Python's cyclic garbage collector, which runs at whatever allocation crosses
its threshold (seen here: 0.3 ms of CPU inside a 1 ms cpr-transfer pause). It
is held for the block, process-wide, and runs again after it.

A cpr-exec is the exception that crosses a process image: the thread that
exec's is at real-time priority, the new program inherits it through its
interpreter's start, and calls :func:`end_inherited` once the guest runs.
"""

from __future__ import annotations

import contextlib
import gc
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


def raise_for_good(priority: int | None) -> None:
    """Raise the calling thread to ``SCHED_FIFO`` ``priority`` for the rest of its life (None:
    leave it): for a thread that ends with the switchover or exec's, like cpr-exec's worker."""
    if priority is not None:
        realtime(priority).__enter__()


def end_inherited() -> bool:
    """Back to normal scheduling if this thread runs at a priority :func:`realtime` set
    (``SCHED_FIFO`` with ``SCHED_RESET_ON_FORK``, as a cpr-exec leaves its successor);
    a priority set by anyone else stays. Returns whether it ended one."""
    if os.sched_getscheduler(0) != os.SCHED_FIFO | os.SCHED_RESET_ON_FORK:
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


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


@contextlib.contextmanager
def switchover(priority: int | None) -> Iterator[None]:
    """The guest's pause path: :func:`realtime` ``priority``, and no garbage collection
    inside the block (the collector is enabled again after it, if it was)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with realtime(priority):
            yield
    finally:
        if enabled:
            gc.enable()
