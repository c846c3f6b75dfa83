"""Crash recovery and retention of the registry, on real files and a real SQLite database."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from pathlib import Path

import pytest

from server.paths import owners_dir, registry_path
from server.records import RequestRecord, TaskRecord
from server.registry import BUSY_WAIT_S, SCHEMA, Checkpointer, Registry, connect
from server.status import TaskStatus


def make_db(data_dir: Path) -> sqlite3.Connection:
    path = registry_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA)
    return conn


def add_task(
    conn: sqlite3.Connection,
    task_id: str,
    line: str,
    *,
    owner: str = "dead",
    status: str = "running",
    file: str = "log.txt",
    inode: int | None = None,
    offset: int | None = None,
    claim: int | None = None,
    seq: int = 0,
) -> None:
    pk = conn.execute(
        "INSERT INTO tasks (id, request_id, seq, owner, file, line, status, queued_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 1.0)",
        (task_id, f"r-{task_id}", seq, owner, file, line, status),
    ).lastrowid
    if claim is not None:
        ended = status not in ("queued", "running")
        conn.execute(
            "INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, ?)",
            (claim, owner, file, inode, offset, str(pk), ended),
        )
    conn.execute(
        "INSERT INTO requests VALUES (?, 'POST', '/x', 1.0, 1.1, 200, ?, ?)",
        (f"r-{task_id}", pk, pk),
    )


def status_of(conn: sqlite3.Connection, task_id: str) -> str:
    return str(conn.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()[0])


async def append(registry: Registry, task: TaskRecord) -> None:
    """Submit the task's line and wait for its end; raise its error."""
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def report(error: BaseException | None) -> None:
        if error is None:
            ended.set_result(None)
        else:
            ended.set_exception(error)

    registry.submit(task, report)
    await ended


def recover(data_dir: Path) -> list[str]:
    registry = Registry(data_dir, owner="fresh", retention=100)
    try:
        return [task.id for task in registry.open()]
    finally:
        registry.close()


def test_queued_task_of_a_dead_server_is_written_once(tmp_path: Path) -> None:
    conn = make_db(tmp_path)
    add_task(conn, "t1", "found query: a\n", status="queued")
    add_task(conn, "t2", "message to a@example.com\n", status="queued", seq=1)
    assert recover(tmp_path) == ["t1", "t2"]
    assert (tmp_path / "log.txt").read_bytes() == b"found query: a\nmessage to a@example.com\n"
    assert status_of(conn, "t1") == status_of(conn, "t2") == "recovered"
    assert recover(tmp_path) == []  # idempotent: nothing left to do
    assert (tmp_path / "log.txt").read_bytes().count(b"\n") == 2


def test_a_line_already_at_its_claimed_offset_is_not_written_again(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\nmessage to a@example.com\n")
    conn = make_db(tmp_path)
    add_task(conn, "t1", "message to a@example.com\n", inode=log.stat().st_ino, offset=8, claim=1)
    assert recover(tmp_path) == ["t1"]
    assert log.read_bytes() == b"earlier\nmessage to a@example.com\n"
    assert status_of(conn, "t1") == "recovered"


def test_a_claimed_line_that_never_landed_is_written(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\n")
    conn = make_db(tmp_path)
    add_task(conn, "t1", "message to a@example.com\n", inode=log.stat().st_ino, offset=8, claim=1)
    recover(tmp_path)
    assert log.read_bytes() == b"earlier\nmessage to a@example.com\n"


def test_a_line_cut_short_at_the_end_of_the_file_is_completed(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\nmessage to a@ex")
    conn = make_db(tmp_path)
    add_task(conn, "t1", "message to a@example.com\n", inode=log.stat().st_ino, offset=8, claim=1)
    add_task(conn, "t2", "found query: b\n", status="queued", seq=1)
    recover(tmp_path)
    assert log.read_bytes() == b"earlier\nmessage to a@example.com\nfound query: b\n"


def claims_collide(data_dir: Path) -> tuple[Path, sqlite3.Connection]:
    """t1 (owner "dead") claimed offset 0 of log.txt and never wrote; t2, a live worker's
    task with the same bytes, then claimed offset 0 and wrote its line there."""
    log = data_dir / "log.txt"
    log.write_bytes(b"message to a@example.com\n")
    inode = log.stat().st_ino
    conn = make_db(data_dir)
    add_task(conn, "t1", "message to a@example.com\n", inode=inode, offset=0, claim=1)
    add_task(
        conn,
        "t2",
        "message to a@example.com\n",
        owner="other",
        status="done",
        inode=inode,
        offset=0,
        claim=2,
    )
    return log, conn


def test_identical_bytes_from_a_later_claim_do_not_count(tmp_path: Path) -> None:
    log, _ = claims_collide(tmp_path)
    recover(tmp_path)
    assert log.read_bytes() == b"message to a@example.com\n" * 2


def test_a_replaced_file_gets_the_line(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_bytes(b"message to a@example.com\n")
    conn = make_db(tmp_path)
    add_task(
        conn, "t1", "message to a@example.com\n", inode=log.stat().st_ino + 1, offset=0, claim=1
    )
    recover(tmp_path)
    assert log.read_bytes() == b"message to a@example.com\n" * 2


def test_tasks_of_a_live_server_are_left_alone(tmp_path: Path) -> None:
    conn = make_db(tmp_path)
    add_task(conn, "t1", "found query: a\n", owner="alive", status="queued")
    owners_dir(tmp_path).mkdir(parents=True)
    fd = os.open(owners_dir(tmp_path) / "alive.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert recover(tmp_path) == []
        assert status_of(conn, "t1") == "queued"
    finally:
        os.close(fd)
    assert recover(tmp_path) == ["t1"]


def test_recovery_never_writes_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    (data / "log.txt").symlink_to(outside)
    conn = make_db(data)
    add_task(conn, "t1", "found query: a\n", status="queued")
    recover(data)
    assert outside.read_bytes() == b""
    row = conn.execute("SELECT status, error FROM tasks WHERE id = 't1'").fetchone()
    assert row[0] == "failed" and "recovery failed" in row[1]


@pytest.mark.parametrize("retention", [10, 50])
def test_retention_bounds_the_registry(tmp_path: Path, retention: int) -> None:
    registry = Registry(tmp_path, owner="me", retention=retention)
    registry.open()

    async def fill() -> None:
        for n in range(600):
            request = RequestRecord(f"r{n}", "POST", "/x", float(n))
            request.tasks.append(
                TaskRecord(
                    f"t{n}",
                    request.id,
                    0,
                    "log.txt",
                    f"found query: {n}\n",
                    float(n),
                    data=f"found query: {n}\n".encode(),
                )
            )
            await registry.commit_intents(request)
            await append(registry, request.tasks[0])
            registry.note_request(request)
        await asyncio.sleep(0.05)

    asyncio.run(fill())
    registry.close()
    conn = make_db(tmp_path)
    requests = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
    assert retention <= requests <= retention * 1.1 + 1
    assert tasks == requests
    # every line was claimed on its own; ended claims go at each prune
    assert conn.execute("SELECT count(*) FROM claims").fetchone()[0] <= retention
    assert (tmp_path / "log.txt").read_bytes().count(b"\n") == 600


def test_pruning_keeps_the_claims_recovery_still_needs(tmp_path: Path) -> None:
    log, conn = claims_collide(tmp_path)
    for n in range(30):  # newer requests push t2's request past retention
        conn.execute(
            "INSERT INTO requests VALUES (?, 'POST', '/x', 2.0, 2.1, 200, NULL, NULL)", (f"new{n}",)
        )
    owners_dir(tmp_path).mkdir(parents=True)
    fd = os.open(owners_dir(tmp_path) / "dead.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # so that the pruner's open() does not recover it first
    try:
        registry = Registry(tmp_path, owner="pruner", retention=10)
        registry.open()
        registry._prune(registry._conn)  # type: ignore[arg-type]
        registry.close()
        # t2's row went with its request; its claim stays: t1's recovery depends on it
        assert conn.execute("SELECT count(*) FROM tasks WHERE id = 't2'").fetchone()[0] == 0
        assert conn.execute("SELECT claim FROM claims ORDER BY claim").fetchall() == [(1,), (2,)]
    finally:
        os.close(fd)
    recover(tmp_path)
    assert log.read_bytes() == b"message to a@example.com\n" * 2


def test_the_prune_floor_holds_this_process_s_claims_until_their_end_is_committed(
    tmp_path: Path,
) -> None:
    from server.registry import NOTE_WINDOW_S

    registry = Registry(tmp_path, owner="me", retention=10)
    registry.open()
    line = "message to a@example.com\n"
    request = RequestRecord("r1", "POST", "/x", 1.0)
    task = TaskRecord("t1", "r1", 0, "log.txt", line, 1.0, data=line.encode())
    request.tasks.append(task)
    floors: list[int | None] = []

    async def run() -> None:
        conn = registry._conn
        assert conn is not None
        floors.append(registry._oldest_open_claim(conn))
        await registry.commit_intents(request)
        await append(registry, task)  # claimed and written; `done` rides a later commit
        floors.append(registry._oldest_open_claim(conn))
        await asyncio.sleep(NOTE_WINDOW_S * 3)
        floors.append(registry._oldest_open_claim(conn))

    asyncio.run(run())
    registry.close()
    assert task.claim is not None
    assert floors == [None, task.claim, None]
    assert status_of(make_db(tmp_path), "t1") == "done"


# The tasks table of the second and third versions: keyed by pk, each line's claim on its row.
TASKS_WITH_CLAIMS = """
        CREATE TABLE tasks (pk INTEGER PRIMARY KEY, id TEXT NOT NULL, request_id TEXT NOT NULL,
            seq INTEGER NOT NULL, owner TEXT NOT NULL, file TEXT NOT NULL, line TEXT NOT NULL,
            status TEXT NOT NULL, queued_at REAL NOT NULL, started_at REAL, finished_at REAL,
            error TEXT, inode INTEGER, write_offset INTEGER, claim INTEGER);
"""


def old_registry(data_dir: Path, tasks_and_rows: str) -> None:
    """A registry as an earlier version left it: the same requests and counters tables, the
    given tasks table with an index on request_id, and the given rows."""
    path = registry_path(data_dir)
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(
        """
        CREATE TABLE requests (id TEXT PRIMARY KEY, method TEXT NOT NULL, path TEXT NOT NULL,
            received_at REAL NOT NULL, response_sent_at REAL, status_code INTEGER);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO counters VALUES ('claim', 0);
        """
        + tasks_and_rows
        + "CREATE INDEX tasks_by_request ON tasks(request_id);"
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
        INSERT INTO requests VALUES ('r1', 'POST', '/x', 1.0, 1.1, 200);
        INSERT INTO tasks (id, request_id, seq, owner, file, line, status, queued_at)
            VALUES ('a-1', 'r1', 0, 'dead', 'log.txt', 'found query: q\n', 'done', 1.0),
                   ('a-2', 'r1', 1, 'dead', 'log.txt', 'message to a@example.com\n', 'queued', 1.0);
        """,
    )
    registry = Registry(tmp_path, owner="new", retention=100)
    recovered = registry.open()
    registry.close()
    assert [task.id for task in recovered] == ["a-2"]
    conn = make_db(tmp_path)
    rows = conn.execute("SELECT pk, id, status FROM tasks ORDER BY pk").fetchall()
    assert rows == [(1, "a-1", "done"), (2, "a-2", "recovered")]
    assert (tmp_path / "log.txt").read_bytes() == b"message to a@example.com\n"


def test_a_registry_from_the_second_version_finds_a_request_s_tasks_without_its_index(
    tmp_path: Path,
) -> None:
    old_registry(
        tmp_path,
        TASKS_WITH_CLAIMS
        + """
        INSERT INTO requests VALUES ('r1', 'POST', '/x', 1.0, 1.1, 200),
                                    ('r2', 'POST', '/x', 2.0, 2.1, 200),
                                    ('plain', 'POST', '/y', 3.0, 3.1, 200);
        INSERT INTO tasks (pk, id, request_id, seq, owner, file, line, status, queued_at) VALUES
            (1, 'a-1', 'r1', 0, 'dead', 'log.txt', 'found query: q\n', 'done', 1.0),
            (2, 'a-2', 'r1', 1, 'dead', 'log.txt', 'message to a@example.com\n', 'done', 1.0),
            (3, 'a-3', 'r2', 0, 'dead', 'log.txt', 'message to b@example.com\n', 'queued', 2.0);
        """,
    )
    registry = Registry(tmp_path, owner="new", retention=100)
    recovered = registry.open()
    try:
        assert [task.id for task in recovered] == ["a-3"]
        found = registry.get_request("r1")
        assert found is not None and [t["id"] for t in found["tasks"]] == ["a-1", "a-2"]
        found = registry.get_request("plain")
        assert found is not None and found["tasks"] == []
        assert registry.get_request("nope") is None
        request = RequestRecord("r3", "POST", "/x", 4.0, status_code=200)
        line = "message to c@example.com\n"
        request.tasks.append(TaskRecord("new-1", "r3", 0, "log.txt", line, 4.0, data=line.encode()))

        async def a_request_of_this_version() -> None:
            await registry.commit_intents(request)
            await append(registry, request.tasks[0])

        asyncio.run(a_request_of_this_version())
        found = registry.get_request("r3")
        assert found is not None and [t["id"] for t in found["tasks"]] == ["new-1"]
    finally:
        registry.close()
    conn = make_db(tmp_path)
    spans = conn.execute("SELECT id, first_task, last_task FROM requests ORDER BY rowid").fetchall()
    assert spans == [("r1", 1, 2), ("r2", 3, 3), ("plain", None, None), ("r3", 4, 4)]
    indexes = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    assert ("tasks_by_request",) not in indexes


def test_a_short_write_keeps_the_whole_lines_and_cuts_off_the_part_of_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path, owner="me", retention=100)
    registry.open()
    lines = ["found query: a\n", "message to a@example.com\n", "found query: b\n", "x\n"]
    request = RequestRecord("r1", "POST", "/x", 1.0)
    for n, line in enumerate(lines):
        request.tasks.append(TaskRecord(f"t{n}", "r1", n, "log.txt", line, 1.0, data=line.encode()))
    ends: list[BaseException | None] = []
    real_write = os.write

    def disk_fills_up(fd: int, data: bytes) -> int:  # room for the first line and 3 bytes
        return real_write(fd, data[: len(lines[0]) + 3])

    async def run() -> None:
        await registry.commit_intents(request)
        monkeypatch.setattr(os, "write", disk_fills_up)
        for task in request.tasks[:3]:
            registry.submit(task, ends.append)
        registry.flush()
        monkeypatch.setattr(os, "write", real_write)
        await append(registry, request.tasks[3])

    asyncio.run(run())
    registry.close()
    assert ends[0] is None
    tried = sum(len(line) for line in lines[:3])
    assert [str(e) for e in ends[1:]] == [f"short write: {len(lines[0]) + 3} of {tried} bytes"] * 2
    assert (tmp_path / "log.txt").read_text() == "found query: a\nx\n"
    # (marking the two failed is the runner's part, on hearing of the error)
    assert [t.status for t in request.tasks] == [
        TaskStatus.DONE,
        "queued",
        "queued",
        TaskStatus.DONE,
    ]


def test_a_claim_s_lines_are_placed_one_after_another_and_only_the_missing_ones_written(
    tmp_path: Path,
) -> None:
    """One claim of three lines (keys 1, 3 and 4: key 2 is another file's) from offset 8:
    the first landed whole, the second in part, the third not at all."""
    lines = ["found query: a\n", "message to a@example.com\n", "found query: b\n"]
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\n" + lines[0].encode() + b"message to")
    conn = make_db(tmp_path)
    add_task(conn, "t1", lines[0])
    add_task(conn, "other", "x\n", file="README.md", status="queued")
    add_task(conn, "t2", lines[1], seq=1)
    add_task(conn, "t3", lines[2], seq=2)
    conn.execute(
        "INSERT INTO claims VALUES (7, 'dead', 'log.txt', ?, 8, '1,3-4', 0)",
        (log.stat().st_ino,),
    )
    assert sorted(recover(tmp_path)) == ["other", "t1", "t2", "t3"]
    assert log.read_bytes() == b"earlier\n" + "".join(lines).encode()
    assert (tmp_path / "README.md").read_bytes() == b"x\n"
    assert conn.execute("SELECT count(*) FROM claims WHERE NOT ended").fetchone()[0] == 0


def test_a_claim_s_line_that_ended_still_takes_its_room(tmp_path: Path) -> None:
    """Keys 1-3 from offset 0: the first line's task is done, the second landed, the third
    did not. The done line's length places the others."""
    lines = ["found query: a\n", "message to a@example.com\n", "found query: b\n"]
    log = tmp_path / "log.txt"
    log.write_bytes("".join(lines[:2]).encode())
    conn = make_db(tmp_path)
    add_task(conn, "t1", lines[0], status="done")
    add_task(conn, "t2", lines[1], seq=1)
    add_task(conn, "t3", lines[2], seq=2)
    conn.execute(
        "INSERT INTO claims VALUES (1, 'dead', 'log.txt', ?, 0, '1-3', 0)", (log.stat().st_ino,)
    )
    assert sorted(recover(tmp_path)) == ["t2", "t3"]
    assert log.read_bytes() == "".join(lines).encode()


def test_a_recovery_that_died_after_writing_is_not_written_again(tmp_path: Path) -> None:
    """The dead owner claimed offset 8 (claim 1) and never wrote; another worker then wrote
    there (claim 2); the dead owner's recoverer claimed the end of the file in its name
    (claim 3), wrote the line, and died before marking it."""
    line = "message to a@example.com\n"
    log = tmp_path / "log.txt"
    log.write_bytes(b"earlier\n" + b"someone\n" + line.encode())
    inode = log.stat().st_ino
    conn = make_db(tmp_path)
    add_task(conn, "t1", line, inode=inode, offset=8, claim=1)
    add_task(conn, "s1", "someone\n", owner="other", status="done", inode=inode, offset=8, claim=2)
    conn.execute("INSERT INTO claims VALUES (3, 'dead', 'log.txt', ?, 16, '1', 0)", (inode,))
    assert recover(tmp_path) == ["t1"]
    assert log.read_bytes() == b"earlier\nsomeone\n" + line.encode()


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


def test_a_later_claim_that_started_before_a_line_means_the_line_is_not_there(
    tmp_path: Path,
) -> None:
    """The dead owner claimed "aa" and "bb" from offset 0 and wrote nothing; another worker's
    later claim, also from 0, wrote "xx" and "bb". The "bb" at offset 3 is not the dead one's."""
    log = tmp_path / "log.txt"
    log.write_bytes(b"xx\nbb\n")
    inode = log.stat().st_ino
    conn = make_db(tmp_path)
    add_task(conn, "t1", "aa\n")
    add_task(conn, "t2", "bb\n", seq=1)
    conn.execute("INSERT INTO claims VALUES (1, 'dead', 'log.txt', ?, 0, '1-2', 0)", (inode,))
    conn.execute("INSERT INTO claims VALUES (2, 'other', 'log.txt', ?, 0, '3-4', 1)", (inode,))
    assert recover(tmp_path) == ["t1", "t2"]
    assert log.read_bytes() == b"xx\nbb\naa\nbb\n"


def test_one_group_commit_claims_each_file_once_with_its_lines_in_write_order(
    tmp_path: Path,
) -> None:
    (tmp_path / "README.md").write_bytes(b"# notes\n")
    registry = Registry(tmp_path, owner="me", retention=100)
    registry.open()
    first = RequestRecord("r1", "POST", "/x", 1.0)
    second = RequestRecord("r2", "POST", "/x", 2.0)
    for request, file, line in [
        (first, "log.txt", "found query: a\n"),
        (first, "README.md", "intro\n"),
        (first, "log.txt", "message to a@example.com\n"),
        (second, "log.txt", "message to b@example.com\n"),
    ]:
        task_id = f"{request.id}-{len(request.tasks)}"
        task = TaskRecord(task_id, request.id, len(request.tasks), file, line, 1.0)
        task.data = line.encode()
        request.tasks.append(task)
    ends: list[BaseException | None] = []

    async def run() -> None:
        await registry.commit_intents(first)
        await registry.commit_intents(second)
        # written in this order, not in key order
        for task in [second.tasks[0], *first.tasks]:
            registry.submit(task, ends.append)
        registry.flush()
        await asyncio.sleep(0.2)

    asyncio.run(run())
    registry.close()
    assert ends == [None] * 4
    conn = make_db(tmp_path)
    claims = conn.execute("SELECT file, start, tasks, ended FROM claims ORDER BY claim").fetchall()
    assert claims == [("README.md", 8, "2", 1), ("log.txt", 0, "4,1,3", 1)]
    assert (tmp_path / "log.txt").read_bytes() == (
        b"message to b@example.com\nfound query: a\nmessage to a@example.com\n"
    )
    rows = conn.execute("SELECT status, started_at IS NOT NULL FROM tasks").fetchall()
    assert rows == [("done", 1)] * 4


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
    # starts over (it grew ~25 MB a second); past the limit, a RESTART holds commits off until
    # it has copied everything. That race needs load to show: measure 6 of the benchmark does.
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
