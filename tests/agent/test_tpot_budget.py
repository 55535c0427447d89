"""The agent hands its engine the TPOT objective of each request's class and a step cost timed by
the backend's own measurements, so the scheduler keeps prefill within the decodes' objectives."""

from __future__ import annotations

from typing import Any

import pytest

from runtime.agent.admission import MeasuredStepCost
from runtime.scheduler import Request, Scheduler

from .support import MODEL, LiveAgent


def test_requests_carry_their_class_tpot_and_the_engine_times_steps_by_measurement(
    client: Any, idle_agent: LiveAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Request] = []
    add = Scheduler.add_request

    def recording(self: Scheduler, request: Request) -> None:
        seen.append(request)
        add(self, request)

    monkeypatch.setattr(Scheduler, "add_request", recording)
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    client.with_options(default_headers={"X-Priority": "batch"}).completions.create(
        model=MODEL, prompt="Hello", max_tokens=2, temperature=0
    )
    assert [r.tpot for r in seen] == [1.0, 5.0]  # standard (the tenant's default), batch
    backend = idle_agent.state.backend
    cost = backend.core.scheduler.step_cost  # type: ignore[attr-defined]
    # The live estimate the engine thread updates, not a snapshot.
    assert isinstance(cost, MeasuredStepCost)
    assert cost.estimate is backend._throughput  # type: ignore[attr-defined]
