"""`python -m pyvmm` runs the pyvmm command."""

import sys

from pyvmm.cli import main

sys.exit(main())
