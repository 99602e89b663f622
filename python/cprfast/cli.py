"""The ``cprfast`` command: ``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    elif args.command == "bench":
        return _bench(parser, args)
    return 0


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from cprfast import demo
    from cprfast.vmm.cli import UsageError, parse_size

    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else list(demo.MODES)
    bad = [m for m in modes if m not in demo.MODES]
    try:
        if bad or not modes:
            raise UsageError(f"--modes: unknown mode(s) {bad} (choose from {', '.join(demo.MODES)})")
        mem, hot = parse_size(args.mem, "--mem"), parse_size(args.hot, "--hot")
    except UsageError as e:
        parser.error(str(e))
    try:
        results = demo.run(mem, modes, args.guest, hot, demo.stderr_progress())
    except KeyboardInterrupt:
        sys.stderr.write("cprfast demo: interrupted (every VMM stopped, work directory removed)\n")
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; the VMM log is in the message
        sys.stderr.write(f"cprfast demo: failed: {e}\n")
        return 1
    sys.stdout.write(demo.as_json(results) + "\n" if args.json else demo.render(results))
    return 0 if all(r.ok for r in results) else 1


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
