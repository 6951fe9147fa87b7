"""TLC's taxi zone lookup: the `zones` table and the ids the location rules accept.

Trips carry zone ids 1..265 that nobody can read without the lookup (borough,
zone name, service zone). The lookup ships with the package (TLC's current
`taxi_zone_lookup.csv`, 265 rows) and `TAXI_ZONES_FILE` can name a newer one;
the same file feeds the warehouse's `zones` table and the transform's
`unknown_location` rule, so a row the transform keeps always joins to a zone.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

ZONES_TABLE = "zones"
PACKAGED_ZONES = Path(__file__).with_name("data") / "taxi_zone_lookup.csv"

ZONES_SCHEMA = pa.schema([
    pa.field("location_id", pa.int32(), nullable=False),
    pa.field("borough", pa.string()),
    pa.field("zone", pa.string()),
    pa.field("service_zone", pa.string()),
])
# lookup column (lower case) -> table column
_COLUMNS = {"locationid": "location_id", "borough": "borough", "zone": "zone",
            "service_zone": "service_zone"}


class BadZoneLookup(ValueError):
    """The zone lookup file is not TLC's layout (LocationID,Borough,Zone,service_zone)."""


def zones_path(path: Path | None = None) -> Path:
    return Path(path) if path is not None else PACKAGED_ZONES


@lru_cache(maxsize=8)
def _read(path: Path) -> pa.Table:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise BadZoneLookup(f"cannot read the zone lookup {path}: {exc}; set TAXI_ZONES_FILE "
                            "to TLC's taxi_zone_lookup.csv or unset it") from exc
    if not rows:
        raise BadZoneLookup(f"the zone lookup {path} has no rows")
    header = {name.strip().lower(): name for name in rows[0]}
    missing = [name for name in _COLUMNS if name not in header]
    if missing:
        raise BadZoneLookup(f"the zone lookup {path} lacks {', '.join(missing)}; it has "
                            f"{', '.join(rows[0])} (TLC's layout: LocationID,Borough,Zone,"
                            "service_zone)")
    columns: dict[str, list[object]] = {target: [] for target in _COLUMNS.values()}
    for number, row in enumerate(rows, start=2):
        for source, target in _COLUMNS.items():
            value = (row[header[source]] or "").strip()
            if target == "location_id":
                if not value.isdigit():
                    raise BadZoneLookup(f"{path} line {number}: LocationID {value!r} is no id")
                columns[target].append(int(value))
            else:
                columns[target].append(value or None)
    if len(set(columns["location_id"])) != len(rows):
        raise BadZoneLookup(f"the zone lookup {path} repeats a LocationID")
    return pa.table(columns, schema=ZONES_SCHEMA)


def zone_table(path: Path | None = None) -> pa.Table:
    """The lookup as the `zones` table's rows."""
    return _read(zones_path(path).resolve())


def zone_ids(path: Path | None = None) -> pa.Array:
    """The valid zone ids (an int32 array for `pc.is_in`)."""
    return zone_table(path).column("location_id").combine_chunks()
