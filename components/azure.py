"""`fleetform:azure:AzurePool`: one pool of a fleet as Azure VM scale sets (azure-native).

A scale set per market (`components.plan.market_groups`: a spot pool with an on-demand base gets
a Regular scale set for the base) with the pool's GPU SKU, Spot priority with the Delete eviction
policy and a max price capped at the on-demand price, the cloud-init user data as custom data,
no public IP, and the cost tags. A network security group admits the agent port only from the
fleet's networks (and denies it to the rest of the virtual network). A resource group is created
for the pool unless the network config names one.

The pool's API endpoint (`endpoint`) is an internal Standard load balancer (a private frontend
in the pool's subnet, never a public IP): an HTTP probe on the agent's `/readyz` (loading and
draining nodes leave rotation), one backend pool that every scale set's IP configuration joins,
and a TCP rule for the agent port. Traffic keeps the client's address (admitted by the fleet
rule); probes come from Azure's 168.63.129.16, which the NSG admits by its `AzureLoadBalancer`
tag before it denies the agent port to everything else. A Standard internal load balancer gives
its backends no outbound access: the pool's subnet needs its own (a NAT gateway) for nodes to
fetch packages and weights and reach the controller.
"""

from collections.abc import Callable, Sequence
from typing import Any

import pulumi
import pulumi_azure_native.compute as compute
import pulumi_azure_native.network as network
import pulumi_azure_native.resources as resources

from . import naming
from .plan import (
    AZURE_PROBE_SOURCE,
    LoadBalancerPlan,
    PoolPlan,
    api_endpoint,
    azure_image,
    azure_lb_child_id,
    azure_max_price,
    azure_subscription,
    boot_disk_gb,
    market_groups,
)
from .settings import AzurePlacement
from .userdata import base64_user_data

TYPE = "fleetform:azure:AzurePool"
ADMIN_USER = "fleetform-admin"
# Names of the load balancer's parts (unique within the load balancer).
LB_FRONTEND = "agent"
LB_BACKEND_POOL = "agents"
LB_PROBE = "readyz"
LB_RULE = "agent"
# Azure's default TCP idle timeout is 4 minutes; a long non-streaming completion can be silent
# for longer. 30 minutes is the maximum.
LB_IDLE_TIMEOUT_MIN = 30


class AzurePool(pulumi.ComponentResource):
    """An Azure pool: VM scale sets, a network security group, maybe a resource group, and
    (given a `load_balancer` plan) an internal Standard load balancer in front of the agents."""

    scale_set_names: pulumi.Output[list[str]]
    resource_group_name: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    endpoint: pulumi.Output[str] | None
    """`http://<frontend private IP>:<agent port>/v1`; None without a load balancer."""
    load_balancer_id: pulumi.Output[str] | None

    def __init__(
        self,
        name: str,
        plan: PoolPlan,
        placement: AzurePlacement,
        *,
        fleet_cidrs: pulumi.Input[list[str]],
        agent_port: int,
        user_data: Callable[[bool], pulumi.Output[str]],
        load_balancer: LoadBalancerPlan | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        pool = plan.pool
        tags = plan.tags("azure")
        child = pulumi.ResourceOptions(parent=self)

        group_name: pulumi.Input[str]
        if placement.resource_group_name:
            group_name = placement.resource_group_name
        else:
            group = resources.ResourceGroup(
                naming.child_name(name, "rg"), location=pool.region, tags=tags, opts=child
            )
            group_name = group.name
        rules: list[dict[str, Any]] = [
            {
                "name": "fleetform-agent-from-fleet",
                "priority": 100,
                "direction": "Inbound",
                "access": "Allow",
                "protocol": "Tcp",
                "source_address_prefixes": fleet_cidrs,
                "source_port_range": "*",
                "destination_address_prefix": "*",
                "destination_port_range": str(agent_port),
            }
        ]
        if load_balancer is not None:
            rules.append(
                {
                    # The default AllowAzureLoadBalancerInBound rule (65001) comes after the
                    # deny below: without this rule every probe fails and no node is in rotation.
                    "name": "fleetform-agent-from-lb-probes",
                    "priority": 105,
                    "direction": "Inbound",
                    "access": "Allow",
                    "protocol": "Tcp",
                    "source_address_prefix": AZURE_PROBE_SOURCE,
                    "source_port_range": "*",
                    "destination_address_prefix": "*",
                    "destination_port_range": str(load_balancer.health.port),
                }
            )
        nsg = network.NetworkSecurityGroup(
            naming.child_name(name, "nsg"),
            resource_group_name=group_name,
            location=pool.region,
            security_rules=[
                *rules,
                {
                    # Azure's default rules admit the whole virtual network: not the agent port.
                    "name": "fleetform-agent-deny-others",
                    "priority": 110,
                    "direction": "Inbound",
                    "access": "Deny",
                    "protocol": "Tcp",
                    "source_address_prefix": "*",
                    "source_port_range": "*",
                    "destination_address_prefix": "*",
                    "destination_port_range": str(agent_port),
                },
            ],
            tags=tags,
            opts=child,
        )

        balancer: network.LoadBalancer | None = None
        ip_configuration: dict[str, Any] = {
            "name": "primary",
            "primary": True,
            "subnet": {"id": placement.subnet_id},
        }
        if load_balancer is not None:
            balancer, backend_pool_id = self._load_balancer(
                name, plan, placement, load_balancer, group_name, tags
            )
            ip_configuration["load_balancer_backend_address_pools"] = [{"id": backend_pool_id}]

        names: list[pulumi.Output[str]] = []
        for market in market_groups(pool, native_mix=False):
            suffix = f"-{market.suffix}" if market.suffix else ""
            profile: dict[str, Any] = {
                "priority": "Spot" if market.spot else "Regular",
                "os_profile": {
                    "computer_name_prefix": naming.azure_computer_prefix(f"{pool.name}{suffix}"),
                    "admin_username": ADMIN_USER,
                    "custom_data": user_data(market.spot).apply(base64_user_data),
                    "linux_configuration": {
                        "disable_password_authentication": True,
                        "ssh": {
                            "public_keys": [
                                {
                                    "path": f"/home/{ADMIN_USER}/.ssh/authorized_keys",
                                    "key_data": placement.admin_ssh_public_key,
                                }
                            ]
                        },
                    },
                },
                "storage_profile": {
                    "image_reference": azure_image(plan.record),
                    "os_disk": {
                        "create_option": "FromImage",
                        "caching": "ReadWrite",
                        "disk_size_gb": boot_disk_gb(plan.family),
                        "managed_disk": {"storage_account_type": "Premium_LRS"},
                    },
                },
                "network_profile": {
                    "network_interface_configurations": [
                        {
                            "name": "primary",
                            "primary": True,
                            "network_security_group": {"id": nsg.id},
                            # No public_ip_address_configuration: no public IP.
                            "ip_configurations": [ip_configuration],
                        }
                    ]
                },
            }
            if market.spot:
                profile["eviction_policy"] = "Delete"
                profile["billing_profile"] = {"max_price": azure_max_price(plan.record)}
            scale_set = compute.VirtualMachineScaleSet(
                naming.child_name(name, f"vmss{suffix}"),
                resource_group_name=group_name,
                location=pool.region,
                sku={"name": pool.instance_type, "tier": "Standard", "capacity": market.size},
                orchestration_mode="Uniform",
                overprovision=False,
                # Fleetform's autoscaler owns the capacity and replaces nodes itself.
                upgrade_policy={"mode": "Manual"},
                virtual_machine_profile=profile,
                tags=tags,
                # The backend pool is referred to by its ID: the load balancer must exist first.
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=[balancer] if balancer is not None else None
                ),
            )
            names.append(scale_set.name)

        self.scale_set_names = pulumi.Output.all(*names).apply(list)
        self.resource_group_name = pulumi.Output.from_input(group_name)
        self.security_group_id = nsg.id
        self.endpoint = None
        self.load_balancer_id = None
        outputs: dict[str, Any] = {
            "scale_set_names": self.scale_set_names,
            "resource_group_name": self.resource_group_name,
            "security_group_id": self.security_group_id,
        }
        if balancer is not None and load_balancer is not None:
            port = load_balancer.port
            self.endpoint = balancer.frontend_ip_configurations.apply(
                lambda frontends: api_endpoint(_private_ip(frontends), port)
            )
            self.load_balancer_id = balancer.id
            outputs.update(endpoint=self.endpoint, load_balancer_id=self.load_balancer_id)
        self.register_outputs(outputs)

    def _load_balancer(
        self,
        name: str,
        plan: PoolPlan,
        placement: AzurePlacement,
        load_balancer: LoadBalancerPlan,
        group_name: pulumi.Input[str],
        tags: dict[str, str],
    ) -> tuple[network.LoadBalancer, pulumi.Output[str]]:
        """The internal load balancer and the ID of its backend pool."""
        pool = plan.pool
        health = load_balancer.health
        lb_name = naming.azure_name(naming.child_name(name, "lb"))

        def child_id(kind: str, child: str) -> pulumi.Output[str]:
            return pulumi.Output.all(placement.subnet_id, group_name).apply(
                lambda values: azure_lb_child_id(
                    azure_subscription(values[0]), values[1], lb_name, kind, child
                )
            )

        backend_pool_id = child_id("backendAddressPools", LB_BACKEND_POOL)
        balancer = network.LoadBalancer(
            naming.child_name(name, "lb"),
            load_balancer_name=lb_name,
            resource_group_name=group_name,
            location=pool.region,
            sku={"name": "Standard", "tier": "Regional"},
            frontend_ip_configurations=[
                {
                    # A subnet and a private address: an internal load balancer. Never a
                    # public_ip_address (the no-public-ip policy checks).
                    "name": LB_FRONTEND,
                    "subnet": {"id": placement.subnet_id},
                    "private_ip_allocation_method": "Dynamic",
                }
            ],
            backend_address_pools=[{"name": LB_BACKEND_POOL}],
            probes=[
                {
                    "name": LB_PROBE,
                    "protocol": "Http",
                    "port": health.port,
                    "request_path": health.path,
                    "interval_in_seconds": health.interval_s,
                    "probe_threshold": health.unhealthy_threshold,
                }
            ],
            load_balancing_rules=[
                {
                    "name": LB_RULE,
                    "protocol": "Tcp",
                    "frontend_port": load_balancer.port,
                    "backend_port": load_balancer.port,
                    "frontend_ip_configuration": {
                        "id": child_id("frontendIPConfigurations", LB_FRONTEND)
                    },
                    "backend_address_pool": {"id": backend_pool_id},
                    "probe": {"id": child_id("probes", LB_PROBE)},
                    "enable_floating_ip": False,
                    "idle_timeout_in_minutes": LB_IDLE_TIMEOUT_MIN,
                    # Outbound access is the subnet's business (a NAT gateway), not the rule's.
                    "disable_outbound_snat": True,
                }
            ],
            tags=tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        return balancer, backend_pool_id


def _private_ip(frontends: Sequence[Any]) -> str:
    """The private address of the load balancer's (single) frontend, allocated by Azure."""
    address = frontends[0].private_ip_address
    if not address:
        raise ValueError("the load balancer's frontend has no private IP address")
    return str(address)
