"""Lifecycle of requests and of the agent: disconnects, loading, drain, the `fleetform agent` process."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runtime.agent.app import DRAINED

from .support import (
    FLEET_TOKEN,
    FLEET_TOKEN_ENV,
    KEYS,
    MODEL,
    LiveAgent,
    node_config_data,
    openai_client,
)

REPO = Path(__file__).resolve().parents[2]
# Seconds of work unless aborted; fits the test context (128) even after a chat prompt.
LONG = {"max_tokens": 80, "ignore_eos": True}


def send_raw(agent: LiveAgent, path: str, body: dict[str, Any], key: str) -> socket.socket:
    """Send a request on a fresh connection and return the socket without reading."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def abort_count(agent: LiveAgent) -> float:
    pattern = r'^fleetform_requests_total\{finish_reason="abort",slo_class="standard",tenant="demo"\} (\S+)$'
    match = re.search(pattern, agent.metrics_text(), re.M)
    return float(match.group(1)) if match else 0.0


# --------------------------------------------------------------------------------------------
# Client disconnects


def test_streaming_client_disconnect_aborts_the_sequence(agent: LiveAgent) -> None:
    before = abort_count(agent)
    sock = send_raw(
        agent,
        "/v1/completions",
        {"model": MODEL, "prompt": "Tell me a story.", "stream": True, **LONG},
        KEYS["demo"],
    )
    received = b""
    while b"data: " not in received:  # tokens are flowing
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    agent.wait_idle(timeout=10)
    assert not agent.state.backend.core.has_unfinished()  # type: ignore[attr-defined]
    assert abort_count(agent) == before + 1


def test_non_streaming_client_disconnect_aborts_the_sequence(agent: LiveAgent) -> None:
    before = abort_count(agent)
    sock = send_raw(
        agent,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], **LONG},
        KEYS["demo"],
    )
    try:
        wait_for(lambda: bool(agent.state.in_flight), timeout=10, what="the request to start")
    except TimeoutError:
        raise AssertionError(f"not started: {sock.recv(4096)!r}") from None
    core = agent.state.backend.core  # type: ignore[attr-defined]
    wait_for(lambda: core.has_unfinished(), what="the engine to run it")
    sock.close()
    agent.wait_idle(timeout=10)
    assert abort_count(agent) == before + 1


# --------------------------------------------------------------------------------------------
# Loading


def test_health_answers_at_once_and_ready_waits_for_the_model(
    start_agent: Callable[..., LiveAgent], shared_engine: Any
) -> None:
    gate = threading.Event()

    def slow_load() -> Any:
        gate.wait(30)
        return shared_engine

    agent = start_agent(engine_factory=slow_load, wait=False)
    try:
        assert agent.request("GET", "/healthz")[:1] == (200,)
        status, headers, body = agent.request("GET", "/readyz")
        assert (status, body["status"]) == (503, "loading")
        assert int(headers["retry-after"]) >= 1
        status, headers, body = agent.request(
            "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi"}, key=KEYS["demo"]
        )
        assert status == 503
        assert body["error"]["code"] == "model_loading"
        assert int(headers["retry-after"]) >= 1
    finally:
        gate.set()
    agent.wait_ready()
    status, _, body = agent.request("GET", "/readyz")
    assert (status, body["status"]) == (200, "ready")


def test_a_model_that_fails_to_load_is_reported_not_ready(
    start_agent: Callable[..., LiveAgent],
) -> None:
    def broken() -> Any:
        raise OSError("weights file is truncated")

    agent = start_agent(engine_factory=broken, wait=False)
    wait_for(lambda: agent.state.backend.load_error is not None, what="the load failure")
    status, _, body = agent.request("GET", "/readyz")
    assert (status, body["status"]) == (503, "failed")
    assert "weights file is truncated" in body["detail"]
    assert agent.request("GET", "/healthz")[0] == 200
    status, _, body = agent.request(
        "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi"}, key=KEYS["demo"]
    )
    assert status == 503


# --------------------------------------------------------------------------------------------
# Drain


@pytest.fixture
def drainable(start_agent: Callable[..., LiveAgent]) -> LiveAgent:
    """A fresh agent with a fleet token (admin routes enabled); drain is one-way."""
    return start_agent(
        node_config_data(fleet_token_env=FLEET_TOKEN_ENV),
        environ={FLEET_TOKEN_ENV: FLEET_TOKEN},
    )


def test_admin_drain_needs_the_fleet_token(drainable: LiveAgent, agent: LiveAgent) -> None:
    for key in (None, KEYS["demo"], FLEET_TOKEN + "x"):
        status, _, body = drainable.request("POST", "/admin/drain", key=key)
        assert status == 401, body
    assert not drainable.state.draining
    # Without a configured fleet token the route is disabled, whatever is presented.
    status, _, body = agent.request("POST", "/admin/drain", key=FLEET_TOKEN)
    assert status == 403
    assert body["error"]["code"] == "admin_disabled"
    assert not agent.state.draining


def test_drain_refuses_new_work_and_lets_in_flight_finish(drainable: LiveAgent) -> None:
    agent = drainable
    results: queue.Queue[Any] = queue.Queue()

    def in_flight() -> None:
        try:
            stream = openai_client(agent).completions.create(
                model=MODEL,
                prompt="Count to twenty:",
                max_tokens=20,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            results.put(list(stream))
        except BaseException as error:
            results.put(error)

    thread = threading.Thread(target=in_flight)
    thread.start()
    wait_for(lambda: bool(agent.state.in_flight), what="the in-flight request")

    status, _, body = agent.request("POST", "/admin/drain", {"deadline_s": 60}, key=FLEET_TOKEN)
    assert status == 202
    assert body["draining"] is True
    assert body["in_flight"] == 1

    status, _, body = agent.request("GET", "/readyz")
    assert (status, body["status"]) == (503, "draining")
    status, headers, body = agent.request(
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "Hi", "max_tokens": 1},
        key=KEYS["demo"],
    )
    assert status == 503
    assert body["error"]["code"] == "draining"
    assert int(headers["retry-after"]) >= 1
    assert "fleetform_draining 1.0" in agent.metrics_text()

    thread.join(60)
    chunks = results.get_nowait()
    assert not isinstance(chunks, BaseException), chunks
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]  # ran to completion despite the drain
    wait_for(agent.app[DRAINED].is_set, timeout=10, what="drained")


def test_drain_deadline_aborts_what_is_left(drainable: LiveAgent) -> None:
    agent = drainable
    responses: queue.Queue[Any] = queue.Queue()
    body = {"model": MODEL, "prompt": "Tell me a story.", "stream": True, **LONG}
    thread = threading.Thread(
        target=lambda: responses.put(
            agent.request("POST", "/v1/completions", body, key=KEYS["demo"])
        )
    )
    thread.start()
    wait_for(lambda: bool(agent.state.in_flight), what="the in-flight request")
    status, _, _ = agent.request("POST", "/admin/drain", {"deadline_s": 0.5}, key=FLEET_TOKEN)
    assert status == 202
    thread.join(30)
    status, _, text = responses.get_nowait()
    wait_for(agent.app[DRAINED].is_set, timeout=10, what="drained")
    assert status == 200  # the stream had started; the abort is reported in-band
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "draining"
    agent.wait_idle(timeout=10)


# --------------------------------------------------------------------------------------------
# The `fleetform agent` process


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "agent", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        ("{not json", "invalid JSON"),
        (json.dumps({"node_id": "x"}), "pool: Field required"),
        (
            json.dumps(
                node_config_data(
                    tenants=[
                        {"name": "t", "key_sha256": ["nothex"], "default_priority": "standard"}
                    ]
                )
            ),
            "tenants.0.key_sha256.0",
        ),
        (
            json.dumps(
                node_config_data(
                    tenants=[{"name": "t", "key_sha256": ["a" * 64], "default_priority": "gold"}]
                )
            ),
            "no SLO class 'gold'",
        ),
        (
            json.dumps(
                node_config_data(
                    controller_url="http://127.0.0.1:9", fleet_token_env="FLEETFORM_NO_SUCH_TOKEN"
                )
            ),
            "controller_url is set but no fleet token is available",
        ),
    ],
)
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "node.json"
    if content is not None:
        path.write_text(content)
    result = run_cli("--config", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fleetform agent: error: ")
    assert expected in lines[0]


def test_agent_process_drains_on_sigterm_and_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    config = node_config_data(port=0)
    config["engine"] = {**config["engine"], "kv_cache_tokens": 1024}
    path.write_text(json.dumps(config))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime.cli",
            "agent",
            "--config",
            str(path),
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        assert match, line + (process.stderr.read() if process.poll() is not None else "")  # type: ignore[union-attr]
        port = int(match.group(1))
        live = _Remote(port)
        wait_for(lambda: live.get("/readyz") == 200, timeout=90, what="the model to load")

        results: queue.Queue[Any] = queue.Queue()

        def in_flight() -> None:
            import openai

            client = openai.OpenAI(
                api_key=KEYS["demo"], base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
            )
            try:
                stream = client.completions.create(
                    model=MODEL,
                    prompt="Count:",
                    max_tokens=8,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                chunks = iter(stream)
                first = next(chunks)
                results.put("started")
                results.put([first, *chunks])
            except BaseException as error:
                results.put(error)
                results.put(error)

        thread = threading.Thread(target=in_flight)
        thread.start()
        assert results.get(timeout=60) == "started"
        process.send_signal(signal.SIGTERM)
        thread.join(60)
        chunks = results.get_nowait()
        assert not isinstance(chunks, BaseException), chunks
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class _Remote:
    def __init__(self, port: int) -> None:
        self.port = port

    def get(self, path: str) -> int:
        import http.client

        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            return 0
