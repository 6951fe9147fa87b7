"""`taxi-pipeline`: run the local or emulator profile, try it with a demo, inspect and
re-run objects.

The CLI starts the other parts (`python -m deploy`, `python -m pubsub_bridge`,
a Prefect worker) as processes, so the core never imports flows, bridge or
automations.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import pyarrow.parquet as pq

from taxi_pipeline.datasets.registry import DATASETS, table_for, table_for_name
from taxi_pipeline.objects import ObjectRef, output_name, sibling_name
from taxi_pipeline.settings import Settings, SettingsError, get_settings
from taxi_pipeline.sources.sample_data import FORMATS as SAMPLE_FORMATS
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.sources.tlc_download import SOURCES
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.storage import ObjectNotFound, ObjectStore, store_from_settings
from taxi_pipeline.warehouse import warehouse_from_settings

log = logging.getLogger("taxi_pipeline")


def _require_up_profile(settings: Settings, command: str) -> None:
    """`up` and `demo` run the local and emulator profiles; production is deployed."""
    if settings.profile in ("local", "emulator"):
        return
    message = (
        f"`taxi-pipeline {command}` runs the local profile (the default) or "
        f"TAXI_PROFILE=emulator; TAXI_PROFILE is {settings.profile!r}. Deploy the gcp "
        "profile with `python -m deploy` instead (see k8s/README.md)."
    )
    try:
        settings.validate_for_profile()
    except SettingsError as exc:
        message += f"\n{exc}"
    raise SystemExit(message)


def say(line: str, stream: TextIO | None = None) -> None:
    """Print a line of `up`, and keep going when the terminal is gone: a closed pipe
    must not stop `up` half way through stopping its parts."""
    stream = stream or sys.stdout
    try:
        print(line, file=stream, flush=True)
    except (BrokenPipeError, ValueError, OSError):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM while starting: unwind like Ctrl-C, so what already started is stopped."""
    raise KeyboardInterrupt


def raw_dataset_dirs(settings: Settings) -> list[Path]:
    """`raw/<dataset>/` for every dataset the transform knows, created if missing."""
    from taxi_pipeline.sources.tlc_download import DATASETS

    made = [settings.bucket_dir / settings.raw_prefix / dataset for dataset in DATASETS]
    for path in made:
        path.mkdir(parents=True, exist_ok=True)
    return made


def _executable() -> str:
    """How to run this CLI again: the script beside the interpreter, else its name."""
    beside = Path(sys.executable).with_name("taxi-pipeline")
    return shlex.quote(str(beside)) if beside.exists() else "taxi-pipeline"


def download_schedule_line(settings: Settings) -> str:
    """Whether `up` registered the scheduled TLC download, and how to change that."""
    if not settings.download_cron:
        return ("off (TAXI_DOWNLOAD_CRON is empty; `taxi-pipeline backfill` downloads "
                "months by hand)")
    return (f"on: {', '.join(settings.download_datasets)} at cron "
            f"{settings.download_cron!r} (TAXI_DOWNLOAD_CRON; needs internet; "
            "TAXI_DOWNLOAD_CRON= turns it off)")


def _print_stack(stack: LocalStack, settings: Settings) -> None:
    ui = (stack.api_url or "").removesuffix("/api")
    if stack.ui:
        print(f"Prefect UI and API   {ui}  (API {stack.api_url})")
    else:  # a headless server: no dashboard to point at
        print(f"Prefect API          {stack.api_url}  (no UI here; `taxi-pipeline up` has one)")
    dirs = raw_dataset_dirs(settings)
    print(f"Drop raw files into  {settings.bucket_dir}/{settings.raw_prefix}<dataset>/ "
          f"({', '.join(d.name for d in dirs)}; subfolders are fine)")
    print(f"Try it               {_executable()} sample yellow 2024-03 && "
          f"cp yellow_tripdata_2024-03.parquet {shlex.quote(str(dirs[0]))}/")
    print(f"Warehouse (DuckDB)   {settings.warehouse_file}  table {settings.table}")
    if stack.bridge_port:
        print(f"Bridge health        http://127.0.0.1:{stack.bridge_port}/healthz  (/metrics)")
    if stack.exporter_port:
        print(f"Pipeline metrics     http://127.0.0.1:{stack.exporter_port}/metrics  "
              "(Prometheus: docs/monitoring.md)")
    print(f"Logs                 {stack.log_dir}")
    if stack.ui:  # `up`: the deployments it registered include the scheduled download
        print(f"Scheduled download   {download_schedule_line(settings)}")


Running = list[tuple[str, subprocess.Popen[bytes], Path]]


def _run_until_stopped(stack: LocalStack, settings: Settings, watched: Running) -> int:
    """Until SIGINT/SIGTERM (0), restarting the stack's parts that exit; 1 when one
    crash-loops or one of `watched` (the emulators, never restarted) exits."""
    from taxi_pipeline.stack.supervisor import RestartPolicy, Supervisor

    stopping: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    # Explicit handlers: a background or supervised process may inherit SIGINT
    # as ignored, and SIGTERM must stop the children too. Installed before
    # "Running." is printed: a supervisor may signal as soon as it reads it.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print("Running. Press Ctrl-C to stop everything.", flush=True)
    code = Supervisor(stack, RestartPolicy.from_settings(settings), watched=watched).run(stopping)
    if code == 0:
        say("\nStopping...")
    return code


def cmd_up(args: argparse.Namespace) -> int:
    settings = get_settings()
    _require_up_profile(settings, "up")
    signal.signal(signal.SIGTERM, _interrupt)
    if settings.profile == "emulator":
        from taxi_pipeline.stack.emulator import emulator_stack

        print("Starting the emulator profile (Pub/Sub emulator, fake-gcs-server, BigQuery "
              "emulator, Prefect server, worker, bridge)...", flush=True)
        with emulator_stack(settings, ui=True, preferred_ports=True) as running:
            running.stack.on_stop = say
            print("\n".join(running.describe()), flush=True)
            emulators = [p for p in running.processes()
                         if p[0] not in {m.name for m in running.stack.processes}]
            code = _run_until_stopped(running.stack, running.settings, emulators)
    else:
        print("Starting the local profile (Prefect server, worker, bridge)...", flush=True)
        with LocalStack(settings, ui=True, on_stop=say) as stack:
            _print_stack(stack, settings)
            code = _run_until_stopped(stack, settings, [])
    if code == 0:
        say("Stopped; nothing left running.")
    return code


def duckdb_cli() -> str:
    """The DuckDB CLI installed beside this interpreter (the duckdb-cli package)."""
    beside = Path(sys.executable).with_name("duckdb")
    return str(beside) if beside.exists() else "duckdb"


def cmd_sample(args: argparse.Namespace) -> int:
    """Write a synthetic TLC month (real schema and dirt) to try the pipeline with."""
    try:
        year, month = (int(part) for part in args.month.split("-"))
        if not 1 <= month <= 12:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--month {args.month!r}: expected YYYY-MM, e.g. 2024-03") from None
    sample = generate_month(args.dataset, year, month, args.rows, seed=args.seed,
                            file_format=args.format)
    out = Path(args.output or f"{args.dataset}_tripdata_{year:04d}-{month:02d}.{args.format}")
    write_month(sample, out)
    print(f"wrote {out} ({sample.table.num_rows:,} rows, {sample.expected_good:,} should pass "
          f"the quality rules)")
    return 0


def wait_for_load(settings: Settings, store: ObjectStore, raw: ObjectRef,
                  timeout: float) -> tuple[int, float] | str:
    """(rows, seconds) once the warehouse holds this generation, or why it never will."""
    warehouse = warehouse_from_settings(settings)
    quarantine_name = sibling_name(raw.name, settings.raw_prefix, settings.quarantine_prefix)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        loaded = warehouse.loaded(table_for_name(raw.name, settings.table), raw.uri)
        if loaded is not None and loaded[0] >= raw.generation:
            return loaded[1], time.monotonic() - start
        try:
            store.ref(quarantine_name)
            return f"{raw.uri} was quarantined as {quarantine_name}"
        except ObjectNotFound:
            pass
        time.sleep(0.1)
    return f"{raw.uri} was not loaded within {timeout:.0f}s"


def cmd_demo(args: argparse.Namespace) -> int:
    settings = get_settings()
    _require_up_profile(settings, "demo")
    signal.signal(signal.SIGTERM, _interrupt)
    name = raw_object_name(settings.raw_prefix, args.dataset, 2024, 1, args.format)
    table_name = table_for(args.dataset, settings.table)
    print(f"Generating a sample {args.dataset} month ({args.rows:,} rows, real TLC schema and "
          "dirt)...", flush=True)
    sample = generate_month(args.dataset, 2024, 1, args.rows, seed=7, file_format=args.format)
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        source = write_month(sample, Path(tmp) / name.rsplit("/", 1)[-1])
        if settings.profile == "emulator":
            from taxi_pipeline.stack.emulator import emulator_stack

            print("Starting the emulator profile (Pub/Sub emulator, fake-gcs-server, BigQuery "
                  "emulator, Prefect server, worker, bridge)...", flush=True)
            emulators = running.enter_context(emulator_stack(settings))
            settings, stack = emulators.settings, emulators.stack
            print("\n".join(emulators.endpoints()), flush=True)
            # The emulators keep nothing once stopped: count the rows while they run.
            table = f"{settings.gcp_project}.{settings.bq_dataset}.{table_name}"
            query = ("The BigQuery emulator keeps nothing once stopped; `TAXI_PROFILE=emulator "
                     "taxi-pipeline up` keeps it running and prints how to query it")

            def count(uri: str) -> str:
                rows = warehouse_from_settings(settings).rows_for(table_name, uri)
                return f"BigQuery emulator: {rows or 0:,} rows of {uri} in {table}"

            def drop() -> None:
                emulators.upload(source, name)
        else:
            print("Starting the local profile (Prefect server, worker, bridge)...", flush=True)
            stack = running.enter_context(LocalStack(settings, ui=False))
            _print_stack(stack, settings)
            query = (f"Query it: {duckdb_cli()} {settings.warehouse_file} "
                     f"\"select count(*) from {table_name}\"")

            def count(uri: str) -> str:
                return ""  # the loaded line says it all: the warehouse file stays

            def drop() -> None:
                target = settings.bucket_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)

        store = store_from_settings(settings)
        rejects_name = output_name(name, settings.raw_prefix, settings.rejects_prefix)
        for attempt in range(1, args.drops + 1):
            dropped = time.monotonic()
            drop()
            raw = store.ref(name)
            print(f"[{attempt}/{args.drops}] dropped {raw.uri}", flush=True)
            outcome = wait_for_load(settings, store, raw, args.timeout)
            if isinstance(outcome, str):
                print(f"FAILED: {outcome}. Logs: {stack.log_dir}", file=sys.stderr)
                return 1
            rows, _ = outcome
            latency = time.monotonic() - dropped
            latencies.append(latency)
            rejects = store.ref(rejects_name)
            with store.open_read(rejects) as reader:
                rejected = pq.read_metadata(reader).num_rows
            print(f"[{attempt}/{args.drops}] loaded {rows:,} rows, rejected {rejected:,} "
                  f"(reasons in {rejects.uri}); drop to queryable {latency:.1f}s", flush=True)
            if counted := count(raw.uri):
                print(f"[{attempt}/{args.drops}] {counted}", flush=True)
    print(f"Demo done: {sample.table.num_rows:,} rows in, {rows:,} loaded, {rejected:,} rejected;"
          f" drop to queryable median {statistics.median(latencies):.1f}s over "
          f"{len(latencies)} drop(s), from the start of the copy to the rows being "
          "queryable (the board's TO LOADED counts from the object's landing to the end of "
          f"its load, so it reads a little less). {query}")
    if settings.profile == "local":
        cli = _executable()
        print("Next: keep it running with `" + cli + " up` (with the UI), drop files into "
              f"{settings.bucket_dir}/{settings.raw_prefix}<dataset>/, and see every object "
              f"with `{cli} status`.")
    return 0


def _valid_settings() -> Settings:
    """The settings, checked for the profile (GCP names) before anything starts."""
    settings = get_settings()
    settings.validate_for_profile()
    return settings


def api_url_of(settings: Settings) -> str | None:
    """PREFECT_API_URL, or else the server `taxi-pipeline up` started (None: neither)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    marker = settings.home / "api-url"
    if not url and marker.exists():
        url = marker.read_text().strip()
    return url or None


def _with_api(settings: Settings, coroutine: Coroutine[Any, Any, int]) -> int:
    """Run against PREFECT_API_URL, or else the server `taxi-pipeline up` started."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = api_url_of(settings)
    if not url:
        coroutine.close()
        raise RuntimeError("no Prefect server: start one with `taxi-pipeline up`, or set "
                           "PREFECT_API_URL to yours")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        return asyncio.run(coroutine)


def cmd_reemit(args: argparse.Namespace) -> int:
    """Re-emit `storage.object.finalized` (fresh id, reemit label): run the chain again."""
    from taxi_pipeline.ops.reemit import parse_when, reemit

    settings = _valid_settings()
    if not (args.objects or args.stage or args.since or args.until or args.event_id):
        raise SystemExit("error: say what to re-emit: objects or a prefix (raw/ is every raw "
                         "object), --stage, --since/--until or --event-id")
    if args.rate is not None and args.rate <= 0:
        raise SystemExit("error: --rate must be a positive number of events per second")
    try:
        since, until = (parse_when(t) if t else None for t in (args.since, args.until))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    run = reemit(settings, args.objects, stage=args.stage, since=since, until=until,
                 event_ids=args.event_id or [], dry_run=args.dry_run, rate=args.rate)
    if args.dry_run and not args.event_id:  # the bucket alone: no server needed
        return asyncio.run(run)
    return _with_api(settings, run)


async def _reconcile(settings: Settings, older_than: timedelta, dry_run: bool) -> int:
    from taxi_pipeline.ops.reconcile import reconcile
    from taxi_pipeline.ops.status_model import duration_text

    report = await reconcile(settings, older_than, dry_run)
    for item in report.stalled:
        why = report.left_alone(item)
        state = f"in flight ({why}): left alone" if why else item.why
        print(f"stalled {item.obj.uri} generation {item.obj.generation}: {state}")
    if not report.to_emit:
        print("nothing to re-emit: every raw object older than "
              f"{duration_text(older_than.total_seconds())} is loaded, quarantined or on "
              "its way")
        return 0
    if dry_run:
        print(f"would re-emit {len(report.to_emit)} (dry run)")
        return 0
    print(f"re-emitted {len(report.confirmed)} of {len(report.emitted)} (confirmed stored)")
    return 0 if not report.unconfirmed else 1


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Re-emit raw objects that landed but never reached the warehouse."""
    settings = _valid_settings()
    minutes = (settings.reconcile_after_minutes if args.older_than_minutes is None
               else args.older_than_minutes)
    return _with_api(settings, _reconcile(settings, timedelta(minutes=minutes), args.dry_run))


def cmd_query(args: argparse.Namespace) -> int:
    """SQL on the warehouse of any profile, or the ready rejects-by-reason query."""
    from taxi_pipeline.ops.query import QueryError, rejects_by_reason, render, run_query

    settings = _valid_settings()
    if args.rejects == bool(args.sql):
        raise SystemExit("error: give SQL or --rejects (one of them): "
                         "taxi-pipeline query \"select count(*) from trips\"")
    try:
        result = (rejects_by_reason(settings, store_from_settings(settings)) if args.rejects
                  else run_query(settings, args.sql, max_rows=args.max_rows))
    except QueryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # never a traceback: the cause in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(render(result))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """One object's story, or the board of every object under a prefix."""
    from taxi_pipeline.ops.status_view import status

    settings = _valid_settings()
    if args.follow:
        from taxi_pipeline.ops.status_view import follow

        try:
            return _with_api(settings, follow(settings, args.object))
        except KeyboardInterrupt:  # Ctrl-C is how it is meant to end
            return 0
    minutes = (settings.reconcile_after_minutes if args.older_than_minutes is None
               else args.older_than_minutes)
    older_than = timedelta(minutes=minutes)
    if api_url_of(settings) is None:  # no server to ask: the bucket and load log answer
        return asyncio.run(status(settings, args.object, stalled=args.stalled,
                                  as_json=args.json, older_than=older_than, offline=True))
    return _with_api(settings, status(settings, args.object, stalled=args.stalled,
                                      as_json=args.json, older_than=older_than))


def cmd_backfill(args: argparse.Namespace) -> int:
    """Download a range of TLC months into raw/; no Prefect server needed."""
    from taxi_pipeline.ops.backfill import backfill_in_console
    from taxi_pipeline.sources.tlc_download import default_month, month_range, parse_datasets

    settings = _valid_settings()
    if args.source:
        settings = settings.model_copy(update={"download_source": args.source})
    try:
        datasets = parse_datasets(args.dataset or settings.download_datasets)
        months = month_range(args.from_month,
                             args.to_month or default_month(settings.download_lag_months))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return backfill_in_console(settings, datasets, months, dry_run=args.dry_run,
                               concurrency=args.concurrency or settings.backfill_concurrency)


def cmd_zones(args: argparse.Namespace) -> int:
    """Create the datasets' tables and (re)load `zones` from TLC's zone lookup."""
    from taxi_pipeline.ops.zones import install_zones

    settings = get_settings()
    if args.file is not None:
        settings = settings.model_copy(update={"zones_file": args.file})
    done = install_zones(settings)
    print(f"loaded {done.rows} zones from {done.source} into {done.table_uri}")
    for table, uri in done.dataset_tables.items():
        print(f"table {table}: {uri}")
    return 0


def cmd_gcp_setup(args: argparse.Namespace) -> int:
    """Create bucket, topics, subscriptions and notifications (idempotent)."""
    settings = get_settings()
    if settings.profile == "local":
        raise SystemExit("`taxi-pipeline gcp setup` needs TAXI_PROFILE=gcp (or emulator), "
                         "TAXI_GCP_PROJECT and TAXI_BUCKET")
    # Before the Google clients are even imported: a bad name fails here, in
    # seconds, instead of at the first load.
    settings.validate_for_profile()
    from taxi_pipeline.gcp.setup import setup

    for line in setup(settings):
        print(line)
    return 0


def _dead_letter_queue() -> Any:
    settings = get_settings()
    if settings.profile == "local":
        raise SystemExit("`taxi-pipeline dead-letters` reads Pub/Sub: it needs TAXI_PROFILE=gcp "
                         "(or emulator) and TAXI_GCP_PROJECT")
    settings.validate_for_profile(optional=("bucket",))
    from taxi_pipeline.ops.dead_letters import DeadLetterQueue

    return DeadLetterQueue(settings)


def cmd_dead_letters_list(args: argparse.Namespace) -> int:
    """Show what Pub/Sub gave up delivering to the bridge; nothing is removed."""
    queue = _dead_letter_queue()
    letters = queue.list(args.limit)
    for letter in letters:
        print(letter.describe())
    print(f"{len(letters)} dead letter(s) in {queue.path}")
    return 0


def cmd_dead_letters_replay(args: argparse.Namespace) -> int:
    """Republish dead letters to the bridge's topic; each is acked once its copy is out."""
    queue = _dead_letter_queue()
    report = queue.replay(args.limit, dry_run=args.dry_run)
    verb = "would replay" if args.dry_run else "replayed"
    for letter in report.replayed:
        print(f"{verb} {letter.describe()}")
    for letter, why in report.failed:
        print(f"FAILED {letter.describe()}: {why} (it stays in {queue.path}; run replay "
              "again)", file=sys.stderr)
    print(f"{verb} {len(report.replayed)} dead letter(s) to {queue.topic}"
          + (" (dry run: nothing changed)" if args.dry_run else "")
          + (f"; {len(report.failed)} failed" if report.failed else ""))
    return 1 if report.failed else 0


class _HelpFormatter(argparse.HelpFormatter):
    """Keeps the examples' line breaks; shows a default wherever there is one to show."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if ("default" not in help_text and action.option_strings
                and action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS):
            help_text += " (default: %(default)s)"
        return help_text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taxi-pipeline")
    except PackageNotFoundError:
        return "unknown"


def _command(sub: Any, name: str, help_text: str, description: str,
             examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand with a description and examples in its --help."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(
        f"  {example}" for example in examples)
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=description, epilog=epilog,
        formatter_class=_HelpFormatter)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taxi-pipeline", description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = _command(
        sub, "up", "start server, worker and bridge of the local profile "
        "(TAXI_PROFILE=emulator: with the Pub/Sub, GCS and BigQuery emulators)",
        "Start the Prefect server, the worker and the bridge, register deployments and "
        "automations, create raw/<dataset>/ in the bucket directory, print where to drop "
        "files, and run until Ctrl-C (or SIGTERM), which stops all of it.",
        ["taxi-pipeline up",
         "TAXI_HOME=/tmp/taxi taxi-pipeline up   # bucket, warehouse, logs under /tmp/taxi"])
    up.set_defaults(func=cmd_up)
    demo = _command(
        sub, "demo", "start everything, drop a sample month, wait, report",
        "Start the stack, drop a synthetic month into raw/ (DROPS times), wait until it is "
        "queryable, print rows loaded and rejected and seconds from drop to queryable, stop.",
        ["taxi-pipeline demo", "taxi-pipeline demo --rows 50000 --drops 2"])
    demo.add_argument("--rows", type=int, default=250_000, help="rows in the sample month")
    demo.add_argument("--dataset", choices=DATASETS, default="yellow",
                      help="which dataset's month to drop (default: yellow, the fastest)")
    demo.add_argument("--format", choices=SAMPLE_FORMATS, default="parquet",
                      help="file format of the dropped month")
    demo.add_argument("--drops", type=int, default=1,
                      help="drop the month this many times (each drop is a new generation)")
    demo.add_argument("--timeout", type=float, default=180.0,
                      help="seconds to wait for each drop to be loaded")
    demo.set_defaults(func=cmd_demo)
    sample = _command(
        sub, "sample", "write a synthetic TLC month (real schema and dirt) to drop in",
        "Write a synthetic TLC month (the real schema, and its real dirt: rows the quality "
        "rules reject) to try the pipeline with.",
        ["taxi-pipeline sample yellow 2024-03   # -> ./yellow_tripdata_2024-03.parquet",
         "taxi-pipeline sample green 2023-12 --rows 5000 -o /tmp/green.parquet",
         "taxi-pipeline sample fhvhv 2020-04 --format csv.gz"])
    sample.add_argument("dataset", choices=DATASETS, help="which TLC dataset")
    sample.add_argument("month", help="YYYY-MM")
    sample.add_argument("--format", choices=SAMPLE_FORMATS, default="parquet",
                        help="parquet (TLC's columns of the era) or csv / csv.gz (the CSV "
                             "mirror's layout of that year)")
    sample.add_argument("-o", "--output",
                        help="file to write (default: <dataset>_tripdata_<YYYY-MM>.<format>)")
    sample.add_argument("--rows", type=int, default=100_000, help="rows to write")
    sample.add_argument("--seed", type=int, default=0,
                        help="random seed (same seed, same file)")
    sample.set_defaults(func=cmd_sample)
    reemit = _command(
        sub, "reemit", "process objects again (re-run or backfill)",
        "Send storage.object.finalized again (fresh id) for each chosen object, "
        "or a copy of a stored event; exit 1 if anything was skipped or unconfirmed.",
        ["taxi-pipeline reemit raw/yellow/2024/yellow_tripdata_2024-03.parquet",
         "taxi-pipeline reemit raw/green/ --since 2024-01-01 --dry-run"])
    reemit.add_argument("objects", nargs="*",
                        help="objects (name of any stage, URI, path, file name) or prefixes "
                             "ending in / (default: every object of --stage)")
    reemit.add_argument("--stage", choices=["raw", "processed"],
                        help="re-emit that stage's copy of each object (processed: the load "
                             "only); default: the stage of each name, raw for bare prefixes")
    reemit.add_argument("--since", metavar="TIME",
                        help="only objects created at or after TIME (ISO, UTC if no zone)")
    reemit.add_argument("--until", metavar="TIME", help="only objects created before TIME")
    reemit.add_argument("--event-id", action="append", metavar="UUID",
                        help="re-send this stored event (fresh id, related to the original); "
                             "repeatable")
    reemit.add_argument("--dry-run", action="store_true", help="list what would be sent")
    reemit.add_argument("--rate", type=float, metavar="N",
                        help="at most N events per second (default: no limit)")
    reemit.set_defaults(func=cmd_reemit)
    reconcile = _command(
        sub, "reconcile", "re-emit raw objects that landed but never reached the warehouse",
        "Compare the bucket with the warehouse's load log and re-emit every raw object whose "
        "current generation never loaded and is not on its way (what the reconcile "
        "deployment does on its schedule).",
        ["taxi-pipeline reconcile --dry-run", "taxi-pipeline reconcile --older-than-minutes 10"])
    reconcile.add_argument(
        "--older-than-minutes", type=float, default=None,
        help="leave objects alone that landed or had a pipeline event more recently than "
             "this (default: TAXI_RECONCILE_AFTER_MINUTES, 3)")
    reconcile.add_argument("--dry-run", action="store_true", help="list, do not re-emit")
    reconcile.set_defaults(func=cmd_reconcile)
    query = _command(
        sub, "query", "run SQL on the warehouse (DuckDB locally, BigQuery otherwise)",
        "Run a query on the warehouse of the profile and print the rows as a table. The "
        "pipeline's tables (trips, fhv_trips, fhvhv_trips, zones) answer 0 rows before "
        "anything is loaded; any other error is one line. Locally the DuckDB file is only "
        "read. --rejects is the ready query for rejected rows by dataset and reason (they "
        "live in the bucket's rejects/ files, not in the warehouse).",
        ["taxi-pipeline query \"select taxi_type, count(*) from trips group by 1\"",
         "taxi-pipeline query --rejects"])
    query.add_argument("sql", nargs="?", help="the SQL to run")
    query.add_argument("--rejects", action="store_true",
                       help="rejected rows by dataset and reason (reads rejects/)")
    query.add_argument("--max-rows", type=int, default=1000,
                       help="print at most N rows (default: 1000)")
    query.set_defaults(func=cmd_query)
    status = _command(
        sub, "status", "one object's events and rows, or a board of every object",
        "With an object (URI, name of any stage, file name or absolute path): its "
        "stage, events and warehouse rows. With a prefix ending in / (or nothing): "
        "one line per object.",
        ["taxi-pipeline status", "taxi-pipeline status yellow_tripdata_2024-03.parquet",
         "taxi-pipeline status raw/green/ --stalled",
         "taxi-pipeline status --follow raw/yellow/"])
    status.add_argument("object", nargs="?", default="",
                        help="object, or prefix for the board (default: every object)")
    status.add_argument("--stalled", action="store_true",
                        help="only objects that landed but never reached loaded or quarantined")
    status.add_argument("--json", action="store_true", help="print JSON, for scripts")
    status.add_argument("--older-than-minutes", type=float, default=None,
                        help="quiet this long counts as stalled (default: "
                             "TAXI_RECONCILE_AFTER_MINUTES, 3)")
    status.add_argument("--follow", action="store_true",
                        help="print pipeline events (pipeline.*, storage.object.*) under the "
                             "prefix, or about the object, as they happen, until Ctrl-C")
    status.set_defaults(func=cmd_status)
    backfill = _command(
        sub, "backfill", "download a range of TLC months into raw/ (skips what is there)",
        "Download each dataset's months FROM..TO from TAXI_TLC_BASE_URL into raw/, a few at "
        "once; months already in the bucket are skipped, unpublished ones reported. Exit 1 "
        "if any month failed.",
        ["taxi-pipeline backfill --dataset yellow,green --from 2024-01 --to 2024-03",
         "taxi-pipeline backfill --from 2023-01 --dry-run"])
    backfill.add_argument("--dataset", help="comma-separated, e.g. yellow,green "
                          "(default: TAXI_DOWNLOAD_DATASETS)")
    backfill.add_argument("--from", dest="from_month", required=True, metavar="YYYY-MM")
    backfill.add_argument("--to", dest="to_month", metavar="YYYY-MM",
                          help="last month, included (default: the newest TLC should have "
                               "published, TAXI_DOWNLOAD_LAG_MONTHS before this one)")
    backfill.add_argument("--concurrency", type=int, choices=range(1, 33), metavar="N",
                          help="months downloaded at once, 1-32 (default: "
                               "TAXI_BACKFILL_CONCURRENCY, 4)")
    backfill.add_argument("--dry-run", action="store_true",
                          help="say what is in the bucket and what would be downloaded; "
                               "send no request")
    backfill.add_argument("--source", choices=SOURCES,
                          help="tlc: TLC's parquet files (TAXI_TLC_BASE_URL); mirror: the "
                               "2019-2021 CSV.gz mirror (TAXI_TLC_MIRROR_URL); default: "
                               "TAXI_DOWNLOAD_SOURCE, tlc")
    backfill.set_defaults(func=cmd_backfill)
    zones = _command(
        sub, "zones", "load TLC's zone lookup into the `zones` table (and create all tables)",
        "Create each dataset's table (trips, fhv_trips, fhvhv_trips) if missing and replace "
        "the `zones` table with TLC's taxi_zone_lookup.csv (TAXI_ZONES_FILE, default: the "
        "packaged copy). `up` and deploy do this too; idempotent.",
        ["taxi-pipeline zones", "taxi-pipeline zones --file taxi_zone_lookup.csv"])
    zones.add_argument("--file", type=Path, default=None,
                       help="a zone lookup CSV (LocationID,Borough,Zone,service_zone)")
    zones.set_defaults(func=cmd_zones)
    gcp = _command(
        sub, "gcp", "Google Cloud resources of the gcp/emulator profiles",
        "Manage the Google Cloud resources the gcp and emulator profiles use.",
        ["taxi-pipeline gcp setup"])
    gcp_sub = gcp.add_subparsers(dest="gcp_command", required=True)
    gcp_setup = _command(
        gcp_sub, "setup", "create bucket, Pub/Sub topics, subscriptions and the bucket "
        "notification (idempotent)",
        "Create the bucket, the Pub/Sub topics and subscriptions and the bucket notification "
        "named by the TAXI_* settings; what exists is left as it is.",
        ["TAXI_PROFILE=emulator taxi-pipeline gcp setup   # against the running emulators"])
    gcp_setup.set_defaults(func=cmd_gcp_setup)
    dead = _command(
        sub, "dead-letters", "list or replay notifications Pub/Sub dead-lettered",
        "Read the dead-letter subscription (TAXI_PUBSUB_DEAD_LETTER_TOPIC + '-sub', made by "
        "`gcp setup`): the notifications Pub/Sub stopped delivering to the bridge.",
        ["taxi-pipeline dead-letters list", "taxi-pipeline dead-letters replay --dry-run"])
    dead_sub = dead.add_subparsers(dest="dead_letters_command", required=True)
    dead_list = _command(
        dead_sub, "list", "show dead letters (object, generation, attempts); removes nothing",
        "Show each dead-lettered message: object, generation, first publish time, delivery "
        "attempts and message id. They stay in the subscription.",
        ["taxi-pipeline dead-letters list", "taxi-pipeline dead-letters list --limit 20"])
    dead_list.add_argument("--limit", type=int, metavar="N",
                           help="show at most N (default: all)")
    dead_list.set_defaults(func=cmd_dead_letters_list)
    dead_replay = _command(
        dead_sub, "replay", "republish dead letters to the bridge's topic, then ack them",
        "Republish each dead letter (same data and notification attributes) to "
        "TAXI_PUBSUB_TOPIC and ack it on the dead-letter subscription once the publish is "
        "confirmed; exit 1 if any publish failed (those stay). Safe to repeat: the bridge's "
        "event id is per object generation and the load is idempotent per generation.",
        ["taxi-pipeline dead-letters replay --dry-run",
         "taxi-pipeline dead-letters replay --limit 100"])
    dead_replay.add_argument("--dry-run", action="store_true",
                             help="list what would be replayed; change nothing")
    dead_replay.add_argument("--limit", type=int, metavar="N",
                             help="replay at most N (default: all)")
    dead_replay.set_defaults(func=cmd_dead_letters_replay)
    return parser


def _subcommand_parsers(parser: argparse.ArgumentParser,
                        args: argparse.Namespace) -> list[argparse.ArgumentParser]:
    """The chain of (sub)parsers `args` went through, innermost last."""
    chain = [parser]
    while True:
        actions = [a for a in chain[-1]._actions  # argparse keeps them only here
                   if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, actions[0].dest, None) if actions else None
        if chosen is None or chosen not in actions[0].choices:
            return chain
        chain.append(actions[0].choices[chosen])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse like argparse, but a flag the subcommand does not know gets that
    subcommand's usage and the nearest flag it has, not the top-level usage."""
    import difflib

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    innermost = _subcommand_parsers(parser, args)[-1]
    flags = [s for a in innermost._actions for s in a.option_strings]
    unknown = [e for e in extra if e.startswith("-")] or extra
    hints = []
    for flag in unknown:
        near = difflib.get_close_matches(flag.split("=", 1)[0], flags, n=1, cutoff=0.6)
        if near:
            hints.append(f"{flag}: did you mean {near[0]}?")
    if not hints:  # nothing close: show how it is used (objects and prefixes are arguments)
        hints.append(innermost.epilog or f"see `{innermost.prog} --help`")
    innermost.error(f"unrecognized arguments: {' '.join(extra)}\n" + "\n".join(hints))
    raise AssertionError("unreachable: error() exits")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
