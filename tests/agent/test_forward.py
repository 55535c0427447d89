"""runtime.agent.forward's pure parts: hop headers, SSE framing, the usage comment, and when a
forwarded stream is past the point where it could still be retried elsewhere."""

from __future__ import annotations

import json

import pytest

from runtime.agent.errors import APIError
from runtime.agent.forward import (
    FLEET_TOKEN_HEADER,
    HOPS_HEADER,
    TRIED_HEADER,
    Hop,
    SSESplitter,
    carries_output,
    forward_headers,
    hop_from_headers,
    parse_usage_comment,
    usage_comment,
)

TOKEN = "fleet-secret"


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_a_client_request_has_no_hop() -> None:
    assert hop_from_headers({"Authorization": "Bearer k"}, TOKEN) is None


def test_a_forward_round_trips_through_its_headers() -> None:
    headers = forward_headers(
        {"Authorization": "Bearer sk-tenant", "X-Other": "dropped"},
        slo_class="standard",
        hops=1,
        tried={"b", "a"},
        fleet_token=TOKEN,
    )
    assert headers["Authorization"] == "Bearer sk-tenant"
    assert headers["X-Priority"] == "standard" and "X-Other" not in headers
    assert hop_from_headers(headers, TOKEN) == Hop(1, frozenset({"a", "b"}))


@pytest.mark.parametrize(
    ("headers", "configured", "status"),
    [
        ({HOPS_HEADER: "1"}, TOKEN, 401),  # no token
        ({HOPS_HEADER: "1", FLEET_TOKEN_HEADER: "guess"}, TOKEN, 401),
        ({HOPS_HEADER: "1", FLEET_TOKEN_HEADER: TOKEN}, None, 401),  # this node has none
        ({HOPS_HEADER: "0", FLEET_TOKEN_HEADER: TOKEN}, TOKEN, 400),
        ({HOPS_HEADER: "x", FLEET_TOKEN_HEADER: TOKEN}, TOKEN, 400),
        ({HOPS_HEADER: "99", FLEET_TOKEN_HEADER: TOKEN}, TOKEN, 400),
    ],
)
def test_bad_hops_are_refused(headers: dict[str, str], configured: str | None, status: int) -> None:
    with pytest.raises(APIError) as caught:
        hop_from_headers(headers, configured)
    assert caught.value.status == status


def test_tried_instances_are_trimmed_and_blanks_dropped() -> None:
    hop = hop_from_headers(
        {HOPS_HEADER: " 2 ", FLEET_TOKEN_HEADER: TOKEN, TRIED_HEADER: " a, ,b "}, TOKEN
    )
    assert hop == Hop(2, frozenset({"a", "b"}))


def test_events_are_cut_whole_whatever_the_chunking() -> None:
    stream = event({"n": 1}) + b": comment\n\n" + event({"n": 2}) + b"data: [DONE]\n\n"
    for size in (1, 3, 7, len(stream)):
        splitter = SSESplitter()
        events = []
        for start in range(0, len(stream), size):
            events.extend(splitter.feed(stream[start : start + size]))
        assert b"".join(events) == stream and len(events) == 4
        assert splitter.rest() == b""
    crlf = SSESplitter()
    assert crlf.feed(b"data: 1\r\n\r\ndata: 2") == [b"data: 1\n\n"]
    assert crlf.rest() == b"data: 2"


def test_the_usage_comment_round_trips_and_nothing_else_parses_as_one() -> None:
    comment = usage_comment(12, 5)
    assert comment.startswith(b":") and comment.endswith(b"\n\n")  # a comment to SSE clients
    assert parse_usage_comment(comment) == (12, 5)
    assert parse_usage_comment(event({"usage": {"prompt_tokens": 1}})) is None
    assert parse_usage_comment(b": fleetform-usage {broken\n\n") is None


@pytest.mark.parametrize(
    ("payload", "output"),
    [
        ({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, False),  # chat opening
        ({"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}, True),
        ({"choices": [{"delta": {}, "finish_reason": "length"}]}, True),
        ({"choices": [{"text": "Hi", "finish_reason": None}]}, True),
        ({"choices": [], "usage": {"prompt_tokens": 3}}, True),
        ({"error": {"message": "x"}}, True),
    ],
)
def test_output_starts_with_the_first_token_finish_error_or_usage(
    payload: object, output: bool
) -> None:
    assert carries_output(event(payload)) is output


def test_comments_and_done_and_garbage() -> None:
    assert not carries_output(usage_comment(1, 1))
    assert carries_output(b"data: [DONE]\n\n")
    assert carries_output(b"data: {not json\n\n")  # unknown: passed on rather than held
