"""Fixtures: a fresh Pulumi mock monitor per test, and the prod example stack's fleet built once
under its own mocks (its graph is read-only data afterwards). See support.py and shared
notes/pulumi-testing.md."""

from __future__ import annotations

import pytest

from .support import Program, install_mocks, run_prod


@pytest.fixture
def program() -> Program:
    return install_mocks()


@pytest.fixture(scope="session")
def prod() -> Program:
    """The fleet of stacks/Pulumi.prod.yaml (every cloud), as registered under the mocks."""
    return run_prod()
