"""The deliberately broken copies of prod the pack must refuse, and what it must say: shared by
the unit tests (the policy alone) and the pack tests (the mocked fleet, every policy)."""

from __future__ import annotations

from typing import Any

from .support import pool_entry, tenant_entry


def over_budget(config: dict[str, Any]) -> None:
    """20 more A100 nodes at max (3.673 USD/h each, on-demand): +53,625.80 USD/month."""
    pool_entry(config, "azure-eus-a100")["max_replicas"] = 24


OVER_BUDGET_MESSAGE = (
    "Fleet acme-prod: at max_replicas the pools cost 97899.63 USD/month, over the budget of "
    "95000 USD/month by 2899.63 USD. By pool: aws-use1-a10g 7343.80 USD (10 replicas), "
    "aws-use1-a10g-spot 3819.36 USD (12 replicas), aws-use1-cpu 2266.21 USD (6 replicas), "
    "aws-usw2-inf2 4427.89 USD (8 replicas), azure-eus-a100 64350.96 USD (24 replicas), "
    "gcp-usc1-l4 4985.14 USD (8 replicas), gcp-usc1-l4-spot 4177.47 USD (16 replicas), "
    "gcp-usc1-tpu-v5e 3003.77 USD (4 replicas), k8s-eks-l4 3525.02 USD (6 replicas). "
    "Largest: azure-eus-a100, 24 x Standard_NC24ads_A100_v4 at 88.1520 USD/h = "
    "64350.96 USD/month."
)


def over_quota(config: dict[str, Any]) -> None:
    """search reserves 4570.0 accelerator-hours/month at prod's replicas: allow it 4000."""
    tenant_entry(config, "search")["quotas"]["accelerator_hours_per_month"] = 4000


OVER_QUOTA_MESSAGE = (
    "Tenant search: the fleet reserves 4570.0 accelerator-hours/month for it, over its quota of "
    "4000 accelerator-hours/month. Its share by pool: aws-use1-a10g 1.33 accelerators, "
    "aws-use1-a10g-spot 0.53 accelerators, aws-usw2-inf2 0.89 accelerators, azure-eus-a100 "
    "0.57 accelerators, gcp-usc1-l4 0.44 accelerators, gcp-usc1-l4-spot 0.53 accelerators, "
    "gcp-usc1-tpu-v5e 1.07 accelerators, k8s-eks-l4 0.89 accelerators."
)
