"""A cpr-exec's pause runs at real-time priority: the exec'ing thread, then its successor until the guest resumes.

On a loaded host the exec'd interpreter competes for the CPU with everything
else while the guest is paused, and every millisecond it waits is pause. The
reference VMM's cpr-exec notifier gives the thread that will exec
``SCHED_FIFO`` priority 1 with ``SCHED_RESET_ON_FORK`` (no thread it starts,
the vCPU's above all, inherits it) on PRECOPY_DONE; the policy survives
``execve``, and the successor drops it (:func:`unboost`) once its guest runs,
or the notifier does on PRECOPY_FAILED. Without ``CAP_SYS_NICE``, or for a
VMM already run under another policy, nothing changes.
"""

from __future__ import annotations

import os

BOOSTED = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
"""The policy :func:`boost` sets, as ``sched_getscheduler`` reports it."""
PRIORITY = 1


def boost() -> bool:
    """Give the calling thread ``SCHED_FIFO`` priority 1 (reset on fork); False where that is refused."""
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        return False
    try:
        os.sched_setscheduler(0, BOOSTED, os.sched_param(PRIORITY))
    except OSError:  # EPERM without CAP_SYS_NICE: the pause just runs at normal priority
        return False
    return True


def unboost() -> None:
    """Back to ``SCHED_OTHER`` if the calling thread runs with :func:`boost`'s policy."""
    if os.sched_getscheduler(0) == BOOSTED and os.sched_getparam(0).sched_priority == PRIORITY:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
