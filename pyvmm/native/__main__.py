"""`python -m pyvmm.native`: build pyvmm's compiled helpers for this machine."""

import sys

from pyvmm.native.helpers import main

if __name__ == "__main__":
    sys.exit(main())
