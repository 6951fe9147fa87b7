"""`taxi-pipeline query`: a table on every profile, 0 rows when empty, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taxi_pipeline.cli import main
from taxi_pipeline.ops import query
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage.local import LocalStore


def test_an_empty_warehouse_answers_0_rows(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings()
    assert not settings.warehouse_file.exists()
    assert main(["query", "select count(*) as n from trips"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["n", "-", "0", "(1 row)"]
    assert "the warehouse is empty" in err
    assert main(["query", "select z.borough, count(*) from trips t join zones z "
                          "on t.pickup_location_id = z.location_id group by 1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "(0 rows)"
    assert not settings.warehouse_file.exists()  # nothing written


def test_rows_of_a_warehouse_and_a_table_not_created_yet() -> None:
    settings = Settings()
    settings.warehouse_file.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(settings.warehouse_file)) as con:
        con.execute("CREATE TABLE trips (taxi_type VARCHAR, passenger_count INTEGER)")
        con.execute("INSERT INTO trips VALUES ('yellow', 1), ('yellow', 2), ('green', 1)")
    result = query.run_query(settings, "select taxi_type, count(*) as n from trips "
                                       "group by 1 order by 1")
    assert (result.columns, result.rows) == (["taxi_type", "n"], [("green", 1), ("yellow", 2)])
    assert query.run_query(settings, "select count(*) from fhvhv_trips").rows == [(0,)]
    assert query.render(result).splitlines() == [
        "taxi_type  n", "---------  -", "green      1", "yellow     2", "(2 rows)"]
    capped = query.run_query(settings, "select * from trips", max_rows=2)
    assert len(capped.rows) == 2 and capped.truncated
    assert query.render(capped).endswith("(2 rows, the first 2 only)")


def test_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", "select * from no_such_table"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: Catalog Error: Table with name no_such_table does not exist!"]
    assert main(["query", "selec 1"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_warehouse_held_by_a_load_says_so(tmp_path: Path) -> None:
    settings = Settings()
    settings.warehouse_file.parent.mkdir(parents=True, exist_ok=True)
    duckdb.connect(str(settings.warehouse_file)).close()
    writer = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
         "print('holding', flush=True); sys.stdin.read()", str(settings.warehouse_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "holding"
        with pytest.raises(query.QueryError, match=r"is being written .* try again"):
            query.run_query(settings, "select count(*) from trips")
    finally:
        writer.communicate("", timeout=30)


def test_rejects_by_reason_reads_the_rejects_files() -> None:
    settings = Settings()
    store = LocalStore(settings.bucket_dir)
    for name, reasons in {
            "rejects/yellow/2024/yellow_tripdata_2024-01.parquet": ["negative_fare"] * 3
            + ["zero_passengers"],
            "rejects/green/2024/green_tripdata_2024-01.parquet": ["negative_fare"]}.items():
        path = settings.bucket_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"x": list(range(len(reasons))), "reject_reason": reasons}),
                       path)
    result = query.rejects_by_reason(settings, store)
    assert result.rows == [("green", "negative_fare", 1), ("yellow", "negative_fare", 3),
                           ("yellow", "zero_passengers", 1)]


def test_bigquery_a_pipeline_table_not_created_yet_is_0_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from google.api_core import exceptions as gexc

    from taxi_pipeline.gcp import clients

    class Client:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def query(self, sql: str, job_config: Any) -> Any:
            assert job_config.default_dataset.dataset_id == "taxi"
            assert job_config.maximum_bytes_billed == settings.bq_max_bytes_billed
            raise self.error

    settings = Settings(profile="gcp", gcp_project="taxi-project-1", bucket="taxi-bucket-1")
    missing = gexc.NotFound("Not found: Table taxi-project-1:taxi.trips was not found in "
                            "location US")
    monkeypatch.setattr(clients, "bigquery_client", lambda _: Client(missing))
    result = query.run_query(settings, "select count(*) from trips")
    assert result.rows == [] and "trips does not exist yet" in result.notes[0]
    other = gexc.NotFound("Not found: Table taxi-project-1:taxi.nope was not found")
    monkeypatch.setattr(clients, "bigquery_client", lambda _: Client(other))
    with pytest.raises(query.QueryError, match=r"Not found: Table taxi-project-1:taxi\.nope"):
        query.run_query(settings, "select count(*) from nope")
