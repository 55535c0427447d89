"""The pack as the engine runs it: `python -m pulumi.policy <engine> .` in policy/, the stack's
config in PULUMI_CONFIG, and the analyzer gRPC protocol (GetAnalyzerInfo, Analyze per resource,
AnalyzeStack) fed with what the mocked InferenceFleet registers. Only the engine itself (which
sends these requests during `pulumi preview`) is missing."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2, struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc

from policy.policies import AWS_LAUNCH_TEMPLATE, FLEET_TYPE
from runtime.spec import FLEET_CONFIG_KEY

from .support import PROD, Stack, plain_props, run_stack
from .variants import OVER_BUDGET_MESSAGE, over_budget

POLICY_DIR = Path(__file__).parents[2] / "policy"
START_TIMEOUT_S = 60
AWS_LOAD_BALANCER = "aws:lb/loadBalancer:LoadBalancer"
# The engine prints the policy's description before each message.
NO_PUBLIC_IP = (
    "Nodes get no public IP, and no Service or load balancer is exposed outside the network.\n"
)


def engine_config(config: dict[str, Any]) -> str:
    """PULUMI_CONFIG as the engine writes it: structured values as JSON text."""
    return json.dumps(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items() if ":" in k}
    )


@contextmanager
def running_pack(config: dict[str, Any]) -> Iterator[analyzer_pb2_grpc.AnalyzerStub]:
    env = {
        **os.environ,
        "PULUMI_CONFIG": engine_config(config),
        "PULUMI_PROJECT": "fleetform",
        "PULUMI_STACK": "prod",
        "PULUMI_DRY_RUN": "true",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "pulumi.policy", "127.0.0.1:0", "."],
        cwd=POLICY_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        assert ready, "the policy pack did not start"
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.isdigit(), (line, process.stderr.read() if process.poll() is not None else "")
        with grpc.insecure_channel(f"127.0.0.1:{line}") as channel:
            yield analyzer_pb2_grpc.AnalyzerStub(channel)
    finally:
        process.kill()  # PolicyPack serves until killed
        process.wait()


def _struct(props: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(props)
    return struct


def analyze(stub: analyzer_pb2_grpc.AnalyzerStub, stack: Stack) -> list[tuple[str, int, str, str]]:
    """What a preview asks the pack: each resource, then the stack. (policy, level, urn,
    message) of every diagnostic."""
    diagnostics = []
    resources = []
    for r in stack.resources:
        props = _struct(plain_props(r))
        options = analyzer_pb2.AnalyzerResourceOptions(parent=r.opts.parent or "")
        response = stub.Analyze(
            analyzer_pb2.AnalyzeRequest(
                type=r.resource_type, properties=props, urn=r.urn, name=r.name, options=options
            )
        )
        diagnostics += list(response.diagnostics)
        resources.append(
            analyzer_pb2.AnalyzerResource(
                type=r.resource_type,
                properties=props,
                urn=r.urn,
                name=r.name,
                options=options,
                parent=r.opts.parent or "",
                dependencies=[d.urn for d in r.dependencies],
            )
        )
    response = stub.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=resources))
    diagnostics += list(response.diagnostics)
    return [(d.policyName, d.enforcementLevel, d.urn, d.message) for d in diagnostics]


def test_the_pack_process_passes_prod_and_describes_its_policies(prod: Stack) -> None:
    with running_pack(prod.config) as stub:
        info = stub.GetAnalyzerInfo(empty_pb2.Empty())
        assert info.name == "fleetform"
        levels = {p.name: p.enforcementLevel for p in info.policies}
        assert levels["spot-for-sheddable-pools"] == analyzer_pb2.ADVISORY
        assert {n for n, level in levels.items() if level == analyzer_pb2.MANDATORY} == {
            "fleet-budget",
            "tenant-quota",
            "allowed-regions-and-families",
            "cost-attribution-tags",
            "agent-authentication",
            "agent-token-secret",
            "no-public-ip",
        }
        [regions] = [p for p in info.policies if p.name == "allowed-regions-and-families"]
        assert sorted(regions.configSchema.properties) == [
            "allowedInstanceFamilies",
            "allowedRegions",
        ]
        assert analyze(stub, prod) == []
        # The same process refuses a launch template that gives nodes a public IP.
        [template, *_] = [r for r in prod.resources if r.resource_type == AWS_LAUNCH_TEMPLATE]
        props = plain_props(template)
        props["networkInterfaces"][0]["associatePublicIpAddress"] = "true"
        response = stub.Analyze(
            analyzer_pb2.AnalyzeRequest(
                type=AWS_LAUNCH_TEMPLATE, properties=_struct(props), urn=template.urn, name="lt"
            )
        )
        assert [(d.policyName, d.enforcementLevel, d.message) for d in response.diagnostics] == [
            (
                "no-public-ip",
                analyzer_pb2.MANDATORY,
                NO_PUBLIC_IP + f"lt ({AWS_LAUNCH_TEMPLATE}): "
                "networkInterfaces[0].associatePublicIpAddress is true: it must be false",
            )
        ]
        # And a pool's NLB turned internet-facing.
        [nlb, *_] = [r for r in prod.resources if r.resource_type == AWS_LOAD_BALANCER]
        props = plain_props(nlb)
        assert props["internal"] is True
        props["internal"] = False
        response = stub.Analyze(
            analyzer_pb2.AnalyzeRequest(
                type=AWS_LOAD_BALANCER, properties=_struct(props), urn=nlb.urn, name="nlb"
            )
        )
        assert [(d.policyName, d.enforcementLevel, d.message) for d in response.diagnostics] == [
            (
                "no-public-ip",
                analyzer_pb2.MANDATORY,
                NO_PUBLIC_IP + f"nlb ({AWS_LOAD_BALANCER}): internal is False: the load "
                "balancer is internet-facing; set internal true",
            )
        ]


def test_the_pack_process_refuses_an_over_budget_prod() -> None:
    stack = run_stack(PROD, over_budget)
    assert stack.config[FLEET_CONFIG_KEY]["budget"]["usd_per_month"] == 95000
    [fleet] = [r for r in stack.resources if r.resource_type == FLEET_TYPE]
    with running_pack(stack.config) as stub:
        # The engine prints the policy's description, then the message.
        assert analyze(stub, stack) == [
            (
                "fleet-budget",
                analyzer_pb2.MANDATORY,
                fleet.urn,
                "At max replicas, the fleet's pools (max replicas x hourly price, 730 hours a "
                "month) cost no more than the stack's budget.usd_per_month.\n"
                + OVER_BUDGET_MESSAGE,
            )
        ]
