"""GcpPool under mocks: instance templates and regional MIGs, TPU VMs, firewall, labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from runtime.agent.config import NodeConfig

from .support import (
    Program,
    cloud_init_schema,
    instance_group_url,
    lb_private_ip,
    pool_data,
    run_fleet,
    stack_variant,
    user_data_files,
)

ZONES = ["us-central1-a", "us-central1-b", "us-central1-c"]
NETWORK = "projects/acme-inference-prod/global/networks/inference"
SUBNETWORK = "projects/acme-inference-prod/regions/us-central1/subnetworks/inference-usc1"


def test_gpu_pools_get_a_template_and_a_regional_group_each(prod: Program) -> None:
    pools = prod.of_type("fleetform:gcp:GcpPool")
    assert [p.name for p in pools] == [
        "acme-gcp-usc1-l4",
        "acme-gcp-usc1-l4-spot",
        "acme-gcp-usc1-tpu-v5e",
    ]
    assert [r.name for r in prod.of_type("gcp:compute/instanceTemplate:InstanceTemplate")] == [
        "acme-gcp-usc1-l4-spot-tpl",
        "acme-gcp-usc1-l4-tpl",
    ]
    migs = prod.of_type("gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager")
    assert [(m.name, m.state["targetSize"]) for m in migs] == [
        ("acme-gcp-usc1-l4-mig", 1),
        ("acme-gcp-usc1-l4-spot-mig", 2),
    ]
    for mig in migs:
        template = mig.name.removesuffix("-mig") + "-tpl"
        assert mig.state["region"] == "us-central1"
        assert mig.state["distributionPolicyZones"] == ZONES
        assert mig.state["versions"] == [
            {
                "name": "primary",
                "instanceTemplate": f"projects/p/global/instanceTemplates/{template}?uid=1",
            }
        ]
        assert mig.state["namedPorts"] == [{"name": "agent", "port": 8080}]
        assert prod.parent_chain(mig) == [
            "gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager",
            "fleetform:gcp:GcpPool",
            "fleetform:index:InferenceFleet",
            "pulumi:pulumi:Stack",
        ]


def test_templates_carry_accelerators_scheduling_and_no_external_ip(prod: Program) -> None:
    on_demand = prod.by_name("acme-gcp-usc1-l4-tpl").state
    spot = prod.by_name("acme-gcp-usc1-l4-spot-tpl").state
    for state in (on_demand, spot):
        assert state["machineType"] == "g2-standard-8"
        assert state["guestAccelerators"] == [{"type": "nvidia-l4", "count": 1}]
        assert state["networkInterfaces"] == [{"network": NETWORK, "subnetwork": SUBNETWORK}]
        assert state["serviceAccount"]["email"] == (
            "fleetform-nodes@acme-inference-prod.iam.gserviceaccount.com"
        )
    assert on_demand["scheduling"] == {
        "onHostMaintenance": "TERMINATE",
        "automaticRestart": True,
        "provisioningModel": "STANDARD",
        "preemptible": False,
    }
    assert spot["scheduling"] == {
        "onHostMaintenance": "TERMINATE",
        "automaticRestart": False,
        "provisioningModel": "SPOT",
        "preemptible": True,
        "instanceTerminationAction": "DELETE",
    }
    assert spot["labels"] == {
        "fleetform-fleet": "acme-prod",
        "fleetform-pool": "gcp-usc1-l4-spot",
        "fleetform-model": "llama-3-1-8b",
        "fleetform-tenant": "shared",
    }


def test_tpu_pool_is_tpu_vms(prod: Program, tmp_path: Path) -> None:
    (vm,) = prod.of_type("gcp:tpu/v2Vm:V2Vm")
    state = vm.state
    assert vm.name == "acme-gcp-usc1-tpu-v5e-tpu-0"
    assert (state["acceleratorType"], state["runtimeVersion"], state["zone"]) == (
        "v5litepod-4",
        "v2-alpha-tpuv5-lite",
        "us-central1-a",
    )
    assert state["schedulingConfig"] == {"spot": True}
    assert state["networkConfig"] == {
        "network": NETWORK,
        "subnetwork": SUBNETWORK,
        "enableExternalIps": False,
    }
    user_data = state["metadata"]["user-data"]
    result = cloud_init_schema(user_data, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    document = yaml.safe_load(user_data)
    # TPU VM images are Ubuntu 22.04: Python 3.12 comes from the deadsnakes PPA.
    assert document["apt"] == {"sources": {"deadsnakes": {"source": "ppa:deadsnakes/ppa"}}}
    assert document["packages"] == ["python3.12", "python3.12-venv"]
    assert ["python3.12", "-m", "venv", "/opt/fleetform/venv"] in document["runcmd"]
    config = NodeConfig.model_validate(
        json.loads(user_data_files(user_data)["/etc/fleetform/node.json"])
    )
    assert (config.pool, config.spot, config.price_usd_per_hour) == (
        "gcp-usc1-tpu-v5e",
        True,
        1.02869,
    )


def test_firewall_admits_the_agent_port_from_the_fleet_to_the_pool_tag(prod: Program) -> None:
    for pool in ("gcp-usc1-l4", "gcp-usc1-l4-spot", "gcp-usc1-tpu-v5e"):
        firewall = prod.by_name(f"acme-{pool}-fw").state
        tag = f"fleetform-acme-prod-{pool}"
        assert firewall == {
            "name": f"acme-{pool}-agent",
            "network": NETWORK,
            "description": (f"Fleetform pool {pool}: agent port from the fleet's networks only"),
            "direction": "INGRESS",
            "allows": [{"protocol": "tcp", "ports": ["8080"]}],
            "sourceRanges": ["10.40.0.0/14", "10.44.0.0/16"],
            "targetTags": [tag],
        }
    assert prod.by_name("acme-gcp-usc1-l4-tpl").state["tags"] == ["fleetform-acme-prod-gcp-usc1-l4"]


def test_gpu_user_data_installs_the_driver_and_uses_gcp_spot_notices(
    prod: Program, tmp_path: Path
) -> None:
    user_data = prod.by_name("acme-gcp-usc1-l4-spot-tpl").state["metadata"]["user-data"]
    result = cloud_init_schema(user_data, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    document = yaml.safe_load(user_data)
    assert document["runcmd"][0] == ["ubuntu-drivers", "install", "--gpgpu"]
    unit = user_data_files(user_data)["/etc/systemd/system/fleetform-agent.service"]
    assert "--spot-notices gcp" in unit
    config = NodeConfig.model_validate(
        json.loads(user_data_files(user_data)["/etc/fleetform/node.json"])
    )
    assert (config.spot, config.price_usd_per_hour) == (True, 0.35766)


def test_an_on_demand_base_becomes_its_own_on_demand_group(program: Program) -> None:
    def mutate(config: dict[str, Any]) -> None:
        pool_data(config, "gcp-usc1-l4-spot")["on_demand_base"] = 1
        pool_data(config, "gcp-usc1-l4-spot")["desired_replicas"] = 3

    spec, settings = stack_variant("Pulumi.prod.yaml", mutate)
    from .support import PROD_KEYS

    run_fleet(program, spec, settings, api_keys=PROD_KEYS)
    pool = program.by_name("acme-gcp-usc1-l4-spot")
    names = [c.name for c in program.children(pool)]
    assert names == [
        "acme-gcp-usc1-l4-spot-be",
        "acme-gcp-usc1-l4-spot-fr",
        "acme-gcp-usc1-l4-spot-fw",
        "acme-gcp-usc1-l4-spot-hc",
        "acme-gcp-usc1-l4-spot-hc-fw",
        "acme-gcp-usc1-l4-spot-mig-od",
        "acme-gcp-usc1-l4-spot-mig-spot",
        "acme-gcp-usc1-l4-spot-tpl-od",
        "acme-gcp-usc1-l4-spot-tpl-spot",
    ]
    # Both groups sit behind the pool's one internal load balancer.
    backend = program.by_name("acme-gcp-usc1-l4-spot-be").state
    assert backend["backends"] == [
        {
            "group": instance_group_url(f"acme-gcp-usc1-l4-spot-mig-{suffix}", "us-central1"),
            "balancingMode": "CONNECTION",
        }
        for suffix in ("od", "spot")
    ]
    assert program.by_name("acme-gcp-usc1-l4-spot-mig-od").state["targetSize"] == 1
    assert program.by_name("acme-gcp-usc1-l4-spot-mig-spot").state["targetSize"] == 2
    od = program.by_name("acme-gcp-usc1-l4-spot-tpl-od").state
    assert od["scheduling"]["provisioningModel"] == "STANDARD"
    od_config = json.loads(user_data_files(od["metadata"]["user-data"])["/etc/fleetform/node.json"])
    assert (od_config["spot"], od_config["price_usd_per_hour"]) == (False, 0.85362)


LB_POOLS = ("gcp-usc1-l4", "gcp-usc1-l4-spot")


def test_gpu_pools_get_an_internal_passthrough_load_balancer(prod: Program) -> None:
    checks = prod.of_type("gcp:compute/regionHealthCheck:RegionHealthCheck")
    backends = prod.of_type("gcp:compute/regionBackendService:RegionBackendService")
    rules = prod.of_type("gcp:compute/forwardingRule:ForwardingRule")
    assert [r.name for r in checks] == [f"acme-{p}-hc" for p in LB_POOLS]
    assert [r.name for r in backends] == [f"acme-{p}-be" for p in LB_POOLS]
    assert [r.name for r in rules] == [f"acme-{p}-fr" for p in LB_POOLS]
    for pool in LB_POOLS:
        check = prod.by_name(f"acme-{pool}-hc").state
        assert check["httpHealthCheck"] == {"port": 8080, "requestPath": "/readyz"}
        assert (check["region"], check["checkIntervalSec"], check["timeoutSec"]) == (
            "us-central1",
            5,
            3,
        )
        assert (check["healthyThreshold"], check["unhealthyThreshold"]) == (2, 2)
        backend = prod.by_name(f"acme-{pool}-be").state
        assert (backend["loadBalancingScheme"], backend["protocol"], backend["region"]) == (
            "INTERNAL",
            "TCP",
            "us-central1",
        )
        assert backend["healthChecks"] == f"acme-{pool}-hc-id"
        assert backend["backends"] == [
            {
                "group": instance_group_url(f"acme-{pool}-mig", "us-central1"),
                "balancingMode": "CONNECTION",
            }
        ]
        assert backend["connectionDrainingTimeoutSec"] == 30
        rule = prod.by_name(f"acme-{pool}-fr").state
        assert (rule["loadBalancingScheme"], rule["ipProtocol"], rule["ports"]) == (
            "INTERNAL",
            "TCP",
            ["8080"],
        )
        assert (rule["network"], rule["subnetwork"]) == (NETWORK, SUBNETWORK)
        assert rule["backendService"] == f"acme-{pool}-be-id"
        assert rule["allowGlobalAccess"] is True
        assert rule["labels"]["fleetform-pool"] == pool
        assert prod.values["api_endpoints"][pool] == (
            f"http://{lb_private_ip(f'acme-{pool}-fr')}:8080/v1"
        )
        for name in ("hc", "be", "fr", "hc-fw"):
            assert prod.parent_chain(prod.by_name(f"acme-{pool}-{name}"))[1:] == [
                "fleetform:gcp:GcpPool",
                "fleetform:index:InferenceFleet",
                "pulumi:pulumi:Stack",
            ]


def test_health_checks_reach_the_agent_port_through_the_firewall(prod: Program) -> None:
    for pool in LB_POOLS:
        firewall = prod.by_name(f"acme-{pool}-hc-fw").state
        assert firewall == {
            "name": f"acme-{pool}-health",
            "network": NETWORK,
            "description": f"Fleetform pool {pool}: Google health checks to the agent port",
            "direction": "INGRESS",
            "allows": [{"protocol": "tcp", "ports": ["8080"]}],
            "sourceRanges": ["35.191.0.0/16", "130.211.0.0/22"],
            # The same tag the pool's instances carry.
            "targetTags": [f"fleetform-acme-prod-{pool}"],
        }
        template = prod.by_name(f"acme-{pool}-tpl").state
        assert template["tags"] == firewall["targetTags"]


def test_tpu_pool_has_no_load_balancer_nor_endpoint(prod: Program) -> None:
    pool = prod.by_name("acme-gcp-usc1-tpu-v5e")
    assert sorted(c.type for c in prod.children(pool)) == [
        "gcp:compute/firewall:Firewall",
        "gcp:tpu/v2Vm:V2Vm",
    ]
    assert "gcp-usc1-tpu-v5e" not in prod.values["api_endpoints"]
