"""
Coverage for daemons that end by signalling themselves.

The test suite puts this directory on ``PYTHONPATH`` when it runs under
coverage (see ``tests/conftest.py``), so every Python process it starts
imports this module at start-up, after coverage's own ``.pth`` file has
begun measuring it (``[tool.coverage.run] patch = ["subprocess"]``).

``twistd`` (and ``oproxy serve``, which runs it in-process) stops on
``SIGTERM`` by stopping its reactor and then, to exit "with the signal",
resetting the handler to the default and sending the signal to itself
(``twisted.application.app._exitWithSignal``).  That skips ``atexit``,
where coverage saves what it measured, and coverage's own ``sigterm``
handler was replaced by the reactor's.  So a process that kills itself
saves its coverage data first.
"""

from __future__ import annotations

import os
from typing import Any


def _save_before_killing_ourselves() -> None:
    try:
        import coverage
    except ImportError:
        return
    original_kill = os.kill

    def kill(pid: int, signum: int) -> None:
        if pid in (0, os.getpid()):
            current: Any = coverage.Coverage.current()
            if current is not None:
                try:
                    current.stop()
                    current.save()
                except Exception:
                    pass  # the process is going away: never stop it doing so
        original_kill(pid, signum)

    os.kill = kill


if os.environ.get("COVERAGE_PROCESS_CONFIG") or os.environ.get("COVERAGE_PROCESS_START"):
    _save_before_killing_ourselves()
