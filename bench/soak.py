#!/usr/bin/env python3
"""
oproxy's soak under faults: ``python bench/soak.py [--short] [options]``
(or ``python -m bench.soak``); ``--help`` lists the options and
bench/README.rst, "The soak", says how to read the report.

The soak itself is ``oproxybench.soak``, in the harness package beside this
file, which is put on the path whichever way this file is run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oproxybench.soak.cli import main

if __name__ == "__main__":
    sys.exit(main())
