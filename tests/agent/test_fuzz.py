"""Schemathesis fuzzes the live agent from its own OpenAPI document: no input may cause a 5xx.

The same run by hand, against any agent (a tenant key in the header)::

    schemathesis run http://127.0.0.1:PORT/openapi.json \\
        -H "Authorization: Bearer KEY" --checks not_a_server_error --max-examples 10

Bounded here: few examples per operation, a tenant whose token quota caps the engine work that
valid requests cause (429s are fine: only 5xx fail), and the small test context length.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .support import KEYS, LiveAgent

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent))


def test_fuzzing_the_openapi_document_finds_no_server_error(
    idle_agent: LiveAgent, tmp_path: Path
) -> None:
    assert SCHEMATHESIS is not None, "schemathesis is a test dependency: run `make test`"
    result = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{idle_agent.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {KEYS['fuzz']}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "8",
            "--seed",
            "20240601",
            "--request-timeout",
            "60",
            "--generation-database",
            "none",
            "--no-color",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,  # schemathesis may write reports and caches into the working directory
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "passed" in result.stdout
    status, _, _ = idle_agent.request("GET", "/healthz")
    assert status == 200
