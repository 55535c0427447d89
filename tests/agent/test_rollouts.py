"""Rollouts on the agent side: two real agents (the embedded model, variants ``a`` and ``b``)
and a scripted controller on loopback that publishes the fleet view and a rollout directive of
the test's choosing, and keeps every push.

Both agents run the same GGUF (the shared engine of this session) registered under two variant
names: these tests only need distinct names, and identical weights make a shadow copy's greedy
output agree with the served one exactly. Requests are sent one at a time (and each test waits
for the shadow copies to be reported) because the two agents share one engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from runtime.protocol import RolloutDirective

from . import support
from .support import FLEET_TOKEN, KEYS, MODEL, LiveAgent, variant_agent, wait_until

FLEET_TOKEN_ENV = "FLEETFORM_TEST_FLEET_TOKEN"
PUSH_INTERVAL_S = 0.2
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow, briefly."}]


class ScriptedController(support.ScriptedController):
    """The support controller, with the per-agent figures these tests read."""

    def versions(self, agent_id: str) -> dict[str, Any]:
        """The latest per-variant counters an agent pushed."""
        for push in reversed(self.pushes):
            if push.agent_id == agent_id and push.versions:
                return {v.variant: v for v in push.versions}
        return {}

    def usage_requests(self, agent_id: str) -> int:
        return sum(
            row.requests for push in self.pushes if push.agent_id == agent_id for row in push.usage
        )


def directive(strategy: str, split: dict[str, float], shadow: float = 0.0) -> RolloutDirective:
    return RolloutDirective(
        stable="a",
        candidate="b",
        strategy=strategy,  # type: ignore[arg-type]
        phase="shadowing" if strategy == "shadow" else "canary",
        split=split,
        shadow_fraction=shadow,
    )


@pytest.fixture(scope="module")
def fleet(shared_engine: Any) -> Iterator[tuple[ScriptedController, LiveAgent, LiveAgent]]:
    controller = ScriptedController()
    agents = []
    for name, variant in (("node-a", "a"), ("node-b", "b")):
        agent = variant_agent(
            name,
            variant,
            controller.live.url,
            shared_engine,
            fleet_token_env=FLEET_TOKEN_ENV,
            push_interval_s=PUSH_INTERVAL_S,
        )
        agent.wait_ready()
        agents.append(agent)
    a, b = agents
    try:
        yield controller, a, b
    finally:
        for agent in agents:
            agent.stop()
        controller.live.stop()


def publish(
    controller: ScriptedController, agents: tuple[LiveAgent, ...], rollout: RolloutDirective
) -> None:
    """Set the directive and wait until every agent routes by it, with both peers in view."""
    controller.rollouts = {MODEL: rollout}

    def applied(agent: LiveAgent) -> bool:
        link = agent.state.fleet
        assert link is not None
        return (
            link.rollout(MODEL) == rollout
            and link.reply is not None
            and {p.instance_id for p in link.reply.fleet} == {"node-a", "node-b"}
        )

    wait_until(lambda: all(applied(a) for a in agents), 10, "the directive to reach the agents")


def chat(agent: LiveAgent, **extra: Any) -> tuple[int, dict[str, str], Any]:
    return agent.request(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, **extra},
        key=KEYS["demo"],
    )


def test_every_request_goes_to_the_variant_the_split_gives_all(
    fleet: tuple[ScriptedController, LiveAgent, LiveAgent],
) -> None:
    import openai

    controller, a, b = fleet
    publish(controller, (a, b), directive("canary", {"a": 0.0, "b": 1.0}))
    before = b.state.versions.versions.get((MODEL, "b"))
    served_before = before.finished if before else 0

    client = openai.OpenAI(api_key=KEYS["demo"], base_url=f"{a.url}/v1", max_retries=0, timeout=120)
    for _ in range(4):  # the client calls node-a, which serves variant a
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=4
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-fleetform-version"] == "b"
        assert raw.headers["x-fleetform-served-by"] == "node-b"
    status, headers, _ = chat(b)  # and node-b serves its own share itself
    assert status == 200 and headers["x-fleetform-version"] == "b"

    # node-b tallied them under variant b and pushed the counters (the model is in a rollout).
    wait_until(
        lambda: (
            (v := controller.versions("node-b").get("b")) is not None
            and v.finished >= served_before + 5
        ),
        10,
        "node-b's version counters",
    )
    stats = controller.versions("node-b")["b"]
    assert stats.errors == 0 and stats.samples_total >= 5
    assert all(ttft > 0 and (tpot is None or tpot > 0) for ttft, tpot in stats.recent)


def test_a_version_header_from_a_client_is_ignored_and_from_a_peer_is_answered(
    fleet: tuple[ScriptedController, LiveAgent, LiveAgent],
) -> None:
    from runtime.agent.forward import FLEET_TOKEN_HEADER, HOPS_HEADER, VERSION_HEADER

    controller, a, b = fleet
    publish(controller, (a, b), directive("canary", {"a": 1.0, "b": 0.0}))
    # A client cannot pick a version: the split (all on a) decides.
    status, headers, _ = chat(b, stream=False)
    assert status == 200 and headers["x-fleetform-version"] == "a"
    status, headers, _ = b.request(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
        key=KEYS["demo"],
        headers={VERSION_HEADER: "b"},
    )
    assert status == 200 and headers["x-fleetform-version"] == "a"
    # A peer naming a variant this node does not hold is served by the one it holds, which
    # the response says.
    status, headers, _ = a.request(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
        key=KEYS["demo"],
        headers={VERSION_HEADER: "b", HOPS_HEADER: "1", FLEET_TOKEN_HEADER: FLEET_TOKEN},
    )
    assert status == 200 and headers["x-fleetform-version"] == "a"


def tenant_requests(agent: LiveAgent) -> int:
    status, _, body = agent.request("GET", "/v1/usage", key=KEYS["demo"])
    assert status == 200, body
    return int(body["requests"])


def test_shadow_copies_are_compared_pushed_and_never_returned_or_billed(
    fleet: tuple[ScriptedController, LiveAgent, LiveAgent],
) -> None:
    controller, a, b = fleet
    publish(controller, (a, b), directive("shadow", {"a": 1.0, "b": 0.0}, shadow=1.0))
    reports_before = len(controller.shadow_reports())
    usage_a, usage_b = tenant_requests(a), tenant_requests(b)
    pushed_b = controller.usage_requests("node-b")
    expected = 0

    # Served on node-a (the stable variant), copied to node-b: plain, then streamed.
    for extra in ({}, {"stream": True}):
        status, headers, body = chat(a, **extra)
        assert status == 200 and headers["x-fleetform-version"] == "a"
        assert headers["x-fleetform-served-by"] == "node-a"
        expected += 1
        wait_until(
            lambda n=expected: len(controller.shadow_reports()) >= reports_before + n,
            30,
            "the shadow comparison",
        )
    # Sent to node-b (the candidate): routed to node-a, copied back to node-b itself.
    status, headers, body = chat(b)
    assert status == 200 and headers["x-fleetform-served-by"] == "node-a"
    assert set(body) >= {"id", "choices", "usage"} and body["id"].startswith("chatcmpl-")
    expected += 1
    wait_until(
        lambda: len(controller.shadow_reports()) >= reports_before + expected,
        30,
        "the third shadow comparison",
    )

    reports = controller.shadow_reports()[reports_before:]
    assert len(reports) == 3
    for report in reports:
        assert (report.model, report.stable, report.candidate) == (MODEL, "a", "b")
        assert not report.candidate_error
        # The same weights, greedy decoding: the copy's output is the served one.
        assert report.agreement == 1.0, report
        assert report.stable_latency_s and report.candidate_latency_s
    # The client was billed for its three requests, on node-a which served them; the copies
    # on node-b were billed to nobody, there or at the controller.
    assert tenant_requests(a) == usage_a + 3
    assert tenant_requests(b) == usage_b
    time.sleep(3 * PUSH_INTERVAL_S)
    assert controller.usage_requests("node-b") == pushed_b
    assert 'fleetform_shadow_requests_total{result="ok",side="served"} 3.0' in b.metrics_text()
    assert 'fleetform_shadow_requests_total{result="ok",side="sent"} 2.0' in a.metrics_text()
