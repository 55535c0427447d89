"""Helpers of the component tests: Pulumi mocks, a program runner that reads back the
registered resource graph (types, names, wire-format inputs, parents), the stacks, and the two
real validators (`cloud-init schema`, the Kubernetes OpenAPI schemas).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pulumi
import yaml
from pulumi.runtime.mocks import MockMonitor

from components.settings import settings_from_config
from runtime.spec import FleetSpec, load_stack_file

REPO = Path(__file__).parents[2]
STACKS = REPO / "stacks"
CLOUD_INIT = "/usr/bin/cloud-init"
K8S_VERSION = kubernetes_validate.latest_version()

# What the SSM public parameters resolve to under the mocks, by parameter.
AMI_IDS = {
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id": (
        "ami-0nvidia"
    ),
    "/aws/service/neuron/dlami/multi-framework/ubuntu-24.04/latest/image_id": "ami-0neuron",
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id": (
        "ami-0ubuntuarm"
    ),
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id": (
        "ami-0ubuntu"
    ),
}


def lb_dns_name(name: str, region: str) -> str:
    """What the mocks give an AWS NLB as its DNS name."""
    return f"{name}-0123456789abcdef.elb.{region}.amazonaws.com"


def lb_private_ip(name: str) -> str:
    """What the mocks give a GCP forwarding rule / Azure frontend as its private address: one
    per name, so that the endpoints of two pools cannot be mixed up unnoticed."""
    digest = sum(name.encode("utf-8"))
    return f"10.{digest % 200 + 1}.{len(name)}.{digest % 250 + 2}"


def instance_group_url(name: str, region: str) -> str:
    return f"projects/p/regions/{region}/instanceGroups/{name}"


@dataclass(frozen=True)
class Resource:
    urn: str
    type: str
    name: str
    parent: str
    state: dict[str, Any]


class FleetMocks(pulumi.runtime.Mocks):
    """Echo inputs as outputs, plus the computed attributes the components read."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        state = dict(args.inputs)
        typ = args.typ
        if typ == "aws:ec2/launchTemplate:LaunchTemplate":
            state["latestVersion"] = 3
        elif typ in ("aws:iam/role:Role", "aws:iam/instanceProfile:InstanceProfile"):
            state["arn"] = f"arn:aws:iam::123456789012:{typ.split(':')[-1].lower()}/{args.name}"
            state.setdefault("name", args.name)
        elif typ == "aws:autoscaling/group:Group":
            state.setdefault("name", f"{args.name}-asg-0001")
        elif typ == "gcp:compute/instanceTemplate:InstanceTemplate":
            state["selfLinkUnique"] = f"projects/p/global/instanceTemplates/{args.name}?uid=1"
        elif typ == "azure-native:resources:ResourceGroup":
            state.setdefault("name", f"{args.name}-0001")
        elif typ == "azure-native:compute:VirtualMachineScaleSet":
            state.setdefault("name", args.name)
        # Load balancers: the addresses the pools' endpoints are made of.
        elif typ == "aws:lb/loadBalancer:LoadBalancer":
            state["arn"] = f"arn:aws:elasticloadbalancing:{state['region']}:1:lb/{args.name}"
            state["dnsName"] = lb_dns_name(args.name, state["region"])
        elif typ == "aws:lb/targetGroup:TargetGroup":
            state["arn"] = f"arn:aws:elasticloadbalancing:{state['region']}:1:tg/{args.name}"
        elif typ == "gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager":
            state["instanceGroup"] = instance_group_url(args.name, state["region"])
        elif typ == "gcp:compute/forwardingRule:ForwardingRule":
            state["ipAddress"] = lb_private_ip(args.name)
        elif typ == "azure-native:network:LoadBalancer":
            state["frontendIPConfigurations"] = [
                {**frontend, "privateIPAddress": lb_private_ip(args.name)}
                for frontend in state["frontendIPConfigurations"]
            ]
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:ssm/getParameter:getParameter":
            name = args.args["name"]
            return {"id": name, "name": name, "value": AMI_IDS[name], "type": "String"}
        raise AssertionError(f"unexpected invoke {args.token}")


class RecordingMonitor(MockMonitor):
    """The mock monitor, also remembering each resource's parent URN."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.parents: dict[str, str] = {}

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        self.parents[response.urn] = request.parent
        return response


class Program:
    """One mocked Pulumi program run."""

    def __init__(self, monitor: RecordingMonitor, mocks: FleetMocks) -> None:
        self.monitor = monitor
        self.mocks = mocks
        self.values: dict[str, Any] = {}

    def run(self, build: Callable[[], Mapping[str, Any] | None]) -> Program:
        """Run `build` as the program; the Outputs it returns (by name) land in `values`."""

        @pulumi.runtime.test
        def program() -> Any:
            outputs = build() or {}
            if not outputs:
                return None
            return pulumi.Output.all(**outputs).apply(self.values.update)

        program()
        return self

    @property
    def resources(self) -> list[Resource]:
        found = []
        for urn, registration in self.monitor.get_registered_resources().items():
            found.append(
                Resource(
                    urn=urn,
                    type=urn.split("::")[2].split("$")[-1],
                    name=urn.split("::")[3],
                    parent=self.monitor.parents.get(urn, ""),
                    state=_plain(registration.state),
                )
            )
        return found

    def of_type(self, typ: str) -> list[Resource]:
        return sorted((r for r in self.resources if r.type == typ), key=lambda r: r.name)

    def one(self, typ: str) -> Resource:
        found = self.of_type(typ)
        assert len(found) == 1, [r.name for r in found]
        return found[0]

    def by_name(self, name: str) -> Resource:
        matches = [r for r in self.resources if r.name == name]
        assert len(matches) == 1, name
        return matches[0]

    def parent_chain(self, resource: Resource) -> list[str]:
        """Types from the resource up to the stack: [its type, its parent's, ..., Stack]."""
        by_urn = {r.urn: r for r in self.resources}
        chain = [resource.type]
        parent = resource.parent
        while parent:
            if parent in by_urn:
                chain.append(by_urn[parent].type)
                parent = by_urn[parent].parent
            else:  # the root stack is not recorded by the mock monitor
                chain.append(parent.split("::")[2].split("$")[-1])
                break
        return chain

    def children(self, parent: Resource) -> list[Resource]:
        return sorted((r for r in self.resources if r.parent == parent.urn), key=lambda r: r.name)


def _plain(value: Any) -> Any:
    """Mock state as plain JSON data: secrets unwrapped, whole floats as ints (the mocks carry
    numbers as floats; the Kubernetes schemas want integers)."""
    if isinstance(value, dict):
        if value.get("4dabf18193072939515e22adb298388d") == "1b47061264138c4ac30d75fd1eb44270":
            return _plain(value["value"])
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def install_mocks() -> Program:
    """Fresh mocks and monitor on a new event loop (mocks are process-global)."""
    asyncio.set_event_loop(asyncio.new_event_loop())
    mocks = FleetMocks()
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(
        mocks, project="fleetform", stack="test", preview=False, monitor=monitor
    )
    return Program(monitor, mocks)


# --------------------------------------------------------------------------------------------
# Stacks and validators


def stack_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((STACKS / name).read_text(encoding="utf-8"))["config"]


def load_stack(name: str) -> tuple[FleetSpec, Any]:
    spec = load_stack_file(STACKS / name)
    return spec, settings_from_config(stack_config(name))


def cloud_init_schema(user_data: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`cloud-init schema --config-file` (Debian's binary) on the user data."""
    path = tmp_path / "user-data.yaml"
    path.write_text(user_data, encoding="utf-8")
    return subprocess.run(
        [CLOUD_INIT, "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def k8s_problem(manifest: Mapping[str, Any]) -> str | None:
    """None when the manifest is valid against the Kubernetes OpenAPI schema (strict: unknown
    fields are errors), else the first line of the error."""
    try:
        kubernetes_validate.validate(dict(manifest), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return str(error).splitlines()[0]
    return None


def as_manifest(resource: Resource) -> dict[str, Any]:
    """A registered kubernetes resource's state as a manifest (apiVersion and kind included)."""
    state = dict(resource.state)
    api, kind = resource.type.removeprefix("kubernetes:").split(":")
    group_version = api.replace("core/v1", "v1")
    state.setdefault("apiVersion", group_version)
    state.setdefault("kind", kind)
    return json.loads(json.dumps(state))


# --------------------------------------------------------------------------------------------
# The example stacks as fleets

PROD_KEYS = {
    f"config:{name}": f"prod-key-{name}"
    for name in ("searchApiKey", "supportBotApiKey", "codeAssistApiKey", "batchEnrichmentApiKey")
}
DEV_ENV = {"FLEETFORM_KEY_APP_TEAM": "dev-key-app", "FLEETFORM_KEY_DATA_TEAM": "dev-key-data"}
FLEET_TOKEN = "fleet-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"

FLEET_OUTPUTS = (
    "fleet_name",
    "pool_names",
    "local_pools",
    "api_endpoints",
    "controller_url",
    "on_demand_usd_per_hour",
    "spot_usd_per_hour",
    "total_usd_per_hour",
    "total_usd_per_month",
    "max_usd_per_month",
    "pool_usd_per_hour",
    "pool_on_demand_usd_per_hour",
    "pool_spot_usd_per_hour",
    "tenant_quotas",
)


def fleet_outputs(fleet: Any) -> dict[str, Any]:
    return {name: getattr(fleet, name) for name in FLEET_OUTPUTS}


def run_fleet(
    program: Program,
    spec: FleetSpec,
    settings: Any,
    *,
    api_keys: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    name: str = "acme",
) -> Program:
    from components.fleet import InferenceFleet

    def build() -> dict[str, Any]:
        fleet = InferenceFleet(
            name,
            spec,
            settings=settings,
            api_keys=api_keys or {},
            fleet_token=FLEET_TOKEN,
            admin_token=ADMIN_TOKEN,
            environ=environ or {},
        )
        return fleet_outputs(fleet)

    return program.run(build)


def run_prod() -> Program:
    spec, settings = load_stack("Pulumi.prod.yaml")
    return run_fleet(install_mocks(), spec, settings, api_keys=PROD_KEYS)


def decode_base64(text: str) -> str:
    import base64

    return base64.b64decode(text).decode("utf-8")


def user_data_files(user_data: str) -> dict[str, str]:
    """The files a cloud-config writes, by path."""
    document = yaml.safe_load(user_data)
    return {f["path"]: f["content"] for f in document["write_files"]}


def stack_variant(name: str, mutate: Callable[[dict[str, Any]], None]) -> tuple[FleetSpec, Any]:
    """An example stack with its config changed by `mutate`, validated like the original."""
    from runtime.spec import fleet_from_stack_config

    config = stack_config(name)
    mutate(config)
    return fleet_from_stack_config(config), settings_from_config(config)


def pool_data(config: dict[str, Any], pool: str) -> dict[str, Any]:
    return next(p for p in config["fleetform:fleet"]["pools"] if p["name"] == pool)
