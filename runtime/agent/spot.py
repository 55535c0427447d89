"""Spot interruption notices: poll the cloud's instance metadata and drain the node in time.

This module owns :class:`SpotWatcher`, a background task of the agent (``spot_notices`` in the
node config, ``fleetform agent --spot-notices {aws,gcp,azure}``). It polls the instance metadata
service for the notice a cloud gives before it reclaims spot capacity. On the first notice it
calls ``on_notice`` once (the app starts a drain with :func:`runtime.agent.app.begin_drain`),
logs one line and stops polling.

Providers (the metadata base URL defaults to ``http://169.254.169.254``, where all three answer)
    ``aws``
        IMDSv2: a session token from ``PUT /latest/api/token`` (header
        ``X-aws-ec2-metadata-token-ttl-seconds``), sent as ``X-aws-ec2-metadata-token`` with
        ``GET /latest/meta-data/spot/instance-action``: 404 while there is no notice; 200 with
        ``{"action": "terminate"|"stop"|"hibernate", "time": "<UTC ISO 8601>"}`` about two
        minutes before the action. A 401 means the token expired or was revoked: a new one is
        fetched and the request repeated once. ``/latest/meta-data/events/recommendations/
        rebalance`` (``{"noticeTime": ...}``) is read too but only logged: it says the risk of
        interruption is elevated, not that the instance will go, and draining on it would idle
        capacity that may well keep running.
    ``gcp``
        ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google``: the body
        is ``FALSE``, or ``TRUE`` once preemption has begun. A Spot VM gets 30 seconds between
        the ACPI soft off and the hard off; the flag carries no time, so the notice is taken to
        have arrived a poll interval before it was seen.
    ``azure``
        Scheduled Events: ``GET /metadata/scheduledevents?api-version=2020-07-01`` with
        ``Metadata: true``. A ``Preempt`` (Spot eviction, at least 30 s ahead) or ``Terminate``
        (deletion, 5 to 15 minutes ahead) event whose ``Resources`` name this VM (from
        ``/metadata/instance/compute/name?api-version=2021-02-01&format=text``) is a notice; its
        ``NotBefore`` (RFC 1123, blank once ``Started``) is the earliest the VM goes. Events go to
        every VM of an availability set or scale set placement group, so others' are ignored.
        The event is acknowledged (``POST`` of ``{"StartRequests": [{"EventId": ...}]}``) only
        once the drain is over (``drained`` is set): approving an event lets Azure start it at
        once, which would throw away the notice period the drain needs; approving it afterwards
        lets the platform go ahead without waiting for ``NotBefore``.

Drain deadline
    ``reclaim_in`` is the time from the notice being seen until the instance goes: AWS ``time``
    minus now (0 for ``hibernate``, which gets no two-minute warning), GCP 30 s minus the poll
    interval, Azure ``NotBefore`` minus now (0 for an event already started). In-flight requests
    get ``min(max_drain_s, reclaim_in - margin_s)`` (never below 0): ``max_drain_s`` is the node's
    ``drain_timeout_s`` (a notice never lengthens a drain beyond what the operator allows), and
    ``margin_s`` (default :data:`SHUTDOWN_MARGIN_S`) is kept for what follows the deadline: aborted
    requests winding down (``ABORT_GRACE_S`` in the app) and the last usage push to the
    controller. A notice whose time cannot be read counts from the provider's documented notice
    period (AWS 120 s, Azure Preempt 30 s, Terminate 5 min) less a poll interval.

Errors
    A metadata service that cannot be reached, times out, answers 5xx or something unreadable
    is logged at most once per ``error_log_interval_s`` (a minute; the next line counts the
    failures in between) and polling goes on: a node that is not on the configured cloud, or
    whose metadata service is briefly away, keeps serving. Requests never go through a proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import aiohttp
import aiohttp.web

__all__ = [
    "DEFAULT_METADATA_URL",
    "PROVIDERS",
    "SHUTDOWN_MARGIN_S",
    "MetadataError",
    "SpotNotice",
    "SpotProvider",
    "SpotWatcher",
    "drain_deadline_s",
]

log = logging.getLogger("fleetform.agent.spot")

SpotProvider = Literal["aws", "gcp", "azure"]
PROVIDERS: tuple[SpotProvider, ...] = ("aws", "gcp", "azure")
DEFAULT_METADATA_URL = "http://169.254.169.254"
# AWS recommends checking every 5 s (two minutes of notice); GCP and Azure can give only 30 s,
# and Azure recommends polling once a second.
DEFAULT_POLL_INTERVAL_S: Mapping[SpotProvider, float] = {"aws": 5.0, "gcp": 1.0, "azure": 1.0}
# Kept between the drain deadline and the reclaim: the app's ABORT_GRACE_S (5 s) for aborted
# requests to wind down, then up to 5 s for the pusher's final usage flush.
SHUTDOWN_MARGIN_S = 10.0
REQUEST_TIMEOUT_S = 2.0  # the metadata service is link-local: it answers in milliseconds or not
ERROR_LOG_INTERVAL_S = 60.0

AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
AWS_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
AWS_TOKEN_TTL_S = 21600  # the longest IMDSv2 allows; renewed a minute early and on any 401
AWS_NOTICE_S = 120.0

GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCP_HEADERS = {"Metadata-Flavor": "Google"}
GCP_NOTICE_S = 30.0  # ACPI G2 soft off to G3 mechanical off for Spot VMs

AZURE_EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
AZURE_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
AZURE_HEADERS = {"Metadata": "true"}
# The first events request enables Scheduled Events for the VM and may take up to two minutes.
AZURE_FIRST_CALL_TIMEOUT_S = 120.0
# Event types that take the VM away, with their documented minimum notice.
AZURE_MIN_NOTICE_S = {"Preempt": 30.0, "Terminate": 300.0}
AZURE_ACK_ATTEMPTS = 3


class MetadataError(Exception):
    """The metadata service could not be read: unreachable, timeout, 5xx, unexpected answer."""


@dataclass(frozen=True)
class SpotNotice:
    """An interruption notice as seen by the watcher.

    ``reclaim_in_s`` is the estimated time from detection until the instance goes;
    ``drain_deadline_s`` the drain deadline the watcher asked for (see the module docstring);
    ``event_ids`` the Azure events acknowledged once the drain is over.
    """

    provider: SpotProvider
    kind: str  # AWS action, "preempted" on GCP, Azure EventType
    reclaim_in_s: float
    detail: str
    event_ids: tuple[str, ...] = ()
    drain_deadline_s: float = 0.0


def drain_deadline_s(
    reclaim_in_s: float, *, max_drain_s: float = math.inf, margin_s: float = SHUTDOWN_MARGIN_S
) -> float:
    """How long in-flight requests may run after a notice: until ``margin_s`` before the
    reclaim, at most ``max_drain_s``, never negative."""
    return max(0.0, min(max_drain_s, reclaim_in_s - margin_s))


class _Metadata:
    """HTTP to the metadata service: (status, body), or :class:`MetadataError`."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout_s = timeout_s

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        data: bytes | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, str]:
        where = f"{method} {path.partition('?')[0]}"
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                headers=dict(headers),
                data=data,
                timeout=aiohttp.ClientTimeout(total=timeout_s or self.timeout_s),
                allow_redirects=False,
            ) as response:
                body = (await response.read()).decode("utf-8", "replace")
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            detail = str(error) or "no answer"
            raise MetadataError(f"{where}: {type(error).__name__}: {detail}") from None
        if status >= 500:
            raise MetadataError(f"{where}: HTTP {status}")
        return status, body


class _Provider(Protocol):
    async def poll(self, md: _Metadata) -> SpotNotice | None: ...
    async def acknowledge(self, md: _Metadata, notice: SpotNotice) -> None: ...


def _epoch(moment: datetime) -> float:
    if moment.tzinfo is None:  # the clouds give UTC; a zone-less time is taken as UTC too
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class _Aws:
    def __init__(self, clock: Callable[[], float], poll_interval_s: float) -> None:
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._token: str | None = None
        self._token_renew_at = 0.0
        self.rebalance_seen = False

    async def _session_token(self, md: _Metadata) -> str:
        now = self._clock()
        if self._token is None or now >= self._token_renew_at:
            headers = {AWS_TOKEN_TTL_HEADER: str(AWS_TOKEN_TTL_S)}
            status, body = await md.request("PUT", AWS_TOKEN_PATH, headers)
            if status != 200 or not body.strip():
                raise MetadataError(f"PUT {AWS_TOKEN_PATH}: HTTP {status}")
            self._token = body.strip()
            self._token_renew_at = now + AWS_TOKEN_TTL_S - 60
        return self._token

    async def _get(self, md: _Metadata, path: str) -> tuple[int, str]:
        token = await self._session_token(md)
        status, body = await md.request("GET", path, {AWS_TOKEN_HEADER: token})
        if status == 401:  # the token expired or was revoked: one more try with a fresh one
            self._token = None
            token = await self._session_token(md)
            status, body = await md.request("GET", path, {AWS_TOKEN_HEADER: token})
        return status, body

    async def poll(self, md: _Metadata) -> SpotNotice | None:
        status, body = await self._get(md, AWS_ACTION_PATH)
        if status == 200:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if not isinstance(data, dict):  # not IMDS talking, e.g. a captive web server
                raise MetadataError(f"GET {AWS_ACTION_PATH}: unexpected answer {body[:40]!r}")
            return self._notice(data)
        if status != 404:
            raise MetadataError(f"GET {AWS_ACTION_PATH}: HTTP {status}")
        if not self.rebalance_seen:
            status, body = await self._get(md, AWS_REBALANCE_PATH)
            if status == 200:
                self.rebalance_seen = True
                log.warning(
                    "spot: EC2 rebalance recommendation %s: interruption risk is elevated; the "
                    "node keeps serving and drains on an interruption notice",
                    body.strip()[:100],
                )
            elif status != 404:
                raise MetadataError(f"GET {AWS_REBALANCE_PATH}: HTTP {status}")
        return None

    def _notice(self, data: Mapping[str, Any]) -> SpotNotice:
        # A notice whose time cannot be read is a notice still: draining on the documented two
        # minutes beats serving until the instance vanishes.
        action = str(data.get("action", "unknown"))
        stamp, at = str(data.get("time", "an unknown time")), None
        with contextlib.suppress(ValueError):
            at = _epoch(datetime.fromisoformat(stamp.replace("Z", "+00:00")))
        if action == "hibernate":
            reclaim_in = 0.0  # hibernation begins at once: there is no two-minute warning
        elif at is not None:
            reclaim_in = at - self._clock()
        else:
            reclaim_in = AWS_NOTICE_S - self._poll_interval_s
        return SpotNotice("aws", action, reclaim_in, f"{action} at {stamp}")

    async def acknowledge(self, md: _Metadata, notice: SpotNotice) -> None:
        return None


class _Gcp:
    def __init__(self, poll_interval_s: float) -> None:
        self._poll_interval_s = poll_interval_s

    async def poll(self, md: _Metadata) -> SpotNotice | None:
        status, body = await md.request("GET", GCP_PREEMPTED_PATH, GCP_HEADERS)
        if status != 200:
            raise MetadataError(f"GET {GCP_PREEMPTED_PATH}: HTTP {status}")
        value = body.strip().upper()
        if value == "FALSE":
            return None
        if value != "TRUE":
            raise MetadataError(f"GET {GCP_PREEMPTED_PATH}: unexpected answer {body[:40]!r}")
        # The flag may have turned TRUE up to a poll interval before this poll saw it.
        reclaim_in = GCP_NOTICE_S - self._poll_interval_s
        return SpotNotice("gcp", "preempted", reclaim_in, "preempted (30 s to hard off)")

    async def acknowledge(self, md: _Metadata, notice: SpotNotice) -> None:
        return None


class _Azure:
    def __init__(self, clock: Callable[[], float], poll_interval_s: float) -> None:
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self.vm_name: str | None = None
        self._enabled = False  # a first events request has been answered

    async def _vm_name(self, md: _Metadata) -> str:
        if self.vm_name is None:
            status, body = await md.request("GET", AZURE_NAME_PATH, AZURE_HEADERS)
            if status != 200 or not body.strip():
                raise MetadataError(f"GET /metadata/instance/compute/name: HTTP {status}")
            self.vm_name = body.strip()
        return self.vm_name

    async def poll(self, md: _Metadata) -> SpotNotice | None:
        name = (await self._vm_name(md)).casefold()
        timeout = None if self._enabled else AZURE_FIRST_CALL_TIMEOUT_S
        status, body = await md.request("GET", AZURE_EVENTS_PATH, AZURE_HEADERS, timeout_s=timeout)
        if status != 200:
            raise MetadataError(f"GET /metadata/scheduledevents: HTTP {status}")
        self._enabled = True
        try:
            events = json.loads(body)["Events"]
            if not isinstance(events, list):
                raise TypeError("Events is not a list")
        except (ValueError, KeyError, TypeError) as error:
            raise MetadataError(
                f"GET /metadata/scheduledevents: unreadable answer: {error}"
            ) from None
        ours: list[tuple[float, dict[str, Any]]] = []
        for event in events:
            if not isinstance(event, dict) or event.get("EventType") not in AZURE_MIN_NOTICE_S:
                continue  # Freeze, Reboot, Redeploy: the VM comes back; no drain
            resources = event.get("Resources")
            if not isinstance(resources, list) or not any(
                isinstance(r, str) and r.casefold() == name for r in resources
            ):
                continue  # another VM of the availability set or placement group
            ours.append((self._reclaim_in(event), event))
        if not ours:
            return None
        reclaim_in, first = min(ours, key=lambda item: item[0])
        ids = tuple(str(e["EventId"]) for _, e in ours if e.get("EventId"))
        not_before = first.get("NotBefore") or "now (started)"
        detail = f"{first['EventType']} event {first.get('EventId')} not before {not_before}"
        return SpotNotice("azure", str(first["EventType"]), reclaim_in, detail, event_ids=ids)

    def _reclaim_in(self, event: Mapping[str, Any]) -> float:
        not_before = event.get("NotBefore")
        if event.get("EventStatus") == "Started" or not not_before:
            return 0.0  # NotBefore is blank once the event has started
        try:
            return _epoch(parsedate_to_datetime(str(not_before))) - self._clock()
        except (ValueError, TypeError):
            return AZURE_MIN_NOTICE_S[str(event["EventType"])] - self._poll_interval_s

    async def acknowledge(self, md: _Metadata, notice: SpotNotice) -> None:
        if not notice.event_ids:
            return
        body = json.dumps({"StartRequests": [{"EventId": i} for i in notice.event_ids]})
        headers = {**AZURE_HEADERS, "Content-Type": "application/json"}
        status, text = await md.request("POST", AZURE_EVENTS_PATH, headers, data=body.encode())
        if status != 200:
            raise MetadataError(f"POST /metadata/scheduledevents: HTTP {status}: {text[:100]}")


class _ErrorLog:
    """One warning per interval at most; the next one counts the failures in between."""

    def __init__(self, clock: Callable[[], float], interval_s: float) -> None:
        self._clock = clock
        self._interval_s = interval_s
        self._logged_at: float | None = None
        self._unlogged = 0
        self._failing = False  # an error was logged and no success since

    def failed(self, what: str, error: BaseException) -> None:
        now = self._clock()
        # abs(): a wall clock stepped back must not silence the log for longer than the interval.
        if self._logged_at is not None and abs(now - self._logged_at) < self._interval_s:
            self._unlogged += 1
            return
        since = f" ({self._unlogged} more failures since the last report)" if self._unlogged else ""
        if isinstance(error, MetadataError):
            log.warning("spot: cannot read %s: %s%s; still polling", what, error, since)
        else:  # a bug in this module: the traceback helps, and serving must go on
            log.error("spot: polling %s failed%s; still polling", what, since, exc_info=error)
        self._logged_at = now
        self._unlogged = 0
        self._failing = True

    def succeeded(self, what: str) -> None:
        if self._failing:  # at most once per logged failure, so flapping cannot spam either
            log.info("spot: %s answers again", what)
            self._failing = False


OnNotice = Callable[[SpotNotice], object]


class SpotWatcher:
    """Polls for a spot interruption notice and reports the first one; see the module docstring.

    ``on_notice`` is called once, on the event loop, with the notice (its ``drain_deadline_s``
    set); ``drained`` is awaited before acknowledging Azure events (None: acknowledge at once).
    ``clock`` is wall-clock epoch seconds (notice times are absolute UTC); ``session`` an
    optional client session (default: one of its own, closed by :meth:`stop`).
    """

    def __init__(
        self,
        provider: SpotProvider,
        *,
        on_notice: OnNotice,
        drained: asyncio.Event | None = None,
        metadata_url: str = DEFAULT_METADATA_URL,
        poll_interval_s: float | None = None,
        max_drain_s: float = math.inf,
        margin_s: float = SHUTDOWN_MARGIN_S,
        timeout_s: float = REQUEST_TIMEOUT_S,
        error_log_interval_s: float = ERROR_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.time,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)} (got {provider!r})")
        if not metadata_url.startswith(("http://", "https://")):
            raise ValueError("metadata_url must be an http(s) URL")
        interval = DEFAULT_POLL_INTERVAL_S[provider] if poll_interval_s is None else poll_interval_s
        if interval <= 0 or timeout_s <= 0 or max_drain_s < 0 or margin_s < 0:
            raise ValueError(
                "poll_interval_s and timeout_s must be positive, the rest not negative"
            )
        self.provider: SpotProvider = provider
        self.metadata_url = metadata_url.rstrip("/")
        self.poll_interval_s = interval
        self.max_drain_s = max_drain_s
        self.margin_s = margin_s
        self.timeout_s = timeout_s
        self.notice: SpotNotice | None = None  # the notice acted on, once there is one
        self.acknowledged = False  # Azure: the notice's events were approved
        self._on_notice = on_notice
        self._drained = drained
        self._clock = clock
        self._errors = _ErrorLog(clock, error_log_interval_s)
        self._what = f"the {provider} instance metadata at {self.metadata_url}"
        self._impl: _Provider
        if provider == "aws":
            self._impl = _Aws(clock, interval)
        elif provider == "gcp":
            self._impl = _Gcp(interval)
        else:
            self._impl = _Azure(clock, interval)
        self._session = session
        self._owns_session = session is None
        self._acking = False  # the drain is over and the acknowledgement is on its way
        self._task: asyncio.Task[SpotNotice] | None = None

    def _metadata(self) -> _Metadata:
        if self._session is None or self._session.closed:
            # trust_env=False: metadata requests must never go through an HTTP(S)_PROXY.
            self._session = aiohttp.ClientSession(trust_env=False)
            self._owns_session = True
        return _Metadata(self.metadata_url, self._session, self.timeout_s)

    async def poll_once(self) -> SpotNotice | None:
        """One poll: the notice if there is one (deadline not yet set). Raises
        :class:`MetadataError` when the metadata service cannot be read."""
        return await self._impl.poll(self._metadata())

    async def run(self) -> SpotNotice:
        """Poll until a notice, act on it (see the class docstring) and return it."""
        while True:
            try:
                notice = await self.poll_once()
            except Exception as error:  # MetadataError, or a bug: neither may stop the agent
                self._errors.failed(self._what, error)
            else:
                self._errors.succeeded(self._what)
                if notice is not None:
                    break
            await asyncio.sleep(self.poll_interval_s)
        deadline = drain_deadline_s(
            notice.reclaim_in_s, max_drain_s=self.max_drain_s, margin_s=self.margin_s
        )
        notice = replace(notice, drain_deadline_s=deadline)
        self.notice = notice
        log.warning(
            "spot interruption notice (%s: %s, reclaim in %.0fs): draining with a %.1fs deadline",
            notice.provider,
            notice.detail,
            max(0.0, notice.reclaim_in_s),
            deadline,
        )
        try:
            self._on_notice(notice)
        except Exception:
            log.exception("spot: starting the drain failed")
        if notice.event_ids:
            if self._drained is not None:
                await self._drained.wait()
            self._acking = True
            await self._acknowledge(notice)
        return notice

    async def _acknowledge(self, notice: SpotNotice) -> None:
        for attempt in range(1, AZURE_ACK_ATTEMPTS + 1):
            try:
                await self._impl.acknowledge(self._metadata(), notice)
            except MetadataError as error:
                if attempt == AZURE_ACK_ATTEMPTS:
                    log.warning("spot: could not acknowledge %s: %s", notice.event_ids, error)
                    return
                await asyncio.sleep(self.poll_interval_s)
            else:
                self.acknowledged = True
                log.info("spot: acknowledged scheduled event(s) %s", ", ".join(notice.event_ids))
                return

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> None:
        """Start polling in the background (in the running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        """Stop polling (an acknowledgement already on its way gets a moment to arrive) and
        close the session it opened."""
        task, self._task = self._task, None
        if task is not None:
            if self._acking:
                await asyncio.wait({task}, timeout=self.timeout_s + 1.0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def lifecycle(self, app: aiohttp.web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx.append(watcher.lifecycle)``: poll while the app runs."""
        self.start()
        yield
        await self.stop()
