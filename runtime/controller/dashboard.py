"""The controller's cost dashboard: one HTML page of server-drawn charts, and its figures as JSON.

This module owns, on the controller application (:func:`add_dashboard_routes`):

``GET /dashboard`` (admin)
    An HTML page over a window (``?window=1h|24h|7d``, default ``24h``): cost per tenant and
    per pool per hour (from ``usage_hourly``), SLO attainment per class (TTFT and TPOT), ready
    and desired replicas per pool, queue depth per pool, the autoscaler's recent decisions
    with their reasons and outcome, and the model rollouts (current split, phase, shadow
    agreement, and the rollout decisions that changed something, with their reasons; live
    state from :class:`runtime.controller.rollouts.RolloutLoop`, not a window of the ledger),
    and demand-driven placement (copies per model, what waits for them, whether the autoscaler
    is held, and the loads and unloads ordered; live state from
    :class:`runtime.controller.placement.PlacementLoop`). The charts are SVG drawn here with matplotlib and inlined:
    the page loads nothing else, runs no script (its Content-Security-Policy forbids both) and
    so works with no network.
``GET /dashboard/data.json`` (admin)
    The same figures as JSON (:func:`build_figures`); the charts are drawn from this very dict.

Authentication. Both answer to ``Authorization: Bearer <admin token>``. A browser cannot send
that header on a page load, so ``GET /dashboard?token=<admin token>`` checks the token and
answers ``303`` to the same URL without it (so the token does not stay in the address bar or
the history), setting an ``HttpOnly``, ``SameSite=Strict`` session cookie scoped to
``/dashboard``. The cookie does not hold the admin token: it is ``<expiry>.<HMAC>`` under a key
made at random when the application starts, so it expires after :data:`SESSION_TTL_S`, grants
the dashboard only (not ``/v1/*``), and a controller restart signs everyone out.

Aggregation. Samples are put in buckets of a size that depends on the window (``bucket_s``),
aligned on multiples of it since the epoch. Per pool and bucket: ``replicas`` and ``desired``
are the last sample's (they are levels), ``queued`` and ``running`` the largest (a short queue
spike must stay visible on the 7-day view). Per SLO class and bucket, the met and measured
counts are summed and attainment is met / measured (``null`` when nothing was measured). Cost
is per UTC hour, every hour that overlaps the window, zero where nothing was spent.

Work off the event loop. Ledger reads run on the ledger's thread (``ControllerState.db``);
aggregation and drawing run on a thread of their own, so a slow chart never delays a push's
commit and two renders never share matplotlib's global settings. Figures are plain
:class:`matplotlib.figure.Figure` objects, never registered with pyplot: nothing global holds
them, so they are freed with the last reference, and no GUI backend is ever involved (SVG is
drawn by matplotlib's own SVG canvas).

Retention. While the application runs, pool and SLO samples and decisions older than
:data:`SERIES_RETENTION_S` are pruned every :data:`SERIES_PRUNE_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import io
import logging
import math
import re
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlencode

import matplotlib
import matplotlib.dates as mdates
from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter
from multidict import MultiMapping

from runtime.agent.config import hash_api_key
from runtime.agent.errors import APIError
from runtime.controller.app import (
    CONTROLLER,
    MAX_TOKEN_LENGTH,
    ControllerState,
    _matches,
    _presented_digest,
    _unauthorized,
)
from runtime.controller.ledger import (
    HOUR_S,
    PoolSample,
    ScalingDecision,
    SloSample,
    UsageRow,
    hour_start,
)

__all__ = [
    "COOKIE_NAME",
    "DASHBOARD",
    "DEFAULT_WINDOW",
    "WINDOWS",
    "DashboardState",
    "Window",
    "add_dashboard_routes",
    "build_figures",
    "render_charts",
]

log = logging.getLogger("fleetform.controller")
_T = TypeVar("_T")

PAGE_PATH = "/dashboard"
DATA_PATH = "/dashboard/data.json"
COOKIE_NAME = "fleetform_dashboard"
SESSION_TTL_S = 12 * 3600
SERIES_RETENTION_S = 14 * 86_400.0
SERIES_PRUNE_INTERVAL_S = 3600.0
DECISIONS_SHOWN = 50
CHART_WIDTH_IN = 6.2
CHART_HEIGHT_IN = 2.6

# The page runs no script and loads nothing: inline <style> and the inline SVG are all it has.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Window:
    """A selectable time window and the bucket its samples are aggregated in."""

    name: str
    seconds: int
    bucket_s: int
    label: str


WINDOWS = {
    w.name: w
    for w in (
        Window("1h", 3600, 60, "Last hour"),
        Window("24h", 86_400, 300, "Last 24 hours"),
        Window("7d", 7 * 86_400, 1800, "Last 7 days"),
    )
}
DEFAULT_WINDOW = "24h"


@dataclass
class DashboardState:
    """The dashboard's share of one application: its render thread and session key."""

    session_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    renderer: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the render thread."""
        if self.renderer is None:
            raise RuntimeError("the dashboard is not running (application not started)")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.renderer, functools.partial(fn, *args))


DASHBOARD = web.AppKey("dashboard", DashboardState)


def add_dashboard_routes(app: web.Application) -> None:
    """Serve the dashboard on ``app`` (a controller application from ``app.init``)."""
    app[DASHBOARD] = DashboardState()
    app.cleanup_ctx.append(_dashboard_lifecycle)
    app.router.add_get(PAGE_PATH, dashboard_page)
    app.router.add_get(DATA_PATH, dashboard_data)


async def _dashboard_lifecycle(app: web.Application) -> AsyncIterator[None]:
    dashboard = app[DASHBOARD]
    dashboard.renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetform-charts")
    task = asyncio.get_running_loop().create_task(_prune_forever(app[CONTROLLER]))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        dashboard.renderer.shutdown(wait=True)
        dashboard.renderer = None


async def _prune_forever(state: ControllerState) -> None:
    while True:
        try:
            ledger = state.require_ledger()
            removed = await state.db(ledger.prune_samples, state.clock() - SERIES_RETENTION_S)
            if removed:
                log.info("pruned %d dashboard series rows older than the retention", removed)
        except Exception:
            # Housekeeping must not die of one bad round; the next one tries again.
            log.exception("pruning the dashboard series failed")
        await asyncio.sleep(SERIES_PRUNE_INTERVAL_S)


# --------------------------------------------------------------------------------------------
# Handlers and authentication


@dataclass(frozen=True)
class _Query:
    window: Window
    token: str | None


def _parse_query(query: MultiMapping[str], allowed: Sequence[str]) -> _Query:
    for name in query:
        if name not in allowed:
            raise APIError(
                400,
                f"Unrecognized query parameter: {name} (known: {', '.join(allowed)})",
                param=name,
                code="unknown_parameter",
            )
    values = {name: query.getall(name) for name in allowed if name in query}
    for name, given in values.items():
        if len(given) > 1:
            raise APIError(400, f"{name}: given more than once", param=name, code="invalid_value")
    window_name = values.get("window", [DEFAULT_WINDOW])[0]
    if window_name not in WINDOWS:
        raise APIError(
            400,
            f"window: must be one of {', '.join(WINDOWS)} (got {window_name!r})",
            param="window",
            code="invalid_value",
        )
    token = values.get("token", [None])[0]
    return _Query(window=WINDOWS[window_name], token=token)


# ASCII digits only (str.isdigit would take other scripts' digits), and an HMAC-SHA256 in hex.
_SESSION_SHAPE = re.compile(r"([0-9]{1,12})\.[0-9a-f]{64}")


def _session_value(key: bytes, expires: int) -> str:
    mac = hmac.new(key, f"fleetform-dashboard:{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def _has_session(request: web.Request, state: ControllerState) -> bool:
    value = request.cookies.get(COOKIE_NAME, "")
    shape = _SESSION_SHAPE.fullmatch(value)
    if shape is None:
        return False
    expires = int(shape[1])
    expected = _session_value(request.app[DASHBOARD].session_key, expires)
    return hmac.compare_digest(value, expected) and expires > state.clock()


def _require_admin(request: web.Request, state: ControllerState) -> None:
    if _matches(_presented_digest(request), state.admin_token_sha256):
        return
    if _has_session(request, state):
        return
    raise APIError(
        401,
        f"Missing or invalid admin token (send it as a Bearer token, or open "
        f"{PAGE_PATH}?token=<admin token> once in the browser)",
        code="invalid_api_key",
    )


def _sign_in(request: web.Request, state: ControllerState, query: _Query) -> web.Response:
    """Check the ``token`` query parameter; on success, set the session cookie and redirect to
    the page without the token."""
    token = query.token or ""
    presented = hash_api_key(token) if 0 < len(token) <= MAX_TOKEN_LENGTH else None
    if not _matches(presented, state.admin_token_sha256):
        raise _unauthorized("admin token")
    params = {} if query.window.name == DEFAULT_WINDOW else {"window": query.window.name}
    location = PAGE_PATH + (f"?{urlencode(params)}" if params else "")
    response = web.Response(status=303, headers={**PAGE_HEADERS, "Location": location})
    expires = int(state.clock()) + SESSION_TTL_S
    response.set_cookie(
        COOKIE_NAME,
        _session_value(request.app[DASHBOARD].session_key, expires),
        max_age=SESSION_TTL_S,
        path=PAGE_PATH,
        httponly=True,
        samesite="Strict",
        # Only over TLS when the controller is reached over TLS; it is often plain HTTP on a
        # private address, where a Secure cookie would never come back.
        secure=request.secure,
    )
    return response


async def dashboard_page(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER]
    query = _parse_query(request.query, ("window", "token"))
    if query.token is not None:
        return _sign_in(request, state, query)
    _require_admin(request, state)
    figures = await _figures(request, query.window)
    html = await request.app[DASHBOARD].run(render_page, figures, state.config.spec.name)
    return web.Response(text=html, content_type="text/html", headers=PAGE_HEADERS)


async def dashboard_data(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER]
    _require_admin(request, state)
    query = _parse_query(request.query, ("window",))
    figures = await _figures(request, query.window)
    return web.json_response(figures, headers={"Cache-Control": "no-store"})


async def _figures(request: web.Request, window: Window) -> dict[str, Any]:
    state = request.app[CONTROLLER]
    ledger = state.require_ledger()
    now = state.clock()
    since = now - window.seconds
    # Up to and including `now`: a sample taken this instant belongs on the page.
    until = math.nextafter(now, math.inf)

    def read() -> tuple[Any, ...]:
        return (
            ledger.hourly_rows(since, hour_start(now) + HOUR_S),
            ledger.pool_samples(since, until),
            ledger.slo_samples(since, until),
            ledger.recent_decisions(DECISIONS_SHOWN),
        )

    hourly, pools, slo, decisions = await state.db(read)
    figures = await request.app[DASHBOARD].run(
        build_figures, window, now, hourly, pools, slo, decisions
    )
    figures["rollouts"] = rollout_figures(state)
    figures["placement"] = placement_figures(state)
    return figures


def placement_figures(state: ControllerState) -> dict[str, Any]:
    """Demand-driven placement as the page shows it: the latest plan's demand per model and
    the loads and unloads ordered, newest first."""
    if state.placement is None:
        return {"enabled": False, "latest": None, "actions": [], "notes": []}
    status = state.placement.status()
    actions = [
        {**action, "at": plan["at"]} for plan in status["recent"] for action in plan["actions"]
    ][:DECISIONS_SHOWN]
    latest = status["latest"]
    return {
        "enabled": True,
        "latest": latest,
        "actions": actions,
        "notes": latest["notes"] if latest else [],
    }


def rollout_figures(state: ControllerState) -> dict[str, Any]:
    """The rollouts as the page shows them: each one's state, and every decision that changed
    something, newest first (taken on the event loop: pushes change the state)."""
    if state.rollouts is None:
        return {"enabled": False, "rollouts": [], "changes": []}
    status = state.rollouts.status()
    changes = sorted(
        (event for rollout in status["rollouts"] for event in rollout["events"]),
        key=lambda event: event["at"],
        reverse=True,
    )[:DECISIONS_SHOWN]
    return {"enabled": True, "rollouts": status["rollouts"], "changes": changes}


# --------------------------------------------------------------------------------------------
# Figures: what the page shows, as JSON-ready data


def build_figures(
    window: Window,
    now: float,
    hourly: Iterable[UsageRow],
    pool_samples: Iterable[tuple[float, str, PoolSample]],
    slo_samples: Iterable[tuple[float, str, SloSample]],
    decisions: Iterable[ScalingDecision],
) -> dict[str, Any]:
    """The dashboard's figures over ``window`` ending at ``now``, from the ledger's rows."""
    since = now - window.seconds
    hours = list(range(hour_start(since), hour_start(now) + 1, HOUR_S))
    index = {hour: i for i, hour in enumerate(hours)}
    by_tenant: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(hours))
    by_pool: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(hours))
    for row in hourly:
        if row.hour not in index or row.pool is None:
            continue
        by_tenant[row.tenant][index[row.hour]] += row.totals.usd
        by_pool[row.pool][index[row.hour]] += row.totals.usd

    def cost_series(series: dict[str, list[float]]) -> list[dict[str, Any]]:
        return [
            {"name": name, "total_usd": sum(usd), "usd": usd}
            for name, usd in sorted(series.items())
        ]

    bucket = window.bucket_s
    pools: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    latest: dict[str, dict[str, Any]] = {}
    for at, pool, sample in pool_samples:  # in time order: the last one of a bucket wins
        latest[pool] = {"at": at, **asdict(sample)}
        start = math.floor(at / bucket) * bucket
        point = pools[pool].get(start)
        if point is None:
            pools[pool][start] = point = {"at": start, "samples": 0, "queued": 0, "running": 0}
        point["samples"] += 1
        point["replicas"] = sample.replicas
        point["desired"] = sample.desired
        point["queued"] = max(point["queued"], sample.queued)
        point["running"] = max(point["running"], sample.running)

    classes: dict[str, dict[float, list[int]]] = defaultdict(dict)
    for at, name, slo in slo_samples:
        start = math.floor(at / bucket) * bucket
        counts = classes[name].setdefault(start, [0, 0, 0, 0])
        for i, value in enumerate((slo.ttft_met, slo.ttft_total, slo.tpot_met, slo.tpot_total)):
            counts[i] += value

    return {
        "object": "dashboard",
        "window": {
            "name": window.name,
            "label": window.label,
            "since": since,
            "until": now,
            "bucket_s": bucket,
        },
        "cost": {
            "hours": hours,
            "total_usd": sum(sum(usd) for usd in by_tenant.values()),
            "by_tenant": cost_series(by_tenant),
            "by_pool": cost_series(by_pool),
        },
        "slo": [
            {
                "name": name,
                **_slo_counts(*_column_sums(points.values())),
                "points": [
                    {"at": at, **_slo_counts(*counts)} for at, counts in sorted(points.items())
                ],
            }
            for name, points in sorted(classes.items())
        ],
        "pools": [
            {"name": name, "latest": latest[name], "points": [points[at] for at in sorted(points)]}
            for name, points in sorted(pools.items())
        ],
        "decisions": [
            {
                "at": d.at,
                "pool": d.pool,
                "current": d.current,
                "desired": d.desired,
                "reasons": list(d.reasons),
                "applied": d.applied,
                "error": d.error,
            }
            for d in decisions
        ],
    }


def _column_sums(rows: Iterable[list[int]]) -> list[int]:
    sums = [0, 0, 0, 0]
    for row in rows:
        for i, value in enumerate(row):
            sums[i] += value
    return sums


def _slo_counts(ttft_met: int, ttft_total: int, tpot_met: int, tpot_total: int) -> dict[str, Any]:
    return {
        "ttft_met": ttft_met,
        "ttft_total": ttft_total,
        "ttft_attainment": ttft_met / ttft_total if ttft_total else None,
        "tpot_met": tpot_met,
        "tpot_total": tpot_total,
        "tpot_attainment": tpot_met / tpot_total if tpot_total else None,
    }


# --------------------------------------------------------------------------------------------
# Charts: SVG drawn with matplotlib, on the render thread

_RC = {
    "svg.fonttype": "none",  # text stays <text> (selectable, and names stay searchable)
    "text.parse_math": False,  # a '$' in a name is a dollar sign, not mathtext
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
_PALETTE = [matplotlib.colormaps["tab10"](i) for i in range(10)]


def _dates(epochs: Iterable[float]) -> list[float]:
    return [float(mdates.date2num(datetime.fromtimestamp(t, UTC))) for t in epochs]


def _colours(names: Iterable[str]) -> dict[str, Any]:
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(sorted(set(names)))}


def _time_axis(ax: Axes, start: float, end: float) -> None:
    locator = mdates.AutoDateLocator(tz=UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    low, high = _dates((start, end))
    ax.set_xlim(low, high)


def _legend(ax: Axes, handles: list[Any], labels: list[str]) -> None:
    # Explicit handles and labels: matplotlib would drop an automatic label starting with "_".
    ax.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize="small",
    )


def _gaps(
    points: Sequence[dict[str, Any]], key: str, bucket: int
) -> tuple[list[float], list[float]]:
    """x (dates) and y of one series, broken (NaN) where buckets are missing, so that a gap in
    the samples is not drawn as a flat line."""
    xs: list[float] = []
    ys: list[float] = []
    previous: float | None = None
    for point in points:
        if previous is not None and point["at"] - previous > bucket:
            xs.append(previous + bucket)
            ys.append(math.nan)
        value = point[key]
        xs.append(point["at"])
        ys.append(math.nan if value is None else value)
        previous = point["at"]
    return _dates(xs), ys


def _cost_chart(
    fig: Figure, chart: str, figures: dict[str, Any], key: str, colours: dict[str, Any]
) -> None:
    cost = figures["cost"]
    series = cost[key]
    ax = fig.add_subplot()
    starts = _dates(h + HOUR_S / 2 for h in cost["hours"])
    width = 0.9 / 24  # days: 90% of an hour
    bottom = [0.0] * len(starts)
    handles: list[Any] = []
    for i, item in enumerate(series):
        usd = item["usd"]
        # Stacked, one bar per hour with a cost: an empty hour draws nothing (a week of tenants
        # would otherwise be thousands of zero-height bars in the SVG).
        spent = [j for j, value in enumerate(usd) if value]
        bars = ax.bar(
            [starts[j] for j in spent],
            [usd[j] for j in spent],
            width=width,
            bottom=[bottom[j] for j in spent],
            color=colours[item["name"]],
        )
        for j, bar in zip(spent, bars, strict=True):
            bar.set_gid(f"{chart}-bar-{i}-{j}")
        handles.append(Patch(color=colours[item["name"]]))
        bottom = [b + v for b, v in zip(bottom, usd, strict=True)]
    _legend(ax, handles, [f"{s['name']} (${s['total_usd']:,.2f})" for s in series])
    ax.set_ylabel("USD per hour")
    ax.set_ylim(bottom=0)
    _time_axis(ax, cost["hours"][0], cost["hours"][-1] + HOUR_S)


def _slo_chart(fig: Figure, chart: str, figures: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    bucket = figures["window"]["bucket_s"]
    colours = _colours(c["name"] for c in figures["slo"])
    handles: list[Any] = []
    labels: list[str] = []
    n = 0
    for item in figures["slo"]:
        for metric, style in (("ttft", "-"), ("tpot", "--")):
            xs, ys = _gaps(item["points"], f"{metric}_attainment", bucket)
            ys = [y * 100 for y in ys]
            (line,) = ax.plot(
                xs,
                ys,
                linestyle=style,
                color=colours[item["name"]],
                marker="." if len(xs) < 40 else None,
            )
            line.set_gid(f"{chart}-line-{n}")
            n += 1
            handles.append(line)
            labels.append(f"{item['name']} {metric.upper()}")
    _legend(ax, handles, labels)
    ax.set_ylabel("met the SLO")
    ax.set_ylim(0, 105)
    ax.yaxis.set_major_formatter(PercentFormatter())
    _time_axis(ax, figures["window"]["since"], figures["window"]["until"])


def _pool_chart(
    fig: Figure,
    chart: str,
    figures: dict[str, Any],
    keys: Sequence[str],
    colours: dict[str, Any],
) -> None:
    ax = fig.add_subplot()
    bucket = figures["window"]["bucket_s"]
    handles: list[Any] = []
    labels: list[str] = []
    n = 0
    styles = ("-", "--")
    for item in figures["pools"]:
        for key, style in zip(keys, styles, strict=False):
            xs, ys = _gaps(item["points"], key, bucket)
            (line,) = ax.plot(
                xs,
                ys,
                linestyle=style,
                drawstyle="steps-post",
                color=colours[item["name"]],
                marker="." if len(xs) < 40 else None,
            )
            line.set_gid(f"{chart}-line-{n}")
            n += 1
            handles.append(line)
            labels.append(f"{item['name']} {key}" if len(keys) > 1 else item["name"])
    _legend(ax, handles, labels)
    ax.set_ylabel(" / ".join(keys))
    ax.set_ylim(bottom=0)
    ax.yaxis.get_major_locator().set_params(integer=True)
    _time_axis(ax, figures["window"]["since"], figures["window"]["until"])


def _svg(chart: str, draw: Callable[[Figure], None], width_in: float) -> str:
    # The salt makes each chart's internal ids (clip paths, markers) differ from the other
    # charts' on the same page; inline SVGs share one id space.
    with matplotlib.rc_context({**_RC, "svg.hashsalt": chart}):
        fig = Figure(figsize=(width_in, CHART_HEIGHT_IN), layout="constrained")
        draw(fig)
        out = io.StringIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    # Drop the XML prolog and DOCTYPE: the <svg> element goes inside HTML.
    return text[text.index("<svg") :]


def render_charts(figures: dict[str, Any]) -> dict[str, str | None]:
    """Each chart's SVG, or None where it has no data to show."""
    cost, slo, pools = figures["cost"], figures["slo"], figures["pools"]
    draw = functools.partial
    tenant_colours = _colours(s["name"] for s in cost["by_tenant"])
    # One colour per pool on every chart, whichever pools each chart has.
    pool_colours = _colours([*(s["name"] for s in cost["by_pool"]), *(p["name"] for p in pools)])
    # (chart, has data, how to draw it, width in inches: the SLO chart spans the page)
    charts: list[tuple[str, bool, Callable[[Figure], None], float]] = [
        (
            "cost-tenant",
            bool(cost["by_tenant"]),
            draw(
                _cost_chart,
                chart="cost-tenant",
                figures=figures,
                key="by_tenant",
                colours=tenant_colours,
            ),
            CHART_WIDTH_IN,
        ),
        (
            "cost-pool",
            bool(cost["by_pool"]),
            draw(
                _cost_chart, chart="cost-pool", figures=figures, key="by_pool", colours=pool_colours
            ),
            CHART_WIDTH_IN,
        ),
        (
            "replicas",
            bool(pools),
            draw(
                _pool_chart,
                chart="replicas",
                figures=figures,
                keys=("replicas", "desired"),
                colours=pool_colours,
            ),
            CHART_WIDTH_IN,
        ),
        (
            "queue",
            bool(pools),
            draw(
                _pool_chart, chart="queue", figures=figures, keys=("queued",), colours=pool_colours
            ),
            CHART_WIDTH_IN,
        ),
        ("slo", bool(slo), draw(_slo_chart, chart="slo", figures=figures), 2 * CHART_WIDTH_IN),
    ]
    return {
        chart: _svg(chart, drawing, width) if has_data else None
        for chart, has_data, drawing, width in charts
    }


# --------------------------------------------------------------------------------------------
# The page

_TEMPLATES = Environment(
    loader=PackageLoader("runtime.controller", "templates"),
    autoescape=True,  # every name and reason is text, never markup
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


_TEMPLATES.filters["utc"] = _utc


def render_page(figures: dict[str, Any], fleet_name: str) -> str:
    """The dashboard page for ``figures`` (on the render thread: it draws the charts)."""
    charts = {
        chart: None if svg is None else Markup(svg)  # matplotlib's own SVG, its text escaped
        for chart, svg in render_charts(figures).items()
    }
    return _TEMPLATES.get_template("dashboard.html").render(
        fleet_name=fleet_name,
        figures=figures,
        charts=charts,
        windows=WINDOWS.values(),
        default_window=DEFAULT_WINDOW,
    )
