"""`fleetform:aws:AwsPool`: one pool of a fleet as an EC2 Auto Scaling group.

A thin shell over `components.plan`: a launch template (the AMI looked up from an SSM public
parameter: the NVIDIA Deep Learning Base AMI for GPUs, the Neuron DLAMI for Inferentia and
Trainium, Ubuntu for CPUs), an Auto Scaling group (a mixed-instances policy for spot pools:
price-capacity-optimized above the spec's on-demand base), an IAM role and instance profile that
grant only Systems Manager access (no SSH, no public IP), and a security group that admits the
agent port only from the fleet's networks. Cost tags are set on the group (propagated at launch)
and in the template's tag specifications (instances and volumes).

The pool's API endpoint (`endpoint`) is an internal Network Load Balancer in the pool's subnets
(never internet-facing): a TCP listener on the agent port, an instance target group whose HTTP
health check asks the agent's `/readyz` (loading and draining nodes leave rotation), and the Auto
Scaling group registering every node it launches in it. The NLB has its own security group
(the agent port from the fleet's networks), and the nodes' security group admits the agent port
from that group too: the NLB preserves client addresses, and its health checks come from its
own private addresses, which this rule covers without knowing the VPC's CIDR (AWS's documented
way for NLBs with security groups). The subnets must be in distinct availability zones (one NLB
subnet per zone).
"""

import json
from collections.abc import Callable
from typing import Any

import pulumi
import pulumi_aws.autoscaling as autoscaling
import pulumi_aws.ec2 as ec2
import pulumi_aws.iam as iam
import pulumi_aws.lb as lb
import pulumi_aws.ssm as ssm

from . import naming
from .plan import (
    LoadBalancerPlan,
    PoolPlan,
    api_endpoint,
    aws_ami_parameter,
    aws_instances_distribution,
    boot_disk_gb,
)
from .settings import AwsPlacement
from .userdata import base64_user_data

TYPE = "fleetform:aws:AwsPool"
# Session Manager instead of SSH: the only permission a node needs (the agent itself calls no
# AWS API; spot notices come from the instance metadata service, which needs no IAM).
SSM_CORE_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
EC2_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


class AwsPool(pulumi.ComponentResource):
    """An AWS pool: launch template, Auto Scaling group, IAM role, security group, and (given a
    `load_balancer` plan) an internal NLB in front of the agents."""

    group_name: pulumi.Output[str]
    launch_template_id: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    role_arn: pulumi.Output[str]
    ami_id: pulumi.Output[str]
    endpoint: pulumi.Output[str] | None
    """`http://<NLB DNS name>:<agent port>/v1`; None without a load balancer."""
    load_balancer_arn: pulumi.Output[str] | None
    target_group_arn: pulumi.Output[str] | None

    def __init__(
        self,
        name: str,
        plan: PoolPlan,
        placement: AwsPlacement,
        *,
        fleet_cidrs: pulumi.Input[list[str]],
        agent_port: int,
        user_data: Callable[[bool], pulumi.Output[str]],
        load_balancer: LoadBalancerPlan | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        pool = plan.pool
        region = pool.region
        tags = plan.tags("aws")
        child = pulumi.ResourceOptions(parent=self)

        lb_security_group: ec2.SecurityGroup | None = None
        ingress: list[dict[str, Any]] = [
            {
                "description": "fleetform agent",
                "protocol": "tcp",
                "from_port": agent_port,
                "to_port": agent_port,
                "cidr_blocks": fleet_cidrs,
            }
        ]
        if load_balancer is not None:
            lb_security_group = ec2.SecurityGroup(
                naming.child_name(name, "nlb-sg"),
                region=region,
                vpc_id=placement.vpc_id,
                description=f"Fleetform NLB of pool {pool.name}: agent port from the fleet only",
                ingress=[
                    {
                        "description": "fleetform API",
                        "protocol": "tcp",
                        "from_port": load_balancer.port,
                        "to_port": load_balancer.port,
                        "cidr_blocks": fleet_cidrs,
                    }
                ],
                # Only to the agent port: forwarded traffic and health checks. The NLB sends
                # to its registered targets only; the VPC's CIDR is not known here.
                egress=[
                    {
                        "protocol": "tcp",
                        "from_port": load_balancer.port,
                        "to_port": load_balancer.port,
                        "cidr_blocks": ["0.0.0.0/0"],
                    }
                ],
                tags=tags,
                opts=child,
            )
            ingress.append(
                {
                    # Health checks come from the NLB's private addresses; forwarded traffic
                    # keeps the client's (admitted above, and by this rule as AWS documents).
                    "description": "fleetform agent via the pool's NLB (traffic, health checks)",
                    "protocol": "tcp",
                    "from_port": agent_port,
                    "to_port": agent_port,
                    "security_groups": [lb_security_group.id],
                }
            )

        ami = ssm.get_parameter_output(
            name=aws_ami_parameter(plan.record),
            region=region,
            opts=pulumi.InvokeOutputOptions(parent=self),
        )
        role = iam.Role(
            naming.child_name(name, "role"),
            assume_role_policy=json.dumps(EC2_TRUST_POLICY),
            description=f"Fleetform nodes of pool {pool.name} ({plan.fleet})",
            tags=tags,
            opts=child,
        )
        iam.RolePolicyAttachment(
            naming.child_name(name, "ssm"), role=role.name, policy_arn=SSM_CORE_POLICY, opts=child
        )
        profile = iam.InstanceProfile(
            naming.child_name(name, "profile"), role=role.name, tags=tags, opts=child
        )
        security_group = ec2.SecurityGroup(
            naming.child_name(name, "sg"),
            region=region,
            vpc_id=placement.vpc_id,
            description=f"Fleetform agents of pool {pool.name}: agent port from the fleet only",
            ingress=ingress,
            # Nodes fetch the wheel, model weights and OS packages, and push to the controller.
            egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"]}],
            tags=tags,
            opts=child,
        )
        template = ec2.LaunchTemplate(
            naming.child_name(name, "lt"),
            region=region,
            name_prefix=naming.shorten(f"{name}-", naming.AWS_NAME_PREFIX_MAX),
            description=f"Fleetform pool {pool.name}: {pool.instance_type}",
            image_id=ami.value,
            instance_type=pool.instance_type,
            user_data=user_data(pool.spot).apply(base64_user_data),
            iam_instance_profile={"arn": profile.arn},
            network_interfaces=[
                {
                    "device_index": 0,
                    "associate_public_ip_address": "false",
                    "delete_on_termination": "true",
                    "security_groups": [security_group.id],
                }
            ],
            # IMDSv2 only, one hop: containers on the node cannot borrow its role.
            metadata_options={
                "http_endpoint": "enabled",
                "http_tokens": "required",
                "http_put_response_hop_limit": 1,
            },
            block_device_mappings=[
                {
                    "device_name": "/dev/sda1",
                    "ebs": {
                        "volume_size": boot_disk_gb(plan.family),
                        "volume_type": "gp3",
                        "encrypted": "true",
                        "delete_on_termination": "true",
                    },
                }
            ],
            tag_specifications=[
                {"resource_type": "instance", "tags": tags},
                {"resource_type": "volume", "tags": tags},
            ],
            update_default_version=True,
            tags=tags,
            opts=child,
        )
        group_args: dict[str, Any] = {}
        distribution = aws_instances_distribution(pool)
        template_ref = {"id": template.id, "version": template.latest_version.apply(str)}
        if distribution is None:
            group_args["launch_template"] = template_ref
        else:
            group_args["mixed_instances_policy"] = {
                "instances_distribution": distribution,
                "launch_template": {
                    "launch_template_specification": {
                        "launch_template_id": template.id,
                        "version": template.latest_version.apply(str),
                    },
                    "overrides": [{"instance_type": pool.instance_type}],
                },
            }
            # Replace a spot node AWS says is at risk before it is interrupted.
            group_args["capacity_rebalance"] = True

        nlb: lb.LoadBalancer | None = None
        target_group: lb.TargetGroup | None = None
        if load_balancer is not None:
            assert lb_security_group is not None
            health = load_balancer.health
            # Names are left to Pulumi's auto-naming, which keeps to the 32 characters AWS
            # allows NLBs and target groups (a random suffix also lets them be replaced).
            nlb = lb.LoadBalancer(
                naming.child_name(name, "nlb"),
                region=region,
                internal=True,  # never internet-facing (the no-public-ip policy checks it)
                load_balancer_type="network",
                ip_address_type="ipv4",
                subnets=placement.subnet_ids,
                security_groups=[lb_security_group.id],
                # GPU capacity is scarce per zone: a zone's NLB address must reach the nodes
                # of the other zones when its own has none.
                enable_cross_zone_load_balancing=True,
                tags=tags,
                opts=child,
            )
            target_group = lb.TargetGroup(
                naming.child_name(name, "tg"),
                region=region,
                vpc_id=placement.vpc_id,
                target_type="instance",
                protocol="TCP",
                port=load_balancer.port,
                deregistration_delay=load_balancer.drain_s,
                health_check={
                    "enabled": True,
                    "protocol": "HTTP",
                    "path": health.path,
                    "port": "traffic-port",
                    "matcher": "200",
                    "interval": health.interval_s,
                    "timeout": health.timeout_s,
                    "healthy_threshold": health.healthy_threshold,
                    "unhealthy_threshold": health.unhealthy_threshold,
                },
                tags=tags,
                opts=child,
            )
            lb.Listener(
                naming.child_name(name, "listener"),
                region=region,
                load_balancer_arn=nlb.arn,
                port=load_balancer.port,
                protocol="TCP",
                default_actions=[{"type": "forward", "target_group_arn": target_group.arn}],
                tags=tags,
                opts=child,
            )
            # Instances register themselves at launch and deregister (after the drain delay)
            # before they terminate. The group's own health check stays EC2: an ELB check
            # would replace nodes that are merely loading or draining.
            group_args["target_group_arns"] = [target_group.arn]
        group = autoscaling.Group(
            naming.child_name(name, "asg"),
            region=region,
            name_prefix=naming.shorten(f"{name}-", naming.AWS_NAME_PREFIX_MAX),
            min_size=pool.min_replicas,
            max_size=pool.max_replicas,
            desired_capacity=pool.replicas,
            vpc_zone_identifiers=placement.subnet_ids,
            health_check_type="EC2",
            health_check_grace_period=int(pool.cold_start_s),
            # Fleetform's autoscaler owns the size; `pulumi up` does not wait for boots.
            wait_for_capacity_timeout="0",
            tags=[{"key": k, "value": v, "propagate_at_launch": True} for k, v in tags.items()],
            opts=child,
            **group_args,
        )

        self.group_name = group.name
        self.launch_template_id = template.id
        self.security_group_id = security_group.id
        self.role_arn = role.arn
        self.ami_id = ami.value
        self.endpoint = None
        self.load_balancer_arn = None
        self.target_group_arn = None
        outputs: dict[str, Any] = {
            "group_name": self.group_name,
            "launch_template_id": self.launch_template_id,
            "security_group_id": self.security_group_id,
            "role_arn": self.role_arn,
            "ami_id": self.ami_id,
        }
        if nlb is not None and target_group is not None and load_balancer is not None:
            port = load_balancer.port
            self.endpoint = nlb.dns_name.apply(lambda host: api_endpoint(host, port))
            self.load_balancer_arn = nlb.arn
            self.target_group_arn = target_group.arn
            outputs.update(
                endpoint=self.endpoint,
                load_balancer_arn=self.load_balancer_arn,
                target_group_arn=self.target_group_arn,
            )
        self.register_outputs(outputs)
