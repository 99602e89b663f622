"""``python -m cprfast.vmm``: the reference VMM."""

import sys

from cprfast.vmm.cli import main

sys.exit(main())
