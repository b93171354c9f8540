#!/usr/bin/env python3
"""
Instructions per request under callgrind: ``python bench/instructions.py
[--code DIR]... [--requests N]`` (see ``oproxybench.instructions``).
"""

import sys

from oproxybench.instructions import main

if __name__ == "__main__":
    sys.exit(main())
