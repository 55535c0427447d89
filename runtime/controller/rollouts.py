"""The controller's side of model rollouts: measure each version, decide, publish, remember.

The decisions themselves are :class:`runtime.rollout.RolloutController`'s (one per model with a
``rollout`` in the spec, from :func:`runtime.rollout.controllers_from_spec`); this module only
carries them out. A :class:`RolloutLoop`

* takes in every push (:meth:`RolloutLoop.observe`): each agent's per-version counters
  (:class:`runtime.protocol.VersionStats`) are differenced against the last ones seen from the
  same agent process, and the new finished / error counts and latency samples are added to the
  current *window* of that (model, variant); shadow comparisons of accepted (not duplicate)
  pushes go to :meth:`RolloutController.record_shadow`;
* every period (:meth:`RolloutLoop.step`, run by the controller application every
  ``ControllerConfig.rollout_period_s``) turns each window into a
  :class:`runtime.rollout.VersionMetrics` (exact counts; TTFT and TPOT p95 over the samples;
  ready replicas = fresh, healthy agents whose primary model and variant it is, the instances the
  router can send the version to) and calls ``decide(now, stable, candidate)``;
* publishes the result in every push reply (:meth:`RolloutLoop.directives`: split, stable,
  candidate, shadow fraction), answers ``GET /v1/rollouts`` and the dashboard
  (:meth:`RolloutLoop.status`), and keeps the controllers' memory (phase, step, baseline, shadow
  statistics, the log of decisions that changed something) in ``<ledger>.rollouts.json`` via
  ``dump_state`` / ``load_state``, so a restarted controller resumes where it stopped.

Windows
    A window is what ``decide`` judges: everything pushed since the decision's
    ``window_start`` (the start of the current canary step or phase). Each period adds the
    pushes received since the previous decision; when a decision opens a new window (its
    ``window_start`` moved), the accumulated counts are dropped. Requests are attributed to the
    window in which their counters reach the controller, so a request finished just before a
    step change may count in the next step (at most one push interval's worth). Windows live in
    memory only: after a controller restart the current step is measured afresh.

First sight of an agent process
    Counters are cumulative since the agent process started (``boot_id``). When this
    controller saw that process's first push (``seq`` 0), everything in its counters is new
    and counts; otherwise (the controller restarted under a running agent) the first counters
    seen are a baseline only, since they cover traffic of earlier windows.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runtime.controller.statefile import write_json_atomically
from runtime.protocol import MetricsPush, RolloutDirective, VersionStats
from runtime.rollout import (
    RolloutAction,
    RolloutController,
    RolloutDecision,
    VersionMetrics,
    controllers_from_spec,
    percentile,
)
from runtime.spec import FleetSpec

__all__ = ["RolloutLoop", "VersionWindow"]

log = logging.getLogger("fleetform.controller.rollouts")

# Latency samples a window keeps per version (the newest): a p95 over this many is plenty.
MAX_WINDOW_SAMPLES = 4096
# Decisions of any kind (holds included) listed at GET /v1/rollouts, newest first.
RECENT_DECISIONS = 50
STATE_FORMAT = 1


@dataclass
class VersionWindow:
    """One version's traffic in the current window."""

    requests: int = 0
    errors: int = 0
    ttfts_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_WINDOW_SAMPLES))
    tpots_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_WINDOW_SAMPLES))

    def metrics(self, ready_replicas: int) -> VersionMetrics:
        return VersionMetrics(
            requests=self.requests,
            errors=min(self.errors, self.requests),
            ttft_p95_s=percentile(self.ttfts_s, 95),
            tpot_p95_s=percentile(self.tpots_s, 95),
            ready_replicas=ready_replicas,
        )


@dataclass
class _Seen:
    """The last counters of one (agent process, model, variant)."""

    boot_id: str
    finished: int = 0
    errors: int = 0
    samples_total: int = 0


class AgentLike(Protocol):
    """What :meth:`RolloutLoop.step` reads of a :class:`runtime.controller.fleet.AgentRecord`."""

    @property
    def instance(self) -> Any: ...


class RolloutLoop:
    """The rollouts of one controller; see the module docstring. Everything runs on the event
    loop (no I/O but :meth:`save`, which the application calls off the loop)."""

    def __init__(self, spec: FleetSpec, *, state_path: Path | None = None) -> None:
        self.spec = spec
        self.state_path = state_path
        self.controllers: dict[str, RolloutController] = controllers_from_spec(spec)
        self.windows: dict[str, dict[str, VersionWindow]] = {
            model: {c.stable: VersionWindow(), c.candidate: VersionWindow()}
            for model, c in self.controllers.items()
        }
        self.window_start: dict[str, float | None] = dict.fromkeys(self.controllers)
        self.latest: dict[str, RolloutDecision] = {}
        self.latest_metrics: dict[str, dict[str, VersionMetrics]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)
        self._seen: dict[tuple[str, str, str], _Seen] = {}
        self._boots: dict[str, tuple[str, bool]] = {}  # agent -> (boot_id, seen from seq 0)
        # Saves run off the loop and may overlap (a cancelled one finishing late): the newest
        # dump is the one that must stay on disk.
        self._save_lock = threading.Lock()
        self._dumps = 0
        self._written = 0
        self._load()

    @property
    def enabled(self) -> bool:
        return bool(self.controllers)

    # -- pushes -------------------------------------------------------------------------------

    def observe(self, push: MetricsPush, *, accepted: bool) -> None:
        """Take in a push's version counters and, if ``accepted`` (not a duplicate), its shadow
        comparisons."""
        boot = self._boots.get(push.agent_id)
        if boot is None or boot[0] != push.boot_id:
            boot = (push.boot_id, push.seq == 0)
            self._boots[push.agent_id] = boot
        for stats in push.versions:
            self._take(push.agent_id, push.boot_id, boot[1], stats)
        if not accepted:
            return  # a retried push: its comparisons were recorded the first time
        for report in push.shadow:
            controller = self.controllers.get(report.model)
            if (
                controller is not None
                and controller.settings.strategy == "shadow"
                and report.candidate == controller.candidate
            ):
                controller.record_shadow(report.to_comparison())

    def _take(self, agent_id: str, boot_id: str, whole_boot: bool, stats: VersionStats) -> None:
        controller = self.controllers.get(stats.model)
        if controller is None or stats.variant not in (controller.stable, controller.candidate):
            return
        key = (agent_id, stats.model, stats.variant)
        before = self._seen.get(key)
        if before is None or before.boot_id != boot_id:
            # New process (or new to us): from zero if we saw it start, else a baseline.
            before = (
                _Seen(boot_id)
                if whole_boot
                else _Seen(boot_id, stats.finished, stats.errors, stats.samples_total)
            )
        finished = max(0, stats.finished - before.finished)
        errors = max(0, stats.errors - before.errors)
        new_samples = max(0, stats.samples_total - before.samples_total)
        window = self.windows[stats.model][stats.variant]
        window.requests += finished
        window.errors += min(errors, finished)
        if new_samples:
            for ttft_s, tpot_s in stats.recent[-new_samples:]:
                window.ttfts_s.append(ttft_s)
                if tpot_s is not None:
                    window.tpots_s.append(tpot_s)
        # Never backwards: a delayed copy of an older push must not make counts new again.
        self._seen[key] = _Seen(
            boot_id,
            max(before.finished, stats.finished),
            max(before.errors, stats.errors),
            max(before.samples_total, stats.samples_total),
        )

    # -- deciding -----------------------------------------------------------------------------

    def step(self, now: float, agents: Iterable[AgentLike]) -> list[RolloutDecision]:
        """This period's decision for every rollout, from the windows and the fresh agents."""
        ready: dict[tuple[str, str], int] = {}
        for agent in agents:
            instance = agent.instance
            if instance.healthy:
                key = (instance.model, instance.variant)
                ready[key] = ready.get(key, 0) + 1
        decisions = []
        for model, controller in self.controllers.items():
            windows = self.windows[model]
            figures = {
                variant: windows[variant].metrics(ready.get((model, variant), 0))
                for variant in (controller.stable, controller.candidate)
            }
            decision = controller.decide(
                now, figures[controller.stable], figures[controller.candidate]
            )
            self.latest[model] = decision
            self.latest_metrics[model] = figures
            self.recent.appendleft(decision.to_json())
            if decision.action not in (RolloutAction.HOLD, RolloutAction.WAIT):
                log.info(
                    "rollout %s: %s -> %s, split %s: %s",
                    model,
                    decision.action,
                    decision.phase,
                    dict(decision.split),
                    "; ".join(decision.reasons),
                )
            if decision.window_start != self.window_start[model]:
                # A new window (step or phase): what was measured belonged to the last one.
                self.window_start[model] = decision.window_start
                self.windows[model] = {v: VersionWindow() for v in windows}
            decisions.append(decision)
        return decisions

    # -- what it publishes --------------------------------------------------------------------

    def directives(self) -> dict[str, RolloutDirective]:
        """The split agents route by, per model: from the controllers' current phase (so it is
        right before the first period and after a restart as well)."""
        return {
            model: RolloutDirective(
                stable=c.stable,
                candidate=c.candidate,
                strategy=c.settings.strategy,
                phase=str(c.phase),
                split=c.split(),
                shadow_fraction=c.shadow_fraction(),
                compare=c.settings.compare,
            )
            for model, c in self.controllers.items()
        }

    def status(self) -> dict[str, Any]:
        """Every rollout's state, current window and decisions (``GET /v1/rollouts``)."""
        rollouts = []
        for model, c in self.controllers.items():
            latest = self.latest.get(model)
            window_metrics = self.latest_metrics.get(model, {})
            rollouts.append(
                {
                    "model": model,
                    "stable": c.stable,
                    "candidate": c.candidate,
                    "strategy": c.settings.strategy,
                    "phase": str(c.phase),
                    "step": c.step,
                    "steps": list(c.settings.steps) if c.settings.strategy == "canary" else None,
                    "split": c.split(),
                    "candidate_percent": round(c.candidate_fraction() * 100.0, 6),
                    "shadow_fraction": c.shadow_fraction(),
                    "started_at": c.started_at,
                    "phase_started_at": c.phase_started_at,
                    "outcome": c.outcome,
                    "window": {
                        "start": self.window_start.get(model),
                        # The figures the latest decision judged, per version.
                        "judged": {v: asdict(m) for v, m in window_metrics.items()},
                        # What has come in since (the next decision's window so far).
                        "now": {
                            v: {
                                "requests": w.requests,
                                "errors": w.errors,
                                "samples": len(w.ttfts_s),
                            }
                            for v, w in self.windows[model].items()
                        },
                    },
                    "shadow": c.shadow.to_json() if c.settings.strategy == "shadow" else None,
                    "shadow_summary": (
                        c.shadow.summary() if c.settings.strategy == "shadow" else None
                    ),
                    "latest": latest.to_json() if latest is not None else None,
                    # Decisions that changed something, newest first (kept across restarts).
                    "events": list(reversed(c.events)),
                }
            )
        return {
            "enabled": self.enabled,
            "rollouts": rollouts,
            "decisions": list(self.recent),
        }

    # -- memory -------------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """What :meth:`save` writes (take it on the loop, write it anywhere)."""
        self._dumps += 1
        return {
            "format": STATE_FORMAT,
            "dump": self._dumps,
            "rollouts": {model: c.dump_state() for model, c in self.controllers.items()},
        }

    def save(self, data: dict[str, Any] | None = None) -> None:
        """Write the state file atomically (blocking: call it off the event loop). A dump older
        than the one already written is not written."""
        if self.state_path is None:
            return
        data = self.dump() if data is None else data
        with self._save_lock:
            if data["dump"] <= self._written:
                return
            write_json_atomically(self.state_path, data)
            self._written = data["dump"]

    def _load(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            saved = data["rollouts"]
            for model, controller in self.controllers.items():
                state = saved.get(model)
                if state is None:
                    continue
                if controller.load_state(state):
                    log.info("rollout %s resumed in phase %s", model, controller.phase)
                else:
                    log.info("rollout %s changed in the spec: starting it afresh", model)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning(
                "rollout state %s not restored (%s); starting afresh", self.state_path, error
            )
            for controller in self.controllers.values():
                controller.reset()
