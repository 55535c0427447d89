"""The agent's metrics pusher: usage and a snapshot to the controller, leases and view back.

This module owns the agent side of ``POST /v1/push`` (:mod:`runtime.protocol`). A
:class:`MetricsPusher` runs as a background task: every ``interval_s`` it builds a
:class:`runtime.protocol.MetricsPush` from injected callables (the instance snapshot and the
tenants' recent use) plus the usage recorded since the last acknowledged push, posts it with the
fleet token, and hands the controller's :class:`runtime.protocol.PushReply` to ``on_reply``
(where the agent applies its leases and the fleet view). It never blocks serving:
:meth:`MetricsPusher.record_usage` only adds to in-memory buckets, and the HTTP call has a
timeout.

Exactly-once usage
    Each push carries a ``seq`` (0, 1, 2, ... for this process's ``boot_id``). Usage moves from
    the pending buffer into a push when that push is first built; until the controller answers
    it (accepted *or* duplicate), the same ``seq`` with the same usage is retried, with
    exponential backoff (``backoff_initial_s`` doubling up to ``backoff_max_s``, jittered
    downwards so agents do not return in lockstep). Usage recorded meanwhile waits for the next
    push. The controller counts a ``seq`` once, so a push whose reply was lost is not counted
    twice, and no usage is dropped while the controller is away.

The bound on unacknowledged usage
    Usage is bucketed per tenant and UTC hour. The pending buffer holds at most ``max_buckets``
    buckets (default 1024, at most the protocol's 10,000 per push); the push being retried holds
    at most as many again. When the pending buffer is full, new usage is *merged*, never
    dropped: into the same tenant's bucket with the nearest hour; or, for a tenant with no
    bucket yet, room is made by folding the oldest bucket of the tenant with the most buckets
    into its next-oldest. Only the hour attribution of merged usage becomes approximate; totals
    per tenant stay exact. (If there were more tenants than ``max_buckets``, each tenant would
    still get one bucket, so the bound is max(max_buckets, tenants).)

    Usage lives in memory only: what is unacknowledged when the process dies is lost.
    :meth:`MetricsPusher.stop` therefore tries to deliver it first, for up to
    ``flush_timeout_s``.

Rollouts
    Per-version stats (``versions``, a callable, like the snapshot: cumulative, rebuilt on every
    attempt) and shadow comparisons (:meth:`MetricsPusher.record_shadow`: moved into a push when
    it is first built and retried with it, like usage; at most ``MAX_SHADOW_REPORTS`` wait,
    the oldest are dropped beyond) ride along. Both are left out of the JSON when empty, so a
    push to a controller that predates rollouts stays what it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.web
from pydantic import ValidationError

from runtime.agent.config import NodeConfig, NodeConfigError
from runtime.protocol import (
    MAX_SHADOW_REPORTS,
    PUSH_PATH,
    InstanceSnapshot,
    MetricsPush,
    PushReply,
    ShadowReport,
    TenantRecentUse,
    UsageDelta,
    VersionStats,
)

__all__ = [
    "MAX_USAGE_ROWS",
    "MetricsPusher",
    "PushError",
    "UsageBuffer",
    "pusher_for_node",
]

log = logging.getLogger("fleetform.agent.push")

HOUR_S = 3600
# The most usage rows one MetricsPush may carry (`MetricsPush.usage` max_length).
MAX_USAGE_ROWS = 10_000
MAX_NAME_LENGTH = 128  # of agent_id and boot_id in the protocol
FLUSH_RETRY_S = 0.2  # between delivery attempts while stopping


class PushError(Exception):
    """One push attempt failed (unreachable, timeout, non-200, bad reply); it will be retried."""


@dataclass
class _Bucket:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accelerator_seconds: float = 0.0
    usd: float = 0.0

    def add(self, other: _Bucket) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.accelerator_seconds += other.accelerator_seconds
        self.usd += other.usd


class UsageBuffer:
    """Unacknowledged usage per (tenant, UTC hour), bounded as the module docstring says."""

    def __init__(self, max_buckets: int = 1024) -> None:
        if not 1 <= max_buckets <= MAX_USAGE_ROWS:
            raise ValueError(f"max_buckets must be within 1..{MAX_USAGE_ROWS}")
        self.max_buckets = max_buckets
        self.merges = 0  # usage added to a bucket of another hour because the buffer was full
        self._buckets: dict[tuple[str, int], _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def add(
        self,
        tenant: str,
        hour: int,
        *,
        requests: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        accelerator_seconds: float = 0.0,
        usd: float = 0.0,
    ) -> None:
        key = (tenant, hour)
        if key not in self._buckets and len(self._buckets) >= self.max_buckets:
            key = self._make_room(tenant, hour)
        self._buckets.setdefault(key, _Bucket()).add(
            _Bucket(requests, prompt_tokens, completion_tokens, accelerator_seconds, usd)
        )

    def _make_room(self, tenant: str, hour: int) -> tuple[str, int]:
        """The key new usage of (tenant, hour) goes under when the buffer is full."""
        self.merges += 1
        own = [h for t, h in self._buckets if t == tenant]
        if own:
            return tenant, min(own, key=lambda h: (abs(h - hour), -h))
        counts = Counter(t for t, _ in self._buckets)
        # Deterministic choice: most buckets, then name.
        crowded, count = max(counts.items(), key=lambda item: (item[1], item[0]))
        if count >= 2:
            oldest, next_oldest = sorted(h for t, h in self._buckets if t == crowded)[:2]
            folded = self._buckets.pop((crowded, oldest))
            self._buckets[(crowded, next_oldest)].add(folded)
        # else every bucket is another tenant's: the buffer grows by this tenant's one bucket.
        return tenant, hour

    def take(self) -> tuple[UsageDelta, ...]:
        """Everything buffered, as push rows (sorted by tenant and hour); the buffer empties."""
        rows = tuple(
            UsageDelta(
                tenant=tenant,
                hour=hour,
                requests=b.requests,
                prompt_tokens=b.prompt_tokens,
                completion_tokens=b.completion_tokens,
                accelerator_seconds=b.accelerator_seconds,
                usd=b.usd,
            )
            for (tenant, hour), b in sorted(self._buckets.items())
        )
        self._buckets.clear()
        return rows

    def totals(self) -> dict[str, dict[str, float]]:
        """Per tenant totals of what is buffered (for inspection and tests)."""
        out: dict[str, _Bucket] = {}
        for (tenant, _), bucket in self._buckets.items():
            out.setdefault(tenant, _Bucket()).add(bucket)
        return {tenant: vars(bucket).copy() for tenant, bucket in sorted(out.items())}


@dataclass(frozen=True)
class _Batch:
    """A push's identity and usage, fixed when it is first built and kept for its retries."""

    seq: int
    usage: tuple[UsageDelta, ...]
    shadow: tuple[ShadowReport, ...] = ()


OnReply = Callable[[PushReply], Awaitable[None] | None]


class MetricsPusher:
    """Pushes this agent's metrics and usage to the controller; see the module docstring."""

    def __init__(
        self,
        controller_url: str,
        fleet_token: str,
        *,
        agent_id: str,
        snapshot: Callable[[], InstanceSnapshot],
        recent_use: Callable[[], Mapping[str, TenantRecentUse]],
        on_reply: OnReply,
        versions: Callable[[], Sequence[VersionStats]] | None = None,
        interval_s: float = 2.0,
        timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        jitter: float = 0.2,
        max_buckets: int = 1024,
        clock: Callable[[], float] = time.time,
        boot_id: str | None = None,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not controller_url.startswith(("http://", "https://")):
            raise ValueError("controller_url must be an http(s) URL")
        if not fleet_token:
            raise ValueError("fleet_token is empty")
        if not 1 <= len(agent_id) <= MAX_NAME_LENGTH:
            raise ValueError(f"agent_id must be 1..{MAX_NAME_LENGTH} characters")
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be positive")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be within 0..1")
        self.url = controller_url.rstrip("/") + PUSH_PATH
        self.agent_id = agent_id
        self.boot_id = boot_id or uuid.uuid4().hex
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.jitter = jitter
        self.pending = UsageBuffer(max_buckets)
        self.acknowledged = 0  # pushes answered by the controller (accepted or duplicate)
        self.consecutive_failures = 0
        self.last_reply: PushReply | None = None
        self._headers = {"Authorization": f"Bearer {fleet_token}"}
        self._snapshot = snapshot
        self._recent_use = recent_use
        self._on_reply = on_reply
        self._versions = versions
        self.shadow_pending: deque[ShadowReport] = deque(maxlen=MAX_SHADOW_REPORTS)
        self.shadow_dropped = 0
        self._clock = clock
        self._rng = rng or random.Random()
        self._session = session
        self._owns_session = session is None
        self._next_seq = 0
        self._batch: _Batch | None = None
        self._task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------------
    # Recording (called on the serving path: cheap, never blocks)

    def record_usage(
        self,
        tenant: str,
        now: float,
        requests: int = 1,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        accelerator_seconds: float = 0.0,
        usd: float = 0.0,
    ) -> None:
        """Add one finished request's (or several's) usage at epoch time ``now``."""
        counts = (requests, prompt_tokens, completion_tokens)
        amounts = (accelerator_seconds, usd)
        if any(c < 0 for c in counts) or not all(math.isfinite(a) and a >= 0 for a in amounts):
            raise ValueError(f"usage must be finite and not negative (got {counts}, {amounts})")
        self.pending.add(
            tenant,
            int(now // HOUR_S) * HOUR_S,
            requests=requests,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            accelerator_seconds=accelerator_seconds,
            usd=usd,
        )

    def record_shadow(self, report: ShadowReport) -> None:
        """Queue one shadow comparison for the next push (the oldest go when too many wait)."""
        if len(self.shadow_pending) == self.shadow_pending.maxlen:
            self.shadow_dropped += 1
        self.shadow_pending.append(report)

    @property
    def unacknowledged_seq(self) -> int | None:
        """The seq being retried, if a push awaits its answer."""
        return None if self._batch is None else self._batch.seq

    @property
    def has_unacknowledged_usage(self) -> bool:
        return bool(self.pending) or (self._batch is not None and bool(self._batch.usage))

    # ----------------------------------------------------------------------------------------
    # Pushing

    async def push_once(self) -> PushReply:
        """One attempt: build the next push (or reuse the unanswered one), post it, hand the
        reply to ``on_reply``. Raises :class:`PushError` on failure; the batch is kept."""
        if self._batch is None:
            shadow = tuple(self.shadow_pending)
            self.shadow_pending.clear()
            self._batch = _Batch(self._next_seq, self.pending.take(), shadow)
            self._next_seq += 1
        batch = self._batch
        try:
            body = MetricsPush(
                agent_id=self.agent_id,
                boot_id=self.boot_id,
                seq=batch.seq,
                sent_at=self._clock(),
                instance=self._snapshot(),
                usage=list(batch.usage),
                recent_use=dict(self._recent_use()),
                versions=list(self._versions()) if self._versions is not None else [],
                shadow=list(batch.shadow),
            )
        except Exception as error:  # a bug in a callable must not stop usage delivery
            raise PushError(f"cannot build the push: {error}") from error
        reply = await self._post(body)
        self._batch = None
        self.acknowledged += 1
        self.last_reply = reply
        try:
            result = self._on_reply(reply)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # The push was acknowledged: its usage is counted, so it must not be sent again.
            log.exception("on_reply failed for push seq %d", batch.seq)
        return reply

    async def _post(self, body: MetricsPush) -> PushReply:
        session = self._ensure_session()
        # Rollout fields only when there is something in them (see the module docstring).
        empty = {name for name in ("versions", "shadow") if not getattr(body, name)}
        data = body.model_dump_json(exclude=empty or None).encode()
        headers = {**self._headers, "Content-Type": "application/json"}
        try:
            async with session.post(
                self.url,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise PushError(f"{type(error).__name__}: {error}") from None
        if status != 200:
            raise PushError(f"HTTP {status}: {_error_message(text)}")
        try:
            return PushReply.model_validate_json(text)
        except ValidationError as error:
            raise PushError(f"invalid reply: {error.errors()[0]['msg']}") from None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    def backoff_s(self, failures: int) -> float:
        """Delay before retrying after ``failures`` consecutive failures (>= 1)."""
        exponent = min(failures - 1, 60)  # keeps the power finite; any cap is reached long before
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2.0**exponent)
        return delay * (1.0 - self.jitter * self._rng.random())

    async def run(self) -> None:
        """Push forever (until cancelled): every ``interval_s``, or backing off on failure."""
        while True:
            try:
                await self.push_once()
            except PushError as error:
                self.consecutive_failures += 1
                delay = self.backoff_s(self.consecutive_failures)
                if self.consecutive_failures == 1:
                    log.warning("push to the controller failed (%s); retrying", error)
                else:
                    log.debug("push failed again (%s); retry in %.2fs", error, delay)
                await asyncio.sleep(delay)
                continue
            if self.consecutive_failures:
                log.info("controller reachable again after %d failures", self.consecutive_failures)
                self.consecutive_failures = 0
            await asyncio.sleep(self.interval_s)

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> None:
        """Start the background task (in the running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Stop pushing; first try for up to ``flush_timeout_s`` to deliver unacknowledged
        usage (0: do not try). Always closes the session it opened."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            if flush_timeout_s > 0 and self.has_unacknowledged_usage:
                await self._flush(flush_timeout_s)
        finally:
            if self._owns_session and self._session is not None:
                await self._session.close()
                self._session = None

    async def _flush(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while self.has_unacknowledged_usage:
                    try:
                        await self.push_once()
                    except PushError:
                        await asyncio.sleep(FLUSH_RETRY_S)
        except TimeoutError:
            log.warning(
                "stopping with usage the controller has not acknowledged (%d pending buckets%s)",
                len(self.pending),
                "" if self._batch is None else f", push seq {self._batch.seq} unanswered",
            )

    async def lifecycle(self, app: aiohttp.web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx.append(pusher.lifecycle)``: start with the app, stop with it."""
        self.start()
        yield
        await self.stop()


def pusher_for_node(
    config: NodeConfig,
    *,
    snapshot: Callable[[], InstanceSnapshot],
    recent_use: Callable[[], Mapping[str, TenantRecentUse]],
    on_reply: OnReply,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> MetricsPusher | None:
    """The pusher of a node, or None when the node has no ``controller_url``.

    The fleet token comes from the variable named by ``fleet_token_env``; a controller URL
    without a token is a configuration error (every push would be refused).
    """
    if config.controller_url is None:
        return None
    token = config.fleet_token(environ)
    if token is None:
        raise NodeConfigError(
            "controller_url is set but no fleet token is available "
            f"(fleet_token_env={config.fleet_token_env!r})"
        )
    return MetricsPusher(
        config.controller_url,
        token,
        agent_id=config.node_id,
        snapshot=snapshot,
        recent_use=recent_use,
        on_reply=on_reply,
        **options,
    )


def _error_message(text: str) -> str:
    """The message of an error body in the API's shape, else the start of the text."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    return str(message)[:200]
