"""Fleet test support: a two-pool local spec, a controller and agents on 127.0.0.1, helpers.

The spec has two ``cloud: local`` pools serving the embedded SmolLM2 model at different nominal
prices (``cheap`` priced as an m7g.large, ``dear`` as a g6.xlarge, ten times dearer) and one
tenant per behaviour under test, so tests sharing a fleet do not disturb each other's quotas
or usage. In-process agents (:func:`start_agent`) run over an engine the test loads (each agent
its own, since agents serve concurrently and an engine's KV cache belongs to one scheduler);
:class:`agent.support.LiveApp` serves the controller and the agents on loopback.

:func:`ttft_for_spill` gives a TTFT objective that the router predicts the cheap pool meets while
its batch has room and misses once a request would wait for a batch slot, so that a burst spills
from the cheap pool to the dear one.
"""

from __future__ import annotations

import copy
import functools
import http.client
import json
import math
from pathlib import Path
from typing import Any

import yaml
from agent.support import LiveAgent, LiveApp
from agent.support import wait_until as _wait_until

from runtime.agent.app import init as agent_app
from runtime.agent.backend import EngineCoreBackend
from runtime.agent.config import EngineSettings, hash_api_key, node_config_from_spec
from runtime.agent.forward import FLEET_TOKEN_HEADER, HOPS_HEADER
from runtime.controller.app import init as controller_app
from runtime.controller.config import controller_config_from_spec
from runtime.routing import FleetView, InstanceView, RouteRequest, RoutingPolicy, route
from runtime.spec import FLEET_CONFIG_KEY, FleetSpec, parse_fleet

REPO = Path(__file__).resolve().parents[2]
LOCAL_STACK = REPO / "stacks" / "local.yaml"

MODEL = "smollm2-135m"
FLEET_TOKEN = "fleet-token-for-fleet-tests"
ADMIN_TOKEN = "admin-token-for-fleet-tests"
FLEET_TOKEN_ENV = "FLEETFORM_FLEET_TOKEN"
TENANTS = ("burst", "ledger", "stream", "limited", "frugal", "hopper", "restart", "load")
KEYS = {name: f"sk-{name}-0123456789" for name in TENANTS}
LIMITED_RPM = 6
HOPPER_RPM = 1
FRUGAL_USD_PER_MONTH = 1e-9  # spent by the first request

PUSH_INTERVAL_S = 0.3
STALE_AFTER_S = 3.0
KV_CACHE_TOKENS = 2048
MAX_MODEL_LEN = 256
SPILL_MAX_TOKENS = 48  # output of a burst request; the slot wait it causes is what spills
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow, briefly."}]


def spec_data(*, ttft_ms: float = 60_000.0, stale_after_s: float = STALE_AFTER_S) -> dict[str, Any]:
    """The fleet spec (as data), from ``stacks/local.yaml``'s model, with one SLO class."""
    local = yaml.safe_load(LOCAL_STACK.read_text())["config"][FLEET_CONFIG_KEY]
    model = copy.deepcopy(local["models"][0])
    model["context_length"] = MAX_MODEL_LEN

    def pool(name: str, instance_type: str) -> dict[str, Any]:
        return {
            "name": name,
            "cloud": "local",
            "region": "local",
            "instance_type": "local",
            "priced_as": {"cloud": "aws", "region": "us-east-1", "instance_type": instance_type},
            "min_replicas": 1,
            "max_replicas": 1,
            "serves": {"model": model["name"], "variant": model["variants"][0]["name"]},
        }

    quotas: dict[str, dict[str, float]] = {
        "limited": {"requests_per_minute": LIMITED_RPM},
        "hopper": {"requests_per_minute": HOPPER_RPM},
        "frugal": {"usd_per_month": FRUGAL_USD_PER_MONTH},
    }
    return {
        "name": "fleet-test",
        "models": [model],
        "slo_classes": [{"name": "standard", "priority": 1, "ttft_ms": ttft_ms, "tpot_ms": 60_000}],
        "pools": [pool("cheap", "m7g.large"), pool("dear", "g6.xlarge")],
        "tenants": [
            {
                "name": name,
                "api_keys": [f"sha256:{hash_api_key(KEYS[name])}"],
                "default_priority": "standard",
                "quotas": quotas.get(name, {}),
            }
            for name in TENANTS
        ],
        "routing": {"peer_stale_after_s": stale_after_s, "hop_limit": 1},
    }


def fleet_spec(**options: Any) -> FleetSpec:
    return parse_fleet(spec_data(**options))


def write_stack(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"config": {FLEET_CONFIG_KEY: data}}), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# An objective that makes a burst spill


def ttft_for_spill(prompt_tokens: int) -> float:
    """A TTFT objective (ms) that the router predicts the cheap agent (two batch slots) meets
    with one request queued ahead (the batch has room) and misses with two (the request would
    wait about ``SPILL_MAX_TOKENS`` decode steps for a slot).

    The predictions are the router's own for an agent that has measured nothing yet, as the
    fleet's agents are when the burst comes: the cold prior, the same on any machine. (Measured
    speed on a shared 2-core machine varies several-fold between a calibration and the burst.)
    The geometric mean leaves the same margin on both sides.
    """
    policy = RoutingPolicy.from_spec(fleet_spec())  # the objective does not enter predictions

    def predicted_ttft_s(queued: int) -> float:
        cheap = InstanceView(
            "cheap-agent",
            "cheap",
            "http://127.0.0.1:9",
            MODEL,
            "q4-1",
            0.0,
            spot=False,
            last_seen=0.0,
            max_batch=2,
            queued_requests={1: queued},
            queued_prompt_tokens={1: queued * prompt_tokens},
        )
        request = RouteRequest(MODEL, "standard", "burst", prompt_tokens, SPILL_MAX_TOKENS)
        decision = route(request, FleetView((cheap,), now=0.0), policy)
        return decision.candidates[0].predicted_ttft_s

    with_room, full = predicted_ttft_s(1), predicted_ttft_s(2)
    assert full > 4 * with_room, (with_room, full)
    return 1000.0 * math.sqrt(with_room * full) / policy.slo_headroom


# --------------------------------------------------------------------------------------------
# Processes in this process


def start_controller(spec: FleetSpec, db_path: Path, port: int = 0, **overrides: Any) -> LiveApp:
    """``overrides`` set ControllerConfig fields (e.g. ``rollout_period_s``)."""
    config = controller_config_from_spec(
        spec,
        db_path=db_path,
        fleet_token=FLEET_TOKEN,
        admin_token=ADMIN_TOKEN,
        environ={},
        **overrides,
    )
    return LiveApp(controller_app(config), port=port)


def start_agent(
    spec: FleetSpec,
    pool: str,
    engine: Any,
    controller_url: str,
    *,
    max_num_seqs: int = 2,
    inject_delay_ms: float = 0.0,
) -> LiveAgent:
    config = node_config_from_spec(
        spec,
        pool,
        f"{pool}-agent",
        0,
        engine=EngineSettings(
            kv_cache_tokens=KV_CACHE_TOKENS,
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=max_num_seqs,
            seed=0,
            inject_delay_ms=inject_delay_ms,
        ),
        controller_url=controller_url,
        fleet_token_env=FLEET_TOKEN_ENV,
        push_interval_s=PUSH_INTERVAL_S,
    )
    backend = EngineCoreBackend(config.engine, engine_factory=lambda: engine)
    agent = LiveAgent(agent_app(config, backend=backend, environ={FLEET_TOKEN_ENV: FLEET_TOKEN}))
    agent.wait_ready()
    return agent


# --------------------------------------------------------------------------------------------
# Helpers


wait_until = functools.partial(_wait_until, poll_s=0.05)


def admin(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ledger_usage(controller: LiveApp, tenant: str) -> dict[str, Any]:
    """The tenant's usage this month in the controller's ledger (zeros when it has none)."""
    status, _, body = controller.request("GET", "/v1/usage", headers=admin())
    assert status == 200, body
    rows = {row["tenant"]: row for row in body["data"]}
    return rows.get(tenant, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})


def agent_requests(agent: LiveAgent, tenant: str) -> int:
    """Requests of ``tenant`` this agent served (its own ``GET /v1/usage``)."""
    status, _, body = agent.request("GET", "/v1/usage", key=KEYS[tenant])
    assert status == 200, body
    return int(body["requests"])


def openai_client(url: str, tenant: str) -> Any:
    import openai

    return openai.OpenAI(api_key=KEYS[tenant], base_url=f"{url}/v1", max_retries=0, timeout=120)


def forwarded_request(
    agent: LiveApp, tenant: str, token: str = FLEET_TOKEN, max_tokens: int = 4
) -> tuple[int, dict[str, str], Any]:
    """A chat request as a peer forwards it (one hop, with ``token`` as the fleet token)."""
    return agent.request(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens},
        key=KEYS[tenant],
        headers={HOPS_HEADER: "1", FLEET_TOKEN_HEADER: token},
    )


def raw_stream(url: str, tenant: str, body: dict[str, Any]) -> bytes:
    """The bytes of a streamed response as they come off the wire."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps({**body, "stream": True}),
            headers={"Authorization": f"Bearer {KEYS[tenant]}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        assert response.status == 200, response.read()
        return response.read()
    finally:
        conn.close()
