"""The controller's autoscaling: signals from pushes, the loop and its memory, the Pulumi
applier's Automation API calls (with a scripted PulumiCommand), and GET /v1/autoscale."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pulumi.automation import CommandResult, PulumiCommand
from pulumi.automation.errors import create_command_error

from runtime.autoscale import Autoscaler, PoolDecision, ScalingPlan
from runtime.controller.app import CONTROLLER
from runtime.controller.autoscaling import (
    AutomationStackDriver,
    AutoscaleLoop,
    PublishOnly,
    PulumiApplier,
    SignalCollector,
    budget_left_per_hour,
)
from runtime.controller.ledger import Ledger
from runtime.leases import Usage
from runtime.protocol import ClassCounters, InstanceSnapshot
from runtime.spec import parse_fleet

from .support import (
    ADMIN_TOKEN,
    FLEET_TOKEN,
    SPEC_DATA,
    T0,
    async_test,
    auth,
    controller,
    make_config,
    push_body,
    snapshot,
)

# Two classes, one spot-eligible and sheddable; a spot pool with an on-demand fallback. No
# fleet budget (the shared spec's $20/month would hold every pool at its minimum).
NO_BUDGET = {k: v for k, v in SPEC_DATA.items() if k != "budget"}
SPEC = parse_fleet(
    {
        **NO_BUDGET,
        "slo_classes": [
            {"name": "critical", "priority": 0, "ttft_ms": 1000, "tpot_ms": 100},
            {
                "name": "batch",
                "priority": 2,
                "ttft_ms": 60000,
                "tpot_ms": 1000,
                "sheddable": True,
                "spot_eligible": True,
            },
        ],
        "pools": [
            {**SPEC_DATA["pools"][0], "name": "od"},
            {**SPEC_DATA["pools"][0], "name": "spot", "spot": True, "fallback_pool": "od"},
        ],
        "tenants": [{**t, "default_priority": "critical"} for t in SPEC_DATA["tenants"]],
    }
)


@dataclass
class Agent:
    agent_id: str
    boot_id: str
    instance: InstanceSnapshot
    recent_use: dict[str, Usage] = field(default_factory=dict)


def agent(
    agent_id: str,
    pool: str,
    served: Mapping[str, tuple[int, int, int, int]],
    *,
    boot: str = "b1",
    healthy: bool = True,
    queued: int = 0,
    tenants: tuple[str, ...] = (),
) -> Agent:
    counters = {
        name: ClassCounters(admitted=a, finished=f, ttft_met=t, tpot_met=p)
        for name, (a, f, t, p) in served.items()
    }
    instance = InstanceSnapshot.model_validate(
        snapshot(
            agent_id,
            pool,
            healthy=healthy,
            queued_requests={0: queued} if queued else {},
        )
        | {"served": {k: v.model_dump() for k, v in counters.items()}}
    )
    return Agent(agent_id, boot, instance, {t: Usage(requests_per_minute=6.0) for t in tenants})


# --------------------------------------------------------------------------------------------
# Signals


def test_arrivals_and_slo_attainment_come_from_counter_differences() -> None:
    collector = SignalCollector(SPEC)
    requested = {"od": 1, "spot": 1}
    first = collector.collect(T0, [agent("a", "od", {"critical": (100, 95, 90, 95)})], requested)
    # First sight is a baseline: lifetime counts are not one period's arrivals.
    assert first.models["tiny"].arrivals_per_s == 0.0
    assert first.models["tiny"].slo_attainment is None
    assert first.models["tiny"].in_flight == 5
    assert first.models["tiny"].by_class == {"critical": 5}

    second = collector.collect(
        T0 + 10,
        [
            agent("a", "od", {"critical": (130, 120, 110, 119), "batch": (10, 10, 0, 0)}),
            agent("b", "spot", {"batch": (4, 0, 0, 0)}, queued=2, tenants=("alpha",)),
        ],
        requested,
    )
    tiny = second.models["tiny"]
    assert tiny.arrivals_per_s == pytest.approx((30 + 10) / 10)  # b is new: baseline only
    # Critical finished 25, both objectives met by min(20, 24) = 20; batch is sheddable.
    assert tiny.slo_attainment == pytest.approx(20 / 25)
    assert tiny.in_flight == 10 + 0 + 4
    assert tiny.by_class == {"critical": 10, "batch": 4}
    assert tiny.tenants == frozenset({"alpha"})
    assert tiny.queued == 2
    assert second.pools["spot"].queued == 2
    assert second.pools["od"].ready == 1 and second.pools["spot"].ready == 1
    assert collector.class_deltas == {
        "critical": ClassCounters(finished=25, ttft_met=20, tpot_met=24),
        "batch": ClassCounters(finished=10, ttft_met=0, tpot_met=0),
    }


def test_a_new_boot_counts_from_zero() -> None:
    collector = SignalCollector(SPEC)
    collector.collect(T0, [agent("a", "od", {"critical": (100, 100, 100, 100)})], {"od": 1})
    rebooted = collector.collect(
        T0 + 5, [agent("a", "od", {"critical": (7, 5, 5, 5)}, boot="b2")], {"od": 1}
    )
    assert rebooted.models["tiny"].arrivals_per_s == pytest.approx(7 / 5)
    assert rebooted.models["tiny"].slo_attainment == 1.0


def test_spot_replicas_that_vanish_unasked_count_as_lost() -> None:
    collector = SignalCollector(SPEC)
    three = [agent(f"s{i}", "spot", {}) for i in range(3)]
    collector.collect(T0, three, {"od": 1, "spot": 3})
    # One drained because the plan asked for 2; another vanished: one lost.
    after = collector.collect(T0 + 15, three[:1], {"od": 1, "spot": 2})
    assert after.pools["spot"].lost == 1
    assert after.pools["spot"].ready == 1
    # An unhealthy (draining) agent is not ready; the od pool is never "lost".
    later = collector.collect(
        T0 + 30, [agent("s0", "spot", {}, healthy=False)], {"od": 1, "spot": 2}
    )
    assert later.pools["spot"].ready == 0 and later.pools["spot"].lost == 1
    assert later.pools["od"].lost == 0


def test_the_budget_left_is_spread_over_the_hours_left_in_the_month() -> None:
    spec = parse_fleet(SPEC_DATA)  # $20 a month
    # T0 is 2025-03-12 12:00 UTC: 19.5 days = 468 h left of March's 744 h.
    month_budget = 20.0 * 744 / 730
    assert budget_left_per_hour(spec, 5.0, T0) == pytest.approx((month_budget - 5.0) / 468)
    assert budget_left_per_hour(spec, 1e9, T0) == 0.0
    assert budget_left_per_hour(SPEC, 5.0, T0) is None


def test_the_loop_never_plans_beyond_the_fleet_budget() -> None:
    spec = parse_fleet(SPEC_DATA)  # $20 a month: about $0.04 an hour left, below the minimum
    loop = AutoscaleLoop(spec, Autoscaler.from_spec(spec), PublishOnly())
    plan, _ = loop.step(T0, [agent("a", "cheap", {"standard": (40, 0, 0, 0)})])
    assert plan.replicas == {"cheap": 1, "dear": 1}


# --------------------------------------------------------------------------------------------
# The loop and its memory


def test_the_loop_plans_applies_and_resumes_after_a_restart(tmp_path: Path) -> None:
    spec = SPEC.model_copy(
        update={"autoscaling": SPEC.autoscaling.model_copy(update={"scale_up_cooldown_s": 60.0})}
    )
    state_path = tmp_path / "autoscale.json"
    loop = AutoscaleLoop(spec, Autoscaler.from_spec(spec), PublishOnly(), state_path)
    assert loop.requested == {"od": 1, "spot": 1}
    busy = [agent("a", "od", {"critical": (40, 0, 0, 0)})]
    plan, outcome = loop.step(T0, busy)
    assert outcome.applied
    assert plan.replicas["od"] == 2  # 40 critical in flight: on-demand, up to max 2
    assert loop.requested == plan.replicas
    assert loop.latest()["plan_id"] == 1

    saved = json.loads(state_path.read_text())
    assert saved["requested"] == plan.replicas
    again = AutoscaleLoop(spec, Autoscaler.from_spec(spec), PublishOnly(), state_path)
    assert again.requested == plan.replicas
    # The restored memory still knows about the scale-up 10 s ago: the cooldown holds.
    held, _ = again.step(T0 + 10, busy)
    assert held.replicas == plan.replicas


# --------------------------------------------------------------------------------------------
# The Pulumi applier, through the real Automation API code with a scripted command


class ScriptedPulumi(PulumiCommand):
    """A PulumiCommand that records argv and answers like the CLI would, without a CLI."""

    def __init__(self, fail_up: int = 0) -> None:  # no version probe: there is no binary
        self.command = "pulumi"
        self.version = None
        self.calls: list[list[str]] = []
        self.fail_up = fail_up

    def run(
        self,
        args: list[str],
        cwd: str,
        additional_env: Mapping[str, str],
        on_output: Any = None,
        on_error: Any = None,
    ) -> CommandResult:
        self.calls.append(list(args))
        if args[0] == "up":
            if self.fail_up:
                self.fail_up -= 1
                # As the real PulumiCommand.run does for a non-zero exit.
                raise create_command_error(
                    CommandResult(stdout="", stderr="error: quota exceeded in us-east-1", code=1)
                )
            return CommandResult(stdout="Update complete\n", stderr="", code=0)
        if args[:2] == ["stack", "output"]:
            return CommandResult(stdout="{}", stderr="", code=0)
        if args[:2] == ["stack", "history"]:
            history = [
                {
                    "version": 7,
                    "kind": "update",
                    "startTime": "2026-11-23T10:00:00.000Z",
                    "message": "",
                    "environment": {},
                    "config": {},
                    "result": "succeeded",
                    "endTime": "2026-11-23T10:01:00.000Z",
                    "resourceChanges": {"update": 2, "same": 30},
                }
            ]
            return CommandResult(stdout=json.dumps(history), stderr="", code=0)
        return CommandResult(stdout="", stderr="", code=0)


def plan_of(replicas: dict[str, int], at: float = T0) -> ScalingPlan:
    return ScalingPlan(
        at=at,
        decisions={p: PoolDecision(p, 1, n, ("test",)) for p, n in replicas.items()},
        demand={},
        forecast_arrivals_per_s={},
        usd_per_hour=0.0,
    )


def test_pulumi_applier_sets_only_the_replicas_then_runs_up(tmp_path: Path) -> None:
    command = ScriptedPulumi()
    driver = AutomationStackDriver(tmp_path, "prod", pulumi_command=command)
    clock = [T0]
    applier = PulumiApplier(driver, clock=lambda: clock[0], min_interval_s=300.0)

    outcome = applier.apply(plan_of({"spot": 4, "od": 2}))
    assert outcome.applied
    assert outcome.detail == "update succeeded: same 30, update 2"
    verbs = [c for c in command.calls if c[0] != "version"]
    assert verbs[0][:3] == ["stack", "select", "--stack"] and "prod" in verbs[0]
    config = verbs[1]
    assert config[:4] == ["config", "set-all", "--stack", "prod"]
    assert config[4:] == ["--plaintext", 'fleetform:replicas={"od":2,"spot":4}']
    assert verbs[2][0] == "up" and "--yes" in verbs[2] and "--skip-preview" in verbs[2]
    assert [v[:2] for v in verbs[3:]] == [
        ["stack", "output"],
        ["stack", "output"],
        ["stack", "history"],
    ]

    # The same plan again changes nothing and calls nothing.
    calls = len(command.calls)
    assert applier.apply(plan_of({"spot": 4, "od": 2})).detail == "unchanged"
    assert len(command.calls) == calls
    # A different plan inside the interval waits; after it, it is applied.
    clock[0] += 120
    deferred = applier.apply(plan_of({"spot": 5, "od": 2}))
    assert not deferred.applied and deferred.detail == "deferred 180 s (rate limit)"
    assert len(command.calls) == calls
    clock[0] += 181
    assert applier.apply(plan_of({"spot": 5, "od": 2})).applied


def test_pulumi_applier_backs_off_exponentially_after_failed_updates(tmp_path: Path) -> None:
    command = ScriptedPulumi(fail_up=2)
    clock = [T0]
    applier = PulumiApplier(
        AutomationStackDriver(tmp_path, "prod", pulumi_command=command),
        clock=lambda: clock[0],
        min_interval_s=300.0,
        backoff_s=60.0,
    )
    first = applier.apply(plan_of({"od": 2}))
    assert not first.applied
    assert first.error is not None and "quota exceeded in us-east-1" in first.error
    assert first.detail == "retry in 60 s"
    clock[0] += 30
    assert (
        applier.apply(plan_of({"od": 2})).detail == "deferred 30 s (backoff after a failed update)"
    )
    clock[0] += 31
    second = applier.apply(plan_of({"od": 2}))
    assert second.detail == "retry in 120 s"
    assert [c[0] for c in command.calls].count("up") == 2
    clock[0] += 121
    third = applier.apply(plan_of({"od": 2}))
    assert third.applied and applier.failures == 0
    assert [c[0] for c in command.calls].count("up") == 3


# --------------------------------------------------------------------------------------------
# In the controller application


@async_test
async def test_the_controller_publishes_and_records_plans(tmp_path: Path) -> None:
    data = {**NO_BUDGET, "autoscaling": {"period_s": 0.2, "scale_up_cooldown_s": 0}}
    from runtime.controller.config import controller_config_from_spec

    from .support import ENVIRON

    config = controller_config_from_spec(
        parse_fleet(data),
        db_path=tmp_path / "ledger.sqlite3",
        fleet_token=FLEET_TOKEN,
        admin_token=ADMIN_TOKEN,
        environ=ENVIRON,
    )
    async with controller(config) as client:
        assert (await client.get("/v1/autoscale")).status == 401
        busy = snapshot("cheap-0", "cheap", served={"standard": {"admitted": 30, "finished": 0}})
        response = await client.post(
            "/v1/push", json=push_body("a", 0, instance=busy), headers=auth(FLEET_TOKEN)
        )
        assert response.status == 200
        for _ in range(50):
            status = await (await client.get("/v1/autoscale", headers=auth(ADMIN_TOKEN))).json()
            if status["plan_id"] >= 1:
                break
            await asyncio.sleep(0.1)
        assert status["enabled"] is True
        plan = status["plan"]["pools"]
        # 30 in flight: 8 slots a replica at 70 %: both pools to their max of 2.
        assert plan["cheap"]["desired"] == 2 and plan["dear"]["desired"] == 2
        assert status["requested"] == {"cheap": 2, "dear": 2}
        ledger: Ledger = client.app[CONTROLLER].require_ledger()  # type: ignore[index]
        state = client.app[CONTROLLER]  # type: ignore[index]
        # The plan is published before it is recorded: wait for the ledger to have it.
        for _ in range(50):
            decisions = await state.db(ledger.recent_decisions, 10)
            if decisions:
                break
            await asyncio.sleep(0.05)
        assert {(d.pool, d.current, d.desired) for d in decisions} == {
            ("cheap", 1, 2),
            ("dear", 1, 2),
        }
        assert all(d.applied for d in decisions)
        assert any("demand 30 in flight of standard" in r for d in decisions for r in d.reasons)
        samples = await state.db(ledger.pool_samples, 0, T0 * 10)
        assert any(pool == "cheap" and s.desired == 2 for _, pool, s in samples)


def test_make_config_is_still_the_default_path(tmp_path: Path) -> None:
    # Autoscaling is on by default: the controller state has a loop publishing plans.
    from runtime.controller.app import init

    app = init(make_config(tmp_path / "l.sqlite3"))
    loop = app[CONTROLLER].autoscale
    assert loop is not None and isinstance(loop.applier, PublishOnly)
    assert loop.state_path == tmp_path / "l.sqlite3.autoscale.json"
