"""Terraform state as input, end to end: a state written by the real `terraform apply`, read
back by the pure reader and turned into pulumi Outputs (sensitive ones as secrets)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pulumi
import pytest

from components.terraform import (
    TERRAFORM_OUTPUTS_KEY,
    TERRAFORM_READER_KEY,
    TERRAFORM_STATE_KEY,
    network_inputs_from_config,
    terraform_outputs,
    terraform_outputs_via_provider,
)
from runtime.terraform import TerraformOutput, TerraformStateError, read_outputs

from .support import (
    CLUSTER_CA,
    CLUSTER_ENDPOINT,
    DB_PASSWORD,
    FLEET_CIDR,
    SUBNET_IDS,
    VPC_ID,
)

EXPECTED = {
    "cluster_ca_certificate": TerraformOutput(CLUSTER_CA, True, "string"),
    "cluster_endpoint": TerraformOutput(CLUSTER_ENDPOINT, False, "string"),
    "db_password": TerraformOutput(DB_PASSWORD, True, "string"),
    "fleet_cidr": TerraformOutput(FLEET_CIDR, False, "string"),
    "private_subnet_ids": TerraformOutput(SUBNET_IDS, False, ["list", "string"]),
    "vpc_id": TerraformOutput(VPC_ID, False, "string"),
}

MAPPING = {
    "vpc_id": "vpc_id",
    "subnet_ids": "private_subnet_ids",
    "fleet_cidrs": "fleet_cidr",
    "cluster_endpoint": "cluster_endpoint",
    "cluster_ca_certificate": "cluster_ca_certificate",
}


def resolve(output: pulumi.Output[Any]) -> tuple[Any, bool]:
    """An Output's value and whether it is secret, on the mocks' event loop."""
    loop = asyncio.get_event_loop()
    return loop.run_until_complete(output.future()), loop.run_until_complete(output.is_secret())


def test_the_state_terraform_wrote_reads_back_exactly(network_state: Path) -> None:
    state = json.loads((network_state / "terraform.tfstate").read_text(encoding="utf-8"))
    assert state["version"] == 4  # what the reader is written against
    assert read_outputs(network_state / "terraform.tfstate") == EXPECTED


def test_terraform_output_json_reads_the_same_as_the_state(network_state: Path) -> None:
    assert read_outputs(network_state / "outputs.json") == EXPECTED


def test_a_missing_output_names_the_file(network_state: Path) -> None:
    path = network_state / "terraform.tfstate"
    with pytest.raises(TerraformStateError) as caught:
        read_outputs(path, ["vpc_id", "public_subnet_ids"])
    assert str(caught.value) == (
        f"{path}: no output 'public_subnet_ids' (the file has: cluster_ca_certificate, "
        "cluster_endpoint, db_password, fleet_cidr, private_subnet_ids, vpc_id); "
        "'public_subnet_ids': did you mean 'private_subnet_ids'?"
    )


@pytest.mark.parametrize("file", ["terraform.tfstate", "outputs.json"])
def test_sensitive_outputs_become_secrets(
    network_state: Path, pulumi_mocks: Any, file: str
) -> None:
    outputs = terraform_outputs(network_state / file)
    resolved = {name: resolve(output) for name, output in outputs.items()}
    assert resolved == {
        "cluster_ca_certificate": (CLUSTER_CA, True),
        "cluster_endpoint": (CLUSTER_ENDPOINT, False),
        "db_password": (DB_PASSWORD, True),
        "fleet_cidr": (FLEET_CIDR, False),
        "private_subnet_ids": (SUBNET_IDS, False),
        "vpc_id": (VPC_ID, False),
    }


def test_network_inputs_from_stack_config(network_state: Path, pulumi_mocks: Any) -> None:
    config = {
        # Relative to the project root, as in a stack file.
        TERRAFORM_STATE_KEY: f"{network_state.name}/terraform.tfstate",
        TERRAFORM_OUTPUTS_KEY: MAPPING,
    }
    inputs = network_inputs_from_config(config, root=network_state.parent)
    assert {key: resolve(value) for key, value in inputs.items()} == {
        "vpc_id": (VPC_ID, False),
        "subnet_ids": (SUBNET_IDS, False),
        "fleet_cidrs": ([FLEET_CIDR], False),
        "cluster_endpoint": (CLUSTER_ENDPOINT, False),
        "cluster_ca_certificate": (CLUSTER_CA, True),
    }
    assert pulumi_mocks.calls == []  # the file reader does not go through the engine


def test_network_inputs_from_the_running_programs_config(
    network_state: Path, pulumi_mocks: Any
) -> None:
    pulumi.runtime.set_all_config(
        {
            TERRAFORM_STATE_KEY: str(network_state / "outputs.json"),
            TERRAFORM_OUTPUTS_KEY: json.dumps({"subnet_ids": "private_subnet_ids"}),
        }
    )
    try:
        inputs = network_inputs_from_config()
    finally:
        pulumi.runtime.set_all_config({})
    assert {key: resolve(value) for key, value in inputs.items()} == {
        "subnet_ids": (SUBNET_IDS, False)
    }


def test_no_state_in_config_means_no_network_inputs() -> None:
    assert network_inputs_from_config({}) == {}


def test_bad_config_values(network_state: Path) -> None:
    with pytest.raises(TerraformStateError) as caught:
        network_inputs_from_config({TERRAFORM_STATE_KEY: 7})
    assert str(caught.value) == (
        "fleetform:terraformState: must be the path of a state file, not 7"
    )
    config = {
        TERRAFORM_STATE_KEY: str(network_state / "terraform.tfstate"),
        TERRAFORM_READER_KEY: "s3",
    }
    with pytest.raises(TerraformStateError) as caught:
        network_inputs_from_config(config)
    assert (
        str(caught.value) == "fleetform:terraformReader: must be one of file, provider (got 's3')"
    )


def test_provider_reader_goes_through_get_local_reference(
    network_state: Path, pulumi_mocks: Any
) -> None:
    path = network_state / "terraform.tfstate"
    config = {
        TERRAFORM_STATE_KEY: str(path),
        TERRAFORM_OUTPUTS_KEY: MAPPING,
        TERRAFORM_READER_KEY: "provider",
    }
    inputs = network_inputs_from_config(config)
    resolved = {key: resolve(value) for key, value in inputs.items()}
    assert resolved == {
        "vpc_id": (VPC_ID, False),
        "subnet_ids": (SUBNET_IDS, False),
        "fleet_cidrs": ([FLEET_CIDR], False),
        "cluster_endpoint": (CLUSTER_ENDPOINT, False),
        # The provider does not mark it: the file's sensitive flag does.
        "cluster_ca_certificate": (CLUSTER_CA, True),
    }
    assert pulumi_mocks.calls
    assert {token for token, _ in pulumi_mocks.calls} == {"terraform:state:getLocalReference"}
    assert {args["path"] for _, args in pulumi_mocks.calls} == {str(path)}


def test_provider_reader_wraps_the_named_sensitive_outputs(
    network_state: Path, pulumi_mocks: Any
) -> None:
    outputs = terraform_outputs_via_provider(
        network_state / "terraform.tfstate", ["vpc_id", "db_password"], sensitive={"db_password"}
    )
    assert {name: resolve(output) for name, output in outputs.items()} == {
        "vpc_id": (VPC_ID, False),
        "db_password": (DB_PASSWORD, True),
    }


def test_network_config_references_resolve_to_the_state_outputs(
    network_state: Path, pulumi_mocks: Any
) -> None:
    from components.settings import parse_network
    from components.terraform import resolve_terraform_references

    inputs = network_inputs_from_config(
        {
            TERRAFORM_STATE_KEY: str(network_state / "terraform.tfstate"),
            TERRAFORM_OUTPUTS_KEY: MAPPING,
        }
    )
    network = {
        "fleet_cidrs": "terraform:fleet_cidrs",
        "aws": {"us-east-1": {"vpc_id": "terraform:vpc_id", "subnet_ids": "terraform:subnet_ids"}},
    }
    resolved = resolve_terraform_references(network, inputs)
    placement = parse_network(resolved)
    assert resolve(placement.aws["us-east-1"].vpc_id) == (VPC_ID, False)
    assert resolve(placement.aws["us-east-1"].subnet_ids) == (SUBNET_IDS, False)
    assert resolve(placement.fleet_cidrs) == ([FLEET_CIDR], False)
    # Plain values pass through; a key the state does not give is an error naming it.
    assert resolve_terraform_references({"a": ["x", 1]}, inputs) == {"a": ["x", 1]}
    with pytest.raises(TerraformStateError, match="'terraform:network' names no Terraform"):
        resolve_terraform_references({"gcp": "terraform:network"}, inputs)
