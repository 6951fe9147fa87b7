"""What a load reports, whatever the warehouse."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadResult:
    """Outcome of loading one processed object generation."""

    table: str
    source_uri: str
    source_generation: int
    rows: int
    replaced_rows: int
    status: str  # "loaded" | "already_loaded" | "superseded"
