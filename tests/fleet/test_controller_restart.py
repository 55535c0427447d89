"""A controller restarted on the same ledger file while an agent keeps serving: no usage is
lost and none is counted twice (the protocol-level cases are in tests/controller)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from runtime.controller.local_fleet import free_port

from .support import (
    MESSAGES,
    MODEL,
    PUSH_INTERVAL_S,
    fleet_spec,
    ledger_usage,
    openai_client,
    start_agent,
    start_controller,
    wait_until,
)

TENANT = "restart"


def test_a_restarted_controller_loses_no_usage_and_counts_none_twice(
    engines: list[Any], tmp_path: Path
) -> None:
    spec = fleet_spec()
    db_path, port = tmp_path / "ledger.sqlite3", free_port()
    controller = start_controller(spec, db_path, port=port)
    agent = start_agent(spec, "cheap", engines[0], controller.url)
    told = Counter[str]()

    def send(n: int) -> None:
        client = openai_client(agent.url, TENANT)
        for _ in range(n):
            usage = client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=4
            ).usage
            assert usage is not None
            told.update(requests=1, prompt_tokens=usage.prompt_tokens)
            told.update(completion_tokens=usage.completion_tokens)

    def ledger() -> dict[str, int]:
        row = ledger_usage(controller, TENANT)
        return {k: row[k] for k in ("requests", "prompt_tokens", "completion_tokens")}

    try:
        send(2)
        wait_until(lambda: ledger() == told, 15, "the first requests in the ledger")
        controller.stop()
        send(2)  # served meanwhile; the agent keeps the usage until a controller takes it
        assert agent.on_loop(lambda: agent.state.pusher.has_unacknowledged_usage)  # type: ignore[union-attr]
        controller = start_controller(spec, db_path, port=port)
        wait_until(lambda: ledger() == told, 30, f"the ledger to show {dict(told)}")
        time.sleep(4 * PUSH_INTERVAL_S)
        assert ledger() == told
    finally:
        agent.stop()
        controller.stop()
