"""cpr-exec: the old program's address space and KVM fds outlive ``execve``, torn down after the guest resumes.

``execve`` normally tears the old program down before the new one runs a line,
with the guest paused: the page tables of every page the VMM touched (about
0.3 µs a page here: 5-15 ms for a 64 MiB working set, 60-170 ms for 1 GiB of
touched RAM) and, as the close-on-exec KVM fds close, the old VM. A host that
defines ``exec_keep_fds()`` (the reference VMM: its KVM VM and vCPU fds) gets
a :class:`~cprfast._core.ExecKeeper` right before ``execve``: a process sharing
the old address space and holding those fds, named in ``CPRFAST_EXEC_KEEPER``,
so ``execve`` only drops references. The successor :func:`take`\\ s the name at
start and :func:`release`\\ s the keeper once its guest runs; the keeper's exit
then does the teardown, off the pause path. A keeper nobody releases exits
after :data:`LINGER_S`, or with the process.
"""

from __future__ import annotations

import os

from cprfast import _core

TYPE_CHECKING = False  # a cpr-exec successor imports this before its guest resumes: no typing at run time
if TYPE_CHECKING:
    import threading
    from collections.abc import Iterable, MutableMapping

KEEPER_ENV = "CPRFAST_EXEC_KEEPER"
"""Names the predecessor's keeper (its pid) across ``execve``."""
LINGER_S = 60.0
"""A keeper exits by itself after this long, if the successor never releases it."""


def keep(fds: Iterable[int], environ: MutableMapping[str, str] = os.environ) -> _core.ExecKeeper:
    """Right before ``execve``: start a keeper holding ``fds`` and name it for the successor."""
    keeper = _core.ExecKeeper(list(fds), LINGER_S)
    environ[KEEPER_ENV] = str(keeper.pid)
    return keeper


def cancel(keeper: _core.ExecKeeper, environ: MutableMapping[str, str] = os.environ) -> None:
    """The ``execve`` failed: end the keeper, forget its name."""
    environ.pop(KEEPER_ENV, None)
    keeper.cancel()


def take(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """In the successor, first thing: the predecessor's keeper pid, removed from the environment."""
    value = environ.pop(KEEPER_ENV, None)
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return int(value)


def release(pid: int) -> threading.Thread:
    """Once the guest runs: end and reap the keeper in a background thread (its exit is the teardown)."""
    import threading

    thread = threading.Thread(target=_release, args=(pid,), name="cprfast-exec-keeper", daemon=True)
    thread.start()
    return thread


def _release(pid: int) -> None:
    try:
        _core.release_exec_keeper(pid)
    except (OSError, ValueError) as e:  # not our child (a stale or foreign variable): nothing of ours to tear down
        import logging

        logging.getLogger(__name__).warning("cannot release the cpr-exec keeper %d: %s", pid, e)
