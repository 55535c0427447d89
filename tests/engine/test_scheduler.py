"""The continuous-batching scheduler driven with fabricated requests (no model).

A fake clock and :class:`BlockKVCapacity` stand in for time and the engine's KV pool; a fake
"engine" returns fixed token ids.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.scheduler import (
    BlockKVCapacity,
    FinishReason,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

EOS = 2
TOKEN = 7  # what the fake engine samples unless told otherwise


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    num_blocks: int | None = 64,
    block_size: int = 4,
) -> tuple[Scheduler, BlockKVCapacity, FakeClock]:
    kv = BlockKVCapacity(num_blocks, block_size)
    clock = FakeClock()
    sched = Scheduler(
        SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len), kv, clock
    )
    return sched, kv, clock


def req(
    rid: str,
    prompt_len: int = 4,
    max_tokens: int = 4,
    priority: int = 1,
    deadline: float | None = None,
) -> Request:
    return Request(
        rid,
        list(range(10, 10 + prompt_len)),
        max_tokens,
        priority=priority,
        deadline=deadline,
        stop_token_ids=frozenset({EOS}),
    )


def run_step(
    sched: Scheduler, token: int = TOKEN, tokens: dict[str, int] | None = None
) -> tuple[SchedulerOutput, list]:
    out = sched.schedule()
    sampled = {
        s.request_id: (tokens or {}).get(s.request_id, token) for s in out.scheduled if s.sample
    }
    return out, sched.update(out, sampled)


def ids(out: SchedulerOutput) -> list[str]:
    return [s.request_id for s in out.scheduled]


def chunks(out: SchedulerOutput) -> list[tuple[str, int]]:
    """What the step runs: (request id, tokens) in scheduling order."""
    return [(s.request_id, len(s.token_ids)) for s in out.scheduled]


def test_admission_order_priority_then_deadline_then_arrival() -> None:
    sched, _, clock = make(max_num_seqs=1)
    clock.now = 1.0
    sched.add_request(req("batch-early", priority=2))
    clock.now = 2.0
    sched.add_request(req("std-no-deadline", priority=1))
    clock.now = 3.0
    sched.add_request(req("std-late-deadline", priority=1, deadline=100.0))
    clock.now = 4.0
    sched.add_request(req("std-early-deadline", priority=1, deadline=50.0))
    clock.now = 5.0
    sched.add_request(req("critical-last", priority=0))
    clock.now = 6.0
    sched.add_request(req("std-early-deadline-2", priority=1, deadline=50.0))
    order = []
    while sched.has_unfinished():
        _, updates = run_step(sched)
        for u in updates:
            if u.finished:
                order.append(u.request_id)
    assert order == [
        "critical-last",
        "std-early-deadline",
        "std-early-deadline-2",
        "std-late-deadline",
        "std-no-deadline",
        "batch-early",
    ]


def test_token_budget_and_chunked_prefill() -> None:
    sched, _, _ = make(max_num_seqs=8, max_num_batched_tokens=16)
    sched.add_request(req("a", prompt_len=40, max_tokens=3))
    out, updates = run_step(sched)
    assert [
        (s.request_id, len(s.token_ids), s.num_computed_tokens, s.sample) for s in out.scheduled
    ] == [("a", 16, 0, False)]
    assert updates == []
    sched.add_request(req("b", prompt_len=4, max_tokens=3))
    out, _ = run_step(sched)
    # "a" is running and goes first; "b" gets what is left of the budget.
    assert [(s.request_id, len(s.token_ids), s.num_computed_tokens) for s in out.scheduled] == [
        ("a", 16, 16)
    ]
    out, updates = run_step(sched)
    # a: last 8 prompt tokens and its first sample; b: admitted with the remaining 8 of the budget.
    assert [(s.request_id, len(s.token_ids), s.sample) for s in out.scheduled] == [
        ("a", 8, True),
        ("b", 4, True),
    ]
    assert out.num_batched_tokens <= 16
    assert {u.request_id for u in updates} == {"a", "b"}
    # From now on both decode one token per step.
    out, _ = run_step(sched)
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [("a", 1), ("b", 1)]
    assert out.scheduled[0].token_ids == [TOKEN]


def test_long_prompt_does_not_stall_running_decodes() -> None:
    sched, _, _ = make(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=512, num_blocks=200)
    sched.add_request(req("stream", prompt_len=2, max_tokens=50))
    run_step(sched)
    sched.add_request(req("long", prompt_len=100, max_tokens=2))
    emitted = 0
    for _ in range(10):
        out, updates = run_step(sched)
        assert "stream" in ids(out)
        assert out.num_batched_tokens <= 8
        emitted += sum(len(u.new_token_ids) for u in updates if u.request_id == "stream")
    assert emitted == 10


def test_max_num_seqs_bounds_the_batch() -> None:
    sched, _, _ = make(max_num_seqs=3, max_num_batched_tokens=100)
    for i in range(5):
        sched.add_request(req(f"r{i}"))
    out, _ = run_step(sched)
    assert ids(out) == ["r0", "r1", "r2"]
    assert sched.num_running == 3 and sched.num_waiting == 2


def test_finished_leave_and_waiting_join_in_the_same_step() -> None:
    sched, _, _ = make(max_num_seqs=2, max_num_batched_tokens=100)
    sched.add_request(req("short", max_tokens=1))
    sched.add_request(req("long", max_tokens=5))
    sched.add_request(req("next", max_tokens=1))
    _, updates = run_step(sched)  # prefill both + first token; "short" finishes at once
    assert [u.request_id for u in updates if u.finished] == ["short"]
    out, _ = run_step(sched)
    assert ids(out) == ["long", "next"]


def test_stop_token_and_max_tokens_and_ignore_eos() -> None:
    sched, _, _ = make()
    sched.add_request(req("eos", max_tokens=10))
    sched.add_request(Request("ignore", [1, 2, 3], 3, stop_token_ids=frozenset()))
    _, updates = run_step(sched, token=EOS)
    by_id = {u.request_id: u for u in updates}
    assert by_id["eos"].finished and by_id["eos"].finish_reason is FinishReason.STOP
    assert not by_id["ignore"].finished
    reasons = {}
    while sched.has_unfinished():
        for u in run_step(sched, token=EOS)[1]:
            if u.finished:
                reasons[u.request_id] = (u.finish_reason, u.num_output_tokens)
    assert reasons == {"ignore": (FinishReason.LENGTH, 3)}


def test_max_model_len_ends_with_length() -> None:
    sched, _, _ = make(max_model_len=10, num_blocks=16)
    sched.add_request(req("r", prompt_len=8, max_tokens=100))
    finals = []
    while sched.has_unfinished():
        finals += [u for u in run_step(sched)[1] if u.finished]
    assert finals[0].finish_reason is FinishReason.LENGTH and finals[0].num_output_tokens == 2


def test_preemption_picks_lowest_priority_latest_admitted_and_resumes_by_recompute() -> None:
    # 12 blocks of 4 tokens = 48 tokens of KV.
    sched, kv, _ = make(
        max_num_seqs=8, max_num_batched_tokens=64, num_blocks=12, block_size=4, max_model_len=48
    )
    sched.add_request(req("std-1", prompt_len=8, max_tokens=30, priority=1))
    sched.add_request(req("batch-1", prompt_len=8, max_tokens=30, priority=2))
    sched.add_request(req("batch-2", prompt_len=8, max_tokens=30, priority=2))
    sched.add_request(req("std-2", prompt_len=8, max_tokens=30, priority=1))
    out, _ = run_step(sched)
    assert set(ids(out)) == {"std-1", "batch-1", "batch-2", "std-2"}
    preempted: list[str] = []
    tokens_before: dict[str, int] = {}
    while not preempted:
        out, updates = run_step(sched)
        for u in updates:
            tokens_before[u.request_id] = u.num_output_tokens
        preempted = out.preempted
    # Lowest priority (2) and, among those, the latest admitted.
    assert preempted == ["batch-2"]
    assert out.released == ["batch-2"]
    assert kv.held_blocks("batch-2") == 0
    assert sched.status("batch-2") is RequestStatus.WAITING
    # Run to completion; the preempted request resumes with prompt + generated tokens recomputed.
    resumed = None
    finished: dict[str, int] = {}
    while sched.has_unfinished():
        out, updates = run_step(sched)
        for s in out.scheduled:
            if s.request_id == "batch-2" and s.num_computed_tokens == 0 and resumed is None:
                resumed = s
        for u in updates:
            if u.finished:
                finished[u.request_id] = u.num_output_tokens
    assert resumed is not None
    n_generated = tokens_before["batch-2"]
    assert n_generated > 0
    # The recompute chunk covers the prompt and the tokens generated before preemption.
    assert resumed.token_ids[:8] == list(range(10, 18))
    assert resumed.sample and len(resumed.token_ids) == 8 + n_generated
    assert resumed.token_ids[8:] == [TOKEN] * n_generated
    assert finished == {"std-1": 30, "batch-1": 30, "batch-2": 30, "std-2": 30}
    assert kv.used_blocks == 0


def test_waiting_critical_request_preempts_less_important_running() -> None:
    sched, kv, _ = make(
        max_num_seqs=8, max_num_batched_tokens=64, num_blocks=8, block_size=4, max_model_len=32
    )
    sched.add_request(req("batch", prompt_len=24, max_tokens=8, priority=2))
    run_step(sched)
    assert kv.free_tokens == 8
    sched.add_request(req("standard", prompt_len=12, max_tokens=2, priority=2))
    out, _ = run_step(sched)
    assert ids(out) == ["batch"] and out.preempted == []  # equal priority waits
    sched.add_request(req("critical", prompt_len=12, max_tokens=2, priority=0))
    out, _ = run_step(sched)
    assert out.preempted == ["batch"] and "critical" in ids(out)


def test_abort_frees_kv_at_next_step_waiting_or_running() -> None:
    sched, kv, _ = make(max_num_seqs=1)
    sched.add_request(req("running", prompt_len=12, max_tokens=50))
    sched.add_request(req("waiting", prompt_len=12, max_tokens=50))
    run_step(sched)
    held = kv.held_blocks("running")
    assert held > 0
    sched.abort("running")
    sched.abort("waiting")
    sched.abort("unknown")
    assert kv.held_blocks("running") == held  # takes effect at the next step
    out, _ = run_step(sched)
    assert kv.held_blocks("running") == 0 and kv.used_blocks == 0
    assert out.released == ["running"]
    assert {(u.request_id, u.finish_reason) for u in out.finished} == {
        ("running", FinishReason.ABORT),
        ("waiting", FinishReason.ABORT),
    }
    assert not sched.has_unfinished()


def test_abort_is_thread_safe() -> None:
    sched, kv, _ = make(max_num_seqs=64, max_num_batched_tokens=512, num_blocks=1000)
    names = [f"r{i}" for i in range(200)]

    def submit(chunk: list[str]) -> None:
        for n in chunk:
            sched.add_request(req(n))
            sched.abort(n)

    threads = [threading.Thread(target=submit, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    aborted = set()
    while sched.has_unfinished():
        out, _ = run_step(sched)
        aborted |= {u.request_id for u in out.finished if u.finish_reason is FinishReason.ABORT}
    assert aborted == set(names)
    assert kv.used_blocks == 0


def test_finish_request_releases_kv_immediately() -> None:
    sched, kv, _ = make()
    sched.add_request(req("r", max_tokens=10))
    run_step(sched)
    final = sched.finish_request("r", FinishReason.STOP)
    assert final is not None and final.finished and final.finish_reason is FinishReason.STOP
    assert kv.used_blocks == 0
    assert sched.finish_request("r") is None


def test_invalid_requests_are_rejected_not_dropped() -> None:
    sched, _, _ = make(max_model_len=16)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        sched.add_request(req("empty", prompt_len=0))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        sched.add_request(req("too-long", prompt_len=16))
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add_request(req("zero", max_tokens=0))
    sched.add_request(req("dup"))
    with pytest.raises(ValueError, match="request_id"):
        sched.add_request(req("dup"))
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(
            SchedulerConfig(max_model_len=100),
            BlockKVCapacity(num_blocks=10, block_size=4),
            FakeClock(),
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(
        st.tuples(
            st.integers(1, 40),  # prompt length
            st.integers(1, 20),  # max tokens
            st.integers(0, 2),  # priority
            st.one_of(st.none(), st.floats(0, 100)),  # deadline
            st.integers(0, 30),  # step at which it arrives
            st.one_of(st.none(), st.integers(0, 40)),  # step at which it is aborted
        ),
        min_size=1,
        max_size=25,
    ),
    num_blocks=st.integers(16, 40),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(1, 48),
    eos_every=st.integers(0, 7),
)
def test_property_every_request_finishes_or_aborts(
    requests: list, num_blocks: int, max_num_seqs: int, budget: int, eos_every: int
) -> None:
    block_size = 4
    sched, kv, clock = make(
        max_num_seqs, budget, max_model_len=64, num_blocks=num_blocks, block_size=block_size
    )
    final: dict[str, FinishReason] = {}
    added: set[str] = set()
    step = 0
    while step < 5000:
        clock.now = float(step)
        for i, (plen, mtok, prio, deadline, arrive, abort_at) in enumerate(requests):
            rid = f"r{i}"
            if arrive == step:
                sched.add_request(
                    req(rid, prompt_len=plen, max_tokens=mtok, priority=prio, deadline=deadline)
                )
                added.add(rid)
            if abort_at == step and rid in added:
                sched.abort(rid)
        out = sched.schedule()
        # Invariants of every plan.
        assert out.num_batched_tokens <= budget
        assert len(out.scheduled) <= max_num_seqs
        assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
        assert kv.used_blocks <= num_blocks
        for s in out.scheduled:
            assert kv.held_blocks(s.request_id) * block_size >= s.num_computed_tokens + len(
                s.token_ids
            )
        for u in out.finished:
            final[u.request_id] = u.finish_reason
        sampled = {}
        for s in out.scheduled:
            if s.sample:
                sampled[s.request_id] = EOS if eos_every and (step % eos_every == 0) else TOKEN
        for u in sched.update(out, sampled):
            if u.finished:
                assert u.request_id not in final
                final[u.request_id] = u.finish_reason
        step += 1
        if step > 41 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished(), "scheduler stalled"
    assert set(final) == added
    assert kv.used_blocks == 0


def test_important_long_prompt_does_not_starve_running_decodes() -> None:
    sched, _, _ = make(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=512, num_blocks=200)
    sched.add_request(req("stream", prompt_len=2, max_tokens=50, priority=2))
    run_step(sched)
    sched.add_request(req("critical-long", prompt_len=100, max_tokens=2, priority=0))
    for _ in range(10):
        out, _ = run_step(sched)
        planned = {s.request_id: len(s.token_ids) for s in out.scheduled}
        assert planned["stream"] == 1
        assert planned.get("critical-long", 0) == 7


def test_waiting_important_prompt_takes_the_prefill_budget_from_a_less_important_one() -> None:
    sched, _, _ = make(max_num_batched_tokens=16, max_model_len=512, num_blocks=200)
    sched.add_request(req("batch-long", prompt_len=100, max_tokens=2, priority=2))
    out, _ = run_step(sched)
    assert chunks(out) == [("batch-long", 16)]
    sched.add_request(req("critical", prompt_len=24, max_tokens=2, priority=0))
    out, _ = run_step(sched)
    # The critical prompt is admitted ahead of the rest of the batch prompt, which keeps its
    # place (and its KV) and gets what the critical one leaves of the budget.
    assert chunks(out) == [("critical", 16)]
    out, _ = run_step(sched)
    assert [(s.request_id, len(s.token_ids), s.sample) for s in out.scheduled] == [
        ("critical", 8, True),
        ("batch-long", 8, False),
    ]
    assert sched.status("batch-long") is RequestStatus.RUNNING
    assert sched.num_preemptions == 0


def test_running_prompt_keeps_the_budget_against_one_no_more_important() -> None:
    sched, _, _ = make(max_num_batched_tokens=16, max_model_len=512, num_blocks=200)
    sched.add_request(req("first", prompt_len=40, max_tokens=2, priority=1))
    run_step(sched)
    sched.add_request(req("same", prompt_len=24, max_tokens=2, priority=1))
    sched.add_request(req("less", prompt_len=24, max_tokens=2, priority=2))
    out, _ = run_step(sched)
    assert chunks(out) == [("first", 16)]
    out, _ = run_step(sched)
    assert chunks(out) == [
        ("first", 8),
        ("same", 8),
    ]


# -- TPOT budget: prefill beside decodes cut to the decodes' time-per-output-token objectives --


class LinearCost:
    """A step costs ``decode`` seconds when anything decodes plus ``per_token`` per prompt token."""

    def __init__(self, decode: float = 0.010, per_token: float = 0.001) -> None:
        self.decode = decode
        self.per_token = per_token

    def decode_s(self, num_decodes: int, context_tokens: int) -> float:
        return self.decode

    def prefill_s(self, start: int, end: int) -> float:
        return (end - start) * self.per_token


def make_timed(
    cost: LinearCost | None, max_num_batched_tokens: int = 256, min_prefill_tokens: int = 16
) -> tuple[Scheduler, FakeClock]:
    clock = FakeClock()
    config = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=1024,
        min_prefill_tokens=min_prefill_tokens,
    )
    return Scheduler(config, BlockKVCapacity(None, 16), clock, step_cost=cost), clock


def timed_req(rid: str, prompt_len: int, max_tokens: int, priority: int = 1, tpot=None) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), max_tokens, priority=priority, tpot=tpot)


def run_timed(sched: Scheduler, clock: FakeClock, cost: LinearCost) -> dict[str, list[float]]:
    """Step to the end, the clock advancing by each step's cost; token times per request."""
    times: dict[str, list[float]] = {}
    while sched.has_unfinished():
        out = sched.schedule()
        decodes = [s for s in out.scheduled if len(s.token_ids) == 1 and s.num_generated > 0]
        clock.now += (cost.decode if decodes else 0.0) + cost.per_token * sum(
            len(s.token_ids) for s in out.scheduled if s not in decodes
        )
        sampled = {s.request_id: TOKEN for s in out.scheduled if s.sample}
        for u in sched.update(out, sampled):
            times.setdefault(u.request_id, []).extend([clock.now] * len(u.new_token_ids))
    return times


def mean_tpot(times: list[float]) -> float:
    return (times[-1] - times[0]) / (len(times) - 1)


def test_tpot_budget_keeps_a_decoding_stream_within_its_objective() -> None:
    cost = LinearCost(decode=0.010, per_token=0.001)
    results = {}
    for with_cost in (False, True):
        sched, clock = make_timed(cost if with_cost else None)
        sched.add_request(timed_req("stream", 8, 40, tpot=0.050))
        _, _ = run_step(sched)  # its prompt; first token at t=0 (the clock is not advanced)
        for i in range(4):  # long prompts arriving while it decodes
            sched.add_request(timed_req(f"long{i}", 600, 2, tpot=0.050))
        results[with_cost] = run_timed(sched, clock, cost)
    stream_without = [0.0, *results[False]["stream"]]
    stream_with = [0.0, *results[True]["stream"]]
    # Token budget alone: 256-token chunks make 0.266 s steps beside the stream's decodes.
    assert mean_tpot(stream_without) > 0.050
    # With the step cost every token is on time: the k-th after the first by k x tpot.
    assert all(t <= k * 0.050 + 1e-9 for k, t in enumerate(stream_with))
    assert mean_tpot(stream_with) <= 0.050
    # The long prompts still all finished, in the time the decodes left them.
    assert all(len(results[True][f"long{i}"]) == 2 for i in range(4))


def test_tpot_budget_chunk_is_what_fits_before_the_next_token_is_due() -> None:
    cost = LinearCost(decode=0.010, per_token=0.001)
    sched, clock = make_timed(cost)
    sched.add_request(timed_req("stream", 8, 40, tpot=0.050))
    run_step(sched)  # first token at t=0: the next is due at 0.050
    clock.now = 0.005
    sched.add_request(timed_req("long", 600, 2))
    out = sched.schedule()
    chunks = {s.request_id: len(s.token_ids) for s in out.scheduled}
    # 0.005 + 0.010 decode + n x 0.001 <= 0.050  ->  n = 35
    assert chunks == {"stream": 1, "long": 35}


def test_tpot_budget_leaves_more_important_prompts_and_untimed_streams_alone() -> None:
    cost = LinearCost(decode=0.010, per_token=0.001)
    sched, _ = make_timed(cost)
    sched.add_request(timed_req("batch-stream", 8, 40, priority=2, tpot=0.050))
    sched.add_request(timed_req("untimed", 8, 40, priority=0))  # no objective
    run_step(sched)
    sched.add_request(timed_req("critical", 600, 2, priority=0))
    out = sched.schedule()
    # A less important stream's objective does not slow a critical prompt down.
    assert {s.request_id: len(s.token_ids) for s in out.scheduled}["critical"] == 254


def test_tpot_budget_ignores_a_stream_that_cannot_make_it_anymore() -> None:
    cost = LinearCost(decode=0.010, per_token=0.001)
    sched, clock = make_timed(cost)
    sched.add_request(timed_req("late", 8, 3, tpot=0.050))
    run_step(sched)  # first token at t=0; its 3 tokens need a mean gap <= 0.050: done by 0.100
    # At 0.095 its last 2 tokens take 0.020 even decoding alone: it is lost, holds nothing back.
    clock.now = 0.095
    sched.add_request(timed_req("long", 600, 2))
    out = sched.schedule()
    assert {s.request_id: len(s.token_ids) for s in out.scheduled} == {"late": 1, "long": 255}


def test_tpot_budget_still_gives_prompts_the_floor_when_no_time_is_left() -> None:
    cost = LinearCost(decode=0.010, per_token=0.001)
    sched, clock = make_timed(cost, min_prefill_tokens=16)
    sched.add_request(timed_req("tight", 8, 100, tpot=0.050))
    run_step(sched)
    # Its next token was due at 0.050: late, but it can catch up, so no time is left for
    # prefill; the waiting prompt still progresses by the floor.
    clock.now = 0.095
    sched.add_request(timed_req("long", 600, 2))
    out = sched.schedule()
    assert {s.request_id: len(s.token_ids) for s in out.scheduled} == {"tight": 1, "long": 16}


def test_without_step_cost_the_objective_changes_nothing() -> None:
    sched, clock = make_timed(None)
    sched.add_request(timed_req("stream", 8, 40, tpot=0.001))
    run_step(sched)
    clock.now = 1.0
    sched.add_request(timed_req("long", 600, 2))
    out = sched.schedule()
    assert {s.request_id: len(s.token_ids) for s in out.scheduled} == {"stream": 1, "long": 255}


def test_with_step_cost_a_prompt_that_cannot_make_its_deadline_yields_to_one_that_can() -> None:
    cost = LinearCost(decode=0.010, per_token=0.001)
    for with_cost in (False, True):
        sched, _ = make_timed(cost if with_cost else None)
        # "hopeless" needs 0.6 s of prefill for a deadline 0.1 s away; "on-time" can make its.
        sched.add_request(Request("hopeless", list(range(10, 610)), 2, priority=0, deadline=0.1))
        sched.add_request(Request("on-time", list(range(10, 110)), 2, priority=0, deadline=2.0))
        out = sched.schedule()
        chunks = {s.request_id: len(s.token_ids) for s in out.scheduled}
        if with_cost:
            assert ids(out) == ["on-time", "hopeless"] and chunks == {
                "on-time": 100,
                "hopeless": 156,
            }
        else:  # token budget alone: deadline order, the hopeless one first
            assert chunks == {"hopeless": 256}
