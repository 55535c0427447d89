"""The Fleetform policy pack: `pulumi preview --policy-pack policy` (and `pulumi up`).

This module only packs the policies of `policy/policies.py`. `PolicyPack(...)` starts the gRPC
server the engine talks to and never returns, so tests import `policy.policies`, never this file.
The pack's default enforcement is mandatory; each policy states its own level (see policies.py).
"""

import sys
from pathlib import Path

# The engine runs the pack with policy/ as its working directory; the project's packages
# (runtime, components, policy) live one level up and need not be installed.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pulumi_policy import EnforcementLevel, PolicyPack  # noqa: E402

from policy.policies import PACK_NAME, build_policies  # noqa: E402

PolicyPack(
    name=PACK_NAME,
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=build_policies(),
)
