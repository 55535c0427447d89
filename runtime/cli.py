"""The `fleetform` command line: one entry point, a sub-command per job.

Sub-commands import what they need when they run, so `fleetform plan` does not pay for the
engine or the HTTP stack. User errors (a bad spec, a bad flag value) print one message to stderr
and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A problem with what the user asked for: printed as one message, exit status 2."""


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from runtime.catalog import default_catalog
    from runtime.costmodel import Workload
    from runtime.plan import build_report, builtin_models, render
    from runtime.spec import load_stack_file

    catalog = default_catalog()
    spec = load_stack_file(args.stack, catalog=catalog) if args.stack else None
    known = {m.name: m for m in spec.models} if spec else builtin_models()
    if args.model:
        missing = [name for name in args.model if name not in known]
        if missing:
            raise UsageError(
                f"--model: unknown model {', '.join(missing)} (known: {', '.join(sorted(known))})"
            )
        models = [known[name] for name in args.model]
    elif spec is not None:
        models = list(spec.models)
    else:
        raise UsageError(
            "give a stack file or --model (e.g. fleetform plan --model llama-3-1-8b --slo 800/60)"
        )
    if args.rate is not None and args.rate <= 0:
        raise UsageError("--rate must be a positive number of requests per second")
    try:
        workload = Workload(prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)
        report = build_report(
            catalog=catalog,
            spec=spec,
            stack=args.stack,
            models=models,
            slo_text=args.slo,
            workload=workload,
            rate_rps=args.rate,
            clouds=args.cloud,
            regions=None if args.all_regions else args.region,
            limit=args.limit,
            market=args.market,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render(report, Console(width=args.width) if args.width else Console())
    return 0


def _schema(args: argparse.Namespace) -> int:
    from runtime.spec import FleetSpec, stack_file_json_schema

    schema = stack_file_json_schema() if args.stack_file else FleetSpec.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from runtime.spec import FleetSpecError, load_stack_file

    failed = 0
    for path in args.stacks:
        try:
            spec = load_stack_file(path)
        except FleetSpecError as error:
            print(str(error), file=sys.stderr)
            failed += 1
        else:
            print(f"{path}: ok ({len(spec.pools)} pools, {len(spec.tenants)} tenants)")
    return 1 if failed else 0


def _export_terraform(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runtime.catalog import CatalogLookupError, default_catalog
    from runtime.cli_errors import usage_error
    from runtime.spec import FleetSpecError, load_stack_file
    from runtime.terraform import export_terraform, fleet_reservation

    command = "export terraform"
    # Terraform loads only *.tf and *.tf.json; any other name would be silently ignored.
    if args.output and not args.output.endswith(".tf.json"):
        return usage_error(
            command, f"-o {args.output}: Terraform reads only *.tf.json files (e.g. fleet.tf.json)"
        )
    try:
        catalog = default_catalog()
        spec = load_stack_file(args.stack, catalog=catalog)
        document = export_terraform(spec, catalog, source=args.stack)
    except (FleetSpecError, CatalogLookupError) as error:
        return usage_error(command, error)
    text = json.dumps(document, indent=2) + "\n"
    if not args.output:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as error:
        return usage_error(command, f"-o {args.output}: cannot write: {error.strerror}")
    reserved = fleet_reservation(spec, catalog)
    print(
        f"wrote {args.output}: {len(spec.pools)} pools, {len(spec.tenants)} tenants, "
        f"{len(document.get('check', {}))} checks; "
        f"{reserved.fleet_usd_per_month:,.2f} USD/month at the stack's replica counts",
        file=sys.stderr,
    )
    return 0


def _lazy(module: str, function: str) -> Handler:
    """A handler that imports its module only when the sub-command runs."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), function)(args))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetform",
        description="Inference orchestrator as infrastructure as code.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plan = commands.add_parser(
        "plan",
        help="right-size instances: cost, speed and the Pareto frontier; the fleet's cost",
        description="Feasible (cloud, region, instance, spot/on-demand) options with USD/hour, "
        "tokens/s, USD per million output tokens and SLO headroom, the Pareto frontier of cost "
        "vs latency, and the declared fleet's hourly and monthly cost per pool and tenant.",
    )
    plan.add_argument("stack", nargs="?", help="stack file (e.g. stacks/Pulumi.prod.yaml)")
    plan.add_argument(
        "--model",
        action="append",
        help="model name (repeatable); without a stack, a built-in model",
    )
    plan.add_argument(
        "--slo",
        help="SLO class of the stack, or TTFT_MS/TPOT_MS such as 800/60 (default: the stack's most important class)",
    )
    plan.add_argument("--rate", type=float, help="requests per second to size a fleet for")
    plan.add_argument(
        "--prompt-tokens",
        type=float,
        default=1020.0,
        help="mean prompt length (default 1020: Azure conversation trace median)",
    )
    plan.add_argument(
        "--output-tokens", type=float, default=129.0, help="mean output length (default 129)"
    )
    plan.add_argument(
        "--cloud",
        action="append",
        choices=["aws", "gcp", "azure"],
        help="only these clouds (repeatable)",
    )
    plan.add_argument(
        "--region",
        action="append",
        help="only these regions (repeatable; default with a stack: the stack's regions)",
    )
    plan.add_argument(
        "--all-regions", action="store_true", help="consider every region of the catalog"
    )
    plan.add_argument(
        "--market",
        choices=["any", "spot", "on-demand"],
        default="any",
        help="capacity market (classes that are not spot-eligible get on-demand only)",
    )
    plan.add_argument(
        "--limit", type=int, default=15, help="rows per model besides the Pareto frontier (0: all)"
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    plan.set_defaults(handler=_plan)

    schema = commands.add_parser("schema", help="print the fleet spec's JSON Schema")
    schema.add_argument(
        "--stack-file",
        action="store_true",
        help="schema of a whole stack file (config: fleetform:fleet: ...)",
    )
    schema.set_defaults(handler=_schema)

    validate = commands.add_parser("validate", help="validate stack files")
    validate.add_argument("stacks", nargs="+", metavar="STACK")
    validate.set_defaults(handler=_validate)

    export = commands.add_parser(
        "export",
        help="write the fleet in another tool's format (terraform)",
        description="Export the fleet declared in a stack file for other tools.",
    )
    targets = export.add_subparsers(dest="target", metavar="TARGET", required=True)
    export_tf = targets.add_parser(
        "terraform",
        help="a *.tf.json of the fleet's inventory with tenant quota and budget checks",
        description="Write a Terraform JSON configuration, built-in resources only: one "
        "terraform_data per pool, variables for replica counts, locals computing what each "
        "tenant is reserved, and check blocks that warn in `terraform plan` when a tenant's "
        "quota or the fleet budget would be exceeded.",
    )
    export_tf.add_argument(
        "stack", metavar="STACK", help="stack file (e.g. stacks/Pulumi.prod.yaml)"
    )
    export_tf.add_argument(
        "-o", "--output", metavar="OUT.tf.json", help="file to write (default: standard output)"
    )
    export_tf.set_defaults(handler=_export_terraform)

    _add_engine_commands(commands)
    _add_agent_command(commands)
    _add_controller_commands(commands)
    _add_simulate_command(commands)
    return parser


def _add_engine_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    import importlib.util

    # Absent until the engine lands; once present, its import errors must surface, not vanish.
    if importlib.util.find_spec("runtime.engine") is None or (
        importlib.util.find_spec("runtime.engine.commands") is None
    ):
        return
    from runtime.engine import commands as engine_commands

    generate = commands.add_parser("generate", help="complete a prompt with the embedded model")
    engine_commands.configure_generate_parser(generate)
    generate.set_defaults(handler=engine_commands.generate_main)

    bench = commands.add_parser("bench", help="benchmarks that print figures")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    engine = benches.add_parser("engine", help="embedded engine throughput and latency")
    engine_commands.configure_bench_engine_parser(engine)
    engine.set_defaults(handler=engine_commands.bench_engine_main)

    variant = commands.add_parser("variant", help="re-encode a GGUF model as q8_0, f16 or q4_0")
    engine_commands.configure_variant_parser(variant)
    variant.set_defaults(handler=engine_commands.variant_main)


def _add_agent_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # runtime.agent.main imports only the standard library at module level; aiohttp and the
    # engine load when the command runs.
    from runtime.agent import main as agent_commands

    agent = commands.add_parser(
        "agent",
        help="run a node agent: OpenAI-compatible HTTP inference",
        description="Serve the node's model over OpenAI-compatible HTTP with tenant quotas, "
        "priority classes and metrics, until SIGTERM (or POST /admin/drain) drains it.",
    )
    agent_commands.configure_parser(agent)
    agent.set_defaults(handler=agent_commands.agent_main)


def _add_controller_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # Both modules import only the standard library at module level.
    from runtime.controller import main as controller_commands
    from runtime.controller import up as up_commands

    controller = commands.add_parser(
        "controller",
        help="run the fleet controller: fleet view, quota leases, usage ledger",
        description="Receive agents' metrics pushes, keep the fleet view and the SQLite usage "
        "ledger, and hand out fleet-wide quota leases. Tokens come from FLEETFORM_FLEET_TOKEN "
        "and FLEETFORM_ADMIN_TOKEN.",
    )
    controller_commands.configure_parser(controller)
    controller.set_defaults(handler=controller_commands.main)

    up = commands.add_parser(
        "up",
        help="run a local fleet (controller + agents) until Ctrl-C",
        description="Start the controller and the local pools' agents with the embedded model, "
        "print OPENAI_BASE_URL / OPENAI_API_KEY lines, and drain and stop everything on Ctrl-C.",
    )
    up_commands.configure_parser(up)
    up.set_defaults(handler=up_commands.up_main)


def _simulate(args: argparse.Namespace) -> int:
    from runtime.sim.command import SimulateUsageError, simulate_main
    from runtime.sim.trace import TraceError

    try:
        return simulate_main(args)
    except (SimulateUsageError, TraceError) as error:
        raise UsageError(str(error)) from None


def _add_simulate_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # runtime.sim.command imports only the standard library at module level.
    from runtime.sim import command as simulate_commands

    simulate = commands.add_parser(
        "simulate",
        help="replay a trace against a fleet: cost, SLO attainment, ratio to a lower bound",
        description="Discrete-event simulation of a fleet serving a trace, driving the same "
        "scheduler, router, quota and autoscaler code as the live services with a virtual "
        "clock. Reports cost (USD, USD per million output tokens), SLO attainment per class, "
        "TTFT percentiles, shed and failed requests, replica-hours per pool, and the ratio to a "
        "lower bound on cost.",
    )
    simulate_commands.configure_parser(simulate)
    simulate.set_defaults(handler=_simulate)


def main(argv: Sequence[str] | None = None) -> int:
    from runtime.catalog import CatalogLookupError
    from runtime.spec import FleetSpecError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (FleetSpecError, UsageError, CatalogLookupError) as error:
        print(f"fleetform {args.command}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fleetform plan | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
