"""The serving backend: the seam between the HTTP layer and whatever generates tokens.

This module owns :class:`ServingBackend`, the small interface the agent's handlers talk to
(tokenise, submit a request and iterate its outputs, abort, stats, load state for admission),
:class:`EngineCoreBackend`, its implementation over the embedded engine, and
:func:`make_backend`, which builds the backend a node config asks for (the embedded engine, or
:class:`runtime.agent.upstream.UpstreamBackend` for an OpenAI-compatible upstream).

Threading in :class:`EngineCoreBackend`: one dedicated thread loads the model (so the HTTP server
answers ``/healthz`` at once) and then runs :meth:`EngineCore.step` in a loop. When nothing is
unfinished it blocks on a :class:`threading.Event` that :meth:`submit` and :meth:`abort` set, so
an idle node burns no CPU. Outputs cross to the event loop in one
``loop.call_soon_threadsafe`` per step, into a per-request :class:`asyncio.Queue`.

Cost attribution: the engine is wrapped (:class:`_MeteredEngine`, through the public
:class:`Engine` interface only) to see which sequences took part in each step and with how many
token rows. Each step's wall time (scheduling included) is split among them in proportion to
their token rows: a 200-token prefill chunk costs the step far more than one decode token, so an
equal split would bill decoding tenants for others' prompts. Idle time is nobody's and is not
attributed. ``accelerator_seconds`` x the node's price per hour / 3600 is the request's USD.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from runtime.agent.admission import MeasuredStepCost, ThroughputEstimate, WorkItem
from runtime.agent.config import EngineSettings, NodeConfig, UpstreamEngineSettings
from runtime.engine.base import Engine, EngineCapacity, SamplingParams, StepInput, StepOutput

__all__ = [
    "BackendError",
    "BackendStats",
    "EngineCoreBackend",
    "GenerationChunk",
    "GenerationHandle",
    "GenerationRequest",
    "GenerationResult",
    "ServingBackend",
    "backend_for_engine",
    "engine_memory_bytes",
    "make_backend",
]

log = logging.getLogger("fleetform.agent.backend")

# After this many consecutive failed steps the engine is declared broken (not ready).
MAX_CONSECUTIVE_STEP_FAILURES = 3


class BackendError(RuntimeError):
    """Generation failed on the backend's side (not the client's fault)."""


@dataclass(frozen=True)
class GenerationRequest:
    """What the HTTP layer asks the backend to run. Times are ``time.monotonic()`` seconds."""

    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    priority: int
    arrival: float
    deadline: float | None = None
    tpot: float | None = None  # seconds per output token, the class's objective


@dataclass(frozen=True)
class GenerationChunk:
    """An increment of output (``text`` may be empty while a stop string is still possible)."""

    text: str
    num_new_tokens: int
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    """Final accounting of a request, whatever ended it (delivered to ``on_done``)."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    arrival: float
    finish: float
    queue_s: float | None
    ttft_s: float | None
    inter_token_s: list[float]
    accelerator_seconds: float
    error: str | None = None

    @property
    def e2e_s(self) -> float:
        return self.finish - self.arrival


@dataclass(frozen=True)
class BackendStats:
    waiting: int
    running: int
    unfinished: int
    kv_used_bytes: int | None
    kv_capacity_bytes: int | None
    kv_usage: float | None
    prefill_tokens_per_s: float | None
    decode_step_s: float | None


class GenerationHandle:
    """Outputs of one submitted request, consumed on the event loop."""

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._abort = abort
        self._queue: asyncio.Queue[GenerationChunk | BackendError] = asyncio.Queue()
        self.finished = False

    def _put(self, item: GenerationChunk | BackendError) -> None:
        self._queue.put_nowait(item)

    async def next_chunk(self) -> GenerationChunk:
        """The next increment; raises :class:`BackendError` if generation failed."""
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BackendError):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def __aiter__(self) -> GenerationHandle:
        return self

    async def __anext__(self) -> GenerationChunk:
        return await self.next_chunk()

    def abort(self) -> None:
        """Stop generating (idempotent; harmless after the request finished)."""
        if not self.finished:
            self._abort(self.request_id)


class ServingBackend(Protocol):
    """What the HTTP layer needs from a model server."""

    @property
    def ready(self) -> bool: ...
    @property
    def load_error(self) -> str | None: ...
    @property
    def not_ready_reason(self) -> str | None:
        """Why the backend cannot serve yet (None when ready), for /readyz and 503s."""
        ...

    @property
    def max_model_len(self) -> int: ...
    @property
    def vocab_size(self) -> int | None: ...
    @property
    def max_num_seqs(self) -> int: ...

    async def start(self) -> None:
        """Begin loading in the background and return at once."""

    async def close(self) -> None:
        """Stop: abort what is left, release threads and memory."""

    def encode(self, text: str) -> list[int]: ...
    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str: ...

    def submit(
        self, request: GenerationRequest, on_done: Callable[[GenerationResult], None]
    ) -> GenerationHandle:
        """Queue a request. ``on_done`` runs on the event loop when it ends, for any reason.
        Raises ``ValueError`` ("field: why") for input the engine refuses."""

    def abort(self, request_id: str) -> None: ...
    def stats(self) -> BackendStats: ...
    def work_items(self) -> list[WorkItem]: ...
    def throughput(self) -> ThroughputEstimate: ...


def make_backend(config: NodeConfig, *, environ: Mapping[str, str] | None = None) -> ServingBackend:
    """The serving backend ``config.engine`` describes (not started).

    ``environ`` is where an upstream's API key variable is read (default ``os.environ``).
    """
    return backend_for_engine(
        config.engine, environ=environ, ewma_alpha=config.admission.throughput_ewma_alpha
    )


def backend_for_engine(
    engine: EngineSettings | UpstreamEngineSettings,
    *,
    environ: Mapping[str, str] | None = None,
    ewma_alpha: float = 0.2,
) -> ServingBackend:
    """The serving backend for one model's engine settings (not started); see
    :func:`make_backend`. The model manager builds one per load of a model slot."""
    if isinstance(engine, UpstreamEngineSettings):
        from runtime.agent.upstream import UpstreamBackend  # imports this module: import late

        return UpstreamBackend(engine, environ=environ, ewma_alpha=ewma_alpha)
    return EngineCoreBackend(engine, ewma_alpha=ewma_alpha)


def engine_memory_bytes(engine: Engine, core: Any = None) -> int | None:
    """Bytes a loaded engine holds for its model: the weights it keeps resident plus its whole KV
    pool (allocated up front; its pages become resident as tokens are written, so the full pool
    is what the model may come to use). None when the engine reports neither.

    The numpy engine keeps the weights de-quantised to float32 (``model.weights.nbytes()``),
    whatever the file's precision; the KV pool's size comes from the core's stats.
    """
    total, known = 0, False
    weights = getattr(getattr(engine, "model", None), "weights", None)
    nbytes = getattr(weights, "nbytes", None)
    if callable(nbytes):
        total += int(nbytes())
        known = True
    if core is not None:
        kv_bytes = core.stats().get("kv_capacity_bytes")
        if kv_bytes is not None:
            total += int(kv_bytes)
            known = True
    return total if known else None


# --------------------------------------------------------------------------------------------
# Embedded engine


@dataclass(frozen=True)
class _SeqWork:
    seq_id: str
    num_tokens: int
    num_computed: int


class _MeteredEngine(Engine):
    """Delegates to ``inner`` and remembers which sequences the last step ran."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.last_step: list[_SeqWork] | None = None

    def load(self) -> None:
        self.inner.load()

    @property
    def capacity(self) -> EngineCapacity:
        return self.inner.capacity

    @property
    def kv(self) -> Any:
        return self.inner.kv

    def step(self, batch: StepInput) -> StepOutput:
        self.last_step = [
            _SeqWork(s.seq_id, len(s.token_ids), s.num_computed_tokens) for s in batch.seqs
        ]
        return self.inner.step(batch)

    def free(self, seq_id: str) -> None:
        self.inner.free(seq_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(token_ids, skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        return self.inner.apply_chat_template(messages, add_generation_prompt)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.inner.eos_token_ids

    @property
    def vocab_size(self) -> int | None:
        return self.inner.vocab_size

    def close(self) -> None:
        self.inner.close()


@dataclass
class _Live:
    """Bookkeeping of one unfinished request (shared by the loop and the stepping thread)."""

    request: GenerationRequest
    handle: GenerationHandle
    on_done: Callable[[GenerationResult], None]
    prompt_tokens: int
    max_tokens: int
    first_step_at: float | None = None
    prefill_left: int = 0
    generated: int = 0
    token_times: list[float] = field(default_factory=list)
    accelerator_seconds: float = 0.0


class EngineCoreBackend:
    """:class:`ServingBackend` over :class:`runtime.engine.core.EngineCore`.

    ``engine_factory`` builds the (unloaded or loaded) engine inside the loading thread; the
    default builds a :class:`NumpyEngine` from ``settings``.
    """

    def __init__(
        self,
        settings: EngineSettings,
        *,
        engine_factory: Callable[[], Engine] | None = None,
        ewma_alpha: float = 0.2,
    ) -> None:
        self._settings = settings
        self._engine_factory = engine_factory or self._default_engine
        self._ready = False
        self._load_error: str | None = None
        self._stopping = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._throughput = ThroughputEstimate(alpha=ewma_alpha)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consecutive_failures = 0
        self.core: Any = None  # EngineCore once loaded
        self._engine: _MeteredEngine | None = None
        self._capacity: EngineCapacity | None = None
        self._loaded: asyncio.Event | None = None  # set on the loop when the load ends either way
        self._discarded = False

    def _default_engine(self) -> Engine:
        from runtime.engine.numpy_engine import NumpyEngine

        s = self._settings
        return NumpyEngine(
            s.model_path,
            kv_cache_tokens=s.kv_cache_tokens,
            kv_dtype=s.kv_dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            seed=s.seed,
        )

    # -- properties ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready and self._load_error is None

    @property
    def load_error(self) -> str | None:
        return self._load_error

    @property
    def not_ready_reason(self) -> str | None:
        if self.ready:
            return None
        return "the model was unloaded" if self._discarded else "the model is loading"

    @property
    def max_model_len(self) -> int:
        assert self._capacity is not None, "not loaded"
        return self._capacity.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.core.config.max_num_seqs if self.core is not None else 1

    @property
    def vocab_size(self) -> int | None:
        return self._engine.vocab_size if self._engine is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int | None:
        """What the loaded model holds (see :func:`engine_memory_bytes`); None until loaded."""
        engine = self._engine
        if engine is None or not self._ready:
            return None
        return engine_memory_bytes(engine.inner, self.core)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loaded = asyncio.Event()
        self._thread = threading.Thread(
            target=self._thread_main, name="fleetform-engine", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        # Whatever the thread left behind gets its final accounting here, on the loop.
        with self._lock:
            leftovers = list(self._live.values())
            self._live.clear()
        now = time.monotonic()
        for live in leftovers:
            self._finish_on_loop(live, self._result(live, "abort", now, error="shutting down"))
        if self._engine is not None:
            self._engine.close()

    async def wait_loaded(self) -> None:
        """Until the load has ended, loaded (``ready``) or failed (``load_error``)."""
        assert self._loaded is not None, "start() first"
        await self._loaded.wait()

    def discard(self) -> None:
        """After :meth:`close`: drop the engine and its core, so that the model's memory can be
        returned to the system even while stray references to this backend remain (handles of
        finished requests keep one). The backend is unusable afterwards."""
        assert self._stopping, "close() first"
        self._ready = False
        self._discarded = True
        self._engine = None
        self.core = None

    def _mark_loaded(self, _: Any = None) -> None:
        # On the loop: ready flips here, not in the engine thread, so that whoever sees the
        # backend ready (a handler, the model manager) sees it in the same loop iteration.
        if self._engine is not None and self._load_error is None and not self._stopping:
            self._ready = True
        if self._loaded is not None:
            self._loaded.set()

    def _thread_main(self) -> None:
        try:
            from runtime.engine.core import EngineCore

            engine = _MeteredEngine(self._engine_factory())
            engine.load()
            s = self._settings
            core = EngineCore(
                engine,
                max_num_seqs=s.max_num_seqs,
                max_num_batched_tokens=s.max_num_batched_tokens,
                clock=time.monotonic,
                # Prefill beside decodes is cut to the decodes' TPOT objectives, timed by this
                # backend's own measurements (updated and read on the engine thread).
                step_cost=MeasuredStepCost(self._throughput) if s.tpot_budget else None,
            )
        except Exception as error:
            log.exception("model load failed")
            self._load_error = f"model load failed: {error}".splitlines()[0]
            self._to_loop(self._mark_loaded, None)
            return
        self._engine, self.core, self._capacity = engine, core, engine.capacity
        del engine, core  # the stepping loop reads them from self: discard() can free them
        self._to_loop(self._mark_loaded, None)
        log.info("model loaded; engine %s", self._capacity)
        self._step_loop()

    # -- the stepping loop (engine thread) ------------------------------------------------------

    def _step_loop(self) -> None:
        core = self.core
        # Fault injection (EngineSettings.inject_delay_ms): inside the timed step, so the delay
        # shows in token times (TTFT, TPOT), measured throughput and attributed time alike, as
        # a really slower variant's would.
        delay_s = self._settings.inject_delay_ms / 1000.0
        while not self._stopping:
            self._wake.clear()
            if not core.has_unfinished():
                self._wake.wait()  # set by submit/abort/close: no spinning while idle
                continue
            started = time.perf_counter()
            try:
                outputs = core.step()
            except Exception as error:
                self._step_failed(error)
                continue
            if delay_s > 0:
                time.sleep(delay_s)
            self._consecutive_failures = 0
            wall = time.perf_counter() - started
            work, self._engine.last_step = self._engine.last_step, None  # type: ignore[union-attr]
            self._after_step(outputs, work, wall, time.monotonic())

    def _after_step(
        self, outputs: list[Any], work: list[_SeqWork] | None, wall: float, now: float
    ) -> None:
        deliveries: list[tuple[_Live, GenerationChunk, GenerationResult | None]] = []
        with self._lock:
            if work:
                self._attribute(work, wall, now)
            for out in outputs:
                live = self._live.get(out.request_id)
                if out.finished:
                    self.core.pop_result(out.request_id)  # the core keeps results until popped
                if live is None:
                    continue  # already failed and finalised
                if out.new_token_ids:
                    live.generated = out.num_output_tokens
                    live.token_times.extend([now] * len(out.new_token_ids))
                chunk = GenerationChunk(
                    text=out.new_text,
                    num_new_tokens=len(out.new_token_ids),
                    finished=out.finished,
                    finish_reason=out.finish_reason,
                    prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=out.num_output_tokens,
                )
                result = None
                if out.finished:
                    del self._live[out.request_id]
                    result = self._result(live, out.finish_reason or "abort", now)
                deliveries.append((live, chunk, result))
        if deliveries:
            self._to_loop(self._deliver, deliveries)

    def _attribute(self, work: list[_SeqWork], wall: float, now: float) -> None:
        total = sum(w.num_tokens for w in work)
        prefill_tokens = decode_tokens = 0
        for w in work:
            live = self._live.get(w.seq_id)
            if live is None:  # finalised after a failure; still part of the step's speed
                prefill_tokens += w.num_tokens
                continue
            # Tokens the sequence has before this step's outputs: prompt plus sampled so far.
            known = live.prompt_tokens + live.generated
            if live.generated > 0 and w.num_tokens == 1 and w.num_computed + 1 == known:
                decode_tokens += 1
            else:  # a prompt chunk, or a preempted sequence being recomputed
                prefill_tokens += w.num_tokens
            if live.first_step_at is None:
                live.first_step_at = now - wall
            live.prefill_left = max(0, known - (w.num_computed + w.num_tokens))
            live.accelerator_seconds += wall * w.num_tokens / total
        self._throughput.observe(prefill_tokens, decode_tokens, wall)

    def _step_failed(self, error: Exception) -> None:
        self._consecutive_failures += 1
        log.exception("engine step failed (%d in a row)", self._consecutive_failures)
        now = time.monotonic()
        with self._lock:
            failed = list(self._live.values())
            self._live.clear()
        for live in failed:
            self.core.abort(live.request.request_id)  # let the core clean up if it still can
        deliveries = [
            (live, None, self._result(live, "abort", now, error="engine failure"))
            for live in failed
        ]
        if deliveries:
            self._to_loop(self._deliver_failures, deliveries)
        if self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            self._load_error = f"engine failed: {error}".splitlines()[0]
            self._ready = False
        # Back off so a broken engine does not spin a core.
        self._wake.wait(timeout=min(5.0, 0.1 * 2**self._consecutive_failures))

    def _result(
        self, live: _Live, reason: str, now: float, error: str | None = None
    ) -> GenerationResult:
        arrival = live.request.arrival
        times = live.token_times
        return GenerationResult(
            request_id=live.request.request_id,
            prompt_tokens=live.prompt_tokens,
            completion_tokens=live.generated,
            finish_reason=reason,
            arrival=arrival,
            finish=now,
            queue_s=None if live.first_step_at is None else max(0.0, live.first_step_at - arrival),
            ttft_s=times[0] - arrival if times else None,
            inter_token_s=[b - a for a, b in itertools.pairwise(times)],
            accelerator_seconds=live.accelerator_seconds,
            error=error,
        )

    def _to_loop(self, callback: Callable[[Any], None], payload: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed since the check
            loop.call_soon_threadsafe(callback, payload)

    # -- on the event loop --------------------------------------------------------------------

    def _deliver(
        self, deliveries: list[tuple[_Live, GenerationChunk, GenerationResult | None]]
    ) -> None:
        for live, chunk, result in deliveries:
            live.handle._put(chunk)
            if result is not None:
                self._call_on_done(live, result)

    def _deliver_failures(self, deliveries: list[tuple[_Live, None, GenerationResult]]) -> None:
        for live, _, result in deliveries:
            self._finish_on_loop(live, result)

    def _finish_on_loop(self, live: _Live, result: GenerationResult) -> None:
        live.handle._put(BackendError(result.error or "generation failed"))
        self._call_on_done(live, result)

    @staticmethod
    def _call_on_done(live: _Live, result: GenerationResult) -> None:
        try:
            live.on_done(result)
        except Exception:
            log.exception("request accounting failed for %s", result.request_id)

    # -- ServingBackend -------------------------------------------------------------------------

    def _require_ready(self) -> None:
        if not self.ready:
            if self._discarded:
                raise BackendError("the model was unloaded")
            raise BackendError(self._load_error or "model is not loaded yet")

    def encode(self, text: str) -> list[int]:
        self._require_ready()
        return self._engine.encode(text)  # type: ignore[union-attr]

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        self._require_ready()
        return self._engine.apply_chat_template(messages)  # type: ignore[union-attr]

    def submit(
        self, request: GenerationRequest, on_done: Callable[[GenerationResult], None]
    ) -> GenerationHandle:
        self._require_ready()
        if self._stopping:
            raise BackendError("shutting down")
        handle = GenerationHandle(request.request_id, self.abort)
        prompt = list(request.prompt_token_ids)
        live = _Live(
            request=request,
            handle=handle,
            on_done=on_done,
            prompt_tokens=len(prompt),
            max_tokens=request.params.max_tokens,
            prefill_left=len(prompt),
        )
        with self._lock:
            if request.request_id in self._live:
                raise ValueError(f"request_id: {request.request_id!r} is already active")
            self._live[request.request_id] = live
        try:
            self.core.add_request(
                prompt,
                request.params,
                request_id=request.request_id,
                priority=request.priority,
                deadline=request.deadline,
                tpot=request.tpot,
            )
        except BaseException:
            with self._lock:
                self._live.pop(request.request_id, None)
            raise
        self._wake.set()
        return handle

    def abort(self, request_id: str) -> None:
        if self.core is not None:
            self.core.abort(request_id)
            self._wake.set()

    def stats(self) -> BackendStats:
        core = self.core
        with self._lock:
            unfinished = len(self._live)
            prefill, decode = (
                self._throughput.prefill_tokens_per_s,
                self._throughput.decode_step_s,
            )
        if core is None:
            return BackendStats(0, 0, unfinished, None, None, None, prefill, decode)
        info = core.stats()
        return BackendStats(
            waiting=int(info.get("waiting", 0)),
            running=int(info.get("running", 0)),
            unfinished=unfinished,
            kv_used_bytes=info.get("kv_used_bytes"),
            kv_capacity_bytes=info.get("kv_capacity_bytes"),
            kv_usage=info.get("kv_usage"),
            prefill_tokens_per_s=prefill,
            decode_step_s=decode,
        )

    def work_items(self) -> list[WorkItem]:
        with self._lock:
            return [
                WorkItem(
                    priority=live.request.priority,
                    prefill_tokens_left=live.prefill_left,
                    decode_tokens_left=max(0, live.max_tokens - live.generated),
                    running=live.first_step_at is not None,
                )
                for live in self._live.values()
            ]

    def throughput(self) -> ThroughputEstimate:
        with self._lock:
            t = self._throughput
            return replace(t)  # a snapshot, safe to read off the stepping thread

    def unfinished_ids(self) -> list[str]:
        with self._lock:
            return list(self._live)
