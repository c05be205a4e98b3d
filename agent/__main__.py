"""python -m agent: the same as the spiffe-delegate command."""

import sys

from agent.cli import main

sys.exit(main())
