"""The agent's aiohttp application: routes, request handling, admission, streaming, drain.

This module owns the HTTP surface of a node (see ``runtime/agent/openapi.json``): OpenAI-style
chat and text completions (streaming over SSE or not), the model list, the caller's usage,
health, readiness, Prometheus metrics, the OpenAPI document and the drain route.

One inference request goes: authenticate (401) -> tenant may use this pool (403) -> parse and
validate the body (400) -> model (404 unknown, 403 not allowed) -> node accepting (503 loading or
draining) -> tokenise and check the context length (400) -> priority class -> overload shedding
(503) -> quota (429) -> submit to the serving backend -> stream or collect the outputs. When the
request ends for any reason the backend calls back with its final accounting: the quota is
corrected, usage and cost are recorded, latencies observed. A client that disconnects gets its
sequence aborted (a watcher polls the connection; a failed write or a cancelled handler does the
same).

Drain (SIGTERM in ``fleetform agent``, or ``POST /admin/drain`` with the fleet token, e.g. on a
spot interruption notice): ``/readyz`` turns 503, new inference requests get 503 + Retry-After,
in-flight ones may finish until the deadline and are then aborted, and ``DRAINED`` is set so the
process can exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from runtime.agent import schemas
from runtime.agent.admission import (
    LoadState,
    UnknownPriorityClassError,
    decide_shedding,
    resolve_priority,
)
from runtime.agent.auth import TenantDirectory, bearer_token, token_matches
from runtime.agent.backend import (
    BackendError,
    EngineCoreBackend,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    ServingBackend,
)
from runtime.agent.config import NodeConfig, TenantConfig
from runtime.agent.errors import APIError, make_error_middleware, param_from_validation_error
from runtime.agent.metrics import AgentMetrics, UsageLedger
from runtime.engine.base import SamplingParams
from runtime.quota import QuotaBook, QuotaTicket
from runtime.spec import SloClassSpec

__all__ = ["AGENT", "DRAINED", "AgentState", "begin_drain", "init"]

log = logging.getLogger("fleetform.agent")
_Model = TypeVar("_Model", bound=BaseModel)
Kind = Literal["chat", "completion"]

PRIORITY_HEADER = "X-Priority"
EFFECTIVE_PRIORITY_HEADER = "X-Fleetform-Priority"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
LOADING_RETRY_AFTER_S = 5
DRAINING_RETRY_AFTER_S = 2
DISCONNECT_POLL_S = 0.25
DRAIN_POLL_S = 0.05
ABORT_GRACE_S = 5.0  # after the drain deadline, how long aborted requests get to wind down


@dataclass
class AgentState:
    """Everything the handlers share (one per application)."""

    config: NodeConfig
    backend: ServingBackend
    tenants: TenantDirectory
    quotas: QuotaBook
    metrics: AgentMetrics
    usage: UsageLedger
    classes: dict[str, SloClassSpec]
    fleet_token: str | None
    clock: Callable[[], float]
    draining: bool = False
    drain_deadline_s: float = 0.0
    drain_task: asyncio.Task[None] | None = None
    in_flight: dict[str, GenerationHandle] = field(default_factory=dict)


AGENT = web.AppKey("agent", AgentState)
DRAINED = web.AppKey("drained", asyncio.Event)


def init(
    config: NodeConfig,
    *,
    backend: ServingBackend | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The agent application for ``config``.

    ``backend`` defaults to the embedded engine; ``environ`` is where the fleet token is read
    (default ``os.environ``); ``clock`` drives quota buckets and the drain deadline.
    """
    if backend is None:
        backend = EngineCoreBackend(
            config.engine, ewma_alpha=config.admission.throughput_ewma_alpha
        )
    metrics = AgentMetrics(config.node_id, config.pool, config.model)
    state = AgentState(
        config=config,
        backend=backend,
        tenants=TenantDirectory(config.tenants),
        quotas=QuotaBook.from_specs({t.name: t.quotas for t in config.tenants}, clock),
        metrics=metrics,
        usage=UsageLedger(),
        classes={c.name: c for c in config.slo_classes},
        fleet_token=config.fleet_token(environ),
        clock=clock,
    )
    metrics.bind_gauges(
        stats=backend.stats,
        in_flight=lambda: len(state.in_flight),
        ready=lambda: backend.ready and not state.draining,
        draining=lambda: state.draining,
    )
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[make_error_middleware(lambda r: metrics.rejected.labels(r).inc())],
    )
    app[AGENT] = state
    app[DRAINED] = asyncio.Event()
    app.cleanup_ctx.append(_backend_lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/usage", tenant_usage)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_post("/admin/drain", admin_drain)
    return app


async def _backend_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start loading the model in the background; on shutdown stop the drain and the engine."""
    state = app[AGENT]
    await state.backend.start()
    yield
    if state.drain_task is not None and not state.drain_task.done():
        state.drain_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state.drain_task
    for handle in list(state.in_flight.values()):
        handle.abort()
    await state.backend.close()


# --------------------------------------------------------------------------------------------
# Drain


def begin_drain(app: web.Application, deadline_s: float | None = None) -> schemas.DrainStatus:
    """Start draining (idempotent: a second call keeps the first deadline)."""
    state = app[AGENT]
    if not state.draining:
        timeout = state.config.drain_timeout_s if deadline_s is None else deadline_s
        state.draining = True
        state.drain_deadline_s = state.clock() + timeout
        log.info("draining: %d in flight, deadline in %.1fs", len(state.in_flight), timeout)
        state.drain_task = asyncio.get_running_loop().create_task(_drain(app))
    return schemas.DrainStatus(
        draining=True,
        deadline_s=max(0.0, state.drain_deadline_s - state.clock()),
        in_flight=len(state.in_flight),
    )


async def _drain(app: web.Application) -> None:
    state = app[AGENT]
    while state.in_flight and state.clock() < state.drain_deadline_s:
        await asyncio.sleep(DRAIN_POLL_S)
    if state.in_flight:
        log.warning("drain deadline passed: aborting %d requests", len(state.in_flight))
        for handle in list(state.in_flight.values()):
            handle.abort()
        grace_end = state.clock() + ABORT_GRACE_S
        while state.in_flight and state.clock() < grace_end:
            await asyncio.sleep(DRAIN_POLL_S)
    log.info("drained")
    app[DRAINED].set()


async def admin_drain(request: web.Request) -> web.Response:
    state = request.app[AGENT]
    if state.fleet_token is None:
        raise APIError(
            403,
            "admin routes are disabled: the node has no fleet token (fleet_token_env)",
            code="admin_disabled",
            reason="forbidden",
        )
    if not token_matches(bearer_token(request.headers), state.fleet_token):
        raise APIError(401, "invalid fleet token", code="invalid_api_key", reason="auth")
    deadline_s = None
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            data = _parse_json(raw)
            body = _validate(schemas.DrainRequest, data)
            deadline_s = body.deadline_s
    status = begin_drain(request.app, deadline_s)
    return web.json_response(status.model_dump(), status=202)


# --------------------------------------------------------------------------------------------
# Small routes


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[AGENT]
    backend = state.backend
    if state.draining:
        body = {"status": "draining", "detail": "the node is draining"}
        return web.json_response(body, status=503)
    if backend.load_error is not None:
        return web.json_response({"status": "failed", "detail": backend.load_error}, status=503)
    if not backend.ready:
        return web.json_response(
            {"status": "loading", "detail": "the model is loading"},
            status=503,
            headers={"Retry-After": str(LOADING_RETRY_AFTER_S)},
        )
    return web.json_response({"status": "ready", "detail": None})


async def metrics_endpoint(request: web.Request) -> web.Response:
    registry = request.app[AGENT].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def openapi_document(request: web.Request) -> web.Response:
    from runtime.agent.openapi import render_openapi

    return web.Response(text=render_openapi(), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    state = request.app[AGENT]
    tenant = _authenticate(request)
    config = state.config
    cards = []
    if tenant.may_use_model(config.model) and tenant.may_use_pool(config.pool):
        backend = state.backend
        cards.append(
            schemas.ModelCard(
                id=config.model,
                created=int(state.usage.started_at),
                owned_by="fleetform",
                variant=config.variant,
                pool=config.pool,
                max_model_len=backend.max_model_len if backend.ready else None,
            )
        )
    return web.json_response(schemas.ModelList(data=cards).model_dump())


async def tenant_usage(request: web.Request) -> web.Response:
    state = request.app[AGENT]
    tenant = _authenticate(request)
    used = state.usage.of(tenant.name)
    report = schemas.UsageReport(
        tenant=tenant.name,
        node_id=state.config.node_id,
        pool=state.config.pool,
        since=int(state.usage.started_at),
        requests=used.requests,
        prompt_tokens=used.prompt_tokens,
        completion_tokens=used.completion_tokens,
        total_tokens=used.prompt_tokens + used.completion_tokens,
        accelerator_seconds=used.accelerator_seconds,
        usd=used.usd,
        quota=schemas.TenantQuotaState(**state.quotas.snapshot(tenant.name)),  # type: ignore[arg-type]
    )
    return web.json_response(report.model_dump())


# --------------------------------------------------------------------------------------------
# Inference


@dataclass
class _Admitted:
    """A request that passed every check and holds quota."""

    request_id: str
    kind: Kind
    tenant: TenantConfig
    model: str
    slo: SloClassSpec
    stream: bool
    include_usage: bool
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    ticket: QuotaTicket


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completion")


async def _serve(request: web.Request, kind: Kind) -> web.StreamResponse:
    arrival = time.monotonic()
    state = request.app[AGENT]
    admitted = await _admit(request, state, kind, arrival)
    generation = GenerationRequest(
        request_id=admitted.request_id,
        prompt_token_ids=admitted.prompt_ids,
        params=admitted.params,
        priority=admitted.slo.priority,
        arrival=arrival,
        deadline=arrival + admitted.slo.ttft_ms / 1000.0,
    )
    try:
        handle = state.backend.submit(generation, _on_done(state, admitted))
    except ValueError as error:
        state.quotas.release(admitted.ticket, 0)
        param, _, why = str(error).partition(": ")
        param = {"prompt_token_ids": _prompt_param(kind)}.get(param, param)
        raise APIError(
            400,
            f"{param}: {why}" if why else str(error),
            param=param or None,
            code="invalid_value",
            reason="bad_request",
        ) from None
    except BackendError as error:
        state.quotas.release(admitted.ticket, 0)
        raise APIError(
            503, str(error), code="unavailable", retry_after=LOADING_RETRY_AFTER_S, reason="loading"
        ) from None
    state.in_flight[admitted.request_id] = handle
    headers = {
        "X-Request-Id": admitted.request_id,
        EFFECTIVE_PRIORITY_HEADER: admitted.slo.name,
    }
    watcher = asyncio.get_running_loop().create_task(_abort_on_disconnect(request, handle))
    try:
        if admitted.stream:
            return await _stream(request, admitted, handle, headers)
        return await _collect(admitted, handle, headers, state)
    finally:
        watcher.cancel()
        handle.abort()  # no-op if it finished; stops generation if the handler is leaving early


def _prompt_param(kind: Kind) -> str:
    return "messages" if kind == "chat" else "prompt"


async def _abort_on_disconnect(request: web.Request, handle: GenerationHandle) -> None:
    """Abort the sequence when the client's connection closes (polled: aiohttp does not tell
    a handler that is waiting on something else)."""
    while not handle.finished:
        transport = request.transport
        if transport is None or transport.is_closing():
            log.info("client disconnected: aborting %s", handle.request_id)
            handle.abort()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _on_done(state: AgentState, admitted: _Admitted) -> Callable[[GenerationResult], None]:
    price_per_s = state.config.price_usd_per_hour / 3600.0

    def done(result: GenerationResult) -> None:
        state.in_flight.pop(result.request_id, None)
        state.quotas.release(admitted.ticket, result.prompt_tokens + result.completion_tokens)
        tenant, slo_class = admitted.tenant.name, admitted.slo.name
        usd = result.accelerator_seconds * price_per_s
        state.usage.record(
            tenant, result.prompt_tokens, result.completion_tokens, result.accelerator_seconds, usd
        )
        m = state.metrics
        m.prompt_tokens.labels(tenant).inc(result.prompt_tokens)
        m.completion_tokens.labels(tenant).inc(result.completion_tokens)
        m.accelerator_seconds.labels(tenant).inc(result.accelerator_seconds)
        m.cost_usd.labels(tenant).inc(usd)
        m.requests.labels(tenant, slo_class, result.finish_reason).inc()
        if result.queue_s is not None:
            m.queue_time.labels(slo_class).observe(result.queue_s)
        if result.ttft_s is not None:
            m.ttft.labels(slo_class).observe(result.ttft_s)
        for gap in result.inter_token_s:
            m.inter_token.labels(slo_class).observe(gap)
        if result.finish_reason != "abort":  # aborted requests would distort the latency picture
            m.e2e.labels(slo_class).observe(result.e2e_s)

    return done


def _authenticate(request: web.Request) -> TenantConfig:
    tenant = request.app[AGENT].tenants.tenant_for_key(bearer_token(request.headers))
    if tenant is None:
        raise APIError(
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            reason="auth",
        )
    return tenant


def _parse_json(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON/UTF-8, absurd numbers, absurd nesting
        raise APIError(
            400,
            "We could not parse the JSON body of your request: it must be valid JSON",
            code="invalid_json",
            reason="bad_request",
        ) from None
    if _has_lone_surrogate(data):
        # JSON may escape half of a UTF-16 pair ("\ud800"); such text cannot be encoded, so
        # tokenizers and logs would fail on it later.
        raise APIError(
            400,
            "The JSON body contains an invalid Unicode escape (an unpaired surrogate)",
            code="invalid_unicode",
            reason="bad_request",
        )
    return data


def _has_lone_surrogate(data: Any) -> bool:
    stack = [data]  # iterative: the body may nest as deep as the JSON parser allowed
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _validate(model: type[_Model], data: Any) -> _Model:
    if not isinstance(data, dict):
        raise APIError(
            400, "The request body must be a JSON object", code="invalid_json", reason="bad_request"
        )
    try:
        return model.model_validate(data)
    except ValidationError as error:
        param, message, code = param_from_validation_error(error, data)
        raise APIError(400, message, param=param, code=code, reason="bad_request") from None


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code, reason="bad_request")


async def _admit(request: web.Request, state: AgentState, kind: Kind, arrival: float) -> _Admitted:
    config = state.config
    tenant = _authenticate(request)
    if not tenant.may_use_pool(config.pool):
        raise APIError(
            403,
            f"tenant {tenant.name!r} may not use pool {config.pool!r}",
            code="pool_not_allowed",
            reason="forbidden",
        )
    data = _parse_json(await request.read())
    body: schemas.ChatCompletionRequest | schemas.CompletionRequest
    if kind == "chat":
        body = _validate(schemas.ChatCompletionRequest, data)
    else:
        body = _validate(schemas.CompletionRequest, data)
    unsupported = schemas.unsupported_parameter(body)
    if unsupported is not None:
        param, message = unsupported
        raise _bad(param, message, code="unsupported_parameter")
    if body.model != config.model:
        raise APIError(
            404,
            f"The model `{body.model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
            reason="not_found",
        )
    if not tenant.may_use_model(config.model):
        raise APIError(
            403,
            f"tenant {tenant.name!r} may not use model {config.model!r}",
            param="model",
            code="model_not_allowed",
            reason="forbidden",
        )
    backend = state.backend
    if state.draining:
        raise APIError(
            503,
            "the node is draining; retry on another node",
            code="draining",
            retry_after=DRAINING_RETRY_AFTER_S,
            reason="draining",
        )
    if not backend.ready:
        detail = backend.load_error or "the model is loading"
        raise APIError(
            503,
            f"{detail}; retry shortly",
            code="model_loading",
            retry_after=LOADING_RETRY_AFTER_S,
            reason="loading",
        )

    prompt_ids = await _tokenize(backend, body)
    params = _sampling_params(config, backend, body, len(prompt_ids), kind)

    try:
        resolution = resolve_priority(
            request.headers.get(PRIORITY_HEADER),
            tenant.default_priority,
            tenant.max_priority,
            state.classes,
        )
    except UnknownPriorityClassError as error:
        raise APIError(
            400,
            f"{PRIORITY_HEADER}: {error}",
            param=PRIORITY_HEADER,
            code="unknown_priority_class",
            reason="bad_request",
        ) from None
    slo = resolution.slo_class

    throughput = backend.throughput()
    load = LoadState(
        prefill_tokens_per_s=throughput.prefill_tokens_per_s
        or config.admission.prior_prefill_tokens_per_s,
        decode_step_s=throughput.decode_step_s or config.admission.prior_decode_step_s,
        items=backend.work_items(),
        max_num_seqs=backend.max_num_seqs,
        max_waiting=config.admission.max_waiting_requests,
    )
    shed = decide_shedding(load, len(prompt_ids), slo)
    if shed.shed:
        if shed.reason == "overload":
            state.metrics.shed.labels(slo.name).inc()
        raise APIError(
            503, shed.message, code=shed.reason, retry_after=shed.retry_after_s, reason=shed.reason
        )

    decision = state.quotas.admit(tenant.name, len(prompt_ids) + params.max_tokens)
    if not decision.allowed:
        assert decision.limit is not None
        raise APIError(
            429,
            decision.message,
            code="rate_limit_exceeded",
            retry_after=max(1, math.ceil(decision.retry_after_s)),
            reason=f"quota_{decision.limit}",
        )
    assert decision.ticket is not None
    stream = body.stream
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return _Admitted(
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        kind=kind,
        tenant=tenant,
        model=config.model,
        slo=slo,
        stream=stream,
        include_usage=bool(stream and body.stream_options and body.stream_options.include_usage),
        prompt_ids=prompt_ids,
        params=params,
        arrival=arrival,
        ticket=decision.ticket,
    )


async def _tokenize(
    backend: ServingBackend, body: schemas.ChatCompletionRequest | schemas.CompletionRequest
) -> list[int]:
    """Prompt token ids (tokenising off the event loop: a long prompt takes milliseconds)."""
    loop = asyncio.get_running_loop()
    if isinstance(body, schemas.ChatCompletionRequest):
        # The template knows system/user/assistant; 'developer' is OpenAI's new name for system.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]

        def render_and_encode() -> list[int]:
            return backend.encode(backend.render_chat(messages))

        try:
            ids = await loop.run_in_executor(None, render_and_encode)
        except (ValueError, TypeError) as error:  # the chat template refused the conversation
            raise _bad("messages", str(error)) from None
        return ids
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "must not be empty")
        try:
            ids = await loop.run_in_executor(None, backend.encode, prompt)
        except (ValueError, TypeError) as error:  # text the tokenizer cannot take
            raise _bad("prompt", str(error)) from None
    else:
        ids = list(prompt)  # type: ignore[arg-type]
        vocab = backend.vocab_size
        if vocab is not None and any(t >= vocab for t in ids):
            raise _bad("prompt", f"token ids must be in [0, {vocab})")
    if not ids:
        raise _bad("prompt", "must not be empty")
    return ids


def _sampling_params(
    config: NodeConfig,
    backend: ServingBackend,
    body: schemas.ChatCompletionRequest | schemas.CompletionRequest,
    prompt_tokens: int,
    kind: Kind,
) -> SamplingParams:
    context = backend.max_model_len
    prompt_param = _prompt_param(kind)
    if prompt_tokens >= context:
        raise APIError(
            400,
            f"{prompt_param}: this model's maximum context length is {context} tokens and the "
            f"prompt has {prompt_tokens} tokens (at least one token must be left to generate)",
            param=prompt_param,
            code="context_length_exceeded",
            reason="bad_request",
        )
    room = context - prompt_tokens
    max_param, max_tokens = "max_tokens", body.max_tokens
    if isinstance(body, schemas.ChatCompletionRequest) and body.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != body.max_completion_tokens:
            raise _bad("max_tokens", "conflicts with max_completion_tokens; give one of them")
        max_param, max_tokens = "max_completion_tokens", body.max_completion_tokens
    if max_tokens is None:
        default = config.default_max_tokens if kind == "chat" else COMPLETIONS_DEFAULT_MAX_TOKENS
        max_tokens = min(default, room)
    elif max_tokens > room:
        raise APIError(
            400,
            f"{max_param}: {max_tokens} is too large: the prompt has {prompt_tokens} tokens, the "
            f"context length is {context}, so at most {room} tokens can be generated",
            param=max_param,
            code="context_length_exceeded",
            reason="bad_request",
        )
    logit_bias: dict[int, float] = {}
    vocab = backend.vocab_size
    for key, bias in (body.logit_bias or {}).items():
        token = int(key)
        if vocab is not None and token >= vocab:
            raise _bad("logit_bias", f"token id {token} is not in [0, {vocab})")
        logit_bias[token] = bias
    stop = body.stop
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=top_k,
            seed=body.seed,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            ignore_eos=body.ignore_eos,
            logit_bias=logit_bias,
        )
    except ValueError as error:  # SamplingParams names the field first: "top_p: ..."
        param = str(error).partition(":")[0]
        raise APIError(
            400, str(error), param=param, code="invalid_value", reason="bad_request"
        ) from None


# --------------------------------------------------------------------------------------------
# Responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _aborted_error(state: AgentState) -> APIError:
    if state.draining:
        return APIError(
            503,
            "the request was aborted: the node is shutting down",
            code="draining",
            retry_after=DRAINING_RETRY_AFTER_S,
        )
    return APIError(
        503, "the request was aborted", code="aborted", retry_after=DRAINING_RETRY_AFTER_S
    )


async def _collect(
    admitted: _Admitted,
    handle: GenerationHandle,
    headers: dict[str, str],
    state: AgentState,
) -> web.Response:
    pieces: list[str] = []
    last = None
    try:
        async for chunk in handle:
            pieces.append(chunk.text)
            last = chunk
    except BackendError as error:
        raise APIError(
            503,
            f"generation failed: {error}",
            code="engine_error",
            retry_after=DRAINING_RETRY_AFTER_S,
        ) from None
    if last is None or last.finish_reason == "abort":
        raise _aborted_error(state)
    text = "".join(pieces)
    common = {
        "id": admitted.request_id,
        "created": int(time.time()),
        "model": admitted.model,
        "system_fingerprint": None,
        "usage": _usage(last.prompt_tokens, last.completion_tokens),
    }
    if admitted.kind == "chat":
        body = {
            **common,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": last.finish_reason,
                    "logprobs": None,
                }
            ],
        }
    else:
        body = {
            **common,
            "object": "text_completion",
            "choices": [
                {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}
            ],
        }
    return web.json_response(body, headers=headers)


class _SSE:
    """Builds the server-sent events of one streaming response."""

    def __init__(self, admitted: _Admitted) -> None:
        self.admitted = admitted
        self.created = int(time.time())
        self.chat = admitted.kind == "chat"

    def _frame(self, payload: Mapping[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"

    def _chunk(
        self,
        choices: list[dict[str, Any]],
        usage: dict[str, int] | None = None,
        final_usage: bool = False,
    ) -> bytes:
        payload: dict[str, Any] = {
            "id": self.admitted.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.admitted.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.admitted.include_usage:
            payload["usage"] = usage if final_usage else None
        return self._frame(payload)

    def _choice(
        self, text: str | None, finish_reason: str | None, role: bool = False
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, str] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def opening(self) -> bytes | None:
        return self._chunk([self._choice("", None, role=True)]) if self.chat else None

    def text(self, text: str) -> bytes:
        return self._chunk([self._choice(text, None)])

    def finish(self, reason: str) -> bytes:
        return self._chunk([self._choice(None if self.chat else "", reason)])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._chunk([], _usage(prompt_tokens, completion_tokens), final_usage=True)

    def error(self, error: APIError) -> bytes:
        return self._frame(error.body())

    done = b"data: [DONE]\n\n"


async def _stream(
    request: web.Request,
    admitted: _Admitted,
    handle: GenerationHandle,
    headers: dict[str, str],
) -> web.StreamResponse:
    state = request.app[AGENT]
    response = web.StreamResponse(
        headers={
            **headers,
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # keep reverse proxies from batching the events
        }
    )
    await response.prepare(request)
    sse = _SSE(admitted)
    try:
        opening = sse.opening()
        if opening is not None:
            await response.write(opening)
        async for chunk in handle:
            if chunk.finished and chunk.finish_reason == "abort":
                await response.write(sse.error(_aborted_error(state)))
                break
            if chunk.text:
                await response.write(sse.text(chunk.text))
            if chunk.finished:
                await response.write(sse.finish(chunk.finish_reason or "stop"))
                if admitted.include_usage:
                    await response.write(sse.usage(chunk.prompt_tokens, chunk.completion_tokens))
        await response.write(sse.done)
        await response.write_eof()
    except ConnectionResetError:
        log.info("client went away during %s", admitted.request_id)
    except BackendError as error:
        failure = APIError(503, f"generation failed: {error}", code="engine_error")
        with contextlib.suppress(ConnectionResetError):
            await response.write(sse.error(failure))
            await response.write(sse.done)
    except Exception:
        # Headers are sent: the middleware cannot answer 500 any more, so say it in-band.
        log.exception("streaming %s failed", admitted.request_id)
        failure = APIError(500, "Internal server error", code="internal_error")
        with contextlib.suppress(ConnectionResetError):
            await response.write(sse.error(failure))
    return response
