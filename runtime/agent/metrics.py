"""Prometheus metrics and per-tenant usage of one agent.

This module owns what the agent measures. Every :class:`AgentMetrics` has its own
:class:`prometheus_client.CollectorRegistry` (not the process-global one), so several agents can
live in one process (tests, the simulator) without their series colliding.

Series (all prefixed ``fleetform_``):

* histograms per SLO class: ``ttft_seconds``, ``inter_token_latency_seconds``,
  ``request_duration_seconds`` (end to end), ``queue_time_seconds``;
* counters per tenant: ``prompt_tokens_total``, ``completion_tokens_total``, ``requests_total``
  (also by class and finish reason), ``accelerator_seconds_total``, ``cost_usd_total``;
* counters by reason: ``rejected_requests_total`` (auth, forbidden, not_found, bad_request,
  quota_<limit>, overload, queue_full, draining, loading, fleet_budget, shed, unroutable, and
  for model slots model_draining, load_failed, model_memory) and
  ``shed_requests_total`` (overload shedding per class, by this node or the fleet router);
* per model slot (:mod:`runtime.agent.models`): ``model_load_seconds`` (histogram of load
  durations), ``model_cold_starts_total`` (requests that waited for their model to load) and
  ``model_load_wait_seconds`` (how long; it is part of their TTFT), ``model_evictions_total``
  (idle models unloaded to make room), ``model_memory_bytes`` (footprint of each loaded model, 0
  once unloaded) and ``model_memory_budget_bytes``;
* ``routed_requests_total`` by router outcome and target (local or peer), and
  ``forward_failures_total`` by reason (connect, timeout, status, disconnected);
* model rollouts: ``version_requests_total`` by model, variant and result (ok, error), and
  ``shadow_requests_total`` by side (``sent``: copies this origin made, ``served``: copies this
  node ran for a peer, never billed) and result (ok, error, skipped_busy, no_candidate);
* gauges read at scrape time: ``queue_depth`` (waiting), ``running_sequences``,
  ``in_flight_requests``, ``kv_cache_used_bytes``, ``kv_cache_usage_ratio``, ``ready``,
  ``draining``, ``prefill_tokens_per_second``, ``decode_step_seconds``.

:class:`UsageLedger` keeps the same per-tenant totals as plain numbers for ``GET /v1/usage``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.agent.backend import BackendStats, GenerationResult
from runtime.protocol import MAX_VERSION_SAMPLES, VersionStats

__all__ = [
    "AgentMetrics",
    "ServedTally",
    "TenantUsage",
    "UsageLedger",
    "VersionTally",
    "mean_tpot_s",
]

# From tens of milliseconds (a GPU) to minutes (a queued CPU batch job).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
# Loading a model: from a fraction of a second (cached, small) to minutes (large, cold disk).
LOAD_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AgentMetrics:
    """The agent's Prometheus series in a registry of its own."""

    def __init__(self, node_id: str, pool: str, model: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge(
            "fleetform_agent_info",
            "Constant 1, labelled with what this agent is.",
            ["node_id", "pool", "model"],
            registry=r,
        )
        self.info.labels(node_id, pool, model).set(1)
        self.ttft = Histogram(
            "fleetform_ttft_seconds",
            "Time from request arrival to its first generated token.",
            ["slo_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "fleetform_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            ["slo_class"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "fleetform_request_duration_seconds",
            "Time from request arrival to its last token (end to end).",
            ["slo_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "fleetform_queue_time_seconds",
            "Time from request arrival to its first engine step.",
            ["slo_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "fleetform_prompt_tokens", "Prompt tokens processed.", ["tenant"], registry=r
        )
        self.completion_tokens = Counter(
            "fleetform_completion_tokens", "Tokens generated.", ["tenant"], registry=r
        )
        self.requests = Counter(
            "fleetform_requests",
            "Requests that ran on the engine, by how they ended.",
            ["tenant", "slo_class", "finish_reason"],
            registry=r,
        )
        self.accelerator_seconds = Counter(
            "fleetform_accelerator_seconds",
            "Engine step time attributed to the tenant's requests.",
            ["tenant"],
            registry=r,
        )
        self.cost_usd = Counter(
            "fleetform_cost_usd",
            "Cost of the tenant's requests: attributed accelerator seconds x node price.",
            ["tenant"],
            registry=r,
        )
        self.rejected = Counter(
            "fleetform_rejected_requests",
            "Requests refused before reaching the engine, by reason.",
            ["reason"],
            registry=r,
        )
        self.shed = Counter(
            "fleetform_shed_requests",
            "Sheddable requests refused because the node could not meet their TTFT objective.",
            ["slo_class"],
            registry=r,
        )

        self.routed = Counter(
            "fleetform_routed_requests",
            "Fleet routing decisions for requests this agent admitted, by outcome and target "
            "(local or peer).",
            ["outcome", "target"],
            registry=r,
        )
        self.forward_failures = Counter(
            "fleetform_forward_failures",
            "Forwards to a peer that failed before any output (then tried elsewhere), by reason.",
            ["reason"],
            registry=r,
        )

        self.version_requests = Counter(
            "fleetform_version_requests",
            "Requests served here per model version (variant), for rollouts: ok or error "
            "(a server-side failure).",
            ["model", "variant", "result"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "fleetform_shadow_requests",
            "Shadow copies of requests (model rollouts), never billed: sent by this origin or "
            "served here for a peer, by result.",
            ["side", "result"],
            registry=r,
        )

        self.model_load_seconds = Histogram(
            "fleetform_model_load_seconds",
            "Time to load a model (memory decision, engine load), per load.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.model_cold_starts = Counter(
            "fleetform_model_cold_starts",
            "Requests that had to wait for their model to be loaded.",
            ["model"],
            registry=r,
        )
        self.model_load_wait = Histogram(
            "fleetform_model_load_wait_seconds",
            "How long a cold-start request waited for its model (included in its TTFT).",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.model_evictions = Counter(
            "fleetform_model_evictions",
            "Idle models unloaded to make room for another under the memory budget.",
            ["model"],
            registry=r,
        )
        self.model_memory = Gauge(
            "fleetform_model_memory_bytes",
            "Memory a loaded model takes (weights + KV pool; 0 when unloaded).",
            ["model"],
            registry=r,
        )
        self.model_memory_budget = Gauge(
            "fleetform_model_memory_budget_bytes",
            "The node's memory budget for loaded models (NaN: none).",
            registry=r,
        )

    def bind_gauges(
        self,
        stats: Callable[[], BackendStats],
        in_flight: Callable[[], int],
        ready: Callable[[], bool],
        draining: Callable[[], bool],
    ) -> None:
        """Gauges computed at scrape time from the live state."""

        def gauge(name: str, doc: str, read: Callable[[], float | None]) -> None:
            g = Gauge(name, doc, registry=self.registry)
            g.set_function(lambda: float("nan") if (v := read()) is None else float(v))

        gauge("fleetform_queue_depth", "Requests waiting for the engine.", lambda: stats().waiting)
        gauge(
            "fleetform_running_sequences",
            "Sequences in the running batch.",
            lambda: stats().running,
        )
        gauge("fleetform_in_flight_requests", "Requests admitted and not finished.", in_flight)
        gauge(
            "fleetform_kv_cache_used_bytes",
            "KV cache bytes in use.",
            lambda: stats().kv_used_bytes,
        )
        gauge(
            "fleetform_kv_cache_capacity_bytes",
            "KV cache bytes in total.",
            lambda: stats().kv_capacity_bytes,
        )
        gauge(
            "fleetform_kv_cache_usage_ratio",
            "Fraction of the KV cache in use.",
            lambda: stats().kv_usage,
        )
        gauge("fleetform_ready", "1 when serving, else 0.", lambda: float(ready()))
        gauge("fleetform_draining", "1 while draining, else 0.", lambda: float(draining()))
        gauge(
            "fleetform_prefill_tokens_per_second",
            "Measured prefill speed (EWMA), used to predict queue wait.",
            lambda: stats().prefill_tokens_per_s,
        )
        gauge(
            "fleetform_decode_step_seconds",
            "Measured decode step time (EWMA).",
            lambda: stats().decode_step_s,
        )


@dataclass
class TenantUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accelerator_seconds: float = 0.0
    usd: float = 0.0


@dataclass
class UsageLedger:
    """Per-tenant totals since the agent started."""

    started_at: float = field(default_factory=time.time)
    tenants: dict[str, TenantUsage] = field(default_factory=dict)

    def record(
        self,
        tenant: str,
        prompt_tokens: int,
        completion_tokens: int,
        accelerator_seconds: float,
        usd: float,
    ) -> None:
        usage = self.tenants.setdefault(tenant, TenantUsage())
        usage.requests += 1
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.accelerator_seconds += accelerator_seconds
        usage.usd += usd

    def of(self, tenant: str) -> TenantUsage:
        return self.tenants.get(tenant, TenantUsage())


@dataclass
class ClassTally:
    admitted: int = 0
    finished: int = 0
    ttft_met: int = 0
    tpot_met: int = 0


@dataclass
class ServedTally:
    """Per SLO class: requests admitted here, finished, and how many met TTFT and TPOT.

    Reported cumulatively with every push (``runtime.protocol.ClassCounters``); the
    controller's autoscaler turns the differences into arrival rates and SLO attainment.
    """

    classes: dict[str, ClassTally] = field(default_factory=dict)

    def admitted(self, slo_class: str) -> None:
        self.classes.setdefault(slo_class, ClassTally()).admitted += 1

    def finished(
        self,
        slo_class: str,
        *,
        ttft_s: float | None,
        tpot_s: float | None,
        ttft_target_s: float,
        tpot_target_s: float,
    ) -> None:
        tally = self.classes.setdefault(slo_class, ClassTally())
        tally.finished += 1
        # A request that produced no token missed its TTFT; one with a single token has no
        # inter-token gaps and so met its TPOT trivially.
        if ttft_s is not None and ttft_s <= ttft_target_s:
            tally.ttft_met += 1
        if ttft_s is not None and (tpot_s is None or tpot_s <= tpot_target_s):
            tally.tpot_met += 1


def mean_tpot_s(result: GenerationResult) -> float | None:
    """A request's time per output token: the mean of its inter-token gaps (None for one
    token). The one definition behind the per-class and the per-version figures."""
    gaps = result.inter_token_s
    return sum(gaps) / len(gaps) if gaps else None


@dataclass
class _VersionCounts:
    finished: int = 0
    errors: int = 0
    samples_total: int = 0
    recent: deque[tuple[float, float | None]] = field(
        default_factory=lambda: deque(maxlen=MAX_VERSION_SAMPLES)
    )


@dataclass
class VersionTally:
    """Per (model, variant) served here: cumulative counts and the newest latency samples.

    Reported with every push (:class:`runtime.protocol.VersionStats`) for the models under a
    rollout; the controller turns them into ``runtime.rollout.VersionMetrics`` per window.
    """

    versions: dict[tuple[str, str], _VersionCounts] = field(default_factory=dict)

    def finished(
        self, model: str, variant: str, *, ttft_s: float | None, tpot_s: float | None
    ) -> None:
        counts = self.versions.setdefault((model, variant), _VersionCounts())
        counts.finished += 1
        if ttft_s is not None:
            counts.samples_total += 1
            counts.recent.append((ttft_s, tpot_s))

    def failed(self, model: str, variant: str) -> None:
        """A server-side failure of a request this version was serving."""
        counts = self.versions.setdefault((model, variant), _VersionCounts())
        counts.finished += 1
        counts.errors += 1

    def report(self, models: Collection[str]) -> list[VersionStats]:
        """The versions of ``models`` served so far (those under a rollout)."""
        return [
            VersionStats(
                model=model,
                variant=variant,
                finished=c.finished,
                errors=c.errors,
                samples_total=c.samples_total,
                recent=list(c.recent),
            )
            for (model, variant), c in sorted(self.versions.items())
            if model in models
        ]
