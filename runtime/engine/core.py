"""The driver loop tying :class:`runtime.scheduler.Scheduler` to an :class:`Engine`.

This module owns request bookkeeping around the pure scheduler: tokenising prompts, turning
sampled ids into streamed text (stop strings), timing (TTFT, inter-token latency), per-token output
callbacks, and a blocking :meth:`EngineCore.generate` for scripts and the benchmark.

Threading: :meth:`EngineCore.add_request` and :meth:`EngineCore.abort` may be called from any thread
(e.g. an asyncio event loop); :meth:`EngineCore.step` must run on one thread at a time (e.g. an
executor thread looping while :meth:`has_unfinished`). Output callbacks run on the stepping thread;
an asyncio wrapper should hand results over with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

from runtime.engine.base import Engine, SamplingParams, SeqInput, StepInput
from runtime.engine.sampling import TextStream
from runtime.scheduler import (
    FinishReason,
    Request,
    RequestUpdate,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    StepCost,
)

__all__ = ["CompletionOutput", "EngineCore", "RequestOutput"]


@dataclass
class RequestOutput:
    """An increment of one request's output, delivered after each step it took part in."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class CompletionOutput:
    """The complete result of a request (see :meth:`EngineCore.generate`)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    arrival_time: float
    first_token_time: float | None
    finish_time: float
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass
class _Tracked:
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    callback: Callable[[RequestOutput], None] | None
    arrival: float
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    result: CompletionOutput | None = None


class EngineCore:
    """Continuous-batching generation on top of ``engine`` (loaded on construction)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        step_cost: StepCost | None = None,
    ) -> None:
        engine.load()
        cap = engine.capacity
        self.engine = engine
        self.clock = clock
        self.config = SchedulerConfig(
            max_num_seqs=min(max_num_seqs or cap.max_num_seqs, cap.max_num_seqs),
            max_num_batched_tokens=min(
                max_num_batched_tokens or cap.max_num_batched_tokens, cap.max_num_batched_tokens
            ),
            max_model_len=cap.max_model_len,
        )
        self.scheduler = Scheduler(self.config, engine.kv, clock, step_cost=step_cost)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}
        self._eos = engine.eos_token_ids
        self._vocab = engine.vocab_size
        self.num_steps = 0
        self.step_seconds = 0.0

    # -- request intake (thread-safe) -------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 1,
        deadline: float | None = None,
        tpot: float | None = None,
        chat: bool = False,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> str:
        """Queue a request and return its id.

        ``prompt`` is text (encoded raw, or rendered through the chat template with ``chat=True``)
        or token ids. ``priority``/``deadline`` feed admission order, ``tpot`` (seconds per output
        token, the caller's objective) the prefill allowed beside its decodes (see the scheduler).
        ``on_output`` is called on the stepping thread with every increment.
        Raises ``ValueError`` for invalid input (naming the field).
        """
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text = prompt
            if chat:
                text = self.engine.apply_chat_template([{"role": "user", "content": prompt}])
            prompt_ids = self.engine.encode(text)
        else:
            if chat:
                raise ValueError("chat: needs a text prompt")
            prompt_ids = [int(t) for t in prompt]
        if self._vocab is not None:
            if any(not 0 <= t < self._vocab for t in prompt_ids):
                raise ValueError(f"prompt: token ids must be in [0, {self._vocab})")
            if any(t >= self._vocab for t in params.logit_bias):
                raise ValueError(f"logit_bias: token ids must be in [0, {self._vocab})")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        arrival = self.clock()
        tracked = _Tracked(
            prompt_ids=prompt_ids,
            params=params,
            stream=TextStream(self.engine.decode, params.stop),
            callback=on_output,
            arrival=arrival,
        )
        with self._lock:
            if request_id in self._tracked:
                raise ValueError(f"request_id: {request_id!r} is already active")
            self._tracked[request_id] = tracked
        try:
            self.scheduler.add_request(
                Request(
                    request_id=request_id,
                    prompt_token_ids=prompt_ids,
                    max_tokens=params.max_tokens,
                    priority=priority,
                    deadline=deadline,
                    tpot=tpot,
                    stop_token_ids=frozenset() if params.ignore_eos else self._eos,
                    payload=params,
                    arrival_time=arrival,
                )
            )
        except ValueError:
            with self._lock:
                self._tracked.pop(request_id, None)
            raise
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel ``request_id`` (thread-safe); it finishes with ``abort`` at the next step."""
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- stepping (one thread) --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one iteration; return the outputs it produced."""
        with self._step_lock:
            sched = self.scheduler.schedule()
            for seq_id in sched.released:
                self.engine.free(seq_id)
            outputs: list[RequestOutput] = [self._emit(u) for u in sched.finished]
            if sched.scheduled:
                result = self.engine.step(self._to_step_input(sched))
                self.num_steps += 1
                self.step_seconds += result.seconds
                now = self.clock()
                for update in self.scheduler.update(sched, result.sampled):
                    outputs.append(self._emit(update, now))
            return outputs

    def _to_step_input(self, sched: SchedulerOutput) -> StepInput:
        return StepInput(
            seqs=[
                SeqInput(
                    seq_id=s.request_id,
                    token_ids=s.token_ids,
                    num_computed_tokens=s.num_computed_tokens,
                    sample=s.sample,
                    params=s.payload,
                    num_generated=s.num_generated,
                )
                for s in sched.scheduled
            ]
        )

    def _emit(self, update: RequestUpdate, now: float | None = None) -> RequestOutput:
        tracked = self._tracked[update.request_id]
        text = ""
        reason = update.finish_reason
        for token in update.new_token_ids:
            tracked.token_ids.append(token)
            tracked.token_times.append(now if now is not None else self.clock())
            text += tracked.stream.push(token)
        if tracked.stream.stopped and reason is not FinishReason.ABORT:
            if not update.finished:
                # A stop string completed: finish now so the KV space frees before the next step.
                final = self.scheduler.finish_request(update.request_id, FinishReason.STOP)
                if final is not None:
                    update = final
            reason = FinishReason.STOP  # also when max_tokens was hit by the same token
        if update.finished:
            self.engine.free(update.request_id)
            text += tracked.stream.flush()
        tracked.text_parts.append(text)
        out = RequestOutput(
            request_id=update.request_id,
            new_token_ids=list(update.new_token_ids),
            new_text=text,
            finished=update.finished,
            finish_reason=None if reason is None else reason.value,
            num_prompt_tokens=len(tracked.prompt_ids),
            num_output_tokens=len(tracked.token_ids),
        )
        if update.finished:
            tracked.result = CompletionOutput(
                request_id=update.request_id,
                prompt_token_ids=tracked.prompt_ids,
                token_ids=list(tracked.token_ids),
                text="".join(tracked.text_parts),
                finish_reason=out.finish_reason or "abort",
                arrival_time=tracked.arrival,
                first_token_time=tracked.token_times[0] if tracked.token_times else None,
                finish_time=now if now is not None else self.clock(),
                token_times=list(tracked.token_times),
            )
        if tracked.callback is not None:
            tracked.callback(out)
        return out

    def pop_result(self, request_id: str) -> CompletionOutput | None:
        """The final result of a finished request (removes it from tracking), else ``None``."""
        with self._lock:
            tracked = self._tracked.get(request_id)
            if tracked is None or tracked.result is None:
                return None
            del self._tracked[request_id]
            return tracked.result

    # -- conveniences -------------------------------------------------------------------------------

    def run_until_done(self) -> None:
        """Step until no request is left."""
        while self.has_unfinished():
            self.step()

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
    ) -> list[CompletionOutput]:
        """Run ``prompts`` to completion with continuous batching; results in input order."""
        if params is None or isinstance(params, SamplingParams):
            per = [params or SamplingParams()] * len(prompts)
        else:
            per = list(params)
            if len(per) != len(prompts):
                raise ValueError("params: need one SamplingParams per prompt")
        ids = [self.add_request(p, sp, chat=chat) for p, sp in zip(prompts, per, strict=True)]
        self.run_until_done()
        results = [self.pop_result(i) for i in ids]
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kwargs: Any
    ) -> Iterator[RequestOutput]:
        """Yield increments of one request, stepping the engine on this thread.

        Other queued requests progress too (they share the steps).
        """
        box: SimpleQueue[RequestOutput] = SimpleQueue()
        request_id = self.add_request(prompt, params, on_output=box.put, **kwargs)
        while True:
            while not box.empty():
                out = box.get()
                yield out
                if out.finished:
                    self.pop_result(request_id)
                    return
            self.step()

    def stats(self) -> Mapping[str, Any]:
        kv = getattr(self.engine.kv, "stats", None)
        info: dict[str, Any] = {
            "steps": self.num_steps,
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "preemptions": self.scheduler.num_preemptions,
        }
        if callable(kv):
            s = kv()
            info.update(
                kv_used_bytes=s.used_bytes, kv_capacity_bytes=s.capacity_bytes, kv_usage=s.usage
            )
        return info
