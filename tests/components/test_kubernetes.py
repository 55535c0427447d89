"""Kubernetes objects under mocks: every object valid against the Kubernetes OpenAPI schema,
tenant quotas, priority classes, the agent Deployment and the controller."""

from __future__ import annotations

import json

import pytest
import yaml

from runtime.agent.config import NodeConfig, hash_api_key
from runtime.spec import parse_fleet

from .support import ADMIN_TOKEN, FLEET_TOKEN, PROD_KEYS, Program, as_manifest, k8s_problem

NS = "fleetform-acme-prod"
GPU, NEURON, TPU = (
    "requests.nvidia.com/gpu",
    "requests.aws.amazon.com/neuron",
    "requests.google.com/tpu",
)


def test_every_kubernetes_object_is_valid_against_the_openapi_schema(prod: Program) -> None:
    objects = [r for r in prod.resources if r.type.startswith("kubernetes:")]
    kinds = sorted(r.type.split(":")[-1] for r in objects)
    assert kinds == sorted(
        ["Namespace"] * 5
        + ["PriorityClass"] * 3
        + ["ResourceQuota"] * 4
        # the pool's objects, then the controller's
        + ["ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"]
        + ["ConfigMap", "Secret", "Deployment", "Service", "PersistentVolumeClaim"]
    )
    problems = {r.name: k8s_problem(as_manifest(r)) for r in objects}
    assert problems == dict.fromkeys(problems)


def test_the_validator_rejects_a_bad_manifest(prod: Program) -> None:
    """Negative control: the same check fails on a misspelt field and a wrong type."""
    deployment = as_manifest(prod.by_name("acme-k8s-eks-l4-agent"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert (
        k8s_problem(deployment) == "Additional properties are not allowed ('imagee' was unexpected)"
    )
    quota = as_manifest(prod.by_name("acme-eks-prod-use1-quota-search"))
    quota["spec"]["hard"] = ["not", "a", "map"]
    assert k8s_problem(quota) is not None and "is not of type" in k8s_problem(quota)


def test_tenant_namespaces_with_quotas_over_accelerators_cpu_and_memory(prod: Program) -> None:
    namespaces = {r.state["metadata"]["name"] for r in prod.of_type("kubernetes:core/v1:Namespace")}
    assert namespaces == {
        NS,
        "acme-prod-search",
        "acme-prod-support-bot",
        "acme-prod-code-assist",
        "acme-prod-batch-enrichment",
    }
    quotas = {
        r.state["metadata"]["namespace"]: r.state["spec"]["hard"]
        for r in prod.of_type("kubernetes:core/v1:ResourceQuota")
    }
    # k8s-eks-l4: g6.xlarge (1 L4, 4 vCPU, 16 GiB), max 6 replicas; pods get 85% of the CPUs
    # (3400m) and 80% of the memory (13107Mi).
    full = {
        GPU: "6",
        NEURON: "0",
        TPU: "0",
        "requests.cpu": "20400m",
        "limits.cpu": "20400m",
        "requests.memory": "78642Mi",
        "limits.memory": "78642Mi",
    }
    nothing = {**dict.fromkeys((GPU, NEURON, TPU), "0")}
    nothing.update(
        {"requests.cpu": "0m", "limits.cpu": "0m", "requests.memory": "0Mi", "limits.memory": "0Mi"}
    )
    assert quotas == {
        "acme-prod-search": full,
        "acme-prod-support-bot": full,
        "acme-prod-code-assist": full,
        # batch-enrichment may not use the kubernetes pool.
        "acme-prod-batch-enrichment": nothing,
    }


def test_a_priority_class_per_slo_class(prod: Program) -> None:
    classes = {
        r.state["metadata"]["name"]: (r.state["value"], r.state["preemptionPolicy"])
        for r in prod.of_type("kubernetes:scheduling.k8s.io/v1:PriorityClass")
    }
    assert classes == {
        "acme-prod-critical": (100000, "PreemptLowerPriority"),
        "acme-prod-standard": (99000, "PreemptLowerPriority"),
        "acme-prod-batch": (98000, "Never"),
    }


def test_agent_deployment_selects_accelerator_nodes_and_probes_health(prod: Program) -> None:
    deployment = prod.by_name("acme-k8s-eks-l4-agent")
    assert prod.parent_chain(deployment) == [
        "kubernetes:apps/v1:Deployment",
        "fleetform:kubernetes:KubernetesPool",
        "fleetform:index:InferenceFleet",
        "pulumi:pulumi:Stack",
    ]
    spec = deployment.state["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 2
    assert deployment.state["metadata"]["namespace"] == NS
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g6.xlarge"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["priorityClassName"] == "acme-prod-critical"
    agent, upstream = pod["containers"]
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert agent["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert agent["envFrom"] == [{"secretRef": {"name": "acme-prod-k8s-eks-l4"}}]
    # The upstream (vLLM) owns the GPU; the agent queues and forwards.
    assert upstream["resources"]["limits"] == {
        "cpu": "3400m",
        "memory": "13107Mi",
        "nvidia.com/gpu": "1",
    }
    assert upstream["args"] == [
        "--model",
        "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
    ]
    assert agent["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    labels = spec["template"]["metadata"]["labels"]
    assert labels["fleetform/pool"] == "k8s-eks-l4"
    assert labels["fleetform/tenant"] == "shared"
    pdb = prod.by_name("acme-k8s-eks-l4-pdb").state["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": spec["selector"]}
    service = prod.by_name("acme-k8s-eks-l4-svc").state["spec"]
    assert service["selector"] == spec["selector"]["matchLabels"]


def test_config_in_a_config_map_and_the_token_in_a_secret(prod: Program) -> None:
    data = prod.by_name("acme-k8s-eks-l4-config").state["data"]
    config = NodeConfig.model_validate(json.loads(data["node.json"]))
    assert (config.pool, config.host, config.port, config.advertise_url) == (
        "k8s-eks-l4",
        "0.0.0.0",
        8080,
        "http://@POD_IP@:8080",
    )
    assert config.tenants[0].key_sha256 == [hash_api_key(PROD_KEYS["config:searchApiKey"])]
    secret = prod.by_name("acme-k8s-eks-l4-keys").state
    assert secret["stringData"] == {"FLEETFORM_FLEET_TOKEN": FLEET_TOKEN}
    for key in PROD_KEYS.values():
        assert key not in data["node.json"]


def test_controller_runs_in_the_cluster_with_the_fleet_as_a_stack_file(prod: Program) -> None:
    controller = prod.one("fleetform:controller:Controller")
    assert [c.name for c in prod.children(controller)] == [
        "acme-controller-config",
        "acme-controller-deployment",
        "acme-controller-ledger",
        "acme-controller-svc",
        "acme-controller-tokens",
    ]
    stack = yaml.safe_load(prod.by_name("acme-controller-config").state["data"]["stack.yaml"])
    spec = parse_fleet(stack["config"]["fleetform:fleet"])
    assert spec.tenant("search").api_keys == [
        f"sha256:{hash_api_key(PROD_KEYS['config:searchApiKey'])}"
    ]
    tokens = prod.by_name("acme-controller-tokens").state["stringData"]
    assert tokens == {"FLEETFORM_FLEET_TOKEN": FLEET_TOKEN, "FLEETFORM_ADMIN_TOKEN": ADMIN_TOKEN}
    deployment = prod.by_name("acme-controller-deployment").state["spec"]
    assert deployment["strategy"] == {"type": "Recreate"}
    (container,) = deployment["template"]["spec"]["containers"]
    assert container["command"] == [
        "fleetform",
        "controller",
        "--stack",
        "/etc/fleetform/stack.yaml",
        "--db",
        "/var/lib/fleetform/ledger.db",
        "--host",
        "0.0.0.0",
        "--port",
        "8700",
    ]
    pvc = prod.by_name("acme-controller-ledger").state["spec"]
    assert pvc["resources"] == {"requests": {"storage": "20Gi"}}


@pytest.mark.parametrize(
    ("typ", "count"),
    [("fleetform:kubernetes:ClusterBase", 1), ("fleetform:kubernetes:KubernetesPool", 1)],
)
def test_one_component_per_cluster_and_pool(prod: Program, typ: str, count: int) -> None:
    assert len(prod.of_type(typ)) == count
