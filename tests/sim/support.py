"""A small fleet and synthetic traces for the simulator's tests (fast: seconds, not minutes)."""

from __future__ import annotations

import copy
from typing import Any

from runtime.sim.trace import MixedRequest, TraceRequest, assign_mix, unit_hash
from runtime.spec import FleetSpec

UPSTREAM = {"url": "http://127.0.0.1:8000/v1", "model": "llama-8b"}

# One 8B model on A10G instances (g5.xlarge: $1.006/h on-demand, $0.436/h spot in us-east-1):
# an on-demand pool and a spot pool that falls back to it.
FLEET: dict[str, Any] = {
    "name": "sim-test",
    "models": [
        {
            "name": "llama-8b",
            "parameters_b": 8.03,
            "layers": 32,
            "hidden_size": 4096,
            "kv_heads": 8,
            "head_dim": 128,
            "context_length": 8192,
            "variants": [
                {"name": "bf16", "precision": "bf16", "quality": "reference", "runs_on": ["gpu"]}
            ],
        }
    ],
    "slo_classes": [
        {"name": "critical", "priority": 0, "ttft_ms": 2000, "tpot_ms": 100},
        {
            "name": "standard",
            "priority": 1,
            "ttft_ms": 4000,
            "tpot_ms": 150,
            "spot_eligible": True,
        },
        {
            "name": "batch",
            "priority": 2,
            "ttft_ms": 60000,
            "tpot_ms": 500,
            "sheddable": True,
            "spot_eligible": True,
        },
    ],
    "pools": [
        {
            "name": "gpu",
            "cloud": "aws",
            "region": "us-east-1",
            "instance_type": "g5.xlarge",
            "min_replicas": 1,
            "max_replicas": 3,
            "serves": {"model": "llama-8b", "variant": "bf16"},
            "engine": "openai-upstream",
            "upstream": UPSTREAM,
            "cold_start_s": 60,
        },
        {
            "name": "gpu-spot",
            "cloud": "aws",
            "region": "us-east-1",
            "instance_type": "g5.xlarge",
            "spot": True,
            "fallback_pool": "gpu",
            "min_replicas": 0,
            "max_replicas": 3,
            "desired_replicas": 1,
            "serves": {"model": "llama-8b", "variant": "bf16"},
            "engine": "openai-upstream",
            "upstream": UPSTREAM,
            "cold_start_s": 60,
        },
    ],
    "tenants": [
        {
            "name": "acme",
            "api_keys": ["env:ACME_KEY"],
            "default_priority": "standard",
            "max_priority": "critical",
        },
        {
            "name": "jobs",
            "api_keys": ["env:JOBS_KEY"],
            "default_priority": "batch",
            "allowed_pools": ["gpu-spot"],
        },
    ],
    "autoscaling": {
        "period_s": 15,
        "scale_up_cooldown_s": 15,
        "scale_down_cooldown_s": 60,
        "forecast": {"method": "none"},
    },
}

ON_DEMAND_USD = 1.006
SPOT_USD = 0.436


def fleet_data(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(FLEET)
    data.update(changes)
    return data


def pool_data(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in data["pools"] if p["name"] == name)


def synthetic(
    n: int, *, rate: float, prompt: int = 400, output: int = 60, seed: int = 7
) -> list[TraceRequest]:
    """``n`` requests arriving at ``rate``/s with lengths spread around the given means."""
    out = []
    t = 0.0
    for i in range(n):
        t += 1.0 / rate * (0.5 + unit_hash(seed, i, 11))
        p = max(1, int(prompt * (0.25 + 1.5 * unit_hash(seed, i, 12))))
        o = max(1, int(output * (0.25 + 1.5 * unit_hash(seed, i, 13))))
        out.append(TraceRequest(index=i, arrival_s=t, prompt_tokens=p, output_tokens=o))
    return out


def mixed(spec: FleetSpec, trace: list[TraceRequest], **kw: Any) -> list[MixedRequest]:
    return assign_mix(trace, spec, **kw)
