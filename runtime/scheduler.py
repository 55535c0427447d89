"""Iteration-level (continuous batching) scheduler: pure logic, no model, injected clock.

This module owns *which* sequences run in each engine step and how many tokens each processes. It
mirrors the shape of vLLM's v1 scheduler (``vllm/v1/core/sched``) at a fraction of the size:

* Every step, finished sequences have already left, running sequences continue (a decode token or
  the next prefill chunk), then waiting requests are admitted in order of ``(priority, deadline,
  arrival)`` while the token budget (``max_num_batched_tokens``), the batch size (``max_num_seqs``)
  and KV capacity allow. Prompts longer than the remaining budget are chunked, so a long prompt
  shares steps with running decodes instead of stalling them. A running prompt less important
  than the most important waiting request gets its next chunk only after admission, so an
  important prompt waits for the step in progress, not for the rest of a long one that started
  first (the deferred prompt keeps its KV and its place).
* With a :class:`StepCost` (an estimate of how long a step takes), the prefill admitted into a
  step is also bounded by time: every decoding sequence with a ``tpot`` objective has a
  deadline for its next token (its first token's time plus ``tpot`` per token since, i.e. the
  stream's mean time per output token stays within ``tpot``), and prefill chunks are cut so
  that the step ends by the earliest such deadline among the decodes at least as important as
  the prompt (Sarathi-Serve's stall-free batching with a token budget taken from the TPOT
  objective, per step, from each stream's slack). Streams that can no longer meet their
  objective even decoding alone until ``max_tokens`` do not hold prefill back, and every step
  still takes ``min_prefill_tokens`` of prefill so that waiting prompts always progress. With a
  step cost, a waiting request that cannot have its first token by its ``deadline`` even
  prefilling alone from now gives up its deadline: it queues behind the requests of its
  priority that can still make theirs.
* KV space is reserved through the small :class:`KVCapacity` protocol. When a reservation fails, the
  least important running sequence (highest ``priority`` number, then latest admitted) is
  preempted: its KV is released and it goes back to waiting, to be resumed later by recomputing
  prompt + generated tokens. A waiting request may preempt only strictly less important ones.
* Requests are never dropped silently: each one ends with ``finish_reason`` ``stop``, ``length`` or
  ``abort``. :meth:`Scheduler.abort` may be called from any thread; the sequence's KV space is
  released at the next :meth:`Scheduler.schedule`.

Usage per iteration (by a driver such as :class:`runtime.engine.core.EngineCore`)::

    out = sched.schedule()            # what to run; out.released -> engine.free(...)
    sampled = run_the_model(out.scheduled)
    updates = sched.update(out, sampled)   # new tokens, finished requests
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "BlockKVCapacity",
    "FinishReason",
    "KVCapacity",
    "Request",
    "RequestStatus",
    "RequestUpdate",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepCost",
    "admission_order",
]


@runtime_checkable
class KVCapacity(Protocol):
    """What the scheduler needs from a KV cache: all-or-nothing reservations per sequence."""

    @property
    def block_size(self) -> int:
        """Allocation granularity in tokens."""
        ...

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds (the longest sequence it could ever fit alone)."""
        ...

    @property
    def free_tokens(self) -> int:
        """Tokens currently unreserved."""
        ...

    def reserve(self, seq_id: str, num_tokens: int) -> bool:
        """Ensure ``seq_id`` can hold ``num_tokens`` tokens in total. ``False``: out of space,
        nothing changed."""
        ...

    def release(self, seq_id: str) -> None:
        """Free everything ``seq_id`` holds. Idempotent."""
        ...


@runtime_checkable
class StepCost(Protocol):
    """An estimate of an engine step's duration, in seconds, as the sum of its parts."""

    def decode_s(self, num_decodes: int, context_tokens: int) -> float:
        """The part of a step in which ``num_decodes`` sequences, whose contexts sum to
        ``context_tokens``, each sample one token."""
        ...

    def prefill_s(self, start: int, end: int) -> float:
        """The part of a step that computes positions ``[start, end)`` of one sequence."""
        ...


class BlockKVCapacity:
    """Pure bookkeeping implementation of :class:`KVCapacity` (blocks, no storage).

    Used by tests, the simulator, and engines whose memory is managed elsewhere (an upstream):
    pass ``num_blocks=None`` for an unbounded pool.
    """

    def __init__(self, num_blocks: int | None, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._block_size = block_size
        self.num_blocks = num_blocks
        self._held: dict[str, int] = {}
        self._used = 0

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks if self.num_blocks is not None else 2**62) * self._block_size

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self._used * self._block_size

    @property
    def used_blocks(self) -> int:
        return self._used

    def held_blocks(self, seq_id: str) -> int:
        return self._held.get(seq_id, 0)

    def reserve(self, seq_id: str, num_tokens: int) -> bool:
        need = -(-num_tokens // self._block_size) - self._held.get(seq_id, 0)
        if need <= 0:
            return True
        if self.num_blocks is not None and self._used + need > self.num_blocks:
            return False
        self._held[seq_id] = self._held.get(seq_id, 0) + need
        self._used += need
        return True

    def release(self, seq_id: str) -> None:
        self._used -= self._held.pop(seq_id, 0)


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(StrEnum):
    """Why a request ended (values match OpenAI's ``finish_reason``, plus ``abort``)."""

    STOP = "stop"  # a stop token (EOS) or, via finish_request, a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # cancelled by the caller


@dataclass
class Request:
    """A generation request as the scheduler sees it.

    ``priority``: lower is more important (0 critical, 1 standard, 2 batch). ``deadline``: absolute
    time on the scheduler's clock by which the caller wants it done (from its SLO), or ``None``.
    ``stop_token_ids``: sampled ids that finish the request (empty to ignore EOS). ``payload`` is
    carried untouched into :class:`ScheduledSeq` (e.g. the engine's ``SamplingParams``).
    ``arrival_time`` defaults to the clock at :meth:`Scheduler.add_request`. ``tpot``: the
    caller's time-per-output-token objective in seconds (from its SLO), or ``None``; it bounds
    the prefill scheduled beside this stream's decodes when the scheduler has a
    :class:`StepCost`.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    priority: int = 1
    deadline: float | None = None
    stop_token_ids: frozenset[int] = frozenset()
    payload: Any = None
    arrival_time: float | None = None
    tpot: float | None = None


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's work in this step (maps 1:1 onto the engine's ``SeqInput``)."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    sample: bool
    num_generated: int
    payload: Any


@dataclass(frozen=True)
class RequestUpdate:
    """What happened to a request in one step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class SchedulerOutput:
    """The plan for one engine step.

    ``scheduled``: work to run now. ``released``: sequences whose KV was released while planning
    (preempted or aborted) — the driver must call ``engine.free`` for each before running the
    step. ``preempted``: subset of ``released`` that will resume later. ``finished``: requests that
    ended while planning (aborts), reported here because they take no part in the step.
    """

    step_id: int
    scheduled: list[ScheduledSeq]
    released: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    finished: list[RequestUpdate] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits per step. ``max_model_len`` bounds prompt + output of any request.

    ``min_prefill_tokens``: with a :class:`StepCost`, the prefill a step takes even when the
    decodes' TPOT deadlines leave no time for it (without a step cost it has no effect).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    min_prefill_tokens: int = 16

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "min_prefill_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1 (got {value!r})")


def admission_order(
    priority: int, deadline: float | None, arrival: float, tiebreak: int
) -> tuple[int, float, float, int]:
    """The sort key of waiting work: priority class (lower first), then deadline (none last),
    then arrival, then ``tiebreak`` (submission order). Shared by every queue that orders
    requests (this scheduler, the agent's upstream queue), so they cannot drift apart."""
    return (priority, math.inf if deadline is None else deadline, arrival, tiebreak)


class _Seq:
    __slots__ = (
        "admit_no",
        "arrival_no",
        "first_token_at",
        "key",
        "num_computed",
        "num_preemptions",
        "output",
        "req",
        "status",
    )

    def __init__(self, req: Request, arrival_no: int) -> None:
        self.req = req
        self.arrival_no = arrival_no
        assert req.arrival_time is not None  # set by Scheduler.add_request
        self.key = admission_order(req.priority, req.deadline, req.arrival_time, arrival_no)
        self.status = RequestStatus.WAITING
        self.output: list[int] = []
        self.num_computed = 0
        self.admit_no = -1
        self.num_preemptions = 0
        self.first_token_at: float | None = None  # on the scheduler's clock

    @property
    def num_tokens(self) -> int:
        return len(self.req.prompt_token_ids) + len(self.output)

    def tokens(self, start: int, count: int) -> list[int]:
        prompt = self.req.prompt_token_ids
        n_prompt = len(prompt)
        if start + count <= n_prompt:
            return list(prompt[start : start + count])
        head = list(prompt[start:n_prompt]) if start < n_prompt else []
        out_start = max(0, start - n_prompt)
        return head + self.output[out_start : start + count - n_prompt]

    def victim_key(self) -> tuple[int, int]:
        return (self.req.priority, self.admit_no)


class Scheduler:
    """Continuous-batching scheduler over a :class:`KVCapacity`.

    ``add_request`` and ``abort`` are thread-safe (they enqueue); ``schedule``, ``update`` and
    ``finish_request`` must be called from one driver thread. ``step_cost``: how long a step
    takes, to keep decodes within their ``tpot`` objectives (``None``: token budget only).
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCapacity,
        clock: Callable[[], float],
        step_cost: StepCost | None = None,
    ) -> None:
        if kv.capacity_tokens < config.max_model_len:
            raise ValueError(
                f"max_model_len: KV capacity ({kv.capacity_tokens} tokens) must hold at least one "
                f"max-length sequence ({config.max_model_len})"
            )
        self.config = config
        self.kv = kv
        self.clock = clock
        self.step_cost = step_cost
        self._lock = threading.Lock()
        self._inbox: list[_Seq] = []
        self._abort_inbox: list[str] = []
        self._arrivals = itertools.count()
        self._admissions = itertools.count()
        self._steps = itertools.count()
        self._waiting: list[tuple[tuple[Any, ...], _Seq]] = []  # heap by _Seq.key
        self._running: list[_Seq] = []  # kept sorted by (priority, admit_no)
        self._seqs: dict[str, _Seq] = {}  # every unfinished request
        self.num_preemptions = 0

    # -- thread-safe entry points ---------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue ``request``; it is considered from the next :meth:`schedule`.

        Raises ``ValueError`` for requests that could never run (empty prompt, prompt not shorter
        than ``max_model_len``, ``max_tokens`` < 1, duplicate id).
        """
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("prompt_token_ids: must not be empty")
        if n_prompt >= self.config.max_model_len:
            raise ValueError(
                f"prompt_token_ids: prompt has {n_prompt} tokens; max_model_len is {self.config.max_model_len} "
                "and at least one token must be generated"
            )
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1 (got {request.max_tokens})")
        with self._lock:
            if request.request_id in self._seqs:
                raise ValueError(f"request_id: {request.request_id!r} is already active")
            if request.arrival_time is None:
                request.arrival_time = self.clock()
            seq = _Seq(request, next(self._arrivals))
            self._seqs[request.request_id] = seq
            self._inbox.append(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its KV is freed and an ``abort`` update emitted at the next schedule.
        Unknown or already finished ids are ignored."""
        with self._lock:
            self._abort_inbox.append(request_id)

    # -- driver-thread API ----------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._seqs)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._inbox)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def status(self, request_id: str) -> RequestStatus:
        seq = self._seqs.get(request_id)
        return RequestStatus.FINISHED if seq is None else seq.status

    def num_preemptions_of(self, request_id: str) -> int:
        seq = self._seqs.get(request_id)
        return 0 if seq is None else seq.num_preemptions

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see module docstring for the policy)."""
        out = SchedulerOutput(step_id=next(self._steps), scheduled=[])
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._abort_inbox = self._abort_inbox, []
        for seq in inbox:
            heapq.heappush(self._waiting, (seq.key, seq))
        for request_id in aborts:
            self._abort_now(request_id, out)

        budget = self.config.max_num_batched_tokens
        planned: dict[str, int] = {}  # request_id -> tokens this step, in scheduling order

        def preempt(victim: _Seq) -> None:
            nonlocal budget
            self.kv.release(victim.req.request_id)
            self._running.remove(victim)
            victim.status = RequestStatus.WAITING
            victim.num_computed = 0
            victim.num_preemptions += 1
            self.num_preemptions += 1
            budget += planned.pop(victim.req.request_id, 0)
            heapq.heappush(self._waiting, (victim.key, victim))
            out.released.append(victim.req.request_id)
            out.preempted.append(victim.req.request_id)

        def continue_running(seq: _Seq, timing: _StepTiming | None) -> None:
            """Plan ``seq``'s next token(s); ``timing`` is given for prefill chunks."""
            nonlocal budget
            if seq.status is not RequestStatus.RUNNING or budget <= 0:
                return  # preempted earlier in this step, or no budget left
            n = min(seq.num_tokens - seq.num_computed, budget)
            if timing is not None:
                n = timing.chunk(seq, n)
                if n == 0:
                    return
            while not self.kv.reserve(seq.req.request_id, seq.num_computed + n):
                victim = self._running[-1]  # list is sorted: last = least important
                preempt(victim)
                if victim is seq:
                    return
            planned[seq.req.request_id] = n
            budget -= n
            if timing is not None:
                timing.take(seq, n)

        # 1) Running sequences, most important first; decodes (one token each) before prefill
        # chunks, so a long prompt — even an important one — cannot starve running streams.
        # Prefill chunks of a priority below the most important waiting request's are deferred
        # until after admission: a critical prompt must not wait behind the rest of a batch
        # prompt that happened to start first (it waits for at most the step in progress).
        decodes = [s for s in self._running if s.num_tokens - s.num_computed == 1]
        prefills = [s for s in self._running if s.num_tokens - s.num_computed > 1]
        first_waiting = self._first_waiting_priority()
        deferred = [s for s in prefills if s.req.priority > first_waiting]
        for seq in decodes:
            continue_running(seq, None)
        timing = self._step_timing(decodes, planned) if self.step_cost is not None else None
        for seq in prefills:
            if seq.req.priority <= first_waiting:
                continue_running(seq, timing)

        # 2) Admit waiting requests in (priority, deadline, arrival) order. If running sequences
        # had to be preempted the pool is full, so admitting more would only thrash (as in vLLM).
        pool_full = bool(out.preempted)
        while (
            self._waiting
            and budget > 0
            and len(self._running) < self.config.max_num_seqs
            and not pool_full
        ):
            _, seq = self._waiting[0]
            if seq.status is not RequestStatus.WAITING:  # aborted (lazy deletion)
                heapq.heappop(self._waiting)
                continue
            if self.step_cost is not None and self._missed_deadline(seq):
                heapq.heapreplace(self._waiting, (seq.key, seq))
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if timing is not None:
                n = timing.chunk(seq, n)
                if n == 0:
                    break  # what waits behind it is no more important: no time for it either
            if not self.kv.reserve(seq.req.request_id, seq.num_computed + n):
                victim = self._running[-1] if self._running else None
                if victim is not None and victim.req.priority > seq.req.priority:
                    preempt(victim)
                    continue
                break
            heapq.heappop(self._waiting)
            seq.status = RequestStatus.RUNNING
            seq.admit_no = next(self._admissions)
            self._insert_running(seq)
            planned[seq.req.request_id] = n
            budget -= n
            if timing is not None:
                timing.take(seq, n)
        for seq in deferred:
            continue_running(seq, timing)

        for request_id, n in planned.items():
            seq = self._seqs[request_id]
            out.scheduled.append(
                ScheduledSeq(
                    request_id=request_id,
                    token_ids=seq.tokens(seq.num_computed, n),
                    num_computed_tokens=seq.num_computed,
                    sample=seq.num_computed + n == seq.num_tokens,
                    num_generated=len(seq.output),
                    payload=seq.req.payload,
                )
            )
        return out

    def update(self, sched: SchedulerOutput, sampled: Mapping[str, int]) -> list[RequestUpdate]:
        """Apply the step's results. ``sampled`` has a token for every scheduled seq with
        ``sample=True``. Finished sequences release their KV immediately."""
        updates: list[RequestUpdate] = []
        for item in sched.scheduled:
            seq = self._seqs.get(item.request_id)
            if seq is None or seq.status is not RequestStatus.RUNNING:
                continue  # finished meanwhile via finish_request
            seq.num_computed += len(item.token_ids)
            if not item.sample:
                continue
            try:
                token = int(sampled[item.request_id])
            except KeyError:
                raise ValueError(
                    f"sampled: engine returned no token for {item.request_id!r}"
                ) from None
            seq.output.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = self.clock()
            reason: FinishReason | None = None
            if token in seq.req.stop_token_ids:
                reason = FinishReason.STOP
            elif (
                len(seq.output) >= seq.req.max_tokens or seq.num_tokens >= self.config.max_model_len
            ):
                reason = FinishReason.LENGTH
            if reason is not None:
                self._finish(seq)
            updates.append(self._update(seq, [token], reason))
        return updates

    def finish_request(
        self, request_id: str, reason: FinishReason = FinishReason.STOP
    ) -> RequestUpdate | None:
        """End a request now (e.g. the driver saw a stop string); releases its KV at once.
        Returns the final update, or ``None`` if it was not active."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq)
        return self._update(seq, [], reason)

    # -- internals ------------------------------------------------------------------------------

    def _first_waiting_priority(self) -> float:
        """The priority of the most important request waiting to be admitted (``inf``: none)."""
        while self._waiting and self._waiting[0][1].status is not RequestStatus.WAITING:
            heapq.heappop(self._waiting)  # aborted or finished (lazy deletion)
        return self._waiting[0][1].req.priority if self._waiting else math.inf

    def _missed_deadline(self, seq: _Seq) -> bool:
        """Whether ``seq``, waiting for its first token, can no longer have it by its deadline
        even prefilling alone from now; if so it gives up its deadline (``key``), so that it
        queues behind the requests of its priority that can still make theirs."""
        deadline = seq.req.deadline
        if deadline is None or seq.output or seq.key[1] == math.inf:
            return False
        assert self.step_cost is not None
        if self.clock() + self.step_cost.prefill_s(seq.num_computed, seq.num_tokens) <= deadline:
            return False
        seq.key = (seq.key[0], math.inf, *seq.key[2:])
        return True

    def _step_timing(self, running: list[_Seq], planned: Mapping[str, int]) -> _StepTiming:
        """The time this step's prefill may take beside the decodes of ``running`` that
        ``planned`` schedules (see the module docstring)."""
        decodes = [seq for seq in running if planned.get(seq.req.request_id) == 1]
        cost = self.step_cost
        assert cost is not None
        now = self.clock()
        decode_s = (
            cost.decode_s(len(decodes), sum(seq.num_tokens for seq in decodes)) if decodes else 0.0
        )
        latest: dict[int, float] = {}  # priority -> the step must end by then (its decodes)
        for seq in decodes:
            tpot, first = seq.req.tpot, seq.first_token_at
            if tpot is None or first is None:
                continue
            k = len(seq.output)  # this step samples the stream's token k (the first is token 0)
            # Lost already: even decoding alone to max_tokens, its mean stays above objective.
            if now + (seq.req.max_tokens - k) * decode_s > first + (seq.req.max_tokens - 1) * tpot:
                continue
            due = first + k * tpot
            p = seq.req.priority
            latest[p] = min(latest.get(p, math.inf), due)
        return _StepTiming(cost, now + decode_s, latest, self.config.min_prefill_tokens)

    def _update(self, seq: _Seq, new: list[int], reason: FinishReason | None) -> RequestUpdate:
        return RequestUpdate(
            request_id=seq.req.request_id,
            new_token_ids=new,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(seq.req.prompt_token_ids),
            num_output_tokens=len(seq.output),
        )

    def _insert_running(self, seq: _Seq) -> None:
        key = seq.victim_key()
        i = len(self._running)
        while i > 0 and self._running[i - 1].victim_key() > key:
            i -= 1
        self._running.insert(i, seq)

    def _finish(self, seq: _Seq) -> None:
        if seq.status is RequestStatus.RUNNING:
            self._running.remove(seq)
        seq.status = RequestStatus.FINISHED  # waiting-heap entries are dropped lazily
        self.kv.release(seq.req.request_id)
        with self._lock:
            self._seqs.pop(seq.req.request_id, None)

    def _abort_now(self, request_id: str, out: SchedulerOutput) -> None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        was_running = seq.status is RequestStatus.RUNNING
        self._finish(seq)
        if was_running:
            out.released.append(request_id)
        out.finished.append(self._update(seq, [], FinishReason.ABORT))


class _StepTiming:
    """The clock of one step being planned: when it ends so far, and by when it must end for
    the decodes of each priority (a prompt's chunk answers to decodes at least as important)."""

    __slots__ = ("cost", "ends", "latest", "min_tokens", "prefill_tokens")

    def __init__(
        self, cost: StepCost, ends: float, latest: dict[int, float], min_tokens: int
    ) -> None:
        self.cost = cost
        self.ends = ends
        self.latest = latest
        self.min_tokens = min_tokens
        self.prefill_tokens = 0

    def chunk(self, seq: _Seq, n: int) -> int:
        """How many of ``n`` prefill tokens of ``seq`` to run in this step: the most that end
        by the deadline of the decodes at least as important, but no fewer than what is left
        of the step's ``min_prefill_tokens``."""
        q = seq.req.priority
        due = min((t for p, t in self.latest.items() if p <= q), default=math.inf)
        room = due - self.ends
        start = seq.num_computed
        prefill_s = self.cost.prefill_s
        if room == math.inf or prefill_s(start, start + n) <= room:
            return n
        lo, hi = 0, n  # prefill_s(start, start + lo) <= room < prefill_s(start, start + hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if prefill_s(start, start + mid) <= room:
                lo = mid
            else:
                hi = mid
        return max(lo, min(n, self.min_tokens - self.prefill_tokens))

    def take(self, seq: _Seq, n: int) -> None:
        start = seq.num_computed
        self.ends += self.cost.prefill_s(start, start + n)
        self.prefill_tokens += n
