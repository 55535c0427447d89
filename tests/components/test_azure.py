"""AzurePool under mocks: scale sets with the GPU SKU, Spot priority, custom data, tags, NSG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.catalog import default_catalog

from .support import (
    PROD_KEYS,
    Program,
    cloud_init_schema,
    decode_base64,
    lb_private_ip,
    pool_data,
    run_fleet,
    stack_variant,
    user_data_files,
)

SUBNET = (
    "/subscriptions/6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f/resourceGroups/acme-network-prod/"
    "providers/Microsoft.Network/virtualNetworks/inference-eus/subnets/nodes"
)
SUBSCRIPTION = "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f"


def lb_child(group: str, child: str) -> str:
    """The ID of a part of the pool's load balancer (written out, not computed by plan.py)."""
    return (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{group}/providers/Microsoft.Network/"
        f"loadBalancers/acme-azure-eus-a100-lb/{child}"
    )


TAGS = {
    "fleetform:fleet": "acme-prod",
    "fleetform:pool": "azure-eus-a100",
    "fleetform:model": "llama-3-1-70b",
    "fleetform:tenant": "shared",
}


def test_on_demand_pool_is_one_regular_scale_set(prod: Program, tmp_path: Path) -> None:
    pool = prod.one("fleetform:azure:AzurePool")
    assert [(c.type, c.name) for c in prod.children(pool)] == [
        ("azure-native:network:LoadBalancer", "acme-azure-eus-a100-lb"),
        ("azure-native:network:NetworkSecurityGroup", "acme-azure-eus-a100-nsg"),
        ("azure-native:compute:VirtualMachineScaleSet", "acme-azure-eus-a100-vmss"),
    ]
    # The network config names the resource group: none is created.
    assert prod.of_type("azure-native:resources:ResourceGroup") == []
    vmss = prod.one("azure-native:compute:VirtualMachineScaleSet")
    assert prod.parent_chain(vmss) == [
        "azure-native:compute:VirtualMachineScaleSet",
        "fleetform:azure:AzurePool",
        "fleetform:index:InferenceFleet",
        "pulumi:pulumi:Stack",
    ]
    state = vmss.state
    assert state["resourceGroupName"] == "acme-inference-prod-eus"
    assert state["location"] == "eastus"
    assert state["sku"] == {"name": "Standard_NC24ads_A100_v4", "tier": "Standard", "capacity": 1}
    assert state["tags"] == TAGS
    profile = state["virtualMachineProfile"]
    assert profile["priority"] == "Regular"
    assert "evictionPolicy" not in profile and "billingProfile" not in profile
    (nic,) = profile["networkProfile"]["networkInterfaceConfigurations"]
    assert nic["networkSecurityGroup"] == {"id": "acme-azure-eus-a100-nsg-id"}
    assert nic["ipConfigurations"] == [
        {
            "name": "primary",
            "primary": True,
            "subnet": {"id": SUBNET},
            "loadBalancerBackendAddressPools": [
                {"id": lb_child("acme-inference-prod-eus", "backendAddressPools/agents")}
            ],
        }
    ]
    linux = profile["osProfile"]["linuxConfiguration"]
    assert linux["disablePasswordAuthentication"] is True
    assert profile["storageProfile"]["imageReference"] == {
        "publisher": "Canonical",
        "offer": "ubuntu-24_04-lts",
        "sku": "server",
        "version": "latest",
    }
    user_data = decode_base64(profile["osProfile"]["customData"])
    result = cloud_init_schema(user_data, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    files = user_data_files(user_data)
    assert "--spot-notices azure" in files["/etc/systemd/system/fleetform-agent.service"]
    config = json.loads(files["/etc/fleetform/node.json"])
    assert (config["pool"], config["spot"], config["price_usd_per_hour"]) == (
        "azure-eus-a100",
        False,
        3.673,
    )


def test_security_group_admits_the_agent_port_from_the_fleet_only(prod: Program) -> None:
    rules = prod.one("azure-native:network:NetworkSecurityGroup").state["securityRules"]
    assert [(r["name"], r["priority"], r["access"]) for r in rules] == [
        ("fleetform-agent-from-fleet", 100, "Allow"),
        # The load balancer's probes, before the deny (Azure's own allow rule comes after it).
        ("fleetform-agent-from-lb-probes", 105, "Allow"),
        ("fleetform-agent-deny-others", 110, "Deny"),
    ]
    assert rules[0]["sourceAddressPrefixes"] == ["10.40.0.0/14", "10.44.0.0/16"]
    assert rules[1]["sourceAddressPrefix"] == "AzureLoadBalancer"
    assert {r["destinationPortRange"] for r in rules} == {"8080"}


def test_an_internal_load_balancer_fronts_the_scale_set(prod: Program) -> None:
    balancer = prod.one("azure-native:network:LoadBalancer")
    state = balancer.state
    assert prod.parent_chain(balancer) == [
        "azure-native:network:LoadBalancer",
        "fleetform:azure:AzurePool",
        "fleetform:index:InferenceFleet",
        "pulumi:pulumi:Stack",
    ]
    assert (state["loadBalancerName"], state["resourceGroupName"], state["location"]) == (
        "acme-azure-eus-a100-lb",
        "acme-inference-prod-eus",
        "eastus",
    )
    assert state["sku"] == {"name": "Standard", "tier": "Regional"}
    assert state["tags"] == TAGS
    (frontend,) = state["frontendIPConfigurations"]
    # A private frontend in the pool's subnet: no public IP, no public prefix.
    assert frontend == {
        "name": "agent",
        "subnet": {"id": SUBNET},
        "privateIPAllocationMethod": "Dynamic",
        "privateIPAddress": lb_private_ip("acme-azure-eus-a100-lb"),
    }
    assert state["backendAddressPools"] == [{"name": "agents"}]
    assert state["probes"] == [
        {
            "name": "readyz",
            "protocol": "Http",
            "port": 8080,
            "requestPath": "/readyz",
            "intervalInSeconds": 5,
            "probeThreshold": 2,
        }
    ]
    group = "acme-inference-prod-eus"
    assert state["loadBalancingRules"] == [
        {
            "name": "agent",
            "protocol": "Tcp",
            "frontendPort": 8080,
            "backendPort": 8080,
            "frontendIPConfiguration": {"id": lb_child(group, "frontendIPConfigurations/agent")},
            "backendAddressPool": {"id": lb_child(group, "backendAddressPools/agents")},
            "probe": {"id": lb_child(group, "probes/readyz")},
            "enableFloatingIP": False,
            "idleTimeoutInMinutes": 30,
            "disableOutboundSnat": True,
        }
    ]
    assert prod.values["api_endpoints"]["azure-eus-a100"] == (
        f"http://{lb_private_ip('acme-azure-eus-a100-lb')}:8080/v1"
    )


def test_spot_pool_gets_spot_priority_eviction_and_max_price(program: Program) -> None:
    def mutate(config: dict[str, Any]) -> None:
        pool_data(config, "azure-eus-a100").update(spot=True, on_demand_base=1, desired_replicas=3)
        del config["fleetform:network"]["azure"]["eastus"]["resource_group_name"]

    spec, settings = stack_variant("Pulumi.prod.yaml", mutate)
    run_fleet(program, spec, settings, api_keys=PROD_KEYS)
    pool = program.one("fleetform:azure:AzurePool")
    assert [c.name for c in program.children(pool)] == [
        "acme-azure-eus-a100-lb",
        "acme-azure-eus-a100-nsg",
        "acme-azure-eus-a100-rg",
        "acme-azure-eus-a100-vmss-od",
        "acme-azure-eus-a100-vmss-spot",
    ]
    # Both scale sets join the one backend pool, in the resource group the pool created.
    backend_pool = lb_child("acme-azure-eus-a100-rg-0001", "backendAddressPools/agents")
    for name in ("acme-azure-eus-a100-vmss-od", "acme-azure-eus-a100-vmss-spot"):
        profile = program.by_name(name).state["virtualMachineProfile"]
        (nic,) = profile["networkProfile"]["networkInterfaceConfigurations"]
        (ip,) = nic["ipConfigurations"]
        assert ip["loadBalancerBackendAddressPools"] == [{"id": backend_pool}]
    balancer = program.one("azure-native:network:LoadBalancer").state
    assert balancer["resourceGroupName"] == "acme-azure-eus-a100-rg-0001"
    assert balancer["loadBalancingRules"][0]["backendAddressPool"] == {"id": backend_pool}
    group = program.one("azure-native:resources:ResourceGroup").state
    assert (group["location"], group["tags"]) == ("eastus", TAGS)
    on_demand = program.by_name("acme-azure-eus-a100-vmss-od").state
    spot = program.by_name("acme-azure-eus-a100-vmss-spot").state
    assert (on_demand["sku"]["capacity"], spot["sku"]["capacity"]) == (1, 2)
    assert on_demand["virtualMachineProfile"]["priority"] == "Regular"
    profile = spot["virtualMachineProfile"]
    record = default_catalog().get("azure", "eastus", "Standard_NC24ads_A100_v4")
    assert (profile["priority"], profile["evictionPolicy"], profile["billingProfile"]) == (
        "Spot",
        "Delete",
        {"maxPrice": record.on_demand_usd_per_hour},
    )
    assert spot["resourceGroupName"] == "acme-azure-eus-a100-rg-0001"
    spot_config = json.loads(
        user_data_files(decode_base64(profile["osProfile"]["customData"]))[
            "/etc/fleetform/node.json"
        ]
    )
    assert (spot_config["spot"], spot_config["price_usd_per_hour"]) == (
        True,
        record.spot_usd_per_hour,
    )
