"""The local fleet: a controller and embedded-engine agents as processes on this machine.

This module owns ``fleetform up STACK`` for stacks whose pools are all ``cloud: local``: it
derives every process's config from the spec, starts the controller and ``replicas`` agents per
pool, waits (with progress) until each agent's model is loaded, prints the lines a user pastes
into a shell, and on Ctrl-C or SIGTERM drains the agents, stops the controller and leaves no
process behind. :class:`LocalProcesses` is the part the autoscaler's local applier reuses to
start and stop agents.

Secrets: tenant keys referenced as ``env:VAR`` are taken from the environment, or generated when
unset (so the demo works on a fresh machine) and handed to the children through their
environment; the fleet and admin tokens are generated per run. Configs on disk hold only
SHA-256 digests. The keys are printed once, to the terminal that asked for them, and never
logged. Children get ``PR_SET_PDEATHSIG`` so that even a ``kill -9`` of this process does not
leave them running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from runtime.spec import FleetSpec

__all__ = [
    "FleetUpError",
    "LocalApplier",
    "LocalFleet",
    "LocalProcesses",
    "ManagedProcess",
    "fetch_plan",
    "free_port",
    "tenant_keys_for_children",
]

FLEET_TOKEN_ENV = "FLEETFORM_FLEET_TOKEN"
ADMIN_TOKEN_ENV = "FLEETFORM_ADMIN_TOKEN"
READY_TIMEOUT_S = 180.0
_PR_SET_PDEATHSIG = 1


class FleetUpError(RuntimeError):
    """The fleet could not be started; ``str()`` says why in a line or two."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tenant_keys_for_children(
    spec: FleetSpec, environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Environment entries for the tenants' ``env:`` key references, generating missing keys.

    Returns ``(env, first_key_by_tenant)``: ``env`` maps variable names to keys for the child
    processes; ``first_key_by_tenant`` is each tenant's first usable key (for the printout).
    ``file:`` and ``sha256:`` references are left to the node config builder.
    """
    env: dict[str, str] = {}
    first: dict[str, str] = {}
    for tenant in spec.tenants:
        for reference in tenant.api_keys:
            scheme, _, name = reference.partition(":")
            if scheme == "env":
                key = environ.get(name) or env.get(name) or f"ff-{secrets.token_urlsafe(24)}"
                env[name] = key
                first.setdefault(tenant.name, key)
            elif scheme == "file":
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    first.setdefault(tenant.name, Path(name).read_text(encoding="utf-8").strip())
    return env, first


@dataclass
class ManagedProcess:
    """One child process with its role, port and log file."""

    name: str
    role: str  # "controller" or "agent"
    pool: str | None
    port: int
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: bool = False
    ready_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalProcesses:
    """Starts, watches and stops the fleet's processes; the local applier's hands.

    ``command`` is the argv prefix that runs the ``fleetform`` CLI (this interpreter by default).
    """

    run_dir: Path
    env: dict[str, str]
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "runtime.cli"])
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(
        self, name: str, role: str, args: list[str], port: int, pool: str | None = None
    ) -> ManagedProcess:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - owned by the child from here on
        try:
            popen = subprocess.Popen(
                [*self.command, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                # Own process group: a terminal's Ctrl-C reaches only `fleetform up`, which then
                # drains each agent once; a group-wide SIGINT followed by our SIGTERM would
                # count as the "second signal" that aborts in-flight requests.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            log.close()
        process = ManagedProcess(name, role, pool, port, popen, log_path)
        with self._lock:
            self.processes[name] = process
        return process

    def agents(self, pool: str | None = None) -> list[ManagedProcess]:
        with self._lock:
            return [
                p
                for p in self.processes.values()
                if p.role == "agent" and (pool is None or p.pool == pool)
            ]

    def stop(self, name: str, timeout_s: float) -> int | None:
        """SIGTERM (agents drain), wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        with self._lock:
            process = self.processes.pop(name, None)
        if process is None:
            return None
        return _terminate([process], timeout_s)[process.name]

    def stop_all(self, timeout_s: float) -> dict[str, int | None]:
        """Agents first (they drain and push their last usage), then the controller."""
        with self._lock:
            everything = list(self.processes.values())
            self.processes.clear()
        codes = _terminate([p for p in everything if p.role != "controller"], timeout_s)
        codes.update(_terminate([p for p in everything if p.role == "controller"], timeout_s))
        return codes


def _terminate(processes: list[ManagedProcess], timeout_s: float) -> dict[str, int | None]:
    for p in processes:
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for p in processes:
        try:
            codes[p.name] = p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            codes[p.name] = p.popen.wait()
    return codes


def _http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class LocalFleet:
    """``fleetform up`` for one spec: plan the processes, start them, stop them."""

    spec: FleetSpec
    stack_path: Path
    run_dir: Path
    controller_port: int | None = None
    agent_port_base: int | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    processes: LocalProcesses | None = None
    tenant_keys: dict[str, str] = field(default_factory=dict)
    admin_token: str = ""
    _controller_url: str = ""
    _child_environ: dict[str, str] = field(default_factory=dict)
    _next_port: int | None = None
    _agent_counts: dict[str, int] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse specs this launcher cannot run, before starting anything."""
        remote = [p.name for p in self.spec.pools if p.cloud != "local"]
        if remote:
            raise FleetUpError(
                f"pools {', '.join(remote)} are not 'cloud: local'; `fleetform up` runs local "
                "pools only (cloud pools are built with `pulumi up`)"
            )
        if not self.spec.tenants:
            raise FleetUpError("the spec has no tenants, so no client could authenticate")

    def start(self, on_event: Callable[[str, ManagedProcess], None] | None = None) -> None:
        """Write configs and start the controller and every agent (does not wait for ready)."""
        self.check()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        child_env, self.tenant_keys = tenant_keys_for_children(self.spec, self.environ)
        fleet_token = secrets.token_urlsafe(32)
        self.admin_token = secrets.token_urlsafe(32)
        child_env[FLEET_TOKEN_ENV] = fleet_token
        child_env[ADMIN_TOKEN_ENV] = self.admin_token
        resolved_environ = {**self.environ, **child_env}
        self.processes = LocalProcesses(self.run_dir, child_env)

        controller_port = self.controller_port or free_port()
        self._controller_url = f"http://127.0.0.1:{controller_port}"
        self._child_environ = resolved_environ
        self._next_port = self.agent_port_base
        configs: list[tuple[str, str, int, Path]] = []
        for pool in self.spec.pools:
            for _ in range(pool.replicas):
                configs.append(self._agent_config(pool.name))

        controller = self.processes.start(
            "controller",
            "controller",
            [
                "controller",
                "--stack",
                str(self.stack_path),
                "--port",
                str(controller_port),
                "--db",
                str(self.run_dir / "ledger.sqlite3"),
            ],
            controller_port,
        )
        if on_event:
            on_event("started", controller)
        for name, pool_name, port, path in configs:
            agent = self.processes.start(
                name, "agent", ["agent", "--config", str(path)], port, pool_name
            )
            if on_event:
                on_event("started", agent)

    def _agent_config(self, pool_name: str) -> tuple[str, str, int, Path]:
        """Name, port and a node config file for the next agent of ``pool_name``."""
        from runtime.agent.config import NodeConfigError, node_config_from_spec

        index = self._agent_counts.get(pool_name, 0)
        self._agent_counts[pool_name] = index + 1
        name = f"{pool_name}-{index}"
        if self._next_port is not None:
            port = self._next_port
            self._next_port += 1
        else:
            port = free_port()
        try:
            config = node_config_from_spec(
                self.spec,
                pool_name,
                name,
                port,
                environ=self._child_environ,
                controller_url=self._controller_url,
                fleet_token_env=FLEET_TOKEN_ENV,
            )
        except NodeConfigError as error:
            raise FleetUpError(str(error)) from None
        path = self.run_dir / "nodes" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return name, pool_name, port, path

    def start_agent(self, pool_name: str) -> ManagedProcess:
        """One more agent for ``pool_name`` (the local applier's scale-up)."""
        assert self.processes is not None, "start() first"
        name, pool, port, path = self._agent_config(pool_name)
        return self.processes.start(name, "agent", ["agent", "--config", str(path)], port, pool)

    def wait_ready(
        self,
        timeout_s: float = READY_TIMEOUT_S,
        on_event: Callable[[str, ManagedProcess], None] | None = None,
    ) -> None:
        """Poll until the controller answers /healthz and every agent /readyz."""
        assert self.processes is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        pending = list(self.processes.processes.values())
        while pending:
            for process in list(pending):
                if not process.alive():
                    raise FleetUpError(
                        f"{process.name} exited with code {process.popen.returncode} while "
                        f"starting; its log ({process.log_path}) ends with:\n"
                        f"{process.log_tail()}"
                    )
                path = "/healthz" if process.role == "controller" else "/readyz"
                if _http_ok(process.url + path):
                    process.ready = True
                    process.ready_at = time.monotonic()
                    pending.remove(process)
                    if on_event:
                        on_event("ready", process)
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise FleetUpError(f"not ready after {timeout_s:.0f}s: {names}")
            if pending:
                time.sleep(0.25)

    def stop(self, timeout_s: float = 60.0) -> dict[str, int | None]:
        return self.processes.stop_all(timeout_s) if self.processes else {}

    def shell_lines(self) -> list[str]:
        """What the user pastes: base URL of the cheapest pool's first agent and a tenant key."""
        assert self.processes is not None
        agents = self.processes.agents()
        if not agents:
            return []
        tenant = next(
            (t.name for t in self.spec.tenants if t.name in self.tenant_keys),
            None,
        )
        lines = [f"export OPENAI_BASE_URL={agents[0].url}/v1"]
        if tenant is not None:
            lines.append(f"export OPENAI_API_KEY={self.tenant_keys[tenant]}   # tenant {tenant}")
        controller = self.processes.processes.get("controller")
        if controller is not None:
            lines.append(f"export FLEETFORM_CONTROLLER={controller.url}")
            lines.append(f"export {ADMIN_TOKEN_ENV}={self.admin_token}")
        return lines

    def summary(self) -> dict[str, object]:
        """Machine-readable description of the running fleet (``--json``)."""
        assert self.processes is not None
        return {
            "controller": self.processes.processes["controller"].url,
            "agents": [
                {"name": p.name, "pool": p.pool, "url": p.url, "log": str(p.log_path)}
                for p in self.processes.agents()
            ],
            "tenant_keys": dict(self.tenant_keys),
            "admin_token": self.admin_token,
            "run_dir": str(self.run_dir),
        }


def fetch_plan(controller_url: str, admin_token: str, timeout_s: float = 5.0) -> dict | None:
    """``GET /v1/autoscale`` of the controller; None when it cannot be reached."""
    request = urllib.request.Request(
        controller_url + "/v1/autoscale", headers={"Authorization": f"Bearer {admin_token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass
class LocalApplier:
    """Carries out the controller's plans on this machine.

    Each new plan (``GET /v1/autoscale``) gives the replicas every pool should have. A pool
    with fewer live agents gets new agent processes (they load the model, push to the
    controller and join routing when ready); a pool with more has its newest agents drained:
    SIGTERM makes an agent refuse new work, report itself unhealthy so peers stop routing to
    it, finish what it has and exit. Drains run in threads, so a slow drain never holds up
    the next plan. The oldest agents are kept, since the address ``fleetform up`` printed is
    the first agent's.
    """

    fleet: LocalFleet
    fetch: Callable[[], Mapping[str, Any] | None]
    drain_timeout_s: float = 60.0
    on_event: Callable[[str], None] | None = None
    last_plan_id: int = 0
    drains: list[threading.Thread] = field(default_factory=list)

    def poll_once(self) -> list[str]:
        """Fetch the plan; if it is new, reconcile the processes with it. Returns events."""
        data = self.fetch()
        if not data or not data.get("enabled") or data.get("plan") is None:
            return []
        if data["plan_id"] == self.last_plan_id:
            return []
        self.last_plan_id = data["plan_id"]
        return self.reconcile(data["requested"])

    def reconcile(self, desired: Mapping[str, int]) -> list[str]:
        assert self.fleet.processes is not None, "the fleet is not started"
        events: list[str] = []
        for pool in self.fleet.spec.pools:
            want = desired.get(pool.name)
            if want is None or pool.cloud != "local":
                continue
            live = [a for a in self.fleet.processes.agents(pool.name) if a.alive()]
            for _ in range(want - len(live)):
                agent = self.fleet.start_agent(pool.name)
                events.append(f"{pool.name}: started {agent.name} ({len(live)} -> {want})")
            for agent in live[want:][::-1] if len(live) > want else []:
                thread = threading.Thread(
                    target=self.fleet.processes.stop,
                    args=(agent.name, self.drain_timeout_s),
                    name=f"drain-{agent.name}",
                    daemon=True,
                )
                thread.start()
                self.drains.append(thread)
                events.append(f"{pool.name}: draining {agent.name} ({len(live)} -> {want})")
        for event in events:
            if self.on_event:
                self.on_event(event)
        self.drains = [t for t in self.drains if t.is_alive()]
        return events

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Poll until ``stop`` is set (meant for a daemon thread of ``fleetform up``)."""
        while not stop.wait(interval_s):
            try:
                self.poll_once()
            except FleetUpError as error:
                if self.on_event:
                    self.on_event(f"scaling failed: {error}")

    def wait_for_drains(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.drains:
            thread.join(max(0.0, deadline - time.monotonic()))


def wait_for_signal(
    fleet: LocalFleet,
    on_exit: Callable[[ManagedProcess], None] | None = None,
    on_repeat: Callable[[int], None] | None = None,
) -> int:
    """Block until SIGINT/SIGTERM; report children that die meanwhile. Returns the signal.

    Later SIGINT/SIGTERM are not fatal: the caller is stopping the fleet by then (each agent
    drains within its own deadline, then is killed), and a second Ctrl-C, or a supervisor
    that signals the whole process group, must not cut that short and leave the ledger without
    the agents' last pushes. ``on_repeat`` is told about them until the process exits.
    """
    received: list[int] = []
    event = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if received:
            if on_repeat:
                on_repeat(signum)
            return
        received.append(signum)
        event.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    reported: set[str] = set()
    while not event.wait(1.0):
        assert fleet.processes is not None
        for process in list(fleet.processes.processes.values()):
            if not process.alive() and process.name not in reported:
                reported.add(process.name)
                if on_exit:
                    on_exit(process)
    return received[0]
