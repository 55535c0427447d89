"""Hardware and price catalog: what each cloud instance type is and what it costs.

This module owns the normalised view of the packaged price data in ``runtime/data/``:
one :class:`InstanceRecord` per (cloud, region, instance type) with its accelerators,
host size, on-demand and spot prices, and one :class:`AcceleratorSpec` per accelerator
(memory, memory bandwidth, dense 16-bit peak). Everything that plans, routes or costs a
fleet reads hardware facts and prices from here and nowhere else.

The CSVs in ``runtime/data/`` are regenerated from the raw SkyPilot-format catalogs by
``scripts/build_catalog_data.py``; ``runtime/data/README.md`` records their provenance.
The compacted price files keep one row per group of availability zones that share exactly
the same raw row, so nothing is lost and per-zone joins (GCP host + accelerator add-on)
stay exact.

Units: accelerator memory and bandwidth are decimal GB and GB/s (GiB figures in the spec
sheet are converted), host memory is GiB as in the source, prices are USD per hour for the
whole instance.
"""

from __future__ import annotations

import csv
import difflib
import functools
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal, cast, get_args

__all__ = [
    "AZURE_H100_PCIE_PATTERN",
    "CLOUDS",
    "GCP_ACCELERATOR_TYPES",
    "GCP_FIXED_ACCELERATORS",
    "GCP_N1_MAX_VCPUS",
    "PRICE_COLUMNS",
    "SPEC_ALIASES",
    "TPU_CORES_PER_CHIP",
    "AcceleratorKind",
    "AcceleratorSpec",
    "Catalog",
    "CatalogLookupError",
    "Cloud",
    "InstanceRecord",
    "accelerator_kind",
    "default_catalog",
]

Cloud = Literal["aws", "gcp", "azure"]
AcceleratorKind = Literal["gpu", "cpu", "npu"]

CLOUDS: tuple[Cloud, ...] = get_args(Cloud)

DATA_DIR: Path = Path(__file__).with_name("data")

#: Columns of the compacted ``prices_<cloud>.csv`` files. ``Zones`` is a ``;``-joined list
#: of the availability zones whose raw rows were identical apart from the zone.
PRICE_COLUMNS: tuple[str, ...] = (
    "InstanceType",
    "AcceleratorName",
    "AcceleratorCount",
    "vCPUs",
    "MemoryGiB",
    "Price",
    "SpotPrice",
    "Region",
    "Zones",
)

_GIB_IN_GB = 1.073741824

#: GCP machine types whose GPUs come with the machine type: type -> (accelerator, count).
#: The price data lists the host VM and the GPUs separately (the GPU rows have an empty
#: InstanceType), so a record's price is host + the add-on row for this accelerator and
#: count in the same zone. a4-highgpu-8g has host price 0: its whole price is the B200 row.
#: H100-MEGA is GCP's name for the H100 SXM 80GB in a3-megagpu (see SPEC_ALIASES).
GCP_FIXED_ACCELERATORS: Mapping[str, tuple[str, int]] = {
    "a2-highgpu-1g": ("A100", 1),
    "a2-highgpu-2g": ("A100", 2),
    "a2-highgpu-4g": ("A100", 4),
    "a2-highgpu-8g": ("A100", 8),
    "a2-megagpu-16g": ("A100", 16),
    "a2-ultragpu-1g": ("A100-80GB", 1),
    "a2-ultragpu-2g": ("A100-80GB", 2),
    "a2-ultragpu-4g": ("A100-80GB", 4),
    "a2-ultragpu-8g": ("A100-80GB", 8),
    "a3-highgpu-1g": ("H100", 1),
    "a3-highgpu-2g": ("H100", 2),
    "a3-highgpu-4g": ("H100", 4),
    "a3-highgpu-8g": ("H100", 8),
    "a3-edgegpu-8g": ("H100", 8),
    "a3-edgegpu-8g-nolssd": ("H100", 8),
    "a3-megagpu-8g": ("H100-MEGA", 8),
    "a3-ultragpu-8g": ("H200", 8),
    "a3-ultragpu-8g-nolssd": ("H200", 8),
    "a4-highgpu-8g": ("B200", 8),
    "g2-standard-4": ("L4", 1),
    "g2-standard-8": ("L4", 1),
    "g2-standard-12": ("L4", 1),
    "g2-standard-16": ("L4", 1),
    "g2-standard-24": ("L4", 2),
    "g2-standard-32": ("L4", 1),
    "g2-standard-48": ("L4", 4),
    "g2-standard-96": ("L4", 8),
}

#: GPUs attachable to N1 hosts: accelerator -> {GPU count: max host vCPUs}. GCP refuses
#: an N1 host with more vCPUs than this for the GPU count, so those combinations get no
#: composite record. Counts not listed here are not offered on N1.
GCP_N1_MAX_VCPUS: Mapping[str, Mapping[int, int]] = {
    "T4": {1: 48, 2: 48, 4: 96},
    "V100": {1: 12, 2: 24, 4: 48, 8: 96},
    "P4": {1: 24, 2: 48, 4: 96},
    "P100": {1: 16, 2: 32, 4: 64},
}

#: Catalog accelerator name -> GCP guest-accelerator type (what Pulumi's
#: ``guestAccelerators[].type`` takes).
GCP_ACCELERATOR_TYPES: Mapping[str, str] = {
    "A100": "nvidia-tesla-a100",
    "A100-80GB": "nvidia-a100-80gb",
    "H100": "nvidia-h100-80gb",
    "H100-MEGA": "nvidia-h100-mega-80gb",
    "H200": "nvidia-h200-141gb",
    "B200": "nvidia-b200",
    "L4": "nvidia-l4",
    "T4": "nvidia-tesla-t4",
    "V100": "nvidia-tesla-v100",
    "P4": "nvidia-tesla-p4",
    "P100": "nvidia-tesla-p100",
}

#: TPU family -> TensorCores per chip. Slice names count chips for v5e/v6e but
#: TensorCores for v2/v3/v4/v5p (two per chip), e.g. tpu-v5p-8 is 4 chips.
TPU_CORES_PER_CHIP: Mapping[str, int] = {
    "v5litepod": 1,
    "v6e": 1,
    "v5p": 2,
    "v2": 2,
    "v3": 2,
    "v4": 2,
}

#: Accelerator names with no spec row of their own -> the spec variant they are.
SPEC_ALIASES: Mapping[str, str] = {"H100-MEGA": "H100 SXM 80GB"}

#: Azure NC-family H100 sizes use PCIe-form-factor cards; every other H100 SKU in the
#: catalogs (AWS p5, GCP a3, Azure ND H100 v5) is SXM.
AZURE_H100_PCIE_PATTERN = "Standard_NC*H100*"
_H100_SXM = "H100 SXM 80GB"
_H100_PCIE = "H100 PCIe 80GB"

_TPU_SLICE = re.compile(r"^tpu-(?P<family>[a-z0-9]+)-(?P<size>\d+)$")
_GCP_CPU_HOST = re.compile(r"^(?:n1|e2|n2|c3)-standard-\d+$")
_N1_HOST = re.compile(r"^n1-standard-\d+$")
_NPU_PREFIXES = ("inferentia", "trainium", "tpu-")


def accelerator_kind(name: str | None) -> AcceleratorKind:
    """Kind of an accelerator name: npu for Inferentia/Trainium/TPU, cpu for none, else gpu."""
    if not name:
        return "cpu"
    return "npu" if name.lower().startswith(_NPU_PREFIXES) else "gpu"


@dataclass(frozen=True, slots=True)
class AcceleratorSpec:
    """Datasheet figures for one accelerator (per accelerator, not per instance)."""

    name: str  # catalog name, e.g. "H100", "tpu-v5litepod", "Inferentia2"
    variant: str  # e.g. "H100 SXM 80GB"
    kind: AcceleratorKind
    memory_gb: float  # decimal GB
    memory_bandwidth_gbps: float  # decimal GB/s
    peak_tflops: float  # dense 16-bit
    source: str


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One purchasable instance type in one region, with its hardware and prices."""

    cloud: Cloud
    region: str
    instance_type: str
    accelerator_name: str | None
    accelerator_kind: AcceleratorKind
    accelerator_count: float  # fractional for shared GPUs; chips for TPU slices
    accelerator: AcceleratorSpec | None
    vcpus: float | None
    memory_gib: float | None
    on_demand_usd_per_hour: float | None  # whole instance; GCP: host + accelerators
    spot_usd_per_hour: float | None  # median over zones with a spot price
    spot_min_usd_per_hour: float | None  # cheapest zone
    zones: tuple[str, ...]  # sorted; empty for Azure
    gcp_accelerator_type: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.cloud, self.region, self.instance_type)

    @property
    def total_accelerator_memory_gb(self) -> float | None:
        if self.accelerator is None:
            return None
        return self.accelerator_count * self.accelerator.memory_gb

    @property
    def total_memory_bandwidth_gbps(self) -> float | None:
        if self.accelerator is None:
            return None
        return self.accelerator_count * self.accelerator.memory_bandwidth_gbps

    @property
    def total_peak_tflops(self) -> float | None:
        if self.accelerator is None:
            return None
        return self.accelerator_count * self.accelerator.peak_tflops


class CatalogLookupError(KeyError):
    """An instance type, region or cloud that the catalog does not have.

    ``str()`` is a one-line message for humans, with close matches where there are any.
    """

    def __init__(
        self,
        message: str,
        *,
        cloud: str,
        region: str | None = None,
        instance_type: str | None = None,
        suggestions: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.cloud = cloud
        self.region = region
        self.instance_type = instance_type
        self.suggestions: tuple[str, ...] = tuple(suggestions)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message, quotes and all.
        return self.message


# --- loading -------------------------------------------------------------------------

# One availability-zone observation: (zone or "" for Azure, on-demand, spot).
_Obs = tuple[str, float | None, float | None]


@dataclass(slots=True)
class _Group:
    """Raw rows for one (region, instance type) or (region, add-on accelerator, count)."""

    accelerator_name: str
    accelerator_count: float | None
    vcpus: float | None
    memory_gib: float | None
    obs: list[_Obs]


def _num(text: str) -> float | None:
    return float(text) if text else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _price_stats(obs: list[_Obs]) -> tuple[float | None, float | None, float | None]:
    """(on-demand max, spot median, spot min) over zone observations."""
    on_demand = [p for _, p, _ in obs if p is not None]
    spot = [s for _, _, s in obs if s is not None]
    return (max(on_demand, default=None), _median(spot), min(spot, default=None))


def _zones(obs: Iterable[_Obs]) -> tuple[str, ...]:
    return tuple(sorted({zone for zone, _, _ in obs if zone}))


def _read_prices(path: Path) -> dict[tuple[str, str, str], _Group]:
    """Group a compacted price file by (region, InstanceType, add-on key).

    For host/instance rows the add-on key is ""; for GCP add-on rows (empty
    InstanceType) it is ``"{AcceleratorName}x{AcceleratorCount}"`` so that each priced
    count stays its own group.
    """
    groups: dict[tuple[str, str, str], _Group] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if tuple(header) != PRICE_COLUMNS:
            raise ValueError(f"{path}: unexpected header {header}; expected {PRICE_COLUMNS}")
        for itype, acc, count, vcpus, mem, price, spot, region, zones in reader:
            addon = "" if itype else f"{acc}x{count}"
            key = (region, itype, addon)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(acc, _num(count), _num(vcpus), _num(mem), [])
            on_demand, spot_price = _num(price), _num(spot)
            # An empty Zones cell (Azure) is still one observation.
            for zone in zones.split(";") if zones else ("",):
                group.obs.append((zone, on_demand, spot_price))
    return groups


def _read_specs(path: Path) -> list[AcceleratorSpec]:
    to_gb = {"GB": 1.0, "GiB": _GIB_IN_GB}
    to_gbps = {"GB/s": 1.0, "GiB/s": _GIB_IN_GB}
    specs = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = row["AcceleratorName"]
            try:
                mem_scale = to_gb[row["memory_unit"]]
                bw_scale = to_gbps[row["mem_bandwidth_unit"]]
            except KeyError as exc:
                raise ValueError(f"{path}: {name}: unknown unit {exc}") from None
            specs.append(
                AcceleratorSpec(
                    name=name,
                    variant=row["variant"],
                    kind=accelerator_kind(name),
                    memory_gb=float(row["memory_per_accel"]) * mem_scale,
                    memory_bandwidth_gbps=float(row["mem_bandwidth"]) * bw_scale,
                    peak_tflops=float(row["peak_dense_tflops"]),
                    source=row["source"],
                )
            )
    return specs


def _round_sum(a: float, b: float) -> float:
    # Host + add-on sums carry binary noise (0.70683 + 0.28 = 0.9868299999999999);
    # source prices have at most 6 decimals, so 9 keeps the truth and drops the noise.
    return round(a + b, 9)


def _join_zones(host: list[_Obs], addon: list[_Obs]) -> list[_Obs]:
    """Per-zone host + add-on prices over the zones present in both."""
    by_zone = {zone: (p, s) for zone, p, s in addon}
    joined: list[_Obs] = []
    for zone, host_price, host_spot in host:
        if zone not in by_zone:
            continue
        acc_price, acc_spot = by_zone[zone]
        price = (
            None if host_price is None or acc_price is None else _round_sum(host_price, acc_price)
        )
        spot = None if host_spot is None or acc_spot is None else _round_sum(host_spot, acc_spot)
        joined.append((zone, price, spot))
    return joined


class Catalog:
    """Instance records and accelerator specs, indexed for O(1) lookup."""

    def __init__(
        self, records: Iterable[InstanceRecord], specs: Iterable[AcceleratorSpec] = ()
    ) -> None:
        ordered = sorted(records, key=lambda r: r.key)
        self._records: tuple[InstanceRecord, ...] = tuple(ordered)
        self._by_key: dict[tuple[str, str, str], InstanceRecord] = {}
        regions: dict[tuple[str, str], list[str]] = defaultdict(list)
        cloud_regions: dict[str, set[str]] = defaultdict(set)
        for rec in ordered:
            if rec.key in self._by_key:
                raise ValueError(f"duplicate catalog record {rec.key}")
            self._by_key[rec.key] = rec
            regions[(rec.cloud, rec.instance_type)].append(rec.region)
            cloud_regions[rec.cloud].add(rec.region)
        self._regions: dict[tuple[str, str], tuple[str, ...]] = {
            k: tuple(v) for k, v in regions.items()
        }
        self._types: dict[str, tuple[str, ...]] = {
            cloud: tuple(sorted({t for c, t in self._regions if c == cloud})) for cloud in CLOUDS
        }
        self._cloud_regions = {c: tuple(sorted(v)) for c, v in cloud_regions.items()}
        self._specs: dict[str, AcceleratorSpec] = _index_specs(specs)

    # --- construction ---------------------------------------------------------------

    @classmethod
    def load(cls, data_dir: Path | None = None) -> Catalog:
        """Load ``prices_{aws,gcp,azure}.csv`` and ``accelerator_specs.csv`` from data_dir.

        data_dir defaults to the packaged ``runtime/data``.
        """
        data_dir = DATA_DIR if data_dir is None else Path(data_dir)
        specs = _read_specs(data_dir / "accelerator_specs.csv")
        index = _index_specs(specs)
        records: list[InstanceRecord] = []
        for cloud in ("aws", "azure"):
            groups = _read_prices(data_dir / f"prices_{cloud}.csv")
            records.extend(_plain_records(cast(Cloud, cloud), groups, index))
        records.extend(_gcp_records(_read_prices(data_dir / "prices_gcp.csv"), index))
        return cls(records, specs)

    # --- lookup -----------------------------------------------------------------------

    def get(self, cloud: str, region: str, instance_type: str) -> InstanceRecord:
        """The record for (cloud, region, instance_type); raises CatalogLookupError."""
        rec = self._by_key.get((cloud, region, instance_type))
        if rec is None:
            raise self._lookup_error(cloud, region, instance_type)
        return rec

    def find(self, cloud: str, region: str, instance_type: str) -> InstanceRecord | None:
        """Like get(), but None when there is no such record."""
        return self._by_key.get((cloud, region, instance_type))

    def regions(self, cloud: str, instance_type: str) -> list[str]:
        """Sorted regions where cloud offers instance_type (empty if none)."""
        self._check_cloud(cloud)
        return list(self._regions.get((cloud, instance_type), ()))

    def records(
        self,
        cloud: str | None = None,
        region: str | None = None,
        kind: AcceleratorKind | None = None,
    ) -> Iterator[InstanceRecord]:
        """Records matching every given filter, ordered by (cloud, region, instance type)."""
        if cloud is not None:
            self._check_cloud(cloud)
        for rec in self._records:
            if cloud is not None and rec.cloud != cloud:
                continue
            if region is not None and rec.region != region:
                continue
            if kind is not None and rec.accelerator_kind != kind:
                continue
            yield rec

    def instance_types(self, cloud: str) -> list[str]:
        """Sorted instance types known for cloud (any region)."""
        self._check_cloud(cloud)
        return list(self._types[cloud])

    def accelerator(self, name: str) -> AcceleratorSpec | None:
        """Spec by catalog name ("H100" is the SXM part) or by variant ("H100 PCIe 80GB")."""
        return self._specs.get(name)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[InstanceRecord]:
        return iter(self._records)

    def __repr__(self) -> str:
        return f"<Catalog {len(self)} records>"

    # --- errors -----------------------------------------------------------------------

    def _check_cloud(self, cloud: str) -> None:
        if cloud not in CLOUDS:
            raise CatalogLookupError(
                f"unknown cloud {cloud!r}; expected one of: {', '.join(CLOUDS)}",
                cloud=cloud,
                suggestions=difflib.get_close_matches(cloud.lower(), CLOUDS, n=1),
            )

    def _lookup_error(self, cloud: str, region: str, instance_type: str) -> CatalogLookupError:
        self._check_cloud(cloud)
        where = self._regions.get((cloud, instance_type))
        if where:
            hint = difflib.get_close_matches(region, where, n=1, cutoff=0.75)
            shown = ", ".join(where) if len(where) <= 20 else ", ".join(where[:20]) + ", ..."
            msg = (
                f"{cloud} {instance_type} is not offered in region {region!r}"
                + (f" (did you mean {hint[0]}?)" if hint else "")
                + f"; it is in {len(where)} region(s): {shown}"
            )
            return CatalogLookupError(
                msg, cloud=cloud, region=region, instance_type=instance_type, suggestions=where
            )
        close = _close_matches(instance_type, self._types[cloud])
        msg = f"no {cloud} instance type {instance_type!r} in the catalog"
        if close:
            msg += f"; did you mean {', '.join(close)}?"
        else:
            msg += f" ({len(self._types[cloud])} known {cloud} types)"
        return CatalogLookupError(
            msg, cloud=cloud, region=region, instance_type=instance_type, suggestions=close
        )


def _close_matches(word: str, candidates: Iterable[str]) -> list[str]:
    # Case-insensitive so "standard_nc24ads_a100_v4" still finds the Azure name.
    lowered: dict[str, str] = {}
    for c in candidates:
        lowered.setdefault(c.lower(), c)
    return [lowered[m] for m in difflib.get_close_matches(word.lower(), lowered, n=3, cutoff=0.6)]


# --- normalisation -----------------------------------------------------------------------


def _index_specs(specs: Iterable[AcceleratorSpec]) -> dict[str, AcceleratorSpec]:
    """Specs by catalog name and by variant; H100 by name is the SXM part."""
    index: dict[str, AcceleratorSpec] = {}
    for spec in specs:
        index.setdefault(spec.name, spec)
        index[spec.variant] = spec
    if _H100_SXM in index:
        index["H100"] = index[_H100_SXM]
    for alias, variant in SPEC_ALIASES.items():
        if variant in index:
            index.setdefault(alias, index[variant])
    return index


def _spec_for(
    cloud: Cloud, instance_type: str, accelerator_name: str, specs: Mapping[str, AcceleratorSpec]
) -> AcceleratorSpec | None:
    if (
        accelerator_name == "H100"
        and cloud == "azure"
        and fnmatchcase(instance_type, AZURE_H100_PCIE_PATTERN)
    ):
        return specs[_H100_PCIE]
    return specs.get(accelerator_name)


def _plain_records(
    cloud: Cloud,
    groups: Mapping[tuple[str, str, str], _Group],
    specs: Mapping[str, AcceleratorSpec],
) -> Iterator[InstanceRecord]:
    """AWS and Azure: one record per (region, InstanceType), prices over its zones."""
    for (region, itype, addon), g in groups.items():
        if addon:
            raise ValueError(f"{cloud}: row without InstanceType in {region}")
        acc = g.accelerator_name or None
        on_demand, spot, spot_min = _price_stats(g.obs)
        yield InstanceRecord(
            cloud=cloud,
            region=region,
            instance_type=itype,
            accelerator_name=acc,
            accelerator_kind=accelerator_kind(acc),
            accelerator_count=(g.accelerator_count or 0.0) if acc else 0.0,
            accelerator=_spec_for(cloud, itype, acc, specs) if acc else None,
            vcpus=g.vcpus,
            memory_gib=g.memory_gib,
            on_demand_usd_per_hour=on_demand,
            spot_usd_per_hour=spot,
            spot_min_usd_per_hour=spot_min,
            zones=_zones(g.obs),
        )


def _gcp_records(
    groups: Mapping[tuple[str, str, str], _Group],
    specs: Mapping[str, AcceleratorSpec],
) -> Iterator[InstanceRecord]:
    """GCP: join hosts with add-on accelerator rows; TPU slices stand alone."""
    hosts: dict[str, dict[str, _Group]] = defaultdict(dict)  # region -> type -> group
    addons: dict[str, dict[tuple[str, int], _Group]] = defaultdict(dict)  # region -> (acc, n)
    for (region, itype, _), g in groups.items():
        if itype:
            hosts[region][itype] = g
        elif g.accelerator_name.startswith("tpu-"):
            yield _tpu_record(region, g, specs)
        else:
            count = g.accelerator_count
            if count is None or count != int(count):
                raise ValueError(f"gcp: add-on {g.accelerator_name} count {count!r} in {region}")
            addons[region][(g.accelerator_name, int(count))] = g

    def gpu_record(
        region: str, itype: str, host: _Group, acc: str, count: int, addon: _Group
    ) -> InstanceRecord | None:
        obs = _join_zones(host.obs, addon.obs)
        if not obs:
            return None
        on_demand, spot, spot_min = _price_stats(obs)
        return InstanceRecord(
            cloud="gcp",
            region=region,
            instance_type=itype,
            accelerator_name=acc,
            accelerator_kind=accelerator_kind(acc),
            accelerator_count=float(count),
            accelerator=_spec_for("gcp", itype, acc, specs),
            vcpus=host.vcpus,
            memory_gib=host.memory_gib,
            on_demand_usd_per_hour=on_demand,
            spot_usd_per_hour=spot,
            spot_min_usd_per_hour=spot_min,
            zones=_zones(obs),
            gcp_accelerator_type=GCP_ACCELERATOR_TYPES[acc],
        )

    for region, region_hosts in hosts.items():
        region_addons = addons.get(region, {})
        for itype, host in region_hosts.items():
            fixed = GCP_FIXED_ACCELERATORS.get(itype)
            if fixed is not None:
                addon = region_addons.get(fixed)
                rec = gpu_record(region, itype, host, *fixed, addon) if addon else None
                if rec is not None:
                    yield rec
                continue
            if not _GCP_CPU_HOST.match(itype):
                raise ValueError(
                    f"gcp: machine type {itype!r} is neither a known CPU family nor in "
                    "GCP_FIXED_ACCELERATORS"
                )
            on_demand, spot, spot_min = _price_stats(host.obs)
            yield InstanceRecord(
                cloud="gcp",
                region=region,
                instance_type=itype,
                accelerator_name=None,
                accelerator_kind="cpu",
                accelerator_count=0.0,
                accelerator=None,
                vcpus=host.vcpus,
                memory_gib=host.memory_gib,
                on_demand_usd_per_hour=on_demand,
                spot_usd_per_hour=spot,
                spot_min_usd_per_hour=spot_min,
                zones=_zones(host.obs),
            )
            if not _N1_HOST.match(itype) or host.vcpus is None:
                continue
            for (acc, count), addon in region_addons.items():
                limit = GCP_N1_MAX_VCPUS.get(acc, {}).get(count)
                if limit is None or host.vcpus > limit:
                    continue
                rec = gpu_record(region, f"{itype}+{acc}x{count}", host, acc, count, addon)
                if rec is not None:
                    yield rec


def _tpu_record(region: str, g: _Group, specs: Mapping[str, AcceleratorSpec]) -> InstanceRecord:
    slice_name = g.accelerator_name
    m = _TPU_SLICE.match(slice_name)
    if m is None or m["family"] not in TPU_CORES_PER_CHIP:
        raise ValueError(f"gcp: unrecognised TPU slice {slice_name!r}")
    family = m["family"]
    chips = int(m["size"]) / TPU_CORES_PER_CHIP[family]
    on_demand, spot, spot_min = _price_stats(g.obs)
    return InstanceRecord(
        cloud="gcp",
        region=region,
        instance_type=slice_name,
        accelerator_name=f"tpu-{family}",
        accelerator_kind="npu",
        accelerator_count=chips,
        accelerator=specs.get(f"tpu-{family}"),
        vcpus=None,
        memory_gib=None,
        on_demand_usd_per_hour=on_demand,
        spot_usd_per_hour=spot,
        spot_min_usd_per_hour=spot_min,
        zones=_zones(g.obs),
        gcp_accelerator_type=slice_name.removeprefix("tpu-"),
    )


@functools.cache
def default_catalog() -> Catalog:
    """The catalog of the packaged data, loaded once per process."""
    return Catalog.load()
