"""`fleetform simulate`: replay a trace against a fleet under a policy and report cost and SLOs.

This module owns the command line of the simulator: its options, running one simulation per
(fleet, policy) with the lower bound computed once per fleet, and writing the table, the JSON
document and the plot. Only the standard library is imported at module level, so building the
CLI parser stays cheap; the simulator loads when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["configure_parser", "simulate_main"]

DEFAULT_MIX = "critical=0.1,standard=0.7,batch=0.2"


class SimulateUsageError(ValueError):
    """A bad option value: the CLI prints it as one line and exits 2."""


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trace",
        required=True,
        help="Azure CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or JSON lines "
        "(timestamp ms, input_length, output_length)",
    )
    p.add_argument(
        "--fleet",
        required=True,
        action="append",
        metavar="STACK",
        help="stack file (repeatable: the plot's Pareto frontier spans every fleet and policy)",
    )
    p.add_argument(
        "--policy",
        action="append",
        choices=["fleetform", "homogeneous", "round-robin", "all"],
        help="policy to run (repeatable; default fleetform; 'all' runs the three)",
    )
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: replicas and cost over time")
    shaping = p.add_argument_group("trace shaping")
    shaping.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply arrival times (default 1)"
    )
    shaping.add_argument(
        "--load", type=float, default=1.0, help="multiply the number of requests (default 1)"
    )
    shaping.add_argument(
        "--duration", type=float, default=None, help="replay only the first SECONDS (scaled)"
    )
    shaping.add_argument("--limit", type=int, default=None, help="only the first N requests")
    shaping.add_argument(
        "--class-mix",
        default=DEFAULT_MIX,
        help=f"SLO class shares, drawn per request by a seeded hash (default {DEFAULT_MIX})",
    )
    shaping.add_argument(
        "--model", default=None, help="model every request asks for (default: most pools' model)"
    )
    shaping.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="max_tokens clients send (default: each request's trace output length)",
    )
    shaping.add_argument("--seed", type=int, default=0, help="seed of the mix and preemptions")
    spot = p.add_argument_group("spot preemption")
    spot.add_argument(
        "--spot-preemption-rate",
        type=float,
        default=0.0,
        metavar="PER_HOUR",
        help="preemptions per spot instance-hour (Poisson, seeded; default 0)",
    )
    spot.add_argument(
        "--spot-preempt",
        action="append",
        default=[],
        metavar="[POOL@]SECONDS",
        help="preempt one spot instance (of POOL) at SECONDS (repeatable)",
    )
    spot.add_argument(
        "--spot-notice", type=float, default=30.0, help="seconds of notice before reclaim (30)"
    )
    model = p.add_argument_group("simulation")
    model.add_argument(
        "--cpu-calibration",
        metavar="PATH",
        help="CPU figures from `fleetform bench engine --calibration-out` (as "
        "FLEETFORM_CPU_CALIBRATION)",
    )
    model.add_argument(
        "--view-refresh",
        type=float,
        default=2.0,
        help="seconds between refreshes of the router's fleet view (default 2, the push interval)",
    )
    model.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="scheduler token budget per step (default 2048)",
    )
    model.add_argument(
        "--no-tpot-budget",
        dest="tpot_budget",
        action="store_false",
        help="schedule prefill by the token budget alone, not cut to the decodes' TPOT "
        "objectives (the scheduler without a step cost)",
    )
    model.add_argument(
        "--no-bound", action="store_true", help="skip the lower bound (an integer program/minute)"
    )
    model.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    p.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)


def _preemptions(values: list[str]) -> tuple[tuple[str | None, float], ...]:
    out: list[tuple[str | None, float]] = []
    for value in values:
        pool, sep, at = value.rpartition("@")
        try:
            seconds = float(at)
        except ValueError:
            raise SimulateUsageError(
                f"--spot-preempt: expected [POOL@]SECONDS, got {value!r}"
            ) from None
        out.append((pool if sep else None, seconds))
    return tuple(out)


def _check(args: argparse.Namespace) -> None:
    problems = []
    if args.time_scale <= 0:
        problems.append("--time-scale must be positive")
    if args.load <= 0:
        problems.append("--load must be positive")
    if args.duration is not None and args.duration <= 0:
        problems.append("--duration must be positive")
    if args.limit is not None and args.limit < 1:
        problems.append("--limit must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        problems.append("--max-tokens must be at least 1")
    if args.spot_preemption_rate < 0:
        problems.append("--spot-preemption-rate must not be negative")
    if args.spot_notice < 0:
        problems.append("--spot-notice must not be negative")
    if args.view_refresh <= 0:
        problems.append("--view-refresh must be positive")
    if args.max_num_batched_tokens < 1:
        problems.append("--max-num-batched-tokens must be at least 1")
    if args.jobs < 1:
        problems.append("--jobs must be at least 1")
    if problems:
        raise SimulateUsageError("; ".join(problems))


def simulate_main(args: argparse.Namespace) -> int:
    _check(args)
    preemptions = _preemptions(args.spot_preempt)
    if args.cpu_calibration:
        from runtime.costmodel import CPU_CALIBRATION_ENV, CpuAssumption

        try:
            CpuAssumption.load(args.cpu_calibration)
        except (OSError, ValueError, KeyError) as error:
            raise SimulateUsageError(f"--cpu-calibration: {error}") from None
        # Every PerformanceModel.default() (the autoscaler's pool facts too) reads it from here.
        os.environ[CPU_CALIBRATION_ENV] = str(Path(args.cpu_calibration).resolve())
    policies: list[str] = []
    for policy in args.policy or ["fleetform"]:
        for name in ["fleetform", "homogeneous", "round-robin"] if policy == "all" else [policy]:
            if name not in policies:
                policies.append(name)
    jobs = [(fleet, policy) for fleet in args.fleet for policy in policies]
    options = {
        "trace": args.trace,
        "time_scale": args.time_scale,
        "load": args.load,
        "duration": args.duration,
        "limit": args.limit,
        "class_mix": args.class_mix,
        "model": args.model,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "spot_preemption_rate": args.spot_preemption_rate,
        "spot_preemptions": preemptions,
        "spot_notice": args.spot_notice,
        "view_refresh": args.view_refresh,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "tpot_budget": args.tpot_budget,
        "bound": not args.no_bound,
    }
    if args.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs))) as pool:
            documents = list(pool.map(_run_one, [(options, f, p) for f, p in jobs]))
    else:
        documents = [_run_one((options, fleet, policy)) for fleet, policy in jobs]
    if not args.quiet:
        from rich.console import Console

        from runtime.sim.report import render_table

        console = Console(width=args.width) if args.width else Console()
        render_table(documents, console)
        for doc in documents:
            for note in doc["notes"]:
                console.print(f"[dim]note ({doc['policy']}, {doc['fleet']}): {note}[/dim]")
    if args.json:
        payload: Any = documents[0] if len(documents) == 1 else {"runs": documents}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        from runtime.sim.report import plot_runs

        plot_runs(documents, args.plot)
    return 0


def _run_one(job: tuple[dict[str, Any], str, str]) -> dict[str, Any]:
    """One (fleet, policy) run, from options that survive pickling to a worker process."""
    options, fleet_path, policy = job
    from runtime.catalog import default_catalog
    from runtime.costmodel import PerformanceModel
    from runtime.sim.baselines import policy_fleet
    from runtime.sim.bound import lower_bound
    from runtime.sim.report import summarise, ttft_attainable
    from runtime.sim.simulator import SimSettings, Simulator
    from runtime.sim.trace import assign_mix, load_trace, parse_class_mix, reshape
    from runtime.spec import load_stack_file

    catalog = default_catalog()
    perf = PerformanceModel.default()
    spec = load_stack_file(fleet_path, catalog=catalog)
    trace = reshape(
        load_trace(options["trace"], limit=options["limit"]),
        time_scale=options["time_scale"],
        load=options["load"],
        seed=options["seed"],
        duration_s=options["duration"],
    )
    requests = assign_mix(
        trace,
        spec,
        class_mix=parse_class_mix(options["class_mix"]),
        model=options["model"],
        seed=options["seed"],
    )
    if not requests:
        raise SimulateUsageError("the trace has no requests in the chosen window")
    fleet, choice = policy_fleet(policy, spec, requests, catalog=catalog, perf=perf)
    settings = SimSettings(
        seed=options["seed"],
        view_refresh_s=options["view_refresh"],
        max_num_batched_tokens=options["max_num_batched_tokens"],
        tpot_budget=options["tpot_budget"],
        max_tokens=options["max_tokens"],
        spot_preemption_rate=options["spot_preemption_rate"],
        spot_preemptions=options["spot_preemptions"],
        spot_notice_s=options["spot_notice"],
        perf=perf,
    )
    sim = Simulator(fleet, requests, catalog=catalog, settings=settings).run()
    bound = None
    if options["bound"]:
        # The stack's bound (its instance options, whatever the policy runs), over this run's
        # horizon: the floor of min_replicas accrues for as long as the run lasts.
        bound = lower_bound(spec, requests, catalog=catalog, perf=perf, horizon_s=sim.end_s)
    attainable = ttft_attainable(fleet, sim, catalog=catalog, perf=perf)
    extra: dict[str, Any] = {
        "mix": {
            "class_mix": options["class_mix"],
            "model": requests[0].model,
            "seed": options["seed"],
            "by_tenant_and_class": _mix_counts(requests),
        },
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in options.items()
            if k not in ("trace",)
        },
        "cpu_figures": perf.cpu.source,
    }
    if choice is not None:
        extra["homogeneous"] = {
            "pool": fleet.pools[0].name,
            "instance_type": choice.instance_type,
            "variant": choice.variant,
            "usd_per_hour_each": choice.usd_per_hour,
            "peak_instances": choice.peak_instances,
            "peak_minute": choice.peak_minute,
            "considered": [
                {"pool": p, "peak_instances": n, "usd_per_hour": usd}
                for p, n, usd in choice.considered
            ],
        }
    return summarise(
        spec=fleet,
        sim=sim,
        bound=bound,
        policy=policy,
        trace=options["trace"],
        fleet=fleet_path,
        attainable=attainable,
        extra=extra,
    )


def _mix_counts(requests: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in requests:
        key = f"{r.tenant}/{r.slo_class}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


if __name__ == "__main__":  # pragma: no cover - `python -m runtime.sim.command`
    parser = argparse.ArgumentParser(prog="fleetform simulate")
    configure_parser(parser)
    sys.exit(simulate_main(parser.parse_args()))
