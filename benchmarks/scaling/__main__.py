"""``python -m benchmarks.scaling``: see :mod:`benchmarks.scaling`."""

import sys

from benchmarks.scaling.doc import main

sys.exit(main())
