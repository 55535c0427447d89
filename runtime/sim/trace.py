"""Traces for the simulator: reading request arrivals, scaling them, and who sends what.

This module owns the simulator's input side, with no policy in it:

* Reading the two trace formats: the Azure LLM inference CSV (``TIMESTAMP,ContextTokens,
  GeneratedTokens``, see ``../shared/data/README.md``) and JSON lines with ``timestamp``
  (milliseconds from the start), ``input_length`` and ``output_length``.
* Reshaping a trace: ``time_scale`` stretches (> 1) or compresses (< 1) time; ``load`` multiplies
  the number of requests (``1.5``: every request once, and a seeded half of them once more, the
  copy placed at a seeded point of the gap to the next arrival; ``0.5``: a seeded half kept).
* The mix: which tenant sends each request and in which SLO class, by a stated deterministic
  rule (:func:`assign_mix`): each request's class is drawn from the class shares by a hash of
  ``(seed, request index)``, and its tenant uniformly (by another hash) among the tenants that
  would send that class: those allowed the model whose default class it is, else those whose
  ``max_priority`` allows it. The class then goes through the agent's own
  :func:`runtime.agent.admission.resolve_priority`, exactly as an ``X-Priority`` header would.

Hashing rather than a shared random stream makes one request's draw independent of every other
request, so a trace cut short or scaled keeps the same tenant and class for each request.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from runtime.agent.admission import resolve_priority
from runtime.spec import FleetSpec

__all__ = [
    "DEFAULT_CLASS_MIX",
    "MixedRequest",
    "TraceError",
    "TraceRequest",
    "assign_mix",
    "load_trace",
    "parse_class_mix",
    "reshape",
    "unit_hash",
]

# 10% critical, 70% standard, 20% batch: interactive traffic with a tail of offline work.
DEFAULT_CLASS_MIX: dict[str, float] = {"critical": 0.1, "standard": 0.7, "batch": 0.2}


class TraceError(ValueError):
    """A trace file or option that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: arrival (seconds from the trace's start) and token counts."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class MixedRequest:
    """A trace request with the tenant that sends it, its model and its (resolved) SLO class."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    tenant: str
    model: str
    slo_class: str


# --------------------------------------------------------------------------------------------
# Reading


def load_trace(path: str | Path, *, limit: int | None = None) -> list[TraceRequest]:
    """Read a trace (Azure CSV by a ``.csv`` suffix, else JSON lines), sorted by arrival.

    Arrivals are shifted so that the first request arrives at 0.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    if path.suffix.lower() == ".csv":
        rows = list(_read_azure_csv(path))
    else:
        rows = list(_read_json_lines(path))
    if not rows:
        raise TraceError(f"{path}: the trace has no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    out = [
        TraceRequest(index=i, arrival_s=t - start, prompt_tokens=p, output_tokens=o)
        for i, (t, p, o) in enumerate(rows)
    ]
    return out[:limit] if limit is not None else out


def _read_azure_csv(path: Path) -> Iterable[tuple[float, int, int]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        expected = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if header is None or [h.strip() for h in header[:3]] != expected:
            raise TraceError(f"{path}: expected the header {','.join(expected)}, got {header}")
        day_cache: dict[str, float] = {}
        for line_no, row in enumerate(reader, start=2):
            try:
                stamp, prompt, output = row[0], int(row[1]), int(row[2])
                yield _azure_seconds(stamp, day_cache), prompt, output
            except (ValueError, IndexError) as error:
                raise TraceError(f"{path}:{line_no}: {error}") from None


def _azure_seconds(stamp: str, day_cache: dict[str, float]) -> float:
    """Seconds since the epoch of ``2023-11-16 18:15:46.6805900`` (7 fractional digits, which
    ``datetime.fromisoformat`` does not take)."""
    day, _, clock = stamp.strip().partition(" ")
    base = day_cache.get(day)
    if base is None:
        base = datetime.fromisoformat(day).timestamp()
        day_cache[day] = base
    hours, minutes, seconds = clock.split(":")
    return base + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _read_json_lines(path: Path) -> Iterable[tuple[float, int, int]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                yield (
                    float(item["timestamp"]) / 1000.0,
                    int(item["input_length"]),
                    int(item["output_length"]),
                )
            except (ValueError, KeyError, TypeError) as error:
                raise TraceError(
                    f"{path}:{line_no}: expected an object with timestamp (ms), input_length "
                    f"and output_length ({type(error).__name__}: {error})"
                ) from None


# --------------------------------------------------------------------------------------------
# Reshaping


def unit_hash(seed: int, index: int, salt: int = 0) -> float:
    """A deterministic draw in [0, 1) for (seed, index, salt): splitmix64 of the three."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) & (
        2**64 - 1
    )
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return (x >> 11) / float(2**53)


_SALT_LOAD, _SALT_PLACE, _SALT_CLASS, _SALT_TENANT = 1, 2, 3, 4


def reshape(
    requests: Sequence[TraceRequest],
    *,
    time_scale: float = 1.0,
    load: float = 1.0,
    seed: int = 0,
    duration_s: float | None = None,
) -> list[TraceRequest]:
    """Scale time by ``time_scale``, multiply the request count by ``load``, keep the first
    ``duration_s`` seconds (after scaling). Indices are renumbered in arrival order."""
    if not time_scale > 0:
        raise TraceError(f"time scale must be positive (got {time_scale})")
    if not load > 0:
        raise TraceError(f"load multiplier must be positive (got {load})")
    whole, fraction = math.floor(load), load - math.floor(load)
    out: list[tuple[float, int, int, int]] = []  # (arrival, original index, prompt, output)
    for i, request in enumerate(requests):
        arrival = request.arrival_s * time_scale
        gap = (requests[i + 1].arrival_s * time_scale - arrival) if i + 1 < len(requests) else 0.0
        copies = whole + (1 if unit_hash(seed, request.index, _SALT_LOAD) < fraction else 0)
        for copy in range(copies):
            # The first copy keeps the original time; later ones land inside the gap to the next
            # arrival, so multiplying load does not turn every arrival into a burst.
            offset = 0.0 if copy == 0 else gap * unit_hash(seed, request.index, _SALT_PLACE + copy)
            out.append(
                (arrival + offset, request.index, request.prompt_tokens, request.output_tokens)
            )
    out.sort(key=lambda r: (r[0], r[1]))
    if duration_s is not None:
        out = [r for r in out if r[0] < duration_s]
    return [
        TraceRequest(index=i, arrival_s=t, prompt_tokens=p, output_tokens=o)
        for i, (t, _, p, o) in enumerate(out)
    ]


# --------------------------------------------------------------------------------------------
# Tenant and class mix


def parse_class_mix(text: str) -> dict[str, float]:
    """``critical=0.1,standard=0.7,batch=0.2`` -> shares (normalised to sum to 1)."""
    shares: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise TraceError(f"class mix: expected NAME=SHARE, got {part!r}")
        try:
            share = float(value)
        except ValueError:
            raise TraceError(f"class mix: {value!r} is not a number") from None
        if share < 0:
            raise TraceError(f"class mix: share of {name.strip()!r} is negative")
        shares[name.strip()] = share
    total = sum(shares.values())
    if total <= 0:
        raise TraceError("class mix: the shares sum to zero")
    return {name: share / total for name, share in shares.items()}


def default_model(spec: FleetSpec) -> str:
    """The model most pools serve (ties: the first declared): what a trace without a model
    column is sent to."""
    counts = {m.name: 0 for m in spec.models}
    for pool in spec.pools:
        counts[pool.serves.model] += 1
    return max(counts, key=lambda name: counts[name])


def senders(spec: FleetSpec, model: str, slo_class: str) -> list[str]:
    """Tenants that would send ``slo_class`` requests for ``model`` (see the module docstring)."""
    classes = {c.name: c for c in spec.slo_classes}
    wanted = classes[slo_class]
    allowed = [t for t in spec.tenants if t.allowed_models is None or model in t.allowed_models]
    by_default = [t.name for t in allowed if t.default_priority == slo_class]
    if by_default:
        return by_default
    return [
        t.name
        for t in allowed
        if wanted.priority >= classes[t.max_priority or t.default_priority].priority
    ]


def assign_mix(
    requests: Sequence[TraceRequest],
    spec: FleetSpec,
    *,
    class_mix: Mapping[str, float] | None = None,
    model: str | None = None,
    seed: int = 0,
) -> list[MixedRequest]:
    """Give every request a tenant, a model and an SLO class by the rule of the module docstring."""
    classes = {c.name: c for c in spec.slo_classes}
    shares = dict(class_mix if class_mix is not None else DEFAULT_CLASS_MIX)
    unknown = sorted(set(shares) - set(classes))
    if unknown:
        raise TraceError(
            f"class mix: no SLO class {', '.join(map(repr, unknown))} in the fleet "
            f"(classes: {', '.join(classes)})"
        )
    model = model or default_model(spec)
    if model not in {m.name for m in spec.models}:
        raise TraceError(f"model {model!r} is not in the fleet")
    tenants = {t.name: t for t in spec.tenants}
    cumulative: list[tuple[float, str, list[str]]] = []
    running = 0.0
    for name, share in shares.items():
        if share <= 0:
            continue
        who = senders(spec, model, name)
        if not who:
            raise TraceError(
                f"class mix: no tenant allowed model {model!r} may send class {name!r}"
            )
        running += share
        cumulative.append((running, name, who))
    out: list[MixedRequest] = []
    for request in requests:
        draw = unit_hash(seed, request.index, _SALT_CLASS) * running
        _, asked, who = next((c for c in cumulative if draw < c[0]), cumulative[-1])
        tenant = tenants[who[int(unit_hash(seed, request.index, _SALT_TENANT) * len(who))]]
        resolved = resolve_priority(asked, tenant.default_priority, tenant.max_priority, classes)
        out.append(
            MixedRequest(
                index=request.index,
                arrival_s=request.arrival_s,
                prompt_tokens=request.prompt_tokens,
                output_tokens=request.output_tokens,
                tenant=tenant.name,
                model=model,
                slo_class=resolved.slo_class.name,
            )
        )
    return out
