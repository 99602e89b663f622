"""``python -m cprfast`` runs the command-line interface."""

from cprfast.cli import main

raise SystemExit(main())
