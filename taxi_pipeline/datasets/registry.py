"""Every dataset the pipeline handles, by name: the one list the rest of the code reads.

Flows, the bridge, the automations, the download and the status commands ask
this module (never a literal list), so a new TLC dataset is one spec module
added to `SPECS`.
"""

from __future__ import annotations

import pyarrow as pa

from taxi_pipeline.datasets.base import DatasetSpec
from taxi_pipeline.datasets.fhv import FHV
from taxi_pipeline.datasets.fhvhv import FHVHV
from taxi_pipeline.datasets.green import GREEN
from taxi_pipeline.datasets.yellow import YELLOW
from taxi_pipeline.objects import dataset_of

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (YELLOW, GREEN, FHV, FHVHV)}
DATASETS: tuple[str, ...] = tuple(SPECS)


class UnknownDataset(KeyError):
    """A dataset name no spec describes."""

    def __str__(self) -> str:
        return (f"unknown dataset {self.args[0]!r}: the pipeline handles "
                f"{', '.join(DATASETS)}")


def spec_for(dataset: str) -> DatasetSpec:
    try:
        return SPECS[dataset]
    except KeyError:
        raise UnknownDataset(dataset) from None


def table_for(dataset: str, trips_table: str = "trips") -> str:
    """The warehouse table of a dataset's rows; `trips_table` is `Settings.table`."""
    spec = spec_for(dataset)
    return trips_table if spec.uses_table_setting else spec.table


def tables(trips_table: str = "trips") -> dict[str, str]:
    """Dataset -> table, every dataset."""
    return {name: table_for(name, trips_table) for name in DATASETS}


def table_for_name(name: str, trips_table: str = "trips") -> str:
    """The table an object's rows go to, by the dataset its name says (raw, processed
    or rejects alike); `trips_table` when the name says none (the transform then took
    the dataset from the columns: yellow or green in all but odd cases)."""
    dataset = dataset_of(name)
    return table_for(dataset, trips_table) if dataset in SPECS else trips_table


def spec_of_schema(schema: pa.Schema) -> DatasetSpec | None:
    """The spec whose processed files have exactly these columns (a processed file's
    footer says which table it belongs to), or None."""
    for spec in SPECS.values():
        if spec.schema.names == schema.names:
            return spec
    return None


def spec_of_table(table: str, trips_table: str = "trips") -> DatasetSpec:
    """A spec whose rows `table` holds (the first, for `trips`)."""
    for name in DATASETS:
        if table_for(name, trips_table) == table:
            return SPECS[name]
    raise UnknownDataset(table)


def dataset_from_columns(names: list[str] | pa.Schema) -> str | None:
    """The dataset a file's columns say: the one spec whose markers it has (else whose
    hints), none of whose `not_with` columns are there. None when nothing or more than
    one dataset fits: the caller decides (from the name)."""
    present = {name.strip().lower() for name in names.names} if isinstance(
        names, pa.Schema) else {name.strip().lower() for name in names}
    candidates = [spec for spec in SPECS.values() if not present & set(spec.not_with)]
    for level in ("markers", "hints"):
        found = {spec.name for spec in candidates if present & set(getattr(spec, level))}
        if len(found) == 1:
            return found.pop()
        if found:
            return None
    return None


def layout_conflict(named: str, from_columns: str | None) -> bool:
    """The name says one dataset and the columns another, and the named dataset's files
    are not known to come in the other's layout."""
    if from_columns is None or from_columns == named:
        return False
    return from_columns not in spec_for(named).reads_layouts_of
