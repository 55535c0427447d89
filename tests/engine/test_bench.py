"""The benchmark's workload construction and the CPU calibration it derives (no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.costmodel import CpuAssumption
from runtime.engine.bench import (
    DEFAULT_TRACE,
    batching_gain_bound,
    build_workload,
    cpu_calibration,
    load_trace,
)


def _trace_file(tmp_path: Path) -> Path:
    """A trace in the Azure CSV format (the real one lives outside the repo, in ../shared/data)."""
    rng = np.random.default_rng(7)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(2000):
        rows.append(
            f"2023-11-16 18:15:{i % 60:02d}.0,{rng.integers(2, 8000)},{rng.integers(1, 900)}"
        )
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_default_trace_is_the_shared_azure_conversation_trace() -> None:
    assert DEFAULT_TRACE.name == "AzureLLMInferenceTrace_conv.csv"
    assert DEFAULT_TRACE.parent.parts[-2:] == ("shared", "data")


def test_workload_is_sampled_from_the_trace_and_fits_the_context(tmp_path: Path) -> None:
    trace = load_trace(_trace_file(tmp_path))
    assert len(trace[0]) == 2000
    pairs = build_workload(trace, 200, 0, 8.0, 4.0, 2048)
    assert len(pairs) == 200
    assert all(p >= 4 and o >= 1 and p + o < 2048 for p, o in pairs)
    # Same seed, same workload; another seed, another one.
    assert build_workload(trace, 200, 0, 8.0, 4.0, 2048) == pairs
    assert build_workload(trace, 200, 1, 8.0, 4.0, 2048) != pairs
    # Scaling follows the trace: the median prompt is the trace's median context / 8, unless clamped.
    expected = np.median(np.clip(np.round(trace[0] / 8.0), 4, None))
    assert np.median([p for p, _ in pairs]) == pytest.approx(expected, rel=0.5)


def _report(decode_tok_s: float, prefill_tok_s: float) -> dict:
    return {
        "model": "m",
        "system": {"cpus": 2, "blas": "openblas"},
        "engine": {"weights_bytes": 400_000_000, "kv_cache_bytes": 1000, "kv_cache_tokens": 10},
        "decode_only": [{"streams": 1, "context": 100, "tok_s_median": decode_tok_s}],
        "prefill": {"tok_s": prefill_tok_s},
    }


def test_calibration_turns_measured_speeds_into_per_vcpu_figures(tmp_path: Path) -> None:
    cal = cpu_calibration(_report(decode_tok_s=50.0, prefill_tok_s=400.0))
    # 50 steps/s x (400 MB weights + 100 tokens x 100 B of KV) over 2 vCPUs.
    assert cal.bandwidth_gbps_per_vcpu == pytest.approx(50 * 400_010_000 / 2 / 1e9)
    # 400 tok/s x 2 FLOPs x 100 M parameters over 2 vCPUs.
    assert cal.gflops_per_vcpu == pytest.approx(400 * 2 * 100_000_000 / 2 / 1e9)
    path = tmp_path / "cal.json"
    cal.save(path)
    assert CpuAssumption.load(path) == cal
    assert json.loads(path.read_text())["source"].startswith("fleetform bench engine")


def test_calibration_needs_both_measurements() -> None:
    report = _report(50.0, 400.0)
    del report["prefill"]
    with pytest.raises(ValueError, match="prefill"):
        cpu_calibration(report)


def test_batching_gain_bound_counts_prefill_at_the_same_cost_both_ways() -> None:
    # 100-token prompts at 500 tok/s (0.2 s), 40 outputs: alone 0.2 + 40 x 0.02 = 1.0 s;
    # 16 streams sharing 80 ms steps: 0.2 + 40 x 0.005 = 0.4 s -> 2.5x.
    assert batching_gain_bound(100, 40, 500, 0.020, 0.080, 16) == pytest.approx(2.5)
    # Without prefill the bound is the decode gain alone: 16 x 20 ms / 80 ms = 4x.
    assert batching_gain_bound(0, 40, 500, 0.020, 0.080, 16) == pytest.approx(4.0)


def test_long_context_argument_is_validated() -> None:
    import argparse

    from runtime.engine.bench import _seqs_by_tokens

    assert _seqs_by_tokens("32x2048") == (32, 2048)
    for bad in ("32", "x2048", "0x10", "axb", "4x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="SEQSxTOKENS"):
            _seqs_by_tokens(bad)
