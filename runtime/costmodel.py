"""Performance and cost model: does a model variant fit an instance, how fast does it serve
there, what does a token cost, and which options form the cost/latency Pareto frontier.

The model is a roofline. A decode step reads the weights once plus every running sequence's KV
cache and does about 2 x parameters FLOPs per sequence; it takes the longer of its memory time
and its compute time at the hardware's *effective* bandwidth and FLOPS (datasheet peaks times an
efficiency). Prefill is compute-bound over the prompt. From step times follow TTFT, time per
output token (TPOT, including the stall that other requests' prefills cause) and, for a stated
workload and SLO, the largest batch that still meets the SLO and the throughput it gives.

CPUs have no datasheet peak in the catalog, so `CpuAssumption` states bandwidth and FLOPS per
vCPU; `CpuAssumption.from_measurement` is the calibration hook that replaces the assumption with
figures the embedded engine measured on a real machine.

Everything here is pure: it takes spec objects and catalog records and returns numbers. Spec
objects are only read by attribute, so this module does not import the spec (the spec imports it
for its fit check).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from runtime.catalog import InstanceRecord

if TYPE_CHECKING:
    from runtime.spec import ModelSpec, VariantSpec

GIB = 1024**3

# Environment variable naming a JSON file written by `CpuAssumption.save` (e.g. after
# `fleetform bench engine --calibrate`); when set, the default model uses it.
CPU_CALIBRATION_ENV = "FLEETFORM_CPU_CALIBRATION"


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Fractions of datasheet peak that serving engines sustain.

    Memory-bandwidth utilisation (MBU) of 0.6-0.8 and model FLOPS utilisation (MFU) of about
    0.5 are what published serving measurements of vLLM/TensorRT-LLM report on NVIDIA parts;
    Neuron and TPU serving stacks are less mature for decode, hence the lower defaults.
    """

    bandwidth: float
    compute: float
    step_overhead_s: float  # fixed per-step cost: kernel launches, scheduling, sampling
    tensor_parallel: float = 0.9  # per doubling of the tensor-parallel degree (collectives)


DEFAULT_EFFICIENCY: dict[str, Efficiency] = {
    "gpu": Efficiency(bandwidth=0.75, compute=0.5, step_overhead_s=0.002),
    "npu": Efficiency(bandwidth=0.6, compute=0.4, step_overhead_s=0.003),
    # CPU figures in CpuAssumption are already effective (measured or assumed as sustained).
    "cpu": Efficiency(bandwidth=1.0, compute=1.0, step_overhead_s=0.001, tensor_parallel=1.0),
}


@dataclass(frozen=True, slots=True)
class CpuAssumption:
    """Sustained memory bandwidth and matmul FLOPS per vCPU for CPU instances.

    The defaults are stated assumptions for current server cores running a float32 BLAS
    engine (about 4 GB/s of DRAM bandwidth and 40 GFLOPS per vCPU), not measurements. Replace
    them with `from_measurement` on the machine that serves.
    """

    bandwidth_gbps_per_vcpu: float = 4.0
    gflops_per_vcpu: float = 40.0
    source: str = "assumption"

    @classmethod
    def from_measurement(
        cls,
        *,
        vcpus: float,
        decode_tokens_per_s: float,
        bytes_per_decode_step: float,
        prefill_tokens_per_s: float,
        flops_per_token: float,
        source: str = "measured",
    ) -> CpuAssumption:
        """Derive per-vCPU figures from an engine benchmark.

        `decode_tokens_per_s` is single-stream decode speed, which is bandwidth-bound: each
        step reads `bytes_per_decode_step` (weights plus that stream's KV). Prefill of a long
        prompt is compute-bound at `flops_per_token` each.
        """
        if min(vcpus, decode_tokens_per_s, bytes_per_decode_step, prefill_tokens_per_s) <= 0:
            raise ValueError("calibration figures must all be positive")
        bandwidth = decode_tokens_per_s * bytes_per_decode_step / vcpus / 1e9
        gflops = prefill_tokens_per_s * flops_per_token / vcpus / 1e9
        return cls(bandwidth_gbps_per_vcpu=bandwidth, gflops_per_vcpu=gflops, source=source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CpuAssumption:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            bandwidth_gbps_per_vcpu=float(data["bandwidth_gbps_per_vcpu"]),
            gflops_per_vcpu=float(data["gflops_per_vcpu"]),
            source=str(data.get("source", str(path))),
        )


@dataclass(frozen=True, slots=True)
class PerformanceModel:
    """The tunable assumptions of the roofline, in one place."""

    cpu: CpuAssumption = field(default_factory=CpuAssumption)
    efficiency: dict[str, Efficiency] = field(default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    usable_memory_fraction: float = 0.9  # runtime, activations and fragmentation take the rest
    cpu_host_memory_fraction: float = 0.8  # the OS and the agent need some of the host's RAM
    max_batch: int = 256

    @classmethod
    def default(cls) -> PerformanceModel:
        """The default model, calibrated for CPUs if `FLEETFORM_CPU_CALIBRATION` names a file."""
        path = os.environ.get(CPU_CALIBRATION_ENV)
        return cls(cpu=CpuAssumption.load(path)) if path else cls()


# --------------------------------------------------------------------------------------------
# Hardware as the roofline sees it


@dataclass(frozen=True, slots=True)
class Hardware:
    """One instance's serving hardware: `devices` identical devices with effective figures."""

    kind: str
    name: str
    devices: int
    memory_bytes: float  # usable, per device
    bandwidth: float  # effective bytes/s, per device
    flops: float  # effective FLOP/s, per device
    efficiency: Efficiency
    kv_bytes_per_value: float  # 2 for 16-bit KV caches on accelerators, 4 for a float32 CPU engine


def hardware_for(record: InstanceRecord, perf: PerformanceModel) -> Hardware | None:
    """The roofline view of an instance, or None if the catalog lacks the accelerator's specs."""
    eff = perf.efficiency[record.accelerator_kind]
    if record.accelerator_kind == "cpu":
        if not record.vcpus or not record.memory_gib:
            return None
        return Hardware(
            kind="cpu",
            name=f"{record.vcpus:g} vCPU",
            devices=1,
            memory_bytes=record.memory_gib * GIB * perf.cpu_host_memory_fraction,
            bandwidth=record.vcpus * perf.cpu.bandwidth_gbps_per_vcpu * 1e9,
            flops=record.vcpus * perf.cpu.gflops_per_vcpu * 1e9,
            efficiency=eff,
            kv_bytes_per_value=4.0,
        )
    spec = record.accelerator
    if spec is None or record.accelerator_count <= 0:
        return None
    # A fractional GPU (Azure NV A10 v5, AWS g6f) is one device with that share of the part.
    share = min(record.accelerator_count, 1.0)
    devices = max(1, int(record.accelerator_count))
    return Hardware(
        kind=record.accelerator_kind,
        name=f"{record.accelerator_count:g}x {record.accelerator_name}",
        devices=devices,
        memory_bytes=spec.memory_gb * 1e9 * share * perf.usable_memory_fraction,
        bandwidth=spec.memory_bandwidth_gbps * 1e9 * share * eff.bandwidth,
        flops=spec.peak_tflops * 1e12 * share * eff.compute,
        efficiency=eff,
        kv_bytes_per_value=2.0,
    )


# --------------------------------------------------------------------------------------------
# Fit


@dataclass(frozen=True, slots=True)
class Fit:
    """Whether a variant fits, and how it is laid out on the instance's devices."""

    fits: bool
    reason: str
    tensor_parallel: int = 0  # devices one model replica spans
    replicas_per_instance: int = 0  # independent model replicas on one instance
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    memory_bytes: float = 0.0  # usable memory of the devices one replica spans


class _ModelShape(Protocol):
    name: str
    layers: int
    hidden_size: int
    context_length: int

    @property
    def parameters(self) -> float: ...

    def kv_bytes_per_token(self, kv_bytes_per_value: float = 2.0) -> float: ...

    def weight_bytes(self, variant: VariantSpec) -> float: ...


def fit(
    model: ModelSpec | _ModelShape,
    variant: VariantSpec,
    record: InstanceRecord,
    *,
    context_tokens: int,
    batch: int = 1,
    perf: PerformanceModel | None = None,
) -> Fit:
    """Does `variant` fit on `record` with `batch` sequences of `context_tokens` each?

    One replica spans the smallest power-of-two number of devices whose memory holds the
    weights plus the KV cache; the instance runs as many such replicas as it has devices for.
    """
    perf = perf or PerformanceModel.default()
    hw = hardware_for(record, perf)
    weights = model.weight_bytes(variant)
    if hw is None:
        return Fit(
            False, f"no hardware figures for {record.accelerator_name or record.instance_type}"
        )
    kv = batch * context_tokens * model.kv_bytes_per_token(hw.kv_bytes_per_value)
    need = weights + kv
    tp = 1
    while tp <= hw.devices:
        if need <= tp * hw.memory_bytes:
            return Fit(
                True,
                "fits",
                tensor_parallel=tp,
                replicas_per_instance=hw.devices // tp,
                weight_bytes=weights,
                kv_bytes=kv,
                memory_bytes=tp * hw.memory_bytes,
            )
        tp *= 2
    have = hw.devices * hw.memory_bytes
    return Fit(
        False,
        f"needs {need / 1e9:.1f} GB (weights {weights / 1e9:.1f} GB + KV {kv / 1e9:.1f} GB for "
        f"{batch} x {context_tokens} tokens), {hw.name} has {have / 1e9:.1f} GB usable",
        weight_bytes=weights,
        kv_bytes=kv,
        memory_bytes=have,
    )


# --------------------------------------------------------------------------------------------
# Speed


@dataclass(frozen=True, slots=True)
class Workload:
    """Mean request shape. Defaults: medians of the Azure 2023 conversation trace."""

    prompt_tokens: float = 1020.0
    output_tokens: float = 129.0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError("prompt_tokens and output_tokens must be at least 1")


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Serving one model replica at `batch` concurrent sequences."""

    batch: int
    output_tokens_per_s: float  # per model replica
    ttft_s: float
    tpot_s: float
    decode_step_s: float
    prefill_s: float


class ReplicaPerformance:
    """Roofline timings for one model replica of a variant on an instance."""

    def __init__(
        self, model: ModelSpec | _ModelShape, variant: VariantSpec, hw: Hardware, tp: int
    ) -> None:
        self.model = model
        self.hw = hw
        self.tp = tp
        scale = tp * hw.efficiency.tensor_parallel ** math.log2(tp) if tp > 1 else 1.0
        self.bandwidth = hw.bandwidth * scale
        self.flops = hw.flops * scale
        self.weight_bytes = model.weight_bytes(variant)
        self.kv_per_token = model.kv_bytes_per_token(hw.kv_bytes_per_value)
        self.memory_bytes = tp * hw.memory_bytes
        self.overhead = hw.efficiency.step_overhead_s

    def _dense_flops_per_token(self) -> float:
        return 2.0 * self.model.parameters

    def decode_step_s(self, batch: int, context: float) -> float:
        """One decode step for `batch` sequences whose mean context is `context` tokens."""
        bytes_moved = self.weight_bytes + batch * context * self.kv_per_token
        attention = 4.0 * self.model.layers * context * self.model.hidden_size
        flops = batch * (self._dense_flops_per_token() + attention)
        return max(bytes_moved / self.bandwidth, flops / self.flops) + self.overhead

    def prefill_s(self, prompt_tokens: float) -> float:
        """Prefill of one prompt (causal attention over the prompt included)."""
        attention = 2.0 * self.model.layers * prompt_tokens**2 * self.model.hidden_size
        flops = prompt_tokens * self._dense_flops_per_token() + attention
        return max(flops / self.flops, self.weight_bytes / self.bandwidth) + self.overhead

    def max_batch_for_memory(self, context: float, cap: int) -> int:
        free = self.memory_bytes - self.weight_bytes
        if free <= 0:
            return 0
        return max(0, min(cap, int(free // (context * self.kv_per_token))))

    def at_batch(self, batch: int, workload: Workload) -> OperatingPoint:
        """Steady state with `batch` sequences running and new ones replacing finished ones.

        Each finished request is replaced by a new one whose prefill runs between decode steps,
        so a replica spends, per request, its prefill plus `output / batch` decode steps.
        TPOT includes the stall the other requests' prefills cause; TTFT is the prompt's prefill
        plus the decode step already running when it arrives.
        """
        mean_context = workload.prompt_tokens + workload.output_tokens / 2
        step = self.decode_step_s(batch, mean_context)
        prefill = self.prefill_s(workload.prompt_tokens)
        out = workload.output_tokens
        tokens_per_s = batch * out / (batch * prefill + out * step)
        tpot = step + (batch - 1) * prefill / out if batch > 1 else step
        return OperatingPoint(
            batch=batch,
            output_tokens_per_s=tokens_per_s,
            ttft_s=prefill + step,
            tpot_s=tpot,
            decode_step_s=step,
            prefill_s=prefill,
        )

    def best_within(self, workload: Workload, slo: Slo, max_batch: int) -> OperatingPoint | None:
        """The highest-throughput batch size whose TTFT and TPOT meet `slo`, or None.

        Throughput, TTFT and TPOT all grow with the batch, so the answer is the largest feasible
        batch: found by bisection.
        """
        context = workload.prompt_tokens + workload.output_tokens
        limit = self.max_batch_for_memory(context, max_batch)

        def ok(batch: int) -> bool:
            point = self.at_batch(batch, workload)
            return point.ttft_s <= slo.ttft_s and point.tpot_s <= slo.tpot_s

        if limit < 1 or not ok(1):
            return None
        low, high = 1, limit
        while low < high:
            mid = (low + high + 1) // 2
            if ok(mid):
                low = mid
            else:
                high = mid - 1
        return self.at_batch(low, workload)


# --------------------------------------------------------------------------------------------
# Options and the Pareto frontier


@dataclass(frozen=True, slots=True)
class Option:
    """One way to serve a model variant: an instance in a region, spot or on-demand."""

    cloud: str
    region: str
    instance_type: str
    accelerator: str
    kind: str
    spot: bool
    model: str
    variant: str
    quality: str
    usd_per_hour: float
    output_tokens_per_s: float  # whole instance at the SLO-bound operating point
    usd_per_million_output_tokens: float
    ttft_s: float
    tpot_s: float
    latency_s: float  # mean end-to-end for the workload
    headroom: float  # SLO / unloaded latency (batch 1), the tighter of TTFT and TPOT
    batch: int
    tensor_parallel: int
    replicas_per_instance: int
    instances: int | None = None  # for a stated request rate
    fleet_usd_per_hour: float | None = None
    pareto: bool = False


def evaluate(
    model: ModelSpec | _ModelShape,
    variant: VariantSpec,
    record: InstanceRecord,
    *,
    workload: Workload,
    slo: Slo,
    spot: bool,
    perf: PerformanceModel | None = None,
    rate_rps: float | None = None,
    planning_margin: float = 1.0,
) -> Option | None:
    """Serve `variant` on `record` within `slo`: the option, or None if infeasible or unpriced.

    The operating point is the busiest one whose latencies stay within `planning_margin` x the
    SLO (a margin for prediction error); `headroom` says how far the unloaded instance is
    below the SLO, i.e. how much stricter an objective it could still meet.
    """
    perf = perf or PerformanceModel.default()
    price = record.spot_usd_per_hour if spot else record.on_demand_usd_per_hour
    if price is None or record.accelerator_kind not in variant.runs_on:
        return None
    context = int(workload.prompt_tokens + workload.output_tokens)
    placement = fit(model, variant, record, context_tokens=context, batch=1, perf=perf)
    if not placement.fits:
        return None
    hw = hardware_for(record, perf)
    assert hw is not None  # fit() returned True, so the hardware is known
    replica = ReplicaPerformance(model, variant, hw, placement.tensor_parallel)
    target = Slo(ttft_s=slo.ttft_s * planning_margin, tpot_s=slo.tpot_s * planning_margin)
    point = replica.best_within(workload, target, perf.max_batch)
    if point is None:
        return None
    unloaded = replica.at_batch(1, workload)
    tokens_per_s = point.output_tokens_per_s * placement.replicas_per_instance
    usd_per_mtok = price / (tokens_per_s * 3600.0) * 1e6
    instances = fleet_cost = None
    if rate_rps is not None:
        instances = max(1, math.ceil(rate_rps * workload.output_tokens / tokens_per_s))
        fleet_cost = instances * price
    return Option(
        cloud=record.cloud,
        region=record.region,
        instance_type=record.instance_type,
        accelerator=(
            f"{record.accelerator_count:g}x {record.accelerator_name}"
            if record.accelerator_name
            else f"{record.vcpus:g} vCPU"
        ),
        kind=record.accelerator_kind,
        spot=spot,
        model=model.name,
        variant=variant.name,
        quality=variant.quality,
        usd_per_hour=price,
        output_tokens_per_s=tokens_per_s,
        usd_per_million_output_tokens=usd_per_mtok,
        ttft_s=point.ttft_s,
        tpot_s=point.tpot_s,
        latency_s=point.ttft_s + workload.output_tokens * point.tpot_s,
        headroom=min(slo.ttft_s / unloaded.ttft_s, slo.tpot_s / unloaded.tpot_s),
        batch=point.batch,
        tensor_parallel=placement.tensor_parallel,
        replicas_per_instance=placement.replicas_per_instance,
        instances=instances,
        fleet_usd_per_hour=fleet_cost,
    )


def enumerate_options(
    model: ModelSpec | _ModelShape,
    variants: Sequence[VariantSpec],
    records: Iterable[InstanceRecord],
    *,
    workload: Workload,
    slo: Slo,
    perf: PerformanceModel | None = None,
    rate_rps: float | None = None,
    planning_margin: float = 1.0,
    markets: Sequence[bool] = (False, True),
) -> list[Option]:
    """Every feasible (instance, market, variant) option, Pareto-marked, cheapest first.

    `markets` lists the spot flags to consider: `(False,)` for on-demand only.
    """
    perf = perf or PerformanceModel.default()
    options: list[Option] = []
    for record in records:
        for variant in variants:
            for spot in markets:
                option = evaluate(
                    model,
                    variant,
                    record,
                    workload=workload,
                    slo=slo,
                    spot=spot,
                    perf=perf,
                    rate_rps=rate_rps,
                    planning_margin=planning_margin,
                )
                if option is not None:
                    options.append(option)
    marked = mark_pareto(options)
    return sorted(marked, key=lambda o: (o.usd_per_million_output_tokens, o.latency_s))


def mark_pareto(options: Sequence[Option]) -> list[Option]:
    """Mark the options no other option beats on both USD per token and latency."""
    order = sorted(
        range(len(options)),
        key=lambda i: (options[i].usd_per_million_output_tokens, options[i].latency_s),
    )
    frontier: set[int] = set()
    best_latency = math.inf
    for i in order:
        # Sorted by cost, an option is on the frontier iff it is faster than all cheaper ones.
        if options[i].latency_s < best_latency:
            frontier.add(i)
            best_latency = options[i].latency_s
    return [replace(o, pareto=i in frontier) for i, o in enumerate(options)]
