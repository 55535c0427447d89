"""The controller config: built from a spec or a stack file, secrets only as digests."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.agent.config import hash_api_key
from runtime.controller.config import (
    ControllerConfig,
    ControllerConfigError,
    controller_config_from_spec,
)

from .support import ADMIN_TOKEN, BETA_KEY_ENV, FLEET_TOKEN, KEYS, fleet_spec, make_config

STACK = Path(__file__).resolve().parents[2] / "stacks" / "local.yaml"


def test_tokens_and_keys_are_kept_only_as_digests(tmp_path: Path) -> None:
    config = make_config(tmp_path / "l.db")
    assert config.fleet_token_sha256 == hash_api_key(FLEET_TOKEN)
    assert config.admin_token_sha256 == hash_api_key(ADMIN_TOKEN)
    assert config.tenant_key_sha256["beta"] == [hash_api_key(KEYS["beta"])]  # env: reference
    dumped = config.model_dump_json()
    for secret in (FLEET_TOKEN, ADMIN_TOKEN, *KEYS.values()):
        assert secret not in dumped
    assert config.peer_stale_after_s == 15  # from the spec's routing section
    assert make_config(tmp_path / "l.db", stale_after_s=4).peer_stale_after_s == 4
    assert config.lease_policy.ttl_s == 30


def test_unresolvable_key_references_are_skipped_unless_strict(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = fleet_spec()
    common = {"db_path": tmp_path / "l.db", "fleet_token": FLEET_TOKEN, "admin_token": ADMIN_TOKEN}
    config = controller_config_from_spec(spec, environ={}, **common)
    assert set(config.tenant_key_sha256) == {"alpha", "gamma"}
    assert BETA_KEY_ENV in caplog.text
    with pytest.raises(ControllerConfigError, match=BETA_KEY_ENV):
        controller_config_from_spec(spec, environ={}, strict_keys=True, **common)
    with pytest.raises(ControllerConfigError, match="fleet token is empty"):
        controller_config_from_spec(spec, **{**common, "fleet_token": ""})
    with pytest.raises(ControllerConfigError, match="port"):
        controller_config_from_spec(spec, environ={}, port=-1, **common)


def test_a_stack_file_stands_in_for_the_spec(tmp_path: Path) -> None:
    digests = {
        "db_path": tmp_path / "l.db",
        "fleet_token_sha256": hash_api_key("f"),
        "admin_token_sha256": hash_api_key("a"),
    }
    config = ControllerConfig(stack=STACK, **digests)
    assert config.spec.name == "local" and config.stack == STACK
    with pytest.raises(ValidationError, match="file not found"):
        ControllerConfig(stack=tmp_path / "missing.yaml", **digests)
    with pytest.raises(ValidationError, match="no tenant named nobody"):
        ControllerConfig(stack=STACK, tenant_key_sha256={"nobody": [hash_api_key("k")]}, **digests)
    with pytest.raises(ValidationError, match="fleet_token_sha256"):
        ControllerConfig(stack=STACK, **{**digests, "fleet_token_sha256": "plain-token"})
