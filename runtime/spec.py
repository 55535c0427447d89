"""The fleet spec: the one contract every part of Fleetform reads.

`FleetSpec` (pydantic v2) describes models, their variants and rollouts between them, pools of
nodes, tenants with their quotas, SLO classes, and the routing and autoscaling settings. The
Pulumi program reads it from stack config (`fleetform:fleet`), the policy pack checks it, the
controller and agents get the parts they need, and the simulator replays traffic against it.

Validation happens in two passes: pydantic checks shapes, types, ranges and unknown keys; then
`cross_check` checks what spans fields (replica bounds, references between sections, catalog
lookups, whether a variant fits its hardware). Either way the caller gets one `FleetSpecError`
whose lines read `path: reason`, e.g. `pools[2].max_replicas: 1 is below min_replicas 3`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from runtime import costmodel
from runtime.catalog import Catalog, CatalogLookupError, default_catalog

_Named = TypeVar("_Named")

# Stack-config keys under which the Pulumi program (and `pulumi config`) keep the fleet.
FLEET_CONFIG_KEY = "fleetform:fleet"
REPLICAS_CONFIG_KEY = "fleetform:replicas"

HOURS_PER_MONTH = 730.0  # the convention cloud price calculators use

Name = Annotated[
    str,
    Field(
        pattern=r"^[a-z][a-z0-9-]{0,39}$",
        description="Lower-case letters, digits and '-', starting with a letter, at most 40 "
        "characters: names become cloud resource names, Kubernetes objects and tags.",
    ),
]
CloudName = Literal["aws", "gcp", "azure", "kubernetes", "local"]
CatalogCloud = Literal["aws", "gcp", "azure"]
AcceleratorKind = Literal["gpu", "cpu", "npu"]
Precision = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]
EngineKind = Literal["embedded", "openai-upstream"]
RoutingStrategy = Literal["cost-aware", "least-loaded", "round-robin"]
ForecastMethod = Literal["none", "holt-winters", "seasonal-naive"]
RolloutStrategy = Literal["replace", "canary", "shadow"]
ShadowCompare = Literal["token-agreement", "exact-match"]


class Quality(enum.IntEnum):
    """Output quality of a model variant, ordered: a higher value is closer to the reference."""

    low = 0
    standard = 1
    high = 2
    reference = 3


QualityName = Literal["low", "standard", "high", "reference"]

BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    # 4-bit formats carry per-block scales; 4.5 bits is the usual effective size (GGUF Q4_0).
    "int4": 0.5625,
}


class _Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Models


class VariantSpec(_Strict):
    """One servable form of a model: a precision with its weight size and quality."""

    name: Name
    precision: Precision
    weight_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Bytes of weights; defaults to parameters x bytes per parameter of the "
        "precision.",
    )
    quality: QualityName = Field(
        default="reference",
        description="How close the variant's output is to the reference model.",
    )
    runs_on: list[AcceleratorKind] = Field(
        default_factory=lambda: ["gpu", "cpu", "npu"],
        min_length=1,
        description="Accelerator kinds this variant may be placed on.",
    )
    source: str | None = Field(
        default=None,
        description="Where the weights come from: 'builtin:smollm2-135m-instruct', a GGUF "
        "path for the embedded engine, or the model id an OpenAI-compatible upstream serves.",
    )


# Which rollout fields belong to which strategy: setting one under another strategy is an error,
# since it would silently do nothing.
ROLLOUT_STRATEGY_FIELDS: dict[str, tuple[str, ...]] = {
    "canary": (
        "steps",
        "step_interval_s",
        "min_requests",
        "max_error_rate_delta",
        "ttft_ratio",
        "tpot_ratio",
    ),
    "shadow": ("sample_fraction", "compare"),
    "replace": ("min_ready_replicas", "ready_timeout_s", "drain_s"),
}


class RolloutSpec(_Strict):
    """Moving a model's traffic from one version (variant) to another.

    Versions are variants of the model, so a rollout lives on the model it changes: the names it
    uses resolve in that model's `variants`, and a model has at most one rollout at a time. The
    decisions (step up, hold, roll back, promote) are made by `runtime.rollout` in the
    controller; the spec only states the plan and its margins. Fields are flat, grouped by
    strategy; a field of another strategy than the one chosen is refused by `cross_check`.
    """

    stable: Name = Field(description="The variant serving traffic now.")
    candidate: Name = Field(description="The variant being rolled out.")
    strategy: RolloutStrategy = Field(
        description="replace: blue/green, the candidate takes all traffic once it has as many "
        "ready replicas as the stable version; canary: stepped traffic shares, judged against "
        "the stable version and rolled back on a breach; shadow: a sample of requests is "
        "copied to the candidate, compared, never returned and never billed."
    )
    # canary
    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [5.0, 25.0, 50.0, 100.0],
        min_length=1,
        description="canary: percent of traffic on the candidate at each step, increasing.",
    )
    step_interval_s: float = Field(
        default=300.0, gt=0, description="canary: least time spent on a step before stepping up."
    )
    min_requests: int = Field(
        default=200,
        ge=1,
        description="canary: candidate requests in a step before it is judged at all.",
    )
    max_error_rate_delta: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="canary: how far the candidate's error rate may exceed the stable one's "
        "(0.01 = one percentage point).",
    )
    ttft_ratio: float = Field(
        default=1.2,
        ge=1,
        description="canary: candidate TTFT p95 may be this multiple of the stable p95 "
        "(1.2 = 20 % worse).",
    )
    tpot_ratio: float = Field(
        default=1.2, ge=1, description="canary: the same for the time per output token p95."
    )
    # shadow
    sample_fraction: float = Field(
        default=0.05, gt=0, le=1, description="shadow: fraction of requests copied."
    )
    compare: ShadowCompare = Field(
        default="token-agreement",
        description="shadow: how a copy's output is compared with the served one.",
    )
    # replace
    min_ready_replicas: int | None = Field(
        default=None,
        ge=1,
        description="replace: candidate replicas ready before the switch; None: as many as the "
        "stable version has ready (and at least one).",
    )
    ready_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="replace: roll back if the candidate is not ready this long after the "
        "rollout starts; None: wait as long as it takes.",
    )
    drain_s: float = Field(
        default=60.0,
        ge=0,
        description="replace: after the switch, how long the stable version drains in-flight "
        "work before the rollout is done.",
    )


class ModelSpec(_Strict):
    """A model: its size and shape (for the cost model) and its variants."""

    name: Name
    parameters_b: float = Field(gt=0, description="Parameters, in billions.")
    layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    kv_heads: int = Field(gt=0, description="Key/value heads (grouped-query attention).")
    head_dim: int = Field(gt=0)
    context_length: int = Field(gt=0, description="Longest prompt plus output, in tokens.")
    variants: list[VariantSpec] = Field(min_length=1)
    rollout: RolloutSpec | None = Field(
        default=None, description="A rollout from one variant to another, if one is under way."
    )

    @property
    def parameters(self) -> float:
        return self.parameters_b * 1e9

    def kv_bytes_per_token(self, kv_bytes_per_value: float = 2.0) -> float:
        """KV-cache bytes one token occupies across all layers (keys and values)."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * kv_bytes_per_value

    def variant(self, name: str) -> VariantSpec:
        return _by_name(self.variants, name, f"variant of model {self.name!r}")

    def weight_bytes(self, variant: VariantSpec) -> float:
        if variant.weight_bytes is not None:
            return float(variant.weight_bytes)
        return self.parameters * BYTES_PER_PARAM[variant.precision]


# --------------------------------------------------------------------------------------------
# Pools


class CatalogRef(_Strict):
    """A catalog instance that a `local` or `kubernetes` pool is priced and sized as."""

    cloud: CatalogCloud
    region: str = Field(min_length=1)
    instance_type: str = Field(min_length=1)


class ServesSpec(_Strict):
    """The model variant a pool serves."""

    model: Name
    variant: Name


class UpstreamSpec(_Strict):
    """An OpenAI-compatible server (vLLM, TGI, SGLang, llama.cpp) the agent fronts."""

    url: str = Field(pattern=r"^https?://", description="Base URL, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1, description="Model id the upstream serves.")
    max_in_flight: int = Field(default=32, gt=0, le=4096)


class PoolSpec(_Strict):
    """A group of identical nodes in one place, serving one model variant."""

    name: Name
    cloud: CloudName
    region: str = Field(
        min_length=1,
        description="Cloud region; for kubernetes the cluster's location; for local 'local'.",
    )
    instance_type: str = Field(
        min_length=1,
        description="Catalog instance type (aws/gcp/azure), the node type for kubernetes, "
        "any label for local.",
    )
    accelerator_kind: AcceleratorKind | None = Field(
        default=None, description="Checked against the catalog; derived from it when omitted."
    )
    accelerator_count: float | None = Field(
        default=None, ge=0, description="Checked against the catalog when given."
    )
    priced_as: CatalogRef | None = Field(
        default=None,
        description="Required for local and kubernetes pools: the catalog instance whose price "
        "(and, for kubernetes, hardware) the pool carries.",
    )
    spot: bool = False
    on_demand_base: int = Field(
        default=0,
        ge=0,
        description="Spot pools: replicas kept on-demand underneath the spot capacity.",
    )
    fallback_pool: Name | None = Field(
        default=None,
        description="Spot pools: the on-demand pool that takes this pool's share when spot "
        "capacity is lost.",
    )
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=0, le=10_000)
    desired_replicas: int | None = Field(
        default=None, ge=0, description="Defaults to min_replicas."
    )
    serves: ServesSpec
    may_load: list[ServesSpec] = Field(
        default_factory=list,
        description="Other models each node may hold besides `serves` (embedded engine only): "
        "loaded when a request needs one or when demand-driven placement asks, unloaded when "
        "idle or when memory_budget_bytes needs the room.",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Most memory the models a node holds may take together (weights plus KV "
        "pool). Unset: no limit.",
    )
    engine: EngineKind = "embedded"
    upstream: UpstreamSpec | None = None
    cold_start_s: float = Field(
        default=120.0, ge=0, description="Boot to ready; the autoscaler plans ahead by this."
    )
    tags: dict[str, str] = Field(default_factory=dict)

    @property
    def replicas(self) -> int:
        return self.min_replicas if self.desired_replicas is None else self.desired_replicas

    @property
    def price_ref(self) -> CatalogRef:
        """The catalog entry this pool is priced as."""
        if self.priced_as is not None:
            return self.priced_as
        return CatalogRef(
            cloud=self.cloud,  # type: ignore[arg-type]  # only aws/gcp/azure reach here
            region=self.region,
            instance_type=self.instance_type,
        )


# --------------------------------------------------------------------------------------------
# Tenants and SLO classes

_KEY_REF = re.compile(
    r"env:[A-Za-z_][A-Za-z0-9_]*|file:.+|config:[A-Za-z0-9_.:-]+|sha256:[0-9a-f]{64}"
)


def _key_reference(value: str) -> str:
    if not _KEY_REF.fullmatch(value):
        raise ValueError(
            "not a key reference; plain-text keys are not allowed: "
            "use env:VAR, file:/path, config:NAME or sha256:<64 hex digits>"
        )
    return value


KeyReference = Annotated[str, AfterValidator(_key_reference)]


class QuotaSpec(_Strict):
    """A tenant's limits. Omitted limits are unlimited."""

    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, gt=0)
    accelerator_hours_per_month: float | None = Field(default=None, gt=0)
    usd_per_month: float | None = Field(default=None, gt=0)


class TenantSpec(_Strict):
    """An application team: who it is (key references), what it may use and how much."""

    name: Name
    api_keys: list[KeyReference] = Field(
        min_length=1,
        description="Key references, never keys: 'env:VAR', 'file:/path', 'config:NAME' "
        "(a Pulumi secret) or 'sha256:<hex digest>'.",
    )
    default_priority: Name
    max_priority: Name | None = Field(
        default=None,
        description="The most important class the tenant may ask for; defaults to "
        "default_priority.",
    )
    min_quality: QualityName = Field(
        default="low", description="Lowest variant quality the tenant accepts."
    )
    quotas: QuotaSpec = Field(default_factory=QuotaSpec)
    allowed_models: list[Name] | None = Field(default=None, description="None: every model.")
    allowed_pools: list[Name] | None = Field(default=None, description="None: every pool.")


class SloClassSpec(_Strict):
    """A priority class with its latency objectives."""

    name: Name
    priority: int = Field(ge=0, le=100, description="0 is the most important.")
    ttft_ms: float = Field(gt=0, description="Time-to-first-token objective.")
    tpot_ms: float = Field(gt=0, description="Time-per-output-token objective.")
    sheddable: bool = False
    spot_eligible: bool = False
    min_quality: QualityName = Field(
        default="standard", description="Lowest variant quality this class may be served by."
    )


# --------------------------------------------------------------------------------------------
# Policies


class RoutingSpec(_Strict):
    strategy: RoutingStrategy = "cost-aware"
    slo_headroom: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Plan to this fraction of each SLO, keeping a margin for prediction error.",
    )
    prefer_spot: bool = True
    hop_limit: int = Field(default=1, ge=0, le=3)
    peer_stale_after_s: float = Field(default=15.0, gt=0)


class ForecastSpec(_Strict):
    method: ForecastMethod = "holt-winters"
    horizon_s: float = Field(default=600.0, ge=0)
    season_s: float = Field(default=86_400.0, gt=0)


class PlacementSpec(_Strict):
    """Demand-driven placement (``runtime.placement``): loading a model on nodes that may hold it
    (a pool's ``may_load``) when its queue grows, and unloading it where it sits idle, before
    the autoscaler adds nodes."""

    enabled: bool = True
    queue_per_copy: float = Field(
        default=4.0,
        gt=0,
        description="Waiting requests per ready copy of a model above which one more copy is "
        "loaded.",
    )
    idle_unload_s: float = Field(
        default=300.0,
        ge=0,
        description="A model loaded on a node besides its primary one, idle this long, is "
        "unloaded.",
    )
    load_cooldown_s: float = Field(
        default=30.0, ge=0, description="After a load is asked for a model, before the next one."
    )


class AutoscalingSpec(_Strict):
    enabled: bool = True
    period_s: float = Field(default=15.0, gt=0)
    target_utilization: float = Field(default=0.7, gt=0, le=1)
    hysteresis: float = Field(default=0.1, ge=0, lt=1)
    scale_up_cooldown_s: float = Field(default=60.0, ge=0)
    scale_down_cooldown_s: float = Field(default=300.0, ge=0)
    max_step: int = Field(default=4, gt=0, description="Most replicas added per pool per period.")
    spot_overprovision: int = Field(default=0, ge=0)
    spot_retry_s: float = Field(
        default=600.0,
        ge=0,
        description="After a spot pool loses capacity, how long its share stays on the "
        "on-demand fallback before spot is tried again.",
    )
    slo_floor: float = Field(
        default=0.99,
        gt=0,
        le=1,
        description="SLO attainment below which a pool with queued work gets a replica more.",
    )
    forecast: ForecastSpec = Field(default_factory=ForecastSpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)


class BudgetSpec(_Strict):
    usd_per_month: float = Field(gt=0)


# --------------------------------------------------------------------------------------------
# The fleet


class FleetSpec(_Strict):
    """A whole fleet: the single source of truth."""

    name: Name
    description: str = ""
    budget: BudgetSpec | None = None
    models: list[ModelSpec] = Field(min_length=1)
    pools: list[PoolSpec] = Field(min_length=1)
    tenants: list[TenantSpec] = Field(default_factory=list)
    slo_classes: list[SloClassSpec] = Field(min_length=1)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> FleetSpec:
        context = info.context if isinstance(info.context, Mapping) else {}
        catalog = context.get("catalog")
        if catalog is None:
            catalog = default_catalog()
        issues = cross_check(self, catalog)
        if issues:
            raise FleetSpecError(issues)
        return self

    # Lookups used by every layer above.
    def model(self, name: str) -> ModelSpec:
        return _by_name(self.models, name, "model")

    def pool(self, name: str) -> PoolSpec:
        return _by_name(self.pools, name, "pool")

    def tenant(self, name: str) -> TenantSpec:
        return _by_name(self.tenants, name, "tenant")

    def slo_class(self, name: str) -> SloClassSpec:
        return _by_name(self.slo_classes, name, "SLO class")

    def pool_variant(self, pool: PoolSpec) -> tuple[ModelSpec, VariantSpec]:
        model = self.model(pool.serves.model)
        return model, model.variant(pool.serves.variant)

    def with_replicas(self, replicas: Mapping[str, int]) -> FleetSpec:
        """A copy with desired replica counts replaced (the autoscaler's `fleetform:replicas`).

        Issues name the pool under `fleetform:replicas`, since that is where the bad value is.
        """
        pools = {p.name: p for p in self.pools}
        issues: list[Issue] = []
        for name, count in replicas.items():
            path = f"{REPLICAS_CONFIG_KEY}.{name}"
            pool = pools.get(name)
            if pool is None:
                issues.append(Issue(path, _unknown("pool", name, pools)))
            elif isinstance(count, bool) or not isinstance(count, int):
                issues.append(Issue(path, f"must be a whole number (got {count!r})"))
            elif not pool.min_replicas <= count <= pool.max_replicas:
                issues.append(
                    Issue(
                        path,
                        f"{count} is outside min_replicas..max_replicas "
                        f"({pool.min_replicas}..{pool.max_replicas})",
                    )
                )
        if issues:
            raise FleetSpecError(issues)
        updated = [
            p.model_copy(update={"desired_replicas": replicas[p.name]}) if p.name in replicas else p
            for p in self.pools
        ]
        return self.model_copy(update={"pools": updated})


def _by_name(items: Iterable[_Named], name: str, what: str) -> _Named:
    for item in items:
        if item.name == name:  # type: ignore[attr-defined]
            return item
    raise KeyError(f"no {what} named {name!r}")


# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a spec: where (a path like `pools[2].max_replicas`) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class FleetSpecError(ValueError):
    """A spec that does not validate. `str()` is one `path: reason` line per issue."""

    def __init__(self, issues: Sequence[Issue], source: str | None = None) -> None:
        self.issues = list(issues)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [str(issue) for issue in self.issues]
        if self.source:
            header = f"{self.source}: {len(lines)} problem{'s' if len(lines) != 1 else ''}"
            return "\n".join([header, *("  " + line for line in lines)])
        return "\n".join(lines)


def format_path(loc: Sequence[str | int]) -> str:
    """('pools', 2, 'max_replicas') -> 'pools[2].max_replicas'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _issues_from_validation_error(error: ValidationError, prefix: str = "") -> list[Issue]:
    issues: list[Issue] = []
    for detail in error.errors(include_url=False):
        original = (detail.get("ctx") or {}).get("error")
        if isinstance(original, FleetSpecError):
            issues.extend(
                Issue(_join(prefix, issue.path), issue.message) for issue in original.issues
            )
            continue
        path = _join(prefix, format_path(detail["loc"]))
        message = detail["msg"]
        if detail["type"] == "extra_forbidden":
            message = "unknown key (not part of the fleet spec)"
        elif detail["type"] == "missing":
            message = "required field is missing"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        # Inputs are echoed to help find the bad value, but never under api_keys: a value that
        # is not a key reference may be a real key pasted in by mistake.
        secret = "api_keys" in detail["loc"]
        if (
            detail["type"] not in ("missing", "extra_forbidden")
            and "input" in detail
            and not secret
        ):
            shown = repr(detail["input"])
            if len(shown) <= 60 and not isinstance(detail["input"], dict | list):
                message = f"{message} (got {shown})"
        issues.append(Issue(path, message))
    return issues


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


# --------------------------------------------------------------------------------------------
# Cross-field checks


def cross_check(spec: FleetSpec, catalog: Catalog) -> list[Issue]:
    """Everything pydantic's per-field validation cannot see. Returns issues; never raises."""
    issues: list[Issue] = []
    add = lambda path, message: issues.append(Issue(path, message))  # noqa: E731

    for section, items in (
        ("models", spec.models),
        ("pools", spec.pools),
        ("tenants", spec.tenants),
        ("slo_classes", spec.slo_classes),
    ):
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            if item.name in seen:
                add(
                    f"{section}[{index}].name",
                    f"duplicate name {item.name!r} (also {section}[{seen[item.name]}])",
                )
            seen.setdefault(item.name, index)

    for m_index, model in enumerate(spec.models):
        seen_variants: set[str] = set()
        for v_index, variant in enumerate(model.variants):
            if variant.name in seen_variants:
                add(
                    f"models[{m_index}].variants[{v_index}].name",
                    f"duplicate variant {variant.name!r}",
                )
            seen_variants.add(variant.name)

    priorities: dict[int, str] = {}
    for index, slo in enumerate(spec.slo_classes):
        if slo.priority in priorities:
            add(
                f"slo_classes[{index}].priority",
                f"priority {slo.priority} is already used by class {priorities[slo.priority]!r}",
            )
        priorities.setdefault(slo.priority, slo.name)

    models = {m.name: m for m in spec.models}
    pools = {p.name: p for p in spec.pools}
    classes = {c.name: c for c in spec.slo_classes}

    for index, pool in enumerate(spec.pools):
        _check_pool(spec, index, pool, models, pools, catalog, add)

    for index, model in enumerate(spec.models):
        if model.rollout is not None:
            _check_rollout(spec, index, model, model.rollout, add)

    for index, tenant in enumerate(spec.tenants):
        path = f"tenants[{index}]"
        if tenant.default_priority not in classes:
            add(f"{path}.default_priority", _unknown("SLO class", tenant.default_priority, classes))
        if tenant.max_priority is not None and tenant.max_priority not in classes:
            add(f"{path}.max_priority", _unknown("SLO class", tenant.max_priority, classes))
        if tenant.default_priority in classes and tenant.max_priority in classes:
            default, ceiling = classes[tenant.default_priority], classes[tenant.max_priority]
            if default.priority < ceiling.priority:
                add(
                    f"{path}.default_priority",
                    f"{default.name!r} (priority {default.priority}) is more important than "
                    f"max_priority {ceiling.name!r} (priority {ceiling.priority})",
                )
        for j, name in enumerate(tenant.allowed_models or []):
            if name not in models:
                add(f"{path}.allowed_models[{j}]", _unknown("model", name, models))
        for j, name in enumerate(tenant.allowed_pools or []):
            if name not in pools:
                add(f"{path}.allowed_pools[{j}]", _unknown("pool", name, pools))
    return issues


def _check_pool(
    spec: FleetSpec,
    index: int,
    pool: PoolSpec,
    models: Mapping[str, ModelSpec],
    pools: Mapping[str, PoolSpec],
    catalog: Catalog,
    add: Any,
) -> None:
    path = f"pools[{index}]"
    if pool.max_replicas < pool.min_replicas:
        add(
            f"{path}.max_replicas", f"{pool.max_replicas} is below min_replicas {pool.min_replicas}"
        )
    if pool.desired_replicas is not None and not (
        pool.min_replicas <= pool.desired_replicas <= pool.max_replicas
    ):
        add(
            f"{path}.desired_replicas",
            f"{pool.desired_replicas} is outside min_replicas..max_replicas "
            f"({pool.min_replicas}..{pool.max_replicas})",
        )
    if pool.on_demand_base and not pool.spot:
        add(f"{path}.on_demand_base", "only spot pools have an on-demand base")
    if pool.on_demand_base > pool.max_replicas:
        add(
            f"{path}.on_demand_base",
            f"{pool.on_demand_base} exceeds max_replicas {pool.max_replicas}",
        )
    if pool.fallback_pool is not None:
        fallback = pools.get(pool.fallback_pool)
        if not pool.spot:
            add(f"{path}.fallback_pool", "only spot pools name an on-demand fallback")
        elif fallback is None:
            add(f"{path}.fallback_pool", _unknown("pool", pool.fallback_pool, pools))
        elif fallback.spot:
            add(
                f"{path}.fallback_pool",
                f"pool {fallback.name!r} is spot; a fallback must be on-demand",
            )
        elif fallback.serves.model != pool.serves.model:
            add(
                f"{path}.fallback_pool",
                f"pool {fallback.name!r} serves model {fallback.serves.model!r}, "
                f"not {pool.serves.model!r}",
            )
    if pool.engine == "openai-upstream" and pool.upstream is None:
        add(f"{path}.upstream", "required when engine is 'openai-upstream'")
    if pool.engine == "embedded" and pool.upstream is not None:
        add(f"{path}.upstream", "only allowed when engine is 'openai-upstream'")

    # The model variant the pool serves.
    model = models.get(pool.serves.model)
    variant: VariantSpec | None = None
    if model is None:
        add(f"{path}.serves.model", _unknown("model", pool.serves.model, models))
    else:
        variants = {v.name: v for v in model.variants}
        variant = variants.get(pool.serves.variant)
        if variant is None:
            add(
                f"{path}.serves.variant",
                _unknown(f"variant of model {model.name!r}", pool.serves.variant, variants),
            )

    # Placement and price.
    if pool.cloud in ("local", "kubernetes"):
        if pool.priced_as is None:
            add(
                f"{path}.priced_as",
                f"required for {pool.cloud} pools (the catalog instance it is priced as)",
            )
            return
        ref_path = f"{path}.priced_as"
    else:
        if pool.priced_as is not None:
            add(
                f"{path}.priced_as",
                f"not allowed for {pool.cloud} pools: they are priced as their own instance type",
            )
            return
        ref_path = path
    ref = pool.price_ref
    try:
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
    except CatalogLookupError as error:
        offered_in = catalog.regions(ref.cloud, ref.instance_type)
        field = "region" if offered_in and ref.region not in offered_in else "instance_type"
        add(f"{ref_path}.{field}", str(error))
        return

    if pool.cloud == "local":
        # Local agents run on this machine's CPUs whatever they are priced as.
        kind: str = "cpu"
        if pool.accelerator_kind not in (None, "cpu"):
            add(
                f"{path}.accelerator_kind",
                f"local pools run on this machine's CPUs, not {pool.accelerator_kind!r}",
            )
    else:
        kind = record.accelerator_kind
        if pool.accelerator_kind is not None and pool.accelerator_kind != kind:
            add(
                f"{path}.accelerator_kind",
                f"{pool.accelerator_kind!r} disagrees with the catalog: {ref.instance_type} in "
                f"{ref.region} is {kind!r}"
                + (
                    f" ({record.accelerator_count:g} x {record.accelerator_name})"
                    if record.accelerator_name
                    else ""
                ),
            )
        if (
            pool.accelerator_count is not None
            and abs(pool.accelerator_count - record.accelerator_count) > 1e-9
        ):
            add(
                f"{path}.accelerator_count",
                f"{pool.accelerator_count:g} disagrees with the catalog: {ref.instance_type} has "
                f"{record.accelerator_count:g}",
            )
    if pool.spot and record.spot_usd_per_hour is None:
        add(f"{path}.spot", f"{ref.instance_type} has no spot price in {ref.region}")
    if (not pool.spot or pool.on_demand_base) and record.on_demand_usd_per_hour is None:
        add(
            f"{path}.spot",
            f"{ref.instance_type} has no on-demand price in {ref.region}; only spot is offered",
        )

    _check_may_load(pool, path, models, kind, add)

    if model is not None and variant is not None:
        if kind not in variant.runs_on:
            add(
                f"{path}.serves.variant",
                f"variant {variant.name!r} runs on {', '.join(variant.runs_on)}, not on {kind} pools",
            )
        elif pool.cloud != "local":
            fit = costmodel.fit(
                model, variant, record, context_tokens=min(model.context_length, 4096), batch=1
            )
            if not fit.fits:
                add(
                    f"{path}.serves.variant",
                    f"{model.name}/{variant.name} does not fit on {ref.instance_type}: {fit.reason}",
                )


def _check_may_load(
    pool: PoolSpec, path: str, models: Mapping[str, ModelSpec], kind: str, add: Any
) -> None:
    if pool.may_load and pool.engine != "embedded":
        add(f"{path}.may_load", "only embedded-engine pools hold several models")
        return
    seen = {pool.serves.model}
    for j, ref in enumerate(pool.may_load):
        where = f"{path}.may_load[{j}]"
        if ref.model in seen:
            why = "the pool's own model" if ref.model == pool.serves.model else "listed twice"
            add(f"{where}.model", f"{ref.model!r} is {why}; a node holds one variant of a model")
            continue
        seen.add(ref.model)
        model = models.get(ref.model)
        if model is None:
            add(f"{where}.model", _unknown("model", ref.model, models))
            continue
        variants = {v.name: v for v in model.variants}
        variant = variants.get(ref.variant)
        if variant is None:
            add(
                f"{where}.variant",
                _unknown(f"variant of model {model.name!r}", ref.variant, variants),
            )
        elif kind not in variant.runs_on:
            add(
                f"{where}.variant",
                f"variant {variant.name!r} runs on {', '.join(variant.runs_on)}, not on {kind} pools",
            )


def _check_rollout(
    spec: FleetSpec, index: int, model: ModelSpec, rollout: RolloutSpec, add: Any
) -> None:
    path = f"models[{index}].rollout"
    # Another strategy's field set to anything but its default would silently do nothing. A
    # default value is let through, so a dumped spec (which writes out every field) reloads.
    for strategy, names in ROLLOUT_STRATEGY_FIELDS.items():
        if strategy == rollout.strategy:
            continue
        for name in names:
            default = RolloutSpec.model_fields[name].get_default(call_default_factory=True)
            if getattr(rollout, name) != default:
                add(f"{path}.{name}", f"only used when strategy is {strategy!r}")

    variants = {v.name for v in model.variants}
    known = True
    for role in ("stable", "candidate"):
        name = getattr(rollout, role)
        if name not in variants:
            add(f"{path}.{role}", _unknown(f"variant of model {model.name!r}", name, variants))
            known = False
    if rollout.candidate == rollout.stable:
        add(
            f"{path}.candidate",
            f"same as stable ({rollout.stable!r}); a rollout moves traffic between two variants",
        )
    elif known:
        # A candidate no pool serves could never become ready: the rollout would wait forever
        # (canary, shadow) or never switch (replace), so it is an error for every strategy. The
        # stable version may be unserved only under `replace`: that is the in-place case, where
        # the pools' `serves` already moved to the candidate and the old nodes drain as the new
        # ones become ready. Canary and shadow compare the two versions side by side.
        served = {p.serves.variant for p in spec.pools if p.serves.model == model.name}
        if rollout.candidate not in served:
            add(
                f"{path}.candidate",
                f"no pool serves {model.name}/{rollout.candidate}; the candidate needs a pool "
                "to run on",
            )
        if rollout.stable not in served and rollout.strategy != "replace":
            add(
                f"{path}.stable",
                f"no pool serves {model.name}/{rollout.stable}; a {rollout.strategy} rollout "
                "runs both versions side by side",
            )

    if rollout.strategy == "canary":
        for i in range(1, len(rollout.steps)):
            if rollout.steps[i] <= rollout.steps[i - 1]:
                add(
                    f"{path}.steps",
                    f"must increase: step {i + 1} ({rollout.steps[i]:g} %) follows "
                    f"{rollout.steps[i - 1]:g} %",
                )
                break
        if rollout.steps[0] >= 100:
            add(
                f"{path}.steps",
                "needs a step below 100 %, where both versions serve and can be compared "
                "(use strategy 'replace' for a straight switch)",
            )


def _unknown(what: str, name: str, known: Iterable[str]) -> str:
    names = sorted(known)
    listed = ", ".join(repr(n) for n in names[:8]) + (" ..." if len(names) > 8 else "")
    return f"no {what} named {name!r} (known: {listed or 'none'})"


# --------------------------------------------------------------------------------------------
# Loading


def parse_fleet(data: Any, source: str | None = None, catalog: Catalog | None = None) -> FleetSpec:
    """Validate a fleet spec given as plain data (a dict from YAML, JSON or Pulumi config)."""
    if not isinstance(data, Mapping):
        raise FleetSpecError(
            [Issue("", f"a fleet spec must be a mapping, not {type(data).__name__}")], source
        )
    try:
        context = {"catalog": catalog} if catalog is not None else None
        return FleetSpec.model_validate(data, context=context)
    except ValidationError as error:
        raise FleetSpecError(_issues_from_validation_error(error), source) from None
    except FleetSpecError as error:
        raise FleetSpecError(error.issues, source) from None


def fleet_from_stack_config(
    config: Mapping[str, Any], source: str | None = None, catalog: Catalog | None = None
) -> FleetSpec:
    """The fleet in a stack's config mapping (`fleetform:fleet`), with `fleetform:replicas`
    applied: the shape of both a `Pulumi.<stack>.yaml` file's `config:` and `pulumi config`."""
    if FLEET_CONFIG_KEY not in config:
        raise FleetSpecError(
            [Issue(f"config.{FLEET_CONFIG_KEY}", "required key is missing")], source
        )
    raw = _structured(config[FLEET_CONFIG_KEY], f"config.{FLEET_CONFIG_KEY}", source)
    try:
        spec = parse_fleet(raw, catalog=catalog)
    except FleetSpecError as error:
        prefixed = [
            Issue(_join(f"config.{FLEET_CONFIG_KEY}", i.path), i.message) for i in error.issues
        ]
        raise FleetSpecError(prefixed, source) from None
    replicas = config.get(REPLICAS_CONFIG_KEY)
    if replicas is not None:
        replicas = _structured(replicas, f"config.{REPLICAS_CONFIG_KEY}", source)
        if not isinstance(replicas, Mapping):
            raise FleetSpecError(
                [Issue(f"config.{REPLICAS_CONFIG_KEY}", "must map pool names to replica counts")],
                source,
            )
        try:
            spec = spec.with_replicas(replicas)
        except FleetSpecError as error:
            raise FleetSpecError(
                [Issue(f"config.{i.path}", i.message) for i in error.issues], source
            ) from None
    return spec


def _structured(value: Any, path: str, source: str | None) -> Any:
    """A config value as data: `pulumi config get` hands back JSON text for structured values."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise FleetSpecError([Issue(path, _yaml_problem(error))], source) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line saying what is wrong with a YAML document and where."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(error, "problem", None) or "syntax error"
    elif isinstance(error, yaml.reader.ReaderError):
        where = f"character {error.position + 1}: "
        problem = f"unacceptable character {error.character!r}: {error.reason}"
    else:
        where, problem = "", str(error).splitlines()[0]
    return f"invalid YAML: {where}{problem}"


def load_stack_file(path: str | Path, catalog: Catalog | None = None) -> FleetSpec:
    """Read a Pulumi stack config file (`config:` -> `fleetform:fleet:` -> the spec)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FleetSpecError([Issue("", "file not found")], source) from None
    except UnicodeDecodeError as error:
        raise FleetSpecError(
            [Issue("", f"not UTF-8 text (byte {error.start + 1} cannot be decoded)")], source
        ) from None
    except OSError as error:
        raise FleetSpecError([Issue("", f"cannot read: {error.strerror}")], source) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise FleetSpecError([Issue("", _yaml_problem(error))], source) from None
    if not isinstance(document, Mapping) or not isinstance(document.get("config"), Mapping):
        raise FleetSpecError(
            [
                Issue(
                    "config",
                    "a stack file has a top-level 'config:' mapping holding 'fleetform:fleet:'",
                )
            ],
            source,
        )
    return fleet_from_stack_config(document["config"], source=source, catalog=catalog)


def stack_file_json_schema() -> dict[str, Any]:
    """JSON Schema of a whole stack file, for editors completing `stacks/*.yaml`."""
    fleet = FleetSpec.model_json_schema(ref_template="#/$defs/{model}")
    defs = fleet.pop("$defs", {})
    defs["FleetSpec"] = fleet
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Fleetform stack file",
        "type": "object",
        "properties": {
            "secretsprovider": {"type": "string"},
            "encryptedkey": {"type": "string"},
            "config": {
                "type": "object",
                "properties": {
                    FLEET_CONFIG_KEY: {"$ref": "#/$defs/FleetSpec"},
                    REPLICAS_CONFIG_KEY: {
                        "type": "object",
                        "additionalProperties": {"type": "integer", "minimum": 0},
                    },
                },
                "required": [FLEET_CONFIG_KEY],
            },
        },
        "required": ["config"],
        "$defs": defs,
    }
