"""The SQLite store: retention, migrations from every earlier version, WAL checkpoints, and
registries that cannot be used."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.paths import registry_path
from server.records import RequestRecord, TaskRecord
from server.registry import StoreFault, check_registry, connect
from server.registry.sqlite.checkpoint import Checkpointer
from server.registry.sqlite.schema import SCHEMA_VERSION
from server.registry.sqlite.store import BUSY_WAIT_S
from tests.registry_helpers import append, make_db, one_line_request, recover, sqlite_registry


@pytest.mark.parametrize("retention", [10, 50])
def test_retention_bounds_the_registry(tmp_path: Path, retention: int) -> None:
    registry = sqlite_registry(tmp_path, retention=retention)

    async def fill() -> None:
        await registry.open()
        for n in range(600):
            request = one_line_request(f"r{n}", f"found query: {n}\n")
            await registry.commit_intents(request)
            await append(registry, request.tasks[0])
            registry.note_request(request)
        await registry.close()  # commits the last notes

    asyncio.run(fill())
    conn = make_db(tmp_path)
    requests = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
    assert retention <= requests <= retention * 1.1 + 1
    assert tasks == requests
    # every line was claimed on its own; ended claims go at each prune
    assert conn.execute("SELECT count(*) FROM claims").fetchone()[0] <= retention
    assert (tmp_path / "log.txt").read_bytes().count(b"\n") == 600


def test_a_client_chosen_id_an_accepted_request_has_is_replaced_even_in_one_commit(
    tmp_path: Path,
) -> None:
    registry = sqlite_registry(tmp_path)
    requests = [one_line_request("chosen", f"message to {n}@example.com\n") for n in range(3)]
    for request in requests:
        request.id_from_client = True

    async def run() -> None:
        await registry.open()
        await registry.commit_intents(requests[0])
        await asyncio.gather(*(registry.commit_intents(r) for r in requests[1:]))
        await registry.close()

    asyncio.run(run())
    ids = [request.id for request in requests]
    assert ids[0] == "chosen" and len(set(ids)) == 3
    assert all(task.request_id == request.id for request in requests for task in request.tasks)
    conn = make_db(tmp_path)
    assert sorted(conn.execute("SELECT id FROM requests")) == sorted((i,) for i in ids)


# -- registries that cannot be used -----------------------------------------------------------


def opened(data_dir: Path) -> StoreFault | None:
    """Open and close a registry on `data_dir`; the fault that kept it from opening, if any."""

    async def run() -> None:
        registry = sqlite_registry(data_dir)
        await registry.open()
        await registry.close()

    try:
        asyncio.run(run())
    except StoreFault as exc:
        return exc
    return None


def test_a_file_that_is_not_a_database_is_refused_in_one_line(tmp_path: Path) -> None:
    path = registry_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(16384))
    fault = opened(tmp_path)
    assert fault is not None and "\n" not in str(fault)
    assert str(fault) == f"{path} is not a usable task registry: file is not a database"


def test_a_symlinked_state_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / ".bgtasks").symlink_to(elsewhere)
    fault = opened(data)
    assert fault is not None and "is a symbolic link" in str(fault)
    assert list(elsewhere.iterdir()) == []  # nothing was written out there


def test_a_symlinked_registry_file_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.db"
    sqlite3.connect(outside).close()
    path = registry_path(tmp_path / "data")
    path.parent.mkdir(parents=True)
    path.symlink_to(outside)
    assert "is a symbolic link" in str(opened(tmp_path / "data"))


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files made immutable (`chattr +i`, which even root cannot write), undone afterwards."""
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_read_only_registry_is_refused_at_start(tmp_path: Path, immutable: list[Path]) -> None:
    assert opened(tmp_path) is None
    path = registry_path(tmp_path)
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr cannot make files immutable here: {done.stderr.decode().strip()}")
    immutable.append(path)
    fault = opened(tmp_path)
    assert fault is not None and "readonly" in str(fault)
    with pytest.raises(StoreFault, match="readonly"):
        check_registry(tmp_path)


def test_a_registry_damaged_while_open_refuses_work_from_then_on(tmp_path: Path) -> None:
    registry = sqlite_registry(tmp_path)

    async def run() -> tuple[str, str, str]:
        await registry.open()
        for n in range(50):
            request = one_line_request(f"r{n}", f"found query: {n}\n")
            await registry.commit_intents(request)
            await append(registry, request.tasks[0])
        await registry.flush()
        outside = sqlite3.connect(registry_path(tmp_path), isolation_level=None)
        outside.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the database file
        outside.close()
        with open(registry_path(tmp_path), "r+b") as db:  # dd bs=4096 count=4 conv=notrunc
            db.write(os.urandom(4 * 4096))
        # The first commit or read that touches the damage finds it ...
        with pytest.raises(StoreFault) as found:
            await registry.commit_intents(one_line_request("after", "x\n"))
            await registry.list_tasks(None, 1000)
        # ... and from then on all work is refused at once, reads too.
        with pytest.raises(StoreFault) as intent:
            await registry.commit_intents(one_line_request("late", "y\n"))
        with pytest.raises(StoreFault) as read:
            await registry.count_unfinished()
        await registry.close()
        return str(found.value), str(intent.value), str(read.value)

    found, intent, read = asyncio.run(run())
    assert "unusable: file is not a database" in found and intent == read == found


# -- migrations ---------------------------------------------------------------------------


# The tasks table of the second and third versions: keyed by pk, each line's claim on its row.
TASKS_WITH_CLAIMS = """
        CREATE TABLE tasks (pk INTEGER PRIMARY KEY, id TEXT NOT NULL, request_id TEXT NOT NULL,
            seq INTEGER NOT NULL, owner TEXT NOT NULL, file TEXT NOT NULL, line TEXT NOT NULL,
            status TEXT NOT NULL, queued_at REAL NOT NULL, started_at REAL, finished_at REAL,
            error TEXT, inode INTEGER, write_offset INTEGER, claim INTEGER);
"""


def old_registry(data_dir: Path, script: str, *, with_counters: bool = True) -> None:
    """A registry as an earlier version left it: the requests table (and the counters table of
    versions 1-3) and what `script` adds."""
    path = registry_path(data_dir)
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(
        """
        CREATE TABLE requests (id TEXT PRIMARY KEY, method TEXT NOT NULL, path TEXT NOT NULL,
            received_at REAL NOT NULL, response_sent_at REAL, status_code INTEGER);
        """
        + (
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT INTO counters VALUES ('claim', 0);"
            if with_counters
            else ""
        )
        + script
    )
    old.close()


def test_a_registry_from_the_first_version_is_migrated_and_its_work_recovered(
    tmp_path: Path,
) -> None:
    old_registry(
        tmp_path,
        """
        CREATE TABLE tasks (id TEXT PRIMARY KEY, request_id TEXT NOT NULL, seq INTEGER NOT NULL,
            owner TEXT NOT NULL, file TEXT NOT NULL, line TEXT NOT NULL, status TEXT NOT NULL,
            queued_at REAL NOT NULL, started_at REAL, finished_at REAL, error TEXT,
            inode INTEGER, write_offset INTEGER, claim INTEGER);
        CREATE INDEX tasks_by_request ON tasks(request_id);
        INSERT INTO requests VALUES ('r1', 'POST', '/x', 1.0, 1.1, 200);
        INSERT INTO tasks (id, request_id, seq, owner, file, line, status, queued_at)
            VALUES ('a-1', 'r1', 0, 'dead', 'log.txt', 'found query: q\n', 'done', 1.0),
                   ('a-2', 'r1', 1, 'dead', 'log.txt', 'message to a@example.com\n', 'queued', 1.0);
        """,
    )
    assert recover(tmp_path) == ["a-2"]
    conn = make_db(tmp_path)
    rows = conn.execute("SELECT pk, id, status FROM tasks ORDER BY pk").fetchall()
    assert rows == [(1, "a-1", "done"), (2, "a-2", "recovered")]
    assert (tmp_path / "log.txt").read_bytes() == b"message to a@example.com\n"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_registry_from_the_second_version_finds_a_request_s_tasks_without_its_index(
    tmp_path: Path,
) -> None:
    old_registry(
        tmp_path,
        TASKS_WITH_CLAIMS
        + """
        CREATE INDEX tasks_by_request ON tasks(request_id);
        INSERT INTO requests VALUES ('r1', 'POST', '/x', 1.0, 1.1, 200),
                                    ('r2', 'POST', '/x', 2.0, 2.1, 200),
                                    ('plain', 'POST', '/y', 3.0, 3.1, 200);
        INSERT INTO tasks (pk, id, request_id, seq, owner, file, line, status, queued_at) VALUES
            (1, 'a-1', 'r1', 0, 'dead', 'log.txt', 'found query: q\n', 'done', 1.0),
            (2, 'a-2', 'r1', 1, 'dead', 'log.txt', 'message to a@example.com\n', 'done', 1.0),
            (3, 'a-3', 'r2', 0, 'dead', 'log.txt', 'message to b@example.com\n', 'queued', 2.0);
        """,
    )
    registry = sqlite_registry(tmp_path, "new")
    request = RequestRecord("r3", "POST", "/x", 4.0, status_code=200)
    line = "message to c@example.com\n"
    request.tasks.append(TaskRecord("new-1", "r3", 0, "log.txt", line, 4.0, data=line.encode()))

    async def run() -> None:
        adopted = await registry.open()
        assert [task.id for task in adopted] == ["a-3"]
        found = await registry.get_request("r1")
        assert found is not None and [t["id"] for t in found["tasks"]] == ["a-1", "a-2"]
        found = await registry.get_request("plain")
        assert found is not None and found["tasks"] == []
        assert await registry.get_request("nope") is None
        await registry.commit_intents(request)  # a request of this version
        await append(registry, request.tasks[0])
        found = await registry.get_request("r3")
        assert found is not None and [t["id"] for t in found["tasks"]] == ["new-1"]
        await registry.close()

    asyncio.run(run())
    conn = make_db(tmp_path)
    spans = conn.execute("SELECT id, first_task, last_task FROM requests ORDER BY rowid").fetchall()
    assert spans == [("r1", 1, 2), ("r2", 3, 3), ("plain", None, None), ("r3", 4, 4)]
    indexes = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    assert ("tasks_by_request",) not in indexes


def test_a_registry_from_the_third_version_keeps_its_claims(tmp_path: Path) -> None:
    """A dead owner's two claimed lines, one written and one not, in a registry that kept
    claims on the task rows and numbered them in a counters table."""
    written, lost = "found query: q\n", "message to a@example.com\n"
    log = tmp_path / "log.txt"
    log.write_bytes(written.encode())
    old_registry(
        tmp_path,
        f"""
        ALTER TABLE requests ADD COLUMN first_task INTEGER;
        ALTER TABLE requests ADD COLUMN last_task INTEGER;
        {TASKS_WITH_CLAIMS}
        INSERT INTO requests VALUES ('r1', 'POST', '/x', 1.0, 1.1, 200, 1, 2);
        INSERT INTO tasks VALUES
            (1, 'a-1', 'r1', 0, 'dead', 'log.txt', '{written}', 'running', 1.0, 1.0, NULL, NULL,
             {log.stat().st_ino}, 0, 5),
            (2, 'a-2', 'r1', 1, 'dead', 'log.txt', '{lost}', 'running', 1.0, 1.0, NULL, NULL,
             {log.stat().st_ino}, {len(written)}, 6);
        UPDATE counters SET value = 6;
        """,
    )
    assert recover(tmp_path) == ["a-1", "a-2"]
    assert log.read_bytes() == (written + lost).encode()
    conn = make_db(tmp_path)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(tasks)")]
    assert "claim" not in columns
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "counters" not in tables
    assert conn.execute("SELECT max(claim) FROM claims").fetchone()[0] == 7  # numbering went on


def test_a_registry_from_the_fourth_version_unpacks_its_claims(tmp_path: Path) -> None:
    """Version 4 packed a claim's keys as runs ("1-2"); a dead owner's claim of two lines,
    the first written, is resolved from them after the migration."""
    lines = ["found query: q\n", "message to a@example.com\n"]
    log = tmp_path / "log.txt"
    log.write_bytes(lines[0].encode())
    old_registry(
        tmp_path,
        f"""
        ALTER TABLE requests ADD COLUMN first_task INTEGER;
        ALTER TABLE requests ADD COLUMN last_task INTEGER;
        CREATE TABLE tasks (pk INTEGER PRIMARY KEY, id TEXT NOT NULL, request_id TEXT NOT NULL,
            seq INTEGER NOT NULL, owner TEXT NOT NULL, file TEXT NOT NULL, line TEXT NOT NULL,
            status TEXT NOT NULL, queued_at REAL NOT NULL, started_at REAL, finished_at REAL,
            error TEXT);
        CREATE TABLE claims (claim INTEGER PRIMARY KEY, owner TEXT NOT NULL, file TEXT NOT NULL,
            inode INTEGER NOT NULL, start INTEGER NOT NULL, tasks TEXT NOT NULL,
            ended INTEGER NOT NULL);
        INSERT INTO requests VALUES ('r1', 'POST', '/x', 1.0, 1.1, 200, 1, 2);
        INSERT INTO tasks VALUES
            (1, 'a-1', 'r1', 0, 'dead', 'log.txt', '{lines[0]}', 'running', 1.0, 1.0, NULL, NULL),
            (2, 'a-2', 'r1', 1, 'dead', 'log.txt', '{lines[1]}', 'running', 1.0, 1.0, NULL, NULL);
        INSERT INTO claims VALUES (9, 'dead', 'log.txt', {log.stat().st_ino}, 0, '1-2', 0);
        """,
        with_counters=False,
    )
    assert recover(tmp_path) == ["a-1", "a-2"]
    assert log.read_bytes() == "".join(lines).encode()
    conn = make_db(tmp_path)
    assert conn.execute("SELECT tasks FROM claims WHERE claim = 9").fetchone()[0] == "[1,2]"


def test_a_registry_of_a_newer_version_is_refused(tmp_path: Path) -> None:
    conn = make_db(tmp_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    fault = opened(tmp_path)
    assert fault is not None and "upgrade bgtasks" in str(fault)


# -- checkpoints ----------------------------------------------------------------------------


def open_writer(path: Path) -> sqlite3.Connection:
    """A connection that writes as the server's does: no automatic checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = connect(path)
    writer.execute(f"PRAGMA busy_timeout = {int(BUSY_WAIT_S * 1000)}")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE IF NOT EXISTS t (b BLOB)")
    return writer


def commit_blobs(writer: sqlite3.Connection, commits: int) -> None:
    for _ in range(commits):
        writer.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))


@pytest.mark.parametrize("over", [1, 0])
def test_a_wal_grown_past_its_limit_is_restarted(tmp_path: Path, over: int) -> None:
    # Under steady load a commit lands during every passive checkpoint, so the WAL never
    # starts over; past the limit, a RESTART holds commits off until it has copied
    # everything. That race needs load to show: measure 6 of the benchmark does.
    path = registry_path(tmp_path)
    writer = open_writer(path)
    commit_blobs(writer, 100)
    wal = Path(f"{path}-wal")
    before = wal.stat().st_size
    pages = (before - 32) // (4096 + 24)  # the WAL's header, then a header and a page a frame
    checkpointing = sqlite3.connect(path, timeout=0.02, isolation_level=None)
    try:
        restarted = Checkpointer(path, limit_pages=pages - over).checkpoint(checkpointing)
    finally:
        checkpointing.close()
    assert restarted == bool(over)
    commit_blobs(writer, 1)
    assert wal.stat().st_size == before  # written again from its start
    assert writer.execute("SELECT count(*) FROM t").fetchone()[0] == 101
    writer.close()


@pytest.mark.parametrize("snapshot", ["older", "latest"])
def test_a_reader_makes_the_checkpoint_give_up_quickly_and_commits_go_on(
    tmp_path: Path, snapshot: str
) -> None:
    """A reader on an older snapshot holds back the passive round, so no RESTART is tried; one
    on the latest snapshot makes the RESTART wait its short timeout, then give up."""
    path = registry_path(tmp_path)
    writer = open_writer(path)
    reader = connect(path, readonly=True)
    reader.execute("BEGIN")
    if snapshot == "older":
        reader.execute("SELECT count(*) FROM t").fetchone()
    commit_blobs(writer, 100)
    if snapshot == "latest":
        reader.execute("SELECT count(*) FROM t").fetchone()
    checkpointing = sqlite3.connect(path, timeout=0.02, isolation_level=None)
    started = time.monotonic()
    try:
        assert not Checkpointer(path, limit_pages=10).checkpoint(checkpointing)
    finally:
        checkpointing.close()
    assert time.monotonic() - started < 1.0
    writer.execute("INSERT INTO t VALUES (x'00')")
    assert writer.execute("SELECT count(*) FROM t").fetchone()[0] == 101
    reader.rollback()
    reader.close()
    writer.close()
