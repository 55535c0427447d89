"""Forwarding a request to a peer agent: the hop headers, the HTTP call, SSE pass-through.

This module owns the agent-to-agent leg of routing. The *origin* (the agent the client called)
has authenticated the client, validated the body, charged the tenant's quota and chosen a peer;
it posts the client's body unchanged to the same route of the peer, with these headers:

``Authorization``
    The client's own: the peer resolves the same tenant, and the same pool and model checks
    apply there.
``X-Priority``
    The class the origin admitted the request under, so the peer schedules it the same way.
``X-Fleetform-Hops``
    Forwards so far, this one included. A request that arrives with ``hops >=
    routing.hop_limit`` is served where it arrives.
``X-Fleetform-Tried``
    Instances already tried for this request (comma-separated), so that it is not sent back.
``X-Fleetform-Fleet-Token``
    The fleet token. The peer checks it in constant time and only then treats the request as
    forwarded: it does not charge the tenant's quota again (the origin holds the charge until
    the forward ends, then corrects it to the tokens used) but records the usage, since it
    serves the request. A hop header without a valid token is refused (401), so a client
    cannot skip its quota by claiming to be a peer.

Two more headers carry model rollouts (``runtime.rollout``), and like the hop they count only
with the fleet token (a client cannot pick a version or pose as a shadow copy):

``X-Fleetform-Version``
    The variant the origin's router chose for the request (the variant the chosen peer
    reported serving). The peer serves the request's model with its own slot for that model; if
    that slot holds another variant (the origin routed on a stale view), it serves it anyway
    rather than fail the request, logs the mismatch, and says which variant served in its
    response header of the same name, which is also on every response served here.
``X-Fleetform-Shadow: 1``
    A shadow copy: the peer serves it like any forward but never bills it (no usage, no tenant
    metrics, no per-class or per-version tallies) and never re-routes it.

The peer's answer goes back to the client unchanged, with its ``X-Request-Id``,
``X-Fleetform-Priority``, ``X-Fleetform-Served-By`` and ``X-Fleetform-Version``. For a forwarded *streaming* request the
peer appends one SSE comment before ``data: [DONE]``, ``: fleetform-usage {...}`` with the tokens
used (SSE clients ignore comments, and the origin strips it anyway), so the origin can settle the
quota even when the client did not ask for usage.

Failures before the first token
    A peer that cannot be reached, refuses (any status but 200), stays silent for
    ``forward_read_timeout_s`` or drops the connection before sending output raises
    :class:`PeerFailed`, and the origin retries elsewhere. Nothing has reached the client then:
    a non-streamed answer is only passed on once complete, and a stream is held back until its
    first event that carries output (a token, a finish reason, an error; for chat, the opening
    role-only chunk is held too). After that a broken stream raises :class:`PeerStreamBroken`
    and the origin ends the client's stream with an error event, as for a local engine failure.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import aiohttp

from runtime.agent.auth import token_matches
from runtime.agent.errors import APIError

__all__ = [
    "FLEET_TOKEN_HEADER",
    "HOPS_HEADER",
    "SERVED_BY_HEADER",
    "SHADOW_HEADER",
    "TRIED_HEADER",
    "VERSION_HEADER",
    "Hop",
    "PeerAnswer",
    "PeerFailed",
    "PeerStream",
    "PeerStreamBroken",
    "SSESplitter",
    "answer_text",
    "carries_output",
    "event_text",
    "forward_headers",
    "hop_from_headers",
    "open_stream",
    "parse_usage_comment",
    "post_whole",
    "usage_comment",
]

HOPS_HEADER = "X-Fleetform-Hops"
TRIED_HEADER = "X-Fleetform-Tried"
FLEET_TOKEN_HEADER = "X-Fleetform-Fleet-Token"
SERVED_BY_HEADER = "X-Fleetform-Served-By"
VERSION_HEADER = "X-Fleetform-Version"
SHADOW_HEADER = "X-Fleetform-Shadow"
PRIORITY_HEADER = "X-Priority"
# Response headers of the peer that reach the client.
PASSED_HEADERS = ("X-Request-Id", "X-Fleetform-Priority", SERVED_BY_HEADER, VERSION_HEADER)
MAX_VERSION_LENGTH = 128
USAGE_COMMENT_PREFIX = b": fleetform-usage "
DONE_EVENT = b"data: [DONE]\n\n"
MAX_HOPS = 16  # far above any hop limit the spec allows; bounds what a peer may claim
MAX_TRIED = 64


@dataclass(frozen=True)
class Hop:
    """What a forwarded request says about its way here."""

    hops: int
    tried: frozenset[str]
    version: str | None = None  # the variant the origin routed it to (X-Fleetform-Version)
    shadow: bool = False  # a shadow copy (X-Fleetform-Shadow): served, never billed


def hop_from_headers(headers: Mapping[str, str], fleet_token: str | None) -> Hop | None:
    """The hop of a forwarded request, None for a client's request.

    Raises :class:`APIError` 401 when the fleet token is missing or wrong (or this node has
    none), 400 when the hop count is not a small whole number.
    """
    raw = headers.get(HOPS_HEADER)
    if raw is None:
        return None
    if not token_matches(headers.get(FLEET_TOKEN_HEADER), fleet_token):
        raise APIError(
            401,
            f"{HOPS_HEADER} is only accepted from peers with the fleet token",
            code="invalid_fleet_token",
            reason="auth",
        )
    try:
        hops = int(raw.strip())
    except ValueError:
        hops = -1
    if not 1 <= hops <= MAX_HOPS:
        raise APIError(
            400,
            f"{HOPS_HEADER}: must be a whole number within 1..{MAX_HOPS}",
            param=HOPS_HEADER,
            code="invalid_value",
            reason="bad_request",
        )
    tried = [t.strip() for t in headers.get(TRIED_HEADER, "").split(",") if t.strip()]
    version = (headers.get(VERSION_HEADER) or "").strip() or None
    if version is not None and len(version) > MAX_VERSION_LENGTH:
        raise APIError(
            400,
            f"{VERSION_HEADER}: longer than {MAX_VERSION_LENGTH} characters",
            param=VERSION_HEADER,
            code="invalid_value",
            reason="bad_request",
        )
    shadow = (headers.get(SHADOW_HEADER) or "").strip() == "1"
    return Hop(hops, frozenset(tried[:MAX_TRIED]), version, shadow)


def forward_headers(
    client_headers: Mapping[str, str],
    *,
    slo_class: str,
    hops: int,
    tried: Iterable[str],
    fleet_token: str,
    version: str | None = None,
    shadow: bool = False,
) -> dict[str, str]:
    """The headers of a forward (``hops`` counts this one); ``version`` and ``shadow`` as the
    module docstring says."""
    headers = {
        "Content-Type": "application/json",
        PRIORITY_HEADER: slo_class,
        HOPS_HEADER: str(hops),
        TRIED_HEADER: ",".join(sorted(tried)),
        FLEET_TOKEN_HEADER: fleet_token,
    }
    if version is not None:
        headers[VERSION_HEADER] = version
    if shadow:
        headers[SHADOW_HEADER] = "1"
    if "Authorization" in client_headers:
        headers["Authorization"] = client_headers["Authorization"]
    return headers


# --------------------------------------------------------------------------------------------
# Server-sent events


def usage_comment(prompt_tokens: int, completion_tokens: int) -> bytes:
    """The SSE comment a peer ends a forwarded stream with (before ``[DONE]``)."""
    payload = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return USAGE_COMMENT_PREFIX + json.dumps(payload).encode() + b"\n\n"


def parse_usage_comment(event: bytes) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` of a usage comment; None for any other event."""
    if not event.startswith(USAGE_COMMENT_PREFIX):
        return None
    try:
        data = json.loads(event[len(USAGE_COMMENT_PREFIX) :])
        return int(data["prompt_tokens"]), int(data["completion_tokens"])
    except (ValueError, KeyError, TypeError):
        return None


def _choice_text(data: object) -> str:
    """The output text in a response or stream chunk (chat or completion), "" if none."""
    if not isinstance(data, dict):
        return ""
    pieces = []
    for choice in data.get("choices") or []:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        message = choice.get("message") or choice.get("delta") or {}
        text = message.get("content") if isinstance(message, dict) else None
        if text is None:
            text = choice.get("text")
        if isinstance(text, str):
            pieces.append(text)
    return "".join(pieces)


def answer_text(body: bytes) -> str | None:
    """The output text of a complete (non-streamed) answer; None if it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not data.get("choices"):
        return None
    return _choice_text(data)


def event_text(event: bytes) -> str:
    """The output text one SSE event adds ("" for comments, [DONE] and anything else)."""
    if not event.startswith(b"data:"):
        return ""
    payload = event[len(b"data:") :].strip()
    if payload == b"[DONE]":
        return ""
    try:
        return _choice_text(json.loads(payload))
    except ValueError:
        return ""


class SSESplitter:
    """Cuts a byte stream into whole events (each returned with its blank-line terminator)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data.replace(b"\r\n", b"\n")
        events = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return events
            events.append(self._buffer[: end + 2])
            self._buffer = self._buffer[end + 2 :]

    def rest(self) -> bytes:
        """What is left after the last complete event (a truncated one)."""
        return self._buffer


def carries_output(event: bytes) -> bool:
    """Whether an event is past the point of no return: it has a token, a finish reason, an
    error or usage, or it is ``[DONE]``. Comments and a chat stream's opening role-only chunk
    do not."""
    if not event.startswith(b"data:"):
        return False
    payload = event[len(b"data:") :].strip()
    if payload == b"[DONE]":
        return True
    try:
        data = json.loads(payload)
    except ValueError:
        return True  # unknown content: pass it on rather than hold it
    if not isinstance(data, dict) or "error" in data or data.get("usage"):
        return True
    for choice in data.get("choices") or []:
        if not isinstance(choice, dict):
            return True
        delta = choice.get("delta") or {}
        if choice.get("finish_reason") or choice.get("text") or delta.get("content"):
            return True
    return False


# --------------------------------------------------------------------------------------------
# The call


class PeerFailed(Exception):
    """The peer failed before any output could reach the client; the request may go elsewhere.

    ``reason`` is a metrics label: connect, timeout, status, disconnected.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerStreamBroken(Exception):
    """A peer's stream failed after output had reached the client."""


def _failure(error: BaseException) -> PeerFailed:
    if isinstance(error, TimeoutError):
        return PeerFailed("timeout", f"no answer in time ({type(error).__name__})")
    if isinstance(error, aiohttp.ClientConnectorError):
        return PeerFailed("connect", f"cannot connect: {error}")
    return PeerFailed("disconnected", f"{type(error).__name__}: {error}")


def _passed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in PASSED_HEADERS if name in headers}


def _error_summary(status: int, text: str) -> str:
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    return f"HTTP {status}: {str(message)[:200]}"


@dataclass(frozen=True)
class PeerAnswer:
    """A peer's complete (non-streamed) answer."""

    body: bytes
    headers: dict[str, str]
    total_tokens: int | None  # from its usage, when it has one


async def post_whole(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
) -> PeerAnswer:
    """Post a non-streamed request; raises :class:`PeerFailed`."""
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as response:
            payload = await response.read()
            status = response.status
            passed = _passed_headers(response.headers)
    except (TimeoutError, aiohttp.ClientError) as error:
        raise _failure(error) from None
    if status != 200:
        raise PeerFailed("status", _error_summary(status, payload.decode("utf-8", "replace")))
    total: int | None = None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        total = int(json.loads(payload)["usage"]["total_tokens"])
    return PeerAnswer(payload, passed, total)


class PeerStream:
    """A peer's event stream, held back until its first output (see the module docstring)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._splitter = SSESplitter()
        self._held: deque[bytes] = deque()
        self._ended = False
        self.headers = _passed_headers(response.headers)
        self.usage: tuple[int, int] | None = None
        self.done = False  # [DONE] was seen

    async def _read(self) -> list[bytes]:
        """The next complete events; [] once the peer's stream has ended."""
        while not self._ended:
            chunk = await self._response.content.readany()
            if not chunk:
                self._ended = True
                return []
            events = self._splitter.feed(chunk)
            if events:
                return events
        return []

    def _take(self, event: bytes) -> bool:
        """Keep what the origin needs from ``event``; whether it goes on to the client."""
        usage = parse_usage_comment(event)
        if usage is not None:
            self.usage = usage
            return False
        if event == DONE_EVENT:
            self.done = True
        return True

    async def hold_until_output(self) -> None:
        """Read until an event carries output; raises :class:`PeerFailed` if none comes."""
        while True:
            try:
                events = await self._read()
            except (TimeoutError, aiohttp.ClientError) as error:
                raise _failure(error) from None
            if not events:
                raise PeerFailed("disconnected", "the peer's stream ended before any output")
            self._held.extend(e for e in events if self._take(e))
            if any(carries_output(e) for e in events):
                return

    async def events(self) -> AsyncIterator[bytes]:
        """The events for the client: those held back, then the rest as they come.

        Raises :class:`PeerStreamBroken` if the stream fails or ends without ``[DONE]``.
        """
        while self._held:
            yield self._held.popleft()
        while not self.done:
            try:
                events = await self._read()
            except (TimeoutError, aiohttp.ClientError) as error:
                raise PeerStreamBroken(str(_failure(error))) from None
            if not events:
                raise PeerStreamBroken("the peer's stream ended early")
            for event in events:
                if self._take(event):
                    yield event


@contextlib.asynccontextmanager
async def open_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
) -> AsyncIterator[PeerStream]:
    """Post a streaming request and wait for its first output; raises :class:`PeerFailed`
    before that. Leaving the context closes the connection (the peer then aborts)."""
    try:
        response = await session.post(url, data=body, headers=headers, timeout=timeout)
    except (TimeoutError, aiohttp.ClientError) as error:
        raise _failure(error) from None
    async with response:
        if response.status != 200:
            try:
                text = await response.text()
            except (TimeoutError, aiohttp.ClientError):
                text = ""
            raise PeerFailed("status", _error_summary(response.status, text))
        stream = PeerStream(response)
        await stream.hold_until_output()
        yield stream
