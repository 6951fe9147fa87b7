"""What a transform did, in words a person reads: the run's artifact table and the
completed event's account of which dataset and month the rows were checked against."""

from __future__ import annotations

from typing import Any

from taxi_pipeline.objects import ObjectRef, folder_year_of
from taxi_pipeline.transform.streaming import TransformStats


def month_text(month: tuple[int, int] | None) -> str | None:
    return f"{month[0]:04d}-{month[1]:02d}" if month else None


def what_was_used(stats: TransformStats, name: str) -> dict[str, Any]:
    """Dataset and month the rows were checked against, where each came from, and oddities.

    A name that does not follow the TLC pattern (or says month 13) leaves both
    to the file's columns and pickups; a name the data contradicts is flagged.
    """
    return {
        "taxi_type": stats.taxi_type, "taxi_type_source": stats.taxi_type_source,
        "dataset_from_schema": stats.dataset_from_schema,
        "dataset_conflict": stats.dataset_conflict,
        "month": month_text(stats.month), "month_source": stats.month_source,
        "month_from_data": month_text(stats.month_from_data),
        "month_share": round(stats.month_share, 4), "month_conflict": stats.month_conflict,
        "unparseable_cells": dict(stats.unparseable),
        "codes_nulled": dict(stats.codes_nulled),
        "row_groups_out": stats.row_groups_out,
        "folder_year_conflict": folder_year_conflict(stats, name),
    }


def folder_year_conflict(stats: TransformStats, name: str) -> bool:
    """A year folder (`raw/yellow/2024/`) that the month the rows were checked against
    contradicts: 2025 data filed under 2024 loads, but not without a word."""
    year = folder_year_of(name)
    return year is not None and stats.month is not None and stats.month[0] != year


def summary_rows(obj: ObjectRef, stats: TransformStats) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"measure": "rows in", "rows": stats.rows_in},
        {"measure": "rows out (processed)", "rows": stats.rows_out},
        {"measure": "rows rejected", "rows": stats.rows_rejected},
    ]
    rows += [{"measure": f"rejected: {reason}", "rows": count}
             for reason, count in stats.rejected.most_common()]
    rows += [{"measure": f"unparseable cells: {column}", "rows": count}
             for column, count in stats.unparseable.most_common()]
    rows += [{"measure": f"'unknown' code set to null: {column}", "rows": count}
             for column, count in stats.codes_nulled.most_common()]
    rows.append({"measure": f"dataset {stats.taxi_type} (from the {stats.taxi_type_source})"
                 + (", the columns say otherwise" if stats.dataset_conflict else ""),
                 "rows": stats.rows_in})
    month = month_text(stats.month) or "none"
    rows.append({"measure": f"month {month} (from the {stats.month_source or 'nothing'})"
                 + (f", but most pickups are in {month_text(stats.month_from_data)}"
                    if stats.month_conflict else ""),
                 "rows": round(stats.month_share * stats.rows_in)})
    return rows
