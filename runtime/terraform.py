"""Terraform interop, the pure half: reading Terraform outputs and writing a `*.tf.json` export.

This module owns two directions of the bridge between a fleet and a Terraform shop:

* In: :func:`read_outputs` parses a Terraform v4 state file (``terraform.tfstate``) or the text
  of ``terraform output -json`` into ``name -> TerraformOutput(value, sensitive, type)``, and
  :func:`network_inputs` picks the outputs that become the fleet's network inputs (VPC, subnets,
  cluster endpoint ...), checking their shapes. Errors are :class:`TerraformStateError`, one
  line naming the file and the problem, and never echo a sensitive value.
* Out: :func:`export_terraform` turns a :class:`~runtime.spec.FleetSpec` into a Terraform JSON
  configuration that uses only built-ins (``terraform_data``, ``variable``, ``locals``,
  ``check``, ``output``), so ``terraform plan`` in a Terraform shop shows the fleet's inventory
  and warns when replica counts would break a tenant's quota or the fleet budget.

Capacity is attributed to tenants by the rule ``fleetform plan`` uses for cost
(:func:`runtime.plan.fleet_cost`): a pool's capacity is split among the tenants allowed on it
(``allowed_pools`` and ``allowed_models``) in proportion to their ``tokens_per_minute`` quotas;
a tenant without that quota weighs as much as the largest one among the pool's tenants (all
equal when none has one). A pool no tenant may use is attributed to nobody.

Tenant quotas are checked against the capacity the fleet *reserves* now (the replica counts,
variable ``replicas``); the fleet budget against the most it can cost (variable
``max_replicas``), since the autoscaler may scale any pool to its maximum without a review.

No pulumi import: the Pulumi side is ``components/terraform.py``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.catalog import Catalog, InstanceRecord
from runtime.plan import pool_hourly_usd, tenant_may_use
from runtime.spec import HOURS_PER_MONTH, FleetSpec, PoolSpec

__all__ = [
    "NETWORK_INPUTS",
    "REQUIRED_TERRAFORM",
    "NetworkInput",
    "PoolFacts",
    "Reservation",
    "TerraformOutput",
    "TerraformStateError",
    "export_terraform",
    "fleet_reservation",
    "network_inputs",
    "parse_outputs",
    "pool_facts",
    "read_outputs",
    "select_outputs",
    "tenant_pool_shares",
]

# --------------------------------------------------------------------------------------------
# Reading outputs

SUPPORTED_STATE_VERSION = 4


class TerraformStateError(ValueError):
    """A Terraform state or outputs file that cannot be used. ``str()`` is ``source: problem``."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


@dataclass(frozen=True, slots=True)
class TerraformOutput:
    """One root-module output: its value, whether Terraform marks it sensitive, and its type.

    ``type`` is Terraform's JSON type expression as the file has it (``"string"``,
    ``["list", "string"]``, ``["object", {...}]``), or None when the file does not say.
    """

    value: Any
    sensitive: bool = False
    type: Any = None

    def __repr__(self) -> str:
        # Outputs end up in logs and test failures; a sensitive value must not.
        shown = "'<sensitive>'" if self.sensitive else repr(self.value)
        return f"TerraformOutput(value={shown}, sensitive={self.sensitive}, type={self.type!r})"


def read_outputs(
    path: str | Path, names: Iterable[str] | None = None
) -> dict[str, TerraformOutput]:
    """The outputs in a state file or a saved ``terraform output -json``, by name.

    With ``names``, only those outputs (in that order), and a missing one is an error.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TerraformStateError(source, "file not found") from None
    except IsADirectoryError:
        raise TerraformStateError(
            source, "is a directory; name the state file (e.g. terraform.tfstate)"
        ) from None
    except UnicodeDecodeError as error:
        raise TerraformStateError(
            source, f"not UTF-8 text (byte {error.start + 1} cannot be decoded)"
        ) from None
    except OSError as error:
        raise TerraformStateError(source, f"cannot read: {error.strerror}") from None
    outputs = parse_outputs(text, source)
    return outputs if names is None else select_outputs(outputs, names, source)


def parse_outputs(text: str, source: str = "<text>") -> dict[str, TerraformOutput]:
    """Parse a v4 state document or ``terraform output -json`` text (told apart by shape)."""
    if not text.strip():
        raise TerraformStateError(
            source, "empty: expected a Terraform state or `terraform output -json` output"
        )
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        # The decoder's message has no document text in it, so no secret leaks through here.
        raise TerraformStateError(
            source, f"not JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from None
    if not isinstance(document, dict):
        raise TerraformStateError(
            source, f"expected a JSON object at the top level, not {_json_kind(document)}"
        )
    if _is_state(document):
        version = document.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise TerraformStateError(
                source, f"state 'version' must be a whole number (got {version!r})"
            )
        if version != SUPPORTED_STATE_VERSION:
            raise TerraformStateError(
                source,
                f"Terraform state version {version} is not supported: Fleetform reads version "
                f"{SUPPORTED_STATE_VERSION} (Terraform 0.12 and later); re-save the state with "
                "a current Terraform (`terraform apply -refresh-only`)",
            )
        entries = document.get("outputs", {})
        if not isinstance(entries, dict):
            raise TerraformStateError(
                source, f"state 'outputs' must be an object, not {_json_kind(entries)}"
            )
    else:
        # `terraform output -json`: the document is the outputs object itself.
        entries = document
        for name, entry in entries.items():
            if not isinstance(entry, dict) or "value" not in entry:
                raise TerraformStateError(
                    source,
                    "neither a Terraform state (no 'version') nor `terraform output -json` "
                    f"output (entry {name!r} is not an object with a 'value')",
                )
    return {name: _output(name, entry, source) for name, entry in entries.items()}


def _is_state(document: Mapping[str, Any]) -> bool:
    # A state always has these top-level keys; `terraform output -json` has only outputs, each
    # an object. An output named "version" is an object there, never a number.
    if "terraform_version" in document or "lineage" in document:
        return True
    return "version" in document and not isinstance(document["version"], dict)


def _output(name: str, entry: Any, source: str) -> TerraformOutput:
    if not isinstance(entry, dict):
        raise TerraformStateError(
            source, f"output {name!r}: expected an object, not {_json_kind(entry)}"
        )
    if "value" not in entry:
        raise TerraformStateError(source, f"output {name!r} has no 'value'")
    sensitive = entry.get("sensitive", False)
    if not isinstance(sensitive, bool):
        raise TerraformStateError(
            source, f"output {name!r}: 'sensitive' must be true or false (got {sensitive!r})"
        )
    return TerraformOutput(value=entry["value"], sensitive=sensitive, type=entry.get("type"))


def select_outputs(
    outputs: Mapping[str, TerraformOutput], names: Iterable[str], source: str
) -> dict[str, TerraformOutput]:
    """The named outputs, in order; a missing one is a :class:`TerraformStateError`."""
    wanted = list(dict.fromkeys(names))
    missing = [name for name in wanted if name not in outputs]
    if missing:
        raise TerraformStateError(source, _missing_message(missing, outputs))
    return {name: outputs[name] for name in wanted}


def _missing_message(missing: list[str], outputs: Mapping[str, TerraformOutput]) -> str:
    listed = ", ".join(repr(name) for name in missing)
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, list(outputs), n=1)
        if close:
            hints.append(f"{name!r}: did you mean {close[0]!r}?")
    known = ", ".join(sorted(outputs)) or "none"
    message = f"no output {listed} (the file has: {known})"
    return message + (f"; {'; '.join(hints)}" if hints else "")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


# --------------------------------------------------------------------------------------------
# Network inputs: which Terraform outputs place the fleet


@dataclass(frozen=True, slots=True)
class NetworkInput:
    """A key of the dict that cloud pool components take as network placement."""

    shape: str  # "string", "list of strings" or "CIDRs" (one CIDR or a list)
    meaning: str


# The contract with the cloud pool components: these keys, with these shapes, and only the ones
# the stack maps. Names follow `fleetform:network` (components/settings.py), so a value drops
# into the placement of the region the Terraform state describes.
NETWORK_INPUTS: dict[str, NetworkInput] = {
    "vpc_id": NetworkInput("string", "AWS VPC id (fleetform:network.aws.<region>.vpc_id)"),
    "subnet_ids": NetworkInput("list of strings", "AWS subnet ids the pools' nodes go in"),
    "network": NetworkInput("string", "GCP VPC network name or self-link"),
    "subnetwork": NetworkInput("string", "GCP subnetwork name or self-link"),
    "subnet_id": NetworkInput("string", "Azure subnet resource id"),
    "resource_group_name": NetworkInput("string", "Azure resource group of the pools"),
    "fleet_cidrs": NetworkInput(
        "CIDRs", "address ranges admitted to the agent port (one CIDR becomes a list)"
    ),
    "cluster_endpoint": NetworkInput("string", "Kubernetes API server URL"),
    "cluster_ca_certificate": NetworkInput(
        "string", "CA certificate (PEM or base64) of the Kubernetes API server"
    ),
}


def network_inputs(
    outputs: Mapping[str, TerraformOutput],
    mapping: Mapping[str, Any] | None,
    source: str,
) -> dict[str, TerraformOutput]:
    """The outputs that become the fleet's network inputs, keyed by :data:`NETWORK_INPUTS` key.

    ``mapping`` is ``{network key: output name}`` (stack config ``fleetform:terraformOutputs``).
    Without it, outputs named like the keys are taken; finding none is an error, since a state
    that places nothing is almost certainly the wrong state or needs a mapping.
    """
    if mapping is None:
        chosen = {key: key for key in NETWORK_INPUTS if key in outputs}
        if not chosen:
            raise TerraformStateError(
                source,
                f"none of the outputs {', '.join(NETWORK_INPUTS)} is in the file; map the "
                "fleet's network inputs to outputs with fleetform:terraformOutputs",
            )
    else:
        if not isinstance(mapping, Mapping):
            raise TerraformStateError(
                source,
                "fleetform:terraformOutputs must map network inputs to output names "
                f"(e.g. {{vpc_id: main_vpc_id}}), not {_json_kind(mapping)}",
            )
        chosen = {}
        for key, name in mapping.items():
            if key not in NETWORK_INPUTS:
                close = difflib.get_close_matches(str(key), list(NETWORK_INPUTS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TerraformStateError(
                    source,
                    f"fleetform:terraformOutputs: unknown network input {key!r}{hint}; "
                    f"known: {', '.join(NETWORK_INPUTS)}",
                )
            if not isinstance(name, str) or not name:
                raise TerraformStateError(
                    source,
                    f"fleetform:terraformOutputs.{key}: must be an output name (got {name!r})",
                )
            chosen[key] = name
    selected = select_outputs(outputs, chosen.values(), source)
    result: dict[str, TerraformOutput] = {}
    for key, name in chosen.items():
        output = selected[name]
        problem = _shape_problem(NETWORK_INPUTS[key].shape, output.value)
        if problem:
            raise TerraformStateError(source, f"output {name!r} (network input {key}) {problem}")
        if NETWORK_INPUTS[key].shape == "CIDRs" and isinstance(output.value, str):
            output = TerraformOutput([output.value], output.sensitive, ["list", "string"])
        result[key] = output
    return result


def _shape_problem(shape: str, value: Any) -> str | None:
    """Why ``value`` does not have ``shape``, in words that never quote the value."""
    if shape == "list of strings":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"must be a list of strings, not {_json_kind(value)}" + (
                " with non-string items" if isinstance(value, list) else ""
            )
        if not value:
            return "is an empty list"
        return None
    if shape == "CIDRs":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            return f"must be a CIDR or a non-empty list of CIDRs, not {_json_kind(value)}"
        for item in items:
            if not isinstance(item, str):
                # ip_network(5) would read a number as the address 0.0.0.5.
                return "is not a CIDR block (or list of them) such as 10.20.0.0/16"
            try:
                # strict: a range with host bits set (10.0.0.1/16) is a typo, and the security
                # group rules built from it would not say what was meant.
                ipaddress.ip_network(item, strict=True)
            except ValueError:
                return "is not a CIDR block (or list of them) such as 10.20.0.0/16"
        return None
    if not isinstance(value, str):
        return f"must be a string, not {_json_kind(value)}"
    if not value:
        return "is an empty string"
    return None


# --------------------------------------------------------------------------------------------
# Export: the fleet as a built-ins-only Terraform configuration

# check blocks need 1.5; variable validations that refer to other variables need 1.9.
REQUIRED_TERRAFORM = ">= 1.9"


@dataclass(frozen=True, slots=True)
class PoolFacts:
    """What the export says about a pool: placement, hardware and prices from the catalog."""

    name: str
    cloud: str
    region: str
    instance_type: str
    priced_as: str | None
    accelerator_kind: str
    accelerator_name: str | None
    accelerators_per_replica: float
    model: str
    variant: str
    spot: bool
    on_demand_base: int
    min_replicas: int
    replicas: int
    max_replicas: int
    usd_per_hour_on_demand: float | None
    usd_per_hour_spot: float | None


def pool_facts(spec: FleetSpec, catalog: Catalog) -> list[PoolFacts]:
    """Every pool with its catalog hardware and prices, in spec order."""
    facts = []
    for pool in spec.pools:
        ref = pool.price_ref
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
        # Local agents run on this machine's CPUs whatever they are priced as (see spec.py).
        local = pool.cloud == "local"
        facts.append(
            PoolFacts(
                name=pool.name,
                cloud=pool.cloud,
                region=pool.region,
                instance_type=pool.instance_type,
                priced_as=(
                    f"{ref.cloud}/{ref.region}/{ref.instance_type}" if pool.priced_as else None
                ),
                accelerator_kind="cpu" if local else record.accelerator_kind,
                accelerator_name=None if local else record.accelerator_name,
                accelerators_per_replica=0.0 if local else record.accelerator_count,
                model=pool.serves.model,
                variant=pool.serves.variant,
                spot=pool.spot,
                on_demand_base=pool.on_demand_base,
                min_replicas=pool.min_replicas,
                replicas=pool.replicas,
                max_replicas=pool.max_replicas,
                usd_per_hour_on_demand=record.on_demand_usd_per_hour,
                usd_per_hour_spot=record.spot_usd_per_hour,
            )
        )
    return facts


def tenant_pool_shares(spec: FleetSpec) -> dict[str, dict[str, float]]:
    """Each tenant's fraction of each pool it may use (see the module docstring for the rule).

    The fractions of a pool add up to 1 over its tenants; pools no tenant may use appear
    under no tenant.
    """
    shares: dict[str, dict[str, float]] = {t.name: {} for t in spec.tenants}
    for pool in spec.pools:
        users = [t for t in spec.tenants if tenant_may_use(spec, t.name, pool)]
        if not users:
            continue
        # The same weights as runtime.plan.fleet_cost, so `fleetform plan` and the export agree.
        quotas = {t.name: t.quotas.tokens_per_minute for t in users}
        largest = max((q for q in quotas.values() if q), default=1)
        weights = {name: float(q or largest) for name, q in quotas.items()}
        total = sum(weights.values())
        for name, weight in weights.items():
            shares[name][pool.name] = weight / total
    return shares


@dataclass(frozen=True, slots=True)
class Reservation:
    """What the fleet reserves per tenant at given replica counts (the export's arithmetic)."""

    pool_usd_per_month: dict[str, float]
    tenant_accelerators: dict[str, float]
    tenant_accelerator_hours_per_month: dict[str, float]
    tenant_usd_per_month: dict[str, float]
    fleet_usd_per_month: float


def fleet_reservation(
    spec: FleetSpec, catalog: Catalog, replicas: Mapping[str, int] | None = None
) -> Reservation:
    """The figures the exported locals compute, in Python: the reference the tests hold the
    Terraform arithmetic to, and what `fleetform export terraform` summarises."""
    counts = {p.name: p.replicas for p in spec.pools} | dict(replicas or {})
    pools = {p.name: p for p in spec.pools}
    facts = {f.name: f for f in pool_facts(spec, catalog)}
    monthly = {
        name: pool_hourly_usd(pools[name], _price_record(catalog, pools[name]), counts[name])
        * HOURS_PER_MONTH
        for name in pools
    }
    accelerators = {name: counts[name] * facts[name].accelerators_per_replica for name in pools}
    shares = tenant_pool_shares(spec)
    tenant_acc = {t: sum(f * accelerators[p] for p, f in s.items()) for t, s in shares.items()}
    return Reservation(
        pool_usd_per_month=monthly,
        tenant_accelerators=tenant_acc,
        tenant_accelerator_hours_per_month={t: a * HOURS_PER_MONTH for t, a in tenant_acc.items()},
        tenant_usd_per_month={
            t: sum(f * monthly[p] for p, f in s.items()) for t, s in shares.items()
        },
        fleet_usd_per_month=sum(monthly.values()),
    )


def _price_record(catalog: Catalog, pool: PoolSpec) -> InstanceRecord:
    ref = pool.price_ref
    return catalog.get(ref.cloud, ref.region, ref.instance_type)


def export_terraform(
    spec: FleetSpec, catalog: Catalog, *, source: str | None = None
) -> dict[str, Any]:
    """The fleet as a Terraform JSON configuration (write it as ``*.tf.json``).

    Uses only built-ins, so ``terraform init`` needs no registry. Terraform users change
    ``var.replicas`` / ``var.max_replicas`` (maps by pool; a partial map overrides only the
    pools it names) and see in ``terraform plan`` the inventory diff and, as check warnings,
    any tenant quota or the budget the new counts would break.
    """
    facts = pool_facts(spec, catalog)
    shares = tenant_pool_shares(spec)
    pool_names = [f.name for f in facts]
    names_hcl = _hcl_list(pool_names)
    origin = f" from {source}" if source else ""

    locals_: dict[str, Any] = {
        "fleet": spec.name,
        "hours_per_month": HOURS_PER_MONTH,
        "budget_usd_per_month": spec.budget.usd_per_month if spec.budget else None,
        "pools": {
            f.name: {
                "cloud": f.cloud,
                "region": f.region,
                "instance_type": f.instance_type,
                "priced_as": f.priced_as,
                "accelerator_kind": f.accelerator_kind,
                "accelerator_name": f.accelerator_name,
                "accelerators_per_replica": f.accelerators_per_replica,
                "model": f.model,
                "variant": f.variant,
                "spot": f.spot,
                "on_demand_base": f.on_demand_base,
                "min_replicas": f.min_replicas,
                "usd_per_hour_on_demand": f.usd_per_hour_on_demand,
                "usd_per_hour_spot": f.usd_per_hour_spot,
            }
            for f in facts
        },
        "default_replicas": {f.name: f.replicas for f in facts},
        "default_max_replicas": {f.name: f.max_replicas for f in facts},
        # A partial -var map overrides only the pools it names.
        "replicas": "${merge(local.default_replicas, var.replicas)}",
        "max_replicas": "${merge(local.default_max_replicas, var.max_replicas)}",
        "tenants": {
            t.name: {
                "accelerator_hours_per_month": t.quotas.accelerator_hours_per_month,
                "usd_per_month": t.quotas.usd_per_month,
                "pool_shares": shares[t.name],
            }
            for t in spec.tenants
        },
        "pool_accelerators": (
            "${{ for name, pool in local.pools : name => "
            "local.replicas[name] * pool.accelerators_per_replica }}"
        ),
        "pool_usd_per_month": "${{ for name, pool in local.pools : name => "
        + _monthly_cost_hcl("local.replicas[name]")
        + " }}",
        "pool_usd_per_month_at_max": "${{ for name, pool in local.pools : name => "
        + _monthly_cost_hcl("local.max_replicas[name]")
        + " }}",
        "tenant_accelerators": (
            "${{ for tenant, t in local.tenants : tenant => sum(concat([0], "
            "[for pool, share in t.pool_shares : share * local.pool_accelerators[pool]])) }}"
        ),
        "tenant_accelerator_hours_per_month": (
            "${{ for tenant, n in local.tenant_accelerators : "
            "tenant => n * local.hours_per_month }}"
        ),
        "tenant_usd_per_month": (
            "${{ for tenant, t in local.tenants : tenant => sum(concat([0], "
            "[for pool, share in t.pool_shares : share * local.pool_usd_per_month[pool]])) }}"
        ),
        "fleet_usd_per_month": "${sum(concat([0], values(local.pool_usd_per_month)))}",
        "fleet_max_usd_per_month": ("${sum(concat([0], values(local.pool_usd_per_month_at_max)))}"),
        "unattributed_pools": sorted(set(pool_names) - {p for s in shares.values() for p in s}),
    }

    variables = {
        "replicas": {
            "type": "map(number)",
            "default": {f.name: f.replicas for f in facts},
            "description": "Replica count per pool (the stack's desired_replicas). Tenant quota "
            "checks use these counts. A map naming some pools overrides only those.",
            "validation": [
                _known_pools_validation("replicas", names_hcl),
                {
                    "condition": "${alltrue([for name, n in var.replicas : "
                    "floor(n) == n && n >= lookup(local.pools, name, {min_replicas = 0})"
                    ".min_replicas && n <= lookup(local.max_replicas, name, n)])}",
                    "error_message": "Each pool's replicas must be a whole number within its "
                    "min_replicas..max_replicas.",
                },
            ],
        },
        "max_replicas": {
            "type": "map(number)",
            "default": {f.name: f.max_replicas for f in facts},
            "description": "Most replicas per pool the autoscaler may run. The budget check "
            "uses these counts. A map naming some pools overrides only those.",
            "validation": [
                _known_pools_validation("max_replicas", names_hcl),
                {
                    "condition": "${alltrue([for name, n in var.max_replicas : "
                    "floor(n) == n && n >= lookup(local.pools, name, {min_replicas = 0})"
                    ".min_replicas && n <= 10000])}",
                    "error_message": "Each pool's max_replicas must be a whole number from its "
                    "min_replicas up to 10000.",
                },
            ],
        },
    }

    checks: dict[str, Any] = {}
    for tenant in spec.tenants:
        t = f'local.tenants["{tenant.name}"]'
        limit = tenant.quotas.accelerator_hours_per_month
        if limit is not None:
            checks[f"tenant_{tenant.name}_accelerator_hours"] = {
                "assert": [
                    {
                        "condition": f'${{local.tenant_accelerator_hours_per_month["{tenant.name}"]'
                        f" <= {t}.accelerator_hours_per_month}}",
                        "error_message": (
                            f"Tenant {tenant.name}: the fleet reserves "
                            f'${{format("%.1f", local.tenant_accelerator_hours_per_month'
                            f'["{tenant.name}"])}} accelerator-hours/month for it, over its '
                            f"quota of {_fmt(limit)} accelerator-hours/month. Its share by pool: "
                            f'${{join(", ", [for pool, share in {t}.pool_shares : '
                            f'format("%s %.2f accelerators", pool, '
                            f"share * local.pool_accelerators[pool]) "
                            f"if share * local.pool_accelerators[pool] > 0])}}."
                        ),
                    }
                ]
            }
        limit = tenant.quotas.usd_per_month
        if limit is not None:
            checks[f"tenant_{tenant.name}_usd"] = {
                "assert": [
                    {
                        "condition": f'${{local.tenant_usd_per_month["{tenant.name}"]'
                        f" <= {t}.usd_per_month}}",
                        "error_message": (
                            f"Tenant {tenant.name}: the fleet reserves "
                            f'${{format("%.2f", local.tenant_usd_per_month["{tenant.name}"])}} '
                            f"USD/month of capacity for it, over its quota of {_fmt(limit)} "
                            "USD/month. Its share by pool: "
                            f'${{join(", ", [for pool, share in {t}.pool_shares : '
                            f'format("%s %.2f USD", pool, share * local.pool_usd_per_month[pool]) '
                            f"if share * local.pool_usd_per_month[pool] > 0])}}."
                        ),
                    }
                ]
            }
    if spec.budget is not None:
        checks["fleet_budget"] = {
            "assert": [
                {
                    "condition": "${local.fleet_max_usd_per_month <= local.budget_usd_per_month}",
                    "error_message": (
                        f"Fleet {spec.name}: at max_replicas the pools cost "
                        '${format("%.2f", local.fleet_max_usd_per_month)} USD/month, over the '
                        f"budget of {_fmt(spec.budget.usd_per_month)} USD/month. By pool: "
                        '${join(", ", [for pool, usd in local.pool_usd_per_month_at_max : '
                        'format("%s %.2f USD (%d replicas)", pool, usd, '
                        "local.max_replicas[pool])])}."
                    ),
                }
            ]
        }

    document: dict[str, Any] = {
        "//": f"Generated by `fleetform export terraform`{origin}: fleet {spec.name}. "
        "Built-in resources only. Regenerate instead of editing; change replica counts "
        "with -var or a .tfvars file.",
        "terraform": {"required_version": REQUIRED_TERRAFORM},
        "variable": variables,
        "locals": locals_,
        "resource": {
            "terraform_data": {
                "pool": {
                    "for_each": "${local.pools}",
                    "input": "${merge(each.value, {"
                    "name = each.key, "
                    "replicas = local.replicas[each.key], "
                    "max_replicas = local.max_replicas[each.key], "
                    "accelerators = local.pool_accelerators[each.key], "
                    f"usd_per_month = {_rounded('local.pool_usd_per_month[each.key]', 2)}, "
                    "usd_per_month_at_max = "
                    f"{_rounded('local.pool_usd_per_month_at_max[each.key]', 2)}"
                    "})}",
                }
            }
        },
        "output": {
            "pool_usd_per_month": {
                "value": _rounded_map("local.pool_usd_per_month", 2),
                "description": "Monthly cost of each pool at var.replicas.",
            },
            "tenant_accelerators": {
                "value": _rounded_map("local.tenant_accelerators", 4),
                "description": "Accelerators the fleet reserves for each tenant.",
            },
            "tenant_accelerator_hours_per_month": {
                "value": _rounded_map("local.tenant_accelerator_hours_per_month", 2),
                "description": "Accelerator-hours per month reserved for each tenant.",
            },
            "tenant_usd_per_month": {
                "value": _rounded_map("local.tenant_usd_per_month", 2),
                "description": "USD per month of capacity reserved for each tenant.",
            },
            "fleet_usd_per_month": {
                "value": f"${{{_rounded('local.fleet_usd_per_month', 2)}}}",
                "description": "What the fleet costs per month at var.replicas.",
            },
            "fleet_max_usd_per_month": {
                "value": f"${{{_rounded('local.fleet_max_usd_per_month', 2)}}}",
                "description": "What the fleet costs per month at var.max_replicas.",
            },
            "unattributed_pools": {
                "value": "${local.unattributed_pools}",
                "description": "Pools no tenant may use: their cost counts for no tenant.",
            },
        },
    }
    if checks:
        document["check"] = checks
    return document


def _monthly_cost_hcl(count: str) -> str:
    """HCL for one pool's monthly USD at ``count`` replicas: runtime.plan.pool_hourly_usd."""
    od = "coalesce(pool.usd_per_hour_on_demand, 0)"
    spot = "coalesce(pool.usd_per_hour_spot, 0)"
    base = f"min(pool.on_demand_base, {count})"
    return (
        f"local.hours_per_month * (pool.spot ? {base} * {od} + ({count} - {base}) * {spot} "
        f": {count} * {od})"
    )


def _rounded(expr: str, places: int) -> str:
    # Terraform computes with 512-bit binary floats and prints every digit (2203.1399...98);
    # a round trip through decimal text prints what a person expects (2203.14).
    return f'tonumber(format("%.{places}f", {expr}))'


def _rounded_map(expr: str, places: int) -> str:
    return f"${{{{ for key, value in {expr} : key => {_rounded('value', places)} }}}}"


def _known_pools_validation(variable: str, names_hcl: str) -> dict[str, str]:
    return {
        "condition": f"${{alltrue([for name in keys(var.{variable}) : "
        f"contains({names_hcl}, name)])}}",
        "error_message": f"Every key of {variable} must be a pool of the fleet: "
        + names_hcl.strip("[]").replace('"', "")
        + ".",
    }


def _hcl_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def _fmt(number: float) -> str:
    """A quota or budget as written in messages: no '.0' on whole numbers."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))
