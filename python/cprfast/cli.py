"""The ``cprfast`` command: ``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand; return the exit status."""
    parser = argparse.ArgumentParser(prog="cprfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="report what this kernel offers")
    args = parser.parse_args(argv)
    if args.command == "info":
        from cprfast import _core

        sys.stdout.write(f"cprfast core {_core.core_version()}\n")
    return 0
