"""The discrete-event fleet simulator: a virtual clock driving the live policy code.

This module owns simulated time and simulated machines, and nothing that decides. Every
decision is made by the code the live services run, called with the simulator's clock and
state snapshots in place of wall time and HTTP:

* which instance serves a request: :func:`runtime.routing.route` over a
  :class:`~runtime.routing.FleetView` built from the simulated instances, with
  :meth:`RoutingPolicy.from_spec` and :func:`priors_from_costmodel` (as the controller does);
* whether the tenant may start it: :class:`runtime.quota.QuotaBook` on the virtual clock;
* whether the chosen node refuses it: :func:`runtime.agent.admission.decide_shedding` (as the
  agent does after routing, only its ``queue_full`` verdict counts for a routed request);
* what runs in each engine step: one :class:`runtime.scheduler.Scheduler` per model replica,
  over a :class:`~runtime.scheduler.BlockKVCapacity` sized by the cost model;
* how many replicas each pool runs: :class:`runtime.autoscale.Autoscaler`, every
  ``autoscaling.period_s`` of virtual time, with :class:`FleetSignals` from the simulation;
* how fast the agent thinks each node is: :class:`runtime.agent.admission.ThroughputEstimate`
  fed with the simulated steps, as the agent feeds it with real ones.

What the simulator itself models (the "transport" and the machines):

* Instances run at the speed :mod:`runtime.sim.speed` derives from the cost model, one event per
  engine step; an instance holds ``replicas_per_instance`` model replicas (a TPU slice running
  two tensor-parallel replicas is two schedulers), each its own routing target at its share of
  the instance price.
* Runs of pure-decode steps with an unchanged batch are one event: the scheduler's ``update``
  is called once per step with the same plan, which is what ``schedule`` would return in each
  of those steps (nothing is waiting to be admitted, no sequence finishes before the last, the
  KV pool has the blocks they need, all checked before the run is taken). A request routed to
  the replica mid-run cuts the run at the step in progress, so it is admitted when it would be.
* Views: each replica's :class:`InstanceView` is refreshed every ``view_refresh_s`` (the
  agents' push interval) and whenever the router sends it a request (the router's own
  overlay of what it sent, as the agent keeps one for its forwards).
* New replicas are ready ``cold_start_s`` after launch; removed ones drain (finish everything
  they hold, take nothing new); cancelled boots stop at once. Billing (``pool_hourly_usd``:
  on-demand base at the on-demand price, the rest at spot) runs from launch to the end,
  boot time included.
* Spot preemption, by a rate per instance-hour or at listed times: the instance gets a notice
  (it stops taking work), and when reclaimed, what it still holds is routed again, excluding
  the instances already tried, as the agent's forward retry does (a request keeps its arrival
  and its first token; after ``max_attempts`` it fails). ``PoolSignals.lost`` tells the
  autoscaler.

Every request ends ``completed``, ``shed`` or ``failed``, with a reason.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime import autoscale, quota, routing, scheduler
from runtime.agent import admission
from runtime.agent.config import AdmissionSettings
from runtime.catalog import Catalog, InstanceRecord
from runtime.costmodel import PerformanceModel
from runtime.plan import pool_hourly_usd
from runtime.sim.speed import KV_BLOCK_TOKENS, PoolSpeed, pool_speed
from runtime.sim.trace import MixedRequest
from runtime.spec import HOURS_PER_MONTH, FleetSpec, PoolSpec, SloClassSpec

__all__ = ["RequestRecord", "SimSettings", "Simulation", "Simulator"]

STOP = 0  # the token id that ends a request (sampled when its trace length is reached)
CONTINUE = 1
_STOP_IDS = frozenset({STOP})

# Event kinds, in the order simultaneous events are handled.
_READY, _STEP, _NOTICE, _RECLAIM, _TICK, _PREEMPT_DRAW = range(6)


@dataclass(frozen=True)
class SimSettings:
    """How the simulation runs (the fleet and the policies come from the spec)."""

    seed: int = 0
    view_refresh_s: float = 2.0  # the agents' default push interval
    max_num_batched_tokens: int = 2048
    max_num_seqs: int | None = None  # None: the pool's upstream max_in_flight, else 32
    max_tokens: int | None = None  # what clients ask for; None: the trace's output length
    spot_preemption_rate: float = 0.0  # per spot instance-hour
    spot_preemptions: tuple[tuple[str | None, float], ...] = ()  # (pool or any, time)
    spot_notice_s: float = 30.0
    max_attempts: int = 3
    macro_steps: bool = True
    # Bound each step's prefill by the decodes' TPOT objectives (the scheduler's StepCost).
    tpot_budget: bool = True
    perf: PerformanceModel = field(default_factory=PerformanceModel.default)


# --------------------------------------------------------------------------------------------
# Simulated state


class _Request:
    __slots__ = (
        "admitted_at",
        "arrival",
        "attempt_first_at",
        "attempts",
        "cls",
        "computed",
        "finish_reason",
        "finished_at",
        "first_token_at",
        "generated",
        "index",
        "last_pool",
        "max_tokens",
        "model",
        "output",
        "prompt",
        "reason",
        "rid",
        "server",
        "status",
        "tenant",
        "ticket",
        "tried",
    )

    def __init__(self, m: MixedRequest, cls: SloClassSpec, max_tokens: int) -> None:
        self.index = m.index
        self.rid = f"r{m.index}"
        self.arrival = m.arrival_s
        self.prompt = m.prompt_tokens
        self.output = max(1, m.output_tokens)
        self.max_tokens = max(self.output, max_tokens)
        self.tenant = m.tenant
        self.model = m.model
        self.cls = cls
        self.status = "pending"
        self.reason = ""
        self.finish_reason: str | None = None
        self.server: _Server | None = None
        self.last_pool: str | None = None
        self.generated = 0
        self.computed = 0  # tokens the scheduler has computed (prompt first)
        self.first_token_at: float | None = None  # the first the client saw, any attempt
        self.admitted_at: float | None = None  # this attempt: first scheduled
        self.attempt_first_at: float | None = None  # this attempt: first token
        self.finished_at: float | None = None
        self.attempts = 0
        self.tried: set[str] = set()
        self.ticket: quota.QuotaTicket | None = None


class _Pool:
    """A pool's simulated instances, its billing, and what the autoscaler asked of it."""

    def __init__(self, spec: PoolSpec, record: InstanceRecord, speed: PoolSpeed) -> None:
        self.spec = spec
        self.name = spec.name
        self.record = record
        self.speed = speed
        self.instances: list[_Instance] = []  # alive: booting, ready or draining
        self.requested = 0
        self.lost = 0
        self.cost_usd = 0.0
        self.replica_seconds = 0.0
        self.billed_until = 0.0
        unit = (record.spot_usd_per_hour if spec.spot else record.on_demand_usd_per_hour) or 0.0
        self.replica_price = unit / speed.replicas_per_instance  # per model replica, for routing

    def bill(self, now: float) -> None:
        dt = now - self.billed_until
        if dt > 0:
            n = len(self.instances)
            self.cost_usd += pool_hourly_usd(self.spec, self.record, n) * dt / 3600.0
            self.replica_seconds += n * dt
        self.billed_until = now


class _Instance:
    __slots__ = ("id", "launched_at", "pool", "ready_at", "reclaim_at", "servers", "state")

    def __init__(self, instance_id: str, pool: _Pool, now: float, ready_at: float) -> None:
        self.id = instance_id
        self.pool = pool
        self.launched_at = now
        self.ready_at = ready_at
        self.state = "booting"
        self.servers: list[_Server] = []
        self.reclaim_at: float | None = None


class _Run:
    """A step in progress, or a run of identical pure-decode steps (``batch`` > 0)."""

    __slots__ = ("batch", "context", "out", "started", "steps", "total")

    def __init__(
        self,
        out: scheduler.SchedulerOutput,
        started: float,
        total: float,
        steps: int,
        batch: int = 0,
        context: int = 0,
    ) -> None:
        self.out = out
        self.started = started
        self.total = total  # seconds, all steps
        self.steps = steps
        self.batch = batch  # decodes per step of a run; 0 for a single step
        self.context = context  # their summed contexts at the first step


class _Server:
    """One model replica: a live Scheduler over a block KV pool, stepping in virtual time."""

    __slots__ = (
        "busy",
        "id",
        "instance",
        "items",
        "kv",
        "max_num_seqs",
        "pending",
        "pool",
        "requests",
        "sched",
        "speed",
        "throughput",
        "upstream",
        "version",
        "view",
        "view_at",
    )

    def __init__(
        self, server_id: str, instance: _Instance, settings: SimSettings, clock: object
    ) -> None:
        pool = instance.pool
        self.id = server_id
        self.instance = instance
        self.pool = pool
        self.speed = pool.speed
        upstream = pool.spec.upstream
        self.max_num_seqs = settings.max_num_seqs or (upstream.max_in_flight if upstream else 32)
        self.kv = scheduler.BlockKVCapacity(
            self.speed.kv_tokens // KV_BLOCK_TOKENS, block_size=KV_BLOCK_TOKENS
        )
        config = scheduler.SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=self.speed.max_model_len,
        )
        self.sched = scheduler.Scheduler(
            config,
            self.kv,
            clock,  # type: ignore[arg-type]
            step_cost=self.speed.step_cost() if settings.tpot_budget else None,
        )
        self.throughput = admission.ThroughputEstimate()
        # The agent measures an upstream per request (it sees no steps), the embedded engine
        # per step; the simulator feeds the same estimate the way the pool's agent would.
        self.upstream = pool.spec.engine == "openai-upstream"
        self.requests: dict[str, _Request] = {}  # unfinished requests held here
        self.busy = False
        self.pending: _Run | None = None
        self.version = 0
        self.view: routing.InstanceView | None = None
        self.items: list[admission.WorkItem] = []  # the admission check's view, built with it
        self.view_at = -math.inf


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """How one request ended."""

    index: int
    tenant: str
    model: str
    slo_class: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # generated (the trace's length unless cut short)
    status: str  # completed | shed | failed
    reason: str
    pool: str | None  # the pool of the instance that served it (last tried, if it did not end)
    ttft_s: float | None
    tpot_s: float | None
    ttft_ok: bool
    tpot_ok: bool
    attempts: int


@dataclass
class Simulation:
    """Everything a run measured; :mod:`runtime.sim.report` turns it into figures."""

    records: list[RequestRecord]
    end_s: float
    pool_cost_usd: dict[str, float]
    replica_hours: dict[str, float]
    timeline: list[dict[str, object]]
    plans: int
    kv_preemptions: int
    spot_preemptions: int
    retries: int
    steps: int
    events: int
    wall_s: float
    notes: list[str]


# --------------------------------------------------------------------------------------------
# The simulator


class Simulator:
    """Replays ``requests`` against the fleet ``spec``; :meth:`run` returns a :class:`Simulation`."""

    def __init__(
        self,
        spec: FleetSpec,
        requests: Sequence[MixedRequest],
        *,
        catalog: Catalog,
        settings: SimSettings | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings or SimSettings()
        self.now = 0.0
        self.clock = lambda: self.now
        perf = self.settings.perf
        self.notes: list[str] = []
        self.classes = {c.name: c for c in spec.slo_classes}
        self.policy = routing.RoutingPolicy.from_spec(
            spec, priors=routing.priors_from_costmodel(spec, catalog, perf=perf)
        )
        self.autoscaler = autoscale.Autoscaler.from_spec(spec, catalog=catalog)
        self.quotas = quota.QuotaBook.from_specs(
            {t.name: t.quotas for t in spec.tenants}, self.clock
        )
        self.max_waiting = AdmissionSettings().max_waiting_requests
        self.pools: dict[str, _Pool] = {}
        for pool in spec.pools:
            ref = pool.price_ref
            record = catalog.get(ref.cloud, ref.region, ref.instance_type)
            if pool.cloud == "local":
                self.notes.append(
                    f"pool {pool.name!r} is local: simulated as the CPUs of {ref.instance_type}"
                )
            self.pools[pool.name] = _Pool(pool, record, pool_speed(spec, pool, catalog, perf))
        cap = self.settings.max_tokens
        self.requests = [
            _Request(m, self.classes[m.slo_class], cap if cap is not None else m.output_tokens)
            for m in sorted(requests, key=lambda m: (m.arrival_s, m.index))
        ]
        self.servers: dict[str, _Server] = {}
        self._heap: list[tuple[float, int, int, object, int]] = []
        self._seq = itertools.count()
        self._instance_ids = itertools.count()
        self._rng = random.Random(self.settings.seed)
        self._done = 0
        self._records: dict[int, RequestRecord] = {}
        # Per planning period, for FleetSignals.
        self._arrivals: Counter[str] = Counter()
        self._period_tenants: dict[str, set[str]] = {}  # tenants arriving this period
        self._period_service: dict[str, list[float]] = {}
        self._period_slo: dict[str, list[int]] = {}
        self.timeline: list[dict[str, object]] = []
        self.plans = 0
        self.kv_preemptions = 0
        self.spot_preemptions = 0
        self.retries = 0
        self.steps = 0
        self.events = 0

    # -- events ---------------------------------------------------------------------------------

    def _push(self, at: float, kind: int, target: object = None, version: int = 0) -> None:
        heapq.heappush(self._heap, (at, kind, next(self._seq), target, version))

    def run(self) -> Simulation:
        started = time.perf_counter()
        # The run allocates millions of short-lived, acyclic objects (one RequestUpdate per
        # token); the cyclic collector would scan them over and over for nothing.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run(started)
        finally:
            if collecting:
                gc.enable()

    def _run(self, started: float) -> Simulation:
        for pool in self.pools.values():
            for _ in range(pool.spec.replicas):
                # The declared replicas are up when the replay starts (a warm fleet).
                self._launch(pool, ready_at=0.0)
            pool.requested = pool.spec.replicas
        # The first plan comes after one period of observations, as a controller's would.
        self._push(self.spec.autoscaling.period_s, _TICK)
        for pool_name, at in self.settings.spot_preemptions:
            self._push(at, _NOTICE, pool_name, -1)
        if self.settings.spot_preemption_rate > 0:
            self._draw_preemption(0.0)
        arrivals = self.requests
        i, n = 0, len(arrivals)
        heap = self._heap
        while True:
            next_arrival = arrivals[i].arrival if i < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                at, kind, _, target, version = heapq.heappop(heap)
                self.now = at
                self.events += 1
                if kind == _STEP:
                    server: _Server = target  # type: ignore[assignment]
                    if version == server.version:
                        self._end_step(server)
                elif kind == _TICK:
                    if i >= n and self._done >= n:
                        break
                    self._tick()
                    self._push(at + self.spec.autoscaling.period_s, _TICK)
                elif kind == _READY:
                    self._ready(target)  # type: ignore[arg-type]
                elif kind == _NOTICE:
                    self._notice(target, version)
                elif kind == _RECLAIM:
                    self._reclaim(target)  # type: ignore[arg-type]
                elif kind == _PREEMPT_DRAW and (i < n or self._done < n):
                    self._preempt_random()
                    self._draw_preemption(at)
            elif i < n:
                self.now = next_arrival
                self.events += 1
                request = arrivals[i]
                i += 1
                self._arrivals[request.model] += 1
                self._period_tenants.setdefault(request.model, set()).add(request.tenant)
                self._dispatch(request)
            else:
                break
        end = self.now
        for pool in self.pools.values():
            pool.bill(end)
        self._sample(end)
        records = [self._records[r.index] for r in self.requests]
        return Simulation(
            records=records,
            end_s=end,
            pool_cost_usd={p.name: p.cost_usd for p in self.pools.values()},
            replica_hours={p.name: p.replica_seconds / 3600.0 for p in self.pools.values()},
            timeline=self.timeline,
            plans=self.plans,
            kv_preemptions=self.kv_preemptions,
            spot_preemptions=self.spot_preemptions,
            retries=self.retries,
            steps=self.steps,
            events=self.events,
            wall_s=time.perf_counter() - started,
            notes=self.notes,
        )

    # -- requests -------------------------------------------------------------------------------

    def _views(self) -> tuple[routing.InstanceView, ...]:
        now = self.now
        refresh = self.settings.view_refresh_s
        views = []
        for server in self.servers.values():
            if server.instance.state != "ready":
                continue
            if server.view is None or now - server.view_at >= refresh:
                self._refresh_view(server)
            views.append(server.view)
        return tuple(views)  # type: ignore[arg-type]

    def _refresh_view(self, server: _Server) -> None:
        """What the replica's agent would push now (see runtime.agent.fleet.instance_snapshot)."""
        sched = server.sched
        queued: Counter[int] = Counter()
        queued_tokens: Counter[int] = Counter()
        running = prefill_left = remaining = 0
        waiting_status = scheduler.RequestStatus.WAITING
        items = []
        work_item = admission.WorkItem
        for request in server.requests.values():
            priority = request.cls.priority
            left = max(0, request.prompt - request.computed)
            to_go = max(0, request.max_tokens - request.generated)
            if sched.status(request.rid) is waiting_status:
                queued[priority] += 1
                queued_tokens[priority] += request.prompt
                items.append(work_item(priority, left, to_go, False))
            else:
                running += 1
                prefill_left += left
                remaining += to_go
                items.append(work_item(priority, left, to_go, True))
        server.items = items
        t = server.throughput
        decode = t.decode_batch / t.decode_step_s if t.decode_step_s and t.decode_batch else None
        kv = server.kv
        server.view = routing.InstanceView(
            instance_id=server.id,
            pool=server.pool.name,
            url=f"sim://{server.id}",
            model=server.pool.spec.serves.model,
            variant=server.pool.spec.serves.variant,
            price_usd_per_hour=server.pool.replica_price,
            spot=server.pool.spec.spot,
            last_seen=self.now,
            prefill_tokens_per_s=t.prefill_tokens_per_s or None,
            decode_tokens_per_s=decode,
            decode_batch=t.decode_batch or None,
            running=running,
            max_batch=server.max_num_seqs,
            running_prefill_tokens=prefill_left,
            running_remaining_tokens=remaining,
            queued_requests=dict(queued),
            queued_prompt_tokens=dict(queued_tokens),
            # An upstream does not report its KV use to the agent (BackendStats.kv_usage None).
            kv_usage=0.0 if server.upstream else min(1.0, kv.used_blocks / kv.num_blocks),
        )
        server.view_at = self.now

    def _dispatch(self, request: _Request) -> None:
        """Route, charge the quota and enqueue, as the agent does for a client's request."""
        cls = request.cls
        decision = routing.route(
            routing.RouteRequest(
                model=request.model,
                slo_class=cls.name,
                tenant=request.tenant,
                prompt_tokens=request.prompt,
                max_tokens=request.max_tokens,
                request_id=request.rid,
                exclude=frozenset(request.tried),
            ),
            routing.FleetView(instances=self._views(), now=self.now),
            self.policy,
        )
        if decision.outcome is routing.RouteOutcome.SHED:
            self._end(request, "shed", f"route: {decision.reason}")
            return
        if decision.instance_id is None:
            self._end(request, "failed", f"unroutable: {decision.reason}")
            return
        server = self.servers[decision.instance_id]
        if request.ticket is None:
            verdict = self.quotas.admit(request.tenant, request.prompt + request.max_tokens)
            if not verdict.allowed:
                self._end(request, "shed", f"quota_{verdict.limit}: {verdict.message}")
                return
            request.ticket = verdict.ticket
        load = admission.LoadState(
            prefill_tokens_per_s=server.throughput.prefill_tokens_per_s,
            decode_step_s=server.throughput.decode_step_s,
            items=server.items,  # as fresh as the view the router just used
            max_num_seqs=server.max_num_seqs,
            max_waiting=self.max_waiting,
        )
        refusal = admission.decide_shedding(load, request.prompt, cls)
        # A routed request is refused only for a full queue: the TTFT verdict was the router's.
        if refusal.shed and refusal.reason == "queue_full":
            self._end(request, "shed", f"queue_full: {refusal.message}")
            return
        self._enqueue(server, request)

    def _enqueue(self, server: _Server, request: _Request) -> None:
        try:
            server.sched.add_request(
                scheduler.Request(
                    request_id=request.rid,
                    prompt_token_ids=range(request.prompt),
                    max_tokens=request.max_tokens,
                    priority=request.cls.priority,
                    deadline=request.arrival + request.cls.ttft_ms / 1000.0,
                    tpot=request.cls.tpot_ms / 1000.0,
                    stop_token_ids=_STOP_IDS,
                    arrival_time=self.now,
                )
            )
        except ValueError as error:
            self._end(request, "failed", f"rejected by the scheduler: {error}")
            return
        request.status = "queued"
        request.server = server
        request.last_pool = server.pool.name
        request.tried.add(server.id)
        request.generated = 0
        request.computed = 0
        request.admitted_at = request.attempt_first_at = None
        server.requests[request.rid] = request
        self._refresh_view(server)  # the router's overlay: it knows what it just sent
        if not server.busy:
            self._start_step(server)
        elif server.pending is not None and server.pending.steps > 1:
            self._cut_run(server)

    def _end(self, request: _Request, status: str, reason: str, finish: str | None = None) -> None:
        request.status = status
        request.reason = reason
        request.finish_reason = finish
        request.finished_at = self.now
        if request.ticket is not None:
            used = request.prompt + request.generated if status == "completed" else 0
            self.quotas.release(request.ticket, used)
        cls = request.cls
        ttft = tpot = None
        ttft_ok = tpot_ok = False
        if status == "completed" and request.first_token_at is not None:
            ttft = request.first_token_at - request.arrival
            tpot = (
                (self.now - request.first_token_at) / (request.generated - 1)
                if request.generated > 1
                else 0.0
            )
            # A small tolerance for float rounding of step times summed along a run.
            ttft_ok = ttft <= cls.ttft_ms / 1000.0 + 1e-9
            tpot_ok = tpot <= cls.tpot_ms / 1000.0 + 1e-9
            self._period_service.setdefault(request.model, []).append(self.now - request.arrival)
        if not cls.sheddable:
            self._period_slo.setdefault(request.model, []).append(int(ttft_ok and tpot_ok))
        self._records[request.index] = RequestRecord(
            index=request.index,
            tenant=request.tenant,
            model=request.model,
            slo_class=cls.name,
            arrival_s=request.arrival,
            prompt_tokens=request.prompt,
            output_tokens=request.generated if status == "completed" else 0,
            status=status,
            reason=reason,
            pool=request.last_pool,
            ttft_s=ttft,
            tpot_s=tpot,
            ttft_ok=ttft_ok,
            tpot_ok=tpot_ok,
            attempts=max(1, request.attempts + 1),
        )
        self._done += 1

    # -- engine steps ---------------------------------------------------------------------------

    def _start_step(self, server: _Server) -> None:
        out = server.sched.schedule()
        requests = server.requests
        for rid in out.preempted:
            requests[rid].computed = 0
            self.kv_preemptions += 1
        if not out.scheduled:
            server.busy = False
            server.pending = None
            return
        speed = server.speed
        if server.upstream:
            for item in out.scheduled:
                r = requests[item.request_id]
                if r.admitted_at is None:
                    r.admitted_at = self.now
        duration, prefill_tokens, decodes = speed.step_s(out.scheduled)
        steps = 1
        total = duration
        context = 0
        sched = server.sched
        if (
            self.settings.macro_steps
            and prefill_tokens == 0
            and not out.released
            and (sched.num_waiting == 0 or sched.num_running >= server.max_num_seqs)
        ):
            steps = self._decode_run(server, out)
            if steps > 1:
                context = sum(item.num_computed_tokens + 1 for item in out.scheduled)
                total = speed.decode_run_s(decodes, context, steps)
                duration = total / steps
        if not server.upstream:
            observe = server.throughput.observe
            for _ in range(min(steps, 32)):  # an EWMA forgets after a few dozen equal samples
                observe(prefill_tokens, decodes, duration)
        server.busy = True
        server.version += 1
        server.pending = _Run(out, self.now, total, steps, decodes if steps > 1 else 0, context)
        self.steps += steps
        self._push(self.now + total, _STEP, server, server.version)

    def _decode_run(self, server: _Server, out: scheduler.SchedulerOutput) -> int:
        """How many pure-decode steps the scheduler would plan exactly like this one."""
        requests = server.requests
        limit = server.speed.max_model_len
        run = math.inf
        for item in out.scheduled:
            r = requests[item.request_id]
            left = min(r.output, r.max_tokens) - r.generated
            run = min(run, left, limit - (r.prompt + r.generated))
        steps = max(1, int(run))
        kv = server.kv
        block = kv.block_size
        free = kv.num_blocks - kv.used_blocks  # type: ignore[operator]
        while steps > 1:
            # Step j reserves num_computed + j tokens; the last one needs the most blocks.
            need = sum(
                -(-(item.num_computed_tokens + steps) // block) - kv.held_blocks(item.request_id)
                for item in out.scheduled
            )
            if need <= free:
                break
            steps //= 2
        return steps

    def _cut_run(self, server: _Server) -> None:
        """A request arrived mid-run: end the run with the step in progress."""
        run = server.pending
        assert run is not None and run.batch > 0
        speed = server.speed
        elapsed = self.now - run.started

        def until(done: int) -> float:  # steps grow by one token of context each
            return speed.decode_run_s(run.batch, run.context, done)

        done = max(1, min(run.steps, math.ceil(elapsed / (run.total / run.steps))))
        while done > 1 and until(done - 1) >= elapsed:
            done -= 1
        while done < run.steps and until(done) < elapsed:
            done += 1
        if done < run.steps:
            self.steps -= run.steps - done
            run.steps = done
            run.total = until(done)
            server.version += 1
            self._push(run.started + run.total, _STEP, server, server.version)

    def _end_step(self, server: _Server) -> None:
        run = server.pending
        assert run is not None
        server.pending = None
        out, steps = run.out, run.steps
        sched = server.sched
        requests = server.requests
        if steps > 1:
            first_step_ends = run.started + server.speed.decode_run_s(run.batch, run.context, 1)
            keep_going = dict.fromkeys((item.request_id for item in out.scheduled), CONTINUE)
            for j in range(steps - 1):
                updates = sched.update(out, keep_going)
                if j == 0:
                    for u in updates:
                        r = requests[u.request_id]
                        if r.attempt_first_at is None:
                            self._first_token(server, r, first_step_ends)
        sampled: dict[str, int] = {}
        for item in out.scheduled:
            if item.sample:
                r = requests[item.request_id]
                sampled[item.request_id] = STOP if r.generated + steps >= r.output else CONTINUE
        finished = []
        for u in sched.update(out, sampled):
            r = requests[u.request_id]
            if r.attempt_first_at is None and u.num_output_tokens > 0:
                self._first_token(server, r, self.now)
            r.generated = u.num_output_tokens
            if u.finished:
                finished.append((r, str(u.finish_reason)))
                if server.upstream and r.generated >= 2:
                    assert r.attempt_first_at is not None
                    gap = (self.now - r.attempt_first_at) / (r.generated - 1)
                    server.throughput.observe(0, 1, gap)
        for item in out.scheduled:
            r = requests.get(item.request_id)
            if r is not None:
                r.computed = item.num_computed_tokens + len(item.token_ids) + (steps - 1)
        for r, reason in finished:
            del requests[r.rid]
            r.server = None
            self._end(r, "completed", f"finished: {reason}", reason)
        instance = server.instance
        if sched.has_unfinished():
            self._start_step(server)
        else:
            server.busy = False
            if instance.state == "draining":
                self._maybe_retire(instance)

    def _first_token(self, server: _Server, r: _Request, at: float) -> None:
        r.attempt_first_at = at
        if r.first_token_at is None:
            r.first_token_at = at
        if server.upstream and r.admitted_at is not None and at > r.admitted_at:
            # As the upstream backend does: prompt tokens over dispatch to first token.
            server.throughput.observe(r.prompt, 0, at - r.admitted_at)

    # -- instances ------------------------------------------------------------------------------

    def _launch(self, pool: _Pool, ready_at: float | None = None) -> _Instance:
        pool.bill(self.now)
        number = next(self._instance_ids)
        if ready_at is None:
            ready_at = self.now + pool.spec.cold_start_s
        instance = _Instance(f"{pool.name}/{number}", pool, self.now, ready_at)
        pool.instances.append(instance)
        if ready_at <= self.now:
            self._ready(instance)
        else:
            self._push(ready_at, _READY, instance)
        return instance

    def _ready(self, instance: _Instance) -> None:
        if instance.state != "booting":
            return  # cancelled or reclaimed while booting
        instance.state = "ready"
        replicas = instance.pool.speed.replicas_per_instance
        for k in range(replicas):
            suffix = f"#{k}" if replicas > 1 else ""
            server = _Server(f"{instance.id}{suffix}", instance, self.settings, self.clock)
            instance.servers.append(server)
            self.servers[server.id] = server

    def _stop(self, instance: _Instance) -> None:
        """The instance is gone: stop billing it and forget its replicas."""
        pool = instance.pool
        pool.bill(self.now)
        pool.instances.remove(instance)
        instance.state = "gone"
        for server in instance.servers:
            server.version += 1  # drops its pending step
            self.servers.pop(server.id, None)

    def _maybe_retire(self, instance: _Instance) -> None:
        if all(not s.requests for s in instance.servers):
            self._stop(instance)

    def _remove(self, pool: _Pool, count: int) -> None:
        """Scale down: cancel boots (newest first), then drain the least busy ready replicas."""
        booting = [i for i in pool.instances if i.state == "booting"]
        for instance in reversed(booting):
            if count == 0:
                return
            self._stop(instance)
            count -= 1
        ready = [i for i in pool.instances if i.state == "ready"]
        ready.sort(key=lambda i: (sum(len(s.requests) for s in i.servers), -i.launched_at))
        for instance in ready[:count]:
            instance.state = "draining"
            self._maybe_retire(instance)

    # -- spot preemption ------------------------------------------------------------------------

    def _spot_instances(self, pool_name: str | None) -> list[_Instance]:
        out = []
        for pool in self.pools.values():
            if not pool.spec.spot or (pool_name is not None and pool.name != pool_name):
                continue
            alive = [i for i in pool.instances if i.reclaim_at is None]
            # Replicas of the on-demand base are not spot capacity.
            out.extend(alive[pool.spec.on_demand_base :])
        return out

    def _draw_preemption(self, now: float) -> None:
        slots = sum(p.spec.max_replicas for p in self.pools.values() if p.spec.spot)
        if slots == 0:
            return
        rate_per_s = self.settings.spot_preemption_rate * slots / 3600.0
        self._push(now + self._rng.expovariate(rate_per_s), _PREEMPT_DRAW)

    def _preempt_random(self) -> None:
        """Thinning: a draw hits one of the spot pools' max_replicas slots uniformly; it
        preempts the instance in that slot if there is one (a Poisson process per instance)."""
        slot = self._rng.randrange(
            sum(p.spec.max_replicas for p in self.pools.values() if p.spec.spot)
        )
        for pool in self.pools.values():
            if not pool.spec.spot:
                continue
            if slot < pool.spec.max_replicas:
                candidates = self._spot_instances(pool.name)
                if slot < len(candidates):
                    self._give_notice(candidates[slot])
                return
            slot -= pool.spec.max_replicas

    def _notice(self, target: object, version: int) -> None:
        if version == -1:  # a listed preemption: one spot instance of the pool (or any)
            candidates = self._spot_instances(target)  # type: ignore[arg-type]
            if not candidates:
                self.notes.append(
                    f"preemption at {self.now:.0f}s found no spot instance"
                    + (f" in pool {target!r}" if target else "")
                )
                return
            self._give_notice(candidates[self._rng.randrange(len(candidates))])

    def _give_notice(self, instance: _Instance) -> None:
        instance.reclaim_at = self.now + self.settings.spot_notice_s
        pool = instance.pool
        if instance.state in ("ready", "booting"):
            # Counted in what the autoscaler asked for until now; a drain already was not.
            pool.requested = max(0, pool.requested - 1)
        instance.state = "draining"  # the agent drains on a spot notice
        pool.lost += 1
        self.spot_preemptions += 1
        self._push(instance.reclaim_at, _RECLAIM, instance)

    def _reclaim(self, instance: _Instance) -> None:
        if instance.state == "gone":
            return
        leftovers = [r for s in instance.servers for r in s.requests.values()]
        self._stop(instance)
        for request in sorted(leftovers, key=lambda r: r.index):
            request.server = None
            request.attempts += 1
            self.retries += 1
            if request.attempts >= self.settings.max_attempts:
                self._end(
                    request,
                    "failed",
                    f"spot preemption: its instance was reclaimed {request.attempts} time(s)",
                )
            else:
                self._dispatch(request)

    # -- autoscaling ----------------------------------------------------------------------------

    def _tick(self) -> None:
        spec = self.spec
        period = spec.autoscaling.period_s
        if spec.autoscaling.enabled:
            plan = self.autoscaler.plan(self._signals(period))
            self.plans += 1
            for name, decision in plan.decisions.items():
                pool = self.pools[name]
                if decision.desired > pool.requested:
                    for _ in range(decision.desired - pool.requested):
                        self._launch(pool)
                elif decision.desired < pool.requested:
                    self._remove(pool, pool.requested - decision.desired)
                pool.requested = decision.desired
        for pool in self.pools.values():
            pool.lost = 0
        self._arrivals.clear()
        self._period_tenants.clear()
        self._period_service.clear()
        self._period_slo.clear()
        self._sample(self.now)

    def _signals(self, period: float) -> autoscale.FleetSignals:
        pools: dict[str, autoscale.PoolSignals] = {}
        in_flight: Counter[str] = Counter()
        by_class: dict[str, Counter[str]] = {}
        tenants: dict[str, set[str]] = {}
        queued_by_model: Counter[str] = Counter()
        for pool in self.pools.values():
            queued = 0
            model = pool.spec.serves.model
            for instance in pool.instances:
                for server in instance.servers:
                    waiting = server.sched.num_waiting
                    queued += waiting
                    in_flight[model] += len(server.requests)
                    classes = by_class.setdefault(model, Counter())
                    active = tenants.setdefault(model, set())
                    for r in server.requests.values():
                        classes[r.cls.name] += 1
                        active.add(r.tenant)
            queued_by_model[model] += queued
            pools[pool.name] = autoscale.PoolSignals(
                requested=pool.requested,
                ready=sum(1 for i in pool.instances if i.state == "ready"),
                lost=pool.lost,
                queued=queued,
            )
        models: dict[str, autoscale.ModelSignals] = {}
        for model in {p.spec.serves.model for p in self.pools.values()}:
            service = self._period_service.get(model)
            slo = self._period_slo.get(model)
            models[model] = autoscale.ModelSignals(
                in_flight=float(in_flight[model]),
                by_class={c: float(n) for c, n in by_class.get(model, Counter()).items()},
                tenants=frozenset(
                    tenants.get(model, set()) | self._period_tenants.get(model, set())
                ),
                arrivals_per_s=self._arrivals[model] / period,
                mean_service_s=sum(service) / len(service) if service else None,
                slo_attainment=sum(slo) / len(slo) if slo else None,
                queued=queued_by_model[model],
            )
        left = None
        if self.spec.budget is not None:
            spent = sum(p.cost_usd for p in self.pools.values())
            hours_left = max(1.0, HOURS_PER_MONTH - self.now / 3600.0)
            # The replay starts a month: what is left of the budget, spread over what is left.
            left = max(0.0, self.spec.budget.usd_per_month - spent) / hours_left
        return autoscale.FleetSignals(
            now=self.now, pools=pools, models=models, fleet_usd_per_hour_left=left
        )

    def _sample(self, now: float) -> None:
        for pool in self.pools.values():
            pool.bill(now)
        self.timeline.append(
            {
                "t": now,
                "replicas": {p.name: len(p.instances) for p in self.pools.values()},
                "ready": {
                    p.name: sum(1 for i in p.instances if i.state == "ready")
                    for p in self.pools.values()
                },
                "cost_usd": sum(p.cost_usd for p in self.pools.values()),
                "usd_per_hour": sum(
                    pool_hourly_usd(p.spec, p.record, len(p.instances)) for p in self.pools.values()
                ),
            }
        )
