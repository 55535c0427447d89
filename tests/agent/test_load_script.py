"""Smoke test of scripts/load_agent.py: a few seconds of load, its JSON report, and cleanup."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "load_agent.py"
# Seconds of load, and a light workload (short prompts and outputs) so a busy machine copes too.
SHORT = [
    *("--duration", "3", "--calibration-s", "8", "--calibration-streams", "4"),
    *("--drain-s", "15", "--prompt-scale", "32", "--output-scale", "32"),
]


def agent_alive(pid: int) -> bool:
    """Whether ``pid`` is still a Fleetform agent (not merely a reused process id)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"runtime.cli" in cmdline and b"agent" in cmdline


def test_a_short_run_reports_every_figure_and_stops_the_agent() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *SHORT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {
        *("agent", "host", "workload", "capacity", "offered", "classes", "rss_mb"),
    }
    assert report["agent"]["exit_code"] == 0  # drained on SIGTERM and exited cleanly
    assert not agent_alive(report["agent"]["pid"])
    capacity = report["capacity"]["requests_per_s"]
    assert capacity > 0 and report["capacity"]["failed"] == 0
    for phase in (report["capacity"], report["offered"]):
        assert set(phase["cpu_cores"]) == {"agent", "load_generator", "other_processes"}
        assert phase["cpu_cores"]["agent"] > 0
    assert report["offered"]["requests_per_s"] == round(2 * capacity, 3)
    assert set(report["classes"]) == {"critical", "batch"}
    sent = 0
    for name, figures in report["classes"].items():
        outcomes = ("ok", "shed_503", "rate_limited_429", "errors", "unfinished")
        assert sum(figures[k] for k in outcomes) == figures["sent"], name
        assert set(figures["ttft_ms"]) == {"p50", "p95", "p99"}
        assert figures["slo_ttft_ms"] == {"critical": 3000, "batch": 60000}[name]
        if figures["ok"]:
            assert 0 < figures["ttft_ms"]["p50"] <= figures["ttft_ms"]["p99"]
            assert 0 <= figures["ttft_within_slo_of_ok"] <= 1
        sent += figures["sent"]
    assert sent > 0
    rss = report["rss_mb"]
    assert rss["samples"] >= 3
    assert 0 < rss["start"] <= rss["peak"] <= rss["process_high_water"]
    assert report["workload"]["prompt_tokens_mean"] > 0


def test_ctrl_c_stops_the_agent_too() -> None:
    script = subprocess.Popen(
        [sys.executable, str(SCRIPT), *SHORT],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert script.stderr is not None
        pid = None
        for line in script.stderr:  # blocks until the agent is up and calibration begins
            match = re.search(r"agent pid (\d+) ready", line)
            if match:
                pid = int(match.group(1))
                break
        assert pid is not None and agent_alive(pid)
        time.sleep(1.0)  # requests in flight
        script.send_signal(signal.SIGINT)
        assert script.wait(timeout=60) == 130
        assert not agent_alive(pid)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
