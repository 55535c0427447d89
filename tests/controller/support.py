"""Shared test material: a small fleet spec, tokens and keys, a fake clock, push bodies, and a
controller served on 127.0.0.1 (a real TCP socket) for the duration of an ``async with``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from runtime.agent.config import hash_api_key
from runtime.controller.app import CONTROLLER, init
from runtime.controller.config import ControllerConfig, controller_config_from_spec
from runtime.spec import FleetSpec, parse_fleet

P = ParamSpec("P")
R = TypeVar("R")

FLEET_TOKEN = "fleet-token-for-controller-tests"
ADMIN_TOKEN = "admin-token-for-controller-tests"
KEYS = {"alpha": "sk-alpha-0123456789", "beta": "sk-beta-0123456789", "gamma": "sk-gamma-01234"}
BETA_KEY_ENV = "FLEETFORM_TEST_BETA_KEY"
ENVIRON = {BETA_KEY_ENV: KEYS["beta"]}

# Wednesday 2025-03-12 12:00:00 UTC: mid-month, so "this month" is unambiguous.
T0 = datetime(2025, 3, 12, 12, tzinfo=UTC).timestamp()
HOUR = 3600
QUOTAS = {
    "alpha": {"requests_per_minute": 100, "tokens_per_minute": 10_000, "max_concurrency": 10},
    "beta": {"tokens_per_minute": 5_000, "max_concurrency": 3},
}
ALPHA_USD_PER_MONTH = 5.0
BETA_ACCELERATOR_HOURS_PER_MONTH = 1.0
FLEET_USD_PER_MONTH = 20.0


def _pool(name: str, instance_type: str) -> dict[str, Any]:
    return {
        "name": name,
        "cloud": "local",
        "region": "local",
        "instance_type": "local",
        "priced_as": {"cloud": "aws", "region": "us-east-1", "instance_type": instance_type},
        "min_replicas": 1,
        "max_replicas": 2,
        "serves": {"model": "tiny", "variant": "q4"},
    }


SPEC_DATA: dict[str, Any] = {
    "name": "controller-test",
    "budget": {"usd_per_month": FLEET_USD_PER_MONTH},
    "models": [
        {
            "name": "tiny",
            "parameters_b": 0.135,
            "layers": 30,
            "hidden_size": 576,
            "kv_heads": 3,
            "head_dim": 64,
            "context_length": 2048,
            "variants": [
                {"name": "q4", "precision": "int4", "quality": "standard", "runs_on": ["cpu"]}
            ],
        }
    ],
    "slo_classes": [{"name": "standard", "priority": 1, "ttft_ms": 6000, "tpot_ms": 400}],
    "pools": [_pool("cheap", "m7g.large"), _pool("dear", "g6.xlarge")],
    "tenants": [
        {
            "name": "alpha",
            "api_keys": [f"sha256:{hash_api_key(KEYS['alpha'])}"],
            "default_priority": "standard",
            "quotas": {**QUOTAS["alpha"], "usd_per_month": ALPHA_USD_PER_MONTH},
        },
        {
            "name": "beta",
            "api_keys": [f"env:{BETA_KEY_ENV}"],
            "default_priority": "standard",
            "quotas": {
                **QUOTAS["beta"],
                "accelerator_hours_per_month": BETA_ACCELERATOR_HOURS_PER_MONTH,
            },
        },
        {
            "name": "gamma",
            "api_keys": [f"sha256:{hash_api_key(KEYS['gamma'])}"],
            "default_priority": "standard",
        },
    ],
    "routing": {"peer_stale_after_s": 15},
}


def fleet_spec() -> FleetSpec:
    return parse_fleet(SPEC_DATA)


def make_config(db_path: Path, **overrides: Any) -> ControllerConfig:
    return controller_config_from_spec(
        fleet_spec(),
        db_path=db_path,
        fleet_token=FLEET_TOKEN,
        admin_token=ADMIN_TOKEN,
        environ=ENVIRON,
        **overrides,
    )


class FakeClock:
    """Epoch seconds that only move when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def snapshot(instance_id: str = "cheap-1", pool: str = "cheap", **extra: Any) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "pool": pool,
        "url": f"http://127.0.0.1:9/{instance_id}",
        "model": "tiny",
        "variant": "q4",
        "price_usd_per_hour": 0.08,
        **extra,
    }


def usage_row(tenant: str, hour: float, **amounts: float) -> dict[str, Any]:
    return {"tenant": tenant, "hour": int(hour // HOUR * HOUR), **amounts}


def push_body(
    agent_id: str = "agent-1",
    seq: int = 0,
    *,
    boot_id: str = "boot-1",
    instance: dict[str, Any] | None = None,
    usage: list[dict[str, Any]] | None = None,
    recent_use: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "boot_id": boot_id,
        "seq": seq,
        "sent_at": T0,
        "instance": instance or snapshot(f"{agent_id}-instance"),
        "usage": usage or [],
        "recent_use": recent_use or {},
    }


@contextlib.asynccontextmanager
async def controller(
    config: ControllerConfig,
    clock: Callable[[], float] | None = None,
    *,
    port: int | None = None,
    prepare: Callable[[web.Application], None] | None = None,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A controller on 127.0.0.1 (``port``, default any free one) and a client for it."""
    app = init(config, clock=clock) if clock is not None else init(config)
    if prepare is not None:
        prepare(app)
    server = TestServer(app, host="127.0.0.1", port=port)
    async with TestClient(server) as client:
        assert client.app is not None and client.app[CONTROLLER].ledger is not None
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def usage_by_tenant(client: TestClient[Any, Any], **params: Any) -> dict[str, Any]:
    response = await client.get("/v1/usage", params=params, headers=auth(ADMIN_TOKEN))
    assert response.status == 200, await response.text()
    return {row["tenant"]: row for row in (await response.json())["data"]}


async def eventually(
    condition: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition"
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def async_test(fn: Callable[P, Awaitable[R]]) -> Callable[P, R]:
    """Run an ``async def`` test in a fresh event loop (no pytest-asyncio here), with a cap."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        async def capped() -> R:
            return await asyncio.wait_for(fn(*args, **kwargs), 30)

        return asyncio.run(capped())

    return run
