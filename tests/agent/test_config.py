"""runtime.agent.config: NodeConfig validation and cutting a node's config out of the fleet spec."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.agent.config import (
    EngineSettings,
    NodeConfig,
    NodeConfigError,
    UpstreamEngineSettings,
    hash_api_key,
    load_node_config,
    node_config_from_spec,
    parse_node_config,
)
from runtime.catalog import default_catalog
from runtime.spec import FLEET_CONFIG_KEY, FleetSpec, parse_fleet

from .support import node_config_data

LOCAL_STACK = Path(__file__).resolve().parents[2] / "stacks" / "local.yaml"
ENV = {"FLEETFORM_DEMO_KEY": "demo-secret", "FLEETFORM_BATCH_KEY": "batch-secret"}


def local_fleet() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(LOCAL_STACK.read_text())["config"][FLEET_CONFIG_KEY])


def spec(mutate: Any = None) -> FleetSpec:
    data = local_fleet()
    if mutate is not None:
        mutate(data)
    return parse_fleet(data)


def test_node_config_from_the_local_stack() -> None:
    config = node_config_from_spec(spec(), "local-dear", "node-7", 8123, environ=ENV)
    assert (config.node_id, config.pool, config.port, config.host) == (
        "node-7",
        "local-dear",
        8123,
        "127.0.0.1",
    )
    assert (config.model, config.variant) == ("smollm2-135m", "q4-1")
    assert config.engine.model_path is None  # builtin: the bundled model
    assert config.engine.max_model_len == 2048  # the model's context length
    record = default_catalog().get("aws", "us-east-1", "g6.xlarge")
    assert config.price_usd_per_hour == record.on_demand_usd_per_hour
    demo = next(t for t in config.tenants if t.name == "demo")
    assert demo.key_sha256 == [hashlib.sha256(b"demo-secret").hexdigest()]
    assert (demo.default_priority, demo.max_priority) == ("standard", "critical")
    assert demo.quotas.tokens_per_minute == 120000
    assert [c.name for c in config.slo_classes] == ["critical", "standard", "batch"]
    # Nothing secret is in the config: only digests.
    assert "demo-secret" not in config.model_dump_json()
    # It round-trips through JSON, as `--print-config > node.json` then `--config` does.
    assert NodeConfig.model_validate_json(config.model_dump_json()) == config


def test_key_reference_kinds(tmp_path: Path) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text("  file-secret\n")
    digest = "ab" * 32

    def keys(data: dict[str, Any]) -> None:
        data["tenants"][0]["api_keys"] = [
            "env:FLEETFORM_DEMO_KEY",
            f"file:{key_file}",
            f"sha256:{digest}",
        ]

    config = node_config_from_spec(spec(keys), "local-cheap", "n", 0, environ=ENV)
    assert config.tenants[0].key_sha256 == [
        hash_api_key("demo-secret"),
        hash_api_key("file-secret"),  # stripped
        digest,
    ]


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            "env:FLEETFORM_UNSET_KEY",
            "tenant 'demo': api key reference 'env:FLEETFORM_UNSET_KEY': environment variable FLEETFORM_UNSET_KEY is not set",
        ),
        (
            "file:/nonexistent/key",
            "tenant 'demo': api key reference 'file:/nonexistent/key': cannot read the file",
        ),
        ("config:demoKey", "a Pulumi config secret can only be read by the Pulumi program"),
    ],
)
def test_unresolvable_key_references_name_tenant_and_reference(
    reference: str, message: str
) -> None:
    def keys(data: dict[str, Any]) -> None:
        data["tenants"][0]["api_keys"] = [reference]

    with pytest.raises(NodeConfigError) as caught:
        node_config_from_spec(spec(keys), "local-cheap", "n", 0, environ=ENV)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_spot_pools_are_priced_at_the_spot_price() -> None:
    def make_spot(data: dict[str, Any]) -> None:
        data["pools"][0]["spot"] = True

    fleet = spec(make_spot)
    record = default_catalog().get("aws", "us-east-1", "m7g.large")
    assert record.spot_usd_per_hour is not None
    spot = node_config_from_spec(fleet, "local-cheap", "n", 0, environ=ENV)
    assert spot.price_usd_per_hour == record.spot_usd_per_hour
    base = node_config_from_spec(fleet, "local-cheap", "n", 0, environ=ENV, spot=False)
    assert base.price_usd_per_hour == record.on_demand_usd_per_hour


def test_unknown_pool() -> None:
    with pytest.raises(
        NodeConfigError, match="no pool named 'nope' \\(known: local-cheap, local-dear\\)"
    ):
        node_config_from_spec(spec(), "nope", "n", 0, environ=ENV)


def upstream_pool(source: str | None, **upstream: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        data["pools"][0]["engine"] = "openai-upstream"
        data["pools"][0]["upstream"] = {"url": "http://10.0.0.7:8000/v1/", "model": "m", **upstream}
        data["models"][0]["variants"][0]["source"] = source

    return mutate


def test_openai_upstream_pools_get_upstream_engine_settings() -> None:
    fleet = spec(upstream_pool("builtin:smollm2-135m-instruct", max_in_flight=6))
    config = node_config_from_spec(fleet, "local-cheap", "n", 0, environ=ENV)
    engine = config.engine
    assert isinstance(engine, UpstreamEngineSettings)
    assert (engine.kind, engine.url, engine.model, engine.max_in_flight) == (
        "openai-upstream",
        "http://10.0.0.7:8000/v1",  # trailing slash dropped: paths are appended to it
        "m",
        6,
    )
    # The builtin model's GGUF gives the tokenizer; a model id of the upstream gives none.
    assert engine.model_path is not None and engine.model_path.endswith(".gguf")
    other = node_config_from_spec(
        spec(upstream_pool("org/served-model")), "local-cheap", "n", 0, environ=ENV
    )
    assert other.engine.model_path is None
    gguf = node_config_from_spec(
        spec(upstream_pool("/models/m.Q4.gguf")), "local-cheap", "n", 0, environ=ENV
    )
    assert gguf.engine.model_path == "/models/m.Q4.gguf"
    # The embedded pool of the same fleet is unchanged, and the config survives JSON.
    assert isinstance(
        node_config_from_spec(fleet, "local-dear", "n", 0, environ=ENV).engine, EngineSettings
    )
    assert parse_node_config(json.loads(config.model_dump_json())) == config


def test_an_upstream_url_the_agent_cannot_use_is_one_clear_line() -> None:
    fleet = spec(upstream_pool(None, url="http://host/v1?x=1"))
    with pytest.raises(NodeConfigError) as caught:
        node_config_from_spec(fleet, "local-cheap", "n", 0, environ=ENV)
    assert str(caught.value) == (
        "pool 'local-cheap': upstream: url: must not have a query or fragment, e.g. "
        "http://127.0.0.1:8000/v1 (got 'http://host/v1?x=1')"
    )


UPSTREAM = {"kind": "openai-upstream", "url": "http://127.0.0.1:8000/v1", "model": "m"}


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"kind": "vllm"}, "engine: kind must be 'embedded' or 'openai-upstream'"),
        ({**UPSTREAM, "url": "127.0.0.1:8000"}, "engine.url: must be an http:// or https:// URL"),
        ({**UPSTREAM, "url": "http://u:pw@h/v1"}, "engine.url: must not hold credentials"),
        ({**UPSTREAM, "max_in_flight": 0}, "engine.max_in_flight: Input should be greater"),
        ({**UPSTREAM, "api_key_env": "not a name"}, "engine.api_key_env: String should match"),
        ({**UPSTREAM, "kv_cache_tokens": 64}, "engine.kv_cache_tokens: Extra inputs are not"),
        ({"url": "http://h/v1"}, "engine.url: Extra inputs are not permitted"),  # embedded
        ({k: v for k, v in UPSTREAM.items() if k != "model"}, "engine.model: Field required"),
    ],
)
def test_engine_settings_are_validated(engine: dict[str, Any], message: str) -> None:
    with pytest.raises(NodeConfigError) as caught:
        parse_node_config(node_config_data(engine=engine))
    assert message in str(caught.value)
    assert "openai-upstream." not in str(caught.value)  # no union tag in the path


def test_configs_without_an_engine_kind_are_embedded() -> None:
    config = parse_node_config(node_config_data(engine={"max_num_seqs": 4}))
    assert isinstance(config.engine, EngineSettings) and config.engine.max_num_seqs == 4
    upstream = parse_node_config(node_config_data(engine=UPSTREAM))
    assert isinstance(upstream.engine, UpstreamEngineSettings)
    assert upstream.engine.max_in_flight == 32 and upstream.engine.api_key_env is None


def test_the_node_config_carries_what_its_router_needs() -> None:
    def mutate(data: dict[str, Any]) -> None:
        data["routing"] = {"slo_headroom": 0.6, "hop_limit": 2, "peer_stale_after_s": 5}
        data["tenants"][0]["min_quality"] = "standard"
        data["models"].append(
            {
                **data["models"][0],
                "name": "other-model",
                "variants": [{**data["models"][0]["variants"][0], "quality": "high"}],
            }
        )
        data["pools"].append(
            {
                **data["pools"][0],
                "name": "other-pool",
                "serves": {"model": "other-model", "variant": "q4-1"},
            }
        )

    config = node_config_from_spec(spec(mutate), "local-dear", "n", 0, environ=ENV)
    routing = config.routing
    assert (routing.slo_headroom, routing.hop_limit, routing.peer_stale_after_s) == (0.6, 2, 5)
    assert routing.pools == ["local-cheap", "local-dear"]  # not the pool of another model
    assert routing.variant_quality == {"q4-1": "standard"}
    assert {t.name: t.min_quality for t in config.tenants} == {
        "demo": "standard",
        "batch-jobs": "low",
    }
    assert config.spot is False
    assert NodeConfig.model_validate_json(config.model_dump_json()) == config


def test_overrides_reach_the_node_config() -> None:
    config = node_config_from_spec(
        spec(), "local-cheap", "n", 0, environ=ENV, drain_timeout_s=5, fleet_token_env="FLEET_TOKEN"
    )
    assert (config.drain_timeout_s, config.fleet_token_env) == (5, "FLEET_TOKEN")
    assert config.fleet_token({"FLEET_TOKEN": "t"}) == "t"
    assert config.fleet_token({}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"port": 70000}, "port: Input should be less than or equal to 65535"),
        (
            {"tenants": [{"name": "a", "key_sha256": ["0" * 64], "default_priority": "gold"}]},
            "no SLO class 'gold'",
        ),
        (
            {
                "tenants": [
                    {
                        "name": "a",
                        "key_sha256": ["0" * 64],
                        "default_priority": "critical",
                        "max_priority": "batch",
                    }
                ]
            },
            "'critical' is more important than max_priority 'batch'",
        ),
        (
            {
                "tenants": [
                    {"name": "a", "key_sha256": ["0" * 64], "default_priority": "standard"},
                    {"name": "b", "key_sha256": ["0" * 64], "default_priority": "standard"},
                ]
            },
            "a key of tenant 'b' is also a key of tenant 'a'",
        ),
        (
            {"engine": {"kv_cache_tokens": 1024, "max_model_len": 2048}},
            "exceeds engine.kv_cache_tokens",
        ),
        (
            {"engine": {"kv_dtype": "float16"}},
            "engine.kv_dtype: Input should be 'float32' or 'int8'",
        ),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
        (
            {"routing": {"variant_quality": {"q8": "high"}}},
            "routing.variant_quality: no quality for variant 'q4-1'",
        ),
        (
            {"push_interval_s": 5, "routing": {"peer_stale_after_s": 5}},
            "push_interval_s: 5 is not below routing.peer_stale_after_s (5)",
        ),
    ],
)
def test_invalid_node_configs_are_one_line_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(NodeConfigError) as caught:
        parse_node_config(node_config_data(**change), "node.json")
    text = str(caught.value)
    assert text.startswith("node.json: ")
    assert message in text
    assert "\n" not in text


def test_load_node_config_file(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    path.write_text(json.dumps(node_config_data()))
    config = load_node_config(path)
    assert config.host == "127.0.0.1"  # loopback unless told otherwise
    assert config.tenants[0].name == "demo"
    path.write_text("[")
    with pytest.raises(NodeConfigError, match="invalid JSON"):
        load_node_config(path)
