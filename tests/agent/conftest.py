"""Fixtures: the real SmolLM2 engine (loaded once) and live agents on loopback (see support)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runtime.agent.app import init
from runtime.agent.backend import EngineCoreBackend
from runtime.agent.config import NodeConfig
from runtime.engine.model_files import ModelNotFoundError, resolve_model_path

from .support import KEYS, MAX_MODEL_LEN, LiveAgent, node_config_data


@pytest.fixture(scope="session")
def shared_engine() -> Any:
    """The bundled SmolLM2-135M, loaded once for every agent of the session."""
    from runtime.engine.numpy_engine import NumpyEngine

    try:
        path = resolve_model_path()
    except ModelNotFoundError as exc:  # `make test` installs it: missing is a broken setup
        pytest.fail(f"default model not installed: {exc}")
    engine = NumpyEngine(
        path, kv_cache_tokens=4096, max_model_len=MAX_MODEL_LEN, max_num_seqs=8, seed=0
    )
    engine.load()
    return engine


@pytest.fixture(scope="session")
def start_agent(shared_engine: Any) -> Iterator[Callable[..., LiveAgent]]:
    """Factory: a live agent for a config (data) over the shared engine; stopped at the end."""
    started: list[LiveAgent] = []

    def start(
        config_data: dict[str, Any] | None = None,
        *,
        engine_factory: Callable[[], Any] | None = None,
        environ: dict[str, str] | None = None,
        wait: bool = True,
    ) -> LiveAgent:
        config = NodeConfig.model_validate(config_data or node_config_data())
        backend = EngineCoreBackend(
            config.engine, engine_factory=engine_factory or (lambda: shared_engine)
        )
        app = init(config, backend=backend, environ=environ or {})
        agent = LiveAgent(app)
        started.append(agent)
        if wait:
            agent.wait_ready()
        return agent

    yield start
    for agent in reversed(started):
        agent.stop()


@pytest.fixture(scope="session")
def agent(start_agent: Callable[..., LiveAgent]) -> LiveAgent:
    """The shared agent most API tests talk to (no fleet token: admin routes disabled)."""
    return start_agent()


@pytest.fixture
def idle_agent(agent: LiveAgent) -> Iterator[LiveAgent]:
    """The shared agent, checked to be left with nothing in flight after the test."""
    yield agent
    agent.wait_idle()


@pytest.fixture(scope="session")
def client(agent: LiveAgent) -> Any:
    import openai

    return openai.OpenAI(
        api_key=KEYS["demo"], base_url=f"{agent.url}/v1", max_retries=0, timeout=120
    )
