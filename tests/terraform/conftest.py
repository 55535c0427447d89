"""Fixtures for the Terraform interop tests: the real CLI, one applied network state per
session, and one initialised directory holding the export of the prod stack.

Only the absence of the terraform binary skips the tests that need it (with the reason)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulumi
import pytest

from runtime.catalog import default_catalog
from runtime.spec import FleetSpec, load_stack_file
from runtime.terraform import export_terraform

from .support import NETWORK_TF, NO_TERRAFORM, TERRAFORM, Terraform, terraform_env

ROOT = Path(__file__).resolve().parents[2]
PROD = ROOT / "stacks" / "Pulumi.prod.yaml"


@pytest.fixture(scope="session")
def terraform(tmp_path_factory: pytest.TempPathFactory) -> Terraform:
    if TERRAFORM is None:
        pytest.skip(NO_TERRAFORM)
    cli_config = tmp_path_factory.mktemp("tfcli") / "terraformrc"
    cli_config.write_text("", encoding="utf-8")
    return Terraform(TERRAFORM, terraform_env(cli_config))


@pytest.fixture(scope="session")
def network_state(terraform: Terraform, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where `terraform apply` of the network configuration has run: it holds
    terraform.tfstate and outputs.json (`terraform output -json`)."""
    work = tmp_path_factory.mktemp("network")
    (work / "main.tf").write_text(NETWORK_TF, encoding="utf-8")
    terraform.run(work, "init", "-input=false", "-no-color")
    terraform.run(work, "apply", "-auto-approve", "-input=false", "-no-color")
    outputs = terraform.run(work, "output", "-json").stdout
    (work / "outputs.json").write_text(outputs, encoding="utf-8")
    return work


@pytest.fixture(scope="session")
def prod_spec() -> FleetSpec:
    return load_stack_file(PROD)


@pytest.fixture(scope="session")
def prod_export(prod_spec: FleetSpec) -> dict[str, Any]:
    return export_terraform(prod_spec, default_catalog(), source="stacks/Pulumi.prod.yaml")


@pytest.fixture(scope="session")
def prod_dir(
    terraform: Terraform, prod_export: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The prod export as fleet.tf.json in a directory `terraform init -backend=false` ran in
    once; plans with different -var values share it."""
    work = tmp_path_factory.mktemp("prod-export")
    (work / "fleet.tf.json").write_text(json.dumps(prod_export, indent=2), encoding="utf-8")
    terraform.run(work, "init", "-backend=false", "-input=false", "-no-color")
    return work


@pytest.fixture
def pulumi_mocks() -> Iterator[Any]:
    """Pulumi mocks for one test (set_mocks is process-global), on a fresh event loop."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    mocks = RecordingMocks()
    pulumi.runtime.set_mocks(mocks, preview=False)
    yield mocks
    # Mocks start the stack resource's registration; end it here rather than leave tasks that
    # print "Task was destroyed but it is pending!" at exit.
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


class RecordingMocks(pulumi.runtime.Mocks):
    """Answers `terraform:state:getLocalReference` from a state file, like the provider; records
    every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def new_resource(self, args: Any) -> tuple[str, dict[str, Any]]:
        return f"{args.name}-id", dict(args.inputs)

    def call(self, args: Any) -> dict[str, Any]:
        self.calls.append((args.token, dict(args.args)))
        if args.token == "terraform:state:getLocalReference":
            state = json.loads(Path(args.args["path"]).read_text(encoding="utf-8"))
            return {"outputs": {name: o["value"] for name, o in state["outputs"].items()}}
        raise AssertionError(f"unexpected call {args.token}")
