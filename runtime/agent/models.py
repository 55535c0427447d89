"""The models one node holds: loading on demand, memory budget, LRU eviction, unloading.

This module owns :class:`ModelManager`, the keeper of a node's model *slots* (the primary model
of :class:`~runtime.agent.config.NodeConfig` plus its ``models``), the pure eviction choice
:func:`plan_eviction`, and how freed memory is handed back to the system
(:func:`release_memory`).

A slot moves ``unloaded -> loading -> ready -> draining -> unloaded``:

* **loading**: the memory decision is taken first, under one lock (so two loads never both
  count on the same free bytes): the slot's footprint (measured at its last load, else the
  configured ``memory_bytes``, else an estimate from its GGUF file) must fit the node's
  ``memory_budget_bytes`` next to the slots holding memory; if not, the least recently used
  *idle* ready slots are unloaded first (:func:`plan_eviction`); a loading slot, or one with
  requests in flight or waiting for it, is never chosen. When even that cannot make room the
  load is refused: the requests waiting for it get 503 with Retry-After and a message naming
  the models that hold the memory (they are busy now; the fleet can send the request elsewhere
  or the client retry). Then the backend is built and started: the embedded engine loads in its
  own thread, so the event loop, and every ready model, keeps serving meanwhile. Concurrent
  requests for a loading model all wait on that one load; its wait is part of their TTFT (their
  arrival time is taken before) and is counted as a cold start in the metrics. After the load the
  footprint is measured (weights plus KV pool, :func:`runtime.agent.backend.engine_memory_bytes`)
  and replaces the estimate; a failed load is reported on its slot (503 with the reason, retried
  after ``LOAD_RETRY_S``), never a crash.
* **draining**: no new request gets the model (an admin unload answers them 503; an eviction,
  which only picks idle models, makes them wait and load it again); in-flight requests finish, up
  to a deadline after which they are aborted; then the backend is closed, every reference to
  the engine dropped, and :func:`release_memory` runs a garbage collection and glibc's
  ``malloc_trim`` so the process's RSS really drops (numpy's big arrays are mmapped and return
  at once, but many mid-sized temporaries of a load live on the malloc heap, which glibc only
  gives back when trimmed: measured, an unloaded SmolLM2 left ~340 MiB resident without it).

Startup keeps the single-model behaviour: the primary model (and slots with ``preload``) load
at boot, and while a boot load runs, requests for that model get 503 ``model_loading`` as
before, since the node is not ready yet (``/readyz`` says so). A node with one slot and no budget
behaves exactly as the agent did before slots existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.agent.admission import ThroughputEstimate, WorkItem
from runtime.agent.backend import (
    BackendError,
    BackendStats,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    ServingBackend,
)
from runtime.agent.config import EngineSettings, ModelSlot, UpstreamEngineSettings
from runtime.agent.metrics import AgentMetrics
from runtime.engine.memory import process_rss_bytes, release_memory
from runtime.protocol import LoadedModel, ServingLoad

__all__ = [
    "EvictionPlan",
    "ModelLease",
    "ModelManager",
    "ModelStatus",
    "ModelUnavailable",
    "ModelsReport",
    "ResidentModel",
    "SlotState",
    "estimate_memory_bytes",
    "plan_eviction",
    "process_rss_bytes",
    "release_memory",
]

log = logging.getLogger("fleetform.agent.models")

LOAD_RETRY_S = 10.0  # after a failed on-demand load, requests get its error this long, then retry
LOADING_RETRY_AFTER_S = 5
DRAINING_RETRY_AFTER_S = 2
NO_ROOM_RETRY_AFTER_S = 5
ABORT_GRACE_S = 5.0  # after an unload's deadline, how long aborted requests get to wind down

BackendFactory = Callable[[ModelSlot], ServingBackend]


class SlotState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


class ModelUnavailable(Exception):
    """A request cannot have its model now (the HTTP layer answers 503 with these fields).

    ``reason`` is the label of ``fleetform_rejected_requests_total``.
    """

    def __init__(
        self, code: str, message: str, *, retry_after: int | None, reason: str, status: int = 503
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.reason = reason
        self.status = status


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------
# The eviction choice (pure)


@dataclass(frozen=True)
class ResidentModel:
    """A slot that holds memory, as the eviction choice sees it. ``busy`` counts requests in
    flight and requests waiting for it; ``last_used`` is on any monotonic clock."""

    name: str
    memory_bytes: int
    state: SlotState
    busy: int
    last_used: float

    @property
    def evictable(self) -> bool:
        return self.state is SlotState.READY and self.busy == 0


@dataclass(frozen=True)
class EvictionPlan:
    """``fits``: the model can be loaded once ``victims`` (least recently used first) are
    unloaded; otherwise ``reason`` says why not."""

    fits: bool
    victims: tuple[str, ...] = ()
    reason: str | None = None


def plan_eviction(
    need_bytes: int,
    budget_bytes: int | None,
    resident: Sequence[ResidentModel],
    *,
    protect: Collection[str] = (),
) -> EvictionPlan:
    """Which idle models to unload so that ``need_bytes`` more fit in ``budget_bytes``.

    Only ready models with nothing in flight or waiting are candidates (never a loading, draining
    or busy one, nor those in ``protect``), least recently used first (ties by name), and no more
    of them than needed. ``need_bytes`` 0 brings the resident models back under the budget.
    """
    if budget_bytes is None:
        return EvictionPlan(True)
    if need_bytes > budget_bytes:
        return EvictionPlan(
            False,
            reason=f"it needs {mib(need_bytes)}, more than the node's whole memory budget "
            f"({mib(budget_bytes)})",
        )
    free = budget_bytes - sum(m.memory_bytes for m in resident)
    victims: list[str] = []
    candidates = sorted(
        (m for m in resident if m.evictable and m.name not in protect),
        key=lambda m: (m.last_used, m.name),
    )
    for model in candidates:
        if free >= need_bytes:
            break
        victims.append(model.name)
        free += model.memory_bytes
    if free >= need_bytes:
        return EvictionPlan(True, tuple(victims))
    held = [m for m in resident if m.name not in victims and m.memory_bytes > 0]
    holders = ", ".join(
        f"{m.name} ({mib(m.memory_bytes)}, {m.state}"
        + (f", {m.busy} request{'s' if m.busy != 1 else ''} in flight or waiting" if m.busy else "")
        + ")"
        for m in sorted(held, key=lambda m: m.name)
    )
    return EvictionPlan(
        False,
        reason=f"it needs {mib(need_bytes)} and the node's memory budget ({mib(budget_bytes)}) "
        f"is held by models that cannot be unloaded now: {holders or 'none'}",
    )


# --------------------------------------------------------------------------------------------
# Memory


def estimate_memory_bytes(engine: EngineSettings | UpstreamEngineSettings) -> int:
    """What a model will take once loaded, before it has been: 0 for an upstream (the model
    lives elsewhere); for the embedded engine, its weights as float32 (the engine de-quantises
    every tensor) plus its KV pool, from the GGUF file's header (about 2 s for SmolLM2: the
    header holds the vocabulary). Raises ``OSError``/``ValueError`` for an unreadable file."""
    if isinstance(engine, UpstreamEngineSettings):
        return 0
    from runtime.engine.gguf_model import _config_from_metadata, _FastGGUFReader, read_metadata
    from runtime.engine.model_files import resolve_model_path

    reader = _FastGGUFReader(resolve_model_path(engine.model_path))
    tensors = {t.name: t for t in reader.tensors}
    weights = sum(int(t.n_elements) for t in tensors.values()) * 4
    embedding = tensors.get("token_embd.weight")
    vocab = int(embedding.shape[-1]) if embedding is not None else 0
    config = _config_from_metadata(read_metadata(reader), set(tensors), vocab)
    return weights + engine.kv_cache_tokens * config.kv_bytes_per_token(engine.kv_dtype)


# --------------------------------------------------------------------------------------------
# Reports (the admin routes' bodies)


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelStatus(_Report):
    """One slot as ``GET /admin/models`` shows it."""

    name: str = Field(description="Model name clients send.")
    variant: str
    state: Literal["unloaded", "loading", "ready", "draining"]
    primary: bool = Field(description="The node's own model (config.model), reported to the fleet.")
    preload: bool
    memory_bytes: int | None = Field(
        description="Footprint counted against the budget (weights + KV pool); None if unknown."
    )
    memory_source: Literal["measured", "configured", "estimated"] | None = Field(
        description="measured at its last load, configured (memory_bytes), or estimated from the "
        "model file."
    )
    in_flight: int = Field(description="Requests holding the model now.")
    waiting: int = Field(description="Requests waiting for it to load.")
    last_used: float | None = Field(description="Wall clock (epoch seconds) of its last use.")
    loads: int = Field(description="Times it was loaded since the agent started.")
    error: str | None = Field(description="Why its last load failed, if it did.")


class ModelsReport(_Report):
    """``GET /admin/models``: every slot, and the node's memory."""

    memory_budget_bytes: int | None
    memory_reserved_bytes: int = Field(
        description="Sum of the footprints of the models loading, ready or draining."
    )
    rss_bytes: int = Field(description="The agent process's resident set size now.")
    models: list[ModelStatus]


# --------------------------------------------------------------------------------------------
# Slots


class UnloadedBackend:
    """What ``AgentState.backend`` is while the primary model is not loaded: never ready,
    idle stats, and the slot's sticky load error (so a supervisor sees a failed node)."""

    ready = False
    vocab_size: int | None = None
    max_num_seqs = 1

    def __init__(self, name: str, load_error: str | None = None) -> None:
        self.load_error = load_error
        self.not_ready_reason = f"model {name!r} is not loaded"

    @property
    def max_model_len(self) -> int:
        raise BackendError(self.not_ready_reason)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        raise BackendError(self.not_ready_reason)

    def render_chat(self, messages: Sequence[Any]) -> str:
        raise BackendError(self.not_ready_reason)

    def submit(
        self, request: GenerationRequest, on_done: Callable[[GenerationResult], None]
    ) -> GenerationHandle:
        raise BackendError(self.not_ready_reason)

    def abort(self, request_id: str) -> None:
        return None

    def stats(self) -> BackendStats:
        return BackendStats(0, 0, 0, None, None, None, None, None)

    def work_items(self) -> list[WorkItem]:
        return []

    def throughput(self) -> ThroughputEstimate:
        return ThroughputEstimate()


@dataclass(eq=False)
class _Load:
    boot: bool
    started: float
    done: asyncio.Event = field(default_factory=asyncio.Event)
    failure: ModelUnavailable | None = None
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Unload:
    kind: Literal["admin", "evict"]
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Slot:
    spec: ModelSlot
    primary: bool
    state: SlotState = SlotState.UNLOADED
    backend: ServingBackend | None = None
    reserved: bool = False  # counted against the budget (granted by a memory decision)
    in_flight: int = 0
    waiting: int = 0  # requests waiting for its load (or for its eviction to end, to reload it)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = -math.inf
    last_used_wall: float | None = None
    measured_bytes: int | None = None
    estimated_bytes: int | None = None
    estimating: asyncio.Task[int] | None = None
    load: _Load | None = None
    unload: _Unload | None = None
    loads: int = 0
    error: str | None = None
    retry_at: float | None = None  # when a failed load may be retried; None: never (boot)

    @property
    def name(self) -> str:
        return self.spec.name

    def footprint(self) -> tuple[int, str | None]:
        if self.measured_bytes is not None:
            return self.measured_bytes, "measured"
        if self.spec.memory_bytes is not None:
            return self.spec.memory_bytes, "configured"
        if self.estimated_bytes is not None:
            return self.estimated_bytes, "estimated"
        return 0, None


class ModelLease:
    """A request's hold on a loaded model: while held, the model is busy (never evicted, and
    an unload waits for it). :meth:`release` once the request is over (idempotent)."""

    def __init__(self, manager: ModelManager, slot: _Slot, waited_s: float | None) -> None:
        assert slot.backend is not None
        self._manager = manager
        self._slot: _Slot | None = slot
        self.backend: ServingBackend = slot.backend
        self.model = slot.name
        self.waited_s = waited_s  # how long the request waited for a load (a cold start)

    def release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._manager._released(slot)


# --------------------------------------------------------------------------------------------
# The manager


class ModelManager:
    """The slots of one node, their loads and unloads (everything runs on the event loop,
    except the engine loads, which run in their backends' threads).

    ``slots`` come from :meth:`NodeConfig.model_slots` (the primary first); ``backend_factory``
    builds a slot's backend for each load; ``initial_backend`` is the primary's backend for its
    boot load (``init(backend=...)``); ``metrics`` gets the load, cold-start and eviction series.
    """

    def __init__(
        self,
        slots: Sequence[ModelSlot],
        *,
        budget_bytes: int | None,
        backend_factory: BackendFactory,
        metrics: AgentMetrics | None = None,
        initial_backend: ServingBackend | None = None,
        clock: Callable[[], float] = time.monotonic,
        load_retry_s: float = LOAD_RETRY_S,
    ) -> None:
        if not slots:
            raise ValueError("slots: a node holds at least its primary model")
        self._slots = {spec.name: _Slot(spec, primary=i == 0) for i, spec in enumerate(slots)}
        self.primary = self._slots[slots[0].name]
        self.budget_bytes = budget_bytes
        self._factory = backend_factory
        self._metrics = metrics
        self._clock = clock
        self._load_retry_s = load_retry_s
        self._memory_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        for slot in self._slots.values():
            slot.idle.set()
        # The primary loads at boot, as the single-model agent always did: until then the node
        # is loading (503 model_loading, /readyz 503).
        self.primary.state = SlotState.LOADING
        self.primary.backend = initial_backend
        if metrics is not None:
            metrics.model_memory_budget.set(budget_bytes if budget_bytes is not None else math.nan)

    # -- lookups ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    @property
    def multi(self) -> bool:
        """More than one slot (the node reports its loaded models to the fleet)."""
        return len(self._slots) > 1

    def spec(self, name: str) -> ModelSlot | None:
        slot = self._slots.get(name)
        return slot.spec if slot is not None else None

    def state_of(self, name: str) -> SlotState:
        slot = self._slots[name]
        self._settle(slot)
        return slot.state

    def backend_of(self, name: str) -> ServingBackend | None:
        """The slot's backend while it is ready (None otherwise)."""
        slot = self._slots[name]
        self._settle(slot)
        return slot.backend if slot.state is SlotState.READY else None

    @property
    def primary_backend(self) -> ServingBackend:
        """The primary model's backend, loaded or not (see :class:`UnloadedBackend`)."""
        slot = self.primary
        if slot.backend is not None:
            return slot.backend
        sticky = slot.error if slot.retry_at is None else None
        return UnloadedBackend(slot.name, sticky)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin the boot loads (the primary, then each ``preload`` slot) and return at once."""
        first = self._begin_load(self.primary, boot=True)
        others = [s for s in self._slots.values() if s.spec.preload and not s.primary]
        if others:
            self._spawn(self._preload(first, others))
        if self.budget_bytes is not None and self.multi:
            self._spawn(self._estimate_ahead(first))

    async def _estimate_ahead(self, first: _Load) -> None:
        # Estimating reads the model file's header (seconds for a large vocabulary): done once
        # the node is up, not in the first cold start's critical path.
        await first.done.wait()
        for slot in self._slots.values():
            if slot.footprint()[1] is None and slot.estimating is None:
                slot.estimating = self._spawn(self._estimate(slot))
                await slot.estimating

    async def _preload(self, first: _Load, others: list[_Slot]) -> None:
        # One at a time, after the primary: boot loads compete for the same cores.
        await first.done.wait()
        for slot in others:
            if slot.state is not SlotState.UNLOADED:
                continue
            load = self._begin_load(slot, boot=True)
            await load.done.wait()
            if load.failure is not None:
                log.warning("model %s not preloaded: %s", slot.name, load.failure.message)

    async def close(self) -> None:
        """Stop loads and close every backend (at shutdown)."""
        self._closing = True
        tasks = [t for t in self._background if not t.done()]
        tasks += [
            s.load.task
            for s in self._slots.values()
            if s.load is not None and s.load.task is not None and not s.load.task.done()
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in self._slots.values():
            if slot.backend is not None:
                await slot.backend.close()
                discard = getattr(slot.backend, "discard", None)
                if discard is not None:
                    # The app may outlive its server (tests, the simulator): free the engines.
                    discard()
        await asyncio.get_running_loop().run_in_executor(None, release_memory)

    def order(
        self, action: Literal["load", "unload"], name: str, *, reason: str, deadline_s: float
    ) -> asyncio.Task[None] | None:
        """Carry out the controller's placement order in the background (an unload lets
        requests in flight finish until ``deadline_s``). None, with a warning, when ``name``
        is not a model this node may load and unload (unknown, or its primary)."""
        slot = self._slots.get(name)
        if slot is None or slot.primary:
            why = "not a model of this node" if slot is None else "the node's primary model"
            log.warning("placement order to %s %r ignored: %s", action, name, why)
            return None
        log.info("placement: %s %s (%s)", action, name, reason)

        async def carry_out() -> None:
            try:
                if action == "load":
                    await self.load(name)
                else:
                    await self.unload(name, deadline_s)
            except ModelUnavailable as error:
                log.warning("placement order to %s %s failed: %s", action, name, error.message)

        return self._spawn(carry_out())

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- requests -----------------------------------------------------------------------------

    async def acquire(self, name: str) -> ModelLease:
        """A lease on model ``name`` once it is ready, loading it first if needed (the caller
        waits; making room may unload idle models). Raises :class:`ModelUnavailable` when the
        model cannot be had now, and ``KeyError`` for a name that is no slot."""
        slot = self._slots[name]
        waited_since: float | None = None
        while True:
            self._settle(slot)
            if slot.state is SlotState.READY:
                return self._lease(slot, waited_since)
            if slot.state is SlotState.DRAINING:
                unload = slot.unload
                assert unload is not None
                if unload.kind != "evict":
                    raise ModelUnavailable(
                        "model_draining",
                        f"model {name!r} is being unloaded from this node; retry shortly",
                        retry_after=DRAINING_RETRY_AFTER_S,
                        reason="model_draining",
                    )
                # An idle model being evicted: wait for it to go, then load it again.
                waited_since = waited_since if waited_since is not None else self._clock()
                await self._wait(slot, unload.done)
                continue
            if slot.state is SlotState.LOADING:
                load = slot.load
                if load is None or load.boot:
                    backend = slot.backend
                    detail = "the model is loading"
                    if backend is not None:
                        detail = backend.load_error or backend.not_ready_reason or detail
                    raise ModelUnavailable(
                        "model_loading",
                        f"{detail}; retry shortly",
                        retry_after=LOADING_RETRY_AFTER_S,
                        reason="loading",
                    )
                waited_since = waited_since if waited_since is not None else self._clock()
                await self._wait(slot, load.done)
                if load.failure is not None:
                    raise load.failure
                continue
            if slot.error is not None and (slot.retry_at is None or self._clock() < slot.retry_at):
                raise self._failed(slot)
            self._begin_load(slot, boot=False)

    async def _wait(self, slot: _Slot, event: asyncio.Event) -> None:
        slot.waiting += 1  # a model someone waits for is busy: it must not be evicted meanwhile
        try:
            await event.wait()
        finally:
            slot.waiting -= 1

    def _lease(self, slot: _Slot, waited_since: float | None) -> ModelLease:
        slot.in_flight += 1
        slot.idle.clear()
        self._touch(slot)
        waited_s = None
        if waited_since is not None:
            waited_s = self._clock() - waited_since
            if self._metrics is not None:
                self._metrics.model_cold_starts.labels(slot.name).inc()
                self._metrics.model_load_wait.labels(slot.name).observe(waited_s)
        return ModelLease(self, slot, waited_s)

    def _released(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        self._touch(slot)
        if slot.in_flight == 0:
            slot.idle.set()

    def _touch(self, slot: _Slot) -> None:
        slot.last_used = self._clock()
        slot.last_used_wall = time.time()

    def _failed(self, slot: _Slot) -> ModelUnavailable:
        retry = LOADING_RETRY_AFTER_S
        if slot.retry_at is not None:
            retry = max(1, math.ceil(slot.retry_at - self._clock()))
        return ModelUnavailable(
            "model_load_failed",
            str(slot.error),
            retry_after=retry,
            reason="load_failed",
        )

    # -- admin --------------------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Load ``name`` now (and wait for it); a no-op when it is ready. Retries a failed load
        at once. Raises :class:`ModelUnavailable` when it cannot be loaded."""
        slot = self._slots[name]
        while True:
            self._settle(slot)
            if slot.state is SlotState.READY:
                self._touch(slot)
                return
            if slot.state is SlotState.LOADING:
                load = slot.load
                if load is None:  # before start(): nothing to wait on yet
                    raise ModelUnavailable(
                        "model_loading",
                        "the node is starting; retry shortly",
                        retry_after=LOADING_RETRY_AFTER_S,
                        reason="loading",
                    )
                await self._wait(slot, load.done)
                if load.failure is not None:
                    raise load.failure
                continue
            if slot.state is SlotState.DRAINING:
                assert slot.unload is not None
                await slot.unload.done.wait()
                continue
            if slot.error is not None and slot.retry_at is None:
                raise self._failed(slot)  # the node's own model failed at boot: not retried
            slot.error = None
            self._begin_load(slot, boot=False)

    async def unload(self, name: str, deadline_s: float) -> None:
        """Unload ``name``: new requests for it get 503 at once, those in flight may finish
        until ``deadline_s`` (then they are aborted), then its memory is freed. Waits for all of
        it; a no-op when the model is not loaded (a load in progress is waited for first)."""
        slot = self._slots[name]
        while True:
            self._settle(slot)
            if slot.state is SlotState.UNLOADED:
                return
            if slot.state is SlotState.LOADING:
                if slot.load is None:
                    raise ModelUnavailable(
                        "model_loading",
                        "the node is starting; retry shortly",
                        retry_after=LOADING_RETRY_AFTER_S,
                        reason="loading",
                    )
                await slot.load.done.wait()
                continue
            if slot.state is SlotState.DRAINING:
                assert slot.unload is not None
                await slot.unload.done.wait()
                continue
            break
        self._begin_unload(slot, "admin")
        # In a task of its own: an admin whose connection drops (its handler is cancelled) must
        # not leave the model half unloaded.
        await asyncio.shield(self._spawn(self._drain_and_free(slot, deadline_s)))

    # -- loading ------------------------------------------------------------------------------

    def _begin_load(self, slot: _Slot, *, boot: bool) -> _Load:
        load = _Load(boot=boot, started=self._clock())
        slot.load = load
        slot.state = SlotState.LOADING
        load.task = asyncio.get_running_loop().create_task(self._run_load(slot, load))
        return load

    async def _run_load(self, slot: _Slot, load: _Load) -> None:
        try:
            async with self._memory_lock:
                await self._make_room(slot)
            backend = slot.backend
            if backend is None or not load.boot:
                backend = self._factory(slot.spec)
                slot.backend = backend
            await backend.start()
            wait_loaded = getattr(backend, "wait_loaded", None)
            if wait_loaded is not None:
                await wait_loaded()
                if backend.load_error is not None:
                    raise ModelUnavailable(
                        "model_load_failed",
                        f"model {slot.name!r} failed to load on this node: {backend.load_error}",
                        retry_after=LOADING_RETRY_AFTER_S,
                        reason="load_failed",
                    )
            # A backend without wait_loaded (an upstream) is ready to use once started: its own
            # readiness (reachable or not) is checked per request, as for a single-model node.
            del backend
            self._mark_ready(slot)
        except ModelUnavailable as failure:
            await self._load_failed(slot, load, failure)
        except Exception as error:  # a backend factory or start() that raised
            log.exception("loading model %s failed", slot.name)
            message = f"model {slot.name!r} failed to load on this node: {error}".splitlines()[0]
            failure = ModelUnavailable(
                "model_load_failed",
                message,
                retry_after=LOADING_RETRY_AFTER_S,
                reason="load_failed",
            )
            await self._load_failed(slot, load, failure)
        finally:
            if not load.done.is_set():  # cancelled (shutdown)
                load.failure = load.failure or ModelUnavailable(
                    "draining",
                    "the node is shutting down",
                    retry_after=DRAINING_RETRY_AFTER_S,
                    reason="draining",
                )
                load.done.set()

    async def _make_room(self, slot: _Slot) -> None:
        """Under the memory lock: grant ``slot`` its footprint, unloading idle models first if
        the budget needs it; raise :class:`ModelUnavailable` when it cannot fit now."""
        need = await self._footprint(slot)
        resident = self._resident(exclude=slot)
        plan = plan_eviction(need, self.budget_bytes, resident)
        if not plan.fits:
            raise ModelUnavailable(
                "insufficient_memory",
                f"cannot load model {slot.name!r} on this node now: {plan.reason}; retry "
                "shortly or on another node",
                retry_after=NO_ROOM_RETRY_AFTER_S,
                reason="model_memory",
            )
        victims = [self._slots[name] for name in plan.victims]
        for victim in victims:  # all at once, before the first await: none can be taken now
            log.info("unloading idle model %s to make room for %s", victim.name, slot.name)
            self._begin_unload(victim, "evict")
        for victim in victims:
            await self._drain_and_free(victim, 0.0)
        slot.reserved = True

    async def _footprint(self, slot: _Slot) -> int:
        known, source = slot.footprint()
        if source is not None or self.budget_bytes is None:
            return known  # without a budget nothing is decided on it: no estimate needed
        if slot.estimating is None:
            slot.estimating = self._spawn(self._estimate(slot))
        return await asyncio.shield(slot.estimating)

    async def _estimate(self, slot: _Slot) -> int:
        loop = asyncio.get_running_loop()
        try:
            estimate = await loop.run_in_executor(None, estimate_memory_bytes, slot.spec.engine)
        except Exception as error:  # the load itself will report the problem with the file
            log.warning("cannot estimate the memory of model %s: %s", slot.name, error)
            estimate = 0
        slot.estimated_bytes = estimate
        return estimate

    def _resident(self, exclude: _Slot | None = None) -> list[ResidentModel]:
        return [
            ResidentModel(
                name=s.name,
                memory_bytes=s.footprint()[0],
                state=s.state,
                busy=s.in_flight + s.waiting,
                last_used=s.last_used,
            )
            for s in self._slots.values()
            if s.reserved and s is not exclude
        ]

    def _settle(self, slot: _Slot) -> None:
        # A backend that reports ready before its load task resumed is ready: the handler that
        # sees it must not answer "loading" for the few microseconds in between.
        backend = slot.backend
        if (
            slot.state is SlotState.LOADING
            and slot.reserved
            and backend is not None
            and backend.ready
        ):
            self._mark_ready(slot)

    def _mark_ready(self, slot: _Slot) -> None:
        if slot.state is not SlotState.LOADING:
            return
        load = slot.load
        backend = slot.backend
        assert load is not None and backend is not None
        slot.state = SlotState.READY
        slot.error = slot.retry_at = None
        slot.loads += 1
        measured = getattr(backend, "memory_bytes", None)
        if isinstance(measured, int):
            slot.measured_bytes = measured
        self._touch(slot)
        seconds = self._clock() - load.started
        log.info(
            "model %s loaded in %.1fs (%s)",
            slot.name,
            seconds,
            mib(slot.footprint()[0]) if slot.footprint()[1] else "memory unknown",
        )
        if self._metrics is not None:
            self._metrics.model_load_seconds.labels(slot.name).observe(seconds)
            self._metrics.model_memory.labels(slot.name).set(slot.footprint()[0])
        load.done.set()
        if self.budget_bytes is not None and not self._closing:
            # The measured footprint may exceed the estimate the room was made for.
            self._spawn(self._trim_to_budget(slot))

    async def _load_failed(self, slot: _Slot, load: _Load, failure: ModelUnavailable) -> None:
        load.failure = failure
        slot.reserved = False
        slot.state = SlotState.UNLOADED
        # The node's own model failing at boot (or not fitting the budget at all) is the node
        # failing, as before slots: not retried, /readyz says failed, `fleetform agent` exits.
        fatal = load.boot and slot.primary
        if failure.reason == "load_failed" or fatal:
            log.error("%s", failure.message)
            slot.error = failure.message
            slot.retry_at = None if fatal else self._clock() + self._load_retry_s
        backend = slot.backend
        if backend is not None:
            await backend.close()
            if not (fatal and backend.load_error is not None):
                # A failed boot load of the primary keeps its backend, whose load_error says why
                # (AgentState.backend.load_error, as before slots); else the stand-in
                # (UnloadedBackend) carries a fatal error, and an on-demand failure stays the
                # slot's (reported, retried later: no crash).
                slot.backend = None
        load.done.set()

    async def _trim_to_budget(self, loaded: _Slot) -> None:
        async with self._memory_lock:
            plan = plan_eviction(0, self.budget_bytes, self._resident(), protect={loaded.name})
            if not plan.fits:
                log.warning("over the memory budget until busy models go idle: %s", plan.reason)
                return
            victims = [self._slots[name] for name in plan.victims]
            for victim in victims:
                log.info("unloading idle model %s: over the memory budget", victim.name)
                self._begin_unload(victim, "evict")
            for victim in victims:
                await self._drain_and_free(victim, 0.0)

    # -- unloading ----------------------------------------------------------------------------

    def _begin_unload(self, slot: _Slot, kind: Literal["admin", "evict"]) -> None:
        slot.state = SlotState.DRAINING
        slot.unload = _Unload(kind)
        if kind == "evict" and self._metrics is not None:
            self._metrics.model_evictions.labels(slot.name).inc()

    async def _drain_and_free(self, slot: _Slot, deadline_s: float) -> None:
        unload = slot.unload
        assert unload is not None and slot.backend is not None
        if slot.in_flight:
            log.info("unloading %s: waiting for %d requests", slot.name, slot.in_flight)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.idle.wait(), deadline_s)
        if slot.in_flight:
            log.warning(
                "unloading %s: deadline passed, aborting %d requests", slot.name, slot.in_flight
            )
        # Closing aborts what is left (its clients get an error), and stops the engine thread.
        await slot.backend.close()
        if slot.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.idle.wait(), ABORT_GRACE_S)
        backend, slot.backend = slot.backend, None
        discard = getattr(backend, "discard", None)
        if discard is not None:
            discard()  # drops the engine even if a finished request's handle still points here
        del backend, discard
        await asyncio.get_running_loop().run_in_executor(None, release_memory)
        slot.state = SlotState.UNLOADED
        slot.reserved = False
        slot.unload = None
        if self._metrics is not None:
            self._metrics.model_memory.labels(slot.name).set(0)
        log.info(
            "model %s unloaded (%s, rss now %s)", slot.name, unload.kind, mib(process_rss_bytes())
        )
        unload.done.set()

    # -- what the node reports ----------------------------------------------------------------

    def readiness(self) -> tuple[Literal["ready", "loading", "failed"], str | None]:
        """The node's readiness, judged on its primary model: loading during the boot load,
        failed when that load failed (or its backend broke), ready otherwise (also while the
        primary is unloaded: a request loads it)."""
        slot = self.primary
        self._settle(slot)
        backend = slot.backend
        if slot.state is SlotState.LOADING and (slot.load is None or slot.load.boot):
            if backend is not None and backend.load_error is not None:
                return "failed", backend.load_error
            reason = backend.not_ready_reason if backend is not None else None
            return "loading", reason or "the model is loading"
        if slot.state is SlotState.UNLOADED and slot.error is not None and slot.retry_at is None:
            return "failed", slot.error
        if slot.state is SlotState.READY and backend is not None:
            if backend.load_error is not None:
                return "failed", backend.load_error
            if not backend.ready:
                return "loading", backend.not_ready_reason or "not ready"
        return "ready", None

    def stats(self) -> BackendStats:
        """Engine stats of the node: the primary's on a single-model node, else summed over
        the loaded models."""
        if not self.multi:
            return self.primary_backend.stats()
        loaded = [
            s.backend
            for s in self._slots.values()
            if s.backend is not None and s.state in (SlotState.READY, SlotState.DRAINING)
        ]
        if not loaded:
            return UnloadedBackend(self.primary.name).stats()
        every = [b.stats() for b in loaded]
        if len(every) == 1:
            return every[0]

        def total(values: list[int | None]) -> int | None:
            known = [v for v in values if v is not None]
            return sum(known) if known else None

        used = total([s.kv_used_bytes for s in every])
        capacity = total([s.kv_capacity_bytes for s in every])
        primary = self.primary_backend.stats()
        return BackendStats(
            waiting=sum(s.waiting for s in every),
            running=sum(s.running for s in every),
            unfinished=sum(s.unfinished for s in every),
            kv_used_bytes=used,
            kv_capacity_bytes=capacity,
            kv_usage=used / capacity if used is not None and capacity else None,
            # Speeds are per model; the primary's is the one the fleet routes on.
            prefill_tokens_per_s=primary.prefill_tokens_per_s,
            decode_step_s=primary.decode_step_s,
        )

    def _status(self, slot: _Slot) -> ModelStatus:
        memory, source = slot.footprint()
        return ModelStatus(
            name=slot.name,
            variant=slot.spec.variant,
            state=slot.state.value,
            primary=slot.primary,
            preload=slot.spec.preload,
            memory_bytes=memory if source is not None else None,
            memory_source=source,  # type: ignore[arg-type]
            in_flight=slot.in_flight,
            waiting=slot.waiting,
            last_used=slot.last_used_wall,
            loads=slot.loads,
            error=slot.error,
        )

    def status(self, name: str) -> ModelStatus:
        slot = self._slots[name]
        self._settle(slot)
        return self._status(slot)

    def report(self) -> ModelsReport:
        for slot in self._slots.values():
            self._settle(slot)
        return ModelsReport(
            memory_budget_bytes=self.budget_bytes,
            memory_reserved_bytes=sum(s.footprint()[0] for s in self._slots.values() if s.reserved),
            rss_bytes=process_rss_bytes(),
            models=[self._status(s) for s in self._slots.values()],
        )

    def loaded_models(
        self, load_of: Callable[[ServingBackend], ServingLoad] | None = None
    ) -> list[LoadedModel]:
        """Every slot for the metrics push: state, memory, use, and (via ``load_of``) the load
        of each ready model's engine, which the fleet routes that model on."""
        out = []
        now = self._clock()
        for slot in self._slots.values():
            self._settle(slot)
            memory, source = slot.footprint()
            load: dict[str, Any] = {}
            if load_of is not None and slot.state is SlotState.READY and slot.backend is not None:
                load = load_of(slot.backend).model_dump()
            out.append(
                LoadedModel(
                    name=slot.name,
                    variant=slot.spec.variant,
                    state=slot.state.value,  # type: ignore[arg-type]
                    memory_bytes=memory if source is not None else None,
                    in_flight=slot.in_flight,
                    waiting=slot.waiting,
                    idle_s=max(0.0, now - slot.last_used) if slot.last_used > -math.inf else None,
                    primary=slot.primary,
                    **load,
                )
            )
        return out
