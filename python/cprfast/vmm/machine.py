"""The reference VMM's machine: guest RAM, guest, devices, migration and QMP, in one object.

It is also the example of embedding cprfast in a VMM. The order of construction
is the order a CPR target needs:

1. :class:`Machine` creates guest RAM (one memfd region, ``pc.ram``, CPR fd id 0)
   or adopts it from an incoming CPR state, and sets up the guest on it (KVM
   memory slot and vCPU): all of it can happen while the old guest still runs.
2. :meth:`Machine.create_devices` once the whole CPR state is here: devices
   adopt their preserved fds.
3. :meth:`Machine.attach_migration`: the :class:`~cprfast.migration.MigrationState`
   with the CPR mode drivers, and :meth:`Machine.serve_qmp`.

Only steps 1 and 2 (and the device-state load) come before a live-updated guest
resumes; step 3 imports the orchestration and the QMP server afterwards.
"""

from __future__ import annotations

import os
import time

from cprfast import _core
from cprfast.cpr_state import CprState
from cprfast.devices import DeviceRegistry
from cprfast.errors import CprError
from cprfast.vmm import fault
from cprfast.vmm.devices import Console, Doorbell
from cprfast.vmm.guest import HOT_START, Guest, resolve_kind

TYPE_CHECKING = False  # no ``typing`` or ``logging`` at run time: see cprfast.vmm.launch
if TYPE_CHECKING:
    from collections.abc import MutableMapping
    from typing import Any

    from cprfast.migration import MigrationState
    from cprfast.modes.transfer import TransferTarget
    from cprfast.qmp import QMPServer
    from cprfast.status import MigMode, RunState

RAM_NAME = "pc.ram"
"""The guest-RAM block's name: the memfd's name and its CPR fd name (id 0), as QEMU's."""
TIMELINE_ENV = "CPRFAST_VMM_TIMELINE"
"""Carries the source's timeline across a cpr-exec (``name=ns,...``), so one process's
timeline spans the exec: the successor reads and removes it."""


def carried_timeline(environ: MutableMapping[str, str] = os.environ) -> dict[str, int]:
    """After a cpr-exec: take the old program's timeline marks out of the environment."""
    marks = {}
    for item in environ.pop(TIMELINE_ENV, "").split(","):
        name, _, value = item.partition("=")
        if name and value.isascii() and value.isdigit():
            marks[name] = int(value)
    return marks


class Machine:
    """One VM: guest RAM, a KVM or threads guest, two devices, migration and QMP.

    ``cpr`` is an incoming CPR state (it must hold ``pc.ram`` of ``ram_size``
    bytes, which is adopted, and the console's pipe); without one, RAM is
    created and recorded in a new CPR state for the next live update. An
    incoming state without them is refused: a blank guest must never start in
    place of the live one. The machine owns ``cpr``. ``vcpu_cpus`` pins the
    guest's thread.
    """

    def __init__(
        self,
        ram_size: int,
        *,
        hot_size: int = 64 << 20,
        guest: str = "auto",
        cpr: CprState | None = None,
        vcpu_cpus: tuple[int, ...] | None = None,
        warm_up: bool = False,
    ) -> None:
        self.cpr = cpr if cpr is not None else CprState()
        self.incoming = cpr is not None
        self.ram_keys = frozenset({(RAM_NAME, 0)})
        hot_size = min(hot_size, ram_size - HOT_START)
        fd = self.cpr.find_fd(RAM_NAME, 0)
        if fd is None and self.incoming:
            raise CprError(f"the incoming CPR state has no guest RAM ({RAM_NAME!r}, id 0): refusing to start a blank guest")
        if fd is None:
            self.region = _core.Region.create(RAM_NAME, ram_size)
            self.cpr.save_fd(RAM_NAME, 0, self.region.fileno())
        else:
            self.region = _core.Region.adopt(fd, ram_size, name=RAM_NAME)
        try:
            self.guest = Guest(
                resolve_kind(guest), self.region, hot_size, fresh=fd is None, cpus=vcpu_cpus, warm_up=warm_up
            )
        except BaseException:
            self.region.close()
            raise
        self.devices = DeviceRegistry()
        self.devices.register("cpu", self.guest)
        self.doorbell = Doorbell()
        self.console: Console | None = None
        self.migration: MigrationState | None = None
        self.qmp: QMPServer | None = None
        self.heartbeat_at_stop: int | None = None
        self.heartbeat_at_start: int | None = None
        self.timeline: dict[str, int] = {}
        """CLOCK_MONOTONIC ns of the guest's last stop and start, comparable across processes."""

    # ------------------------------------------------------------------ construction steps

    def create_devices(self) -> None:
        """Create the devices, adopting their fds from the CPR state when it holds them."""
        self.devices.register(Doorbell.NAME, self.doorbell, version=Doorbell.VERSION)
        self.console = Console(self.cpr, adopt=self.incoming)

    def attach_migration(
        self,
        run_state: RunState | str,
        *,
        incoming: bool = False,
        incoming_mode: MigMode | str | None = None,
        transfer_target: TransferTarget | None = None,
    ) -> MigrationState:
        """Create the migration object with the CPR drivers and the doorbell's notifier."""
        from cprfast import modes
        from cprfast.migration import MigrationState
        from cprfast.notifiers import ALL_MODES
        from cprfast.status import MigMode, RunState

        self.migration = MigrationState(
            self,
            run_state=RunState(run_state),
            incoming=incoming,
            incoming_mode=MigMode(incoming_mode) if incoming_mode is not None else None,
        )
        modes.register(self.migration, self, transfer_target=transfer_target)
        self.migration.notifiers.add(self.doorbell.notifier, ALL_MODES)
        self.migration.notifiers.add(self._carry_timeline, (MigMode.CPR_EXEC,))
        return self.migration

    def _carry_timeline(self, event: object, mode: object) -> None:
        """cpr-exec notifier, in the thread that will exec: on PRECOPY_DONE put the timeline in the
        environment the exec passes on."""
        name = getattr(event, "name", None)
        if name == "PRECOPY_DONE":
            carried = {"stopped": self.timeline.get("stopped", 0), "exec": time.monotonic_ns()}
            os.environ[TIMELINE_ENV] = ",".join(f"{k}={v}" for k, v in carried.items())
        elif name == "PRECOPY_FAILED":
            os.environ.pop(TIMELINE_ENV, None)

    def incoming_done(self) -> None:
        """Record an incoming migration loaded before the migration object existed (start-up fast path)."""
        from cprfast.cpr_state import reset_incoming_mode
        from cprfast.status import MigrationStatus as S

        assert self.migration is not None
        cell = self.migration.incoming_status
        for old, new in ((S.NONE, S.SETUP), (S.SETUP, S.ACTIVE), (S.ACTIVE, S.COMPLETED)):
            cell.transition(old, new)
        reset_incoming_mode()

    def serve_qmp(self, path: str) -> QMPServer:
        """Create the QMP server on ``path`` with the VMM's own commands (not started)."""
        from cprfast.qmp import QMPServer

        assert self.migration is not None, "attach_migration() first"
        server = QMPServer(self.migration, path, package="cprfast-vmm")
        server.register_command("x-query-guest", self._qmp_query_guest, blocking=False)
        server.register_command("x-doorbell", self._qmp_doorbell, blocking=False)
        server.register_command("x-console-read", self._qmp_console_read, blocking=False)
        server.register_command("x-console-write", self._qmp_console_write, blocking=False)
        server.register_command("x-fault", self._qmp_fault, blocking=False)
        self.qmp = server
        return server

    # ------------------------------------------------------------------ VmHooks

    def vm_stop(self, state: RunState) -> None:
        """Pause the guest; remember its heartbeat (the last value this process let it write)."""
        fault.point("vm-stop")
        self.guest.pause()
        self.timeline["stopped"] = time.monotonic_ns()
        self.heartbeat_at_stop = self.guest.heartbeat

    def vm_start(self, state: RunState) -> None:
        """Resume the guest (a suspended guest has no vCPU work here: it stays paused)."""
        if state == "running":
            if self.migration is not None and self.migration.run_state == "inmigrate":
                fault.point("loaded")
            self.heartbeat_at_start = self.guest.heartbeat
            self.guest.resume()
            self.timeline["resumed"] = time.monotonic_ns()

    def exec_keep_fds(self) -> tuple[int, ...]:
        """cpr-exec: fds a keeper holds across ``exec`` (the KVM VM and vCPU: their teardown waits for the successor)."""
        return self.guest.kvm_fds()

    def dirty_log(self, on: bool) -> tuple[int, int] | None:
        """For normal migration: the KVM dirty log of guest RAM, when the guest is KVM."""
        return self.guest.dirty_log(on)

    def resume_loaded(self, run_state: str) -> None:
        """Start a guest whose state was just loaded, if its predecessor was running it."""
        self.vm_start(run_state)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ QMP commands

    def query_guest(self) -> dict[str, Any]:
        """``x-query-guest``: heartbeat, guest kind, RAM, devices."""
        return {
            "pid": os.getpid(),
            "kind": self.guest.kind,
            "running": self.guest.running,
            "heartbeat": self.guest.heartbeat,
            "heartbeat-at-stop": self.heartbeat_at_stop,
            "heartbeat-at-start": self.heartbeat_at_start,
            "ram": {"name": self.region.name, "size": self.region.size, "fd": self.cpr.find_fd(RAM_NAME, 0)},
            "timeline": dict(self.timeline),
            "doorbell": self.doorbell.query(),
            "console": self.console.query() if self.console is not None else None,
        }

    def _qmp_query_guest(self, args: dict[str, Any]) -> dict[str, Any]:
        from cprfast.qmp import check_args

        check_args(args)
        return self.query_guest()

    def _qmp_doorbell(self, args: dict[str, Any]) -> dict[str, Any]:
        from cprfast.qmp import check_args

        check_args(args, optional=("message", "hold"))
        if "hold" in args:
            hold = args["hold"]
            self.doorbell.hold = str(hold) if hold else None
        if "message" in args:
            self.doorbell.ring(str(args["message"]))
        return self.doorbell.query()

    def _qmp_console_read(self, args: dict[str, Any]) -> dict[str, Any]:
        from cprfast.qmp import check_args

        check_args(args)
        assert self.console is not None
        return {"data": self.console.read().decode("utf-8", "replace")}

    def _qmp_console_write(self, args: dict[str, Any]) -> dict[str, Any]:
        from cprfast.qmp import check_args

        check_args(args, required=("data",))
        assert self.console is not None
        return {"written": self.console.write(str(args["data"]).encode())}

    def _qmp_fault(self, args: dict[str, Any]) -> dict[str, Any]:
        """``x-fault``: inject a fault at a phase (see :mod:`cprfast.vmm.fault`); runs in the main thread."""
        from cprfast.qmp import check_args

        check_args(args, required=("spec",))
        fault.inject(str(args["spec"]))  # a bad spec is a ValueError: an error reply
        return {}

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop the guest and release RAM, devices and preserved fds."""
        self.guest.close()
        self.region.close()
        self.cpr.close()
