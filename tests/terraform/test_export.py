"""`fleetform export terraform`: the attribution arithmetic, the document, the CLI, and what the
real `terraform validate` / `plan` make of the prod stack's export, with and without a breach."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runtime.catalog import default_catalog
from runtime.cli import main
from runtime.plan import fleet_cost
from runtime.spec import FleetSpec
from runtime.terraform import export_terraform, fleet_reservation, tenant_pool_shares

from .conftest import PROD
from .support import Terraform, check_warnings, one_line

HOURS = 730.0

# --------------------------------------------------------------------------------------------
# Attribution (pure)


def test_pools_are_split_by_tokens_per_minute_among_allowed_tenants(prod_spec: FleetSpec) -> None:
    shares = tenant_pool_shares(prod_spec)
    # search 2M tpm, support-bot 1M, code-assist 1.5M, batch-enrichment 3M. batch-enrichment
    # is on the spot pools only; support-bot is not allowed the 70b model; nobody but
    # batch-enrichment may use the smollm2 CPU pool.
    eight_b_on_demand = 2 / 4.5
    eight_b_spot = 2 / 7.5
    assert shares["search"] == {
        "aws-use1-a10g": eight_b_on_demand,
        "aws-use1-a10g-spot": eight_b_spot,
        "aws-usw2-inf2": eight_b_on_demand,
        "gcp-usc1-l4": eight_b_on_demand,
        "gcp-usc1-l4-spot": eight_b_spot,
        "gcp-usc1-tpu-v5e": eight_b_spot,
        "azure-eus-a100": 2 / 3.5,
        "k8s-eks-l4": eight_b_on_demand,
    }
    assert shares["batch-enrichment"] == {
        "aws-use1-a10g-spot": 3 / 7.5,
        "gcp-usc1-l4-spot": 3 / 7.5,
        "gcp-usc1-tpu-v5e": 3 / 7.5,
        "aws-use1-cpu": 1.0,
    }
    for pool in prod_spec.pools:
        assert sum(s.get(pool.name, 0.0) for s in shares.values()) == pytest.approx(1.0)


def test_reserved_usd_agrees_with_fleetform_plan(prod_spec: FleetSpec) -> None:
    reserved = fleet_reservation(prod_spec, default_catalog())
    planned = fleet_cost(prod_spec, default_catalog())
    assert reserved.tenant_usd_per_month == pytest.approx(
        {t.tenant: t.usd_per_month for t in planned.tenants}, rel=1e-12
    )
    assert reserved.fleet_usd_per_month == pytest.approx(10076.9419, abs=1e-9)


def test_reserved_accelerator_hours_by_hand(prod_spec: FleetSpec) -> None:
    reserved = fleet_reservation(prod_spec, default_catalog())
    # search at the stack's replicas: 8 accelerators on 8B on-demand pools (a10g 3, inf2 2,
    # l4 1, eks-l4 2) at 2/4.5, 8 on spot pools (a10g-spot 2, l4-spot 2, one 4-chip TPU slice)
    # at 2/7.5, one A100 at 2/3.5.
    search = 8 * 2 / 4.5 + 8 * 2 / 7.5 + 2 / 3.5
    assert reserved.tenant_accelerators["search"] == pytest.approx(search, rel=1e-12)
    assert reserved.tenant_accelerator_hours_per_month["search"] == pytest.approx(
        4570.0317460317, rel=1e-12
    )
    # The CPU pool has no accelerators: batch-enrichment's hours come from the spot pools.
    assert reserved.tenant_accelerators["batch-enrichment"] == pytest.approx(8 * 3 / 7.5)


# --------------------------------------------------------------------------------------------
# The document


def test_only_built_ins_and_one_check_per_quota(prod_export: dict[str, Any]) -> None:
    assert set(prod_export) == {
        "//",
        "terraform",
        "variable",
        "locals",
        "resource",
        "output",
        "check",
    }
    assert prod_export["resource"] == {
        "terraform_data": {"pool": prod_export["resource"]["terraform_data"]["pool"]}
    }
    assert set(prod_export["check"]) == {
        "tenant_search_accelerator_hours",
        "tenant_search_usd",
        "tenant_support-bot_usd",
        "tenant_code-assist_usd",
        "tenant_batch-enrichment_usd",
        "fleet_budget",
    }
    assert prod_export["variable"]["replicas"]["default"] == {
        "aws-use1-a10g": 3,
        "aws-use1-a10g-spot": 2,
        "aws-usw2-inf2": 2,
        "gcp-usc1-l4": 1,
        "gcp-usc1-l4-spot": 2,
        "gcp-usc1-tpu-v5e": 1,
        "azure-eus-a100": 1,
        "aws-use1-cpu": 1,
        "k8s-eks-l4": 2,
    }
    assert prod_export["variable"]["max_replicas"]["default"]["gcp-usc1-l4-spot"] == 16
    tpu = prod_export["locals"]["pools"]["gcp-usc1-tpu-v5e"]
    assert (tpu["accelerators_per_replica"], tpu["spot"], tpu["usd_per_hour_spot"]) == (
        4.0,
        True,
        1.02869,
    )
    assert prod_export["locals"]["tenants"]["search"]["accelerator_hours_per_month"] == 12000


# --------------------------------------------------------------------------------------------
# The CLI


def test_cli_writes_the_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prod_export: dict[str, Any]
) -> None:
    out = tmp_path / "fleet.tf.json"
    assert main(["export", "terraform", str(PROD), "-o", str(out)]) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["variable"] == prod_export["variable"]
    assert written["check"] == prod_export["check"]
    assert capsys.readouterr().err == (
        f"wrote {out}: 9 pools, 4 tenants, 6 checks; 10,076.94 USD/month at the stack's "
        "replica counts\n"
    )


def test_cli_prints_to_stdout_without_o(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "terraform", str(PROD)]) == 0
    assert json.loads(capsys.readouterr().out)["locals"]["fleet"] == "acme-prod"


def test_a_bad_stack_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text(
        PROD.read_text(encoding="utf-8").replace("max_replicas: 10", "max_replicas: 1"),
        encoding="utf-8",
    )
    assert main(["export", "terraform", str(bad), "-o", str(tmp_path / "x.tf.json")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fleetform export terraform: error: {bad}: 2 problems; "
        "config.fleetform:fleet.pools[0].max_replicas: 1 is below min_replicas 2; "
        "config.fleetform:fleet.pools[0].desired_replicas: 3 is outside "
        "min_replicas..max_replicas (2..1)\n"
    )
    assert not (tmp_path / "x.tf.json").exists()


def test_a_missing_stack_file_and_a_wrong_suffix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "terraform", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == (
        f"fleetform export terraform: error: {tmp_path / 'nope.yaml'}: 1 problem; file not found\n"
    )
    assert main(["export", "terraform", str(PROD), "-o", str(tmp_path / "fleet.json")]) == 2
    assert capsys.readouterr().err == (
        f"fleetform export terraform: error: -o {tmp_path / 'fleet.json'}: Terraform reads only "
        "*.tf.json files (e.g. fleet.tf.json)\n"
    )


# --------------------------------------------------------------------------------------------
# The real terraform CLI


def test_prod_export_validates_and_plans_without_warnings(
    terraform: Terraform, prod_dir: Path
) -> None:
    validate = terraform.run(prod_dir, "validate", "-no-color")
    assert "The configuration is valid." in validate.stdout
    plan = terraform.plan(prod_dir)
    assert plan.returncode == 0, plan.stderr
    assert "Plan: 9 to add, 0 to change, 0 to destroy." in plan.stdout
    assert "Warning" not in plan.stdout + plan.stderr
    assert 'terraform_data.pool["gcp-usc1-tpu-v5e"] will be created' in plan.stdout


def test_terraform_computes_what_python_computes(
    terraform: Terraform, prod_dir: Path, prod_spec: FleetSpec, tmp_path: Path
) -> None:
    planfile = tmp_path / "prod.tfplan"
    terraform.run(prod_dir, "plan", "-input=false", "-no-color", f"-out={planfile}")
    shown = json.loads(terraform.run(prod_dir, "show", "-json", str(planfile)).stdout)
    outputs = {name: o["value"] for name, o in shown["planned_values"]["outputs"].items()}
    reserved = fleet_reservation(prod_spec, default_catalog())
    assert outputs["fleet_usd_per_month"] == 10076.94
    assert outputs["fleet_max_usd_per_month"] == 44273.83
    assert outputs["tenant_usd_per_month"] == {
        t: round(v, 2) for t, v in reserved.tenant_usd_per_month.items()
    }
    assert outputs["tenant_accelerator_hours_per_month"] == {
        t: round(v, 2) for t, v in reserved.tenant_accelerator_hours_per_month.items()
    }
    assert outputs["tenant_accelerator_hours_per_month"]["search"] == 4570.03
    assert outputs["unattributed_pools"] == []
    tpu = next(
        r
        for r in shown["planned_values"]["root_module"]["resources"]
        if r["address"] == 'terraform_data.pool["gcp-usc1-tpu-v5e"]'
    )["values"]["input"]
    assert (tpu["replicas"], tpu["max_replicas"], tpu["accelerators"], tpu["usd_per_month"]) == (
        1,
        4,
        4,
        750.94,
    )


def test_more_replicas_break_a_tenant_quota_and_plan_warns(
    terraform: Terraform, prod_dir: Path
) -> None:
    # Within every pool's max, for search: +3 TPU slices (12 chips) and +14 L4 spot at 2/7.5,
    # +7 A10G at 2/4.5, +3 A100 at 2/3.5: 15 x 2/4.5 + 34 x 2/7.5 + 4 x 2/3.5 = 18.0190
    # accelerators = 13153.90 hours a month, over 12000.
    plan = terraform.plan(
        prod_dir,
        "-var",
        'replicas={"gcp-usc1-tpu-v5e" = 4, "aws-use1-a10g" = 10, "azure-eus-a100" = 4, '
        '"gcp-usc1-l4-spot" = 16}',
    )
    assert plan.returncode == 0, plan.stderr
    warnings = check_warnings(plan.stdout + plan.stderr)
    assert len(warnings) == 1, warnings
    [warning] = warnings
    assert "check.tenant_search_accelerator_hours" in warning
    assert (
        "Tenant search: the fleet reserves 13153.9 accelerator-hours/month for it, over its "
        "quota of 12000 accelerator-hours/month. Its share by pool: aws-use1-a10g 4.44 "
        "accelerators, aws-use1-a10g-spot 0.53 accelerators, aws-usw2-inf2 0.89 accelerators, "
        "azure-eus-a100 2.29 accelerators, gcp-usc1-l4 0.44 accelerators, gcp-usc1-l4-spot "
        "4.27 accelerators, gcp-usc1-tpu-v5e 4.27 accelerators, k8s-eks-l4 0.89 accelerators."
    ) in warning


def test_a_higher_max_breaks_the_budget_and_plan_warns(
    terraform: Terraform, prod_dir: Path
) -> None:
    # 44273.8284 + 36 more A100 nodes x 3.673 USD/h x 730 h = 140800.2684 USD/month.
    plan = terraform.plan(prod_dir, "-var", 'max_replicas={"azure-eus-a100" = 40}')
    assert plan.returncode == 0, plan.stderr
    [warning] = check_warnings(plan.stdout + plan.stderr)
    assert "check.fleet_budget" in warning
    assert (
        "Fleet acme-prod: at max_replicas the pools cost 140800.27 USD/month, over the budget "
        "of 95000 USD/month."
    ) in warning
    assert "azure-eus-a100 107251.60 USD (40 replicas)" in warning


def test_a_lower_quota_in_the_stack_makes_plan_warn(
    terraform: Terraform, prod_spec: FleetSpec, tmp_path: Path
) -> None:
    tenants = [
        t.model_copy(update={"quotas": t.quotas.model_copy(update={"usd_per_month": 3000.0})})
        if t.name == "code-assist"
        else t
        for t in prod_spec.tenants
    ]
    spec = prod_spec.model_copy(update={"tenants": tenants})
    (tmp_path / "fleet.tf.json").write_text(
        json.dumps(export_terraform(spec, default_catalog())), encoding="utf-8"
    )
    terraform.run(tmp_path, "init", "-backend=false", "-input=false", "-no-color")
    plan = terraform.plan(tmp_path)
    assert plan.returncode == 0, plan.stderr
    [warning] = check_warnings(plan.stdout + plan.stderr)
    assert "check.tenant_code-assist_usd" in warning
    assert (
        "Tenant code-assist: the fleet reserves 3233.82 USD/month of capacity for it, over its "
        "quota of 3000 USD/month."
    ) in warning
    assert "azure-eus-a100 1149.12 USD" in warning  # 2681.29 x 1.5/3.5


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            'replicas={"azure-eus-a100" = 5}',
            "Each pool's replicas must be a whole number within its min_replicas..max_replicas.",
        ),
        ('replicas={"aws-use1-a10g" = 2.5}', "Each pool's replicas must be a whole number"),
        (
            'replicas={"aws-use1-a100" = 1}',
            "Every key of replicas must be a pool of the fleet: aws-use1-a10g,",
        ),
        (
            'max_replicas={"aws-use1-a10g" = 1}',
            "Each pool's max_replicas must be a whole number from its min_replicas up to 10000.",
        ),
    ],
)
def test_replica_variables_are_validated(
    terraform: Terraform, prod_dir: Path, var: str, message: str
) -> None:
    plan = terraform.plan(prod_dir, "-var", var)
    assert plan.returncode == 1
    assert message in one_line(plan.stderr)


@pytest.mark.parametrize("stack", sorted((PROD.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_stack_exports_to_a_plannable_configuration(
    terraform: Terraform, stack: Path, tmp_path: Path
) -> None:
    assert main(["export", "terraform", str(stack), "-o", str(tmp_path / "fleet.tf.json")]) == 0
    terraform.run(tmp_path, "init", "-backend=false", "-input=false", "-no-color")
    terraform.run(tmp_path, "validate", "-no-color")
    planfile = tmp_path / "fleet.tfplan"
    plan = terraform.run(tmp_path, "plan", "-input=false", "-no-color", f"-out={planfile}")
    # Checks warn but never fail a plan.
    assert plan.returncode == 0
    shown = json.loads(terraform.run(tmp_path, "show", "-json", str(planfile)).stdout)
    outputs = {name: o["value"] for name, o in shown["planned_values"]["outputs"].items()}
    document = json.loads((tmp_path / "fleet.tf.json").read_text(encoding="utf-8"))
    pools = document["locals"]["pools"]
    assert set(outputs["pool_usd_per_month"]) == set(pools)
    # Local agents run on this machine's CPUs, whatever they are priced as.
    assert all(p["accelerators_per_replica"] == 0 for p in pools.values() if p["cloud"] == "local")
