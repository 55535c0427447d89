"""Helpers of the policy tests: validation args built by hand, and the offline stand-in for
`pulumi preview --policy-pack policy`.

pulumi-policy has no public testing helper, and the pack's `PolicyPack(...)` serves gRPC
forever, so the tests drive the policies the way the SDK's analyzer servicer does:

- unit level: a `ResourceValidationArgs` / `StackValidationArgs` (policy config included) handed
  to a policy's `validate`, awaiting it when it returns a coroutine;
- pack level (`run_pack`): every resource policy on every resource, then every stack policy on
  all of them, collecting violations with the policy's enforcement level. The resources come
  from the real `InferenceFleet` run under the component tests' mocks (`run_stack`): each
  registered resource becomes a `PolicyResource` whose props are deserialised and wrapped in the
  SDK's unknown-checking proxy as the servicer does; components carry the outputs they
  registered (the mock monitor drops `RegisterResourceOutputs`, the engine keeps them).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from components.support import (
    DEV_ENV,
    PROD_KEYS,
    FleetMocks,
    Program,
    RecordingMonitor,
    run_fleet,
    stack_config,
)
from pulumi.runtime import rpc
from pulumi_policy import (
    EnforcementLevel,
    Policy,
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.deserialize import deserialize_properties
from pulumi_policy.policy import _NotApplicableError  # the SDK's own "not applicable" signal
from pulumi_policy.proxy import unknown_checking_proxy

from components.settings import settings_from_config
from runtime.spec import fleet_from_stack_config

PROD = "Pulumi.prod.yaml"
DEV = "Pulumi.dev.yaml"
STACK_SECRETS: Mapping[str, dict[str, Any]] = {
    PROD: {"api_keys": PROD_KEYS},
    DEV: {"environ": DEV_ENV},
}


@dataclass(frozen=True)
class Violation:
    policy: str
    level: EnforcementLevel
    message: str
    urn: str | None


class NotApplicable(Exception):
    """A policy said it does not apply (`args.not_applicable(reason)`)."""


def _finish(result: Any) -> None:
    if inspect.isawaitable(result):
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(result)
        finally:
            loop.close()


def _options(parent: str | None = None) -> PolicyResourceOptions:
    return PolicyResourceOptions(
        protect=False,
        ignore_changes=[],
        delete_before_replace=None,
        aliases=[],
        custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
        additional_secret_outputs=[],
        parent=parent,
    )


def _urn(resource_type: str, name: str) -> str:
    return f"urn:pulumi:test::fleetform::{resource_type}::{name}"


def wire(props: Mapping[str, Any]) -> Any:
    """Props as the analyzer hands them over: deserialised and behind the unknown proxy."""
    return unknown_checking_proxy(deserialize_properties(dict(props)))


def resource(resource_type: str, props: Mapping[str, Any], name: str = "r") -> PolicyResource:
    return PolicyResource(
        resource_type, wire(props), _urn(resource_type, name), name, _options(), None, None, [], {}
    )


def validate_resource(
    policy: Policy,
    resource_type: str,
    props: Mapping[str, Any],
    *,
    name: str = "r",
    config: Mapping[str, Any] | None = None,
) -> list[str]:
    """The violation messages of one resource policy on one resource."""
    assert isinstance(policy, ResourceValidationPolicy)
    messages: list[str] = []
    args = ResourceValidationArgs(
        resource_type,
        wire(props),
        _urn(resource_type, name),
        name,
        _options(),
        None,
        dict(config) if config is not None else None,
    )
    try:
        _finish(policy.validate(args, lambda message, urn=None: messages.append(message)))
    except _NotApplicableError as error:
        raise NotApplicable(error.reason or "") from None
    return messages


def validate_stack(
    policy: Policy,
    resources: Sequence[PolicyResource] = (),
    *,
    config: Mapping[str, Any] | None = None,
) -> list[tuple[str, str | None]]:
    """(message, urn) of each violation of one stack policy."""
    assert isinstance(policy, StackValidationPolicy)
    found: list[tuple[str, str | None]] = []
    args = StackValidationArgs(list(resources), dict(config) if config is not None else None)
    try:
        _finish(policy.validate(args, lambda message, urn=None: found.append((message, urn))))
    except _NotApplicableError as error:
        raise NotApplicable(error.reason or "") from None
    return found


def run_pack(
    policies: Sequence[Policy],
    resources: Sequence[PolicyResource],
    policy_config: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Violation]:
    """Every policy on the stack, as the engine runs a pack in a preview."""
    violations: list[Violation] = []
    policy_config = policy_config or {}
    for policy in policies:
        level = policy.enforcement_level or EnforcementLevel.MANDATORY
        config = policy_config.get(policy.name)
        try:
            if isinstance(policy, ResourceValidationPolicy):
                for r in resources:
                    for message in validate_resource(
                        policy, r.resource_type, plain_props(r), name=r.name, config=config
                    ):
                        violations.append(Violation(policy.name, level, message, r.urn))
            elif isinstance(policy, StackValidationPolicy):
                for message, urn in validate_stack(policy, resources, config=config):
                    violations.append(Violation(policy.name, level, message, urn))
        except NotApplicable:
            continue
    return violations


def plain_props(r: PolicyResource) -> dict[str, Any]:
    """A PolicyResource's props back as plain data (to build fresh per-policy args)."""

    def unwrap(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: unwrap(value[k]) for k in value}
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            return [unwrap(v) for v in value]
        return value

    return unwrap(r.props)


# --------------------------------------------------------------------------------------------
# Stacks: the real InferenceFleet under mocks, its graph as PolicyResources


class PackMonitor(RecordingMonitor):
    """The component tests' monitor, also keeping what the engine keeps for the pack: the
    outputs components register and each resource's dependencies."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.outputs: dict[str, dict[str, Any]] = {}
        self.dependencies: dict[str, list[str]] = {}

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        self.dependencies[response.urn] = list(request.dependencies)
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:
        self.outputs[request.urn] = rpc.deserialize_properties(request.outputs)
        return super().RegisterResourceOutputs(request)


@dataclass(frozen=True)
class Stack:
    """An example stack's config and what its mocked InferenceFleet registers."""

    config: dict[str, Any]
    resources: list[PolicyResource]

    def of_type(self, resource_type: str) -> list[PolicyResource]:
        return sorted(
            (r for r in self.resources if r.resource_type == resource_type), key=lambda r: r.name
        )


def run_stack(name: str, mutate: Callable[[dict[str, Any]], None] | None = None) -> Stack:
    """Run the stack file's fleet (its config changed by `mutate`) under fresh mocks."""
    config = stack_config(name)
    if mutate is not None:
        mutate(config)
    spec = fleet_from_stack_config(config)
    settings = settings_from_config(config)
    asyncio.set_event_loop(asyncio.new_event_loop())
    mocks = FleetMocks()
    monitor = PackMonitor(mocks)
    pulumi.runtime.set_mocks(
        mocks, project="fleetform", stack="test", preview=False, monitor=monitor
    )
    run_fleet(Program(monitor, mocks), spec, settings, **STACK_SECRETS[name])
    return Stack(config, policy_resources(monitor))


def policy_resources(monitor: PackMonitor) -> list[PolicyResource]:
    by_urn: dict[str, PolicyResource] = {}
    for urn, registration in monitor.get_registered_resources().items():
        state = {**dict(registration.state), **monitor.outputs.get(urn, {})}
        parent = monitor.parents.get(urn) or None
        by_urn[urn] = PolicyResource(
            urn.split("::")[2].split("$")[-1],
            wire(state),
            urn,
            urn.split("::")[3],
            _options(parent),
            None,
            None,
            [],
            {},
        )
    for urn, r in by_urn.items():
        r.parent = by_urn.get(r.opts.parent or "")
        r.dependencies = [by_urn[d] for d in monitor.dependencies.get(urn, []) if d in by_urn]
    return list(by_urn.values())


def pool_entry(config: dict[str, Any], pool: str) -> dict[str, Any]:
    return next(p for p in config["fleetform:fleet"]["pools"] if p["name"] == pool)


def tenant_entry(config: dict[str, Any], tenant: str) -> dict[str, Any]:
    return next(t for t in config["fleetform:fleet"]["tenants"] if t["name"] == tenant)
