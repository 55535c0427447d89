"""InferenceFleet: outputs against runtime.plan, dev and local stacks, errors, and the Pulumi
program (__main__.py) run under mocks with the prod stack's config."""

from __future__ import annotations

import json
import runpy
from typing import Any

import pulumi
import pytest

from components.plan import PlanError
from components.settings import SettingsError
from runtime.catalog import default_catalog
from runtime.plan import fleet_cost

from .support import (
    DEV_ENV,
    FLEET_TOKEN,
    PROD_KEYS,
    REPO,
    Program,
    lb_dns_name,
    lb_private_ip,
    load_stack,
    pool_data,
    run_fleet,
    stack_config,
    stack_variant,
)


def test_outputs_are_the_plan_figures(prod: Program) -> None:
    spec, _ = load_stack("Pulumi.prod.yaml")
    catalog = default_catalog()
    cost = fleet_cost(spec, catalog)
    values = prod.values
    assert values["fleet_name"] == "acme-prod"
    assert values["pool_names"] == [p.name for p in spec.pools]
    assert values["total_usd_per_hour"] == cost.total_usd_per_hour
    assert values["total_usd_per_month"] == cost.total_usd_per_month
    assert values["max_usd_per_month"] == cost.max_usd_per_month
    assert values["pool_usd_per_hour"] == {p.pool: p.usd_per_hour for p in cost.pools}
    g5 = catalog.get("aws", "us-east-1", "g5.xlarge")
    assert values["pool_on_demand_usd_per_hour"]["aws-use1-a10g"] == 3 * g5.on_demand_usd_per_hour
    assert values["pool_spot_usd_per_hour"]["aws-use1-a10g"] == 0
    assert values["pool_on_demand_usd_per_hour"]["aws-use1-a10g-spot"] == 0
    assert values["pool_spot_usd_per_hour"]["aws-use1-a10g-spot"] == 2 * g5.spot_usd_per_hour
    assert values["on_demand_usd_per_hour"] + values["spot_usd_per_hour"] == pytest.approx(
        cost.total_usd_per_hour, rel=1e-12
    )
    assert values["spot_usd_per_hour"] == pytest.approx(
        sum(
            p.usd_per_hour
            for p, pool in zip(cost.pools, spec.pools, strict=True)
            if pool.spot and not pool.on_demand_base
        )
    )
    shares = {t.tenant: t for t in cost.tenants}
    assert values["tenant_quotas"]["batch-enrichment"] == {
        "pools": ["aws-use1-a10g-spot", "gcp-usc1-l4-spot", "gcp-usc1-tpu-v5e", "aws-use1-cpu"],
        "estimatedUsdPerMonth": shares["batch-enrichment"].usd_per_month,
        "quotas": {"tokensPerMinute": 3000000, "maxConcurrency": 512, "usdPerMonth": 10000.0},
    }
    # Every pool but the TPU one (TPU VMs cannot be load-balanced): kubernetes pools through
    # their Service, VM pools through their internal load balancer; plain strings.
    assert values["api_endpoints"] == {
        "aws-use1-a10g": f"http://{lb_dns_name('acme-aws-use1-a10g-nlb', 'us-east-1')}:8080/v1",
        "aws-use1-a10g-spot": (
            f"http://{lb_dns_name('acme-aws-use1-a10g-spot-nlb', 'us-east-1')}:8080/v1"
        ),
        "aws-usw2-inf2": f"http://{lb_dns_name('acme-aws-usw2-inf2-nlb', 'us-west-2')}:8080/v1",
        "gcp-usc1-l4": f"http://{lb_private_ip('acme-gcp-usc1-l4-fr')}:8080/v1",
        "gcp-usc1-l4-spot": f"http://{lb_private_ip('acme-gcp-usc1-l4-spot-fr')}:8080/v1",
        "azure-eus-a100": f"http://{lb_private_ip('acme-azure-eus-a100-lb')}:8080/v1",
        "aws-use1-cpu": f"http://{lb_dns_name('acme-aws-use1-cpu-nlb', 'us-east-1')}:8080/v1",
        "k8s-eks-l4": "http://acme-prod-k8s-eks-l4.fleetform-acme-prod.svc.cluster.local:8080/v1",
    }
    assert sorted(values["api_endpoints"]) == sorted(
        p.name for p in spec.pools if p.name != "gcp-usc1-tpu-v5e"
    )
    assert all(isinstance(url, str) for url in values["api_endpoints"].values())
    assert values["controller_url"] == "https://fleetform-controller.prod.acme.internal"
    assert values["local_pools"] == []


def test_fleet_component_owns_one_component_per_pool(prod: Program) -> None:
    fleet = prod.one("fleetform:index:InferenceFleet")
    assert prod.parent_chain(fleet) == ["fleetform:index:InferenceFleet", "pulumi:pulumi:Stack"]
    children = sorted((c.type.split(":")[1], c.name) for c in prod.children(fleet))
    assert children == sorted(
        [
            ("aws", "acme-aws-use1-a10g"),
            ("aws", "acme-aws-use1-a10g-spot"),
            ("aws", "acme-aws-usw2-inf2"),
            ("aws", "acme-aws-use1-cpu"),
            ("gcp", "acme-gcp-usc1-l4"),
            ("gcp", "acme-gcp-usc1-l4-spot"),
            ("gcp", "acme-gcp-usc1-tpu-v5e"),
            ("azure", "acme-azure-eus-a100"),
            ("kubernetes", "acme-k8s-eks-l4"),
            ("kubernetes", "acme-eks-prod-use1"),
            ("controller", "acme-controller"),
        ]
    )
    # Every resource of the fleet is named from its parent component.
    by_urn = {r.urn: r for r in prod.resources}
    for resource in prod.resources:
        parent = by_urn.get(resource.parent)
        if parent is not None:
            assert resource.name.startswith(parent.name + "-"), (resource.name, parent.name)


def test_dev_stack_resolves_env_key_references_on_the_deploying_machine(
    program: Program,
) -> None:
    spec, settings = load_stack("Pulumi.dev.yaml")
    run_fleet(program, spec, settings, environ=DEV_ENV, name="dev")
    assert [r.name for r in program.of_type("aws:autoscaling/group:Group")] == [
        "dev-aws-a10g-asg",
        "dev-aws-cpu-asg",
    ]
    template = program.one("gcp:compute/instanceTemplate:InstanceTemplate").state
    node = json.loads(_file(template["metadata"]["user-data"], "/etc/fleetform/node.json"))
    from runtime.agent.config import hash_api_key

    assert node["tenants"][0]["key_sha256"] == [hash_api_key("dev-key-app")]
    assert node["controller_url"] == "http://fleetform-controller.dev.acme.internal:8700"
    assert program.values["controller_url"] == "http://fleetform-controller.dev.acme.internal:8700"
    # Dev's VM pools (two AWS, one GCP) each get their internal load balancer.
    assert program.values["api_endpoints"] == {
        "aws-a10g": f"http://{lb_dns_name('dev-aws-a10g-nlb', 'us-east-1')}:8080/v1",
        "gcp-l4": f"http://{lb_private_ip('dev-gcp-l4-fr')}:8080/v1",
        "aws-cpu": f"http://{lb_dns_name('dev-aws-cpu-nlb', 'us-east-1')}:8080/v1",
    }
    # No kubernetes pool, no cluster objects.
    assert [r for r in program.resources if r.type.startswith("kubernetes:")] == []


def test_local_pools_create_no_cloud_resources(program: Program) -> None:
    spec, settings = load_stack("local.yaml")
    run_fleet(program, spec, settings)
    assert [r.type for r in program.resources] == ["fleetform:index:InferenceFleet"]
    assert program.values["local_pools"] == ["local-cheap", "local-dear"]
    assert program.values["api_endpoints"] == {}
    assert (
        program.values["total_usd_per_hour"]
        == fleet_cost(spec, default_catalog()).total_usd_per_hour
    )


def test_a_pool_in_a_region_without_a_network_is_refused(program: Program) -> None:
    def mutate(config: dict[str, Any]) -> None:
        del config["fleetform:network"]["aws"]["us-west-2"]

    spec, settings = stack_variant("Pulumi.prod.yaml", mutate)
    with pytest.raises(SettingsError) as error:
        run_fleet(program, spec, settings, api_keys=PROD_KEYS)
    assert str(error.value) == (
        "fleetform:network.aws.us-west-2: missing, and pool 'aws-usw2-inf2' is placed there "
        "(configured aws regions: us-east-1)"
    )


def test_an_agent_port_that_collides_with_an_upstream_is_refused(program: Program) -> None:
    def mutate(config: dict[str, Any]) -> None:
        config["fleetform:agent"]["port"] = 8000
        for name in ("aws-use1-cpu",):
            pool_data(config, name)["cold_start_s"] = 60

    spec, settings = stack_variant("Pulumi.prod.yaml", mutate)
    with pytest.raises(SettingsError) as error:
        run_fleet(program, spec, settings, api_keys=PROD_KEYS)
    assert str(error.value).splitlines()[0] == (
        "fleetform:agent.port: 8000 is the port of pool 'aws-use1-a10g''s upstream on the same "
        "node (pools[0].upstream.url)"
    )


def test_a_config_key_reference_without_a_secret_is_refused(program: Program) -> None:
    spec, settings = load_stack("Pulumi.prod.yaml")
    keys = {k: v for k, v in PROD_KEYS.items() if k != "config:codeAssistApiKey"}
    with pytest.raises(PlanError) as error:
        run_fleet(program, spec, settings, api_keys=keys)
    assert str(error.value) == (
        "no value for API key reference(s) config:codeAssistApiKey: set each with "
        "`pulumi config set --secret NAME VALUE`"
    )


def test_the_program_builds_the_fleet_from_stack_config(program: Program) -> None:
    """__main__.py with the prod stack's config (objects as JSON, as `pulumi config` gives them)
    and its secrets; replicas from `fleetform:replicas` (the autoscaler's key) apply."""
    config = stack_config("Pulumi.prod.yaml")
    values = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in config.items()}
    values["fleetform:replicas"] = json.dumps({"aws-use1-a10g": 5})
    values["fleetform:fleetToken"] = FLEET_TOKEN
    values["fleetform:adminToken"] = "admin"
    for reference, key in PROD_KEYS.items():
        values[f"fleetform:{reference.removeprefix('config:')}"] = key
    pulumi.runtime.set_all_config(values, secret_keys=["fleetform:fleetToken"])
    try:
        program.run(lambda: runpy.run_path(str(REPO / "__main__.py")) and None)
    finally:
        pulumi.runtime.set_all_config({})
    asg = program.by_name("acme-prod-aws-use1-a10g-asg").state
    assert (asg["minSize"], asg["maxSize"], asg["desiredCapacity"]) == (2, 10, 5)
    providers = [r for r in program.resources if r.type == "pulumi:providers:kubernetes"]
    assert [(p.name, p.state["context"]) for p in providers] == [
        ("k8s-eks-prod-use1", "arn:aws:eks:us-east-1:123456789012:cluster/prod-use1")
    ]
    assert len(program.of_type("fleetform:aws:AwsPool")) == 4


def _file(user_data: str, path: str) -> str:
    from .support import user_data_files

    return user_data_files(user_data)[path]
