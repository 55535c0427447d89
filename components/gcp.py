"""`fleetform:gcp:GcpPool`: one pool of a fleet on Google Cloud.

GPU and CPU pools: an instance template per market (guest accelerators from the catalog, e.g.
`nvidia-l4`; the SPOT provisioning model for spot capacity; `TERMINATE` on host maintenance for
GPUs, which cannot live-migrate) and a regional managed instance group over the zones that offer
the machine type. TPU pools: one TPU VM (`tpu.V2Vm`) per replica, as TPU slices are not managed
instance group members. Either way a firewall rule admits the agent port only from the fleet's
networks to the pool's network tag, nodes get no external IP, and labels carry the cost tags.

A GPU or CPU pool's API endpoint (`endpoint`) is an internal passthrough Network Load Balancer
(never external): a regional HTTP health check on the agent's `/readyz` (loading and draining
nodes leave rotation), a regional backend service (INTERNAL scheme, TCP) whose backends are the
pool's managed instance groups (both of them for a spot pool with an on-demand base), and an
INTERNAL forwarding rule on the agent port in the pool's subnetwork. A second firewall rule
admits Google's health-check ranges to the agent port of the pool's nodes; passthrough traffic
keeps the client's address, which the fleet rule admits. TPU pools get no load balancer (and
no endpoint): TPU VMs can join neither an instance group nor a GCE_VM_IP network endpoint group.
"""

from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_gcp.compute as compute
import pulumi_gcp.tpu as tpu

from . import naming
from .plan import (
    GCP_HEALTH_CHECK_RANGES,
    GCP_UBUNTU_IMAGE,
    LoadBalancerPlan,
    PlanError,
    PoolPlan,
    api_endpoint,
    boot_disk_gb,
    gcp_accelerators,
    gcp_scheduling,
    gcp_zones,
    market_groups,
    tpu_runtime_version,
    tpu_zones,
)
from .settings import GcpPlacement

TYPE = "fleetform:gcp:GcpPool"
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


def network_tag(plan: PoolPlan) -> str:
    """The network tag the pool's firewall rule targets."""
    return naming.dns_label(f"fleetform-{plan.fleet}-{plan.pool.name}")


class GcpPool(pulumi.ComponentResource):
    """A GCP pool: instance templates and regional MIGs, or TPU VMs; a firewall rule; and
    (given a `load_balancer` plan, GPU and CPU pools only) an internal passthrough NLB."""

    group_names: pulumi.Output[list[str]]
    firewall_name: pulumi.Output[str]
    endpoint: pulumi.Output[str] | None
    """`http://<forwarding rule address>:<agent port>/v1`; None without a load balancer."""
    forwarding_rule_name: pulumi.Output[str] | None
    backend_service_name: pulumi.Output[str] | None

    def __init__(
        self,
        name: str,
        plan: PoolPlan,
        placement: GcpPlacement,
        *,
        fleet_cidrs: pulumi.Input[list[str]],
        agent_port: int,
        user_data: Callable[[bool], pulumi.Output[str]],
        load_balancer: LoadBalancerPlan | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        pool = plan.pool
        if load_balancer is not None and plan.family == "tpu":
            raise PlanError(
                f"pool {pool.name}: TPU VMs cannot be load-balanced (no instance group holds them)"
            )
        labels = plan.tags("gcp")
        tag = network_tag(plan)
        child = pulumi.ResourceOptions(parent=self)

        firewall = compute.Firewall(
            naming.child_name(name, "fw"),
            name=naming.dns_label(f"{name}-agent"),
            network=placement.network,
            description=f"Fleetform pool {pool.name}: agent port from the fleet's networks only",
            direction="INGRESS",
            allows=[{"protocol": "tcp", "ports": [str(agent_port)]}],
            source_ranges=fleet_cidrs,
            target_tags=[tag],
            opts=child,
        )
        service_account = (
            {"email": placement.service_account, "scopes": SCOPES}
            if placement.service_account
            else None
        )

        group_names: list[pulumi.Output[str]] = []
        instance_groups: list[pulumi.Output[str]] = []
        if plan.family == "tpu":
            markets = [pool.spot and i >= pool.on_demand_base for i in range(pool.replicas)]
            for index, (zone, spot) in enumerate(
                zip(tpu_zones(plan.record, pool.replicas), markets, strict=True)
            ):
                vm = tpu.V2Vm(
                    naming.child_name(name, f"tpu-{index}"),
                    name=naming.dns_label(f"{name}-{index}"),
                    zone=zone,
                    accelerator_type=plan.record.gcp_accelerator_type,
                    runtime_version=tpu_runtime_version(plan.record),
                    scheduling_config={"spot": True} if spot else None,
                    network_config={
                        "network": placement.network,
                        "subnetwork": placement.subnetwork,
                        "enable_external_ips": False,
                    },
                    service_account=service_account,
                    # TPU VM images run cloud-init, which reads `user-data` like any GCE VM.
                    metadata={"user-data": user_data(spot)},
                    labels=labels,
                    tags=[tag],
                    opts=child,
                )
                group_names.append(vm.name)
        else:
            accelerators = gcp_accelerators(plan.record)
            zones = gcp_zones(plan.record)
            for group in market_groups(pool, native_mix=False):
                suffix = f"-{group.suffix}" if group.suffix else ""
                template = compute.InstanceTemplate(
                    naming.child_name(name, f"tpl{suffix}"),
                    # Instance template name prefixes take at most 37 characters.
                    name_prefix=naming.dns_label(f"{name}{suffix}", 36) + "-",
                    description=f"Fleetform pool {pool.name} ({'spot' if group.spot else 'on-demand'})",
                    machine_type=pool.instance_type,
                    guest_accelerators=accelerators,
                    scheduling=gcp_scheduling(spot=group.spot, has_accelerator=bool(accelerators)),
                    disks=[
                        {
                            "source_image": GCP_UBUNTU_IMAGE,
                            "boot": True,
                            "auto_delete": True,
                            "disk_size_gb": boot_disk_gb(plan.family),
                            "disk_type": "pd-balanced",
                        }
                    ],
                    # No access_configs: no external IP.
                    network_interfaces=[
                        {"network": placement.network, "subnetwork": placement.subnetwork}
                    ],
                    metadata={"user-data": user_data(group.spot), "enable-oslogin": "TRUE"},
                    service_account=service_account,
                    labels=labels,
                    tags=[tag],
                    opts=child,
                )
                manager = compute.RegionInstanceGroupManager(
                    naming.child_name(name, f"mig{suffix}"),
                    name=naming.dns_label(f"{name}{suffix}"),
                    base_instance_name=naming.dns_label(f"{name}{suffix}", 50),
                    region=pool.region,
                    distribution_policy_zones=zones,
                    versions=[{"name": "primary", "instance_template": template.self_link_unique}],
                    target_size=group.size,
                    named_ports=[{"name": "agent", "port": agent_port}],
                    update_policy={
                        "type": "PROACTIVE",
                        "minimal_action": "REPLACE",
                        # GPUs are scarce per zone: do not move nodes between zones to rebalance.
                        "instance_redistribution_type": "NONE",
                        "max_surge_fixed": len(zones),
                        "max_unavailable_fixed": len(zones),
                    },
                    # Fleetform's autoscaler owns the size; `pulumi up` does not wait for boots.
                    wait_for_instances=False,
                    opts=child,
                )
                group_names.append(manager.name)
                instance_groups.append(manager.instance_group)

        self.group_names = pulumi.Output.all(*group_names).apply(list)
        self.firewall_name = firewall.name
        self.endpoint = None
        self.forwarding_rule_name = None
        self.backend_service_name = None
        outputs: dict[str, Any] = {
            "group_names": self.group_names,
            "firewall_name": self.firewall_name,
        }
        if load_balancer is not None:
            rule, backend = self._load_balancer(
                name, plan, placement, load_balancer, tag, labels, instance_groups
            )
            port = load_balancer.port
            self.endpoint = rule.ip_address.apply(lambda address: api_endpoint(address, port))
            self.forwarding_rule_name = rule.name
            self.backend_service_name = backend.name
            outputs.update(
                endpoint=self.endpoint,
                forwarding_rule_name=self.forwarding_rule_name,
                backend_service_name=self.backend_service_name,
            )
        self.register_outputs(outputs)

    def _load_balancer(
        self,
        name: str,
        plan: PoolPlan,
        placement: GcpPlacement,
        load_balancer: LoadBalancerPlan,
        tag: str,
        labels: dict[str, str],
        instance_groups: list[pulumi.Output[str]],
    ) -> tuple[compute.ForwardingRule, compute.RegionBackendService]:
        """The internal passthrough NLB over the pool's instance groups."""
        pool = plan.pool
        health = load_balancer.health
        child = pulumi.ResourceOptions(parent=self)
        compute.Firewall(
            naming.child_name(name, "hc-fw"),
            name=naming.dns_label(f"{name}-health"),
            network=placement.network,
            description=f"Fleetform pool {pool.name}: Google health checks to the agent port",
            direction="INGRESS",
            allows=[{"protocol": "tcp", "ports": [str(health.port)]}],
            source_ranges=list(GCP_HEALTH_CHECK_RANGES),
            target_tags=[tag],
            opts=child,
        )
        health_check = compute.RegionHealthCheck(
            naming.child_name(name, "hc"),
            name=naming.dns_label(f"{name}-readyz"),
            region=pool.region,
            description=f"Fleetform pool {pool.name}: the agent is ready ({health.path})",
            http_health_check={"port": health.port, "request_path": health.path},
            check_interval_sec=health.interval_s,
            timeout_sec=health.timeout_s,
            healthy_threshold=health.healthy_threshold,
            unhealthy_threshold=health.unhealthy_threshold,
            opts=child,
        )
        backend = compute.RegionBackendService(
            naming.child_name(name, "be"),
            name=naming.dns_label(f"{name}-agents"),
            region=pool.region,
            description=f"Fleetform pool {pool.name}: its agents",
            load_balancing_scheme="INTERNAL",
            protocol="TCP",
            health_checks=health_check.id,
            # Passthrough backends balance connections; a spot pool with an on-demand base
            # has two groups behind the one service.
            backends=[
                {"group": group, "balancing_mode": "CONNECTION"} for group in instance_groups
            ],
            connection_draining_timeout_sec=load_balancer.drain_s,
            opts=child,
        )
        rule = compute.ForwardingRule(
            naming.child_name(name, "fr"),
            name=naming.dns_label(f"{name}-api"),
            region=pool.region,
            description=f"Fleetform pool {pool.name}: the pool's API endpoint (internal)",
            load_balancing_scheme="INTERNAL",  # never EXTERNAL (the no-public-ip policy checks)
            ip_protocol="TCP",
            ports=[str(load_balancer.port)],
            network=placement.network,
            subnetwork=placement.subnetwork,
            backend_service=backend.id,
            # Still internal (the VPC and networks connected to it), but reachable from other
            # regions too: fleet networks (other clouds' VPNs) may land in another region.
            allow_global_access=True,
            labels=labels,
            opts=child,
        )
        return rule, backend
