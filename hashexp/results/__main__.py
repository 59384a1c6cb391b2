"""python -m hashexp.results: see hashexp.results.cli."""

import sys

from hashexp.results.cli import main

sys.exit(main())
