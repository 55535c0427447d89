"""``fleetform agent``: run one agent process until it is drained.

This module owns the process around the application: reading the node config (from
``--config node.json``, or cut from a stack with ``--stack FILE --pool NAME``), serving it on
its host and port, and the shutdown sequence. SIGTERM or SIGINT (or ``POST /admin/drain``)
starts a drain; when it completes the server stops and the process exits 0. A second signal
during a drain aborts the in-flight requests at once (a drain begun by a spot notice or the
admin route is not a signal: the OS shutdown that follows a GCP preemption SIGTERMs the agent
right after the notice, and must not cut the drain short). ``--spot-notices`` polls the cloud's
instance metadata for spot interruption notices (:mod:`runtime.agent.spot`). A model that fails
to load exits 1; a bad config exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys

from runtime.cli_errors import EXIT_USAGE, usage_error

__all__ = ["agent_main", "configure_parser", "serve"]

EXIT_FAILED = 1
SHUTDOWN_GRACE_S = 10.0  # after the drain, time for handlers to finish writing responses


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fleetform agent``."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="NODE_JSON", help="node config file (JSON)")
    source.add_argument("--stack", metavar="STACK", help="build the node config from a stack file")
    p.add_argument("--pool", help="with --stack: the pool this node belongs to")
    p.add_argument("--node-id", help="with --stack: node id (default: POOL-HOSTNAME)")
    p.add_argument("--host", help="override the config's bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="override the config's port (0: any free port)")
    p.add_argument(
        "--spot-notices",
        choices=["aws", "gcp", "azure"],
        help="poll this cloud's instance metadata for spot interruption notices and drain "
        "before the instance is reclaimed (overrides the config's spot_notices)",
    )
    p.add_argument(
        "--metadata-url",
        metavar="URL",
        help="base URL of the instance metadata service (default http://169.254.169.254)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the node config as JSON and exit (e.g. --stack ... --print-config > node.json)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )


def _load_config(args: argparse.Namespace) -> object:
    from runtime.agent.config import (
        NodeConfigError,
        load_node_config,
        node_config_from_spec,
        parse_node_config,
    )
    from runtime.spec import FleetSpecError, load_stack_file

    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise NodeConfigError(f"--port: {args.port} is not a port number")
        overrides["port"] = args.port
    if args.spot_notices is not None:
        overrides["spot_notices"] = args.spot_notices
    if args.metadata_url is not None:
        overrides["metadata_url"] = args.metadata_url
    if args.config is not None:
        if args.pool or args.node_id:
            raise NodeConfigError("--pool and --node-id go with --stack, not --config")
        config = load_node_config(args.config)
        if not overrides:
            return config
        # Validated again (model_copy would not): e.g. a --metadata-url that is no URL.
        return parse_node_config({**config.model_dump(mode="json"), **overrides}, args.config)
    if not args.pool:
        raise NodeConfigError("--stack needs --pool NAME")
    try:
        spec = load_stack_file(args.stack)
    except FleetSpecError as error:
        raise NodeConfigError(str(error).replace("\n", "; ")) from None
    port = overrides.pop("port", 8000)
    host = overrides.pop("host", "127.0.0.1")
    return node_config_from_spec(
        spec,
        args.pool,
        node_id=args.node_id or f"{args.pool}-{socket.gethostname()}",
        port=int(port),  # type: ignore[call-overload]
        host=str(host),
        **overrides,
    )


def agent_main(args: argparse.Namespace) -> int:
    """Entry point of ``fleetform agent``; returns the exit code."""
    from runtime.agent.config import NodeConfig, NodeConfigError

    try:
        config = _load_config(args)
    except NodeConfigError as error:
        return usage_error("agent", error)
    assert isinstance(config, NodeConfig)
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(serve(config))
    except NodeConfigError as error:  # e.g. a controller_url without a fleet token
        return usage_error("agent", error)
    except KeyboardInterrupt:
        return 130


async def serve(config: object) -> int:
    """Serve ``config`` until drained; the process exit code."""
    from aiohttp import web

    from runtime.agent.app import AGENT, DRAINED, advertise, begin_drain, init
    from runtime.agent.config import NodeConfig

    assert isinstance(config, NodeConfig)
    log = logging.getLogger("fleetform.agent")
    app = init(config)
    state = app[AGENT]
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as error:
        print(
            f"fleetform agent: error: cannot listen on {config.host}:{config.port}: "
            f"{error.strerror}",
            file=sys.stderr,
        )
        await runner.cleanup()
        return EXIT_USAGE
    port = _bound_port(site, config.port)
    print(f"fleetform agent {config.node_id}: listening on http://{config.host}:{port}", flush=True)
    url = advertise(app, port)  # starts the pushes to the controller, if there is one
    if state.fleet is not None:
        log.info("advertising %s to the fleet via %s", url, config.controller_url)

    loop = asyncio.get_running_loop()
    signalled = False

    def on_signal(signum: int) -> None:
        nonlocal signalled
        name = signal.Signals(signum).name
        if signalled:
            log.warning("second %s: aborting in-flight requests now", name)
            state.drain_deadline_s = state.clock()
        elif state.draining:  # begun by a spot notice or /admin/drain: its deadline stands
            log.info("%s: already draining", name)
        else:
            log.info("%s: draining", name)
            begin_drain(app)
        signalled = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    exit_code = 0
    drained = app[DRAINED]
    while not drained.is_set():
        try:
            await asyncio.wait_for(drained.wait(), timeout=0.5)
        except TimeoutError:
            if state.backend.load_error is not None:
                print(f"fleetform agent: error: {state.backend.load_error}", file=sys.stderr)
                exit_code = EXIT_FAILED
                break
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    await runner.cleanup()
    log.info("stopped")
    return exit_code


def _bound_port(site: object, configured: int) -> int:
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    for sock in sockets:
        return int(sock.getsockname()[1])
    return configured
