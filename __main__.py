"""The Pulumi program: builds the fleet declared in the stack's `fleetform:fleet` config.

Until the cloud components land (see the components issue), the program validates the spec
against the catalog and exports the fleet's estimated cost, so `pulumi preview` already fails
fast on a bad spec and shows what the fleet would cost.
"""

import pulumi

from runtime.catalog import default_catalog
from runtime.plan import fleet_cost
from runtime.spec import FLEET_CONFIG_KEY, REPLICAS_CONFIG_KEY, fleet_from_stack_config

config = pulumi.Config("fleetform")
stack_config = {FLEET_CONFIG_KEY: config.require_object("fleet")}
replicas = config.get_object("replicas")
if replicas:
    stack_config[REPLICAS_CONFIG_KEY] = replicas

catalog = default_catalog()
spec = fleet_from_stack_config(stack_config, source=f"stack {pulumi.get_stack()}", catalog=catalog)
cost = fleet_cost(spec, catalog)

pulumi.export("fleetName", spec.name)
pulumi.export("estimatedUsdPerHour", round(cost.total_usd_per_hour, 4))
pulumi.export("estimatedUsdPerMonth", round(cost.total_usd_per_month, 2))
pulumi.export("maxUsdPerMonth", round(cost.max_usd_per_month, 2))
pulumi.export(
    "pools",
    {p.pool: {"usdPerHour": round(p.usd_per_hour, 4), "replicas": p.replicas} for p in cost.pools},
)
