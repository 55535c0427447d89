"""The policies judged on resources: `allowed-regions-and-families`, `cost-attribution-tags`,
`agent-authentication`, `agent-token-secret`, `no-public-ip`. Each passes on the shapes the
components register (built here from the components' own pure renderers: cloud-init documents,
Kubernetes manifests, cost tags) and fails on a changed copy, with the exact message."""

from __future__ import annotations

import base64
import copy
import functools
import json
from collections.abc import Callable
from typing import Any

import pytest
from components.support import DEV_ENV, PROD_KEYS, load_stack
from pulumi_policy import Policy
from pulumi_policy.proxy import UNKNOWN_STRING_VALUE, UnknownValueError

from components import k8s_manifests, naming
from components.plan import key_digests, plan_pool, with_key_digests
from components.settings import AgentSettings
from components.userdata import (
    ENV_FILE_PATH,
    NODE_CONFIG_PATH,
    base64_user_data,
    cloud_config,
    node_config_data,
    render_user_data,
)
from policy.policies import (
    AWS_AUTOSCALING_GROUP,
    AWS_LAUNCH_TEMPLATE,
    AZURE_SCALE_SET,
    GCP_INSTANCE_TEMPLATE,
    GCP_TPU_VM,
    K8S_CONFIG_MAP,
    K8S_DEPLOYMENT,
    K8S_SECRET,
    K8S_SERVICE,
    build_policies,
    instance_family,
    node_type_cloud,
)
from runtime.catalog import default_catalog

from .support import DEV, PROD, resource, validate_resource, validate_stack

TOKEN = "fleet-token-0123456789"
CONTROLLER = "https://fleetform-controller.prod.acme.internal"
POLICIES = {p.name: p for p in build_policies(stack_config=dict)}


def check(name: str) -> Policy:
    return POLICIES[name]


def tags(style: naming.TagStyle) -> dict[str, str]:
    return naming.cost_tags(
        style, fleet="acme-dev", pool="aws-a10g", model="llama-3-1-8b", tenant="shared"
    )


@functools.cache
def _dev_node_config(controller_url: str | None) -> dict[str, Any]:
    spec, _ = load_stack(DEV)
    spec = with_key_digests(spec, key_digests(spec, {}, DEV_ENV))
    return node_config_data(
        spec,
        "aws-a10g",
        agent=AgentSettings(),
        controller_url=controller_url,
        catalog=default_catalog(),
    )


def dev_node_config(*, controller_url: str | None = CONTROLLER) -> dict[str, Any]:
    """A real node config of dev's aws-a10g pool: keys resolved to digests as the fleet does."""
    return copy.deepcopy(_dev_node_config(controller_url))


def user_data(
    config: dict[str, Any] | None = None,
    *,
    token: str | None = TOKEN,
    tamper: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    document = cloud_config(
        config if config is not None else dev_node_config(),
        provider="aws",
        agent=AgentSettings(),
        fleet_token=token,
    )
    if tamper is not None:
        tamper(document)
    return render_user_data(document)


def launch_template(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "region": "us-east-1",
        "instanceType": "g5.xlarge",
        "userData": base64_user_data(user_data()),
        "networkInterfaces": [{"deviceIndex": 0, "associatePublicIpAddress": "false"}],
        "tags": tags("aws"),
        "tagSpecifications": [
            {"resourceType": "instance", "tags": tags("aws")},
            {"resourceType": "volume", "tags": tags("aws")},
        ],
    }
    props.update(changes)
    return props


def autoscaling_group(propagate: bool = True) -> dict[str, Any]:
    return {
        "region": "us-east-1",
        "maxSize": 10.0,  # numbers arrive as floats from the engine
        "tags": [
            {"key": k, "value": v, "propagateAtLaunch": propagate} for k, v in tags("aws").items()
        ],
        "mixedInstancesPolicy": {"launchTemplate": {"overrides": [{"instanceType": "g5.xlarge"}]}},
    }


def instance_template(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "machineType": "g2-standard-8",
        "labels": tags("gcp"),
        "metadata": {"user-data": user_data(), "enable-oslogin": "TRUE"},
        "networkInterfaces": [{"network": "inference", "subnetwork": "inference-usc1"}],
    }
    props.update(changes)
    return props


def tpu_vm(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "zone": "us-central1-a",
        "acceleratorType": "v5litepod-4",
        "labels": tags("gcp"),
        "metadata": {"user-data": user_data()},
        "networkConfig": {"network": "inference", "enableExternalIps": False},
    }
    props.update(changes)
    return props


def scale_set(
    *, location: str = "eastus", public_ip: bool = False, custom_data: str | None = None
) -> dict[str, Any]:
    ip_configuration: dict[str, Any] = {"name": "primary", "primary": True, "subnet": {"id": "s"}}
    if public_ip:
        ip_configuration["publicIPAddressConfiguration"] = {"name": "pip"}
    return {
        "location": location,
        "sku": {"name": "Standard_NC24ads_A100_v4", "tier": "Standard", "capacity": 1.0},
        "tags": tags("azure"),
        "virtualMachineProfile": {
            "priority": "Regular",
            "osProfile": {"customData": custom_data or base64_user_data(user_data())},
            "networkProfile": {
                "networkInterfaceConfigurations": [
                    {"name": "primary", "ipConfigurations": [ip_configuration]}
                ]
            },
        },
    }


@functools.cache
def prod_k8s_pool() -> tuple[Any, Any]:
    spec, _ = load_stack(PROD)
    spec = with_key_digests(spec, key_digests(spec, PROD_KEYS))
    return spec, plan_pool(spec, spec.pool("k8s-eks-l4"), default_catalog())


NAMESPACE = "fleetform-acme-prod"
OBJECT = "acme-prod-k8s-eks-l4"


def agent_deployment(*, secret: str | None = OBJECT) -> dict[str, Any]:
    spec, plan = prod_k8s_pool()
    return k8s_manifests.agent_deployment(
        spec,
        plan,
        ns=NAMESPACE,
        image="registry.acme.internal/fleetform/fleetform:0.1.0",
        upstream_image="vllm/vllm-openai:v0.6.3",
        port=8080,
        config_map=OBJECT,
        secret=secret,
        drain_timeout_s=30,
    )


def agent_config_map(config: dict[str, Any] | None = None) -> dict[str, Any]:
    _, plan = prod_k8s_pool()
    node = config if config is not None else dev_node_config()
    return k8s_manifests.config_map(
        OBJECT, NAMESPACE, k8s_manifests.agent_labels(plan), {"node.json": json.dumps(node)}
    )


def agent_secret(data: dict[str, str] | None = None) -> dict[str, Any]:
    _, plan = prod_k8s_pool()
    return k8s_manifests.secret(
        OBJECT,
        NAMESPACE,
        k8s_manifests.agent_labels(plan),
        data if data is not None else {k8s_manifests.FLEET_TOKEN_ENV: TOKEN},
    )


# --------------------------------------------------------------------------------------------
# allowed-regions-and-families


def test_instance_families() -> None:
    assert instance_family("aws", "g5.xlarge") == "g5"
    assert instance_family("aws", "p6-b200.48xlarge") == "p6-b200"
    assert instance_family("gcp", "g2-standard-8") == "g2"
    assert instance_family("gcp", "tpu-v5litepod-4") == "tpu-v5litepod"
    assert instance_family("azure", "Standard_NC24ads_A100_v4") == "Standard_NCads_A100_v4"
    assert instance_family("azure", "Standard_D8s_v5") == "Standard_Ds_v5"
    assert [node_type_cloud(t) for t in ("g6.xlarge", "g2-standard-8", "Standard_D8s_v5")] == [
        "aws",
        "gcp",
        "azure",
    ]


def test_regions_and_families_pass_with_the_defaults() -> None:
    policy = check("allowed-regions-and-families")
    for resource_type, props in (
        (AWS_LAUNCH_TEMPLATE, launch_template()),
        (AWS_AUTOSCALING_GROUP, autoscaling_group()),
        (GCP_INSTANCE_TEMPLATE, instance_template()),
        (GCP_TPU_VM, tpu_vm()),
        (AZURE_SCALE_SET, scale_set()),
        (K8S_DEPLOYMENT, agent_deployment()),
    ):
        assert validate_resource(policy, resource_type, props) == [], resource_type


def test_regions_and_families_fail_outside_the_lists() -> None:
    policy = check("allowed-regions-and-families")
    old = launch_template(region="eu-west-1", instanceType="p3.8xlarge")
    assert validate_resource(policy, AWS_LAUNCH_TEMPLATE, old, name="lt") == [
        f"lt ({AWS_LAUNCH_TEMPLATE}): region eu-west-1 is not an allowed aws region "
        "(us-east-1, us-east-2, us-west-2)",
        f"lt ({AWS_LAUNCH_TEMPLATE}): instance type p3.8xlarge (family p3) is not an allowed aws "
        "instance family (g5, g6, g6e, p4d, p5, p5e, inf2, trn1, m7g, c7g, r7g)",
    ]
    assert validate_resource(
        policy, GCP_TPU_VM, tpu_vm(zone="europe-west4-a", acceleratorType="v4-8"), name="tpu"
    ) == [
        f"tpu ({GCP_TPU_VM}): region europe-west4 is not an allowed gcp region (us-central1, "
        "us-east1, us-east4, us-east5, us-south1, us-west1, us-west4)",
        f"tpu ({GCP_TPU_VM}): instance type tpu-v4-8 (family tpu-v4) is not an allowed gcp "
        "instance family (g2, a2, a3, n2, c3, tpu-v5litepod, tpu-v5p, tpu-v6e)",
    ]
    [message] = validate_resource(
        policy, AZURE_SCALE_SET, scale_set(location="westeurope"), name="vmss"
    )
    assert message.startswith(f"vmss ({AZURE_SCALE_SET}): region westeurope is not an allowed ")
    deployment = agent_deployment()
    deployment["spec"]["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] = (
        "g4dn.xlarge"
    )
    [message] = validate_resource(policy, K8S_DEPLOYMENT, deployment, name="agent")
    assert message == (
        f"agent ({K8S_DEPLOYMENT}): node type g4dn.xlarge (family g4dn) is not an allowed aws "
        "instance family (g5, g6, g6e, p4d, p5, p5e, inf2, trn1, m7g, c7g, r7g)"
    )


def test_regions_and_families_are_policy_config() -> None:
    policy = check("allowed-regions-and-families")
    config = {"allowedRegions": {"aws": ["eu-*"]}, "allowedInstanceFamilies": {"aws": ["p3"]}}
    eu = launch_template(region="eu-west-1", instanceType="p3.8xlarge")
    assert validate_resource(policy, AWS_LAUNCH_TEMPLATE, eu, config=config) == []
    assert validate_resource(policy, AWS_LAUNCH_TEMPLATE, launch_template(), config=config) == [
        f"r ({AWS_LAUNCH_TEMPLATE}): region us-east-1 is not an allowed aws region (eu-*)",
        f"r ({AWS_LAUNCH_TEMPLATE}): instance type g5.xlarge (family g5) is not an allowed aws "
        "instance family (p3)",
    ]
    # A cloud the config does not name keeps its defaults.
    assert validate_resource(policy, AZURE_SCALE_SET, scale_set(), config=config) == []
    # The schema the engine validates the config against, with the defaults.
    schema = policy.config_schema
    assert schema is not None
    assert sorted(schema.properties) == ["allowedInstanceFamilies", "allowedRegions"]
    assert schema.properties["allowedRegions"]["default"]["azure"][0] == "eastus"


# --------------------------------------------------------------------------------------------
# cost-attribution-tags


def test_cost_tags_pass_on_every_instance_bearing_resource() -> None:
    policy = check("cost-attribution-tags")
    for resource_type, props in (
        (AWS_LAUNCH_TEMPLATE, launch_template()),
        (AWS_AUTOSCALING_GROUP, autoscaling_group()),
        (GCP_INSTANCE_TEMPLATE, instance_template()),
        (GCP_TPU_VM, tpu_vm()),
        (AZURE_SCALE_SET, scale_set()),
        (K8S_DEPLOYMENT, agent_deployment()),
    ):
        assert validate_resource(policy, resource_type, props) == [], resource_type


def test_cost_tags_fail_when_missing() -> None:
    policy = check("cost-attribution-tags")
    partial = {
        k: v for k, v in tags("aws").items() if k not in ("fleetform:pool", "fleetform:tenant")
    }
    template = launch_template(tagSpecifications=[{"resourceType": "instance", "tags": partial}])
    assert validate_resource(policy, AWS_LAUNCH_TEMPLATE, template, name="lt") == [
        f"lt ({AWS_LAUNCH_TEMPLATE}): missing cost-attribution tag(s) fleetform:pool, "
        "fleetform:tenant on the instances it launches"
    ]
    untagged = launch_template(tagSpecifications=[])
    assert validate_resource(policy, AWS_LAUNCH_TEMPLATE, untagged, name="lt") == [
        f"lt ({AWS_LAUNCH_TEMPLATE}): no tagSpecifications for resourceType instance: "
        "instances untagged"
    ]
    assert validate_resource(
        policy, AWS_AUTOSCALING_GROUP, autoscaling_group(propagate=False), name="asg"
    ) == [
        f"asg ({AWS_AUTOSCALING_GROUP}): missing cost-attribution tag(s) fleetform:fleet, "
        "fleetform:pool, fleetform:model, fleetform:tenant propagated at launch"
    ]
    labels = {**tags("gcp"), "fleetform-model": ""}
    assert validate_resource(
        policy, GCP_INSTANCE_TEMPLATE, instance_template(labels=labels), name="tpl"
    ) == [
        f"tpl ({GCP_INSTANCE_TEMPLATE}): missing cost-attribution tag(s) fleetform-model (labels)"
    ]
    deployment = agent_deployment()
    del deployment["spec"]["template"]["metadata"]["labels"]["fleetform/tenant"]
    assert validate_resource(policy, K8S_DEPLOYMENT, deployment, name="agent") == [
        f"agent ({K8S_DEPLOYMENT}): missing cost-attribution tag(s) fleetform/tenant on its pod "
        "template"
    ]


def test_cost_tags_skip_what_bears_no_instance() -> None:
    # The controller's Deployment runs no agent and requests no accelerator.
    spec, _ = prod_k8s_pool()
    controller = k8s_manifests.controller_deployment(
        spec,
        ns=NAMESPACE,
        image="i",
        port=8700,
        config_map_name="c",
        secret_name="s",
        pvc_name="p",
    )
    assert validate_resource(check("cost-attribution-tags"), K8S_DEPLOYMENT, controller) == []
    assert validate_resource(check("cost-attribution-tags"), K8S_SECRET, agent_secret()) == []


# --------------------------------------------------------------------------------------------
# agent-authentication


def test_agent_authentication_passes_real_node_configs() -> None:
    policy = check("agent-authentication")
    for resource_type, props in (
        (AWS_LAUNCH_TEMPLATE, launch_template()),
        (GCP_INSTANCE_TEMPLATE, instance_template()),
        (GCP_TPU_VM, tpu_vm()),
        (AZURE_SCALE_SET, scale_set()),
        (K8S_CONFIG_MAP, agent_config_map()),
        (K8S_DEPLOYMENT, agent_deployment()),
    ):
        assert validate_resource(policy, resource_type, props) == [], resource_type
    # No controller, no token needed (dev).
    no_push = user_data(dev_node_config(controller_url=None), token=None)
    assert validate_resource(policy, GCP_TPU_VM, tpu_vm(metadata={"user-data": no_push})) == []


def node_config_with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    config = copy.deepcopy(dev_node_config())
    change(config)
    return config


def test_agent_authentication_fails_on_keys_that_are_not_digests() -> None:
    policy = check("agent-authentication")

    def plaintext(config: dict[str, Any]) -> None:
        config["tenants"][0]["key_sha256"] = ["sk-live-0123456789"]
        config["tenants"][1]["key_sha256"] = []
        config["tenants"][1]["api_keys"] = ["dev-key-data"]

    text = user_data(node_config_with(plaintext))
    template = instance_template(metadata={"user-data": text})
    assert validate_resource(policy, GCP_INSTANCE_TEMPLATE, template, name="tpl") == [
        f"tpl ({GCP_INSTANCE_TEMPLATE}): {NODE_CONFIG_PATH}: tenant app-team: 1 key_sha256 entry "
        "is not a SHA-256 hex digest (a plaintext key?)",
        f"tpl ({GCP_INSTANCE_TEMPLATE}): {NODE_CONFIG_PATH}: tenant data-team: api_keys in a node "
        "config (only key_sha256 digests belong there)",
        f"tpl ({GCP_INSTANCE_TEMPLATE}): {NODE_CONFIG_PATH}: tenant data-team: no key digests "
        "(key_sha256 is empty)",
    ]
    # The same node config in a Kubernetes ConfigMap.
    assert validate_resource(
        policy, K8S_CONFIG_MAP, agent_config_map(node_config_with(plaintext)), name="cm"
    ) == [
        f"cm ({K8S_CONFIG_MAP}): data.node.json: tenant app-team: 1 key_sha256 entry is not a "
        "SHA-256 hex digest (a plaintext key?)",
        f"cm ({K8S_CONFIG_MAP}): data.node.json: tenant data-team: api_keys in a node config "
        "(only key_sha256 digests belong there)",
        f"cm ({K8S_CONFIG_MAP}): data.node.json: tenant data-team: no key digests (key_sha256 is "
        "empty)",
    ]


def test_agent_authentication_fails_without_the_fleet_token() -> None:
    policy = check("agent-authentication")

    def no_token_env(config: dict[str, Any]) -> None:
        config["fleet_token_env"] = None

    text = base64_user_data(user_data(node_config_with(no_token_env)))
    assert validate_resource(
        policy, AWS_LAUNCH_TEMPLATE, launch_template(userData=text), name="lt"
    ) == [
        f"lt ({AWS_LAUNCH_TEMPLATE}): {NODE_CONFIG_PATH}: pushes to the controller at {CONTROLLER} "
        "without a fleet token (fleet_token_env is not set)"
    ]
    # The config names the variable but the node never gets the token.
    text = base64_user_data(user_data(token=None))
    assert validate_resource(
        policy, AWS_LAUNCH_TEMPLATE, launch_template(userData=text), name="lt"
    ) == [
        f"lt ({AWS_LAUNCH_TEMPLATE}): fleet_token_env FLEETFORM_FLEET_TOKEN is set by no "
        "environment file of the agent's unit: the agent would run without its fleet token"
    ]

    def world_readable(document: dict[str, Any]) -> None:
        for entry in document["write_files"]:
            if entry["path"] == ENV_FILE_PATH:
                entry["permissions"] = "0644"

    text = base64_user_data(user_data(tamper=world_readable))
    assert validate_resource(policy, AZURE_SCALE_SET, scale_set(custom_data=text), name="vmss") == [
        f"vmss ({AZURE_SCALE_SET}): {ENV_FILE_PATH} holds the fleet token with permissions 0644"
    ]


def test_agent_authentication_fails_on_tokens_in_clear_in_kubernetes() -> None:
    policy = check("agent-authentication")
    config_map = agent_config_map()
    config_map["data"][k8s_manifests.FLEET_TOKEN_ENV] = TOKEN
    assert validate_resource(policy, K8S_CONFIG_MAP, config_map, name="cm") == [
        f"cm ({K8S_CONFIG_MAP}): data.FLEETFORM_FLEET_TOKEN: a token in a ConfigMap (put it in a "
        "Secret)"
    ]
    deployment = agent_deployment()
    agent = deployment["spec"]["template"]["spec"]["containers"][0]
    agent["env"].append({"name": k8s_manifests.FLEET_TOKEN_ENV, "value": TOKEN})
    assert validate_resource(policy, K8S_DEPLOYMENT, deployment, name="agent") == [
        f"agent ({K8S_DEPLOYMENT}): container agent: FLEETFORM_FLEET_TOKEN is set in clear in the "
        "pod spec (take it from a Secret)"
    ]


def test_user_data_of_something_else_is_not_judged() -> None:
    plain = base64_user_data("#!/bin/sh\necho hello\n")
    assert (
        validate_resource(
            check("agent-authentication"), AWS_LAUNCH_TEMPLATE, launch_template(userData=plain)
        )
        == []
    )


def test_unknown_values_are_left_to_the_engine() -> None:
    # In a preview a value computed by another resource is unknown: the SDK reports "can't run
    # policy during preview" (advisory) and the policy runs again at `pulumi up`.
    unknown = launch_template(userData=UNKNOWN_STRING_VALUE)
    with pytest.raises(UnknownValueError) as raised:
        validate_resource(check("agent-authentication"), AWS_LAUNCH_TEMPLATE, unknown)
    assert raised.value.message == "string value at .userData can't be known during preview"


# --------------------------------------------------------------------------------------------
# agent-token-secret


def k8s_pool(
    deployment: dict[str, Any] | None = None,
    config_map: dict[str, Any] | None = None,
    secret: dict[str, Any] | None = None,
    *,
    without: tuple[str, ...] = (),
) -> list[Any]:
    """An agent Deployment with its ConfigMap and Secret (less the kinds in `without`)."""
    found = [resource(K8S_DEPLOYMENT, deployment or agent_deployment(), name="agent")]
    if "config_map" not in without:
        found.append(resource(K8S_CONFIG_MAP, config_map or agent_config_map(), name="config"))
    if "secret" not in without:
        found.append(resource(K8S_SECRET, secret or agent_secret(), name="keys"))
    return found


AGENT_URN = f"urn:pulumi:test::fleetform::{K8S_DEPLOYMENT}::agent"


def test_agent_token_secret_passes_with_the_secret() -> None:
    policy = check("agent-token-secret")
    assert validate_stack(policy, k8s_pool()) == []
    # A node config that pushes nowhere needs no token.
    quiet = agent_config_map(dev_node_config(controller_url=None))
    unused = k8s_pool(agent_deployment(secret=None), quiet, without=("secret",))
    assert validate_stack(policy, unused) == []
    # env valueFrom secretKeyRef works as well as envFrom.
    deployment = agent_deployment(secret=None)
    deployment["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {
            "name": k8s_manifests.FLEET_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": OBJECT, "key": "token"}},
        }
    )
    assert validate_stack(policy, k8s_pool(deployment, secret=agent_secret({"token": TOKEN}))) == []
    # A Secret as the API server returns it (a preview's dry run): base64 `data`.
    encoded = agent_secret({})
    del encoded["stringData"]
    encoded["data"] = {k8s_manifests.FLEET_TOKEN_ENV: base64.b64encode(TOKEN.encode()).decode()}
    assert validate_stack(policy, k8s_pool(secret=encoded)) == []


def test_agent_token_secret_fails_without_the_secret() -> None:
    policy = check("agent-token-secret")
    missing = (
        "agent container agent gets FLEETFORM_FLEET_TOKEN from no Secret of the stack that holds "
        "it: the agent would run without its fleet token"
    )
    assert validate_stack(policy, k8s_pool(agent_deployment(secret=None))) == [(missing, AGENT_URN)]
    assert validate_stack(policy, k8s_pool(without=("secret",))) == [(missing, AGENT_URN)]
    assert validate_stack(policy, k8s_pool(secret=agent_secret({"OTHER": "x"}))) == [
        (missing, AGENT_URN)
    ]
    assert validate_stack(policy, k8s_pool(without=("config_map",))) == [
        (
            f"agent container agent mounts ConfigMap {NAMESPACE}/{OBJECT}, which this stack does "
            "not define: its node config cannot be checked",
            AGENT_URN,
        )
    ]


# --------------------------------------------------------------------------------------------
# no-public-ip


def service(kind: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    _, plan = prod_k8s_pool()
    manifest = k8s_manifests.agent_service(plan, ns=NAMESPACE, port=8080)
    manifest["spec"]["type"] = kind
    if annotations:
        manifest["metadata"]["annotations"] = annotations
    return manifest


def test_no_public_ip_passes_private_nodes_and_internal_services() -> None:
    policy = check("no-public-ip")
    for resource_type, props in (
        (AWS_LAUNCH_TEMPLATE, launch_template()),
        (GCP_INSTANCE_TEMPLATE, instance_template()),
        (GCP_TPU_VM, tpu_vm()),
        (AZURE_SCALE_SET, scale_set()),
        (K8S_SERVICE, service("ClusterIP")),
        (
            K8S_SERVICE,
            service(
                "LoadBalancer", {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}
            ),
        ),
        (
            K8S_SERVICE,
            service("LoadBalancer", {"networking.gke.io/load-balancer-type": "Internal"}),
        ),
    ):
        assert validate_resource(policy, resource_type, props) == [], resource_type


def test_no_public_ip_fails_public_addresses() -> None:
    policy = check("no-public-ip")
    public = launch_template(
        networkInterfaces=[{"deviceIndex": 0, "associatePublicIpAddress": "true"}]
    )
    assert validate_resource(policy, AWS_LAUNCH_TEMPLATE, public, name="lt") == [
        f"lt ({AWS_LAUNCH_TEMPLATE}): networkInterfaces[0].associatePublicIpAddress is true: it "
        "must be false"
    ]
    assert validate_resource(
        policy, AWS_LAUNCH_TEMPLATE, launch_template(networkInterfaces=[]), name="lt"
    ) == [
        f"lt ({AWS_LAUNCH_TEMPLATE}): no networkInterfaces: whether nodes get a public IP is left "
        "to the subnet's default; declare the interface with associatePublicIpAddress false"
    ]
    nat = instance_template(networkInterfaces=[{"network": "n", "accessConfigs": [{}]}])
    assert validate_resource(policy, GCP_INSTANCE_TEMPLATE, nat, name="tpl") == [
        f"tpl ({GCP_INSTANCE_TEMPLATE}): networkInterfaces[0].accessConfigs gives an external IP"
    ]
    tpu = tpu_vm(networkConfig={"enableExternalIps": True})
    assert validate_resource(policy, GCP_TPU_VM, tpu, name="tpu") == [
        f"tpu ({GCP_TPU_VM}): networkConfig.enableExternalIps is true"
    ]
    assert validate_resource(policy, AZURE_SCALE_SET, scale_set(public_ip=True), name="vmss") == [
        f"vmss ({AZURE_SCALE_SET}): network interface primary, ip configuration primary: "
        "publicIPAddressConfiguration gives a public IP"
    ]
    [message] = validate_resource(policy, K8S_SERVICE, service("LoadBalancer"), name="svc")
    assert message.startswith(
        f"svc ({K8S_SERVICE}): type LoadBalancer without an internal load-balancer annotation ("
    )
    assert validate_resource(policy, K8S_SERVICE, service("NodePort"), name="svc") == [
        f"svc ({K8S_SERVICE}): type NodePort opens the port on every node's address"
    ]


# Load balancers: the internal shapes the pool components register (wire names), and each
# cloud's way of turning one internet-facing.

AWS_NLB = "aws:lb/loadBalancer:LoadBalancer"
GCP_FORWARDING_RULE = "gcp:compute/forwardingRule:ForwardingRule"
GCP_BACKEND_SERVICE = "gcp:compute/regionBackendService:RegionBackendService"
AZURE_LB = "azure-native:network:LoadBalancer"


def nlb(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "region": "us-east-1",
        "internal": True,
        "loadBalancerType": "network",
        "subnets": ["subnet-1", "subnet-2"],
        "tags": tags("aws"),
    }
    props.update(changes)
    return props


def forwarding_rule(**changes: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "region": "us-central1",
        "loadBalancingScheme": "INTERNAL",
        "ipProtocol": "TCP",
        "ports": ["8080"],
        "subnetwork": "inference-usc1",
        "backendService": "be",
    }
    props.update(changes)
    return props


def azure_lb(**frontend_changes: Any) -> dict[str, Any]:
    frontend: dict[str, Any] = {
        "name": "agent",
        "subnet": {"id": "s"},
        "privateIPAllocationMethod": "Dynamic",
    }
    frontend.update(frontend_changes)
    return {
        "location": "eastus",
        "sku": {"name": "Standard", "tier": "Regional"},
        "frontendIPConfigurations": [frontend],
        "tags": tags("azure"),
    }


def test_no_public_ip_passes_internal_load_balancers() -> None:
    policy = check("no-public-ip")
    for resource_type, props in (
        (AWS_NLB, nlb()),
        ("aws:alb/loadBalancer:LoadBalancer", nlb(loadBalancerType="application")),
        (GCP_FORWARDING_RULE, forwarding_rule()),
        (GCP_FORWARDING_RULE, forwarding_rule(loadBalancingScheme="INTERNAL_MANAGED")),
        # A Private Service Connect endpoint: scheme "" and an internal address.
        (GCP_FORWARDING_RULE, forwarding_rule(loadBalancingScheme="", target="all-apis")),
        (GCP_BACKEND_SERVICE, {"loadBalancingScheme": "INTERNAL", "protocol": "TCP"}),
        # Unset on a regional backend service: INTERNAL is the provider's default.
        (GCP_BACKEND_SERVICE, {"protocol": "TCP"}),
        (AZURE_LB, azure_lb()),
    ):
        assert validate_resource(policy, resource_type, props) == [], (resource_type, props)


def test_no_public_ip_fails_an_internet_facing_aws_load_balancer() -> None:
    policy = check("no-public-ip")
    assert validate_resource(policy, AWS_NLB, nlb(internal=False), name="nlb") == [
        f"nlb ({AWS_NLB}): internal is False: the load balancer is internet-facing; set internal "
        "true"
    ]
    # Unset is internet-facing too (the AWS default).
    unset = nlb()
    del unset["internal"]
    assert validate_resource(policy, AWS_NLB, unset, name="nlb") == [
        f"nlb ({AWS_NLB}): internal is unset: the load balancer is internet-facing; set internal "
        "true"
    ]
    classic = "aws:elb/loadBalancer:LoadBalancer"
    assert validate_resource(policy, classic, {"internal": False}, name="elb") == [
        f"elb ({classic}): internal is False: the load balancer is internet-facing; set internal "
        "true"
    ]


def test_no_public_ip_fails_an_external_gcp_scheme() -> None:
    policy = check("no-public-ip")
    external = forwarding_rule(loadBalancingScheme="EXTERNAL")
    assert validate_resource(policy, GCP_FORWARDING_RULE, external, name="fr") == [
        f"fr ({GCP_FORWARDING_RULE}): loadBalancingScheme is EXTERNAL: an external load balancer; "
        "use INTERNAL"
    ]
    # A forwarding rule without a scheme is EXTERNAL (the provider's default).
    unset = forwarding_rule()
    del unset["loadBalancingScheme"]
    assert validate_resource(policy, GCP_FORWARDING_RULE, unset, name="fr") == [
        f"fr ({GCP_FORWARDING_RULE}): loadBalancingScheme is unset (so EXTERNAL): an external "
        "load balancer; use INTERNAL"
    ]
    managed = {"loadBalancingScheme": "EXTERNAL_MANAGED", "protocol": "HTTP"}
    assert validate_resource(policy, GCP_BACKEND_SERVICE, managed, name="be") == [
        f"be ({GCP_BACKEND_SERVICE}): loadBalancingScheme is EXTERNAL_MANAGED: an external load "
        "balancer; use INTERNAL"
    ]
    global_rule = "gcp:compute/globalForwardingRule:GlobalForwardingRule"
    assert validate_resource(policy, global_rule, {"target": "proxy"}, name="gfr") == [
        f"gfr ({global_rule}): loadBalancingScheme is unset (so EXTERNAL): an external load "
        "balancer; use INTERNAL"
    ]


def test_no_public_ip_fails_an_azure_public_frontend() -> None:
    policy = check("no-public-ip")
    public = azure_lb(publicIPAddress={"id": "/subscriptions/s/.../publicIPAddresses/pip"})
    del public["frontendIPConfigurations"][0]["subnet"]
    assert validate_resource(policy, AZURE_LB, public, name="lb") == [
        f"lb ({AZURE_LB}): frontendIPConfigurations[0] (agent): publicIPAddress makes the load "
        "balancer public"
    ]
    prefix = azure_lb(publicIPPrefix={"id": "prefix"})
    assert validate_resource(policy, AZURE_LB, prefix, name="lb") == [
        f"lb ({AZURE_LB}): frontendIPConfigurations[0] (agent): publicIPPrefix makes the load "
        "balancer public"
    ]
