"""Helpers for the registry's tests: a registry on SQLite, rows written as a dead owner left
them, and a fresh start that recovers them; a registry on PostgreSQL, and what a `kill -9`
after a claim leaves there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

from server.paths import registry_path
from server.records import RequestRecord, TaskRecord
from server.registry import Registry, SqliteStore
from server.registry.claims import place_lines
from server.registry.files import DataFiles
from server.registry.postgres import PostgresStore
from server.registry.sqlite.schema import SCHEMA, SCHEMA_VERSION
from server.registry.store import Changes
from server.retries import RetryPolicy
from server.runner import TaskRunner
from server.status import UNFINISHED


def sqlite_registry(
    data_dir: Path, owner: str = "me", retention: int = 100, lock_timeout: float = 5.0
) -> Registry:
    store = SqliteStore(data_dir, retention=retention, lock_timeout=lock_timeout)
    return Registry(data_dir, owner=owner, store=store, lock_timeout=lock_timeout)


def make_db(data_dir: Path) -> sqlite3.Connection:
    """The registry's database, created at this version if need be; autocommit."""
    path = registry_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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
) -> int:
    """A task (and its request) as `owner` left it, with a claim of its line alone if
    `claim` is given. Returns its key."""
    pk = conn.execute(
        "INSERT INTO tasks (id, request_id, seq, owner, file, line, status, queued_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 1.0)",
        (task_id, f"r-{task_id}", seq, owner, file, line, status),
    ).lastrowid
    assert pk is not None
    if claim is not None:
        add_claim(conn, claim, [pk], owner=owner, file=file, inode=inode or 0, start=offset or 0)
        if status not in UNFINISHED:
            conn.execute("UPDATE claims SET ended = 1 WHERE claim = ?", (claim,))
    conn.execute(
        "INSERT INTO requests VALUES (?, 'POST', '/x', 1.0, 1.1, 200, ?, ?)",
        (f"r-{task_id}", pk, pk),
    )
    return pk


def add_claim(
    conn: sqlite3.Connection,
    number: int,
    keys: list[int],
    *,
    owner: str = "dead",
    file: str = "log.txt",
    inode: int,
    start: int,
    ended: bool = False,
) -> None:
    conn.execute(
        "INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, ?)",
        (number, owner, file, inode, start, json.dumps(keys), ended),
    )


def status_of(conn: sqlite3.Connection, task_id: str) -> str:
    return str(conn.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()[0])


def recover(data_dir: Path, owner: str = "fresh") -> list[str]:
    """Start an owner on `data_dir` as the server does: it recovers at open, and runs the tasks
    it adopted (with no delay, and one attempt each: retries are not what these tests are
    about) before it stops. Returns the ids of the tasks it finished (recovered, or failed), in
    key order."""

    async def start_and_stop() -> None:
        registry = sqlite_registry(data_dir, owner)
        adopted = await registry.open()
        runner = TaskRunner(registry, delay=0, max_running=100, retries=RetryPolicy(max_attempts=1))
        runner.adopt(adopted)
        await runner.drain(None)
        await registry.close()

    conn = sqlite3.connect(registry_path(data_dir), isolation_level=None)  # as it is
    marks = ", ".join(f"'{status}'" for status in UNFINISHED)
    before = {row[0] for row in conn.execute(f"SELECT id FROM tasks WHERE status IN ({marks})")}
    asyncio.run(start_and_stop())
    after = conn.execute(f"SELECT id FROM tasks WHERE status NOT IN ({marks}) ORDER BY pk")
    finished = [row[0] for row in after if row[0] in before]
    conn.close()
    return finished


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


def one_line_request(request_id: str, line: str, file: str = "log.txt") -> RequestRecord:
    """A request with one task writing `line`."""
    request = RequestRecord(request_id, "POST", "/x", 1.0)
    task = TaskRecord(f"{request_id}-t", request_id, 0, file, line, 1.0, data=line.encode())
    request.tasks.append(task)
    return request


# --- PostgreSQL ------------------------------------------------------------------------------


def pg_registry(url: str, data_dir: Path, owner: str) -> Registry:
    store = PostgresStore(url, data_dir, retention=10_000)
    return Registry(data_dir, owner=owner, store=store, lock_timeout=5.0)


def two_tasks(request_id: str, label: str) -> RequestRecord:
    """A notification's request: its `found query` task, then its `message to` task."""
    request = RequestRecord(request_id, "POST", "/send-notification", time.time())
    for seq, line in enumerate([f"found query: {label}\n", f"message to {label}@example.com\n"]):
        request.tasks.append(
            TaskRecord(
                f"{request_id}-{seq + 1}",
                request_id,
                seq,
                "log.txt",
                line,
                time.time(),
                data=line.encode(),
            )
        )
    return request


async def die_after_claiming(registry: Registry, task: TaskRecord) -> None:
    """What a `kill -9` between a claim's commit and its write leaves: the claim committed,
    not a byte of its line written, the owner's sessions (and its lock) gone."""
    files = DataFiles(registry.data_dir)
    _, inode, size = await files.lock(task.file)
    try:
        place_lines([task], inode, size)
        await registry.store.commit(Changes(), [[task]], [])
    finally:
        files.close()
    for watcher in (registry._watcher, registry._listening):  # a dead process looks no more
        assert watcher is not None
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    store = registry.store
    assert isinstance(store, PostgresStore)
    for conn in (store._conn, store._reader):
        assert conn is not None
        await conn.close()
    registry._files.close()
    assert registry._owner_fd is not None
    os.close(registry._owner_fd)  # the kernel drops a killed process's owner lock


def a_log(data_dir: Path) -> bytes:
    path = data_dir / "log.txt"
    return path.read_bytes() if path.exists() else b""
