"""Test support: a node config with a tenant per behaviour, and live agents on loopback.

A :class:`LiveAgent` runs an agent application on an ephemeral 127.0.0.1 port, in a thread with
its own event loop, so the synchronous ``openai`` client (and raw sockets) can talk to it from the
test thread (:class:`LiveApp` does the same for any application, e.g. a controller). Agents built by :func:`start_agent` share one loaded engine: each gets its own
:class:`EngineCore` (scheduler state) over it. That is safe because tests run one at a time and
leave nothing unfinished; it saves reloading the model (seconds of CPU) for every agent.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from runtime.agent.app import AGENT, AgentState, advertise, init
from runtime.agent.backend import EngineCoreBackend
from runtime.agent.config import NodeConfig, hash_api_key
from runtime.protocol import (
    InstanceSnapshot,
    MetricsPush,
    PeerInstance,
    PushReply,
    RolloutDirective,
)

MODEL = "smollm2-135m"
KEYS = {
    "demo": "sk-demo-0123456789",
    "capped": "sk-capped-0123456789",
    "tiny": "sk-tiny-0123456789",
    "tokenpoor": "sk-tokenpoor-0123456789",
    "single": "sk-single-0123456789",
    "noaccess": "sk-noaccess-0123456789",
    "otherpool": "sk-otherpool-0123456789",
    "fuzz": "sk-fuzz-0123456789",
}
FLEET_TOKEN = "fleet-token-for-tests"
FLEET_TOKEN_ENV = "FLEETFORM_TEST_FLEET_TOKEN"
MAX_MODEL_LEN = 128  # small: bounds the work any one request (or the fuzzer) can ask for
MAX_BODY_BYTES = 64 * 1024


def node_config_data(**overrides: Any) -> dict[str, Any]:
    """A node config (as JSON data) with one tenant per behaviour the tests need."""

    def tenant(name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "key_sha256": [hash_api_key(KEYS[name])],
            "default_priority": "standard",
            **extra,
        }

    data: dict[str, Any] = {
        "node_id": "test-node-1",
        "pool": "local-test",
        "model": MODEL,
        "variant": "q4-1",
        "port": 0,
        "engine": {
            "kv_cache_tokens": 4096,
            "max_model_len": MAX_MODEL_LEN,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 256,
            "seed": 0,
        },
        "price_usd_per_hour": 3.6,  # 0.001 USD per accelerator-second: easy to check
        "max_body_bytes": MAX_BODY_BYTES,
        "drain_timeout_s": 30,
        "slo_classes": [
            {"name": "critical", "priority": 0, "ttft_ms": 60000, "tpot_ms": 1000},
            {"name": "standard", "priority": 1, "ttft_ms": 60000, "tpot_ms": 1000},
            {
                "name": "batch",
                "priority": 2,
                "ttft_ms": 20000,
                "tpot_ms": 5000,
                "sheddable": True,
            },
        ],
        "tenants": [
            tenant("demo", max_priority="critical"),
            tenant("capped", max_priority="standard"),
            tenant("tiny", quotas={"requests_per_minute": 2}),
            tenant("tokenpoor", quotas={"tokens_per_minute": 40}),
            tenant("single", quotas={"max_concurrency": 1}),
            tenant("noaccess", allowed_models=["some-other-model"]),
            tenant("otherpool", allowed_pools=["elsewhere"]),
            # Bounds the engine work a fuzzer's valid requests can cause.
            tenant("fuzz", quotas={"tokens_per_minute": 400, "max_concurrency": 2}),
        ],
    }
    data.update(overrides)
    return data


class LiveApp:
    """An application served on 127.0.0.1 (``port``, default any free one) from a background
    event loop."""

    def __init__(self, app: web.Application, port: int = 0) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None
        self.port = port
        self.call(self._start())

    async def _start(self) -> None:
        self.runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=5
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run ``coro`` on the app's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], Any], timeout: float = 10) -> Any:
        async def run() -> Any:
            return fn()

        return self.call(run(), timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | list[Any] | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> tuple[int, dict[str, str], Any]:
        """A raw HTTP request; returns status, headers and the decoded JSON (or text) body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        payload: bytes | None
        if body is None or isinstance(body, bytes):
            payload = body
        else:
            payload = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=payload, headers=all_headers)
            response = conn.getresponse()
            raw = response.read()
            response_headers = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        try:
            decoded: Any = json.loads(raw)
        except ValueError:
            decoded = raw.decode("utf-8", "replace")
        return response.status, response_headers, decoded

    def stop(self) -> None:
        if self.runner is not None:
            self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class LiveAgent(LiveApp):
    """An agent application served on 127.0.0.1 from a background event loop."""

    async def _start(self) -> None:
        await super()._start()
        advertise(self.app, self.port)  # as `fleetform agent` does once bound

    @property
    def state(self) -> AgentState:
        return self.app[AGENT]

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.state.backend.ready:
                return
            if self.state.backend.load_error:
                raise RuntimeError(self.state.backend.load_error)
            time.sleep(0.05)
        raise TimeoutError("agent did not become ready")

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no request is in flight and the engine core has nothing unfinished."""
        end = time.monotonic() + timeout
        core = self.state.backend.core  # type: ignore[attr-defined]
        while time.monotonic() < end:
            if not self.state.in_flight and (core is None or not core.has_unfinished()):
                return
            time.sleep(0.02)
        raise TimeoutError(
            f"still busy: in_flight={list(self.state.in_flight)}, "
            f"core unfinished={core.has_unfinished() if core else None}"
        )

    def metrics_text(self) -> str:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        return str(text)


def openai_client(agent: LiveAgent, tenant: str = "demo", key: str | None = None) -> Any:
    import openai

    return openai.OpenAI(
        api_key=key if key is not None else KEYS[tenant],
        base_url=f"{agent.url}/v1",
        max_retries=0,
        timeout=120,
    )


def body_of(error: Any) -> dict[str, Any]:
    """The ``error`` object of an ``openai.APIStatusError`` (typed ``object`` by the client)."""
    body = error.body
    assert isinstance(body, dict), body
    return body


def variant_agent(
    node_id: str,
    variant: str,
    controller_url: str,
    engine: Any,
    *,
    fleet_token_env: str,
    push_interval_s: float,
) -> LiveAgent:
    """An agent of pool ``pool-<variant>`` serving ``variant`` of :data:`MODEL` on ``engine``,
    pushing to ``controller_url``; its router knows pools ``pool-a`` and ``pool-b``, whose
    variants ``a`` and ``b`` are both 'standard' (the rollout tests' two versions). Not yet
    ready: call ``wait_ready``."""
    data = node_config_data(
        node_id=node_id,
        pool=f"pool-{variant}",
        variant=variant,
        controller_url=controller_url,
        fleet_token_env=fleet_token_env,
        push_interval_s=push_interval_s,
        routing={
            "pools": ["pool-a", "pool-b"],
            "variant_quality": {"a": "standard", "b": "standard"},
        },
    )
    config = NodeConfig.model_validate(data)
    backend = EngineCoreBackend(config.engine, engine_factory=lambda: engine)
    return LiveAgent(init(config, backend=backend, environ={fleet_token_env: FLEET_TOKEN}))


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


class ScriptedController:
    """A controller that answers pushes with every agent's latest snapshot (plus
    :meth:`extra_peers`) as the fleet view and ``rollouts`` as the directives, and keeps the
    pushes."""

    def __init__(self) -> None:
        self.pushes: list[MetricsPush] = []
        self.rollouts: dict[str, RolloutDirective] = {}
        app = web.Application()
        app.router.add_post("/v1/push", self.push)
        self.live = LiveApp(app)

    def extra_peers(self, latest: dict[str, InstanceSnapshot]) -> list[InstanceSnapshot]:
        """Instances to add to the view besides the agents that pushed (none here)."""
        return []

    async def push(self, request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == f"Bearer {FLEET_TOKEN}"
        body = MetricsPush.model_validate_json(await request.read())
        self.pushes.append(body)
        now = time.time()
        latest = {p.agent_id: p.instance for p in self.pushes}
        peers = [*latest.values(), *self.extra_peers(latest)]
        reply = PushReply(
            accepted=True,
            server_time=now,
            fleet=[PeerInstance(**s.model_dump(), last_seen=now) for s in peers],
            rollouts=self.rollouts,
        )
        return web.json_response(text=reply.model_dump_json())

    def shadow_reports(self) -> list[Any]:
        return [report for push in self.pushes for report in push.shadow]
