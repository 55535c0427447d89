"""`fleetform plan`: instance right-sizing with the cost/latency Pareto frontier, and what the
declared fleet costs per pool and per tenant.

`build_report` is pure (spec, catalog and options in; a `PlanReport` out); `render` turns a
report into rich tables and `PlanReport.to_json` into a machine-readable document.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from runtime.catalog import Catalog, InstanceRecord
from runtime.costmodel import Option, PerformanceModel, Slo, Workload, enumerate_options
from runtime.spec import HOURS_PER_MONTH, FleetSpec, ModelSpec, PoolSpec, Quality, SloClassSpec

# Without a stack, operating points stay within this fraction of the SLO (the spec's default
# `routing.slo_headroom`), leaving a margin for prediction error.
DEFAULT_PLANNING_MARGIN = 0.8


@cache
def builtin_models() -> dict[str, ModelSpec]:
    """Well-known model shapes for planning without a stack (`runtime/data/models.yaml`)."""
    text = resources.files("runtime").joinpath("data/models.yaml").read_text(encoding="utf-8")
    return {m["name"]: ModelSpec.model_validate(m) for m in yaml.safe_load(text)["models"]}


_SLO_PAIR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:ms)?\s*/\s*(\d+(?:\.\d+)?)\s*(?:ms)?\s*$")


@dataclass(frozen=True, slots=True)
class SloChoice:
    """The objective options are sized for, with what the class allows."""

    name: str
    slo: Slo
    min_quality: Quality
    spot_eligible: bool


def parse_slo(text: str, spec: FleetSpec | None = None) -> SloChoice:
    """An SLO given as a class of the stack (`critical`) or as `TTFT_MS/TPOT_MS` (`800/60`)."""
    if spec is not None:
        for slo_class in spec.slo_classes:
            if slo_class.name == text:
                return _choice_of(slo_class)
    match = _SLO_PAIR.match(text)
    if not match:
        known = (
            f" or a class of the stack ({', '.join(c.name for c in spec.slo_classes)})"
            if spec
            else ""
        )
        raise ValueError(f"--slo: expected TTFT_MS/TPOT_MS such as 800/60{known}, got {text!r}")
    ttft, tpot = float(match.group(1)), float(match.group(2))
    if ttft <= 0 or tpot <= 0:
        raise ValueError("--slo: both targets must be positive")
    return SloChoice(
        name=f"{ttft:g}/{tpot:g} ms",
        slo=Slo(ttft / 1000, tpot / 1000),
        min_quality=Quality.low,
        spot_eligible=True,
    )


def _choice_of(slo_class: SloClassSpec) -> SloChoice:
    return SloChoice(
        name=slo_class.name,
        slo=Slo(ttft_s=slo_class.ttft_ms / 1000, tpot_s=slo_class.tpot_ms / 1000),
        min_quality=Quality[slo_class.min_quality],
        spot_eligible=slo_class.spot_eligible,
    )


def default_slo_for(spec: FleetSpec, model: ModelSpec) -> SloChoice:
    """The most important class of the stack that some variant of `model` is good enough for."""
    best = max(Quality[v.quality] for v in model.variants)
    for slo_class in sorted(spec.slo_classes, key=lambda c: c.priority):
        if Quality[slo_class.min_quality] <= best:
            return _choice_of(slo_class)
    return _choice_of(min(spec.slo_classes, key=lambda c: c.priority))


# --------------------------------------------------------------------------------------------
# The declared fleet's cost


@dataclass(frozen=True, slots=True)
class PoolCost:
    pool: str
    cloud: str
    region: str
    instance_type: str
    priced_as: str | None
    accelerator: str
    spot: bool
    replicas: int
    max_replicas: int
    usd_per_hour: float  # at the desired replica count
    usd_per_hour_at_max: float
    usd_per_month: float
    usd_per_month_at_max: float


@dataclass(frozen=True, slots=True)
class TenantShare:
    tenant: str
    pools: list[str]
    usd_per_month: float
    quota_usd_per_month: float | None


@dataclass(frozen=True, slots=True)
class FleetCost:
    pools: list[PoolCost]
    tenants: list[TenantShare]
    unallocated_usd_per_month: float
    total_usd_per_hour: float
    total_usd_per_month: float
    max_usd_per_month: float
    budget_usd_per_month: float | None


def pool_hourly_usd(pool: PoolSpec, record: InstanceRecord, replicas: int) -> float:
    """What `replicas` nodes of the pool cost per hour: spot beyond the on-demand base."""
    on_demand = record.on_demand_usd_per_hour or 0.0
    if not pool.spot:
        return replicas * on_demand
    base = min(pool.on_demand_base, replicas)
    return base * on_demand + (replicas - base) * (record.spot_usd_per_hour or 0.0)


def tenant_may_use(spec: FleetSpec, tenant_name: str, pool: PoolSpec) -> bool:
    tenant = spec.tenant(tenant_name)
    pool_ok = tenant.allowed_pools is None or pool.name in tenant.allowed_pools
    model_ok = tenant.allowed_models is None or pool.serves.model in tenant.allowed_models
    return pool_ok and model_ok


def fleet_cost(spec: FleetSpec, catalog: Catalog) -> FleetCost:
    """Hourly and monthly cost per pool, and each tenant's estimated share.

    A pool's cost is shared among the tenants allowed on it in proportion to their
    tokens-per-minute quotas (an unlimited tenant weighs as much as the largest quota on the
    pool): an estimate of who the capacity is provisioned for, until the usage ledger says who
    used it.
    """
    pools: list[PoolCost] = []
    shares: dict[str, float] = {t.name: 0.0 for t in spec.tenants}
    tenant_pools: dict[str, list[str]] = {t.name: [] for t in spec.tenants}
    unallocated = 0.0
    for pool in spec.pools:
        ref = pool.price_ref
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
        hourly = pool_hourly_usd(pool, record, pool.replicas)
        hourly_max = pool_hourly_usd(pool, record, pool.max_replicas)
        pools.append(
            PoolCost(
                pool=pool.name,
                cloud=pool.cloud,
                region=pool.region,
                instance_type=pool.instance_type,
                priced_as=(
                    f"{ref.cloud}/{ref.region}/{ref.instance_type}" if pool.priced_as else None
                ),
                accelerator=(
                    f"{record.accelerator_count:g}x {record.accelerator_name}"
                    if record.accelerator_name and pool.cloud != "local"
                    else "cpu"
                ),
                spot=pool.spot,
                replicas=pool.replicas,
                max_replicas=pool.max_replicas,
                usd_per_hour=hourly,
                usd_per_hour_at_max=hourly_max,
                usd_per_month=hourly * HOURS_PER_MONTH,
                usd_per_month_at_max=hourly_max * HOURS_PER_MONTH,
            )
        )
        users = [t.name for t in spec.tenants if tenant_may_use(spec, t.name, pool)]
        if not users:
            unallocated += hourly * HOURS_PER_MONTH
            continue
        quotas = {name: spec.tenant(name).quotas.tokens_per_minute for name in users}
        largest = max((q for q in quotas.values() if q), default=1)
        weights = {name: float(q or largest) for name, q in quotas.items()}
        total_weight = sum(weights.values())
        for name in users:
            shares[name] += hourly * HOURS_PER_MONTH * weights[name] / total_weight
            tenant_pools[name].append(pool.name)
    total_hourly = sum(p.usd_per_hour for p in pools)
    return FleetCost(
        pools=pools,
        tenants=[
            TenantShare(
                tenant=t.name,
                pools=tenant_pools[t.name],
                usd_per_month=shares[t.name],
                quota_usd_per_month=t.quotas.usd_per_month,
            )
            for t in spec.tenants
        ],
        unallocated_usd_per_month=unallocated,
        total_usd_per_hour=total_hourly,
        total_usd_per_month=total_hourly * HOURS_PER_MONTH,
        max_usd_per_month=sum(p.usd_per_month_at_max for p in pools),
        budget_usd_per_month=spec.budget.usd_per_month if spec.budget else None,
    )


# --------------------------------------------------------------------------------------------
# Right-sizing options


@dataclass(frozen=True, slots=True)
class ModelOptions:
    model: str
    slo: str
    markets: str
    workload: Workload
    rate_rps: float | None
    considered: int  # feasible options before collapsing and the row limit
    options: list[Option]
    reason: str | None = None  # why there are none


@dataclass(frozen=True, slots=True)
class PlanReport:
    stack: str | None
    models: list[ModelOptions]
    fleet: FleetCost | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "options": [
                {
                    "model": m.model,
                    "slo": m.slo,
                    "markets": m.markets,
                    "workload": asdict(m.workload),
                    "rate_rps": m.rate_rps,
                    "feasible": m.considered,
                    "reason": m.reason,
                    "rows": [asdict(o) for o in m.options],
                }
                for m in self.models
            ],
            "fleet": asdict(self.fleet) if self.fleet else None,
            "notes": self.notes,
        }


def candidate_records(
    catalog: Catalog,
    clouds: Sequence[str] | None,
    regions: Sequence[str] | None,
) -> list[InstanceRecord]:
    return [
        record
        for record in catalog.records()
        if (not clouds or record.cloud in clouds) and (not regions or record.region in regions)
    ]


def stack_regions(spec: FleetSpec) -> list[str]:
    """Regions a stack already uses (its pools', or what local/kubernetes pools are priced as)."""
    return sorted({pool.price_ref.region for pool in spec.pools})


def collapse_scaled(options: Sequence[Option]) -> list[Option]:
    """Keep the smallest of instances that are the same offer at a larger scale.

    Multi-device sizes of one family (tpu-v6e-4 ... tpu-v6e-256, p5.4xlarge and p5.48xlarge)
    often give the same USD per token and latency; the smallest one is the right-sized choice
    and the others only repeat it. `options` must be sorted cheapest first.
    """
    kept: list[Option] = []
    seen: dict[tuple[object, ...], Option] = {}
    for option in options:
        family = option.accelerator.split("x ", 1)[-1]
        key = (option.cloud, option.region, family, option.spot, option.model, option.variant)
        previous = seen.get(key)
        if (
            previous is not None
            and math.isclose(
                previous.usd_per_million_output_tokens,
                option.usd_per_million_output_tokens,
                rel_tol=0.005,
            )
            and math.isclose(previous.latency_s, option.latency_s, rel_tol=0.005)
        ):
            if option.usd_per_hour < previous.usd_per_hour:
                kept[kept.index(previous)] = option
                seen[key] = option
            continue
        seen[key] = option
        kept.append(option)
    return kept


def options_for_model(
    model: ModelSpec,
    choice: SloChoice,
    records: Iterable[InstanceRecord],
    *,
    workload: Workload,
    rate_rps: float | None,
    limit: int,
    perf: PerformanceModel,
    planning_margin: float,
    market: str = "any",
) -> ModelOptions:
    """The feasible options for a model, cheapest first: every Pareto option plus the cheapest
    others up to `limit` rows (0: all)."""
    markets: tuple[bool, ...] = {"any": (False, True), "spot": (True,), "on-demand": (False,)}[
        market
    ]
    if not choice.spot_eligible:
        markets = tuple(m for m in markets if not m)
    market_text = "+".join("spot" if m else "on-demand" for m in markets) or "none"
    variants = [v for v in model.variants if Quality[v.quality] >= choice.min_quality]
    empty = ModelOptions(model.name, choice.name, market_text, workload, rate_rps, 0, [])
    if not variants:
        return replace(
            empty,
            reason=f"no variant of {model.name} has quality {choice.min_quality.name} or better, "
            f"which class {choice.name!r} requires",
        )
    if not markets:
        return replace(empty, reason=f"class {choice.name!r} is not spot-eligible")
    options = enumerate_options(
        model,
        variants,
        records,
        workload=workload,
        slo=choice.slo,
        perf=perf,
        rate_rps=rate_rps,
        planning_margin=planning_margin,
        markets=markets,
    )
    collapsed = collapse_scaled(options)
    if limit > 0:
        budget = max(limit, sum(o.pareto for o in collapsed))
        shown = [o for o in collapsed if o.pareto]
        for option in collapsed:
            if len(shown) >= budget:
                break
            if not option.pareto:
                shown.append(option)
        order = {id(o): i for i, o in enumerate(collapsed)}
        shown.sort(key=lambda o: order[id(o)])
    else:
        shown = collapsed
    reason = None if options else "no instance in the considered regions meets the SLO"
    return replace(empty, considered=len(options), options=shown, reason=reason)


def build_report(
    *,
    catalog: Catalog,
    spec: FleetSpec | None,
    stack: str | None,
    models: Sequence[ModelSpec],
    slo_text: str | None,
    workload: Workload,
    rate_rps: float | None,
    clouds: Sequence[str] | None,
    regions: Sequence[str] | None,
    limit: int,
    market: str = "any",
    perf: PerformanceModel | None = None,
) -> PlanReport:
    perf = perf or PerformanceModel.default()
    notes: list[str] = []
    if spec is None and slo_text is None:
        raise ValueError("--slo is required without a stack (e.g. --slo 800/60)")
    if spec is not None and not regions:
        regions = stack_regions(spec)
        notes.append(
            f"options limited to the stack's regions ({', '.join(regions)}); "
            "--region or --all-regions to widen"
        )
    margin = spec.routing.slo_headroom if spec is not None else DEFAULT_PLANNING_MARGIN
    notes.append(f"operating points keep latencies within {margin:.0%} of the SLO")
    if perf.cpu.source == "assumption":
        notes.append(
            f"CPU speeds are an assumption ({perf.cpu.bandwidth_gbps_per_vcpu:g} GB/s and "
            f"{perf.cpu.gflops_per_vcpu:g} GFLOPS per vCPU), not a measurement"
        )
    records = candidate_records(catalog, clouds, regions)
    per_model = []
    for model in models:
        if slo_text is not None:
            choice = parse_slo(slo_text, spec)
        else:
            assert spec is not None
            choice = default_slo_for(spec, model)
        per_model.append(
            options_for_model(
                model,
                choice,
                records,
                workload=workload,
                rate_rps=rate_rps,
                limit=limit,
                perf=perf,
                planning_margin=margin,
                market=market,
            )
        )
    fleet = fleet_cost(spec, catalog) if spec is not None else None
    return PlanReport(stack=stack, models=per_model, fleet=fleet, notes=notes)


# --------------------------------------------------------------------------------------------
# Rendering


def _usd(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"${value:,.{digits}f}"


def render(report: PlanReport, console: Console) -> None:
    for model_options in report.models:
        w = model_options.workload
        title = (
            f"{model_options.model}: options within SLO {model_options.slo}, "
            f"{model_options.markets} "
            f"(prompt {w.prompt_tokens:g}, output {w.output_tokens:g} tokens"
            + (f", {model_options.rate_rps:g} req/s" if model_options.rate_rps else "")
            + f"; {len(model_options.options)} of {model_options.considered} feasible shown)"
        )
        table = Table(title=title, title_justify="left", header_style="bold")
        for column, justify in (
            ("", "left"),
            ("cloud", "left"),
            ("region", "left"),
            ("instance", "left"),
            ("accelerator", "left"),
            ("market", "left"),
            ("variant", "left"),
            ("USD/h", "right"),
            ("tok/s", "right"),
            ("USD/Mtok", "right"),
            ("TTFT ms", "right"),
            ("TPOT ms", "right"),
            ("SLO headroom", "right"),
        ):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        if model_options.rate_rps:
            table.add_column("nodes", justify="right")
            table.add_column("fleet USD/h", justify="right")
        for o in model_options.options:
            row = [
                "[green]*[/green]" if o.pareto else "",
                o.cloud,
                o.region,
                o.instance_type,
                o.accelerator,
                "spot" if o.spot else "on-demand",
                o.variant,
                _usd(o.usd_per_hour, 3),
                f"{o.output_tokens_per_s:,.0f}",
                _usd(o.usd_per_million_output_tokens, 3),
                f"{o.ttft_s * 1000:,.0f}",
                f"{o.tpot_s * 1000:,.1f}",
                f"{o.headroom:.2f}x",
            ]
            if model_options.rate_rps:
                row += [str(o.instances), _usd(o.fleet_usd_per_hour)]
            table.add_row(*row)
        if not model_options.options:
            console.print(
                f"[yellow]{model_options.model}: no option for SLO {model_options.slo}: "
                f"{model_options.reason}[/yellow]\n"
            )
        else:
            console.print(table)
            console.print(
                "  [green]*[/green] Pareto frontier: no other option is both cheaper per token and "
                "faster. SLO headroom: SLO / unloaded latency (the tighter of TTFT and TPOT).\n"
            )

    fleet = report.fleet
    if fleet is not None:
        table = Table(
            title=f"Declared fleet cost ({report.stack})", title_justify="left", header_style="bold"
        )
        for column in (
            "pool",
            "cloud",
            "region",
            "instance",
            "accelerator",
            "market",
            "replicas",
            "USD/h",
            "USD/month",
            "USD/month at max",
        ):
            table.add_column(
                column, justify="right" if column.startswith(("USD", "replicas")) else "left"
            )
        for p in fleet.pools:
            table.add_row(
                p.pool,
                p.cloud,
                p.region,
                p.instance_type + (f" (as {p.priced_as})" if p.priced_as else ""),
                p.accelerator,
                "spot" if p.spot else "on-demand",
                f"{p.replicas}/{p.max_replicas}",
                _usd(p.usd_per_hour),
                _usd(p.usd_per_month, 0),
                _usd(p.usd_per_month_at_max, 0),
            )
        table.add_section()
        table.add_row(
            "total",
            "",
            "",
            "",
            "",
            "",
            "",
            _usd(fleet.total_usd_per_hour),
            _usd(fleet.total_usd_per_month, 0),
            _usd(fleet.max_usd_per_month, 0),
        )
        console.print(table)
        if fleet.budget_usd_per_month is not None:
            within = fleet.max_usd_per_month <= fleet.budget_usd_per_month
            colour = "green" if within else "red"
            console.print(
                f"  budget {_usd(fleet.budget_usd_per_month, 0)}/month: at max replicas the fleet "
                f"costs [{colour}]{_usd(fleet.max_usd_per_month, 0)}[/{colour}] "
                f"({fleet.max_usd_per_month / fleet.budget_usd_per_month:.0%} of budget)\n"
            )
        if fleet.tenants:
            table = Table(
                title="Tenant share (pool cost split by tokens/min quota)",
                title_justify="left",
                header_style="bold",
            )
            for column in ("tenant", "pools", "USD/month", "quota USD/month"):
                table.add_column(
                    column, justify="right" if column.startswith(("USD", "quota")) else "left"
                )
            for t in fleet.tenants:
                over = t.quota_usd_per_month is not None and t.usd_per_month > t.quota_usd_per_month
                share = _usd(t.usd_per_month, 0)
                table.add_row(
                    t.tenant,
                    ", ".join(t.pools),
                    f"[red]{share}[/red]" if over else share,
                    _usd(t.quota_usd_per_month, 0),
                )
            if fleet.unallocated_usd_per_month:
                table.add_row("(no tenant)", "", _usd(fleet.unallocated_usd_per_month, 0), "")
            console.print(table)
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]")
