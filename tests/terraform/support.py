"""Running the real `terraform` CLI hermetically, and the built-in-only network configuration
whose state the reader tests read back."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

TERRAFORM = shutil.which("terraform")
NO_TERRAFORM = "the terraform CLI is not on PATH (these tests drive the real binary)"

# Values the network configuration below outputs; the tests compare the reader's result to them.
VPC_ID = "vpc-0f1e2d3c4b5a69788"
SUBNET_IDS = ["subnet-0aa11bb22cc33dd44", "subnet-0ee55ff66aa77bb88"]
FLEET_CIDR = "10.20.0.0/16"
CLUSTER_ENDPOINT = "https://10.20.0.10:6443"
CLUSTER_CA = "-----BEGIN CERTIFICATE-----\nMIIBfakeCAforTests\n-----END CERTIFICATE-----\n"
DB_PASSWORD = "s3cr3t-Hunter2-not-for-logs"

NETWORK_TF = f"""
resource "terraform_data" "network" {{
  input = {{
    vpc_id  = "{VPC_ID}"
    subnets = ["{SUBNET_IDS[0]}", "{SUBNET_IDS[1]}"]
  }}
}}

output "vpc_id" {{
  value = terraform_data.network.output.vpc_id
}}

output "private_subnet_ids" {{
  value = tolist(terraform_data.network.output.subnets)
}}

output "fleet_cidr" {{
  value = "{FLEET_CIDR}"
}}

output "cluster_endpoint" {{
  value = "{CLUSTER_ENDPOINT}"
}}

output "cluster_ca_certificate" {{
  value     = {json.dumps(CLUSTER_CA)}
  sensitive = true
}}

output "db_password" {{
  value     = "{DB_PASSWORD}"
  sensitive = true
}}
"""


def terraform_env(cli_config: Path) -> dict[str, str]:
    """The environment for terraform: no version check, no prompts, no user CLI config or
    TF_VAR_/TF_CLI_ARGS that would make a run depend on the machine."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TF_VAR_", "TF_CLI_ARGS", "TF_DATA_DIR", "TF_WORKSPACE"))
    }
    env.update(
        CHECKPOINT_DISABLE="1",
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        # An empty config file: a missing one (e.g. TF_CLI_CONFIG_FILE pointing nowhere) makes
        # terraform print a warning that the "no warnings" assertions would trip over.
        TF_CLI_CONFIG_FILE=str(cli_config),
    )
    return env


class Terraform:
    """`terraform` in one working directory."""

    def __init__(self, binary: str, env: dict[str, str]) -> None:
        self.binary = binary
        self.env = env

    def run(self, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"terraform {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def plan(self, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(cwd, "plan", "-no-color", "-input=false", *args, check=False)


def one_line(text: str) -> str:
    """Terraform wraps diagnostics to the terminal width; join them for assertions."""
    return re.sub(r"\s+", " ", text)


def check_warnings(output: str) -> list[str]:
    """The check-block warnings in a plan's output, one string per warning (unwrapped)."""
    blocks = re.split(r"(?=Warning: )", output)
    return [one_line(b) for b in blocks if b.startswith("Warning: Check block assertion failed")]
