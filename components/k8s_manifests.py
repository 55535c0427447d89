"""Kubernetes objects of a fleet as plain manifests (wire format). Pure: no pulumi import.

This module owns the shape of every Kubernetes object Fleetform creates: the fleet's namespace,
a namespace and ResourceQuota per tenant, a PriorityClass per SLO class, and per kubernetes pool
the agent's Deployment (node selector and tolerations for the accelerator and spot nodes,
resource limits, `/healthz` and `/readyz` probes, an OpenAI-compatible upstream sidecar for
`openai-upstream` pools), Service, PodDisruptionBudget, ConfigMap and Secret; and the
controller's Deployment, Service, ConfigMap, Secret and ledger volume. The components hand these
dicts to pulumi_kubernetes unchanged, and tests validate them against the Kubernetes OpenAPI
schemas, so what is validated is what is deployed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from runtime.spec import FleetSpec, SloClassSpec

from . import naming
from .plan import (
    PoolPlan,
    k8s_node_selector,
    k8s_pod_resources,
    k8s_tolerations,
    pool_priority_class,
    priority_class_name,
    priority_class_value,
)

AGENT_APP = "fleetform-agent"
CONTROLLER_APP = "fleetform-controller"
CONFIG_MOUNT = "/etc/fleetform"
RUN_MOUNT = "/run/fleetform"
LEDGER_MOUNT = "/var/lib/fleetform"
POD_IP_PLACEHOLDER = "@POD_IP@"
FLEET_TOKEN_ENV = "FLEETFORM_FLEET_TOKEN"
ADMIN_TOKEN_ENV = "FLEETFORM_ADMIN_TOKEN"
AGENT_USER_ID = 10001
# The agent itself only queues and forwards when an upstream owns the accelerators.
AGENT_SIDECAR_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "500m", "memory": "1Gi"},
    "limits": {"cpu": "2", "memory": "2Gi"},
}


def fleet_namespace(fleet: str) -> str:
    return naming.dns_label(f"fleetform-{fleet}")


def tenant_namespace(fleet: str, tenant: str) -> str:
    return naming.dns_label(f"{fleet}-{tenant}")


def agent_object_name(fleet: str, pool: str) -> str:
    return naming.dns_label(f"{fleet}-{pool}")


def controller_object_name(fleet: str) -> str:
    return naming.dns_label(f"{fleet}-controller")


def service_url(name: str, namespace: str, port: int) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:{port}"


def _meta(name: str, labels: Mapping[str, str], namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def fleet_labels(fleet: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/part-of": "fleetform",
        "app.kubernetes.io/managed-by": "pulumi",
        naming.tag_key("kubernetes", "fleet"): naming.k8s_label_value(fleet),
    }


# --------------------------------------------------------------------------------------------
# Fleet-wide objects of a cluster


def namespace(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, labels)}


def resource_quota(
    name: str, ns: str, hard: Mapping[str, str], labels: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta(name, labels, ns),
        "spec": {"hard": dict(hard)},
    }


def priority_class(fleet: str, slo: SloClassSpec) -> dict[str, Any]:
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": _meta(priority_class_name(fleet, slo), fleet_labels(fleet)),
        "value": priority_class_value(slo),
        "globalDefault": False,
        # Sheddable work never evicts running pods to get scheduled.
        "preemptionPolicy": "Never" if slo.sheddable else "PreemptLowerPriority",
        "description": (
            f"Fleetform {fleet}: SLO class {slo.name} (TTFT {slo.ttft_ms:g} ms, "
            f"TPOT {slo.tpot_ms:g} ms)"
        ),
    }


# --------------------------------------------------------------------------------------------
# A kubernetes pool


def agent_selector(plan: PoolPlan) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": AGENT_APP,
        naming.tag_key("kubernetes", "fleet"): naming.k8s_label_value(plan.fleet),
        naming.tag_key("kubernetes", "pool"): naming.k8s_label_value(plan.pool.name),
    }


def agent_labels(plan: PoolPlan) -> dict[str, str]:
    return {**fleet_labels(plan.fleet), **plan.tags("kubernetes"), **agent_selector(plan)}


def _upstream_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def agent_container_script(config_path: str) -> str:
    """The agent container's command: complete the node id and advertised address from the pod
    (one ConfigMap serves every replica), then run the agent."""
    run_path = f"{RUN_MOUNT}/node.json"
    return (
        f'sed -e "s/@NODE_HOST@/${{HOSTNAME}}/" -e "s/{POD_IP_PLACEHOLDER}/${{POD_IP}}/" '
        f"{config_path} > {run_path} && exec fleetform agent --config {run_path}"
    )


def agent_deployment(
    spec: FleetSpec,
    plan: PoolPlan,
    *,
    ns: str,
    image: str,
    upstream_image: str,
    port: int,
    config_map: str,
    secret: str | None,
    drain_timeout_s: float,
) -> dict[str, Any]:
    pool = plan.pool
    name = agent_object_name(plan.fleet, pool.name)
    resources = k8s_pod_resources(plan)
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    ]
    agent: dict[str, Any] = {
        "name": "agent",
        "image": image,
        "command": ["/bin/sh", "-c"],
        "args": [agent_container_script(f"{CONFIG_MOUNT}/node.json")],
        "env": env,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        # Model loading can take the pool's whole cold start: liveness waits for it.
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": math.ceil(pool.cold_start_s / 10) + 1,
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "run", "mountPath": RUN_MOUNT},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": AGENT_USER_ID,
            "allowPrivilegeEscalation": False,
        },
    }
    if secret is not None:
        agent["envFrom"] = [{"secretRef": {"name": secret}}]
    containers = [agent]
    if pool.engine == "openai-upstream" and pool.upstream is not None:
        # The accelerators belong to the server that runs the model.
        agent["resources"] = {k: dict(v) for k, v in AGENT_SIDECAR_RESOURCES.items()}
        containers.append(
            {
                "name": "upstream",
                "image": upstream_image,
                "args": [
                    "--model",
                    pool.upstream.model,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(_upstream_port(pool.upstream.url)),
                ],
                "resources": resources,
            }
        )
    else:
        agent["resources"] = resources
    labels = agent_labels(plan)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, labels, ns),
        "spec": {
            "replicas": pool.replicas,
            "selector": {"matchLabels": agent_selector(plan)},
            # Accelerator nodes rarely have room for a surge pod: replace one at a time.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "priorityClassName": priority_class_name(
                        plan.fleet, pool_priority_class(spec, pool)
                    ),
                    "nodeSelector": k8s_node_selector(plan),
                    "tolerations": k8s_tolerations(plan),
                    # SIGTERM drains the agent; leave it the drain plus a margin.
                    "terminationGracePeriodSeconds": int(drain_timeout_s) + 15,
                    "containers": containers,
                    "volumes": [
                        {"name": "config", "configMap": {"name": config_map}},
                        {"name": "run", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def agent_service(plan: PoolPlan, *, ns: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(agent_object_name(plan.fleet, plan.pool.name), agent_labels(plan), ns),
        "spec": {
            "type": "ClusterIP",
            "selector": agent_selector(plan),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def agent_pdb(plan: PoolPlan, *, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(agent_object_name(plan.fleet, plan.pool.name), agent_labels(plan), ns),
        # Voluntary disruptions (node drains, upgrades) take one agent at a time.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": agent_selector(plan)}},
    }


def config_map(name: str, ns: str, labels: Mapping[str, str], data: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, labels, ns),
        "data": data,
    }


def secret(name: str, ns: str, labels: Mapping[str, str], string_data: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, labels, ns),
        "type": "Opaque",
        "stringData": string_data,
    }


# --------------------------------------------------------------------------------------------
# The controller


def controller_labels(fleet: str) -> dict[str, str]:
    return {**fleet_labels(fleet), "app.kubernetes.io/name": CONTROLLER_APP}


def controller_selector(fleet: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": CONTROLLER_APP,
        naming.tag_key("kubernetes", "fleet"): naming.k8s_label_value(fleet),
    }


def controller_pvc(fleet: str, *, ns: str, storage_gi: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(naming.dns_label(f"{fleet}-ledger"), controller_labels(fleet), ns),
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": f"{storage_gi}Gi"}},
        },
    }


def controller_deployment(
    spec: FleetSpec,
    *,
    ns: str,
    image: str,
    port: int,
    config_map_name: str,
    secret_name: str,
    pvc_name: str,
) -> dict[str, Any]:
    fleet = spec.name
    most_important = min(spec.slo_classes, key=lambda c: c.priority)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(controller_object_name(fleet), controller_labels(fleet), ns),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": controller_selector(fleet)},
            # One writer of the SQLite ledger at a time.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": {**controller_labels(fleet), **controller_selector(fleet)}},
                "spec": {
                    "priorityClassName": priority_class_name(fleet, most_important),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": AGENT_USER_ID,
                        "fsGroup": AGENT_USER_ID,
                    },
                    "containers": [
                        {
                            "name": "controller",
                            "image": image,
                            "command": [
                                "fleetform",
                                "controller",
                                "--stack",
                                f"{CONFIG_MOUNT}/stack.yaml",
                                "--db",
                                f"{LEDGER_MOUNT}/ledger.db",
                                "--host",
                                "0.0.0.0",
                                "--port",
                                str(port),
                            ],
                            "envFrom": [{"secretRef": {"name": secret_name}}],
                            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "512Mi"},
                                "limits": {"cpu": "1", "memory": "1Gi"},
                            },
                            "securityContext": {"allowPrivilegeEscalation": False},
                            "volumeMounts": [
                                {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                                {"name": "ledger", "mountPath": LEDGER_MOUNT},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": config_map_name}},
                        {"name": "ledger", "persistentVolumeClaim": {"claimName": pvc_name}},
                    ],
                },
            },
        },
    }


def controller_service(fleet: str, *, ns: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(controller_object_name(fleet), controller_labels(fleet), ns),
        "spec": {
            "type": "ClusterIP",
            "selector": controller_selector(fleet),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
