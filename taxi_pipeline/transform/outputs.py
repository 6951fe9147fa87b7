"""Where the transform's outputs stand: which generation a write must find, and
when a source generation landed (so re-transforming it writes the same bytes)."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from taxi_pipeline.datasets.base import DatasetSpec
from taxi_pipeline.datasets.registry import DATASETS, spec_of_schema
from taxi_pipeline.lineage import NotAProcessedObject, source_of
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.storage import ObjectNotFound, ObjectStore


def landed_at(obj: ObjectRef) -> datetime | None:
    """When this source generation landed: the rows' `ingested_at`.

    Fixed per generation (GCS `timeCreated`; the local store's change time, which
    is its generation), unlike the transform's clock, so transforming the same
    generation again writes the same bytes. None (the transform's clock) only
    for a ref that carries no time at all.
    """
    stamp = obj.created or obj.updated
    return stamp.astimezone(UTC) if stamp is not None else None


class OutputSuperseded(RuntimeError):
    """An output already holds a newer generation of the source: this run is stale."""


def output_state(store: ObjectStore, name: str, source: ObjectRef) -> int:
    """The generation a write of output `name` must find (0: absent).

    Raises OutputSuperseded when the output was made from a newer generation of
    `source`: a slow run must not put older rows back over a newer run's files.
    The lineage comes from GCS custom metadata, else from the parquet footer.
    """
    try:
        current = store.ref(name)
    except ObjectNotFound:
        return 0
    try:
        source_uri, made_from = source_of(store, current)
    except (NotAProcessedObject, ObjectNotFound):
        return current.generation  # not ours, or gone: the precondition decides
    if source_uri == source.uri and made_from > source.generation:
        raise OutputSuperseded(
            f"{current.uri} holds generation {made_from} of {source.uri}, newer than "
            f"{source.generation}: the newer generation's run owns the outputs")
    return current.generation


def current_generation(store: ObjectStore, name: str) -> int | None:
    """The generation of `name` now, or None when there is no such object yet."""
    try:
        return store.ref(name).generation
    except ObjectNotFound:
        return None


def output_of(before: int | None, processed: ObjectRef) -> str:
    """`unchanged` when the processed object kept its generation, else `written`."""
    return "unchanged" if before is not None and processed.generation == before else "written"


def processed_spec(store: ObjectStore, obj: ObjectRef) -> DatasetSpec:
    """The dataset a processed object's rows are, from its footer's columns (not its
    name: a file named by no dataset got its dataset from its columns)."""
    with store.open_read(obj) as handle:
        try:
            schema = pq.read_schema(handle)
        except pa.ArrowInvalid as exc:
            raise NotAProcessedObject(f"{obj.uri} is not a readable parquet file ({exc}); "
                                      "only files written by the transform can be loaded"
                                      ) from exc
    spec = spec_of_schema(schema)
    if spec is None:
        raise NotAProcessedObject(
            f"{obj.uri} has the columns {', '.join(schema.names)}, which are no dataset's "
            f"canonical columns ({'/'.join(DATASETS)}): only files written by the transform "
            "can be loaded")
    return spec
