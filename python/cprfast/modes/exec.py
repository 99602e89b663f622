"""cpr-exec: the VMM exec's its successor in place, keeping its PID and its fds.

With the guest stopped, the driver writes the device state to the main channel
(a file). On PRECOPY_DONE it writes the CPR state (fd *numbers*) to a memfd, clears
close-on-exec on every preserved fd, names the state memfd in
``QEMU_CPR_EXEC_STATE`` and exec's ``cpr-exec-command`` (an argv, no shell). The
successor reads the variable before it creates anything, adopts the fds, loads
the device state and resumes the guest.

A host with ``exec_keep_fds()`` gets a keeper (:mod:`cprfast.exec_keeper`)
started right before ``exec``, so ``exec`` does not tear down the old address
space and those fds with the guest paused; its successor releases it.

If ``exec`` fails (a missing binary), everything is undone here: close-on-exec
set again, the variable removed, the state memfd closed, the keeper ended; the orchestration then
marks the migration failed, sends PRECOPY_FAILED and resumes the guest.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from cprfast import exec_keeper
from cprfast.channels import ChannelType, FileAddress, open_file
from cprfast.cpr_state import persist_exec_state, unpersist_exec_state, write_exec_state
from cprfast.errors import MigrationError
from cprfast.modes import PreStopState, read_main_file, write_main
from cprfast.realtime import raise_for_good

if TYPE_CHECKING:
    from cprfast import _core
    from cprfast.modes import CprHost
    from cprfast.migration import IncomingContext, MigrationContext
    from cprfast.status import RunState

log = logging.getLogger(__name__)


class ExecDriver:
    """The outgoing side of cpr-exec (a :class:`~cprfast.migration.ModeDriver`)."""

    def __init__(self, host: CprHost, pre_stop: PreStopState) -> None:
        self.host = host
        self.pre_stop = pre_stop

    def run(self, ctx: MigrationContext) -> None:
        """Write the device state to the main file, then the CPR state to its memfd.

        The worker thread stays at the switchover priority from here until it exec's
        (the successor inherits it until its guest runs) or the migration fails."""
        raise_for_good(ctx.switchover_priority)
        addr = ctx.channels[ChannelType.MAIN]
        if not isinstance(addr, FileAddress):
            raise MigrationError(f"cpr-exec mode requires a file: main channel, not {addr.uri}")
        try:
            fd = open_file(addr, write=True)
            try:
                write_main(fd, self.host.devices, self.pre_stop.value)
            finally:
                os.close(fd)
        except OSError as e:
            raise MigrationError(f"cpr-exec: cannot write the main channel {addr.uri}: {e.strerror or e}") from e
        ctx.activate()
        ctx.switchover()

    def complete(self, ctx: MigrationContext) -> None:
        """After PRECOPY_DONE: write the CPR state, keep the fds across exec, become the successor.

        Returns only if exec failed, by raising with everything undone.
        """
        argv = ctx.params.cpr_exec_command
        fd = write_exec_state(self.host.cpr)
        self.host.cpr.preserve()
        persist_exec_state(fd, os.environ)
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        keeper = self._keeper()
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            if keeper is not None:
                exec_keeper.cancel(keeper)
            self.host.cpr.unpreserve()
            unpersist_exec_state(fd, os.environ)
            os.close(fd)
            raise MigrationError(f"execvp {argv[0]} failed: {e.strerror or e}") from None

    def _keeper(self) -> _core.ExecKeeper | None:
        """A keeper for the host's ``exec_keep_fds()``, if it has one; the exec goes on without one if it fails."""
        keep_fds = getattr(self.host, "exec_keep_fds", None)  # optional: hosts without one get no keeper
        if keep_fds is None:
            return None
        try:
            return exec_keeper.keep(keep_fds())
        except (OSError, ValueError) as e:  # only slower without it: execve tears the old program down itself
            log.warning("cpr-exec: no keeper for the old address space: %s", e)
            return None


class ExecIncoming:
    """A cpr-exec successor started with ``-incoming defer``: ``migrate-incoming file:PATH`` loads."""

    def __init__(self, host: CprHost) -> None:
        self.host = host

    def run(self, ctx: IncomingContext) -> RunState:
        """Read the device state from the main file; returns the predecessor's run state."""
        from cprfast.status import RunState

        return RunState(load_file(ctx.address, self.host))


def load_file(addr: object, host: CprHost) -> str:
    """Load a cpr-exec main file into ``host``'s devices; returns the predecessor's run state."""
    if not isinstance(addr, FileAddress):
        raise MigrationError(f"cpr-exec: the main channel must be a file:, not {getattr(addr, 'uri', addr)}")
    return read_main_file(addr.path, addr.offset, host.devices)
