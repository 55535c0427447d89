"""What the agent reports: Prometheus metrics, per-tenant usage and cost, the OpenAPI document."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import jsonschema
from prometheus_client.parser import text_string_to_metric_families

from runtime.agent.openapi import OPENAPI_PATH, render_openapi

from .support import KEYS, MODEL, LiveAgent, openai_client

PRICE_PER_SECOND = 3.6 / 3600  # the test node's price_usd_per_hour


def samples(agent: LiveAgent) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(agent.metrics_text()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(snapshot: dict[Any, float], name: str, **labels: str) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


def usage_of(agent: LiveAgent, tenant: str = "demo") -> dict[str, Any]:
    status, _, body = agent.request("GET", "/v1/usage", key=KEYS[tenant])
    assert status == 200
    return body  # type: ignore[no-any-return]


def test_metrics_after_a_request(idle_agent: LiveAgent) -> None:
    agent = idle_agent
    before = samples(agent)
    result = openai_client(agent).completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True}
    )
    agent.wait_idle()
    after = samples(agent)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("fleetform_prompt_tokens_total", tenant="demo") == result.usage.prompt_tokens
    assert delta("fleetform_completion_tokens_total", tenant="demo") == 3
    assert (
        delta(
            "fleetform_requests_total", tenant="demo", slo_class="standard", finish_reason="length"
        )
        == 1
    )
    for histogram in (
        "fleetform_ttft_seconds",
        "fleetform_request_duration_seconds",
        "fleetform_queue_time_seconds",
    ):
        assert delta(f"{histogram}_count", slo_class="standard") == 1, histogram
    assert delta("fleetform_inter_token_latency_seconds_count", slo_class="standard") == 2
    seconds = delta("fleetform_accelerator_seconds_total", tenant="demo")
    assert seconds > 0
    assert abs(delta("fleetform_cost_usd_total", tenant="demo") - seconds * PRICE_PER_SECOND) < 1e-9
    for gauge in (
        "fleetform_queue_depth",
        "fleetform_running_sequences",
        "fleetform_in_flight_requests",
        "fleetform_kv_cache_used_bytes",
        "fleetform_kv_cache_usage_ratio",
        "fleetform_prefill_tokens_per_second",
    ):
        assert (gauge, frozenset()) in after, gauge
    assert value(after, "fleetform_ready") == 1.0
    assert value(after, "fleetform_kv_cache_capacity_bytes") > 0
    assert value(after, "fleetform_prefill_tokens_per_second") > 0


def test_usage_endpoint_reports_the_callers_own_usage(idle_agent: LiveAgent) -> None:
    agent = idle_agent
    before = usage_of(agent)
    other_before = usage_of(agent, "capped")
    started = time.monotonic()
    result = openai_client(agent).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    elapsed = time.monotonic() - started
    agent.wait_idle()
    after = usage_of(agent)
    assert after["tenant"] == "demo"
    assert after["node_id"] == "test-node-1"
    assert after["requests"] == before["requests"] + 1
    assert after["prompt_tokens"] - before["prompt_tokens"] == result.usage.prompt_tokens
    assert (
        after["completion_tokens"] - before["completion_tokens"] == result.usage.completion_tokens
    )
    assert after["total_tokens"] == after["prompt_tokens"] + after["completion_tokens"]
    seconds = after["accelerator_seconds"] - before["accelerator_seconds"]
    assert 0 < seconds <= elapsed
    assert abs((after["usd"] - before["usd"]) - seconds * PRICE_PER_SECOND) < 1e-9
    assert after["quota"]["in_flight"] == 0
    assert usage_of(agent, "capped") == other_before  # another tenant's usage is untouched
    assert agent.request("GET", "/v1/usage")[0] == 401


def test_step_time_is_attributed_in_full_and_by_token_share(idle_agent: LiveAgent) -> None:
    """Concurrent requests split each step's time; together they account for all of it."""
    agent = idle_agent
    core = agent.state.backend.core  # type: ignore[attr-defined]
    tenants = ("demo", "capped")
    before = {t: usage_of(agent, t)["accelerator_seconds"] for t in tenants}
    engine_seconds_before = core.step_seconds
    started = time.monotonic()
    bodies = {
        # A long prompt and a short one: the long one must be billed more.
        "demo": {"model": MODEL, "prompt": "word " * 80, "max_tokens": 2},
        "capped": {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
    }
    threads = [
        threading.Thread(target=agent.request, args=("POST", "/v1/completions", bodies[t], KEYS[t]))
        for t in tenants
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agent.wait_idle()
    wall = time.monotonic() - started
    billed = {t: usage_of(agent, t)["accelerator_seconds"] - before[t] for t in tenants}
    engine_seconds = core.step_seconds - engine_seconds_before
    # Attribution uses each step's wall time (scheduling included), so it covers at least the
    # engine's own step time and never more than the time that passed.
    assert engine_seconds <= sum(billed.values()) <= wall
    assert billed["demo"] > billed["capped"] > 0


def test_openapi_served_equals_the_checked_in_file(agent: LiveAgent) -> None:
    status, headers, served = agent.request("GET", "/openapi.json")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    on_disk = OPENAPI_PATH.read_text(encoding="utf-8")
    assert render_openapi() == on_disk, "stale: run python -m runtime.agent.openapi"
    assert served == json.loads(on_disk)


def test_openapi_document_describes_the_api() -> None:
    document = json.loads(render_openapi())
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/usage",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/admin/drain",
        "/admin/models",
        "/admin/models/{name}/load",
        "/admin/models/{name}/unload",
    }
    components = document["components"]["schemas"]
    for schema in components.values():
        jsonschema.Draft202012Validator.check_schema(schema)

    def validator(name: str) -> jsonschema.Draft202012Validator:
        # The document itself is the root, so "#/components/schemas/..." references resolve.
        root = {"components": document["components"], "$ref": f"#/components/schemas/{name}"}
        return jsonschema.Draft202012Validator(root)

    chat = validator("ChatCompletionRequest")
    assert chat.is_valid({"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert not chat.is_valid({"model": MODEL, "messages": [], "frobnicate": 1})
    assert not chat.is_valid(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
    )
    completion = validator("CompletionRequest")
    assert completion.is_valid({"model": MODEL, "prompt": [1, 2, 3]})
    assert not completion.is_valid({"model": MODEL})
