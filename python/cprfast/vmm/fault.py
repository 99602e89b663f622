"""Fault injection for the reference VMM: die, stop or wait at a named phase of a migration.

``CPRFAST_VMM_FAULT=PHASE[:kill|stop|hold]`` (default ``kill``) makes the VMM act
when it reaches ``PHASE``, so a test hits a phase deterministically instead of
racing a timer:

- ``kill``: SIGKILL itself (a crash: nothing is cleaned up);
- ``stop``: SIGSTOP itself (the test continues or kills it);
- ``hold``: the thread at ``PHASE`` waits until the process gets SIGUSR1, while
  the rest of the VMM (QMP above all) keeps serving: a test cancels a migration
  in exactly the status it is held in, then releases it.

The variable is read when this module is imported; QMP ``x-fault`` (``{"spec":
"PHASE:ACTION"}``, ``""`` to clear) changes it, here and for a cpr-exec successor,
in a running VMM. Every action first writes ``cprfast-vmm: fault PHASE:ACTION``
to stderr (the test waits for that line). The phases are in :data:`PHASES`.
Without a fault :func:`point` reads one global (several points lie inside the
guest's pause); the module imports nothing else, since a cpr-exec successor
reaches phases before its guest resumes.
"""

from __future__ import annotations

import os

FAULT_ENV = "CPRFAST_VMM_FAULT"
PHASES = (
    "setup",  # any source: PRECOPY_SETUP notifiers (status setup, in the migrate command)
    "cpr-accept",  # cpr-transfer target: before it accepts the cpr channel
    "ram-received",  # cpr-transfer target: guest-RAM fds received and adopted
    "fds-received",  # cpr-transfer target: device fds received
    "device-load",  # any target: in the middle of loading device state (the doorbell's)
    "loaded",  # any target: device state loaded, before it takes the guest over and resumes it
    "device-save",  # any source: writing device state (the doorbell's)
    "vm-stop",  # any source: the guest is being stopped for the switchover
)
ACTIONS = ("kill", "stop", "hold")
_released = [False]


def _parse(spec: str | None) -> tuple[str, str] | None:
    if not spec:
        return None
    phase, _, action = spec.partition(":")
    return phase, action or "kill"


_active = _parse(os.environ.get(FAULT_ENV))
"""The fault of this process, as (phase, action); None for none."""


def arm() -> None:
    """At start-up, in the main thread: check the variable and install the SIGUSR1 release for ``hold``."""
    spec = _active
    if spec is None:
        return
    phase, action = spec
    if phase not in PHASES or action not in ACTIONS:
        raise ValueError(f"{FAULT_ENV}={phase}:{action}: phase must be one of {PHASES}, action one of {ACTIONS}")
    if action == "hold":
        import signal

        signal.signal(signal.SIGUSR1, lambda signum, frame: _released.__setitem__(0, True))


def inject(spec: str) -> None:
    """QMP ``x-fault``: set (or with ``""`` clear) the fault of this process from now on."""
    global _active
    if not spec:
        os.environ.pop(FAULT_ENV, None)
        _active = None
        return
    old, _active = _active, _parse(spec)
    try:
        arm()
    except ValueError:
        _active = old
        raise
    os.environ[FAULT_ENV] = spec  # (a cpr-exec successor inherits it)


def point(phase: str) -> None:
    """The VMM reached ``phase``: act if the variable names it."""
    spec = _active
    if spec is None or spec[0] != phase:
        return
    action = spec[1]
    os.write(2, f"cprfast-vmm: fault {phase}:{action}\n".encode())
    import signal
    import time

    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:

        while not _released[0]:
            time.sleep(0.005)
        _released[0] = False
