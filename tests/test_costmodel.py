"""The roofline cost model: fit, speed, monotonicity, prices and the Pareto frontier.

Most tests use fabricated catalog records so that expected values follow from the stated
hardware alone; the spot/on-demand tests sweep the real catalog.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.catalog import AcceleratorSpec, InstanceRecord, default_catalog
from runtime.costmodel import (
    CPU_CALIBRATION_ENV,
    CpuAssumption,
    Option,
    PerformanceModel,
    ReplicaPerformance,
    Slo,
    Workload,
    evaluate,
    fit,
    hardware_for,
    mark_pareto,
)
from runtime.spec import ModelSpec, VariantSpec

LLAMA_8B = ModelSpec(
    name="llama-8b",
    parameters_b=8.0,
    layers=32,
    hidden_size=4096,
    kv_heads=8,
    head_dim=128,
    context_length=8192,
    variants=[
        VariantSpec(name="bf16", precision="bf16"),
        VariantSpec(name="int4", precision="int4", quality="standard"),
    ],
)
LLAMA_70B = ModelSpec(
    name="llama-70b",
    parameters_b=70.0,
    layers=80,
    hidden_size=8192,
    kv_heads=8,
    head_dim=128,
    context_length=8192,
    variants=[VariantSpec(name="bf16", precision="bf16")],
)
BF16_8B = LLAMA_8B.variants[0]
BF16_70B = LLAMA_70B.variants[0]


def gpu(
    *,
    count: float = 1,
    memory_gb: float = 24.0,
    bandwidth: float = 600.0,
    tflops: float = 125.0,
    on_demand: float | None = 1.0,
    spot: float | None = 0.4,
) -> InstanceRecord:
    spec = AcceleratorSpec(
        name="TESTGPU",
        variant="test part",
        kind="gpu",
        memory_gb=memory_gb,
        memory_bandwidth_gbps=bandwidth,
        peak_tflops=tflops,
        source="test",
    )
    return InstanceRecord(
        cloud="aws",
        region="test-1",
        instance_type=f"test.{count:g}x",
        accelerator_name="TESTGPU",
        accelerator_kind="gpu",
        accelerator_count=count,
        accelerator=spec,
        vcpus=8,
        memory_gib=64,
        on_demand_usd_per_hour=on_demand,
        spot_usd_per_hour=spot,
        spot_min_usd_per_hour=spot,
        zones=("test-1a",),
    )


def cpu(vcpus: float = 32, memory_gib: float = 128) -> InstanceRecord:
    return InstanceRecord(
        cloud="aws",
        region="test-1",
        instance_type="cpu.test",
        accelerator_name=None,
        accelerator_kind="cpu",
        accelerator_count=0,
        accelerator=None,
        vcpus=vcpus,
        memory_gib=memory_gib,
        on_demand_usd_per_hour=1.0,
        spot_usd_per_hour=0.5,
        spot_min_usd_per_hour=0.5,
        zones=(),
    )


PERF = PerformanceModel()  # the stated defaults, whatever the environment says


# --------------------------------------------------------------------------------------------
# Fit


def test_8b_bf16_fits_one_24gb_gpu_and_reports_its_layout() -> None:
    result = fit(LLAMA_8B, BF16_8B, gpu(), context_tokens=4096, batch=1, perf=PERF)
    assert result.fits
    assert result.tensor_parallel == 1
    assert result.replicas_per_instance == 1
    assert result.weight_bytes == pytest.approx(16e9)
    # 2 (K and V) x 32 layers x 8 heads x 128 dims x 2 bytes x 4096 tokens
    assert result.kv_bytes == pytest.approx(2 * 32 * 8 * 128 * 2 * 4096)


def test_70b_bf16_does_not_fit_a_24gb_gpu_and_says_how_much_it_needs() -> None:
    result = fit(LLAMA_70B, BF16_70B, gpu(), context_tokens=4096, batch=1, perf=PERF)
    assert not result.fits
    # 140 GB of weights + 1.3 GB of KV against 24 GB x 0.9 usable.
    assert "needs 141.3 GB" in result.reason
    assert "has 21.6 GB usable" in result.reason


def test_tensor_parallel_degree_is_the_smallest_power_of_two_that_holds_the_model() -> None:
    # 8 x 40 GB parts, 36 GB usable each: 141.3 GB needs 4 devices, so 2 replicas fit.
    result = fit(
        LLAMA_70B, BF16_70B, gpu(count=8, memory_gb=40), context_tokens=4096, batch=1, perf=PERF
    )
    assert result.fits
    assert (result.tensor_parallel, result.replicas_per_instance) == (4, 2)


def test_batch_and_context_count_against_memory() -> None:
    record = gpu()  # 21.6 GB usable, 16 GB of weights: room for ~5.6 GB of KV
    per_seq = 2 * 32 * 8 * 128 * 2 * 4096  # 0.54 GB per 4k-token sequence
    fits_at = int((21.6e9 - 16e9) // per_seq)
    assert fit(LLAMA_8B, BF16_8B, record, context_tokens=4096, batch=fits_at, perf=PERF).fits
    assert not fit(
        LLAMA_8B, BF16_8B, record, context_tokens=4096, batch=fits_at + 1, perf=PERF
    ).fits


def test_fractional_gpu_gets_its_share_of_memory() -> None:
    sixth = gpu(count=0.167)  # an Azure NV6ads A10 v5: a sixth of a 24 GB part
    assert not fit(LLAMA_8B, BF16_8B, sixth, context_tokens=1024, perf=PERF).fits
    int4 = LLAMA_8B.variants[1]
    half = gpu(count=0.5)
    assert fit(LLAMA_8B, int4, half, context_tokens=1024, perf=PERF).fits


def test_unknown_accelerator_cannot_be_judged() -> None:
    record = replace(gpu(), accelerator=None, accelerator_name="MI25")
    result = fit(LLAMA_8B, BF16_8B, record, context_tokens=1024, perf=PERF)
    assert not result.fits
    assert result.reason == "no hardware figures for MI25"


# --------------------------------------------------------------------------------------------
# Speed


def replica(
    record: InstanceRecord, model: ModelSpec = LLAMA_8B, perf: PerformanceModel = PERF
) -> ReplicaPerformance:
    hw = hardware_for(record, perf)
    assert hw is not None
    return ReplicaPerformance(model, model.variants[0], hw, 1)


def test_single_stream_decode_is_bandwidth_bound() -> None:
    r = replica(gpu(bandwidth=600.0))
    # 16 GB of weights + 1k tokens of KV at 600 GB/s x 0.75 MBU, plus the 2 ms step overhead.
    kv = 1024 * 2 * 32 * 8 * 128 * 2
    expected = (16e9 + kv) / (600e9 * 0.75) + 0.002
    assert r.decode_step_s(1, 1024) == pytest.approx(expected, rel=1e-9)


def test_large_batch_decode_becomes_compute_bound() -> None:
    r = replica(gpu(bandwidth=600.0, tflops=10.0))  # a slow part so compute dominates
    step = r.decode_step_s(256, 16)
    flops = 256 * (2 * 8e9 + 4 * 32 * 16 * 4096)
    assert step == pytest.approx(flops / (10e12 * 0.5) + 0.002, rel=1e-9)


def test_best_operating_point_is_the_largest_batch_within_the_slo() -> None:
    r = replica(gpu())
    workload = Workload(prompt_tokens=512, output_tokens=128)
    slo = Slo(ttft_s=1.0, tpot_s=0.05)
    point = r.best_within(workload, slo, max_batch=256)
    assert point is not None
    assert point.ttft_s <= slo.ttft_s and point.tpot_s <= slo.tpot_s
    over = r.at_batch(point.batch + 1, workload)
    memory_limit = r.max_batch_for_memory(640, 256)
    assert point.batch == memory_limit or over.tpot_s > slo.tpot_s or over.ttft_s > slo.ttft_s


def test_an_unmeetable_slo_gives_no_operating_point() -> None:
    r = replica(gpu())
    assert r.best_within(Workload(), Slo(ttft_s=1.0, tpot_s=0.001), max_batch=256) is None


hardware = st.fixed_dictionaries(
    {
        "bandwidth": st.floats(50, 8000),
        "tflops": st.floats(5, 2500),
        "memory_gb": st.floats(20, 200),
    }
)


@pytest.mark.parametrize("resource", ["bandwidth", "tflops"])
@settings(max_examples=60, deadline=None)
@given(
    hw=hardware,
    factor=st.floats(1.0, 10.0),
    batch=st.integers(1, 256),
    context=st.integers(1, 8192),
)
def test_more_bandwidth_or_compute_is_never_slower(
    resource: str, hw: dict[str, float], factor: float, batch: int, context: int
) -> None:
    slow_record = gpu(**hw)
    fast_record = gpu(**{**hw, resource: hw[resource] * factor})
    slow, fast = replica(slow_record), replica(fast_record)
    assert fast.decode_step_s(batch, context) <= slow.decode_step_s(batch, context)
    assert fast.prefill_s(context) <= slow.prefill_s(context)
    workload, slo = Workload(), Slo(ttft_s=2.0, tpot_s=0.1)
    slow_option, fast_option = (
        evaluate(LLAMA_8B, BF16_8B, record, workload=workload, slo=slo, spot=False, perf=PERF)
        for record in (slow_record, fast_record)
    )
    if slow_option is not None:
        assert fast_option is not None
        assert fast_option.output_tokens_per_s >= slow_option.output_tokens_per_s * (1 - 1e-9)
        assert (
            fast_option.usd_per_million_output_tokens
            <= slow_option.usd_per_million_output_tokens * (1 + 1e-9)
        )


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 255), context=st.integers(16, 4096))
def test_step_time_grows_with_batch_and_throughput_with_it(batch: int, context: int) -> None:
    r = replica(gpu(memory_gb=80, bandwidth=2000, tflops=300))
    assert r.decode_step_s(batch + 1, context) >= r.decode_step_s(batch, context)
    w = Workload(prompt_tokens=context, output_tokens=64)
    assert r.at_batch(batch + 1, w).output_tokens_per_s >= r.at_batch(batch, w).output_tokens_per_s


def test_cpu_speed_scales_with_vcpus_and_the_assumption() -> None:
    small, large = hardware_for(cpu(vcpus=8), PERF), hardware_for(cpu(vcpus=32), PERF)
    assert small is not None and large is not None
    assert large.bandwidth == pytest.approx(4 * small.bandwidth)
    assert small.bandwidth == pytest.approx(8 * 4.0e9)  # the stated 4 GB/s per vCPU
    faster = PerformanceModel(cpu=CpuAssumption(bandwidth_gbps_per_vcpu=8.0, gflops_per_vcpu=80.0))
    calibrated = hardware_for(cpu(vcpus=8), faster)
    assert calibrated is not None and calibrated.bandwidth == pytest.approx(2 * small.bandwidth)


# --------------------------------------------------------------------------------------------
# Calibration hook


def test_calibration_from_a_measurement_reproduces_the_measured_decode_speed(
    tmp_path, monkeypatch
) -> None:
    smol = ModelSpec(
        name="smol",
        parameters_b=0.135,
        layers=30,
        hidden_size=576,
        kv_heads=3,
        head_dim=64,
        context_length=2048,
        variants=[VariantSpec(name="f32", precision="fp32", weight_bytes=540_000_000)],
    )
    measured = CpuAssumption.from_measurement(
        vcpus=2,
        decode_tokens_per_s=40.0,
        bytes_per_decode_step=540e6,
        prefill_tokens_per_s=900.0,
        flops_per_token=2 * 0.135e9,
    )
    assert measured.bandwidth_gbps_per_vcpu == pytest.approx(40 * 540e6 / 2 / 1e9)
    assert measured.gflops_per_vcpu == pytest.approx(900 * 0.27e9 / 2 / 1e9)
    model = PerformanceModel(cpu=measured)
    hw = hardware_for(cpu(vcpus=2, memory_gib=16), model)
    assert hw is not None
    r = ReplicaPerformance(smol, smol.variants[0], hw, 1)
    # Decode of one stream with a tiny context: weights dominate, so ~1/40 s plus overhead.
    assert r.decode_step_s(1, 1) == pytest.approx(1 / 40 + 0.001, rel=1e-3)

    path = tmp_path / "cpu.json"
    measured.save(path)
    assert CpuAssumption.load(path) == measured
    monkeypatch.setenv(CPU_CALIBRATION_ENV, str(path))
    assert PerformanceModel.default().cpu == measured
    monkeypatch.delenv(CPU_CALIBRATION_ENV)
    assert PerformanceModel.default().cpu == CpuAssumption()


def test_calibration_rejects_non_positive_figures() -> None:
    with pytest.raises(ValueError, match="must all be positive"):
        CpuAssumption.from_measurement(
            vcpus=2,
            decode_tokens_per_s=0,
            bytes_per_decode_step=1,
            prefill_tokens_per_s=1,
            flops_per_token=1,
        )


# --------------------------------------------------------------------------------------------
# Prices


def test_usd_per_million_tokens_is_price_over_throughput() -> None:
    option = evaluate(
        LLAMA_8B,
        BF16_8B,
        gpu(on_demand=3.6),
        workload=Workload(),
        slo=Slo(2.0, 0.1),
        spot=False,
        perf=PERF,
    )
    assert option is not None
    assert option.usd_per_million_output_tokens == pytest.approx(
        3.6 / (option.output_tokens_per_s * 3600) * 1e6
    )


def test_missing_price_means_no_option() -> None:
    assert (
        evaluate(
            LLAMA_8B,
            BF16_8B,
            gpu(on_demand=None),
            workload=Workload(),
            slo=Slo(2, 0.1),
            spot=False,
            perf=PERF,
        )
        is None
    )
    assert (
        evaluate(
            LLAMA_8B,
            BF16_8B,
            gpu(spot=None),
            workload=Workload(),
            slo=Slo(2, 0.1),
            spot=True,
            perf=PERF,
        )
        is None
    )


def test_variant_only_runs_where_it_may() -> None:
    gpu_only = VariantSpec(name="bf16", precision="bf16", runs_on=["gpu"])
    assert (
        evaluate(
            LLAMA_8B, gpu_only, cpu(), workload=Workload(), slo=Slo(60, 1), spot=False, perf=PERF
        )
        is None
    )


def test_rate_sizing_rounds_instances_up() -> None:
    option = evaluate(
        LLAMA_8B,
        BF16_8B,
        gpu(),
        workload=Workload(),
        slo=Slo(2.0, 0.1),
        spot=False,
        perf=PERF,
        rate_rps=10.0,
    )
    assert option is not None and option.instances is not None
    needed = 10.0 * Workload().output_tokens / option.output_tokens_per_s
    assert option.instances == math.ceil(needed)
    assert option.fleet_usd_per_hour == pytest.approx(option.instances * option.usd_per_hour)


def test_spot_is_never_dearer_than_on_demand_where_the_catalog_says_so() -> None:
    """Across the real catalog: the model preserves the catalog's price order per option."""
    catalog = default_catalog()
    workload, slo = Workload(), Slo(ttft_s=2.5, tpot_s=0.1)
    checked = cheaper = dearer = 0
    for record in catalog.records():
        if record.on_demand_usd_per_hour is None or record.spot_usd_per_hour is None:
            continue
        on_demand = evaluate(
            LLAMA_8B, BF16_8B, record, workload=workload, slo=slo, spot=False, perf=PERF
        )
        spot = evaluate(LLAMA_8B, BF16_8B, record, workload=workload, slo=slo, spot=True, perf=PERF)
        if on_demand is None:
            assert spot is None  # same hardware: feasibility cannot depend on the market
            continue
        assert spot is not None
        checked += 1
        if record.spot_usd_per_hour <= record.on_demand_usd_per_hour:
            assert spot.usd_per_million_output_tokens <= on_demand.usd_per_million_output_tokens
            cheaper += 1
        else:  # the catalog's own quirk (some GCP rows): the model must not hide it
            assert spot.usd_per_million_output_tokens > on_demand.usd_per_million_output_tokens
            dearer += 1
    assert checked > 500 and cheaper > 500


# --------------------------------------------------------------------------------------------
# Pareto frontier


def _option(cost: float, latency: float) -> Option:
    return Option(
        cloud="aws",
        region="r",
        instance_type=f"{cost}-{latency}",
        accelerator="1x X",
        kind="gpu",
        spot=False,
        model="m",
        variant="v",
        quality="reference",
        usd_per_hour=cost,
        output_tokens_per_s=1.0,
        usd_per_million_output_tokens=cost,
        ttft_s=latency,
        tpot_s=0.0,
        latency_s=latency,
        headroom=1.0,
        batch=1,
        tensor_parallel=1,
        replicas_per_instance=1,
    )


def test_pareto_marks_exactly_the_undominated_options() -> None:
    options = [
        _option(1, 10),
        _option(2, 5),
        _option(3, 7),
        _option(4, 1),
        _option(2, 6),
        _option(5, 1),
    ]
    marked = {o.instance_type: o.pareto for o in mark_pareto(options)}
    assert marked == {
        "1-10": True,
        "2-5": True,
        "3-7": False,
        "4-1": True,
        "2-6": False,
        "5-1": False,
    }


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=30))
def test_pareto_frontier_property(points: list[tuple[int, int]]) -> None:
    marked = mark_pareto([_option(c, lat) for c, lat in points])

    def dominates(a: Option, b: Option) -> bool:
        no_worse = (
            a.usd_per_million_output_tokens <= b.usd_per_million_output_tokens
            and a.latency_s <= b.latency_s
        )
        better = (
            a.usd_per_million_output_tokens < b.usd_per_million_output_tokens
            or a.latency_s < b.latency_s
        )
        return no_worse and better

    frontier = [o for o in marked if o.pareto]
    assert frontier
    for o in marked:
        dominated = any(dominates(other, o) for other in marked)
        if o.pareto:
            assert not dominated
        elif not dominated:  # an exact duplicate of a frontier point
            assert any(
                f.usd_per_million_output_tokens == o.usd_per_million_output_tokens
                and f.latency_s == o.latency_s
                for f in frontier
            )
