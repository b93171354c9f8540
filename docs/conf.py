"""
Sphinx configuration for oproxy's documentation site.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` (the
``docs`` extra installs Sphinx and the theme); CI builds it with warnings
as errors.  The reference pages are generated from the code at build time
by the extension in ``_ext/oproxy_reference.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The checkout first: the reference pages describe this code, not an
# installed copy of it.
sys.path[:0] = [str(HERE.parent), str(HERE / "_ext")]

from oproxy import __version__  # noqa: E402

project = "oproxy"
author = "the oproxy authors"
copyright = "the oproxy authors"
release = __version__
version = __version__

extensions = ["oproxy_reference"]

exclude_patterns = ["_build"]
# The tutorials carry ``.. test:`` comments for the test suite (see
# tests/test_tutorials.py); nothing else needs a special role.
default_role = "literal"
nitpicky = False

html_theme = "furo"
html_title = f"oproxy {__version__}"
html_static_path: list[str] = []
pygments_style = "sphinx"
pygments_dark_style = "monokai"
