"""The agent <-> controller wire protocol: metrics pushes and the controller's reply.

This module owns the JSON shapes that cross the network between agents and the controller, as
pydantic models, so both sides validate the same schema and a malformed push gets a 400 naming
the field. It sits below both services (the agent never imports the controller).

One push per agent every few seconds::

    POST {controller}/v1/push    Authorization: Bearer <fleet token>
    MetricsPush  ->  PushReply

* ``seq`` increases by one per push of an agent *process* (``agent_id`` + ``boot_id``); a push
  retried after a lost reply carries the same ``seq`` and the same usage, and the controller's
  ledger counts it once.
* ``usage`` holds the deltas accumulated since the previous *acknowledged* push, bucketed by
  tenant and UTC hour, so nothing is lost while the controller is away (the agent keeps them in
  a bounded buffer) and nothing is counted twice.
* The reply carries the fleet view the agent routes with and its quota leases.

Demand-driven placement (``runtime.placement``) adds ``PushReply.placement``, the models this
agent is to load or unload, left out of the JSON when empty like the rollout parts below.

Model rollouts (``runtime.rollout``) add three optional parts, each left out of the JSON when
empty, so that a fleet without a rollout exchanges exactly what it did before and agents and
controllers of either age keep talking to each other:

* ``PushReply.rollouts``: per model under a rollout, a :class:`RolloutDirective` (the traffic
  split, the stable and candidate variants, the shadow fraction) that agents route by;
* ``MetricsPush.versions``: for the models the last reply named, one :class:`VersionStats` per
  (model, variant) this agent served: cumulative counters of finished requests and server-side
  errors, plus the newest latency samples (TTFT and mean TPOT) numbered by a cumulative sample
  count, from which the controller builds each version's ``runtime.rollout.VersionMetrics`` over
  a rollout window (exact counts, p95s over the samples);
* ``MetricsPush.shadow``: :class:`ShadowReport` comparisons of shadow copies with the served
  output, carried like usage (fixed in a push at its first build, retried with it, counted once).

Conversions to the pure policies' dataclasses (:class:`runtime.routing.InstanceView`,
:class:`runtime.leases.Lease`, :class:`runtime.leases.Usage`, :class:`runtime.placement.NodeState`) live here too, so neither service
re-describes them.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, model_validator

from runtime.leases import Lease, Usage
from runtime.placement import HeldModel, NodeState
from runtime.rollout import ShadowComparison
from runtime.routing import InstanceView

__all__ = [
    "PUSH_PATH",
    "ClassCounters",
    "InstanceSnapshot",
    "LeaseGrant",
    "LoadedModel",
    "MetricsPush",
    "PeerInstance",
    "PlacementOrder",
    "PushReply",
    "RolloutDirective",
    "ServingLoad",
    "ShadowReport",
    "TenantRecentUse",
    "UsageDelta",
    "VersionStats",
]

PUSH_PATH = "/v1/push"
# Latency samples one VersionStats carries at most: the newest ones. Enough for a p95 at any
# rate below MAX_VERSION_SAMPLES per push interval; above it the window's samples thin out.
MAX_VERSION_SAMPLES = 256
MAX_SHADOW_REPORTS = 1000  # per push

Name = Annotated[str, Field(min_length=1, max_length=128)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassCounters(_Wire):
    """Cumulative counts for one SLO class since the agent process started (``boot_id``).

    Counters, not rates, so a lost push loses nothing: the controller differences successive
    pushes of the same boot. ``admitted - finished`` is what is in flight now.
    """

    admitted: NonNegativeInt = 0
    finished: NonNegativeInt = 0
    ttft_met: NonNegativeInt = Field(0, description="Finished with TTFT within the class's.")
    tpot_met: NonNegativeInt = Field(0, description="Finished with mean TPOT within the class's.")


class ServingLoad(_Wire):
    """How busy one serving engine is and how fast it runs: what the router predicts from.

    A node reports it for its primary model (:class:`InstanceSnapshot`) and for each further
    model it holds (:class:`LoadedModel`), each from that model's own engine.
    """

    prefill_tokens_per_s: float | None = Field(None, gt=0)
    decode_tokens_per_s: float | None = Field(None, gt=0)
    decode_batch: float | None = Field(None, gt=0)
    running: NonNegativeInt = 0
    max_batch: int = Field(64, ge=1)
    running_prefill_tokens: NonNegativeInt = 0
    running_remaining_tokens: NonNegativeInt = 0
    queued_requests: dict[int, NonNegativeInt] = Field(default_factory=dict)
    queued_prompt_tokens: dict[int, NonNegativeInt] = Field(default_factory=dict)
    kv_usage: float = Field(0.0, ge=0.0, le=1.0)

    @property
    def queued(self) -> int:
        """Requests waiting to start, every priority."""
        return sum(self.queued_requests.values())


class LoadedModel(ServingLoad):
    """One model a node may hold (``runtime.agent.models``), beyond what ``model``/``variant``
    say: loaded or not, its memory, and, when ready, its own engine's load."""

    name: Name = Field(description="Model name clients send.")
    variant: Name
    state: Literal["unloaded", "loading", "ready", "draining"]
    memory_bytes: NonNegativeInt | None = Field(
        None,
        description="Footprint counted against the node's memory budget (measured at its last "
        "load, else configured or estimated); None: unknown.",
    )
    in_flight: NonNegativeInt = Field(0, description="Requests holding it (running or queued).")
    waiting: NonNegativeInt = Field(0, description="Requests waiting for it to load.")
    idle_s: NonNegativeFloat | None = Field(
        None, description="Seconds since a request last used it; None: never used."
    )
    primary: bool = Field(False, description="The node's primary model (never unloaded).")

    def to_held(self) -> HeldModel:
        return HeldModel(
            name=self.name,
            variant=self.variant,
            state=self.state,
            memory_bytes=self.memory_bytes,
            in_flight=self.in_flight,
            waiting=self.waiting,
            queued=self.queued,
            idle_s=self.idle_s,
            primary=self.primary,
        )


class InstanceSnapshot(ServingLoad):
    """What an agent reports about itself; the fields :class:`InstanceView` routes on."""

    instance_id: Name
    pool: Name
    url: str = Field(pattern=r"^https?://", description="Base URL of the agent, without /v1.")
    model: Name
    variant: Name
    price_usd_per_hour: NonNegativeFloat
    spot: bool = False
    healthy: bool = Field(True, description="Ready and not draining.")
    served: dict[str, ClassCounters] = Field(
        default_factory=dict, description="Per SLO class, what this node admitted and served."
    )
    models: list[LoadedModel] = Field(
        default_factory=list,
        description="On a node that may hold several models: every one of them, the primary "
        "included, with its state (model/variant and the load fields above stay the primary "
        "model's). Empty on a single-model node.",
    )
    memory_budget_bytes: NonNegativeInt | None = Field(
        None, description="Most memory the node's models may take together; None: no limit."
    )

    def to_view(self, last_seen: float, failed_at: float | None = None) -> InstanceView:
        """The primary model's view (what a single-model node is)."""
        # Excluding last_seen lets a PeerInstance (which carries its own) convert the same way.
        fields = self.model_dump(exclude={"last_seen", "served", "models", "memory_budget_bytes"})
        return InstanceView(**fields, last_seen=last_seen, failed_at=failed_at)

    def to_node_state(self) -> NodeState:
        """What the placer knows of this node; a single-model node is its primary model alone."""
        if self.models:
            models = tuple(held.to_held() for held in self.models)
        else:
            models = (
                HeldModel(
                    name=self.model,
                    variant=self.variant,
                    state="ready" if self.healthy else "loading",
                    in_flight=self.running + self.queued,
                    queued=self.queued,
                    primary=True,
                ),
            )
        return NodeState(
            node_id=self.instance_id,
            pool=self.pool,
            healthy=self.healthy,
            price_usd_per_hour=self.price_usd_per_hour,
            memory_budget_bytes=self.memory_budget_bytes,
            models=models,
        )

    def to_views(self, last_seen: float, failed_at: float | None = None) -> list[InstanceView]:
        """One view per model the node can serve now: the primary, then each further model
        that is ready, with that model's own load. They share the node's ``instance_id`` (a
        node holds a model once, and the router only compares instances of one model)."""
        primary = self.to_view(last_seen, failed_at)
        views = [primary]
        for held in self.models:
            if held.primary or held.state != "ready" or held.name == self.model:
                continue
            load = held.model_dump(include=set(ServingLoad.model_fields))
            views.append(
                dataclasses.replace(primary, model=held.name, variant=held.variant, **load)
            )
        return views


class UsageDelta(_Wire):
    """Usage of one tenant in one UTC hour since the last acknowledged push."""

    tenant: Name
    hour: NonNegativeInt = Field(description="Start of the UTC hour, seconds since the epoch.")
    requests: NonNegativeInt = 0
    prompt_tokens: NonNegativeInt = 0
    completion_tokens: NonNegativeInt = 0
    accelerator_seconds: NonNegativeFloat = 0.0
    usd: NonNegativeFloat = 0.0


class TenantRecentUse(_Wire):
    """A tenant's recent rates on this agent; the controller splits leases in proportion."""

    requests_per_minute: NonNegativeFloat = 0.0
    tokens_per_minute: NonNegativeFloat = 0.0
    concurrency: NonNegativeFloat = 0.0

    def to_usage(self) -> Usage:
        return Usage(**self.model_dump())


class VersionStats(_Wire):
    """One version (variant) of a model as this agent process served it, since ``boot_id``.

    ``finished`` counts requests served here to the end or to a server-side failure
    (``errors``); a request the client abandoned is in neither. ``recent`` holds the newest
    successful requests' ``(ttft_s, tpot_s)`` (``tpot_s`` None for a single-token output),
    oldest first; the last one is sample number ``samples_total``, so the controller takes
    the ``samples_total - (last seen)`` newest ones and never counts a sample twice, across
    retried pushes included. Counters, not deltas: a lost push loses nothing.
    """

    model: Name
    variant: Name
    finished: NonNegativeInt = 0
    errors: NonNegativeInt = 0
    samples_total: NonNegativeInt = 0
    recent: list[tuple[NonNegativeFloat, NonNegativeFloat | None]] = Field(
        default_factory=list, max_length=MAX_VERSION_SAMPLES
    )

    @model_validator(mode="after")
    def _consistent(self) -> VersionStats:
        if self.errors > self.finished:
            raise ValueError(f"errors ({self.errors}) exceed finished ({self.finished})")
        if len(self.recent) > self.samples_total:
            raise ValueError(f"recent has more samples than samples_total ({self.samples_total})")
        return self


class ShadowReport(_Wire):
    """A shadow copy of one request, compared with the output served to the client.

    ``agreement`` is ``runtime.rollout.compare_outputs`` of the two outputs (both tokenised by
    the model's tokenizer); ``candidate_error`` says the copy failed (its agreement is then not
    meaningful). Latencies are end to end as the origin agent saw them.
    """

    model: Name
    stable: Name = Field(description="The variant that served the client.")
    candidate: Name = Field(description="The variant the copy went to.")
    request_id: Name
    agreement: float = Field(0.0, ge=0.0, le=1.0)
    candidate_error: bool = False
    stable_latency_s: NonNegativeFloat | None = None
    candidate_latency_s: NonNegativeFloat | None = None

    def to_comparison(self) -> ShadowComparison:
        return ShadowComparison(
            request_id=self.request_id,
            agreement=self.agreement,
            candidate_error=self.candidate_error,
            stable_latency_s=self.stable_latency_s,
            candidate_latency_s=self.candidate_latency_s,
        )


class MetricsPush(_Wire):
    """One agent's periodic report."""

    agent_id: Name
    boot_id: Name = Field(description="Changes on every agent start; seq restarts with it.")
    seq: NonNegativeInt
    sent_at: float = Field(description="Agent's wall clock, seconds since the epoch.")
    instance: InstanceSnapshot
    usage: list[UsageDelta] = Field(default_factory=list, max_length=10_000)
    recent_use: dict[str, TenantRecentUse] = Field(default_factory=dict)
    versions: list[VersionStats] = Field(
        default_factory=list,
        max_length=1000,
        description="Per (model, variant) served, for the models under a rollout.",
    )
    shadow: list[ShadowReport] = Field(
        default_factory=list,
        max_length=MAX_SHADOW_REPORTS,
        description="Shadow comparisons made since the last acknowledged push.",
    )


class LeaseGrant(_Wire):
    """A tenant's limits on one agent until ``expires_at`` (controller clock, epoch seconds)."""

    requests_per_minute: NonNegativeInt | None
    tokens_per_minute: NonNegativeInt | None
    max_concurrency: NonNegativeInt | None
    issued_at: float
    expires_at: float | None

    @classmethod
    def from_lease(cls, lease: Lease) -> LeaseGrant:
        return cls(
            requests_per_minute=lease.requests_per_minute,
            tokens_per_minute=lease.tokens_per_minute,
            max_concurrency=lease.max_concurrency,
            issued_at=lease.issued_at,
            expires_at=lease.expires_at,
        )

    def to_lease(self) -> Lease:
        return Lease(**self.model_dump())


class PeerInstance(InstanceSnapshot):
    """An instance of the fleet view as the controller last heard from it."""

    last_seen: float


class RolloutDirective(_Wire):
    """What agents do for a model under a rollout: the controller's current decision.

    ``split`` maps the two variants to their share of traffic; agents choose a request's version
    with ``runtime.rollout.choose_version`` over :meth:`ordered_split` (candidate first, as the
    rollout's order requires, whatever order the JSON object arrived in) and route it with the
    stable variant as fallback. ``shadow_fraction`` of requests is also copied to the candidate.
    """

    stable: Name
    candidate: Name
    strategy: Literal["replace", "canary", "shadow"]
    phase: Name
    split: dict[Name, Annotated[float, Field(ge=0.0, le=1.0)]]
    shadow_fraction: float = Field(0.0, ge=0.0, le=1.0)
    compare: Literal["token-agreement", "exact-match"] = Field(
        "token-agreement", description="How a shadow copy's output is compared with the served one."
    )

    @model_validator(mode="after")
    def _two_versions(self) -> RolloutDirective:
        if set(self.split) != {self.stable, self.candidate}:
            raise ValueError("split must give a share to exactly the stable and the candidate")
        if abs(sum(self.split.values()) - 1.0) > 1e-6:
            raise ValueError("split: shares must sum to 1")
        return self

    def ordered_split(self) -> dict[str, float]:
        return {self.candidate: self.split[self.candidate], self.stable: self.split[self.stable]}


class PlacementOrder(_Wire):
    """Load or unload one of the models the agent may hold (``runtime.placement``'s decision
    for this agent). Carried out once, in the background; a model already in the asked state
    is left as it is. Unloading lets requests in flight finish."""

    action: Literal["load", "unload"]
    model: Name
    reason: str = Field("", max_length=500)


class PushReply(_Wire):
    """The controller's answer to a push."""

    accepted: bool = Field(description="False only when the push was a duplicate.")
    duplicate: bool = False
    server_time: float
    fleet: list[PeerInstance] = Field(default_factory=list)
    leases: dict[str, LeaseGrant] = Field(default_factory=dict)
    over_budget_tenants: list[str] = Field(
        default_factory=list,
        description="Tenants whose monthly USD or accelerator-hour quota the ledger shows spent.",
    )
    fleet_over_budget: bool = Field(False, description="The fleet's monthly budget is spent.")
    rollouts: dict[Name, RolloutDirective] = Field(
        default_factory=dict, description="Per model under a rollout: how agents split it."
    )
    placement: list[PlacementOrder] = Field(
        default_factory=list,
        max_length=100,
        description="Models this agent is to load or unload (demand-driven placement).",
    )
