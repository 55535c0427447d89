"""`fleetform:index:InferenceFleet`: a whole fleet from a FleetSpec.

The component reads the spec (and the deployment settings of `components.settings`) and creates
one pool component per pool (`AwsPool`, `GcpPool`, `AzurePool`, `KubernetesPool`), per cluster
the tenants' quota objects and priority classes (`ClusterBase`), and the controller's deployment
(`Controller`) when the controller runs in a cluster of the fleet. `local` pools create no cloud
resources: `fleetform up` runs them on the machine at hand; they are listed in `local_pools`.

Outputs are plain strings and numbers (so YAML and TypeScript programs can use them through the
component provider) beside the resource objects (`pools`, `clusters`, `controller`): API
endpoints (a kubernetes pool's Service; an AWS, GCP or Azure pool's internal load balancer, which
health-checks the agents' `/readyz`; TPU pools have none), the controller URL, the estimated
hourly cost on-demand and spot per pool and in total (runtime.plan's figures), and each tenant's
quota summary.

API keys never reach a node: key references are resolved to SHA-256 digests here (`config:`
references from the program's secrets, `env:`/`file:` on the machine running Pulumi) and node
configs are built from digests by `runtime.agent.config.node_config_from_spec`.

No `from __future__ import annotations`: the component provider's schema analyzer reads these
annotations at run time.
"""

import json
from collections.abc import Callable, Mapping
from typing import Any

import pulumi
import yaml

from runtime.catalog import Catalog, default_catalog
from runtime.spec import FLEET_CONFIG_KEY, FleetSpec

from . import k8s_manifests as manifests
from . import naming
from .plan import (
    PlanError,
    PoolPlan,
    fleet_cost_summary,
    key_digests,
    key_references,
    kubernetes_clusters,
    load_balancer_plan,
    needs_key_value,
    plan_pool,
    with_key_digests,
)
from .settings import FleetSettings, SettingsError, check_settings
from .userdata import (
    EMBEDDED_MODEL_PACKAGE,
    Provider,
    cloud_config,
    node_config_data,
    render_user_data,
)

TYPE = "fleetform:index:InferenceFleet"
BUILTIN_SOURCE_PREFIX = "builtin:"
TPU_PYTHON = "python3.12"  # TPU VM images are Ubuntu 22.04 (python 3.10): deadsnakes' 3.12


class InferenceFleet(pulumi.ComponentResource):
    """An inference fleet: a pool component per pool, tenant quotas, the controller."""

    fleet_name: pulumi.Output[str]
    """The fleet's name (the spec's `name`)."""
    pool_names: pulumi.Output[list[str]]
    """Every pool of the spec, in order."""
    local_pools: pulumi.Output[list[str]]
    """Pools with no cloud resources: `fleetform up` runs them locally."""
    api_endpoints: pulumi.Output[dict[str, str]]
    """OpenAI-compatible base URL per pool that has one: kubernetes pools, their Service; AWS,
    GCP and Azure pools, their internal load balancer (`http://<address>:<port>/v1`). Local and
    TPU pools have none."""
    controller_url: pulumi.Output[str]
    """The URL agents push to; empty when the fleet has no controller."""
    on_demand_usd_per_hour: pulumi.Output[float]
    """Estimated USD per hour of the fleet's on-demand nodes at the desired replicas."""
    spot_usd_per_hour: pulumi.Output[float]
    """Estimated USD per hour of the fleet's spot nodes at the desired replicas."""
    total_usd_per_hour: pulumi.Output[float]
    """Estimated USD per hour of the whole fleet (runtime.plan's total)."""
    total_usd_per_month: pulumi.Output[float]
    """Estimated USD per month (730 hours) at the desired replicas."""
    max_usd_per_month: pulumi.Output[float]
    """Estimated USD per month with every pool at max replicas."""
    pool_usd_per_hour: pulumi.Output[dict[str, float]]
    """Estimated USD per hour per pool (on-demand plus spot)."""
    pool_on_demand_usd_per_hour: pulumi.Output[dict[str, float]]
    """Estimated USD per hour of each pool's on-demand nodes."""
    pool_spot_usd_per_hour: pulumi.Output[dict[str, float]]
    """Estimated USD per hour of each pool's spot nodes."""
    tenant_quotas: pulumi.Output[dict[str, Any]]
    """Per tenant: its quotas, the pools it may use and its estimated monthly share."""

    def __init__(
        self,
        name: str,
        spec: FleetSpec,
        opts: pulumi.ResourceOptions | None = None,
        *,
        settings: FleetSettings | None = None,
        api_keys: Mapping[str, pulumi.Input[str]] | None = None,
        fleet_token: pulumi.Input[str] | None = None,
        admin_token: pulumi.Input[str] | None = None,
        kubernetes_providers: Mapping[str, pulumi.ProviderResource] | None = None,
        catalog: Catalog | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`api_keys`: key values by reference (`config:NAME` -> the secret); other references
        resolve from `environ` (default: this process's environment). `fleet_token` and
        `admin_token` authenticate agents and admins to the controller.
        `kubernetes_providers`: a provider per cluster (a kubernetes pool's `region`)."""
        super().__init__(TYPE, name, None, opts)
        settings = settings or FleetSettings()
        catalog = catalog or default_catalog()
        problems = check_settings(spec, settings)
        if problems:
            raise SettingsError("\n".join(problems))
        api_keys = dict(api_keys or {})
        missing = [r for r in key_references(spec) if needs_key_value(r) and r not in api_keys]
        if missing:
            raise PlanError(
                "no value for API key reference(s) "
                + ", ".join(missing)
                + ": set each with `pulumi config set --secret NAME VALUE`"
            )
        controller_url = self._controller_url(spec, settings)
        if controller_url and fleet_token is None:
            raise PlanError("a fleet token is required for agents to push to the controller")

        # Built on first use: a fleet of local pools only deploys nothing that needs the keys.
        digested_spec: list[pulumi.Output[FleetSpec]] = []

        def digested() -> pulumi.Output[FleetSpec]:
            if not digested_spec:
                digests = self._key_digests(spec, api_keys, environ)
                digested_spec.append(digests.apply(lambda d: with_key_digests(spec, d)))
            return digested_spec[0]

        token = pulumi.Output.secret(fleet_token) if fleet_token is not None else None
        plans = {pool.name: plan_pool(spec, pool, catalog) for pool in spec.pools}
        agent = settings.agent

        def node_config(pool: str, spot: bool, advertise_url: str | None = None) -> Any:
            return digested().apply(
                lambda s: node_config_data(
                    s,
                    pool,
                    agent=agent,
                    controller_url=controller_url,
                    catalog=catalog,
                    spot=spot,
                    advertise_url=advertise_url,
                )
            )

        def user_data(plan: PoolPlan, provider: Provider) -> Callable[[bool], pulumi.Output[str]]:
            variant = spec.pool_variant(plan.pool)[1]
            embedded_builtin = plan.pool.engine == "embedded" and (variant.source or "").startswith(
                BUILTIN_SOURCE_PREFIX
            )
            tpu = plan.family == "tpu"

            def render(spot: bool) -> pulumi.Output[str]:
                inputs = [node_config(plan.name, spot)]
                if token is not None:
                    inputs.append(token)
                return pulumi.Output.all(*inputs).apply(
                    lambda values: render_user_data(
                        cloud_config(
                            values[0],
                            provider=provider,
                            agent=agent,
                            fleet_token=values[1] if len(values) > 1 else None,
                            nvidia_driver=provider != "aws" and plan.family == "nvidia",
                            python=TPU_PYTHON if tpu else "python3",
                            python_ppa=tpu,
                            extra_packages=[EMBEDDED_MODEL_PACKAGE] if embedded_builtin else [],
                        )
                    )
                )

            return render

        # Kubernetes: the fleet's objects once per cluster, then the controller if it runs there.
        self.clusters: dict[str, Any] = {}
        cluster_opts: dict[str, pulumi.ResourceOptions] = {}
        for cluster in kubernetes_clusters(spec):
            provider = (kubernetes_providers or {}).get(cluster)
            cluster_opts[cluster] = pulumi.ResourceOptions(
                parent=self, providers=[provider] if provider is not None else None
            )
            # Cloud modules are imported when a pool needs them: each SDK module loads all of
            # its resources, and a fleet rarely uses every cloud.
            from .kubernetes import ClusterBase

            self.clusters[cluster] = ClusterBase(
                naming.child_name(name, cluster), spec, cluster, catalog, opts=cluster_opts[cluster]
            )
        self.controller: Any | None = None
        if settings.controller.cluster:
            from .kubernetes import Controller

            if fleet_token is None or admin_token is None:
                raise PlanError("the controller needs a fleet token and an admin token")
            cluster = settings.controller.cluster
            self.controller = Controller(
                naming.child_name(name, "controller"),
                spec,
                namespace=manifests.fleet_namespace(spec.name),
                stack_file=digested().apply(_stack_file),
                fleet_token=fleet_token,
                admin_token=admin_token,
                image=settings.controller.image or agent.image,
                port=settings.controller.port,
                storage_gi=settings.controller.storage_gi,
                depends_on=[self.clusters[cluster].namespace_resource],
                opts=cluster_opts[cluster],
            )

        self.pools: dict[str, pulumi.ComponentResource] = {}
        endpoints: dict[str, pulumi.Output[str]] = {}
        for pool in spec.pools:
            plan = plans[pool.name]
            pool_name = naming.pool_component_name(name, pool.name)
            child = pulumi.ResourceOptions(parent=self)
            network = settings.network
            # None for pools without one (TPU, kubernetes, local): see plan.load_balancer_reason.
            balancer = load_balancer_plan(plan, agent.port, agent.drain_timeout_s)
            vm_pool: Any = None
            if pool.cloud == "aws":
                from .aws import AwsPool

                vm_pool = AwsPool(
                    pool_name,
                    plan,
                    network.placement(pool),  # type: ignore[arg-type]
                    fleet_cidrs=network.fleet_cidrs,
                    agent_port=agent.port,
                    user_data=user_data(plan, "aws"),
                    load_balancer=balancer,
                    opts=child,
                )
            elif pool.cloud == "gcp":
                from .gcp import GcpPool

                vm_pool = GcpPool(
                    pool_name,
                    plan,
                    network.placement(pool),  # type: ignore[arg-type]
                    fleet_cidrs=network.fleet_cidrs,
                    agent_port=agent.port,
                    user_data=user_data(plan, "gcp"),
                    load_balancer=balancer,
                    opts=child,
                )
            elif pool.cloud == "azure":
                from .azure import AzurePool

                vm_pool = AzurePool(
                    pool_name,
                    plan,
                    network.placement(pool),  # type: ignore[arg-type]
                    fleet_cidrs=network.fleet_cidrs,
                    agent_port=agent.port,
                    user_data=user_data(plan, "azure"),
                    load_balancer=balancer,
                    opts=child,
                )
            if vm_pool is not None:
                self.pools[pool.name] = vm_pool
                if vm_pool.endpoint is not None:
                    endpoints[pool.name] = vm_pool.endpoint
            if pool.cloud == "kubernetes":
                from .kubernetes import KubernetesPool

                k8s_pool = KubernetesPool(
                    pool_name,
                    spec,
                    plan,
                    namespace=manifests.fleet_namespace(spec.name),
                    node_config=node_config(
                        pool.name,
                        pool.spot,
                        advertise_url=f"http://{manifests.POD_IP_PLACEHOLDER}:{agent.port}",
                    ).apply(lambda data: json.dumps(data, indent=2, sort_keys=True)),
                    fleet_token=token if controller_url else None,
                    image=agent.image,
                    upstream_image=agent.upstream_image,
                    port=agent.port,
                    drain_timeout_s=agent.drain_timeout_s,
                    depends_on=[self.clusters[pool.region].namespace_resource],
                    opts=cluster_opts[pool.region],
                )
                self.pools[pool.name] = k8s_pool
                endpoints[pool.name] = k8s_pool.endpoint
            # local pools: nothing to create; `fleetform up` runs them.

        cost = fleet_cost_summary(spec, catalog)
        self.fleet_name = pulumi.Output.from_input(spec.name)
        self.pool_names = pulumi.Output.from_input([p.name for p in spec.pools])
        self.local_pools = pulumi.Output.from_input(
            [p.name for p in spec.pools if p.cloud == "local"]
        )
        self.api_endpoints = (
            pulumi.Output.all(**endpoints) if endpoints else pulumi.Output.from_input({})
        )
        self.controller_url = pulumi.Output.from_input(controller_url or "")
        self.on_demand_usd_per_hour = pulumi.Output.from_input(cost.on_demand_usd_per_hour)
        self.spot_usd_per_hour = pulumi.Output.from_input(cost.spot_usd_per_hour)
        self.total_usd_per_hour = pulumi.Output.from_input(cost.total_usd_per_hour)
        self.total_usd_per_month = pulumi.Output.from_input(cost.total_usd_per_month)
        self.max_usd_per_month = pulumi.Output.from_input(cost.max_usd_per_month)
        self.pool_usd_per_hour = pulumi.Output.from_input(
            {p.pool: p.usd_per_hour for p in cost.pools}
        )
        self.pool_on_demand_usd_per_hour = pulumi.Output.from_input(
            {p.pool: p.on_demand_usd_per_hour for p in cost.pools}
        )
        self.pool_spot_usd_per_hour = pulumi.Output.from_input(
            {p.pool: p.spot_usd_per_hour for p in cost.pools}
        )
        self.tenant_quotas = pulumi.Output.from_input(cost.tenants)
        self.register_outputs(
            {
                "fleet_name": self.fleet_name,
                "pool_names": self.pool_names,
                "local_pools": self.local_pools,
                "api_endpoints": self.api_endpoints,
                "controller_url": self.controller_url,
                "on_demand_usd_per_hour": self.on_demand_usd_per_hour,
                "spot_usd_per_hour": self.spot_usd_per_hour,
                "total_usd_per_hour": self.total_usd_per_hour,
                "total_usd_per_month": self.total_usd_per_month,
                "max_usd_per_month": self.max_usd_per_month,
                "pool_usd_per_hour": self.pool_usd_per_hour,
                "pool_on_demand_usd_per_hour": self.pool_on_demand_usd_per_hour,
                "pool_spot_usd_per_hour": self.pool_spot_usd_per_hour,
                "tenant_quotas": self.tenant_quotas,
            }
        )

    @staticmethod
    def _controller_url(spec: FleetSpec, settings: FleetSettings) -> str | None:
        controller = settings.controller
        if controller.url:
            return controller.url
        if controller.cluster:
            return manifests.service_url(
                manifests.controller_object_name(spec.name),
                manifests.fleet_namespace(spec.name),
                controller.port,
            )
        return None

    @staticmethod
    def _key_digests(
        spec: FleetSpec,
        api_keys: Mapping[str, pulumi.Input[str]],
        environ: Mapping[str, str] | None,
    ) -> pulumi.Output[dict[str, str]]:
        """Digests of every key reference; secret, as they derive from the key values."""
        refs = key_references(spec)
        values = {ref: api_keys[ref] for ref in refs if ref in api_keys}
        # Output.all with keyword arguments: one name per reference, in a stable order.
        names = {f"k{i}": ref for i, ref in enumerate(values)}
        gathered = (
            pulumi.Output.all(**{k: values[ref] for k, ref in names.items()})
            if names
            else pulumi.Output.from_input({})
        )
        digests = gathered.apply(
            lambda got: key_digests(spec, {names[k]: v for k, v in got.items()}, environ)
        )
        return pulumi.Output.secret(digests)


def _stack_file(spec: FleetSpec) -> str:
    """The controller's `--stack` file: the fleet (with key digests) under `fleetform:fleet`."""
    return yaml.safe_dump(
        {"config": {FLEET_CONFIG_KEY: spec.model_dump(mode="json")}}, sort_keys=False
    )
