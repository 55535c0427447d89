"""The runtime agent: the HTTP service every Fleetform node runs.

Modules:

* :mod:`~runtime.agent.app` - the aiohttp application (``init(config) -> web.Application``).
* :mod:`~runtime.agent.config` - :class:`NodeConfig` and :func:`node_config_from_spec`.
* :mod:`~runtime.agent.schemas`, :mod:`~runtime.agent.openapi` - API shapes, OpenAPI document.
* :mod:`~runtime.agent.admission` - priority classes and overload shedding (pure).
* :mod:`~runtime.agent.backend` - the serving-backend seam and the embedded-engine backend.
* :mod:`~runtime.agent.upstream` - the backend in front of an OpenAI-compatible server.
* :mod:`~runtime.agent.push` - metrics pushes to the controller (usage delivered exactly once).
* :mod:`~runtime.agent.fleet` - what the agent knows of the fleet: leases, budgets, the view it
  routes over (pure).
* :mod:`~runtime.agent.forward` - forwarding a request to a peer agent.
* :mod:`~runtime.agent.auth`, :mod:`~runtime.agent.errors`, :mod:`~runtime.agent.metrics`.
* :mod:`~runtime.agent.main` - ``fleetform agent``.

Tenant quotas live in :mod:`runtime.quota` (a policy shared with the simulator).
Importing this package is cheap; submodules pull in aiohttp and the engine when imported.
"""
