"""The ``cprfast`` command: ``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand; return the exit status."""
    parser = argparse.ArgumentParser(prog="cprfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="report what this kernel offers, and why not when it does not")
    info.add_argument("--json", action="store_true", help="print the probe results as JSON")
    sub.add_parser("demo", help="hand a memfd to a child process over SCM_RIGHTS and back")
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
        from cprfast.demo import run

        sys.stdout.write(run().render())
    return 0
