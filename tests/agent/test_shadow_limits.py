"""Shadow copies (model rollouts) under load and at shutdown: a real agent (``node-a``, variant
``a``, the embedded model), a scripted controller on loopback that publishes a shadow rollout
(``a`` stable, ``b`` candidate, every request copied), and a candidate ``node-b`` that is no
agent but a small server of the test's own: it holds every copy it receives until the test
releases it, so the test sees how many copies are in flight at once, and whether they were
answered or cancelled.

Each test builds its own agent (over the session's shared engine: no model reload), because the
shutdown test stops it and both tests read absolute counters.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runtime.agent.app import MAX_SHADOW_IN_FLIGHT
from runtime.agent.forward import (
    FLEET_TOKEN_HEADER,
    SHADOW_HEADER,
    VERSION_HEADER,
)
from runtime.protocol import InstanceSnapshot, RolloutDirective

from .support import (
    FLEET_TOKEN,
    KEYS,
    MODEL,
    LiveAgent,
    LiveApp,
    ScriptedController,
    variant_agent,
)
from .support import wait_until as _wait_until

wait_until = functools.partial(_wait_until, poll_s=0.01)

FLEET_TOKEN_ENV = "FLEETFORM_TEST_FLEET_TOKEN"
PUSH_INTERVAL_S = 0.2
MESSAGES = [{"role": "user", "content": "Name a colour of the rainbow."}]
CANDIDATE_ANSWER = "Red."
SHADOW = RolloutDirective(
    stable="a",
    candidate="b",
    strategy="shadow",
    phase="shadowing",
    split={"a": 1.0, "b": 0.0},
    shadow_fraction=1.0,
)
# A shutdown that waited for the held copies would take the forward read timeout (120 s).
SHUTDOWN_BOUND_S = 3.0


class HoldingPeer:
    """The candidate instance: answers every copy with a fixed chat completion, but only once
    released; counts the copies in flight (and the most at once) and the ones cancelled."""

    def __init__(self) -> None:
        self.copies: list[tuple[CIMultiDict[str], Any]] = []
        self.active = 0
        self.max_active = 0
        self.answered = 0
        self.cancelled = 0
        self._released = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.live = LiveApp(app)  # handler_cancellation: a client gone cancels the handler

    async def chat(self, request: web.Request) -> web.Response:
        self.copies.append((request.headers.copy(), await request.json()))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self._released.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        self.answered += 1
        answer = {
            "id": "chatcmpl-candidate",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": CANDIDATE_ANSWER},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        }
        return web.json_response(
            answer, headers={"X-Fleetform-Served-By": "node-b", VERSION_HEADER: "b"}
        )

    def release(self) -> None:
        self.live.on_loop(self._released.set)


class Controller(ScriptedController):
    """Publishes the shadow rollout and a fleet of the pushing agents plus ``node-b`` (the
    :class:`HoldingPeer`, shown with node-a's last load, healthy); keeps every push."""

    def __init__(self, candidate_url: str) -> None:
        super().__init__()
        self.candidate_url = candidate_url
        self.rollouts = {MODEL: SHADOW}

    def extra_peers(self, latest: dict[str, InstanceSnapshot]) -> list[InstanceSnapshot]:
        candidate = latest["node-a"].model_copy(
            update={
                "instance_id": "node-b",
                "pool": "pool-b",
                "variant": "b",
                "url": self.candidate_url,
                "healthy": True,
            }
        )
        return [candidate]


@dataclass
class ShadowFleet:
    controller: Controller
    peer: HoldingPeer
    agent: LiveAgent
    stopped: bool = False

    def stop_agent(self, within_s: float = 60) -> float:
        """Shut the agent down (once) and return how long it took. Past ``within_s`` this fails,
        after releasing the peer's copies so that the shutdown can end."""
        if self.stopped:
            return 0.0
        self.stopped = True
        agent = self.agent
        assert agent.runner is not None
        started = time.monotonic()
        cleanup = asyncio.run_coroutine_threadsafe(agent.runner.cleanup(), agent.loop)
        try:
            cleanup.result(within_s)
        except TimeoutError:
            self.peer.release()
            cleanup.result(60)
            raise AssertionError(f"the agent's shutdown took over {within_s}s") from None
        finally:
            elapsed = time.monotonic() - started
            agent.runner = None  # cleaned up: stop() only stops its loop
            agent.stop()
        return elapsed


@pytest.fixture
def fleet(shared_engine: Any) -> Iterator[ShadowFleet]:
    peer = HoldingPeer()
    controller = Controller(peer.live.url)
    agent = variant_agent(
        "node-a",
        "a",
        controller.live.url,
        shared_engine,
        fleet_token_env=FLEET_TOKEN_ENV,
        push_interval_s=PUSH_INTERVAL_S,
    )
    shadow_fleet = ShadowFleet(controller, peer, agent)
    try:
        agent.wait_ready()

        def applied() -> bool:
            link = agent.state.fleet
            assert link is not None
            return (
                link.rollout(MODEL) == SHADOW
                and link.reply is not None
                and {p.instance_id for p in link.reply.fleet} == {"node-a", "node-b"}
            )

        wait_until(applied, 10, "the shadow rollout to reach node-a")
        yield shadow_fleet
    finally:
        peer.release()  # else the peer's shutdown would wait for copies it still holds
        shadow_fleet.stop_agent()
        peer.live.stop()
        controller.live.stop()


def chat(agent: LiveAgent) -> str:
    """One client request through the official client; returns its request id."""
    import openai

    with openai.OpenAI(
        api_key=KEYS["demo"], base_url=f"{agent.url}/v1", max_retries=0, timeout=60
    ) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0
        )
    assert raw.parse().choices[0].message.content is not None
    assert raw.headers["x-fleetform-version"] == "a"
    assert raw.headers["x-fleetform-served-by"] == "node-a"
    return raw.headers["x-request-id"]


def shadow_counts(exposition: str) -> dict[tuple[str, str], float]:
    """``fleetform_shadow_requests_total`` by (side, result), from Prometheus text."""
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "fleetform_shadow_requests_total":
                counts[(sample.labels["side"], sample.labels["result"])] = sample.value
    return counts


def shadows_in_flight(agent: LiveAgent) -> int:
    return int(agent.on_loop(lambda: len(agent.state.shadows)))


def test_at_most_four_copies_are_in_flight_and_the_rest_are_skipped_and_counted(
    fleet: ShadowFleet,
) -> None:
    controller, peer, agent = fleet.controller, fleet.peer, fleet.agent
    assert MAX_SHADOW_IN_FLIGHT == 4
    extra = 2

    # Four requests, each copied to node-b, which holds the copies open.
    copied = []
    for n in range(1, MAX_SHADOW_IN_FLIGHT + 1):
        copied.append(chat(agent))
        wait_until(lambda n=n: peer.active == n, 10, f"copy {n} to reach node-b")
    assert shadows_in_flight(agent) == MAX_SHADOW_IN_FLIGHT
    # More requests while four copies are in flight: answered as usual, not copied. The copy is
    # decided before the response is written, so the counter is final once the client has it.
    for _ in range(extra):
        chat(agent)
    assert shadows_in_flight(agent) == MAX_SHADOW_IN_FLIGHT
    assert len(peer.copies) == MAX_SHADOW_IN_FLIGHT
    assert peer.max_active == MAX_SHADOW_IN_FLIGHT
    text = agent.metrics_text()
    assert f'fleetform_shadow_requests_total{{result="skipped_busy",side="sent"}} {extra}.0' in text
    counts = shadow_counts(text)
    assert counts == {("sent", "skipped_busy"): extra}, counts  # nothing sent has ended yet
    assert controller.shadow_reports() == []

    # Each copy is the client's request, never streamed, marked as a shadow for variant b.
    for headers, body in peer.copies:
        assert headers[SHADOW_HEADER] == "1"
        assert headers[VERSION_HEADER] == "b"
        assert headers[FLEET_TOKEN_HEADER] == FLEET_TOKEN
        assert body["messages"] == MESSAGES and body["stream"] is False

    # Released: all four are answered, compared and pushed; nothing more was ever sent.
    peer.release()
    wait_until(lambda: len(controller.shadow_reports()) >= 4, 10, "the four shadow reports")
    reports = controller.shadow_reports()
    assert sorted(r.request_id for r in reports) == sorted(copied)
    for report in reports:
        assert (report.model, report.stable, report.candidate) == (MODEL, "a", "b")
        assert not report.candidate_error, report
    wait_until(lambda: shadows_in_flight(agent) == 0, 5, "the copies to end")
    assert peer.answered == MAX_SHADOW_IN_FLIGHT and peer.cancelled == 0
    assert shadow_counts(agent.metrics_text()) == {
        ("sent", "ok"): MAX_SHADOW_IN_FLIGHT,
        ("sent", "skipped_busy"): extra,
    }

    # The limit is on copies in flight, not a budget: with the slots free, the next is copied.
    later = chat(agent)
    wait_until(
        lambda: any(r.request_id == later for r in controller.shadow_reports()), 10, "its report"
    )
    assert len(peer.copies) == MAX_SHADOW_IN_FLIGHT + 1
    assert peer.max_active == MAX_SHADOW_IN_FLIGHT
    assert shadow_counts(agent.metrics_text()) == {
        ("sent", "ok"): MAX_SHADOW_IN_FLIGHT + 1,
        ("sent", "skipped_busy"): extra,
    }


def test_shutdown_cancels_the_copies_in_flight_promptly_and_reports_none(
    fleet: ShadowFleet,
) -> None:
    controller, peer, agent = fleet.controller, fleet.peer, fleet.agent
    copied = []
    for n in range(1, MAX_SHADOW_IN_FLIGHT + 1):
        copied.append(chat(agent))
        wait_until(lambda n=n: peer.active == n, 10, f"copy {n} to reach node-b")
    pusher = agent.state.pusher
    assert pusher is not None

    # node-b still holds all four copies (and would for the 120 s read timeout) when the agent
    # shuts down: the copies are cancelled, not waited for.
    elapsed = fleet.stop_agent(within_s=SHUTDOWN_BOUND_S)
    assert elapsed < SHUTDOWN_BOUND_S
    assert agent.state.closing and not agent.state.shadows

    # node-b saw each copy's connection go: its handlers were cancelled, none answered.
    wait_until(lambda: peer.cancelled == MAX_SHADOW_IN_FLIGHT, 5, "node-b to see the cancels")
    assert peer.active == 0 and peer.answered == 0
    assert len(peer.copies) == MAX_SHADOW_IN_FLIGHT

    # A cancelled copy is no evidence: neither counted as sent, nor queued, nor pushed.
    counts = shadow_counts(generate_latest(agent.state.metrics.registry).decode())
    assert counts == {}, counts
    assert not pusher.shadow_pending and pusher.shadow_dropped == 0
    pushed = {r.request_id for r in controller.shadow_reports()}
    assert pushed.isdisjoint(copied), pushed
