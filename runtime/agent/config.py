"""The node config: everything one agent needs, and how it is derived from the fleet spec.

This module owns :class:`NodeConfig` (pydantic v2, loaded from a JSON file by
``fleetform agent --config node.json``) and :func:`node_config_from_spec`, which cuts one node's
share out of a :class:`runtime.spec.FleetSpec`: its pool's model and price, the tenants with their
key references resolved to SHA-256 digests, the SLO classes, and (:class:`RoutingSettings`) the
spec's routing policy with the pools and variant qualities the agent's router needs.

A node serves one model by default: ``model``/``variant``/``engine`` (its *primary* model, the
one it reports to the fleet). It may hold more: ``models`` lists further :class:`ModelSlot`
entries (other models, or other versions of one under their own names), loaded on demand or at
startup, and ``memory_budget_bytes`` caps what the loaded ones may take together
(:mod:`runtime.agent.models` does the loading, eviction and unloading).

The ``engine`` section is either :class:`EngineSettings` (``kind: embedded``, the default: the
numpy engine in this process) or :class:`UpstreamEngineSettings` (``kind: openai-upstream``: an
OpenAI-compatible server such as vLLM, TGI, SGLang or llama.cpp that the agent fronts).

A node config never holds an API key, only ``sha256`` hex digests of keys. The fleet (admin)
token, needed in clear to authenticate to the controller and to check ``POST /admin/drain``, is
read at startup from the environment variable named by ``fleet_token_env``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from runtime.spec import (
    FleetSpec,
    ModelSpec,
    Name,
    QualityName,
    QuotaSpec,
    RoutingStrategy,
    SloClassSpec,
    VariantSpec,
)

__all__ = [
    "EngineSettings",
    "ModelSlot",
    "NodeConfig",
    "NodeConfigError",
    "RoutingSettings",
    "TenantConfig",
    "UpstreamEngineSettings",
    "hash_api_key",
    "load_node_config",
    "node_config_from_spec",
    "resolve_key_reference",
]

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 hex digest")]
BUILTIN_SOURCE_PREFIX = "builtin:"


class NodeConfigError(ValueError):
    """A node config that cannot be loaded or derived; ``str()`` is one line saying why."""


def hash_api_key(key: str) -> str:
    """The digest a node config stores for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSettings(_Strict):
    """How the embedded engine is sized (``kind: embedded``, the default)."""

    kind: Literal["embedded"] = "embedded"
    model_path: str | None = Field(
        default=None, description="GGUF file; default: the bundled SmolLM2-135M model."
    )
    kv_cache_tokens: int = Field(default=16384, ge=16, description="Tokens the KV pool holds.")
    kv_dtype: Literal["float32", "int8"] = Field(
        default="float32",
        description="KV pool storage: float32 is exact; int8 (a float32 scale per head vector) "
        "holds 3.8x the tokens in the same memory, at a small cost in accuracy.",
    )
    max_num_seqs: int = Field(default=32, ge=1, le=4096)
    max_num_batched_tokens: int = Field(default=256, ge=1)
    tpot_budget: bool = Field(
        default=True,
        description="Cut the prefill scheduled beside running decodes so that each stream keeps "
        "its class's tpot_ms (step time from this engine's measured speed); false: the token "
        "budget alone decides.",
    )
    max_model_len: int | None = Field(
        default=None, ge=2, description="Longest prompt + output; default from the model."
    )
    seed: int | None = Field(default=None, ge=0, description="Seed of unseeded sampling.")
    inject_delay_ms: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="Fault injection for canary testing: the engine sleeps this long after "
        "every step, i.e. per generated token of each sequence in the batch (and per prompt "
        "chunk), so this model (variant) is measurably slower in TTFT and TPOT. 0: off. Never "
        "set it on a production node.",
    )


class UpstreamEngineSettings(_Strict):
    """An OpenAI-compatible server the agent fronts (``kind: openai-upstream``).

    The agent keeps its own priority queue and quotas and holds at most ``max_in_flight``
    requests at the upstream (see :mod:`runtime.agent.upstream`).
    """

    kind: Literal["openai-upstream"]
    url: str = Field(
        description="Base URL of the upstream's OpenAI API, e.g. http://127.0.0.1:8000/v1 "
        "(the agent calls <url>/completions, <url>/chat/completions and <url>/models).",
    )
    model: str = Field(min_length=1, description="Model id the upstream serves.")
    max_in_flight: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Requests outstanding at the upstream at once; the rest wait in the agent's "
        "priority queue.",
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the upstream's own API key (sent as a bearer "
        "token); unset: no Authorization header.",
    )
    model_path: str | None = Field(
        default=None,
        description="GGUF file of the upstream's model: its tokenizer counts prompt tokens "
        "exactly and its chat template renders chat prompts. Unset: token counts are estimated "
        "from the text's length and chat requests go to the upstream's chat endpoint.",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        description="Longest prompt + output; default: what the upstream's /v1/models reports, "
        "else the GGUF's context length, else 4096.",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="To open a connection.")
    read_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest silence while waiting for the next chunk."
    )
    health_interval_s: float = Field(
        default=2.0, gt=0, description="Between readiness probes (GET <url>/models)."
    )

    @field_validator("url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        parts = urlsplit(url)
        problem = None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "must be an http:// or https:// URL with a host"
        elif parts.query or parts.fragment:
            problem = "must not have a query or fragment"
        elif parts.username or parts.password:
            problem = "must not hold credentials (use api_key_env)"
        if problem is not None:
            raise ValueError(f"{problem}, e.g. http://127.0.0.1:8000/v1 (got {url!r})")
        return url.rstrip("/")


def _engine_kind(value: Any) -> str | None:
    # Configs written before the upstream engine existed have no "kind": they are embedded.
    if isinstance(value, Mapping):
        kind = value.get("kind", "embedded")
        return kind if isinstance(kind, str) else None
    return getattr(value, "kind", None)


_ENGINE_KINDS = frozenset({"embedded", "openai-upstream"})

AnyEngineSettings = Annotated[
    Annotated[EngineSettings, Tag("embedded")]
    | Annotated[UpstreamEngineSettings, Tag("openai-upstream")],
    Discriminator(
        _engine_kind,
        custom_error_type="engine_kind",
        custom_error_message="kind must be 'embedded' or 'openai-upstream'",
    ),
]


class AdmissionSettings(_Strict):
    """Overload shedding knobs (see runtime.agent.admission)."""

    max_waiting_requests: int = Field(default=1024, ge=1)
    throughput_ewma_alpha: float = Field(default=0.2, gt=0, le=1)
    prior_prefill_tokens_per_s: float | None = Field(
        default=None, gt=0, description="Assumed prefill speed until the first measurement."
    )
    prior_decode_step_s: float | None = Field(
        default=None, gt=0, description="Assumed decode step time until the first measurement."
    )


class RoutingSettings(_Strict):
    """What the agent's router needs beyond its own node: the spec's routing policy and the
    facts about the fleet it routes among (see :func:`runtime.agent.fleet.routing_policy`).

    Only the pools whose nodes may serve one of this node's models matter (the router never
    sends a request to an instance of another model), so only they and those models' variants
    are listed.
    """

    strategy: RoutingStrategy = Field(
        default="cost-aware",
        description="The spec's routing.strategy: cost-aware, least-loaded or round-robin.",
    )
    slo_headroom: float = Field(default=0.8, gt=0, le=1)
    prefer_spot: bool = True
    hop_limit: int = Field(default=1, ge=0, le=3)
    peer_stale_after_s: float = Field(default=15.0, gt=0)
    pools: list[Name] = Field(
        default_factory=list,
        description="Pools of the fleet whose nodes serve or may load one of this node's models "
        "(this node's own is implied); peers of other pools are never chosen.",
    )
    variant_quality: dict[Name, QualityName] = Field(
        default_factory=dict,
        description="Quality of each variant of this node's model; empty: only this node's "
        "variant is known, as 'standard'.",
    )
    other_models: dict[Name, dict[Name, QualityName]] = Field(
        default_factory=dict,
        description="For each further model this node may hold (``models``): the quality of "
        "each of its variants; a slot's own variant defaults to 'standard'.",
    )
    forward_connect_timeout_s: float = Field(
        default=2.0, gt=0, description="Connecting to a peer; past it the peer counts as failed."
    )
    forward_read_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Longest silence from a peer (a non-streamed answer comes whole, so this "
        "bounds its generation time); past it the peer counts as failed.",
    )


class ModelSlot(_Strict):
    """A model (or a version of one) a node may hold besides its primary model.

    ``name`` is what clients send as ``model`` (so two versions of one model are two slots with
    two names, e.g. ``smollm2-135m`` and ``smollm2-135m-f16``). A slot is loaded when a request
    needs it (or at startup with ``preload``) and unloaded when an admin asks or when the node's
    ``memory_budget_bytes`` needs its memory for another model and it is the least recently used
    idle one.
    """

    name: Name = Field(description="Model name clients send and /v1/models lists.")
    variant: Name
    engine: AnyEngineSettings = Field(default_factory=EngineSettings)
    memory_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Memory the loaded model takes, for the budget until it has been loaded and "
        "measured; unset: estimated from the model file (embedded) or 0 (openai-upstream).",
    )
    preload: bool = Field(
        default=False, description="Load at startup (if it fits the budget) instead of on demand."
    )


class TenantConfig(_Strict):
    """A tenant as one agent enforces it."""

    name: Name
    key_sha256: list[Sha256Hex] = Field(min_length=1)
    default_priority: Name
    max_priority: Name | None = None
    min_quality: QualityName = "low"
    quotas: QuotaSpec = Field(default_factory=QuotaSpec)
    allowed_models: list[Name] | None = None
    allowed_pools: list[Name] | None = None

    def may_use_model(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def may_use_pool(self, pool: str) -> bool:
        return self.allowed_pools is None or pool in self.allowed_pools


class NodeConfig(_Strict):
    """Everything one agent process needs."""

    node_id: str = Field(min_length=1, max_length=200)
    pool: Name
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=0, le=65535)
    model: Name = Field(description="Model name clients send and /v1/models lists.")
    variant: Name
    engine: AnyEngineSettings = Field(default_factory=EngineSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    price_usd_per_hour: float = Field(ge=0, description="What the node costs, for attribution.")
    spot: bool = Field(default=False, description="Runs on spot capacity (routing reads it).")
    tenants: list[TenantConfig] = Field(default_factory=list)
    slo_classes: list[SloClassSpec] = Field(min_length=1)
    controller_url: str | None = Field(default=None, pattern=r"^https?://")
    push_interval_s: float = Field(
        default=2.0, gt=0, description="Seconds between metrics pushes to the controller."
    )
    advertise_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Base URL peers reach this agent at; default http://host:port with the "
        "port actually bound (the host name when host is a wildcard address).",
    )
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    models: list[ModelSlot] = Field(
        default_factory=list,
        description="Further models or versions this node may hold besides ``model`` (which is "
        "always loaded at startup); each is loaded on demand, or at startup with preload.",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Most memory the loaded models may take together (each model's measured "
        "footprint: weights plus KV pool); the least recently used idle model is unloaded to "
        "make room. Unset: no limit.",
    )
    fleet_token_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the fleet token (controller push, admin "
        "routes). Unset: admin routes are disabled; SIGTERM still drains.",
    )
    drain_timeout_s: float = Field(default=30.0, ge=0)
    spot_notices: Literal["aws", "gcp", "azure"] | None = Field(
        default=None,
        description="Cloud whose instance metadata is polled for spot interruption notices; a "
        "notice drains the node before the instance is reclaimed (runtime.agent.spot). Unset: "
        "not polled.",
    )
    metadata_url: str = Field(
        default="http://169.254.169.254",
        pattern=r"^https?://",
        description="Base URL of the instance metadata service (spot_notices).",
    )
    spot_poll_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds between spot notice polls; default 5 on aws, 1 on gcp and azure.",
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    default_max_tokens: int = Field(
        default=512,
        ge=1,
        description="max_tokens of chat requests that give none (completions default to 16 "
        "as in OpenAI's API); always capped by the context left after the prompt.",
    )

    @model_validator(mode="after")
    def _cross_check(self) -> NodeConfig:
        problems: list[str] = []
        classes = {c.name: c for c in self.slo_classes}
        if len(classes) != len(self.slo_classes):
            problems.append("slo_classes: duplicate class names")
        if len({c.priority for c in self.slo_classes}) != len(self.slo_classes):
            problems.append("slo_classes: two classes share a priority")
        seen_tenants: set[str] = set()
        key_owner: dict[str, str] = {}
        for i, tenant in enumerate(self.tenants):
            where = f"tenants[{i}]"
            if tenant.name in seen_tenants:
                problems.append(f"{where}.name: duplicate tenant {tenant.name!r}")
            seen_tenants.add(tenant.name)
            for field_name in ("default_priority", "max_priority"):
                value = getattr(tenant, field_name)
                if value is not None and value not in classes:
                    problems.append(f"{where}.{field_name}: no SLO class {value!r}")
            if tenant.default_priority in classes and tenant.max_priority in classes:
                default = classes[tenant.default_priority]
                ceiling = classes[tenant.max_priority]
                if default.priority < ceiling.priority:
                    problems.append(
                        f"{where}.default_priority: {default.name!r} is more important than "
                        f"max_priority {ceiling.name!r}"
                    )
            for digest in tenant.key_sha256:
                owner = key_owner.setdefault(digest, tenant.name)
                if owner != tenant.name:
                    problems.append(
                        f"{where}.key_sha256: a key of tenant {tenant.name!r} is also a key of "
                        f"tenant {owner!r}"
                    )
        if self.push_interval_s >= self.routing.peer_stale_after_s:
            problems.append(
                f"push_interval_s: {self.push_interval_s:g} is not below "
                f"routing.peer_stale_after_s ({self.routing.peer_stale_after_s:g}); the node "
                "would look stale between its own pushes"
            )
        if self.routing.variant_quality and self.variant not in self.routing.variant_quality:
            problems.append(f"routing.variant_quality: no quality for variant {self.variant!r}")
        engines = [("engine", self.engine)]
        engines += [(f"models[{i}].engine", slot.engine) for i, slot in enumerate(self.models)]
        for where, engine in engines:
            if (
                isinstance(engine, EngineSettings)
                and engine.max_model_len is not None
                and engine.max_model_len > engine.kv_cache_tokens
            ):
                problems.append(f"{where}.max_model_len: exceeds {where}.kv_cache_tokens")
        seen_models = {self.model}
        for i, slot in enumerate(self.models):
            if slot.name in seen_models:
                problems.append(f"models[{i}].name: model {slot.name!r} is listed twice")
            seen_models.add(slot.name)
        budget = self.memory_budget_bytes
        for i, slot in enumerate(self.models):
            if budget is not None and slot.memory_bytes is not None and slot.memory_bytes > budget:
                problems.append(
                    f"models[{i}].memory_bytes: {slot.memory_bytes} exceeds memory_budget_bytes "
                    f"({budget}); the model could never be loaded"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def model_slots(self) -> list[ModelSlot]:
        """Every model the node may hold, the primary first (always preloaded)."""
        primary = ModelSlot(name=self.model, variant=self.variant, engine=self.engine, preload=True)
        return [primary, *self.models]

    def slo_class(self, name: str) -> SloClassSpec:
        for slo in self.slo_classes:
            if slo.name == name:
                return slo
        raise KeyError(name)

    def fleet_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The fleet token from the environment, or ``None`` when not configured or empty."""
        if self.fleet_token_env is None:
            return None
        value = (environ if environ is not None else os.environ).get(self.fleet_token_env, "")
        return value or None


def _one_line(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        # Drop the union tag pydantic puts in the path ("engine.openai-upstream.url").
        loc = [p for p in item["loc"] if p not in _ENGINE_KINDS]
        path = ".".join(str(p) for p in loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {message}" if loc else message)
    extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{source}: {problems[0]}{extra}"


def parse_node_config(data: Any, source: str = "node config") -> NodeConfig:
    """Validate plain data as a :class:`NodeConfig`; raise :class:`NodeConfigError`."""
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as error:
        raise NodeConfigError(_one_line(error, source)) from None


def load_node_config(path: str | os.PathLike[str]) -> NodeConfig:
    """Read a node config JSON file; any problem is one :class:`NodeConfigError` line."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NodeConfigError(f"{source}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise NodeConfigError(f"{source}: cannot read: {error}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise NodeConfigError(f"{source}: invalid JSON: {error}") from None
    return parse_node_config(data, source)


# --------------------------------------------------------------------------------------------
# From the fleet spec


def resolve_key_reference(
    tenant: str, reference: str, environ: Mapping[str, str] | None = None
) -> str:
    """The SHA-256 digest of the key a tenant's key reference points at.

    ``env:VAR`` reads the environment, ``file:/path`` the file (surrounding whitespace
    stripped), ``sha256:<hex>`` is the digest already. ``config:NAME`` is a Pulumi secret that
    only the Pulumi program can read, so it is an error here.
    """
    environ = environ if environ is not None else os.environ
    scheme, _, rest = reference.partition(":")
    where = f"tenant {tenant!r}: api key reference {reference!r}"
    if scheme == "sha256":
        if len(rest) != 64 or any(c not in "0123456789abcdef" for c in rest):
            raise NodeConfigError(f"{where}: not 64 lower-case hex digits")
        return rest
    if scheme == "env":
        value = environ.get(rest, "")
        if not value:
            raise NodeConfigError(f"{where}: environment variable {rest} is not set")
        return hash_api_key(value)
    if scheme == "file":
        try:
            value = Path(rest).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise NodeConfigError(f"{where}: cannot read the file: {error}") from None
        if not value:
            raise NodeConfigError(f"{where}: the file is empty")
        return hash_api_key(value)
    if scheme == "config":
        raise NodeConfigError(
            f"{where}: a Pulumi config secret can only be read by the Pulumi program; resolve it "
            "there (or use env:/file:/sha256: references) before building a node config"
        )
    raise NodeConfigError(f"{where}: unknown scheme {scheme!r}")


def _upstream_tokenizer_path(pool: str, source: str | None) -> str | None:
    """The GGUF whose tokenizer counts an upstream pool's tokens, if its variant names one.

    A variant of an upstream pool usually names the model id the upstream serves; only a
    ``.gguf`` path or the builtin model give the agent a tokenizer (else counts are estimated).
    """
    if source is None:
        return None
    if source.startswith(BUILTIN_SOURCE_PREFIX):
        from runtime.engine.model_files import ModelNotFoundError, default_model_path

        try:
            return str(default_model_path())
        except ModelNotFoundError as error:
            raise NodeConfigError(f"pool {pool!r}: {error}") from None
    return source if source.lower().endswith(".gguf") else None


def _embedded_engine(model: ModelSpec, variant: VariantSpec) -> EngineSettings:
    """The embedded engine's settings for a model variant of the spec."""
    model_path = None
    if variant.source and not variant.source.startswith(BUILTIN_SOURCE_PREFIX):
        model_path = variant.source
    kv_tokens = EngineSettings.model_fields["kv_cache_tokens"].default
    return EngineSettings(
        model_path=model_path,
        kv_cache_tokens=kv_tokens,
        max_model_len=min(model.context_length, kv_tokens),
    )


def node_config_from_spec(
    spec: FleetSpec,
    pool_name: str,
    node_id: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    spot: bool | None = None,
    engine: EngineSettings | UpstreamEngineSettings | None = None,
    environ: Mapping[str, str] | None = None,
    catalog: Any = None,
    **overrides: Any,
) -> NodeConfig:
    """One node's config for a pool of ``spec``.

    ``spot`` chooses the price (default: the pool's market; an on-demand base replica of a spot
    pool passes ``False``). ``engine`` overrides the engine settings derived from the pool: the
    model's sizing for an embedded pool, the pool's ``upstream`` for an ``openai-upstream`` pool
    (whose variant ``source``, when it is a GGUF file or the builtin model, gives the tokenizer).
    ``overrides`` set other :class:`NodeConfig` fields (e.g. ``controller_url``,
    ``fleet_token_env``, ``drain_timeout_s``). Raises :class:`NodeConfigError`.
    """
    from runtime.catalog import CatalogLookupError, default_catalog

    try:
        pool = spec.pool(pool_name)
    except KeyError as error:
        known = ", ".join(p.name for p in spec.pools)
        raise NodeConfigError(f"{error.args[0]} (known: {known})") from None
    model, variant = spec.pool_variant(pool)

    catalog = catalog if catalog is not None else default_catalog()
    ref = pool.price_ref
    try:
        record = catalog.get(ref.cloud, ref.region, ref.instance_type)
    except CatalogLookupError as error:
        raise NodeConfigError(f"pool {pool.name!r}: {error}") from None
    use_spot = pool.spot if spot is None else spot
    price = record.spot_usd_per_hour if use_spot else record.on_demand_usd_per_hour
    if price is None:
        market = "spot" if use_spot else "on-demand"
        raise NodeConfigError(
            f"pool {pool.name!r}: {ref.instance_type} in {ref.region} has no {market} price"
        )

    if engine is None and pool.engine == "openai-upstream":
        assert pool.upstream is not None  # the spec requires it for this engine
        try:
            engine = UpstreamEngineSettings(
                kind="openai-upstream",
                url=pool.upstream.url,
                model=pool.upstream.model,
                max_in_flight=pool.upstream.max_in_flight,
                model_path=_upstream_tokenizer_path(pool.name, variant.source),
            )
        except ValidationError as error:
            raise NodeConfigError(_one_line(error, f"pool {pool.name!r}: upstream")) from None
    elif engine is None:
        engine = _embedded_engine(model, variant)
    slots = [
        ModelSlot(
            name=ref.model,
            variant=ref.variant,
            engine=_embedded_engine(
                spec.model(ref.model), spec.model(ref.model).variant(ref.variant)
            ),
        )
        for ref in pool.may_load
    ]
    node_models = {model.name, *(ref.model for ref in pool.may_load)}

    tenants = []
    for tenant in spec.tenants:
        # Tenants not allowed here stay in, so that their keys get 403 (forbidden), not 401.
        tenants.append(
            TenantConfig(
                name=tenant.name,
                key_sha256=[
                    resolve_key_reference(tenant.name, r, environ) for r in tenant.api_keys
                ],
                default_priority=tenant.default_priority,
                max_priority=tenant.max_priority,
                min_quality=tenant.min_quality,
                quotas=tenant.quotas,
                allowed_models=tenant.allowed_models,
                allowed_pools=tenant.allowed_pools,
            )
        )
    data: dict[str, Any] = {
        "node_id": node_id,
        "pool": pool.name,
        "host": host,
        "port": port,
        "model": model.name,
        "variant": variant.name,
        "engine": engine,
        "price_usd_per_hour": price,
        "spot": use_spot,
        "tenants": tenants,
        "slo_classes": list(spec.slo_classes),
        "routing": RoutingSettings(
            strategy=spec.routing.strategy,
            slo_headroom=spec.routing.slo_headroom,
            prefer_spot=spec.routing.prefer_spot,
            hop_limit=spec.routing.hop_limit,
            peer_stale_after_s=spec.routing.peer_stale_after_s,
            pools=[
                p.name
                for p in spec.pools
                if node_models & {p.serves.model, *(ref.model for ref in p.may_load)}
            ],
            variant_quality={v.name: v.quality for v in model.variants},
            other_models={
                ref.model: {v.name: v.quality for v in spec.model(ref.model).variants}
                for ref in pool.may_load
            },
        ),
        "models": slots,
        "memory_budget_bytes": pool.memory_budget_bytes,
    }
    data.update(overrides)
    try:
        return NodeConfig(**data)
    except ValidationError as error:
        raise NodeConfigError(_one_line(error, f"node config for pool {pool.name!r}")) from None
