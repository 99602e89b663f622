"""``cprfast-vmm``: the reference VMM's QEMU-like command line and start-up.

    cprfast-vmm -m 1G [--guest kvm|threads|auto] [--hot 64M] [--vcpu-cpus 1]
                [--switchover-priority 1] [-qmp unix:PATH,server=on,wait=off] [-incoming CHANNEL]...

``-incoming`` takes a URI, a QEMU JSON channel (``{"channel-type": "cpr", ...}``)
or ``defer``, and may be repeated (a main and a cpr channel). Start-up follows
QEMU: incoming CPR state is loaded before any device exists. A live-updated
guest resumes before the migration machinery and the QMP server are even
imported, so the pause holds only what the guest needs to run.

``--vcpu-cpus`` pins the guest's thread to those CPUs and the rest of the VMM to
the others (libvirt's ``vcpupin`` and ``emulatorpin``): the VMM's own work, a
migration above all, then no longer preempts the guest. ``--switchover-priority``
runs the threads that stop, hand over and resume the guest in a CPR mode at that
``SCHED_FIFO`` priority while they do (:mod:`cprfast.realtime`), so a busy host
does not keep the paused guest waiting; it needs ``CAP_SYS_NICE``.

Parsing is by hand (no argparse, no dataclasses): this runs on a cpr-exec
successor's pause path, which imports nothing it can do without.
"""

from __future__ import annotations

import sys

from cprfast.errors import CprError

USAGE = (
    "usage: cprfast-vmm -m SIZE [--guest kvm|threads|auto] [--hot SIZE] [--vcpu-cpus LIST] "
    "[--switchover-priority 1..99] [-qmp unix:PATH,server=on,wait=off] [-incoming CHANNEL]..."
)
_UNITS = {"": 1 << 20, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_RAM = 16 << 30


class UsageError(CprError):
    """A bad command line."""


def parse_size(text: str, what: str) -> int:
    """QEMU's ``-m`` sizes: a number with an optional B/K/M/G/T suffix; no suffix means MiB."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    number = text[: len(text) - len(unit)]
    if unit not in _UNITS or not number.isdigit():
        raise UsageError(f"{what}: bad size {text!r} (e.g. 512M, 1G)")
    return int(number) * _UNITS[unit]


def parse_qmp(spec: str) -> str:
    """``unix:PATH,server=on,wait=off`` -> PATH (we always listen and never wait for a client)."""
    if not spec.startswith("unix:"):
        raise UsageError(f"-qmp: only unix: sockets are supported, not {spec!r}")
    path, *opts = spec[5:].split(",")
    for opt in opts:
        key, _, value = opt.partition("=")
        if (key, value) in (("server", "on"), ("server", ""), ("wait", "off"), ("nowait", "")):
            continue
        raise UsageError(f"-qmp: unsupported option {opt!r} (server=on,wait=off is what this VMM does)")
    if not path:
        raise UsageError("-qmp: empty socket path")
    return path


def parse_cpus(text: str) -> tuple[int, ...]:
    """A CPU list as taskset/libvirt write it: ``3``, ``0,2``, ``1-3``."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise UsageError(f"--vcpu-cpus: bad CPU list {text!r} (e.g. 1, 0,2 or 1-3)")
        cpus.update(range(int(first), int(last if dash else first) + 1))
    if not cpus:
        raise UsageError(f"--vcpu-cpus: empty CPU list {text!r}")
    return tuple(sorted(cpus))


def pin_emulator(vcpu_cpus: tuple[int, ...]) -> None:
    """Keep this thread (and every thread it starts later) off the vCPU's CPUs, if any are left."""
    import os

    rest = os.sched_getaffinity(0) - set(vcpu_cpus)
    if rest:
        os.sched_setaffinity(0, rest)


class Config:
    """A parsed command line."""

    def __init__(self) -> None:
        self.ram_size = 128 << 20
        self.hot_size = 64 << 20
        self.guest = "auto"
        self.qmp: str | None = None
        self.incoming: list[str] = []
        self.vcpu_cpus: tuple[int, ...] | None = None
        self.switchover_priority: int | None = None


def parse_args(argv: list[str]) -> Config:
    """Parse the command line (QEMU's single-dash options, plus ``--guest`` and ``--hot``)."""
    cfg = Config()
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            raise UsageError(USAGE)
        opt = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if opt not in ("-m", "-qmp", "-incoming", "--guest", "--hot", "--vcpu-cpus", "--switchover-priority"):
            raise UsageError(f"unknown option {arg!r}\n{USAGE}")
        if arg.startswith("--") and "=" in arg:
            value = arg.split("=", 1)[1]
        else:
            following = next(args, None)
            if following is None:
                raise UsageError(f"{opt} needs a value\n{USAGE}")
            value = following
        if opt == "-m":
            cfg.ram_size = parse_size(value, "-m")
            if not 2 << 20 <= cfg.ram_size <= MAX_RAM:
                raise UsageError(f"-m: guest RAM must be between 2M and 16G, not {value}")
        elif opt == "--hot":
            cfg.hot_size = parse_size(value, "--hot")
        elif opt == "--guest":
            if value not in ("kvm", "threads", "auto"):
                raise UsageError(f"--guest must be kvm, threads or auto, not {value!r}")
            cfg.guest = value
        elif opt == "-qmp":
            cfg.qmp = parse_qmp(value)
        elif opt == "--vcpu-cpus":
            cfg.vcpu_cpus = parse_cpus(value)
        elif opt == "--switchover-priority":
            if not value.isdigit() or not 1 <= int(value) <= 99:
                raise UsageError(f"--switchover-priority: a SCHED_FIFO priority 1..99, not {value!r}")
            cfg.switchover_priority = int(value)
        else:
            cfg.incoming.append(value)
    return cfg


_LEAN_ENTRY = (
    "import time;t=time.monotonic_ns();import sys;sys.path.insert(0,{root!r});"
    "from cprfast.vmm.cli import main;sys.exit(main(started_ns=t,deferred_site=True))"
)


def command(*args: str) -> list[str]:
    """The quickest-starting command line of this VMM with ``args``: a cpr-exec successor's ``cpr-exec-command``.

    ``python -S -c`` instead of ``python -m cprfast.vmm``: neither the
    site-packages scan (``.pth`` files) nor ``runpy`` run before the guest
    resumes; the package directory goes on ``sys.path`` by hand, and ``site``
    runs once the machine is up, so the rest of the program sees the usual path.
    """
    import os

    import cprfast

    root = os.path.dirname(os.path.dirname(os.path.abspath(cprfast.__file__)))
    return [sys.executable, "-S", "-c", _LEAN_ENTRY.format(root=root), *args]


def main(argv: list[str] | None = None, *, started_ns: int | None = None, deferred_site: bool = False) -> int:
    """Run the reference VMM until QMP ``quit``; returns the exit status.

    ``started_ns`` (CLOCK_MONOTONIC) is when the program began, the ``main`` mark of the timeline.
    ``deferred_site``: started by :func:`command` (``python -S``), so ``site`` runs after the launch.
    No garbage collection runs until the machine is launched: a cpr-exec successor's guest is
    paused until then, and a collection over the freshly imported modules would lengthen that.
    """
    import gc

    gc.disable()
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        from cprfast.vmm import fault

        fault.arm()
        if cfg.vcpu_cpus is not None:
            pin_emulator(cfg.vcpu_cpus)
        from cprfast.vmm.launch import launch

        machine = launch(cfg, started_ns=started_ns)
    except (CprError, OSError, ValueError) as e:
        sys.stderr.write(f"cprfast-vmm: {e}\n")
        return 1
    finally:
        gc.enable()
    if deferred_site:
        import site

        site.main()
    try:
        if machine.qmp is not None:
            import asyncio

            asyncio.run(machine.qmp.serve_forever())
        else:
            import threading

            threading.Event().wait()  # no monitor: run until killed
    except KeyboardInterrupt:
        pass
    finally:
        machine.close()
    return 0
