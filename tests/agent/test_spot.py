"""Spot interruption notices (runtime.agent.spot): fake AWS, GCP and Azure metadata services on
loopback, a real agent application (over a backend that needs no model) that they drain, the
watcher's deadline rule and error handling, and the ``fleetform agent`` options."""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import http.client
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from runtime.agent.admission import ThroughputEstimate, WorkItem
from runtime.agent.app import AGENT, DRAINED, init
from runtime.agent.backend import (
    BackendError,
    BackendStats,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
)
from runtime.agent.config import NodeConfig, NodeConfigError
from runtime.agent.main import _load_config, configure_parser
from runtime.agent.spot import (
    SHUTDOWN_MARGIN_S,
    MetadataError,
    SpotNotice,
    SpotWatcher,
    drain_deadline_s,
)

from .support import KEYS, MODEL, LiveApp, node_config_data

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.02
QUIET_POLLS = 3  # "no notice" answers before the notice
SPOT_LOGGER = "fleetform.agent.spot"


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def spot_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SPOT_LOGGER and r.levelno >= level]


class FakeClock:
    """Wall-clock seconds that move only when told to."""

    def __init__(self, now: float = 1_780_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------------
# Fake metadata services


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: Mapping[str, str]
    body: bytes
    status: int = 0


@dataclass
class FakeMetadata:
    """A metadata service on 127.0.0.1 (in the test's event loop) recording every request."""

    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        seen = Seen(request.method, request.path_qs, dict(request.headers), await request.read())
        self.seen.append(seen)
        response = await handler(request)
        seen.status = response.status
        return response

    async def __aenter__(self) -> FakeMetadata:
        app = web.Application(middlewares=[self._record])
        self.routes(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def requests(self, path: str, method: str = "GET") -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path_qs.startswith(path)]


@dataclass
class FakeAws(FakeMetadata):
    """IMDSv2: tokens from PUT /latest/api/token; GETs without the current token get 401.
    ``expire_after``: the token is revoked after that many instance-action polls."""

    notice: dict[str, str] | None = None
    rebalance: dict[str, str] | None = None
    quiet_polls: int = QUIET_POLLS
    expire_after: int | None = None
    tokens: list[str] = field(default_factory=list)
    valid: str | None = None
    polls: int = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_put("/latest/api/token", self.token)
        app.router.add_get("/latest/meta-data/spot/instance-action", self.instance_action)
        app.router.add_get("/latest/meta-data/events/recommendations/rebalance", self.rebalance_)

    async def token(self, request: web.Request) -> web.Response:
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400, text="missing or invalid TTL")
        self.valid = f"token-{len(self.tokens)}"
        self.tokens.append(self.valid)
        return web.Response(text=self.valid)

    def authorised(self, request: web.Request) -> bool:
        return (
            self.valid is not None and request.headers.get("X-aws-ec2-metadata-token") == self.valid
        )

    async def instance_action(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return web.Response(status=401)
        self.polls += 1
        if self.expire_after is not None and self.polls == self.expire_after:
            self.valid = None  # the next request finds its token expired
        if self.notice is None or self.polls <= self.quiet_polls:
            return web.Response(status=404, text="Not Found")
        return web.Response(text=json.dumps(self.notice), content_type="text/plain")

    async def rebalance_(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return web.Response(status=401)
        if self.rebalance is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(text=json.dumps(self.rebalance), content_type="text/plain")


@dataclass
class FakeGcp(FakeMetadata):
    """``instance/preempted``: FALSE for ``quiet_polls`` polls, then TRUE; 403 without the
    Metadata-Flavor header (as the real server refuses such requests)."""

    quiet_polls: int = QUIET_POLLS
    preempt: bool = True
    polls: int = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/computeMetadata/v1/instance/preempted", self.preempted)

    async def preempted(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        self.polls += 1
        value = "TRUE" if self.preempt and self.polls > self.quiet_polls else "FALSE"
        return web.Response(text=value, headers={"Metadata-Flavor": "Google"})


@dataclass
class FakeAzure(FakeMetadata):
    """Scheduled Events: ``documents[i]`` is the events list of poll i (the last one repeats);
    400 without ``Metadata: true`` or the expected api-version, as the real service answers."""

    vm_name: str = "spot-vm-1"
    documents: Sequence[list[dict[str, Any]]] = ()
    acks: list[Any] = field(default_factory=list)
    on_ack: Callable[[], None] | None = None
    ack_delay_s: float = 0.0
    polls: int = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/metadata/instance/compute/name", self.name)
        app.router.add_get("/metadata/scheduledevents", self.events)
        app.router.add_post("/metadata/scheduledevents", self.ack)

    @staticmethod
    def refused(request: web.Request, api_version: str) -> web.Response | None:
        if request.headers.get("Metadata") != "true":
            return web.json_response({"error": "Bad request. Required metadata header"}, status=400)
        if request.query.get("api-version") != api_version:
            return web.json_response({"error": "Bad request. api-version"}, status=400)
        return None

    async def name(self, request: web.Request) -> web.Response:
        if refusal := self.refused(request, "2021-02-01"):
            return refusal
        if request.query.get("format") != "text":
            return web.json_response({"error": "format=text expected for a leaf"}, status=400)
        return web.Response(text=self.vm_name)

    async def events(self, request: web.Request) -> web.Response:
        if refusal := self.refused(request, "2020-07-01"):
            return refusal
        events = self.documents[min(self.polls, len(self.documents) - 1)] if self.documents else []
        self.polls += 1
        return web.json_response({"DocumentIncarnation": self.polls, "Events": events})

    async def ack(self, request: web.Request) -> web.Response:
        if refusal := self.refused(request, "2020-07-01"):
            return refusal
        self.acks.append(await request.json())
        if self.on_ack is not None:
            self.on_ack()
        await asyncio.sleep(self.ack_delay_s)
        return web.Response(status=200)


def azure_event(
    event_id: str, resources: list[str], not_before: str, kind: str = "Preempt"
) -> dict[str, Any]:
    return {
        "EventId": event_id,
        "EventType": kind,
        "ResourceType": "VirtualMachine",
        "Resources": resources,
        "EventStatus": "Scheduled" if not_before else "Started",
        "NotBefore": not_before,
        "Description": "",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }


def aws_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def rfc1123(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


# --------------------------------------------------------------------------------------------
# A real agent application over a backend that needs no model


class IdleBackend:
    """Ready at once and never given work: these tests need the app's drain, not a model."""

    ready = True
    load_error: str | None = None
    not_ready_reason: str | None = None
    max_model_len = 128
    vocab_size: int | None = None
    max_num_seqs = 1

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        return [1] * len(text.split())

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return "\n".join(m.get("content", "") for m in messages)

    def submit(
        self, request: GenerationRequest, on_done: Callable[[GenerationResult], None]
    ) -> GenerationHandle:
        raise BackendError("the idle backend serves nothing")

    def abort(self, request_id: str) -> None:
        return None

    def stats(self) -> BackendStats:
        return BackendStats(0, 0, 0, None, None, None, None, None)

    def work_items(self) -> list[WorkItem]:
        return []

    def throughput(self) -> ThroughputEstimate:
        return ThroughputEstimate()


@dataclass
class Agent:
    app: web.Application
    client: aiohttp.ClientSession
    url: str

    async def readyz(self) -> tuple[int, str]:
        async with self.client.get(self.url + "/readyz") as response:
            return response.status, (await response.json())["status"]

    def remaining_deadline_s(self) -> float:
        state = self.app[AGENT]
        return state.drain_deadline_s - state.clock()


@asynccontextmanager
async def served_agent(provider: str, metadata_url: str, **overrides: Any) -> AsyncIterator[Agent]:
    data = node_config_data(
        spot_notices=provider,
        metadata_url=metadata_url,
        spot_poll_interval_s=POLL_S,
        drain_timeout_s=600,  # long: the notice, not the node's own limit, sets the deadline
    )
    data.update(overrides)
    app = init(NodeConfig.model_validate(data), backend=IdleBackend(), environ={})
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as client:
            yield Agent(app, client, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# AWS


def test_aws_notice_drains_the_agent_before_the_action_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=SPOT_LOGGER)
    action_at = int(time.time()) + 100

    async def scenario() -> None:
        notice = {"action": "terminate", "time": aws_time(action_at)}
        async with (
            FakeAws(notice=notice, expire_after=2) as imds,
            served_agent("aws", imds.url) as agent,
        ):
            state = agent.app[AGENT]
            await wait_until(lambda: imds.polls >= 2, "the first polls")
            assert not state.draining
            assert await agent.readyz() == (200, "ready")

            await wait_until(lambda: state.draining, "the drain")
            # The drain ends SHUTDOWN_MARGIN_S before the action time.
            expected = action_at - time.time() - SHUTDOWN_MARGIN_S
            assert agent.remaining_deadline_s() == pytest.approx(expected, abs=0.3)
            assert await agent.readyz() == (503, "draining")
            await asyncio.wait_for(agent.app[DRAINED].wait(), 5)  # nothing in flight

            # Polling stopped with the notice.
            polls = imds.polls
            await asyncio.sleep(10 * POLL_S)
            assert imds.polls == polls == QUIET_POLLS + 1
            assert state.spot is not None and state.spot.notice is not None
            assert state.spot.notice.kind == "terminate"

            # IMDSv2: a token with a TTL, sent with every GET; the expired one was renewed once.
            assert imds.tokens == ["token-0", "token-1"]
            for put in imds.requests("/latest/api/token", "PUT"):
                assert put.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
            gets = imds.requests("/latest/meta-data/")
            assert all("X-aws-ec2-metadata-token" in g.headers for g in gets)
            assert [g.status for g in gets].count(401) == 1  # the expired token, retried at once
            # No notice yet: the rebalance recommendation is checked too (404 here).
            assert imds.requests("/latest/meta-data/events/recommendations/rebalance")

    run(scenario())
    lines = spot_records(caplog)
    assert len(lines) == 1, lines
    assert "spot interruption notice (aws: terminate at" in lines[0]


def test_aws_rebalance_recommendation_is_logged_once_and_does_not_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=SPOT_LOGGER)

    async def scenario() -> None:
        rebalance = {"noticeTime": aws_time(time.time())}
        async with FakeAws(rebalance=rebalance) as imds:
            drained: list[SpotNotice] = []
            watcher = SpotWatcher(
                "aws", on_notice=drained.append, metadata_url=imds.url, poll_interval_s=POLL_S
            )
            watcher.start()
            await wait_until(lambda: imds.polls >= 5, "polls after the recommendation")
            await watcher.stop()
            assert not drained
            assert len(imds.requests("/latest/meta-data/events/recommendations/rebalance")) == 1

    run(scenario())
    lines = spot_records(caplog)
    assert len(lines) == 1 and "rebalance recommendation" in lines[0], lines


@pytest.mark.parametrize(
    ("notice", "reclaim_in", "deadline"),
    [
        ({"action": "terminate", "time": "+120"}, 120.0, 110.0),
        ({"action": "stop", "time": "+15"}, 15.0, 5.0),
        ({"action": "terminate", "time": "+8"}, 8.0, 0.0),  # too late to let anything finish
        ({"action": "hibernate", "time": "+0"}, 0.0, 0.0),  # no two-minute warning
        ({"action": "terminate", "time": "yesterday-ish"}, 120 - 1.0, 109.0),  # unreadable time
    ],
)
def test_aws_deadline_rule(notice: dict[str, str], reclaim_in: float, deadline: float) -> None:
    clock = FakeClock()
    if notice["time"].startswith("+"):
        notice = {**notice, "time": aws_time(clock.now + float(notice["time"][1:]))}

    async def scenario() -> SpotNotice:
        async with FakeAws(notice=notice, quiet_polls=0) as imds:
            watcher = SpotWatcher(
                "aws",
                on_notice=lambda n: None,
                metadata_url=imds.url,
                poll_interval_s=1.0,
                clock=clock,
            )
            try:
                return await watcher.run()
            finally:
                await watcher.stop()

    seen = run(scenario())
    assert seen.reclaim_in_s == pytest.approx(reclaim_in)
    assert seen.drain_deadline_s == pytest.approx(deadline)


# --------------------------------------------------------------------------------------------
# GCP


def test_gcp_preemption_drains_the_agent_within_the_30_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=SPOT_LOGGER)

    async def scenario() -> None:
        async with FakeGcp() as server, served_agent("gcp", server.url) as agent:
            state = agent.app[AGENT]
            await wait_until(lambda: server.polls >= 2, "the first polls")
            assert not state.draining
            await wait_until(lambda: state.draining, "the drain")
            # 30 s from the flag turning TRUE (at most a poll interval before it was seen),
            # less the shutdown margin.
            expected = 30 - POLL_S - SHUTDOWN_MARGIN_S
            assert agent.remaining_deadline_s() == pytest.approx(expected, abs=0.3)
            assert await agent.readyz() == (503, "draining")
            await asyncio.wait_for(agent.app[DRAINED].wait(), 5)
            await asyncio.sleep(10 * POLL_S)
            assert server.polls == QUIET_POLLS + 1  # polling stopped
            assert all(s.status == 200 for s in server.seen)  # the header was always sent

    run(scenario())
    lines = spot_records(caplog)
    assert len(lines) == 1 and "spot interruption notice (gcp: preempted" in lines[0], lines


@pytest.mark.parametrize(("max_drain_s", "deadline"), [(600.0, 30 - 2.0 - 10), (5.0, 5.0)])
def test_gcp_deadline_rule(max_drain_s: float, deadline: float) -> None:
    async def scenario() -> SpotNotice:
        async with FakeGcp(quiet_polls=0) as server:
            watcher = SpotWatcher(
                "gcp",
                on_notice=lambda n: None,
                metadata_url=server.url,
                poll_interval_s=2.0,
                max_drain_s=max_drain_s,
            )
            try:
                return await watcher.run()
            finally:
                await watcher.stop()

    seen = run(scenario())
    assert seen.reclaim_in_s == 28.0  # the flag may have turned a poll interval before
    assert seen.drain_deadline_s == deadline


def test_gcp_deadline_never_exceeds_the_nodes_drain_timeout() -> None:
    async def scenario() -> None:
        async with (
            FakeGcp(quiet_polls=0) as server,
            served_agent("gcp", server.url, drain_timeout_s=4) as agent,
        ):
            await wait_until(lambda: agent.app[AGENT].draining, "the drain")
            assert agent.remaining_deadline_s() == pytest.approx(4, abs=0.3)

    run(scenario())


def test_a_notice_shortens_a_drain_already_under_way() -> None:
    """A drain begun by /admin/drain or SIGTERM with a long deadline is brought forward."""

    async def scenario() -> None:
        async with (
            FakeGcp(quiet_polls=10) as server,
            served_agent("gcp", server.url) as agent,
        ):
            from runtime.agent.app import begin_drain

            begin_drain(agent.app, 300)
            await wait_until(lambda: server.polls > 10, "the notice")
            await asyncio.sleep(5 * POLL_S)
            expected = 30 - POLL_S - SHUTDOWN_MARGIN_S
            assert agent.remaining_deadline_s() == pytest.approx(expected, abs=0.3)

    run(scenario())


# --------------------------------------------------------------------------------------------
# Azure


def test_azure_preempt_for_this_vm_drains_and_is_acknowledged_after_the_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=SPOT_LOGGER)
    not_before = int(time.time()) + 40
    others = azure_event("other-1", ["spot-vm-2", "spot-vm-3"], rfc1123(not_before - 20))
    ours = azure_event("ours-1", ["Spot-VM-1"], rfc1123(not_before))  # names are case-blind
    reboot = azure_event("reboot-1", ["spot-vm-1"], rfc1123(not_before - 30), kind="Reboot")
    documents = [[], [], [others], [others, reboot], [others, reboot], [others, ours, reboot]]

    async def scenario() -> None:
        async with (
            FakeAzure(documents=documents) as server,
            served_agent("azure", server.url) as agent,
        ):
            state = agent.app[AGENT]
            drained_when_acked: list[bool] = []
            server.on_ack = lambda: drained_when_acked.append(agent.app[DRAINED].is_set())

            await wait_until(lambda: server.polls >= len(documents) - 1, "the other VM's events")
            assert not state.draining  # another VM's Preempt and our Reboot are no notice

            # Something in flight keeps the drain going: the event is approved only after it.
            async def forward() -> None:
                await asyncio.sleep(0.3)

            task = asyncio.get_running_loop().create_task(forward())
            state.forwards["in-flight"] = task
            task.add_done_callback(lambda _: state.forwards.pop("in-flight"))

            await wait_until(lambda: state.draining, "the drain")
            expected = not_before - time.time() - SHUTDOWN_MARGIN_S
            assert agent.remaining_deadline_s() == pytest.approx(expected, abs=0.3)
            assert await agent.readyz() == (503, "draining")
            assert server.acks == []  # not while the drain runs
            await asyncio.wait_for(agent.app[DRAINED].wait(), 5)
            await wait_until(lambda: bool(server.acks), "the acknowledgement")
            assert server.acks == [{"StartRequests": [{"EventId": "ours-1"}]}]
            assert drained_when_acked == [True]
            assert task.done()
            assert state.spot is not None and state.spot.acknowledged

            polls = server.polls
            await asyncio.sleep(10 * POLL_S)
            assert server.polls == polls  # polling stopped
            # Every request had the Metadata header and the right api-version (else 400).
            assert all(s.status == 200 for s in server.seen), [
                (s.path_qs, s.status) for s in server.seen
            ]
            assert len(server.requests("/metadata/instance/compute/name")) == 1  # cached

    run(scenario())
    lines = spot_records(caplog)
    assert len(lines) == 1, lines
    assert "spot interruption notice (azure: Preempt event ours-1 not before" in lines[0]


def test_azure_acknowledgement_under_way_survives_the_shutdown_that_follows_the_drain() -> None:
    """`fleetform agent` stops the app as soon as DRAINED is set; the approval must not be
    cancelled half-way."""

    async def scenario() -> None:
        event = azure_event("ours-2", ["spot-vm-1"], rfc1123(time.time() + 60))
        async with FakeAzure(documents=[[event]], ack_delay_s=0.3) as server:
            async with served_agent("azure", server.url) as agent:
                watcher = agent.app[AGENT].spot
                assert watcher is not None
                await asyncio.wait_for(agent.app[DRAINED].wait(), 5)
            # The app is stopped (as serve() does right after the drain).
            assert server.acks == [{"StartRequests": [{"EventId": "ours-2"}]}]
            assert watcher.acknowledged

    run(scenario())


@pytest.mark.parametrize(
    ("event", "deadline"),
    [
        (azure_event("e", ["spot-vm-1"], "+45"), 35.0),
        (azure_event("e", ["spot-vm-1"], "+400", kind="Terminate"), 390.0),  # capped: 200
        (azure_event("e", ["spot-vm-1"], ""), 0.0),  # already started: abort at once
        (azure_event("e", ["spot-vm-1"], "not a date"), 30.0 - 1.0 - 10.0),
    ],
)
def test_azure_deadline_rule(event: dict[str, Any], deadline: float) -> None:
    clock = FakeClock()
    if event["NotBefore"].startswith("+"):
        event = {**event, "NotBefore": rfc1123(clock.now + float(event["NotBefore"][1:]))}

    async def scenario() -> SpotNotice:
        async with FakeAzure(documents=[[event]]) as server:
            watcher = SpotWatcher(
                "azure",
                on_notice=lambda n: None,
                drained=None,
                metadata_url=server.url,
                poll_interval_s=1.0,
                max_drain_s=200.0,
                clock=clock,
            )
            try:
                return await watcher.run()
            finally:
                await watcher.stop()

    seen = run(scenario())
    assert seen.drain_deadline_s == pytest.approx(min(deadline, 200.0))
    assert seen.event_ids == ("e",)


# --------------------------------------------------------------------------------------------
# Errors


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now: connection refused


@dataclass
class FakeBroken(FakeMetadata):
    """Answers every request with ``status`` (or hangs for ``delay_s`` first)."""

    status: int = 500
    delay_s: float = 0.0

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.answer)

    async def answer(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status, text="TRUE?" if self.status == 200 else "oops")


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
@pytest.mark.parametrize("failure", ["refused", "500", "timeout", "garbage"])
def test_an_unreadable_metadata_service_is_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture, provider: str, failure: str
) -> None:
    caplog.set_level(logging.INFO, logger=SPOT_LOGGER)
    clock = FakeClock()

    async def scenario() -> None:
        server = FakeBroken(
            status=200 if failure == "garbage" else 500,
            delay_s=0.3 if failure == "timeout" else 0.0,
        )
        async with server:
            url = closed_port_url() if failure == "refused" else server.url
            notices: list[SpotNotice] = []
            watcher = SpotWatcher(
                provider,  # type: ignore[arg-type]
                on_notice=notices.append,
                metadata_url=url,
                poll_interval_s=0.005,
                timeout_s=0.05,
                clock=clock,
            )
            attempts = server.seen if failure != "refused" else None
            watcher.start()
            await asyncio.sleep(0.4)
            assert len(spot_records(caplog)) == 1  # however many polls failed
            if attempts is not None:
                assert len(attempts) >= 3
            clock.now += 61  # a minute later: one more line, counting the failures in between
            await asyncio.sleep(0.15)
            await watcher.stop()
            assert not notices

    run(scenario())
    lines = spot_records(caplog)
    assert len(lines) == 2, lines
    assert all("cannot read the" in line and "still polling" in line for line in lines)
    assert "more failures since the last report" in lines[1]


def test_the_agent_keeps_serving_when_the_metadata_service_is_dead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=SPOT_LOGGER)

    async def scenario() -> None:
        async with served_agent("aws", closed_port_url()) as agent:
            await asyncio.sleep(20 * POLL_S)
            assert await agent.readyz() == (200, "ready")
            assert not agent.app[AGENT].draining
            assert agent.app[AGENT].spot is not None
            task = agent.app[AGENT].spot._task
            assert task is not None and not task.done()  # still polling

    run(scenario())
    assert len(spot_records(caplog)) == 1


def test_a_recovered_metadata_service_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=SPOT_LOGGER)

    async def scenario() -> None:
        async with FakeGcp(quiet_polls=1000) as server:
            watcher = SpotWatcher(
                "gcp", on_notice=lambda n: None, metadata_url=server.url, poll_interval_s=POLL_S
            )
            server.preempt = False
            good_url = watcher.metadata_url
            watcher.metadata_url = closed_port_url()
            watcher.start()
            await asyncio.sleep(5 * POLL_S)
            watcher.metadata_url = good_url
            await wait_until(lambda: server.polls >= 3, "polls after the recovery")
            await watcher.stop()

    run(scenario())
    messages = spot_records(caplog, logging.INFO)
    assert len(messages) == 2, messages
    assert "answers again" in messages[1]


def test_poll_once_raises_metadata_error_for_a_refusal() -> None:
    async def scenario() -> None:
        async with FakeGcp() as server:
            # The fake answers 403 without the Metadata-Flavor header: FALSE means it was sent.
            watcher = SpotWatcher("gcp", on_notice=lambda n: None, metadata_url=server.url)
            try:
                assert await watcher.poll_once() is None
            finally:
                await watcher.stop()
        async with FakeBroken(status=403) as broken:
            watcher = SpotWatcher("gcp", on_notice=lambda n: None, metadata_url=broken.url)
            try:
                with pytest.raises(MetadataError, match="HTTP 403"):
                    await watcher.poll_once()
            finally:
                await watcher.stop()

    run(scenario())


def test_drain_deadline_rule() -> None:
    assert drain_deadline_s(120.0) == 110.0
    assert drain_deadline_s(120.0, max_drain_s=30.0) == 30.0
    assert drain_deadline_s(5.0) == 0.0
    assert drain_deadline_s(-3.0) == 0.0
    assert drain_deadline_s(40.0, margin_s=0.0) == 40.0


def test_watcher_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="provider"):
        SpotWatcher("oci", on_notice=lambda n: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metadata_url"):
        SpotWatcher("aws", on_notice=lambda n: None, metadata_url="169.254.169.254")
    with pytest.raises(ValueError, match="poll_interval_s"):
        SpotWatcher("aws", on_notice=lambda n: None, poll_interval_s=0)
    assert SpotWatcher("aws", on_notice=lambda n: None).poll_interval_s == 5.0
    assert SpotWatcher("azure", on_notice=lambda n: None).poll_interval_s == 1.0


# --------------------------------------------------------------------------------------------
# Configuration and `fleetform agent`


def agent_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def test_a_node_config_without_spot_notices_has_no_watcher() -> None:
    app = init(NodeConfig.model_validate(node_config_data()), backend=IdleBackend(), environ={})
    assert app[AGENT].spot is None
    assert NodeConfig.model_validate(node_config_data()).metadata_url == "http://169.254.169.254"


def test_cli_spot_options_reach_the_node_config(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    path.write_text(json.dumps(node_config_data()))
    args = agent_args(
        "--config", str(path), "--spot-notices", "azure", "--metadata-url", "http://127.0.0.1:9"
    )
    config = _load_config(args)
    assert isinstance(config, NodeConfig)
    assert (config.spot_notices, config.metadata_url) == ("azure", "http://127.0.0.1:9")
    plain = _load_config(agent_args("--config", str(path)))
    assert isinstance(plain, NodeConfig) and plain.spot_notices is None

    bad = agent_args("--config", str(path), "--spot-notices", "gcp", "--metadata-url", "nope")
    with pytest.raises(NodeConfigError, match="metadata_url") as error:
        _load_config(bad)
    assert "\n" not in str(error.value)
    with pytest.raises(SystemExit):
        agent_args("--config", str(path), "--spot-notices", "oci")


def test_cli_spot_options_reach_a_config_cut_from_a_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETFORM_DEMO_KEY", "demo-secret")
    monkeypatch.setenv("FLEETFORM_BATCH_KEY", "batch-secret")
    args = agent_args(
        "--stack",
        str(REPO / "stacks" / "local.yaml"),
        "--pool",
        "local-cheap",
        "--spot-notices",
        "aws",
        "--metadata-url",
        "http://127.0.0.1:9",
    )
    config = _load_config(args)
    assert isinstance(config, NodeConfig)
    assert (config.spot_notices, config.metadata_url) == ("aws", "http://127.0.0.1:9")


def test_agent_process_drains_on_a_spot_notice_and_a_later_sigterm_does_not_abort(
    tmp_path: Path,
) -> None:
    """`fleetform agent --spot-notices gcp --metadata-url ...`: a request in flight when the
    notice comes finishes although SIGTERM follows (as the OS shutdown after a GCP preemption
    sends it), and the process exits 0. An upstream engine spares loading the model."""
    arrived, release, preempt = threading.Event(), threading.Event(), threading.Event()
    upstream = LiveApp(_slow_upstream_app(arrived, release))
    metadata = LiveApp(_gcp_app(preempt))
    log_path = tmp_path / "agent.log"
    process: subprocess.Popen[str] | None = None
    try:
        data = node_config_data(
            engine={"kind": "openai-upstream", "url": f"{upstream.url}/v1", "model": "up"},
            spot_poll_interval_s=0.1,
        )
        path = tmp_path / "node.json"
        path.write_text(json.dumps(data))
        argv = ["--config", str(path), "--spot-notices", "gcp", "--metadata-url", metadata.url]
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "agent", *argv, "--log-level", "INFO"],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        assert match, line + log_path.read_text()
        port = int(match.group(1))
        _wait(lambda: _status(port, "GET", "/readyz")[0] == 200, "the upstream to be probed")

        answers: queue.Queue[tuple[int, Any]] = queue.Queue()
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        thread = threading.Thread(
            target=lambda: answers.put(_status(port, "POST", "/v1/completions", body))
        )
        thread.start()
        assert arrived.wait(10), log_path.read_text()
        preempt.set()
        _wait(lambda: _status(port, "GET", "/readyz")[0] == 503, "the drain")
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # a second-signal abort would land now
        release.set()
        thread.join(30)
        status, answer = answers.get_nowait()
        assert status == 200, answer
        assert answer["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=30) == 0
    finally:
        release.set()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        upstream.stop()
        metadata.stop()
    log = log_path.read_text()
    assert "spot interruption notice (gcp: preempted" in log
    assert "draining with a 19.9s deadline" in log  # 30 - 0.1 (poll interval) - 10
    assert "SIGTERM: already draining" in log
    assert "second SIGTERM" not in log


def _status(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {KEYS['demo']}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except OSError as error:
        return 0, str(error)
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode("utf-8", "replace")


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _gcp_app(preempt: threading.Event) -> web.Application:
    async def preempted(request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403)
        return web.Response(text="TRUE" if preempt.is_set() else "FALSE")

    app = web.Application()
    app.router.add_get("/computeMetadata/v1/instance/preempted", preempted)
    return app


def _slow_upstream_app(arrived: threading.Event, release: threading.Event) -> web.Application:
    """An OpenAI-compatible upstream whose completion streams one token, then waits for
    ``release`` before the last one."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "up", "max_model_len": 128}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "a", "finish_reason": null}]}\n\n')
        arrived.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        await response.write(b'data: {"choices": [{"text": "b", "finish_reason": "length"}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app
