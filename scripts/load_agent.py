#!/usr/bin/env python3
"""Overload test of one agent: critical work keeps its TTFT objective, batch work is shed.

What it does, all on 127.0.0.1 and bounded in time (it stops by itself, also on Ctrl-C or SIGTERM, and the agent gets SIGTERM
if this script dies):

1. Writes a node config for ``--pool`` of ``--stack`` (default: ``local-cheap`` of
   ``stacks/local.yaml``, the embedded SmolLM2 model) into a temporary directory, with fresh
   random keys for the ``demo`` and ``batch-jobs`` tenants (``FLEETFORM_DEMO_KEY`` /
   ``FLEETFORM_BATCH_KEY``), and starts ``fleetform agent --config`` on a free port.
2. Calibrates: ``--calibration-streams`` closed-loop streams (a new request as soon as one ends)
   for ``--calibration-s`` seconds; the capacity is the completion rate after a short warm-up.
3. Offers ``--overload`` (default 2) times that rate for ``--duration`` seconds as an open-loop
   Poisson process: a ``--critical-share`` of the arrivals are the ``demo`` tenant with
   ``X-Priority: critical``, the rest the ``batch-jobs`` tenant (class ``batch``). Every request
   streams ``/v1/completions`` so the time to first token is measured client-side. Requests
   still unfinished ``--drain-s`` seconds after the last arrival are cancelled and counted as
   ``unfinished``.
4. Samples the agent process's resident memory (``VmRSS``) every second throughout.
5. Prints one JSON object (capacity, offered rate, per class: sent, ok, shed 503, 429, errors,
   unfinished, TTFT p50/p95/p99 against the class's objective and the fraction of completed
   requests within it; RSS start/peak/end), sends the agent SIGTERM and waits for it to exit.

Workload: prompt and output lengths sampled (seeded) from the Azure LLM inference conversation
trace, scaled down (``--prompt-scale``, ``--output-scale``) with the engine benchmark's
:func:`runtime.engine.bench.build_workload`; prompts are token-id windows of English text
(:func:`runtime.engine.bench.make_prompts`) and ``ignore_eos`` makes each output exactly its
sampled length. The load generator shares the machine with the agent, so on a small machine its
own CPU use is part of what is measured.

Run: ``.venv/bin/python scripts/load_agent.py [--duration 60]`` (progress on stderr, JSON on
stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a plain script, scripts/ is sys.path[0]; the runtime package lives at the root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from runtime.engine.bench import (  # noqa: E402
    DEFAULT_TRACE,
    build_workload,
    corpus_tokens,
    load_trace,
    make_prompts,
)

DEMO_KEY_ENV, BATCH_KEY_ENV = "FLEETFORM_DEMO_KEY", "FLEETFORM_BATCH_KEY"
CLASSES = ("critical", "batch")
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 60.0
RSS_PERIOD_S = 1.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WORKLOAD_SIZE = 4096  # requests sampled up front; cycled if a run needs more


def log(message: str) -> None:
    print(f"load_agent: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The agent process


class AgentProcess:
    """``fleetform agent --config`` in a session of its own (Ctrl-C here does not reach it; this
    script stops it with SIGTERM, the agent's drain signal)."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  # closed in stop()
        command = [sys.executable, "-m", "runtime.cli", "agent", "--config", str(config_path)]
        self.process = subprocess.Popen(
            [*command, "--log-level", "WARNING"],
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        self.url = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_listening(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self.url
            if self.process.poll() is not None:
                raise RuntimeError(f"the agent exited ({self.process.returncode}): {self.tail()}")
            time.sleep(0.1)
        raise TimeoutError("the agent did not start listening")

    def rss_mb(self) -> float | None:
        """Resident memory now (``VmRSS``), or ``None`` once the process is gone."""
        return _proc_status_mb(self.pid, "VmRSS")

    def peak_rss_mb(self) -> float | None:
        return _proc_status_mb(self.pid, "VmHWM")

    def tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not drain in time; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log("the agent did not exit after SIGTERM; killing it")
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@dataclass(frozen=True)
class CpuSample:
    at: float
    busy_ticks: int  # the whole machine
    agent_ticks: int
    own_ticks: int


def cpu_sample(agent_pid: int) -> CpuSample:
    """Busy CPU clock ticks of the machine, the agent and this script (Linux ``/proc``)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return CpuSample(time.monotonic(), sum(fields[:8]) - idle, _ticks(agent_pid), _ticks("self"))


def _ticks(pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            after_name = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(after_name[11]) + int(after_name[12])  # utime + stime


def cpu_report(start: CpuSample, end: CpuSample) -> dict[str, float]:
    """Cores used on average by the agent, this load generator and everything else."""
    hz = os.sysconf("SC_CLK_TCK")
    wall = max(1e-9, end.at - start.at)

    def cores(ticks: int) -> float:
        return round(ticks / hz / wall, 2)

    agent, own = end.agent_ticks - start.agent_ticks, end.own_ticks - start.own_ticks
    others = end.busy_ticks - start.busy_ticks - agent - own
    return {"agent": cores(agent), "load_generator": cores(own), "other_processes": cores(others)}


def _terminate_with_parent() -> None:
    """In the child: get SIGTERM if this script dies without stopping it (even on SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _proc_status_mb(pid: int, field_name: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------
# Workload and requests


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    max_tokens: int


def make_jobs(args: argparse.Namespace, max_model_len: int) -> list[Job]:
    from runtime.engine.gguf_model import read_file_metadata
    from runtime.engine.model_files import resolve_model_path
    from runtime.engine.tokenizer import GGUFTokenizer

    tokenizer = GGUFTokenizer(read_file_metadata(resolve_model_path()))
    # corpus_tokens only needs `.engine.encode`; the tokenizer alone provides it.
    corpus = corpus_tokens(types.SimpleNamespace(engine=tokenizer))  # type: ignore[arg-type]
    pairs = build_workload(
        load_trace(args.trace),
        WORKLOAD_SIZE,
        args.seed,
        args.prompt_scale,
        args.output_scale,
        max_model_len,
    )
    prompts = make_prompts(corpus, [p for p, _ in pairs], args.seed)
    return [Job(prompt, out) for prompt, (_, out) in zip(prompts, pairs, strict=True)]


@dataclass
class Outcome:
    status: int | None  # HTTP status; None when the connection failed
    ttft_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass(frozen=True)
class Client:
    session: aiohttp.ClientSession
    url: str
    model: str


async def send(client: Client, key: str, priority: str | None, job: Job) -> Outcome:
    """One streaming completion; the time to its first non-empty text."""
    headers = {"Authorization": f"Bearer {key}"}
    if priority is not None:
        headers["X-Priority"] = priority
    body = {
        "model": client.model,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "ignore_eos": True,  # every output is exactly its sampled length
        "temperature": 0.0,
        "stream": True,
    }
    started = time.monotonic()
    try:
        url = f"{client.url}/v1/completions"
        async with client.session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                await response.read()
                return Outcome(response.status)
            ttft = None
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    return Outcome(200, ttft)
                event = json.loads(payload)
                if "error" in event:
                    return Outcome(200, ttft, f"in-band error: {event['error'].get('code')}")
                if ttft is None and any(c.get("text") for c in event.get("choices", ())):
                    ttft = time.monotonic() - started
            return Outcome(200, ttft, "stream ended early")
    except (aiohttp.ClientError, OSError, ValueError) as error:
        return Outcome(None, None, type(error).__name__)


@dataclass
class ClassStats:
    slo_ttft_ms: float
    sent: int = 0
    ok: int = 0
    shed_503: int = 0
    rate_limited_429: int = 0
    errors: int = 0
    unfinished: int = 0
    ttft_s: list[float] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        if outcome.ok:
            self.ok += 1
            if outcome.ttft_s is not None:
                self.ttft_s.append(outcome.ttft_s)
        elif outcome.status == 503:
            self.shed_503 += 1
        elif outcome.status == 429:
            self.rate_limited_429 += 1
        else:
            self.errors += 1

    def report(self) -> dict[str, Any]:
        ttft_ms = np.asarray(self.ttft_s) * 1000.0
        slo = self.slo_ttft_ms

        def pct(q: float) -> float | None:
            return round(float(np.percentile(ttft_ms, q)), 1) if len(ttft_ms) else None

        return {
            "sent": self.sent,
            "ok": self.ok,
            "shed_503": self.shed_503,
            "rate_limited_429": self.rate_limited_429,
            "errors": self.errors,
            "unfinished": self.unfinished,
            "slo_ttft_ms": slo,
            "ttft_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99)},
            "ttft_within_slo_of_ok": (
                round(float(np.mean(ttft_ms <= slo)), 4) if len(ttft_ms) else None
            ),
        }


# --------------------------------------------------------------------------------------------
# Phases


@dataclass
class Run:
    args: argparse.Namespace
    agent: AgentProcess
    model: str
    keys: dict[str, str]
    slo_ttft_ms: dict[str, float]
    jobs: list[Job]
    rss: list[float] = field(default_factory=list)

    def job_stream(self, offset: int) -> Iterator[Job]:
        index = offset
        while True:
            yield self.jobs[index % len(self.jobs)]
            index += 1


async def sample_rss(run: Run) -> None:
    while True:
        value = run.agent.rss_mb()
        if value is not None:
            run.rss.append(value)
        await asyncio.sleep(RSS_PERIOD_S)


async def wait_ready(client: Client, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with client.session.get(f"{client.url}/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise TimeoutError("the agent did not become ready")


async def wait_idle(client: Client, timeout: float) -> None:
    """Until the agent has no request in flight (cancelled clients' requests are aborted)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        async with client.session.get(f"{client.url}/metrics") as response:
            text = await response.text()
        match = re.search(r"^fleetform_in_flight_requests (\S+)$", text, re.M)
        if match and float(match.group(1)) == 0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the agent stayed busy after calibration")


async def calibrate(run: Run, client: Client) -> dict[str, Any]:
    """Closed loop: the completion rate the agent sustains with this workload.

    The streams start together, so the first completions come as one wave after a long shared
    prefill; the rate is measured between the end of that first wave (``streams`` completions)
    and the last completion, when the loop is in its steady state.
    """
    args = run.args
    seconds, streams = args.calibration_s, args.calibration_streams
    jobs = run.job_stream(0)
    # One request first: the engine's first steps are slower (allocation, caches).
    warmup = await send(client, run.keys["demo"], None, next(jobs))
    if not warmup.ok:
        raise RuntimeError(f"the warm-up request failed: {warmup}")
    started = time.monotonic()
    completions: list[float] = []
    failures: list[Outcome] = []

    async def loop() -> None:
        while True:
            outcome = await send(client, run.keys["demo"], None, next(jobs))
            if outcome.ok:
                completions.append(time.monotonic())
            else:
                failures.append(outcome)

    tasks = [asyncio.create_task(loop()) for _ in range(streams)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if len(completions) >= streams + 2:
        first, last = completions[streams - 1], completions[-1]
        rate = (len(completions) - streams) / (last - first) if last > first else 0.0
        method = "steady state after the first wave"
    else:  # too short a calibration for a steady state: the plain average
        rate = len(completions) / seconds
        method = "average over the whole calibration (too short for a steady state)"
    if rate <= 0:
        raise RuntimeError(
            f"calibration completed no request in {seconds:g}s "
            f"({len(failures)} failed); lengthen --calibration-s"
        )
    await wait_idle(client, IDLE_TIMEOUT_S)
    return {
        "requests_per_s": round(rate, 3),
        "method": method,
        "streams": streams,
        "seconds": round(time.monotonic() - started, 1),
        "completed": len(completions),
        "failed": len(failures),
    }


async def overload(run: Run, client: Client, rate: float) -> dict[str, Any]:
    """Open-loop Poisson arrivals at ``rate`` for ``--duration`` seconds."""
    args = run.args
    rng = np.random.default_rng(args.seed + 7)
    jobs = run.job_stream(len(run.jobs) // 2)  # not the calibration's requests
    stats = {name: ClassStats(run.slo_ttft_ms[name]) for name in CLASSES}
    pending: dict[asyncio.Task[Outcome], str] = {}
    start = time.monotonic()
    arrival = start
    while True:
        arrival += float(rng.exponential(1.0 / rate))
        if arrival > start + args.duration:
            break
        await asyncio.sleep(max(0.0, arrival - time.monotonic()))
        critical = bool(rng.random() < args.critical_share)
        name = "critical" if critical else "batch"
        key = run.keys["demo" if critical else "batch-jobs"]
        priority = "critical" if critical else None  # batch-jobs' default class is batch
        task = asyncio.create_task(send(client, key, priority, next(jobs)))
        pending[task] = name
        stats[name].sent += 1
    offered_s = time.monotonic() - start
    done, unfinished = await asyncio.wait(pending, timeout=args.drain_s) if pending else ((), ())
    for task in unfinished:
        task.cancel()
        stats[pending[task]].unfinished += 1
    await asyncio.gather(*unfinished, return_exceptions=True)
    for task in done:
        stats[pending[task]].add(task.result())
    sent = sum(s.sent for s in stats.values())
    return {
        "offered": {
            "requests_per_s": round(rate, 3),
            "duration_s": args.duration,
            "achieved_requests_per_s": round(sent / offered_s, 3) if offered_s else 0.0,
            "critical_share": args.critical_share,
        },
        "classes": {name: s.report() for name, s in stats.items()},
    }


async def measure(run: Run) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue in the client
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        client = Client(session, run.agent.url, run.model)
        await wait_ready(client, STARTUP_TIMEOUT_S)
        sampler = asyncio.create_task(sample_rss(run))
        try:
            log(
                f"agent pid {run.agent.pid} ready at {run.agent.url}; "
                f"calibrating for {run.args.calibration_s:g}s"
            )
            before = cpu_sample(run.agent.pid)
            capacity = await calibrate(run, client)
            calibrated = cpu_sample(run.agent.pid)
            capacity["cpu_cores"] = cpu_report(before, calibrated)
            rss_after_calibration = run.agent.rss_mb()
            rate = capacity["requests_per_s"] * run.args.overload
            log(
                f"capacity {capacity['requests_per_s']:.2f} req/s; offering {rate:.2f} req/s "
                f"for {run.args.duration:g}s"
            )
            result = await overload(run, client, rate)
            result["offered"]["cpu_cores"] = cpu_report(calibrated, cpu_sample(run.agent.pid))
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    rss = run.rss
    return {
        "capacity": capacity,
        **result,
        "rss_mb": {
            "start": round(rss[0], 1) if rss else None,
            "after_calibration": round(rss_after_calibration, 1) if rss_after_calibration else None,
            "peak": round(max(rss), 1) if rss else None,
            "end": round(rss[-1], 1) if rss else None,
            "samples": len(rss),
            "process_high_water": _round(run.agent.peak_rss_mb()),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --------------------------------------------------------------------------------------------
# Main


def node_config(args: argparse.Namespace, keys: dict[str, str], directory: Path) -> Any:
    from runtime.agent.config import node_config_from_spec
    from runtime.spec import load_stack_file

    spec = load_stack_file(args.stack)
    environ = {DEMO_KEY_ENV: keys["demo"], BATCH_KEY_ENV: keys["batch-jobs"]}
    config = node_config_from_spec(spec, args.pool, "load-agent", port=0, environ=environ)
    (directory / "node.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
    return config


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    keys = {"demo": secrets.token_urlsafe(24), "batch-jobs": secrets.token_urlsafe(24)}
    with tempfile.TemporaryDirectory(prefix="fleetform-load-") as tmp:
        directory = Path(tmp)
        config = node_config(args, keys, directory)
        slo = {c.name: c.ttft_ms for c in config.slo_classes}
        missing = [name for name in CLASSES if name not in slo]
        if missing:
            raise SystemExit(f"load_agent: the stack has no SLO class {', '.join(missing)}")
        max_model_len = getattr(config.engine, "max_model_len", None) or 2048
        jobs = make_jobs(args, max_model_len)
        agent = AgentProcess(directory / "node.json", directory / "agent.log")
        exit_code: int | None = None
        load_before = os.getloadavg()
        try:
            agent.wait_listening(STARTUP_TIMEOUT_S)
            run = Run(args, agent, config.model, keys, slo, jobs)
            result = asyncio.run(measure(run))
        finally:
            exit_code = agent.stop()
            log(f"agent {agent.pid} stopped (exit code {exit_code})")
        prompt_lengths = [len(j.prompt) for j in jobs]
        outputs = [j.max_tokens for j in jobs]
        return {
            "agent": {
                "stack": str(args.stack),
                "pool": args.pool,
                "pid": agent.pid,
                "exit_code": exit_code,
                "max_num_seqs": getattr(config.engine, "max_num_seqs", None),
            },
            # The generator shares the machine; other work on it shows in the load average and
            # in each phase's `cpu_cores.other_processes`.
            "host": {
                "cpus": os.cpu_count(),
                "loadavg_1m_before": round(load_before[0], 2),
                "loadavg_1m_after": round(os.getloadavg()[0], 2),
            },
            "workload": {
                "trace": Path(args.trace).name,
                "prompt_scale": args.prompt_scale,
                "output_scale": args.output_scale,
                "prompt_tokens_mean": round(float(np.mean(prompt_lengths)), 1),
                "output_tokens_mean": round(float(np.mean(outputs)), 1),
                "seed": args.seed,
            },
            **result,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stack", type=Path, default=REPO_ROOT / "stacks" / "local.yaml")
    p.add_argument("--pool", default="local-cheap")
    p.add_argument("--duration", type=float, default=60.0, help="overload phase, seconds")
    p.add_argument("--overload", type=float, default=2.0, help="offered rate / capacity")
    p.add_argument("--critical-share", type=float, default=0.25)
    p.add_argument("--calibration-s", type=float, default=30.0)
    p.add_argument("--calibration-streams", type=int, default=16)
    p.add_argument("--drain-s", type=float, default=30.0, help="wait for stragglers, seconds")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--prompt-scale", type=float, default=8.0)
    p.add_argument("--output-scale", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("duration", "overload", "calibration_s", "drain_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.critical_share <= 1:
        p.error("--critical-share must be in [0, 1]")
    if args.calibration_streams < 1:
        p.error("--calibration-streams must be >= 1")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: the same orderly stop as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_load(args)
    except KeyboardInterrupt:
        log("interrupted; the agent was stopped")
        return 130
    except (RuntimeError, TimeoutError) as error:
        log(f"failed: {error}")
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
