"""The stack policies judged on the fleet of the stack config: `fleet-budget`, `tenant-quota`,
`spot-for-sheddable-pools`, each passing on the example stacks and failing on a changed copy with
the exact message; where the spec comes from (engine config, registered outputs)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from components.support import stack_config
from pulumi_policy import EnforcementLevel, Policy

from policy.policies import (
    FLEET_TYPE,
    budget_violation,
    build_policies,
    engine_stack_config,
    fleet_from_config,
    quota_violations,
    served_classes,
)
from runtime.catalog import default_catalog
from runtime.spec import FLEET_CONFIG_KEY, REPLICAS_CONFIG_KEY
from runtime.terraform import fleet_reservation

from .support import DEV, PROD, NotApplicable, pool_entry, resource, tenant_entry, validate_stack
from .variants import OVER_BUDGET_MESSAGE, OVER_QUOTA_MESSAGE, over_budget, over_quota

FLEET_URN = f"urn:pulumi:test::fleetform::{FLEET_TYPE}::acme"


def config_of(name: str, mutate: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    config = copy.deepcopy(stack_config(name))
    if mutate is not None:
        mutate(config)
    return config


def policy(name: str, config: dict[str, Any]) -> Policy:
    return next(p for p in build_policies(stack_config=lambda: config) if p.name == name)


def fleet_component(**outputs: Any) -> Any:
    return resource(FLEET_TYPE, outputs, name="acme")


# --------------------------------------------------------------------------------------------
# fleet-budget


def test_budget_passes_prod_and_dev() -> None:
    for name in (PROD, DEV):
        assert validate_stack(policy("fleet-budget", config_of(name))) == []


def test_budget_fails_at_max_replicas_naming_the_pools_and_amounts() -> None:
    config = config_of(PROD, over_budget)
    found = validate_stack(policy("fleet-budget", config))
    assert found == [(OVER_BUDGET_MESSAGE, None)]
    # The violation attaches to the InferenceFleet when the stack has one.
    found = validate_stack(policy("fleet-budget", config), [fleet_component()])
    assert found == [(OVER_BUDGET_MESSAGE, FLEET_URN)]


def test_budget_is_judged_at_max_replicas_not_at_the_autoscalers_replicas() -> None:
    # The autoscaler only edits fleetform:replicas: any count within bounds leaves the verdict.
    low = config_of(PROD, over_budget)
    low[REPLICAS_CONFIG_KEY] = {"azure-eus-a100": 1}
    high = config_of(PROD)
    high[REPLICAS_CONFIG_KEY] = {"azure-eus-a100": 4, "aws-use1-a10g": 10}
    assert validate_stack(policy("fleet-budget", low)) == [(OVER_BUDGET_MESSAGE, None)]
    assert validate_stack(policy("fleet-budget", high)) == []


def test_budget_within_to_the_cent_and_a_fleet_without_budget() -> None:
    spec = fleet_from_config(config_of(PROD), default_catalog())
    max_usd = 44273.8284
    assert budget_violation(spec, default_catalog()) is None

    def exact(config: dict[str, Any]) -> None:
        config[FLEET_CONFIG_KEY]["budget"]["usd_per_month"] = max_usd

    def one_cent_less(config: dict[str, Any]) -> None:
        config[FLEET_CONFIG_KEY]["budget"]["usd_per_month"] = max_usd - 0.01

    def no_budget(config: dict[str, Any]) -> None:
        del config[FLEET_CONFIG_KEY]["budget"]

    assert validate_stack(policy("fleet-budget", config_of(PROD, exact))) == []
    [(message, _)] = validate_stack(policy("fleet-budget", config_of(PROD, one_cent_less)))
    assert message.startswith(
        "Fleet acme-prod: at max_replicas the pools cost 44273.83 USD/month, over the budget of "
        "44273.8184 USD/month by 0.01 USD."
    )
    assert validate_stack(policy("fleet-budget", config_of(PROD, no_budget))) == []


def test_budget_checks_the_fleet_the_component_registered() -> None:
    # The config is over budget but the program registered prod's figures: both are reported,
    # the mismatch on the InferenceFleet.
    config = config_of(PROD, over_budget)
    registered = fleet_component(
        fleet_name="acme-prod",
        pool_names=[p["name"] for p in config[FLEET_CONFIG_KEY]["pools"]],
        max_usd_per_month=44273.8284,
    )
    found = validate_stack(policy("fleet-budget", config), [registered])
    assert found == [
        (
            "InferenceFleet acme costs 44273.83 USD/month at max replicas, but the stack config "
            "gives 97899.63 USD/month: the program does not deploy the fleet of its config",
            FLEET_URN,
        ),
        (OVER_BUDGET_MESSAGE, FLEET_URN),
    ]
    other = fleet_component(fleet_name="acme-dev", pool_names=["aws-a10g"])
    assert validate_stack(policy("fleet-budget", config_of(PROD)), [other]) == [
        (
            "InferenceFleet acme deploys fleet 'acme-dev', but the stack config fleetform:fleet "
            "describes 'acme-prod': the policies cannot judge a fleet the config does not "
            "describe",
            FLEET_URN,
        )
    ]
    fewer = fleet_component(fleet_name="acme-prod", pool_names=["aws-use1-a10g"])
    [(message, urn)] = validate_stack(policy("fleet-budget", config_of(PROD)), [fewer])
    assert message.startswith("InferenceFleet acme deploys pools aws-use1-a10g, but the stack ")
    assert urn == FLEET_URN


def test_a_stack_without_a_fleet_is_not_judged_and_an_unreadable_fleet_fails() -> None:
    with pytest.raises(NotApplicable, match="the stack config has no fleetform:fleet"):
        validate_stack(policy("fleet-budget", {}))
    # A fleet is deployed but its config is missing: nothing can vouch for it.
    assert validate_stack(policy("tenant-quota", {}), [fleet_component()]) == [
        ("the fleet cannot be judged: stack config has no fleetform:fleet", None)
    ]
    broken = config_of(PROD)
    broken[REPLICAS_CONFIG_KEY] = {"azure-eus-a100": 9}
    [(message, _)] = validate_stack(policy("spot-for-sheddable-pools", broken))
    assert message.startswith("the fleet cannot be judged: ")
    assert "config.fleetform:replicas.azure-eus-a100: 9 is outside" in message


def test_the_engine_hands_the_pack_the_stack_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine passes the stack's config to a policy pack as PULUMI_CONFIG, structured values
    # as JSON text; pulumi.Config reads it there.
    config = config_of(PROD)
    monkeypatch.setenv(
        "PULUMI_CONFIG",
        json.dumps(
            {
                FLEET_CONFIG_KEY: json.dumps(config[FLEET_CONFIG_KEY]),
                REPLICAS_CONFIG_KEY: json.dumps({"aws-use1-a10g": 4}),
                "aws:region": "us-east-1",
            }
        ),
    )
    found = engine_stack_config()
    assert sorted(found) == [FLEET_CONFIG_KEY, REPLICAS_CONFIG_KEY]
    spec = fleet_from_config(found, default_catalog())
    assert spec.name == "acme-prod"
    assert spec.pool("aws-use1-a10g").replicas == 4
    [budget] = [p for p in build_policies() if p.name == "fleet-budget"]
    assert validate_stack(budget) == []


# --------------------------------------------------------------------------------------------
# tenant-quota


def test_quota_passes_prod_and_dev() -> None:
    for name in (PROD, DEV):
        assert validate_stack(policy("tenant-quota", config_of(name))) == []


def test_quota_fails_naming_the_tenant_and_amounts() -> None:
    assert validate_stack(policy("tenant-quota", config_of(PROD, over_quota))) == [
        (OVER_QUOTA_MESSAGE, None)
    ]


def test_quota_uses_the_terraform_exports_attribution() -> None:
    # The same figure as runtime.terraform.fleet_reservation (and `fleetform plan`).
    spec = fleet_from_config(config_of(PROD), default_catalog())
    hours = fleet_reservation(spec, default_catalog()).tenant_accelerator_hours_per_month
    assert f"{hours['search']:.1f}" == "4570.0"
    # At the autoscaler's replicas: scaling the pools search shares up breaks the quota.
    config = config_of(PROD)
    tenant_entry(config, "search")["quotas"]["accelerator_hours_per_month"] = 5000
    assert validate_stack(policy("tenant-quota", config)) == []
    config[REPLICAS_CONFIG_KEY] = {"aws-use1-a10g": 5}
    [(message, _)] = validate_stack(policy("tenant-quota", config))
    assert message.startswith(
        "Tenant search: the fleet reserves 5218.9 accelerator-hours/month for it, over its quota "
        "of 5000 accelerator-hours/month. Its share by pool: aws-use1-a10g 2.22 accelerators,"
    )


def test_quota_in_usd() -> None:
    def low_usd(config: dict[str, Any]) -> None:
        tenant_entry(config, "code-assist")["quotas"]["usd_per_month"] = 1000

    spec = fleet_from_config(config_of(PROD, low_usd), default_catalog())
    # Shares by tokens/min among the tenants allowed on each pool at its current replicas,
    # e.g. aws-use1-a10g: 1.5M of 4.5M x 3 x 1.006 USD/h x 730 h = 734.38; azure-eus-a100 (no
    # support-bot on 70b): 1.5M of 3.5M x 1 x 3.673 x 730 = 1149.12.
    assert quota_violations(spec, default_catalog()) == [
        "Tenant code-assist: the fleet reserves 3233.82 USD/month of capacity for it, over its "
        "quota of 1000 USD/month. Its share by pool: aws-use1-a10g 734.38 USD, aws-use1-a10g-spot "
        "127.31 USD, aws-usw2-inf2 368.99 USD, azure-eus-a100 1149.12 USD, gcp-usc1-l4 "
        "207.71 USD, gcp-usc1-l4-spot 104.44 USD, gcp-usc1-tpu-v5e 150.19 USD, k8s-eks-l4 "
        "391.67 USD."
    ]
    [(message, _)] = validate_stack(policy("tenant-quota", config_of(PROD, low_usd)))
    assert message == quota_violations(spec, default_catalog())[0]


# --------------------------------------------------------------------------------------------
# spot-for-sheddable-pools


def test_served_classes_follow_tenants_priorities_and_quality() -> None:
    spec = fleet_from_config(config_of(PROD), default_catalog())
    served = {p.name: [c.name for c in served_classes(spec, p)] for p in spec.pools}
    assert served == {
        "aws-use1-a10g": ["critical", "standard", "batch"],
        "aws-use1-a10g-spot": ["critical", "standard", "batch"],
        "aws-usw2-inf2": ["critical", "standard", "batch"],
        "gcp-usc1-l4": ["critical", "standard", "batch"],
        "gcp-usc1-l4-spot": ["critical", "standard", "batch"],
        "gcp-usc1-tpu-v5e": ["critical", "standard", "batch"],
        "azure-eus-a100": ["critical", "standard", "batch"],
        # Only batch-enrichment (default and ceiling: batch) may use the smollm2 pool.
        "aws-use1-cpu": ["batch"],
        # int4 is 'standard': below critical's and search's minimum quality.
        "k8s-eks-l4": ["standard", "batch"],
    }


def test_spot_passes_prod() -> None:
    assert validate_stack(policy("spot-for-sheddable-pools", config_of(PROD))) == []


def test_spot_fails_an_on_demand_pool_of_sheddable_work() -> None:
    def on_demand(config: dict[str, Any]) -> None:
        pool_entry(config, "aws-use1-cpu")["spot"] = False

    # m7g.8xlarge: 1.3056 USD/h on-demand, 0.5174 spot; x 6 replicas x 730 h.

    assert validate_stack(policy("spot-for-sheddable-pools", config_of(PROD, on_demand))) == [
        (
            "Pool aws-use1-cpu serves only sheddable classes (batch) but runs on-demand: set "
            "spot: true. At its 6 max replicas it costs 5718.53 USD/month on-demand, "
            "2266.21 USD/month on spot.",
            None,
        )
    ]
    # dev's CPU pool is such a pool: interactive needs 'high' quality, q4-1 is 'standard'.
    assert validate_stack(policy("spot-for-sheddable-pools", config_of(DEV))) == [
        (
            "Pool aws-cpu serves only sheddable classes (batch) but runs on-demand: set spot: "
            "true. At its 3 max replicas it costs 178.70 USD/month on-demand, 85.85 USD/month "
            "on spot.",
            None,
        )
    ]


def test_spot_is_not_required_for_work_that_may_not_run_on_spot() -> None:
    def batch_not_spot_eligible(config: dict[str, Any]) -> None:
        for slo in config[FLEET_CONFIG_KEY]["slo_classes"]:
            if slo["name"] == "batch":
                slo["spot_eligible"] = False

    assert validate_stack(policy("spot-for-sheddable-pools", config_of(DEV))) != []
    assert (
        validate_stack(policy("spot-for-sheddable-pools", config_of(DEV, batch_not_spot_eligible)))
        == []
    )


def test_enforcement_levels() -> None:
    levels = {p.name: p.enforcement_level for p in build_policies(stack_config=dict)}
    assert levels == {
        "fleet-budget": EnforcementLevel.MANDATORY,
        "tenant-quota": EnforcementLevel.MANDATORY,
        "spot-for-sheddable-pools": EnforcementLevel.ADVISORY,
        "allowed-regions-and-families": EnforcementLevel.MANDATORY,
        "cost-attribution-tags": EnforcementLevel.MANDATORY,
        "agent-authentication": EnforcementLevel.MANDATORY,
        "agent-token-secret": EnforcementLevel.MANDATORY,
        "no-public-ip": EnforcementLevel.MANDATORY,
    }
