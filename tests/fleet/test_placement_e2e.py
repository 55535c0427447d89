"""Demand-driven placement end to end on loopback: a real controller (placement every 0.5 s)
and two real agents, the ``openai`` client sending the traffic.

Both pools serve ``smollm2-135m`` and may also load ``smollm2-alt`` (the same bundled GGUF
under another model name: the test needs a second model, not a different one). Clients send
``smollm2-alt`` to the cheap agent only: it loads the model on demand, its queue grows (two
batch slots), the controller orders the dear agent to load a copy, the cheap agent's router
(least-loaded) starts sending work there, and once the traffic stops both idle copies are
unloaded, their memory given back.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

from agent.support import LiveAgent

from runtime.agent.app import init as agent_app
from runtime.agent.backend import EngineCoreBackend
from runtime.agent.config import EngineSettings, node_config_from_spec
from runtime.engine.memory import process_rss_bytes
from runtime.spec import FleetSpec, parse_fleet

from .support import (
    FLEET_TOKEN,
    FLEET_TOKEN_ENV,
    KV_CACHE_TOKENS,
    MAX_MODEL_LEN,
    MESSAGES,
    PUSH_INTERVAL_S,
    admin,
    openai_client,
    spec_data,
    start_controller,
    wait_until,
)

ALT = "smollm2-alt"
TENANT = "load"
IDLE_UNLOAD_S = 2.0
MIB = 1 << 20


def placement_spec() -> FleetSpec:
    # Peers stay in the view through the push delays of a busy machine (four engines here).
    data = spec_data(stale_after_s=15.0)
    alt = copy.deepcopy(data["models"][0])
    alt["name"] = ALT
    data["models"].append(alt)
    for pool in data["pools"]:
        pool["may_load"] = [{"model": ALT, "variant": alt["variants"][0]["name"]}]
    data["routing"]["strategy"] = "least-loaded"
    data["autoscaling"] = {
        "period_s": 0.5,
        "placement": {"queue_per_copy": 1, "idle_unload_s": IDLE_UNLOAD_S, "load_cooldown_s": 5},
    }
    return parse_fleet(data)


def start_agent(spec: FleetSpec, pool: str, engine: Any, controller_url: str) -> LiveAgent:
    """An agent whose primary model runs on ``engine`` and whose ``smollm2-alt`` slot loads
    its own engine from the GGUF when asked (two batch slots, so a queue forms)."""
    small = EngineSettings(
        kv_cache_tokens=KV_CACHE_TOKENS, max_model_len=MAX_MODEL_LEN, max_num_seqs=2, seed=0
    )
    config = node_config_from_spec(
        spec,
        pool,
        f"{pool}-agent",
        0,
        engine=small,
        controller_url=controller_url,
        fleet_token_env=FLEET_TOKEN_ENV,
        push_interval_s=PUSH_INTERVAL_S,
    )
    [slot] = config.models
    assert slot.name == ALT and not slot.preload
    config = config.model_copy(update={"models": [slot.model_copy(update={"engine": small})]})
    backend = EngineCoreBackend(config.engine, engine_factory=lambda: engine)
    agent = LiveAgent(agent_app(config, backend=backend, environ={FLEET_TOKEN_ENV: FLEET_TOKEN}))
    agent.wait_ready()
    return agent


def alt_state(agent: LiveAgent) -> str:
    status, _, body = agent.request("GET", "/admin/models", headers=admin(FLEET_TOKEN))
    assert status == 200, body
    return next(m["state"] for m in body["models"] if m["name"] == ALT)


def placement(controller: Any) -> dict[str, Any]:
    status, _, body = controller.request("GET", "/v1/placement", headers=admin())
    assert status == 200, body
    return dict(body)


def test_a_queue_loads_the_model_on_another_node_and_idle_copies_are_unloaded(
    tmp_path: Path, engines: list[Any]
) -> None:
    spec = placement_spec()
    controller = start_controller(spec, tmp_path / "l.db")
    agents: list[LiveAgent] = []
    served_by: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop() -> None:
        client = openai_client(agents[0].url, TENANT)
        while not stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=ALT, messages=MESSAGES, max_tokens=24, temperature=0
                )
                raw.parse()
                with lock:
                    served_by.append(raw.headers["x-fleetform-served-by"])
            except Exception as error:  # every failure is kept and fails the test
                with lock:
                    failures.append(repr(error))

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(8)]
    try:
        agents.append(start_agent(spec, "cheap", engines[0], controller.url))
        agents.append(start_agent(spec, "dear", engines[1], controller.url))
        cheap, dear = agents
        assert alt_state(cheap) == alt_state(dear) == "unloaded"
        wait_until(lambda: len(placement(controller).get("latest") or {}) > 0, 10, "a plan")
        rss_before = process_rss_bytes()

        for thread in threads:
            thread.start()
        wait_until(lambda: alt_state(dear) == "ready", 90, "the controller loading alt on dear")
        wait_until(lambda: "dear-agent" in list(served_by), 90, "alt requests served by dear")
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == []
        assert set(served_by) == {"cheap-agent", "dear-agent"}

        loads = [
            action
            for plan in placement(controller)["recent"]
            for action in plan["actions"]
            if action["kind"] == "load"
        ]
        assert [(a["node"], a["model"]) for a in loads] == [("dear-agent", ALT)]
        assert "waiting over 1 ready copy" in loads[0]["reason"]
        status, _, html = controller.request("GET", "/dashboard", headers=admin())
        assert status == 200
        assert 'id="placement-actions"' in html and "waiting over 1 ready copy" in html

        rss_loaded = process_rss_bytes()
        wait_until(
            lambda: alt_state(cheap) == alt_state(dear) == "unloaded",
            IDLE_UNLOAD_S + 30,
            "both idle copies unloaded",
        )
        unloads = {
            (action["node"], action["model"])
            for plan in placement(controller)["recent"]
            for action in plan["actions"]
            if action["kind"] == "unload"
        }
        assert unloads == {("cheap-agent", ALT), ("dear-agent", ALT)}
        rss_after = process_rss_bytes()
        print(
            f"\nplacement: rss {rss_before / MIB:.0f} MiB before, {rss_loaded / MIB:.0f} with "
            f"two alt copies, {rss_after / MIB:.0f} after both were unloaded"
        )
        # Two copies of the weights (about 540 MB each) were loaded, then given back.
        assert rss_loaded - rss_after >= 500 * MIB
    finally:
        stop.set()
        for agent in reversed(agents):
            agent.stop()
        controller.stop()
