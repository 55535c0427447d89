"""The agent's metrics pusher against a real controller on 127.0.0.1: seq numbers, retries
counted once (lost replies, an unreachable controller), the bounded usage buffer, replies."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runtime.agent.config import NodeConfigError, parse_node_config
from runtime.agent.push import MetricsPusher, PushError, UsageBuffer, pusher_for_node
from runtime.controller.app import CONTROLLER
from runtime.protocol import InstanceSnapshot, PushReply, TenantRecentUse

from .support import (
    ADMIN_TOKEN,
    FLEET_TOKEN,
    HOUR,
    QUOTAS,
    T0,
    FakeClock,
    async_test,
    auth,
    controller,
    eventually,
    free_port,
    make_config,
    snapshot,
    usage_by_tenant,
)

FAST = {"interval_s": 0.05, "backoff_initial_s": 0.02, "backoff_max_s": 0.1, "timeout_s": 2.0}


class Agent:
    """What the pusher is injected with: a snapshot, recent use, and where replies go."""

    def __init__(self) -> None:
        self.replies: list[PushReply] = []

    def snapshot(self) -> InstanceSnapshot:
        return InstanceSnapshot.model_validate(snapshot("agent-1-instance"))

    def recent_use(self) -> dict[str, TenantRecentUse]:
        return {"alpha": TenantRecentUse(requests_per_minute=12.0)}

    def on_reply(self, reply: PushReply) -> None:
        self.replies.append(reply)


def make_pusher(url: str, agent: Agent, **options: Any) -> MetricsPusher:
    return MetricsPusher(
        url,
        FLEET_TOKEN,
        agent_id="agent-1",
        snapshot=agent.snapshot,
        recent_use=agent.recent_use,
        on_reply=agent.on_reply,
        **{**FAST, **options},
    )


def record(pusher: MetricsPusher, tenant: str, now: float, n: int) -> dict[str, float]:
    """Record ``n`` requests with amounts exact in binary floating point; their totals."""
    for _ in range(n):
        pusher.record_usage(tenant, now, 1, 10, 3, accelerator_seconds=0.5, usd=0.125)
    return {"requests": n, "prompt_tokens": 10 * n, "accelerator_seconds": 0.5 * n}


def fail_first_replies(count: int) -> Callable[[web.Application], None]:
    """Middleware: the controller records the first ``count`` pushes, then answers 500, as if
    the reply were lost on the way back."""

    def prepare(app: web.Application) -> None:
        remaining = {"n": count}

        @web.middleware
        async def lose_reply(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            response = await handler(request)
            if request.path == "/v1/push" and remaining["n"] > 0:
                remaining["n"] -= 1
                return web.json_response({"error": {"message": "lost"}}, status=500)
            return response

        app.middlewares.append(lose_reply)

    return prepare


@async_test
async def test_pushes_carry_increasing_seq_and_replies_reach_the_agent(tmp_path: Path) -> None:
    agent = Agent()
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        pusher = make_pusher(str(client.make_url("")), agent)
        pusher.start()
        try:
            await eventually(lambda: pusher.acknowledged >= 3, what="three pushes")
        finally:
            await pusher.stop()
        state = client.app[CONTROLLER]  # type: ignore[index]
        record_ = state.fleet.agents["agent-1"]
        assert record_.boot_id == pusher.boot_id
        assert record_.seq == pusher.acknowledged - 1  # 0, 1, 2, ...
        assert all(r.accepted for r in agent.replies)
        reply = agent.replies[-1]
        assert [p.instance_id for p in reply.fleet] == ["agent-1-instance"]
        # The agent's share: most of each quota, a floor kept for the second agent the spec plans.
        share = reply.leases["alpha"].requests_per_minute / QUOTAS["alpha"]["requests_per_minute"]
        assert 0.5 < share < 1
        assert 0 < reply.leases["beta"].max_concurrency <= QUOTAS["beta"]["max_concurrency"]
        assert state.fleet.agents["agent-1"].recent_use["alpha"].requests_per_minute == 12.0


@async_test
async def test_a_push_whose_reply_was_lost_is_counted_once(tmp_path: Path) -> None:
    agent = Agent()
    config = make_config(tmp_path / "l.db")
    async with controller(config, FakeClock(), prepare=fail_first_replies(3)) as client:
        pusher = make_pusher(str(client.make_url("")), agent)
        expected = record(pusher, "alpha", T0, 7)
        record(pusher, "beta", T0 - HOUR, 2)
        pusher.start()
        try:
            await eventually(lambda: pusher.acknowledged >= 1, what="an acknowledged push")
            assert pusher.unacknowledged_seq is None or pusher.unacknowledged_seq >= 1
            first = agent.replies[0]
            assert first.duplicate and not first.accepted  # the 4th try of seq 0
            # Usage recorded while seq 0 was being retried goes into a later push.
            more = record(pusher, "alpha", T0, 5)
            await eventually(lambda: not pusher.has_unacknowledged_usage, what="delivery")
        finally:
            await pusher.stop()
        totals = await usage_by_tenant(client)
        for field, value in expected.items():
            assert totals["alpha"][field] == value + more[field], field
        assert totals["alpha"]["usd"] == 0.125 * 12
        assert totals["beta"]["requests"] == 2
        metrics = await (await client.get("/metrics")).text()
        assert 'fleetform_controller_pushes_total{result="duplicate"} 3.0' in metrics


@async_test
async def test_usage_recorded_while_the_controller_is_down_arrives_once(tmp_path: Path) -> None:
    agent = Agent()
    port = free_port()
    pusher = make_pusher(f"http://127.0.0.1:{port}", agent)
    expected = record(pusher, "alpha", T0, 4)
    pusher.start()
    try:
        await eventually(lambda: pusher.consecutive_failures >= 3, what="failed pushes")
        assert pusher.unacknowledged_seq == 0  # retrying the same push
        more = record(pusher, "alpha", T0 + HOUR, 3)
        async with controller(make_config(tmp_path / "l.db"), FakeClock(), port=port) as client:
            await eventually(lambda: not pusher.has_unacknowledged_usage, what="delivery")
            assert pusher.consecutive_failures == 0
            totals = await usage_by_tenant(client)
            assert totals["alpha"]["requests"] == expected["requests"] + more["requests"]
            assert totals["alpha"]["accelerator_seconds"] == 0.5 * 7
            response = await client.get(
                "/v1/usage", params={"group_by": "hour"}, headers=auth(ADMIN_TOKEN)
            )
            hours = {r["hour"]: r["requests"] for r in (await response.json())["data"]}
            assert hours == {T0 // HOUR * HOUR: 4, T0 // HOUR * HOUR + HOUR: 3}
    finally:
        await pusher.stop(flush_timeout_s=0)


@async_test
async def test_stop_delivers_what_is_left(tmp_path: Path) -> None:
    agent = Agent()
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        pusher = make_pusher(str(client.make_url("")), agent, interval_s=60.0)
        pusher.start()
        await eventually(lambda: pusher.acknowledged >= 1, what="the first push")
        record(pusher, "beta", T0, 6)  # the next push would be a minute away
        await pusher.stop()
        assert not pusher.has_unacknowledged_usage
        assert (await usage_by_tenant(client))["beta"]["requests"] == 6


@async_test
async def test_cancelling_the_task_stops_the_pusher() -> None:
    agent = Agent()
    pusher = make_pusher(f"http://127.0.0.1:{free_port()}", agent)
    task = asyncio.get_running_loop().create_task(pusher.run())
    await eventually(lambda: pusher.consecutive_failures >= 1, what="a failed push")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await pusher.stop(flush_timeout_s=0)  # closes the session


def test_the_buffer_merges_instead_of_dropping_when_full() -> None:
    buffer = UsageBuffer(max_buckets=3)
    hours = [T0 // HOUR * HOUR + i * HOUR for i in range(6)]
    for hour in hours:
        buffer.add("alpha", int(hour), requests=1, usd=0.5)
    assert len(buffer) == 3 and buffer.merges == 3
    # A new tenant when full: the crowded tenant's two oldest buckets are folded together.
    buffer.add("beta", int(hours[0]), requests=10)
    assert len(buffer) == 3
    assert buffer.totals() == {
        "alpha": {
            "requests": 6,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "accelerator_seconds": 0.0,
            "usd": 3.0,
        },
        "beta": {
            "requests": 10,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "accelerator_seconds": 0.0,
            "usd": 0.0,
        },
    }
    rows = buffer.take()
    assert [(r.tenant, r.requests) for r in rows] == [("alpha", 2), ("alpha", 4), ("beta", 10)]
    assert rows[1].hour == hours[2]  # the newest hour kept what came after it
    assert len(buffer) == 0


def test_the_buffer_keeps_one_bucket_per_tenant_beyond_its_cap() -> None:
    buffer = UsageBuffer(max_buckets=2)
    for tenant in ("a", "b", "c", "d"):
        buffer.add(tenant, 0, requests=1)
        buffer.add(tenant, HOUR, requests=1)
    assert len(buffer) == 4  # max(max_buckets, tenants)
    assert {t: v["requests"] for t, v in buffer.totals().items()} == dict.fromkeys("abcd", 2)
    with pytest.raises(ValueError):
        UsageBuffer(max_buckets=10_001)


@async_test
async def test_usage_merged_in_a_full_buffer_is_delivered_exactly(tmp_path: Path) -> None:
    agent = Agent()
    port = free_port()
    pusher = make_pusher(f"http://127.0.0.1:{port}", agent, max_buckets=2)
    rng = random.Random(7)
    expected: dict[str, int] = {"alpha": 0, "beta": 0}
    for hour in range(48):  # two days of an outage
        for tenant in expected:
            n = rng.randint(0, 3)
            record(pusher, tenant, T0 + hour * HOUR, n)
            expected[tenant] += n
    assert len(pusher.pending) <= 2 and pusher.pending.merges > 0
    async with controller(make_config(tmp_path / "l.db"), FakeClock(), port=port) as client:
        pusher.start()
        try:
            await eventually(lambda: not pusher.has_unacknowledged_usage, what="delivery")
        finally:
            await pusher.stop()
        totals = await usage_by_tenant(client, since=0)
        assert {t: totals[t]["requests"] for t in expected} == expected
        assert {t: totals[t]["usd"] for t in expected} == {
            t: 0.125 * n for t, n in expected.items()
        }


@async_test
async def test_a_refused_token_is_retried_not_dropped(tmp_path: Path) -> None:
    agent = Agent()
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        pusher = MetricsPusher(
            str(client.make_url("")),
            "not-the-fleet-token",
            agent_id="agent-1",
            snapshot=agent.snapshot,
            recent_use=agent.recent_use,
            on_reply=agent.on_reply,
            **FAST,
        )
        record(pusher, "alpha", T0, 1)
        with pytest.raises(PushError, match="HTTP 401"):
            await pusher.push_once()
        assert pusher.unacknowledged_seq == 0 and pusher.has_unacknowledged_usage
        await pusher.stop(flush_timeout_s=0)
        assert agent.replies == []


def test_backoff_doubles_up_to_its_cap() -> None:
    pusher = make_pusher(
        "http://127.0.0.1:9",
        Agent(),
        backoff_initial_s=0.5,
        backoff_max_s=4.0,
        jitter=0.0,
    )
    assert [pusher.backoff_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert pusher.backoff_s(10_000) == 4.0
    jittery = make_pusher("http://127.0.0.1:9", Agent(), backoff_max_s=4.0, jitter=0.2)
    assert all(3.2 <= jittery.backoff_s(10) <= 4.0 for _ in range(50))


def test_a_node_without_a_controller_has_no_pusher() -> None:
    agent = Agent()
    base: dict[str, Any] = {
        "node_id": "agent-1",
        "pool": "cheap",
        "model": "tiny",
        "variant": "q4",
        "price_usd_per_hour": 0.08,
        "slo_classes": [{"name": "standard", "priority": 1, "ttft_ms": 6000, "tpot_ms": 400}],
    }
    callables = {
        "snapshot": agent.snapshot,
        "recent_use": agent.recent_use,
        "on_reply": agent.on_reply,
    }
    assert pusher_for_node(parse_node_config(base), **callables) is None
    with_controller = parse_node_config(
        {**base, "controller_url": "http://127.0.0.1:8700", "fleet_token_env": "FT"}
    )
    with pytest.raises(NodeConfigError, match="no fleet token"):
        pusher_for_node(with_controller, environ={}, **callables)
    pusher = pusher_for_node(with_controller, environ={"FT": FLEET_TOKEN}, **callables)
    assert pusher is not None
    assert pusher.url == "http://127.0.0.1:8700/v1/push" and pusher.agent_id == "agent-1"


@async_test
async def test_the_pusher_lives_and_dies_with_an_agent_app(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestServer

    agent = Agent()
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        pusher = make_pusher(str(client.make_url("")), agent)
        agent_app = web.Application()
        agent_app.cleanup_ctx.append(pusher.lifecycle)
        server = TestServer(agent_app, host="127.0.0.1")
        await server.start_server()
        try:
            await eventually(lambda: pusher.acknowledged >= 2, what="pushes while serving")
            record(pusher, "alpha", T0, 3)
        finally:
            await server.close()  # runs the cleanup: stop, delivering what is left
        assert not pusher.has_unacknowledged_usage
        acknowledged = pusher.acknowledged
        await asyncio.sleep(0.2)
        assert pusher.acknowledged == acknowledged  # no pushes after the app stopped
        assert (await usage_by_tenant(client))["alpha"]["requests"] == 3


@async_test
async def test_a_failing_on_reply_does_not_resend_the_usage(tmp_path: Path) -> None:
    calls: list[int] = []

    def on_reply(reply: PushReply) -> None:
        calls.append(1)
        raise RuntimeError("the agent's handler broke")

    agent = Agent()
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        pusher = MetricsPusher(
            str(client.make_url("")),
            FLEET_TOKEN,
            agent_id="agent-1",
            snapshot=agent.snapshot,
            recent_use=agent.recent_use,
            on_reply=on_reply,
            **FAST,
        )
        record(pusher, "alpha", T0, 2)
        await pusher.push_once()
        await pusher.push_once()
        await pusher.stop()
        assert len(calls) == 2 and pusher.unacknowledged_seq is None
        assert (await usage_by_tenant(client))["alpha"]["requests"] == 2
        metrics = await (await client.get("/metrics")).text()
        assert 'fleetform_controller_pushes_total{result="accepted"} 2.0' in metrics
