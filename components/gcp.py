"""`fleetform:gcp:GcpPool`: one pool of a fleet on Google Cloud.

GPU and CPU pools: an instance template per market (guest accelerators from the catalog, e.g.
`nvidia-l4`; the SPOT provisioning model for spot capacity; `TERMINATE` on host maintenance for
GPUs, which cannot live-migrate) and a regional managed instance group over the zones that offer
the machine type. TPU pools: one TPU VM (`tpu.V2Vm`) per replica, as TPU slices are not managed
instance group members. Either way a firewall rule admits the agent port only from the fleet's
networks to the pool's network tag, nodes get no external IP, and labels carry the cost tags.
"""

from collections.abc import Callable

import pulumi
import pulumi_gcp.compute as compute
import pulumi_gcp.tpu as tpu

from . import naming
from .plan import (
    GCP_UBUNTU_IMAGE,
    PoolPlan,
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
    """A GCP pool: instance templates and regional MIGs, or TPU VMs; a firewall rule."""

    group_names: pulumi.Output[list[str]]
    firewall_name: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        plan: PoolPlan,
        placement: GcpPlacement,
        *,
        fleet_cidrs: pulumi.Input[list[str]],
        agent_port: int,
        user_data: Callable[[bool], pulumi.Output[str]],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        pool = plan.pool
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

        self.group_names = pulumi.Output.all(*group_names).apply(list)
        self.firewall_name = firewall.name
        self.register_outputs(
            {"group_names": self.group_names, "firewall_name": self.firewall_name}
        )
