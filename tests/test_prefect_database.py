"""The embedded PostgreSQL's first start on a fresh machine: two starters at once.

As root, PostgreSQL runs as a system user that is created on first use. Two
first starts at the same moment once raced (`initdb: could not look up effective
user ID 1002: user does not exist`, a fresh clone's CI). The machine state
"user does not exist yet" is reached with a system user name fresh to this test
(TAXI_POSTGRES_SYSTEM_USER), so the test does not depend on what ran before.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taxi_pipeline.stack.prefect_database import ensure_system_users

STARTER = """
import sys, time
from pathlib import Path
from taxi_pipeline.stack.prefect_database import EmbeddedPostgres
pgdata, user, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
Path(str(pgdata) + ".ready").touch()
while not go.exists():
    time.sleep(0.001)
database = EmbeddedPostgres(pgdata, user)
try:
    database.start()
    print(database._server.psql("SELECT 40 + 2").split()[2], flush=True)
finally:
    database.stop()
"""


@pytest.fixture
def fresh_user() -> Iterator[str]:
    name = f"taxi_pg_{uuid.uuid4().hex[:8]}"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    yield name
    if os.geteuid() == 0:
        subprocess.run(["userdel", name], capture_output=True, check=False)


def test_two_first_starts_at_once_both_run_and_make_one_user(
        tmp_path: Path, fresh_user: str) -> None:
    go = tmp_path / "go"
    starters = [
        subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / f"pg{n}"), fresh_user,
                          str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in (1, 2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"pg{n}.ready").exists() for n in (1, 2)):
        assert time.monotonic() < deadline, "the starters never got ready"
        time.sleep(0.01)
    go.touch()  # both are polling for it: they start within a millisecond
    results = [s.communicate(timeout=120) for s in starters]
    for starter, (out, err) in zip(starters, results, strict=True):
        assert starter.returncode == 0, err[-3000:]
        assert out.strip() == "42"
    if os.geteuid() == 0:
        entry = pwd.getpwnam(fresh_user)
        passwd = Path("/etc/passwd").read_text().splitlines()
        assert sum(line.startswith(f"{fresh_user}:") for line in passwd) == 1
        for n in (1, 2):  # each cluster belongs to the user that exists now
            assert (tmp_path / f"pg{n}" / "PG_VERSION").stat().st_uid == entry.pw_uid


def wait_until_blocked_on_a_lock(pid: int, timeout: float = 30) -> None:
    """Until the kernel lists `pid` as waiting for a file lock (a `->` line of /proc/locks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and fields[fields.index("->") + 4] == str(pid):
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never waited for the lock")


def test_a_waiting_starter_finds_the_user_the_first_one_made(
        tmp_path: Path, fresh_user: str) -> None:
    """The lock serialises creators: while one holds it, the other waits, then finds the
    user and creates nothing (its own useradd would fail on an existing name)."""
    if os.geteuid() != 0:
        ensure_system_users([fresh_user])  # not root: nothing to create, nothing raised
        with pytest.raises(KeyError):
            pwd.getpwnam(fresh_user)
        return
    import fcntl

    lock_path = tmp_path / "lock"
    holder = lock_path.open("a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    waiter = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from taxi_pipeline.stack.prefect_database import ensure_system_users; "
         "ensure_system_users([sys.argv[1]], Path(sys.argv[2])); print('done')",
         fresh_user, str(lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        wait_until_blocked_on_a_lock(waiter.pid)
        ensure_system_users([fresh_user], lock_path=tmp_path / "other-lock")
        made = pwd.getpwnam(fresh_user)
    finally:
        holder.close()
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode == 0 and out.strip() == "done"
    assert pwd.getpwnam(fresh_user) == made
