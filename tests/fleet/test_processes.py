"""Fleets of real processes: an agent killed under load, and ``fleetform up`` end to end."""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from runtime.controller.local_fleet import LocalFleet, ManagedProcess
from runtime.spec import parse_fleet

from .support import (
    LOCAL_STACK,
    MESSAGES,
    MODEL,
    REPO,
    admin,
    openai_client,
    spec_data,
    wait_until,
    write_stack,
)

KILLED_MAX_TOKENS = 64


def metric(process: ManagedProcess, name: str) -> float:
    with urllib.request.urlopen(f"{process.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def answers(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def local_fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    """A controller and one agent per pool (cheap, dear) as processes, from a stack file."""
    data = spec_data()  # a TTFT objective of a minute: the cheap agent is always chosen
    stack = write_stack(tmp_path / "stack.yaml", data)
    fleet = LocalFleet(parse_fleet(data), stack, tmp_path / "run")
    try:
        fleet.start()
        fleet.wait_ready(timeout_s=180)
        yield fleet
    finally:
        fleet.stop(timeout_s=30)


def test_killing_an_agent_loses_no_accepted_request(local_fleet: LocalFleet) -> None:
    assert local_fleet.processes is not None
    processes = local_fleet.processes.processes
    cheap, dear, controller = processes["cheap-0"], processes["dear-0"], processes["controller"]
    client = openai_client(dear.url, "load")

    def ask(max_tokens: int) -> tuple[str, Any]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=max_tokens, extra_body={"ignore_eos": True}
        )
        return raw.headers["x-fleetform-served-by"], raw.parse()

    # Once the dear agent has the cheap one in its fleet view, it forwards everything there.
    wait_until(lambda: ask(1)[0] == "cheap-0", 60, "the dear agent to forward to the cheap one")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, KILLED_MAX_TOKENS) for _ in range(4)]
        wait_until(
            lambda: metric(cheap, "fleetform_in_flight_requests") >= 2, 60, "load on cheap-0"
        )
        cheap.popen.send_signal(signal.SIGKILL)
        results = [future.result(timeout=180) for future in futures]
    # Every request the dear agent accepted was answered in full: retried before any token.
    assert all(c.usage.completion_tokens == KILLED_MAX_TOKENS for _, c in results)
    assert any(node == "dear-0" for node, _ in results)
    # The requests in flight on cheap-0 when it died failed over (the dear agent counts them).
    assert metric(dear, 'fleetform_forward_failures_total{reason="disconnected"}') >= 2

    # The controller drops the dead agent once it is stale; the dear agent serves alone.
    def cheap_is_fresh() -> bool:
        url = f"{controller.url}/v1/fleet"
        request = urllib.request.Request(url, headers=admin(local_fleet.admin_token))
        with urllib.request.urlopen(request, timeout=5) as response:
            agents = json.load(response)["agents"]
        return any(a["agent_id"] == "cheap-0" and a["fresh"] for a in agents)

    wait_until(lambda: not cheap_is_fresh(), 30, "the controller to drop cheap-0")
    assert ask(2)[0] == "dear-0"


def _read_line(process: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            return process.stdout.readline()
        if process.poll() is not None:
            break
    raise AssertionError(f"no JSON line from `fleetform up` (exit code {process.poll()})")


def test_fleetform_up_serves_and_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "runtime.cli", "up", str(LOCAL_STACK), "--json"]
    with open(tmp_path / "up.log", "wb") as log:
        process = subprocess.Popen(
            [*command, "--run-dir", str(run_dir)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    try:
        summary = json.loads(_read_line(process, 240))
        monkeypatch.setenv("OPENAI_BASE_URL", summary["agents"][0]["url"] + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", summary["tenant_keys"]["demo"])
        completion = openai.OpenAI(max_retries=0, timeout=120).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8
        )
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        assert completion.choices[0].message.content

        # A request in flight while Ctrl-C is pressed twice (or a supervisor signals the group
        # again): the drain lets it finish, and the second signal does not cut the stop short.
        in_flight = concurrent.futures.ThreadPoolExecutor(1).submit(
            openai.OpenAI(max_retries=0, timeout=120).completions.create,
            model=MODEL,
            prompt="Count: one, two,",
            max_tokens=60,
            extra_body={"ignore_eos": True},
        )
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)
        assert in_flight.result(timeout=120).usage.completion_tokens == 60
        assert process.wait(timeout=120) == 0, (tmp_path / "up.log").read_text()
        assert "already stopping" in (tmp_path / "up.log").read_text()
        urls = [summary["controller"], *(agent["url"] for agent in summary["agents"])]
        assert not [url for url in urls if answers(url)]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
