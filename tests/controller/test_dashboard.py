"""The cost dashboard on a real controller (127.0.0.1) over a real SQLite ledger: the figures in
data.json against what was recorded, authentication (bearer, and the sign-in cookie that keeps
the token out of the URL), the empty state, escaping, the series prune, and the page itself in
headless Chromium (the charts are SVG with the data drawn, the decisions table, no request
leaves the controller, a screenshot)."""

from __future__ import annotations

import asyncio
import functools
import math
import shutil
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest

from runtime.controller.app import CONTROLLER
from runtime.controller.dashboard import COOKIE_NAME, SERIES_RETENTION_S, SESSION_TTL_S
from runtime.controller.ledger import HOUR_S, Ledger, PoolSample, SloSample, hour_start
from runtime.protocol import UsageDelta

from .support import ADMIN_TOKEN, FLEET_TOKEN, KEYS, T0, FakeClock, auth, controller, make_config

P = ParamSpec("P")
R = TypeVar("R")

H0 = hour_start(T0)
assert H0 == T0  # the figures below count on T0 being the start of an hour
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# (pool, tenant, hour, usd): binary fractions, so every sum is exact in floating point.
USAGE = [
    ("cheap", "alpha", H0 - 2 * HOUR_S, 0.5),
    ("cheap", "alpha", H0 - HOUR_S, 0.25),
    ("cheap", "beta", H0 - HOUR_S, 0.125),
    ("dear", "alpha", H0, 1.5),
    ("dear", "beta", H0, 2.0),
    ("dear", "beta", H0 - 30 * HOUR_S, 4.0),  # only in the 7-day window
]
# Every minute over the last 20 minutes, for two pools; and one two days ago.
POOL_SAMPLES = [
    (
        T0 - 1185 + 60 * k,
        {"cheap": PoolSample(1 + (k >= 12), 2, (3 * k) % 5, k), "dear": PoolSample(1, 1, 0, 2)},
    )
    for k in range(20)
] + [(T0 - 2 * 86_400, {"cheap": PoolSample(3, 3, 9, 9)})]
SLO_SAMPLES = [
    (
        T0 - 585 + 60 * k,
        {"standard": SloSample(k, 10, 10 - k % 3, 10), "batch": SloSample(5, 5, 4, 5)},
    )
    for k in range(10)
]
# (at, pool, current, desired, reasons, applied, error), oldest first.
DECISIONS = [
    (T0 - 600, "cheap", 1, 2, ["queue 7 > 4 per replica", "forecast 3.2 rps"], True, None),
    (T0 - 300, "dear", 2, 1, ["idle for 600 s"], False, "cloud quota exceeded"),
    (T0 - 60, "cheap", 2, 2, [], False, None),
]


def long_async_test(timeout_s: float) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, R]]:
    """Like ``support.async_test``, with a cap that fits launching a browser."""

    def wrap(fn: Callable[P, Awaitable[R]]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            async def capped() -> R:
                return await asyncio.wait_for(fn(*args, **kwargs), timeout_s)

            return asyncio.run(capped())

        return run

    return wrap


def async_test(fn: Callable[P, Awaitable[R]]) -> Callable[P, R]:
    return long_async_test(30)(fn)


def fill(path: Path, *, decisions: list[tuple[Any, ...]] = DECISIONS) -> None:
    """The recorded figures above, written into the ledger file at ``path``."""
    with Ledger(path) as ledger:
        for seq, (pool, tenant, hour, usd) in enumerate(USAGE):
            assert ledger.record_push(
                agent_id=f"agent-{pool}",
                boot_id="boot-1",
                seq=seq,
                instance_id=f"{pool}-1",
                pool=pool,
                sent_at=T0,
                received_at=T0,
                usage=[UsageDelta(tenant=tenant, hour=hour, requests=1, usd=usd)],
            )
        for at, pools in POOL_SAMPLES:
            ledger.record_pool_samples(at, pools)
        for at, classes in SLO_SAMPLES:
            ledger.record_slo_samples(at, classes)
        for decision in decisions:
            ledger.record_decision(*decision)


async def get_json(client: Any, path: str, **params: str) -> dict[str, Any]:
    response = await client.get(path, params=params, headers=auth(ADMIN_TOKEN))
    assert response.status == 200, await response.text()
    return await response.json()


def expected_cost(window_s: int) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """Hours of the window and USD per hour by tenant and by pool, from USAGE alone."""
    hours = list(range(hour_start(T0 - window_s), H0 + 1, HOUR_S))
    out: dict[str, dict[str, list[float]]] = {"tenant": {}, "pool": {}}
    for pool, tenant, hour, usd in USAGE:
        if hour in hours:
            for kind, name in (("tenant", tenant), ("pool", pool)):
                out[kind].setdefault(name, [0.0] * len(hours))[hours.index(hour)] += usd
    return hours, out


@async_test
async def test_data_json_has_exactly_what_was_recorded(tmp_path: Path) -> None:
    fill(tmp_path / "l.db")
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        for window, seconds, bucket in (
            ("1h", 3600, 60),
            ("24h", 86_400, 300),
            ("7d", 604_800, 1800),
        ):
            data = await get_json(client, "/dashboard/data.json", window=window)
            assert data["window"] == {
                "name": window,
                "label": data["window"]["label"],
                "since": T0 - seconds,
                "until": T0,
                "bucket_s": bucket,
            }
            hours, cost = expected_cost(seconds)
            assert data["cost"]["hours"] == hours
            for kind, key in (("tenant", "by_tenant"), ("pool", "by_pool")):
                assert data["cost"][key] == [
                    {"name": name, "total_usd": sum(usd), "usd": usd}
                    for name, usd in sorted(cost[kind].items())
                ], (window, kind)
            assert data["cost"]["total_usd"] == sum(
                usd for _, _, hour, usd in USAGE if hour in hours
            )

        # Hand-checked totals, so the test does not only agree with itself.
        day = await get_json(client, "/dashboard/data.json")  # 24h is the default
        assert day["window"]["name"] == "24h"
        assert {t["name"]: t["total_usd"] for t in day["cost"]["by_tenant"]} == {
            "alpha": 2.25,
            "beta": 2.125,
        }
        assert {p["name"]: p["total_usd"] for p in day["cost"]["by_pool"]} == {
            "cheap": 0.875,
            "dear": 3.5,
        }
        week = await get_json(client, "/dashboard/data.json", window="7d")
        assert week["cost"]["total_usd"] == 8.375

        # SLO: counts summed per class, over the window and per 5-minute bucket.
        slo = {c["name"]: c for c in day["slo"]}
        assert list(slo) == ["batch", "standard"]
        assert (slo["standard"]["ttft_met"], slo["standard"]["ttft_total"]) == (45, 100)
        assert (slo["standard"]["tpot_met"], slo["standard"]["tpot_total"]) == (91, 100)
        assert slo["standard"]["ttft_attainment"] == 0.45
        assert (slo["batch"]["tpot_met"], slo["batch"]["tpot_total"]) == (40, 50)
        buckets: dict[float, list[int]] = defaultdict(lambda: [0, 0])
        for at, classes in SLO_SAMPLES:
            buckets[math.floor(at / 300) * 300][0] += classes["standard"].ttft_met
            buckets[math.floor(at / 300) * 300][1] += classes["standard"].ttft_total
        assert [(p["at"], p["ttft_met"], p["ttft_total"]) for p in slo["standard"]["points"]] == [
            (at, met, total) for at, (met, total) in sorted(buckets.items())
        ]

        # Pools: the last replicas of each bucket, the largest queue.
        pools = {p["name"]: p for p in day["pools"]}
        expected: dict[float, dict[str, int]] = {}
        for at, samples in POOL_SAMPLES[:-1]:
            point = expected.setdefault(math.floor(at / 300) * 300, {"queued": 0, "samples": 0})
            point["replicas"] = samples["cheap"].replicas
            point["desired"] = samples["cheap"].desired
            point["queued"] = max(point["queued"], samples["cheap"].queued)
            point["samples"] += 1
        assert [
            (p["at"], p["replicas"], p["desired"], p["queued"], p["samples"])
            for p in pools["cheap"]["points"]
        ] == [
            (at, e["replicas"], e["desired"], e["queued"], e["samples"])
            for at, e in sorted(expected.items())
        ]
        assert sum(p["samples"] for p in pools["dear"]["points"]) == 20
        last_at, last = POOL_SAMPLES[-2]
        assert pools["cheap"]["latest"] == {
            "at": last_at,
            "replicas": last["cheap"].replicas,
            "desired": last["cheap"].desired,
            "queued": last["cheap"].queued,
            "running": last["cheap"].running,
        }
        # The sample from two days ago is only in the 7-day window.
        assert sum(p["samples"] for p in week["pools"][0]["points"]) == 21
        assert {p["queued"] for p in week["pools"][0]["points"]} >= {9}

        # Decisions: newest first, as recorded.
        assert day["decisions"] == [
            {
                "at": at,
                "pool": pool,
                "current": current,
                "desired": desired,
                "reasons": reasons,
                "applied": applied,
                "error": error,
            }
            for at, pool, current, desired, reasons, applied, error in reversed(DECISIONS)
        ]


@async_test
async def test_the_dashboard_needs_the_admin_token(tmp_path: Path) -> None:
    clock = FakeClock()
    async with controller(make_config(tmp_path / "l.db"), clock) as client:
        for path in ("/dashboard", "/dashboard/data.json"):
            for headers in ({}, auth("wrong"), auth(FLEET_TOKEN), auth(KEYS["alpha"])):
                response = await client.get(path, headers=headers)
                assert response.status == 401, (path, headers)
                body = await response.json()
                assert body["error"]["code"] == "invalid_api_key"
                assert ADMIN_TOKEN not in await response.text()
            assert (await client.get(path, headers=auth(ADMIN_TOKEN))).status == 200

        # A wrong token in the URL: 401 and no cookie.
        response = await client.get("/dashboard", params={"token": "wrong"}, allow_redirects=False)
        assert response.status == 401 and COOKIE_NAME not in response.cookies
        assert not list(client.session.cookie_jar)

        # The right one: a cookie, and a redirect to the same page without the token.
        response = await client.get(
            "/dashboard", params={"token": ADMIN_TOKEN, "window": "7d"}, allow_redirects=False
        )
        assert response.status == 303
        assert response.headers["Location"] == "/dashboard?window=7d"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        cookie = response.cookies[COOKIE_NAME]
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/dashboard"
        assert int(cookie["max-age"]) == SESSION_TTL_S
        assert ADMIN_TOKEN not in cookie.value  # a session, not the admin token itself
        session = {"Cookie": f"{COOKIE_NAME}={cookie.value}"}
        client.session.cookie_jar.clear()

        for path in ("/dashboard", "/dashboard/data.json"):
            assert (await client.get(path, headers=session)).status == 200
        # The session is for the dashboard only.
        assert (await client.get("/v1/fleet", headers=session)).status == 401
        assert (await client.get("/v1/usage", headers=session)).status == 401
        for forged in (
            ADMIN_TOKEN,
            f"{cookie.value[:-1]}{'0' if cookie.value[-1] != '0' else '1'}",
            f"{int(T0) + 10**6}.{cookie.value.partition('.')[2]}",  # a later expiry
            "not-a-session",
            "1.é",
        ):
            response = await client.get(
                "/dashboard/data.json", headers={"Cookie": f"{COOKIE_NAME}={forged}"}
            )
            assert response.status == 401, forged

        clock.advance(SESSION_TTL_S + 1)  # the server does not trust the browser's expiry
        assert (await client.get("/dashboard", headers=session)).status == 401


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"window": "2h"}, "window"),
        ({"colour": "blue"}, "colour"),
        ({"token": ADMIN_TOKEN}, "token"),  # data.json does not sign in
    ],
)
def test_bad_dashboard_parameters_get_a_400(
    tmp_path: Path, query: dict[str, str], param: str
) -> None:
    @async_test
    async def scenario() -> None:
        async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
            response = await client.get(
                "/dashboard/data.json", params=query, headers=auth(ADMIN_TOKEN)
            )
            assert response.status == 400
            assert (await response.json())["error"]["param"] == param
            if param != "token":
                response = await client.get("/dashboard", params=query, headers=auth(ADMIN_TOKEN))
                assert response.status == 400

    scenario()


@async_test
async def test_an_empty_ledger_shows_no_data_yet(tmp_path: Path) -> None:
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        data = await get_json(client, "/dashboard/data.json")
        assert data["cost"]["by_tenant"] == data["cost"]["by_pool"] == []
        assert data["cost"]["total_usd"] == 0
        assert data["slo"] == data["pools"] == data["decisions"] == []
        response = await client.get("/dashboard", headers=auth(ADMIN_TOKEN))
        assert response.status == 200
        assert response.content_type == "text/html"
        html = await response.text()
        assert "<svg" not in html
        # Five charts and the decisions table.
        assert html.count("No data yet") == 6


@async_test
async def test_free_text_is_escaped_everywhere(tmp_path: Path) -> None:
    evil = [
        (
            T0 - 10,
            "cheap",
            1,
            2,
            ["<script>alert(1)</script>", 'a "quoted" & <b>bold</b>'],
            True,
            None,
        ),
        (T0 - 5, "dear", 1, 0, ["idle"], False, "<img src=x onerror=alert(2)>"),
    ]
    fill(tmp_path / "l.db", decisions=evil)
    with Ledger(tmp_path / "l.db") as ledger:
        # Pool names come from the spec and are slugs; the ledger takes any text all the same.
        ledger.record_pool_samples(T0 - 30, {"<i>pool</i>": PoolSample(1, 1, 1, 1)})
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        response = await client.get("/dashboard", headers=auth(ADMIN_TOKEN))
        assert response.status == 200
        html = await response.text()
        assert "<script" not in html
        assert "<img" not in html
        assert "<b>" not in html and "<i>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "&lt;img src=x onerror=alert(2)&gt;" in html
        assert "&lt;i&gt;pool&lt;/i&gt;" in html  # in the table and in the chart legends
        assert "script-src" not in response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        data = await get_json(client, "/dashboard/data.json")
        assert data["decisions"][1]["reasons"][0] == "<script>alert(1)</script>"


@async_test
async def test_old_series_are_pruned_while_the_controller_runs(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        for at in (T0 - SERIES_RETENTION_S - 60, T0 - 86_400):
            ledger.record_pool_samples(at, {"cheap": PoolSample(1, 1, 0, 0)})
            ledger.record_decision(at, "cheap", 1, 1, [], True, None)
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        state = client.app[CONTROLLER]
        ledger = state.require_ledger()
        for _ in range(500):
            if len(await state.db(ledger.pool_samples)) == 1:
                break
            await asyncio.sleep(0.01)
        assert [at for at, _, _ in await state.db(ledger.pool_samples)] == [T0 - 86_400]
        assert [d.at for d in await state.db(ledger.recent_decisions)] == [T0 - 86_400]


@long_async_test(120)
async def test_the_page_in_a_browser(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    decisions = [
        *DECISIONS,
        (T0 - 30, "dear", 1, 1, ["<script>alert('x')</script> in a reason"], False, None),
    ]
    fill(tmp_path / "l.db", decisions=decisions)
    async with controller(make_config(tmp_path / "l.db"), FakeClock()) as client:
        base = str(client.make_url("/")).rstrip("/")
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(viewport={"width": 1400, "height": 900})
                outside: list[str] = []

                async def only_the_controller(route: Any) -> None:
                    if route.request.url.startswith(base + "/"):
                        await route.continue_()
                    else:
                        outside.append(route.request.url)
                        await route.abort()

                await context.route("**/*", only_the_controller)
                page = await context.new_page()
                problems: list[str] = []
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))

                # Without the token, the page is refused.
                response = await page.goto(f"{base}/dashboard")
                assert response is not None and response.status == 401
                problems.clear()  # the browser logs that 401; from here on nothing may fail

                response = await page.goto(f"{base}/dashboard?token={ADMIN_TOKEN}")
                assert response is not None and response.status == 200
                assert page.url == f"{base}/dashboard"  # the token is gone from the URL
                [cookie] = await context.cookies()
                assert cookie["name"] == COOKIE_NAME and cookie["httpOnly"] is True
                assert ADMIN_TOKEN not in cookie["value"]
                # HttpOnly: the page's own scripts (if it had any) could not read it.
                assert await page.evaluate("document.cookie") == ""

                _, cost = expected_cost(86_400)
                # One bar per hour with a cost, per series.
                bars = {
                    kind: sum(bool(v) for usd in cost[kind].values() for v in usd) for kind in cost
                }
                assert bars == {"tenant": 5, "pool": 3}
                drawn = {
                    # chart: (id prefix of the drawn series, how many, names in the legend)
                    "cost-tenant": ("cost-tenant-bar-", bars["tenant"], ["alpha", "beta"]),
                    "cost-pool": ("cost-pool-bar-", bars["pool"], ["cheap", "dear"]),
                    "slo": ("slo-line-", 4, ["batch TTFT", "standard TPOT"]),
                    "replicas": ("replicas-line-", 4, ["cheap replicas", "dear desired"]),
                    "queue": ("queue-line-", 2, ["cheap", "dear"]),
                }
                for chart, (prefix, count, names) in drawn.items():
                    figure = page.locator(f'figure[data-chart="{chart}"]')
                    assert await figure.locator("svg").count() == 1, chart
                    series = figure.locator(f'svg g[id^="{prefix}"]')
                    assert await series.count() == count, chart
                    # Each drawn series is a real path with geometry (a direct child: marker
                    # definitions are paths inside the group too).
                    paths = figure.locator(f'svg g[id^="{prefix}"] > path')
                    assert await paths.count() == count, chart
                    lengths = await paths.evaluate_all(
                        "ps => ps.map(p => (p.getAttribute('d') || '').length)"
                    )
                    assert min(lengths) > 10, (chart, lengths)
                    legend = " | ".join(await figure.locator("svg text").all_text_contents())
                    for name in names:
                        assert name in legend, (chart, name, legend)
                    box = await figure.locator("svg").bounding_box()
                    assert box is not None and box["width"] > 300 and box["height"] > 100
                assert "alpha ($2.25)" in " ".join(
                    await page.locator(
                        'figure[data-chart="cost-tenant"] svg text'
                    ).all_text_contents()
                )
                assert await page.locator(".empty").count() == 0

                rows = page.locator("#decisions tbody tr")
                assert await rows.count() == 4
                cells = [await rows.nth(i).locator("td").all_inner_texts() for i in range(4)]
                # Newest first: time, pool, current, desired, reasons, outcome.
                assert cells[0][1:4] == ["dear", "1", "1"]
                assert cells[0][4] == "<script>alert('x')</script> in a reason"
                assert cells[1][1:] == ["cheap", "2", "2", "\N{EN DASH}", "not applied"]
                assert cells[2][1:5] == ["dear", "2", "1", "idle for 600 s"]
                assert cells[2][5].split() == ["failed", "cloud", "quota", "exceeded"]
                assert cells[3][0] == "2025-03-12 11:50:00Z"
                reasons = await rows.nth(3).locator("td li").all_inner_texts()
                assert reasons == ["queue 7 > 4 per replica", "forecast 3.2 rps"]
                assert cells[3][5] == "applied"
                assert await page.locator("script").count() == 0

                screenshot = tmp_path / "dashboard.png"
                await page.screenshot(path=screenshot, full_page=True)
                assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                assert screenshot.stat().st_size > 50_000

                # The window links: the last hour holds two hours of cost.
                await page.click("text=Last hour")
                assert page.url == f"{base}/dashboard?window=1h"
                bars = page.locator(
                    'figure[data-chart="cost-tenant"] svg g[id^="cost-tenant-bar-"]'
                )
                assert await bars.count() == 2 * 2
                await page.screenshot(path=tmp_path / "dashboard-1h.png", full_page=True)

                assert outside == [], outside
                assert problems == [], problems
            finally:
                await browser.close()
