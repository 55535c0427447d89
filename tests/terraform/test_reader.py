"""The Terraform output reader on hand-written documents: both formats, every error, and the
choice of network inputs. No terraform binary needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runtime.terraform import (
    TerraformOutput,
    TerraformStateError,
    network_inputs,
    parse_outputs,
    read_outputs,
)

SECRET = "pa55-word-that-must-not-leak"


def state(outputs: dict[str, Any], version: Any = 4) -> str:
    return json.dumps(
        {
            "version": version,
            "terraform_version": "1.11.4",
            "serial": 3,
            "lineage": "8a2f0c9e-1111-2222-3333-444455556666",
            "outputs": outputs,
            "resources": [],
            "check_results": None,
        }
    )


NETWORK_STATE = state(
    {
        "vpc_id": {"value": "vpc-1", "type": "string"},
        "subnet_ids": {"value": ["subnet-a", "subnet-b"], "type": ["list", "string"]},
        "fleet_cidr": {"value": "10.20.0.0/16", "type": "string"},
        "password": {"value": SECRET, "type": "string", "sensitive": True},
    }
)


def write(tmp_path: Path, text: str, name: str = "terraform.tfstate") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, names: list[str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(TerraformStateError) as caught:
        read_outputs(path, names)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    assert SECRET not in message
    return message.removeprefix(f"{path}: ")


# --------------------------------------------------------------------------------------------
# Both formats


def test_a_v4_state_gives_values_sensitivity_and_types(tmp_path: Path) -> None:
    outputs = read_outputs(write(tmp_path, NETWORK_STATE))
    assert outputs == {
        "vpc_id": TerraformOutput("vpc-1", False, "string"),
        "subnet_ids": TerraformOutput(["subnet-a", "subnet-b"], False, ["list", "string"]),
        "fleet_cidr": TerraformOutput("10.20.0.0/16", False, "string"),
        "password": TerraformOutput(SECRET, True, "string"),
    }


def test_terraform_output_json_text_reads_the_same(tmp_path: Path) -> None:
    text = json.dumps(
        {
            "vpc_id": {"sensitive": False, "type": "string", "value": "vpc-1"},
            "password": {"sensitive": True, "type": "string", "value": SECRET},
            # An output may be called "version": it is an object here, never a number.
            "version": {"sensitive": False, "type": "number", "value": 7},
        }
    )
    assert parse_outputs(text, "outputs.json") == {
        "vpc_id": TerraformOutput("vpc-1", False, "string"),
        "password": TerraformOutput(SECRET, True, "string"),
        "version": TerraformOutput(7, False, "number"),
    }


def test_requested_names_come_back_in_the_order_asked(tmp_path: Path) -> None:
    outputs = read_outputs(write(tmp_path, NETWORK_STATE), ["fleet_cidr", "vpc_id"])
    assert list(outputs) == ["fleet_cidr", "vpc_id"]


def test_a_state_without_outputs_has_none(tmp_path: Path) -> None:
    assert read_outputs(write(tmp_path, state({}))) == {}


def test_repr_never_shows_a_sensitive_value() -> None:
    assert repr(TerraformOutput(SECRET, True, "string")) == (
        "TerraformOutput(value='<sensitive>', sensitive=True, type='string')"
    )
    assert "vpc-1" in repr(TerraformOutput("vpc-1", False, "string"))


# --------------------------------------------------------------------------------------------
# Errors name the file and the problem


def test_not_json(tmp_path: Path) -> None:
    assert error_of(tmp_path, '{"version": 4,\n "outputs": {') == (
        "not JSON: Expecting property name enclosed in double quotes at line 2, column 14"
    )


def test_hcl_instead_of_state_is_not_json(tmp_path: Path) -> None:
    assert error_of(tmp_path, 'output "x" { value = 1 }').startswith("not JSON: Expecting value")


def test_an_empty_file(tmp_path: Path) -> None:
    assert error_of(tmp_path, "\n") == (
        "empty: expected a Terraform state or `terraform output -json` output"
    )


def test_a_v3_state_is_refused_with_the_way_out(tmp_path: Path) -> None:
    assert error_of(tmp_path, state({}, version=3)) == (
        "Terraform state version 3 is not supported: Fleetform reads version 4 (Terraform 0.12 "
        "and later); re-save the state with a current Terraform (`terraform apply -refresh-only`)"
    )


def test_a_version_that_is_not_a_number(tmp_path: Path) -> None:
    assert error_of(tmp_path, state({}, version="4")) == (
        "state 'version' must be a whole number (got '4')"
    )


def test_a_missing_output_is_named_with_what_the_file_has(tmp_path: Path) -> None:
    assert error_of(tmp_path, NETWORK_STATE, ["vpc_id", "subnets", "cluster_endpoint"]) == (
        "no output 'subnets', 'cluster_endpoint' (the file has: fleet_cidr, password, "
        "subnet_ids, vpc_id); 'subnets': did you mean 'subnet_ids'?"
    )


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    assert error_of(tmp_path, "[1, 2]") == "expected a JSON object at the top level, not a list"


def test_something_else_entirely(tmp_path: Path) -> None:
    assert error_of(tmp_path, '{"name": "acme"}') == (
        "neither a Terraform state (no 'version') nor `terraform output -json` output "
        "(entry 'name' is not an object with a 'value')"
    )


def test_a_state_output_without_value(tmp_path: Path) -> None:
    assert error_of(tmp_path, state({"vpc_id": {"type": "string"}})) == (
        "output 'vpc_id' has no 'value'"
    )


def test_sensitive_must_be_a_boolean(tmp_path: Path) -> None:
    text = state({"password": {"value": SECRET, "sensitive": "yes"}})
    assert error_of(tmp_path, text) == (
        "output 'password': 'sensitive' must be true or false (got 'yes')"
    )


def test_outputs_must_be_an_object(tmp_path: Path) -> None:
    assert error_of(tmp_path, state([])) == "state 'outputs' must be an object, not a list"  # type: ignore[arg-type]


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(TerraformStateError, match=r"missing\.tfstate: file not found$"):
        read_outputs(tmp_path / "missing.tfstate")
    with pytest.raises(TerraformStateError, match=r": is a directory; name the state file"):
        read_outputs(tmp_path)
    binary = tmp_path / "binary.tfstate"
    binary.write_bytes(b'{"version": 4, "x": "\xff"}')
    with pytest.raises(
        TerraformStateError, match=r": not UTF-8 text \(byte 22 cannot be decoded\)"
    ):
        read_outputs(binary)


# --------------------------------------------------------------------------------------------
# Network inputs


def network_outputs() -> dict[str, TerraformOutput]:
    return parse_outputs(NETWORK_STATE, "net.tfstate")


def test_without_a_mapping_outputs_named_like_the_keys_are_taken() -> None:
    chosen = network_inputs(network_outputs(), None, "net.tfstate")
    assert chosen == {
        "vpc_id": TerraformOutput("vpc-1", False, "string"),
        "subnet_ids": TerraformOutput(["subnet-a", "subnet-b"], False, ["list", "string"]),
    }


def test_a_mapping_renames_and_one_cidr_becomes_a_list() -> None:
    chosen = network_inputs(
        network_outputs(),
        {"fleet_cidrs": "fleet_cidr", "cluster_ca_certificate": "password"},
        "net.tfstate",
    )
    assert chosen == {
        "fleet_cidrs": TerraformOutput(["10.20.0.0/16"], False, ["list", "string"]),
        "cluster_ca_certificate": TerraformOutput(SECRET, True, "string"),
    }


@pytest.mark.parametrize(
    ("mapping", "problem"),
    [
        (
            {"vpc": "vpc_id"},
            "fleetform:terraformOutputs: unknown network input 'vpc' (did you mean 'vpc_id'?); "
            "known: vpc_id, subnet_ids, network, subnetwork, subnet_id, resource_group_name, "
            "fleet_cidrs, cluster_endpoint, cluster_ca_certificate",
        ),
        ({"vpc_id": 3}, "fleetform:terraformOutputs.vpc_id: must be an output name (got 3)"),
        (
            {"vpc_id": "main_vpc"},
            "no output 'main_vpc' (the file has: fleet_cidr, password, subnet_ids, vpc_id)",
        ),
        (
            {"subnet_ids": "vpc_id"},
            "output 'vpc_id' (network input subnet_ids) must be a list of strings, not a string",
        ),
        (
            # The value is sensitive: the message says what is wrong without quoting it.
            {"fleet_cidrs": "password"},
            "output 'password' (network input fleet_cidrs) is not a CIDR block (or list of "
            "them) such as 10.20.0.0/16",
        ),
        (
            ["vpc_id"],
            "fleetform:terraformOutputs must map network inputs to output names "
            "(e.g. {vpc_id: main_vpc_id}), not a list",
        ),
    ],
)
def test_bad_mappings(mapping: Any, problem: str) -> None:
    with pytest.raises(TerraformStateError) as caught:
        network_inputs(network_outputs(), mapping, "net.tfstate")
    assert str(caught.value) == f"net.tfstate: {problem}"
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("10.20.0.1/16", "is not a CIDR block (or list of them) such as 10.20.0.0/16"),
        (["10.0.0.0/8", 5], "is not a CIDR block (or list of them) such as 10.20.0.0/16"),
        ([], "must be a CIDR or a non-empty list of CIDRs, not a list"),
        ({"cidr": "10.0.0.0/8"}, "must be a CIDR or a non-empty list of CIDRs, not an object"),
    ],
)
def test_fleet_cidrs_must_be_cidrs(value: Any, problem: str) -> None:
    with pytest.raises(TerraformStateError) as caught:
        network_inputs({"cidr": TerraformOutput(value)}, {"fleet_cidrs": "cidr"}, "x")
    assert str(caught.value) == f"x: output 'cidr' (network input fleet_cidrs) {problem}"


def test_a_list_of_cidrs_of_both_families_is_kept() -> None:
    outputs = {"cidrs": TerraformOutput(["10.0.0.0/8", "fd00::/8"])}
    chosen = network_inputs(outputs, {"fleet_cidrs": "cidrs"}, "x")
    assert chosen["fleet_cidrs"].value == ["10.0.0.0/8", "fd00::/8"]


def test_a_state_that_places_nothing_needs_a_mapping() -> None:
    with pytest.raises(TerraformStateError) as caught:
        network_inputs({"db_password": TerraformOutput(SECRET, True)}, None, "db.tfstate")
    assert str(caught.value) == (
        "db.tfstate: none of the outputs vpc_id, subnet_ids, network, subnetwork, subnet_id, "
        "resource_group_name, fleet_cidrs, cluster_endpoint, cluster_ca_certificate is in the "
        "file; map the fleet's network inputs to outputs with fleetform:terraformOutputs"
    )
