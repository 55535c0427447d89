"""The whole pack on what a mocked `InferenceFleet` of each example stack registers: the offline
stand-in for `pulumi preview --policy-pack policy` (see support.py). prod and dev pass; an
over-budget and an over-quota copy of prod fail with the exact messages; the resource policies
are shown to see the registered graph (a changed registration fails); and the pack's entry
point packs every policy."""

from __future__ import annotations

import base64
import copy
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pulumi_policy
import pytest
import yaml
from pulumi_policy import EnforcementLevel

from components.userdata import NODE_CONFIG_PATH
from policy.policies import (
    AWS_LAUNCH_TEMPLATE,
    AWS_LOAD_BALANCERS,
    AZURE_LOAD_BALANCER,
    AZURE_SCALE_SET,
    FLEET_TYPE,
    GCP_FORWARDING_RULE,
    GCP_INSTANCE_TEMPLATE,
    GCP_REGION_BACKEND_SERVICE,
    GCP_TPU_VM,
    K8S_CONFIG_MAP,
    K8S_DEPLOYMENT,
    PACK_NAME,
    build_policies,
    cloud_config_files,
    user_data_text,
)

from .support import (
    PROD,
    Stack,
    Violation,
    plain_props,
    resource,
    run_pack,
    run_stack,
    validate_resource,
    validate_stack,
)
from .variants import OVER_BUDGET_MESSAGE, OVER_QUOTA_MESSAGE, over_budget, over_quota

POLICY_DIR = Path(__file__).parents[2] / "policy"
LOAD_BALANCER_TYPES = {
    *AWS_LOAD_BALANCERS,
    AZURE_LOAD_BALANCER,
    GCP_FORWARDING_RULE,
    GCP_REGION_BACKEND_SERVICE,
}
POLICY_NAMES = [
    "fleet-budget",
    "tenant-quota",
    "spot-for-sheddable-pools",
    "allowed-regions-and-families",
    "cost-attribution-tags",
    "agent-authentication",
    "agent-token-secret",
    "no-public-ip",
]


def pack(stack: Stack, policy_config: dict[str, Any] | None = None) -> list[Violation]:
    """`pulumi preview --policy-pack policy` on the stack, offline."""
    return run_pack(
        build_policies(stack_config=lambda: stack.config), stack.resources, policy_config
    )


def fleet_urn(stack: Stack) -> str:
    [fleet] = stack.of_type(FLEET_TYPE)
    return fleet.urn


def test_prod_passes_the_whole_pack(prod: Stack) -> None:
    assert pack(prod) == []


def test_the_pack_judges_what_prod_registers(prod: Stack) -> None:
    # Not vacuous: every cloud's nodes are there with an agent node config in their user data,
    # the Kubernetes pool's node config in a ConfigMap, and the fleet with its outputs.
    with_node_config = [
        r.name
        for r in prod.resources
        if (text := user_data_text(r.resource_type, r.props))
        and NODE_CONFIG_PATH in (cloud_config_files(text) or {})
    ]
    assert len(with_node_config) == 8  # 4 AWS templates, 2 GCP templates, a TPU VM, a scale set
    assert {r.resource_type for r in prod.resources} >= {
        AWS_LAUNCH_TEMPLATE,
        GCP_INSTANCE_TEMPLATE,
        GCP_TPU_VM,
        AZURE_SCALE_SET,
        K8S_DEPLOYMENT,
        K8S_CONFIG_MAP,
    }
    [fleet] = prod.of_type(FLEET_TYPE)
    assert fleet.props["fleet_name"] == "acme-prod"
    assert fleet.props["max_usd_per_month"] == pytest.approx(44273.8284)


def test_dev_passes_with_one_advisory_finding(dev: Stack) -> None:
    # No mandatory violation: a preview of dev succeeds. The CPU pool serves only the batch
    # class (interactive needs 'high' quality) yet runs on-demand: a warning, not a failure.
    assert pack(dev) == [
        Violation(
            "spot-for-sheddable-pools",
            EnforcementLevel.ADVISORY,
            "Pool aws-cpu serves only sheddable classes (batch) but runs on-demand: set spot: "
            "true. At its 3 max replicas it costs 178.70 USD/month on-demand, 85.85 USD/month "
            "on spot.",
            fleet_urn(dev),
        )
    ]


def test_an_over_budget_prod_fails() -> None:
    stack = run_stack(PROD, over_budget)
    assert pack(stack) == [
        Violation("fleet-budget", EnforcementLevel.MANDATORY, OVER_BUDGET_MESSAGE, fleet_urn(stack))
    ]


def test_an_over_quota_prod_fails() -> None:
    stack = run_stack(PROD, over_quota)
    assert pack(stack) == [
        Violation("tenant-quota", EnforcementLevel.MANDATORY, OVER_QUOTA_MESSAGE, fleet_urn(stack))
    ]


def test_a_program_that_deploys_another_fleet_than_its_config_fails(prod: Stack) -> None:
    # prod's registered fleet judged against the over-budget config: the InferenceFleet's
    # registered cost does not match the config, and the config is over budget.
    config = copy.deepcopy(prod.config)
    over_budget(config)
    violations = pack(Stack(config, prod.resources))
    assert [(v.policy, v.urn) for v in violations] == [
        ("fleet-budget", fleet_urn(prod)),
        ("fleet-budget", fleet_urn(prod)),
    ]
    assert violations[0].message.startswith(
        "InferenceFleet acme costs 44273.83 USD/month at max replicas, but the stack config "
        "gives 97899.63 USD/month"
    )


def test_resource_policies_see_the_registered_resources(prod: Stack) -> None:
    # Policy config reaches the policies: with only westeurope allowed for Azure, every Azure
    # resource of prod is named.
    found = pack(
        prod, {"allowed-regions-and-families": {"allowedRegions": {"azure": ["westeurope"]}}}
    )
    assert sorted(v.urn.rsplit("::", 1)[1] for v in found if v.urn) == [
        "acme-azure-eus-a100-lb",
        "acme-azure-eus-a100-nsg",
        "acme-azure-eus-a100-vmss",
    ]
    assert {v.policy for v in found} == {"allowed-regions-and-families"}


def test_a_tampered_registration_fails(prod: Stack) -> None:
    # A registered launch template whose node config carries a plaintext key instead of its
    # digest is refused; so is prod's agent Deployment without its token Secret.
    [template, *_] = prod.of_type(AWS_LAUNCH_TEMPLATE)
    props = plain_props(template)
    text = base64.b64decode(props["userData"]).decode()
    document = yaml.safe_load(text)
    [node] = [f for f in document["write_files"] if f["path"] == NODE_CONFIG_PATH]
    config = json.loads(node["content"])
    config["tenants"][0]["key_sha256"] = ["prod-key-search"]
    node["content"] = json.dumps(config)
    props["userData"] = base64.b64encode(
        ("#cloud-config\n" + yaml.safe_dump(document, sort_keys=False)).encode()
    ).decode()
    [policy] = [p for p in build_policies(stack_config=dict) if p.name == "agent-authentication"]
    assert validate_resource(policy, AWS_LAUNCH_TEMPLATE, props, name=template.name) == [
        f"{template.name} ({AWS_LAUNCH_TEMPLATE}): {NODE_CONFIG_PATH}: tenant "
        f"{config['tenants'][0]['name']}: 1 key_sha256 entry is not a SHA-256 hex digest "
        "(a plaintext key?)"
    ]

    agents = [d for d in prod.of_type(K8S_DEPLOYMENT) if "agent" in d.name]
    [agent] = agents
    deployment = plain_props(agent)
    del deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    others = [r for r in prod.resources if r.urn != agent.urn]
    [token_policy] = [
        p for p in build_policies(stack_config=dict) if p.name == "agent-token-secret"
    ]
    assert validate_stack(token_policy, prod.resources) == []
    assert validate_stack(
        token_policy, [*others, resource(K8S_DEPLOYMENT, deployment, name=agent.name)]
    ) == [
        (
            "agent container agent gets FLEETFORM_FLEET_TOKEN from no Secret of the stack that "
            "holds it: the agent would run without its fleet token",
            f"urn:pulumi:test::fleetform::{K8S_DEPLOYMENT}::{agent.name}",
        )
    ]


def test_the_pools_load_balancers_are_judged_and_a_public_one_is_refused(prod: Stack) -> None:
    # prod registers an internal load balancer per VM pool (none for the TPU pool); each passes
    # no-public-ip as registered, and fails once turned internet-facing.
    [policy] = [p for p in build_policies(stack_config=dict) if p.name == "no-public-ip"]
    balancers = sorted(
        (r for r in prod.resources if r.resource_type in LOAD_BALANCER_TYPES),
        key=lambda r: (r.resource_type, r.name),
    )
    assert [(r.resource_type.split(":")[-1], r.name) for r in balancers] == [
        ("LoadBalancer", "acme-aws-use1-a10g-nlb"),
        ("LoadBalancer", "acme-aws-use1-a10g-spot-nlb"),
        ("LoadBalancer", "acme-aws-use1-cpu-nlb"),
        ("LoadBalancer", "acme-aws-usw2-inf2-nlb"),
        ("LoadBalancer", "acme-azure-eus-a100-lb"),
        ("ForwardingRule", "acme-gcp-usc1-l4-fr"),
        ("ForwardingRule", "acme-gcp-usc1-l4-spot-fr"),
        ("RegionBackendService", "acme-gcp-usc1-l4-be"),
        ("RegionBackendService", "acme-gcp-usc1-l4-spot-be"),
    ]
    for r in balancers:
        assert validate_resource(policy, r.resource_type, plain_props(r), name=r.name) == []

    def tampered(r: Any) -> dict[str, Any]:
        props = plain_props(r)
        if r.resource_type == AZURE_LOAD_BALANCER:
            frontend = props["frontendIPConfigurations"][0]
            del frontend["subnet"], frontend["privateIPAllocationMethod"]
            frontend["publicIPAddress"] = {"id": "pip"}
        elif "internal" in props:
            props["internal"] = False
        else:
            props["loadBalancingScheme"] = "EXTERNAL"
        return props

    found = [
        message
        for r in balancers
        for message in validate_resource(policy, r.resource_type, tampered(r), name=r.name)
    ]
    assert len(found) == len(balancers)
    assert found[4] == (
        f"acme-azure-eus-a100-lb ({AZURE_LOAD_BALANCER}): frontendIPConfigurations[0] (agent): "
        "publicIPAddress makes the load balancer public"
    )
    assert found[5] == (
        f"acme-gcp-usc1-l4-fr ({GCP_FORWARDING_RULE}): loadBalancingScheme is EXTERNAL: an "
        "external load balancer; use INTERNAL"
    )


# --------------------------------------------------------------------------------------------
# The pack itself


def test_the_entry_point_packs_every_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    # PolicyPack serves gRPC forever: record its arguments instead.
    packed: dict[str, Any] = {}

    def record(**kwargs: Any) -> None:
        packed.update(kwargs)

    monkeypatch.setattr(pulumi_policy, "PolicyPack", record)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the entry point adds the project root
    runpy.run_path(str(POLICY_DIR / "__main__.py"), run_name="__main__")
    assert packed["name"] == PACK_NAME == "fleetform"
    assert packed["enforcement_level"] == EnforcementLevel.MANDATORY
    assert [p.name for p in packed["policies"]] == POLICY_NAMES


def test_the_pack_runs_on_python_in_the_projects_virtualenv() -> None:
    manifest = yaml.safe_load((POLICY_DIR / "PulumiPolicy.yaml").read_text(encoding="utf-8"))
    assert manifest["runtime"]["name"] == "python"
    venv = POLICY_DIR / manifest["runtime"]["options"]["virtualenv"]
    assert venv.resolve() == (POLICY_DIR.parent / ".venv").resolve()
