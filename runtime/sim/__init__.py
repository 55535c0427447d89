"""The fleet simulator and the cost/SLO benchmark (`fleetform simulate`).

Modules:

* :mod:`~runtime.sim.trace` - reading traces (Azure CSV, JSON lines), time scale and load
  multiplier, the tenant and class mix rule.
* :mod:`~runtime.sim.speed` - instance speed and KV capacity from the cost model's roofline.
* :mod:`~runtime.sim.simulator` - the discrete-event simulator driving the live scheduler,
  router, quota book, admission checks and autoscaler with a virtual clock.
* :mod:`~runtime.sim.demand` - per-minute demand and what a pool serves of it within SLO (the
  sizing the baselines and the bound share).
* :mod:`~runtime.sim.baselines` - the comparison fleets: homogeneous, round-robin.
* :mod:`~runtime.sim.bound` - the lower bound on cost (a per-minute integer program).
* :mod:`~runtime.sim.report` - figures, JSON, tables and plots of a run.
* :mod:`~runtime.sim.command` - the ``fleetform simulate`` sub-command.

The simulator never decides anything itself: see :mod:`runtime.sim.simulator`. ``fleets/``
holds the benchmark's what-if fleet; ``README.md`` the method and the measured benchmark.
"""
