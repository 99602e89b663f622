"""The ``cprfast`` command: ``info``, ``demo``, ``soak`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand; return the exit status."""
    parser = argparse.ArgumentParser(prog="cprfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="report what this kernel offers, and why not when it does not")
    info.add_argument("--json", action="store_true", help="print the probe results as JSON")
    demo = sub.add_parser("demo", help="live-update the reference VMM through every mode, observed from outside")
    demo.add_argument("--mem", default="1G", help="guest RAM (e.g. 512M, 1G, 16G; default 1G)")
    demo.add_argument("--hot", default="64M", help="the working set the guest keeps dirtying (default 64M)")
    demo.add_argument("--modes", help="comma-separated, in order (default cpr-transfer,cpr-exec,cpr-reboot,normal)")
    demo.add_argument("--guest", choices=("auto", "kvm", "threads"), default="auto", help="guest kind (default auto)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    soak = sub.add_parser("soak", help="live-update the reference VMM many times in a row; fail if anything grows")
    soak.add_argument("--updates", type=int, default=1000, help="updates to run (default 1000)")
    soak.add_argument("--minutes", type=float, default=14.0, help="stop early after this long (default 14)")
    soak.add_argument("--mem", default="128M", help="guest RAM (default 128M)")
    soak.add_argument("--hot", default="8M", help="the working set the guest keeps dirtying (default 8M)")
    soak.add_argument("--modes", help="comma-separated cycle (default cpr-transfer,cpr-exec,cpr-reboot,normal)")
    soak.add_argument("--guest", choices=("auto", "kvm", "threads"), default="auto", help="guest kind (default auto)")
    soak.add_argument(
        "--floor", action="append", default=[], metavar="MODE=MS", help="override a mode's longest allowed gap"
    )
    soak.add_argument("--json", action="store_true", help="print the report (every sample) as JSON")
    bench = sub.add_parser("bench", help="run bench/ (micro-benchmarks and live-update scenarios) of a source checkout")
    bench.add_argument("--quick", action="store_true", help="every mode once at 256M, micro-benchmarks briefly (~2 min)")
    bench.add_argument("--results", type=Path, help="directory for the JSON results and plots (default bench/results)")
    bench.add_argument("--checkout", type=Path, help="the cprfast source checkout (default: found from here)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from cprfast import __version__
        from cprfast.info import collect, render

        results = collect()
        if args.json:
            json.dump({"version": __version__, "probes": results}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render(results))
    elif args.command == "demo":
        return _demo(parser, args)
    elif args.command == "soak":
        return _soak(parser, args)
    elif args.command == "bench":
        return _bench(parser, args)
    return 0


def _modes(parser: argparse.ArgumentParser, given: str | None) -> list[str]:
    """``--modes``: known modes, in the order given."""
    from cprfast.demo import MODES

    modes = [m.strip() for m in given.split(",") if m.strip()] if given else list(MODES)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        parser.error(f"--modes: unknown mode(s) {bad} (choose from {', '.join(MODES)})")
    return modes


def _soak(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from cprfast import demo, soak
    from cprfast.vmm.cli import UsageError, parse_size

    modes = _modes(parser, args.modes)
    floors: dict[str, float] = {}
    try:
        for item in args.floor:
            mode, sep, ms = item.partition("=")
            if not sep or mode not in soak.FLOORS_MS:
                raise UsageError(f"--floor {item!r}: expected MODE=MS with MODE one of {', '.join(soak.FLOORS_MS)}")
            floors[mode] = float(ms)
        if args.updates < 1:
            raise UsageError("--updates must be at least 1")
        mem, hot = parse_size(args.mem, "--mem"), parse_size(args.hot, "--hot")
    except (UsageError, ValueError) as e:
        parser.error(str(e))

    def body() -> int:
        report = soak.run(
            args.updates,
            args.minutes,
            mem=mem,
            hot=hot,
            guest=args.guest,
            modes=modes,
            floors_ms=floors,
            progress=demo.stderr_progress(),
        )
        sys.stdout.write(soak.as_json(report) + "\n" if args.json else soak.render(report))
        if not report.ok:
            sys.stderr.write(f"cprfast soak: FAILED: {report.failures[0]}\n")
        return 0 if report.ok else 1

    return _guarded("soak", body)


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from cprfast import demo
    from cprfast.vmm.cli import UsageError, parse_size

    modes = _modes(parser, args.modes)
    try:
        mem, hot = parse_size(args.mem, "--mem"), parse_size(args.hot, "--hot")
    except UsageError as e:
        parser.error(str(e))

    def body() -> int:
        results = demo.run(mem, modes, args.guest, hot, demo.stderr_progress())
        sys.stdout.write(demo.as_json(results) + "\n" if args.json else demo.render(results))
        return 0 if all(r.ok for r in results) else 1

    return _guarded("demo", body)


def _guarded(command: str, body: Callable[[], int]) -> int:
    """Run a command that drives VMMs: Ctrl-C or an error is one line for the user and an exit status
    (the VMMs are stopped and the work directory removed by the body's own clean-up)."""
    try:
        return body()
    except KeyboardInterrupt:
        sys.stderr.write(f"cprfast {command}: interrupted (every VMM stopped, work directory removed)\n")
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; the VMM log is in the message
        sys.stderr.write(f"cprfast {command}: failed: {e}\n")
        return 1


def _checkout(given: Path | None) -> Path | None:
    """The source checkout holding bench/: given, the working directory, or the one this package runs from."""
    import cprfast

    candidates = [given] if given is not None else [Path.cwd(), Path(cprfast.__file__).resolve().parents[2]]
    return next((c for c in candidates if (c / "bench" / "scenarios.py").is_file()), None)


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    root = _checkout(args.checkout)
    if root is None:
        parser.error("bench: no cprfast source checkout with bench/ found here (run it from the checkout, or --checkout)")
    argv = [sys.executable, "-m", "pytest", str(root / "bench"), "-q", "--benchmark-only", "-o", "timeout=0"]
    argv.append("--scenarios=" + ("quick" if args.quick else "full"))
    if args.quick:
        argv += ["--benchmark-max-time=0.02", "--benchmark-min-rounds=1", "--benchmark-warmup=off"]
    if args.results is not None:
        argv.append(f"--results={args.results.resolve()}")
    env = dict(os.environ)
    if args.quick:
        env.setdefault("CPRFAST_QEMU_RUNS", "1")  # the QEMU side by side, once per mode
    sys.stdout.flush()
    return subprocess.call(argv, cwd=root, env=env)
