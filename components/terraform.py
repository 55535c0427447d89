"""Terraform-managed outputs as pulumi Outputs: the Pulumi half of the Terraform interop.

This module owns turning what `runtime.terraform` reads from a Terraform state (or a saved
``terraform output -json``) into pulumi Outputs, with Terraform's sensitive outputs wrapped in
``pulumi.Output.secret`` so they are encrypted in Pulumi state and masked in previews, and the
stack-config entry point that the cloud pool components call for their network placement:

    fleetform:terraformState: ../network/terraform.tfstate   # relative to Pulumi.yaml
    fleetform:terraformOutputs:                              # network input -> output name
      vpc_id: main_vpc_id
      subnet_ids: private_subnet_ids
      fleet_cidrs: fleet_cidr
    fleetform:terraformReader: file                          # or: provider

:func:`network_inputs_from_config` returns ``{key: pulumi.Output}`` for the mapped keys of
:data:`runtime.terraform.NETWORK_INPUTS` (an empty dict when no state is configured).

``terraformReader: provider`` reads the values through the Pulumi Terraform provider
(``pulumi_terraform.state.get_local_reference``, package ``pulumi-terraform``) instead of in the
program. The program still parses the file itself, to check the outputs exist and have the
right shape before anything is deployed and to learn which ones are sensitive: the provider's
result does not carry Terraform's sensitive flag.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import pulumi

from runtime.terraform import (
    NETWORK_INPUTS,
    TerraformOutput,
    TerraformStateError,
    network_inputs,
    read_outputs,
)

__all__ = [
    "READERS",
    "TERRAFORM_OUTPUTS_KEY",
    "TERRAFORM_READER_KEY",
    "TERRAFORM_STATE_KEY",
    "network_inputs_from_config",
    "terraform_outputs",
    "terraform_outputs_via_provider",
    "to_output",
]

TERRAFORM_STATE_KEY = "fleetform:terraformState"
TERRAFORM_OUTPUTS_KEY = "fleetform:terraformOutputs"
TERRAFORM_READER_KEY = "fleetform:terraformReader"
READERS = ("file", "provider")


def to_output(output: TerraformOutput) -> pulumi.Output[Any]:
    """One Terraform output as a pulumi Output: a secret when Terraform marks it sensitive."""
    if output.sensitive:
        return pulumi.Output.secret(output.value)
    return pulumi.Output.from_input(output.value)


def terraform_outputs(
    path: str | Path, names: Iterable[str] | None = None
) -> dict[str, pulumi.Output[Any]]:
    """The outputs of a Terraform state file (or saved ``terraform output -json``) by name.

    With ``names``, only those, and a missing one raises
    :class:`~runtime.terraform.TerraformStateError` naming the file and the output.
    """
    return {name: to_output(out) for name, out in read_outputs(path, names).items()}


def terraform_outputs_via_provider(
    path: str | Path,
    names: Iterable[str],
    *,
    sensitive: Collection[str] = (),
    workspace_dir: str | None = None,
) -> dict[str, pulumi.Output[Any]]:
    """The named outputs read by the Pulumi Terraform provider (`getLocalReference`).

    ``sensitive`` names the outputs to wrap as secrets (the provider's result does not say).
    Needs the ``pulumi-terraform`` package.
    """
    try:
        from pulumi_terraform import state as terraform_state
    except ImportError:
        raise TerraformStateError(
            str(path),
            f"{TERRAFORM_READER_KEY} 'provider' needs the pulumi-terraform package "
            "(pip install pulumi-terraform)",
        ) from None
    reference = terraform_state.get_local_reference_output(
        path=str(path), workspace_dir=workspace_dir
    )
    result: dict[str, pulumi.Output[Any]] = {}
    for name in dict.fromkeys(names):
        value = reference.outputs.apply(lambda outputs, name=name: outputs[name])
        result[name] = pulumi.Output.secret(value) if name in sensitive else value
    return result


def network_inputs_from_config(
    config: Mapping[str, Any] | None = None, *, root: str | Path | None = None
) -> dict[str, pulumi.Input[Any]]:
    """The fleet's network inputs from the Terraform state the stack config names.

    ``config`` is the stack's config mapping (``{"fleetform:terraformState": ...}``); None
    reads the running program's config. A relative state path is taken from ``root``, by
    default the project directory (where Pulumi.yaml is). Returns ``{}`` when the stack names
    no state, so pool components can call this unconditionally. Keys are those of
    :data:`runtime.terraform.NETWORK_INPUTS` that the stack maps; ``fleet_cidrs`` is always a
    list.
    """
    settings = _settings(config)
    state = settings.get(TERRAFORM_STATE_KEY)
    if state is None:
        return {}
    if not isinstance(state, str) or not state:
        raise TerraformStateError(
            TERRAFORM_STATE_KEY, f"must be the path of a state file, not {state!r}"
        )
    reader = settings.get(TERRAFORM_READER_KEY) or "file"
    if reader not in READERS:
        raise TerraformStateError(
            TERRAFORM_READER_KEY, f"must be one of {', '.join(READERS)} (got {reader!r})"
        )
    path = Path(state)
    if not path.is_absolute():
        path = Path(root if root is not None else _project_root()) / path
    outputs = read_outputs(path)
    chosen = network_inputs(outputs, settings.get(TERRAFORM_OUTPUTS_KEY), str(path))
    if reader == "file":
        return {key: to_output(out) for key, out in chosen.items()}

    # The output names behind each key: the mapping when given, else the keys themselves.
    mapping = settings.get(TERRAFORM_OUTPUTS_KEY) or {key: key for key in chosen}
    names = {key: mapping[key] for key in chosen}
    values = terraform_outputs_via_provider(
        path,
        names.values(),
        sensitive={names[key] for key, out in chosen.items() if out.sensitive},
    )
    result: dict[str, pulumi.Input[Any]] = {}
    for key, name in names.items():
        value = values[name]
        if NETWORK_INPUTS[key].shape == "CIDRs":
            value = value.apply(lambda v: [v] if isinstance(v, str) else v)
        result[key] = value
    return result


def _settings(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if config is not None:
        return config
    fleetform = pulumi.Config("fleetform")
    return {
        TERRAFORM_STATE_KEY: fleetform.get("terraformState"),
        TERRAFORM_OUTPUTS_KEY: fleetform.get_object("terraformOutputs"),
        TERRAFORM_READER_KEY: fleetform.get("terraformReader"),
    }


def _project_root() -> str:
    # Pulumi runs the program from the project directory, but says so explicitly too; under
    # mocks there is no project, and the working directory is the best guess.
    try:
        root = pulumi.get_root_directory()
    except Exception:  # older engines, mocks without settings
        root = None
    return root or str(Path.cwd())


TERRAFORM_REFERENCE_PREFIX = "terraform:"


def resolve_terraform_references(value: Any, inputs: Mapping[str, pulumi.Input[Any]]) -> Any:
    """``value`` (e.g. the ``fleetform:network`` object) with every ``"terraform:KEY"`` string
    replaced by the network input ``KEY`` read from Terraform state (:func:`network_inputs_from_
    config`), so one stack can place pools of several regions from one Terraform state::

        fleetform:network:
          fleet_cidrs: terraform:fleet_cidrs
          aws: {us-east-1: {vpc_id: terraform:vpc_id, subnet_ids: terraform:subnet_ids}}

    A reference to a key the state does not provide raises :class:`TerraformStateError`.
    """
    if isinstance(value, str) and value.startswith(TERRAFORM_REFERENCE_PREFIX):
        key = value.removeprefix(TERRAFORM_REFERENCE_PREFIX)
        if key not in inputs:
            known = ", ".join(sorted(inputs)) or "none: fleetform:terraformState is not set"
            raise TerraformStateError(
                TERRAFORM_OUTPUTS_KEY,
                f"{value!r} names no Terraform network input (known: {known})",
            )
        return inputs[key]
    if isinstance(value, Mapping):
        return {k: resolve_terraform_references(v, inputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_terraform_references(v, inputs) for v in value]
    return value
