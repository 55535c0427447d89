"""Kubernetes components: `ClusterBase`, `KubernetesPool` and `Controller`.

Thin shells that create the manifests of `components.k8s_manifests` with pulumi_kubernetes:

- `fleetform:kubernetes:ClusterBase`, once per cluster a fleet uses: the fleet's namespace, a
  PriorityClass per SLO class, and per tenant a namespace with a ResourceQuota over accelerators
  (`nvidia.com/gpu`, `aws.amazon.com/neuron`, `google.com/tpu`), CPU and memory.
- `fleetform:kubernetes:KubernetesPool`: the agent Deployment, Service, PodDisruptionBudget, its
  node config in a ConfigMap and the fleet token in a Secret.
- `fleetform:controller:Controller`: the controller's Deployment, Service, ConfigMap (the fleet
  as a stack file), Secret (fleet and admin tokens) and the ledger's PersistentVolumeClaim.

Which cluster is reached is the caller's choice: pass a kubernetes provider in the options.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
import pulumi_kubernetes.apps.v1 as apps
import pulumi_kubernetes.core.v1 as core
import pulumi_kubernetes.policy.v1 as policy
import pulumi_kubernetes.scheduling.v1 as scheduling

from runtime.catalog import Catalog
from runtime.spec import FleetSpec

from . import k8s_manifests as manifests
from . import naming
from .plan import PoolPlan, tenant_quota

CLUSTER_TYPE = "fleetform:kubernetes:ClusterBase"
POOL_TYPE = "fleetform:kubernetes:KubernetesPool"
CONTROLLER_TYPE = "fleetform:controller:Controller"

_TOP_LEVEL = {
    "metadata": "metadata",
    "spec": "spec",
    "data": "data",
    "stringData": "string_data",
    "type": "type",
    "value": "value",
    "globalDefault": "global_default",
    "preemptionPolicy": "preemption_policy",
    "description": "description",
}


def _args(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's top-level fields as resource arguments (apiVersion and kind come from the
    resource class)."""
    return {_TOP_LEVEL[k]: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}


class ClusterBase(pulumi.ComponentResource):
    """What a fleet needs once per cluster: its namespace, priority classes, tenant quotas."""

    namespace: pulumi.Output[str]
    tenant_namespaces: pulumi.Output[dict[str, str]]

    def __init__(
        self,
        name: str,
        spec: FleetSpec,
        cluster: str,
        catalog: Catalog,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(CLUSTER_TYPE, name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        labels = manifests.fleet_labels(spec.name)
        ns = core.Namespace(
            naming.child_name(name, "ns"),
            **_args(manifests.namespace(manifests.fleet_namespace(spec.name), labels)),
            opts=child,
        )
        for slo in spec.slo_classes:
            scheduling.PriorityClass(
                naming.child_name(name, f"priority-{slo.name}"),
                **_args(manifests.priority_class(spec.name, slo)),
                opts=child,
            )
        tenant_namespaces: dict[str, pulumi.Output[str]] = {}
        for tenant in spec.tenants:
            tenant_labels = {
                **labels,
                naming.tag_key("kubernetes", "tenant"): naming.k8s_label_value(tenant.name),
            }
            tenant_ns = core.Namespace(
                naming.child_name(name, f"tenant-{tenant.name}"),
                **_args(
                    manifests.namespace(
                        manifests.tenant_namespace(spec.name, tenant.name), tenant_labels
                    )
                ),
                opts=child,
            )
            quota = tenant_quota(spec, tenant.name, cluster, catalog)
            core.ResourceQuota(
                naming.child_name(name, f"quota-{tenant.name}"),
                **_args(
                    manifests.resource_quota(
                        "fleetform-quota",
                        manifests.tenant_namespace(spec.name, tenant.name),
                        quota.hard(),
                        tenant_labels,
                    )
                ),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[tenant_ns]),
            )
            tenant_namespaces[tenant.name] = tenant_ns.metadata.apply(lambda m: m["name"])

        self.namespace_resource = ns
        self.namespace = ns.metadata.apply(lambda m: m["name"])
        self.tenant_namespaces = (
            pulumi.Output.all(**tenant_namespaces)
            if tenant_namespaces
            else pulumi.Output.from_input({})
        )
        self.register_outputs(
            {"namespace": self.namespace, "tenant_namespaces": self.tenant_namespaces}
        )


class KubernetesPool(pulumi.ComponentResource):
    """A kubernetes pool: the agent Deployment with its Service, PDB, ConfigMap and Secret."""

    endpoint: pulumi.Output[str]
    deployment_name: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        spec: FleetSpec,
        plan: PoolPlan,
        *,
        namespace: str,
        node_config: pulumi.Input[str],
        fleet_token: pulumi.Input[str] | None,
        image: str,
        upstream_image: str,
        port: int,
        drain_timeout_s: float,
        depends_on: Sequence[pulumi.Resource] = (),
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(POOL_TYPE, name, None, opts)
        child = pulumi.ResourceOptions(parent=self, depends_on=list(depends_on))
        labels = manifests.agent_labels(plan)
        object_name = manifests.agent_object_name(plan.fleet, plan.pool.name)
        config = core.ConfigMap(
            naming.child_name(name, "config"),
            **_args(
                manifests.config_map(object_name, namespace, labels, {"node.json": node_config})
            ),
            opts=child,
        )
        secret_name: str | None = None
        if fleet_token is not None:
            secret_name = object_name
            core.Secret(
                naming.child_name(name, "keys"),
                **_args(
                    manifests.secret(
                        object_name,
                        namespace,
                        labels,
                        {manifests.FLEET_TOKEN_ENV: pulumi.Output.secret(fleet_token)},
                    )
                ),
                opts=child,
            )
        deployment = apps.Deployment(
            naming.child_name(name, "agent"),
            **_args(
                manifests.agent_deployment(
                    spec,
                    plan,
                    ns=namespace,
                    image=image,
                    upstream_image=upstream_image,
                    port=port,
                    config_map=object_name,
                    secret=secret_name,
                    drain_timeout_s=drain_timeout_s,
                )
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*depends_on, config]),
        )
        core.Service(
            naming.child_name(name, "svc"),
            **_args(manifests.agent_service(plan, ns=namespace, port=port)),
            opts=child,
        )
        policy.PodDisruptionBudget(
            naming.child_name(name, "pdb"),
            **_args(manifests.agent_pdb(plan, ns=namespace)),
            opts=child,
        )
        self.endpoint = pulumi.Output.from_input(
            manifests.service_url(object_name, namespace, port) + "/v1"
        )
        self.deployment_name = deployment.metadata.apply(lambda m: m["name"])
        self.register_outputs({"endpoint": self.endpoint, "deployment_name": self.deployment_name})


class Controller(pulumi.ComponentResource):
    """The fleet controller in a cluster: Deployment, Service, ConfigMap, Secret, ledger PVC."""

    url: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        spec: FleetSpec,
        *,
        namespace: str,
        stack_file: pulumi.Input[str],
        fleet_token: pulumi.Input[str],
        admin_token: pulumi.Input[str],
        image: str,
        port: int,
        storage_gi: int,
        depends_on: Sequence[pulumi.Resource] = (),
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(CONTROLLER_TYPE, name, None, opts)
        child = pulumi.ResourceOptions(parent=self, depends_on=list(depends_on))
        labels = manifests.controller_labels(spec.name)
        object_name = manifests.controller_object_name(spec.name)
        config = core.ConfigMap(
            naming.child_name(name, "config"),
            **_args(
                manifests.config_map(object_name, namespace, labels, {"stack.yaml": stack_file})
            ),
            opts=child,
        )
        secret = core.Secret(
            naming.child_name(name, "tokens"),
            **_args(
                manifests.secret(
                    object_name,
                    namespace,
                    labels,
                    {
                        manifests.FLEET_TOKEN_ENV: pulumi.Output.secret(fleet_token),
                        manifests.ADMIN_TOKEN_ENV: pulumi.Output.secret(admin_token),
                    },
                )
            ),
            opts=child,
        )
        pvc_manifest = manifests.controller_pvc(spec.name, ns=namespace, storage_gi=storage_gi)
        pvc = core.PersistentVolumeClaim(
            naming.child_name(name, "ledger"), **_args(pvc_manifest), opts=child
        )
        apps.Deployment(
            naming.child_name(name, "deployment"),
            **_args(
                manifests.controller_deployment(
                    spec,
                    ns=namespace,
                    image=image,
                    port=port,
                    config_map_name=object_name,
                    secret_name=object_name,
                    pvc_name=pvc_manifest["metadata"]["name"],
                )
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*depends_on, config, secret, pvc]),
        )
        core.Service(
            naming.child_name(name, "svc"),
            **_args(manifests.controller_service(spec.name, ns=namespace, port=port)),
            opts=child,
        )
        self.url = pulumi.Output.from_input(manifests.service_url(object_name, namespace, port))
        self.register_outputs({"url": self.url})
