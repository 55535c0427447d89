"""`fleetform simulate` end to end on a tiny trace and stack file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from runtime.cli import main

from .support import FLEET, synthetic

KEYS = {
    "cost_usd",
    "usd_per_million_output_tokens",
    "lower_bound_usd",
    "slo_attainment",
    "p50_ttft_s",
    "p99_ttft_s",
    "requests",
    "completed",
    "shed",
    "failed",
    "replica_hours",
}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    stack = tmp_path / "Pulumi.test.yaml"
    stack.write_text(yaml.safe_dump({"config": {"fleetform:fleet": FLEET}}))
    trace = tmp_path / "trace.jsonl"
    rows = [
        {
            "timestamp": round(r.arrival_s * 1000),
            "input_length": r.prompt_tokens,
            "output_length": r.output_tokens,
        }
        for r in synthetic(120, rate=2.0)
    ]
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return stack, trace


def test_one_run_writes_the_documented_json(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, trace = files
    out = tmp_path / "run.json"
    argv = ["simulate", "--trace", str(trace), "--fleet", str(stack), "--json", str(out)]
    assert main([*argv, "--width", "200"]) == 0
    assert "Simulated runs" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert set(doc) >= KEYS
    assert doc["policy"] == "fleetform" and doc["requests"] == 120
    assert doc["completed"] + doc["shed"] + doc["failed"] == 120
    assert set(doc["slo_attainment"]["standard"]) >= {"ttft", "tpot"}
    assert set(doc["replica_hours"]) == {"gpu", "gpu-spot"}
    assert doc["cost_usd"] == pytest.approx(sum(doc["cost_by_pool_usd"].values()), abs=1e-3)
    assert doc["lower_bound_ratio"] == pytest.approx(
        doc["cost_usd"] / doc["lower_bound_usd"], rel=1e-3
    )


def test_all_policies_with_a_plot(files: tuple[Path, Path], tmp_path: Path) -> None:
    stack, trace = files
    out, png = tmp_path / "runs.json", tmp_path / "runs.png"
    argv = ["simulate", "--trace", str(trace), "--fleet", str(stack), "--policy", "all"]
    assert main([*argv, "--json", str(out), "--plot", str(png), "--quiet"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["policy"] for r in runs] == ["fleetform", "homogeneous", "round-robin"]
    # The stack's bound, whatever the policy: the runs share the fleet, trace and horizon.
    assert {r["horizon_s"] for r in runs} == {runs[0]["horizon_s"]}
    assert len({r["lower_bound_usd"] for r in runs}) == 1
    assert runs[1]["homogeneous"]["instance_type"] == "g5.xlarge"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--load", "0"], "--load must be positive"),
        (["--spot-preempt", "gpu@soon"], "expected [POOL@]SECONDS"),
        (["--class-mix", "gold=1"], "no SLO class 'gold'"),
    ],
)
def test_bad_options_are_one_line_errors(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    stack, trace = files
    argv = ["simulate", "--trace", str(trace), "--fleet", str(stack), "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetform simulate: ") and message in err


def test_a_missing_trace_is_a_usage_error(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    stack, _ = files
    assert main(["simulate", "--trace", "nope.csv", "--fleet", str(stack), "--quiet"]) == 2
    assert "trace file not found" in capsys.readouterr().err
