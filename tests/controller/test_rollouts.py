"""The controller's rollout loop on fabricated pushes: windows from per-version counters, step
up / hold / roll back recorded with reasons, shadow comparisons counted once, the state file
across a restart, and, on a real controller (127.0.0.1), the split in every push reply and
``GET /v1/rollouts``."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runtime.controller.rollouts import RolloutLoop
from runtime.protocol import MetricsPush, PushReply, ShadowReport, VersionStats
from runtime.rollout import RolloutAction, RolloutPhase
from runtime.spec import FleetSpec, parse_fleet

from .support import (
    ADMIN_TOKEN,
    ENVIRON,
    FLEET_TOKEN,
    SPEC_DATA,
    T0,
    FakeClock,
    async_test,
    auth,
    controller,
    push_body,
    snapshot,
)

STABLE, CANDIDATE = "q4", "q8"


def rollout_spec(**rollout: Any) -> FleetSpec:
    """The controller tests' spec with a second variant, served by the ``dear`` pool, and a
    rollout from ``q4`` (pool ``cheap``) to it."""
    data = copy.deepcopy(SPEC_DATA)
    model = data["models"][0]
    model["variants"].append(
        {"name": CANDIDATE, "precision": "int8", "quality": "standard", "runs_on": ["cpu"]}
    )
    model["rollout"] = {"stable": STABLE, "candidate": CANDIDATE, **rollout}
    data["pools"][1]["serves"]["variant"] = CANDIDATE
    return parse_fleet(data)


def canary_spec(**extra: Any) -> FleetSpec:
    fields = {
        "strategy": "canary",
        "steps": [50, 100],
        "step_interval_s": 10,
        "min_requests": 5,
        "ttft_ratio": 1.5,
        "tpot_ratio": 1.5,
        **extra,
    }
    return rollout_spec(**fields)


class Agent:
    """An agent process as its pushes describe it: cumulative counters per version."""

    def __init__(self, agent_id: str, variant: str, pool: str, boot_id: str = "boot-1") -> None:
        self.agent_id, self.variant, self.pool, self.boot_id = agent_id, variant, pool, boot_id
        self.seq = 0
        self.finished = self.errors = 0
        self.samples: list[tuple[float, float | None]] = []

    def serve(self, n: int, *, ttft_s: float = 0.1, tpot_s: float = 0.02, errors: int = 0) -> None:
        self.finished += n + errors
        self.errors += errors
        self.samples.extend([(ttft_s, tpot_s)] * n)

    def push(
        self, *, shadow: list[ShadowReport] | None = None, healthy: bool = True
    ) -> MetricsPush:
        body = push_body(
            self.agent_id,
            self.seq,
            boot_id=self.boot_id,
            instance=snapshot(
                f"{self.agent_id}-i", self.pool, variant=self.variant, healthy=healthy
            ),
        )
        body["versions"] = [
            VersionStats(
                model="tiny",
                variant=self.variant,
                finished=self.finished,
                errors=self.errors,
                samples_total=len(self.samples),
                recent=self.samples[-256:],
            ).model_dump()
        ]
        body["shadow"] = [r.model_dump() for r in shadow or []]
        self.seq += 1
        return MetricsPush.model_validate(body)


class Record:
    """The part of an AgentRecord the loop reads."""

    def __init__(self, push: MetricsPush) -> None:
        self.instance = push.instance


def step(loop: RolloutLoop, now: float, *pushes: MetricsPush) -> Any:
    for push in pushes:
        loop.observe(push, accepted=True)
    [decision] = loop.step(now, [Record(p) for p in pushes])
    return decision


def test_a_canary_steps_up_holds_and_rolls_back_with_reasons(tmp_path: Path) -> None:
    loop = RolloutLoop(canary_spec(), state_path=tmp_path / "l.db.rollouts.json")
    stable, candidate = Agent("a", STABLE, "cheap"), Agent("b", CANDIDATE, "dear")
    assert loop.directives()["tiny"].split == {CANDIDATE: 0.0, STABLE: 1.0}

    # The candidate is ready: step 1 (50 %), published in the directive.
    first = step(loop, T0, stable.push(), candidate.push())
    assert first.action is RolloutAction.STEP_UP and first.phase is RolloutPhase.CANARY
    assert loop.directives()["tiny"].ordered_split() == {CANDIDATE: 0.5, STABLE: 0.5}

    # Too few candidate requests: hold, saying so.
    stable.serve(8)
    candidate.serve(3)
    held = step(loop, T0 + 2, stable.push(), candidate.push())
    assert held.action is RolloutAction.HOLD
    assert "3 of 5 candidate requests needed" in held.reasons[0]

    # Enough of both, within the margins, but the step is not 10 s old yet: hold.
    candidate.serve(4, ttft_s=0.11)
    held = step(loop, T0 + 5, stable.push(), candidate.push())
    assert held.action is RolloutAction.HOLD
    assert "within margins after 7 requests" in held.reasons[0]

    # Ten seconds on the step: up to 100 %, with the figures that passed.
    stable.serve(2)
    candidate.serve(1)
    up = step(loop, T0 + 11, stable.push(), candidate.push())
    assert up.action is RolloutAction.STEP_UP, up.reasons
    assert up.reasons[0].startswith("step 1 of 2 (50 %) passed: 8 requests")
    assert any(r.startswith("TTFT p95 candidate 110.0 ms vs stable 100.0 ms") for r in up.reasons)
    assert loop.directives()["tiny"].split == {CANDIDATE: 1.0, STABLE: 0.0}
    # The window restarted with the step: nothing of the last one is carried.
    assert loop.status()["rollouts"][0]["window"]["now"][CANDIDATE]["requests"] == 0

    # At 100 % the candidate is slow; stable served nothing: judged against its baseline.
    candidate.serve(6, ttft_s=0.5, tpot_s=0.09)
    back = step(loop, T0 + 13, stable.push(), candidate.push())
    assert back.action is RolloutAction.ROLL_BACK
    assert back.reasons[0] == (
        "TTFT p95 breach: candidate 500.0 ms is 5.00x stable 100.0 ms, over the 1.5x margin"
    )
    assert back.reasons[1].startswith("TPOT p95 breach: candidate 90.0 ms is 4.50x")
    assert "rolled back from step 2 of 2 (100 %): all traffic to 'q4'" in back.reasons
    assert loop.directives()["tiny"].split == {CANDIDATE: 0.0, STABLE: 1.0}

    status = loop.status()
    [rollout] = status["rollouts"]
    assert rollout["phase"] == "rolled-back" and "rolled back from step 2" in rollout["outcome"]
    assert [e["action"] for e in rollout["events"]] == ["roll_back", "step_up", "step_up"]
    assert [d["action"] for d in status["decisions"]][:2] == ["roll_back", "step_up"]
    json.dumps(status)  # the endpoint's body


def test_counters_are_differenced_per_agent_process_and_errors_count(tmp_path: Path) -> None:
    loop = RolloutLoop(canary_spec())
    stable, candidate = Agent("a", STABLE, "cheap"), Agent("b", CANDIDATE, "dear")
    step(loop, T0, stable.push(), candidate.push())
    candidate.serve(5, errors=3)
    stable.serve(10)
    push = candidate.push()
    loop.observe(push, accepted=True)
    loop.observe(push, accepted=False)  # the same push retried: counted once
    decision = step(loop, T0 + 1, stable.push())
    assert decision.action is RolloutAction.ROLL_BACK
    assert decision.reasons[0].startswith(
        "error rate breach: candidate 37.50 % (3 of 8) vs stable 0.00 % (0 of 10)"
    )


def test_an_agent_first_seen_mid_life_is_a_baseline() -> None:
    loop = RolloutLoop(canary_spec())
    candidate = Agent("b", CANDIDATE, "dear")
    candidate.serve(50, ttft_s=9.0)
    candidate.seq = 7  # the controller restarted under a running agent
    loop.observe(candidate.push(), accepted=True)
    assert loop.windows["tiny"][CANDIDATE].requests == 0
    candidate.serve(2)
    loop.observe(candidate.push(), accepted=True)
    window = loop.windows["tiny"][CANDIDATE]
    assert (window.requests, list(window.ttfts_s)) == (2, [0.1, 0.1])
    # A new process of the same agent, seen from its first push: everything counts.
    reborn = Agent("b", CANDIDATE, "dear", boot_id="boot-2")
    reborn.serve(3)
    loop.observe(reborn.push(), accepted=True)
    assert loop.windows["tiny"][CANDIDATE].requests == 5


def test_shadow_comparisons_are_recorded_once_and_never_move_traffic(tmp_path: Path) -> None:
    loop = RolloutLoop(rollout_spec(strategy="shadow", sample_fraction=0.5))
    stable, candidate = Agent("a", STABLE, "cheap"), Agent("b", CANDIDATE, "dear")
    first = step(loop, T0, stable.push(), candidate.push())
    assert first.phase is RolloutPhase.SHADOWING
    directive = loop.directives()["tiny"]
    assert (directive.shadow_fraction, directive.split) == (0.5, {CANDIDATE: 0.0, STABLE: 1.0})
    reports = [
        ShadowReport(
            model="tiny",
            stable=STABLE,
            candidate=CANDIDATE,
            request_id=f"r{i}",
            agreement=agreement,
            stable_latency_s=1.0,
            candidate_latency_s=2.0,
        )
        for i, agreement in enumerate((1.0, 0.5))
    ]
    push = stable.push(shadow=reports)
    loop.observe(push, accepted=True)
    loop.observe(push, accepted=False)  # a retry of the same push
    held = step(loop, T0 + 1, stable.push(), candidate.push())
    assert held.action is RolloutAction.HOLD
    assert held.shadow is not None and held.shadow.samples == 2
    assert "2 compared, mean agreement 0.750 (min 0.500), 1 exact" in held.reasons[0]
    assert "candidate latency 2.00x stable" in held.reasons[0]
    assert loop.directives()["tiny"].split == {CANDIDATE: 0.0, STABLE: 1.0}


def test_the_state_file_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "l.db.rollouts.json"
    loop = RolloutLoop(canary_spec(), state_path=path)
    stable, candidate = Agent("a", STABLE, "cheap"), Agent("b", CANDIDATE, "dear")
    step(loop, T0, stable.push(), candidate.push())
    loop.save()

    again = RolloutLoop(canary_spec(), state_path=path)
    controller_state = again.controllers["tiny"]
    assert controller_state.phase is RolloutPhase.CANARY and controller_state.step == 0
    assert again.directives()["tiny"].split == {CANDIDATE: 0.5, STABLE: 0.5}
    assert [e["action"] for e in again.status()["rollouts"][0]["events"]] == ["step_up"]

    # Another rollout in the spec (here: another strategy) starts afresh; a broken file too.
    other = RolloutLoop(rollout_spec(strategy="replace"), state_path=path)
    assert other.controllers["tiny"].phase is RolloutPhase.PENDING
    path.write_text("{not json", encoding="utf-8")
    broken = RolloutLoop(canary_spec(), state_path=path)
    assert broken.controllers["tiny"].phase is RolloutPhase.PENDING


@async_test
async def test_push_replies_carry_the_split_and_the_endpoint_shows_it(tmp_path: Path) -> None:
    from runtime.controller.config import controller_config_from_spec

    clock = FakeClock()
    config = controller_config_from_spec(
        rollout_spec(strategy="replace", drain_s=5),
        db_path=tmp_path / "l.db",
        fleet_token=FLEET_TOKEN,
        admin_token=ADMIN_TOKEN,
        environ=ENVIRON,
        rollout_period_s=0.05,
    )
    async with controller(config, clock) as client:
        stable, candidate = Agent("a", STABLE, "cheap"), Agent("b", CANDIDATE, "dear")

        async def push(agent: Agent) -> PushReply:
            response = await client.post(
                "/v1/push", json=agent.push().model_dump(mode="json"), headers=auth(FLEET_TOKEN)
            )
            assert response.status == 200, await response.text()
            return PushReply.model_validate(await response.json())

        reply = await push(stable)
        assert reply.rollouts["tiny"].split == {CANDIDATE: 0.0, STABLE: 1.0}
        assert reply.rollouts["tiny"].strategy == "replace"
        await push(candidate)

        async def switched() -> bool:
            return (await push(stable)).rollouts["tiny"].split[CANDIDATE] == 1.0

        for _ in range(200):  # the loop runs every 50 ms
            if await switched():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the replace rollout never switched")

        response = await client.get("/v1/rollouts", headers=auth(ADMIN_TOKEN))
        assert response.status == 200
        body = await response.json()
        [rollout] = body["rollouts"]
        assert rollout["phase"] == "switching"
        assert rollout["events"][0]["action"] == "promote"
        assert "switching all traffic to it" in rollout["events"][0]["reasons"][0]
        assert (await client.get("/v1/rollouts")).status == 401
        assert (await client.get("/v1/rollouts", headers=auth(FLEET_TOKEN))).status == 401
        page = await client.get("/dashboard", headers=auth(ADMIN_TOKEN))
        html = await page.text()
        assert 'id="rollouts"' in html and "switching all traffic to it" in html
        assert "q8 100.0 % · q4 0.0 %" in html
    assert json.loads((tmp_path / "l.db.rollouts.json").read_text())["rollouts"]["tiny"][
        "phase"
    ] in ("switching", "done")


@async_test
async def test_without_a_rollout_replies_are_unchanged(tmp_path: Path) -> None:
    from .support import make_config

    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        response = await client.post("/v1/push", json=push_body(), headers=auth(FLEET_TOKEN))
        assert "rollouts" not in await response.json()
        status = await (await client.get("/v1/rollouts", headers=auth(ADMIN_TOKEN))).json()
        assert status["enabled"] is False and status["rollouts"] == []


@async_test
async def test_a_shadow_comparison_is_counted_once_across_a_lost_reply(tmp_path: Path) -> None:
    from runtime.agent.push import MetricsPusher, PushError
    from runtime.controller.app import CONTROLLER
    from runtime.controller.config import controller_config_from_spec
    from runtime.protocol import InstanceSnapshot

    from .test_pusher import FAST, fail_first_replies

    bodies: list[dict[str, Any]] = []

    def prepare(app: Any) -> None:
        fail_first_replies(1)(app)  # the first push is recorded, its reply lost

        @web.middleware
        async def keep(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == "/v1/push":
                bodies.append(json.loads(await request.read()))
            return await handler(request)

        app.middlewares.append(keep)

    config = controller_config_from_spec(
        rollout_spec(strategy="shadow", sample_fraction=0.5),
        db_path=tmp_path / "l.db",
        fleet_token=FLEET_TOKEN,
        admin_token=ADMIN_TOKEN,
        environ=ENVIRON,
    )
    async with controller(config, FakeClock(), prepare=prepare) as client:
        pusher = MetricsPusher(
            str(client.make_url("")),
            FLEET_TOKEN,
            agent_id="agent-1",
            snapshot=lambda: InstanceSnapshot.model_validate(snapshot("a-1")),
            recent_use=dict,
            on_reply=lambda reply: None,
            **FAST,
        )
        pusher.record_shadow(
            ShadowReport(
                model="tiny", stable=STABLE, candidate=CANDIDATE, request_id="r1", agreement=0.5
            )
        )
        with pytest.raises(PushError):
            await pusher.push_once()
        reply = await pusher.push_once()  # the retry of the same seq: a duplicate
        assert reply.duplicate and reply.rollouts["tiny"].shadow_fraction == 0.0  # pending
        await pusher.push_once()  # a later push: nothing left to send
        stats = client.app[CONTROLLER].rollouts.controllers["tiny"].shadow  # type: ignore[index,union-attr]
        assert (stats.samples, stats.agreement_sum) == (1, 0.5)
        assert [len(b.get("shadow", [])) for b in bodies] == [1, 1, 0]
        # No versions to report: the field is not sent at all (nor an empty shadow list).
        assert "versions" not in bodies[0] and "shadow" not in bodies[2]
        await pusher.stop(flush_timeout_s=0)
