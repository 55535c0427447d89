"""The OpenAI-compatible API against a live agent and the real model, through the openai client."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from runtime.agent import schemas

from .support import KEYS, MODEL, LiveAgent, body_of, openai_client

CHAT = [{"role": "user", "content": "Name three colours."}]


def test_chat_completion_shape_and_usage(client: Any, idle_agent: LiveAgent) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0
    )
    assert raw.headers["x-fleetform-priority"] == "standard"
    result = raw.parse()
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.model == MODEL
    [choice] = result.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    # Greedy decoding is deterministic: SmolLM2 answers "1. Red:" and is cut at max_tokens.
    assert choice.message.content == "1. Red:"
    assert choice.finish_reason == "length"
    usage = result.usage
    assert usage.prompt_tokens > 5
    assert usage.completion_tokens == 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The body also matches the documented response model exactly.
    schemas.ChatCompletion.model_validate(json.loads(raw.text))


def test_streaming_chat_equals_non_streaming_and_reports_usage(
    client: Any, idle_agent: LiveAgent
) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert again.choices[0].message.content == plain.choices[0].message.content  # greedy

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == [plain.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_events_are_wire_exact(idle_agent: LiveAgent) -> None:
    """SSE framing: `data: <json>` events, every chunk valid, ending in `data: [DONE]`."""
    status, headers, text = idle_agent.request(
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": "One, two,", "max_tokens": 3, "stream": True},
        key=KEYS["demo"],
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        payload = json.loads(event.removeprefix("data: "))
        schemas.CompletionChunk.model_validate(payload)
        assert "usage" not in payload  # only with stream_options.include_usage


def test_text_completion_streaming_and_not(client: Any, idle_agent: LiveAgent) -> None:
    plain = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert plain.object == "text_completion"
    assert plain.id.startswith("cmpl-")
    assert plain.choices[0].text
    stream = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_token_id_prompt_gives_the_same_result_as_text(client: Any, idle_agent: LiveAgent) -> None:
    text = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0)
    ids = idle_agent.state.backend.encode("Hello there")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_max_tokens_ends_with_length(client: Any, idle_agent: LiveAgent) -> None:
    result = client.completions.create(
        model=MODEL,
        prompt="Count: 1, 2, 3,",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 5


def test_max_completion_tokens_is_honoured(client: Any, idle_agent: LiveAgent) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=2, temperature=0
    )
    assert result.usage.completion_tokens <= 2


def test_stop_string_cuts_the_output(client: Any, idle_agent: LiveAgent) -> None:
    prompt = "Count: 1, 2, 3,"
    full = (
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    # Stop at the second visible word of the greedy continuation.
    words = full.split()
    assert len(words) >= 2, full
    stop = words[1]
    cut = full[: full.index(stop)]
    stopped = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop, "\u2603"]
    )
    assert stopped.choices[0].text == cut
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: Any, idle_agent: LiveAgent) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=MODEL,
                prompt="Once upon a time",
                max_tokens=5,
                temperature=1.0,
                seed=seed,
                extra_body={"top_k": 40},
            )
            .choices[0]
            .text
        )

    assert sample(1234) == sample(1234)


def test_harmless_openai_parameters_are_accepted(client: Any, idle_agent: LiveAgent) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Be brief."}, *CHAT],
        max_tokens=1,
        user="someone@example.com",
        presence_penalty=0,
        frequency_penalty=0,
        response_format={"type": "text"},
        n=1,
        logprobs=False,
        tool_choice="none",
        logit_bias={"42": -100},
        stop="\n\n",
        top_p=0.9,
        metadata={"team": "search"},
    )
    assert result.usage.completion_tokens == 1


def test_models_list(client: Any, agent: LiveAgent) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "fleetform"
    # A tenant that may not use the model sees none.
    assert openai_client(agent, "noaccess").models.list().data == []


def test_auth_errors(agent: LiveAgent) -> None:
    for key in ("wrong-key", KEYS["demo"] + "x"):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai_client(agent, key=key).chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=1
            )
        assert caught.value.status_code == 401
        assert body_of(caught.value)["code"] == "invalid_api_key"
        assert key not in json.dumps(body_of(caught.value))
    status, _, body = agent.request("GET", "/v1/models")
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error"


def test_forbidden_model_and_pool(agent: LiveAgent) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        openai_client(agent, "noaccess").chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=1
        )
    assert body_of(caught.value)["code"] == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as caught:
        openai_client(agent, "otherpool").completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert body_of(caught.value)["code"] == "pool_not_allowed"
    assert "otherpool" in body_of(caught.value)["message"]


def test_unknown_model_is_404_like_openai(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1)
    assert body_of(caught.value)["code"] == "model_not_found"
    assert body_of(caught.value)["param"] == "model"
