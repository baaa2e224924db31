"""`python -m kvmpy` is the `kvmpy` command."""

import sys

from kvmpy.cli import main

sys.exit(main())
