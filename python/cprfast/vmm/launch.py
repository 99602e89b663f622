"""Start-up of the reference VMM: fresh boot, cpr-exec successor, or cpr-transfer target.

The three paths share one rule: everything a live-updated guest needs to run
(RAM, the guest's memory slot and vCPU, the devices and their state) comes
first, then the guest resumes, and only then the migration object and the QMP
server are imported and created.

A cpr-exec successor is the strict case: its guest has been paused since the
old program stopped it, through ``exec`` and the interpreter's start. Until it
resumes the guest it imports only the CPR-state reader, the machine (guest,
devices) and the main-stream reader, and none of ``typing``, ``re``,
``logging``, ``dataclasses``, ``socket`` or ``json``; the channel parser only
for ``-incoming`` forms other than ``file:PATH`` and ``defer``. Every check
stays on that path: the state fd is validated, the CPR and main streams are
verified before any device loads. Its timeline (``x-query-guest``) spans the
exec: ``stopped`` and ``exec`` from the old program, then ``main`` (the new
program's first line), ``state`` (CPR state loaded), ``machine`` (RAM adopted,
KVM VM, memory slot and vCPU created), ``loaded`` (device state) and ``resumed``.
"""

from __future__ import annotations

import os
import time

from cprfast import exec_keeper
from cprfast.cpr_state import EXEC_STATE_ENV, CprState, load_exec_state
from cprfast.errors import MigrationError
from cprfast.modes import read_main_file
from cprfast.vmm import fault
from cprfast.vmm.cli import Config
from cprfast.vmm.machine import Machine, carried_timeline

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cprfast.channels import MigrationAddress


def _channels(specs: list[str]) -> tuple[bool, MigrationAddress | None, MigrationAddress | None]:
    """``-incoming`` values -> (defer, main, cpr)."""
    from cprfast.channels import DEFER, ChannelType, parse_incoming

    defer = False
    found: dict[ChannelType, MigrationAddress] = {}
    for spec in specs:
        parsed = parse_incoming(spec)
        if parsed is DEFER:
            defer = True
            continue
        for channel in parsed:
            if channel.channel_type in found:
                raise MigrationError(f"-incoming: more than one {channel.channel_type} channel")
            found[channel.channel_type] = channel.addr
    main = found.get(ChannelType.MAIN)
    if defer and main is not None:
        raise MigrationError("-incoming defer and a main channel exclude each other")
    return defer, main, found.get(ChannelType.CPR)


def launch(cfg: Config, started_ns: int | None = None) -> Machine:
    """Build and start the machine ``cfg`` describes; returns it with its QMP server created.

    ``started_ns`` (CLOCK_MONOTONIC) is when the program began: the ``main`` mark of a successor.
    """
    if EXEC_STATE_ENV in os.environ:  # (its predecessor checked the switchover priority)
        machine = _exec_successor(cfg, started_ns if started_ns is not None else time.monotonic_ns())
    else:
        if cfg.switchover_priority is not None:
            from cprfast.realtime import check_priority

            check_priority(cfg.switchover_priority)
        defer, main, cpr = _channels(cfg.incoming)
        if cpr is not None:
            machine = _transfer_target(cfg, defer, main, cpr)
        else:
            machine = Machine(cfg.ram_size, hot_size=cfg.hot_size, guest=cfg.guest, vcpu_cpus=cfg.vcpu_cpus)
            try:
                machine.create_devices()
                if defer or main is not None:
                    migration = machine.attach_migration("inmigrate", incoming=True)
                    if main is not None:
                        migration.migrate_incoming(uri=main.uri)
                else:
                    machine.attach_migration("running")
                    machine.resume_loaded("running")
            except BaseException:
                machine.close()
                raise
    if machine.migration is not None:
        machine.migration.switchover_priority = cfg.switchover_priority
    if cfg.qmp is not None:
        machine.serve_qmp(cfg.qmp)
    return machine


def _adopt(cfg: Config, state: CprState, *, warm_up: bool = False) -> Machine:
    try:
        return Machine(
            cfg.ram_size, hot_size=cfg.hot_size, guest=cfg.guest, cpr=state, vcpu_cpus=cfg.vcpu_cpus, warm_up=warm_up
        )
    except BaseException:
        state.close()
        raise


def _plain_exec_incoming(specs: list[str]) -> tuple[bool, str | None] | None:
    """(defer, main file path) for the forms a successor reads without the channel parser.

    Those are ``defer`` and ``file:PATH`` with no options, once each and not
    both; anything else is None, for the full parser (and its error messages).
    """
    defer, path = False, None
    for spec in specs:
        if spec == "defer" and not defer and path is None:
            defer = True
        elif spec.startswith("file:") and len(spec) > 5 and "," not in spec and not defer and path is None:
            path = spec[5:]
        else:
            return None
    return defer, path


def _exec_successor(cfg: Config, started_ns: int) -> Machine:
    """cpr-exec: adopt the inherited fds; with ``file:`` load and resume at once, with defer wait."""
    marks = {"main": started_ns}
    keeper = exec_keeper.take()
    plain = _plain_exec_incoming(cfg.incoming)
    if plain is not None:
        defer, path, offset = *plain, 0
    else:
        from cprfast.channels import FileAddress

        defer, main, _ = _channels(cfg.incoming)  # a cpr channel is ignored: the state is in the environment
        if main is not None and not isinstance(main, FileAddress):
            raise MigrationError(f"cpr-exec: the main channel must be a file:, not {main.uri}")
        path, offset = (main.path, main.offset) if main is not None else (None, 0)
    if not defer and path is None:
        raise MigrationError(f"{EXEC_STATE_ENV} is set but there is no -incoming (file:PATH or defer)")
    state = load_exec_state()
    assert state is not None
    marks["state"] = time.monotonic_ns()
    machine = _adopt(cfg, state)
    marks["machine"] = time.monotonic_ns()
    machine.timeline.update(carried_timeline())
    try:
        machine.create_devices()
        if path is None:
            machine.timeline.update(marks)
            machine.attach_migration("inmigrate", incoming=True, incoming_mode="cpr-exec")
            _predecessor_done(keeper)
            return machine
        run_state = read_main_file(path, offset, machine.devices)
        marks["loaded"] = time.monotonic_ns()
        fault.point("loaded")
        machine.timeline.update(marks)
        machine.resume_loaded(run_state)
        _predecessor_done(keeper)
        machine.attach_migration(run_state)
        machine.incoming_done()
    except BaseException:
        machine.close()
        raise
    return machine


def _predecessor_done(keeper: int | None) -> None:
    """A cpr-exec successor past its pause: end the switchover priority it inherited, if any,
    and release the keeper, whose exit tears the old program down."""
    from cprfast.realtime import end_inherited  # (imported only now: it needs contextlib)

    end_inherited()
    if keeper is not None:
        exec_keeper.release(keeper)


def _transfer_target(cfg: Config, defer: bool, main: MigrationAddress | None, cpr: MigrationAddress) -> Machine:
    """cpr-transfer: RAM first (while the source runs), then device fds, then device state."""
    from cprfast.modes.transfer import TransferTarget
    from cprfast.realtime import switchover

    if not defer and main is None:
        raise MigrationError("a cpr channel needs a main channel or -incoming defer")
    target = TransferTarget(cpr, None if defer else main)
    machine: Machine | None = None
    try:
        fault.point("cpr-accept")
        machine = _adopt(cfg, target.receive_ram(), warm_up=True)
        fault.point("ram-received")
        # Real-time from before our "W" (after which the source stops its guest) to our resume:
        # nothing on this CPU delays us between that answer and blocking for the device fds.
        with switchover(None if defer else cfg.switchover_priority):
            target.ram_ready()
            target.receive_devices(machine.cpr)
            machine.timeline["devices-received"] = time.monotonic_ns()
            if not defer:
                machine.guest.expect_resume()  # the source's vCPU has stopped: its CPU is free
            fault.point("fds-received")
            machine.create_devices()
            if defer:
                machine.attach_migration(
                    "inmigrate", incoming=True, incoming_mode="cpr-transfer", transfer_target=target
                )
                return machine
            run_state = target.load(None, machine.devices)
            machine.guest.wait_loaded()  # (its vCPU thread loads the vCPU state, on the guest's CPU)
            machine.timeline["loaded"] = time.monotonic_ns()
            fault.point("loaded")
            target.confirm()  # before the resume: if the source gave up meanwhile, the guest stays there
            machine.resume_loaded(run_state)
        target.close()
        machine.attach_migration(run_state)
        machine.incoming_done()
    except BaseException:
        target.close()
        if machine is not None:
            machine.close()
        raise
    return machine

