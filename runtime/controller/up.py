"""``fleetform up STACK``: run a local fleet in the foreground until Ctrl-C or SIGTERM.

This module owns the command's arguments and what it shows: a live progress table while the
controller starts and each agent loads its model, then the lines to paste into a shell, then a
clean drain-and-stop on Ctrl-C/SIGTERM (exit 0). Starting problems print one message and exit 2
(bad stack) or 1 (a process failed), after stopping whatever had started.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

__all__ = ["configure_parser", "up_main"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", help="stack file whose pools are all 'cloud: local'")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where configs, logs and the usage ledger go (default: .fleetform/<fleet name>)",
    )
    p.add_argument("--controller-port", type=int, default=None, help="default: any free port")
    p.add_argument(
        "--port-base",
        type=int,
        default=None,
        help="first agent port, the others follow (default: any free ports)",
    )
    p.add_argument(
        "--ready-timeout", type=float, default=180.0, help="seconds to wait for every agent"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (URLs, keys, logs) instead of the shell lines",
    )


def up_main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from runtime.controller.local_fleet import (
        FleetUpError,
        LocalApplier,
        LocalFleet,
        ManagedProcess,
        fetch_plan,
        wait_for_signal,
    )
    from runtime.spec import load_stack_file

    err = Console(stderr=True)
    spec = load_stack_file(args.stack)  # FleetSpecError -> exit 2 in runtime.cli
    run_dir = args.run_dir or Path(".fleetform") / spec.name
    fleet = LocalFleet(
        spec,
        Path(args.stack).resolve(),
        run_dir.resolve(),
        controller_port=args.controller_port,
        agent_port_base=args.port_base,
    )
    started = time.monotonic()
    states: dict[str, str] = {}

    def table() -> Table:
        t = Table(title=f"fleet {spec.name}", title_justify="left")
        for column in ("process", "pool", "url", "state"):
            t.add_column(column)
        if fleet.processes is not None:
            for p in fleet.processes.processes.values():
                t.add_row(p.name, p.pool or "-", p.url, states.get(p.name, "starting"))
        return t

    try:
        with Live(table(), console=err, transient=False, refresh_per_second=4) as live:

            def on_event(kind: str, process: ManagedProcess) -> None:
                name = process.name
                if kind == "started":
                    loading = "starting" if process.role == "controller" else "loading model"
                    states[name] = loading
                else:
                    states[name] = f"ready ({time.monotonic() - started:.1f}s)"
                live.update(table())

            fleet.start(on_event)
            live.update(table())
            fleet.wait_ready(args.ready_timeout, on_event)
    except FleetUpError as error:
        err.print(f"[red]fleetform up: {error}[/red]")
        fleet.stop(timeout_s=10.0)
        return 1 if fleet.processes is not None else 2
    except KeyboardInterrupt:
        fleet.stop(timeout_s=10.0)
        return 130

    if args.json:
        print(json.dumps(fleet.summary()), flush=True)
    else:
        print("# Fleet ready. Paste into a shell:", flush=True)
        for line in fleet.shell_lines():
            print(line, flush=True)
        err.print(f"logs and ledger in {fleet.run_dir}; Ctrl-C drains and stops everything")

    stop_scaling = threading.Event()
    applier: LocalApplier | None = None
    if spec.autoscaling.enabled:
        controller = fleet.processes.processes["controller"] if fleet.processes else None
        assert controller is not None
        applier = LocalApplier(
            fleet,
            fetch=lambda: fetch_plan(controller.url, fleet.admin_token),
            on_event=lambda line: err.print(f"autoscale: {line}"),
        )
        interval = max(0.5, spec.autoscaling.period_s / 2)
        threading.Thread(
            target=applier.run, args=(stop_scaling, interval), name="local-applier", daemon=True
        ).start()

    def on_exit(process: ManagedProcess) -> None:
        code = process.popen.returncode
        err.print(
            f"[yellow]{process.name} exited with code {code}; see {process.log_path}[/yellow]"
        )

    def on_repeat(signum: int) -> None:
        err.print(f"signal {signum} again: already stopping (agents drain, then are killed)")

    signum = wait_for_signal(fleet, on_exit, on_repeat)
    err.print(f"received signal {signum}: draining agents, then stopping the controller ...")
    stop_scaling.set()
    if applier is not None:
        applier.wait_for_drains(timeout_s=60.0)
    # The handler stays installed until the process exits: repeats only print a note.
    codes = fleet.stop()
    failed = {name: code for name, code in codes.items() if code not in (0, None)}
    if failed:
        err.print(f"[yellow]non-zero exits: {failed}[/yellow]")
    err.print("stopped")
    sys.stdout.flush()
    return 0
