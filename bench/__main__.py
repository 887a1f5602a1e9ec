"""Run the benchmarks and print their results as JSON (`python -m bench [--runs N]`)."""

import sys

from bench.run import main

sys.exit(main())
