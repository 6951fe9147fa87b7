"""Backfill: download a range of TLC months into raw/, a few at once, and say how each ended.

`taxi-pipeline backfill` (no Prefect server needed) and the `backfill` flow both run
`run_backfill`; each month goes through `tlc_download.fetch_month`, so it ends as
landed, present (skipped), not_published (skipped) or failed, and nothing but a
verified parquet file ever appears under raw/. Landing a file is all it does: the
bucket notification (or the bridge, locally) starts the transform as for any drop.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.tlc_download import (
    FAILED,
    LANDED,
    NOT_PUBLISHED,
    OUTCOMES,
    PRESENT,
    Logger,
    MonthResult,
    fetch_month,
    month_object_name,
    month_url,
    present,
)
from taxi_pipeline.storage import ObjectStore, store_from_settings

# What --dry-run says of a month that is not in the bucket.
TO_DOWNLOAD = "to_download"

OnResult = Callable[[MonthResult, int, int], None]


def plan(datasets: list[str], months: list[str]) -> list[tuple[str, str]]:
    """(dataset, month) pairs, oldest month first, the datasets of one month together."""
    return [(dataset, month) for month in months for dataset in datasets]


@dataclass
class BackfillReport:
    """Every month's result, in plan order."""

    results: list[MonthResult]
    dry_run: bool = False
    outcomes: tuple[str, ...] = field(default=OUTCOMES)

    def __post_init__(self) -> None:
        if self.dry_run:
            self.outcomes = (TO_DOWNLOAD, PRESENT)

    def of(self, outcome: str) -> list[MonthResult]:
        return [r for r in self.results if r.outcome == outcome]

    @property
    def failed(self) -> list[MonthResult]:
        return self.of(FAILED)

    def counts(self) -> dict[str, int]:
        return {outcome: len(self.of(outcome)) for outcome in self.outcomes}

    def summary(self) -> list[str]:
        """The table printed (and logged) at the end: one row per outcome, then failures."""
        lines = [f"{'outcome':<14} {'files':>5}  detail"]
        for outcome, count in self.counts().items():
            results = self.of(outcome)
            if outcome == LANDED:
                detail = f"{sum(r.bytes for r in results) / 2**20:,.1f} MiB" if results else ""
            elif outcome in (NOT_PUBLISHED, TO_DOWNLOAD):
                detail = _compact(results)
            elif outcome == FAILED:
                detail = "see below" if results else ""
            else:
                detail = "already in the bucket" if results else ""
            lines.append(f"{outcome:<14} {count:>5}  {detail}".rstrip())
        lines += [f"failed {r.key}: {r.detail}" for r in self.failed]
        return lines

    def as_dict(self) -> dict[str, Any]:
        """What the flow returns: counts, and each month's outcome by dataset/month."""
        return {"counts": self.counts(),
                "months": {r.key: r.outcome for r in self.results},
                "failed": {r.key: r.detail for r in self.failed}}


def _compact(results: list[MonthResult], limit: int = 12) -> str:
    keys = [r.key for r in results]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def run_backfill(settings: Settings, datasets: list[str], months: list[str], *,
                 concurrency: int, dry_run: bool = False, store: ObjectStore | None = None,
                 on_result: OnResult | None = None, logger: Logger | None = None,
                 cancel: threading.Event | None = None) -> BackfillReport:
    """Fetch every (dataset, month), at most `concurrency` at once.

    `on_result(result, done, total)` is called in the calling thread as each month
    ends (progress lines, events). `dry_run` looks only at the bucket: no request is
    sent. An exception here (Ctrl-C, a failing callback) stops the downloads in
    flight, whose temporary files are removed, and is raised again.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency {concurrency}: at least 1")
    store = store or store_from_settings(settings)
    work = plan(datasets, months)
    total = len(work)
    results: dict[tuple[str, str], MonthResult] = {}
    if dry_run:
        for done, (dataset, month) in enumerate(work, start=1):
            results[dataset, month] = _planned(store, settings, dataset, month)
            if on_result:
                on_result(results[dataset, month], done, total)
        return BackfillReport([results[key] for key in work], dry_run=True)
    cancel = cancel or threading.Event()
    with _pool(min(concurrency, max(total, 1)), cancel) as pool:
        futures: dict[Future[MonthResult], tuple[str, str]] = {
            pool.submit(fetch_month, store, settings, dataset, month, logger=logger,
                        cancel=cancel): (dataset, month)
            for dataset, month in work}
        for done, future in enumerate(as_completed(futures), start=1):
            result = future.result()
            results[futures[future]] = result
            if on_result:
                on_result(result, done, total)
    return BackfillReport([results[key] for key in work])


@contextmanager
def _pool(workers: int, cancel: threading.Event) -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backfill")
    try:
        yield pool
    except BaseException:
        # Months not started are dropped; those downloading stop at their next chunk
        # (or retry wait) and remove their temporary files.
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _planned(store: ObjectStore, settings: Settings, dataset: str, month: str) -> MonthResult:
    name = month_object_name(settings, dataset, month)
    url = month_url(settings, dataset, month)
    existing = present(store, name)
    if existing is not None:
        return MonthResult(dataset, month, PRESENT, name, url,
                           f"{existing.uri} generation {existing.generation}", obj=existing)
    return MonthResult(dataset, month, TO_DOWNLOAD, name, url, f"would GET {url}")


def describe(result: MonthResult) -> str:
    """The words after the outcome on a progress line."""
    if result.outcome == LANDED:
        return (f"{result.bytes / 2**20:,.1f} MiB in {result.seconds:.1f} s -> {result.name}"
                + (f" ({result.attempts} tries)" if result.attempts > 1 else ""))
    if result.outcome == NOT_PUBLISHED:
        return f"{result.detail} from {result.url}: not published yet"
    return result.detail


def progress_line(result: MonthResult, done: int, total: int) -> str:
    width = len(str(total))
    return (f"[{done:>{width}}/{total}] {result.dataset:<6} {result.month}  "
            f"{result.outcome:<13}  {describe(result)}")


def backfill_in_console(settings: Settings, datasets: list[str], months: list[str], *,
                        concurrency: int, dry_run: bool = False,
                        out: TextIO | None = None) -> int:
    """`taxi-pipeline backfill`: progress, then the summary; 0 when nothing failed, else 1.

    On a terminal a rich progress bar runs under the per-month lines; otherwise (a
    pipe, a log file, CI) each month prints one plain line with its counter.
    """
    out = out or sys.stdout
    store = store_from_settings(settings)
    total = len(datasets) * len(months)
    where = f"{store.scheme}://{store.bucket}/{settings.raw_prefix}"
    verb = "would download" if dry_run else "downloading"
    print(f"backfill {','.join(datasets)} {months[0]}..{months[-1]}: {total} files; {verb} "
          f"from {settings.tlc_base_url} into {where}"
          + ("" if dry_run else f" ({concurrency} at once)"), file=out, flush=True)
    if out.isatty() and not dry_run:
        report = _with_progress_bar(settings, store, datasets, months, concurrency, out)
    else:
        def line(result: MonthResult, done: int, total: int) -> None:
            print(progress_line(result, done, total), file=out, flush=True)

        report = run_backfill(settings, datasets, months, concurrency=concurrency,
                              dry_run=dry_run, store=store, on_result=line)
    print("", file=out)
    for text in report.summary():
        print(text, file=out)
    if dry_run:
        print("dry run: nothing was downloaded", file=out)
    return 1 if report.failed else 0


def _with_progress_bar(settings: Settings, store: ObjectStore, datasets: list[str],
                       months: list[str], concurrency: int, out: TextIO) -> BackfillReport:
    # rich comes with Prefect; imported here so plain runs never load it.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(file=out, highlight=False)
    with Progress(TextColumn("backfill"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("", total=len(datasets) * len(months))
        seen = dict.fromkeys(OUTCOMES, 0)

        def advance(result: MonthResult, done: int, total: int) -> None:
            bar.console.print(progress_line(result, done, total), markup=False)
            seen[result.outcome] += 1
            bar.update(task, completed=done,
                       description=" ".join(f"{k} {v}" for k, v in seen.items() if v))

        return run_backfill(settings, datasets, months, concurrency=concurrency,
                            store=store, on_result=advance)
