"""
Schemathesis against the live daemon: no generated request may produce a
500, a traceback, or a response that the OpenAPI document does not allow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import Daemon

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


def test_generated_requests_conform(oproxy_process: Daemon) -> None:
    executable = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    result = subprocess.run(
        [
            executable,
            "run",
            f"{oproxy_process.url}/openapi.json",
            "--header",
            "Authorization: Bearer sk-e2e-secret",
            "--checks",
            CHECKS,
            # The console's routes answer 401 or 303 to anything without a
            # session, which a generated request never has: tests/test_console*.py
            # drive them signed in.
            "--exclude-tag",
            "Console",
            "--max-examples",
            "50",
            "--request-timeout",
            "20",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Traceback" not in oproxy_process.log.read_text()
