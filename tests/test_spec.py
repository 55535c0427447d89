"""Tests for runtime.spec: the fleet spec, its validation messages, loading and JSON Schema.

Test inputs are a small valid spec (`BASE`, built on real catalog instance types) copied and
mutated one thing at a time. Expected messages are literal text written here, not text produced
by the code under test; where a message lists catalog data (close matches, regions, usable GB)
the assertion is a precise regex and the listed data is checked against the catalog.
"""

from __future__ import annotations

import copy
import json
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.catalog import Catalog, default_catalog
from runtime.spec import (
    FLEET_CONFIG_KEY,
    REPLICAS_CONFIG_KEY,
    CatalogRef,
    FleetSpec,
    FleetSpecError,
    Issue,
    ServesSpec,
    cross_check,
    fleet_from_stack_config,
    load_stack_file,
    parse_fleet,
    stack_file_json_schema,
)

REPO = Path(__file__).parents[1]
STACKS_DIR = REPO / "stacks"
EXAMPLE_STACKS = ("Pulumi.dev.yaml", "Pulumi.prod.yaml", "local.yaml")

KEY_REF_HELP = (
    "not a key reference; plain-text keys are not allowed: "
    "use env:VAR, file:/path, config:NAME or sha256:<64 hex digits>"
)
NAME_PATTERN_MSG = "String should match pattern '^[a-z][a-z0-9-]{0,39}$'"

# A small valid fleet: an A10G pool (aws us-east-1 g5.xlarge), a spot L4 pool (gcp us-central1
# g2-standard-8) falling back to it, and a CPU pool (aws us-east-1 m7g.large).
BASE: dict[str, Any] = {
    "name": "test-fleet",
    "models": [
        {
            "name": "llama-8b",
            "parameters_b": 8.03,
            "layers": 32,
            "hidden_size": 4096,
            "kv_heads": 8,
            "head_dim": 128,
            "context_length": 8192,
            "variants": [
                {"name": "bf16", "precision": "bf16", "runs_on": ["gpu"]},
                {
                    "name": "int4",
                    "precision": "int4",
                    "quality": "standard",
                    "runs_on": ["gpu", "cpu"],
                },
            ],
        },
        {
            "name": "tiny",
            "parameters_b": 0.135,
            "layers": 30,
            "hidden_size": 576,
            "kv_heads": 3,
            "head_dim": 64,
            "context_length": 2048,
            "variants": [
                {
                    "name": "q4",
                    "precision": "int4",
                    "weight_bytes": 540_000_000,
                    "quality": "standard",
                    "runs_on": ["cpu"],
                }
            ],
        },
    ],
    "pools": [
        {
            "name": "aws-gpu",
            "cloud": "aws",
            "region": "us-east-1",
            "instance_type": "g5.xlarge",
            "min_replicas": 1,
            "max_replicas": 4,
            "serves": {"model": "llama-8b", "variant": "bf16"},
        },
        {
            "name": "gcp-l4",
            "cloud": "gcp",
            "region": "us-central1",
            "instance_type": "g2-standard-8",
            "spot": True,
            "fallback_pool": "aws-gpu",
            "min_replicas": 0,
            "max_replicas": 4,
            "serves": {"model": "llama-8b", "variant": "int4"},
        },
        {
            "name": "aws-cpu",
            "cloud": "aws",
            "region": "us-east-1",
            "instance_type": "m7g.large",
            "min_replicas": 1,
            "max_replicas": 2,
            "serves": {"model": "tiny", "variant": "q4"},
        },
    ],
    "tenants": [
        {
            "name": "team-a",
            "api_keys": ["env:TEAM_A_KEY"],
            "default_priority": "standard",
            "max_priority": "critical",
        }
    ],
    "slo_classes": [
        {"name": "critical", "priority": 0, "ttft_ms": 800, "tpot_ms": 60},
        {"name": "standard", "priority": 1, "ttft_ms": 2500, "tpot_ms": 100},
    ],
}
# (min_replicas, max_replicas) of BASE's pools, written out for with_replicas expectations.
BASE_BOUNDS = {"aws-gpu": (1, 4), "gcp-l4": (0, 4), "aws-cpu": (1, 2)}

LLAMA_70B = {
    "name": "llama-70b",
    "parameters_b": 70.6,
    "layers": 80,
    "hidden_size": 8192,
    "kv_heads": 8,
    "head_dim": 128,
    "context_length": 8192,
    "variants": [{"name": "bf16", "precision": "bf16"}],
}


def fleet() -> dict[str, Any]:
    """A fresh deep copy of BASE to mutate."""
    return copy.deepcopy(BASE)


def issue_lines(data: Any, **kwargs: Any) -> list[str]:
    """The `path: reason` lines parse_fleet reports for data (fails if it validates)."""
    with pytest.raises(FleetSpecError) as excinfo:
        parse_fleet(data, **kwargs)
    return [str(issue) for issue in excinfo.value.issues]


def stack_text(fleet_data: Any, replicas: Any = None) -> str:
    config: dict[str, Any] = {"aws:region": "us-east-1", FLEET_CONFIG_KEY: fleet_data}
    if replicas is not None:
        config[REPLICAS_CONFIG_KEY] = replicas
    return yaml.safe_dump({"config": config}, sort_keys=False)


# --------------------------------------------------------------------------------------------
# The base spec and the example stacks


def test_base_spec_is_valid() -> None:
    spec = parse_fleet(fleet())
    assert [p.name for p in spec.pools] == ["aws-gpu", "gcp-l4", "aws-cpu"]
    assert spec.pool("gcp-l4").spot is True
    assert spec.tenant("team-a").api_keys == ["env:TEAM_A_KEY"]


def test_example_stacks_are_all_present() -> None:
    found = sorted(p.name for p in STACKS_DIR.glob("*.yaml"))
    assert set(EXAMPLE_STACKS) <= set(found)


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_example_stack_loads_and_resolves_in_catalog(stack: str) -> None:
    spec = load_stack_file(STACKS_DIR / stack)
    catalog = default_catalog()
    for pool in spec.pools:
        ref = pool.price_ref
        if pool.cloud in ("local", "kubernetes"):
            assert ref == pool.priced_as
        else:
            assert (ref.cloud, ref.region, ref.instance_type) == (
                pool.cloud,
                pool.region,
                pool.instance_type,
            )
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
        assert record.instance_type == ref.instance_type
        spec.pool_variant(pool)  # serves resolves to a real model and variant


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_example_stack_round_trips(stack: str, tmp_path: Path) -> None:
    spec = load_stack_file(STACKS_DIR / stack)
    dumped = spec.model_dump(mode="json")
    assert parse_fleet(dumped) == spec
    assert parse_fleet(yaml.safe_load(yaml.safe_dump(dumped))) == spec
    copy_path = tmp_path / stack
    copy_path.write_text(stack_text(dumped), encoding="utf-8")
    assert load_stack_file(copy_path) == spec


def test_example_stacks_content() -> None:
    dev = load_stack_file(STACKS_DIR / "Pulumi.dev.yaml")
    prod = load_stack_file(STACKS_DIR / "Pulumi.prod.yaml")
    local = load_stack_file(STACKS_DIR / "local.yaml")
    assert (dev.name, prod.name, local.name) == ("acme-dev", "acme-prod", "local")
    assert prod.pool("aws-use1-a10g").replicas == 3
    assert prod.pool("aws-use1-a10g-spot").fallback_pool == "aws-use1-a10g"
    assert prod.pool("k8s-eks-l4").price_ref == CatalogRef(
        cloud="aws", region="us-east-1", instance_type="g6.xlarge"
    )
    assert [p.cloud for p in local.pools] == ["local", "local"]
    assert dev.tenant("data-team").allowed_pools == ["gcp-l4", "aws-cpu"]


# --------------------------------------------------------------------------------------------
# Error paths: one mutation of BASE, the exact lines expected

Mutation = Callable[[dict[str, Any]], None]


def _set(*path_and_value: Any) -> Mutation:
    """A mutation setting (or, with value DELETE, removing) the item at a path in the spec."""
    *path, value = path_and_value

    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


def _all(*mutations: Mutation) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        for m in mutations:
            m(data)

    return mutate


def _append(section: str, item: Any) -> Mutation:
    return lambda data: data[section].append(copy.deepcopy(item))


DELETE = object()
NO_FALLBACK = _set("pools", 1, "fallback_pool", DELETE)


def _pool(index: int, **changes: Any) -> Mutation:
    return lambda data: data["pools"][index].update(copy.deepcopy(changes))


# BASE's llama-8b has bf16 (pool aws-gpu) and int4 (pool gcp-l4); INT8 is a variant no pool serves.
CANARY = {"stable": "bf16", "candidate": "int4", "strategy": "canary"}
INT8 = {"name": "int8", "precision": "int8", "quality": "high", "runs_on": ["gpu"]}


def _rollout(data: dict[str, Any], **changes: Any) -> None:
    """Give llama-8b the CANARY rollout with changes (value DELETE removes a key)."""
    rollout = {**CANARY, **changes}
    data["models"][0]["rollout"] = {k: v for k, v in rollout.items() if v is not DELETE}


def _add_variant(model: int, variant: dict[str, Any]) -> Mutation:
    return lambda data: data["models"][model]["variants"].append(copy.deepcopy(variant))


CASES: list[tuple[str, Mutation, list[str]]] = [
    # --- pydantic: shapes, types, ranges, unknown keys ---
    (
        "unknown-key-in-pool",
        _set("pools", 0, "flavour", "large"),
        ["pools[0].flavour: unknown key (not part of the fleet spec)"],
    ),
    (
        "unknown-top-level-key",
        _set("colour", "blue"),
        ["colour: unknown key (not part of the fleet spec)"],
    ),
    (
        "unknown-key-in-serves",
        _set("pools", 2, "serves", "revision", 3),
        ["pools[2].serves.revision: unknown key (not part of the fleet spec)"],
    ),
    (
        "missing-serves",
        _set("pools", 0, "serves", DELETE),
        ["pools[0].serves: required field is missing"],
    ),
    (
        "missing-models",
        _set("models", DELETE),
        ["models: required field is missing"],
    ),
    (
        "missing-variant-precision",
        _set("models", 0, "variants", 0, "precision", DELETE),
        ["models[0].variants[0].precision: required field is missing"],
    ),
    (
        "wrong-type-int",
        _set("pools", 0, "min_replicas", "x"),
        [
            "pools[0].min_replicas: Input should be a valid integer, unable to parse string "
            "as an integer (got 'x')"
        ],
    ),
    (
        "wrong-type-bool",
        _set("pools", 0, "spot", "maybe"),
        ["pools[0].spot: Input should be a valid boolean, unable to interpret input (got 'maybe')"],
    ),
    (
        "wrong-type-tag-value",
        _set("pools", 0, "tags", {"team": 1}),
        ["pools[0].tags.team: Input should be a valid string (got 1)"],
    ),
    (
        "max-replicas-above-limit",
        _set("pools", 0, "max_replicas", 20_000),
        ["pools[0].max_replicas: Input should be less than or equal to 10000 (got 20000)"],
    ),
    (
        "negative-desired",
        _set("pools", 0, "desired_replicas", -1),
        ["pools[0].desired_replicas: Input should be greater than or equal to 0 (got -1)"],
    ),
    (
        "priority-above-100",
        _set("slo_classes", 0, "priority", 101),
        ["slo_classes[0].priority: Input should be less than or equal to 100 (got 101)"],
    ),
    (
        "zero-ttft",
        _set("slo_classes", 0, "ttft_ms", 0),
        ["slo_classes[0].ttft_ms: Input should be greater than 0 (got 0)"],
    ),
    (
        "zero-quota",
        _set("tenants", 0, "quotas", {"requests_per_minute": 0}),
        ["tenants[0].quotas.requests_per_minute: Input should be greater than 0 (got 0)"],
    ),
    (
        "headroom-above-1",
        _set("routing", {"slo_headroom": 1.5}),
        ["routing.slo_headroom: Input should be less than or equal to 1 (got 1.5)"],
    ),
    (
        "empty-models",
        _set("models", []),
        ["models: List should have at least 1 item after validation, not 0"],
    ),
    (
        "empty-runs-on",
        _set("models", 0, "variants", 0, "runs_on", []),
        ["models[0].variants[0].runs_on: List should have at least 1 item after validation, not 0"],
    ),
    (
        "unknown-cloud",
        _set("pools", 0, "cloud", "ibm"),
        [
            "pools[0].cloud: Input should be 'aws', 'gcp', 'azure', 'kubernetes' or 'local' "
            "(got 'ibm')"
        ],
    ),
    (
        "unknown-accelerator-kind-in-runs-on",
        _set("models", 0, "variants", 0, "runs_on", ["tpu"]),
        ["models[0].variants[0].runs_on[0]: Input should be 'gpu', 'cpu' or 'npu' (got 'tpu')"],
    ),
    (
        "unknown-forecast-method",
        _set("autoscaling", {"forecast": {"method": "arima"}}),
        [
            "autoscaling.forecast.method: Input should be 'none', 'holt-winters' or "
            "'seasonal-naive' (got 'arima')"
        ],
    ),
    (
        "pool-name-pattern",
        _set("pools", 2, "name", "Bad_Name"),
        [f"pools[2].name: {NAME_PATTERN_MSG} (got 'Bad_Name')"],
    ),
    (
        "long-name-not-echoed",
        _set("pools", 2, "name", "p" * 70),
        [f"pools[2].name: {NAME_PATTERN_MSG}"],
    ),
    (
        "upstream-url-scheme",
        _pool(0, engine="openai-upstream", upstream={"url": "ftp://host/v1", "model": "m"}),
        ["pools[0].upstream.url: String should match pattern '^https?://' (got 'ftp://host/v1')"],
    ),
    (
        "plain-text-api-key",
        _set("tenants", 0, "api_keys", ["env:OK_KEY", "sk-live-0123456789abcdef"]),
        [f"tenants[0].api_keys[1]: {KEY_REF_HELP}"],
    ),
    (
        "no-api-keys",
        _set("tenants", 0, "api_keys", []),
        ["tenants[0].api_keys: List should have at least 1 item after validation, not 0"],
    ),
    # --- cross_check: replicas ---
    (
        "max-below-min",
        _pool(2, min_replicas=3, max_replicas=1),
        ["pools[2].max_replicas: 1 is below min_replicas 3"],
    ),
    (
        "desired-above-max",
        _pool(0, desired_replicas=5),
        ["pools[0].desired_replicas: 5 is outside min_replicas..max_replicas (1..4)"],
    ),
    (
        "desired-below-min",
        _pool(0, min_replicas=2, desired_replicas=1),
        ["pools[0].desired_replicas: 1 is outside min_replicas..max_replicas (2..4)"],
    ),
    (
        "max-below-min-and-desired",
        _pool(0, min_replicas=3, max_replicas=1, desired_replicas=2),
        [
            "pools[0].max_replicas: 1 is below min_replicas 3",
            "pools[0].desired_replicas: 2 is outside min_replicas..max_replicas (3..1)",
        ],
    ),
    # --- duplicates ---
    (
        "duplicate-pool",
        _append("pools", BASE["pools"][2]),
        ["pools[3].name: duplicate name 'aws-cpu' (also pools[2])"],
    ),
    (
        "duplicate-model",
        _all(
            _append("models", BASE["models"][1]),
            _set("models", 2, "parameters_b", 1.0),
        ),
        ["models[2].name: duplicate name 'tiny' (also models[1])"],
    ),
    (
        "duplicate-tenant",
        _append("tenants", BASE["tenants"][0]),
        ["tenants[1].name: duplicate name 'team-a' (also tenants[0])"],
    ),
    (
        "duplicate-slo-class",
        _append("slo_classes", {"name": "standard", "priority": 5, "ttft_ms": 1, "tpot_ms": 1}),
        ["slo_classes[2].name: duplicate name 'standard' (also slo_classes[1])"],
    ),
    (
        "duplicate-variant",
        lambda d: d["models"][0]["variants"].append({"name": "bf16", "precision": "fp16"}),
        ["models[0].variants[2].name: duplicate variant 'bf16'"],
    ),
    (
        "duplicate-priority",
        _set("slo_classes", 1, "priority", 0),
        ["slo_classes[1].priority: priority 0 is already used by class 'critical'"],
    ),
    # --- references ---
    (
        "unknown-model",
        _set("pools", 2, "serves", "model", "nope"),
        ["pools[2].serves.model: no model named 'nope' (known: 'llama-8b', 'tiny')"],
    ),
    (
        "unknown-variant",
        _set("pools", 2, "serves", "variant", "bf16"),
        ["pools[2].serves.variant: no variant of model 'tiny' named 'bf16' (known: 'q4')"],
    ),
    (
        "tenant-unknown-classes-models-pools",
        lambda d: d["tenants"][0].update(
            default_priority="gold",
            max_priority="platinum",
            allowed_models=["tiny", "gpt-9"],
            allowed_pools=["nowhere"],
        ),
        [
            "tenants[0].default_priority: no SLO class named 'gold' (known: 'critical', "
            "'standard')",
            "tenants[0].max_priority: no SLO class named 'platinum' (known: 'critical', "
            "'standard')",
            "tenants[0].allowed_models[1]: no model named 'gpt-9' (known: 'llama-8b', 'tiny')",
            "tenants[0].allowed_pools[0]: no pool named 'nowhere' (known: 'aws-cpu', "
            "'aws-gpu', 'gcp-l4')",
        ],
    ),
    (
        "tenant-default-above-max",
        lambda d: d["tenants"][0].update(default_priority="critical", max_priority="standard"),
        [
            "tenants[0].default_priority: 'critical' (priority 0) is more important than "
            "max_priority 'standard' (priority 1)"
        ],
    ),
    # --- spot, on-demand base, fallback ---
    (
        "on-demand-base-on-non-spot",
        _pool(0, on_demand_base=2),
        ["pools[0].on_demand_base: only spot pools have an on-demand base"],
    ),
    (
        "on-demand-base-above-max",
        _pool(1, on_demand_base=5),
        ["pools[1].on_demand_base: 5 exceeds max_replicas 4"],
    ),
    (
        "fallback-on-non-spot-pool",
        _pool(2, fallback_pool="aws-gpu"),
        ["pools[2].fallback_pool: only spot pools name an on-demand fallback"],
    ),
    (
        "fallback-unknown",
        _pool(1, fallback_pool="nope"),
        ["pools[1].fallback_pool: no pool named 'nope' (known: 'aws-cpu', 'aws-gpu', 'gcp-l4')"],
    ),
    (
        "fallback-is-spot",
        _all(_pool(0, spot=True), _pool(1, fallback_pool="aws-gpu")),
        ["pools[1].fallback_pool: pool 'aws-gpu' is spot; a fallback must be on-demand"],
    ),
    (
        "fallback-is-itself",
        _pool(1, fallback_pool="gcp-l4"),
        ["pools[1].fallback_pool: pool 'gcp-l4' is spot; a fallback must be on-demand"],
    ),
    (
        "fallback-serves-other-model",
        _pool(1, fallback_pool="aws-cpu"),
        ["pools[1].fallback_pool: pool 'aws-cpu' serves model 'tiny', not 'llama-8b'"],
    ),
    # --- engine and upstream ---
    (
        "upstream-required",
        _pool(0, engine="openai-upstream"),
        ["pools[0].upstream: required when engine is 'openai-upstream'"],
    ),
    (
        "upstream-forbidden",
        _pool(0, upstream={"url": "http://127.0.0.1:8000/v1", "model": "m"}),
        ["pools[0].upstream: only allowed when engine is 'openai-upstream'"],
    ),
    # --- placement and price ---
    (
        "local-without-priced-as",
        _pool(2, cloud="local", region="local", instance_type="local"),
        ["pools[2].priced_as: required for local pools (the catalog instance it is priced as)"],
    ),
    (
        "kubernetes-without-priced-as",
        _pool(2, cloud="kubernetes", region="eks-test"),
        [
            "pools[2].priced_as: required for kubernetes pools (the catalog instance it is "
            "priced as)"
        ],
    ),
    (
        "aws-with-priced-as",
        _pool(2, priced_as={"cloud": "aws", "region": "us-east-1", "instance_type": "m7g.large"}),
        [
            "pools[2].priced_as: not allowed for aws pools: they are priced as their own instance type"
        ],
    ),
    (
        "local-declared-gpu",
        _pool(
            2,
            cloud="local",
            region="local",
            instance_type="local",
            accelerator_kind="gpu",
            priced_as={"cloud": "aws", "region": "us-east-1", "instance_type": "g5.xlarge"},
        ),
        ["pools[2].accelerator_kind: local pools run on this machine's CPUs, not 'gpu'"],
    ),
    (
        "accelerator-kind-disagrees-gpu",
        _pool(0, accelerator_kind="cpu"),
        [
            "pools[0].accelerator_kind: 'cpu' disagrees with the catalog: g5.xlarge in "
            "us-east-1 is 'gpu' (1 x A10G)"
        ],
    ),
    (
        "accelerator-kind-disagrees-cpu",
        _pool(2, accelerator_kind="gpu"),
        [
            "pools[2].accelerator_kind: 'gpu' disagrees with the catalog: m7g.large in "
            "us-east-1 is 'cpu'"
        ],
    ),
    (
        "accelerator-count-disagrees",
        _pool(0, accelerator_count=2),
        ["pools[0].accelerator_count: 2 disagrees with the catalog: g5.xlarge has 1"],
    ),
    (
        "kubernetes-accelerator-kind-disagrees",
        _pool(
            0,
            cloud="kubernetes",
            region="eks-test",
            instance_type="g6.xlarge",
            accelerator_kind="npu",
            priced_as={"cloud": "aws", "region": "us-east-1", "instance_type": "g6.xlarge"},
        ),
        [
            "pools[0].accelerator_kind: 'npu' disagrees with the catalog: g6.xlarge in "
            "us-east-1 is 'gpu' (1 x L4)"
        ],
    ),
    (
        "spot-without-spot-price",
        _all(NO_FALLBACK, _pool(0, instance_type="p5.4xlarge", spot=True)),
        ["pools[0].spot: p5.4xlarge has no spot price in us-east-1"],
    ),
    (
        "on-demand-without-on-demand-price-p5e",
        _pool(0, instance_type="p5e.48xlarge", region="us-east-2"),
        ["pools[0].spot: p5e.48xlarge has no on-demand price in us-east-2; only spot is offered"],
    ),
    (
        "on-demand-without-on-demand-price-p5e-usw2",
        _pool(0, instance_type="p5e.48xlarge", region="us-west-2"),
        ["pools[0].spot: p5e.48xlarge has no on-demand price in us-west-2; only spot is offered"],
    ),
    (
        "spot-with-on-demand-base-without-on-demand-price",
        _all(
            NO_FALLBACK,
            _pool(
                0,
                instance_type="trn2.48xlarge",
                region="us-east-2",
                spot=True,
                on_demand_base=1,
                serves={"model": "tiny", "variant": "q4"},
            ),
            lambda d: d["models"][1]["variants"][0].update(runs_on=["cpu", "npu"]),
        ),
        ["pools[0].spot: trn2.48xlarge has no on-demand price in us-east-2; only spot is offered"],
    ),
    (
        "spot-only-type-as-spot-is-fine-but-runs-on-excludes-npu",
        _all(NO_FALLBACK, _pool(0, instance_type="trn2.48xlarge", region="us-east-2", spot=True)),
        ["pools[0].serves.variant: variant 'bf16' runs on gpu, not on npu pools"],
    ),
    (
        "runs-on-excludes-cpu",
        _set("pools", 2, "serves", {"model": "llama-8b", "variant": "bf16"}),
        ["pools[2].serves.variant: variant 'bf16' runs on gpu, not on cpu pools"],
    ),
    (
        "runs-on-excludes-gpu",
        _all(NO_FALLBACK, _set("pools", 0, "serves", {"model": "tiny", "variant": "q4"})),
        ["pools[0].serves.variant: variant 'q4' runs on cpu, not on gpu pools"],
    ),
    (
        "local-runs-on-excludes-cpu",
        _all(
            _pool(
                2,
                cloud="local",
                region="local",
                instance_type="local",
                priced_as={"cloud": "aws", "region": "us-east-1", "instance_type": "g5.xlarge"},
            ),
            _set("pools", 2, "serves", {"model": "llama-8b", "variant": "bf16"}),
        ),
        ["pools[2].serves.variant: variant 'bf16' runs on gpu, not on cpu pools"],
    ),
    # --- rollouts (models[i].rollout): shapes first, then cross-checks ---
    (
        "rollout-missing-candidate",
        lambda d: _rollout(d, candidate=DELETE),
        ["models[0].rollout.candidate: required field is missing"],
    ),
    (
        "rollout-unknown-key",
        lambda d: _rollout(d, percent=5),
        ["models[0].rollout.percent: unknown key (not part of the fleet spec)"],
    ),
    (
        "rollout-unknown-strategy",
        lambda d: _rollout(d, strategy="linear"),
        [
            "models[0].rollout.strategy: Input should be 'replace', 'canary' or 'shadow' "
            "(got 'linear')"
        ],
    ),
    (
        "rollout-step-above-100",
        lambda d: _rollout(d, steps=[5, 150]),
        ["models[0].rollout.steps[1]: Input should be less than or equal to 100 (got 150)"],
    ),
    (
        "rollout-step-zero",
        lambda d: _rollout(d, steps=[0, 50]),
        ["models[0].rollout.steps[0]: Input should be greater than 0 (got 0)"],
    ),
    (
        "rollout-no-steps",
        lambda d: _rollout(d, steps=[]),
        ["models[0].rollout.steps: List should have at least 1 item after validation, not 0"],
    ),
    (
        "rollout-ttft-ratio-below-one",
        lambda d: _rollout(d, ttft_ratio=0.9),
        ["models[0].rollout.ttft_ratio: Input should be greater than or equal to 1 (got 0.9)"],
    ),
    (
        "rollout-sample-fraction-zero",
        lambda d: _rollout(d, strategy="shadow", sample_fraction=0),
        ["models[0].rollout.sample_fraction: Input should be greater than 0 (got 0)"],
    ),
    (
        "rollout-steps-decrease",
        lambda d: _rollout(d, steps=[5, 50, 25]),
        ["models[0].rollout.steps: must increase: step 3 (25 %) follows 50 %"],
    ),
    (
        "rollout-steps-repeat",
        lambda d: _rollout(d, steps=[10, 10, 100]),
        ["models[0].rollout.steps: must increase: step 2 (10 %) follows 10 %"],
    ),
    (
        "rollout-only-step-is-100",
        lambda d: _rollout(d, steps=[100]),
        [
            "models[0].rollout.steps: needs a step below 100 %, where both versions serve and "
            "can be compared (use strategy 'replace' for a straight switch)"
        ],
    ),
    (
        "rollout-unknown-versions",
        lambda d: _rollout(d, stable="fp16", candidate="fp8"),
        [
            "models[0].rollout.stable: no variant of model 'llama-8b' named 'fp16' "
            "(known: 'bf16', 'int4')",
            "models[0].rollout.candidate: no variant of model 'llama-8b' named 'fp8' "
            "(known: 'bf16', 'int4')",
        ],
    ),
    (
        "rollout-candidate-is-stable",
        lambda d: _rollout(d, candidate="bf16"),
        [
            "models[0].rollout.candidate: same as stable ('bf16'); a rollout moves traffic "
            "between two variants"
        ],
    ),
    (
        "rollout-candidate-not-served",
        _all(_add_variant(0, INT8), lambda d: _rollout(d, candidate="int8")),
        [
            "models[0].rollout.candidate: no pool serves llama-8b/int8; the candidate needs a "
            "pool to run on"
        ],
    ),
    (
        "rollout-candidate-not-served-replace-too",
        _all(_add_variant(0, INT8), lambda d: _rollout(d, candidate="int8", strategy="replace")),
        [
            "models[0].rollout.candidate: no pool serves llama-8b/int8; the candidate needs a "
            "pool to run on"
        ],
    ),
    (
        "rollout-stable-not-served-canary",
        _all(_add_variant(0, INT8), lambda d: _rollout(d, stable="int8", candidate="bf16")),
        [
            "models[0].rollout.stable: no pool serves llama-8b/int8; a canary rollout runs both "
            "versions side by side"
        ],
    ),
    (
        "rollout-stable-not-served-shadow",
        _all(
            _add_variant(0, INT8),
            lambda d: _rollout(d, stable="int8", candidate="bf16", strategy="shadow"),
        ),
        [
            "models[0].rollout.stable: no pool serves llama-8b/int8; a shadow rollout runs both "
            "versions side by side"
        ],
    ),
    (
        "rollout-fields-of-other-strategies",
        lambda d: _rollout(
            d, strategy="shadow", steps=[10, 100], min_requests=50, drain_s=5, sample_fraction=0.1
        ),
        [
            "models[0].rollout.steps: only used when strategy is 'canary'",
            "models[0].rollout.min_requests: only used when strategy is 'canary'",
            "models[0].rollout.drain_s: only used when strategy is 'replace'",
        ],
    ),
    (
        "rollout-on-second-model",
        lambda d: d["models"][1].update(
            rollout={"stable": "q4", "candidate": "q8", "strategy": "replace"}
        ),
        ["models[1].rollout.candidate: no variant of model 'tiny' named 'q8' (known: 'q4')"],
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [pytest.param(m, e, id=i) for i, m, e in CASES])
def test_error_messages(mutate: Mutation, expected: list[str]) -> None:
    data = fleet()
    mutate(data)
    assert issue_lines(data) == expected


def test_case_ids_are_unique() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


def test_misspelt_instance_type_suggests_close_match() -> None:
    data = fleet()
    data["pools"][0]["instance_type"] = "g5.xlarg"
    [line] = issue_lines(data)
    assert re.fullmatch(
        r"pools\[0\]\.instance_type: no aws instance type 'g5\.xlarg' in the catalog; "
        r"did you mean g5\.xlarge(, [\w.-]+){0,2}\?",
        line,
    ), line


def test_unknown_instance_type_without_close_match_counts_known_types() -> None:
    data = fleet()
    data["pools"][0]["instance_type"] = "zzzzzzzz"
    [line] = issue_lines(data)
    match = re.fullmatch(
        r"pools\[0\]\.instance_type: no aws instance type 'zzzzzzzz' in the catalog "
        r"\((\d+) known aws types\)",
        line,
    )
    assert match, line
    assert int(match[1]) == len(default_catalog().instance_types("aws"))


def test_wrong_region_names_the_region_and_lists_where_offered() -> None:
    data = fleet()
    data["pools"][0]["region"] = "eu-central-2"
    [line] = issue_lines(data)
    match = re.fullmatch(
        r"pools\[0\]\.region: aws g5\.xlarge is not offered in region 'eu-central-2'; "
        r"it is in (\d+) region\(s\): (.+)",
        line,
    )
    assert match, line
    listed = match[2].split(", ")
    assert "us-east-1" in listed
    assert listed == default_catalog().regions("aws", "g5.xlarge")
    assert int(match[1]) == len(listed)


def test_wrong_region_close_to_a_real_one_gets_a_hint() -> None:
    data = fleet()
    data["pools"][2]["region"] = "us-east-9"
    [line] = issue_lines(data)
    assert line.startswith(
        "pools[2].region: aws m7g.large is not offered in region 'us-east-9' (did you mean us-east-"
    ), line


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("region", "us-east-9", "pools[2].priced_as.region"),
        ("instance_type", "m7g.larg", "pools[2].priced_as.instance_type"),
    ],
)
def test_priced_as_lookup_errors_point_into_priced_as(field: str, value: str, path: str) -> None:
    data = fleet()
    ref = {"cloud": "aws", "region": "us-east-1", "instance_type": "m7g.large", field: value}
    data["pools"][2].update(cloud="kubernetes", region="eks-test", priced_as=ref)
    [line] = issue_lines(data)
    assert line.startswith(f"{path}: ")
    assert f"'{value}'" in line


def test_variant_that_does_not_fit_names_gb() -> None:
    data = fleet()
    data["models"].append(copy.deepcopy(LLAMA_70B))
    data["pools"][0]["serves"] = {"model": "llama-70b", "variant": "bf16"}
    del data["pools"][1]["fallback_pool"]  # it would now serve another model than aws-gpu
    [line] = issue_lines(data)
    # 70.6e9 params x 2 bytes; KV: 2 x 80 layers x 8 heads x 128 dims x 2 bytes x 4096 tokens.
    assert re.fullmatch(
        r"pools\[0\]\.serves\.variant: llama-70b/bf16 does not fit on g5\.xlarge: "
        r"needs 142\.5 GB \(weights 141\.2 GB \+ KV 1\.3 GB for 1 x 4096 tokens\), "
        r"1x A10G has (\d+\.\d) GB usable",
        line,
    ), line
    usable = float(re.search(r"has (\d+\.\d) GB usable", line)[1])  # type: ignore[index]
    assert 0 < usable <= 24.0  # an A10G has 24 GB


def test_fit_is_checked_for_kubernetes_pools_against_priced_as() -> None:
    data = fleet()
    data["models"].append(copy.deepcopy(LLAMA_70B))
    data["pools"][0].update(
        cloud="kubernetes",
        region="eks-test",
        instance_type="g6.xlarge",
        priced_as={"cloud": "aws", "region": "us-east-1", "instance_type": "g6.xlarge"},
        serves={"model": "llama-70b", "variant": "bf16"},
    )
    del data["pools"][1]["fallback_pool"]
    [line] = issue_lines(data)
    assert line.startswith(
        "pools[0].serves.variant: llama-70b/bf16 does not fit on g6.xlarge: needs 142.5 GB"
    ), line


def test_unknown_list_is_truncated_after_eight_names() -> None:
    data = fleet()
    for n in range(7):
        pool = copy.deepcopy(BASE["pools"][2])
        pool["name"] = f"cpu-{n}"
        data["pools"].append(pool)
    data["pools"][1]["fallback_pool"] = "ghost"
    assert issue_lines(data) == [
        "pools[1].fallback_pool: no pool named 'ghost' (known: 'aws-cpu', 'aws-gpu', "
        "'cpu-0', 'cpu-1', 'cpu-2', 'cpu-3', 'cpu-4', 'cpu-5' ...)"
    ]


def test_not_a_mapping() -> None:
    assert issue_lines([1, 2]) == ["a fleet spec must be a mapping, not list"]
    assert issue_lines("name: x") == ["a fleet spec must be a mapping, not str"]


def test_custom_catalog_is_used() -> None:
    full = default_catalog()
    records = [full.get("aws", "us-east-1", t) for t in ("g5.xlarge", "m7g.large")]
    small = Catalog(records)
    assert issue_lines(fleet(), catalog=small) == [
        "pools[1].instance_type: no gcp instance type 'g2-standard-8' in the catalog "
        "(0 known gcp types)"
    ]
    data = fleet()
    data["pools"].pop(1)
    assert parse_fleet(data, catalog=small).pools[1].name == "aws-cpu"


def test_empty_custom_catalog_is_not_replaced_by_default() -> None:
    with pytest.raises(FleetSpecError):
        parse_fleet(fleet(), catalog=Catalog([]))


def test_cross_check_returns_issues_without_raising() -> None:
    spec = parse_fleet(fleet())
    assert cross_check(spec, default_catalog()) == []
    bad_pool = spec.pools[2].model_copy(update={"max_replicas": 0, "desired_replicas": 5})
    bad = spec.model_copy(update={"pools": [*spec.pools[:2], bad_pool]})
    assert [str(i) for i in cross_check(bad, default_catalog())] == [
        "pools[2].max_replicas: 0 is below min_replicas 1",
        "pools[2].desired_replicas: 5 is outside min_replicas..max_replicas (1..0)",
    ]


# --------------------------------------------------------------------------------------------
# Plain-text keys


def test_plain_text_key_is_refused_without_echoing_it() -> None:
    data = fleet()
    secret = "sk-proj-abcdefghijklmnop"
    data["tenants"][0]["api_keys"] = [secret]
    with pytest.raises(FleetSpecError) as excinfo:
        parse_fleet(data)
    assert [str(i) for i in excinfo.value.issues] == [f"tenants[0].api_keys[0]: {KEY_REF_HELP}"]
    assert secret not in str(excinfo.value)


def test_plain_text_key_as_bare_string_is_not_echoed() -> None:
    data = fleet()
    secret = "sk-proj-abcdefghijklmnop"
    data["tenants"][0]["api_keys"] = secret
    with pytest.raises(FleetSpecError) as excinfo:
        parse_fleet(data)
    assert secret not in str(excinfo.value)


def test_key_reference_with_trailing_newline_is_refused() -> None:
    data = fleet()
    data["tenants"][0]["api_keys"] = ["env:TEAM_A_KEY\n"]
    assert issue_lines(data) == [f"tenants[0].api_keys[0]: {KEY_REF_HELP}"]


@pytest.mark.parametrize(
    "key",
    [
        "env:TEAM_A_KEY",
        "env:_x1",
        "file:/run/secrets/key",
        "config:searchApiKey",
        "config:fleetform:key.v1-x",
        "sha256:" + "0123456789abcdef" * 4,
    ],
)
def test_key_reference_forms_are_accepted(key: str) -> None:
    data = fleet()
    data["tenants"][0]["api_keys"] = [key]
    assert parse_fleet(data).tenants[0].api_keys == [key]


@pytest.mark.parametrize(
    "key",
    [
        "sk-abc123",
        "env:1ABC",
        "env:",
        "env:A-B",
        "file:",
        "config:",
        "config:a b",
        "sha256:" + "0123456789ABCDEF" * 4,
        "sha256:" + "0" * 63,
        "sha256:" + "0" * 65,
        "ENV:KEY",
        " env:KEY",
    ],
)
def test_non_reference_keys_are_refused(key: str) -> None:
    data = fleet()
    data["tenants"][0]["api_keys"] = ["env:GOOD", "env:GOOD_TOO", key]
    assert issue_lines(data) == [f"tenants[0].api_keys[2]: {KEY_REF_HELP}"]


# --------------------------------------------------------------------------------------------
# FleetSpecError formatting and reporting everything at once


def test_error_str_without_source_is_one_line_per_issue() -> None:
    error = FleetSpecError(
        [Issue("pools[0].name", "bad"), Issue("", "whole spec"), Issue("a", "b")]
    )
    assert str(error) == "pools[0].name: bad\nwhole spec\na: b"


def test_error_str_with_source_has_a_header() -> None:
    error = FleetSpecError([Issue("x", "one"), Issue("y.z", "two")], "fleet.yaml")
    assert str(error) == "fleet.yaml: 2 problems\n  x: one\n  y.z: two"
    single = FleetSpecError([Issue("x", "one")], "fleet.yaml")
    assert str(single) == "fleet.yaml: 1 problem\n  x: one"
    assert error.source == "fleet.yaml"
    assert error.issues == [Issue("x", "one"), Issue("y.z", "two")]


def test_parse_fleet_source_reaches_the_error() -> None:
    data = fleet()
    data["pools"][0]["max_replicas"] = 0
    with pytest.raises(FleetSpecError) as excinfo:
        parse_fleet(data, source="stacks/x.yaml")
    assert str(excinfo.value) == (
        "stacks/x.yaml: 1 problem\n  pools[0].max_replicas: 0 is below min_replicas 1"
    )


def test_all_cross_check_problems_are_reported_at_once() -> None:
    data = fleet()
    data["pools"][0]["max_replicas"] = 0
    data["pools"][1]["fallback_pool"] = "ghost"
    data["pools"][2]["accelerator_kind"] = "npu"
    data["tenants"][0]["default_priority"] = "gold"
    data["slo_classes"][1]["priority"] = 0
    with pytest.raises(FleetSpecError) as excinfo:
        parse_fleet(data, source="f.yaml")
    assert str(excinfo.value) == "\n".join(
        [
            "f.yaml: 5 problems",
            "  slo_classes[1].priority: priority 0 is already used by class 'critical'",
            "  pools[0].max_replicas: 0 is below min_replicas 1",
            "  pools[1].fallback_pool: no pool named 'ghost' (known: 'aws-cpu', 'aws-gpu', "
            "'gcp-l4')",
            "  pools[2].accelerator_kind: 'npu' disagrees with the catalog: m7g.large in "
            "us-east-1 is 'cpu'",
            "  tenants[0].default_priority: no SLO class named 'gold' (known: 'critical', "
            "'standard')",
        ]
    )


def test_all_shape_problems_are_reported_at_once() -> None:
    data = fleet()
    data["pools"][0]["flavour"] = "x"
    data["pools"][1]["min_replicas"] = -1
    data["tenants"][0]["api_keys"] = ["hunter2"]
    del data["slo_classes"][0]["ttft_ms"]
    assert issue_lines(data) == [
        "pools[0].flavour: unknown key (not part of the fleet spec)",
        "pools[1].min_replicas: Input should be greater than or equal to 0 (got -1)",
        f"tenants[0].api_keys[0]: {KEY_REF_HELP}",
        "slo_classes[0].ttft_ms: required field is missing",
    ]


# --------------------------------------------------------------------------------------------
# with_replicas and fleet_from_stack_config


def test_with_replicas_sets_desired_and_leaves_original() -> None:
    spec = parse_fleet(fleet())
    scaled = spec.with_replicas({"aws-gpu": 4, "gcp-l4": 0})
    assert [p.replicas for p in scaled.pools] == [4, 0, 1]
    assert scaled.pool("aws-gpu").desired_replicas == 4
    assert [p.replicas for p in spec.pools] == [1, 0, 1]
    assert spec.pool("aws-gpu").desired_replicas is None


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        (
            {"ghost": 1},
            [
                "fleetform:replicas.ghost: no pool named 'ghost' (known: 'aws-cpu', 'aws-gpu', "
                "'gcp-l4')"
            ],
        ),
        (
            {"aws-gpu": 5},
            ["fleetform:replicas.aws-gpu: 5 is outside min_replicas..max_replicas (1..4)"],
        ),
        (
            {"aws-cpu": 0},
            ["fleetform:replicas.aws-cpu: 0 is outside min_replicas..max_replicas (1..2)"],
        ),
        ({"aws-gpu": True}, ["fleetform:replicas.aws-gpu: must be a whole number (got True)"]),
        ({"aws-gpu": 2.0}, ["fleetform:replicas.aws-gpu: must be a whole number (got 2.0)"]),
        ({"aws-gpu": "2"}, ["fleetform:replicas.aws-gpu: must be a whole number (got '2')"]),
        (
            {"aws-gpu": -1, "ghost": 1, "aws-cpu": 2},
            [
                "fleetform:replicas.aws-gpu: -1 is outside min_replicas..max_replicas (1..4)",
                "fleetform:replicas.ghost: no pool named 'ghost' (known: 'aws-cpu', "
                "'aws-gpu', 'gcp-l4')",
            ],
        ),
    ],
)
def test_with_replicas_errors(replicas: dict[str, Any], expected: list[str]) -> None:
    spec = parse_fleet(fleet())
    with pytest.raises(FleetSpecError) as excinfo:
        spec.with_replicas(replicas)
    assert [str(i) for i in excinfo.value.issues] == expected


def test_fleet_from_stack_config_missing_fleet() -> None:
    with pytest.raises(FleetSpecError) as excinfo:
        fleet_from_stack_config({"aws:region": "us-east-1"}, source="Pulumi.x.yaml")
    assert str(excinfo.value) == (
        "Pulumi.x.yaml: 1 problem\n  config.fleetform:fleet: required key is missing"
    )


def test_fleet_from_stack_config_prefixes_paths() -> None:
    data = fleet()
    data["pools"][0]["flavour"] = "x"
    data["name"] = "Bad"
    with pytest.raises(FleetSpecError) as excinfo:
        fleet_from_stack_config({FLEET_CONFIG_KEY: data})
    assert [str(i) for i in excinfo.value.issues] == [
        f"config.fleetform:fleet.name: {NAME_PATTERN_MSG} (got 'Bad')",
        "config.fleetform:fleet.pools[0].flavour: unknown key (not part of the fleet spec)",
    ]


def test_fleet_from_stack_config_not_a_mapping() -> None:
    with pytest.raises(FleetSpecError) as excinfo:
        fleet_from_stack_config({FLEET_CONFIG_KEY: [1]})
    assert [str(i) for i in excinfo.value.issues] == [
        "config.fleetform:fleet: a fleet spec must be a mapping, not list"
    ]


def test_fleet_from_stack_config_accepts_json_text_and_applies_replicas() -> None:
    spec = fleet_from_stack_config(
        {FLEET_CONFIG_KEY: json.dumps(fleet()), REPLICAS_CONFIG_KEY: '{"aws-gpu": 3}'}
    )
    assert spec == parse_fleet(fleet()).with_replicas({"aws-gpu": 3})
    assert spec.pool("aws-gpu").replicas == 3
    spec = fleet_from_stack_config({FLEET_CONFIG_KEY: fleet(), REPLICAS_CONFIG_KEY: {"aws-cpu": 2}})
    assert [p.replicas for p in spec.pools] == [1, 0, 2]


def test_fleet_from_stack_config_replicas_errors() -> None:
    with pytest.raises(FleetSpecError) as excinfo:
        fleet_from_stack_config({FLEET_CONFIG_KEY: fleet(), REPLICAS_CONFIG_KEY: 5}, source="s")
    assert str(excinfo.value) == (
        "s: 1 problem\n  config.fleetform:replicas: must map pool names to replica counts"
    )
    with pytest.raises(FleetSpecError) as excinfo:
        fleet_from_stack_config(
            {FLEET_CONFIG_KEY: fleet(), REPLICAS_CONFIG_KEY: {"aws-gpu": 9}}, source="s"
        )
    assert str(excinfo.value) == (
        "s: 1 problem\n"
        "  config.fleetform:replicas.aws-gpu: 9 is outside min_replicas..max_replicas (1..4)"
    )


@pytest.mark.parametrize(
    "config",
    [
        {FLEET_CONFIG_KEY: '{"name": "x", '},
        {FLEET_CONFIG_KEY: BASE, REPLICAS_CONFIG_KEY: '{"aws-gpu": ['},
    ],
    ids=["fleet-text", "replicas-text"],
)
def test_fleet_from_stack_config_malformed_text_is_a_spec_error(config: dict[str, Any]) -> None:
    with pytest.raises(FleetSpecError):
        fleet_from_stack_config(config)


@pytest.mark.parametrize("replicas", [0, []], ids=["zero", "empty-list"])
def test_fleet_from_stack_config_falsy_non_mapping_replicas(replicas: Any) -> None:
    with pytest.raises(FleetSpecError):
        fleet_from_stack_config({FLEET_CONFIG_KEY: fleet(), REPLICAS_CONFIG_KEY: replicas})


# --------------------------------------------------------------------------------------------
# load_stack_file


def _load_error(path: Path) -> FleetSpecError:
    with pytest.raises(FleetSpecError) as excinfo:
        load_stack_file(path)
    assert excinfo.value.source == str(path)
    return excinfo.value


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert str(_load_error(path)) == f"{path}: 1 problem\n  file not found"


def test_load_directory(tmp_path: Path) -> None:
    assert str(_load_error(tmp_path)) == f"{tmp_path}: 1 problem\n  cannot read: Is a directory"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "config:\n  fleetform:fleet:\n    name: x\n   bad: indent\n",
            "invalid YAML: line 4, column 4: expected <block end>, but found "
            "'<block mapping start>'",
        ),
        ("a: b\n  c: d\n", "invalid YAML: line 2, column 4: mapping values are not allowed here"),
        (
            "config:\n  fleetform:fleet: {name: [a, b\n",
            "invalid YAML: line 3, column 1: expected ',' or ']', but got '<stream end>'",
        ),
    ],
    ids=["bad-indent", "mapping-in-scalar", "unclosed-flow"],
)
def test_load_invalid_yaml_names_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    assert [str(i) for i in _load_error(path).issues] == [message]


@pytest.mark.parametrize(
    "text",
    ["", "- a\n- b\n", "config: 3\n", "config: [a]\n", "stack: {}\n"],
    ids=["empty", "list", "scalar-config", "list-config", "no-config"],
)
def test_load_without_config_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text, encoding="utf-8")
    assert [str(i) for i in _load_error(path).issues] == [
        "config: a stack file has a top-level 'config:' mapping holding 'fleetform:fleet:'"
    ]


def test_load_without_fleet(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("config:\n  aws:region: us-east-1\n", encoding="utf-8")
    assert [str(i) for i in _load_error(path).issues] == [
        "config.fleetform:fleet: required key is missing"
    ]


def test_load_replicas_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(stack_text(fleet(), replicas=["aws-gpu", 2]), encoding="utf-8")
    assert str(_load_error(path)) == (
        f"{path}: 1 problem\n  config.fleetform:replicas: must map pool names to replica counts"
    )


def test_load_spec_errors_carry_file_and_full_path(tmp_path: Path) -> None:
    data = fleet()
    del data["models"]
    data["pools"][0]["max_replicas"] = "many"
    path = tmp_path / "s.yaml"
    path.write_text(stack_text(data), encoding="utf-8")
    assert str(_load_error(path)) == "\n".join(
        [
            f"{path}: 2 problems",
            "  config.fleetform:fleet.models: required field is missing",
            "  config.fleetform:fleet.pools[0].max_replicas: Input should be a valid integer, "
            "unable to parse string as an integer (got 'many')",
        ]
    )


def test_load_applies_replicas(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(stack_text(fleet(), replicas={"aws-gpu": 2, "gcp-l4": 3}), encoding="utf-8")
    spec = load_stack_file(str(path))
    assert [p.replicas for p in spec.pools] == [2, 3, 1]


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_bytes(b"config:\n  x: \xff\xfe\n")
    _load_error(path)


def test_load_yaml_reader_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text('key: "\x01"\n', encoding="utf-8")
    [issue] = _load_error(path).issues
    assert "\n" not in issue.message


# --------------------------------------------------------------------------------------------
# Lookups and derived values


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("model", "no model named 'zzz'"),
        ("pool", "no pool named 'zzz'"),
        ("tenant", "no tenant named 'zzz'"),
        ("slo_class", "no SLO class named 'zzz'"),
    ],
)
def test_lookup_unknown_name_raises_key_error(method: str, message: str) -> None:
    spec = parse_fleet(fleet())
    with pytest.raises(KeyError) as excinfo:
        getattr(spec, method)("zzz")
    assert excinfo.value.args == (message,)


def test_lookups_find_items() -> None:
    spec = parse_fleet(fleet())
    assert spec.model("tiny").parameters_b == 0.135
    assert spec.pool("aws-cpu").instance_type == "m7g.large"
    assert spec.tenant("team-a").default_priority == "standard"
    assert spec.slo_class("standard").priority == 1
    model, variant = spec.pool_variant(spec.pool("gcp-l4"))
    assert (model.name, variant.name) == ("llama-8b", "int4")


def test_unknown_variant_lookups_raise_key_error() -> None:
    spec = parse_fleet(fleet())
    with pytest.raises(KeyError):
        spec.model("tiny").variant("fp16")
    detached = spec.pools[0].model_copy(update={"serves": ServesSpec(model="tiny", variant="x")})
    with pytest.raises(KeyError):
        spec.pool_variant(detached)


def test_replicas_defaults_to_min_replicas() -> None:
    data = fleet()
    data["pools"][0].update(min_replicas=2, max_replicas=4)
    data["pools"][2]["desired_replicas"] = 2
    spec = parse_fleet(data)
    assert spec.pool("aws-gpu").replicas == 2
    assert spec.pool("aws-gpu").desired_replicas is None
    assert spec.pool("aws-cpu").replicas == 2
    data["pools"][0]["desired_replicas"] = 3
    assert parse_fleet(data).pool("aws-gpu").replicas == 3


def test_price_ref() -> None:
    data = fleet()
    data["pools"][2].update(
        cloud="local",
        region="local",
        instance_type="local",
        priced_as={"cloud": "aws", "region": "us-west-2", "instance_type": "m7g.large"},
    )
    spec = parse_fleet(data)
    assert spec.pool("aws-gpu").price_ref == CatalogRef(
        cloud="aws", region="us-east-1", instance_type="g5.xlarge"
    )
    assert spec.pool("gcp-l4").price_ref == CatalogRef(
        cloud="gcp", region="us-central1", instance_type="g2-standard-8"
    )
    assert spec.pool("aws-cpu").price_ref == CatalogRef(
        cloud="aws", region="us-west-2", instance_type="m7g.large"
    )


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        ("fp32", 32.12e9),
        ("bf16", 16.06e9),
        ("fp16", 16.06e9),
        ("fp8", 8.03e9),
        ("int8", 8.03e9),
        ("int4", 4.516875e9),  # 4.5 effective bits
    ],
)
def test_weight_bytes_from_parameters(precision: str, expected: float) -> None:
    data = fleet()
    data["models"][0]["variants"].append({"name": "unserved", "precision": precision})
    model = parse_fleet(data).model("llama-8b")
    assert model.weight_bytes(model.variant("unserved")) == pytest.approx(expected, rel=1e-12)


def test_weight_bytes_explicit_wins() -> None:
    spec = parse_fleet(fleet())
    tiny = spec.model("tiny")
    assert tiny.weight_bytes(tiny.variant("q4")) == 540_000_000.0
    # 0.135e9 x 0.5625 would be 75.9 MB: the explicit figure is used instead.
    assert tiny.parameters == pytest.approx(135e6)


def test_kv_bytes_per_token() -> None:
    spec = parse_fleet(fleet())
    llama = spec.model("llama-8b")
    assert llama.kv_bytes_per_token() == 131_072  # 2 x 32 x 8 x 128 x 2
    assert llama.kv_bytes_per_token(4.0) == 262_144
    assert spec.model("tiny").kv_bytes_per_token(1.0) == 11_520  # 2 x 30 x 3 x 64 x 1


# --------------------------------------------------------------------------------------------
# JSON Schema


@pytest.fixture(scope="module")
def stack_validator() -> jsonschema.Draft202012Validator:
    schema = stack_file_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_example_stacks_match_the_schema(
    stack_validator: jsonschema.Draft202012Validator, stack: str
) -> None:
    document = yaml.safe_load((STACKS_DIR / stack).read_text(encoding="utf-8"))
    assert [e.message for e in stack_validator.iter_errors(document)] == []


def _schema_errors(validator: jsonschema.Draft202012Validator, document: Any) -> list[Any]:
    return [(list(e.absolute_path), e.validator) for e in validator.iter_errors(document)]


def test_schema_refuses_unknown_keys(stack_validator: jsonschema.Draft202012Validator) -> None:
    document = yaml.safe_load(stack_text(fleet()))
    assert _schema_errors(stack_validator, document) == []
    document["config"][FLEET_CONFIG_KEY]["pools"][0]["flavour"] = "large"
    document["config"][FLEET_CONFIG_KEY]["colour"] = "blue"
    errors = sorted(_schema_errors(stack_validator, document), key=repr)
    assert errors == [
        (["config", FLEET_CONFIG_KEY, "pools", 0], "additionalProperties"),
        (["config", FLEET_CONFIG_KEY], "additionalProperties"),
    ]


@pytest.mark.parametrize(
    ("mutate", "where", "keyword"),
    [
        (_set("pools", 0, "name", "Bad"), ["pools", 0, "name"], "pattern"),
        (_set("pools", 0, "max_replicas", 20_000), ["pools", 0, "max_replicas"], "maximum"),
        (_set("pools", 0, "cloud", "ibm"), ["pools", 0, "cloud"], "enum"),
        (_set("slo_classes", DELETE), [], "required"),
    ],
    ids=["name", "maximum", "enum", "required"],
)
def test_schema_refuses_bad_values(
    stack_validator: jsonschema.Draft202012Validator,
    mutate: Mutation,
    where: list[Any],
    keyword: str,
) -> None:
    data = fleet()
    mutate(data)
    document = {"config": {FLEET_CONFIG_KEY: data}}
    assert _schema_errors(stack_validator, document) == [
        (["config", FLEET_CONFIG_KEY, *where], keyword)
    ]


def test_schema_stack_file_shape(stack_validator: jsonschema.Draft202012Validator) -> None:
    assert _schema_errors(stack_validator, {}) == [([], "required")]
    assert _schema_errors(stack_validator, {"config": {"aws:region": "x"}}) == [
        (["config"], "required")
    ]
    good = {"config": {FLEET_CONFIG_KEY: fleet(), REPLICAS_CONFIG_KEY: {"aws-gpu": 2}}}
    assert _schema_errors(stack_validator, good) == []
    bad = {"config": {FLEET_CONFIG_KEY: fleet(), REPLICAS_CONFIG_KEY: {"aws-gpu": -1}}}
    assert _schema_errors(stack_validator, bad) == [
        (["config", REPLICAS_CONFIG_KEY, "aws-gpu"], "minimum")
    ]


def test_model_json_schema_forbids_extra_keys_everywhere() -> None:
    schema = FleetSpec.model_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "models", "pools", "slo_classes"}
    defs = schema["$defs"]
    for name in ("PoolSpec", "ModelSpec", "VariantSpec", "TenantSpec", "SloClassSpec"):
        assert defs[name]["additionalProperties"] is False, name
    assert defs["PoolSpec"]["properties"]["name"]["pattern"] == "^[a-z][a-z0-9-]{0,39}$"


# --------------------------------------------------------------------------------------------
# Rollouts: the valid shapes (the error paths are in CASES)


def test_canary_rollout_defaults() -> None:
    data = fleet()
    _rollout(data)
    rollout = parse_fleet(data).model("llama-8b").rollout
    assert rollout is not None
    assert (rollout.stable, rollout.candidate, rollout.strategy) == ("bf16", "int4", "canary")
    assert rollout.steps == [5.0, 25.0, 50.0, 100.0]
    assert (rollout.step_interval_s, rollout.min_requests) == (300.0, 200)
    assert (rollout.max_error_rate_delta, rollout.ttft_ratio, rollout.tpot_ratio) == (
        0.01,
        1.2,
        1.2,
    )
    assert parse_fleet(data).model("tiny").rollout is None


@pytest.mark.parametrize("strategy", ["canary", "shadow", "replace"])
def test_rollout_round_trips_through_a_dump(strategy: str) -> None:
    """A dump writes every field, other strategies' defaults included; it must reload."""
    data = fleet()
    _rollout(data, strategy=strategy)
    spec = parse_fleet(data)
    assert parse_fleet(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))) == spec


def test_replace_may_leave_the_stable_version_unserved() -> None:
    """In-place blue/green: the pools already serve the candidate; old nodes drain."""
    data = fleet()
    data["models"][0]["variants"].append(copy.deepcopy(INT8))
    _rollout(data, stable="int8", candidate="bf16", strategy="replace", min_ready_replicas=2)
    rollout = parse_fleet(data).model("llama-8b").rollout
    assert rollout is not None and rollout.min_ready_replicas == 2


def test_shadow_rollout_settings() -> None:
    data = fleet()
    _rollout(data, strategy="shadow", sample_fraction=0.1, compare="exact-match")
    rollout = parse_fleet(data).model("llama-8b").rollout
    assert rollout is not None
    assert (rollout.sample_fraction, rollout.compare) == (0.1, "exact-match")


def test_prod_stack_canaries_int8_against_bf16() -> None:
    prod = load_stack_file(STACKS_DIR / "Pulumi.prod.yaml")
    rollout = prod.model("llama-3-1-8b").rollout
    assert rollout is not None
    assert (rollout.stable, rollout.candidate, rollout.strategy) == ("bf16", "int8", "canary")
    assert rollout.steps == [5.0, 25.0, 50.0, 100.0]
    served = {p.serves.variant for p in prod.pools if p.serves.model == "llama-3-1-8b"}
    assert {"bf16", "int8"} <= served
    assert [m.name for m in prod.models if m.rollout is not None] == ["llama-3-1-8b"]


def test_rollout_schema_forbids_extra_keys_and_lists_strategies() -> None:
    defs = FleetSpec.model_json_schema()["$defs"]
    assert defs["RolloutSpec"]["additionalProperties"] is False
    assert set(defs["RolloutSpec"]["required"]) == {"stable", "candidate", "strategy"}
    assert defs["RolloutSpec"]["properties"]["strategy"]["enum"] == ["replace", "canary", "shadow"]


# --------------------------------------------------------------------------------------------
# Property tests

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

LOWER = string.ascii_lowercase
NAME_CHARS = LOWER + string.digits + "-"
NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,39}", fullmatch=True)


def is_valid_name(name: str) -> bool:
    """The name rule, written out without a regex."""
    return 1 <= len(name) <= 40 and name[0] in LOWER and all(c in NAME_CHARS for c in name)


ENV_START = string.ascii_letters + "_"
ENV_CHARS = ENV_START + string.digits
CONFIG_CHARS = string.ascii_letters + string.digits + "_.:-"


def is_key_reference(key: str) -> bool:
    """The key-reference forms, written out without a regex."""
    kind, colon, rest = key.partition(":")
    if not colon or not rest:
        return False
    if kind == "env":
        return rest[0] in ENV_START and all(c in ENV_CHARS for c in rest)
    if kind == "file":
        return "\n" not in rest
    if kind == "config":
        return all(c in CONFIG_CHARS for c in rest)
    if kind == "sha256":
        return len(rest) == 64 and all(c in "0123456789abcdef" for c in rest)
    return False


@PROPERTY_SETTINGS
@given(
    index=st.integers(0, 2),
    low=st.integers(0, 12),
    high=st.integers(0, 12),
    desired=st.none() | st.integers(0, 12),
)
def test_replica_bounds_property(index: int, low: int, high: int, desired: int | None) -> None:
    data = fleet()
    data["pools"][index].update(min_replicas=low, max_replicas=high, desired_replicas=desired)
    expected = []
    if high < low:
        expected.append(f"pools[{index}].max_replicas: {high} is below min_replicas {low}")
    if desired is not None and (desired < low or desired > high):
        expected.append(
            f"pools[{index}].desired_replicas: {desired} is outside min_replicas..max_replicas "
            f"({low}..{high})"
        )
    if low <= high and (desired is None or low <= desired <= high):
        spec = parse_fleet(data)
        assert spec.pools[index].replicas == (low if desired is None else desired)
        assert not expected
    else:
        assert issue_lines(data) == expected


@PROPERTY_SETTINGS
@given(
    name=st.one_of(NAMES, st.text(max_size=45), st.text(alphabet=NAME_CHARS + "_A.", max_size=42))
)
def test_name_property(name: str) -> None:
    for section in ("fleet", "tenant"):
        data = fleet()
        if section == "fleet":
            data["name"] = name
            path = "name"
        else:
            data["tenants"][0]["name"] = name
            path = "tenants[0].name"
        if is_valid_name(name):
            spec = parse_fleet(data)
            assert (spec.name if section == "fleet" else spec.tenants[0].name) == name
        else:
            [line] = issue_lines(data)
            assert line.startswith(f"{path}: {NAME_PATTERN_MSG}"), line


HEX = "0123456789abcdef"
VALID_KEYS = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True).map("env:".__add__),
    st.text(st.characters(exclude_characters="\n"), min_size=1, max_size=30).map("file:".__add__),
    st.from_regex(r"[A-Za-z0-9_.:-]{1,30}", fullmatch=True).map("config:".__add__),
    st.text(alphabet=HEX, min_size=64, max_size=64).map("sha256:".__add__),
)
PLAIN_KEYS = st.text(alphabet=string.ascii_letters + string.digits, min_size=8, max_size=40).map(
    "sk-".__add__
)
ANY_KEYS = st.one_of(
    VALID_KEYS,
    PLAIN_KEYS,
    st.text(max_size=30),
    st.tuples(
        st.sampled_from(["env:", "file:", "config:", "sha256:", "Env:", "key:"]),
        st.text(max_size=70),
    ).map("".join),
    st.text(alphabet=HEX + "ABCDEF", min_size=63, max_size=65).map("sha256:".__add__),
)


@PROPERTY_SETTINGS
@given(keys=st.lists(ANY_KEYS, min_size=1, max_size=4))
def test_api_keys_property(keys: list[str]) -> None:
    data = fleet()
    data["tenants"][0]["api_keys"] = keys
    bad = [i for i, key in enumerate(keys) if not is_key_reference(key)]
    if not bad:
        assert parse_fleet(data).tenants[0].api_keys == keys
    else:
        with pytest.raises(FleetSpecError) as excinfo:
            parse_fleet(data)
        # Every bad key is reported at its own index.
        assert [str(i) for i in excinfo.value.issues] == [
            f"tenants[0].api_keys[{i}]: {KEY_REF_HELP}" for i in bad
        ]
        for key in keys:
            if key.startswith("sk-"):
                assert key not in str(excinfo.value)


@PROPERTY_SETTINGS
@given(plain=PLAIN_KEYS, position=st.integers(0, 2))
def test_plain_keys_always_refused(plain: str, position: int) -> None:
    keys = ["env:A", "config:b"]
    keys.insert(position, plain)
    data = fleet()
    data["tenants"][0]["api_keys"] = keys
    assert issue_lines(data) == [f"tenants[0].api_keys[{position}]: {KEY_REF_HELP}"]


REPLICA_NAMES = st.sampled_from([*BASE_BOUNDS, "ghost", "aws-gpu-2"])


@PROPERTY_SETTINGS
@given(replicas=st.dictionaries(REPLICA_NAMES, st.integers(-2, 7), max_size=5))
def test_with_replicas_property(replicas: dict[str, int]) -> None:
    spec = parse_fleet(fleet())
    expected = []
    for name, count in replicas.items():
        if name not in BASE_BOUNDS:
            expected.append(
                f"fleetform:replicas.{name}: no pool named '{name}' (known: 'aws-cpu', "
                "'aws-gpu', 'gcp-l4')"
            )
        elif not BASE_BOUNDS[name][0] <= count <= BASE_BOUNDS[name][1]:
            low, high = BASE_BOUNDS[name]
            expected.append(
                f"fleetform:replicas.{name}: {count} is outside min_replicas..max_replicas "
                f"({low}..{high})"
            )
    if expected:
        with pytest.raises(FleetSpecError) as excinfo:
            spec.with_replicas(replicas)
        assert [str(i) for i in excinfo.value.issues] == expected
    else:
        scaled = spec.with_replicas(replicas)
        for name, (low, _) in BASE_BOUNDS.items():
            assert scaled.pool(name).replicas == replicas.get(name, low)
        assert parse_fleet(scaled.model_dump(mode="json")) == scaled


# Known-good placements: (cloud, region, instance_type, priced_as), each offered on demand and
# as spot; the generated model is small enough for every one of them.
PLACEMENTS: list[tuple[str, str, str, dict[str, str] | None]] = [
    ("aws", "us-east-1", "g5.xlarge", None),
    ("aws", "us-east-1", "m7g.large", None),
    ("gcp", "us-central1", "g2-standard-8", None),
    ("aws", "us-west-2", "inf2.xlarge", None),
    (
        "local",
        "local",
        "local",
        {"cloud": "aws", "region": "us-east-1", "instance_type": "m7g.large"},
    ),
    (
        "kubernetes",
        "eks-test",
        "g6.xlarge",
        {"cloud": "aws", "region": "us-east-1", "instance_type": "g6.xlarge"},
    ),
]
QUOTA_INTS = st.none() | st.integers(1, 10**9)
QUOTA_FLOATS = st.none() | st.floats(min_value=0.01, max_value=1e9, allow_nan=False)
SAFE_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Co", "Cn")), max_size=40
)


_STACK_VALIDATOR = jsonschema.Draft202012Validator(stack_file_json_schema())


@st.composite
def valid_fleets(draw: st.DrawFn) -> dict[str, Any]:
    model = copy.deepcopy(BASE["models"][1])
    model["variants"][0]["runs_on"] = ["gpu", "cpu", "npu"]
    model["name"] = draw(NAMES)

    pool_names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    pools = []
    for name in pool_names:
        cloud, region, instance_type, priced_as = draw(st.sampled_from(PLACEMENTS))
        low = draw(st.integers(0, 5))
        high = draw(st.integers(low, low + 5))
        spot = draw(st.booleans())
        pool: dict[str, Any] = {
            "name": name,
            "cloud": cloud,
            "region": region,
            "instance_type": instance_type,
            "spot": spot,
            "min_replicas": low,
            "max_replicas": high,
            "desired_replicas": draw(st.none() | st.integers(low, high)),
            "on_demand_base": draw(st.integers(0, high)) if spot else 0,
            "serves": {"model": model["name"], "variant": "q4"},
            "cold_start_s": draw(st.floats(0, 3600, allow_nan=False)),
            "tags": draw(st.dictionaries(NAMES, SAFE_TEXT, max_size=2)),
        }
        if priced_as is not None:
            pool["priced_as"] = dict(priced_as)
        pools.append(pool)
    on_demand = [p["name"] for p in pools if not p["spot"]]
    for pool in pools:
        if pool["spot"] and on_demand and draw(st.booleans()):
            pool["fallback_pool"] = draw(st.sampled_from(on_demand))

    class_names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    priorities = draw(
        st.lists(st.integers(0, 100), min_size=len(class_names), max_size=3, unique=True)
    )
    classes = [
        {
            "name": name,
            "priority": priority,
            "ttft_ms": draw(st.floats(1, 1e5, allow_nan=False)),
            "tpot_ms": draw(st.floats(1, 1e4, allow_nan=False)),
            "sheddable": draw(st.booleans()),
            "spot_eligible": draw(st.booleans()),
        }
        for name, priority in zip(class_names, priorities, strict=False)
    ]

    tenants = []
    for name in draw(st.lists(NAMES, max_size=3, unique=True)):
        default = draw(st.sampled_from(classes))
        ceiling = draw(
            st.sampled_from([c for c in classes if c["priority"] <= default["priority"]])
        )
        tenants.append(
            {
                "name": name,
                "api_keys": draw(st.lists(VALID_KEYS, min_size=1, max_size=3)),
                "default_priority": default["name"],
                "max_priority": draw(st.none() | st.just(ceiling["name"])),
                "min_quality": draw(st.sampled_from(["low", "standard", "high", "reference"])),
                "quotas": {
                    "requests_per_minute": draw(QUOTA_INTS),
                    "tokens_per_minute": draw(QUOTA_INTS),
                    "max_concurrency": draw(QUOTA_INTS),
                    "accelerator_hours_per_month": draw(QUOTA_FLOATS),
                    "usd_per_month": draw(QUOTA_FLOATS),
                },
                "allowed_models": draw(st.none() | st.just([model["name"]])),
                "allowed_pools": draw(
                    st.none() | st.lists(st.sampled_from(pool_names), unique=True)
                ),
            }
        )
    return {
        "name": draw(NAMES),
        "description": draw(SAFE_TEXT),
        "models": [model],
        "pools": pools,
        "tenants": tenants,
        "slo_classes": classes,
    }


@settings(max_examples=60, deadline=None)
@given(data=valid_fleets())
def test_generated_specs_validate_and_round_trip(
    data: dict[str, Any],
) -> None:
    spec = parse_fleet(data)
    assert [p.name for p in spec.pools] == [p["name"] for p in data["pools"]]
    assert [t.name for t in spec.tenants] == [t["name"] for t in data["tenants"]]
    dumped = spec.model_dump(mode="json")
    assert parse_fleet(dumped) == spec
    text = yaml.safe_dump({"config": {FLEET_CONFIG_KEY: dumped}}, sort_keys=False)
    assert fleet_from_stack_config(yaml.safe_load(text)["config"]) == spec
    schema_errors = list(_STACK_VALIDATOR.iter_errors({"config": {FLEET_CONFIG_KEY: dumped}}))
    assert [e.message for e in schema_errors] == []


def test_placements_are_in_the_catalog() -> None:
    catalog = default_catalog()
    for cloud, region, instance_type, priced_as in PLACEMENTS:
        ref = priced_as or {"cloud": cloud, "region": region, "instance_type": instance_type}
        record = catalog.get(ref["cloud"], ref["region"], ref["instance_type"])
        assert record.on_demand_usd_per_hour is not None
        assert record.spot_usd_per_hour is not None
