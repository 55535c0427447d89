"""A node holding several models under a memory budget (runtime.agent.models), end to end.

Real engines on loopback: the shipped SmolLM2 is the primary model, and a ``fleetform variant
--to f16`` copy of it (made once per module) is a second "version" under its own name. The
engine keeps weights de-quantised to float32, so each loaded slot holds ~0.5 GB: at most two are
loaded at once here. Loads that a test must hold open ("while B loads ...") are gated inside the
engine factory, i.e. in the backend's loading thread, exactly where a slow disk would stall.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from runtime.agent.app import _live_snapshot, init
from runtime.agent.backend import EngineCoreBackend
from runtime.agent.config import EngineSettings, ModelSlot, NodeConfig
from runtime.agent.models import (
    ModelManager,
    ModelsReport,
    ModelUnavailable,
    ResidentModel,
    SlotState,
    UnloadedBackend,
    plan_eviction,
    process_rss_bytes,
)
from runtime.protocol import InstanceSnapshot, MetricsPush

from .support import FLEET_TOKEN, FLEET_TOKEN_ENV, KEYS, MODEL, LiveAgent, node_config_data

MODEL_B = "smollm2-135m-f16"
MODEL_BROKEN = "broken-model"
MIB = 2**20
ENGINE = {
    "kv_cache_tokens": 1024,  # 45 MiB of KV pool: the weights (513 MiB) dominate a slot
    "max_model_len": 128,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 256,
    "seed": 0,
}
LONG = {"max_tokens": 64, "ignore_eos": True, "temperature": 0}  # ~2 s of decoding, idle box
FLEETFORM = shutil.which("fleetform", path=str(Path(sys.executable).parent))


# --------------------------------------------------------------------------------------------
# Helpers


def wait_for(condition: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def admin(agent: LiveAgent, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    status, _, body = agent.request(method, path, key=FLEET_TOKEN, **kwargs)
    return status, body


def slots(agent: LiveAgent) -> dict[str, dict[str, Any]]:
    status, body = admin(agent, "GET", "/admin/models")
    assert status == 200, body
    report = ModelsReport.model_validate(body)
    return {m.name: m.model_dump() for m in report.models}


def ensure(agent: LiveAgent, name: str, state: str) -> None:
    """Bring a model to ``state`` (ready or unloaded) through the admin routes: each test
    states what it starts from, so it also runs alone (in sequence these are no-ops)."""
    if slots(agent)[name]["state"] != state:
        action = "load" if state == "ready" else "unload"
        status, body = admin(agent, "POST", f"/admin/models/{name}/{action}", timeout=180)
        assert status == 200 and body["state"] == state, body


def metric(agent: LiveAgent, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = (
        rf"^{re.escape(name)}{{{re.escape(selector)}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    )
    match = re.search(pattern, agent.metrics_text(), re.M)
    return float(match.group(1)) if match else 0.0


def client(agent: LiveAgent) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=KEYS["demo"], base_url=f"{agent.url}/v1", max_retries=0, timeout=120
    )


def stream(agent: LiveAgent, model: str, prompt: str = "Once upon a time", **params: Any) -> dict:
    """One streaming completion through the openai client: text, finish reason and TTFT (s,
    as the client sees it)."""
    started = time.monotonic()
    ttft = None
    pieces: list[str] = []
    finish = None
    params = {"max_tokens": 8, "temperature": 0, **params}
    extra = {"ignore_eos": params.pop("ignore_eos")} if "ignore_eos" in params else None
    chunks = client(agent).completions.create(
        model=model, prompt=prompt, stream=True, extra_body=extra, **params
    )
    for chunk in chunks:
        choice = chunk.choices[0]
        if choice.text:
            if ttft is None:
                ttft = time.monotonic() - started
            pieces.append(choice.text)
        finish = choice.finish_reason or finish
    return {"text": "".join(pieces), "finish": finish, "ttft": ttft}


class Gates:
    """Backend factory whose engine build can be held closed per model, counting builds."""

    def __init__(self) -> None:
        self.closed: dict[str, threading.Event] = {}
        self.builds: list[str] = []

    def hold(self, name: str) -> threading.Event:
        gate = self.closed[name] = threading.Event()
        return gate

    def factory(self, slot: ModelSlot) -> EngineCoreBackend:
        settings = slot.engine
        assert isinstance(settings, EngineSettings)

        def build() -> Any:
            from runtime.engine.numpy_engine import NumpyEngine

            self.builds.append(slot.name)
            gate = self.closed.pop(slot.name, None)
            if gate is not None:
                assert gate.wait(120), "gate never opened"
            return NumpyEngine(
                settings.model_path,
                kv_cache_tokens=settings.kv_cache_tokens,
                max_model_len=settings.max_model_len,
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                seed=settings.seed,
            )

        return EngineCoreBackend(settings, engine_factory=build)


def multi_config(variant: Path, **overrides: Any) -> dict[str, Any]:
    return node_config_data(
        engine=ENGINE,
        fleet_token_env=FLEET_TOKEN_ENV,
        models=[
            {"name": MODEL_B, "variant": "f16", "engine": {**ENGINE, "model_path": str(variant)}},
            {
                "name": MODEL_BROKEN,
                "variant": "q8-0",
                "engine": {**ENGINE, "model_path": str(variant.with_name("missing.gguf"))},
            },
        ],
        **overrides,
    )


def start(config: dict[str, Any], gates: Gates) -> LiveAgent:
    app = init(
        NodeConfig.model_validate(config),
        backend_factory=gates.factory,
        environ={FLEET_TOKEN_ENV: FLEET_TOKEN},
    )
    agent = LiveAgent(app)
    try:
        agent.wait_ready()
    except BaseException:
        agent.stop()
        raise
    return agent


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model re-encoded as F16 by `fleetform variant`: a second version."""
    assert FLEETFORM is not None
    out = tmp_path_factory.mktemp("variants") / "smollm2-f16.gguf"
    subprocess.run(
        [FLEETFORM, "variant", "builtin", "--to", "f16", "-o", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


# --------------------------------------------------------------------------------------------
# The eviction choice (pure)


def resident(name: str, mib: int, last_used: float, *, busy: int = 0, state: str = "ready") -> Any:
    return ResidentModel(name, mib * MIB, SlotState(state), busy, last_used)


def test_without_a_budget_nothing_is_evicted() -> None:
    plan = plan_eviction(10**12, None, [resident("a", 500, 1.0)])
    assert plan.fits and plan.victims == ()


def test_a_model_that_fits_evicts_nothing() -> None:
    plan = plan_eviction(300 * MIB, 1000 * MIB, [resident("a", 500, 1.0)])
    assert plan.fits and plan.victims == ()


def test_the_least_recently_used_idle_models_go_first_and_no_more_than_needed() -> None:
    models = [resident("a", 400, 3.0), resident("b", 400, 1.0), resident("c", 100, 2.0)]
    # 100 MiB free: 350 more needed. b (used first) alone frees enough.
    assert plan_eviction(450 * MIB, 1000 * MIB, models).victims == ("b",)
    # 650 more: b, then c (next least recent), then a.
    assert plan_eviction(800 * MIB, 1000 * MIB, models).victims == ("b", "c", "a")
    # Ties in last use go by name, so the choice is deterministic.
    tied = [resident("y", 500, 1.0), resident("x", 500, 1.0)]
    assert plan_eviction(500 * MIB, 1000 * MIB, tied).victims == ("x",)


def test_busy_loading_and_draining_models_are_never_evicted() -> None:
    models = [
        resident("busy", 400, 0.0, busy=1),
        resident("loading", 300, 0.0, state="loading"),
        resident("draining", 200, 0.0, state="draining"),
        resident("idle", 100, 9.0),
    ]
    plan = plan_eviction(300 * MIB, 1000 * MIB, models)
    assert not plan.fits and plan.victims == ()
    assert plan.reason is not None
    assert "busy (400 MiB, ready, 1 request in flight or waiting)" in plan.reason
    assert "loading (300 MiB, loading)" in plan.reason
    # The idle one alone is enough when less is needed: only it goes.
    assert plan_eviction(100 * MIB, 1000 * MIB, models).victims == ("idle",)
    # A protected model (the one just loaded) is not a candidate either.
    assert not plan_eviction(100 * MIB, 1000 * MIB, models, protect={"idle"}).fits


def test_a_model_larger_than_the_whole_budget_never_fits() -> None:
    plan = plan_eviction(2000 * MIB, 1000 * MIB, [])
    assert not plan.fits and "more than the node's whole memory budget" in (plan.reason or "")


def test_need_zero_brings_the_node_back_under_its_budget() -> None:
    models = [resident("a", 600, 1.0), resident("b", 600, 2.0)]
    assert plan_eviction(0, 1000 * MIB, models, protect={"b"}).victims == ("a",)


# --------------------------------------------------------------------------------------------
# Config and wire


def test_the_single_model_config_is_one_implicit_preloaded_slot() -> None:
    config = NodeConfig.model_validate(node_config_data())
    (only,) = config.model_slots()
    assert (only.name, only.variant, only.preload) == (MODEL, "q4-1", True)
    assert only.engine == config.engine and config.memory_budget_bytes is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"models": [{"name": MODEL, "variant": "x"}]}, "models[0].name: model 'smollm2-135m'"),
        (
            {"models": [{"name": "b", "variant": "x"}, {"name": "b", "variant": "y"}]},
            "models[1].name: model 'b' is listed twice",
        ),
        (
            {
                "memory_budget_bytes": 100,
                "models": [{"name": "b", "variant": "x", "memory_bytes": 101}],
            },
            "models[0].memory_bytes: 101 exceeds memory_budget_bytes",
        ),
        (
            {
                "models": [
                    {
                        "name": "b",
                        "variant": "x",
                        "engine": {"kv_cache_tokens": 64, "max_model_len": 128},
                    }
                ]
            },
            "models[0].engine.max_model_len: exceeds models[0].engine.kv_cache_tokens",
        ),
    ],
)
def test_bad_model_slots_are_refused_naming_the_field(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        NodeConfig.model_validate(node_config_data(**overrides))


def test_a_push_without_models_still_validates() -> None:
    snapshot = InstanceSnapshot(
        instance_id="n", pool="p", url="http://n:1", model="m", variant="v", price_usd_per_hour=1
    )
    assert snapshot.models == []
    assert InstanceSnapshot.model_validate(snapshot.model_dump(exclude={"models"})) == snapshot


# --------------------------------------------------------------------------------------------
# The manager over stand-in backends (no engine): boot order, shared loads, boot failures


class FakeBackend(UnloadedBackend):
    """Loads when its gate opens; reports ``memory_bytes`` like the embedded engine."""

    def __init__(self, name: str, memory_bytes: int, log: list[str]) -> None:
        super().__init__(name)
        self.name, self.memory_bytes, self.log = name, memory_bytes, log
        self.gate = asyncio.Event()
        self.not_ready_reason = "the model is loading"

    async def start(self) -> None:
        self.log.append(f"start {self.name}")

    async def wait_loaded(self) -> None:
        await self.gate.wait()
        self.ready = True  # type: ignore[misc]
        self.log.append(f"ready {self.name}")

    async def close(self) -> None:
        self.log.append(f"close {self.name}")


def fake_manager(
    budget_mib: int | None, *specs: tuple[str, int, bool]
) -> tuple[ModelManager, dict[str, FakeBackend], list[str]]:
    log: list[str] = []
    backends: dict[str, FakeBackend] = {}

    def factory(slot: ModelSlot) -> FakeBackend:
        backend = backends[slot.name] = FakeBackend(slot.name, (slot.memory_bytes or 0), log)
        backend.gate.set()
        return backend

    slots_ = [
        ModelSlot(name=name, variant="v", memory_bytes=mib * MIB, preload=preload)
        for name, mib, preload in specs
    ]
    primary = backends[slots_[0].name] = FakeBackend(slots_[0].name, specs[0][1] * MIB, log)
    manager = ModelManager(
        slots_,
        budget_bytes=None if budget_mib is None else budget_mib * MIB,
        backend_factory=factory,
        initial_backend=primary,
    )
    return manager, backends, log


def test_boot_loads_the_primary_then_preloads_and_refuses_requests_meanwhile() -> None:
    async def run() -> None:
        manager, backends, log = fake_manager(
            None, ("a", 10, True), ("b", 10, True), ("c", 10, False)
        )
        await manager.start()
        await asyncio.sleep(0)
        assert manager.readiness() == ("loading", "the model is loading")
        with pytest.raises(ModelUnavailable) as caught:
            await manager.acquire("a")  # the node is booting: 503 at once, as before slots
        assert caught.value.code == "model_loading"
        assert "start b" not in log  # one boot load at a time, the primary first
        backends["a"].gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert manager.readiness() == ("ready", None)
        assert log[:3] == ["start a", "ready a", "start b"]
        assert manager.state_of("c") is SlotState.UNLOADED  # not preloaded: loads on demand
        lease = await manager.acquire("c")
        assert lease.waited_s is not None and manager.state_of("c") is SlotState.READY
        lease.release()
        await manager.close()

    asyncio.run(run())


def test_concurrent_requests_for_a_loading_model_share_one_load() -> None:
    async def run() -> None:
        manager, backends, log = fake_manager(None, ("a", 10, True), ("b", 10, False))
        backends["a"].gate.set()
        await manager.start()
        leases = await asyncio.gather(*(manager.acquire("b") for _ in range(5)))
        assert log.count("start b") == 1
        assert {lease.backend for lease in leases} == {backends["b"]}
        for lease in leases:
            lease.release()
        await manager.close()

    asyncio.run(run())


def test_a_primary_that_cannot_fit_the_budget_fails_the_node() -> None:
    async def run() -> None:
        manager, _, log = fake_manager(5, ("a", 10, True))
        await manager.start()
        for _ in range(20):
            await asyncio.sleep(0)
        status, detail = manager.readiness()
        assert status == "failed" and "whole memory budget" in (detail or "")
        assert manager.primary_backend.load_error == detail  # `fleetform agent` exits on it
        assert "start a" not in log
        with pytest.raises(ModelUnavailable) as caught:
            await manager.acquire("a")
        assert caught.value.code == "model_load_failed"
        await manager.close()

    asyncio.run(run())


# --------------------------------------------------------------------------------------------
# On demand, no budget: loading never blocks serving, unload waits, failures are per slot


@pytest.fixture(scope="class")
def roomy(variant: Path) -> Iterator[tuple[LiveAgent, Gates]]:
    gates = Gates()
    agent = start(multi_config(variant), gates)
    yield agent, gates
    agent.stop()


class TestOnDemand:
    def test_admin_routes_need_the_fleet_token(self, roomy: tuple[LiveAgent, Gates]) -> None:
        agent, _ = roomy
        for method, path in (
            ("GET", "/admin/models"),
            ("POST", f"/admin/models/{MODEL_B}/load"),
            ("POST", f"/admin/models/{MODEL_B}/unload"),
        ):
            for key in (None, KEYS["demo"], FLEET_TOKEN + "x"):
                status, _, body = agent.request(method, path, key=key)
                assert status == 401, (method, path, key, body)
                assert body["error"]["code"] == "invalid_api_key"
        assert slots(agent)[MODEL_B]["state"] == "unloaded"  # nothing was loaded by those

    def test_every_slot_is_listed_and_unknown_names_are_404_naming_the_field(
        self, roomy: tuple[LiveAgent, Gates]
    ) -> None:
        agent, _ = roomy
        listed = {m.id: m for m in client(agent).models.list().data}
        assert list(listed) == [MODEL, MODEL_B, MODEL_BROKEN]  # loaded or not
        assert listed[MODEL_B].variant == "f16"  # type: ignore[attr-defined]
        assert listed[MODEL_B].max_model_len is None  # type: ignore[attr-defined]
        assert listed[MODEL].max_model_len == 128  # type: ignore[attr-defined]

        with pytest.raises(openai.NotFoundError) as caught:
            client(agent).completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
        assert caught.value.body["param"] == "model"  # type: ignore[index]
        assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
        status, body = admin(agent, "POST", "/admin/models/no-such-model/load")
        assert status == 404 and body["error"]["param"] == "name", body
        assert MODEL_B in body["error"]["message"]  # it says which models there are

        models = slots(agent)
        assert models[MODEL]["state"] == "ready" and models[MODEL]["primary"]
        assert models[MODEL]["memory_source"] == "measured"
        # Weights de-quantised to float32 (513 MiB) plus the 1024-token KV pool (45 MiB).
        assert 500 * MIB < models[MODEL]["memory_bytes"] < 600 * MIB

    def test_while_a_model_loads_the_loaded_one_keeps_serving_and_callers_share_one_load(
        self, roomy: tuple[LiveAgent, Gates]
    ) -> None:
        agent, gates = roomy
        ensure(agent, MODEL_B, "unloaded")
        gate = gates.hold(MODEL_B)
        builds_before = gates.builds.count(MODEL_B)
        loads_before = slots(agent)[MODEL_B]["loads"]
        cold_before = metric(agent, "fleetform_model_cold_starts_total", model=MODEL_B)
        timed_before = metric(agent, "fleetform_model_load_seconds_count", model=MODEL_B)
        with ThreadPoolExecutor(2) as pool:
            started = time.monotonic()
            cold: list[Future[dict]] = [pool.submit(stream, agent, MODEL_B) for _ in range(2)]
            wait_for(lambda: slots(agent)[MODEL_B]["waiting"] == 2, what="both to wait for B")
            assert slots(agent)[MODEL_B]["state"] == "loading"
            # B is loading (its thread is held): A answers meanwhile, several times.
            for _ in range(3):
                warm = stream(agent, MODEL)
                assert warm["finish"] == "length" and warm["text"]
            assert slots(agent)[MODEL_B]["state"] == "loading"
            assert not any(f.done() for f in cold)
            opened = time.monotonic()
            gate.set()
            results = [f.result(timeout=120) for f in cold]
        for result in results:
            assert result["finish"] == "length" and result["text"]
            # Their TTFT includes the whole wait for the load.
            assert result["ttft"] >= opened - started
        assert gates.builds.count(MODEL_B) == builds_before + 1  # one load for both
        assert metric(agent, "fleetform_model_cold_starts_total", model=MODEL_B) == cold_before + 2
        assert (
            metric(agent, "fleetform_model_load_seconds_count", model=MODEL_B) == timed_before + 1
        )
        models = slots(agent)
        assert models[MODEL_B]["state"] == "ready"
        assert models[MODEL_B]["loads"] == loads_before + 1
        assert models[MODEL]["state"] == "ready"  # no budget: nothing was evicted

        # What the node pushes: still its primary model, plus every model it may hold.
        snapshot = agent.on_loop(lambda: _live_snapshot(agent.state))
        assert (snapshot.model, snapshot.healthy) == (MODEL, True)
        held = {(m.name, m.state) for m in snapshot.models if m.state != "unloaded"}
        assert held == {(MODEL, "ready"), (MODEL_B, "ready")}
        assert {m.name for m in snapshot.models} == set(models)
        push = MetricsPush(agent_id="n", boot_id="b", seq=0, sent_at=0.0, instance=snapshot)
        assert MetricsPush.model_validate_json(push.model_dump_json()) == push
        assert snapshot.to_view(last_seen=0.0).model == MODEL
        # The fleet routes both ready models to this node.
        assert [v.model for v in snapshot.to_views(last_seen=0.0)] == [MODEL, MODEL_B]

    def test_unload_waits_for_in_flight_requests_then_frees_the_memory(
        self, roomy: tuple[LiveAgent, Gates]
    ) -> None:
        agent, _ = roomy
        ensure(agent, MODEL_B, "ready")
        footprint = slots(agent)[MODEL_B]["memory_bytes"]
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(stream, agent, MODEL_B, **LONG)
            wait_for(lambda: slots(agent)[MODEL_B]["in_flight"] == 1, what="the stream")
            rss_before = process_rss_bytes()
            # A deadline far beyond the stream's length, however slow a shared machine is.
            unload = pool.submit(
                admin, agent, "POST", f"/admin/models/{MODEL_B}/unload", body={"deadline_s": 600}
            )
            wait_for(lambda: slots(agent)[MODEL_B]["state"] == "draining", what="draining")
            # New requests for it are refused at once, with a reason and a time to retry.
            status, headers, body = agent.request(
                "POST",
                "/v1/completions",
                {"model": MODEL_B, "prompt": "Hi", "max_tokens": 2},
                key=KEYS["demo"],
            )
            assert status == 503 and body["error"]["code"] == "model_draining", body
            assert int(headers["retry-after"]) >= 1
            assert not unload.done()  # still waiting for the stream
            result = long.result(timeout=120)
            status, body = unload.result(timeout=120)
        # It ran to max_tokens: the unload waited for it (closing the engine would abort it).
        assert result["finish"] == "length" and result["text"]
        assert status == 200 and body["state"] == "unloaded", body
        rss_after = process_rss_bytes()
        print(
            f"\nunload: rss {rss_before / MIB:.0f} -> {rss_after / MIB:.0f} MiB, "
            f"footprint {footprint / MIB:.0f} MiB"
        )
        assert rss_before - rss_after >= footprint / 2
        assert slots(agent)[MODEL]["state"] == "ready"  # the other model is untouched

    def test_a_cold_start_is_part_of_the_request_ttft(self, roomy: tuple[LiveAgent, Gates]) -> None:
        agent, _ = roomy
        ensure(agent, MODEL_B, "unloaded")
        load_before = metric(agent, "fleetform_model_load_seconds_sum", model=MODEL_B)
        ttft_before = metric(agent, "fleetform_ttft_seconds_sum", slo_class="standard")
        cold = stream(agent, MODEL_B)
        load_s = metric(agent, "fleetform_model_load_seconds_sum", model=MODEL_B) - load_before
        server_ttft = (
            metric(agent, "fleetform_ttft_seconds_sum", slo_class="standard") - ttft_before
        )
        warm = stream(agent, MODEL_B)
        print(
            f"\ncold start: load {load_s:.2f}s, TTFT cold {cold['ttft']:.2f}s "
            f"(server {server_ttft:.2f}s), warm {warm['ttft']:.3f}s"
        )
        assert load_s > 0.5  # a real load
        assert cold["ttft"] >= load_s and server_ttft >= load_s
        assert warm["ttft"] < cold["ttft"]  # the same request once the model is loaded

    def test_a_model_that_fails_to_load_answers_503_with_the_reason(
        self, roomy: tuple[LiveAgent, Gates]
    ) -> None:
        agent, _ = roomy
        status, headers, body = agent.request(
            "POST",
            "/v1/completions",
            {"model": MODEL_BROKEN, "prompt": "Hi", "max_tokens": 2},
            key=KEYS["demo"],
        )
        assert status == 503, body
        assert body["error"]["code"] == "model_load_failed"
        assert "missing.gguf" in body["error"]["message"]
        assert int(headers["retry-after"]) >= 1
        broken = slots(agent)[MODEL_BROKEN]
        assert broken["state"] == "unloaded" and "missing.gguf" in broken["error"]
        # Retried later, not on every request: the next one gets the same answer at once.
        status, _, again = agent.request(
            "POST",
            "/v1/completions",
            {"model": MODEL_BROKEN, "prompt": "Hi", "max_tokens": 2},
            key=KEYS["demo"],
        )
        assert status == 503 and again["error"]["code"] == "model_load_failed"
        assert slots(agent)[MODEL_BROKEN]["loads"] == 0
        # The node stays ready and its other models serve.
        assert agent.request("GET", "/readyz")[0] == 200
        assert stream(agent, MODEL)["text"]


# --------------------------------------------------------------------------------------------
# A budget that fits one model


@pytest.fixture(scope="class")
def tight(variant: Path) -> Iterator[tuple[LiveAgent, Gates]]:
    gates = Gates()
    agent = start(multi_config(variant, memory_budget_bytes=800 * MIB), gates)
    yield agent, gates
    agent.stop()


class TestOneModelBudget:
    def test_a_request_for_another_model_evicts_the_idle_one_and_rss_drops(
        self, tight: tuple[LiveAgent, Gates]
    ) -> None:
        agent, gates = tight
        ensure(agent, MODEL_B, "unloaded")
        ensure(agent, MODEL, "ready")
        models = slots(agent)
        footprint = models[MODEL]["memory_bytes"]
        wait_for(lambda: slots(agent)[MODEL_B]["memory_bytes"] is not None, what="B's estimate")
        estimate = slots(agent)[MODEL_B]["memory_bytes"]
        evictions_before = metric(agent, "fleetform_model_evictions_total", model=MODEL)
        gate = gates.hold(MODEL_B)  # holds B's engine build, after the room was made
        builds = gates.builds.count(MODEL_B)
        rss_before = process_rss_bytes()
        with ThreadPoolExecutor(1) as pool:
            cold = pool.submit(stream, agent, MODEL_B)
            wait_for(lambda: gates.builds.count(MODEL_B) > builds, what="B's load to begin")
            rss_evicted = process_rss_bytes()
            models = slots(agent)
            assert models[MODEL]["state"] == "unloaded"
            assert models[MODEL_B]["state"] == "loading"
            gate.set()
            result = cold.result(timeout=120)
        print(
            f"\neviction: rss {rss_before / MIB:.0f} -> {rss_evicted / MIB:.0f} MiB, "
            f"footprint {footprint / MIB:.0f} MiB"
        )
        assert rss_before - rss_evicted >= footprint / 2
        assert result["finish"] == "length" and result["text"]
        assert metric(agent, "fleetform_model_evictions_total", model=MODEL) == evictions_before + 1
        report = ModelsReport.model_validate(admin(agent, "GET", "/admin/models")[1])
        states = {m.name: m.state for m in report.models}
        assert states == {MODEL: "unloaded", MODEL_B: "ready", MODEL_BROKEN: "unloaded"}
        assert report.memory_reserved_bytes <= 800 * MIB
        # The estimate read from the file's header was what the load then measured.
        (measured,) = [m.memory_bytes for m in report.models if m.name == MODEL_B]
        assert measured is not None and abs(measured - estimate) <= 0.02 * measured
        # The primary being unloaded does not take the node out of rotation.
        assert agent.request("GET", "/readyz")[0] == 200

    def test_a_busy_model_is_never_evicted(self, tight: tuple[LiveAgent, Gates]) -> None:
        agent, _ = tight
        ensure(agent, MODEL_B, "ready")  # with this budget, A goes if it was loaded
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(stream, agent, MODEL_B, **LONG)
            wait_for(lambda: slots(agent)[MODEL_B]["in_flight"] == 1, what="the stream")
            # A does not fit next to B, and B is busy: refused at once, saying why.
            with pytest.raises(openai.APIStatusError) as caught:
                client(agent).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
            error = caught.value
            assert error.status_code == 503
            assert error.body["code"] == "insufficient_memory"  # type: ignore[index]
            message = error.body["message"]  # type: ignore[index]
            assert f"{MODEL_B} (" in message and "in flight" in message, message
            assert int(error.response.headers["retry-after"]) >= 1
            assert slots(agent)[MODEL_B]["state"] == "ready"
            assert long.result(timeout=120)["finish"] == "length"
        # Once B is idle, A can have the memory again.
        assert stream(agent, MODEL)["text"]
        models = slots(agent)
        assert (models[MODEL]["state"], models[MODEL_B]["state"]) == ("ready", "unloaded")
