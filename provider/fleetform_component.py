"""`InferenceFleet` for other languages: the component provider's schema-friendly face.

The Python component (`components.fleet.InferenceFleet`) takes a parsed FleetSpec; a YAML or
TypeScript program cannot build one. Here the fleet spec is a string: the YAML or JSON text of
what a stack keeps under `fleetform:fleet` (in Pulumi YAML `fn::toJSON` of a mapping, in
TypeScript `JSON.stringify(spec)`), validated by the same `runtime.spec` code with the same
`path: reason` messages. Replica overrides, networks (whose ids may be outputs of other
resources), agent and controller settings are typed objects; API keys and tokens are secret
inputs. Outputs are those of the Python component (plain strings and numbers).

The pulumi analyzer infers the schema from the annotations below at run time, so this module
must not use `from __future__ import annotations`, Union types, or defaulted dataclass fields
(NotRequired marks what may be left out).
"""

import re
from typing import Any, NotRequired, TypedDict

import pulumi

from components import fleet
from components.settings import (
    FleetSettings,
    SettingsError,
    parse_agent,
    parse_controller,
    parse_network,
)
from runtime.spec import FLEET_CONFIG_KEY, REPLICAS_CONFIG_KEY, fleet_from_stack_config


class AwsNetworkArgs(TypedDict):
    """Where an AWS region's pools go."""

    vpc_id: pulumi.Input[str]
    """The VPC of the region's pools."""
    subnet_ids: pulumi.Input[list[str]]
    """Private subnets the Auto Scaling groups spread over (nodes get no public IP)."""


class GcpNetworkArgs(TypedDict):
    """Where a GCP region's pools go."""

    network: pulumi.Input[str]
    """The VPC network (self link or name)."""
    subnetwork: pulumi.Input[str]
    """The region's subnetwork (self link or name)."""
    service_account: NotRequired[pulumi.Input[str]]
    """The nodes' service account email; default: the project's compute account."""


class AzureNetworkArgs(TypedDict):
    """Where an Azure region's pools go."""

    subnet_id: pulumi.Input[str]
    """The subnet's resource id."""
    admin_ssh_public_key: pulumi.Input[str]
    """The admin user's SSH public key (password logins are disabled)."""
    resource_group_name: NotRequired[pulumi.Input[str]]
    """The resource group of the scale sets; default: one per pool."""


class NetworkArgs(TypedDict):
    """The networks pools are placed into, per cloud and region."""

    fleet_cidrs: NotRequired[pulumi.Input[list[str]]]
    """The only sources admitted to the agent port: the fleet's networks."""
    aws: NotRequired[dict[str, AwsNetworkArgs]]
    """By AWS region."""
    gcp: NotRequired[dict[str, GcpNetworkArgs]]
    """By GCP region."""
    azure: NotRequired[dict[str, AzureNetworkArgs]]
    """By Azure location."""


class AgentArgs(TypedDict):
    """What nodes install and run."""

    package: NotRequired[str]
    """The project's wheel: a pip requirement or a URL."""
    index_url: NotRequired[str]
    """The package index holding the wheel."""
    port: NotRequired[int]
    """The agent's port (default 8080)."""
    image: NotRequired[str]
    """Container image of kubernetes pools and the controller."""
    upstream_image: NotRequired[str]
    """Container image of the OpenAI-compatible server beside openai-upstream agents."""
    drain_timeout_s: NotRequired[float]
    """Seconds an agent drains before it stops."""


class ControllerArgs(TypedDict):
    """Where the controller runs."""

    cluster: NotRequired[str]
    """A cluster of the fleet's kubernetes pools to run it in."""
    url: NotRequired[str]
    """The URL agents push to (required for VM pools when it runs in a cluster)."""
    port: NotRequired[int]
    """The controller's port (default 8700)."""
    image: NotRequired[str]
    """Its container image; default: the agent image."""
    storage_gi: NotRequired[int]
    """Size of the usage ledger's volume."""


class InferenceFleetArgs(TypedDict):
    """The inputs of an InferenceFleet."""

    spec: str
    """The fleet spec as YAML or JSON text (what a stack keeps under `fleetform:fleet`)."""
    replicas: NotRequired[dict[str, int]]
    """Desired replicas per pool (what the autoscaler writes under `fleetform:replicas`)."""
    network: NotRequired[NetworkArgs]
    """The networks pools are placed into."""
    agent: NotRequired[AgentArgs]
    """Node install and agent settings."""
    controller: NotRequired[ControllerArgs]
    """Controller placement."""
    api_keys: NotRequired[dict[str, pulumi.Input[str]]]
    """Tenant API keys by reference (`config:NAME` -> the key); hashed, never deployed."""
    fleet_token: NotRequired[pulumi.Input[str]]
    """The token agents push to the controller with."""
    admin_token: NotRequired[pulumi.Input[str]]
    """The controller's admin token."""


class InferenceFleet(fleet.InferenceFleet):
    """An inference fleet declared by a Fleetform fleet spec: a pool of cloud or Kubernetes
    nodes per pool, tenant quotas and the controller."""

    def __init__(
        self,
        name: str,
        args: InferenceFleetArgs,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        config: dict[str, Any] = {FLEET_CONFIG_KEY: args["spec"]}
        if args.get("replicas"):
            config[REPLICAS_CONFIG_KEY] = dict(args["replicas"])
        spec = fleet_from_stack_config(config, source=f"InferenceFleet {name}")
        network = args.get("network")
        if isinstance(network, pulumi.Output):
            raise SettingsError(
                "network: give the object itself (its values may be outputs), not an output "
                "of the whole object: regions decide which pools go where"
            )
        settings = FleetSettings(
            network=parse_network(_snake_keys(network or {}, depth=3)),
            agent=parse_agent(_snake_keys(args.get("agent") or {})),
            controller=parse_controller(_snake_keys(args.get("controller") or {})),
        )
        super().__init__(
            name,
            spec,
            opts,
            settings=settings,
            api_keys=dict(args.get("api_keys") or {}),
            fleet_token=args.get("fleet_token"),
            admin_token=args.get("admin_token"),
        )


_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])([A-Z])")
_REGION_LEVEL = 2  # network -> cloud -> region names: keys at this depth are data, not fields


def _snake_keys(value: Any, depth: int = 1, level: int = 1) -> Any:
    """Field names as the settings parser spells them (`vpcId` -> `vpc_id`), whether the
    provider already mapped nested objects' names or passed the schema's camelCase through."""
    if not isinstance(value, dict) or level > depth:
        return value
    out = {}
    for key, item in value.items():
        name = key if level == _REGION_LEVEL else _CAMEL_HUMP.sub(r"_\1", key).lower()
        out[name] = _snake_keys(item, depth, level + 1)
    return out
