"""``fleetform controller`` (runtime.controller.main): one-line exits on bad setup, and a real
process that serves, accepts a push and stops cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from runtime.controller.main import ADMIN_TOKEN_ENV, FLEET_TOKEN_ENV, configure_parser, main

from .support import ADMIN_TOKEN, FLEET_TOKEN, push_body

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "stacks" / "local.yaml"
TOKENS = {FLEET_TOKEN_ENV: FLEET_TOKEN, ADMIN_TOKEN_ENV: ADMIN_TOKEN}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({ADMIN_TOKEN_ENV: ADMIN_TOKEN}, FLEET_TOKEN_ENV),
        ({FLEET_TOKEN_ENV: FLEET_TOKEN, ADMIN_TOKEN_ENV: ""}, ADMIN_TOKEN_ENV),
    ],
)
def test_a_missing_token_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], environ: dict[str, str], expected: str
) -> None:
    args = parse("--stack", str(STACK), "--db", str(tmp_path / "l.db"))
    assert main(args, environ=environ) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "l.db").exists()


def test_a_bad_stack_or_ledger_or_port_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("config:\n  fleetform:fleet:\n    name: Not A Name\n")
    cases = [
        parse("--stack", str(bad), "--db", str(tmp_path / "l.db")),
        parse("--stack", str(STACK), "--db", str(tmp_path / "no-such-dir" / "l.db")),
        parse("--stack", str(STACK), "--db", str(tmp_path / "l.db"), "--port", "70000"),
        parse("--stack", str(STACK), "--db", str(tmp_path / "l.db"), "--stale-after", "-1"),
    ]
    for args in cases:
        assert main(args, environ=TOKENS) == 2
        err = capsys.readouterr().err
        assert err.startswith("fleetform controller: error: ") and err.count("\n") == 1, err
        assert FLEET_TOKEN not in err and ADMIN_TOKEN not in err


def test_the_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETFORM_")}
    env.update(TOKENS)
    command = [
        sys.executable,
        "-m",
        "runtime.controller.main",
        "--stack",
        str(STACK),
        "--port",
        "0",
        "--db",
        str(tmp_path / "ledger.db"),
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stderr is not None
        log: list[str] = []
        port = None
        for line in process.stderr:  # ends if the process dies before listening
            log.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port is not None, "".join(log)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            assert json.load(response)["status"] == "ok"
        body = push_body(instance={**push_body()["instance"], "pool": "local-cheap"})
        request = urllib.request.Request(
            f"{base}/v1/push",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {FLEET_TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response)["accepted"] is True
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        rest = process.stderr.read()
        everything = "".join(log) + rest
        # The demo tenants' keys are env: references not set here: a warning, not a failure.
        assert "FLEETFORM_DEMO_KEY" in everything
        assert FLEET_TOKEN not in everything and ADMIN_TOKEN not in everything
        assert "Traceback" not in everything
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
