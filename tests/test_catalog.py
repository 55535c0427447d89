"""Tests for runtime.catalog against the raw price CSVs.

Expected values are computed here from the raw rows in /work/shared/data (not from the
compacted runtime/data files and not with the catalog's own aggregation code), so a
mistake in compaction, joining or aggregation shows up as a disagreement.
"""

from __future__ import annotations

import csv
import functools
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from runtime.catalog import (
    AcceleratorSpec,
    Catalog,
    CatalogLookupError,
    InstanceRecord,
    default_catalog,
)

REPO = Path(__file__).parents[1]
RAW_DIR = Path(__file__).parents[1].parent / "shared" / "data"
PACKAGED_DIR = REPO / "runtime" / "data"
GIB = 1.073741824
# The files of runtime/data/ that this module owns (other modules may keep files there too).
CATALOG_FILES = ("prices_aws.csv", "prices_gcp.csv", "prices_azure.csv", "accelerator_specs.csv")

needs_raw = pytest.mark.skipif(
    not (RAW_DIR / "prices_aws.csv").is_file(),
    reason=f"raw price data not found at {RAW_DIR} (only present in the dev workspace)",
)


# --- raw-data helpers (deliberately independent of runtime.catalog) ------------------


@functools.cache
def raw(cloud: str) -> tuple[dict[str, str], ...]:
    with (RAW_DIR / f"prices_{cloud}.csv").open(newline="") as f:
        return tuple(csv.DictReader(f))


@functools.cache
def raw_specs() -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    with (RAW_DIR / "accelerator_specs.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            out[row["AcceleratorName"]].append(row)
    return out


def rows(cloud: str, region: str, instance_type: str = "", acc: str = "", count: str = ""):
    """Raw rows for a (region, instance type) or a GCP add-on (acc, count), deduplicated."""
    seen = set()
    for r in raw(cloud):
        if r["Region"] != region or r["InstanceType"] != instance_type:
            continue
        if not instance_type and (r["AcceleratorName"] != acc or r["AcceleratorCount"] != count):
            continue
        key = tuple(r.values())
        if key not in seen:
            seen.add(key)
            yield r


def f(text: str) -> float | None:
    return float(text) if text else None


def gcp_expected(region: str, host: str, acc: str, count: int) -> dict[str, object]:
    """Host + add-on, joined zone by zone, from raw GCP rows."""
    host_rows = {r["AvailabilityZone"]: r for r in rows("gcp", region, host)}
    acc_rows = {r["AvailabilityZone"]: r for r in rows("gcp", region, "", acc, str(count))}
    zones = sorted(host_rows.keys() & acc_rows.keys())
    assert zones, f"test setup: no {host} + {acc}x{count} zone in {region}"
    od = [float(host_rows[z]["Price"]) + float(acc_rows[z]["Price"]) for z in zones]
    spot = [
        float(host_rows[z]["SpotPrice"]) + float(acc_rows[z]["SpotPrice"])
        for z in zones
        if host_rows[z]["SpotPrice"] and acc_rows[z]["SpotPrice"]
    ]
    return {
        "zones": tuple(zones),
        "od": max(od),
        "spot": statistics.median(spot) if spot else None,
        "spot_min": min(spot) if spot else None,
        "vcpus": float(next(iter(host_rows.values()))["vCPUs"]),
    }


def approx_or_none(value: float | None):
    return None if value is None else pytest.approx(value, rel=1e-9, abs=1e-9)


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return Catalog.load()


# --- AWS ------------------------------------------------------------------------------


@needs_raw
def test_aws_g5_xlarge_us_east_1(cat: Catalog) -> None:
    r = list(rows("aws", "us-east-1", "g5.xlarge"))
    assert len(r) >= 2
    spots = [float(x["SpotPrice"]) for x in r if x["SpotPrice"]]
    rec = cat.get("aws", "us-east-1", "g5.xlarge")
    assert rec.on_demand_usd_per_hour == pytest.approx(max(float(x["Price"]) for x in r))
    assert rec.spot_usd_per_hour == pytest.approx(statistics.median(spots))
    assert rec.spot_min_usd_per_hour == pytest.approx(min(spots))
    assert rec.zones == tuple(sorted(x["AvailabilityZone"] for x in r))
    assert (rec.accelerator_name, rec.accelerator_kind, rec.accelerator_count) == ("A10G", "gpu", 1)
    assert rec.vcpus == 4 and rec.memory_gib == 16
    assert rec.accelerator is not None and rec.accelerator.memory_gb == 24
    assert rec.gcp_accelerator_type is None


@needs_raw
@pytest.mark.parametrize(
    "itype,region", [("p5e.48xlarge", "us-east-2"), ("trn2.48xlarge", "us-east-2")]
)
def test_aws_missing_on_demand_is_none(cat: Catalog, itype: str, region: str) -> None:
    r = list(rows("aws", region, itype))
    assert r and all(x["Price"] == "" for x in r)
    spots = [float(x["SpotPrice"]) for x in r if x["SpotPrice"]]
    rec = cat.get("aws", region, itype)
    assert rec.on_demand_usd_per_hour is None
    assert rec.spot_usd_per_hour == pytest.approx(statistics.median(spots))
    assert rec.spot_min_usd_per_hour == pytest.approx(min(spots))


@needs_raw
def test_aws_no_spot_anywhere_is_none(cat: Catalog) -> None:
    for region in cat.regions("aws", "p5.4xlarge"):
        assert all(x["SpotPrice"] == "" for x in rows("aws", region, "p5.4xlarge"))
        rec = cat.get("aws", region, "p5.4xlarge")
        assert rec.spot_usd_per_hour is None and rec.spot_min_usd_per_hour is None
        assert rec.on_demand_usd_per_hour is not None


@needs_raw
def test_aws_fractional_l4(cat: Catalog) -> None:
    region = next(x["Region"] for x in raw("aws") if x["InstanceType"] == "g6f.2xlarge")
    rec = cat.get("aws", region, "g6f.2xlarge")
    assert rec.accelerator_count == 0.25
    assert rec.total_accelerator_memory_gb == pytest.approx(0.25 * 24)


@needs_raw
@pytest.mark.parametrize("cloud", ["aws", "azure"])
def test_every_aws_and_azure_record_matches_raw(cat: Catalog, cloud: str) -> None:
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in raw(cloud):
        groups[(r["Region"], r["InstanceType"])].append(r)
    assert sum(1 for _ in cat.records(cloud)) == len(groups)
    for (region, itype), rs in groups.items():
        rec = cat.get(cloud, region, itype)
        prices = [float(x["Price"]) for x in rs if x["Price"]]
        spots = [float(x["SpotPrice"]) for x in rs if x["SpotPrice"]]
        assert rec.on_demand_usd_per_hour == (max(prices) if prices else None), (region, itype)
        assert rec.spot_usd_per_hour == approx_or_none(
            statistics.median(spots) if spots else None
        ), (region, itype)
        assert rec.spot_min_usd_per_hour == (min(spots) if spots else None), (region, itype)
        assert rec.zones == tuple(
            sorted(x["AvailabilityZone"] for x in rs if x["AvailabilityZone"])
        )
        acc = rs[0]["AcceleratorName"] or None
        assert rec.accelerator_name == acc
        assert rec.accelerator_count == (float(rs[0]["AcceleratorCount"]) if acc else 0.0)
        assert rec.vcpus == float(rs[0]["vCPUs"])
        assert rec.memory_gib == float(rs[0]["MemoryGiB"])


# --- Azure ----------------------------------------------------------------------------


@needs_raw
def test_azure_gpu_row(cat: Catalog) -> None:
    (r,) = rows("azure", "eastus", "Standard_NC24ads_A100_v4")
    rec = cat.get("azure", "eastus", "Standard_NC24ads_A100_v4")
    assert rec.on_demand_usd_per_hour == float(r["Price"])
    assert rec.spot_usd_per_hour == float(r["SpotPrice"])
    assert rec.spot_min_usd_per_hour == float(r["SpotPrice"])
    assert rec.zones == ()
    assert (rec.accelerator_name, rec.accelerator_count) == ("A100-80GB", 1)
    assert rec.accelerator is not None and rec.accelerator.memory_gb == 80


@needs_raw
def test_azure_fractional_a10(cat: Catalog) -> None:
    r = next(x for x in raw("azure") if x["InstanceType"] == "Standard_NV6ads_A10_v5")
    rec = cat.get("azure", r["Region"], "Standard_NV6ads_A10_v5")
    assert rec.accelerator_count == pytest.approx(0.167)
    assert rec.on_demand_usd_per_hour == float(r["Price"])
    spec = raw_specs()["A10"][0]
    assert rec.total_accelerator_memory_gb == pytest.approx(0.167 * float(spec["memory_per_accel"]))
    assert rec.total_peak_tflops == pytest.approx(0.167 * float(spec["peak_dense_tflops"]))


@needs_raw
def test_azure_accelerator_without_spec(cat: Catalog) -> None:
    r = next(x for x in raw("azure") if x["AcceleratorName"] == "MI300X")
    rec = cat.get("azure", r["Region"], r["InstanceType"])
    assert rec.accelerator_name == "MI300X" and rec.accelerator_kind == "gpu"
    assert rec.accelerator is None
    assert rec.total_accelerator_memory_gb is None and rec.total_peak_tflops is None


# --- GCP ------------------------------------------------------------------------------


def assert_matches(rec: InstanceRecord, exp: dict[str, object]) -> None:
    assert rec.zones == exp["zones"]
    assert rec.on_demand_usd_per_hour == pytest.approx(exp["od"])
    assert rec.spot_usd_per_hour == approx_or_none(exp["spot"])  # type: ignore[arg-type]
    assert rec.spot_min_usd_per_hour == approx_or_none(exp["spot_min"])  # type: ignore[arg-type]
    assert rec.vcpus == exp["vcpus"]


@needs_raw
def test_gcp_g2_standard_4_is_host_plus_l4(cat: Catalog) -> None:
    exp = gcp_expected("us-central1", "g2-standard-4", "L4", 1)
    rec = cat.get("gcp", "us-central1", "g2-standard-4")
    assert_matches(rec, exp)
    host_only = max(float(x["Price"]) for x in rows("gcp", "us-central1", "g2-standard-4"))
    assert rec.on_demand_usd_per_hour > host_only  # the L4 is really added
    assert (rec.accelerator_name, rec.accelerator_count) == ("L4", 1)
    assert rec.gcp_accelerator_type == "nvidia-l4"


@needs_raw
@pytest.mark.parametrize(
    "host,acc,count",
    [("g2-standard-24", "L4", 2), ("g2-standard-48", "L4", 4), ("g2-standard-96", "L4", 8)],
)
def test_gcp_g2_multi_gpu_counts(cat: Catalog, host: str, acc: str, count: int) -> None:
    rec = cat.get("gcp", "us-central1", host)
    assert rec.accelerator_count == count
    assert_matches(rec, gcp_expected("us-central1", host, acc, count))


@needs_raw
def test_gcp_a3_highgpu_8g_is_host_plus_8_h100(cat: Catalog) -> None:
    rec = cat.get("gcp", "us-central1", "a3-highgpu-8g")
    assert_matches(rec, gcp_expected("us-central1", "a3-highgpu-8g", "H100", 8))
    assert rec.accelerator_count == 8
    assert rec.accelerator is not None and rec.accelerator.variant == "H100 SXM 80GB"
    assert rec.gcp_accelerator_type == "nvidia-h100-80gb"
    assert rec.total_accelerator_memory_gb == 640


@needs_raw
@pytest.mark.parametrize(
    "host,acc,count,gcp_type",
    [
        ("a2-highgpu-1g", "A100", 1, "nvidia-tesla-a100"),
        ("a2-megagpu-16g", "A100", 16, "nvidia-tesla-a100"),
        ("a2-ultragpu-8g", "A100-80GB", 8, "nvidia-a100-80gb"),
        ("a3-highgpu-2g", "H100", 2, "nvidia-h100-80gb"),
        ("a3-edgegpu-8g-nolssd", "H100", 8, "nvidia-h100-80gb"),
        ("a3-ultragpu-8g", "H200", 8, "nvidia-h200-141gb"),
        ("g2-standard-32", "L4", 1, "nvidia-l4"),
    ],
)
def test_gcp_fixed_families_every_region(
    cat: Catalog, host: str, acc: str, count: int, gcp_type: str
) -> None:
    host_regions = {x["Region"] for x in raw("gcp") if x["InstanceType"] == host}
    acc_regions = {
        x["Region"]
        for x in raw("gcp")
        if x["AcceleratorName"] == acc and x["AcceleratorCount"] == str(count)
    }
    assert set(cat.regions("gcp", host)) == host_regions & acc_regions
    for region in host_regions & acc_regions:
        rec = cat.get("gcp", region, host)
        assert (rec.accelerator_name, rec.accelerator_count) == (acc, count)
        assert rec.gcp_accelerator_type == gcp_type
        assert_matches(rec, gcp_expected(region, host, acc, count))


@needs_raw
def test_gcp_a4_highgpu_8g_is_the_b200_row(cat: Catalog) -> None:
    (host,) = rows("gcp", "us-central1", "a4-highgpu-8g")
    (b200,) = rows("gcp", "us-central1", "", "B200", "8")
    assert float(host["Price"]) == 0
    rec = cat.get("gcp", "us-central1", "a4-highgpu-8g")
    assert rec.on_demand_usd_per_hour == float(b200["Price"])
    assert rec.spot_usd_per_hour == float(b200["SpotPrice"])
    assert (rec.accelerator_name, rec.accelerator_count) == ("B200", 8)


@needs_raw
def test_gcp_a3_megagpu_is_h100_sxm_named_mega(cat: Catalog) -> None:
    region = next(r for r in cat.regions("gcp", "a3-megagpu-8g"))
    rec = cat.get("gcp", region, "a3-megagpu-8g")
    assert rec.accelerator_name == "H100-MEGA"
    assert rec.accelerator is not None and rec.accelerator.variant == "H100 SXM 80GB"
    assert rec.gcp_accelerator_type == "nvidia-h100-mega-80gb"
    assert_matches(rec, gcp_expected(region, "a3-megagpu-8g", "H100-MEGA", 8))


@needs_raw
def test_gcp_fixed_host_without_addon_in_region_has_no_record(cat: Catalog) -> None:
    # asia-east1 lists an a3-megagpu-8g host but no H100-MEGA price: cannot be priced.
    assert list(rows("gcp", "asia-east1", "a3-megagpu-8g"))
    assert not list(rows("gcp", "asia-east1", "", "H100-MEGA", "8"))
    assert cat.find("gcp", "asia-east1", "a3-megagpu-8g") is None


@needs_raw
def test_gcp_join_zone_without_addon_spot_has_no_spot(cat: Catalog) -> None:
    # The H200 add-on has no spot price in some zones: host spot alone is not a price.
    checked = 0
    for region in cat.regions("gcp", "a3-ultragpu-8g"):
        acc_rows = list(rows("gcp", region, "", "H200", "8"))
        if any(not x["SpotPrice"] for x in acc_rows):
            assert all(x["SpotPrice"] for x in rows("gcp", region, "a3-ultragpu-8g"))
            exp = gcp_expected(region, "a3-ultragpu-8g", "H200", 8)
            rec = cat.get("gcp", region, "a3-ultragpu-8g")
            assert_matches(rec, exp)
            if exp["spot"] is None:
                assert rec.spot_usd_per_hour is None and rec.on_demand_usd_per_hour
            checked += 1
    assert checked, "test setup: expected an H200 zone without a spot price"


@needs_raw
def test_gcp_tpu_v5litepod_4_priced_whole(cat: Catalog) -> None:
    r = list(rows("gcp", "asia-east1", "", "tpu-v5litepod-4", "1"))
    rec = cat.get("gcp", "asia-east1", "tpu-v5litepod-4")
    assert rec.on_demand_usd_per_hour == max(float(x["Price"]) for x in r)
    assert rec.spot_usd_per_hour == statistics.median(float(x["SpotPrice"]) for x in r)
    assert rec.zones == tuple(sorted(x["AvailabilityZone"] for x in r))
    assert rec.accelerator_kind == "npu" and rec.accelerator_count == 4
    assert rec.accelerator is not None and rec.accelerator.name == "tpu-v5litepod"
    assert rec.vcpus is None and rec.memory_gib is None
    assert rec.gcp_accelerator_type == "v5litepod-4"
    spec = raw_specs()["tpu-v5litepod"][0]
    assert rec.total_peak_tflops == pytest.approx(4 * float(spec["peak_dense_tflops"]))


@needs_raw
def test_gcp_tpu_v5p_counts_tensorcores(cat: Catalog) -> None:
    region = next(x["Region"] for x in raw("gcp") if x["AcceleratorName"] == "tpu-v5p-8")
    rec = cat.get("gcp", region, "tpu-v5p-8")
    assert rec.accelerator_count == 4
    assert rec.accelerator is not None and rec.accelerator.name == "tpu-v5p"
    v4 = cat.get("gcp", "us-central2", "tpu-v4-8")
    assert v4.accelerator_count == 4 and v4.accelerator is None


@needs_raw
def test_gcp_duplicate_tpu_rows_count_once(cat: Catalog) -> None:
    dup = [
        x for x in raw("gcp") if x["AcceleratorName"] == "tpu-v4-8" and x["Region"] == "us-central2"
    ]
    assert len(dup) == 2 and dup[0] == dup[1]  # the source really has the row twice
    rec = cat.get("gcp", "us-central2", "tpu-v4-8")
    assert rec.zones == (dup[0]["AvailabilityZone"],)


@needs_raw
def test_gcp_n1_composite(cat: Catalog) -> None:
    rec = cat.get("gcp", "us-central1", "n1-standard-8+T4x1")
    assert_matches(rec, gcp_expected("us-central1", "n1-standard-8", "T4", 1))
    assert (rec.accelerator_name, rec.accelerator_count) == ("T4", 1)
    assert rec.gcp_accelerator_type == "nvidia-tesla-t4"
    assert rec.memory_gib == 30
    plain = cat.get("gcp", "us-central1", "n1-standard-8")
    assert plain.accelerator_kind == "cpu" and plain.accelerator is None


@needs_raw
def test_gcp_join_uses_only_zones_with_both_rows(cat: Catalog) -> None:
    hosts = {x["AvailabilityZone"] for x in rows("gcp", "europe-west3", "n1-standard-8")}
    t4 = {x["AvailabilityZone"] for x in rows("gcp", "europe-west3", "", "T4", "1")}
    assert t4 < hosts  # the host is in more zones than the GPU
    rec = cat.get("gcp", "europe-west3", "n1-standard-8+T4x1")
    assert rec.zones == tuple(sorted(t4))
    assert_matches(rec, gcp_expected("europe-west3", "n1-standard-8", "T4", 1))


# GCP's documented max vCPUs per N1 GPU count, written out again here on purpose.
N1_LIMITS = {
    "T4": {1: 48, 2: 48, 4: 96},
    "V100": {1: 12, 2: 24, 4: 48, 8: 96},
    "P4": {1: 24, 2: 48, 4: 96},
    "P100": {1: 16, 2: 32, 4: 64},
}


@needs_raw
def test_gcp_every_n1_composite(cat: Catalog) -> None:
    zones: dict[tuple[str, str], set[str]] = defaultdict(set)
    vcpus: dict[str, float] = {}
    for x in raw("gcp"):
        if x["InstanceType"].startswith("n1-standard-"):
            zones[(x["Region"], x["InstanceType"])].add(x["AvailabilityZone"])
            vcpus[x["InstanceType"]] = float(x["vCPUs"])
        elif x["AcceleratorName"] in N1_LIMITS:
            key = f"{x['AcceleratorName']}x{x['AcceleratorCount']}"
            zones[(x["Region"], key)].add(x["AvailabilityZone"])
    expected = set()
    for (region, host), host_zones in zones.items():
        if not host.startswith("n1-"):
            continue
        for acc, limits in N1_LIMITS.items():
            for count, limit in limits.items():
                if vcpus[host] <= limit and host_zones & zones.get(
                    (region, f"{acc}x{count}"), set()
                ):
                    expected.add((region, f"{host}+{acc}x{count}"))
    got = {(r.region, r.instance_type) for r in cat.records("gcp") if "+" in r.instance_type}
    assert got == expected
    for region, itype in sorted(expected):
        host, _, gpu = itype.partition("+")
        acc, _, count = gpu.partition("x")
        rec = cat.get("gcp", region, itype)
        assert (rec.accelerator_name, rec.accelerator_count) == (acc, int(count))
        assert_matches(rec, gcp_expected(region, host, acc, int(count)))


@needs_raw
def test_gcp_n1_vcpu_limit(cat: Catalog) -> None:
    v100_regions = {x["Region"] for x in raw("gcp") if x["AcceleratorName"] == "V100"}
    n1_16_regions = {x["Region"] for x in raw("gcp") if x["InstanceType"] == "n1-standard-16"}
    both = v100_regions & n1_16_regions
    assert both  # the combination would be possible if the limit were ignored
    assert cat.regions("gcp", "n1-standard-16+V100x1") == []
    assert all(cat.find("gcp", r, "n1-standard-16+V100x1") is None for r in both)
    # ...while the limits allow 8 vCPUs with one V100 and 16 with two
    assert cat.regions("gcp", "n1-standard-8+V100x1")
    assert cat.regions("gcp", "n1-standard-16+V100x2")
    assert cat.regions("gcp", "n1-standard-96+T4x4")
    assert cat.regions("gcp", "n1-standard-64+T4x1") == []


@needs_raw
def test_gcp_spot_above_on_demand_is_preserved(cat: Catalog) -> None:
    inverted = [
        x
        for x in raw("gcp")
        if x["AcceleratorName"].startswith("tpu-")
        and x["SpotPrice"]
        and float(x["SpotPrice"]) > float(x["Price"])
    ]
    assert inverted, "test setup: the source has TPU rows with spot above on-demand"
    for x in inverted:
        rec = cat.get("gcp", x["Region"], x["AcceleratorName"])
        assert rec.on_demand_usd_per_hour == float(x["Price"])
        assert rec.spot_usd_per_hour == float(x["SpotPrice"])
        assert rec.spot_usd_per_hour > rec.on_demand_usd_per_hour


@needs_raw
def test_gcp_cpu_records(cat: Catalog) -> None:
    r = list(rows("gcp", "us-central1", "e2-standard-4"))
    rec = cat.get("gcp", "us-central1", "e2-standard-4")
    assert rec.accelerator_kind == "cpu" and rec.accelerator_count == 0
    assert rec.accelerator_name is None and rec.gcp_accelerator_type is None
    assert rec.on_demand_usd_per_hour == max(float(x["Price"]) for x in r)
    assert rec.zones == tuple(sorted(x["AvailabilityZone"] for x in r))


# --- specs and units --------------------------------------------------------------------


@needs_raw
def test_inferentia2_gib_converted_to_gb(cat: Catalog) -> None:
    (row,) = raw_specs()["Inferentia2"]
    assert (row["memory_unit"], row["mem_bandwidth_unit"]) == ("GiB", "GiB/s")
    spec = cat.accelerator("Inferentia2")
    assert spec is not None and spec.kind == "npu"
    assert spec.memory_gb == pytest.approx(float(row["memory_per_accel"]) * GIB)
    assert spec.memory_bandwidth_gbps == pytest.approx(float(row["mem_bandwidth"]) * GIB)
    assert spec.memory_gb > float(row["memory_per_accel"])
    rec = cat.get("aws", "us-east-1", "inf2.48xlarge")
    assert rec.accelerator_count == 12
    assert rec.total_accelerator_memory_gb == pytest.approx(12 * 32 * GIB)


@needs_raw
def test_trainium2_mixed_units(cat: Catalog) -> None:
    (row,) = raw_specs()["Trainium2"]
    spec = cat.accelerator("Trainium2")
    assert spec is not None
    assert spec.memory_gb == pytest.approx(float(row["memory_per_accel"]) * GIB)  # GiB
    assert spec.memory_bandwidth_gbps == pytest.approx(float(row["mem_bandwidth"]))  # GB/s


@needs_raw
def test_h100_variant_by_sku(cat: Catalog) -> None:
    sxm, pcie = raw_specs()["H100"]
    assert "SXM" in sxm["variant"] and "PCIe" in pcie["variant"]

    def variant(cloud: str, region: str, itype: str) -> str:
        spec = cat.get(cloud, region, itype).accelerator
        assert spec is not None
        return spec.variant

    assert variant("azure", "eastus", "Standard_NC40ads_H100_v5") == pcie["variant"]
    assert variant("azure", "eastus", "Standard_NC80adis_H100_v5") == pcie["variant"]
    assert variant("azure", "eastus2", "Standard_NCC40ads_H100_v5") == pcie["variant"]
    assert variant("azure", "eastus", "Standard_ND96isr_H100_v5") == sxm["variant"]
    aws_region = cat.regions("aws", "p5.48xlarge")[0]
    assert variant("aws", aws_region, "p5.48xlarge") == sxm["variant"]
    assert variant("gcp", "us-central1", "a3-highgpu-1g") == sxm["variant"]
    rec = cat.get("azure", "eastus", "Standard_NC40ads_H100_v5")
    assert rec.total_memory_bandwidth_gbps == float(pcie["mem_bandwidth"])
    assert cat.accelerator("H100") == cat.accelerator(sxm["variant"])
    assert cat.accelerator("H100 PCIe 80GB") is not None
    assert cat.accelerator("H100 PCIe 80GB") != cat.accelerator("H100")


@needs_raw
def test_every_spec_row_loaded(cat: Catalog) -> None:
    for name, spec_rows in raw_specs().items():
        for row in spec_rows:
            spec = cat.accelerator(row["variant"])
            assert isinstance(spec, AcceleratorSpec) and spec.name == name
            assert spec.peak_tflops == float(row["peak_dense_tflops"])
            assert spec.source == row["source"]


def test_accelerator_kinds(cat: Catalog) -> None:
    assert cat.get("aws", "us-east-1", "inf2.xlarge").accelerator_kind == "npu"
    assert cat.get("aws", "us-east-1", "trn1.2xlarge").accelerator_kind == "npu"
    assert cat.get("aws", "us-east-1", "g4dn.xlarge").accelerator_kind == "gpu"
    m7g = cat.get("aws", "us-east-1", "m7g.large")
    assert (m7g.accelerator_kind, m7g.accelerator_name, m7g.accelerator_count) == ("cpu", None, 0)
    assert cat.accelerator("nope") is None


# --- API --------------------------------------------------------------------------------


def test_misspelt_type_suggests_the_right_one(cat: Catalog) -> None:
    with pytest.raises(CatalogLookupError) as info:
        cat.get("aws", "us-east-1", "g5.xlarg")
    msg = str(info.value)
    assert "g5.xlarge" in msg and "did you mean" in msg
    assert "\n" not in msg and not msg.startswith(("'", '"'))
    assert isinstance(info.value, KeyError)
    assert "g5.xlarge" in info.value.suggestions
    with pytest.raises(CatalogLookupError, match="Standard_NC24ads_A100_v4"):
        cat.get("azure", "eastus", "standard_nc24ads_a100_v4")


@needs_raw
def test_wrong_region_lists_valid_regions(cat: Catalog) -> None:
    expected = sorted({x["Region"] for x in raw("aws") if x["InstanceType"] == "p5.48xlarge"})
    with pytest.raises(CatalogLookupError) as info:
        cat.get("aws", "ap-south-1", "p5.48xlarge")
    msg = str(info.value)
    assert "ap-south-1" in msg and "\n" not in msg
    for region in expected:
        assert region in msg
    assert list(info.value.suggestions) == expected


def test_unknown_cloud(cat: Catalog) -> None:
    with pytest.raises(CatalogLookupError, match="unknown cloud 'awz'"):
        cat.get("awz", "us-east-1", "g5.xlarge")
    assert cat.find("awz", "us-east-1", "g5.xlarge") is None
    assert cat.find("aws", "us-east-1", "g5.xlarg") is None


@needs_raw
def test_regions(cat: Catalog) -> None:
    for cloud, itype in [
        ("aws", "g5.xlarge"),
        ("gcp", "a3-highgpu-8g"),
        ("azure", "Standard_NC40ads_H100_v5"),
    ]:
        expected = {x["Region"] for x in raw(cloud) if x["InstanceType"] == itype}
        got = cat.regions(cloud, itype)
        assert got == sorted(got)
        if cloud == "gcp":  # a region needs the host and the H100 add-on
            h100 = {x["Region"] for x in raw("gcp") if x["AcceleratorName"] == "H100"}
            expected &= h100
        assert set(got) == expected
    assert cat.regions("aws", "no-such-type") == []


@needs_raw
def test_records_filters(cat: Catalog) -> None:
    npu = list(cat.records(kind="npu"))
    assert all(r.accelerator_kind == "npu" for r in npu)
    types = {r.instance_type for r in npu}
    assert {"inf2.xlarge", "inf1.xlarge", "trn1.2xlarge", "tpu-v5litepod-4", "tpu-v6e-8"} <= types
    assert not any(r.instance_type.startswith(("g5.", "p5.")) for r in npu)
    tpu_rows = {
        (x["Region"], x["AcceleratorName"])
        for x in raw("gcp")
        if x["AcceleratorName"].startswith("tpu-")
    }
    assert {(r.region, r.instance_type) for r in cat.records("gcp", kind="npu")} == tpu_rows
    us = list(cat.records("gcp", "us-central1"))
    assert us and all(r.cloud == "gcp" and r.region == "us-central1" for r in us)
    assert sum(1 for _ in cat.records()) == len(cat)
    assert len(cat) == sum(sum(1 for _ in cat.records(c)) for c in ("aws", "gcp", "azure"))


def test_default_catalog_is_cached() -> None:
    assert default_catalog() is default_catalog()
    assert len(default_catalog()) > 0


def test_records_are_frozen(cat: Catalog) -> None:
    rec = cat.get("aws", "us-east-1", "g5.xlarge")
    with pytest.raises(AttributeError):
        rec.region = "x"  # type: ignore[misc]
    assert rec.key == ("aws", "us-east-1", "g5.xlarge")


def test_module_imports_no_cloud_sdks() -> None:
    code = (
        "import sys, runtime.catalog; "
        "print(','.join(m for m in ('pulumi', 'aiohttp', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True
    )
    assert out.stdout.strip() == ""


# --- packaged data ------------------------------------------------------------------------


@needs_raw
def test_packaged_data_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "build_catalog_data.py"),
            "--source",
            str(RAW_DIR),
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        check=True,
    )
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(CATALOG_FILES)
    for name in built:
        assert (tmp_path / name).read_bytes() == (PACKAGED_DIR / name).read_bytes(), (
            f"runtime/data/{name} is stale: run scripts/build_catalog_data.py"
        )


def test_packaged_data_size() -> None:
    total = sum((PACKAGED_DIR / name).stat().st_size for name in CATALOG_FILES)
    assert total < 1_000_000
    assert (PACKAGED_DIR / "README.md").is_file()
