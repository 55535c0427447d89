"""Deployment settings beside the fleet spec: networks, agent install, controller placement.

The FleetSpec says *what* the fleet is; these stack-config objects say *where* it is placed in a
given account, which differs per stack and is often owned by Terraform:

- `fleetform:network`: the fleet CIDRs (the only sources admitted to the agent port) and, per
  cloud and region, the networks pools are placed into (AWS VPC and subnets, GCP network and
  subnetwork, Azure subnet and resource group). Kubernetes pools take none.
- `fleetform:agent`: what nodes install (the project's wheel, from an index or a URL), the agent
  port, and the container images of Kubernetes pools.
- `fleetform:controller`: where the controller runs (a Kubernetes cluster of the fleet) or the URL
  of one run elsewhere.
- `fleetform:clusters`: the Kubernetes clusters pools name in `region` (kubeconfig context).

Network values may be plain strings from config or pulumi Outputs (e.g. read from Terraform
state); this module keeps them as opaque values and never imports pulumi. Everything else is
checked here, so a typo fails `pulumi preview` with the config path in the message.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from runtime.spec import FleetSpec, PoolSpec

NETWORK_CONFIG_KEY = "fleetform:network"
AGENT_CONFIG_KEY = "fleetform:agent"
CONTROLLER_CONFIG_KEY = "fleetform:controller"
CLUSTERS_CONFIG_KEY = "fleetform:clusters"

# Not 8000: that is where OpenAI-compatible upstreams (vLLM, TGI) listen on the same node.
DEFAULT_AGENT_PORT = 8080
DEFAULT_CONTROLLER_PORT = 8700
DEFAULT_PACKAGE = "fleetform==0.1.0"
DEFAULT_IMAGE = "ghcr.io/fleetform/fleetform:0.1.0"
DEFAULT_UPSTREAM_IMAGE = "vllm/vllm-openai:v0.6.3"
VENV = "/opt/fleetform/venv"
CONFIG_DIR = "/etc/fleetform"


class SettingsError(ValueError):
    """A deployment setting that cannot be used; `str()` names the config path."""


@dataclass(frozen=True)
class AwsPlacement:
    """Where an AWS region's pools go. Values are strings or pulumi Inputs."""

    vpc_id: Any
    subnet_ids: Any  # list of subnet ids (private subnets: nodes get no public IP)


@dataclass(frozen=True)
class GcpPlacement:
    network: Any
    subnetwork: Any
    service_account: Any = None  # email; None: the project's default compute account


@dataclass(frozen=True)
class AzurePlacement:
    subnet_id: Any
    admin_ssh_public_key: Any  # Linux VMs need a key; nobody logs in by password
    resource_group_name: Any = None  # None: each pool creates its own resource group


@dataclass(frozen=True)
class FleetNetwork:
    """`fleetform:network`."""

    fleet_cidrs: Any = ()  # sources admitted to the agent port (the fleet's networks)
    aws: Mapping[str, AwsPlacement] = field(default_factory=dict)
    gcp: Mapping[str, GcpPlacement] = field(default_factory=dict)
    azure: Mapping[str, AzurePlacement] = field(default_factory=dict)

    def placement(self, pool: PoolSpec) -> AwsPlacement | GcpPlacement | AzurePlacement | None:
        """The network of a pool's region; raises SettingsError when a cloud pool has none.
        Kubernetes and local pools have no network of their own (None)."""
        if pool.cloud in ("kubernetes", "local"):
            return None
        regions: Mapping[str, Any] = getattr(self, pool.cloud)
        if pool.region not in regions:
            known = ", ".join(sorted(regions)) or "none"
            raise SettingsError(
                f"{NETWORK_CONFIG_KEY}.{pool.cloud}.{pool.region}: missing, and pool "
                f"{pool.name!r} is placed there (configured {pool.cloud} regions: {known})"
            )
        return regions[pool.region]


@dataclass(frozen=True)
class AgentSettings:
    """`fleetform:agent`: what a node installs and runs."""

    package: str = DEFAULT_PACKAGE  # pip requirement or wheel URL of the project
    index_url: str | None = None  # a private index holding the wheel
    port: int = DEFAULT_AGENT_PORT
    image: str = DEFAULT_IMAGE  # Kubernetes pools: the agent's container image
    upstream_image: str = DEFAULT_UPSTREAM_IMAGE  # Kubernetes: the OpenAI-compatible sidecar
    drain_timeout_s: float = 30.0


@dataclass(frozen=True)
class ControllerSettings:
    """`fleetform:controller`: run it in a cluster of the fleet, or point at one elsewhere."""

    cluster: str | None = None  # a Kubernetes cluster named by the fleet's kubernetes pools
    url: str | None = None  # the URL agents push to (required when no cluster is given)
    port: int = DEFAULT_CONTROLLER_PORT
    image: str | None = None  # default: the agent image (one image runs both)
    storage_gi: int = 5  # the SQLite ledger's volume


@dataclass(frozen=True)
class ClusterSettings:
    """One entry of `fleetform:clusters`: how Pulumi reaches a Kubernetes cluster."""

    context: str | None = None
    kubeconfig: str | None = None  # path or contents; None: the ambient kubeconfig


@dataclass(frozen=True)
class FleetSettings:
    network: FleetNetwork = field(default_factory=FleetNetwork)
    agent: AgentSettings = field(default_factory=AgentSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    clusters: Mapping[str, ClusterSettings] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Parsing stack config


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SettingsError(f"{path}: must be a mapping, not {type(value).__name__}")
    return value


def _only(data: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SettingsError(
            f"{path}.{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})"
        )


def _require(data: Mapping[str, Any], key: str, path: str) -> Any:
    value = data.get(key)
    if value is None or value == "" or value == []:
        raise SettingsError(f"{path}.{key}: required")
    return value


def check_cidrs(cidrs: Any, path: str) -> Any:
    """Plain CIDR lists are checked here; pulumi Outputs pass through unchecked."""
    if isinstance(cidrs, str):
        cidrs = [cidrs]
    if isinstance(cidrs, list | tuple):
        for index, cidr in enumerate(cidrs):
            if not isinstance(cidr, str):
                continue
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as error:
                raise SettingsError(f"{path}[{index}]: {error}") from None
        return list(cidrs)
    return cidrs


def parse_network(value: Any) -> FleetNetwork:
    path = NETWORK_CONFIG_KEY
    data = _mapping(value, path)
    _only(data, ("fleet_cidrs", "aws", "gcp", "azure"), path)
    aws: dict[str, AwsPlacement] = {}
    for region, entry in _mapping(data.get("aws"), f"{path}.aws").items():
        where = f"{path}.aws.{region}"
        entry = _mapping(entry, where)
        _only(entry, ("vpc_id", "subnet_ids"), where)
        aws[region] = AwsPlacement(
            vpc_id=_require(entry, "vpc_id", where), subnet_ids=_require(entry, "subnet_ids", where)
        )
    gcp: dict[str, GcpPlacement] = {}
    for region, entry in _mapping(data.get("gcp"), f"{path}.gcp").items():
        where = f"{path}.gcp.{region}"
        entry = _mapping(entry, where)
        _only(entry, ("network", "subnetwork", "service_account"), where)
        gcp[region] = GcpPlacement(
            network=_require(entry, "network", where),
            subnetwork=_require(entry, "subnetwork", where),
            service_account=entry.get("service_account"),
        )
    azure: dict[str, AzurePlacement] = {}
    for region, entry in _mapping(data.get("azure"), f"{path}.azure").items():
        where = f"{path}.azure.{region}"
        entry = _mapping(entry, where)
        _only(entry, ("subnet_id", "admin_ssh_public_key", "resource_group_name"), where)
        azure[region] = AzurePlacement(
            subnet_id=_require(entry, "subnet_id", where),
            admin_ssh_public_key=_require(entry, "admin_ssh_public_key", where),
            resource_group_name=entry.get("resource_group_name"),
        )
    return FleetNetwork(
        fleet_cidrs=check_cidrs(data.get("fleet_cidrs", []), f"{path}.fleet_cidrs"),
        aws=aws,
        gcp=gcp,
        azure=azure,
    )


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise SettingsError(f"{path}: {value!r} is not a port number")
    return value


def parse_agent(value: Any) -> AgentSettings:
    path = AGENT_CONFIG_KEY
    data = _mapping(value, path)
    _only(
        data, ("package", "index_url", "port", "image", "upstream_image", "drain_timeout_s"), path
    )
    defaults = AgentSettings()
    return AgentSettings(
        package=str(data.get("package", defaults.package)),
        index_url=data.get("index_url"),
        port=_port(data.get("port", defaults.port), f"{path}.port"),
        image=str(data.get("image", defaults.image)),
        upstream_image=str(data.get("upstream_image", defaults.upstream_image)),
        drain_timeout_s=float(data.get("drain_timeout_s", defaults.drain_timeout_s)),
    )


def parse_controller(value: Any) -> ControllerSettings:
    path = CONTROLLER_CONFIG_KEY
    data = _mapping(value, path)
    _only(data, ("cluster", "url", "port", "image", "storage_gi"), path)
    url = data.get("url")
    if url is not None and not str(url).startswith(("http://", "https://")):
        raise SettingsError(f"{path}.url: must start with http:// or https:// (got {url!r})")
    return ControllerSettings(
        cluster=data.get("cluster"),
        url=url,
        port=_port(data.get("port", DEFAULT_CONTROLLER_PORT), f"{path}.port"),
        image=data.get("image"),
        storage_gi=int(data.get("storage_gi", 5)),
    )


def parse_clusters(value: Any) -> dict[str, ClusterSettings]:
    path = CLUSTERS_CONFIG_KEY
    clusters: dict[str, ClusterSettings] = {}
    for name, entry in _mapping(value, path).items():
        entry = _mapping(entry, f"{path}.{name}")
        _only(entry, ("context", "kubeconfig"), f"{path}.{name}")
        clusters[name] = ClusterSettings(
            context=entry.get("context"), kubeconfig=entry.get("kubeconfig")
        )
    return clusters


def settings_from_config(config: Mapping[str, Any]) -> FleetSettings:
    """The deployment settings in a stack's config mapping (missing keys: defaults)."""
    return FleetSettings(
        network=parse_network(config.get(NETWORK_CONFIG_KEY)),
        agent=parse_agent(config.get(AGENT_CONFIG_KEY)),
        controller=parse_controller(config.get(CONTROLLER_CONFIG_KEY)),
        clusters=parse_clusters(config.get(CLUSTERS_CONFIG_KEY)),
    )


def check_settings(spec: FleetSpec, settings: FleetSettings) -> list[str]:
    """Problems between the spec and the settings, one `path: reason` line each."""
    problems: list[str] = []
    for pool in spec.pools:
        try:
            settings.network.placement(pool)
        except SettingsError as error:
            problems.append(str(error))
    clusters = sorted({p.region for p in spec.pools if p.cloud == "kubernetes"})
    controller = settings.controller
    if controller.cluster is not None and controller.cluster not in clusters:
        problems.append(
            f"{CONTROLLER_CONFIG_KEY}.cluster: no kubernetes pool runs in {controller.cluster!r} "
            f"(clusters of the fleet: {', '.join(clusters) or 'none'})"
        )
    if controller.cluster is not None and controller.url is None and _has_vm_pools(spec):
        # Cloud VMs cannot resolve a cluster-internal service name.
        problems.append(
            f"{CONTROLLER_CONFIG_KEY}.url: required when VM pools push to a controller in "
            f"cluster {controller.cluster!r} (its internal load balancer or ingress URL)"
        )
    for index, pool in enumerate(spec.pools):
        if pool.upstream is None:
            continue
        parts = urlsplit(pool.upstream.url)
        if (
            parts.hostname in ("127.0.0.1", "localhost", "::1")
            and parts.port == settings.agent.port
        ):
            problems.append(
                f"{AGENT_CONFIG_KEY}.port: {settings.agent.port} is the port of pool "
                f"{pool.name!r}'s upstream on the same node (pools[{index}].upstream.url)"
            )
    needs_fleet_cidrs = any(p.cloud == "aws" for p in spec.pools)
    fleet_cidrs = settings.network.fleet_cidrs
    if needs_fleet_cidrs and isinstance(fleet_cidrs, list | tuple) and not fleet_cidrs:
        problems.append(
            f"{NETWORK_CONFIG_KEY}.fleet_cidrs: required: the agent port is admitted only from "
            "the fleet's networks"
        )
    return problems


def _has_vm_pools(spec: FleetSpec) -> bool:
    return any(p.cloud in ("aws", "gcp", "azure") for p in spec.pools)
