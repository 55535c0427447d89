"""Model rollouts end to end on loopback: a real controller (its rollout loop every 0.3 s) and
two real agents with the embedded model, the ``openai`` client sending the traffic.

The stable variant ``q4-1`` runs in pool ``cheap``, the candidate ``q4-1-b`` in pool ``dear``.
Both are the same bundled GGUF registered under two variant names (these tests only need
distinct names; a real re-encoded variant from ``fleetform variant`` would cost a minute of
CPU and another model load for nothing the tests check): the replace test needs a candidate to
switch to, the canary test makes its candidate slow with the fault-injection knob
``inject_delay_ms``, and the shadow test expects identical greedy outputs.

(a) blue/green ``replace`` under steady load: zero failed requests, and once the switch is
    published every request is served by the candidate;
(b) a ``canary`` of a deliberately slowed candidate is rolled back automatically, the decision
    recorded with its reasons, and traffic returns to the stable variant;
(c) a ``shadow`` run records comparisons (agreement reported at ``GET /v1/rollouts``) while
    every client answer comes from the stable variant and the tenant is billed only for its own
    requests.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.spec import FleetSpec, parse_fleet

from .support import (
    MESSAGES,
    MODEL,
    PUSH_INTERVAL_S,
    admin,
    ledger_usage,
    openai_client,
    spec_data,
    start_agent,
    start_controller,
    wait_until,
)

STABLE, CANDIDATE = "q4-1", "q4-1-b"
ROLLOUT_PERIOD_S = 0.3
TENANT = "load"


def rollout_spec(**rollout: Any) -> FleetSpec:
    data = spec_data()
    model = data["models"][0]
    twin = copy.deepcopy(model["variants"][0])
    twin["name"] = CANDIDATE
    model["variants"].append(twin)
    model["rollout"] = {"stable": STABLE, "candidate": CANDIDATE, **rollout}
    data["pools"][1]["serves"]["variant"] = CANDIDATE  # pool "dear"
    return parse_fleet(data)


def rollout_status(controller: Any) -> dict[str, Any]:
    status, _, body = controller.request("GET", "/v1/rollouts", headers=admin())
    assert status == 200, body
    [rollout] = body["rollouts"]
    return dict(rollout)


@dataclass
class Answer:
    started: float
    version: str
    served_by: str
    text: str


@dataclass
class Load:
    """Clients sending chat requests in a loop, each answer and failure kept."""

    url: str
    clients: int = 2
    max_tokens: int = 6
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        client = openai_client(self.url, TENANT)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=self.max_tokens, temperature=0
                )
                text = raw.parse().choices[0].message.content or ""
                answer = Answer(
                    started,
                    raw.headers["x-fleetform-version"],
                    raw.headers["x-fleetform-served-by"],
                    text,
                )
                with self.lock:
                    self.answers.append(answer)
            except Exception as error:  # every failure is kept and fails the test
                with self.lock:
                    self.failures.append(repr(error))

    def count(self) -> int:
        with self.lock:
            return len(self.answers)


@contextmanager
def load(url: str, **options: Any) -> Iterator[Load]:
    traffic = Load(url, **options)
    threads = [threading.Thread(target=traffic.run, daemon=True) for _ in range(traffic.clients)]
    for thread in threads:
        thread.start()
    try:
        yield traffic
    finally:
        traffic.stop.set()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)


@contextmanager
def fleet(spec: FleetSpec, tmp_path: Path) -> Iterator[Any]:
    controller = start_controller(spec, tmp_path / "l.db", rollout_period_s=ROLLOUT_PERIOD_S)
    try:
        yield controller
    finally:
        controller.stop()


def test_blue_green_replace_under_load_fails_nothing_and_ends_on_the_candidate(
    tmp_path: Path, engines: list[Any]
) -> None:
    spec = rollout_spec(strategy="replace", drain_s=1)
    with fleet(spec, tmp_path) as controller:
        stable = start_agent(spec, "cheap", engines[0], controller.url)
        candidate = None
        try:
            with load(stable.url) as traffic:
                # Only the stable version exists: the rollout waits, stable serves everything.
                wait_until(lambda: traffic.count() >= 4, 60, "answers from the stable version")
                waiting = rollout_status(controller)
                assert waiting["phase"] == "pending"
                assert "waiting for candidate 'q4-1-b'" in waiting["latest"]["reasons"][0]

                # The candidate joins; once it is ready the switch is decided and published.
                candidate = start_agent(spec, "dear", engines[1], controller.url)
                wait_until(
                    lambda: rollout_status(controller)["phase"] in ("switching", "done"),
                    30,
                    "the switch to the candidate",
                )
                switched_at = time.monotonic()
                # A push interval for every agent to have the new split, and a margin.
                settled = switched_at + 3 * PUSH_INTERVAL_S + 0.5
                wait_until(
                    lambda: sum(a.started > settled for a in list(traffic.answers)) >= 6,
                    60,
                    "answers after the switch",
                )
            assert traffic.failures == []
            before = [a for a in traffic.answers if a.started < switched_at]
            after = [a for a in traffic.answers if a.started > settled]
            assert before and {a.version for a in before[:4]} == {STABLE}
            assert {a.version for a in after} == {CANDIDATE}, [a.version for a in after]
            assert {a.served_by for a in after} == {"dear-agent"}

            wait_until(
                lambda: rollout_status(controller)["phase"] == "done", 10, "the stable drain"
            )
            done = rollout_status(controller)
            assert done["split"] == {CANDIDATE: 1.0, STABLE: 0.0}
            assert [e["action"] for e in done["events"]][-1] == "promote"
            assert "switching all traffic to it" in done["events"][-1]["reasons"][0]
        finally:
            for agent in (candidate, stable):
                if agent is not None:
                    agent.stop()


def test_a_canary_of_a_slowed_variant_is_rolled_back(tmp_path: Path, engines: list[Any]) -> None:
    spec = rollout_spec(
        strategy="canary",
        steps=[50, 100],
        step_interval_s=600,  # no step up during the test: the canary is judged at step 1
        min_requests=3,
        max_error_rate_delta=0.2,
        ttft_ratio=1.5,
        tpot_ratio=1.5,
    )
    with fleet(spec, tmp_path) as controller:
        stable = start_agent(spec, "cheap", engines[0], controller.url)
        # Every engine step of the candidate takes 1.5 s more. That is far beyond the 1.5x
        # margin on any machine (a step of SmolLM2 takes tens of milliseconds; even when
        # other work slows this shared machine's steps tenfold, stable stays well within 3 s,
        # the stable step time at which 1.5 s extra would still pass as 1.5x).
        slow = start_agent(spec, "dear", engines[1], controller.url, inject_delay_ms=1500)
        try:
            wait_until(
                lambda: rollout_status(controller)["phase"] == "canary", 20, "the canary to start"
            )
            with load(stable.url, clients=3, max_tokens=4) as traffic:
                wait_until(
                    lambda: rollout_status(controller)["phase"] == "rolled-back",
                    180,
                    "the roll back",
                )
                rolled_back_at = time.monotonic()
                settled = rolled_back_at + 3 * PUSH_INTERVAL_S + 0.5
                wait_until(
                    lambda: sum(a.started > settled for a in list(traffic.answers)) >= 4,
                    60,
                    "answers after the roll back",
                )
            assert traffic.failures == []
            during = [a for a in traffic.answers if a.started < rolled_back_at]
            assert {a.version for a in during} == {STABLE, CANDIDATE}  # the 50 % step
            after = [a for a in traffic.answers if a.started > settled]
            assert {a.version for a in after} == {STABLE}

            status = rollout_status(controller)
            assert status["split"] == {CANDIDATE: 0.0, STABLE: 1.0}
            back = status["events"][0]
            assert back["action"] == "roll_back" and back["phase"] == "rolled-back"
            breaches = [r for r in back["reasons"] if " breach: candidate " in r]
            assert breaches, back["reasons"]
            assert any(r.startswith(("TTFT p95 breach", "TPOT p95 breach")) for r in breaches)
            assert "rolled back from step 1 of 2 (50 %): all traffic to 'q4-1'" in back["reasons"]
        finally:
            slow.stop()
            stable.stop()


def test_a_shadow_run_records_comparisons_and_no_copy_reaches_a_client(
    tmp_path: Path, engines: list[Any]
) -> None:
    spec = rollout_spec(strategy="shadow", sample_fraction=1.0)
    requests = 6
    with fleet(spec, tmp_path) as controller:
        stable = start_agent(spec, "cheap", engines[0], controller.url)
        candidate = start_agent(spec, "dear", engines[1], controller.url)
        try:
            wait_until(
                lambda: rollout_status(controller)["phase"] == "shadowing",
                20,
                "the shadow run to start",
            )
            wait_until(
                lambda: (
                    (link := stable.state.fleet) is not None
                    and (d := link.rollout(MODEL)) is not None
                    and d.shadow_fraction == 1.0
                ),
                10,
                "the agents to shadow",
            )
            client = openai_client(stable.url, TENANT)
            answers = []
            for _ in range(requests):
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0
                )
                answers.append((raw.headers, raw.parse()))
            # Every answer is the stable version's, one per request.
            assert [h["x-fleetform-version"] for h, _ in answers] == [STABLE] * requests
            assert {h["x-fleetform-served-by"] for h, _ in answers} == {"cheap-agent"}
            assert len({c.id for _, c in answers}) == requests

            wait_until(
                lambda: (rollout_status(controller)["shadow"] or {}).get("samples", 0) >= requests,
                120,
                "the comparisons to reach the controller",
            )
            status = rollout_status(controller)
            shadow = status["shadow"]
            assert shadow["samples"] == requests and shadow["candidate_errors"] == 0
            # The same weights decoding greedily: the copies agree with the served outputs.
            assert shadow["mean_agreement"] is not None and shadow["mean_agreement"] >= 0.8
            assert status["split"] == {CANDIDATE: 0.0, STABLE: 1.0}
            assert "compared, mean agreement" in status["shadow_summary"]
            served_ids = {c.id for _, c in answers}
            assert {rid for rid, _ in shadow["recent"]} == served_ids

            # The tenant is billed for its requests only, never for the copies.
            wait_until(
                lambda: ledger_usage(controller, TENANT)["requests"] >= requests,
                10,
                "the usage in the ledger",
            )
            time.sleep(4 * PUSH_INTERVAL_S)  # every push of both agents since then is in
            usage = ledger_usage(controller, TENANT)
            assert usage["requests"] == requests
            assert usage["completion_tokens"] == sum(c.usage.completion_tokens for _, c in answers)
        finally:
            candidate.stop()
            stable.stop()
