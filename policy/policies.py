"""Fleetform's CrossGuard policies: the rules every change to a fleet's stack must pass.

This module owns what `pulumi preview --policy-pack policy` checks on a Fleetform stack: the
rules as plain functions over wire-format resource properties (`instanceType`, `userData`, ...)
and over the FleetSpec, tested apart, and the `pulumi_policy` objects that wrap them
(`build_policies`). `policy/__main__.py` only packs them: `PolicyPack(...)` serves the engine
over gRPC and never returns, so nothing importable builds one.

Every change passes the same pack, whether a human edited the spec or the autoscaler rewrote
`fleetform:replicas`. So the budget is judged at max replicas (the autoscaler may reach them
without a review), tenant quotas at the replicas the stack reserves now (the rule the Terraform
export's `check` blocks use, through the same `runtime.terraform.fleet_reservation`).

Where the figures come from. The budget, quota and spot rules need the spec: max replicas,
tenants, SLO classes and catalog prices are not in the registered resources (GCP, Azure and
Kubernetes groups register only their desired size, which the autoscaler owns). They read the
stack config the engine hands every policy pack (`fleetform:fleet` plus `fleetform:replicas`,
parsed by `runtime.spec.fleet_from_stack_config` exactly as the program parses it), and check it
against what the `fleetform:index:InferenceFleet` component registered (its name, pools and
`max_usd_per_month` outputs): a program that deploys a different fleet than the config describes
fails the budget policy instead of being judged on the wrong spec. All other rules (regions and
instance families, cost tags, public IPs, agent authentication) judge the registered resources.

Policies (name: rule; enforcement):

- `fleet-budget`: the sum over pools of max replicas x hourly price (730 h a month) stays within
  `budget.usd_per_month`; mandatory.
- `tenant-quota`: what the fleet reserves for a tenant at the current replicas (accelerator-hours
  and USD per month, pools split by the tokens-per-minute rule) stays within its quotas;
  mandatory.
- `spot-for-sheddable-pools`: a pool whose traffic can only be sheddable, spot-eligible classes
  runs on spot; advisory (a cost rule: it must not block an urgent change).
- `allowed-regions-and-families`: cloud resources sit in allowed regions and nodes are of allowed
  instance families (policy config `allowedRegions`, `allowedInstanceFamilies`); mandatory.
- `cost-attribution-tags`: every instance-bearing resource carries the fleet/pool/model/tenant
  tags (labels) that cost reports group by; mandatory (untagged spend cannot be attributed).
- `agent-authentication`: node configs (VM user data, Kubernetes ConfigMaps) hold only SHA-256
  key digests, name the fleet token's variable when they push to a controller, and VM nodes
  receive that token; no pod spec carries a token in clear; mandatory.
- `agent-token-secret`: an agent Deployment whose node config names the token variable gets it
  from a Secret of the stack that holds it; mandatory.
- `no-public-ip`: no node gets a public address, no Service is exposed outside the network
  (LoadBalancer without an internal annotation, NodePort, externalIPs), and no cloud load
  balancer faces the internet (an AWS load balancer that is not `internal`, a GCP forwarding rule
  or backend service of an EXTERNAL scheme, an Azure load balancer with a public frontend);
  mandatory.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import yaml
from pulumi_policy import (
    EnforcementLevel,
    Policy,
    PolicyConfigSchema,
    PolicyResource,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from components import k8s_manifests, naming, userdata
from runtime.catalog import Catalog, default_catalog
from runtime.plan import fleet_cost, pool_hourly_usd, tenant_may_use
from runtime.spec import (
    FLEET_CONFIG_KEY,
    HOURS_PER_MONTH,
    REPLICAS_CONFIG_KEY,
    FleetSpec,
    FleetSpecError,
    PoolSpec,
    Quality,
    SloClassSpec,
    fleet_from_stack_config,
)
from runtime.terraform import fleet_reservation, pool_facts, tenant_pool_shares

PACK_NAME = "fleetform"

# Type tokens (Python has no validateResourceOfType: policies compare args.resource_type).
FLEET_TYPE = "fleetform:index:InferenceFleet"
AWS_LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
AWS_AUTOSCALING_GROUP = "aws:autoscaling/group:Group"
AWS_INSTANCE = "aws:ec2/instance:Instance"
GCP_INSTANCE_TEMPLATE = "gcp:compute/instanceTemplate:InstanceTemplate"
GCP_INSTANCE = "gcp:compute/instance:Instance"
GCP_TPU_VM = "gcp:tpu/v2Vm:V2Vm"
AZURE_SCALE_SET = "azure-native:compute:VirtualMachineScaleSet"
AZURE_VM = "azure-native:compute:VirtualMachine"
K8S_DEPLOYMENT = "kubernetes:apps/v1:Deployment"
K8S_STATEFUL_SET = "kubernetes:apps/v1:StatefulSet"
K8S_CONFIG_MAP = "kubernetes:core/v1:ConfigMap"
K8S_SECRET = "kubernetes:core/v1:Secret"
K8S_SERVICE = "kubernetes:core/v1:Service"
# Load balancers: the pools' API endpoints, and what could expose them.
AWS_LOAD_BALANCERS = frozenset(
    {
        "aws:lb/loadBalancer:LoadBalancer",
        "aws:alb/loadBalancer:LoadBalancer",  # the same resource under its older module
        "aws:elb/loadBalancer:LoadBalancer",  # Classic: internal defaults to false too
    }
)
GCP_FORWARDING_RULE = "gcp:compute/forwardingRule:ForwardingRule"
GCP_GLOBAL_FORWARDING_RULE = "gcp:compute/globalForwardingRule:GlobalForwardingRule"
GCP_REGION_BACKEND_SERVICE = "gcp:compute/regionBackendService:RegionBackendService"
GCP_BACKEND_SERVICE = "gcp:compute/backendService:BackendService"
AZURE_LOAD_BALANCER = "azure-native:network:LoadBalancer"

# What launches machines (or, on Kubernetes, the pods that occupy accelerator nodes): the
# resources that must carry cost tags and pass the region and family rules.
INSTANCE_BEARING = frozenset(
    {
        AWS_LAUNCH_TEMPLATE,
        AWS_AUTOSCALING_GROUP,
        AWS_INSTANCE,
        GCP_INSTANCE_TEMPLATE,
        GCP_INSTANCE,
        GCP_TPU_VM,
        AZURE_SCALE_SET,
        AZURE_VM,
    }
)
K8S_WORKLOADS = frozenset({K8S_DEPLOYMENT, K8S_STATEFUL_SET})
COST_TAGS = ("fleet", "pool", "model", "tenant")
TOKEN_ENVS = (k8s_manifests.FLEET_TOKEN_ENV, k8s_manifests.ADMIN_TOKEN_ENV)
K8S_INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
ACCELERATOR_RESOURCES = ("nvidia.com/gpu", "aws.amazon.com/neuron", "google.com/tpu", "amd.com/gpu")

# Defaults of `allowed-regions-and-families` (the policy config replaces them per cloud): US
# regions only (data residency), and current-generation accelerator families plus the CPU
# families Fleetform runs its small models on. Entries are shell patterns ("us-*", "*").
DEFAULT_ALLOWED_REGIONS: Mapping[str, list[str]] = {
    "aws": ["us-east-1", "us-east-2", "us-west-2"],
    "gcp": ["us-central1", "us-east1", "us-east4", "us-east5", "us-south1", "us-west1", "us-west4"],
    "azure": ["eastus", "eastus2", "centralus", "southcentralus", "westus2", "westus3"],
}
DEFAULT_ALLOWED_FAMILIES: Mapping[str, list[str]] = {
    "aws": ["g5", "g6", "g6e", "p4d", "p5", "p5e", "inf2", "trn1", "m7g", "c7g", "r7g"],
    "gcp": ["g2", "a2", "a3", "n2", "c3", "tpu-v5litepod", "tpu-v5p", "tpu-v6e"],
    "azure": [
        "Standard_NCads_A100_v4",
        "Standard_NCads_H100_v5",
        "Standard_NCads_A10_v4",
        "Standard_NCas_T4_v3",
        "Standard_NDasr_v4",
        "Standard_NDisr_H100_v5",
        "Standard_Ds_v5",
        "Standard_Das_v5",
    ],
}
CLOUDS = ("aws", "gcp", "azure")

# Annotations that make a LoadBalancer Service internal, per cloud controller.
INTERNAL_LB_ANNOTATIONS: Mapping[str, tuple[str, ...]] = {
    "service.beta.kubernetes.io/aws-load-balancer-internal": ("true",),
    "service.beta.kubernetes.io/aws-load-balancer-scheme": ("internal",),
    "networking.gke.io/load-balancer-type": ("internal",),
    "cloud.google.com/load-balancer-type": ("internal",),
    "service.beta.kubernetes.io/azure-load-balancer-internal": ("true",),
}

# GCP load-balancing schemes that give an internal address only. Forwarding rules and global
# backend services default to EXTERNAL when unset; regional backend services to INTERNAL.
GCP_INTERNAL_SCHEMES = frozenset({"INTERNAL", "INTERNAL_MANAGED", "INTERNAL_SELF_MANAGED"})
GCP_SCHEME_DEFAULTS: Mapping[str, str] = {
    GCP_FORWARDING_RULE: "EXTERNAL",
    GCP_GLOBAL_FORWARDING_RULE: "EXTERNAL",
    GCP_REGION_BACKEND_SERVICE: "INTERNAL",
    GCP_BACKEND_SERVICE: "EXTERNAL",
}

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_AZURE_SIZE = re.compile(r"^(Standard_[A-Z]+)\d+(.*)$")
# Floating-point slack when comparing a sum of prices with a limit written in the spec.
_EPSILON = 1e-6

StackConfig = Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# Reading wire-format properties. In the engine, props are read-only proxies (Mapping and
# Sequence, not dict and list) that raise UnknownValueError on a value unknown in preview.


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _get(value: Any, *path: str | int) -> Any:
    """`value[path[0]][path[1]]...`, or None where the path does not exist."""
    for key in path:
        if isinstance(key, int):
            if not _is_list(value) or not -len(value) <= key < len(value):
                return None
        elif not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _items(value: Any) -> list[Any]:
    return list(value) if _is_list(value) else []


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: float) -> str:
    """A quota or budget as the spec writes it: no '.0' on whole numbers (as the Terraform
    export's messages write it)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --------------------------------------------------------------------------------------------
# The fleet of the stack


class FleetConfigError(ValueError):
    """The stack config holds no fleet the policies can read; `str()` says why."""


def engine_stack_config() -> dict[str, Any]:
    """The fleet's keys of the stack config the engine passes the pack (PULUMI_CONFIG, read by
    `pulumi.Config`); structured values arrive as JSON text."""
    config = pulumi.Config("fleetform")
    found: dict[str, Any] = {}
    for key in (FLEET_CONFIG_KEY, REPLICAS_CONFIG_KEY):
        value = config.get(key.split(":", 1)[1])
        if value is not None:
            found[key] = value
    return found


def fleet_from_config(config: StackConfig, catalog: Catalog) -> FleetSpec:
    """The FleetSpec the program builds from this stack config (replicas applied)."""
    if FLEET_CONFIG_KEY not in config:
        raise FleetConfigError(f"stack config has no {FLEET_CONFIG_KEY}")
    try:
        return fleet_from_stack_config(config, source="stack config", catalog=catalog)
    except FleetSpecError as error:
        raise FleetConfigError(str(error)) from None


def registered_fleet_mismatches(
    spec: FleetSpec, catalog: Catalog, resources: Iterable[PolicyResource]
) -> list[tuple[str, str]]:
    """(urn, message) for each InferenceFleet whose registered outputs disagree with the fleet
    of the stack config. Outputs a component did not register are not compared."""
    problems: list[tuple[str, str]] = []
    max_usd = fleet_cost(spec, catalog).max_usd_per_month
    for resource in resources:
        if resource.resource_type != FLEET_TYPE:
            continue
        props = resource.props
        name = _get(props, "fleet_name")
        if name is not None and name != spec.name:
            problems.append(
                (
                    resource.urn,
                    f"InferenceFleet {resource.name} deploys fleet {name!r}, but the stack config "
                    f"{FLEET_CONFIG_KEY} describes {spec.name!r}: the policies cannot judge a "
                    "fleet the config does not describe",
                )
            )
            continue
        pools = _get(props, "pool_names")
        if pools is not None and sorted(pools) != sorted(p.name for p in spec.pools):
            problems.append(
                (
                    resource.urn,
                    f"InferenceFleet {resource.name} deploys pools {', '.join(sorted(pools))}, "
                    f"but the stack config has {', '.join(sorted(p.name for p in spec.pools))}",
                )
            )
        registered = _get(props, "max_usd_per_month")
        if isinstance(registered, int | float) and abs(registered - max_usd) > 0.005:
            problems.append(
                (
                    resource.urn,
                    f"InferenceFleet {resource.name} costs {registered:.2f} USD/month at max "
                    f"replicas, but the stack config gives {max_usd:.2f} USD/month: the program "
                    "does not deploy the fleet of its config",
                )
            )
    return problems


# --------------------------------------------------------------------------------------------
# Budget


def budget_violation(spec: FleetSpec, catalog: Catalog) -> str | None:
    """Why the fleet at max replicas is over its monthly budget (None: within it, or no
    budget). The figures are `runtime.plan.fleet_cost`'s, those `fleetform plan` prints."""
    if spec.budget is None:
        return None
    cost = fleet_cost(spec, catalog)
    budget = spec.budget.usd_per_month
    if cost.max_usd_per_month <= budget + _EPSILON:
        return None
    # Pools in name order, as the Terraform export's budget check lists them.
    by_pool = ", ".join(
        f"{p.pool} {p.usd_per_month_at_max:.2f} USD ({p.max_replicas} replicas)"
        for p in sorted(cost.pools, key=lambda p: p.pool)
    )
    largest = max(cost.pools, key=lambda p: (p.usd_per_month_at_max, p.pool))
    return (
        f"Fleet {spec.name}: at max_replicas the pools cost {cost.max_usd_per_month:.2f} "
        f"USD/month, over the budget of {_number(budget)} USD/month by "
        f"{cost.max_usd_per_month - budget:.2f} USD. By pool: {by_pool}. Largest: "
        f"{largest.pool}, {largest.max_replicas} x {largest.instance_type} at "
        f"{largest.usd_per_hour_at_max:.4f} USD/h = {largest.usd_per_month_at_max:.2f} USD/month."
    )


# --------------------------------------------------------------------------------------------
# Tenant quotas


def quota_violations(spec: FleetSpec, catalog: Catalog) -> list[str]:
    """One message per tenant quota the fleet breaks at its current replicas.

    Attribution is `runtime.terraform.fleet_reservation`'s (pools split among their tenants by
    tokens-per-minute quotas): the rule of `fleetform plan` and the Terraform export's checks,
    whose messages these repeat word for word.
    """
    reserved = fleet_reservation(spec, catalog)
    shares = tenant_pool_shares(spec)
    facts = {f.name: f for f in pool_facts(spec, catalog)}
    pool_accelerators = {
        p.name: p.replicas * facts[p.name].accelerators_per_replica for p in spec.pools
    }
    messages: list[str] = []
    for tenant in spec.tenants:
        tenant_shares = sorted(shares[tenant.name].items())
        limit = tenant.quotas.accelerator_hours_per_month
        hours = reserved.tenant_accelerator_hours_per_month[tenant.name]
        if limit is not None and hours > limit + _EPSILON:
            by_pool = ", ".join(
                f"{pool} {share * pool_accelerators[pool]:.2f} accelerators"
                for pool, share in tenant_shares
                if share * pool_accelerators[pool] > 0
            )
            messages.append(
                f"Tenant {tenant.name}: the fleet reserves {hours:.1f} accelerator-hours/month "
                f"for it, over its quota of {_number(limit)} accelerator-hours/month. Its share "
                f"by pool: {by_pool}."
            )
        limit = tenant.quotas.usd_per_month
        usd = reserved.tenant_usd_per_month[tenant.name]
        if limit is not None and usd > limit + _EPSILON:
            by_pool = ", ".join(
                f"{pool} {share * reserved.pool_usd_per_month[pool]:.2f} USD"
                for pool, share in tenant_shares
                if share * reserved.pool_usd_per_month[pool] > 0
            )
            messages.append(
                f"Tenant {tenant.name}: the fleet reserves {usd:.2f} USD/month of capacity for "
                f"it, over its quota of {_number(limit)} USD/month. Its share by pool: {by_pool}."
            )
    return messages


# --------------------------------------------------------------------------------------------
# Spot for sheddable pools


def served_classes(spec: FleetSpec, pool: PoolSpec) -> list[SloClassSpec]:
    """The SLO classes whose requests can be routed to `pool`, most important first.

    A tenant allowed on the pool asks for its default class or any less important one (a more
    important ask is capped at `max_priority`); routing skips a pool whose variant is below
    the class's or the tenant's minimum quality.
    """
    quality = Quality[spec.pool_variant(pool)[1].quality]
    found: dict[str, SloClassSpec] = {}
    for tenant in spec.tenants:
        if not tenant_may_use(spec, tenant.name, pool) or Quality[tenant.min_quality] > quality:
            continue
        ceiling = spec.slo_class(tenant.max_priority or tenant.default_priority)
        for slo in spec.slo_classes:
            if slo.priority >= ceiling.priority and Quality[slo.min_quality] <= quality:
                found[slo.name] = slo
    return sorted(found.values(), key=lambda c: c.priority)


def spot_violations(spec: FleetSpec, catalog: Catalog) -> list[str]:
    """A message per on-demand pool that only sheddable, spot-eligible classes can reach.

    Pools with a sheddable class that is not spot-eligible are left alone: on spot they could
    not serve it at all.
    """
    messages: list[str] = []
    for pool in spec.pools:
        if pool.spot or pool.cloud == "local":
            continue
        classes = served_classes(spec, pool)
        if not classes or not all(c.sheddable and c.spot_eligible for c in classes):
            continue
        ref = pool.price_ref
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
        on_demand = pool_hourly_usd(pool, record, pool.max_replicas) * HOURS_PER_MONTH
        message = (
            f"Pool {pool.name} serves only sheddable classes "
            f"({', '.join(c.name for c in classes)}) but runs on-demand: set spot: true. At "
            f"its {pool.max_replicas} max replicas it costs {on_demand:.2f} USD/month on-demand"
        )
        if record.spot_usd_per_hour is not None:
            as_spot = pool.model_copy(update={"spot": True, "on_demand_base": 0})
            spot = pool_hourly_usd(as_spot, record, pool.max_replicas) * HOURS_PER_MONTH
            message += f", {spot:.2f} USD/month on spot"
        messages.append(message + ".")
    return messages


# --------------------------------------------------------------------------------------------
# Regions and instance families


@dataclass(frozen=True)
class Placement:
    """Where a resource puts capacity: its cloud, region (None: global or not given) and the
    instance types it launches."""

    cloud: str
    region: str | None
    instance_types: tuple[str, ...]


def instance_family(cloud: str, instance_type: str) -> str:
    """`g5.xlarge` -> `g5`; `g2-standard-8` -> `g2`; `tpu-v5litepod-4` -> `tpu-v5litepod`;
    `Standard_NC24ads_A100_v4` -> `Standard_NCads_A100_v4` (the size's vCPU count removed)."""
    if cloud == "aws":
        return instance_type.split(".", 1)[0]
    if cloud == "gcp":
        if instance_type.startswith("tpu-"):
            return instance_type.rsplit("-", 1)[0]
        return instance_type.split("-", 1)[0]
    if cloud == "azure":
        match = _AZURE_SIZE.match(instance_type)
        return match.group(1) + match.group(2) if match else instance_type
    raise ValueError(f"unknown cloud {cloud!r}")


def node_type_cloud(instance_type: str) -> str:
    """The cloud a Kubernetes node type belongs to, from its shape (EKS `g6.xlarge`, AKS
    `Standard_...`, GKE `g2-standard-8`): a manifest does not say which cloud runs it."""
    if instance_type.startswith("Standard_"):
        return "azure"
    return "aws" if "." in instance_type else "gcp"


def _zone_region(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def placement(resource_type: str, props: Mapping[str, Any]) -> Placement | None:
    """The placement of a cloud resource, or None for what has no region or instance type."""
    cloud = resource_type.split(":", 1)[0]
    if cloud == "aws":
        types: list[str] = []
        if resource_type in (AWS_LAUNCH_TEMPLATE, AWS_INSTANCE) and _get(props, "instanceType"):
            types.append(str(props["instanceType"]))
        if resource_type == AWS_AUTOSCALING_GROUP:
            overrides = _get(props, "mixedInstancesPolicy", "launchTemplate", "overrides")
            types += [str(o["instanceType"]) for o in _items(overrides) if _get(o, "instanceType")]
        region = _get(props, "region")
        return Placement("aws", str(region) if region else None, tuple(types))
    if cloud == "gcp":
        types = []
        machine = _get(props, "machineType")
        if resource_type in (GCP_INSTANCE_TEMPLATE, GCP_INSTANCE) and machine:
            types.append(str(machine).rsplit("/", 1)[-1])
        accelerator = _get(props, "acceleratorType")
        if resource_type == GCP_TPU_VM and accelerator:
            types.append(f"tpu-{accelerator}")
        region = _get(props, "region")
        zone = _get(props, "zone")
        where = str(region) if region else _zone_region(str(zone)) if zone else None
        return Placement("gcp", where, tuple(types))
    if cloud == "azure-native":
        types = []
        if resource_type == AZURE_SCALE_SET and _get(props, "sku", "name"):
            types.append(str(props["sku"]["name"]))
        if resource_type == AZURE_VM and _get(props, "hardwareProfile", "vmSize"):
            types.append(str(props["hardwareProfile"]["vmSize"]))
        location = _get(props, "location")
        return Placement("azure", str(location) if location else None, tuple(types))
    return None


def _allowed(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def allowed_lists(config: Mapping[str, Any]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The allowed regions and families per cloud: the defaults, replaced per cloud by the
    policy config's `allowedRegions` / `allowedInstanceFamilies`."""
    regions = {**DEFAULT_ALLOWED_REGIONS, **_mapping(config.get("allowedRegions"))}
    families = {**DEFAULT_ALLOWED_FAMILIES, **_mapping(config.get("allowedInstanceFamilies"))}
    return (
        {k: [str(v) for v in _items(vs)] for k, vs in regions.items()},
        {k: [str(v) for v in _items(vs)] for k, vs in families.items()},
    )


def _pod_spec(props: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(_get(props, "spec", "template", "spec"))


def placement_problems(
    resource_type: str, props: Mapping[str, Any], config: Mapping[str, Any]
) -> list[str]:
    regions, families = allowed_lists(config)
    problems: list[str] = []
    if resource_type in K8S_WORKLOADS:
        # The cluster's region is the cluster's business; the node type is in the selector.
        selector = _mapping(_pod_spec(props).get("nodeSelector"))
        for label in K8S_INSTANCE_TYPE_LABELS:
            node_type = selector.get(label)
            if node_type:
                cloud = node_type_cloud(str(node_type))
                family = instance_family(cloud, str(node_type))
                if not _allowed(family, families.get(cloud, [])):
                    problems.append(
                        f"node type {node_type} (family {family}) is not an allowed {cloud} "
                        f"instance family ({', '.join(families.get(cloud, [])) or 'none'})"
                    )
        return problems
    where = placement(resource_type, props)
    if where is None:
        return problems
    if where.region is not None and not _allowed(where.region, regions.get(where.cloud, [])):
        problems.append(
            f"region {where.region} is not an allowed {where.cloud} region "
            f"({', '.join(regions.get(where.cloud, [])) or 'none'})"
        )
    for instance_type in where.instance_types:
        family = instance_family(where.cloud, instance_type)
        if not _allowed(family, families.get(where.cloud, [])):
            problems.append(
                f"instance type {instance_type} (family {family}) is not an allowed "
                f"{where.cloud} instance family "
                f"({', '.join(families.get(where.cloud, [])) or 'none'})"
            )
    return problems


# --------------------------------------------------------------------------------------------
# Cost-attribution tags


def _tag_problem(
    tags: Mapping[str, Any], style: naming.TagStyle, where: str | None = None
) -> str | None:
    missing = [
        naming.tag_key(style, what)
        for what in COST_TAGS
        if not str(tags.get(naming.tag_key(style, what)) or "").strip()
    ]
    if not missing:
        return None
    suffix = f" {where}" if where else ""
    return f"missing cost-attribution tag(s) {', '.join(missing)}{suffix}"


def is_agent_workload(props: Mapping[str, Any]) -> bool:
    """A Kubernetes workload that runs Fleetform agents or requests accelerators: the pods
    that occupy a pool's nodes (the controller, a plain service, is neither)."""
    labels = _mapping(_get(props, "spec", "template", "metadata", "labels"))
    if labels.get("app.kubernetes.io/name") == k8s_manifests.AGENT_APP:
        return True
    for container in _items(_pod_spec(props).get("containers")):
        if _agent_container(container):
            return True
        for section in ("requests", "limits"):
            wanted = _mapping(_get(container, "resources", section))
            if any(name in wanted for name in ACCELERATOR_RESOURCES):
                return True
    return False


def is_instance_bearing(resource_type: str, props: Mapping[str, Any]) -> bool:
    """Whether the resource launches nodes, or pods that occupy a pool's nodes."""
    if resource_type in K8S_WORKLOADS:
        return is_agent_workload(props)
    return resource_type in INSTANCE_BEARING


def cost_tag_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    """What an instance-bearing resource lacks of the fleet/pool/model/tenant tags."""
    if not is_instance_bearing(resource_type, props):
        return []
    problems: list[str | None] = []
    if resource_type in (AWS_LAUNCH_TEMPLATE, AWS_INSTANCE):
        problems.append(_tag_problem(_mapping(_get(props, "tags")), "aws"))
    if resource_type == AWS_LAUNCH_TEMPLATE:
        # The template's own tags stay on the template: instances get tagSpecifications'.
        instance_tags = [
            _mapping(_get(spec, "tags"))
            for spec in _items(_get(props, "tagSpecifications"))
            if _get(spec, "resourceType") == "instance"
        ]
        if not instance_tags:
            problems.append("no tagSpecifications for resourceType instance: instances untagged")
        for tags in instance_tags:
            problems.append(_tag_problem(tags, "aws", "on the instances it launches"))
    elif resource_type == AWS_AUTOSCALING_GROUP:
        propagated = {
            str(_get(tag, "key")): _get(tag, "value")
            for tag in _items(_get(props, "tags"))
            if _get(tag, "propagateAtLaunch") is True
        }
        problems.append(_tag_problem(propagated, "aws", "propagated at launch"))
    elif resource_type in (GCP_INSTANCE_TEMPLATE, GCP_INSTANCE, GCP_TPU_VM):
        problems.append(_tag_problem(_mapping(_get(props, "labels")), "gcp", "(labels)"))
    elif resource_type in (AZURE_SCALE_SET, AZURE_VM):
        problems.append(_tag_problem(_mapping(_get(props, "tags")), "azure"))
    elif resource_type in K8S_WORKLOADS:
        labels = _mapping(_get(props, "spec", "template", "metadata", "labels"))
        problems.append(_tag_problem(labels, "kubernetes", "on its pod template"))
    return [p for p in problems if p]


# --------------------------------------------------------------------------------------------
# Agent authentication


def _b64_text(text: str) -> str | None:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def user_data_text(resource_type: str, props: Mapping[str, Any]) -> str | None:
    """A VM resource's user data as text (base64 where the API wants it so), or None."""
    if resource_type == AWS_LAUNCH_TEMPLATE:
        data = _get(props, "userData")
        return _b64_text(str(data)) if data else None
    if resource_type == AWS_INSTANCE:
        if _get(props, "userDataBase64"):
            return _b64_text(str(props["userDataBase64"]))
        data = _get(props, "userData")
        return str(data) if data else None
    if resource_type in (GCP_INSTANCE_TEMPLATE, GCP_INSTANCE, GCP_TPU_VM):
        data = _get(props, "metadata", "user-data")
        return str(data) if data else None
    if resource_type == AZURE_SCALE_SET:
        os_profile = _get(props, "virtualMachineProfile", "osProfile")
        data = _get(os_profile, "customData") or _get(props, "virtualMachineProfile", "userData")
        return _b64_text(str(data)) if data else None
    if resource_type == AZURE_VM:
        data = _get(props, "osProfile", "customData") or _get(props, "userData")
        return _b64_text(str(data)) if data else None
    return None


def _file_content(entry: Mapping[str, Any]) -> str:
    content = str(entry.get("content") or "")
    if str(entry.get("encoding") or "").lower() in ("b64", "base64"):
        return _b64_text(content) or ""
    return content


def cloud_config_files(text: str) -> dict[str, Mapping[str, Any]] | None:
    """The write_files entries of a cloud-config by path (None: not a cloud-config)."""
    if not text.lstrip().startswith("#cloud-config"):
        return None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(document, Mapping):
        return None
    files = document.get("write_files") or []
    return {str(f.get("path")): f for f in files if isinstance(f, Mapping)}


def node_config_problems(config: Any) -> list[str]:
    """What lets an agent with this node config accept or send unauthenticated requests: keys
    that are not SHA-256 digests, a tenant without keys, a controller push without a token."""
    if not isinstance(config, Mapping):
        return ["node config is not a JSON object"]
    problems: list[str] = []
    for tenant in _items(config.get("tenants")):
        name = _get(tenant, "name") or "?"
        if _get(tenant, "api_keys") is not None:
            problems.append(
                f"tenant {name}: api_keys in a node config (only key_sha256 digests belong there)"
            )
        digests = _items(_get(tenant, "key_sha256"))
        if not digests:
            problems.append(f"tenant {name}: no key digests (key_sha256 is empty)")
        bad = [d for d in digests if not isinstance(d, str) or not _SHA256.match(d)]
        if bad:
            problems.append(
                f"tenant {name}: {len(bad)} key_sha256 entr{'y is' if len(bad) == 1 else 'ies are'}"
                " not a SHA-256 hex digest (a plaintext key?)"
            )
    if config.get("controller_url") and not config.get("fleet_token_env"):
        problems.append(
            f"pushes to the controller at {config['controller_url']} without a fleet token "
            "(fleet_token_env is not set)"
        )
    return problems


def _env_file_value(content: str, name: str) -> str | None:
    for line in content.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == name:
            return value.strip().strip("'\"")
    return None


def user_data_problems(text: str) -> list[str]:
    """Authentication problems of a node's cloud-config. User data that writes no agent node
    config is not an agent's, and is not judged."""
    files = cloud_config_files(text)
    if files is None or userdata.NODE_CONFIG_PATH not in files:
        return []
    try:
        config = json.loads(_file_content(files[userdata.NODE_CONFIG_PATH]))
    except json.JSONDecodeError:
        return [f"{userdata.NODE_CONFIG_PATH} is not JSON: the agent's tenants cannot be checked"]
    problems = [f"{userdata.NODE_CONFIG_PATH}: {p}" for p in node_config_problems(config)]
    token_env = config.get("fleet_token_env") if isinstance(config, Mapping) else None
    if not token_env:
        return problems
    # The agent's unit must load an environment file that sets the token, readable by root only.
    units = [_file_content(f) for f in files.values() if "fleetform agent" in _file_content(f)]
    env_paths = {
        line.split("=", 1)[1].strip().lstrip("-")
        for unit in units
        for line in unit.splitlines()
        if line.strip().startswith("EnvironmentFile=")
    }
    sources = [
        (path, files[path])
        for path in sorted(env_paths)
        if path in files and _env_file_value(_file_content(files[path]), token_env)
    ]
    if not sources:
        problems.append(
            f"fleet_token_env {token_env} is set by no environment file of the agent's unit: "
            "the agent would run without its fleet token"
        )
    for path, entry in sources:
        mode = str(entry.get("permissions") or "")
        if mode not in ("0600", "0400", "600", "400"):
            problems.append(f"{path} holds the fleet token with permissions {mode or 'unset'}")
    return problems


def config_map_problems(props: Mapping[str, Any]) -> list[str]:
    """Authentication problems of a ConfigMap: agent node configs it holds, tokens in clear."""
    problems: list[str] = []
    data = _mapping(_get(props, "data"))
    for key in sorted(data):
        if key in TOKEN_ENVS:
            problems.append(f"data.{key}: a token in a ConfigMap (put it in a Secret)")
            continue
        try:
            config = json.loads(str(data[key]))
        except json.JSONDecodeError:
            continue
        # A node config: what `fleetform agent --config` reads.
        if isinstance(config, Mapping) and "node_id" in config and "tenants" in config:
            problems += [f"data.{key}: {p}" for p in node_config_problems(config)]
    return problems


def _agent_container(container: Any) -> bool:
    words = [str(w) for w in _items(_get(container, "command")) + _items(_get(container, "args"))]
    return any("fleetform agent" in w for w in words) or words[:2] == ["fleetform", "agent"]


def pod_token_problems(props: Mapping[str, Any]) -> list[str]:
    """Tokens written in clear into a workload's pod spec."""
    problems = []
    for container in _items(_pod_spec(props).get("containers")):
        for env in _items(_get(container, "env")):
            if _get(env, "name") in TOKEN_ENVS and _get(env, "value"):
                problems.append(
                    f"container {_get(container, 'name')}: {env['name']} is set in clear in the "
                    "pod spec (take it from a Secret)"
                )
    return problems


def agent_authentication_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    if resource_type == K8S_CONFIG_MAP:
        return config_map_problems(props)
    if resource_type in K8S_WORKLOADS:
        return pod_token_problems(props)
    text = user_data_text(resource_type, props)
    return user_data_problems(text) if text else []


def _namespace(props: Mapping[str, Any]) -> str:
    return str(_get(props, "metadata", "namespace") or "default")


def _secret_value(secret: Mapping[str, Any], key: str) -> str:
    value = _get(secret, "stringData", key)
    if value:
        return str(value)
    encoded = _get(secret, "data", key)
    return (_b64_text(str(encoded)) or "") if encoded else ""


def agent_token_secret_problems(resources: Sequence[PolicyResource]) -> list[tuple[str, str]]:
    """(urn, message) per agent workload whose node config names a fleet token variable the
    container does not get from a Secret of the stack that holds it."""
    config_maps: dict[tuple[str, str], Mapping[str, Any]] = {}
    secrets: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in resources:
        if r.resource_type in (K8S_CONFIG_MAP, K8S_SECRET):
            key = (_namespace(r.props), str(_get(r.props, "metadata", "name")))
            (config_maps if r.resource_type == K8S_CONFIG_MAP else secrets)[key] = r.props
    problems: list[tuple[str, str]] = []
    for r in resources:
        if r.resource_type not in K8S_WORKLOADS:
            continue
        ns = _namespace(r.props)
        pod = _pod_spec(r.props)
        volumes = {
            str(_get(v, "name")): str(_get(v, "configMap", "name"))
            for v in _items(pod.get("volumes"))
            if _get(v, "configMap", "name")
        }
        for container in _items(pod.get("containers")):
            if not _agent_container(container):
                continue
            name = _get(container, "name")
            token_envs: set[str] = set()
            for mount in _items(_get(container, "volumeMounts")):
                config_map = volumes.get(str(_get(mount, "name")))
                if config_map is None:
                    continue
                if (ns, config_map) not in config_maps:
                    problems.append(
                        (
                            r.urn,
                            f"agent container {name} mounts ConfigMap {ns}/{config_map}, which "
                            "this stack does not define: its node config cannot be checked",
                        )
                    )
                    continue
                for text in _mapping(_get(config_maps[(ns, config_map)], "data")).values():
                    try:
                        node = json.loads(str(text))
                    except json.JSONDecodeError:
                        continue
                    if isinstance(node, Mapping) and node.get("fleet_token_env"):
                        token_envs.add(str(node["fleet_token_env"]))
            for token_env in sorted(token_envs):
                if not _token_from_secret(container, token_env, ns, secrets):
                    problems.append(
                        (
                            r.urn,
                            f"agent container {name} gets {token_env} from no Secret of the "
                            "stack that holds it: the agent would run without its fleet token",
                        )
                    )
    return problems


def _token_from_secret(
    container: Any,
    token_env: str,
    ns: str,
    secrets: Mapping[tuple[str, str], Mapping[str, Any]],
) -> bool:
    for env in _items(_get(container, "env")):
        if _get(env, "name") == token_env:
            ref = _get(env, "valueFrom", "secretKeyRef")
            secret = secrets.get((ns, str(_get(ref, "name"))))
            # An explicit env entry takes precedence over envFrom: it decides.
            return bool(ref and secret and _secret_value(secret, str(_get(ref, "key"))))
    for source in _items(_get(container, "envFrom")):
        name = _get(source, "secretRef", "name")
        prefix = str(_get(source, "prefix") or "")
        secret = secrets.get((ns, str(name))) if name else None
        if (
            secret
            and token_env.startswith(prefix)
            and _secret_value(secret, token_env[len(prefix) :])
        ):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Public IPs


def public_ip_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    """How a node could get a public address, or a Service be reached from outside."""
    problems: list[str] = []
    if resource_type == AWS_LAUNCH_TEMPLATE:
        interfaces = _items(_get(props, "networkInterfaces"))
        if not interfaces:
            problems.append(
                "no networkInterfaces: whether nodes get a public IP is left to the subnet's "
                "default; declare the interface with associatePublicIpAddress false"
            )
        for index, interface in enumerate(interfaces):
            value = _get(interface, "associatePublicIpAddress")
            if str(value).lower() != "false":
                problems.append(
                    f"networkInterfaces[{index}].associatePublicIpAddress is "
                    f"{'unset' if value is None else value}: it must be false"
                )
    elif resource_type == AWS_INSTANCE:
        if _get(props, "associatePublicIpAddress") is not False:
            problems.append("associatePublicIpAddress must be false")
    elif resource_type in (GCP_INSTANCE_TEMPLATE, GCP_INSTANCE):
        for index, interface in enumerate(_items(_get(props, "networkInterfaces"))):
            for field in ("accessConfigs", "ipv6AccessConfigs"):
                if _items(_get(interface, field)):
                    problems.append(f"networkInterfaces[{index}].{field} gives an external IP")
    elif resource_type == GCP_TPU_VM:
        if _get(props, "networkConfig", "enableExternalIps") is True:
            problems.append("networkConfig.enableExternalIps is true")
    elif resource_type in (AZURE_SCALE_SET, AZURE_VM):
        profile = (
            _get(props, "virtualMachineProfile", "networkProfile")
            if resource_type == AZURE_SCALE_SET
            else _get(props, "networkProfile")
        )
        for nic in _items(_get(profile, "networkInterfaceConfigurations")):
            for ip in _items(_get(nic, "ipConfigurations")):
                if _get(ip, "publicIPAddressConfiguration") is not None:
                    problems.append(
                        f"network interface {_get(nic, 'name')}, ip configuration "
                        f"{_get(ip, 'name')}: publicIPAddressConfiguration gives a public IP"
                    )
    elif resource_type == K8S_SERVICE:
        kind = _get(props, "spec", "type") or "ClusterIP"
        annotations = _mapping(_get(props, "metadata", "annotations"))
        internal = any(
            str(annotations.get(key, "")).lower() in values
            for key, values in INTERNAL_LB_ANNOTATIONS.items()
        )
        if kind == "LoadBalancer" and not internal:
            problems.append(
                "type LoadBalancer without an internal load-balancer annotation "
                f"({', '.join(INTERNAL_LB_ANNOTATIONS)})"
            )
        if kind == "NodePort":
            problems.append("type NodePort opens the port on every node's address")
        if _items(_get(props, "spec", "externalIPs")):
            problems.append("spec.externalIPs exposes the Service on external addresses")
    elif resource_type in AWS_LOAD_BALANCERS:
        # Unset means internet-facing: only an explicit internal=true keeps it in the VPC.
        if _get(props, "internal") is not True:
            value = _get(props, "internal")
            problems.append(
                f"internal is {'unset' if value is None else value}: the load balancer is "
                "internet-facing; set internal true"
            )
    elif resource_type in GCP_SCHEME_DEFAULTS:
        scheme = _get(props, "loadBalancingScheme")
        effective = GCP_SCHEME_DEFAULTS[resource_type] if scheme is None else str(scheme)
        # A Private Service Connect endpoint sets the scheme to "": an internal address.
        if effective != "" and effective.upper() not in GCP_INTERNAL_SCHEMES:
            shown = f"unset (so {effective})" if scheme is None else effective
            problems.append(
                f"loadBalancingScheme is {shown}: an external load balancer; use INTERNAL"
            )
    elif resource_type == AZURE_LOAD_BALANCER:
        for index, frontend in enumerate(_items(_get(props, "frontendIPConfigurations"))):
            for field in ("publicIPAddress", "publicIPPrefix"):
                if _get(frontend, field) is not None:
                    problems.append(
                        f"frontendIPConfigurations[{index}] ({_get(frontend, 'name')}): "
                        f"{field} makes the load balancer public"
                    )
    return problems


# --------------------------------------------------------------------------------------------
# The policies


def _resource_policy(
    name: str,
    description: str,
    check: Callable[[ResourceValidationArgs], list[str]],
    enforcement: EnforcementLevel,
    config_schema: PolicyConfigSchema | None = None,
) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        for problem in check(args):
            report_violation(f"{args.name} ({args.resource_type}): {problem}", None)

    return ResourceValidationPolicy(
        name=name,
        description=description,
        validate=validate,
        enforcement_level=enforcement,
        config_schema=config_schema,
    )


REGIONS_CONFIG_SCHEMA = PolicyConfigSchema(
    properties={
        "allowedRegions": {
            "type": "object",
            "description": "Allowed regions per cloud (aws, gcp, azure); shell patterns. A "
            "cloud not named keeps the default (US regions).",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
            "default": {k: list(v) for k, v in DEFAULT_ALLOWED_REGIONS.items()},
        },
        "allowedInstanceFamilies": {
            "type": "object",
            "description": "Allowed instance families per cloud: g5 (aws), g2 or tpu-v5litepod "
            "(gcp), Standard_NCads_A100_v4 (azure); shell patterns. A cloud not named keeps the "
            "default. Kubernetes node types are checked against their cloud's list.",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
            "default": {k: list(v) for k, v in DEFAULT_ALLOWED_FAMILIES.items()},
        },
    }
)


def build_policies(
    stack_config: Callable[[], StackConfig] = engine_stack_config,
    catalog: Callable[[], Catalog] = default_catalog,
) -> list[Policy]:
    """Every policy of the pack. `stack_config` returns the stack's config (default: what the
    engine passes the pack); tests pass a stack file's `config:`."""

    def fleet(args: StackValidationArgs, report_violation: ReportViolation) -> FleetSpec | None:
        """The stack's fleet; None (the policy does not apply) in a stack without one, or a
        violation when the config cannot be read."""
        config = stack_config()
        if FLEET_CONFIG_KEY not in config and not any(
            r.resource_type == FLEET_TYPE for r in args.resources
        ):
            args.not_applicable(f"the stack config has no {FLEET_CONFIG_KEY}")
        try:
            return fleet_from_config(config, catalog())
        except FleetConfigError as error:
            report_violation(f"the fleet cannot be judged: {error}", None)
            return None

    def validate_budget(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        spec = fleet(args, report_violation)
        if spec is None:
            return
        for urn, message in registered_fleet_mismatches(spec, catalog(), args.resources):
            report_violation(message, urn)
        message = budget_violation(spec, catalog())
        if message:
            report_violation(message, _fleet_urn(args.resources, spec))

    def validate_quota(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        spec = fleet(args, report_violation)
        if spec is None:
            return
        for message in quota_violations(spec, catalog()):
            report_violation(message, _fleet_urn(args.resources, spec))

    def validate_spot(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        spec = fleet(args, report_violation)
        if spec is None:
            return
        for message in spot_violations(spec, catalog()):
            report_violation(message, _fleet_urn(args.resources, spec))

    def validate_token_secrets(
        args: StackValidationArgs, report_violation: ReportViolation
    ) -> None:
        for urn, message in agent_token_secret_problems(args.resources):
            report_violation(message, urn)

    return [
        StackValidationPolicy(
            name="fleet-budget",
            description="At max replicas, the fleet's pools (max replicas x hourly price, 730 "
            "hours a month) cost no more than the stack's budget.usd_per_month.",
            validate=validate_budget,
            enforcement_level=EnforcementLevel.MANDATORY,
        ),
        StackValidationPolicy(
            name="tenant-quota",
            description="At the current replicas, the accelerator-hours and USD the fleet "
            "reserves for each tenant stay within its quotas.",
            validate=validate_quota,
            enforcement_level=EnforcementLevel.MANDATORY,
        ),
        StackValidationPolicy(
            name="spot-for-sheddable-pools",
            description="A pool that only sheddable, spot-eligible classes can reach runs on "
            "spot capacity.",
            validate=validate_spot,
            enforcement_level=EnforcementLevel.ADVISORY,
        ),
        _resource_policy(
            "allowed-regions-and-families",
            "Cloud resources sit in allowed regions and nodes are of allowed instance families.",
            lambda args: placement_problems(args.resource_type, args.props, args.get_config()),
            EnforcementLevel.MANDATORY,
            REGIONS_CONFIG_SCHEMA,
        ),
        _resource_policy(
            "cost-attribution-tags",
            "Every instance-bearing resource carries the fleet, pool, model and tenant cost tags.",
            lambda args: cost_tag_problems(args.resource_type, args.props),
            EnforcementLevel.MANDATORY,
        ),
        _resource_policy(
            "agent-authentication",
            "Agents are never configured without authentication: node configs hold key "
            "digests only and carry the fleet token whenever they push to a controller.",
            lambda args: agent_authentication_problems(args.resource_type, args.props),
            EnforcementLevel.MANDATORY,
        ),
        StackValidationPolicy(
            name="agent-token-secret",
            description="An agent Deployment whose node config names a fleet token variable "
            "gets it from a Secret of the stack.",
            validate=validate_token_secrets,
            enforcement_level=EnforcementLevel.MANDATORY,
        ),
        _resource_policy(
            "no-public-ip",
            "Nodes get no public IP, and no Service or load balancer is exposed outside the "
            "network.",
            lambda args: public_ip_problems(args.resource_type, args.props),
            EnforcementLevel.MANDATORY,
        ),
    ]


def _fleet_urn(resources: Iterable[PolicyResource], spec: FleetSpec) -> str | None:
    """The URN of the InferenceFleet deploying `spec` (violations attach to it)."""
    for resource in resources:
        if resource.resource_type == FLEET_TYPE and _get(resource.props, "fleet_name") in (
            spec.name,
            None,
        ):
            return resource.urn
    return None
