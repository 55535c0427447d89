"""Fixtures of the simulator's tests: the catalog, the cost model, the small fleet."""

from __future__ import annotations

import pytest

from runtime.catalog import Catalog, default_catalog
from runtime.costmodel import PerformanceModel
from runtime.spec import FleetSpec, parse_fleet

from .support import FLEET


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return default_catalog()


@pytest.fixture(scope="session")
def perf() -> PerformanceModel:
    return PerformanceModel()


@pytest.fixture(scope="session")
def spec(catalog: Catalog) -> FleetSpec:
    return parse_fleet(FLEET, catalog=catalog)
