"""runtime.agent.admission: priority classes and the shedding prediction on fabricated state."""

from __future__ import annotations

import pytest

from runtime.agent.admission import (
    LoadState,
    MeasuredStepCost,
    ThroughputEstimate,
    UnknownPriorityClassError,
    WorkItem,
    decide_shedding,
    predict_ttft,
    resolve_priority,
)
from runtime.spec import SloClassSpec

CRITICAL = SloClassSpec(name="critical", priority=0, ttft_ms=500, tpot_ms=50)
STANDARD = SloClassSpec(name="standard", priority=1, ttft_ms=2000, tpot_ms=100)
BATCH = SloClassSpec(name="batch", priority=2, ttft_ms=10_000, tpot_ms=500, sheddable=True)
CLASSES = {c.name: c for c in (CRITICAL, STANDARD, BATCH)}


def state(
    items: list[WorkItem] | None = None,
    rate: float | None = 100.0,
    step: float | None = 0.05,
    max_num_seqs: int = 8,
    max_waiting: int = 100,
) -> LoadState:
    return LoadState(rate, step, items or [], max_num_seqs, max_waiting)


def waiting(priority: int, prefill: int, decode: int = 10) -> WorkItem:
    return WorkItem(priority, prefill, decode, running=False)


def running(priority: int, decode_left: int, prefill: int = 0) -> WorkItem:
    return WorkItem(priority, prefill, decode_left, running=True)


# --------------------------------------------------------------------------------------------
# Priority


@pytest.mark.parametrize(
    ("asked", "default", "ceiling", "expected", "capped"),
    [
        (None, "standard", "critical", "standard", False),
        ("", "standard", "critical", "standard", False),
        ("critical", "standard", "critical", "critical", False),
        ("batch", "standard", "critical", "batch", False),  # asking for less is always fine
        ("critical", "standard", None, "standard", True),  # no max: the default is the ceiling
        ("critical", "batch", "standard", "standard", True),
        (" batch ", "standard", None, "batch", False),
    ],
)
def test_resolve_priority(
    asked: str | None, default: str, ceiling: str | None, expected: str, capped: bool
) -> None:
    result = resolve_priority(asked, default, ceiling, CLASSES)
    assert (result.slo_class.name, result.capped) == (expected, capped)


def test_unknown_class_is_an_error_listing_the_known_ones() -> None:
    with pytest.raises(UnknownPriorityClassError, match=r"'gold'.*batch, critical, standard"):
        resolve_priority("gold", "standard", None, CLASSES)


# --------------------------------------------------------------------------------------------
# Throughput


def test_throughput_ewma() -> None:
    t = ThroughputEstimate(alpha=0.5)
    t.observe(prefill_tokens=100, decode_tokens=0, seconds=1.0)
    assert t.prefill_tokens_per_s == 100
    t.observe(prefill_tokens=150, decode_tokens=50, seconds=1.0)  # mixed: all rows count
    assert t.prefill_tokens_per_s == 150
    t.observe(prefill_tokens=0, decode_tokens=4, seconds=0.1)
    assert t.decode_step_s == pytest.approx(0.1)
    t.observe(prefill_tokens=0, decode_tokens=4, seconds=0.3)
    assert t.decode_step_s == pytest.approx(0.2)
    t.observe(prefill_tokens=0, decode_tokens=0, seconds=0.0)  # nothing happened: ignored
    assert (t.prefill_tokens_per_s, t.decode_step_s) == (150, pytest.approx(0.2))


def test_measured_step_cost_reads_the_live_estimate() -> None:
    t = ThroughputEstimate(alpha=1.0)
    cost = MeasuredStepCost(t)
    # Nothing measured: free, so the scheduler's token budget alone decides.
    assert (cost.decode_s(4, 400), cost.prefill_s(0, 512)) == (0.0, 0.0)
    t.observe(prefill_tokens=0, decode_tokens=4, seconds=0.02)
    t.observe(prefill_tokens=500, decode_tokens=12, seconds=0.5)
    assert cost.decode_s(4, 400) == pytest.approx(0.02)
    assert cost.prefill_s(100, 356) == pytest.approx(256 / 1024)


# --------------------------------------------------------------------------------------------
# Prediction


def test_unknown_speed_predicts_nothing_and_sheds_nothing() -> None:
    s = state([waiting(2, 10_000)], rate=None)
    assert predict_ttft(s, 100, 2) is None
    assert not decide_shedding(s, 100, BATCH).shed


def test_idle_node_predicts_own_prefill() -> None:
    assert predict_ttft(state(), 200, 1) == pytest.approx(2.0)


def test_only_work_at_the_same_or_higher_priority_counts() -> None:
    items = [waiting(0, 300), waiting(1, 200), waiting(2, 5000), running(2, 10, prefill=100)]
    # Running prefills go first whatever their class; waiting batch work does not delay standard.
    assert predict_ttft(state(items), 100, 1) == pytest.approx((300 + 200 + 100 + 100) / 100)
    assert predict_ttft(state(items), 100, 0) == pytest.approx((300 + 100 + 100) / 100)
    assert predict_ttft(state(items), 100, 2) == pytest.approx((5600 + 100) / 100)


def test_a_full_batch_adds_the_wait_for_a_slot() -> None:
    items = [running(1, decode) for decode in (50, 20, 30)]
    s = state(items, rate=1000.0, step=0.1, max_num_seqs=3)
    # The first slot frees when the shortest running request (20 tokens) ends: 2 s, then 0.1 s.
    assert predict_ttft(s, 100, 1) == pytest.approx(20 * 0.1 + 100 / 1000)
    # One waiting request ahead takes that slot: we need the second one (30 tokens).
    s = state([*items, waiting(0, 10)], rate=1000.0, step=0.1, max_num_seqs=3)
    assert predict_ttft(s, 100, 1) == pytest.approx(30 * 0.1 + 100 / 1000)


def test_sheddable_request_is_shed_when_predicted_late() -> None:
    backlog = [waiting(2, 900)]
    decision = decide_shedding(state(backlog), 200, BATCH)  # 11 s > 10 s objective
    assert decision.shed
    assert decision.reason == "overload"
    assert decision.predicted_ttft_s == pytest.approx(11.0)
    assert decision.retry_after_s == 1
    assert "11.00s" in decision.message
    assert not decide_shedding(state([waiting(2, 700)]), 200, BATCH).shed  # 9 s: in time


def test_retry_after_grows_with_the_overshoot_and_is_capped() -> None:
    assert decide_shedding(state([waiting(2, 3000)]), 100, BATCH).retry_after_s == 21
    assert decide_shedding(state([waiting(2, 10**7)]), 100, BATCH).retry_after_s == 120


def test_critical_work_is_never_shed_by_prediction() -> None:
    backlog = [waiting(2, 10**6), waiting(0, 10**6)]
    decision = decide_shedding(state(backlog), 100, CRITICAL)
    assert not decision.shed
    assert decision.predicted_ttft_s is not None
    assert decision.predicted_ttft_s > CRITICAL.ttft_ms / 1000
    assert not decide_shedding(state(backlog), 100, STANDARD).shed  # standard is not sheddable


def test_full_queue_sheds_sheddable_and_protects_critical_while_lower_work_waits() -> None:
    full_of_batch = state([waiting(2, 10)] * 5, max_waiting=5)
    assert decide_shedding(full_of_batch, 10, BATCH).reason == "queue_full"
    assert not decide_shedding(full_of_batch, 10, CRITICAL).shed  # it jumps the batch queue
    full_of_critical = state([waiting(0, 10)] * 5, max_waiting=5)
    decision = decide_shedding(full_of_critical, 10, CRITICAL)
    assert (decision.shed, decision.reason) == (True, "queue_full")
    assert decision.retry_after_s >= 1
