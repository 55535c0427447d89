"""Every class of bad or unwelcome request gets the right status and an OpenAI-shaped error."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import openai
import pytest
from aiohttp import web

from runtime.agent.admission import ThroughputEstimate
from runtime.agent.errors import make_error_middleware

from .support import (
    KEYS,
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    MODEL,
    LiveAgent,
    LiveApp,
    body_of,
    openai_client,
)

CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
PROMPT: dict[str, Any] = {"model": MODEL, "prompt": "Hi"}
LONG_TEXT = "word " * (MAX_MODEL_LEN + 50)


def assert_error(body: Any, param: str | None, code: str | None = None) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert param.split(".")[0].split("[")[0] in error["message"] or param in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, "max_tokens", "invalid_value"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature", None),
        ("/v1/chat/completions", {**CHAT, "temperature": 3}, "temperature", None),
        ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p", None),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens", None),
        ("/v1/chat/completions", {**CHAT, "stop": [1]}, "stop[0]", None),
        ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream", None),
        ("/v1/chat/completions", {**CHAT, "seed": -1}, "seed", None),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"7": 500}}, "logit_bias.7", None),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, "logit_bias", None),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"999999999": 1}}, "logit_bias", None),
        ("/v1/chat/completions", {"model": MODEL}, "messages", "invalid_value"),
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, "model", None),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", None),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": 7}]},
            "messages[0].content",
            None,
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            None,
        ),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            "messages[0].content[0].type",
            None,
        ),
        ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ("/v1/chat/completions", {**CHAT, "n": 2}, "n", "unsupported_parameter"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs", "unsupported_parameter"),
        (
            "/v1/chat/completions",
            {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_object"}},
            "response_format",
            "unsupported_parameter",
        ),
        ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, "presence_penalty", None),
        (
            "/v1/chat/completions",
            {**CHAT, "stream_options": {"include_usage": True}},
            "stream_options",
            None,
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "max_tokens": 3, "max_completion_tokens": 4},
            "max_tokens",
            None,
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "max_tokens": MAX_MODEL_LEN},
            "max_tokens",
            "context_length_exceeded",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "max_completion_tokens": MAX_MODEL_LEN},
            "max_completion_tokens",
            "context_length_exceeded",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": LONG_TEXT}]},
            "messages",
            "context_length_exceeded",
        ),
        ("/v1/completions", {**PROMPT, "prompt": LONG_TEXT}, "prompt", "context_length_exceeded"),
        ("/v1/completions", {**PROMPT, "prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
        ("/v1/completions", {**PROMPT, "prompt": ""}, "prompt", None),
        ("/v1/completions", {**PROMPT, "prompt": [10**9]}, "prompt", None),
        ("/v1/completions", {**PROMPT, "prompt": 12}, "prompt", None),
        ("/v1/completions", {**PROMPT, "echo": True}, "echo", "unsupported_parameter"),
        ("/v1/completions", {**PROMPT, "best_of": 3}, "best_of", "unsupported_parameter"),
        ("/v1/completions", {**PROMPT, "logprobs": 2}, "logprobs", "unsupported_parameter"),
    ],
)
def test_bad_input_is_400_naming_the_param(
    agent: LiveAgent, path: str, body: dict[str, Any], param: str, code: str | None
) -> None:
    status, _, response = agent.request("POST", path, body, key=KEYS["demo"])
    assert status == 400, response
    assert_error(response, param, code)
    assert response["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "smollm2-135m", "prompt": "\\ud800 hi", "max_tokens": 1}',
        b'{"model": "smollm2-135m", "prompt": ["\\udfff"], "max_tokens": 1}',
        b'{"model": "smollm2-135m", "prompt": "hi", "stop": ["\\ud800"], "max_tokens": 1}',
        b'{"model": "smollm2-135m", "prompt": "hi", "metadata": {"\\ud800": "x"}, "max_tokens": 1}',
    ],
    ids=["prompt", "prompt-list", "stop", "key"],
)
def test_unpaired_surrogates_are_400(agent: LiveAgent, raw: bytes) -> None:
    status, _, response = agent.request(
        "POST",
        "/v1/completions",
        raw,
        key=KEYS["demo"],
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    assert_error(response, None, "invalid_unicode")
    # A proper pair ("\ud83d\ude00", an emoji) is fine.
    status, _, response = agent.request(
        "POST",
        "/v1/completions",
        b'{"model": "smollm2-135m", "prompt": "\\ud83d\\ude00", "max_tokens": 1}',
        key=KEYS["demo"],
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, response


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b"[" * 50_000, b"1" * 5000],
    ids=["syntax", "empty", "array", "string", "not-utf8", "deep-nesting", "huge-number"],
)
def test_malformed_body_is_400(agent: LiveAgent, raw: bytes) -> None:
    status, _, response = agent.request(
        "POST",
        "/v1/chat/completions",
        raw,
        key=KEYS["demo"],
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    assert_error(response, None, "invalid_json")


def test_unknown_priority_class_is_400(agent: LiveAgent) -> None:
    status, _, response = agent.request(
        "POST",
        "/v1/completions",
        {**PROMPT, "max_tokens": 1},
        key=KEYS["demo"],
        headers={"X-Priority": "platinum"},
    )
    assert status == 400
    assert_error(response, "X-Priority", "unknown_priority_class")
    assert "critical" in response["error"]["message"]  # lists the known classes


def test_body_over_the_limit_is_413(agent: LiveAgent) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}]}
    status, _, response = agent.request("POST", "/v1/chat/completions", body, key=KEYS["demo"])
    assert status == 413
    assert_error(response, None, "request_too_large")


def test_unknown_route_and_wrong_method_are_json(agent: LiveAgent) -> None:
    status, _, response = agent.request("GET", "/v1/engines", key=KEYS["demo"])
    assert status == 404
    assert_error(response, None, "not_found")
    status, headers, response = agent.request("GET", "/v1/chat/completions", key=KEYS["demo"])
    assert status == 405
    assert "POST" in headers["allow"]
    assert set(response) == {"error"}


def test_rejections_are_counted_by_reason(agent: LiveAgent) -> None:
    def count(reason: str) -> float:
        match = re.search(
            rf'^fleetform_rejected_requests_total\{{reason="{reason}"\}} (\S+)$',
            agent.metrics_text(),
            re.M,
        )
        return float(match.group(1)) if match else 0.0

    before = {r: count(r) for r in ("auth", "bad_request", "not_found", "forbidden")}
    agent.request("POST", "/v1/completions", PROMPT, key="nope")
    agent.request("POST", "/v1/completions", {**PROMPT, "n": 3}, key=KEYS["demo"])
    agent.request("POST", "/v1/completions", {**PROMPT, "model": "x"}, key=KEYS["demo"])
    agent.request("POST", "/v1/completions", PROMPT, key=KEYS["noaccess"])
    assert {r: count(r) - before[r] for r in before} == {
        "auth": 1,
        "bad_request": 1,
        "not_found": 1,
        "forbidden": 1,
    }


# --------------------------------------------------------------------------------------------
# Quotas


def test_requests_per_minute_quota_is_429_with_retry_after(agent: LiveAgent) -> None:
    tiny = openai_client(agent, "tiny")
    for _ in range(2):
        tiny.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    raw = agent.request("POST", "/v1/completions", {**PROMPT, "max_tokens": 1}, key=KEYS["tiny"])
    status, headers, response = raw
    assert status == 429
    # One request refills in 30 s at 2/min, less the few seconds the two requests took.
    assert 20 <= int(headers["retry-after"]) <= 30
    assert response["error"]["message"] == "requests_per_minute quota of tenant 'tiny' exceeded"
    assert response["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        tiny.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert 'fleetform_rejected_requests_total{reason="quota_requests_per_minute"}' in (
        agent.metrics_text()
    )


def test_tokens_per_minute_charges_the_estimate_and_refunds_what_was_unused(
    idle_agent: LiveAgent,
) -> None:
    agent = idle_agent
    prompt = "Count: 1, 2, 3,"
    # Probe the greedy continuation (as another tenant) to pick a stop string that ends the
    # quota-limited request after a token or two.
    probe = openai_client(agent, "demo").completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    stop = probe.choices[0].text.split()[0]
    n_prompt = probe.usage.prompt_tokens
    estimate_body = {**PROMPT, "prompt": prompt, "max_tokens": 40 - n_prompt, "temperature": 0}

    # 40 tokens/min; the estimate (prompt + max_tokens) is exactly 40: admitted on a full bucket.
    status, _, first = agent.request(
        "POST", "/v1/completions", {**estimate_body, "stop": [stop]}, key=KEYS["tokenpoor"]
    )
    assert status == 200, first
    assert first["choices"][0]["finish_reason"] == "stop"
    used = first["usage"]["total_tokens"]
    assert used < 40 - 5
    # The unused part of the estimate came back when the request finished (plus a little refill).
    available = agent.on_loop(lambda: agent.state.quotas.snapshot("tokenpoor"))["tokens_available"]
    assert 40 - used - 0.01 <= available <= 40

    # The same 40-token estimate no longer fits: 429 naming the limit, with Retry-After.
    status, headers, second = agent.request(
        "POST", "/v1/completions", estimate_body, key=KEYS["tokenpoor"]
    )
    assert status == 429
    assert second["error"]["message"] == "tokens_per_minute quota of tenant 'tokenpoor' exceeded"
    # The bucket lacks what it lacked a moment ago (about `used`, less what refilled while the
    # first request ran: much on a loaded machine) and refills 40 per 60 s.
    second_wait = int(headers["retry-after"])
    assert abs(second_wait - (40 - available) * 60 / 40) <= 2, (second_wait, used, available)
    # A request larger than a whole minute's allowance waits for a full bucket, not forever.
    status, headers, third = agent.request(
        "POST", "/v1/completions", {**estimate_body, "max_tokens": 100}, key=KEYS["tokenpoor"]
    )
    assert status == 429
    assert third["error"]["message"].startswith("tokens_per_minute quota")
    assert abs(int(headers["retry-after"]) - second_wait) <= 1  # the same full bucket


def test_concurrency_quota(idle_agent: LiveAgent) -> None:
    single = openai_client(idle_agent, "single")
    stream = single.completions.create(
        model=MODEL,
        prompt="Count to ten:",
        max_tokens=12,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))  # the request is running now
    assert first.choices
    with pytest.raises(openai.RateLimitError) as caught:
        single.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert "max_concurrency quota of tenant 'single'" in body_of(caught.value)["message"]
    list(stream)  # finish; the slot frees
    idle_agent.wait_idle()
    assert single.completions.create(model=MODEL, prompt="Hi", max_tokens=1).choices


# --------------------------------------------------------------------------------------------
# Priority and shedding


def test_priority_header_and_capping(idle_agent: LiveAgent) -> None:
    def effective(tenant: str, asked: str | None) -> str:
        headers = {"X-Priority": asked} if asked else {}
        status, response_headers, body = idle_agent.request(
            "POST",
            "/v1/completions",
            {**PROMPT, "max_tokens": 1},
            key=KEYS[tenant],
            headers=headers,
        )
        assert status == 200, body
        return response_headers["x-fleetform-priority"]

    assert effective("demo", None) == "standard"  # the tenant's default
    assert effective("demo", "critical") == "critical"  # within its max_priority
    assert effective("capped", "critical") == "standard"  # capped to max_priority, not refused
    assert effective("capped", "standard") == "standard"


def test_overload_sheds_sheddable_work_but_serves_critical(
    idle_agent: LiveAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = idle_agent
    body = {**PROMPT, "prompt": "Summarise the news of the day in one line:", "max_tokens": 1}
    # Normal speed: a batch request is predicted well within its 20 s objective.
    status, _, response = agent.request(
        "POST", "/v1/completions", body, key=KEYS["demo"], headers={"X-Priority": "batch"}
    )
    assert status == 200, response
    # Fabricate a crawling engine (0.5 prefill tokens/s): ~10 prompt tokens predict ~20 s+.
    slow = ThroughputEstimate(prefill_tokens_per_s=0.5, decode_step_s=2.0)
    monkeypatch.setattr(agent.state.backend, "throughput", lambda: slow)
    status, headers, response = agent.request(
        "POST", "/v1/completions", body, key=KEYS["demo"], headers={"X-Priority": "batch"}
    )
    assert status == 503
    assert response["error"]["code"] == "overload"
    assert "predicted time to first token" in response["error"]["message"]
    assert int(headers["retry-after"]) >= 1
    # Critical work is never shed, whatever the prediction.
    status, headers, response = agent.request(
        "POST", "/v1/completions", body, key=KEYS["demo"], headers={"X-Priority": "critical"}
    )
    assert status == 200, response
    assert headers["x-fleetform-priority"] == "critical"
    metrics = agent.metrics_text()
    assert re.search(r'^fleetform_shed_requests_total\{slo_class="batch"\} [1-9]', metrics, re.M)


# --------------------------------------------------------------------------------------------
# Unexpected errors


def test_unexpected_exceptions_become_a_json_500_without_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail")

    app = web.Application(middlewares=[make_error_middleware()])
    app.router.add_get("/broken", broken)
    live = LiveApp(app)
    try:
        with caplog.at_level(logging.ERROR, logger="fleetform.agent"):
            status, _, body = live.request("GET", "/broken")
    finally:
        live.stop()
    assert status == 500
    assert body == {
        "error": {
            "message": "Internal server error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert "secret internal detail" in caplog.text  # logged server-side, with the traceback
    assert "Traceback" in caplog.text


def test_concurrent_garbage_does_not_crash_the_agent(agent: LiveAgent) -> None:
    bodies: list[bytes] = [b"\x00" * 100, b'{"model": null}', b'{"messages": {}}', b"{" * 50]
    errors: list[BaseException] = []

    def hammer(raw: bytes) -> None:
        try:
            status, _, _ = agent.request("POST", "/v1/chat/completions", raw, key=KEYS["demo"])
            assert status == 400
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(b,)) for b in bodies * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    status, _, _ = agent.request("GET", "/healthz")
    assert status == 200
