"""A controller and two agents (a cheap pool and a dear one) in this process, on 127.0.0.1,
serving the real model: cost-aware routing with spill, streaming through a forward, the ledger
against what clients were told, a fleet-wide quota, budgets, and the hop protocol."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from agent.support import LiveAgent, LiveApp

from runtime.controller.local_fleet import free_port
from runtime.protocol import InstanceSnapshot, MetricsPush

from .support import (
    FLEET_TOKEN,
    KEYS,
    LIMITED_RPM,
    MESSAGES,
    MODEL,
    PUSH_INTERVAL_S,
    SPILL_MAX_TOKENS,
    admin,
    agent_requests,
    fleet_spec,
    forwarded_request,
    ledger_usage,
    openai_client,
    raw_stream,
    start_agent,
    start_controller,
    ttft_for_spill,
    wait_until,
)

CHEAP, DEAR = "cheap-agent", "dear-agent"


@dataclass
class Fleet:
    controller: LiveApp
    cheap: LiveAgent
    dear: LiveAgent

    @property
    def agents(self) -> tuple[LiveAgent, LiveAgent]:
        return self.cheap, self.dear

    def wait_idle(self) -> None:
        for agent in self.agents:
            agent.wait_idle()
            wait_until(lambda a=agent: not a.state.forwards, 30, "forwards to end")

    def wait_for_idle_views(self) -> None:
        """Until each agent's latest fleet view shows both agents, idle."""

        def settled(agent: LiveAgent) -> bool:
            def check() -> bool:
                reply = agent.state.fleet.reply if agent.state.fleet else None
                if reply is None:
                    return False
                peers = {p.instance_id: p for p in reply.fleet}
                return set(peers) == {CHEAP, DEAR} and all(
                    p.running == 0 and not p.queued_requests for p in peers.values()
                )

            return bool(agent.on_loop(check))

        wait_until(lambda: all(settled(a) for a in self.agents), 15, "idle fleet views")


@pytest.fixture(scope="module")
def fleet(
    engines: list[Any], prompt_tokens: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    spec = fleet_spec(ttft_ms=ttft_for_spill(prompt_tokens))
    controller = start_controller(spec, tmp_path_factory.mktemp("fleet") / "ledger.sqlite3")
    agents: list[LiveAgent] = []
    try:
        agents.append(start_agent(spec, "cheap", engines[0], controller.url))
        agents.append(start_agent(spec, "dear", engines[1], controller.url))
        fleet = Fleet(controller, *agents)
        fleet.wait_for_idle_views()
        yield fleet
    finally:
        for agent in reversed(agents):  # agents first: they deliver their last usage
            agent.stop()
        controller.stop()


def metric(agent: LiveAgent, line_start: str) -> float:
    for line in agent.metrics_text().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_burst_fills_the_cheap_pool_then_spills_to_the_dear_one(fleet: Fleet) -> None:
    # First in this module: the agents have measured nothing yet (see ttft_for_spill).
    fleet.wait_idle()
    fleet.wait_for_idle_views()
    client = openai_client(fleet.dear.url, "burst")  # the dear agent is the one called

    def one(_: int) -> tuple[str, Any]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=SPILL_MAX_TOKENS,
            extra_body={"ignore_eos": True},
        )
        return raw.headers["x-fleetform-served-by"], raw.parse()

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    served = Counter(node for node, _ in results)
    # The cheap agent has two batch slots: two requests meet the TTFT objective there; a third
    # would wait for a slot and miss it, so it stays on the dear agent, which is idle.
    routes = [line for line in fleet.dear.metrics_text().splitlines() if "routed" in line]
    assert served == {CHEAP: 2, DEAR: 1}, routes
    assert all(c.usage.completion_tokens == SPILL_MAX_TOKENS for _, c in results)
    assert (agent_requests(fleet.cheap, "burst"), agent_requests(fleet.dear, "burst")) == (2, 1)
    assert metric(fleet.dear, 'fleetform_routed_requests_total{outcome="routed",target="peer"}')
    assert metric(fleet.dear, 'fleetform_routed_requests_total{outcome="routed",target="local"}')


def test_a_forwarded_stream_arrives_chunk_by_chunk(fleet: Fleet) -> None:
    fleet.wait_idle()
    fleet.wait_for_idle_views()
    client = openai_client(fleet.dear.url, "stream")
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    assert raw.headers["x-fleetform-served-by"] == CHEAP  # idle and cheaper: forwarded
    arrivals: list[float] = []
    usage = None
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 24
    assert len(arrivals) >= 4
    # Passed on as generated, not collected first: the chunks span most of the generation.
    assert arrivals[-1] - arrivals[0] >= 0.3 * (arrivals[-1] - started)

    # The peer's usage comment (for the origin's quota) never reaches the client.
    body = raw_stream(
        fleet.dear.url, "stream", {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
    )
    assert b"fleetform-usage" not in body and b'"usage"' not in body
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") >= 3


def test_the_ledger_holds_what_the_clients_were_told(fleet: Fleet) -> None:
    tenant = "ledger"
    told = Counter[str]()

    def count(usage: Any) -> None:
        told["requests"] += 1
        told["prompt_tokens"] += usage.prompt_tokens
        told["completion_tokens"] += usage.completion_tokens

    for agent in (fleet.dear, fleet.cheap, fleet.dear):
        client = openai_client(agent.url, tenant)
        count(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8).usage)
    for agent in (fleet.dear, fleet.cheap):
        stream = openai_client(agent.url, tenant).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        count(next(c.usage for c in stream if c.usage is not None))

    def ledger() -> dict[str, int]:
        row = ledger_usage(fleet.controller, tenant)
        return {k: row[k] for k in ("requests", "prompt_tokens", "completion_tokens")}

    wait_until(lambda: ledger() == told, 15, f"the ledger to show {dict(told)}")
    time.sleep(4 * PUSH_INTERVAL_S)  # later pushes must not count anything again
    assert ledger() == told


def test_a_tenant_quota_holds_across_the_fleet(fleet: Fleet) -> None:
    def leased() -> list[int]:
        return [
            agent.on_loop(lambda a=agent: a.state.quotas.snapshot("limited")["requests_per_minute"])
            for agent in fleet.agents
        ]

    # The controller splits the fleet-wide limit; until the split is in force each agent
    # enforces the spec's limit alone (it has not heard of the other yet).
    wait_until(lambda: sum(leased()) == LIMITED_RPM and min(leased()) >= 1, 15, "leases")
    started = time.monotonic()
    statuses = []
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    for i in range(2 * LIMITED_RPM):
        agent = fleet.agents[i % 2]
        status, headers, answer = agent.request(
            "POST", "/v1/chat/completions", body, key=KEYS["limited"]
        )
        statuses.append(status)
        if status == 429:
            assert "requests_per_minute" in answer["error"]["message"]
            assert int(headers["retry-after"]) >= 1
    refill = math.ceil(LIMITED_RPM / 60 * (time.monotonic() - started))
    accepted = statuses.count(200)
    assert set(statuses) <= {200, 429}
    assert LIMITED_RPM // 2 <= accepted <= LIMITED_RPM + refill, statuses


def test_a_tenant_over_its_monthly_budget_is_refused_fleet_wide(fleet: Fleet) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    status, _, answer = fleet.cheap.request("POST", "/v1/chat/completions", body, KEYS["frugal"])
    assert status == 200, answer  # the controller learns of the spend with the next push

    def blocked(agent: LiveAgent) -> bool:
        return agent.on_loop(lambda: agent.state.quotas.tenants["frugal"].lease.blocked) == (
            "usd_per_month"
        )

    wait_until(lambda: all(blocked(a) for a in fleet.agents), 15, "budget blocks")
    for agent in fleet.agents:
        status, headers, answer = agent.request(
            "POST", "/v1/chat/completions", body, KEYS["frugal"]
        )
        assert status == 429, answer
        assert "monthly budget (usd_per_month)" in answer["error"]["message"]
        assert "retry-after" in headers


def test_a_forwarded_request_is_served_where_it_arrives_and_not_charged_again(
    fleet: Fleet,
) -> None:
    fleet.wait_idle()
    # One request per minute fleet-wide; forwarded requests (the hop limit is 1) are served by
    # the agent they reach, although a client's request there would go to the cheaper one.
    for _ in range(3):
        status, headers, answer = forwarded_request(fleet.dear, "hopper")
        assert status == 200, answer
        assert headers["x-fleetform-served-by"] == DEAR
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    client_statuses = [
        fleet.dear.request("POST", "/v1/chat/completions", body, KEYS["hopper"])[0]
        for _ in range(2)
    ]
    assert 429 in client_statuses  # a client's own requests are charged
    status, _, answer = forwarded_request(fleet.dear, "hopper", token="not-the-fleet-token")
    assert status == 401 and answer["error"]["code"] == "invalid_fleet_token"


def ghost_push(seq: int) -> bytes:
    """A push for an instance that claims to be the cheapest and fastest of the fleet, at an
    address where nothing listens."""
    instance = InstanceSnapshot(
        instance_id="ghost",
        pool="cheap",
        url=f"http://127.0.0.1:{free_port()}",
        model=MODEL,
        variant="q4-1",
        price_usd_per_hour=0.0,
        prefill_tokens_per_s=1e6,
        decode_tokens_per_s=1e6,
        decode_batch=1.0,
    )
    push = MetricsPush(
        agent_id="ghost", boot_id="ghost-boot", seq=seq, sent_at=time.time(), instance=instance
    )
    return push.model_dump_json().encode()


def test_a_peer_that_fails_is_skipped_until_it_pushes_again(fleet: Fleet) -> None:
    # Last in this module: the ghost stays in the fleet view until it is stale.
    fleet.wait_idle()
    failures = 'fleetform_forward_failures_total{reason="connect"}'
    before = metric(fleet.dear, failures)

    def ghost_seen_at() -> float | None:
        def read() -> float | None:
            reply = fleet.dear.state.fleet.reply  # type: ignore[union-attr]
            return next((p.last_seen for p in reply.fleet if p.instance_id == "ghost"), None)

        return fleet.dear.on_loop(read)

    def push_ghost(seq: int) -> None:
        status, _, body = fleet.controller.request(
            "POST",
            "/v1/push",
            ghost_push(seq),
            headers={**admin(FLEET_TOKEN), "Content-Type": "application/json"},
        )
        assert status == 200, body

    push_ghost(0)
    wait_until(lambda: ghost_seen_at() is not None, 10, "the ghost in the dear agent's view")
    client = openai_client(fleet.dear.url, "load")
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text  # tried on the ghost, failed before any token, served elsewhere
    assert metric(fleet.dear, failures) == before + 1

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=4
    )
    assert raw.headers["x-fleetform-served-by"] in (CHEAP, DEAR)
    assert metric(fleet.dear, failures) == before + 1  # not tried again: it has not pushed

    seen = ghost_seen_at()
    push_ghost(1)
    wait_until(lambda: (ghost_seen_at() or 0) > (seen or 0), 10, "the ghost's new push")
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert metric(fleet.dear, failures) == before + 2  # pushed again: a candidate again
