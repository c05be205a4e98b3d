"""``python -m bench``: runs the benchmarks and writes docs/performance.md."""

import sys

from bench.runner import main

sys.exit(main())
