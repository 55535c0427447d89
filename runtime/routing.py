"""Request routing: which instance serves a request, or why none does.

This module owns one decision, made over a snapshot and returned as data: given a request
(model, SLO class, tenant, prompt and output lengths) and the fleet view (each instance's model
variant, price, market, health, measured speed and queue), pick the instance, or shed the
request, or say why nothing can take it. It is pure: no I/O, no clock (the view carries `now`),
so the agent, the controller and the simulator run the same code.

Who is a candidate
    An instance is a candidate if it serves the request's model in a variant whose quality is at
    least max(tenant.min_quality, class.min_quality), sits in a pool the tenant may use
    (`runtime.plan.tenant_may_use`), is healthy, has not failed a forward since its last push,
    pushed within `routing.peer_stale_after_s` of `now`, is not spot when the class is not
    spot-eligible (the spec's `spot_eligible` is a permission, so it is never overridden), was
    not already tried for this request, and, once the request has used up
    `routing.hop_limit` forwards, is the local instance. Every instance of the model that is
    left out is listed in the decision with the reason.

Prediction model (per candidate, all in seconds)
    step(b)   Decode step time at batch b. Measured instances: the measured step
              `decode_batch / decode_tokens_per_s`, carried to batch b along the prior's shape,
              step(b) = measured x prior.step(b) / prior.step(decode_batch). Instances with no
              decode measurement: `prior.step(b) x cold_slowdown`.
    prefill   Measured `prefill_tokens_per_s`, or the prior's divided by `cold_slowdown`.
    batch     b = min(max_batch, running + every queued request + 1): the batch this request
              decodes in once everything already there is admitted (conservative).
    TTFT      slot wait + (prompt tokens not yet prefilled of running sequences + queued prompt
              tokens at the same or a more important priority + this prompt) / prefill
              + step(b). The slot wait is zero while the batch has room for this request and
              the requests ahead of it; otherwise `need` more sequences must finish first, and
              with remaining lengths spread evenly over (0, 2 x mean remaining] slots free at
              `holders / (2 x mean remaining)` per step: wait = need x 2 x mean / holders x
              step(holders). An instance whose KV use is at `kv_saturation` or above has no
              room beyond what is running.
    TPOT      step(b). Prefill stalls of later arrivals are not added: `decode_tokens_per_s`
              is measured over wall time, so they are already in it.
    USD       price_per_hour / 3600 x the instance-seconds the request occupies: its prefill
              (the instance is busy with it alone) plus max_tokens steps of which it holds a
              1/b share, i.e. prompt / prefill + max_tokens x step(b) / b.
    The SLO is met if TTFT <= slo_headroom x class TTFT and TPOT <= slo_headroom x class TPOT.

Priors for instances without measurements
    `RoutingPolicy.priors` maps pool names to an `InstancePrior` (prefill tokens/s and a linear
    step time fixed + per_seq x batch). `priors_from_costmodel` derives them from
    `runtime.costmodel`'s roofline for each cloud and kubernetes pool's hardware; `local` pools
    (which run on whatever this machine is) and pools without one use `default_prior`, a
    deliberately slow configurable default. The roofline is an upper bound on speed, so cold
    predictions are slowed by `cold_slowdown` (1.5x by default).

Choice
    Among candidates that meet the SLO: spot first for spot-eligible classes when
    `routing.prefer_spot` (spot capacity is what batch work is meant to fill, which keeps
    on-demand capacity for the rest), then the lowest marginal USD, then lowest TTFT, TPOT and
    instance id, so ties are broken the same way whatever order the view lists instances in.
    If none meets it: a non-sheddable class goes to the fastest candidate (lowest predicted
    TTFT + max_tokens x TPOT; then USD, id); a sheddable class is shed, with a Retry-After hint.
    No candidate at all: the decision is `unroutable` with a reason saying why.

Strategies (`routing.strategy`)
    `cost-aware` is the choice above. `least-loaded` and `round-robin` are the baselines a team
    gets from a plain load balancer: they keep everything above except how the instance is
    picked. Candidates are the same (tenant pools, quality, spot eligibility, health, staleness
    and hops are permissions, not preferences), predictions are made and reported the same way,
    and a sheddable class is still shed when no candidate meets its SLO, so a comparison between
    strategies isolates the choice itself. Then `least-loaded` takes the candidate with the
    fewest requests in flight (running + queued; ties by instance id) and `round-robin` the
    candidate after the one it chose last for the same model, in instance-id order, wrapping
    around. Neither looks at price or predicted latency when choosing; the outcome is `routed`
    when the chosen instance happens to meet the SLO and `fallback` when it does not. Round-robin
    needs memory: `RoutingPolicy.cursor`, a `RoundRobinCursor` that `route` advances (the only
    state `route` touches; it is excluded from the policy's equality).

Versions (model rollouts, `runtime.rollout`)
    A request may carry the `version` (variant) a rollout's traffic split assigned it, and the
    rollout's stable variant as `fallback_version`. After the candidates are found (every check
    above is a permission and still applies), only those serving `version` are kept; if there
    are none, those serving `fallback_version`; if there are none either, all of them, as
    without a rollout: a rollout never fails a request. Candidates dropped this way are listed
    as excluded with reason `version: ...`. The variant that actually serves the request is
    `decision.chosen.variant`, which callers attribute the request's metrics to.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from runtime.catalog import Catalog
from runtime.costmodel import PerformanceModel, ReplicaPerformance, Workload, fit, hardware_for
from runtime.plan import tenant_may_use
from runtime.spec import FleetSpec, Quality, RoutingStrategy, SloClassSpec

__all__ = [
    "DEFAULT_PRIOR",
    "CandidatePrediction",
    "ClassPolicy",
    "Exclusion",
    "FleetView",
    "InstancePrior",
    "InstanceView",
    "RoundRobinCursor",
    "RouteDecision",
    "RouteOutcome",
    "RouteRequest",
    "RoutingPolicy",
    "priors_from_costmodel",
    "route",
]


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the router needs to know about one request.

    `slo_class` is the class the agent admitted it under (after the tenant's default and
    ceiling were applied). `hops` is how many times it has been forwarded already;
    `exclude` names instances already tried for it (a failed forward is retried elsewhere).
    `version` is the variant a model rollout assigned the request (by
    `runtime.rollout.choose_version`) and `fallback_version` the rollout's stable variant; see
    "Versions" in the module docstring.
    """

    model: str
    slo_class: str
    tenant: str
    prompt_tokens: int
    max_tokens: int
    request_id: str = ""
    hops: int = 0
    exclude: frozenset[str] = frozenset()
    version: str | None = None
    fallback_version: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.max_tokens < 1 or self.hops < 0:
            raise ValueError(
                "prompt_tokens must be >= 0, max_tokens >= 1 and hops >= 0 "
                f"(got {self.prompt_tokens}, {self.max_tokens}, {self.hops})"
            )


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One serving instance as the last metrics push (or the local scheduler) describes it.

    Times are on the same clock as `FleetView.now`. Throughputs are measured over the agent's
    last window, None until it has measured any. Queues are keyed by priority number (0 is the
    most important, as in `SloClassSpec.priority` and the scheduler's `Request.priority`).
    Variant quality is not carried here: the router reads it from the spec, the one source.
    """

    instance_id: str
    pool: str
    url: str
    model: str
    variant: str
    price_usd_per_hour: float
    spot: bool
    last_seen: float  # time of the instance's last metrics push
    healthy: bool = True  # the instance's own report: False while draining or on a spot notice
    failed_at: float | None = None  # last failed forward to it; excluded until it pushes again
    prefill_tokens_per_s: float | None = None  # prompt tokens/s prefilled, aggregate
    decode_tokens_per_s: float | None = None  # output tokens/s over wall time, aggregate
    decode_batch: float | None = None  # mean sequences per step in that window (None: running)
    running: int = 0  # sequences in the batch now
    max_batch: int = 64  # the scheduler's max_num_seqs
    running_prefill_tokens: int = 0  # prompt tokens of running sequences not yet prefilled
    running_remaining_tokens: int = 0  # sum over running sequences of max_tokens - generated
    queued_requests: Mapping[int, int] = field(default_factory=dict)  # priority -> waiting
    queued_prompt_tokens: Mapping[int, int] = field(default_factory=dict)  # priority -> tokens
    kv_usage: float = 0.0  # fraction of KV-cache capacity in use

    def __post_init__(self) -> None:
        problems = []
        if self.price_usd_per_hour < 0:
            problems.append("price_usd_per_hour < 0")
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_batch"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name} must be positive or None")
        if self.max_batch < 1:
            problems.append("max_batch < 1")
        for name in ("running", "running_prefill_tokens", "running_remaining_tokens"):
            if getattr(self, name) < 0:
                problems.append(f"{name} < 0")
        for name in ("queued_requests", "queued_prompt_tokens"):
            if any(v < 0 for v in getattr(self, name).values()):
                problems.append(f"{name} has a negative count")
        if not 0.0 <= self.kv_usage <= 1.0:
            problems.append("kv_usage outside 0..1")
        if problems:
            raise ValueError(f"instance {self.instance_id!r}: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class FleetView:
    """The instances the router may choose from, at time `now`.

    `local_instance_id` is the instance making the decision (an agent routing for itself); once
    a request has used up the hop limit, only it may serve. None when routing from outside.
    """

    instances: tuple[InstanceView, ...]
    now: float
    local_instance_id: str | None = None


# --------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True, slots=True)
class InstancePrior:
    """Assumed speed of an instance that has not measured itself yet."""

    prefill_tokens_per_s: float
    step_fixed_s: float  # decode step time = step_fixed_s + step_per_seq_s x batch
    step_per_seq_s: float
    source: str = "default"

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.step_fixed_s <= 0 or self.step_per_seq_s < 0:
            raise ValueError("prior: prefill and fixed step time must be positive")

    def step_s(self, batch: float) -> float:
        return self.step_fixed_s + self.step_per_seq_s * batch


# A slow machine on purpose: unknown hardware should not attract work before it has measured
# itself. About what a few CPU cores give for a ~1B-parameter model at 4 bits.
DEFAULT_PRIOR = InstancePrior(
    prefill_tokens_per_s=200.0, step_fixed_s=0.05, step_per_seq_s=0.005, source="default"
)


@dataclass(frozen=True, slots=True)
class ClassPolicy:
    """An SLO class as routing reads it."""

    name: str
    priority: int
    ttft_s: float
    tpot_s: float
    sheddable: bool
    spot_eligible: bool
    min_quality: Quality

    @classmethod
    def from_spec(cls, slo: SloClassSpec) -> ClassPolicy:
        return cls(
            name=slo.name,
            priority=slo.priority,
            ttft_s=slo.ttft_ms / 1000.0,
            tpot_s=slo.tpot_ms / 1000.0,
            sheddable=slo.sheddable,
            spot_eligible=slo.spot_eligible,
            min_quality=Quality[slo.min_quality],
        )


class RoundRobinCursor:
    """Where round-robin routing stands: the instance it chose last, per model.

    Keyed by instance id rather than by position, so instances joining or leaving the view do
    not make the rotation skip or repeat the others.
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: dict[str, str] = {}

    def next_after(self, model: str, instance_ids: list[str]) -> str:
        """The id after the last one chosen for `model` in sorted order (wrapping); records it."""
        ordered = sorted(instance_ids)
        previous = self.last.get(model)
        chosen = next((i for i in ordered if previous is None or i > previous), ordered[0])
        self.last[model] = chosen
        return chosen

    def __repr__(self) -> str:
        return f"RoundRobinCursor({self.last!r})"


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """Everything `route` reads from the spec, plus the prediction assumptions.

    Build it once per spec with `from_spec`; it is immutable and cheap to share, except for the
    round-robin `cursor` (see the module docstring), which callers sharing a policy share too.
    """

    classes: Mapping[str, ClassPolicy]
    tenant_min_quality: Mapping[str, Quality]
    tenant_pools: Mapping[str, frozenset[str]]  # pools each tenant may use
    variant_quality: Mapping[tuple[str, str], Quality]  # (model, variant) -> quality
    slo_headroom: float = 0.8
    prefer_spot: bool = True
    stale_after_s: float = 15.0
    hop_limit: int = 1
    priors: Mapping[str, InstancePrior] = field(default_factory=dict)  # by pool
    default_prior: InstancePrior = DEFAULT_PRIOR
    cold_slowdown: float = 1.5
    kv_saturation: float = 0.95
    strategy: RoutingStrategy = "cost-aware"
    cursor: RoundRobinCursor = field(default_factory=RoundRobinCursor, compare=False)

    @classmethod
    def from_spec(
        cls,
        spec: FleetSpec,
        *,
        priors: Mapping[str, InstancePrior] | None = None,
        default_prior: InstancePrior = DEFAULT_PRIOR,
        cold_slowdown: float = 1.5,
        kv_saturation: float = 0.95,
    ) -> RoutingPolicy:
        classes = {c.name: ClassPolicy.from_spec(c) for c in spec.slo_classes}
        return cls(
            classes=classes,
            tenant_min_quality={t.name: Quality[t.min_quality] for t in spec.tenants},
            tenant_pools={
                t.name: frozenset(p.name for p in spec.pools if tenant_may_use(spec, t.name, p))
                for t in spec.tenants
            },
            variant_quality={
                (m.name, v.name): Quality[v.quality] for m in spec.models for v in m.variants
            },
            slo_headroom=spec.routing.slo_headroom,
            prefer_spot=spec.routing.prefer_spot,
            stale_after_s=spec.routing.peer_stale_after_s,
            hop_limit=spec.routing.hop_limit,
            priors=dict(priors or {}),
            default_prior=default_prior,
            cold_slowdown=cold_slowdown,
            kv_saturation=kv_saturation,
            strategy=spec.routing.strategy,
        )

    def prior_for(self, pool: str) -> InstancePrior:
        return self.priors.get(pool, self.default_prior)


def priors_from_costmodel(
    spec: FleetSpec,
    catalog: Catalog,
    *,
    perf: PerformanceModel | None = None,
    workload: Workload | None = None,
    reference_batch: int = 64,
) -> dict[str, InstancePrior]:
    """Roofline priors for the spec's cloud and kubernetes pools, by pool name.

    The step time is the chord of the roofline's decode step between batch 1 and
    `reference_batch` at the workload's mean context; prefill speed is the roofline's for the
    workload's prompt. `local` pools are skipped: they run on this machine's CPUs whatever they
    are priced as, so the catalog says nothing about their speed.
    """
    perf = perf or PerformanceModel.default()
    workload = workload or Workload()
    priors: dict[str, InstancePrior] = {}
    for pool in spec.pools:
        if pool.cloud == "local":
            continue
        ref = pool.price_ref
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
        model, variant = spec.pool_variant(pool)
        hw = hardware_for(record, perf)
        context = int(workload.prompt_tokens + workload.output_tokens)
        placement = fit(model, variant, record, context_tokens=context, batch=1, perf=perf)
        if hw is None or not placement.fits:
            continue
        replica = ReplicaPerformance(model, variant, hw, placement.tensor_parallel)
        mean_context = workload.prompt_tokens + workload.output_tokens / 2
        one = replica.decode_step_s(1, mean_context)
        many = replica.decode_step_s(reference_batch, mean_context)
        per_seq = max(0.0, (many - one) / (reference_batch - 1))
        priors[pool.name] = InstancePrior(
            prefill_tokens_per_s=workload.prompt_tokens / replica.prefill_s(workload.prompt_tokens),
            step_fixed_s=one - per_seq,
            step_per_seq_s=per_seq,
            source=f"roofline {ref.cloud}/{ref.region}/{ref.instance_type}",
        )
    return priors


# --------------------------------------------------------------------------------------------
# Output


class RouteOutcome(StrEnum):
    ROUTED = "routed"  # the chosen instance meets the SLO
    FALLBACK = "fallback"  # none meets it; the fastest was chosen for a non-sheddable class
    SHED = "shed"  # none meets it and the class is sheddable
    UNROUTABLE = "unroutable"  # no candidate at all (or an unknown class or tenant)


@dataclass(frozen=True, slots=True)
class CandidatePrediction:
    """What the router predicted for one candidate instance."""

    instance_id: str
    pool: str
    variant: str
    quality: str
    spot: bool
    price_usd_per_hour: float
    predicted_ttft_s: float
    predicted_tpot_s: float
    marginal_usd: float
    meets_slo: bool
    batch: int  # the batch size the prediction assumes
    queue_wait_s: float  # slot wait + prefill of the work ahead, part of the TTFT
    cold: bool  # some figure came from the prior, not a measurement


@dataclass(frozen=True, slots=True)
class Exclusion:
    """An instance of the requested model that was not a candidate, and why."""

    instance_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The router's answer, with the data that explains it.

    `candidates` are in preference order: those meeting the SLO as the router ranks them,
    then the rest fastest first, so a caller whose forward fails can take the next one.
    """

    outcome: RouteOutcome
    instance_id: str | None
    url: str | None
    reason: str
    ttft_target_s: float | None = None  # the planned TTFT, headroom x the class's objective
    tpot_target_s: float | None = None
    candidates: tuple[CandidatePrediction, ...] = ()
    excluded: tuple[Exclusion, ...] = ()
    retry_after_s: float | None = None  # for a shed request: when trying again may succeed

    @property
    def shed(self) -> bool:
        return self.outcome is RouteOutcome.SHED

    @property
    def chosen(self) -> CandidatePrediction | None:
        return next((c for c in self.candidates if c.instance_id == self.instance_id), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for decision logs."""
        data = asdict(self)
        data["outcome"] = str(self.outcome)
        data["shed"] = self.shed
        return data


# --------------------------------------------------------------------------------------------
# The decision


def route(
    request: RouteRequest, view: FleetView, policy: RoutingPolicy | FleetSpec
) -> RouteDecision:
    """Choose the instance for `request` in `view`; see the module docstring for the rules.

    Passing the spec builds a `RoutingPolicy` on every call (without cost-model priors); a
    long-lived caller builds the policy once with `RoutingPolicy.from_spec` and passes that.
    """
    if isinstance(policy, FleetSpec):
        policy = RoutingPolicy.from_spec(policy)
    slo = policy.classes.get(request.slo_class)
    if slo is None:
        return _unroutable(f"unknown SLO class {request.slo_class!r}")
    if request.tenant not in policy.tenant_pools:
        return _unroutable(f"unknown tenant {request.tenant!r}")
    ttft_target = policy.slo_headroom * slo.ttft_s
    tpot_target = policy.slo_headroom * slo.tpot_s
    min_quality = max(slo.min_quality, policy.tenant_min_quality[request.tenant])

    candidates: list[CandidatePrediction] = []
    excluded: list[Exclusion] = []
    # Sorted so that everything downstream, including messages, is independent of view order.
    for instance in sorted(view.instances, key=lambda i: i.instance_id):
        if instance.model != request.model:
            continue
        why = _exclusion(instance, request, slo, min_quality, view, policy)
        if why is not None:
            excluded.append(Exclusion(instance.instance_id, why))
            continue
        candidates.append(_predict(instance, request, slo, policy, ttft_target, tpot_target))
    candidates, excluded = _prefer_version(request, candidates, excluded)

    targets = {"ttft_target_s": ttft_target, "tpot_target_s": tpot_target}
    if not candidates:
        if not excluded:
            reason = f"no instance serves model {request.model!r}"
        else:
            counts = Counter(_reason_kind(e.reason) for e in excluded)
            summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
            reason = f"no instance of model {request.model!r} can take this request: {summary}"
        return RouteDecision(
            RouteOutcome.UNROUTABLE, None, None, reason, **targets, excluded=tuple(excluded)
        )

    urls = {i.instance_id: i.url for i in view.instances}
    if policy.strategy != "cost-aware":
        loads = {i.instance_id: i.running + sum(i.queued_requests.values()) for i in view.instances}
        return _route_plainly(request, slo, policy, candidates, excluded, urls, loads, targets)
    spot_first = slo.spot_eligible and policy.prefer_spot
    feasible = sorted(
        (c for c in candidates if c.meets_slo),
        key=lambda c: (
            spot_first and not c.spot,
            c.marginal_usd,
            c.predicted_ttft_s,
            c.predicted_tpot_s,
            c.instance_id,
        ),
    )
    late = sorted(
        (c for c in candidates if not c.meets_slo),
        key=lambda c: (_completion_s(c, request), c.marginal_usd, c.instance_id),
    )
    ranked = (*feasible, *late)
    common = {**targets, "candidates": ranked, "excluded": tuple(excluded)}
    goal = f"TTFT <= {ttft_target:.3g}s and TPOT <= {tpot_target:.3g}s"

    if feasible:
        best = feasible[0]
        spot_note = " (spot preferred)" if spot_first and best.spot else ""
        reason = (
            f"cheapest of {len(feasible)} instance(s) meeting {goal}{spot_note}: "
            f"{best.instance_id} at ${best.marginal_usd:.6f}"
        )
        return RouteDecision(
            RouteOutcome.ROUTED, best.instance_id, urls[best.instance_id], reason, **common
        )
    fastest = late[0]
    shortfall = (
        f"none of {len(late)} candidate(s) meets {goal}; fastest is {fastest.instance_id} "
        f"(TTFT {fastest.predicted_ttft_s:.3g}s, TPOT {fastest.predicted_tpot_s:.3g}s)"
    )
    if slo.sheddable:
        # The queue that makes the best candidate late must drain by the excess first.
        excess = min(c.predicted_ttft_s - ttft_target for c in late)
        retry = float(max(1, math.ceil(excess)))
        return RouteDecision(
            RouteOutcome.SHED,
            None,
            None,
            f"shed: class {slo.name!r} is sheddable and {shortfall}",
            retry_after_s=retry,
            **common,
        )
    return RouteDecision(
        RouteOutcome.FALLBACK,
        fastest.instance_id,
        urls[fastest.instance_id],
        f"class {slo.name!r} is not sheddable; {shortfall}",
        **common,
    )


def _route_plainly(
    request: RouteRequest,
    slo: ClassPolicy,
    policy: RoutingPolicy,
    candidates: list[CandidatePrediction],
    excluded: list[Exclusion],
    urls: Mapping[str, str],
    loads: Mapping[str, int],
    targets: Mapping[str, float],
) -> RouteDecision:
    """The `least-loaded` and `round-robin` strategies (see the module docstring)."""
    goal = f"TTFT <= {targets['ttft_target_s']:.3g}s and TPOT <= {targets['tpot_target_s']:.3g}s"
    feasible = sum(c.meets_slo for c in candidates)
    if slo.sheddable and not feasible:
        late = sorted(candidates, key=lambda c: (_completion_s(c, request), c.instance_id))
        excess = min(c.predicted_ttft_s - targets["ttft_target_s"] for c in late)
        return RouteDecision(
            RouteOutcome.SHED,
            None,
            None,
            f"shed: class {slo.name!r} is sheddable and none of {len(late)} candidate(s) "
            f"meets {goal}",
            retry_after_s=float(max(1, math.ceil(excess))),
            candidates=tuple(late),
            excluded=tuple(excluded),
            **targets,
        )
    by_id = {c.instance_id: c for c in candidates}
    if policy.strategy == "least-loaded":
        ranked = sorted(candidates, key=lambda c: (loads[c.instance_id], c.instance_id))
        chosen = ranked[0]
        how = f"least-loaded: {loads[chosen.instance_id]} in flight"
    else:
        chosen = by_id[policy.cursor.next_after(request.model, list(by_id))]
        ids = sorted(by_id)
        start = ids.index(chosen.instance_id)
        ranked = [by_id[i] for i in ids[start:] + ids[:start]]
        how = "round-robin: next in turn"
    meets = "meets" if chosen.meets_slo else "does not meet"
    reason = (
        f"{how}, {chosen.instance_id} of {len(candidates)} candidate(s); it {meets} {goal} "
        f"({feasible} candidate(s) would)"
    )
    outcome = RouteOutcome.ROUTED if chosen.meets_slo else RouteOutcome.FALLBACK
    return RouteDecision(
        outcome,
        chosen.instance_id,
        urls[chosen.instance_id],
        reason,
        candidates=tuple(ranked),
        excluded=tuple(excluded),
        **targets,
    )


def _unroutable(reason: str) -> RouteDecision:
    return RouteDecision(RouteOutcome.UNROUTABLE, None, None, reason)


def _exclusion(
    instance: InstanceView,
    request: RouteRequest,
    slo: ClassPolicy,
    min_quality: Quality,
    view: FleetView,
    policy: RoutingPolicy,
) -> str | None:
    """Why `instance` (which serves the request's model) is not a candidate, or None."""
    if (
        view.local_instance_id is not None
        and request.hops >= policy.hop_limit
        and instance.instance_id != view.local_instance_id
    ):
        return f"hop limit: forwarded {request.hops} time(s), limit {policy.hop_limit}"
    if instance.instance_id in request.exclude:
        return "already tried for this request"
    if instance.pool not in policy.tenant_pools[request.tenant]:
        return f"pool not allowed: tenant {request.tenant!r} may not use pool {instance.pool!r}"
    quality = policy.variant_quality.get((instance.model, instance.variant))
    if quality is None:
        return f"unknown variant: {instance.model}/{instance.variant} is not in the spec"
    if quality < min_quality:
        return (
            f"quality too low: variant {instance.variant!r} is {quality.name}, "
            f"this request needs {min_quality.name}"
        )
    if instance.spot and not slo.spot_eligible:
        return f"spot: class {slo.name!r} is not spot-eligible"
    if not instance.healthy:
        return "unhealthy: reported not ready"
    if instance.failed_at is not None and instance.failed_at >= instance.last_seen:
        return "unhealthy: a forward failed and it has not pushed since"
    age = view.now - instance.last_seen
    if age > policy.stale_after_s:
        return f"stale: last push {age:.1f}s ago, limit {policy.stale_after_s:g}s"
    return None


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _predict(
    instance: InstanceView,
    request: RouteRequest,
    slo: ClassPolicy,
    policy: RoutingPolicy,
    ttft_target: float,
    tpot_target: float,
) -> CandidatePrediction:
    prior = policy.prior_for(instance.pool)
    measured_decode = instance.decode_tokens_per_s
    if measured_decode is not None:
        measured_batch = instance.decode_batch or max(instance.running, 1)
        measured_step = measured_batch / measured_decode

        def step(batch: float) -> float:
            return measured_step * prior.step_s(batch) / prior.step_s(measured_batch)

    else:

        def step(batch: float) -> float:
            return prior.step_s(batch) * policy.cold_slowdown

    prefill_rate = instance.prefill_tokens_per_s or (
        prior.prefill_tokens_per_s / policy.cold_slowdown
    )

    ahead = [p for p in instance.queued_requests if p <= slo.priority]
    ahead_requests = sum(instance.queued_requests[p] for p in ahead)
    ahead_tokens = instance.running_prefill_tokens + sum(
        v for p, v in instance.queued_prompt_tokens.items() if p <= slo.priority
    )
    queued_total = sum(instance.queued_requests.values())
    batch = max(1, min(instance.max_batch, instance.running + queued_total + 1))

    # Room in the batch: none beyond what runs when the KV cache is (nearly) full.
    kv_full = instance.kv_usage >= policy.kv_saturation and instance.running > 0
    capacity = instance.running if kv_full else max(instance.max_batch, instance.running)
    need = ahead_requests + 1 - (capacity - instance.running)
    slot_wait = 0.0
    if need > 0:
        holders = instance.running if instance.running > 0 else capacity
        if instance.running > 0 and instance.running_remaining_tokens > 0:
            mean_remaining = instance.running_remaining_tokens / instance.running
        else:
            mean_remaining = float(request.max_tokens)  # nothing better to go on
        slot_wait = need * 2.0 * mean_remaining / holders * step(holders)

    queue_wait = slot_wait + ahead_tokens / prefill_rate
    own_prefill = request.prompt_tokens / prefill_rate
    tpot = step(batch)
    ttft = queue_wait + own_prefill + tpot
    occupied_s = own_prefill + request.max_tokens * tpot / batch
    return CandidatePrediction(
        instance_id=instance.instance_id,
        pool=instance.pool,
        variant=instance.variant,
        quality=policy.variant_quality[(instance.model, instance.variant)].name,
        spot=instance.spot,
        price_usd_per_hour=instance.price_usd_per_hour,
        predicted_ttft_s=ttft,
        predicted_tpot_s=tpot,
        marginal_usd=instance.price_usd_per_hour / 3600.0 * occupied_s,
        meets_slo=ttft <= ttft_target and tpot <= tpot_target,
        batch=batch,
        queue_wait_s=queue_wait,
        cold=measured_decode is None or instance.prefill_tokens_per_s is None,
    )


def _completion_s(candidate: CandidatePrediction, request: RouteRequest) -> float:
    return candidate.predicted_ttft_s + request.max_tokens * candidate.predicted_tpot_s


def _prefer_version(
    request: RouteRequest, candidates: list[CandidatePrediction], excluded: list[Exclusion]
) -> tuple[list[CandidatePrediction], list[Exclusion]]:
    """The rollout filter: only the candidates serving the request's version (see "Versions").

    Applied to candidates, after the permission checks, so that a version whose instances are
    all unhealthy, stale, not allowed or already tried falls back like one no instance serves.
    """
    if request.version is None:
        return candidates, excluded
    for wanted in (request.version, request.fallback_version):
        if wanted is None:
            continue
        kept = [c for c in candidates if c.variant == wanted]
        if not kept:
            continue
        note = f"the rollout sends this request to {wanted!r}"
        if wanted != request.version:
            note += f" (no candidate serves its version {request.version!r})"
        dropped = [
            Exclusion(c.instance_id, f"version: serves {c.variant!r}; {note}")
            for c in candidates
            if c.variant != wanted
        ]
        return kept, sorted([*excluded, *dropped], key=lambda e: e.instance_id)
    # Neither version has a candidate: route as if there were no rollout. A rollout never
    # fails a request that the fleet could serve.
    return candidates, excluded
