"""The Pulumi program: builds the fleet declared in the stack's config.

Everything comes from stack config, so `pulumi config` and the Automation API (the controller's
autoscaler) can edit it:

- `fleetform:fleet`: the FleetSpec; `fleetform:replicas`: replica counts set by the autoscaler;
- `fleetform:terraformState` (+ `terraformOutputs`): Terraform outputs that `"terraform:KEY"`
  values in `fleetform:network` stand for;
- `fleetform:network`, `fleetform:agent`, `fleetform:controller`, `fleetform:clusters`: where and
  how the fleet is placed (see components/settings.py);
- secrets (`pulumi config set --secret`): `fleetToken`, `adminToken`, and every tenant key a
  `config:NAME` reference names.

`local` pools create no cloud resources: `fleetform up` runs them on the machine at hand.
"""

from typing import Any

import pulumi

from components.fleet import InferenceFleet
from components.plan import key_references, needs_key_value
from components.settings import (
    AGENT_CONFIG_KEY,
    CLUSTERS_CONFIG_KEY,
    CONTROLLER_CONFIG_KEY,
    NETWORK_CONFIG_KEY,
    settings_from_config,
)
from components.terraform import network_inputs_from_config, resolve_terraform_references
from runtime.catalog import default_catalog
from runtime.plan import fleet_cost
from runtime.spec import FLEET_CONFIG_KEY, REPLICAS_CONFIG_KEY, fleet_from_stack_config

config = pulumi.Config("fleetform")


def _object(key: str) -> Any:
    return config.get_object(key.split(":", 1)[1])


stack_config: dict[str, Any] = {FLEET_CONFIG_KEY: config.require_object("fleet")}
for key in (REPLICAS_CONFIG_KEY, NETWORK_CONFIG_KEY, AGENT_CONFIG_KEY, CONTROLLER_CONFIG_KEY):
    value = _object(key)
    if value:
        stack_config[key] = value
if NETWORK_CONFIG_KEY in stack_config:
    # "terraform:KEY" values come from the Terraform state named by fleetform:terraformState.
    stack_config[NETWORK_CONFIG_KEY] = resolve_terraform_references(
        stack_config[NETWORK_CONFIG_KEY], network_inputs_from_config()
    )
clusters = _object(CLUSTERS_CONFIG_KEY)
if clusters:
    stack_config[CLUSTERS_CONFIG_KEY] = clusters

catalog = default_catalog()
spec = fleet_from_stack_config(stack_config, source=f"stack {pulumi.get_stack()}", catalog=catalog)
settings = settings_from_config(stack_config)


def _secret(reference: str) -> pulumi.Output[str]:
    """The value of a `config:NAME` key reference (`config:ns:NAME` for another namespace)."""
    name = reference.removeprefix("config:")
    namespace, _, key = name.rpartition(":")
    return pulumi.Config(namespace or "fleetform").require_secret(key)


api_keys = {ref: _secret(ref) for ref in key_references(spec) if needs_key_value(ref)}

kubernetes_providers: dict[str, pulumi.ProviderResource] = {}
if settings.clusters:
    from pulumi_kubernetes.provider import Provider as KubernetesProvider

    for cluster, access in settings.clusters.items():
        kubernetes_providers[cluster] = KubernetesProvider(
            f"k8s-{cluster}", context=access.context, kubeconfig=access.kubeconfig
        )

fleet = InferenceFleet(
    spec.name,
    spec,
    settings=settings,
    api_keys=api_keys,
    fleet_token=config.get_secret("fleetToken"),
    admin_token=config.get_secret("adminToken"),
    kubernetes_providers=kubernetes_providers,
    catalog=catalog,
)

cost = fleet_cost(spec, catalog)
pulumi.export("fleetName", fleet.fleet_name)
pulumi.export("apiEndpoints", fleet.api_endpoints)
pulumi.export("controllerUrl", fleet.controller_url)
pulumi.export("localPools", fleet.local_pools)
pulumi.export("estimatedUsdPerHour", round(cost.total_usd_per_hour, 4))
pulumi.export("estimatedOnDemandUsdPerHour", fleet.on_demand_usd_per_hour)
pulumi.export("estimatedSpotUsdPerHour", fleet.spot_usd_per_hour)
pulumi.export("estimatedUsdPerMonth", round(cost.total_usd_per_month, 2))
pulumi.export("maxUsdPerMonth", round(cost.max_usd_per_month, 2))
pulumi.export(
    "pools",
    {p.pool: {"usdPerHour": round(p.usd_per_hour, 4), "replicas": p.replicas} for p in cost.pools},
)
pulumi.export("tenantQuotas", fleet.tenant_quotas)
