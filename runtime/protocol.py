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

Conversions to the pure policies' dataclasses (:class:`runtime.routing.InstanceView`,
:class:`runtime.leases.Lease`, :class:`runtime.leases.Usage`) live here too, so neither service
re-describes them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt

from runtime.leases import Lease, Usage
from runtime.routing import InstanceView

__all__ = [
    "PUSH_PATH",
    "ClassCounters",
    "InstanceSnapshot",
    "LeaseGrant",
    "LoadedModel",
    "MetricsPush",
    "PeerInstance",
    "PushReply",
    "TenantRecentUse",
    "UsageDelta",
]

PUSH_PATH = "/v1/push"

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


class LoadedModel(_Wire):
    """A model an agent holds in memory (or is loading or unloading), beyond what
    ``model``/``variant`` say: a node may hold several (``runtime.agent.models``)."""

    name: Name = Field(description="Model name clients send.")
    variant: Name
    state: Literal["loading", "ready", "draining"]
    memory_bytes: NonNegativeInt | None = Field(
        None, description="Footprint counted against the node's memory budget; None: unknown."
    )
    in_flight: NonNegativeInt = 0


class InstanceSnapshot(_Wire):
    """What an agent reports about itself; the fields :class:`InstanceView` routes on."""

    instance_id: Name
    pool: Name
    url: str = Field(pattern=r"^https?://", description="Base URL of the agent, without /v1.")
    model: Name
    variant: Name
    price_usd_per_hour: NonNegativeFloat
    spot: bool = False
    healthy: bool = Field(True, description="Ready and not draining.")
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
    served: dict[str, ClassCounters] = Field(
        default_factory=dict, description="Per SLO class, what this node admitted and served."
    )
    models: list[LoadedModel] = Field(
        default_factory=list,
        description="On a node holding several models: those loading, ready or draining "
        "(model/variant above stay the node's primary model, which the router routes on). "
        "Empty on a single-model node.",
    )

    def to_view(self, last_seen: float, failed_at: float | None = None) -> InstanceView:
        # Excluding last_seen lets a PeerInstance (which carries its own) convert the same way.
        fields = self.model_dump(exclude={"last_seen", "served", "models"})
        return InstanceView(**fields, last_seen=last_seen, failed_at=failed_at)


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


class MetricsPush(_Wire):
    """One agent's periodic report."""

    agent_id: Name
    boot_id: Name = Field(description="Changes on every agent start; seq restarts with it.")
    seq: NonNegativeInt
    sent_at: float = Field(description="Agent's wall clock, seconds since the epoch.")
    instance: InstanceSnapshot
    usage: list[UsageDelta] = Field(default_factory=list, max_length=10_000)
    recent_use: dict[str, TenantRecentUse] = Field(default_factory=dict)


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
