"""The component provider: its inferred schema (snapshot) and the provider-facing component
constructed under mocks from a spec string, as a YAML or TypeScript program would."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import yaml
from pulumi.provider.experimental.analyzer import Analyzer
from pulumi.provider.experimental.schema import generate_schema

from .support import DEV_ENV, REPO, Program, fleet_outputs, stack_config

SNAPSHOT = REPO / "tests" / "components" / "snapshots" / "provider_schema.json"
PROVIDER_DIR = REPO / "provider"


def _provider_module() -> Any:
    # The plugin runs with provider/ on sys.path (Pulumi runs its __main__.py there).
    if str(PROVIDER_DIR) not in sys.path:
        sys.path.insert(0, str(PROVIDER_DIR))
    import fleetform_component

    return fleetform_component


def inferred_schema() -> dict[str, Any]:
    module = _provider_module()
    result = Analyzer("fleetform").analyze([module.InferenceFleet])
    schema = generate_schema(
        "fleetform",
        "0.1.0",
        None,
        result["component_definitions"],
        result["type_definitions"],
        result["dependencies"],
    )
    return schema.to_json()


def test_inferred_schema_matches_the_snapshot() -> None:
    """Regenerate with FLEETFORM_UPDATE_SNAPSHOTS=1 after a deliberate change, and review it."""
    schema = inferred_schema()
    text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    if os.environ.get("FLEETFORM_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(text, encoding="utf-8")
    assert text == SNAPSHOT.read_text(encoding="utf-8")


def test_schema_shape() -> None:
    resource = inferred_schema()["resources"]["fleetform:index:InferenceFleet"]
    assert resource["isComponent"] is True
    assert resource["requiredInputs"] == ["spec"]
    # The spec is a plain string: its pools decide which resources exist.
    assert resource["inputProperties"]["spec"] == {
        "description": (
            "The fleet spec as YAML or JSON text (what a stack keeps under `fleetform:fleet`)."
        ),
        "type": "string",
        "plain": True,
    }
    outputs = resource["properties"]
    assert outputs["totalUsdPerHour"]["type"] == "number"
    assert outputs["apiEndpoints"]["additionalProperties"]["type"] == "string"
    assert set(resource["required"]) == set(outputs)


def test_provider_component_builds_the_fleet_from_a_spec_string(program: Program) -> None:
    module = _provider_module()
    config = stack_config("Pulumi.dev.yaml")
    network = config["fleetform:network"]
    # As the engine passes them: camelCase field names, the spec as JSON text.
    args = {
        "spec": json.dumps(config["fleetform:fleet"]),
        "replicas": {"aws-cpu": 2},
        "network": {
            "fleetCidrs": network["fleet_cidrs"],
            "aws": {"us-east-1": {"vpcId": "vpc-1", "subnetIds": ["subnet-1"]}},
            "gcp": {"us-central1": network["gcp"]["us-central1"]},
        },
        "agent": {"package": "fleetform==0.1.0", "port": 9090},
        "controller": {"url": "http://controller.internal:8700"},
        "fleet_token": "t",
        "api_keys": {f"env:{k}": v for k, v in DEV_ENV.items()},
    }

    def build() -> dict[str, Any]:
        return fleet_outputs(module.InferenceFleet("dev", args))

    program.run(build)
    fleet = program.one("fleetform:index:InferenceFleet")
    assert fleet.name == "dev"
    asg = program.by_name("dev-aws-cpu-asg").state
    assert (asg["desiredCapacity"], asg["vpcZoneIdentifiers"]) == (2, ["subnet-1"])
    sg = program.by_name("dev-aws-cpu-sg").state
    assert (sg["vpcId"], sg["ingress"][0]["fromPort"]) == ("vpc-1", 9090)
    assert program.values["controller_url"] == "http://controller.internal:8700"
    # The pools' internal load balancers forward the configured agent port.
    assert sorted(program.values["api_endpoints"]) == ["aws-a10g", "aws-cpu", "gcp-l4"]
    assert all(url.endswith(":9090/v1") for url in program.values["api_endpoints"].values())
    assert program.by_name("dev-aws-cpu-tg").state["healthCheck"]["path"] == "/readyz"
    assert program.values["pool_names"] == ["aws-a10g", "gcp-l4", "aws-cpu"]


def test_yaml_spec_text_is_accepted_too(program: Program) -> None:
    module = _provider_module()
    config = stack_config("local.yaml")
    args = {"spec": yaml.safe_dump(config["fleetform:fleet"])}
    program.run(lambda: fleet_outputs(module.InferenceFleet("local", args)))
    assert program.values["local_pools"] == ["local-cheap", "local-dear"]
