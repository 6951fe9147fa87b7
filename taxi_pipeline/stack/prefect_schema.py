"""Wait until the Prefect database schema is the one this image's Prefect expects.

    python -m taxi_pipeline.stack.prefect_schema [--timeout SECONDS]

On Kubernetes the schema is migrated by one Job (`prefect server database upgrade -y`,
k8s/base/prefect-migrate.yaml), and the API and background-services pods run with
PREFECT_API_DATABASE_MIGRATE_ON_START=false, so two pods of a rolling update never
migrate at the same time. This is their init container: it exits 0 once the
database's alembic revision is this image's head (or a revision this image does not
know, i.e. a newer one: a rollback runs on the newer schema), and keeps polling
otherwise. So a new image's server never serves on an old schema, whatever applies
the manifests (k8s/rollout.sh, Flux, Argo CD) and in whatever order, and the old
pods keep serving until the new ones are ready (maxUnavailable 0).

Exit 1 after --timeout seconds (default: never; 0 = check once).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

POLL_SECONDS = 3.0


def image_heads() -> set[str]:
    """The migration heads of the installed Prefect for the configured database's dialect."""
    from alembic.script import ScriptDirectory
    from prefect.server.database import provide_database_interface
    from prefect.server.database.alembic_commands import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    script.version_locations = [str(provide_database_interface().orm.versions_dir)]
    return set(script.get_heads())


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory
    from prefect.server.database import provide_database_interface
    from prefect.server.database.alembic_commands import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    script.version_locations = [str(provide_database_interface().orm.versions_dir)]
    return {rev.revision for rev in script.walk_revisions()}


async def database_revisions() -> set[str] | None:
    """The database's alembic revisions; None while it cannot be reached."""
    import sqlalchemy as sa
    from prefect.server.database import provide_database_interface

    try:
        engine = await provide_database_interface().engine()
        async with engine.connect() as connection:
            has_table = await connection.run_sync(
                lambda sync: sa.inspect(sync).has_table("alembic_version"))
            if not has_table:
                return set()
            rows = await connection.execute(sa.text("SELECT version_num FROM alembic_version"))
            return {str(row[0]) for row in rows}
    except (OSError, sa.exc.SQLAlchemyError, TimeoutError):
        return None


def schema_ready(current: set[str] | None, heads: set[str], known: set[str]) -> bool:
    if not current:
        return False
    return current == heads or bool(current - known)


async def wait(timeout: float | None) -> int:
    heads, known = image_heads(), known_revisions()
    deadline = None if timeout is None else time.monotonic() + timeout
    last: set[str] | None = None
    while True:
        current = await database_revisions()
        if schema_ready(current, heads, known):
            print(f"schema ready: database at {sorted(current or ())}", flush=True)
            return 0
        if current != last:
            seen = "unreachable" if current is None else (sorted(current) or "empty")
            print(f"waiting for the migration Job: database {seen}, this image needs "
                  f"{sorted(heads)}", flush=True)
            last = current
        if deadline is not None and time.monotonic() >= deadline:
            print("error: the schema did not reach this image's revision in time",
                  file=sys.stderr)
            return 1
        await asyncio.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m taxi_pipeline.stack.prefect_schema",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    raise SystemExit(asyncio.run(wait(args.timeout)))


if __name__ == "__main__":
    main()
