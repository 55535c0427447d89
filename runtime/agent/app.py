"""The agent's aiohttp application: routes, request handling, admission, streaming, drain.

This module owns the HTTP surface of a node (see ``runtime/agent/openapi.json``): OpenAI-style
chat and text completions (streaming over SSE or not), the model list, the caller's usage,
health, readiness, Prometheus metrics, the OpenAPI document and the drain route.

One inference request goes: a forwarded request's hop is checked (401 without the fleet
token) -> authenticate (401) -> tenant may use this pool (403) -> parse and validate the body
(400) -> model (404 unknown, 403 not allowed) -> node accepting (503 draining) -> the model's
backend from the :class:`.models.ModelManager` (a model that is not loaded is loaded first while
the request waits, which its TTFT includes; 503 while the node boots, when the model is being
unloaded, when its load failed or when the memory budget is held by busy models) -> tokenise
and check the context length (400) -> priority class -> fleet routing (503 when shed or
no instance can take it) -> overload shedding if served here (503) -> fleet budget and quota
(429; not for a forwarded request, which its origin charged) -> submit to the serving backend
and stream or collect the outputs, or forward it to the chosen peer (:mod:`.forward`). When a
request served here ends for any reason the backend calls back with its final accounting: the
quota is corrected, usage and cost are recorded (and queued for the controller), latencies
observed. A client that disconnects gets its sequence aborted (a watcher polls the connection; a
failed write or a cancelled handler does the same).

In a fleet (``controller_url`` set) the app owns a :class:`.push.MetricsPusher`, started once
the agent knows the URL it is reachable at (:func:`advertise`), whose replies a
:class:`.fleet.FleetLink` applies (leases, budgets, the fleet view), and an HTTP client session
for forwards.
Routing: the router (:func:`runtime.routing.route`) sees the controller's last fleet view with
this node's live snapshot in it. The chosen peer gets the request over HTTP; if it fails before
the first token it is marked failed and the request is routed once more without it (to the next
peer, or here). Without a controller, or before its first reply, every request is served here.
A fleet whose monthly budget is spent refuses client requests with 429 ``insufficient_quota``
(OpenAI's code for a spent billing quota): the condition is not transient overload, retrying
elsewhere cannot help, and it clears only when the budget is raised or the month turns.

Models: a node serves its primary model (``config.model``) and, when ``config.models`` lists
more, those too, each loaded on demand under ``config.memory_budget_bytes``
(:mod:`.models`). Admin routes with the fleet token list them (``GET /admin/models``), load and
unload them (``POST /admin/models/{name}/load|unload``; an unload waits for the model's in-flight
requests). Only requests for the primary model are routed through the fleet: the controller's
view knows each node by its primary model, so a request for another slot is served here.

Rollouts (``runtime.rollout``): when the controller's reply names a rollout for the model, the
router gets the request's version, ``choose_version(request_id, split)``, with the stable variant
as fallback (``RouteRequest.version`` / ``fallback_version``), and a forward tells the peer the
variant chosen (``X-Fleetform-Version``, see :mod:`.forward`). Every response says which variant
served it in that header. Each request served here is tallied under its model and variant
(:class:`.metrics.VersionTally`: finished, server-side errors, TTFT and TPOT samples, the same
figures the per-class counters take) and pushed for the models under a rollout. Under a shadow
rollout a ``shadow_sample`` of client requests is copied, once the client's request has ended
well, to an instance serving the candidate (``X-Fleetform-Shadow: 1``, never streamed); the
copy's output is compared with the one served (``compare_outputs`` over both outputs tokenised
by the model's tokenizer) and the comparison is pushed to the controller. Copies run in
background tasks, at most ``MAX_SHADOW_IN_FLIGHT`` at once (more are skipped and counted), after
the client's answer, so they never delay or fail it; shutdown cancels and awaits them. The node
serving a copy bills nobody for it.

Drain (SIGTERM in ``fleetform agent``, or ``POST /admin/drain`` with the fleet token, e.g. on a
spot interruption notice): ``/readyz`` turns 503 and the node reports itself unhealthy to the
fleet, new inference requests get 503 + Retry-After, in-flight ones (forwards to peers included)
may finish until the deadline and are then aborted, and ``DRAINED`` is set so the process can
exit. With ``spot_notices`` set, a :class:`.spot.SpotWatcher` polls the instance metadata and
starts the drain itself, with a deadline that ends before the instance is reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import aiohttp
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
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    ServingBackend,
    backend_for_engine,
    make_backend,
)
from runtime.agent.config import ModelSlot, NodeConfig, TenantConfig
from runtime.agent.errors import APIError, make_error_middleware, param_from_validation_error
from runtime.agent.fleet import (
    FleetLink,
    RecentUseMeter,
    instance_snapshot,
    routing_policy,
    serving_load,
)
from runtime.agent.forward import (
    SERVED_BY_HEADER,
    VERSION_HEADER,
    Hop,
    PeerFailed,
    PeerStreamBroken,
    answer_text,
    event_text,
    forward_headers,
    hop_from_headers,
    open_stream,
    post_whole,
    usage_comment,
)
from runtime.agent.metrics import (
    AgentMetrics,
    ServedTally,
    UsageLedger,
    VersionTally,
    mean_tpot_s,
)
from runtime.agent.models import BackendFactory, ModelLease, ModelManager, ModelUnavailable
from runtime.agent.push import MetricsPusher, pusher_for_node
from runtime.agent.spot import SpotNotice, SpotWatcher
from runtime.engine.base import SamplingParams
from runtime.protocol import (
    InstanceSnapshot,
    PushReply,
    RolloutDirective,
    ServingLoad,
    ShadowReport,
)
from runtime.quota import QuotaBook, QuotaTicket
from runtime.rollout import choose_version, compare_outputs, shadow_sample
from runtime.routing import RouteDecision, RouteOutcome, RouteRequest, RoutingPolicy, route
from runtime.spec import SloClassSpec

__all__ = ["AGENT", "DRAINED", "AgentState", "advertise", "begin_drain", "init"]

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
BUDGET_RETRY_AFTER_S = 60  # a spent fleet budget is re-judged at the controller's next reply
UNROUTABLE_RETRY_AFTER_S = 5
PEERS_FAILED_RETRY_AFTER_S = 1
# Shadow copies (rollouts) in flight from this origin at once; more are skipped, never queued:
# a copy is evidence, not work anyone waits for.
MAX_SHADOW_IN_FLIGHT = 4


@dataclass
class AgentState:
    """Everything the handlers share (one per application)."""

    config: NodeConfig
    models: ModelManager  # the node's model slots; each request gets its model's backend here
    tenants: TenantDirectory
    quotas: QuotaBook
    metrics: AgentMetrics
    usage: UsageLedger
    classes: dict[str, SloClassSpec]
    fleet_token: str | None
    clock: Callable[[], float]
    policy: RoutingPolicy
    recent_use: RecentUseMeter
    fleet: FleetLink | None = None  # None: no controller, every request is served here
    pusher: MetricsPusher | None = None
    spot: SpotWatcher | None = None  # polls for spot interruption notices (spot_notices)
    advertised_url: str | None = None  # where peers reach this agent, once bound
    advertised: asyncio.Event = field(default_factory=asyncio.Event)
    peer_session: aiohttp.ClientSession | None = None
    draining: bool = False
    drain_deadline_s: float = 0.0
    drain_task: asyncio.Task[None] | None = None
    in_flight: dict[str, GenerationHandle] = field(default_factory=dict)
    served: ServedTally = field(default_factory=ServedTally)  # per class, for the autoscaler
    versions: VersionTally = field(default_factory=VersionTally)  # per variant, for rollouts
    forwards: dict[str, asyncio.Task[Any]] = field(default_factory=dict)  # requests at peers
    shadows: set[asyncio.Task[None]] = field(default_factory=set)  # shadow copies in flight
    closing: bool = False  # shutting down: no new shadow copies

    @property
    def busy(self) -> bool:
        return bool(self.in_flight or self.forwards)

    @property
    def backend(self) -> ServingBackend:
        """The primary model's backend (what a single-model node serves with); while it is not
        loaded, a stand-in that is not ready (:class:`.models.UnloadedBackend`)."""
        return self.models.primary_backend


AGENT = web.AppKey("agent", AgentState)
DRAINED = web.AppKey("drained", asyncio.Event)


def init(
    config: NodeConfig,
    *,
    backend: ServingBackend | None = None,
    backend_factory: BackendFactory | None = None,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The agent application for ``config``.

    ``backend`` is the primary model's backend for its load at startup, by default what
    ``config.engine`` describes (:func:`make_backend`); ``backend_factory`` builds the backend of
    a model slot for each later load (default: from the slot's engine settings); ``environ``
    is where the fleet token and an upstream's API key are read (default ``os.environ``);
    ``clock`` drives quota buckets, lease expiry and the drain deadline. Raises
    :class:`runtime.agent.config.NodeConfigError` for a ``controller_url`` without a fleet token.
    """
    if backend is None:
        backend = make_backend(config, environ=environ)
    alpha = config.admission.throughput_ewma_alpha

    def default_factory(slot: ModelSlot) -> ServingBackend:
        return backend_for_engine(slot.engine, environ=environ, ewma_alpha=alpha)

    metrics = AgentMetrics(config.node_id, config.pool, config.model)
    models = ModelManager(
        config.model_slots(),
        budget_bytes=config.memory_budget_bytes,
        backend_factory=backend_factory or default_factory,
        metrics=metrics,
        initial_backend=backend,
    )
    state = AgentState(
        config=config,
        models=models,
        tenants=TenantDirectory(config.tenants),
        quotas=QuotaBook.from_specs({t.name: t.quotas for t in config.tenants}, clock),
        metrics=metrics,
        usage=UsageLedger(),
        classes={c.name: c for c in config.slo_classes},
        fleet_token=config.fleet_token(environ),
        clock=clock,
        policy=routing_policy(config),
        recent_use=RecentUseMeter(clock),
    )
    if config.controller_url is not None:
        fleet = FleetLink(config, state.quotas, clock)
        state.fleet = fleet

        def push_snapshot() -> InstanceSnapshot:
            fleet.push_built()
            return _live_snapshot(state)

        def version_stats() -> list[Any]:
            # Only the models under a rollout: the controller asked for nothing else, and a
            # controller that predates rollouts never names one (so never gets the field).
            return state.versions.report(fleet.rollouts)

        state.pusher = pusher_for_node(
            config,
            snapshot=push_snapshot,
            recent_use=state.recent_use.report,
            on_reply=lambda reply: _apply_reply(state, fleet, reply),
            versions=version_stats,
            environ=environ,
            interval_s=config.push_interval_s,
        )
    if config.advertise_url is not None:
        state.advertised_url = config.advertise_url.rstrip("/")
        state.advertised.set()
    metrics.bind_gauges(
        stats=models.stats,
        in_flight=lambda: len(state.in_flight),
        ready=lambda: models.readiness()[0] == "ready" and not state.draining,
        draining=lambda: state.draining,
    )
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[make_error_middleware(lambda r: metrics.rejected.labels(r).inc())],
    )
    app[AGENT] = state
    app[DRAINED] = asyncio.Event()
    # Before the backend's: cleanup runs in reverse, so the last usage of requests aborted at
    # shutdown is recorded before the pusher's final flush.
    app.cleanup_ctx.append(_fleet_lifecycle)
    app.cleanup_ctx.append(_backend_lifecycle)
    if config.spot_notices is not None:

        def drain_for_notice(notice: SpotNotice) -> None:
            begin_drain(app, notice.drain_deadline_s)
            # A drain begun earlier (SIGTERM, /admin/drain) may end after the reclaim: bring its
            # deadline forward.
            state.drain_deadline_s = min(
                state.drain_deadline_s, state.clock() + notice.drain_deadline_s
            )

        state.spot = SpotWatcher(
            config.spot_notices,
            on_notice=drain_for_notice,
            drained=app[DRAINED],  # Azure's event is acknowledged once the drain is over
            metadata_url=config.metadata_url,
            poll_interval_s=config.spot_poll_interval_s,
            max_drain_s=config.drain_timeout_s,
        )
        app.cleanup_ctx.append(state.spot.lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/usage", tenant_usage)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_post("/admin/drain", admin_drain)
    app.router.add_get("/admin/models", admin_list_models)
    app.router.add_post("/admin/models/{name}/load", admin_load_model)
    app.router.add_post("/admin/models/{name}/unload", admin_unload_model)
    return app


def advertise(app: web.Application, port: int) -> str:
    """Tell the app the port it was bound to; returns the URL it advertises to peers.

    The metrics pusher starts only then, so a node configured with port 0 never advertises a
    port nobody listens on. ``advertise_url`` in the config, when set, wins.
    """
    state = app[AGENT]
    if state.advertised_url is None:
        host = state.config.host
        if host in ("0.0.0.0", "::", ""):  # a wildcard is no address to reach the node at
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        state.advertised_url = f"http://{host}:{port}"
    state.advertised.set()
    return state.advertised_url


async def _fleet_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """In a fleet: the session for forwards, and the pusher (from when the node is advertised)
    until shutdown, when it delivers the usage not yet acknowledged."""
    state = app[AGENT]
    if state.fleet is None:
        yield
        return
    state.peer_session = aiohttp.ClientSession()
    pusher = state.pusher
    assert pusher is not None

    async def start_when_advertised() -> None:
        await state.advertised.wait()
        pusher.start()

    starter = asyncio.get_running_loop().create_task(start_when_advertised())
    try:
        yield
    finally:
        starter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starter
        # Shadow copies are evidence nobody waits for: cancelled, not drained.
        state.closing = True
        shadows = list(state.shadows)
        for task in shadows:
            task.cancel()
        for task in shadows:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await pusher.stop()
        await state.peer_session.close()


def _apply_reply(state: AgentState, fleet: FleetLink, reply: PushReply) -> None:
    """The controller's reply: the fleet's state, then its placement orders for this node."""
    fleet.apply_reply(reply)
    if state.closing or state.draining:
        return
    for order in reply.placement:
        state.models.order(
            order.action, order.model, reason=order.reason, deadline_s=state.config.drain_timeout_s
        )


def _live_snapshot(state: AgentState) -> InstanceSnapshot:
    backend = state.backend  # the primary model's: the router routes this node on it
    snapshot = instance_snapshot(
        state.config,
        state.advertised_url or f"http://{state.config.host}:{state.config.port}",
        healthy=state.models.readiness()[0] == "ready" and not state.draining,
        stats=backend.stats(),
        throughput=backend.throughput(),
        items=backend.work_items(),
        served=state.served,
        max_batch=backend.max_num_seqs,
    )
    if not state.models.multi:
        return snapshot

    def load_of(backend: ServingBackend) -> ServingLoad:
        items = backend.work_items()
        return serving_load(backend.stats(), backend.throughput(), items, backend.max_num_seqs)

    return snapshot.model_copy(update={"models": state.models.loaded_models(load_of)})


async def _backend_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start loading the model(s) in the background; on shutdown stop the drain and the
    engines."""
    state = app[AGENT]
    await state.models.start()
    yield
    if state.drain_task is not None and not state.drain_task.done():
        state.drain_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state.drain_task
    for handle in list(state.in_flight.values()):
        handle.abort()
    await state.models.close()


# --------------------------------------------------------------------------------------------
# Drain


def begin_drain(app: web.Application, deadline_s: float | None = None) -> schemas.DrainStatus:
    """Start draining (idempotent: a second call keeps the first deadline)."""
    state = app[AGENT]
    if not state.draining:
        timeout = state.config.drain_timeout_s if deadline_s is None else deadline_s
        state.draining = True
        state.drain_deadline_s = state.clock() + timeout
        busy = len(state.in_flight) + len(state.forwards)
        log.info("draining: %d in flight, deadline in %.1fs", busy, timeout)
        state.drain_task = asyncio.get_running_loop().create_task(_drain(app))
    return schemas.DrainStatus(
        draining=True,
        deadline_s=max(0.0, state.drain_deadline_s - state.clock()),
        in_flight=len(state.in_flight) + len(state.forwards),
    )


async def _drain(app: web.Application) -> None:
    state = app[AGENT]
    while state.busy and state.clock() < state.drain_deadline_s:
        await asyncio.sleep(DRAIN_POLL_S)
    if state.busy:
        aborted = len(state.in_flight) + len(state.forwards)
        log.warning("drain deadline passed: aborting %d requests", aborted)
        for handle in list(state.in_flight.values()):
            handle.abort()
        for task in list(state.forwards.values()):
            task.cancel()  # closes the connection to the peer, which aborts there
        grace_end = state.clock() + ABORT_GRACE_S
        while state.busy and state.clock() < grace_end:
            await asyncio.sleep(DRAIN_POLL_S)
    log.info("drained")
    app[DRAINED].set()


def _require_fleet_token(request: web.Request) -> AgentState:
    """The admin routes' check: 403 without a fleet token configured, 401 for a wrong one
    (compared in constant time)."""
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
    return state


async def _deadline_body(request: web.Request) -> float | None:
    """``deadline_s`` of an optional DrainRequest body."""
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            data = _parse_json(raw)
            return _validate(schemas.DrainRequest, data).deadline_s
    return None


async def admin_drain(request: web.Request) -> web.Response:
    _require_fleet_token(request)
    deadline_s = await _deadline_body(request)
    status = begin_drain(request.app, deadline_s)
    return web.json_response(status.model_dump(), status=202)


# --------------------------------------------------------------------------------------------
# Model slots (admin)


def _model_unavailable(error: ModelUnavailable) -> APIError:
    return APIError(
        error.status,
        error.message,
        code=error.code,
        retry_after=error.retry_after,
        reason=error.reason,
    )


def _slot_name(request: web.Request, state: AgentState) -> str:
    name = request.match_info["name"]
    if state.models.spec(name) is None:
        known = ", ".join(state.models.names)
        raise APIError(
            404,
            f"name: this node has no model {name!r} (it has: {known})",
            param="name",
            code="model_not_found",
            reason="not_found",
        )
    return name


async def admin_list_models(request: web.Request) -> web.Response:
    state = _require_fleet_token(request)
    return web.json_response(state.models.report().model_dump())


async def admin_load_model(request: web.Request) -> web.Response:
    """Load a model now (waits for the load; 503 if it fails or cannot fit)."""
    state = _require_fleet_token(request)
    name = _slot_name(request, state)
    if state.draining:
        raise APIError(
            503,
            "the node is draining; it loads no models",
            code="draining",
            retry_after=DRAINING_RETRY_AFTER_S,
            reason="draining",
        )
    try:
        await state.models.load(name)
    except ModelUnavailable as error:
        raise _model_unavailable(error) from None
    return web.json_response(state.models.status(name).model_dump())


async def admin_unload_model(request: web.Request) -> web.Response:
    """Unload a model: new requests for it get 503, those in flight finish (until the deadline,
    default ``drain_timeout_s``), then its memory is freed. Answers when it is unloaded."""
    state = _require_fleet_token(request)
    name = _slot_name(request, state)
    deadline_s = await _deadline_body(request)
    timeout = state.config.drain_timeout_s if deadline_s is None else deadline_s
    try:
        await state.models.unload(name, timeout)
    except ModelUnavailable as error:
        raise _model_unavailable(error) from None
    return web.json_response(state.models.status(name).model_dump())


# --------------------------------------------------------------------------------------------
# Small routes


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[AGENT]
    if state.draining:
        body = {"status": "draining", "detail": "the node is draining"}
        return web.json_response(body, status=503)
    # Judged on the primary model: booting, failed, or its backend not ready (an unreachable
    # upstream). Another model loading, or the primary unloaded to make room, is no reason to
    # take the node out of rotation: a request loads what it needs.
    status, detail = state.models.readiness()
    if status == "failed":
        return web.json_response({"status": "failed", "detail": detail}, status=503)
    if status == "loading":
        return web.json_response(
            {"status": "loading", "detail": detail},
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
    # Every model the node can serve, loaded or not (a request loads it).
    for name in state.models.names:
        slot = state.models.spec(name)
        assert slot is not None
        if not (tenant.may_use_model(name) and tenant.may_use_pool(config.pool)):
            continue
        backend = state.models.backend_of(name)
        cards.append(
            schemas.ModelCard(
                id=name,
                created=int(state.usage.started_at),
                owned_by="fleetform",
                variant=slot.variant,
                pool=config.pool,
                max_model_len=backend.max_model_len if backend and backend.ready else None,
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
    """A request that passed every check; ``ticket`` is its quota charge (None until charged,
    and for a forwarded request, whose origin holds the charge)."""

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
    backend: ServingBackend  # of the request's model, held by ``lease`` until the request ends
    lease: ModelLease
    variant: str  # of the model slot serving it here (what a local answer is tallied under)
    hop: Hop | None = None  # how a forwarded request got here; None for a client's request
    ticket: QuotaTicket | None = None
    capture: _Capture | None = None  # the output, kept when a shadow copy will compare with it

    @property
    def shadow(self) -> bool:
        """A shadow copy a peer sent (served, never billed)."""
        return self.hop is not None and self.hop.shadow


@dataclass
class _Capture:
    """The output served to the client, for comparison with its shadow copy."""

    pieces: list[str] = field(default_factory=list)
    variant: str | None = None  # the variant that served it
    finished_at: float | None = None  # monotonic; None until the output is complete

    def restart(self) -> None:
        self.pieces.clear()
        self.variant = None

    def done(self, variant: str | None) -> None:
        self.variant = variant
        self.finished_at = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class _Peer:
    instance_id: str
    url: str
    variant: str | None = None  # the variant the router chose it for


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completion")


async def _serve(request: web.Request, kind: Kind) -> web.StreamResponse:
    arrival = time.monotonic()
    state = request.app[AGENT]
    hop = hop_from_headers(request.headers, state.fleet_token)
    admitted = await _admit(request, state, kind, arrival, hop)
    shadow: RolloutDirective | None = None
    shadow_body = b""
    try:
        peer = _destination(state, admitted, _route(state, admitted))
        if peer is None:
            _shed_if_overloaded(state, admitted)
        admitted = _charge_quota(state, admitted)
        shadow = _shadow_directive(state, admitted)
        if shadow is not None:
            admitted.capture = _Capture()
            shadow_body = await request.read()  # aiohttp keeps the body read at admission
        if peer is None:
            return await _serve_here(request, state, admitted)
        return await _forward(request, state, admitted, peer)
    finally:
        # The response is written (or the handler cancelled): the model is no longer busy with
        # this request, and an unload waiting for it may proceed.
        admitted.lease.release()
        if shadow is not None:
            # Only now, and in the background: the copy never delays or fails this request.
            _start_shadow(request, state, admitted, shadow, shadow_body)


# --------------------------------------------------------------------------------------------
# Routing and forwarding


def _route_request(admitted: _Admitted, **where: Any) -> RouteRequest:
    """What the router needs to know of an admitted request; ``where`` adds hops, exclusions
    and versions."""
    return RouteRequest(
        model=admitted.model,
        slo_class=admitted.slo.name,
        tenant=admitted.tenant.name,
        prompt_tokens=len(admitted.prompt_ids),
        max_tokens=admitted.params.max_tokens,
        request_id=admitted.request_id,
        **where,
    )


def _route(
    state: AgentState, admitted: _Admitted, exclude: frozenset[str] = frozenset()
) -> RouteDecision | None:
    """The fleet router's decision, or None to serve here without asking it: no controller
    view yet, or a forwarded request that has used up the hop limit."""
    hop = admitted.hop
    if state.fleet is None or (hop is not None and hop.hops >= state.policy.hop_limit):
        return None
    if hop is not None and hop.shadow:
        return None  # a shadow copy was sent to this very instance: it is served here
    view = state.fleet.fleet_view(_live_snapshot(state))
    if view is None:
        return None
    version = fallback = None
    directive = state.fleet.rollout(admitted.model)
    if directive is not None:
        fallback = directive.stable
        if hop is not None and hop.version is not None:
            version = hop.version  # the origin chose it; a re-route keeps it
        else:
            # Fixed by the request id: a retry after a failed peer keeps the same version.
            version = choose_version(admitted.request_id, directive.ordered_split())
    request = _route_request(
        admitted,
        hops=hop.hops if hop is not None else 0,
        exclude=(hop.tried if hop is not None else frozenset()) | exclude,
        version=version,
        fallback_version=fallback,
    )
    decision = route(request, view, state.policy)
    log.debug("route %s: %s (%s)", admitted.request_id, decision.outcome, decision.reason)
    return decision


def _destination(
    state: AgentState, admitted: _Admitted, decision: RouteDecision | None
) -> _Peer | None:
    """The peer to forward to, or None to serve here; 503 when the fleet cannot take it."""
    local = state.config.node_id
    if decision is None:
        return None
    if decision.instance_id is None and admitted.hop is not None:
        # Its origin judged it worth serving and chose this node: a peer that sees it
        # differently (a newer view) serves it rather than bouncing it back.
        return None
    target = "local" if decision.instance_id in (None, local) else "peer"
    state.metrics.routed.labels(str(decision.outcome), target).inc()
    if decision.outcome is RouteOutcome.SHED:
        state.metrics.shed.labels(admitted.slo.name).inc()
        raise APIError(
            503,
            f"{decision.reason}; retry later",
            code="overload",
            retry_after=max(1, math.ceil(decision.retry_after_s or 1)),
            reason="shed",
        )
    if decision.instance_id is None:
        raise APIError(
            503,
            f"no instance can serve this request now: {decision.reason}",
            code="unroutable",
            retry_after=UNROUTABLE_RETRY_AFTER_S,
            reason="unroutable",
        )
    if decision.instance_id == local:
        return None
    assert decision.url is not None
    chosen = decision.chosen
    return _Peer(decision.instance_id, decision.url, chosen.variant if chosen else None)


async def _forward(
    request: web.Request, state: AgentState, admitted: _Admitted, peer: _Peer
) -> web.StreamResponse:
    """Forward to ``peer``; if it fails before the first token, route once more without it
    (to another peer, or here). The quota charge is settled when the forward ends."""
    assert state.fleet is not None and state.peer_session is not None
    assert state.fleet_token is not None  # a fleet node has one (checked at init)
    failed: set[str] = set()  # peers that failed this request
    task = asyncio.current_task()
    assert task is not None
    state.forwards[admitted.request_id] = task
    handed_over = False
    try:
        for attempt in (1, 2):
            try:
                return await _forward_once(request, state, admitted, peer, failed)
            except PeerFailed as failure:
                state.fleet.mark_failed(peer.instance_id)
                state.metrics.forward_failures.labels(failure.reason).inc()
                failed.add(peer.instance_id)
                log.warning(
                    "forward of %s to %s failed (%s)%s",
                    admitted.request_id,
                    peer.instance_id,
                    failure,
                    "; trying again" if attempt == 1 else "",
                )
                if attempt == 2:
                    raise APIError(
                        503,
                        f"the peers chosen for this request failed ({failure}); retry",
                        code="peer_unavailable",
                        retry_after=PEERS_FAILED_RETRY_AFTER_S,
                        reason="peer_failed",
                    ) from None
                next_peer = _destination(
                    state, admitted, _route(state, admitted, exclude=frozenset(failed))
                )
                if next_peer is None:
                    handed_over = True  # serving here settles the quota when it ends
                    state.forwards.pop(admitted.request_id, None)  # in_flight tracks it now
                    return await _serve_here(request, state, admitted)
                peer = next_peer
        raise AssertionError("unreachable")
    finally:
        state.forwards.pop(admitted.request_id, None)
        if not handed_over:
            _release_quota(state, admitted, 0)  # no-op once settled with the tokens used


async def _forward_once(
    request: web.Request,
    state: AgentState,
    admitted: _Admitted,
    peer: _Peer,
    failed: set[str],
) -> web.StreamResponse:
    """One attempt; raises :class:`PeerFailed` while nothing has reached the client."""
    assert state.fleet is not None and state.peer_session is not None
    assert state.fleet_token is not None
    routing = state.config.routing
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=routing.forward_connect_timeout_s,
        sock_read=routing.forward_read_timeout_s,
    )
    hops = admitted.hop.hops if admitted.hop is not None else 0
    headers = forward_headers(
        request.headers,
        slo_class=admitted.slo.name,
        hops=hops + 1,
        # The peer must not send it back here, nor to a peer that already failed it.
        tried={*(admitted.hop.tried if admitted.hop else ()), state.config.node_id, *failed},
        fleet_token=state.fleet_token,
        version=peer.variant,
    )
    url = peer.url.rstrip("/") + request.path
    capture = admitted.capture
    if capture is not None:
        capture.restart()  # a retry after a failed peer starts the output afresh
    charged = admitted.ticket.charged_tokens if admitted.ticket is not None else 0
    # Counted before the first await, so that the next request's route already sees it.
    pending = state.fleet.forward_started(
        peer.instance_id, admitted.model, admitted.slo.priority, len(admitted.prompt_ids)
    )
    try:
        body = await request.read()  # aiohttp keeps the body read at admission
        if not admitted.stream:
            answer = await post_whole(state.peer_session, url, body, headers, timeout)
            used = answer.total_tokens
            _release_quota(state, admitted, charged if used is None else used)
            if capture is not None:
                text = answer_text(answer.body)
                if text is not None:
                    capture.pieces.append(text)
                    capture.done(answer.headers.get(VERSION_HEADER, peer.variant))
            return web.Response(
                body=answer.body,
                headers={**answer.headers, "Content-Type": "application/json"},
            )
        async with open_stream(state.peer_session, url, body, headers, timeout) as stream:
            response = web.StreamResponse(headers={**stream.headers, **_SSE_HEADERS})
            await response.prepare(request)
            try:
                async for event in stream.events():
                    if capture is not None:
                        capture.pieces.append(event_text(event))
                    await response.write(event)
                await response.write_eof()
                if capture is not None:
                    capture.done(stream.headers.get(VERSION_HEADER, peer.variant))
            except ConnectionResetError:
                log.info("client went away during forwarded %s", admitted.request_id)
            except PeerStreamBroken as broken:
                log.warning("forwarded stream from %s broke: %s", peer.instance_id, broken)
                failure = APIError(503, f"the serving peer failed: {broken}", code="peer_error")
                with contextlib.suppress(ConnectionResetError):
                    await response.write(_SSE.frame(failure.body()))
                    await response.write(_SSE.done)
            used = None if stream.usage is None else sum(stream.usage)
            _release_quota(state, admitted, charged if used is None else used)
            return response
    finally:
        state.fleet.forward_finished(pending)


# --------------------------------------------------------------------------------------------
# Shadow copies (model rollouts)


def _shadow_directive(state: AgentState, admitted: _Admitted) -> RolloutDirective | None:
    """The shadow rollout this client request is sampled into, if any."""
    if admitted.hop is not None or state.fleet is None or state.closing or state.draining:
        return None  # only the origin copies a request, once
    directive = state.fleet.rollout(admitted.model)
    if directive is None or directive.shadow_fraction <= 0:
        return None
    if not shadow_sample(admitted.request_id, directive.shadow_fraction):
        return None
    return directive


def _start_shadow(
    request: web.Request,
    state: AgentState,
    admitted: _Admitted,
    directive: RolloutDirective,
    body: bytes,
) -> None:
    """Copy a request that ended well to the candidate, in the background (bounded)."""
    capture = admitted.capture
    if capture is None or capture.finished_at is None or state.closing:
        return  # the client got no complete output: nothing to compare with
    if capture.variant == directive.candidate:
        return  # the router fell back to the candidate itself: nothing to compare it with
    if len(state.shadows) >= MAX_SHADOW_IN_FLIGHT:
        state.metrics.shadow_requests.labels("sent", "skipped_busy").inc()
        return
    task = asyncio.get_running_loop().create_task(
        _run_shadow(
            state, request.path, body, request.headers.get("Authorization"), admitted, directive
        )
    )
    state.shadows.add(task)
    task.add_done_callback(state.shadows.discard)


async def _run_shadow(
    state: AgentState,
    path: str,
    body: bytes,
    authorization: str | None,
    admitted: _Admitted,
    directive: RolloutDirective,
) -> None:
    capture = admitted.capture
    assert capture is not None and capture.finished_at is not None
    assert state.peer_session is not None and state.fleet_token is not None
    try:
        target = _shadow_target(state, admitted, directive.candidate)
        if target is None:
            state.metrics.shadow_requests.labels("sent", "no_candidate").inc()
            return
        payload = json.loads(body)
        payload["stream"] = False  # the whole output is all a comparison needs
        payload.pop("stream_options", None)
        headers = forward_headers(
            {"Authorization": authorization} if authorization else {},
            slo_class=admitted.slo.name,
            hops=1,
            tried=(),
            fleet_token=state.fleet_token,
            version=directive.candidate,
            shadow=True,
        )
        routing = state.config.routing
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=routing.forward_connect_timeout_s,
            sock_read=routing.forward_read_timeout_s,
        )
        started = time.monotonic()
        candidate_text: str | None = None
        try:
            answer = await post_whole(
                state.peer_session,
                target.url.rstrip("/") + path,
                json.dumps(payload).encode(),
                headers,
                timeout,
            )
            candidate_text = answer_text(answer.body)
        except PeerFailed as failure:
            log.info("shadow copy of %s failed: %s", admitted.request_id, failure)
        latency = time.monotonic() - started
        failed = candidate_text is None
        agreement = 0.0
        if candidate_text is not None:
            agreement = await _agreement(
                state, admitted.model, capture.text, candidate_text, directive.compare
            )
        log.debug(
            "shadow copy of %s: %d and %s characters, agreement %.3f",
            admitted.request_id,
            len(capture.text),
            "no" if candidate_text is None else len(candidate_text),
            agreement,
        )
        state.metrics.shadow_requests.labels("sent", "error" if failed else "ok").inc()
        if state.pusher is not None:
            state.pusher.record_shadow(
                ShadowReport(
                    model=admitted.model,
                    stable=capture.variant or directive.stable,
                    candidate=directive.candidate,
                    request_id=admitted.request_id,
                    agreement=agreement,
                    candidate_error=failed,
                    stable_latency_s=max(0.0, capture.finished_at - admitted.arrival),
                    candidate_latency_s=latency,
                )
            )
    except asyncio.CancelledError:
        raise
    except Exception:
        # Evidence lost, nothing more: the client's request is long answered.
        log.exception("shadow copy of %s failed", admitted.request_id)


def _shadow_target(state: AgentState, admitted: _Admitted, candidate: str) -> _Peer | None:
    """An instance serving ``candidate`` for the copy, by the router (which may be this node:
    the copy then comes back here over HTTP, like any other). None when none can take it."""
    assert state.fleet is not None
    view = state.fleet.fleet_view(_live_snapshot(state))
    if view is None:
        return None
    decision = route(_route_request(admitted, version=candidate), view, state.policy)
    chosen = decision.chosen
    # Without a candidate instance the router falls back to any: no copy then.
    if chosen is None or chosen.variant != candidate or decision.url is None:
        return None
    return _Peer(chosen.instance_id, decision.url, candidate)


async def _agreement(
    state: AgentState,
    model: str,
    served: str,
    copy: str,
    metric: Literal["token-agreement", "exact-match"],
) -> float:
    """``compare_outputs`` of two outputs, tokenised by the model's tokenizer when it is loaded
    here (off the event loop), else split on whitespace; both sides always the same way."""
    backend = state.models.backend_of(model)

    def tokens() -> tuple[list[Any], list[Any]]:
        if backend is not None and backend.ready:
            try:
                # The tokenizer may prepend special tokens (BOS) to any text: drop what it
                # prepends to an empty one, so two outputs do not agree on it for free.
                prefix = backend.encode("")
                a, b = backend.encode(served), backend.encode(copy)
                if prefix and a[: len(prefix)] == prefix and b[: len(prefix)] == prefix:
                    a, b = a[len(prefix) :], b[len(prefix) :]
                return a, b
            except (BackendError, ValueError, TypeError):
                pass  # unloaded meanwhile: words will do
        return served.split(), copy.split()

    stable_tokens, candidate_tokens = await asyncio.get_running_loop().run_in_executor(None, tokens)
    return compare_outputs(stable_tokens, candidate_tokens, metric)


# --------------------------------------------------------------------------------------------
# Serving here


async def _serve_here(
    request: web.Request, state: AgentState, admitted: _Admitted
) -> web.StreamResponse:
    arrival = admitted.arrival
    generation = GenerationRequest(
        request_id=admitted.request_id,
        prompt_token_ids=admitted.prompt_ids,
        params=admitted.params,
        priority=admitted.slo.priority,
        arrival=arrival,
        deadline=arrival + admitted.slo.ttft_ms / 1000.0,
        tpot=admitted.slo.tpot_ms / 1000.0,
    )
    try:
        handle = admitted.backend.submit(generation, _on_done(state, admitted))
    except ValueError as error:
        _release_quota(state, admitted, 0)
        param, _, why = str(error).partition(": ")
        param = {"prompt_token_ids": _prompt_param(admitted.kind)}.get(param, param)
        raise APIError(
            400,
            f"{param}: {why}" if why else str(error),
            param=param or None,
            code="invalid_value",
            reason="bad_request",
        ) from None
    except BackendError as error:
        _release_quota(state, admitted, 0)
        if not admitted.shadow:
            _tally_failure(state, admitted)
        raise APIError(
            503, str(error), code="unavailable", retry_after=LOADING_RETRY_AFTER_S, reason="loading"
        ) from None
    state.in_flight[admitted.request_id] = handle
    if not admitted.shadow:
        state.served.admitted(admitted.slo.name)
    headers = {
        "X-Request-Id": admitted.request_id,
        EFFECTIVE_PRIORITY_HEADER: admitted.slo.name,
        SERVED_BY_HEADER: state.config.node_id,
        VERSION_HEADER: admitted.variant,
    }
    watcher = asyncio.get_running_loop().create_task(_abort_on_disconnect(request, handle))
    try:
        if admitted.stream:
            return await _stream(request, admitted, handle, headers)
        return await _collect(admitted, handle, headers, state)
    finally:
        watcher.cancel()
        handle.abort()  # no-op if it finished; stops generation if the handler is leaving early


def _tally_failure(state: AgentState, admitted: _Admitted) -> None:
    state.versions.failed(admitted.model, admitted.variant)
    state.metrics.version_requests.labels(admitted.model, admitted.variant, "error").inc()


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
        _release_quota(state, admitted, result.prompt_tokens + result.completion_tokens)
        if admitted.shadow:
            # A shadow copy: nobody is billed or metered for it, and it is no arrival for the
            # autoscaler nor a sample of its version (its comparison is the origin's report).
            ok = result.error is None and result.finish_reason != "abort"
            state.metrics.shadow_requests.labels("served", "ok" if ok else "error").inc()
            return
        tenant, slo_class = admitted.tenant.name, admitted.slo.name
        usd = result.accelerator_seconds * price_per_s
        state.usage.record(
            tenant, result.prompt_tokens, result.completion_tokens, result.accelerator_seconds, usd
        )
        if state.pusher is not None:  # this node served it, so this node reports it
            state.pusher.record_usage(
                tenant,
                time.time(),
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                accelerator_seconds=result.accelerator_seconds,
                usd=usd,
            )
        m = state.metrics
        m.prompt_tokens.labels(tenant).inc(result.prompt_tokens)
        m.completion_tokens.labels(tenant).inc(result.completion_tokens)
        m.accelerator_seconds.labels(tenant).inc(result.accelerator_seconds)
        m.cost_usd.labels(tenant).inc(usd)
        m.requests.labels(tenant, slo_class, result.finish_reason).inc()
        tpot_s = mean_tpot_s(result)
        state.served.finished(
            slo_class,
            ttft_s=result.ttft_s,
            tpot_s=tpot_s,
            ttft_target_s=admitted.slo.ttft_ms / 1000.0,
            tpot_target_s=admitted.slo.tpot_ms / 1000.0,
        )
        # The same figures per version, for rollouts. A server-side failure is the version's
        # fault; a request its client abandoned (or a drain aborted) is neither a success nor
        # a failure of the version, so it is not counted.
        if result.error is not None:
            _tally_failure(state, admitted)
        elif result.finish_reason != "abort":
            state.versions.finished(
                admitted.model, admitted.variant, ttft_s=result.ttft_s, tpot_s=tpot_s
            )
            m.version_requests.labels(admitted.model, admitted.variant, "ok").inc()
        if result.queue_s is not None:
            m.queue_time.labels(slo_class).observe(result.queue_s)
        if result.ttft_s is not None:
            m.ttft.labels(slo_class).observe(result.ttft_s)
        for gap in result.inter_token_s:
            m.inter_token.labels(slo_class).observe(gap)
        if result.finish_reason != "abort":  # aborted requests would distort the latency picture
            m.e2e.labels(slo_class).observe(result.e2e_s)

    return done


# --------------------------------------------------------------------------------------------
# Admission


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


async def _admit(
    request: web.Request, state: AgentState, kind: Kind, arrival: float, hop: Hop | None
) -> _Admitted:
    """Authenticate and validate a request and resolve its class (nothing charged yet)."""
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
    model = body.model
    if state.models.spec(model) is None:
        raise APIError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
            reason="not_found",
        )
    if not tenant.may_use_model(model):
        raise APIError(
            403,
            f"tenant {tenant.name!r} may not use model {model!r}",
            param="model",
            code="model_not_allowed",
            reason="forbidden",
        )
    if state.draining:
        raise APIError(
            503,
            "the node is draining; retry on another node",
            code="draining",
            retry_after=DRAINING_RETRY_AFTER_S,
            reason="draining",
        )
    try:
        # Loads the model first if it is not loaded; the wait is part of the request's TTFT
        # (``arrival`` was taken before).
        lease = await state.models.acquire(model)
    except ModelUnavailable as error:
        raise _model_unavailable(error) from None
    try:
        return await _admit_for_model(request, state, kind, arrival, hop, tenant, body, lease)
    except BaseException:
        lease.release()
        raise


async def _admit_for_model(
    request: web.Request,
    state: AgentState,
    kind: Kind,
    arrival: float,
    hop: Hop | None,
    tenant: TenantConfig,
    body: schemas.ChatCompletionRequest | schemas.CompletionRequest,
    lease: ModelLease,
) -> _Admitted:
    """The checks that need the model's backend (the caller releases ``lease`` on failure)."""
    backend = lease.backend
    if not backend.ready:
        # An upstream backend says why (unreachable, model not listed), not just "loading".
        detail = backend.load_error or backend.not_ready_reason or "not ready"
        raise APIError(
            503,
            f"{detail}; retry shortly",
            code="model_loading",
            retry_after=LOADING_RETRY_AFTER_S,
            reason="loading",
        )

    prompt_ids = await _tokenize(backend, body)
    params = _sampling_params(state.config, backend, body, len(prompt_ids), kind)

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
    slot = state.models.spec(lease.model)
    assert slot is not None
    variant = slot.variant
    if hop is not None and hop.version is not None and hop.version != variant:
        # The origin routed on a view older than this node's config (or a spec that moved):
        # serve the variant held here rather than fail, and say so in X-Fleetform-Version.
        log.warning(
            "asked for %s variant %r; this node serves %r, which serves it",
            lease.model,
            hop.version,
            variant,
        )
    stream = body.stream
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return _Admitted(
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        kind=kind,
        tenant=tenant,
        model=lease.model,
        slo=resolution.slo_class,
        stream=stream,
        include_usage=bool(stream and body.stream_options and body.stream_options.include_usage),
        prompt_ids=prompt_ids,
        params=params,
        arrival=arrival,
        backend=backend,
        lease=lease,
        variant=variant,
        hop=hop,
    )


def _shed_if_overloaded(state: AgentState, admitted: _Admitted) -> None:
    """Refuse (503) what this node should not take on: past the cap on waiting requests, or,
    when no fleet router decided, a sheddable request predicted to miss its TTFT objective.
    (Where the router sent it here, the prediction was the router's.)"""
    config, backend, slo = state.config, admitted.backend, admitted.slo
    throughput = backend.throughput()
    load = LoadState(
        prefill_tokens_per_s=throughput.prefill_tokens_per_s
        or config.admission.prior_prefill_tokens_per_s,
        decode_step_s=throughput.decode_step_s or config.admission.prior_decode_step_s,
        items=backend.work_items(),
        max_num_seqs=backend.max_num_seqs,
        max_waiting=config.admission.max_waiting_requests,
    )
    shed = decide_shedding(load, len(admitted.prompt_ids), slo)
    routed = admitted.hop is not None or (state.fleet is not None and state.fleet.reply is not None)
    if not shed.shed or (routed and shed.reason == "overload"):
        return
    if shed.reason == "overload":
        state.metrics.shed.labels(slo.name).inc()
    raise APIError(
        503, shed.message, code=shed.reason, retry_after=shed.retry_after_s, reason=shed.reason
    )


def _charge_quota(state: AgentState, admitted: _Admitted) -> _Admitted:
    """Charge the tenant's quota (429 when a limit or a budget is spent). A forwarded request
    is not charged here: its origin charged it."""
    if admitted.hop is not None:
        return admitted
    if state.fleet is not None and state.fleet.fleet_over_budget:
        raise APIError(
            429,
            "the fleet's monthly budget (budget.usd_per_month) is used up; requests resume "
            "when it is raised or the month ends",
            code="insufficient_quota",
            retry_after=BUDGET_RETRY_AFTER_S,
            reason="fleet_budget",
        )
    tenant = admitted.tenant.name
    estimated = len(admitted.prompt_ids) + admitted.params.max_tokens
    decision = state.quotas.admit(tenant, estimated)
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
    state.recent_use.started(tenant, estimated)
    return replace(admitted, ticket=decision.ticket)


def _release_quota(state: AgentState, admitted: _Admitted, actual_tokens: int) -> None:
    """Settle the quota charge with the tokens used (once; later calls do nothing)."""
    ticket = admitted.ticket
    if ticket is None or ticket.released:
        return
    state.quotas.release(ticket, actual_tokens)
    state.recent_use.finished(ticket.tenant, actual_tokens - ticket.charged_tokens)


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
    if admitted.capture is not None:
        admitted.capture.pieces.append(text)
        admitted.capture.done(admitted.variant)
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


_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # keep reverse proxies from batching the events
}


class _SSE:
    """Builds the server-sent events of one streaming response."""

    def __init__(self, admitted: _Admitted) -> None:
        self.admitted = admitted
        self.created = int(time.time())
        self.chat = admitted.kind == "chat"

    @staticmethod
    def frame(payload: Mapping[str, Any]) -> bytes:
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
        return self.frame(payload)

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
        return self.frame(error.body())

    done = b"data: [DONE]\n\n"


async def _stream(
    request: web.Request,
    admitted: _Admitted,
    handle: GenerationHandle,
    headers: dict[str, str],
) -> web.StreamResponse:
    state = request.app[AGENT]
    response = web.StreamResponse(headers={**headers, **_SSE_HEADERS})
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
                if admitted.capture is not None:
                    admitted.capture.pieces.append(chunk.text)
                await response.write(sse.text(chunk.text))
            if chunk.finished:
                if admitted.capture is not None:
                    admitted.capture.done(admitted.variant)
                await response.write(sse.finish(chunk.finish_reason or "stop"))
                if admitted.include_usage:
                    await response.write(sse.usage(chunk.prompt_tokens, chunk.completion_tokens))
                if admitted.hop is not None:  # for the origin's quota; it strips this comment
                    await response.write(
                        usage_comment(chunk.prompt_tokens, chunk.completion_tokens)
                    )
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
