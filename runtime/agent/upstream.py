"""The OpenAI-compatible upstream backend: the agent in front of vLLM, TGI, SGLang or llama.cpp.

This module owns :class:`UpstreamBackend`, the :class:`~runtime.agent.backend.ServingBackend` of
an ``openai-upstream`` node, and :class:`UpstreamQueue`, its priority queue.

Why the agent keeps a queue: an upstream server batches whatever it is sent, mostly first come
first served. If the agent passed every request straight on, a burst of batch work would sit in
the upstream's queue ahead of a critical request and the agent's priority classes would mean
nothing. So the agent holds at most ``max_in_flight`` requests at the upstream (enough to keep its
batcher fed) and the rest wait here, ordered as the embedded scheduler orders waiting work:
priority class, then deadline, then arrival. When an upstream request ends, the most important
waiting one goes next. Authentication, quotas and overload shedding stay in the HTTP layer,
unchanged: they only see this backend's :meth:`~UpstreamBackend.work_items` and throughput.

Each dispatched request is one streaming ``POST`` (``stream: true`` with
``stream_options.include_usage``, also for clients that did not ask to stream, so the agent sees
every token's arrival). Its events become :class:`GenerationChunk` objects; aborting a request
cancels the call, which closes the connection (an upstream notices and stops generating). Any
upstream failure (unreachable, a refusal status, an error event, a malformed or truncated stream)
ends the request with :class:`BackendError`, which the HTTP layer turns into a clean JSON error.

What is sent, and how tokens are counted (the HTTP layer tokenises every prompt to check the
context length, charge quotas and predict queueing):

* With ``model_path`` (a GGUF of the upstream's model), its :class:`GGUFTokenizer` counts tokens
  exactly and its chat template renders chat prompts; chat and text prompts both go to
  ``/completions`` as the rendered text, which the upstream tokenises to the same ids.
* Without it, counts are *estimates*: one token per three UTF-8 bytes (BPE vocabularies average
  about four characters per English token, so this errs high, which is the safe side for quotas
  and shedding). Chat requests then go to ``/chat/completions`` as messages, so the upstream
  applies its own chat template (an estimate can also not know that template's overhead; set
  ``model_path`` where counts must be exact). Either way, the usage the upstream reports is what
  is billed and returned to the client.
* Prompts a client sent as token ids go to ``/completions`` as token ids.

The HTTP layer hands the backend only token ids, so :meth:`UpstreamBackend.encode` returns a
:class:`PromptTokens` (a list of ids that also remembers the text or messages it came from) and
:meth:`UpstreamBackend.submit` reads what to send from it.

Readiness: a background probe asks ``GET <url>/models`` every ``health_interval_s`` (every
0.5 s while not ready); the backend is ready while the upstream answers and lists the configured
model, and, with ``model_path``, once the tokenizer is loaded. A request that cannot connect marks
the upstream down at once. ``load_error`` is only set for what waiting cannot fix (a missing API
key, an unreadable GGUF), since ``fleetform agent`` exits on it.

Estimates for admission and routing, from observed upstream behaviour (EWMAs, stated as such):
``prefill_tokens_per_s`` is prompt tokens over the time from dispatch to first token (it includes
the upstream's own queueing and the network, so it errs slow); ``decode_step_s`` is the mean gap
between a request's tokens. Cost: the agent sees no upstream steps, so each moment's wall time is
split equally among the requests in flight (the embedded backend splits by token rows); wall time
with nothing in flight, and the upstream's work for other clients, are not attributed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import aiohttp

from runtime.agent.admission import ThroughputEstimate, WorkItem
from runtime.agent.backend import (
    BackendError,
    BackendStats,
    GenerationChunk,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
)
from runtime.agent.config import UpstreamEngineSettings
from runtime.engine.base import SamplingParams
from runtime.scheduler import admission_order

__all__ = [
    "PromptTokens",
    "RenderedChat",
    "UpstreamBackend",
    "UpstreamQueue",
    "estimate_tokens",
]

log = logging.getLogger("fleetform.agent.upstream")

DEFAULT_MAX_MODEL_LEN = 4096  # when neither the config, the upstream nor a GGUF says
BYTES_PER_TOKEN_ESTIMATE = 3
NOT_READY_PROBE_S = 0.5
PROBE_TIMEOUT_S = 10.0
MAX_ERROR_BODY_BYTES = 4096
# SSE lines are read whole; the reader refuses lines above twice its buffer.
READ_BUFSIZE = 1 << 20

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# The queue


class UpstreamQueue(Generic[_T]):
    """Waiting requests, most important first.

    Order: ``priority`` (lower is more important), then ``deadline`` (``None`` last), then
    ``arrival``, then submission order: the embedded scheduler's order for waiting work
    (:mod:`runtime.scheduler`). Removing a waiting entry (an abort) is O(1): its heap slot is
    skipped when it surfaces, and the heap is rebuilt when such slots outnumber live ones.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, float, float, int], str]] = []
        self._entries: dict[str, tuple[tuple[int, float, float, int], _T]] = {}
        self._submitted = itertools.count()

    def push(
        self, key: str, item: _T, priority: int, deadline: float | None, arrival: float
    ) -> None:
        if key in self._entries:
            raise ValueError(f"request_id: {key!r} is already queued")
        order = admission_order(priority, deadline, arrival, next(self._submitted))
        self._entries[key] = (order, item)
        heapq.heappush(self._heap, (order, key))

    def pop(self) -> _T | None:
        """The most important entry, removed; ``None`` when empty."""
        while self._heap:
            order, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is not None and entry[0] == order:
                del self._entries[key]
                return entry[1]
        return None

    def remove(self, key: str) -> _T | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(order, k) for k, (order, _) in self._entries.items()]
            heapq.heapify(self._heap)
        return entry[1]

    def items(self) -> list[_T]:
        """The waiting entries (in no particular order)."""
        return [item for _, item in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


# --------------------------------------------------------------------------------------------
# Prompts


class RenderedChat(str):
    """A chat prompt rendered to text, remembering the messages it came from."""

    messages: tuple[dict[str, str], ...]

    def __new__(cls, text: str, messages: Iterable[Mapping[str, str]]) -> RenderedChat:
        rendered = super().__new__(cls, text)
        rendered.messages = tuple(dict(m) for m in messages)
        return rendered


class PromptTokens(list[int]):
    """Prompt token ids (exact, or placeholders whose number is an estimate) that remember what
    to send upstream: the ``text`` they were counted from and, for chat, the ``messages``."""

    def __init__(
        self,
        ids: Iterable[int],
        text: str,
        messages: tuple[dict[str, str], ...] | None = None,
        estimated: bool = False,
    ) -> None:
        super().__init__(ids)
        self.text = text
        self.messages = messages
        self.estimated = estimated


def estimate_tokens(text: str) -> int:
    """A deliberately high token count for ``text`` when no tokenizer is available."""
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE))


# ChatML, used only to *count* chat prompts when there is no GGUF template (the upstream renders
# the real prompt with its own template).
_CHATML_ESTIMATE = "<|im_start|>{role}\n{content}<|im_end|>\n"


def _sampling_fields(params: SamplingParams) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if params.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
    # Extensions that vLLM, llama.cpp and Fleetform accept; sent only when asked for, so that a
    # strict server does not refuse ordinary requests.
    if params.top_k:
        body["top_k"] = params.top_k
    if params.ignore_eos:
        body["ignore_eos"] = True
    return body


# --------------------------------------------------------------------------------------------
# The backend


@dataclass
class _Upstreamed:
    """One request of this backend, waiting or in flight (event-loop state only)."""

    request: GenerationRequest
    handle: GenerationHandle
    on_done: Callable[[GenerationResult], None]
    path: str
    body: dict[str, Any]
    prompt_tokens: int
    dispatched_at: float | None = None
    first_token_at: float | None = None
    generated: int = 0
    token_times: list[float] = field(default_factory=list)
    accelerator_seconds: float = 0.0
    task: asyncio.Task[None] | None = None
    aborted: bool = False


@dataclass(frozen=True)
class _Probe:
    ok: bool
    detail: str | None
    max_model_len: int | None = None


class UpstreamBackend:
    """:class:`~runtime.agent.backend.ServingBackend` over an OpenAI-compatible server.

    ``environ`` is where ``api_key_env`` is read (default ``os.environ``); ``clock`` is the
    monotonic clock request times are measured with.
    """

    def __init__(
        self,
        settings: UpstreamEngineSettings,
        *,
        environ: Mapping[str, str] | None = None,
        ewma_alpha: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._load_error: str | None = None
        self._api_key: str | None = None
        if settings.api_key_env is not None:
            env = os.environ if environ is None else environ
            self._api_key = env.get(settings.api_key_env) or None
            if self._api_key is None:
                self._load_error = (
                    f"environment variable {settings.api_key_env} (the upstream's API key, "
                    "engine.api_key_env) is not set"
                )
        self._tokenizer: Any = None  # GGUFTokenizer once loaded
        self._gguf_context_length: int | None = None
        self._tokenizer_ready = settings.model_path is None
        self._upstream_ok = False
        self._not_ready_reason: str | None = "the upstream has not been probed yet"
        self._reported_max_model_len: int | None = None
        self._closing = False
        self._queue: UpstreamQueue[_Upstreamed] = UpstreamQueue()
        self._in_flight: dict[str, _Upstreamed] = {}
        self._throughput = ThroughputEstimate(alpha=ewma_alpha)
        self._accrued_at = clock()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._probe_now = asyncio.Event()

    # -- properties ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return (
            self._load_error is None
            and self._tokenizer_ready
            and self._upstream_ok
            and not self._closing
        )

    @property
    def load_error(self) -> str | None:
        return self._load_error

    @property
    def not_ready_reason(self) -> str | None:
        """Why the backend is not ready (``None`` when it is)."""
        if self.ready:
            return None
        if self._load_error is not None:
            return self._load_error
        if self._closing:
            return "shutting down"
        if not self._tokenizer_ready:
            return "the tokenizer is loading"
        return self._not_ready_reason

    @property
    def max_model_len(self) -> int:
        return (
            self._settings.max_model_len
            or self._reported_max_model_len
            or self._gguf_context_length
            or DEFAULT_MAX_MODEL_LEN
        )

    @property
    def max_num_seqs(self) -> int:
        # The batch the admission predictor reasons about is what the agent lets through.
        return self._settings.max_in_flight

    @property
    def vocab_size(self) -> int | None:
        return self._tokenizer.vocab_size if self._tokenizer is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._load_error is not None:
            log.error("upstream backend cannot start: %s", self._load_error)
            return
        s = self._settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.max_in_flight + 1),
            read_bufsize=READ_BUFSIZE,
        )
        loop = asyncio.get_running_loop()
        if s.model_path is not None:
            self._tasks.append(loop.create_task(self._load_tokenizer(s.model_path)))
        self._tasks.append(loop.create_task(self._probe_forever()))

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        now = self._clock()
        while (waiting := self._queue.pop()) is not None:
            self._finish(waiting, BackendError("shutting down"), now)
        running = [p.task for p in self._in_flight.values() if p.task is not None]
        for task in running:
            task.cancel()
        await asyncio.gather(*self._tasks, *running, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _load_tokenizer(self, path: str) -> None:
        def load() -> tuple[Any, int | None]:
            from runtime.engine.gguf_model import read_file_metadata
            from runtime.engine.tokenizer import GGUFTokenizer

            metadata = read_file_metadata(path)
            arch = metadata.get("general.architecture")
            context = metadata.get(f"{arch}.context_length")
            return GGUFTokenizer(metadata), int(context) if context else None

        try:
            tokenizer, context = await asyncio.get_running_loop().run_in_executor(None, load)
        except Exception as error:
            log.exception("cannot load the upstream model's tokenizer from %s", path)
            self._load_error = f"cannot load the tokenizer from {path}: {error}".splitlines()[0]
            return
        self._tokenizer, self._gguf_context_length = tokenizer, context
        self._tokenizer_ready = True
        log.info("tokenizer loaded from %s", path)

    # -- readiness ----------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if self._api_key is None:
            return {}
        return {"Authorization": f"Bearer {self._api_key}"}

    async def _probe_forever(self) -> None:
        interval = self._settings.health_interval_s
        while not self._closing:
            probe = await self._probe()
            if probe.ok and not self._upstream_ok:
                log.info("upstream %s serves %s: ready", self._settings.url, self._settings.model)
            elif not probe.ok and (self._upstream_ok or probe.detail != self._not_ready_reason):
                log.warning("upstream not ready: %s", probe.detail)
            self._upstream_ok, self._not_ready_reason = probe.ok, probe.detail
            if probe.max_model_len is not None:
                self._reported_max_model_len = probe.max_model_len
            self._probe_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._probe_now.wait(), interval if probe.ok else NOT_READY_PROBE_S
                )

    async def _probe(self) -> _Probe:
        s = self._settings
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S, sock_connect=s.connect_timeout_s)
        try:
            async with self._session.get(
                f"{s.url}/models", headers=self._headers(), timeout=timeout
            ) as response:
                if response.status != 200:
                    why = await _error_message(response)
                    return _Probe(False, f"GET {s.url}/models answered {response.status}: {why}")
                listing = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return _Probe(False, f"{s.url} is unreachable: {_describe(error)}")
        except ValueError:
            return _Probe(False, f"GET {s.url}/models did not answer JSON")
        cards = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(cards, list):
            return _Probe(False, f"GET {s.url}/models did not answer a model list")
        ids = [c.get("id") for c in cards if isinstance(c, dict)]
        for card in cards:
            if isinstance(card, dict) and card.get("id") == s.model:
                reported = card.get("max_model_len")
                valid = isinstance(reported, int) and not isinstance(reported, bool)
                return _Probe(True, None, reported if valid and reported > 1 else None)
        listed = ", ".join(str(i) for i in ids[:10]) or "nothing"
        return _Probe(False, f"the upstream does not serve {s.model!r} (it lists {listed})")

    def _upstream_lost(self, detail: str) -> None:
        if self._upstream_ok:
            log.warning("upstream lost: %s", detail)
        self._upstream_ok, self._not_ready_reason = False, detail
        self._probe_now.set()

    # -- tokens -------------------------------------------------------------------------------

    def _require_tokenizer(self) -> None:
        if self._load_error is not None:
            raise BackendError(self._load_error)
        if not self._tokenizer_ready:
            raise BackendError("the tokenizer is loading")

    def encode(self, text: str) -> list[int]:
        self._require_tokenizer()
        messages = text.messages if isinstance(text, RenderedChat) else None
        if self._tokenizer is not None:
            return PromptTokens(self._tokenizer.encode(text), str(text), messages)
        return PromptTokens(
            [0] * estimate_tokens(text), str(text), messages, estimated=True
        )  # placeholders: only their number is used, and they are never sent

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        self._require_tokenizer()
        if self._tokenizer is not None:
            rendered = self._tokenizer.apply_chat_template([dict(m) for m in messages])
        else:
            rendered = "".join(
                _CHATML_ESTIMATE.format(role=m["role"], content=m["content"]) for m in messages
            )
        return RenderedChat(rendered, messages)

    def _upstream_call(
        self, prompt: Sequence[int], params: SamplingParams
    ) -> tuple[str, dict[str, Any]]:
        """The path and JSON body that run ``prompt`` on the upstream."""
        body: dict[str, Any] = {
            "model": self._settings.model,
            **_sampling_fields(params),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if isinstance(prompt, PromptTokens):
            if prompt.messages is not None and self._tokenizer is None:
                return "/chat/completions", {"messages": list(prompt.messages), **body}
            return "/completions", {"prompt": prompt.text, **body}
        return "/completions", {"prompt": list(prompt), **body}

    # -- submission and the dispatch loop -----------------------------------------------------

    def submit(
        self, request: GenerationRequest, on_done: Callable[[GenerationResult], None]
    ) -> GenerationHandle:
        if not self.ready:
            raise BackendError(self.not_ready_reason or "the upstream is not ready")
        rid = request.request_id
        if rid in self._in_flight or rid in self._queue:
            raise ValueError(f"request_id: {rid!r} is already active")
        path, body = self._upstream_call(request.prompt_token_ids, request.params)
        item = _Upstreamed(
            request=request,
            handle=GenerationHandle(rid, self.abort),
            on_done=on_done,
            path=path,
            body=body,
            prompt_tokens=len(request.prompt_token_ids),
        )
        self._queue.push(rid, item, request.priority, request.deadline, request.arrival)
        self._pump()
        return item.handle

    def abort(self, request_id: str) -> None:
        waiting = self._queue.remove(request_id)
        if waiting is not None:
            self._finish(waiting, self._abort_chunk(waiting), self._clock())
            return
        running = self._in_flight.get(request_id)
        if running is not None and running.task is not None and not running.aborted:
            running.aborted = True
            running.task.cancel()  # closes the upstream connection

    def _pump(self) -> None:
        """Dispatch the most important waiting requests while slots are free."""
        while not self._closing and len(self._in_flight) < self._settings.max_in_flight:
            item = self._queue.pop()
            if item is None:
                return
            now = self._clock()
            self._accrue(now)
            item.dispatched_at = now
            self._in_flight[item.request.request_id] = item
            item.task = asyncio.get_running_loop().create_task(
                self._run(item), name=f"upstream-{item.request.request_id}"
            )

    async def _run(self, item: _Upstreamed) -> None:
        outcome: GenerationChunk | BackendError
        cancelled = False
        try:
            outcome = await self._exchange(item)
        except asyncio.CancelledError:
            cancelled = True
            closing = self._closing and not item.aborted
            outcome = BackendError("shutting down") if closing else self._abort_chunk(item)
        except BackendError as error:
            outcome = error
        except aiohttp.ClientConnectorError as error:
            detail = f"{self._settings.url} is unreachable: {_describe(error)}"
            self._upstream_lost(detail)
            outcome = BackendError(detail)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            self._probe_now.set()  # is the upstream still there?
            outcome = BackendError(f"the upstream call failed: {_describe(error)}")
        except Exception:
            log.exception("upstream exchange of %s failed", item.request.request_id)
            outcome = BackendError("the upstream call failed")
        self._finish(item, outcome, self._clock())
        if cancelled and not item.aborted:
            raise asyncio.CancelledError

    async def _exchange(self, item: _Upstreamed) -> GenerationChunk:
        """Run one streaming call; the final chunk (usage from the upstream when it reports)."""
        s = self._settings
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s
        )
        chat = item.path == "/chat/completions"
        async with self._session.post(
            s.url + item.path, json=item.body, headers=self._headers(), timeout=timeout
        ) as response:
            try:
                finish_reason, usage = await self._read_stream(item, response, chat)
            except asyncio.CancelledError:
                response.close()  # an abort: drop the connection so the upstream stops at once
                raise
        if finish_reason is None:
            raise BackendError("the upstream's stream ended without a finish reason")
        return GenerationChunk(
            text="",
            num_new_tokens=0,
            finished=True,
            finish_reason=finish_reason,
            prompt_tokens=_count(usage, "prompt_tokens", item.prompt_tokens),
            completion_tokens=_count(usage, "completion_tokens", item.generated),
        )

    async def _read_stream(
        self, item: _Upstreamed, response: aiohttp.ClientResponse, chat: bool
    ) -> tuple[str | None, dict[str, Any]]:
        """Turn the upstream's events into chunks; its finish reason and usage (if reported)."""
        if response.status != 200:
            why = await _error_message(response)
            raise BackendError(f"the upstream refused the request ({response.status}): {why}")
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        # Servers end with "[DONE]"; a stream that just ends after its finish reason is accepted.
        async for data in _sse_data(response.content):
            if data == "[DONE]":
                break
            event = _json_object(data)
            if "error" in event:
                raise BackendError(f"the upstream failed: {_message_of(event['error'])}")
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                if not isinstance(choice, dict):
                    raise BackendError("the upstream sent a malformed event")
                if chat:
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else None
                else:
                    text = choice.get("text")
                if isinstance(text, str) and text:
                    self._on_text(item, text)
                if choice.get("finish_reason"):
                    finish_reason = str(choice["finish_reason"])
        return finish_reason, usage

    def _on_text(self, item: _Upstreamed, text: str) -> None:
        now = self._clock()
        if item.first_token_at is None:
            item.first_token_at = now
            assert item.dispatched_at is not None
            self._throughput.observe(item.prompt_tokens, 0, now - item.dispatched_at)
        # One chunk is one token for vLLM and llama.cpp; the final usage corrects the count.
        item.generated += 1
        item.token_times.append(now)
        item.handle._put(
            GenerationChunk(
                text=text,
                num_new_tokens=1,
                finished=False,
                finish_reason=None,
                prompt_tokens=item.prompt_tokens,
                completion_tokens=item.generated,
            )
        )

    def _abort_chunk(self, item: _Upstreamed) -> GenerationChunk:
        return GenerationChunk("", 0, True, "abort", item.prompt_tokens, item.generated)

    def _accrue(self, now: float) -> None:
        """Split the wall time since the last change equally among the requests in flight."""
        if self._in_flight:
            share = (now - self._accrued_at) / len(self._in_flight)
            for item in self._in_flight.values():
                item.accelerator_seconds += share
        self._accrued_at = now

    def _finish(
        self, item: _Upstreamed, outcome: GenerationChunk | BackendError, now: float
    ) -> None:
        """Final accounting of a request, whatever ended it; frees its slot for the next."""
        if item.request.request_id in self._in_flight:
            self._accrue(now)
            del self._in_flight[item.request.request_id]
        self._pump()
        if isinstance(outcome, GenerationChunk):
            prompt_tokens, completion_tokens = outcome.prompt_tokens, outcome.completion_tokens
            reason, error = outcome.finish_reason or "stop", None
        else:
            prompt_tokens, completion_tokens = item.prompt_tokens, item.generated
            reason, error = "abort", str(outcome)
        times = item.token_times
        if len(times) >= 2 and completion_tokens >= 2:
            self._throughput.observe(0, 1, (times[-1] - times[0]) / (completion_tokens - 1))
        arrival = item.request.arrival
        result = GenerationResult(
            request_id=item.request.request_id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=reason,
            arrival=arrival,
            finish=now,
            queue_s=None if item.dispatched_at is None else item.dispatched_at - arrival,
            ttft_s=times[0] - arrival if times else None,
            inter_token_s=[b - a for a, b in itertools.pairwise(times)],
            accelerator_seconds=item.accelerator_seconds,
            error=error,
        )
        item.handle._put(outcome)
        try:
            item.on_done(result)
        except Exception:
            log.exception("request accounting failed for %s", result.request_id)

    # -- load state ---------------------------------------------------------------------------

    def stats(self) -> BackendStats:
        t = self._throughput
        waiting, running = len(self._queue), len(self._in_flight)
        return BackendStats(
            waiting=waiting,
            running=running,
            unfinished=waiting + running,
            kv_used_bytes=None,
            kv_capacity_bytes=None,
            kv_usage=None,
            prefill_tokens_per_s=t.prefill_tokens_per_s,
            decode_step_s=t.decode_step_s,
        )

    def work_items(self) -> list[WorkItem]:
        items = [
            WorkItem(
                priority=item.request.priority,
                prefill_tokens_left=0 if item.first_token_at is not None else item.prompt_tokens,
                decode_tokens_left=max(0, item.request.params.max_tokens - item.generated),
                running=True,
            )
            for item in self._in_flight.values()
        ]
        items.extend(
            WorkItem(
                priority=item.request.priority,
                prefill_tokens_left=item.prompt_tokens,
                decode_tokens_left=item.request.params.max_tokens,
                running=False,
            )
            for item in self._queue.items()
        )
        return items

    def throughput(self) -> ThroughputEstimate:
        t = self._throughput
        return replace(t)  # a copy with every field, decode_batch included

    def unfinished_ids(self) -> list[str]:
        return [*self._in_flight, *(i.request.request_id for i in self._queue.items())]


# --------------------------------------------------------------------------------------------
# Wire helpers


async def _sse_data(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined; comments skipped)."""
    lines: list[str] = []
    async for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def _json_object(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise BackendError("the upstream sent an event that is not JSON") from None
    if not isinstance(event, dict):
        raise BackendError("the upstream sent an event that is not a JSON object")
    return event


def _message_of(error: Any) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return str(error)[:500]


async def _error_message(response: aiohttp.ClientResponse) -> str:
    """What an upstream's error response says (OpenAI's error shape, or the start of the text)."""
    try:
        raw = await response.content.read(MAX_ERROR_BODY_BYTES)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return response.reason or "no detail"
    text = raw.decode("utf-8", "replace")
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict) and "error" in body:
            return _message_of(body["error"])
    return " ".join(text.split())[:500] or (response.reason or "no detail")


def _describe(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _count(usage: Mapping[str, Any], key: str, fallback: int) -> int:
    value = usage.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return fallback
