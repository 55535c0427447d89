"""Figures of a simulated run: the JSON document, the table, and the plots.

This module owns how a :class:`runtime.sim.simulator.Simulation` is summarised: cost, USD per
million output tokens, the ratio to the lower bound, SLO attainment per class, TTFT
percentiles, shed and failed counts with their reasons, replica-hours per pool. It computes
nothing about the fleet except one diagnostic: ``ttft_attainable``, the fraction of a class's
requests whose TTFT objective some pool allowed to serve them could meet even idle (prefill of
the prompt plus one decode step on the cost model), which separates misses no capacity could
prevent from misses a policy caused.

Attainment counts every request of the class: shed and failed requests missed their SLO.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.catalog import Catalog
from runtime.costmodel import PerformanceModel
from runtime.sim.bound import LowerBound
from runtime.sim.demand import pool_may_serve
from runtime.sim.simulator import Simulation
from runtime.sim.speed import pool_speed
from runtime.spec import FleetSpec

__all__ = ["plot_runs", "render_table", "summarise", "ttft_attainable"]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def ttft_attainable(
    spec: FleetSpec, sim: Simulation, *, catalog: Catalog, perf: PerformanceModel
) -> dict[str, float]:
    """Per class, the fraction of requests whose TTFT objective an idle allowed pool meets."""
    speeds = {p.name: pool_speed(spec, p, catalog, perf) for p in spec.pools}
    best: dict[tuple[str, str, str, int], float] = {}
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for record in sim.records:
        key = (record.slo_class, record.tenant, record.model, record.prompt_tokens)
        fastest = best.get(key)
        if fastest is None:
            fastest = math.inf
            for pool in spec.pools:
                if pool.serves.model != record.model or not pool_may_serve(
                    spec, pool, record.slo_class, record.tenant
                ):
                    continue
                speed = speeds[pool.name]
                if record.prompt_tokens >= speed.max_model_len:
                    continue
                ttft = speed.prefill_s(record.prompt_tokens) + speed.replica.decode_step_s(
                    1, record.prompt_tokens + 1
                )
                fastest = min(fastest, ttft)
            best[key] = fastest
        totals[record.slo_class] += 1
        if fastest <= spec.slo_class(record.slo_class).ttft_ms / 1000.0:
            hits[record.slo_class] += 1
    return {name: hits[name] / totals[name] for name in totals}


def summarise(
    *,
    spec: FleetSpec,
    sim: Simulation,
    bound: LowerBound | None,
    policy: str,
    trace: str,
    fleet: str,
    attainable: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's JSON document (the keys the issue names, and the context to read them)."""
    records = sim.records
    status = Counter(r.status for r in records)
    completed = [r for r in records if r.status == "completed"]
    output_tokens = sum(r.output_tokens for r in completed)
    cost = sum(sim.pool_cost_usd.values())
    ttfts = np.array([r.ttft_s for r in completed if r.ttft_s is not None])

    def reasons(kind: str) -> dict[str, int]:
        return dict(
            sorted(Counter(r.reason.split(":", 1)[0] for r in records if r.status == kind).items())
        )

    attainment: dict[str, dict[str, Any]] = {}
    ttft_by_class: dict[str, dict[str, float | None]] = {}
    for cls in spec.slo_classes:
        mine = [r for r in records if r.slo_class == cls.name]
        if not mine:
            continue
        n = len(mine)
        attainment[cls.name] = {
            "requests": n,
            "sheddable": cls.sheddable,
            "ttft": round(sum(r.ttft_ok for r in mine) / n, 5),
            "tpot": round(sum(r.tpot_ok for r in mine) / n, 5),
            "both": round(sum(r.ttft_ok and r.tpot_ok for r in mine) / n, 5),
            "ttft_attainable": _round(attainable.get(cls.name), 5) if attainable else None,
        }
        times = np.array([r.ttft_s for r in mine if r.ttft_s is not None])
        ttft_by_class[cls.name] = {
            "p50": _round(float(np.percentile(times, 50))) if times.size else None,
            "p99": _round(float(np.percentile(times, 99))) if times.size else None,
        }
    hours = sim.end_s / 3600.0
    document: dict[str, Any] = {
        "policy": policy,
        "trace": trace,
        "fleet": fleet,
        "requests": len(records),
        "completed": status.get("completed", 0),
        "shed": status.get("shed", 0),
        "failed": status.get("failed", 0),
        "shed_reasons": reasons("shed"),
        "failed_reasons": reasons("failed"),
        "cost_usd": round(cost, 4),
        "usd_per_hour": round(cost / hours, 4) if hours > 0 else None,
        "output_tokens": output_tokens,
        "usd_per_million_output_tokens": _round(cost / output_tokens * 1e6)
        if output_tokens
        else None,
        "lower_bound_usd": _round(bound.usd) if bound else None,
        "lower_bound_ratio": _round(cost / bound.usd, 3) if bound and bound.usd > 0 else None,
        "lower_bound_with_min_replicas_usd": _round(bound.usd_with_min_replicas) if bound else None,
        "lower_bound_with_min_replicas_ratio": (
            _round(cost / bound.usd_with_min_replicas, 3)
            if bound and bound.usd_with_min_replicas > 0
            else None
        ),
        "lower_bound_unservable_output_tokens": bound.unservable_output_tokens if bound else None,
        "slo_attainment": attainment,
        "p50_ttft_s": _round(float(np.percentile(ttfts, 50))) if ttfts.size else None,
        "p99_ttft_s": _round(float(np.percentile(ttfts, 99))) if ttfts.size else None,
        "ttft_by_class_s": ttft_by_class,
        "replica_hours": {k: round(v, 4) for k, v in sim.replica_hours.items()},
        "cost_by_pool_usd": {k: round(v, 4) for k, v in sim.pool_cost_usd.items()},
        "horizon_s": round(sim.end_s, 3),
        "wall_s": round(sim.wall_s, 2),
        "engine_steps": sim.steps,
        "events": sim.events,
        "plans": sim.plans,
        "kv_preemptions": sim.kv_preemptions,
        "spot_preemptions": sim.spot_preemptions,
        "retries": sim.retries,
        "notes": list(sim.notes),
        "timeline": sim.timeline,
    }
    if extra:
        document.update(extra)
    return document


# --------------------------------------------------------------------------------------------
# Table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render_table(documents: Sequence[Mapping[str, Any]], console: Any) -> None:
    """One row per run: the benchmark table."""
    from rich.table import Table

    classes: list[str] = []
    for doc in documents:
        for name in doc["slo_attainment"]:
            if name not in classes:
                classes.append(name)
    table = Table(title="Simulated runs", title_justify="left", header_style="bold")
    columns = [
        "trace",
        "fleet",
        "policy",
        "USD",
        "USD/h",
        "USD/Mtok",
        "x bound",
        "x bound+min",
        *[f"{c} TTFT/TPOT" for c in classes],
        "p50/p99 TTFT s",
        "shed",
        "failed",
        "wall s",
    ]
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("trace", "fleet", "policy") else "right"
        )
    for doc in documents:
        cells = [
            Path(str(doc["trace"])).stem.replace("AzureLLMInferenceTrace_", ""),
            Path(str(doc["fleet"])).stem.replace("Pulumi.", ""),
            str(doc["policy"]),
            f"{doc['cost_usd']:.2f}",
            f"{doc['usd_per_hour']:.2f}" if doc["usd_per_hour"] is not None else "-",
            f"{doc['usd_per_million_output_tokens']:.2f}"
            if doc["usd_per_million_output_tokens"] is not None
            else "-",
            f"{doc['lower_bound_ratio']:.2f}" if doc["lower_bound_ratio"] else "-",
            f"{doc['lower_bound_with_min_replicas_ratio']:.2f}"
            if doc["lower_bound_with_min_replicas_ratio"]
            else "-",
        ]
        for name in classes:
            a = doc["slo_attainment"].get(name)
            cells.append("-" if a is None else f"{_pct(a['ttft'])}/{_pct(a['tpot'])}")
        p50, p99 = doc["p50_ttft_s"], doc["p99_ttft_s"]
        cells += [
            "-" if p50 is None else f"{p50:.2f}/{p99:.2f}",
            str(doc["shed"]),
            str(doc["failed"]),
            f"{doc['wall_s']:.1f}",
        ]
        table.add_row(*cells)
    console.print(table)
    bounds = {
        (Path(str(d["trace"])).stem, Path(str(d["fleet"])).stem.replace("Pulumi.", "")): d
        for d in documents
        if d.get("lower_bound_usd") is not None
    }
    if bounds:
        console.print(
            "  x bound: cost / the lower bound (the cheapest instance mix of the stack serving each "
            "minute within SLO); x bound+min: the same with the stack's min_replicas as a floor."
        )
        for (trace, fleet), d in bounds.items():
            console.print(
                f"  {trace} on {fleet}: bound USD {d['lower_bound_usd']:.2f}, "
                f"with min_replicas USD {d['lower_bound_with_min_replicas_usd']:.2f}"
            )


# --------------------------------------------------------------------------------------------
# Plots


def plot_runs(documents: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Replicas per pool and cost over time for each run; with several runs, the cost-vs-latency
    Pareto frontier across them (USD per million output tokens against p99 TTFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(documents)
    pareto = len(runs) > 1
    rows = len(runs) + (1 if pareto else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(11, 3.6 * rows), squeeze=False)
    for ax, doc in zip(axes[:, 0], runs, strict=False):
        timeline = doc["timeline"]
        times = [row["t"] / 60.0 for row in timeline]
        pools = sorted({p for row in timeline for p in row["replicas"]})
        for pool in pools:
            counts = [row["replicas"].get(pool, 0) for row in timeline]
            if any(counts):
                ax.step(times, counts, where="post", label=pool)
        ax.set_xlabel("minutes")
        ax.set_ylabel("replicas")
        label = Path(str(doc["trace"])).stem.replace("AzureLLMInferenceTrace_", "")
        ax.set_title(
            f"{doc['policy']} on {label} ({Path(str(doc['fleet'])).name}): "
            f"USD {doc['cost_usd']:.2f}, x{doc['lower_bound_ratio'] or float('nan'):.2f} bound"
        )
        cost_ax = ax.twinx()
        cost_ax.plot(times, [row["cost_usd"] for row in timeline], "k--", label="cost (USD)")
        cost_ax.set_ylabel("cumulative USD")
        handles, labels = ax.get_legend_handles_labels()
        extra_h, extra_l = cost_ax.get_legend_handles_labels()
        ax.legend(handles + extra_h, labels + extra_l, fontsize=7, loc="upper left", ncol=3)
    if pareto:
        ax = axes[-1, 0]
        points = [
            (
                float(doc["usd_per_million_output_tokens"] or math.nan),
                float(doc["p99_ttft_s"] or math.nan),
                f"{doc['policy']} / {Path(str(doc['fleet'])).stem} / "
                f"{Path(str(doc['trace'])).stem.replace('AzureLLMInferenceTrace_', '')}",
            )
            for doc in runs
        ]
        for x, y, label in points:
            ax.scatter([x], [y])
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        frontier = _pareto(points)
        ax.plot(
            [p[0] for p in frontier],
            [p[1] for p in frontier],
            "o-",
            color="green",
            alpha=0.4,
            markersize=14,
            fillstyle="none",
        )
        ax.set_xlabel("USD per million output tokens")
        ax.set_ylabel("p99 TTFT (s)")
        ax.set_title("Cost vs latency across policies and fleets (circled: the Pareto frontier)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pareto(points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points no other point beats on both cost and latency, cheapest first."""
    frontier: list[tuple[float, float, str]] = []
    best = math.inf
    for point in sorted(p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])):
        if point[1] < best:
            frontier.append(point)
            best = point[1]
    return frontier
