"""The controller's configuration: what it serves, where it keeps the ledger, whom it trusts.

This module owns :class:`ControllerConfig` (pydantic v2) and
:func:`controller_config_from_spec`, which builds one from a :class:`runtime.spec.FleetSpec` and
the two tokens in clear. Secrets are only ever stored as SHA-256 hex digests: the fleet token
(agents authenticate pushes with it), the admin token (every tenant's usage, the fleet view) and
each tenant's API keys (a tenant reads its own usage), the latter resolved from the spec's key
references with :func:`runtime.agent.config.resolve_key_reference`, as the agents do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.agent.config import NodeConfigError, hash_api_key, resolve_key_reference
from runtime.leases import LeasePolicy
from runtime.spec import FleetSpec, load_stack_file

__all__ = ["ControllerConfig", "ControllerConfigError", "controller_config_from_spec"]

log = logging.getLogger("fleetform.controller")

_DEFAULT_LEASES = LeasePolicy()

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 hex digest")]


class ControllerConfigError(ValueError):
    """A controller config that cannot be built; ``str()`` is one line saying why."""


class ControllerConfig(BaseModel):
    """Everything one controller process needs.

    Give either ``spec`` or ``stack`` (a Pulumi stack file, loaded with
    :func:`runtime.spec.load_stack_file`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8700, ge=0, le=65535)
    spec: FleetSpec
    stack: Path | None = Field(default=None, description="Where the spec was loaded from.")
    db_path: Path = Field(description="SQLite usage ledger; created when missing.")
    fleet_token_sha256: Sha256Hex
    admin_token_sha256: Sha256Hex
    tenant_key_sha256: dict[str, list[Sha256Hex]] = Field(
        default_factory=dict,
        description="Digests of each tenant's API keys, for GET /v1/usage scoped to the tenant.",
    )
    stale_after_s: float | None = Field(
        default=None,
        gt=0,
        description="An agent whose last push is older leaves the fleet view; default: the "
        "spec's routing.peer_stale_after_s.",
    )
    lease_ttl_s: float = Field(default=_DEFAULT_LEASES.ttl_s, gt=0)
    lease_floor_share: float = Field(default=_DEFAULT_LEASES.floor_share, ge=0, le=1)
    lease_min_units: int = Field(default=_DEFAULT_LEASES.min_units, ge=0)
    lease_smoothing: float = Field(default=_DEFAULT_LEASES.smoothing, ge=0, lt=1)
    lease_retarget_s: float = Field(
        default=1.0,
        ge=0,
        description="How often the fleet-wide lease split is redone (also whenever the set of "
        "agents changes); each push is granted from the latest split.",
    )
    rollout_period_s: float = Field(
        default=5.0,
        gt=0,
        description="How often model rollouts are judged (runtime.controller.rollouts); the "
        "spec's step_interval_s and min_requests say when a step may move, this only how "
        "promptly it is noticed.",
    )
    max_body_bytes: int = Field(default=4 << 20, ge=1024)
    push_retention_s: float = Field(
        default=7 * 86_400.0,
        gt=0,
        description="How long rows of accepted pushes are kept (usage totals are kept forever; "
        "each agent process's newest push is kept for duplicate detection).",
    )

    @model_validator(mode="before")
    @classmethod
    def _load_stack(cls, data: Any) -> Any:
        # A path to a stack file stands in for the spec; FleetSpecError is a ValueError, so
        # pydantic reports it under the offending field like any other problem.
        if isinstance(data, Mapping) and data.get("spec") is None and data.get("stack"):
            return {**data, "spec": load_stack_file(data["stack"])}
        return data

    @model_validator(mode="after")
    def _known_tenants(self) -> ControllerConfig:
        known = {t.name for t in self.spec.tenants}
        unknown = sorted(set(self.tenant_key_sha256) - known)
        if unknown:
            raise ValueError(f"tenant_key_sha256: no tenant named {', '.join(unknown)} in spec")
        return self

    @property
    def peer_stale_after_s(self) -> float:
        """When an agent leaves the fleet view (seconds since its last push)."""
        if self.stale_after_s is not None:
            return self.stale_after_s
        return self.spec.routing.peer_stale_after_s

    @property
    def lease_policy(self) -> LeasePolicy:
        return LeasePolicy(
            ttl_s=self.lease_ttl_s,
            floor_share=self.lease_floor_share,
            min_units=self.lease_min_units,
            smoothing=self.lease_smoothing,
        )


def controller_config_from_spec(
    spec: FleetSpec,
    *,
    db_path: str | os.PathLike[str],
    fleet_token: str,
    admin_token: str,
    environ: Mapping[str, str] | None = None,
    strict_keys: bool = False,
    **overrides: Any,
) -> ControllerConfig:
    """A controller config for ``spec``; the tokens are given in clear and stored hashed.

    Tenant key references are resolved against ``environ`` (default: the process environment).
    A reference that cannot be resolved (an unset variable, a Pulumi ``config:`` secret) only
    means that key cannot read its tenant's usage, so it is skipped with a warning, unless
    ``strict_keys``; the controller's main job, accounting pushes, does not need tenant keys.
    ``overrides`` set other fields (``host``, ``port``, ``stale_after_s``, ...).
    """
    if not fleet_token:
        raise ControllerConfigError("the fleet token is empty")
    if not admin_token:
        raise ControllerConfigError("the admin token is empty")
    tenant_keys: dict[str, list[str]] = {}
    for tenant in spec.tenants:
        digests: list[str] = []
        for reference in tenant.api_keys:
            try:
                digests.append(resolve_key_reference(tenant.name, reference, environ))
            except NodeConfigError as error:
                if strict_keys:
                    raise ControllerConfigError(str(error)) from None
                # The message names the reference (env:VAR, file:/path), never a key.
                log.warning("%s; that key cannot read usage", error)
        if digests:
            tenant_keys[tenant.name] = digests
    try:
        return ControllerConfig(
            spec=spec,
            db_path=Path(db_path),
            fleet_token_sha256=hash_api_key(fleet_token),
            admin_token_sha256=hash_api_key(admin_token),
            tenant_key_sha256=tenant_keys,
            **overrides,
        )
    except ValidationError as error:
        raise ControllerConfigError(_one_line(error)) from None


def _one_line(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{path}: {message}" if path else message)
    extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"controller config: {problems[0]}{extra}"
