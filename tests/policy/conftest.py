"""Fixtures: the example stacks' fleets as the pack sees them, each built once under its own
fresh mocks (mocks are process-global; the graphs are read-only data afterwards)."""

from __future__ import annotations

import pytest

from .support import DEV, PROD, Stack, run_stack


@pytest.fixture(scope="session")
def prod() -> Stack:
    """stacks/Pulumi.prod.yaml: every cloud, Kubernetes and the controller."""
    return run_stack(PROD)


@pytest.fixture(scope="session")
def dev() -> Stack:
    """stacks/Pulumi.dev.yaml: AWS and GCP pools, no controller."""
    return run_stack(DEV)
