"""Who is calling: API keys to tenants, and the fleet token of admin routes.

This module owns key checking. The node config stores only SHA-256 digests of keys; a presented
key is hashed and compared with *every* stored digest using :func:`hmac.compare_digest`, without
stopping at the first match, so the time taken does not reveal which digest (or how much of one)
matched. Keys are never logged or echoed back.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from runtime.agent.config import TenantConfig

__all__ = ["TenantDirectory", "bearer_token", "token_matches"]

# Longer "keys" are certainly wrong; not hashing megabytes of header keeps the check cheap.
MAX_KEY_LENGTH = 4096


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    value = headers.get("Authorization", "")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    if not token or len(token) > MAX_KEY_LENGTH:
        return None
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    tenant: TenantConfig


class TenantDirectory:
    """Resolves API keys to tenants."""

    def __init__(self, tenants: Iterable[TenantConfig]) -> None:
        self._entries = [
            _Entry(bytes.fromhex(digest), tenant)
            for tenant in tenants
            for digest in tenant.key_sha256
        ]
        self.by_name = {tenant.name: tenant for tenant in tenants}

    def tenant_for_key(self, key: str | None) -> TenantConfig | None:
        """The tenant owning ``key``, or ``None``. Constant time in which digest matches."""
        if key is None:
            return None
        presented = _digest(key)
        found: TenantConfig | None = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry.tenant  # keep looping: same work whichever entry matched
        return found


def token_matches(presented: str | None, expected: str | None) -> bool:
    """Constant-time check of a presented admin token; ``False`` when no token is configured."""
    if presented is None or expected is None:
        return False
    return hmac.compare_digest(_digest(presented), _digest(expected))
