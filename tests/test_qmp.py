"""The QMP server, driven by the QEMU project's own client (qemu.qmp from PyPI)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from _doubles import BlockingDriver, FailingDriver, IncomingOk, OkDriver, RecordingHooks
from cprfast.errors import MigrationError
from cprfast.migration import MigrationState
from cprfast.qmp import QMPError, QMPServer, check_args
from cprfast.status import MigMode, RunState

CPR_CHANNELS = [
    {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/cprfast-m.sock"}},
    {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/cprfast-c.sock"}},
]


class Vmm:
    def __init__(self, path: Path, incoming: bool = False) -> None:
        self.hooks = RecordingHooks()
        self.hooks.vcpus_running = not incoming
        self.ms = MigrationState(self.hooks, incoming=incoming)
        self.quit_called = threading.Event()
        self.server = QMPServer(self.ms, path, on_quit=self.quit_called.set)
        self.path = path


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[Vmm]:
    v = Vmm(tmp_path / "qmp.sock")
    v.server.start_in_thread()
    yield v
    v.server.stop_thread()


async def client(path: Path, negotiate: bool = True) -> QMPClient:
    qmp = QMPClient("test")
    qmp.negotiate = negotiate
    await qmp.connect(str(path))
    return qmp


async def error_of(qmp: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as e:
        await qmp.execute(cmd, args)
    return e.value.error_class, str(e.value)


async def next_events(qmp: QMPClient, n: int) -> list[dict[str, Any]]:
    return [dict(await asyncio.wait_for(qmp.events.get(), 10)) for _ in range(n)]


def test_greeting_negotiation_and_socket_mode(vmm: Vmm) -> None:
    assert stat.S_IMODE(os.stat(vmm.path).st_mode) == 0o600

    async def go() -> None:
        qmp = await client(vmm.path, negotiate=False)
        greeting = qmp.greeting
        assert greeting is not None
        assert greeting.QMP.version["qemu"] == {"micro": 0, "minor": 0, "major": 10}
        assert greeting.QMP.version["package"].startswith("cprfast ")
        assert greeting.QMP.capabilities == []
        assert await error_of(qmp, "query-status") == (
            "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
        assert await error_of(qmp, "qmp_capabilities", {"enable": ["oob"]}) == (
            "GenericError", "Parameter 'enable' does not accept value 'oob'"
        )
        assert await qmp.execute("qmp_capabilities") == {}
        assert await error_of(qmp, "qmp_capabilities") == (
            "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
        )
        assert await qmp.execute("query-status") == {"running": True, "status": "running"}
        # the id is echoed verbatim, whatever JSON it is
        reply = await qmp._raw({"execute": "query-status", "id": "my-id"}, assign_id=False)
        assert reply["id"] == "my-id" and reply["return"]["status"] == "running"
        await qmp.disconnect()

    asyncio.run(go())


def test_every_builtin_command(vmm: Vmm) -> None:
    async def go() -> None:
        qmp = await client(vmm.path)
        names = {c["name"] for c in await qmp.execute("query-commands")}  # type: ignore[union-attr]
        assert names >= {
            "qmp_capabilities", "migrate-set-parameters", "query-migrate-parameters", "migrate-set-capabilities",
            "query-migrate-capabilities", "migrate", "migrate-incoming", "migrate_cancel", "query-migrate",
            "query-status", "stop", "cont", "quit", "query-commands",
        }  # fmt: skip
        assert await qmp.execute("migrate-set-parameters", {"downtime-limit": 500, "mode": "cpr-reboot"}) == {}
        params = await qmp.execute("query-migrate-parameters")
        assert isinstance(params, dict) and params["downtime-limit"] == 500 and params["mode"] == "cpr-reboot"
        caps = [{"capability": "events", "state": True}, {"capability": "x-ignore-shared", "state": True}]
        assert await qmp.execute("migrate-set-capabilities", {"capabilities": caps}) == {}
        got = {c["capability"]: c["state"] for c in await qmp.execute("query-migrate-capabilities")}  # type: ignore[union-attr]
        assert got["events"] and got["x-ignore-shared"] and not got["postcopy-ram"]
        assert await qmp.execute("query-migrate") == {}
        assert await qmp.execute("migrate_cancel") == {}  # nothing to cancel: fine, like QEMU
        assert await qmp.execute("stop") == {}
        assert await qmp.execute("query-status") == {"running": False, "status": "paused"}
        assert (await next_events(qmp, 1))[0]["event"] == "STOP"
        assert await qmp.execute("cont") == {}
        assert await qmp.execute("query-status") == {"running": True, "status": "running"}
        assert (await next_events(qmp, 1))[0]["event"] == "RESUME"
        assert vmm.hooks.calls == [("stop", RunState.PAUSED), ("start", RunState.RUNNING)]
        await qmp.disconnect()

    asyncio.run(go())


def test_errors(vmm: Vmm) -> None:
    async def go() -> None:
        qmp = await client(vmm.path)
        cases: list[tuple[str, dict[str, Any] | None, str, str]] = [
            ("no-such-command", None, "CommandNotFound", "The command no-such-command has not been found"),
            ("query-status", {"verbose": True}, "GenericError", "Parameter 'verbose' is unexpected"),
            ("migrate-set-capabilities", {}, "GenericError", "Parameter 'capabilities' is missing"),
            ("migrate-set-parameters", {"downtime-limit": 2000001}, "GenericError",
             "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms"),
            ("migrate-set-parameters", {"bogus": 1}, "GenericError", "Parameter 'bogus' is unexpected"),
            ("migrate", {}, "GenericError", "need either 'uri' or 'channels' argument"),
            ("migrate", {"uri": 5}, "GenericError", "Invalid parameter type for 'uri', expected: string"),
            ("migrate", {"channels": {}}, "GenericError", "Invalid parameter type for 'channels', expected: array"),
            ("migrate", {"uri": "unix:/x", "detach": "yes"}, "GenericError",
             "Invalid parameter type for 'detach', expected: boolean"),
            ("migrate", {"uri": "unix:/x", "resume": True}, "GenericError",
             "cprfast does not implement postcopy recovery ('resume')"),
            ("migrate", {"uri": "unix:/x", "blk": True}, "GenericError", "Parameter 'blk' is unexpected"),
            ("migrate", {"uri": "unix:/x"}, "GenericError", "no migration driver is registered for mode normal"),
            ("migrate-incoming", {"uri": "unix:/x"}, "GenericError",
             "'-incoming' was not specified on the command line"),
            ("migrate-incoming", {"uri": 1}, "GenericError", "Invalid parameter type for 'uri', expected: string"),
            ("migrate-incoming", {"channels": "x"}, "GenericError",
             "Invalid parameter type for 'channels', expected: array"),
        ]  # fmt: skip
        for cmd, args, cls, desc in cases:
            assert await error_of(qmp, cmd, args) == (cls, desc), cmd
        raw = [
            ({"arguments": {}, "id": "a"}, "QMP input lacks member 'execute'"),
            ({"execute": 1, "id": "b"}, "QMP input member 'execute' must be a string"),
            ({"execute": "query-status", "arguments": [], "id": "c"}, "QMP input member 'arguments' must be an object"),
            ({"execute": "query-status", "foo": 1, "id": "d"}, "QMP input member 'foo' is unexpected"),
            ({"exec-oob": "query-status", "id": "e"}, "QMP input member 'exec-oob' is unexpected"),
        ]
        for msg, desc in raw:
            reply = await qmp._raw(msg, assign_id=False)
            assert reply["id"] == msg["id"]
            assert reply["error"] == {"class": "GenericError", "desc": desc}
        await qmp.disconnect()

    asyncio.run(go())


def test_malformed_bytes_on_the_wire(vmm: Vmm) -> None:
    """What qemu.qmp cannot send: broken JSON, non-objects. The session survives them."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(vmm.path))
        f = s.makefile("rwb")
        greeting = json.loads(f.readline())
        assert greeting["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 0, "major": 10}

        def send(line: bytes) -> dict[str, Any]:
            f.write(line + b"\n")
            f.flush()
            reply: dict[str, Any] = json.loads(f.readline())
            return reply

        assert send(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        bad = send(b'{"execute": ]')
        assert bad["error"]["class"] == "GenericError" and bad["error"]["desc"].startswith("JSON parse error, ")
        assert send(b"[1, 2]") == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        assert send(b"42") == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        assert send(b"\xff\xfe")["error"]["desc"].startswith("JSON parse error, ")
        assert send(b'{"execute": "query-status"}') == {"return": {"running": True, "status": "running"}}
        # no framing needed: objects back to back, one split across writes, braces inside strings
        f.write(b'{"execute": "query-status", "id": "}{"}{"execute": "query-st')
        f.flush()
        f.write(b'atus", "id": "x\\"{"}')
        f.flush()
        assert json.loads(f.readline()) == {"return": {"running": True, "status": "running"}, "id": "}{"}
        assert json.loads(f.readline()) == {"return": {"running": True, "status": "running"}, "id": 'x"{'}
        # any JSON id is echoed verbatim (qemu.qmp itself only sends strings)
        assert send(b'{"execute": "query-status", "id": [42, {"a": null}]}')["id"] == [42, {"a": None}]


def test_custom_commands(vmm: Vmm) -> None:
    def x_query_guest(args: dict[str, Any]) -> object:
        check_args(args, optional=("verbose",))
        return {"heartbeat": 7, "verbose": args.get("verbose", False)}

    async def x_async(args: dict[str, Any]) -> object:
        await asyncio.sleep(0)
        return [1, 2]

    def x_refuse(args: dict[str, Any]) -> None:
        raise QMPError("Device 'nic0' not found", "DeviceNotFound")

    def x_cpr_error(args: dict[str, Any]) -> None:
        raise MigrationError("guest not ready")

    def x_bug(args: dict[str, Any]) -> None:
        raise ZeroDivisionError("division by zero")

    for name, handler in [("x-query-guest", x_query_guest), ("x-async", x_async), ("x-refuse", x_refuse),
                          ("x-cpr-error", x_cpr_error), ("x-bug", x_bug)]:  # fmt: skip
        vmm.server.register_command(name, handler)
    vmm.server.register_command("x-inline", lambda a: "fast", blocking=False)
    with pytest.raises(ValueError, match="already registered"):
        vmm.server.register_command("migrate", x_bug)

    async def go() -> None:
        qmp = await client(vmm.path)
        assert await qmp.execute("x-query-guest", {"verbose": True}) == {"heartbeat": 7, "verbose": True}
        assert await qmp.execute("x-async") == [1, 2]
        assert await qmp.execute("x-inline") == "fast"
        assert await error_of(qmp, "x-query-guest", {"v": 1}) == ("GenericError", "Parameter 'v' is unexpected")
        assert await error_of(qmp, "x-refuse") == ("DeviceNotFound", "Device 'nic0' not found")
        assert await error_of(qmp, "x-cpr-error") == ("GenericError", "guest not ready")
        assert await error_of(qmp, "x-bug") == ("GenericError", "x-bug: internal error: division by zero")
        names = {c["name"] for c in await qmp.execute("query-commands")}  # type: ignore[union-attr]
        assert {"x-query-guest", "x-async", "x-inline"} <= names
        await qmp.disconnect()

    asyncio.run(go())


def migration_events(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


def test_migration_events_success(vmm: Vmm) -> None:
    vmm.ms.register_mode_driver(MigMode.CPR_TRANSFER, OkDriver())

    async def go() -> None:
        qmp = await client(vmm.path)
        await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        await qmp.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
        assert await qmp.execute("migrate", {"channels": CPR_CHANNELS}) == {}
        events = await next_events(qmp, 5)
        assert [e["event"] for e in events] == ["MIGRATION", "STOP", "MIGRATION", "MIGRATION", "MIGRATION"]
        assert migration_events(events) == ["setup", "active", "device", "completed"]
        for e in events:
            ts = e["timestamp"]
            assert isinstance(ts["seconds"], int) and 0 <= ts["microseconds"] < 1_000_000
        q = await qmp.execute("query-migrate")
        assert isinstance(q, dict) and q["status"] == "completed" and "downtime" in q
        assert await qmp.execute("query-status") == {"running": False, "status": "postmigrate"}
        assert await error_of(qmp, "migrate", {"channels": CPR_CHANNELS}) == (
            "GenericError", "Can't migrate the vm that was paused due to previous migration"
        )
        await qmp.disconnect()

    asyncio.run(go())


def test_migration_events_failure_cancel_and_veto(vmm: Vmm) -> None:
    failing, blocking = FailingDriver("connect to /tmp/cprfast-m.sock: Connection refused"), BlockingDriver()

    async def go() -> None:
        qmp = await client(vmm.path)
        await qmp.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
        # events off: no MIGRATION events, only STOP/RESUME
        vmm.ms.register_mode_driver(MigMode.CPR_TRANSFER, failing)
        await qmp.execute("migrate", {"channels": CPR_CHANNELS})
        assert [e["event"] for e in await next_events(qmp, 2)] == ["STOP", "RESUME"]
        await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        # failure: the error shows in query-migrate; the guest runs again
        await qmp.execute("migrate", {"channels": CPR_CHANNELS})
        events = await next_events(qmp, 4)
        assert [e["event"] for e in events] == ["MIGRATION", "STOP", "RESUME", "MIGRATION"]
        assert migration_events(events) == ["setup", "failed"]
        assert await qmp.execute("query-migrate") == {
            "status": "failed", "error-desc": "connect to /tmp/cprfast-m.sock: Connection refused",
        }  # fmt: skip
        assert await qmp.execute("query-status") == {"running": True, "status": "running"}
        # cancel while the driver waits (for the target's HUP)
        vmm.ms.register_mode_driver(MigMode.CPR_TRANSFER, blocking)
        await qmp.execute("migrate", {"channels": CPR_CHANNELS})
        assert await asyncio.to_thread(blocking.started.wait, 10)
        assert await error_of(qmp, "cont") == ("GenericError", "Migration is not finalized yet")
        assert await error_of(qmp, "migrate-set-capabilities", {"capabilities": []}) == (
            "GenericError", "There's a migration process in progress"
        )
        await qmp.execute("migrate_cancel")
        events = await next_events(qmp, 5)
        assert migration_events(events) == ["setup", "cancelling", "cancelled"]
        assert [e["event"] for e in events if e["event"] != "MIGRATION"] == ["STOP", "RESUME"]
        assert await qmp.execute("query-migrate") == {"status": "cancelled"}
        # a SETUP notifier veto is the migrate command's own error
        vmm.ms.notifiers.add(lambda ev, m: "vhost-user backend refuses", modes={MigMode.CPR_TRANSFER})
        assert await error_of(qmp, "migrate", {"channels": CPR_CHANNELS}) == (
            "GenericError", "vhost-user backend refuses"
        )
        assert migration_events(await next_events(qmp, 4)) == ["setup", "failed"]
        assert await qmp.execute("query-status") == {"running": True, "status": "running"}
        await qmp.disconnect()

    asyncio.run(go())


def test_incoming_over_qmp(tmp_path: Path) -> None:
    v = Vmm(tmp_path / "in.sock", incoming=True)
    v.ms.register_incoming_driver(MigMode.NORMAL, IncomingOk(RunState.RUNNING))
    v.server.start_in_thread()
    try:

        async def go() -> None:
            qmp = await client(v.path)
            await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            assert await qmp.execute("query-status") == {"running": False, "status": "inmigrate"}
            await qmp.execute("migrate-incoming", {"uri": "unix:/tmp/cprfast-in.sock"})
            events = await next_events(qmp, 4)
            assert migration_events(events) == ["setup", "active", "completed"]
            assert "RESUME" in [e["event"] for e in events]
            assert await qmp.execute("query-status") == {"running": True, "status": "running"}
            assert await error_of(qmp, "migrate-incoming", {"uri": "unix:/x"}) == (
                "GenericError", "'-incoming' was not specified on the command line"
            )
            await qmp.disconnect()

        asyncio.run(go())
    finally:
        v.server.stop_thread()


def test_quit_and_same_loop_embedding(tmp_path: Path) -> None:
    """The server also runs inside the caller's own event loop; quit ends serve_forever."""
    v = Vmm(tmp_path / "q.sock")

    async def go() -> None:
        serving = asyncio.create_task(v.server.serve_forever())
        while not v.path.exists():
            await asyncio.sleep(0.01)
        qmp = await client(v.path)
        assert await qmp.execute("quit") == {}
        await asyncio.wait_for(serving, 10)
        with contextlib.suppress(EOFError):  # the server hung up after replying, as QEMU does
            await qmp.disconnect()

    asyncio.run(go())
    assert v.quit_called.is_set()
    assert not v.path.exists()


def test_stale_socket_is_replaced_and_bind_errors_surface(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # a leftover socket file from a dead VMM
    v = Vmm(path)
    v.server.start_in_thread()
    v.server.stop_thread()
    bad = Vmm(tmp_path / "no-such-dir" / "x.sock")
    with pytest.raises(FileNotFoundError):
        bad.server.start_in_thread()


def test_oversized_message_is_refused(vmm: Vmm, monkeypatch: pytest.MonkeyPatch) -> None:
    import cprfast.qmp

    monkeypatch.setattr(cprfast.qmp, "_MAX_MESSAGE", 4096)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(vmm.path))
        f = s.makefile("rwb")
        json.loads(f.readline())
        f.write(b'{"execute": "qmp_capabilities", "arguments": {"x": "' + b"a" * 8192)
        f.flush()
        reply = json.loads(f.readline())
        assert reply == {"error": {"class": "GenericError", "desc": "JSON parse error, message too long"}}
        assert f.readline() == b""  # and the server hangs up
