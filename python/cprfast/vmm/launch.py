"""Start-up of the reference VMM: fresh boot, cpr-exec successor, or cpr-transfer target.

The three paths share one rule: everything a live-updated guest needs to run
(RAM, the guest's memory slot and vCPU, the devices and their state) comes
first, then the guest resumes, and only then the migration object and the QMP
server are imported and created.
"""

from __future__ import annotations

import os
import time

from cprfast.channels import DEFER, ChannelType, FileAddress, MigrationAddress, parse_incoming
from cprfast.cpr_state import EXEC_STATE_ENV, CprState, load_incoming
from cprfast.errors import MigrationError
from cprfast.vmm.cli import Config
from cprfast.vmm.machine import Machine


def _channels(specs: list[str]) -> tuple[bool, MigrationAddress | None, MigrationAddress | None]:
    """``-incoming`` values -> (defer, main, cpr)."""
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


def launch(cfg: Config) -> Machine:
    """Build and start the machine ``cfg`` describes; returns it with its QMP server created."""
    defer, main, cpr = _channels(cfg.incoming)
    if EXEC_STATE_ENV in os.environ:
        machine = _exec_successor(cfg, defer, main, cpr)
    elif cpr is not None:
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
    if cfg.qmp is not None:
        machine.serve_qmp(cfg.qmp)
    return machine


def _adopt(cfg: Config, state: CprState) -> Machine:
    try:
        return Machine(cfg.ram_size, hot_size=cfg.hot_size, guest=cfg.guest, cpr=state, vcpu_cpus=cfg.vcpu_cpus)
    except BaseException:
        state.close()
        raise


def _exec_successor(cfg: Config, defer: bool, main: MigrationAddress | None, cpr: MigrationAddress | None) -> Machine:
    """cpr-exec: adopt the inherited fds; with ``file:`` load and resume at once, with defer wait."""
    from cprfast.modes.exec import load_file

    if not defer and main is None:
        raise MigrationError(f"{EXEC_STATE_ENV} is set but there is no -incoming (file:PATH or defer)")
    if main is not None and not isinstance(main, FileAddress):
        raise MigrationError(f"cpr-exec: the main channel must be a file:, not {main.uri}")
    incoming = load_incoming(cpr_channel=cpr)
    assert incoming is not None
    machine = _adopt(cfg, incoming.state)
    try:
        machine.create_devices()
        if main is None:
            machine.attach_migration("inmigrate", incoming=True, incoming_mode="cpr-exec")
            return machine
        run_state = load_file(main, machine)
        machine.timeline["loaded"] = time.monotonic_ns()
        machine.resume_loaded(run_state)
        machine.attach_migration(run_state)
        machine.incoming_done()
    except BaseException:
        machine.close()
        raise
    return machine


def _transfer_target(cfg: Config, defer: bool, main: MigrationAddress | None, cpr: MigrationAddress) -> Machine:
    """cpr-transfer: RAM first (while the source runs), then device fds, then device state."""
    from cprfast.modes.transfer import TransferTarget

    if not defer and main is None:
        raise MigrationError("a cpr channel needs a main channel or -incoming defer")
    target = TransferTarget(cpr, None if defer else main)
    machine: Machine | None = None
    try:
        machine = _adopt(cfg, target.receive_ram())
        target.ram_ready()
        target.receive_devices(machine.cpr)
        machine.timeline["devices-received"] = time.monotonic_ns()
        machine.create_devices()
        if defer:
            machine.attach_migration(
                "inmigrate", incoming=True, incoming_mode="cpr-transfer", transfer_target=target
            )
            return machine
        run_state = target.load(None, machine.devices)
        machine.timeline["loaded"] = time.monotonic_ns()
        machine.resume_loaded(run_state)
        target.confirm()
        machine.attach_migration(run_state)
        machine.incoming_done()
    except BaseException:
        target.close()
        if machine is not None:
            machine.close()
        raise
    return machine
