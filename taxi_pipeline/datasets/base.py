"""What one TLC dataset is to the pipeline: a `DatasetSpec`.

Everything dataset-specific lives in a spec (its canonical columns, the source
spellings of each across the years, the columns a file must have, the quality
rules and the target table), so flows, the bridge and the automations never
name a dataset: adding a fifth is one new spec module registered in
`taxi_pipeline.datasets.registry`, and its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import pyarrow as pa

# Columns every table carries after the data columns: which TLC dataset the row
# came from (first) and which object generation it was made from (last three).
# `taxi_type` keeps the name the `trips` table has always had.
DATASET_COLUMN = pa.field("taxi_type", pa.string(), nullable=False)
LINEAGE_FIELDS = (
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("source_generation", pa.int64(), nullable=False),
    pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
)
LINEAGE_COLUMNS = (DATASET_COLUMN.name, *(f.name for f in LINEAGE_FIELDS))
REJECT_FIELDS = (
    pa.field("reject_reason", pa.string(), nullable=False),
    pa.field("reject_detail", pa.string()),
)

# (batch in canonical data columns, the file's (year, month) or None, the set of
# valid zone ids) -> [(rule name, mask of rows breaking it)], in precedence order.
Checks = Callable[[pa.RecordBatch, "tuple[int, int] | None", pa.Array],
                  "list[tuple[str, pa.Array]]"]


class SchemaMismatch(ValueError):
    """The file lacks required columns; it is quarantined, not half-loaded."""


@dataclass(frozen=True)
class DatasetSpec:
    """One TLC dataset: how its files look in every era and what a good row is.

    `source_names`: canonical column -> accepted source spellings, lower case
    (matching ignores case). `markers`: columns only this dataset's files have
    (any one names the dataset); `hints`: weaker ones, used when no marker
    decides; `not_with`: columns whose presence rules this dataset out.
    `reads_layouts_of`: datasets whose column layout this one's files may
    legitimately carry (the CSV mirror's fhvhv files are in the FHV layout), so
    a name and a layout that differ that way are no conflict.
    `uses_table_setting`: the target table is `Settings.table` (the `trips`
    table of yellow and green, configurable as it always was), else `table`.
    """

    name: str
    table: str
    data_fields: tuple[pa.Field, ...]
    source_names: Mapping[str, tuple[str, ...]]
    required: tuple[str, ...]
    checks: Checks
    rules: tuple[str, ...]
    markers: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()
    not_with: tuple[str, ...] = ()
    reads_layouts_of: tuple[str, ...] = ()
    null_codes: Mapping[str, int] = field(default_factory=dict)
    uses_table_setting: bool = False
    description: str = ""

    @cached_property
    def data_schema(self) -> pa.Schema:
        """The canonical data columns (no lineage): what `normalise` produces."""
        return pa.schema(list(self.data_fields))

    @cached_property
    def schema(self) -> pa.Schema:
        """The processed files' and the table's schema."""
        return pa.schema([DATASET_COLUMN, *self.data_fields, *LINEAGE_FIELDS])

    @cached_property
    def rejects_schema(self) -> pa.Schema:
        """The rejects files' schema: the canonical one plus reason and detail."""
        return pa.schema([*self.schema, *REJECT_FIELDS])

    @cached_property
    def reject_data_schema(self) -> pa.Schema:
        return pa.schema([*self.data_fields, *REJECT_FIELDS])

    def resolve_columns(self, names: list[str]) -> dict[str, str]:
        """Canonical column -> the file's column name, ignoring case.

        Raises SchemaMismatch naming the missing required columns and what the file has.
        """
        by_lower: dict[str, str] = {}
        for name in names:
            by_lower.setdefault(name.strip().lower(), name)
        mapping: dict[str, str] = {}
        for canonical, candidates in self.source_names.items():
            for candidate in candidates:
                if candidate in by_lower:
                    mapping[canonical] = by_lower[candidate]
                    break
        missing = [c for c in self.required if c not in mapping]
        if missing:
            wanted = ", ".join(f"{c} (one of {'/'.join(self.source_names[c])})"
                               for c in missing)
            raise SchemaMismatch(
                f"a {self.name} file needs the columns {wanted}; the file has: "
                f"{', '.join(names)}")
        return mapping
