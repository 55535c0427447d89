"""The local fleet launcher's planning: keys for children, refusals, process bookkeeping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runtime.controller.local_fleet import (
    FleetUpError,
    LocalApplier,
    LocalFleet,
    LocalProcesses,
    free_port,
    tenant_keys_for_children,
)
from runtime.spec import load_stack_file

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "stacks" / "local.yaml"
PROD = REPO / "stacks" / "Pulumi.prod.yaml"


def test_missing_env_keys_are_generated_and_present_ones_kept() -> None:
    spec = load_stack_file(LOCAL)
    env, first = tenant_keys_for_children(spec, {"FLEETFORM_DEMO_KEY": "my-own-key"})
    assert env["FLEETFORM_DEMO_KEY"] == "my-own-key"
    assert first["demo"] == "my-own-key"
    generated = env["FLEETFORM_BATCH_KEY"]
    assert generated.startswith("ff-") and len(generated) > 30
    assert first["batch-jobs"] == generated
    # Fresh keys every run when none is given.
    again, _ = tenant_keys_for_children(spec, {})
    assert again["FLEETFORM_BATCH_KEY"] != generated


def test_cloud_pools_are_refused_before_anything_starts(tmp_path: Path) -> None:
    fleet = LocalFleet(load_stack_file(PROD), PROD, tmp_path)
    with pytest.raises(FleetUpError, match="not 'cloud: local'"):
        fleet.start()
    assert fleet.processes is None
    assert not any(tmp_path.iterdir())


def test_free_port_is_bindable_on_loopback() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_processes_are_stopped_with_sigterm_then_killed(tmp_path: Path) -> None:
    procs = LocalProcesses(tmp_path, {}, command=[sys.executable, "-c"])
    # One process exits on SIGTERM (the default action), one ignores it and must be killed.
    procs.start("polite", "agent", ["import time; time.sleep(60)"], 1, pool="p")
    procs.start(
        "stubborn",
        "agent",
        [
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)"
        ],
        2,
        pool="p",
    )
    import time

    deadline = time.monotonic() + 10
    while "ready" not in (tmp_path / "logs" / "stubborn.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [p.name for p in procs.agents("p")] == ["polite", "stubborn"]
    codes = procs.stop_all(timeout_s=1.0)
    assert codes["polite"] == -15  # SIGTERM
    assert codes["stubborn"] == -9  # SIGKILL after the timeout
    assert procs.processes == {}


def test_the_local_applier_starts_and_drains_agents_to_match_each_new_plan(
    tmp_path: Path,
) -> None:
    spec = load_stack_file(LOCAL)
    fleet = LocalFleet(spec, LOCAL, tmp_path)
    env, _ = tenant_keys_for_children(spec, {})
    # Stand-in agents: processes that sleep (a real agent would load the model).
    fleet.processes = LocalProcesses(
        tmp_path, env, command=[sys.executable, "-c", "import time; time.sleep(60)"]
    )
    fleet._controller_url = "http://127.0.0.1:9"
    fleet._child_environ = env
    plans: list[dict[str, object]] = []
    applier = LocalApplier(fleet, fetch=lambda: plans[-1] if plans else None, drain_timeout_s=5)

    assert applier.poll_once() == []  # no controller answer yet
    plans.append({"enabled": True, "plan_id": 1, "plan": {}, "requested": {"local-cheap": 2}})
    assert applier.poll_once() == [
        "local-cheap: started local-cheap-0 (0 -> 2)",
        "local-cheap: started local-cheap-1 (0 -> 2)",
    ]
    config = (tmp_path / "nodes" / "local-cheap-1.json").read_text()
    assert '"controller_url": "http://127.0.0.1:9"' in config
    assert applier.poll_once() == []  # the same plan again: nothing to do

    plans.append({"enabled": True, "plan_id": 2, "plan": {}, "requested": {"local-cheap": 1}})
    assert applier.poll_once() == ["local-cheap: draining local-cheap-1 (2 -> 1)"]
    applier.wait_for_drains(timeout_s=10)
    assert [p.name for p in fleet.processes.agents("local-cheap")] == ["local-cheap-0"]
    # The next agent gets a fresh name, never a drained one's.
    plans.append({"enabled": True, "plan_id": 3, "plan": {}, "requested": {"local-cheap": 2}})
    assert applier.poll_once() == ["local-cheap: started local-cheap-2 (1 -> 2)"]
    fleet.processes.stop_all(timeout_s=5)
