"""The controller: fleet view, usage ledger, quota leases and monthly budgets over HTTP.

Agents push metrics and usage (``POST /v1/push``, :mod:`runtime.protocol`); the controller
records usage in a SQLite ledger (:mod:`runtime.controller.ledger`), keeps the fleet view and
splits tenant quotas into leases (:mod:`runtime.controller.fleet`), and answers each push with
the view, the agent's leases and the tenants whose monthly budget is spent
(:mod:`runtime.controller.app`). ``fleetform controller`` runs it (:mod:`runtime.controller.main`).
"""
