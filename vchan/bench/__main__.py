"""``python -m vchan.bench``: the benchmark suite (same as ``vchan bench``)."""

import sys

from . import main

sys.exit(main())
