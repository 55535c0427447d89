"""Closed-loop autoscaling end to end: ``fleetform up`` with real agent processes on loopback.

Sustained load from the ``openai`` client makes the controller's autoscaler plan a second
``cheap`` replica; ``fleetform up``'s local applier starts it, it loads the model, pushes to the
controller and joins the fleet view agents route over. When the load stops, the plan goes back to one replica
and the newest agent is drained and exits. No request fails at any point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from .support import KEYS, MESSAGES, MODEL, REPO, spec_data, wait_until, write_stack
from .test_processes import _read_line

CLIENTS = 12  # concurrent requests: well past 8 slots x 50 % x (1 + 10 %) on one replica


def fleet_data() -> dict[str, Any]:
    data = spec_data()
    data["pools"][0].update(max_replicas=2, cold_start_s=15)  # cheap: 1..2
    data["autoscaling"] = {
        "period_s": 1.0,
        "target_utilization": 0.5,
        "hysteresis": 0.1,
        "scale_up_cooldown_s": 0,
        "scale_down_cooldown_s": 6,
        "forecast": {"method": "none"},
    }
    return data


def get(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def live_agents(summary: dict[str, Any]) -> set[str]:
    fleet = get(summary["controller"] + "/v1/fleet", summary["admin_token"])
    return {
        a["instance"]["instance_id"]
        for a in fleet["agents"]
        if a["fresh"] and a["instance"]["healthy"]
    }


def test_load_adds_a_local_replica_and_its_end_drains_it(tmp_path: Path) -> None:
    import openai

    stack = write_stack(tmp_path / "stack.yaml", fleet_data())
    run_dir = tmp_path / "run"
    with open(tmp_path / "up.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "up", str(stack), "--json", "--run-dir", run_dir],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    stop = threading.Event()
    served_by: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    try:
        summary = json.loads(_read_line(process, 240))
        entry = next(a["url"] for a in summary["agents"] if a["pool"] == "cheap")
        wait_until(lambda: live_agents(summary) == {"cheap-0", "dear-0"}, 30, "both agents")

        def client_loop() -> None:
            client = openai.OpenAI(
                api_key=KEYS["load"], base_url=f"{entry}/v1", max_retries=0, timeout=120
            )
            while not stop.is_set():
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model=MODEL,
                        messages=MESSAGES,
                        max_tokens=24,
                        extra_body={"ignore_eos": True},
                    )
                    completion = raw.parse()
                    assert completion.usage is not None
                    assert completion.usage.completion_tokens == 24
                    with lock:
                        served_by.append(raw.headers["x-fleetform-served-by"])
                except Exception as error:  # every failure is recorded and fails the test
                    with lock:
                        failures.append(repr(error))

        threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()

        # The autoscaler plans a second cheap replica; the applier starts it; it joins.
        wait_until(lambda: "cheap-1" in live_agents(summary), 180, "cheap-1 to join the fleet")
        plan = get(summary["controller"] + "/v1/autoscale", summary["admin_token"])
        assert plan["requested"]["cheap"] == 2
        # It is in the fleet view every agent routes over (fresh and healthy). Whether it gets
        # requests is the router's choice: cost-aware routing packs the cheapest replica that
        # still meets the SLO, so with a one-minute TTFT objective it may not need cheap-1.

        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in threads)
        served_during_load = len(served_by)

        # No load: back to one cheap replica; the newest agent is drained and exits.
        wait_until(
            lambda: (
                get(summary["controller"] + "/v1/autoscale", summary["admin_token"])["requested"][
                    "cheap"
                ]
                == 1
            ),
            60,
            "the plan to return to one cheap replica",
        )
        wait_until(lambda: "cheap-1" not in live_agents(summary), 60, "cheap-1 to leave")
        node_log = run_dir / "logs" / "cheap-1.log"
        wait_until(lambda: "drained" in node_log.read_text(errors="replace"), 60, "cheap-1 drained")
        up_log = (tmp_path / "up.log").read_text(errors="replace")
        assert "autoscale: cheap: started cheap-1 (1 -> 2)" in up_log
        assert "autoscale: cheap: draining cheap-1 (2 -> 1)" in up_log

        # The fleet still serves, from the replicas that stayed.
        after = openai.OpenAI(
            api_key=KEYS["load"], base_url=f"{entry}/v1", max_retries=0, timeout=120
        ).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert after.choices[0].message.content
        assert failures == []
        assert served_during_load >= CLIENTS  # every client completed at least one request
    finally:
        stop.set()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert process.returncode == 0, (tmp_path / "up.log").read_text(errors="replace")[-3000:]
