"""Lineage of a processed object: which raw object generation it was made from.

The transform writes it into the parquet footer's key-value metadata; the load
and reconcile read it back (only the footer, never the rows).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from taxi_pipeline.events import EXTRA_SOURCE_GENERATION, EXTRA_SOURCE_URI
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.storage import ObjectStore

# Footer keys are the ObjectRef.extra / GCS metadata keys, so `lineage_of` maps one
# onto the other.
METADATA_SOURCE_URI = EXTRA_SOURCE_URI.encode()
METADATA_SOURCE_GENERATION = EXTRA_SOURCE_GENERATION.encode()


class NotAProcessedObject(ValueError):
    """The object lacks the lineage the transform writes; it was not made by it."""


def lineage_metadata(source_uri: str, source_generation: int) -> dict[bytes, bytes]:
    return {METADATA_SOURCE_URI: source_uri.encode(),
            METADATA_SOURCE_GENERATION: str(source_generation).encode()}


def lineage_extra(source: ObjectRef) -> dict[str, str]:
    """A processed object's lineage as `ObjectRef.extra` / GCS custom metadata."""
    return {EXTRA_SOURCE_URI: source.uri, EXTRA_SOURCE_GENERATION: str(source.generation)}


def lineage_of(metadata: dict[bytes, bytes] | None) -> dict[str, str]:
    """The lineage keys of footer metadata, as text (empty when there are none)."""
    found = {}
    for key in (METADATA_SOURCE_URI, METADATA_SOURCE_GENERATION):
        if metadata and key in metadata:
            found[key.decode()] = metadata[key].decode(errors="replace")
    return found


def read_lineage(store: ObjectStore, obj: ObjectRef) -> tuple[str, int]:
    """(source URI, source generation) from the parquet footer's key-value metadata."""
    with store.open_read(obj) as handle:
        try:
            metadata = pq.read_metadata(handle).metadata or {}
        except pa.ArrowInvalid as exc:  # not parquet, or truncated: it will never load
            raise NotAProcessedObject(
                f"{obj.uri} is not a readable parquet file ({exc}); only files written by "
                "the transform flow can be loaded") from exc
    try:
        return (metadata[METADATA_SOURCE_URI].decode(),
                int(metadata[METADATA_SOURCE_GENERATION]))
    except KeyError:
        raise NotAProcessedObject(
            f"{obj.uri} has no lineage metadata: only files written by the transform flow "
            "can be loaded. Put raw files under the raw prefix instead."
        ) from None


def source_of(store: ObjectStore, obj: ObjectRef) -> tuple[str, int]:
    """(source URI, source generation) from `obj.extra` when it carries them (GCS custom
    metadata, read with the object), else from the parquet footer."""
    uri, generation = obj.extra.get(EXTRA_SOURCE_URI), obj.extra.get(EXTRA_SOURCE_GENERATION)
    if uri is not None and generation is not None:
        return uri, int(generation)
    return read_lineage(store, obj)
