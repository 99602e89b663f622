"""Parameters, capabilities, blockers and mode rules, with QEMU's defaults and texts."""

from __future__ import annotations

from typing import Any

import pytest

from cprfast import channels as ch
from cprfast.errors import MigrationBlockedError, MigrationError
from cprfast.policy import (
    RAM_BLOCKER_MODES,
    Blockers,
    MigMode,
    MigrationCapabilities,
    MigrationParameters,
    check_channels,
    check_prepare,
    ram_blocker_needed,
)
from cprfast.status import MigrationStatus, RunState


def test_parameter_defaults_are_qemus() -> None:
    q = MigrationParameters().query()
    assert q["mode"] == "normal"
    assert q["cpr-exec-command"] == []
    assert q["downtime-limit"] == 300
    assert q["max-bandwidth"] == 134217728
    assert q["avail-switchover-bandwidth"] == 0
    assert q["multifd-channels"] == 2
    assert q["throttle-trigger-threshold"] == 50
    assert (q["cpu-throttle-initial"], q["cpu-throttle-increment"], q["max-cpu-throttle"]) == (20, 10, 99)
    assert q["x-vcpu-dirty-limit-period"] == 1000 and q["vcpu-dirty-limit"] == 1


def test_set_and_read_back() -> None:
    p = MigrationParameters()
    p.set({"mode": "cpr-exec", "cpr-exec-command": ["/usr/bin/vmm", "--incoming", "defer"], "downtime-limit": 2000000})
    q = p.query()
    assert q["mode"] == "cpr-exec" and p.mode is MigMode.CPR_EXEC
    assert q["cpr-exec-command"] == ["/usr/bin/vmm", "--incoming", "defer"]
    assert p.cpr_exec_command == ["/usr/bin/vmm", "--incoming", "defer"]
    assert p.int("downtime-limit") == 2000000
    with pytest.raises(KeyError):
        p.int("mode")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"downtime-limit": 2000001}, "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms"),
        ({"downtime-limit": -1}, "Parameter 'downtime-limit' expects uint64"),
        ({"downtime-limit": "300"}, "Invalid parameter type for 'downtime-limit', expected: integer"),
        ({"downtime-limit": True}, "Invalid parameter type for 'downtime-limit', expected: integer"),
        ({"max-bandwidth": 1 << 64}, "Parameter 'max-bandwidth' expects size"),
        ({"multifd-channels": 0}, "Parameter 'multifd_channels' expects a value between 1 and 255"),
        ({"multifd-channels": 256}, "Parameter 'multifd-channels' expects uint8_t"),
        ({"throttle-trigger-threshold": 0}, "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
        ({"throttle-trigger-threshold": 101}, "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
        ({"cpu-throttle-initial": 100}, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
        ({"cpu-throttle-increment": 0}, "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
        ({"max-cpu-throttle": 10}, "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
        ({"x-vcpu-dirty-limit-period": 1001}, "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
        ({"vcpu-dirty-limit": 0}, "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
        ({"cpu-throttle-tailslow": 1}, "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"),
        ({"mode": "cpr-magic"}, "Parameter 'mode' does not accept value 'cpr-magic'"),
        ({"mode": 1}, "Invalid parameter type for 'mode', expected: string"),
        ({"cpr-exec-command": "vmm --incoming defer"}, "Invalid parameter type for 'cpr-exec-command', expected: array"),
        ({"cpr-exec-command": ["vmm", 3]}, "Invalid parameter type for 'cpr-exec-command[1]', expected: string"),
        ({"no-such-thing": 1}, "Parameter 'no-such-thing' is unexpected"),
    ],
)
def test_parameter_errors_apply_nothing(changes: dict[str, Any], message: str) -> None:
    p = MigrationParameters()
    before = p.query()
    with pytest.raises(MigrationError) as e:
        p.set({"downtime-limit": 1000, **changes})
    assert str(e.value) == message
    assert p.query() == before


def test_capabilities_default_off_and_set() -> None:
    c = MigrationCapabilities()
    q = c.query()
    names = [e["capability"] for e in q]
    for must in ("events", "postcopy-ram", "background-snapshot", "x-colo", "x-ignore-shared", "mapped-ram",
                 "multifd", "pause-before-switchover", "auto-converge"):  # fmt: skip
        assert must in names
    assert not any(e["state"] for e in q)
    c.set([{"capability": "events", "state": True}, {"capability": "x-ignore-shared", "state": True}])
    assert c["events"] and c["x-ignore-shared"] and not c["multifd"]
    c.set([{"capability": "events", "state": False}])
    assert not c["events"]


@pytest.mark.parametrize(
    ("caps", "message"),
    [
        ([{"capability": "postcopy-ram", "state": True}, {"capability": "x-ignore-shared", "state": True}],
         "Postcopy is not compatible with ignore-shared"),
        ([{"capability": "postcopy-ram", "state": True}, {"capability": "multifd", "state": True}],
         "Postcopy is not yet compatible with multifd"),
        ([{"capability": "background-snapshot", "state": True}, {"capability": "multifd", "state": True}],
         "Background-snapshot is not compatible with multifd"),
        ([{"capability": "zero-copy-send", "state": True}],
         "Zero copy only available for non-compressed non-TLS multifd migration"),
        ([{"capability": "postcopy-preempt", "state": True}], "Postcopy preempt requires postcopy-ram"),
        ([{"capability": "switchover-ack", "state": True}],
         "Capability 'switchover-ack' requires capability 'return-path'"),
        ([{"capability": "dirty-limit", "state": True}, {"capability": "auto-converge", "state": True}],
         "dirty-limit conflicts with auto-converge either of then available currently"),
        ([{"capability": "multifd", "state": True}, {"capability": "xbzrle", "state": True}],
         "Multifd is not compatible with xbzrle"),
        ([{"capability": "mapped-ram", "state": True}, {"capability": "xbzrle", "state": True}],
         "Mapped-ram migration is incompatible with xbzrle"),
        ([{"capability": "mapped-ram", "state": True}, {"capability": "postcopy-ram", "state": True}],
         "Mapped-ram migration is incompatible with postcopy"),
        ({"capability": "events"}, "Invalid parameter type for 'capabilities', expected: array"),
        (["events"], "Invalid parameter type for 'capabilities[0]', expected: object"),
        ([{"capability": "events", "state": True, "x": 1}], "Parameter 'capabilities[0].x' is unexpected"),
        ([{"state": True}], "Parameter 'capabilities[0].capability' is missing"),
        ([{"capability": "events"}], "Parameter 'capabilities[0].state' is missing"),
        ([{"capability": 5, "state": True}], "Invalid parameter type for 'capabilities[0].capability', expected: string"),
        ([{"capability": "warp-drive", "state": True}],
         "Parameter 'capabilities[0].capability' does not accept value 'warp-drive'"),
        ([{"capability": "events", "state": "on"}], "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ],
)  # fmt: skip
def test_capability_errors_apply_nothing(caps: object, message: str) -> None:
    c = MigrationCapabilities()
    before = c.query()
    with pytest.raises(MigrationError) as e:
        c.set(caps)
    assert str(e.value) == message
    assert c.query() == before


def test_blockers_per_mode_and_removal() -> None:
    b = Blockers()
    h = b.add("vfio device busy", modes={MigMode.NORMAL})
    b.check(MigMode.CPR_TRANSFER)
    with pytest.raises(MigrationBlockedError, match="^vfio device busy$"):
        b.check(MigMode.NORMAL)
    b.remove(h)
    b.remove(h)
    b.check(MigMode.NORMAL)
    everywhere = b.add("no migration at all")
    for m in MigMode:
        with pytest.raises(MigrationBlockedError, match="no migration at all"):
            b.check(m)
    b.remove(everywhere)
    with pytest.raises(ValueError, match="at least one migration mode"):
        b.add("x", modes=())


def test_ram_blocker_covers_transfer_and_exec() -> None:
    assert ram_blocker_needed(False) and not ram_blocker_needed(True)
    assert RAM_BLOCKER_MODES == {MigMode.CPR_TRANSFER, MigMode.CPR_EXEC}
    b = Blockers()
    assert b.add_ram("pc.ram", is_memfd_shared=True) is None
    h = b.add_ram("pc.ram", is_memfd_shared=False)
    assert h is not None
    for mode in (MigMode.CPR_TRANSFER, MigMode.CPR_EXEC):
        with pytest.raises(MigrationBlockedError, match="^Memory region pc.ram is not compatible with CPR: it must be a shared memfd$"):
            b.check(mode)
    b.check(MigMode.NORMAL)
    b.check(MigMode.CPR_REBOOT)


def _prepare(**over: Any) -> None:
    p = over.pop("params", MigrationParameters())
    c = over.pop("caps", MigrationCapabilities())
    kw: dict[str, Any] = {
        "status": MigrationStatus.NONE, "run_state": RunState.RUNNING, "incoming": False,
        "params": p, "caps": c, "blockers": over.pop("blockers", Blockers()),
    }  # fmt: skip
    kw.update(over)
    check_prepare(**kw)


def test_prepare_order_and_texts() -> None:
    _prepare()
    for s in (MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.DEVICE, MigrationStatus.CANCELLING):
        with pytest.raises(MigrationError, match="^There's a migration process in progress$"):
            _prepare(status=s, run_state=RunState.INMIGRATE)  # first check wins
    for s in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED):
        _prepare(status=s)
    with pytest.raises(MigrationError, match="^Guest is waiting for an incoming migration$"):
        _prepare(run_state=RunState.INMIGRATE)
    with pytest.raises(MigrationError, match="^Guest is waiting for an incoming migration$"):
        _prepare(incoming=True)
    with pytest.raises(MigrationError, match="^Can't migrate the vm that was paused due to previous migration$"):
        _prepare(run_state=RunState.POSTMIGRATE)
    p = MigrationParameters()
    p.set({"mode": "cpr-exec"})
    b = Blockers()
    b.add("blocked", modes={MigMode.CPR_EXEC})
    with pytest.raises(MigrationError, match="^cpr-exec mode requires setting cpr-exec-command$"):
        _prepare(params=p, blockers=b)  # before the blockers, as in QEMU
    p.set({"cpr-exec-command": ["true"]})
    c = MigrationCapabilities()
    c.set([{"capability": "postcopy-ram", "state": True}])
    with pytest.raises(MigrationBlockedError, match="^blocked$"):
        _prepare(params=p, blockers=b, caps=c)  # blockers before the capability rules


@pytest.mark.parametrize(("cap", "what"), [("postcopy-ram", "postcopy"), ("background-snapshot", "background snapshot"), ("x-colo", "COLO")])
def test_cpr_modes_refuse_postcopy_snapshot_colo(cap: str, what: str) -> None:
    c = MigrationCapabilities()
    c.set([{"capability": cap, "state": True}])
    for mode in ("cpr-reboot", "cpr-transfer", "cpr-exec"):
        p = MigrationParameters()
        p.set({"mode": mode, "cpr-exec-command": ["x"]})
        with pytest.raises(MigrationError, match=f"^Cannot use {what} with CPR$"):
            _prepare(params=p, caps=c)
    with pytest.raises(MigrationError, match=f"^cprfast does not implement {what} migration$"):
        _prepare(caps=c)


def _chans(**addrs: Any) -> dict[Any, Any]:
    return {ch.ChannelType(k): v for k, v in addrs.items()}


def test_channel_rules() -> None:
    unix, tcp = ch.parse_uri("unix:/tmp/m.sock"), ch.parse_uri("tcp:127.0.0.1:4444")
    file, exe = ch.parse_uri("file:/tmp/vm.state"), ch.parse_uri("exec:cat > /dev/null")
    T, E, R, N = MigMode.CPR_TRANSFER, MigMode.CPR_EXEC, MigMode.CPR_REBOOT, MigMode.NORMAL
    check_channels(T, _chans(main=unix, cpr=ch.parse_uri("unix:/tmp/cpr.sock")))
    check_channels(T, _chans(main=tcp, cpr=unix))
    cases = [
        (N, _chans(cpr=unix), "Channel list has no main entry"),
        (T, _chans(main=unix), "missing 'cpr' migration channel"),
        (T, _chans(main=unix, cpr=tcp), "bad cpr channel address; must be unix"),
        (T, _chans(main=file, cpr=unix), "Migration requires streamable transport (eg unix)"),
        (N, _chans(main=unix, cpr=unix), "a 'cpr' migration channel is only used in cpr-transfer mode, not normal"),
        (E, _chans(main=unix), "cpr-exec mode requires a file: main channel (the data must be complete before exec), not unix:/tmp/m.sock"),
        (R, _chans(main=tcp), "cpr-reboot mode requires a file: or exec: main channel, not tcp:127.0.0.1:4444"),
    ]  # fmt: skip
    for mode, chans, message in cases:
        with pytest.raises(MigrationError) as e:
            check_channels(mode, chans)
        assert str(e.value) == message
    check_channels(E, _chans(main=file))
    check_channels(R, _chans(main=file))
    check_channels(R, _chans(main=exe))
    for main in (unix, tcp, file, exe):
        check_channels(N, _chans(main=main))
