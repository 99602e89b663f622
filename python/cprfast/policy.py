"""Migration parameters, capabilities, mode rules and blockers, with QEMU's names and texts.

Parameters and capabilities are set and read in QMP's shape (dashed names).
Values are checked the way QEMU's QAPI visitor and ``migrate_params_check``
check them, with the same error texts, so scripts written for QEMU read the same
messages here. The mode rules follow ``migrate_prepare``'s order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cprfast.errors import MigrationBlockedError, MigrationError
from cprfast.status import MigMode, MigrationStatus, RunState

if TYPE_CHECKING:
    from cprfast.channels import ChannelType, MigrationAddress

__all__ = [
    "Blocker",
    "Blockers",
    "MigMode",
    "MigrationCapabilities",
    "MigrationParameters",
    "RAM_BLOCKER_MODES",
    "check_channels",
    "check_prepare",
    "ram_blocker_needed",
]

MAX_MIGRATE_DOWNTIME_MS = 2000 * 1000
MAX_THROTTLE = 128 << 20
SIZE_MAX = (1 << 64) - 1
_INT_LIMITS = {"uint8_t": (0, 0xFF), "uint32": (0, 0xFFFFFFFF), "uint64": (0, SIZE_MAX), "size": (0, SIZE_MAX)}


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class _Param:
    kind: str  # "uint8_t", "uint32", "uint64", "size", "bool", "mode", "strlist"
    default: object


_PARAMS: dict[str, _Param] = {
    "mode": _Param("mode", MigMode.NORMAL),
    "cpr-exec-command": _Param("strlist", ()),
    "downtime-limit": _Param("uint64", 300),
    "max-bandwidth": _Param("size", MAX_THROTTLE),
    "avail-switchover-bandwidth": _Param("size", 0),
    "max-postcopy-bandwidth": _Param("size", 0),
    "multifd-channels": _Param("uint8_t", 2),
    "throttle-trigger-threshold": _Param("uint8_t", 50),
    "cpu-throttle-initial": _Param("uint8_t", 20),
    "cpu-throttle-increment": _Param("uint8_t", 10),
    "cpu-throttle-tailslow": _Param("bool", False),
    "max-cpu-throttle": _Param("uint8_t", 99),
    "x-checkpoint-delay": _Param("uint32", 20000),
    "x-vcpu-dirty-limit-period": _Param("uint64", 1000),
    "vcpu-dirty-limit": _Param("uint64", 1),
}


def _visit(name: str, kind: str, value: object) -> object:
    """QAPI input-visitor type checks, with its texts."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise MigrationError(f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if kind == "mode":
        if not isinstance(value, str):
            raise MigrationError(f"Invalid parameter type for '{name}', expected: string")
        try:
            return MigMode(value)
        except ValueError:
            raise MigrationError(f"Parameter '{name}' does not accept value '{value}'") from None
    if kind == "strlist":
        if not isinstance(value, list | tuple):
            raise MigrationError(f"Invalid parameter type for '{name}', expected: array")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise MigrationError(f"Invalid parameter type for '{name}[{i}]', expected: string")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MigrationError(f"Invalid parameter type for '{name}', expected: integer")
    lo, hi = _INT_LIMITS[kind]
    if not lo <= value <= hi:
        raise MigrationError(f"Parameter '{name}' expects {kind}")
    return value


def _expects(name: str, what: str) -> MigrationError:
    return MigrationError(f"Parameter '{name}' expects {what}")


def _check_params(p: Mapping[str, object]) -> None:
    """QEMU's ``migrate_params_check``, in its order and with its texts."""

    def num(key: str) -> int:
        v = p[key]
        assert isinstance(v, int)
        return v

    if not 1 <= num("throttle-trigger-threshold") <= 100:
        raise _expects("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= num("cpu-throttle-initial") <= 99:
        raise _expects("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= num("cpu-throttle-increment") <= 99:
        raise _expects("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if num("downtime-limit") > MAX_MIGRATE_DOWNTIME_MS:
        raise _expects("downtime_limit", f"an integer in the range of 0 to {MAX_MIGRATE_DOWNTIME_MS} ms")
    if num("multifd-channels") < 1:
        raise _expects("multifd_channels", "a value between 1 and 255")
    if not num("cpu-throttle-initial") <= num("max-cpu-throttle") <= 99:
        raise _expects("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if not 1 <= num("x-vcpu-dirty-limit-period") <= 1000:
        raise _expects("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if num("vcpu-dirty-limit") < 1:
        raise MigrationError("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s")


class MigrationParameters:
    """``migrate-set-parameters`` / ``query-migrate-parameters`` state (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, object] = {k: v.default for k, v in _PARAMS.items()}

    def set(self, changes: Mapping[str, object]) -> None:
        """Apply ``changes`` (dashed names) all together, or none of them if any is invalid."""
        with self._lock:
            new = dict(self._values)
            for name, value in changes.items():
                spec = _PARAMS.get(name)
                if spec is None:
                    raise MigrationError(f"Parameter '{name}' is unexpected")
                new[name] = _visit(name, spec.kind, value)
            _check_params(new)
            self._values = new

    def query(self) -> dict[str, object]:
        """Every parameter, QMP-shaped (lists as lists, the mode as its string)."""
        with self._lock:
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._values.items()}

    def __getitem__(self, name: str) -> object:
        with self._lock:
            return self._values[name]

    @property
    def mode(self) -> MigMode:
        """The ``mode`` parameter."""
        mode = self["mode"]
        assert isinstance(mode, MigMode)
        return mode

    @property
    def cpr_exec_command(self) -> list[str]:
        """The ``cpr-exec-command`` argv (no shell)."""
        cmd = self["cpr-exec-command"]
        assert isinstance(cmd, tuple)
        return list(cmd)

    def int(self, name: str) -> int:
        """An integer parameter such as ``downtime-limit`` (ms) or ``max-bandwidth`` (bytes/s)."""
        value = self[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise KeyError(f"{name} is not an integer parameter")
        return value


# --------------------------------------------------------------------------- capabilities

#: QEMU 10's migration capabilities, in QAPI order. cprfast records all of them
#: so QEMU scripts work unchanged; the drivers honour events, x-ignore-shared,
#: mapped-ram, auto-converge and pause-before-switchover. Postcopy, background
#: snapshot and COLO are refused at ``migrate`` time (see :func:`check_prepare`).
CAPABILITIES: tuple[str, ...] = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
)

_BG_SNAPSHOT_CONFLICTS = (
    "postcopy-ram",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "return-path",
    "multifd",
    "pause-before-switchover",
    "auto-converge",
    "release-ram",
    "rdma-pin-all",
    "xbzrle",
    "x-colo",
    "validate-uuid",
    "zero-copy-send",
)


def _check_caps(c: Mapping[str, bool]) -> None:
    """QEMU's ``migrate_caps_check`` for the combinations that matter here, with its texts."""
    if c["postcopy-ram"]:
        if c["x-ignore-shared"]:
            raise MigrationError("Postcopy is not compatible with ignore-shared")
        if c["multifd"]:
            raise MigrationError("Postcopy is not yet compatible with multifd")
    if c["background-snapshot"]:
        for other in _BG_SNAPSHOT_CONFLICTS:
            if c[other]:
                raise MigrationError(f"Background-snapshot is not compatible with {other}")
    if c["zero-copy-send"] and (not c["multifd"] or c["xbzrle"]):
        raise MigrationError("Zero copy only available for non-compressed non-TLS multifd migration")
    if c["postcopy-preempt"] and not c["postcopy-ram"]:
        raise MigrationError("Postcopy preempt requires postcopy-ram")
    if c["switchover-ack"] and not c["return-path"]:
        raise MigrationError("Capability 'switchover-ack' requires capability 'return-path'")
    if c["dirty-limit"] and c["auto-converge"]:
        raise MigrationError("dirty-limit conflicts with auto-converge either of then available currently")
    if c["multifd"] and c["xbzrle"]:
        raise MigrationError("Multifd is not compatible with xbzrle")
    if c["mapped-ram"]:
        if c["xbzrle"]:
            raise MigrationError("Mapped-ram migration is incompatible with xbzrle")
        if c["postcopy-ram"]:
            raise MigrationError("Mapped-ram migration is incompatible with postcopy")


class MigrationCapabilities:
    """``migrate-set-capabilities`` / ``query-migrate-capabilities`` state (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._caps: dict[str, bool] = dict.fromkeys(CAPABILITIES, False)

    def set(self, capabilities: object) -> None:
        """Apply a QMP list ``[{"capability": name, "state": bool}, ...]`` all together, or not at all."""
        if not isinstance(capabilities, list):
            raise MigrationError("Invalid parameter type for 'capabilities', expected: array")
        with self._lock:
            new = dict(self._caps)
            for i, entry in enumerate(capabilities):
                where = f"capabilities[{i}]"
                if not isinstance(entry, dict):
                    raise MigrationError(f"Invalid parameter type for '{where}', expected: object")
                for key in entry:
                    if key not in ("capability", "state"):
                        raise MigrationError(f"Parameter '{where}.{key}' is unexpected")
                if "capability" not in entry:
                    raise MigrationError(f"Parameter '{where}.capability' is missing")
                if "state" not in entry:
                    raise MigrationError(f"Parameter '{where}.state' is missing")
                name, state = entry["capability"], entry["state"]
                if not isinstance(name, str):
                    raise MigrationError(f"Invalid parameter type for '{where}.capability', expected: string")
                if name not in new:
                    raise MigrationError(f"Parameter '{where}.capability' does not accept value '{name}'")
                if not isinstance(state, bool):
                    raise MigrationError(f"Invalid parameter type for '{where}.state', expected: boolean")
                new[name] = state
            _check_caps(new)
            self._caps = new

    def query(self) -> list[dict[str, object]]:
        """Every capability in QAPI order, QMP-shaped."""
        with self._lock:
            return [{"capability": k, "state": v} for k, v in self._caps.items()]

    def __getitem__(self, name: str) -> bool:
        with self._lock:
            return self._caps[name]


# --------------------------------------------------------------------------- blockers


@dataclass(frozen=True, eq=False)
class Blocker:
    """A registered reason why some modes may not migrate; pass it to :meth:`Blockers.remove`."""

    reason: str
    modes: frozenset[MigMode]


#: Modes that RAM which is not a shareable memfd blocks. QEMU's RAM blocker
#: covers only cpr-transfer, yet cpr-exec skips RAM just the same (it expects the
#: RAM to survive exec in place), so volatile RAM would be lost silently. We block both.
RAM_BLOCKER_MODES: frozenset[MigMode] = frozenset({MigMode.CPR_TRANSFER, MigMode.CPR_EXEC})


def ram_blocker_needed(is_memfd_shared: bool) -> bool:
    """Whether a RAM region must register a blocker for :data:`RAM_BLOCKER_MODES`.

    Only a shared memfd survives a CPR hand-over in place; anything else
    (anonymous or private memory) would be lost by cpr-transfer and cpr-exec.
    """
    return not is_memfd_shared


class Blockers:
    """Migration blockers per mode (QEMU's ``migrate_add_blocker_modes``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blockers: list[Blocker] = []

    def add(self, reason: str, modes: Iterable[MigMode] = tuple(MigMode)) -> Blocker:
        """Block ``modes`` (default: all) with ``reason``, the text ``migrate`` will fail with."""
        blocker = Blocker(reason, frozenset(modes))
        if not blocker.modes:
            raise ValueError("a blocker needs at least one migration mode")
        with self._lock:
            self._blockers.append(blocker)
        return blocker

    def add_ram(self, name: str, is_memfd_shared: bool) -> Blocker | None:
        """Register the RAM blocker for region ``name`` if it cannot be preserved; None if it can."""
        if not ram_blocker_needed(is_memfd_shared):
            return None
        return self.add(
            f"Memory region {name} is not compatible with CPR: it must be a shared memfd",
            RAM_BLOCKER_MODES,
        )

    def remove(self, blocker: Blocker) -> None:
        """Drop ``blocker`` (a no-op if it was already removed)."""
        with self._lock:
            if blocker in self._blockers:
                self._blockers.remove(blocker)

    def check(self, mode: MigMode) -> None:
        """Raise :class:`MigrationBlockedError` with the first blocker's reason for ``mode``."""
        with self._lock:
            for blocker in self._blockers:
                if mode in blocker.modes:
                    raise MigrationBlockedError(blocker.reason)


# --------------------------------------------------------------------------- mode rules


def check_prepare(
    *,
    status: MigrationStatus,
    run_state: RunState,
    incoming: bool,
    params: MigrationParameters,
    caps: MigrationCapabilities,
    blockers: Blockers,
) -> None:
    """QEMU's ``migrate_prepare`` checks, in its order and with its texts."""
    if status.is_running:
        raise MigrationError("There's a migration process in progress")
    if incoming or run_state is RunState.INMIGRATE:
        raise MigrationError("Guest is waiting for an incoming migration")
    if run_state is RunState.POSTMIGRATE:
        raise MigrationError("Can't migrate the vm that was paused due to previous migration")
    mode = params.mode
    if mode is MigMode.CPR_EXEC and not params.cpr_exec_command:
        raise MigrationError("cpr-exec mode requires setting cpr-exec-command")
    blockers.check(mode)
    for cap, what in (("postcopy-ram", "postcopy"), ("background-snapshot", "background snapshot"), ("x-colo", "COLO")):
        if caps[cap]:
            if mode.is_cpr:
                raise MigrationError(f"Cannot use {what} with CPR")
            # Not QEMU: these are recorded for compatibility but not implemented.
            raise MigrationError(f"cprfast does not implement {what} migration")


def check_channels(mode: MigMode, channels: Mapping[ChannelType, MigrationAddress]) -> None:
    """Per-mode rules on the main and cpr channels (after :func:`check_prepare`)."""
    from cprfast import channels as ch

    main = channels.get(ch.ChannelType.MAIN)
    if main is None:
        raise MigrationError("Channel list has no main entry")
    cpr = channels.get(ch.ChannelType.CPR)
    if mode is MigMode.CPR_TRANSFER:
        if cpr is None:
            raise MigrationError("missing 'cpr' migration channel")
        if not isinstance(cpr, ch.UnixAddress):
            raise MigrationError("bad cpr channel address; must be unix")
        if not main.streamable:
            raise MigrationError("Migration requires streamable transport (eg unix)")
    elif cpr is not None:
        # QEMU ignores a cpr channel outside cpr-transfer; a mistyped mode is likelier.
        raise MigrationError(f"a 'cpr' migration channel is only used in cpr-transfer mode, not {mode}")
    if mode is MigMode.CPR_EXEC and not isinstance(main, ch.FileAddress):
        raise MigrationError(
            "cpr-exec mode requires a file: main channel (the data must be complete before exec), "
            f"not {main.uri}"
        )
    if mode is MigMode.CPR_REBOOT and not isinstance(main, ch.FileAddress | ch.ExecAddress):
        raise MigrationError(f"cpr-reboot mode requires a file: or exec: main channel, not {main.uri}")
