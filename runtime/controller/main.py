"""``fleetform controller``: run the controller process until SIGTERM or SIGINT.

This module owns the process around :func:`runtime.controller.app.init`: the command-line
arguments, reading the two tokens from the environment (``FLEETFORM_FLEET_TOKEN``,
``FLEETFORM_ADMIN_TOKEN``; never from the command line, where other users could read them),
loading the stack, checking that the ledger file is usable, and serving until a signal. A
missing token, a bad stack or an unusable ledger exits 2 with one line on stderr; failing to
listen exits 1. ``runtime.cli`` wires :func:`configure_parser` and :func:`main` in as the
``controller`` sub-command; ``python -m runtime.controller.main`` runs it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from runtime.cli_errors import usage_error

__all__ = ["ADMIN_TOKEN_ENV", "FLEET_TOKEN_ENV", "configure_parser", "main", "serve"]

FLEET_TOKEN_ENV = "FLEETFORM_FLEET_TOKEN"
ADMIN_TOKEN_ENV = "FLEETFORM_ADMIN_TOKEN"
EXIT_FAILED = 1

log = logging.getLogger("fleetform.controller")


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fleetform controller``."""
    p.add_argument("--stack", required=True, metavar="STACK", help="stack file with the fleet")
    p.add_argument("--db", default="fleetform-ledger.db", metavar="PATH", help="usage ledger")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="port (default 8700; 0: any free)")
    p.add_argument(
        "--stale-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drop agents silent this long from the fleet view "
        "(default: the spec's routing.peer_stale_after_s)",
    )
    p.add_argument(
        "--lease-ttl", type=float, default=None, metavar="SECONDS", help="quota lease lifetime"
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )


def main(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of ``fleetform controller``; returns the exit code."""
    from runtime.controller.config import ControllerConfigError, controller_config_from_spec
    from runtime.controller.ledger import Ledger, LedgerError
    from runtime.spec import FleetSpecError, load_stack_file

    environ = os.environ if environ is None else environ
    fleet_token = environ.get(FLEET_TOKEN_ENV, "")
    admin_token = environ.get(ADMIN_TOKEN_ENV, "")
    if not fleet_token:
        return usage_error(
            "controller", f"{FLEET_TOKEN_ENV} is not set (the token agents push with)"
        )
    if not admin_token:
        return usage_error("controller", f"{ADMIN_TOKEN_ENV} is not set (the token of admin reads)")
    try:
        spec = load_stack_file(args.stack)
    except FleetSpecError as error:
        return usage_error("controller", str(error))
    overrides: dict[str, object] = {"host": args.host, "port": args.port, "stack": args.stack}
    if args.stale_after is not None:
        overrides["stale_after_s"] = args.stale_after
    if args.lease_ttl is not None:
        overrides["lease_ttl_s"] = args.lease_ttl
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = controller_config_from_spec(
            spec,
            db_path=args.db,
            fleet_token=fleet_token,
            admin_token=admin_token,
            environ=environ,
            **overrides,
        )
    except ControllerConfigError as error:
        return usage_error("controller", str(error))
    try:
        # Fail now, with one line, rather than from inside the server's startup.
        Ledger(config.db_path).close()
    except LedgerError as error:
        return usage_error("controller", str(error))
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 130


async def serve(config: object, *, on_listening: Callable[[int], None] | None = None) -> int:
    """Serve ``config`` until SIGTERM or SIGINT; the process exit code."""
    from aiohttp import web

    from runtime.controller.app import init
    from runtime.controller.config import ControllerConfig

    assert isinstance(config, ControllerConfig)
    app = init(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as error:
            print(
                f"fleetform controller: cannot listen on {config.host}:{config.port}: "
                f"{error.strerror or error}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        port = _bound_port(runner.addresses, config.port)
        log.info("controller listening on http://%s:%d", config.host, port)
        if on_listening is not None:
            on_listening(port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping")
        return 0
    finally:
        await runner.cleanup()


def _bound_port(addresses: Sequence[object], configured: int) -> int:
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="fleetform controller")
    configure_parser(parser)
    sys.exit(main(parser.parse_args()))
