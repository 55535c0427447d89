#!/usr/bin/env python3
"""Regenerate runtime/data/*.csv from the raw price catalogs.

Reads ``prices_{aws,gcp,azure}.csv`` and ``accelerator_specs.csv`` from ``--source``
(default: ``../shared/data`` relative to the repository root) and writes to ``--out``
(default: ``runtime/data``):

- ``prices_<cloud>.csv``: the raw rows with exact duplicates dropped and the rows that are
  identical apart from ``AvailabilityZone`` merged into one row whose ``Zones`` column is
  the sorted, ``;``-joined zone list. Lossless: every zone's prices can be recovered.
  Sorted by region, instance type / add-on accelerator, count, so output is deterministic.
- ``accelerator_specs.csv``: copied byte for byte.

Then loads the written files with ``runtime.catalog.Catalog`` as a check. Run:

    .venv/bin/python scripts/build_catalog_data.py [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a plain script, scripts/ is sys.path[0]; the runtime package lives at the root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from runtime.catalog import (  # noqa: E402
    CLOUDS,
    GCP_ACCELERATOR_TYPES,
    GCP_FIXED_ACCELERATORS,
    GCP_N1_MAX_VCPUS,
    PRICE_COLUMNS,
    Catalog,
)

# The raw files have one row per availability zone; the packaged ones merge zones into `Zones`.
RAW_COLUMNS = (*PRICE_COLUMNS[:-1], "AvailabilityZone")
SPECS_FILE = "accelerator_specs.csv"
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "runtime" / "data"


def _count_key(text: str) -> float:
    return float(text) if text else -1.0


def compact(raw_path: Path) -> tuple[list[tuple[str, ...]], int]:
    """Compacted rows (PRICE_COLUMNS order) and the number of exact duplicates dropped."""
    with raw_path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = tuple(next(reader))
        if header != RAW_COLUMNS:
            raise SystemExit(f"{raw_path}: unexpected header {header}")
        rows = [tuple(r) for r in reader]
    unique = set(rows)
    duplicates = len(rows) - len(unique)
    zones: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for *fields, zone in unique:
        group = zones[tuple(fields)]  # created even for Azure's empty zone
        if zone:
            group.add(zone)
    out = [(*fields, ";".join(sorted(z))) for fields, z in zones.items()]
    # Region, type, accelerator, numeric count, then the rest as text: deterministic.
    out.sort(key=lambda r: (r[7], r[0], r[1], _count_key(r[2]), r[3:7], r[8]))
    return out, duplicates


def check_consistency(cloud: str, rows: list[tuple[str, ...]]) -> None:
    """Fail on data the loader would silently misread."""
    shape: dict[tuple[str, str, str], set[tuple[str, ...]]] = defaultdict(set)
    zone_seen: dict[tuple[str, ...], int] = defaultdict(int)
    for itype, acc, count, vcpus, mem, _price, _spot, region, zones in rows:
        key = (region, itype, "" if itype else f"{acc}x{count}")
        shape[key].add((acc, count, vcpus, mem) if itype else (vcpus, mem))
        for zone in zones.split(";") if zones else ():
            zone_seen[(*key, zone)] += 1
    bad = {k: v for k, v in shape.items() if len(v) > 1}
    if bad:
        raise SystemExit(f"{cloud}: hardware differs between zones of one record: {bad}")
    clash = [k for k, n in zone_seen.items() if n > 1]
    if clash:
        raise SystemExit(f"{cloud}: one zone has two different prices: {clash[:5]}")
    if cloud != "gcp":
        return
    attachable = {acc for acc, _ in GCP_FIXED_ACCELERATORS.values()} | set(GCP_N1_MAX_VCPUS)
    for itype, acc, *_ in rows:
        if not itype and not acc.startswith("tpu-") and acc not in attachable:
            raise SystemExit(f"gcp: add-on accelerator {acc!r} is used by no machine type")
        if not itype and not acc.startswith("tpu-") and acc not in GCP_ACCELERATOR_TYPES:
            raise SystemExit(f"gcp: no GCP accelerator type for {acc!r}")


def render(rows: list[tuple[str, ...]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PRICE_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def build(source: Path, out: Path, *, verbose: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for cloud in CLOUDS:
        raw = source / f"prices_{cloud}.csv"
        rows, duplicates = compact(raw)
        check_consistency(cloud, rows)
        text = render(rows)
        (out / f"prices_{cloud}.csv").write_text(text, encoding="utf-8")
        if verbose:
            print(
                f"{cloud}: {raw} -> {len(rows)} rows ({len(text) / 1024:.0f} KiB), "
                f"{duplicates} exact duplicate row(s) dropped"
            )
    shutil.copyfile(source / SPECS_FILE, out / SPECS_FILE)
    catalog = Catalog.load(out)
    if verbose:
        counts = {c: sum(1 for _ in catalog.records(c)) for c in CLOUDS}
        print(f"catalog check: {len(catalog)} records {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="raw data dir")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    missing = [
        name
        for name in (*(f"prices_{c}.csv" for c in CLOUDS), SPECS_FILE)
        if not (args.source / name).is_file()
    ]
    if missing:
        parser.error(f"{args.source}: missing {', '.join(missing)}")
    build(args.source, args.out, verbose=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
