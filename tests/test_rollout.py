"""Rollout decisions driven with fabricated metric series (no processes, no clock but ours).

The canary series come from a small traffic model (`Traffic`): requests arrive at a fixed rate,
the split of the last decision sends each version its share, and each version has an error rate
and TTFT / TPOT p95 of its own. Windows restart where the decision says (`window_start`), as the
controller's would. Expected reasons are literal text written here.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runtime.rollout import (
    RolloutAction,
    RolloutController,
    RolloutDecision,
    RolloutPhase,
    ShadowComparison,
    ShadowStats,
    VersionMetrics,
    choose_version,
    compare_outputs,
    controllers_from_spec,
    percentile,
    shadow_sample,
)
from runtime.spec import RolloutSpec, load_stack_file

STABLE_OK = VersionMetrics(
    requests=4000, errors=4, ttft_p95_s=0.400, tpot_p95_s=0.050, ready_replicas=3
)


def canary(**overrides: Any) -> RolloutSpec:
    fields: dict[str, Any] = {
        "stable": "bf16",
        "candidate": "int8",
        "strategy": "canary",
        "steps": [5, 25, 50, 100],
        "step_interval_s": 600,
        "min_requests": 200,
        "max_error_rate_delta": 0.01,
        "ttft_ratio": 1.2,
        "tpot_ratio": 1.2,
    }
    fields.update(overrides)
    return RolloutSpec.model_validate(fields)


def started(settings: RolloutSpec, at: float = 0.0) -> RolloutController:
    """A canary controller already at step 1 (the candidate became ready at `at`)."""
    controller = RolloutController("llama", settings)
    first = controller.decide(at, STABLE_OK, VersionMetrics(ready_replicas=1))
    assert first.action is RolloutAction.STEP_UP
    return controller


def cand(
    requests: int = 400,
    errors: int = 0,
    ttft: float | None = 0.420,
    tpot: float | None = 0.052,
    ready: int = 2,
) -> VersionMetrics:
    return VersionMetrics(requests, errors, ttft, tpot, ready)


@dataclass(frozen=True)
class Profile:
    """How a version behaves: its error rate and its p95s, possibly changing with time."""

    error_rate: float = 0.001
    ttft_p95_s: float = 0.400
    tpot_p95_s: float = 0.050
    ready: int = 2


@dataclass
class Traffic:
    """A fabricated metric series: `rate` requests/s split as the last decision says."""

    controller: RolloutController
    stable: Callable[[float], Profile]
    candidate: Callable[[float], Profile]
    rate: float = 2.0
    period: float = 60.0

    def run(self, until: float, start: float = 0.0) -> list[RolloutDecision]:
        decisions: list[RolloutDecision] = []
        split = self.controller.split()
        window_start = start
        now = start
        while now <= until:
            elapsed = now - window_start
            share = split[self.controller.candidate]
            metrics = []
            for profile, fraction in (
                (self.stable(now), 1.0 - share),
                (self.candidate(now), share),
            ):
                requests = int(self.rate * fraction * elapsed)
                metrics.append(
                    VersionMetrics(
                        requests=requests,
                        errors=round(requests * profile.error_rate),
                        ttft_p95_s=profile.ttft_p95_s if requests else None,
                        tpot_p95_s=profile.tpot_p95_s if requests else None,
                        ready_replicas=profile.ready,
                    )
                )
            decision = self.controller.decide(now, metrics[0], metrics[1])
            decisions.append(decision)
            split, window_start = dict(decision.split), decision.window_start
            now += self.period
        return decisions


def steady(profile: Profile) -> Callable[[float], Profile]:
    return lambda _now: profile


def actions(decisions: list[RolloutDecision]) -> list[tuple[float, str, float]]:
    """(time, action, candidate percent) of the decisions that changed something."""
    return [
        (d.at, str(d.action), d.candidate_percent)
        for d in decisions
        if d.action not in (RolloutAction.HOLD, RolloutAction.WAIT)
    ]


# --------------------------------------------------------------------------------------------
# Canary: the happy path


def test_canary_steps_up_through_every_step_and_promotes() -> None:
    controller = RolloutController("llama", canary())
    stable = Profile(error_rate=0.002, ttft_p95_s=0.400, tpot_p95_s=0.050)
    # int8 is a little slower and a little more error-prone, but within every margin.
    candidate = Profile(error_rate=0.006, ttft_p95_s=0.460, tpot_p95_s=0.057)
    decisions = Traffic(controller, steady(stable), steady(candidate)).run(until=12_000)

    # 2 requests/s: at 5 % the candidate needs 2000 s for 200 requests (min_requests), at 25 %
    # 400 s, so the 600 s interval decides; at 50 % and 100 % the interval decides too.
    assert actions(decisions) == [
        (0.0, "step_up", 5.0),
        (2040.0, "step_up", 25.0),
        (2640.0, "step_up", 50.0),
        (3240.0, "step_up", 100.0),
        (3840.0, "promote", 100.0),
    ]
    by_time = {d.at: d for d in decisions}
    assert by_time[2040.0].reasons == (
        "step 1 of 4 (5 %) passed: 204 requests over 2040 s within margins",
        "error rate candidate 0.49 % (1 of 204) vs stable 0.21 % (8 of 3876): +0.28 points, "
        "margin 1.00",
        "TTFT p95 candidate 460.0 ms vs stable 400.0 ms: 1.15x, margin 1.2x",
        "TPOT p95 candidate 57.0 ms vs stable 50.0 ms: 1.14x, margin 1.2x",
        "stepping up to step 2 of 4: 25 % of traffic",
    )
    assert dict(by_time[2040.0].split) == {"int8": 0.25, "bf16": 0.75}
    # At 100 % stable serves nothing: the step is judged against the last stable window.
    promote = by_time[3840.0]
    assert promote.phase is RolloutPhase.PROMOTED
    assert dict(promote.split) == {"int8": 1.0, "bf16": 0.0}
    assert promote.reasons[-2:] == (
        "last step passed: promoting 'int8' to 100 % of traffic",
        "stable served 0 request(s) in this window; comparing with its window ending at t=3240",
    )
    # Promotion is final; later decisions hold and say how it ended.
    last = decisions[-1]
    assert (last.action, last.phase, last.candidate_percent) == (
        RolloutAction.HOLD,
        RolloutPhase.PROMOTED,
        100.0,
    )
    assert last.reasons == (
        "promoted 'int8' at t=3840 after 4 step(s); make it the stable version in the spec "
        "and remove the rollout",
    )


def test_canary_waits_for_a_ready_candidate_before_the_first_step() -> None:
    controller = RolloutController("llama", canary())
    waiting = controller.decide(0.0, STABLE_OK, VersionMetrics(ready_replicas=0))
    assert (waiting.action, waiting.phase) == (RolloutAction.WAIT, RolloutPhase.PENDING)
    assert dict(waiting.split) == {"int8": 0.0, "bf16": 1.0}
    assert waiting.reasons == (
        "waiting for candidate 'int8' to have a ready replica (0 ready); 'bf16' keeps all traffic",
    )
    ready = controller.decide(120.0, STABLE_OK, VersionMetrics(ready_replicas=2))
    assert (ready.action, ready.phase, ready.step) == (
        RolloutAction.STEP_UP,
        RolloutPhase.CANARY,
        0,
    )
    assert ready.window_start == 120.0  # the first step's window starts at readiness
    assert ready.reasons == (
        "candidate 'int8' has 2 ready replica(s): canary starts at step 1 of 4, 5 % of traffic",
    )


def test_holds_until_min_requests_and_until_the_step_interval() -> None:
    controller = started(canary())
    few = controller.decide(700.0, STABLE_OK, cand(requests=199))
    assert few.action is RolloutAction.HOLD
    assert few.reasons == (
        "step 1 of 4 (5 %): 199 of 200 candidate requests needed before judging",
    )
    early = controller.decide(599.0, STABLE_OK, cand(requests=200))
    assert early.action is RolloutAction.HOLD
    assert early.reasons[0] == (
        "step 1 of 4 (5 %): within margins after 200 requests; 599 of 600 s spent on the step"
    )
    assert early.step == 0 and early.candidate_percent == 5.0
    on_time = controller.decide(600.0, STABLE_OK, cand(requests=200))
    assert on_time.action is RolloutAction.STEP_UP
    assert on_time.window_start == 600.0 and on_time.step == 1


def test_stable_needs_min_requests_for_a_baseline() -> None:
    controller = started(canary(steps=[50, 100]))
    thin = VersionMetrics(requests=150, errors=0, ttft_p95_s=0.4, tpot_p95_s=0.05, ready_replicas=1)
    decision = controller.decide(700.0, thin, cand())
    assert decision.action is RolloutAction.HOLD
    assert decision.reasons == (
        "step 1 of 2 (50 %): stable served 150 of 200 requests needed for a baseline",
    )


def test_a_metric_that_cannot_be_compared_holds() -> None:
    controller = started(canary())
    decision = controller.decide(700.0, STABLE_OK, cand(tpot=None))
    assert decision.action is RolloutAction.HOLD
    assert (
        decision.reasons[0]
        == "step 1 of 4 (5 %): no TPOT p95 for the candidate version in this window"
    )


def test_figures_exactly_at_the_margins_pass() -> None:
    # +1.00 point error rate, TTFT and TPOT exactly 1.2x: all within (the margins are inclusive).
    controller = started(canary())
    stable = VersionMetrics(1000, 10, 0.500, 0.050, 3)
    edge = VersionMetrics(200, 4, 0.600, 0.060, 1)
    decision = controller.decide(600.0, stable, edge)
    assert decision.action is RolloutAction.STEP_UP, decision.reasons


# --------------------------------------------------------------------------------------------
# Canary: roll-backs


def test_error_rate_breach_rolls_back_at_once_with_the_figures() -> None:
    controller = started(canary())
    # 100 s into the step: the interval is far from spent, the evidence (500 requests) is in.
    decision = controller.decide(100.0, STABLE_OK, cand(requests=500, errors=20))
    assert decision.action is RolloutAction.ROLL_BACK
    assert decision.phase is RolloutPhase.ROLLED_BACK
    assert dict(decision.split) == {"int8": 0.0, "bf16": 1.0}
    assert decision.reasons == (
        "error rate breach: candidate 4.00 % (20 of 500) vs stable 0.10 % (4 of 4000) is "
        "+3.90 points, over the 1.00-point margin",
        "rolled back from step 1 of 4 (5 %): all traffic to 'bf16'",
    )


def test_ttft_breach_of_a_deliberately_slowed_variant_rolls_back() -> None:
    controller = RolloutController("llama", canary())
    stable = Profile(ttft_p95_s=0.400)
    # Fine for half an hour, then the candidate's TTFT is slowed 1.5x (say, a bad kernel).
    slowed: Callable[[float], Profile] = lambda now: Profile(  # noqa: E731
        ttft_p95_s=0.600 if now >= 1800 else 0.410
    )
    decisions = Traffic(controller, steady(stable), slowed, rate=10.0).run(until=6000)
    # 10 requests/s: 200 candidate requests at 5 % take 400 s, so the interval decides.
    assert actions(decisions) == [
        (0.0, "step_up", 5.0),
        (600.0, "step_up", 25.0),
        (1200.0, "step_up", 50.0),
        (1800.0, "roll_back", 0.0),
    ]
    rollback = decisions[30]
    assert rollback.at == 1800.0
    assert rollback.reasons == (
        "TTFT p95 breach: candidate 600.0 ms is 1.50x stable 400.0 ms, over the 1.2x margin",
        "rolled back from step 3 of 4 (50 %): all traffic to 'bf16'",
    )
    # The roll-back sticks, even once the candidate looks healthy again.
    after = [d for d in decisions if d.at > 1800.0]
    assert after and all(d.action is RolloutAction.HOLD for d in after)
    assert all(d.split == {"int8": 0.0, "bf16": 1.0} for d in after)
    assert after[-1].reasons == (
        "rolled back from step 3 of 4 (50 %) at t=1800: TTFT p95 breach: candidate 600.0 ms is "
        "1.50x stable 400.0 ms, over the 1.2x margin; 'bf16' keeps all traffic until the rollout "
        "in the spec changes",
    )


def test_tpot_breach_rolls_back() -> None:
    controller = started(canary(tpot_ratio=1.1))
    decision = controller.decide(300.0, STABLE_OK, cand(tpot=0.0575))
    assert decision.action is RolloutAction.ROLL_BACK
    assert decision.reasons == (
        "TPOT p95 breach: candidate 57.5 ms is 1.15x stable 50.0 ms, over the 1.1x margin",
        "rolled back from step 1 of 4 (5 %): all traffic to 'bf16'",
    )


def test_every_breached_metric_is_named() -> None:
    controller = started(canary())
    decision = controller.decide(300.0, STABLE_OK, cand(errors=40, ttft=1.0, tpot=0.2))
    assert decision.action is RolloutAction.ROLL_BACK
    assert [r.split(":")[0] for r in decision.reasons] == [
        "error rate breach",
        "TTFT p95 breach",
        "TPOT p95 breach",
        "rolled back from step 1 of 4 (5 %)",
    ]


def test_a_breach_at_the_full_step_is_judged_against_the_baseline() -> None:
    controller = started(canary(steps=[50, 100]))
    assert controller.decide(600.0, STABLE_OK, cand()).action is RolloutAction.STEP_UP
    no_stable = VersionMetrics(requests=0, ready_replicas=3)
    decision = controller.decide(700.0, no_stable, cand(ttft=0.9))
    assert decision.action is RolloutAction.ROLL_BACK
    assert decision.reasons == (
        "TTFT p95 breach: candidate 900.0 ms is 2.25x stable 400.0 ms, over the 1.2x margin",
        "rolled back from step 2 of 2 (100 %): all traffic to 'bf16'",
        "stable served 0 request(s) in this window; comparing with its window ending at t=600",
    )


def test_decisions_that_change_something_are_logged_for_the_dashboard() -> None:
    controller = started(canary())
    controller.decide(100.0, STABLE_OK, cand(requests=100))  # hold: not logged
    controller.decide(200.0, STABLE_OK, cand(errors=100))
    assert [e["action"] for e in controller.events] == ["step_up", "roll_back"]
    json.dumps(controller.events)  # JSON-ready as it is
    assert controller.events[1]["reasons"][0].startswith("error rate breach:")


def test_reset_starts_the_rollout_afresh() -> None:
    controller = started(canary())
    controller.decide(200.0, STABLE_OK, cand(errors=100))
    controller.reset()
    assert controller.phase is RolloutPhase.PENDING and controller.events == []
    assert controller.decide(300.0, STABLE_OK, cand()).action is RolloutAction.STEP_UP


# --------------------------------------------------------------------------------------------
# Replace (blue/green)


def replace_spec(**overrides: Any) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {"stable": "bf16", "candidate": "int8", "strategy": "replace", "drain_s": 60, **overrides}
    )


def test_replace_waits_for_as_many_ready_replicas_then_switches_and_drains() -> None:
    controller = RolloutController("llama", replace_spec())
    stable = VersionMetrics(requests=900, ready_replicas=3)
    seen = [
        controller.decide(t, stable, VersionMetrics(ready_replicas=ready))
        for t, ready in ((0, 0), (60, 2), (120, 3), (150, 3), (180, 3), (240, 3))
    ]
    assert [(str(d.action), str(d.phase), d.candidate_percent) for d in seen] == [
        ("wait", "pending", 0.0),
        ("wait", "pending", 0.0),
        ("promote", "switching", 100.0),
        ("hold", "switching", 100.0),
        ("hold", "done", 100.0),
        ("hold", "done", 100.0),
    ]
    assert seen[1].reasons == (
        "waiting for candidate 'int8': 2 of 3 replicas ready (as many as 'bf16' has ready); "
        "'bf16' keeps all traffic",
    )
    assert seen[2].reasons == (
        "candidate 'int8' has 3 ready replica(s), 3 needed (as many as 'bf16' has ready): "
        "switching all traffic to it; 'bf16' drains for 60 s",
    )
    assert dict(seen[2].split) == {"int8": 1.0, "bf16": 0.0}
    assert seen[3].reasons == ("switched to 'int8'; 'bf16' drains in-flight work (30 of 60 s)",)
    assert seen[4].reasons == (
        "done: 'int8' serves all traffic since t=120 and 'bf16' has drained; make it the "
        "stable version in the spec, remove the rollout and the pools serving 'bf16'",
    )


def test_replace_with_min_ready_replicas_and_an_unserved_stable_version() -> None:
    controller = RolloutController("llama", replace_spec(min_ready_replicas=2))
    # In place: nothing reports the stable version ready any more; 2 candidate replicas do it.
    gone = VersionMetrics(ready_replicas=0)
    assert controller.decide(0, gone, VersionMetrics(ready_replicas=1)).action is RolloutAction.WAIT
    decision = controller.decide(30, gone, VersionMetrics(ready_replicas=2))
    assert decision.action is RolloutAction.PROMOTE
    assert "2 needed (min_ready_replicas)" in decision.reasons[0]
    # Without min_ready_replicas, an unserved stable version still needs one ready candidate.
    bare = RolloutController("llama", replace_spec())
    assert bare.decide(0, gone, VersionMetrics(ready_replicas=0)).action is RolloutAction.WAIT
    assert bare.decide(1, gone, VersionMetrics(ready_replicas=1)).action is RolloutAction.PROMOTE


def test_replace_rolls_back_when_the_candidate_is_not_ready_in_time() -> None:
    controller = RolloutController("llama", replace_spec(ready_timeout_s=900))
    stable = VersionMetrics(ready_replicas=3)
    assert controller.decide(100, stable, VersionMetrics(ready_replicas=1)).action == "wait"
    assert controller.decide(999, stable, VersionMetrics(ready_replicas=2)).action == "wait"
    decision = controller.decide(1000, stable, VersionMetrics(ready_replicas=2))
    assert (decision.action, decision.phase) == (RolloutAction.ROLL_BACK, RolloutPhase.ROLLED_BACK)
    assert decision.reasons == (
        "candidate 'int8' had 2 of 3 replicas ready after 900 s (ready_timeout_s 900); 'bf16' "
        "keeps all traffic",
    )
    late = controller.decide(1100, stable, VersionMetrics(ready_replicas=3))
    assert (late.action, dict(late.split)) == (RolloutAction.HOLD, {"int8": 0.0, "bf16": 1.0})


# --------------------------------------------------------------------------------------------
# Shadow


def shadow_spec(**overrides: Any) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {"stable": "bf16", "candidate": "int8", "strategy": "shadow", **overrides}
    )


def test_shadow_copies_a_sample_and_accumulates_comparisons_without_moving_traffic() -> None:
    controller = RolloutController("llama", shadow_spec(sample_fraction=0.1))
    pending = controller.decide(0, STABLE_OK, VersionMetrics(ready_replicas=0))
    assert (pending.action, pending.shadow_fraction) == (RolloutAction.WAIT, 0.0)
    start = controller.decide(10, STABLE_OK, VersionMetrics(ready_replicas=1))
    assert (start.action, start.phase) == (RolloutAction.STEP_UP, RolloutPhase.SHADOWING)
    assert start.shadow_fraction == 0.1
    assert dict(start.split) == {"int8": 0.0, "bf16": 1.0}

    served = [1, 2, 3, 4, 5, 6, 7, 8]
    outputs = {
        "r1": [1, 2, 3, 4, 5, 6, 7, 8],  # identical
        "r2": [1, 2, 3, 4, 9, 9, 9, 9],  # diverges half-way
        "r3": [1, 2, 3, 4, 5, 6, 7, 0],  # last token differs
    }
    for rid, tokens in outputs.items():
        agreement = compare_outputs(served, tokens, "token-agreement")
        controller.record_shadow(
            ShadowComparison(rid, agreement, stable_latency_s=1.0, candidate_latency_s=1.5)
        )
    controller.record_shadow(ShadowComparison("r4", candidate_error=True))

    decision = controller.decide(70, STABLE_OK, VersionMetrics(ready_replicas=1))
    assert decision.action is RolloutAction.HOLD
    assert dict(decision.split) == {"int8": 0.0, "bf16": 1.0}
    assert decision.shadow_fraction == 0.1
    stats = decision.shadow
    assert stats is not None
    assert (stats.samples, stats.compared, stats.candidate_errors, stats.exact) == (4, 3, 1, 1)
    assert stats.mean_agreement == pytest.approx((1.0 + 0.5 + 0.875) / 3)
    assert stats.agreement_min == 0.5
    assert stats.latency_ratio == pytest.approx(1.5)
    assert stats.recent == [("r1", 1.0), ("r2", 0.5), ("r3", 0.875), ("r4", None)]
    assert decision.reasons == (
        "shadowing 10 % of requests to 'int8' (token-agreement): 4 compared, mean agreement "
        "0.792 (min 0.500), 1 exact, 1 candidate error(s), candidate latency 1.50x stable",
    )
    # However bad the comparisons, the split and the sample stay as the spec says.
    for i in range(50):
        controller.record_shadow(ShadowComparison(f"bad-{i}", 0.0))
    later = controller.decide(130, STABLE_OK, VersionMetrics(ready_replicas=1))
    assert (later.action, dict(later.split), later.shadow_fraction) == (
        RolloutAction.HOLD,
        {"int8": 0.0, "bf16": 1.0},
        0.1,
    )
    assert later.shadow is not None and later.shadow.samples == 54
    assert len(later.shadow.recent) == 20  # only the latest are listed one by one


def test_compare_outputs() -> None:
    assert compare_outputs([1, 2, 3], [1, 2, 3], "exact-match") == 1.0
    assert compare_outputs([1, 2, 3], [1, 2], "exact-match") == 0.0
    assert compare_outputs([1, 2, 3, 4], [1, 2], "token-agreement") == 0.5  # over the longer
    assert compare_outputs([], [], "token-agreement") == 1.0
    assert compare_outputs([5], [6], "token-agreement") == 0.0
    with pytest.raises(ValueError, match="unknown comparison"):
        compare_outputs([1], [1], "bleu")  # type: ignore[arg-type]


def test_shadow_stats_round_trip() -> None:
    stats = ShadowStats()
    stats.add(ShadowComparison("a", 0.25, stable_latency_s=2.0, candidate_latency_s=1.0))
    assert ShadowStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats


# --------------------------------------------------------------------------------------------
# State


def test_dump_and_load_resume_the_same_decisions() -> None:
    stable = Profile(error_rate=0.002)
    candidate = lambda now: Profile(  # noqa: E731
        error_rate=0.002, tpot_p95_s=0.070 if now >= 3000 else 0.052
    )
    whole = Traffic(RolloutController("llama", canary()), steady(stable), candidate)
    reference = whole.run(until=4200)

    first = RolloutController("llama", canary())
    before = Traffic(first, steady(stable), candidate).run(until=2400)
    saved = json.loads(json.dumps(first.dump_state()))
    resumed = RolloutController("llama", canary())
    assert resumed.load_state(saved) is True
    after = Traffic(resumed, steady(stable), candidate).run(until=4200, start=2460)
    # Traffic restarts its window at the resume; the controller's window_start carries it on.
    assert after[0].window_start == before[-1].window_start

    assert [d.to_json() for d in before] == [d.to_json() for d in reference[: len(before)]]
    assert actions(reference) == actions(before) + actions(after)
    assert ("roll_back" in [a for _, a, _ in actions(reference)]) is True
    assert resumed.events == first.events + [
        d.to_json() for d in after if d.action not in ("hold", "wait")
    ]


def test_state_of_another_rollout_is_ignored() -> None:
    first = started(canary())
    first.decide(200.0, STABLE_OK, cand(errors=100))
    other = RolloutController("llama", canary(candidate="int4"))
    assert other.load_state(first.dump_state()) is False
    assert other.phase is RolloutPhase.PENDING
    # Steps edited mid-rollout: the step index is kept within the new list.
    at_step_3 = started(canary())
    for t in (600.0, 1200.0):
        assert at_step_3.decide(t, STABLE_OK, cand()).action is RolloutAction.STEP_UP
    shorter = RolloutController("llama", canary(steps=[10, 50]))
    assert shorter.load_state(at_step_3.dump_state()) is True
    assert (shorter.step, shorter.split()) == (1, {"int8": 0.5, "bf16": 0.5})


def test_controllers_from_the_prod_stack() -> None:
    prod = load_stack_file(Path(__file__).parents[1] / "stacks" / "Pulumi.prod.yaml")
    controllers = controllers_from_spec(prod)
    assert list(controllers) == ["llama-3-1-8b"]
    controller = controllers["llama-3-1-8b"]
    assert (controller.stable, controller.candidate) == ("bf16", "int8")
    assert controller.split() == {"int8": 0.0, "bf16": 1.0}


# --------------------------------------------------------------------------------------------
# Splitting traffic

IDS = [f"chatcmpl-{i:05d}" for i in range(10_000)]


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5])
def test_choose_version_matches_the_split_within_a_binomial_bound(fraction: float) -> None:
    """Each id lands on the candidate with probability `fraction`, independently of the others
    (a hash of distinct ids behaves as independent uniform draws), so the count over n ids is
    Binomial(n, fraction): mean n p, sigma sqrt(n p (1 - p)). A 4-sigma band is exceeded with
    probability about 6e-5 for a fair hash; at n = 10 000 and p = 0.05 that is 500 +- 87."""
    n = len(IDS)
    split = {"int8": fraction, "bf16": 1.0 - fraction}
    count = sum(choose_version(rid, split) == "int8" for rid in IDS)
    sigma = math.sqrt(n * fraction * (1 - fraction))
    assert abs(count - n * fraction) <= 4 * sigma, (count, n * fraction, sigma)


def test_choose_version_is_stable_per_id_and_monotone_across_steps() -> None:
    steps = [0.05, 0.25, 0.5, 1.0]
    chosen = [
        {rid: choose_version(rid, {"int8": f, "bf16": 1.0 - f}) for rid in IDS[:2000]}
        for f in steps
    ]
    # The same id, asked again, gets the same answer.
    assert all(
        choose_version(rid, {"int8": 0.25, "bf16": 0.75}) == chosen[1][rid] for rid in IDS[:2000]
    )
    # Raising the candidate's share only moves ids from stable to candidate.
    for lower, higher in itertools.pairwise(chosen):
        on_candidate = {rid for rid, v in lower.items() if v == "int8"}
        assert all(higher[rid] == "int8" for rid in on_candidate)
    assert set(chosen[-1].values()) == {"int8"}
    assert choose_version("x", {"int8": 0.0, "bf16": 1.0}) == "bf16"


def test_choose_version_refuses_bad_splits() -> None:
    with pytest.raises(ValueError, match="empty split"):
        choose_version("x", {})
    with pytest.raises(ValueError, match=r"fraction of 'a' is -0\.1, below 0"):
        choose_version("x", {"a": -0.1, "b": 1.1})
    with pytest.raises(ValueError, match=r"fractions sum to 0\.9, not 1"):
        choose_version("x", {"a": 0.4, "b": 0.5})


def test_shadow_sample_fraction_and_independence_from_the_split() -> None:
    n = len(IDS)
    sampled = {rid for rid in IDS if shadow_sample(rid, 0.1)}
    sigma = math.sqrt(n * 0.1 * 0.9)
    assert abs(len(sampled) - n * 0.1) <= 4 * sigma
    assert all(shadow_sample(rid, 0.1) for rid in sampled)  # stable per id
    assert not any(shadow_sample(rid, 0.0) for rid in IDS[:500])
    assert all(shadow_sample(rid, 1.0) for rid in IDS[:500])
    # Salted apart: among the 25 % on the candidate, about 10 % are sampled too (not all, not
    # none, as they would be if both used the same number).
    on_candidate = [rid for rid in IDS if choose_version(rid, {"c": 0.25, "s": 0.75}) == "c"]
    both = sum(rid in sampled for rid in on_candidate)
    m = len(on_candidate)
    assert abs(both - m * 0.1) <= 4 * math.sqrt(m * 0.1 * 0.9)
    with pytest.raises(ValueError):
        shadow_sample("x", 1.5)


# --------------------------------------------------------------------------------------------
# Inputs


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 95) is None


def test_version_metrics_from_samples_and_validation() -> None:
    metrics = VersionMetrics.from_samples(
        ttfts_s=[0.1 * i for i in range(1, 21)], tpots_s=[0.05] * 20, errors=5, ready_replicas=2
    )
    assert (metrics.requests, metrics.errors, metrics.ready_replicas) == (25, 5, 2)
    assert metrics.ttft_p95_s == pytest.approx(1.9)
    assert metrics.error_rate == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"errors \(3\) exceed requests \(2\)"):
        VersionMetrics(requests=2, errors=3)
    with pytest.raises(ValueError, match="ttft_p95_s"):
        VersionMetrics(requests=2, ttft_p95_s=math.nan)


def test_decision_serialises() -> None:
    controller = started(canary())
    decision = controller.decide(600.0, STABLE_OK, cand())
    data = json.loads(json.dumps(decision.to_json()))
    assert data["action"] == "step_up" and data["phase"] == "canary"
    assert data["split"] == {"int8": 0.25, "bf16": 0.75}
    assert data["step"] == 1 and data["window_start"] == 600.0
