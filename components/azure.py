"""`fleetform:azure:AzurePool`: one pool of a fleet as Azure VM scale sets (azure-native).

A scale set per market (`components.plan.market_groups`: a spot pool with an on-demand base gets
a Regular scale set for the base) with the pool's GPU SKU, Spot priority with the Delete eviction
policy and a max price capped at the on-demand price, the cloud-init user data as custom data,
no public IP, and the cost tags. A network security group admits the agent port only from the
fleet's networks (and denies it to the rest of the virtual network). A resource group is created
for the pool unless the network config names one.
"""

from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_azure_native.compute as compute
import pulumi_azure_native.network as network
import pulumi_azure_native.resources as resources

from . import naming
from .plan import PoolPlan, azure_image, azure_max_price, boot_disk_gb, market_groups
from .settings import AzurePlacement
from .userdata import base64_user_data

TYPE = "fleetform:azure:AzurePool"
ADMIN_USER = "fleetform-admin"


class AzurePool(pulumi.ComponentResource):
    """An Azure pool: VM scale sets, a network security group, maybe a resource group."""

    scale_set_names: pulumi.Output[list[str]]
    resource_group_name: pulumi.Output[str]
    security_group_id: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        plan: PoolPlan,
        placement: AzurePlacement,
        *,
        fleet_cidrs: pulumi.Input[list[str]],
        agent_port: int,
        user_data: Callable[[bool], pulumi.Output[str]],
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
        nsg = network.NetworkSecurityGroup(
            naming.child_name(name, "nsg"),
            resource_group_name=group_name,
            location=pool.region,
            security_rules=[
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
                },
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
                            "ip_configurations": [
                                {
                                    "name": "primary",
                                    "primary": True,
                                    "subnet": {"id": placement.subnet_id},
                                }
                            ],
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
                opts=child,
            )
            names.append(scale_set.name)

        self.scale_set_names = pulumi.Output.all(*names).apply(list)
        self.resource_group_name = pulumi.Output.from_input(group_name)
        self.security_group_id = nsg.id
        self.register_outputs(
            {
                "scale_set_names": self.scale_set_names,
                "resource_group_name": self.resource_group_name,
                "security_group_id": self.security_group_id,
            }
        )
