#!/usr/bin/env python3
"""The benchmark suite from a checkout: the same as ``vchan bench`` (see vchan/bench/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vchan.bench import main

if __name__ == "__main__":
    sys.exit(main())
