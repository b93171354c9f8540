#!/usr/bin/env python3
"""
oproxy's benchmark run: ``python bench/run.py [options]`` (``--help`` lists
them; bench/README.rst says how to read the output).

The harness itself is the package beside this file, ``oproxybench``; this
file is its entry point, run as a script so that ``bench/`` is on the path.
"""

import sys

from oproxybench.cli import main

if __name__ == "__main__":
    sys.exit(main())
