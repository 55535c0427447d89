"""The controller service on 127.0.0.1: pushes (accepted, duplicate, 401, 400, 413), the fleet
view's staleness on an injected clock, leases across agents, usage scoping, budgets, restart on
the same ledger, and errors that reveal nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runtime.controller.app import CONTROLLER
from runtime.controller.ledger import hour_start, month_bounds
from runtime.protocol import PushReply

from .support import (
    ADMIN_TOKEN,
    ALPHA_USD_PER_MONTH,
    FLEET_TOKEN,
    HOUR,
    KEYS,
    QUOTAS,
    T0,
    FakeClock,
    async_test,
    auth,
    controller,
    make_config,
    push_body,
    snapshot,
    usage_by_tenant,
    usage_row,
)

H0 = hour_start(T0)


def assert_error(body: dict[str, Any], param: str | None, code: str | None = None) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


async def send(client: Any, body: Any, token: str = FLEET_TOKEN) -> tuple[int, Any]:
    response = await client.post("/v1/push", json=body, headers=auth(token))
    return response.status, await response.json()


async def accepted(client: Any, body: dict[str, Any]) -> PushReply:
    status, reply = await send(client, body)
    assert status == 200, reply
    return PushReply.model_validate(reply)


@async_test
async def test_a_push_is_accepted_once_and_its_retry_is_a_duplicate(tmp_path: Path) -> None:
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        body = push_body(
            "agent-1",
            0,
            usage=[usage_row("alpha", T0, requests=3, prompt_tokens=30, usd=0.5)],
            recent_use={"alpha": {"requests_per_minute": 6}},
        )
        first = await accepted(client, body)
        assert (first.accepted, first.duplicate, first.server_time) == (True, False, T0)
        assert [p.instance_id for p in first.fleet] == ["agent-1-instance"]
        assert first.fleet[0].last_seen == T0
        assert set(first.leases) == {"alpha", "beta", "gamma"}
        alpha = first.leases["alpha"]
        # Most of the quota: the spec plans a second agent, which keeps a floor share.
        assert 0.5 < alpha.requests_per_minute / QUOTAS["alpha"]["requests_per_minute"] < 1
        assert alpha.expires_at is not None and alpha.expires_at > T0
        assert first.leases["gamma"].requests_per_minute is None  # no quota: unlimited

        retry = await accepted(client, body)
        assert (retry.accepted, retry.duplicate) == (False, True)
        assert retry.fleet == first.fleet and retry.leases == first.leases

        totals = await usage_by_tenant(client)
        assert totals["alpha"]["requests"] == 3 and totals["alpha"]["usd"] == 0.5

        text = await (await client.get("/metrics")).text()
        assert 'fleetform_controller_pushes_total{result="accepted"} 1.0' in text
        assert 'fleetform_controller_pushes_total{result="duplicate"} 1.0' in text
        assert "fleetform_controller_live_agents 1.0" in text


@async_test
async def test_pushes_without_the_fleet_token_are_refused(tmp_path: Path) -> None:
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        body = push_body(usage=[usage_row("alpha", T0, requests=1)])
        for headers in ({}, auth("wrong"), auth(ADMIN_TOKEN), {"Authorization": FLEET_TOKEN}):
            response = await client.post("/v1/push", json=body, headers=headers)
            assert response.status == 401
            assert_error(await response.json(), None, "invalid_api_key")
        assert (await usage_by_tenant(client))["alpha"]["requests"] == 0
        text = await (await client.get("/metrics")).text()
        assert 'fleetform_controller_pushes_total{result="rejected"} 4.0' in text


@pytest.mark.parametrize(
    ("mutate", "param", "code"),
    [
        (lambda b: b.pop("seq"), "seq", "invalid_value"),
        (lambda b: b["instance"].pop("url"), "instance.url", "invalid_value"),
        (lambda b: b["instance"].update(kv_usage=1.5), "instance.kv_usage", "invalid_value"),
        (lambda b: b.update(seq=-1), "seq", "invalid_value"),
        (lambda b: b["usage"][0].update(requests=-2), "usage[0].requests", "invalid_value"),
        (lambda b: b["usage"][0].update(hour=H0 + 60), "usage[0].hour", "invalid_value"),
        (lambda b: b.update(colour="blue"), "colour", "unknown_parameter"),
    ],
)
def test_a_malformed_push_gets_a_400_naming_the_field(
    tmp_path: Path, mutate: Any, param: str, code: str
) -> None:
    @async_test
    async def scenario() -> None:
        async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
            body = push_body(usage=[usage_row("alpha", T0, requests=1)])
            mutate(body)
            status, reply = await send(client, body)
            assert status == 400
            assert_error(reply, param, code)
            assert param in reply["error"]["message"]
            assert (await usage_by_tenant(client))["alpha"]["requests"] == 0

    scenario()


@async_test
async def test_bodies_that_are_not_a_push_are_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path / "l.db", max_body_bytes=4096)
    async with controller(config, FakeClock()) as client:
        headers = {**auth(FLEET_TOKEN), "Content-Type": "application/json"}
        response = await client.post("/v1/push", data=b"{not json", headers=headers)
        assert response.status == 400
        assert_error(await response.json(), None, "invalid_json")
        status, reply = await send(client, [push_body()])
        assert status == 400 and reply["error"]["code"] == "invalid_value"
        big = push_body(instance=snapshot(url="http://x/" + "y" * 5000))
        response = await client.post("/v1/push", json=big, headers=auth(FLEET_TOKEN))
        assert response.status == 413
        assert_error(await response.json(), None, "request_too_large")
        response = await client.get("/v1/push")
        assert response.status == 405


@async_test
async def test_agents_that_stop_pushing_leave_the_view(tmp_path: Path) -> None:
    clock = FakeClock()
    async with controller(make_config(tmp_path / "l.db"), clock) as client:
        await accepted(client, push_body("agent-a", 0))
        clock.advance(10)
        reply = await accepted(client, push_body("agent-b", 0))
        assert [p.instance_id for p in reply.fleet] == ["agent-a-instance", "agent-b-instance"]
        clock.advance(6)  # a's last push is 16 s old; the spec says stale after 15
        reply = await accepted(client, push_body("agent-b", 1))
        assert [p.instance_id for p in reply.fleet] == ["agent-b-instance"]

        response = await client.get("/v1/fleet", headers=auth(ADMIN_TOKEN))
        assert response.status == 200
        view = await response.json()
        agents = {a["agent_id"]: a for a in view["agents"]}
        assert view["stale_after_s"] == 15 and view["live_agents"] == 1
        assert agents["agent-a"]["fresh"] is False and agents["agent-a"]["age_s"] == 16
        # a may still be serving on its lease, so it is still accounted for.
        assert agents["agent-a"]["in_lease_accounting"] is True
        assert agents["agent-b"]["fresh"] is True and agents["agent-b"]["seq"] == 1
        text = await (await client.get("/metrics")).text()
        assert "fleetform_controller_live_agents 1.0" in text

        clock.advance(30)  # every lease of a has expired
        response = await client.get("/v1/fleet", headers=auth(ADMIN_TOKEN))
        agents = {a["agent_id"]: a for a in (await response.json())["agents"]}
        assert agents["agent-a"]["in_lease_accounting"] is False
        for token in (FLEET_TOKEN, KEYS["alpha"]):
            response = await client.get("/v1/fleet", headers=auth(token))
            assert response.status == 401


@async_test
async def test_leases_of_two_agents_never_sum_past_the_quota(tmp_path: Path) -> None:
    clock = FakeClock()
    async with controller(make_config(tmp_path / "l.db"), clock) as client:
        held: dict[str, dict[str, Any]] = {}
        use = {"agent-a": 40.0, "agent-b": 10.0}
        for seq in range(6):
            for agent in ("agent-a", "agent-b"):
                clock.advance(1)
                recent = {
                    "alpha": {"requests_per_minute": use[agent], "concurrency": use[agent] / 10},
                    "beta": {"tokens_per_minute": use[agent] * 100},
                }
                reply = await accepted(client, push_body(agent, seq, recent_use=recent))
                held[agent] = reply.leases
                for tenant, quota in QUOTAS.items():
                    for limit, value in quota.items():
                        granted = [getattr(held[a][tenant], limit) for a in held]
                        assert sum(granted) <= value, (tenant, limit, granted)
        # Once both have renewed a few times, the whole quota is in use, mostly where the
        # traffic is.
        alpha = {a: held[a]["alpha"].requests_per_minute for a in held}
        assert sum(alpha.values()) == QUOTAS["alpha"]["requests_per_minute"]
        assert alpha["agent-a"] > alpha["agent-b"] > 0


@async_test
async def test_usage_is_scoped_by_who_asks(tmp_path: Path) -> None:
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        usage = [
            usage_row("alpha", T0, requests=2, prompt_tokens=20, completion_tokens=5, usd=0.25),
            usage_row("alpha", T0 - HOUR, requests=1, usd=0.5),
            usage_row("beta", T0, requests=7, accelerator_seconds=36.0),
        ]
        await accepted(client, push_body("agent-a", 0, usage=usage))
        await accepted(
            client,
            push_body(
                "agent-b",
                0,
                instance=snapshot("dear-1", "dear"),
                usage=[usage_row("alpha", T0, requests=4, usd=1.0)],
            ),
        )

        everyone = await usage_by_tenant(client)
        assert set(everyone) == {"alpha", "beta", "gamma"}  # gamma: no usage, still listed
        assert everyone["alpha"]["requests"] == 7 and everyone["alpha"]["usd"] == 1.75
        assert everyone["alpha"]["total_tokens"] == 25
        assert everyone["beta"]["accelerator_seconds"] == 36.0
        assert everyone["gamma"]["requests"] == 0

        response = await client.get("/v1/usage", headers=auth(KEYS["alpha"]))
        assert response.status == 200
        own = await response.json()
        assert own["scope"] == "tenant" and {r["tenant"] for r in own["data"]} == {"alpha"}
        assert [b["tenant"] for b in own["month"]["budgets"]] == ["alpha"]
        assert "fleet" not in own["month"]
        # A tenant cannot widen its scope with parameters.
        response = await client.get(
            "/v1/usage", params={"group_by": "pool"}, headers=auth(KEYS["alpha"])
        )
        rows = (await response.json())["data"]
        assert {(r["tenant"], r["pool"], r["requests"]) for r in rows} == {
            ("alpha", "cheap", 3),
            ("alpha", "dear", 4),
        }
        # beta's key is an env: reference, resolved when the config was built.
        response = await client.get(
            "/v1/usage", params={"group_by": "hour"}, headers=auth(KEYS["beta"])
        )
        assert [
            (r["tenant"], r["hour"], r["requests"]) for r in (await response.json())["data"]
        ] == [("beta", H0, 7)]
        response = await client.get(
            "/v1/usage",
            params={"group_by": "hour", "since": str(H0)},
            headers=auth(ADMIN_TOKEN),
        )
        hours = {(r["tenant"], r["hour"]): r["requests"] for r in (await response.json())["data"]}
        assert hours == {("alpha", H0): 6, ("beta", H0): 7}
        response = await client.get(
            "/v1/usage", params={"until": str(H0)}, headers=auth(ADMIN_TOKEN)
        )
        rows = {r["tenant"]: r["requests"] for r in (await response.json())["data"]}
        assert rows == {"alpha": 1, "beta": 0, "gamma": 0}

        for headers in ({}, auth("sk-nobody"), auth(FLEET_TOKEN)):
            response = await client.get("/v1/usage", headers=headers)
            assert response.status == 401
            assert_error(await response.json(), None, "invalid_api_key")


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("since=yesterday", "since"),
        ("until=-5", "until"),
        ("since=nan", "since"),
        (f"since={T0}&until={T0 - 1}", "until"),
        ("group_by=day", "group_by"),
        ("group_by=hour&group_by=pool", "group_by"),
        ("tenant=beta", "tenant"),
    ],
)
def test_bad_usage_parameters_get_a_400_naming_them(tmp_path: Path, query: str, param: str) -> None:
    @async_test
    async def scenario() -> None:
        async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
            response = await client.get(f"/v1/usage?{query}", headers=auth(KEYS["alpha"]))
            assert response.status == 400
            body = await response.json()
            assert_error(body, param)
            assert param in body["error"]["message"]

    scenario()


@async_test
async def test_budgets_flag_tenants_and_the_fleet(tmp_path: Path) -> None:
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        reply = await accepted(
            client, push_body(usage=[usage_row("alpha", T0, requests=1, usd=4.75)])
        )
        assert reply.over_budget_tenants == [] and not reply.fleet_over_budget
        # The push that reaches the budget is answered with the tenant already flagged.
        reply = await accepted(
            client, push_body(seq=1, usage=[usage_row("alpha", T0, requests=1, usd=0.25)])
        )
        assert reply.over_budget_tenants == ["alpha"] and not reply.fleet_over_budget
        reply = await accepted(
            client,
            push_body(
                seq=2,
                usage=[
                    usage_row("beta", T0, requests=1, accelerator_seconds=3600.0),
                    usage_row("gamma", T0, requests=1, usd=15.0),
                ],
            ),
        )
        assert reply.over_budget_tenants == ["alpha", "beta"] and reply.fleet_over_budget
        # Last month's spending does not count against this month.
        body = await (await client.get("/v1/usage", headers=auth(ADMIN_TOKEN))).json()
        budgets = {b["tenant"]: b for b in body["month"]["budgets"]}
        assert budgets["alpha"]["usd"] == ALPHA_USD_PER_MONTH and budgets["alpha"]["over_budget"]
        assert budgets["beta"]["accelerator_hours"] == 1.0
        assert body["month"]["fleet"] == {"usd": 20.0, "usd_per_month": 20.0, "over_budget": True}


@async_test
async def test_last_months_usage_does_not_spend_this_months_budget(tmp_path: Path) -> None:
    clock = FakeClock()
    async with controller(make_config(tmp_path / "l.db"), clock) as client:
        await accepted(client, push_body(usage=[usage_row("alpha", T0, usd=100.0)]))
        clock.advance(31 * 86400)  # April
        reply = await accepted(client, push_body(seq=1))
        assert reply.over_budget_tenants == [] and not reply.fleet_over_budget
        assert (await usage_by_tenant(client))["alpha"]["usd"] == 0.0  # this month: April
        april = month_bounds(clock.now)[0]
        march = await usage_by_tenant(client, until=april)  # the month the range ends in
        assert march["alpha"]["usd"] == 100.0


@async_test
async def test_a_restarted_controller_loses_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path / "l.db")
    usage = [usage_row("alpha", T0, requests=5, prompt_tokens=50, usd=1.25)]
    async with controller(config, FakeClock()) as client:
        await accepted(client, push_body("agent-a", 0, usage=usage))
        await accepted(client, push_body("agent-a", 1, usage=[usage_row("beta", T0, requests=2)]))
        before = await usage_by_tenant(client)
    async with controller(config, FakeClock(T0 + 60)) as client:
        assert await usage_by_tenant(client) == before
        # The agent never got the reply to seq 1 and retries it: still counted once.
        reply = await accepted(
            client, push_body("agent-a", 1, usage=[usage_row("beta", T0, requests=2)])
        )
        assert reply.duplicate
        assert (await usage_by_tenant(client))["beta"]["requests"] == 2
        assert (await usage_by_tenant(client))["alpha"]["usd"] == 1.25


@async_test
async def test_an_unexpected_error_is_a_500_that_reveals_nothing(tmp_path: Path) -> None:
    def break_ledger(app: web.Application) -> None:
        async def started(app: web.Application) -> None:
            def explode(**_: Any) -> bool:
                raise RuntimeError("secret internal detail at /srv/ledger.db")

            app[CONTROLLER].require_ledger().record_push = explode  # type: ignore[method-assign]

        app.on_startup.append(started)

    async with controller(make_config(tmp_path / "l.db"), FakeClock(), prepare=break_ledger) as c:
        response = await c.post("/v1/push", json=push_body(), headers=auth(FLEET_TOKEN))
        assert response.status == 500
        text = await response.text()
        assert "secret" not in text and "Traceback" not in text
        assert_error(json.loads(text), None, "internal_error")
        health = await c.get("/healthz")
        assert health.status == 200 and (await health.json())["status"] == "ok"
        response = await c.get("/nowhere")
        assert response.status == 404
        assert_error(await response.json(), None, "not_found")
