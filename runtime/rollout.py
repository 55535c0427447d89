"""Model rollouts: moving a model's traffic from one version (variant) to another, with reasons.

This module owns the rollout *decision* and the traffic split that follows from it, and nothing
else. The spec states the plan (`ModelSpec.rollout`, a `runtime.spec.RolloutSpec`); every period
the controller measures both versions over the current window and calls
:meth:`RolloutController.decide`; the answer is a :class:`RolloutDecision` (an action, the traffic
split, the shadow fraction and the reasons). Agents turn the split into a version per request
with :func:`choose_version` and :func:`shadow_sample`, and pass it to ``runtime.routing.route``
as ``RouteRequest.version``. Nothing here does I/O or reads a clock: time comes in with each
call, so the controller and the simulator run the same code.

Versions and metrics
    A version is a variant of the model. :class:`VersionMetrics` describes one version over the
    *window*: the requests it finished since ``RolloutDecision.window_start`` (the start of the
    current canary step, so a step is judged only on traffic it received), how many of them
    failed (server-side failures; a 4xx, a 429 or a shed request is not the version's fault),
    the p95 of TTFT and of time per output token, and how many replicas serving it are ready.

canary
    ``pending`` until the candidate has a ready replica, then ``canary`` at step 1 of
    ``steps`` (percent of traffic on the candidate). On each call, once the candidate has
    served ``min_requests`` in the step, the step is judged against the stable version:

    * error rate: candidate minus stable above ``max_error_rate_delta`` is a breach;
    * TTFT p95: candidate above ``ttft_ratio`` x stable is a breach; TPOT p95 likewise with
      ``tpot_ratio``.

    Any breach rolls back at once (phase ``rolled-back``, all traffic on stable), with a reason
    per breached metric giving both figures and the margin. No breach, and ``step_interval_s``
    spent on the step: the next step, or, after the last, ``promote`` (all traffic on the
    candidate). Otherwise ``hold``, saying what is still missing. The stable figures compared
    against are the current window's when stable served ``min_requests`` in it; otherwise (at
    a 100 % step stable serves nothing) the last stable window that had, kept as the baseline.

    The hysteresis is explicit and asymmetric: stepping up needs both the evidence
    (``min_requests``) and the time (``step_interval_s``, which catches what only shows over
    time: cache growth, slow leaks, diurnal mix); rolling back needs only the evidence, since a
    breach is already known to hurt. A roll-back is final: the candidate gets no traffic again
    until the rollout in the spec changes (or an operator calls :meth:`RolloutController.reset`),
    so a flapping candidate cannot oscillate.

replace (blue/green)
    ``pending``, with all traffic on stable, until the candidate has ``min_ready_replicas``
    ready (by default as many as the stable version has ready, and at least one); then
    ``promote``: phase ``switching``, all traffic on the candidate while the stable version
    drains in-flight work for ``drain_s``; then ``done``. With ``ready_timeout_s``, a candidate
    still not ready that long after the rollout started is rolled back.

shadow
    ``pending`` until the candidate has a ready replica, then ``shadowing``: all traffic stays
    on stable, and ``sample_fraction`` of requests is copied to the candidate. Agents compare a
    copy's output with the served one (:func:`compare_outputs`) and the controller feeds the
    result to :meth:`RolloutController.record_shadow`; the statistics are reported with every
    decision and never change the split. Shadow never promotes on its own: its result is
    evidence for the next rollout a person writes.

The controller's memory (phase, step, times, baseline, shadow statistics, the log of the
decisions that changed something) is a plain dict via :meth:`RolloutController.dump_state` /
:meth:`RolloutController.load_state`, so a restarted controller resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from runtime.spec import FleetSpec, RolloutSpec, ShadowCompare

__all__ = [
    "RolloutAction",
    "RolloutController",
    "RolloutDecision",
    "RolloutPhase",
    "ShadowComparison",
    "ShadowStats",
    "VersionMetrics",
    "choose_version",
    "compare_outputs",
    "controllers_from_spec",
    "percentile",
    "shadow_sample",
]

# Decisions that changed something are kept for the dashboard; this many, newest last.
MAX_EVENTS = 100
# Shadow comparisons listed one by one (the statistics cover all of them).
MAX_RECENT_SHADOW = 20


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class VersionMetrics:
    """One version (variant) of a model over the current window.

    `requests` counts finished requests, failed ones included; `errors` the server-side
    failures among them. p95s are None when the window has no successful request to measure.
    """

    requests: int = 0
    errors: int = 0
    ttft_p95_s: float | None = None
    tpot_p95_s: float | None = None
    ready_replicas: int = 0

    def __post_init__(self) -> None:
        if self.requests < 0 or self.errors < 0 or self.ready_replicas < 0:
            raise ValueError("requests, errors and ready_replicas must be >= 0")
        if self.errors > self.requests:
            raise ValueError(f"errors ({self.errors}) exceed requests ({self.requests})")
        for name in ("ttft_p95_s", "tpot_p95_s"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite non-negative number or None")

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def from_samples(
        cls,
        *,
        ttfts_s: Sequence[float],
        tpots_s: Sequence[float],
        errors: int = 0,
        ready_replicas: int = 0,
    ) -> VersionMetrics:
        """From per-request samples: one TTFT and one mean TPOT per successful request."""
        return cls(
            requests=len(ttfts_s) + errors,
            errors=errors,
            ttft_p95_s=percentile(ttfts_s, 95),
            tpot_p95_s=percentile(tpots_s, 95),
            ready_replicas=ready_replicas,
        )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (a value that occurred), None for no values.

    Nearest rank rather than interpolation: on the few hundred samples of a canary step, a
    tail figure that some request really had is easier to reason about in a reason string.
    """
    if not values:
        return None
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is outside (0, 100]")
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return float(ordered[max(rank, 1) - 1])


@dataclass(frozen=True, slots=True)
class ShadowComparison:
    """One shadowed request: how the candidate's output compared with the one served.

    `agreement` is :func:`compare_outputs` of the two token sequences (0..1); a candidate that
    failed has `candidate_error` set and its agreement is not counted.
    """

    request_id: str
    agreement: float = 0.0
    candidate_error: bool = False
    stable_latency_s: float | None = None
    candidate_latency_s: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.agreement <= 1.0:
            raise ValueError(f"agreement {self.agreement} is outside 0..1")


def compare_outputs(
    stable_tokens: Sequence[int], candidate_tokens: Sequence[int], metric: ShadowCompare
) -> float:
    """How much a shadow output agrees with the served one, in 0..1.

    `token-agreement`: the share of positions, over the longer output, holding the same token
    (greedy decoding makes outputs diverge for good after the first difference, so this is
    close to the common prefix, but a single flipped token costs only one position).
    `exact-match`: 1 if the outputs are identical, else 0.
    """
    if metric == "exact-match":
        return 1.0 if list(stable_tokens) == list(candidate_tokens) else 0.0
    if metric != "token-agreement":
        raise ValueError(f"unknown comparison {metric!r}")
    longest = max(len(stable_tokens), len(candidate_tokens))
    if longest == 0:
        return 1.0
    same = sum(a == b for a, b in zip(stable_tokens, candidate_tokens, strict=False))
    return same / longest


# --------------------------------------------------------------------------------------------
# Splitting traffic


def _unit(request_id: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the request id: the first 64 bits of a SHA-256.

    A cryptographic hash rather than Python's `hash()` (randomised per process): every agent,
    the controller and the simulator must map an id to the same number.
    """
    digest = hashlib.sha256(f"{salt}\x00{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_version(request_id: str, split: Mapping[str, float], *, salt: str = "version") -> str:
    """The version a request goes to under `split` ({version: fraction}, fractions summing to 1).

    Deterministic in the request id, so a request's retries and re-routes land on the same
    version, and uniform, so the share of requests per version matches the split. The split's
    order matters: versions take consecutive intervals of [0, 1) in the order listed.
    :class:`RolloutDecision` lists the candidate first, so raising its share only moves ids from
    stable to candidate: a request id that saw the candidate at 5 % still sees it at 25 %.
    """
    if not split:
        raise ValueError("empty split")
    total = 0.0
    for version, fraction in split.items():
        if not fraction >= 0:
            raise ValueError(f"split: fraction of {version!r} is {fraction}, below 0")
        total += fraction
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split: fractions sum to {total:g}, not 1")
    u = _unit(request_id, salt)
    edge = 0.0
    for version, fraction in split.items():
        edge += fraction
        if u < edge:
            return version
    # Rounding left u above the last edge (a total of 0.9999999...): the last version with a share.
    return next(v for v, f in reversed(split.items()) if f > 0)


def shadow_sample(request_id: str, fraction: float, *, salt: str = "shadow") -> bool:
    """Whether a copy of this request goes to the shadow version. Deterministic in the id.

    Salted apart from :func:`choose_version`, so the shadow sample is independent of any split.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"shadow fraction {fraction} is outside 0..1")
    return _unit(request_id, salt) < fraction


# --------------------------------------------------------------------------------------------
# Output


class RolloutAction(StrEnum):
    STEP_UP = "step_up"  # more traffic to the candidate (including the first step)
    HOLD = "hold"  # nothing changes
    ROLL_BACK = "roll_back"  # all traffic back to stable, for good
    PROMOTE = "promote"  # all traffic to the candidate
    WAIT = "wait"  # the candidate is not ready yet; stable keeps everything


class RolloutPhase(StrEnum):
    PENDING = "pending"  # waiting for the candidate to be ready
    CANARY = "canary"  # at a canary step
    PROMOTED = "promoted"  # canary passed its last step
    ROLLED_BACK = "rolled-back"
    SWITCHING = "switching"  # replace: candidate takes all traffic, stable drains
    DONE = "done"  # replace: stable drained
    SHADOWING = "shadowing"


@dataclass(slots=True)
class ShadowStats:
    """Running comparison of shadow outputs with the served ones."""

    samples: int = 0  # comparisons recorded
    candidate_errors: int = 0
    agreement_sum: float = 0.0  # over samples without a candidate error
    agreement_min: float | None = None
    exact: int = 0  # comparisons with agreement 1
    stable_latency_sum_s: float = 0.0
    candidate_latency_sum_s: float = 0.0
    latency_pairs: int = 0  # comparisons that had both latencies
    recent: list[tuple[str, float | None]] = field(default_factory=list)  # (request id, agreement)

    @property
    def compared(self) -> int:
        return self.samples - self.candidate_errors

    @property
    def mean_agreement(self) -> float | None:
        return self.agreement_sum / self.compared if self.compared else None

    @property
    def latency_ratio(self) -> float | None:
        """Mean candidate latency over mean stable latency, over the pairs that had both."""
        if not self.latency_pairs or self.stable_latency_sum_s <= 0:
            return None
        return self.candidate_latency_sum_s / self.stable_latency_sum_s

    def add(self, comparison: ShadowComparison) -> None:
        self.samples += 1
        if comparison.candidate_error:
            self.candidate_errors += 1
            shown: float | None = None
        else:
            shown = comparison.agreement
            self.agreement_sum += comparison.agreement
            if self.agreement_min is None or comparison.agreement < self.agreement_min:
                self.agreement_min = comparison.agreement
            self.exact += comparison.agreement == 1.0
        if comparison.stable_latency_s is not None and comparison.candidate_latency_s is not None:
            self.latency_pairs += 1
            self.stable_latency_sum_s += comparison.stable_latency_s
            self.candidate_latency_sum_s += comparison.candidate_latency_s
        self.recent.append((comparison.request_id, shown))
        del self.recent[:-MAX_RECENT_SHADOW]

    def summary(self) -> str:
        if not self.samples:
            return "no shadow comparisons yet"
        parts = [f"{self.samples} compared"]
        if self.mean_agreement is not None:
            parts.append(
                f"mean agreement {self.mean_agreement:.3f} (min {self.agreement_min:.3f}), "
                f"{self.exact} exact"
            )
        parts.append(f"{self.candidate_errors} candidate error(s)")
        if self.latency_ratio is not None:
            parts.append(f"candidate latency {self.latency_ratio:.2f}x stable")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["recent"] = [list(entry) for entry in self.recent]
        data["mean_agreement"] = self.mean_agreement
        data["latency_ratio"] = self.latency_ratio
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShadowStats:
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        known["recent"] = [(str(i), a) for i, a in data.get("recent", [])]
        return cls(**known)


@dataclass(frozen=True, slots=True)
class RolloutDecision:
    """What one call of :meth:`RolloutController.decide` concluded, and why.

    `split` maps versions to traffic fractions, candidate first (see :func:`choose_version`);
    `shadow_fraction` is the fraction of requests copied to the candidate. `window_start` is the
    time the next metrics window starts at: the caller measures both versions from then on.
    """

    model: str
    at: float
    action: RolloutAction
    phase: RolloutPhase
    split: Mapping[str, float]
    shadow_fraction: float
    reasons: tuple[str, ...]
    window_start: float
    step: int | None = None  # canary: the 0-based step in force after this decision
    candidate_percent: float = 0.0  # share of traffic on the candidate, in percent
    shadow: ShadowStats | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "at": self.at,
            "action": str(self.action),
            "phase": str(self.phase),
            "step": self.step,
            "candidate_percent": self.candidate_percent,
            "split": dict(self.split),
            "shadow_fraction": self.shadow_fraction,
            "window_start": self.window_start,
            "reasons": list(self.reasons),
            "shadow": self.shadow.to_json() if self.shadow is not None else None,
        }


# --------------------------------------------------------------------------------------------
# The controller


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.2f} %"


def _ratio(candidate: float, stable: float) -> float:
    if stable > 0:
        return candidate / stable
    return 1.0 if candidate <= 0 else math.inf


class RolloutController:
    """The rollout of one model: its phase, and the decision each period.

    Holds only what the rules need to remember; the metrics come in with every call.
    """

    def __init__(self, model: str, settings: RolloutSpec) -> None:
        self.model = model
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        """Start the rollout afresh (an operator retrying a rolled-back candidate)."""
        self.phase = RolloutPhase.PENDING
        self.step: int | None = None
        self.started_at: float | None = None  # first decide call
        self.phase_started_at: float | None = None  # current phase or canary step
        self.baseline: VersionMetrics | None = None  # last stable window with min_requests
        self.baseline_at: float | None = None
        self.outcome: str | None = None  # the reason a terminal phase was reached
        self.shadow = ShadowStats()
        self.events: list[dict[str, Any]] = []

    @property
    def stable(self) -> str:
        return self.settings.stable

    @property
    def candidate(self) -> str:
        return self.settings.candidate

    # -- traffic -------------------------------------------------------------------------------

    def candidate_fraction(self) -> float:
        """The candidate's share of traffic in the current phase, 0..1."""
        if self.phase is RolloutPhase.CANARY and self.step is not None:
            return self.settings.steps[self.step] / 100.0
        if self.phase in (RolloutPhase.PROMOTED, RolloutPhase.SWITCHING, RolloutPhase.DONE):
            return 1.0
        return 0.0

    def split(self) -> dict[str, float]:
        """The traffic split now, candidate first (the order :func:`choose_version` needs)."""
        share = self.candidate_fraction()
        return {self.candidate: share, self.stable: 1.0 - share}

    def shadow_fraction(self) -> float:
        return self.settings.sample_fraction if self.phase is RolloutPhase.SHADOWING else 0.0

    def record_shadow(self, comparison: ShadowComparison) -> None:
        """Add one shadow comparison to the statistics. Never changes the split."""
        self.shadow.add(comparison)

    # -- deciding ------------------------------------------------------------------------------

    def decide(
        self, now: float, stable: VersionMetrics, candidate: VersionMetrics
    ) -> RolloutDecision:
        """This period's decision, from both versions' metrics over the current window."""
        if self.started_at is None:
            self.started_at = now
            self.phase_started_at = now
        strategy = self.settings.strategy
        if strategy == "canary":
            action, reasons = self._canary(now, stable, candidate)
        elif strategy == "replace":
            action, reasons = self._replace(now, stable, candidate)
        else:
            action, reasons = self._shadow(now, candidate)
        decision = RolloutDecision(
            model=self.model,
            at=now,
            action=action,
            phase=self.phase,
            split=self.split(),
            shadow_fraction=self.shadow_fraction(),
            reasons=tuple(reasons),
            window_start=self.phase_started_at if self.phase_started_at is not None else now,
            step=self.step,
            candidate_percent=round(self.candidate_fraction() * 100.0, 6),
            shadow=ShadowStats.from_json(self.shadow.to_json()) if strategy == "shadow" else None,
        )
        if action not in (RolloutAction.HOLD, RolloutAction.WAIT):
            self.events.append(decision.to_json())
            del self.events[:-MAX_EVENTS]
        return decision

    def _enter(self, phase: RolloutPhase, now: float, step: int | None = None) -> None:
        self.phase = phase
        self.step = step
        self.phase_started_at = now

    def _settled(self) -> tuple[RolloutAction, list[str]]:
        """Terminal phases: nothing changes any more; the reason is how it ended."""
        return RolloutAction.HOLD, [self.outcome or str(self.phase)]

    # canary

    def _canary(
        self, now: float, stable: VersionMetrics, candidate: VersionMetrics
    ) -> tuple[RolloutAction, list[str]]:
        s = self.settings
        if self.phase in (RolloutPhase.PROMOTED, RolloutPhase.ROLLED_BACK):
            return self._settled()
        if self.phase is RolloutPhase.PENDING:
            if candidate.ready_replicas < 1:
                return RolloutAction.WAIT, [
                    f"waiting for candidate {self.candidate!r} to have a ready replica "
                    f"(0 ready); {self.stable!r} keeps all traffic"
                ]
            self._enter(RolloutPhase.CANARY, now, step=0)
            return RolloutAction.STEP_UP, [
                f"candidate {self.candidate!r} has {candidate.ready_replicas} ready "
                f"replica(s): canary starts at step 1 of {len(s.steps)}, "
                f"{s.steps[0]:g} % of traffic"
            ]

        assert self.step is not None and self.phase_started_at is not None
        step_name = f"step {self.step + 1} of {len(s.steps)} ({s.steps[self.step]:g} %)"
        if candidate.requests < s.min_requests:
            return RolloutAction.HOLD, [
                f"{step_name}: {candidate.requests} of {s.min_requests} candidate requests "
                "needed before judging"
            ]

        # The stable figures to compare with: this window's, or the last that had enough.
        notes: list[str] = []
        if stable.requests >= s.min_requests:
            baseline = stable
            self.baseline, self.baseline_at = stable, now
        elif self.baseline is not None:
            baseline = self.baseline
            notes.append(
                f"stable served {stable.requests} request(s) in this window; comparing with "
                f"its window ending at t={self.baseline_at:g}"
            )
        else:
            return RolloutAction.HOLD, [
                f"{step_name}: stable served {stable.requests} of {s.min_requests} requests "
                "needed for a baseline"
            ]

        breaches, passes, missing = self._judge(baseline, candidate)
        if breaches:
            self.outcome = (
                f"rolled back from {step_name} at t={now:g}: " + "; ".join(breaches) + "; "
                f"{self.stable!r} keeps all traffic until the rollout in the spec changes"
            )
            self._enter(RolloutPhase.ROLLED_BACK, now)
            return RolloutAction.ROLL_BACK, [
                *breaches,
                f"rolled back from {step_name}: all traffic to {self.stable!r}",
                *notes,
            ]
        if missing:
            return RolloutAction.HOLD, [f"{step_name}: {m}" for m in missing] + passes + notes
        spent = now - self.phase_started_at
        if spent < s.step_interval_s:
            return RolloutAction.HOLD, [
                f"{step_name}: within margins after {candidate.requests} requests; "
                f"{spent:g} of {s.step_interval_s:g} s spent on the step",
                *passes,
                *notes,
            ]
        passed = (
            f"{step_name} passed: {candidate.requests} requests over {spent:g} s within margins"
        )
        if self.step + 1 == len(s.steps):
            self.outcome = (
                f"promoted {self.candidate!r} at t={now:g} after {len(s.steps)} step(s); make "
                "it the stable version in the spec and remove the rollout"
            )
            self._enter(RolloutPhase.PROMOTED, now)
            return RolloutAction.PROMOTE, [
                passed,
                *passes,
                f"last step passed: promoting {self.candidate!r} to 100 % of traffic",
                *notes,
            ]
        self._enter(RolloutPhase.CANARY, now, step=self.step + 1)
        return RolloutAction.STEP_UP, [
            passed,
            *passes,
            f"stepping up to step {self.step + 1} of {len(s.steps)}: "
            f"{s.steps[self.step]:g} % of traffic",
            *notes,
        ]

    def _judge(
        self, stable: VersionMetrics, candidate: VersionMetrics
    ) -> tuple[list[str], list[str], list[str]]:
        """(breaches, figures within margin, metrics that cannot be compared) for one window."""
        s = self.settings
        breaches: list[str] = []
        passes: list[str] = []
        missing: list[str] = []

        delta = candidate.error_rate - stable.error_rate
        figures = (
            f"candidate {_pct(candidate.error_rate)} ({candidate.errors} of "
            f"{candidate.requests}) vs stable {_pct(stable.error_rate)} ({stable.errors} of "
            f"{stable.requests})"
        )
        # A tiny tolerance so that a delta equal to the margin, up to float error, passes.
        if delta > s.max_error_rate_delta + 1e-12:
            breaches.append(
                f"error rate breach: {figures} is {delta * 100:+.2f} points, over the "
                f"{s.max_error_rate_delta * 100:.2f}-point margin"
            )
        else:
            passes.append(
                f"error rate {figures}: {delta * 100:+.2f} points, margin "
                f"{s.max_error_rate_delta * 100:.2f}"
            )

        for label, field_name, margin in (
            ("TTFT p95", "ttft_p95_s", s.ttft_ratio),
            ("TPOT p95", "tpot_p95_s", s.tpot_ratio),
        ):
            c, b = getattr(candidate, field_name), getattr(stable, field_name)
            if c is None or b is None:
                whose = "candidate" if c is None else "stable"
                missing.append(f"no {label} for the {whose} version in this window")
                continue
            ratio = _ratio(c, b)
            if ratio > margin + 1e-12:
                breaches.append(
                    f"{label} breach: candidate {_ms(c)} is {ratio:.2f}x stable {_ms(b)}, "
                    f"over the {margin:g}x margin"
                )
            else:
                passes.append(
                    f"{label} candidate {_ms(c)} vs stable {_ms(b)}: {ratio:.2f}x, "
                    f"margin {margin:g}x"
                )
        return breaches, passes, missing

    # replace

    def _replace(
        self, now: float, stable: VersionMetrics, candidate: VersionMetrics
    ) -> tuple[RolloutAction, list[str]]:
        s = self.settings
        if self.phase in (RolloutPhase.DONE, RolloutPhase.ROLLED_BACK):
            return self._settled()
        if self.phase is RolloutPhase.SWITCHING:
            assert self.phase_started_at is not None
            drained = now - self.phase_started_at
            if drained < s.drain_s:
                return RolloutAction.HOLD, [
                    f"switched to {self.candidate!r}; {self.stable!r} drains in-flight work "
                    f"({drained:g} of {s.drain_s:g} s)"
                ]
            self.outcome = (
                f"done: {self.candidate!r} serves all traffic since t={self.phase_started_at:g} "
                f"and {self.stable!r} has drained; make it the stable version in the spec, "
                f"remove the rollout and the pools serving {self.stable!r}"
            )
            self._enter(RolloutPhase.DONE, now)
            return RolloutAction.HOLD, [self.outcome]

        if s.min_ready_replicas is not None:
            need = s.min_ready_replicas
            why = "min_ready_replicas"
        else:
            need = max(1, stable.ready_replicas)
            why = f"as many as {self.stable!r} has ready"
        ready = candidate.ready_replicas
        if ready >= need:
            self._enter(RolloutPhase.SWITCHING, now)
            return RolloutAction.PROMOTE, [
                f"candidate {self.candidate!r} has {ready} ready replica(s), {need} needed "
                f"({why}): switching all traffic to it; {self.stable!r} drains for "
                f"{s.drain_s:g} s"
            ]
        assert self.started_at is not None
        waited = now - self.started_at
        if s.ready_timeout_s is not None and waited >= s.ready_timeout_s:
            self.outcome = (
                f"candidate {self.candidate!r} had {ready} of {need} replicas ready after "
                f"{waited:g} s (ready_timeout_s {s.ready_timeout_s:g}); {self.stable!r} keeps "
                "all traffic"
            )
            self._enter(RolloutPhase.ROLLED_BACK, now)
            return RolloutAction.ROLL_BACK, [self.outcome]
        return RolloutAction.WAIT, [
            f"waiting for candidate {self.candidate!r}: {ready} of {need} replicas ready "
            f"({why}); {self.stable!r} keeps all traffic"
        ]

    # shadow

    def _shadow(self, now: float, candidate: VersionMetrics) -> tuple[RolloutAction, list[str]]:
        s = self.settings
        if self.phase is RolloutPhase.PENDING:
            if candidate.ready_replicas < 1:
                return RolloutAction.WAIT, [
                    f"waiting for candidate {self.candidate!r} to have a ready replica "
                    "(0 ready); nothing is shadowed yet"
                ]
            self._enter(RolloutPhase.SHADOWING, now)
            return RolloutAction.STEP_UP, [
                f"candidate {self.candidate!r} has {candidate.ready_replicas} ready "
                f"replica(s): copying {s.sample_fraction * 100:g} % of requests to it "
                f"({s.compare}); {self.stable!r} serves them all"
            ]
        reasons = [
            f"shadowing {s.sample_fraction * 100:g} % of requests to {self.candidate!r} "
            f"({s.compare}): {self.shadow.summary()}"
        ]
        if candidate.ready_replicas < 1:
            reasons.append(f"candidate {self.candidate!r} has no ready replica: copies are skipped")
        return RolloutAction.HOLD, reasons

    # -- state -----------------------------------------------------------------------------

    def _identity(self) -> dict[str, str]:
        return {
            "stable": self.stable,
            "candidate": self.candidate,
            "strategy": self.settings.strategy,
        }

    def dump_state(self) -> dict[str, Any]:
        """The memory as JSON-able data (persist it; :meth:`load_state` restores it)."""
        return {
            **self._identity(),
            "phase": str(self.phase),
            "step": self.step,
            "started_at": self.started_at,
            "phase_started_at": self.phase_started_at,
            "baseline": asdict(self.baseline) if self.baseline is not None else None,
            "baseline_at": self.baseline_at,
            "outcome": self.outcome,
            "shadow": self.shadow.to_json(),
            "events": list(self.events),
        }

    def load_state(self, state: Mapping[str, Any]) -> bool:
        """Restore :meth:`dump_state` output. State of another rollout (other versions or
        strategy) is ignored, so a changed spec starts its rollout afresh; returns whether the
        state was taken."""
        if any(state.get(key) != value for key, value in self._identity().items()):
            return False
        self.reset()
        self.phase = RolloutPhase(state["phase"])
        step = state.get("step")
        # Steps edited in the spec mid-rollout: stay on the last step that still exists.
        self.step = None if step is None else min(int(step), len(self.settings.steps) - 1)
        self.started_at = state.get("started_at")
        self.phase_started_at = state.get("phase_started_at")
        baseline = state.get("baseline")
        self.baseline = VersionMetrics(**baseline) if baseline is not None else None
        self.baseline_at = state.get("baseline_at")
        self.outcome = state.get("outcome")
        self.shadow = ShadowStats.from_json(state.get("shadow", {}))
        self.events = list(state.get("events", []))[-MAX_EVENTS:]
        return True


def controllers_from_spec(spec: FleetSpec) -> dict[str, RolloutController]:
    """A controller per model that has a rollout in the spec, by model name."""
    return {
        model.name: RolloutController(model.name, model.rollout)
        for model in spec.models
        if model.rollout is not None
    }
