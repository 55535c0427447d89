"""Placement, sizing, quota and cost math of the Pulumi components. Pure: no pulumi import.

This module owns every decision the cloud components make from a FleetSpec and the catalog,
as plain data the ComponentResources turn into resources one to one:

- per pool (`plan_pool`): the catalog record, the accelerator family and its Kubernetes
  resource name, CPU architecture, OS image (AWS SSM public parameter, GCP image, Azure image
  reference), replica bounds, how spot and on-demand capacity are split, cost tags;
- VM pools' internal load balancers (`load_balancer_plan`): which pools get one, the port, the
  `/readyz` health check and its timing, the drain delay, the endpoint URL, Azure child IDs;
- Kubernetes: pod resources, node selectors and tolerations, PriorityClass values, and each
  tenant's ResourceQuota over accelerators, CPU and memory;
- API keys: which key references a fleet needs and the spec with each replaced by its digest,
  so node configs are built by `runtime.agent.config.node_config_from_spec` from digests only;
- costs: the fleet's on-demand and spot hourly cost per pool and in total, from
  `runtime.plan.fleet_cost` (the same figures `fleetform plan` prints), and tenant summaries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from runtime.agent.config import hash_api_key, resolve_key_reference
from runtime.catalog import Catalog, InstanceRecord
from runtime.plan import fleet_cost, tenant_may_use
from runtime.spec import HOURS_PER_MONTH, FleetSpec, PoolSpec, SloClassSpec

from . import naming

AcceleratorFamily = Literal["nvidia", "neuron", "tpu"]
Arch = Literal["x86_64", "arm64"]

# Extended-resource names the device plugins advertise.
K8S_ACCELERATOR_RESOURCES: Mapping[AcceleratorFamily, str] = {
    "nvidia": "nvidia.com/gpu",
    "neuron": "aws.amazon.com/neuron",
    "tpu": "google.com/tpu",
}

# Graviton families carry a 'g' after the generation digit: m7g, c7gn, r6gd, g5g, t4g, x2gd.
_AWS_ARM = re.compile(r"^[a-z]+\d+[a-z]*g[a-z]*\.")

# Ubuntu 24.04 everywhere a node runs the agent: its python3 is 3.12 (the project needs 3.11+).
AWS_AMI_PARAMETERS: Mapping[tuple[str, Arch], str] = {
    # Deep Learning Base OSS NVIDIA driver AMI: the driver and CUDA come with the image.
    ("nvidia", "x86_64"): (
        "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
    ),
    ("nvidia", "arm64"): (
        "/aws/service/deeplearning/ami/arm64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
    ),
    # Neuron DLAMI for Inferentia and Trainium: the Neuron driver and runtime come with it.
    ("neuron", "x86_64"): "/aws/service/neuron/dlami/multi-framework/ubuntu-24.04/latest/image_id",
    ("cpu", "x86_64"): (
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    ),
    ("cpu", "arm64"): (
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id"
    ),
}
GCP_UBUNTU_IMAGE = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"
# TPU VM runtime per TPU family (the software image of a TPU VM; Ubuntu 22.04 based).
TPU_RUNTIME_VERSIONS: Mapping[str, str] = {
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
AZURE_UBUNTU_IMAGE: Mapping[str, str] = {
    "publisher": "Canonical",
    "offer": "ubuntu-24_04-lts",
    "sku": "server",
    "version": "latest",
}
BOOT_DISK_GB: Mapping[str, int] = {"nvidia": 200, "neuron": 200, "tpu": 100, "cpu": 50}

# PriorityClass values: the most important class (priority 0) gets the highest value, well
# below the 1e9 reserved for system-critical pods.
PRIORITY_CLASS_BASE = 100_000
PRIORITY_CLASS_STEP = 1_000
# What a node keeps for the kubelet, the OS and daemons when the agent's pod is sized.
POD_CPU_SHARE = 0.85
POD_MEMORY_SHARE = 0.80


class PlanError(ValueError):
    """A spec the components cannot place; `str()` says which pool and why."""


# --------------------------------------------------------------------------------------------
# Hardware facts


def accelerator_family(record: InstanceRecord) -> AcceleratorFamily | None:
    """Which device plugin serves the instance's accelerators (None: CPU only)."""
    name = (record.accelerator_name or "").lower()
    if record.accelerator_kind == "cpu" or not name:
        return None
    if name.startswith(("inferentia", "trainium")):
        return "neuron"
    if name.startswith("tpu-"):
        return "tpu"
    return "nvidia"


def aws_arch(instance_type: str) -> Arch:
    return "arm64" if _AWS_ARM.match(instance_type) else "x86_64"


def aws_ami_parameter(record: InstanceRecord) -> str:
    """The SSM public parameter naming the AMI for an AWS instance type."""
    family = accelerator_family(record) or "cpu"
    key = (family, aws_arch(record.instance_type))
    if key not in AWS_AMI_PARAMETERS:
        raise PlanError(f"no AMI for {record.instance_type} ({family}, {key[1]})")
    return AWS_AMI_PARAMETERS[key]


def tpu_runtime_version(record: InstanceRecord) -> str:
    family = record.instance_type.removeprefix("tpu-").rsplit("-", 1)[0]
    if family not in TPU_RUNTIME_VERSIONS:
        raise PlanError(f"no TPU runtime for {record.instance_type} (family {family!r})")
    return TPU_RUNTIME_VERSIONS[family]


def whole_accelerators(record: InstanceRecord) -> int:
    """Accelerators a node requests from its device plugin (fractional shares round up)."""
    return math.ceil(record.accelerator_count) if accelerator_family(record) else 0


# --------------------------------------------------------------------------------------------
# Pools


@dataclass(frozen=True)
class MarketGroup:
    """One group of identical nodes of a pool: a managed instance group / scale set.

    A spot pool with an on-demand base is one AWS group (its mixed-instances policy keeps the
    base on-demand); GCP and Azure groups have a single market, so the base is a second group.
    """

    suffix: str  # "" for the pool's only group, else "od" / "spot"
    spot: bool
    min_size: int
    max_size: int
    size: int


@dataclass(frozen=True)
class PoolPlan:
    fleet: str
    pool: PoolSpec
    record: InstanceRecord
    model: str
    variant: str
    tenants: tuple[str, ...]  # tenants allowed on the pool
    family: AcceleratorFamily | None
    accelerators: int  # per node, whole devices

    @property
    def name(self) -> str:
        return self.pool.name

    @property
    def tenant_tag(self) -> str:
        return naming.tenant_tag(self.tenants)

    def tags(self, style: naming.TagStyle) -> dict[str, str]:
        return naming.cost_tags(
            style,
            fleet=self.fleet,
            pool=self.pool.name,
            model=self.model,
            tenant=self.tenant_tag,
            extra=self.pool.tags,
        )

    @property
    def accelerator_resource(self) -> str | None:
        return K8S_ACCELERATOR_RESOURCES[self.family] if self.family else None


def plan_pool(spec: FleetSpec, pool: PoolSpec, catalog: Catalog) -> PoolPlan:
    ref = pool.price_ref
    record = catalog.get(ref.cloud, ref.region, ref.instance_type)
    model, variant = spec.pool_variant(pool)
    family = None if pool.cloud == "local" else accelerator_family(record)
    return PoolPlan(
        fleet=spec.name,
        pool=pool,
        record=record,
        model=model.name,
        variant=variant.name,
        tenants=tuple(t.name for t in spec.tenants if tenant_may_use(spec, t.name, pool)),
        family=family,
        accelerators=whole_accelerators(record) if family else 0,
    )


def market_groups(pool: PoolSpec, *, native_mix: bool) -> list[MarketGroup]:
    """The node groups of a pool. `native_mix`: the cloud keeps an on-demand base inside one
    spot group (AWS mixed-instances policy); otherwise the base is its own on-demand group."""
    if not pool.spot or pool.on_demand_base == 0 or native_mix:
        return [MarketGroup("", pool.spot, pool.min_replicas, pool.max_replicas, pool.replicas)]
    base = pool.on_demand_base
    od_size = min(base, pool.replicas)
    return [
        MarketGroup("od", False, min(base, pool.min_replicas), base, od_size),
        MarketGroup(
            "spot",
            True,
            max(pool.min_replicas - base, 0),
            max(pool.max_replicas - base, 0),
            pool.replicas - od_size,
        ),
    ]


def aws_instances_distribution(pool: PoolSpec) -> dict[str, Any] | None:
    """The ASG's mixed-instances distribution of a spot pool (None for on-demand pools)."""
    if not pool.spot:
        return None
    return {
        "on_demand_base_capacity": pool.on_demand_base,
        # Everything above the base is spot.
        "on_demand_percentage_above_base_capacity": 0,
        # Lowest price among the pools with the most spare capacity: fewer interruptions than
        # lowest-price, which is what a serving fleet wants.
        "spot_allocation_strategy": "price-capacity-optimized",
    }


def gcp_scheduling(*, spot: bool, has_accelerator: bool) -> dict[str, Any]:
    """Instance-template scheduling: GPUs cannot live-migrate, so host maintenance terminates;
    spot VMs are deleted on preemption and the managed group recreates them."""
    scheduling: dict[str, Any] = {
        "on_host_maintenance": "TERMINATE" if (spot or has_accelerator) else "MIGRATE",
        "automatic_restart": not spot,
    }
    if spot:
        scheduling.update(
            provisioning_model="SPOT", preemptible=True, instance_termination_action="DELETE"
        )
    else:
        scheduling.update(provisioning_model="STANDARD", preemptible=False)
    return scheduling


def gcp_accelerators(record: InstanceRecord) -> list[dict[str, Any]]:
    if accelerator_family(record) != "nvidia" or not record.gcp_accelerator_type:
        return []
    return [{"type": record.gcp_accelerator_type, "count": whole_accelerators(record)}]


def gcp_zones(record: InstanceRecord, limit: int = 3) -> list[str]:
    """Zones of the region that offer the instance (a regional group spreads over them)."""
    return list(record.zones[:limit])


def tpu_zones(record: InstanceRecord, count: int) -> list[str]:
    """One zone per TPU VM, round-robin over the zones that offer the slice."""
    if not record.zones:
        raise PlanError(f"{record.instance_type} lists no zone in {record.region}")
    return [record.zones[i % len(record.zones)] for i in range(count)]


def azure_max_price(record: InstanceRecord) -> float:
    """Spot max price: never pay more than on-demand (-1, Azure's 'up to on-demand', when the
    catalog has no on-demand price)."""
    return record.on_demand_usd_per_hour if record.on_demand_usd_per_hour else -1.0


def azure_image(record: InstanceRecord) -> dict[str, str]:
    return dict(AZURE_UBUNTU_IMAGE)


def boot_disk_gb(family: AcceleratorFamily | None) -> int:
    # Model weights and the upstream server's wheels land on the boot disk.
    return BOOT_DISK_GB[family or "cpu"]


# --------------------------------------------------------------------------------------------
# Internal load balancers: the API endpoint of a VM pool

# The agent answers 200 only when it can take requests: 503 while the model loads and from the
# first moment of a drain (SIGTERM, spot notice, /admin/drain), so health checks on it take
# loading and draining nodes out of rotation (runtime.agent.app.readyz).
AGENT_READY_PATH = "/readyz"
API_BASE_PATH = "/v1"  # the agent's OpenAI-compatible routes
# Health checks: a node that turns unready leaves rotation within interval x unhealthy (10 s),
# well inside the agent's default 30 s drain. Every cloud accepts these values: AWS NLB (HTTP:
# interval 5-300, timeout 2-120 and below the interval, thresholds 2-10), GCP (timeout <=
# interval), Azure (interval >= 5; no timeout of its own).
HEALTH_INTERVAL_S = 5
HEALTH_TIMEOUT_S = 3
HEALTHY_THRESHOLD = 2
UNHEALTHY_THRESHOLD = 2
# AWS deregistration delay and GCP connection draining take at most an hour.
MAX_DRAIN_S = 3600
# Where Google's health checks (and the internal passthrough load balancer's) come from: a
# firewall rule must admit them to the agent port.
GCP_HEALTH_CHECK_RANGES = ("35.191.0.0/16", "130.211.0.0/22")
# Azure probes come from 168.63.129.16, named by this service tag in NSG rules.
AZURE_PROBE_SOURCE = "AzureLoadBalancer"
AZURE_LB_CHILD_KINDS = ("frontendIPConfigurations", "backendAddressPools", "probes")
_AZURE_SUBSCRIPTION = re.compile(r"^/subscriptions/([^/]+)/", re.IGNORECASE)


@dataclass(frozen=True)
class HealthCheckPlan:
    """An HTTP health check of the agent (the same on every cloud)."""

    path: str
    port: int
    interval_s: int
    timeout_s: int
    healthy_threshold: int
    unhealthy_threshold: int

    @property
    def out_of_rotation_s(self) -> int:
        """Worst case from a node turning unready to the load balancer leaving it out."""
        return self.interval_s * self.unhealthy_threshold


@dataclass(frozen=True)
class LoadBalancerPlan:
    """The internal load balancer in front of a VM pool's agents."""

    port: int  # listener / forwarding rule / rule port: the agent's own, end to end
    health: HealthCheckPlan
    # How long a node leaving the pool (scale-in) keeps its open connections: the agent's drain
    # timeout, so streams in flight may finish (AWS deregistration delay, GCP draining).
    drain_s: int


def load_balancer_reason(plan: PoolPlan) -> str | None:
    """Why a pool gets no internal load balancer (None: it gets one)."""
    cloud = plan.pool.cloud
    if cloud == "kubernetes":
        return "kubernetes pools are served by their ClusterIP Service"
    if cloud == "local":
        return "local pools run on the machine at hand"
    if cloud == "gcp" and plan.family == "tpu":
        # A passthrough load balancer's backends are instance groups or GCE_VM_IP network
        # endpoint groups, both made of Compute Engine instances; TPU VMs are not.
        return "TPU VMs cannot join an instance group or a GCE_VM_IP network endpoint group"
    return None


def load_balancer_plan(
    plan: PoolPlan, agent_port: int, drain_timeout_s: float
) -> LoadBalancerPlan | None:
    """The load balancer of a VM pool, or None when it gets none (`load_balancer_reason`)."""
    if load_balancer_reason(plan) is not None:
        return None
    if not 1 <= agent_port <= 65535:
        raise PlanError(f"pool {plan.name}: {agent_port} is not a port number")
    if drain_timeout_s < 0:
        raise PlanError(f"pool {plan.name}: negative drain timeout {drain_timeout_s}")
    return LoadBalancerPlan(
        port=agent_port,
        health=HealthCheckPlan(
            path=AGENT_READY_PATH,
            port=agent_port,
            interval_s=HEALTH_INTERVAL_S,
            timeout_s=HEALTH_TIMEOUT_S,
            healthy_threshold=HEALTHY_THRESHOLD,
            unhealthy_threshold=UNHEALTHY_THRESHOLD,
        ),
        drain_s=min(math.ceil(drain_timeout_s), MAX_DRAIN_S),
    )


def api_endpoint(host: str, port: int) -> str:
    """The OpenAI-compatible base URL of an agent address (a load balancer's)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port}{API_BASE_PATH}"


def azure_subscription(resource_id: str) -> str:
    """The subscription of an Azure resource ID. A pool's load balancer frontend sits in its
    subnet, which must be in the pool's own subscription (as its scale sets' NICs must)."""
    match = _AZURE_SUBSCRIPTION.match(resource_id)
    if not match:
        raise PlanError(f"{resource_id!r} is not an Azure resource ID (/subscriptions/...)")
    return match.group(1)


def azure_lb_child_id(
    subscription: str, resource_group: str, load_balancer: str, kind: str, child: str
) -> str:
    """The ID of a load balancer's frontend, backend pool or probe: the load balancer's own
    rules (and its scale sets) refer to them by ID before the load balancer exists."""
    if kind not in AZURE_LB_CHILD_KINDS:
        raise PlanError(f"unknown load balancer child kind {kind!r}")
    return (
        f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/"
        f"Microsoft.Network/loadBalancers/{load_balancer}/{kind}/{child}"
    )


# --------------------------------------------------------------------------------------------
# Kubernetes


def k8s_pod_resources(plan: PoolPlan) -> dict[str, dict[str, str]]:
    """Requests and limits of the container that owns the node's accelerators: most of the
    node (the rest is for the kubelet and daemons), every accelerator."""
    record = plan.record
    resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    if record.vcpus:
        millicores = max(int(record.vcpus * 1000 * POD_CPU_SHARE) // 100 * 100, 100)
        resources["requests"]["cpu"] = f"{millicores}m"
        resources["limits"]["cpu"] = f"{millicores}m"
    if record.memory_gib:
        mebibytes = max(int(record.memory_gib * 1024 * POD_MEMORY_SHARE), 256)
        resources["requests"]["memory"] = f"{mebibytes}Mi"
        resources["limits"]["memory"] = f"{mebibytes}Mi"
    if plan.accelerator_resource:
        resources["requests"][plan.accelerator_resource] = str(plan.accelerators)
        resources["limits"][plan.accelerator_resource] = str(plan.accelerators)
    return resources


# Spot node labels and taints of the managed Kubernetes services, by the cloud a Kubernetes
# pool is priced as (EKS, GKE, AKS).
_SPOT_SELECTORS: Mapping[str, tuple[str, str]] = {
    "aws": ("eks.amazonaws.com/capacityType", "SPOT"),
    "gcp": ("cloud.google.com/gke-spot", "true"),
    "azure": ("kubernetes.azure.com/scalesetpriority", "spot"),
}
_SPOT_TAINTS: Mapping[str, tuple[str, str]] = {
    "gcp": ("cloud.google.com/gke-spot", "true"),
    "azure": ("kubernetes.azure.com/scalesetpriority", "spot"),
}


def k8s_node_selector(plan: PoolPlan) -> dict[str, str]:
    """Pin the pods to the pool's node type and, for spot pools, to spot nodes."""
    selector = {"node.kubernetes.io/instance-type": plan.pool.instance_type}
    if plan.pool.spot:
        key, value = _SPOT_SELECTORS[plan.pool.price_ref.cloud]
        selector[key] = value
    return selector


def k8s_tolerations(plan: PoolPlan) -> list[dict[str, str]]:
    """Tolerate the taints that keep other workloads off accelerator and spot nodes."""
    tolerations = []
    if plan.accelerator_resource:
        tolerations.append(
            {"key": plan.accelerator_resource, "operator": "Exists", "effect": "NoSchedule"}
        )
    if plan.pool.spot and plan.pool.price_ref.cloud in _SPOT_TAINTS:
        key, value = _SPOT_TAINTS[plan.pool.price_ref.cloud]
        tolerations.append(
            {"key": key, "operator": "Equal", "value": value, "effect": "NoSchedule"}
        )
    return tolerations


def priority_class_value(slo: SloClassSpec) -> int:
    return PRIORITY_CLASS_BASE - PRIORITY_CLASS_STEP * slo.priority


def priority_class_name(fleet: str, slo: SloClassSpec) -> str:
    return naming.dns_label(f"{fleet}-{slo.name}", 253)


def pool_priority_class(spec: FleetSpec, pool: PoolSpec) -> SloClassSpec:
    """The class a pool's pods run at: the most important class the pool can serve (a spot
    pool: the most important spot-eligible class), so that batch-only capacity yields first."""
    ordered = sorted(spec.slo_classes, key=lambda c: c.priority)
    if pool.spot:
        eligible = [c for c in ordered if c.spot_eligible]
        if eligible:
            return eligible[0]
    return ordered[0]


@dataclass(frozen=True)
class TenantQuota:
    """A tenant's ResourceQuota in one cluster: the ceiling of what the kubernetes pools it may
    use hold at max replicas, accelerators further capped by its accelerator-hours quota."""

    tenant: str
    cluster: str
    pools: tuple[str, ...]
    accelerators: Mapping[str, int]  # resource name -> devices (every family, 0 when none)
    cpu_millicores: int
    memory_mib: int

    def hard(self) -> dict[str, str]:
        hard = {f"requests.{name}": str(count) for name, count in self.accelerators.items()}
        hard.update(
            {
                "requests.cpu": f"{self.cpu_millicores}m",
                "limits.cpu": f"{self.cpu_millicores}m",
                "requests.memory": f"{self.memory_mib}Mi",
                "limits.memory": f"{self.memory_mib}Mi",
            }
        )
        return hard


def tenant_quota(spec: FleetSpec, tenant: str, cluster: str, catalog: Catalog) -> TenantQuota:
    accelerators = dict.fromkeys(K8S_ACCELERATOR_RESOURCES.values(), 0)
    cpu = memory = 0
    pools = []
    for pool in spec.pools:
        if pool.cloud != "kubernetes" or pool.region != cluster:
            continue
        if not tenant_may_use(spec, tenant, pool):
            continue
        plan = plan_pool(spec, pool, catalog)
        pools.append(pool.name)
        resources = k8s_pod_resources(plan)["limits"]
        if plan.accelerator_resource:
            accelerators[plan.accelerator_resource] += plan.accelerators * pool.max_replicas
        cpu += _millicores(resources.get("cpu", "0m")) * pool.max_replicas
        memory += _mebibytes(resources.get("memory", "0Mi")) * pool.max_replicas
    hours = spec.tenant(tenant).quotas.accelerator_hours_per_month
    if hours is not None:
        # Accelerator-hours per month as a concurrent ceiling: the average number of devices
        # the monthly allowance sustains, rounded up.
        ceiling = math.ceil(hours / HOURS_PER_MONTH)
        accelerators = {name: min(count, ceiling) for name, count in accelerators.items()}
    return TenantQuota(tenant, cluster, tuple(pools), accelerators, cpu, memory)


def _millicores(quantity: str) -> int:
    return int(quantity.removesuffix("m"))


def _mebibytes(quantity: str) -> int:
    return int(quantity.removesuffix("Mi"))


def kubernetes_clusters(spec: FleetSpec) -> list[str]:
    """Clusters (a kubernetes pool's `region`) in first-use order."""
    seen: dict[str, None] = {}
    for pool in spec.pools:
        if pool.cloud == "kubernetes":
            seen.setdefault(pool.region)
    return list(seen)


# --------------------------------------------------------------------------------------------
# API keys


def key_references(spec: FleetSpec) -> list[str]:
    """Every distinct API key reference of the fleet's tenants, in order."""
    seen: dict[str, None] = {}
    for tenant in spec.tenants:
        for reference in tenant.api_keys:
            seen.setdefault(reference)
    return list(seen)


def needs_key_value(reference: str) -> bool:
    """Whether only the Pulumi program can resolve the reference (a `config:` secret)."""
    return reference.startswith("config:")


def key_digests(
    spec: FleetSpec, keys: Mapping[str, str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """reference -> SHA-256 hex of the key. `keys` holds key values by reference (the
    program's secrets); other references are resolved as the agent would (env:, file:,
    sha256:). A `config:` reference without a value raises PlanError."""
    digests: dict[str, str] = {}
    for tenant in spec.tenants:
        for reference in tenant.api_keys:
            if reference in digests:
                continue
            if reference in keys:
                digests[reference] = hash_api_key(keys[reference])
            elif needs_key_value(reference):
                raise PlanError(
                    f"tenant {tenant.name!r}: api key {reference!r} has no value: set it with "
                    f"`pulumi config set --secret {reference.removeprefix('config:')} ...`"
                )
            else:
                digests[reference] = resolve_key_reference(tenant.name, reference, environ)
    return digests


def with_key_digests(spec: FleetSpec, digests: Mapping[str, str]) -> FleetSpec:
    """The spec with every tenant key reference replaced by `sha256:<digest>`."""
    tenants = [
        t.model_copy(update={"api_keys": [f"sha256:{digests[r]}" for r in t.api_keys]})
        for t in spec.tenants
    ]
    return spec.model_copy(update={"tenants": tenants})


# --------------------------------------------------------------------------------------------
# Costs


@dataclass(frozen=True)
class PoolCostSummary:
    pool: str
    cloud: str
    instance_type: str
    replicas: int
    on_demand_usd_per_hour: float  # the pool's on-demand nodes (all of an on-demand pool)
    spot_usd_per_hour: float  # its spot nodes
    usd_per_hour: float  # both: runtime.plan's PoolCost.usd_per_hour
    usd_per_month: float
    usd_per_month_at_max: float

    def to_output(self) -> dict[str, Any]:
        return {
            "cloud": self.cloud,
            "instanceType": self.instance_type,
            "replicas": self.replicas,
            "onDemandUsdPerHour": self.on_demand_usd_per_hour,
            "spotUsdPerHour": self.spot_usd_per_hour,
            "usdPerHour": self.usd_per_hour,
            "usdPerMonth": self.usd_per_month,
            "usdPerMonthAtMax": self.usd_per_month_at_max,
        }


@dataclass(frozen=True)
class FleetCostSummary:
    pools: list[PoolCostSummary]
    on_demand_usd_per_hour: float
    spot_usd_per_hour: float
    total_usd_per_hour: float
    total_usd_per_month: float
    max_usd_per_month: float
    tenants: dict[str, dict[str, Any]]


def fleet_cost_summary(spec: FleetSpec, catalog: Catalog) -> FleetCostSummary:
    """Hourly cost per pool split by market, totals, and per-tenant quota summaries; the
    totals are runtime.plan.fleet_cost's, so `fleetform plan` and the stack agree."""
    cost = fleet_cost(spec, catalog)
    pools = []
    for pool, pool_cost in zip(spec.pools, cost.pools, strict=True):
        ref = pool.price_ref
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
        on_demand_nodes = min(pool.on_demand_base, pool.replicas) if pool.spot else pool.replicas
        on_demand = on_demand_nodes * (record.on_demand_usd_per_hour or 0.0)
        spot = pool_cost.usd_per_hour - on_demand
        pools.append(
            PoolCostSummary(
                pool=pool.name,
                cloud=pool.cloud,
                instance_type=pool.instance_type,
                replicas=pool.replicas,
                on_demand_usd_per_hour=on_demand,
                spot_usd_per_hour=spot,
                usd_per_hour=pool_cost.usd_per_hour,
                usd_per_month=pool_cost.usd_per_month,
                usd_per_month_at_max=pool_cost.usd_per_month_at_max,
            )
        )
    tenants: dict[str, dict[str, Any]] = {}
    for share in cost.tenants:
        quotas = spec.tenant(share.tenant).quotas.model_dump(exclude_none=True)
        tenants[share.tenant] = {
            "pools": list(share.pools),
            "estimatedUsdPerMonth": share.usd_per_month,
            "quotas": {_camel(k): v for k, v in quotas.items()},
        }
    return FleetCostSummary(
        pools=pools,
        on_demand_usd_per_hour=sum(p.on_demand_usd_per_hour for p in pools),
        spot_usd_per_hour=sum(p.spot_usd_per_hour for p in pools),
        total_usd_per_hour=cost.total_usd_per_hour,
        total_usd_per_month=cost.total_usd_per_month,
        max_usd_per_month=cost.max_usd_per_month,
        tenants=tenants,
    )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
