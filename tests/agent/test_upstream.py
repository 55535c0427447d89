"""The OpenAI-compatible upstream backend: a front agent serving through a second agent.

The upstream is a real agent (embedded engine over the session's shared model) on 127.0.0.1; the
front agent is built from a node config with ``engine.kind: openai-upstream`` (through
``init``/``make_backend``, as ``fleetform agent`` builds it) and is driven with the official
``openai`` client. The upstream's backend records what reaches it, and its engine can be paused
(a gate) or slowed, so that queueing and aborts are observed deterministically.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web

from runtime.agent.app import init
from runtime.agent.backend import (
    BackendError,
    EngineCoreBackend,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    _MeteredEngine,
)
from runtime.agent.config import NodeConfig
from runtime.agent.upstream import (
    PromptTokens,
    RenderedChat,
    UpstreamBackend,
    UpstreamQueue,
    _sse_data,
    estimate_tokens,
)
from runtime.engine.base import SamplingParams
from runtime.engine.model_files import resolve_model_path

from .support import KEYS, MAX_MODEL_LEN, MODEL, LiveAgent, LiveApp, body_of, node_config_data
from .test_lifecycle import send_raw, wait_for

UPSTREAM_KEY_ENV = "FLEETFORM_TEST_UPSTREAM_KEY"
FRONT_ENV = {UPSTREAM_KEY_ENV: KEYS["demo"]}
GREEDY = {"temperature": 0.0, "seed": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------------------------
# The upstream agent and the front agents


class GatedEngine(_MeteredEngine):
    """The shared engine (through the delegating wrapper), but every step waits for ``gate``
    and then sleeps ``delay_s``: a paused or slow upstream on demand."""

    def __init__(self, inner: Any, gate: threading.Event) -> None:
        super().__init__(inner)
        self.gate = gate
        self.delay_s = 0.0

    def step(self, batch: Any) -> Any:
        if not self.gate.wait(timeout=60):
            raise RuntimeError("the test left the upstream's gate closed")
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().step(batch)

    def close(self) -> None:
        pass  # the shared engine outlives this agent


@dataclass(frozen=True)
class Arrival:
    """A request as it reached the upstream: its max_tokens (our tag) and what was running."""

    max_tokens: int
    unfinished_before: int


class RecordingBackend(EngineCoreBackend):
    """The upstream's embedded backend, remembering every request it got and how it ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[Arrival] = []
        self.results: list[GenerationResult] = []

    def submit(
        self, request: GenerationRequest, on_done: Callable[[GenerationResult], None]
    ) -> GenerationHandle:
        self.arrivals.append(Arrival(request.params.max_tokens, self.stats().unfinished))

        def done(result: GenerationResult) -> None:
            self.results.append(result)
            on_done(result)

        return super().submit(request, done)


@dataclass
class Upstream:
    agent: LiveAgent
    backend: RecordingBackend
    engine: GatedEngine
    gate: threading.Event

    @property
    def url(self) -> str:
        return f"{self.agent.url}/v1"

    def client(self) -> Any:
        return openai.OpenAI(api_key=KEYS["demo"], base_url=self.url, max_retries=0, timeout=120)

    def busy(self) -> bool:
        return bool(self.agent.state.in_flight) or self.backend.core.has_unfinished()


def start_upstream(shared_engine: Any) -> Upstream:
    gate = threading.Event()
    gate.set()
    engine = GatedEngine(shared_engine, gate)
    config = NodeConfig.model_validate(node_config_data(node_id="upstream-1"))
    backend = RecordingBackend(config.engine, engine_factory=lambda: engine)
    agent = LiveAgent(init(config, backend=backend, environ={}))
    agent.wait_ready()
    return Upstream(agent, backend, engine, gate)


def front_config(upstream_url: str, **engine: Any) -> dict[str, Any]:
    settings = {
        "kind": "openai-upstream",
        "url": upstream_url,
        "model": MODEL,
        "max_in_flight": 1,
        "api_key_env": UPSTREAM_KEY_ENV,
        "model_path": str(resolve_model_path()),
        "health_interval_s": 0.2,
        **engine,
    }
    return node_config_data(node_id="front-1", engine=settings)


@pytest.fixture(scope="module")
def upstream(shared_engine: Any) -> Iterator[Upstream]:
    node = start_upstream(shared_engine)
    yield node
    node.gate.set()
    node.agent.stop()


@pytest.fixture(scope="module")
def start_front() -> Iterator[Callable[..., LiveAgent]]:
    """Factory: a front agent for a config (data); stopped at the end of the module."""
    started: list[LiveAgent] = []

    def start(
        config_data: dict[str, Any], environ: dict[str, str] | None = None, wait: bool = True
    ) -> LiveAgent:
        config = NodeConfig.model_validate(config_data)
        agent = LiveAgent(init(config, environ=FRONT_ENV if environ is None else environ))
        started.append(agent)
        if wait:
            agent.wait_ready(timeout=30)
        return agent

    yield start
    for agent in reversed(started):
        agent.stop()


@pytest.fixture(scope="module")
def front(upstream: Upstream, start_front: Callable[..., LiveAgent]) -> LiveAgent:
    """A front agent with max_in_flight=1 and the GGUF tokenizer of the upstream's model."""
    return start_front(front_config(upstream.url))


def front_backend(agent: LiveAgent) -> UpstreamBackend:
    backend = agent.state.backend
    assert isinstance(backend, UpstreamBackend)
    return backend


def wait_quiet(front: LiveAgent, upstream: Upstream) -> None:
    """Until neither agent has anything in flight (the upstream's request may end just after
    the front's)."""
    wait_for(
        lambda: (
            not front.state.in_flight
            and front_backend(front).stats().unfinished == 0
            and not upstream.busy()
        ),
        what="both agents to be idle",
    )


def client_of(agent: LiveAgent) -> Any:
    return openai.OpenAI(
        api_key=KEYS["demo"], base_url=f"{agent.url}/v1", max_retries=0, timeout=120
    )


# --------------------------------------------------------------------------------------------
# Serving through the upstream with the openai client


def test_the_front_reports_the_upstreams_context_and_counts_with_its_tokenizer(
    front: LiveAgent,
) -> None:
    backend = front_backend(front)
    assert backend.max_model_len == MAX_MODEL_LEN  # from the upstream's GET /v1/models
    assert backend.vocab_size == 49152  # SmolLM2's vocabulary, from the GGUF
    assert backend.max_num_seqs == 1
    status, _, body = front.request("GET", "/readyz")
    assert (status, body["status"]) == (200, "ready")


def test_chat_and_completions_match_the_upstream(front: LiveAgent, upstream: Upstream) -> None:
    via_front, direct = client_of(front), upstream.client()
    chat = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, **GREEDY}
    got = via_front.chat.completions.create(**chat)
    want = direct.chat.completions.create(**chat)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].message.content
    assert got.choices[0].finish_reason == want.choices[0].finish_reason
    assert got.usage is not None and want.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        want.usage.prompt_tokens,
        want.usage.completion_tokens,
    )

    text = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 10, **GREEDY}
    got_text = via_front.completions.create(**text)
    want_text = direct.completions.create(**text)
    assert got_text.choices[0].text == want_text.choices[0].text
    assert got_text.usage == want_text.usage

    # A prompt of token ids goes upstream as token ids.
    ids = {**text, "prompt": [504, 3575, 282, 4649, 314]}
    assert via_front.completions.create(**ids).choices[0].text == (
        direct.completions.create(**ids).choices[0].text
    )
    wait_quiet(front, upstream)


def test_streaming_chat_and_completions(front: LiveAgent, upstream: Upstream) -> None:
    via_front = client_of(front)
    chat = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, **GREEDY}
    whole = via_front.chat.completions.create(**chat)
    chunks = list(
        via_front.chat.completions.create(
            **chat, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2  # tokens arrive one by one, not as one block
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    text = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, **GREEDY}
    streamed = list(via_front.completions.create(**text, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == (
        via_front.completions.create(**text).choices[0].text
    )
    assert streamed[-1].choices[0].finish_reason == "length"
    wait_quiet(front, upstream)


def test_usage_and_cost_are_recorded_from_the_upstreams_counts(
    front: LiveAgent, upstream: Upstream
) -> None:
    before = front.request("GET", "/v1/usage", key=KEYS["demo"])[2]
    reply = client_of(front).completions.create(
        model=MODEL, prompt="Count: one, two,", max_tokens=6, extra_body={"ignore_eos": True}
    )
    wait_quiet(front, upstream)
    after = front.request("GET", "/v1/usage", key=KEYS["demo"])[2]
    assert reply.usage is not None
    assert after["requests"] == before["requests"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] == 6
    assert after["prompt_tokens"] - before["prompt_tokens"] == reply.usage.prompt_tokens
    assert after["accelerator_seconds"] > before["accelerator_seconds"]
    stats = front_backend(front).stats()
    assert stats.prefill_tokens_per_s is not None and stats.prefill_tokens_per_s > 0
    assert stats.decode_step_s is not None and stats.decode_step_s > 0


# --------------------------------------------------------------------------------------------
# The agent's queue decides the order; the upstream sees max_in_flight at a time


def test_one_request_at_a_time_reaches_the_upstream_and_the_critical_one_goes_first(
    front: LiveAgent, upstream: Upstream
) -> None:
    wait_quiet(front, upstream)
    backend = front_backend(front)
    seen_before = len(upstream.backend.arrivals)
    finished: list[str] = []
    errors: list[BaseException] = []

    def send(name: str, priority: str, max_tokens: int) -> threading.Thread:
        def run() -> None:
            try:
                client_of(front).completions.create(
                    model=MODEL,
                    prompt=f"A {name} request:",
                    max_tokens=max_tokens,
                    extra_body={"ignore_eos": True},
                    extra_headers={"X-Priority": priority},
                )
                finished.append(name)
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    upstream.gate.clear()  # the upstream accepts the first request but makes no progress
    try:
        threads = [send("first", "standard", 9)]
        wait_for(lambda: len(upstream.backend.arrivals) == seen_before + 1, what="first upstream")
        # Queued at the front in this order, least important first.
        for waiting, (name, priority, max_tokens) in enumerate(
            [("batch", "batch", 7), ("standard", "standard", 6), ("critical", "critical", 5)],
            start=1,
        ):
            threads.append(send(name, priority, max_tokens))
            wait_for(lambda n=waiting: backend.stats().waiting == n, what=f"{name} queued")
        assert len(upstream.backend.arrivals) == seen_before + 1  # held back by the front
    finally:
        upstream.gate.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    arrivals = upstream.backend.arrivals[seen_before:]
    assert [a.max_tokens for a in arrivals] == [9, 5, 6, 7]  # critical, standard, batch
    assert all(a.unfinished_before == 0 for a in arrivals)  # never two at the upstream
    assert finished == ["first", "critical", "standard", "batch"]
    wait_quiet(front, upstream)


def test_a_client_disconnect_aborts_the_upstream_call(front: LiveAgent, upstream: Upstream) -> None:
    wait_quiet(front, upstream)
    upstream.engine.delay_s = 0.05  # 80 tokens would take 4 s
    try:
        sock = send_raw(
            front,
            "/v1/completions",
            {"model": MODEL, "prompt": "Tell me a story.", "stream": True, "max_tokens": 80}
            | {"ignore_eos": True},
            KEYS["demo"],
        )
        received = b""
        while b'"text": "' not in received:  # tokens are flowing from the upstream
            received += sock.recv(4096)
        sock.close()
        started = time.monotonic()
        wait_for(lambda: not upstream.busy(), timeout=10, what="the upstream request to end")
        assert time.monotonic() - started < 3.0
        last = upstream.backend.results[-1]
        assert last.finish_reason == "abort"
        assert last.completion_tokens < 80
        wait_quiet(front, upstream)
    finally:
        upstream.engine.delay_s = 0.0


def test_a_request_abandoned_while_queued_never_reaches_the_upstream(
    front: LiveAgent, upstream: Upstream
) -> None:
    wait_quiet(front, upstream)
    backend = front_backend(front)
    seen_before = len(upstream.backend.arrivals)
    upstream.gate.clear()
    try:
        holder = send_raw(
            front,
            "/v1/completions",
            {"model": MODEL, "prompt": "Hold the slot", "max_tokens": 3},
            KEYS["demo"],
        )
        wait_for(lambda: len(upstream.backend.arrivals) == seen_before + 1, what="the holder")
        queued = send_raw(
            front,
            "/v1/completions",
            {"model": MODEL, "prompt": "Wait in line", "max_tokens": 4, "stream": True},
            KEYS["demo"],
        )
        wait_for(lambda: backend.stats().waiting == 1, what="the second request to queue")
        queued.close()
        wait_for(lambda: backend.stats().waiting == 0, timeout=5, what="the queued abort")
    finally:
        upstream.gate.set()
    holder.recv(4096)
    holder.close()
    wait_quiet(front, upstream)
    assert [a.max_tokens for a in upstream.backend.arrivals[seen_before:]] == [3]


# --------------------------------------------------------------------------------------------
# Without a tokenizer: estimated counts, chat through the upstream's own template


def test_without_a_tokenizer_counts_are_estimated_and_chat_uses_the_upstream_template(
    upstream: Upstream, start_front: Callable[..., LiveAgent]
) -> None:
    front = start_front(front_config(upstream.url, model_path=None, max_in_flight=2))
    backend = front_backend(front)
    assert backend.vocab_size is None
    estimate = backend.encode("twelve bytes")
    assert isinstance(estimate, PromptTokens) and estimate.estimated
    assert len(estimate) == estimate_tokens("twelve bytes") == 4

    chat = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, **GREEDY}
    got = client_of(front).chat.completions.create(**chat)
    want = upstream.client().chat.completions.create(**chat)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage == want.usage  # the upstream's counts, not the estimate
    streamed = client_of(front).chat.completions.create(**chat, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == want.choices[0].message.content
    wait_quiet(front, upstream)


# --------------------------------------------------------------------------------------------
# When the upstream is missing or fails


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_clean_error(status: int, body: Any, statuses: tuple[int, ...] = (502, 503)) -> None:
    assert status in statuses, (status, body)
    assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "code"}, body
    assert "Traceback" not in body["error"]["message"]


def test_an_unreachable_upstream_means_not_ready_and_clean_errors(
    start_front: Callable[..., LiveAgent],
) -> None:
    front = start_front(front_config(f"http://127.0.0.1:{free_port()}/v1"), wait=False)
    backend = front_backend(front)
    wait_for(lambda: "unreachable" in (backend.not_ready_reason or ""), timeout=10, what="a probe")
    assert not backend.ready and backend.load_error is None  # keeps probing; not fatal
    status, _, body = front.request("GET", "/readyz")
    assert status == 503 and body["status"] == "loading"
    assert "unreachable" in body["detail"]  # the reason, not "the model is loading"
    status, headers, body = front.request(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": QUESTION, "max_tokens": 4},
        key=KEYS["demo"],
    )
    assert_clean_error(status, body)
    assert "unreachable" in body["error"]["message"]
    assert "retry-after" in headers


def test_an_upstream_that_goes_away_fails_requests_cleanly_and_turns_readyz_false(
    shared_engine: Any, start_front: Callable[..., LiveAgent]
) -> None:
    doomed = start_upstream(shared_engine)
    front = start_front(front_config(doomed.url, max_in_flight=2))
    reply = client_of(front).completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert reply.choices[0].text
    doomed.agent.stop()

    # The first request may find out (502/503 from the failed call) before the probe does.
    status, _, body = front.request(
        "POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3}, KEYS["demo"]
    )
    assert_clean_error(status, body)
    with pytest.raises(openai.APIStatusError) as caught:
        client_of(front).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=3, stream=True
        )
    assert caught.value.status_code == 503
    assert body_of(caught.value)["message"]
    wait_for(lambda: front.request("GET", "/readyz")[0] == 503, timeout=5, what="readyz 503")
    assert not front.state.in_flight


def test_an_upstream_that_refuses_our_key_is_not_ready(
    upstream: Upstream, start_front: Callable[..., LiveAgent]
) -> None:
    front = start_front(
        front_config(upstream.url), environ={UPSTREAM_KEY_ENV: "sk-wrong"}, wait=False
    )
    backend = front_backend(front)
    wait_for(lambda: "401" in (backend.not_ready_reason or ""), timeout=10, what="a probe")
    assert front.request("GET", "/readyz")[0] == 503


def test_a_missing_upstream_key_is_a_load_error(start_front: Callable[..., LiveAgent]) -> None:
    front = start_front(front_config("http://127.0.0.1:9/v1"), environ={}, wait=False)
    backend = front_backend(front)
    assert backend.load_error is not None and UPSTREAM_KEY_ENV in backend.load_error
    status, _, body = front.request("GET", "/readyz")
    assert (status, body["status"]) == (503, "failed")


def fake_upstream() -> LiveApp:
    """An OpenAI-compatible server that lists the model and then misbehaves as the prompt says."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": MODEL, "max_model_len": 64}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        prompt = (await request.json())["prompt"]
        if "refuse" in prompt:
            return web.json_response({"error": {"message": "no capacity here"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if "in-band" in prompt:
            await response.write(b'data: {"error": {"message": "device lost"}}\n\n')
        else:  # one token, then the stream just stops
            await response.write(b'data: {"choices": [{"text": "a", "finish_reason": null}]}\n\n')
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return LiveApp(app)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("please refuse", "the upstream refused the request (500): no capacity here"),
        ("an in-band error", "the upstream failed: device lost"),
        ("truncate", "the upstream's stream ended without a finish reason"),
    ],
)
def test_upstream_failures_become_clean_503s(
    prompt: str, message: str, start_front: Callable[..., LiveAgent]
) -> None:
    fake = fake_upstream()
    try:
        front = start_front(front_config(f"{fake.url}/v1", model_path=None))
        assert front_backend(front).max_model_len == 64
        for stream in (False, True):
            status, _, body = front.request(
                "POST",
                "/v1/completions",
                {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream},
                KEYS["demo"],
            )
            if stream:  # headers went out with the first event: the error comes in-band
                assert status == 200 and message in body
                assert "Traceback" not in body
            else:
                assert_clean_error(status, body)
                assert message in body["error"]["message"]
        wait_for(lambda: not front.state.in_flight, what="the front to settle")
        assert front_backend(front).ready  # a failed request does not mean the upstream is gone
    finally:
        fake.stop()


# --------------------------------------------------------------------------------------------
# Units: the queue's order, prompts, the SSE reader, failure of submit


def test_the_queue_orders_by_priority_then_deadline_then_arrival() -> None:
    queue: UpstreamQueue[str] = UpstreamQueue()
    queue.push("batch-early", "batch-early", priority=2, deadline=5.0, arrival=0.0)
    queue.push("std-no-deadline", "std-no-deadline", priority=1, deadline=None, arrival=0.5)
    queue.push("std-late", "std-late", priority=1, deadline=9.0, arrival=1.0)
    queue.push("std-soon", "std-soon", priority=1, deadline=3.0, arrival=2.0)
    queue.push("crit", "crit", priority=0, deadline=100.0, arrival=3.0)
    queue.push("std-soon-twin", "std-soon-twin", priority=1, deadline=3.0, arrival=2.0)
    queue.push("std-soon-earlier", "std-soon-earlier", priority=1, deadline=3.0, arrival=1.5)
    assert len(queue) == 7 and "crit" in queue
    order = [queue.pop() for _ in range(7)]
    assert order == [
        "crit",
        "std-soon-earlier",  # same deadline, arrived first
        "std-soon",  # same deadline and arrival as its twin: submitted first
        "std-soon-twin",
        "std-late",
        "std-no-deadline",
        "batch-early",  # an early deadline does not lift a less important class
    ]
    assert queue.pop() is None and len(queue) == 0


def test_the_queue_removes_entries_and_stays_compact() -> None:
    queue: UpstreamQueue[int] = UpstreamQueue()
    for i in range(200):
        queue.push(f"r{i}", i, priority=i % 3, deadline=None, arrival=float(i))
    for i in range(0, 200, 2):
        assert queue.remove(f"r{i}") == i
    assert queue.remove("r0") is None and queue.remove("nope") is None
    assert len(queue) == 100 and "r0" not in queue and "r1" in queue
    assert len(queue._heap) <= 2 * len(queue) + 64  # removed slots do not pile up
    with pytest.raises(ValueError, match="already queued"):
        queue.push("r1", 1, priority=0, deadline=None, arrival=0.0)
    queue.push("r0", -1, priority=0, deadline=None, arrival=-1.0)  # a removed key may return
    popped = [queue.pop() for _ in range(101)]
    assert popped[0] == -1
    assert sorted(p for p in popped if p is not None and p >= 0) == list(range(1, 200, 2))
    priorities = [p % 3 for p in popped[1:] if p is not None]
    assert priorities == sorted(priorities)


def test_prompts_remember_what_to_send_upstream() -> None:
    rendered = RenderedChat("<|im_start|>user\nHi<|im_end|>\n", [{"role": "user", "content": "Hi"}])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n"
    assert rendered.messages == ({"role": "user", "content": "Hi"},)
    tokens = PromptTokens([1, 2, 3], rendered, rendered.messages)
    assert tokens == [1, 2, 3] and tokens.text == rendered and not tokens.estimated
    assert estimate_tokens("") == 1 and estimate_tokens("é" * 3) == 2  # UTF-8 bytes, rounded up


def test_server_sent_events_are_read_whole() -> None:
    async def lines() -> AsyncIterator[bytes]:
        for line in [b": keep-alive\n", b"data: {}\n", b"\n", b"data:x\r\n", b"data: y\n"]:
            yield line
        for line in [b"\n", b"event: ignored\n", b"data: [DONE]\n"]:  # no final blank line
            yield line

    async def collect() -> list[str]:
        return [data async for data in _sse_data(lines())]  # type: ignore[arg-type]

    assert asyncio.run(collect()) == ["{}", "x\ny", "[DONE]"]


def test_submit_before_the_upstream_is_ready_raises_backend_error() -> None:
    config = NodeConfig.model_validate(front_config("http://127.0.0.1:9/v1", model_path=None))
    backend = UpstreamBackend(config.engine, environ=FRONT_ENV)  # type: ignore[arg-type]
    request = GenerationRequest("r1", [1, 2], SamplingParams(max_tokens=2), 1, 0.0)
    with pytest.raises(BackendError, match="not been probed"):
        backend.submit(request, lambda result: None)
