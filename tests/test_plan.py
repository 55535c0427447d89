"""`fleetform plan`, `schema` and `validate`: the report's figures and the CLI's behaviour."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.catalog import default_catalog
from runtime.cli import main
from runtime.costmodel import PerformanceModel, Workload
from runtime.plan import build_report, builtin_models, collapse_scaled, fleet_cost
from runtime.spec import HOURS_PER_MONTH, load_stack_file

ROOT = Path(__file__).resolve().parents[1]
PROD = ROOT / "stacks" / "Pulumi.prod.yaml"
DEV = ROOT / "stacks" / "Pulumi.dev.yaml"
LOCAL = ROOT / "stacks" / "local.yaml"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def prod_plan(capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    code, out, err = run_cli(capsys, "plan", str(PROD), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_prod_plan_json_has_options_for_every_model_and_a_costed_fleet(capsys) -> None:
    report = prod_plan(capsys)
    spec = load_stack_file(PROD)
    assert [m["model"] for m in report["options"]] == [m.name for m in spec.models]
    for model in report["options"]:
        assert model["rows"], model["reason"]
        assert any(row["pareto"] for row in model["rows"])
        costs = [row["usd_per_million_output_tokens"] for row in model["rows"]]
        assert costs == sorted(costs)
    fleet = report["fleet"]
    assert [p["pool"] for p in fleet["pools"]] == [p.name for p in spec.pools]
    assert fleet["total_usd_per_hour"] == pytest.approx(
        sum(p["usd_per_hour"] for p in fleet["pools"])
    )
    assert fleet["budget_usd_per_month"] == 95000
    assert fleet["max_usd_per_month"] <= fleet["budget_usd_per_month"]


def test_pool_cost_agrees_with_the_raw_price_rows(capsys) -> None:
    """aws-use1-a10g: 3 on-demand g5.xlarge in us-east-1, priced from the packaged CSV."""
    rows = list(csv.DictReader((ROOT / "runtime" / "data" / "prices_aws.csv").open()))
    price = max(
        float(r["Price"])
        for r in rows
        if r["InstanceType"] == "g5.xlarge" and r["Region"] == "us-east-1"
    )
    pool = next(p for p in prod_plan(capsys)["fleet"]["pools"] if p["pool"] == "aws-use1-a10g")
    assert (pool["replicas"], pool["max_replicas"], pool["spot"]) == (3, 10, False)
    assert pool["usd_per_hour"] == pytest.approx(3 * price)
    assert pool["usd_per_month"] == pytest.approx(3 * price * HOURS_PER_MONTH)
    assert pool["usd_per_month_at_max"] == pytest.approx(10 * price * HOURS_PER_MONTH)


def test_spot_pool_is_priced_at_spot_and_kubernetes_at_what_it_is_priced_as() -> None:
    catalog = default_catalog()
    spec = load_stack_file(PROD, catalog=catalog)
    pools = {p.pool: p for p in fleet_cost(spec, catalog).pools}
    g5 = catalog.get("aws", "us-east-1", "g5.xlarge")
    assert pools["aws-use1-a10g-spot"].usd_per_hour == pytest.approx(2 * g5.spot_usd_per_hour)
    g6 = catalog.get("aws", "us-east-1", "g6.xlarge")
    assert pools["k8s-eks-l4"].usd_per_hour == pytest.approx(2 * g6.on_demand_usd_per_hour)
    assert pools["k8s-eks-l4"].priced_as == "aws/us-east-1/g6.xlarge"


def test_tenant_shares_add_up_to_the_fleet_and_follow_quotas() -> None:
    catalog = default_catalog()
    spec = load_stack_file(PROD, catalog=catalog)
    cost = fleet_cost(spec, catalog)
    shared = sum(t.usd_per_month for t in cost.tenants) + cost.unallocated_usd_per_month
    assert shared == pytest.approx(cost.total_usd_per_month)
    shares = {t.tenant: t for t in cost.tenants}
    # batch-enrichment may only use its four pools, and aws-use1-cpu serves a model only it may use.
    assert set(shares["batch-enrichment"].pools) == {
        "aws-use1-a10g-spot",
        "gcp-usc1-l4-spot",
        "gcp-usc1-tpu-v5e",
        "aws-use1-cpu",
    }
    cpu_pool = next(p for p in cost.pools if p.pool == "aws-use1-cpu")
    assert "aws-use1-cpu" not in shares["search"].pools
    # search (2M tokens/min) and support-bot (1M) share aws-use1-a10g with code-assist (1.5M): 2:1 share.
    a10g = next(p for p in cost.pools if p.pool == "aws-use1-a10g").usd_per_month
    assert a10g * 2.0 / 4.5 <= shares["search"].usd_per_month
    assert shares["batch-enrichment"].usd_per_month >= cpu_pool.usd_per_month


def test_classes_that_are_not_spot_eligible_get_on_demand_options_only(capsys) -> None:
    critical = prod_plan(capsys, "--slo", "critical")
    assert all(not row["spot"] for m in critical["options"] for row in m["rows"] if m["rows"])
    batch = prod_plan(capsys, "--slo", "batch")
    assert any(row["spot"] for m in batch["options"] for row in m["rows"])


def test_min_quality_of_the_class_filters_variants(capsys) -> None:
    critical = {m["model"]: m for m in prod_plan(capsys, "--slo", "critical")["options"]}
    # critical needs quality "high": the 8B int4 (standard) variant is never offered.
    assert {row["variant"] for row in critical["llama-3-1-8b"]["rows"]} <= {"bf16", "int8"}
    assert critical["smollm2-135m"]["rows"] == []
    assert "quality high or better" in critical["smollm2-135m"]["reason"]


def test_operating_points_respect_the_planning_margin(capsys) -> None:
    report = prod_plan(capsys, "--slo", "standard", "--limit", "0")
    spec = load_stack_file(PROD)
    standard = spec.slo_class("standard")
    margin = spec.routing.slo_headroom
    for model in report["options"]:
        for row in model["rows"]:
            assert row["ttft_s"] <= standard.ttft_ms / 1000 * margin + 1e-9
            assert row["tpot_s"] <= standard.tpot_ms / 1000 * margin + 1e-9
            assert row["headroom"] >= 1 / margin - 1e-9


def test_scaled_copies_of_one_offer_collapse_to_the_smallest() -> None:
    catalog = default_catalog()
    model = builtin_models()["llama-3-1-8b"]
    report = build_report(
        catalog=catalog,
        spec=None,
        stack=None,
        models=[model],
        slo_text="2500/100",
        workload=Workload(),
        rate_rps=None,
        clouds=["gcp"],
        regions=["us-central1"],
        limit=0,
        perf=PerformanceModel(),
    )
    rows = report.models[0].options
    v6e = [
        r for r in rows if r.instance_type.startswith("tpu-v6e-") and r.spot and r.variant == "bf16"
    ]
    assert [r.instance_type for r in v6e] == ["tpu-v6e-1"]
    assert report.models[0].considered > len(rows)
    # collapse_scaled is idempotent and never drops the cheapest option
    assert collapse_scaled(rows) == rows


def test_ad_hoc_plan_without_a_stack_sizes_a_fleet_for_a_rate(capsys) -> None:
    code, out, err = run_cli(
        capsys,
        "plan",
        "--model",
        "llama-3-1-8b",
        "--slo",
        "800/60",
        "--rate",
        "5",
        "--cloud",
        "aws",
        "--region",
        "us-east-1",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["fleet"] is None
    rows = report["options"][0]["rows"]
    assert rows and all(r["region"] == "us-east-1" and r["cloud"] == "aws" for r in rows)
    for row in rows:
        assert row["instances"] >= 1
        assert row["fleet_usd_per_hour"] == pytest.approx(row["instances"] * row["usd_per_hour"])
        assert row["instances"] * row["output_tokens_per_s"] >= 5 * 129 * (1 - 1e-9)


def test_table_output_shows_frontier_fleet_and_budget(capsys) -> None:
    code, out, _ = run_cli(capsys, "plan", str(PROD), "--width", "240")
    assert code == 0
    assert "Pareto frontier" in out
    assert "Declared fleet cost" in out
    assert "budget $95,000/month" in out
    assert "aws-use1-a10g-spot" in out
    assert "Tenant share" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan"], "give a stack file or --model"),
        (["plan", "--model", "llama-3-1-8b"], "--slo is required without a stack"),
        (["plan", "--model", "gpt-9", "--slo", "1/1"], "--model: unknown model gpt-9"),
        (
            ["plan", str(PROD), "--slo", "fastest"],
            "--slo: expected TTFT_MS/TPOT_MS such as 800/60 or a class of the stack (critical, standard, batch), got 'fastest'",
        ),
        (
            ["plan", "--model", "llama-3-1-8b", "--slo", "0/50"],
            "--slo: both targets must be positive",
        ),
        (
            ["plan", "--model", "llama-3-1-8b", "--slo", "800/60", "--rate", "-1"],
            "--rate must be a positive number",
        ),
        (["plan", "stacks/missing.yaml"], "stacks/missing.yaml: 1 problem\n  file not found"),
    ],
)
def test_user_errors_exit_2_with_one_message_and_no_traceback(capsys, argv, message) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_invalid_stack_reports_every_problem_with_its_path(tmp_path, capsys) -> None:
    text = PROD.read_text().replace("instance_type: g5.xlarge", "instance_type: g5.xlargee", 1)
    text = text.replace("max_replicas: 10", "max_replicas: 1", 1)
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text(text)
    code, _, err = run_cli(capsys, "plan", str(bad))
    assert code == 2
    assert f"{bad}: 3 problems" in err
    assert (
        "config.fleetform:fleet.pools[0].desired_replicas: 3 is outside "
        "min_replicas..max_replicas (2..1)"
    ) in err
    assert "config.fleetform:fleet.pools[0].max_replicas: 1 is below min_replicas 2" in err
    assert "config.fleetform:fleet.pools[0].instance_type: no aws instance type 'g5.xlargee'" in err
    assert "g5.xlarge" in err.split("g5.xlargee", 1)[1]  # suggests the right one


def test_validate_command(tmp_path, capsys) -> None:
    code, out, _ = run_cli(capsys, "validate", str(PROD), str(DEV), str(LOCAL))
    assert code == 0
    assert out.count(": ok (") == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("config:\n  fleetform:fleet: {name: x}\n")
    code, _, err = run_cli(capsys, "validate", str(PROD), str(bad))
    assert code == 1
    assert "config.fleetform:fleet.models: required field is missing" in err


def test_schema_commands_print_json_schema(capsys) -> None:
    code, out, _ = run_cli(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "FleetSpec"
    assert {"models", "pools", "tenants", "slo_classes"} <= set(schema["properties"])
    code, out, _ = run_cli(capsys, "schema", "--stack-file")
    stack_schema = json.loads(out)
    assert stack_schema["properties"]["config"]["properties"]["fleetform:fleet"] == {
        "$ref": "#/$defs/FleetSpec"
    }


def test_console_script_entry_point_runs_in_a_fresh_process() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "plan", str(LOCAL), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    local_pools = {p["pool"]: p for p in report["fleet"]["pools"]}
    assert local_pools["local-cheap"]["usd_per_hour"] < local_pools["local-dear"]["usd_per_hour"]
    assert local_pools["local-cheap"]["accelerator"] == "cpu"
