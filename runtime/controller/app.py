"""The controller's aiohttp application: pushes in, fleet view and leases out, usage reports.

This module owns the controller's HTTP surface and the wiring of its parts:

``POST /v1/push`` (fleet token)
    Validate a :class:`runtime.protocol.MetricsPush` (400 naming the field), record its usage
    in the ledger exactly once, update the fleet state, grant the agent's leases and answer a
    :class:`runtime.protocol.PushReply` with the fresh fleet view, the leases and the monthly
    budget flags. A retried push is answered the same way with ``accepted=false,
    duplicate=true`` and is not counted again.
``GET /v1/usage`` (admin token: every tenant; a tenant API key: that tenant only)
    Usage per tenant, optionally per ``hour`` or ``pool`` (``group_by``), over ``since`` ..
    ``until`` (epoch seconds, one-hour resolution; ``since`` defaults to the start of the UTC
    month the range ends in, so no parameters means this month), with each tenant's
    month-to-date budget status.
``GET /v1/fleet`` (admin token)
    Every agent the controller still tracks, with its age, freshness and lease accounting.
``GET /v1/autoscale`` (admin token)
    The newest scaling plan (desired replicas per pool with reasons), what the applier did
    with it, and the replicas currently requested; ``fleetform up`` polls it to start and
    drain local agents.
``GET /v1/placement`` (admin token)
    Demand-driven placement (:mod:`runtime.controller.placement`): the latest plan (per model
    its ready and loading copies and what waits for them; loads and unloads with reasons; what
    it relieves the autoscaler of), orders not yet delivered, and recent plans. Orders reach
    agents in their push replies.
``GET /v1/rollouts`` (admin token)
    Every model rollout of the spec (:mod:`runtime.controller.rollouts`): phase, split, the
    figures the latest decision judged, shadow statistics, the decisions that changed
    something (with reasons, kept across restarts) and the latest decisions of any kind. Push
    replies carry each rollout's split to the agents.
``GET /healthz``, ``GET /metrics``
    Liveness, and Prometheus metrics from a registry of this application's own.

Errors are always ``{"error": {"message", "type", "param", "code"}}``; an unexpected exception
is logged here and the client gets a bare 500.

SQLite runs on one dedicated worker thread (a single-thread executor that also owns the
connection): a commit with ``synchronous=FULL`` waits for an fsync, which must not stall the
event loop, and one thread serialises the ledger's transactions, which SQLite needs anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from multidict import MultiMapping
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import ValidationError

from runtime.agent.config import hash_api_key
from runtime.agent.errors import APIError, error_body, param_from_validation_error
from runtime.autoscale import Autoscaler, ScalingPlan
from runtime.controller.autoscaling import AppliedPlan, Applier, AutoscaleLoop, PublishOnly
from runtime.controller.config import ControllerConfig
from runtime.controller.fleet import AgentRecord, FleetState, over_budget
from runtime.controller.ledger import (
    HOUR_S,
    Ledger,
    PoolSample,
    SloSample,
    UsageTotals,
    month_bounds,
)
from runtime.controller.placement import PlacementLoop
from runtime.controller.rollouts import RolloutLoop
from runtime.protocol import PUSH_PATH, ClassCounters, LeaseGrant, MetricsPush, PushReply

__all__ = ["CONTROLLER", "ControllerMetrics", "ControllerState", "init"]

log = logging.getLogger("fleetform.controller")
_T = TypeVar("_T")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Presented tokens longer than this are certainly wrong; not hashing megabytes keeps it cheap.
MAX_TOKEN_LENGTH = 4096
SWEEP_MAX_INTERVAL_S = 5.0
PRUNE_INTERVAL_S = 3600.0
USAGE_QUERY_PARAMS = ("since", "until", "group_by")
GROUP_BY_VALUES = ("hour", "pool")


class ControllerMetrics:
    """Prometheus metrics of one controller application, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pushes = Counter(
            "fleetform_controller_pushes_total",
            "Metrics pushes by result: accepted, duplicate (a retry, not counted again) or "
            "rejected (bad token or body).",
            ["result"],
            registry=self.registry,
        )
        for result in ("accepted", "duplicate", "rejected"):
            self.pushes.labels(result)
        self.live_agents = Gauge(
            "fleetform_controller_live_agents",
            "Agents whose last push is within the staleness expiry.",
            registry=self.registry,
        )
        self.lease_holders = Gauge(
            "fleetform_controller_lease_holders",
            "Agents in lease accounting: live, or stale but possibly serving on a valid lease.",
            registry=self.registry,
        )


@dataclass
class ControllerState:
    """Everything the handlers share (one per application)."""

    config: ControllerConfig
    clock: Callable[[], float]
    fleet: FleetState
    metrics: ControllerMetrics
    fleet_token_sha256: str
    admin_token_sha256: str
    tenant_keys: list[tuple[str, str]]  # (key digest, tenant), every key of every tenant
    executor: ThreadPoolExecutor | None = None
    ledger: Ledger | None = None
    autoscale: AutoscaleLoop | None = None  # None: autoscaling disabled in the spec
    rollouts: RolloutLoop | None = None  # None: no model of the spec has a rollout
    placement: PlacementLoop | None = None  # None: no pool may load further models

    async def db(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a ledger call on the ledger's thread."""
        if self.executor is None:
            raise RuntimeError("the ledger is not open (application not started)")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def require_ledger(self) -> Ledger:
        if self.ledger is None:
            raise RuntimeError("the ledger is not open (application not started)")
        return self.ledger


CONTROLLER = web.AppKey("controller", ControllerState)


def init(
    config: ControllerConfig,
    *,
    clock: Callable[[], float] = time.time,
    applier: Applier | None = None,
) -> web.Application:
    """The controller application for ``config``.

    ``clock`` gives epoch seconds (lease expiry and ``last_seen`` are sent to agents on it, and
    usage months are UTC calendar months); tests inject a fake one. ``applier`` carries out the
    autoscaler's plans (default: publish them at ``GET /v1/autoscale`` for ``fleetform up``).
    """
    metrics = ControllerMetrics()
    state = ControllerState(
        config=config,
        clock=clock,
        fleet=FleetState(
            {t.name: t.quotas for t in config.spec.tenants},
            stale_after_s=config.peer_stale_after_s,
            policy=config.lease_policy,
            retarget_s=config.lease_retarget_s,
            expected_agents=sum(pool.replicas for pool in config.spec.pools),
        ),
        metrics=metrics,
        fleet_token_sha256=config.fleet_token_sha256,
        admin_token_sha256=config.admin_token_sha256,
        tenant_keys=[
            (digest, tenant)
            for tenant, digests in sorted(config.tenant_key_sha256.items())
            for digest in digests
        ],
    )
    if config.spec.autoscaling.enabled:
        state.autoscale = AutoscaleLoop(
            spec=config.spec,
            autoscaler=Autoscaler.from_spec(config.spec),
            applier=applier or PublishOnly(),
            state_path=config.db_path.with_name(config.db_path.name + ".autoscale.json"),
        )
    if config.spec.autoscaling.placement.enabled and any(p.may_load for p in config.spec.pools):
        state.placement = PlacementLoop(
            config.spec,
            state_path=config.db_path.with_name(config.db_path.name + ".placement.json"),
        )
    if any(model.rollout is not None for model in config.spec.models):
        state.rollouts = RolloutLoop(
            config.spec,
            state_path=config.db_path.with_name(config.db_path.name + ".rollouts.json"),
        )
    metrics.live_agents.set_function(lambda: len(state.fleet.fresh_agents(state.clock())))
    metrics.lease_holders.set_function(lambda: len(state.fleet.lease_holders(state.clock())))
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware])
    app[CONTROLLER] = state
    app.cleanup_ctx.append(_ledger_lifecycle)
    app.cleanup_ctx.append(_sweeper_lifecycle)
    app.cleanup_ctx.append(_autoscale_lifecycle)
    app.cleanup_ctx.append(_rollout_lifecycle)
    app.router.add_post(PUSH_PATH, push)
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/v1/fleet", fleet)
    app.router.add_get("/v1/autoscale", autoscale_status)
    app.router.add_get("/v1/rollouts", rollouts_status)
    app.router.add_get("/v1/placement", placement_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    from runtime.controller.dashboard import add_dashboard_routes  # imports this module

    add_dashboard_routes(app)
    return app


# --------------------------------------------------------------------------------------------
# Lifecycle


async def _ledger_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open the ledger on its own thread; on shutdown close it there, after pending calls."""
    state = app[CONTROLLER]
    state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetform-ledger")
    try:
        state.ledger = await state.db(Ledger, state.config.db_path)
        log.info("ledger open at %s", state.config.db_path)
        yield
    finally:
        if state.ledger is not None:
            await state.db(state.ledger.close)
            state.ledger = None
        state.executor.shutdown(wait=True)
        state.executor = None


async def _sweeper_lifecycle(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(_sweep_forever(app[CONTROLLER]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _sweep_forever(state: ControllerState) -> None:
    """Log agents going stale, forget those out of lease accounting, prune old push rows."""
    interval = min(SWEEP_MAX_INTERVAL_S, state.config.peer_stale_after_s / 3)
    last_prune = -math.inf
    while True:
        await asyncio.sleep(interval)
        try:
            now = state.clock()
            stale, forgotten = state.fleet.sweep(now)
            for record in stale:
                log.warning(
                    "agent %s (%s) is stale: last push %.1fs ago",
                    record.agent_id,
                    record.instance.instance_id,
                    now - record.last_seen,
                )
            for record in forgotten:
                log.info("agent %s left lease accounting", record.agent_id)
            if now - last_prune >= PRUNE_INTERVAL_S:
                last_prune = now
                ledger = state.require_ledger()
                removed = await state.db(ledger.prune_pushes, now - state.config.push_retention_s)
                if removed:
                    log.info("pruned %d push rows older than the retention", removed)
        except Exception:
            # Housekeeping must not die of one bad round; the next one tries again.
            log.exception("controller sweep failed")


async def _autoscale_lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[CONTROLLER]
    if state.autoscale is None and state.placement is None:
        yield
        return
    task = asyncio.get_running_loop().create_task(_autoscale_forever(state))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _autoscale_forever(state: ControllerState) -> None:
    """Every period: placement first (loading models on nodes that have the memory), then the
    autoscaler, which holds scale-up for what placement relieves: read the month's spend, plan,
    apply (in a worker thread: the Pulumi applier blocks for minutes), record the plan in the
    ledger."""
    period = state.config.spec.autoscaling.period_s
    while True:
        await asyncio.sleep(period)
        relieving: dict[str, str] = {}
        if state.placement is not None:
            try:
                now = state.clock()
                state.placement.step(now, state.fleet.fresh_agents(now))
                relieving = state.placement.relieving()
            except Exception:
                log.exception("placement period failed")
        loop = state.autoscale
        if loop is None:
            continue
        try:
            now = state.clock()
            ledger = state.require_ledger()
            month = await state.db(ledger.month_totals, now)
            fleet_usd = sum(t.usd for t in month.values())
            tenants, _ = over_budget(state.config.spec, month, fleet_usd)
            agents = state.fleet.fresh_agents(now)
            plan, outcome = await asyncio.get_running_loop().run_in_executor(
                None,
                functools.partial(
                    loop.step,
                    now,
                    agents,
                    month_usd=fleet_usd,
                    over_budget_tenants=tenants,
                    placement=relieving,
                ),
            )
            slo = dict(loop.collector.class_deltas)
            await state.db(_record_plan, ledger, plan, outcome, agents, slo)
        except Exception:
            # One failed period (a ledger hiccup, an applier bug) must not end autoscaling.
            log.exception("autoscaling period failed")


async def _rollout_lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[CONTROLLER]
    loop = state.rollouts
    if loop is None:
        yield
        return
    task = asyncio.get_running_loop().create_task(_rollouts_forever(state, loop))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Shadow comparisons recorded since the last period are part of the memory too.
    try:
        await asyncio.to_thread(loop.save, loop.dump())
    except OSError:
        log.exception("saving the rollout state failed")


async def _rollouts_forever(state: ControllerState, loop: RolloutLoop) -> None:
    """Every ``rollout_period_s``: decide every rollout over the fresh agents, persist."""
    while True:
        await asyncio.sleep(state.config.rollout_period_s)
        try:
            now = state.clock()
            loop.step(now, state.fleet.fresh_agents(now))
            # Taken on the event loop (pushes change it), written off it.
            await asyncio.to_thread(loop.save, loop.dump())
        except Exception:
            # One failed period must not end the rollouts; the next one decides again.
            log.exception("rollout period failed")


def _record_plan(
    ledger: Ledger,
    plan: ScalingPlan,
    outcome: AppliedPlan,
    agents: list[AgentRecord],
    slo: Mapping[str, ClassCounters],
) -> None:
    """Samples for the dashboard: replicas, queues and SLO counts per period; decisions."""
    samples: dict[str, PoolSample] = {}
    for name, decision in plan.decisions.items():
        members = [a.instance for a in agents if a.instance.pool == name]
        samples[name] = PoolSample(
            replicas=sum(1 for i in members if i.healthy),
            desired=decision.desired,
            queued=sum(sum(i.queued_requests.values()) for i in members),
            running=sum(i.running for i in members),
        )
    ledger.record_pool_samples(plan.at, samples)
    ledger.record_slo_samples(
        plan.at,
        {
            name: SloSample(
                ttft_met=c.ttft_met,
                ttft_total=c.finished,
                tpot_met=c.tpot_met,
                tpot_total=c.finished,
            )
            for name, c in slo.items()
            if c.finished
        },
    )
    for decision in plan.changes():
        ledger.record_decision(
            plan.at,
            decision.pool,
            decision.current,
            decision.desired,
            decision.reasons,
            applied=outcome.applied,
            error=outcome.error,
        )


# --------------------------------------------------------------------------------------------
# Errors and authentication


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as error:
        return error.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        messages = {
            404: ("Unknown route", "not_found"),
            405: (f"Method not allowed; use {exc.headers.get('Allow', 'another')}", None),
            413: ("Request body too large", "request_too_large"),
        }
        message, code = messages.get(exc.status, (exc.reason, None))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(
            error_body(message, "invalid_request_error", None, code),
            status=exc.status,
            headers=headers,
        )
    except ConnectionResetError:
        raise
    except Exception:
        # The traceback stays in the server log; the client learns nothing of the internals.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(
            error_body("Internal server error", "server_error", None, "internal_error"),
            status=500,
        )


def _presented_digest(request: web.Request) -> str | None:
    """SHA-256 hex of the ``Authorization: Bearer`` token, if one was presented."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    return hash_api_key(token)


def _matches(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented, expected)


def _tenant_for(state: ControllerState, presented: str | None) -> str | None:
    """The tenant owning the presented key; compares with every key, whichever matches."""
    if presented is None:
        return None
    found: str | None = None
    for digest, tenant in state.tenant_keys:
        if hmac.compare_digest(presented, digest):
            found = tenant
    return found


def _unauthorized(what: str) -> APIError:
    return APIError(401, f"Missing or invalid {what}", code="invalid_api_key")


# --------------------------------------------------------------------------------------------
# POST /v1/push


async def push(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER]
    try:
        if not _matches(_presented_digest(request), state.fleet_token_sha256):
            raise _unauthorized("fleet token")
        body = await _read_push(request)
    except (APIError, web.HTTPException):
        state.metrics.pushes.labels("rejected").inc()
        raise

    now = state.clock()
    ledger = state.require_ledger()
    accepted, month, fleet_usd = await state.db(_record, ledger, body, now)
    state.fleet.observe(body, now)
    if state.rollouts is not None:
        state.rollouts.observe(body, accepted=accepted)
    leases = state.fleet.grant(body.agent_id, now)
    over, fleet_over = over_budget(state.config.spec, month, fleet_usd)
    state.metrics.pushes.labels("accepted" if accepted else "duplicate").inc()
    if not accepted:
        log.info("duplicate push %s/%s seq %d", body.agent_id, body.boot_id, body.seq)
    reply = PushReply(
        accepted=accepted,
        duplicate=not accepted,
        server_time=now,
        fleet=state.fleet.view(now),
        leases={tenant: LeaseGrant.from_lease(lease) for tenant, lease in leases.items()},
        over_budget_tenants=over,
        fleet_over_budget=fleet_over,
        rollouts=state.rollouts.directives() if state.rollouts is not None else {},
        placement=state.placement.take_orders(body.agent_id) if state.placement else [],
    )
    # Without a rollout or a placement order the reply is what it was before they existed, so
    # agents that predate them (which refuse unknown fields) keep working.
    empty = {name for name in ("rollouts", "placement") if not getattr(reply, name)}
    text = reply.model_dump_json(exclude=empty or None)
    return web.json_response(text=text)


async def _read_push(request: web.Request) -> MetricsPush:
    raw = await request.read()  # raises 413 past client_max_size
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise APIError(400, "The body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object (a MetricsPush)", code="invalid_value")
    try:
        body = MetricsPush.model_validate(data)
    except ValidationError as error:
        param, message, code = param_from_validation_error(error, data)
        raise APIError(400, message, param=param, code=code) from None
    for index, delta in enumerate(body.usage):
        if delta.hour % HOUR_S:
            param = f"usage[{index}].hour"
            raise APIError(
                400,
                f"{param}: {delta.hour} is not the start of a UTC hour (a multiple of 3600)",
                param=param,
                code="invalid_value",
            )
    return body


def _record(
    ledger: Ledger, body: MetricsPush, now: float
) -> tuple[bool, dict[str, UsageTotals], float]:
    """On the ledger thread: record the push, then read the month's totals for budgets."""
    accepted = ledger.record_push(
        agent_id=body.agent_id,
        boot_id=body.boot_id,
        seq=body.seq,
        instance_id=body.instance.instance_id,
        pool=body.instance.pool,
        sent_at=body.sent_at,
        received_at=now,
        usage=body.usage,
    )
    return accepted, ledger.month_totals(now), ledger.fleet_month_usd(now)


# --------------------------------------------------------------------------------------------
# GET /v1/usage


@dataclass(frozen=True)
class _UsageQuery:
    since: float
    until: float | None
    group_by: str | None


def _single(query: MultiMapping[str], name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise APIError(400, f"{name}: given more than once", param=name, code="invalid_value")
    return values[0] if values else None


def _epoch_param(query: MultiMapping[str], name: str) -> float | None:
    text = _single(query, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise APIError(
            400,
            f"{name}: must be a time in seconds since the epoch (got {text!r})",
            param=name,
            code="invalid_value",
        )
    return value


def _parse_usage_query(query: MultiMapping[str], now: float) -> _UsageQuery:
    for name in query:
        if name not in USAGE_QUERY_PARAMS:
            raise APIError(
                400,
                f"Unrecognized query parameter: {name} (known: {', '.join(USAGE_QUERY_PARAMS)})",
                param=name,
                code="unknown_parameter",
            )
    until = _epoch_param(query, "until")
    since = _epoch_param(query, "since")
    if since is None:
        # From the start of the UTC month of the end of the range (this month by default).
        end = now if until is None else max(0.0, until - 1)
        since = float(month_bounds(end)[0])
    if until is not None and until <= since:
        raise APIError(400, "until: must be after since", param="until", code="invalid_value")
    group_by = _single(query, "group_by")
    if group_by is not None and group_by not in GROUP_BY_VALUES:
        raise APIError(
            400,
            f"group_by: must be one of {', '.join(GROUP_BY_VALUES)} (got {group_by!r})",
            param="group_by",
            code="invalid_value",
        )
    return _UsageQuery(since=since, until=until, group_by=group_by)


async def usage(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER]
    presented = _presented_digest(request)
    tenant: str | None = None
    if not _matches(presented, state.admin_token_sha256):
        tenant = _tenant_for(state, presented)
        if tenant is None:
            raise _unauthorized("admin token or API key")
    now = state.clock()
    query = _parse_usage_query(request.query, now)
    scope = None if tenant is None else [tenant]
    ledger = state.require_ledger()

    def read() -> tuple[list[Any], dict[str, UsageTotals], float]:
        rows = ledger.usage(
            since=query.since,
            until=query.until,
            tenants=scope,
            group_by=() if query.group_by is None else (query.group_by,),  # type: ignore[arg-type]
        )
        return rows, ledger.month_totals(now), ledger.fleet_month_usd(now)

    rows, month, fleet_usd = await state.db(read)
    spec = state.config.spec
    names = [t.name for t in spec.tenants] if tenant is None else [tenant]
    data: list[dict[str, Any]] = []
    for row in rows:
        item: dict[str, Any] = {"tenant": row.tenant}
        if query.group_by == "pool":
            item["pool"] = row.pool
        elif query.group_by == "hour":
            item["hour"] = row.hour
        item.update(row.totals.to_json())
        data.append(item)
    if query.group_by is None:
        # Every tenant in scope has a line, including those with no usage yet.
        seen = {row.tenant for row in rows}
        data.extend(
            {"tenant": name, **UsageTotals().to_json()} for name in names if name not in seen
        )
        data.sort(key=lambda item: item["tenant"])
    over, fleet_over = over_budget(spec, month, fleet_usd)
    month_start, month_end = month_bounds(now)
    budgets = []
    for name in names:
        quotas = spec.tenant(name).quotas
        used = month.get(name, UsageTotals())
        budgets.append(
            {
                "tenant": name,
                "usd": used.usd,
                "usd_per_month": quotas.usd_per_month,
                "accelerator_hours": used.accelerator_hours,
                "accelerator_hours_per_month": quotas.accelerator_hours_per_month,
                "over_budget": name in over,
            }
        )
    body: dict[str, Any] = {
        "object": "usage",
        "scope": "fleet" if tenant is None else "tenant",
        "since": query.since,
        "until": query.until,
        "group_by": query.group_by,
        "data": data,
        "month": {"start": month_start, "end": month_end, "budgets": budgets},
    }
    if tenant is None:
        body["month"]["fleet"] = {
            "usd": fleet_usd,
            "usd_per_month": None if spec.budget is None else spec.budget.usd_per_month,
            "over_budget": fleet_over,
        }
    return web.json_response(body)


# --------------------------------------------------------------------------------------------
# GET /v1/fleet, /healthz, /metrics


async def fleet(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER]
    if not _matches(_presented_digest(request), state.admin_token_sha256):
        raise _unauthorized("admin token")
    now = state.clock()
    holders = state.fleet.lease_holders(now)
    agents = []
    for record in sorted(state.fleet.agents.values(), key=lambda r: r.agent_id):
        agents.append(
            {
                "agent_id": record.agent_id,
                "boot_id": record.boot_id,
                "seq": record.seq,
                "last_seen": record.last_seen,
                "age_s": now - record.last_seen,
                "fresh": state.fleet.is_fresh(record, now),
                "in_lease_accounting": record.agent_id in holders,
                "lease_expires_at": record.lease_expires_at(),
                "instance": record.instance.model_dump(mode="json"),
            }
        )
    return web.json_response(
        {
            "now": now,
            "stale_after_s": state.fleet.stale_after_s,
            "live_agents": sum(1 for a in agents if a["fresh"]),
            "agents": agents,
        }
    )


async def autoscale_status(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER]
    if not _matches(_presented_digest(request), state.admin_token_sha256):
        raise _unauthorized("admin token")
    if state.autoscale is None:
        return web.json_response({"enabled": False})
    return web.json_response({"enabled": True, **state.autoscale.latest()})


async def placement_status(request: web.Request) -> web.Response:
    """Demand-driven placement: the latest plan, orders not yet delivered, recent plans."""
    state = request.app[CONTROLLER]
    if not _matches(_presented_digest(request), state.admin_token_sha256):
        raise _unauthorized("admin token")
    if state.placement is None:
        return web.json_response({"enabled": False, "latest": None, "recent": []})
    return web.json_response(state.placement.status())


async def rollouts_status(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER]
    if not _matches(_presented_digest(request), state.admin_token_sha256):
        raise _unauthorized("admin token")
    now = state.clock()
    if state.rollouts is None:
        return web.json_response({"enabled": False, "now": now, "rollouts": [], "decisions": []})
    return web.json_response(
        {"now": now, "period_s": state.config.rollout_period_s, **state.rollouts.status()}
    )


async def healthz(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER]
    return web.json_response({"status": "ok", "ledger_open": state.ledger is not None})


async def metrics_endpoint(request: web.Request) -> web.Response:
    registry = request.app[CONTROLLER].metrics.registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
